//! AdEMAMix (Pagliardini, Ablin & Grangier 2024, arXiv 2409.03137), exactly as the authors'
//! PyTorch class computes it.
//!
//! Adam with a second, slow momentum mixed into the numerator. Per parameter, step t (1 on its
//! first update):
//!
//! ```text
//! α_t  = α                                    or linear warm-up 0 → α over T_α steps
//! β3_t = β3                                   or half-life warm-up β1 → β3 over T_β3 steps
//! m1 ← β1·m1 + (1 − β1)·g                     (β1 = 0: m1 = g and 1 − β1^t = 1)
//! m2 ← β3_t·m2 + (1 − β3_t)·g                 slow EMA, never bias-corrected
//! v  ← β2·v + (1 − β2)·g²
//! u  = (m1 / (1 − β1^t) + α_t·m2) / (√v / √(1 − β2^t) + ε)
//! p  ← p − lr·(u + λ·p)                       λ·p uses p before the step (decoupled, ×lr)
//! ```
//!
//! The schedulers are evaluated at the 1-based step t (see [`crate::optim::warmup`]): the first
//! update already uses α_1 = α/T_α, and for t ≥ T the end values are used exactly. The Optax
//! version in the same repository evaluates them one step earlier and has no `+1e-8` in the
//! half-life; it is not what this implements.
//!
//! Defaults are the PyTorch class's: lr 1e-3, β = (0.9, 0.999, 0.9999), α = 2, no warm-ups,
//! ε = 1e-8, λ = 0. The authors' README recommends α = 8 with both warm-ups over the whole run.
//! Reference: `apple/ml-ademamix` `pytorch/ademamix.py` @ c3d73c09f1287e5c33b95189bb0aa7de0a5a7667.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Result};
use crate::optim::config::{hyper_accessors, RuleConfig};
use crate::optim::fused::{exactly, exactly_mut, vectorized, zip_mut_or_kernel, Float, Kernel};
use crate::optim::params::ParamMeta;
use crate::optim::rule::{expect_state_shape, Rule, StepCtx};
use crate::optim::state::State;
use crate::optim::warmup;
use crate::with_float;

/// AdEMAMix hyperparameters (names and defaults of the PyTorch reference).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdEMAMixConfig {
    /// Learning rate.
    pub lr: f64,
    /// (β1, β2, β3): fast EMA, second moment, slow EMA.
    pub betas: (f64, f64, f64),
    /// Weight α of the slow EMA in the numerator.
    pub alpha: f64,
    /// Steps of the half-life warm-up of β3 from β1 (none when absent).
    pub beta3_warmup: Option<u64>,
    /// Steps of the linear warm-up of α from 0 (none when absent).
    pub alpha_warmup: Option<u64>,
    /// Added to the bias-corrected root second moment.
    pub eps: f64,
    /// Decoupled weight decay λ (the step subtracts lr·λ·p).
    pub weight_decay: f64,
}

impl Default for AdEMAMixConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999, 0.9999),
            alpha: 2.0,
            beta3_warmup: None,
            alpha_warmup: None,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdEMAMixConfig {
    /// α and β3 at the 1-based step `t`, after their warm-ups.
    pub fn schedule(&self, t: u64) -> (f64, f64) {
        let alpha = match self.alpha_warmup {
            Some(n) => warmup::linear(t, self.alpha, 0.0, n),
            None => self.alpha,
        };
        let beta3 = match self.beta3_warmup {
            Some(n) => warmup::half_life(t, self.betas.2, self.betas.0, n),
            None => self.betas.2,
        };
        (alpha, beta3)
    }
}

impl RuleConfig for AdEMAMixConfig {
    const NAME: &'static str = "ademamix";

    fn validate(&self) -> Result<()> {
        check::non_negative("ademamix.lr", self.lr)?;
        check::non_negative("ademamix.eps", self.eps)?;
        check::unit_interval("ademamix.betas[0]", self.betas.0)?;
        check::unit_interval("ademamix.betas[1]", self.betas.1)?;
        check::unit_interval("ademamix.betas[2]", self.betas.2)?;
        check::non_negative("ademamix.weight_decay", self.weight_decay)?;
        check::non_negative("ademamix.alpha", self.alpha)
    }
    hyper_accessors!();
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(AdEMAMix(self.clone())))
    }
}

/// The AdEMAMix rule.
#[derive(Debug, Clone)]
pub struct AdEMAMix(pub AdEMAMixConfig);

