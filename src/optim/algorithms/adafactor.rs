//! Adafactor (Shazeer & Stern 2018), exactly as `torch.optim.Adafactor` computes it, plus the
//! factored-moment helpers it shares with [`adafactor_hf`](crate::optim::adafactor_hf).
//!
//! Per parameter, step t (1 on its first update), with `RMS(x) = ‖x‖₂ / √numel(x)` over the
//! whole tensor:
//!
//! ```text
//! g ← −g if maximize
//! w_t = t^beta2_decay                            (= 1 − β2_t; w_1 = 1 copies the first statistics)
//! ρ_t = min(lr, 1/√t)
//! α   = max(ε2, RMS(p)) · ρ_t                    RMS of p before weight decay
//! p   ← p · (1 − lr·λ)                           decoupled decay, coupled to lr (not to α)
//! ndim ≥ 2, factored over the last two dims (leading dims are independent batch dims):
//!   R ← lerp(R, mean_j g², w_t)                  row_var  [..., m, 1]
//!   C ← lerp(C, mean_i g², w_t)                  col_var  [..., 1, n]
//!   V_ij = R_i C_j / max(mean_i R_i, ε1)
//! ndim ≤ 1:
//!   v ← lerp(v, g², w_t);  V = v                 variance [shape of p]
//! U = g / √max(V, ε1²)
//! p ← p − α / max(1, RMS(U)/d) · U               update clipping
//! ```
//!
//! The row and column statistics are MEANS of g², and ε1 is a clamp (on the row-mean normaliser
//! and on V), not an addend — both differ from the HF variant. There is no first moment.
//! `lerp(a, b, w)` is torch's two-branch form (`a + w(b − a)` for |w| < ½, else
//! `b − (b − a)(1 − w)`), so the first step stores g² statistics exactly.
//!
//! Defaults are torch's: lr 1e-2, beta2_decay −0.8, ε = (None, 1e-3), d 1, λ 0 (the signature's
//! value; torch's docstring says 1e-2), maximize false. `eps1 = None` means the machine epsilon
//! of the PARAMETER dtype (2.2e-16 in f64, 1.19e-7 in f32), so f32 and f64 runs use different ε1
//! — as in torch. The reference's `eps` pair is split into `eps1`/`eps2` so that the config is
//! TOML-friendly (TOML has no null). Reference: torch 2.15 `torch/optim/_adafactor.py`
//! (`_single_tensor_adafactor`; the foreach path computes the same).
//!
//! CPU work per parameter is one [`zip_mut`] call: one sweep over p and g for RMS(p) and the
//! row/column sums (factored) or the moment update (full), one for RMS(U) when factored, and one
//! that applies the update. U is recomputed instead of stored, so no parameter-sized temporary
//! is allocated.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Error, Result};
use crate::optim::config::{hyper_accessors, RuleConfig};
use crate::optim::fused::{zip_mut, Float};
use crate::optim::params::ParamMeta;
use crate::optim::rule::{expect_state_shape, Rule, StepCtx};
use crate::optim::state::State;
use crate::with_float;

/// How Adafactor stores a parameter's second moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factoring {
    /// ndim ≥ 2: `batch` independent `rows × cols` matrices (the last two dims; `batch` is the
    /// product of the leading dims), each with a row and a column factor.
    Factored {
        /// Product of the leading dims (1 for a matrix).
        batch: usize,
        /// Size of dim −2.
        rows: usize,
        /// Size of dim −1.
        cols: usize,
    },
    /// 0-D and 1-D: a full second moment, shaped like the parameter.
    Full,
}

impl Factoring {
    /// The storage both references use for a parameter of `shape`: factored iff ndim ≥ 2.
    pub fn of(shape: &[usize]) -> Self {
        match shape {
            [lead @ .., rows, cols] => Factoring::Factored {
                batch: lead.iter().product(),
                rows: *rows,
                cols: *cols,
            },
            _ => Factoring::Full,
        }
    }
}

/// `shape` with its last dim dropped (HF `exp_avg_sq_row`), or set to 1 with `keepdim` (torch
/// `row_var`). `shape` must have at least two dims.
pub fn row_factor_shape(shape: &[usize], keepdim: bool) -> Vec<usize> {
    let mut s = shape[..shape.len() - 1].to_vec();
    if keepdim {
        s.push(1);
    }
    s
}

