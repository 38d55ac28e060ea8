//! Dense linear algebra for the Kronecker-factored preconditioners (SOAP, Shampoo), on faer.
//!
//! Everything here works on small square factors (`d×d`, `d` up to a few thousand) held by
//! candle tensors: a tensor is copied once into a row-major `Vec`, faer works on a zero-copy view
//! of it, and the result is copied once back into a tensor. Those copies are `O(d²)` against the
//! `O(d³)` decompositions, so a refresh costs the decomposition, not the conversion. The slice
//! functions (`*_slice`) are public for callers that already hold `Vec`s.
//!
//! Parallelism is chosen per call, never through faer's global setting: matrices below
//! [`PARALLEL_MIN_DIM`] run sequentially (faer's threaded QR is several times *slower* at
//! `d = 256` on two cores), larger ones on rayon's pool. Results do not depend on the size of
//! that pool: products and QR split their work by output blocks, whose sums do not depend on
//! the thread count, but faer's symmetric eigendecomposition chooses its splits from the
//! parallel degree it is given, and `Par::rayon(0)` reads the size of the pool it runs in (a
//! Shampoo factor of 703 rows came out different on 1, 2 and 4 threads). The eigendecomposition
//! therefore always gets the fixed degree [`EIGH_DEGREE`].
//!
//! Robustness policy ([`Robust`]): a symmetric eigendecomposition (and everything built on it)
//! that fails to converge, panics or returns non-finite values is retried in f64 (f32 inputs);
//! if that fails too the caller gets [`Robust::Failed`], keeps its previous basis or root, and
//! counts the failure. Malformed input (not a square matrix, not f32/f64) is an `Err`, never a
//! panic.

pub mod on_device;

use std::panic::{catch_unwind, AssertUnwindSafe};

use candle_core::{DType, Device, Tensor};
use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self_adjoint_evd, self_adjoint_evd_scratch, ComputeEigenvectors};
use faer::linalg::householder::{
    apply_block_householder_sequence_on_the_left_in_place_scratch,
    apply_block_householder_sequence_on_the_left_in_place_with_conj,
};
use faer::linalg::matmul::matmul;
use faer::linalg::qr::no_pivoting::factor::{
    qr_in_place, qr_in_place_scratch, recommended_block_size,
};
use faer::{Accum, Conj, Mat, MatMut, MatRef, Par};

use crate::error::{Error, Result};
use crate::float::Float;

/// Matrices with at least this many rows use faer's rayon parallelism; smaller ones run
/// sequentially (measured: threads only pay off from about `d = 512`).
pub const PARALLEL_MIN_DIM: usize = 512;

/// The parallelism used for a `d×d` problem.
pub fn par_for(d: usize) -> Par {
    if d >= PARALLEL_MIN_DIM {
        Par::rayon(0)
    } else {
        Par::Seq
    }
}

/// The parallel degree of the symmetric eigendecomposition of a matrix of at least
/// [`PARALLEL_MIN_DIM`] rows, whatever the pool: 1, the degree such runs had on one thread
/// before it was fixed, so results of one-thread runs are unchanged (it costs the threaded
/// speed-up of that decomposition; products and QR keep theirs).
pub const EIGH_DEGREE: usize = 1;

/// The parallelism of the eigendecomposition of a `d×d` matrix: sequential below
/// [`PARALLEL_MIN_DIM`], else faer's parallel algorithm with the fixed degree [`EIGH_DEGREE`].
pub fn eigh_par(d: usize) -> Par {
    if d >= PARALLEL_MIN_DIM {
        Par::rayon(EIGH_DEGREE)
    } else {
        Par::Seq
    }
}

/// The element types the decompositions run in: f32 and f64.
pub trait Scalar: Float + faer::traits::RealField {}
impl Scalar for f32 {}
impl Scalar for f64 {}

/// Order of eigenvalues (and of the matching eigenvector columns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Smallest first (LAPACK's and faer's order).
    Ascending,
    /// Largest first (SOAP's `flip` of the eigh basis).
    Descending,
}

/// Why a decomposition gave no usable result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinalgError {
    /// The iterative eigensolver did not converge.
    NoConvergence,
    /// The input holds NaN or infinity (retrying cannot help).
    NonFiniteInput,
    /// The result holds NaN or infinity.
    NonFiniteOutput,
    /// A coupled Newton iteration ended without reaching its tolerance.
    NotConverged {
        /// Final `max |M − I|`.
        error: String,
    },
    /// The solver panicked (caught); the message.
    Panicked(String),
    /// A device solver (cuSOLVER) reported an error; its status.
    Solver(String),
}

impl std::fmt::Display for LinalgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinalgError::NoConvergence => write!(f, "eigensolver did not converge"),
            LinalgError::NonFiniteInput => write!(f, "input holds NaN or infinity"),
            LinalgError::NonFiniteOutput => write!(f, "result holds NaN or infinity"),
            LinalgError::NotConverged { error } => {
                write!(f, "coupled Newton did not converge (max |M - I| = {error})")
            }
            LinalgError::Panicked(m) => write!(f, "solver panicked: {m}"),
            LinalgError::Solver(m) => write!(f, "device solver failed: {m}"),
        }
    }
}

/// The outcome of a decomposition under the robustness policy, typed so that callers count
/// retries and failures.
#[derive(Debug, Clone)]
pub enum Robust<V> {
    /// Succeeded in the input precision.
    Done(V),
    /// Failed in f32, succeeded when retried in f64 (result cast back to f32).
    RetriedF64 {
        /// The result.
        value: V,
        /// Why the f32 attempt failed.
        first: LinalgError,
    },
    /// No usable result: the caller keeps what it had and counts the failure.
    Failed {
        /// Why the first attempt failed.
        first: LinalgError,
        /// Why the f64 retry failed (`None` when no retry was made: f64 input, or an input
        /// that is not finite).
        retry: Option<LinalgError>,
    },
}

impl<V> Robust<V> {
    /// The result, if any.
    pub fn value(self) -> Option<V> {
        match self {
            Robust::Done(v) | Robust::RetriedF64 { value: v, .. } => Some(v),
            Robust::Failed { .. } => None,
        }
    }

    /// A reference to the result, if any.
    pub fn as_value(&self) -> Option<&V> {
        match self {
            Robust::Done(v) | Robust::RetriedF64 { value: v, .. } => Some(v),
            Robust::Failed { .. } => None,
        }
    }

