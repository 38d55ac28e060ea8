//! NorMuon (Li et al. 2025, arXiv 2510.05491) and the Muon of microsoft/dion, exactly as
//! `dion/normuon.py` and `dion/muon.py` compute them on one device. NorMuon is registered here
//! as `normuon`; dion's Muon is `muon` with `form = "dion"` (its config lives in
//! [`muon`](crate::optim::muon)); both run the rule of this file.
//!
//! Per hidden matrix (role [`Role::Matrix`], two or more dims):
//!
//! ```text
//! M ← μ·M + g                             undampened: a sum, not an average
//! U = μ·M + g  if nesterov else M
//! O = PolarExpress(U, ε)                  polar_express::orthogonalize, one iteration per triple
//! NorMuon only (normalize):
//!   f = ‖O‖_F                             per trailing matrix
//!   v ← lerp(v, mean(O², last dim), 1 − β2_muon)     one entry per row (output neuron)
//!   N = O / (√v + 1e-8)                   a literal 1e-8, not ε
//!   N ← N · f / max(‖N‖_F, 1e-8)          the update keeps O's Frobenius norm
//! else N = O
//! p ← p·(1 − lr·λ)                        base lr; cautious_wd: p ← p − lr·λ·p where p·N ≥ 0
//! p ← p − lr_adj·N
//! ```
//!
//! The lr adjustment (`adjust_lr`), with `(fan_out, fan_in)` the last two dims, or
//! `(shape[0], ∏ shape[1..])` with `flatten`: `spectral_norm` (default)
//! `lr·√(fan_out/fan_in)` — below 1 for wide matrices, unlike KellerJordan's
//! `√max(1, rows/cols)` —, `rms_norm` `lr·0.2·√max(fan_out, fan_in)`, `none` `lr`. Weight decay
//! always uses the base lr. Orthogonalization sees 3-D tensors as a batch of trailing matrices
//! and 4-D+ ones as a batch of their trailing matrices, or `(shape[0], rest)` with `flatten`;
//! NorMuon's row statistics are per trailing matrix of the parameter's own shape either way.
//! Without bias correction the first step needs none: the Frobenius rescale makes v's overall
//! scale irrelevant. A zero gradient gives O = 0, N = 0: only the decay acts.
//!
//! Every other role takes dion's AdamW fallback (`algorithm = "adamw"` groups): the group's lr
//! and weight decay, `betas`, `epsilon` as ε, its own step counter, `p ← p·(1 − lr·λ)`, Adam with
//! ε outside the root ([`AdamStep`]); with `cautious_wd`, the decay is undone where `m·p < 0`
//! (m the updated first moment, p before the step). Where the reference lets the caller route
//! parameters by groups, here the roles do: matrices are orthogonalized, the rest is AdamW.
//!
//! `normalize = false` removes NorMuon's row normalization and leaves dion's Muon exactly (not
//! a reference switch; tests use it). `use_polar_express = false` selects dion's quintic
//! Newton–Schulz (five triples, no 1.02). The reference casts the orthogonalizer's input to
//! bfloat16 and holds lr as a float32 tensor; here everything runs in the parameter dtype (what
//! the golden files check). State: `momentum`, `variance_neuron` (shape `shape[..−1] + [1]`) for
//! matrices; `exp_avg`, `exp_avg_sq` and the step count for the rest.
//!
//! Defaults are dion's `NorMuon`: lr 0.01, μ 0.95, β2_muon 0.95, betas (0.9, 0.95), λ 0.01,
//! ε 1e-8, no Nesterov, `spectral_norm`, no flatten, Polar Express. dion's `train.py` uses
//! `nesterov = true`. Reference: microsoft/dion `dion/normuon.py`, `dion/muon.py`,
//! `dion/polar_express.py` @ 0a059a4542e5aa74b40dcd1dce363836c7afcd48.
//!
//! On a CUDA device the momentum and update passes run on the host (`fused::zip_mut`,
//! docs/cuda.md); the orthogonalization and the row statistics are candle ops on the device.