/// `shape` with dim −2 dropped (HF `exp_avg_sq_col`), or set to 1 with `keepdim` (torch
/// `col_var`). `shape` must have at least two dims.
pub fn col_factor_shape(shape: &[usize], keepdim: bool) -> Vec<usize> {
    let n = shape.len();
    let mut s = shape[..n - 2].to_vec();
    if keepdim {
        s.push(1);
    }
    s.push(shape[n - 1]);
    s
}

/// Row and column sums of `f(x)` over each `rows × cols` matrix of a contiguous `[batch, rows,
/// cols]` buffer, accumulated in f64: `(row sums [batch·rows], column sums [batch·cols])`. One
/// sweep over `x`.
pub fn factored_sums<T: Float>(
    x: &[T],
    batch: usize,
    rows: usize,
    cols: usize,
    f: impl Fn(T) -> f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut row = vec![0.0; batch * rows];
    let mut col = vec![0.0; batch * cols];
    for b in 0..batch {
        let col_b = &mut col[b * cols..(b + 1) * cols];
        for i in 0..rows {
            let start = (b * rows + i) * cols;
            let mut acc = 0.0;
            for (cj, &xk) in col_b.iter_mut().zip(&x[start..start + cols]) {
                let y = f(xk);
                acc += y;
                *cj += y;
            }
            row[b * rows + i] = acc;
        }
    }
    (row, col)
}

/// Sum of squares of a slice, in f64.
pub fn sum_sq_slice<T: Float>(x: &[T]) -> f64 {
    x.iter()
        .map(|v| {
            let v = v.f64();
            v * v
        })
        .sum()
}

/// Mean of a slice, accumulated in f64 (`len > 0`).
pub fn mean_slice<T: Float>(x: &[T]) -> f64 {
    x.iter().map(|v| v.f64()).sum::<f64>() / x.len() as f64
}

/// Checks the shapes of whichever of `fields` (name, expected shape) are present, and rejects
/// the `foreign` fields, which belong to the other storage layout.
pub fn check_fields(
    meta: &ParamMeta,
    state: &State,
    fields: &[(&str, Vec<usize>)],
    foreign: &[&str],
) -> Result<()> {
    for (field, shape) in fields {
        expect_state_shape(meta, state, field, shape)?;
    }
    for field in foreign {
        if state.tensors.contains_key(*field) {
            return Err(Error::State(format!(
                "`{}.{field}` does not belong to a parameter of shape {:?}",
                meta.name, meta.shape
            )));
        }
    }
    Ok(())
}

/// torch's `lerp(a, b, w)`: `a + w(b − a)` for |w| < ½, else `b − (b − a)(1 − w)`, so that
/// `w = 1` returns `b` exactly.
#[inline]
fn lerp<T: Float>(a: T, b: T, w: T) -> T {
    let half = T::of(0.5);
    if num_traits::Float::abs(w) < half {
        a + w * (b - a)
    } else {
        b - (b - a) * (T::one() - w)
    }
}

/// Larger of two floats.
#[inline]
fn fmax<T: Float>(a: T, b: T) -> T {
    num_traits::Float::max(a, b)
}

/// torch Adafactor hyperparameters (torch names and defaults; `eps` split in two).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdafactorConfig {
    /// Learning rate: caps the relative step size, ρ_t = min(lr, 1/√t), and scales the weight
    /// decay.
    pub lr: f64,
    /// Exponent of the second-moment weight: w_t = t^beta2_decay (≤ 0).
    pub beta2_decay: f64,
    /// ε1 (torch `eps[0]`): lower clamp of the row-mean normaliser, and (squared) of V. `None`
    /// (omit it in TOML) means the machine epsilon of the parameter's dtype.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eps1: Option<f64>,
    /// ε2 (torch `eps[1]`): lower bound of RMS(p) in the step size α.
    pub eps2: f64,
    /// Update clipping threshold d: U is scaled down when RMS(U) > d.
    pub d: f64,
    /// Decoupled weight decay λ (p ← p·(1 − lr·λ)).
    pub weight_decay: f64,
    /// Ascend instead of descend.
    pub maximize: bool,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        Self {
            lr: 1e-2,
            beta2_decay: -0.8,
            eps1: None,
            eps2: 1e-3,
            d: 1.0,
            weight_decay: 0.0,
            maximize: false,
        }
    }
}

