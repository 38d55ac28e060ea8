//! SOAP's eigenbasis refresh where the factors live: matrix products and level-3 solvers
//! (cuBLAS and cuSOLVER on a GPU) plus one kernel of `kernels/fused.cu`, so a refresh on the GPU
//! never copies a factor to the host. Only the `n` Rayleigh quotients (to sort them), the `n`
//! pivots of each Cholesky pass and a few status flags travel.
//!
//! One refresh of a factor `F` with basis `Q` (the reference's power iteration):
//!
//! 1. `P = F·Q` (a gemm), `est_j = q_jᵀ p_j` without forming `QᵀFQ` (kernel `column_dots`,
//!    summed in f64);
//! 2. `π = argsort(est)`, descending and stable (on the host, as [`crate::optim::kron`] does);
//!    the columns of `P` gathered by `π`;
//! 3. `Q' = qr(P[:, π]).Q` by **column-scaled, shifted Cholesky-QR3 in f64**
//!    ([`cholesky_qr3`]): scale the columns of `A` to unit norm, then three times
//!    `C = AᵀA (+ s·I the first time)` (a gemm), `C = RᵀR` (cuSOLVER `potrf`),
//!    `A ← A·R⁻¹` (cuBLAS `trsm`). All `O(n³)` work is in those level-3 library calls, which
//!    use the whole GPU; [`count_work`] logs every step's FLOPs and launches. Scaling leaves
//!    `Q` unchanged (`A·D = Q·(R·D)`) and keeps the Gram matrix in range (the column norms of
//!    `F·Q` carry the eigenvalues); the shift, from an estimate of `‖A‖₂²`, keeps the first
//!    factorization alive up to the condition numbers stated at [`cholesky_qr3`]; the last
//!    pass must find pivots in `[1/4, 4]`, which guarantees an orthonormal result to working
//!    precision.
//!
//! When Cholesky-QR breaks down (a zero or dependent column: rank-deficient factors, e.g. after
//! all-zero gradients, or a condition number beyond its range) the Householder QR takes over:
//! cuSOLVER's `geqrf`/`orgqr` on a GPU, faer on the host. Columns may differ in sign from the
//! host path's Householder QR; SOAP does not depend on the signs (its rotated statistics are
//! squares, its moments live in the original space).
//!
//! Robustness as in [`crate::linalg`]: an f32 refresh that fails (non-finite quotients, or both
//! orthogonalizations) is retried in f64 on the device; if that fails too the caller keeps its
//! basis and counts the failure.
//!
//! Every step has a host form: CPU tensors run plain-Rust twins (`column_dots`, the Cholesky
//! loop, forward substitution) and faer, CUDA tensors the kernel and the libraries, and inside
//! [`crate::launch`]' host emulation CPU tensors run `column_dots`' kernel code compiled for
//! the host.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::float::Float;
use crate::fused::zip_mut;
use crate::launch::{elementwise_blocks, RawLaunch};
use crate::linalg::{LinalgError, Robust};

/// Pivot bounds of the last Cholesky pass: its input has nearly unit, nearly orthogonal
/// columns, so every pivot (a squared column norm after removing the earlier columns) is close
/// to 1. Outside `[1/4, 4]` the earlier passes lost orthogonality and the result would not be
/// orthonormal to working precision.
pub const LAST_PASS_PIVOTS: (f64, f64) = (0.25, 4.0);

/// Whether `t`'s kernels run on the device (or in host emulation) rather than as twins.
fn kernels_for(t: &Tensor) -> bool {
    #[cfg(optlab_emulate_kernels)]
    if crate::launch::emulate::active() {
        return true;
    }
    t.device().is_cuda()
}

/// Runs `l` on `outs`/`ins`: the kernel on a CUDA device or in host emulation, else `twin`
/// (which gets the same slices and a zeroed workspace). Returns the workspace.
fn run<T: Float>(
    l: RawLaunch<'_, T>,
    outs: &[&Tensor],
    ins: &[&Tensor],
    mut twin: impl FnMut(&mut [&mut [T]], &[&[T]], &mut [f64]) -> Result<()>,
) -> Result<Vec<f64>> {
    let first = outs.iter().chain(ins).next().copied();
    let on_device = first.is_some_and(kernels_for);
    #[cfg(feature = "cuda")]
    if on_device && first.is_some_and(|t| t.device().is_cuda()) {
        return crate::cuda::launch_raw(&l, outs, ins);
    }
    #[cfg(optlab_emulate_kernels)]
    if on_device {
        return crate::launch::emulate::launch_raw(&l, outs, ins);
    }
    let _ = on_device;
    let mut scratch = vec![0.0f64; l.scratch_len];
    zip_mut::<T>(outs, ins, |o, i| twin(o, i, &mut scratch))?;
    Ok(scratch)
}

