//! The critical-batch-size fit and the power laws of the critical batch size.
//!
//! Steps to target `S(B)` at batch size `B` are modelled as
//!
//! ```text
//! S(B) = a + b/B          a, b > 0
//! ```
//!
//! (`b/B`: the small-batch regime, where doubling the batch halves the steps; `a`: the floor that
//! no batch size goes below). As in the paper's notebook (`curve_fit(log(a + b/B), log S)`), the
//! fit minimises the squared error of `log S`:
//!
//! ```text
//! F(a, b) = Σ_i (log(a + b/B_i) − log S_i)²
//! ```
//!
//! **Method (variable projection).** Write `c = b/a`. Then `log(a + b/B) = log a + log(1 + c/B)`,
//! so for a fixed `c` the best `log a` is the mean of `log S_i − log(1 + c/B_i)` in closed form,
//! and `F` becomes a function `G(c)` of one variable. `G` is minimised over `t = log c` by a scan
//! of a grid (step 0.05) reaching `e^12` beyond the batch sizes on both sides, which finds the
//! global minimum whatever the starting point, then golden-section search between the best grid
//! point's neighbours and Gauss-Newton polishing (quadratic convergence on exact data). A minimum
//! at either end of the grid is a degenerate fit and an error: at the small end `b/a → 0` (steps
//! do not fall with the batch size), at the large end `a/b → 0` (steps fall linearly over the whole
//! range, so no critical batch size shows in the data).
//!
//! **Critical batch size.** Linear scaling from the reference batch `B0` predicts
//! `S_lin(B) = S(B0)·B0/B`. `B*` is where `S` is 20 % above it, `S(B*) = 1.2·S_lin(B*)`:
//!
//! ```text
//! a·B* + b = 1.2·(a·B0 + b)   ⇒   B* = 1.2·B0 + b/(5a)
//! ```
//!
//! The asymptotic variant takes linear scaling from the small-batch asymptote `b/B` instead:
//! `a + b/B* = 1.2·b/B*`, so `B* = b/(5a)`. The paper uses `B0 = 256` sequences; at small scale
//! pick a batch size inside the linear-scaling regime.
//!
//! **Power laws.** Across groups, `B* = c·X^e` (X the model size `N` or the data size `D`) is
//! fitted by least squares on `(log X, log B*)`, as the paper's `B* = 93.20·N^0.47`.

use serde::Serialize;

use crate::error::{Error, Result};

/// The reference batch size of the paper (sequences of 512 tokens).
pub const DEFAULT_B0: f64 = 256.0;

/// Half-width of the scan of `log(b/a)` beyond the log batch sizes, on each side.
const SCAN_MARGIN: f64 = 12.0;
/// Step of the scan of `log(b/a)`.
const SCAN_STEP: f64 = 0.05;

/// The fit of `S(B) = a + b/B` for one group, with its critical batch sizes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CbsFit {
    /// The floor of the steps to target (large-batch limit), in steps.
    pub a: f64,
    /// The small-batch coefficient, in steps × batch size.
    pub b: f64,
    /// The reference batch size the linear scaling is taken from.
    pub b0: f64,
    /// `1.2·B0 + b/(5a)`: where `S` is 20 % above linear scaling from `B0`.
    pub b_star: f64,
    /// `b/(5a)`: where `S` is 20 % above linear scaling from the small-batch asymptote.
    pub b_star_asymptotic: f64,
    /// Root-mean-square residual of `log S` at the fit.
    pub rmse_log: f64,
    /// Number of `(B, S)` points fitted.
    pub n_points: usize,
}

impl CbsFit {
    /// The fitted steps to target at batch size `batch_size`: `a + b/B`.
    pub fn steps(&self, batch_size: f64) -> f64 {
        self.a + self.b / batch_size
    }

    /// Linear scaling from the reference batch: `S(B0)·B0/B`, with the fitted `S(B0)`.
    pub fn linear_steps(&self, batch_size: f64) -> f64 {
        self.steps(self.b0) * self.b0 / batch_size
    }
}