    /// Whether no result was produced.
    pub fn is_failed(&self) -> bool {
        matches!(self, Robust::Failed { .. })
    }

    /// Whether the result needed the f64 retry.
    pub fn was_retried(&self) -> bool {
        matches!(self, Robust::RetriedF64 { .. })
    }

    /// Maps the result.
    pub fn map<W>(self, f: impl FnOnce(V) -> W) -> Robust<W> {
        match self {
            Robust::Done(v) => Robust::Done(f(v)),
            Robust::RetriedF64 { value, first } => Robust::RetriedF64 {
                value: f(value),
                first,
            },
            Robust::Failed { first, retry } => Robust::Failed { first, retry },
        }
    }

    /// Maps the result with a fallible function (an `Err` is a hard error, not a failure).
    pub fn try_map<W>(self, f: impl FnOnce(V) -> Result<W>) -> Result<Robust<W>> {
        Ok(match self {
            Robust::Done(v) => Robust::Done(f(v)?),
            Robust::RetriedF64 { value, first } => Robust::RetriedF64 {
                value: f(value)?,
                first,
            },
            Robust::Failed { first, retry } => Robust::Failed { first, retry },
        })
    }
}

/// Runs `f`, turning a panic into [`LinalgError::Panicked`].
fn guarded<R>(
    f: impl FnOnce() -> std::result::Result<R, LinalgError>,
) -> std::result::Result<R, LinalgError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(LinalgError::Panicked(msg))
        }
    }
}

fn finite<T: Scalar>(v: &[T]) -> bool {
    v.iter().all(|x| num_traits::Float::is_finite(*x))
}

/// Runs `attempt` in `T`, and when it fails for an `f32` input that is finite, again in f64 with
/// the result cast back (and checked finite after the cast).
fn with_f64_retry<T: Scalar, V>(
    input_finite: bool,
    attempt: impl Fn() -> std::result::Result<V, LinalgError>,
    attempt_f64: impl Fn() -> std::result::Result<V, LinalgError>,
) -> Robust<V> {
    if !input_finite {
        return Robust::Failed {
            first: LinalgError::NonFiniteInput,
            retry: None,
        };
    }
    match guarded(attempt) {
        Ok(v) => Robust::Done(v),
        Err(first) if T::DTYPE == DType::F64 => Robust::Failed { first, retry: None },
        Err(first) => match guarded(attempt_f64) {
            Ok(value) => Robust::RetriedF64 { value, first },
            Err(retry) => Robust::Failed {
                first,
                retry: Some(retry),
            },
        },
    }
}

fn cast<A: Float, B: Float>(v: &[A]) -> Vec<B> {
    v.iter().map(|x| B::of(x.f64())).collect()
}

// ---------------------------------------------------------------------------------------------
// Slice level (row-major buffers)
// ---------------------------------------------------------------------------------------------

/// Row-major `n×n` product `a · b` (`a` is `m×k`, `b` is `k×n`).
pub fn matmul_slice<T: Scalar>(a: &[T], b: &[T], m: usize, k: usize, n: usize) -> Vec<T> {
    let mut out = vec![T::of(0.0); m * n];
    if m == 0 || n == 0 {
        return out;
    }
    {
        let lhs = MatRef::from_row_major_slice(a, m, k);
        let rhs = MatRef::from_row_major_slice(b, k, n);
        let dst = MatMut::from_row_major_slice_mut(&mut out, m, n);
        matmul(
            dst,
            Accum::Replace,
            lhs,
            rhs,
            T::of(1.0),
            par_for(m.max(n).max(k)),
        );
    }
    out
}

/// `A Aᵀ` for the `d×k` matrix `a` given as a faer view (any strides), as a row-major `d×d`
/// buffer: only the lower triangle is computed (a symmetric rank-k product, half the
/// multiply-adds of a full product), then mirrored, so the result is exactly symmetric.
pub fn gram_slice<T: Scalar>(a: MatRef<'_, T>) -> Vec<T> {
    use faer::linalg::matmul::triangular::{matmul as tri_matmul, BlockStructure};
    let (d, k) = (a.nrows(), a.ncols());
    let mut out = vec![T::of(0.0); d * d];
    if d == 0 {
        return out;
    }
    {
        let dst = MatMut::from_row_major_slice_mut(&mut out, d, d);
        tri_matmul(
            dst,
            BlockStructure::TriangularLower,
            Accum::Replace,
            a,
            BlockStructure::Rectangular,
            a.transpose(),
            BlockStructure::Rectangular,
            T::of(1.0),
            par_for(d.max(k)),
        );
    }
    for i in 0..d {
        for j in 0..i {
            out[j * d + i] = out[i * d + j];
        }
    }
    out
}

