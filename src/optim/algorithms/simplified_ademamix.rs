//! Simplified-AdEMAMix (Morwani, Vyas, Zhang & Kakade 2025, "Connections between Schedule-Free
//! Optimizers, AdEMAMix, and Accelerated SGD Variants", arXiv 2502.02431), exactly as the
//! authors' `SimAdEMAMix` computes it.
//!
//! One momentum, accumulated "theory style" (no `1 − β1` factor), plus α times the current
//! gradient. Per parameter, step t (1 on its first update):
//!
//! ```text
//! β1_t = β1                       or half-life warm-up min_beta1 → β1 over `beta1_warmup` steps
//! m ← β1_t·m + g                  m = Σ_s (Π β1)·g_s = EMA/(1 − β1) for constant β1
//! N ← β1_t·N + 1                  num_sum (scalar state)
//! v ← β2·v + (1 − β2)·g²
//! D ← β2·D + (1 − β2)             den_sum = 1 − β2^t, kept recursively (scalar state)
//! u = (α·g + m) / (√v + ε·√D)
//! u ← u / N      if bias_correction1
//! u ← u · √D     if bias_correction2   (then u = (α·g + m)/(√(v/(1 − β2^t)) + ε))
//! p ← p − lr·(u + λ·p)            decoupled decay, not touched by the bias corrections
//! ```
//!
//! The warm-up is the AdEMAMix half-life ramp ([`crate::optim::warmup::half_life`]: 1-based t,
//! `+1e-8` inside the logarithm, exact β1 for t ≥ T). In the reference `bias_correction1` and
//! `bias_correction2` are attributes of the optimizer object rather than per-group values; here
//! they are ordinary config fields (so a group with its own config may set them differently).
//!
//! Defaults are the reference's: lr 1e-4, β = (0.99, 0.95), α = 0, no warm-up, ε = 1e-8,
//! λ = 0, min_beta1 = 0.9, bias_correction1 = false, bias_correction2 = true. The README's
//! recipe: warm β1 up from min_beta1 over the whole run; from a tuned Adam (lr_A, β1_A, β2_A)
//! take min_beta1 = β1_A, β2 = β2_A, lr = lr_A·√((1 − min_beta1)(1 − β1)); α shrinks roughly
//! linearly with the batch size.
//!
//! Reference: `DepenM/Simplified-AdEMAMix` `simplified_AdEMAMix.py`
//! @ dba14d0fd99e7a887cfb33dc0a6beb56adaa4244.

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

/// Simplified-AdEMAMix hyperparameters (names and defaults of the reference).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimplifiedAdEMAMixConfig {
    /// Learning rate.
    pub lr: f64,
    /// (β1, β2): momentum (theory-style accumulation) and second-moment decay.
    pub betas: (f64, f64),
    /// Weight α of the current gradient added to the momentum.
    pub alpha: f64,
    /// Steps of the half-life warm-up of β1 from `min_beta1` (none when absent).
    pub beta1_warmup: Option<u64>,
    /// Added to the root second moment (after bias correction when `bias_correction2`).
    pub eps: f64,
    /// Decoupled weight decay λ (the step subtracts lr·λ·p).
    pub weight_decay: f64,
    /// Starting β1 of the warm-up.
    pub min_beta1: f64,
    /// Divide the update by `num_sum` = Σ Π β1 (off by default, as in the reference).
    pub bias_correction1: bool,
    /// Correct the second moment by 1 − β2^t.
    pub bias_correction2: bool,
}

impl Default for SimplifiedAdEMAMixConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            betas: (0.99, 0.95),
            alpha: 0.0,
            beta1_warmup: None,
            eps: 1e-8,
            weight_decay: 0.0,
            min_beta1: 0.9,
            bias_correction1: false,
            bias_correction2: true,
        }
    }
}

impl SimplifiedAdEMAMixConfig {
    /// β1 at the 1-based step `t`, after its warm-up.
    pub fn beta1_at(&self, t: u64) -> f64 {
        match self.beta1_warmup {
            Some(n) => warmup::half_life(t, self.betas.0, self.min_beta1, n),
            None => self.betas.0,
        }
    }
}

impl RuleConfig for SimplifiedAdEMAMixConfig {
    const NAME: &'static str = "simplified_ademamix";

    fn validate(&self) -> Result<()> {
        check::non_negative("simplified_ademamix.lr", self.lr)?;
        check::non_negative("simplified_ademamix.eps", self.eps)?;
        check::unit_interval("simplified_ademamix.betas[0]", self.betas.0)?;
        check::unit_interval("simplified_ademamix.betas[1]", self.betas.1)?;
        check::non_negative("simplified_ademamix.weight_decay", self.weight_decay)?;
        check::non_negative("simplified_ademamix.alpha", self.alpha)?;
        check::unit_interval("simplified_ademamix.min_beta1", self.min_beta1)
    }
    hyper_accessors!();
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(SimplifiedAdEMAMix(self.clone())))
    }
}

