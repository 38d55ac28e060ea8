//! The preconditioner variants (eigenvalue-corrected, eigendecomposed, KL) against identities
//! that need no reference, their configs, and their golden files.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use super::blocking::{corrected_eigenvalues_key, eigenvectors_key, factor_key, inv_factor_key};
use super::*;
use crate::linalg;
use crate::optim::adamw::AdamStep;
use crate::optim::rule::{Rule, StepCtx};
use crate::optim::state::State;
use crate::optim::testing::{self, flat, max_diff, noise, tensor, Shapes};
use crate::optim::{Driver, OptimConfig, Optimizer, Role};

fn driver(cfg: ShampooConfig, shapes: Shapes<'_>) -> Driver {
    testing::driver(OptimConfig::Shampoo(cfg), shapes, DType::F64, |i, n| {
        noise(11 + i, n)
    })
}

fn grads(shapes: Shapes<'_>, step: u64) -> BTreeMap<String, Tensor> {
    testing::named(shapes, DType::F64, |i, n| noise(500 * step + i, n))
}

fn run(cfg: ShampooConfig, shapes: Shapes<'_>, steps: u64) -> (Driver, BTreeMap<String, Vec<f64>>) {
    let mut opt = driver(cfg, shapes);
    for t in 1..=steps {
        opt.step_named(&grads(shapes, t)).unwrap();
    }
    let params = opt
        .vars()
        .into_iter()
        .map(|(n, v)| (n, flat(v.as_tensor())))
        .collect();
    (opt, params)
}

/// Float64 everywhere, no merging, refreshes every 2 steps from step 6 (every factor full rank).
fn base(kind: PreconditionerKind) -> ShampooConfig {
    ShampooConfig {
        lr: 0.01,
        betas: (0.9, 0.95),
        epsilon: 1e-8,
        precondition_frequency: 2,
        start_preconditioning_step: 6,
        target_parameter_dimensionality: DimLimit::Inf,
        factor_matrix_dtype: FactorDtype::Float64,
        inv_factor_matrix_dtype: FactorDtype::Float64,
        factor_matrix_eigenvectors_dtype: FactorDtype::Float64,
        factor_matrix_eigenvalues_dtype: FactorDtype::Float64,
        corrected_eigenvalues_dtype: FactorDtype::Float64,
        preconditioner: kind,
        ..Default::default()
    }
}

const SHAPES: Shapes<'static> = &[("w", &[5, 3]), ("v", &[4])];

fn worst(a: &BTreeMap<String, Vec<f64>>, b: &BTreeMap<String, Vec<f64>>) -> f64 {
    a.iter()
        .map(|(n, x)| max_diff(x, &b[n]))
        .fold(0.0, f64::max)
}

#[test]
fn eigendecomposed_forms_follow_the_root_inverse_forms() {
    // The root rebuilt from (λ, Q) at every use is the root computed at the refresh.
    for (eig, root) in [
        (
            PreconditionerKind::Eigendecomposed,
            PreconditionerKind::RootInv,
        ),
        (
            PreconditionerKind::EigendecomposedKl,
            PreconditionerKind::RootInvKl,
        ),
    ] {
        let (_, a) = run(base(eig), SHAPES, 12);
        let (_, b) = run(base(root), SHAPES, 12);
        let d = worst(&a, &b);
        assert!(d < 1e-12, "{eig:?} vs {root:?}: {d:e}");
    }
    // …and KL moves the trajectory (the test above is not comparing two identical runs).
    let (_, kl) = run(base(PreconditionerKind::RootInvKl), SHAPES, 12);
    let (_, plain) = run(base(PreconditionerKind::RootInv), SHAPES, 12);
    assert!(worst(&kl, &plain) > 1e-5);
}

#[test]
fn eigendecomposed_initial_state_is_epsilon_scaled_above_one() {
    // Stored eigenvalues start at one: before any refresh P = I for ε ≤ 1, but ε^(−e)·I for
    // ε > 1 (the reference's trap). A matrix with e = 1/4 per side gets ε^(−1/2)·Ḡ.
    let never = |kind, epsilon| ShampooConfig {
        precondition_frequency: 100,
        start_preconditioning_step: -1,
        epsilon,
        ..base(kind)
    };
    let shapes: Shapes<'_> = &[("w", &[4, 3])];
    let start = flat(&testing::named(shapes, DType::F64, |i, n| noise(11 + i, n))["w"]);
    let delta = |kind, epsilon| {
        let (_, p) = run(never(kind, epsilon), shapes, 1);
        p["w"]
            .iter()
            .zip(&start)
            .map(|(a, b)| a - b)
            .collect::<Vec<f64>>()
    };
    let plain = delta(PreconditionerKind::RootInv, 4.0);
    let eig = delta(PreconditionerKind::Eigendecomposed, 4.0);
    let small = delta(PreconditionerKind::Eigendecomposed, 0.5);
    for k in 0..plain.len() {
        assert!((eig[k] - 0.5 * plain[k]).abs() < 1e-15, "{k}");
        assert_eq!(small[k], plain[k], "{k}");
    }
}

