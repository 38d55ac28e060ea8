//! Schedule-Free AdamW and SGD (Defazio et al. 2024), exactly as `schedulefree==1.4.1`
//! (`AdamWScheduleFree`, `SGDScheduleFree`) computes them.
//!
//! Three sequences per parameter: `z` (the base optimizer's iterate), `x` (a weighted average of
//! `z`, the point to evaluate) and `y = (1 − β1)·z + β1·x` (where gradients are taken, what the
//! parameter holds in train mode). Initially `x = y = z = p₀`. Only `y` (in the parameter) and `z`
//! (state) are stored; `x` is recovered as `lerp(y, z, 1 − 1/β1)`.
//!
//! Group-wide, at the start of step `k` (0-based count of previous steps), in
//! [`Rule::begin_step`]:
//!
//! ```text
//! sched   = (k + 1)/warmup_steps if k < warmup_steps else 1      internal linear warmup
//! lr_k    = lr · sched
//! lr_max  = max(lr_max, lr_k)                                    (lr_max starts at −1)
//! weight  = (k + 1)^r · lr_max^weight_lr_power
//! weight_sum += weight
//! c       = weight / weight_sum                                  (0 when weight_sum = 0)
//! ```
//!
//! Per parameter (AdamW; SGD has no `v` and `d = g + λ·y`):
//!
//! ```text
//! v ← β2·v + (1 − β2)·g²
//! d = g / (√(v / (1 − β2^(k+1))) + ε) + λ·y                     decay evaluated at y, not lr-scaled
//! y ← lerp(y, z, c) + lr_k·(β1·(1 − c) − 1)·d                    (= (1 − β1)·z' + β1·x')
//! z ← z − lr_k·d
//! ```
//!
//! Modes: `eval` sets `p ← lerp(y, z, 1 − 1/β1) = x`, `train` sets `p ← lerp(x, z, 1 − β1) = y`
//! (no-ops before the first step). The optimizer refuses to step in eval mode.
//!
//! Conventions and traps:
//! * The bias correction sits inside the square root (since v1.3). Versions before v1.3
//!   (`AdamWScheduleFreePaper`) folded `√(1 − β2^(k+1))` into `lr_k`, which also changes `lr_max`
//!   and the averaging weights; this is not that form.
//! * `k`, `lr_max` and `weight_sum` are per group, so the bias correction uses the group's step
//!   count even for a parameter that missed earlier steps (as the reference does).
//! * No external LR schedule is intended (warmup is internal); the driver's lr factor still
//!   multiplies `lr`, exactly like changing the reference group's `lr`.
//! * `lerp` is torch's: `a + w·(b − a)` for `|w| < 0.5`, else `b − (b − a)·(1 − w)`.
//!
//! Loop contract: call `set_mode(Eval)` wherever the model is evaluated or a checkpoint is saved
//! and `set_mode(Train)` before training resumes; [`eval_params`](crate::optim::Optimizer::eval_params)
//! gives `x` without switching. BatchNorm statistics would have to be recomputed at `x` (our
//! LayerNorm models need nothing).
//!
//! Defaults are the reference's: AdamW lr 0.0025, β = (0.9, 0.999), ε = 1e-8; SGD lr 1.0,
//! momentum 0.9; both weight decay 0, warmup 0, r = 0, weight_lr_power = 2. Reference:
//! `schedulefree==1.4.1` (= facebookresearch/schedule_free; git 70785b53 with `inner_momentum = 0`).

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Error, Result};
use crate::optim::config::{hyper_accessors, RuleConfig};
use crate::optim::fused::{
    exactly, exactly_mut, flag, vectorized, zip_mut_or_kernel, Float, Kernel,
};
use crate::optim::params::ParamMeta;
use crate::optim::rule::{expect_state_shape, Mode, Rule, StepCtx};
use crate::optim::state::State;
use crate::with_float;

/// Group-state scalar: number of steps taken by the group.
const K: &str = "k";
/// Group-state scalar: the largest scheduled lr seen so far.
const LR_MAX: &str = "lr_max";
/// Group-state scalar: the sum of the averaging weights.
const WEIGHT_SUM: &str = "weight_sum";
/// Group-state scalar: this step's scheduled lr `lr_k`.
const SCHEDULED_LR: &str = "scheduled_lr";
/// Group-state scalar: this step's averaging coefficient `c` (the reference's `ckp1`).
const CKP1: &str = "ckp1";

