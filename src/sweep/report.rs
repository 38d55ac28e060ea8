//! The sweep report: steps and tokens to target per optimizer and batch size, the optimal
//! learning rate per batch size, loss against learning rate, and the critical-batch-size fit,
//! written as `report.md`, `report.json`, CSVs and plots.
//!
//! **Losses.** Each evaluation's loss is the one `report.metric` names: `ewa` (the default)
//! takes the lowest of the run's EWA averages (the raw loss where an evaluation has none, as at
//! step 0), `raw` the raw parameters', `best` the lowest of both. A run's final loss is that of
//! its last evaluation; a diverged run's is infinite.
//!
//! **Targets** are resolved per scenario (model × budget): a fixed loss as given, a reference
//! target as the lowest loss the reference optimizer reached at the reference batch size, over
//! its runs (the other hyperparameters), at its last evaluation at or before the reference step
//! or token count (its last evaluation by default).
//!
//! **Steps to target** of an optimizer at a batch size is the first evaluation strictly below the
//! target, minimised over the runs of that cell (learning rates, other `set` axes, seeds), as
//! the CBS paper's code extracts it ([`crate::analysis::steps_to_target`]). Tokens to target are
//! the tokens of that evaluation. Only finished and diverged runs count; the report says how
//! many runs are still missing.
//!
//! **Fits.** Per target, each group (an optimizer, with its scenario when the sweep has more
//! than one) gets `S(B) = a + b/B` and `B*` via [`crate::analysis`] with `B0 = report.b0`;
//! groups that cannot be fitted (fewer than 3 batch sizes reaching the target, a degenerate fit)
//! are listed with the reason.
//!
//! **Data size.** A target's data size `D` in a scenario is the token count of its reference
//! (`tokens = D`: the loss the reference batch reached after `D` tokens, as the CBS paper defines
//! its targets) or else the scenario's budget in tokens, when the sweep has a budget axis.
//!
//! **Power laws** of `B*`: per target and optimizer across scenarios, against model size `N`
//! (the non-embedding parameters, with a model axis) and data size `D` (where it differs between
//! scenarios); and per optimizer and scenario across the targets that have a data size, against
//! `D` — with a constant learning rate one set of runs long enough for the largest `D` serves
//! every smaller one, so `B*` against data size needs no budget axis.
//!
//! **Over seeds** (sweeps with more than one seed): steps to each target per cell and seed
//! (each seed minimised over its own runs of the cell, against the pooled target), the fits and
//! power laws repeated on each seed's runs alone, and final loss against learning rate with its
//! stability ranges, each with mean ± standard deviation and a percentile bootstrap interval of
//! the mean over the seeds ([`crate::analysis::seeds`]).
//!
//! Nothing in `report.json` except its `timing` object depends on wall-clock time, so an
//! interrupted and resumed sweep reports exactly what an uninterrupted one does.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::analysis::{
    self, bootstrap_interval, fit_cbs, lr_range_within, seed_stats, BootstrapInterval, CbsRow,
    Eval, LrRange, PowerLaw, SeedStats,
};
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::plots::{
    self, BStarScalingPlot, Layout, LossAxis, LossCurve, LossCurves, LossPoint, LrSensitivityPlot,
    LrSeries, ScalingPoint, StepsSeries, StepsToTargetPlot,
};
use crate::runner::{read_metrics, MetricsLine, Summary};
use crate::sweep::exec::{run_state, RunState};
use crate::sweep::spec::{fmt_g, Budget, Coords, Metric, Plan, CHINCHILLA_TOKENS_PER_PARAM};

/// One evaluation of a run under the report's metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalPoint {
    /// Optimizer steps.
    pub step: u64,
    /// Training tokens.
    pub tokens: u64,
    /// Loss.
    pub loss: f64,
}

/// What the report knows about one run.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Run id.
    pub id: String,
    /// Coordinates.
    #[serde(flatten)]
    pub coords: Coords,
    /// `finished`, `diverged`, `started` or `pending`.
    pub state: String,
    /// Steps taken (as far as recorded).
    pub steps: u64,
    /// Final loss under the metric (`None` when not finished; infinite when diverged).
    pub final_loss: Option<f64>,
    /// Steps to each target (`None`: not reached or not counted).
    pub steps_to_target: Vec<Option<u64>>,
    /// Evaluations under the metric.
    #[serde(skip)]
    pub evals: Vec<EvalPoint>,
    /// Seconds per training step (finished runs).
    #[serde(skip)]
    pub seconds_per_step: Option<f64>,
    /// Non-embedding parameters of the model.
    #[serde(skip)]
    pub n_params: f64,
    /// The data budget of the run's budget entry, in tokens (when it names one).
    #[serde(skip)]
    pub budget_tokens: Option<f64>,
}

impl RunResult {
    fn counted(&self) -> bool {
        self.state == "finished" || self.state == "diverged"
    }
}

/// A target loss and its value per scenario.
#[derive(Debug, Clone, Serialize)]
pub struct TargetValue {
    /// Description.
    pub name: String,
    /// Value per scenario (`""` when the sweep has one scenario); missing where the reference
    /// runs have not finished.
    pub values: BTreeMap<String, f64>,
    /// Data size `D` in tokens per scenario (see the module docs); empty when the target has
    /// none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tokens: BTreeMap<String, f64>,
}

/// Steps to target of one optimizer at one batch size in one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct CellResult {
    /// Target index.
    pub target: usize,
    /// Scenario.
    pub scenario: String,
    /// Optimizer label.
    pub optimizer: String,
    /// Batch size (sequences).
    pub batch_size: usize,
    /// Steps to target (minimum over the cell's runs).
    pub steps: u64,
    /// Tokens at that evaluation.
    pub tokens: u64,
    /// Learning rate of the run that got there first.
    pub lr: f64,
    /// Its id.
    pub run: String,
}

/// The learning rate with the lowest final loss in one cell.
#[derive(Debug, Clone, Serialize)]
pub struct BestLr {
    /// Scenario.
    pub scenario: String,
    /// Optimizer label.
    pub optimizer: String,
    /// Batch size.
    pub batch_size: usize,
    /// The best learning rate.
    pub lr: f64,
    /// Its final loss.
    pub final_loss: f64,
    /// Its run id.
    pub run: String,
}

/// Final loss against learning rate in one cell (minimum over the other axes per lr).
#[derive(Debug, Clone, Serialize)]
pub struct LrCurve {
    /// Scenario.
    pub scenario: String,
    /// Optimizer label.
    pub optimizer: String,
    /// Batch size.
    pub batch_size: usize,
    /// `(lr, final loss)`, ascending lr; diverged runs have an infinite loss (`null` in JSON).
    pub points: Vec<(f64, f64)>,
}

/// Final loss at one learning rate over the seeds of a cell.
#[derive(Debug, Clone, Serialize)]
pub struct LrSeedPoint {
    /// Learning rate.
    pub lr: f64,
    /// `(seed, final loss)` per seed (minimum over the other axes), ascending seed; diverged
    /// runs have an infinite loss.
    pub per_seed: Vec<(u64, f64)>,
    /// Mean, spread and extremes over the seeds.
    pub stats: SeedStats,
}

/// Final loss against learning rate in one cell, over seeds (sweeps with more than one seed).
#[derive(Debug, Clone, Serialize)]
pub struct LrSeedCurve {
    /// Scenario.
    pub scenario: String,
    /// Optimizer label.
    pub optimizer: String,
    /// Batch size.
    pub batch_size: usize,
    /// Ascending learning rate.
    pub points: Vec<LrSeedPoint>,
}

/// The learning rates within a tolerance of the best loss in one cell: on the curve of the
/// mean over seeds, and per seed.
#[derive(Debug, Clone, Serialize)]
pub struct LrStability {
    /// Scenario.
    pub scenario: String,
    /// Optimizer label.
    pub optimizer: String,
    /// Batch size.
    pub batch_size: usize,
    /// Relative tolerance.
    pub tolerance: f64,
    /// The range on the mean-over-seeds curve.
    pub mean_curve: LrRange,
    /// The loss over seeds at the best learning rate of the mean curve.
    pub best: SeedStats,
    /// Width in decades of each seed's own range, over the seeds.
    pub seed_decades: Option<SeedStats>,
    /// Each seed's best learning rate, ascending seed.
    pub seed_best_lrs: Vec<f64>,
}

/// Relative tolerances of the learning-rate ranges in the report: 1 % (the Deconstructing
/// comparison) and 5 %.
pub const LR_RANGE_TOLERANCES: [f64; 2] = [0.01, 0.05];

/// Resamples and coverage of the bootstrap intervals over seeds.
pub const SEED_BOOTSTRAP: (usize, f64) = (2000, 0.9);

/// One group's critical batch size over seeds: the fit repeated on each seed's runs alone
/// (each seed with its own reference targets), for one target.
#[derive(Debug, Clone, Serialize)]
pub struct SeedCbs {
    /// Target index.
    pub target: usize,
    /// Group (optimizer, or optimizer/scenario).
    pub group: String,
    /// Optimizer label.
    pub optimizer: String,
    /// Scenario.
    pub scenario: String,
    /// `(seed, B*, b/(5a))` of each seed whose fit succeeded.
    pub per_seed: Vec<(u64, f64, f64)>,
    /// `B*` over those seeds.
    pub b_star: SeedStats,
    /// `b/(5a)` over those seeds.
    pub b_star_asymptotic: SeedStats,
    /// Percentile bootstrap interval (over the seeds) of the mean `B*`.
    pub b_star_interval: Option<BootstrapInterval>,
}

/// Steps to a target in one cell over seeds: for each seed, the first evaluation below the
/// sweep's target, minimised over that seed's runs of the cell (learning rates, other `set`
/// axes), as the pooled table minimises over all of them.
#[derive(Debug, Clone, Serialize)]
pub struct SeedSteps {
    /// Target index.
    pub target: usize,
    /// Group (optimizer, or optimizer/scenario).
    pub group: String,
    /// Optimizer label.
    pub optimizer: String,
    /// Scenario.
    pub scenario: String,
    /// Batch size.
    pub batch_size: usize,
    /// `(seed, steps)` for each seed with counted runs in the cell (`None`: not reached).
    pub per_seed: Vec<(u64, Option<u64>)>,
    /// Steps over the seeds that reached the target (`None` when none did).
    pub steps: Option<SeedStats>,
    /// Percentile bootstrap interval (over those seeds) of the mean steps.
    pub interval: Option<BootstrapInterval>,
}

/// A power law of `B*` over seeds: its exponent fitted on each seed's runs alone.
#[derive(Debug, Clone, Serialize)]
pub struct SeedLaw {
    /// What is fitted, e.g. `B* vs N, target 0` or `B* vs D across targets, d64`.
    pub law: String,
    /// Optimizer label.
    pub optimizer: String,
    /// `(seed, exponent)` of each seed where the law could be fitted.
    pub per_seed: Vec<(u64, f64)>,
    /// The exponent over those seeds.
    pub exponent: SeedStats,
    /// Percentile bootstrap interval (over the seeds) of the mean exponent.
    pub interval: Option<BootstrapInterval>,
}

/// One group's critical-batch-size fit for one target.
#[derive(Debug, Clone, Serialize)]
pub struct GroupCbs {
    /// Target index.
    pub target: usize,
    /// Group (optimizer, or optimizer/scenario).
    pub group: String,
    /// Optimizer label.
    pub optimizer: String,
    /// Scenario.
    pub scenario: String,
    /// `a` of `S(B) = a + b/B`.
    pub a: f64,
    /// `b`.
    pub b: f64,
    /// `1.2·B0 + b/(5a)`.
    pub b_star: f64,
    /// `b/(5a)`.
    pub b_star_asymptotic: f64,
    /// RMS residual of `log S`.
    pub rmse_log: f64,
    /// `(batch size, steps)` points fitted.
    pub points: Vec<(f64, f64)>,
}

/// A group that could not be fitted.
#[derive(Debug, Clone, Serialize)]
pub struct FitFailure {
    /// Target index.
    pub target: usize,
    /// Group.
    pub group: String,
    /// Why.
    pub reason: String,
}

/// Power laws of `B*` for one optimizer and target.
#[derive(Debug, Clone, Serialize)]
pub struct OptimizerLaws {
    /// Target index.
    pub target: usize,
    /// Optimizer label.
    pub optimizer: String,
    /// `B* = c·N^e`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_params: Option<PowerLaw>,
    /// `B* = c·D^e`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<PowerLaw>,
    /// The same law for `b/(5a)` against `N` (free of the `1.2·B0` offset of `B*`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_params_asymptotic: Option<PowerLaw>,
    /// The same law for `b/(5a)` against `D`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_asymptotic: Option<PowerLaw>,
}

