//! Muon (Jordan et al. 2024): momentum orthogonalized by Newton–Schulz, for hidden matrices,
//! exactly as KellerJordan/Muon `SingleDeviceMuon` / `muon_update` computes it, with the
//! auxiliary AdamW of `MuonWithAuxAdam` for every other parameter.
//!
//! Per hidden matrix (role [`Role::Matrix`]):
//!
//! ```text
//! M ← lerp(M, g, 1 − μ)                              = μ·M + (1 − μ)·g
//! U = lerp(g, M, μ) if nesterov else M               = (1 − μ)·g + μ·M
//! U viewed as (rows, rest) if 4-D (conv filters); 3-D (and ≥ 5-D) batched over leading dims
//! O = NS5(U) · √max(1, g.size(−2)/g.size(−1))         last two dims of the ORIGINAL gradient
//! p ← p·(1 − lr·λ)                                    decoupled decay, coupled to the current lr
//! p ← p − lr·O
//! ```
//!
//! NS5 is [`newton_schulz`] with [`NsForm::Muon`] and ε = 1e-7: scale to Frobenius norm ≤ 1,
//! iterate `X ← a·X + (b·A + c·A²)·X` with `A = XXᵀ` and `(a, b, c) = (3.4445, −4.7750, 2.0315)`
//! on the wide orientation. It does not converge to `UVᵀ`: singular values land roughly in
//! [0.5, 1.5] by design. The reference runs it in bfloat16 on GPU; here it runs in the parameter
//! dtype with candle matmuls (what the golden files check — a bf16 iteration is ~1e-2 off).
//!
//! Every other role (embedding, head, norm, bias, vector, scalar) takes an AdamW step through
//! [`AdamStep`] with its own hyperparameters: lr `adam_lr` × the schedule factor, β
//! `adam_betas`, ε `adam_eps`, decay `adam_weight_decay` (the reference aux Adam computes
//! `m̂/(√v̂ + ε)`; AdamStep's `m̂/(√v/√(1−β2^t) + ε)` is the same up to rounding).
//!
//! `nesterov` and `ns_steps` are `muon_update` arguments that the reference classes leave at
//! their defaults (true, 5); they are exposed here. Defaults: lr 0.02, momentum 0.95, λ = 0;
//! aux AdamW lr 3e-4, β = (0.9, 0.95), ε = 1e-10, λ = 0. State: `momentum_buffer` (matrices; no
//! step counter), `step`/`exp_avg`/`exp_avg_sq` (others). Reference: KellerJordan/Muon `muon.py`
//! @ 857d1adc159e098212f828d927460782d3da59e9.
//!
//! **dion's Muon** (`form = "dion"`): microsoft/dion's `Muon` with Polar Express, whose
//! equations are in [`normuon`](crate::optim::normuon) (it is NorMuon without the row
//! normalization): undampened momentum `M ← μ·M + g` (`momentum` is μ), Polar Express
//! (`use_polar_express`, default true) normalized by `1.02·‖U‖_F + epsilon` (default 1e-8), lr
//! factor `adjust_lr` (default `spectral_norm`, `√(fan_out/fan_in)`), `cautious_wd`, `flatten`;
//! `ns_steps` stays 5 (one iteration per coefficient triple). The auxiliary AdamW takes the
//! `adam_*` fields as in KellerJordan's form (dion's fallback: `adam_lr` = lr, `adam_betas` =
//! betas, `adam_eps` = epsilon, `adam_weight_decay` = weight_decay). dion's defaults differ
//! from this config's: `nesterov = false`, `weight_decay = 0.01`, lr 0.01, and the aux AdamW's
//! ε 1e-8 and λ 0.01 — set them. The dion-only fields are errors under `keller_jordan`.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Error, Result};

/// The most Newton–Schulz iterations a config may ask for.
pub const MAX_NS_STEPS: u64 = 100;
use crate::optim::adamw::AdamStep;
use crate::optim::config::{hyper_accessors, RuleConfig};
use crate::optim::fused::{flag, zip_mut_or_kernel, Float, Kernel};
use crate::optim::newton_schulz::{newton_schulz, NsForm, MUON_NS_EPS};
use crate::optim::normuon::{orthogonalizer, AdjustLr, Dion, Fallback, Ortho};
use crate::optim::params::{ParamMeta, Role};
use crate::optim::rule::{expect_state_shape, Rule, StepCtx};
use crate::optim::state::State;
use crate::with_float;

