//! Steps 1–3 of the update: the factor matrices' EMA (KL-Shampoo: of the whitened gradient's
//! outer products), and, when due, their inverse roots or eigenbases; eigenvalue-corrected
//! Shampoo's second moment `C` in the (new) basis. All computed aside ([`Staged`]) and committed
//! only once nothing can fail any more; failed refreshes keep the previous root or basis and
//! are counted.

use candle_core::{DType, Tensor};

use super::blocking::{
    corrected_eigenvalues_key, counter_key, eigenvalues_key, eigenvectors_key, factor_key,
    inv_factor_key, Plan,
};
use super::config::PreconditionerKind;
use super::Shampoo;
use crate::error::{Error, Result};
use crate::linalg::{self, InverseRoot, LinalgError, Robust};
use crate::optim::fused::{all_finite, zip_mut_or_kernel, Float, Kernel};
use crate::optim::kron::{ema_update, mode_gram, mode_products, FactorEma, Refresh};
use crate::optim::params::ParamMeta;
use crate::optim::state::State;
use crate::with_float;

/// Total failed inverse-root computations of the parameter (state scalar).
pub const FAILED: &str = "failed_amortized_computations";
/// Inverse roots that needed the f64 retry (state scalar).
pub const RETRIED: &str = "f64_retries";

pub(super) fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(if t.dtype() == dtype {
        t.clone()
    } else {
        t.to_dtype(dtype)?
    })
}

