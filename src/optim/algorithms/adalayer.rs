//! Adalayer and "SGD + Adalayer" (Zhao, Morwani, Brandfonbrener, Vyas & Kakade 2024,
//! "Deconstructing What Makes a Good Optimizer for Language Models", arXiv 2407.07972), exactly
//! as the paper's code computes them (`AdalayerW` and `AdalayerWLast`).
//!
//! Adalayer is AdamW with one second-moment *scalar per block* instead of one per element. Per
//! parameter, step t (1 on its first update), for each block B of the parameter:
//!
//! ```text
//! p   ← p · (1 − lr·λ)                       decoupled decay, first
//! m   ← β1·m + (1 − β1)·g                    per element
//! v_B ← β2·v_B + (1 − β2)·mean_{i∈B} g_i²    the MEAN of squares over the block, not the sum
//! p   ← p − (lr / (1 − β1^t)) · m / (√v_B / √(1 − β2^t) + ε)
//! ```
//!
//! Blocks ([`Blocks`]), chosen per parameter in this order:
//!
//! | condition | blocks |
//! |---|---|
//! | `att_correction` and the name contains `qkv_pattern` (default `att_proj`) | 3: consecutive thirds of the rows (fused Q, K, V) |
//! | `lastlayer_correction` and role `head` | one per row (per output token) |
//! | `firstlayer_correction` and role `embedding` | one per row (per token) |
//! | otherwise | the whole tensor |
//!
//! Rows are dim 0 (a row is everything else, flattened); tensors with fewer than two dims are
//! one block. The reference chooses blocks by OLMo parameter names plus a vocabulary heuristic
//! (`"ff_out" in name and rows > 10000` for the head, `"wte"` and rows > 10000 for the
//! embedding, `'norm'`/`'ln_f'` for LayerNorm); here the head, the embedding and the norms are
//! the parameters' [`Role`]s, which are inferred from the same names and can be overridden.
//! The fused QKV matrix has no role, so it is still found by name; a model with separate q, k
//! and v matrices realises `att_correction` with per-tensor blocks already.
//!
//! The second moment lives in the parameter's dtype. (The reference creates the per-tensor and
//! QKV scalars as float32 even for float64 parameters; its golden trajectories were recorded
//! with that cast removed.) Its step counter is a float32 tensor, exact up to 2^24 steps; ours
//! is exact beyond.
//!
//! **Frozen Adalayer** (`t_freeze = Some(T_f)`): for t ≤ T_f every block's v is the running
//! average `v_t = Σ_{k≤t} x_k / (t + 1)` (β2_t = 1 − 1/(t + 1), the zero init counted); after
//! T_f the QKV and per-tensor scalars are frozen, head rows keep the β2 EMA if `update_last`,
//! norm tensors keep a β2 EMA if `update_norm`, per-row embedding blocks keep updating; and the
//! second moment is never bias-corrected (1 − β2^t replaced by 1) whenever `t_freeze` is set.
//! The paper pairs it with an lr of 0 for the first T_f − 1 steps, then warm-up and cosine; that
//! schedule belongs to the training loop (the driver's lr factor), not to this rule.
//!
//! `no_norm_training` leaves 1-D norm tensors untouched (no decay, no state, no step count).
//!
//! **SGD + Adalayer** ([`AdalayerSgdConfig`], `adalayer_sgd`): the same step, but only the head
//! rows (`lastlayer_correction`), the embedding rows (`firstlayer_correction`) and the norm
//! tensors (`update_norm`, one block each) are adaptive; every other parameter, the fused QKV
//! included (`att_correction` is a no-op there), takes `p ← p·(1 − lr·λ) − (lr/(1 − β1^t))·m`
//! with denominator exactly 1: no ε, no second-moment correction. The head and the norms may run
//! at their own learning rate, `lr_last` (the reference's "last layer" and "norm" parameter
//! groups): with `update_last` the head (role `head`), with `update_norm` every norm tensor whose
//! name does not end in `bias`, step at `lr_last` × the schedule factor (weight decay stays the
//! group's, as in the reference, where those groups carry none of their own). `update_last` only
//! chooses the lr; whether the head is adaptive is `lastlayer_correction`'s choice. Without
//! `lr_last` every tensor runs at the group's lr.
//!
//! Defaults are the reference constructors': lr 1e-3, β = (0.9, 0.999), ε = 1e-8, λ = 1e-2, all
//! corrections off, `update_last` on, `update_norm` off, no freeze. The paper's runs use
//! β = (0.9, 0.95), ε = 1e-15, λ = 0, and `att_correction` + `lastlayer_correction`.
//!
//! Reference: `rosieyzh/optimizers-llm` `olmo/optim.py` @ a1f8a3f58f4b6e805e2725cc249f859f7a8e18bd
//! (`AdalayerW`, `AdalayerWLast`).

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Error, Result};
use crate::optim::config::{hyper_accessors, RuleConfig};
use crate::optim::fused::{
    exactly, exactly_mut, vectorized, zip_mut, zip_mut_or_kernel, Float, Kernel,
};
use crate::optim::params::{ParamMeta, Role};
use crate::optim::rule::{expect_state_shape, Rule, StepCtx};
use crate::optim::state::State;
use crate::with_float;