/// Symmetric eigendecomposition of the row-major `n×n` matrix `a` (only its lower triangle is
/// read, as LAPACK's default `UPLO='L'`), without retries.
///
/// Returns `(eigenvalues, eigenvectors)`: the eigenvectors are the *columns* of the row-major
/// `n×n` result, in the same order as the eigenvalues. faer's solver (Householder
/// tridiagonalisation, then QR iterations or divide and conquer) keeps an exactly
/// block-diagonal input block-diagonal: the eigenvectors of a block stay supported on it.
pub fn eigh_slice<T: Scalar>(
    a: &[T],
    n: usize,
    order: Order,
) -> std::result::Result<(Vec<T>, Vec<T>), LinalgError> {
    assert_eq!(a.len(), n * n, "eigh_slice: buffer is not n×n");
    if !finite(a) {
        return Err(LinalgError::NonFiniteInput);
    }
    if n == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let par = eigh_par(n);
    let mat = MatRef::from_row_major_slice(a, n, n);
    let mut u = Mat::<T>::zeros(n, n);
    let mut s = Diag::<T>::zeros(n);
    let mut mem = MemBuffer::new(self_adjoint_evd_scratch::<T>(
        n,
        ComputeEigenvectors::Yes,
        par,
        Default::default(),
    ));
    self_adjoint_evd(
        mat,
        s.as_mut(),
        Some(u.as_mut()),
        par,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .map_err(|_| LinalgError::NoConvergence)?;
    let col = |j: usize| match order {
        Order::Ascending => j,
        Order::Descending => n - 1 - j,
    };
    let sc = s.column_vector();
    let values: Vec<T> = (0..n).map(|j| sc[col(j)]).collect();
    let mut vectors = vec![T::of(0.0); n * n];
    for i in 0..n {
        for j in 0..n {
            vectors[i * n + j] = u[(i, col(j))];
        }
    }
    if !finite(&values) || !finite(&vectors) {
        return Err(LinalgError::NonFiniteOutput);
    }
    Ok((values, vectors))
}

/// [`eigh_slice`] of `a + shift·I` under the robustness policy (f32 retried in f64).
pub fn eigh_robust_slice<T: Scalar>(
    a: &[T],
    n: usize,
    shift: f64,
    order: Order,
) -> Robust<(Vec<T>, Vec<T>)> {
    let shifted = |a: &[T]| -> Vec<T> {
        let mut m = a.to_vec();
        if shift != 0.0 {
            for i in 0..n {
                m[i * n + i] += T::of(shift);
            }
        }
        m
    };
    with_f64_retry::<T, _>(
        finite(a),
        || eigh_slice(&shifted(a), n, order),
        || {
            let a64: Vec<f64> = cast(a);
            let mut m = a64;
            for i in 0..n {
                m[i * n + i] += shift;
            }
            let (w, v) = eigh_slice(&m, n, order)?;
            let (w, v): (Vec<T>, Vec<T>) = (cast(&w), cast(&v));
            if !finite(&w) || !finite(&v) {
                return Err(LinalgError::NonFiniteOutput);
            }
            Ok((w, v))
        },
    )
}

/// The orthonormal factor `Q` of the reduced Householder QR of the row-major `m×n` matrix `a`:
/// an `m×min(m,n)` row-major buffer. Column signs follow faer's Householder convention (SOAP
/// and Shampoo do not depend on them).
pub fn qr_q_slice<T: Scalar>(
    a: &[T],
    m: usize,
    n: usize,
) -> std::result::Result<Vec<T>, LinalgError> {
    assert_eq!(a.len(), m * n, "qr_q_slice: buffer is not m×n");
    if !finite(a) {
        return Err(LinalgError::NonFiniteInput);
    }
    let size = m.min(n);
    if size == 0 {
        return Ok(Vec::new());
    }
    let par = par_for(m.max(n));
    let mut qr = Mat::<T>::from_fn(m, n, |i, j| a[i * n + j]);
    let block = recommended_block_size::<T>(m, n);
    let mut coeff = Mat::<T>::zeros(block, size);
    {
        let mut mem = MemBuffer::new(qr_in_place_scratch::<T>(
            m,
            n,
            block,
            par,
            Default::default(),
        ));
        qr_in_place(
            qr.as_mut(),
            coeff.as_mut(),
            par,
            MemStack::new(&mut mem),
            Default::default(),
        );
    }
    // The Householder vectors: unit lower trapezoidal part of the factored matrix.
    let basis = Mat::<T>::from_fn(m, size, |i, j| {
        if i == j {
            T::of(1.0)
        } else if i > j {
            qr[(i, j)]
        } else {
            T::of(0.0)
        }
    });
    let mut q = Mat::<T>::from_fn(m, size, |i, j| if i == j { T::of(1.0) } else { T::of(0.0) });
    {
        let mut mem = MemBuffer::new(
            apply_block_householder_sequence_on_the_left_in_place_scratch::<T>(m, block, size),
        );
        apply_block_householder_sequence_on_the_left_in_place_with_conj(
            basis.as_ref(),
            coeff.as_ref(),
            Conj::No,
            q.as_mut(),
            par,
            MemStack::new(&mut mem),
        );
    }
    let mut out = vec![T::of(0.0); m * size];
    for i in 0..m {
        for j in 0..size {
            out[i * size + j] = q[(i, j)];
        }
    }
    if !finite(&out) {
        return Err(LinalgError::NonFiniteOutput);
    }
    Ok(out)
}

/// [`qr_q_slice`] under the robustness policy (f32 retried in f64).
pub fn qr_q_robust_slice<T: Scalar>(a: &[T], m: usize, n: usize) -> Robust<Vec<T>> {
    with_f64_retry::<T, _>(
        finite(a),
        || qr_q_slice(a, m, n),
        || {
            let q = qr_q_slice::<f64>(&cast(a), m, n)?;
            let q: Vec<T> = cast(&q);
            if !finite(&q) {
                return Err(LinalgError::NonFiniteOutput);
            }
            Ok(q)
        },
    )
}

/// How eigenvalues that are zero, negative or tiny are made safe before `λ^(−1/root)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stability {
    /// DistributedShampoo's `PerturbationConfig`. With `perturb_before`, the matrix is
    /// decomposed as `A + εI` and, if the smallest eigenvalue is still below `ε`, every
    /// eigenvalue is shifted by `ε − λ_min`. Without it, `A` is decomposed as is and the
    /// eigenvalues are shifted by `ε − min(λ_min, 0)`.
    Perturbation {
        /// Add `εI` before the decomposition (DistributedShampoo's default `true`).
        perturb_before: bool,
    },
    /// DistributedShampoo's `PseudoInverseConfig` (`ε` must be 0): eigenvalues at or below
    /// `max(rank_atol, rank_rtol·max(λ_max, 0))` map to 0 instead of `λ^(−1/root)`;
    /// `rank_rtol = None` means `n·machine-ε` of the working precision.
    PseudoInverse {
        /// Absolute cutoff.
        rank_atol: f64,
        /// Relative cutoff (`None`: `n·machine-ε`).
        rank_rtol: Option<f64>,
    },
}

impl Default for Stability {
    fn default() -> Self {
        Stability::Perturbation {
            perturb_before: true,
        }
    }
}

/// How an inverse root is computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RootMethod {
    /// Through a symmetric eigendecomposition (DistributedShampoo's `EigenConfig`).
    Eigen(Stability),
    /// Coupled inverse Newton iteration (DistributedShampoo's `CoupledNewtonConfig`), for
    /// integer roots only: `z = (p+1)/(2‖A+εI‖_F)`, `X = z^{1/p} I`, `M = z(A+εI)`, then
    /// `M_p = (1+1/p)I − M/p; X ← X·M_p; M ← M_p^p·M` while `max|M − I| > tolerance`.
    CoupledNewton {
        /// Iteration cap (reference default 100).
        max_iterations: usize,
        /// Stop when the largest entry of `|M − I|` is at most this (reference default 1e-6).
        tolerance: f64,
    },
}

