//! cuSOLVER and cuBLAS's level-3 solvers on candle tensors (feature `cuda`): the Cholesky
//! factorization (`potrf`) and triangular solve (`trsm`) of SOAP's Cholesky-QR refresh, the
//! Householder QR (`geqrf` + `orgqr`) that backs it when Cholesky-QR breaks down (and is its
//! benchmark baseline), and the symmetric eigendecomposition (`syevd`) for SOAP's first basis
//! and Shampoo's inverse roots. One attempt each in the tensor's dtype; the f64-retry policy lives in
//! [`crate::linalg::on_device`].
//!
//! cuSOLVER is column-major: the row-major buffer of `Aᵀ` is `A` in column-major order, so a
//! matrix goes in transposed and its result comes out transposed back. A symmetric matrix is its
//! own transpose; its lower triangle (row-major, as the host path reads it) is cuSOLVER's upper.

use std::cell::RefCell;
use std::ffi::c_int;
use std::sync::Arc;

use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::Tensor;
use cudarc::cusolver::safe::DnHandle;
use cudarc::cusolver::sys::{
    self as dn, cublasFillMode_t, cusolverDnHandle_t, cusolverEigMode_t, cusolverStatus_t,
};
use cudarc::driver::{DevicePtrMut, DeviceRepr, ValidAsZeroBits};

use super::with_device_ptrs;
use crate::error::{Error, Result};
use crate::float::Float;

/// A cuSOLVER routine that reported a failure through its `info` output: for `syevd`, a
/// positive `info` means the iteration did not converge; for `geqrf`/`orgqr`, a negative one
/// names an invalid argument. [`crate::linalg::on_device`] turns these into its
/// [`LinalgError`](crate::linalg::LinalgError)s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SolverFailure {
    /// The routine.
    pub routine: &'static str,
    /// Its `info` values (one per routine call).
    pub info: Vec<i32>,
}

impl std::fmt::Display for SolverFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cuSOLVER {} info {:?}", self.routine, self.info)
    }
}

/// The side of a square matrix, or an error naming `what`.
fn square(a: &Tensor, what: &str) -> Result<usize> {
    match a.dims() {
        [n, m] if n == m => Ok(*n),
        dims => Err(Error::Msg(format!(
            "{what}: {dims:?} is not a square matrix"
        ))),
    }
}

/// The dtype-specific cuSOLVER entry points.
trait Lapack: Float + DeviceRepr + ValidAsZeroBits {
    unsafe fn potrf_size(
        h: cusolverDnHandle_t,
        uplo: cublasFillMode_t,
        n: c_int,
        a: *mut Self,
        lda: c_int,
        lwork: *mut c_int,
    ) -> cusolverStatus_t;
    #[allow(clippy::too_many_arguments)]
    unsafe fn potrf(
        h: cusolverDnHandle_t,
        uplo: cublasFillMode_t,
        n: c_int,
        a: *mut Self,
        lda: c_int,
        work: *mut Self,
        lwork: c_int,
        info: *mut c_int,
    ) -> cusolverStatus_t;
    unsafe fn geqrf_size(
        h: cusolverDnHandle_t,
        m: c_int,
        n: c_int,
        a: *mut Self,
        lda: c_int,
        lwork: *mut c_int,
    ) -> cusolverStatus_t;
    #[allow(clippy::too_many_arguments)]
    unsafe fn geqrf(
        h: cusolverDnHandle_t,
        m: c_int,
        n: c_int,
        a: *mut Self,
        lda: c_int,
        tau: *mut Self,
        work: *mut Self,
        lwork: c_int,
        info: *mut c_int,
    ) -> cusolverStatus_t;
    #[allow(clippy::too_many_arguments)]
    unsafe fn orgqr_size(
        h: cusolverDnHandle_t,
        m: c_int,
        n: c_int,
        k: c_int,
        a: *const Self,
        lda: c_int,
        tau: *const Self,
        lwork: *mut c_int,
    ) -> cusolverStatus_t;
    #[allow(clippy::too_many_arguments)]
    unsafe fn orgqr(
        h: cusolverDnHandle_t,
        m: c_int,
        n: c_int,
        k: c_int,
        a: *mut Self,
        lda: c_int,
        tau: *const Self,
        work: *mut Self,
        lwork: c_int,
        info: *mut c_int,
    ) -> cusolverStatus_t;
    #[allow(clippy::too_many_arguments)]
    unsafe fn syevd_size(
        h: cusolverDnHandle_t,
        jobz: cusolverEigMode_t,
        uplo: cublasFillMode_t,
        n: c_int,
        a: *const Self,
        lda: c_int,
        w: *const Self,
        lwork: *mut c_int,
    ) -> cusolverStatus_t;
    #[allow(clippy::too_many_arguments)]
    unsafe fn syevd(
        h: cusolverDnHandle_t,
        jobz: cusolverEigMode_t,
        uplo: cublasFillMode_t,
        n: c_int,
        a: *mut Self,
        lda: c_int,
        w: *mut Self,
        work: *mut Self,
        lwork: c_int,
        info: *mut c_int,
    ) -> cusolverStatus_t;
}