/// The reference's name of the fused QKV projection in OLMo.
pub const DEFAULT_QKV_PATTERN: &str = "att_proj";

/// Adalayer (`AdalayerW`) hyperparameters (names and defaults of the reference).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdalayerConfig {
    /// Learning rate.
    pub lr: f64,
    /// (β1, β2): first-moment and block second-moment decay.
    pub betas: (f64, f64),
    /// Added to the bias-corrected root block second moment.
    pub eps: f64,
    /// Decoupled weight decay λ (the step multiplies p by 1 − lr·λ).
    pub weight_decay: f64,
    /// Split a fused QKV matrix (name contains `qkv_pattern`) into three row blocks.
    pub att_correction: bool,
    /// One block per row of the head (role `head`).
    pub lastlayer_correction: bool,
    /// One block per row of the embedding (role `embedding`).
    pub firstlayer_correction: bool,
    /// After `t_freeze`: keep updating the head's row blocks.
    pub update_last: bool,
    /// After `t_freeze`: keep updating the norm tensors' blocks.
    pub update_norm: bool,
    /// Accumulate v as a running average for this many steps, then freeze it (see the module
    /// doc); absent for plain Adalayer.
    pub t_freeze: Option<u64>,
    /// Do not train 1-D norm tensors at all.
    pub no_norm_training: bool,
    /// Substring naming the fused QKV projection (not a reference hyperparameter: the reference
    /// hard-codes `att_proj`).
    pub qkv_pattern: String,
}

impl Default for AdalayerConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
            att_correction: false,
            lastlayer_correction: false,
            firstlayer_correction: false,
            update_last: true,
            update_norm: false,
            t_freeze: None,
            no_norm_training: false,
            qkv_pattern: DEFAULT_QKV_PATTERN.to_string(),
        }
    }
}

/// "SGD + Adalayer" (`AdalayerWLast`) hyperparameters (names and defaults of the reference).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdalayerSgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// (β1, β2): first-moment and block second-moment decay.
    pub betas: (f64, f64),
    /// Added to the bias-corrected root block second moment (adaptive blocks only).
    pub eps: f64,
    /// Decoupled weight decay λ (the step multiplies p by 1 − lr·λ).
    pub weight_decay: f64,
    /// Accepted for parity with the reference, where it changes nothing: the fused QKV matrix
    /// takes the SGD step either way.
    pub att_correction: bool,
    /// Adalayer with one block per row on the head (role `head`).
    pub lastlayer_correction: bool,
    /// Adalayer with one block per row on the embedding (role `embedding`).
    pub firstlayer_correction: bool,
    /// Do not train 1-D norm tensors at all.
    pub no_norm_training: bool,
    /// Adalayer with one block per tensor on the norm tensors (role `norm`), which also run at
    /// `lr_last` (except biases).
    pub update_norm: bool,
    /// The head runs at `lr_last`.
    pub update_last: bool,
    /// Learning rate of the head (`update_last`) and norm weights (`update_norm`), scaled by
    /// the schedule factor; absent: the group's lr.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_last: Option<f64>,
    /// Substring naming the fused QKV projection (see [`AdalayerConfig::qkv_pattern`]).
    pub qkv_pattern: String,
}

impl Default for AdalayerSgdConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
            att_correction: false,
            lastlayer_correction: false,
            firstlayer_correction: false,
            no_norm_training: false,
            update_norm: false,
            update_last: true,
            lr_last: None,
            qkv_pattern: DEFAULT_QKV_PATTERN.to_string(),
        }
    }
}

/// How a parameter's second moment is partitioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocks {
    /// One scalar for the whole tensor (state shape `[]`).
    Tensor,
    /// One scalar per row along dim 0 (state shape `[rows]`).
    Rows,
    /// Three scalars over consecutive thirds of the rows (state shape `[3]`).
    Qkv,
    /// No second moment: the denominator is exactly 1 (the SGD part of `adalayer_sgd`).
    Sgd,
}

impl Blocks {
    /// Shape of `exp_avg_sq` for a parameter of `shape` (`None` when there is none).
    pub fn state_shape(self, shape: &[usize]) -> Option<Vec<usize>> {
        match self {
            Blocks::Tensor => Some(vec![]),
            // Rows are only chosen for tensors with two or more dims.
            Blocks::Rows => Some(vec![shape.first().copied().unwrap_or(1)]),
            Blocks::Qkv => Some(vec![3]),
            Blocks::Sgd => None,
        }
    }
}

fn is_qkv(enabled: bool, pattern: &str, meta: &ParamMeta) -> bool {
    enabled && meta.name.contains(pattern)
}

