//! MARS (Yuan et al. 2024): variance-reduced AdamW (and Lion / Shampoo variants), exactly as
//! AGI-Arena/MARS `MARS/optimizers/mars.py` computes it.
//!
//! Per parameter, step t (1 on its first update). The MARS path is taken iff `optimize_1d` or
//! the tensor has exactly two dims:
//!
//! ```text
//! c = g + γ·(β1/(1 − β1))·(g − g_prev)                 g_prev: see below; zeros at t = 1
//! c ← c / ‖c‖_F  if ‖c‖_F > 1                          Frobenius norm over the whole tensor
//! m ← β1·m + (1 − β1)·c
//! mars-adamw:    v ← β2·v + (1 − β2)·c²                (of the clipped c)
//!                v̂ = max(v̂, v) if amsgrad else v
//!                p ← p − lr·(λ·p + m / ((√v̂ / √(1 − β2^t) + ε)·(1 − β1^t)))
//! mars-lion:     p ← p − lr·(λ·p + sign(m))            (sign(0) = 0)
//! mars-shampoo:  p ← p − lr·(NS5(m/(1 − β1))·√max(1, rows/cols) + λ·p)     (2-D; other
//!                tensors on the MARS path use the mars-adamw form)
//! ```
//!
//! Every other tensor (1-D, 0-D, 3-D, 4-D when `optimize_1d` is off) takes a plain AdamW step on
//! the raw gradient with `betas_1d`, lr `lr·lr_1d/lr₀` (lr₀ = the configured lr, so the 1-D lr
//! follows any schedule) and decay `weight_decay_1d`, regardless of the group's weight decay
//! (reference behaviour: LayerNorm gains in a "no decay" group still decay by 0.1). It runs
//! through [`AdamStep`], so it is AdamW, `p ← p·(1 − lr·λ) − …`, which equals the reference's
//! `p − lr·(λ·p + …)` up to rounding.
//!
//! `g_prev`, the gradient the correction subtracts:
//! * approximate (`is_approx = true`, the default and what the paper's results use): the
//!   gradient of the previous step. The reference keeps a *reference* to `p.grad`; here it is
//!   copied into `last_grad`, so it never depends on how the caller reuses gradient buffers.
//! * exact (`is_approx = false`): ∇f(x_{t−1}, ξ_t), the previous parameters on the current
//!   batch. The caller supplies it one step ahead. Loop contract, at iteration t (parameters
//!   x_t):
//!   1. compute the gradient of the NEXT batch ξ_{t+1} at x_t and pass it with
//!      `observe(ExtraInput::PreviousGrad, …)` (stored as `previous_grad`);
//!   2. compute the gradient of batch ξ_t at x_t and call `step` (which uses `last_grad`, zeros
//!      at t = 1);
//!   3. the step ends with `last_grad ← previous_grad`. The input is moved, not copied: a step
//!      without a fresh `observe` is refused where the reference would silently reuse the stale
//!      gradient (every tensor checks, so a skipped `observe` fails at the first parameter,
//!      before anything moves).
//!
//!   This costs two forward/backward passes per step and a data loader that looks one batch
//!   ahead. AdamW-path tensors take the input too and discard it at the step.
//!
//! Numerics: the reference runs mars-shampoo's Newton–Schulz in bfloat16; here it runs in the
//! parameter dtype ([`newton_schulz`] with [`NsForm::Mars`], 5 steps, normalized by ‖M‖ + ε).
//!
//! Defaults are the reference's: lr 3e-3, β = (0.95, 0.99), ε = 1e-8, λ = 0, γ = 0.025,
//! approximate, mars-adamw, optimize_1d off, lr_1d 3e-3, betas_1d (0.9, 0.95),
//! weight_decay_1d 0.1. (The GPT-2 small recipe uses lr 6e-3, λ = 1e-2.) Reference:
//! AGI-Arena/MARS `MARS/optimizers/mars.py` @ 4831e28eba863a4e69d7e9474ff8e73bc1b410fe.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Error, Result};
use crate::optim::adamw::AdamStep;
use crate::optim::config::{hyper_accessors, RuleConfig};
use crate::optim::fused::{
    exactly_mut, flag, sum_sq, vectorized, zip_mut, zip_mut_or_kernel, Float, Kernel,
};
use crate::optim::newton_schulz::{newton_schulz, NsForm};
use crate::optim::params::ParamMeta;
use crate::optim::rule::{expect_state_shape, ExtraInput, Rule, StepCtx};
use crate::optim::state::State;
use crate::with_float;

