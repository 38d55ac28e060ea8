//! Adafactor as HuggingFace `transformers.optimization.Adafactor` computes it (the fairseq
//! lineage), with its relative step, parameter scaling and optional first moment.
//!
//! Per parameter, step t (1 on its first update), `RMS(x) = ‖x‖₂ / √numel(x)`:
//!
//! ```text
//! ρ    = min(warmup_init ? 1e-6·t : 1e-2, 1/√t) · lr_factor   if relative_step, else lr
//! lr_t = ρ · (scale_parameter ? max(ε2, RMS(p)) : 1)          RMS of p before this step
//! β2_t = 1 − t^decay_rate
//! s    = g² + ε1                                               ε1 ADDED before the means
//! ndim ≥ 2, factored over the last two dims (leading dims are batch dims):
//!   r ← β2_t·r + (1 − β2_t)·mean_j s                          exp_avg_sq_row [..., m]
//!   c ← β2_t·c + (1 − β2_t)·mean_i s                          exp_avg_sq_col [..., n]
//!   U_ij = (1/√(r_i / mean_i r) · 1/√c_j) · g_ij
//! ndim ≤ 1:
//!   v ← β2_t·v + (1 − β2_t)·s;  U = g / √v                    exp_avg_sq
//! U ← (U / max(RMS(U)/clip_threshold, 1)) · lr_t
//! if beta1: m ← β1·m + (1 − β1)·U;  U = m                      exp_avg: momentum of the SCALED update
//! p ← p − λ·lr_t·p                                             weight decay coupled to lr_t
//! p ← p − U
//! ```
//!
//! Differences from [`adafactor`](crate::optim::adafactor) (torch): ε1 is added to g² instead of
//! clamping; the relative step is capped at 1e-2, not lr; weight decay scales with lr_t (so with
//! the parameter scale); there is an optional first moment; scaling and relative steps can be
//! switched off.
//!
//! Learning rate and the driver. With `relative_step = true` (the default) there is no
//! configured lr: the rule computes its own ρ and multiplies it by the driver's schedule factor
//! [`StepCtx::lr_factor`], which is 1 unless an outer schedule changes it — so the reference is
//! reproduced exactly, and `Optimizer::set_lr_factor` (what LR schedules call) still scales
//! the step. The configured lr is then `None`, [`RuleConfig::lr`] reports 0, and because the
//! driver sets the factor relative to that base, `Optimizer::set_lr` has no effect (use
//! `set_lr_factor`). With `relative_step = false` the group's current lr ([`StepCtx::lr`]) is
//! ρ, which is how an external schedule drives this optimizer in HF too (`relative_step =
//! false, scale_parameter = false, lr = …`). Weight decay is the group's current one.
//!
//! Defaults are HF's: lr None, ε = (1e-30, 1e-3), clip_threshold 1, decay_rate −0.8, beta1
//! None, λ 0, scale_parameter true, relative_step true, warmup_init false. HF rejects an lr
//! together with relative_step, and warmup_init without relative_step; this also rejects
//! relative_step = false without an lr (HF would fail at the first step). The step count is
//! the state scalar `step`, and the 0-D f64 tensor `RMS` holds RMS(p) of the last step, as in HF
//! (informational; a tensor on the parameter's device, so that the GPU path never waits for it).
//! Reference: transformers 5.24.0 `transformers/optimization.py` (`Adafactor`).

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Error, Result};
use crate::optim::adafactor::{
    check_fields, col_factor_shape, row_factor_shape, run_pass, Factoring, Pass,
};
use crate::optim::config::{hyper_accessors, RuleConfig};
use crate::optim::fused::Float;
use crate::optim::params::ParamMeta;
use crate::optim::rule::{Rule, StepCtx};
use crate::optim::state::State;
use crate::with_float;

