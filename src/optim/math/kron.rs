//! Kronecker-factored preconditioning shared by SOAP and Shampoo.
//!
//! A parameter of any rank is seen through a [`KronLayout`]: its shape, optionally merged
//! ([`merge_dims`]) and, for 4-D channels-last tensors, permuted, gives the *view* whose modes
//! carry one factor each (a mode larger than the size limit carries none and stays unrotated).
//! On that view this module provides
//!
//! * factor statistics: the mode-k Gram matrix `G_(k) G_(k)ᵀ` ([`mode_gram`]) folded into a
//!   per-mode factor by an EMA ([`FactorEma`], [`accumulate_factors`]);
//! * mode-k projection of a tensor by a list of per-mode matrices, `None` leaving a mode
//!   unrotated ([`mode_products`]), e.g. SOAP's rotation into and out of the eigenbasis or
//!   Shampoo's `G ×_1 P_1 ×_2 P_2 …`;
//! * the refresh machinery: a schedule ([`Refresh`]), the initial eigenbasis ([`eigenbasis`]),
//!   one power-iteration/QR step with the Rayleigh-quotient sort ([`power_iteration_qr`]) and the
//!   matching permutation of elementwise statistics ([`permute_mode`]);
//! * blocking of large parameters into independent sub-tensors ([`Blocks`]).
//!
//! Factors live in the optimizer [`State`] as `<prefix>.<k>` (e.g. `GG.0`, `Q.1`), one tensor
//! per preconditioned mode `k` of the view, so they are saved and loaded like any other state.

use std::ops::Range;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::linalg::{self, Order, Robust};
use crate::optim::fused::{exactly, vectorized, zip_mut_or_kernel, Float, Kernel};
use crate::optim::state::State;
use crate::with_float;

/// SOAP's `merge_dims`: greedy, left to right, multiply adjacent sizes while the product stays
/// at most `max_precond_dim`.
///
/// A size that would overflow the running product closes it (if it is larger than 1) and starts
/// a new one; a size that alone exceeds the limit after a trivial product is emitted on its own.
/// Size-1 dims are absorbed. Examples: `(2,3,4,5)` with 12 → `[6,4,5]`; with 10000 → `[120]`;
/// `(6,4,3,3)` with 12 → `[6,12,3]`; `(1,50)` → `[50]`; `()` → `[1]`.
pub fn merge_dims(shape: &[usize], max_precond_dim: usize) -> Vec<usize> {
    let mut merged = Vec::new();
    let mut cur = 1usize;
    for &s in shape {
        if cur.saturating_mul(s) > max_precond_dim {
            if cur > 1 {
                merged.push(cur);
                cur = s;
            } else {
                merged.push(s);
                cur = 1;
            }
        } else {
            cur *= s;
        }
    }
    if cur > 1 || merged.is_empty() {
        merged.push(cur);
    }
    merged
}

/// How a parameter is seen by its Kronecker factors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KronLayout {
    shape: Vec<usize>,
    channels_last: bool,
    dims: Vec<usize>,
    preconditioned: Vec<bool>,
}

impl KronLayout {
    /// A layout over `shape` with view `dims` (same number of elements) and one flag per view
    /// dim saying whether it carries a factor. With `channels_last` (4-D `shape` only), the
    /// tensor is permuted `(0,3,1,2)` (NHWC → NCHW) before being reshaped to `dims`.
    pub fn new(
        shape: &[usize],
        dims: Vec<usize>,
        preconditioned: Vec<bool>,
        channels_last: bool,
    ) -> Result<Self> {
        let numel = |s: &[usize]| s.iter().product::<usize>();
        if numel(shape) != numel(&dims) || dims.len() != preconditioned.len() {
            return Err(Error::Msg(format!(
                "Kronecker layout: view {dims:?} does not fit shape {shape:?}"
            )));
        }
        if channels_last && shape.len() != 4 {
            return Err(Error::Msg(format!(
                "Kronecker layout: channels_last needs a 4-D shape, got {shape:?}"
            )));
        }
        Ok(Self {
            shape: shape.to_vec(),
            channels_last,
            dims,
            preconditioned,
        })
    }

    /// Every view dim preconditioned iff its size is at most `max_dim`; no merging.
    pub fn unmerged(shape: &[usize], max_dim: usize) -> Self {
        Self {
            shape: shape.to_vec(),
            channels_last: false,
            dims: shape.to_vec(),
            preconditioned: shape.iter().map(|&d| d <= max_dim).collect(),
        }
    }

    /// The parameter's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The view's dims (one factor slot each).
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// Whether view dim `k` carries a factor.
    pub fn is_preconditioned(&self, k: usize) -> bool {
        self.preconditioned[k]
    }

    /// `(k, d_k)` for every view dim that carries a factor.
    pub fn factor_dims(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.dims
            .iter()
            .enumerate()
            .filter(|(k, _)| self.preconditioned[*k])
            .map(|(k, &d)| (k, d))
    }

    /// Whether no dim carries a factor (the projections are the identity).
    pub fn is_trivial(&self) -> bool {
        !self.preconditioned.iter().any(|&p| p)
    }

