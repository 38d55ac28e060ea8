//! Every fused CUDA kernel against its CPU twin (feature `cuda`).
//!
//! Each test runs the same optimizer steps from the same random parameters and gradients on the
//! CPU and on the first CUDA device and compares every parameter and every state tensor:
//! `‖gpu − cpu‖ / ‖cpu‖` and the largest elementwise difference relative to `max |cpu|` must be
//! within 1e-5 in f32 and 1e-12 in f64. (The kernels round like their twins, so they are
//! expected to agree bit for bit except where a reduction sums in another order; the bounds
//! leave room for that.) The elementwise bound also catches a single element the kernel failed
//! to write, which a norm over millions of elements would hide. Shapes include sizes that are
//! not multiples of the block size and a tensor larger than one grid (grid-stride loop).
//!
//! Without a CUDA device every test prints `SKIP: <test>: no CUDA device: …` and passes, unless
//! `OPTLAB_REQUIRE_GPU=1` is set: then it fails (so a GPU run cannot pass by skipping).
//! `gpu_timing_table` (ignored by default) prints the timings `scripts/gpu-check.sh` records.

#![cfg(feature = "cuda")]

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use optlab::optim::{Driver, Mode, NamedParams, OptimConfig, Optimizer};

/// The first CUDA device, with reduced-precision (TF32) f32 products off, or `None` after
/// printing `SKIP: <test>: no CUDA device: <reason>`.
///
/// A test that returns early passes, so on the GPU machine a missing driver or library would
/// otherwise turn the whole file green without running anything: with `OPTLAB_REQUIRE_GPU=1`
/// (set by `scripts/gpu-check.sh`) a missing device panics instead and the test fails.
fn cuda() -> Option<Device> {
    // The test's name: libtest runs each test on a thread named after it.
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed test")
        .to_string();
    match Device::new_cuda(0) {
        Ok(d) => {
            // The twins and the golden replay compare against f32 CPU results with bounds of
            // 1e-5 and less; TF32 products (10-bit mantissa) would exceed them. candle's default
            // is already off, but it is process-wide state: set it so that no other code's
            // choice leaks in.
            candle_core::cuda::set_gemm_reduced_precision_f32(false);
            Some(d)
        }
        Err(e) => {
            let required = std::env::var("OPTLAB_REQUIRE_GPU").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "{test}: OPTLAB_REQUIRE_GPU=1 but there is no CUDA device: {e}"
            );
            eprintln!("SKIP: {test}: no CUDA device: {e}");
            None
        }
    }
}

use common::KERNEL_SHAPES as SHAPES;

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        _ => 1e-12,
    }
}

/// Muon's Newton–Schulz runs as cuBLAS products on the GPU and candle's CPU products on the
/// CPU: another summation order, amplified by the iteration's steep polynomial. SOAP's bases
/// and Shampoo's roots come from cuSOLVER and Cholesky-QR on the GPU, faer on the CPU: the
/// refresh bound.
fn tolerance_of(toml: &str, dtype: DType) -> f64 {
    let matrix_heavy = ["muon", "soap", "shampoo", "mars"]
        .iter()
        .any(|n| toml.starts_with(&format!("name = \"{n}\"")));
    match (matrix_heavy, dtype) {
        (true, DType::F32) => 1e-4,
        (true, _) => 1e-10,
        (false, _) => tolerance(dtype),
    }
}

fn host(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Whether `gpu` matches `cpu` within `tol` (relative norm and relative max difference).
fn check_close(cpu: &Tensor, gpu: &Tensor, tol: f64) -> Result<(), String> {
    if cpu.dims() != gpu.dims() {
        return Err(format!("shapes {:?} and {:?}", cpu.dims(), gpu.dims()));
    }
    let (a, b) = (host(cpu), host(gpu));
    let (mut diff2, mut norm2, mut max_diff, mut max_abs) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (k, (x, y)) in a.iter().zip(&b).enumerate() {
        if y.is_finite() != x.is_finite() {
            return Err(format!("element {k}: {x} on the CPU, {y} on the GPU"));
        }
        if !x.is_finite() {
            continue;
        }
        let d = (x - y).abs();
        diff2 += d * d;
        norm2 += x * x;
        max_diff = max_diff.max(d);
        max_abs = max_abs.max(x.abs());
    }
    let rel = diff2.sqrt() / norm2.sqrt().max(f64::MIN_POSITIVE);
    let rel_max = max_diff / max_abs.max(f64::MIN_POSITIVE);
    if rel <= tol && rel_max <= tol {
        Ok(())
    } else {
        Err(format!(
            "relative error {rel:.3e}, max elementwise {rel_max:.3e} (tolerance {tol:e})"
        ))
    }
}

fn assert_close(what: &str, cpu: &Tensor, gpu: &Tensor, tol: f64) {
    if let Err(e) = check_close(cpu, gpu, tol) {
        panic!("{what}: {e}");
    }
}

fn params_on(dev: &Device, shapes: &[(&str, &[usize])], dtype: DType) -> Vec<(String, Var)> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let t = common::tensor(7 + i as u64, shape, dtype)
                .to_device(dev)
                .unwrap();
            (name.to_string(), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

fn grads_on(
    dev: &Device,
    shapes: &[(&str, &[usize])],
    dtype: DType,
    step: u64,
) -> BTreeMap<String, Tensor> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let g = common::tensor(10_000 * step + i as u64, shape, dtype)
                .to_device(dev)
                .unwrap();
            (name.to_string(), g)
        })
        .collect()
}