/// `d_j = Σ_i x[i][j]·y[i][j]` for two `rows×cols` matrices, in f64 (kernel `column_dots`).
pub fn column_dots(x: &Tensor, y: &Tensor) -> Result<Vec<f64>> {
    let (rows, cols) = x.dims2()?;
    if y.dims() != [rows, cols] || x.dtype() != y.dtype() {
        return Err(Error::Msg(format!(
            "column_dots: {:?} {:?} and {:?} {:?}",
            x.dims(),
            x.dtype(),
            y.dims(),
            y.dtype()
        )));
    }
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    crate::with_float!(x.dtype(), "column_dots", T => {
        let l = RawLaunch::<T> {
            name: "column_dots",
            blocks: elementwise_blocks(cols),
            n: cols,
            aux: [rows as u64, 0],
            scalars: &[],
            scratch_len: cols,
        };
        run(l, &[], &[&x, &y], |_, i, d| {
            let (x, y) = (i[0], i[1]);
            for (j, dj) in d.iter_mut().enumerate() {
                let mut acc = 0.0f64;
                for r in 0..rows {
                    acc += x[r * cols + j].f64() * y[r * cols + j].f64();
                }
                *dj = acc;
            }
            Ok(())
        })
    })
}

/// Cholesky factorization `C = RᵀR` of a symmetric positive definite `n×n` matrix: `R`
/// upper triangular (strict lower triangle zero). On a GPU: cuSOLVER `potrf` (blocked, its
/// trailing updates are gemms); on the host: the right-looking loop (its twin). Fails with
/// the 0-based index of the first pivot (`R_kk²`) that is not positive or lies outside
/// `pivots`.
pub fn cholesky_upper(
    c: &Tensor,
    pivots: (f64, f64),
) -> Result<std::result::Result<Tensor, usize>> {
    let n = crate::linalg::square_side(c, "cholesky_upper")?;
    note_work(
        "Cholesky C = RᵀR (potrf)",
        WorkKind::Blas3,
        (n * n * n) as f64 / 3.0,
        1,
    );
    #[cfg(feature = "cuda")]
    if c.device().is_cuda() {
        let r = c.contiguous()?.copy()?;
        if let Err(k) = crate::cuda::solver::potrf_upper(&r)? {
            return Ok(Err(k));
        }
        // potrf leaves C's entries below the diagonal: clear them (an elementwise product).
        let r = r.mul(&Tensor::triu2(n, r.dtype(), r.device())?)?;
        note_work(
            "clear the lower triangle",
            WorkKind::Elementwise,
            (n * n) as f64,
            1,
        );
        let diag: Vec<f64> = r
            .flatten_all()?
            .index_select(
                &Tensor::arange_step(0u32, (n * n) as u32, (n + 1) as u32, r.device())?,
                0,
            )?
            .to_dtype(DType::F64)?
            .to_vec1()?;
        let bad = diag.iter().position(|d| {
            let pivot = d * d;
            !(*d > 0.0 && pivot >= pivots.0 && pivot <= pivots.1)
        });
        return Ok(match bad {
            Some(k) => Err(k),
            None => Ok(r),
        });
    }
    let r = c.contiguous()?.copy()?;
    let status = crate::with_float!(c.dtype(), "cholesky_upper", T => {
        let (lo, hi) = (T::of(pivots.0), T::of(pivots.1));
        let mut status = None;
        zip_mut::<T>(&[&r], &[], |o, _| {
            let c = &mut *o[0];
            for k in 0..n {
                let pivot = c[k * n + k];
                if !(pivot >= lo && pivot <= hi && pivot > T::of(0.0)) {
                    status = Some(k);
                    return Ok(());
                }
                let d = pivot.sqrt();
                for j in k..n {
                    c[k * n + j] = if j == k { d } else { c[k * n + j] / d };
                }
                for i in k + 1..n {
                    for j in i..n {
                        c[i * n + j] -= c[k * n + i] * c[k * n + j];
                    }
                }
            }
            for i in 0..n {
                for j in 0..i {
                    c[i * n + j] = T::of(0.0);
                }
            }
            Ok(())
        })?;
        status
    });
    Ok(match status {
        Some(k) => Err(k),
        None => Ok(r),
    })
}

/// `X = A·R⁻¹` for an `m×n` matrix `A` and an upper triangular `n×n` `R` (only its upper
/// triangle is read). On a GPU: cuBLAS `trsm`; on the host: forward substitution row by row
/// (its twin).
pub fn solve_upper_right(a: &Tensor, r: &Tensor) -> Result<Tensor> {
    let (m, n) = a.dims2()?;
    if r.dims() != [n, n] || r.dtype() != a.dtype() {
        return Err(Error::Msg(format!(
            "solve_upper_right: A {:?} {:?} and R {:?} {:?}",
            a.dims(),
            a.dtype(),
            r.dims(),
            r.dtype()
        )));
    }
    note_work(
        "triangular solve A·R⁻¹ (trsm)",
        WorkKind::Blas3,
        (m * n * n) as f64,
        1,
    );
    let x = a.contiguous()?.copy()?;
    let r = r.contiguous()?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        crate::cuda::solver::trsm_right_upper(&x, &r)?;
        return Ok(x);
    }
    crate::with_float!(x.dtype(), "solve_upper_right", T => {
        zip_mut::<T>(&[&x], &[&r], |o, i| {
            let (x, r) = (&mut *o[0], i[0]);
            for row in x.chunks_exact_mut(n.max(1)) {
                for j in 0..n {
                    let mut acc = row[j];
                    for l in 0..j {
                        acc -= row[l] * r[l * n + j];
                    }
                    row[j] = acc / r[j * n + j];
                }
            }
            Ok(())
        })?;
    });
    Ok(x)
}

