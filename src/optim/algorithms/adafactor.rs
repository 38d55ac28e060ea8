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
//! One step of one parameter is [`run_pass`], shared with the HF variant: on a CUDA device the
//! `adafactor_*` kernels of kernels/fused.cu (row sums, column partials, the factor updates
//! with the row means, Σp² and Σu² by chunks, the step's scalars, the update; for a full
//! second moment only the last three), queued without a copy to the host or a wait; on the
//! CPU their twin, one [`zip_mut`] call that sums in the kernels' fixed order ([`block_sum`],
//! [`chunked_sums`], [`factored_sums`]) so that both agree bit for bit. U is recomputed
//! instead of stored, so no parameter-sized temporary is allocated.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Error, Result};
use crate::launch::{check_sizes, AdafactorPlan, ADAFACTOR_CHUNK, ADAFACTOR_PART};
use crate::optim::config::{hyper_accessors, RuleConfig};
use crate::optim::fused::{flag, zip_mut, Float};
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

/// Lanes of the fixed-order sums: the kernels' threads per block.
const LANES: usize = crate::launch::THREADS as usize;

/// `Σ f(k)` for `k < len` in the order of one kernel block (`af_block_sum` in
/// kernels/fused.cu): lane `k mod LANES` adds its terms in increasing `k`, then the lanes are
/// folded pairwise (lane `t` += lane `t + w` for `w = LANES/2, …, 1`). The CPU path sums in
/// this order so that it stays the bit-exact twin of the kernels.
pub fn block_sum(len: usize, mut f: impl FnMut(usize) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    for k in 0..len {
        acc[k % LANES] += f(k);
    }
    fold_lanes(acc)
}

fn fold_lanes(mut acc: [f64; LANES]) -> f64 {
    let mut w = LANES / 2;
    while w > 0 {
        for t in 0..w {
            acc[t] += acc[t + w];
        }
        w /= 2;
    }
    acc[0]
}

/// `(Σ a(k), Σ b(k))` for `k < n` with `(a, b) = f(k)`, each in the kernels' order: a
/// [`block_sum`] over every chunk of [`ADAFACTOR_CHUNK`] consecutive elements, then a
/// [`block_sum`] of the chunk partials. `f` is called once per `k`, in increasing order.
pub fn chunked_sums(n: usize, mut f: impl FnMut(usize) -> (f64, f64)) -> (f64, f64) {
    let chunks = n.div_ceil(ADAFACTOR_CHUNK);
    let (mut pa, mut pb) = (Vec::with_capacity(chunks), Vec::with_capacity(chunks));
    for q in 0..chunks {
        let lo = q * ADAFACTOR_CHUNK;
        let (mut a, mut b) = ([0.0f64; LANES], [0.0f64; LANES]);
        for k in lo..n.min(lo + ADAFACTOR_CHUNK) {
            let (x, y) = f(k);
            a[k % LANES] += x;
            b[k % LANES] += y;
        }
        pa.push(fold_lanes(a));
        pb.push(fold_lanes(b));
    }
    (block_sum(chunks, |q| pa[q]), block_sum(chunks, |q| pb[q]))
}

