//! Learning-rate schedules as multipliers of the peak learning rate.
//!
//! A [`Schedule`] maps a 1-based step `t` (the `t`-th call to `step`) to a factor `f(t)`; the
//! training loop passes it to [`Optimizer::set_lr_factor`] before that step, so every group runs
//! at its base lr × `f(t)`. Step 0 (before training) is accepted and gives the warm-up's start.
//!
//! ```toml
//! kind = "warmup_cosine"   # Deconstructing / SOAP: 10 % warm-up from 0.1·lr, cosine to 0.1·lr
//! total_steps = 25000
//! warmup_ratio = 0.1
//! ```
//!
//! All schedules share one warm-up, the OLMo scheduler's `_linear_warmup` (used by both the
//! critical-batch-size code `hlzhang109/critical-batch-size@d30de49` and the Deconstructing code
//! `rosieyzh/optimizers-llm`, `olmo/optim.py`), evaluated at OLMo's `global_step`, which is 1
//! on the first step:
//!
//! ```text
//! f(t) = α0 + (1 − α0) · t / W        for t < W   (W warm-up steps; none when W = 0)
//! ```
//!
//! so the first step runs at α0 + (1 − α0)/W and step W at the peak. α0 (`alpha_0`) is the
//! Deconstructing config's `alpha_0`, and the CBS config's `warmup_min_lr` divided by the peak
//! lr; both default to 0.1, and so does `alpha_0` here. With `alpha_0 = 0` it is the common
//! "(it + 1) / W" warm-up of nanoGPT-style loops.
//!
//! The warm-up length is `warmup_steps`, or `floor(warmup_ratio × R)` where `R` is
//! `warmup_reference_steps` if given, else `total_steps`. The CBS code sets
//! `t_warmup = int(warmup_ratio · chinchilla_samples / B)`: a fraction of the Chinchilla step
//! count at batch size `B`, not of the (longer) run, so set `warmup_reference_steps =
//! chinchilla_samples / B` (a float, as the reference divides in floating point) and
//! `warmup_ratio = 0.25`. Deconstructing warms up for 10 % of the run: `warmup_ratio = 0.1`
//! with `total_steps` as the reference.
//!
//! Factors are computed in f64 in the reference's order of operations, so the warm-up is
//! bit-identical to Deconstructing's `initial_lr · (α0 + (1 − α0) · t / W)` once the driver
//! multiplies by the base lr. The CBS warm-up and every decay phase, which the references compute
//! in lr units rather than as factors, agree to rounding (a few ulps).
//!
//! [`Optimizer::set_lr_factor`]: crate::optim::Optimizer::set_lr_factor

use serde::{Deserialize, Serialize};

use crate::error::{check, Error, Result};
use crate::optim::Optimizer;

/// A learning-rate schedule, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// See [`ConstantSchedule`].
    Constant(ConstantSchedule),
    /// See [`WarmupCosineSchedule`].
    WarmupCosine(WarmupCosineSchedule),
    /// See [`WsdSchedule`].
    Wsd(WsdSchedule),
}

impl Default for Schedule {
    /// A constant factor of 1 (no warm-up).
    fn default() -> Self {
        Schedule::Constant(ConstantSchedule::default())
    }
}

/// Constant learning rate after an optional linear warm-up: the critical-batch-size paper's main
/// protocol (constant + EWA, warm-up `0.25 ×` the Chinchilla steps at that batch size, from
/// `0.1·lr`), OLMo's `ConstantWithWarmupScheduler`.
///
/// ```text
/// f(t) = warm-up(t)   for t < W
///        α_f          for t ≥ total_steps   (only when total_steps is set)
///        1            otherwise
/// ```
///
/// OLMo's constant scheduler returns `alpha_f·lr` once `step ≥ max_duration`, which with its
/// 1-based steps is the run's last step. To reproduce a CBS run to the last step, set
/// `total_steps = max_duration` and `alpha_f = 0.1`; by default (`alpha_f = 1`) the rate stays
/// constant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConstantSchedule {
    /// Warm-up length in steps (exclusive with `warmup_ratio`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// Warm-up length as a fraction of `warmup_reference_steps` (or of `total_steps`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    /// The step count `warmup_ratio` is a fraction of (CBS: Chinchilla samples / batch size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_reference_steps: Option<f64>,
    /// Warm-up start as a fraction of the peak (CBS `warmup_min_lr / lr`, Deconstructing
    /// `alpha_0`).
    pub alpha_0: f64,
    /// Run length, only needed for the final drop to `alpha_f` or as the warm-up reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    /// Factor from step `total_steps` on (1 = no drop).
    pub alpha_f: f64,
}

