//! PSGD Kron (Xi-Lin Li; arXiv 1512.04202, 1809.10232, 2402.11858): a Kronecker-factored
//! preconditioner fitted online to whiten the gradient, exactly as the author's `KronWhiten`
//! computes it with the default geometry `dQ = Q^0.5 E Q^1.5`.
//!
//! Per parameter, the gradient is squeezed (size-1 dims dropped) to `g` of shape
//! `(n_1, …, n_d)`, `N` elements. Each dim k has a factor: diagonal (`q_k`, a vector) iff
//! `n_k ≤ 1`, `n_k > max_size` or `n_k² > max_skew·N`, else dense (`Q_k`, `n_k × n_k`); a
//! parameter with no dim above 1 has one scalar factor. `P = ⊗_k Q_kᵀQ_k`. One step:
//!
//! ```text
//! first step only:  S = (max_i mean(g_i⁴) + damping⁴)^(−1/8)   over the group (unless init_scale)
//!                   Q_k = S^(1/d)·I, L_k = 0
//! p ← p·(1 − lr·λ)                                 decoupled decay (0 by default; not in KronWhiten)
//! β = min(c/(1 + c), momentum), c = earlier steps; m ← β·m + (1 − β)·g     if 0 < momentum
//! u ~ U[0, 1) (float32), update = u < p_update      drawn every step, once per group
//! w = g if whiten_grad else m;  x = m if momentum > 0 else g
//! update and update_preconditioner_first:   Q_UPDATE(w)
//! h = P·x                                          Q applied first, Qᵀ second, in every mode
//! update and not update_preconditioner_first: Q_UPDATE(w)
//! h ← h·c1/rms(h) if rms(h) > c1;  h ← clamp(h, −c2, c2);  p ← p − lr·h     (c1, c2) = clip amps
//! ```
//!
//! `Q_UPDATE(w)`, every factor from the same `y`, formed with the old factors:
//!
//! ```text
//! y = P·(w + (damping + ε·|w|)·z)                   z ~ N(0, I), ε = the dtype's epsilon
//! for k in dim order:  τ = N/n_k
//!   dense:  T = Unfold_k(y)·Unfold_k(y)ᵀ;  ℓ = ‖T‖_lb + τ
//!           L_k = max(β_L·L_k + (1 − β_L)·ℓ, ℓ);  Q_k ← Q_k − (μ/L_k)(T·Q_k − τ·Q_k)
//!           Procrustes step: R = (Q_kᵀ − Q_k)/‖·‖_lb, a = min(−tr(RQ)/tr(RRQ), 1/8) if
//!           tr(RRQ) < 0 else 1/8;  Q_k ← Q_k + a·(RQ + a/2·RRQ)
//!   diag:   t = Σ_other y²;  ℓ = max t + τ;  same L_k;  q_k ← q_k·(1 − (μ/L_k)(t − τ))
//! b ~ U[0, 1): if b < 0.01 rescale the factors to equal max-magnitudes (P unchanged)
//! ```
//!
//! `‖·‖_lb` is the reference's randomized lower bound of the spectral norm: scale by the largest
//! diagonal entry (symmetric case) or entry magnitude (skew case) plus the smallest normal
//! number, align 32 random probes with the largest row, two rounds of `V ← VA`, row
//! normalization, `V ← VA`, and the largest row norm. Its probes, the damping noise and the two
//! uniforms are the only random inputs.
//!
//! Random inputs. By default they come from a counter-based generator keyed by `seed`, the
//! parameter's name and a counter kept in the state, so a resumed run draws the same numbers.
//! Recorded draws replace them for one step through
//! [`ExtraInput::RandomDraws`](crate::optim::ExtraInput): per parameter one vector
//! `[u]` (no preconditioner update) or `[u, z (N), spd probes, skh probes, b]`, the probes being
//! the 32 × n_k blocks (row-major) of the dense factors in dim order, for the norm bound of `T`
//! and of `Q_kᵀ − Q_k` respectively.
//!
//! Conventions: `momentum` outside (0, 1) means none, the momentum warm-up is a running mean
//! with no bias correction, and with momentum it is the momentum that is preconditioned even
//! when the gradient is whitened. The update decision and the on-the-fly scale are per group
//! (the reference has one group). There is no weight decay in the reference class (its
//! torch.optim wrapper `KWNS4` applies `weight_decay` this way).
//!
//! Defaults are the reference's: lr_params 1e-3, lr_preconditioner 0.1, betaL 0.9, damping 1e-9,
//! momentum 0, grad_clip_max_amps (2, 10), update probability 1, update first, whiten the
//! gradient, max_size ∞, max_skew 1, init scale on the fly. Reference: lixilinx/psgd_torch
//! `psgd.py` (`KronWhiten`, `update_precond_kron_whiten_q0p5eq1p5`) @
//! a8616f1d802136159793419ed382cd2ba8fb91dd. Only this geometry is implemented (`dQ` must be
//! `"Q0.5EQ1.5"`). The factor arithmetic runs on the host in the parameter's dtype
//! (docs/cuda.md).

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Error, Result};
use crate::optim::config::RuleConfig;
use crate::optim::fused::{exactly, exactly_mut, vectorized, zip_mut, Float};
use crate::optim::params::ParamMeta;
use crate::optim::rule::{ExtraInput, Rule, StepCtx};
use crate::optim::state::State;
use crate::with_float;

