//! Signum, signed momentum (Bernstein et al. 2018), as the code of "Deconstructing What Makes a
//! Good Optimizer for Language Models" (Zhao et al. 2024) runs it: `LionW` with tied betas.
//!
//! Per parameter, per step, with β = β1 = β2:
//!
//! ```text
//! p ← p · (1 − lr·λ)                 decoupled decay, coupled to the current lr, first
//! m ← β·m + (1 − β)·g                EMA, m0 = 0, no bias correction (irrelevant under sign)
//! p ← p − lr · sign(m)               sign(0) = 0, as torch.sign
//! ```
//!
//! The computation is Lion's fused pass
//! ([`SignMomentumStep`](crate::optim::math::moments::SignMomentumStep)) with β2 = β1, so Signum and Lion
//! with equal betas agree bit for bit. Because sign() is scale-invariant the EMA and the
//! heavy-ball sum `m ← β·m + g` give the same steps; torch-SGD-style dampened momentum (first
//! buffer undamped) does not. β = 0 is signSGD. No coupled (L2) weight decay, unlike MXNet's
//! Signum.
//!
//! Signum shares Lion's config type and rule ([`SignMomentumConfig`], [`SignMomentum`]), so the
//! two cannot drift apart; only the name, the default betas and the tie check differ.
//!
//! State: `exp_avg` (m). Defaults: lr 1e-4 and λ = 0 (LionW's), β = 0.9 for both (the paper's
//! β₀; LionW's own untied default (0.9, 0.99) is Lion, not Signum). Reference:
//! rosieyzh/optimizers-llm `olmo/optim.py` @ a1f8a3f58f4b6e805e2725cc249f859f7a8e18bd, class
//! `LionW`, built for `optimizer.name = signsgd` as `LionW(lr, betas=(beta_0, beta_0), wd)`.

use crate::optim::algorithms::lion::{SignMomentum, SignMomentumConfig, SignumVariant};

/// Signum hyperparameters (the reference's `LionW` names; β = (0.9, 0.9), tied).
pub type SignumConfig = SignMomentumConfig<SignumVariant>;

/// The Signum rule.
pub type Signum = SignMomentum<SignumVariant>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Result;
    use crate::optim::config::RuleConfig;
    use crate::optim::lion::{sign, LionConfig};
    use crate::optim::testing::{driver_w as driver, step_w as step};
    use crate::optim::OptimConfig;

    const GRADS: [[f64; 5]; 6] = [
        [0.2, -0.1, 0.05, 1.0, 0.0],
        [-0.3, -0.2, 0.01, -0.5, 0.0],
        [0.4, 0.6, -0.9, 0.2, 0.0],
        [-0.1, 0.3, 0.2, -0.7, 0.0],
        [0.25, -0.05, 0.3, 0.1, 0.0],
        [-0.6, 0.15, -0.02, 0.4, 0.0],
    ];

    #[test]
    fn equals_lion_with_tied_betas_bit_for_bit() -> Result<()> {
        let (lr, beta, wd) = (0.02, 0.85, 0.1);
        let init = [0.3, -0.7, 1.1, 0.0, 2.0];
        let mut signum = driver(
            OptimConfig::Signum(SignumConfig {
                lr,
                betas: (beta, beta),
                weight_decay: wd,
                ..Default::default()
            }),
            &init,
        )?;
        let mut lion = driver(
            OptimConfig::Lion(LionConfig {
                lr,
                betas: (beta, beta),
                weight_decay: wd,
                ..Default::default()
            }),
            &init,
        )?;
        for g in &GRADS {
            assert_eq!(step(&mut signum, g)?, step(&mut lion, g)?);
        }
        let m_signum = signum.param_state("w").unwrap().tensor("exp_avg")?;
        let m_lion = lion.param_state("w").unwrap().tensor("exp_avg")?;
        assert_eq!(m_signum.to_vec1::<f64>()?, m_lion.to_vec1::<f64>()?);
        Ok(())
    }

    #[test]
    fn is_the_sign_of_the_ema() -> Result<()> {
        let (lr, beta, wd) = (0.01, 0.9, 0.5);
        let init = [0.3, -0.7, 1.1, 0.0, 2.0];
        let mut opt = driver(
            OptimConfig::Signum(SignumConfig {
                lr,
                betas: (beta, beta),
                weight_decay: wd,
                ..Default::default()
            }),
            &init,
        )?;
        let (mut p, mut m) = (init.to_vec(), vec![0.0; 5]);
        for g in &GRADS {
            let got = step(&mut opt, g)?;
            for k in 0..5 {
                m[k] = beta * m[k] + (1.0 - beta) * g[k];
                p[k] = p[k] * (1.0 - lr * wd) - lr * sign(m[k]);
            }
            for k in 0..5 {
                assert!((got[k] - p[k]).abs() <= 1e-15, "{got:?} vs {p:?}");
            }
        }
        // The last coordinate never saw a gradient: m = 0, sign 0, only the decay moved it.
        let decayed = 2.0 * (1.0f64 - lr * wd).powi(GRADS.len() as i32);
        assert!((p[4] - decayed).abs() <= 1e-15, "{} vs {decayed}", p[4]);
        Ok(())
    }

    #[test]
    fn rejects_untied_betas() {
        let cfg = SignumConfig {
            betas: (0.9, 0.99),
            ..Default::default()
        };
        let err = OptimConfig::Signum(cfg)
            .build_rule()
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("signum.betas[1]"), "{err}");
        assert!(SignumConfig::default().validate().is_ok());
    }
}