/// HF Adafactor hyperparameters (HF names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdafactorHfConfig {
    /// External learning rate; must be unset (omitted in TOML) with `relative_step`, and set
    /// without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// (ε1, ε2): ε1 is added to g² (regularizes the second moment); ε2 bounds RMS(p) from below
    /// in the parameter scale.
    pub eps: (f64, f64),
    /// Update clipping threshold: U is scaled down when RMS(U) exceeds it.
    pub clip_threshold: f64,
    /// Exponent of the second-moment decay: β2_t = 1 − t^decay_rate (≤ 0).
    pub decay_rate: f64,
    /// First-moment decay; `None` (omitted in TOML) disables the first moment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f64>,
    /// Weight decay λ, applied as p ← p − λ·lr_t·p.
    pub weight_decay: f64,
    /// Scale the step by max(ε2, RMS(p)).
    pub scale_parameter: bool,
    /// Use the time-dependent relative step instead of `lr`.
    pub relative_step: bool,
    /// With `relative_step`: warm the relative step up as 1e-6·t (capped by 1/√t).
    pub warmup_init: bool,
}

impl Default for AdafactorHfConfig {
    fn default() -> Self {
        Self {
            lr: None,
            eps: (1e-30, 1e-3),
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            weight_decay: 0.0,
            scale_parameter: true,
            relative_step: true,
            warmup_init: false,
        }
    }
}

impl RuleConfig for AdafactorHfConfig {
    const NAME: &'static str = "adafactor_hf";

    fn validate(&self) -> Result<()> {
        match (self.lr, self.relative_step) {
            (Some(_), true) => {
                return Err(Error::config(
                    "adafactor_hf.lr",
                    "must be unset when relative_step = true (the rule computes its own \
                     relative step; scale it with the lr factor)",
                ))
            }
            (None, false) => {
                return Err(Error::config(
                    "adafactor_hf.lr",
                    "is required when relative_step = false",
                ))
            }
            (Some(lr), false) => check::non_negative("adafactor_hf.lr", lr)?,
            (None, true) => {}
        }
        if self.warmup_init && !self.relative_step {
            return Err(Error::config(
                "adafactor_hf.warmup_init",
                "requires relative_step = true",
            ));
        }
        // HF does not check these; ε1 = 0 would let r/mean(r) be 0/0 for zero gradients.
        check::positive("adafactor_hf.eps[0]", self.eps.0)?;
        check::non_negative("adafactor_hf.eps[1]", self.eps.1)?;
        check::positive("adafactor_hf.clip_threshold", self.clip_threshold)?;
        if !(self.decay_rate.is_finite() && self.decay_rate <= 0.0) {
            return Err(Error::config(
                "adafactor_hf.decay_rate",
                format!("must be finite and <= 0, got {}", self.decay_rate),
            ));
        }
        if let Some(b1) = self.beta1 {
            check::unit_interval("adafactor_hf.beta1", b1)?;
        }
        check::non_negative("adafactor_hf.weight_decay", self.weight_decay)
    }
    // lr: the configured lr, or 0 when it is unset (relative step): the driver's base lr.
    // Setting it makes it explicit (an error at validation if `relative_step` is on).
    hyper_accessors!(optional lr);
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(AdafactorHf(self.clone())))
    }
}

/// The HF Adafactor rule.
#[derive(Debug, Clone)]
pub struct AdafactorHf(pub AdafactorHfConfig);

impl AdafactorHf {
    /// ρ: the relative step (scaled by the schedule factor) or the group's current lr.
    fn rel_step(&self, ctx: &StepCtx<'_>, t: u64) -> f64 {
        let cfg = &self.0;
        if cfg.relative_step {
            let tf = t as f64;
            let cap = if cfg.warmup_init { 1e-6 * tf } else { 1e-2 };
            cap.min(1.0 / tf.sqrt()) * ctx.lr_factor
        } else {
            ctx.lr
        }
    }