/// Fits `S(B) = a + b/B` to `points = [(batch_size, steps)]` of the group named `group` (which
/// errors name), with reference batch size `b0`. Needs at least 3 distinct batch sizes, every
/// value finite and positive, and a non-degenerate optimum (see the module documentation).
/// Several points at one batch size are allowed (they are all fitted).
pub fn fit_cbs(group: &str, points: &[(f64, f64)], b0: f64) -> Result<CbsFit> {
    let ctx = || format!("group `{group}`");
    if !(b0.is_finite() && b0 > 0.0) {
        return Err(Error::config(
            "b0",
            format!("must be finite and > 0, got {b0}"),
        ));
    }
    for (i, &(bs, steps)) in points.iter().enumerate() {
        if !(bs.is_finite() && bs > 0.0) {
            return Err(Error::analysis(
                ctx(),
                format!(
                    "point {}: batch size must be finite and > 0, got {bs}",
                    i + 1
                ),
            ));
        }
        if !(steps.is_finite() && steps > 0.0) {
            return Err(Error::analysis(
                ctx(),
                format!(
                    "point {} (batch size {bs}): steps must be finite and > 0, got {steps}",
                    i + 1
                ),
            ));
        }
    }
    let mut distinct: Vec<f64> = points.iter().map(|p| p.0).collect();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    if distinct.len() < 3 {
        return Err(Error::analysis(
            ctx(),
            format!(
                "needs at least 3 distinct batch sizes to fit S(B) = a + b/B, got {} ({:?})",
                distinct.len(),
                distinct
            ),
        ));
    }

    let problem = Projected::new(points);
    let lo = distinct[0].ln() - SCAN_MARGIN;
    let hi = distinct[distinct.len() - 1].ln() + SCAN_MARGIN;
    let n = ((hi - lo) / SCAN_STEP).ceil() as usize + 1;
    let grid = |k: usize| lo + (hi - lo) * k as f64 / (n - 1) as f64;
    let (mut k_best, mut g_best) = (0, f64::INFINITY);
    for k in 0..n {
        let g = problem.objective(grid(k));
        if g < g_best {
            (k_best, g_best) = (k, g);
        }
    }
    if !g_best.is_finite() {
        return Err(Error::analysis(ctx(), "the fit objective is not finite"));
    }
    if k_best == 0 {
        return Err(Error::analysis(
            ctx(),
            "degenerate fit: the best b/a is 0 (steps to target do not fall with the batch \
             size), so there is no linear-scaling regime to measure a critical batch size from",
        ));
    }
    if k_best == n - 1 {
        return Err(Error::analysis(
            ctx(),
            format!(
                "degenerate fit: the best a/b is 0 (steps to target fall linearly in 1/B over \
                 the whole range, b/a > {:.3e}), so the data show no critical batch size; add \
                 larger batch sizes",
                hi.exp()
            ),
        ));
    }
    let t = problem.refine(grid(k_best - 1), grid(k_best + 1));
    let (g, mean) = problem.objective_and_mean(t);
    let a = mean.exp();
    let c = t.exp();
    let b = a * c;
    if !(a.is_finite() && a > 0.0 && b.is_finite() && b > 0.0 && g.is_finite()) {
        return Err(Error::analysis(
            ctx(),
            format!("the fit failed: a = {a}, b = {b}"),
        ));
    }
    Ok(CbsFit {
        a,
        b,
        b0,
        b_star: 1.2 * b0 + c / 5.0,
        b_star_asymptotic: c / 5.0,
        rmse_log: (g / points.len() as f64).sqrt(),
        n_points: points.len(),
    })
}

/// The fit as a function of `t = log(b/a)` alone, `log a` projected out.
struct Projected {
    log_b: Vec<f64>,
    log_s: Vec<f64>,
}

/// `log(1 + e^x)` without overflow or loss of precision.
fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// `1 / (1 + e^-x)`, the derivative of [`softplus`].
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

