//! The per-tensor update rule every optimizer implements, and what the driver hands it.

use candle_core::{Tensor, Var};

use crate::error::{Error, Result};
use crate::optim::params::ParamMeta;
use crate::optim::state::State;

/// What a rule sees of the current step: the driver owns learning rate, weight decay and the
/// step counter, so rules never keep their own copies.
#[derive(Debug, Clone, Copy)]
pub struct StepCtx<'a> {
    /// The group's learning rate for this step (base lr × schedule factor).
    pub lr: f64,
    /// The schedule factor (current lr / base lr), for rules that carry secondary learning rates
    /// (MARS's 1-D lr, Muon's auxiliary AdamW lr) which follow the same schedule.
    pub lr_factor: f64,
    /// The group's weight decay for this parameter.
    pub weight_decay: f64,
    /// The optimizer's step (1 on the first call to `step`).
    pub step: u64,
    /// Group-wide state, after [`Rule::begin_step`].
    pub group: &'a State,
}

/// Inputs beyond the gradient that some optimizers consume between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtraInput {
    /// Sophia: the gradient of the loss at labels sampled from the model (Gauss–Newton–Bartlett
    /// estimator); the rule folds its square into the Hessian EMA.
    HessianGrad,
    /// Sophia: an elementwise Hessian-diagonal estimate, already squared/formed, folded into the
    /// Hessian EMA as is.
    HessianDiag,
    /// MARS exact: the gradient of the next batch at the current parameters.
    PreviousGrad,
    /// PSGD Kron: the random draws of the next step, one vector per parameter (not shaped like
    /// it; layout in `optim::algorithms::psgd_kron`).
    RandomDraws,
}

impl ExtraInput {
    /// Whether the values have the parameter's shape (else any vector; the rule checks it).
    pub fn shaped_like_param(self) -> bool {
        self != ExtraInput::RandomDraws
    }
}

/// Training or evaluation parameters (Schedule-Free keeps different points for each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Parameters hold the point where gradients are taken.
    Train,
    /// Parameters hold the point to evaluate.
    Eval,
}

/// A per-tensor optimizer: how one parameter moves given its gradient and its state.
///
/// State is created lazily on the first update (an empty [`State`] arrives then). Rules must be
/// deterministic functions of their inputs so that save/load/continue is bit-exact.
pub trait Rule: Send + Sync {
    /// Canonical lower-case name (as in the golden files).
    fn name(&self) -> &'static str;

    /// Rejects parameters this rule cannot handle (called once at construction).
    fn check_param(&self, _meta: &ParamMeta) -> Result<()> {
        Ok(())
    }

    /// Group-wide work at the start of each step, before any parameter of the group moves.
    fn begin_step(&self, _lr: f64, _group: &mut State) -> Result<()> {
        Ok(())
    }

    /// Group-wide work that needs this step's gradients of the group's parameters (those
    /// present, in parameter order), after [`Rule::begin_step`] and before any parameter moves.
    fn begin_step_grads(&self, _grads: &[&Tensor], _group: &mut State) -> Result<()> {
        Ok(())
    }

    /// Updates `param` in place from `grad` (same shape and dtype, contiguous, finite).
    fn update(
        &self,
        ctx: &StepCtx<'_>,
        meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        state: &mut State,
    ) -> Result<()>;

    /// Consumes an extra input for one parameter. Rules that take none reject it.
    fn observe(
        &self,
        input: ExtraInput,
        _meta: &ParamMeta,
        _param: &Var,
        _value: &Tensor,
        _state: &mut State,
    ) -> Result<()> {
        Err(Error::Msg(format!(
            "{} does not take the extra input {input:?}",
            self.name()
        )))
    }

    /// The value to evaluate this parameter at, when it differs from what the parameter holds
    /// in the current mode (Schedule-Free's averaged point in train mode).
    fn eval_value(
        &self,
        _meta: &ParamMeta,
        _param: &Var,
        _state: &State,
        _group: &State,
        _mode: Mode,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Moves the parameter between its train and eval points in place (no-op by default).
    fn switch_mode(
        &self,
        _to: Mode,
        _meta: &ParamMeta,
        _param: &Var,
        _state: &mut State,
        _group: &State,
    ) -> Result<()> {
        Ok(())
    }

    /// Checks loaded state against the parameter (shapes of known fields); default accepts.
    fn check_state(&self, _meta: &ParamMeta, _state: &State) -> Result<()> {
        Ok(())
    }

    /// Named diagnostics the rule wants surfaced (e.g. eigendecomposition failure counts).
    fn diagnostics(&self, _state: &State, _out: &mut std::collections::BTreeMap<String, f64>) {}
}

/// Checks that the state tensor `field`, if present, has `shape`.
pub fn expect_state_shape(
    meta: &ParamMeta,
    state: &State,
    field: &str,
    shape: &[usize],
) -> Result<()> {
    if let Some(t) = state.tensors.get(field) {
        if t.dims() != shape {
            return Err(Error::State(format!(
                "`{}.{field}` has shape {:?}, expected {:?}",
                meta.name,
                t.dims(),
                shape
            )));
        }
    }
    Ok(())
}
