//! A run directory on a full disk or a read-only file system: every write the runner makes
//! (config, environment, metrics lines, checkpoint files, summary) fails with an error naming
//! the file and the cause, the last complete checkpoint stays loadable, and a resumption once
//! space (or write access) is back finishes the run exactly as an uninterrupted one. Each test
//! mounts a small tmpfs; where mounting is not allowed (no `CAP_SYS_ADMIN`, as in most CI
//! containers) it prints `SKIP` and passes.

mod mounts;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::OnceLock;

use candle_core::Device;
use mounts::Tmpfs;
use optlab::data::{DataConfig, Dataset};
use optlab::runner::checkpoint;
use optlab::runner::metrics::TIMING_FIELDS;
use optlab::runner::{run, RunConfig, RunOptions};

fn brown() -> Dataset {
    static DATA: OnceLock<Dataset> = OnceLock::new();
    DATA.get_or_init(|| Dataset::load(&DataConfig::default()).unwrap())
        .clone()
}

/// The `test` decoder with AdamW and EWA: 80 steps, evaluated at every step (so that the
/// metrics lines between two checkpoints fill more than a page), checkpoints every 40 (a
/// checkpoint is about 0.5 MB: parameters, two moments, the EWA average).
fn config() -> RunConfig {
    let text = "seed = 3\n[model]\npreset = \"test\"\n[optimizer]\nname = \"adamw\"\nlr = 0.01\n\
                [train]\nbatch_size = 4\nsteps = 80\n[eval]\ninterval = 1\ntokens = 256\n\
                [ewa]\ntaus = [0.9]\n[checkpoint]\ninterval = 40\n";
    RunConfig::parse(text, &[]).unwrap()
}

fn opts(dir: &Path, resume: bool, stop_after: Option<u64>) -> RunOptions {
    let mut o = RunOptions::new(dir);
    o.dataset = Some(brown());
    o.resume = resume;
    o.stop_after = stop_after;
    o
}

/// An uninterrupted run on an ordinary directory, once.
fn reference() -> &'static Path {
    static REF: OnceLock<tempfile::TempDir> = OnceLock::new();
    REF.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        run(&config(), &opts(dir.path(), false, None)).unwrap();
        dir
    })
    .path()
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for f in TIMING_FIELDS {
                v.as_object_mut().unwrap().remove(f);
            }
            v
        })
        .collect()
}

/// Asserts that the run in `dir` finished exactly as the reference: metrics lines (timing
/// aside), the final checkpoint's files other than its manifest (which records timers), and
/// the summary's losses and crossings.
fn assert_same_as_reference(dir: &Path) {
    let r = reference();
    assert_eq!(metrics(dir), metrics(r));
    let (a, b) = (
        checkpoint::latest(dir).unwrap().unwrap(),
        checkpoint::latest(r).unwrap().unwrap(),
    );
    assert_eq!(a.manifest.state.step, b.manifest.state.step);
    for name in [
        checkpoint::MODEL_FILE,
        checkpoint::OPTIMIZER_FILE,
        checkpoint::EWA_FILE,
    ] {
        assert_eq!(a.files[name], b.files[name], "{name}");
    }
    let summary = |d: &Path| {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap())
                .unwrap();
        v.as_object_mut().unwrap().remove("timing");
        v
    };
    assert_eq!(summary(dir), summary(r));
    let cks = std::fs::read_dir(checkpoint::checkpoints_dir(dir))
        .unwrap()
        .count();
    assert_eq!(cks, 1, "one checkpoint left in {}", dir.display());
}