/// `B* = c·D^e` of one optimizer in one scenario, fitted across the targets that have a data
/// size `D`.
#[derive(Debug, Clone, Serialize)]
pub struct DataLaw {
    /// Optimizer label.
    pub optimizer: String,
    /// Scenario.
    pub scenario: String,
    /// `(target index, D, B*, b/(5a))` of every fitted target, ascending `D`.
    pub points: Vec<(usize, f64, f64, f64)>,
    /// The fit of `B*`.
    pub law: PowerLaw,
    /// The fit of `b/(5a)` (free of the `1.2·B0` offset of `B*`; absent where it is not
    /// positive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asymptotic: Option<PowerLaw>,
}

/// `y = c·x^e` over `(x, y)` points with at least two distinct `x`, if it can be fitted.
fn optional_law(what: &str, points: &[(f64, f64)]) -> Option<PowerLaw> {
    let mut xs: Vec<f64> = points.iter().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    if xs.len() < 2 {
        return None;
    }
    analysis::fit_power_law(what, points).ok()
}

/// Seconds per step of one optimizer at one batch size (mean over finished runs).
#[derive(Debug, Clone, Serialize)]
pub struct StepTime {
    /// Scenario.
    pub scenario: String,
    /// Optimizer label.
    pub optimizer: String,
    /// Batch size.
    pub batch_size: usize,
    /// Mean seconds per training step.
    pub seconds_per_step: f64,
}

/// Run counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    /// Planned.
    pub planned: usize,
    /// Finished.
    pub finished: usize,
    /// Diverged.
    pub diverged: usize,
    /// Not finished yet (started or pending).
    pub missing: usize,
}

/// The whole report (`report.json`).
#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    /// Sweep name.
    pub sweep: String,
    /// Metric.
    pub metric: Metric,
    /// Reference batch size of `B*`.
    pub b0: f64,
    /// Run counts.
    pub runs: Counts,
    /// Targets.
    pub targets: Vec<TargetValue>,
    /// Steps to target per cell.
    pub steps_to_target: Vec<CellResult>,
    /// Best lr per cell.
    pub optimal_lr: Vec<BestLr>,
    /// Loss vs lr per cell.
    pub lr_curves: Vec<LrCurve>,
    /// Loss vs lr per cell over seeds (only when the runs have more than one seed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lr_seed_curves: Vec<LrSeedCurve>,
    /// Learning-rate ranges within each of [`LR_RANGE_TOLERANCES`] of the best mean loss (only
    /// when the runs have more than one seed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lr_stability: Vec<LrStability>,
    /// Fits.
    pub cbs: Vec<GroupCbs>,
    /// Groups that could not be fitted.
    pub cbs_failures: Vec<FitFailure>,
    /// Power laws across scenarios, per target.
    pub power_laws: Vec<OptimizerLaws>,
    /// Power laws against data size across targets, per scenario.
    pub data_laws: Vec<DataLaw>,
    /// Steps to target per cell and seed (only when the runs have more than one seed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub seed_steps: Vec<SeedSteps>,
    /// `B*` per seed (only when the runs have more than one seed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub seed_cbs: Vec<SeedCbs>,
    /// Power-law exponents per seed (only when the runs have more than one seed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub seed_laws: Vec<SeedLaw>,
    /// Every run.
    pub run_results: Vec<RunResult>,
    /// Wall-clock measurements (the only part that differs between identical sweeps).
    pub timing: Vec<StepTime>,
}

fn metric_loss(line: &MetricsLine, metric: Metric) -> Option<f64> {
    let raw = line.eval_loss;
    let ewa = line
        .eval_loss_ewa
        .values()
        .copied()
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))));
    match metric {
        Metric::Raw => raw,
        Metric::Ewa => ewa.or(raw),
        Metric::Best => match (raw, ewa) {
            (Some(r), Some(e)) => Some(r.min(e)),
            (r, e) => r.or(e),
        },
    }
}

fn gather(plan: &Plan) -> Result<Vec<RunResult>> {
    let metric = plan.spec.report.metric;
    let mut out = Vec::with_capacity(plan.runs.len());
    for run in &plan.runs {
        let dir = plan.run_dir(run);
        let state = run_state(&dir);
        let metrics_path = dir.join("metrics.jsonl");
        let lines = if matches!(state, RunState::Finished | RunState::Failed(_))
            && metrics_path.is_file()
        {
            read_metrics(&metrics_path)?
        } else {
            Vec::new()
        };
        let evals: Vec<EvalPoint> = lines
            .iter()
            .filter_map(|l| {
                metric_loss(l, metric).map(|loss| EvalPoint {
                    step: l.step,
                    tokens: l.tokens,
                    loss,
                })
            })
            .collect();
        let summary: Option<Summary> = if state == RunState::Finished {
            let p = dir.join("summary.json");
            let text = std::fs::read_to_string(&p).map_err(|e| Error::file(&p, e))?;
            Some(serde_json::from_str(&text).map_err(|e| Error::file(&p, e))?)
        } else {
            None
        };
        let (state_name, final_loss) = match &state {
            RunState::Finished => ("finished", evals.last().map(|e| e.loss)),
            RunState::Failed(_) => ("diverged", Some(f64::INFINITY)),
            RunState::Started => ("started", None),
            RunState::Pending => ("pending", None),
        };
        let n_params = run.config.model.non_embedding_params() as f64;
        let budget_tokens = plan
            .spec
            .budgets
            .iter()
            .find(|b| b.label == run.coords.budget)
            .and_then(|b| match b.budget {
                Budget::Tokens(n) => Some(n as f64),
                Budget::Chinchilla(m) => Some(m * CHINCHILLA_TOKENS_PER_PARAM * n_params),
                Budget::Steps(_) => None,
            });
        out.push(RunResult {
            id: run.id.clone(),
            coords: run.coords.clone(),
            state: state_name.into(),
            steps: lines.last().map_or(0, |l| l.step),
            final_loss,
            steps_to_target: Vec::new(),
            evals,
            seconds_per_step: summary.map(|s| s.timing.seconds_per_step),
            n_params,
            budget_tokens,
        });
    }
    Ok(out)
}

fn resolve_targets(plan: &Plan, runs: &[RunResult], scenarios: &[String]) -> Vec<TargetValue> {
    // The budget of each scenario in tokens, where its budget entry names one.
    let budget_tokens: BTreeMap<String, f64> = scenarios
        .iter()
        .filter_map(|s| {
            let r = runs.iter().find(|r| &r.coords.scenario() == s)?;
            Some((s.clone(), r.budget_tokens?))
        })
        .collect();
    let mut out = Vec::new();
    for &l in &plan.spec.targets.loss {
        out.push(TargetValue {
            name: format!("loss {l}"),
            values: scenarios.iter().map(|s| (s.clone(), l)).collect(),
            tokens: budget_tokens.clone(),
        });
    }
    for r in &plan.spec.targets.reference {
        let at = match (r.step, r.tokens) {
            (Some(s), _) => format!(" at step {s}"),
            (None, Some(t)) => format!(" at {t} tokens"),
            _ => String::new(),
        };
        let mut values = BTreeMap::new();
        for s in scenarios {
            let reached = runs
                .iter()
                .filter(|x| {
                    x.state == "finished"
                        && x.coords.optimizer == r.optimizer
                        && x.coords.batch_size == r.batch_size
                        && &x.coords.scenario() == s
                })
                .filter_map(|x| {
                    x.evals
                        .iter()
                        .filter(|e| {
                            r.step.is_none_or(|st| e.step <= st)
                                && r.tokens.is_none_or(|t| e.tokens <= t)
                        })
                        .max_by_key(|e| e.step)
                        .map(|e| e.loss)
                })
                .filter(|l| l.is_finite())
                .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))));
            if let Some(v) = reached {
                values.insert(s.clone(), v);
            }
        }
        let tokens = match (r.step, r.tokens) {
            (None, Some(t)) => values.keys().map(|s| (s.clone(), t as f64)).collect(),
            _ => budget_tokens.clone(),
        };
        out.push(TargetValue {
            name: format!("{} at B={}{at}", r.optimizer, r.batch_size),
            values,
            tokens,
        });
    }
    out
}

/// Builds the report of `plan` from its run directories (finished and diverged runs).
pub fn build(plan: &Plan) -> Result<SweepReport> {
    let runs = gather(plan)?;
    build_from(plan, runs)
}

