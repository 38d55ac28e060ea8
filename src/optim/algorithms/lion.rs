//! Lion, "EvoLved Sign Momentum" (Chen et al. 2023), exactly as the google/automl reference
//! computes it.
//!
//! Per parameter, per step (the order matters):
//!
//! ```text
//! p ← p · (1 − lr·λ)                 decoupled decay, coupled to the current lr
//! c = β1·m + (1 − β1)·g              interpolation, not stored
//! p ← p − lr · sign(c)               sign(0) = 0, as torch.sign
//! m ← β2·m + (1 − β2)·g              the momentum moves with β2, after the step
//! ```
//!
//! State: `exp_avg` (m), zeros at start. There is no step counter, no bias correction and no ε.
//! Defaults are the reference's: lr 1e-4, β = (0.9, 0.99), λ = 0. The authors suggest an lr
//! 3–10× smaller than AdamW's and a weight decay 3–10× larger (the effective decay is lr·λ).
//! Reference: google/automl `lion/lion_pytorch.py` @ 6a54c8741e7c3265d4547c4f35f47a0391122dc5
//! (lucidrains `lion-pytorch` 0.2.5 with `decoupled_weight_decay=False` computes the same).
//!
//! The fused pass is [`SignMomentumStep`] (in [`crate::optim::math::moments`]). Signum
//! ([`crate::optim::signum`]) is this pass with tied betas, so both share one config type,
//! [`SignMomentumConfig`], and one rule, [`SignMomentum`]; a [`SignVariant`] only sets the name,
//! the default betas and whether the betas must be equal.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Error, Result};
use crate::optim::config::{hyper_accessors, RuleConfig};
pub use crate::optim::math::moments::{sign, SignMomentumStep};
use crate::optim::params::ParamMeta;
use crate::optim::rule::{expect_state_shape, Rule, StepCtx};
use crate::optim::state::State;

/// Lion hyperparameters (reference names and defaults: β = (0.9, 0.99)).
pub type LionConfig = SignMomentumConfig<LionVariant>;

/// The Lion rule.
pub type Lion = SignMomentum<LionVariant>;

/// What tells the members of the sign-momentum family apart: the name, the default betas and
/// whether the two betas must be equal.
pub trait SignVariant:
    std::fmt::Debug + Clone + PartialEq + Default + Send + Sync + 'static
{
    /// Canonical name.
    const NAME: &'static str;
    /// Default (β1, β2).
    const BETAS: (f64, f64);
    /// β1 = β2 is required, and the one β is `betas[0]`.
    const TIED: bool;
}

/// Lion: untied betas, the reference's (0.9, 0.99).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LionVariant;

impl SignVariant for LionVariant {
    const NAME: &'static str = "lion";
    const BETAS: (f64, f64) = (0.9, 0.99);
    const TIED: bool = false;
}

/// Signum: tied betas, the Deconstructing paper's β₀ = 0.9 for both.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SignumVariant;

impl SignVariant for SignumVariant {
    const NAME: &'static str = "signum";
    const BETAS: (f64, f64) = (0.9, 0.9);
    const TIED: bool = true;
}

/// Hyperparameters of the sign-momentum family: Lion ([`LionConfig`]) and Signum
/// ([`SignumConfig`](crate::optim::signum::SignumConfig)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignMomentumConfig<V: SignVariant> {
    /// Learning rate (the size of every coordinate's step).
    pub lr: f64,
    /// (β1, β2): β1 interpolates the update direction, β2 is the momentum's decay. Signum gives
    /// its one β twice, as its reference does; the two must then be equal (untied betas are
    /// Lion: use `name = "lion"`).
    pub betas: (f64, f64),
    /// Decoupled weight decay λ (the step multiplies p by 1 − lr·λ).
    pub weight_decay: f64,
    /// Which member of the family (no field of its own in the config file).
    #[serde(skip)]
    pub variant: V,
}

impl<V: SignVariant> Default for SignMomentumConfig<V> {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            betas: V::BETAS,
            weight_decay: 0.0,
            variant: V::default(),
        }
    }
}

impl<V: SignVariant> RuleConfig for SignMomentumConfig<V> {
    const NAME: &'static str = V::NAME;

    fn validate(&self) -> Result<()> {
        let field = |f: &str| format!("{}.{f}", V::NAME);
        check::non_negative(&field("lr"), self.lr)?;
        check::unit_interval(&field("betas[0]"), self.betas.0)?;
        check::unit_interval(&field("betas[1]"), self.betas.1)?;
        if V::TIED && self.betas.0 != self.betas.1 {
            return Err(Error::config(
                field("betas[1]"),
                format!(
                    "must equal betas[0] (Signum ties them), got ({}, {}); untied betas are \
                     Lion (name = \"lion\")",
                    self.betas.0, self.betas.1
                ),
            ));
        }
        check::non_negative(&field("weight_decay"), self.weight_decay)
    }
    hyper_accessors!();
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(SignMomentum(self.clone())))
    }
}

/// The sign-momentum rule: Lion, or Signum with [`SignumVariant`].
#[derive(Debug, Clone)]
pub struct SignMomentum<V: SignVariant>(pub SignMomentumConfig<V>);