    /// Runs the step; RMS(p) before it goes to the 0-D f64 tensor `rms` (HF's state `RMS`).
    fn step_typed<T: Float>(
        &self,
        ctx: &StepCtx<'_>,
        t: u64,
        param: &Var,
        grad: &Tensor,
        state: &State,
    ) -> Result<()> {
        let cfg = &self.0;
        let beta2t = 1.0 - (t as f64).powf(cfg.decay_rate);
        let pass = Pass::Hf {
            b2: T::of(beta2t),
            c2: T::of(1.0 - beta2t),
            eps1: T::of(cfg.eps.0),
            momentum: cfg.beta1.map(|b| (T::of(b), T::of(1.0 - b))),
            eps2: cfg.eps.1,
            rho: self.rel_step(ctx, t),
            clip: cfg.clip_threshold,
            wd: ctx.weight_decay,
            scale_parameter: cfg.scale_parameter,
        };
        let m = if cfg.beta1.is_some() {
            Some(state.tensor("exp_avg")?)
        } else {
            None
        };
        let (p, rms) = (param.as_tensor(), Some(state.tensor("RMS")?));
        match Factoring::of(param.dims()) {
            f @ Factoring::Full => {
                let v = state.tensor("exp_avg_sq")?;
                run_pass(&pass, f, p, v, None, m, grad, rms)
            }
            f @ Factoring::Factored { .. } => {
                let r = state.tensor("exp_avg_sq_row")?;
                let c = state.tensor("exp_avg_sq_col")?;
                run_pass(&pass, f, p, r, Some(c), m, grad, rms)
            }
        }
    }
}

impl Rule for AdafactorHf {
    fn name(&self) -> &'static str {
        AdafactorHfConfig::NAME
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
        let shape = param.dims().to_vec();
        let (dtype, device) = (param.dtype(), param.device());
        match Factoring::of(&shape) {
            Factoring::Full => {
                state.tensor_or_zeros("exp_avg_sq", param)?;
            }
            Factoring::Factored { .. } => {
                let row = row_factor_shape(&shape, false);
                let col = col_factor_shape(&shape, false);
                state.tensor_or_zeros_shaped("exp_avg_sq_row", &row, dtype, device)?;
                state.tensor_or_zeros_shaped("exp_avg_sq_col", &col, dtype, device)?;
            }
        }
        if self.0.beta1.is_some() {
            state.tensor_or_zeros("exp_avg", param)?;
        }
        // RMS(p) stays where it is computed (as in HF, a 0-D tensor on the parameter's
        // device): reading it back to the host would wait for the device every step. A scalar
        // `RMS` from an older checkpoint is replaced.
        state.scalars.remove("RMS");
        state.tensor_or_zeros_shaped("RMS", &[], candle_core::DType::F64, device)?;
        with_float!(dtype, "adafactor_hf", T => self.step_typed::<T>(ctx, t, param, grad, state))
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        let shape = &meta.shape;
        let mut fields = vec![("exp_avg", shape.clone()), ("RMS", vec![])];
        let foreign: &[&str] = match Factoring::of(shape) {
            Factoring::Full => {
                fields.push(("exp_avg_sq", shape.clone()));
                &["exp_avg_sq_row", "exp_avg_sq_col"]
            }
            Factoring::Factored { .. } => {
                fields.push(("exp_avg_sq_row", row_factor_shape(shape, false)));
                fields.push(("exp_avg_sq_col", col_factor_shape(shape, false)));
                if state.tensors.contains_key("exp_avg_sq_row")
                    != state.tensors.contains_key("exp_avg_sq_col")
                {
                    return Err(Error::State(format!(
                        "`{}` has only one of exp_avg_sq_row / exp_avg_sq_col",
                        meta.name
                    )));
                }
                &["exp_avg_sq"]
            }
        };
        check_fields(meta, state, &fields, foreign)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::testing::{self, param};
    use crate::optim::{Driver, OptimConfig, Optimizer, Role};
    use candle_core::{DType, Device};
    use std::collections::BTreeMap;

    fn values(n: usize, seed: u64) -> Vec<f64> {
        let state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(12345);
        testing::xorshift_from_state(state, n)
    }

    fn driver(cfg: AdafactorHfConfig, shapes: &[(&str, &[usize])], dtype: DType) -> Driver {
        let cfg = OptimConfig::AdafactorHf(cfg);
        testing::driver(cfg, shapes, dtype, |k, n| values(n, k + 1))
    }

    fn step(opt: &mut Driver, shapes: &[(&str, &[usize])], seed: u64, dtype: DType) {
        let grads = testing::named(shapes, dtype, |k, n| values(n, 100 + seed * 10 + k));
        opt.step_named(&grads).unwrap();
    }