impl RuleConfig for AdafactorConfig {
    const NAME: &'static str = "adafactor";

    fn validate(&self) -> Result<()> {
        check::non_negative("adafactor.lr", self.lr)?;
        if !(self.beta2_decay.is_finite() && self.beta2_decay <= 0.0) {
            return Err(Error::config(
                "adafactor.beta2_decay",
                format!("must be finite and <= 0, got {}", self.beta2_decay),
            ));
        }
        if let Some(eps1) = self.eps1 {
            // torch accepts 0, but then V can be 0 where g is 0 and U = 0·∞ = NaN.
            check::positive("adafactor.eps1", eps1)?;
        }
        check::non_negative("adafactor.eps2", self.eps2)?;
        check::positive("adafactor.d", self.d)?;
        check::non_negative("adafactor.weight_decay", self.weight_decay)
    }
    hyper_accessors!();
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(Adafactor(self.clone())))
    }
}

/// The torch Adafactor rule.
#[derive(Debug, Clone)]
pub struct Adafactor(pub AdafactorConfig);

impl Adafactor {
    fn step_typed<T: Float>(
        &self,
        ctx: &StepCtx<'_>,
        t: u64,
        param: &Var,
        grad: &Tensor,
        state: &State,
    ) -> Result<()> {
        let cfg = &self.0;
        let numel = param.elem_count();
        if numel == 0 {
            return Ok(());
        }
        let tf = t as f64;
        let w = T::of(tf.powf(cfg.beta2_decay));
        let rho = ctx.lr.min(1.0 / tf.sqrt());
        let eps1 = cfg.eps1.map(T::of).unwrap_or_else(T::epsilon);
        let eps1_sq = eps1 * eps1;
        let decay = (ctx.weight_decay != 0.0).then(|| T::of(1.0 - ctx.lr * ctx.weight_decay));
        let sign = if cfg.maximize { -T::one() } else { T::one() };
        let sqrt_numel = (numel as f64).sqrt();
        // α / max(1, RMS(U)/d), negated, from the two sums of squares.
        let step_scale = |p_ss: f64, u_ss: f64| {
            let alpha = cfg.eps2.max(p_ss.sqrt() / sqrt_numel) * rho;
            let den = (u_ss.sqrt() / (sqrt_numel * cfg.d)).max(1.0);
            T::of(-alpha / den)
        };
        let apply = |p: &mut T, s: T, u: T| {
            let pk = match decay {
                Some(dc) => *p * dc,
                None => *p,
            };
            *p = pk + s * u;
        };
        match Factoring::of(param.dims()) {
            Factoring::Full => {
                let v = state.tensor("variance")?;
                zip_mut::<T>(&[param.as_tensor(), v], &[grad], |o, i| {
                    let g = i[0];
                    let [p, v] = o else {
                        unreachable!("two outputs")
                    };
                    let p_ss = sum_sq_slice(p);
                    let mut u_ss = 0.0;
                    for (vk, &gk) in v.iter_mut().zip(g) {
                        let gk = sign * gk;
                        *vk = lerp(*vk, gk * gk, w);
                        let u = gk / fmax(*vk, eps1_sq).sqrt();
                        u_ss += u.f64() * u.f64();
                    }
                    let s = step_scale(p_ss, u_ss);
                    for ((pk, &vk), &gk) in p.iter_mut().zip(v.iter()).zip(g) {
                        apply(pk, s, sign * gk / fmax(vk, eps1_sq).sqrt());
                    }
                    Ok(())
                })
            }
            Factoring::Factored { batch, rows, cols } => {
                let r = state.tensor("row_var")?;
                let c = state.tensor("col_var")?;
                zip_mut::<T>(&[param.as_tensor(), r, c], &[grad], |o, i| {
                    let g = i[0];
                    let [p, r, c] = o else {
                        unreachable!("three outputs")
                    };
                    let p_ss = sum_sq_slice(p);
                    let (row_sums, col_sums) = factored_sums(g, batch, rows, cols, |x| {
                        let x = x.f64();
                        x * x
                    });
                    for (rk, s) in r.iter_mut().zip(&row_sums) {
                        *rk = lerp(*rk, T::of(s / cols as f64), w);
                    }
                    for (ck, s) in c.iter_mut().zip(&col_sums) {
                        *ck = lerp(*ck, T::of(s / rows as f64), w);
                    }
                    let norm: Vec<T> = r
                        .chunks(rows)
                        .map(|rb| fmax(T::of(mean_slice(rb)), eps1))
                        .collect();
                    let r: &[T] = r;
                    let c: &[T] = c;
                    // U at (b, i, j) for the gradient entry gk.
                    let u_at = |b: usize, i: usize, j: usize, gk: T| {
                        let v = r[b * rows + i] * c[b * cols + j] / norm[b];
                        sign * gk / fmax(v, eps1_sq).sqrt()
                    };
                    let mut u_ss = 0.0;
                    for (row, gr) in g.chunks(cols).enumerate() {
                        let (b, i) = (row / rows, row % rows);
                        for (j, &gk) in gr.iter().enumerate() {
                            let u = u_at(b, i, j, gk).f64();
                            u_ss += u * u;
                        }
                    }
                    let s = step_scale(p_ss, u_ss);
                    for (row, (pr, gr)) in p.chunks_mut(cols).zip(g.chunks(cols)).enumerate() {
                        let (b, i) = (row / rows, row % rows);
                        for (j, (pk, &gk)) in pr.iter_mut().zip(gr).enumerate() {
                            apply(pk, s, u_at(b, i, j, gk));
                        }
                    }
                    Ok(())
                })
            }
        }
    }
}

