//! ADOPT (Taniguchi et al. 2024, arXiv 2411.02853), exactly as the authors' `ADOPT` computes it.
//!
//! Per parameter, with `k` the number of its earlier updates (0 on the first):
//!
//! ```text
//! g ← −g                                  if maximize
//! g ← g + λ·p                             if λ ≠ 0 and not decouple (coupled L2; feeds v too)
//! k = 0:   v ← g²                         the first call only initialises v: p and m stay
//! k ≥ 1:   p ← p·(1 − lr·λ)               if λ ≠ 0 and decouple
//!          n = g / max(√v, ε)             v of the EARLIER steps; ε is a floor, not added
//!          n ← clamp(n, −k^e, k^e)        if clip (e = clip_exponent, 0.25 by default)
//!          m ← lerp(m, n, 1 − β1)         no bias correction anywhere
//!          p ← p − lr·m
//!          v ← β2·v + (1 − β2)·g²         after the update
//! ```
//!
//! The clip bound at the t-th call (1-based) is `(t − 1)^e`: 1 on the second call, `2^e` on the
//! third. `clip = false` is the original, unclipped algorithm (the reference's
//! `clip_lambda = None`); the reference takes any callable of the step, here it is a power of
//! `k`, which is the form the authors ship and recommend. The authors advise `decouple = true`
//! where AdamW would be the default.
//!
//! Defaults are the reference's: lr 1e-3, β = (0.9, 0.9999), ε = 1e-6, λ = 0, coupled decay,
//! clip `k^0.25`. State: `exp_avg` (m), `exp_avg_sq` (v) and the step count. Reference:
//! iShohei220/adopt `src/adopt/adopt.py` @ 6468572b4b3688a2f056b796b071da540568520e (= PyPI
//! `torch-adopt` 0.1.0). `pytorch_optimizer` 4.1.0's `ADOPT` clips at `t^0.25` (one step later)
//! and decays on the first call too; this follows the authors'.
//!
//! On a CUDA device the passes are the `adopt_init` and `adopt` kernels (kernels/fused.cu),
//! which round like the loops below.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Result};
use crate::optim::config::{hyper_accessors, RuleConfig};
use crate::optim::fused::{vectorized, zip_mut_or_kernel, Float, Kernel};
use crate::optim::params::ParamMeta;
use crate::optim::rule::{expect_state_shape, Rule, StepCtx};
use crate::optim::state::State;
use crate::with_float;

/// ADOPT hyperparameters (reference names and defaults; the clip is `clip` + `clip_exponent`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdoptConfig {
    /// Learning rate.
    pub lr: f64,
    /// (β1, β2): decay of the normalized-gradient momentum and of the second moment.
    pub betas: (f64, f64),
    /// Floor of √v in the normalization.
    pub eps: f64,
    /// Weight decay λ: coupled L2 (added to the gradient), or decoupled with `decouple`.
    pub weight_decay: f64,
    /// Decoupled weight decay (`p ← p − lr·λ·p`) instead of L2.
    pub decouple: bool,
    /// Clip the normalized gradient to `±k^clip_exponent` (k = earlier updates).
    pub clip: bool,
    /// Exponent of the clip bound.
    pub clip_exponent: f64,
    /// Ascend instead of descend.
    pub maximize: bool,
}

impl Default for AdoptConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.9999),
            eps: 1e-6,
            weight_decay: 0.0,
            decouple: false,
            clip: true,
            clip_exponent: 0.25,
            maximize: false,
        }
    }
}

impl RuleConfig for AdoptConfig {
    const NAME: &'static str = "adopt";

    fn validate(&self) -> Result<()> {
        check::non_negative("adopt.lr", self.lr)?;
        check::unit_interval("adopt.betas[0]", self.betas.0)?;
        check::unit_interval("adopt.betas[1]", self.betas.1)?;
        check::non_negative("adopt.eps", self.eps)?;
        check::non_negative("adopt.weight_decay", self.weight_decay)?;
        check::non_negative("adopt.clip_exponent", self.clip_exponent)
    }
    hyper_accessors!();
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(Adopt(self.clone())))
    }
}

/// The ADOPT rule.
#[derive(Debug, Clone)]
pub struct Adopt(pub AdoptConfig);

/// `torch.lerp(a, b, w)`, two-sided as torch computes it.
#[inline(always)]
fn lerp<T: Float>(a: T, b: T, w: T) -> T {
    if w.abs() < T::of(0.5) {
        a + w * (b - a)
    } else {
        b - (b - a) * (T::one() - w)
    }
}

