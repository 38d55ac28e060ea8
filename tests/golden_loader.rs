//! The golden-file loader refuses inconsistent files with an error naming the field, and a
//! replay never compares a prefix: each damaged copy of a real file must fail.

use std::path::{Path, PathBuf};

use candle_core::DType;
use optlab::conformance::{replay, GoldenCase, Outcome};
use serde_json::{json, Value};

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn read(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(golden(name)).unwrap()).unwrap()
}

/// Writes `value` to a temporary file and loads it; returns the error text.
fn load_error(value: &Value) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path: &Path = &dir.path().join("case.json");
    std::fs::write(path, serde_json::to_string(value).unwrap()).unwrap();
    match GoldenCase::load(path) {
        Ok(_) => panic!("a damaged file loaded"),
        Err(e) => e.to_string(),
    }
}

fn expect_error(value: &Value, words: &[&str]) {
    let err = load_error(value);
    for w in words {
        assert!(err.contains(w), "error `{err}` lacks `{w}`");
    }
}

#[test]
fn the_untouched_files_load() {
    for name in [
        "adamw_basic.json",
        "mars_exact_basic.json",
        "sophia_basic.json",
    ] {
        GoldenCase::load(&golden(name)).unwrap();
    }
}

#[test]
fn unknown_top_level_fields_are_refused() {
    let mut v = read("adamw_basic.json");
    v["lr_shedule"] = json!([0.1]);
    expect_error(&v, &["lr_shedule"]);
}

#[test]
fn init_grads_and_expected_must_match_param_meta() {
    let mut v = read("adamw_basic.json");
    v["init"][0].as_array_mut().unwrap().pop();
    expect_error(&v, &["init", "values"]);

    let mut v = read("adamw_basic.json");
    v["grads"][2].as_array_mut().unwrap().pop();
    expect_error(&v, &["grads[2]", "tensors"]);

    let mut v = read("adamw_basic.json");
    v["expected"].as_array_mut().unwrap().pop();
    expect_error(&v, &["expected", "steps"]);

    let mut v = read("adamw_basic.json");
    v["expected"][1][0].as_array_mut().unwrap().push(json!(0.0));
    expect_error(&v, &["expected[1]", "values"]);
}

#[test]
fn the_lr_schedule_needs_one_entry_per_step() {
    let mut v = read("adamw_basic.json");
    let steps = v["grads"].as_array().unwrap().len();
    v["lr_schedule"] = json!(vec![1e-3; steps - 1]);
    expect_error(&v, &["lr_schedule", "steps"]);
}

#[test]
fn extra_inputs_are_checked_against_steps_and_params() {
    let mut v = read("mars_exact_basic.json");
    v["extra"]["last_grad"].as_array_mut().unwrap().pop();
    expect_error(&v, &["extra.last_grad", "steps"]);

    let mut v = read("mars_exact_basic.json");
    v["extra"]["last_grad"][3][1].as_array_mut().unwrap().pop();
    expect_error(&v, &["extra.last_grad[3]", "values"]);

    let mut v = read("sophia_basic.json");
    v["extra"]["hessian_consumed"].as_array_mut().unwrap().pop();
    expect_error(&v, &["extra.hessian_consumed", "steps"]);

    let mut v = read("sophia_basic.json");
    v["extra"]["hessian_grad"][0].as_array_mut().unwrap().pop();
    expect_error(&v, &["extra.hessian_grad[0]", "tensors"]);

    let mut v = read("sophia_basic.json");
    v["extra"]["hesian"] = json!([]);
    expect_error(&v, &["extra.hesian"]);
}

#[test]
fn expected_eval_must_match_param_meta() {
    let mut v = read("schedulefree_sgd_basic.json");
    v["expected_eval"][0].as_array_mut().unwrap().pop();
    expect_error(&v, &["expected_eval", "values"]);
}

#[test]
fn a_replay_of_an_inconsistent_case_fails_instead_of_comparing_a_prefix() {
    let mut case = GoldenCase::load(&golden("adamw_basic.json")).unwrap();
    assert!(matches!(replay(&case, DType::F64), Outcome::Pass(_)));
    // A last expected tensor cut short (built in memory, past the loader).
    case.expected.last_mut().unwrap()[0].pop();
    match replay(&case, DType::F64) {
        Outcome::Fail(why) => assert!(why.contains("expected"), "{why}"),
        Outcome::Pass(_) => panic!("a truncated expected tensor passed"),
    }
    let mut case = GoldenCase::load(&golden("adamw_basic.json")).unwrap();
    case.grads.pop();
    assert!(matches!(replay(&case, DType::F64), Outcome::Fail(_)));
}
