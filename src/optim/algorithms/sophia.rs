//! SophiaG (Liu et al. 2023): clipped, diagonally preconditioned momentum with the
//! Gauss–Newton–Bartlett Hessian estimator, exactly as the Liuhong99/Sophia reference computes
//! it.
//!
//! Every step, per parameter:
//!
//! ```text
//! g ← −g if maximize
//! p ← p · (1 − lr·λ)                            decoupled decay, coupled to the current lr
//! m ← β1·m + (1 − β1)·g                         no bias correction
//! r = min(|m| / (ρ·bs·h + 1e-15), 1)
//! p ← p − lr · sign(m) · r                      = −lr · clip(m / (ρ·bs·h + 1e-15), −1, 1)
//! ```
//!
//! and, when the training loop supplies a Hessian input through [`Rule::observe`]:
//!
//! ```text
//! h ← β2·h + (1 − β2)·ĝ⊙ĝ      ExtraInput::HessianGrad: ĝ = gradient at labels sampled from
//!                              the model (the reference's `update_hessian()`)
//! h ← β2·h + (1 − β2)·e        ExtraInput::HessianDiag: e = an already-formed diagonal estimate
//! ```
//!
//! State: `exp_avg` (m), `hessian` (h), both zeros at start, and the scalar `step` (kept as the
//! reference keeps it; unused by the math). Until the first Hessian input h = 0, so r = 1
//! wherever m ≠ 0 and the steps are `−lr·sign(m)`; sign(0) = 0. The 1e-15 is a literal.
//!
//! `bs` is the reference's `step(bs=…)` keyword: the tokens per (global) batch, 5120 by default
//! (the reference's GPT-2 script passes 480·1024). With ĝ the gradient of the mean loss over bs
//! tokens, bs·ĝ⊙ĝ is the GNB estimate, so ρ scales that Hessian. The training loop owns the rest:
//! every k-th iteration (`iter % k == k − 1`, k = 10 in the paper) after the step, sample labels,
//! backprop, clip to norm 1 and observe the gradient; the new h is first used by the next step.
//! The code's lr is ρ·η of the paper's notation; the README suggests tuning ρ so that 10–50% of
//! the coordinates are not clipped.
//!
//! Defaults are the reference's: lr 1e-4, β = (0.965, 0.99), ρ = 0.04, λ = 0.1, bs = 5120.
//! Reference: Liuhong99/Sophia `sophia.py` (`SophiaG`, `_single_tensor_sophiag`,
//! `update_hessian`) and `train_sophiag.py` @ a7e157229b71d58cf995d32854f1be15c265b350.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Result};
use crate::optim::config::{hyper_accessors, RuleConfig};
use crate::optim::fused::{
    exactly, exactly_mut, flag, vectorized, zip_mut_or_kernel, Float, Kernel,
};
use crate::optim::lion::sign;
use crate::optim::params::ParamMeta;
use crate::optim::rule::{expect_state_shape, ExtraInput, Rule, StepCtx};
use crate::optim::state::State;
use crate::with_float;

/// SophiaG hyperparameters (reference names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SophiaConfig {
    /// Learning rate (the largest step any coordinate takes).
    pub lr: f64,
    /// (β1, β2): decay of the gradient momentum and of the Hessian EMA.
    pub betas: (f64, f64),
    /// ρ: scale of the Hessian in the clipping denominator.
    pub rho: f64,
    /// Decoupled weight decay λ (the step multiplies p by 1 − lr·λ).
    pub weight_decay: f64,
    /// Ascend instead of descend.
    pub maximize: bool,
    /// Tokens per (global) batch: the reference's `step(bs=…)` keyword.
    pub bs: u64,
}

impl Default for SophiaConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            betas: (0.965, 0.99),
            rho: 0.04,
            weight_decay: 1e-1,
            maximize: false,
            bs: 5120,
        }
    }
}

impl RuleConfig for SophiaConfig {
    const NAME: &'static str = "sophia";

    fn validate(&self) -> Result<()> {
        check::non_negative("sophia.lr", self.lr)?;
        check::unit_interval("sophia.betas[0]", self.betas.0)?;
        check::unit_interval("sophia.betas[1]", self.betas.1)?;
        check::non_negative("sophia.rho", self.rho)?;
        check::non_negative("sophia.weight_decay", self.weight_decay)?;
        check::at_least_one("sophia.bs", self.bs)
    }
    hyper_accessors!();
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(Sophia(self.clone())))
    }
}

/// The SophiaG rule.
#[derive(Debug, Clone)]
pub struct Sophia(pub SophiaConfig);

/// The reference's guard against a zero Hessian in the clipping denominator.
const DENOM_FLOOR: f64 = 1e-15;