#[test]
fn kl_factor_of_a_rank_one_gradient() {
    // G = u vᵀ every step, β1 = 0, refreshes every step (f = s = 1). Step 1 has no root yet:
    // L1 = w|v|²uuᵀ, R1 = w|u|²vvᵀ with w = 1 − β2, and the refresh gives
    // P_R = (R1/bc2 + εI)^(−1/4), so vᵀP_R²v = |v|²(|u|²|v|² + ε)^(−1/2) (v is an eigenvector).
    // KL step 2: L2 = β2·L1 + w·G P_R² Gᵀ = (β2·w|v|² + w|v|²(|u|²|v|² + ε)^(−1/2))·uuᵀ,
    // where plain Shampoo adds w·G Gᵀ = w|v|²uuᵀ.
    let (b2, eps) = (0.9, 1e-3);
    let u = [0.5, -1.0, 2.0];
    let v = [1.5, 0.25, -0.75, 1.0];
    let g: Vec<f64> = u
        .iter()
        .flat_map(|a| v.iter().map(move |b| a * b))
        .collect();
    let cfg = |kind| ShampooConfig {
        betas: (0.0, b2),
        epsilon: eps,
        precondition_frequency: 1,
        start_preconditioning_step: 1,
        ..base(kind)
    };
    let (uu, vv) = (
        u.iter().map(|x| x * x).sum::<f64>(),
        v.iter().map(|x| x * x).sum::<f64>(),
    );
    let w = 1.0 - b2;
    let whitened = vv / (uu * vv + eps).sqrt();
    let left = |kind| {
        let mut opt = driver(cfg(kind), &[("w", &[3, 4])]);
        let mut grads = BTreeMap::new();
        grads.insert("w".to_string(), tensor(g.clone(), &[3, 4], DType::F64));
        opt.step_named(&grads).unwrap();
        opt.step_named(&grads).unwrap();
        flat(&opt.param_state("w").unwrap().tensors[&factor_key(0, 0)])
    };
    for (kind, scale) in [
        (PreconditionerKind::RootInvKl, b2 * w * vv + w * whitened),
        (
            PreconditionerKind::EigendecomposedKl,
            b2 * w * vv + w * whitened,
        ),
        (PreconditionerKind::RootInv, b2 * w * vv + w * vv),
    ] {
        let l = left(kind);
        for i in 0..3 {
            for j in 0..3 {
                let want = scale * u[i] * u[j];
                assert!(
                    (l[i * 3 + j] - want).abs() <= 1e-13 * (1.0 + want.abs()),
                    "{kind:?} L[{i},{j}] = {} vs {want}",
                    l[i * 3 + j]
                );
            }
        }
    }
}

/// A random orthogonal matrix (the Q factor of a random square matrix), row-major.
fn orthogonal(n: usize, seed: u64) -> Tensor {
    let a = tensor(noise(seed, n * n), &[n, n], DType::F64);
    linalg::qr_q(&a).unwrap().value().unwrap()
}