/// Schedule-Free AdamW hyperparameters (`AdamWScheduleFree` names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleFreeAdamWConfig {
    /// Learning rate (before the internal warmup).
    pub lr: f64,
    /// (β1, β2): β1 interpolates y between z and x; β2 is the second-moment decay.
    pub betas: (f64, f64),
    /// Added to the bias-corrected root second moment.
    pub eps: f64,
    /// Weight decay λ, added to the normalized gradient as λ·y (not multiplied by lr).
    pub weight_decay: f64,
    /// Linear warmup length in steps (0: none).
    pub warmup_steps: u64,
    /// Polynomial weighting power of the average: weights grow as (k + 1)^r.
    pub r: f64,
    /// Averaging weights scale as lr_max^weight_lr_power (so warmup steps count less).
    pub weight_lr_power: f64,
}

impl Default for ScheduleFreeAdamWConfig {
    fn default() -> Self {
        Self {
            lr: 0.0025,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 0,
            r: 0.0,
            weight_lr_power: 2.0,
        }
    }
}

/// Schedule-Free SGD hyperparameters (`SGDScheduleFree` names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleFreeSgdConfig {
    /// Learning rate (before the internal warmup).
    pub lr: f64,
    /// Interpolation β between z and x (0 < momentum < 1).
    pub momentum: f64,
    /// Weight decay λ, added to the gradient as λ·y (not multiplied by lr).
    pub weight_decay: f64,
    /// Linear warmup length in steps (0: none).
    pub warmup_steps: u64,
    /// Polynomial weighting power of the average: weights grow as (k + 1)^r.
    pub r: f64,
    /// Averaging weights scale as lr_max^weight_lr_power (so warmup steps count less).
    pub weight_lr_power: f64,
}

impl Default for ScheduleFreeSgdConfig {
    fn default() -> Self {
        Self {
            lr: 1.0,
            momentum: 0.9,
            weight_decay: 0.0,
            warmup_steps: 0,
            r: 0.0,
            weight_lr_power: 2.0,
        }
    }
}

/// `0 < x < 1`: β1 must be positive because x = lerp(y, z, 1 − 1/β1).
fn open_unit_interval(field: &str, x: f64) -> Result<()> {
    if x > 0.0 && x < 1.0 {
        Ok(())
    } else {
        Err(Error::config(field, format!("must lie in (0, 1), got {x}")))
    }
}

fn validate_schedule(prefix: &str, r: f64, weight_lr_power: f64) -> Result<()> {
    check::non_negative(&format!("{prefix}.r"), r)?;
    check::non_negative(&format!("{prefix}.weight_lr_power"), weight_lr_power)
}

impl RuleConfig for ScheduleFreeAdamWConfig {
    const NAME: &'static str = "schedulefree_adamw";

    fn validate(&self) -> Result<()> {
        check::non_negative("schedulefree_adamw.lr", self.lr)?;
        open_unit_interval("schedulefree_adamw.betas[0]", self.betas.0)?;
        check::unit_interval("schedulefree_adamw.betas[1]", self.betas.1)?;
        check::positive("schedulefree_adamw.eps", self.eps)?;
        check::non_negative("schedulefree_adamw.weight_decay", self.weight_decay)?;
        validate_schedule("schedulefree_adamw", self.r, self.weight_lr_power)
    }
    hyper_accessors!();
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(ScheduleFree {
            name: Self::NAME,
            beta1: self.betas.0,
            base: Base::Adam {
                beta2: self.betas.1,
                eps: self.eps,
            },
            warmup_steps: self.warmup_steps,
            r: self.r,
            weight_lr_power: self.weight_lr_power,
        }))
    }
}

impl RuleConfig for ScheduleFreeSgdConfig {
    const NAME: &'static str = "schedulefree_sgd";