fn per_row(enabled: bool, role: Role, meta: &ParamMeta) -> bool {
    enabled && meta.role == role && meta.shape.len() >= 2
}

fn is_norm(meta: &ParamMeta) -> bool {
    meta.role == Role::Norm
}

fn skipped(no_norm_training: bool, meta: &ParamMeta) -> bool {
    no_norm_training && is_norm(meta) && meta.shape.len() == 1
}

fn check_qkv(field: &str, meta: &ParamMeta) -> Result<()> {
    match meta.shape.first() {
        Some(rows) if rows % 3 == 0 => Ok(()),
        _ => Err(Error::config(
            field,
            format!(
                "`{}` matches the fused-QKV pattern, but its shape {:?} does not split into three \
                 equal row blocks",
                meta.name, meta.shape
            ),
        )),
    }
}

fn validate_common(
    name: &str,
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    wd: f64,
    pattern: &str,
) -> Result<()> {
    check::non_negative(&format!("{name}.lr"), lr)?;
    check::non_negative(&format!("{name}.eps"), eps)?;
    check::unit_interval(&format!("{name}.betas[0]"), betas.0)?;
    check::unit_interval(&format!("{name}.betas[1]"), betas.1)?;
    check::non_negative(&format!("{name}.weight_decay"), wd)?;
    if pattern.is_empty() {
        return Err(Error::config(
            format!("{name}.qkv_pattern"),
            "must not be empty (it would match every parameter)",
        ));
    }
    Ok(())
}

impl AdalayerConfig {
    /// The block partition of a parameter.
    pub fn blocks(&self, meta: &ParamMeta) -> Blocks {
        if is_qkv(self.att_correction, &self.qkv_pattern, meta) {
            Blocks::Qkv
        } else if per_row(self.lastlayer_correction, Role::Head, meta)
            || per_row(self.firstlayer_correction, Role::Embedding, meta)
        {
            Blocks::Rows
        } else {
            Blocks::Tensor
        }
    }

    /// The interpolation weight of v towards the new block statistic at step `t` (`None`:
    /// frozen).
    fn v_weight(&self, meta: &ParamMeta, blocks: Blocks, t: u64) -> Option<f64> {
        let ema = 1.0 - self.betas.1;
        match self.t_freeze {
            None => Some(ema),
            Some(tf) if t <= tf => {
                // Running average including the zero init: β2_t = 1 − 1/(t + 1), written as the
                // reference forms the weight 1 − β2_t.
                let beta2_t = 1.0 - 1.0 / (t as f64 + 1.0);
                Some(1.0 - beta2_t)
            }
            Some(_) => match blocks {
                Blocks::Qkv => None,
                Blocks::Rows if meta.role == Role::Head => self.update_last.then_some(ema),
                _ if self.update_norm && is_norm(meta) => Some(ema),
                Blocks::Rows => Some(ema),
                _ => None,
            },
        }
    }
}

impl AdalayerSgdConfig {
    /// The block partition of a parameter ([`Blocks::Sgd`] for the plain-SGD parameters).
    pub fn blocks(&self, meta: &ParamMeta) -> Blocks {
        if is_qkv(self.att_correction, &self.qkv_pattern, meta) {
            // The reference gives these three constant scalars 1.0: an SGD step.
            Blocks::Sgd
        } else if per_row(self.lastlayer_correction, Role::Head, meta)
            || per_row(self.firstlayer_correction, Role::Embedding, meta)
        {
            Blocks::Rows
        } else if (self.lastlayer_correction && meta.role == Role::Head)
            || (self.firstlayer_correction && meta.role == Role::Embedding)
            || (self.update_norm && is_norm(meta))
        {
            Blocks::Tensor
        } else {
            Blocks::Sgd
        }
    }

    /// `lr_last` if this parameter runs at it (the reference's "last layer" and "norm" groups).
    pub fn last_lr(&self, meta: &ParamMeta) -> Option<f64> {
        let last = self.update_last && meta.role == Role::Head;
        let norm = self.update_norm && is_norm(meta) && !meta.name.ends_with("bias");
        self.lr_last.filter(|_| last || norm)
    }
}

impl RuleConfig for AdalayerConfig {
    const NAME: &'static str = "adalayer";

    fn validate(&self) -> Result<()> {
        validate_common(
            Self::NAME,
            self.lr,
            self.betas,
            self.eps,
            self.weight_decay,
            &self.qkv_pattern,
        )?;
        if let Some(tf) = self.t_freeze {
            // The reference treats 0 as "no freeze" (it tests truthiness); say so instead.
            check::at_least_one("adalayer.t_freeze", tf).map_err(|_| {
                Error::config("adalayer.t_freeze", "must be >= 1 (omit it for no freeze)")
            })?;
        }
        Ok(())
    }
    hyper_accessors!();
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(Adalayer(self.clone())))
    }
}

impl RuleConfig for AdalayerSgdConfig {
    const NAME: &'static str = "adalayer_sgd";

