//! The eigendecomposed preconditioners' linear algebra: a refresh's eigendecomposition of
//! `A = F_k/bc2` (full eigh, the adaptive skip, or warm-started QR-algorithm steps), and the
//! inverse root rebuilt from stored `(λ_k, Q_k)` at every use.
//!
//! ```text
//! eigh:      (λ, Q) = eigh(A + εI), ascending                     (perturb_before_computation)
//!            tolerance > 0: B = Q_oldᵀ(A + εI)Q_old; if off(B) ≤ tol·‖B‖_F keep (diag B, Q_old)
//! qr:        B = Q_oldᵀ(A + εI)Q_old; Q = Q_old
//!            up to max_iterations times, while not off(B) ≤ tol·‖B‖_F:
//!                B = Q_b R_b (QR);  B ← R_b Q_b;  Q ← Q Q_b
//!            sort the columns of Q by ascending diag B (stable)
//! off(B) = √(‖B‖_F² − ‖diag B‖_F²)   (a negative radicand is NaN: "not converged")
//! P_k = Q diag(λ'^(−e)) Qᵀ,  λ' = λ − λmin + ε if λmin < ε, else λ   (the Perturbation rule)
//! ```
//!
//! One QR step from the identity gives the Q factor of `A + εI`, not its eigenvectors: the
//! basis converges to the eigenvectors across refreshes, which is the point of the warm start.

use candle_core::{DType, Tensor};

use super::config::AmortizedComputation;
use super::Shampoo;
use crate::error::Result;
use crate::float::Float;
use crate::linalg::{self, LinalgError, Order, Robust, Stability};
use crate::optim::kron::identity;
use crate::with_float;

/// A basis and its eigenvalue estimates (eigenvalues `(n,)`, eigenvectors as columns `(n, n)`).
pub(super) struct Basis {
    pub(super) values: Tensor,
    pub(super) vectors: Tensor,
}

/// The square of every entry and of the diagonal, summed, in f64: `(‖B‖_F², ‖diag B‖_F²)`.
fn frobenius_parts(b: &Tensor) -> Result<(f64, f64, Vec<f64>)> {
    let n = b.dims()[0];
    let v = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let total: f64 = v.iter().map(|x| x * x).sum();
    let diag: Vec<f64> = (0..n).map(|i| v[i * n + i]).collect();
    let on_diag: f64 = diag.iter().map(|x| x * x).sum();
    Ok((total, on_diag, diag))
}

/// `off(B) ≤ tolerance·‖B‖_F`, with the reference's NaN for a negative radicand.
fn converged(b: &Tensor, tolerance: f64) -> Result<(bool, Vec<f64>)> {
    let (total, on_diag, diag) = frobenius_parts(b)?;
    let off = (total - on_diag).sqrt();
    Ok((off <= tolerance * total.sqrt(), diag))
}

/// `Qᵀ(A + shift·I)Q`: the (perturbed) factor seen in the basis `Q`.
fn in_basis(a: &Tensor, shift: f64, q: &Tensor) -> Result<Tensor> {
    let shifted = if shift == 0.0 {
        a.clone()
    } else {
        let n = a.dims()[0];
        (a + identity(n, a.dtype(), a.device())?.affine(shift, 0.0)?)?
    };
    Ok(q.t()?.matmul(&shifted)?.matmul(q)?)
}