/// The report of `plan` from what is known about its runs (one [`RunResult`] per planned run,
/// in plan order).
fn build_from(plan: &Plan, mut runs: Vec<RunResult>) -> Result<SweepReport> {
    let spec = &plan.spec;
    let mut scenarios: Vec<String> = Vec::new();
    for r in &plan.runs {
        let s = r.coords.scenario();
        if !scenarios.contains(&s) {
            scenarios.push(s);
        }
    }
    let optimizers: Vec<String> = spec.optimizers.iter().map(|o| o.label.clone()).collect();
    let targets = resolve_targets(plan, &runs, &scenarios);
    let b0 = spec.b0();

    // Steps to target per run and per cell.
    for r in runs.iter_mut() {
        let evals: Vec<Eval> = r
            .evals
            .iter()
            .map(|e| Eval {
                step: e.step,
                loss: e.loss,
            })
            .collect();
        r.steps_to_target = targets
            .iter()
            .map(|t| {
                t.values
                    .get(&r.coords.scenario())
                    .and_then(|&v| analysis::first_step_below(&evals, v))
            })
            .collect();
    }
    let mut cells = Vec::new();
    for (ti, t) in targets.iter().enumerate() {
        for s in &scenarios {
            let Some(&target) = t.values.get(s) else {
                continue;
            };
            for o in &optimizers {
                for &b in &spec.batch_sizes {
                    let members: Vec<&RunResult> = runs
                        .iter()
                        .filter(|r| {
                            r.counted()
                                && &r.coords.optimizer == o
                                && r.coords.batch_size == b
                                && &r.coords.scenario() == s
                        })
                        .collect();
                    let evals: Vec<Vec<Eval>> = members
                        .iter()
                        .map(|r| {
                            r.evals
                                .iter()
                                .map(|e| Eval {
                                    step: e.step,
                                    loss: e.loss,
                                })
                                .collect()
                        })
                        .collect();
                    let reached =
                        analysis::steps_to_target(evals.iter().map(|e| e.as_slice()), target)?;
                    if let Some(reached) = reached {
                        let run = members[reached.run];
                        let tokens = run
                            .evals
                            .iter()
                            .find(|e| e.step == reached.steps)
                            .map_or(0, |e| e.tokens);
                        cells.push(CellResult {
                            target: ti,
                            scenario: s.clone(),
                            optimizer: o.clone(),
                            batch_size: b,
                            steps: reached.steps,
                            tokens,
                            lr: run.coords.lr,
                            run: run.id.clone(),
                        });
                    }
                }
            }
        }
    }

    // Learning rates.
    let mut optimal_lr = Vec::new();
    let mut lr_curves = Vec::new();
    for s in &scenarios {
        for o in &optimizers {
            for &b in &spec.batch_sizes {
                let members: Vec<&RunResult> = runs
                    .iter()
                    .filter(|r| {
                        r.counted()
                            && &r.coords.optimizer == o
                            && r.coords.batch_size == b
                            && &r.coords.scenario() == s
                    })
                    .collect();
                if members.is_empty() {
                    continue;
                }
                let mut by_lr: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
                for r in &members {
                    let l = r.final_loss.unwrap_or(f64::INFINITY);
                    let e = by_lr
                        .entry(r.coords.lr.to_bits())
                        .or_insert((r.coords.lr, l));
                    e.1 = e.1.min(l);
                }
                let mut points: Vec<(f64, f64)> = by_lr.into_values().collect();
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                lr_curves.push(LrCurve {
                    scenario: s.clone(),
                    optimizer: o.clone(),
                    batch_size: b,
                    points,
                });
                if let Some(best) = members
                    .iter()
                    .filter(|r| r.final_loss.is_some_and(f64::is_finite))
                    .min_by(|a, b| a.final_loss.unwrap().total_cmp(&b.final_loss.unwrap()))
                {
                    optimal_lr.push(BestLr {
                        scenario: s.clone(),
                        optimizer: o.clone(),
                        batch_size: b,
                        lr: best.coords.lr,
                        final_loss: best.final_loss.unwrap_or(f64::NAN),
                        run: best.id.clone(),
                    });
                }
            }
        }
    }
    let (lr_seed_curves, lr_stability) = seed_lr_analysis(&runs, &scenarios, &optimizers, spec);

    // Fits.
    let mut cbs = Vec::new();
    let mut failures = Vec::new();
    let mut power_laws = Vec::new();
    let many = scenarios.len() > 1;
    for (ti, target) in targets.iter().enumerate() {
        for o in &optimizers {
            let mut rows = Vec::new();
            for s in &scenarios {
                let group = group_name(o, s, many);
                let points: Vec<(f64, f64)> = cells
                    .iter()
                    .filter(|c| c.target == ti && &c.optimizer == o && &c.scenario == s)
                    .map(|c| (c.batch_size as f64, c.steps as f64))
                    .collect();
                match fit_cbs(&group, &points, b0) {
                    Ok(fit) => {
                        cbs.push(GroupCbs {
                            target: ti,
                            group: group.clone(),
                            optimizer: o.clone(),
                            scenario: s.clone(),
                            a: fit.a,
                            b: fit.b,
                            b_star: fit.b_star,
                            b_star_asymptotic: fit.b_star_asymptotic,
                            rmse_log: fit.rmse_log,
                            points: points.clone(),
                        });
                        let sample = runs.iter().find(|r| &r.coords.scenario() == s);
                        for &(bs, st) in &points {
                            rows.push(CbsRow {
                                group: group.clone(),
                                batch_size: bs,
                                steps: st,
                                n_params: (!spec.models.is_empty())
                                    .then(|| sample.map(|r| r.n_params))
                                    .flatten(),
                                tokens: target.tokens.get(s).copied(),
                            });
                        }
                    }
                    Err(e) => failures.push(FitFailure {
                        target: ti,
                        group,
                        reason: e.to_string(),
                    }),
                }
            }
            if rows.len() > 1 {
                if let Ok(rep) = analysis::analyze(&rows, b0) {
                    if rep.power_laws.n_params.is_some() || rep.power_laws.tokens.is_some() {
                        let asymptotic = |x: fn(&analysis::GroupFit) -> Option<f64>| {
                            let points: Vec<(f64, f64)> = rep
                                .groups
                                .iter()
                                .filter_map(|g| Some((x(g)?, g.fit.b_star_asymptotic)))
                                .collect();
                            optional_law("b/(5a)", &points)
                        };
                        power_laws.push(OptimizerLaws {
                            target: ti,
                            optimizer: o.clone(),
                            n_params: rep.power_laws.n_params,
                            tokens: rep.power_laws.tokens,
                            n_params_asymptotic: asymptotic(|g| g.n_params),
                            tokens_asymptotic: asymptotic(|g| g.tokens),
                        });
                    }
                }
            }
        }
    }

    // B* against data size across the targets that have one.
    let mut data_laws = Vec::new();
    for o in &optimizers {
        for s in &scenarios {
            let mut points: Vec<(usize, f64, f64, f64)> = cbs
                .iter()
                .filter(|g| &g.optimizer == o && &g.scenario == s)
                .filter_map(|g| {
                    let d = targets[g.target].tokens.get(s)?;
                    Some((g.target, *d, g.b_star, g.b_star_asymptotic))
                })
                .collect();
            points.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
            let mut ds: Vec<f64> = points.iter().map(|p| p.1).collect();
            ds.dedup();
            if ds.len() < 2 {
                continue;
            }
            let xy: Vec<(f64, f64)> = points.iter().map(|p| (p.1, p.2)).collect();
            let what = format!("B* vs tokens across targets, {}", group_name(o, s, true));
            if let Ok(law) = analysis::fit_power_law(&what, &xy) {
                let asym: Vec<(f64, f64)> = points.iter().map(|p| (p.1, p.3)).collect();
                data_laws.push(DataLaw {
                    optimizer: o.clone(),
                    scenario: s.clone(),
                    asymptotic: optional_law(&what, &asym),
                    points,
                    law,
                });
            }
        }
    }

    // Timing.
    let mut timing = Vec::new();
    for s in &scenarios {
        for o in &optimizers {
            for &b in &spec.batch_sizes {
                let t: Vec<f64> = runs
                    .iter()
                    .filter(|r| {
                        &r.coords.optimizer == o
                            && r.coords.batch_size == b
                            && &r.coords.scenario() == s
                    })
                    .filter_map(|r| r.seconds_per_step)
                    .collect();
                if !t.is_empty() {
                    timing.push(StepTime {
                        scenario: s.clone(),
                        optimizer: o.clone(),
                        batch_size: b,
                        seconds_per_step: t.iter().sum::<f64>() / t.len() as f64,
                    });
                }
            }
        }
    }

    let (seed_cbs, seed_laws) = seed_cbs_analysis(plan, &runs)?;
    let seed_steps =
        seed_steps_analysis(&targets, &scenarios, &optimizers, &spec.batch_sizes, &runs);

    let counts = Counts {
        planned: runs.len(),
        finished: runs.iter().filter(|r| r.state == "finished").count(),
        diverged: runs.iter().filter(|r| r.state == "diverged").count(),
        missing: runs.iter().filter(|r| !r.counted()).count(),
    };
    Ok(SweepReport {
        sweep: spec.name.clone(),
        metric: spec.report.metric,
        b0,
        runs: counts,
        targets,
        steps_to_target: cells,
        optimal_lr,
        lr_curves,
        lr_seed_curves,
        lr_stability,
        cbs,
        cbs_failures: failures,
        power_laws,
        data_laws,
        seed_steps,
        seed_cbs,
        seed_laws,
        run_results: runs,
        timing,
    })
}

/// The bootstrap interval of the mean of `values` over seeds.
fn mean_interval(values: &[f64], salt: u64) -> Option<BootstrapInterval> {
    let (resamples, level) = SEED_BOOTSTRAP;
    bootstrap_interval(values.len(), resamples, level, salt, |idx| {
        Some(idx.iter().map(|&i| values[i]).sum::<f64>() / idx.len() as f64)
    })
}

/// `B*` and its power laws fitted on each seed's runs alone (each seed's report, with its own
/// reference targets), then summarised over the seeds with bootstrap intervals of the mean;
/// both empty unless the counted runs have more than one seed.
fn seed_cbs_analysis(plan: &Plan, runs: &[RunResult]) -> Result<(Vec<SeedCbs>, Vec<SeedLaw>)> {
    let seeds: BTreeSet<u64> = runs
        .iter()
        .filter(|r| r.counted())
        .map(|r| r.coords.seed)
        .collect();
    if seeds.len() < 2 {
        return Ok((Vec::new(), Vec::new()));
    }
    // (target, group) -> (optimizer, scenario, per seed)
    type CbsKey = (usize, String);
    type PerSeed = (String, String, Vec<(u64, f64, f64)>);
    let mut cbs: BTreeMap<CbsKey, PerSeed> = BTreeMap::new();
    // (law, optimizer) -> per seed
    let mut laws: BTreeMap<(String, String), Vec<(u64, f64)>> = BTreeMap::new();
    let scenario_count = {
        let mut v: Vec<String> = plan.runs.iter().map(|r| r.coords.scenario()).collect();
        v.sort();
        v.dedup();
        v.len()
    };
    for &seed in &seeds {
        let subset: Vec<RunResult> = runs
            .iter()
            .filter(|r| r.coords.seed == seed)
            .cloned()
            .collect();
        let rep = build_from(plan, subset)?;
        for g in &rep.cbs {
            cbs.entry((g.target, g.group.clone()))
                .or_insert_with(|| (g.optimizer.clone(), g.scenario.clone(), Vec::new()))
                .2
                .push((seed, g.b_star, g.b_star_asymptotic));
        }
        for l in &rep.power_laws {
            if let Some(p) = &l.n_params {
                laws.entry((format!("B* vs N, target {}", l.target), l.optimizer.clone()))
                    .or_default()
                    .push((seed, p.exponent));
            }
            if let Some(p) = &l.tokens {
                laws.entry((
                    format!("B* vs D across scenarios, target {}", l.target),
                    l.optimizer.clone(),
                ))
                .or_default()
                .push((seed, p.exponent));
            }
        }
        for d in &rep.data_laws {
            let name = if scenario_count > 1 && !d.scenario.is_empty() {
                format!("B* vs D across targets, {}", d.scenario)
            } else {
                "B* vs D across targets".to_string()
            };
            laws.entry((name, d.optimizer.clone()))
                .or_default()
                .push((seed, d.law.exponent));
        }
    }
    let mut seed_cbs = Vec::new();
    for (i, ((target, group), (optimizer, scenario, per_seed))) in cbs.into_iter().enumerate() {
        let b: Vec<f64> = per_seed.iter().map(|x| x.1).collect();
        let a: Vec<f64> = per_seed.iter().map(|x| x.2).collect();
        let (Some(b_star), Some(b_star_asymptotic)) = (seed_stats(&b), seed_stats(&a)) else {
            continue;
        };
        seed_cbs.push(SeedCbs {
            target,
            group,
            optimizer,
            scenario,
            b_star_interval: mean_interval(&b, i as u64),
            per_seed,
            b_star,
            b_star_asymptotic,
        });
    }
    let mut seed_laws = Vec::new();
    for (i, ((law, optimizer), per_seed)) in laws.into_iter().enumerate() {
        let e: Vec<f64> = per_seed.iter().map(|x| x.1).collect();
        let Some(exponent) = seed_stats(&e) else {
            continue;
        };
        seed_laws.push(SeedLaw {
            law,
            optimizer,
            interval: mean_interval(&e, 1_000 + i as u64),
            per_seed,
            exponent,
        });
    }
    Ok((seed_cbs, seed_laws))
}

/// Steps to each target per cell and seed, from the runs' own steps to target (empty unless the
/// counted runs have more than one seed).
fn seed_steps_analysis(
    targets: &[TargetValue],
    scenarios: &[String],
    optimizers: &[String],
    batch_sizes: &[usize],
    runs: &[RunResult],
) -> Vec<SeedSteps> {
    let counted = || runs.iter().filter(|r| r.counted());
    let seeds: BTreeSet<u64> = counted().map(|r| r.coords.seed).collect();
    if seeds.len() < 2 {
        return Vec::new();
    }
    let many = scenarios.len() > 1;
    let mut out = Vec::new();
    for (ti, t) in targets.iter().enumerate() {
        for s in scenarios.iter().filter(|s| t.values.contains_key(*s)) {
            for o in optimizers {
                for &b in batch_sizes {
                    let cell = || {
                        counted().filter(|r| {
                            &r.coords.optimizer == o
                                && r.coords.batch_size == b
                                && &r.coords.scenario() == s
                        })
                    };
                    let cell_seeds: BTreeSet<u64> = cell().map(|r| r.coords.seed).collect();
                    if cell_seeds.is_empty() {
                        continue;
                    }
                    let per_seed: Vec<(u64, Option<u64>)> = cell_seeds
                        .iter()
                        .map(|&seed| {
                            let steps = cell()
                                .filter(|r| r.coords.seed == seed)
                                .filter_map(|r| r.steps_to_target.get(ti).copied().flatten())
                                .min();
                            (seed, steps)
                        })
                        .collect();
                    let reached: Vec<f64> = per_seed
                        .iter()
                        .filter_map(|x| x.1)
                        .map(|v| v as f64)
                        .collect();
                    let salt = 2_000 + out.len() as u64;
                    out.push(SeedSteps {
                        target: ti,
                        group: group_name(o, s, many),
                        optimizer: o.clone(),
                        scenario: s.clone(),
                        batch_size: b,
                        steps: seed_stats(&reached),
                        interval: mean_interval(&reached, salt),
                        per_seed,
                    });
                }
            }
        }
    }
    out
}

