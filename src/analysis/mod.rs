//! Analysis of batch-size sweeps: steps to a target loss and the critical batch size.
//!
//! The protocol is that of Zhang et al., "How Does Critical Batch Size Scale in Pre-training?"
//! (ICLR 2025; code `hlzhang109/critical-batch-size`, `plots/chinchilla.ipynb`):
//!
//! 1. [`target`]: for each batch size `B`, `S(B)` is the step of the first evaluation whose loss
//!    is below the target, minimised over the runs (hyperparameter settings) at that batch size.
//! 2. [`cbs`]: per group (an optimizer, a model size...), fit `S(B) = a + b/B` by least squares on
//!    `log S`, and report `B* = 1.2·B0 + b/(5a)`, the batch size at which `S` is 20 % above
//!    linear scaling from the reference batch `B0`, and the asymptotic variant `b/(5a)`; across
//!    groups, fit power laws `B* = c·N^e` and `B* = c·D^e`.
//! 3. [`csv`]: the `group,batch_size,steps[,n_params,tokens]` table the `cbs` binary reads.
//! 4. [`seeds`]: statistics over seeds — spread of a loss, the learning-rate range within a
//!    tolerance of the best loss, percentile bootstrap intervals of fitted quantities.

pub mod cbs;
pub mod csv;
pub mod seeds;
pub mod target;

pub use cbs::{analyze, fit_cbs, fit_power_law, CbsFit, CbsReport, CbsRow, GroupFit, PowerLaw};
pub use seeds::{
    bootstrap_interval, lr_range_within, seed_stats, BootstrapInterval, LrRange, SeedStats,
};
pub use target::{first_step_below, loss_reached, steps_to_target, Eval, Reached};