impl Default for RootMethod {
    fn default() -> Self {
        RootMethod::Eigen(Stability::default())
    }
}

/// A matrix inverse root request: `(A + εI)^(−1/root)` with `A` symmetric positive semidefinite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InverseRoot {
    /// The root `r` (2 for the inverse square root; any positive value for the eigen method,
    /// a positive integer for coupled Newton).
    pub root: f64,
    /// The regularizer `ε` (see [`Stability`] for where it goes).
    pub epsilon: f64,
    /// The method.
    pub method: RootMethod,
}

impl InverseRoot {
    /// Checks the request, naming the bad value.
    pub fn validate(&self) -> Result<()> {
        if !(self.root.is_finite() && self.root > 0.0) {
            return Err(Error::Msg(format!(
                "inverse root: root must be finite and > 0, got {}",
                self.root
            )));
        }
        if !(self.epsilon.is_finite() && self.epsilon >= 0.0) {
            return Err(Error::Msg(format!(
                "inverse root: epsilon must be finite and >= 0, got {}",
                self.epsilon
            )));
        }
        match self.method {
            RootMethod::Eigen(Stability::PseudoInverse { .. }) if self.epsilon != 0.0 => {
                Err(Error::Msg(format!(
                    "inverse root: the pseudo-inverse needs epsilon = 0, got {}",
                    self.epsilon
                )))
            }
            RootMethod::CoupledNewton { .. } if self.root.fract() != 0.0 => {
                Err(Error::Msg(format!(
                    "inverse root: coupled Newton needs an integer root, got {}",
                    self.root
                )))
            }
            _ => Ok(()),
        }
    }
}

/// `Q · diag(f(λ)) · Qᵀ` for the row-major eigenvectors `q` (columns) and eigenvalues `w`,
/// where `f` maps the eigenvalues as the [`Stability`] rule says, to the power `−1/root`.
///
/// `w` are the eigenvalues of the matrix that was decomposed (for `perturb_before`, of `A + εI`).
pub fn inverse_root_from_eigh<T: Scalar>(
    w: &[T],
    q: &[T],
    root: f64,
    epsilon: f64,
    stability: Stability,
) -> Vec<T> {
    let n = w.len();
    let power = root_powers(w, root, epsilon, stability);
    // (Q · diag(p)) · Qᵀ
    let mut qd = q.to_vec();
    for i in 0..n {
        for j in 0..n {
            qd[i * n + j] *= T::of(power[j]);
        }
    }
    let mut qt = vec![T::of(0.0); n * n];
    for i in 0..n {
        for j in 0..n {
            qt[j * n + i] = q[i * n + j];
        }
    }
    matmul_slice(&qd, &qt, n, n, n)
}

/// The diagonal of [`inverse_root_from_eigh`]: each eigenvalue mapped as the [`Stability`]
/// rule says, to the power `−1/root` (in f64). Shared by the host and the device paths.
pub fn root_powers<T: Scalar>(w: &[T], root: f64, epsilon: f64, stability: Stability) -> Vec<f64> {
    let n = w.len();
    let w64: Vec<f64> = w.iter().map(|x| x.f64()).collect();
    let lmin = w64.iter().copied().fold(f64::INFINITY, f64::min);
    let power: Vec<f64> = match stability {
        Stability::Perturbation { perturb_before } => {
            let shift = if perturb_before {
                if lmin < epsilon {
                    -lmin
                } else {
                    0.0
                }
            } else {
                -lmin.min(0.0)
            };
            let add_eps = !perturb_before || lmin < epsilon;
            w64.iter()
                .map(|&l| {
                    // Two separate additions, in the working precision, as the reference does.
                    let mut l = T::of(l);
                    if shift != 0.0 || add_eps {
                        l += T::of(shift);
                    }
                    if add_eps {
                        l += T::of(epsilon);
                    }
                    num_traits::Float::powf(l.f64(), -1.0 / root)
                })
                .collect()
        }
        Stability::PseudoInverse {
            rank_atol,
            rank_rtol,
        } => {
            let machine_eps = if T::DTYPE == DType::F32 {
                f32::EPSILON as f64
            } else {
                f64::EPSILON
            };
            let rtol = rank_rtol.unwrap_or(n as f64 * machine_eps);
            let lmax = w64
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max)
                .max(0.0);
            let cutoff = rank_atol.max(rtol * lmax);
            w64.iter()
                .map(|&l| {
                    if l <= cutoff {
                        0.0
                    } else {
                        l.powf(-1.0 / root)
                    }
                })
                .collect()
        }
    };
    power
}

fn coupled_newton<T: Scalar>(
    a: &[T],
    n: usize,
    root: u32,
    epsilon: f64,
    max_iterations: usize,
    tolerance: f64,
) -> std::result::Result<Vec<T>, LinalgError> {
    let p = root as f64;
    let alpha = -1.0 / p;
    let mut ridge = a.to_vec();
    if epsilon != 0.0 {
        for i in 0..n {
            ridge[i * n + i] += T::of(epsilon);
        }
    }
    let norm = ridge.iter().map(|x| x.f64() * x.f64()).sum::<f64>().sqrt();
    let z = (p + 1.0) / (2.0 * norm);
    let eye = |s: f64| -> Vec<T> {
        let mut m = vec![T::of(0.0); n * n];
        for i in 0..n {
            m[i * n + i] = T::of(s);
        }
        m
    };
    let mut x = eye(z.powf(-alpha));
    let mut m: Vec<T> = ridge.iter().map(|&v| T::of(z) * v).collect();
    let err = |m: &[T]| -> f64 {
        let mut e: f64 = 0.0;
        for i in 0..n {
            for j in 0..n {
                let target = if i == j { 1.0 } else { 0.0 };
                e = e.max((m[i * n + j].f64() - target).abs());
            }
        }
        e
    };
    let mut error = err(&m);
    let mut iteration = 0;
    while error > tolerance && iteration < max_iterations {
        iteration += 1;
        let mp: Vec<T> = m
            .iter()
            .enumerate()
            .map(|(k, &v)| {
                let diag = if k / n == k % n { 1.0 - alpha } else { 0.0 };
                v * T::of(alpha) + T::of(diag)
            })
            .collect();
        x = matmul_slice(&x, &mp, n, n, n);
        m = matmul_slice(&matrix_power(&mp, n, root), &m, n, n, n);
        error = err(&m);
        if !error.is_finite() {
            return Err(LinalgError::NonFiniteOutput);
        }
    }
    if !finite(&x) {
        return Err(LinalgError::NonFiniteOutput);
    }
    if error > tolerance {
        return Err(LinalgError::NotConverged {
            error: format!("{error:e}"),
        });
    }
    Ok(x)
}

