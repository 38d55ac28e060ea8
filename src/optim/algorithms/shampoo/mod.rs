//! Shampoo (Gupta, Koren & Singer 2018) as Meta's DistributedShampoo computes it on one device
//! (Shi et al. 2023, arXiv 2309.06497), with the root-inverse preconditioner and the eigen method.
//!
//! A parameter is first seen through its *view*: with `target_parameter_dimensionality = d`
//! (the reference's `SingleDeviceDistributedConfig` default is 1) size-1 dims are dropped and
//! adjacent dims are merged from the last one backwards while more than `d` dims would remain
//! and the product stays at most `max_preconditioner_dim`; with `"inf"` the shape is kept. The
//! view is then cut into blocks of at most `max_preconditioner_dim` along every dim (row-major
//! chunk order). Every block is an independent problem: one factor `F_k` per preconditioned dim
//! `k`, one inverse root `P_k` (the identity until first computed), and its own grafting norm.
//!
//! Per step `t` (the optimizer's step, one counter for every parameter as in the reference) and
//! block, with gradient `G`, weights `W`, `s = start_preconditioning_step`, `f` the frequency:
//!
//! ```text
//! G ← G + λ·W                                           (weight_decay_type = l2 only)
//! F_k ← β2·F_k + w·G_(k)G_(k)ᵀ     w = 1−β2 (1 if β2 = 1 or drop_weighting_factor_on_gsquare)
//! if t == s or (t > s and t % f == 0):
//!     P_k ← (F_k/bc2 + εI)^(−e_k)    bc2 = 1−β2^t (use_bias_correction, β2 < 1, no drop), else 1
//!                                    eigh; if λmin < ε: λ ← λ − λmin + ε; on failure keep P_k
//! V ← β2g·V + wg·G²                  grafting state (AdaGrad: β2g = wg = 1)
//! M ← lerp(M, G, 1−β1);  Ḡ = (β3 = β1 ? M : lerp(M_old, G, 1−β3)) / (1 − β3·β1^(t−1))
//!                                    (Ḡ = G when β1 = 0; no division without use_bias_correction)
//! A = graft(Ḡ): SGD Ḡ; AdaGrad/RMSprop Ḡ/(√V + εg); Adam Ḡ/(√(V/(1−β2g^t)) + εg)
//! D = A                                      if t < s and grafting is set
//! D = S·‖A‖/(‖S‖ + 1e-16), S = Ḡ ×_1 P_1 ×_2 P_2 …   otherwise (D = S without grafting)
//! D ← D + α·W      α = λ (decoupled), λ·lr/lr₀ (corrected), λ/lr₀ (independent); lr₀ = base lr
//! B ← μ·B + (1−τ)·D;  D ← (1−τ)·D + μ·B (Nesterov) or B      (classic momentum only)
//! W ← W − lr·D
//! ```
//!
//! The default exponent is `e_k = 1/(2·order)` (a matrix gets `L^(−1/4) G R^(−1/4)`);
//! `inverse_exponent_override = { 2 = 0.5 }` gives the "1/2 power" Shampoo (`L^(−1/2) G
//! R^(−1/2)`, Morwani et al. 2024) the SOAP paper compares against, and an exponent 0 leaves a
//! dim unpreconditioned. Without grafting the first `s − 1` steps are (EMA-)SGD, because `P_k`
//! starts as the identity.
//!
//! State (saved and loaded like any other): per block `b` and preconditioned view dim `k`,
//! `block<b>.factor_matrix.<k>` and `block<b>.inv_factor_matrix.<k>` (absent until first
//! computed, meaning the identity); parameter-shaped `grafting_state` (V), `filtered_grad` (M)
//! and `momentum_buffer` (B), which are elementwise and so need no blocking. Matrices are kept
//! in `factor_matrix_dtype` / `inv_factor_matrix_dtype` (f32 by default, as the reference; use
//! float64 for float64 work and whenever ε is far below float32 round-off of the factors);
//! float32 matrices of a float64 parameter are stored as (exact) float64 values.
//!
//! Robustness: a failed inverse root (the eigensolver does not converge or returns non-finite
//! values, after an f64 retry for f32 factors) keeps the previous `P_k` and is counted: the
//! state scalars `failed_amortized_computations` (total) and
//! `block<b>.failed_amortized_computation_counter` (consecutive, per block), surfaced by
//! [`Rule::diagnostics`] as `shampoo_failed_amortized_computations`. More than
//! `num_tolerated_failed_amortized_computations` consecutive failures of one block, or a factor
//! matrix holding NaN/infinity (e.g. a float32 factor overflowing on huge gradients), fail the
//! step with an error before any state or parameter changes. Deviations from the reference,
//! all on failure paths: a non-finite *result* of the root counts as a failure instead of
//! raising, and a coupled Newton iteration that does not reach its tolerance counts as a
//! failure instead of being used with a warning.
//!
//! Defaults are the reference's: lr 1e-2, β = (0.9, 1.0), β3 = β1, ε = 1e-12, no weight decay
//! (decoupled), `max_preconditioner_dim` 1024, frequency 1, `s = f`, bias correction on, no
//! grafting, no momentum, target dimensionality 1, float32 factors, 3 tolerated failures.
//! Reference: facebookresearch/optimizers `distributed_shampoo/` @ f606606 (2026-08-05).
//! The reference keeps lr in a float32 tensor; here lr is used in the parameter's precision.
//!
//! **Preconditioner variants** (`preconditioner`, DistributedShampoo's `preconditioner_config`
//! classes; reference @ f606606, KL-Shampoo: Lin et al. 2025, arXiv 2509.03378):
//!
//! ```text
//! root_inv              (default) as above
//! eigendecomposed       refresh stores (λ_k, Q_k) = eigh(F_k/bc2 + εI) (or warm-started QR);
//!                       P_k = Q_k diag(λ'^(−e_k)) Q_kᵀ rebuilt at every use (λ' by the ε shift
//!                       rule; stored λ start at ones, so P_k = ε^(−e_k)·I before a refresh if ε > 1)
//! root_inv_kl,          F_k ← β2·F_k + w·H_(k)H_(k)ᵀ,  H = G ×_j P_j over every other dim j,
//! eigendecomposed_kl    P_j from the last refresh (all outer products before any F_k changes)
//! eigenvalue_corrected  Q_k refreshed as `eigendecomposed` (ascending columns; QR warm start);
//!                       C ← β2·C + w·(G ×_k Q_kᵀ)²  with the basis after this step's refresh;
//!                       S = ((Ḡ ×_k Q_kᵀ) ⊘ ((C/bc2)^e + ε)) ×_k Q_k,  e = 1/2 per block order
//! ```
//!
//! With the default exponents a matrix's KL update whitens by `F^(−1/2)` of the other side
//! (`P_R` applied once to `G`, so squared in the outer product), not the paper's `F^(−1)`;
//! `inverse_exponent_override = { 2 = 0.5 }` gives the paper's form. Eigenvalue-corrected
//! Shampoo's `C` is attached to basis columns by index and never rotated; its ε sits outside the
//! bias-corrected root (unlike nikhilvyas/SOAP), the first step is not skipped, and 1-D
//! parameters are rotated by a full factor unless `ignored_basis_change_dims = { 1 = [0] }`.
//! Extra state: `block<b>.factor_matrix_eigenvectors.<k>`, `block<b>.factor_matrix_eigenvalues.<k>`
//! (eigendecomposed), `block<b>.corrected_eigenvalues` (block-shaped). There is no KL +
//! eigenvalue-correction ("KL-SOAP") class in the reference, so none here.
//!
//! The code follows those steps, one file each: [`config`] (the hyperparameters and their
//! checks), [`blocking`] (the view and the blocks of a parameter), [`roots`] (factors, their KL
//! whitening, and inverse roots or bases, staged until the step cannot fail any more),
//! [`eigen`] (eigendecompositions: eigh, the adaptive skip, warm-started QR; roots rebuilt from
//! them), [`corrected`] (eigenvalue-corrected Shampoo's `C` and direction), [`grafting`] (the
//! grafted method's state and step size) and [`update`] (filtered gradient, direction, weight
//! decay, momentum and the parameter update); this file holds the rule that ties them together.

