//! The `sweep` binary and library end to end, on a tiny sweep (the `test` decoder, three runs of
//! a few dozen steps): stable plan ids, kill -9 of workers at random points then resumption
//! giving exactly the report of an uninterrupted sweep, concurrent workers never running the same
//! run, the Slurm script's shards covering the sweep once, and clear errors for malformed files.

mod mounts;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use optlab::analysis::csv::read_cbs_csv;
use optlab::runner::metrics::TIMING_FIELDS;
use optlab::sweep::SweepSpec;
use serde_json::Value;

/// Three runs (AdamW at B = 2, 4, 8) that checkpoint often, with targets from a reference run and
/// a fixed loss.
const TINY: &str = r#"
name = "tiny"

[base]
seed = 1
threads = 1
[base.model]
preset = "test"
[base.train]
steps = 24
[base.eval]
interval = 3
tokens = 512
[base.ewa]
taus = [0.9]
[base.checkpoint]
interval = 4

[[optimizers]]
lr = [1e-2]
config = { name = "adamw", betas = [0.9, 0.95] }

[axes]
batch_size = [2, 4, 8]

[[rules]]
kind = "table"
field = "train.steps"
points = [[2, 30], [8, 18]]

[[rules]]
kind = "beta2"
batch_scale = 64

[targets]
reference = [{ optimizer = "adamw", batch_size = 2, step = 21 }]
loss = [3.2]

[report]
b0 = 2
"#;

/// [`TINY`] written differently: sections in another order, keys within tables reordered,
/// rule points and axis values listed in another order, numbers spelled differently.
const REORDERED: &str = r#"
name = "tiny-again"

[report]
b0 = 2.0

[targets]
loss = [3.2]
reference = [{ batch_size = 2, step = 21, optimizer = "adamw" }]

[axes]
batch_size = [4, 8, 2]

[[optimizers]]
config = { betas = [0.9, 0.95], name = "adamw" }
lr = [0.01]

[[rules]]
points = [[8, 18], [2, 30]]
field = "train.steps"
kind = "table"

[[rules]]
batch_scale = 64.0
kind = "beta2"

[base.checkpoint]
interval = 2
[base.ewa]
taus = [0.9]
[base.eval]
tokens = 512
interval = 3
[base.train]
steps = 24
[base.model]
preset = "test"
[base]
threads = 2
seed = 1
"#;

fn sweep(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sweep"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run sweep")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "sweep failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A directory holding `sweep.toml` with `text`.
fn setup(text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sweep.toml"), text).unwrap();
    dir
}

/// `report.json` without its wall-clock part.
fn report_json(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("report.json")).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    v.as_object_mut().unwrap().remove("timing");
    v
}

/// Every run's metrics lines without their timing fields, by run id.
fn all_metrics(runs: &Path) -> BTreeMap<String, Vec<Value>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(runs).unwrap() {
        let p = entry.unwrap().path();
        let m = p.join("metrics.jsonl");
        if !m.is_file() {
            continue;
        }
        let lines = std::fs::read_to_string(&m)
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: Value = serde_json::from_str(l).unwrap();
                for f in TIMING_FIELDS {
                    v.as_object_mut().unwrap().remove(f);
                }
                v
            })
            .collect();
        out.insert(p.file_name().unwrap().to_string_lossy().into_owned(), lines);
    }
    out
}

/// The uninterrupted sweep: its report and metrics, computed once.
struct Reference {
    report: Value,
    metrics: BTreeMap<String, Vec<Value>>,
    _dir: tempfile::TempDir,
}

fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let dir = setup(TINY);
        let out = ok(&sweep(&["run", "sweep.toml", "--runs", "runs"], dir.path()));
        assert!(out.contains("3 completed"), "{out}");
        ok(&sweep(
            &["report", "sweep.toml", "--runs", "runs", "--out", "report"],
            dir.path(),
        ));
        Reference {
            report: report_json(&dir.path().join("report")),
            metrics: all_metrics(&dir.path().join("runs")),
            _dir: dir,
        }
    })
}