    fn validate(&self) -> Result<()> {
        validate_common(
            Self::NAME,
            self.lr,
            self.betas,
            self.eps,
            self.weight_decay,
            &self.qkv_pattern,
        )?;
        if let Some(lr) = self.lr_last {
            check::non_negative("adalayer_sgd.lr_last", lr)?;
        }
        Ok(())
    }
    hyper_accessors!();
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(AdalayerSgd(self.clone())))
    }
}

/// The Adalayer rule (`AdalayerW`).
#[derive(Debug, Clone)]
pub struct Adalayer(pub AdalayerConfig);

/// The "SGD + Adalayer" rule (`AdalayerWLast`).
#[derive(Debug, Clone)]
pub struct AdalayerSgd(pub AdalayerSgdConfig);

/// The scalars of one step of one parameter.
struct Plan {
    /// 1 − lr·λ.
    decay: f64,
    /// 1 − β1.
    m_weight: f64,
    /// Weight of the new block statistic in v (`None`: v frozen or absent).
    v_weight: Option<f64>,
    /// lr / (1 − β1^t).
    step_size: f64,
    /// √(1 − β2^t), or 1 without second-moment correction.
    bc2_sqrt: f64,
    /// ε.
    eps: f64,
}

/// `torch.lerp(a, b, w)`: the two-sided formula keeps the result exact at both ends.
#[inline]
fn lerp<T: Float>(a: T, b: T, w: T) -> T {
    let half = T::of(0.5);
    if w.abs() < half {
        a + w * (b - a)
    } else {
        b - (b - a) * (T::one() - w)
    }
}

impl Plan {
    fn new(ctx: &StepCtx<'_>, betas: (f64, f64), eps: f64, t: u64, bias_correct2: bool) -> Self {
        let tf = t as f64;
        Self {
            decay: 1.0 - ctx.lr * ctx.weight_decay,
            m_weight: 1.0 - betas.0,
            v_weight: None,
            step_size: ctx.lr / (1.0 - betas.0.powf(tf)),
            bc2_sqrt: if bias_correct2 {
                (1.0 - betas.1.powf(tf)).sqrt()
            } else {
                1.0
            },
            eps,
        }
    }

    /// One fused pass: decay, m, the block statistics and v (when updated), and the step.
    fn apply(&self, param: &Var, grad: &Tensor, m: &Tensor, v: Option<&Tensor>) -> Result<()> {
        with_float!(param.dtype(), "adalayer", T => self.apply_typed::<T>(param, grad, m, v))
    }

    fn apply_typed<T: Float>(
        &self,
        param: &Var,
        grad: &Tensor,
        m: &Tensor,
        v: Option<&Tensor>,
    ) -> Result<()> {
        let decay = T::of(self.decay);
        let w1 = T::of(self.m_weight);
        let w2 = self.v_weight.map(T::of);
        let neg_step = T::of(-self.step_size);
        let bc2_sqrt = T::of(self.bc2_sqrt);
        let eps = T::of(self.eps);
        let Some(v) = v else {
            // Denominator exactly 1: SGD with bias-corrected EMA momentum.
            let scalars = [w1, decay, neg_step];
            let kernel = Kernel::new("adalayer_sgd", &scalars);
            return zip_mut_or_kernel::<T>(
                kernel,
                &[param.as_tensor(), m],
                &[grad],
                move |o, i| {
                    let [p, m] = o else {
                        unreachable!("two outputs")
                    };
                    // One level of reference, so the loop keeps the slices in registers.
                    let (p, m) = (&mut **p, &mut **m);
                    let n = p.len();
                    let (g, m) = (exactly(i[0], n, "grad")?, exactly_mut(m, n, "exp_avg")?);
                    vectorized! {
                        for k in 0..n {
                            m[k] = lerp(m[k], g[k], w1);
                            p[k] = p[k] * decay + neg_step * m[k];
                        }
                    }
                    Ok(())
                },
            );
        };
        #[cfg(feature = "cuda")]
        if param.device().is_cuda() {
            let s = [w1, decay, neg_step, bc2_sqrt, eps];
            return crate::cuda::adalayer::<T>(param.as_tensor(), m, v, grad, w2, s);
        }
        #[cfg(optlab_emulate_kernels)]
        if crate::launch::emulate::active() {
            let s = [w1, decay, neg_step, bc2_sqrt, eps];
            return crate::launch::emulate::adalayer::<T>(param.as_tensor(), m, v, grad, w2, s);
        }
        zip_mut::<T>(&[param.as_tensor(), m, v], &[grad], move |o, i| {
            let g = i[0];
            let [p, m, v] = o else {
                unreachable!("three outputs")
            };
            // One level of reference, so the loop keeps the slices in registers.
            let (p, m, v) = (&mut **p, &mut **m, &mut **v);
            let (n, nb) = (p.len(), v.len());
            if n == 0 || nb == 0 {
                return Ok(());
            }
            let len = n / nb;
            let (g, m) = (exactly(g, n, "grad")?, exactly_mut(m, n, "exp_avg")?);
            for (b, vb) in v.iter_mut().enumerate() {
                let range = b * len..(b + 1) * len;
                if let Some(w2) = w2 {
                    let sum: f64 = g[range.clone()]
                        .iter()
                        .map(|x| {
                            let x = x.f64();
                            x * x
                        })
                        .sum();
                    *vb = lerp(*vb, T::of(sum / len as f64), w2);
                }
                let denom = vb.sqrt() / bc2_sqrt + eps;
                let (p, m, g) = (&mut p[range.clone()], &mut m[range.clone()], &g[range]);
                vectorized! {
                    for ((p, m), &g) in p.iter_mut().zip(m.iter_mut()).zip(g) {
                        *m = lerp(*m, g, w1);
                        *p = *p * decay + neg_step * (*m / denom);
                    }
                }
            }
            Ok(())
        })
    }
}

