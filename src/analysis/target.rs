//! Steps to a target loss, extracted from evaluation logs.
//!
//! The critical-batch-size code takes, for each run, the first evaluation step whose validation
//! loss is strictly below the target, then the minimum over the runs of a sweep group (the
//! hyperparameter settings tried at one batch size). Runs that never get below the target do not
//! count; a diverged run (NaN or infinite loss) never gets below it.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One evaluation of a run: the optimizer step it was taken after, and the loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Eval {
    /// Optimizer steps taken before this evaluation.
    pub step: u64,
    /// Validation loss at that point.
    pub loss: f64,
}

/// Where a group of runs first reached the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reached {
    /// Steps to target: the smallest first-crossing step over the runs.
    pub steps: u64,
    /// Index (in the order given) of the run that reached it first; the earliest index on ties.
    pub run: usize,
}

/// The step of the first evaluation (in step order, whatever the order of `evals`) whose loss is
/// strictly below `target`, or `None` if no evaluation is. Non-finite losses never count, and a
/// NaN target matches nothing.
pub fn first_step_below(evals: &[Eval], target: f64) -> Option<u64> {
    evals
        .iter()
        .filter(|e| e.loss.is_finite() && e.loss < target)
        .map(|e| e.step)
        .min()
}

/// Steps to `target` over a group of runs: the minimum over runs of [`first_step_below`], with
/// the run that achieved it. `Ok(None)` when no run reaches the target; an error when the target
/// is not finite.
pub fn steps_to_target<'a>(
    runs: impl IntoIterator<Item = &'a [Eval]>,
    target: f64,
) -> Result<Option<Reached>> {
    if !target.is_finite() {
        return Err(Error::analysis(
            "steps to target",
            format!("the target loss must be finite, got {target}"),
        ));
    }
    let mut best: Option<Reached> = None;
    for (run, evals) in runs.into_iter().enumerate() {
        if let Some(steps) = first_step_below(evals, target) {
            if best.is_none_or(|b| steps < b.steps) {
                best = Some(Reached { steps, run });
            }
        }
    }
    Ok(best)
}

/// The loss a run had reached by `step`: that of its last evaluation at or before `step`, or
/// `None` if it has none. This turns a reference run into a target, as the paper does with the
/// loss reached after the Chinchilla-optimal number of steps at the reference batch size.
pub fn loss_reached(evals: &[Eval], step: u64) -> Option<f64> {
    evals
        .iter()
        .filter(|e| e.step <= step)
        .max_by_key(|e| e.step)
        .map(|e| e.loss)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(points: &[(u64, f64)]) -> Vec<Eval> {
        points
            .iter()
            .map(|&(step, loss)| Eval { step, loss })
            .collect()
    }

    #[test]
    fn first_crossing_is_strict_and_in_step_order() {
        // Out of order on purpose; the crossing at step 30 comes first in step order.
        let evals = run(&[(50, 2.0), (10, 4.0), (30, 2.9), (20, 3.0), (40, 3.1)]);
        assert_eq!(first_step_below(&evals, 3.0), Some(30));
        // Equal to the target is not below it.
        assert_eq!(first_step_below(&evals, 2.0), None);
        assert_eq!(first_step_below(&evals, 4.5), Some(10));
        assert_eq!(first_step_below(&[], 1.0), None);
        assert_eq!(first_step_below(&evals, f64::NAN), None);
    }

    #[test]
    fn diverged_evaluations_never_count() {
        let evals = run(&[(10, f64::NAN), (20, f64::NEG_INFINITY), (30, 1.0)]);
        assert_eq!(first_step_below(&evals[..2], 5.0), None);
        assert_eq!(first_step_below(&evals, 5.0), Some(30));
    }

    #[test]
    fn minimum_over_runs() {
        let a = run(&[(100, 3.5), (200, 3.1), (300, 2.9)]);
        let b = run(&[(100, 3.4), (150, 2.95), (300, 2.5)]);
        let c = run(&[(100, 3.9), (200, 3.8)]);
        let got = steps_to_target([a.as_slice(), b.as_slice(), c.as_slice()], 3.0).unwrap();
        assert_eq!(got, Some(Reached { steps: 150, run: 1 }));
        // Ties go to the earliest run.
        let got = steps_to_target([b.as_slice(), b.as_slice()], 3.0).unwrap();
        assert_eq!(got, Some(Reached { steps: 150, run: 0 }));
        let got = steps_to_target([c.as_slice()], 3.0).unwrap();
        assert_eq!(got, None);
        assert!(steps_to_target([a.as_slice()], f64::NAN).is_err());
    }

    #[test]
    fn reference_loss() {
        let evals = run(&[(100, 3.5), (200, 3.1), (400, 2.9)]);
        assert_eq!(loss_reached(&evals, 300), Some(3.1));
        assert_eq!(loss_reached(&evals, 400), Some(2.9));
        assert_eq!(loss_reached(&evals, 99), None);
    }
}