/// `sweep report` into a full or read-only directory: a clear error naming the file and the
/// cause (no panic); once space or write access is back the report is written in full.
#[test]
fn reports_into_a_full_or_read_only_directory_fail_clearly() {
    const TEST: &str = "reports_into_a_full_or_read_only_directory_fail_clearly";
    let r = reference();
    let cwd = r._dir.path();
    // Room for the first files of the report, not for its plots.
    let Some(fs) = mounts::Tmpfs::mount(TEST, 64 << 10) else {
        return;
    };
    let out_dir = fs.join("report");
    let report = |out: &Path| {
        sweep(
            &[
                "report",
                "sweep.toml",
                "--runs",
                "runs",
                "--out",
                out.to_str().unwrap(),
            ],
            cwd,
        )
    };
    let check = |out: &Output, cause: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.contains(&format!("error: {}", out_dir.display())) && stderr.contains(cause),
            "{stderr}"
        );
    };
    check(&report(&out_dir), "No space left on device");
    fs.resize(16 << 20);
    ok(&report(&out_dir));
    assert_eq!(report_json(&out_dir), r.report);
    std::fs::remove_dir_all(&out_dir).unwrap();
    fs.read_only(true);
    check(&report(&out_dir), "Read-only file system");
    fs.read_only(false);
    ok(&report(&out_dir));
    assert_eq!(report_json(&out_dir), r.report);
}

