//! The run config: one TOML file names everything a run depends on, each field typed and
//! validated, with `--set a.b=c` overrides.
//!
//! ```toml
//! seed = 0                 # data order, Sophia's label sampling, and model.seed unless given
//! threads = 0              # CPU threads (0 = candle's default: the physical cores)
//! dtype = "f32"            # parameter dtype: f32 or f64
//! device = "cpu"           # where it trains: cpu, cuda or cuda:N (needs the `cuda` feature)
//!
//! [model]
//! preset = "tiny"          # a ModelConfig preset; the other keys here override its fields
//!
//! [data]                   # the embedded corpus by default; `dir = "…"` for token shards
//!
//! [optimizer]
//! name = "adamw"
//! lr = 3e-3
//!
//! [[groups]]               # optional parameter groups (see optim::groups)
//! roles = ["norm", "bias"]
//! weight_decay = 0.0
//!
//! [schedule]
//! kind = "warmup_cosine"   # total_steps defaults to the run's steps
//! warmup_ratio = 0.1
//!
//! [train]
//! batch_size = 16          # sequences per optimizer step
//! micro_batch = 8          # sequences per forward/backward (gradient accumulation)
//! steps = 300              # budget: `steps` or `tokens`
//! grad_clip = 1.0
//!
//! [eval]
//! interval = 50
//! tokens = 65536
//! targets = [2.5, 2.2]
//!
//! [ewa]
//! taus = [0.9, 0.99]
//!
//! [checkpoint]
//! interval = 100
//! ```
//!
//! Resolution (what [`RunConfig::parse`] does, in order): overrides are applied to the TOML
//! table; `model.preset` is expanded (explicit keys win) and `model.seed` defaults to `seed`;
//! a `warmup_cosine` or `wsd` schedule without `total_steps` gets the run's step count, and a
//! Sophia optimizer without `bs` gets the tokens per batch (what the reference training script
//! passes). [`RunConfig::to_toml`] writes the resolved config, every field explicit, and parsing
//! it again gives the same config.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::data::DataConfig;
use crate::error::{check, Error, Result};
use crate::models::ModelConfig;
use crate::optim::{GroupSpec, OptimConfig, OptimizerSpec, Schedule};
use crate::runner::device::DeviceSpec;

/// Parameter dtype of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats (the default).
    #[default]
    F32,
    /// 64-bit floats (slow; for exactness checks).
    F64,
}

impl Precision {
    /// The candle dtype.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::F64 => candle_core::DType::F64,
        }
    }
}

/// Batching, budget and the loop's own knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Sequences per optimizer step (the batch size B of the papers).
    pub batch_size: usize,
    /// Sequences per forward/backward pass; the step's gradient is the token-weighted mean over
    /// its micro-batches (unset = the whole batch at once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub micro_batch: Option<usize>,
    /// Budget in optimizer steps (exclusive with `tokens`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    /// Budget in training tokens, rounded up to whole steps (exclusive with `steps`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// Global-norm gradient clipping threshold (unset = no clipping).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_clip: Option<f64>,
    /// Sophia: after every `hessian_interval`-th step, an extra forward/backward with labels
    /// sampled from the model feeds the Hessian estimate (the reference's k = 10).
    pub hessian_interval: u64,
    /// A metrics line every `log_interval` steps (evaluations and the last step always log).
    pub log_interval: u64,
    /// Whether the budget may exceed one pass over the training data (the papers train a single
    /// pass; a repeating run says so in its log and summary either way).
    pub allow_repeat: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 32,
            micro_batch: None,
            steps: None,
            tokens: None,
            grad_clip: None,
            hessian_interval: 10,
            log_interval: 1,
            allow_repeat: true,
        }
    }
}

