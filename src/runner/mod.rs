//! The training runner: one [`RunConfig`] in, one self-describing run directory out.
//!
//! ```no_run
//! use optlab::runner::{run, RunConfig, RunOptions};
//! let config = RunConfig::from_file("experiments/configs/tiny.toml".as_ref(), &[])?;
//! let report = run(&config, &RunOptions::new("runs/tiny"))?;
//! println!("{:?}", report.summary.map(|s| s.final_losses));
//! # Ok::<(), optlab::Error>(())
//! ```
//!
//! Each step:
//!
//! 1. the schedule sets the lr factor for the (1-based) step;
//! 2. MARS exact (`is_approx = false`) only: the gradient of the *next* batch at the current
//!    parameters is fed with `observe(PreviousGrad)` (the sampler peeks one batch ahead and
//!    steps back, so its saved position stays that of the last consumed batch);
//! 3. the batch's gradient: micro-batches of `train.micro_batch` sequences, each loss scaled by
//!    its share of the batch's sequences (1/n for equal micro-batches), gradients summed;
//! 4. global-norm clipping (`train.grad_clip`), the optimizer step, the EWA update;
//! 5. Sophia only, after every `train.hessian_interval`-th step: one more forward/backward over
//!    the same batch with labels sampled from the model's softmax (a ChaCha12 stream keyed by
//!    the seed and the step), clipped like the training gradient, fed with
//!    `observe(HessianGrad)` to the parameters whose group runs Sophia.
//!
//! Evaluations (every `eval.interval` steps, at `eval.at`, at step 0 if `eval.at_start`, and
//! at the last step) measure the mean cross-entropy over a fixed set of validation sequences,
//! at the raw parameters and at each EWA's bias-corrected average. Schedule-Free optimizers are
//! evaluated at their averaged point `x`, read with `eval_params()` and swapped into the
//! variables for the evaluation; every swap puts back exact copies afterwards, so evaluating
//! never changes the training trajectory (a `set_mode(Eval)`/`set_mode(Train)` round trip
//! would: it recomputes `y` from `x` and `z` with rounding). EWA averages the parameters as the
//! optimizer leaves them after each step (for Schedule-Free, its gradient point `y`). Evaluation
//! and checkpoint time is excluded from the training time.
//!
//! The run directory:
//!
//! | file | content |
//! |---|---|
//! | `config.toml` | the resolved config (every field explicit) |
//! | `env.json` | git commit, crate versions, threads, device ([`EnvInfo`]) |
//! | `metrics.jsonl` | one [`MetricsLine`] per logged step, flushed line by line |
//! | `summary.json` | the [`Summary`], written when the run completes |
//! | `checkpoints/step-N/` | the latest checkpoint (see [`checkpoint`]) |
//!
//! Resuming (`RunOptions::resume`) loads the newest complete checkpoint, cuts `metrics.jsonl`
//! back to the length it recorded, and continues; the metrics lines and final parameters are
//! then bit-identical to an uninterrupted run's (only `elapsed` and the summary's timing
//! differ), with the same thread count. The config must equal the checkpoint's, except for
//! `threads`, `checkpoint.interval` and the budget (`train.steps` / `train.tokens`, to extend a
//! run); any other difference is an error listing the fields.

pub mod alloc;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod env;
pub mod metrics;

use std::collections::{BTreeMap, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, TensorId, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;

use crate::data::{Batch, Dataset, Sampler};
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::models::{lm_loss, Model};
use crate::optim::clip::clip_grad_norm_on_device;
use crate::optim::{
    clip_grad_norm_named, grad_norm, Driver, Ewa, ExtraInput, OptimConfig, Optimizer,
};

pub use checkpoint::{LoopState, Manifest};
pub use config::{
    apply_override, set_dotted, CheckpointConfig, EvalConfig, EwaConfig, Precision, RunConfig,
    TrainConfig,
};
pub use device::{DeviceInfo, DeviceSpec};
pub use env::EnvInfo;
pub use metrics::{read_metrics, MetricsLine, Summary, TargetTracker};

/// Config fields that may differ between a checkpoint and the run resuming it.
pub const RESUMABLE_CHANGES: [&str; 5] = [
    "threads",
    "device",
    "checkpoint.interval",
    "train.steps",
    "train.tokens",
];

/// How to run (everything that is not part of the experiment itself).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The run directory.
    pub out: PathBuf,
    /// Continue the run in `out` from its newest checkpoint.
    pub resume: bool,
    /// Show a progress bar (only ever on a terminal).
    pub progress: bool,
    /// Print notes (data repetition, resumption, skipped torn checkpoints) to stderr.
    pub log: bool,
    /// Stop after this step as if interrupted: checkpoint and return without a summary (continue
    /// with `resume`).
    pub stop_after: Option<u64>,
    /// Use this already loaded data instead of loading `config.data` (it must be what
    /// `config.data` names).
    pub dataset: Option<Dataset>,
}