/// Row and column sums of `f(x)` over each `rows × cols` matrix of a contiguous `[batch, rows,
/// cols]` buffer, in f64 and in the kernels' order: `(row sums [batch·rows], column sums
/// [batch·cols])`. A row (column) sum adds the elements of each chunk of [`ADAFACTOR_PART`]
/// columns (rows) in turn, then the chunk partials in turn.
pub fn factored_sums<T: Float>(
    x: &[T],
    batch: usize,
    rows: usize,
    cols: usize,
    f: impl Fn(T) -> f64,
) -> (Vec<f64>, Vec<f64>) {
    let row: Vec<f64> = x
        .chunks(cols.max(1))
        .take(batch * rows)
        .map(|xr| {
            xr.chunks(ADAFACTOR_PART)
                .fold(0.0, |s, part| s + part.iter().fold(0.0, |p, &xk| p + f(xk)))
        })
        .collect();
    let row_chunks = rows.div_ceil(ADAFACTOR_PART);
    let mut part = vec![0.0; batch * row_chunks * cols];
    for b in 0..batch {
        for i in 0..rows {
            let q = b * row_chunks + i / ADAFACTOR_PART;
            let start = (b * rows + i) * cols;
            for (pj, &xk) in part[q * cols..(q + 1) * cols]
                .iter_mut()
                .zip(&x[start..start + cols])
            {
                *pj += f(xk);
            }
        }
    }
    let mut col = vec![0.0; batch * cols];
    for b in 0..batch {
        for (j, cj) in col[b * cols..(b + 1) * cols].iter_mut().enumerate() {
            for q in 0..row_chunks {
                *cj += part[(b * row_chunks + q) * cols + j];
            }
        }
    }
    (row, col)
}

/// The per-step scalars of one Adafactor pass, for either variant: what the `adafactor_*`
/// kernels take and what the CPU twin ([`run_pass`]) computes with.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Pass<T> {
    /// torch (this module).
    Torch {
        /// w_t.
        w: T,
        /// ε1 and ε1².
        eps1: T,
        eps1_sq: T,
        /// −1 to maximize, else 1.
        sign: T,
        /// 1 − lr·λ, when λ ≠ 0.
        decay: Option<T>,
        /// ε2, ρ_t, d.
        eps2: f64,
        rho: f64,
        d: f64,
    },
    /// HF ([`adafactor_hf`](crate::optim::adafactor_hf)).
    Hf {
        /// β2_t and 1 − β2_t.
        b2: T,
        c2: T,
        /// ε1 (added to g²).
        eps1: T,
        /// β1 and 1 − β1, with a first moment.
        momentum: Option<(T, T)>,
        /// ε2, ρ, clip threshold, λ.
        eps2: f64,
        rho: f64,
        clip: f64,
        wd: f64,
        /// Scale by max(ε2, RMS(p)).
        scale_parameter: bool,
    },
}

/// What [`Pass::finish`] derives from Σp² and Σu².
#[derive(Debug, Clone, Copy)]
struct Finish<T> {
    /// torch: the step scale −α / max(1, RMS(U)/d). HF: lr_t.
    scale: T,
    /// HF: −λ·lr_t.
    decay: T,
    /// HF: max(1, RMS(U)/clip).
    den: T,
    /// RMS(p).
    rms: f64,
}

impl<T: Float> Pass<T> {
    fn hf(&self) -> bool {
        matches!(self, Pass::Hf { .. })
    }

    /// The summand of the factored statistics: torch g² in f64, HF g² + ε1 in T.
    fn sq(&self, g: T) -> f64 {
        match self {
            Pass::Torch { .. } => {
                let x = g.f64();
                x * x
            }
            Pass::Hf { eps1, .. } => (g * g + *eps1).f64(),
        }
    }

    /// A second-moment entry moved toward `x`.
    fn moment(&self, old: T, x: T) -> T {
        match *self {
            Pass::Torch { w, .. } => lerp(old, x, w),
            Pass::Hf { b2, c2, .. } => b2 * old + c2 * x,
        }
    }

    /// Full storage: v updated from g, and U.
    fn full(&self, v: &mut T, g: T) -> T {
        match *self {
            Pass::Torch { sign, .. } => {
                let gk = sign * g;
                *v = self.moment(*v, gk * gk);
            }
            Pass::Hf { eps1, .. } => *v = self.moment(*v, g * g + eps1),
        }
        self.u_full(*v, g)
    }

    /// Full storage: U from v.
    fn u_full(&self, v: T, g: T) -> T {
        match *self {
            Pass::Torch { sign, eps1_sq, .. } => sign * g / fmax(v, eps1_sq).sqrt(),
            Pass::Hf { .. } => T::one() / v.sqrt() * g,
        }
    }