impl AdEMAMix {
    #[allow(clippy::too_many_arguments)]
    fn apply<T: Float>(
        &self,
        ctx: &StepCtx<'_>,
        t: u64,
        param: &Var,
        grad: &Tensor,
        m1: Option<&Tensor>,
        m2: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let (beta1, beta2, _) = self.0.betas;
        let (alpha_t, beta3_t) = self.0.schedule(t);
        let tf = t as f64;
        // With β1 = 0 the reference uses g itself as m1 and 1 − 0^t = 1.
        let bc1 = T::of(1.0 - beta1.powf(tf));
        let bc2_sqrt = T::of((1.0 - beta2.powf(tf)).sqrt());
        let (b1, c1) = (T::of(beta1), T::of(1.0 - beta1));
        let (b2, c2) = (T::of(beta2), T::of(1.0 - beta2));
        let (b3, c3) = (T::of(beta3_t), T::of(1.0 - beta3_t));
        let alpha = T::of(alpha_t);
        let eps = T::of(self.0.eps);
        let wd = T::of(ctx.weight_decay);
        let neg_lr = T::of(-ctx.lr);
        let mut outs: Vec<&Tensor> = vec![param.as_tensor(), m2, v];
        if let Some(m1) = m1 {
            outs.push(m1);
        }
        let name = if m1.is_some() {
            "ademamix"
        } else {
            "ademamix_no_m1"
        };
        let scalars = [
            b1, c1, b2, c2, b3, c3, alpha, bc1, bc2_sqrt, eps, wd, neg_lr,
        ];
        zip_mut_or_kernel::<T>(Kernel::new(name, &scalars), &outs, &[grad], move |o, i| {
            let [p, m2, v, m1 @ ..] = o else {
                unreachable!("param, m2 and v")
            };
            // One level of reference, so the loop keeps the slices in registers.
            let (p, m2, v) = (&mut **p, &mut **m2, &mut **v);
            let n = p.len();
            let g = exactly(i[0], n, "grad")?;
            let m2 = exactly_mut(m2, n, "exp_avg_slow")?;
            let v = exactly_mut(v, n, "exp_avg_sq")?;
            // The update given the fast momentum (or the gradient when β1 = 0).
            let step = |p: &mut T, m2: &mut T, v: &mut T, gk: T, fast: T| {
                *m2 = *m2 * b3 + c3 * gk;
                *v = *v * b2 + c2 * gk * gk;
                let denom = v.sqrt() / bc2_sqrt + eps;
                let update = (fast / bc1 + alpha * *m2) / denom + wd * *p;
                *p += neg_lr * update;
            };
            match m1.first_mut() {
                Some(m1) => {
                    let m1 = exactly_mut(m1, n, "exp_avg_fast")?;
                    vectorized! {
                        for k in 0..n {
                            m1[k] = m1[k] * b1 + c1 * g[k];
                            step(&mut p[k], &mut m2[k], &mut v[k], g[k], m1[k]);
                        }
                    }
                }
                None => vectorized! {
                    for k in 0..n {
                        step(&mut p[k], &mut m2[k], &mut v[k], g[k], g[k]);
                    }
                },
            }
            Ok(())
        })
    }
}