/// `a^p` for a row-major `n×n` matrix, by binary powering.
fn matrix_power<T: Scalar>(a: &[T], n: usize, mut p: u32) -> Vec<T> {
    let mut result: Option<Vec<T>> = None;
    let mut base = a.to_vec();
    loop {
        if p & 1 == 1 {
            result = Some(match result {
                None => base.clone(),
                Some(r) => matmul_slice(&r, &base, n, n, n),
            });
        }
        p >>= 1;
        if p == 0 {
            break;
        }
        base = matmul_slice(&base, &base, n, n, n);
    }
    result.unwrap_or_else(|| {
        let mut m = vec![T::of(0.0); n * n];
        for i in 0..n {
            m[i * n + i] = T::of(1.0);
        }
        m
    })
}

fn inverse_root_once<T: Scalar>(
    a: &[T],
    n: usize,
    req: &InverseRoot,
) -> std::result::Result<Vec<T>, LinalgError> {
    match req.method {
        RootMethod::Eigen(stability) => {
            let perturb = matches!(
                stability,
                Stability::Perturbation {
                    perturb_before: true
                }
            );
            let mut m = a.to_vec();
            if perturb && req.epsilon != 0.0 {
                for i in 0..n {
                    m[i * n + i] += T::of(req.epsilon);
                }
            }
            let (w, q) = eigh_slice(&m, n, Order::Ascending)?;
            let out = inverse_root_from_eigh(&w, &q, req.root, req.epsilon, stability);
            if finite(&out) {
                Ok(out)
            } else {
                Err(LinalgError::NonFiniteOutput)
            }
        }
        RootMethod::CoupledNewton {
            max_iterations,
            tolerance,
        } => coupled_newton(
            a,
            n,
            req.root as u32,
            req.epsilon,
            max_iterations,
            tolerance,
        ),
    }
}

