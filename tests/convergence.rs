//! One convergence table for every registered optimizer: a quadratic, the Rosenbrock function
//! and a small linear regression, each of which must fall by a stated factor.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use optlab::optim::{Driver, ExtraInput, NamedParams, OptimConfig, Optimizer};

struct Problem {
    name: &'static str,
    steps: u64,
    /// The loss must end below initial / factor.
    factor: f64,
    params: fn() -> Vec<(String, Var)>,
    loss: fn(&BTreeMap<String, Tensor>) -> Tensor,
}

fn var(seed: u64, shape: &[usize]) -> Var {
    Var::from_tensor(&tensor(seed, shape, DType::F64)).unwrap()
}

fn quadratic_params() -> Vec<(String, Var)> {
    vec![("w".into(), var(1, &[4, 6])), ("b".into(), var(2, &[6]))]
}

fn quadratic_loss(p: &BTreeMap<String, Tensor>) -> Tensor {
    // Curvatures between 0.5 and 2 per coordinate, centred away from the start.
    let a = (tensor(3, &[4, 6], DType::F64).abs().unwrap() * 1.5).unwrap() + 0.5;
    let c = tensor(4, &[4, 6], DType::F64);
    let d = tensor(5, &[6], DType::F64);
    let w = p["w"]
        .sub(&c)
        .unwrap()
        .sqr()
        .unwrap()
        .mul(&a.unwrap())
        .unwrap();
    let b = p["b"].sub(&d).unwrap().sqr().unwrap();
    (w.sum_all().unwrap() + b.sum_all().unwrap()).unwrap()
}

/// Rosenbrock with b = 10 (curvature up to ~100, so plain SGD at a fixed lr is stable).
fn rosenbrock_params() -> Vec<(String, Var)> {
    vec![(
        "xy".into(),
        Var::from_tensor(&Tensor::new(&[-1.0f64, 1.0], &Device::Cpu).unwrap()).unwrap(),
    )]
}

fn rosenbrock_loss(p: &BTreeMap<String, Tensor>) -> Tensor {
    let x = p["xy"].narrow(0, 0, 1).unwrap();
    let y = p["xy"].narrow(0, 1, 1).unwrap();
    let a = x.affine(-1.0, 1.0).unwrap().sqr().unwrap();
    let b = (y - x.sqr().unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .affine(100.0, 0.0)
        .unwrap();
    (a + b).unwrap().sum_all().unwrap()
}

fn regression_params() -> Vec<(String, Var)> {
    vec![(
        "w".into(),
        Var::from_tensor(&(tensor(6, &[3, 5], DType::F64) * 0.1).unwrap()).unwrap(),
    )]
}

fn regression_loss(p: &BTreeMap<String, Tensor>) -> Tensor {
    let x = tensor(7, &[64, 5], DType::F64);
    let w_true = tensor(8, &[3, 5], DType::F64);
    let y = x.matmul(&w_true.t().unwrap()).unwrap();
    let pred = x.matmul(&p["w"].t().unwrap()).unwrap();
    // Squared error summed over outputs, averaged over samples.
    (pred - y)
        .unwrap()
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .mean_all()
        .unwrap()
}

const PROBLEMS: &[Problem] = &[
    Problem {
        name: "quadratic",
        steps: 400,
        factor: 20.0,
        params: quadratic_params,
        loss: quadratic_loss,
    },
    Problem {
        name: "rosenbrock",
        steps: 1500,
        factor: 10.0,
        params: rosenbrock_params,
        loss: rosenbrock_loss,
    },
    Problem {
        name: "regression",
        steps: 600,
        factor: 20.0,
        params: regression_params,
        loss: regression_loss,
    },
];

fn loss_at(opt: &dyn Optimizer, problem: &Problem) -> f64 {
    // Evaluate where the optimizer says to (Schedule-Free's averaged point).
    let p: BTreeMap<String, Tensor> = opt.eval_params().unwrap().into_iter().collect();
    (problem.loss)(&p).to_scalar::<f64>().unwrap()
}

fn run(name: &str, problem: &Problem) -> Result<(f64, f64), optlab::Error> {
    let vars = (problem.params)();
    let mut opt = Driver::new(config(name), NamedParams::new(vars.clone()).unwrap()).unwrap();
    let start = loss_at(&opt, problem);
    for s in 1..=problem.steps {
        let current: BTreeMap<String, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let loss = (problem.loss)(&current);
        let grads = loss.backward().unwrap();
        let named: BTreeMap<String, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), grads.get(v.as_tensor()).unwrap().clone()))
            .collect();
        opt.step_named(&named)?;
        if name == "sophia" && s % 10 == 0 {
            opt.observe_named(ExtraInput::HessianGrad, &named)?;
        }
    }
    Ok((start, loss_at(&opt, problem)))
}

#[test]
fn every_optimizer_converges_on_small_problems() {
    let mut failures = Vec::new();
    println!(
        "{:<22} {:>12} {:>12} {:>12}",
        "optimizer", "quadratic", "rosenbrock", "regression"
    );
    for name in OptimConfig::NAMES {
        assert!(
            tuned(name).is_some(),
            "{name} has no entry in the test table"
        );
    }
    for name in &labels() {
        let mut row = format!("{name:<22}");
        for problem in PROBLEMS {
            let (start, end) = match run(name, problem) {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{name} on {}: {e}", problem.name));
                    row.push_str(&format!(" {:>12}", "error"));
                    continue;
                }
            };
            let ratio = start / end;
            row.push_str(&format!(" {ratio:>12.1}"));
            if ratio.is_nan() || ratio < problem.factor {
                failures.push(format!(
                    "{name} on {}: loss {start:.4e} -> {end:.4e} (fell {ratio:.1}x, needs {}x)",
                    problem.name, problem.factor
                ));
            }
        }
        println!("{row}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
