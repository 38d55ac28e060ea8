//! The optlab side of `benches/vs_torch.py`: times optimizer steps on the step benchmarks'
//! GPT-like parameter set and prints one JSON line, so that PyTorch and optlab are timed by the
//! same harness on identical shapes, dtype (f32) and thread count.
//!
//! ```text
//! cargo bench --bench vs_torch -- --threads 1 --steps 30 --repeats 5 \
//!     --config 'name = "adamw"'
//! ```
//!
//! Prints `{"ms_per_step": [...]}`: the mean step time of each repeat (each repeat times
//! `--steps` consecutive steps after `--warmup` untimed ones, so a refresh every 10 steps is
//! amortized when `--steps` is a multiple of 10).

use std::time::Instant;

use optlab::optim::{Driver, NamedParams, OptimConfig};

mod common;

struct Args {
    threads: usize,
    steps: usize,
    warmup: usize,
    repeats: usize,
    config: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        threads: 1,
        steps: 10,
        warmup: 2,
        repeats: 5,
        config: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` appends `--bench`; it carries no value.
        if flag == "--bench" {
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--threads" => args.threads = number()?,
            "--steps" => args.steps = number()?.max(1),
            "--warmup" => args.warmup = number()?,
            "--repeats" => args.repeats = number()?.max(1),
            "--config" => args.config = value,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.config.is_empty() {
        return Err("--config '<optimizer TOML>' is required".into());
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vs_torch: {e}");
            std::process::exit(2);
        }
    };
    // Before any candle work: the thread count is read once, when the pool starts.
    optlab::runner::apply_threads(args.threads);
    let config = match OptimConfig::from_toml(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vs_torch: bad --config: {e}");
            std::process::exit(2);
        }
    };
    let vars = common::param_set();
    let grads = common::grads_for(&vars);
    let mut opt = Driver::new(config, NamedParams::new(vars).unwrap()).unwrap();
    for _ in 0..args.warmup {
        opt.step_named(&grads).unwrap();
    }
    let mut means = Vec::with_capacity(args.repeats);
    for _ in 0..args.repeats {
        let start = Instant::now();
        for _ in 0..args.steps {
            opt.step_named(&grads).unwrap();
        }
        means.push(start.elapsed().as_secs_f64() * 1e3 / args.steps as f64);
    }
    let cells: Vec<String> = means.iter().map(|m| format!("{m:.4}")).collect();
    println!(
        "{{\"ms_per_step\": [{}], \"threads\": {}}}",
        cells.join(", "),
        candle_core::utils::get_num_threads()
    );
}