/// When and on what the model is evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate every `interval` steps (0 = only at the end; the last step always evaluates).
    pub interval: u64,
    /// Further steps to evaluate at (e.g. dense evaluations near an expected target crossing).
    pub at: Vec<u64>,
    /// Evaluate the initial parameters (step 0) too.
    pub at_start: bool,
    /// The fixed evaluation budget: the first `tokens / context` sequences of the validation
    /// split, the same at every evaluation.
    pub tokens: u64,
    /// Sequences per evaluation forward pass (unset = the training micro-batch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Target losses: the summary reports the first evaluation below each (steps and tokens),
    /// for the raw and for every EWA-averaged parameters.
    pub targets: Vec<f64>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            interval: 100,
            at: Vec::new(),
            at_start: true,
            tokens: 65_536,
            batch_size: None,
            targets: Vec::new(),
        }
    }
}

/// Exponential weight averages to track and evaluate (see [`crate::optim::ewa`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EwaConfig {
    /// Decays τ, each in [0, 1) (none = no averaging).
    pub taus: Vec<f64>,
}

/// Checkpointing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// A checkpoint every `interval` steps (0 = only at the end of the run).
    pub interval: u64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { interval: 500 }
    }
}

/// A resolved, validated run config (build it with [`RunConfig::parse`] or
/// [`RunConfig::from_file`]).
#[derive(Debug, Clone, Serialize)]
pub struct RunConfig {
    /// Seed of the data order and of Sophia's label sampling (and the model's, unless
    /// `model.seed` is given).
    pub seed: u64,
    /// CPU threads for candle (0 = its default). Applied by the `train` binary before any work
    /// (see [`crate::runner::apply_threads`]).
    pub threads: usize,
    /// Parameter dtype.
    pub dtype: Precision,
    /// Where the run trains (`cpu`, `cuda`, `cuda:N`; default `cpu`). Not part of the run's
    /// identity: a checkpoint resumes on any device, and the resolved config omits the key when
    /// it is the CPU (so configs and sweep ids from before the key existed are unchanged).
    #[serde(skip_serializing_if = "DeviceSpec::is_cpu")]
    pub device: DeviceSpec,
    /// The model (preset expanded).
    pub model: ModelConfig,
    /// The data.
    pub data: DataConfig,
    /// The default optimizer.
    pub optimizer: OptimConfig,
    /// Parameter groups overriding the default optimizer.
    pub groups: Vec<GroupSpec>,
    /// The learning-rate schedule.
    pub schedule: Schedule,
    /// Batching and budget.
    pub train: TrainConfig,
    /// Evaluation.
    pub eval: EvalConfig,
    /// Weight averaging.
    pub ewa: EwaConfig,
    /// Checkpointing.
    pub checkpoint: CheckpointConfig,
}

/// The top-level keys of a run config.
pub const SECTIONS: [&str; 13] = [
    "seed",
    "threads",
    "dtype",
    "device",
    "model",
    "data",
    "optimizer",
    "groups",
    "schedule",
    "train",
    "eval",
    "ewa",
    "checkpoint",
];

/// Applies one `a.b.c=value` override to a TOML table. The value is parsed as a TOML value
/// (`3`, `1e-3`, `true`, `[0.9, 0.95]`, `{ name = "sgd" }`), and taken as a string when it is
/// not one (`optimizer.name=soap`). Numeric path parts index arrays (`groups.0.lr=1e-3`);
/// missing tables are created.
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (path, raw) = assignment.split_once('=').ok_or_else(|| {
        Error::config(
            "--set",
            format!("`{assignment}` is not of the form key.path=value"),
        )
    })?;
    let path = path.trim();
    let raw = raw.trim();
    if path.is_empty() || path.split('.').any(|k| k.is_empty()) {
        return Err(Error::config(
            "--set",
            format!("`{assignment}`: empty key in `{path}`"),
        ));
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    set_dotted(table, path, value)
}

/// Sets the dotted `path` of a TOML table to `value`. Numeric parts index existing arrays;
/// missing tables are created.
pub fn set_dotted(table: &mut toml::Table, path: &str, value: toml::Value) -> Result<()> {
    let keys: Vec<&str> = path.split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(Error::config(path, "empty key in a dotted path"));
    }
    set_path(table, &keys, value, path)
}

