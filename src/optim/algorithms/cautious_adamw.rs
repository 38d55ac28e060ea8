//! Cautious AdamW (Liang, Chen, Liu & Liu 2024, arXiv 2411.16085), exactly as the authors'
//! C-Optim `AdamW` computes it on its default path (`foreach = True`).
//!
//! Per parameter, with t the optimizer's step (1 on the first call; the reference counts steps
//! per group, not per parameter):
//!
//! ```text
//! m ← lerp(m, g, 1 − β1)
//! v ← lerp(v, g², 1 − β2)
//! d = √v / √(1 − β2^t) + ε                  torch-style ε placement
//! mask = 1 where m·g > 0, else 0            the UPDATED m and the raw g; 0·x is masked out
//! s = max(mean(mask), 1e-3)                 over the whole tensor
//! p ← p · (1 − lr·λ)                        decoupled, always, and never masked
//! p ← p − ((m·mask / d) · lr/(1 − β1^t)) / s
//! ```
//!
//! Only the Adam step is cautious. When every coordinate disagrees the step is exactly zero (the
//! floor 1e-3 only avoids 0/0) and only the decay acts; when every coordinate agrees, s = 1 and
//! this is AdamW. A flipped comparison changes s and hence the whole tensor's step, so m is
//! formed in the working precision before the comparison, as the reference does.
//!
//! A separate optimizer, not an `adamw` flag: the authors ship it as its own always-cautious
//! class with HF-style arguments whose defaults are not `torch.optim.AdamW`'s (ε 1e-6, λ 0,
//! `correct_bias`, no AMSGrad). `correct_bias` is accepted and ignored, as on the reference's
//! default path (bias correction is always on). The reference's `foreach = False` path places ε
//! HF-style (`√(1 − β2^t)·m / (√v + ε)`) and counts steps per parameter; it is not this one.
//!
//! Defaults are the reference's: lr 1e-3, β = (0.9, 0.999), ε = 1e-6, λ = 0. State: `exp_avg`,
//! `exp_avg_sq`. Reference: kyleliang919/C-Optim `c_adamw.py` @
//! 2c0517c4db2e50b56d389ba4803eab1f4b3b8ae3 (class `AdamW`, `c_adamw_update_foreach_async`);
//! timm's `AdamWLegacy(caution=True)` computes the same.
//!
//! The mask's mean needs the whole tensor before the update, so the pass reads the operands
//! twice. On a CUDA device that is two kernels (kernels/fused.cu): `cautious_moments` writes the
//! moments and a 0/1 mask, the mask is counted (an exact sum of integers in f64), and
//! `cautious_update` takes the step with the count's fraction.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Result};
use crate::optim::config::{hyper_accessors, RuleConfig};
use crate::optim::fused::{kernels_run, vectorized, zip_mut, zip_mut_or_kernel, Float, Kernel};
use crate::optim::params::ParamMeta;
use crate::optim::rule::{expect_state_shape, Rule, StepCtx};
use crate::optim::state::State;
use crate::with_float;

/// Floor of the kept fraction the step is divided by.
const MIN_KEPT_FRACTION: f64 = 1e-3;

/// Cautious AdamW hyperparameters (reference names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CautiousAdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// (β1, β2): decay rates of the first and second moments.
    pub betas: (f64, f64),
    /// Added to the bias-corrected root second moment.
    pub eps: f64,
    /// Decoupled weight decay λ (the step multiplies p by 1 − lr·λ).
    pub weight_decay: f64,
    /// Accepted for parity with the reference, whose default path ignores it: both moments are
    /// always bias-corrected.
    pub correct_bias: bool,
}

impl Default for CautiousAdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-6,
            weight_decay: 0.0,
            correct_bias: true,
        }
    }
}

impl RuleConfig for CautiousAdamWConfig {
    const NAME: &'static str = "cautious_adamw";

    fn validate(&self) -> Result<()> {
        check::non_negative("cautious_adamw.lr", self.lr)?;
        check::unit_interval("cautious_adamw.betas[0]", self.betas.0)?;
        check::unit_interval("cautious_adamw.betas[1]", self.betas.1)?;
        check::non_negative("cautious_adamw.eps", self.eps)?;
        check::non_negative("cautious_adamw.weight_decay", self.weight_decay)
    }
    hyper_accessors!();
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(CautiousAdamW(self.clone())))
    }
}

/// The Cautious AdamW rule.
#[derive(Debug, Clone)]
pub struct CautiousAdamW(pub CautiousAdamWConfig);

/// `torch.lerp(a, b, w)`, two-sided as torch computes it.
#[inline(always)]
fn lerp<T: Float>(a: T, b: T, w: T) -> T {
    if w.abs() < T::of(0.5) {
        a + w * (b - a)
    } else {
        b - (b - a) * (T::one() - w)
    }
}