macro_rules! lapack {
    ($t:ty, $potrf_size:ident, $potrf:ident, $geqrf_size:ident, $geqrf:ident, $orgqr_size:ident, $orgqr:ident, $syevd_size:ident, $syevd:ident) => {
        impl Lapack for $t {
            unsafe fn potrf_size(
                h: cusolverDnHandle_t,
                uplo: cublasFillMode_t,
                n: c_int,
                a: *mut Self,
                lda: c_int,
                lwork: *mut c_int,
            ) -> cusolverStatus_t {
                dn::$potrf_size(h, uplo, n, a, lda, lwork)
            }
            unsafe fn potrf(
                h: cusolverDnHandle_t,
                uplo: cublasFillMode_t,
                n: c_int,
                a: *mut Self,
                lda: c_int,
                work: *mut Self,
                lwork: c_int,
                info: *mut c_int,
            ) -> cusolverStatus_t {
                dn::$potrf(h, uplo, n, a, lda, work, lwork, info)
            }
            unsafe fn geqrf_size(
                h: cusolverDnHandle_t,
                m: c_int,
                n: c_int,
                a: *mut Self,
                lda: c_int,
                lwork: *mut c_int,
            ) -> cusolverStatus_t {
                dn::$geqrf_size(h, m, n, a, lda, lwork)
            }
            unsafe fn geqrf(
                h: cusolverDnHandle_t,
                m: c_int,
                n: c_int,
                a: *mut Self,
                lda: c_int,
                tau: *mut Self,
                work: *mut Self,
                lwork: c_int,
                info: *mut c_int,
            ) -> cusolverStatus_t {
                dn::$geqrf(h, m, n, a, lda, tau, work, lwork, info)
            }
            unsafe fn orgqr_size(
                h: cusolverDnHandle_t,
                m: c_int,
                n: c_int,
                k: c_int,
                a: *const Self,
                lda: c_int,
                tau: *const Self,
                lwork: *mut c_int,
            ) -> cusolverStatus_t {
                dn::$orgqr_size(h, m, n, k, a, lda, tau, lwork)
            }
            unsafe fn orgqr(
                h: cusolverDnHandle_t,
                m: c_int,
                n: c_int,
                k: c_int,
                a: *mut Self,
                lda: c_int,
                tau: *const Self,
                work: *mut Self,
                lwork: c_int,
                info: *mut c_int,
            ) -> cusolverStatus_t {
                dn::$orgqr(h, m, n, k, a, lda, tau, work, lwork, info)
            }
            unsafe fn syevd_size(
                h: cusolverDnHandle_t,
                jobz: cusolverEigMode_t,
                uplo: cublasFillMode_t,
                n: c_int,
                a: *const Self,
                lda: c_int,
                w: *const Self,
                lwork: *mut c_int,
            ) -> cusolverStatus_t {
                dn::$syevd_size(h, jobz, uplo, n, a, lda, w, lwork)
            }
            unsafe fn syevd(
                h: cusolverDnHandle_t,
                jobz: cusolverEigMode_t,
                uplo: cublasFillMode_t,
                n: c_int,
                a: *mut Self,
                lda: c_int,
                w: *mut Self,
                work: *mut Self,
                lwork: c_int,
                info: *mut c_int,
            ) -> cusolverStatus_t {
                dn::$syevd(h, jobz, uplo, n, a, lda, w, work, lwork, info)
            }
        }
    };
}

lapack!(
    f32,
    cusolverDnSpotrf_bufferSize,
    cusolverDnSpotrf,
    cusolverDnSgeqrf_bufferSize,
    cusolverDnSgeqrf,
    cusolverDnSorgqr_bufferSize,
    cusolverDnSorgqr,
    cusolverDnSsyevd_bufferSize,
    cusolverDnSsyevd
);
lapack!(
    f64,
    cusolverDnDpotrf_bufferSize,
    cusolverDnDpotrf,
    cusolverDnDgeqrf_bufferSize,
    cusolverDnDgeqrf,
    cusolverDnDorgqr_bufferSize,
    cusolverDnDorgqr,
    cusolverDnDsyevd_bufferSize,
    cusolverDnDsyevd
);

