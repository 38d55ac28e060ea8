//! The fused CUDA kernels, compiled as host C++ and run as the GPU would (every block, every
//! thread), against their plain-Rust twins: no GPU needed. Built only with
//! `OPTLAB_EMULATE_KERNELS=1` at build time (needs a C++20 compiler; see
//! src/launch/emulate.rs), e.g. `OPTLAB_EMULATE_KERNELS=1 cargo test --test kernel_emulation`.
//!
//! Each case runs the same steps twice on the CPU, once through the twins and once through the
//! emulated kernels (same kernel names, scalar lists and launch shapes as on the GPU), and
//! compares every parameter and state tensor after every step and after the eval/train
//! switches. The kernels round like their twins, so they must agree bit for bit; only
//! Adalayer's block statistics are summed in another order (f64), so Adalayer is compared to
//! 1e-6 (f32) / 1e-14 (f64) relative.

#![cfg(optlab_emulate_kernels)]

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use optlab::launch::emulate::{launch_count, with_emulation};
use optlab::optim::{Driver, Mode, NamedParams, OptimConfig, Optimizer};

fn params(dtype: DType) -> Vec<(String, Var)> {
    common::KERNEL_SHAPES
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let t = common::tensor(7 + i as u64, shape, dtype);
            (name.to_string(), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

fn grads(dtype: DType, step: u64) -> BTreeMap<String, Tensor> {
    common::KERNEL_SHAPES
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let g = common::tensor(10_000 * step + i as u64, shape, dtype);
            (name.to_string(), g)
        })
        .collect()
}

/// Every parameter and state tensor of `opt`, by name, as f64.
fn snapshot(opt: &Driver) -> BTreeMap<String, Vec<f64>> {
    let mut out = BTreeMap::new();
    for (name, v) in opt.vars() {
        out.insert(name.clone(), common::values_of(&v));
        if let Some(state) = opt.param_state(&name) {
            for (field, t) in &state.tensors {
                out.insert(format!("{name}.{field}"), common::values_of(t));
            }
        }
    }
    out
}

fn compare(label: &str, a: &Driver, b: &Driver, tol: f64) {
    let (sa, sb) = (snapshot(a), snapshot(b));
    assert_eq!(
        sa.keys().collect::<Vec<_>>(),
        sb.keys().collect::<Vec<_>>(),
        "{label}: different tensors"
    );
    for (key, x) in &sa {
        let y = &sb[key];
        let scale = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (k, (p, q)) in x.iter().zip(y).enumerate() {
            let same = if tol == 0.0 {
                p.to_bits() == q.to_bits()
            } else {
                (p - q).abs() <= tol * scale
            };
            assert!(
                same,
                "{label}: {key}[{k}] is {p:e} from the twin, {q:e} from the kernel"
            );
        }
    }
}

fn run_case(toml: &str, steps: u64) {
    let cfg = OptimConfig::from_toml(toml).unwrap_or_else(|e| panic!("{toml}: {e}"));
    let adalayer = toml.starts_with("name = \"adalayer");
    for dtype in [DType::F32, DType::F64] {
        let label = format!("{} {dtype:?}", toml.replace('\n', " "));
        let tol = match (adalayer, dtype) {
            (false, _) => 0.0,
            (true, DType::F32) => 1e-6,
            (true, _) => 1e-14,
        };
        let mut twin = Driver::new(cfg.clone(), NamedParams::new(params(dtype)).unwrap()).unwrap();
        let mut kernel =
            Driver::new(cfg.clone(), NamedParams::new(params(dtype)).unwrap()).unwrap();
        for s in 1..=steps {
            twin.step_named(&grads(dtype, s)).unwrap();
            let before = launch_count();
            with_emulation(|| kernel.step_named(&grads(dtype, s)))
                .unwrap_or_else(|e| panic!("{label}: emulated step {s}: {e}"));
            // One finiteness check per gradient plus at least one update kernel per parameter.
            let launched = launch_count() - before;
            assert!(
                launched > 2 * common::KERNEL_SHAPES.len() as u64 - 1,
                "{label}: only {launched} emulated launches in step {s}"
            );
            compare(&format!("{label} step {s}"), &twin, &kernel, tol);
        }
        for mode in [Mode::Eval, Mode::Train] {
            twin.set_mode(mode).unwrap();
            with_emulation(|| kernel.set_mode(mode)).unwrap();
            compare(&format!("{label} {mode:?}"), &twin, &kernel, tol);
        }
    }
}