    /// The module doc's equations restated plainly in f64 over `[batch, m, n]` (or flat when
    /// `mn` is None); p after each step.
    fn naive(
        cfg: &AdafactorHfConfig,
        mut p: Vec<f64>,
        grads: &[Vec<f64>],
        mn: Option<(usize, usize)>,
    ) -> Vec<Vec<f64>> {
        let len = p.len();
        let (m, n) = mn.unwrap_or((1, len));
        let batch = len / (m * n);
        let (mut r, mut c, mut v) = (vec![0.0; batch * m], vec![0.0; batch * n], vec![0.0; len]);
        let mut mom = vec![0.0; len];
        let rms = |x: &[f64]| (x.iter().map(|a| a * a).sum::<f64>() / x.len() as f64).sqrt();
        let mut out = Vec::new();
        for (k, g) in grads.iter().enumerate() {
            let t = (k + 1) as f64;
            let rho = if cfg.relative_step {
                (if cfg.warmup_init { 1e-6 * t } else { 1e-2 }).min(1.0 / t.sqrt())
            } else {
                cfg.lr.unwrap()
            };
            let lr_t = rho
                * if cfg.scale_parameter {
                    cfg.eps.1.max(rms(&p))
                } else {
                    1.0
                };
            let b2 = 1.0 - t.powf(cfg.decay_rate);
            let s: Vec<f64> = g.iter().map(|x| x * x + cfg.eps.0).collect();
            let mut u = vec![0.0; len];
            if mn.is_some() {
                for b in 0..batch {
                    for i in 0..m {
                        let mean = (0..n).map(|j| s[(b * m + i) * n + j]).sum::<f64>() / n as f64;
                        r[b * m + i] = b2 * r[b * m + i] + (1.0 - b2) * mean;
                    }
                    for j in 0..n {
                        let mean = (0..m).map(|i| s[(b * m + i) * n + j]).sum::<f64>() / m as f64;
                        c[b * n + j] = b2 * c[b * n + j] + (1.0 - b2) * mean;
                    }
                    let rm = (0..m).map(|i| r[b * m + i]).sum::<f64>() / m as f64;
                    for i in 0..m {
                        for j in 0..n {
                            let e = (b * m + i) * n + j;
                            u[e] = g[e] / (r[b * m + i] / rm * c[b * n + j]).sqrt();
                        }
                    }
                }
            } else {
                for e in 0..len {
                    v[e] = b2 * v[e] + (1.0 - b2) * s[e];
                    u[e] = g[e] / v[e].sqrt();
                }
            }
            let den = (rms(&u) / cfg.clip_threshold).max(1.0);
            for e in 0..len {
                let mut ue = u[e] / den * lr_t;
                if let Some(b1) = cfg.beta1 {
                    mom[e] = b1 * mom[e] + (1.0 - b1) * ue;
                    ue = mom[e];
                }
                p[e] = p[e] - cfg.weight_decay * lr_t * p[e] - ue;
            }
            out.push(p.clone());
        }
        out
    }

    fn check_against_naive(cfg: AdafactorHfConfig, shape: &[usize]) {
        let shapes: &[(&str, &[usize])] = &[("x", shape)];
        let mut opt = driver(cfg.clone(), shapes, DType::F64);
        let n: usize = shape.iter().product();
        let grads: Vec<Vec<f64>> = (0..4).map(|s| values(n, 100 + s * 10)).collect();
        let mn = (shape.len() >= 2).then(|| (shape[shape.len() - 2], shape[shape.len() - 1]));
        let expected = naive(&cfg, values(n, 1), &grads, mn);
        for (s, exp) in expected.iter().enumerate() {
            step(&mut opt, shapes, s as u64, DType::F64);
            let got = param(&opt, "x");
            for (a, e) in got.iter().zip(exp) {
                assert!(
                    (a - e).abs() <= 1e-13 * (1.0 + e.abs()),
                    "{shape:?} step {s}: {a} vs {e}"
                );
            }
        }
    }

    #[test]
    fn matches_the_equations_for_every_rank_and_mode() {
        let d = AdafactorHfConfig::default;
        let with_momentum = AdafactorHfConfig {
            beta1: Some(0.9),
            weight_decay: 0.01,
            ..d()
        };
        for shape in [&[][..], &[7], &[6, 10], &[3, 4, 5], &[2, 1, 3, 2]] {
            check_against_naive(d(), shape);
            check_against_naive(with_momentum.clone(), shape);
        }
        let external = AdafactorHfConfig {
            lr: Some(0.3),
            relative_step: false,
            scale_parameter: false,
            clip_threshold: 0.5,
            ..d()
        };
        check_against_naive(external, &[4, 3]);
        let warm = AdafactorHfConfig {
            warmup_init: true,
            ..d()
        };
        check_against_naive(warm, &[5]);
    }