/// The only geometry implemented.
pub const GEOMETRY: &str = "Q0.5EQ1.5";

/// PSGD Kron hyperparameters (the reference's names and defaults, plus `weight_decay` and `seed`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PsgdKronConfig {
    /// Parameter step size (the update is normalized: about the per-element step).
    pub lr_params: f64,
    /// Preconditioner step size μ (normalized; meaningful in (0, 1]).
    pub lr_preconditioner: f64,
    /// EMA factor of the Lipschitz estimates.
    #[serde(rename = "betaL")]
    pub beta_l: f64,
    /// Noise floor added to the whitened tensor.
    pub damping: f64,
    /// Gradient EMA factor (none unless in (0, 1)).
    pub momentum: f64,
    /// (max RMS, max element magnitude) of the preconditioned update.
    pub grad_clip_max_amps: (f64, f64),
    /// Probability of a preconditioner update per step.
    pub preconditioner_update_probability: f64,
    /// Update the preconditioner before preconditioning this step's gradient.
    pub update_preconditioner_first: bool,
    /// Fit the preconditioner to the gradient (else to the momentum).
    pub whiten_grad: bool,
    /// Dims larger than this get a diagonal factor (none: no limit).
    pub preconditioner_max_size: Option<f64>,
    /// Dims with `n² > max_skew·numel` get a diagonal factor.
    pub preconditioner_max_skew: f64,
    /// Initial scale S (`P₀ = S²·I`); none: set from the first gradients.
    pub preconditioner_init_scale: Option<f64>,
    /// Geometry of the Q update; only `"Q0.5EQ1.5"`.
    #[serde(rename = "dQ")]
    pub dq: String,
    /// Decoupled weight decay (`p ← p·(1 − lr·λ)` before the step); not in the reference class.
    pub weight_decay: f64,
    /// Seed of the random draws.
    pub seed: u64,
}

impl Default for PsgdKronConfig {
    fn default() -> Self {
        Self {
            lr_params: 1e-3,
            lr_preconditioner: 0.1,
            beta_l: 0.9,
            damping: 1e-9,
            momentum: 0.0,
            grad_clip_max_amps: (2.0, 10.0),
            preconditioner_update_probability: 1.0,
            update_preconditioner_first: true,
            whiten_grad: true,
            preconditioner_max_size: None,
            preconditioner_max_skew: 1.0,
            preconditioner_init_scale: None,
            dq: GEOMETRY.into(),
            weight_decay: 0.0,
            seed: 0,
        }
    }
}

impl RuleConfig for PsgdKronConfig {
    const NAME: &'static str = "psgd_kron";

    fn validate(&self) -> Result<()> {
        check::non_negative("psgd_kron.lr_params", self.lr_params)?;
        check::non_negative("psgd_kron.lr_preconditioner", self.lr_preconditioner)?;
        check::unit_interval("psgd_kron.betaL", self.beta_l)?;
        check::non_negative("psgd_kron.damping", self.damping)?;
        check::unit_interval("psgd_kron.momentum", self.momentum)?;
        check::positive("psgd_kron.grad_clip_max_amps[0]", self.grad_clip_max_amps.0)?;
        check::positive("psgd_kron.grad_clip_max_amps[1]", self.grad_clip_max_amps.1)?;
        check::closed_unit_interval(
            "psgd_kron.preconditioner_update_probability",
            self.preconditioner_update_probability,
        )?;
        if let Some(m) = self.preconditioner_max_size {
            check::non_negative("psgd_kron.preconditioner_max_size", m)?;
        }
        check::non_negative(
            "psgd_kron.preconditioner_max_skew",
            self.preconditioner_max_skew,
        )?;
        if let Some(s) = self.preconditioner_init_scale {
            check::positive("psgd_kron.preconditioner_init_scale", s)?;
        }
        check::non_negative("psgd_kron.weight_decay", self.weight_decay)?;
        if self.dq != GEOMETRY {
            return Err(Error::config(
                "psgd_kron.dQ",
                format!("only \"{GEOMETRY}\" is implemented, got \"{}\"", self.dq),
            ));
        }
        if !self.whiten_grad && self.momentum == 0.0 {
            return Err(Error::config(
                "psgd_kron.whiten_grad",
                "whitening the momentum (false) needs momentum > 0",
            ));
        }
        Ok(())
    }
    fn lr(&self) -> f64 {
        self.lr_params
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr_params = lr;
    }
    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }
    fn set_weight_decay(&mut self, wd: f64) {
        self.weight_decay = wd;
    }
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(PsgdKron(self.clone())))
    }
}

/// The PSGD Kron rule.
#[derive(Debug, Clone)]
pub struct PsgdKron(pub PsgdKronConfig);

