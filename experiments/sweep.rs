//! Batch-size sweeps from a TOML definition (see `optlab::sweep::spec`):
//!
//! - `sweep plan CONFIG [--json]`: the runs with their stable ids and states;
//! - `sweep run CONFIG [--shard i/n] [--jobs N] [--report]`: runs the shard's unfinished runs
//!   (resuming interrupted ones; finished ones are never rerun; a lock per run keeps workers
//!   apart), `--jobs N` as N local worker processes, `--report` then writes the report;
//!   `--devices 0,1 [--per-device K]` trains on those GPUs, K runs at a time on each (one
//!   worker process per slot, all taking runs from the same list under the run locks);
//!   `--devices visible` uses the GPUs of `CUDA_VISIBLE_DEVICES`; `--device SPEC` runs one
//!   worker on that device;
//! - `sweep slurm CONFIG [--tasks N] [--partition P] [--time T] …`: writes an sbatch job-array
//!   script whose tasks run `sweep run CONFIG --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT`;
//! - `sweep report CONFIG`: steps and tokens to target, optimal learning rates, loss vs lr and
//!   the critical-batch-size fit, as `report.md`, `report.json`, CSVs and plots.
//!
//! Relative paths in the sweep file (`runs_dir`, `report_dir`, `base.data.dir`) are relative to
//! the directory the command runs in.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args as ClapArgs, Parser, Subcommand};
use optlab::runner;
use optlab::sweep::report::{self, console_table};
use optlab::sweep::slurm::{self, ScriptOptions};
use optlab::sweep::{exec, Plan, SweepSpec, WorkerOptions};
use optlab::{Error, Result};