/// Newton–Schulz iterations of mars-shampoo (the reference's default).
const MARS_NS_STEPS: usize = 5;

/// Which update MARS applies to its variance-reduced momentum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MarsType {
    /// Adam-style second-moment normalization (MARS-AdamW).
    #[serde(rename = "mars-adamw")]
    AdamW,
    /// Sign of the momentum (MARS-Lion).
    #[serde(rename = "mars-lion")]
    Lion,
    /// Newton–Schulz orthogonalized momentum for 2-D tensors (MARS-Shampoo).
    #[serde(rename = "mars-shampoo")]
    Shampoo,
}

/// MARS hyperparameters (reference names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MarsConfig {
    /// Learning rate of the MARS path (and lr₀ in the 1-D lr ratio).
    pub lr: f64,
    /// (β1, β2) of the MARS path.
    pub betas: (f64, f64),
    /// Added to the bias-corrected root second moment (and to the norm in Newton–Schulz).
    pub eps: f64,
    /// Weight decay λ of the MARS path: p ← p − lr·(λ·p + update).
    pub weight_decay: f64,
    /// Use the running maximum of the second moment.
    pub amsgrad: bool,
    /// Strength γ of the variance-reduction correction.
    pub gamma: f64,
    /// Approximate MARS (previous step's gradient) instead of the exact previous-parameter
    /// gradient, which the caller must feed with `ExtraInput::PreviousGrad`.
    pub is_approx: bool,
    /// Update applied to the corrected momentum.
    pub mars_type: MarsType,
    /// Take the MARS path for every tensor, not only 2-D ones.
    pub optimize_1d: bool,
    /// Learning rate of the AdamW path (scaled by current lr / lr).
    pub lr_1d: f64,
    /// (β1, β2) of the AdamW path.
    pub betas_1d: (f64, f64),
    /// Weight decay of the AdamW path (ignores the group's weight decay).
    pub weight_decay_1d: f64,
}

impl Default for MarsConfig {
    fn default() -> Self {
        Self {
            lr: 3e-3,
            betas: (0.95, 0.99),
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            gamma: 0.025,
            is_approx: true,
            mars_type: MarsType::AdamW,
            optimize_1d: false,
            lr_1d: 3e-3,
            betas_1d: (0.9, 0.95),
            weight_decay_1d: 0.1,
        }
    }
}

impl RuleConfig for MarsConfig {
    const NAME: &'static str = "mars";

    fn validate(&self) -> Result<()> {
        // lr > 0: the 1-D learning rate is lr_1d / lr times the current lr.
        check::positive("mars.lr", self.lr)?;
        check::unit_interval("mars.betas[0]", self.betas.0)?;
        check::unit_interval("mars.betas[1]", self.betas.1)?;
        check::positive("mars.eps", self.eps)?;
        check::non_negative("mars.weight_decay", self.weight_decay)?;
        check::non_negative("mars.gamma", self.gamma)?;
        check::non_negative("mars.lr_1d", self.lr_1d)?;
        check::unit_interval("mars.betas_1d[0]", self.betas_1d.0)?;
        check::unit_interval("mars.betas_1d[1]", self.betas_1d.1)?;
        check::non_negative("mars.weight_decay_1d", self.weight_decay_1d)
    }
    hyper_accessors!();
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(Mars(self.clone())))
    }
}

/// The MARS rule.
#[derive(Debug, Clone)]
pub struct Mars(pub MarsConfig);

/// The elementwise form of the MARS-path step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Adam,
    Lion,
    /// Momentum only; the parameter moves after Newton–Schulz.
    Shampoo,
}

impl Mars {
    fn mars_path(&self, meta: &ParamMeta) -> bool {
        self.0.optimize_1d || meta.shape.len() == 2
    }