fn compare_drivers(label: &str, cpu: &Driver, gpu: &Driver, tol: f64) {
    for ((name, a), (_, b)) in cpu.vars().iter().zip(gpu.vars()) {
        assert_close(&format!("{label}: param {name}"), a, &b, tol);
        let (sa, sb) = (cpu.param_state(name), gpu.param_state(name));
        let (Some(sa), Some(sb)) = (sa, sb) else {
            assert_eq!(sa.is_some(), sb.is_some(), "{label}: state of {name}");
            continue;
        };
        assert_eq!(
            sa.tensors.keys().collect::<Vec<_>>(),
            sb.tensors.keys().collect::<Vec<_>>(),
            "{label}: state fields of {name}"
        );
        for (field, ta) in &sa.tensors {
            let tb = &sb.tensors[field];
            assert!(
                ta.device().is_cpu() && tb.device().is_cuda(),
                "{label}: {name}.{field} is on the wrong device"
            );
            // SOAP's bases ("Q.k") come from different eigensolvers and QRs on the two
            // devices: their columns agree up to sign.
            let (ta, tb) = if field.starts_with("Q.") {
                (ta.abs().unwrap(), tb.abs().unwrap())
            } else {
                (ta.clone(), tb.clone())
            };
            assert_close(&format!("{label}: {name}.{field}"), &ta, &tb, tol);
        }
        assert_eq!(sa.scalars, sb.scalars, "{label}: scalar state of {name}");
    }
}

/// `steps` steps of the optimizer `toml` on the CPU and on `dev`, compared after every step and
/// after switching to eval mode and back.
fn twin(dev: &Device, toml: &str, shapes: &[(&str, &[usize])], steps: u64) {
    let cfg = OptimConfig::from_toml(toml).unwrap_or_else(|e| panic!("{toml}: {e}"));
    for dtype in [DType::F32, DType::F64] {
        let label = format!("{} {dtype:?}", toml.replace('\n', " "));
        let tol = tolerance_of(toml, dtype);
        let cpu_vars = params_on(&Device::Cpu, shapes, dtype);
        let gpu_vars = params_on(dev, shapes, dtype);
        let mut cpu = Driver::new(cfg.clone(), NamedParams::new(cpu_vars).unwrap()).unwrap();
        let mut gpu = Driver::new(cfg.clone(), NamedParams::new(gpu_vars).unwrap()).unwrap();
        for s in 1..=steps {
            cpu.step_named(&grads_on(&Device::Cpu, shapes, dtype, s))
                .unwrap();
            gpu.step_named(&grads_on(dev, shapes, dtype, s))
                .unwrap_or_else(|e| panic!("{label}: GPU step {s}: {e}"));
            compare_drivers(&format!("{label} step {s}"), &cpu, &gpu, tol);
        }
        for mode in [Mode::Eval, Mode::Train] {
            cpu.set_mode(mode).unwrap();
            gpu.set_mode(mode).unwrap();
            compare_drivers(&format!("{label} {mode:?}"), &cpu, &gpu, tol);
        }
    }
}

/// Every [`common::kernel_cases_of`] case of `name`.
fn twins_of(dev: &Device, name: &str) {
    let cases = common::kernel_cases_of(name);
    assert!(!cases.is_empty(), "no kernel cases for {name}");
    for (toml, steps) in cases {
        twin(dev, &toml, SHAPES, steps);
    }
}

#[test]
fn adamw_matches_cpu() {
    let Some(dev) = cuda() else { return };
    twins_of(&dev, "adamw");
}

#[test]
fn adamw_covers_more_than_one_grid() {
    let Some(dev) = cuda() else { return };
    // 2^24 + 3 elements: more than the 2^16 blocks of 256 threads of one grid.
    twin(
        &dev,
        "name = \"adamw\"\nlr = 0.02",
        &[("w", &[(1 << 24) + 3])],
        2,
    );
}

#[test]
fn lion_and_signum_match_cpu() {
    let Some(dev) = cuda() else { return };
    twins_of(&dev, "lion");
    twins_of(&dev, "signum");
}

#[test]
fn ademamix_matches_cpu() {
    let Some(dev) = cuda() else { return };
    twins_of(&dev, "ademamix");
}

#[test]
fn simplified_ademamix_matches_cpu() {
    let Some(dev) = cuda() else { return };
    twins_of(&dev, "simplified_ademamix");
}

#[test]
fn adalayer_matches_cpu() {
    let Some(dev) = cuda() else { return };
    twins_of(&dev, "adalayer");
    twins_of(&dev, "adalayer_sgd");
}

#[test]
fn schedule_free_matches_cpu() {
    let Some(dev) = cuda() else { return };
    twins_of(&dev, "schedulefree_adamw");
    twins_of(&dev, "schedulefree_sgd");
}

#[test]
fn sgd_and_sophia_match_cpu() {
    let Some(dev) = cuda() else { return };
    twins_of(&dev, "sgd");
    twins_of(&dev, "sophia");
}

