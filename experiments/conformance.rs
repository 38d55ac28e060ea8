//! Replays golden trajectories against optlab:
//! `conformance [--dtype f64|f32|both] FILE...`.

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::DType;
use clap::{Parser, ValueEnum};
use optlab::conformance::{replay, report_line, GoldenCase, Outcome};

#[derive(Clone, Copy, ValueEnum)]
enum Dtypes {
    F64,
    F32,
    Both,
}

/// Check optlab against reference trajectories (optlab-golden-v1 files).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Which precision(s) to replay in.
    #[arg(long, value_enum, default_value = "both")]
    dtype: Dtypes,
    /// Golden files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let dtypes: &[DType] = match args.dtype {
        Dtypes::F64 => &[DType::F64],
        Dtypes::F32 => &[DType::F32],
        Dtypes::Both => &[DType::F64, DType::F32],
    };
    let (mut passed, mut failed) = (0usize, 0usize);
    for file in &args.files {
        let shown = file.display().to_string();
        let case = GoldenCase::load(file);
        for &dtype in dtypes {
            let outcome = match &case {
                Ok(case) => replay(case, dtype),
                Err(e) => Outcome::Fail(e.to_string()),
            };
            match outcome {
                Outcome::Pass(_) => passed += 1,
                Outcome::Fail(_) => failed += 1,
            }
            println!("{}", report_line(&shown, dtype, &outcome));
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