    /// Factored storage: the per-matrix divisor from the mean of its row factor (torch: the
    /// clamped normaliser; HF: the mean itself).
    fn norm(&self, mean: f64) -> T {
        match *self {
            Pass::Torch { eps1, .. } => fmax(T::of(mean), eps1),
            Pass::Hf { .. } => T::of(mean),
        }
    }

    /// The step's scalars from Σp² and Σu² over `n` elements (the `adafactor_scale` kernel).
    fn finish(&self, n: usize, p_ss: f64, u_ss: f64) -> Finish<T> {
        let sqrt_numel = (n as f64).sqrt();
        let rms = p_ss.sqrt() / sqrt_numel;
        match *self {
            Pass::Torch { eps2, rho, d, .. } => {
                let alpha = eps2.max(rms) * rho;
                let den = (u_ss.sqrt() / (sqrt_numel * d)).max(1.0);
                Finish {
                    scale: T::of(-alpha / den),
                    decay: T::zero(),
                    den: T::one(),
                    rms,
                }
            }
            Pass::Hf {
                eps2,
                rho,
                clip,
                wd,
                scale_parameter,
                ..
            } => {
                let scale = if scale_parameter { eps2.max(rms) } else { 1.0 };
                let lr_t = rho * scale;
                Finish {
                    scale: T::of(lr_t),
                    decay: T::of(-wd * lr_t),
                    den: T::of((u_ss.sqrt() / sqrt_numel / clip).max(1.0)),
                    rms,
                }
            }
        }
    }

    /// Moves one element by U.
    fn apply(&self, p: &mut T, m: Option<&mut T>, u: T, f: &Finish<T>) {
        match *self {
            Pass::Torch { decay, .. } => {
                let pk = match decay {
                    Some(dc) => *p * dc,
                    None => *p,
                };
                *p = pk + f.scale * u;
            }
            Pass::Hf { momentum, wd, .. } => {
                let mut u = u / f.den * f.scale;
                if let (Some(m), Some((b1, c1))) = (m, momentum) {
                    *m = b1 * *m + c1 * u;
                    u = *m;
                }
                let mut pk = *p;
                if wd != 0.0 {
                    pk = pk + f.decay * pk;
                }
                *p = pk - u;
            }
        }
    }

    /// The kernels' scalar lists: `s` in T and the step scalars in f64 (kernels/fused.cu).
    #[cfg_attr(not(any(feature = "cuda", optlab_emulate_kernels)), allow(dead_code))]
    fn kernel_scalars(&self) -> (Vec<T>, Vec<f64>) {
        let to_f32 = if T::DTYPE == candle_core::DType::F32 {
            1.0
        } else {
            0.0
        };
        match *self {
            Pass::Torch {
                w,
                eps1,
                eps1_sq,
                sign,
                decay,
                eps2,
                rho,
                d,
            } => (
                vec![
                    T::zero(),
                    w,
                    eps1,
                    eps1_sq,
                    sign,
                    decay.unwrap_or(T::one()),
                    flag(decay.is_some()),
                ],
                vec![0.0, eps2, rho, d, to_f32],
            ),
            Pass::Hf {
                b2,
                c2,
                eps1,
                momentum,
                eps2,
                rho,
                clip,
                wd,
                scale_parameter,
            } => {
                let (b1, c1) = momentum.unwrap_or((T::zero(), T::zero()));
                (
                    vec![
                        T::one(),
                        b2,
                        c2,
                        eps1,
                        b1,
                        c1,
                        flag(momentum.is_some()),
                        flag(wd != 0.0),
                    ],
                    vec![
                        1.0,
                        eps2,
                        rho,
                        clip,
                        to_f32,
                        wd,
                        flag::<f64>(scale_parameter),
                    ],
                )
            }
        }
    }
}

