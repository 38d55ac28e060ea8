//! # optlab
//!
//! Optimizer research on language models, on candle: SOAP, Shampoo, AdEMAMix,
//! Simplified-AdEMAMix, Adalayer and the baselines their papers compare against, each exact
//! against its reference implementation, behind one object-safe [`optim::Optimizer`] trait.
//!
//! Where things live: [`optim`] holds the machinery every optimizer shares (trait, driver,
//! parameters, groups, state, configs), with the optimizers themselves in
//! [`optim::algorithms`] and the numerics they share in [`optim::math`]; [`training`] holds
//! what wraps any optimizer in a training loop (LR schedules, clipping, weight averaging);
//! [`runner`] and [`sweep`] run trainings and sweeps, [`analysis`] and [`plots`] read them.
//!
//! The machinery under the optimizers, each layer using only those above it in this list:
//!
//! 1. [`float`]: the element types (f32, f64) and mutable slices of CPU tensors;
//! 2. [`launch`]: how a kernel of `kernels/*.cu` is called (argument block, grid sizes), and
//!    `launch::emulate`, which runs the kernels' code on the host (tests without a GPU);
//! 3. [`cuda`] (feature `cuda`): device pointers, kernel launches, cuBLAS and cuSOLVER;
//! 4. [`fused`]: the fused passes (a CPU loop, or its kernel on a GPU) every optimizer and the
//!    device linear algebra are written in;
//! 5. [`linalg`]: eigendecompositions, QR and inverse roots, on the host (faer) and on the
//!    device (`linalg::on_device`);
//! 6. [`optim`]: the trait, the driver and the optimizers; then [`models`], [`data`],
//!    [`runner`], [`sweep`] and [`analysis`] for experiments.

pub mod analysis;
pub mod conformance;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod error;
pub mod float;
pub mod fused;
pub mod io;
pub mod launch;
pub mod linalg;
pub mod models;
pub mod optim;
pub mod plots;
pub mod runner;
pub mod sweep;
#[cfg(test)]
pub(crate) mod testing;
pub mod training;

pub use error::{Error, Result};