fn check(what: &str, status: cusolverStatus_t) -> Result<()> {
    if status == cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::Msg(format!("cuSOLVER {what}: {status:?}")))
    }
}

fn int(x: usize, what: &str) -> Result<c_int> {
    c_int::try_from(x).map_err(|_| Error::Msg(format!("cuSOLVER {what}: {x} exceeds 32-bit sizes")))
}

/// Runs `f` with a cuSOLVER handle on the device's stream (one handle per stream and thread,
/// created on first use: creating one costs far more than a small factorization).
fn with_handle<R>(dev: &CudaDevice, f: impl FnOnce(cusolverDnHandle_t) -> Result<R>) -> Result<R> {
    thread_local! {
        static HANDLES: RefCell<Vec<DnHandle>> = const { RefCell::new(Vec::new()) };
    }
    let stream = dev.cuda_stream();
    // cuSOLVER runs in the calling thread's current context: make it the device's.
    stream.context().bind_to_thread().w()?;
    let handle = HANDLES.with(|h| -> Result<cusolverDnHandle_t> {
        let mut h = h.borrow_mut();
        if let Some(found) = h.iter().find(|x| Arc::ptr_eq(x.stream(), &stream)) {
            return Ok(found.cu());
        }
        let created = DnHandle::new(stream.clone())
            .map_err(|e| Error::Msg(format!("cuSOLVER handle: {e:?}")))?;
        let cu = created.cu();
        h.push(created);
        Ok(cu)
    })?;
    f(handle)
}

/// Cholesky factorization in place (`potrf`): the contiguous row-major symmetric positive
/// definite `c` (`n×n`) gets `R` in its upper triangle, `C = RᵀR`; its strict lower triangle
/// keeps entries of `C`. `Err(k)` when the leading minor of order `k + 1` is not positive
/// definite (cuSOLVER's `info`).
///
/// Row-major `C` is column-major `Cᵀ = C`; asking cuSOLVER for the column-major lower factor
/// `C = L·Lᵀ` writes `L` where the row-major view reads `Lᵀ = R`.
pub fn potrf_upper(c: &Tensor) -> Result<std::result::Result<(), usize>> {
    let n = square(c, "potrf")?;
    if !c.is_contiguous() {
        return Err(Error::Msg("potrf: the matrix must be contiguous".into()));
    }
    if n == 0 {
        return Ok(Ok(()));
    }
    crate::with_float!(c.dtype(), "potrf", T => potrf_typed::<T>(c, n))
}

fn potrf_typed<T: Lapack>(c: &Tensor, n: usize) -> Result<std::result::Result<(), usize>> {
    let ni = int(n, "potrf")?;
    let uplo = cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
    let mut status = 0i32;
    with_device_ptrs::<T>(&[c], &[], |dev, o, _| {
        with_handle(dev, |h| {
            let pa = o[0] as *mut T;
            let mut lwork: c_int = 0;
            // SAFETY: `pa` addresses n·n elements (lda = n), as checked by `with_device_ptrs`;
            // the workspace holds the size cuSOLVER asks for.
            unsafe {
                check(
                    "potrf_bufferSize",
                    T::potrf_size(h, uplo, ni, pa, ni, &mut lwork),
                )?;
            }
            let lwork = lwork.max(1);
            let mut ws = dev.alloc_zeros::<T>(lwork as usize)?;
            let mut info = dev.alloc_zeros::<i32>(1)?;
            {
                let stream = dev.cuda_stream();
                let (pw, _ws_sync) = ws.device_ptr_mut(&stream);
                let (pi, _info_sync) = info.device_ptr_mut(&stream);
                // SAFETY: as above; `pi` addresses one int.
                unsafe {
                    check(
                        "potrf",
                        T::potrf(h, uplo, ni, pa, ni, pw as *mut T, lwork, pi as *mut c_int),
                    )?;
                }
            }
            status = dev.clone_dtoh(&info)?[0];
            Ok(())
        })
    })?;
    Ok(match status {
        0 => Ok(()),
        k if k > 0 => Err(k as usize - 1),
        k => {
            return Err(Error::Msg(format!(
                "cuSOLVER potrf: argument {} is invalid",
                -k
            )))
        }
    })
}

