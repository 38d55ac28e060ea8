//! Muon (Jordan et al. 2024): momentum orthogonalized by Newton–Schulz, for hidden matrices,
//! exactly as KellerJordan/Muon `SingleDeviceMuon` / `muon_update` computes it, with the
//! auxiliary AdamW of `MuonWithAuxAdam` for every other parameter.
//!
//! Per hidden matrix (role [`Role::Matrix`]):
//!
//! ```text
//! M ← lerp(M, g, 1 − μ)                              = μ·M + (1 − μ)·g
//! U = lerp(g, M, μ) if nesterov else M               = (1 − μ)·g + μ·M
//! U viewed as (rows, rest) if 4-D (conv filters); 3-D (and ≥ 5-D) batched over leading dims
//! O = NS5(U) · √max(1, g.size(−2)/g.size(−1))         last two dims of the ORIGINAL gradient
//! p ← p·(1 − lr·λ)                                    decoupled decay, coupled to the current lr
//! p ← p − lr·O
//! ```
//!
//! NS5 is [`newton_schulz`] with [`NsForm::Muon`] and ε = 1e-7: scale to Frobenius norm ≤ 1,
//! iterate `X ← a·X + (b·A + c·A²)·X` with `A = XXᵀ` and `(a, b, c) = (3.4445, −4.7750, 2.0315)`
//! on the wide orientation. It does not converge to `UVᵀ`: singular values land roughly in
//! [0.5, 1.5] by design. The reference runs it in bfloat16 on GPU; here it runs in the parameter
//! dtype with candle matmuls (what the golden files check — a bf16 iteration is ~1e-2 off).
//!
//! Every other role (embedding, head, norm, bias, vector, scalar) takes an AdamW step through
//! [`AdamStep`] with its own hyperparameters: lr `adam_lr` × the schedule factor, β
//! `adam_betas`, ε `adam_eps`, decay `adam_weight_decay` (the reference aux Adam computes
//! `m̂/(√v̂ + ε)`; AdamStep's `m̂/(√v/√(1−β2^t) + ε)` is the same up to rounding).
//!
//! `nesterov` and `ns_steps` are `muon_update` arguments that the reference classes leave at
//! their defaults (true, 5); they are exposed here. Defaults: lr 0.02, momentum 0.95, λ = 0;
//! aux AdamW lr 3e-4, β = (0.9, 0.95), ε = 1e-10, λ = 0. State: `momentum_buffer` (matrices; no
//! step counter), `step`/`exp_avg`/`exp_avg_sq` (others). Reference: KellerJordan/Muon `muon.py`
//! @ 857d1adc159e098212f828d927460782d3da59e9.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Error, Result};
use crate::optim::adamw::AdamStep;
use crate::optim::config::RuleConfig;
use crate::optim::fused::{zip_mut, Float};
use crate::optim::newton_schulz::{newton_schulz, NsForm, MUON_NS_EPS};
use crate::optim::params::{ParamMeta, Role};
use crate::optim::rule::{expect_state_shape, Rule, StepCtx};
use crate::optim::state::State;
use crate::with_float;

/// Muon hyperparameters (reference names and defaults; `adam_*` configure the auxiliary AdamW).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MuonConfig {
    /// Learning rate of the orthogonalized step.
    pub lr: f64,
    /// Decoupled weight decay λ of hidden matrices (the step multiplies p by 1 − lr·λ).
    pub weight_decay: f64,
    /// Momentum μ.
    pub momentum: f64,
    /// Orthogonalize the Nesterov look-ahead `lerp(g, M, μ)` instead of `M`.
    pub nesterov: bool,
    /// Newton–Schulz iterations.
    pub ns_steps: u64,
    /// Auxiliary AdamW learning rate (scaled by the schedule factor).
    pub adam_lr: f64,
    /// Auxiliary AdamW (β1, β2).
    pub adam_betas: (f64, f64),
    /// Auxiliary AdamW ε.
    pub adam_eps: f64,
    /// Auxiliary AdamW decoupled weight decay.
    pub adam_weight_decay: f64,
}

impl Default for MuonConfig {
    fn default() -> Self {
        Self {
            lr: 0.02,
            weight_decay: 0.0,
            momentum: 0.95,
            nesterov: true,
            ns_steps: 5,
            adam_lr: 3e-4,
            adam_betas: (0.9, 0.95),
            adam_eps: 1e-10,
            adam_weight_decay: 0.0,
        }
    }
}

impl RuleConfig for MuonConfig {
    const NAME: &'static str = "muon";