impl RunOptions {
    /// A fresh run into `out`, without progress bar or notes.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            resume: false,
            progress: false,
            log: false,
            stop_after: None,
            dataset: None,
        }
    }
}

/// What [`run`] returns.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The run directory.
    pub dir: PathBuf,
    /// Steps taken when the call returned.
    pub steps: u64,
    /// The summary, when the run completed.
    pub summary: Option<Summary>,
    /// Notes (also printed when `RunOptions::log` is set).
    pub notes: Vec<String>,
}

/// Sets the number of CPU threads candle uses (its `RAYON_NUM_THREADS`); 0 leaves the default.
/// Also caps how long candle's elementwise workers spin for new work before they sleep
/// ([`SPIN_LIMIT`], unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` is already set). Call it at the very
/// start of a program, before any other thread exists: it sets environment variables.
pub fn apply_threads(threads: usize) {
    if threads > 0 {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", SPIN_LIMIT.to_string());
    }
}

/// Spin rounds of candle's elementwise worker threads before they park (candle's default is
/// 25 000, tens of microseconds to a millisecond). Between two candle elementwise ops a step
/// runs matrix products on rayon's threads and the fused kernels; a worker still spinning then
/// takes a core from them, which made 2 threads slower than 1 on 2 cores. Parking sooner costs
/// a wake-up (a few microseconds) per parallel elementwise op instead.
pub const SPIN_LIMIT: u32 = 1000;

/// Runs (or resumes) the training run `config` into `opts.out`; see the module docs.
///
/// The stages: [`open_run_dir`] decides between a fresh start and a resumption, the data and
/// the [`Trainer`] are built on the configured device, [`check_budget`] refuses (or notes) data
/// repetition, [`start_loop`] restores a checkpoint or starts the metrics, the run's
/// `config.toml` and `env.json` are written, then [`train_loop`] runs the steps, and the summary
/// closes the run.
pub fn run(config: &RunConfig, opts: &RunOptions) -> Result<RunReport> {
    config.validate()?;
    let mut notes = Notes::new(opts.log);
    let dir = &opts.out;
    let loaded = open_run_dir(config, dir, opts.resume, &mut notes)?;
    let data = run_data(config, opts)?;
    let mut t = Trainer::new(config, &data)?;
    check_budget(config, &t, &mut notes)?;

    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    // A writer killed between creating and renaming a file leaves its temporary behind.
    for p in crate::io::remove_stale_temporaries(dir)? {
        notes.push(format!(
            "removed {} (left by an interrupted write)",
            p.display()
        ));
    }
    let (mut state, mut writer) = start_loop(&mut t, dir, loaded, &mut notes)?;
    write_atomic(&dir.join("config.toml"), config.to_toml()?.as_bytes())?;
    let resumed_from = (state.step > 0).then_some(state.step);
    let env = EnvInfo::capture(resumed_from, &DeviceInfo::capture(config.device, &t.device));
    write_json(&dir.join("env.json"), &env)?;

    if !train_loop(&mut t, config, opts, &mut state, &mut writer)? {
        return Ok(RunReport {
            dir: dir.clone(),
            steps: state.step,
            summary: None,
            notes: notes.into_vec(),
        });
    }
    let summary = t.summary(&state, &data);
    write_json(&dir.join("summary.json"), &summary)?;
    Ok(RunReport {
        dir: dir.clone(),
        steps: state.step,
        summary: Some(summary),
        notes: notes.into_vec(),
    })
}

/// Notes of a run: kept for the report, and printed as they come when asked to.
struct Notes {
    print: bool,
    lines: Vec<String>,
}

impl Notes {
    fn new(print: bool) -> Self {
        Self {
            print,
            lines: Vec::new(),
        }
    }

    fn push(&mut self, msg: String) {
        if self.print {
            eprintln!("{msg}");
        }
        self.lines.push(msg);
    }

    fn into_vec(self) -> Vec<String> {
        self.lines
    }
}

/// Checks what `dir` holds against the request: a resumption needs the same run's config and
/// returns its newest complete checkpoint (if any); a fresh start needs a directory without a
/// run.
fn open_run_dir(
    config: &RunConfig,
    dir: &Path,
    resume: bool,
    notes: &mut Notes,
) -> Result<Option<checkpoint::Loaded>> {
    let config_path = dir.join("config.toml");
    if !resume {
        for p in [
            &config_path,
            &dir.join("metrics.jsonl"),
            &checkpoint::checkpoints_dir(dir),
        ] {
            if p.exists() {
                return Err(Error::file(
                    dir,
                    "already holds a run: continue it with --resume or choose another --out",
                ));
            }
        }
        return Ok(None);
    }
    if !config_path.is_file() {
        return Err(Error::file(
            &config_path,
            "nothing to resume: the run directory holds no config.toml",
        ));
    }
    let saved = std::fs::read_to_string(&config_path).map_err(|e| Error::file(&config_path, e))?;
    check_same_run(config, &saved, &config_path)?;
    let loaded = checkpoint::latest(dir)?;
    match &loaded {
        Some(l) => {
            for s in &l.skipped {
                notes.push(format!(
                    "skipping torn checkpoint {} (no manifest: interrupted while writing)",
                    s.display()
                ));
            }
            check_same_run(
                config,
                &l.manifest.config,
                &l.dir.join(checkpoint::MANIFEST),
            )?;
        }
        None => notes.push("no complete checkpoint yet: starting the run from step 0".into()),
    }
    Ok(loaded)
}

