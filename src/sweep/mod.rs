//! Batch-size sweeps: a TOML definition expanded into runs with stable ids ([`spec`]), workers
//! that run a shard of them with locks, skipping finished runs and resuming interrupted ones
//! ([`exec`], [`lock`]), Slurm job-array scripts ([`slurm`]), and the report that turns the runs
//! into steps to target and critical batch sizes ([`report`]).
//!
//! The protocol is that of Zhang et al., "How Does Critical Batch Size Scale in Pre-training?"
//! (ICLR 2025): for each optimizer and batch size, the steps to reach a target loss, minimised
//! over the hyperparameters swept, with β2, the EWA decay and the warm-up tied to the batch size;
//! and the SOAP paper's batch-size experiment (preconditioning frequency × batch size held
//! constant).

pub mod exec;
pub mod lock;
pub mod report;
pub mod slurm;
pub mod spec;

pub use exec::{run_shard, run_state, RunState, WorkerOptions, WorkerReport};
pub use lock::RunLock;
pub use report::SweepReport;
pub use spec::{Plan, PlannedRun, SweepSpec};
