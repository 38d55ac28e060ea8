//! Training-loop pieces that work with any [`Optimizer`](crate::optim::Optimizer): they sit
//! around the optimizer step, not inside it.
//!
//! * [`schedule`]: learning-rate schedules (constant with warm-up, warm-up + cosine, WSD) giving
//!   the factor for [`Optimizer::set_lr_factor`](crate::optim::Optimizer::set_lr_factor);
//! * [`clip`]: global-norm gradient clipping;
//! * [`ewa`]: exponential weight averages with bias-corrected evaluation weights.
//!
//! All three are also reachable at their former paths under [`crate::optim`].

pub mod clip;
pub mod ewa;
pub mod schedule;

pub use clip::{clip_grad_norm, clip_grad_norm_named, grad_norm};
pub use ewa::Ewa;
pub use schedule::{ConstantSchedule, DecayShape, Schedule, WarmupCosineSchedule, WsdSchedule};