/// The run's data: the dataset passed in `opts` (checked against the config), or loaded.
fn run_data(config: &RunConfig, opts: &RunOptions) -> Result<Dataset> {
    let Some(d) = &opts.dataset else {
        return Dataset::load(&config.data);
    };
    let expected = match &config.data.dir {
        Some(dir) => dir.display().to_string(),
        None => format!("embedded:{}", config.data.corpus),
    };
    let tokenizer_ok = config.data.dir.is_some() || d.tokenizer() == config.data.tokenizer.name();
    if d.source() != expected || !tokenizer_ok {
        return Err(Error::config(
            "data",
            format!(
                "the dataset passed in RunOptions is {} ({} tokens), the config names \
                 {expected}",
                d.source(),
                d.tokenizer()
            ),
        ));
    }
    Ok(d.clone())
}

/// Refuses a budget larger than one pass over the data unless `train.allow_repeat` is set
/// (then notes it).
fn check_budget(config: &RunConfig, t: &Trainer, notes: &mut Notes) -> Result<()> {
    let total = config.total_steps();
    let tokens_per_epoch = t.sampler.tokens_per_epoch();
    if total.saturating_mul(config.batch_tokens()) <= tokens_per_epoch {
        return Ok(());
    }
    let msg = format!(
        "the budget of {total} steps × {} tokens exceeds one pass over the training data \
         ({tokens_per_epoch} tokens): data will repeat",
        config.batch_tokens()
    );
    if !config.train.allow_repeat {
        return Err(Error::config(
            "train.allow_repeat",
            format!("is false, but {msg}"),
        ));
    }
    notes.push(format!("warning: {msg}"));
    Ok(())
}

/// The loop state and metrics writer: restored from `loaded` (model, optimizer, EWA, sampler,
/// metrics cut back to the checkpoint), or fresh.
fn start_loop(
    t: &mut Trainer,
    dir: &Path,
    loaded: Option<checkpoint::Loaded>,
    notes: &mut Notes,
) -> Result<(LoopState, metrics::MetricsWriter)> {
    let metrics_path = dir.join("metrics.jsonl");
    if let Some(l) = loaded {
        t.restore(&l)?;
        // Older checkpoints a killed writer left, and torn newer ones: only this one counts.
        checkpoint::remove_others(dir, &l.dir)?;
        let state = l.manifest.state.clone();
        t.sampler.seek(state.sampler)?;
        let writer = metrics::MetricsWriter::resume(
            &metrics_path,
            state.metrics_bytes,
            state.metrics_lines,
        )?;
        notes.push(format!(
            "resuming {} from step {}",
            dir.display(),
            state.step
        ));
        return Ok((state, writer));
    }
    let state = LoopState {
        step: 0,
        tokens: 0,
        sampler: t.sampler.position(),
        metrics_bytes: 0,
        metrics_lines: 0,
        train_seconds: 0.0,
        eval_seconds: 0.0,
        tracker: TargetTracker::new(&t.cfg.eval.targets, &t.cfg.ewa.taus),
        last_line: None,
        last_eval: None,
        best_eval_loss: None,
    };
    Ok((state, metrics::MetricsWriter::create(&metrics_path)?))
}

