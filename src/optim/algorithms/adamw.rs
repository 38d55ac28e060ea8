//! AdamW (Loshchilov & Hutter 2019), exactly as `torch.optim.AdamW` computes it.
//!
//! Per parameter, step t (1 on its first update):
//!
//! ```text
//! p ← p · (1 − lr·λ)                       decoupled decay, coupled to the current lr (torch)
//! m ← β1·m + (1 − β1)·g
//! v ← β2·v + (1 − β2)·g²
//! v̂ = max(v̂, v) if amsgrad else v          (max of the raw v)
//! p ← p − (lr / (1 − β1^t)) · m / (√v̂ / √(1 − β2^t) + ε)
//! ```
//!
//! ε sits outside the square root, after bias correction; both moments are bias-corrected and
//! this cannot be switched off (as in torch). Defaults are torch's: lr 1e-3, β = (0.9, 0.999),
//! ε = 1e-8, λ = 1e-2. Reference: torch 2.15 `torch/optim/adam.py` (`_single_tensor_adam` with
//! `decoupled_weight_decay=True`).
//!
//! The pass itself is [`AdamStep`] in [`crate::optim::math::moments`], shared with Muon and MARS.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Result};
use crate::optim::config::{hyper_accessors, RuleConfig};
use crate::optim::params::ParamMeta;
use crate::optim::rule::{expect_state_shape, Rule, StepCtx};
use crate::optim::state::State;

/// The fused pass, shared with the optimizers that fall back to AdamW (it lived here before).
pub use crate::optim::math::moments::AdamStep;

/// AdamW hyperparameters (torch names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// (β1, β2): decay rates of the first and second moments.
    pub betas: (f64, f64),
    /// Added to the bias-corrected root second moment.
    pub eps: f64,
    /// Decoupled weight decay λ (the step multiplies p by 1 − lr·λ).
    pub weight_decay: f64,
    /// Use the running maximum of the second moment (AMSGrad).
    pub amsgrad: bool,
    /// Ascend instead of descend.
    pub maximize: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
            amsgrad: false,
            maximize: false,
        }
    }
}

impl RuleConfig for AdamWConfig {
    const NAME: &'static str = "adamw";

    fn validate(&self) -> Result<()> {
        check::non_negative("adamw.lr", self.lr)?;
        check::unit_interval("adamw.betas[0]", self.betas.0)?;
        check::unit_interval("adamw.betas[1]", self.betas.1)?;
        check::positive("adamw.eps", self.eps)?;
        check::non_negative("adamw.weight_decay", self.weight_decay)
    }
    hyper_accessors!();
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(AdamW(self.clone())))
    }
}

/// The AdamW rule.
#[derive(Debug, Clone)]
pub struct AdamW(pub AdamWConfig);

impl Rule for AdamW {
    fn name(&self) -> &'static str {
        AdamWConfig::NAME
    }

    fn update(
        &self,
        ctx: &StepCtx<'_>,
        _meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        let t = state.next_step();
        state.tensor_or_zeros("exp_avg", param)?;
        state.tensor_or_zeros("exp_avg_sq", param)?;
        if self.0.amsgrad {
            state.tensor_or_zeros("max_exp_avg_sq", param)?;
        }
        AdamStep {
            lr: ctx.lr,
            beta1: self.0.betas.0,
            beta2: self.0.betas.1,
            eps: self.0.eps,
            weight_decay: ctx.weight_decay,
            t,
            maximize: self.0.maximize,
        }
        .apply(
            param,
            grad,
            state.tensor("exp_avg")?,
            state.tensor("exp_avg_sq")?,
            state.tensors.get("max_exp_avg_sq"),
        )
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        for f in ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"] {
            expect_state_shape(meta, state, f, &meta.shape)?;
        }
        Ok(())
    }
}