    fn permuted_shape(&self) -> Vec<usize> {
        let s = &self.shape;
        vec![s[0], s[3], s[1], s[2]]
    }

    /// A parameter-shaped tensor in the view (contiguous).
    pub fn to_view(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.channels_last {
            x.permute((0, 3, 1, 2))?.contiguous()?
        } else {
            x.contiguous()?
        };
        Ok(x.reshape(self.dims.as_slice())?)
    }

    /// A view-shaped tensor back in the parameter's shape and layout (contiguous).
    pub fn from_view(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        if self.channels_last {
            Ok(x.reshape(self.permuted_shape())?
                .permute((0, 2, 3, 1))?
                .contiguous()?)
        } else {
            Ok(x.reshape(self.shape.as_slice())?)
        }
    }
}

/// `X ×_1 op(M_1) ×_2 op(M_2) … ×_D op(M_D)` for a tensor `X` of any rank `D` and one optional
/// matrix per mode, where `(X ×_k M)[…i…] = Σ_j M[i, j] X[…j…]` and `op(M)` is `M`, or `Mᵀ`
/// with `transpose`. `None` leaves the mode unrotated. A matrix may be rectangular
/// (`d_out×d_k`, or `d_k×d_out` transposed); it is cast to `X`'s dtype if needed.
///
/// SOAP's `project` is `mode_products(X, Q, true)` (`X ×_k Q_kᵀ`), its `project_back`
/// `mode_products(X, Q, false)`; Shampoo's preconditioning is `mode_products(G, P, false)`.
///
/// Each mode costs one matrix product over the whole tensor (contract the leading axis, move
/// the result axis to the end), so after `D` steps the axis order is restored. When no mode has
/// a matrix, `X` is returned as is.
pub fn mode_products(x: &Tensor, mats: &[Option<Tensor>], transpose: bool) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if mats.len() != dims.len() {
        return Err(Error::Msg(format!(
            "mode_products: {} matrices for a tensor of shape {dims:?}",
            mats.len()
        )));
    }
    if mats.iter().all(Option::is_none) {
        return Ok(x.clone());
    }
    let mut cur = x.contiguous()?;
    let mut cur_dims = dims.clone();
    for (k, m) in mats.iter().enumerate() {
        let d = cur_dims[0];
        let rest: usize = cur_dims[1..].iter().product();
        let unfolded = cur.reshape((d, rest))?.t()?; // (rest, d_k), a transposed view
        let (next, d_out) = match m {
            None => (unfolded.contiguous()?, d),
            Some(m) => {
                let m = if m.dtype() == x.dtype() {
                    m.clone()
                } else {
                    m.to_dtype(x.dtype())?
                };
                // (X ×_k op(M)) unfolded = X_(k)ᵀ · op(M)ᵀ ; op(M)ᵀ = Mᵀ (plain) or M (transposed).
                let rhs = if transpose { m } else { m.t()? };
                if rhs.dims()[0] != d {
                    return Err(Error::Msg(format!(
                        "mode_products: matrix {k} has shape {:?}, mode {k} has size {d}",
                        rhs.dims()
                    )));
                }
                let out_d = rhs.dims()[1];
                (unfolded.matmul(&rhs)?, out_d)
            }
        };
        cur_dims.remove(0);
        cur_dims.push(d_out);
        cur = next.reshape(cur_dims.as_slice())?;
    }
    Ok(cur)
}

/// The mode-k Gram matrix `G_(k) G_(k)ᵀ` (`d_k×d_k`) of a tensor of any rank: the contraction of
/// `G` with itself over every axis but `k`. For a vector, `g gᵀ`.
pub fn mode_gram(x: &Tensor, k: usize) -> Result<Tensor> {
    let dims = x.dims();
    if k >= dims.len() {
        return Err(Error::Msg(format!(
            "mode_gram: mode {k} of a tensor of shape {dims:?}"
        )));
    }
    let a: usize = dims[..k].iter().product();
    let d = dims[k];
    let b: usize = dims[k + 1..].iter().product();
    let x = x.contiguous()?;
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        return with_float!(x.dtype(), "mode_gram", T => cpu_mode_gram::<T>(&x, a, d, b));
    }
    Ok(if a == 1 {
        let u = x.reshape((d, b))?;
        u.matmul(&u.t()?)?
    } else if b == 1 {
        let u = x.reshape((a, d))?;
        u.t()?.matmul(&u)?
    } else {
        let u = x
            .reshape((a, d, b))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((d, a * b))?;
        u.matmul(&u.t()?)?
    })
}

