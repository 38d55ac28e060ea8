//! Every golden trajectory, replayed in f64 and f32.

use std::path::PathBuf;

use candle_core::DType;
use optlab::conformance::{replay, report_line, GoldenCase, Outcome};

fn golden_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/golden exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 18,
        "golden files missing from {}",
        dir.display()
    );
    files
}

#[test]
fn every_golden_case_in_both_dtypes() {
    let mut failures = Vec::new();
    for file in golden_files() {
        let case = GoldenCase::load(&file).expect("golden file parses");
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for dtype in [DType::F64, DType::F32] {
            let outcome = replay(&case, dtype);
            println!("{}", report_line(&name, dtype, &outcome));
            if let Outcome::Fail(_) = outcome {
                failures.push(report_line(&name, dtype, &outcome));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "golden failures:\n{}",
        failures.join("\n")
    );
}
