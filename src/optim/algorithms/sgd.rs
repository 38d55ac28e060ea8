//! SGD with momentum, exactly as `torch.optim.SGD` computes it, plus the decoupled-decay form
//! (timm `SGDW`, the SGD of "Deconstructing What Makes a Good Optimizer for Language Models").
//!
//! Per parameter, per step:
//!
//! ```text
//! g ← −g if maximize
//! d = g + λ·p                        L2 decay, coupled, before the momentum (torch)
//!   (decoupled: p ← p · (1 − lr·λ) first and d = g, the gradient left alone (timm SGDW))
//! if μ ≠ 0:
//!     b ← d                          on the first step: no dampening
//!     b ← μ·b + (1 − τ)·d            afterwards (τ = dampening)
//!     d = d + μ·b if nesterov else b
//! p ← p − lr·d
//! ```
//!
//! State: `momentum_buffer` (b), only when μ ≠ 0; its absence marks the first step. Defaults
//! are torch's: lr 1e-3, μ = 0, τ = 0, λ = 0, nesterov off, maximize off, coupled decay.
//! Nesterov needs μ > 0 and τ = 0. Reference: torch 2.15 `torch/optim/sgd.py`
//! (`_single_tensor_sgd`); decoupled form: huggingface/pytorch-image-models `timm/optim/sgdw.py`
//! @ 03fa1491. (The Deconstructing code passes `weight_decay / peak_lr` as λ so the per-step
//! decay follows the schedule as `lr_t/peak_lr · wd`; that rescaling belongs to the run config.)

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Error, Result};
use crate::optim::config::{hyper_accessors, RuleConfig};
use crate::optim::fused::{
    exactly, exactly_mut, flag, vectorized, zip_mut_or_kernel, Float, Kernel,
};
use crate::optim::params::ParamMeta;
use crate::optim::rule::{expect_state_shape, Rule, StepCtx};
use crate::optim::state::State;
use crate::with_float;

/// SGD hyperparameters (torch names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum μ (0 = plain SGD, no buffer).
    pub momentum: f64,
    /// Dampening τ: later gradients enter the buffer scaled by 1 − τ.
    pub dampening: f64,
    /// Weight decay λ: L2 added to the gradient, or decoupled with `decoupled_weight_decay`.
    pub weight_decay: f64,
    /// Nesterov momentum (needs μ > 0 and τ = 0).
    pub nesterov: bool,
    /// Ascend instead of descend.
    pub maximize: bool,
    /// Decay the parameter by 1 − lr·λ before the step and leave the gradient alone (timm
    /// SGDW) instead of adding λ·p to the gradient (torch).
    pub decoupled_weight_decay: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            maximize: false,
            decoupled_weight_decay: false,
        }
    }
}

impl RuleConfig for SgdConfig {
    const NAME: &'static str = "sgd";

    fn validate(&self) -> Result<()> {
        check::non_negative("sgd.lr", self.lr)?;
        check::non_negative("sgd.momentum", self.momentum)?;
        check::closed_unit_interval("sgd.dampening", self.dampening)?;
        check::non_negative("sgd.weight_decay", self.weight_decay)?;
        if self.nesterov && self.momentum <= 0.0 {
            return Err(Error::config(
                "sgd.nesterov",
                format!("needs momentum > 0, got momentum {}", self.momentum),
            ));
        }
        if self.nesterov && self.dampening != 0.0 {
            return Err(Error::config(
                "sgd.nesterov",
                format!("needs dampening = 0, got dampening {}", self.dampening),
            ));
        }
        Ok(())
    }
    hyper_accessors!();
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(Sgd(self.clone())))
    }
}

/// The SGD rule.
#[derive(Debug, Clone)]
pub struct Sgd(pub SgdConfig);

