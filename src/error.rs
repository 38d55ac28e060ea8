//! One error type for the whole crate: every failure names its cause.

use std::path::PathBuf;

/// Everything that can go wrong in optlab.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range or inconsistent.
    #[error("invalid config: `{field}` {reason}")]
    Config {
        /// Dotted path of the offending field, e.g. `adamw.betas[1]`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A gradient or state tensor does not have the shape of its parameter.
    #[error("shape mismatch for `{param}`: expected {expected:?}, got {got:?}")]
    Shape {
        /// Parameter name.
        param: String,
        /// The parameter's shape.
        expected: Vec<usize>,
        /// The offending shape.
        got: Vec<usize>,
    },
    /// A gradient contains NaN or infinity; no parameter was changed.
    #[error("non-finite gradient for `{param}` at step {step}: the step was refused and no parameter changed")]
    NonFiniteGradient {
        /// Parameter name.
        param: String,
        /// The step that was refused (1-based).
        step: u64,
    },
    /// A dtype the operation does not support.
    #[error("unsupported dtype {dtype:?} for `{what}`: optimizers run in f32 or f64")]
    DType {
        /// What was being processed.
        what: String,
        /// The dtype found.
        dtype: candle_core::DType,
    },
    /// Saved optimizer state does not fit this optimizer.
    #[error("optimizer state: {0}")]
    State(String),
    /// A file could not be read, written or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Parameter grouping is inconsistent (a parameter in no group or in two).
    #[error("parameter groups: {0}")]
    Groups(String),
    /// A numerical failure the optimizer could not recover from.
    #[error("numerical failure: {0}")]
    Numerical(String),
    /// A data analysis (steps-to-target, critical-batch-size fit, power law) cannot be done on
    /// the data given: too few points, a non-positive value, or a degenerate fit.
    #[error("{context}: {reason}")]
    Analysis {
        /// What was being analysed, e.g. ``group `adamw` ``.
        context: String,
        /// What is wrong.
        reason: String,
    },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Anything else, with its message.
    #[error("{0}")]
    Msg(String),
}

/// Result with optlab's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A config error for `field`.
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// An analysis error about `context`.
    pub fn analysis(context: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Analysis {
            context: context.into(),
            reason: reason.into(),
        }
    }

    /// A file error for `path`.
    pub fn file(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

/// Validation helpers shared by every config: each names the field it checks.
pub mod check {
    use super::{Error, Result};

    /// `x >= 0` and finite.
    pub fn non_negative(field: &str, x: f64) -> Result<()> {
        if x.is_finite() && x >= 0.0 {
            Ok(())
        } else {
            Err(Error::config(
                field,
                format!("must be finite and >= 0, got {x}"),
            ))
        }
    }

    /// `x > 0` and finite.
    pub fn positive(field: &str, x: f64) -> Result<()> {
        if x.is_finite() && x > 0.0 {
            Ok(())
        } else {
            Err(Error::config(
                field,
                format!("must be finite and > 0, got {x}"),
            ))
        }
    }

    /// `0 <= x < 1`.
    pub fn unit_interval(field: &str, x: f64) -> Result<()> {
        if (0.0..1.0).contains(&x) {
            Ok(())
        } else {
            Err(Error::config(field, format!("must lie in [0, 1), got {x}")))
        }
    }

    /// `0 <= x <= 1`.
    pub fn closed_unit_interval(field: &str, x: f64) -> Result<()> {
        if (0.0..=1.0).contains(&x) {
            Ok(())
        } else {
            Err(Error::config(field, format!("must lie in [0, 1], got {x}")))
        }
    }

    /// `x >= 1`.
    pub fn at_least_one(field: &str, x: u64) -> Result<()> {
        if x >= 1 {
            Ok(())
        } else {
            Err(Error::config(field, "must be >= 1"))
        }
    }
}
