//! The sweep definition: a base run config, axes, batch-size rules and target losses, read from
//! TOML, validated (errors name the field), and expanded into the runs of a [`Plan`].
//!
//! ```toml
//! name = "cbs-demo"                    # names the sweep (paths, Slurm job name)
//! runs_dir = "runs/cbs-demo"           # run directories (default runs/<name>)
//! report_dir = "results/cbs-demo"      # report files (default <runs_dir>/report)
//!
//! [base]                               # a run config (see runner::config) without [optimizer]
//! threads = 1
//! [base.model]
//! preset = "tiny"
//! [base.train]
//! tokens = 400_000
//! [base.eval]
//! interval = 25
//!
//! [[optimizers]]                       # each optimizer with its own learning-rate grid
//! label = "adamw"                      # its name in reports (default: the optimizer's name)
//! lr = [1e-3, 3e-3, 1e-2]
//! config = { name = "adamw", betas = [0.9, 0.95], weight_decay = 0.0 }
//! set = { "optimizer.betas.0" = [0.9, 0.95] }   # axes of this optimizer only (optional)
//!
//! [axes]
//! batch_size = [4, 8, 16, 32, 64]      # sequences per step (required)
//! seed = [0, 1]                        # optional
//! models = [{ label = "d64", d_model = 64 }, { label = "d128", d_model = 128 }]  # optional
//! budgets = [{ label = "1x", chinchilla = 1.0 }, { label = "2x", tokens = 4_000_000 }]
//! set = { "train.grad_clip" = [0.5, 1.0] }      # any other run-config field (optional)
//!
//! [[rules]]                            # hyperparameters tied to the batch size, in order
//! kind = "beta2"                       # the CBS paper's β2 table (optimizer.betas.1)
//! batch_scale = 16                     # our batch B looks up the table at B × 16
//! [[rules]]
//! kind = "ewa_tau"                     # the CBS paper's EWA τ table (ewa.taus = [τ])
//! [[rules]]
//! kind = "warmup"                      # warm-up = fraction × Chinchilla steps at this B
//! fraction = 0.25
//! [[rules]]
//! kind = "precondition_frequency"      # SOAP/Shampoo: frequency × batch size held constant
//! reference_batch = 64
//! reference_frequency = 10
//! [[rules]]
//! kind = "table"                       # any field, from (batch size, value) points
//! field = "train.steps"
//! points = [[4, 2000], [64, 300]]
//!
//! [targets]
//! loss = [2.2]                         # fixed target losses
//! reference = [{ optimizer = "adamw", batch_size = 4 }]  # the loss a reference run reached
//! # … after D tokens: the target of data size D (runs must be long enough to cross it)
//! # reference = [{ optimizer = "adamw", batch_size = 4, tokens = 65_536 }]
//!
//! [report]
//! metric = "ewa"                       # raw | ewa | best: which evaluation loss counts
//! b0 = 4                               # reference batch of B* (default: the smallest)
//!
//! [slurm]                              # defaults of `sweep slurm` (flags override)
//! tasks = 8
//! time = "02:00:00"
//! ```
//!
//! **Expansion.** Every combination of model × budget × optimizer × batch size × learning rate
//! × `set` values (global and the optimizer's) × seed is one run. Its config is built on the
//! base table in that order: the model entry (merged into `[model]`; one with a `preset`
//! replaces it), the budget, the optimizer table with its lr, the `set` values, then the rules
//! in file order. Paths are dotted run-config paths whose numeric parts index arrays
//! (`optimizer.betas.1`); an optimizer field the table does not give is first filled with
//! that optimizer's default, so `optimizer.betas.1` works on `{ name = "adamw" }`. The result is
//! parsed and validated as a [`RunConfig`].
//!
//! **Ids.** A run's id is a 64-bit FNV-1a hash of its resolved config (the canonical TOML of
//! [`RunConfig::to_toml`]) with the fields that do not change its results reset (`threads`,
//! `checkpoint.interval`, `device`). It depends on nothing else: not on the order of axes or values in the
//! file, the position in the plan, the time, the machine or the paths. A later optlab version
//! that adds a config field changes the canonical text, and with it the ids.
//!
//! **Rules.** Table rules (`beta2`, `ewa_tau`, `table`) look the value up at `B × batch_scale`:
//! between two points, linearly in `log B` (`interpolate = "log"`, the default) or the value of
//! the largest point at or below it (`"step"`); outside the points, the nearest end. Integer
//! points give integer values (rounded). `warmup` sets `schedule.warmup_ratio = fraction` and
//! `schedule.warmup_reference_steps = chinchilla_tokens / (B × context)`, with
//! `chinchilla_tokens` (default `20 ×` the model's non-embedding parameters) — the CBS paper's
//! warm-up, a fraction of the Chinchilla step count at that batch size. `precondition_frequency`
//! sets `round(reference_frequency × reference_batch / B)` (at least 1), as the SOAP paper's
//! batch-size experiment does. A rule applies to every optimizer that has its field, or to
//! those listed in `optimizers = [labels]`; an optional field that is unset by default (such
//! as AdEMAMix's `beta3_warmup`) counts only where the optimizer's `config` gives it. A field set by an axis cannot also be set by a rule;
//! in particular a budget axis sets the run length, so no rule may set `train.steps` or
//! `train.tokens` next to it.
//!
//! **Model and data size.** The CBS paper's targets are the loss a reference batch size reaches
//! after `D` tokens, with every run long enough to cross them. A budget axis makes `D` the run
//! length itself, which suits fixed-loss targets; for the paper's protocol, give the run lengths
//! per batch size by a `train.steps` rule and one reference target per data size
//! (`tokens = D`): with a constant learning rate one set of runs serves every `D` up to its
//! length, and the report fits `B*` against `D` across those targets. A model axis with such a
//! target gives `B*` against model size at fixed data, each model with its own target.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::optim::OptimConfig;
use crate::runner::RunConfig;

/// The CBS paper's batch sizes (sequences of 512 tokens) of its β2 and τ table
/// (`scripts/train.py`, `hardcode_opt_params`).
pub const CBS_TABLE_BATCH: [f64; 9] = [
    64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];
/// The CBS paper's AdamW β2 per batch size of [`CBS_TABLE_BATCH`].
pub const CBS_BETA2: [f64; 9] = [0.999, 0.999, 0.995, 0.99, 0.99, 0.95, 0.95, 0.95, 0.95];
/// The CBS paper's EWA decay τ per batch size of [`CBS_TABLE_BATCH`].
pub const CBS_EWA_TAU: [f64; 9] = [
    0.9995, 0.9995, 0.9995, 0.9995, 0.999, 0.998, 0.995, 0.99, 0.99,
];
/// Chinchilla tokens per non-embedding parameter.
pub const CHINCHILLA_TOKENS_PER_PARAM: f64 = 20.0;

/// Top-level keys of a sweep file.
const KEYS: [&str; 10] = [
    "name",
    "runs_dir",
    "report_dir",
    "base",
    "optimizers",
    "axes",
    "rules",
    "targets",
    "report",
    "slurm",
];

/// An axis over any run-config field: a dotted path and the values it takes.
#[derive(Debug, Clone, PartialEq)]
pub struct SetAxis {
    /// Dotted run-config path (`optimizer.betas.0`).
    pub path: String,
    /// The values, in file order.
    pub values: Vec<toml::Value>,
}

/// One optimizer of the sweep with its learning-rate grid.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerAxis {
    /// Its name in plans and reports.
    pub label: String,
    /// The `[optimizer]` table (with `name`; `lr` comes from the grid).
    pub config: toml::Table,
    /// The learning rates.
    pub lr: Vec<f64>,
    /// Axes of this optimizer only.
    pub set: Vec<SetAxis>,
}

/// One model of the model axis.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelChoice {
    /// Its name in plans and reports.
    pub label: String,
    /// Fields merged into the base `[model]` (or replacing it, when they name a `preset`).
    pub table: toml::Table,
}