/// [`mode_gram`] on the CPU, read in place from `x` (contiguous, viewed as `[a, d, b]`): one
/// symmetric rank-k product ([`linalg::gram_slice`]) over the mode-k unfolding, as a strided
/// view (no permuted copy).
fn cpu_mode_gram<T: linalg::Scalar>(x: &Tensor, a: usize, d: usize, b: usize) -> Result<Tensor> {
    let mut gram = Vec::new();
    crate::float::host_slices::<T>(&[], &[x], |_, i| {
        let data = exactly(i[0], a * d * b, "mode_gram input")?;
        gram = if a == 1 {
            linalg::gram_slice(faer::MatRef::from_row_major_slice(data, d, b))
        } else if b == 1 {
            linalg::gram_slice(faer::MatRef::from_row_major_slice(data, a, d).transpose())
        } else {
            // Row i of the unfolding is x[·, i, ·]: a×b elements, gathered once (faer views
            // have two strides, the unfolding needs three).
            let mut u = Vec::with_capacity(d * a * b);
            for i in 0..d {
                for r in 0..a {
                    u.extend_from_slice(&data[(r * d + i) * b..(r * d + i + 1) * b]);
                }
            }
            linalg::gram_slice(faer::MatRef::from_row_major_slice(&u, d, a * b))
        };
        Ok(())
    })?;
    Ok(Tensor::from_vec(gram, (d, d), x.device())?)
}

/// How a factor folds in a new Gram matrix `S`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FactorEma {
    /// `F ← lerp(F, S, weight)`, with torch's `lerp_` rounding (`F + w(S − F)` for `w < 0.5`,
    /// else `S − (S − F)(1 − w)`). SOAP: `weight = 1 − shampoo_beta`.
    Lerp {
        /// Interpolation weight.
        weight: f64,
    },
    /// `F ← decay·F + weight·S` (the `decay·F` product skipped when `decay == 1`). Shampoo:
    /// `decay = β2`, `weight = 1 − β2` (or 1).
    ScaleAdd {
        /// Factor on the old value.
        decay: f64,
        /// Factor on the new statistic.
        weight: f64,
    },
}

/// Folds `stat` into `factor` in place (same shape; `stat` is cast to the factor's dtype).
pub fn ema_update(factor: &Tensor, stat: &Tensor, ema: FactorEma) -> Result<()> {
    if factor.dims() != stat.dims() {
        return Err(Error::Msg(format!(
            "factor update: factor {:?} vs statistic {:?}",
            factor.dims(),
            stat.dims()
        )));
    }
    let stat = if stat.dtype() == factor.dtype() {
        stat.contiguous()?
    } else {
        stat.to_dtype(factor.dtype())?.contiguous()?
    };
    with_float!(factor.dtype(), "factor update", T => {
        // The kernel's (x, y, form), chosen exactly as the branches below choose.
        let scalars: [T; 3] = match ema {
            FactorEma::Lerp { weight } if weight < 0.5 => [T::of(weight), T::of(0.0), T::of(0.0)],
            FactorEma::Lerp { weight } => [T::of(1.0 - weight), T::of(0.0), T::of(1.0)],
            FactorEma::ScaleAdd { decay: 1.0, weight } => [T::of(weight), T::of(1.0), T::of(2.0)],
            FactorEma::ScaleAdd { decay, weight } => [T::of(weight), T::of(decay), T::of(3.0)],
        };
        let kernel = Kernel::new("factor_ema", &scalars);
        zip_mut_or_kernel::<T>(kernel, &[factor], &[&stat], move |o, i| {
            let f = &mut *o[0];
            let s = exactly(i[0], f.len(), "statistic")?;
            vectorized! {
                match ema {
                    FactorEma::Lerp { weight } => {
                        let w = T::of(weight);
                        if weight < 0.5 {
                            for (f, &s) in f.iter_mut().zip(s) {
                                *f = *f + w * (s - *f);
                            }
                        } else {
                            let c = T::of(1.0 - weight);
                            for (f, &s) in f.iter_mut().zip(s) {
                                *f = s - (s - *f) * c;
                            }
                        }
                    }
                    FactorEma::ScaleAdd { decay, weight } => {
                        let (b, w) = (T::of(decay), T::of(weight));
                        if decay == 1.0 {
                            for (f, &s) in f.iter_mut().zip(s) {
                                *f += w * s;
                            }
                        } else {
                            for (f, &s) in f.iter_mut().zip(s) {
                                *f = b * *f + w * s;
                            }
                        }
                    }
                }
            }
            Ok(())
        })
    })
}

/// The state field of mode `k`'s matrix in family `prefix` (e.g. `GG.1`).
pub fn field(prefix: &str, k: usize) -> String {
    format!("{prefix}.{k}")
}

/// The matrices of family `prefix` for every view dim of `layout` (`None` where the dim carries
/// no factor or the state holds none).
pub fn mats(state: &State, prefix: &str, layout: &KronLayout) -> Vec<Option<Tensor>> {
    (0..layout.dims().len())
        .map(|k| {
            if layout.is_preconditioned(k) {
                state.tensors.get(&field(prefix, k)).cloned()
            } else {
                None
            }
        })
        .collect()
}