mod blocking;
mod config;
mod corrected;
mod eigen;
mod grafting;
mod roots;
mod update;

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

pub use blocking::merge_small_dims;
use blocking::{corrected_eigenvalues_key, eigenvalues_key, factor_key, preconditioner_keys};
pub use config::{
    AmortizedComputation, DimLimit, ExponentOverride, FactorDtype, IterateAveraging,
    PreconditionerKind, ShampooConfig, WeightDecayType,
};
pub use grafting::Grafting;
pub use roots::{FAILED, RETRIED};
use update::with_l2;

use crate::error::{Error, Result};
use crate::optim::config::RuleConfig;
use crate::optim::params::ParamMeta;
use crate::optim::rule::{expect_state_shape, Rule, StepCtx};
use crate::optim::state::State;
use crate::with_float;

/// The Shampoo rule.
#[derive(Debug, Clone)]
pub struct Shampoo(pub ShampooConfig);

impl Rule for Shampoo {
    fn name(&self) -> &'static str {
        ShampooConfig::NAME
    }

    fn check_param(&self, meta: &ParamMeta) -> Result<()> {
        if meta.shape.iter().product::<usize>() > 0 {
            self.0.plan(&meta.shape)?;
        }
        Ok(())
    }

    fn update(
        &self,
        ctx: &StepCtx<'_>,
        meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        if param.elem_count() == 0 {
            return Ok(());
        }
        let c = &self.0;
        let t = ctx.step.max(1);
        let plan = c.plan(&meta.shape)?;
        // 0. L2 weight decay enters everything (factors, grafting, filtered gradient).
        let g = if ctx.weight_decay != 0.0 && c.weight_decay_type == WeightDecayType::L2 {
            with_l2(grad, param.as_tensor(), ctx.weight_decay)?
        } else {
            grad.contiguous()?
        };
        // 1. Factors and roots: computed aside, committed once nothing can fail any more.
        let g_blocks = plan.blocks.split(&plan.layout.to_view(&g)?)?;
        let staged = self.stage_preconditioner(meta, &plan, &g_blocks, param.dtype(), state, t)?;
        for (k, v) in staged.tensors {
            state.tensors.insert(k, v);
        }
        for (k, v) in staged.scalars {
            state.set_scalar(&k, v);
        }
        with_float!(param.dtype(), "shampoo", T => self.apply::<T>(ctx, &plan, param, &g, state, t))
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        for f in ["grafting_state", "filtered_grad", "momentum_buffer"] {
            expect_state_shape(meta, state, f, &meta.shape)?;
        }
        if meta.shape.iter().product::<usize>() == 0 {
            return Ok(());
        }
        let plan = self.0.plan(&meta.shape)?;
        let kind = self.0.preconditioner;
        // Every per-block field must belong to a block and dim of this plan, with its shape.
        let mut known = std::collections::BTreeSet::new();
        for b in 0..plan.blocks.len() {
            let shape = plan.blocks.block_shape(b);
            for (k, root) in plan.roots.iter().enumerate() {
                if root.is_none() {
                    continue;
                }
                let d = shape[k];
                expect_state_shape(meta, state, &factor_key(b, k), &[d, d])?;
                known.insert(factor_key(b, k));
                for key in preconditioner_keys(kind, b, k) {
                    let want: &[usize] = if key == eigenvalues_key(b, k) {
                        &[d]
                    } else {
                        &[d, d]
                    };
                    expect_state_shape(meta, state, &key, want)?;
                    known.insert(key);
                }
            }
            if kind == PreconditionerKind::EigenvalueCorrected {
                let key = corrected_eigenvalues_key(b);
                expect_state_shape(meta, state, &key, &shape)?;
                known.insert(key);
            }
        }
        for key in state.tensors.keys() {
            if key.starts_with("block") && !known.contains(key) {
                return Err(Error::State(format!(
                    "`{}.{key}` does not fit this parameter's Shampoo blocks",
                    meta.name
                )));
            }
        }
        Ok(())
    }

    fn diagnostics(&self, state: &State, out: &mut BTreeMap<String, f64>) {
        *out.entry("shampoo_failed_amortized_computations".into())
            .or_insert(0.0) += state.scalar(FAILED);
        *out.entry("shampoo_f64_retries".into()).or_insert(0.0) += state.scalar(RETRIED);
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod variant_tests;
