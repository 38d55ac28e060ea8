//! Time of one optimizer `step` on a GPT-like parameter set (12 matrices of 256×1024, their
//! norms and biases, an embedding and a head), f32, CPU. Every registered optimizer, default
//! hyperparameters, gradients fixed across iterations.
//!
//! `cargo bench --bench step` (add `-- adamw` to run one).

use std::time::Duration;

use candle_core::DType;
use criterion::{criterion_group, criterion_main, Criterion};
use optlab::optim::{Driver, ExtraInput, NamedParams, OptimConfig};

mod common;
use common::{grads_for, param_set};

fn bench_steps(c: &mut Criterion) {
    let mut group = c.benchmark_group("step_f32_gpt_like");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_millis(500));
    // Every optimizer at its reference defaults, plus Shampoo as the SOAP paper runs it (root
    // refresh every 10 steps, Adam grafting): its default refreshes every step.
    let mut configs: Vec<(String, OptimConfig)> = OptimConfig::NAMES
        .iter()
        .map(|n| (n.to_string(), OptimConfig::default_for(n).unwrap()))
        .collect();
    configs.push((
        "shampoo_freq10_adam_graft".into(),
        OptimConfig::from_toml(
            "name = \"shampoo\"\nbetas = [0.9, 0.95]\nepsilon = 1e-8\nprecondition_frequency = 10\n\
             grafting_config = { type = \"adam\", beta2 = 0.95, epsilon = 1e-8 }",
        )
        .unwrap(),
    ));
    // The preconditioner variants as DistributedShampoo's README suggests starting them:
    // eigenvalue-corrected (its SOAP, QR refresh) without grafting, KL with Adam grafting.
    for (label, extra) in [
        (
            "shampoo_eigenvalue_corrected_freq10",
            "preconditioner = \"eigenvalue_corrected\"\namortized_computation_config = { type = \"qr\" }",
        ),
        (
            "shampoo_kl_freq10_adam_graft",
            "preconditioner = \"root_inv_kl\"\ngrafting_config = { type = \"adam\", beta2 = 0.95, epsilon = 1e-8 }",
        ),
    ] {
        configs.push((
            label.into(),
            OptimConfig::from_toml(&format!(
                "name = \"shampoo\"\nbetas = [0.9, 0.95]\nepsilon = 1e-8\nprecondition_frequency = 10\n{extra}"
            ))
            .unwrap(),
        ));
    }
    for (name, config) in configs {
        let vars = param_set();
        let grads = grads_for(&vars);
        let is_sophia = config.name() == "sophia";
        let mut opt = Driver::new(config, NamedParams::new(vars).unwrap()).unwrap();
        // Warm the state up (lazy initialization, SOAP's basis-building first step).
        opt.step_named(&grads).unwrap();
        group.bench_function(&name, |b| {
            b.iter(|| {
                opt.step_named(&grads).unwrap();
                if is_sophia {
                    opt.observe_named(ExtraInput::HessianGrad, &grads).unwrap();
                }
            })
        });
    }
    // Baseline: candle-nn's own AdamW (op-by-op tensor math) on the same parameters.
    {
        use candle_nn::Optimizer as _;
        let vars = param_set();
        let grads = grads_for(&vars);
        let mut store = candle_core::backprop::GradStore::default();
        for (name, v) in &vars {
            store.insert(v.as_tensor(), grads[name].clone());
        }
        let mut opt = candle_nn::AdamW::new(
            vars.iter().map(|(_, v)| v.clone()).collect(),
            candle_nn::ParamsAdamW::default(),
        )
        .unwrap();
        group.bench_function("baseline_candle_nn_adamw", |b| {
            b.iter(|| opt.step(&store).unwrap())
        });
    }
    group.finish();
    let _ = DType::F32;
}

criterion_group!(benches, bench_steps);
criterion_main!(benches);