/// The CPU twin of the `adafactor_*` launches over slices: `rv` is r (factored) or v (full),
/// `c` the column factor (factored), `m` the HF first moment. Returns RMS(p) before the step.
fn cpu_pass<T: Float>(
    pass: &Pass<T>,
    plan: &AdafactorPlan,
    p: &mut [T],
    rv: &mut [T],
    c: Option<&mut [T]>,
    mut m: Option<&mut [T]>,
    g: &[T],
) -> f64 {
    let n = plan.n;
    let (p_ss, u_ss, fin);
    match c {
        None => {
            let p_ro: &[T] = p;
            (p_ss, u_ss) = chunked_sums(n, |k| {
                let pk = p_ro[k].f64();
                let u = pass.full(&mut rv[k], g[k]).f64();
                (pk * pk, u * u)
            });
            fin = pass.finish(n, p_ss, u_ss);
            for k in 0..n {
                let u = pass.u_full(rv[k], g[k]);
                pass.apply(&mut p[k], m.as_mut().map(|m| &mut m[k]), u, &fin);
            }
        }
        Some(c) => {
            let (batch, rows, cols) = (plan.batch, plan.rows, plan.cols);
            let (row_sums, col_sums) = factored_sums(g, batch, rows, cols, |x| pass.sq(x));
            for (ck, s) in c.iter_mut().zip(&col_sums) {
                *ck = pass.moment(*ck, T::of(s / rows as f64));
            }
            for (rk, s) in rv.iter_mut().zip(&row_sums) {
                *rk = pass.moment(*rk, T::of(s / cols as f64));
            }
            let norm: Vec<T> = rv
                .chunks(rows)
                .map(|rb| pass.norm(block_sum(rows, |i| rb[i].f64()) / rows as f64))
                .collect();
            let (r, c): (&[T], &[T]) = (rv, c);
            // U per element from its row and column, as `af_u` in the kernels; HF's 1/√ factors
            // once per row and column (the same values the kernel recomputes per element).
            let hf_factors = pass.hf().then(|| {
                let row_f: Vec<T> = r
                    .iter()
                    .enumerate()
                    .map(|(row, &x)| T::one() / (x / norm[row / rows]).sqrt())
                    .collect();
                let col_f: Vec<T> = c.iter().map(|&x| T::one() / x.sqrt()).collect();
                (row_f, col_f)
            });
            let u_at = |k: usize| {
                let (row, j) = (k / cols, k % cols);
                let (b, gk) = (row / rows, g[k]);
                match (pass, &hf_factors) {
                    (Pass::Torch { sign, eps1_sq, .. }, _) => {
                        let v = r[row] * c[b * cols + j] / norm[b];
                        *sign * gk / fmax(v, *eps1_sq).sqrt()
                    }
                    (Pass::Hf { .. }, Some((row_f, col_f))) => {
                        row_f[row] * col_f[b * cols + j] * gk
                    }
                    (Pass::Hf { .. }, None) => unreachable!("HF factors are computed"),
                }
            };
            let p_ro: &[T] = p;
            (p_ss, u_ss) = chunked_sums(n, |k| {
                let pk = p_ro[k].f64();
                let u = u_at(k).f64();
                (pk * pk, u * u)
            });
            fin = pass.finish(n, p_ss, u_ss);
            for k in 0..n {
                pass.apply(&mut p[k], m.as_mut().map(|m| &mut m[k]), u_at(k), &fin);
            }
        }
    }
    fin.rms
}