fn set_path(table: &mut toml::Table, keys: &[&str], value: toml::Value, path: &str) -> Result<()> {
    let (first, rest) = keys.split_first().expect("non-empty path");
    if rest.is_empty() {
        table.insert((*first).to_string(), value);
        return Ok(());
    }
    let slot = table
        .entry((*first).to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    set_value(slot, rest, value, path)
}

fn set_value(slot: &mut toml::Value, keys: &[&str], value: toml::Value, path: &str) -> Result<()> {
    match slot {
        toml::Value::Table(t) => set_path(t, keys, value, path),
        toml::Value::Array(items) => {
            let (first, rest) = keys.split_first().expect("non-empty path");
            let len = items.len();
            let i: usize = first.parse().map_err(|_| {
                Error::config(path, format!("`{first}` must index an array (0..{len})"))
            })?;
            let item = items.get_mut(i).ok_or_else(|| {
                Error::config(
                    path,
                    format!("index {i} is out of range: the array has {len}"),
                )
            })?;
            if rest.is_empty() {
                *item = value;
                Ok(())
            } else {
                set_value(item, rest, value, path)
            }
        }
        other => Err(Error::config(
            path,
            format!("cannot set a key inside a {} value", other.type_str()),
        )),
    }
}

/// Deserializes `value` as `T`, naming `field` in the error.
fn typed<T: DeserializeOwned>(field: &str, value: toml::Value) -> Result<T> {
    value
        .try_into()
        .map_err(|e: toml::de::Error| Error::config(field, e.message().trim_end().to_string()))
}

fn take<T: DeserializeOwned>(table: &mut toml::Table, key: &str) -> Result<Option<T>> {
    table.remove(key).map(|v| typed(key, v)).transpose()
}

fn as_table<'a>(table: &'a mut toml::Table, key: &str) -> Result<Option<&'a mut toml::Table>> {
    match table.get_mut(key) {
        None => Ok(None),
        Some(toml::Value::Table(t)) => Ok(Some(t)),
        Some(other) => Err(Error::config(
            key,
            format!("must be a table, got a {}", other.type_str()),
        )),
    }
}

/// Expands `model.preset` (explicit keys override the preset's fields) and defaults
/// `model.seed` to the run seed.
fn resolve_model(mut model: toml::Table, seed: u64) -> Result<ModelConfig> {
    let explicit_seed = model.contains_key("seed");
    if let Some(preset) = model.remove("preset") {
        let name = preset.as_str().ok_or_else(|| {
            Error::config(
                "model.preset",
                format!("must be a string, got a {}", preset.type_str()),
            )
        })?;
        let base = ModelConfig::preset(name)?;
        let mut merged = toml::Table::try_from(&base)
            .map_err(|e| Error::config("model.preset", e.to_string()))?;
        if let Some(kind) = model.get("kind") {
            if Some(kind) != merged.get("kind") {
                return Err(Error::config(
                    "model.kind",
                    format!("{kind} contradicts preset `{name}`; drop one of them"),
                ));
            }
        }
        merged.extend(model);
        model = merged;
    }
    if !model.contains_key("kind") {
        return Err(Error::config(
            "model",
            format!(
                "needs `preset` (one of {}) or `kind` (\"gpt\" or \"mlp\")",
                crate::models::PRESETS.join(", ")
            ),
        ));
    }
    if !explicit_seed {
        model.insert("seed".into(), toml_int("seed", seed)?);
    }
    typed("model", toml::Value::Table(model))
}

fn toml_int(field: &str, x: u64) -> Result<toml::Value> {
    i64::try_from(x)
        .map(toml::Value::Integer)
        .map_err(|_| Error::config(field, format!("{x} does not fit a TOML integer (< 2^63)")))
}

/// Gives a Sophia optimizer table without `bs` the tokens per batch.
fn fill_sophia_bs(optimizer: &mut toml::Table, batch_tokens: u64) -> Result<()> {
    if optimizer.get("name").and_then(|v| v.as_str()) == Some("sophia")
        && !optimizer.contains_key("bs")
    {
        optimizer.insert("bs".into(), toml_int("optimizer.bs", batch_tokens)?);
    }
    Ok(())
}