/// Folds the mode Gram matrices of `g_view` (a tensor in `layout`'s view) into the factors
/// `<prefix>.<k>`, creating them as zeros of `dtype` on first use.
pub fn accumulate_factors(
    state: &mut State,
    prefix: &str,
    layout: &KronLayout,
    g_view: &Tensor,
    dtype: DType,
    ema: FactorEma,
) -> Result<()> {
    let g = if g_view.dtype() == dtype {
        g_view.clone()
    } else {
        g_view.to_dtype(dtype)?
    };
    for (k, d) in layout.factor_dims() {
        let f = state
            .tensor_or_zeros_shaped(&field(prefix, k), &[d, d], dtype, g.device())?
            .clone();
        #[cfg(feature = "cuda")]
        if g.device().is_cuda() {
            // One cuBLAS gemm with β instead of a Gram matrix and an EMA pass.
            let (alpha, beta) = match ema {
                FactorEma::Lerp { weight } => (weight, 1.0 - weight),
                FactorEma::ScaleAdd { decay, weight } => (weight, decay),
            };
            let u = mode_unfold(&g, k)?;
            with_float!(dtype, "factor update", T =>
                crate::cuda::gram_ema::<T>(&f, &u, alpha, beta)?);
            continue;
        }
        let gram = mode_gram(&g, k)?;
        ema_update(&f, &gram, ema)?;
    }
    Ok(())
}

/// The mode-k unfolding `G_(k)` (`d_k × rest`, contiguous): `mode_gram(x, k) = G_(k) G_(k)ᵀ`.
pub fn mode_unfold(x: &Tensor, k: usize) -> Result<Tensor> {
    let dims = x.dims();
    if k >= dims.len() {
        return Err(Error::Msg(format!(
            "mode_unfold: mode {k} of a tensor of shape {dims:?}"
        )));
    }
    let a: usize = dims[..k].iter().product();
    let d = dims[k];
    let b: usize = dims[k + 1..].iter().product();
    Ok(x.contiguous()?
        .reshape((a, d, b))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((d, a * b))?)
}

/// When amortized work (eigenbasis or inverse-root refresh) is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// At every step `t` with `t % frequency == 0` (SOAP, counting Adam steps).
    Every {
        /// Period.
        frequency: u64,
    },
    /// DistributedShampoo: at `t == start`, and at every `t > start` with `t % frequency == 0`.
    AfterStart {
        /// Period.
        frequency: u64,
        /// First refresh.
        start: u64,
    },
}

impl Refresh {
    /// Whether step `t` refreshes.
    pub fn due(&self, t: u64) -> bool {
        match *self {
            Refresh::Every { frequency } => frequency > 0 && t.is_multiple_of(frequency),
            Refresh::AfterStart { frequency, start } => {
                t == start || (t > start && frequency > 0 && t.is_multiple_of(frequency))
            }
        }
    }
}

/// The eigenbasis of a symmetric factor: eigenvectors of `factor + shift·I` as columns, in
/// `order` (SOAP: `shift = 1e-30`, descending), under the f64-retry policy.
pub fn eigenbasis(factor: &Tensor, shift: f64, order: Order) -> Result<Robust<Tensor>> {
    Ok(linalg::eigh(factor, shift, order)?.map(|e| e.vectors))
}

/// One step of orthogonal (power) iteration warm-started at the basis `q`, SOAP's refresh:
/// `est_j = q_jᵀ F q_j` (Rayleigh quotients), `π = argsort(est, descending)` (stable), and the
/// new basis `Q = qr(F · q[:, π]).Q`. Returns `(π, Q)`; the caller permutes every elementwise
/// statistic that lives in the basis along this mode by `π` ([`permute_mode`]).
///
/// `F·q` is formed once and serves both the quotients and the QR input. Under the f64-retry
/// policy; on failure the caller keeps `q` and does not permute.
///
/// On a CUDA device the refresh runs there ([`linalg::on_device::power_iteration_qr`]:
/// products, kernels and Cholesky-QR, nothing copied to the host but the quotients).
pub fn power_iteration_qr(factor: &Tensor, q: &Tensor) -> Result<Robust<(Vec<usize>, Tensor)>> {
    if factor.device().is_cuda() {
        return linalg::on_device::power_iteration_qr(factor, q);
    }
    let n = linalg::square_side(factor, "power_iteration_qr")?;
    if q.dims() != [n, n] {
        return Err(Error::Msg(format!(
            "power_iteration_qr: basis {:?} for a {n}×{n} factor",
            q.dims()
        )));
    }
    let device = factor.device().clone();
    let q = if q.dtype() == factor.dtype() {
        q.clone()
    } else {
        q.to_dtype(factor.dtype())?
    };
    with_float!(factor.dtype(), "power_iteration_qr", T => {
        let f = linalg::to_vec::<T>(factor)?;
        let qv = linalg::to_vec::<T>(&q)?;
        power_iteration_qr_slice::<T>(&f, &qv, n)
            .try_map(|(perm, qn)| Ok((perm, linalg::from_vec(qn, &[n, n], &device)?)))
    })
}

