//! SOAP and Shampoo on the CPU, f32, on GPT-like shapes, next to AdamW on the same shapes:
//!
//! * `step/<opt>/<shape>`: the mean time of one optimizer step with the preconditioner refresh
//!   amortized at frequency 10 (each iteration runs 10 steps; criterion reports the time of 10);
//! * `refresh/...`: the amortized computations alone on one factor (SOAP's power-iteration QR
//!   refresh with its sort, Shampoo's eigendecomposition-based inverse 4th root, SOAP's initial
//!   eigenbasis), and `copy/...` the candle ↔ linear-algebra round trip they include, to show
//!   the refresh is dominated by the decomposition, not by copies.
//!
//! `cargo bench --bench precond`

use std::collections::BTreeMap;
use std::time::Duration;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use optlab::linalg::{self, InverseRoot, Order, RootMethod};
use optlab::optim::{kron, Driver, NamedParams, OptimConfig};

const SHAPES: &[(usize, usize)] = &[(256, 256), (256, 1024), (1024, 256)];
const STEPS_PER_ITER: usize = 10;

fn configs() -> Vec<(&'static str, OptimConfig)> {
    vec![
        ("adamw", OptimConfig::from_toml("name = \"adamw\"").unwrap()),
        (
            "soap_freq10",
            OptimConfig::from_toml("name = \"soap\"\nprecondition_frequency = 10").unwrap(),
        ),
        (
            "shampoo_freq10",
            OptimConfig::from_toml(
                "name = \"shampoo\"\nbetas = [0.9, 0.95]\nepsilon = 1e-8\n\
                 precondition_frequency = 10\n\
                 grafting_config = { type = \"adam\", beta2 = 0.95, epsilon = 1e-8 }",
            )
            .unwrap(),
        ),
    ]
}

fn bench_steps(c: &mut Criterion) {
    let mut group = c.benchmark_group("step_x10_f32");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(4));
    group.warm_up_time(Duration::from_millis(500));
    for &(rows, cols) in SHAPES {
        for (label, config) in configs() {
            let w =
                Var::from_tensor(&Tensor::randn(0f32, 0.02, (rows, cols), &Device::Cpu).unwrap())
                    .unwrap();
            let grads: Vec<BTreeMap<String, Tensor>> = (0..STEPS_PER_ITER)
                .map(|_| {
                    let g = Tensor::randn(0f32, 1e-2, (rows, cols), &Device::Cpu).unwrap();
                    BTreeMap::from([("w".to_string(), g)])
                })
                .collect();
            let mut opt = Driver::new(
                config,
                NamedParams::new(vec![("w".to_string(), w)]).unwrap(),
            )
            .unwrap();
            // Past the first (basis-building / grafting-only) steps.
            for g in &grads {
                opt.step_named(g).unwrap();
            }
            group.bench_function(format!("{label}/{rows}x{cols}"), |b| {
                b.iter(|| {
                    for g in &grads {
                        opt.step_named(g).unwrap();
                    }
                })
            });
        }
    }
    group.finish();
}

fn spd(n: usize) -> Tensor {
    let g = Tensor::randn(0f32, 1.0, (n, 2 * n), &Device::Cpu).unwrap();
    (g.matmul(&g.t().unwrap()).unwrap() / (2 * n) as f64).unwrap()
}

fn bench_refresh(c: &mut Criterion) {
    let mut group = c.benchmark_group("refresh_f32");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_millis(300));
    for n in [256usize, 1024] {
        let a = spd(n);
        let q = kron::eigenbasis(&a, 1e-30, Order::Descending)
            .unwrap()
            .value()
            .unwrap();
        group.bench_function(format!("soap_qr_refresh/{n}"), |b| {
            b.iter(|| kron::power_iteration_qr(&a, &q).unwrap())
        });
        group.bench_function(format!("soap_eigenbasis/{n}"), |b| {
            b.iter(|| kron::eigenbasis(&a, 1e-30, Order::Descending).unwrap())
        });
        let req = InverseRoot {
            root: 4.0,
            epsilon: 1e-8,
            method: RootMethod::default(),
        };
        group.bench_function(format!("shampoo_inverse_root/{n}"), |b| {
            b.iter(|| linalg::inverse_root(&a, &req).unwrap())
        });
        group.bench_function(format!("copy_roundtrip/{n}"), |b| {
            b.iter(|| {
                let v: Vec<f32> = linalg::to_vec(&a).unwrap();
                linalg::from_vec(v, &[n, n], &Device::Cpu).unwrap()
            })
        });
        let _ = DType::F32;
    }
    group.finish();
}

criterion_group!(benches, bench_steps, bench_refresh);
criterion_main!(benches);