/// Muon hyperparameters (reference names and defaults; `adam_*` configure the auxiliary AdamW).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MuonConfig {
    /// Learning rate of the orthogonalized step.
    pub lr: f64,
    /// Decoupled weight decay λ of hidden matrices (the step multiplies p by 1 − lr·λ).
    pub weight_decay: f64,
    /// Momentum μ.
    pub momentum: f64,
    /// Orthogonalize the Nesterov look-ahead `lerp(g, M, μ)` instead of `M`.
    pub nesterov: bool,
    /// Newton–Schulz iterations.
    pub ns_steps: u64,
    /// Auxiliary AdamW learning rate (scaled by the schedule factor).
    pub adam_lr: f64,
    /// Auxiliary AdamW (β1, β2).
    pub adam_betas: (f64, f64),
    /// Auxiliary AdamW ε.
    pub adam_eps: f64,
    /// Auxiliary AdamW decoupled weight decay.
    pub adam_weight_decay: f64,
    /// Which reference's Muon: KellerJordan's (default) or microsoft/dion's (module doc).
    pub form: MuonForm,
    /// dion form: Polar Express (true, the default) or dion's quintic Newton–Schulz.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_polar_express: Option<bool>,
    /// dion form: ε of the orthogonalizer's normalization (default 1e-8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// dion form: shape-dependent lr factor (default `spectral_norm`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adjust_lr: Option<AdjustLr>,
    /// dion form: decay only where the parameter and the update agree in sign.
    pub cautious_wd: bool,
    /// dion form: orthogonalize tensors of three or more dims as `(shape[0], rest)`.
    pub flatten: bool,
}

/// Which reference's Muon [`MuonConfig`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MuonForm {
    /// KellerJordan/Muon.
    KellerJordan,
    /// microsoft/dion `Muon`.
    Dion,
}

impl Default for MuonConfig {
    fn default() -> Self {
        Self {
            lr: 0.02,
            weight_decay: 0.0,
            momentum: 0.95,
            nesterov: true,
            ns_steps: 5,
            adam_lr: 3e-4,
            adam_betas: (0.9, 0.95),
            adam_eps: 1e-10,
            adam_weight_decay: 0.0,
            form: MuonForm::KellerJordan,
            use_polar_express: None,
            epsilon: None,
            adjust_lr: None,
            cautious_wd: false,
            flatten: false,
        }
    }
}

impl MuonConfig {
    /// The field set only for `form = "dion"`, if any is set under KellerJordan's form.
    fn dion_field_set(&self) -> Option<&'static str> {
        [
            ("muon.use_polar_express", self.use_polar_express.is_some()),
            ("muon.epsilon", self.epsilon.is_some()),
            ("muon.adjust_lr", self.adjust_lr.is_some()),
            ("muon.cautious_wd", self.cautious_wd),
            ("muon.flatten", self.flatten),
        ]
        .into_iter()
        .find_map(|(field, set)| set.then_some(field))
    }
}

impl RuleConfig for MuonConfig {
    const NAME: &'static str = "muon";

    fn validate(&self) -> Result<()> {
        check::non_negative("muon.lr", self.lr)?;
        check::non_negative("muon.weight_decay", self.weight_decay)?;
        check::unit_interval("muon.momentum", self.momentum)?;
        check::at_least_one("muon.ns_steps", self.ns_steps)?;
        if self.ns_steps > MAX_NS_STEPS {
            return Err(Error::config(
                "muon.ns_steps",
                format!(
                    "{} iterations: at most {MAX_NS_STEPS} (the iteration converges in about 5; \
                     each costs three matrix products per parameter and step)",
                    self.ns_steps
                ),
            ));
        }
        check::non_negative("muon.adam_lr", self.adam_lr)?;
        check::unit_interval("muon.adam_betas[0]", self.adam_betas.0)?;
        check::unit_interval("muon.adam_betas[1]", self.adam_betas.1)?;
        check::positive("muon.adam_eps", self.adam_eps)?;
        check::non_negative("muon.adam_weight_decay", self.adam_weight_decay)?;
        match self.form {
            MuonForm::KellerJordan => match self.dion_field_set() {
                Some(field) => Err(Error::config(field, "applies only with form = \"dion\"")),
                None => Ok(()),
            },
            MuonForm::Dion => {
                if self.ns_steps != 5 {
                    return Err(Error::config(
                        "muon.ns_steps",
                        "must be 5 with form = \"dion\" (one iteration per coefficient triple)",
                    ));
                }
                check::positive("muon.epsilon", self.epsilon.unwrap_or(1e-8))
            }
        }
    }
    hyper_accessors!();
    fn build(&self) -> Result<Box<dyn Rule>> {
        if self.form == MuonForm::Dion {
            return Ok(Box::new(Dion {
                name: Self::NAME,
                ortho: Ortho {
                    mu: self.momentum,
                    nesterov: self.nesterov,
                    epsilon: self.epsilon.unwrap_or(1e-8),
                    which: orthogonalizer(self.use_polar_express.unwrap_or(true)),
                    adjust_lr: self.adjust_lr.unwrap_or(AdjustLr::SpectralNorm),
                    cautious_wd: self.cautious_wd,
                    flatten: self.flatten,
                    muon_beta2: None,
                },
                fallback: Fallback {
                    lr: Some(self.adam_lr),
                    betas: self.adam_betas,
                    eps: self.adam_eps,
                    weight_decay: Some(self.adam_weight_decay),
                },
            }));
        }
        Ok(Box::new(Muon(self.clone())))
    }
}