#[test]
fn uninterrupted_sweep_reports_steps_to_target_and_a_fit() {
    let r = reference();
    assert_eq!(r.metrics.len(), 3);
    assert_eq!(r.report["runs"]["finished"], 3);
    let targets = r.report["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 2);
    assert_eq!(targets[0]["name"], "loss 3.2");
    let cells = r.report["steps_to_target"].as_array().unwrap();
    assert!(!cells.is_empty());
    // The reference target is the loss of the B = 2 run at its evaluation at step 21.
    let reference = targets[1]["values"][""].as_f64().unwrap();
    let b2 = r.report["run_results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["batch_size"] == 2)
        .unwrap();
    let id = b2["id"].as_str().unwrap();
    let at21 = r.metrics[id]
        .iter()
        .find(|l| l["step"] == 21)
        .expect("an evaluation at step 21");
    assert_eq!(at21["eval_loss_ewa"]["0.9"].as_f64().unwrap(), reference);
}

#[test]
fn plan_ids_are_stable_and_ignore_order_paths_and_threads() {
    let spec = SweepSpec::parse(TINY).unwrap();
    let ids = |s: &SweepSpec| -> BTreeMap<String, String> {
        s.plan()
            .unwrap()
            .runs
            .iter()
            .map(|r| (r.coords.describe(), r.id.clone()))
            .collect()
    };
    let base = ids(&spec);
    assert_eq!(base.len(), 3);
    assert_eq!(ids(&SweepSpec::parse(TINY).unwrap()), base);
    // Reordered axis values and sections, other paths, threads and checkpointing: same ids.
    let shuffled = TINY
        .replace("batch_size = [2, 4, 8]", "batch_size = [8, 2, 4]")
        .replace(
            "name = \"tiny\"",
            "name = \"other\"\nruns_dir = \"elsewhere\"",
        )
        .replace("threads = 1", "threads = 2")
        .replace("interval = 4", "interval = 7");
    assert_eq!(ids(&SweepSpec::parse(&shuffled).unwrap()), base);
    assert_eq!(ids(&SweepSpec::parse(REORDERED).unwrap()), base);
    // Two optimizers listed in either order: each run keeps its id.
    let two = |first: &str, second: &str| {
        TINY.replace(
            "[[optimizers]]\nlr = [1e-2]\nconfig = { name = \"adamw\", betas = [0.9, 0.95] }",
            &format!("{first}\n{second}"),
        )
    };
    let a = "[[optimizers]]\nlr = [1e-2]\nconfig = { name = \"adamw\", betas = [0.9, 0.95] }";
    let b = "[[optimizers]]\nlabel = \"lion\"\nlr = [1e-3, 3e-4]\nconfig = { name = \"lion\" }";
    let ab = ids(&SweepSpec::parse(&two(a, b)).unwrap());
    let ba = ids(&SweepSpec::parse(&two(b, a)).unwrap());
    assert_eq!(ab, ba);
    assert_eq!(ab.len(), 9);
    for (k, v) in &base {
        assert_eq!(&ab[k], v, "{k}");
    }
    // A change of a hyperparameter changes the id.
    let other_lr = ids(&SweepSpec::parse(&TINY.replace("lr = [1e-2]", "lr = [2e-2]")).unwrap());
    assert!(other_lr.values().all(|id| !base.values().any(|b| b == id)));

    // The binary prints the same ids, every time, from any directory.
    let d1 = setup(TINY);
    let d2 = setup(&shuffled);
    let plan = |d: &Path| -> BTreeSet<String> {
        let out = ok(&sweep(&["plan", "sweep.toml", "--json"], d));
        let v: Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    let p1 = plan(d1.path());
    assert_eq!(p1, base.values().cloned().collect());
    assert_eq!(plan(d1.path()), p1);
    assert_eq!(plan(d2.path()), p1);
}

#[test]
fn shards_partition_the_runs() {
    let plan = SweepSpec::parse(&TINY.replace("lr = [1e-2]", "lr = [1e-2, 3e-3, 1e-3]"))
        .unwrap()
        .plan()
        .unwrap();
    for n in 1..=4 {
        let mut seen = BTreeSet::new();
        for i in 0..n {
            for r in plan.shard(i, n) {
                assert!(seen.insert(r.id.clone()), "{} in two shards", r.id);
            }
        }
        assert_eq!(seen.len(), plan.runs.len());
    }
}

/// A small deterministic generator for kill times.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Metrics lines on disk under `runs`, over all runs: how far a sweep has come.
fn lines_written(runs: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(runs) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("metrics.jsonl")).ok())
        .map(|t| t.lines().count())
        .sum()
}

#[test]
fn kill_9_at_random_points_then_resume_gives_the_same_report() {
    let r = reference();
    let total: usize = r.metrics.values().map(Vec::len).sum();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let trials = 10;
    let mut interrupted = 0;
    for trial in 0..trials {
        let dir = setup(TINY);
        // One to three kills, each at a random point of the sweep's progress: once a random
        // share of an uninterrupted sweep's metrics lines is on disk (zero: during start-up).
        // Progress, not wall time, so that the kills land inside the sweep however fast the
        // machine is at the moment.
        let kills = 1 + (rng.next() * 3.0) as usize;
        for _ in 0..kills {
            let mut child = Command::new(env!("CARGO_BIN_EXE_sweep"))
                .args(["run", "sweep.toml", "--runs", "runs", "--quiet"])
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let target = (rng.next() * total as f64) as usize;
            let t0 = Instant::now();
            while lines_written(&dir.path().join("runs")) < target
                && child.try_wait().unwrap().is_none()
                && t0.elapsed() < Duration::from_secs(120)
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            // SIGKILL: no destructor, no flush, no lock release.
            let _ = child.kill();
            let _ = child.wait();
        }
        let finished = std::fs::read_dir(dir.path().join("runs"))
            .map(|d| {
                d.filter(|e| e.as_ref().unwrap().path().join("summary.json").is_file())
                    .count()
            })
            .unwrap_or(0);
        if finished < 3 {
            interrupted += 1;
        }
        let out = ok(&sweep(&["run", "sweep.toml", "--runs", "runs"], dir.path()));
        assert!(out.contains(" 0 errors"), "trial {trial}: {out}");
        ok(&sweep(
            &["report", "sweep.toml", "--runs", "runs", "--out", "report"],
            dir.path(),
        ));
        assert_eq!(
            report_json(&dir.path().join("report")),
            r.report,
            "trial {trial}: report differs after {kills} kills"
        );
        assert_eq!(
            all_metrics(&dir.path().join("runs")),
            r.metrics,
            "trial {trial}: metrics differ"
        );
        // Nothing left locked.
        let locks: Vec<PathBuf> = std::fs::read_dir(dir.path().join("runs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".lock."))
            .collect();
        assert!(
            locks.iter().all(|p| {
                let id = p.file_name().unwrap().to_string_lossy();
                let id = id.split(".lock").next().unwrap();
                dir.path()
                    .join("runs")
                    .join(id)
                    .join("summary.json")
                    .is_file()
            }),
            "trial {trial}: lock files of unfinished runs left: {locks:?}"
        );
        // A further run has nothing to do.
        let again = ok(&sweep(&["run", "sweep.toml", "--runs", "runs"], dir.path()));
        assert!(again.contains("3 done, 0 to run"), "{again}");
    }
    // Most kills must land inside the sweep for the test to mean anything.
    assert!(
        interrupted * 2 >= trials,
        "only {interrupted} of {trials} trials interrupted the sweep"
    );
}

#[test]
fn concurrent_workers_never_run_the_same_run() {
    let r = reference();
    let dir = setup(TINY);
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_sweep"))
                .args(["run", "sweep.toml", "--runs", "runs"])
                .current_dir(dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut started: Vec<String> = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        let text = ok(&out);
        for line in text.lines() {
            if line.ends_with(": starting") || line.ends_with(": resuming") {
                // "[i/n] ID coords: starting"
                started.push(line.split_whitespace().nth(1).unwrap().to_string());
            }
        }
    }
    started.sort();
    let unique: BTreeSet<&String> = started.iter().collect();
    assert_eq!(started.len(), unique.len(), "a run ran twice: {started:?}");
    assert_eq!(unique.len(), 3, "{started:?}");
    assert_eq!(all_metrics(&dir.path().join("runs")), r.metrics);
}

#[test]
fn slurm_script_shards_cover_the_sweep_once() {
    let r = reference();
    let dir = setup(TINY);
    let out = ok(&sweep(
        &[
            "slurm",
            "sweep.toml",
            "--runs",
            "runs",
            "--tasks",
            "2",
            "--partition",
            "debug",
            "--time",
            "00:10:00",
            "--cpus-per-task",
            "1",
            "--script",
            "job.sbatch",
        ],
        dir.path(),
    ));
    assert!(out.contains("sbatch job.sbatch"), "{out}");
    let script = std::fs::read_to_string(dir.path().join("job.sbatch")).unwrap();
    for line in [
        "#SBATCH --array=0-1",
        "#SBATCH --partition=debug",
        "#SBATCH --time=00:10:00",
        "#SBATCH --cpus-per-task=1",
        "--shard \"$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT\"",
    ] {
        assert!(script.contains(line), "missing `{line}`:\n{script}");
    }
    assert!(dir.path().join("runs/slurm").is_dir(), "log directory");
    // Play the array: each task is the script run with Slurm's variables.
    for task in 0..2 {
        let out = Command::new("bash")
            .arg("job.sbatch")
            .env("SLURM_ARRAY_TASK_ID", task.to_string())
            .env("SLURM_ARRAY_TASK_COUNT", "2")
            .current_dir(dir.path())
            .output()
            .unwrap();
        ok(&out);
    }
    assert_eq!(all_metrics(&dir.path().join("runs")), r.metrics);
}

#[test]
fn report_csv_is_what_cbs_fit_reads() {
    let dir = setup(TINY);
    ok(&sweep(
        &["run", "sweep.toml", "--runs", "runs", "--quiet"],
        dir.path(),
    ));
    ok(&sweep(
        &["report", "sweep.toml", "--runs", "runs", "--out", "rep"],
        dir.path(),
    ));
    let rows = read_cbs_csv(&dir.path().join("rep/steps_to_target.csv")).unwrap();
    let report = report_json(&dir.path().join("rep"));
    let cells: Vec<(f64, f64)> = report["steps_to_target"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["target"] == 0)
        .map(|c| {
            (
                c["batch_size"].as_f64().unwrap(),
                c["steps"].as_f64().unwrap(),
            )
        })
        .collect();
    let from_csv: Vec<(f64, f64)> = rows.iter().map(|r| (r.batch_size, r.steps)).collect();
    assert_eq!(from_csv, cells);
    assert!(rows.iter().all(|r| r.group == "adamw"));
    for f in [
        "report.md",
        "runs.csv",
        "optimal_lr.csv",
        "lr_curves.csv",
        "cbs_fit.csv",
    ] {
        assert!(dir.path().join("rep").join(f).is_file(), "{f}");
    }
    assert!(dir.path().join("rep/plots/loss_steps_adamw.png").is_file());
    assert!(dir.path().join("rep/plots/loss_steps_adamw.svg").is_file());
}

#[test]
fn malformed_sweep_files_name_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        ("name = \"tiny\"", "name = \"a b\"", "`name`"),
        (
            "batch_size = [2, 4, 8]",
            "batch_size = []",
            "`axes.batch_size`",
        ),
        (
            "batch_size = [2, 4, 8]",
            "batch_size = [2, 0]",
            "`axes.batch_size[1]`",
        ),
        (
            "batch_size = [2, 4, 8]",
            "batch_size = [2, 2]",
            "`axes.batch_size[1]`",
        ),
        (
            "batch_size = [2, 4, 8]",
            "batch_sizes = [2]",
            "`axes.batch_sizes`",
        ),
        ("lr = [1e-2]", "lr = []", "`optimizers[0].lr`"),
        ("lr = [1e-2]", "lr = [-1.0]", "`optimizers[0].lr[0]`"),
        ("lr = [1e-2]", "lr = [\"x\"]", "`optimizers[0].lr[0]`"),
        (
            "name = \"adamw\", betas",
            "name = \"adamz\", betas",
            "`optimizers[0].config.name`",
        ),
        (
            "betas = [0.9, 0.95] }",
            "betas = [0.9, 0.95], lr = 1.0 }",
            "`optimizers[0].config.lr`",
        ),
        (
            "[[optimizers]]\n",
            "[[optimizers]]\nlabels = \"x\"\n",
            "`optimizers[0].labels`",
        ),
        ("kind = \"beta2\"", "kind = \"beta3\"", "`rules[1].kind`"),
        (
            "batch_scale = 64",
            "batch_scale = -1",
            "`rules[1].batch_scale`",
        ),
        (
            "points = [[2, 30], [8, 18]]",
            "points = [[2, 30], [2, 18]]",
            "`rules[0].points`",
        ),
        (
            "points = [[2, 30], [8, 18]]",
            "points = [[2]]",
            "`rules[0].points[0]`",
        ),
        (
            "field = \"train.steps\"",
            "field = \"trian.steps\"",
            "`rules[0].field`",
        ),
        (
            "batch_size = 2, step",
            "batch_size = 3, step",
            "`targets.reference[0].batch_size`",
        ),
        (
            "optimizer = \"adamw\", batch",
            "optimizer = \"sgd\", batch",
            "`targets.reference[0].optimizer`",
        ),
        ("loss = [3.2]", "loss = [-3.2]", "`targets.loss[0]`"),
        ("b0 = 2", "b0 = 0", "`report.b0`"),
        ("b0 = 2", "metric = \"median\"", "`report`"),
        (
            "[base.train]\nsteps = 24",
            "[base.train]\nstepz = 24",
            "`train`",
        ),
        (
            "[base.eval]\ninterval = 3\ntokens = 512",
            "[base.eval]\ninterval = 3\ntokens = 5",
            "`eval.tokens`",
        ),
        ("[base]\n", "bogus = 1\n[base]\n", "`bogus`"),
        (
            "[base]\n",
            "[base.optimizer]\nname = \"sgd\"\n[base]\n",
            "`base.optimizer`",
        ),
    ];
    for (from, to, field) in cases {
        assert!(TINY.contains(from), "case `{from}` does not apply");
        let text = TINY.replacen(from, to, 1);
        let err = SweepSpec::parse(&text)
            .and_then(|s| s.plan().map(|_| ()))
            .expect_err(&format!("`{to}` should be rejected"))
            .to_string();
        assert!(err.contains(field), "`{to}`: expected {field} in: {err}");
    }
    // An axis and a rule setting the same field, and an axis with no effect.
    let clash = TINY.replace(
        "batch_size = [2, 4, 8]",
        "batch_size = [2, 4, 8]\nset = { \"optimizer.betas.1\" = [0.9, 0.99] }",
    );
    let err = SweepSpec::parse(&clash).unwrap_err().to_string();
    assert!(
        err.contains("`rules[1]`") && err.contains("optimizer.betas.1"),
        "{err}"
    );
    let no_effect = TINY.replace(
        "batch_size = [2, 4, 8]",
        "batch_size = [2, 4, 8]\nset = { \"checkpoint.interval\" = [5, 6] }",
    );
    let err = SweepSpec::parse(&no_effect)
        .unwrap()
        .plan()
        .unwrap_err()
        .to_string();
    assert!(err.contains("same config"), "{err}");

    // The binary exits non-zero with the field and the file named.
    let dir = setup(&TINY.replace("lr = [1e-2]", "lr = []"));
    let out = sweep(&["plan", "sweep.toml"], dir.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`optimizers[0].lr`") && err.contains("sweep.toml"),
        "{err}"
    );
    let out = sweep(&["run", "sweep.toml", "--shard", "2/2"], setup(TINY).path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--shard"));
    let out = sweep(&["plan", "missing.toml"], dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

#[test]
fn the_committed_cbs_scaling_sweeps_share_their_d64_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/configs");
    let data = SweepSpec::from_file(&root.join("cbs-data-size.toml"))
        .and_then(|s| s.plan())
        .unwrap();
    let model = SweepSpec::from_file(&root.join("cbs-model-size.toml"))
        .and_then(|s| s.plan())
        .unwrap();
    assert_eq!((data.runs.len(), model.runs.len()), (15, 45));
    assert_eq!(data.spec.runs_dir, model.spec.runs_dir);
    let d64: BTreeSet<&str> = model
        .runs
        .iter()
        .filter(|r| r.coords.model == "d64")
        .map(|r| r.id.as_str())
        .collect();
    let shared: BTreeSet<&str> = data.runs.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(d64, shared);
    // Targets after D tokens: every run is long enough to pass the largest D at B = 8's pace.
    let largest = data
        .spec
        .targets
        .reference
        .iter()
        .filter_map(|t| t.tokens)
        .max()
        .unwrap();
    for r in &model.runs {
        let tokens =
            r.config.total_steps() * (r.coords.batch_size * r.config.model.context()) as u64;
        assert!(tokens > largest, "{}", r.coords.describe());
    }
}

#[test]
fn gpu_placement_flags_are_checked_and_slurm_tasks_use_their_gpus() {
    let dir = setup(TINY);
    let err = |args: &[&str]| {
        let out = sweep(args, dir.path());
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = err(&["run", "sweep.toml", "--devices", "0", "--jobs", "2"]);
    assert!(e.contains("--jobs") || e.contains("--devices"), "{e}");
    let e = err(&["run", "sweep.toml", "--per-device", "2"]);
    assert!(e.contains("--devices"), "{e}");
    let e = err(&["run", "sweep.toml", "--devices", "0,x"]);
    assert!(e.contains("--devices"), "{e}");
    let out = Command::new(env!("CARGO_BIN_EXE_sweep"))
        .args(["run", "sweep.toml", "--devices", "visible"])
        .env_remove("CUDA_VISIBLE_DEVICES")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CUDA_VISIBLE_DEVICES"));

    // Without a GPU (or without the `cuda` feature) a GPU worker fails every run with the
    // reason, and leaves nothing that counts as done or diverged: they stay pending, for any
    // later worker.
    let out = sweep(
        &[
            "run",
            "sweep.toml",
            "--runs",
            "runs",
            "--device",
            "cuda:0",
            "--quiet",
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("cuda:0") && e.contains("device=cpu"), "{e}");
    let plan = ok(&sweep(
        &["plan", "sweep.toml", "--runs", "runs", "--json"],
        dir.path(),
    ));
    assert!(
        !plan.contains("\"finished\"") && !plan.contains("\"diverged\""),
        "{plan}"
    );
    assert!(plan.contains("\"pending\""), "{plan}");

    ok(&sweep(
        &[
            "slurm",
            "sweep.toml",
            "--runs",
            "runs",
            "--gpus",
            "2",
            "--script",
            "gpu.sbatch",
        ],
        dir.path(),
    ));
    let script = std::fs::read_to_string(dir.path().join("gpu.sbatch")).unwrap();
    assert!(script.contains("#SBATCH --gres=gpu:2"), "{script}");
    assert!(script.contains("--devices visible"), "{script}");
}