/// A training budget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    /// Training tokens (`train.tokens`).
    Tokens(u64),
    /// Optimizer steps (`train.steps`).
    Steps(u64),
    /// A multiple of the Chinchilla tokens (20 × non-embedding parameters).
    Chinchilla(f64),
}

/// One entry of the budget axis.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetChoice {
    /// Its name in plans and reports.
    pub label: String,
    /// The budget.
    pub budget: Budget,
}

/// How a table rule reads between its points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolate {
    /// Linear in `log B` between points; the nearest end outside.
    #[default]
    Log,
    /// The value of the largest point at or below `B` (the first point below all of them).
    Step,
}

/// What a rule computes from the batch size.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleKind {
    /// A value looked up in `(batch size, value)` points.
    Table {
        /// Dotted run-config path it sets.
        field: String,
        /// The points, sorted by batch size.
        points: Vec<(f64, f64)>,
        /// Whether every point value is an integer (the result is then rounded).
        integer: bool,
        /// How to read between points.
        interpolate: Interpolate,
        /// The table's batch size for our batch size 1.
        batch_scale: f64,
        /// Set the field to a one-element list (`ewa.taus`).
        as_list: bool,
    },
    /// Warm-up as a fraction of the Chinchilla step count at the batch size.
    Warmup {
        /// The fraction (CBS default 0.25).
        fraction: f64,
        /// Chinchilla tokens (default: 20 × the run's non-embedding parameters).
        chinchilla_tokens: Option<f64>,
    },
    /// Preconditioner refresh period inversely proportional to the batch size.
    PreconditionFrequency {
        /// The batch size at which the frequency is `reference_frequency`.
        reference_batch: f64,
        /// The frequency at `reference_batch`.
        reference_frequency: f64,
    },
}

/// A rule tying a hyperparameter to the batch size.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// `rules[i]`, for errors.
    pub name: String,
    /// What it computes.
    pub kind: RuleKind,
    /// Labels of the optimizers it applies to (`None`: every optimizer with the field).
    pub optimizers: Option<Vec<String>>,
}

impl Rule {
    /// The dotted run-config path the rule sets (the warm-up rule: its ratio).
    pub fn field(&self) -> &str {
        match &self.kind {
            RuleKind::Table { field, .. } => field,
            RuleKind::Warmup { .. } => "schedule.warmup_ratio",
            RuleKind::PreconditionFrequency { .. } => "optimizer.precondition_frequency",
        }
    }
}

/// A target defined by a reference run: the loss the best run of `optimizer` at `batch_size`
/// (minimum over the other hyperparameters) reached by `step` or `tokens` (default: at its last
/// evaluation), per model and budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceTarget {
    /// Optimizer label of the reference runs.
    pub optimizer: String,
    /// Batch size of the reference runs.
    pub batch_size: usize,
    /// Take the loss reached by this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// Take the loss reached by this many training tokens: the target's data size `D` (the
    /// report fits `B*` against it across targets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
}

/// The target losses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Targets {
    /// Fixed target losses.
    pub loss: Vec<f64>,
    /// Targets taken from reference runs.
    pub reference: Vec<ReferenceTarget>,
}

/// Which evaluation loss the report uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// The raw parameters' (Schedule-Free: its evaluation point's) loss.
    Raw,
    /// The best EWA's loss (the raw one where the evaluation has none, e.g. step 0).
    #[default]
    Ewa,
    /// The lowest of the raw and EWA losses.
    Best,
}

/// Report settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportSpec {
    /// Which evaluation loss counts.
    pub metric: Metric,
    /// Reference batch size `B0` of `B* = 1.2·B0 + b/(5a)` (default: the smallest batch size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b0: Option<f64>,
}

/// Defaults of the `sweep slurm` script (each can be overridden by a flag).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmSpec {
    /// Array tasks (shards); default: one per run, at most 64.
    pub tasks: Option<usize>,
    /// At most this many tasks at once (`--array=0-N%max`).
    pub max_parallel: Option<usize>,
    /// Partition.
    pub partition: Option<String>,
    /// Time limit per task (`HH:MM:SS` or Slurm's other forms).
    pub time: Option<String>,
    /// CPUs per task.
    pub cpus_per_task: Option<usize>,
    /// Memory per task (`8G`).
    pub mem: Option<String>,
    /// GPUs per task (`--gres=gpu:N`).
    pub gpus: Option<usize>,
    /// Account.
    pub account: Option<String>,
    /// Log file pattern (default `<runs_dir>/slurm/%A_%a.out`).
    pub output: Option<String>,
    /// Further `#SBATCH` lines, without the prefix (`--qos=high`).
    pub extra: Vec<String>,
}

/// A validated sweep definition.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSpec {
    /// Sweep name.
    pub name: String,
    /// Where run directories go.
    pub runs_dir: PathBuf,
    /// Where the report goes.
    pub report_dir: PathBuf,
    /// The base run config (no `[optimizer]`).
    pub base: toml::Table,
    /// The optimizers.
    pub optimizers: Vec<OptimizerAxis>,
    /// Batch sizes in sequences, ascending.
    pub batch_sizes: Vec<usize>,
    /// Seeds (`None`: the base's).
    pub seeds: Option<Vec<u64>>,
    /// Models (empty: the base's).
    pub models: Vec<ModelChoice>,
    /// Budgets (empty: the base's).
    pub budgets: Vec<BudgetChoice>,
    /// Axes over other fields, for every optimizer.
    pub set: Vec<SetAxis>,
    /// Batch-size rules, in file order.
    pub rules: Vec<Rule>,
    /// Target losses.
    pub targets: Targets,
    /// Report settings.
    pub report: ReportSpec,
    /// Slurm defaults.
    pub slurm: SlurmSpec,
}

/// Where a run sits in the sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Coords {
    /// Optimizer label.
    pub optimizer: String,
    /// Batch size in sequences.
    pub batch_size: usize,
    /// Learning rate.
    pub lr: f64,
    /// Seed.
    pub seed: u64,
    /// Model label (empty without a model axis).
    pub model: String,
    /// Budget label (empty without a budget axis).
    pub budget: String,
    /// The `set` axes' values, by path (TOML text).
    pub set: BTreeMap<String, String>,
}

impl Coords {
    /// The scenario the run belongs to: model and budget (targets and fits are per scenario).
    pub fn scenario(&self) -> String {
        scenario_name(&self.model, &self.budget)
    }

    /// A short description (`adamw B=16 lr=0.003 …`).
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} B={} lr={}",
            self.optimizer,
            self.batch_size,
            fmt_g(self.lr)
        );
        for (k, v) in &self.set {
            let _ = write!(s, " {k}={v}");
        }
        let sc = self.scenario();
        if !sc.is_empty() {
            let _ = write!(s, " [{sc}]");
        }
        let _ = write!(s, " seed={}", self.seed);
        s
    }
}

/// The name of a scenario (model and budget labels joined by `/`; empty when neither axis is
/// given).
pub fn scenario_name(model: &str, budget: &str) -> String {
    match (model.is_empty(), budget.is_empty()) {
        (true, true) => String::new(),
        (false, true) => model.to_string(),
        (true, false) => budget.to_string(),
        (false, false) => format!("{model}/{budget}"),
    }
}

/// A number in short form (`0.003`, `1e-05`).
pub fn fmt_g(x: f64) -> String {
    let s = format!("{x}");
    let e = format!("{x:e}");
    if e.len() < s.len() {
        e
    } else {
        s
    }
}

/// One run of the plan.
#[derive(Debug, Clone)]
pub struct PlannedRun {
    /// Stable id (see the module docs).
    pub id: String,
    /// Its coordinates.
    pub coords: Coords,
    /// Its resolved config.
    pub config: RunConfig,
}

/// The expanded sweep: every run, in expansion order.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The definition.
    pub spec: SweepSpec,
    /// The runs.
    pub runs: Vec<PlannedRun>,
}

fn typed<T: serde::de::DeserializeOwned>(field: &str, value: toml::Value) -> Result<T> {
    value
        .try_into()
        .map_err(|e: toml::de::Error| Error::config(field, e.message().trim_end().to_string()))
}