/// Final loss against learning rate over seeds, and the learning-rate ranges within
/// [`LR_RANGE_TOLERANCES`] of the best, per cell; both empty unless the counted runs have more
/// than one seed. Per seed and lr the loss is the minimum over the other axes.
fn seed_lr_analysis(
    runs: &[RunResult],
    scenarios: &[String],
    optimizers: &[String],
    spec: &crate::sweep::spec::SweepSpec,
) -> (Vec<LrSeedCurve>, Vec<LrStability>) {
    let seeds: BTreeSet<u64> = runs
        .iter()
        .filter(|r| r.counted())
        .map(|r| r.coords.seed)
        .collect();
    let (mut curves, mut stability) = (Vec::new(), Vec::new());
    if seeds.len() < 2 {
        return (curves, stability);
    }
    for s in scenarios {
        for o in optimizers {
            for &b in &spec.batch_sizes {
                // lr bits -> (lr, seed -> loss)
                let mut by_lr: BTreeMap<u64, (f64, BTreeMap<u64, f64>)> = BTreeMap::new();
                for r in runs.iter().filter(|r| {
                    r.counted()
                        && &r.coords.optimizer == o
                        && r.coords.batch_size == b
                        && &r.coords.scenario() == s
                }) {
                    let l = r.final_loss.unwrap_or(f64::INFINITY);
                    let e = by_lr
                        .entry(r.coords.lr.to_bits())
                        .or_insert_with(|| (r.coords.lr, BTreeMap::new()));
                    let v = e.1.entry(r.coords.seed).or_insert(l);
                    *v = v.min(l);
                }
                let mut points: Vec<LrSeedPoint> = by_lr
                    .into_values()
                    .filter_map(|(lr, per)| {
                        let per_seed: Vec<(u64, f64)> = per.into_iter().collect();
                        let vals: Vec<f64> = per_seed.iter().map(|p| p.1).collect();
                        let stats = seed_stats(&vals)?;
                        Some(LrSeedPoint {
                            lr,
                            per_seed,
                            stats,
                        })
                    })
                    .collect();
                if points.is_empty() {
                    continue;
                }
                points.sort_by(|a, b| a.lr.total_cmp(&b.lr));
                let mean: Vec<(f64, f64)> = points.iter().map(|p| (p.lr, p.stats.mean)).collect();
                let cell_seeds: BTreeSet<u64> = points
                    .iter()
                    .flat_map(|p| p.per_seed.iter().map(|x| x.0))
                    .collect();
                for &tol in &LR_RANGE_TOLERANCES {
                    let Some(range) = lr_range_within(&mean, tol) else {
                        continue;
                    };
                    let Some(best) = points
                        .iter()
                        .find(|p| p.lr == range.best_lr)
                        .map(|p| p.stats)
                    else {
                        continue;
                    };
                    let per_seed: Vec<LrRange> = cell_seeds
                        .iter()
                        .filter_map(|seed| {
                            let curve: Vec<(f64, f64)> = points
                                .iter()
                                .filter_map(|p| {
                                    p.per_seed
                                        .iter()
                                        .find(|x| x.0 == *seed)
                                        .map(|x| (p.lr, x.1))
                                })
                                .collect();
                            lr_range_within(&curve, tol)
                        })
                        .collect();
                    let widths: Vec<f64> = per_seed.iter().map(|r| r.decades).collect();
                    stability.push(LrStability {
                        scenario: s.clone(),
                        optimizer: o.clone(),
                        batch_size: b,
                        tolerance: tol,
                        mean_curve: range,
                        best,
                        seed_decades: seed_stats(&widths),
                        seed_best_lrs: per_seed.iter().map(|r| r.best_lr).collect(),
                    });
                }
                curves.push(LrSeedCurve {
                    scenario: s.clone(),
                    optimizer: o.clone(),
                    batch_size: b,
                    points,
                });
            }
        }
    }
    (curves, stability)
}

fn group_name(optimizer: &str, scenario: &str, many: bool) -> String {
    if many && !scenario.is_empty() {
        format!("{optimizer}/{scenario}")
    } else {
        optimizer.to_string()
    }
}

/// `what` followed by the scenario in brackets, when there is one.
fn titled(what: &str, scenario: &str) -> String {
    if scenario.is_empty() {
        what.to_string()
    } else {
        format!("{what} [{scenario}]")
    }
}

/// A file-name-safe form of a label.
fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else if x.is_nan() {
        "nan".into()
    } else {
        "inf".into()
    }
}

/// Three significant digits (`6.73e-3`) for interpolated values.
fn sig3(x: f64) -> String {
    format!("{x:.2e}")
}

fn opt_num(x: Option<f64>) -> String {
    x.map(num).unwrap_or_default()
}

/// Writes the report files into `dir`: `report.md`, `report.json`, the CSVs and the plots
/// (`plots/`). Returns every path written.
pub fn write(report: &SweepReport, plan: &Plan, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let mut written = Vec::new();
    let put = |name: &str, text: String, written: &mut Vec<PathBuf>| -> Result<()> {
        let p = dir.join(name);
        write_atomic(&p, text.as_bytes())?;
        written.push(p);
        Ok(())
    };
    // serde_json writes non-finite numbers (diverged runs' losses) as null.
    let mut json = serde_json::to_string_pretty(report)
        .map_err(|e| Error::file(dir.join("report.json"), e))?;
    json.push('\n');
    put("report.json", json, &mut written)?;

    // The CSVs `cbs fit` reads, one per target.
    let with_n = !plan.spec.models.is_empty();
    for (ti, target) in report.targets.iter().enumerate() {
        let with_d = !target.tokens.is_empty();
        let mut csv = String::from("group,batch_size,steps");
        if with_n {
            csv += ",n_params";
        }
        if with_d {
            csv += ",tokens";
        }
        csv += "\n";
        let many = report.targets.get(ti).is_some_and(|t| t.values.len() > 1);
        for c in report.steps_to_target.iter().filter(|c| c.target == ti) {
            let _ = write!(
                csv,
                "{},{},{}",
                csv_field(&group_name(&c.optimizer, &c.scenario, many)),
                c.batch_size,
                c.steps
            );
            let sample = report
                .run_results
                .iter()
                .find(|r| r.id == c.run)
                .expect("cell run is a sweep run");
            if with_n {
                let _ = write!(csv, ",{}", sample.n_params);
            }
            if with_d {
                let _ = write!(csv, ",{}", opt_num(target.tokens.get(&c.scenario).copied()));
            }
            csv += "\n";
        }
        put(&steps_csv_name(ti), csv, &mut written)?;
    }
    // The same across targets, one group per target with a data size: `cbs fit` on it gives
    // the power laws against D of `data_laws`.
    if !report.data_laws.is_empty() {
        let many = report
            .run_results
            .iter()
            .any(|r| r.coords.scenario() != report.run_results[0].coords.scenario());
        let mut csv = String::from("group,batch_size,steps");
        if with_n {
            csv += ",n_params";
        }
        csv += ",tokens\n";
        for law in &report.data_laws {
            for &(ti, d, _, _) in &law.points {
                let group = format!("{}/D={d}", group_name(&law.optimizer, &law.scenario, many));
                for c in report.steps_to_target.iter().filter(|c| {
                    c.target == ti && c.optimizer == law.optimizer && c.scenario == law.scenario
                }) {
                    let _ = write!(csv, "{},{},{}", csv_field(&group), c.batch_size, c.steps);
                    if with_n {
                        let n = report
                            .run_results
                            .iter()
                            .find(|r| r.id == c.run)
                            .map(|r| r.n_params);
                        let _ = write!(csv, ",{}", opt_num(n));
                    }
                    let _ = writeln!(csv, ",{d}");
                }
            }
        }
        put(DATA_CSV, csv, &mut written)?;
    }
    let mut csv = String::from("target,scenario,optimizer,batch_size,steps,tokens,lr,run\n");
    for c in &report.steps_to_target {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{}",
            c.target,
            csv_field(&c.scenario),
            csv_field(&c.optimizer),
            c.batch_size,
            c.steps,
            c.tokens,
            c.lr,
            c.run
        );
    }
    put("steps_to_target_detail.csv", csv, &mut written)?;
    let mut csv = String::from("scenario,optimizer,batch_size,lr,final_loss,run\n");
    for b in &report.optimal_lr {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{}",
            csv_field(&b.scenario),
            csv_field(&b.optimizer),
            b.batch_size,
            b.lr,
            num(b.final_loss),
            b.run
        );
    }
    put("optimal_lr.csv", csv, &mut written)?;
    let mut csv = String::from("scenario,optimizer,batch_size,lr,final_loss\n");
    for c in &report.lr_curves {
        for &(lr, l) in &c.points {
            let _ = writeln!(
                csv,
                "{},{},{},{},{}",
                csv_field(&c.scenario),
                csv_field(&c.optimizer),
                c.batch_size,
                lr,
                num(l)
            );
        }
    }
    put("lr_curves.csv", csv, &mut written)?;
    if !report.seed_steps.is_empty() {
        let mut csv = String::from(
            "target,group,batch_size,n_seeds,n_reached,steps_mean,steps_std,steps_lo,steps_hi,\
             per_seed\n",
        );
        for c in &report.seed_steps {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{},{},{},{}",
                c.target,
                csv_field(&c.group),
                c.batch_size,
                c.per_seed.len(),
                c.steps.map_or(0, |x| x.n),
                opt_num(c.steps.map(|x| x.mean)),
                opt_num(c.steps.map(|x| x.std)),
                opt_num(c.interval.map(|x| x.lo)),
                opt_num(c.interval.map(|x| x.hi)),
                c.per_seed
                    .iter()
                    .map(|x| format!("{}:{}", x.0, x.1.map_or("".into(), |v| v.to_string())))
                    .collect::<Vec<_>>()
                    .join(";")
            );
        }
        put("steps_seeds.csv", csv, &mut written)?;
    }
    if !report.seed_cbs.is_empty() {
        let mut csv = String::from(
            "target,group,n_seeds,b_star_mean,b_star_std,b_star_lo,b_star_hi,\
             b_star_asymptotic_mean,b_star_asymptotic_std,per_seed\n",
        );
        for g in &report.seed_cbs {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{},{},{},{}",
                g.target,
                csv_field(&g.group),
                g.b_star.n,
                num(g.b_star.mean),
                num(g.b_star.std),
                opt_num(g.b_star_interval.map(|x| x.lo)),
                opt_num(g.b_star_interval.map(|x| x.hi)),
                num(g.b_star_asymptotic.mean),
                num(g.b_star_asymptotic.std),
                g.per_seed
                    .iter()
                    .map(|x| format!("{}:{}", x.0, x.1))
                    .collect::<Vec<_>>()
                    .join(";")
            );
        }
        put("cbs_seeds.csv", csv, &mut written)?;
    }
    if !report.seed_laws.is_empty() {
        let mut csv =
            String::from("law,optimizer,n_seeds,exponent_mean,exponent_std,lo,hi,per_seed\n");
        for l in &report.seed_laws {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{},{}",
                csv_field(&l.law),
                csv_field(&l.optimizer),
                l.exponent.n,
                num(l.exponent.mean),
                num(l.exponent.std),
                opt_num(l.interval.map(|x| x.lo)),
                opt_num(l.interval.map(|x| x.hi)),
                l.per_seed
                    .iter()
                    .map(|x| format!("{}:{}", x.0, x.1))
                    .collect::<Vec<_>>()
                    .join(";")
            );
        }
        put("laws_seeds.csv", csv, &mut written)?;
    }
    if !report.lr_seed_curves.is_empty() {
        let mut csv = String::from("scenario,optimizer,batch_size,lr,n_seeds,mean,std,min,max\n");
        let mut long = String::from("scenario,optimizer,batch_size,lr,seed,final_loss\n");
        for c in &report.lr_seed_curves {
            for p in &c.points {
                let _ = writeln!(
                    csv,
                    "{},{},{},{},{},{},{},{},{}",
                    csv_field(&c.scenario),
                    csv_field(&c.optimizer),
                    c.batch_size,
                    p.lr,
                    p.stats.n,
                    num(p.stats.mean),
                    num(p.stats.std),
                    num(p.stats.min),
                    num(p.stats.max)
                );
                for &(seed, l) in &p.per_seed {
                    let _ = writeln!(
                        long,
                        "{},{},{},{},{},{}",
                        csv_field(&c.scenario),
                        csv_field(&c.optimizer),
                        c.batch_size,
                        p.lr,
                        seed,
                        num(l)
                    );
                }
            }
        }
        put("lr_seeds.csv", csv, &mut written)?;
        put("lr_seed_runs.csv", long, &mut written)?;
        let mut csv = String::from(
            "scenario,optimizer,batch_size,tolerance,best_lr,best_mean,best_std,n_seeds,lo,hi,\
             decades,lo_open,hi_open,seed_decades_mean,seed_decades_std,seed_best_lrs\n",
        );
        for t in &report.lr_stability {
            let r = &t.mean_curve;
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                csv_field(&t.scenario),
                csv_field(&t.optimizer),
                t.batch_size,
                t.tolerance,
                r.best_lr,
                num(t.best.mean),
                num(t.best.std),
                t.best.n,
                r.lo,
                r.hi,
                num(r.decades),
                r.lo_open,
                r.hi_open,
                opt_num(t.seed_decades.map(|x| x.mean)),
                opt_num(t.seed_decades.map(|x| x.std)),
                t.seed_best_lrs
                    .iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(";")
            );
        }
        put("lr_stability.csv", csv, &mut written)?;
    }
    let mut csv = String::from("target,group,a,b,b_star,b_star_asymptotic,rmse_log,n_points\n");
    for g in &report.cbs {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{}",
            g.target,
            csv_field(&g.group),
            g.a,
            g.b,
            g.b_star,
            g.b_star_asymptotic,
            g.rmse_log,
            g.points.len()
        );
    }
    put("cbs_fit.csv", csv, &mut written)?;
    let set_keys: BTreeSet<&String> = report
        .run_results
        .iter()
        .flat_map(|r| r.coords.set.keys())
        .collect();
    let mut csv = String::from("id,optimizer,scenario,batch_size,lr,seed");
    for k in &set_keys {
        let _ = write!(csv, ",{}", csv_field(k));
    }
    csv += ",state,steps,final_loss";
    for ti in 0..report.targets.len() {
        let _ = write!(csv, ",steps_to_target_{ti}");
    }
    csv += "\n";
    for r in &report.run_results {
        let _ = write!(
            csv,
            "{},{},{},{},{},{}",
            r.id,
            csv_field(&r.coords.optimizer),
            csv_field(&r.coords.scenario()),
            r.coords.batch_size,
            r.coords.lr,
            r.coords.seed
        );
        for k in &set_keys {
            let v = r.coords.set.get(*k).cloned().unwrap_or_default();
            let _ = write!(csv, ",{}", csv_field(&v));
        }
        let _ = write!(csv, ",{},{},{}", r.state, r.steps, opt_num(r.final_loss));
        for s in &r.steps_to_target {
            let _ = write!(csv, ",{}", s.map(|x| x.to_string()).unwrap_or_default());
        }
        csv += "\n";
    }
    put("runs.csv", csv, &mut written)?;

    let plot_paths = write_plots(report, plan, &dir.join("plots"))?;
    let md = markdown(report, plan, dir, &plot_paths);
    put("report.md", md, &mut written)?;
    written.extend(plot_paths);
    Ok(written)
}