impl Projected {
    fn new(points: &[(f64, f64)]) -> Self {
        Self {
            log_b: points.iter().map(|p| p.0.ln()).collect(),
            log_s: points.iter().map(|p| p.1.ln()).collect(),
        }
    }

    /// Residuals before centring: `u_i = log S_i − log(1 + e^t/B_i)`.
    fn uncentred(&self, t: f64) -> impl Iterator<Item = f64> + '_ {
        self.log_b
            .iter()
            .zip(&self.log_s)
            .map(move |(lb, ls)| ls - softplus(t - lb))
    }

    /// `(G(t), log a(t))`: the least-squares error with the best `log a` for this `t`, and that
    /// `log a` (the mean of the `u_i`).
    fn objective_and_mean(&self, t: f64) -> (f64, f64) {
        let n = self.log_b.len() as f64;
        let mean = self.uncentred(t).sum::<f64>() / n;
        let g = self.uncentred(t).map(|u| (u - mean) * (u - mean)).sum();
        (g, mean)
    }

    fn objective(&self, t: f64) -> f64 {
        self.objective_and_mean(t).0
    }

    /// Minimises `G` on `[lo, hi]`, a bracket around the best grid point: golden-section search,
    /// then Gauss-Newton steps kept only while they do not increase `G`.
    fn refine(&self, mut lo: f64, mut hi: f64) -> f64 {
        let ratio = (5f64.sqrt() - 1.0) / 2.0;
        let mut x1 = hi - ratio * (hi - lo);
        let mut x2 = lo + ratio * (hi - lo);
        let (mut g1, mut g2) = (self.objective(x1), self.objective(x2));
        for _ in 0..200 {
            if hi - lo <= 1e-10 * (1.0 + lo.abs()) {
                break;
            }
            if g1 <= g2 {
                (hi, x2, g2) = (x2, x1, g1);
                x1 = hi - ratio * (hi - lo);
                g1 = self.objective(x1);
            } else {
                (lo, x1, g1) = (x1, x2, g2);
                x2 = lo + ratio * (hi - lo);
                g2 = self.objective(x2);
            }
        }
        let (mut t, mut g) = if g1 <= g2 { (x1, g1) } else { (x2, g2) };
        for _ in 0..50 {
            let Some(delta) = self.gauss_newton_step(t) else {
                break;
            };
            let g_new = self.objective(t + delta);
            if g_new.is_nan() || g_new > g {
                break;
            }
            (t, g) = (t + delta, g_new);
            if delta.abs() <= 1e-15 * (1.0 + t.abs()) {
                break;
            }
        }
        t
    }

    /// The Gauss-Newton step in `t` for the centred residuals `r_i = u_i − ū`, whose derivatives
    /// are `−(s_i − s̄)` with `s_i = sigmoid(t − log B_i)`.
    fn gauss_newton_step(&self, t: f64) -> Option<f64> {
        let n = self.log_b.len() as f64;
        let s: Vec<f64> = self.log_b.iter().map(|lb| sigmoid(t - lb)).collect();
        let s_mean = s.iter().sum::<f64>() / n;
        let u: Vec<f64> = self.uncentred(t).collect();
        let u_mean = u.iter().sum::<f64>() / n;
        let (mut num, mut den) = (0.0, 0.0);
        for (si, ui) in s.iter().zip(&u) {
            let j = si - s_mean;
            num += j * (ui - u_mean);
            den += j * j;
        }
        let delta = num / den;
        (den > 0.0 && delta.is_finite()).then_some(delta)
    }
}

/// A power law `y = coef · x^exponent`, fitted by least squares on `(log x, log y)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PowerLaw {
    /// `c` in `c·x^e`.
    pub coef: f64,
    /// `e` in `c·x^e`.
    pub exponent: f64,
    /// Number of points fitted.
    #[serde(skip_serializing)]
    pub n_points: usize,
}