/// The Muon rule (with its auxiliary AdamW).
#[derive(Debug, Clone)]
pub struct Muon(pub MuonConfig);

/// torch's `lerp`, for the same rounding as the reference's `lerp_` calls.
#[inline(always)]
fn lerp<T: Float>(a: T, b: T, w: T) -> T {
    if w.abs() < T::of(0.5) {
        a + w * (b - a)
    } else {
        b - (b - a) * (T::one() - w)
    }
}

impl Muon {
    /// The tensor Newton–Schulz sees: 4-D viewed as (rows, rest), everything else as is.
    fn ns_view(u: &Tensor) -> Result<Tensor> {
        let d = u.dims();
        Ok(if d.len() == 4 {
            u.reshape((d[0], d[1] * d[2] * d[3]))?
        } else {
            u.clone()
        })
    }

    fn matrix_typed<T: Float>(
        &self,
        ctx: &StepCtx<'_>,
        meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        state: &State,
    ) -> Result<()> {
        let mu = self.0.momentum;
        let m = state.tensor("momentum_buffer")?;
        let u = grad.zeros_like()?;
        let (w_in, w_out) = (T::of(1.0 - mu), T::of(mu));
        let nesterov = self.0.nesterov;
        let scalars = [w_in, w_out, flag(nesterov)];
        let kernel = Kernel::new("muon_momentum", &scalars);
        zip_mut_or_kernel::<T>(kernel, &[m, &u], &[grad], |o, i| {
            let [m, u] = o else { unreachable!() };
            for (k, &g) in i[0].iter().enumerate() {
                m[k] = lerp(m[k], g, w_in);
                u[k] = if nesterov { lerp(g, m[k], w_out) } else { m[k] };
            }
            Ok(())
        })?;
        let o = newton_schulz(
            &Self::ns_view(&u)?,
            self.0.ns_steps as usize,
            MUON_NS_EPS,
            NsForm::Muon,
        )?;
        let nd = meta.shape.len();
        let (rows, cols) = (meta.shape[nd - 2] as f64, meta.shape[nd - 1] as f64);
        let scale = T::of((rows / cols).max(1.0).sqrt());
        let decay = T::of(1.0 - ctx.lr * ctx.weight_decay);
        let neg_lr = T::of(-ctx.lr);
        let scalars = [decay, neg_lr, scale];
        let kernel = Kernel::new("muon_apply", &scalars);
        zip_mut_or_kernel::<T>(kernel, &[param.as_tensor()], &[&o], |out, i| {
            for (p, &o) in out[0].iter_mut().zip(i[0]) {
                *p = *p * decay + neg_lr * (o * scale);
            }
            Ok(())
        })
    }
}