/// The runner's weight averages (`ema_many`, `scale_by`) on the GPU against the CPU.
#[test]
fn weight_averages_match_cpu() {
    use optlab::optim::Ewa;
    let Some(dev) = cuda() else { return };
    let taus = [0.9, 0.95, 0.99, 0.995, 0.999];
    for dtype in [DType::F32, DType::F64] {
        let on = |d: &Device| -> Vec<(String, Var)> {
            (0..3)
                .map(|i| {
                    let t = common::tensor(40 + i, &[257 + i as usize * 100], dtype)
                        .to_device(d)
                        .unwrap();
                    (format!("w{i}"), Var::from_tensor(&t).unwrap())
                })
                .collect()
        };
        let (vc, vg) = (on(&Device::Cpu), on(&dev));
        let mut cpu = Ewa::new(vc.clone(), &taus).unwrap();
        let mut gpu = Ewa::new(vg.clone(), &taus).unwrap();
        for step in 0..4u64 {
            for (vars, d) in [(&vc, &Device::Cpu), (&vg, &dev)] {
                for (i, (_, v)) in vars.iter().enumerate() {
                    let n = v.elem_count();
                    let t = common::tensor(100 * step + i as u64, &[n], dtype);
                    v.set(&t.to_device(d).unwrap()).unwrap();
                }
            }
            cpu.update().unwrap();
            gpu.update().unwrap();
        }
        for tau in taus {
            let (a, b) = (cpu.eval_params(tau).unwrap(), gpu.eval_params(tau).unwrap());
            for ((name, x), (_, y)) in a.iter().zip(&b) {
                assert_close(
                    &format!("EWA τ = {tau} {name} {dtype:?}"),
                    x,
                    y,
                    tolerance(dtype),
                );
            }
        }
    }
}

/// MARS: its clipping norm is a device reduction (another summation order) and its Shampoo
/// form runs Newton–Schulz on cuBLAS, hence the matrix bound.
#[test]
fn mars_matches_cpu() {
    let Some(dev) = cuda() else { return };
    twins_of(&dev, "mars");
}

#[test]
fn muon_matches_cpu() {
    let Some(dev) = cuda() else { return };
    twins_of(&dev, "muon");
}

/// A full SOAP step on the GPU (fused moment, eigenbasis-Adam and update kernels; rotations
/// on cuBLAS; first basis from cuSOLVER; refreshes by Cholesky-QR3 on the device) against the
/// CPU step, every step including refreshes.
#[test]
fn soap_matches_cpu() {
    let Some(dev) = cuda() else { return };
    twins_of(&dev, "soap");
}

/// SOAP's device refresh (products, `column_dots`, cuSOLVER `potrf`, cuBLAS `trsm`, cuSOLVER
/// Householder fallback) against the CPU refresh (faer), and each step against its CPU twin,
/// at sizes below, at and above one block.
#[test]
fn factor_refresh_matches_cpu() {
    use optlab::linalg::on_device::{cholesky_upper, column_dots, solve_upper_right};
    let Some(dev) = cuda() else { return };
    for dtype in [DType::F32, DType::F64] {
        let tol = if dtype == DType::F32 { 1e-4 } else { 1e-10 };
        for n in [1usize, 7, 64, 257, 300] {
            let x = common::tensor(n as u64, &[n, n], dtype);
            let y = common::tensor(n as u64 + 1, &[n, n], dtype);
            let (xg, yg) = (x.to_device(&dev).unwrap(), y.to_device(&dev).unwrap());
            let cpu = column_dots(&x, &y).unwrap();
            let gpu = column_dots(&xg, &yg).unwrap();
            let scale = cpu.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (j, (a, b)) in cpu.iter().zip(&gpu).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-12 * scale.max(1.0),
                    "column_dots {dtype:?} n={n} [{j}]"
                );
            }
            let spd = (x.t().unwrap().matmul(&x).unwrap()
                + Tensor::eye(n, dtype, &Device::Cpu).unwrap())
            .unwrap()
            .contiguous()
            .unwrap();
            let spd_gpu = spd.to_device(&dev).unwrap();
            let c_cpu = cholesky_upper(&spd, (0.0, f64::INFINITY))
                .unwrap()
                .expect("positive definite");
            let c_gpu = cholesky_upper(&spd_gpu, (0.0, f64::INFINITY))
                .unwrap()
                .expect("positive definite");
            assert_close(
                &format!("cholesky {dtype:?} n={n}"),
                &c_cpu,
                &c_gpu,
                tolerance(dtype),
            );
            let a_cpu = solve_upper_right(&y, &c_cpu).unwrap();
            let a_gpu = solve_upper_right(&y.to_device(&dev).unwrap(), &c_gpu).unwrap();
            assert_close(&format!("solve {dtype:?} n={n}"), &a_cpu, &a_gpu, tol);

            // The whole refresh from a factor and a basis near its eigenbasis.
            let g = common::tensor(50 + n as u64, &[n, 2 * n + 1], dtype);
            let f = g.matmul(&g.t().unwrap()).unwrap();
            let q0 = optlab::linalg::qr_q(&f.matmul(&x).unwrap())
                .unwrap()
                .value()
                .unwrap();
            let (pc, qc) = optlab::optim::kron::power_iteration_qr(&f, &q0)
                .unwrap()
                .value()
                .unwrap();
            let (fg, q0g) = (f.to_device(&dev).unwrap(), q0.to_device(&dev).unwrap());
            let (pg, qg) = optlab::optim::kron::power_iteration_qr(&fg, &q0g)
                .unwrap()
                .value()
                .unwrap();
            assert_eq!(pc, pg, "refresh permutation {dtype:?} n={n}");
            assert_close(
                &format!("refresh basis {dtype:?} n={n}"),
                &qc.abs().unwrap(),
                &qg.abs().unwrap(),
                tol,
            );
        }
    }
}