    fn validate(&self) -> Result<()> {
        check::non_negative("schedulefree_sgd.lr", self.lr)?;
        open_unit_interval("schedulefree_sgd.momentum", self.momentum)?;
        check::non_negative("schedulefree_sgd.weight_decay", self.weight_decay)?;
        validate_schedule("schedulefree_sgd", self.r, self.weight_lr_power)
    }
    hyper_accessors!();
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(ScheduleFree {
            name: Self::NAME,
            beta1: self.momentum,
            base: Base::Sgd,
            warmup_steps: self.warmup_steps,
            r: self.r,
            weight_lr_power: self.weight_lr_power,
        }))
    }
}

/// The base optimizer whose iterate is `z`.
#[derive(Debug, Clone, Copy)]
enum Base {
    /// Adam-normalized gradient, with the second-moment decay and ε.
    Adam { beta2: f64, eps: f64 },
    /// The raw gradient.
    Sgd,
}

/// This step's group-wide numbers, as one parameter's update needs them.
#[derive(Debug, Clone, Copy)]
struct StepScalars {
    /// Steps taken by the group, this one included (the reference's k + 1).
    k: f64,
    /// Scheduled lr `lr_k`.
    lr: f64,
    /// Averaging coefficient `c`.
    c: f64,
    /// Weight decay λ.
    weight_decay: f64,
}

/// The Schedule-Free rule (AdamW or SGD base).
#[derive(Debug, Clone)]
pub struct ScheduleFree {
    name: &'static str,
    /// β1 (AdamW) or momentum (SGD).
    beta1: f64,
    base: Base,
    warmup_steps: u64,
    r: f64,
    weight_lr_power: f64,
}

/// torch's `lerp`: exact at both ends, and the same rounding as the reference.
#[inline(always)]
fn lerp<T: Float>(a: T, b: T, w: T) -> T {
    if w.abs() < T::of(0.5) {
        a + w * (b - a)
    } else {
        b - (b - a) * (T::one() - w)
    }
}

/// `param ← lerp(param, z, w)` in place.
fn lerp_toward(param: &Tensor, z: &Tensor, w: f64) -> Result<()> {
    with_float!(param.dtype(), "schedule-free mode switch", T => {
        let w = T::of(w);
        let scalars = [w];
        zip_mut_or_kernel::<T>(Kernel::new("lerp_toward", &scalars), &[param], &[z], move |o, i| {
            let p = &mut *o[0];
            let z = exactly(i[0], p.len(), "z")?;
            vectorized! {
                for (p, &z) in p.iter_mut().zip(z) {
                    *p = lerp(*p, z, w);
                }
            }
            Ok(())
        })
    })
}

impl ScheduleFree {
    fn update_typed<T: Float>(
        &self,
        param: &Var,
        grad: &Tensor,
        state: &State,
        s: StepScalars,
    ) -> Result<()> {
        let StepScalars {
            k,
            lr,
            c,
            weight_decay,
        } = s;
        let z = state.tensor("z")?;
        let y_lr = T::of(lr * (self.beta1 * (1.0 - c) - 1.0));
        let (lr, c, wd) = (T::of(lr), T::of(c), T::of(weight_decay));
        let decay = weight_decay != 0.0;
        let decay_flag = flag::<T>(decay);
        match self.base {
            Base::Adam { beta2, eps } => {
                let v = state.tensor("exp_avg_sq")?;
                let bias_correction2 = T::of(1.0 - beta2.powf(k));
                let (b2, c2, eps) = (T::of(beta2), T::of(1.0 - beta2), T::of(eps));
                let scalars = [b2, c2, bias_correction2, eps, c, y_lr, lr, wd, decay_flag];
                let kernel = Kernel::new("schedule_free_adam", &scalars);
                zip_mut_or_kernel::<T>(kernel, &[param.as_tensor(), z, v], &[grad], move |o, i| {
                    let [y, z, v] = o else { unreachable!() };
                    // One level of reference, so the loop keeps the slices in registers.
                    let (y, z, v) = (&mut **y, &mut **z, &mut **v);
                    let n = y.len();
                    let g = exactly(i[0], n, "grad")?;
                    let (z, v) = (exactly_mut(z, n, "z")?, exactly_mut(v, n, "exp_avg_sq")?);
                    vectorized! {
                        for j in 0..n {
                            v[j] = v[j] * b2 + c2 * g[j] * g[j];
                            let mut d = g[j] / ((v[j] / bias_correction2).sqrt() + eps);
                            if decay {
                                d += wd * y[j];
                            }
                            y[j] = lerp(y[j], z[j], c) + y_lr * d;
                            z[j] -= lr * d;
                        }
                    }
                    Ok(())
                })
            }
            Base::Sgd => zip_mut_or_kernel::<T>(
                Kernel::new("schedule_free_sgd", &[c, y_lr, lr, wd, decay_flag]),
                &[param.as_tensor(), z],
                &[grad],
                move |o, i| {
                    let [y, z] = o else { unreachable!() };
                    // One level of reference, so the loop keeps the slices in registers.
                    let (y, z) = (&mut **y, &mut **z);
                    let n = y.len();
                    let (g, z) = (exactly(i[0], n, "grad")?, exactly_mut(z, n, "z")?);
                    vectorized! {
                        for j in 0..n {
                            let d = if decay { g[j] + wd * y[j] } else { g[j] };
                            y[j] = lerp(y[j], z[j], c) + y_lr * d;
                            z[j] -= lr * d;
                        }
                    }
                    Ok(())
                },
            ),
        }
    }
}