/// Runs the steps from `state.step` to the budget: evaluations, metrics lines, progress and
/// checkpoints. Returns `false` when it stopped early at `opts.stop_after` (checkpointed).
///
/// On a GPU the loss and gradient norm stay on the device between log steps: a step then waits
/// for the device at most once (the optimizer's finiteness check), and a log step reads its
/// figures inside the timed region, so the training time counts the device's work.
fn train_loop(
    t: &mut Trainer,
    config: &RunConfig,
    opts: &RunOptions,
    state: &mut LoopState,
    writer: &mut metrics::MetricsWriter,
) -> Result<bool> {
    let dir = &opts.out;
    let total = config.total_steps();
    let bar = progress_bar(opts.progress, total, state.step);
    if state.step == 0 && config.eval.at_start && state.last_eval.is_none() {
        let mut line = MetricsLine {
            step: 0,
            tokens: 0,
            train_loss: None,
            eval_loss: None,
            eval_loss_ewa: BTreeMap::new(),
            lr: None,
            grad_norm: None,
            elapsed: 0.0,
        };
        let t0 = Instant::now();
        t.evaluate(&mut line, false)?;
        state.eval_seconds += t0.elapsed().as_secs_f64();
        record(state, writer, line)?;
    }

    while state.step < total {
        let step = state.step + 1;
        let evaluate = step == total
            || (config.eval.interval > 0 && step.is_multiple_of(config.eval.interval))
            || config.eval.at.contains(&step);
        let log = evaluate || step.is_multiple_of(config.train.log_interval);
        let t0 = Instant::now();
        let out = t.train_step(step)?;
        let (loss, grad_norm) = if log || t.device.is_cpu() {
            (Some(out.loss.value()?), Some(out.grad_norm.value()?))
        } else {
            (None, None)
        };
        state.train_seconds += t0.elapsed().as_secs_f64();
        state.step = step;
        state.tokens += out.tokens;
        state.sampler = t.sampler.position();

        if log {
            let mut line = MetricsLine {
                step,
                tokens: state.tokens,
                train_loss: loss,
                eval_loss: None,
                eval_loss_ewa: BTreeMap::new(),
                lr: Some(out.lr),
                grad_norm,
                elapsed: state.train_seconds,
            };
            if evaluate {
                let t1 = Instant::now();
                t.evaluate(&mut line, true)?;
                state.eval_seconds += t1.elapsed().as_secs_f64();
                if let (Some(b), Some(l)) = (&bar, line.eval_loss) {
                    b.println(format!("step {step}: eval loss {l:.4}"));
                }
            }
            record(state, writer, line)?;
        }
        if let Some(b) = &bar {
            b.set_position(step);
            if let Some(loss) = loss {
                let tps = state.tokens as f64 / state.train_seconds.max(1e-9);
                b.set_message(format!("loss {loss:.4} | {tps:.0} tok/s"));
            }
        }
        let stop_here = opts.stop_after == Some(step);
        let interval = config.checkpoint.interval;
        if step == total || stop_here || (interval > 0 && step.is_multiple_of(interval)) {
            writer.sync()?;
            state.metrics_bytes = writer.bytes();
            state.metrics_lines = writer.lines();
            t.save(dir, state)?;
        }
        if stop_here && step < total {
            if let Some(b) = &bar {
                b.abandon();
            }
            return Ok(false);
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    Ok(true)
}

/// Appends a metrics line and folds it into the loop state.
fn record(
    state: &mut LoopState,
    writer: &mut metrics::MetricsWriter,
    line: MetricsLine,
) -> Result<()> {
    writer.append(&line)?;
    if line.eval_loss.is_some() {
        state.tracker.observe(&line);
        if let Some(l) = line.eval_loss {
            if state.best_eval_loss.is_none_or(|b| l < b) {
                state.best_eval_loss = Some(l);
            }
        }
        state.last_eval = Some(line.clone());
    }
    state.last_line = Some(line);
    Ok(())
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_vec_pretty(value).map_err(|e| Error::file(path, e))?;
    text.push(b'\n');
    write_atomic(path, &text)
}

/// Errors unless `saved` (a resolved config) describes the same run as `config`.
fn check_same_run(config: &RunConfig, saved: &str, origin: &Path) -> Result<()> {
    let saved = RunConfig::parse(saved, &[])
        .map_err(|e| Error::file(origin, format!("saved config does not parse: {e}")))?;
    let diffs: Vec<String> = config::diff_tables(&config.to_table()?, &saved.to_table()?)
        .into_iter()
        .filter(|d| !RESUMABLE_CHANGES.contains(&d.as_str()))
        .collect();
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(Error::file(
            origin,
            format!(
                "belongs to a different run: the config differs in {}; only {} may change on \
                 resume",
                diffs.join(", "),
                RESUMABLE_CHANGES.join(", ")
            ),
        ))
    }
}

fn progress_bar(enabled: bool, total: u64, at: u64) -> Option<indicatif::ProgressBar> {
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{wide_bar}] step {pos}/{len} {msg} ETA {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_position(at);
    Some(bar)
}

/// What one training step reports.
struct StepOut {
    loss: Reading,
    lr: f64,
    grad_norm: Reading,
    tokens: u64,
}

/// A figure of a step: on the host already, or a 0-d f64 tensor still on the device (read only
/// when logged, so that the device is not waited for on every step).
enum Reading {
    Host(f64),
    Device(Tensor),
}

impl Reading {
    fn value(&self) -> Result<f64> {
        match self {
            Reading::Host(x) => Ok(*x),
            Reading::Device(t) => scalar(t),
        }
    }
}

/// Where a gradient's labels come from.
enum Labels<'a> {
    /// The data's next tokens.
    Data,
    /// Drawn from the model's own softmax (Sophia's Gauss–Newton–Bartlett estimator).
    Sampled(&'a mut ChaCha12Rng),
}

/// Model, optimizer, EWA, data and evaluation set of one run.
struct Trainer {
    cfg: RunConfig,
    model: Model,
    opt: Driver,
    ewa: Option<Ewa>,
    vars: Vec<(String, Var)>,
    sampler: Sampler,
    /// The evaluation batches, as (inputs, targets, tokens) already on the device.
    eval_set: Vec<(Tensor, Tensor, usize)>,
    device: Device,
    /// Parameters whose group runs Sophia (they take the sampled-label gradient).
    hessian: Option<HashSet<TensorId>>,
    /// Parameters whose group runs exact MARS (they take the look-ahead gradient).
    lookahead: Option<HashSet<TensorId>>,
    /// Whether some group evaluates at a point other than the parameters (Schedule-Free).
    eval_point: bool,
}

/// Members of the groups whose config satisfies `pred`, as variable ids (`None` if none).
fn members_where(
    opt: &Driver,
    vars: &[(String, Var)],
    pred: impl Fn(&OptimConfig) -> bool,
) -> Option<HashSet<TensorId>> {
    let mut ids = HashSet::new();
    for (label, names) in opt.group_members() {
        if opt.group_config(&label).is_some_and(&pred) {
            for n in names {
                if let Some((_, v)) = vars.iter().find(|(m, _)| *m == n) {
                    ids.insert(v.id());
                }
            }
        }
    }
    (!ids.is_empty()).then_some(ids)
}

/// A ChaCha12 stream seed derived from the run seed and a purpose (FNV-1a), so no two uses of
/// randomness share a stream.
fn derived_seed(seed: u64, purpose: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in seed.to_le_bytes().iter().chain(purpose.as_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The label-sampling stream of step `step`.
fn label_rng(seed: u64, step: u64) -> ChaCha12Rng {
    let mut rng = ChaCha12Rng::seed_from_u64(derived_seed(seed, "sophia-labels"));
    rng.set_stream(step);
    rng
}

/// Draws one label per position from `softmax(logits)` (`logits`: `(…, vocab)`), by inverse
/// CDF in f64 on a uniform draw.
fn sample_labels(logits: &Tensor, rng: &mut ChaCha12Rng) -> Result<Tensor> {
    let dims = logits.dims().to_vec();
    let vocab = *dims
        .last()
        .ok_or_else(|| Error::Msg("logits must have a vocabulary dimension".into()))?;
    let flat: Vec<f64> = logits
        .detach()
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let mut out = Vec::with_capacity(flat.len() / vocab.max(1));
    let mut weights = vec![0.0; vocab];
    for row in flat.chunks_exact(vocab) {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut total = 0.0;
        for (w, &x) in weights.iter_mut().zip(row) {
            *w = (x - max).exp();
            total += *w;
        }
        let u = rng.random::<f64>() * total;
        let mut acc = 0.0;
        let mut pick = vocab - 1;
        for (i, &w) in weights.iter().enumerate() {
            acc += w;
            if u < acc {
                pick = i;
                break;
            }
        }
        out.push(pick as u32);
    }
    Ok(Tensor::from_vec(
        out,
        &dims[..dims.len() - 1],
        logits.device(),
    )?)
}

/// The error of a run whose training loss stopped being finite.
fn diverged(loss: f64, step: u64) -> Error {
    Error::Numerical(format!(
        "training loss is {loss} at step {step}: the run diverged (lower the learning rate or \
         clip gradients)"
    ))
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// A store holding only the gradients of the variables in `keep`.
fn restrict(grads: &GradStore, vars: &[(String, Var)], keep: &HashSet<TensorId>) -> GradStore {
    let mut out = GradStore::default();
    for (_, v) in vars {
        if keep.contains(&v.id()) {
            if let Some(g) = grads.get(v.as_tensor()) {
                out.insert(v.as_tensor(), g.clone());
            }
        }
    }
    out
}

/// Runs `f` with `values` written into `vars` (same order), then writes back exact copies of
/// what the variables held, also when `f` fails.
fn with_values<R>(
    vars: &[(String, Var)],
    values: &[(String, Tensor)],
    f: impl FnOnce() -> Result<R>,
) -> Result<R> {
    let saved = vars
        .iter()
        .map(|(_, v)| v.as_tensor().copy())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut set = Ok(());
    for ((name, var), (vname, value)) in vars.iter().zip(values) {
        debug_assert_eq!(name, vname);
        set = var.set(value);
        if set.is_err() {
            break;
        }
    }
    let out = set.map_err(Error::from).and_then(|_| f());
    for ((name, var), raw) in vars.iter().zip(&saved) {
        var.set(raw)
            .map_err(|e| Error::Msg(format!("restoring `{name}` after evaluation failed: {e}")))?;
    }
    out
}

const RNG_NOTE: &str = "data order: ChaCha12(seed) per pass, restored from the sampler position; \
                        Sophia labels: ChaCha12(FNV(seed, \"sophia-labels\")), stream = step";

impl Trainer {
    fn new(cfg: &RunConfig, data: &Dataset) -> Result<Self> {
        let device = cfg.device.open()?;
        let context = cfg.model.context();
        data.check_model(cfg.model.vocab_size(), context)?;
        let mut model = cfg.model.build(cfg.dtype.dtype(), &device)?;
        // The primitive-op composition instead of the fused CPU kernels, to compare the two
        // (same function, different rounding; a no-op off the CPU, which always composes).
        if std::env::var_os("OPTLAB_FUSED_OPS").is_some_and(|v| v == "0") {
            model.set_fused_ops(false);
        }
        let opt = Driver::new(cfg.optimizer_spec(), model.params()?)?;
        let vars = opt.vars();
        let ewa = if cfg.ewa.taus.is_empty() {
            None
        } else {
            Some(Ewa::new(vars.clone(), &cfg.ewa.taus)?)
        };
        let sampler = data.sampler(context, cfg.train.batch_size, cfg.seed)?;
        let eval_set = data
            .eval_batches(context, cfg.eval_batch_size(), cfg.eval.tokens)?
            .iter()
            .map(|b| b.to_tensors(&device).map(|(x, y)| (x, y, b.tokens())))
            .collect::<Result<Vec<_>>>()?;
        let hessian = members_where(&opt, &vars, |c| matches!(c, OptimConfig::Sophia(_)));
        let lookahead = members_where(
            &opt,
            &vars,
            |c| matches!(c, OptimConfig::Mars(m) if !m.is_approx),
        );
        let eval_point = members_where(&opt, &vars, |c| {
            matches!(
                c,
                OptimConfig::SchedulefreeAdamw(_) | OptimConfig::SchedulefreeSgd(_)
            )
        })
        .is_some();
        Ok(Self {
            cfg: cfg.clone(),
            model,
            opt,
            ewa,
            vars,
            sampler,
            eval_set,
            device,
            hessian,
            lookahead,
            eval_point,
        })
    }

    /// The mean loss and summed gradient of `batch` over its micro-batches. On the CPU the loss
    /// is read at once; on a GPU it stays on the device.
    fn grads(&self, batch: &Batch, mut labels: Labels<'_>) -> Result<(Reading, GradStore)> {
        let micro = self.cfg.micro_batch();
        let split;
        let parts: &[Batch] = if micro < batch.rows {
            split = batch.split(micro)?;
            &split
        } else {
            std::slice::from_ref(batch)
        };
        let mut acc = GradStore::default();
        let mut loss = 0.0;
        let mut loss_on_device: Option<Tensor> = None;
        let on_cpu = self.device.is_cpu();
        for part in parts {
            let (x, y) = part.to_tensors(&self.device)?;
            let logits = self.model.forward(&x)?;
            let l = match &mut labels {
                Labels::Data => self.model.loss(&logits, &y)?,
                Labels::Sampled(rng) => lm_loss(&logits, &sample_labels(&logits, rng)?, 0.0)?,
            };
            // Each micro-batch's mean loss weighs by its share of the sequences, so the sum
            // of the gradients is the gradient of the whole batch's mean loss.
            let objective = if parts.len() > 1 {
                let w = part.rows as f64 / batch.rows as f64;
                if on_cpu {
                    loss += w * scalar(&l.ce)?;
                } else {
                    let part_loss = l.ce.to_dtype(DType::F64)?.affine(w, 0.0)?;
                    loss_on_device = Some(match loss_on_device {
                        Some(sum) => (sum + part_loss)?,
                        None => part_loss,
                    });
                }
                l.total.affine(w, 0.0)?
            } else {
                if on_cpu {
                    loss = scalar(&l.ce)?;
                } else {
                    loss_on_device = Some(l.ce.to_dtype(DType::F64)?);
                }
                l.total
            };
            let g = objective.backward()?;
            for (_, v) in &self.vars {
                if let Some(gv) = g.get(v.as_tensor()) {
                    let sum = match acc.get(v.as_tensor()) {
                        Some(a) => (a + gv)?,
                        None => gv.clone(),
                    };
                    acc.insert(v.as_tensor(), sum);
                }
            }
        }
        let loss = match loss_on_device {
            Some(t) => Reading::Device(t),
            None => Reading::Host(loss),
        };
        Ok((loss, acc))
    }

    /// Clips `grads` in place when the config asks for it; returns the norm before clipping.
    /// On a GPU the norm and the clipping factor are computed on the device
    /// ([`clip_grad_norm_on_device`]): a non-finite norm then makes the gradients non-finite,
    /// which the optimizer's check refuses.
    fn clip(&self, grads: &mut GradStore) -> Result<Reading> {
        if !self.device.is_cpu() {
            let norm = clip_grad_norm_on_device(grads, &self.vars, self.cfg.train.grad_clip)?;
            return Ok(Reading::Device(norm));
        }
        Ok(Reading::Host(match self.cfg.train.grad_clip {
            Some(max) => clip_grad_norm_named(grads, &self.vars, max)?,
            None => grad_norm(grads, self.vars.iter().map(|(_, v)| v))?,
        }))
    }

    fn train_step(&mut self, step: u64) -> Result<StepOut> {
        self.cfg.schedule.apply(&mut self.opt, step)?;
        let batch = self.sampler.next_batch();
        if let Some(ids) = &self.lookahead {
            let here = self.sampler.position();
            let ahead = self.sampler.next_batch();
            self.sampler.seek(here)?;
            let (_, mut g) = self.grads(&ahead, Labels::Data)?;
            self.clip(&mut g)?;
            let g = restrict(&g, &self.vars, ids);
            self.opt.observe(ExtraInput::PreviousGrad, &g)?;
        }
        let (loss, mut grads) = self.grads(&batch, Labels::Data)?;
        if let Reading::Host(loss) = loss {
            if !loss.is_finite() {
                return Err(diverged(loss, step));
            }
        }
        let norm = self.clip(&mut grads)?;
        match self.opt.step(&grads) {
            // On a GPU the loss was not read: a non-finite gradient is how divergence shows.
            Err(Error::NonFiniteGradient { .. }) if matches!(loss, Reading::Device(_)) => {
                return Err(diverged(loss.value()?, step));
            }
            other => other?,
        }
        drop(grads);
        if let Some(ewa) = &mut self.ewa {
            ewa.update()?;
        }
        if let Some(ids) = &self.hessian {
            if step.is_multiple_of(self.cfg.train.hessian_interval) {
                let mut rng = label_rng(self.cfg.seed, step);
                let (_, mut g) = self.grads(&batch, Labels::Sampled(&mut rng))?;
                self.clip(&mut g)?;
                let g = restrict(&g, &self.vars, ids);
                self.opt.observe(ExtraInput::HessianGrad, &g)?;
            }
        }
        Ok(StepOut {
            loss,
            lr: self.opt.lr(),
            grad_norm: norm,
            tokens: batch.tokens() as u64,
        })
    }

    /// Mean cross-entropy over the evaluation set at the current variables. On a GPU the
    /// per-batch losses are summed on the device and read once.
    fn eval_loss(model: &Model, set: &[(Tensor, Tensor, usize)], device: &Device) -> Result<f64> {
        let (mut sum, mut n) = (0.0, 0usize);
        let mut on_device: Option<Tensor> = None;
        for (x, y, tokens) in set {
            let ce = model.forward_loss(x, y)?.ce;
            if device.is_cpu() {
                sum += scalar(&ce)? * *tokens as f64;
            } else {
                let weighted = ce.to_dtype(DType::F64)?.affine(*tokens as f64, 0.0)?;
                on_device = Some(match on_device {
                    Some(s) => (s + weighted)?,
                    None => weighted,
                });
            }
            n += tokens;
        }
        if let Some(s) = on_device {
            sum = scalar(&s)?;
        }
        Ok(sum / n as f64)
    }

    /// Fills the evaluation fields of `line` (EWA ones only when `with_ewa` and averaged).
    fn evaluate(&mut self, line: &mut MetricsLine, with_ewa: bool) -> Result<()> {
        let (model, set, dev) = (&self.model, &self.eval_set, &self.device);
        let raw = if self.eval_point {
            let point = self.opt.eval_params()?;
            with_values(&self.vars, &point, || Self::eval_loss(model, set, dev))?
        } else {
            Self::eval_loss(model, set, dev)?
        };
        line.eval_loss = Some(raw);
        if let (true, Some(ewa)) = (with_ewa, &mut self.ewa) {
            if ewa.count() > 0 {
                for tau in ewa.taus().to_vec() {
                    let l = ewa.with_swapped(tau, || Self::eval_loss(model, set, dev))?;
                    line.eval_loss_ewa.insert(metrics::tau_key(tau), l);
                }
            }
        }
        Ok(())
    }

    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.dims().to_vec()))
            .collect()
    }

    /// Writes a checkpoint of everything at `state`.
    fn save(&self, dir: &Path, state: &LoopState) -> Result<()> {
        let params: Vec<(String, Tensor)> = self
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let mut files = vec![
            (
                checkpoint::MODEL_FILE,
                checkpoint::tensors_to_bytes(&params)?,
            ),
            (
                checkpoint::OPTIMIZER_FILE,
                self.opt.state_dict()?.to_bytes()?,
            ),
        ];
        if let Some(ewa) = &self.ewa {
            files.push((checkpoint::EWA_FILE, ewa.state_dict()?.to_bytes()?));
        }
        let manifest = Manifest {
            format: checkpoint::CHECKPOINT_FORMAT.into(),
            state: state.clone(),
            config: self.cfg.to_toml()?,
            params: self.param_shapes(),
            rng: RNG_NOTE.into(),
            files: BTreeMap::new(),
        };
        checkpoint::write(dir, manifest, files)?;
        Ok(())
    }

    /// Loads model, optimizer and EWA state from a verified checkpoint.
    fn restore(&mut self, l: &checkpoint::Loaded) -> Result<()> {
        let m = &l.manifest;
        let origin = l.dir.join(checkpoint::MANIFEST);
        if m.params != self.param_shapes() {
            return Err(Error::file(
                &origin,
                "the checkpoint's parameters (names and shapes) differ from this model's",
            ));
        }
        let file = |name: &str| {
            l.files
                .get(name)
                .ok_or_else(|| Error::file(&l.dir, format!("checkpoint lacks {name}")))
        };
        let tensors = checkpoint::tensors_from_bytes(file(checkpoint::MODEL_FILE)?, &self.device)
            .map_err(|e| Error::file(l.dir.join(checkpoint::MODEL_FILE), e))?;
        if tensors.len() != self.vars.len() {
            return Err(Error::file(
                l.dir.join(checkpoint::MODEL_FILE),
                format!(
                    "holds {} tensors, the model has {} parameters",
                    tensors.len(),
                    self.vars.len()
                ),
            ));
        }
        for (name, var) in &self.vars {
            let path = l.dir.join(checkpoint::MODEL_FILE);
            let t = tensors
                .get(name)
                .ok_or_else(|| Error::file(&path, format!("lacks parameter `{name}`")))?;
            if t.dims() != var.dims() || t.dtype() != var.dtype() {
                return Err(Error::file(
                    &path,
                    format!(
                        "`{name}` is {:?} {:?}, the model's is {:?} {:?}",
                        t.dtype(),
                        t.dims(),
                        var.dtype(),
                        var.dims()
                    ),
                ));
            }
            var.set(t)?;
        }
        let sd =
            crate::optim::StateDict::from_bytes(file(checkpoint::OPTIMIZER_FILE)?, &self.device)
                .map_err(|e| Error::file(l.dir.join(checkpoint::OPTIMIZER_FILE), e))?;
        self.opt
            .load_state_dict(sd)
            .map_err(|e| Error::file(l.dir.join(checkpoint::OPTIMIZER_FILE), e))?;
        if let Some(ewa) = &mut self.ewa {
            let sd = crate::optim::StateDict::from_bytes(file(checkpoint::EWA_FILE)?, &self.device)
                .map_err(|e| Error::file(l.dir.join(checkpoint::EWA_FILE), e))?;
            ewa.load_state_dict(sd)
                .map_err(|e| Error::file(l.dir.join(checkpoint::EWA_FILE), e))?;
        }
        Ok(())
    }

    fn summary(&self, state: &LoopState, data: &Dataset) -> Summary {
        let last_eval = state.last_eval.as_ref();
        let steps = state.step.max(1) as f64;
        Summary {
            steps: state.step,
            tokens: state.tokens,
            final_losses: metrics::FinalLosses {
                train_loss: state.last_line.as_ref().and_then(|l| l.train_loss),
                eval_loss: last_eval.and_then(|l| l.eval_loss),
                eval_loss_ewa: last_eval
                    .map(|l| l.eval_loss_ewa.clone())
                    .unwrap_or_default(),
                best_eval_loss: state.best_eval_loss,
            },
            targets: state.tracker.targets.clone(),
            timing: metrics::Timing {
                train_seconds: state.train_seconds,
                eval_seconds: state.eval_seconds,
                seconds_per_step: state.train_seconds / steps,
                tokens_per_second: state.tokens as f64 / state.train_seconds.max(1e-12),
            },
            data: metrics::DataUse {
                source: data.source().to_string(),
                tokens_per_epoch: self.sampler.tokens_per_epoch(),
                repeated: self.sampler.sequences_repeated() > 0,
                sequences_repeated: self.sampler.sequences_repeated(),
                epochs: self.sampler.position().epoch + 1,
                unigram_entropy: data.unigram_entropy(),
            },
            params: self.model.num_params(),
            non_embedding_params: self.model.non_embedding_params(),
            diagnostics: self.opt.diagnostics(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_labels_follow_the_softmax() {
        let logits = Tensor::new(&[[[0f32, 2f32.ln(), f32::NEG_INFINITY]]], &Device::Cpu)
            .unwrap()
            .broadcast_as((1, 3000, 3))
            .unwrap()
            .contiguous()
            .unwrap();
        let mut rng = label_rng(0, 1);
        let s = sample_labels(&logits, &mut rng).unwrap();
        assert_eq!(s.dims(), &[1, 3000]);
        let v = s.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        let ones = v.iter().filter(|&&x| x == 1).count() as f64 / 3000.0;
        assert!((ones - 2.0 / 3.0).abs() < 0.03, "{ones}");
        assert!(v.iter().all(|&x| x < 2));
        let again = sample_labels(&logits, &mut label_rng(0, 1)).unwrap();
        assert_eq!(again.flatten_all().unwrap().to_vec1::<u32>().unwrap(), v);
        let other = sample_labels(&logits, &mut label_rng(0, 2)).unwrap();
        assert_ne!(other.flatten_all().unwrap().to_vec1::<u32>().unwrap(), v);
    }

    #[test]
    fn derived_seeds_differ_by_purpose() {
        assert_ne!(derived_seed(0, "a"), derived_seed(0, "b"));
        assert_ne!(derived_seed(0, "a"), derived_seed(1, "a"));
    }
}
