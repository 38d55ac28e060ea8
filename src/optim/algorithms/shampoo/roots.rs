//! Step 1 of the update: the factor matrices' EMA and, when due, their inverse roots, computed
//! aside ([`Staged`]) and committed only once nothing can fail any more; failed roots keep the
//! previous root and are counted.

use candle_core::{DType, Tensor};

use super::blocking::{counter_key, factor_key, inv_factor_key, Plan};
use super::Shampoo;
use crate::error::{Error, Result};
use crate::linalg::{self, InverseRoot, LinalgError, Robust};
use crate::optim::fused::{all_finite, zip_mut_or_kernel, Float, Kernel};
use crate::optim::kron::{ema_update, mode_gram, FactorEma, Refresh};
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

    /// Steps 1 of the update: new factors and, when due, new inverse roots, into `Staged`.
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
        let fdt = c.factor_matrix_dtype.dtype();
        let idt = c.inv_factor_matrix_dtype.dtype();
        let (f_store, i_store) = (
            storage_dtype(fdt, param_dtype),
            storage_dtype(idt, param_dtype),
        );
        let beta2 = c.betas.1;
        let weight = if c.drop_weighting_factor_on_gsquare || beta2 == 1.0 {
            1.0
        } else {
            1.0 - beta2
        };
        let bc2 = if c.use_bias_correction && beta2 < 1.0 && !c.drop_weighting_factor_on_gsquare {
            1.0 - beta2.powf(t as f64)
        } else {
            1.0
        };
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
            let gf = cast(gb, fdt)?;
            let mut failure: Option<String> = None;
            let mut has_factor = false;
            for (k, root) in plan.roots.iter().enumerate() {
                let Some(root) = *root else { continue };
                has_factor = true;
                let d = gb.dims()[k];
                let fkey = factor_key(b, k);
                let factor = match state.tensors.get(&fkey) {
                    Some(old) if old.dtype() == fdt => old.copy()?,
                    Some(old) => old.to_dtype(fdt)?,
                    None => Tensor::zeros((d, d), fdt, gb.device())?,
                };
                ema_update(&factor, &mode_gram(&gf, k)?, ema)?;
                if !all_finite(&factor)? {
                    return Err(Error::Numerical(format!(
                        "shampoo: factor matrix {k} of block {b} of `{}` holds NaN or infinity at \
                         step {t} (gradient too large for factor_matrix_dtype {:?}?); nothing \
                         was changed",
                        meta.name, c.factor_matrix_dtype
                    )));
                }
                if amortize {
                    let mut a = divided(&factor, bc2)?;
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
                    match linalg::inverse_root(&a, &self.root_request(root))? {
                        Robust::Failed {
                            first: LinalgError::NonFiniteInput,
                            ..
                        } => {
                            return Err(Error::Numerical(format!(
                                "shampoo: bias-corrected factor matrix {k} of block {b} of `{}` \
                                 holds NaN or infinity at step {t}; nothing was changed",
                                meta.name
                            )))
                        }
                        Robust::Failed { first, retry } => {
                            failed_total += 1.0;
                            failure = Some(match retry {
                                Some(r) => format!("factor {k}: {first}; f64 retry: {r}"),
                                None => format!("factor {k}: {first}"),
                            });
                        }
                        outcome => {
                            if outcome.was_retried() {
                                retried_total += 1.0;
                            }
                            let p = outcome.value().expect("not failed");
                            staged
                                .tensors
                                .push((inv_factor_key(b, k), cast(&cast(&p, idt)?, i_store)?));
                        }
                    }
                }
                staged.tensors.push((fkey, cast(&factor, f_store)?));
            }
            if amortize && has_factor {
                let key = counter_key(b);
                let count = match failure {
                    Some(reason) => {
                        let count = state.scalar(&key) + 1.0;
                        if count > c.num_tolerated_failed_amortized_computations as f64 {
                            return Err(Error::Numerical(format!(
                                "shampoo: `{}` block {b}: {count} consecutive failed inverse-root \
                                 computations exceed num_tolerated_failed_amortized_computations \
                                 = {} at step {t} (last: {reason}); nothing was changed",
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
}