/// Probes per randomized norm bound.
const PROBES: usize = 32;
/// Largest Procrustes step.
const PROCRUSTES_MAX_STEP: f64 = 0.125;
/// Probability of re-balancing the factors after an update.
const BALANCE_PROBABILITY: f64 = 0.01;
/// Stream of the per-group update decision (parameters use a hash of their name).
const GROUP_STREAM: u64 = 0x7073_6764_5f75_7064;

// ------------------------------------------------------------------------------------------
// Random draws.

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn stream_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A counter-based generator: draw `i` of a stream is a pure function of (seed, stream, i).
struct Rng {
    key: u64,
    counter: u64,
}

impl Rng {
    fn new(seed: u64, stream: u64, counter: u64) -> Self {
        Self {
            key: mix(seed ^ mix(stream)),
            counter,
        }
    }
    fn bits(&mut self) -> u64 {
        let b = mix(self.key ^ mix(self.counter));
        self.counter += 1;
        b
    }
    /// A float32 uniform in [0, 1) (24 random bits), as the reference's `torch.rand`.
    fn uniform_f32(&mut self) -> f64 {
        (self.bits() >> 40) as f64 * (1.0 / (1u64 << 24) as f64)
    }
    /// A standard normal (Box–Muller on two 53-bit uniforms).
    fn normal(&mut self) -> f64 {
        let u1 = ((self.bits() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64);
        let u2 = (self.bits() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Everything one preconditioner update consumes.
struct UpdateDraws<T> {
    noise: Vec<T>,
    spd: Vec<T>,
    skh: Vec<T>,
    balance_u: f64,
}

// ------------------------------------------------------------------------------------------
// Host tensor algebra over a row-major tensor of shape `dims`, mode k viewed as (outer, n, inner).

fn split(dims: &[usize], k: usize) -> (usize, usize, usize) {
    let outer = dims[..k].iter().product();
    let inner = dims[k + 1..].iter().product();
    (outer, dims[k], inner)
}

/// `x ×_k M` (or `x ×_k Mᵀ`): `y[a, i, b] = Σ_j M[i, j]·x[a, j, b]`.
fn mode_product<T: Float>(x: &[T], dims: &[usize], k: usize, m: &[T], transpose: bool) -> Vec<T> {
    let (outer, n, inner) = split(dims, k);
    let mut y = vec![T::zero(); x.len()];
    for a in 0..outer {
        let base = a * n * inner;
        for i in 0..n {
            let yi = &mut y[base + i * inner..base + (i + 1) * inner];
            for j in 0..n {
                let c = if transpose {
                    m[j * n + i]
                } else {
                    m[i * n + j]
                };
                let xj = &x[base + j * inner..base + (j + 1) * inner];
                let yi = &mut *yi;
                vectorized! {
                    for (y, &x) in yi.iter_mut().zip(xj) {
                        *y += c * x;
                    }
                }
            }
        }
    }
    y
}

/// `x ×_k diag(q)`.
fn mode_scale<T: Float>(x: &mut [T], dims: &[usize], k: usize, q: &[T]) {
    let (outer, n, inner) = split(dims, k);
    for a in 0..outer {
        for (i, &c) in q.iter().enumerate().take(n) {
            let start = (a * n + i) * inner;
            let xi = &mut x[start..start + inner];
            vectorized! {
                for x in xi.iter_mut() {
                    *x *= c;
                }
            }
        }
    }
}

/// `Unfold_k(y)·Unfold_k(y)ᵀ` (exactly symmetric).
fn mode_gram<T: Float>(y: &[T], dims: &[usize], k: usize) -> Vec<T> {
    let (outer, n, inner) = split(dims, k);
    let mut g = vec![T::zero(); n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = T::zero();
            for a in 0..outer {
                let base = a * n * inner;
                let yi = &y[base + i * inner..base + (i + 1) * inner];
                let yj = &y[base + j * inner..base + (j + 1) * inner];
                s += vectorized! {
                    yi.iter().zip(yj).fold(T::zero(), |s, (&a, &b)| s + a * b)
                };
            }
            g[i * n + j] = s;
            g[j * n + i] = s;
        }
    }
    g
}

/// Σ over the other dims of `y²`, per index of mode k.
fn mode_sq_sums<T: Float>(y: &[T], dims: &[usize], k: usize) -> Vec<T> {
    let (outer, n, inner) = split(dims, k);
    let mut t = vec![T::zero(); n];
    for a in 0..outer {
        for (i, t) in t.iter_mut().enumerate() {
            let start = (a * n + i) * inner;
            let yi = &y[start..start + inner];
            *t += vectorized! { yi.iter().fold(T::zero(), |s, &v| s + v * v) };
        }
    }
    t
}

/// `A·B` for `n × n` matrices (`a` may be `k × n`: rows of the result = rows of `a`).
fn matmul<T: Float>(a: &[T], b: &[T], n: usize) -> Vec<T> {
    let rows = a.len() / n;
    let mut c = vec![T::zero(); rows * n];
    for r in 0..rows {
        let cr = &mut c[r * n..(r + 1) * n];
        for j in 0..n {
            let x = a[r * n + j];
            let bj = &b[j * n..(j + 1) * n];
            let cr = &mut *cr;
            vectorized! {
                for (c, &b) in cr.iter_mut().zip(bj) {
                    *c += x * b;
                }
            }
        }
    }
    c
}

fn fmax<T: Float>(a: T, b: T) -> T {
    num_traits::Float::max(a, b)
}

fn fmin<T: Float>(a: T, b: T) -> T {
    num_traits::Float::min(a, b)
}

fn row_norm<T: Float>(r: &[T]) -> T {
    r.iter().fold(T::zero(), |s, &x| s + x * x).sqrt()
}

/// The reference's randomized lower bound of `‖A‖₂` (`spd`: A symmetric PSD, scaled by its
/// largest diagonal entry; else skew, scaled by its largest entry magnitude). `v`: 32 × n probes.
fn norm_lower_bound<T: Float>(a: &[T], n: usize, v: &[T], spd: bool) -> T {
    let tiny = T::min_positive_value();
    let s = if spd {
        (0..n).map(|i| a[i * n + i]).fold(T::neg_infinity(), fmax) + tiny
    } else {
        a.iter().map(|x| x.abs()).fold(T::zero(), fmax) + tiny
    };
    let a: Vec<T> = a.iter().map(|&x| x / s).collect();
    let mut j = 0;
    let mut best = T::neg_infinity();
    for i in 0..n {
        let r = row_norm(&a[i * n..(i + 1) * n]);
        if r > best {
            best = r;
            j = i;
        }
    }
    let aj = &a[j * n..(j + 1) * n];
    let mut v = v.to_vec();
    for row in v.chunks_mut(n) {
        let d = aj
            .iter()
            .zip(row.iter())
            .fold(T::zero(), |s, (&x, &y)| s + x * y);
        let sgn = if d > T::zero() {
            T::one()
        } else if d < T::zero() {
            -T::one()
        } else {
            T::zero()
        };
        for (x, &y) in row.iter_mut().zip(aj) {
            *x = y + sgn * *x;
        }
    }
    for _ in 0..2 {
        v = matmul(&v, &a, n);
        for row in v.chunks_mut(n) {
            let d = row_norm(row) + tiny;
            for x in row.iter_mut() {
                *x /= d;
            }
        }
        v = matmul(&v, &a, n);
    }
    s * v.chunks(n).map(row_norm).fold(T::zero(), fmax)
}

/// One Procrustes step of `Q` toward symmetry (`w`: probes of the skew norm bound).
fn procrustes<T: Float>(q: &mut [T], n: usize, w: &[T]) {
    let tiny = T::min_positive_value();
    let mut r = vec![T::zero(); n * n];
    for i in 0..n {
        for j in 0..n {
            r[i * n + j] = q[j * n + i] - q[i * n + j];
        }
    }
    let scale = norm_lower_bound(&r, n, w, false) + tiny;
    for x in r.iter_mut() {
        *x /= scale;
    }
    let rq = matmul(&r, q, n);
    let rrq = matmul(&r, &rq, n);
    let trace = |m: &[T]| (0..n).fold(T::zero(), |s, i| s + m[i * n + i]);
    let (t1, t2) = (trace(&rq), trace(&rrq));
    let cap = T::of(PROCRUSTES_MAX_STEP);
    let a = if t2 < T::zero() {
        fmin(-t1 / t2, cap)
    } else {
        cap
    };
    let half = a / T::of(2.0);
    for ((q, &rq), &rrq) in q.iter_mut().zip(&rq).zip(&rrq) {
        *q += a * (rq + half * rrq);
    }
}

/// Per-parameter factor structure on the squeezed shape.
struct Structure {
    dims: Vec<usize>,
    dense: Vec<bool>,
}

impl PsgdKron {
    fn structure(&self, meta: &ParamMeta) -> Structure {
        let mut dims: Vec<usize> = meta.shape.iter().copied().filter(|&n| n != 1).collect();
        let numel: usize = dims.iter().product();
        let max_size = self.0.preconditioner_max_size.unwrap_or(f64::INFINITY);
        let dense = dims
            .iter()
            .map(|&n| {
                let nf = n as f64;
                !(n <= 1
                    || nf > max_size
                    || nf * nf > self.0.preconditioner_max_skew * numel as f64)
            })
            .collect();
        if dims.is_empty() {
            // A scalar (or all-1) parameter: one scalar factor.
            dims.push(numel.max(1));
            return Structure {
                dims,
                dense: vec![false],
            };
        }
        Structure { dims, dense }
    }

    /// Values `[u, z, spd, skh, b]` needed by an update of this structure, past `u`.
    fn update_draw_count(st: &Structure) -> usize {
        let numel: usize = st.dims.iter().product();
        let probes: usize = st
            .dims
            .iter()
            .zip(&st.dense)
            .filter(|(_, &d)| d)
            .map(|(&n, _)| PROBES * n)
            .sum();
        numel + 2 * probes + 1
    }

    fn q_update<T: Float>(
        &self,
        st: &Structure,
        factors: &mut [Vec<T>],
        lips: &mut [f64],
        w: &[T],
        draws: &UpdateDraws<T>,
    ) {
        let c = &self.0;
        let numel = w.len();
        let (damping, eps) = (T::of(c.damping), T::epsilon());
        let mut y: Vec<T> = w
            .iter()
            .zip(&draws.noise)
            .map(|(&w, &z)| w + (damping + eps * w.abs()) * z)
            .collect();
        y = self.apply_p(st, factors, y);
        let (beta, mu) = (T::of(c.beta_l), T::of(c.lr_preconditioner));
        let mut offset = 0;
        for k in 0..st.dims.len() {
            let n = st.dims[k];
            let tau = T::of((numel / n) as f64);
            let lip = T::of(lips[k]);
            let q = &mut factors[k];
            if st.dense[k] {
                let probes = PROBES * n;
                let t = mode_gram(&y, &st.dims, k);
                let ell = norm_lower_bound(&t, n, &draws.spd[offset..offset + probes], true) + tau;
                let lip = fmax(beta * lip + (T::one() - beta) * ell, ell);
                lips[k] = lip.f64();
                let step = mu / lip;
                let tq = matmul(&t, q, n);
                for (q, &tq) in q.iter_mut().zip(&tq) {
                    *q -= step * (tq - tau * *q);
                }
                procrustes(q, n, &draws.skh[offset..offset + probes]);
                offset += probes;
            } else {
                let t = mode_sq_sums(&y, &st.dims, k);
                let ell = t.iter().copied().fold(T::neg_infinity(), fmax) + tau;
                let lip = fmax(beta * lip + (T::one() - beta) * ell, ell);
                lips[k] = lip.f64();
                let step = mu / lip;
                for (q, &t) in q.iter_mut().zip(&t) {
                    *q *= T::one() - step * (t - tau);
                }
            }
        }
        if draws.balance_u < BALANCE_PROBABILITY && factors.len() > 1 {
            let maxes: Vec<T> = factors
                .iter()
                .map(|f| f.iter().map(|x| x.abs()).fold(T::zero(), fmax))
                .collect();
            let d = T::of(factors.len() as f64);
            let g = maxes
                .iter()
                .fold(T::one(), |p, &m| p * m)
                .powf(T::one() / d);
            for (f, &m) in factors.iter_mut().zip(&maxes) {
                let r = g / m;
                for x in f.iter_mut() {
                    *x *= r;
                }
            }
        }
    }

    /// `P·x`: per mode, Q first, then Qᵀ.
    fn apply_p<T: Float>(&self, st: &Structure, factors: &[Vec<T>], mut x: Vec<T>) -> Vec<T> {
        for (k, q) in factors.iter().enumerate() {
            if st.dense[k] {
                x = mode_product(&x, &st.dims, k, q, false);
                x = mode_product(&x, &st.dims, k, q, true);
            } else {
                mode_scale(&mut x, &st.dims, k, q);
                mode_scale(&mut x, &st.dims, k, q);
            }
        }
        x
    }

    #[allow(clippy::too_many_arguments)]
    fn step_typed<T: Float>(
        &self,
        ctx: &StepCtx<'_>,
        meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        state: &mut State,
        recorded: Option<Tensor>,
    ) -> Result<()> {
        let c = &self.0;
        let st = self.structure(meta);
        let numel: usize = st.dims.iter().product();
        let device = param.device().clone();
        let dtype = param.dtype();
        // Factors: created at the first update from the group's scale.
        if !state.tensors.contains_key("q0") {
            let s = match c.preconditioner_init_scale {
                Some(s) => s,
                None => *ctx.group.scalars.get("init_scale").ok_or_else(|| {
                    Error::Msg(format!(
                        "psgd_kron: no initial scale for `{}` (the group's first step sets it)",
                        meta.name
                    ))
                })?,
            };
            let root = s.powf(1.0 / st.dims.len() as f64);
            for (k, (&n, &dense)) in st.dims.iter().zip(&st.dense).enumerate() {
                let q = if dense {
                    (Tensor::eye(n, dtype, &device)? * root)?
                } else {
                    (Tensor::ones(n, dtype, &device)? * root)?
                };
                state.tensors.insert(format!("q{k}"), q);
                state.set_scalar(&format!("lipschitz{k}"), 0.0);
            }
        }
        let earlier = state.next_step() - 1;
        let with_momentum = c.momentum > 0.0 && c.momentum < 1.0;

        // Decoupled decay, then the momentum (running mean until it reaches `momentum`).
        let decay = T::of(1.0 - ctx.lr * ctx.weight_decay);
        if ctx.weight_decay != 0.0 {
            zip_mut::<T>(&[param.as_tensor()], &[], |o, _| {
                let p = &mut *o[0];
                vectorized! {
                    for p in p.iter_mut() {
                        *p *= decay;
                    }
                }
                Ok(())
            })?;
        }
        let g: Vec<T> = grad.flatten_all()?.to_vec1::<T>()?;
        let m: Option<Vec<T>> = if with_momentum {
            let m = state.tensor_or_zeros("momentum", param)?;
            let e = earlier as f64;
            let beta = (e / (1.0 + e)).min(c.momentum);
            let (b, cb) = (T::of(beta), T::of(1.0 - beta));
            zip_mut::<T>(&[m], &[grad], |o, i| {
                let m = &mut *o[0];
                let n = m.len();
                let g = exactly(i[0], n, "grad")?;
                vectorized! {
                    for (m, &g) in m.iter_mut().zip(g) {
                        *m = b * *m + cb * g;
                    }
                }
                Ok(())
            })?;
            Some(m.flatten_all()?.to_vec1::<T>()?)
        } else {
            None
        };

        // The random inputs of this step.
        let counter = state.scalar("rng_counter") as u64;
        let mut rng = Rng::new(c.seed, stream_of(&meta.name), counter);
        let tape: Option<Vec<f64>> = match recorded {
            Some(t) => Some(t.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?),
            None => None,
        };
        let u = match &tape {
            Some(t) => *t.first().ok_or_else(|| {
                Error::Msg(format!(
                    "psgd_kron: recorded draws for `{}` are empty",
                    meta.name
                ))
            })?,
            None => ctx.group.scalar("update_u"),
        };
        let update = (u as f32) < (c.preconditioner_update_probability as f32);
        let draws = if update {
            let need = Self::update_draw_count(&st);
            let probes = (need - numel - 1) / 2;
            Some(match &tape {
                Some(t) => {
                    if t.len() != need + 1 {
                        return Err(Error::Msg(format!(
                            "psgd_kron: recorded draws for `{}` hold {} values; an update step \
                             takes {} ([u, noise ({numel}), spd probes ({probes}), skh probes \
                             ({probes}), balance u])",
                            meta.name,
                            t.len(),
                            need + 1
                        )));
                    }
                    let of = |r: &[f64]| r.iter().map(|&x| T::of(x)).collect::<Vec<T>>();
                    UpdateDraws {
                        noise: of(&t[1..1 + numel]),
                        spd: of(&t[1 + numel..1 + numel + probes]),
                        skh: of(&t[1 + numel + probes..need]),
                        balance_u: t[need],
                    }
                }
                None => {
                    let mut normals = |k: usize| (0..k).map(|_| T::of(rng.normal())).collect();
                    let noise = normals(numel);
                    let spd = normals(probes);
                    let skh = normals(probes);
                    UpdateDraws {
                        noise,
                        spd,
                        skh,
                        balance_u: rng.uniform_f32(),
                    }
                }
            })
        } else {
            if let Some(t) = &tape {
                if t.len() != 1 {
                    return Err(Error::Msg(format!(
                        "psgd_kron: recorded draws for `{}` hold {} values; a step without a \
                         preconditioner update (u = {u} ≥ {}) takes 1",
                        meta.name,
                        t.len(),
                        c.preconditioner_update_probability
                    )));
                }
            }
            None
        };
        state.set_scalar("rng_counter", rng.counter as f64);

        let mut factors: Vec<Vec<T>> = (0..st.dims.len())
            .map(|k| -> Result<Vec<T>> {
                Ok(state
                    .tensor(&format!("q{k}"))?
                    .flatten_all()?
                    .to_vec1::<T>()?)
            })
            .collect::<Result<_>>()?;
        let mut lips: Vec<f64> = (0..st.dims.len())
            .map(|k| state.scalar(&format!("lipschitz{k}")))
            .collect();
        let w = if c.whiten_grad {
            &g
        } else {
            m.as_ref().unwrap_or(&g)
        };
        let x = m.as_ref().unwrap_or(&g);
        if let (Some(d), true) = (&draws, c.update_preconditioner_first) {
            self.q_update(&st, &mut factors, &mut lips, w, d);
        }
        let mut h = self.apply_p(&st, &factors, x.clone());
        if let (Some(d), false) = (&draws, c.update_preconditioner_first) {
            self.q_update(&st, &mut factors, &mut lips, w, d);
        }
        for (k, (f, l)) in factors.into_iter().zip(lips).enumerate() {
            let shape = state.tensor(&format!("q{k}"))?.dims().to_vec();
            state
                .tensors
                .insert(format!("q{k}"), Tensor::from_vec(f, shape, &device)?);
            state.set_scalar(&format!("lipschitz{k}"), l);
        }

        // Clip (RMS, then elementwise) and step.
        let (c1, c2) = (T::of(c.grad_clip_max_amps.0), T::of(c.grad_clip_max_amps.1));
        let n = h.len();
        let rms = (h.iter().fold(T::zero(), |s, &x| s + x * x) / T::of(n as f64)).sqrt();
        let scale = if rms > c1 { c1 / rms } else { T::one() };
        let neg_lr = T::of(-ctx.lr);
        {
            let h = exactly_mut(&mut h, n, "update")?;
            vectorized! {
                for h in h.iter_mut() {
                    if scale != T::one() {
                        *h *= scale;
                    }
                    *h = fmin(fmax(*h, -c2), c2);
                }
            }
        }
        zip_mut::<T>(&[param.as_tensor()], &[], |o, _| {
            let p = exactly_mut(&mut *o[0], n, "param")?;
            let h = exactly(&h, n, "update")?;
            vectorized! {
                for (p, &h) in p.iter_mut().zip(h) {
                    *p += neg_lr * h;
                }
            }
            Ok(())
        })
    }
}

impl Rule for PsgdKron {
    fn name(&self) -> &'static str {
        PsgdKronConfig::NAME
    }

    fn begin_step(&self, _lr: f64, group: &mut State) -> Result<()> {
        // One update decision per step for the whole group, drawn every step.
        let counter = group.scalar("update_draws") as u64;
        let mut rng = Rng::new(self.0.seed, GROUP_STREAM, counter);
        group.set_scalar("update_u", rng.uniform_f32());
        group.set_scalar("update_draws", rng.counter as f64);
        Ok(())
    }

    fn begin_step_grads(&self, grads: &[&Tensor], group: &mut State) -> Result<()> {
        if group.scalars.contains_key("init_scale") || grads.is_empty() {
            return Ok(());
        }
        let s = match self.0.preconditioner_init_scale {
            Some(s) => s,
            None => {
                let mut worst = 0.0f64;
                for g in grads {
                    let m4 = with_float!(g.dtype(), "psgd_kron", T => {
                        let v = g.flatten_all()?.to_vec1::<T>()?;
                        let n = T::of(v.len().max(1) as f64);
                        let s = vectorized! {
                            v.iter().fold(0.0, |s: T, &x| { let x2 = x * x; s + x2 * x2 })
                        };
                        (s / n).f64()
                    });
                    worst = worst.max(m4);
                }
                (worst + self.0.damping.powi(4)).powf(-1.0 / 8.0)
            }
        };
        group.set_scalar("init_scale", s);
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
        let recorded = state.tensors.remove("recorded_draws");
        with_float!(param.dtype(), "psgd_kron", T => {
            self.step_typed::<T>(ctx, meta, param, grad, state, recorded)
        })
    }

    fn observe(
        &self,
        input: ExtraInput,
        meta: &ParamMeta,
        _param: &Var,
        value: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        if input != ExtraInput::RandomDraws {
            return Err(Error::Msg(format!(
                "psgd_kron does not take the extra input {input:?} (it takes RandomDraws)"
            )));
        }
        if value.rank() != 1 {
            return Err(Error::Msg(format!(
                "psgd_kron: recorded draws for `{}` must be one vector, got shape {:?}",
                meta.name,
                value.dims()
            )));
        }
        state.tensors.insert("recorded_draws".into(), value.copy()?);
        Ok(())
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        let st = self.structure(meta);
        for (k, (&n, &dense)) in st.dims.iter().zip(&st.dense).enumerate() {
            let want: Vec<usize> = if dense { vec![n, n] } else { vec![n] };
            crate::optim::rule::expect_state_shape(meta, state, &format!("q{k}"), &want)?;
        }
        crate::optim::rule::expect_state_shape(meta, state, "momentum", &meta.shape)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::{DType, Device};

    use super::*;
    use crate::optim::testing::{self, flat, lcg_from_state};
    use crate::optim::{Driver, OptimConfig, Optimizer};

    const SHAPES: [(&str, &[usize]); 3] = [("b", &[6]), ("s", &[1, 1]), ("w", &[4, 1, 6])];

    fn driver(cfg: PsgdKronConfig) -> Driver {
        testing::driver(OptimConfig::PsgdKron(cfg), &SHAPES, DType::F64, |i, n| {
            lcg_from_state(3 + i, n)
        })
    }

    fn grads(seed: u64) -> BTreeMap<String, Tensor> {
        testing::named(&SHAPES, DType::F64, |i, n| lcg_from_state(seed * 10 + i, n))
    }

    fn meta(shape: &[usize]) -> ParamMeta {
        testing::driver(
            OptimConfig::PsgdKron(PsgdKronConfig::default()),
            &[("x", shape)],
            DType::F64,
            |_, n| vec![0.0; n],
        )
        .params()
        .remove(0)
    }

    #[test]
    fn factor_structure_follows_the_thresholds() {
        let rule = |skew: f64, size: Option<f64>| {
            PsgdKron(PsgdKronConfig {
                preconditioner_max_skew: skew,
                preconditioner_max_size: size,
                ..Default::default()
            })
        };
        let st = rule(1.0, None).structure(&meta(&[8, 12]));
        assert_eq!((st.dims, st.dense), (vec![8, 12], vec![true, false]));
        let st = rule(2.0, None).structure(&meta(&[8, 1, 12]));
        assert_eq!((st.dims, st.dense), (vec![8, 12], vec![true, true]));
        let st = rule(2.0, Some(10.0)).structure(&meta(&[8, 12]));
        assert_eq!(st.dense, vec![true, false]);
        let st = rule(1.0, None).structure(&meta(&[6]));
        assert_eq!(st.dense, vec![false]);
        let st = rule(1.0, None).structure(&meta(&[1, 1]));
        assert_eq!((st.dims, st.dense), (vec![1], vec![false]));
    }

    #[test]
    fn norm_bounds_are_lower_bounds_and_zero_for_zero() {
        let n = 5;
        let mut a = vec![0.0f64; n * n];
        for i in 0..n {
            a[i * n + i] = (i + 1) as f64;
        }
        let v = lcg_from_state(9, PROBES * n);
        let lb = norm_lower_bound(&a, n, &v, true);
        assert!(lb <= 5.0 * (1.0 + 1e-12) && lb > 4.5, "{lb}");
        assert_eq!(norm_lower_bound(&vec![0.0; n * n], n, &v, false), 0.0);
        // A symmetric Q is left as is by the Procrustes step.
        let mut q = a.clone();
        procrustes(&mut q, n, &v);
        assert_eq!(q, a);
    }

    #[test]
    fn seeded_draws_are_deterministic_and_resume_exactly() -> Result<()> {
        let cfg = PsgdKronConfig {
            lr_params: 0.01,
            momentum: 0.9,
            preconditioner_max_skew: 2.0,
            preconditioner_update_probability: 0.6,
            ..Default::default()
        };
        let (mut a, mut b) = (driver(cfg.clone()), driver(cfg.clone()));
        for s in 0..3 {
            a.step_named(&grads(s))?;
            b.step_named(&grads(s))?;
        }
        let mut c = driver(cfg.clone());
        c.load_state_dict(a.state_dict()?)?;
        for ((_, to), (_, from)) in c.vars().iter().zip(a.vars()) {
            to.set(from.as_tensor())?;
        }
        for s in 3..6 {
            a.step_named(&grads(s))?;
            c.step_named(&grads(s))?;
        }
        let values = |o: &Driver| -> Vec<Vec<f64>> {
            o.vars().iter().map(|(_, v)| flat(v.as_tensor())).collect()
        };
        assert_eq!(values(&a), values(&c));
        let mut d = driver(PsgdKronConfig { seed: 1, ..cfg });
        for s in 0..3 {
            d.step_named(&grads(s))?;
        }
        assert_ne!(values(&b), values(&d));
        Ok(())
    }

    #[test]
    fn recorded_draws_are_checked_and_skip_updates() -> Result<()> {
        let mut opt = driver(PsgdKronConfig {
            preconditioner_update_probability: 0.5,
            ..Default::default()
        });
        let tape = |n: usize, u: f64| -> Result<BTreeMap<String, Tensor>> {
            let mut m = BTreeMap::new();
            for (name, _) in SHAPES {
                let mut v = vec![u];
                v.extend(std::iter::repeat_n(0.5, n));
                m.insert(name.to_string(), Tensor::new(v, &Device::Cpu)?);
            }
            Ok(m)
        };
        // u = 0.75 ≥ 0.5: no update, one value per parameter; the factors stay S·I.
        opt.observe_named(ExtraInput::RandomDraws, &tape(0, 0.75)?)?;
        opt.step_named(&grads(1))?;
        let q = flat(opt.param_state("b").unwrap().tensor("q0")?);
        assert!(q.iter().all(|&x| x == q[0]));
        // An update step with too few draws is refused, naming the parameter and the count.
        opt.observe_named(ExtraInput::RandomDraws, &tape(3, 0.25)?)?;
        let err = opt.step_named(&grads(2)).unwrap_err().to_string();
        assert!(err.contains("`b`") && err.contains("takes 8"), "{err}");
        assert!(opt
            .observe_named(ExtraInput::PreviousGrad, &grads(3))
            .is_err());
        Ok(())
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |cfg: PsgdKronConfig, field: &str| {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        };
        bad(
            PsgdKronConfig {
                dq: "QEP".into(),
                ..Default::default()
            },
            "psgd_kron.dQ",
        );
        bad(
            PsgdKronConfig {
                whiten_grad: false,
                ..Default::default()
            },
            "psgd_kron.whiten_grad",
        );
        bad(
            PsgdKronConfig {
                preconditioner_update_probability: 1.5,
                ..Default::default()
            },
            "preconditioner_update_probability",
        );
        bad(
            PsgdKronConfig {
                grad_clip_max_amps: (0.0, 1.0),
                ..Default::default()
            },
            "grad_clip_max_amps[0]",
        );
        let cfg = OptimConfig::from_toml(
            "name = \"psgd_kron\"\nbetaL = 0.95\ndQ = \"Q0.5EQ1.5\"\npreconditioner_init_scale = 2.0",
        )
        .unwrap();
        let OptimConfig::PsgdKron(c) = cfg else {
            panic!("not psgd_kron")
        };
        assert_eq!((c.beta_l, c.preconditioner_init_scale), (0.95, Some(2.0)));
    }
}
