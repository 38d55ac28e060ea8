//! Running a sweep's runs: finished runs are skipped, interrupted ones resumed from their newest
//! checkpoint, and each run is held under a [`RunLock`] while it trains.
//!
//! A run's state is read from its directory `<runs_dir>/<id>/`:
//!
//! | state | meaning |
//! |---|---|
//! | finished | `summary.json` exists (the runner writes it last) |
//! | diverged | `failed.json` exists: the run stopped on a non-finite loss (rerun only with `retry_failed`) |
//! | started | `config.toml` exists: resumed with the runner's exact resume |
//! | pending | anything else (a directory without `config.toml` is a start that died before writing anything that can be resumed, and is cleared) |

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::runner::{self, DeviceSpec, RunOptions};
use crate::sweep::lock::{Held, RunLock};
use crate::sweep::spec::{Coords, Plan, PlannedRun};

/// The file marking a run that stopped on a non-finite loss.
pub const FAILED_FILE: &str = "failed.json";
/// The file recording a run's place in the sweep.
pub const SWEEP_FILE: &str = "sweep.json";

/// Where a run stands.
#[derive(Debug, Clone, PartialEq)]
pub enum RunState {
    /// It completed (`summary.json`).
    Finished,
    /// It diverged (`failed.json`, with the error).
    Failed(String),
    /// It started and can be resumed.
    Started,
    /// Nothing usable on disk.
    Pending,
}

/// `failed.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailedRun {
    /// The run id.
    pub id: String,
    /// The error.
    pub error: String,
}

/// `sweep.json`: a run's id and coordinates, for people browsing the runs directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepRecord {
    /// Sweep name.
    pub sweep: String,
    /// The run id.
    pub id: String,
    /// Its coordinates.
    pub coords: Coords,
}

/// The state of a run directory.
pub fn run_state(dir: &Path) -> RunState {
    if dir.join("summary.json").is_file() {
        return RunState::Finished;
    }
    let failed = dir.join(FAILED_FILE);
    if failed.is_file() {
        let msg = std::fs::read_to_string(&failed)
            .ok()
            .and_then(|s| serde_json::from_str::<FailedRun>(&s).ok())
            .map(|f| f.error)
            .unwrap_or_else(|| "failed".into());
        return RunState::Failed(msg);
    }
    if dir.join("config.toml").is_file() {
        return RunState::Started;
    }
    RunState::Pending
}

/// How a worker runs its runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// `(index, count)`: run shard `index` of `count` (see [`Plan::shard`]).
    pub shard: (usize, usize),
    /// Rerun runs that diverged.
    pub retry_failed: bool,
    /// How old the heartbeat of another host's lock must be to break it.
    pub stale_after: Duration,
    /// Show the runner's progress bar (on a terminal only).
    pub progress: bool,
    /// Print a line per run.
    pub verbose: bool,
    /// Train every run on this device instead of the one its config names (a sweep places
    /// runs on GPUs this way; the device is not part of a run's id, and a run interrupted on
    /// one device resumes on another).
    pub device: Option<DeviceSpec>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            shard: (0, 1),
            retry_failed: false,
            stale_after: Duration::from_secs(300),
            progress: true,
            verbose: true,
            device: None,
        }
    }
}

/// What a worker did.
#[derive(Debug, Clone, Default)]
pub struct WorkerReport {
    /// Runs in the shard.
    pub in_shard: usize,
    /// Runs trained to completion by this worker.
    pub completed: Vec<String>,
    /// Runs that diverged in this worker.
    pub diverged: Vec<String>,
    /// Runs already finished (or diverged) before this worker reached them.
    pub already_done: usize,
    /// Runs another live worker held.
    pub held_elsewhere: Vec<String>,
    /// Runs that failed for another reason (left to retry), with the error.
    pub errors: Vec<(String, String)>,
}