/// The Simplified-AdEMAMix rule.
#[derive(Debug, Clone)]
pub struct SimplifiedAdEMAMix(pub SimplifiedAdEMAMixConfig);

/// Per-step scalars of one update, computed once in f64.
struct Coeffs {
    beta1: f64,
    beta2: f64,
    /// ε·√den_sum.
    eps_term: f64,
    /// num_sum when bias_correction1 (the update is divided by it).
    num_sum: Option<f64>,
    /// √den_sum when bias_correction2.
    den_sqrt: Option<f64>,
}

impl SimplifiedAdEMAMix {
    fn apply<T: Float>(
        &self,
        ctx: &StepCtx<'_>,
        c: &Coeffs,
        param: &Var,
        grad: &Tensor,
        m: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let b1 = T::of(c.beta1);
        let (b2, c2) = (T::of(c.beta2), T::of(1.0 - c.beta2));
        let alpha = T::of(self.0.alpha);
        let eps_term = T::of(c.eps_term);
        let num_sum = c.num_sum.map(T::of);
        let den_sqrt = c.den_sqrt.map(T::of);
        let wd = T::of(ctx.weight_decay);
        let neg_lr = T::of(-ctx.lr);
        // The kernel divides by num_sum and multiplies by den_sqrt unconditionally; 1 leaves the
        // value unchanged bit for bit, as skipping the operation does here.
        let scalars = [
            b1,
            b2,
            c2,
            alpha,
            eps_term,
            num_sum.unwrap_or(T::one()),
            den_sqrt.unwrap_or(T::one()),
            wd,
            neg_lr,
        ];
        let kernel = Kernel::new("simplified_ademamix", &scalars);
        zip_mut_or_kernel::<T>(kernel, &[param.as_tensor(), m, v], &[grad], move |o, i| {
            let [p, m, v] = o else {
                unreachable!("three outputs")
            };
            // One level of reference, so the loop keeps the slices in registers.
            let (p, m, v) = (&mut **p, &mut **m, &mut **v);
            let n = p.len();
            let g = exactly(i[0], n, "grad")?;
            let m = exactly_mut(m, n, "exp_avg")?;
            let v = exactly_mut(v, n, "exp_avg_sq")?;
            vectorized! { for k in 0..n {
                let gk = g[k];
                m[k] = m[k] * b1 + gk;
                v[k] = v[k] * b2 + c2 * gk * gk;
                let denom = v[k].sqrt() + eps_term;
                let mut u = (alpha * gk + m[k]) / denom;
                if let Some(n) = num_sum {
                    u /= n;
                }
                if let Some(d) = den_sqrt {
                    u *= d;
                }
                u += wd * p[k];
                p[k] += neg_lr * u;
            } }
            Ok(())
        })
    }
}