impl PowerLaw {
    /// `coef · x^exponent`.
    pub fn eval(&self, x: f64) -> f64 {
        self.coef * x.powf(self.exponent)
    }
}

/// Fits `y = c·x^e` to `points = [(x, y)]` by least squares on the logs; `what` names the
/// relation in errors (e.g. "B* vs n_params"). Needs positive finite values and at least 2
/// distinct `x`.
pub fn fit_power_law(what: &str, points: &[(f64, f64)]) -> Result<PowerLaw> {
    let ctx = || format!("power law {what}");
    for &(x, y) in points {
        if !(x.is_finite() && x > 0.0 && y.is_finite() && y > 0.0) {
            return Err(Error::analysis(
                ctx(),
                format!("values must be finite and > 0, got ({x}, {y})"),
            ));
        }
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0.ln()).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1.ln()).sum::<f64>() / n;
    let (mut sxx, mut sxy) = (0.0, 0.0);
    for &(x, y) in points {
        let dx = x.ln() - mx;
        sxx += dx * dx;
        sxy += dx * (y.ln() - my);
    }
    if points.is_empty() || sxx <= 1e-24 * (1.0 + mx * mx) {
        return Err(Error::analysis(
            ctx(),
            format!(
                "needs at least 2 distinct x values, got {} point(s) that do not spread",
                points.len()
            ),
        ));
    }
    let exponent = sxy / sxx;
    let coef = (my - exponent * mx).exp();
    if !(coef.is_finite() && coef > 0.0 && exponent.is_finite()) {
        return Err(Error::analysis(
            ctx(),
            format!("the fit failed: coef = {coef}, exponent = {exponent}"),
        ));
    }
    Ok(PowerLaw {
        coef,
        exponent,
        n_points: points.len(),
    })
}

/// One observation: steps to target of a group at one batch size, with the group's model and data
/// size when known.
#[derive(Debug, Clone, PartialEq)]
pub struct CbsRow {
    /// The group the point belongs to (an optimizer, a model size...).
    pub group: String,
    /// Batch size (any unit, the same as `b0`).
    pub batch_size: f64,
    /// Steps to target.
    pub steps: f64,
    /// Model size `N` of the group, if given.
    pub n_params: Option<f64>,
    /// Data size `D` of the group, if given.
    pub tokens: Option<f64>,
}

/// The fit of one group.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupFit {
    /// Group name.
    pub group: String,
    /// The fit and its critical batch sizes.
    pub fit: CbsFit,
    /// The group's model size, if given.
    pub n_params: Option<f64>,
    /// The group's data size, if given.
    pub tokens: Option<f64>,
    /// The `(batch_size, steps)` points fitted, in input order.
    pub points: Vec<(f64, f64)>,
}

/// The power laws of `B*` across groups, each present only when computable (at least two
/// groups with distinct values).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PowerLaws {
    /// `B* = c·N^e`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_params: Option<PowerLaw>,
    /// `B* = c·D^e`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<PowerLaw>,
}

/// The analysis of a table of [`CbsRow`]s: one fit per group, in order of first appearance,
/// and the power laws across groups.
#[derive(Debug, Clone, PartialEq)]
pub struct CbsReport {
    /// The reference batch size.
    pub b0: f64,
    /// One fit per group.
    pub groups: Vec<GroupFit>,
    /// Power laws of `B*` against model and data size.
    pub power_laws: PowerLaws,
}

