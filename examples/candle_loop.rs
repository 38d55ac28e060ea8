//! A plain candle training loop driven by an optlab optimizer.
//!
//! A 2-layer tanh MLP (candle_nn layers) learns a smooth function of two inputs from synthetic
//! data, with the optimizer behind the `candle_nn::Optimizer` adapter, a warm-up + cosine LR
//! schedule, global-norm gradient clipping, and an evaluation at the EWA-averaged weights.
//!
//! ```text
//! cargo run --example candle_loop [-- [OPTIMIZER] [LR] [MAX_NORM|none]]
//! ```
//!
//! OPTIMIZER is any registered name (default `adamw`) with its default hyperparameters; LR
//! overrides its peak learning rate (default 1e-2); `none` turns clipping off, which lets the loop
//! use the adapter's one-call `backward_step(&loss)`.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, Optimizer as _, VarBuilder, VarMap};
use optlab::optim::{clip_grad_norm_named, CandleOptimizer, Ewa, OptimConfig, Schedule};

const STEPS: u64 = 400;
const BATCH: usize = 64;
const TRAIN: usize = 1024;
const TEST: usize = 256;
const HIDDEN: usize = 32;

/// Deterministic uniform numbers in [-2, 2) (a 64-bit LCG), so the data is the same every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
    }
}

/// `n` inputs in [-2, 2)² and their targets `sin(1.5·x1)·cos(x2) + 0.3·x1·x2`.
fn dataset(rng: &mut Lcg, n: usize, dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let mut xs = Vec::with_capacity(2 * n);
    let mut ys = Vec::with_capacity(n);
    for _ in 0..n {
        let (a, b) = (rng.next(), rng.next());
        xs.extend([a, b]);
        ys.push((1.5 * a).sin() * b.cos() + 0.3 * a * b);
    }
    Ok((
        Tensor::from_vec(xs, (n, 2), dev)?,
        Tensor::from_vec(ys, (n, 1), dev)?,
    ))
}

struct Mlp {
    fc1: candle_nn::Linear,
    fc2: candle_nn::Linear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.tanh()?)
    }
}

fn main() {
    // Errors print with their message (`Display`), not as a debug dump.
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map(String::as_str).unwrap_or("adamw");
    let lr: f64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1e-2);
    let max_norm: Option<f64> = match args.get(2).map(String::as_str) {
        None => Some(1.0),
        Some("none") => None,
        Some(s) => Some(s.parse()?),
    };

    let dev = Device::Cpu;
    let mut rng = Lcg(42);
    let (x_train, y_train) = dataset(&mut rng, TRAIN, &dev)?;
    let (x_test, y_test) = dataset(&mut rng, TEST, &dev)?;

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let model = Mlp {
        fc1: candle_nn::linear(2, HIDDEN, vb.pp("fc1"))?,
        fc2: candle_nn::linear(HIDDEN, 1, vb.pp("fc2"))?,
    };

    let mut config = OptimConfig::default_for(name)?;
    config.set_lr(lr);
    let mut opt = CandleOptimizer::from_varmap(&varmap, config)?;
    let vars = opt.inner().vars();
    let schedule = Schedule::from_toml(&format!(
        "kind = \"warmup_cosine\"\ntotal_steps = {STEPS}\nwarmup_ratio = 0.05\nalpha_f = 0.1"
    ))?;
    let mut ewa = Ewa::new(vars.clone(), &[0.9, 0.98])?;

    let mse = |x: &Tensor, y: &Tensor| -> candle_core::Result<f32> {
        candle_nn::loss::mse(&model.forward(x)?, y)?.to_scalar::<f32>()
    };
    println!(
        "optimizer {name}, peak lr {lr}, clipping {}, {} parameters",
        max_norm.map_or("off".to_string(), |m| format!("at norm {m}")),
        vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>()
    );
    let initial = mse(&x_test, &y_test)?;
    println!("step    0  test mse {initial:.5}");

    for step in 1..=STEPS {
        let factor = schedule.apply(opt.inner(), step)?;
        let start = ((step as usize - 1) * BATCH) % TRAIN;
        let xb = x_train.narrow(0, start, BATCH)?;
        let yb = y_train.narrow(0, start, BATCH)?;
        let loss = candle_nn::loss::mse(&model.forward(&xb)?, &yb)?;
        let norm = match max_norm {
            Some(m) => {
                let mut grads = loss.backward()?;
                let norm = clip_grad_norm_named(&mut grads, &vars, m)?;
                opt.step(&grads)?;
                Some(norm)
            }
            None => {
                opt.backward_step(&loss)?;
                None
            }
        };
        ewa.update()?;
        if step % 50 == 0 || step == 1 {
            println!(
                "step {step:4}  train mse {:.5}  test mse {:.5}  lr {:.2e}{}",
                loss.to_scalar::<f32>()?,
                mse(&x_test, &y_test)?,
                lr * factor,
                norm.map_or(String::new(), |n| format!("  grad norm {n:.3}"))
            );
        }
    }

    let last = mse(&x_test, &y_test)?;
    for tau in ewa.taus().to_vec() {
        let at_avg = ewa.with_swapped(tau, || Ok(mse(&x_test, &y_test)?))?;
        println!("test mse at the EWA τ = {tau} weights: {at_avg:.5}");
    }
    println!(
        "test mse {initial:.5} -> {last:.5} ({:.1}x lower)",
        initial / last
    );
    // NaN counts as failure too.
    if last.is_nan() || last >= 0.5 * initial {
        return Err(format!("the loss did not fall clearly: {initial} -> {last}").into());
    }
    Ok(())
}