impl Rule for Adafactor {
    fn name(&self) -> &'static str {
        AdafactorConfig::NAME
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
        match Factoring::of(&shape) {
            Factoring::Full => {
                state.tensor_or_zeros("variance", param)?;
            }
            Factoring::Factored { .. } => {
                let (dtype, device) = (param.dtype(), param.device());
                state.tensor_or_zeros_shaped(
                    "row_var",
                    &row_factor_shape(&shape, true),
                    dtype,
                    device,
                )?;
                state.tensor_or_zeros_shaped(
                    "col_var",
                    &col_factor_shape(&shape, true),
                    dtype,
                    device,
                )?;
            }
        }
        with_float!(param.dtype(), "adafactor", T => self.step_typed::<T>(ctx, t, param, grad, state))
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        let shape = &meta.shape;
        match Factoring::of(shape) {
            Factoring::Full => check_fields(
                meta,
                state,
                &[("variance", shape.clone())],
                &["row_var", "col_var"],
            ),
            Factoring::Factored { .. } => {
                check_fields(
                    meta,
                    state,
                    &[
                        ("row_var", row_factor_shape(shape, true)),
                        ("col_var", col_factor_shape(shape, true)),
                    ],
                    &["variance"],
                )?;
                if state.tensors.contains_key("row_var") != state.tensors.contains_key("col_var") {
                    return Err(Error::State(format!(
                        "`{}` has only one of row_var / col_var",
                        meta.name
                    )));
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::testing::{self, noise, param};
    use crate::optim::{Driver, OptimConfig, Optimizer};
    use candle_core::{DType, Device};
    use std::collections::BTreeMap;

    /// Deterministic pseudo-random values in [−1, 1).
    fn values(n: usize, seed: u64) -> Vec<f64> {
        noise(seed, n)
    }

    fn driver(cfg: AdafactorConfig, shapes: &[(&str, &[usize])], dtype: DType) -> Driver {
        testing::driver(OptimConfig::Adafactor(cfg), shapes, dtype, |k, n| {
            values(n, k)
        })
    }

    fn step(opt: &mut Driver, shapes: &[(&str, &[usize])], seed: u64, dtype: DType) {
        let grads = testing::named(shapes, dtype, |k, n| values(n, 100 + seed * 10 + k));
        opt.step_named(&grads).unwrap();
    }

    /// A plain restatement of the equations in the module doc, over `[batch, m, n]` (or a
    /// flat vector when `mn` is None), in f64: returns p after each step.
    fn naive(
        cfg: &AdafactorConfig,
        mut p: Vec<f64>,
        grads: &[Vec<f64>],
        mn: Option<(usize, usize)>,
    ) -> Vec<Vec<f64>> {
        let eps1 = cfg.eps1.unwrap_or(f64::EPSILON);
        let len = p.len();
        let (m, n) = mn.unwrap_or((1, len));
        let batch = len / (m * n);
        let (mut r, mut c, mut v) = (vec![0.0; batch * m], vec![0.0; batch * n], vec![0.0; len]);
        let rms = |x: &[f64]| (x.iter().map(|a| a * a).sum::<f64>() / x.len() as f64).sqrt();
        let mut out = Vec::new();
        for (k, g) in grads.iter().enumerate() {
            let t = (k + 1) as f64;
            let w = t.powf(cfg.beta2_decay);
            let alpha = cfg.eps2.max(rms(&p)) * cfg.lr.min(1.0 / t.sqrt());
            let mut vhat = vec![0.0; len];
            if mn.is_some() {
                for b in 0..batch {
                    for i in 0..m {
                        let mean =
                            (0..n).map(|j| g[(b * m + i) * n + j].powi(2)).sum::<f64>() / n as f64;
                        r[b * m + i] += w * (mean - r[b * m + i]);
                    }
                    for j in 0..n {
                        let mean =
                            (0..m).map(|i| g[(b * m + i) * n + j].powi(2)).sum::<f64>() / m as f64;
                        c[b * n + j] += w * (mean - c[b * n + j]);
                    }
                    let rm = ((0..m).map(|i| r[b * m + i]).sum::<f64>() / m as f64).max(eps1);
                    for i in 0..m {
                        for j in 0..n {
                            vhat[(b * m + i) * n + j] = r[b * m + i] * c[b * n + j] / rm;
                        }
                    }
                }
            } else {
                for e in 0..len {
                    v[e] += w * (g[e] * g[e] - v[e]);
                }
                vhat.clone_from(&v);
            }
            let u: Vec<f64> = (0..len)
                .map(|e| g[e] / vhat[e].max(eps1 * eps1).sqrt())
                .collect();
            let den = (rms(&u) / cfg.d).max(1.0);
            for e in 0..len {
                p[e] = p[e] * (1.0 - cfg.lr * cfg.weight_decay) - alpha / den * u[e];
            }
            out.push(p.clone());
        }
        out
    }

    fn check_against_naive(cfg: AdafactorConfig, shape: &[usize]) {
        let shapes: &[(&str, &[usize])] = &[("x", shape)];
        let mut opt = driver(cfg.clone(), shapes, DType::F64);
        let n: usize = shape.iter().product();
        let grads: Vec<Vec<f64>> = (0..4).map(|s| values(n, 100 + s * 10)).collect();
        let mn = (shape.len() >= 2).then(|| (shape[shape.len() - 2], shape[shape.len() - 1]));
        let expected = naive(&cfg, values(n, 0), &grads, mn);
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
    fn factoring_follows_ndim() {
        assert_eq!(Factoring::of(&[]), Factoring::Full);
        assert_eq!(Factoring::of(&[5]), Factoring::Full);
        assert_eq!(
            Factoring::of(&[3, 4]),
            Factoring::Factored {
                batch: 1,
                rows: 3,
                cols: 4
            }
        );
        assert_eq!(
            Factoring::of(&[2, 5, 3, 4]),
            Factoring::Factored {
                batch: 10,
                rows: 3,
                cols: 4
            }
        );
        assert_eq!(row_factor_shape(&[2, 3, 4], true), vec![2, 3, 1]);
        assert_eq!(col_factor_shape(&[2, 3, 4], true), vec![2, 1, 4]);
        assert_eq!(row_factor_shape(&[2, 3, 4], false), vec![2, 3]);
        assert_eq!(col_factor_shape(&[2, 3, 4], false), vec![2, 4]);
    }

    #[test]
    fn state_layout_matches_the_path() {
        let shapes: &[(&str, &[usize])] =
            &[("m", &[3, 4]), ("b3", &[2, 3, 4]), ("v", &[5]), ("s", &[])];
        let mut opt = driver(AdafactorConfig::default(), shapes, DType::F32);
        step(&mut opt, shapes, 0, DType::F32);
        let sd = opt.state_dict().unwrap();
        let dims = |p: &str, f: &str| sd.entries[p].tensors.get(f).map(|t| t.dims().to_vec());
        assert_eq!(dims("m", "row_var"), Some(vec![3, 1]));
        assert_eq!(dims("m", "col_var"), Some(vec![1, 4]));
        assert_eq!(dims("m", "variance"), None);
        assert_eq!(dims("b3", "row_var"), Some(vec![2, 3, 1]));
        assert_eq!(dims("b3", "col_var"), Some(vec![2, 1, 4]));
        assert_eq!(dims("v", "variance"), Some(vec![5]));
        assert_eq!(dims("v", "row_var"), None);
        assert_eq!(dims("s", "variance"), Some(vec![]));
        assert_eq!(sd.entries["s"].scalars["step"], 1.0);
    }

    #[test]
    fn matches_the_equations_for_every_rank() {
        let cfg = AdafactorConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        for shape in [&[][..], &[7], &[6, 10], &[3, 4, 5], &[2, 1, 3, 2]] {
            check_against_naive(cfg.clone(), shape);
        }
        // A large lr makes ρ_t = 1/√t and a small d makes the clipping bite.
        let cfg = AdafactorConfig {
            lr: 2.0,
            d: 0.5,
            eps1: Some(1e-20),
            ..Default::default()
        };
        check_against_naive(cfg, &[4, 3]);
    }

    #[test]
    fn batch_dims_keep_separate_factors() {
        // The leading dim of a 3-D tensor is a batch dim: each slice's row/col statistics are
        // those of the slice alone.
        let g = values(2 * 3 * 4, 7);
        let run = |shape: &[usize], g: &[f64]| {
            let p =
                Var::from_tensor(&Tensor::zeros(shape, DType::F64, &Device::Cpu).unwrap()).unwrap();
            let grad = Tensor::from_vec(g.to_vec(), shape, &Device::Cpu).unwrap();
            let mut st = State::default();
            let group = State::default();
            let ctx = StepCtx {
                lr: 1e-2,
                lr_factor: 1.0,
                weight_decay: 0.0,
                step: 1,
                group: &group,
            };
            let meta = ParamMeta {
                name: "x".into(),
                shape: shape.to_vec(),
                role: crate::optim::Role::Matrix,
            };
            Adafactor(AdafactorConfig::default())
                .update(&ctx, &meta, &p, &grad, &mut st)
                .unwrap();
            let flat = |f: &str| {
                st.tensors[f]
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            (flat("row_var"), flat("col_var"))
        };
        let (r3, c3) = run(&[2, 3, 4], &g);
        let (r0, c0) = run(&[3, 4], &g[..12]);
        let (r1, c1) = run(&[3, 4], &g[12..]);
        assert_eq!(r3, [r0, r1].concat());
        assert_eq!(c3, [c0, c1].concat());
    }

    #[test]
    fn maximize_moves_uphill_and_empty_params_are_fine() {
        let shapes: &[(&str, &[usize])] = &[("x", &[4]), ("e", &[0, 3])];
        let cfg = AdafactorConfig {
            maximize: true,
            ..Default::default()
        };
        let mut up = driver(cfg, shapes, DType::F64);
        let mut down = driver(AdafactorConfig::default(), shapes, DType::F64);
        let p0 = param(&up, "x");
        step(&mut up, shapes, 0, DType::F64);
        step(&mut down, shapes, 0, DType::F64);
        let (pu, pd) = (param(&up, "x"), param(&down, "x"));
        for k in 0..4 {
            assert!(((pu[k] - p0[k]) + (pd[k] - p0[k])).abs() < 1e-15);
        }
        assert!(param(&up, "e").is_empty());
    }

    #[test]
    fn eps1_defaults_to_the_parameter_dtype_epsilon() {
        // Tiny gradients on a 1-D param: U = g / max(|g|, ε1), so each coordinate's U is
        // g/ε1 when |g| < ε1 (then clipped), and sign(g) otherwise.
        let shapes: &[(&str, &[usize])] = &[("x", &[2])];
        for (dtype, eps) in [
            (DType::F32, f32::EPSILON as f64),
            (DType::F64, f64::EPSILON),
        ] {
            let mut opt = driver(AdafactorConfig::default(), shapes, dtype);
            let p0 = param(&opt, "x");
            let g = Tensor::new(&[eps * 0.25, 1e-3], &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            opt.step_named(&BTreeMap::from([("x".to_string(), g)]))
                .unwrap();
            let p1 = param(&opt, "x");
            let (d0, d1) = (p0[0] - p1[0], p0[1] - p1[1]);
            // U = (0.25, 1): both move down, the first a quarter as far.
            assert!((d0 / d1 - 0.25).abs() < 1e-4, "{dtype:?}: {d0} {d1}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |cfg: AdafactorConfig, field: &str| {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        };
        let d = AdafactorConfig::default;
        bad(AdafactorConfig { lr: -1.0, ..d() }, "adafactor.lr");
        bad(
            AdafactorConfig {
                beta2_decay: 0.5,
                ..d()
            },
            "adafactor.beta2_decay",
        );
        bad(
            AdafactorConfig {
                eps1: Some(0.0),
                ..d()
            },
            "adafactor.eps1",
        );
        bad(AdafactorConfig { eps2: -1.0, ..d() }, "adafactor.eps2");
        bad(AdafactorConfig { d: 0.0, ..d() }, "adafactor.d");
        bad(
            AdafactorConfig {
                weight_decay: f64::NAN,
                ..d()
            },
            "adafactor.weight_decay",
        );
        assert!(d().validate().is_ok());
    }

    #[test]
    fn toml_config_with_and_without_eps1() {
        let cfg = OptimConfig::from_toml("name = \"adafactor\"\nlr = 0.05").unwrap();
        let OptimConfig::Adafactor(c) = &cfg else {
            panic!("wrong variant")
        };
        assert_eq!(c.eps1, None);
        assert_eq!(c.lr, 0.05);
        let back = OptimConfig::from_json(serde_json::from_str(&cfg.to_json()).unwrap()).unwrap();
        assert_eq!(back.to_json(), cfg.to_json());
        let cfg = OptimConfig::from_toml("name = \"adafactor\"\neps1 = 1e-30\neps2 = 0.0").unwrap();
        let OptimConfig::Adafactor(c) = cfg else {
            panic!("wrong variant")
        };
        assert_eq!((c.eps1, c.eps2), (Some(1e-30), 0.0));
        assert!(OptimConfig::from_toml("name = \"adafactor\"\neps = [1e-30, 1e-3]").is_err());
    }

    #[test]
    fn check_state_rejects_wrong_factor_shapes() {
        let rule = Adafactor(AdafactorConfig::default());
        let meta = ParamMeta {
            name: "w".into(),
            shape: vec![3, 4],
            role: crate::optim::Role::Matrix,
        };
        let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
        let mut st = State::default();
        st.tensors.insert("row_var".into(), z(&[3, 1]));
        st.tensors.insert("col_var".into(), z(&[1, 4]));
        assert!(rule.check_state(&meta, &st).is_ok());
        st.tensors.insert("col_var".into(), z(&[4, 1]));
        assert!(rule
            .check_state(&meta, &st)
            .unwrap_err()
            .to_string()
            .contains("col_var"));
        st.tensors.remove("col_var");
        assert!(rule.check_state(&meta, &st).is_err());
        let mut st = State::default();
        st.tensors.insert("variance".into(), z(&[3, 4]));
        assert!(rule
            .check_state(&meta, &st)
            .unwrap_err()
            .to_string()
            .contains("variance"));
        let meta1 = ParamMeta {
            shape: vec![5],
            ..meta
        };
        let mut st = State::default();
        st.tensors.insert("variance".into(), z(&[4]));
        assert!(rule.check_state(&meta1, &st).is_err());
        st.tensors.insert("variance".into(), z(&[5]));
        assert!(rule.check_state(&meta1, &st).is_ok());
    }
}