#[test]
fn eigenvalue_corrected_with_a_frozen_basis_is_adam_in_the_rotated_basis() {
    // A basis put in the state and never refreshed: the steps are Adam's (torch AdamW form,
    // no decay) on Q_Lᵀ W Q_R with gradients Q_Lᵀ G Q_R.
    let cfg = ShampooConfig {
        precondition_frequency: 1000,
        start_preconditioning_step: -1,
        ..base(PreconditionerKind::EigenvalueCorrected)
    };
    let rule = Shampoo(cfg.clone());
    let (m, n) = (5, 3);
    let meta = ParamMeta {
        name: "w".into(),
        shape: vec![m, n],
        role: Role::Matrix,
    };
    let (ql, qr) = (orthogonal(m, 3), orthogonal(n, 4));
    let w = Var::from_tensor(&tensor(noise(5, m * n), &[m, n], DType::F64)).unwrap();
    let mut state = State::default();
    state.tensors.insert(eigenvectors_key(0, 0), ql.clone());
    state.tensors.insert(eigenvectors_key(0, 1), qr.clone());
    let rotate = |x: &Tensor| ql.t().unwrap().matmul(x).unwrap().matmul(&qr).unwrap();
    let rotated = Var::from_tensor(&rotate(w.as_tensor())).unwrap();
    let (m1, m2) = (
        rotated.as_tensor().zeros_like().unwrap(),
        rotated.as_tensor().zeros_like().unwrap(),
    );
    let group = State::default();
    for t in 1..=10u64 {
        let g = tensor(noise(40 + t, m * n), &[m, n], DType::F64);
        let ctx = StepCtx {
            lr: cfg.lr,
            lr_factor: 1.0,
            weight_decay: 0.0,
            step: t,
            group: &group,
        };
        rule.update(&ctx, &meta, &w, &g, &mut state).unwrap();
        AdamStep {
            lr: cfg.lr,
            beta1: cfg.betas.0,
            beta2: cfg.betas.1,
            eps: cfg.epsilon,
            weight_decay: 0.0,
            t,
            maximize: false,
        }
        .apply(&rotated, &rotate(&g), &m1, &m2, None)
        .unwrap();
        let back = ql
            .matmul(rotated.as_tensor())
            .unwrap()
            .matmul(&qr.t().unwrap())
            .unwrap();
        let d = max_diff(&flat(w.as_tensor()), &flat(&back));
        assert!(d < 1e-13, "step {t}: {d:e}");
        // C is Adam's second moment of the rotated gradients.
        let d = max_diff(
            &flat(&state.tensors[&corrected_eigenvalues_key(0)]),
            &flat(&m2),
        );
        assert!(d < 1e-15, "step {t}: C vs v {d:e}");
    }
}

#[test]
fn eigenvalue_corrected_without_rotation_is_adam() {
    // Every dim ignored, or an adaptive refresh that always keeps the identity: Adam.
    let adam = |shapes: Shapes<'_>| {
        let vars: Vec<(String, Var)> = testing::named(shapes, DType::F64, |i, n| noise(11 + i, n))
            .into_iter()
            .map(|(n, t)| (n, Var::from_tensor(&t).unwrap()))
            .collect();
        let moments: Vec<(Tensor, Tensor)> = vars
            .iter()
            .map(|(_, v)| {
                (
                    v.as_tensor().zeros_like().unwrap(),
                    v.as_tensor().zeros_like().unwrap(),
                )
            })
            .collect();
        for t in 1..=12 {
            let g = grads(shapes, t);
            for ((n, v), (m, s)) in vars.iter().zip(&moments) {
                AdamStep {
                    lr: 0.01,
                    beta1: 0.9,
                    beta2: 0.95,
                    eps: 1e-8,
                    weight_decay: 0.0,
                    t,
                    maximize: false,
                }
                .apply(v, &g[n], m, s, None)
                .unwrap();
            }
        }
        vars.into_iter()
            .map(|(n, v)| (n, flat(v.as_tensor())))
            .collect::<BTreeMap<_, _>>()
    };
    let reference = adam(SHAPES);
    let ignored = ShampooConfig {
        ignored_basis_change_dims: [("1".to_string(), vec![0]), ("2".to_string(), vec![0, 1])]
            .into(),
        ..base(PreconditionerKind::EigenvalueCorrected)
    };
    let (opt, p) = run(ignored, SHAPES, 12);
    assert!(worst(&p, &reference) < 1e-14, "{:e}", worst(&p, &reference));
    assert!(opt
        .param_state("w")
        .unwrap()
        .tensors
        .keys()
        .all(|k| !k.contains("factor_matrix")));
    let kept = ShampooConfig {
        amortized_computation_config: AmortizedComputation::Eigen {
            perturb_before_computation: true,
            tolerance: 1.0,
        },
        ..base(PreconditionerKind::EigenvalueCorrected)
    };
    let (_, p) = run(kept, SHAPES, 12);
    assert!(worst(&p, &reference) < 1e-14, "{:e}", worst(&p, &reference));
    // With refreshes the basis turns: far from Adam.
    let (_, p) = run(base(PreconditionerKind::EigenvalueCorrected), SHAPES, 12);
    assert!(worst(&p, &reference) > 1e-4);
}