/// cuSOLVER's eigendecomposition, Householder QR and the inverse roots built on them against
/// faer on the CPU.
#[test]
fn device_solvers_match_cpu() {
    use optlab::linalg::{self, InverseRoot, Order, RootMethod, Stability};
    let Some(dev) = cuda() else { return };
    for dtype in [DType::F32, DType::F64] {
        let tol = if dtype == DType::F32 { 1e-4 } else { 1e-10 };
        for n in [1usize, 5, 64, 200] {
            let g = common::tensor(7 * n as u64, &[n, 2 * n], dtype);
            let f = g.matmul(&g.t().unwrap()).unwrap();
            let fg = f.to_device(&dev).unwrap();
            let ec = linalg::eigh(&f, 1e-30, Order::Descending)
                .unwrap()
                .value()
                .unwrap();
            let eg = linalg::eigh(&fg, 1e-30, Order::Descending)
                .unwrap()
                .value()
                .unwrap();
            assert_close(
                &format!("eigenvalues {dtype:?} n={n}"),
                &ec.values,
                &eg.values,
                tol,
            );
            assert_close(
                &format!("eigenvectors {dtype:?} n={n}"),
                &ec.vectors.abs().unwrap(),
                &eg.vectors.abs().unwrap(),
                tol * 10.0,
            );
            let a = common::tensor(3 * n as u64, &[n, n], dtype);
            let hc = linalg::qr_q(&a).unwrap().value().unwrap();
            let hg = optlab::cuda::solver::householder_q(&a.to_device(&dev).unwrap())
                .unwrap()
                .unwrap();
            assert_close(
                &format!("householder {dtype:?} n={n}"),
                &hc.abs().unwrap(),
                &hg.abs().unwrap(),
                tol,
            );
            for stability in [
                Stability::default(),
                Stability::PseudoInverse {
                    rank_atol: 0.0,
                    rank_rtol: None,
                },
            ] {
                let epsilon = if matches!(stability, Stability::PseudoInverse { .. }) {
                    0.0
                } else {
                    1e-6
                };
                let req = InverseRoot {
                    root: 4.0,
                    epsilon,
                    method: RootMethod::Eigen(stability),
                };
                let rc = linalg::inverse_root(&f, &req).unwrap().value().unwrap();
                let rg = linalg::inverse_root(&fg, &req).unwrap().value().unwrap();
                assert!(rg.device().is_cuda());
                assert_close(
                    &format!("inverse root {dtype:?} n={n} {stability:?}"),
                    &rc,
                    &rg,
                    tol * 10.0,
                );
            }
        }
    }
}

/// Shampoo on the GPU (fused grafting, update and factor passes; inverse roots through
/// cuSOLVER) against the CPU.
#[test]
fn shampoo_matches_cpu() {
    let Some(dev) = cuda() else { return };
    twins_of(&dev, "shampoo");
}

/// The Kronecker-factor statistics: the EMA kernel (`ema_update`) and the one-gemm update of
/// `accumulate_factors` (cuBLAS with β) against the CPU's Gram matrix + EMA pass.
#[test]
fn factor_statistics_match_cpu() {
    use optlab::optim::kron::{accumulate_factors, ema_update, FactorEma, KronLayout};
    use optlab::optim::State;
    let Some(dev) = cuda() else { return };
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
        let tol = tolerance(dtype);
        for ema in forms {
            let s = common::tensor(5, &[37, 37], dtype);
            let f_cpu = common::tensor(6, &[37, 37], dtype);
            let f_gpu = f_cpu.to_device(&dev).unwrap();
            ema_update(&f_cpu, &s, ema).unwrap();
            ema_update(&f_gpu, &s.to_device(&dev).unwrap(), ema).unwrap();
            assert_close(
                &format!("ema_update {ema:?} {dtype:?}"),
                &f_cpu,
                &f_gpu,
                tol,
            );

            // Three modes of a 3-D gradient (one of them of size 1 after a 1-sized lead) and a
            // matrix whose second dim is not preconditioned.
            for (shape, max_dim) in [(vec![7usize, 5, 300], 1000), (vec![64, 2000], 100)] {
                let layout = KronLayout::unmerged(&shape, max_dim);
                let (mut st_cpu, mut st_gpu) = (State::default(), State::default());
                for step in 0..3u64 {
                    let g = common::tensor(40 + step, &shape, dtype);
                    accumulate_factors(&mut st_cpu, "GG", &layout, &g, dtype, ema).unwrap();
                    let g = g.to_device(&dev).unwrap();
                    accumulate_factors(&mut st_gpu, "GG", &layout, &g, dtype, ema).unwrap();
                }
                assert_eq!(
                    st_cpu.tensors.keys().collect::<Vec<_>>(),
                    st_gpu.tensors.keys().collect::<Vec<_>>()
                );
                for (name, t) in &st_cpu.tensors {
                    assert_close(
                        &format!("accumulate_factors {shape:?} {name} {ema:?} {dtype:?}"),
                        t,
                        &st_gpu.tensors[name],
                        tol,
                    );
                }
            }
        }
    }
}

