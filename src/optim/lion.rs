//! Lion, "EvoLved Sign Momentum" (Chen et al. 2023), exactly as the google/automl reference
//! computes it.
//!
//! Per parameter, per step (the order matters):
//!
//! ```text
//! p ← p · (1 − lr·λ)                 decoupled decay, coupled to the current lr
//! c = β1·m + (1 − β1)·g              interpolation, not stored
//! p ← p − lr · sign(c)               sign(0) = 0, as torch.sign
//! m ← β2·m + (1 − β2)·g              the momentum moves with β2, after the step
//! ```
//!
//! State: `exp_avg` (m), zeros at start. There is no step counter, no bias correction and no ε.
//! Defaults are the reference's: lr 1e-4, β = (0.9, 0.99), λ = 0. The authors suggest an lr
//! 3–10× smaller than AdamW's and a weight decay 3–10× larger (the effective decay is lr·λ).
//! Reference: google/automl `lion/lion_pytorch.py` @ 6a54c8741e7c3265d4547c4f35f47a0391122dc5
//! (lucidrains `lion-pytorch` 0.2.5 with `decoupled_weight_decay=False` computes the same).
//!
//! [`SignMomentumStep`] is the fused pass; Signum ([`crate::optim::signum`]) is this pass with
//! tied betas.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Result};
use crate::optim::config::RuleConfig;
use crate::optim::fused::{zip_mut_or_kernel, Float, Kernel};
use crate::optim::params::ParamMeta;
use crate::optim::rule::{expect_state_shape, Rule, StepCtx};
use crate::optim::state::State;
use crate::with_float;

/// Lion hyperparameters (reference names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LionConfig {
    /// Learning rate (the size of every coordinate's step).
    pub lr: f64,
    /// (β1, β2): β1 interpolates the update direction, β2 is the momentum's decay.
    pub betas: (f64, f64),
    /// Decoupled weight decay λ (the step multiplies p by 1 − lr·λ).
    pub weight_decay: f64,
}

impl Default for LionConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            betas: (0.9, 0.99),
            weight_decay: 0.0,
        }
    }
}

impl RuleConfig for LionConfig {
    const NAME: &'static str = "lion";

    fn validate(&self) -> Result<()> {
        check::non_negative("lion.lr", self.lr)?;
        check::unit_interval("lion.betas[0]", self.betas.0)?;
        check::unit_interval("lion.betas[1]", self.betas.1)?;
        check::non_negative("lion.weight_decay", self.weight_decay)
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
        Ok(Box::new(Lion(self.clone())))
    }
}

/// The Lion rule.
#[derive(Debug, Clone)]
pub struct Lion(pub LionConfig);

/// `sign(x)` with `sign(±0) = 0` (torch.sign); `Float::signum` would give ±1 at zero, which
/// moves coordinates whose momentum is exactly zero.
#[inline(always)]
pub fn sign<T: Float>(x: T) -> T {
    if x > T::zero() {
        T::one()
    } else if x < T::zero() {
        -T::one()
    } else {
        // ±0 gives 0; NaN stays NaN (as torch.sign), so a broken state is not hidden.
        if x.is_nan() {
            x
        } else {
            T::zero()
        }
    }
}

/// One fused sign-momentum pass (Lion; Signum when β1 = β2) over a parameter and its momentum.
pub struct SignMomentumStep {
    /// Learning rate.
    pub lr: f64,
    /// β1: interpolation weight of the momentum in the update direction.
    pub beta1: f64,
    /// β2: decay of the stored momentum.
    pub beta2: f64,
    /// Decoupled weight decay (multiplied by lr).
    pub weight_decay: f64,
}

impl SignMomentumStep {
    /// Applies the step to `param`, updating the momentum `m` in place.
    pub fn apply(&self, param: &Var, grad: &Tensor, m: &Tensor) -> Result<()> {
        with_float!(param.dtype(), "lion", T => self.apply_typed::<T>(param, grad, m))
    }

    fn apply_typed<T: Float>(&self, param: &Var, grad: &Tensor, m: &Tensor) -> Result<()> {
        let decay = T::of(1.0 - self.lr * self.weight_decay);
        let lr = T::of(self.lr);
        let (b1, c1) = (T::of(self.beta1), T::of(1.0 - self.beta1));
        let (b2, c2) = (T::of(self.beta2), T::of(1.0 - self.beta2));
        let scalars = [decay, lr, b1, c1, b2, c2];
        let kernel = Kernel::new("sign_momentum", &scalars);
        zip_mut_or_kernel::<T>(kernel, &[param.as_tensor(), m], &[grad], |o, i| {
            let g = i[0];
            let [p, m] = o else {
                unreachable!("two outputs")
            };
            for k in 0..p.len() {
                let c = m[k] * b1 + g[k] * c1;
                p[k] = p[k] * decay - lr * sign(c);
                m[k] = m[k] * b2 + g[k] * c2;
            }
            Ok(())
        })
    }
}