/// The `cbs fit` CSV of the steps to target across the targets with a data size.
pub const DATA_CSV: &str = "steps_to_target_by_data.csv";

/// The name of the `cbs fit` CSV of target `ti`.
pub fn steps_csv_name(ti: usize) -> String {
    if ti == 0 {
        "steps_to_target.csv".into()
    } else {
        format!("steps_to_target_{ti}.csv")
    }
}

/// The top of a loss-vs-lr plot's loss axis: 1.5× the lowest loss when some finite loss lies
/// above that (a run blowing up to a loss of hundreds would flatten every other curve), else
/// the largest loss (`None`).
fn lr_plot_cap(series: &[LrSeries]) -> Option<f64> {
    let finite = || {
        series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .filter(|l| l.is_finite())
    };
    let lowest = finite().fold(f64::INFINITY, f64::min);
    let cap = 1.5 * lowest;
    (lowest.is_finite() && lowest > 0.0 && finite().any(|l| l > cap)).then_some(cap)
}

/// The final-loss-vs-lr series of every cell as `(scenario, optimizer, batch size, series)`:
/// the mean over seeds with the seeds' range as error bars when the sweep has several seeds,
/// else the loss per lr (minimum over the other axes).
fn lr_series(report: &SweepReport) -> Vec<(String, String, usize, LrSeries)> {
    if report.lr_seed_curves.is_empty() {
        return report
            .lr_curves
            .iter()
            .map(|c| {
                let series = LrSeries {
                    label: c.optimizer.clone(),
                    points: c.points.clone(),
                    bars: Vec::new(),
                };
                (
                    c.scenario.clone(),
                    c.optimizer.clone(),
                    c.batch_size,
                    series,
                )
            })
            .collect();
    }
    report
        .lr_seed_curves
        .iter()
        .map(|c| {
            let series = LrSeries {
                label: c.optimizer.clone(),
                points: c.points.iter().map(|p| (p.lr, p.stats.mean)).collect(),
                bars: c
                    .points
                    .iter()
                    .map(|p| (p.lr, p.stats.min, p.stats.max))
                    .collect(),
            };
            (
                c.scenario.clone(),
                c.optimizer.clone(),
                c.batch_size,
                series,
            )
        })
        .collect()
}

fn write_plots(report: &SweepReport, plan: &Plan, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let spec = &plan.spec;
    let scenarios: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for r in &report.run_results {
            let s = r.coords.scenario();
            if !v.contains(&s) {
                v.push(s);
            }
        }
        v
    };
    let many = scenarios.len() > 1;
    let both = |stem: String, out: &mut Vec<PathBuf>, f: &dyn Fn(&Path) -> Result<()>| {
        for ext in ["png", "svg"] {
            let p = dir.join(format!("{stem}.{ext}"));
            f(&p)?;
            out.push(p);
        }
        Ok::<(), Error>(())
    };

    // Steps to target with the fit, per target.
    for (ti, t) in report.targets.iter().enumerate() {
        let series: Vec<StepsSeries> = report
            .cbs
            .iter()
            .filter(|g| g.target == ti)
            .map(|g| StepsSeries {
                label: g.group.clone(),
                points: g.points.clone(),
                fit: Some(analysis::CbsFit {
                    a: g.a,
                    b: g.b,
                    b0: report.b0,
                    b_star: g.b_star,
                    b_star_asymptotic: g.b_star_asymptotic,
                    rmse_log: g.rmse_log,
                    n_points: g.points.len(),
                }),
            })
            .chain(
                // Groups without a fit still show their points.
                report
                    .cbs_failures
                    .iter()
                    .filter(|f| f.target == ti)
                    .map(|f| StepsSeries {
                        label: format!("{} (no fit)", f.group),
                        points: report
                            .steps_to_target
                            .iter()
                            .filter(|c| {
                                c.target == ti
                                    && group_name(&c.optimizer, &c.scenario, many) == f.group
                            })
                            .map(|c| (c.batch_size as f64, c.steps as f64))
                            .collect(),
                        fit: None,
                    }),
            )
            .filter(|s| !s.points.is_empty())
            .collect();
        if series.is_empty() {
            continue;
        }
        let suffix = if ti == 0 {
            String::new()
        } else {
            format!("_{ti}")
        };
        let mut data = StepsToTargetPlot {
            title: format!(
                "{}: steps to target ({}) vs batch size, B0 = {}",
                spec.name, t.name, report.b0
            ),
            series,
            layout: Layout::Overlaid,
        };
        both(format!("steps_to_target{suffix}"), &mut out, &|p| {
            plots::plot_steps_to_target(&data, p)
        })?;
        if data.series.len() > 1 {
            data.layout = Layout::Panels;
            both(format!("steps_to_target_panels{suffix}"), &mut out, &|p| {
                plots::plot_steps_to_target(&data, p)
            })?;
        }
    }

    for s in &scenarios {
        let target = report
            .targets
            .first()
            .and_then(|t| t.values.get(s).copied());
        let sc = if many {
            format!("_{}", slug(s))
        } else {
            String::new()
        };
        for o in &spec.optimizers {
            // Loss curves: the best-lr run at each batch size.
            let curves: Vec<LossCurve> = report
                .optimal_lr
                .iter()
                .filter(|b| &b.scenario == s && b.optimizer == o.label)
                .filter_map(|b| {
                    let r = report.run_results.iter().find(|r| r.id == b.run)?;
                    Some(LossCurve {
                        label: format!("B = {} (lr {})", b.batch_size, fmt_g(b.lr)),
                        points: r
                            .evals
                            .iter()
                            .filter(|e| e.step > 0)
                            .map(|e| LossPoint {
                                step: e.step as f64,
                                tokens: e.tokens as f64,
                                loss: e.loss,
                            })
                            .collect(),
                    })
                })
                .collect();
            if !curves.is_empty() {
                let data = LossCurves {
                    title: format!("{}: eval loss, best lr per batch size", titled(&o.label, s)),
                    curves,
                    target,
                    log_x: true,
                };
                let stem = slug(&o.label);
                both(format!("loss_steps_{stem}{sc}"), &mut out, &|p| {
                    plots::plot_loss_curves(&data, LossAxis::Steps, p)
                })?;
                both(format!("loss_tokens_{stem}{sc}"), &mut out, &|p| {
                    plots::plot_loss_curves(&data, LossAxis::Tokens, p)
                })?;
            }
            // Final loss vs lr, one line per batch size, aligned at each optimum.
            let series: Vec<LrSeries> = lr_series(report)
                .into_iter()
                .filter(|(sc, opt, _, _)| sc == s && *opt == o.label)
                .map(|(_, _, b, mut x)| {
                    x.label = format!("B = {b}");
                    x
                })
                .collect();
            if series.iter().any(|x| x.points.len() > 1) {
                let data = LrSensitivityPlot {
                    title: format!("{}: final loss vs lr / best lr", titled(&o.label, s)),
                    max_loss: lr_plot_cap(&series),
                    series,
                };
                both(format!("lr_{}{sc}", slug(&o.label)), &mut out, &|p| {
                    plots::plot_lr_sensitivity(&data, p)
                })?;
            }
        }
        // Optimizers compared at each batch size.
        if spec.optimizers.len() > 1 {
            for &b in &spec.batch_sizes {
                let series: Vec<LrSeries> = lr_series(report)
                    .into_iter()
                    .filter(|(sc, _, bb, _)| sc == s && *bb == b)
                    .map(|(_, opt, _, mut x)| {
                        x.label = opt;
                        x
                    })
                    .collect();
                if series.iter().any(|x| x.points.len() > 1) {
                    let data = LrSensitivityPlot {
                        title: format!(
                            "{}: final loss vs lr / best lr",
                            titled(&format!("B = {b}"), s)
                        ),
                        max_loss: lr_plot_cap(&series),
                        series,
                    };
                    both(format!("lr_B{b}{sc}"), &mut out, &|p| {
                        plots::plot_lr_sensitivity(&data, p)
                    })?;
                }
            }
        }
    }

    // B* against model and data size.
    for law in &report.power_laws {
        let tokens = &report.targets[law.target].tokens;
        for (key, label, fit) in [
            ("n_params", "non-embedding parameters N", law.n_params),
            ("tokens", "training tokens D", law.tokens),
        ] {
            let Some(fit) = fit else { continue };
            let points: Vec<ScalingPoint> = report
                .cbs
                .iter()
                .filter(|g| g.target == law.target && g.optimizer == law.optimizer)
                .filter_map(|g| {
                    let x = if key == "tokens" {
                        *tokens.get(&g.scenario)?
                    } else {
                        report
                            .run_results
                            .iter()
                            .find(|r| r.coords.scenario() == g.scenario)?
                            .n_params
                    };
                    Some(ScalingPoint {
                        label: g.scenario.clone(),
                        x,
                        b_star: g.b_star,
                    })
                })
                .collect();
            let data = BStarScalingPlot {
                title: format!("{}: B* vs {key}", law.optimizer),
                x_label: label.into(),
                points,
                fit: Some(fit),
            };
            let suffix = if law.target == 0 {
                String::new()
            } else {
                format!("_{}", law.target)
            };
            both(
                format!("bstar_{}_{key}{suffix}", slug(&law.optimizer)),
                &mut out,
                &|p| plots::plot_b_star_scaling(&data, p),
            )?;
        }
    }
    // B* against data size across targets, per scenario.
    for law in &report.data_laws {
        let data = BStarScalingPlot {
            title: format!(
                "{}: B* vs data size (targets after D tokens)",
                titled(&law.optimizer, &law.scenario)
            ),
            x_label: "training tokens D".into(),
            points: law
                .points
                .iter()
                .map(|&(ti, d, b_star, _)| ScalingPoint {
                    label: format!("target {ti}, D = {d}"),
                    x: d,
                    b_star,
                })
                .collect(),
            fit: Some(law.law),
        };
        let sc = if many {
            format!("_{}", slug(&law.scenario))
        } else {
            String::new()
        };
        both(
            format!("bstar_{}_data{sc}", slug(&law.optimizer)),
            &mut out,
            &|p| plots::plot_b_star_scaling(&data, p),
        )?;
    }
    Ok(out)
}

/// Final loss against learning rate, one table per scenario and optimizer: a row per batch size
/// that `cells(scenario, optimizer, batch size, lrs)` has a curve for, a column per learning
/// rate of the optimizer's grid (ascending), the cell texts as `cells` gives them (empty: no
/// point).
fn lr_tables(
    md: &mut String,
    spec: &crate::sweep::spec::SweepSpec,
    scenarios: &[String],
    cells: impl Fn(&str, &str, usize, &[f64]) -> Option<Vec<String>>,
) {
    for s in scenarios {
        for o in &spec.optimizers {
            let mut lrs: Vec<f64> = o.lr.to_vec();
            lrs.sort_by(f64::total_cmp);
            let _ = writeln!(
                md,
                "{}\n\n| batch size |{}\n|---|{}",
                titled(&o.label, s),
                lrs.iter()
                    .map(|l| format!(" lr {} |", fmt_g(*l)))
                    .collect::<String>(),
                "---|".repeat(lrs.len())
            );
            for &b in &spec.batch_sizes {
                let Some(row) = cells(s, &o.label, b, &lrs) else {
                    continue;
                };
                let mut line = format!("| {b} |");
                for c in row {
                    if c.is_empty() {
                        line += " |";
                    } else {
                        let _ = write!(line, " {c} |");
                    }
                }
                let _ = writeln!(md, "{line}");
            }
            md.push('\n');
        }
    }
}