#[test]
fn nonfinite_gradients_are_refused_on_the_device() {
    let Some(dev) = cuda() else { return };
    // Three gradients checked in one batch; the bad one is the second.
    let shapes: &[(&str, &[usize])] = &[("a", &[1000]), ("b", &[513]), ("c", &[7, 3])];
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        for dtype in [DType::F32, DType::F64] {
            let vars = params_on(&dev, shapes, dtype);
            let before: Vec<_> = vars.iter().map(|(_, v)| host(v.as_tensor())).collect();
            let cfg = OptimConfig::from_toml("name = \"adamw\"").unwrap();
            let mut opt = Driver::new(cfg, NamedParams::new(vars.clone()).unwrap()).unwrap();
            let mut grads = grads_on(&dev, shapes, dtype, 1);
            let mut g = common::values(3, 513);
            g[512] = bad;
            let g = Tensor::from_vec(g, 513, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .to_device(&dev)
                .unwrap();
            grads.insert("b".to_string(), g);
            let err = opt.step_named(&grads).unwrap_err();
            assert!(err.to_string().contains("`b`"), "{bad} {dtype:?}: {err}");
            let after: Vec<_> = vars.iter().map(|(_, v)| host(v.as_tensor())).collect();
            assert_eq!(after, before, "parameters changed");
            // The same gradients without the bad value step normally.
            opt.step_named(&grads_on(&dev, shapes, dtype, 1)).unwrap();
        }
    }
}

/// Prints one machine-readable figure for `scripts/gpu-check.sh` (`TIMING key value`), which
/// builds its timing table from these lines.
fn figure(key: &str, value: f64) {
    println!("TIMING {key} {value}");
}

/// Seconds per call of `f` and the number of timed calls: one timed warm-up call (PTX
/// compilation, workspaces), then up to `reps` calls, fewer when the warm-up shows that they
/// would take more than `budget` seconds. When the warm-up alone exceeds the budget, it is the
/// measurement (0 timed calls: an upper bound), so that a pathologically slow routine yields a
/// figure instead of running into the check's time limit.
fn time_within(dev: &Device, reps: usize, budget: f64, mut f: impl FnMut()) -> (f64, usize) {
    dev.synchronize().unwrap();
    let t0 = std::time::Instant::now();
    f();
    dev.synchronize().unwrap();
    let warm = t0.elapsed().as_secs_f64();
    if warm > budget {
        return (warm, 0);
    }
    let reps = reps.min((budget / warm.max(1e-9)) as usize).max(1);
    let t0 = std::time::Instant::now();
    for _ in 0..reps {
        f();
    }
    dev.synchronize().unwrap();
    (t0.elapsed().as_secs_f64() / reps as f64, reps)
}

/// Seconds per call of `f`, after warm-up, with the device synchronized around the timed calls.
fn time_it(dev: &Device, reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    dev.synchronize().unwrap();
    let t0 = std::time::Instant::now();
    for _ in 0..reps {
        f();
    }
    dev.synchronize().unwrap();
    t0.elapsed().as_secs_f64() / reps as f64
}

/// GPT-2 small's parameter shapes (124M parameters).
fn gpt2_shapes() -> Vec<(String, Vec<usize>)> {
    let (v, t, d, l) = (50257, 1024, 768, 12);
    let mut s = vec![
        ("wte.weight".to_string(), vec![v, d]),
        ("wpe.weight".to_string(), vec![t, d]),
        ("ln_f.weight".to_string(), vec![d]),
        ("ln_f.bias".to_string(), vec![d]),
    ];
    for i in 0..l {
        for (n, shape) in [
            ("ln_1.weight", vec![d]),
            ("ln_1.bias", vec![d]),
            ("attn.c_attn.weight", vec![3 * d, d]),
            ("attn.c_attn.bias", vec![3 * d]),
            ("attn.c_proj.weight", vec![d, d]),
            ("attn.c_proj.bias", vec![d]),
            ("ln_2.weight", vec![d]),
            ("ln_2.bias", vec![d]),
            ("mlp.c_fc.weight", vec![4 * d, d]),
            ("mlp.c_fc.bias", vec![4 * d]),
            ("mlp.c_proj.weight", vec![d, 4 * d]),
            ("mlp.c_proj.bias", vec![d]),
        ] {
            s.push((format!("h.{i}.{n}"), shape));
        }
    }
    s
}