#[test]
fn qr_refreshes_converge_to_the_eigh_basis() {
    // Many QR-algorithm steps per refresh reach the eigenbasis (ascending, like eigh); one step
    // per refresh is only an approximation early on.
    let qr = |iterations| ShampooConfig {
        amortized_computation_config: AmortizedComputation::Qr {
            perturb_before_computation: true,
            max_iterations: iterations,
            tolerance: 1e-14,
        },
        ..base(PreconditionerKind::EigenvalueCorrected)
    };
    let (_, eigh) = run(base(PreconditionerKind::EigenvalueCorrected), SHAPES, 12);
    // The unshifted QR algorithm converges like (λ_{i+1}/λ_i)^iterations: w's factors have
    // close eigenvalues (500 steps leave 1.7e-6; 5000 leave 1.3e-9, the accuracy of the
    // eigenvectors of close eigenvalues, ~ε·‖A‖/gap, carried through 12 steps).
    let (_, many) = run(qr(5000), SHAPES, 12);
    let (_, one) = run(qr(1), SHAPES, 12);
    assert!(worst(&many, &eigh) < 1e-8, "{:e}", worst(&many, &eigh));
    assert!(worst(&one, &eigh) > 1e-6, "{:e}", worst(&one, &eigh));
    // The QR eigendecomposed form against the eigh one, likewise.
    let eig_qr = ShampooConfig {
        preconditioner: PreconditionerKind::Eigendecomposed,
        ..qr(5000)
    };
    let (_, a) = run(eig_qr, SHAPES, 12);
    let (_, b) = run(base(PreconditionerKind::Eigendecomposed), SHAPES, 12);
    assert!(worst(&a, &b) < 1e-8, "{:e}", worst(&a, &b));
}

#[test]
fn first_qr_refresh_from_the_identity_is_the_q_factor() {
    // From the identity, one QR step gives the Q factor of A + εI with its columns sorted by
    // the diagonal of R·Q: Qᵀ(A + εI) is upper triangular up to that column order.
    let cfg = ShampooConfig {
        amortized_computation_config: AmortizedComputation::Qr {
            perturb_before_computation: true,
            max_iterations: 1,
            tolerance: 0.0,
        },
        ..base(PreconditionerKind::EigenvalueCorrected)
    };
    let (opt, _) = run(cfg.clone(), SHAPES, 6);
    let st = opt.param_state("w").unwrap();
    let q = &st.tensors[&eigenvectors_key(0, 0)];
    let f = &st.tensors[&factor_key(0, 0)];
    let bc2 = 1.0 - 0.95f64.powi(6);
    let a = ((f / bc2).unwrap()
        + (Tensor::eye(5, DType::F64, f.device()).unwrap() * 1e-8).unwrap())
    .unwrap();
    let r = flat(&q.t().unwrap().matmul(&a).unwrap());
    // Some ordering of Q's columns makes R upper triangular: each row of R (a column of Q)
    // has a distinct number of leading zeros.
    let mut zeros: Vec<usize> = (0..5)
        .map(|i| (0..5).take_while(|&j| r[i * 5 + j].abs() < 1e-12).count())
        .collect();
    zeros.sort();
    assert_eq!(zeros, vec![0, 1, 2, 3, 4], "{r:?}");
    assert!(!st.tensors.contains_key(&inv_factor_key(0, 0)));
}