#[test]
fn every_kernel_matches_its_twin() {
    let cases = common::kernel_cases();
    for (toml, steps) in &cases {
        run_case(toml, *steps);
    }
}

#[test]
fn factor_ema_matches_its_twin() {
    use optlab::optim::kron::{ema_update, FactorEma};
    let forms = [
        FactorEma::Lerp { weight: 0.05 },
        FactorEma::Lerp { weight: 0.95 },
        FactorEma::ScaleAdd {
            decay: 1.0,
            weight: 0.3,
        },
        FactorEma::ScaleAdd {
            decay: 0.9,
            weight: 0.1,
        },
    ];
    for dtype in [DType::F32, DType::F64] {
        for ema in forms {
            let s = common::tensor(5, &[37, 37], dtype);
            let twin = common::tensor(6, &[37, 37], dtype);
            let kernel = twin.copy().unwrap();
            ema_update(&twin, &s, ema).unwrap();
            with_emulation(|| ema_update(&kernel, &s, ema)).unwrap();
            let bits = |t: &Tensor| -> Vec<u64> {
                common::values_of(t).iter().map(|x| x.to_bits()).collect()
            };
            assert_eq!(bits(&twin), bits(&kernel), "{ema:?} {dtype:?}");
        }
    }
}

#[test]
fn adamw_over_more_than_one_grid() {
    // 2^24 + 3 elements: the grid is capped at 2^16 blocks of 256 threads, so the grid-stride
    // loop must cover the rest.
    let n = (1 << 24) + 3;
    let cfg = OptimConfig::from_toml("name = \"adamw\"\nlr = 0.02").unwrap();
    let mk = || {
        let p = Var::from_tensor(&common::tensor(1, &[n], DType::F32)).unwrap();
        Driver::new(
            cfg.clone(),
            NamedParams::new(vec![("w".into(), p)]).unwrap(),
        )
        .unwrap()
    };
    let (mut twin, mut kernel) = (mk(), mk());
    let g = BTreeMap::from([("w".to_string(), common::tensor(2, &[n], DType::F32))]);
    twin.step_named(&g).unwrap();
    with_emulation(|| kernel.step_named(&g)).unwrap();
    compare("adamw 2^24 + 3", &twin, &kernel, 0.0);
}

#[test]
fn nonfinite_gradients_are_caught_by_the_kernel() {
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        for dtype in [DType::F32, DType::F64] {
            let mut g = common::values(3, 1000);
            g[999] = bad;
            let g = Tensor::from_vec(g, 1000, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let cfg = OptimConfig::from_toml("name = \"adamw\"").unwrap();
            let p = Var::from_tensor(&common::tensor(1, &[1000], dtype)).unwrap();
            let mut opt =
                Driver::new(cfg, NamedParams::new(vec![("w".into(), p)]).unwrap()).unwrap();
            let grads = BTreeMap::from([("w".to_string(), g)]);
            assert!(with_emulation(|| opt.step_named(&grads)).is_err());
        }
    }
}

#[test]
fn emulation_is_active_only_inside() {
    assert!(!optlab::launch::emulate::active());
    with_emulation(|| assert!(optlab::launch::emulate::active()));
    assert!(!optlab::launch::emulate::active());
}