impl Sgd {
    fn step_typed<T: Float>(
        &self,
        lr: f64,
        weight_decay: f64,
        param: &Var,
        grad: &Tensor,
        buf: Option<(&Tensor, bool)>,
    ) -> Result<()> {
        let c = &self.0;
        let sign = if c.maximize { -T::one() } else { T::one() };
        // Exactly one of the two decays is active (the other factor is 0 / 1).
        let (l2, decay) = if c.decoupled_weight_decay {
            (T::zero(), T::of(1.0 - lr * weight_decay))
        } else {
            (T::of(weight_decay), T::one())
        };
        let lr = T::of(lr);
        match buf {
            None => {
                let scalars = [decay, sign, l2, lr];
                let kernel = Kernel::new("sgd", &scalars);
                zip_mut_or_kernel::<T>(kernel, &[param.as_tensor()], &[grad], move |o, i| {
                    let p = &mut *o[0];
                    let g = exactly(i[0], p.len(), "grad")?;
                    vectorized! {
                        for (p, &g) in p.iter_mut().zip(g) {
                            *p *= decay;
                            let d = sign * g + l2 * *p;
                            *p -= lr * d;
                        }
                    }
                    Ok(())
                })
            }
            Some((buf, first)) => {
                let mu = T::of(c.momentum);
                let keep = T::of(1.0 - c.dampening);
                let nesterov = c.nesterov;
                let scalars = [decay, sign, l2, lr, mu, keep, flag(first), flag(nesterov)];
                let kernel = Kernel::new("sgd_momentum", &scalars);
                zip_mut_or_kernel::<T>(kernel, &[param.as_tensor(), buf], &[grad], move |o, i| {
                    let [p, b] = o else {
                        unreachable!("two outputs")
                    };
                    // One level of reference, so the loop keeps the slices in registers.
                    let (p, b) = (&mut **p, &mut **b);
                    let n = p.len();
                    let g = exactly(i[0], n, "grad")?;
                    let b = exactly_mut(b, n, "momentum_buffer")?;
                    vectorized! {
                        for k in 0..n {
                            p[k] *= decay;
                            let d = sign * g[k] + l2 * p[k];
                            b[k] = if first { d } else { b[k] * mu + keep * d };
                            let d = if nesterov { d + mu * b[k] } else { b[k] };
                            p[k] -= lr * d;
                        }
                    }
                    Ok(())
                })
            }
        }
    }
}

