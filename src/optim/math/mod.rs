//! Numerics shared by several optimizers, kept apart so that each optimizer's file holds only
//! its own equations:
//!
//! * [`kron`]: Kronecker-factored preconditioning (factor statistics, mode products, eigenbasis
//!   refresh, blocking) for SOAP and Shampoo;
//! * [`newton_schulz`]: quintic Newton–Schulz orthogonalization for Muon and MARS-Shampoo;
//! * [`moments`]: the fused Adam and sign-momentum passes that AdamW, Muon, MARS, Lion and
//!   Signum run (one pass each, so the optimizers that reuse one stay bit-identical to it);
//! * [`warmup`]: the hyperparameter ramps of AdEMAMix and Simplified-AdEMAMix.

pub mod kron;
pub mod moments;
pub mod newton_schulz;
pub mod polar_express;
pub mod warmup;