    fn form(&self, meta: &ParamMeta) -> Form {
        match self.0.mars_type {
            MarsType::AdamW => Form::Adam,
            MarsType::Lion => Form::Lion,
            MarsType::Shampoo if meta.shape.len() == 2 => Form::Shampoo,
            MarsType::Shampoo => Form::Adam,
        }
    }

    /// The AdamW path (tensors that are not 2-D, unless `optimize_1d`).
    fn adamw_path(
        &self,
        ctx: &StepCtx<'_>,
        param: &Var,
        grad: &Tensor,
        st: &mut State,
    ) -> Result<()> {
        let t = st.next_step();
        st.tensor_or_zeros("exp_avg", param)?;
        st.tensor_or_zeros("exp_avg_sq", param)?;
        if self.0.amsgrad {
            st.tensor_or_zeros("max_exp_avg_sq", param)?;
        }
        AdamStep {
            lr: ctx.lr * (self.0.lr_1d / self.0.lr),
            beta1: self.0.betas_1d.0,
            beta2: self.0.betas_1d.1,
            eps: self.0.eps,
            weight_decay: self.0.weight_decay_1d,
            t,
            maximize: false,
        }
        .apply(
            param,
            grad,
            st.tensor("exp_avg")?,
            st.tensor("exp_avg_sq")?,
            st.tensors.get("max_exp_avg_sq"),
        )
    }

