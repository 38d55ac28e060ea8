//! Statistics over seeds: the spread of a final loss across seeds, the range of learning rates
//! whose loss stays within a tolerance of the best (the Deconstructing paper's "stability"), and
//! percentile bootstrap intervals for quantities fitted from several seeds (such as `B*`).
//!
//! **Learning-rate range.** On a curve of final loss against learning rate, with best loss
//! `L*`, the range is the contiguous interval of learning rates around the best one whose loss is
//! at most `L*·(1 + tol)`. Its ends are interpolated linearly in `(log lr, loss)` between the last
//! grid point inside and the first outside; next to a non-finite (diverged) point the end is the
//! last point inside. An end that reaches the edge of the grid is open: the true range is at
//! least that wide there. The width is `log10(hi / lo)` decades.
//!
//! **Bootstrap.** [`bootstrap_interval`] resamples the seeds with replacement (seeded, so the
//! report is reproducible), recomputes the statistic on each resample and returns the
//! percentile interval; resamples on which the statistic is undefined are left out and
//! counted.

use serde::Serialize;

/// Mean, spread and extremes of one quantity over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SeedStats {
    /// Number of values (seeds).
    pub n: usize,
    /// Mean; infinite when any value is infinite (a diverged seed).
    pub mean: f64,
    /// Sample standard deviation (n − 1); 0 for one value, NaN when any value is not finite.
    pub std: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