use candle_core::{Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::error::{check, Error, Result};
use crate::optim::adamw::AdamStep;
use crate::optim::config::{hyper_accessors, RuleConfig};
use crate::optim::fused::{vectorized, zip_mut, Float};
use crate::optim::math::polar_express::{orthogonalize, Orthogonalizer};
use crate::optim::params::{ParamMeta, Role};
use crate::optim::rule::{expect_state_shape, Rule, StepCtx};
use crate::optim::state::State;
use crate::with_float;

/// NorMuon's literal ε in the row normalization and the rescale.
const NORMUON_EPS: f64 = 1e-8;

/// dion's shape-dependent learning-rate factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdjustLr {
    /// `lr·√(fan_out/fan_in)`.
    SpectralNorm,
    /// `lr·0.2·√max(fan_out, fan_in)` (Moonshot's RMS matching).
    RmsNorm,
    /// `lr`.
    None,
}

/// NorMuon hyperparameters (dion's names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NorMuonConfig {
    /// Base learning rate (of the matrices before `adjust_lr`, and of the AdamW fallback).
    pub lr: f64,
    /// Momentum μ (undampened).
    pub mu: f64,
    /// Decay of the per-row second moment.
    pub muon_beta2: f64,
    /// (β1, β2) of the AdamW fallback.
    pub betas: (f64, f64),
    /// Decoupled weight decay λ (with the base lr), matrices and fallback alike.
    pub weight_decay: f64,
    /// Decay only where the parameter and the update agree in sign.
    pub cautious_wd: bool,
    /// ε of the orthogonalizer's normalization and of the AdamW fallback.
    pub epsilon: f64,
    /// Orthogonalize the Nesterov look-ahead `μ·M + g` instead of `M`.
    pub nesterov: bool,
    /// Shape-dependent learning-rate factor of the matrices.
    pub adjust_lr: AdjustLr,
    /// Orthogonalize tensors of three or more dims as `(shape[0], rest)`.
    pub flatten: bool,
    /// Polar Express (true) or dion's quintic Newton–Schulz (false).
    pub use_polar_express: bool,
    /// NorMuon's row normalization (false: dion's Muon).
    pub normalize: bool,
}

impl Default for NorMuonConfig {
    fn default() -> Self {
        Self {
            lr: 0.01,
            mu: 0.95,
            muon_beta2: 0.95,
            betas: (0.9, 0.95),
            weight_decay: 0.01,
            cautious_wd: false,
            epsilon: 1e-8,
            nesterov: false,
            adjust_lr: AdjustLr::SpectralNorm,
            flatten: false,
            use_polar_express: true,
            normalize: true,
        }
    }
}

impl RuleConfig for NorMuonConfig {
    const NAME: &'static str = "normuon";

    fn validate(&self) -> Result<()> {
        check::non_negative("normuon.lr", self.lr)?;
        check::unit_interval("normuon.mu", self.mu)?;
        check::unit_interval("normuon.muon_beta2", self.muon_beta2)?;
        check::unit_interval("normuon.betas[0]", self.betas.0)?;
        check::unit_interval("normuon.betas[1]", self.betas.1)?;
        check::non_negative("normuon.weight_decay", self.weight_decay)?;
        check::positive("normuon.epsilon", self.epsilon)
    }
    hyper_accessors!();
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(Dion {
            name: Self::NAME,
            ortho: Ortho {
                mu: self.mu,
                nesterov: self.nesterov,
                epsilon: self.epsilon,
                which: orthogonalizer(self.use_polar_express),
                adjust_lr: self.adjust_lr,
                cautious_wd: self.cautious_wd,
                flatten: self.flatten,
                muon_beta2: self.normalize.then_some(self.muon_beta2),
            },
            fallback: Fallback {
                lr: None,
                betas: self.betas,
                eps: self.epsilon,
                weight_decay: None,
            },
        }))
    }
}

/// The orthogonalizer `use_polar_express` selects.
pub fn orthogonalizer(use_polar_express: bool) -> Orthogonalizer {
    if use_polar_express {
        Orthogonalizer::PolarExpress
    } else {
        Orthogonalizer::DionNewtonSchulz
    }
}