    fn mars_typed<T: Float>(
        &self,
        ctx: &StepCtx<'_>,
        meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        st: &State,
        t: u64,
    ) -> Result<()> {
        let cfg = &self.0;
        let (beta1, beta2) = cfg.betas;
        let form = self.form(meta);
        let coef = T::of(cfg.gamma * (beta1 / (1.0 - beta1)));
        let last = st.tensor("last_grad")?;
        let m = st.tensor("exp_avg")?;

        // Pass 1: the norm of the corrected gradient, to decide on clipping.
        let mut norm_sq = 0.0f64;
        if grad.device().is_cpu() {
            zip_mut::<T>(&[], &[grad, last], |_, i| {
                for (&g, &l) in i[0].iter().zip(i[1]) {
                    let c = ((g - l) * coef + g).f64();
                    norm_sq += c * c;
                }
                Ok(())
            })?;
        } else {
            // On the device: the same corrected gradient from tensor ops, its sum of squares in
            // f64 (another summation order).
            let c = ((grad - last)?.affine(coef.f64(), 0.0)? + grad)?;
            norm_sq = sum_sq(&c)?;
        }
        let norm = norm_sq.sqrt();
        let clip = norm > 1.0;
        let norm = T::of(norm);
        let corrected = |g: T, l: T| {
            let c = (g - l) * coef + g;
            if clip {
                c / norm
            } else {
                c
            }
        };

        // Pass 2: momentum (and second moment, parameter), and last_grad ← g when approximate.
        let approx = cfg.is_approx;
        let (b1, c1) = (T::of(beta1), T::of(1.0 - beta1));
        let (b2, c2) = (T::of(beta2), T::of(1.0 - beta2));
        let neg_lr = T::of(-ctx.lr);
        let wd = T::of(ctx.weight_decay);
        let eps = T::of(cfg.eps);
        let inv_sqrt_bc2 = T::of(1.0 / (1.0 - beta2.powi(t as i32)).sqrt());
        let bc1 = T::of(1.0 - beta1.powi(t as i32));
        let mut outs: Vec<&Tensor> = vec![last, m];
        if form != Form::Shampoo {
            outs.push(param.as_tensor());
        }
        if form == Form::Adam {
            outs.push(st.tensor("exp_avg_sq")?);
            if cfg.amsgrad {
                outs.push(st.tensor("max_exp_avg_sq")?);
            }
        }
        let scalars = [
            coef,
            flag(clip),
            norm,
            b1,
            c1,
            b2,
            c2,
            neg_lr,
            wd,
            eps,
            inv_sqrt_bc2,
            bc1,
            flag(approx),
        ];
        // AMSGrad's fifth operand exceeds the kernels' four outputs: it keeps the CPU pass.
        let kernel_name = match form {
            Form::Shampoo => "mars_momentum",
            Form::Lion => "mars_lion",
            Form::Adam => "mars_adam",
        };
        let run = |body| -> Result<()> {
            if outs.len() <= 4 {
                zip_mut_or_kernel::<T>(Kernel::new(kernel_name, &scalars), &outs, &[grad], body)
            } else {
                zip_mut::<T>(&outs, &[grad], body)
            }
        };
        run(move |o: &mut [&mut [T]], i: &[&[T]]| {
            let g = i[0];
            let n = g.len();
            let (last, rest) = o.split_first_mut().expect("last_grad");
            let (m, rest) = rest.split_first_mut().expect("exp_avg");
            let (last, m) = (
                exactly_mut(last, n, "last_grad")?,
                exactly_mut(m, n, "exp_avg")?,
            );
            vectorized! { match (form, rest) {
                (Form::Shampoo, _) => {
                    for k in 0..n {
                        let c = corrected(g[k], last[k]);
                        m[k] = m[k] * b1 + c1 * c;
                        if approx {
                            last[k] = g[k];
                        }
                    }
                }
                (Form::Lion, [p]) => {
                    let p = exactly_mut(p, n, "param")?;
                    for k in 0..n {
                        let c = corrected(g[k], last[k]);
                        m[k] = m[k] * b1 + c1 * c;
                        let sign = if m[k] > T::zero() {
                            T::one()
                        } else if m[k] < T::zero() {
                            -T::one()
                        } else {
                            T::zero()
                        };
                        p[k] = p[k] + neg_lr * (p[k] * wd + sign);
                        if approx {
                            last[k] = g[k];
                        }
                    }
                }
                (Form::Adam, [p, v, vmax @ ..]) => {
                    let (p, v) = (exactly_mut(p, n, "param")?, exactly_mut(v, n, "exp_avg_sq")?);
                    let mut vmax = match vmax.first_mut() {
                        Some(vm) => Some(exactly_mut(vm, n, "max_exp_avg_sq")?),
                        None => None,
                    };
                    for k in 0..n {
                        let c = corrected(g[k], last[k]);
                        m[k] = m[k] * b1 + c1 * c;
                        v[k] = v[k] * b2 + c2 * c * c;
                        let vhat = match vmax.as_deref_mut() {
                            Some(vm) => {
                                vm[k] = num_traits::Float::max(vm[k], v[k]);
                                vm[k]
                            }
                            None => v[k],
                        };
                        let denom = (vhat.sqrt() * inv_sqrt_bc2 + eps) * bc1;
                        p[k] = p[k] + neg_lr * (p[k] * wd + m[k] / denom);
                        if approx {
                            last[k] = g[k];
                        }
                    }
                }
                _ => unreachable!("operand list matches the form"),
            }
            Ok(()) }
        })?;

        if form == Form::Shampoo {
            // Pass 3: orthogonalize the bias-free momentum, then move the parameter.
            let scaled = (m * (1.0 / (1.0 - beta1)))?;
            let o = newton_schulz(&scaled, MARS_NS_STEPS, cfg.eps, NsForm::Mars)?;
            let (rows, cols) = (meta.shape[0] as f64, meta.shape[1] as f64);
            let factor = T::of((rows / cols).max(1.0).sqrt());
            let scalars = [factor, wd, neg_lr];
            let kernel = Kernel::new("mars_apply", &scalars);
            zip_mut_or_kernel::<T>(kernel, &[param.as_tensor()], &[&o], |out, i| {
                for (p, &o) in out[0].iter_mut().zip(i[0]) {
                    *p = *p + (o * factor + wd * *p) * neg_lr;
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}

impl Rule for Mars {
    fn name(&self) -> &'static str {
        MarsConfig::NAME
    }

    fn update(
        &self,
        ctx: &StepCtx<'_>,
        meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        // Checked for every tensor before anything moves, so that a step without a fresh
        // previous gradient is refused at its first parameter with nothing changed.
        let previous = if self.0.is_approx {
            None
        } else {
            Some(state.tensors.remove("previous_grad").ok_or_else(|| {
                Error::Msg(format!(
                    "mars (is_approx = false): no previous gradient for `{}`; call \
                     observe(ExtraInput::PreviousGrad, …) with the next batch's gradient at \
                     the current parameters before every step",
                    meta.name
                ))
            })?)
        };
        if !self.mars_path(meta) {
            return self.adamw_path(ctx, param, grad, state);
        }
        let t = state.next_step();
        state.tensor_or_zeros("exp_avg", param)?;
        state.tensor_or_zeros("last_grad", param)?;
        if self.form(meta) == Form::Adam {
            state.tensor_or_zeros("exp_avg_sq", param)?;
            if self.0.amsgrad {
                state.tensor_or_zeros("max_exp_avg_sq", param)?;
            }
        }
        with_float!(param.dtype(), "mars", T =>
            self.mars_typed::<T>(ctx, meta, param, grad, state, t))?;
        if let Some(previous) = previous {
            state.tensors.insert("last_grad".into(), previous);
        }
        Ok(())
    }

    fn observe(
        &self,
        input: ExtraInput,
        _meta: &ParamMeta,
        _param: &Var,
        value: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        if input != ExtraInput::PreviousGrad {
            return Err(Error::Msg(format!(
                "mars does not take the extra input {input:?}"
            )));
        }
        if self.0.is_approx {
            return Err(Error::Msg(
                "mars with is_approx = true takes no previous gradient (it uses the previous \
                 step's); set is_approx = false for exact MARS"
                    .into(),
            ));
        }
        // A copy: the caller's gradient buffer may be reused before the step. AdamW-path tensors
        // do not use it but keep it too (as the reference does), so that every tensor can tell
        // whether this step was observed.
        state.tensors.insert("previous_grad".into(), value.copy()?);
        Ok(())
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        for f in [
            "exp_avg",
            "exp_avg_sq",
            "max_exp_avg_sq",
            "last_grad",
            "previous_grad",
        ] {
            expect_state_shape(meta, state, f, &meta.shape)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::{DType, Device};

    use super::*;
    use crate::optim::adamw::AdamWConfig;
    use crate::optim::testing::{self, flat, lcg_from_state};
    use crate::optim::{Driver, OptimConfig, Optimizer};

    fn det(n: usize, seed: u64, scale: f64) -> Vec<f64> {
        lcg_from_state(seed, n)
            .into_iter()
            .map(|x| x * scale)
            .collect()
    }

    const SHAPES: [(&str, &[usize]); 2] = [("b", &[5]), ("w", &[3, 4])];

    fn driver(cfg: OptimConfig) -> Result<Driver> {
        Ok(testing::driver(cfg, &SHAPES, DType::F64, |i, n| {
            det(n, 1 + i, 1.0)
        }))
    }

    fn grads(seed: u64, scale: f64) -> BTreeMap<String, Tensor> {
        testing::named(&SHAPES, DType::F64, |i, n| det(n, seed * 10 + i, scale))
    }

    fn values(opt: &Driver) -> Vec<Vec<f64>> {
        opt.vars()
            .iter()
            .map(|(_, v)| flat(v.as_tensor()))
            .collect()
    }

    fn max_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
        testing::max_diff(&a.concat(), &b.concat())
    }

    fn exact(cfg: &MarsConfig) -> OptimConfig {
        OptimConfig::Mars(MarsConfig {
            is_approx: false,
            ..cfg.clone()
        })
    }

    #[test]
    fn exact_fed_the_current_gradient_equals_approximate() -> Result<()> {
        // With PreviousGrad = this step's gradient, the step ends with last_grad = g_t, which is
        // exactly what the approximate variant keeps.
        let cfg = MarsConfig {
            weight_decay: 0.01,
            amsgrad: true,
            ..Default::default()
        };
        let mut approx = driver(OptimConfig::Mars(cfg.clone()))?;
        let mut exact = driver(exact(&cfg))?;
        for s in 0..6 {
            let g = grads(s, if s % 2 == 0 { 0.05 } else { 2.0 });
            approx.step_named(&g)?;
            exact.observe_named(ExtraInput::PreviousGrad, &g)?;
            exact.step_named(&g)?;
        }
        assert_eq!(values(&approx), values(&exact));
        Ok(())
    }

    #[test]
    fn exact_fed_the_next_gradient_is_adamw_on_the_raw_gradient() -> Result<()> {
        // If ∇f(x_{t−1}, ξ_t) equals g_t the correction vanishes (c = g). Feeding the next
        // step's gradient one step ahead arranges that from step 2 on; a zero first gradient
        // makes c₁ = 0 = g₁ too. With ‖g‖ ≤ 1 nothing is clipped, so the 2-D tensor follows AdamW
        // with the MARS betas/lr/decay, and the 1-D tensor AdamW with the 1-D settings.
        let cfg = MarsConfig {
            lr: 0.01,
            weight_decay: 0.05,
            lr_1d: 0.004,
            ..Default::default()
        };
        let seq: Vec<BTreeMap<String, Tensor>> = (0..6)
            .map(|s| grads(s, if s == 0 { 0.0 } else { 0.1 }))
            .collect();
        let mut mars = driver(exact(&cfg))?;
        for s in 0..seq.len() {
            let ahead = seq.get(s + 1).unwrap_or(&seq[s]);
            mars.observe_named(ExtraInput::PreviousGrad, ahead)?;
            mars.step_named(&seq[s])?;
        }
        let adamw = |lr, betas, wd| -> Result<Vec<Vec<f64>>> {
            let mut opt = driver(OptimConfig::Adamw(AdamWConfig {
                lr,
                betas,
                eps: cfg.eps,
                weight_decay: wd,
                ..Default::default()
            }))?;
            for g in &seq {
                opt.step_named(g)?;
            }
            Ok(values(&opt))
        };
        let matrix = adamw(cfg.lr, cfg.betas, cfg.weight_decay)?;
        let vector = adamw(cfg.lr_1d, cfg.betas_1d, cfg.weight_decay_1d)?;
        let got = values(&mars);
        assert!(max_diff(&got[1..], &matrix[1..]) < 1e-14, "2-D path");
        assert!(max_diff(&got[..1], &vector[..1]) < 1e-14, "1-D path");
        Ok(())
    }

    #[test]
    fn exact_refuses_a_step_without_previous_gradient() -> Result<()> {
        let mut opt = driver(exact(&MarsConfig::default()))?;
        let before = values(&opt);
        let err = opt.step_named(&grads(1, 0.1)).unwrap_err().to_string();
        assert!(err.contains("PreviousGrad"), "{err}");
        assert_eq!(values(&opt), before);
        // One observe covers one step only.
        opt.observe_named(ExtraInput::PreviousGrad, &grads(2, 0.1))?;
        opt.step_named(&grads(1, 0.1))?;
        assert!(opt.step_named(&grads(2, 0.1)).is_err());
        // The approximate variant takes no previous gradient.
        let mut approx = driver(OptimConfig::Mars(MarsConfig::default()))?;
        assert!(approx
            .observe_named(ExtraInput::PreviousGrad, &grads(2, 0.1))
            .is_err());
        Ok(())
    }

    #[test]
    fn last_grad_is_a_copy() -> Result<()> {
        let mut opt = driver(OptimConfig::Mars(MarsConfig::default()))?;
        let g = Var::from_vec(det(12, 5, 0.3), (3, 4), &Device::Cpu)?;
        let mut map = BTreeMap::new();
        map.insert("w".to_string(), g.as_tensor().clone());
        opt.step_named(&map)?;
        let saved = opt.param_state("w").unwrap().tensor("last_grad")?.copy()?;
        g.set(&Tensor::zeros(
            (3, 4),
            candle_core::DType::F64,
            &Device::Cpu,
        )?)?;
        let after = opt.param_state("w").unwrap().tensor("last_grad")?;
        assert_eq!(
            saved.flatten_all()?.to_vec1::<f64>()?,
            after.flatten_all()?.to_vec1::<f64>()?
        );
        assert_eq!(after.flatten_all()?.to_vec1::<f64>()?, det(12, 5, 0.3));
        Ok(())
    }

    #[test]
    fn lion_and_shampoo_first_steps() -> Result<()> {
        // Step 1: c = g·(1 + γβ1/(1−β1)) (clipped to unit norm), m = (1 − β1)·c.
        let cfg = MarsConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let (b1, gamma, lr) = (cfg.betas.0, cfg.gamma, cfg.lr);
        let g = grads(3, 1.0);
        let c: Vec<f64> = g["w"]
            .flatten_all()?
            .to_vec1::<f64>()?
            .iter()
            .map(|g| g * (1.0 + gamma * b1 / (1.0 - b1)))
            .collect();
        let norm = c.iter().map(|x| x * x).sum::<f64>().sqrt();
        let c: Vec<f64> = c
            .iter()
            .map(|x| if norm > 1.0 { x / norm } else { *x })
            .collect();
        let p0 = det(12, 2, 1.0);

        let mut lion = driver(OptimConfig::Mars(MarsConfig {
            mars_type: MarsType::Lion,
            ..cfg.clone()
        }))?;
        let mut zero = g.clone();
        zero.insert(
            "w".into(),
            Tensor::zeros((3, 4), candle_core::DType::F64, &Device::Cpu)?,
        );
        lion.step_named(&zero)?;
        // sign(0) = 0: only the decay moves the parameter.
        let want: Vec<f64> = p0.iter().map(|p| p - lr * (0.1 * p)).collect();
        assert!(max_diff(&values(&lion)[1..], &[want]) < 1e-16);

        let mut shampoo = driver(OptimConfig::Mars(MarsConfig {
            mars_type: MarsType::Shampoo,
            ..cfg.clone()
        }))?;
        shampoo.step_named(&g)?;
        let m = Tensor::from_vec(
            c.iter().map(|x| (1.0 - b1) * x).collect(),
            (3, 4),
            &Device::Cpu,
        )?;
        let o = newton_schulz(&(m * (1.0 / (1.0 - b1)))?, 5, cfg.eps, NsForm::Mars)?;
        let o = o.flatten_all()?.to_vec1::<f64>()?;
        // 3 rows < 4 cols: factor 1.
        let want: Vec<f64> = p0
            .iter()
            .zip(&o)
            .map(|(p, o)| p - lr * (o + 0.1 * p))
            .collect();
        assert!(max_diff(&values(&shampoo)[1..], &[want]) < 1e-15);
        assert!(!shampoo
            .param_state("w")
            .unwrap()
            .tensors
            .contains_key("exp_avg_sq"));
        Ok(())
    }

    #[test]
    fn one_d_lr_follows_the_schedule() -> Result<()> {
        let cfg = MarsConfig::default();
        let mut mars = driver(OptimConfig::Mars(cfg.clone()))?;
        let mut adamw = driver(OptimConfig::Adamw(AdamWConfig {
            lr: cfg.lr_1d,
            betas: cfg.betas_1d,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay_1d,
            ..Default::default()
        }))?;
        for opt in [&mut mars, &mut adamw] {
            opt.set_lr_factor(0.25);
            for s in 0..3 {
                opt.step_named(&grads(s, 0.5))?;
            }
        }
        assert!(max_diff(&values(&mars)[..1], &values(&adamw)[..1]) < 1e-15);
        Ok(())
    }

    #[test]
    fn optimize_1d_takes_the_mars_path_everywhere() -> Result<()> {
        let mut opt = driver(OptimConfig::Mars(MarsConfig {
            optimize_1d: true,
            ..Default::default()
        }))?;
        opt.step_named(&grads(1, 0.5))?;
        assert!(opt
            .param_state("b")
            .unwrap()
            .tensors
            .contains_key("last_grad"));
        let mut opt = driver(OptimConfig::Mars(MarsConfig::default()))?;
        opt.step_named(&grads(1, 0.5))?;
        assert!(!opt
            .param_state("b")
            .unwrap()
            .tensors
            .contains_key("last_grad"));
        Ok(())
    }

    #[test]
    fn config_parses_reference_names_and_validates() -> Result<()> {
        let cfg = OptimConfig::from_toml(
            "name = \"mars\"\nmars_type = \"mars-lion\"\nbetas = [0.9, 0.99]\nis_approx = false",
        )?;
        let OptimConfig::Mars(c) = cfg else {
            panic!("not mars")
        };
        assert_eq!(c.mars_type, MarsType::Lion);
        assert!(!c.is_approx);
        assert!(OptimConfig::from_toml("name = \"mars\"\nmars_type = \"mars-sgd\"").is_err());
        let bad = MarsConfig {
            lr: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("mars.lr"));
        let bad = MarsConfig {
            betas_1d: (0.9, 1.0),
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("betas_1d[1]"));
        Ok(())
    }
}