/// The GPUs of `sweep run --devices`: a comma-separated list of CUDA ordinals (`0,1,3`), or
/// `visible` for every GPU in `CUDA_VISIBLE_DEVICES` (which a scheduler such as Slurm sets to
/// the GPUs it granted; CUDA numbers them 0, 1, … inside the process). `visible` is read from
/// `visible_env`, the variable's value.
pub fn parse_devices(list: &str, visible_env: Option<&str>) -> Result<Vec<DeviceSpec>> {
    let list = list.trim();
    if list == "visible" {
        let visible = visible_env.unwrap_or("").trim();
        let n = visible.split(',').filter(|d| !d.trim().is_empty()).count();
        if n == 0 || visible.starts_with("-1") {
            return Err(Error::config(
                "--devices",
                "`visible` needs CUDA_VISIBLE_DEVICES to name at least one GPU (Slurm sets it \
                 when the job asks for GPUs); give the ordinals instead, e.g. --devices 0,1",
            ));
        }
        return Ok((0..n).map(DeviceSpec::Cuda).collect());
    }
    let mut out = Vec::new();
    for part in list.split(',') {
        let part = part.trim();
        let ordinal: usize = part.parse().map_err(|_| {
            Error::config(
                "--devices",
                format!("`{part}` is not a GPU ordinal: give e.g. 0,1 or `visible`"),
            )
        })?;
        let device = DeviceSpec::Cuda(ordinal);
        if out.contains(&device) {
            return Err(Error::config(
                "--devices",
                format!("GPU {ordinal} is listed twice (use --per-device to pack runs)"),
            ));
        }
        out.push(device);
    }
    Ok(out)
}

/// Runs the shard's unfinished runs of `plan`, one after another.
pub fn run_shard(plan: &Plan, opts: &WorkerOptions) -> Result<WorkerReport> {
    let (index, count) = opts.shard;
    if count == 0 || index >= count {
        return Err(Error::config(
            "--shard",
            format!("{index}/{count}: the index must be below the count"),
        ));
    }
    let runs = plan.shard(index, count);
    crate::sweep::lock::remove_stale_lock_temporaries(&plan.spec.runs_dir);
    let mut report = WorkerReport {
        in_shard: runs.len(),
        ..Default::default()
    };
    let todo: Vec<&PlannedRun> = runs
        .iter()
        .copied()
        .filter(|r| match run_state(&plan.run_dir(r)) {
            RunState::Finished => false,
            RunState::Failed(_) => opts.retry_failed,
            _ => true,
        })
        .collect();
    report.already_done = runs.len() - todo.len();
    let say = |msg: String| {
        if opts.verbose {
            println!("{msg}");
        }
    };
    say(format!(
        "sweep {}: {} runs; shard {index}/{count}: {} runs, {} done, {} to run",
        plan.spec.name,
        plan.runs.len(),
        runs.len(),
        report.already_done,
        todo.len()
    ));
    let mut data: HashMap<String, Dataset> = HashMap::new();
    let width = todo.len().to_string().len();
    let sweep_start = Instant::now();
    for (i, run) in todo.iter().enumerate() {
        let tag = format!(
            "[{:>width$}/{}] {} {}",
            i + 1,
            todo.len(),
            run.id,
            run.coords.describe()
        );
        let dir = plan.run_dir(run);
        let lock_base = plan.spec.runs_dir.join(format!("{}.lock", run.id));
        let lock = match RunLock::acquire(&lock_base, opts.stale_after)? {
            Ok(l) => l,
            Err(held) => {
                let who = match held {
                    Held::By(info) => format!("{} pid {}", info.host, info.pid),
                    Held::Unreadable => "a worker taking its lock".into(),
                };
                say(format!("{tag}: held by {who}, skipped"));
                report.held_elsewhere.push(run.id.clone());
                continue;
            }
        };
        // Between the listing above and the lock, another worker may have finished it.
        match run_state(&dir) {
            RunState::Finished => {
                say(format!("{tag}: finished by another worker"));
                report.already_done += 1;
                lock.release()?;
                continue;
            }
            RunState::Failed(_) if !opts.retry_failed => {
                report.already_done += 1;
                lock.release()?;
                continue;
            }
            _ => {}
        }
        let t0 = Instant::now();
        let outcome = train_one(plan, run, &dir, opts, &mut data, &say, &tag);
        let secs = t0.elapsed().as_secs_f64();
        if lock.lost() {
            eprintln!(
                "warning: the lock of run {} was changed by another worker while it ran",
                run.id
            );
        }
        lock.release()?;
        match outcome {
            Ok(Some(summary)) => {
                let loss = summary
                    .final_losses
                    .eval_loss_ewa
                    .values()
                    .copied()
                    .chain(summary.final_losses.eval_loss)
                    .fold(f64::INFINITY, f64::min);
                say(format!(
                    "{tag}: done in {secs:.1}s ({} steps, final eval loss {loss:.4}; sweep \
                     time {:.0}s)",
                    summary.steps,
                    sweep_start.elapsed().as_secs_f64()
                ));
                report.completed.push(run.id.clone());
            }
            Ok(None) => {
                say(format!("{tag}: diverged after {secs:.1}s (recorded)"));
                report.diverged.push(run.id.clone());
            }
            Err(e) => {
                eprintln!("{tag}: error: {e}");
                report.errors.push((run.id.clone(), e.to_string()));
            }
        }
    }
    Ok(report)
}