fn as_table(field: &str, value: toml::Value) -> Result<toml::Table> {
    match value {
        toml::Value::Table(t) => Ok(t),
        other => Err(Error::config(
            field,
            format!("must be a table, got a {}", other.type_str()),
        )),
    }
}

fn as_array(field: &str, value: toml::Value) -> Result<Vec<toml::Value>> {
    match value {
        toml::Value::Array(a) => Ok(a),
        other => Err(Error::config(
            field,
            format!("must be an array, got a {}", other.type_str()),
        )),
    }
}

fn take_str(t: &mut toml::Table, field: &str, key: &str) -> Result<Option<String>> {
    t.remove(key)
        .map(|v| typed::<String>(&format!("{field}.{key}"), v))
        .transpose()
}

fn number(field: &str, v: &toml::Value) -> Result<f64> {
    match v {
        toml::Value::Float(x) => Ok(*x),
        toml::Value::Integer(i) => Ok(*i as f64),
        other => Err(Error::config(
            field,
            format!("must be a number, got a {}", other.type_str()),
        )),
    }
}

fn no_unknown(t: &toml::Table, field: &str, known: &[&str]) -> Result<()> {
    if let Some(k) = t.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(Error::config(
            format!("{field}.{k}"),
            format!("unknown key; expected one of {}", known.join(", ")),
        ));
    }
    Ok(())
}

fn check_path(field: &str, path: &str) -> Result<()> {
    if path.is_empty() || path.split('.').any(|p| p.is_empty()) {
        return Err(Error::config(
            field,
            format!("`{path}` is not a dotted run-config path"),
        ));
    }
    let root = path.split('.').next().unwrap_or_default();
    if !crate::runner::config::SECTIONS.contains(&root) {
        return Err(Error::config(
            field,
            format!(
                "`{path}` does not start with a run-config key ({})",
                crate::runner::config::SECTIONS.join(", ")
            ),
        ));
    }
    Ok(())
}

fn parse_set(field: &str, value: toml::Value) -> Result<Vec<SetAxis>> {
    let table = as_table(field, value)?;
    let mut out = Vec::new();
    for (path, values) in table {
        let f = format!("{field}.\"{path}\"");
        check_path(&f, &path)?;
        for reserved in ["optimizer.lr", "optimizer.name", "train.batch_size", "seed"] {
            if path == reserved {
                return Err(Error::config(
                    &f,
                    "has its own axis (optimizers[].lr, optimizers[].config.name, \
                     axes.batch_size, axes.seed)",
                ));
            }
        }
        let values = as_array(&f, values)?;
        if values.is_empty() {
            return Err(Error::config(&f, "must list at least one value"));
        }
        for (i, v) in values.iter().enumerate() {
            if values[..i].contains(v) {
                return Err(Error::config(format!("{f}[{i}]"), "is listed twice"));
            }
        }
        out.push(SetAxis { path, values });
    }
    Ok(out)
}

fn check_distinct<T: PartialEq + std::fmt::Debug>(field: &str, xs: &[T]) -> Result<()> {
    for (i, x) in xs.iter().enumerate() {
        if xs[..i].contains(x) {
            return Err(Error::config(
                format!("{field}[{i}]"),
                format!("{x:?} is listed twice"),
            ));
        }
    }
    Ok(())
}