impl Rule for AdEMAMix {
    fn name(&self) -> &'static str {
        AdEMAMixConfig::NAME
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
        // The reference keeps no fast EMA when β1 = 0.
        let fast = self.0.betas.0 != 0.0;
        if fast {
            state.tensor_or_zeros("exp_avg_fast", param)?;
        }
        state.tensor_or_zeros("exp_avg_slow", param)?;
        state.tensor_or_zeros("exp_avg_sq", param)?;
        let m1 = if fast {
            Some(state.tensor("exp_avg_fast")?)
        } else {
            None
        };
        let m2 = state.tensor("exp_avg_slow")?;
        let v = state.tensor("exp_avg_sq")?;
        with_float!(param.dtype(), "ademamix", T => self.apply::<T>(ctx, t, param, grad, m1, m2, v))
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        for f in ["exp_avg_fast", "exp_avg_slow", "exp_avg_sq"] {
            expect_state_shape(meta, state, f, &meta.shape)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::testing::{driver_w, step_w};
    use crate::optim::{Driver, NamedParams, OptimConfig};
    use candle_core::Device;
    use std::collections::BTreeMap;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-300)
    }

    #[test]
    fn scheduler_worked_values() {
        let cfg = AdEMAMixConfig {
            betas: (0.9, 0.999, 0.9999),
            alpha: 8.0,
            beta3_warmup: Some(10),
            alpha_warmup: Some(10),
            ..Default::default()
        };
        let cases = [
            (1, 0.8, 0.9990090102690186),
            (5, 4.0, 0.9998002195855972),
            (9, 7.2, 0.9998889123310288),
        ];
        for (t, alpha, beta3) in cases {
            let (a, b) = cfg.schedule(t);
            assert!(close(a, alpha, 1e-15), "alpha at t={t}: {a}");
            assert!(close(b, beta3, 1e-13), "beta3 at t={t}: {b}");
        }
        for t in [10, 11, 1000] {
            assert_eq!(cfg.schedule(t), (8.0, 0.9999));
        }
        let plain = AdEMAMixConfig::default();
        assert_eq!(plain.schedule(1), (2.0, 0.9999));
    }

    fn run(cfg: AdEMAMixConfig, grads: &[Vec<f64>], init: &[f64]) -> Result<Vec<f64>> {
        let mut opt = driver_w(OptimConfig::Ademamix(cfg), init)?;
        let mut p = init.to_vec();
        for g in grads {
            p = step_w(&mut opt, g)?;
        }
        Ok(p)
    }

    /// A plain scalar re-derivation of the update, including the β1 = 0 case.
    fn by_hand(cfg: &AdEMAMixConfig, grads: &[Vec<f64>], init: &[f64]) -> Vec<f64> {
        let (b1, b2, _) = cfg.betas;
        let mut p = init.to_vec();
        let n = p.len();
        let (mut m1, mut m2, mut v) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        for (s, g) in grads.iter().enumerate() {
            let t = s as u64 + 1;
            let (alpha, b3) = cfg.schedule(t);
            for k in 0..n {
                m1[k] = if b1 == 0.0 {
                    g[k]
                } else {
                    b1 * m1[k] + (1.0 - b1) * g[k]
                };
                m2[k] = b3 * m2[k] + (1.0 - b3) * g[k];
                v[k] = b2 * v[k] + (1.0 - b2) * g[k] * g[k];
                let bc1 = 1.0 - b1.powi(t as i32);
                let bc2 = 1.0 - b2.powi(t as i32);
                let u = (m1[k] / bc1 + alpha * m2[k]) / ((v[k] / bc2).sqrt() + cfg.eps);
                p[k] -= cfg.lr * (u + cfg.weight_decay * p[k]);
            }
        }
        p
    }

    fn grads() -> Vec<Vec<f64>> {
        (0..12)
            .map(|s| {
                (0..5)
                    .map(|k| ((s * 7 + k * 3) as f64 * 0.37).sin() - 0.1 * k as f64)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn matches_a_hand_derivation_with_and_without_fast_ema() -> Result<()> {
        let init = [0.5, -1.0, 2.0, 0.0, 0.25];
        for beta1 in [0.9, 0.0] {
            let cfg = AdEMAMixConfig {
                lr: 0.01,
                betas: (beta1, 0.99, 0.999),
                alpha: 5.0,
                beta3_warmup: Some(6),
                alpha_warmup: Some(4),
                weight_decay: 0.1,
                ..Default::default()
            };
            let got = run(cfg.clone(), &grads(), &init)?;
            let want = by_hand(&cfg, &grads(), &init);
            for (a, b) in got.iter().zip(&want) {
                assert!(close(*a, *b, 1e-12), "beta1={beta1}: {a} vs {b}");
            }
        }
        Ok(())
    }

    #[test]
    fn no_fast_state_when_beta1_is_zero() -> Result<()> {
        let dev = Device::Cpu;
        let var = Var::new(&[1.0f64, 2.0], &dev)?;
        let params = NamedParams::new([("w".to_string(), var)])?;
        let cfg = AdEMAMixConfig {
            betas: (0.0, 0.999, 0.9999),
            ..Default::default()
        };
        let mut opt = Driver::new(OptimConfig::Ademamix(cfg), params)?;
        let mut g = BTreeMap::new();
        g.insert("w".to_string(), Tensor::new(&[0.1f64, -0.2], &dev)?);
        opt.step_named(&g)?;
        let st = opt.param_state("w").expect("state");
        assert!(!st.tensors.contains_key("exp_avg_fast"));
        assert!(st.tensors.contains_key("exp_avg_slow"));
        Ok(())
    }

    #[test]
    fn validation_names_the_field() {
        let bad = AdEMAMixConfig {
            betas: (0.9, 0.999, 1.0),
            ..Default::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("ademamix.betas[2]"), "{e}");
        let bad = AdEMAMixConfig {
            alpha: -1.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("alpha"));
    }
}