/// Creates `exp_avg` (and `exp_avg_sq` for adaptive blocks) and runs the step.
fn run(
    meta: &ParamMeta,
    param: &Var,
    grad: &Tensor,
    state: &mut State,
    blocks: Blocks,
    plan: &Plan,
) -> Result<()> {
    state.tensor_or_zeros("exp_avg", param)?;
    if let Some(shape) = blocks.state_shape(&meta.shape) {
        state.tensor_or_zeros_shaped("exp_avg_sq", &shape, param.dtype(), param.device())?;
    }
    let v = match blocks {
        Blocks::Sgd => None,
        _ => Some(state.tensor("exp_avg_sq")?),
    };
    plan.apply(param, grad, state.tensor("exp_avg")?, v)
}

fn check_blocks_state(meta: &ParamMeta, state: &State, blocks: Blocks) -> Result<()> {
    expect_state_shape(meta, state, "exp_avg", &meta.shape)?;
    if let Some(shape) = blocks.state_shape(&meta.shape) {
        expect_state_shape(meta, state, "exp_avg_sq", &shape)?;
    }
    Ok(())
}

impl Rule for Adalayer {
    fn name(&self) -> &'static str {
        AdalayerConfig::NAME
    }

    fn check_param(&self, meta: &ParamMeta) -> Result<()> {
        if self.0.blocks(meta) == Blocks::Qkv {
            check_qkv("adalayer.att_correction", meta)?;
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
        if skipped(self.0.no_norm_training, meta) {
            return Ok(());
        }
        let t = state.next_step();
        let blocks = self.0.blocks(meta);
        let mut plan = Plan::new(ctx, self.0.betas, self.0.eps, t, self.0.t_freeze.is_none());
        plan.v_weight = self.0.v_weight(meta, blocks, t);
        run(meta, param, grad, state, blocks, &plan)
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        check_blocks_state(meta, state, self.0.blocks(meta))
    }
}