/// What one step of the refresh is made of, for [`count_work`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkKind {
    /// A level-3 BLAS or LAPACK call (cuBLAS gemm/trsm, cuSOLVER potrf/geqrf on a GPU).
    Blas3,
    /// A matrix-vector product.
    Blas2,
    /// A reduction or elementwise pass over a matrix: `O(n²)` work spread over many blocks.
    Elementwise,
    /// Work on the host (the sort of `n` numbers, a few scalars).
    Host,
}

/// One entry of a [`count_work`] log.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkItem {
    /// What it computes.
    pub op: &'static str,
    /// Its kind.
    pub kind: WorkKind,
    /// Floating-point operations (one multiply-add = 2).
    pub flops: f64,
    /// Device launches (kernels or library calls).
    pub launches: usize,
}

thread_local! {
    static WORK: std::cell::RefCell<Option<Vec<WorkItem>>> = const { std::cell::RefCell::new(None) };
}

fn note_work(op: &'static str, kind: WorkKind, flops: f64, launches: usize) {
    WORK.with(|w| {
        if let Some(log) = w.borrow_mut().as_mut() {
            log.push(WorkItem {
                op,
                kind,
                flops,
                launches,
            });
        }
    });
}

/// Runs `f` and returns, with its result, the work the device refresh did inside it on this
/// thread: each step's kind, FLOPs and launches, as the algorithm issues them (the same on the
/// GPU and in the host twins). Shows where the `O(n³)` work goes: level-3 library calls.
pub fn count_work<R>(f: impl FnOnce() -> R) -> (R, Vec<WorkItem>) {
    let outer = WORK.with(|w| w.borrow_mut().replace(Vec::new()));
    let out = f();
    let log = WORK.with(|w| std::mem::replace(&mut *w.borrow_mut(), outer));
    (out, log.unwrap_or_default())
}

/// One Cholesky-QR pass: `A ← A·R⁻¹` with `AᵀA + shift·I = RᵀR`, all level-3 (a gemm, potrf,
/// trsm). `None` when the factorization breaks down or a pivot leaves `pivots`.
fn cholesky_qr_pass(a: &Tensor, shift: f64, pivots: (f64, f64)) -> Result<Option<Tensor>> {
    let (m, n) = a.dims2()?;
    let c = gram(a)?;
    note_work(
        "Gram AᵀA (gemm)",
        WorkKind::Blas3,
        2.0 * (m * n * n) as f64,
        1,
    );
    cholesky_qr_pass_from(a, c, shift, pivots)
}

/// `AᵀA` (a gemm).
fn gram(a: &Tensor) -> Result<Tensor> {
    Ok(a.t()?.matmul(a)?)
}

/// [`cholesky_qr_pass`] with the Gram matrix `c` of `a` given.
fn cholesky_qr_pass_from(
    a: &Tensor,
    mut c: Tensor,
    shift: f64,
    pivots: (f64, f64),
) -> Result<Option<Tensor>> {
    let n = c.dims()[0];
    if shift > 0.0 {
        let eye = Tensor::eye(n, c.dtype(), c.device())?;
        c = (c + (eye * shift)?)?;
        note_work("add the shift", WorkKind::Elementwise, (n * n) as f64, 2);
    }
    let Ok(r) = cholesky_upper(&c, pivots)? else {
        return Ok(None);
    };
    Ok(Some(solve_upper_right(a, &r)?))
}

/// Power-iteration steps of [`spectral_norm_sq`].
const NORM_ITERATIONS: usize = 10;

/// An estimate of `‖A‖₂² = λ_max(C)` from the Gram matrix `C = AᵀA`: the Rayleigh quotient
/// after [`NORM_ITERATIONS`] power steps from the all-ones vector (matrix-vector products on
/// the device, one scalar read), times 1.1 because it converges from below, and at most
/// `trace(C)`. `trace` is `‖A‖²_F`.
fn spectral_norm_sq(c: &Tensor, trace: f64) -> Result<f64> {
    let n = c.dims()[0];
    let mut x =
        Tensor::ones((n, 1), c.dtype(), c.device())?.affine(1.0 / (n as f64).sqrt(), 0.0)?;
    for _ in 0..NORM_ITERATIONS {
        let y = c.matmul(&x)?;
        let norm = y.sqr()?.sum_all()?.sqrt()?;
        x = y.broadcast_div(&norm)?;
    }
    let rayleigh = x
        .t()?
        .matmul(&c.matmul(&x)?)?
        .flatten_all()?
        .to_dtype(DType::F64)?;
    note_work(
        "‖A‖₂² estimate (power iteration, gemv)",
        WorkKind::Blas2,
        2.0 * ((NORM_ITERATIONS + 1) * n * n) as f64,
        3 * NORM_ITERATIONS + 3,
    );
    let estimate = rayleigh.to_vec1::<f64>()?[0];
    if !estimate.is_finite() {
        return Ok(trace);
    }
    Ok((1.1 * estimate).min(trace))
}