/// The matrix update of dion's Muon and NorMuon.
#[derive(Debug, Clone)]
pub struct Ortho {
    /// Momentum μ.
    pub mu: f64,
    /// Orthogonalize `μ·M + g`.
    pub nesterov: bool,
    /// ε of the orthogonalizer.
    pub epsilon: f64,
    /// The polynomial sequence.
    pub which: Orthogonalizer,
    /// Shape-dependent lr.
    pub adjust_lr: AdjustLr,
    /// Cautious weight decay.
    pub cautious_wd: bool,
    /// Orthogonalize ≥ 3-D tensors as `(shape[0], rest)`.
    pub flatten: bool,
    /// NorMuon's row-moment decay (`None`: Muon, no normalization).
    pub muon_beta2: Option<f64>,
}

/// dion's AdamW fallback for the parameters that are not matrices.
#[derive(Debug, Clone)]
pub struct Fallback {
    /// Learning rate, scaled by the schedule factor (`None`: the group's lr).
    pub lr: Option<f64>,
    /// (β1, β2).
    pub betas: (f64, f64),
    /// ε.
    pub eps: f64,
    /// Weight decay (`None`: the group's).
    pub weight_decay: Option<f64>,
}

/// The rule of dion's Muon and NorMuon.
#[derive(Debug, Clone)]
pub struct Dion {
    /// Registered name (`muon` or `normuon`).
    pub name: &'static str,
    /// The matrix update.
    pub ortho: Ortho,
    /// The AdamW fallback.
    pub fallback: Fallback,
}

/// `torch.lerp` on tensors (two-sided, as torch computes it).
fn lerp_tensor(a: &Tensor, b: &Tensor, w: f64) -> Result<Tensor> {
    let diff = (b - a)?;
    Ok(if w.abs() < 0.5 {
        (a + (diff * w)?)?
    } else {
        (b - (diff * (1.0 - w))?)?
    })
}

/// Frobenius norm over the last two dims, kept as `[..., 1, 1]`.
fn frobenius(x: &Tensor) -> Result<Tensor> {
    Ok(x.sqr()?
        .sum_keepdim(D::Minus1)?
        .sum_keepdim(D::Minus2)?
        .sqrt()?)
}

impl Ortho {
    /// `(fan_out, fan_in)` of a parameter.
    fn fans(&self, shape: &[usize]) -> (f64, f64) {
        let nd = shape.len();
        if self.flatten {
            (shape[0] as f64, shape[1..].iter().product::<usize>() as f64)
        } else {
            (shape[nd - 2] as f64, shape[nd - 1] as f64)
        }
    }

    /// The learning rate of the orthogonalized step.
    pub fn adjusted_lr(&self, lr: f64, shape: &[usize]) -> f64 {
        let (fan_out, fan_in) = self.fans(shape);
        match self.adjust_lr {
            AdjustLr::SpectralNorm => lr * (fan_out / fan_in).sqrt(),
            AdjustLr::RmsNorm => lr * 0.2 * fan_out.max(fan_in).sqrt(),
            AdjustLr::None => lr,
        }
    }