/// Timing table for `scripts/gpu-check.sh`: one AdamW step over GPT-2 small's parameters (f32)
/// with the fused kernel (through the driver, gradient checks included, and the bare kernel)
/// and with candle-nn's AdamW, against the device's copy bandwidth.
#[test]
#[ignore = "timing; run by scripts/gpu-check.sh on a GPU machine"]
fn gpu_timing_table() {
    let Some(dev) = cuda() else { return };
    let shapes = gpt2_shapes();
    let n: usize = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let mk = |seed: u64, shape: &[usize]| {
        Tensor::randn(0f32, 1.0, shape, &dev)
            .unwrap()
            .affine(1e-2, seed as f64 * 1e-3)
            .unwrap()
    };
    let vars: Vec<(String, Var)> = shapes
        .iter()
        .enumerate()
        .map(|(i, (name, s))| (name.clone(), Var::from_tensor(&mk(i as u64, s)).unwrap()))
        .collect();
    let grads: BTreeMap<String, Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, (name, s))| (name.clone(), mk(1000 + i as u64, s)))
        .collect();
    let bytes = 4.0 * n as f64;
    let gbps = |b: f64, s: f64| b / s / 1e9;

    // Device copy: read + write every parameter once.
    let copy = time_it(&dev, 20, || {
        for (_, v) in &vars {
            let _ = v.as_tensor().copy().unwrap();
        }
    });

    // The fused kernel alone (AdamStep: reads p, m, v, g; writes p, m, v).
    let moments: Vec<(Tensor, Tensor)> = vars
        .iter()
        .map(|(_, v)| (v.zeros_like().unwrap(), v.zeros_like().unwrap()))
        .collect();
    let mut t = 0;
    let kernel = time_it(&dev, 20, || {
        t += 1;
        let step = optlab::optim::adamw::AdamStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            t,
            maximize: false,
        };
        for ((name, v), (m, s)) in vars.iter().zip(&moments) {
            step.apply(v, &grads[name], m, s, None).unwrap();
        }
    });

    // The driver's step: gradient checks (one finiteness pass and one sync per tensor) + kernel.
    let cfg = OptimConfig::from_toml("name = \"adamw\"\nweight_decay = 0.1").unwrap();
    let mut driver = Driver::new(cfg, NamedParams::new(vars.clone()).unwrap()).unwrap();
    let driver_step = time_it(&dev, 10, || driver.step_named(&grads).unwrap());

    // candle-nn's AdamW (op by op).
    use candle_nn::Optimizer as _;
    let mut store = candle_core::backprop::GradStore::default();
    for (name, v) in &vars {
        store.insert(v.as_tensor(), grads[name].clone());
    }
    let mut nn = candle_nn::AdamW::new(
        vars.iter().map(|(_, v)| v.clone()).collect(),
        candle_nn::ParamsAdamW {
            lr: 1e-3,
            weight_decay: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    let candle_nn_step = time_it(&dev, 10, || nn.step(&store).unwrap());

    let rows = [
        ("device copy (read+write p)", copy, 2.0 * bytes),
        ("fused AdamW kernel (7 accesses)", kernel, 7.0 * bytes),
        ("optlab Driver AdamW step", driver_step, 7.0 * bytes),
        ("candle-nn AdamW step", candle_nn_step, 7.0 * bytes),
    ];
    println!(
        "AdamW step over GPT-2 small ({n} f32 parameters, {} tensors)",
        shapes.len()
    );
    println!("| what | ms | GB/s (useful bytes) | vs copy bandwidth |");
    println!("|---|---:|---:|---:|");
    for (what, secs, b) in rows {
        println!(
            "| {what} | {:.3} | {:.0} | {:.2} |",
            secs * 1e3,
            gbps(b, secs),
            gbps(b, secs) / gbps(2.0 * bytes, copy)
        );
    }
    figure("n_params", n as f64);
    figure("copy_gbps", gbps(2.0 * bytes, copy));
    figure("adamw_kernel_ms", kernel * 1e3);
    figure("adamw_kernel_gbps", gbps(7.0 * bytes, kernel));
    figure(
        "adamw_kernel_frac_copy",
        gbps(7.0 * bytes, kernel) / gbps(2.0 * bytes, copy),
    );
    figure("adamw_driver_ms", driver_step * 1e3);
    figure("candle_nn_adamw_ms", candle_nn_step * 1e3);
}

/// Every golden trajectory replayed on the GPU in f32 (parameters, gradients and state on the
/// device; optimizers without kernels run their passes through host copies), within the GPU
/// tolerance policy (`conformance::gpu_f32_tolerance`: the file's f32 bound times 1, 2 or 4
/// by optimizer, TF32 off; `tests/gpu_tolerance.rs` shows that a 1 % error in an update's
/// hyperparameter still fails it). The golden files are read from `tests/golden` under the
/// working directory (the GPU machine's copy of the repository), else under the build tree.
#[test]
fn golden_trajectories_pass_on_the_gpu_in_f32() {
    use optlab::conformance::{replay_on, report_line, GoldenCase, Outcome};
    let Some(dev) = cuda() else { return };
    let dir = [
        "tests/golden",
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden"),
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|d| d.is_dir())
    .expect("tests/golden");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no golden files in {}", dir.display());
    let mut failures = Vec::new();
    for file in &files {
        let case = GoldenCase::load(file).unwrap();
        let outcome = replay_on(&case, DType::F32, &dev);
        let line = report_line(&file.display().to_string(), DType::F32, &outcome);
        println!("{line}");
        if !matches!(outcome, Outcome::Pass(_)) {
            failures.push(line);
        }
    }
    assert!(
        failures.is_empty(),
        "golden failures on the GPU:\n{}",
        failures.join("\n")
    );
}

/// Timing table for `scripts/gpu-check.sh`: a SOAP step against an AdamW step over GPT-2
/// small's parameters (f32, precondition frequency 10): the mean over 10 consecutive steps
/// after 3 warm-up steps, which holds exactly one refresh.
#[test]
#[ignore = "timing; run by scripts/gpu-check.sh on a GPU machine"]
fn gpu_timing_soap() {
    let Some(dev) = cuda() else { return };
    let shapes = gpt2_shapes();
    let mk = |seed: u64, shape: &[usize]| {
        Tensor::randn(0f32, 1.0, shape, &dev)
            .unwrap()
            .affine(1e-2, seed as f64 * 1e-4)
            .unwrap()
    };
    let vars = |base: u64| -> Vec<(String, Var)> {
        shapes
            .iter()
            .enumerate()
            .map(|(i, (name, s))| {
                (
                    name.clone(),
                    Var::from_tensor(&mk(base + i as u64, s)).unwrap(),
                )
            })
            .collect()
    };
    let grads: BTreeMap<String, Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, (name, s))| (name.clone(), mk(1000 + i as u64, s)))
        .collect();
    let mut rows = Vec::new();
    for toml in [
        "name = \"adamw\"\nweight_decay = 0.1",
        "name = \"soap\"\nweight_decay = 0.01\nprecondition_frequency = 10",
    ] {
        let cfg = OptimConfig::from_toml(toml).unwrap();
        let mut driver = Driver::new(cfg, NamedParams::new(vars(0)).unwrap()).unwrap();
        // The first SOAP call only builds the bases (one eigendecomposition per factor).
        let t0 = std::time::Instant::now();
        driver.step_named(&grads).unwrap();
        dev.synchronize().unwrap();
        let first = t0.elapsed().as_secs_f64();
        let label = toml.lines().next().unwrap().to_string();
        // 3 warm-up steps, then 10 timed ones: one refresh for SOAP, as in every period of 10.
        // Each step is synchronized and printed as it ends, so that a step too slow for the
        // check's time limit still leaves the others in the log.
        let mut total = 0.0;
        for k in 0..13 {
            let t0 = std::time::Instant::now();
            driver.step_named(&grads).unwrap();
            dev.synchronize().unwrap();
            let secs = t0.elapsed().as_secs_f64();
            println!("{label}: step {} took {:.2} ms", k + 2, secs * 1e3);
            if k >= 3 {
                total += secs;
            }
        }
        let per_step = total / 10.0;
        let key = if label.contains("soap") {
            "soap"
        } else {
            "adamw"
        };
        figure(&format!("{key}_first_step_ms"), first * 1e3);
        figure(&format!("{key}_step_ms"), per_step * 1e3);
        rows.push((label, first, per_step));
    }
    println!("SOAP vs AdamW over GPT-2 small (f32), mean over 10 steps after 3 warm-up steps");
    println!("| optimizer | first step ms | step ms | vs AdamW |");
    println!("|---|---:|---:|---:|");
    let base = rows[0].2;
    for (what, first, step) in &rows {
        println!(
            "| {what} | {:.1} | {:.2} | {:.2}× |",
            first * 1e3,
            step * 1e3,
            step / base
        );
    }
    figure("soap_vs_adamw", rows[1].2 / base);
}