impl RunConfig {
    /// Parses a run config from TOML text, applies `overrides` (`a.b=c`, in order), resolves
    /// presets and defaults (see the module docs) and validates every field.
    pub fn parse(text: &str, overrides: &[String]) -> Result<Self> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| Error::config("config", e.to_string()))?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        Self::from_table(table)
    }

    /// Reads and parses a config file (see [`RunConfig::parse`]).
    pub fn from_file(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        Self::parse(&text, overrides).map_err(|e| match e {
            Error::Config { field, reason } => Error::Config {
                field,
                reason: format!("{reason} (in {})", path.display()),
            },
            other => other,
        })
    }

    /// Resolves and validates a config table.
    pub fn from_table(mut table: toml::Table) -> Result<Self> {
        if let Some(unknown) = table.keys().find(|k| !SECTIONS.contains(&k.as_str())) {
            return Err(Error::config(
                unknown.clone(),
                format!("unknown key; a run config has {}", SECTIONS.join(", ")),
            ));
        }
        let seed: u64 = take(&mut table, "seed")?.unwrap_or(0);
        let threads: usize = take(&mut table, "threads")?.unwrap_or(0);
        let dtype: Precision = take(&mut table, "dtype")?.unwrap_or_default();
        let device: DeviceSpec = take(&mut table, "device")?.unwrap_or_default();
        let model_table = match table.remove("model") {
            Some(toml::Value::Table(t)) => t,
            Some(other) => {
                return Err(Error::config(
                    "model",
                    format!("must be a table, got a {}", other.type_str()),
                ))
            }
            None => return Err(Error::config("model", "is missing")),
        };
        let model = resolve_model(model_table, seed)?;
        let train: TrainConfig = take(&mut table, "train")?.unwrap_or_default();
        let data: DataConfig = take(&mut table, "data")?.unwrap_or_default();
        let eval: EvalConfig = take(&mut table, "eval")?.unwrap_or_default();
        let ewa: EwaConfig = take(&mut table, "ewa")?.unwrap_or_default();
        let checkpoint: CheckpointConfig = take(&mut table, "checkpoint")?.unwrap_or_default();
        validate_train(&train)?;
        let batch_tokens = train
            .batch_size
            .checked_mul(model.context())
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| {
                Error::config(
                    "train.batch_size",
                    format!(
                        "{} sequences of {} tokens (model.context) per step: more tokens than \
                         can be counted",
                        train.batch_size,
                        model.context()
                    ),
                )
            })?;
        let steps = budget_steps(&train, batch_tokens);

        if as_table(&mut table, "optimizer")?.is_none() {
            return Err(Error::config(
                "optimizer",
                format!(
                    "is missing: give `[optimizer]` with a `name` (one of {})",
                    OptimConfig::NAMES.join(", ")
                ),
            ));
        }
        if let Some(t) = as_table(&mut table, "optimizer")? {
            fill_sophia_bs(t, batch_tokens)?;
        }
        if let Some(toml::Value::Array(groups)) = table.get_mut("groups") {
            for g in groups.iter_mut() {
                if let Some(toml::Value::Table(o)) =
                    g.as_table_mut().and_then(|g| g.get_mut("optimizer"))
                {
                    fill_sophia_bs(o, batch_tokens)?;
                }
            }
        }
        let optimizer: OptimConfig = take(&mut table, "optimizer")?.expect("checked above");
        let groups: Vec<GroupSpec> = take(&mut table, "groups")?.unwrap_or_default();

        if let Some(s) = as_table(&mut table, "schedule")? {
            let kind = s.get("kind").and_then(|k| k.as_str());
            if matches!(kind, Some("warmup_cosine" | "wsd")) && !s.contains_key("total_steps") {
                s.insert(
                    "total_steps".into(),
                    toml_int("schedule.total_steps", steps)?,
                );
            }
        }
        let schedule: Schedule = take(&mut table, "schedule")?.unwrap_or_default();

        let cfg = RunConfig {
            seed,
            threads,
            dtype,
            device,
            model,
            data,
            optimizer,
            groups,
            schedule,
            train,
            eval,
            ewa,
            checkpoint,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every field and their consistency; errors name the field.
    pub fn validate(&self) -> Result<()> {
        toml_int("seed", self.seed)?;
        self.model.validate()?;
        self.data.validate()?;
        self.optimizer_spec().validate()?;
        self.schedule.validate()?;
        validate_train(&self.train)?;
        let steps = self.total_steps();
        let e = &self.eval;
        if e.tokens < self.model.context() as u64 {
            return Err(Error::config(
                "eval.tokens",
                format!(
                    "{} is less than one sequence of {} tokens (model.context)",
                    e.tokens,
                    self.model.context()
                ),
            ));
        }
        if let Some(b) = e.batch_size {
            check::at_least_one("eval.batch_size", b as u64)?;
        }
        for (i, &s) in e.at.iter().enumerate() {
            if s > steps {
                return Err(Error::config(
                    format!("eval.at[{i}]"),
                    format!("step {s} is past the run's last step {steps}"),
                ));
            }
        }
        for (i, &t) in e.targets.iter().enumerate() {
            check::positive(&format!("eval.targets[{i}]"), t)?;
        }
        for (i, &tau) in self.ewa.taus.iter().enumerate() {
            check::unit_interval(&format!("ewa.taus[{i}]"), tau)?;
            if self.ewa.taus[..i].contains(&tau) {
                return Err(Error::config(
                    format!("ewa.taus[{i}]"),
                    format!("{tau} is listed twice"),
                ));
            }
        }
        Ok(())
    }

    /// The optimizer with its groups.
    pub fn optimizer_spec(&self) -> OptimizerSpec {
        OptimizerSpec {
            optimizer: self.optimizer.clone(),
            groups: self.groups.clone(),
        }
    }

    /// Sequences per forward/backward pass.
    pub fn micro_batch(&self) -> usize {
        self.train.micro_batch.unwrap_or(self.train.batch_size)
    }

    /// Sequences per evaluation forward pass.
    pub fn eval_batch_size(&self) -> usize {
        self.eval.batch_size.unwrap_or_else(|| self.micro_batch())
    }

    /// Tokens predicted per optimizer step (`batch_size × context`).
    pub fn batch_tokens(&self) -> u64 {
        // Checked when the config was read; saturating for a config changed since.
        self.train.batch_size.saturating_mul(self.model.context()) as u64
    }

    /// The run's length in optimizer steps (a token budget rounded up to whole steps).
    pub fn total_steps(&self) -> u64 {
        budget_steps(&self.train, self.batch_tokens())
    }

    /// The resolved config as TOML (every field explicit; [`RunConfig::parse`] reads it back to
    /// the same config).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::config("config", e.to_string()))
    }

    /// The resolved config as a TOML table (for comparisons).
    pub fn to_table(&self) -> Result<toml::Table> {
        toml::Table::try_from(self).map_err(|e| Error::config("config", e.to_string()))
    }
}