/// [`SeedStats`] of `values`; `None` when empty or when a value is NaN.
pub fn seed_stats(values: &[f64]) -> Option<SeedStats> {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let n = values.len();
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if values.iter().any(|v| !v.is_finite()) {
        let mean = values.iter().sum::<f64>();
        return Some(SeedStats {
            n,
            mean,
            std: f64::NAN,
            min,
            max,
        });
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let std = if n > 1 {
        (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    Some(SeedStats {
        n,
        mean,
        std,
        min,
        max,
    })
}

/// The learning rates within a relative tolerance of the best loss on one curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LrRange {
    /// Relative tolerance: the range holds losses up to `best_loss·(1 + tolerance)`.
    pub tolerance: f64,
    /// Learning rate of the lowest loss.
    pub best_lr: f64,
    /// The lowest loss.
    pub best_loss: f64,
    /// Lower end (interpolated).
    pub lo: f64,
    /// Upper end (interpolated).
    pub hi: f64,
    /// `log10(hi / lo)`.
    pub decades: f64,
    /// The lower end is the smallest lr of the grid (the range may extend further).
    pub lo_open: bool,
    /// The upper end is the largest lr of the grid.
    pub hi_open: bool,
}

/// The range of learning rates whose loss is within `tolerance` (relative) of the best, on the
/// curve `points` = `(lr, loss)` (any order; non-finite losses are diverged runs). `None` when
/// no loss is finite, a learning rate is not positive and finite, a learning rate repeats, the
/// best loss is not positive, or the tolerance is negative or not finite.
pub fn lr_range_within(points: &[(f64, f64)], tolerance: f64) -> Option<LrRange> {
    if !(tolerance.is_finite() && tolerance >= 0.0) {
        return None;
    }
    if points
        .iter()
        .any(|&(lr, l)| !(lr.is_finite() && lr > 0.0) || l.is_nan())
    {
        return None;
    }
    let mut pts = points.to_vec();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    if pts.windows(2).any(|w| w[0].0 == w[1].0) {
        return None;
    }
    let (ib, &(best_lr, best_loss)) = pts
        .iter()
        .enumerate()
        .filter(|(_, p)| p.1.is_finite())
        .min_by(|a, b| a.1 .1.total_cmp(&b.1 .1))?;
    if best_loss <= 0.0 {
        return None;
    }
    let thr = best_loss * (1.0 + tolerance);
    let inside = |l: f64| l.is_finite() && l <= thr;
    // The crossing between an inside point `a` and an outside point `b`, in log lr.
    let cross = |a: (f64, f64), b: (f64, f64)| -> f64 {
        if !b.1.is_finite() {
            return a.0;
        }
        let t = (thr - a.1) / (b.1 - a.1);
        (a.0.ln() + t * (b.0.ln() - a.0.ln())).exp()
    };
    let mut i = ib;
    while i > 0 && inside(pts[i - 1].1) {
        i -= 1;
    }
    let (lo, lo_open) = if i == 0 {
        (pts[0].0, true)
    } else {
        (cross(pts[i], pts[i - 1]), false)
    };
    let mut j = ib;
    while j + 1 < pts.len() && inside(pts[j + 1].1) {
        j += 1;
    }
    let (hi, hi_open) = if j + 1 == pts.len() {
        (pts[j].0, true)
    } else {
        (cross(pts[j], pts[j + 1]), false)
    };
    Some(LrRange {
        tolerance,
        best_lr,
        best_loss,
        lo,
        hi,
        decades: (hi / lo).log10(),
        lo_open,
        hi_open,
    })
}

/// A percentile bootstrap interval over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BootstrapInterval {
    /// The statistic on all seeds.
    pub estimate: f64,
    /// Lower percentile (e.g. the 5th for a 90 % interval).
    pub lo: f64,
    /// Upper percentile.
    pub hi: f64,
    /// Coverage of the interval (e.g. 0.9).
    pub level: f64,
    /// Resamples drawn.
    pub resamples: usize,
    /// Resamples on which the statistic was undefined (left out of the percentiles).
    pub undefined: usize,
}

/// A small, seeded generator (SplitMix64), so that intervals do not change between reports.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Percentile bootstrap of `statistic` over `n_seeds` seeds: each resample is a list of seed
/// indices drawn with replacement, passed to `statistic`, which returns `None` where it is
/// undefined (e.g. a fit fails). `None` when there are no seeds, no resamples, the level is not
/// in (0, 1), the statistic is undefined on all seeds, or on every resample.
pub fn bootstrap_interval<F>(
    n_seeds: usize,
    resamples: usize,
    level: f64,
    rng_seed: u64,
    mut statistic: F,
) -> Option<BootstrapInterval>
where
    F: FnMut(&[usize]) -> Option<f64>,
{
    if n_seeds == 0 || resamples == 0 || !(level > 0.0 && level < 1.0) {
        return None;
    }
    let all: Vec<usize> = (0..n_seeds).collect();
    let estimate = statistic(&all).filter(|v| v.is_finite())?;
    let mut rng = SplitMix(rng_seed);
    let mut values = Vec::with_capacity(resamples);
    let mut pick = vec![0usize; n_seeds];
    for _ in 0..resamples {
        for p in pick.iter_mut() {
            *p = rng.below(n_seeds);
        }
        pick.sort_unstable();
        if let Some(v) = statistic(&pick).filter(|v| v.is_finite()) {
            values.push(v);
        }
    }
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let q = |p: f64| -> f64 {
        // Linear interpolation between order statistics (numpy's default).
        let h = p * (values.len() - 1) as f64;
        let (i, f) = (h.floor() as usize, h - h.floor());
        if i + 1 < values.len() {
            values[i] + f * (values[i + 1] - values[i])
        } else {
            values[i]
        }
    };
    let tail = (1.0 - level) / 2.0;
    Some(BootstrapInterval {
        estimate,
        lo: q(tail),
        hi: q(1.0 - tail),
        level,
        resamples,
        undefined: resamples - values.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    }

    #[test]
    fn stats_of_three_seeds() {
        let s = seed_stats(&[2.0, 2.2, 2.4]).unwrap();
        assert_eq!(s.n, 3);
        close(s.mean, 2.2);
        close(s.std, 0.2);
        close(s.min, 2.0);
        close(s.max, 2.4);
        let one = seed_stats(&[3.0]).unwrap();
        close(one.std, 0.0);
        let div = seed_stats(&[2.0, f64::INFINITY]).unwrap();
        assert!(div.mean.is_infinite() && div.std.is_nan());
        assert_eq!(div.max, f64::INFINITY);
        assert!(seed_stats(&[]).is_none());
        assert!(seed_stats(&[1.0, f64::NAN]).is_none());
    }

    #[test]
    fn range_interpolates_in_log_lr() {
        // Best 2.0 at lr 1e-2; threshold 2.02 with tol 1 %.
        let pts = [
            (1e-4, 2.5),
            (1e-3, 2.01),
            (1e-2, 2.0),
            (1e-1, 2.04),
            (1.0, f64::INFINITY),
        ];
        let r = lr_range_within(&pts, 0.01).unwrap();
        close(r.best_lr, 1e-2);
        close(r.best_loss, 2.0);
        // Lower end: between 1e-4 (2.5) and 1e-3 (2.01): t = (2.02-2.01)/(2.5-2.01) toward 1e-4.
        let t = 0.01 / 0.49;
        close(r.lo.log10(), -3.0 - t);
        // Upper end: halfway (in log) from 1e-2 (2.0) to 1e-1 (2.04).
        close(r.hi.log10(), -1.5);
        close(r.decades, 1.5 + t);
        assert!(!r.lo_open && !r.hi_open);
    }

    #[test]
    fn range_is_open_at_the_grid_edges_and_stops_at_divergence() {
        let pts = [(1.0, 2.0), (0.1, 2.001), (10.0, f64::INFINITY)];
        let r = lr_range_within(&pts, 0.01).unwrap();
        assert!(r.lo_open && !r.hi_open);
        close(r.lo, 0.1);
        close(r.hi, 1.0); // a diverged neighbour: the range ends at the last point inside
        close(r.decades, 1.0);
        // Only the contiguous part around the best counts.
        let gap = [(1e-3, 2.0), (1e-2, 3.0), (1e-1, 2.001)];
        let g = lr_range_within(&gap, 0.01).unwrap();
        assert!(g.lo_open && !g.hi_open);
        assert!(g.hi < 1e-2 && g.hi > 1e-3);
        // A single point is a zero-width, open range.
        let s = lr_range_within(&[(1e-3, 2.0)], 0.01).unwrap();
        close(s.decades, 0.0);
        assert!(s.lo_open && s.hi_open);
    }

    #[test]
    fn range_rejects_bad_curves() {
        assert!(lr_range_within(&[], 0.01).is_none());
        assert!(lr_range_within(&[(1e-3, f64::INFINITY)], 0.01).is_none());
        assert!(lr_range_within(&[(0.0, 2.0)], 0.01).is_none());
        assert!(lr_range_within(&[(1e-3, 2.0), (1e-3, 2.1)], 0.01).is_none());
        assert!(lr_range_within(&[(1e-3, f64::NAN)], 0.01).is_none());
        assert!(lr_range_within(&[(1e-3, 2.0)], -0.1).is_none());
        assert!(lr_range_within(&[(1e-3, -1.0)], 0.01).is_none());
    }

    #[test]
    fn bootstrap_of_the_mean() {
        let xs = [1.0, 2.3, 3.1, 4.7, 5.2, 6.9, 7.4, 9.8];
        let mean = |idx: &[usize]| Some(idx.iter().map(|&i| xs[i]).sum::<f64>() / idx.len() as f64);
        let b = bootstrap_interval(xs.len(), 2000, 0.9, 7, mean).unwrap();
        close(b.estimate, 5.05);
        assert!(b.lo < 5.05 && b.hi > 5.05, "{b:?}");
        // The standard error of the mean is about 2.9/√8 ≈ 1.0: a 90 % interval about ±1.7.
        assert!(b.hi - b.lo > 2.5 && b.hi - b.lo < 4.5, "{b:?}");
        assert_eq!(b.undefined, 0);
        // Reproducible: the same seed gives the same interval, another seed another one.
        let again = bootstrap_interval(xs.len(), 2000, 0.9, 7, mean).unwrap();
        assert_eq!(b, again);
        let other = bootstrap_interval(xs.len(), 2000, 0.9, 8, mean).unwrap();
        assert_ne!((b.lo, b.hi), (other.lo, other.hi));
        // Identical seeds: a zero-width interval.
        let c = bootstrap_interval(3, 100, 0.9, 1, |_| Some(5.0)).unwrap();
        close(c.lo, 5.0);
        close(c.hi, 5.0);
    }

    #[test]
    fn bootstrap_counts_undefined_resamples_and_rejects_bad_input() {
        // Undefined whenever a resample repeats a seed: only permutations count.
        let distinct = |idx: &[usize]| {
            let mut v = idx.to_vec();
            v.dedup();
            (v.len() == idx.len()).then_some(1.0)
        };
        let b = bootstrap_interval(3, 500, 0.9, 3, distinct).unwrap();
        assert!(b.undefined > 0 && b.undefined < 500);
        assert!(bootstrap_interval(0, 10, 0.9, 0, |_| Some(1.0)).is_none());
        assert!(bootstrap_interval(3, 0, 0.9, 0, |_| Some(1.0)).is_none());
        assert!(bootstrap_interval(3, 10, 1.0, 0, |_| Some(1.0)).is_none());
        assert!(bootstrap_interval(3, 10, 0.9, 0, |_| None).is_none());
    }
}
