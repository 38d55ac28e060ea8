//! How a parameter is seen by Shampoo: its view (small dims merged, as DistributedShampoo's
//! `merge_small_dims`), the blocks of at most `max_preconditioner_dim` per side cut from it,
//! which view dims carry a factor, and the state keys of each block's matrices.

use super::config::{DimLimit, PreconditionerKind, ShampooConfig};
use crate::error::Result;
use crate::optim::kron::{Blocks, KronLayout};

/// DistributedShampoo's `merge_small_dims`: drop size-1 dims (all ones → `[1]`), then walk the
/// dims from the last to the first, merging the next dim into the current one while more than
/// `target` dims would otherwise remain and the product stays at most `threshold`.
/// `(6,10)`, 1024, 1 → `[60]`; target 2 → `[6,10]`; `(32,3,64,64)`, 8192, 1 → `[96,4096]`;
/// `(8,4,3)`, 1024, 2 → `[8,12]`; a shape with a 0 → `[0]`.
pub fn merge_small_dims(shape: &[usize], threshold: usize, target: usize) -> Vec<usize> {
    if shape.contains(&0) {
        return vec![0];
    }
    let mut squeezed: Vec<usize> = shape.iter().rev().copied().filter(|&d| d != 1).collect();
    if squeezed.is_empty() {
        squeezed.push(1);
    }
    let n = squeezed.len();
    let mut merged = vec![squeezed[0]];
    for (processed, &next) in squeezed.iter().enumerate().skip(1) {
        let potential = merged.len() + (n - processed);
        let last = merged.last_mut().expect("non-empty");
        match last.checked_mul(next) {
            Some(product) if potential > target && product <= threshold => *last = product,
            _ => merged.push(next),
        }
    }
    merged.reverse();
    merged
}

/// How one parameter is preconditioned.
pub(super) struct Plan {
    pub(super) layout: KronLayout,
    pub(super) blocks: Blocks,
    /// The root `1/e_k` of every view dim (`None`: not preconditioned). Eigenvalue-corrected:
    /// `Some(1/e)` with the block's one exponent for every rotated dim, `None` for ignored ones.
    pub(super) roots: Vec<Option<f64>>,
}

impl ShampooConfig {
    /// The view, blocking and roots of a parameter of `shape` (non-empty).
    pub(super) fn plan(&self, shape: &[usize]) -> Result<Plan> {
        let limit = self.max_preconditioner_dim.get();
        let dims = match self.target_parameter_dimensionality {
            DimLimit::Inf => shape.to_vec(),
            DimLimit::Finite(target) => merge_small_dims(shape, limit, target),
        };
        let order = dims.len();
        let ec = self.preconditioner == PreconditionerKind::EigenvalueCorrected;
        let roots: Vec<Option<f64>> = (0..order)
            .map(|k| {
                let e = self.inverse_exponent(order, k);
                if ec {
                    (!self.ignores_basis_change(order, k)).then(|| 1.0 / e)
                } else {
                    (e != 0.0).then(|| 1.0 / e)
                }
            })
            .collect();
        let flags = roots.iter().map(Option::is_some).collect();
        let layout = KronLayout::new(shape, dims, flags, false)?;
        let blocks = Blocks::new(layout.dims(), limit)?;
        Ok(Plan {
            layout,
            blocks,
            roots,
        })
    }
}

pub(super) fn factor_key(block: usize, k: usize) -> String {
    format!("block{block}.factor_matrix.{k}")
}

pub(super) fn inv_factor_key(block: usize, k: usize) -> String {
    format!("block{block}.inv_factor_matrix.{k}")
}

pub(super) fn eigenvectors_key(block: usize, k: usize) -> String {
    format!("block{block}.factor_matrix_eigenvectors.{k}")
}

pub(super) fn eigenvalues_key(block: usize, k: usize) -> String {
    format!("block{block}.factor_matrix_eigenvalues.{k}")
}

pub(super) fn corrected_eigenvalues_key(block: usize) -> String {
    format!("block{block}.corrected_eigenvalues")
}

/// The state keys a block's preconditioned dim `k` owns under `kind` (besides its factor).
pub(super) fn preconditioner_keys(kind: PreconditionerKind, block: usize, k: usize) -> Vec<String> {
    match kind {
        PreconditionerKind::RootInv | PreconditionerKind::RootInvKl => {
            vec![inv_factor_key(block, k)]
        }
        PreconditionerKind::Eigendecomposed | PreconditionerKind::EigendecomposedKl => {
            vec![eigenvectors_key(block, k), eigenvalues_key(block, k)]
        }
        PreconditionerKind::EigenvalueCorrected => vec![eigenvectors_key(block, k)],
    }
}

pub(super) fn counter_key(block: usize) -> String {
    format!("block{block}.failed_amortized_computation_counter")
}
