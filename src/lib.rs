//! # optlab
//!
//! Optimizer research on language models, on candle: SOAP, Shampoo, AdEMAMix,
//! Simplified-AdEMAMix, Adalayer and the baselines their papers compare against, each exact
//! against its reference implementation, behind one object-safe [`optim::Optimizer`] trait.
//!
//! Where things live: [`optim`] holds the machinery every optimizer shares (trait, driver,
//! parameters, groups, state, configs, fused kernels), with the optimizers themselves in
//! [`optim::algorithms`] and the numerics they share in [`optim::math`]; [`training`] holds
//! what wraps any optimizer in a training loop (LR schedules, clipping, weight averaging);
//! [`runner`] and [`sweep`] run trainings and sweeps, [`analysis`] and [`plots`] read them.

pub mod analysis;
pub mod conformance;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod error;
pub mod io;
pub mod kernels;
pub mod linalg;
pub mod models;
pub mod optim;
pub mod plots;
pub mod runner;
pub mod sweep;
pub mod training;

pub use error::{Error, Result};