#[test]
fn variant_configs_are_checked() {
    let cases: Vec<(&str, &str)> = vec![
        (
            "amortized_computation_config = { type = \"qr\" }",
            "shampoo.amortized_computation_config",
        ),
        (
            "amortized_computation_config = { type = \"eigen\", tolerance = 0.1 }",
            "shampoo.amortized_computation_config.tolerance",
        ),
        (
            "preconditioner = \"root_inv_kl\"\namortized_computation_config = { type = \"eigen\", tolerance = 0.1 }",
            "shampoo.amortized_computation_config.tolerance",
        ),
        (
            "preconditioner = \"eigenvalue_corrected\"\namortized_computation_config = { type = \"qr\", max_iterations = 0 }",
            "shampoo.amortized_computation_config.max_iterations",
        ),
        (
            "preconditioner = \"eigenvalue_corrected\"\namortized_computation_config = { type = \"qr\", max_iterations = 1152921504606846976 }",
            "shampoo.amortized_computation_config.max_iterations",
        ),
        (
            "preconditioner = \"eigenvalue_corrected\"\namortized_computation_config = { type = \"qr\", tolerance = -1.0 }",
            "shampoo.amortized_computation_config.tolerance",
        ),
        (
            "preconditioner = \"eigenvalue_corrected\"\nepsilon = 0.0\namortized_computation_config = { type = \"pseudo_inverse\" }",
            "shampoo.amortized_computation_config",
        ),
        (
            "preconditioner = \"eigendecomposed\"\namortized_computation_config = { type = \"coupled_newton\" }",
            "shampoo.amortized_computation_config",
        ),
        (
            "preconditioner = \"eigenvalue_corrected\"\ninverse_exponent_override = { 2 = { 0 = 0.5 } }",
            "shampoo.inverse_exponent_override.2",
        ),
        (
            "ignored_basis_change_dims = { 1 = [0] }",
            "shampoo.ignored_basis_change_dims",
        ),
        (
            "preconditioner = \"eigenvalue_corrected\"\nignored_basis_change_dims = { 2 = [2] }",
            "shampoo.ignored_basis_change_dims.2",
        ),
        (
            "preconditioner = \"eigenvalue_corrected\"\nignored_basis_change_dims = { two = [0] }",
            "shampoo.ignored_basis_change_dims",
        ),
    ];
    for (text, field) in cases {
        let err = OptimConfig::from_toml(&format!("name = \"shampoo\"\n{text}"))
            .expect_err(text)
            .to_string();
        assert!(err.contains(&format!("`{field}`")), "{text}: {err}");
    }
    assert!(OptimConfig::from_toml("name = \"shampoo\"\npreconditioner = \"soap\"").is_err());
    // The reference's class names are accepted, and serialize back to the short names.
    for (class, kind) in [
        (
            "EigenvalueCorrectedShampooPreconditionerConfig",
            PreconditionerKind::EigenvalueCorrected,
        ),
        (
            "RootInvKLShampooPreconditionerConfig",
            PreconditionerKind::RootInvKl,
        ),
        (
            "EigendecomposedKLShampooPreconditionerConfig",
            PreconditionerKind::EigendecomposedKl,
        ),
    ] {
        let cfg = OptimConfig::from_toml(&format!(
            "name = \"shampoo\"\npreconditioner_config = \"{class}\""
        ))
        .unwrap();
        let OptimConfig::Shampoo(c) = &cfg else {
            panic!()
        };
        assert_eq!(c.preconditioner, kind);
        let back = OptimConfig::from_json(serde_json::from_str(&cfg.to_json()).unwrap()).unwrap();
        assert_eq!(back.to_json(), cfg.to_json());
    }
    // The defaults of the eigenvalue-corrected form: exponent 1/2 for every order.
    let ec = base(PreconditionerKind::EigenvalueCorrected);
    assert_eq!(ec.inverse_exponent(2, 0), 0.5);
    assert_eq!(ec.inverse_exponent(3, 2), 0.5);
}

#[test]
fn variant_state_is_checked_and_round_trips() {
    for kind in [
        PreconditionerKind::EigenvalueCorrected,
        PreconditionerKind::Eigendecomposed,
        PreconditionerKind::EigendecomposedKl,
        PreconditionerKind::RootInvKl,
    ] {
        let cfg = ShampooConfig {
            max_preconditioner_dim: DimLimit::Finite(3),
            ..base(kind)
        };
        let (mut a, _) = run(cfg.clone(), SHAPES, 7);
        let saved = a.state_dict().unwrap();
        let mut b = driver(cfg.clone(), SHAPES);
        for (n, v) in a.vars() {
            let other: BTreeMap<String, Var> = b.vars().into_iter().collect();
            other[&n].set(v.as_tensor()).unwrap();
        }
        b.load_state_dict(saved.clone()).unwrap();
        for t in 8..=10 {
            a.step_named(&grads(SHAPES, t)).unwrap();
            b.step_named(&grads(SHAPES, t)).unwrap();
        }
        let bits = |o: &Driver| {
            o.vars()
                .into_iter()
                .map(|(_, v)| flat(v.as_tensor()).iter().map(|x| x.to_bits()).collect())
                .collect::<Vec<Vec<u64>>>()
        };
        assert_eq!(bits(&a), bits(&b), "{kind:?}");
        // Another blocking refuses the state.
        let other = ShampooConfig {
            max_preconditioner_dim: DimLimit::Finite(4),
            ..base(kind)
        };
        let mut c = driver(other, SHAPES);
        assert!(c.load_state_dict(saved).is_err(), "{kind:?}");
    }
}

#[test]
fn golden_variants_pass_in_both_dtypes() {
    use crate::conformance::{replay, GoldenCase, Outcome};
    for file in ["shampoo_eigenvalue_corrected.json", "shampoo_kl.json"] {
        let path = format!("{}/tests/golden/{file}", env!("CARGO_MANIFEST_DIR"));
        let case = GoldenCase::load(std::path::Path::new(&path)).unwrap();
        for dtype in [DType::F64, DType::F32] {
            match replay(&case, dtype) {
                Outcome::Pass(_) => {}
                Outcome::Fail(why) => panic!("{file} {dtype:?}: {why}"),
            }
        }
    }
}
