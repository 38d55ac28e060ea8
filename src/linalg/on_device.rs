//! SOAP's eigenbasis refresh where the factors live: built from matrix products (cuBLAS on a
//! GPU) and three kernels of `kernels/fused.cu`, so a refresh on the GPU never copies a factor
//! to the host. Only the `n` Rayleigh quotients (to sort them) and a few status flags travel.
//!
//! One refresh of a factor `F` with basis `Q` (the reference's power iteration):
//!
//! 1. `P = F·Q` (one product), `est_j = q_jᵀ p_j` without forming `QᵀFQ` (kernel
//!    `column_dots`, summed in f64);
//! 2. `π = argsort(est)`, descending and stable (on the host, as [`crate::optim::kron`] does);
//!    the columns of `P` gathered by `π`;
//! 3. `Q' = qr(P[:, π]).Q` by **column-scaled, shifted Cholesky-QR3** ([`cholesky_qr3`]):
//!    scale the columns of `A` to unit norm, then three times `C = AᵀA (+ s·I the first time)`,
//!    `C = RᵀR` (kernel `cholesky_upper`), `A ← A·R⁻¹` (kernel `solve_upper_right_t`).
//!    Scaling leaves `Q` unchanged (`A·D = Q·(R·D)`) and keeps the Gram matrix in range (the
//!    column norms of `F·Q` carry the eigenvalues, whose squares overflow or underflow f32 for
//!    gradients of 1e±20); the shift keeps the first factorization alive for condition numbers
//!    up to about `1/u`; the last pass must find pivots in `[1/4, 4]`, which
//!    guarantees an orthonormal result to working precision.
//!
//! When Cholesky-QR breaks down (a zero or dependent column: rank-deficient factors, e.g. after
//! all-zero gradients) the Householder QR takes over: cuSOLVER's `geqrf`/`orgqr` on a GPU,
//! faer on the host. Columns may differ in sign from the host path's Householder QR; SOAP does
//! not depend on the signs (its rotated statistics are squares, its moments live in the original
//! space).
//!
//! Robustness as in [`crate::linalg`]: an f32 refresh that fails (non-finite quotients, or both
//! orthogonalizations) is retried in f64 on the device; if that fails too the caller keeps its
//! basis and counts the failure.
//!
//! Each kernel has a plain-Rust twin here with the same operation order: CPU tensors run the
//! twins, CUDA tensors the kernels, and inside [`crate::kernels`]' host emulation CPU tensors run
//! the kernels' code compiled for the host.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::kernels::{elementwise_blocks, RawLaunch};
use crate::linalg::{LinalgError, Robust};
use crate::optim::fused::{zip_mut, Float};

/// Pivot bounds of the last Cholesky pass: its input has nearly unit, nearly orthogonal
/// columns, so every pivot (a squared column norm after removing the earlier columns) is close
/// to 1. Outside `[1/4, 4]` the earlier passes lost orthogonality and the result would not be
/// orthonormal to working precision.
pub const LAST_PASS_PIVOTS: (f64, f64) = (0.25, 4.0);