/// One refresh in the precision `U`, without retries.
fn power_iteration_once<U: linalg::Scalar>(
    f: &[U],
    q: &[U],
    n: usize,
) -> std::result::Result<(Vec<usize>, Vec<U>), linalg::LinalgError> {
    let fq = linalg::matmul_slice(f, q, n, n, n);
    let est: Vec<f64> = (0..n)
        .map(|j| {
            (0..n)
                .map(|i| q[i * n + j].f64() * fq[i * n + j].f64())
                .sum()
        })
        .collect();
    if est.iter().any(|e| !e.is_finite()) {
        return Err(linalg::LinalgError::NonFiniteOutput);
    }
    let mut perm: Vec<usize> = (0..n).collect();
    // Stable descending sort: ties keep their current order.
    perm.sort_by(|&a, &b| est[b].total_cmp(&est[a]));
    let mut sorted = vec![U::of(0.0); n * n];
    for i in 0..n {
        for (j, &p) in perm.iter().enumerate() {
            sorted[i * n + j] = fq[i * n + p];
        }
    }
    Ok((perm, linalg::qr_q_slice(&sorted, n, n)?))
}

fn power_iteration_qr_slice<T: linalg::Scalar>(
    f: &[T],
    q: &[T],
    n: usize,
) -> Robust<(Vec<usize>, Vec<T>)> {
    let finite = f.iter().chain(q).all(|x| x.f64().is_finite());
    if !finite {
        return Robust::Failed {
            first: linalg::LinalgError::NonFiniteInput,
            retry: None,
        };
    }
    let first = match power_iteration_once(f, q, n) {
        Ok(r) => return Robust::Done(r),
        Err(e) => e,
    };
    if T::DTYPE == DType::F64 {
        return Robust::Failed { first, retry: None };
    }
    let up = |v: &[T]| v.iter().map(|x| x.f64()).collect::<Vec<f64>>();
    let retried = power_iteration_once(&up(f), &up(q), n).and_then(|(perm, qn)| {
        let qn: Vec<T> = qn.iter().map(|x| T::of(*x)).collect();
        if qn.iter().all(|x| x.f64().is_finite()) {
            Ok((perm, qn))
        } else {
            Err(linalg::LinalgError::NonFiniteOutput)
        }
    });
    match retried {
        Ok(value) => Robust::RetriedF64 { value, first },
        Err(retry) => Robust::Failed {
            first,
            retry: Some(retry),
        },
    }
}

/// `x` with its entries along axis `k` reordered by `perm` (`out[…, j, …] = x[…, perm[j], …]`).
pub fn permute_mode(x: &Tensor, k: usize, perm: &[usize]) -> Result<Tensor> {
    if k >= x.rank() || x.dims()[k] != perm.len() {
        return Err(Error::Msg(format!(
            "permute_mode: {} indices for axis {k} of shape {:?}",
            perm.len(),
            x.dims()
        )));
    }
    let idx: Vec<u32> = perm.iter().map(|&p| p as u32).collect();
    let idx = Tensor::from_vec(idx, perm.len(), x.device())?;
    Ok(x.index_select(&idx, k)?.contiguous()?)
}

/// The square identity matrix of side `n` (the basis of a factor whose decomposition failed
/// before any basis existed).
pub fn identity(n: usize, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    Ok(Tensor::eye(n, dtype, device)?)
}

/// A tiling of a tensor into blocks of at most `block` along every dim (DistributedShampoo's
/// `multi_dim_split`): every dim is cut into chunks of `block` (the last one shorter) and the
/// blocks are ordered row-major over the chunk grid, dim 0 slowest. Each block is an independent
/// preconditioning problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocks {
    shape: Vec<usize>,
    block: usize,
    grid: Vec<usize>,
}

impl Blocks {
    /// Tiles `shape` with blocks of side at most `block` (≥ 1; `usize::MAX` for none).
    pub fn new(shape: &[usize], block: usize) -> Result<Self> {
        if block == 0 {
            return Err(Error::Msg("blocking: the block size must be >= 1".into()));
        }
        let grid = shape.iter().map(|&d| d.div_ceil(block).max(1)).collect();
        Ok(Self {
            shape: shape.to_vec(),
            block,
            grid,
        })
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.grid.iter().product()
    }

    /// Whether there are no blocks (never: a tensor is at least one block).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The index ranges of block `i` along every dim.
    pub fn ranges(&self, i: usize) -> Vec<Range<usize>> {
        let mut rem = i;
        let mut coords = vec![0; self.grid.len()];
        for k in (0..self.grid.len()).rev() {
            coords[k] = rem % self.grid[k];
            rem /= self.grid[k];
        }
        coords
            .iter()
            .zip(&self.shape)
            .map(|(&c, &d)| {
                let start = c * self.block;
                start.min(d)..(start.saturating_add(self.block)).min(d)
            })
            .collect()
    }

    /// The shape of block `i`.
    pub fn block_shape(&self, i: usize) -> Vec<usize> {
        self.ranges(i).iter().map(|r| r.len()).collect()
    }

    /// The blocks of `x` (contiguous copies; `x` itself when there is one block).
    pub fn split(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        if x.dims() != self.shape.as_slice() {
            return Err(Error::Msg(format!(
                "blocking: tensor {:?} for blocks of {:?}",
                x.dims(),
                self.shape
            )));
        }
        if self.len() == 1 {
            return Ok(vec![x.clone()]);
        }
        (0..self.len())
            .map(|i| {
                let mut b = x.clone();
                for (k, r) in self.ranges(i).into_iter().enumerate() {
                    b = b.narrow(k, r.start, r.len())?;
                }
                Ok(b.contiguous()?)
            })
            .collect()
    }