    fn step_typed<T: Float>(
        &self,
        ctx: &StepCtx<'_>,
        meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        let shape = &meta.shape;
        let (mu, nesterov) = (T::of(self.mu), self.nesterov);
        let u = grad.zeros_like()?;
        zip_mut::<T>(&[state.tensor("momentum")?, &u], &[grad], move |o, i| {
            let [m, u] = o else {
                unreachable!("two outputs")
            };
            // One level of reference, so the loop keeps the slices in registers.
            let (m, u) = (&mut **m, &mut **u);
            vectorized! { for ((m, u), &g) in m.iter_mut().zip(u.iter_mut()).zip(i[0]) {
                *m = *m * mu + g;
                *u = if nesterov { *m * mu + g } else { *m };
            } }
            Ok(())
        })?;
        let view = if self.flatten && shape.len() >= 3 {
            u.reshape((shape[0], shape[1..].iter().product::<usize>()))?
        } else {
            u
        };
        let o = orthogonalize(&view, self.epsilon, self.which)?.reshape(shape.as_slice())?;
        let n = match self.muon_beta2 {
            None => o,
            Some(beta2) => {
                let f = frobenius(&o)?;
                let rows = o.sqr()?.mean_keepdim(D::Minus1)?;
                let v = lerp_tensor(state.tensor("variance_neuron")?, &rows, 1.0 - beta2)?;
                let n = o.broadcast_div(&(v.sqrt()? + NORMUON_EPS)?)?;
                let scale = f.broadcast_div(&frobenius(&n)?.maximum(NORMUON_EPS)?)?;
                state
                    .tensors
                    .insert("variance_neuron".into(), v.contiguous()?);
                n.broadcast_mul(&scale)?.contiguous()?
            }
        };
        let lr_wd = T::of(ctx.lr * ctx.weight_decay);
        let decay = T::of(1.0 - ctx.lr * ctx.weight_decay);
        let neg_lr = T::of(-self.adjusted_lr(ctx.lr, shape));
        let cautious = self.cautious_wd;
        zip_mut::<T>(&[param.as_tensor()], &[&n], move |o, i| {
            for (p, &u) in o[0].iter_mut().zip(i[0]) {
                let decayed = if !cautious {
                    *p * decay
                } else if *p * u >= T::zero() {
                    *p - lr_wd * *p
                } else {
                    *p
                };
                *p = decayed + neg_lr * u;
            }
            Ok(())
        })
    }
}

impl Fallback {
    fn step(
        &self,
        ctx: &StepCtx<'_>,
        cautious_wd: bool,
        param: &Var,
        grad: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        let t = state.next_step();
        state.tensor_or_zeros("exp_avg", param)?;
        state.tensor_or_zeros("exp_avg_sq", param)?;
        let lr = self.lr.map_or(ctx.lr, |lr| lr * ctx.lr_factor);
        let wd = self.weight_decay.unwrap_or(ctx.weight_decay);
        let before = if cautious_wd && wd > 0.0 {
            Some(param.as_tensor().copy()?)
        } else {
            None
        };
        AdamStep {
            lr,
            beta1: self.betas.0,
            beta2: self.betas.1,
            eps: self.eps,
            weight_decay: wd,
            t,
            maximize: false,
        }
        .apply(
            param,
            grad,
            state.tensor("exp_avg")?,
            state.tensor("exp_avg_sq")?,
            None,
        )?;
        let Some(before) = before else { return Ok(()) };
        // Cautious decay: give back lr·λ·p_old where the new first moment disagrees with p_old.
        let m = state.tensor("exp_avg")?;
        with_float!(param.dtype(), "normuon", T => {
            let lr_wd = T::of(lr * wd);
            zip_mut::<T>(&[param.as_tensor()], &[&before, m], move |o, i| {
                for ((p, &old), &m) in o[0].iter_mut().zip(i[0]).zip(i[1]) {
                    if m * old < T::of(0.0) {
                        *p += lr_wd * old;
                    }
                }
                Ok(())
            })
        })
    }
}

/// Shape of NorMuon's `variance_neuron`: the parameter's with its last dim 1.
fn variance_shape(shape: &[usize]) -> Vec<usize> {
    let mut s = shape.to_vec();
    if let Some(last) = s.last_mut() {
        *last = 1;
    }
    s
}