/// Batch-size sweeps: plan, run (locally or as a Slurm job array), report.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand takes.
#[derive(ClapArgs, Clone)]
struct Common {
    /// The sweep file (TOML).
    config: PathBuf,
    /// Directory of the run directories (overrides the file's `runs_dir`).
    #[arg(long, value_name = "DIR")]
    runs: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// List the runs with their ids and states.
    Plan {
        #[command(flatten)]
        common: Common,
        /// Print JSON (one object per run) instead of the table.
        #[arg(long)]
        json: bool,
        /// Print the resolved run config of this run id (or unique id prefix) instead.
        #[arg(long, value_name = "ID")]
        show: Option<String>,
    },
    /// Run the unfinished runs of a shard (all runs by default).
    Run {
        #[command(flatten)]
        common: Common,
        /// Run shard i of n (0 <= i < n): the runs sorted by id, every n-th from position i.
        #[arg(long, value_name = "i/n")]
        shard: Option<String>,
        /// Run as N local worker processes (shards 0/N .. N-1/N).
        #[arg(long, value_name = "N", default_value_t = 1)]
        jobs: usize,
        /// Train on these GPUs: CUDA ordinals (`0,1`) or `visible` (those of
        /// CUDA_VISIBLE_DEVICES, as Slurm grants them). Needs the `cuda` feature.
        #[arg(long, value_name = "LIST", conflicts_with_all = ["jobs", "device"])]
        devices: Option<String>,
        /// Runs at a time on each GPU of --devices (small runs share a GPU well).
        #[arg(long, value_name = "K", default_value_t = 1, requires = "devices")]
        per_device: usize,
        /// Train this worker's runs on this device (`cpu`, `cuda`, `cuda:N`) whatever their
        /// config says.
        #[arg(long, value_name = "SPEC")]
        device: Option<String>,
        /// Write the report afterwards.
        #[arg(long)]
        report: bool,
        /// Report directory for --report (overrides the file's `report_dir`).
        #[arg(long, value_name = "DIR")]
        report_dir: Option<PathBuf>,
        /// Rerun runs that diverged.
        #[arg(long)]
        retry_failed: bool,
        /// Seconds without a heartbeat after which another host's run lock counts as abandoned.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        stale_after: u64,
        /// Print only errors.
        #[arg(long)]
        quiet: bool,
    },
    /// Write an sbatch job-array script running the sweep's shards.
    Slurm {
        #[command(flatten)]
        common: Common,
        /// Array tasks (default: the file's slurm.tasks, else one per run up to 64).
        #[arg(long)]
        tasks: Option<usize>,
        /// At most this many tasks at once.
        #[arg(long)]
        max_parallel: Option<usize>,
        /// Partition.
        #[arg(long)]
        partition: Option<String>,
        /// Time limit per task.
        #[arg(long)]
        time: Option<String>,
        /// CPUs per task.
        #[arg(long)]
        cpus_per_task: Option<usize>,
        /// Memory per task.
        #[arg(long)]
        mem: Option<String>,
        /// GPUs per task.
        #[arg(long)]
        gpus: Option<usize>,
        /// Account.
        #[arg(long)]
        account: Option<String>,
        /// Log file pattern (default <runs>/slurm/%A_%a.out).
        #[arg(long)]
        output: Option<String>,
        /// Where to write the script (default <runs>/<name>.sbatch).
        #[arg(long, value_name = "PATH")]
        script: Option<PathBuf>,
        /// The sweep executable the tasks run (default: this one).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
    /// Aggregate the finished runs into report.md, report.json, CSVs and plots.
    Report {
        #[command(flatten)]
        common: Common,
        /// Report directory (overrides the file's `report_dir`).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

fn load(common: &Common) -> Result<Plan> {
    let mut spec = SweepSpec::from_file(&common.config)?;
    if let Some(r) = &common.runs {
        spec.runs_dir = r.clone();
    }
    spec.plan()
}

fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let bad = || {
        Error::config(
            "--shard",
            format!("`{s}` must be i/n with 0 <= i < n (e.g. 0/4)"),
        )
    };
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| Error::file(p, e))
}

fn plan_cmd(common: &Common, json: bool, show: Option<&str>) -> Result<()> {
    let plan = load(common)?;
    if let Some(id) = show {
        let found: Vec<_> = plan.runs.iter().filter(|r| r.id.starts_with(id)).collect();
        return match found.as_slice() {
            [r] => {
                println!("# run {} ({})", r.id, r.coords.describe());
                print!("{}", r.config.to_toml()?);
                Ok(())
            }
            [] => Err(Error::config(
                "--show",
                format!("no run id starts with `{id}`"),
            )),
            _ => Err(Error::config(
                "--show",
                format!("`{id}` matches {} runs", found.len()),
            )),
        };
    }
    let (progress, states) = exec::progress(&plan);
    if json {
        let rows: Vec<serde_json::Value> = plan
            .runs
            .iter()
            .zip(&states)
            .map(|(r, s)| {
                serde_json::json!({
                    "id": r.id,
                    "coords": r.coords,
                    "state": state_name(s),
                    "steps": r.config.total_steps(),
                    "dir": plan.run_dir(r),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).map_err(|e| Error::Msg(e.to_string()))?
        );
        return Ok(());
    }
    println!(
        "sweep {}: {} runs in {} ({} finished, {} diverged, {} started, {} pending)",
        plan.spec.name,
        progress.planned,
        plan.spec.runs_dir.display(),
        progress.finished,
        progress.diverged,
        progress.started,
        progress.pending
    );
    let width = plan.runs.len().to_string().len();
    for (i, (r, s)) in plan.runs.iter().zip(&states).enumerate() {
        println!(
            "{:>width$}  {}  {:<8}  {:>6} steps  {}",
            i,
            r.id,
            state_name(s),
            r.config.total_steps(),
            r.coords.describe()
        );
    }
    Ok(())
}

fn state_name(s: &exec::RunState) -> &'static str {
    match s {
        exec::RunState::Finished => "finished",
        exec::RunState::Failed(_) => "diverged",
        exec::RunState::Started => "started",
        exec::RunState::Pending => "pending",
    }
}

/// What `sweep run` was asked to do.
struct RunRequest<'a> {
    common: &'a Common,
    shard: Option<&'a str>,
    jobs: usize,
    devices: Option<&'a str>,
    per_device: usize,
    device: Option<&'a str>,
    with_report: bool,
    report_dir: Option<&'a Path>,
    retry_failed: bool,
    stale_after: u64,
    quiet: bool,
}

/// One local worker process: `sweep run` with these extra arguments.
fn spawn_worker(req: &RunRequest, extra: &[String]) -> Result<std::process::Child> {
    let exe = std::env::current_exe().map_err(|e| Error::Msg(e.to_string()))?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("run")
        .arg(&req.common.config)
        .args(extra)
        .arg("--stale-after")
        .arg(req.stale_after.to_string());
    if let Some(r) = &req.common.runs {
        cmd.arg("--runs").arg(r);
    }
    if req.retry_failed {
        cmd.arg("--retry-failed");
    }
    if req.quiet {
        cmd.arg("--quiet");
    }
    cmd.spawn().map_err(|e| Error::file(&exe, e))
}

/// The worker processes of `--jobs N` (one static shard each) or of `--devices` (one per GPU
/// slot, all on the same shard: the run locks hand each run to one of them, so a GPU that
/// finishes early takes the next run). `None` when this process is the only worker.
fn worker_args(req: &RunRequest) -> Result<Option<Vec<Vec<String>>>> {
    if req.jobs == 0 {
        return Err(Error::config("--jobs", "must be >= 1"));
    }
    if let Some(list) = req.devices {
        if req.per_device == 0 {
            return Err(Error::config("--per-device", "must be >= 1"));
        }
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        let devices = exec::parse_devices(list, visible.as_deref())?;
        let mut workers = Vec::new();
        for d in &devices {
            for _ in 0..req.per_device {
                let mut a = vec!["--device".to_string(), d.to_string()];
                if let Some(s) = req.shard {
                    a.extend(["--shard".to_string(), s.to_string()]);
                }
                workers.push(a);
            }
        }
        return Ok(Some(workers));
    }
    if req.jobs == 1 {
        return Ok(None);
    }
    if req.shard.is_some() {
        return Err(Error::config(
            "--jobs",
            "cannot be combined with --shard (each job is a shard)",
        ));
    }
    let jobs = req.jobs;
    Ok(Some(
        (0..jobs)
            .map(|i| vec!["--shard".to_string(), format!("{i}/{jobs}")])
            .collect(),
    ))
}

fn run_cmd(req: &RunRequest) -> Result<bool> {
    let plan = load(req.common)?;
    let start = Instant::now();
    let mut ok = true;
    if let Some(workers) = worker_args(req)? {
        let children = workers
            .iter()
            .map(|a| spawn_worker(req, a))
            .collect::<Result<Vec<_>>>()?;
        for mut c in children {
            let status = c.wait().map_err(|e| Error::Msg(e.to_string()))?;
            ok &= status.success();
        }
    } else {
        let shard = req.shard.map(parse_shard).transpose()?.unwrap_or((0, 1));
        let device = req
            .device
            .map(str::parse::<runner::DeviceSpec>)
            .transpose()
            .map_err(|e| Error::config("--device", e.to_string()))?;
        // Before any other thread exists: candle reads the thread count once.
        if let Some(r) = plan.runs.first() {
            runner::apply_threads(r.config.threads);
        }
        let opts = WorkerOptions {
            shard,
            retry_failed: req.retry_failed,
            stale_after: Duration::from_secs(req.stale_after),
            progress: !req.quiet,
            verbose: !req.quiet,
            device,
        };
        let rep = exec::run_shard(&plan, &opts)?;
        if !req.quiet {
            println!(
                "shard {}/{}{}: {} completed, {} diverged, {} already done, {} held by other \
                 workers, {} errors ({:.0}s)",
                shard.0,
                shard.1,
                device.map(|d| format!(" on {d}")).unwrap_or_default(),
                rep.completed.len(),
                rep.diverged.len(),
                rep.already_done,
                rep.held_elsewhere.len(),
                rep.errors.len(),
                start.elapsed().as_secs_f64()
            );
        }
        ok &= rep.errors.is_empty();
    }
    if req.with_report {
        report_cmd(&plan, req.report_dir)?;
        println!("sweep time: {:.0}s", start.elapsed().as_secs_f64());
    }
    Ok(ok)
}

fn report_cmd(plan: &Plan, out: Option<&Path>) -> Result<()> {
    let dir = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| plan.spec.report_dir.clone());
    let rep = report::build(plan)?;
    let written = report::write(&rep, plan, &dir)?;
    print!("{}", console_table(&rep, plan));
    println!("\nreport: {}", dir.join("report.md").display());
    println!("        {}", dir.join("report.json").display());
    println!(
        "CSV for `cbs fit --csv`: {}",
        dir.join(report::steps_csv_name(0)).display()
    );
    let pngs: Vec<&PathBuf> = written
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    println!("plots ({} PNG, each also as SVG):", pngs.len());
    for p in pngs {
        println!("  {}", p.display());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn slurm_cmd(
    common: &Common,
    tasks: Option<usize>,
    max_parallel: Option<usize>,
    partition: Option<String>,
    time: Option<String>,
    cpus_per_task: Option<usize>,
    mem: Option<String>,
    gpus: Option<usize>,
    account: Option<String>,
    output: Option<String>,
    script: Option<PathBuf>,
    binary: Option<PathBuf>,
) -> Result<()> {
    let plan = load(common)?;
    let mut s = plan.spec.slurm.clone();
    if tasks == Some(0) {
        return Err(Error::config("--tasks", "must be >= 1"));
    }
    s.tasks = tasks.or(s.tasks);
    s.max_parallel = max_parallel.or(s.max_parallel);
    s.partition = partition.or(s.partition);
    s.time = time.or(s.time);
    s.cpus_per_task = cpus_per_task.or(s.cpus_per_task);
    s.mem = mem.or(s.mem);
    s.gpus = gpus.or(s.gpus);
    s.account = account.or(s.account);
    s.output = output.or(s.output);
    let binary = match binary {
        Some(b) => absolute(&b)?,
        None => std::env::current_exe().map_err(|e| Error::Msg(e.to_string()))?,
    };
    let workdir = std::env::current_dir().map_err(|e| Error::Msg(e.to_string()))?;
    let mut run_args = Vec::new();
    if let Some(r) = &common.runs {
        run_args.push("--runs".to_string());
        run_args.push(absolute(r)?.display().to_string());
    }
    let opts = ScriptOptions {
        binary: binary.display().to_string(),
        config: absolute(&common.config)?.display().to_string(),
        workdir: workdir.display().to_string(),
        run_args,
    };
    let text = slurm::script(&plan, &s, &opts)?;
    let path = script.unwrap_or_else(|| {
        plan.spec
            .runs_dir
            .join(format!("{}.sbatch", plan.spec.name))
    });
    optlab::io::write_atomic(&path, text.as_bytes())?;
    // Slurm opens the log file before the script runs: its directory must exist now.
    let logs = match &s.output {
        Some(o) => Path::new(o).parent().map(Path::to_path_buf),
        None => Some(plan.spec.runs_dir.join("slurm")),
    };
    if let Some(l) =
        logs.filter(|l| !l.as_os_str().is_empty() && !l.to_string_lossy().contains('%'))
    {
        std::fs::create_dir_all(&l).map_err(|e| Error::file(&l, e))?;
    }
    println!(
        "wrote {} ({} runs in {} array tasks)\nsubmit: sbatch {}\nthen:   {} report {}",
        path.display(),
        plan.runs.len(),
        slurm::task_count(&plan, &s),
        path.display(),
        opts.binary,
        opts.config
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Plan { common, json, show } => {
            plan_cmd(&common, json, show.as_deref()).map(|_| true)
        }
        Command::Run {
            common,
            shard,
            jobs,
            devices,
            per_device,
            device,
            report,
            report_dir,
            retry_failed,
            stale_after,
            quiet,
        } => run_cmd(&RunRequest {
            common: &common,
            shard: shard.as_deref(),
            jobs,
            devices: devices.as_deref(),
            per_device,
            device: device.as_deref(),
            with_report: report,
            report_dir: report_dir.as_deref(),
            retry_failed,
            stale_after,
            quiet,
        }),
        Command::Slurm {
            common,
            tasks,
            max_parallel,
            partition,
            time,
            cpus_per_task,
            mem,
            gpus,
            account,
            output,
            script,
            binary,
        } => slurm_cmd(
            &common,
            tasks,
            max_parallel,
            partition,
            time,
            cpus_per_task,
            mem,
            gpus,
            account,
            output,
            script,
            binary,
        )
        .map(|_| true),
        Command::Report { common, out } => {
            load(&common).and_then(|plan| report_cmd(&plan, out.as_deref()).map(|_| true))
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