/// The orthonormal factor of an `m×n` matrix (`m ≥ n`) by column-scaled, shifted
/// Cholesky-QR3 in f64 (columns with positive `R` diagonal), returned in `a`'s dtype; `None`
/// when it breaks down (zero or numerically dependent columns).
///
/// Every step is level-3: per pass one gemm (`AᵀA`), cuSOLVER `potrf` and cuBLAS `trsm` on a
/// GPU. It runs in f64 whatever `a`'s dtype: on the GPUs this targets (H100/H200) f64 matrix
/// products (on the FP64 tensor cores) run at about the rate of f32 ones without TF32, and f64 moves the limits below from
/// `u₃₂ ≈ 6e-8` to `u₆₄ ≈ 1.1e-16`, so that an f32 factor's refresh survives condition
/// numbers far beyond what f32 Cholesky-QR can.
///
/// The columns are scaled to unit norm first (which keeps `Q` and puts `‖A‖²_F = n`). The first
/// pass factors `AᵀA + s·I` with `s = 11·(m·n + n(n+1))·u·‖A‖₂²` (Fukaya et al., "Shifted
/// Cholesky QR for computing the QR factorization of ill-conditioned matrices", 2020), with
/// `‖A‖₂²` estimated by power iteration on `AᵀA` ([`spectral_norm_sq`]; using `‖A‖²_F = n`
/// instead, as an upper bound, would make the shift up to `n` times too large, and a shift
/// above `‖A‖₂²` leaves the first pass doing nothing). Their analysis: no breakdown, and a
/// result with `κ ≲ u^(−1/2)` that two plain passes (Cholesky-QR2) make orthonormal to working
/// precision, whenever `κ(A) ≲ 1/(√(11(mn + n(n+1)))·u)` — in f64 about `4e12` at
/// `m = n = 512` and `3e11` at `4096` (in f32 it would be only about `7e3` at `512`). The last
/// pass must find pivots in [`LAST_PASS_PIVOTS`], which guarantees the orthonormality.
pub fn cholesky_qr3(a: &Tensor) -> Result<Option<Tensor>> {
    let (rows, cols) = a.dims2()?;
    let dtype = a.dtype();
    let a = a.to_dtype(DType::F64)?.contiguous()?;
    let norms = column_dots(&a, &a)?;
    if norms.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
        return Ok(None);
    }
    let inv: Vec<f64> = norms.iter().map(|x| 1.0 / x.sqrt()).collect();
    let scale = Tensor::from_vec(inv, (1, cols), a.device())?;
    let scaled = a.broadcast_mul(&scale)?.contiguous()?;
    note_work(
        "scale the columns",
        WorkKind::Elementwise,
        (rows * cols) as f64,
        1,
    );
    let unit_roundoff = f64::EPSILON / 2.0;
    let (m, n) = (rows as f64, cols as f64);
    let c = gram(&scaled)?;
    note_work("Gram AᵀA (gemm)", WorkKind::Blas3, 2.0 * m * n * n, 1);
    let norm_sq = spectral_norm_sq(&c, n)?;
    let shift = 11.0 * (m * n + n * (n + 1.0)) * unit_roundoff * norm_sq;
    let Some(q1) = cholesky_qr_pass_from(&scaled, c, shift, (0.0, f64::INFINITY))? else {
        return Ok(None);
    };
    let Some(q2) = cholesky_qr_pass(&q1, 0.0, (0.0, f64::INFINITY))? else {
        return Ok(None);
    };
    let Some(q) = cholesky_qr_pass(&q2, 0.0, LAST_PASS_PIVOTS)? else {
        return Ok(None);
    };
    Ok(Some(q.to_dtype(dtype)?))
}

/// The orthonormal factor by Householder QR where `a` lives: cuSOLVER on a GPU, faer on the
/// host (in `a`'s dtype, no retry).
fn householder_q(a: &Tensor) -> Result<std::result::Result<Tensor, LinalgError>> {
    let (m, n) = a.dims2()?;
    // geqrf (2mn² − 2n³/3) and orgqr (as much again).
    let flops = 2.0 * (2.0 * (m * n * n) as f64 - 2.0 * (n * n * n) as f64 / 3.0);
    note_work(
        "Householder QR fallback (geqrf + orgqr)",
        WorkKind::Blas3,
        flops,
        2,
    );
    #[cfg(feature = "cuda")]
    if a.device().is_cuda() {
        return Ok(match crate::cuda::solver::householder_q(a)? {
            Ok(q) if crate::fused::all_finite(&q)? => Ok(q),
            Ok(_) => Err(LinalgError::NonFiniteOutput),
            Err(failure) => Err(LinalgError::Solver(failure.to_string())),
        });
    }
    let device = a.device().clone();
    crate::with_float!(a.dtype(), "householder_q", T => {
        let v = crate::linalg::to_vec::<T>(a)?;
        Ok(match crate::linalg::qr_q_slice::<T>(&v, m, n) {
            Ok(q) => Ok(crate::linalg::from_vec(q, &[m, m.min(n)], &device)?),
            Err(e) => Err(e),
        })
    })
}

