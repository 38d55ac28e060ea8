//! Shampoo's hyperparameters: DistributedShampoo's names and defaults, its nested configs
//! flattened to TOML-friendly tagged tables, and the checks that name the bad field.

use std::collections::BTreeMap;

use candle_core::DType;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::grafting::Grafting;
use super::Shampoo;
use crate::error::{check, Error, Result};
use crate::linalg::{RootMethod, Stability};
use crate::optim::config::{hyper_accessors, RuleConfig};
use crate::optim::rule::Rule;

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

fn d_qr_iterations() -> usize {
    1
}

/// The most QR-algorithm steps one refresh may take.
pub const MAX_QR_ITERATIONS: usize = 10_000;

/// Which preconditioner Shampoo keeps (DistributedShampoo's `preconditioner_config` classes,
/// by their snake-case names; the class names are accepted too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PreconditionerKind {
    /// `RootInvShampooPreconditionerConfig`: factors `F_k ← β2·F_k + w·G_(k)G_(k)ᵀ`, inverse
    /// roots `P_k` stored at each refresh, direction `Ḡ ×_k P_k`.
    #[default]
    #[serde(alias = "RootInvShampooPreconditionerConfig")]
    RootInv,
    /// `EigendecomposedShampooPreconditionerConfig`: the same factors, `(λ_k, Q_k)` stored at
    /// each refresh and `P_k` rebuilt from them (with the ε shift rule) at every use.
    #[serde(alias = "EigendecomposedShampooPreconditionerConfig")]
    Eigendecomposed,
    /// `EigenvalueCorrectedShampooPreconditionerConfig` (DistributedShampoo's SOAP): Adam run in
    /// the eigenbasis `Q_k` of the factors, with one block-shaped second moment `C`.
    #[serde(alias = "EigenvalueCorrectedShampooPreconditionerConfig")]
    EigenvalueCorrected,
    /// `RootInvKLShampooPreconditionerConfig`: KL-Shampoo's factor update (the gradient whitened
    /// by the other dims' current roots before the outer product), roots as `root_inv`.
    #[serde(alias = "RootInvKLShampooPreconditionerConfig")]
    RootInvKl,
    /// `EigendecomposedKLShampooPreconditionerConfig`: KL-Shampoo's factor update, roots as
    /// `eigendecomposed`.
    #[serde(alias = "EigendecomposedKLShampooPreconditionerConfig")]
    EigendecomposedKl,
}

impl PreconditionerKind {
    /// Factor updates whiten the gradient with the other dims' roots.
    pub fn is_kl(self) -> bool {
        matches!(
            self,
            PreconditionerKind::RootInvKl | PreconditionerKind::EigendecomposedKl
        )
    }

    /// `(λ_k, Q_k)` are stored instead of inverse roots.
    pub fn is_eigendecomposed(self) -> bool {
        matches!(
            self,
            PreconditionerKind::Eigendecomposed | PreconditionerKind::EigendecomposedKl
        )
    }

    /// The reference's class name.
    pub fn class_name(self) -> &'static str {
        match self {
            PreconditionerKind::RootInv => "RootInvShampooPreconditionerConfig",
            PreconditionerKind::Eigendecomposed => "EigendecomposedShampooPreconditionerConfig",
            PreconditionerKind::EigenvalueCorrected => {
                "EigenvalueCorrectedShampooPreconditionerConfig"
            }
            PreconditionerKind::RootInvKl => "RootInvKLShampooPreconditionerConfig",
            PreconditionerKind::EigendecomposedKl => "EigendecomposedKLShampooPreconditionerConfig",
        }
    }
}