/// Timing table for `scripts/gpu-check.sh`: SOAP's refresh of one factor (one power-iteration
/// product and the QR of the device path) against cuSOLVER's Householder QR and `syevd`, for
/// factors of 256, 1024 and 4096 (the torch side, `qr(F @ Q)` and `eigh(F)`, is in
/// scripts/gpu_baselines.py). Each measurement has a time budget, so that a slow routine at
/// n = 4096 gives one cold timing instead of running past the check's time limit.
#[test]
#[ignore = "timing; run by scripts/gpu-check.sh on a GPU machine"]
fn gpu_timing_refresh() {
    let Some(dev) = cuda() else { return };
    let budget = 15.0;
    let ms = |(secs, reps): (f64, usize)| {
        if reps == 0 {
            format!("≤ {:.0} (1 cold call)", secs * 1e3)
        } else {
            format!("{:.2}", secs * 1e3)
        }
    };
    println!("SOAP refresh of one factor (f32): ours vs cuSOLVER");
    println!("| n | power iteration + Cholesky-QR3 ms | Cholesky-QR3 ms | cuSOLVER geqrf+orgqr ms | cuSOLVER syevd ms | fell back |");
    println!("|---:|---:|---:|---:|---:|---|");
    for n in [256usize, 1024, 4096] {
        let g = Tensor::randn(0f32, 1.0, (n, n + n / 2), &dev).unwrap();
        let f = g.matmul(&g.t().unwrap()).unwrap();
        let e = optlab::linalg::eigh(&f, 0.0, optlab::linalg::Order::Descending)
            .unwrap()
            .value()
            .unwrap();
        // A basis near the eigenbasis, as between refreshes.
        let nudged = (&e.vectors + (Tensor::randn(0f32, 1e-3, (n, n), &dev).unwrap())).unwrap();
        let q0 = optlab::cuda::solver::householder_q(&nudged)
            .unwrap()
            .unwrap();
        let a = f.matmul(&q0).unwrap();
        let reps = if n >= 4096 { 3 } else { 10 };
        let refresh = time_within(&dev, reps, budget, || {
            optlab::linalg::on_device::power_iteration_qr(&f, &q0).unwrap();
        });
        figure(&format!("refresh_ms_n{n}"), refresh.0 * 1e3);
        // 0: the figure is one cold call (an upper bound), not a mean.
        figure(&format!("refresh_reps_n{n}"), refresh.1 as f64);
        let fell_back = optlab::linalg::on_device::cholesky_qr3(&a)
            .unwrap()
            .is_none();
        let ours = time_within(&dev, reps, budget, || {
            optlab::linalg::on_device::cholesky_qr3(&a).unwrap();
        });
        figure(&format!("cholqr3_ms_n{n}"), ours.0 * 1e3);
        let householder = time_within(&dev, reps, budget, || {
            optlab::cuda::solver::householder_q(&a).unwrap().unwrap();
        });
        figure(&format!("householder_ms_n{n}"), householder.0 * 1e3);
        let syevd = time_within(&dev, reps, budget, || {
            optlab::cuda::solver::eigh(&f, 0.0).unwrap().unwrap();
        });
        figure(&format!("syevd_ms_n{n}"), syevd.0 * 1e3);
        println!(
            "| {n} | {} | {} | {} | {} | {} |",
            ms(refresh),
            ms(ours),
            ms(householder),
            ms(syevd),
            if fell_back { "yes (Householder)" } else { "no" }
        );
    }
}