impl Sophia {
    fn step_typed<T: Float>(
        &self,
        lr: f64,
        weight_decay: f64,
        param: &Var,
        grad: &Tensor,
        m: &Tensor,
        h: &Tensor,
    ) -> Result<()> {
        let c = &self.0;
        let decay = T::of(1.0 - lr * weight_decay);
        let neg_lr = T::of(-lr);
        let (b1, c1) = (T::of(c.betas.0), T::of(1.0 - c.betas.0));
        // ρ·bs is one scalar in the reference (a Python float times an int) before it meets h.
        let scale = T::of(c.rho * c.bs as f64);
        let floor = T::of(DENOM_FLOOR);
        let sgn = if c.maximize { -T::one() } else { T::one() };
        let scalars = [decay, neg_lr, b1, c1, scale, floor, sgn];
        let kernel = Kernel::new("sophia", &scalars);
        zip_mut_or_kernel::<T>(kernel, &[param.as_tensor(), m], &[grad, h], move |o, i| {
            let [p, m] = o else {
                unreachable!("two outputs")
            };
            // One level of reference, so the loop keeps the slices in registers.
            let (p, m) = (&mut **p, &mut **m);
            let n = p.len();
            let (g, h) = (exactly(i[0], n, "grad")?, exactly(i[1], n, "hessian")?);
            let m = exactly_mut(m, n, "exp_avg")?;
            vectorized! {
                for k in 0..n {
                    p[k] *= decay;
                    m[k] = m[k] * b1 + (sgn * g[k]) * c1;
                    let ratio =
                        num_traits::Float::min(m[k].abs() / (scale * h[k] + floor), T::one());
                    p[k] += neg_lr * sign(m[k]) * ratio;
                }
            }
            Ok(())
        })
    }

    fn fold_hessian<T: Float>(&self, h: &Tensor, value: &Tensor, square: bool) -> Result<()> {
        let (b2, c2) = (T::of(self.0.betas.1), T::of(1.0 - self.0.betas.1));
        let scalars = [b2, c2, flag(square)];
        let kernel = Kernel::new("sophia_hessian", &scalars);
        zip_mut_or_kernel::<T>(kernel, &[h], &[value], move |o, i| {
            let h = &mut *o[0];
            let e = exactly(i[0], h.len(), "hessian estimate")?;
            vectorized! {
                if square {
                    for (h, &e) in h.iter_mut().zip(e) {
                        *h = *h * b2 + c2 * e * e;
                    }
                } else {
                    for (h, &e) in h.iter_mut().zip(e) {
                        *h = *h * b2 + c2 * e;
                    }
                }
            }
            Ok(())
        })
    }
}