/// Fits every group of `rows` (see [`fit_cbs`]) and the power laws of `B*` against `n_params`
/// and `tokens` over the groups that give them. `n_params` and `tokens` must be the same on every
/// row of a group (or absent on all of them). The first group that cannot be fitted is the error.
pub fn analyze(rows: &[CbsRow], b0: f64) -> Result<CbsReport> {
    let mut order: Vec<&str> = Vec::new();
    for row in rows {
        if !order.contains(&row.group.as_str()) {
            order.push(&row.group);
        }
    }
    if order.is_empty() {
        return Err(Error::analysis("critical batch size", "no data rows"));
    }
    let mut groups = Vec::with_capacity(order.len());
    for name in order {
        let members: Vec<&CbsRow> = rows.iter().filter(|r| r.group == name).collect();
        let n_params = group_constant(name, "n_params", members.iter().map(|r| r.n_params))?;
        let tokens = group_constant(name, "tokens", members.iter().map(|r| r.tokens))?;
        let points: Vec<(f64, f64)> = members.iter().map(|r| (r.batch_size, r.steps)).collect();
        let fit = fit_cbs(name, &points, b0)?;
        groups.push(GroupFit {
            group: name.to_string(),
            fit,
            n_params,
            tokens,
            points,
        });
    }
    let law = |what: &str, x: fn(&GroupFit) -> Option<f64>| -> Result<Option<PowerLaw>> {
        let points: Vec<(f64, f64)> = groups
            .iter()
            .filter_map(|g| x(g).map(|x| (x, g.fit.b_star)))
            .collect();
        let mut xs: Vec<f64> = points.iter().map(|p| p.0).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        if xs.len() < 2 {
            return Ok(None);
        }
        fit_power_law(what, &points).map(Some)
    };
    let power_laws = PowerLaws {
        n_params: law("B* vs n_params", |g| g.n_params)?,
        tokens: law("B* vs tokens", |g| g.tokens)?,
    };
    Ok(CbsReport {
        b0,
        groups,
        power_laws,
    })
}

/// The single value of an optional per-group column, or an error naming the group if its rows
/// disagree.
fn group_constant(
    group: &str,
    column: &str,
    values: impl Iterator<Item = Option<f64>>,
) -> Result<Option<f64>> {
    let values: Vec<Option<f64>> = values.collect();
    let first = values[0];
    if let Some(&other) = values.iter().find(|v| **v != first) {
        let show = |v: Option<f64>| v.map_or_else(|| "empty".to_string(), |x| x.to_string());
        return Err(Error::analysis(
            format!("group `{group}`"),
            format!(
                "`{column}` must be the same on every row of a group, found {} and {}",
                show(first),
                show(other)
            ),
        ));
    }
    if let Some(x) = first {
        if !(x.is_finite() && x > 0.0) {
            return Err(Error::analysis(
                format!("group `{group}`"),
                format!("`{column}` must be finite and > 0, got {x}"),
            ));
        }
    }
    Ok(first)
}

/// The JSON summary: exactly the fields below, in this order.
#[derive(Serialize)]
struct JsonReport<'a> {
    groups: Vec<JsonGroup<'a>>,
    power_laws: &'a PowerLaws,
}

#[derive(Serialize)]
struct JsonGroup<'a> {
    group: &'a str,
    a: f64,
    b: f64,
    b_star: f64,
    b_star_asymptotic: f64,
}

impl CbsReport {
    /// The machine-readable summary:
    /// `{"groups":[{"group","a","b","b_star","b_star_asymptotic"}...],
    /// "power_laws":{"n_params":{"coef","exponent"},"tokens":{...}}}`, a power law present only
    /// when computable.
    pub fn to_json(&self) -> String {
        let report = JsonReport {
            groups: self
                .groups
                .iter()
                .map(|g| JsonGroup {
                    group: &g.group,
                    a: g.fit.a,
                    b: g.fit.b,
                    b_star: g.fit.b_star,
                    b_star_asymptotic: g.fit.b_star_asymptotic,
                })
                .collect(),
            power_laws: &self.power_laws,
        };
        // Only finite floats and strings: serialisation cannot fail.
        serde_json::to_string_pretty(&report).unwrap_or_default()
    }