impl Default for ConstantSchedule {
    fn default() -> Self {
        Self {
            warmup_steps: None,
            warmup_ratio: None,
            warmup_reference_steps: None,
            alpha_0: 0.1,
            total_steps: None,
            alpha_f: 1.0,
        }
    }
}

/// Linear warm-up, then cosine decay from the peak to `alpha_f` at `total_steps`: the
/// Deconstructing and SOAP recipe (warm-up 10 % from 0.1·lr, cosine to 0.1·lr) and the
/// critical-batch-size "cosine" baseline; OLMo's `CosWithWarmup`.
///
/// ```text
/// f(t) = warm-up(t)                                        for t < W
///        α_f + (1 − α_f) · (1 + cos(π (t − W) / (T − W))) / 2   for W ≤ t < T
///        α_f                                               for t ≥ T
/// ```
///
/// with `T = total_steps`. For SOAP's "compressed cosine" runs, set `total_steps` to the
/// compressed length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmupCosineSchedule {
    /// Run length T (the cosine reaches `alpha_f` at step T).
    pub total_steps: u64,
    /// Warm-up length in steps (exclusive with `warmup_ratio`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// Warm-up length as a fraction of `warmup_reference_steps` (or of `total_steps`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    /// The step count `warmup_ratio` is a fraction of (defaults to `total_steps`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_reference_steps: Option<f64>,
    /// Warm-up start as a fraction of the peak.
    pub alpha_0: f64,
    /// Final factor (the floor of the cosine).
    pub alpha_f: f64,
}

impl Default for WarmupCosineSchedule {
    fn default() -> Self {
        Self {
            total_steps: 0,
            warmup_steps: None,
            warmup_ratio: None,
            warmup_reference_steps: None,
            alpha_0: 0.1,
            alpha_f: 0.1,
        }
    }
}

/// How the WSD schedule decays in its last phase, as a function of the decay progress
/// `s = (t − D) / (T − D) ∈ [0, 1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecayShape {
    /// `1 − (1 − α_f)·s`.
    Linear,
    /// `α_f + (1 − α_f)·(1 + cos(π s))/2`.
    Cosine,
    /// `α_f^s`: geometric interpolation from the peak to the floor, the critical-batch-size
    /// code's `WarmupStableDecay` (needs `α_f > 0`).
    #[default]
    Exponential,
}

/// Warm-up, stable at the peak, then decay over the last `decay_ratio` of the run to `alpha_f`:
/// the critical-batch-size paper's WSD (decay ratio 0.1–0.3, exponential to 0.1·lr), OLMo's
/// `WarmupStableDecay` with `t_stable = int((1 − decay_ratio)·max_duration) − t_warmup`.
///
/// ```text
/// D = floor((1 − decay_ratio) · T)
/// f(t) = warm-up(t)               for t < W
///        1                        for W ≤ t < D
///        shape((t − D) / (T − D)) for D ≤ t < T   (1 at t = D)
///        α_f                      for t ≥ T
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsdSchedule {
    /// Run length T.
    pub total_steps: u64,
    /// Warm-up length in steps (exclusive with `warmup_ratio`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// Warm-up length as a fraction of `warmup_reference_steps` (or of `total_steps`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    /// The step count `warmup_ratio` is a fraction of (defaults to `total_steps`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_reference_steps: Option<f64>,
    /// Warm-up start as a fraction of the peak.
    pub alpha_0: f64,
    /// Fraction of the run spent decaying, in [0, 1].
    pub decay_ratio: f64,
    /// Shape of the decay.
    pub decay_shape: DecayShape,
    /// Final factor (the floor of the decay).
    pub alpha_f: f64,
}

impl Default for WsdSchedule {
    fn default() -> Self {
        Self {
            total_steps: 0,
            warmup_steps: None,
            warmup_ratio: None,
            warmup_reference_steps: None,
            alpha_0: 0.1,
            decay_ratio: 0.2,
            decay_shape: DecayShape::Exponential,
            alpha_f: 0.1,
        }
    }
}

/// The warm-up fields every schedule has.
struct WarmupFields {
    steps: Option<u64>,
    ratio: Option<f64>,
    reference: Option<f64>,
    alpha_0: f64,
}

