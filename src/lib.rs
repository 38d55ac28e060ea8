//! # optlab
//!
//! Optimizer research on language models, on candle: SOAP, Shampoo, AdEMAMix,
//! Simplified-AdEMAMix, Adalayer and the baselines their papers compare against, each exact
//! against its reference implementation, behind one object-safe [`optim::Optimizer`] trait.

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