fn budget_steps(train: &TrainConfig, batch_tokens: u64) -> u64 {
    match (train.steps, train.tokens) {
        (Some(s), _) => s,
        (None, Some(t)) => t.div_ceil(batch_tokens.max(1)),
        (None, None) => 0,
    }
}

fn validate_train(t: &TrainConfig) -> Result<()> {
    check::at_least_one("train.batch_size", t.batch_size as u64)?;
    if let Some(m) = t.micro_batch {
        check::at_least_one("train.micro_batch", m as u64)?;
        if m > t.batch_size {
            return Err(Error::config(
                "train.micro_batch",
                format!("{m} is larger than train.batch_size = {}", t.batch_size),
            ));
        }
    }
    match (t.steps, t.tokens) {
        (Some(_), Some(_)) => {
            return Err(Error::config(
                "train.tokens",
                "conflicts with train.steps: give the budget one way",
            ))
        }
        (None, None) => {
            return Err(Error::config(
                "train.steps",
                "is missing: give the budget as train.steps or train.tokens",
            ))
        }
        (Some(s), None) => check::at_least_one("train.steps", s)?,
        (None, Some(n)) => check::at_least_one("train.tokens", n)?,
    }
    if let Some(c) = t.grad_clip {
        check::positive("train.grad_clip", c)?;
    }
    check::at_least_one("train.hessian_interval", t.hessian_interval)?;
    check::at_least_one("train.log_interval", t.log_interval)?;
    Ok(())
}

