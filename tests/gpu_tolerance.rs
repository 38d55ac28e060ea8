//! The GPU tolerance policy for golden replays (`conformance::gpu_f32_tolerance`) is wider than
//! the files' f32 bounds; this shows it is still tight enough to catch a wrong update.
//!
//! On the CPU, in f32, every golden file must pass under its GPU bound as recorded, and fail
//! under it once one hyperparameter of the update is off by 1 % (the learning rate, or `1 − β`
//! of the last moment's decay, …): the kind of error a kernel that reads the wrong scalar or
//! mis-rounds a bias correction makes. The replay on the GPU (`tests/cuda_twins.rs`) uses the
//! same bound, so an update that is wrong by that much fails there too. The smallest error that
//! fails is printed per file and mutation (`cargo test --test gpu_tolerance -- --nocapture`).

use std::path::PathBuf;

use candle_core::{DType, Device};
use optlab::conformance::{gpu_f32_tolerance, replay_with, GoldenCase, Outcome, Tolerance};
use serde_json::Value;

/// Relative error every listed mutation must be caught at.
const CAUGHT_AT: f64 = 1e-2;

fn golden_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/golden exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no golden files in {}", dir.display());
    files
}

/// How a hyperparameter is made wrong by a relative error `delta`.
#[derive(Clone, Copy, Debug)]
enum Mutation {
    /// `x → x·(1 + δ)` (learning rates, decay exponents).
    Scale,
    /// `β → 1 − (1 − β)·(1 + δ)`: decays matter through `1 − β`, whose last digits are the
    /// ones a wrong constant changes.
    OneMinus,
}

/// The mutations that apply to `case`: (key, index into an array value, kind).
fn mutations_of(case: &GoldenCase) -> Vec<(&'static str, Option<usize>, Mutation)> {
    let h = &case.hparams;
    let mut out = Vec::new();
    for key in ["lr", "lr_params"] {
        if h.get(key).is_some_and(Value::is_f64) {
            out.push((key, None, Mutation::Scale));
        }
    }
    if let Some(Value::Array(b)) = h.get("betas") {
        // The last moment's decay (β2 of Adam, β3 of AdEMAMix, …).
        out.push(("betas", Some(b.len() - 1), Mutation::OneMinus));
    }
    for key in ["momentum", "beta1"] {
        if h.get(key)
            .is_some_and(|v| v.as_f64().is_some_and(|x| x > 0.0))
        {
            out.push((key, None, Mutation::OneMinus));
        }
    }
    for key in ["beta2_decay", "decay_rate"] {
        if h.get(key).is_some_and(Value::is_f64) {
            out.push((key, None, Mutation::Scale));
        }
    }
    out
}

fn mutated(
    case: &GoldenCase,
    (key, index, kind): (&str, Option<usize>, Mutation),
    delta: f64,
) -> GoldenCase {
    let mut c = case.clone();
    let slot = match index {
        None => c.hparams.get_mut(key).unwrap(),
        Some(i) => &mut c.hparams.get_mut(key).unwrap().as_array_mut().unwrap()[i],
    };
    let x = slot.as_f64().unwrap();
    let y = match kind {
        Mutation::Scale => x * (1.0 + delta),
        Mutation::OneMinus => 1.0 - (1.0 - x) * (1.0 + delta),
    };
    *slot = serde_json::json!(y);
    c
}

fn passes_within(case: &GoldenCase, tol: Tolerance) -> Result<(), String> {
    match replay_with(case, DType::F32, &Device::Cpu, tol) {
        Outcome::Pass(_) => Ok(()),
        Outcome::Fail(why) => Err(why),
    }
}

/// The smallest of the tried relative errors that `tol` catches.
fn caught_at(case: &GoldenCase, m: (&str, Option<usize>, Mutation), tol: Tolerance) -> Option<f64> {
    [1e-4, 1e-3, CAUGHT_AT]
        .into_iter()
        .find(|&d| passes_within(&mutated(case, m, d), tol).is_err())
}

#[test]
fn gpu_bound_passes_the_recorded_updates_and_fails_wrong_ones() {
    let mut problems = Vec::new();
    for file in golden_files() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let case = GoldenCase::load(&file).unwrap();
        let gpu = gpu_f32_tolerance(&case);
        if let Err(why) = passes_within(&case, gpu) {
            problems.push(format!("{name}: fails its GPU bound unperturbed: {why}"));
            continue;
        }
        let muts = mutations_of(&case);
        if muts.is_empty() {
            problems.push(format!("{name}: no hyperparameter to perturb"));
            continue;
        }
        let mut caught_any = false;
        for (i, m) in muts.into_iter().enumerate() {
            let what = match m.1 {
                Some(k) => format!("{}[{k}]", m.0),
                None => m.0.to_string(),
            };
            let show = |d: Option<f64>| d.map_or("> 1e-2".to_string(), |d| format!("{d:e}"));
            let on_gpu = caught_at(&case, m, gpu);
            println!(
                "{name}: {what} ({:?}) wrong by {} fails the GPU bound (rtol {:.2e}, atol {:.2e}); the file's f32 bound: by {}",
                m.2,
                show(on_gpu),
                gpu.rtol,
                gpu.atol,
                show(caught_at(&case, m, case.tolerance.f32)),
            );
            caught_any |= on_gpu.is_some();
            // The first mutation is the step size (the learning rate where the file has one):
            // every optimizer's update scales with it, so it must always be caught.
            if i == 0 && on_gpu.is_none() {
                problems.push(format!(
                    "{name}: {what} wrong by {CAUGHT_AT:e} still passes the GPU bound"
                ));
            }
        }
        if !caught_any {
            problems.push(format!("{name}: no 1 % error is caught"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
