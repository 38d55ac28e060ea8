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

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Result};
use crate::optim::config::RuleConfig;
use crate::optim::fused::{zip_mut_or_kernel, Float, Kernel};
use crate::optim::params::ParamMeta;
use crate::optim::rule::{expect_state_shape, Rule, StepCtx};
use crate::optim::state::State;
use crate::with_float;

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
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }
    fn set_weight_decay(&mut self, wd: f64) {
        self.weight_decay = wd;
    }
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(AdamW(self.clone())))
    }
}

/// The AdamW rule.
#[derive(Debug, Clone)]
pub struct AdamW(pub AdamWConfig);

/// One fused AdamW pass over a parameter. Shared by every optimizer that falls back to AdamW
/// (Muon's non-matrix parameters, MARS's 1-D path) so they stay bit-identical to it.
pub struct AdamStep {
    /// Learning rate.
    pub lr: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay (multiplied by lr).
    pub weight_decay: f64,
    /// 1-based step.
    pub t: u64,
    /// Negate the gradient.
    pub maximize: bool,
}

impl AdamStep {
    /// Applies the step to `param` with moments `m`, `v` (and `vmax` for AMSGrad).
    pub fn apply(
        &self,
        param: &Var,
        grad: &Tensor,
        m: &Tensor,
        v: &Tensor,
        vmax: Option<&Tensor>,
    ) -> Result<()> {
        with_float!(param.dtype(), "adamw", T => self.apply_typed::<T>(param, grad, m, v, vmax))
    }

    fn apply_typed<T: Float>(
        &self,
        param: &Var,
        grad: &Tensor,
        m: &Tensor,
        v: &Tensor,
        vmax: Option<&Tensor>,
    ) -> Result<()> {
        let decay = T::of(1.0 - self.lr * self.weight_decay);
        let (b1, b2) = (T::of(self.beta1), T::of(self.beta2));
        let (c1, c2) = (T::of(1.0 - self.beta1), T::of(1.0 - self.beta2));
        let step_size = T::of(self.lr / (1.0 - self.beta1.powi(self.t as i32)));
        let bc2_sqrt = T::of((1.0 - self.beta2.powi(self.t as i32)).sqrt());
        let eps = T::of(self.eps);
        let sign = if self.maximize { -T::one() } else { T::one() };
        let mut outs: Vec<&Tensor> = vec![param.as_tensor(), m, v];
        if let Some(vm) = vmax {
            outs.push(vm);
        }
        let name = if vmax.is_some() {
            "adamw_amsgrad"
        } else {
            "adamw"
        };
        let scalars = [decay, b1, c1, b2, c2, step_size, bc2_sqrt, eps, sign];
        zip_mut_or_kernel::<T>(Kernel::new(name, &scalars), &outs, &[grad], |o, i| {
            let g = i[0];
            let (p, rest) = o.split_first_mut().expect("param");
            let (m, rest) = rest.split_first_mut().expect("m");
            let (v, rest) = rest.split_first_mut().expect("v");
            match rest.first_mut() {
                None => {
                    for k in 0..p.len() {
                        let gk = sign * g[k];
                        m[k] = b1 * m[k] + c1 * gk;
                        v[k] = b2 * v[k] + c2 * gk * gk;
                        let denom = v[k].sqrt() / bc2_sqrt + eps;
                        p[k] = p[k] * decay - step_size * m[k] / denom;
                    }
                }
                Some(vmax) => {
                    for k in 0..p.len() {
                        let gk = sign * g[k];
                        m[k] = b1 * m[k] + c1 * gk;
                        v[k] = b2 * v[k] + c2 * gk * gk;
                        vmax[k] = num_traits::Float::max(vmax[k], v[k]);
                        let denom = vmax[k].sqrt() / bc2_sqrt + eps;
                        p[k] = p[k] * decay - step_size * m[k] / denom;
                    }
                }
            }
            Ok(())
        })
    }
}

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
