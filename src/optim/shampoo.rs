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

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{check, Error, Result};
use crate::linalg::{self, InverseRoot, LinalgError, Robust, RootMethod, Stability};
use crate::optim::config::RuleConfig;
use crate::optim::fused::{all_finite, flag, sum_sq, zip_mut_or_kernel, Float, Kernel};
use crate::optim::kron::{
    ema_update, mode_gram, mode_products, Blocks, FactorEma, KronLayout, Refresh,
};
use crate::optim::params::ParamMeta;
use crate::optim::rule::{expect_state_shape, Rule, StepCtx};
use crate::optim::state::State;
use crate::with_float;

/// A size limit that may be infinite: a positive integer, or `"inf"` (TOML also takes the float
/// `inf`). Serialized as the integer or the string `"inf"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DimLimit {
    /// At most this many.
    Finite(usize),
    /// No limit (the reference's `math.inf`).
    Inf,
}

impl DimLimit {
    /// The limit as a `usize` (`usize::MAX` for infinity).
    pub fn get(self) -> usize {
        match self {
            DimLimit::Finite(n) => n,
            DimLimit::Inf => usize::MAX,
        }
    }
}

impl Serialize for DimLimit {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            DimLimit::Finite(n) => s.serialize_u64(*n as u64),
            DimLimit::Inf => s.serialize_str("inf"),
        }
    }
}

