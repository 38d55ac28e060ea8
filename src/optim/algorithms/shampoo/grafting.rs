//! Grafting: the optimizer whose step *size* (per block norm) Shampoo's direction is given
//! (SGD, AdaGrad, RMSprop or Adam, with their own β2 and ε), and its second-moment
//! coefficients per step.

use serde::{Deserialize, Serialize};

use crate::error::{check, Error, Result};

fn d_adagrad_eps() -> f64 {
    1e-10
}
fn d_rmsprop_beta2() -> f64 {
    0.99
}
fn d_adam_beta2() -> f64 {
    0.999
}

/// The optimizer whose step *size* (per block norm) Shampoo's direction is given: the
/// reference's grafting `PreconditionerConfig`s, with their own β2 and ε.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Grafting {
    /// No grafting: the Shampoo direction is used as is.
    #[default]
    None,
    /// SGD: `A = Ḡ`.
    Sgd,
    /// AdaGrad: `V += G²`, `A = Ḡ/(√V + ε)`.
    Adagrad {
        /// ε (reference default 1e-10).
        #[serde(default = "d_adagrad_eps")]
        epsilon: f64,
    },
    /// RMSprop: `V = β2·V + (1−β2)·G²`, `A = Ḡ/(√V + ε)`.
    Rmsprop {
        /// β2 (default 0.99).
        #[serde(default = "d_rmsprop_beta2")]
        beta2: f64,
        /// ε (default 1e-10).
        #[serde(default = "d_adagrad_eps")]
        epsilon: f64,
        /// `V = β2·V + G²` instead.
        #[serde(default)]
        drop_weighting_factor_on_gsquare: bool,
    },
    /// Adam: RMSprop's `V` with bias correction, `A = Ḡ/(√(V/(1−β2^t)) + ε)`.
    Adam {
        /// β2 (default 0.999).
        #[serde(default = "d_adam_beta2")]
        beta2: f64,
        /// ε (default 1e-10).
        #[serde(default = "d_adagrad_eps")]
        epsilon: f64,
        /// `V = β2·V + G²` and no bias correction.
        #[serde(default)]
        drop_weighting_factor_on_gsquare: bool,
    },
}

/// The grafting state update and preconditioner as numbers: `V ← decay·V + weight·G²`,
/// `A = Ḡ/(√(V/bc) + ε)`.
#[derive(Debug, Clone, Copy)]
pub(super) struct GraftCoeffs {
    pub(super) decay: f64,
    pub(super) weight: f64,
    pub(super) bias_correction: f64,
    pub(super) epsilon: f64,
}

impl Grafting {
    /// Whether there is grafting at all.
    pub fn is_none(&self) -> bool {
        matches!(self, Grafting::None)
    }

    /// The second-moment coefficients at step `t` (`None` for no grafting or SGD).
    pub(super) fn coeffs(&self, t: u64) -> Option<GraftCoeffs> {
        match *self {
            Grafting::None | Grafting::Sgd => None,
            Grafting::Adagrad { epsilon } => Some(GraftCoeffs {
                decay: 1.0,
                weight: 1.0,
                bias_correction: 1.0,
                epsilon,
            }),
            Grafting::Rmsprop {
                beta2,
                epsilon,
                drop_weighting_factor_on_gsquare: drop,
            } => Some(GraftCoeffs {
                decay: beta2,
                weight: if drop { 1.0 } else { 1.0 - beta2 },
                bias_correction: 1.0,
                epsilon,
            }),
            Grafting::Adam {
                beta2,
                epsilon,
                drop_weighting_factor_on_gsquare: drop,
            } => Some(GraftCoeffs {
                decay: beta2,
                weight: if drop { 1.0 } else { 1.0 - beta2 },
                bias_correction: if drop {
                    1.0
                } else {
                    1.0 - beta2.powf(t as f64)
                },
                epsilon,
            }),
        }
    }

    pub(super) fn validate(&self) -> Result<()> {
        let (beta2, epsilon) = match *self {
            Grafting::None | Grafting::Sgd => return Ok(()),
            Grafting::Adagrad { epsilon } => (None, epsilon),
            Grafting::Rmsprop { beta2, epsilon, .. } | Grafting::Adam { beta2, epsilon, .. } => {
                (Some(beta2), epsilon)
            }
        };
        check::positive("shampoo.grafting_config.epsilon", epsilon)?;
        if let Some(b) = beta2 {
            if !(b > 0.0 && b <= 1.0) {
                return Err(Error::config(
                    "shampoo.grafting_config.beta2",
                    format!("must be in (0, 1], got {b}"),
                ));
            }
        }
        Ok(())
    }
}