impl SweepSpec {
    /// Reads and validates a sweep file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        Self::parse(&text).map_err(|e| match e {
            Error::Config { field, reason } => Error::Config {
                field,
                reason: format!("{reason} (in {})", path.display()),
            },
            other => other,
        })
    }

    /// Parses and validates a sweep definition (see the module docs).
    pub fn parse(text: &str) -> Result<Self> {
        let mut t: toml::Table =
            toml::from_str(text).map_err(|e| Error::config("sweep", e.to_string()))?;
        no_unknown(&t, "sweep", &KEYS).map_err(|e| match e {
            Error::Config { field, reason } => Error::Config {
                field: field.trim_start_matches("sweep.").to_string(),
                reason,
            },
            o => o,
        })?;
        let name: String = match t.remove("name") {
            Some(v) => typed("name", v)?,
            None => return Err(Error::config("name", "is missing: give the sweep a name")),
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(Error::config(
                "name",
                format!("`{name}` must be non-empty ASCII letters, digits, `-`, `_` or `.`"),
            ));
        }
        let runs_dir: PathBuf = match t.remove("runs_dir") {
            Some(v) => typed("runs_dir", v)?,
            None => PathBuf::from("runs").join(&name),
        };
        let report_dir: PathBuf = match t.remove("report_dir") {
            Some(v) => typed("report_dir", v)?,
            None => runs_dir.join("report"),
        };
        let base = match t.remove("base") {
            Some(v) => as_table("base", v)?,
            None => {
                return Err(Error::config(
                    "base",
                    "is missing: give the base run config as [base]",
                ))
            }
        };
        if base.contains_key("optimizer") {
            return Err(Error::config(
                "base.optimizer",
                "the optimizers come from [[optimizers]]; remove it from [base]",
            ));
        }
        let optimizers = match t.remove("optimizers") {
            Some(v) => {
                let items = as_array("optimizers", v)?;
                let mut out = Vec::new();
                for (i, item) in items.into_iter().enumerate() {
                    out.push(parse_optimizer(&format!("optimizers[{i}]"), item)?);
                }
                out
            }
            None => Vec::new(),
        };
        if optimizers.is_empty() {
            return Err(Error::config(
                "optimizers",
                "is missing: give at least one [[optimizers]] with `config` and `lr`",
            ));
        }
        let labels: Vec<&String> = optimizers.iter().map(|o| &o.label).collect();
        check_distinct("optimizers[].label", &labels)?;

        let mut axes = match t.remove("axes") {
            Some(v) => as_table("axes", v)?,
            None => return Err(Error::config("axes", "is missing: give [axes] batch_size")),
        };
        no_unknown(
            &axes,
            "axes",
            &["batch_size", "seed", "models", "budgets", "set"],
        )?;
        let mut batch_sizes: Vec<usize> = match axes.remove("batch_size") {
            Some(v) => typed("axes.batch_size", v)?,
            None => {
                return Err(Error::config(
                    "axes.batch_size",
                    "is missing: list the batch sizes",
                ))
            }
        };
        if batch_sizes.is_empty() {
            return Err(Error::config(
                "axes.batch_size",
                "must list at least one batch size",
            ));
        }
        for (i, &b) in batch_sizes.iter().enumerate() {
            if b == 0 {
                return Err(Error::config(
                    format!("axes.batch_size[{i}]"),
                    "must be >= 1",
                ));
            }
        }
        check_distinct("axes.batch_size", &batch_sizes)?;
        batch_sizes.sort_unstable();
        let seeds: Option<Vec<u64>> = axes
            .remove("seed")
            .map(|v| typed("axes.seed", v))
            .transpose()?;
        if let Some(s) = &seeds {
            if s.is_empty() {
                return Err(Error::config("axes.seed", "must list at least one seed"));
            }
            check_distinct("axes.seed", s)?;
        }
        let models = match axes.remove("models") {
            Some(v) => parse_models(v)?,
            None => Vec::new(),
        };
        let budgets = match axes.remove("budgets") {
            Some(v) => parse_budgets(v)?,
            None => Vec::new(),
        };
        let set = match axes.remove("set") {
            Some(v) => parse_set("axes.set", v)?,
            None => Vec::new(),
        };
        for o in &optimizers {
            for a in &o.set {
                if set.iter().any(|g| g.path == a.path) {
                    return Err(Error::config(
                        format!("optimizers.{}.set.\"{}\"", o.label, a.path),
                        "is also a global axis (axes.set)",
                    ));
                }
            }
        }

        let rules = match t.remove("rules") {
            Some(v) => {
                let items = as_array("rules", v)?;
                let mut out = Vec::new();
                for (i, item) in items.into_iter().enumerate() {
                    out.push(parse_rule(&format!("rules[{i}]"), item, &labels)?);
                }
                out
            }
            None => Vec::new(),
        };
        for r in &rules {
            if !budgets.is_empty() && (r.field() == "train.steps" || r.field() == "train.tokens") {
                return Err(Error::config(
                    &r.name,
                    format!(
                        "sets `{}`, but the budget axis (axes.budgets) sets the run length; for \
                         targets after D tokens in runs longer than D, drop the budget axis and \
                         give targets.reference entries with `tokens = D`",
                        r.field()
                    ),
                ));
            }
            let axis_paths = set
                .iter()
                .chain(optimizers.iter().flat_map(|o| o.set.iter()))
                .map(|a| a.path.as_str());
            for p in axis_paths {
                if p == r.field() || p.starts_with(&format!("{}.", r.field())) {
                    return Err(Error::config(
                        &r.name,
                        format!("sets `{}`, which an axis also sets (`{p}`)", r.field()),
                    ));
                }
            }
        }

        let targets: Targets = t
            .remove("targets")
            .map(|v| typed("targets", v))
            .transpose()?
            .unwrap_or_default();
        for (i, &l) in targets.loss.iter().enumerate() {
            crate::error::check::positive(&format!("targets.loss[{i}]"), l)?;
        }
        for (i, r) in targets.reference.iter().enumerate() {
            let f = format!("targets.reference[{i}]");
            if !labels.contains(&&r.optimizer) {
                return Err(Error::config(
                    format!("{f}.optimizer"),
                    format!(
                        "`{}` is not an optimizer label of the sweep ({})",
                        r.optimizer,
                        join_labels(&labels)
                    ),
                ));
            }
            if !batch_sizes.contains(&r.batch_size) {
                return Err(Error::config(
                    format!("{f}.batch_size"),
                    format!("{} is not in axes.batch_size", r.batch_size),
                ));
            }
            if r.step.is_some() && r.tokens.is_some() {
                return Err(Error::config(
                    format!("{f}.tokens"),
                    "conflicts with step: give one",
                ));
            }
        }
        let report: ReportSpec = t
            .remove("report")
            .map(|v| typed("report", v))
            .transpose()?
            .unwrap_or_default();
        if let Some(b0) = report.b0 {
            crate::error::check::positive("report.b0", b0)?;
        }
        let slurm: SlurmSpec = t
            .remove("slurm")
            .map(|v| typed("slurm", v))
            .transpose()?
            .unwrap_or_default();
        if slurm.tasks == Some(0) {
            return Err(Error::config("slurm.tasks", "must be >= 1"));
        }
        let spec = SweepSpec {
            name,
            runs_dir,
            report_dir,
            base,
            optimizers,
            batch_sizes,
            seeds,
            models,
            budgets,
            set,
            rules,
            targets,
            report,
            slurm,
        };
        Ok(spec)
    }

    /// The reference batch size of the critical-batch-size fit.
    pub fn b0(&self) -> f64 {
        self.report.b0.unwrap_or_else(|| self.batch_sizes[0] as f64)
    }

    /// Expands the sweep into its runs (see the module docs); every run config is validated,
    /// and two runs with the same id are an error.
    pub fn plan(&self) -> Result<Plan> {
        let models: Vec<Option<&ModelChoice>> = if self.models.is_empty() {
            vec![None]
        } else {
            self.models.iter().map(Some).collect()
        };
        let budgets: Vec<Option<&BudgetChoice>> = if self.budgets.is_empty() {
            vec![None]
        } else {
            self.budgets.iter().map(Some).collect()
        };
        let base_seed = match self.base.get("seed") {
            Some(v) => typed::<u64>("base.seed", v.clone())?,
            None => 0,
        };
        let seeds = self.seeds.clone().unwrap_or_else(|| vec![base_seed]);
        self.check_run_count(models.len(), budgets.len(), seeds.len())?;
        let mut runs: Vec<PlannedRun> = Vec::new();
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for model in &models {
            for budget in &budgets {
                for opt in &self.optimizers {
                    let axes: Vec<&SetAxis> = self.set.iter().chain(opt.set.iter()).collect();
                    for &batch in &self.batch_sizes {
                        for &lr in &opt.lr {
                            for combo in combinations(&axes) {
                                for &seed in &seeds {
                                    let coords = Coords {
                                        optimizer: opt.label.clone(),
                                        batch_size: batch,
                                        lr,
                                        seed,
                                        model: model.map(|m| m.label.clone()).unwrap_or_default(),
                                        budget: budget.map(|b| b.label.clone()).unwrap_or_default(),
                                        set: axes
                                            .iter()
                                            .zip(&combo)
                                            .map(|(a, v)| (a.path.clone(), v.to_string()))
                                            .collect(),
                                    };
                                    let config = self
                                        .resolve(
                                            *model, *budget, opt, batch, lr, seed, &axes, &combo,
                                        )
                                        .map_err(|e| in_run(e, &coords))?;
                                    let id = run_id(&config)?;
                                    if let Some(&other) = seen.get(&id) {
                                        return Err(Error::config(
                                            "sweep",
                                            format!(
                                                "runs `{}` and `{}` resolve to the same config \
                                                 (id {id}): an axis or rule has no effect",
                                                runs[other].coords.describe(),
                                                coords.describe()
                                            ),
                                        ));
                                    }
                                    seen.insert(id.clone(), runs.len());
                                    runs.push(PlannedRun { id, coords, config });
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(Plan {
            spec: self.clone(),
            runs,
        })
    }

    /// Refuses a sweep of more than [`MAX_RUNS`] runs before expanding it: the product of the
    /// axes' lengths is counted without overflow, so a file whose axes multiply to an absurd
    /// number is an error rather than an expansion that never ends or exhausts memory.
    fn check_run_count(&self, models: usize, budgets: usize, seeds: usize) -> Result<()> {
        let mut total: Option<usize> = Some(0);
        for opt in &self.optimizers {
            let per_opt = self
                .set
                .iter()
                .chain(opt.set.iter())
                .try_fold(1usize, |n, a| n.checked_mul(a.values.len()))
                .and_then(|n| n.checked_mul(self.batch_sizes.len()))
                .and_then(|n| n.checked_mul(opt.lr.len()))
                .and_then(|n| n.checked_mul(seeds));
            total = total.zip(per_opt).and_then(|(t, n)| t.checked_add(n));
        }
        let total = total
            .and_then(|n| n.checked_mul(models))
            .and_then(|n| n.checked_mul(budgets));
        match total {
            Some(n) if n <= MAX_RUNS => Ok(()),
            _ => Err(Error::config(
                "sweep",
                format!(
                    "{} runs (the product of the axes' lengths): more than the {MAX_RUNS} a \
                     sweep may hold; split it into several files",
                    total.map_or_else(|| "over 2^64".to_string(), |n| n.to_string())
                ),
            )),
        }
    }

    /// The run-config table of one point of the sweep.
    #[allow(clippy::too_many_arguments)]
    fn resolve(
        &self,
        model: Option<&ModelChoice>,
        budget: Option<&BudgetChoice>,
        opt: &OptimizerAxis,
        batch: usize,
        lr: f64,
        seed: u64,
        axes: &[&SetAxis],
        combo: &[toml::Value],
    ) -> Result<RunConfig> {
        let mut t = self.base.clone();
        if let Some(m) = model {
            if m.table.contains_key("preset") {
                t.insert("model".into(), toml::Value::Table(m.table.clone()));
            } else {
                let slot = t
                    .entry("model")
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                let mt = slot.as_table_mut().ok_or_else(|| {
                    Error::config("base.model", "must be a table to merge a model axis into")
                })?;
                for (k, v) in &m.table {
                    mt.insert(k.clone(), v.clone());
                }
            }
        }
        let mut optimizer = opt.config.clone();
        optimizer.insert("lr".into(), toml::Value::Float(lr));
        t.insert("optimizer".into(), toml::Value::Table(optimizer));
        t.insert("seed".into(), toml_int("seed", seed)?);
        set_path(&mut t, "train.batch_size", toml_int("batch", batch as u64)?)?;
        if let Some(b) = budget {
            match b.budget {
                Budget::Tokens(n) => set_budget(&mut t, "tokens", n)?,
                Budget::Steps(n) => set_budget(&mut t, "steps", n)?,
                Budget::Chinchilla(m) => {
                    let n = (m * chinchilla_tokens(&t)?).round() as u64;
                    set_budget(&mut t, "tokens", n.max(1))?;
                }
            }
        }
        for (a, v) in axes.iter().zip(combo) {
            set_path(&mut t, &a.path, v.clone())?;
        }
        for r in &self.rules {
            self.apply_rule(r, &mut t, opt, batch)?;
        }
        RunConfig::from_table(t)
    }

    fn apply_rule(
        &self,
        rule: &Rule,
        t: &mut toml::Table,
        opt: &OptimizerAxis,
        batch: usize,
    ) -> Result<()> {
        let listed = match &rule.optimizers {
            Some(l) => {
                if !l.contains(&opt.label) {
                    return Ok(());
                }
                true
            }
            None => false,
        };
        let field = rule.field();
        if let Some(key) = field.strip_prefix("optimizer.") {
            let key = key.split('.').next().unwrap_or_default();
            let name = opt
                .config
                .get("name")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            // Optional fields (e.g. AdEMAMix's `beta3_warmup`) are absent from the defaults;
            // the optimizer's own table giving one counts as having it.
            if !optimizer_has(name, key)? && !opt.config.contains_key(key) {
                if listed {
                    return Err(Error::config(
                        format!("{}.optimizers", rule.name),
                        format!(
                            "lists `{}`, but optimizer `{name}` has no field `{key}`",
                            opt.label
                        ),
                    ));
                }
                return Ok(());
            }
        }
        let b = batch as f64;
        match &rule.kind {
            RuleKind::Table {
                field,
                points,
                integer,
                interpolate,
                batch_scale,
                as_list,
            } => {
                let x = lookup(points, b * batch_scale, *interpolate);
                let v = if *integer {
                    toml::Value::Integer(x.round() as i64)
                } else {
                    toml::Value::Float(x)
                };
                let v = if *as_list {
                    toml::Value::Array(vec![v])
                } else {
                    v
                };
                if field == "train.steps" || field == "train.tokens" {
                    let other = if field == "train.steps" {
                        "tokens"
                    } else {
                        "steps"
                    };
                    if let Some(tr) = t.get_mut("train").and_then(|v| v.as_table_mut()) {
                        tr.remove(other);
                    }
                }
                set_path(t, field, v)
            }
            RuleKind::Warmup {
                fraction,
                chinchilla_tokens: tokens,
            } => {
                let tokens = match tokens {
                    Some(n) => *n,
                    None => chinchilla_tokens(t)?,
                };
                let context = model_of(t)?.context() as f64;
                let reference = tokens / (b * context);
                let slot = t
                    .entry("schedule")
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                let s = slot
                    .as_table_mut()
                    .ok_or_else(|| Error::config("base.schedule", "must be a table"))?;
                s.entry("kind")
                    .or_insert_with(|| toml::Value::String("constant".into()));
                s.remove("warmup_steps");
                s.insert("warmup_ratio".into(), toml::Value::Float(*fraction));
                s.insert(
                    "warmup_reference_steps".into(),
                    toml::Value::Float(reference),
                );
                Ok(())
            }
            RuleKind::PreconditionFrequency {
                reference_batch,
                reference_frequency,
            } => {
                let f = (reference_frequency * reference_batch / b).round().max(1.0);
                set_path(t, field, toml::Value::Integer(f as i64))
            }
        }
    }
}

fn join_labels(labels: &[&String]) -> String {
    labels
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Names the run in a config error that came from resolving it.
fn in_run(e: Error, coords: &Coords) -> Error {
    match e {
        Error::Config { field, reason } => Error::Config {
            field,
            reason: format!("{reason} (in run {})", coords.describe()),
        },
        other => other,
    }
}

fn toml_int(field: &str, x: u64) -> Result<toml::Value> {
    i64::try_from(x)
        .map(toml::Value::Integer)
        .map_err(|_| Error::config(field, format!("{x} does not fit a TOML integer")))
}

/// Sets `train.<key> = n` and removes the other budget key.
fn set_budget(t: &mut toml::Table, key: &str, n: u64) -> Result<()> {
    let other = if key == "steps" { "tokens" } else { "steps" };
    if let Some(tr) = t.get_mut("train").and_then(|v| v.as_table_mut()) {
        tr.remove(other);
    }
    set_path(t, &format!("train.{key}"), toml_int("budget", n)?)
}

/// The model a config table describes (preset expanded).
fn model_of(t: &toml::Table) -> Result<crate::models::ModelConfig> {
    let mut probe = toml::Table::new();
    if let Some(m) = t.get("model") {
        probe.insert("model".into(), m.clone());
    }
    probe.insert(
        "optimizer".into(),
        toml::Value::Table(toml::from_str("name = \"sgd\"").expect("literal")),
    );
    let mut train = toml::Table::new();
    train.insert("steps".into(), toml::Value::Integer(1));
    probe.insert("train".into(), toml::Value::Table(train));
    Ok(RunConfig::from_table(probe)?.model)
}

/// 20 × the non-embedding parameters of the config's model.
fn chinchilla_tokens(t: &toml::Table) -> Result<f64> {
    Ok(CHINCHILLA_TOKENS_PER_PARAM * model_of(t)?.non_embedding_params() as f64)
}

/// Whether optimizer `name`'s config has the field `key`.
fn optimizer_has(name: &str, key: &str) -> Result<bool> {
    let cfg = OptimConfig::default_for(name)?;
    let t = toml::Table::try_from(&cfg).map_err(|e| Error::config("optimizer", e.to_string()))?;
    Ok(t.contains_key(key))
}

/// Sets the dotted `path` of a run-config table to `value`. Numeric parts index arrays;
/// missing tables are created; an optimizer field the table lacks is first filled with the
/// optimizer's default (so `optimizer.betas.1` can set one element).
pub fn set_path(t: &mut toml::Table, path: &str, value: toml::Value) -> Result<()> {
    let keys: Vec<&str> = path.split('.').collect();
    if keys.len() >= 3 && keys[0] == "optimizer" {
        if let Some(opt) = t.get_mut("optimizer").and_then(|v| v.as_table_mut()) {
            if !opt.contains_key(keys[1]) {
                let name = opt
                    .get("name")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string();
                let cfg = OptimConfig::default_for(&name)?;
                let defaults = toml::Table::try_from(&cfg)
                    .map_err(|e| Error::config("optimizer", e.to_string()))?;
                if let Some(d) = defaults.get(keys[1]) {
                    opt.insert(keys[1].to_string(), d.clone());
                }
            }
        }
    }
    crate::runner::set_dotted(t, path, value)
}

/// Every combination of the axes' values (one empty combination without axes).
fn combinations(axes: &[&SetAxis]) -> Vec<Vec<toml::Value>> {
    let mut out: Vec<Vec<toml::Value>> = vec![Vec::new()];
    for a in axes {
        let mut next = Vec::with_capacity(out.len() * a.values.len());
        for prefix in &out {
            for v in &a.values {
                let mut c = prefix.clone();
                c.push(v.clone());
                next.push(c);
            }
        }
        out = next;
    }
    out
}

/// The most runs a sweep may expand to (see [`SweepSpec::plan`]).
pub const MAX_RUNS: usize = 100_000;

/// Reads sorted `(x, y)` points at `x` (see [`Interpolate`]).
pub fn lookup(points: &[(f64, f64)], x: f64, how: Interpolate) -> f64 {
    let (first, last) = (points[0], points[points.len() - 1]);
    if x <= first.0 {
        return first.1;
    }
    if x >= last.0 {
        return last.1;
    }
    let i = points.iter().rposition(|p| p.0 <= x).unwrap_or(0);
    let (lo, hi) = (points[i], points[i + 1]);
    match how {
        Interpolate::Step => lo.1,
        Interpolate::Log => {
            let w = (x.ln() - lo.0.ln()) / (hi.0.ln() - lo.0.ln());
            lo.1 + w * (hi.1 - lo.1)
        }
    }
}

/// The id of a resolved run config: FNV-1a 64 of its canonical TOML, `threads`,
/// `checkpoint.interval` and `device` reset, as 16 hex digits.
pub fn run_id(config: &RunConfig) -> Result<String> {
    let mut c = config.clone();
    c.threads = 0;
    c.checkpoint.interval = 0;
    c.device = crate::runner::DeviceSpec::Cpu;
    let text = c.to_toml()?;
    Ok(format!("{:016x}", fnv1a64(text.as_bytes())))
}

/// 64-bit FNV-1a.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn parse_optimizer(field: &str, item: toml::Value) -> Result<OptimizerAxis> {
    let mut t = as_table(field, item)?;
    no_unknown(&t, field, &["label", "config", "lr", "set"])?;
    let config = match t.remove("config") {
        Some(v) => as_table(&format!("{field}.config"), v)?,
        None => {
            return Err(Error::config(
                format!("{field}.config"),
                "is missing: give the optimizer table, e.g. config = { name = \"adamw\" }",
            ))
        }
    };
    let name = match config.get("name") {
        Some(toml::Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(Error::config(
                format!("{field}.config.name"),
                format!("must be a string, got a {}", other.type_str()),
            ))
        }
        None => {
            return Err(Error::config(
                format!("{field}.config.name"),
                format!("is missing (one of {})", OptimConfig::NAMES.join(", ")),
            ))
        }
    };
    if !OptimConfig::NAMES.contains(&name.as_str()) {
        return Err(Error::config(
            format!("{field}.config.name"),
            format!(
                "unknown optimizer `{name}`; known: {}",
                OptimConfig::NAMES.join(", ")
            ),
        ));
    }
    if config.contains_key("lr") {
        return Err(Error::config(
            format!("{field}.config.lr"),
            format!("the learning rates come from {field}.lr; remove it here"),
        ));
    }
    let label = take_str(&mut t, field, "label")?.unwrap_or_else(|| name.clone());
    if label.is_empty() || label.contains(['/', ',', '"', '\n']) {
        return Err(Error::config(
            format!("{field}.label"),
            format!("`{label}` must be non-empty without `/`, `,`, quotes or newlines"),
        ));
    }
    let lr = match t.remove("lr") {
        Some(v) => {
            let items = as_array(&format!("{field}.lr"), v)?;
            let mut out = Vec::new();
            for (i, x) in items.iter().enumerate() {
                let f = format!("{field}.lr[{i}]");
                let x = number(&f, x)?;
                crate::error::check::positive(&f, x)?;
                out.push(x);
            }
            out
        }
        None => {
            return Err(Error::config(
                format!("{field}.lr"),
                "is missing: list the learning rates",
            ))
        }
    };
    if lr.is_empty() {
        return Err(Error::config(
            format!("{field}.lr"),
            "must list at least one learning rate",
        ));
    }
    check_distinct(&format!("{field}.lr"), &lr)?;
    let set = match t.remove("set") {
        Some(v) => parse_set(&format!("{field}.set"), v)?,
        None => Vec::new(),
    };
    Ok(OptimizerAxis {
        label,
        config,
        lr,
        set,
    })
}

fn parse_label(field: &str, t: &mut toml::Table) -> Result<Option<String>> {
    let label = take_str(t, field, "label")?;
    if let Some(l) = &label {
        if l.is_empty() || l.contains(['/', ',', '"', '\n']) {
            return Err(Error::config(
                format!("{field}.label"),
                format!("`{l}` must be non-empty without `/`, `,`, quotes or newlines"),
            ));
        }
    }
    Ok(label)
}

fn parse_models(v: toml::Value) -> Result<Vec<ModelChoice>> {
    let items = as_array("axes.models", v)?;
    let mut out = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let field = format!("axes.models[{i}]");
        let mut t = as_table(&field, item)?;
        let label = parse_label(&field, &mut t)?;
        let label = match label {
            Some(l) => l,
            None => match t.get("preset").and_then(|p| p.as_str()) {
                Some(p) => p.to_string(),
                None => {
                    return Err(Error::config(
                        format!("{field}.label"),
                        "is missing (needed when the entry has no preset)",
                    ))
                }
            },
        };
        if t.is_empty() {
            return Err(Error::config(&field, "gives no model field"));
        }
        out.push(ModelChoice { label, table: t });
    }
    if out.is_empty() {
        return Err(Error::config("axes.models", "must list at least one model"));
    }
    let labels: Vec<&String> = out.iter().map(|m| &m.label).collect();
    check_distinct("axes.models[].label", &labels)?;
    Ok(out)
}

fn parse_budgets(v: toml::Value) -> Result<Vec<BudgetChoice>> {
    let items = as_array("axes.budgets", v)?;
    let mut out = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let field = format!("axes.budgets[{i}]");
        let mut t = as_table(&field, item)?;
        no_unknown(&t, &field, &["label", "tokens", "steps", "chinchilla"])?;
        let label = parse_label(&field, &mut t)?;
        let mut found = Vec::new();
        for key in ["tokens", "steps", "chinchilla"] {
            if let Some(v) = t.remove(key) {
                let f = format!("{field}.{key}");
                let b = if key == "chinchilla" {
                    let m = number(&f, &v)?;
                    crate::error::check::positive(&f, m)?;
                    Budget::Chinchilla(m)
                } else {
                    let n: u64 = typed(&f, v)?;
                    crate::error::check::at_least_one(&f, n)?;
                    if key == "tokens" {
                        Budget::Tokens(n)
                    } else {
                        Budget::Steps(n)
                    }
                };
                found.push(b);
            }
        }
        let budget = match found.as_slice() {
            [b] => *b,
            [] => {
                return Err(Error::config(
                    &field,
                    "needs one of tokens, steps or chinchilla",
                ))
            }
            _ => {
                return Err(Error::config(
                    &field,
                    "gives more than one of tokens, steps and chinchilla",
                ))
            }
        };
        let label = label.unwrap_or_else(|| match budget {
            Budget::Tokens(n) => format!("{n}tok"),
            Budget::Steps(n) => format!("{n}steps"),
            Budget::Chinchilla(m) => format!("{m}x"),
        });
        out.push(BudgetChoice { label, budget });
    }
    if out.is_empty() {
        return Err(Error::config(
            "axes.budgets",
            "must list at least one budget",
        ));
    }
    let labels: Vec<&String> = out.iter().map(|m| &m.label).collect();
    check_distinct("axes.budgets[].label", &labels)?;
    Ok(out)
}

fn parse_points(field: &str, v: toml::Value) -> Result<(Vec<(f64, f64)>, bool)> {
    let items = as_array(field, v)?;
    if items.is_empty() {
        return Err(Error::config(field, "must list at least one point"));
    }
    let mut points = Vec::new();
    let mut integer = true;
    for (i, item) in items.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let pair = match item {
            toml::Value::Array(p) if p.len() == 2 => p,
            _ => return Err(Error::config(&f, "must be a [batch_size, value] pair")),
        };
        let b = number(&format!("{f}[0]"), &pair[0])?;
        crate::error::check::positive(&format!("{f}[0]"), b)?;
        let y = number(&format!("{f}[1]"), &pair[1])?;
        if !y.is_finite() {
            return Err(Error::config(format!("{f}[1]"), "must be finite"));
        }
        integer &= matches!(pair[1], toml::Value::Integer(_));
        points.push((b, y));
    }
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    for w in points.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(Error::config(
                field,
                format!("batch size {} is listed twice", w[0].0),
            ));
        }
    }
    Ok((points, integer))
}

fn cbs_points(values: &[f64; 9]) -> Vec<(f64, f64)> {
    CBS_TABLE_BATCH
        .iter()
        .copied()
        .zip(values.iter().copied())
        .collect()
}

fn parse_rule(field: &str, item: toml::Value, labels: &[&String]) -> Result<Rule> {
    let mut t = as_table(field, item)?;
    let kind = take_str(&mut t, field, "kind")?.ok_or_else(|| {
        Error::config(
            format!("{field}.kind"),
            "is missing (beta2, ewa_tau, warmup, precondition_frequency or table)",
        )
    })?;
    let optimizers: Option<Vec<String>> = t
        .remove("optimizers")
        .map(|v| typed(&format!("{field}.optimizers"), v))
        .transpose()?;
    if let Some(list) = &optimizers {
        for (i, l) in list.iter().enumerate() {
            if !labels.contains(&l) {
                return Err(Error::config(
                    format!("{field}.optimizers[{i}]"),
                    format!(
                        "`{l}` is not an optimizer label of the sweep ({})",
                        join_labels(labels)
                    ),
                ));
            }
        }
    }
    let f = |k: &str| format!("{field}.{k}");
    let get_num = |t: &mut toml::Table, k: &str| -> Result<Option<f64>> {
        t.remove(k).map(|v| number(&f(k), &v)).transpose()
    };
    let table_opts = |t: &mut toml::Table| -> Result<(Interpolate, f64)> {
        let interpolate: Interpolate = t
            .remove("interpolate")
            .map(|v| typed(&f("interpolate"), v))
            .transpose()?
            .unwrap_or_default();
        let scale = get_num(t, "batch_scale")?.unwrap_or(1.0);
        crate::error::check::positive(&f("batch_scale"), scale)?;
        Ok((interpolate, scale))
    };
    let rule_kind = match kind.as_str() {
        "beta2" | "ewa_tau" => {
            no_unknown(
                &t,
                field,
                &["points", "interpolate", "batch_scale", "field"],
            )?;
            let (interpolate, batch_scale) = table_opts(&mut t)?;
            let (points, _) = match t.remove("points") {
                Some(v) => parse_points(&f("points"), v)?,
                None => (
                    cbs_points(if kind == "beta2" {
                        &CBS_BETA2
                    } else {
                        &CBS_EWA_TAU
                    }),
                    false,
                ),
            };
            for (i, p) in points.iter().enumerate() {
                crate::error::check::unit_interval(&format!("{}[{i}][1]", f("points")), p.1)?;
            }
            let default_field = if kind == "beta2" {
                "optimizer.betas.1"
            } else {
                "ewa.taus"
            };
            let field_path =
                take_str(&mut t, field, "field")?.unwrap_or_else(|| default_field.to_string());
            check_path(&f("field"), &field_path)?;
            RuleKind::Table {
                as_list: field_path == "ewa.taus",
                field: field_path,
                points,
                integer: false,
                interpolate,
                batch_scale,
            }
        }
        "table" => {
            no_unknown(
                &t,
                field,
                &["points", "interpolate", "batch_scale", "field"],
            )?;
            let (interpolate, batch_scale) = table_opts(&mut t)?;
            let field_path = take_str(&mut t, field, "field")?.ok_or_else(|| {
                Error::config(f("field"), "is missing: the run-config path to set")
            })?;
            check_path(&f("field"), &field_path)?;
            if field_path == "train.batch_size" || field_path == "optimizer.name" {
                return Err(Error::config(
                    f("field"),
                    format!("`{field_path}` cannot be set by a rule"),
                ));
            }
            let (points, integer) = match t.remove("points") {
                Some(v) => parse_points(&f("points"), v)?,
                None => {
                    return Err(Error::config(
                        f("points"),
                        "is missing: list [batch_size, value] pairs",
                    ))
                }
            };
            RuleKind::Table {
                as_list: field_path == "ewa.taus",
                field: field_path,
                points,
                integer,
                interpolate,
                batch_scale,
            }
        }
        "warmup" => {
            no_unknown(&t, field, &["fraction", "chinchilla_tokens"])?;
            let fraction = get_num(&mut t, "fraction")?.ok_or_else(|| {
                Error::config(f("fraction"), "is missing (the CBS paper uses 0.25)")
            })?;
            crate::error::check::non_negative(&f("fraction"), fraction)?;
            let chinchilla_tokens = get_num(&mut t, "chinchilla_tokens")?;
            if let Some(c) = chinchilla_tokens {
                crate::error::check::positive(&f("chinchilla_tokens"), c)?;
            }
            RuleKind::Warmup {
                fraction,
                chinchilla_tokens,
            }
        }
        "precondition_frequency" => {
            no_unknown(&t, field, &["reference_batch", "reference_frequency"])?;
            let rb = get_num(&mut t, "reference_batch")?
                .ok_or_else(|| Error::config(f("reference_batch"), "is missing"))?;
            crate::error::check::positive(&f("reference_batch"), rb)?;
            let rf = get_num(&mut t, "reference_frequency")?
                .ok_or_else(|| Error::config(f("reference_frequency"), "is missing"))?;
            crate::error::check::positive(&f("reference_frequency"), rf)?;
            RuleKind::PreconditionFrequency {
                reference_batch: rb,
                reference_frequency: rf,
            }
        }
        other => {
            return Err(Error::config(
                f("kind"),
                format!(
                    "unknown rule `{other}`; known: beta2, ewa_tau, warmup, \
                     precondition_frequency, table"
                ),
            ))
        }
    };
    Ok(Rule {
        name: field.to_string(),
        kind: rule_kind,
        optimizers,
    })
}

impl Plan {
    /// Reads a sweep file and expands it.
    pub fn from_file(path: &Path) -> Result<Self> {
        SweepSpec::from_file(path)?.plan()
    }

    /// The runs of shard `index` of `count`: the runs sorted by id, every `count`-th from
    /// position `index` (a partition that depends only on the set of ids), in plan order.
    pub fn shard(&self, index: usize, count: usize) -> Vec<&PlannedRun> {
        let mut ids: Vec<&str> = self.runs.iter().map(|r| r.id.as_str()).collect();
        ids.sort_unstable();
        let mine: BTreeSet<&str> = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| i % count == index)
            .map(|(_, id)| *id)
            .collect();
        self.runs
            .iter()
            .filter(|r| mine.contains(r.id.as_str()))
            .collect()
    }

    /// The run directory of a run.
    pub fn run_dir(&self, run: &PlannedRun) -> PathBuf {
        self.spec.runs_dir.join(&run.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::Schedule;

    const BASE: &str = r#"
name = "t"
[base.model]
preset = "test"
[base.train]
steps = 10
[base.eval]
tokens = 256
"#;

    fn plan(extra: &str) -> Plan {
        SweepSpec::parse(&format!("{BASE}\n{extra}"))
            .unwrap_or_else(|e| panic!("{e}"))
            .plan()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn run<'a>(p: &'a Plan, opt: &str, batch: usize) -> &'a RunConfig {
        &p.runs
            .iter()
            .find(|r| r.coords.optimizer == opt && r.coords.batch_size == batch)
            .unwrap()
            .config
    }

    fn betas(c: &RunConfig) -> (f64, f64) {
        let t = toml::Table::try_from(&c.optimizer).unwrap();
        let b = t["betas"].as_array().unwrap();
        (b[0].as_float().unwrap(), b[1].as_float().unwrap())
    }

    const ADAMW_SOAP: &str = r#"
[[optimizers]]
lr = [1e-3]
config = { name = "adamw" }
[[optimizers]]
lr = [1e-3]
config = { name = "soap" }
"#;

    #[test]
    fn lookup_interpolates_in_log_batch_and_clamps() {
        let pts = [(4.0, 1.0), (16.0, 3.0)];
        assert_eq!(lookup(&pts, 2.0, Interpolate::Log), 1.0);
        assert_eq!(lookup(&pts, 32.0, Interpolate::Log), 3.0);
        assert!((lookup(&pts, 8.0, Interpolate::Log) - 2.0).abs() < 1e-12);
        assert_eq!(lookup(&pts, 8.0, Interpolate::Step), 1.0);
        assert_eq!(lookup(&pts, 16.0, Interpolate::Step), 3.0);
    }

    #[test]
    fn cbs_tables_follow_the_batch_size() {
        let p = plan(&format!(
            "{ADAMW_SOAP}[axes]\nbatch_size = [4, 16, 24, 2048]\n[[rules]]\nkind = \"beta2\"\n\
             batch_scale = 16\n[[rules]]\nkind = \"ewa_tau\"\n"
        ));
        assert_eq!(betas(run(&p, "adamw", 4)).1, 0.999);
        assert_eq!(betas(run(&p, "adamw", 16)).1, 0.995);
        // 24 reads the table at 384, between 256 (0.995) and 512 (0.99), linearly in log B.
        let w = 1.5f64.ln() / 2f64.ln();
        assert!((betas(run(&p, "soap", 24)).1 - (0.995 - 0.005 * w)).abs() < 1e-12);
        assert_eq!(betas(run(&p, "soap", 2048)).1, 0.95);
        // β1 keeps each optimizer's default.
        assert_eq!(betas(run(&p, "adamw", 4)).0, 0.9);
        assert_eq!(betas(run(&p, "soap", 4)).0, 0.95);
        // τ is read at B itself (no batch_scale): 2048 → 0.998.
        assert_eq!(run(&p, "adamw", 2048).ewa.taus, vec![0.998]);
        assert_eq!(run(&p, "adamw", 4).ewa.taus, vec![0.9995]);
    }

    #[test]
    fn warmup_is_a_fraction_of_chinchilla_steps_at_the_batch_size() {
        let p = plan(
            "[[optimizers]]\nlr = [1e-3]\nconfig = { name = \"adamw\" }\n[axes]\n\
             batch_size = [2, 8]\n[[rules]]\nkind = \"warmup\"\nfraction = 0.25\n",
        );
        let c = run(&p, "adamw", 8);
        let n = c.model.non_embedding_params() as f64;
        let Schedule::Constant(s) = &c.schedule else {
            panic!("{:?}", c.schedule)
        };
        assert_eq!(s.warmup_ratio, Some(0.25));
        let expected = 20.0 * n / (8.0 * c.model.context() as f64);
        assert!((s.warmup_reference_steps.unwrap() - expected).abs() < 1e-9);
    }

    #[test]
    fn precondition_frequency_scales_inversely_and_skips_optimizers_without_it() {
        let p = plan(&format!(
            "{ADAMW_SOAP}[axes]\nbatch_size = [4, 8, 64]\n[[rules]]\n\
             kind = \"precondition_frequency\"\nreference_batch = 64\nreference_frequency = 10\n"
        ));
        let freq = |b| {
            toml::Table::try_from(&run(&p, "soap", b).optimizer).unwrap()["precondition_frequency"]
                .as_integer()
                .unwrap()
        };
        assert_eq!((freq(4), freq(8), freq(64)), (160, 80, 10));
        assert!(!toml::Table::try_from(&run(&p, "adamw", 4).optimizer)
            .unwrap()
            .contains_key("precondition_frequency"));
        let err = SweepSpec::parse(&format!(
            "{BASE}{ADAMW_SOAP}[axes]\nbatch_size = [4]\n[[rules]]\n\
             kind = \"precondition_frequency\"\nreference_batch = 64\nreference_frequency = 10\n\
             optimizers = [\"adamw\"]\n"
        ))
        .unwrap()
        .plan()
        .unwrap_err()
        .to_string();
        assert!(err.contains("rules[0].optimizers"), "{err}");
    }

    #[test]
    fn rules_set_optional_fields_the_optimizer_table_gives() {
        let spec = |cfg: &str| {
            format!(
                "{BASE}[[optimizers]]\nlr = [1e-3]\nconfig = {{ name = \"ademamix\"{cfg} }}\n\
                 [axes]\nbatch_size = [4, 64]\n[[rules]]\nkind = \"table\"\n\
                 field = \"optimizer.beta3_warmup\"\npoints = [[4, 600], [64, 120]]\n\
                 interpolate = \"step\"\noptimizers = [\"ademamix\"]\n"
            )
        };
        // Unset by default: the listed optimizer does not have it.
        let err = SweepSpec::parse(&spec(""))
            .unwrap()
            .plan()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rules[0].optimizers") && err.contains("beta3_warmup"),
            "{err}"
        );
        // Given in the optimizer's table: the rule replaces it per batch size.
        let p = SweepSpec::parse(&spec(", beta3_warmup = 1"))
            .unwrap()
            .plan()
            .unwrap();
        let warmup = |b: usize| {
            let r = p.runs.iter().find(|r| r.coords.batch_size == b).unwrap();
            toml::Table::try_from(&r.config.optimizer).unwrap()["beta3_warmup"]
                .as_integer()
                .unwrap()
        };
        assert_eq!((warmup(4), warmup(64)), (600, 120));
    }

    #[test]
    fn models_budgets_seeds_and_set_axes_expand() {
        let p = plan(
            "[[optimizers]]\nlr = [1e-3, 1e-2]\nconfig = { name = \"adamw\" }\n\
             set = { \"optimizer.betas.0\" = [0.8, 0.9] }\n[axes]\nbatch_size = [2]\n\
             seed = [0, 1]\nmodels = [{ label = \"wide\", d_model = 64 }, { preset = \"tiny\" }]\n\
             budgets = [{ chinchilla = 0.01 }, { label = \"short\", steps = 3 }]\n",
        );
        assert_eq!(p.runs.len(), 2 * 2 * 2 * 2 * 2);
        let wide = p
            .runs
            .iter()
            .find(|r| r.coords.model == "wide" && r.coords.budget == "0.01x")
            .unwrap();
        let crate::models::ModelConfig::Gpt(g) = &wide.config.model else {
            panic!()
        };
        assert_eq!((g.d_model, g.context), (64, 32));
        let n = wide.config.model.non_embedding_params() as f64;
        assert_eq!(
            wide.config.train.tokens,
            Some((0.01 * 20.0 * n).round() as u64)
        );
        assert_eq!(wide.config.train.steps, None);
        let short = p.runs.iter().find(|r| r.coords.budget == "short").unwrap();
        assert_eq!(short.config.total_steps(), 3);
        assert!(p
            .runs
            .iter()
            .any(|r| betas(&r.config).0 == 0.8 && r.coords.set["optimizer.betas.0"] == "0.8"));
        assert_eq!(p.runs.iter().filter(|r| r.coords.seed == 1).count(), 16);
        assert_eq!(wide.coords.scenario(), "wide/0.01x");
    }

    #[test]
    fn a_budget_axis_and_a_run_length_rule_clash() {
        let text = format!(
            "{BASE}[[optimizers]]\nlr = [1e-3]\nconfig = {{ name = \"adamw\" }}\n[axes]\n\
             batch_size = [2, 4]\nbudgets = [{{ tokens = 1000 }}, {{ tokens = 2000 }}]\n\
             [[rules]]\nkind = \"table\"\nfield = \"train.steps\"\npoints = [[2, 30], [4, 20]]\n"
        );
        let err = SweepSpec::parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("rules[0]") && err.contains("budget") && err.contains("tokens = D"),
            "{err}"
        );
        // Without the budget axis the rule sets the run lengths.
        let p = plan(
            "[[optimizers]]\nlr = [1e-3]\nconfig = { name = \"adamw\" }\n[axes]\n\
             batch_size = [2, 4]\n[[rules]]\nkind = \"table\"\nfield = \"train.steps\"\n\
             points = [[2, 30], [4, 20]]\n[targets]\nreference = [\n\
             { optimizer = \"adamw\", batch_size = 2, tokens = 640 },\n\
             { optimizer = \"adamw\", batch_size = 2, tokens = 1280 }]\n",
        );
        assert_eq!(run(&p, "adamw", 2).total_steps(), 30);
        assert_eq!(p.spec.targets.reference[1].tokens, Some(1280));
    }

    #[test]
    fn ids_are_fnv_of_the_canonical_config() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        let p = plan("[[optimizers]]\nlr = [1e-3]\nconfig = { name = \"adamw\" }\n[axes]\nbatch_size = [2]\n");
        let mut c = p.runs[0].config.clone();
        c.threads = 7;
        c.checkpoint.interval = 3;
        c.device = crate::runner::DeviceSpec::Cuda(1);
        assert_eq!(run_id(&c).unwrap(), p.runs[0].id);
        c.train.grad_clip = Some(1.0);
        assert_ne!(run_id(&c).unwrap(), p.runs[0].id);
    }
}