impl Rule for Lion {
    fn name(&self) -> &'static str {
        LionConfig::NAME
    }

    fn update(
        &self,
        ctx: &StepCtx<'_>,
        _meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        let m = state.tensor_or_zeros("exp_avg", param)?;
        SignMomentumStep {
            lr: ctx.lr,
            beta1: self.0.betas.0,
            beta2: self.0.betas.1,
            weight_decay: ctx.weight_decay,
        }
        .apply(param, grad, m)
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        expect_state_shape(meta, state, "exp_avg", &meta.shape)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::{DType, Device};

    use super::*;
    use crate::optim::{Driver, NamedParams, OptimConfig, Optimizer};

    fn driver(cfg: OptimConfig, init: &[f64]) -> Result<Driver> {
        let var = Var::from_tensor(&Tensor::new(init, &Device::Cpu)?)?;
        Driver::new(cfg, NamedParams::new(vec![("w".to_string(), var)])?)
    }

    fn step(opt: &mut Driver, g: &[f64]) -> Result<Vec<f64>> {
        let mut grads = BTreeMap::new();
        grads.insert("w".to_string(), Tensor::new(g, &Device::Cpu)?);
        opt.step_named(&grads)?;
        Ok(opt.vars()[0].1.to_vec1::<f64>()?)
    }

    #[test]
    fn sign_of_zero_is_zero() {
        assert_eq!(sign(0.0f64), 0.0);
        assert_eq!(sign(-0.0f64), 0.0);
        assert_eq!(sign(0.0f32), 0.0);
        assert_eq!(sign(3.0f64), 1.0);
        assert_eq!(sign(-1e-300f64), -1.0);
        assert!(sign(f64::NAN).is_nan());
    }

    #[test]
    fn zero_gradient_and_zero_momentum_leave_the_parameter_alone() -> Result<()> {
        let cfg = LionConfig {
            lr: 0.1,
            ..Default::default()
        };
        let mut opt = driver(OptimConfig::Lion(cfg), &[1.0, -2.0, 0.5])?;
        // m = 0 and g = 0 at coordinate 1: c = 0, sign 0, no move.
        let p = step(&mut opt, &[0.5, 0.0, -0.25])?;
        assert_eq!(p, vec![0.9, -2.0, 0.6]);
        Ok(())
    }

    #[test]
    fn matches_the_equations_over_several_steps() -> Result<()> {
        let (lr, b1, b2, wd) = (0.01, 0.8, 0.95, 0.3);
        let cfg = LionConfig {
            lr,
            betas: (b1, b2),
            weight_decay: wd,
        };
        let init = [0.3, -0.7, 1.1, 0.0];
        let grads = [
            [0.2, -0.1, 0.05, 1.0],
            [-0.3, -0.2, 0.01, -0.5],
            [0.4, 0.6, -0.9, 0.2],
            [-0.1, 0.3, 0.2, -0.7],
        ];
        let mut opt = driver(OptimConfig::Lion(cfg), &init)?;
        let (mut p, mut m) = (init.to_vec(), vec![0.0; 4]);
        for g in &grads {
            let got = step(&mut opt, g)?;
            for k in 0..4 {
                p[k] *= 1.0 - lr * wd;
                let c = b1 * m[k] + (1.0 - b1) * g[k];
                p[k] -= lr * sign(c);
                m[k] = b2 * m[k] + (1.0 - b2) * g[k];
            }
            for k in 0..4 {
                assert!((got[k] - p[k]).abs() <= 1e-15, "{got:?} vs {p:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn runs_in_f32_and_rejects_bad_betas() -> Result<()> {
        let var = Var::zeros((2, 3), DType::F32, &Device::Cpu)?;
        let mut opt = Driver::new(
            OptimConfig::Lion(LionConfig::default()),
            NamedParams::new(vec![("w".to_string(), var.clone())])?,
        )?;
        let mut grads = BTreeMap::new();
        grads.insert(
            "w".to_string(),
            Tensor::ones((2, 3), DType::F32, &Device::Cpu)?,
        );
        opt.step_named(&grads)?;
        let p = var.flatten_all()?.to_vec1::<f32>()?;
        assert!(p.iter().all(|&x| x == -1e-4f32));

        let bad = LionConfig {
            betas: (0.9, 1.0),
            ..Default::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("lion.betas[1]"), "{err}");
        Ok(())
    }
}