/// `(A + εI)^(−1/root)` of the row-major `n×n` symmetric matrix `a`, under the robustness
/// policy (f32 retried in f64). The request must be valid ([`InverseRoot::validate`]).
pub fn inverse_root_slice<T: Scalar>(a: &[T], n: usize, req: &InverseRoot) -> Robust<Vec<T>> {
    with_f64_retry::<T, _>(
        finite(a),
        || inverse_root_once(a, n, req),
        || {
            let x = inverse_root_once::<f64>(&cast(a), n, req)?;
            let x: Vec<T> = cast(&x);
            if finite(&x) {
                Ok(x)
            } else {
                Err(LinalgError::NonFiniteOutput)
            }
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Tensor level
// ---------------------------------------------------------------------------------------------

/// A symmetric eigendecomposition as tensors of the input's dtype and device.
#[derive(Debug, Clone)]
pub struct Eigh {
    /// Eigenvalues, shape `(n,)`.
    pub values: Tensor,
    /// Eigenvectors as columns, shape `(n, n)`, in the order of `values`.
    pub vectors: Tensor,
}

/// The side of a square matrix tensor, or an error naming what is wrong.
pub fn square_side(a: &Tensor, what: &str) -> Result<usize> {
    match a.dims() {
        [m, n] if m == n => Ok(*m),
        dims => Err(Error::Msg(format!(
            "{what}: expected a square matrix, got shape {dims:?}"
        ))),
    }
}

/// The elements of a tensor as a row-major `Vec<T>` (one copy).
pub fn to_vec<T: Scalar>(t: &Tensor) -> Result<Vec<T>> {
    Ok(t.flatten_all()?.to_vec1::<T>()?)
}

/// A row-major buffer as a tensor of `shape` on `device` (one copy).
pub fn from_vec<T: Scalar>(v: Vec<T>, shape: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// Symmetric eigendecomposition of `a + shift·I` (lower triangle read), eigenvalues in `order`,
/// for f32/f64 tensors, under the robustness policy.
///
/// `Err` only for malformed input (not square, unsupported dtype); numerical trouble is a
/// [`Robust::Failed`] outcome.
pub fn eigh(a: &Tensor, shift: f64, order: Order) -> Result<Robust<Eigh>> {
    let n = square_side(a, "eigh")?;
    #[cfg(feature = "cuda")]
    if a.device().is_cuda() {
        return on_device::eigh(a, shift, order);
    }
    let device = a.device().clone();
    crate::with_float!(a.dtype(), "eigh", T => {
        let v = to_vec::<T>(a)?;
        eigh_robust_slice::<T>(&v, n, shift, order).try_map(|(w, q)| {
            Ok(Eigh {
                values: from_vec(w, &[n], &device)?,
                vectors: from_vec(q, &[n, n], &device)?,
            })
        })
    })
}

/// The orthonormal factor of the reduced QR decomposition of a 2-D f32/f64 tensor
/// (`m×min(m,n)`), under the robustness policy.
pub fn qr_q(a: &Tensor) -> Result<Robust<Tensor>> {
    let (m, n) = match a.dims() {
        [m, n] => (*m, *n),
        dims => {
            return Err(Error::Msg(format!(
                "qr: expected a matrix, got shape {dims:?}"
            )))
        }
    };
    let device = a.device().clone();
    crate::with_float!(a.dtype(), "qr", T => {
        let v = to_vec::<T>(a)?;
        qr_q_robust_slice::<T>(&v, m, n).try_map(|q| from_vec(q, &[m, m.min(n)], &device))
    })
}

/// `(A + εI)^(−1/root)` of a symmetric positive semidefinite f32/f64 matrix, as `req` says,
/// under the robustness policy.
pub fn inverse_root(a: &Tensor, req: &InverseRoot) -> Result<Robust<Tensor>> {
    req.validate()?;
    let n = square_side(a, "inverse_root")?;
    #[cfg(feature = "cuda")]
    if let (true, RootMethod::Eigen(stability)) = (a.device().is_cuda(), req.method) {
        return on_device::inverse_root(a, req.root, req.epsilon, stability);
    }
    let device = a.device().clone();
    crate::with_float!(a.dtype(), "inverse_root", T => {
        let v = to_vec::<T>(a)?;
        inverse_root_slice::<T>(&v, n, req).try_map(|x| from_vec(x, &[n, n], &device))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::noise;

    /// `G Gᵀ` for a random `n×k` G (rank min(n, k)).
    fn gram(seed: u64, n: usize, k: usize) -> Vec<f64> {
        let g = noise(seed, n * k);
        let mut gt = vec![0.0; k * n];
        for i in 0..n {
            for j in 0..k {
                gt[j * n + i] = g[i * k + j];
            }
        }
        matmul_slice(&g, &gt, n, k, n)
    }

    fn transpose(a: &[f64], m: usize, n: usize) -> Vec<f64> {
        let mut t = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                t[j * m + i] = a[i * n + j];
            }
        }
        t
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    fn identity(n: usize) -> Vec<f64> {
        let mut m = vec![0.0; n * n];
        for i in 0..n {
            m[i * n + i] = 1.0;
        }
        m
    }

    /// ‖A V − V diag(w)‖_max / max(1, ‖A‖_max) and ‖VᵀV − I‖_max.
    fn residuals(a: &[f64], w: &[f64], v: &[f64], n: usize) -> (f64, f64) {
        let av = matmul_slice(a, v, n, n, n);
        let mut vd = v.to_vec();
        for i in 0..n {
            for j in 0..n {
                vd[i * n + j] *= w[j];
            }
        }
        let scale = a.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        let res = max_abs_diff(&av, &vd) / scale;
        let vtv = matmul_slice(&transpose(v, n, n), v, n, n, n);
        (res, max_abs_diff(&vtv, &identity(n)))
    }

    #[test]
    fn eigh_residual_and_orthogonality_f64() {
        for &n in &[1usize, 2, 7, 33, 64] {
            let a = gram(n as u64, n, n + 3);
            let (w, v) = eigh_slice(&a, n, Order::Ascending).unwrap();
            let (res, orth) = residuals(&a, &w, &v, n);
            assert!(res < 1e-13, "n={n} residual {res:e}");
            assert!(orth < 1e-13, "n={n} orthogonality {orth:e}");
            assert!(w.windows(2).all(|p| p[0] <= p[1]), "ascending order");
        }
    }

    #[test]
    fn descending_order_reverses_columns() {
        let n = 9;
        let a = gram(3, n, 12);
        let (wa, va) = eigh_slice(&a, n, Order::Ascending).unwrap();
        let (wd, vd) = eigh_slice(&a, n, Order::Descending).unwrap();
        assert!(wd.windows(2).all(|p| p[0] >= p[1]));
        for j in 0..n {
            assert_eq!(wd[j], wa[n - 1 - j]);
            for i in 0..n {
                assert_eq!(vd[i * n + j], va[i * n + n - 1 - j]);
            }
        }
    }

    #[test]
    fn block_diagonal_input_stays_block_diagonal() {
        // A 10×10 matrix whose last four rows/columns are zero (a gradient with four zero
        // columns): the null space must come out as exactly span(e7..e10).
        let n = 10;
        let g = noise(11, 6 * 6);
        let mut gfull = vec![0.0; 6 * n];
        for i in 0..6 {
            for j in 0..6 {
                gfull[i * n + j] = g[i * 6 + j];
            }
        }
        let a = matmul_slice(&transpose(&gfull, 6, n), &gfull, n, 6, n);
        for order in [Order::Ascending, Order::Descending] {
            let r = eigh_robust_slice(&a, n, 1e-30, order);
            let (w, v) = r.value().unwrap();
            let (res, orth) = residuals(&a, &w, &v, n);
            assert!(res < 1e-13 && orth < 1e-13);
            for j in 0..n {
                let col: Vec<f64> = (0..n).map(|i| v[i * n + j]).collect();
                let top = col[..6].iter().map(|x| x * x).sum::<f64>();
                let bottom = col[6..].iter().map(|x| x * x).sum::<f64>();
                // Every eigenvector lives exactly in one block.
                assert!(
                    top == 0.0 || bottom == 0.0,
                    "column {j} mixes blocks: {top:e} / {bottom:e}"
                );
                if bottom != 0.0 {
                    // Null-space vectors are unit vectors, up to sign.
                    let nz = col.iter().filter(|x| **x != 0.0).count();
                    assert_eq!(nz, 1, "null-space column {j} is not a unit vector: {col:?}");
                }
            }
        }
        // The same above faer's divide-and-conquer threshold: 100 dense + 60 zero columns.
        let (n, k) = (160, 100);
        let g = noise(12, 120 * k);
        let mut gfull = vec![0.0; 120 * n];
        for i in 0..120 {
            for j in 0..k {
                gfull[i * n + j] = g[i * k + j];
            }
        }
        let a = matmul_slice(&transpose(&gfull, 120, n), &gfull, n, 120, n);
        let (w, v) = eigh_robust_slice(&a, n, 1e-30, Order::Descending)
            .value()
            .unwrap();
        let (res, orth) = residuals(&a, &w, &v, n);
        assert!(res < 1e-12 && orth < 1e-12, "{res:e} {orth:e}");
        for j in 0..n {
            let top = (0..k).map(|i| v[i * n + j].abs()).sum::<f64>();
            let bottom = (k..n).map(|i| v[i * n + j].abs()).sum::<f64>();
            assert!(
                top == 0.0 || bottom == 0.0,
                "n=160: column {j} mixes blocks"
            );
        }
        // Two dense blocks (3×3 and 4×4) decouple too.
        let n = 7;
        let b1 = gram(5, 3, 5);
        let b2 = gram(6, 4, 6);
        let mut a = vec![0.0; n * n];
        for i in 0..3 {
            for j in 0..3 {
                a[i * n + j] = b1[i * 3 + j];
            }
        }
        for i in 0..4 {
            for j in 0..4 {
                a[(i + 3) * n + j + 3] = b2[i * 4 + j];
            }
        }
        let (_, v) = eigh_slice(&a, n, Order::Descending).unwrap();
        for j in 0..n {
            let top = (0..3).map(|i| v[i * n + j].abs()).sum::<f64>();
            let bottom = (3..n).map(|i| v[i * n + j].abs()).sum::<f64>();
            assert!(top == 0.0 || bottom == 0.0, "column {j} mixes blocks");
        }
    }

    #[test]
    fn repeated_eigenvalues() {
        // Q diag(2,2,2,5,5,1) Qᵀ with a random orthogonal Q.
        let n = 6;
        let q = qr_q_slice(&noise(21, n * n), n, n).unwrap();
        let d = [2.0, 2.0, 2.0, 5.0, 5.0, 1.0];
        let mut qd = q.clone();
        for i in 0..n {
            for j in 0..n {
                qd[i * n + j] *= d[j];
            }
        }
        let a = matmul_slice(&qd, &transpose(&q, n, n), n, n, n);
        let (w, v) = eigh_slice(&a, n, Order::Descending).unwrap();
        let expect = [5.0, 5.0, 2.0, 2.0, 2.0, 1.0];
        assert!(max_abs_diff(&w, &expect) < 1e-13, "{w:?}");
        let (res, orth) = residuals(&a, &w, &v, n);
        assert!(res < 1e-13 && orth < 1e-13);
        // The identity (all eigenvalues equal) gives an orthonormal basis.
        let (w, v) = eigh_slice(&identity(5), 5, Order::Ascending).unwrap();
        assert!(max_abs_diff(&w, &[1.0; 5]) == 0.0);
        let (_, orth) = residuals(&identity(5), &w, &v, 5);
        assert!(orth < 1e-15);
    }

    #[test]
    fn rank_deficient_input() {
        let n = 12;
        let a = gram(8, n, 3); // rank 3
        let (w, v) = eigh_slice(&a, n, Order::Descending).unwrap();
        let (res, orth) = residuals(&a, &w, &v, n);
        assert!(res < 1e-13 && orth < 1e-13);
        assert!(w[3..].iter().all(|x| x.abs() < 1e-13), "{w:?}");
        // The all-zero matrix (zero gradient) plus SOAP's 1e-30·I.
        let z = vec![0.0; n * n];
        let (w, v) = eigh_robust_slice(&z, n, 1e-30, Order::Descending)
            .value()
            .unwrap();
        assert!(w.iter().all(|x| *x == 1e-30));
        let (_, orth) = residuals(&z, &w, &v, n);
        assert!(orth == 0.0);
    }

    #[test]
    fn f32_path_matches_f64() {
        let n = 16;
        let a = gram(9, n, 20);
        let a32: Vec<f32> = a.iter().map(|x| *x as f32).collect();
        let (w32, v32) = eigh_slice(&a32, n, Order::Descending).unwrap();
        let (w64, v64) = eigh_slice(&a, n, Order::Descending).unwrap();
        let w32: Vec<f64> = w32.iter().map(|x| *x as f64).collect();
        let scale = w64[0];
        assert!(max_abs_diff(&w32, &w64) / scale < 1e-5);
        // Eigenvectors agree up to sign.
        for j in 0..n {
            let dot: f64 = (0..n).map(|i| v32[i * n + j] as f64 * v64[i * n + j]).sum();
            assert!((dot.abs() - 1.0).abs() < 1e-3, "column {j}: |dot| = {dot}");
        }
        // Through tensors.
        let t = Tensor::from_vec(a32, (n, n), &Device::Cpu).unwrap();
        let e = eigh(&t, 0.0, Order::Ascending).unwrap();
        assert!(matches!(e, Robust::Done(_)));
        let e = e.value().unwrap();
        assert_eq!(e.values.dtype(), DType::F32);
        assert_eq!(e.vectors.dims(), &[n, n]);
    }

    #[test]
    fn non_finite_input_fails_without_panicking() {
        let mut a = gram(1, 4, 4);
        a[5] = f64::NAN;
        let r = eigh_robust_slice(&a, 4, 0.0, Order::Ascending);
        assert!(matches!(
            r,
            Robust::Failed {
                first: LinalgError::NonFiniteInput,
                retry: None
            }
        ));
        let a32: Vec<f32> = a.iter().map(|x| *x as f32).collect();
        assert!(eigh_robust_slice(&a32, 4, 0.0, Order::Ascending).is_failed());
        assert!(qr_q_robust_slice(&a32, 4, 4).is_failed());
        let t = Tensor::from_vec(a, (4, 4), &Device::Cpu).unwrap();
        assert!(eigh(&t, 0.0, Order::Ascending).unwrap().is_failed());
        let req = InverseRoot {
            root: 2.0,
            epsilon: 1e-12,
            method: RootMethod::default(),
        };
        assert!(inverse_root(&t, &req).unwrap().is_failed());
    }

    #[test]
    fn f32_overflow_is_retried_in_f64_then_fails_cleanly() {
        // Entries near f32::MAX: f32 arithmetic overflows inside the solver; the f64 retry
        // succeeds, but eigenvalues beyond f32 range cannot be cast back -> Failed.
        let big = 3.0e38f32;
        let a = vec![big, big, big, big];
        let r = eigh_robust_slice(&a, 2, 0.0, Order::Ascending);
        assert!(r.is_failed() || r.was_retried(), "{r:?}");
        if let Robust::Failed { retry, .. } = &r {
            assert!(retry.is_some(), "f32 input must be retried in f64");
        }
    }

    #[test]
    fn malformed_input_is_an_error() {
        let t = Tensor::zeros((3, 4), DType::F64, &Device::Cpu).unwrap();
        assert!(eigh(&t, 0.0, Order::Ascending).is_err());
        let t = Tensor::zeros((3, 3), DType::U32, &Device::Cpu).unwrap();
        assert!(eigh(&t, 0.0, Order::Ascending).is_err());
        let t = Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap();
        assert!(qr_q(&t).is_err());
        let bad = InverseRoot {
            root: 2.5,
            epsilon: 0.0,
            method: RootMethod::CoupledNewton {
                max_iterations: 10,
                tolerance: 1e-6,
            },
        };
        assert!(bad.validate().is_err());
        let bad = InverseRoot {
            root: 2.0,
            epsilon: 1e-3,
            method: RootMethod::Eigen(Stability::PseudoInverse {
                rank_atol: 0.0,
                rank_rtol: None,
            }),
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn qr_orthonormal_and_reconstructs() {
        for &(m, n) in &[(8usize, 8usize), (10, 4), (5, 1), (1, 1)] {
            let a = noise((m * 31 + n) as u64, m * n);
            let q = qr_q_slice(&a, m, n).unwrap();
            let k = m.min(n);
            let qtq = matmul_slice(&transpose(&q, m, k), &q, k, m, k);
            assert!(max_abs_diff(&qtq, &identity(k)) < 1e-14);
            // Q Qᵀ A = A (A lies in the span of Q when m >= n).
            if m >= n {
                let qta = matmul_slice(&transpose(&q, m, k), &a, k, m, n);
                let back = matmul_slice(&q, &qta, m, k, n);
                assert!(max_abs_diff(&back, &a) < 1e-14);
            }
        }
        // Tensor path, f32.
        let a: Vec<f32> = noise(4, 36).iter().map(|x| *x as f32).collect();
        let t = Tensor::from_vec(a, (6, 6), &Device::Cpu).unwrap();
        let q = qr_q(&t).unwrap().value().unwrap();
        assert_eq!(q.dtype(), DType::F32);
        let qtq = q.t().unwrap().matmul(&q).unwrap();
        let qtq: Vec<f64> = to_vec::<f32>(&qtq)
            .unwrap()
            .iter()
            .map(|x| *x as f64)
            .collect();
        assert!(max_abs_diff(&qtq, &identity(6)) < 1e-6);
    }

    fn check_inverse_root(a: &[f64], x: &[f64], n: usize, root: u32, eps: f64, tol: f64) {
        // X^root · (A + εI) ≈ I
        let mut ar = a.to_vec();
        for i in 0..n {
            ar[i * n + i] += eps;
        }
        let xp = matrix_power(x, n, root);
        let prod = matmul_slice(&xp, &ar, n, n, n);
        let err = max_abs_diff(&prod, &identity(n));
        assert!(err < tol, "root {root}: |X^r A - I| = {err:e}");
    }

    #[test]
    fn inverse_roots_eigen_and_newton() {
        let n = 8;
        let mut a = gram(13, n, 12);
        for i in 0..n {
            a[i * n + i] += 0.5; // well conditioned
        }
        for &root in &[1u32, 2, 4] {
            let eig = InverseRoot {
                root: root as f64,
                epsilon: 1e-6,
                method: RootMethod::default(),
            };
            let x = inverse_root_slice(&a, n, &eig).value().unwrap();
            check_inverse_root(&a, &x, n, root, 1e-6, 1e-10);
            let newton = InverseRoot {
                root: root as f64,
                epsilon: 1e-6,
                method: RootMethod::CoupledNewton {
                    max_iterations: 100,
                    tolerance: 1e-12,
                },
            };
            let y = inverse_root_slice(&a, n, &newton).value().unwrap();
            check_inverse_root(&a, &y, n, root, 1e-6, 1e-9);
            assert!(max_abs_diff(&x, &y) < 1e-8);
            // Symmetric result.
            assert!(max_abs_diff(&x, &transpose(&x, n, n)) < 1e-12);
        }
        // Fractional roots work through the eigendecomposition: (A^{-1/2.5})^{5} = A^{-2}.
        let x = inverse_root_slice(
            &a,
            n,
            &InverseRoot {
                root: 2.5,
                epsilon: 0.0,
                method: RootMethod::default(),
            },
        )
        .value()
        .unwrap();
        let x5 = matrix_power(&x, n, 5);
        let a2 = matmul_slice(&a, &a, n, n, n);
        check_inverse_root(&a2, &x5, n, 1, 0.0, 1e-9);
    }

    #[test]
    fn inverse_root_epsilon_rules() {
        // A = diag(4, 0, -1e-9) (round-off made it slightly indefinite).
        let a = vec![4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1e-9];
        let eps = 1e-6;
        let get = |stability| {
            let x = inverse_root_slice(
                &a,
                3,
                &InverseRoot {
                    root: 2.0,
                    epsilon: if matches!(stability, Stability::PseudoInverse { .. }) {
                        0.0
                    } else {
                        eps
                    },
                    method: RootMethod::Eigen(stability),
                },
            )
            .value()
            .unwrap();
            (x[0], x[4], x[8])
        };
        // perturb before: λ(A+εI) = (4+ε, ε, ε−1e-9); λmin < ε -> λ − λmin + ε.
        let (d4, d0, dn) = get(Stability::Perturbation {
            perturb_before: true,
        });
        let lmin = eps - 1e-9;
        assert!((d4 - (4.0 + eps - lmin + eps).powf(-0.5)).abs() < 1e-12);
        assert!((d0 - (eps - lmin + eps).powf(-0.5)).abs() < 1e-6 * d0);
        assert!((dn - eps.powf(-0.5)).abs() < 1e-6 * dn);
        // not before: λ(A) = (4, 0, −1e-9) -> λ + 1e-9 + ε.
        let (d4, d0, dn) = get(Stability::Perturbation {
            perturb_before: false,
        });
        assert!((d4 - (4.0 + 1e-9 + eps).powf(-0.5)).abs() < 1e-12);
        assert!((d0 - (1e-9 + eps).powf(-0.5)).abs() < 1e-6 * d0);
        assert!((dn - eps.powf(-0.5)).abs() < 1e-6 * dn);
        // pseudo-inverse: only 4 survives.
        let (d4, d0, dn) = get(Stability::PseudoInverse {
            rank_atol: 0.0,
            rank_rtol: None,
        });
        assert!((d4 - 0.5).abs() < 1e-15 && d0 == 0.0 && dn == 0.0);
    }

    #[test]
    fn parallel_path_matches_sequential() {
        // Just above the threshold: the rayon path must give a valid decomposition.
        let n = PARALLEL_MIN_DIM;
        let a32: Vec<f32> = gram(17, n, 8).iter().map(|x| *x as f32).collect();
        let (w, v) = eigh_slice(&a32, n, Order::Descending).unwrap();
        let a: Vec<f64> = a32.iter().map(|x| *x as f64).collect();
        let w: Vec<f64> = w.iter().map(|x| *x as f64).collect();
        let v: Vec<f64> = v.iter().map(|x| *x as f64).collect();
        let (res, orth) = residuals(&a, &w, &v, n);
        assert!(res < 1e-4 && orth < 1e-4, "{res:e} {orth:e}");
    }
}