/// How inverse roots or eigenbases are computed (the reference's
/// `amortized_computation_config`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AmortizedComputation {
    /// `EigenConfig` / `EighEigendecompositionConfig` with `PerturbationConfig`: full
    /// eigendecomposition of `A + εI` (or of `A`, then shifted, without
    /// `perturb_before_computation`).
    Eigen {
        /// Add `εI` before the decomposition (default true).
        #[serde(default = "d_true")]
        perturb_before_computation: bool,
        /// Adaptive refresh ("Purifying Shampoo"; eigendecomposed and eigenvalue-corrected
        /// preconditioners only): the decomposition is skipped, keeping the basis, when
        /// `B = Qᵀ(A + εI)Q` has `‖B − diag B‖_F ≤ tolerance·‖B‖_F`. Default 0: never skipped
        /// unless `B` is exactly diagonal.
        #[serde(default)]
        tolerance: f64,
    },
    /// `QREigendecompositionConfig` (eigendecomposed and eigenvalue-corrected preconditioners
    /// only): up to `max_iterations` steps of the QR algorithm on `B = Q_oldᵀ(A + εI)Q_old`,
    /// warm-started at the stored basis, then sorted by ascending `diag B`.
    Qr {
        /// Add `εI` before the iteration (default true).
        #[serde(default = "d_true")]
        perturb_before_computation: bool,
        /// QR-algorithm steps per refresh (default 1).
        #[serde(default = "d_qr_iterations")]
        max_iterations: usize,
        /// Stop early once `‖B − diag B‖_F ≤ tolerance·‖B‖_F` (default 0).
        #[serde(default)]
        tolerance: f64,
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
            tolerance: 0.0,
        }
    }
}

impl AmortizedComputation {
    /// The perturbation rule of an eigendecomposition (eigh or QR).
    pub(super) fn perturb_before(&self) -> bool {
        match *self {
            AmortizedComputation::Eigen {
                perturb_before_computation,
                ..
            }
            | AmortizedComputation::Qr {
                perturb_before_computation,
                ..
            } => perturb_before_computation,
            _ => true,
        }
    }