impl WarmupFields {
    /// The warm-up length W, validating the fields (`prefix` names the schedule in errors).
    fn length(&self, prefix: &str, total_steps: Option<u64>) -> Result<u64> {
        check::closed_unit_interval(&format!("{prefix}.alpha_0"), self.alpha_0)?;
        match (self.steps, self.ratio) {
            (Some(_), Some(_)) => Err(Error::config(
                format!("{prefix}.warmup_ratio"),
                "conflicts with warmup_steps: give the warm-up length one way",
            )),
            (Some(w), None) => {
                if self.reference.is_some() {
                    return Err(Error::config(
                        format!("{prefix}.warmup_reference_steps"),
                        "only applies to warmup_ratio",
                    ));
                }
                Ok(w)
            }
            (None, Some(ratio)) => {
                check::closed_unit_interval(&format!("{prefix}.warmup_ratio"), ratio)?;
                let reference = match (self.reference, total_steps) {
                    (Some(r), _) => {
                        check::non_negative(&format!("{prefix}.warmup_reference_steps"), r)?;
                        r
                    }
                    (None, Some(t)) => t as f64,
                    (None, None) => {
                        return Err(Error::config(
                            format!("{prefix}.warmup_ratio"),
                            "needs warmup_reference_steps or total_steps to be a fraction of",
                        ))
                    }
                };
                // `int(ratio * reference)` in the reference: truncation of a non-negative float.
                Ok((ratio * reference).floor() as u64)
            }
            (None, None) => {
                if self.reference.is_some() {
                    return Err(Error::config(
                        format!("{prefix}.warmup_reference_steps"),
                        "only applies to warmup_ratio",
                    ));
                }
                Ok(0)
            }
        }
    }

    /// The warm-up factor at step `t < w` (`w > 0`).
    fn factor(&self, t: u64, w: u64) -> f64 {
        self.alpha_0 + (1.0 - self.alpha_0) * t as f64 / w as f64
    }
}