impl Rule for ScheduleFree {
    fn name(&self) -> &'static str {
        self.name
    }

    fn begin_step(&self, lr: f64, group: &mut State) -> Result<()> {
        let k = group.scalar(K);
        let sched = if k < self.warmup_steps as f64 {
            (k + 1.0) / self.warmup_steps as f64
        } else {
            1.0
        };
        let lr_k = lr * sched;
        let lr_max = group.scalars.get(LR_MAX).copied().unwrap_or(-1.0).max(lr_k);
        let weight = (k + 1.0).powf(self.r) * lr_max.powf(self.weight_lr_power);
        let weight_sum = group.scalar(WEIGHT_SUM) + weight;
        let ckp1 = if weight_sum != 0.0 {
            weight / weight_sum
        } else {
            0.0
        };
        group.set_scalar(K, k + 1.0);
        group.set_scalar(LR_MAX, lr_max);
        group.set_scalar(WEIGHT_SUM, weight_sum);
        group.set_scalar(SCHEDULED_LR, lr_k);
        group.set_scalar(CKP1, ckp1);
        Ok(())
    }

    fn update(
        &self,
        ctx: &StepCtx<'_>,
        _meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        // After begin_step, the group's k counts this step too: k + 1 in the reference's terms.
        let k = ctx.group.scalar(K);
        if k < 1.0 {
            return Err(Error::Msg(format!(
                "{}: the group's step was not started (begin_step must run before update)",
                self.name
            )));
        }
        if !state.tensors.contains_key("z") {
            state.tensors.insert("z".into(), param.as_tensor().copy()?);
        }
        if matches!(self.base, Base::Adam { .. }) {
            state.tensor_or_zeros("exp_avg_sq", param)?;
        }
        let scalars = StepScalars {
            k,
            lr: ctx.group.scalar(SCHEDULED_LR),
            c: ctx.group.scalar(CKP1),
            weight_decay: ctx.weight_decay,
        };
        with_float!(param.dtype(), self.name, T =>
            self.update_typed::<T>(param, grad, state, scalars))
    }

    fn eval_value(
        &self,
        _meta: &ParamMeta,
        param: &Var,
        state: &State,
        _group: &State,
        mode: Mode,
    ) -> Result<Option<Tensor>> {
        match (mode, state.tensors.get("z")) {
            (Mode::Train, Some(z)) => {
                let x = param.as_tensor().copy()?;
                lerp_toward(&x, z, 1.0 - 1.0 / self.beta1)?;
                Ok(Some(x))
            }
            _ => Ok(None),
        }
    }

    fn switch_mode(
        &self,
        to: Mode,
        _meta: &ParamMeta,
        param: &Var,
        state: &mut State,
        _group: &State,
    ) -> Result<()> {
        let Some(z) = state.tensors.get("z") else {
            return Ok(());
        };
        let w = match to {
            Mode::Eval => 1.0 - 1.0 / self.beta1,
            Mode::Train => 1.0 - self.beta1,
        };
        lerp_toward(param.as_tensor(), z, w)
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        for f in ["z", "exp_avg_sq"] {
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
    use crate::optim::testing::{
        driver_w as driver, lcg_from_state, max_diff, param, step_w as step,
    };
    use crate::optim::{Driver, NamedParams, OptimConfig, Optimizer};

    fn det(n: usize, seed: u64) -> Vec<f64> {
        lcg_from_state(seed, n)
    }

    fn values(opt: &Driver) -> Vec<f64> {
        param(opt, "w")
    }

    fn explicit(adam: bool, init: &[f64], grads: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>) {
        let (lr, b1, b2, eps, wd, warmup, r, power) = (0.05, 0.8, 0.99, 1e-8, 0.01, 3.0, 0.5, 2.0);
        let n = init.len();
        let (mut x, mut z, mut y) = (init.to_vec(), init.to_vec(), init.to_vec());
        let mut v = vec![0.0; n];
        let (mut lr_max, mut weight_sum) = (-1.0f64, 0.0);
        for (k, g) in grads.iter().enumerate() {
            let k = k as f64;
            let sched = if k < warmup { (k + 1.0) / warmup } else { 1.0 };
            let lr_k = lr * sched;
            lr_max = lr_max.max(lr_k);
            let weight = (k + 1.0).powf(r) * lr_max.powf(power);
            weight_sum += weight;
            let c = weight / weight_sum;
            for j in 0..n {
                let d = if adam {
                    v[j] = b2 * v[j] + (1.0 - b2) * g[j] * g[j];
                    g[j] / ((v[j] / (1.0 - b2.powf(k + 1.0))).sqrt() + eps) + wd * y[j]
                } else {
                    g[j] + wd * y[j]
                };
                z[j] -= lr_k * d;
                x[j] = (1.0 - c) * x[j] + c * z[j];
                y[j] = (1.0 - b1) * z[j] + b1 * x[j];
            }
        }
        (y, x)
    }

    #[test]
    fn matches_the_explicit_three_sequence_form() -> Result<()> {
        let init = det(9, 1);
        let grads: Vec<Vec<f64>> = (0..7).map(|s| det(9, 100 + s)).collect();
        for adam in [true, false] {
            let cfg = if adam {
                OptimConfig::SchedulefreeAdamw(ScheduleFreeAdamWConfig {
                    lr: 0.05,
                    betas: (0.8, 0.99),
                    weight_decay: 0.01,
                    warmup_steps: 3,
                    r: 0.5,
                    ..Default::default()
                })
            } else {
                OptimConfig::SchedulefreeSgd(ScheduleFreeSgdConfig {
                    lr: 0.05,
                    momentum: 0.8,
                    weight_decay: 0.01,
                    warmup_steps: 3,
                    r: 0.5,
                    ..Default::default()
                })
            };
            let mut opt = driver(cfg, &init)?;
            for g in &grads {
                step(&mut opt, g)?;
            }
            let (y, x) = explicit(adam, &init, &grads);
            assert!(max_diff(&values(&opt), &y) < 1e-13, "adam={adam} y");
            let eval = opt.eval_params()?[0].1.to_vec1::<f64>()?;
            assert!(max_diff(&eval, &x) < 1e-13, "adam={adam} x");
        }
        Ok(())
    }

    #[test]
    fn train_eval_round_trip_returns_the_same_y() -> Result<()> {
        let init = det(12, 3);
        for cfg in [
            OptimConfig::SchedulefreeAdamw(ScheduleFreeAdamWConfig::default()),
            OptimConfig::SchedulefreeSgd(ScheduleFreeSgdConfig {
                lr: 0.1,
                ..Default::default()
            }),
        ] {
            let mut opt = driver(cfg, &init)?;
            // Before any step there is no z: switching modes changes nothing.
            opt.set_mode(Mode::Eval)?;
            assert_eq!(values(&opt), init);
            assert!(step(&mut opt, &init).is_err(), "stepping in eval mode");
            opt.set_mode(Mode::Train)?;
            for s in 0..4 {
                step(&mut opt, &det(12, 50 + s))?;
            }
            let y = values(&opt);
            let x = opt.eval_params()?[0].1.to_vec1::<f64>()?;
            assert!(max_diff(&x, &y) > 1e-6, "x and y differ after steps");
            opt.set_mode(Mode::Eval)?;
            assert!(max_diff(&values(&opt), &x) < 1e-15);
            // In eval mode the parameter already holds x.
            assert!(max_diff(&opt.eval_params()?[0].1.to_vec1::<f64>()?, &x) == 0.0);
            opt.set_mode(Mode::Train)?;
            assert!(max_diff(&values(&opt), &y) < 1e-14, "round trip lands on y");
        }
        Ok(())
    }

    #[test]
    fn group_counters_survive_a_state_round_trip() -> Result<()> {
        let init = det(6, 21);
        let cfg = OptimConfig::SchedulefreeAdamw(ScheduleFreeAdamWConfig {
            warmup_steps: 4,
            r: 1.0,
            ..Default::default()
        });
        let mut a = driver(cfg.clone(), &init)?;
        for s in 0..3 {
            step(&mut a, &det(6, 30 + s))?;
        }
        let bytes = a.state_dict()?.to_bytes()?;
        let mut b = driver(cfg, &init)?;
        b.vars()[0].1.set(&a.vars()[0].1.as_tensor().copy()?)?;
        b.load_state_dict(crate::optim::StateDict::from_bytes(&bytes, &Device::Cpu)?)?;
        for s in 3..6 {
            step(&mut a, &det(6, 30 + s))?;
            step(&mut b, &det(6, 30 + s))?;
        }
        assert_eq!(values(&a), values(&b));
        Ok(())
    }

    #[test]
    fn first_step_without_warmup_lands_on_z() -> Result<()> {
        // c = 1 on the first step, so x₁ = z₁ and y₁ = z₁ = p₀ − lr·g (SGD, no decay).
        let init = det(5, 9);
        let g = det(5, 10);
        let cfg = OptimConfig::SchedulefreeSgd(ScheduleFreeSgdConfig {
            lr: 0.1,
            ..Default::default()
        });
        let mut opt = driver(cfg, &init)?;
        step(&mut opt, &g)?;
        let want: Vec<f64> = init.iter().zip(&g).map(|(p, g)| p - 0.1 * g).collect();
        assert!(max_diff(&values(&opt), &want) < 1e-15);
        Ok(())
    }

    #[test]
    fn zero_lr_keeps_parameters_and_averages_nothing() -> Result<()> {
        let init = det(4, 2);
        let cfg = OptimConfig::SchedulefreeAdamw(ScheduleFreeAdamWConfig {
            lr: 0.0,
            ..Default::default()
        });
        let mut opt = driver(cfg, &init)?;
        step(&mut opt, &det(4, 3))?;
        assert_eq!(values(&opt), init);
        Ok(())
    }

    #[test]
    fn f32_parameters_work() -> Result<()> {
        let var = Var::from_vec(vec![1.0f32, -2.0, 0.5], 3, &Device::Cpu)?;
        let mut opt = Driver::new(
            OptimConfig::SchedulefreeAdamw(ScheduleFreeAdamWConfig::default()),
            NamedParams::new([("w".to_string(), var.clone())])?,
        )?;
        let mut grads = BTreeMap::new();
        grads.insert(
            "w".to_string(),
            Tensor::new(&[0.1f32, 0.2, -0.3], &Device::Cpu)?,
        );
        opt.step_named(&grads)?;
        assert_eq!(var.dtype(), DType::F32);
        assert!(var.to_vec1::<f32>()?.iter().all(|x| x.is_finite()));
        Ok(())
    }

    #[test]
    fn validation_names_the_field() {
        let bad = ScheduleFreeAdamWConfig {
            betas: (0.0, 0.999),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("betas[0]"));
        let bad = ScheduleFreeSgdConfig {
            momentum: 1.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("momentum"));
        let bad = ScheduleFreeSgdConfig {
            weight_lr_power: -1.0,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("weight_lr_power"));
        assert!(ScheduleFreeAdamWConfig::default().validate().is_ok());
        assert!(ScheduleFreeSgdConfig::default().validate().is_ok());
    }
}