impl Rule for Sgd {
    fn name(&self) -> &'static str {
        SgdConfig::NAME
    }

    fn update(
        &self,
        ctx: &StepCtx<'_>,
        _meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        let buf = if self.0.momentum != 0.0 {
            let first = !state.tensors.contains_key("momentum_buffer");
            Some((state.tensor_or_zeros("momentum_buffer", param)?, first))
        } else {
            None
        };
        with_float!(param.dtype(), "sgd", T => {
            self.step_typed::<T>(ctx.lr, ctx.weight_decay, param, grad, buf)
        })
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        expect_state_shape(meta, state, "momentum_buffer", &meta.shape)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::{DType, Device};

    use super::*;
    use crate::optim::testing::{driver_w, step_w as step};
    use crate::optim::{Driver, NamedParams, OptimConfig};

    fn driver(cfg: SgdConfig, init: &[f64]) -> Result<Driver> {
        driver_w(OptimConfig::Sgd(cfg), init)
    }

    const GRADS: [[f64; 3]; 4] = [
        [0.2, -0.1, 0.0],
        [-0.3, 0.4, 0.0],
        [0.5, 0.6, 0.0],
        [-0.1, 0.3, 0.0],
    ];

    /// The update written out, one coordinate at a time.
    fn by_hand(cfg: &SgdConfig, init: &[f64]) -> Vec<Vec<f64>> {
        let (lr, mu, wd) = (cfg.lr, cfg.momentum, cfg.weight_decay);
        let mut p = init.to_vec();
        let mut b: Option<Vec<f64>> = None;
        let mut out = Vec::new();
        for g in &GRADS {
            if cfg.decoupled_weight_decay {
                p.iter_mut().for_each(|x| *x *= 1.0 - lr * wd);
            }
            let mut d: Vec<f64> = (0..3)
                .map(|k| {
                    let g = if cfg.maximize { -g[k] } else { g[k] };
                    if cfg.decoupled_weight_decay {
                        g
                    } else {
                        g + wd * p[k]
                    }
                })
                .collect();
            if mu != 0.0 {
                let nb: Vec<f64> = match &b {
                    None => d.clone(),
                    Some(b) => (0..3)
                        .map(|k| mu * b[k] + (1.0 - cfg.dampening) * d[k])
                        .collect(),
                };
                d = if cfg.nesterov {
                    (0..3).map(|k| d[k] + mu * nb[k]).collect()
                } else {
                    nb.clone()
                };
                b = Some(nb);
            }
            for k in 0..3 {
                p[k] -= lr * d[k];
            }
            out.push(p.clone());
        }
        out
    }

    #[test]
    fn matches_the_equations_for_every_variant() -> Result<()> {
        let init = [1.0, -2.0, 0.5];
        for (momentum, dampening, nesterov) in [
            (0.0, 0.0, false),
            (0.9, 0.0, false),
            (0.9, 0.3, false),
            (0.9, 0.0, true),
        ] {
            for decoupled_weight_decay in [false, true] {
                for maximize in [false, true] {
                    let cfg = SgdConfig {
                        lr: 0.1,
                        momentum,
                        dampening,
                        weight_decay: 0.05,
                        nesterov,
                        maximize,
                        decoupled_weight_decay,
                    };
                    let want = by_hand(&cfg, &init);
                    let mut opt = driver(cfg.clone(), &init)?;
                    for (g, w) in GRADS.iter().zip(&want) {
                        let got = step(&mut opt, g)?;
                        for k in 0..3 {
                            assert!((got[k] - w[k]).abs() <= 1e-15, "{cfg:?}: {got:?} vs {w:?}");
                        }
                    }
                    // No buffer without momentum (as torch).
                    let has_buf = opt
                        .param_state("w")
                        .unwrap()
                        .tensors
                        .contains_key("momentum_buffer");
                    assert_eq!(has_buf, momentum != 0.0);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn first_step_buffer_is_undamped() -> Result<()> {
        let cfg = SgdConfig {
            lr: 1.0,
            momentum: 0.5,
            dampening: 0.9,
            ..Default::default()
        };
        let mut opt = driver(cfg, &[0.0, 0.0, 0.0])?;
        let p = step(&mut opt, &[0.4, -0.2, 0.0])?;
        assert_eq!(p, vec![-0.4, 0.2, 0.0]);
        let b = opt.param_state("w").unwrap().tensor("momentum_buffer")?;
        assert_eq!(b.to_vec1::<f64>()?, vec![0.4, -0.2, 0.0]);
        // Second step: b = 0.5·b + 0.1·g.
        step(&mut opt, &[1.0, 1.0, 0.0])?;
        let b = opt.param_state("w").unwrap().tensor("momentum_buffer")?;
        let b = b.to_vec1::<f64>()?;
        assert!((b[0] - 0.3).abs() < 1e-15 && (b[1] - 0.0).abs() < 1e-15);
        Ok(())
    }

    #[test]
    fn nesterov_needs_momentum_and_no_dampening() {
        let no_momentum = SgdConfig {
            nesterov: true,
            ..Default::default()
        };
        let err = OptimConfig::Sgd(no_momentum).build_rule().err().unwrap();
        let msg = err.to_string();
        assert!(
            msg.contains("sgd.nesterov") && msg.contains("momentum"),
            "{msg}"
        );

        let damped = SgdConfig {
            nesterov: true,
            momentum: 0.9,
            dampening: 0.1,
            ..Default::default()
        };
        let msg = damped.validate().unwrap_err().to_string();
        assert!(
            msg.contains("sgd.nesterov") && msg.contains("dampening"),
            "{msg}"
        );

        let negative = SgdConfig {
            momentum: -0.1,
            ..Default::default()
        };
        assert!(negative
            .validate()
            .unwrap_err()
            .to_string()
            .contains("sgd.momentum"));
        assert!(SgdConfig::default().validate().is_ok());
    }

    #[test]
    fn defaults_work_in_f32() -> Result<()> {
        let var = Var::ones((2, 2), DType::F32, &Device::Cpu)?;
        let mut opt = Driver::new(
            OptimConfig::Sgd(SgdConfig::default()),
            NamedParams::new(vec![("w".to_string(), var.clone())])?,
        )?;
        let mut grads = BTreeMap::new();
        grads.insert(
            "w".to_string(),
            Tensor::ones((2, 2), DType::F32, &Device::Cpu)?,
        );
        opt.step_named(&grads)?;
        let p = var.flatten_all()?.to_vec1::<f32>()?;
        assert!(p.iter().all(|&x| x == 1.0f32 - 1e-3f32));
        Ok(())
    }
}