    #[test]
    fn state_layout_matches_the_path() {
        let shapes: &[(&str, &[usize])] =
            &[("m", &[3, 4]), ("b3", &[2, 3, 4]), ("v", &[5]), ("s", &[])];
        let cfg = AdafactorHfConfig {
            beta1: Some(0.9),
            ..Default::default()
        };
        let mut opt = driver(cfg, shapes, DType::F32);
        step(&mut opt, shapes, 0, DType::F32);
        let sd = opt.state_dict().unwrap();
        let dims = |p: &str, f: &str| sd.entries[p].tensors.get(f).map(|t| t.dims().to_vec());
        assert_eq!(dims("m", "exp_avg_sq_row"), Some(vec![3]));
        assert_eq!(dims("m", "exp_avg_sq_col"), Some(vec![4]));
        assert_eq!(dims("m", "exp_avg_sq"), None);
        assert_eq!(dims("m", "exp_avg"), Some(vec![3, 4]));
        assert_eq!(dims("b3", "exp_avg_sq_row"), Some(vec![2, 3]));
        assert_eq!(dims("b3", "exp_avg_sq_col"), Some(vec![2, 4]));
        assert_eq!(dims("v", "exp_avg_sq"), Some(vec![5]));
        assert_eq!(dims("v", "exp_avg_sq_row"), None);
        assert_eq!(dims("s", "exp_avg_sq"), Some(vec![]));
        assert_eq!(sd.entries["s"].scalars["step"], 1.0);
        let rms = sd.entries["m"].tensors["RMS"].to_scalar::<f64>().unwrap();
        assert!(rms > 0.0 && !sd.entries["m"].scalars.contains_key("RMS"));
    }

    #[test]
    fn relative_step_follows_the_lr_factor() {
        // Without momentum or decay, the move is linear in lr_t, so halving the schedule factor
        // halves the first step.
        let shapes: &[(&str, &[usize])] = &[("w", &[3, 4]), ("b", &[4])];
        let mut full = driver(AdafactorHfConfig::default(), shapes, DType::F64);
        let mut half = driver(AdafactorHfConfig::default(), shapes, DType::F64);
        half.set_lr_factor(0.5);
        let p0 = param(&full, "w");
        step(&mut full, shapes, 0, DType::F64);
        step(&mut half, shapes, 0, DType::F64);
        let (pf, ph) = (param(&full, "w"), param(&half, "w"));
        for k in 0..p0.len() {
            let (df, dh) = (pf[k] - p0[k], ph[k] - p0[k]);
            assert!((dh - 0.5 * df).abs() < 1e-15, "{df} {dh}");
        }
        assert_eq!(full.lr(), 0.0);
    }