#[test]
fn factor_refresh_kernels_equal_their_twins() {
    use optlab::linalg::on_device::{cholesky_qr3, column_dots, power_iteration_qr};
    let bits =
        |t: &Tensor| -> Vec<u64> { common::values_of(t).iter().map(|x| x.to_bits()).collect() };
    let before = launch_count();
    for dtype in [DType::F32, DType::F64] {
        // Sizes below, at and above one block of 256 threads, and odd ones.
        for n in [1usize, 5, 64, 257, 300] {
            let x = common::tensor(n as u64, &[n, n], dtype);
            let y = common::tensor(n as u64 + 1, &[n, n], dtype);
            let twin = column_dots(&x, &y).unwrap();
            let kernel = with_emulation(|| column_dots(&x, &y)).unwrap();
            let b = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(b(&twin), b(&kernel), "column_dots {dtype:?} n={n}");

            let q_twin = cholesky_qr3(&y).unwrap();
            let q_kernel = with_emulation(|| cholesky_qr3(&y)).unwrap();
            assert_eq!(q_twin.is_some(), q_kernel.is_some());
            if let (Some(a), Some(b)) = (q_twin, q_kernel) {
                assert_eq!(bits(&a), bits(&b), "cholesky_qr3 {dtype:?} n={n}");
            }
        }

        // The whole refresh: SOAP factor and basis.
        let n = 40;
        let g = common::tensor(9, &[n, 3 * n], dtype);
        let f = g.matmul(&g.t().unwrap()).unwrap();
        let q0 = optlab::optim::kron::identity(n, dtype, &Device::Cpu).unwrap();
        let twin = power_iteration_qr(&f, &q0).unwrap().value().unwrap();
        let kernel = with_emulation(|| power_iteration_qr(&f, &q0))
            .unwrap()
            .value()
            .unwrap();
        assert_eq!(twin.0, kernel.0, "refresh permutation {dtype:?}");
        assert_eq!(bits(&twin.1), bits(&kernel.1), "refresh basis {dtype:?}");
    }
    assert!(launch_count() > before, "the kernels did not run");
}

/// Where a refresh's work goes, at a GPT-2-like factor size: printed as a table (FLOPs and
/// launches per step) and checked: the `O(n³)` work is all in level-3 library calls (gemm,
/// potrf, trsm: cuBLAS/cuSOLVER on a GPU), and every custom kernel or other pass does `O(n²)`
/// work over many blocks. No single-block `O(n³)` kernel remains.
#[test]
fn the_refresh_is_level_3_work() {
    use optlab::linalg::on_device::{count_work, power_iteration_qr, WorkKind};
    let n = 512;
    let g = common::tensor(17, &[n, 2 * n], DType::F32);
    let f = g.matmul(&g.t().unwrap()).unwrap();
    let q0 = optlab::optim::kron::identity(n, DType::F32, &Device::Cpu).unwrap();
    let before = launch_count();
    let (out, log) = with_emulation(|| count_work(|| power_iteration_qr(&f, &q0)));
    out.unwrap().value().unwrap();
    let kernel_launches = launch_count() - before;
    let total: f64 = log.iter().map(|w| w.flops).sum();
    println!("refresh of one {n}×{n} factor (f32 in, QR in f64):");
    println!(
        "{:<44} {:>12} {:>14} {:>8} {:>7}",
        "step", "kind", "FLOPs", "launches", "share"
    );
    for w in &log {
        println!(
            "{:<44} {:>12} {:>14.3e} {:>8} {:>6.2}%",
            w.op,
            format!("{:?}", w.kind),
            w.flops,
            w.launches,
            100.0 * w.flops / total
        );
    }
    let by_kind = |k: WorkKind| {
        log.iter()
            .filter(|w| w.kind == k)
            .map(|w| w.flops)
            .sum::<f64>()
    };
    let blas3 = by_kind(WorkKind::Blas3);
    println!(
        "total {total:.3e} FLOPs, {:.3}% in level-3 library calls; {} launches; custom kernels \
         launches emulated meanwhile (all test threads): {kernel_launches}",
        100.0 * blas3 / total,
        log.iter().map(|w| w.launches).sum::<usize>()
    );
    assert!(blas3 / total > 0.99, "level-3 share {}", blas3 / total);
    let n2 = (n * n) as f64;
    for w in log.iter().filter(|w| w.kind != WorkKind::Blas3) {
        assert!(
            w.flops <= 30.0 * n2,
            "{} does {:e} FLOPs: not O(n²)",
            w.op,
            w.flops
        );
    }
    // The only custom kernel of the refresh, column_dots, ran (Rayleigh quotients and column
    // norms), each launch over several blocks: one thread per column.
    assert!(kernel_launches >= 2, "{kernel_launches}");
    assert!(optlab::launch::elementwise_blocks(n) > 1);
}