/// Trains (or resumes) one run under its lock. `Ok(None)`: it diverged (recorded in
/// `failed.json`).
fn train_one(
    plan: &Plan,
    run: &PlannedRun,
    dir: &Path,
    opts: &WorkerOptions,
    data: &mut HashMap<String, Dataset>,
    say: &dyn Fn(String),
    tag: &str,
) -> Result<Option<runner::Summary>> {
    let state = run_state(dir);
    if matches!(state, RunState::Failed(_)) || matches!(state, RunState::Pending) && dir.exists() {
        // A retried divergence starts over; a start that died before its config.toml was
        // written holds nothing resumable.
        std::fs::remove_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    }
    let resume = matches!(state, RunState::Started);
    say(format!(
        "{tag}: {}",
        if resume { "resuming" } else { "starting" }
    ));
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let record = SweepRecord {
        sweep: plan.spec.name.clone(),
        id: run.id.clone(),
        coords: run.coords.clone(),
    };
    let mut text = serde_json::to_vec_pretty(&record).map_err(|e| Error::file(dir, e))?;
    text.push(b'\n');
    write_atomic(&dir.join(SWEEP_FILE), &text)?;

    let key = toml::to_string(&run.config.data).unwrap_or_default();
    if !data.contains_key(&key) {
        data.insert(key.clone(), Dataset::load(&run.config.data)?);
    }
    let mut config = run.config.clone();
    if let Some(device) = opts.device {
        config.device = device;
    }
    let mut ro = RunOptions::new(dir);
    ro.resume = resume;
    ro.progress = opts.progress && std::io::stderr().is_terminal();
    ro.log = opts.verbose;
    ro.dataset = data.get(&key).cloned();
    match runner::run(&config, &ro) {
        Ok(r) => Ok(r.summary),
        Err(Error::Numerical(msg)) => {
            let failed = FailedRun {
                id: run.id.clone(),
                error: msg,
            };
            let mut text = serde_json::to_vec_pretty(&failed).map_err(|e| Error::file(dir, e))?;
            text.push(b'\n');
            write_atomic(&dir.join(FAILED_FILE), &text)?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Counts of run states over a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Runs planned.
    pub planned: usize,
    /// Finished.
    pub finished: usize,
    /// Diverged.
    pub diverged: usize,
    /// Started, not finished.
    pub started: usize,
    /// Not started.
    pub pending: usize,
}

/// The state of every run of `plan`.
pub fn progress(plan: &Plan) -> (Progress, Vec<RunState>) {
    let states: Vec<RunState> = plan
        .runs
        .iter()
        .map(|r| run_state(&plan.run_dir(r)))
        .collect();
    let mut p = Progress {
        planned: states.len(),
        ..Default::default()
    };
    for s in &states {
        match s {
            RunState::Finished => p.finished += 1,
            RunState::Failed(_) => p.diverged += 1,
            RunState::Started => p.started += 1,
            RunState::Pending => p.pending += 1,
        }
    }
    (p, states)
}

/// The runs directory path of a plan, for messages.
pub fn runs_dir(plan: &Plan) -> PathBuf {
    plan.spec.runs_dir.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists_parse_or_name_the_flag() {
        let cuda = |v: &[usize]| v.iter().map(|&n| DeviceSpec::Cuda(n)).collect::<Vec<_>>();
        assert_eq!(parse_devices("0", None).unwrap(), cuda(&[0]));
        assert_eq!(parse_devices("0, 2,1", None).unwrap(), cuda(&[0, 2, 1]));
        assert_eq!(
            parse_devices("visible", Some("4,5,7")).unwrap(),
            cuda(&[0, 1, 2])
        );
        for (bad, env) in [
            ("", None),
            ("a", None),
            ("0,0", None),
            ("-1", None),
            ("visible", None),
            ("visible", Some("")),
            ("visible", Some("-1")),
        ] {
            let e = parse_devices(bad, env).unwrap_err().to_string();
            assert!(e.contains("--devices"), "{bad}: {e}");
        }
    }
}