impl Shampoo {
    /// The eigendecomposition a refresh of `a` (the bias-corrected, possibly trace-scaled
    /// factor, in the factor dtype) computes, warm-started at `old` (identity when `None`).
    /// `Failed` keeps the previous basis; a non-finite `a` is `Failed { NonFiniteInput }`.
    pub(super) fn eigendecompose(&self, a: &Tensor, old: Option<&Tensor>) -> Result<Robust<Basis>> {
        let c = &self.0;
        if !crate::optim::fused::all_finite(a)? {
            return Ok(Robust::Failed {
                first: LinalgError::NonFiniteInput,
                retry: None,
            });
        }
        let n = linalg::square_side(a, "shampoo eigendecomposition")?;
        let config = c.amortized_computation_config;
        let shift = if config.perturb_before() {
            c.epsilon
        } else {
            0.0
        };
        let warm = match old {
            Some(q) => q.to_dtype(a.dtype())?,
            None => identity(n, a.dtype(), a.device())?,
        };
        match config {
            AmortizedComputation::Qr {
                max_iterations,
                tolerance,
                ..
            } => {
                let mut b = in_basis(a, shift, &warm)?;
                let mut q = warm;
                let mut diag;
                let mut done = 0;
                loop {
                    let (stop, d) = converged(&b, tolerance)?;
                    diag = d;
                    if stop || done == max_iterations {
                        break;
                    }
                    let qb = match linalg::qr_q(&b)? {
                        Robust::Failed { first, retry } => {
                            return Ok(Robust::Failed { first, retry })
                        }
                        outcome => outcome.value().expect("not failed"),
                    };
                    // R_b Q_b with R_b = Q_bᵀ B.
                    b = qb.t()?.matmul(&b)?.matmul(&qb)?;
                    q = q.matmul(&qb)?;
                    done += 1;
                }
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&i, &j| diag[i].total_cmp(&diag[j])); // stable
                let values: Vec<f64> = order.iter().map(|&i| diag[i]).collect();
                let index = Tensor::from_vec(
                    order.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                    n,
                    a.device(),
                )?;
                let vectors = q.index_select(&index, 1)?;
                let values = Tensor::from_vec(values, n, a.device())?.to_dtype(a.dtype())?;
                if !crate::optim::fused::all_finite(&vectors)?
                    || !crate::optim::fused::all_finite(&values)?
                {
                    return Ok(Robust::Failed {
                        first: LinalgError::NonFiniteOutput,
                        retry: None,
                    });
                }
                Ok(Robust::Done(Basis { values, vectors }))
            }
            _ => {
                if let AmortizedComputation::Eigen { tolerance, .. } = config {
                    if tolerance > 0.0 {
                        let b = in_basis(a, shift, &warm)?;
                        let (stop, diag) = converged(&b, tolerance)?;
                        if stop {
                            let values =
                                Tensor::from_vec(diag, n, a.device())?.to_dtype(a.dtype())?;
                            return Ok(Robust::Done(Basis {
                                values,
                                vectors: warm,
                            }));
                        }
                    }
                }
                Ok(linalg::eigh(a, shift, Order::Ascending)?.map(|e| Basis {
                    values: e.values,
                    vectors: e.vectors,
                }))
            }
        }
    }

    /// The stability rule the stored eigenvalues are mapped with.
    pub(super) fn stability(&self) -> Stability {
        match self.0.amortized_computation_config.method() {
            linalg::RootMethod::Eigen(s) => s,
            linalg::RootMethod::CoupledNewton { .. } => Stability::default(),
        }
    }

    /// `P = Q diag(λ'^(−1/root)) Qᵀ` from stored eigenvalues and eigenvectors, computed in the
    /// eigenvectors' dtype. `None` when the result is exactly the identity (the initial state,
    /// eigenvalues one and basis identity, with `ε ≤ 1` under the perturbation rule).
    pub(super) fn root_from_basis(
        &self,
        values: Option<&Tensor>,
        vectors: Option<&Tensor>,
        n: usize,
        root: f64,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Option<Tensor>> {
        let epsilon = self.0.epsilon;
        let stability = self.stability();
        let powers: Vec<f64> = match values {
            Some(v) => with_float!(v.dtype(), "shampoo", T => {
                let w = v.flatten_all()?.to_vec1::<T>()?;
                linalg::root_powers::<T>(&w, root, epsilon, stability)
            }),
            None => with_float!(dtype, "shampoo", T => {
                linalg::root_powers::<T>(&vec![T::of(1.0); n], root, epsilon, stability)
            }),
        };
        let q = match vectors {
            Some(q) => q.to_dtype(dtype)?,
            None if powers.iter().all(|&p| p == 1.0) => return Ok(None),
            None => identity(n, dtype, device)?,
        };
        let p = Tensor::from_vec(powers, (1, n), device)?.to_dtype(dtype)?;
        Ok(Some(q.broadcast_mul(&p)?.matmul(&q.t()?)?))
    }
}