/// Dotted paths where two TOML tables differ (keys missing on one side included).
pub fn diff_tables(a: &toml::Table, b: &toml::Table) -> Vec<String> {
    let mut out = Vec::new();
    diff_into(
        &toml::Value::Table(a.clone()),
        &toml::Value::Table(b.clone()),
        "",
        &mut out,
    );
    out
}

fn diff_into(a: &toml::Value, b: &toml::Value, prefix: &str, out: &mut Vec<String>) {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match (a, b) {
        (toml::Value::Table(x), toml::Value::Table(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => diff_into(u, v, &join(k), out),
                    _ => out.push(join(k)),
                }
            }
        }
        (toml::Value::Array(x), toml::Value::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                diff_into(u, v, &join(&i.to_string()), out);
            }
        }
        (toml::Value::Float(x), toml::Value::Float(y)) => {
            if x.to_bits() != y.to_bits() {
                out.push(prefix.to_string());
            }
        }
        (x, y) => {
            if x != y {
                out.push(prefix.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "[model]\npreset = \"test\"\n[optimizer]\nname = \"adamw\"\n[train]\nsteps = 10\n";

    #[test]
    fn overrides_parse_values_and_fall_back_to_strings() {
        let mut t: toml::Table = toml::from_str(MINIMAL).unwrap();
        for o in [
            "train.steps=20",
            "optimizer.lr=1e-3",
            "optimizer.betas=[0.9, 0.95]",
            "eval.targets=[2.0]",
            "data.corpus=brown",
            "ewa.taus = [0.9]",
        ] {
            apply_override(&mut t, o).unwrap();
        }
        assert_eq!(t["train"]["steps"].as_integer(), Some(20));
        assert_eq!(t["optimizer"]["lr"].as_float(), Some(1e-3));
        assert_eq!(t["data"]["corpus"].as_str(), Some("brown"));
        assert!(apply_override(&mut t, "train.steps.x=1").is_err());
        assert!(apply_override(&mut t, "novalue").is_err());
        assert!(apply_override(&mut t, "a..b=1").is_err());
        let cfg = RunConfig::from_table(t).unwrap();
        assert_eq!(cfg.total_steps(), 20);
        assert_eq!(cfg.ewa.taus, vec![0.9]);
    }

    #[test]
    fn array_paths_index_groups() {
        let text = format!("{MINIMAL}[[groups]]\nroles = [\"norm\"]\nweight_decay = 0.0\n");
        let cfg = RunConfig::parse(&text, &["groups.0.lr=0.5".into()]).unwrap();
        assert_eq!(cfg.groups[0].lr, Some(0.5));
        let err = RunConfig::parse(&text, &["groups.3.lr=0.5".into()]).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
    }

    #[test]
    fn resolution_fills_preset_seed_schedule_and_sophia_bs() {
        let text = "seed = 7\n[model]\npreset = \"tiny\"\nd_model = 64\n[optimizer]\nname = \
                    \"sophia\"\n[schedule]\nkind = \"warmup_cosine\"\n[train]\nbatch_size = 4\n\
                    tokens = 5000\n";
        let cfg = RunConfig::parse(text, &[]).unwrap();
        let ModelConfig::Gpt(g) = &cfg.model else {
            panic!("gpt expected")
        };
        assert_eq!((g.d_model, g.n_layers, g.context, g.seed), (64, 2, 128, 7));
        assert_eq!(cfg.total_steps(), 10); // ceil(5000 / 512)
        match &cfg.schedule {
            Schedule::WarmupCosine(s) => assert_eq!(s.total_steps, 10),
            other => panic!("{other:?}"),
        }
        match &cfg.optimizer {
            OptimConfig::Sophia(s) => assert_eq!(s.bs, 512),
            other => panic!("{other:?}"),
        }
        // The resolved form parses back to itself.
        let text2 = cfg.to_toml().unwrap();
        let again = RunConfig::parse(&text2, &[]).unwrap();
        assert_eq!(again.to_toml().unwrap(), text2);
        assert!(diff_tables(&cfg.to_table().unwrap(), &again.to_table().unwrap()).is_empty());
    }

    #[test]
    fn every_optimizer_round_trips_through_the_resolved_toml() {
        for name in OptimConfig::NAMES {
            let text = MINIMAL.replace("adamw", name);
            let cfg = RunConfig::parse(&text, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
            let out = cfg.to_toml().unwrap_or_else(|e| panic!("{name}: {e}"));
            let back = RunConfig::parse(&out, &[]).unwrap_or_else(|e| panic!("{name}: {e}\n{out}"));
            assert_eq!(back.to_toml().unwrap(), out, "{name}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("[train]\nsteps = 0", "train.steps"),
            ("[train]\nsteps = 5\ntokens = 5", "train.tokens"),
            (
                "[train]\nbatch_size = 2\nmicro_batch = 3\nsteps = 1",
                "train.micro_batch",
            ),
            ("[train]\nsteps = 1\ngrad_clip = -1.0", "train.grad_clip"),
            ("[train]\nstepz = 1", "train"),
            ("[eval]\ntokens = 3\n[train]\nsteps = 1", "eval.tokens"),
            ("[eval]\nat = [50]\n[train]\nsteps = 10", "eval.at[0]"),
            (
                "[eval]\ntargets = [-1.0]\n[train]\nsteps = 1",
                "eval.targets[0]",
            ),
            (
                "[ewa]\ntaus = [0.9, 1.0]\n[train]\nsteps = 1",
                "ewa.taus[1]",
            ),
            (
                "[ewa]\ntaus = [0.9, 0.9]\n[train]\nsteps = 1",
                "ewa.taus[1]",
            ),
            ("bogus = 1\n[train]\nsteps = 1", "bogus"),
            ("dtype = \"f16\"\n[train]\nsteps = 1", "dtype"),
        ];
        for (extra, field) in cases {
            let text =
                format!("[model]\npreset = \"test\"\n[optimizer]\nname = \"adamw\"\n{extra}\n");
            let err = RunConfig::parse(&text, &[]).unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{extra}: {err}");
        }
        let no_model = "[optimizer]\nname = \"adamw\"\n[train]\nsteps = 1\n";
        assert!(RunConfig::parse(no_model, &[])
            .unwrap_err()
            .to_string()
            .contains("`model`"));
        let bad_kind = "[model]\npreset = \"test\"\nkind = \"mlp\"\n[optimizer]\nname = \
                        \"adamw\"\n[train]\nsteps = 1\n";
        let err = RunConfig::parse(bad_kind, &[]).unwrap_err().to_string();
        assert!(err.contains("model.kind"), "{err}");
        let bad_field = "[model]\npreset = \"test\"\nd_modle = 3\n[optimizer]\nname = \
                         \"adamw\"\n[train]\nsteps = 1\n";
        let err = RunConfig::parse(bad_field, &[]).unwrap_err().to_string();
        assert!(err.contains("d_modle"), "{err}");
        let bad_opt = "[model]\npreset = \"test\"\n[optimizer]\nname = \"adamw\"\nlr = -1.0\n\
                       [train]\nsteps = 1\n";
        let err = RunConfig::parse(bad_opt, &[]).unwrap_err().to_string();
        assert!(err.contains("lr"), "{err}");
        let no_opt = "[model]\npreset = \"test\"\n[train]\nsteps = 1\n";
        let err = RunConfig::parse(no_opt, &[]).unwrap_err().to_string();
        assert!(err.contains("`optimizer`"), "{err}");
    }

    #[test]
    fn table_diff_lists_changed_paths() {
        let a: toml::Table = toml::from_str("x = 1\n[t]\ny = [1, 2]\nz = 0.5").unwrap();
        let b: toml::Table = toml::from_str("x = 1\n[t]\ny = [1, 3]\nw = 0.5").unwrap();
        assert_eq!(diff_tables(&a, &b), vec!["t.w", "t.y.1", "t.z"]);
    }
}