/// State tensors must be f64 or the parameter's dtype: matrices kept in f32 for an f64
/// parameter are stored as (exactly representable) f64 values.
pub(super) fn storage_dtype(compute: DType, param: DType) -> DType {
    if compute == DType::F64 || param == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `x / divisor` elementwise (a division, as the reference computes it), as a new tensor.
pub(super) fn divided(x: &Tensor, divisor: f64) -> Result<Tensor> {
    let out = x.zeros_like()?;
    let x = x.contiguous()?;
    with_float!(x.dtype(), "shampoo", T => {
        let d = T::of(divisor);
        let scalars = [d];
        zip_mut_or_kernel::<T>(Kernel::new("divide_by", &scalars), &[&out], &[&x], |o, i| {
            for (o, &v) in o[0].iter_mut().zip(i[0]) {
                *o = v / d;
            }
            Ok(())
        })?;
    });
    Ok(out)
}

/// What a step computed for the factors and roots, committed only when everything succeeded.
#[derive(Default)]
pub(super) struct Staged {
    pub(super) tensors: Vec<(String, Tensor)>,
    pub(super) scalars: Vec<(String, f64)>,
}

impl Shampoo {
    pub(super) fn root_request(&self, root: f64) -> InverseRoot {
        InverseRoot {
            root,
            epsilon: self.0.epsilon,
            method: self.0.amortized_computation_config.method(),
        }
    }

    /// The factor EMA's weight on a new outer product: `1 − β2`, or 1 (`β2 = 1`, or
    /// `drop_weighting_factor_on_gsquare`).
    pub(super) fn factor_weight(&self) -> f64 {
        let c = &self.0;
        if c.drop_weighting_factor_on_gsquare || c.betas.1 == 1.0 {
            1.0
        } else {
            1.0 - c.betas.1
        }
    }

    /// The factors' (and `C`'s) bias correction `1 − β2^t`, or 1 when it does not apply.
    pub(super) fn factor_bias_correction(&self, t: u64) -> f64 {
        let c = &self.0;
        let beta2 = c.betas.1;
        if c.use_bias_correction && beta2 < 1.0 && !c.drop_weighting_factor_on_gsquare {
            1.0 - beta2.powf(t as f64)
        } else {
            1.0
        }
    }

    /// The dtype roots are applied in: the one they are kept in (the eigenvectors' for the
    /// eigendecomposed forms).
    pub(super) fn root_dtype(&self) -> DType {
        let c = &self.0;
        if c.preconditioner.is_eigendecomposed() {
            c.factor_matrix_eigenvectors_dtype.dtype()
        } else {
            c.inv_factor_matrix_dtype.dtype()
        }
    }

    /// The inverse root `P_k` of block `b`'s dim `k` as the state holds it, in `dtype`: the
    /// stored root (root-inverse kinds) or the one rebuilt from `(λ_k, Q_k)` (eigendecomposed
    /// kinds). `None` is the exact identity. Not for eigenvalue-corrected Shampoo.
    pub(super) fn current_root(
        &self,
        state: &State,
        plan: &Plan,
        b: usize,
        k: usize,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Option<Tensor>> {
        let Some(root) = plan.roots[k] else {
            return Ok(None);
        };
        if self.0.preconditioner.is_eigendecomposed() {
            let n = plan.blocks.block_shape(b)[k];
            self.root_from_basis(
                state.tensors.get(&eigenvalues_key(b, k)),
                state.tensors.get(&eigenvectors_key(b, k)),
                n,
                root,
                dtype,
                device,
            )
        } else {
            match state.tensors.get(&inv_factor_key(b, k)) {
                Some(p) => Ok(Some(cast(p, dtype)?)),
                None => Ok(None),
            }
        }
    }

    /// The outer products folded into block `b`'s factors, all formed before any factor
    /// changes: `G_(k)G_(k)ᵀ`, or (KL) `H_(k)H_(k)ᵀ` with `H = G ×_j P_j` over every other
    /// preconditioned dim `j`, `P_j` the roots of the last refresh.
    fn factor_statistics(
        &self,
        plan: &Plan,
        b: usize,
        gb: &Tensor,
        state: &State,
    ) -> Result<Vec<Option<Tensor>>> {
        let c = &self.0;
        let fdt = c.factor_matrix_dtype.dtype();
        let order = plan.roots.len();
        if !c.preconditioner.is_kl() {
            let gf = cast(gb, fdt)?;
            return (0..order)
                .map(|k| match plan.roots[k] {
                    Some(_) => Ok(Some(mode_gram(&gf, k)?)),
                    None => Ok(None),
                })
                .collect();
        }
        // The product is cast back to the gradient's dtype.
        let rdt = self.root_dtype();
        let roots: Vec<Option<Tensor>> = (0..order)
            .map(|j| self.current_root(state, plan, b, j, rdt, gb.device()))
            .collect::<Result<_>>()?;
        let gr = cast(gb, rdt)?;
        (0..order)
            .map(|k| {
                if plan.roots[k].is_none() {
                    return Ok(None);
                }
                let mut others = roots.clone();
                others[k] = None;
                let h = cast(&mode_products(&gr, &others, false)?, gb.dtype())?;
                Ok(Some(mode_gram(&cast(&h, fdt)?, k)?))
            })
            .collect()
    }

    /// Steps 1–3 of the update: new factors, when due new roots or bases, and (eigenvalue-
    /// corrected) the new `C`, into `Staged`.
    pub(super) fn stage_preconditioner(
        &self,
        meta: &ParamMeta,
        plan: &Plan,
        g_blocks: &[Tensor],
        param_dtype: DType,
        state: &State,
        t: u64,
    ) -> Result<Staged> {
        let c = &self.0;
        let kind = c.preconditioner;
        let fdt = c.factor_matrix_dtype.dtype();
        let f_store = storage_dtype(fdt, param_dtype);
        let beta2 = c.betas.1;
        let weight = self.factor_weight();
        let bc2 = self.factor_bias_correction(t);
        let ema = FactorEma::ScaleAdd {
            decay: beta2,
            weight,
        };
        let amortize = Refresh::AfterStart {
            frequency: c.precondition_frequency,
            start: c.start(),
        }
        .due(t);
        let mut staged = Staged::default();
        let (mut failed_total, mut retried_total) = (0.0, 0.0);
        for (b, gb) in g_blocks.iter().enumerate() {
            let stats = self.factor_statistics(plan, b, gb, state)?;
            let mut failure: Option<String> = None;
            let mut has_factor = false;
            // Eigenvalue-corrected: the basis each dim has after this step's refresh.
            let mut bases: Vec<Option<Tensor>> = vec![None; plan.roots.len()];
            for (k, root) in plan.roots.iter().enumerate() {
                let (Some(root), Some(stat)) = (*root, &stats[k]) else {
                    continue;
                };
                has_factor = true;
                let d = gb.dims()[k];
                let fkey = factor_key(b, k);
                let factor = match state.tensors.get(&fkey) {
                    Some(old) if old.dtype() == fdt => old.copy()?,
                    Some(old) => old.to_dtype(fdt)?,
                    None => Tensor::zeros((d, d), fdt, gb.device())?,
                };
                ema_update(&factor, stat, ema)?;
                if !all_finite(&factor)? {
                    return Err(Error::Numerical(format!(
                        "shampoo: factor matrix {k} of block {b} of `{}` holds NaN or infinity at \
                         step {t} (gradient too large for factor_matrix_dtype {:?}?); nothing \
                         was changed",
                        meta.name, c.factor_matrix_dtype
                    )));
                }
                if kind == PreconditionerKind::EigenvalueCorrected {
                    bases[k] = Some(match state.tensors.get(&eigenvectors_key(b, k)) {
                        Some(q) => q.clone(),
                        None => crate::optim::kron::identity(d, fdt, gb.device())?,
                    });
                }
                if amortize {
                    let a = self.refresh_input(&factor, bc2)?;
                    let outcome = self.refresh(&a, root, state, b, k, param_dtype, &mut staged)?;
                    match outcome {
                        RefreshOutcome::NonFinite => {
                            return Err(Error::Numerical(format!(
                                "shampoo: bias-corrected factor matrix {k} of block {b} of `{}` \
                                 holds NaN or infinity at step {t}; nothing was changed",
                                meta.name
                            )))
                        }
                        RefreshOutcome::Failed(reason) => {
                            failed_total += 1.0;
                            failure = Some(format!("factor {k}: {reason}"));
                        }
                        RefreshOutcome::Done { retried, basis } => {
                            if retried {
                                retried_total += 1.0;
                            }
                            if let Some(q) = basis {
                                bases[k] = Some(q);
                            }
                        }
                    }
                }
                staged.tensors.push((fkey, cast(&factor, f_store)?));
            }
            if kind == PreconditionerKind::EigenvalueCorrected {
                let corrected = self.corrected_eigenvalues(gb, &bases, state, b)?;
                let store = storage_dtype(c.corrected_eigenvalues_dtype.dtype(), param_dtype);
                staged
                    .tensors
                    .push((corrected_eigenvalues_key(b), cast(&corrected, store)?));
            }
            if amortize && has_factor {
                let key = counter_key(b);
                let count = match failure {
                    Some(reason) => {
                        let count = state.scalar(&key) + 1.0;
                        if count > c.num_tolerated_failed_amortized_computations as f64 {
                            return Err(Error::Numerical(format!(
                                "shampoo: `{}` block {b}: {count} consecutive failed \
                                 amortized computations (inverse roots or eigenbases) exceed \
                                 num_tolerated_failed_amortized_computations = {} at step {t} \
                                 (last: {reason}); nothing was changed",
                                meta.name, c.num_tolerated_failed_amortized_computations
                            )));
                        }
                        count
                    }
                    None => 0.0,
                };
                staged.scalars.push((key, count));
            }
        }
        if failed_total > 0.0 {
            staged
                .scalars
                .push((FAILED.into(), state.scalar(FAILED) + failed_total));
        }
        if retried_total > 0.0 {
            staged
                .scalars
                .push((RETRIED.into(), state.scalar(RETRIED) + retried_total));
        }
        Ok(staged)
    }

    /// `A = F/bc2`, scaled by `max(trace A, ε)^(−trace_scaling_exponent)` with trace scaling.
    fn refresh_input(&self, factor: &Tensor, bc2: f64) -> Result<Tensor> {
        let c = &self.0;
        let mut a = divided(factor, bc2)?;
        if c.use_trace_scaling {
            let trace: f64 = a
                .to_dtype(DType::F64)?
                .to_vec2::<f64>()?
                .iter()
                .enumerate()
                .map(|(i, row)| row[i])
                .sum();
            let scale = trace.max(c.epsilon).powf(-c.trace_scaling_exponent);
            a = a.affine(scale, 0.0)?;
        }
        Ok(a)
    }

    /// One refresh of block `b`'s dim `k` from `a`: the new inverse root, `(λ_k, Q_k)` or
    /// `Q_k`, pushed to `staged` on success.
    #[allow(clippy::too_many_arguments)]
    fn refresh(
        &self,
        a: &Tensor,
        root: f64,
        state: &State,
        b: usize,
        k: usize,
        param_dtype: DType,
        staged: &mut Staged,
    ) -> Result<RefreshOutcome> {
        let c = &self.0;
        let kind = c.preconditioner;
        let outcome = if matches!(
            kind,
            PreconditionerKind::RootInv | PreconditionerKind::RootInvKl
        ) {
            let idt = c.inv_factor_matrix_dtype.dtype();
            let i_store = storage_dtype(idt, param_dtype);
            linalg::inverse_root(a, &self.root_request(root))?.try_map(|p| {
                staged
                    .tensors
                    .push((inv_factor_key(b, k), cast(&cast(&p, idt)?, i_store)?));
                Ok(None)
            })?
        } else {
            let vdt = c.factor_matrix_eigenvectors_dtype.dtype();
            let v_store = storage_dtype(vdt, param_dtype);
            let old = state.tensors.get(&eigenvectors_key(b, k));
            self.eigendecompose(a, old)?.try_map(|basis| {
                let q = cast(&cast(&basis.vectors, vdt)?, v_store)?;
                staged.tensors.push((eigenvectors_key(b, k), q.clone()));
                if kind.is_eigendecomposed() {
                    let ldt = c.factor_matrix_eigenvalues_dtype.dtype();
                    let l_store = storage_dtype(ldt, param_dtype);
                    let values = cast(&cast(&basis.values, ldt)?, l_store)?;
                    staged.tensors.push((eigenvalues_key(b, k), values));
                }
                Ok(Some(q))
            })?
        };
        Ok(match outcome {
            Robust::Failed {
                first: LinalgError::NonFiniteInput,
                ..
            } => RefreshOutcome::NonFinite,
            Robust::Failed { first, retry } => RefreshOutcome::Failed(match retry {
                Some(r) => format!("{first}; f64 retry: {r}"),
                None => first.to_string(),
            }),
            outcome => RefreshOutcome::Done {
                retried: outcome.was_retried(),
                basis: outcome.value().expect("not failed"),
            },
        })
    }
}

/// What one refresh gave.
enum RefreshOutcome {
    /// The (bias-corrected) factor is not finite: the step fails.
    NonFinite,
    /// The computation failed: the previous root or basis is kept, the failure counted.
    Failed(String),
    /// Done (staged); the new basis for eigenvalue-corrected Shampoo.
    Done {
        retried: bool,
        basis: Option<Tensor>,
    },
}