impl<'de> Deserialize<'de> for DimLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = DimLimit;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "a non-negative integer or \"inf\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<DimLimit, E> {
                usize::try_from(v)
                    .map(DimLimit::Finite)
                    .map_err(|_| E::custom(format!("{v} is too large")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<DimLimit, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is negative")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<DimLimit, E> {
                if v == f64::INFINITY {
                    Ok(DimLimit::Inf)
                } else if v >= 0.0 && v.fract() == 0.0 && v < 1e18 {
                    Ok(DimLimit::Finite(v as usize))
                } else {
                    Err(E::custom(format!("{v} is neither an integer nor inf")))
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<DimLimit, E> {
                match v {
                    "inf" | "math.inf" | "Infinity" => Ok(DimLimit::Inf),
                    other => Err(E::custom(format!("`{other}` is not \"inf\""))),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The precision of the factor matrices or of their inverse roots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FactorDtype {
    /// f32 (the reference default).
    Float32,
    /// f64 (what float64 work should use).
    Float64,
}

impl FactorDtype {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            FactorDtype::Float32 => DType::F32,
            FactorDtype::Float64 => DType::F64,
        }
    }
}

/// Where weight decay enters (DistributedShampoo's `WeightDecayType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WeightDecayType {
    /// `G ← G + λ·W` before anything else (coupled L2).
    #[serde(rename = "l2", alias = "L2")]
    L2,
    /// `D ← D + λ·W` after grafting, before momentum (lr multiplies it).
    #[serde(rename = "decoupled", alias = "DECOUPLED")]
    Decoupled,
    /// `D ← D + λ·(lr/lr₀)·W`, `lr₀` the base (peak) learning rate.
    #[serde(rename = "corrected", alias = "CORRECTED")]
    Corrected,
    /// `D ← D + (λ/lr₀)·W`, so the per-step decay `lr·λ/lr₀` does not scale with `lr₀`.
    #[serde(rename = "independent", alias = "INDEPENDENT")]
    Independent,
}

fn d_adagrad_eps() -> f64 {
    1e-10
}
fn d_rmsprop_beta2() -> f64 {
    0.99
}
fn d_adam_beta2() -> f64 {
    0.999
}
fn d_momentum() -> f64 {
    0.5
}
fn d_true() -> bool {
    true
}
fn d_newton_iterations() -> usize {
    100
}
fn d_newton_tolerance() -> f64 {
    1e-6
}
fn d_rank_rtol() -> Option<f64> {
    Some(0.0)
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
struct GraftCoeffs {
    decay: f64,
    weight: f64,
    bias_correction: f64,
    epsilon: f64,
}

impl Grafting {
    /// Whether there is grafting at all.
    pub fn is_none(&self) -> bool {
        matches!(self, Grafting::None)
    }

    /// The second-moment coefficients at step `t` (`None` for no grafting or SGD).
    fn coeffs(&self, t: u64) -> Option<GraftCoeffs> {
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

    fn validate(&self) -> Result<()> {
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

/// Iterate averaging applied to the search direction (DistributedShampoo's
/// `iterate_averaging_config`); only classic momentum is implemented.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum IterateAveraging {
    /// None (the reference default `None`).
    #[default]
    None,
    /// `B ← μ·B + (1−τ)·D`, then `D ← (1−τ)·D + μ·B` (Nesterov) or `D ← B`; `B` starts at zero.
    ClassicMomentum {
        /// μ, in (0, 1) (default 0.5).
        #[serde(default = "d_momentum")]
        momentum: f64,
        /// τ, in [0, 1) (default 0).
        #[serde(default)]
        dampening: f64,
        /// Nesterov's form.
        #[serde(default)]
        use_nesterov: bool,
    },
}

/// How inverse roots are computed (the reference's `amortized_computation_config`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AmortizedComputation {
    /// `EigenConfig` with `PerturbationConfig`: eigendecomposition of `A + εI` (or of `A`, then
    /// shifted, without `perturb_before_computation`).
    Eigen {
        /// Add `εI` before the decomposition (default true).
        #[serde(default = "d_true")]
        perturb_before_computation: bool,
    },
    /// `EigenConfig` with `PseudoInverseConfig` (needs `epsilon = 0`): eigenvalues at or below
    /// `max(rank_atol, rank_rtol·λmax)` map to 0.
    PseudoInverse {
        /// Absolute cutoff (default 0).
        #[serde(default)]
        rank_atol: f64,
        /// Relative cutoff (default 0; absent in JSON `null` = `n·machine ε`).
        #[serde(default = "d_rank_rtol")]
        rank_rtol: Option<f64>,
    },
    /// `CoupledNewtonConfig` (integer roots only).
    CoupledNewton {
        /// Iteration cap (default 100).
        #[serde(default = "d_newton_iterations")]
        max_iterations: usize,
        /// Stop when `max|M − I|` is at most this (default 1e-6).
        #[serde(default = "d_newton_tolerance")]
        tolerance: f64,
    },
}

impl Default for AmortizedComputation {
    fn default() -> Self {
        AmortizedComputation::Eigen {
            perturb_before_computation: true,
        }
    }
}

impl AmortizedComputation {
    fn method(&self) -> RootMethod {
        match *self {
            AmortizedComputation::Eigen {
                perturb_before_computation,
            } => RootMethod::Eigen(Stability::Perturbation {
                perturb_before: perturb_before_computation,
            }),
            AmortizedComputation::PseudoInverse {
                rank_atol,
                rank_rtol,
            } => RootMethod::Eigen(Stability::PseudoInverse {
                rank_atol,
                rank_rtol,
            }),
            AmortizedComputation::CoupledNewton {
                max_iterations,
                tolerance,
            } => RootMethod::CoupledNewton {
                max_iterations,
                tolerance,
            },
        }
    }
}

/// An inverse-exponent override for one tensor order: one exponent for every dim, or a table
/// dim → exponent (missing dims keep the default `1/(2·order)`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ExponentOverride {
    /// The same exponent for every dim.
    All(f64),
    /// Per dim (keys are dim indices, as strings in TOML/JSON).
    PerDim(BTreeMap<String, f64>),
}

/// Shampoo hyperparameters (DistributedShampoo names and defaults, nested configs flattened to
/// TOML-friendly tagged tables).
///
/// ```toml
/// name = "shampoo"
/// lr = 0.001
/// betas = [0.9, 0.999]
/// epsilon = 1e-8
/// precondition_frequency = 10
/// grafting_config = { type = "adam", beta2 = 0.999, epsilon = 1e-8 }
/// inverse_exponent_override = { 2 = 0.5 }     # the "1/2 power" variant
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShampooConfig {
    /// Learning rate.
    pub lr: f64,
    /// (β1, β2): filtered-gradient EMA (0 = none) and factor-matrix EMA (1 = sums, AdaGrad-like).
    pub betas: (f64, f64),
    /// β3 for the filtered gradient used in the step; −1 means β1.
    pub beta3: f64,
    /// ε added to the factor matrices before the inverse root.
    pub epsilon: f64,
    /// Weight decay λ.
    pub weight_decay: f64,
    /// Where weight decay enters.
    pub weight_decay_type: WeightDecayType,
    /// Largest block side (blocking) and merge threshold; `"inf"` for none.
    pub max_preconditioner_dim: DimLimit,
    /// Inverse roots are recomputed every this many steps (after the start).
    pub precondition_frequency: u64,
    /// First step that computes inverse roots (−1: `precondition_frequency`); before it the
    /// grafting method alone is used (or the identity preconditioner without grafting).
    pub start_preconditioning_step: i64,
    /// Bias-correct the filtered gradient and the factor matrices.
    pub use_bias_correction: bool,
    /// Classic momentum on the search direction, or none.
    pub iterate_averaging_config: IterateAveraging,
    /// The grafted method (the reference's `grafting_config`; `None` when absent).
    #[serde(alias = "grafting")]
    pub grafting_config: Grafting,
    /// Merge small dims until this many remain (`"inf"`: never merge). Reference default 1:
    /// parameters with at most `max_preconditioner_dim` elements become vectors with one full
    /// factor.
    pub target_parameter_dimensionality: DimLimit,
    /// Inverse exponent per tensor order (keys: the order), overriding `1/(2·order)`.
    pub inverse_exponent_override: BTreeMap<String, ExponentOverride>,
    /// How inverse roots are computed.
    pub amortized_computation_config: AmortizedComputation,
    /// Precision of the factor matrices (their accumulation and inverse roots).
    pub factor_matrix_dtype: FactorDtype,
    /// Precision of the stored inverse roots (and of the preconditioning products).
    pub inv_factor_matrix_dtype: FactorDtype,
    /// Consecutive failed inverse-root refreshes of a block tolerated before the step fails.
    pub num_tolerated_failed_amortized_computations: u64,
    /// Scale each bias-corrected factor by `max(trace, ε)^(−trace_scaling_exponent)` first.
    pub use_trace_scaling: bool,
    /// The trace-scaling exponent, in (0, 1].
    pub trace_scaling_exponent: f64,
    /// Factor EMA without the `(1−β2)` weight (and then without bias correction).
    pub drop_weighting_factor_on_gsquare: bool,
}

impl Default for ShampooConfig {
    fn default() -> Self {
        Self {
            lr: 1e-2,
            betas: (0.9, 1.0),
            beta3: -1.0,
            epsilon: 1e-12,
            weight_decay: 0.0,
            weight_decay_type: WeightDecayType::Decoupled,
            max_preconditioner_dim: DimLimit::Finite(1024),
            precondition_frequency: 1,
            start_preconditioning_step: -1,
            use_bias_correction: true,
            iterate_averaging_config: IterateAveraging::None,
            grafting_config: Grafting::None,
            target_parameter_dimensionality: DimLimit::Finite(1),
            inverse_exponent_override: BTreeMap::new(),
            amortized_computation_config: AmortizedComputation::default(),
            factor_matrix_dtype: FactorDtype::Float32,
            inv_factor_matrix_dtype: FactorDtype::Float32,
            num_tolerated_failed_amortized_computations: 3,
            use_trace_scaling: false,
            trace_scaling_exponent: 0.5,
            drop_weighting_factor_on_gsquare: false,
        }
    }
}

impl ShampooConfig {
    /// β3 after the `−1 → β1` substitution.
    pub fn beta3(&self) -> f64 {
        if self.beta3 == -1.0 {
            self.betas.0
        } else {
            self.beta3
        }
    }

    /// `start_preconditioning_step` after the `−1 → precondition_frequency` substitution.
    pub fn start(&self) -> u64 {
        if self.start_preconditioning_step == -1 {
            self.precondition_frequency
        } else {
            self.start_preconditioning_step.max(0) as u64
        }
    }

    /// The inverse exponent of dim `dim` of an order-`order` block (0: not preconditioned).
    pub fn inverse_exponent(&self, order: usize, dim: usize) -> f64 {
        let default = 1.0 / (2.0 * order.max(1) as f64);
        match self.inverse_exponent_override.get(&order.to_string()) {
            None => default,
            Some(ExponentOverride::All(e)) => *e,
            Some(ExponentOverride::PerDim(m)) => {
                m.get(&dim.to_string()).copied().unwrap_or(default)
            }
        }
    }

    fn validate_overrides(&self) -> Result<()> {
        let field = "shampoo.inverse_exponent_override";
        let exponent = |key: &str, e: f64| -> Result<()> {
            if e.is_finite() && e >= 0.0 {
                Ok(())
            } else {
                Err(Error::config(
                    format!("{field}.{key}"),
                    format!("must be finite and >= 0, got {e}"),
                ))
            }
        };
        for (order, value) in &self.inverse_exponent_override {
            let o: usize = order
                .parse()
                .ok()
                .filter(|o: &usize| o.to_string() == *order)
                .ok_or_else(|| {
                    Error::config(
                        field,
                        format!("key `{order}` is not a tensor order (0, 1, 2, ...)"),
                    )
                })?;
            match value {
                ExponentOverride::All(e) => exponent(order, *e)?,
                ExponentOverride::PerDim(dims) => {
                    for (dim, e) in dims {
                        let ok = dim
                            .parse::<usize>()
                            .ok()
                            .filter(|d| d.to_string() == *dim && *d <= o.saturating_sub(1));
                        if ok.is_none() {
                            return Err(Error::config(
                                format!("{field}.{order}"),
                                format!("key `{dim}` is not a dim of an order-{o} tensor"),
                            ));
                        }
                        exponent(&format!("{order}.{dim}"), *e)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The view, blocking and roots of a parameter of `shape` (non-empty).
    fn plan(&self, shape: &[usize]) -> Result<Plan> {
        let limit = self.max_preconditioner_dim.get();
        let dims = match self.target_parameter_dimensionality {
            DimLimit::Inf => shape.to_vec(),
            DimLimit::Finite(target) => merge_small_dims(shape, limit, target),
        };
        let order = dims.len();
        let roots: Vec<Option<f64>> = (0..order)
            .map(|k| {
                let e = self.inverse_exponent(order, k);
                (e != 0.0).then(|| 1.0 / e)
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

impl RuleConfig for ShampooConfig {
    const NAME: &'static str = "shampoo";

    fn validate(&self) -> Result<()> {
        check::non_negative("shampoo.lr", self.lr)?;
        check::unit_interval("shampoo.betas[0]", self.betas.0)?;
        check::closed_unit_interval("shampoo.betas[1]", self.betas.1)?;
        if self.beta3 != -1.0 {
            check::unit_interval("shampoo.beta3", self.beta3)?;
        }
        let pseudo = matches!(
            self.amortized_computation_config,
            AmortizedComputation::PseudoInverse { .. }
        );
        if pseudo {
            if self.epsilon != 0.0 {
                return Err(Error::config(
                    "shampoo.epsilon",
                    format!("must be 0 with the pseudo-inverse, got {}", self.epsilon),
                ));
            }
        } else {
            check::positive("shampoo.epsilon", self.epsilon)?;
        }
        check::non_negative("shampoo.weight_decay", self.weight_decay)?;
        if matches!(
            self.weight_decay_type,
            WeightDecayType::Corrected | WeightDecayType::Independent
        ) && self.lr == 0.0
        {
            return Err(Error::config(
                "shampoo.lr",
                "must be > 0 with weight_decay_type corrected or independent (it is the peak lr)",
            ));
        }
        if self.max_preconditioner_dim == DimLimit::Finite(0) {
            return Err(Error::config(
                "shampoo.max_preconditioner_dim",
                "must be >= 1 or \"inf\"",
            ));
        }
        if self.target_parameter_dimensionality == DimLimit::Finite(0) {
            return Err(Error::config(
                "shampoo.target_parameter_dimensionality",
                "must be >= 1 or \"inf\"",
            ));
        }
        check::at_least_one(
            "shampoo.precondition_frequency",
            self.precondition_frequency,
        )?;
        if self.start_preconditioning_step < -1 || self.start() < self.precondition_frequency {
            return Err(Error::config(
                "shampoo.start_preconditioning_step",
                format!(
                    "must be -1 or >= precondition_frequency ({}), got {}",
                    self.precondition_frequency, self.start_preconditioning_step
                ),
            ));
        }
        if let IterateAveraging::ClassicMomentum {
            momentum,
            dampening,
            ..
        } = self.iterate_averaging_config
        {
            if !(momentum > 0.0 && momentum < 1.0) {
                return Err(Error::config(
                    "shampoo.iterate_averaging_config.momentum",
                    format!("must be in (0, 1), got {momentum}"),
                ));
            }
            check::unit_interval("shampoo.iterate_averaging_config.dampening", dampening)?;
        }
        self.grafting_config.validate()?;
        self.validate_overrides()?;
        if let AmortizedComputation::PseudoInverse {
            rank_atol,
            rank_rtol,
        } = self.amortized_computation_config
        {
            check::non_negative("shampoo.amortized_computation_config.rank_atol", rank_atol)?;
            if let Some(r) = rank_rtol {
                check::non_negative("shampoo.amortized_computation_config.rank_rtol", r)?;
            }
        }
        if let AmortizedComputation::CoupledNewton { tolerance, .. } =
            self.amortized_computation_config
        {
            check::non_negative("shampoo.amortized_computation_config.tolerance", tolerance)?;
            // Coupled Newton takes integer roots only: every exponent must be 1/integer.
            for (order, value) in &self.inverse_exponent_override {
                let exps: Vec<f64> = match value {
                    ExponentOverride::All(e) => vec![*e],
                    ExponentOverride::PerDim(m) => m.values().copied().collect(),
                };
                for e in exps.into_iter().filter(|e| *e != 0.0) {
                    let r = 1.0 / e;
                    if r.fract() != 0.0 {
                        return Err(Error::config(
                            format!("shampoo.inverse_exponent_override.{order}"),
                            format!(
                                "coupled Newton needs integer roots (1/exponent), got exponent {e}"
                            ),
                        ));
                    }
                }
            }
        }
        if self.use_trace_scaling
            && !(self.trace_scaling_exponent > 0.0 && self.trace_scaling_exponent <= 1.0)
        {
            return Err(Error::config(
                "shampoo.trace_scaling_exponent",
                format!(
                    "must be in (0, 1] with use_trace_scaling, got {}",
                    self.trace_scaling_exponent
                ),
            ));
        }
        Ok(())
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
        Ok(Box::new(Shampoo(self.clone())))
    }
}

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
struct Plan {
    layout: KronLayout,
    blocks: Blocks,
    /// The root `1/e_k` of every view dim (`None`: not preconditioned).
    roots: Vec<Option<f64>>,
}

fn factor_key(block: usize, k: usize) -> String {
    format!("block{block}.factor_matrix.{k}")
}

fn inv_factor_key(block: usize, k: usize) -> String {
    format!("block{block}.inv_factor_matrix.{k}")
}

fn counter_key(block: usize) -> String {
    format!("block{block}.failed_amortized_computation_counter")
}

/// Total failed inverse-root computations of the parameter (state scalar).
pub const FAILED: &str = "failed_amortized_computations";
/// Inverse roots that needed the f64 retry (state scalar).
pub const RETRIED: &str = "f64_retries";

fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(if t.dtype() == dtype {
        t.clone()
    } else {
        t.to_dtype(dtype)?
    })
}

/// State tensors must be f64 or the parameter's dtype: matrices kept in f32 for an f64
/// parameter are stored as (exactly representable) f64 values.
fn storage_dtype(compute: DType, param: DType) -> DType {
    if compute == DType::F64 || param == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `x / divisor` elementwise (a division, as the reference computes it), as a new tensor.
fn divided(x: &Tensor, divisor: f64) -> Result<Tensor> {
    let out = x.zeros_like()?;
    let x = x.contiguous()?;
    with_float!(x.dtype(), "shampoo", T => {
        let d = T::of(divisor);
        let scalars = [d];
        zip_mut_or_kernel::<T>(Kernel::new("divide_by", &scalars), &[&out], &[&x], |o, i| {
            for (o, &v) in o[0].iter_mut().zip(i[0]) {
                *o = v / d;
            }
            Ok(())
        })?;
    });
    Ok(out)
}

/// What a step computed for the factors and roots, committed only when everything succeeded.
#[derive(Default)]
struct Staged {
    tensors: Vec<(String, Tensor)>,
    scalars: Vec<(String, f64)>,
}

/// The Shampoo rule.
#[derive(Debug, Clone)]
pub struct Shampoo(pub ShampooConfig);

impl Shampoo {
    fn root_request(&self, root: f64) -> InverseRoot {
        InverseRoot {
            root,
            epsilon: self.0.epsilon,
            method: self.0.amortized_computation_config.method(),
        }
    }

    /// Steps 1 of the update: new factors and, when due, new inverse roots, into `Staged`.
    fn stage_preconditioner(
        &self,
        meta: &ParamMeta,
        plan: &Plan,
        g_blocks: &[Tensor],
        param_dtype: DType,
        state: &State,
        t: u64,
    ) -> Result<Staged> {
        let c = &self.0;
        let fdt = c.factor_matrix_dtype.dtype();
        let idt = c.inv_factor_matrix_dtype.dtype();
        let (f_store, i_store) = (
            storage_dtype(fdt, param_dtype),
            storage_dtype(idt, param_dtype),
        );
        let beta2 = c.betas.1;
        let weight = if c.drop_weighting_factor_on_gsquare || beta2 == 1.0 {
            1.0
        } else {
            1.0 - beta2
        };
        let bc2 = if c.use_bias_correction && beta2 < 1.0 && !c.drop_weighting_factor_on_gsquare {
            1.0 - beta2.powf(t as f64)
        } else {
            1.0
        };
        let ema = FactorEma::ScaleAdd {
            decay: beta2,
            weight,
        };
        let amortize = Refresh::AfterStart {
            frequency: c.precondition_frequency,
            start: c.start(),
        }
        .due(t);
        let mut staged = Staged::default();
        let (mut failed_total, mut retried_total) = (0.0, 0.0);
        for (b, gb) in g_blocks.iter().enumerate() {
            let gf = cast(gb, fdt)?;
            let mut failure: Option<String> = None;
            let mut has_factor = false;
            for (k, root) in plan.roots.iter().enumerate() {
                let Some(root) = *root else { continue };
                has_factor = true;
                let d = gb.dims()[k];
                let fkey = factor_key(b, k);
                let factor = match state.tensors.get(&fkey) {
                    Some(old) if old.dtype() == fdt => old.copy()?,
                    Some(old) => old.to_dtype(fdt)?,
                    None => Tensor::zeros((d, d), fdt, gb.device())?,
                };
                ema_update(&factor, &mode_gram(&gf, k)?, ema)?;
                if !all_finite(&factor)? {
                    return Err(Error::Numerical(format!(
                        "shampoo: factor matrix {k} of block {b} of `{}` holds NaN or infinity at \
                         step {t} (gradient too large for factor_matrix_dtype {:?}?); nothing \
                         was changed",
                        meta.name, c.factor_matrix_dtype
                    )));
                }
                if amortize {
                    let mut a = divided(&factor, bc2)?;
                    if c.use_trace_scaling {
                        let trace: f64 = a
                            .to_dtype(DType::F64)?
                            .to_vec2::<f64>()?
                            .iter()
                            .enumerate()
                            .map(|(i, row)| row[i])
                            .sum();
                        let scale = trace.max(c.epsilon).powf(-c.trace_scaling_exponent);
                        a = a.affine(scale, 0.0)?;
                    }
                    match linalg::inverse_root(&a, &self.root_request(root))? {
                        Robust::Failed {
                            first: LinalgError::NonFiniteInput,
                            ..
                        } => {
                            return Err(Error::Numerical(format!(
                                "shampoo: bias-corrected factor matrix {k} of block {b} of `{}` \
                                 holds NaN or infinity at step {t}; nothing was changed",
                                meta.name
                            )))
                        }
                        Robust::Failed { first, retry } => {
                            failed_total += 1.0;
                            failure = Some(match retry {
                                Some(r) => format!("factor {k}: {first}; f64 retry: {r}"),
                                None => format!("factor {k}: {first}"),
                            });
                        }
                        outcome => {
                            if outcome.was_retried() {
                                retried_total += 1.0;
                            }
                            let p = outcome.value().expect("not failed");
                            staged
                                .tensors
                                .push((inv_factor_key(b, k), cast(&cast(&p, idt)?, i_store)?));
                        }
                    }
                }
                staged.tensors.push((fkey, cast(&factor, f_store)?));
            }
            if amortize && has_factor {
                let key = counter_key(b);
                let count = match failure {
                    Some(reason) => {
                        let count = state.scalar(&key) + 1.0;
                        if count > c.num_tolerated_failed_amortized_computations as f64 {
                            return Err(Error::Numerical(format!(
                                "shampoo: `{}` block {b}: {count} consecutive failed inverse-root \
                                 computations exceed num_tolerated_failed_amortized_computations \
                                 = {} at step {t} (last: {reason}); nothing was changed",
                                meta.name, c.num_tolerated_failed_amortized_computations
                            )));
                        }
                        count
                    }
                    None => 0.0,
                };
                staged.scalars.push((key, count));
            }
        }
        if failed_total > 0.0 {
            staged
                .scalars
                .push((FAILED.into(), state.scalar(FAILED) + failed_total));
        }
        if retried_total > 0.0 {
            staged
                .scalars
                .push((RETRIED.into(), state.scalar(RETRIED) + retried_total));
        }
        Ok(staged)
    }

    /// Steps 2–7: grafting state, filtered gradient, direction, weight decay, momentum, update.
    fn apply<T: Float>(
        &self,
        ctx: &StepCtx<'_>,
        plan: &Plan,
        param: &Var,
        g: &Tensor,
        state: &mut State,
        t: u64,
    ) -> Result<()> {
        let c = &self.0;
        let (beta1, beta3) = (c.betas.0, c.beta3());
        let graft = c.grafting_config.coeffs(t);
        let graft_only = t < c.start() && !c.grafting_config.is_none();

        // 2–3. Grafting state, filtered gradient and grafted direction, one pass.
        let v = match graft {
            Some(_) => Some(state.tensor_or_zeros("grafting_state", param)?.clone()),
            None => None,
        };
        let m = if beta1 != 0.0 {
            Some(state.tensor_or_zeros("filtered_grad", param)?.clone())
        } else {
            None
        };
        let gbar_out = match m {
            Some(_) => Some(g.zeros_like()?),
            None => None,
        };
        let a_out = match graft {
            Some(_) => Some(g.zeros_like()?),
            None => None,
        };
        fn slot<'a>(outs: &mut Vec<&'a Tensor>, x: Option<&'a Tensor>) -> Option<usize> {
            x.map(|x| {
                outs.push(x);
                outs.len() - 1
            })
        }
        let mut outs: Vec<&Tensor> = Vec::new();
        let iv = slot(&mut outs, v.as_ref());
        let im = slot(&mut outs, m.as_ref());
        let ig = slot(&mut outs, gbar_out.as_ref());
        let ia = slot(&mut outs, a_out.as_ref());
        if !outs.is_empty() {
            let bc1 = if c.use_bias_correction {
                1.0 - beta3 * beta1.powf(t as f64 - 1.0)
            } else {
                1.0
            };
            let (bc1, b1w, b3w) = (T::of(bc1), 1.0 - beta1, 1.0 - beta3);
            let use_bc1 = c.use_bias_correction;
            let same_beta = beta3 == beta1;
            let gc = graft.unwrap_or(GraftCoeffs {
                decay: 1.0,
                weight: 1.0,
                bias_correction: 1.0,
                epsilon: 1.0,
            });
            let (decay, wg, bcg, epsg) = (
                T::of(gc.decay),
                T::of(gc.weight),
                T::of(gc.bias_correction),
                T::of(gc.epsilon),
            );
            let skip_decay = gc.decay == 1.0;
            let flags = u8::from(use_bc1)
                | u8::from(same_beta) << 1
                | u8::from(skip_decay) << 2
                | u8::from(b1w < 0.5) << 3
                | u8::from(b3w < 0.5) << 4;
            let index = |i: Option<usize>| T::of(i.map_or(-1.0, |i| i as f64));
            let scalars = [
                bc1,
                T::of(b1w),
                T::of(1.0 - b1w),
                T::of(b3w),
                T::of(1.0 - b3w),
                T::of(f64::from(flags)),
                decay,
                wg,
                bcg,
                epsg,
                index(iv),
                index(im),
                index(ig),
                index(ia),
            ];
            let kernel = Kernel::new("shampoo_graft", &scalars);
            zip_mut_or_kernel::<T>(kernel, &outs, &[g], |o, i| {
                let g = i[0];
                for k in 0..g.len() {
                    let gk = g[k];
                    if let Some(iv) = iv {
                        let old = if skip_decay {
                            o[iv][k]
                        } else {
                            decay * o[iv][k]
                        };
                        o[iv][k] = old + wg * gk * gk;
                    }
                    let gb = match im {
                        Some(im) => {
                            let old = o[im][k];
                            let new = lerp(old, gk, b1w);
                            o[im][k] = new;
                            let gb = if same_beta { new } else { lerp(old, gk, b3w) };
                            if use_bc1 {
                                gb / bc1
                            } else {
                                gb
                            }
                        }
                        None => gk,
                    };
                    if let Some(ig) = ig {
                        o[ig][k] = gb;
                    }
                    if let (Some(ia), Some(iv)) = (ia, iv) {
                        o[ia][k] = gb / ((o[iv][k] / bcg).sqrt() + epsg);
                    }
                }
                Ok(())
            })?;
        }
        let gbar = gbar_out.unwrap_or_else(|| g.clone());
        let a = match c.grafting_config {
            Grafting::None => None,
            Grafting::Sgd => Some(gbar.clone()),
            _ => a_out,
        };

        // 4. Direction.
        let d = match (&a, graft_only) {
            (Some(a), true) => a.clone(),
            _ => {
                let idt = c.inv_factor_matrix_dtype.dtype();
                let gbar_blocks = plan.blocks.split(&plan.layout.to_view(&gbar)?)?;
                let a_blocks = match &a {
                    Some(a) => Some(plan.blocks.split(&plan.layout.to_view(a)?)?),
                    None => None,
                };
                let mut ds = Vec::with_capacity(gbar_blocks.len());
                for (b, gb) in gbar_blocks.iter().enumerate() {
                    let mats: Vec<Option<Tensor>> = (0..plan.roots.len())
                        .map(|k| {
                            if plan.roots[k].is_none() {
                                return Ok(None);
                            }
                            // No root yet: the identity, skipped exactly.
                            match state.tensors.get(&inv_factor_key(b, k)) {
                                Some(p) => Ok(Some(cast(p, idt)?)),
                                None => Ok(None),
                            }
                        })
                        .collect::<Result<_>>()?;
                    let s = if mats.iter().all(Option::is_none) {
                        gb.clone()
                    } else {
                        let x = cast(gb, idt)?;
                        cast(&mode_products(&x, &mats, true)?, T::DTYPE)?
                    };
                    let d = match &a_blocks {
                        None => s,
                        Some(ab) => {
                            let na = sum_sq(&ab[b])?.sqrt();
                            let ns = sum_sq(&s)?.sqrt();
                            s.affine(na / (ns + 1e-16), 0.0)?
                        }
                    };
                    ds.push(d);
                }
                plan.layout.from_view(&plan.blocks.merge(&ds)?)?
            }
        };

        // 5–7. Weight decay, momentum, update.
        let wd = ctx.weight_decay;
        let alpha = if wd == 0.0 {
            0.0
        } else {
            match c.weight_decay_type {
                WeightDecayType::L2 => 0.0,
                WeightDecayType::Decoupled => wd,
                WeightDecayType::Corrected => wd * ctx.lr / c.lr,
                WeightDecayType::Independent => wd / c.lr,
            }
        };
        let (alpha_t, neg_lr) = (T::of(alpha), T::of(-ctx.lr));
        let d = d.contiguous()?;
        let has_decay = flag::<T>(alpha != 0.0);
        match c.iterate_averaging_config {
            IterateAveraging::None => {
                let scalars = [alpha_t, neg_lr, has_decay];
                let kernel = Kernel::new("shampoo_update", &scalars);
                zip_mut_or_kernel::<T>(kernel, &[param.as_tensor()], &[&d], |o, i| {
                    let (p, d) = (&mut *o[0], i[0]);
                    for k in 0..p.len() {
                        let mut dk = d[k];
                        if alpha != 0.0 {
                            dk += alpha_t * p[k];
                        }
                        p[k] += dk * neg_lr;
                    }
                    Ok(())
                })
            }
            IterateAveraging::ClassicMomentum {
                momentum,
                dampening,
                use_nesterov,
            } => {
                let buf = state.tensor_or_zeros("momentum_buffer", param)?.clone();
                let (mu, keep) = (T::of(momentum), T::of(1.0 - dampening));
                let nesterov = flag::<T>(use_nesterov);
                let scalars = [alpha_t, neg_lr, has_decay, mu, keep, nesterov];
                let kernel = Kernel::new("shampoo_update_momentum", &scalars);
                zip_mut_or_kernel::<T>(kernel, &[param.as_tensor(), &buf], &[&d], |o, i| {
                    let [p, b] = o else {
                        unreachable!("two outputs")
                    };
                    let d = i[0];
                    for k in 0..p.len() {
                        let mut dk = d[k];
                        if alpha != 0.0 {
                            dk += alpha_t * p[k];
                        }
                        b[k] = b[k] * mu + keep * dk;
                        dk = if use_nesterov {
                            dk * keep + mu * b[k]
                        } else {
                            b[k]
                        };
                        p[k] += dk * neg_lr;
                    }
                    Ok(())
                })
            }
        }
    }
}

/// torch's `lerp(a, b, w)`: `a + w(b − a)` for `w < 0.5`, else `b − (b − a)(1 − w)`.
#[inline]
fn lerp<T: Float>(a: T, b: T, w: f64) -> T {
    if w < 0.5 {
        a + T::of(w) * (b - a)
    } else {
        b - (b - a) * T::of(1.0 - w)
    }
}

/// `g + λ·w` as a new tensor (L2 weight decay).
fn with_l2(g: &Tensor, w: &Tensor, wd: f64) -> Result<Tensor> {
    let out = g.zeros_like()?;
    with_float!(g.dtype(), "shampoo", T => {
        let wd = T::of(wd);
        let scalars = [wd];
        zip_mut_or_kernel::<T>(Kernel::new("add_scaled", &scalars), &[&out], &[g, w], |o, i| {
            for k in 0..o[0].len() {
                o[0][k] = i[0][k] + wd * i[1][k];
            }
            Ok(())
        })?;
    });
    Ok(out)
}

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
        for b in 0..plan.blocks.len() {
            let shape = plan.blocks.block_shape(b);
            for (k, root) in plan.roots.iter().enumerate() {
                if root.is_some() {
                    let d = shape[k];
                    expect_state_shape(meta, state, &factor_key(b, k), &[d, d])?;
                    expect_state_shape(meta, state, &inv_factor_key(b, k), &[d, d])?;
                }
            }
        }
        // Every per-block field must belong to a block and dim of this plan.
        let mut known = std::collections::BTreeSet::new();
        for b in 0..plan.blocks.len() {
            for (k, root) in plan.roots.iter().enumerate() {
                if root.is_some() {
                    known.insert(factor_key(b, k));
                    known.insert(inv_factor_key(b, k));
                }
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
mod tests {
    use std::collections::BTreeMap;

    use candle_core::{DType, Device, Tensor, Var};

    use super::*;
    use crate::optim::adamw::AdamStep;
    use crate::optim::sgd::SgdConfig;
    use crate::optim::{Driver, NamedParams, OptimConfig, Optimizer};

    /// Deterministic values in [-1, 1).
    fn noise(seed: u64, n: usize) -> Vec<f64> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    fn tensor(values: Vec<f64>, shape: &[usize], dtype: DType) -> Tensor {
        Tensor::from_vec(values, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    }

    type Shapes<'a> = &'a [(&'a str, &'a [usize])];

    fn driver(cfg: OptimConfig, shapes: Shapes<'_>, dtype: DType) -> Driver {
        let vars = shapes
            .iter()
            .enumerate()
            .map(|(i, (n, s))| {
                let n_el = s.iter().product();
                let t = tensor(noise(7 + i as u64, n_el), s, dtype);
                (n.to_string(), Var::from_tensor(&t).unwrap())
            })
            .collect::<Vec<_>>();
        Driver::new(cfg, NamedParams::new(vars).unwrap()).unwrap()
    }

    fn grads(shapes: Shapes<'_>, step: u64, dtype: DType) -> BTreeMap<String, Tensor> {
        shapes
            .iter()
            .enumerate()
            .map(|(i, (n, s))| {
                let n_el = s.iter().product();
                let g = noise(1000 * step + i as u64, n_el);
                (n.to_string(), tensor(g, s, dtype))
            })
            .collect()
    }

    fn params(opt: &Driver) -> BTreeMap<String, Vec<f64>> {
        opt.vars()
            .into_iter()
            .map(|(n, v)| (n, flat(v.as_tensor())))
            .collect()
    }

    fn bits(opt: &Driver) -> BTreeMap<String, Vec<u64>> {
        params(opt)
            .into_iter()
            .map(|(n, v)| (n, v.iter().map(|x| x.to_bits()).collect()))
            .collect()
    }

    fn shampoo(cfg: ShampooConfig) -> OptimConfig {
        OptimConfig::Shampoo(cfg)
    }

    /// A config that never computes a root within the tests' runs.
    fn never(cfg: ShampooConfig) -> ShampooConfig {
        ShampooConfig {
            precondition_frequency: 1000,
            start_preconditioning_step: -1,
            ..cfg
        }
    }

    fn toml(text: &str) -> ShampooConfig {
        match OptimConfig::from_toml(&format!("name = \"shampoo\"\n{text}")).unwrap() {
            OptimConfig::Shampoo(c) => c,
            other => panic!("not shampoo: {other:?}"),
        }
    }

    #[test]
    fn defaults_are_the_reference_defaults() {
        let c = ShampooConfig::default();
        assert_eq!(
            (c.lr, c.betas, c.beta3, c.epsilon),
            (1e-2, (0.9, 1.0), -1.0, 1e-12)
        );
        assert_eq!(c.weight_decay, 0.0);
        assert_eq!(c.weight_decay_type, WeightDecayType::Decoupled);
        assert_eq!(c.max_preconditioner_dim, DimLimit::Finite(1024));
        assert_eq!((c.precondition_frequency, c.start()), (1, 1));
        assert!(c.use_bias_correction);
        assert_eq!(c.grafting_config, Grafting::None);
        assert_eq!(c.iterate_averaging_config, IterateAveraging::None);
        assert_eq!(c.target_parameter_dimensionality, DimLimit::Finite(1));
        assert_eq!(c.factor_matrix_dtype, FactorDtype::Float32);
        assert_eq!(c.inv_factor_matrix_dtype, FactorDtype::Float32);
        assert_eq!(c.num_tolerated_failed_amortized_computations, 3);
        assert_eq!(
            c.amortized_computation_config,
            AmortizedComputation::Eigen {
                perturb_before_computation: true
            }
        );
        assert!(!c.use_trace_scaling && !c.drop_weighting_factor_on_gsquare);
        assert_eq!(c.inverse_exponent(1, 0), 0.5);
        assert_eq!(c.inverse_exponent(2, 1), 0.25);
        assert_eq!(c.inverse_exponent(3, 2), 1.0 / 6.0);
        assert_eq!(c.inverse_exponent(0, 0), 0.5);
        c.validate().unwrap();
    }

    #[test]
    fn toml_config_with_nested_tables() {
        let c = toml(
            r#"lr = 0.001
betas = [0.9, 0.999]
epsilon = 1e-8
max_preconditioner_dim = "inf"
target_parameter_dimensionality = inf
weight_decay_type = "L2"
weight_decay = 0.1
grafting = { type = "adam", beta2 = 0.95, epsilon = 1e-8 }
iterate_averaging_config = { type = "classic_momentum", momentum = 0.9, use_nesterov = true }
inverse_exponent_override = { 2 = 0.5, 3 = { 0 = 0.0, 2 = 0.25 } }
factor_matrix_dtype = "float64"
"#,
        );
        assert_eq!(c.max_preconditioner_dim, DimLimit::Inf);
        assert_eq!(c.target_parameter_dimensionality, DimLimit::Inf);
        assert_eq!(c.weight_decay_type, WeightDecayType::L2);
        assert_eq!(
            c.grafting_config,
            Grafting::Adam {
                beta2: 0.95,
                epsilon: 1e-8,
                drop_weighting_factor_on_gsquare: false
            }
        );
        assert_eq!(
            c.iterate_averaging_config,
            IterateAveraging::ClassicMomentum {
                momentum: 0.9,
                dampening: 0.0,
                use_nesterov: true
            }
        );
        assert_eq!(c.inverse_exponent(2, 0), 0.5);
        assert_eq!(c.inverse_exponent(3, 0), 0.0);
        assert_eq!(c.inverse_exponent(3, 1), 1.0 / 6.0);
        assert_eq!(c.inverse_exponent(3, 2), 0.25);
        assert_eq!(c.factor_matrix_dtype, FactorDtype::Float64);
        // Grafting defaults per method; a bare `type` works.
        let c = toml("grafting_config = { type = \"rmsprop\" }");
        assert_eq!(
            c.grafting_config,
            Grafting::Rmsprop {
                beta2: 0.99,
                epsilon: 1e-10,
                drop_weighting_factor_on_gsquare: false
            }
        );
        let c = toml("grafting_config = { type = \"adagrad\" }\nmax_preconditioner_dim = 8192");
        assert_eq!(c.grafting_config, Grafting::Adagrad { epsilon: 1e-10 });
        assert_eq!(c.max_preconditioner_dim, DimLimit::Finite(8192));
        let c = toml("epsilon = 0.0\namortized_computation_config = { type = \"pseudo_inverse\" }");
        assert_eq!(
            c.amortized_computation_config,
            AmortizedComputation::PseudoInverse {
                rank_atol: 0.0,
                rank_rtol: Some(0.0)
            }
        );
        // JSON round trip (the state header stores the config).
        let full = OptimConfig::Shampoo(toml(
            "max_preconditioner_dim = \"inf\"\ngrafting_config = { type = \"sgd\" }",
        ));
        let back = OptimConfig::from_json(serde_json::from_str(&full.to_json()).unwrap()).unwrap();
        assert_eq!(back.to_json(), full.to_json());
        // Unknown keys, in nested tables too, are rejected.
        for bad in [
            "grafting_config = { type = \"adam\", beta1 = 0.9 }",
            "grafting_config = { type = \"lamb\" }",
            "momentum = 0.9",
            "max_preconditioner_dim = -3",
            "max_preconditioner_dim = \"big\"",
        ] {
            assert!(
                OptimConfig::from_toml(&format!("name = \"shampoo\"\n{bad}")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn validation_names_the_field() {
        let cases: Vec<(&str, &str)> = vec![
            ("betas = [1.0, 0.9]", "shampoo.betas[0]"),
            ("betas = [0.9, 1.1]", "shampoo.betas[1]"),
            ("beta3 = 1.0", "shampoo.beta3"),
            ("epsilon = 0.0", "shampoo.epsilon"),
            ("weight_decay = -1.0", "shampoo.weight_decay"),
            ("precondition_frequency = 0", "shampoo.precondition_frequency"),
            (
                "precondition_frequency = 10\nstart_preconditioning_step = 5",
                "shampoo.start_preconditioning_step",
            ),
            ("start_preconditioning_step = -2", "shampoo.start_preconditioning_step"),
            ("max_preconditioner_dim = 0", "shampoo.max_preconditioner_dim"),
            (
                "target_parameter_dimensionality = 0",
                "shampoo.target_parameter_dimensionality",
            ),
            (
                "grafting_config = { type = \"adam\", epsilon = 0.0 }",
                "shampoo.grafting_config.epsilon",
            ),
            (
                "grafting_config = { type = \"rmsprop\", beta2 = 0.0 }",
                "shampoo.grafting_config.beta2",
            ),
            (
                "iterate_averaging_config = { type = \"classic_momentum\", momentum = 1.0 }",
                "shampoo.iterate_averaging_config.momentum",
            ),
            (
                "iterate_averaging_config = { type = \"classic_momentum\", dampening = 1.0 }",
                "shampoo.iterate_averaging_config.dampening",
            ),
            ("inverse_exponent_override = { x = 0.5 }", "shampoo.inverse_exponent_override"),
            (
                "inverse_exponent_override = { 2 = { 2 = 0.5 } }",
                "shampoo.inverse_exponent_override.2",
            ),
            (
                "inverse_exponent_override = { 2 = -0.5 }",
                "shampoo.inverse_exponent_override.2",
            ),
            (
                "amortized_computation_config = { type = \"pseudo_inverse\" }",
                "shampoo.epsilon",
            ),
            ("weight_decay_type = \"corrected\"\nlr = 0.0", "shampoo.lr"),
            (
                "use_trace_scaling = true\ntrace_scaling_exponent = 1.5",
                "shampoo.trace_scaling_exponent",
            ),
            (
                "amortized_computation_config = { type = \"coupled_newton\" }\ninverse_exponent_override = { 2 = 0.3 }",
                "shampoo.inverse_exponent_override.2",
            ),
        ];
        for (text, field) in cases {
            let err = OptimConfig::from_toml(&format!("name = \"shampoo\"\n{text}"))
                .expect_err(text)
                .to_string();
            assert!(err.contains(&format!("`{field}`")), "{text}: {err}");
        }
    }

    #[test]
    fn merge_small_dims_examples() {
        assert_eq!(merge_small_dims(&[6, 10], 1024, 1), vec![60]);
        assert_eq!(merge_small_dims(&[6, 10], 1024, 2), vec![6, 10]);
        assert_eq!(merge_small_dims(&[32, 3, 64, 64], 8192, 1), vec![96, 4096]);
        assert_eq!(
            merge_small_dims(&[32, 3, 64, 64], 1_000_000, 2),
            vec![32, 12288]
        );
        assert_eq!(merge_small_dims(&[8, 4, 3], 1024, 2), vec![8, 12]);
        assert_eq!(merge_small_dims(&[1, 50], 1024, 1), vec![50]);
        assert_eq!(merge_small_dims(&[1, 2, 5, 1], 10, 1), vec![10]);
        assert_eq!(merge_small_dims(&[1, 2, 5, 1], 1, 1), vec![2, 5]);
        assert_eq!(merge_small_dims(&[1, 1], 10, 1), vec![1]);
        assert_eq!(merge_small_dims(&[], 10, 1), vec![1]);
        assert_eq!(merge_small_dims(&[3, 0], 10, 1), vec![0]);
        assert_eq!(merge_small_dims(&[2000, 3], usize::MAX, 1), vec![6000]);
    }

    #[test]
    fn never_preconditioning_with_adam_grafting_is_adam() {
        let shapes: Shapes<'_> = &[("w", &[5, 7]), ("b", &[7])];
        let (lr, b1, b2, eps, wd) = (0.01, 0.9, 0.95, 1e-8, 0.1);
        let cfg = never(ShampooConfig {
            lr,
            betas: (b1, 0.999),
            weight_decay: wd,
            grafting_config: Grafting::Adam {
                beta2: b2,
                epsilon: eps,
                drop_weighting_factor_on_gsquare: false,
            },
            ..Default::default()
        });
        for dtype in [DType::F64, DType::F32] {
            let mut opt = driver(shampoo(cfg.clone()), shapes, dtype);
            // The same Adam by hand, in the reference's operation order (f64 only: bit-exact).
            let mut hand = params(&opt);
            let mut moments: BTreeMap<String, (Vec<f64>, Vec<f64>)> = hand
                .iter()
                .map(|(n, p)| (n.clone(), (vec![0.0; p.len()], vec![0.0; p.len()])))
                .collect();
            // And through AdamStep (AdamW's fused pass) on separate variables.
            let adam_vars: BTreeMap<String, (Var, Tensor, Tensor)> = opt
                .vars()
                .into_iter()
                .map(|(n, v)| {
                    let p = Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap();
                    let m = v.as_tensor().zeros_like().unwrap();
                    let s = v.as_tensor().zeros_like().unwrap();
                    (n, (p, m, s))
                })
                .collect();
            for t in 1..=8u64 {
                let g = grads(shapes, t, dtype);
                opt.step_named(&g).unwrap();
                for (n, p) in hand.iter_mut() {
                    let gv = flat(&g[n]);
                    let (m, v) = moments.get_mut(n).unwrap();
                    let bc1 = 1.0 - b1 * b1.powf(t as f64 - 1.0);
                    let bc2 = 1.0 - b2.powf(t as f64);
                    for k in 0..p.len() {
                        v[k] = b2 * v[k] + (1.0 - b2) * gv[k] * gv[k];
                        m[k] = m[k] + (1.0 - b1) * (gv[k] - m[k]);
                        let a = (m[k] / bc1) / ((v[k] / bc2).sqrt() + eps);
                        p[k] = p[k] + (a + wd * p[k]) * -lr;
                    }
                }
                for (n, (p, m, s)) in &adam_vars {
                    AdamStep {
                        lr,
                        beta1: b1,
                        beta2: b2,
                        eps,
                        weight_decay: wd,
                        t,
                        maximize: false,
                    }
                    .apply(p, &g[n], m, s, None)
                    .unwrap();
                }
            }
            let got = params(&opt);
            for (n, p) in &got {
                let adam = flat(adam_vars[n].0.as_tensor());
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                for k in 0..p.len() {
                    assert!(
                        (p[k] - adam[k]).abs() <= tol * (1.0 + adam[k].abs()),
                        "{dtype:?} {n}[{k}]: shampoo {} vs AdamStep {}",
                        p[k],
                        adam[k]
                    );
                }
                if dtype == DType::F64 {
                    assert_eq!(p, &hand[n], "{n}: not bit-identical to the hand loop");
                }
            }
        }
    }

    #[test]
    fn never_preconditioning_with_sgd_grafting_is_sgd() {
        let shapes: Shapes<'_> = &[("w", &[4, 6]), ("b", &[6]), ("s", &[])];
        type Variant = (Grafting, Option<(f64, bool)>, f64);
        let variants: [Variant; 4] = [
            (Grafting::Sgd, None, 0.0),
            (Grafting::Sgd, Some((0.9, true)), 0.01),
            (Grafting::Sgd, Some((0.9, false)), 0.0),
            // Without grafting the identity preconditioner is SGD too.
            (Grafting::None, Some((0.5, true)), 0.01),
        ];
        for (grafting, momentum, wd) in variants {
            for dtype in [DType::F64, DType::F32] {
                let cfg = never(ShampooConfig {
                    lr: 0.05,
                    betas: (0.0, 1.0),
                    weight_decay: wd,
                    weight_decay_type: WeightDecayType::L2,
                    grafting_config: grafting,
                    iterate_averaging_config: match momentum {
                        None => IterateAveraging::None,
                        Some((momentum, use_nesterov)) => IterateAveraging::ClassicMomentum {
                            momentum,
                            dampening: 0.0,
                            use_nesterov,
                        },
                    },
                    ..Default::default()
                });
                let sgd = SgdConfig {
                    lr: 0.05,
                    momentum: momentum.map_or(0.0, |m| m.0),
                    nesterov: momentum.is_some_and(|m| m.1),
                    weight_decay: wd,
                    ..Default::default()
                };
                let mut a = driver(shampoo(cfg), shapes, dtype);
                let mut b = driver(OptimConfig::Sgd(sgd), shapes, dtype);
                for t in 1..=6 {
                    a.step_named(&grads(shapes, t, dtype)).unwrap();
                    b.step_named(&grads(shapes, t, dtype)).unwrap();
                }
                assert_eq!(bits(&a), bits(&b), "{grafting:?} {momentum:?} {dtype:?}");
            }
        }
    }

    #[test]
    fn never_preconditioning_with_adagrad_and_rmsprop_grafting() {
        let shapes: Shapes<'_> = &[("w", &[3, 4])];
        for grafting in [
            Grafting::Adagrad { epsilon: 1e-3 },
            Grafting::Rmsprop {
                beta2: 0.9,
                epsilon: 1e-6,
                drop_weighting_factor_on_gsquare: false,
            },
            Grafting::Rmsprop {
                beta2: 0.9,
                epsilon: 1e-6,
                drop_weighting_factor_on_gsquare: true,
            },
            Grafting::Adam {
                beta2: 0.9,
                epsilon: 1e-6,
                drop_weighting_factor_on_gsquare: true,
            },
        ] {
            let cfg = never(ShampooConfig {
                lr: 0.1,
                betas: (0.0, 1.0),
                grafting_config: grafting,
                ..Default::default()
            });
            let mut opt = driver(shampoo(cfg), shapes, DType::F64);
            let mut p = params(&opt)["w"].clone();
            let mut v = vec![0.0; p.len()];
            let (decay, weight, eps) = match grafting {
                Grafting::Adagrad { epsilon } => (1.0, 1.0, epsilon),
                Grafting::Rmsprop {
                    beta2,
                    epsilon,
                    drop_weighting_factor_on_gsquare: drop,
                }
                | Grafting::Adam {
                    beta2,
                    epsilon,
                    drop_weighting_factor_on_gsquare: drop,
                } => (beta2, if drop { 1.0 } else { 1.0 - beta2 }, epsilon),
                _ => unreachable!(),
            };
            for t in 1..=5 {
                let g = grads(shapes, t, DType::F64);
                opt.step_named(&g).unwrap();
                let g = flat(&g["w"]);
                for k in 0..p.len() {
                    v[k] = if decay == 1.0 { v[k] } else { decay * v[k] } + weight * g[k] * g[k];
                    p[k] += (g[k] / (v[k].sqrt() + eps)) * -0.1;
                }
            }
            assert_eq!(params(&opt)["w"], p, "{grafting:?}");
        }
    }

    #[test]
    fn weight_decay_types() {
        // One SGD-grafted step from W with G: D = G + α·W, W ← W − lr·D.
        let shapes: Shapes<'_> = &[("w", &[2, 3])];
        let (lr, wd) = (0.5, 0.2);
        for (ty, alpha) in [
            (WeightDecayType::Decoupled, wd),
            (WeightDecayType::Corrected, wd * 0.25),
            (WeightDecayType::Independent, wd / lr),
            (WeightDecayType::L2, wd),
        ] {
            let cfg = never(ShampooConfig {
                lr,
                betas: (0.0, 1.0),
                weight_decay: wd,
                weight_decay_type: ty,
                grafting_config: Grafting::Sgd,
                ..Default::default()
            });
            let mut opt = driver(shampoo(cfg), shapes, DType::F64);
            opt.set_lr_factor(0.25);
            let w0 = params(&opt)["w"].clone();
            let g = grads(shapes, 1, DType::F64);
            opt.step_named(&g).unwrap();
            let g = flat(&g["w"]);
            let got = params(&opt)["w"].clone();
            for k in 0..w0.len() {
                let want = w0[k] - lr * 0.25 * (g[k] + alpha * w0[k]);
                assert!(
                    (got[k] - want).abs() < 1e-15,
                    "{ty:?}: {} vs {want}",
                    got[k]
                );
            }
        }
    }

    /// `a·b` of row-major `n×n` matrices.
    fn mm(a: &[f64], b: &[f64], n: usize, k: usize, m: usize) -> Vec<f64> {
        let mut out = vec![0.0; n * m];
        for i in 0..n {
            for j in 0..m {
                out[i * m + j] = (0..k).map(|l| a[i * k + l] * b[l * m + j]).sum();
            }
        }
        out
    }

    fn max_dev_from_identity(a: &[f64], n: usize) -> f64 {
        (0..n * n)
            .map(|i| (a[i] - if i / n == i % n { 1.0 } else { 0.0 }).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn half_power_override_and_default_exponents() {
        let shapes: Shapes<'_> = &[("w", &[4, 6])];
        let eps = 1e-10;
        for (text, power) in [("", 4u32), ("inverse_exponent_override = { 2 = 0.5 }", 2)] {
            let mut cfg = toml(text);
            cfg.betas = (0.0, 0.9);
            cfg.epsilon = eps;
            cfg.lr = 0.1;
            cfg.target_parameter_dimensionality = DimLimit::Inf;
            cfg.factor_matrix_dtype = FactorDtype::Float64;
            cfg.inv_factor_matrix_dtype = FactorDtype::Float64;
            let mut opt = driver(shampoo(cfg), shapes, DType::F64);
            // Step 1: L = GGᵀ, R = GᵀG; both exponents give the polar factor U·Vᵀ of G.
            let w0 = params(&opt)["w"].clone();
            opt.step_named(&grads(shapes, 1, DType::F64)).unwrap();
            let d: Vec<f64> = params(&opt)["w"]
                .iter()
                .zip(&w0)
                .map(|(w, w0)| (w0 - w) / 0.1)
                .collect();
            let mut dt = vec![0.0; 24];
            for i in 0..4 {
                for j in 0..6 {
                    dt[j * 4 + i] = d[i * 6 + j];
                }
            }
            // Quarter powers: U·Σ^(−1/2)·Σ·Σ^(−1/2)·Vᵀ = U·Vᵀ, so D·Dᵀ = I. Half powers:
            // U·Σ⁻¹·Vᵀ, so D·Dᵀ = (GGᵀ)⁻¹.
            let ddt = mm(&d, &dt, 4, 6, 4);
            let check = if power == 4 {
                ddt
            } else {
                let g = flat(&grads(shapes, 1, DType::F64)["w"]);
                let mut gt = vec![0.0; 24];
                for i in 0..4 {
                    for j in 0..6 {
                        gt[j * 4 + i] = g[i * 6 + j];
                    }
                }
                mm(&ddt, &mm(&g, &gt, 4, 6, 4), 4, 4, 4)
            };
            assert!(
                max_dev_from_identity(&check, 4) < 1e-6,
                "power {power}: {check:?}"
            );
            // Later steps: the stored roots are (F/bc2 + εI)^(−1/power) and D = P_L G P_R.
            for t in 2..=4u64 {
                let before = params(&opt)["w"].clone();
                let g = grads(shapes, t, DType::F64);
                opt.step_named(&g).unwrap();
                let st = opt.param_state("w").unwrap();
                let bc2 = 1.0 - 0.9f64.powf(t as f64);
                let mut p_side = Vec::new();
                for (k, n) in [(0usize, 4usize), (1, 6)] {
                    let f = flat(&st.tensors[&factor_key(0, k)]);
                    let p = flat(&st.tensors[&inv_factor_key(0, k)]);
                    let mut a: Vec<f64> = f.iter().map(|x| x / bc2).collect();
                    for i in 0..n {
                        a[i * n + i] += eps;
                    }
                    let mut pp = p.clone();
                    for _ in 1..power {
                        pp = mm(&pp, &p, n, n, n);
                    }
                    let dev = max_dev_from_identity(&mm(&pp, &a, n, n, n), n);
                    assert!(
                        dev < 1e-6,
                        "power {power} factor {k}: |P^r A − I| = {dev:e}"
                    );
                    p_side.push(p);
                }
                let g = flat(&g["w"]);
                let want = mm(&mm(&p_side[0], &g, 4, 4, 6), &p_side[1], 4, 6, 6);
                let after = params(&opt)["w"].clone();
                for k in 0..24 {
                    let got = (before[k] - after[k]) / 0.1;
                    assert!(
                        (got - want[k]).abs() < 1e-9 * (1.0 + want[k].abs()),
                        "power {power} step {t}: {got} vs {}",
                        want[k]
                    );
                }
            }
        }
        // A per-dim override with exponent 0 leaves that dim without a factor.
        let mut cfg = toml("inverse_exponent_override = { 3 = { 0 = 0.0, 2 = 0.5 } }");
        cfg.target_parameter_dimensionality = DimLimit::Inf;
        let shapes: Shapes<'_> = &[("x", &[2, 3, 4])];
        let mut opt = driver(shampoo(cfg), shapes, DType::F64);
        opt.step_named(&grads(shapes, 1, DType::F64)).unwrap();
        let keys: Vec<&String> = opt.param_state("x").unwrap().tensors.keys().collect();
        assert_eq!(
            keys,
            vec![
                "block0.factor_matrix.1",
                "block0.factor_matrix.2",
                "block0.inv_factor_matrix.1",
                "block0.inv_factor_matrix.2",
                "filtered_grad"
            ]
        );
    }

    #[test]
    fn blocks_are_independent_problems() {
        // A (6,10) matrix and a (10,) vector cut at 4 ≡ one parameter per block.
        let base = ShampooConfig {
            lr: 0.02,
            betas: (0.9, 0.99),
            epsilon: 1e-6,
            precondition_frequency: 2,
            target_parameter_dimensionality: DimLimit::Inf,
            grafting_config: Grafting::Adam {
                beta2: 0.99,
                epsilon: 1e-8,
                drop_weighting_factor_on_gsquare: false,
            },
            weight_decay: 0.01,
            ..Default::default()
        };
        let blocked = ShampooConfig {
            max_preconditioner_dim: DimLimit::Finite(4),
            ..base.clone()
        };
        let whole = ShampooConfig {
            max_preconditioner_dim: DimLimit::Inf,
            ..base
        };
        for dtype in [DType::F64, DType::F32] {
            let shapes: Shapes<'_> = &[("m", &[6, 10]), ("v", &[10])];
            let mut a = driver(shampoo(blocked.clone()), shapes, dtype);
            let st_ranges = Blocks::new(&[6, 10], 4).unwrap();
            let v_ranges = Blocks::new(&[10], 4).unwrap();
            let init = a.vars();
            let mut pieces: Vec<(String, Var)> = Vec::new();
            for (n, v) in &init {
                let b = if n == "m" { &st_ranges } else { &v_ranges };
                for (i, part) in b.split(v.as_tensor()).unwrap().into_iter().enumerate() {
                    pieces.push((
                        format!("{n}{i}"),
                        Var::from_tensor(&part.copy().unwrap()).unwrap(),
                    ));
                }
            }
            let mut b =
                Driver::new(shampoo(whole.clone()), NamedParams::new(pieces).unwrap()).unwrap();
            for t in 1..=6 {
                let g = grads(shapes, t, dtype);
                a.step_named(&g).unwrap();
                let mut gb = BTreeMap::new();
                for (n, gt) in &g {
                    let bl = if n == "m" { &st_ranges } else { &v_ranges };
                    for (i, part) in bl.split(gt).unwrap().into_iter().enumerate() {
                        gb.insert(format!("{n}{i}"), part);
                    }
                }
                b.step_named(&gb).unwrap();
            }
            let pb = params(&b);
            for (n, v) in a.vars() {
                let bl = if n == "m" { &st_ranges } else { &v_ranges };
                for (i, part) in bl.split(v.as_tensor()).unwrap().iter().enumerate() {
                    let got: Vec<u64> = flat(part).iter().map(|x| x.to_bits()).collect();
                    let want: Vec<u64> =
                        pb[&format!("{n}{i}")].iter().map(|x| x.to_bits()).collect();
                    assert_eq!(got, want, "{dtype:?} {n} block {i}");
                }
            }
            let st = a.param_state("m").unwrap();
            assert_eq!(st.tensors["block2.factor_matrix.1"].dims(), &[2, 2]);
            assert_eq!(st.tensors["block5.inv_factor_matrix.0"].dims(), &[2, 2]);
            assert!(!st.tensors.contains_key("block6.factor_matrix.0"));
            let sv = a.param_state("v").unwrap();
            assert_eq!(sv.tensors["block2.factor_matrix.0"].dims(), &[2, 2]);
        }
    }

    #[test]
    fn default_merging_makes_small_matrices_vectors() {
        let shapes: Shapes<'_> = &[("w", &[3, 5]), ("big", &[3, 400])];
        let mut opt = driver(shampoo(ShampooConfig::default()), shapes, DType::F32);
        opt.step_named(&grads(shapes, 1, DType::F32)).unwrap();
        let st = opt.param_state("w").unwrap();
        assert_eq!(st.tensors["block0.factor_matrix.0"].dims(), &[15, 15]);
        // 3·400 > 1024: kept as a matrix.
        let st = opt.param_state("big").unwrap();
        assert_eq!(st.tensors["block0.factor_matrix.0"].dims(), &[3, 3]);
        assert_eq!(st.tensors["block0.factor_matrix.1"].dims(), &[400, 400]);
    }

    fn degenerate(kind: &str, shape: &[usize], step: u64) -> Vec<f64> {
        let n: usize = shape.iter().product();
        let g = noise(step * 31 + 5, n);
        match kind {
            "zero" => vec![0.0; n],
            "tiny" => g.iter().map(|x| x * 1e-20).collect(),
            "huge" => g.iter().map(|x| x * 1e20).collect(),
            "rank1" => {
                let (r, c) = (shape[0], n / shape[0]);
                let u = noise(step, r);
                let v = noise(step + 99, c);
                (0..n).map(|i| u[i / c] * v[i % c]).collect()
            }
            // Orthogonal rows (scaled identity pattern): GGᵀ ∝ I, all eigenvalues repeated.
            "repeated" => {
                let c = n / shape[0];
                (0..n)
                    .map(|i| {
                        if shape.len() == 1 || i / c == i % c {
                            1.0
                        } else {
                            0.0
                        }
                    })
                    .collect()
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn degenerate_gradients_never_give_silent_nans() {
        let shapes: Shapes<'_> = &[("w", &[4, 6]), ("b", &[5])];
        let f64_factors = ShampooConfig {
            factor_matrix_dtype: FactorDtype::Float64,
            inv_factor_matrix_dtype: FactorDtype::Float64,
            ..Default::default()
        };
        let configs: Vec<(&str, ShampooConfig)> = vec![
            ("default", ShampooConfig::default()),
            ("f64 factors", f64_factors.clone()),
            (
                "adam grafting, half power",
                ShampooConfig {
                    betas: (0.9, 0.999),
                    grafting_config: Grafting::Adam {
                        beta2: 0.999,
                        epsilon: 1e-8,
                        drop_weighting_factor_on_gsquare: false,
                    },
                    inverse_exponent_override: [("2".to_string(), ExponentOverride::All(0.5))]
                        .into_iter()
                        .collect(),
                    target_parameter_dimensionality: DimLimit::Inf,
                    ..f64_factors.clone()
                },
            ),
            (
                "momentum, no perturbation",
                ShampooConfig {
                    iterate_averaging_config: IterateAveraging::ClassicMomentum {
                        momentum: 0.9,
                        dampening: 0.1,
                        use_nesterov: false,
                    },
                    amortized_computation_config: AmortizedComputation::Eigen {
                        perturb_before_computation: false,
                    },
                    use_trace_scaling: true,
                    ..ShampooConfig::default()
                },
            ),
        ];
        for (label, cfg) in configs {
            let all_f64 = cfg.factor_matrix_dtype == FactorDtype::Float64;
            for dtype in [DType::F64, DType::F32] {
                for kind in ["zero", "tiny", "huge", "rank1", "repeated"] {
                    let mut opt = driver(shampoo(cfg.clone()), shapes, dtype);
                    let start = params(&opt);
                    for t in 1..=5 {
                        let g: BTreeMap<String, Tensor> = shapes
                            .iter()
                            .map(|(n, s)| (n.to_string(), tensor(degenerate(kind, s, t), s, dtype)))
                            .collect();
                        let before = bits(&opt);
                        match opt.step_named(&g) {
                            Ok(()) => {
                                for (n, p) in params(&opt) {
                                    assert!(
                                        p.iter().all(|x| x.is_finite()),
                                        "{label} {dtype:?} {kind} step {t}: {n} not finite"
                                    );
                                }
                            }
                            Err(e) => {
                                // Visible, and nothing of that parameter changed.
                                let msg = e.to_string();
                                assert!(msg.contains("NaN or infinity"), "{label} {kind}: {msg}");
                                let after = bits(&opt);
                                let first_failing = msg.contains("`b`") as usize;
                                let name = ["w", "b"][first_failing];
                                assert_eq!(before[name], after[name], "{label} {kind}: {msg}");
                                assert!(
                                    kind == "huge" && (!all_f64 || dtype == DType::F32),
                                    "{label} {dtype:?} {kind}: unexpected error {msg}"
                                );
                                break;
                            }
                        }
                    }
                    if kind == "zero" && cfg.weight_decay == 0.0 {
                        assert_eq!(
                            params(&opt),
                            start,
                            "{label} {dtype:?}: zero gradients moved"
                        );
                    }
                    assert_eq!(
                        opt.diagnostics()["shampoo_failed_amortized_computations"],
                        0.0
                    );
                }
            }
        }
    }

    #[test]
    fn failed_roots_keep_the_previous_root_and_are_counted() {
        let shapes: Shapes<'_> = &[("w", &[3, 4])];
        let good = ShampooConfig {
            betas: (0.0, 1.0),
            epsilon: 1e-6,
            target_parameter_dimensionality: DimLimit::Inf,
            factor_matrix_dtype: FactorDtype::Float64,
            inv_factor_matrix_dtype: FactorDtype::Float64,
            ..Default::default()
        };
        // Coupled Newton with one iteration and an impossible tolerance never converges.
        let failing = ShampooConfig {
            amortized_computation_config: AmortizedComputation::CoupledNewton {
                max_iterations: 1,
                tolerance: 1e-300,
            },
            ..good.clone()
        };
        let mut a = driver(shampoo(good), shapes, DType::F64);
        for t in 1..=2 {
            a.step_named(&grads(shapes, t, DType::F64)).unwrap();
        }
        let roots = |o: &Driver| -> Vec<Vec<u64>> {
            (0..2)
                .map(|k| {
                    flat(&o.param_state("w").unwrap().tensors[&inv_factor_key(0, k)])
                        .iter()
                        .map(|x| x.to_bits())
                        .collect()
                })
                .collect()
        };
        let saved = roots(&a);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        a.save_state(&path).unwrap();
        let vars: Vec<(String, Var)> = a
            .vars()
            .into_iter()
            .map(|(n, v)| (n, Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap()))
            .collect();
        let mut b = Driver::new(shampoo(failing), NamedParams::new(vars).unwrap()).unwrap();
        b.load_state(&path).unwrap();
        for t in 3..=5u64 {
            let before = params(&b)["w"].clone();
            b.step_named(&grads(shapes, t, DType::F64)).unwrap();
            // The previous roots are kept and still used: the parameter moves, finitely.
            assert_eq!(roots(&b), saved, "step {t}");
            let after = params(&b)["w"].clone();
            assert!(after.iter().all(|x| x.is_finite()) && after != before);
            let st = b.param_state("w").unwrap();
            assert_eq!(st.scalar(&counter_key(0)), (t - 2) as f64);
            assert_eq!(
                b.diagnostics()["shampoo_failed_amortized_computations"],
                2.0 * (t - 2) as f64
            );
        }
        // The fourth consecutive failure exceeds the tolerance (3): an error, nothing changed.
        let before = bits(&b);
        let st_before = b.param_state("w").unwrap().deep_clone().unwrap();
        let err = b
            .step_named(&grads(shapes, 6, DType::F64))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("num_tolerated_failed_amortized_computations"),
            "{err}"
        );
        assert_eq!(bits(&b), before);
        let st_after = b.param_state("w").unwrap();
        assert_eq!(st_after.scalars, st_before.scalars);
        for (k, t) in &st_before.tensors {
            assert_eq!(flat(t), flat(&st_after.tensors[k]), "{k}");
        }
        // Without any root yet, a failure keeps the identity (plain SGD direction).
        let cfg = ShampooConfig {
            amortized_computation_config: AmortizedComputation::CoupledNewton {
                max_iterations: 1,
                tolerance: 1e-300,
            },
            lr: 0.1,
            betas: (0.0, 1.0),
            ..Default::default()
        };
        let mut c = driver(shampoo(cfg), shapes, DType::F64);
        let w0 = params(&c)["w"].clone();
        let g = grads(shapes, 1, DType::F64);
        c.step_named(&g).unwrap();
        let g = flat(&g["w"]);
        let w1 = params(&c)["w"].clone();
        for k in 0..w0.len() {
            assert_eq!(w1[k], w0[k] + g[k] * -0.1);
        }
        assert_eq!(
            c.diagnostics()["shampoo_failed_amortized_computations"],
            1.0
        );
    }

    #[test]
    fn save_load_mid_run_is_bit_exact() {
        let shapes: Shapes<'_> = &[("w", &[6, 5]), ("b", &[5]), ("s", &[])];
        let cfg = ShampooConfig {
            lr: 0.01,
            betas: (0.9, 0.99),
            epsilon: 1e-6,
            weight_decay: 0.05,
            precondition_frequency: 3,
            max_preconditioner_dim: DimLimit::Finite(4),
            target_parameter_dimensionality: DimLimit::Finite(2),
            grafting_config: Grafting::Adam {
                beta2: 0.99,
                epsilon: 1e-8,
                drop_weighting_factor_on_gsquare: false,
            },
            iterate_averaging_config: IterateAveraging::ClassicMomentum {
                momentum: 0.9,
                dampening: 0.0,
                use_nesterov: true,
            },
            ..Default::default()
        };
        for dtype in [DType::F64, DType::F32] {
            let mut a = driver(shampoo(cfg.clone()), shapes, dtype);
            let mut b = driver(shampoo(cfg.clone()), shapes, dtype);
            for t in 1..=4 {
                a.step_named(&grads(shapes, t, dtype)).unwrap();
                b.step_named(&grads(shapes, t, dtype)).unwrap();
            }
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("s.safetensors");
            b.save_state(&path).unwrap();
            let vars: Vec<(String, Var)> = b
                .vars()
                .into_iter()
                .map(|(n, v)| (n, Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap()))
                .collect();
            drop(b);
            let mut c = Driver::new(shampoo(cfg.clone()), NamedParams::new(vars).unwrap()).unwrap();
            c.load_state(&path).unwrap();
            for t in 5..=10 {
                a.step_named(&grads(shapes, t, dtype)).unwrap();
                c.step_named(&grads(shapes, t, dtype)).unwrap();
            }
            assert_eq!(bits(&a), bits(&c), "{dtype:?}");
            // f32 factors of an f64 parameter are stored as f64 values.
            let st = c.param_state("w").unwrap();
            assert_eq!(st.tensors["block0.factor_matrix.0"].dtype(), dtype);
        }
    }

    #[test]
    fn state_of_another_blocking_is_refused() {
        let shapes: Shapes<'_> = &[("w", &[6, 5])];
        let cfg = ShampooConfig {
            max_preconditioner_dim: DimLimit::Finite(4),
            target_parameter_dimensionality: DimLimit::Inf,
            ..Default::default()
        };
        let mut a = driver(shampoo(cfg), shapes, DType::F64);
        a.step_named(&grads(shapes, 1, DType::F64)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        a.save_state(&path).unwrap();
        let other = ShampooConfig {
            max_preconditioner_dim: DimLimit::Finite(3),
            target_parameter_dimensionality: DimLimit::Inf,
            ..Default::default()
        };
        let mut b = driver(shampoo(other), shapes, DType::F64);
        let err = b.load_state(&path).unwrap_err().to_string();
        assert!(err.contains("block"), "{err}");
    }

    fn golden_hparams() -> serde_json::Map<String, serde_json::Value> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/shampoo_basic.json"
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        v["hparams"].as_object().unwrap().clone()
    }

    #[test]
    fn reference_hparams_map_and_non_neutral_options_fail() {
        use crate::conformance::map_hparams;
        use serde_json::json;
        let h = golden_hparams();
        let (cfg, _) = map_hparams("shampoo", &h).unwrap();
        let OptimConfig::Shampoo(c) = cfg else {
            panic!("not shampoo")
        };
        assert_eq!(c.target_parameter_dimensionality, DimLimit::Inf);
        assert_eq!(c.factor_matrix_dtype, FactorDtype::Float64);
        assert_eq!(c.precondition_frequency, 2);
        assert!(matches!(c.grafting_config, Grafting::Adam { beta2, .. } if beta2 == 0.95));
        // Variants that map.
        let mapped = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
            let mut h = golden_hparams();
            edit(&mut h);
            map_hparams("shampoo", &h)
        };
        let ok = mapped(&|h| {
            h["iterate_averaging_config"] = json!({"type": "ClassicMomentumConfig",
                "momentum": 0.9, "dampening": 0.0, "use_nesterov": true});
            h["grafting_config"] = json!({"type": "RMSpropPreconditionerConfig", "beta2": 0.9,
                "epsilon": 1e-8, "drop_weighting_factor_on_gsquare": false});
            h["preconditioner_config"]["inverse_exponent_override"] = json!({"2": 0.5});
            h["max_preconditioner_dim"] = json!("inf");
        })
        .unwrap()
        .0;
        let OptimConfig::Shampoo(c) = ok else {
            panic!()
        };
        assert_eq!(c.inverse_exponent(2, 1), 0.5);
        assert_eq!(c.max_preconditioner_dim, DimLimit::Inf);
        assert!(mapped(&|h| h["grafting_config"] = json!(null)).is_ok());
        assert!(
            mapped(&|h| h["grafting_config"] = json!({"type": "SGDPreconditionerConfig"})).is_ok()
        );
        // Non-neutral values of options without an equivalent here fail with a reason.
        type Edit = Box<dyn Fn(&mut serde_json::Map<String, serde_json::Value>)>;
        let bad: Vec<(&str, Edit)> = vec![
            (
                "use_pin_memory",
                Box::new(|h| h["use_pin_memory"] = json!(true)),
            ),
            (
                "shampoo_pt2_compile_config",
                Box::new(|h| {
                    h["shampoo_pt2_compile_config"] = json!({"type": "ShampooPT2CompileConfig"})
                }),
            ),
            (
                "distributed_config",
                Box::new(|h| h["distributed_config"]["type"] = json!("DDPDistributedConfig")),
            ),
            (
                "distributed_config",
                Box::new(|h| h["distributed_config"] = json!(null)),
            ),
            (
                "retry_double_precision",
                Box::new(|h| {
                    h["preconditioner_config"]["amortized_computation_config"]
                        ["retry_double_precision"] = json!(false)
                }),
            ),
            (
                "eigendecomposition_offload_device",
                Box::new(|h| {
                    h["preconditioner_config"]["amortized_computation_config"]
                        ["eigendecomposition_offload_device"] = json!("cpu")
                }),
            ),
            (
                "tolerance",
                Box::new(|h| {
                    h["preconditioner_config"]["amortized_computation_config"]["tolerance"] =
                        json!(0.01)
                }),
            ),
            (
                "EigenvalueCorrectedShampooPreconditionerConfig",
                Box::new(|h| {
                    h["preconditioner_config"]["type"] =
                        json!("EigenvalueCorrectedShampooPreconditionerConfig")
                }),
            ),
            (
                "ScheduleFreeConfig",
                Box::new(|h| h["iterate_averaging_config"] = json!({"type": "ScheduleFreeConfig"})),
            ),
            (
                "CoupledHigherOrderConfig",
                Box::new(
                    |h| h["preconditioner_config"]["amortized_computation_config"] = json!({"type": "CoupledHigherOrderConfig", "rel_epsilon": 0.0, "abs_epsilon": 0.0}),
                ),
            ),
            (
                "bfloat16",
                Box::new(|h| h["preconditioner_config"]["factor_matrix_dtype"] = json!("bfloat16")),
            ),
            (
                "some_new_option",
                Box::new(|h| h["preconditioner_config"]["some_new_option"] = json!(1)),
            ),
            (
                "some_new_option",
                Box::new(|h| {
                    h.insert("some_new_option".into(), json!(1));
                }),
            ),
        ];
        for (what, edit) in bad {
            let err = mapped(&*edit).expect_err(what).to_string();
            assert!(err.contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn golden_case_passes_in_both_dtypes() {
        use crate::conformance::{replay, GoldenCase, Outcome};
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/shampoo_basic.json"
        );
        let case = GoldenCase::load(std::path::Path::new(path)).unwrap();
        for dtype in [DType::F64, DType::F32] {
            match replay(&case, dtype) {
                Outcome::Pass(_) => {}
                Outcome::Fail(why) => panic!("{dtype:?}: {why}"),
            }
        }
    }

    #[test]
    fn pseudo_inverse_and_trace_scaling_run() {
        let shapes: Shapes<'_> = &[("w", &[3, 4])];
        for cfg in [
            toml("epsilon = 0.0\namortized_computation_config = { type = \"pseudo_inverse\" }\nfactor_matrix_dtype = \"float64\""),
            toml("use_trace_scaling = true\nepsilon = 1e-6\nbetas = [0.9, 0.99]"),
            toml("amortized_computation_config = { type = \"coupled_newton\" }\nepsilon = 1e-4\nbetas = [0.0, 0.99]\nfactor_matrix_dtype = \"float64\""),
        ] {
            let mut opt = driver(shampoo(cfg.clone()), shapes, DType::F64);
            for t in 1..=4 {
                opt.step_named(&grads(shapes, t, DType::F64)).unwrap();
            }
            assert!(params(&opt)["w"].iter().all(|x| x.is_finite()), "{cfg:?}");
        }
    }
}