impl CautiousAdamW {
    fn update_typed<T: Float>(
        &self,
        ctx: &StepCtx<'_>,
        param: &Var,
        grad: &Tensor,
        state: &State,
    ) -> Result<()> {
        let (beta1, beta2) = self.0.betas;
        let t = ctx.step as f64;
        let (w1, w2) = (T::of(1.0 - beta1), T::of(1.0 - beta2));
        let bc2_sqrt = T::of((1.0 - beta2.powf(t)).sqrt());
        let eps = T::of(self.0.eps);
        let step_size = T::of(ctx.lr / (1.0 - beta1.powf(t)));
        let decay = T::of(1.0 - ctx.lr * ctx.weight_decay);
        let floor = T::of(MIN_KEPT_FRACTION);
        let (m, v) = (state.tensor("exp_avg")?, state.tensor("exp_avg_sq")?);
        if kernels_run(param.as_tensor()) {
            return self.update_by_kernels::<T>(
                param,
                grad,
                m,
                v,
                [w1, w2, bc2_sqrt, eps, step_size, decay],
            );
        }
        zip_mut::<T>(&[param.as_tensor(), m, v], &[grad], move |o, i| {
            let [p, m, v] = o else {
                unreachable!("three outputs")
            };
            // One level of reference, so the loop keeps the slices in registers.
            let (p, m, v) = (&mut **p, &mut **m, &mut **v);
            let g = i[0];
            // Pass 1: both moments, and how many coordinates agree.
            let kept = {
                let (m, v) = (&mut *m, &mut *v);
                vectorized! {
                    let mut kept = 0usize;
                    for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
                        *m = lerp(*m, g, w1);
                        *v = lerp(*v, g * g, w2);
                        kept += usize::from(*m * g > T::zero());
                    }
                    kept
                }
            };
            if p.is_empty() {
                return Ok(());
            }
            let s = kept_fraction(kept, p.len(), floor);
            // Pass 2: decay, then the masked step.
            vectorized! { for (((p, &m), &v), &g) in p.iter_mut().zip(m.iter()).zip(v.iter()).zip(g) {
                let masked = if m * g > T::zero() { m } else { T::zero() };
                let d = v.sqrt() / bc2_sqrt + eps;
                *p = *p * decay - ((masked / d) * step_size) / s;
            } }
            Ok(())
        })
    }

    /// The same step as two kernels with the mask counted between them (CUDA, or the kernels
    /// emulated on the host). Each kernel's CPU body is the matching half of the fused loop.
    fn update_by_kernels<T: Float>(
        &self,
        param: &Var,
        grad: &Tensor,
        m: &Tensor,
        v: &Tensor,
        [w1, w2, bc2_sqrt, eps, step_size, decay]: [T; 6],
    ) -> Result<()> {
        let mask = m.zeros_like()?;
        let scalars = [w1, w2];
        let kernel = Kernel::new("cautious_moments", &scalars);
        zip_mut_or_kernel::<T>(kernel, &[m, v, &mask], &[grad], move |o, i| {
            let [m, v, mask] = o else {
                unreachable!("three outputs")
            };
            for (((m, v), mask), &g) in m
                .iter_mut()
                .zip(v.iter_mut())
                .zip(mask.iter_mut())
                .zip(i[0])
            {
                *m = lerp(*m, g, w1);
                *v = lerp(*v, g * g, w2);
                *mask = if *m * g > T::zero() {
                    T::one()
                } else {
                    T::zero()
                };
            }
            Ok(())
        })?;
        let n = param.elem_count();
        if n == 0 {
            return Ok(());
        }
        // A sum of zeros and ones below 2^53 is exact in any order.
        let kept = mask
            .to_dtype(candle_core::DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()? as usize;
        let s = kept_fraction(kept, n, T::of(MIN_KEPT_FRACTION));
        let scalars = [decay, bc2_sqrt, eps, step_size, s];
        let kernel = Kernel::new("cautious_update", &scalars);
        zip_mut_or_kernel::<T>(kernel, &[param.as_tensor(), m, v], &[grad], move |o, i| {
            let [p, m, v] = o else {
                unreachable!("three outputs")
            };
            for (((p, &mut m), &mut v), &g) in
                p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(i[0])
            {
                let masked = if m * g > T::zero() { m } else { T::zero() };
                let d = v.sqrt() / bc2_sqrt + eps;
                *p = *p * decay - ((masked / d) * step_size) / s;
            }
            Ok(())
        })
    }
}

/// `max(kept / n, floor)` in the working precision, as the reference computes the mask's mean.
fn kept_fraction<T: Float>(kept: usize, n: usize, floor: T) -> T {
    num_traits::Float::max(T::of(kept as f64) / T::of(n as f64), floor)
}

