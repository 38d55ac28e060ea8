//! The `train` binary end to end: a tiny run writes its directory; `--stop-after` and a real
//! `kill -9` both resume to the metrics of an uninterrupted run; bad input fails clearly.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use optlab::runner::metrics::TIMING_FIELDS;
use optlab::runner::{read_metrics, RunConfig, Summary};

const CONFIG: &str = r#"
# A few seconds of the MLP test model on the embedded corpus.
seed = 1

[model]
preset = "mlp-test"

[optimizer]
name = "adamw"
lr = 0.01

[train]
batch_size = 8
steps = 40

[eval]
interval = 10
tokens = 2048
targets = [4.0]

[ewa]
taus = [0.9]

[checkpoint]
interval = 5
"#;

fn train() -> Command {
    Command::new(env!("CARGO_BIN_EXE_train"))
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "train failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for f in TIMING_FIELDS {
                v.as_object_mut().unwrap().remove(f);
            }
            v
        })
        .collect()
}

fn summary_without_timing(dir: &Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("timing");
    v
}

#[test]
fn tiny_run_resume_and_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("tiny.toml");
    std::fs::write(&cfg, CONFIG).unwrap();

    // An uninterrupted run, with overrides.
    let full = tmp.path().join("full");
    let stdout = ok(train()
        .arg(&cfg)
        .args(["--out", full.to_str().unwrap(), "--quiet"])
        .args([
            "--set",
            "train.steps=60",
            "--set",
            "optimizer.betas=[0.9, 0.95]",
        ])
        .output()
        .unwrap());
    assert!(stdout.contains("60 steps"), "{stdout}");
    for f in ["config.toml", "env.json", "metrics.jsonl", "summary.json"] {
        assert!(full.join(f).is_file(), "{f}");
    }
    let resolved = std::fs::read_to_string(full.join("config.toml")).unwrap();
    let back = RunConfig::parse(&resolved, &[]).unwrap();
    assert_eq!(back.total_steps(), 60);
    let summary: Summary =
        serde_json::from_str(&std::fs::read_to_string(full.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary.steps, 60);
    assert!(summary.final_losses.eval_loss.unwrap() < 5.0);
    assert_eq!(read_metrics(&full.join("metrics.jsonl")).unwrap().len(), 61);

    // Stopped, then resumed from the run directory alone.
    let part = tmp.path().join("part");
    let stdout = ok(train()
        .arg(&cfg)
        .args([
            "--out",
            part.to_str().unwrap(),
            "--quiet",
            "--stop-after",
            "23",
        ])
        .args([
            "--set",
            "train.steps=60",
            "--set",
            "optimizer.betas=[0.9, 0.95]",
        ])
        .output()
        .unwrap());
    assert!(stdout.contains("stopped after step 23"), "{stdout}");
    ok(train()
        .args(["--resume", "--out", part.to_str().unwrap(), "--quiet"])
        .output()
        .unwrap());
    assert_eq!(metrics(&full), metrics(&part));
    assert_eq!(summary_without_timing(&full), summary_without_timing(&part));

    // Killed with SIGKILL mid-run, then resumed.
    let long = [
        "--set",
        "train.steps=200",
        "--set",
        "optimizer.betas=[0.9, 0.95]",
    ];
    let reference = tmp.path().join("reference");
    ok(train()
        .arg(&cfg)
        .args(["--out", reference.to_str().unwrap(), "--quiet"])
        .args(long)
        .output()
        .unwrap());
    let killed = tmp.path().join("killed");
    let mut child = train()
        .arg(&cfg)
        .args(["--out", killed.to_str().unwrap(), "--quiet"])
        .args(long)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for a few checkpoints, then kill without warning.
    let start = Instant::now();
    let ckdir = killed.join("checkpoints");
    loop {
        let steps: Vec<u64> = std::fs::read_dir(&ckdir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if steps.iter().any(|&s| s >= 20) || start.elapsed() > Duration::from_secs(120) {
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(9),
            "the run ended before the kill: {status}"
        );
    }
    #[cfg(not(unix))]
    let _ = status;
    ok(train()
        .args(["--resume", "--out", killed.to_str().unwrap(), "--quiet"])
        .output()
        .unwrap());
    assert_eq!(metrics(&reference), metrics(&killed));
    assert_eq!(
        summary_without_timing(&reference),
        summary_without_timing(&killed)
    );
}

#[test]
fn bad_input_fails_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let out = tmp.path().join("run");
    let run = |extra: &[&str]| {
        train()
            .arg(&cfg)
            .args(["--out", out.to_str().unwrap(), "--quiet"])
            .args(extra)
            .output()
            .unwrap()
    };
    let fails = |o: Output, needle: &str| {
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{needle}: {err}");
    };
    fails(run(&["--set", "train.batch_size=0"]), "train.batch_size");
    fails(run(&["--set", "optimizer.name=adamz"]), "adamz");
    fails(run(&["--set", "model.preset=huge"]), "model.preset");
    fails(run(&["--set", "eval.tokens=100000000"]), "eval.tokens");
    fails(run(&["--resume"]), "nothing to resume");
    ok(run(&["--set", "train.steps=2"]));
    fails(run(&["--set", "train.steps=2"]), "--resume");
    fails(
        run(&["--resume", "--set", "optimizer.lr=0.5"]),
        "optimizer.lr",
    );
    let missing = train().arg(tmp.path().join("nope.toml")).output().unwrap();
    fails(missing, "nope.toml");
}

#[test]
fn a_cuda_device_without_the_feature_or_a_gpu_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let out = dir.path().join("run");
    let res = train()
        .arg(&cfg)
        .args(["--set", "device=cuda", "--quiet", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("device") && err.contains("device=cpu"),
        "{err}"
    );
    if cfg!(not(feature = "cuda")) {
        assert!(err.contains("--features cuda"), "{err}");
    }
    // Nothing was written: the same directory takes a CPU run.
    assert!(!out.join("config.toml").exists());
    let res = train()
        .arg(&cfg)
        .args(["--set", "device=cuda:x", "--quiet", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("cuda:N"));
}