fn markdown(report: &SweepReport, plan: &Plan, dir: &Path, plots: &[PathBuf]) -> String {
    let spec = &plan.spec;
    let mut md = String::new();
    let c = &report.runs;
    let _ = writeln!(md, "# Sweep `{}`\n", report.sweep);
    let _ = writeln!(
        md,
        "Runs: {} planned, {} finished, {} diverged, {} not finished{}. Loss: {} evaluation \
         loss. B* = 1.2·B0 + b/(5a) with B0 = {}.\n",
        c.planned,
        c.finished,
        c.diverged,
        c.missing,
        if c.missing > 0 {
            " (this report is partial)"
        } else {
            ""
        },
        match report.metric {
            Metric::Raw => "raw",
            Metric::Ewa => "best-EWA",
            Metric::Best => "lowest of raw and EWA",
        },
        report.b0
    );
    let _ = writeln!(
        md,
        "## Targets\n\n| # | target | scenario | loss |\n|---|---|---|---|"
    );
    for (i, t) in report.targets.iter().enumerate() {
        if t.values.is_empty() {
            let _ = writeln!(md, "| {i} | {} | | (reference runs not finished) |", t.name);
        }
        for (s, v) in &t.values {
            let _ = writeln!(md, "| {i} | {} | {s} | {v:.4} |", t.name);
        }
    }
    let scenarios: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for r in &report.run_results {
            let s = r.coords.scenario();
            if !v.contains(&s) {
                v.push(s);
            }
        }
        v
    };
    for (ti, t) in report.targets.iter().enumerate() {
        for s in &scenarios {
            let _ = writeln!(
                md,
                "\n## Steps to target {ti} ({}){}\n",
                t.name,
                if s.is_empty() {
                    String::new()
                } else {
                    format!(", {s}")
                }
            );
            let mut head = String::from("| batch size |");
            let mut sep = String::from("|---|");
            for o in &spec.optimizers {
                let _ = write!(head, " {0} steps | {0} tokens | {0} lr |", o.label);
                sep += "---|---|---|";
            }
            let _ = writeln!(md, "{head}\n{sep}");
            for &b in &spec.batch_sizes {
                let mut row = format!("| {b} |");
                for o in &spec.optimizers {
                    match report.steps_to_target.iter().find(|c| {
                        c.target == ti
                            && &c.scenario == s
                            && c.optimizer == o.label
                            && c.batch_size == b
                    }) {
                        Some(c) => {
                            let _ = write!(row, " {} | {} | {} |", c.steps, c.tokens, fmt_g(c.lr));
                        }
                        None => row += " not reached | | |",
                    }
                }
                let _ = writeln!(md, "{row}");
            }
        }
    }
    let _ = writeln!(
        md,
        "\n## Critical batch size\n\nS(B) = a + b/B fitted on log S (the CBS paper's fit).\n\n\
         | target | group | a | b | B* | b/(5a) | rmse(ln S) | points |\n|---|---|---|---|---|---|---|---|"
    );
    for g in &report.cbs {
        let _ = writeln!(
            md,
            "| {} | {} | {:.4} | {:.4} | {:.2} | {:.2} | {:.4} | {} |",
            g.target,
            g.group,
            g.a,
            g.b,
            g.b_star,
            g.b_star_asymptotic,
            g.rmse_log,
            g.points.len()
        );
    }
    for f in &report.cbs_failures {
        let _ = writeln!(
            md,
            "\nNo fit for target {} `{}`: {}",
            f.target, f.group, f.reason
        );
    }
    let sized: Vec<&GroupCbs> = report
        .cbs
        .iter()
        .filter(|g| {
            !spec.models.is_empty() || report.targets[g.target].tokens.contains_key(&g.scenario)
        })
        .collect();
    if !sized.is_empty() {
        let _ = writeln!(
            md,
            "\n## B* against model and data size\n\nN: non-embedding parameters; D: the \
             target's data size in training tokens.\n\n\
             | target | group | N | D | B* | b/(5a) |\n|---|---|---|---|---|---|"
        );
        for g in sized {
            let n = (!spec.models.is_empty())
                .then(|| {
                    report
                        .run_results
                        .iter()
                        .find(|r| r.coords.scenario() == g.scenario)
                        .map(|r| format!("{}", r.n_params))
                })
                .flatten()
                .unwrap_or_default();
            let d = report.targets[g.target]
                .tokens
                .get(&g.scenario)
                .map(|d| format!("{d}"))
                .unwrap_or_default();
            let _ = writeln!(
                md,
                "| {} | {} | {n} | {d} | {:.2} | {:.2} |",
                g.target, g.group, g.b_star, g.b_star_asymptotic
            );
        }
    }
    let also = |law: Option<PowerLaw>, key: &str| {
        law.map_or(String::new(), |p| {
            format!("; b/(5a) = {:.4}·{key}^{:.4}", p.coef, p.exponent)
        })
    };
    for l in &report.power_laws {
        for (key, law, asym) in [
            ("N", l.n_params, l.n_params_asymptotic),
            ("D", l.tokens, l.tokens_asymptotic),
        ] {
            if let Some(p) = law {
                let _ = writeln!(
                    md,
                    "\nTarget {} {}: B* = {:.4}·{key}^{:.4}{} (across scenarios)",
                    l.target,
                    l.optimizer,
                    p.coef,
                    p.exponent,
                    also(asym, key)
                );
            }
        }
    }
    for l in &report.data_laws {
        let _ = writeln!(
            md,
            "\n{}: B* = {:.4}·D^{:.4}{} (across targets {})",
            titled(&l.optimizer, &l.scenario),
            l.law.coef,
            l.law.exponent,
            also(l.asymptotic, "D"),
            l.points
                .iter()
                .map(|p| p.0.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(
        md,
        "\n## Optimal learning rate per batch size\n\nThe lr with the lowest final loss.\n"
    );
    let mut head = String::from("| scenario | batch size |");
    let mut sep = String::from("|---|---|");
    for o in &spec.optimizers {
        let _ = write!(head, " {0} lr | {0} final loss |", o.label);
        sep += "---|---|";
    }
    let _ = writeln!(md, "{head}\n{sep}");
    for s in &scenarios {
        for &b in &spec.batch_sizes {
            let mut row = format!("| {s} | {b} |");
            for o in &spec.optimizers {
                match report
                    .optimal_lr
                    .iter()
                    .find(|x| &x.scenario == s && x.optimizer == o.label && x.batch_size == b)
                {
                    Some(x) => {
                        let _ = write!(row, " {} | {:.4} |", fmt_g(x.lr), x.final_loss);
                    }
                    None => row += " | |",
                }
            }
            let _ = writeln!(md, "{row}");
        }
    }
    let _ = writeln!(md, "\n## Final loss vs learning rate\n");
    lr_tables(&mut md, spec, &scenarios, |s, o, b, lrs| {
        let curve = report
            .lr_curves
            .iter()
            .find(|c| c.scenario == s && c.optimizer == o && c.batch_size == b)?;
        Some(
            lrs.iter()
                .map(|l| match curve.points.iter().find(|p| p.0 == *l) {
                    Some((_, x)) if x.is_finite() => format!("{x:.4}"),
                    Some(_) => "diverged".into(),
                    None => String::new(),
                })
                .collect(),
        )
    });
    if !report.seed_steps.is_empty() {
        let (resamples, level) = SEED_BOOTSTRAP;
        let _ = writeln!(
            md,
            "## Steps to target over seeds\n\nPer seed, the first evaluation below the target, \
             minimised over that seed's runs of the cell (learning rates and other axes; `—`: not \
             reached); mean ± standard deviation and the {}% percentile bootstrap interval of the \
             mean ({resamples} resamples) over the seeds that reached it.\n\n| target | group | \
             batch size | steps per seed | mean ± sd | interval of the mean |\n|---|---|---|---|---|---|",
            level * 100.0
        );
        for c in &report.seed_steps {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                c.target,
                c.group,
                c.batch_size,
                c.per_seed
                    .iter()
                    .map(|x| match x.1 {
                        Some(v) => format!("{v} (seed {})", x.0),
                        None => format!("— (seed {})", x.0),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                c.steps
                    .map(|x| format!("{:.1} ± {:.1}", x.mean, x.std))
                    .unwrap_or_default(),
                c.interval
                    .map(|x| format!("{:.1} – {:.1}", x.lo, x.hi))
                    .unwrap_or_default()
            );
        }
        md += "\n";
    }
    if !report.seed_cbs.is_empty() {
        let (resamples, level) = SEED_BOOTSTRAP;
        let _ = writeln!(
            md,
            "## Critical batch size over seeds\n\nThe whole analysis repeated on each seed's \
             runs alone (each seed with its own reference targets): `B*` per seed, mean ± \
             standard deviation, and the {}% percentile bootstrap interval of the mean \
             ({resamples} resamples of the seeds).\n\n| target | group | B* per seed | B* mean ± sd \
             | interval of the mean | b/(5a) mean ± sd |\n|---|---|---|---|---|---|",
            level * 100.0
        );
        for g in &report.seed_cbs {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.2} ± {:.2} | {} | {:.2} ± {:.2} |",
                g.target,
                g.group,
                g.per_seed
                    .iter()
                    .map(|x| format!("{:.2} (seed {})", x.1, x.0))
                    .collect::<Vec<_>>()
                    .join(", "),
                g.b_star.mean,
                g.b_star.std,
                g.b_star_interval
                    .map(|x| format!("{:.2} – {:.2}", x.lo, x.hi))
                    .unwrap_or_default(),
                g.b_star_asymptotic.mean,
                g.b_star_asymptotic.std
            );
        }
        md += "\n";
    }
    if !report.seed_laws.is_empty() {
        let _ = writeln!(
            md,
            "## Power laws over seeds\n\nExponents fitted on each seed's runs alone, mean ± \
             standard deviation and the bootstrap interval of the mean.\n\n| law | optimizer \
             | exponent per seed | mean ± sd | interval of the mean |\n|---|---|---|---|---|"
        );
        for l in &report.seed_laws {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.3} ± {:.3} | {} |",
                l.law,
                l.optimizer,
                l.per_seed
                    .iter()
                    .map(|x| format!("{:.3} (seed {})", x.1, x.0))
                    .collect::<Vec<_>>()
                    .join(", "),
                l.exponent.mean,
                l.exponent.std,
                l.interval
                    .map(|x| format!("{:.3} – {:.3}", x.lo, x.hi))
                    .unwrap_or_default()
            );
        }
        md += "\n";
    }
    if !report.lr_seed_curves.is_empty() {
        let _ = writeln!(
            md,
            "## Final loss vs learning rate over seeds\n\nMean ± standard deviation of the \
             final loss over the seeds (n per cell in `lr_seeds.csv`); `diverged` where a seed \
             diverged.\n"
        );
        lr_tables(&mut md, spec, &scenarios, |s, o, b, lrs| {
            let curve = report
                .lr_seed_curves
                .iter()
                .find(|c| c.scenario == s && c.optimizer == o && c.batch_size == b)?;
            Some(
                lrs.iter()
                    .map(|l| match curve.points.iter().find(|p| p.lr == *l) {
                        Some(p) if p.stats.mean.is_finite() => {
                            format!("{:.4} ± {:.4}", p.stats.mean, p.stats.std)
                        }
                        Some(_) => "diverged".into(),
                        None => String::new(),
                    })
                    .collect(),
            )
        });
        let _ = writeln!(
            md,
            "## Learning-rate stability\n\nThe learning rates whose mean final loss is within a \
             relative tolerance of the best mean loss (contiguous around the best; ends \
             interpolated in log lr; `≥` where the range reaches the edge of the grid, so the \
             true range is wider). Per seed: the width of each seed's own range, mean ± standard \
             deviation over the seeds.\n\n| scenario | optimizer | batch size | best lr | best \
             loss (mean ± sd, n) | tolerance | lr range | width (decades) | per-seed width | \
             seeds' best lrs |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        for t in &report.lr_stability {
            let r = &t.mean_curve;
            let open = if r.lo_open || r.hi_open { "≥ " } else { "" };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.4} ± {:.4} ({}) | {} % | {}{} – {}{} | {}{:.2} | {} | {} |",
                t.scenario,
                t.optimizer,
                t.batch_size,
                fmt_g(r.best_lr),
                t.best.mean,
                t.best.std,
                t.best.n,
                t.tolerance * 100.0,
                if r.lo_open { "≤ " } else { "" },
                sig3(r.lo),
                if r.hi_open { "≥ " } else { "" },
                sig3(r.hi),
                open,
                r.decades,
                t.seed_decades
                    .map(|d| format!("{:.2} ± {:.2}", d.mean, d.std))
                    .unwrap_or_default(),
                t.seed_best_lrs
                    .iter()
                    .map(|x| fmt_g(*x))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        md += "\n";
    }
    if !report.timing.is_empty() {
        let _ = writeln!(
            md,
            "## Time per step\n\nMean wall-clock seconds per training step (this machine, \
             while it ran; evaluation excluded).\n"
        );
        let mut head = String::from("| scenario | batch size |");
        let mut sep = String::from("|---|---|");
        for o in &spec.optimizers {
            let _ = write!(head, " {} |", o.label);
            sep += "---|";
        }
        let _ = writeln!(md, "{head}\n{sep}");
        for s in &scenarios {
            for &b in &spec.batch_sizes {
                let mut row = format!("| {s} | {b} |");
                for o in &spec.optimizers {
                    match report
                        .timing
                        .iter()
                        .find(|t| &t.scenario == s && t.optimizer == o.label && t.batch_size == b)
                    {
                        Some(t) => {
                            let _ = write!(row, " {:.4} |", t.seconds_per_step);
                        }
                        None => row += " |",
                    }
                }
                let _ = writeln!(md, "{row}");
            }
        }
    }
    let not_counted: Vec<&RunResult> = report
        .run_results
        .iter()
        .filter(|r| r.state != "finished")
        .collect();
    if !not_counted.is_empty() {
        let _ = writeln!(md, "\n## Runs not finished\n");
        for r in not_counted {
            let _ = writeln!(md, "- `{}` {}: {}", r.id, r.coords.describe(), r.state);
        }
    }
    let _ = writeln!(md, "\n## Files\n");
    for p in plots
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
    {
        let rel = p.strip_prefix(dir).unwrap_or(p);
        let _ = writeln!(md, "- [{0}]({0})", rel.display());
    }
    md
}