/// Whether `t`'s kernels run on the device (or in host emulation) rather than as twins.
fn kernels_for(t: &Tensor) -> bool {
    #[cfg(optlab_emulate_kernels)]
    if crate::kernels::emulate::active() {
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
        return crate::kernels::emulate::launch_raw(&l, outs, ins);
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

/// Cholesky factorization `C = RᵀR` in place (kernel `cholesky_upper`): `c` becomes `R`
/// (strict lower triangle zeroed). Fails with the 0-based index of the first pivot outside
/// `pivots` or not positive; `c` is then partly overwritten.
pub fn cholesky_upper(c: &Tensor, pivots: (f64, f64)) -> Result<std::result::Result<(), usize>> {
    let n = crate::linalg::square_side(c, "cholesky_upper")?;
    if !c.is_contiguous() {
        return Err(Error::Msg(
            "cholesky_upper: the matrix must be contiguous".into(),
        ));
    }
    let status = crate::with_float!(c.dtype(), "cholesky_upper", T => {
        let scalars = [T::of(pivots.0), T::of(pivots.1)];
        let l = RawLaunch::<T> {
            name: "cholesky_upper",
            blocks: 1,
            n: n * n,
            aux: [n as u64, 0],
            scalars: &scalars,
            scratch_len: 1,
        };
        let (lo, hi) = (scalars[0], scalars[1]);
        run(l, &[c], &[], |o, _, status| {
            let c = &mut *o[0];
            for k in 0..n {
                let pivot = c[k * n + k];
                let acceptable = pivot >= lo && pivot <= hi && pivot > T::of(0.0);
                if !acceptable {
                    status[0] = (k + 1) as f64;
                    return Ok(());
                }
                let r = pivot.sqrt();
                for j in k..n {
                    c[k * n + j] = if j == k { r } else { c[k * n + j] / r };
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
        })?
    });
    Ok(if status[0] == 0.0 {
        Ok(())
    } else {
        Err(status[0] as usize - 1)
    })
}

/// Solves `X·R = A` in place (kernel `solve_upper_right_t`): `at` holds `Aᵀ` (`n×rows`,
/// contiguous) and becomes `Xᵀ`; `r` is `n×n` upper triangular.
pub fn solve_upper_right_t(at: &Tensor, r: &Tensor) -> Result<()> {
    let (n, rows) = at.dims2()?;
    if r.dims() != [n, n] || r.dtype() != at.dtype() || !at.is_contiguous() {
        return Err(Error::Msg(format!(
            "solve_upper_right_t: Aᵀ {:?} and R {:?}",
            at.dims(),
            r.dims()
        )));
    }
    let r = r.contiguous()?;
    crate::with_float!(at.dtype(), "solve_upper_right_t", T => {
        let l = RawLaunch::<T> {
            name: "solve_upper_right_t",
            blocks: elementwise_blocks(rows),
            n: rows,
            aux: [n as u64, 0],
            scalars: &[],
            scratch_len: 0,
        };
        run(l, &[at], &[&r], |o, i, _| {
            let (at, r) = (&mut *o[0], i[0]);
            for row in 0..rows {
                for j in 0..n {
                    let mut acc = at[j * rows + row];
                    for l in 0..j {
                        acc -= at[l * rows + row] * r[l * n + j];
                    }
                    at[j * rows + row] = acc / r[j * n + j];
                }
            }
            Ok(())
        })?;
    });
    Ok(())
}

/// One Cholesky-QR pass: `A ← A·R⁻¹` with `AᵀA + shift·I = RᵀR`. `None` when the
/// factorization breaks down.
fn cholesky_qr_pass(a: &Tensor, shift: f64, pivots: (f64, f64)) -> Result<Option<Tensor>> {
    let mut c = a.t()?.matmul(a)?;
    if shift > 0.0 {
        let n = c.dims()[0];
        let eye = Tensor::eye(n, c.dtype(), c.device())?;
        c = (c + (eye * shift)?)?;
    }
    let c = c.contiguous()?;
    if cholesky_upper(&c, pivots)?.is_err() {
        return Ok(None);
    }
    let at = a.t()?.contiguous()?;
    solve_upper_right_t(&at, &c)?;
    Ok(Some(at.t()?.contiguous()?))
}

/// The orthonormal factor of an `m×n` matrix (`m ≥ n`) by column-scaled, shifted
/// Cholesky-QR3 (columns with positive `R` diagonal); `None` when it breaks down (zero or
/// numerically dependent columns).
///
/// The columns are scaled to unit norm first. The first pass factors `AᵀA + s·I` with
/// `s = 11·(m·n + n(n+1))·u·‖A‖²_F` (`u` the unit roundoff; Fukaya et al., "Shifted
/// Cholesky QR for computing the QR factorization of ill-conditioned matrices", 2020): the
/// shift keeps that factorization from breaking down whenever `κ(A) ≲ 1/u`, and leaves a
/// basis with `κ ≲ 1/√u`, which two plain passes (Cholesky-QR2) make orthonormal to working
/// precision.
pub fn cholesky_qr3(a: &Tensor) -> Result<Option<Tensor>> {
    let (rows, cols) = a.dims2()?;
    let norms = column_dots(a, a)?;
    if norms.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
        return Ok(None);
    }
    let inv: Vec<f64> = norms.iter().map(|x| 1.0 / x.sqrt()).collect();
    let scale = Tensor::from_vec(inv, (1, cols), a.device())?.to_dtype(a.dtype())?;
    let scaled = a.broadcast_mul(&scale)?.contiguous()?;
    let unit_roundoff = match a.dtype() {
        DType::F64 => f64::EPSILON / 2.0,
        _ => f32::EPSILON as f64 / 2.0,
    };
    let (m, n) = (rows as f64, cols as f64);
    // ‖A‖²_F = n after the scaling.
    let shift = 11.0 * (m * n + n * (n + 1.0)) * unit_roundoff * n;
    let Some(q1) = cholesky_qr_pass(&scaled, shift, (0.0, f64::INFINITY))? else {
        return Ok(None);
    };
    let Some(q2) = cholesky_qr_pass(&q1, 0.0, (0.0, f64::INFINITY))? else {
        return Ok(None);
    };
    cholesky_qr_pass(&q2, 0.0, LAST_PASS_PIVOTS)
}

/// The orthonormal factor by Householder QR where `a` lives: cuSOLVER on a GPU, faer on the
/// host (in `a`'s dtype, no retry).
fn householder_q(a: &Tensor) -> Result<std::result::Result<Tensor, LinalgError>> {
    #[cfg(feature = "cuda")]
    if a.device().is_cuda() {
        return crate::cuda::solver::householder_q(a);
    }
    let (m, n) = a.dims2()?;
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
    let p = f.matmul(q)?;
    let est = column_dots(q, &p)?;
    if est.iter().any(|e| !e.is_finite()) {
        return Ok(Err(LinalgError::NonFiniteOutput));
    }
    let mut perm: Vec<usize> = (0..est.len()).collect();
    // Stable descending sort: ties keep their current order (as the host path).
    perm.sort_by(|&a, &b| est[b].total_cmp(&est[a]));
    let idx: Vec<u32> = perm.iter().map(|&j| j as u32).collect();
    let idx = Tensor::from_vec(idx, perm.len(), p.device())?;
    let sorted = p.index_select(&idx, 1)?.contiguous()?;
    let q_new = match cholesky_qr3(&sorted)? {
        Some(q) => q,
        None => match householder_q(&sorted)? {
            Ok(q) => q,
            Err(e) => return Ok(Err(e)),
        },
    };
    if !crate::optim::fused::all_finite(&q_new)? {
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
    let finite = crate::optim::fused::all_finite_each(&[&f, &q])?;
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
    Ok(if crate::optim::fused::all_finite(&x)? {
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
    if !crate::optim::fused::all_finite(a)? {
        return Ok(Robust::Failed {
            first: LinalgError::NonFiniteInput,
            retry: None,
        });
    }
    let outcome = with_device_retry(
        dtype,
        |dt| crate::cuda::solver::eigh(&a.to_dtype(dt)?, shift, order),
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
    if !crate::optim::fused::all_finite(a)? {
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
        let (w, v) = match crate::cuda::solver::eigh(&m, 0.0, Order::Ascending)? {
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
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect()
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
    fn scaling_keeps_f32_gram_matrices_in_range() {
        for (dtype, spread, tol) in [
            (DType::F32, 300.0, 1e-5),
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
        // Factors of 1e±25 (gradients of 1e±12): their Gram matrices overflow or underflow f32
        // unless the columns are scaled first.
        for magnitude in [1e25f64, 1e-25] {
            let a = (near_converged_product(300.0, DType::F64) * magnitude)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let q = cholesky_qr3(&a).unwrap().expect("scaled");
            assert!(orthogonality_error(&q) < 1e-5);
            let plain = cholesky_qr_pass(&a, 0.0, (0.0, f64::INFINITY)).unwrap();
            assert!(plain.is_none(), "unscaled Gram matrix at {magnitude:e}");
        }
        // Beyond κ ≈ 1/u the factorization gives up and the caller falls back to Householder.
        let a = near_converged_product(1e5, DType::F32);
        assert!(cholesky_qr3(&a).unwrap().is_none());
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
        assert_eq!(cholesky_upper(&c, (0.0, f64::INFINITY)).unwrap(), Err(1));
        let c = Tensor::from_vec(vec![4.0f64, 2.0, 2.0, 5.0], (2, 2), &Device::Cpu).unwrap();
        cholesky_upper(&c, (0.0, f64::INFINITY)).unwrap().unwrap();
        assert_eq!(values(&c), vec![2.0, 1.0, 0.0, 2.0]);
    }
}