#[test]
fn weight_averages_match_their_twins() {
    use optlab::optim::Ewa;
    // Five decays: two launches of the four-output kernel.
    let taus = [0.9, 0.95, 0.99, 0.995, 0.999];
    for dtype in [DType::F32, DType::F64] {
        let mk = || -> Vec<(String, Var)> {
            (0..3)
                .map(|i| {
                    let t = common::tensor(40 + i, &[257 + i as usize * 100], dtype);
                    (format!("w{i}"), Var::from_tensor(&t).unwrap())
                })
                .collect()
        };
        let (vars_twin, vars_kernel) = (mk(), mk());
        let mut twin = Ewa::new(vars_twin.clone(), &taus).unwrap();
        let mut kernel = Ewa::new(vars_kernel.clone(), &taus).unwrap();
        let before = launch_count();
        for step in 0..4u64 {
            for (vars, seed) in [(&vars_twin, step), (&vars_kernel, step)] {
                for (i, (_, v)) in vars.iter().enumerate() {
                    let n = v.elem_count();
                    v.set(&common::tensor(100 * seed + i as u64, &[n], dtype))
                        .unwrap();
                }
            }
            twin.update().unwrap();
            with_emulation(|| kernel.update()).unwrap();
        }
        let bits =
            |t: &Tensor| -> Vec<u64> { common::values_of(t).iter().map(|x| x.to_bits()).collect() };
        for tau in taus {
            let a = twin.eval_params(tau).unwrap();
            let b = with_emulation(|| kernel.eval_params(tau)).unwrap();
            for ((name, x), (_, y)) in a.iter().zip(&b) {
                assert_eq!(bits(x), bits(y), "EWA τ = {tau} {name} {dtype:?}");
            }
        }
        assert!(launch_count() > before, "the kernels did not run");
    }
}

#[test]
fn adafactor_batched_and_scalar_shapes_match_their_twins() {
    // Leading batch dims (independent factors per matrix), a 0-D parameter, a single row and
    // column, and more rows or columns than one partial-sum chunk; the KERNEL_SHAPES cases
    // cover the rest.
    let shapes: &[(&str, &[usize])] = &[
        ("a", &[3, 70, 5]),
        ("b", &[40, 1, 2]),
        ("c", &[2, 3, 4, 5]),
        ("d", &[]),
        ("e", &[1, 9]),
        ("f", &[9, 1]),
        ("g", &[130, 3]),
    ];
    let cases = [
        "name = \"adafactor\"\nlr = 0.05\nweight_decay = 0.1",
        "name = \"adafactor\"\nlr = 2.0\nd = 0.5\nmaximize = true",
        "name = \"adafactor_hf\"\nbeta1 = 0.9\nweight_decay = 0.01",
        "name = \"adafactor_hf\"\nlr = 0.3\nrelative_step = false\nscale_parameter = false\nclip_threshold = 0.5",
    ];
    let vars = |dtype: DType| -> Vec<(String, Var)> {
        shapes
            .iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let t = common::tensor(70 + i as u64, shape, dtype);
                (name.to_string(), Var::from_tensor(&t).unwrap())
            })
            .collect()
    };
    let grads = |dtype: DType, step: u64| -> BTreeMap<String, Tensor> {
        shapes
            .iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let g = common::tensor(500 * step + i as u64, shape, dtype);
                (name.to_string(), g)
            })
            .collect()
    };
    for toml in cases {
        let cfg = OptimConfig::from_toml(toml).unwrap();
        for dtype in [DType::F32, DType::F64] {
            let label = format!("{} {dtype:?}", toml.replace('\n', " "));
            let mut twin =
                Driver::new(cfg.clone(), NamedParams::new(vars(dtype)).unwrap()).unwrap();
            let mut kernel =
                Driver::new(cfg.clone(), NamedParams::new(vars(dtype)).unwrap()).unwrap();
            for s in 1..=3 {
                twin.step_named(&grads(dtype, s)).unwrap();
                let before = launch_count();
                with_emulation(|| kernel.step_named(&grads(dtype, s))).unwrap();
                assert!(launch_count() - before > 3 * shapes.len() as u64);
                compare(&format!("{label} step {s}"), &twin, &kernel, 0.0);
            }
        }
    }
}