impl Rule for Muon {
    fn name(&self) -> &'static str {
        MuonConfig::NAME
    }

    fn check_param(&self, meta: &ParamMeta) -> Result<()> {
        if meta.role == Role::Matrix && meta.shape.len() < 2 {
            return Err(Error::Msg(format!(
                "muon: `{}` has role matrix but shape {:?}; Muon orthogonalizes tensors with \
                 two or more dims (give it another role to route it to the auxiliary AdamW)",
                meta.name, meta.shape
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
            let t = state.next_step();
            state.tensor_or_zeros("exp_avg", param)?;
            state.tensor_or_zeros("exp_avg_sq", param)?;
            return AdamStep {
                lr: self.0.adam_lr * ctx.lr_factor,
                beta1: self.0.adam_betas.0,
                beta2: self.0.adam_betas.1,
                eps: self.0.adam_eps,
                weight_decay: self.0.adam_weight_decay,
                t,
                maximize: false,
            }
            .apply(
                param,
                grad,
                state.tensor("exp_avg")?,
                state.tensor("exp_avg_sq")?,
                None,
            );
        }
        self.check_param(meta)?;
        state.tensor_or_zeros("momentum_buffer", param)?;
        with_float!(param.dtype(), "muon", T =>
            self.matrix_typed::<T>(ctx, meta, param, grad, state))
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        for f in ["momentum_buffer", "exp_avg", "exp_avg_sq"] {
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
    use crate::optim::adamw::AdamWConfig;
    use crate::optim::testing::{self, flat, lcg_from_state, max_diff, param as get, Shapes};
    use crate::optim::{Driver, NamedParams, OptimConfig, Optimizer};

    fn tensor(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product();
        testing::tensor(lcg_from_state(seed, n), shape, DType::F64)
    }

    fn driver(cfg: OptimConfig, params: Shapes<'_>) -> Result<Driver> {
        Ok(testing::driver(cfg, params, DType::F64, |i, n| {
            lcg_from_state(1 + i, n)
        }))
    }

    fn grads(params: Shapes<'_>, seed: u64) -> BTreeMap<String, Tensor> {
        testing::named(params, DType::F64, |i, n| lcg_from_state(seed * 10 + i, n))
    }

    #[test]
    fn zero_momentum_is_the_orthogonalized_gradient_step() -> Result<()> {
        // μ = 0: M = g and U = g exactly, so p ← p − lr·NS5(g)·√max(1, rows/cols).
        let params: &[(&str, &[usize])] = &[
            ("tall", &[7, 3]),
            ("wide", &[3, 5]),
            ("conv", &[4, 2, 3, 3]),
        ];
        let cfg = MuonConfig {
            momentum: 0.0,
            lr: 0.05,
            ..Default::default()
        };
        let mut opt = driver(OptimConfig::Muon(cfg.clone()), params)?;
        let g = grads(params, 4);
        opt.step_named(&g)?;
        for (i, (name, shape)) in params.iter().enumerate() {
            let view = if shape.len() == 4 {
                g[*name].reshape((shape[0], shape[1] * shape[2] * shape[3]))?
            } else {
                g[*name].clone()
            };
            let o = flat(&newton_schulz(&view, 5, MUON_NS_EPS, NsForm::Muon)?);
            let n = shape.len();
            let scale = (shape[n - 2] as f64 / shape[n - 1] as f64).max(1.0).sqrt();
            let p0 = flat(&tensor(shape, 1 + i as u64));
            let want: Vec<f64> = p0
                .iter()
                .zip(&o)
                .map(|(p, o)| p - cfg.lr * (o * scale))
                .collect();
            assert!(max_diff(&get(&opt, name), &want) < 1e-15, "{name}");
        }
        Ok(())
    }

    #[test]
    fn nesterov_off_orthogonalizes_the_momentum() -> Result<()> {
        let params: &[(&str, &[usize])] = &[("w", &[4, 6])];
        let (mu, lr, wd) = (0.9, 0.02, 0.1);
        let run = |nesterov| -> Result<Vec<f64>> {
            let mut opt = driver(
                OptimConfig::Muon(MuonConfig {
                    momentum: mu,
                    lr,
                    weight_decay: wd,
                    nesterov,
                    ..Default::default()
                }),
                params,
            )?;
            for s in 0..2 {
                opt.step_named(&grads(params, s))?;
            }
            Ok(get(&opt, "w"))
        };
        // By hand: M₁ = (1 − μ)·g₁, M₂ = μ·M₁ + (1 − μ)·g₂, p ← p(1 − lr·λ) − lr·NS5(M).
        let (g1, g2) = (flat(&grads(params, 0)["w"]), flat(&grads(params, 1)["w"]));
        let m1: Vec<f64> = g1.iter().map(|g| 0.0 + (1.0 - mu) * (g - 0.0)).collect();
        let m2: Vec<f64> = m1
            .iter()
            .zip(&g2)
            .map(|(m, g)| m + (1.0 - mu) * (g - m))
            .collect();
        let mut p = flat(&tensor(&[4, 6], 1));
        for m in [&m1, &m2] {
            let o = flat(&newton_schulz(
                &Tensor::from_vec(m.clone(), (4, 6), &Device::Cpu)?,
                5,
                MUON_NS_EPS,
                NsForm::Muon,
            )?);
            p = p
                .iter()
                .zip(&o)
                .map(|(p, o)| p * (1.0 - lr * wd) - lr * o)
                .collect();
        }
        let plain = run(false)?;
        assert!(max_diff(&plain, &p) < 1e-15);
        assert!(
            max_diff(&run(true)?, &p) > 1e-6,
            "nesterov changes the step"
        );
        Ok(())
    }

    #[test]
    fn non_matrix_roles_take_the_auxiliary_adamw() -> Result<()> {
        let params: &[(&str, &[usize])] = &[
            ("h.0.mlp.weight", &[6, 4]),
            ("h.0.mlp.bias", &[6]),
            ("ln_f.weight", &[4]),
            ("lm_head.weight", &[5, 4]),
            ("wte.weight", &[5, 4]),
            ("gate", &[3]),
        ];
        let cfg = MuonConfig {
            adam_lr: 1e-3,
            adam_betas: (0.8, 0.9),
            adam_eps: 1e-9,
            adam_weight_decay: 0.05,
            ..Default::default()
        };
        let mut muon = driver(OptimConfig::Muon(cfg.clone()), params)?;
        let mut adamw = driver(
            OptimConfig::Adamw(AdamWConfig {
                lr: cfg.adam_lr,
                betas: cfg.adam_betas,
                eps: cfg.adam_eps,
                weight_decay: cfg.adam_weight_decay,
                ..Default::default()
            }),
            params,
        )?;
        for opt in [&mut muon, &mut adamw] {
            opt.set_lr_factor(0.5);
            for s in 0..3 {
                opt.step_named(&grads(params, s))?;
            }
        }
        for (name, _) in params {
            let (a, b) = (get(&muon, name), get(&adamw, name));
            let state = muon.param_state(name).unwrap();
            if *name == "h.0.mlp.weight" {
                assert!(max_diff(&a, &b) > 1e-4, "the hidden matrix is Muon's");
                assert!(state.tensors.contains_key("momentum_buffer"));
            } else {
                assert_eq!(a, b, "{name} follows AdamW exactly");
                assert!(!state.tensors.contains_key("momentum_buffer"));
            }
        }
        Ok(())
    }

    #[test]
    fn three_d_runs_batched_per_slice() -> Result<()> {
        let params: &[(&str, &[usize])] = &[("w", &[2, 5, 3])];
        let mut opt = driver(
            OptimConfig::Muon(MuonConfig {
                momentum: 0.0,
                ..Default::default()
            }),
            params,
        )?;
        let g = grads(params, 7);
        opt.step_named(&g)?;
        let p0 = tensor(&[2, 5, 3], 1);
        let got = get(&opt, "w");
        for b in 0..2 {
            let o = flat(&newton_schulz(
                &g["w"].get(b)?,
                5,
                MUON_NS_EPS,
                NsForm::Muon,
            )?);
            let want: Vec<f64> = flat(&p0.get(b)?)
                .iter()
                .zip(&o)
                .map(|(p, o)| p - 0.02 * (o * (5.0f64 / 3.0).sqrt()))
                .collect();
            assert!(max_diff(&got[b * 15..(b + 1) * 15], &want) < 1e-15);
        }
        Ok(())
    }

    #[test]
    fn f32_and_bad_roles() -> Result<()> {
        let var = Var::from_tensor(&tensor(&[4, 3], 1).to_dtype(DType::F32)?)?;
        let mut opt = Driver::new(
            OptimConfig::Muon(MuonConfig::default()),
            NamedParams::new([("w".to_string(), var.clone())])?,
        )?;
        let mut g = BTreeMap::new();
        g.insert("w".to_string(), tensor(&[4, 3], 2).to_dtype(DType::F32)?);
        opt.step_named(&g)?;
        assert!(var
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|x| x.is_finite()));

        let mut params =
            NamedParams::new([("v".to_string(), Var::from_tensor(&tensor(&[4], 1))?)])?;
        params.set_role("v", Role::Matrix)?;
        let err = Driver::new(OptimConfig::Muon(MuonConfig::default()), params)
            .err()
            .expect("1-D matrix is refused")
            .to_string();
        assert!(err.contains("role matrix"), "{err}");
        Ok(())
    }

    #[test]
    fn validation_names_the_field() {
        let bad = MuonConfig {
            momentum: 1.0,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("muon.momentum"));
        let bad = MuonConfig {
            ns_steps: 0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("ns_steps"));
        let bad = MuonConfig {
            adam_eps: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("adam_eps"));
        assert!(MuonConfig::default().validate().is_ok());
    }
}
