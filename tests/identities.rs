//! Identities between optimizers that need no reference: each side is a different config (and
//! for the first, a different registered optimizer) that must produce the same trajectory.

mod common;

use common::*;
use optlab::optim::{OptimConfig, Optimizer};

fn trajectory(config: &str, steps: u64) -> Vec<(String, Vec<u64>)> {
    let vars = model_params(candle_core::DType::F64);
    let cfg = OptimConfig::from_toml(config).unwrap();
    let mut opt =
        optlab::optim::Driver::new(cfg, optlab::optim::NamedParams::new(vars.to_vec()).unwrap())
            .unwrap();
    for s in 1..=steps {
        opt.step_named(&grads_for(&vars, s)).unwrap();
    }
    snapshot(&opt)
}

#[test]
fn normuon_without_row_normalization_is_dions_muon() {
    // dion's shared hyperparameters, off their defaults, on every parameter role of the model.
    let shared = "lr = 0.03\nweight_decay = 0.05\nnesterov = true\ncautious_wd = true\n\
                  adjust_lr = \"rms_norm\"\nepsilon = 1e-7";
    let normuon = |normalize: bool| {
        format!(
            "name = \"normuon\"\n{shared}\nmu = 0.9\nbetas = [0.8, 0.9]\nnormalize = {normalize}"
        )
    };
    let muon = format!(
        "name = \"muon\"\nform = \"dion\"\n{shared}\nmomentum = 0.9\nadam_lr = 0.03\n\
         adam_betas = [0.8, 0.9]\nadam_eps = 1e-7\nadam_weight_decay = 0.05"
    );
    let plain = trajectory(&normuon(false), 5);
    assert_eq!(plain, trajectory(&muon, 5));
    // The normalization is what differs: the matrices move differently, the rest does not.
    let normalized = trajectory(&normuon(true), 5);
    for ((name, a), (_, b)) in plain.iter().zip(&normalized) {
        let is_matrix = name.contains("attn.q") || name.contains("mlp.fc.weight");
        assert_eq!(a != b, is_matrix, "{name}");
    }
}

#[test]
fn keller_jordan_muon_is_unchanged_by_the_dion_fields_defaults() {
    let kj = trajectory("name = \"muon\"\nlr = 0.02", 3);
    let explicit = trajectory("name = \"muon\"\nlr = 0.02\nform = \"keller_jordan\"", 3);
    assert_eq!(kj, explicit);
    let err = OptimConfig::from_toml("name = \"muon\"\nadjust_lr = \"spectral_norm\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("muon.adjust_lr"), "{err}");
    let err = OptimConfig::from_toml("name = \"muon\"\nform = \"dion\"\nns_steps = 6")
        .unwrap_err()
        .to_string();
    assert!(err.contains("muon.ns_steps"), "{err}");
}

#[test]
fn cautious_adamw_with_agreeing_signs_is_adamw() {
    // Gradients whose signs never change per coordinate keep m·g > 0: the mask is all ones.
    let vars = model_params(candle_core::DType::F64);
    let run = |config: &str| {
        let cfg = OptimConfig::from_toml(config).unwrap();
        let mut opt = optlab::optim::Driver::new(
            cfg,
            optlab::optim::NamedParams::new(copy_vars(&vars)).unwrap(),
        )
        .unwrap();
        let base = grads_for(&vars, 1);
        for s in 1..=5u64 {
            let g = base
                .iter()
                .map(|(n, t)| (n.clone(), (t * (1.0 + s as f64 * 0.3)).unwrap()))
                .collect();
            opt.step_named(&g).unwrap();
        }
        opt.vars()
            .into_iter()
            .map(|(_, v)| values_of(v.as_tensor()))
            .collect::<Vec<_>>()
    };
    let hp = "lr = 0.01\nbetas = [0.9, 0.99]\neps = 1e-6\nweight_decay = 0.1";
    let cautious = run(&format!("name = \"cautious_adamw\"\n{hp}"));
    let adamw = run(&format!("name = \"adamw\"\n{hp}"));
    for (a, b) in cautious.iter().zip(&adamw) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-15 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }
}

/// PSGD Kron that never updates its preconditioner keeps `P = S²·I`; with `S = 1` its step is
/// the clipped momentum: `m` a running mean capped at `momentum` (`β = 0, ½, ⅔, …`), so for
/// `momentum ≤ ½` it is SGD with momentum = dampening (torch's first step takes `buf = g`).
#[test]
fn psgd_kron_without_preconditioner_updates_is_momentum_sgd() {
    let psgd = "name = \"psgd_kron\"\nlr_params = 0.03\nmomentum = 0.5\n\
                preconditioner_update_probability = 0.0\npreconditioner_init_scale = 1.0\n\
                preconditioner_max_skew = 2.0\ngrad_clip_max_amps = [100.0, 100.0]";
    let sgd = "name = \"sgd\"\nlr = 0.03\nmomentum = 0.5\ndampening = 0.5";
    assert_eq!(trajectory(psgd, 6), trajectory(sgd, 6));
}

/// Without momentum the step is the gradient clipped per tensor: its RMS to `c1`, then each
/// element to `±c2`.
#[test]
fn psgd_kron_without_preconditioner_updates_clips_like_the_spec() {
    let (lr, c1, c2) = (0.03, 0.3, 0.25);
    let psgd = format!(
        "name = \"psgd_kron\"\nlr_params = {lr}\npreconditioner_update_probability = 0.0\n\
         preconditioner_init_scale = 1.0\ngrad_clip_max_amps = [{c1}, {c2}]"
    );
    let vars = model_params(candle_core::DType::F64);
    let mut want: Vec<Vec<f64>> = vars.iter().map(|(_, v)| values_of(v)).collect();
    let mut fired = false;
    for s in 1..=4 {
        let grads = grads_for(&vars, s);
        for ((name, _), p) in vars.iter().zip(&mut want) {
            let g: Vec<f64> = grads[name].flatten_all().unwrap().to_vec1().unwrap();
            let rms = (g.iter().map(|x| x * x).sum::<f64>() / g.len() as f64).sqrt();
            let scale = if rms > c1 { c1 / rms } else { 1.0 };
            fired |= scale < 1.0 || g.iter().any(|x| (x * scale).abs() > c2);
            for (p, g) in p.iter_mut().zip(&g) {
                *p -= lr * (g * scale).clamp(-c2, c2);
            }
        }
    }
    let got: std::collections::BTreeMap<String, Vec<u64>> =
        trajectory(&psgd, 4).into_iter().collect();
    let mut clipped = 0;
    for ((name, _), want) in vars.iter().zip(&want) {
        for (g, w) in got[name].iter().zip(want) {
            let g = f64::from_bits(*g);
            assert!((g - w).abs() <= 1e-15, "{name}: {g} vs {w}");
        }
        clipped += 1;
    }
    assert_eq!(clipped, vars.len());
    assert!(fired, "the clip bounds must bind somewhere");
}
