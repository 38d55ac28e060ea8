//! Eigenvalue-corrected Shampoo (DistributedShampoo's `EigenvalueCorrectedShampooPreconditioner
//! Config`; SOAP, Vyas et al. 2024, arXiv 2409.11321, seen as EKFAC-style eigenvalue correction,
//! Eschenhagen et al. 2025, arXiv 2506.03595): Adam run in the eigenbasis `Q_k` of Shampoo's
//! factors, per block,
//!
//! ```text
//! C ← β2·C + w·(G ×_k Q_kᵀ)²                  raw gradient, basis as after this step's refresh
//! S = ((Ḡ ×_k Q_kᵀ) ⊘ ((C/bc2)^e + ε)) ×_k Q_k     e = 1/2 unless overridden per block order
//! ```
//!
//! `C` keeps the block's shape and is never rotated when the basis changes: its entry `i` along
//! dim `k` belongs to column `i` of the current `Q_k` (columns in ascending eigenvalue order),
//! whatever the column held before. Dims in `ignored_basis_change_dims` stay unrotated. Before
//! the first refresh every `Q_k` is the identity, so the steps are Adam's.

use candle_core::Tensor;

use super::blocking::{corrected_eigenvalues_key, eigenvectors_key, Plan};
use super::roots::{cast, divided};
use super::Shampoo;
use crate::error::{Error, Result};
use crate::optim::kron::mode_products;
use crate::optim::state::State;

impl Shampoo {
    /// The new `C` of block `b` from its raw gradient block `gb` and the bases after this
    /// step's refresh (`None`: an unrotated dim), in `corrected_eigenvalues_dtype`.
    pub(super) fn corrected_eigenvalues(
        &self,
        gb: &Tensor,
        bases: &[Option<Tensor>],
        state: &State,
        b: usize,
    ) -> Result<Tensor> {
        let c = &self.0;
        let vdt = c.factor_matrix_eigenvectors_dtype.dtype();
        let cdt = c.corrected_eigenvalues_dtype.dtype();
        let rotated = cast(
            &cast(&mode_products(&cast(gb, vdt)?, bases, true)?, gb.dtype())?,
            cdt,
        )?;
        let old = match state.tensors.get(&corrected_eigenvalues_key(b)) {
            Some(old) => cast(old, cdt)?,
            None => rotated.zeros_like()?,
        };
        let beta2 = c.betas.1;
        let decayed = if beta2 == 1.0 {
            old
        } else {
            old.affine(beta2, 0.0)?
        };
        // torch's addcmul order: (w·G')·G'.
        let fresh = rotated.affine(self.factor_weight(), 0.0)?.mul(&rotated)?;
        Ok((decayed + fresh)?)
    }

    /// The search direction of block `b` from the filtered gradient block `gbar` (parameter
    /// dtype): `((Ḡ ×_k Q_kᵀ) ⊘ ((C/bc2)^e + ε)) ×_k Q_k`.
    pub(super) fn corrected_direction(
        &self,
        plan: &Plan,
        b: usize,
        gbar: &Tensor,
        state: &State,
        t: u64,
    ) -> Result<Tensor> {
        let c = &self.0;
        let vdt = c.factor_matrix_eigenvectors_dtype.dtype();
        let dtype = gbar.dtype();
        let bases: Vec<Option<Tensor>> = (0..plan.roots.len())
            .map(
                |k| match (plan.roots[k], state.tensors.get(&eigenvectors_key(b, k))) {
                    (Some(_), Some(q)) => Ok(Some(cast(q, vdt)?)),
                    _ => Ok(None),
                },
            )
            .collect::<Result<_>>()?;
        let key = corrected_eigenvalues_key(b);
        let corrected = state
            .tensors
            .get(&key)
            .ok_or_else(|| Error::State(format!("shampoo: `{key}` missing after its update")))?;
        let x = cast(&mode_products(&cast(gbar, vdt)?, &bases, true)?, dtype)?;
        let order = plan.layout.dims().len();
        let e = c.inverse_exponent(order, 0);
        let second = divided(&cast(corrected, dtype)?, self.factor_bias_correction(t))?;
        let root = if e == 0.5 {
            second.sqrt()?
        } else if e == 1.0 {
            second
        } else {
            second.powf(e)?
        };
        let y = x.div(&root.affine(1.0, c.epsilon)?)?;
        cast(&mode_products(&cast(&y, vdt)?, &bases, false)?, dtype)
    }
}