/// One refresh in the dtype of `f` (see the module documentation), without retries.
fn refresh_once(
    f: &Tensor,
    q: &Tensor,
) -> Result<std::result::Result<(Vec<usize>, Tensor), LinalgError>> {
    let (n, cols) = q.dims2()?;
    let p = f.matmul(q)?;
    note_work(
        "P = F·Q (gemm)",
        WorkKind::Blas3,
        2.0 * (n * n * cols) as f64,
        1,
    );
    let est = column_dots(q, &p)?;
    note_work(
        "Rayleigh quotients qⱼᵀpⱼ (column_dots)",
        WorkKind::Elementwise,
        2.0 * (n * cols) as f64,
        1,
    );
    if est.iter().any(|e| !e.is_finite()) {
        return Ok(Err(LinalgError::NonFiniteOutput));
    }
    let mut perm: Vec<usize> = (0..est.len()).collect();
    // Stable descending sort: ties keep their current order (as the host path).
    perm.sort_by(|&a, &b| est[b].total_cmp(&est[a]));
    let idx: Vec<u32> = perm.iter().map(|&j| j as u32).collect();
    let idx = Tensor::from_vec(idx, perm.len(), p.device())?;
    let sorted = p.index_select(&idx, 1)?.contiguous()?;
    note_work(
        "sort (host) and column gather",
        WorkKind::Host,
        (n * cols) as f64,
        2,
    );
    let q_new = match cholesky_qr3(&sorted)? {
        Some(q) => q,
        None => match householder_q(&sorted)? {
            Ok(q) => q,
            Err(e) => return Ok(Err(e)),
        },
    };
    if !crate::fused::all_finite(&q_new)? {
        return Ok(Err(LinalgError::NonFiniteOutput));
    }
    Ok(Ok((perm, q_new)))
}

/// SOAP's refresh of the basis `q` of factor `f` where they live (see the module
/// documentation): `(π, Q')` with `π` the descending order of the Rayleigh quotients, under
/// the f64-retry policy.
pub fn power_iteration_qr(f: &Tensor, q: &Tensor) -> Result<Robust<(Vec<usize>, Tensor)>> {
    let n = crate::linalg::square_side(f, "power_iteration_qr")?;
    if q.dims() != [n, n] {
        return Err(Error::Msg(format!(
            "power_iteration_qr: basis {:?} for a {n}×{n} factor",
            q.dims()
        )));
    }
    let dtype = f.dtype();
    let q = q.to_dtype(dtype)?.contiguous()?;
    let f = f.contiguous()?;
    let finite = crate::fused::all_finite_each(&[&f, &q])?;
    if finite.contains(&false) {
        return Ok(Robust::Failed {
            first: LinalgError::NonFiniteInput,
            retry: None,
        });
    }
    with_device_retry(
        dtype,
        |dt| refresh_once(&f.to_dtype(dt)?, &q.to_dtype(dt)?),
        |(perm, q64)| finite_as(q64, dtype).map(|r| r.map(|q| (perm, q))),
    )
}

/// `x` cast to `dtype`, or `NonFiniteOutput` when the cast overflows.
fn finite_as(x: Tensor, dtype: DType) -> Result<std::result::Result<Tensor, LinalgError>> {
    let x = x.to_dtype(dtype)?;
    Ok(if crate::fused::all_finite(&x)? {
        Ok(x)
    } else {
        Err(LinalgError::NonFiniteOutput)
    })
}

/// The robustness policy of [`crate::linalg`] for device computations: `attempt` in `dtype`;
/// if that fails and `dtype` is f32, `attempt` in f64 and `back` (the cast to f32).
fn with_device_retry<V>(
    dtype: DType,
    attempt: impl Fn(DType) -> Result<std::result::Result<V, LinalgError>>,
    back: impl Fn(V) -> Result<std::result::Result<V, LinalgError>>,
) -> Result<Robust<V>> {
    let first = match attempt(dtype)? {
        Ok(v) => return Ok(Robust::Done(v)),
        Err(e) => e,
    };
    if dtype == DType::F64 {
        return Ok(Robust::Failed { first, retry: None });
    }
    let retried = match attempt(DType::F64)? {
        Ok(v) => back(v)?,
        Err(e) => Err(e),
    };
    Ok(match retried {
        Ok(value) => Robust::RetriedF64 { value, first },
        Err(retry) => Robust::Failed {
            first,
            retry: Some(retry),
        },
    })
}

/// cuSOLVER's `syevd` of `a + shift·I` in `order`, with its failures as [`LinalgError`]s (no
/// convergence, a non-finite result).
#[cfg(feature = "cuda")]
fn device_eigh(
    a: &Tensor,
    shift: f64,
    order: crate::linalg::Order,
) -> Result<std::result::Result<(Tensor, Tensor), LinalgError>> {
    let (mut values, mut vectors) = match crate::cuda::solver::eigh(a, shift)? {
        Ok(x) => x,
        Err(f) if f.info.first().is_some_and(|&i| i > 0) => {
            return Ok(Err(LinalgError::NoConvergence))
        }
        Err(f) => return Ok(Err(LinalgError::Solver(f.to_string()))),
    };
    // syevd sorts ascending.
    if order == crate::linalg::Order::Descending {
        let n = values.elem_count();
        let rev: Vec<u32> = (0..n as u32).rev().collect();
        let rev = Tensor::from_vec(rev, n, a.device())?;
        vectors = vectors.index_select(&rev, 1)?.contiguous()?;
        values = values.index_select(&rev, 0)?;
    }
    let finite = crate::fused::all_finite_each(&[&values, &vectors])?;
    if finite.contains(&false) {
        return Ok(Err(LinalgError::NonFiniteOutput));
    }
    Ok(Ok((values, vectors)))
}