/// The short table printed at the end of `sweep report`: steps to the first target and the fits.
pub fn console_table(report: &SweepReport, plan: &Plan) -> String {
    let spec = &plan.spec;
    let mut out = String::new();
    let Some(t) = report.targets.first() else {
        return "no targets: give [targets] loss or reference to get steps to target\n".into();
    };
    let _ = writeln!(
        out,
        "runs: {} finished, {} diverged, {} not finished (of {})",
        report.runs.finished, report.runs.diverged, report.runs.missing, report.runs.planned
    );
    for (s, v) in &t.values {
        let _ = writeln!(
            out,
            "target 0 ({}){}: loss {v:.4}",
            t.name,
            if s.is_empty() {
                String::new()
            } else {
                format!(" [{s}]")
            }
        );
    }
    let mut scenarios: Vec<String> = t.values.keys().cloned().collect();
    scenarios.dedup();
    for s in &scenarios {
        let _ = write!(
            out,
            "\nsteps to target{}\n{:>10}",
            if s.is_empty() {
                String::new()
            } else {
                format!(" [{s}]")
            },
            "batch"
        );
        for o in &spec.optimizers {
            let _ = write!(out, " {:>14}", o.label);
        }
        out += "\n";
        for &b in &spec.batch_sizes {
            let _ = write!(out, "{b:>10}");
            for o in &spec.optimizers {
                let cell = report.steps_to_target.iter().find(|c| {
                    c.target == 0 && &c.scenario == s && c.optimizer == o.label && c.batch_size == b
                });
                let text = cell.map_or("-".to_string(), |c| {
                    format!("{} (lr {})", c.steps, fmt_g(c.lr))
                });
                let _ = write!(out, " {text:>14}");
            }
            out += "\n";
        }
    }
    let _ = writeln!(out, "\ncritical batch size (B0 = {}):", report.b0);
    for g in report.cbs.iter().filter(|g| g.target == 0) {
        let _ = writeln!(
            out,
            "  {:<16} a = {:>9.2}  b = {:>10.2}  B* = {:>8.2}  b/(5a) = {:>8.2}",
            g.group, g.a, g.b, g.b_star, g.b_star_asymptotic
        );
    }
    for f in report.cbs_failures.iter().filter(|f| f.target == 0) {
        let _ = writeln!(out, "  {:<16} no fit: {}", f.group, f.reason);
    }
    for l in report.power_laws.iter().filter(|l| l.target == 0) {
        for (key, law) in [("N", l.n_params), ("D", l.tokens)] {
            if let Some(p) = law {
                let _ = writeln!(
                    out,
                    "  {}: B* = {:.4}·{key}^{:.4}",
                    l.optimizer, p.coef, p.exponent
                );
            }
        }
    }
    for l in &report.data_laws {
        let _ = writeln!(
            out,
            "  {}: B* = {:.4}·D^{:.4} across targets",
            titled(&l.optimizer, &l.scenario),
            l.law.coef,
            l.law.exponent
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::SweepSpec;

    /// Two models, five batch sizes, three targets after 40, 80 and 160 steps of the reference
    /// batch B = 2 (context 32: 2560, 5120 and 10240 tokens).
    const SPEC: &str = r#"
name = "t"
[base.model]
preset = "test"
[base.train]
steps = 200
[base.eval]
tokens = 256
[[optimizers]]
lr = [1e-3]
config = { name = "adamw" }
[axes]
batch_size = [2, 4, 8, 16, 32]
models = [{ label = "small", d_model = 16 }, { label = "wide", d_model = 32 }]
[targets]
reference = [
    { optimizer = "adamw", batch_size = 2, tokens = 2560 },
    { optimizer = "adamw", batch_size = 2, tokens = 5120 },
    { optimizer = "adamw", batch_size = 2, tokens = 10240 },
]
[report]
b0 = 2
"#;

    /// Progress after `s` steps at batch `b` when reaching progress `p` takes `p + c·p²/b` steps:
    /// the larger the target (the data size), the larger the critical batch size.
    fn progress(s: f64, b: f64, c: f64) -> f64 {
        let k = c / b;
        ((1.0 + 4.0 * k * s).sqrt() - 1.0) / (2.0 * k)
    }

    /// Finished runs with an evaluation every step, the wide model's `c` twice the small one's.
    fn synthetic(plan: &Plan) -> Vec<RunResult> {
        plan.runs
            .iter()
            .map(|r| {
                let b = r.coords.batch_size as f64;
                let c = if r.coords.model == "wide" { 0.2 } else { 0.1 };
                let tokens_per_step = r.coords.batch_size * r.config.model.context();
                let evals: Vec<EvalPoint> = (0..=200u64)
                    .map(|s| EvalPoint {
                        step: s,
                        tokens: s * tokens_per_step as u64,
                        loss: 5.0 / (1.0 + progress(s as f64, b, c)),
                    })
                    .collect();
                RunResult {
                    id: r.id.clone(),
                    coords: r.coords.clone(),
                    state: "finished".into(),
                    steps: 200,
                    final_loss: evals.last().map(|e| e.loss),
                    steps_to_target: Vec::new(),
                    evals,
                    seconds_per_step: None,
                    n_params: r.config.model.non_embedding_params() as f64,
                    budget_tokens: None,
                }
            })
            .collect()
    }

    #[test]
    fn b_star_is_fitted_against_data_size_across_targets_and_model_size_per_target() {
        let plan = SweepSpec::parse(SPEC).unwrap().plan().unwrap();
        let report = build_from(&plan, synthetic(&plan)).unwrap();
        assert!(report.cbs_failures.is_empty(), "{:?}", report.cbs_failures);
        assert_eq!(report.cbs.len(), 2 * 3);
        // Each target's data size is its reference's token count, in every scenario.
        for (t, d) in report.targets.iter().zip([2560.0, 5120.0, 10240.0]) {
            assert_eq!(t.tokens.values().copied().collect::<Vec<_>>(), [d, d]);
        }
        // B* against D: one law per model over the three targets, growing with D.
        assert_eq!(report.data_laws.len(), 2);
        for law in &report.data_laws {
            let ds: Vec<f64> = law.points.iter().map(|p| p.1).collect();
            assert_eq!(ds, [2560.0, 5120.0, 10240.0]);
            let xy: Vec<(f64, f64)> = law.points.iter().map(|p| (p.1, p.2)).collect();
            let direct = analysis::fit_power_law("check", &xy).unwrap();
            assert_eq!(direct.exponent, law.law.exponent);
            // B* = 1.2·B0 + b/(5a) grows more slowly than its b/(5a) part (≈ c·p/5 here).
            let asym = law.asymptotic.unwrap();
            assert!(law.law.exponent > 0.05, "{law:?}");
            assert!(
                asym.exponent > law.law.exponent && asym.exponent < 1.0,
                "{law:?}"
            );
            for &(ti, _, b_star, b_asym) in &law.points {
                let g = report
                    .cbs
                    .iter()
                    .find(|g| g.target == ti && g.scenario == law.scenario)
                    .unwrap();
                assert_eq!((g.b_star, g.b_star_asymptotic), (b_star, b_asym));
            }
        }
        // B* against N per target (a larger c, a larger B*); D is the same in both scenarios,
        // so there is no law against D across them.
        assert_eq!(report.power_laws.len(), 3);
        for l in &report.power_laws {
            assert!(l.n_params.unwrap().exponent > 0.0, "{l:?}");
            assert!(l.n_params_asymptotic.unwrap().exponent > 0.0, "{l:?}");
            assert!(l.tokens.is_none() && l.tokens_asymptotic.is_none());
        }

        // The files: the per-target CSVs carry N and D, the across-target CSV reproduces the
        // data laws through `cbs fit`'s analysis, the plots and the markdown show them.
        let dir = tempfile::tempdir().unwrap();
        write(&report, &plan, dir.path()).unwrap();
        let rows =
            crate::analysis::csv::read_cbs_csv(&dir.path().join("steps_to_target_1.csv")).unwrap();
        assert!(rows
            .iter()
            .all(|r| r.tokens == Some(5120.0) && r.n_params.is_some()));
        let rows = crate::analysis::csv::read_cbs_csv(&dir.path().join(DATA_CSV)).unwrap();
        let small: Vec<CbsRow> = rows
            .into_iter()
            .filter(|r| r.group.starts_with("adamw/small/"))
            .collect();
        assert_eq!(small.len(), 15);
        let refit = analysis::analyze(&small, report.b0).unwrap();
        let law = report
            .data_laws
            .iter()
            .find(|l| l.scenario == "small")
            .unwrap();
        let e = refit.power_laws.tokens.unwrap().exponent;
        assert!((e - law.law.exponent).abs() < 1e-12, "{e} vs {law:?}");
        for f in [
            "bstar_adamw_data_small.png",
            "bstar_adamw_data_wide.svg",
            "bstar_adamw_n_params.png",
            "bstar_adamw_n_params_2.svg",
        ] {
            assert!(dir.path().join("plots").join(f).is_file(), "{f}");
        }
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("## B* against model and data size"), "{md}");
        assert!(md.contains("adamw [wide]: B* = "), "{md}");
        assert!(md.contains("·D^"), "{md}");
        let console = console_table(&report, &plan);
        assert!(console.contains("across targets"), "{console}");
    }

    #[test]
    fn targets_at_a_step_have_no_data_size() {
        let spec = SPEC
            .replace("tokens = 2560", "step = 40")
            .replace("tokens = 5120", "step = 80")
            .replace("tokens = 10240", "step = 160");
        let plan = SweepSpec::parse(&spec).unwrap().plan().unwrap();
        let report = build_from(&plan, synthetic(&plan)).unwrap();
        assert!(report.targets.iter().all(|t| t.tokens.is_empty()));
        assert!(report.data_laws.is_empty());
        // The targets themselves are the same losses as after the matching token counts.
        let by_tokens = SweepSpec::parse(SPEC).unwrap().plan().unwrap();
        let other = build_from(&by_tokens, synthetic(&by_tokens)).unwrap();
        for (a, b) in report.targets.iter().zip(&other.targets) {
            assert_eq!(a.values, b.values);
        }
    }

    /// One batch size, four learning rates, three seeds; the final loss is a parabola in
    /// log10(lr) around 3e-3 plus 0.01 per seed, and seed 2 diverges at the largest lr.
    const SEEDED: &str = r#"
name = "s"
[base.model]
preset = "test"
[base.train]
steps = 10
[base.eval]
tokens = 256
[[optimizers]]
lr = [1e-3, 3e-3, 1e-2, 3e-2]
config = { name = "adamw" }
[axes]
batch_size = [4]
seed = [0, 1, 2]
[report]
metric = "raw"
"#;

    fn seeded_loss(lr: f64, seed: u64) -> f64 {
        if lr == 3e-2 && seed == 2 {
            return f64::INFINITY;
        }
        let d = (lr / 3e-3).log10();
        2.0 + 0.1 * d * d + 0.01 * seed as f64
    }

    fn seeded_runs(plan: &Plan) -> Vec<RunResult> {
        plan.runs
            .iter()
            .map(|r| {
                let loss = seeded_loss(r.coords.lr, r.coords.seed);
                let diverged = !loss.is_finite();
                RunResult {
                    id: r.id.clone(),
                    coords: r.coords.clone(),
                    state: if diverged { "diverged" } else { "finished" }.into(),
                    steps: 10,
                    final_loss: Some(loss),
                    steps_to_target: Vec::new(),
                    evals: vec![EvalPoint {
                        step: 10,
                        tokens: 10,
                        loss,
                    }],
                    seconds_per_step: None,
                    n_params: r.config.model.non_embedding_params() as f64,
                    budget_tokens: None,
                }
            })
            .collect()
    }

    #[test]
    fn seeds_give_loss_spreads_and_learning_rate_ranges() {
        let plan = SweepSpec::parse(SEEDED).unwrap().plan().unwrap();
        let report = build_from(&plan, seeded_runs(&plan)).unwrap();
        assert_eq!(report.lr_seed_curves.len(), 1);
        let curve = &report.lr_seed_curves[0];
        assert_eq!(curve.points.len(), 4);
        for p in &curve.points {
            assert_eq!(p.per_seed.len(), 3);
            let expect: Vec<f64> = (0..3).map(|s| seeded_loss(p.lr, s)).collect();
            assert_eq!(p.per_seed.iter().map(|x| x.1).collect::<Vec<_>>(), expect);
            if p.lr == 3e-2 {
                assert!(p.stats.mean.is_infinite());
            } else {
                assert!((p.stats.mean - (seeded_loss(p.lr, 0) + 0.01)).abs() < 1e-12);
                assert!((p.stats.std - 0.01).abs() < 1e-12);
            }
        }
        assert_eq!(report.lr_stability.len(), LR_RANGE_TOLERANCES.len());
        let one = &report.lr_stability[0];
        assert_eq!(one.tolerance, 0.01);
        assert_eq!(one.mean_curve.best_lr, 3e-3);
        assert!((one.best.mean - 2.01).abs() < 1e-12);
        // Mean curve: 2.01 + 0.1·d²; within 1 % (≤ 2.0301) on [1e-3, 1e-2] only partly: the
        // neighbours are at d ≈ ±0.5 (loss ≈ 2.033), just outside, so both ends are interior.
        let r = &one.mean_curve;
        assert!(!r.lo_open && !r.hi_open);
        assert!(
            r.lo > 1e-3 && r.lo < 3e-3 && r.hi > 3e-3 && r.hi < 1e-2,
            "{r:?}"
        );
        assert_eq!(one.seed_best_lrs, [3e-3, 3e-3, 3e-3]);
        assert_eq!(one.seed_decades.unwrap().n, 3);
        // 5 %: the whole finite part of the grid, up to the diverged mean at 3e-2.
        let five = &report.lr_stability[1];
        assert!(five.mean_curve.lo_open && !five.mean_curve.hi_open);
        assert_eq!((five.mean_curve.lo, five.mean_curve.hi), (1e-3, 1e-2));
        // The files and the report sections.
        let dir = tempfile::tempdir().unwrap();
        let written = write(&report, &plan, dir.path()).unwrap();
        for name in ["lr_seeds.csv", "lr_seed_runs.csv", "lr_stability.csv"] {
            assert!(written.iter().any(|p| p.ends_with(name)), "{name}");
        }
        let csv = std::fs::read_to_string(dir.path().join("lr_seed_runs.csv")).unwrap();
        assert_eq!(csv.lines().count(), 1 + 12);
        assert!(csv.contains(",0.03,2,inf"), "{csv}");
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("## Learning-rate stability"));
        assert!(md.contains("2.0100 ± 0.0100"), "{md}");
        // One seed: no seed sections.
        let single = SweepSpec::parse(&SEEDED.replace("seed = [0, 1, 2]", "seed = [0]"))
            .unwrap()
            .plan()
            .unwrap();
        let report = build_from(&single, seeded_runs(&single)).unwrap();
        assert!(report.lr_seed_curves.is_empty() && report.lr_stability.is_empty());
    }

    #[test]
    fn b_star_and_its_laws_are_fitted_per_seed() {
        let spec = SPEC.replace(
            "batch_size = [2, 4, 8, 16, 32]\n",
            "batch_size = [2, 4, 8, 16, 32]\nseed = [0, 1, 2]\n",
        );
        let plan = SweepSpec::parse(&spec).unwrap().plan().unwrap();
        // Each seed's curves: the noise scale c grows with the seed (so does B*).
        let mut runs = synthetic(&plan);
        for r in runs.iter_mut() {
            let b = r.coords.batch_size as f64;
            let c = if r.coords.model == "wide" { 0.2 } else { 0.1 }
                * (1.0 + 0.2 * r.coords.seed as f64);
            for e in r.evals.iter_mut() {
                e.loss = 5.0 / (1.0 + progress(e.step as f64, b, c));
            }
            r.final_loss = r.evals.last().map(|e| e.loss);
        }
        let report = build_from(&plan, runs.clone()).unwrap();
        // 3 targets × 2 models, every seed fitted.
        assert_eq!(report.seed_cbs.len(), 6);
        for g in &report.seed_cbs {
            assert_eq!(g.per_seed.len(), 3, "{g:?}");
            let one = build_from(
                &plan,
                runs.iter()
                    .filter(|r| r.coords.seed == 1)
                    .cloned()
                    .collect(),
            )
            .unwrap();
            let want = one
                .cbs
                .iter()
                .find(|x| x.target == g.target && x.group == g.group)
                .unwrap();
            assert_eq!(g.per_seed[1], (1, want.b_star, want.b_star_asymptotic));
            // B* grows with the seed's noise scale; the interval brackets the mean.
            assert!(g.per_seed[0].1 < g.per_seed[1].1 && g.per_seed[1].1 < g.per_seed[2].1);
            let iv = g.b_star_interval.unwrap();
            assert!(iv.lo <= g.b_star.mean && g.b_star.mean <= iv.hi, "{iv:?}");
            assert!(iv.lo >= g.b_star.min - 1e-9 && iv.hi <= g.b_star.max + 1e-9);
        }
        // Laws: B* vs N per target (3) and B* vs D across targets per model (2).
        let names: Vec<&str> = report.seed_laws.iter().map(|l| l.law.as_str()).collect();
        assert_eq!(
            names.iter().filter(|n| n.starts_with("B* vs N")).count(),
            3,
            "{names:?}"
        );
        assert_eq!(
            names
                .iter()
                .filter(|n| n.starts_with("B* vs D across targets"))
                .count(),
            2,
            "{names:?}"
        );
        for l in &report.seed_laws {
            assert_eq!(l.per_seed.len(), 3);
            assert!(l.exponent.mean > 0.0, "{l:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let written = write(&report, &plan, dir.path()).unwrap();
        assert!(written.iter().any(|p| p.ends_with("cbs_seeds.csv")));
        assert!(written.iter().any(|p| p.ends_with("laws_seeds.csv")));
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("## Critical batch size over seeds"));
        // One seed: nothing over seeds.
        let single = build_from(
            &SweepSpec::parse(SPEC).unwrap().plan().unwrap(),
            synthetic(&SweepSpec::parse(SPEC).unwrap().plan().unwrap()),
        )
        .unwrap();
        assert!(single.seed_cbs.is_empty() && single.seed_laws.is_empty());
    }

    #[test]
    fn steps_to_target_are_given_per_seed() {
        let spec = SPEC.replace(
            "batch_size = [2, 4, 8, 16, 32]\n",
            "batch_size = [2, 4, 8, 16, 32]\nseed = [0, 1, 2]\n",
        );
        let plan = SweepSpec::parse(&spec).unwrap().plan().unwrap();
        // Seed s progresses at (1 + s/2) times seed 0's rate, so it needs fewer steps, and
        // seed 0 of the wide model at B = 2 never gets below any target.
        let mut runs = synthetic(&plan);
        for r in runs.iter_mut() {
            let b = r.coords.batch_size as f64;
            let c = if r.coords.model == "wide" { 0.2 } else { 0.1 };
            let rate = 1.0 + 0.5 * r.coords.seed as f64;
            let stuck = r.coords.model == "wide" && r.coords.seed == 0 && b == 2.0;
            for e in r.evals.iter_mut() {
                e.loss = if stuck {
                    9.0
                } else {
                    5.0 / (1.0 + rate * progress(e.step as f64, b, c))
                };
            }
            r.final_loss = r.evals.last().map(|e| e.loss);
        }
        let report = build_from(&plan, runs).unwrap();
        assert!(!report.seed_steps.is_empty());
        let mut not_reached = 0;
        for c in &report.seed_steps {
            assert_eq!(c.per_seed.len(), 3, "{c:?}");
            // Each seed's figure is the minimum of its own runs' steps to the target ...
            for &(seed, steps) in &c.per_seed {
                let own = report
                    .run_results
                    .iter()
                    .filter(|r| {
                        r.coords.seed == seed
                            && r.coords.optimizer == c.optimizer
                            && r.coords.batch_size == c.batch_size
                            && r.coords.scenario() == c.scenario
                    })
                    .filter_map(|r| r.steps_to_target[c.target])
                    .min();
                assert_eq!(steps, own, "{c:?}");
            }
            // ... the pooled table's figure is the smallest of them ...
            let pooled = report
                .steps_to_target
                .iter()
                .find(|p| {
                    p.target == c.target
                        && p.optimizer == c.optimizer
                        && p.scenario == c.scenario
                        && p.batch_size == c.batch_size
                })
                .map(|p| p.steps);
            assert_eq!(pooled, c.per_seed.iter().filter_map(|x| x.1).min(), "{c:?}");
            // ... and faster seeds need no more steps.
            let reached: Vec<u64> = c.per_seed.iter().filter_map(|x| x.1).collect();
            assert!(reached.windows(2).all(|w| w[0] >= w[1]), "{c:?}");
            if c.per_seed[0].1.is_none() {
                not_reached += 1;
                assert_eq!(c.steps.unwrap().n, reached.len());
            }
            if let (Some(st), Some(iv)) = (c.steps, c.interval) {
                assert!(iv.lo <= st.mean && st.mean <= iv.hi, "{c:?}");
            }
        }
        assert!(not_reached > 0, "the stuck runs must show as not reached");
        let dir = tempfile::tempdir().unwrap();
        let written = write(&report, &plan, dir.path()).unwrap();
        assert!(written.iter().any(|p| p.ends_with("steps_seeds.csv")));
        let csv = std::fs::read_to_string(dir.path().join("steps_seeds.csv")).unwrap();
        assert_eq!(csv.lines().count(), 1 + report.seed_steps.len());
        assert!(csv.contains(";0:;") || csv.contains(",0:;"), "{csv}");
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("## Steps to target over seeds"));
        assert!(md.contains("— (seed 0)"), "{md}");
        // One seed: no such section.
        let single = SweepSpec::parse(SPEC).unwrap().plan().unwrap();
        assert!(build_from(&single, synthetic(&single))
            .unwrap()
            .seed_steps
            .is_empty());
    }

    #[test]
    fn lr_plots_cap_blown_up_losses() {
        let series = |pts: Vec<(f64, f64)>| {
            vec![LrSeries {
                label: "x".into(),
                points: pts,
                bars: Vec::new(),
            }]
        };
        let calm = series(vec![(1e-3, 2.4), (1e-2, 2.2), (1e-1, 3.0)]);
        assert_eq!(lr_plot_cap(&calm), None);
        let blown = series(vec![
            (1e-3, 2.4),
            (1e-2, 2.0),
            (1e-1, 429.0),
            (1.0, f64::INFINITY),
        ]);
        assert_eq!(lr_plot_cap(&blown), Some(3.0));
        assert_eq!(lr_plot_cap(&series(vec![(1e-3, f64::INFINITY)])), None);
    }
}