impl Rule for Dion {
    fn name(&self) -> &'static str {
        self.name
    }

    fn check_param(&self, meta: &ParamMeta) -> Result<()> {
        if meta.role == Role::Matrix && meta.shape.len() < 2 {
            return Err(Error::Msg(format!(
                "{}: `{}` has role matrix but shape {:?}; only tensors with two or more dims are \
                 orthogonalized (give it another role to route it to the AdamW fallback)",
                self.name, meta.name, meta.shape
            )));
        }
        Ok(())
    }

    fn update(
        &self,
        ctx: &StepCtx<'_>,
        meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        if meta.role != Role::Matrix {
            return self
                .fallback
                .step(ctx, self.ortho.cautious_wd, param, grad, state);
        }
        self.check_param(meta)?;
        state.tensor_or_zeros("momentum", param)?;
        if self.ortho.muon_beta2.is_some() {
            let shape = variance_shape(&meta.shape);
            state.tensor_or_zeros_shaped(
                "variance_neuron",
                &shape,
                param.dtype(),
                param.device(),
            )?;
        }
        with_float!(param.dtype(), self.name, T =>
            self.ortho.step_typed::<T>(ctx, meta, param, grad, state))
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        for f in ["momentum", "exp_avg", "exp_avg_sq"] {
            expect_state_shape(meta, state, f, &meta.shape)?;
        }
        expect_state_shape(meta, state, "variance_neuron", &variance_shape(&meta.shape))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::{DType, Device};

    use super::*;
    use crate::optim::testing::{self, flat, lcg_from_state, max_diff, param as get, Shapes};
    use crate::optim::{Driver, OptimConfig};

    const PARAMS: &[(&str, &[usize])] = &[("wide", &[4, 6]), ("tall", &[6, 4])];

    fn driver(cfg: NorMuonConfig, params: Shapes<'_>) -> Driver {
        testing::driver(OptimConfig::Normuon(cfg), params, DType::F64, |i, n| {
            lcg_from_state(1 + i, n)
        })
    }

    fn grads(params: Shapes<'_>, seed: u64) -> BTreeMap<String, Tensor> {
        testing::named(params, DType::F64, |i, n| lcg_from_state(seed * 10 + i, n))
    }

    /// One NorMuon matrix step written out with plain vectors around the orthogonalizer.
    fn by_hand(p: &[f64], g: &[f64], shape: (usize, usize), cfg: &NorMuonConfig) -> Vec<f64> {
        let (r, c) = shape;
        let u = Tensor::from_vec(g.to_vec(), (r, c), &Device::Cpu).unwrap();
        let o = flat(&orthogonalize(&u, cfg.epsilon, Orthogonalizer::PolarExpress).unwrap());
        let f = o.iter().map(|x| x * x).sum::<f64>().sqrt();
        let mut n = o.clone();
        for row in 0..r {
            let ms = o[row * c..(row + 1) * c].iter().map(|x| x * x).sum::<f64>() / c as f64;
            let v = (1.0 - cfg.muon_beta2) * ms;
            for x in &mut n[row * c..(row + 1) * c] {
                *x /= v.sqrt() + 1e-8;
            }
        }
        let nn = n.iter().map(|x| x * x).sum::<f64>().sqrt();
        let adj = cfg.lr * (r as f64 / c as f64).sqrt();
        p.iter()
            .zip(&n)
            .map(|(p, n)| p * (1.0 - cfg.lr * cfg.weight_decay) - adj * (n * f / nn))
            .collect()
    }

    #[test]
    fn first_step_normalizes_rows_and_keeps_the_norm() -> Result<()> {
        let cfg = NorMuonConfig {
            lr: 0.05,
            ..Default::default()
        };
        let mut opt = driver(cfg.clone(), PARAMS);
        let g = grads(PARAMS, 3);
        opt.step_named(&g)?;
        for (i, (name, shape)) in PARAMS.iter().enumerate() {
            let p0 = lcg_from_state(1 + i as u64, shape[0] * shape[1]);
            let want = by_hand(&p0, &flat(&g[*name]), (shape[0], shape[1]), &cfg);
            assert!(max_diff(&get(&opt, name), &want) < 1e-14, "{name}");
            let v = opt.param_state(name).unwrap().tensor("variance_neuron")?;
            assert_eq!(v.dims(), &[shape[0], 1]);
        }
        Ok(())
    }

    #[test]
    fn normalization_off_is_the_orthogonalized_momentum() -> Result<()> {
        // μ = 0.5 without Nesterov: M₂ = μ·g₁ + g₂ and p moves by lr_adj·PE(M) after decay.
        let cfg = NorMuonConfig {
            mu: 0.5,
            normalize: false,
            adjust_lr: AdjustLr::RmsNorm,
            ..Default::default()
        };
        let params: Shapes<'_> = &[("w", &[3, 5])];
        let mut opt = driver(cfg.clone(), params);
        let (g1, g2) = (grads(params, 1), grads(params, 2));
        opt.step_named(&g1)?;
        opt.step_named(&g2)?;
        let m1 = flat(&g1["w"]);
        let m2: Vec<f64> = m1
            .iter()
            .zip(flat(&g2["w"]))
            .map(|(m, g)| m * 0.5 + g)
            .collect();
        let mut p = lcg_from_state(1, 15);
        let adj = cfg.lr * 0.2 * 5f64.sqrt();
        for m in [m1, m2] {
            let u = Tensor::from_vec(m, (3, 5), &Device::Cpu)?;
            let o = flat(&orthogonalize(&u, 1e-8, Orthogonalizer::PolarExpress)?);
            p = p
                .iter()
                .zip(&o)
                .map(|(p, o)| p * (1.0 - cfg.lr * cfg.weight_decay) - adj * o)
                .collect();
        }
        assert!(max_diff(&get(&opt, "w"), &p) < 1e-15);
        assert!(!opt
            .param_state("w")
            .unwrap()
            .tensors
            .contains_key("variance_neuron"));
        Ok(())
    }

    #[test]
    fn zero_grad_only_decays_every_entry_under_cautious_wd() -> Result<()> {
        let params: Shapes<'_> = &[("w", &[4, 4])];
        let cfg = NorMuonConfig {
            weight_decay: 0.5,
            cautious_wd: true,
            ..Default::default()
        };
        let mut opt = driver(cfg.clone(), params);
        let zero = testing::named(params, DType::F64, |_, n| vec![0.0; n]);
        opt.step_named(&zero)?;
        // N = 0: every entry agrees (0 counts as agreement) and decays.
        let p0 = lcg_from_state(1, 16);
        let want: Vec<f64> = p0.iter().map(|p| p - cfg.lr * 0.5 * p).collect();
        assert_eq!(get(&opt, "w"), want);
        Ok(())
    }

    #[test]
    fn fallback_is_adamw_with_the_group_hyperparameters() -> Result<()> {
        let params: Shapes<'_> = &[("b", &[5]), ("w", &[3, 3])];
        let cfg = NorMuonConfig::default();
        let mut opt = driver(cfg.clone(), params);
        let mut adamw = testing::driver(
            OptimConfig::Adamw(crate::optim::adamw::AdamWConfig {
                lr: cfg.lr,
                betas: cfg.betas,
                eps: cfg.epsilon,
                weight_decay: cfg.weight_decay,
                ..Default::default()
            }),
            params,
            DType::F64,
            |i, n| lcg_from_state(1 + i, n),
        );
        for s in 0..3 {
            opt.step_named(&grads(params, s))?;
            adamw.step_named(&grads(params, s))?;
        }
        assert_eq!(get(&opt, "b"), get(&adamw, "b"));
        assert!(max_diff(&get(&opt, "w"), &get(&adamw, "w")) > 1e-4);
        Ok(())
    }

    #[test]
    fn validation_and_bad_roles() {
        let bad = NorMuonConfig {
            muon_beta2: 1.0,
            ..Default::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("normuon.muon_beta2"), "{err}");
        let bad = NorMuonConfig {
            epsilon: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("epsilon"));
        let mut params = crate::optim::NamedParams::new([(
            "v".to_string(),
            Var::from_tensor(&Tensor::zeros(4, DType::F64, &Device::Cpu).unwrap()).unwrap(),
        )])
        .unwrap();
        params.set_role("v", Role::Matrix).unwrap();
        let err = Driver::new(OptimConfig::Normuon(NorMuonConfig::default()), params)
            .err()
            .expect("a 1-D matrix is refused")
            .to_string();
        assert!(err.contains("role matrix"), "{err}");
    }
}