/// One Adafactor step of one parameter: the `adafactor_*` kernels on a CUDA device (or in host
/// emulation), else their CPU twin. `rv` is r (factored) or v (full), `c` the column factor
/// (factored), `m` the HF first moment, `rms` an f64 0-D tensor that receives RMS(p) (HF).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_pass<T: Float>(
    pass: &Pass<T>,
    factoring: Factoring,
    p: &Tensor,
    rv: &Tensor,
    c: Option<&Tensor>,
    m: Option<&Tensor>,
    g: &Tensor,
    rms: Option<&Tensor>,
) -> Result<()> {
    let factored = match factoring {
        Factoring::Factored { batch, rows, cols } => Some((batch, rows, cols)),
        Factoring::Full => None,
    };
    let Some(plan) = AdafactorPlan::new(p.elem_count(), factored) else {
        return Ok(());
    };
    // The kernels index r, c and v by these counts: check them before any launch.
    let (n, (batch, rows, cols)) = (plan.n, factored.unwrap_or((0, 0, 0)));
    check_sizes("adafactor", n, &[g])?;
    check_sizes("adafactor", n, &m.into_iter().collect::<Vec<_>>())?;
    match c {
        Some(c) => {
            check_sizes("adafactor row factor", batch * rows, &[rv])?;
            check_sizes("adafactor column factor", batch * cols, &[c])?;
        }
        None => check_sizes("adafactor", n, &[rv])?,
    }
    // RMS(p) is written after the parameter pass: check its slot now, so that nothing can fail
    // once the parameter has moved (the driver does not copy Adafactor's parameters, see
    // `OptimConfig::update_may_fail`).
    if let Some(t) = rms {
        if t.dtype() != candle_core::DType::F64 || t.elem_count() != 1 {
            return Err(Error::State(format!(
                "adafactor: RMS must be one f64 value, got {:?} {:?}",
                t.dtype(),
                t.dims()
            )));
        }
    }
    let mut outs = vec![p, rv];
    outs.extend(c);
    outs.extend(m);
    let (has_c, has_m) = (c.is_some(), m.is_some());
    #[cfg(feature = "cuda")]
    if p.device().is_cuda() {
        let (s, wide) = pass.kernel_scalars();
        return crate::cuda::adafactor::<T>(&plan, &outs, (has_c, has_m), g, rms, &s, &wide);
    }
    #[cfg(optlab_emulate_kernels)]
    if crate::launch::emulate::active() {
        let (s, wide) = pass.kernel_scalars();
        return crate::launch::emulate::adafactor::<T>(
            &plan,
            &outs,
            (has_c, has_m),
            g,
            rms,
            &s,
            &wide,
        );
    }
    let mut rms_p = 0.0;
    zip_mut::<T>(&outs, &[g], |o, i| {
        let (p, rest) = o.split_first_mut().expect("param");
        let (rv, rest) = rest.split_first_mut().expect("second moment");
        let (c, rest) = if has_c {
            let (c, rest) = rest.split_first_mut().expect("column factor");
            (Some(&mut **c), rest)
        } else {
            (None, rest)
        };
        let m = if has_m { Some(&mut *rest[0]) } else { None };
        rms_p = cpu_pass(pass, &plan, p, rv, c, m, i[0]);
        Ok(())
    })?;
    if let Some(t) = rms {
        zip_mut::<f64>(&[t], &[], |o, _| {
            o[0][0] = rms_p;
            Ok(())
        })?;
    }
    Ok(())
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
        let tf = t as f64;
        let eps1 = cfg.eps1.map(T::of).unwrap_or_else(T::epsilon);
        let pass = Pass::Torch {
            w: T::of(tf.powf(cfg.beta2_decay)),
            eps1,
            eps1_sq: eps1 * eps1,
            sign: if cfg.maximize { -T::one() } else { T::one() },
            decay: (ctx.weight_decay != 0.0).then(|| T::of(1.0 - ctx.lr * ctx.weight_decay)),
            eps2: cfg.eps2,
            rho: ctx.lr.min(1.0 / tf.sqrt()),
            d: cfg.d,
        };
        let p = param.as_tensor();
        match Factoring::of(param.dims()) {
            f @ Factoring::Full => {
                let v = state.tensor("variance")?;
                run_pass(&pass, f, p, v, None, None, grad, None)
            }
            f @ Factoring::Factored { .. } => {
                let r = state.tensor("row_var")?;
                let c = state.tensor("col_var")?;
                run_pass(&pass, f, p, r, Some(c), None, grad, None)
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