impl Rule for Sophia {
    fn name(&self) -> &'static str {
        SophiaConfig::NAME
    }

    fn update(
        &self,
        ctx: &StepCtx<'_>,
        _meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        state.next_step();
        state.tensor_or_zeros("exp_avg", param)?;
        state.tensor_or_zeros("hessian", param)?;
        let (m, h) = (state.tensor("exp_avg")?, state.tensor("hessian")?);
        with_float!(param.dtype(), "sophia", T => {
            self.step_typed::<T>(ctx.lr, ctx.weight_decay, param, grad, m, h)
        })
    }

    fn observe(
        &self,
        input: ExtraInput,
        _meta: &ParamMeta,
        param: &Var,
        value: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        let square = match input {
            ExtraInput::HessianGrad => true,
            ExtraInput::HessianDiag => false,
            other => {
                return Err(crate::error::Error::Msg(format!(
                    "sophia does not take the extra input {other:?} (it takes HessianGrad or \
                     HessianDiag)"
                )))
            }
        };
        // Like the reference's `update_hessian`, a Hessian before any step creates the state.
        state.tensor_or_zeros("exp_avg", param)?;
        let h = state.tensor_or_zeros("hessian", param)?;
        with_float!(param.dtype(), "sophia", T => self.fold_hessian::<T>(h, value, square))
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        for f in ["exp_avg", "hessian"] {
            expect_state_shape(meta, state, f, &meta.shape)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::{DType, Device};

    use super::*;
    use crate::optim::testing::{driver_w, step_w as step};
    use crate::optim::{Driver, NamedParams, OptimConfig};

    fn driver(cfg: SophiaConfig, init: &[f64]) -> Result<Driver> {
        driver_w(OptimConfig::Sophia(cfg), init)
    }

    fn named(v: &[f64]) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        out.insert("w".to_string(), Tensor::new(v, &Device::Cpu)?);
        Ok(out)
    }

    const GRADS: [[f64; 4]; 4] = [
        [0.2, -0.1, 0.0, 1e-3],
        [-0.3, 0.4, 0.0, -2e-3],
        [0.5, 0.6, 0.0, 1e-3],
        [-0.1, 0.3, 0.0, 4e-3],
    ];

    #[test]
    fn before_any_hessian_steps_are_signed_momentum() -> Result<()> {
        let cfg = SophiaConfig {
            lr: 0.01,
            weight_decay: 0.2,
            ..Default::default()
        };
        let b1 = cfg.betas.0;
        let init = [0.3, -0.7, 1.1, 0.05];
        let mut opt = driver(cfg.clone(), &init)?;
        let (mut p, mut m) = (init.to_vec(), vec![0.0; 4]);
        for g in &GRADS {
            let got = step(&mut opt, g)?;
            for k in 0..4 {
                m[k] = b1 * m[k] + (1.0 - b1) * g[k];
                p[k] = p[k] * (1.0 - cfg.lr * cfg.weight_decay) - cfg.lr * sign(m[k]);
            }
            for k in 0..4 {
                assert!((got[k] - p[k]).abs() <= 1e-15, "{got:?} vs {p:?}");
            }
        }
        // The coordinate whose gradient is always 0 only decays (sign(0) = 0).
        let decay = (1.0f64 - cfg.lr * cfg.weight_decay).powi(GRADS.len() as i32);
        assert!((p[2] - 1.1 * decay).abs() <= 1e-15);
        Ok(())
    }

    #[test]
    fn hessian_inputs_clip_the_step() -> Result<()> {
        let cfg = SophiaConfig {
            lr: 0.1,
            betas: (0.5, 0.75),
            rho: 0.5,
            weight_decay: 0.0,
            maximize: false,
            bs: 4,
        };
        let mut a = driver(cfg.clone(), &[0.0; 4])?;
        let mut b = driver(cfg.clone(), &[0.0; 4])?;
        // Before any step: h = 0.25·ĝ² = 0.25·(4, 0.01, 1, 0); the squared form equals the
        // already-squared diagonal.
        let hg = [2.0, 0.1, -1.0, 0.0];
        let diag: Vec<f64> = hg.iter().map(|x| x * x).collect();
        a.observe_named(ExtraInput::HessianGrad, &named(&hg)?)?;
        b.observe_named(ExtraInput::HessianDiag, &named(&diag)?)?;
        let g = [1.0, 1.0, -0.02, 0.3];
        let pa = step(&mut a, &g)?;
        assert_eq!(pa, step(&mut b, &g)?);
        // m = 0.5·g; denominators ρ·bs·h + 1e-15 = 2·h.
        let m: Vec<f64> = g.iter().map(|x| 0.5 * x).collect();
        let h = [1.0, 0.0025, 0.25, 0.0];
        for k in 0..4 {
            let r = (m[k].abs() / (2.0 * h[k] + 1e-15)).min(1.0);
            let want = -0.1 * sign(m[k]) * r;
            assert!((pa[k] - want).abs() <= 1e-16, "{k}: {} vs {want}", pa[k]);
        }
        // Coordinate 0 is inside the clipping bound (|m| = 0.5 < 2·h = 2), coordinate 1 is clipped.
        assert!((pa[0] + 0.025).abs() < 1e-16 && pa[1] == -0.1);
        let st = a.param_state("w").unwrap();
        assert_eq!(st.scalar("step"), 1.0);
        Ok(())
    }

    #[test]
    fn maximize_ascends_and_other_inputs_are_rejected() -> Result<()> {
        let cfg = SophiaConfig {
            lr: 0.1,
            maximize: true,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = driver(cfg, &[0.0, 0.0])?;
        assert_eq!(step(&mut opt, &[2.0, -3.0])?, vec![0.1, -0.1]);
        let err = opt
            .observe_named(ExtraInput::PreviousGrad, &named(&[1.0, 1.0])?)
            .unwrap_err()
            .to_string();
        assert!(err.contains("PreviousGrad"), "{err}");
        Ok(())
    }

    #[test]
    fn validation_and_f32() -> Result<()> {
        let bad = SophiaConfig {
            bs: 0,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("sophia.bs"));
        let bad = SophiaConfig {
            rho: -1.0,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("sophia.rho"));

        let var = Var::ones((2, 3), DType::F32, &Device::Cpu)?;
        let mut opt = Driver::new(
            OptimConfig::Sophia(SophiaConfig::default()),
            NamedParams::new(vec![("w".to_string(), var.clone())])?,
        )?;
        let mut grads = BTreeMap::new();
        grads.insert(
            "w".to_string(),
            Tensor::ones((2, 3), DType::F32, &Device::Cpu)?,
        );
        opt.step_named(&grads)?;
        let want = (1.0 - 1e-4 * 0.1) as f32 + (-1e-4f64) as f32;
        let p = var.flatten_all()?.to_vec1::<f32>()?;
        assert!(p.iter().all(|&x| x == want), "{p:?} vs {want}");
        Ok(())
    }
}
