//! Hyperparameter warm-up schedules shared by AdEMAMix and Simplified-AdEMAMix.
//!
//! Both reference implementations ramp a coefficient over the first `T` steps of a parameter and
//! then hold its final value. `t` is the parameter's 1-based step (the first update already uses
//! `t = 1`), and for `t ≥ T` the end value is returned exactly, not recomputed through the ramp.
//!
//! * [`linear`]: `(1 − t/T)·start + (t/T)·end`.
//! * [`half_life`]: a momentum β is ramped *linearly in its half-life*: with
//!   `f(β) = ln ½ / ln(β + 1e-8) − 1` (half-life in steps, minus one) and
//!   `f⁻¹(x) = ½^{1/(x + 1)}`, the value is `f⁻¹((1 − t/T)·f(start) + (t/T)·f(end))`.
//!   The `+1e-8` inside the logarithm is part of the reference (it keeps `f(0)` finite and
//!   moves `f(0.9999)` by 1e-4 relative), so it is kept here.
//!
//! Reference: `apple/ml-ademamix` `pytorch/ademamix.py` @ c3d73c0 (`linear_warmup_scheduler`,
//! `linear_hl_warmup_scheduler`), reused by `DepenM/Simplified-AdEMAMix` @ dba14d0.

/// The offset inside the logarithm of [`half_life_of`].
pub const HALF_LIFE_EPS: f64 = 1e-8;

/// Linear ramp from `start` to `end` over `warmup` steps, evaluated at the 1-based step `t`.
pub fn linear(t: u64, end: f64, start: f64, warmup: u64) -> f64 {
    if t < warmup {
        let a = t as f64 / warmup as f64;
        (1.0 - a) * start + a * end
    } else {
        end
    }
}

/// `f(β) = ln ½ / ln(β + 1e-8) − 1`: the half-life of an EMA with decay β, minus one.
pub fn half_life_of(beta: f64) -> f64 {
    0.5f64.ln() / (beta + HALF_LIFE_EPS).ln() - 1.0
}

/// `f⁻¹(x) = ½^{1/(x + 1)}`: the decay whose half-life minus one is `x`.
pub fn beta_of_half_life(x: f64) -> f64 {
    0.5f64.powf(1.0 / (x + 1.0))
}

/// Ramp of a decay rate from `start` to `end`, linear in half-life, over `warmup` steps,
/// evaluated at the 1-based step `t` (exactly `end` once `t ≥ warmup`).
pub fn half_life(t: u64, end: f64, start: f64, warmup: u64) -> f64 {
    if t < warmup {
        let a = t as f64 / warmup as f64;
        beta_of_half_life((1.0 - a) * half_life_of(start) + a * half_life_of(end))
    } else {
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs()
    }

    #[test]
    fn half_life_values_include_the_offset() {
        assert!(close(half_life_of(0.9), 5.5788141727492855, 1e-14));
        assert!(close(half_life_of(0.9999), 6930.818442739692, 1e-12));
        // Without the offset f(0.9999) would be 6930.125...; the offset matters at 1e-4.
        assert!((half_life_of(0.9999) - 6930.125).abs() > 0.5);
        assert!(close(half_life_of(0.0), -0.9623712505420023, 1e-14));
        assert!(close(beta_of_half_life(half_life_of(0.95)), 0.95, 1e-7));
    }

    #[test]
    fn ramps_end_exactly() {
        assert_eq!(linear(10, 8.0, 0.0, 10), 8.0);
        assert_eq!(linear(11, 8.0, 0.0, 10), 8.0);
        assert_eq!(half_life(10, 0.9999, 0.9, 10), 0.9999);
        assert_eq!(half_life(1000, 0.9999, 0.9, 10), 0.9999);
        // No warm-up at all when T = 0 (and no division by zero).
        assert_eq!(linear(1, 8.0, 0.0, 0), 8.0);
        assert_eq!(half_life(1, 0.9999, 0.9, 0), 0.9999);
    }
}