    /// The tensor assembled from its blocks (the inverse of [`Blocks::split`]).
    pub fn merge(&self, blocks: &[Tensor]) -> Result<Tensor> {
        if blocks.len() != self.len() {
            return Err(Error::Msg(format!(
                "blocking: {} blocks given, {} expected",
                blocks.len(),
                self.len()
            )));
        }
        if blocks.len() == 1 {
            return Ok(blocks[0].clone());
        }
        let mut level: Vec<Tensor> = blocks.to_vec();
        for k in (0..self.grid.len()).rev() {
            let g = self.grid[k];
            level = level
                .chunks(g)
                .map(|c| Ok(Tensor::cat(c, k)?))
                .collect::<Result<_>>()?;
        }
        Ok(level.remove(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::testing::flat;
    use candle_core::Device;

    fn t(v: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn seq(n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| ((i * 37 % 11) as f64) - 5.0 + 0.1 * i as f64)
            .collect()
    }

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn merge_dims_examples() {
        assert_eq!(merge_dims(&[2, 3, 4, 5], 12), vec![6, 4, 5]);
        assert_eq!(merge_dims(&[2, 3, 4, 5], 10000), vec![120]);
        assert_eq!(merge_dims(&[6, 4, 3, 3], 12), vec![6, 12, 3]);
        assert_eq!(merge_dims(&[4, 40], 16), vec![4, 40]);
        assert_eq!(merge_dims(&[1, 50], 10000), vec![50]);
        assert_eq!(merge_dims(&[3, 4], 12), vec![12]);
        assert_eq!(merge_dims(&[3, 4], 11), vec![3, 4]);
        assert_eq!(merge_dims(&[], 10), vec![1]);
        assert_eq!(merge_dims(&[1, 1], 10), vec![1]);
        // A large dim after a non-trivial product still ends up on its own.
        assert_eq!(merge_dims(&[2, 3, 100, 2], 10), vec![6, 100, 2]);
    }

    /// Reference mode product by explicit index arithmetic.
    fn naive_mode_product(x: &[f64], dims: &[usize], k: usize, m: &[f64], dout: usize) -> Vec<f64> {
        let a: usize = dims[..k].iter().product();
        let d = dims[k];
        let b: usize = dims[k + 1..].iter().product();
        let mut out = vec![0.0; a * dout * b];
        for ia in 0..a {
            for i in 0..dout {
                for ib in 0..b {
                    out[(ia * dout + i) * b + ib] = (0..d)
                        .map(|j| m[i * d + j] * x[(ia * d + j) * b + ib])
                        .sum();
                }
            }
        }
        out
    }

    #[test]
    fn mode_products_match_index_arithmetic() {
        let dims = [2usize, 3, 4];
        let x = seq(24);
        let m0 = seq(4).iter().map(|v| v * 0.3).collect::<Vec<_>>(); // 2x2
        let m2 = seq(16).iter().map(|v| v * 0.1).collect::<Vec<_>>(); // 4x4
        let mats = vec![Some(t(&m0, &[2, 2])), None, Some(t(&m2, &[4, 4]))];
        let got = flat(&mode_products(&t(&x, &dims), &mats, false).unwrap());
        let step = naive_mode_product(&x, &dims, 0, &m0, 2);
        let want = naive_mode_product(&step, &dims, 2, &m2, 4);
        assert!(close(&got, &want, 1e-12));
        // Transposed: op(M) = Mᵀ.
        let tr = |m: &[f64], n: usize| {
            let mut o = vec![0.0; n * n];
            for i in 0..n {
                for j in 0..n {
                    o[j * n + i] = m[i * n + j];
                }
            }
            o
        };
        let got = flat(&mode_products(&t(&x, &dims), &mats, true).unwrap());
        let step = naive_mode_product(&x, &dims, 0, &tr(&m0, 2), 2);
        let want = naive_mode_product(&step, &dims, 2, &tr(&m2, 4), 4);
        assert!(close(&got, &want, 1e-12));
        // All None: identity. Rectangular: 3x2 on mode 0.
        let none = vec![None, None, None];
        assert_eq!(
            flat(&mode_products(&t(&x, &dims), &none, false).unwrap()),
            x
        );
        let r = seq(6);
        let got = mode_products(&t(&x, &dims), &[Some(t(&r, &[3, 2])), None, None], false).unwrap();
        assert_eq!(got.dims(), &[3, 3, 4]);
        assert!(close(
            &flat(&got),
            &naive_mode_product(&x, &dims, 0, &r, 3),
            1e-12
        ));
        // Wrong count or size: errors.
        assert!(mode_products(&t(&x, &dims), &[None], false).is_err());
        assert!(mode_products(&t(&x, &dims), &[None, Some(t(&m0, &[2, 2])), None], false).is_err());
    }

    #[test]
    fn orthogonal_projection_round_trips() {
        let dims = [3usize, 5];
        let x = t(&seq(15), &dims);
        let q0 = crate::linalg::qr_q(&t(&seq(9), &[3, 3]))
            .unwrap()
            .value()
            .unwrap();
        let q1 = crate::linalg::qr_q(&t(&seq(25), &[5, 5]))
            .unwrap()
            .value()
            .unwrap();
        let qs = vec![Some(q0.clone()), Some(q1.clone())];
        let p = mode_products(&x, &qs, true).unwrap();
        // 2-D: project = Q0ᵀ X Q1.
        let want = q0.t().unwrap().matmul(&x).unwrap().matmul(&q1).unwrap();
        assert!(close(&flat(&p), &flat(&want), 1e-12));
        let back = mode_products(&p, &qs, false).unwrap();
        assert!(close(&flat(&back), &flat(&x), 1e-12));
    }

    #[test]
    fn mode_unfold_gram_is_mode_gram() {
        for dims in [vec![2usize, 3, 4], vec![5], vec![3, 1, 2], vec![4, 6]] {
            let n = dims.iter().product();
            let x = t(&seq(n), &dims);
            for (k, &dk) in dims.iter().enumerate() {
                let u = mode_unfold(&x, k).unwrap();
                assert_eq!(u.dims(), &[dk, n / dk]);
                let via_unfold = flat(&u.matmul(&u.t().unwrap()).unwrap());
                assert!(close(&via_unfold, &flat(&mode_gram(&x, k).unwrap()), 1e-9));
            }
        }
        assert!(mode_unfold(&t(&[1.0], &[1]), 1).is_err());
    }

    #[test]
    fn mode_gram_is_the_unfolding_product() {
        let dims = [2usize, 3, 4];
        let x = seq(24);
        for k in 0..3 {
            let g = flat(&mode_gram(&t(&x, &dims), k).unwrap());
            let d = dims[k];
            let a: usize = dims[..k].iter().product();
            let b: usize = dims[k + 1..].iter().product();
            for i in 0..d {
                for j in 0..d {
                    let mut s = 0.0;
                    for ia in 0..a {
                        for ib in 0..b {
                            s += x[(ia * d + i) * b + ib] * x[(ia * d + j) * b + ib];
                        }
                    }
                    assert!((g[i * d + j] - s).abs() < 1e-9, "k={k}");
                }
            }
        }
        // Vector: g gᵀ.
        let v = [1.0, 2.0, 3.0];
        let g = flat(&mode_gram(&t(&v, &[3]), 0).unwrap());
        assert_eq!(g, vec![1., 2., 3., 2., 4., 6., 3., 6., 9.]);
        assert!(mode_gram(&t(&v, &[3]), 1).is_err());
    }

    #[test]
    fn ema_rules() {
        let f = t(&[1.0, 2.0], &[2]);
        ema_update(&f, &t(&[3.0, 6.0], &[2]), FactorEma::Lerp { weight: 0.25 }).unwrap();
        assert_eq!(flat(&f), vec![1.5, 3.0]);
        ema_update(&f, &t(&[3.0, 6.0], &[2]), FactorEma::Lerp { weight: 0.75 }).unwrap();
        assert_eq!(flat(&f), vec![2.625, 5.25]);
        ema_update(
            &f,
            &t(&[1.0, 1.0], &[2]),
            FactorEma::ScaleAdd {
                decay: 1.0,
                weight: 1.0,
            },
        )
        .unwrap();
        assert_eq!(flat(&f), vec![3.625, 6.25]);
        ema_update(
            &f,
            &t(&[1.0, 1.0], &[2]),
            FactorEma::ScaleAdd {
                decay: 0.5,
                weight: 2.0,
            },
        )
        .unwrap();
        assert_eq!(flat(&f), vec![3.8125, 5.125]);
        // f32 statistic into an f64 factor is cast.
        let s32 = Tensor::new(&[1.0f32, 1.0], &Device::Cpu).unwrap();
        ema_update(&f, &s32, FactorEma::Lerp { weight: 0.0 }).unwrap();
        assert!(ema_update(&f, &t(&[1.0], &[1]), FactorEma::Lerp { weight: 0.5 }).is_err());
    }

    #[test]
    fn layouts_and_views() {
        // channels_last: NHWC viewed as merged NCHW.
        let shape = [2usize, 2, 3, 2];
        let x = t(&seq(24), &shape);
        let dims = merge_dims(&[2, 2, 2, 3], 6);
        assert_eq!(dims, vec![4, 6]);
        let l = KronLayout::new(&shape, dims, vec![true, false], true).unwrap();
        let v = l.to_view(&x).unwrap();
        let want = x
            .permute((0, 3, 1, 2))
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((4, 6))
            .unwrap();
        assert_eq!(flat(&v), flat(&want));
        assert_eq!(flat(&l.from_view(&v).unwrap()), flat(&x));
        assert_eq!(l.factor_dims().collect::<Vec<_>>(), vec![(0, 4)]);
        assert!(!l.is_trivial());
        assert!(KronLayout::new(&shape, vec![5], vec![true], false).is_err());
        assert!(KronLayout::new(&[4, 6], vec![24], vec![true], true).is_err());
        let u = KronLayout::unmerged(&[3, 40], 16);
        assert_eq!(u.factor_dims().collect::<Vec<_>>(), vec![(0, 3)]);
        assert!(KronLayout::unmerged(&[], 16).is_trivial());
    }

    #[test]
    fn factors_accumulate_in_state() {
        let layout = KronLayout::unmerged(&[2, 3], 2);
        let mut st = State::default();
        let g = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
        accumulate_factors(
            &mut st,
            "GG",
            &layout,
            &g,
            DType::F64,
            FactorEma::Lerp { weight: 0.5 },
        )
        .unwrap();
        assert!(!st.tensors.contains_key("GG.1"));
        assert_eq!(flat(&st.tensors["GG.0"]), vec![7.0, 16.0, 16.0, 38.5]);
        let m = mats(&st, "GG", &layout);
        assert!(m[0].is_some() && m[1].is_none());
    }

    #[test]
    fn refresh_schedules() {
        let every = Refresh::Every { frequency: 3 };
        assert_eq!(
            (1..=9).filter(|&t| every.due(t)).collect::<Vec<_>>(),
            vec![3, 6, 9]
        );
        let after = Refresh::AfterStart {
            frequency: 4,
            start: 6,
        };
        assert_eq!(
            (1..=16).filter(|&t| after.due(t)).collect::<Vec<_>>(),
            vec![6, 8, 12, 16]
        );
    }

    #[test]
    fn power_iteration_sorts_and_converges() {
        // F = diag(1, 3, 2): from the identity basis, est = (1, 3, 2) -> π = (1, 2, 0) and the
        // new basis is the permuted identity up to signs.
        let f = t(&[1.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 2.0], &[3, 3]);
        let q = Tensor::eye(3, DType::F64, &Device::Cpu).unwrap();
        let (perm, qn) = power_iteration_qr(&f, &q).unwrap().value().unwrap();
        assert_eq!(perm, vec![1, 2, 0]);
        let qn = flat(&qn);
        let abs: Vec<f64> = qn.iter().map(|x| x.abs()).collect();
        assert_eq!(abs, vec![0., 0., 1., 1., 0., 0., 0., 1., 0.]);
        // Repeated refreshes converge to the eigenbasis of a dense SPD matrix.
        let a = t(&[4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 1.0], &[3, 3]);
        let mut q = Tensor::eye(3, DType::F64, &Device::Cpu).unwrap();
        for _ in 0..60 {
            q = power_iteration_qr(&a, &q).unwrap().value().unwrap().1;
        }
        let d = q.t().unwrap().matmul(&a).unwrap().matmul(&q).unwrap();
        let d = flat(&d);
        assert!(
            d[1].abs() < 1e-10 && d[2].abs() < 1e-10 && d[5].abs() < 1e-10,
            "{d:?}"
        );
        assert!(d[0] > d[4] && d[4] > d[8]);
        // Non-finite factor: failure, no panic.
        let bad = t(&[f64::INFINITY, 0.0, 0.0, 1.0], &[2, 2]);
        let q2 = Tensor::eye(2, DType::F64, &Device::Cpu).unwrap();
        assert!(power_iteration_qr(&bad, &q2).unwrap().is_failed());
    }

    #[test]
    fn permute_mode_reorders_one_axis() {
        let x = t(&seq(6), &[2, 3]);
        let p = flat(&permute_mode(&x, 1, &[2, 0, 1]).unwrap());
        let s = seq(6);
        assert_eq!(p, vec![s[2], s[0], s[1], s[5], s[3], s[4]]);
        assert!(permute_mode(&x, 0, &[0]).is_err());
    }

    #[test]
    fn blocks_split_and_merge() {
        let b = Blocks::new(&[6, 10], 4).unwrap();
        assert_eq!(b.len(), 6);
        let shapes: Vec<Vec<usize>> = (0..6).map(|i| b.block_shape(i)).collect();
        assert_eq!(
            shapes,
            vec![
                vec![4, 4],
                vec![4, 4],
                vec![4, 2],
                vec![2, 4],
                vec![2, 4],
                vec![2, 2]
            ]
        );
        assert_eq!(b.ranges(4), vec![4..6, 4..8]);
        let x = t(&seq(60), &[6, 10]);
        let parts = b.split(&x).unwrap();
        assert_eq!(parts[2].dims(), &[4, 2]);
        assert_eq!(flat(&b.merge(&parts).unwrap()), flat(&x));
        let b3 = Blocks::new(&[3, 5, 2], 2).unwrap();
        let x3 = t(&seq(30), &[3, 5, 2]);
        assert_eq!(flat(&b3.merge(&b3.split(&x3).unwrap()).unwrap()), flat(&x3));
        let one = Blocks::new(&[3], usize::MAX).unwrap();
        assert_eq!(one.len(), 1);
        assert!(Blocks::new(&[3], 0).is_err());
    }
}