impl Rule for SimplifiedAdEMAMix {
    fn name(&self) -> &'static str {
        SimplifiedAdEMAMixConfig::NAME
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
        let beta1 = self.0.beta1_at(t);
        let beta2 = self.0.betas.1;
        let num_sum = beta1 * state.scalar("num_sum") + 1.0;
        let den_sum = beta2 * state.scalar("den_sum") + (1.0 - beta2);
        state.set_scalar("num_sum", num_sum);
        state.set_scalar("den_sum", den_sum);
        state.tensor_or_zeros("exp_avg", param)?;
        state.tensor_or_zeros("exp_avg_sq", param)?;
        let coeffs = Coeffs {
            beta1,
            beta2,
            eps_term: self.0.eps * den_sum.sqrt(),
            num_sum: self.0.bias_correction1.then_some(num_sum),
            den_sqrt: self.0.bias_correction2.then(|| den_sum.sqrt()),
        };
        let m = state.tensor("exp_avg")?;
        let v = state.tensor("exp_avg_sq")?;
        with_float!(param.dtype(), "simplified_ademamix", T =>
            self.apply::<T>(ctx, &coeffs, param, grad, m, v))
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        for f in ["exp_avg", "exp_avg_sq"] {
            expect_state_shape(meta, state, f, &meta.shape)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::adamw::AdamStep;
    use crate::optim::ademamix::AdEMAMixConfig;
    use crate::optim::testing::{driver_w, step_w};
    use crate::optim::OptimConfig;
    use candle_core::{DType, Device};

    const INIT: [f64; 6] = [0.5, -1.0, 2.0, 0.0, 0.25, -0.75];

    fn grads() -> Vec<Vec<f64>> {
        (0..10)
            .map(|s| {
                (0..INIT.len())
                    .map(|k| ((s * 5 + k * 3) as f64 * 0.41).cos() + 0.05 * k as f64)
                    .collect()
            })
            .collect()
    }

    fn run(cfg: OptimConfig) -> Result<Vec<f64>> {
        let mut opt = driver_w(cfg, &INIT)?;
        let mut p = INIT.to_vec();
        for g in grads() {
            p = step_w(&mut opt, &g)?;
        }
        Ok(p)
    }

    fn assert_close(got: &[f64], want: &[f64], rel: f64) {
        for (a, b) in got.iter().zip(want) {
            assert!(
                (a - b).abs() <= rel * b.abs().max(1e-12),
                "{a} vs {b} ({got:?} vs {want:?})"
            );
        }
    }

    /// α = 0, no warm-up, no first-moment bias correction: m_t = EMA_t/(1 − β1), so the step is
    /// Adam's without its 1/(1 − β1^t) at lr/(1 − β1). AdamStep divides by 1 − β1^t, so each
    /// step hands it lr·(1 − β1^t)/(1 − β1) and a weight decay rescaled to keep lr·λ.
    #[test]
    fn alpha_zero_is_adam_without_first_moment_correction() -> Result<()> {
        let (lr, b1, b2, eps, wd) = (0.01, 0.9, 0.95, 1e-8, 0.1);
        let sim = SimplifiedAdEMAMixConfig {
            lr,
            betas: (b1, b2),
            alpha: 0.0,
            eps,
            weight_decay: wd,
            ..Default::default()
        };
        let got = run(OptimConfig::SimplifiedAdemamix(sim))?;

        let dev = Device::Cpu;
        let p = Var::new(&INIT, &dev)?;
        let m = Tensor::zeros(INIT.len(), DType::F64, &dev)?;
        let v = Tensor::zeros(INIT.len(), DType::F64, &dev)?;
        for (s, g) in grads().iter().enumerate() {
            let t = s as u64 + 1;
            let scale = (1.0 - b1.powi(t as i32)) / (1.0 - b1);
            AdamStep {
                lr: lr * scale,
                beta1: b1,
                beta2: b2,
                eps,
                weight_decay: wd / scale,
                t,
                maximize: false,
            }
            .apply(&p, &Tensor::new(g.as_slice(), &dev)?, &m, &v, None)?;
        }
        assert_close(&got, &p.to_vec1::<f64>()?, 1e-12);
        Ok(())
    }

    /// SimAdEMAMix(lr, (β, β2), α_s, λ) ≡ AdEMAMix(lr·α_s, (0, β2, β), α = 1/(α_s(1 − β)),
    /// λ/α_s) without warm-ups or first-moment bias correction: AdEMAMix's slow EMA is
    /// (1 − β)·m and with β1 = 0 its fast term is g.
    #[test]
    fn equivalent_to_ademamix_without_fast_ema() -> Result<()> {
        let (lr, beta, b2, alpha_s, wd) = (0.003, 0.99, 0.95, 2.5, 0.05);
        let sim = SimplifiedAdEMAMixConfig {
            lr,
            betas: (beta, b2),
            alpha: alpha_s,
            weight_decay: wd,
            ..Default::default()
        };
        let ade = AdEMAMixConfig {
            lr: lr * alpha_s,
            betas: (0.0, b2, beta),
            alpha: 1.0 / (alpha_s * (1.0 - beta)),
            weight_decay: wd / alpha_s,
            ..Default::default()
        };
        let a = run(OptimConfig::SimplifiedAdemamix(sim))?;
        let b = run(OptimConfig::Ademamix(ade))?;
        assert_close(&a, &b, 1e-12);
        Ok(())
    }

    #[test]
    fn bias_corrections_and_warm_up_by_hand() -> Result<()> {
        let cfg = SimplifiedAdEMAMixConfig {
            lr: 0.002,
            betas: (0.99, 0.9),
            alpha: 3.0,
            beta1_warmup: Some(5),
            weight_decay: 0.01,
            bias_correction1: true,
            bias_correction2: false,
            ..Default::default()
        };
        let got = run(OptimConfig::SimplifiedAdemamix(cfg.clone()))?;
        let mut p = INIT.to_vec();
        let n = p.len();
        let (mut m, mut v, mut num, mut den) = (vec![0.0; n], vec![0.0; n], 0.0, 0.0);
        let b2 = cfg.betas.1;
        for (s, g) in grads().iter().enumerate() {
            let b1 = cfg.beta1_at(s as u64 + 1);
            num = b1 * num + 1.0;
            den = b2 * den + (1.0 - b2);
            for k in 0..n {
                m[k] = b1 * m[k] + g[k];
                v[k] = b2 * v[k] + (1.0 - b2) * g[k] * g[k];
                let u = (cfg.alpha * g[k] + m[k]) / (v[k].sqrt() + cfg.eps * den.sqrt()) / num;
                p[k] -= cfg.lr * (u + cfg.weight_decay * p[k]);
            }
        }
        assert_close(&got, &p, 1e-12);
        // The warm-up starts at min_beta1 = 0.9 moved towards 0.99 and ends exactly.
        assert!(cfg.beta1_at(1) > 0.9 && cfg.beta1_at(1) < 0.99);
        assert_eq!(cfg.beta1_at(5), 0.99);
        Ok(())
    }

    #[test]
    fn validation_names_the_field() {
        let bad = SimplifiedAdEMAMixConfig {
            min_beta1: 1.5,
            ..Default::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("simplified_ademamix.min_beta1"), "{e}");
    }
}