impl Schedule {
    /// The `kind` tag.
    pub fn kind(&self) -> &'static str {
        match self {
            Schedule::Constant(_) => "constant",
            Schedule::WarmupCosine(_) => "warmup_cosine",
            Schedule::Wsd(_) => "wsd",
        }
    }

    fn prefix(&self) -> String {
        format!("schedule.{}", self.kind())
    }

    fn warmup_fields(&self) -> WarmupFields {
        match self {
            Schedule::Constant(c) => WarmupFields {
                steps: c.warmup_steps,
                ratio: c.warmup_ratio,
                reference: c.warmup_reference_steps,
                alpha_0: c.alpha_0,
            },
            Schedule::WarmupCosine(c) => WarmupFields {
                steps: c.warmup_steps,
                ratio: c.warmup_ratio,
                reference: c.warmup_reference_steps,
                alpha_0: c.alpha_0,
            },
            Schedule::Wsd(c) => WarmupFields {
                steps: c.warmup_steps,
                ratio: c.warmup_ratio,
                reference: c.warmup_reference_steps,
                alpha_0: c.alpha_0,
            },
        }
    }

    fn total_steps(&self) -> Option<u64> {
        match self {
            Schedule::Constant(c) => c.total_steps,
            Schedule::WarmupCosine(c) => Some(c.total_steps),
            Schedule::Wsd(c) => Some(c.total_steps),
        }
    }

    /// The warm-up length in steps (after resolving `warmup_ratio`); validates the schedule.
    pub fn warmup_len(&self) -> Result<u64> {
        let prefix = self.prefix();
        let w = self.warmup_fields().length(&prefix, self.total_steps())?;
        match self {
            Schedule::Constant(c) => {
                check::closed_unit_interval(&format!("{prefix}.alpha_f"), c.alpha_f)?;
                if let Some(t) = c.total_steps {
                    check::at_least_one(&format!("{prefix}.total_steps"), t)?;
                }
            }
            Schedule::WarmupCosine(c) => {
                check::at_least_one(&format!("{prefix}.total_steps"), c.total_steps)?;
                check::closed_unit_interval(&format!("{prefix}.alpha_f"), c.alpha_f)?;
                if w > c.total_steps {
                    return Err(Error::config(
                        format!("{prefix}.warmup_steps"),
                        format!(
                            "warm-up of {w} steps is longer than total_steps = {}",
                            c.total_steps
                        ),
                    ));
                }
            }
            Schedule::Wsd(c) => {
                check::at_least_one(&format!("{prefix}.total_steps"), c.total_steps)?;
                check::closed_unit_interval(&format!("{prefix}.decay_ratio"), c.decay_ratio)?;
                check::closed_unit_interval(&format!("{prefix}.alpha_f"), c.alpha_f)?;
                if c.decay_shape == DecayShape::Exponential && c.alpha_f <= 0.0 {
                    return Err(Error::config(
                        format!("{prefix}.alpha_f"),
                        "must be > 0 for the exponential decay shape (it interpolates alpha_f^s)",
                    ));
                }
                let d = c.decay_start();
                if w > d {
                    return Err(Error::config(
                        format!("{prefix}.warmup_steps"),
                        format!(
                            "warm-up of {w} steps runs into the decay phase, which starts at \
                             step {d} (decay_ratio = {} of total_steps = {})",
                            c.decay_ratio, c.total_steps
                        ),
                    ));
                }
            }
        }
        Ok(w)
    }

    /// Checks every field, naming the first bad one (`schedule.<kind>.<field>`).
    pub fn validate(&self) -> Result<()> {
        self.warmup_len().map(|_| ())
    }

    /// The lr factor for the 1-based step `step` (the `step`-th optimizer step).
    pub fn factor(&self, step: u64) -> Result<f64> {
        let w = self.warmup_len()?;
        let warm = self.warmup_fields();
        if step < w {
            return Ok(warm.factor(step, w));
        }
        Ok(match self {
            Schedule::Constant(c) => match c.total_steps {
                Some(t) if step >= t => c.alpha_f,
                _ => 1.0,
            },
            Schedule::WarmupCosine(c) => {
                if step >= c.total_steps {
                    c.alpha_f
                } else {
                    let s = (step - w) as f64 / (c.total_steps - w) as f64;
                    cosine(s, c.alpha_f)
                }
            }
            Schedule::Wsd(c) => {
                let d = c.decay_start();
                if step < d {
                    1.0
                } else if step >= c.total_steps {
                    c.alpha_f
                } else {
                    let s = (step - d) as f64 / (c.total_steps - d) as f64;
                    match c.decay_shape {
                        DecayShape::Linear => 1.0 - (1.0 - c.alpha_f) * s,
                        DecayShape::Cosine => cosine(s, c.alpha_f),
                        DecayShape::Exponential => c.alpha_f.powf(s),
                    }
                }
            }
        })
    }

    /// Sets `opt`'s lr factor for the 1-based step `step` (call before that step) and returns it.
    pub fn apply(&self, opt: &mut dyn Optimizer, step: u64) -> Result<f64> {
        let f = self.factor(step)?;
        opt.set_lr_factor(f);
        Ok(f)
    }

    /// Parses a TOML table (with a `kind` key) into a validated schedule.
    pub fn from_toml(text: &str) -> Result<Self> {
        let s: Schedule =
            toml::from_str(text).map_err(|e| Error::config("schedule", e.to_string()))?;
        s.validate()?;
        Ok(s)
    }

    /// Parses a JSON object (with a `kind` key) into a validated schedule.
    pub fn from_json(value: serde_json::Value) -> Result<Self> {
        let s: Schedule =
            serde_json::from_value(value).map_err(|e| Error::config("schedule", e.to_string()))?;
        s.validate()?;
        Ok(s)
    }
}

impl WsdSchedule {
    /// First step of the decay phase, `floor((1 − decay_ratio) · total_steps)` (CBS: the warm-up
    /// plus `t_stable`).
    pub fn decay_start(&self) -> u64 {
        ((1.0 - self.decay_ratio) * self.total_steps as f64).floor() as u64
    }
}