    fn validate(&self) -> Result<()> {
        check::non_negative("muon.lr", self.lr)?;
        check::non_negative("muon.weight_decay", self.weight_decay)?;
        check::unit_interval("muon.momentum", self.momentum)?;
        check::at_least_one("muon.ns_steps", self.ns_steps)?;
        check::non_negative("muon.adam_lr", self.adam_lr)?;
        check::unit_interval("muon.adam_betas[0]", self.adam_betas.0)?;
        check::unit_interval("muon.adam_betas[1]", self.adam_betas.1)?;
        check::positive("muon.adam_eps", self.adam_eps)?;
        check::non_negative("muon.adam_weight_decay", self.adam_weight_decay)
    }
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn weight_decay(&self) -> f64 {
        self.weight_decay
    }
    fn set_weight_decay(&mut self, wd: f64) {
        self.weight_decay = wd;
    }
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(Muon(self.clone())))
    }
}

/// The Muon rule (with its auxiliary AdamW).
#[derive(Debug, Clone)]
pub struct Muon(pub MuonConfig);

/// torch's `lerp`, for the same rounding as the reference's `lerp_` calls.
#[inline(always)]
fn lerp<T: Float>(a: T, b: T, w: T) -> T {
    if w.abs() < T::of(0.5) {
        a + w * (b - a)
    } else {
        b - (b - a) * (T::one() - w)
    }
}

impl Muon {
    /// The tensor Newton–Schulz sees: 4-D viewed as (rows, rest), everything else as is.
    fn ns_view(u: &Tensor) -> Result<Tensor> {
        let d = u.dims();
        Ok(if d.len() == 4 {
            u.reshape((d[0], d[1] * d[2] * d[3]))?
        } else {
            u.clone()
        })
    }

    fn matrix_typed<T: Float>(
        &self,
        ctx: &StepCtx<'_>,
        meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        state: &State,
    ) -> Result<()> {
        let mu = self.0.momentum;
        let m = state.tensor("momentum_buffer")?;
        let u = grad.zeros_like()?;
        let (w_in, w_out) = (T::of(1.0 - mu), T::of(mu));
        let nesterov = self.0.nesterov;
        zip_mut::<T>(&[m, &u], &[grad], |o, i| {
            let [m, u] = o else { unreachable!() };
            for (k, &g) in i[0].iter().enumerate() {
                m[k] = lerp(m[k], g, w_in);
                u[k] = if nesterov { lerp(g, m[k], w_out) } else { m[k] };
            }
            Ok(())
        })?;
        let o = newton_schulz(
            &Self::ns_view(&u)?,
            self.0.ns_steps as usize,
            MUON_NS_EPS,
            NsForm::Muon,
        )?;
        let nd = meta.shape.len();
        let (rows, cols) = (meta.shape[nd - 2] as f64, meta.shape[nd - 1] as f64);
        let scale = T::of((rows / cols).max(1.0).sqrt());
        let decay = T::of(1.0 - ctx.lr * ctx.weight_decay);
        let neg_lr = T::of(-ctx.lr);
        zip_mut::<T>(&[param.as_tensor()], &[&o], |out, i| {
            for (p, &o) in out[0].iter_mut().zip(i[0]) {
                *p = *p * decay + neg_lr * (o * scale);
            }
            Ok(())
        })
    }
}

impl Rule for Muon {
    fn name(&self) -> &'static str {
        MuonConfig::NAME
    }

    fn check_param(&self, meta: &ParamMeta) -> Result<()> {
        if meta.role == Role::Matrix && meta.shape.len() < 2 {
            return Err(Error::Msg(format!(
                "muon: `{}` has role matrix but shape {:?}; Muon orthogonalizes tensors with \
                 two or more dims (give it another role to route it to the auxiliary AdamW)",
                meta.name, meta.shape
            )));
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
        if meta.role != Role::Matrix {
            let t = state.next_step();
            state.tensor_or_zeros("exp_avg", param)?;
            state.tensor_or_zeros("exp_avg_sq", param)?;
            return AdamStep {
                lr: self.0.adam_lr * ctx.lr_factor,
                beta1: self.0.adam_betas.0,
                beta2: self.0.adam_betas.1,
                eps: self.0.adam_eps,
                weight_decay: self.0.adam_weight_decay,
                t,
                maximize: false,
            }
            .apply(
                param,
                grad,
                state.tensor("exp_avg")?,
                state.tensor("exp_avg_sq")?,
                None,
            );
        }
        self.check_param(meta)?;
        state.tensor_or_zeros("momentum_buffer", param)?;
        with_float!(param.dtype(), "muon", T =>
            self.matrix_typed::<T>(ctx, meta, param, grad, state))
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        for f in ["momentum_buffer", "exp_avg", "exp_avg_sq"] {
            expect_state_shape(meta, state, f, &meta.shape)?;
        }
        Ok(())
    }
}