    /// A human-readable table of the fits and the power laws.
    pub fn to_table(&self) -> String {
        let width = self
            .groups
            .iter()
            .map(|g| g.group.chars().count())
            .max()
            .unwrap_or(0)
            .max(5);
        let mut out = format!(
            "S(B) = a + b/B fitted on log S; B* = 1.2*B0 + b/(5a) with B0 = {}\n\n",
            self.b0
        );
        out += &format!(
            "{:<width$}  {:>6}  {:>11}  {:>11}  {:>11}  {:>11}  {:>9}\n",
            "group", "points", "a", "b", "B*", "b/(5a)", "rmse(lnS)"
        );
        for g in &self.groups {
            let f = &g.fit;
            out += &format!(
                "{:<width$}  {:>6}  {:>11}  {:>11}  {:>11}  {:>11}  {:>9.4}\n",
                g.group,
                f.n_points,
                num(f.a),
                num(f.b),
                num(f.b_star),
                num(f.b_star_asymptotic),
                f.rmse_log
            );
        }
        for (label, symbol, law) in [
            ("n_params", "N", &self.power_laws.n_params),
            ("tokens", "D", &self.power_laws.tokens),
        ] {
            let given = self
                .groups
                .iter()
                .filter(|g| {
                    if label == "n_params" {
                        g.n_params.is_some()
                    } else {
                        g.tokens.is_some()
                    }
                })
                .count();
            match law {
                Some(law) => {
                    out += &format!(
                        "\nB* = {} * {symbol}^{:.4}   ({label}, {} groups)",
                        num(law.coef),
                        law.exponent,
                        law.n_points
                    );
                }
                None if given > 0 => {
                    out += &format!(
                        "\nB* vs {label}: not fitted (needs at least 2 groups with distinct \
                         {label})"
                    );
                }
                None => {}
            }
        }
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out
    }
}