/// Half-cosine from 1 (s = 0) to `floor` (s = 1).
fn cosine(s: f64, floor: f64) -> f64 {
    floor + (1.0 - floor) * (1.0 + (std::f64::consts::PI * s).cos()) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-12, "{a} != {b}");
    }

    fn parse(text: &str) -> Schedule {
        Schedule::from_toml(text).unwrap()
    }

    #[test]
    fn default_is_constant_one() {
        let s = Schedule::default();
        for t in [0, 1, 2, 1000] {
            assert_eq!(s.factor(t).unwrap(), 1.0);
        }
    }

    #[test]
    fn constant_warmup_boundaries() {
        // W = 4 from 0.1: t = 1 → 0.1 + 0.9/4 = 0.325; t = 3 → 0.775; t = 4 → peak.
        let s = parse("kind = \"constant\"\nwarmup_steps = 4");
        close(s.factor(0).unwrap(), 0.1);
        close(s.factor(1).unwrap(), 0.325);
        close(s.factor(2).unwrap(), 0.55);
        close(s.factor(3).unwrap(), 0.775);
        assert_eq!(s.factor(4).unwrap(), 1.0);
        assert_eq!(s.factor(10_000).unwrap(), 1.0);
        // From zero: t / W.
        let s = parse("kind = \"constant\"\nwarmup_steps = 4\nalpha_0 = 0.0");
        close(s.factor(1).unwrap(), 0.25);
        close(s.factor(3).unwrap(), 0.75);
        assert_eq!(s.factor(4).unwrap(), 1.0);
    }

    #[test]
    fn constant_cbs_warmup_ratio_and_last_step_drop() {
        // CBS 151M at B = 256: int(0.25 · 6e6 / 256) = int(5859.375) = 5859.
        let s = parse(
            "kind = \"constant\"\nwarmup_ratio = 0.25\nwarmup_reference_steps = 23437.5\n\
             total_steps = 27000\nalpha_f = 0.1",
        );
        assert_eq!(s.warmup_len().unwrap(), 5859);
        close(s.factor(1).unwrap(), 0.1 + 0.9 / 5859.0);
        assert_eq!(s.factor(5859).unwrap(), 1.0);
        assert_eq!(s.factor(26_999).unwrap(), 1.0);
        assert_eq!(s.factor(27_000).unwrap(), 0.1);
    }

    #[test]
    fn warmup_cosine_boundaries() {
        // T = 10, W = 2, floor 0.1: t = 2 → 1; t = 6 (half-way) → 0.55; t = 10 → 0.1.
        let s = parse("kind = \"warmup_cosine\"\ntotal_steps = 10\nwarmup_ratio = 0.2");
        assert_eq!(s.warmup_len().unwrap(), 2);
        close(s.factor(1).unwrap(), 0.55);
        close(s.factor(2).unwrap(), 1.0);
        close(s.factor(6).unwrap(), 0.55);
        // t = 4: s = 0.25 → 0.1 + 0.9 · (1 + cos(π/4)) / 2.
        close(
            s.factor(4).unwrap(),
            0.1 + 0.9 * (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0,
        );
        close(
            s.factor(9).unwrap(),
            0.1 + 0.9 * (1.0 + (0.875 * std::f64::consts::PI).cos()) / 2.0,
        );
        assert_eq!(s.factor(10).unwrap(), 0.1);
        assert_eq!(s.factor(11).unwrap(), 0.1);
        // No warm-up, to zero.
        let s = parse("kind = \"warmup_cosine\"\ntotal_steps = 4\nalpha_f = 0.0");
        close(s.factor(0).unwrap(), 1.0);
        close(s.factor(2).unwrap(), 0.5);
        assert_eq!(s.factor(4).unwrap(), 0.0);
    }

    #[test]
    fn deconstructing_warmup_is_bit_exact() {
        // Reference: initial_lr · (α + (1 − α) · min(step, W) / W).
        let s = parse("kind = \"warmup_cosine\"\ntotal_steps = 25000\nwarmup_steps = 2500");
        let lr = 3.16e-3;
        for t in [1u64, 7, 1234, 2499] {
            let reference = lr * (0.1 + (1.0 - 0.1) * t as f64 / 2500.0);
            assert_eq!(lr * s.factor(t).unwrap(), reference);
        }
    }

    #[test]
    fn wsd_boundaries_each_shape() {
        // T = 10, decay_ratio = 0.3 → D = 7; W = 2.
        let base = "kind = \"wsd\"\ntotal_steps = 10\nwarmup_steps = 2\ndecay_ratio = 0.3\n";
        for (shape, at8, at9) in [
            ("linear", 1.0 - 0.9 / 3.0, 1.0 - 0.9 * 2.0 / 3.0),
            (
                "cosine",
                0.1 + 0.9 * (1.0 + (std::f64::consts::PI / 3.0).cos()) / 2.0,
                0.1 + 0.9 * (1.0 + (2.0 * std::f64::consts::PI / 3.0).cos()) / 2.0,
            ),
            (
                "exponential",
                0.1f64.powf(1.0 / 3.0),
                0.1f64.powf(2.0 / 3.0),
            ),
        ] {
            let s = parse(&format!("{base}decay_shape = \"{shape}\""));
            if let Schedule::Wsd(c) = &s {
                assert_eq!(c.decay_start(), 7);
            }
            close(s.factor(1).unwrap(), 0.55);
            assert_eq!(s.factor(2).unwrap(), 1.0);
            assert_eq!(s.factor(6).unwrap(), 1.0);
            close(s.factor(7).unwrap(), 1.0);
            close(s.factor(8).unwrap(), at8);
            close(s.factor(9).unwrap(), at9);
            assert_eq!(s.factor(10).unwrap(), 0.1, "{shape}");
            assert_eq!(s.factor(50).unwrap(), 0.1);
        }
        // The exponential default is the CBS shape: 0.1^0.5 half-way through the decay.
        let s = parse("kind = \"wsd\"\ntotal_steps = 100\ndecay_ratio = 0.2");
        close(s.factor(90).unwrap(), 0.1f64.sqrt());
    }

    #[test]
    fn wsd_decay_start_matches_python_int() {
        // int((1 - 0.1) * 4200) in Python is 3780.
        let c = WsdSchedule {
            total_steps: 4200,
            decay_ratio: 0.1,
            ..Default::default()
        };
        assert_eq!(c.decay_start(), 3780);
        let c = WsdSchedule {
            total_steps: 7,
            decay_ratio: 0.0,
            ..Default::default()
        };
        assert_eq!(c.decay_start(), 7);
        let s = Schedule::Wsd(c);
        assert_eq!(s.factor(6).unwrap(), 1.0);
        assert_eq!(s.factor(7).unwrap(), 0.1);
    }

    #[test]
    fn serde_round_trip_and_unknown_fields() {
        let s = parse("kind = \"wsd\"\ntotal_steps = 100\ndecay_shape = \"linear\"");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["kind"], "wsd");
        assert!(json.get("warmup_steps").is_none());
        assert_eq!(Schedule::from_json(json).unwrap(), s);
        let text = toml::to_string(&s).unwrap();
        assert_eq!(Schedule::from_toml(&text).unwrap(), s);
        let e = Schedule::from_toml("kind = \"wsd\"\ntotal_steps = 100\nwarmup = 3").unwrap_err();
        assert!(e.to_string().contains("warmup"), "{e}");
        let e = Schedule::from_toml("kind = \"linear\"").unwrap_err();
        assert!(e.to_string().contains("linear"), "{e}");
    }

    #[test]
    fn validation_names_the_field() {
        let cases = [
            (
                "kind = \"warmup_cosine\"",
                "schedule.warmup_cosine.total_steps",
            ),
            (
                "kind = \"warmup_cosine\"\ntotal_steps = 10\nalpha_f = 1.5",
                "schedule.warmup_cosine.alpha_f",
            ),
            (
                "kind = \"warmup_cosine\"\ntotal_steps = 10\nwarmup_steps = 11",
                "schedule.warmup_cosine.warmup_steps",
            ),
            (
                "kind = \"constant\"\nwarmup_steps = 3\nwarmup_ratio = 0.1",
                "schedule.constant.warmup_ratio",
            ),
            (
                "kind = \"constant\"\nwarmup_ratio = 0.1",
                "schedule.constant.warmup_ratio",
            ),
            (
                "kind = \"constant\"\nwarmup_steps = 3\nwarmup_reference_steps = 10.0",
                "schedule.constant.warmup_reference_steps",
            ),
            (
                "kind = \"constant\"\nalpha_0 = -0.1",
                "schedule.constant.alpha_0",
            ),
            (
                "kind = \"wsd\"\ntotal_steps = 10\ndecay_ratio = 1.2",
                "schedule.wsd.decay_ratio",
            ),
            (
                "kind = \"wsd\"\ntotal_steps = 10\nalpha_f = 0.0",
                "schedule.wsd.alpha_f",
            ),
            (
                "kind = \"wsd\"\ntotal_steps = 10\ndecay_ratio = 0.5\nwarmup_steps = 6",
                "schedule.wsd.warmup_steps",
            ),
        ];
        for (text, field) in cases {
            match Schedule::from_toml(text) {
                Err(Error::Config { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: expected a config error, got {other:?}"),
            }
        }
        // Linear decay to zero is fine.
        parse("kind = \"wsd\"\ntotal_steps = 10\nalpha_f = 0.0\ndecay_shape = \"linear\"");
    }
}