/// The test helpers themselves, so that a machine without a GPU still runs something here.
#[test]
fn comparison_helper_catches_an_unwritten_element() {
    let mut a = common::values(1, 1_000_000);
    let t = Tensor::new(a.as_slice(), &Device::Cpu).unwrap();
    a[123_456] += 1e-3;
    let u = Tensor::new(a.as_slice(), &Device::Cpu).unwrap();
    assert!(check_close(&t, &u, 1e-5).is_err());
    assert!(check_close(&t, &t.copy().unwrap(), 0.0).is_ok());
}

/// The runner on a GPU: the same run on the CPU and on the GPU from the same seed gives the
/// same losses (within f32 reduction-order differences), the GPU run's checkpoint resumes on
/// the CPU, resuming on the GPU is bit-identical to running through, and `env.json` names the
/// GPU.
#[test]
fn runner_trains_on_the_gpu_like_the_cpu() {
    use optlab::data::{DataConfig, Dataset};
    use optlab::runner::{read_metrics, run, EnvInfo, RunConfig, RunOptions};
    let Some(_dev) = cuda() else { return };
    let data = Dataset::load(&DataConfig::default()).unwrap();
    for optimizer in [
        "name = \"adamw\"\nlr = 3e-3",
        "name = \"soap\"\nlr = 3e-3\nprecondition_frequency = 2",
    ] {
        let text = format!(
            "seed = 5\n[model]\npreset = \"test\"\n[optimizer]\n{optimizer}\n\
             [train]\nbatch_size = 4\nsteps = 8\ngrad_clip = 1.0\nlog_interval = 1\n\
             [eval]\ninterval = 4\ntokens = 512\n[ewa]\ntaus = [0.9]\n\
             [checkpoint]\ninterval = 4\n"
        );
        let cfg = |device: &str| RunConfig::parse(&text, &[format!("device={device}")]).unwrap();
        let go = |device: &str, dir: &std::path::Path, stop: Option<u64>, resume: bool| {
            let mut o = RunOptions::new(dir);
            o.dataset = Some(data.clone());
            o.stop_after = stop;
            o.resume = resume;
            run(&cfg(device), &o).unwrap_or_else(|e| panic!("{device}: {e}"))
        };
        let losses = |dir: &std::path::Path| -> Vec<f64> {
            read_metrics(&dir.join("metrics.jsonl"))
                .unwrap()
                .iter()
                .filter_map(|l| l.train_loss)
                .collect()
        };
        let tmp = tempfile::tempdir().unwrap();
        let (on_cpu, on_gpu) = (tmp.path().join("cpu"), tmp.path().join("gpu"));
        go("cpu", &on_cpu, None, false);
        go("cuda", &on_gpu, None, false);
        let (lc, lg) = (losses(&on_cpu), losses(&on_gpu));
        assert_eq!(lc.len(), 8);
        assert_eq!(lg.len(), 8);
        for (step, (c, g)) in lc.iter().zip(&lg).enumerate() {
            assert!(
                (c - g).abs() <= 1e-3 * c.abs(),
                "{optimizer}: step {}: cpu {c} gpu {g}",
                step + 1
            );
        }
        let env: EnvInfo =
            serde_json::from_str(&std::fs::read_to_string(on_gpu.join("env.json")).unwrap())
                .unwrap();
        assert_eq!(env.device, "cuda:0");
        let gpu = env.gpu.expect("GPU details in env.json");
        assert!(
            gpu.name.is_some() && gpu.cuda_driver_api.is_some(),
            "{gpu:?}"
        );

        // Stopped on the GPU at step 4: resumed on the GPU it matches the straight run bit
        // for bit; resumed on the CPU it finishes within the same tolerance.
        let (split, moved) = (tmp.path().join("split"), tmp.path().join("moved"));
        go("cuda", &split, Some(4), false);
        copy_dir(&split, &moved);
        go("cuda", &split, None, true);
        assert_eq!(
            losses(&split),
            lg,
            "{optimizer}: GPU resume is not bit-identical"
        );
        go("cpu", &moved, None, true);
        for (c, m) in lc.iter().zip(losses(&moved)) {
            assert!(
                (c - m).abs() <= 1e-3 * c.abs(),
                "{optimizer}: moved {m} vs cpu {c}"
            );
        }
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Adafactor (torch and HF) on the device: the `adafactor_*` kernels, no host copy. Besides the
/// shared cases: leading batch dims (more matrices than one grid has blocks), a 0-D parameter,
/// single rows and columns, many partial-sum chunks and a tensor larger than one grid.
#[test]
fn adafactor_matches_cpu() {
    let Some(dev) = cuda() else { return };
    twins_of(&dev, "adafactor");
    twins_of(&dev, "adafactor_hf");
    let shapes: &[(&str, &[usize])] = &[
        ("a", &[3, 70, 5]),
        ("b", &[70_000, 1, 2]),
        ("c", &[2, 3, 4, 5]),
        ("d", &[]),
        ("e", &[1, 9]),
        ("f", &[9, 1]),
        ("g", &[130, 3]),
        ("h", &[4099, 4097]),
        ("i", &[(1 << 24) + 3]),
    ];
    for toml in [
        "name = \"adafactor\"\nlr = 0.05\nweight_decay = 0.1",
        "name = \"adafactor_hf\"\nbeta1 = 0.9\nweight_decay = 0.01",
    ] {
        twin(&dev, toml, shapes, 2);
    }
}