/// Symmetric eigendecomposition of `a + shift·I` on its CUDA device (cuSOLVER `syevd`), under
/// the f64-retry policy: the device twin of [`crate::linalg::eigh`].
#[cfg(feature = "cuda")]
pub fn eigh(
    a: &Tensor,
    shift: f64,
    order: crate::linalg::Order,
) -> Result<Robust<crate::linalg::Eigh>> {
    crate::linalg::square_side(a, "eigh")?;
    let dtype = a.dtype();
    if !crate::fused::all_finite(a)? {
        return Ok(Robust::Failed {
            first: LinalgError::NonFiniteInput,
            retry: None,
        });
    }
    let outcome = with_device_retry(
        dtype,
        |dt| device_eigh(&a.to_dtype(dt)?, shift, order),
        |(w, v)| {
            Ok(finite_as(v, dtype)?.and_then(|v| match w.to_dtype(dtype) {
                Ok(w) => Ok((w, v)),
                Err(_) => Err(LinalgError::NonFiniteOutput),
            }))
        },
    )?;
    Ok(outcome.map(|(values, vectors)| crate::linalg::Eigh { values, vectors }))
}

/// `(A + εI)^(−1/root)` on its CUDA device through cuSOLVER's `syevd` and two products, with
/// the eigenvalue rule of the host path ([`crate::linalg::root_powers`]) and the f64-retry
/// policy: the device twin of [`crate::linalg::inverse_root`] for the eigen method.
#[cfg(feature = "cuda")]
pub fn inverse_root(
    a: &Tensor,
    root: f64,
    epsilon: f64,
    stability: crate::linalg::Stability,
) -> Result<Robust<Tensor>> {
    use crate::linalg::{Order, Stability};
    let n = crate::linalg::square_side(a, "inverse_root")?;
    let dtype = a.dtype();
    if !crate::fused::all_finite(a)? {
        return Ok(Robust::Failed {
            first: LinalgError::NonFiniteInput,
            retry: None,
        });
    }
    let perturb = matches!(
        stability,
        Stability::Perturbation {
            perturb_before: true
        }
    );
    let attempt = |dt: DType| -> Result<std::result::Result<Tensor, LinalgError>> {
        let mut m = a.to_dtype(dt)?;
        if perturb && epsilon != 0.0 {
            m = (m + (Tensor::eye(n, dt, a.device())? * epsilon)?)?;
        }
        let (w, v) = match device_eigh(&m, 0.0, Order::Ascending)? {
            Ok(x) => x,
            Err(e) => return Ok(Err(e)),
        };
        let powers = crate::with_float!(dt, "inverse_root", T => {
            let w: Vec<T> = w.to_vec1::<T>()?;
            crate::linalg::root_powers::<T>(&w, root, epsilon, stability)
        });
        let p = Tensor::from_vec(powers, (1, n), a.device())?.to_dtype(dt)?;
        let x = v.broadcast_mul(&p)?.matmul(&v.t()?)?;
        finite_as(x, dt)
    };
    with_device_retry(dtype, attempt, |x| finite_as(x, dtype))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn noise(seed: u64, n: usize) -> Vec<f64> {
        crate::testing::xorshift_from_state(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, n)
    }

    fn matrix(seed: u64, r: usize, c: usize, dtype: DType) -> Tensor {
        Tensor::from_vec(noise(seed, r * c), (r, c), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// `G Gᵀ` of a `d×m` noise matrix with its rows scaled by `spread^(i/d)`: eigenvalues over
    /// `spread²` orders of magnitude.
    fn factor(seed: u64, d: usize, spread: f64, dtype: DType) -> Tensor {
        let scale: Vec<f64> = (0..d)
            .map(|i| spread.powf(-(i as f64) / d as f64))
            .collect();
        let g = matrix(seed, d, 2 * d, DType::F64)
            .broadcast_mul(&Tensor::from_vec(scale, (d, 1), &Device::Cpu).unwrap())
            .unwrap();
        g.matmul(&g.t().unwrap()).unwrap().to_dtype(dtype).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn orthogonality_error(q: &Tensor) -> f64 {
        let n = q.dims()[1];
        let qtq = values(&q.t().unwrap().matmul(q).unwrap());
        (0..n * n)
            .map(|k| (qtq[k] - if k / n == k % n { 1.0 } else { 0.0 }).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn cholesky_qr3_equals_householder_up_to_column_signs() {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            for n in [1, 7, 33] {
                let a = matrix(n as u64, n, n, dtype);
                let q = cholesky_qr3(&a).unwrap().expect("well conditioned");
                let h = householder_q(&a).unwrap().unwrap();
                let (q, h) = (values(&q), values(&h));
                for j in 0..n {
                    let sign = if q[j] * h[j] < 0.0 { -1.0 } else { 1.0 };
                    for i in 0..n {
                        let d = (q[i * n + j] - sign * h[i * n + j]).abs();
                        assert!(d <= tol * 10.0, "{dtype:?} n={n} Q[{i},{j}] off by {d:e}");
                    }
                }
                assert!(orthogonality_error(&cholesky_qr3(&a).unwrap().unwrap()) <= tol);
            }
        }
    }

    /// `F·Q` for `Q` near the eigenbasis of `F` (as between two SOAP refreshes), the
    /// eigenvalues of `F` spread over `spread²`.
    fn near_converged_product(spread: f64, dtype: DType) -> Tensor {
        let f = factor(3, 24, spread, DType::F64);
        let e = crate::linalg::eigh(&f, 0.0, crate::linalg::Order::Descending)
            .unwrap()
            .value()
            .unwrap();
        let nudged = (&e.vectors + (matrix(4, 24, 24, DType::F64) * 1e-3).unwrap()).unwrap();
        let q0 = crate::linalg::qr_q(&nudged).unwrap().value().unwrap();
        f.matmul(&q0).unwrap().to_dtype(dtype).unwrap()
    }

    #[test]
    fn scaling_keeps_gram_matrices_in_range() {
        for (dtype, spread, tol) in [
            (DType::F32, 300.0, 1e-6),
            (DType::F32, 1e5, 1e-6),
            (DType::F64, 300.0, 1e-13),
            (DType::F64, 1e5, 1e-13),
        ] {
            let a = near_converged_product(spread, dtype);
            let q = cholesky_qr3(&a)
                .unwrap()
                .unwrap_or_else(|| panic!("{dtype:?} spread {spread:e}: no basis"));
            let err = orthogonality_error(&q);
            assert!(
                err < tol,
                "{dtype:?} spread {spread:e}: |QᵀQ − I| = {err:e}"
            );
        }
        // Products of 1e±25: their f32 Gram matrices overflow or underflow; Cholesky-QR3 scales
        // the columns (and works in f64), so it still finds the basis. So it does for f64
        // products of 1e±150, whose squares near the ends of f64's range.
        for (dtype, magnitude) in [
            (DType::F32, 1e25f64),
            (DType::F32, 1e-25),
            (DType::F64, 1e150),
            (DType::F64, 1e-150),
        ] {
            let a = (near_converged_product(300.0, DType::F64) * magnitude)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let q = cholesky_qr3(&a).unwrap().expect("scaled");
            assert!(orthogonality_error(&q) < 1e-5, "{magnitude:e}");
            if dtype == DType::F32 {
                let plain = cholesky_qr_pass(&a, 0.0, (0.0, f64::INFINITY)).unwrap();
                assert!(plain.is_none(), "unscaled f32 Gram matrix at {magnitude:e}");
            }
        }
    }

    /// `U·diag(σ)·Vᵀ` (`n×n`, f64) with random orthogonal `U`, `V` and singular values spread
    /// geometrically from 1 to `1/κ`.
    fn with_condition_number(seed: u64, n: usize, kappa: f64) -> Tensor {
        let orthogonal = |s| {
            crate::linalg::qr_q(&matrix(s, n, n, DType::F64))
                .unwrap()
                .value()
                .unwrap()
        };
        let (u, v) = (orthogonal(seed), orthogonal(seed + 1));
        let sigma: Vec<f64> = (0..n)
            .map(|i| kappa.powf(-(i as f64) / (n - 1) as f64))
            .collect();
        let sigma = Tensor::from_vec(sigma, (1, n), &Device::Cpu).unwrap();
        u.broadcast_mul(&sigma)
            .unwrap()
            .matmul(&v.t().unwrap())
            .unwrap()
    }

    /// The shift is computed from an estimate of `‖A‖₂²`, and the passes run in f64: f32
    /// matrices of `n = 512` with `κ` up to 1e7 come out orthonormal to f32 precision from
    /// Cholesky-QR3 itself, without the Householder fallback.
    #[test]
    fn ill_conditioned_f32_matrices_give_an_orthonormal_basis() {
        let n = 512;
        for (i, kappa) in [1e3, 1e5, 1e7].into_iter().enumerate() {
            let a = with_condition_number(20 + 2 * i as u64, n, kappa)
                .to_dtype(DType::F32)
                .unwrap();
            let q = cholesky_qr3(&a)
                .unwrap()
                .unwrap_or_else(|| panic!("κ = {kappa:e}: Cholesky-QR3 broke down"));
            assert_eq!(q.dtype(), DType::F32);
            let err = orthogonality_error(&q);
            assert!(err <= 1e-5, "κ = {kappa:e}: max |QᵀQ − I| = {err:e}");
            // It is A's Q: R = QᵀA is upper triangular (to the precision of f32 data).
            let r = values(
                &q.to_dtype(DType::F64)
                    .unwrap()
                    .t()
                    .unwrap()
                    .matmul(&a.to_dtype(DType::F64).unwrap())
                    .unwrap(),
            );
            let below = (0..n * n)
                .filter(|k| k / n > k % n)
                .map(|k| r[k].abs())
                .fold(0.0, f64::max);
            assert!(
                below <= 1e-5,
                "κ = {kappa:e}: QᵀA below the diagonal {below:e}"
            );
        }
    }

    #[test]
    fn the_shift_uses_an_estimate_of_the_spectral_norm() {
        // Orthonormal columns: ‖A‖₂² = 1 while ‖A‖²_F = n.
        let n = 64;
        let q = crate::linalg::qr_q(&matrix(9, n, n, DType::F64))
            .unwrap()
            .value()
            .unwrap();
        let est = spectral_norm_sq(&gram(&q).unwrap(), n as f64).unwrap();
        assert!((1.0..=1.1 + 1e-9).contains(&est), "{est}");
        // A rank-one matrix of unit columns: ‖A‖₂² = n, the cap.
        let ones = Tensor::ones((n, n), DType::F64, &Device::Cpu)
            .unwrap()
            .affine(1.0 / (n as f64).sqrt(), 0.0)
            .unwrap();
        let est = spectral_norm_sq(&gram(&ones).unwrap(), n as f64).unwrap();
        assert!((est - n as f64).abs() < 1e-9, "{est}");
    }

    #[test]
    fn the_refresh_work_is_level_3() {
        let n = 96;
        let f = factor(31, n, 1e3, DType::F32);
        let q0 = crate::optim::kron::identity(n, DType::F32, &Device::Cpu).unwrap();
        let (out, log) = count_work(|| power_iteration_qr(&f, &q0).unwrap());
        out.value().unwrap();
        let total: f64 = log.iter().map(|w| w.flops).sum();
        let blas3: f64 = log
            .iter()
            .filter(|w| w.kind == WorkKind::Blas3)
            .map(|w| w.flops)
            .sum();
        assert!(blas3 / total > 0.95, "{log:?}");
        let nn = (n * n) as f64;
        for w in log.iter().filter(|w| w.kind != WorkKind::Blas3) {
            assert!(w.flops <= 30.0 * nn, "{} is not O(n²): {}", w.op, w.flops);
        }
        // One gemm for F·Q, three Gram products, three potrf, three trsm.
        let count = |op: &str| log.iter().filter(|w| w.op.contains(op)).count();
        assert_eq!(count("gemm"), 4);
        assert_eq!(count("potrf"), 3);
        assert_eq!(count("trsm"), 3);
        assert_eq!(count("Householder"), 0);
        // Outside count_work nothing is logged.
        assert!(count_work(|| ()).1.is_empty());
    }

    #[test]
    fn refresh_matches_the_host_path() {
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
            for (n, spread) in [(5, 10.0), (40, 1e3)] {
                let f = factor(11 + n as u64, n, spread, dtype);
                // A basis near the eigenbasis, as between SOAP refreshes.
                let q0 = crate::linalg::qr_q(&(f.matmul(&matrix(5, n, n, dtype)).unwrap()))
                    .unwrap()
                    .value()
                    .unwrap();
                let host = crate::optim::kron::power_iteration_qr(&f, &q0).unwrap();
                let dev = power_iteration_qr(&f, &q0).unwrap();
                let (hp, hq) = host.value().unwrap();
                let (dp, dq) = dev.value().unwrap();
                assert_eq!(hp, dp, "{dtype:?} n={n}: permutations differ");
                let (hq, dq) = (values(&hq), values(&dq));
                for j in 0..n {
                    let dot: f64 = (0..n).map(|i| hq[i * n + j] * dq[i * n + j]).sum();
                    assert!(
                        (dot.abs() - 1.0).abs() <= tol,
                        "{dtype:?} n={n}: column {j} differs (|cos| = {})",
                        dot.abs()
                    );
                }
            }
        }
    }

    #[test]
    fn rank_deficient_factors_fall_back_to_householder() {
        let n = 6;
        let zero = Tensor::zeros((n, n), DType::F32, &Device::Cpu).unwrap();
        let q0 = crate::optim::kron::identity(n, DType::F32, &Device::Cpu).unwrap();
        assert!(cholesky_qr3(&zero).unwrap().is_none());
        let out = power_iteration_qr(&zero, &q0).unwrap();
        let (_, q) = out.value().expect("Householder completes a zero matrix");
        assert!(orthogonality_error(&q) < 1e-6);
        // Rank one: one nonzero column after the product.
        let v = matrix(2, n, 1, DType::F32);
        let f = v.matmul(&v.t().unwrap()).unwrap();
        let (perm, q) = power_iteration_qr(&f, &q0).unwrap().value().unwrap();
        assert_eq!(perm.len(), n);
        assert!(orthogonality_error(&q) < 1e-5);
    }

    #[test]
    fn non_finite_input_is_a_failure_not_a_basis() {
        let n = 4;
        let q0 = crate::optim::kron::identity(n, DType::F32, &Device::Cpu).unwrap();
        let mut v = vec![0.0f32; n * n];
        v[5] = f32::NAN;
        let f = Tensor::from_vec(v, (n, n), &Device::Cpu).unwrap();
        assert!(power_iteration_qr(&f, &q0).unwrap().is_failed());
    }

    #[test]
    fn cholesky_reports_the_failing_pivot() {
        let c = Tensor::from_vec(vec![4.0f64, 2.0, 2.0, 1.0], (2, 2), &Device::Cpu).unwrap();
        assert_eq!(
            cholesky_upper(&c, (0.0, f64::INFINITY)).unwrap().err(),
            Some(1)
        );
        let c = Tensor::from_vec(vec![4.0f64, 2.0, 2.0, 5.0], (2, 2), &Device::Cpu).unwrap();
        let r = cholesky_upper(&c, (0.0, f64::INFINITY)).unwrap().unwrap();
        assert_eq!(values(&r), vec![2.0, 1.0, 0.0, 2.0]);
        // Pivots 4 and 4: outside [1/4, 2] the second fails.
        assert_eq!(cholesky_upper(&c, (0.25, 2.0)).unwrap().err(), Some(0));
        // X·R = A.
        let a = Tensor::from_vec(vec![2.0f64, 3.0, 4.0, 4.0], (2, 2), &Device::Cpu).unwrap();
        let x = solve_upper_right(&a, &r).unwrap();
        assert_eq!(values(&x), vec![1.0, 1.0, 2.0, 1.0]);
    }
}