impl Adopt {
    fn update_typed<T: Float>(
        &self,
        ctx: &StepCtx<'_>,
        param: &Var,
        grad: &Tensor,
        state: &State,
        k: u64,
    ) -> Result<()> {
        let c = &self.0;
        let sign = if c.maximize { -T::one() } else { T::one() };
        let l2 = T::of(if c.decouple { 0.0 } else { ctx.weight_decay });
        let (m, v) = (state.tensor("exp_avg")?, state.tensor("exp_avg_sq")?);
        let outs = [param.as_tensor(), m, v];
        if k == 0 {
            let scalars = [sign, l2];
            let kernel = Kernel::new("adopt_init", &scalars);
            return zip_mut_or_kernel::<T>(kernel, &outs, &[grad], move |o, i| {
                let [p, _, v] = o else {
                    unreachable!("three outputs")
                };
                // One level of reference, so the loop keeps the slices in registers.
                let (p, v) = (&mut **p, &mut **v);
                vectorized! { for ((v, p), &g) in v.iter_mut().zip(p.iter()).zip(i[0]) {
                    let g = sign * g + l2 * *p;
                    *v += g * g;
                } }
                Ok(())
            });
        }
        // The reference's decoupled decay is `p + (−lr·λ)·p`, and no-op (0) when coupled.
        let neg_decay = T::of(if c.decouple {
            -ctx.lr * ctx.weight_decay
        } else {
            0.0
        });
        let clip = T::of(if c.clip {
            (k as f64).powf(c.clip_exponent)
        } else {
            f64::INFINITY
        });
        let eps = T::of(c.eps);
        let w1 = T::of(1.0 - c.betas.0);
        let (b2, c2) = (T::of(c.betas.1), T::of(1.0 - c.betas.1));
        let neg_lr = T::of(-ctx.lr);
        let scalars = [sign, l2, neg_decay, eps, clip, w1, b2, c2, neg_lr];
        let kernel = Kernel::new("adopt", &scalars);
        zip_mut_or_kernel::<T>(kernel, &outs, &[grad], move |o, i| {
            let [p, m, v] = o else {
                unreachable!("three outputs")
            };
            // One level of reference, so the loop keeps the slices in registers.
            let (p, m, v) = (&mut **p, &mut **m, &mut **v);
            vectorized! { for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(i[0]) {
                let g = sign * g + l2 * *p;
                *p = *p + neg_decay * *p;
                let n = g / num_traits::Float::max(v.sqrt(), eps);
                let n = num_traits::Float::min(num_traits::Float::max(n, -clip), clip);
                *m = lerp(*m, n, w1);
                *p += neg_lr * *m;
                *v = *v * b2 + c2 * (g * g);
            } }
            Ok(())
        })
    }
}

impl Rule for Adopt {
    fn name(&self) -> &'static str {
        AdoptConfig::NAME
    }

    fn update(
        &self,
        ctx: &StepCtx<'_>,
        _meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        let k = state.next_step() - 1;
        state.tensor_or_zeros("exp_avg", param)?;
        state.tensor_or_zeros("exp_avg_sq", param)?;
        with_float!(param.dtype(), "adopt", T =>
            self.update_typed::<T>(ctx, param, grad, state, k))
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
    use crate::optim::testing::{driver_w, step_w};
    use crate::optim::OptimConfig;

    const GRADS: [[f64; 4]; 4] = [
        [0.5, -1.0, 1e-3, 0.0],
        [2.0, 0.3, -0.5, 1.0],
        [-0.1, 0.2, 0.4, -2.0],
        [1.0, -3.0, 0.1, 0.2],
    ];

    /// The equations above, written out per coordinate.
    fn by_hand(cfg: &AdoptConfig, init: &[f64]) -> Vec<Vec<f64>> {
        let (mut p, mut m, mut v) = (init.to_vec(), vec![0.0; 4], vec![0.0; 4]);
        let mut out = Vec::new();
        for (k, g) in GRADS.iter().enumerate() {
            for j in 0..4 {
                let g = if cfg.decouple {
                    g[j]
                } else {
                    g[j] + cfg.weight_decay * p[j]
                };
                if k == 0 {
                    v[j] = g * g;
                    continue;
                }
                if cfg.decouple {
                    p[j] -= cfg.lr * cfg.weight_decay * p[j];
                }
                let bound = (k as f64).powf(0.25);
                let n = (g / v[j].sqrt().max(cfg.eps)).clamp(-bound, bound);
                m[j] += (1.0 - cfg.betas.0) * (n - m[j]);
                p[j] -= cfg.lr * m[j];
                v[j] = cfg.betas.1 * v[j] + (1.0 - cfg.betas.1) * g * g;
            }
            out.push(p.clone());
        }
        out
    }

    #[test]
    fn first_call_only_sets_v_then_clipped_steps() -> Result<()> {
        let init = [0.3, -0.7, 1.1, 2.0];
        for (wd, decouple) in [(0.0, false), (0.1, false), (0.1, true)] {
            let cfg = AdoptConfig {
                lr: 0.1,
                betas: (0.8, 0.9),
                weight_decay: wd,
                decouple,
                ..Default::default()
            };
            let want = by_hand(&cfg, &init);
            let mut opt = driver_w(OptimConfig::Adopt(cfg), &init)?;
            for (s, g) in GRADS.iter().enumerate() {
                let got = step_w(&mut opt, g)?;
                if s == 0 {
                    assert_eq!(got, init, "the first call never moves p");
                }
                for (a, b) in got.iter().zip(&want[s]) {
                    assert!(
                        (a - b).abs() < 1e-14,
                        "wd {wd} decouple {decouple} step {s}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn the_clip_binds_and_can_be_switched_off() -> Result<()> {
        // Second call: v = g₁² = 1e-6 at coordinate 2, so n = −0.5/1e-3 = −500, clipped to −1.
        let init = [0.0; 4];
        let run = |clip| -> Result<Vec<f64>> {
            let mut opt = driver_w(
                OptimConfig::Adopt(AdoptConfig {
                    lr: 1.0,
                    betas: (0.0, 0.9),
                    clip,
                    ..Default::default()
                }),
                &init,
            )?;
            step_w(&mut opt, &GRADS[0])?;
            step_w(&mut opt, &GRADS[1])
        };
        assert_eq!(run(true)?[2], 1.0);
        assert_eq!(run(false)?[2], 500.0);
        Ok(())
    }

    #[test]
    fn validation_names_the_field() {
        for (cfg, field) in [
            (
                AdoptConfig {
                    betas: (0.9, 1.0),
                    ..Default::default()
                },
                "adopt.betas[1]",
            ),
            (
                AdoptConfig {
                    clip_exponent: -1.0,
                    ..Default::default()
                },
                "adopt.clip_exponent",
            ),
        ] {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        assert!(AdoptConfig::default().validate().is_ok());
    }
}