impl Rule for CautiousAdamW {
    fn name(&self) -> &'static str {
        CautiousAdamWConfig::NAME
    }

    fn update(
        &self,
        ctx: &StepCtx<'_>,
        _meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        state.tensor_or_zeros("exp_avg", param)?;
        state.tensor_or_zeros("exp_avg_sq", param)?;
        with_float!(param.dtype(), "cautious_adamw", T =>
            self.update_typed::<T>(ctx, param, grad, state))
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
    use crate::optim::adamw::AdamWConfig;
    use crate::optim::testing::{driver_w, max_diff, step_w};
    use crate::optim::{OptimConfig, Optimizer};

    fn cfg() -> CautiousAdamWConfig {
        CautiousAdamWConfig {
            lr: 0.05,
            betas: (0.8, 0.95),
            eps: 1e-6,
            weight_decay: 0.3,
            ..Default::default()
        }
    }

    #[test]
    fn a_mask_of_ones_is_adamw() -> Result<()> {
        // Every gradient keeps the sign pattern of the first, so m·g > 0 everywhere, s = 1.
        let init = [0.3, -0.7, 1.1, 0.05, 2.0];
        let signs = [1.0, -1.0, 1.0, -1.0, 1.0];
        let c = cfg();
        let mut cautious = driver_w(OptimConfig::CautiousAdamw(c.clone()), &init)?;
        let mut adamw = driver_w(
            OptimConfig::Adamw(AdamWConfig {
                lr: c.lr,
                betas: c.betas,
                eps: c.eps,
                weight_decay: c.weight_decay,
                ..Default::default()
            }),
            &init,
        )?;
        for s in 0..6 {
            let g: Vec<f64> = signs
                .iter()
                .enumerate()
                .map(|(k, sg)| sg * (0.1 + ((s * 7 + k * 3) % 5) as f64))
                .collect();
            let (a, b) = (step_w(&mut cautious, &g)?, step_w(&mut adamw, &g)?);
            assert!(max_diff(&a, &b) < 1e-14, "step {s}: {a:?} vs {b:?}");
            assert!(max_diff(&a, &init) > 1e-3, "it moves");
        }
        Ok(())
    }

    #[test]
    fn disagreeing_coordinates_are_masked_and_the_rest_rescaled() -> Result<()> {
        let init = [1.0, -2.0, 0.5, 3.0];
        let c = cfg();
        let mut opt = driver_w(OptimConfig::CautiousAdamw(c.clone()), &init)?;
        let g1 = [1.0, 2.0, -1.0, 0.5];
        let g2 = [-0.1, 3.0, -2.0, -0.1];
        step_w(&mut opt, &g1)?;
        let got = step_w(&mut opt, &g2)?;
        // By hand, t = 2.
        let (b1, b2) = c.betas;
        let mut p = init.to_vec();
        let (mut m, mut v) = (vec![0.0; 4], vec![0.0; 4]);
        for (t, g) in [(1, g1), (2, g2)] {
            let mut mask = [0.0; 4];
            for k in 0..4 {
                m[k] = b1 * m[k] + (1.0 - b1) * g[k];
                v[k] = b2 * v[k] + (1.0 - b2) * g[k] * g[k];
                mask[k] = if m[k] * g[k] > 0.0 { 1.0 } else { 0.0 };
            }
            let s = (mask.iter().sum::<f64>() / 4.0).max(1e-3);
            let bc1 = 1.0 - b1.powi(t);
            let bc2 = 1.0 - b2.powi(t);
            for k in 0..4 {
                let d = (v[k] / bc2).sqrt() + c.eps;
                p[k] = p[k] * (1.0 - c.lr * c.weight_decay) - c.lr / bc1 * m[k] * mask[k] / d / s;
            }
            if t == 2 {
                // Coordinates 0 (m > 0, g < 0) and 3 disagree: only two of four are kept.
                assert_eq!(mask, [0.0, 1.0, 1.0, 0.0]);
            }
        }
        assert!(max_diff(&got, &p) < 1e-14, "{got:?} vs {p:?}");
        Ok(())
    }

    #[test]
    fn all_disagreeing_leaves_only_the_decay() -> Result<()> {
        let init = [1.0, -2.0];
        let c = cfg();
        let mut opt = driver_w(OptimConfig::CautiousAdamw(c.clone()), &init)?;
        step_w(&mut opt, &[1.0, -1.0])?;
        let before = opt.vars()[0].1.to_vec1::<f64>()?;
        // m stays positive / negative, the gradient flips sign: m·g < 0 everywhere.
        let after = step_w(&mut opt, &[-0.01, 0.01])?;
        for (a, b) in after.iter().zip(&before) {
            assert_eq!(*a, b * (1.0 - c.lr * c.weight_decay));
        }
        Ok(())
    }

    #[test]
    fn validation_names_the_field() {
        let bad = CautiousAdamWConfig {
            betas: (1.0, 0.9),
            ..Default::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("cautious_adamw.betas[0]"), "{err}");
        assert!(CautiousAdamWConfig::default().validate().is_ok());
    }
}
