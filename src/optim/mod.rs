//! Optimizers: one object-safe [`Optimizer`] trait over named candle variables, one
//! [`Driver`] behind it, and one short file per optimizer implementing the per-tensor [`Rule`].
//!
//! The map:
//!
//! * this folder: the machinery every optimizer shares — the trait (here), the [`driver`], named
//!   [`params`] and their roles, parameter [`groups`], [`state`] and its I/O, the per-tensor
//!   [`rule`] interface and the typed [`config`]s; the [`fused`] single-pass kernels (with their
//!   CUDA dispatch) they are written in live one layer down, in [`crate::fused`];
//! * [`algorithms`]: one file (or, for Shampoo, one folder) per optimizer, each starting with its
//!   equations, defaults and reference;
//! * [`math`]: the numerics several optimizers share — Kronecker factors, Newton–Schulz, the
//!   fused moment passes, hyperparameter warm-ups.
//!
//! Training-loop pieces that work with any optimizer (learning-rate schedules, gradient
//! clipping, weight averaging) live in [`crate::training`]; they are re-exported here, as is
//! every module that moved, so the old paths (`optim::adamw`, `optim::kron`, `optim::ewa`, …)
//! keep working.

pub mod algorithms;
pub mod config;
pub mod driver;
pub mod groups;
pub mod math;
pub mod params;
pub mod rule;
pub mod state;
#[cfg(test)]
pub(crate) use crate::testing;

// The paths these modules had before they moved into `algorithms`, `math` and `training`.
pub use crate::training::{clip, ewa, schedule};
pub use algorithms::{
    adafactor, adafactor_hf, adalayer, adamw, ademamix, adopt, cautious_adamw, lion, mars, muon,
    normuon, schedule_free, sgd, shampoo, signum, simplified_ademamix, soap, sophia,
};
pub use math::{kron, newton_schulz, warmup};

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

/// The fused passes the optimizers are written in (crate::fused), under their old path.
pub use crate::fused;
pub use clip::{clip_grad_norm, clip_grad_norm_named, grad_norm};
pub use config::{OptimConfig, RuleConfig};
pub use driver::{Driver, NonFinitePolicy};
pub use ewa::Ewa;
pub use groups::{GroupSpec, OptimizerSpec};
pub use params::{NamedParams, Param, ParamMeta, Role};
pub use rule::{ExtraInput, Mode, Rule, StepCtx};
pub use schedule::{ConstantSchedule, DecayShape, Schedule, WarmupCosineSchedule, WsdSchedule};
pub use state::{State, StateDict};

use crate::error::Result;

/// An optimizer over named parameters, usable as `Box<dyn Optimizer>`.
pub trait Optimizer: Send {
    /// Canonical name of the default group's optimizer.
    fn name(&self) -> &str;
    /// The parameters, sorted by name.
    fn params(&self) -> Vec<ParamMeta>;
    /// The variables, sorted by name.
    fn vars(&self) -> Vec<(String, Var)>;
    /// Updates every parameter that has a gradient in `grads`; others are skipped. Gradients are
    /// checked (shape, finiteness) before anything changes.
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    /// Current learning rate of the default group.
    fn lr(&self) -> f64;
    /// Sets the default group's learning rate; every group scales by the same factor.
    fn set_lr(&mut self, lr: f64);
    /// Current lr / base lr (1 at construction).
    fn lr_factor(&self) -> f64;
    /// Sets every group's lr to its base lr × `factor` (what LR schedules call).
    fn set_lr_factor(&mut self, factor: f64);
    /// Number of steps taken.
    fn step_count(&self) -> u64;
    /// Feeds an extra input (Sophia's Hessian estimate, MARS-exact's previous gradient).
    fn observe(&mut self, input: ExtraInput, values: &GradStore) -> Result<()>;
    /// Current mode.
    fn mode(&self) -> Mode;
    /// Switches parameters between train and eval points (Schedule-Free); no-op for others.
    fn set_mode(&mut self, mode: Mode) -> Result<()>;
    /// The parameters to evaluate at, by name, without changing anything.
    fn eval_params(&self) -> Result<Vec<(String, Tensor)>>;
    /// Counters worth logging (skipped steps, eigendecomposition failures …).
    fn diagnostics(&self) -> BTreeMap<String, f64>;
    /// All state, keyed by parameter name.
    fn state_dict(&self) -> Result<StateDict>;
    /// Restores state saved by the same optimizer over the same parameters.
    fn load_state_dict(&mut self, state: StateDict) -> Result<()>;