    #[test]
    fn zero_gradient_and_empty_params_stay_finite() {
        let shapes: &[(&str, &[usize])] = &[("w", &[2, 3]), ("e", &[3, 0]), ("s", &[])];
        let mut opt = driver(AdafactorHfConfig::default(), shapes, DType::F32);
        let p0 = param(&opt, "w");
        let grads = BTreeMap::from([
            (
                "w".to_string(),
                Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "e".to_string(),
                Tensor::zeros((3, 0), DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "s".to_string(),
                Tensor::zeros((), DType::F32, &Device::Cpu).unwrap(),
            ),
        ]);
        opt.step_named(&grads).unwrap();
        assert_eq!(param(&opt, "w"), p0);
        assert!(param(&opt, "s")[0].is_finite());
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |cfg: AdafactorHfConfig, field: &str| {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        };
        let d = AdafactorHfConfig::default;
        bad(
            AdafactorHfConfig {
                lr: Some(1e-3),
                ..d()
            },
            "adafactor_hf.lr",
        );
        bad(
            AdafactorHfConfig {
                relative_step: false,
                ..d()
            },
            "adafactor_hf.lr",
        );
        bad(
            AdafactorHfConfig {
                lr: Some(-1.0),
                relative_step: false,
                ..d()
            },
            "adafactor_hf.lr",
        );
        bad(
            AdafactorHfConfig {
                lr: Some(1e-3),
                relative_step: false,
                warmup_init: true,
                ..d()
            },
            "adafactor_hf.warmup_init",
        );
        bad(
            AdafactorHfConfig {
                eps: (0.0, 1e-3),
                ..d()
            },
            "adafactor_hf.eps[0]",
        );
        bad(
            AdafactorHfConfig {
                eps: (1e-30, -1.0),
                ..d()
            },
            "adafactor_hf.eps[1]",
        );
        bad(
            AdafactorHfConfig {
                clip_threshold: 0.0,
                ..d()
            },
            "adafactor_hf.clip_threshold",
        );
        bad(
            AdafactorHfConfig {
                decay_rate: 0.1,
                ..d()
            },
            "adafactor_hf.decay_rate",
        );
        bad(
            AdafactorHfConfig {
                beta1: Some(1.0),
                ..d()
            },
            "adafactor_hf.beta1",
        );
        bad(
            AdafactorHfConfig {
                weight_decay: -1.0,
                ..d()
            },
            "adafactor_hf.weight_decay",
        );
        assert!(d().validate().is_ok());
        assert!(AdafactorHfConfig {
            lr: Some(1e-3),
            relative_step: false,
            ..d()
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn toml_config_round_trips() {
        let cfg = OptimConfig::from_toml("name = \"adafactor_hf\"\nbeta1 = 0.9").unwrap();
        let back = OptimConfig::from_json(serde_json::from_str(&cfg.to_json()).unwrap()).unwrap();
        let (OptimConfig::AdafactorHf(a), OptimConfig::AdafactorHf(b)) = (&cfg, &back) else {
            panic!("wrong variant")
        };
        // serde_json's default float parser may land 1 ulp off (1e-30 here).
        assert!((a.eps.0 - b.eps.0).abs() <= 1e-15 * a.eps.0);
        assert_eq!(
            AdafactorHfConfig {
                eps: a.eps,
                ..b.clone()
            },
            *a
        );
        assert_eq!(b.beta1, Some(0.9));
        assert_eq!(cfg.lr(), 0.0);
        let err = OptimConfig::from_toml("name = \"adafactor_hf\"\nlr = 0.01")
            .unwrap_err()
            .to_string();
        assert!(err.contains("adafactor_hf.lr"), "{err}");
        let ext = OptimConfig::from_toml(
            "name = \"adafactor_hf\"\nlr = 0.01\nrelative_step = false\nscale_parameter = false",
        )
        .unwrap();
        assert_eq!(ext.lr(), 0.01);
    }

    #[test]
    fn check_state_rejects_wrong_factor_shapes() {
        let rule = AdafactorHf(AdafactorHfConfig::default());
        let meta = ParamMeta {
            name: "w".into(),
            shape: vec![2, 3, 4],
            role: Role::Matrix,
        };
        let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
        let mut st = State::default();
        st.tensors.insert("exp_avg_sq_row".into(), z(&[2, 3]));
        st.tensors.insert("exp_avg_sq_col".into(), z(&[2, 4]));
        st.tensors.insert("exp_avg".into(), z(&[2, 3, 4]));
        assert!(rule.check_state(&meta, &st).is_ok());
        st.tensors.insert("exp_avg_sq_row".into(), z(&[2, 3, 1]));
        let err = rule.check_state(&meta, &st).unwrap_err().to_string();
        assert!(err.contains("exp_avg_sq_row"), "{err}");
        st.tensors.remove("exp_avg_sq_row");
        assert!(rule.check_state(&meta, &st).is_err());
        let mut st = State::default();
        st.tensors.insert("exp_avg_sq".into(), z(&[2, 3, 4]));
        assert!(rule.check_state(&meta, &st).is_err());
        let meta0 = ParamMeta {
            shape: vec![],
            role: Role::Scalar,
            ..meta
        };
        let mut st = State::default();
        st.tensors.insert("exp_avg_sq".into(), z(&[]));
        assert!(rule.check_state(&meta0, &st).is_ok());
        st.tensors.insert("exp_avg".into(), z(&[1]));
        assert!(rule.check_state(&meta0, &st).is_err());
    }
}