/// A number in at most 11 characters with 6 significant digits: fixed point when moderate,
/// scientific otherwise.
fn num(x: f64) -> String {
    let a = x.abs();
    if x != 0.0 && x.is_finite() && (1e-3..1e6).contains(&a) {
        let decimals = (5 - a.log10().floor() as i32).max(0) as usize;
        format!("{x:.decimals$}")
    } else {
        format!("{x:.4e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BATCHES: [f64; 7] = [64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0];

    fn exact(a: f64, b: f64) -> Vec<(f64, f64)> {
        BATCHES.iter().map(|&bs| (bs, a + b / bs)).collect()
    }

    fn rel(x: f64, y: f64) -> f64 {
        ((x - y) / y).abs()
    }

    #[test]
    fn recovers_exact_parameters() {
        for (a, b) in [
            (1000.0, 2.0e6),
            (250.0, 1.0e5),
            (3.0e4, 1.0e9),
            (12.5, 640.0),
        ] {
            let fit = fit_cbs("g", &exact(a, b), 256.0).unwrap();
            assert!(rel(fit.a, a) < 1e-9, "a: {} vs {a}", fit.a);
            assert!(rel(fit.b, b) < 1e-9, "b: {} vs {b}", fit.b);
            assert!(rel(fit.b_star, 1.2 * 256.0 + b / (5.0 * a)) < 1e-9);
            assert!(rel(fit.b_star_asymptotic, b / (5.0 * a)) < 1e-9);
            assert!(fit.rmse_log < 1e-9);
            assert_eq!(fit.n_points, BATCHES.len());
        }
    }

    #[test]
    fn b_star_is_twenty_percent_above_linear_scaling() {
        let fit = fit_cbs("g", &exact(800.0, 3.0e6), 128.0).unwrap();
        let bs = fit.b_star;
        assert!(rel(fit.steps(bs), 1.2 * fit.linear_steps(bs)) < 1e-12);
        let asym = fit.b_star_asymptotic;
        assert!(rel(fit.steps(asym), 1.2 * fit.b / asym) < 1e-12);
    }

    #[test]
    fn noisy_data() {
        // Deterministic multiplicative noise of up to ±5 %, two points per batch size.
        let (a, b) = (2000.0, 4.0e6);
        let noise = crate::testing::lcg_from_state(12345, 2 * BATCHES.len());
        let points: Vec<(f64, f64)> = BATCHES
            .iter()
            .flat_map(|&bs| [bs, bs])
            .zip(noise)
            .map(|(bs, u)| (bs, (a + b / bs) * (1.0 + 0.05 * u)))
            .collect();
        let fit = fit_cbs("noisy", &points, 256.0).unwrap();
        assert!(rel(fit.a, a) < 0.15, "a = {}", fit.a);
        assert!(rel(fit.b, b) < 0.1, "b = {}", fit.b);
        assert!(fit.rmse_log > 0.0 && fit.rmse_log < 0.05);
        // The fit is a minimum of F: nudging a or b in any direction does not lower it.
        let f = |a: f64, b: f64| -> f64 {
            points
                .iter()
                .map(|&(bs, s)| ((a + b / bs).ln() - s.ln()).powi(2))
                .sum()
        };
        let best = f(fit.a, fit.b);
        for (da, db) in [
            (1.0, 0.0),
            (-1.0, 0.0),
            (0.0, 1.0),
            (0.0, -1.0),
            (1.0, 1.0),
            (1.0, -1.0),
        ] {
            let h = 1e-4;
            assert!(f(fit.a * (1.0 + h * da), fit.b * (1.0 + h * db)) >= best);
        }
    }

    #[test]
    fn errors_name_the_group() {
        let msg = |r: Result<CbsFit>| r.unwrap_err().to_string();
        let two = [(64.0, 100.0), (128.0, 60.0), (64.0, 110.0)];
        let m = msg(fit_cbs("adamw", &two, 256.0));
        assert!(
            m.contains("group `adamw`") && m.contains("3 distinct"),
            "{m}"
        );
        let m = msg(fit_cbs(
            "soap",
            &[(64.0, 1.0), (0.0, 1.0), (256.0, 1.0)],
            256.0,
        ));
        assert!(
            m.contains("group `soap`") && m.contains("batch size"),
            "{m}"
        );
        let m = msg(fit_cbs(
            "soap",
            &[(64.0, 1.0), (128.0, -3.0), (256.0, 1.0)],
            256.0,
        ));
        assert!(m.contains("steps must be finite and > 0"), "{m}");
        let m = msg(fit_cbs(
            "nan",
            &[(64.0, 1.0), (128.0, f64::NAN), (256.0, 1.0)],
            256.0,
        ));
        assert!(m.contains("group `nan`"), "{m}");
        // Flat: no linear-scaling regime.
        let flat: Vec<(f64, f64)> = BATCHES.iter().map(|&bs| (bs, 500.0)).collect();
        let m = msg(fit_cbs("flat", &flat, 256.0));
        assert!(
            m.contains("group `flat`") && m.contains("degenerate"),
            "{m}"
        );
        // Rising with the batch size: worse than flat, still degenerate.
        let rising: Vec<(f64, f64)> = BATCHES.iter().map(|&bs| (bs, bs)).collect();
        assert!(msg(fit_cbs("rising", &rising, 256.0)).contains("degenerate"));
        // Perfect linear scaling: no critical batch size in the data.
        let linear: Vec<(f64, f64)> = BATCHES.iter().map(|&bs| (bs, 1e6 / bs)).collect();
        let m = msg(fit_cbs("linear", &linear, 256.0));
        assert!(
            m.contains("group `linear`") && m.contains("a/b is 0"),
            "{m}"
        );
        assert!(msg(fit_cbs("g", &exact(1.0, 1.0), 0.0)).contains("b0"));
        assert!(msg(fit_cbs("g", &[], 256.0)).contains("3 distinct"));
    }

    #[test]
    fn power_law() {
        let points: Vec<(f64, f64)> = [1e6, 4e6, 1.6e7, 6.4e7]
            .iter()
            .map(|&n: &f64| (n, 93.2 * n.powf(0.47)))
            .collect();
        let law = fit_power_law("B* vs n_params", &points).unwrap();
        assert!(rel(law.coef, 93.2) < 1e-9 && rel(law.exponent, 0.47) < 1e-12);
        assert!(rel(law.eval(2e6), 93.2 * 2e6f64.powf(0.47)) < 1e-9);
        let m = fit_power_law("B* vs tokens", &[(5.0, 1.0), (5.0, 2.0)])
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("B* vs tokens") && m.contains("2 distinct"),
            "{m}"
        );
        assert!(fit_power_law("x", &[(1.0, 1.0), (-2.0, 1.0)]).is_err());
        assert!(fit_power_law("x", &[]).is_err());
    }

    fn rows(group: &str, a: f64, b: f64, n: Option<f64>, d: Option<f64>) -> Vec<CbsRow> {
        exact(a, b)
            .into_iter()
            .map(|(batch_size, steps)| CbsRow {
                group: group.into(),
                batch_size,
                steps,
                n_params: n,
                tokens: d,
            })
            .collect()
    }

    #[test]
    fn analysis_over_groups() {
        // b/(5a) = 0.2·k·N^0.5 so B* − 1.2·B0 follows an exact power law in N.
        let sizes: [f64; 3] = [1e6, 4e6, 1.6e7];
        let mut all = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let a = 1000.0;
            let b = 5.0 * a * 0.3 * n.sqrt();
            all.extend(rows(&format!("m{i}"), a, b, Some(n), Some(20.0 * n)));
        }
        let report = analyze(&all, 256.0).unwrap();
        assert_eq!(report.groups.len(), 3);
        assert_eq!(report.groups[1].group, "m1");
        for (g, &n) in report.groups.iter().zip(&sizes) {
            assert!(rel(g.fit.b_star_asymptotic, 0.3 * n.sqrt()) < 1e-9);
        }
        let law = report.power_laws.n_params.unwrap();
        let direct = fit_power_law(
            "check",
            &report
                .groups
                .iter()
                .map(|g| (g.n_params.unwrap(), g.fit.b_star))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!(law, direct);
        assert!(report.power_laws.tokens.is_some());

        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(keys, ["groups", "power_laws"]);
        let g0 = json["groups"][0].as_object().unwrap();
        let mut keys: Vec<&str> = g0.keys().map(|k| k.as_str()).collect();
        keys.sort();
        assert_eq!(keys, ["a", "b", "b_star", "b_star_asymptotic", "group"]);
        let mut keys: Vec<&String> = json["power_laws"]["n_params"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        keys.sort();
        assert_eq!(keys, ["coef", "exponent"]);
        assert!(report.to_table().contains("B* = "));
    }

    #[test]
    fn power_laws_only_when_computable() {
        let mut all = rows("adamw", 1000.0, 2e6, Some(1e6), None);
        all.extend(rows("soap", 800.0, 3e6, Some(1e6), None));
        let report = analyze(&all, 256.0).unwrap();
        assert_eq!(report.power_laws, PowerLaws::default());
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["power_laws"], serde_json::json!({}));
        assert!(report.to_table().contains("not fitted"));
    }

    #[test]
    fn analysis_errors() {
        assert!(analyze(&[], 256.0).is_err());
        let mut all = rows("adamw", 1000.0, 2e6, Some(1e6), None);
        all[2].n_params = Some(2e6);
        let m = analyze(&all, 256.0).unwrap_err().to_string();
        assert!(m.contains("group `adamw`") && m.contains("n_params"), "{m}");
        let mut all = rows("adamw", 1000.0, 2e6, None, Some(1e7));
        all[0].tokens = None;
        let m = analyze(&all, 256.0).unwrap_err().to_string();
        assert!(m.contains("tokens") && m.contains("empty"), "{m}");
        let mut all = rows("ok", 1000.0, 2e6, None, None);
        all.extend(rows("short", 1000.0, 2e6, None, None).into_iter().take(2));
        let m = analyze(&all, 256.0).unwrap_err().to_string();
        assert!(m.contains("group `short`"), "{m}");
    }
}
