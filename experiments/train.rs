//! One training run from a TOML config:
//! `train CONFIG [--set key.path=value]... [--out DIR] [--resume] [--stop-after STEP]`.
//!
//! Writes the run directory (`config.toml`, `env.json`, `metrics.jsonl`, `summary.json`,
//! `checkpoints/`) described in `optlab::runner`. `--resume` continues the run in `--out` from
//! its newest checkpoint, bit-identically; the config may then be omitted (the run's own
//! `config.toml` is used). With `OPTLAB_ALLOC_STATS` set, it prints the large-block allocator's
//! hit/miss counters at the end. With `OPTLAB_FUSED_OPS=0` the model runs its primitive-op
//! composition instead of the fused CPU kernels (`optlab::models::ops`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use optlab::runner::{self, RunConfig, RunOptions};
use optlab::{Error, Result};

// Large activations are reused across steps instead of being mapped afresh (and page-faulted
// in) at every step; see optlab::runner::alloc and results/throughput/README.md.
#[global_allocator]
static GLOBAL: runner::alloc::ReuseLargeBlocks = runner::alloc::ReuseLargeBlocks::new(8 << 30);

/// Train a model with an optlab optimizer and write a self-describing run directory.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Run config (TOML). Optional with --resume: the run's config.toml is used.
    config: Option<PathBuf>,
    /// Override a config field, e.g. `--set optimizer.lr=1e-3` (repeatable; the value is read
    /// as TOML, else as a string).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Run directory (default: runs/<config file name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in the run directory from its newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop after this step (checkpointing) as if interrupted; continue with --resume.
    #[arg(long, value_name = "STEP", value_parser = clap::value_parser!(u64).range(1..))]
    stop_after: Option<u64>,
    /// No progress bar and no notes on stderr.
    #[arg(long)]
    quiet: bool,
}

fn run(args: &Args) -> Result<()> {
    let out = match (&args.out, &args.config) {
        (Some(o), _) => o.clone(),
        (None, Some(c)) => {
            let stem = c
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into());
            PathBuf::from("runs").join(stem)
        }
        (None, None) => {
            return Err(Error::Msg(
                "give a config file, or --resume with --out DIR of an existing run".into(),
            ))
        }
    };
    let config_path = match &args.config {
        Some(c) => c.clone(),
        None if args.resume => out.join("config.toml"),
        None => return Err(Error::Msg("give a config file to start a run".into())),
    };
    let config = RunConfig::from_file(&config_path, &args.set)?;
    // Before any other thread exists: candle reads the thread count once.
    runner::apply_threads(config.threads);
    let opts = RunOptions {
        out,
        resume: args.resume,
        progress: !args.quiet,
        log: !args.quiet,
        stop_after: args.stop_after,
        dataset: None,
    };
    let report = runner::run(&config, &opts)?;
    if std::env::var_os("OPTLAB_ALLOC_STATS").is_some() {
        eprintln!("allocator: {:?}", GLOBAL.stats());
    }
    match &report.summary {
        Some(s) => {
            let fmt = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.4}"));
            println!(
                "{}: {} steps, {} tokens, train loss {}, eval loss {}, {:.0} tokens/s",
                report.dir.display(),
                s.steps,
                s.tokens,
                fmt(s.final_losses.train_loss),
                fmt(s.final_losses.eval_loss),
                s.timing.tokens_per_second
            );
            for (tau, l) in &s.final_losses.eval_loss_ewa {
                println!("  EWA tau {tau}: eval loss {l:.4}");
            }
            for t in &s.targets {
                let reached = t
                    .raw
                    .map_or("not reached".into(), |c| format!("step {}", c.step));
                println!("  target {}: {reached}", t.target);
            }
        }
        None => println!(
            "{}: stopped after step {} (continue with --resume)",
            report.dir.display(),
            report.steps
        ),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