/// The error must name a file under `root` and say why; returns the file's name.
fn check_error(err: &optlab::Error, root: &Path, cause: &str) -> String {
    let text = err.to_string();
    let optlab::Error::File { path, reason } = err else {
        panic!("not a file error: {text}");
    };
    assert!(path.starts_with(root), "{text}");
    assert!(reason.contains(cause), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// The newest complete checkpoint: it must load (files matching their manifest).
fn last_good(dir: &Path) -> u64 {
    let l = checkpoint::latest(dir)
        .unwrap_or_else(|e| panic!("the last checkpoint no longer loads: {e}"))
        .expect("a checkpoint");
    checkpoint::tensors_from_bytes(&l.files[checkpoint::MODEL_FILE], &Device::Cpu).unwrap();
    l.manifest.state.step
}

#[test]
fn a_full_disk_is_a_clear_error_keeps_the_last_checkpoint_and_resume_finishes_the_run() {
    const TEST: &str = "a_full_disk_is_a_clear_error";
    let cfg = config();
    let mut failed_on = BTreeSet::new();
    // Free space left once the run has checkpointed step 40 and the disk is filled: none (the
    // config rewrite fails), a page (the metrics lines outgrow it), a few pages (the next
    // checkpoint does not fit), half a checkpoint.
    let ckpt: u64 = checkpoint::latest(reference())
        .unwrap()
        .unwrap()
        .files
        .values()
        .map(|b| b.len() as u64)
        .sum();
    for free in [0, 4096, 8 << 10, 64 << 10, ckpt / 2] {
        let Some(fs) = Tmpfs::mount(TEST, 8 << 20) else {
            return;
        };
        let dir = fs.join("run");
        run(&cfg, &opts(&dir, false, Some(40))).unwrap();
        let filler = fs.fill_leaving(free);
        let err = match run(&cfg, &opts(&dir, true, None)) {
            Ok(r) => panic!("{free} bytes free: the run finished ({} steps)", r.steps),
            Err(e) => e,
        };
        let file = check_error(&err, &dir, "No space left on device");
        eprintln!("{free} bytes free: {err}");
        failed_on.insert(
            if file.ends_with(".safetensors") || file == "manifest.json" {
                "checkpoint".to_string()
            } else {
                file
            },
        );
        let step = last_good(&dir);
        assert_eq!(step, 40, "{free} bytes free: the last good checkpoint");
        // No torn checkpoint is left taking space.
        for e in std::fs::read_dir(checkpoint::checkpoints_dir(&dir)).unwrap() {
            let p = e.unwrap().path();
            assert!(
                p.join(checkpoint::MANIFEST).is_file(),
                "{free} bytes free: torn checkpoint {} left",
                p.display()
            );
        }
        // Space is back: the run continues from its last checkpoint and finishes exactly.
        std::fs::remove_file(&filler).unwrap();
        run(&cfg, &opts(&dir, true, None)).unwrap();
        assert_same_as_reference(&dir);
    }
    eprintln!("full disk: writes that failed: {failed_on:?}");
    for want in ["config.toml", "metrics.jsonl", "checkpoint"] {
        assert!(
            failed_on.contains(want),
            "no failure on {want}: {failed_on:?}"
        );
    }
}

#[test]
fn a_read_only_run_directory_is_a_clear_error_and_resume_finishes_the_run() {
    const TEST: &str = "a_read_only_run_directory";
    let cfg = config();
    let Some(fs) = Tmpfs::mount(TEST, 8 << 20) else {
        return;
    };
    // A fresh run into a read-only file system.
    fs.read_only(true);
    let err = run(&cfg, &opts(&fs.join("fresh"), false, None)).unwrap_err();
    check_error(&err, fs.path(), "Read-only file system");
    fs.read_only(false);

    // A run interrupted after step 40, resumed while its directory is read-only.
    let dir = fs.join("run");
    run(&cfg, &opts(&dir, false, Some(40))).unwrap();
    let before = std::fs::read(dir.join("metrics.jsonl")).unwrap();
    fs.read_only(true);
    let err = run(&cfg, &opts(&dir, true, None)).unwrap_err();
    check_error(&err, &dir, "Read-only file system");
    assert_eq!(last_good(&dir), 40);
    assert_eq!(std::fs::read(dir.join("metrics.jsonl")).unwrap(), before);
    fs.read_only(false);
    run(&cfg, &opts(&dir, true, None)).unwrap();
    assert_same_as_reference(&dir);
}