impl<V: SignVariant> Rule for SignMomentum<V> {
    fn name(&self) -> &'static str {
        V::NAME
    }

    fn update(
        &self,
        ctx: &StepCtx<'_>,
        _meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        let m = state.tensor_or_zeros("exp_avg", param)?;
        let (beta1, beta2) = self.0.betas;
        SignMomentumStep {
            lr: ctx.lr,
            beta1,
            // Signum's one β is betas[0] (validation keeps betas[1] equal to it).
            beta2: if V::TIED { beta1 } else { beta2 },
            weight_decay: ctx.weight_decay,
        }
        .apply(param, grad, m)
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        expect_state_shape(meta, state, "exp_avg", &meta.shape)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::{DType, Device};

    use super::*;
    use crate::optim::testing::{driver_w as driver, step_w as step};
    use crate::optim::{Driver, NamedParams, OptimConfig};

    #[test]
    fn sign_of_zero_is_zero() {
        assert_eq!(sign(0.0f64), 0.0);
        assert_eq!(sign(-0.0f64), 0.0);
        assert_eq!(sign(0.0f32), 0.0);
        assert_eq!(sign(3.0f64), 1.0);
        assert_eq!(sign(-1e-300f64), -1.0);
        assert!(sign(f64::NAN).is_nan());
    }

    #[test]
    fn zero_gradient_and_zero_momentum_leave_the_parameter_alone() -> Result<()> {
        let cfg = LionConfig {
            lr: 0.1,
            ..Default::default()
        };
        let mut opt = driver(OptimConfig::Lion(cfg), &[1.0, -2.0, 0.5])?;
        // m = 0 and g = 0 at coordinate 1: c = 0, sign 0, no move.
        let p = step(&mut opt, &[0.5, 0.0, -0.25])?;
        assert_eq!(p, vec![0.9, -2.0, 0.6]);
        Ok(())
    }

    #[test]
    fn matches_the_equations_over_several_steps() -> Result<()> {
        let (lr, b1, b2, wd) = (0.01, 0.8, 0.95, 0.3);
        let cfg = LionConfig {
            lr,
            betas: (b1, b2),
            weight_decay: wd,
            ..Default::default()
        };
        let init = [0.3, -0.7, 1.1, 0.0];
        let grads = [
            [0.2, -0.1, 0.05, 1.0],
            [-0.3, -0.2, 0.01, -0.5],
            [0.4, 0.6, -0.9, 0.2],
            [-0.1, 0.3, 0.2, -0.7],
        ];
        let mut opt = driver(OptimConfig::Lion(cfg), &init)?;
        let (mut p, mut m) = (init.to_vec(), vec![0.0; 4]);
        for g in &grads {
            let got = step(&mut opt, g)?;
            for k in 0..4 {
                p[k] *= 1.0 - lr * wd;
                let c = b1 * m[k] + (1.0 - b1) * g[k];
                p[k] -= lr * sign(c);
                m[k] = b2 * m[k] + (1.0 - b2) * g[k];
            }
            for k in 0..4 {
                assert!((got[k] - p[k]).abs() <= 1e-15, "{got:?} vs {p:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn runs_in_f32_and_rejects_bad_betas() -> Result<()> {
        let var = Var::zeros((2, 3), DType::F32, &Device::Cpu)?;
        let mut opt = Driver::new(
            OptimConfig::Lion(LionConfig::default()),
            NamedParams::new(vec![("w".to_string(), var.clone())])?,
        )?;
        let mut grads = BTreeMap::new();
        grads.insert(
            "w".to_string(),
            Tensor::ones((2, 3), DType::F32, &Device::Cpu)?,
        );
        opt.step_named(&grads)?;
        let p = var.flatten_all()?.to_vec1::<f32>()?;
        assert!(p.iter().all(|&x| x == -1e-4f32));

        let bad = LionConfig {
            betas: (0.9, 1.0),
            ..Default::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("lion.betas[1]"), "{err}");
        Ok(())
    }

    #[test]
    fn lion_and_signum_configs_keep_their_names_defaults_and_keys() {
        let lion = OptimConfig::from_toml("name = \"lion\"\nlr = 0.01").unwrap();
        let signum = OptimConfig::from_toml("name = \"signum\"\nlr = 0.01").unwrap();
        assert_eq!(lion.name(), "lion");
        assert_eq!(signum.name(), "signum");
        match (&lion, &signum) {
            (OptimConfig::Lion(l), OptimConfig::Signum(s)) => {
                assert_eq!(l.betas, (0.9, 0.99));
                assert_eq!(s.betas, (0.9, 0.9));
            }
            other => panic!("wrong variants: {other:?}"),
        }
        // The variant is not a key: written configs carry only the reference's fields.
        assert_eq!(
            signum.to_json(),
            r#"{"name":"signum","lr":0.01,"betas":[0.9,0.9],"weight_decay":0.0}"#
        );
        for name in ["lion", "signum"] {
            for key in ["variant", "beta"] {
                let err = OptimConfig::from_toml(&format!("name = \"{name}\"\n{key} = 1"))
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(key), "{name}: {err}");
            }
        }
    }
}
