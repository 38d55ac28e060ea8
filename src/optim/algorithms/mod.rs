//! One module per optimizer (a family where variants share a module: Lion and Signum, the two
//! Schedule-Free forms, Adalayer and its SGD variant). Each starts with its equations, its
//! conventions (where weight decay goes, bias correction, first-step behaviour), defaults equal
//! to the reference's and the exact reference version, then holds its serde config and its
//! [`Rule`](crate::optim::Rule). To add an optimizer: a file here, a `pub mod` line below and a
//! line in [`OptimConfig`](crate::optim::OptimConfig)'s registry (`optim/config.rs`).

pub mod adafactor;
pub mod adafactor_hf;
pub mod adalayer;
pub mod adamw;
pub mod ademamix;
pub mod adopt;
pub mod cautious_adamw;
pub mod lion;
pub mod mars;
pub mod muon;
pub mod normuon;
pub mod psgd_kron;
pub mod schedule_free;
pub mod sgd;
pub mod shampoo;
pub mod signum;
pub mod simplified_ademamix;
pub mod soap;
pub mod sophia;