impl Rule for AdalayerSgd {
    fn name(&self) -> &'static str {
        AdalayerSgdConfig::NAME
    }

    fn update(
        &self,
        ctx: &StepCtx<'_>,
        meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        if skipped(self.0.no_norm_training, meta) {
            return Ok(());
        }
        let t = state.next_step();
        let blocks = self.0.blocks(meta);
        let ctx = match self.0.last_lr(meta) {
            Some(lr) => StepCtx {
                lr: lr * ctx.lr_factor,
                ..*ctx
            },
            None => *ctx,
        };
        let mut plan = Plan::new(&ctx, self.0.betas, self.0.eps, t, true);
        if blocks != Blocks::Sgd {
            plan.v_weight = Some(1.0 - self.0.betas.1);
        }
        run(meta, param, grad, state, blocks, &plan)
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        check_blocks_state(meta, state, self.0.blocks(meta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{Driver, NamedParams, OptimConfig};
    use candle_core::Device;
    use std::collections::BTreeMap;

    const LR: f64 = 0.01;
    const BETAS: (f64, f64) = (0.9, 0.95);
    const EPS: f64 = 1e-8;
    const WD: f64 = 0.1;

    /// Deterministic values whose scale differs strongly between rows, so per-row blocks and a
    /// whole-tensor block give visibly different steps.
    fn values(seed: usize, shape: &[usize]) -> Vec<f64> {
        let n: usize = shape.iter().product();
        let cols = n / shape.first().copied().unwrap_or(1).max(1);
        (0..n)
            .map(|k| {
                let row = k / cols.max(1);
                ((seed * 13 + k * 7) as f64 * 0.29).sin() * (1.0 + 3.0 * row as f64)
            })
            .collect()
    }

    struct Run {
        params: Vec<(String, Var)>,
        opt: Driver,
    }

    fn build(cfg: OptimConfig, shapes: &[(&str, &[usize])]) -> Result<Run> {
        let dev = Device::Cpu;
        let mut params = Vec::new();
        for (i, (name, shape)) in shapes.iter().enumerate() {
            let init = Tensor::from_vec(values(100 + i, shape), *shape, &dev)?;
            params.push((name.to_string(), Var::from_tensor(&init)?));
        }
        let opt = Driver::new(cfg, NamedParams::new(params.clone())?)?;
        Ok(Run { params, opt })
    }

    impl Run {
        fn step(&mut self, s: usize) -> Result<()> {
            let mut grads = BTreeMap::new();
            for (i, (name, var)) in self.params.iter().enumerate() {
                let g = values(s * 10 + i, var.dims());
                grads.insert(name.clone(), Tensor::from_vec(g, var.dims(), var.device())?);
            }
            self.opt.step_named(&grads)
        }
        fn value(&self, name: &str) -> Result<Vec<f64>> {
            let (_, v) = self.params.iter().find(|(n, _)| n == name).expect("param");
            Ok(v.flatten_all()?.to_vec1::<f64>()?)
        }
        fn v(&self, name: &str) -> Result<Option<Vec<f64>>> {
            let st = self.opt.param_state(name).expect("state");
            st.tensors
                .get("exp_avg_sq")
                .map(|t| Ok(t.flatten_all()?.to_vec1::<f64>()?))
                .transpose()
        }
    }

    /// A scalar re-derivation over equal contiguous blocks (`None`: denominator 1), with the v
    /// weight per step given by `weight` (`None`: frozen) and optional second-moment correction.
    fn by_hand(
        index: usize,
        shape: &[usize],
        nblocks: Option<usize>,
        steps: usize,
        weight: impl Fn(u64) -> Option<f64>,
        correct2: bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut p = values(100 + index, shape);
        let n = p.len();
        let mut m = vec![0.0; n];
        let mut v = vec![0.0; nblocks.unwrap_or(0)];
        for s in 0..steps {
            let t = s as u64 + 1;
            let g = values(s * 10 + index, shape);
            let bc1 = 1.0 - BETAS.0.powi(t as i32);
            let bc2 = if correct2 {
                1.0 - BETAS.1.powi(t as i32)
            } else {
                1.0
            };
            for k in 0..n {
                p[k] *= 1.0 - LR * WD;
                m[k] = BETAS.0 * m[k] + (1.0 - BETAS.0) * g[k];
            }
            match nblocks {
                None => (0..n).for_each(|k| p[k] -= LR / bc1 * m[k]),
                Some(nb) => {
                    let len = n / nb;
                    for (b, vb) in v.iter_mut().enumerate() {
                        let r = b * len..(b + 1) * len;
                        if let Some(w) = weight(t) {
                            let mean = g[r.clone()].iter().map(|x| x * x).sum::<f64>() / len as f64;
                            *vb = (1.0 - w) * *vb + w * mean;
                        }
                        let denom = (*vb / bc2).sqrt() + EPS;
                        for k in r {
                            p[k] -= LR / bc1 * m[k] / denom;
                        }
                    }
                }
            }
        }
        (p, v)
    }

    fn assert_close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(want) {
            assert!(
                (a - b).abs() <= 1e-12 * b.abs().max(1e-3),
                "{a} vs {b}\n{got:?}\n{want:?}"
            );
        }
    }

    fn adalayer(f: impl FnOnce(&mut AdalayerConfig)) -> OptimConfig {
        let mut c = AdalayerConfig {
            lr: LR,
            betas: BETAS,
            eps: EPS,
            weight_decay: WD,
            ..Default::default()
        };
        f(&mut c);
        OptimConfig::Adalayer(c)
    }

    fn adalayer_sgd(f: impl FnOnce(&mut AdalayerSgdConfig)) -> OptimConfig {
        let mut c = AdalayerSgdConfig {
            lr: LR,
            betas: BETAS,
            eps: EPS,
            weight_decay: WD,
            ..Default::default()
        };
        f(&mut c);
        OptimConfig::AdalayerSgd(c)
    }

    const SHAPES: [(&str, &[usize]); 5] = [
        ("blocks.0.att_proj.weight", &[6, 2]),
        ("blocks.0.attn_norm.weight", &[2]),
        ("blocks.0.ff_out.weight", &[2, 4]),
        ("lm_head.weight", &[5, 2]),
        ("wte.weight", &[5, 2]),
    ];

    /// The v weight at a step (`None`: frozen).
    type Weight<'a> = &'a dyn Fn(u64) -> Option<f64>;

    fn ema(_: u64) -> Option<f64> {
        Some(1.0 - BETAS.1)
    }

    #[test]
    fn per_row_head_and_embedding_and_qkv_split_have_per_block_denominators() -> Result<()> {
        let mut run = build(
            adalayer(|c| {
                c.att_correction = true;
                c.lastlayer_correction = true;
                c.firstlayer_correction = true;
            }),
            &SHAPES,
        )?;
        for s in 0..4 {
            run.step(s)?;
        }
        let blocks = [3, 1, 1, 5, 5];
        for (i, ((name, shape), nb)) in SHAPES.iter().zip(blocks).enumerate() {
            let (p, v) = by_hand(i, shape, Some(nb), 4, ema, true);
            assert_close(&run.value(name)?, &p);
            assert_close(&run.v(name)?.expect("v"), &v);
        }
        // The blocks really differ: rows of growing gradient scale get growing v.
        let v = run.v("lm_head.weight")?.unwrap();
        assert!(v.windows(2).all(|w| w[1] > w[0]), "{v:?}");
        Ok(())
    }

    #[test]
    fn plain_adalayer_uses_one_block_per_tensor() -> Result<()> {
        let mut run = build(adalayer(|_| {}), &SHAPES)?;
        for s in 0..3 {
            run.step(s)?;
        }
        for (i, (name, shape)) in SHAPES.iter().enumerate() {
            let (p, v) = by_hand(i, shape, Some(1), 3, ema, true);
            assert_close(&run.value(name)?, &p);
            assert_close(&run.v(name)?.expect("v"), &v);
            let st = run.opt.param_state(name).unwrap();
            assert_eq!(st.tensor("exp_avg_sq")?.dims(), &[] as &[usize]);
        }
        Ok(())
    }

    #[test]
    fn sgd_part_has_denominator_exactly_one() -> Result<()> {
        let mut run = build(
            adalayer_sgd(|c| {
                c.att_correction = true;
                c.lastlayer_correction = true;
                c.update_norm = true;
            }),
            &SHAPES,
        )?;
        // Before the step: p_new must equal p·(1 − lr·λ) − (lr/(1 − β1))·(1 − β1)·g bit for bit.
        let before = run.value("blocks.0.ff_out.weight")?;
        run.step(0)?;
        let g = values(2, &[2, 4]);
        let (decay, step) = (1.0 - LR * WD, LR / (1.0 - BETAS.0));
        let exact: Vec<f64> = before
            .iter()
            .zip(&g)
            .map(|(p, g)| p * decay + (-step) * (0.0 + (1.0 - BETAS.0) * (g - 0.0)))
            .collect();
        assert_eq!(run.value("blocks.0.ff_out.weight")?, exact);
        for s in 1..4 {
            run.step(s)?;
        }
        // QKV (att_correction is a no-op here), the embedding (no firstlayer_correction) and the
        // MLP are SGD without second-moment state; head rows and the norm are Adalayer.
        let blocks = [None, Some(1), None, Some(5), None];
        for (i, ((name, shape), nb)) in SHAPES.iter().zip(blocks).enumerate() {
            let (p, v) = by_hand(i, shape, nb, 4, ema, true);
            assert_close(&run.value(name)?, &p);
            match nb {
                None => assert!(run.v(name)?.is_none(), "{name} has a second moment"),
                Some(_) => assert_close(&run.v(name)?.expect("v"), &v),
            }
        }
        Ok(())
    }

    #[test]
    fn lr_last_moves_the_head_and_norm_weights_only() -> Result<()> {
        const LAST: f64 = 0.003;
        let shapes: Vec<(&str, &[usize])> = SHAPES
            .iter()
            .copied()
            .chain([("blocks.0.attn_norm.bias", &[2usize][..])])
            .collect();
        let cfg = |lr: f64, lr_last: Option<f64>, update_last: bool| {
            adalayer_sgd(|c| {
                c.lr = lr;
                c.lr_last = lr_last;
                c.update_last = update_last;
                c.lastlayer_correction = true;
                c.update_norm = true;
            })
        };
        let run = |cfg: OptimConfig| -> Result<Run> {
            let mut r = build(cfg, &shapes)?;
            for s in 0..3 {
                r.step(s)?;
            }
            Ok(r)
        };
        let (split, main, last) = (
            run(cfg(LR, Some(LAST), true))?,
            run(cfg(LR, None, true))?,
            run(cfg(LAST, None, true))?,
        );
        let no_last = run(cfg(LR, Some(LAST), false))?;
        for (name, _) in &shapes {
            let at_last = matches!(*name, "lm_head.weight" | "blocks.0.attn_norm.weight");
            let want = if at_last { &last } else { &main };
            assert_eq!(split.value(name)?, want.value(name)?, "{name}");
            // Without update_last only the norm weight keeps lr_last.
            let want = if *name == "blocks.0.attn_norm.weight" {
                &last
            } else {
                &main
            };
            assert_eq!(no_last.value(name)?, want.value(name)?, "{name}");
        }
        assert_ne!(main.value("lm_head.weight")?, last.value("lm_head.weight")?);
        let bad = AdalayerSgdConfig {
            lr_last: Some(-1.0),
            ..Default::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("adalayer_sgd.lr_last"), "{err}");
        Ok(())
    }

    #[test]
    fn frozen_adalayer_averages_then_freezes() -> Result<()> {
        let tf = 2;
        let mut run = build(
            adalayer(|c| {
                c.att_correction = true;
                c.lastlayer_correction = true;
                c.firstlayer_correction = true;
                c.update_last = false;
                c.update_norm = true;
                c.t_freeze = Some(tf);
            }),
            &SHAPES,
        )?;
        for s in 0..5 {
            run.step(s)?;
        }
        let average = |t: u64| -> Option<f64> { (t <= tf).then(|| 1.0 / (t as f64 + 1.0)) };
        let average_then_ema = |t: u64| -> Option<f64> {
            if t <= tf {
                average(t)
            } else {
                ema(t)
            }
        };
        // QKV and per-tensor blocks freeze; the head freezes too (update_last off); the norm
        // (update_norm) and the embedding rows keep an EMA. No second-moment correction.
        let cases: [(usize, Weight<'_>); 5] = [
            (3, &average),
            (1, &average_then_ema),
            (1, &average),
            (5, &average),
            (5, &average_then_ema),
        ];
        for (i, ((name, shape), (nb, w))) in SHAPES.iter().zip(cases).enumerate() {
            let (p, v) = by_hand(i, shape, Some(nb), 5, w, false);
            assert_close(&run.value(name)?, &p);
            assert_close(&run.v(name)?.expect("v"), &v);
        }
        Ok(())
    }

    #[test]
    fn no_norm_training_leaves_norms_alone() -> Result<()> {
        for cfg in [
            adalayer(|c| c.no_norm_training = true),
            adalayer_sgd(|c| c.no_norm_training = true),
        ] {
            let mut run = build(cfg, &SHAPES)?;
            let before = run.value("blocks.0.attn_norm.weight")?;
            run.step(0)?;
            assert_eq!(run.value("blocks.0.attn_norm.weight")?, before);
            assert!(run
                .opt
                .param_state("blocks.0.attn_norm.weight")
                .unwrap()
                .is_empty());
            assert_ne!(run.value("blocks.0.ff_out.weight")?, values(102, &[2, 4]));
        }
        Ok(())
    }

    #[test]
    fn bad_configs_and_shapes_are_named() {
        let e = adalayer(|c| c.t_freeze = Some(0))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("adalayer.t_freeze"), "{e}");
        let e = adalayer_sgd(|c| c.qkv_pattern.clear())
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("adalayer_sgd.qkv_pattern"), "{e}");
        let e = build(
            adalayer(|c| c.att_correction = true),
            &[("blocks.0.att_proj.weight", &[4, 2])],
        )
        .err()
        .expect("rows not divisible by 3")
        .to_string();
        assert!(e.contains("att_proj") && e.contains("three"), "{e}");
    }

    /// Scalar (0-D), per-row and QKV second moments survive save → load → continue.
    #[test]
    fn state_round_trip_continues_identically() -> Result<()> {
        let cfg = adalayer(|c| {
            c.att_correction = true;
            c.lastlayer_correction = true;
        });
        let mut straight = build(cfg.clone(), &SHAPES)?;
        let mut first = build(cfg.clone(), &SHAPES)?;
        for s in 0..4 {
            straight.step(s)?;
        }
        for s in 0..2 {
            first.step(s)?;
        }
        let bytes = crate::optim::Optimizer::state_dict(&first.opt)?.to_bytes()?;
        let sd = crate::optim::StateDict::from_bytes(&bytes, &Device::Cpu)?;
        let mut resumed = Run {
            opt: Driver::new(cfg, NamedParams::new(first.params.clone())?)?,
            params: first.params,
        };
        crate::optim::Optimizer::load_state_dict(&mut resumed.opt, sd)?;
        for s in 2..4 {
            resumed.step(s)?;
        }
        for (name, _) in SHAPES {
            assert_eq!(resumed.value(name)?, straight.value(name)?);
        }
        Ok(())
    }

    #[test]
    fn custom_qkv_pattern_and_roles_choose_blocks() {
        let meta = |name: &str, shape: &[usize], role| ParamMeta {
            name: name.into(),
            shape: shape.to_vec(),
            role,
        };
        let c = AdalayerConfig {
            att_correction: true,
            lastlayer_correction: true,
            qkv_pattern: "c_attn".into(),
            ..Default::default()
        };
        assert_eq!(
            c.blocks(&meta("h.0.attn.c_attn.weight", &[6, 2], Role::Matrix)),
            Blocks::Qkv
        );
        assert_eq!(
            c.blocks(&meta("h.0.att_proj.weight", &[6, 2], Role::Matrix)),
            Blocks::Tensor
        );
        // The head is found by role whatever its name or vocabulary size.
        assert_eq!(c.blocks(&meta("out", &[11, 2], Role::Head)), Blocks::Rows);
        assert_eq!(
            c.blocks(&meta("out.bias", &[11], Role::Head)),
            Blocks::Tensor
        );
        assert_eq!(
            c.blocks(&meta("emb", &[11, 2], Role::Embedding)),
            Blocks::Tensor
        );
    }
}