    /// Writes the state to `path` (safetensors, atomically).
    fn save_state(&self, path: &Path) -> Result<()> {
        self.state_dict()?.save(path)
    }

    /// Reads state written by [`Optimizer::save_state`]; tensors land on the parameters' device.
    fn load_state(&mut self, path: &Path) -> Result<()> {
        let device = self
            .vars()
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(Device::Cpu);
        let sd = StateDict::load(path, &device)?;
        self.load_state_dict(sd)
            .map_err(|e| crate::error::Error::file(path, e))
    }
}

/// Builds an optimizer from a spec (or a bare config) over named parameters.
pub fn build(spec: impl Into<OptimizerSpec>, params: NamedParams) -> Result<Box<dyn Optimizer>> {
    Ok(Box::new(Driver::new(spec, params)?))
}

/// Drop-in adapter implementing `candle_nn::Optimizer`, so any optlab optimizer fits an
/// existing candle loop (`opt.backward_step(&loss)?`).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{Optimizer as _, VarBuilder, VarMap, Module};
/// use optlab::optim::{CandleOptimizer, OptimConfig};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let model = candle_nn::linear(2, 1, vb.pp("fc"))?;
/// let config = OptimConfig::from_toml("name = \"adamw\"\nlr = 0.05")?;
/// let mut opt = CandleOptimizer::from_varmap(&varmap, config)?;
/// let x = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu)?;
/// let y = Tensor::new(&[[1f32], [2.]], &Device::Cpu)?;
/// for _ in 0..10 {
///     let loss = model.forward(&x)?.sub(&y)?.sqr()?.mean_all()?;
///     opt.backward_step(&loss)?;
/// }
/// # Ok(()) }
/// ```
pub struct CandleOptimizer {
    inner: Box<dyn Optimizer>,
}

impl CandleOptimizer {
    /// Wraps an optlab optimizer.
    pub fn new(inner: Box<dyn Optimizer>) -> Self {
        Self { inner }
    }

    /// Builds over every variable of a `VarMap` (sorted by name, roles inferred).
    pub fn from_varmap(varmap: &candle_nn::VarMap, spec: impl Into<OptimizerSpec>) -> Result<Self> {
        Ok(Self::new(build(spec, NamedParams::from_varmap(varmap)?)?))
    }

    /// The wrapped optimizer.
    pub fn inner(&mut self) -> &mut dyn Optimizer {
        self.inner.as_mut()
    }
}

fn to_candle(e: crate::error::Error) -> candle_core::Error {
    match e {
        crate::error::Error::Candle(e) => e,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

impl candle_nn::Optimizer for CandleOptimizer {
    type Config = OptimConfig;

    /// Bare variables get the names `param.000`, `param.001`, … in the given order, and roles
    /// from their shapes.
    fn new(vars: Vec<Var>, config: OptimConfig) -> candle_core::Result<Self> {
        let width = vars.len().to_string().len().max(3);
        let named = NamedParams::new(
            vars.into_iter()
                .enumerate()
                .map(|(i, v)| (format!("param.{i:0width$}"), v)),
        )
        .map_err(to_candle)?;
        Ok(Self::new(build(config, named).map_err(to_candle)?))
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.inner.step(grads).map_err(to_candle)
    }

    fn learning_rate(&self) -> f64 {
        self.inner.lr()
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.inner.set_lr(lr)
    }
}
