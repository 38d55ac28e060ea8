//! Shampoo against its equations, its reference defaults and failure modes, and the golden file.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use super::blocking::{counter_key, inv_factor_key};
use super::*;
use crate::optim::adamw::AdamStep;
use crate::optim::kron::Blocks;
use crate::optim::sgd::SgdConfig;
use crate::optim::testing::{self, flat, noise, tensor, Shapes};
use crate::optim::{Driver, NamedParams, OptimConfig, Optimizer};

fn driver(cfg: OptimConfig, shapes: Shapes<'_>, dtype: DType) -> Driver {
    testing::driver(cfg, shapes, dtype, |i, n| noise(7 + i, n))
}

fn grads(shapes: Shapes<'_>, step: u64, dtype: DType) -> BTreeMap<String, Tensor> {
    testing::named(shapes, dtype, |i, n| noise(1000 * step + i, n))
}

fn params(opt: &Driver) -> BTreeMap<String, Vec<f64>> {
    opt.vars()
        .into_iter()
        .map(|(n, v)| (n, flat(v.as_tensor())))
        .collect()
}

fn bits(opt: &Driver) -> BTreeMap<String, Vec<u64>> {
    params(opt)
        .into_iter()
        .map(|(n, v)| (n, v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

fn shampoo(cfg: ShampooConfig) -> OptimConfig {
    OptimConfig::Shampoo(cfg)
}

/// A config that never computes a root within the tests' runs.
fn never(cfg: ShampooConfig) -> ShampooConfig {
    ShampooConfig {
        precondition_frequency: 1000,
        start_preconditioning_step: -1,
        ..cfg
    }
}

fn toml(text: &str) -> ShampooConfig {
    match OptimConfig::from_toml(&format!("name = \"shampoo\"\n{text}")).unwrap() {
        OptimConfig::Shampoo(c) => c,
        other => panic!("not shampoo: {other:?}"),
    }
}

#[test]
fn defaults_are_the_reference_defaults() {
    let c = ShampooConfig::default();
    assert_eq!(
        (c.lr, c.betas, c.beta3, c.epsilon),
        (1e-2, (0.9, 1.0), -1.0, 1e-12)
    );
    assert_eq!(c.weight_decay, 0.0);
    assert_eq!(c.weight_decay_type, WeightDecayType::Decoupled);
    assert_eq!(c.max_preconditioner_dim, DimLimit::Finite(1024));
    assert_eq!((c.precondition_frequency, c.start()), (1, 1));
    assert!(c.use_bias_correction);
    assert_eq!(c.grafting_config, Grafting::None);
    assert_eq!(c.iterate_averaging_config, IterateAveraging::None);
    assert_eq!(c.target_parameter_dimensionality, DimLimit::Finite(1));
    assert_eq!(c.factor_matrix_dtype, FactorDtype::Float32);
    assert_eq!(c.inv_factor_matrix_dtype, FactorDtype::Float32);
    assert_eq!(c.num_tolerated_failed_amortized_computations, 3);
    assert_eq!(
        c.amortized_computation_config,
        AmortizedComputation::Eigen {
            perturb_before_computation: true,
            tolerance: 0.0
        }
    );
    assert_eq!(c.preconditioner, PreconditionerKind::RootInv);
    assert!(c.ignored_basis_change_dims.is_empty());
    for d in [
        c.factor_matrix_eigenvectors_dtype,
        c.factor_matrix_eigenvalues_dtype,
        c.corrected_eigenvalues_dtype,
    ] {
        assert_eq!(d, FactorDtype::Float32);
    }
    assert!(!c.use_trace_scaling && !c.drop_weighting_factor_on_gsquare);
    assert_eq!(c.inverse_exponent(1, 0), 0.5);
    assert_eq!(c.inverse_exponent(2, 1), 0.25);
    assert_eq!(c.inverse_exponent(3, 2), 1.0 / 6.0);
    assert_eq!(c.inverse_exponent(0, 0), 0.5);
    c.validate().unwrap();
}

#[test]
fn toml_config_with_nested_tables() {
    let c = toml(
        r#"lr = 0.001
betas = [0.9, 0.999]
epsilon = 1e-8
max_preconditioner_dim = "inf"
target_parameter_dimensionality = inf
weight_decay_type = "L2"
weight_decay = 0.1
grafting = { type = "adam", beta2 = 0.95, epsilon = 1e-8 }
iterate_averaging_config = { type = "classic_momentum", momentum = 0.9, use_nesterov = true }
inverse_exponent_override = { 2 = 0.5, 3 = { 0 = 0.0, 2 = 0.25 } }
factor_matrix_dtype = "float64"
"#,
    );
    assert_eq!(c.max_preconditioner_dim, DimLimit::Inf);
    assert_eq!(c.target_parameter_dimensionality, DimLimit::Inf);
    assert_eq!(c.weight_decay_type, WeightDecayType::L2);
    assert_eq!(
        c.grafting_config,
        Grafting::Adam {
            beta2: 0.95,
            epsilon: 1e-8,
            drop_weighting_factor_on_gsquare: false
        }
    );
    assert_eq!(
        c.iterate_averaging_config,
        IterateAveraging::ClassicMomentum {
            momentum: 0.9,
            dampening: 0.0,
            use_nesterov: true
        }
    );
    assert_eq!(c.inverse_exponent(2, 0), 0.5);
    assert_eq!(c.inverse_exponent(3, 0), 0.0);
    assert_eq!(c.inverse_exponent(3, 1), 1.0 / 6.0);
    assert_eq!(c.inverse_exponent(3, 2), 0.25);
    assert_eq!(c.factor_matrix_dtype, FactorDtype::Float64);
    // Grafting defaults per method; a bare `type` works.
    let c = toml("grafting_config = { type = \"rmsprop\" }");
    assert_eq!(
        c.grafting_config,
        Grafting::Rmsprop {
            beta2: 0.99,
            epsilon: 1e-10,
            drop_weighting_factor_on_gsquare: false
        }
    );
    let c = toml("grafting_config = { type = \"adagrad\" }\nmax_preconditioner_dim = 8192");
    assert_eq!(c.grafting_config, Grafting::Adagrad { epsilon: 1e-10 });
    assert_eq!(c.max_preconditioner_dim, DimLimit::Finite(8192));
    let c = toml("epsilon = 0.0\namortized_computation_config = { type = \"pseudo_inverse\" }");
    assert_eq!(
        c.amortized_computation_config,
        AmortizedComputation::PseudoInverse {
            rank_atol: 0.0,
            rank_rtol: Some(0.0)
        }
    );
    // JSON round trip (the state header stores the config).
    let full = OptimConfig::Shampoo(toml(
        "max_preconditioner_dim = \"inf\"\ngrafting_config = { type = \"sgd\" }",
    ));
    let back = OptimConfig::from_json(serde_json::from_str(&full.to_json()).unwrap()).unwrap();
    assert_eq!(back.to_json(), full.to_json());
    // Unknown keys, in nested tables too, are rejected.
    for bad in [
        "grafting_config = { type = \"adam\", beta1 = 0.9 }",
        "grafting_config = { type = \"lamb\" }",
        "momentum = 0.9",
        "max_preconditioner_dim = -3",
        "max_preconditioner_dim = \"big\"",
    ] {
        assert!(
            OptimConfig::from_toml(&format!("name = \"shampoo\"\n{bad}")).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn validation_names_the_field() {
    let cases: Vec<(&str, &str)> = vec![
        ("betas = [1.0, 0.9]", "shampoo.betas[0]"),
        ("betas = [0.9, 1.1]", "shampoo.betas[1]"),
        ("beta3 = 1.0", "shampoo.beta3"),
        ("epsilon = 0.0", "shampoo.epsilon"),
        ("weight_decay = -1.0", "shampoo.weight_decay"),
        ("precondition_frequency = 0", "shampoo.precondition_frequency"),
        (
            "precondition_frequency = 10\nstart_preconditioning_step = 5",
            "shampoo.start_preconditioning_step",
        ),
        ("start_preconditioning_step = -2", "shampoo.start_preconditioning_step"),
        ("max_preconditioner_dim = 0", "shampoo.max_preconditioner_dim"),
        (
            "target_parameter_dimensionality = 0",
            "shampoo.target_parameter_dimensionality",
        ),
        (
            "grafting_config = { type = \"adam\", epsilon = 0.0 }",
            "shampoo.grafting_config.epsilon",
        ),
        (
            "grafting_config = { type = \"rmsprop\", beta2 = 0.0 }",
            "shampoo.grafting_config.beta2",
        ),
        (
            "iterate_averaging_config = { type = \"classic_momentum\", momentum = 1.0 }",
            "shampoo.iterate_averaging_config.momentum",
        ),
        (
            "iterate_averaging_config = { type = \"classic_momentum\", dampening = 1.0 }",
            "shampoo.iterate_averaging_config.dampening",
        ),
        ("inverse_exponent_override = { x = 0.5 }", "shampoo.inverse_exponent_override"),
        (
            "inverse_exponent_override = { 2 = { 2 = 0.5 } }",
            "shampoo.inverse_exponent_override.2",
        ),
        (
            "inverse_exponent_override = { 2 = -0.5 }",
            "shampoo.inverse_exponent_override.2",
        ),
        (
            "amortized_computation_config = { type = \"pseudo_inverse\" }",
            "shampoo.epsilon",
        ),
        ("weight_decay_type = \"corrected\"\nlr = 0.0", "shampoo.lr"),
        (
            "use_trace_scaling = true\ntrace_scaling_exponent = 1.5",
            "shampoo.trace_scaling_exponent",
        ),
        (
            "amortized_computation_config = { type = \"coupled_newton\" }\ninverse_exponent_override = { 2 = 0.3 }",
            "shampoo.inverse_exponent_override.2",
        ),
    ];
    for (text, field) in cases {
        let err = OptimConfig::from_toml(&format!("name = \"shampoo\"\n{text}"))
            .expect_err(text)
            .to_string();
        assert!(err.contains(&format!("`{field}`")), "{text}: {err}");
    }
}

#[test]
fn merge_small_dims_examples() {
    assert_eq!(merge_small_dims(&[6, 10], 1024, 1), vec![60]);
    assert_eq!(merge_small_dims(&[6, 10], 1024, 2), vec![6, 10]);
    assert_eq!(merge_small_dims(&[32, 3, 64, 64], 8192, 1), vec![96, 4096]);
    assert_eq!(
        merge_small_dims(&[32, 3, 64, 64], 1_000_000, 2),
        vec![32, 12288]
    );
    assert_eq!(merge_small_dims(&[8, 4, 3], 1024, 2), vec![8, 12]);
    assert_eq!(merge_small_dims(&[1, 50], 1024, 1), vec![50]);
    assert_eq!(merge_small_dims(&[1, 2, 5, 1], 10, 1), vec![10]);
    assert_eq!(merge_small_dims(&[1, 2, 5, 1], 1, 1), vec![2, 5]);
    assert_eq!(merge_small_dims(&[1, 1], 10, 1), vec![1]);
    assert_eq!(merge_small_dims(&[], 10, 1), vec![1]);
    assert_eq!(merge_small_dims(&[3, 0], 10, 1), vec![0]);
    assert_eq!(merge_small_dims(&[2000, 3], usize::MAX, 1), vec![6000]);
}

#[test]
fn never_preconditioning_with_adam_grafting_is_adam() {
    let shapes: Shapes<'_> = &[("w", &[5, 7]), ("b", &[7])];
    let (lr, b1, b2, eps, wd) = (0.01, 0.9, 0.95, 1e-8, 0.1);
    let cfg = never(ShampooConfig {
        lr,
        betas: (b1, 0.999),
        weight_decay: wd,
        grafting_config: Grafting::Adam {
            beta2: b2,
            epsilon: eps,
            drop_weighting_factor_on_gsquare: false,
        },
        ..Default::default()
    });
    for dtype in [DType::F64, DType::F32] {
        let mut opt = driver(shampoo(cfg.clone()), shapes, dtype);
        // The same Adam by hand, in the reference's operation order (f64 only: bit-exact).
        let mut hand = params(&opt);
        let mut moments: BTreeMap<String, (Vec<f64>, Vec<f64>)> = hand
            .iter()
            .map(|(n, p)| (n.clone(), (vec![0.0; p.len()], vec![0.0; p.len()])))
            .collect();
        // And through AdamStep (AdamW's fused pass) on separate variables.
        let adam_vars: BTreeMap<String, (Var, Tensor, Tensor)> = opt
            .vars()
            .into_iter()
            .map(|(n, v)| {
                let p = Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap();
                let m = v.as_tensor().zeros_like().unwrap();
                let s = v.as_tensor().zeros_like().unwrap();
                (n, (p, m, s))
            })
            .collect();
        for t in 1..=8u64 {
            let g = grads(shapes, t, dtype);
            opt.step_named(&g).unwrap();
            for (n, p) in hand.iter_mut() {
                let gv = flat(&g[n]);
                let (m, v) = moments.get_mut(n).unwrap();
                let bc1 = 1.0 - b1 * b1.powf(t as f64 - 1.0);
                let bc2 = 1.0 - b2.powf(t as f64);
                for k in 0..p.len() {
                    v[k] = b2 * v[k] + (1.0 - b2) * gv[k] * gv[k];
                    m[k] = m[k] + (1.0 - b1) * (gv[k] - m[k]);
                    let a = (m[k] / bc1) / ((v[k] / bc2).sqrt() + eps);
                    p[k] = p[k] + (a + wd * p[k]) * -lr;
                }
            }
            for (n, (p, m, s)) in &adam_vars {
                AdamStep {
                    lr,
                    beta1: b1,
                    beta2: b2,
                    eps,
                    weight_decay: wd,
                    t,
                    maximize: false,
                }
                .apply(p, &g[n], m, s, None)
                .unwrap();
            }
        }
        let got = params(&opt);
        for (n, p) in &got {
            let adam = flat(adam_vars[n].0.as_tensor());
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            for k in 0..p.len() {
                assert!(
                    (p[k] - adam[k]).abs() <= tol * (1.0 + adam[k].abs()),
                    "{dtype:?} {n}[{k}]: shampoo {} vs AdamStep {}",
                    p[k],
                    adam[k]
                );
            }
            if dtype == DType::F64 {
                assert_eq!(p, &hand[n], "{n}: not bit-identical to the hand loop");
            }
        }
    }
}

#[test]
fn never_preconditioning_with_sgd_grafting_is_sgd() {
    let shapes: Shapes<'_> = &[("w", &[4, 6]), ("b", &[6]), ("s", &[])];
    type Variant = (Grafting, Option<(f64, bool)>, f64);
    let variants: [Variant; 4] = [
        (Grafting::Sgd, None, 0.0),
        (Grafting::Sgd, Some((0.9, true)), 0.01),
        (Grafting::Sgd, Some((0.9, false)), 0.0),
        // Without grafting the identity preconditioner is SGD too.
        (Grafting::None, Some((0.5, true)), 0.01),
    ];
    for (grafting, momentum, wd) in variants {
        for dtype in [DType::F64, DType::F32] {
            let cfg = never(ShampooConfig {
                lr: 0.05,
                betas: (0.0, 1.0),
                weight_decay: wd,
                weight_decay_type: WeightDecayType::L2,
                grafting_config: grafting,
                iterate_averaging_config: match momentum {
                    None => IterateAveraging::None,
                    Some((momentum, use_nesterov)) => IterateAveraging::ClassicMomentum {
                        momentum,
                        dampening: 0.0,
                        use_nesterov,
                    },
                },
                ..Default::default()
            });
            let sgd = SgdConfig {
                lr: 0.05,
                momentum: momentum.map_or(0.0, |m| m.0),
                nesterov: momentum.is_some_and(|m| m.1),
                weight_decay: wd,
                ..Default::default()
            };
            let mut a = driver(shampoo(cfg), shapes, dtype);
            let mut b = driver(OptimConfig::Sgd(sgd), shapes, dtype);
            for t in 1..=6 {
                a.step_named(&grads(shapes, t, dtype)).unwrap();
                b.step_named(&grads(shapes, t, dtype)).unwrap();
            }
            assert_eq!(bits(&a), bits(&b), "{grafting:?} {momentum:?} {dtype:?}");
        }
    }
}

#[test]
fn never_preconditioning_with_adagrad_and_rmsprop_grafting() {
    let shapes: Shapes<'_> = &[("w", &[3, 4])];
    for grafting in [
        Grafting::Adagrad { epsilon: 1e-3 },
        Grafting::Rmsprop {
            beta2: 0.9,
            epsilon: 1e-6,
            drop_weighting_factor_on_gsquare: false,
        },
        Grafting::Rmsprop {
            beta2: 0.9,
            epsilon: 1e-6,
            drop_weighting_factor_on_gsquare: true,
        },
        Grafting::Adam {
            beta2: 0.9,
            epsilon: 1e-6,
            drop_weighting_factor_on_gsquare: true,
        },
    ] {
        let cfg = never(ShampooConfig {
            lr: 0.1,
            betas: (0.0, 1.0),
            grafting_config: grafting,
            ..Default::default()
        });
        let mut opt = driver(shampoo(cfg), shapes, DType::F64);
        let mut p = params(&opt)["w"].clone();
        let mut v = vec![0.0; p.len()];
        let (decay, weight, eps) = match grafting {
            Grafting::Adagrad { epsilon } => (1.0, 1.0, epsilon),
            Grafting::Rmsprop {
                beta2,
                epsilon,
                drop_weighting_factor_on_gsquare: drop,
            }
            | Grafting::Adam {
                beta2,
                epsilon,
                drop_weighting_factor_on_gsquare: drop,
            } => (beta2, if drop { 1.0 } else { 1.0 - beta2 }, epsilon),
            _ => unreachable!(),
        };
        for t in 1..=5 {
            let g = grads(shapes, t, DType::F64);
            opt.step_named(&g).unwrap();
            let g = flat(&g["w"]);
            for k in 0..p.len() {
                v[k] = if decay == 1.0 { v[k] } else { decay * v[k] } + weight * g[k] * g[k];
                p[k] += (g[k] / (v[k].sqrt() + eps)) * -0.1;
            }
        }
        assert_eq!(params(&opt)["w"], p, "{grafting:?}");
    }
}

#[test]
fn weight_decay_types() {
    // One SGD-grafted step from W with G: D = G + α·W, W ← W − lr·D.
    let shapes: Shapes<'_> = &[("w", &[2, 3])];
    let (lr, wd) = (0.5, 0.2);
    for (ty, alpha) in [
        (WeightDecayType::Decoupled, wd),
        (WeightDecayType::Corrected, wd * 0.25),
        (WeightDecayType::Independent, wd / lr),
        (WeightDecayType::L2, wd),
    ] {
        let cfg = never(ShampooConfig {
            lr,
            betas: (0.0, 1.0),
            weight_decay: wd,
            weight_decay_type: ty,
            grafting_config: Grafting::Sgd,
            ..Default::default()
        });
        let mut opt = driver(shampoo(cfg), shapes, DType::F64);
        opt.set_lr_factor(0.25);
        let w0 = params(&opt)["w"].clone();
        let g = grads(shapes, 1, DType::F64);
        opt.step_named(&g).unwrap();
        let g = flat(&g["w"]);
        let got = params(&opt)["w"].clone();
        for k in 0..w0.len() {
            let want = w0[k] - lr * 0.25 * (g[k] + alpha * w0[k]);
            assert!(
                (got[k] - want).abs() < 1e-15,
                "{ty:?}: {} vs {want}",
                got[k]
            );
        }
    }
}

/// `a·b` of row-major `n×n` matrices.
fn mm(a: &[f64], b: &[f64], n: usize, k: usize, m: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            out[i * m + j] = (0..k).map(|l| a[i * k + l] * b[l * m + j]).sum();
        }
    }
    out
}

fn max_dev_from_identity(a: &[f64], n: usize) -> f64 {
    (0..n * n)
        .map(|i| (a[i] - if i / n == i % n { 1.0 } else { 0.0 }).abs())
        .fold(0.0, f64::max)
}

#[test]
fn half_power_override_and_default_exponents() {
    let shapes: Shapes<'_> = &[("w", &[4, 6])];
    let eps = 1e-10;
    for (text, power) in [("", 4u32), ("inverse_exponent_override = { 2 = 0.5 }", 2)] {
        let mut cfg = toml(text);
        cfg.betas = (0.0, 0.9);
        cfg.epsilon = eps;
        cfg.lr = 0.1;
        cfg.target_parameter_dimensionality = DimLimit::Inf;
        cfg.factor_matrix_dtype = FactorDtype::Float64;
        cfg.inv_factor_matrix_dtype = FactorDtype::Float64;
        let mut opt = driver(shampoo(cfg), shapes, DType::F64);
        // Step 1: L = GGᵀ, R = GᵀG; both exponents give the polar factor U·Vᵀ of G.
        let w0 = params(&opt)["w"].clone();
        opt.step_named(&grads(shapes, 1, DType::F64)).unwrap();
        let d: Vec<f64> = params(&opt)["w"]
            .iter()
            .zip(&w0)
            .map(|(w, w0)| (w0 - w) / 0.1)
            .collect();
        let mut dt = vec![0.0; 24];
        for i in 0..4 {
            for j in 0..6 {
                dt[j * 4 + i] = d[i * 6 + j];
            }
        }
        // Quarter powers: U·Σ^(−1/2)·Σ·Σ^(−1/2)·Vᵀ = U·Vᵀ, so D·Dᵀ = I. Half powers:
        // U·Σ⁻¹·Vᵀ, so D·Dᵀ = (GGᵀ)⁻¹.
        let ddt = mm(&d, &dt, 4, 6, 4);
        let check = if power == 4 {
            ddt
        } else {
            let g = flat(&grads(shapes, 1, DType::F64)["w"]);
            let mut gt = vec![0.0; 24];
            for i in 0..4 {
                for j in 0..6 {
                    gt[j * 4 + i] = g[i * 6 + j];
                }
            }
            mm(&ddt, &mm(&g, &gt, 4, 6, 4), 4, 4, 4)
        };
        assert!(
            max_dev_from_identity(&check, 4) < 1e-6,
            "power {power}: {check:?}"
        );
        // Later steps: the stored roots are (F/bc2 + εI)^(−1/power) and D = P_L G P_R.
        for t in 2..=4u64 {
            let before = params(&opt)["w"].clone();
            let g = grads(shapes, t, DType::F64);
            opt.step_named(&g).unwrap();
            let st = opt.param_state("w").unwrap();
            let bc2 = 1.0 - 0.9f64.powf(t as f64);
            let mut p_side = Vec::new();
            for (k, n) in [(0usize, 4usize), (1, 6)] {
                let f = flat(&st.tensors[&factor_key(0, k)]);
                let p = flat(&st.tensors[&inv_factor_key(0, k)]);
                let mut a: Vec<f64> = f.iter().map(|x| x / bc2).collect();
                for i in 0..n {
                    a[i * n + i] += eps;
                }
                let mut pp = p.clone();
                for _ in 1..power {
                    pp = mm(&pp, &p, n, n, n);
                }
                let dev = max_dev_from_identity(&mm(&pp, &a, n, n, n), n);
                assert!(
                    dev < 1e-6,
                    "power {power} factor {k}: |P^r A − I| = {dev:e}"
                );
                p_side.push(p);
            }
            let g = flat(&g["w"]);
            let want = mm(&mm(&p_side[0], &g, 4, 4, 6), &p_side[1], 4, 6, 6);
            let after = params(&opt)["w"].clone();
            for k in 0..24 {
                let got = (before[k] - after[k]) / 0.1;
                assert!(
                    (got - want[k]).abs() < 1e-9 * (1.0 + want[k].abs()),
                    "power {power} step {t}: {got} vs {}",
                    want[k]
                );
            }
        }
    }
    // A per-dim override with exponent 0 leaves that dim without a factor.
    let mut cfg = toml("inverse_exponent_override = { 3 = { 0 = 0.0, 2 = 0.5 } }");
    cfg.target_parameter_dimensionality = DimLimit::Inf;
    let shapes: Shapes<'_> = &[("x", &[2, 3, 4])];
    let mut opt = driver(shampoo(cfg), shapes, DType::F64);
    opt.step_named(&grads(shapes, 1, DType::F64)).unwrap();
    let keys: Vec<&String> = opt.param_state("x").unwrap().tensors.keys().collect();
    assert_eq!(
        keys,
        vec![
            "block0.factor_matrix.1",
            "block0.factor_matrix.2",
            "block0.inv_factor_matrix.1",
            "block0.inv_factor_matrix.2",
            "filtered_grad"
        ]
    );
}

#[test]
fn blocks_are_independent_problems() {
    // A (6,10) matrix and a (10,) vector cut at 4 ≡ one parameter per block.
    let base = ShampooConfig {
        lr: 0.02,
        betas: (0.9, 0.99),
        epsilon: 1e-6,
        precondition_frequency: 2,
        target_parameter_dimensionality: DimLimit::Inf,
        grafting_config: Grafting::Adam {
            beta2: 0.99,
            epsilon: 1e-8,
            drop_weighting_factor_on_gsquare: false,
        },
        weight_decay: 0.01,
        ..Default::default()
    };
    let blocked = ShampooConfig {
        max_preconditioner_dim: DimLimit::Finite(4),
        ..base.clone()
    };
    let whole = ShampooConfig {
        max_preconditioner_dim: DimLimit::Inf,
        ..base
    };
    for dtype in [DType::F64, DType::F32] {
        let shapes: Shapes<'_> = &[("m", &[6, 10]), ("v", &[10])];
        let mut a = driver(shampoo(blocked.clone()), shapes, dtype);
        let st_ranges = Blocks::new(&[6, 10], 4).unwrap();
        let v_ranges = Blocks::new(&[10], 4).unwrap();
        let init = a.vars();
        let mut pieces: Vec<(String, Var)> = Vec::new();
        for (n, v) in &init {
            let b = if n == "m" { &st_ranges } else { &v_ranges };
            for (i, part) in b.split(v.as_tensor()).unwrap().into_iter().enumerate() {
                pieces.push((
                    format!("{n}{i}"),
                    Var::from_tensor(&part.copy().unwrap()).unwrap(),
                ));
            }
        }
        let mut b = Driver::new(shampoo(whole.clone()), NamedParams::new(pieces).unwrap()).unwrap();
        for t in 1..=6 {
            let g = grads(shapes, t, dtype);
            a.step_named(&g).unwrap();
            let mut gb = BTreeMap::new();
            for (n, gt) in &g {
                let bl = if n == "m" { &st_ranges } else { &v_ranges };
                for (i, part) in bl.split(gt).unwrap().into_iter().enumerate() {
                    gb.insert(format!("{n}{i}"), part);
                }
            }
            b.step_named(&gb).unwrap();
        }
        let pb = params(&b);
        for (n, v) in a.vars() {
            let bl = if n == "m" { &st_ranges } else { &v_ranges };
            for (i, part) in bl.split(v.as_tensor()).unwrap().iter().enumerate() {
                let got: Vec<u64> = flat(part).iter().map(|x| x.to_bits()).collect();
                let want: Vec<u64> = pb[&format!("{n}{i}")].iter().map(|x| x.to_bits()).collect();
                assert_eq!(got, want, "{dtype:?} {n} block {i}");
            }
        }
        let st = a.param_state("m").unwrap();
        assert_eq!(st.tensors["block2.factor_matrix.1"].dims(), &[2, 2]);
        assert_eq!(st.tensors["block5.inv_factor_matrix.0"].dims(), &[2, 2]);
        assert!(!st.tensors.contains_key("block6.factor_matrix.0"));
        let sv = a.param_state("v").unwrap();
        assert_eq!(sv.tensors["block2.factor_matrix.0"].dims(), &[2, 2]);
    }
}

#[test]
fn default_merging_makes_small_matrices_vectors() {
    let shapes: Shapes<'_> = &[("w", &[3, 5]), ("big", &[3, 400])];
    let mut opt = driver(shampoo(ShampooConfig::default()), shapes, DType::F32);
    opt.step_named(&grads(shapes, 1, DType::F32)).unwrap();
    let st = opt.param_state("w").unwrap();
    assert_eq!(st.tensors["block0.factor_matrix.0"].dims(), &[15, 15]);
    // 3·400 > 1024: kept as a matrix.
    let st = opt.param_state("big").unwrap();
    assert_eq!(st.tensors["block0.factor_matrix.0"].dims(), &[3, 3]);
    assert_eq!(st.tensors["block0.factor_matrix.1"].dims(), &[400, 400]);
}

fn degenerate(kind: &str, shape: &[usize], step: u64) -> Vec<f64> {
    let n: usize = shape.iter().product();
    let g = noise(step * 31 + 5, n);
    match kind {
        "zero" => vec![0.0; n],
        "tiny" => g.iter().map(|x| x * 1e-20).collect(),
        "huge" => g.iter().map(|x| x * 1e20).collect(),
        "rank1" => {
            let (r, c) = (shape[0], n / shape[0]);
            let u = noise(step, r);
            let v = noise(step + 99, c);
            (0..n).map(|i| u[i / c] * v[i % c]).collect()
        }
        // Orthogonal rows (scaled identity pattern): GGᵀ ∝ I, all eigenvalues repeated.
        "repeated" => {
            let c = n / shape[0];
            (0..n)
                .map(|i| {
                    if shape.len() == 1 || i / c == i % c {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect()
        }
        _ => unreachable!(),
    }
}

#[test]
fn degenerate_gradients_never_give_silent_nans() {
    let shapes: Shapes<'_> = &[("w", &[4, 6]), ("b", &[5])];
    let f64_factors = ShampooConfig {
        factor_matrix_dtype: FactorDtype::Float64,
        inv_factor_matrix_dtype: FactorDtype::Float64,
        ..Default::default()
    };
    let configs: Vec<(&str, ShampooConfig)> = vec![
        ("default", ShampooConfig::default()),
        ("f64 factors", f64_factors.clone()),
        (
            "adam grafting, half power",
            ShampooConfig {
                betas: (0.9, 0.999),
                grafting_config: Grafting::Adam {
                    beta2: 0.999,
                    epsilon: 1e-8,
                    drop_weighting_factor_on_gsquare: false,
                },
                inverse_exponent_override: [("2".to_string(), ExponentOverride::All(0.5))]
                    .into_iter()
                    .collect(),
                target_parameter_dimensionality: DimLimit::Inf,
                ..f64_factors.clone()
            },
        ),
        (
            "momentum, no perturbation",
            ShampooConfig {
                iterate_averaging_config: IterateAveraging::ClassicMomentum {
                    momentum: 0.9,
                    dampening: 0.1,
                    use_nesterov: false,
                },
                amortized_computation_config: AmortizedComputation::Eigen {
                    perturb_before_computation: false,
                    tolerance: 0.0,
                },
                use_trace_scaling: true,
                ..ShampooConfig::default()
            },
        ),
    ];
    for (label, cfg) in configs {
        let all_f64 = cfg.factor_matrix_dtype == FactorDtype::Float64;
        for dtype in [DType::F64, DType::F32] {
            for kind in ["zero", "tiny", "huge", "rank1", "repeated"] {
                let mut opt = driver(shampoo(cfg.clone()), shapes, dtype);
                let start = params(&opt);
                for t in 1..=5 {
                    let g: BTreeMap<String, Tensor> = shapes
                        .iter()
                        .map(|(n, s)| (n.to_string(), tensor(degenerate(kind, s, t), s, dtype)))
                        .collect();
                    let before = bits(&opt);
                    match opt.step_named(&g) {
                        Ok(()) => {
                            for (n, p) in params(&opt) {
                                assert!(
                                    p.iter().all(|x| x.is_finite()),
                                    "{label} {dtype:?} {kind} step {t}: {n} not finite"
                                );
                            }
                        }
                        Err(e) => {
                            // Visible, and nothing of that parameter changed.
                            let msg = e.to_string();
                            assert!(msg.contains("NaN or infinity"), "{label} {kind}: {msg}");
                            let after = bits(&opt);
                            let first_failing = msg.contains("`b`") as usize;
                            let name = ["w", "b"][first_failing];
                            assert_eq!(before[name], after[name], "{label} {kind}: {msg}");
                            assert!(
                                kind == "huge" && (!all_f64 || dtype == DType::F32),
                                "{label} {dtype:?} {kind}: unexpected error {msg}"
                            );
                            break;
                        }
                    }
                }
                if kind == "zero" && cfg.weight_decay == 0.0 {
                    assert_eq!(
                        params(&opt),
                        start,
                        "{label} {dtype:?}: zero gradients moved"
                    );
                }
                assert_eq!(
                    opt.diagnostics()["shampoo_failed_amortized_computations"],
                    0.0
                );
            }
        }
    }
}

#[test]
fn failed_roots_keep_the_previous_root_and_are_counted() {
    let shapes: Shapes<'_> = &[("w", &[3, 4])];
    let good = ShampooConfig {
        betas: (0.0, 1.0),
        epsilon: 1e-6,
        target_parameter_dimensionality: DimLimit::Inf,
        factor_matrix_dtype: FactorDtype::Float64,
        inv_factor_matrix_dtype: FactorDtype::Float64,
        ..Default::default()
    };
    // Coupled Newton with one iteration and an impossible tolerance never converges.
    let failing = ShampooConfig {
        amortized_computation_config: AmortizedComputation::CoupledNewton {
            max_iterations: 1,
            tolerance: 1e-300,
        },
        ..good.clone()
    };
    let mut a = driver(shampoo(good), shapes, DType::F64);
    for t in 1..=2 {
        a.step_named(&grads(shapes, t, DType::F64)).unwrap();
    }
    let roots = |o: &Driver| -> Vec<Vec<u64>> {
        (0..2)
            .map(|k| {
                flat(&o.param_state("w").unwrap().tensors[&inv_factor_key(0, k)])
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            })
            .collect()
    };
    let saved = roots(&a);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.safetensors");
    a.save_state(&path).unwrap();
    let vars: Vec<(String, Var)> = a
        .vars()
        .into_iter()
        .map(|(n, v)| (n, Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap()))
        .collect();
    let mut b = Driver::new(shampoo(failing), NamedParams::new(vars).unwrap()).unwrap();
    b.load_state(&path).unwrap();
    for t in 3..=5u64 {
        let before = params(&b)["w"].clone();
        b.step_named(&grads(shapes, t, DType::F64)).unwrap();
        // The previous roots are kept and still used: the parameter moves, finitely.
        assert_eq!(roots(&b), saved, "step {t}");
        let after = params(&b)["w"].clone();
        assert!(after.iter().all(|x| x.is_finite()) && after != before);
        let st = b.param_state("w").unwrap();
        assert_eq!(st.scalar(&counter_key(0)), (t - 2) as f64);
        assert_eq!(
            b.diagnostics()["shampoo_failed_amortized_computations"],
            2.0 * (t - 2) as f64
        );
    }
    // The fourth consecutive failure exceeds the tolerance (3): an error, nothing changed.
    let before = bits(&b);
    let st_before = b.param_state("w").unwrap().deep_clone().unwrap();
    let err = b
        .step_named(&grads(shapes, 6, DType::F64))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("num_tolerated_failed_amortized_computations"),
        "{err}"
    );
    assert_eq!(bits(&b), before);
    let st_after = b.param_state("w").unwrap();
    assert_eq!(st_after.scalars, st_before.scalars);
    for (k, t) in &st_before.tensors {
        assert_eq!(flat(t), flat(&st_after.tensors[k]), "{k}");
    }
    // Without any root yet, a failure keeps the identity (plain SGD direction).
    let cfg = ShampooConfig {
        amortized_computation_config: AmortizedComputation::CoupledNewton {
            max_iterations: 1,
            tolerance: 1e-300,
        },
        lr: 0.1,
        betas: (0.0, 1.0),
        ..Default::default()
    };
    let mut c = driver(shampoo(cfg), shapes, DType::F64);
    let w0 = params(&c)["w"].clone();
    let g = grads(shapes, 1, DType::F64);
    c.step_named(&g).unwrap();
    let g = flat(&g["w"]);
    let w1 = params(&c)["w"].clone();
    for k in 0..w0.len() {
        assert_eq!(w1[k], w0[k] + g[k] * -0.1);
    }
    assert_eq!(
        c.diagnostics()["shampoo_failed_amortized_computations"],
        1.0
    );
}

#[test]
fn save_load_mid_run_is_bit_exact() {
    let shapes: Shapes<'_> = &[("w", &[6, 5]), ("b", &[5]), ("s", &[])];
    let cfg = ShampooConfig {
        lr: 0.01,
        betas: (0.9, 0.99),
        epsilon: 1e-6,
        weight_decay: 0.05,
        precondition_frequency: 3,
        max_preconditioner_dim: DimLimit::Finite(4),
        target_parameter_dimensionality: DimLimit::Finite(2),
        grafting_config: Grafting::Adam {
            beta2: 0.99,
            epsilon: 1e-8,
            drop_weighting_factor_on_gsquare: false,
        },
        iterate_averaging_config: IterateAveraging::ClassicMomentum {
            momentum: 0.9,
            dampening: 0.0,
            use_nesterov: true,
        },
        ..Default::default()
    };
    for dtype in [DType::F64, DType::F32] {
        let mut a = driver(shampoo(cfg.clone()), shapes, dtype);
        let mut b = driver(shampoo(cfg.clone()), shapes, dtype);
        for t in 1..=4 {
            a.step_named(&grads(shapes, t, dtype)).unwrap();
            b.step_named(&grads(shapes, t, dtype)).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        b.save_state(&path).unwrap();
        let vars: Vec<(String, Var)> = b
            .vars()
            .into_iter()
            .map(|(n, v)| (n, Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap()))
            .collect();
        drop(b);
        let mut c = Driver::new(shampoo(cfg.clone()), NamedParams::new(vars).unwrap()).unwrap();
        c.load_state(&path).unwrap();
        for t in 5..=10 {
            a.step_named(&grads(shapes, t, dtype)).unwrap();
            c.step_named(&grads(shapes, t, dtype)).unwrap();
        }
        assert_eq!(bits(&a), bits(&c), "{dtype:?}");
        // f32 factors of an f64 parameter are stored as f64 values.
        let st = c.param_state("w").unwrap();
        assert_eq!(st.tensors["block0.factor_matrix.0"].dtype(), dtype);
    }
}

#[test]
fn state_of_another_blocking_is_refused() {
    let shapes: Shapes<'_> = &[("w", &[6, 5])];
    let cfg = ShampooConfig {
        max_preconditioner_dim: DimLimit::Finite(4),
        target_parameter_dimensionality: DimLimit::Inf,
        ..Default::default()
    };
    let mut a = driver(shampoo(cfg), shapes, DType::F64);
    a.step_named(&grads(shapes, 1, DType::F64)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.safetensors");
    a.save_state(&path).unwrap();
    let other = ShampooConfig {
        max_preconditioner_dim: DimLimit::Finite(3),
        target_parameter_dimensionality: DimLimit::Inf,
        ..Default::default()
    };
    let mut b = driver(shampoo(other), shapes, DType::F64);
    let err = b.load_state(&path).unwrap_err().to_string();
    assert!(err.contains("block"), "{err}");
}

fn golden_hparams() -> serde_json::Map<String, serde_json::Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/shampoo_basic.json"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["hparams"].as_object().unwrap().clone()
}

#[test]
fn reference_hparams_map_and_non_neutral_options_fail() {
    use crate::conformance::map_hparams;
    use serde_json::json;
    let h = golden_hparams();
    let (cfg, _) = map_hparams("shampoo", &h).unwrap();
    let OptimConfig::Shampoo(c) = cfg else {
        panic!("not shampoo")
    };
    assert_eq!(c.target_parameter_dimensionality, DimLimit::Inf);
    assert_eq!(c.factor_matrix_dtype, FactorDtype::Float64);
    assert_eq!(c.precondition_frequency, 2);
    assert!(matches!(c.grafting_config, Grafting::Adam { beta2, .. } if beta2 == 0.95));
    // Variants that map.
    let mapped = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut h = golden_hparams();
        edit(&mut h);
        map_hparams("shampoo", &h)
    };
    let ok = mapped(&|h| {
        h["iterate_averaging_config"] = json!({"type": "ClassicMomentumConfig",
            "momentum": 0.9, "dampening": 0.0, "use_nesterov": true});
        h["grafting_config"] = json!({"type": "RMSpropPreconditionerConfig", "beta2": 0.9,
            "epsilon": 1e-8, "drop_weighting_factor_on_gsquare": false});
        h["preconditioner_config"]["inverse_exponent_override"] = json!({"2": 0.5});
        h["max_preconditioner_dim"] = json!("inf");
    })
    .unwrap()
    .0;
    let OptimConfig::Shampoo(c) = ok else {
        panic!()
    };
    assert_eq!(c.inverse_exponent(2, 1), 0.5);
    assert_eq!(c.max_preconditioner_dim, DimLimit::Inf);
    assert!(mapped(&|h| h["grafting_config"] = json!(null)).is_ok());
    assert!(mapped(&|h| h["grafting_config"] = json!({"type": "SGDPreconditionerConfig"})).is_ok());
    // Non-neutral values of options without an equivalent here fail with a reason.
    type Edit = Box<dyn Fn(&mut serde_json::Map<String, serde_json::Value>)>;
    let bad: Vec<(&str, Edit)> = vec![
        (
            "use_pin_memory",
            Box::new(|h| h["use_pin_memory"] = json!(true)),
        ),
        (
            "shampoo_pt2_compile_config",
            Box::new(|h| {
                h["shampoo_pt2_compile_config"] = json!({"type": "ShampooPT2CompileConfig"})
            }),
        ),
        (
            "distributed_config",
            Box::new(|h| h["distributed_config"]["type"] = json!("DDPDistributedConfig")),
        ),
        (
            "distributed_config",
            Box::new(|h| h["distributed_config"] = json!(null)),
        ),
        (
            "retry_double_precision",
            Box::new(|h| {
                h["preconditioner_config"]["amortized_computation_config"]
                    ["retry_double_precision"] = json!(false)
            }),
        ),
        (
            "eigendecomposition_offload_device",
            Box::new(|h| {
                h["preconditioner_config"]["amortized_computation_config"]
                    ["eigendecomposition_offload_device"] = json!("cpu")
            }),
        ),
        (
            "tolerance",
            Box::new(|h| {
                h["preconditioner_config"]["amortized_computation_config"]["tolerance"] =
                    json!(0.01)
            }),
        ),
        (
            "SpectralDescentPreconditionerConfig",
            Box::new(|h| {
                h["preconditioner_config"]["type"] = json!("SpectralDescentPreconditionerConfig")
            }),
        ),
        (
            "ScheduleFreeConfig",
            Box::new(|h| h["iterate_averaging_config"] = json!({"type": "ScheduleFreeConfig"})),
        ),
        (
            "CoupledHigherOrderConfig",
            Box::new(
                |h| h["preconditioner_config"]["amortized_computation_config"] = json!({"type": "CoupledHigherOrderConfig", "rel_epsilon": 0.0, "abs_epsilon": 0.0}),
            ),
        ),
        (
            "bfloat16",
            Box::new(|h| h["preconditioner_config"]["factor_matrix_dtype"] = json!("bfloat16")),
        ),
        (
            "some_new_option",
            Box::new(|h| h["preconditioner_config"]["some_new_option"] = json!(1)),
        ),
        (
            "some_new_option",
            Box::new(|h| {
                h.insert("some_new_option".into(), json!(1));
            }),
        ),
    ];
    for (what, edit) in bad {
        let err = mapped(&*edit).expect_err(what).to_string();
        assert!(err.contains(what), "{what}: {err}");
    }
}

#[test]
fn golden_case_passes_in_both_dtypes() {
    use crate::conformance::{replay, GoldenCase, Outcome};
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/shampoo_basic.json"
    );
    let case = GoldenCase::load(std::path::Path::new(path)).unwrap();
    for dtype in [DType::F64, DType::F32] {
        match replay(&case, dtype) {
            Outcome::Pass(_) => {}
            Outcome::Fail(why) => panic!("{dtype:?}: {why}"),
        }
    }
}

#[test]
fn pseudo_inverse_and_trace_scaling_run() {
    let shapes: Shapes<'_> = &[("w", &[3, 4])];
    for cfg in [
        toml("epsilon = 0.0\namortized_computation_config = { type = \"pseudo_inverse\" }\nfactor_matrix_dtype = \"float64\""),
        toml("use_trace_scaling = true\nepsilon = 1e-6\nbetas = [0.9, 0.99]"),
        toml("amortized_computation_config = { type = \"coupled_newton\" }\nepsilon = 1e-4\nbetas = [0.0, 0.99]\nfactor_matrix_dtype = \"float64\""),
    ] {
        let mut opt = driver(shampoo(cfg.clone()), shapes, DType::F64);
        for t in 1..=4 {
            opt.step_named(&grads(shapes, t, DType::F64)).unwrap();
        }
        assert!(params(&opt)["w"].iter().all(|x| x.is_finite()), "{cfg:?}");
    }
}