/// `A ← A·R⁻¹` in place by cuBLAS `trsm`: `a` is a contiguous row-major `m×n` matrix, `r` a
/// contiguous row-major `n×n` matrix whose upper triangle is read (the rest is ignored).
///
/// Row-major `A` is column-major `Aᵀ` and row-major `R`'s upper triangle is column-major
/// `Rᵀ`'s lower one, so `X·R = A` is solved as `Rᵀ·Xᵀ = Aᵀ` from the left.
pub fn trsm_right_upper(a: &Tensor, r: &Tensor) -> Result<()> {
    use cudarc::cublas::sys::{
        cublasDiagType_t, cublasDtrsm_v2, cublasFillMode_t as Fill, cublasOperation_t,
        cublasSideMode_t, cublasStrsm_v2,
    };
    let (m, n) = a.dims2()?;
    if r.dims() != [n, n] || !a.is_contiguous() || !r.is_contiguous() || a.dtype() != r.dtype() {
        return Err(Error::Msg(format!(
            "trsm: A {:?} {:?} and R {:?} {:?} (both contiguous, R square of A's width)",
            a.dims(),
            a.dtype(),
            r.dims(),
            r.dtype()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let (mi, ni) = (int(m, "trsm")?, int(n, "trsm")?);
    let (side, fill, op, diag) = (
        cublasSideMode_t::CUBLAS_SIDE_LEFT,
        Fill::CUBLAS_FILL_MODE_LOWER,
        cublasOperation_t::CUBLAS_OP_N,
        cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
    );
    let dtype = a.dtype();
    crate::with_float!(dtype, "trsm", T => {
        with_device_ptrs::<T>(&[a], &[r], |dev, o, i| {
            // cuBLAS runs in the calling thread's current context: make it the device's.
            dev.cuda_stream().context().bind_to_thread().w()?;
            let blas = dev.cublas_handle();
            let handle = *blas.handle();
            // SAFETY: B = A holds m·n elements (ldb = n), R holds n·n (lda = n), both checked
            // by `with_device_ptrs`; alpha is a host scalar living across the call; the
            // handle is bound to the device's stream.
            let status = unsafe {
                match dtype {
                    candle_core::DType::F32 => {
                        let one = 1.0f32;
                        cublasStrsm_v2(
                            handle, side, fill, op, diag, ni, mi, &one,
                            i[0] as *const f32, ni, o[0] as *mut f32, ni,
                        )
                    }
                    _ => {
                        let one = 1.0f64;
                        cublasDtrsm_v2(
                            handle, side, fill, op, diag, ni, mi, &one,
                            i[0] as *const f64, ni, o[0] as *mut f64, ni,
                        )
                    }
                }
            };
            status
                .result()
                .map_err(|e| Error::Msg(format!("cuBLAS trsm: {e:?}")))
        })
    })
}

/// The orthonormal factor `Q` (`m×n`, `m ≥ n`) of the Householder QR of a row-major matrix on
/// a CUDA device, in its dtype; `Err(SolverFailure)` when cuSOLVER reports a failure. The
/// caller checks that the result is finite.
pub fn householder_q(a: &Tensor) -> Result<std::result::Result<Tensor, SolverFailure>> {
    let (m, n) = a.dims2()?;
    if m < n {
        return Err(Error::Msg(format!(
            "householder_q: {m}×{n} has fewer rows than columns"
        )));
    }
    crate::with_float!(a.dtype(), "householder_q", T => householder_q_typed::<T>(a, m, n))
}

fn householder_q_typed<T: Lapack>(
    a: &Tensor,
    m: usize,
    n: usize,
) -> Result<std::result::Result<Tensor, SolverFailure>> {
    if n == 0 {
        return Ok(Ok(a.clone()));
    }
    let (mi, ni) = (int(m, "geqrf")?, int(n, "geqrf")?);
    // Column-major A: the row-major buffer of Aᵀ (a fresh copy, factored in place).
    let work = a.t()?.contiguous()?.copy()?;
    let tau = Tensor::zeros(n, T::DTYPE, a.device())?;
    let mut infos = [0i32; 2];
    with_device_ptrs::<T>(&[&work, &tau], &[], |dev, o, _| {
        with_handle(dev, |h| {
            let (pa, ptau) = (o[0] as *mut T, o[1] as *mut T);
            let (mut l1, mut l2): (c_int, c_int) = (0, 0);
            // SAFETY: `pa` addresses m·n elements (lda = m) and `ptau` n, as checked by
            // `with_device_ptrs`; the workspace below holds the sizes cuSOLVER asks for.
            unsafe {
                check(
                    "geqrf_bufferSize",
                    T::geqrf_size(h, mi, ni, pa, mi, &mut l1),
                )?;
                check(
                    "orgqr_bufferSize",
                    T::orgqr_size(h, mi, ni, ni, pa, mi, ptau, &mut l2),
                )?;
            }
            let lwork = l1.max(l2).max(1);
            let mut ws = dev.alloc_zeros::<T>(lwork as usize)?;
            let mut info = dev.alloc_zeros::<i32>(2)?;
            {
                let stream = dev.cuda_stream();
                let (pw, _ws_sync) = ws.device_ptr_mut(&stream);
                let (pi, _info_sync) = info.device_ptr_mut(&stream);
                let (pw, pi) = (pw as *mut T, pi as *mut c_int);
                // SAFETY: as above; `pi` addresses two ints.
                unsafe {
                    check("geqrf", T::geqrf(h, mi, ni, pa, mi, ptau, pw, lwork, pi))?;
                    check(
                        "orgqr",
                        T::orgqr(h, mi, ni, ni, pa, mi, ptau, pw, lwork, pi.add(1)),
                    )?;
                }
            }
            let host = dev.clone_dtoh(&info)?;
            infos.copy_from_slice(&host);
            Ok(())
        })
    })?;
    if infos != [0, 0] {
        return Ok(Err(SolverFailure {
            routine: "geqrf/orgqr",
            info: infos.to_vec(),
        }));
    }
    Ok(Ok(work.t()?.contiguous()?))
}

/// Eigenvalues (ascending) and eigenvectors (columns, in the same order) of the symmetric
/// `a + shift·I` on a CUDA device (`syevd`), in `a`'s dtype; `Err(SolverFailure)` when cuSOLVER
/// does not converge (positive `info`). The caller checks that the result is finite.
pub fn eigh(
    a: &Tensor,
    shift: f64,
) -> Result<std::result::Result<(Tensor, Tensor), SolverFailure>> {
    let n = square(a, "eigh")?;
    crate::with_float!(a.dtype(), "eigh", T => eigh_typed::<T>(a, n, shift))
}

fn eigh_typed<T: Lapack>(
    a: &Tensor,
    n: usize,
    shift: f64,
) -> Result<std::result::Result<(Tensor, Tensor), SolverFailure>> {
    if n == 0 {
        return Ok(Ok((Tensor::zeros(0, T::DTYPE, a.device())?, a.clone())));
    }
    let ni = int(n, "syevd")?;
    let mut work = a.contiguous()?.copy()?;
    if shift != 0.0 {
        work = (work + (Tensor::eye(n, T::DTYPE, a.device())? * shift)?)?.contiguous()?;
    }
    let values = Tensor::zeros(n, T::DTYPE, a.device())?;
    let mut status = 0i32;
    let (jobz, uplo) = (
        cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR,
        // The row-major lower triangle, which the host path reads.
        cublasFillMode_t::CUBLAS_FILL_MODE_UPPER,
    );
    with_device_ptrs::<T>(&[&work, &values], &[], |dev, o, _| {
        with_handle(dev, |h| {
            let (pa, pw) = (o[0] as *mut T, o[1] as *mut T);
            let mut lwork: c_int = 0;
            // SAFETY: `pa` addresses n·n elements (lda = n), `pw` n, as checked by
            // `with_device_ptrs`; the workspace holds the size cuSOLVER asks for.
            unsafe {
                check(
                    "syevd_bufferSize",
                    T::syevd_size(h, jobz, uplo, ni, pa, ni, pw, &mut lwork),
                )?;
            }
            let lwork = lwork.max(1);
            let mut ws = dev.alloc_zeros::<T>(lwork as usize)?;
            let mut info = dev.alloc_zeros::<i32>(1)?;
            {
                let stream = dev.cuda_stream();
                let (pws, _ws_sync) = ws.device_ptr_mut(&stream);
                let (pi, _info_sync) = info.device_ptr_mut(&stream);
                // SAFETY: as above; `pi` addresses one int.
                unsafe {
                    check(
                        "syevd",
                        T::syevd(
                            h,
                            jobz,
                            uplo,
                            ni,
                            pa,
                            ni,
                            pw,
                            pws as *mut T,
                            lwork,
                            pi as *mut c_int,
                        ),
                    )?;
                }
            }
            status = dev.clone_dtoh(&info)?[0];
            Ok(())
        })
    })?;
    if status != 0 {
        return Ok(Err(SolverFailure {
            routine: "syevd",
            info: vec![status],
        }));
    }
    // Column-major eigenvectors: the row-major buffer holds Vᵀ.
    Ok(Ok((values, work.t()?.contiguous()?)))
}