    pub(super) fn method(&self) -> RootMethod {
        match *self {
            AmortizedComputation::Eigen {
                perturb_before_computation,
                ..
            }
            | AmortizedComputation::Qr {
                perturb_before_computation,
                ..
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
///
/// The preconditioner variants take the same table plus `preconditioner`:
///
/// ```toml
/// name = "shampoo"
/// preconditioner = "eigenvalue_corrected"   # or root_inv_kl, eigendecomposed_kl, eigendecomposed
/// betas = [0.9, 0.95]
/// epsilon = 1e-8
/// precondition_frequency = 10
/// amortized_computation_config = { type = "qr" }   # DistributedShampoo's DefaultSOAPConfig
/// ignored_basis_change_dims = { 1 = [0] }          # Adam (no rotation) on vectors
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
    /// Which preconditioner is kept (`root_inv` by default).
    #[serde(alias = "preconditioner_config")]
    pub preconditioner: PreconditionerKind,
    /// Eigenvalue-corrected only: per tensor order, the dims that are not rotated (they get
    /// no factor; `C` keeps the full block shape).
    pub ignored_basis_change_dims: BTreeMap<String, Vec<usize>>,
    /// Precision of the stored eigenbases `Q_k` (eigendecomposed and eigenvalue-corrected) and
    /// of the rotations by them.
    pub factor_matrix_eigenvectors_dtype: FactorDtype,
    /// Precision of the stored eigenvalues `λ_k` (eigendecomposed).
    pub factor_matrix_eigenvalues_dtype: FactorDtype,
    /// Precision of the corrected eigenvalues `C` (eigenvalue-corrected).
    pub corrected_eigenvalues_dtype: FactorDtype,
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
            preconditioner: PreconditionerKind::RootInv,
            ignored_basis_change_dims: BTreeMap::new(),
            factor_matrix_eigenvectors_dtype: FactorDtype::Float32,
            factor_matrix_eigenvalues_dtype: FactorDtype::Float32,
            corrected_eigenvalues_dtype: FactorDtype::Float32,
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
    /// Eigenvalue-corrected: the exponent of the whole block's `C` (default 1/2).
    pub fn inverse_exponent(&self, order: usize, dim: usize) -> f64 {
        let default = if self.preconditioner == PreconditionerKind::EigenvalueCorrected {
            0.5
        } else {
            1.0 / (2.0 * order.max(1) as f64)
        };
        match self.inverse_exponent_override.get(&order.to_string()) {
            None => default,
            Some(ExponentOverride::All(e)) => *e,
            Some(ExponentOverride::PerDim(m)) => {
                m.get(&dim.to_string()).copied().unwrap_or(default)
            }
        }
    }

    /// Eigenvalue-corrected: dim `dim` of an order-`order` block keeps the identity basis.
    pub fn ignores_basis_change(&self, order: usize, dim: usize) -> bool {
        self.ignored_basis_change_dims
            .get(&order.to_string())
            .is_some_and(|dims| dims.contains(&dim))
    }

    /// The checks that depend on the preconditioner kind.
    fn validate_preconditioner(&self) -> Result<()> {
        let kind = self.preconditioner;
        let field = "shampoo.amortized_computation_config";
        let ec = kind == PreconditionerKind::EigenvalueCorrected;
        let check_tolerance = |tolerance: f64| -> Result<()> {
            if tolerance.is_finite() && tolerance >= 0.0 {
                Ok(())
            } else {
                Err(Error::config(
                    format!("{field}.tolerance"),
                    format!("must be finite and >= 0, got {tolerance}"),
                ))
            }
        };
        match self.amortized_computation_config {
            AmortizedComputation::Eigen { tolerance, .. } => {
                check_tolerance(tolerance)?;
                if tolerance != 0.0 && !(ec || kind.is_eigendecomposed()) {
                    return Err(Error::config(
                        format!("{field}.tolerance"),
                        format!(
                            "an adaptive refresh (tolerance > 0) needs an eigendecomposed or \
                             eigenvalue-corrected preconditioner; `{}` stores inverse roots",
                            kind.class_name()
                        ),
                    ));
                }
            }
            AmortizedComputation::Qr {
                max_iterations,
                tolerance,
                ..
            } => {
                if !(ec || kind.is_eigendecomposed()) {
                    return Err(Error::config(
                        field,
                        format!(
                            "the QR eigendecomposition needs an eigendecomposed or \
                             eigenvalue-corrected preconditioner, not `{}`",
                            kind.class_name()
                        ),
                    ));
                }
                check::at_least_one(&format!("{field}.max_iterations"), max_iterations as u64)?;
                // The reference takes any count; a few per refresh is the design (warm starts
                // carry the convergence across refreshes), and a huge one would stall a step.
                if max_iterations > MAX_QR_ITERATIONS {
                    return Err(Error::config(
                        format!("{field}.max_iterations"),
                        format!("must be at most {MAX_QR_ITERATIONS}, got {max_iterations}"),
                    ));
                }
                check_tolerance(tolerance)?;
            }
            AmortizedComputation::PseudoInverse { .. }
            | AmortizedComputation::CoupledNewton { .. } => {
                let allowed = match self.amortized_computation_config {
                    AmortizedComputation::PseudoInverse { .. } => !ec,
                    _ => !ec && !kind.is_eigendecomposed(),
                };
                if !allowed {
                    return Err(Error::config(
                        field,
                        format!(
                            "`{}` takes an eigendecomposition (type = \"eigen\" or \"qr\")",
                            kind.class_name()
                        ),
                    ));
                }
            }
        }
        if ec {
            for (order, value) in &self.inverse_exponent_override {
                if let ExponentOverride::PerDim(_) = value {
                    return Err(Error::config(
                        format!("shampoo.inverse_exponent_override.{order}"),
                        "eigenvalue-corrected Shampoo takes one exponent per tensor order \
                         (for its whole second moment), not a table per dim",
                    ));
                }
            }
        }
        let field = "shampoo.ignored_basis_change_dims";
        if !ec && !self.ignored_basis_change_dims.is_empty() {
            return Err(Error::config(
                field,
                "only the eigenvalue_corrected preconditioner ignores basis changes",
            ));
        }
        for (order, dims) in &self.ignored_basis_change_dims {
            let o = tensor_order(field, order)?;
            if let Some(d) = dims.iter().find(|&&d| d >= o.max(1)) {
                return Err(Error::config(
                    format!("{field}.{order}"),
                    format!("{d} is not a dim of an order-{o} tensor"),
                ));
            }
        }
        Ok(())
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
            let o = tensor_order(field, order)?;
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
}

/// A table key that names a tensor order (`"0"`, `"1"`, …, no sign or leading zeros).
fn tensor_order(field: &str, key: &str) -> Result<usize> {
    key.parse()
        .ok()
        .filter(|o: &usize| o.to_string() == key)
        .ok_or_else(|| {
            Error::config(
                field,
                format!("key `{key}` is not a tensor order (0, 1, 2, ...)"),
            )
        })
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
        self.validate_preconditioner()?;
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
    hyper_accessors!();
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(Shampoo(self.clone())))
    }
}
