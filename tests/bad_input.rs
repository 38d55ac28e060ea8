//! Bad input never panics and never changes anything: invalid configs, wrong shapes, NaN
//! gradients, foreign or corrupt state files, inconsistent groups.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use common::*;
use optlab::optim::{
    Driver, GroupSpec, NamedParams, NonFinitePolicy, OptimConfig, Optimizer, OptimizerSpec, Role,
};
use optlab::Error;

#[test]
fn negative_lr_is_rejected_naming_the_field() {
    for name in OptimConfig::NAMES {
        let mut cfg = OptimConfig::default_for(name).unwrap();
        cfg.validate()
            .unwrap_or_else(|e| panic!("{name} default config invalid: {e}"));
        cfg.set_lr(-1.0);
        match cfg.validate() {
            Err(Error::Config { field, .. }) => assert!(field.contains("lr"), "{name}: {field}"),
            other => panic!("{name}: negative lr gave {other:?}"),
        }
        let vars = model_params(DType::F32);
        assert!(Driver::new(cfg, NamedParams::new(vars).unwrap()).is_err());
    }
}

#[test]
fn config_errors_name_the_field() {
    let err = OptimConfig::from_toml("name = \"adamw\"\nbetas = [0.9, 1.0]").unwrap_err();
    assert!(err.to_string().contains("adamw.betas[1]"), "{err}");
    let err = OptimConfig::from_toml("name = \"adamw\"\neps = 0.0").unwrap_err();
    assert!(err.to_string().contains("adamw.eps"), "{err}");
    let err = OptimConfig::from_toml("name = \"adamw\"\nlearning_rate = 0.1").unwrap_err();
    assert!(err.to_string().contains("learning_rate"), "{err}");
    let err = OptimConfig::from_toml("name = \"no_such_optimizer\"").unwrap_err();
    assert!(err.to_string().contains("no_such_optimizer"), "{err}");
}

type Grads = BTreeMap<String, Tensor>;

/// Every state tensor and scalar, as bit patterns, keyed by `entry.field`.
fn state_bits(opt: &dyn Optimizer) -> BTreeMap<String, Vec<u64>> {
    let sd = opt.state_dict().unwrap();
    let mut out = BTreeMap::new();
    for (key, st) in &sd.entries {
        for (f, t) in &st.tensors {
            out.insert(
                format!("{key}.{f}"),
                values_of(t).iter().map(|x| x.to_bits()).collect(),
            );
        }
        for (f, v) in &st.scalars {
            out.insert(format!("{key}.#{f}"), vec![v.to_bits()]);
        }
    }
    out
}

fn unchanged_after_error(name: &str, bad: &dyn Fn(&Grads) -> Grads) -> Error {
    let vars = model_params(DType::F64);
    let mut opt = driver(name, &vars);
    synthetic_step(&mut opt, &vars, 1);
    let before = snapshot(&opt);
    let state_before = state_bits(&opt);
    let err = opt.step_named(&bad(&grads_for(&vars, 2))).unwrap_err();
    assert_eq!(
        before,
        snapshot(&opt),
        "{name}: parameters changed by a refused step"
    );
    assert_eq!(opt.step_count(), 1, "{name}");
    assert_eq!(state_before, state_bits(&opt), "{name}: state changed");
    err
}

#[test]
fn wrong_gradient_shape_is_refused_before_anything_changes() {
    for name in OptimConfig::NAMES {
        let err = unchanged_after_error(name, &|g| {
            let mut g = g.clone();
            g.insert(
                "blocks.0.mlp.fc.weight".into(),
                tensor(9, &[6, 12], DType::F64),
            );
            g
        });
        assert!(matches!(err, Error::Shape { .. }), "{name}: {err}");
        assert!(err.to_string().contains("blocks.0.mlp.fc.weight"), "{err}");
    }
}

#[test]
fn nan_gradient_is_refused_before_anything_changes() {
    for name in OptimConfig::NAMES {
        let err = unchanged_after_error(name, &|g| {
            let mut g = g.clone();
            let mut v = values_of(&g["lm_head.weight"]);
            v[3] = f64::NAN;
            g.insert(
                "lm_head.weight".into(),
                Tensor::from_vec(v, (11, 6), &candle_core::Device::Cpu).unwrap(),
            );
            g
        });
        assert!(
            matches!(err, Error::NonFiniteGradient { .. }),
            "{name}: {err}"
        );
        assert!(err.to_string().contains("lm_head.weight"), "{err}");
    }
}

/// With several bad gradients, the first one in parameter-name order decides the error (the
/// finiteness checks run as one batch, after the shape checks, but report as if in order).
#[test]
fn the_first_bad_gradient_in_name_order_decides_the_error() {
    let nan_in = |g: &Grads, name: &str, shape: (usize, usize)| -> Tensor {
        let mut v = values_of(&g[name]);
        v[0] = f64::NAN;
        Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
    };
    // NaN in blocks.0.attn.q.weight (sorted before blocks.0.mlp.fc.weight), shape error after.
    let err = unchanged_after_error("adamw", &|g| {
        let mut g = g.clone();
        g.insert(
            "blocks.0.attn.q.weight".into(),
            nan_in(&g, "blocks.0.attn.q.weight", (6, 6)),
        );
        g.insert(
            "blocks.0.mlp.fc.weight".into(),
            tensor(9, &[6, 12], DType::F64),
        );
        g
    });
    assert!(matches!(err, Error::NonFiniteGradient { .. }), "{err}");
    assert!(err.to_string().contains("blocks.0.attn.q.weight"), "{err}");
    // Shape error in blocks.0.mlp.fc.weight, NaN after it (lm_head.weight): the shape wins.
    let err = unchanged_after_error("adamw", &|g| {
        let mut g = g.clone();
        g.insert(
            "lm_head.weight".into(),
            nan_in(&g, "lm_head.weight", (11, 6)),
        );
        g.insert(
            "blocks.0.mlp.fc.weight".into(),
            tensor(9, &[6, 12], DType::F64),
        );
        g
    });
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    // Two NaNs: the first by name.
    let err = unchanged_after_error("adamw", &|g| {
        let mut g = g.clone();
        g.insert(
            "lm_head.weight".into(),
            nan_in(&g, "lm_head.weight", (11, 6)),
        );
        g.insert(
            "blocks.0.attn.q.weight".into(),
            nan_in(&g, "blocks.0.attn.q.weight", (6, 6)),
        );
        g
    });
    assert!(err.to_string().contains("blocks.0.attn.q.weight"), "{err}");
}

#[test]
fn skip_policy_skips_the_whole_step_and_counts_it() {
    let vars = model_params(DType::F32);
    let mut opt = driver("adamw", &vars).with_nonfinite_policy(NonFinitePolicy::Skip);
    synthetic_step(&mut opt, &vars, 1);
    let before = snapshot(&opt);
    let mut g = grads_for(&vars, 2);
    g.insert(
        "blocks.0.norm.weight".into(),
        Tensor::new(&[f32::INFINITY; 6], &candle_core::Device::Cpu).unwrap(),
    );
    opt.step_named(&g).unwrap();
    assert_eq!(before, snapshot(&opt));
    assert_eq!(opt.step_count(), 1);
    assert_eq!(opt.skipped_steps(), 1);
    assert_eq!(opt.diagnostics()["skipped_steps"], 1.0);
}

#[test]
fn missing_gradients_skip_only_those_parameters() {
    let vars = model_params(DType::F64);
    let mut opt = driver("adamw", &vars);
    let before = snapshot(&opt);
    let mut g = grads_for(&vars, 1);
    g.remove("wte.weight");
    opt.step_named(&g).unwrap();
    let after = snapshot(&opt);
    for ((n, a), (_, b)) in before.iter().zip(&after) {
        assert_eq!(n == "wte.weight", a == b, "{n}");
    }
    assert!(opt.param_state("wte.weight").unwrap().is_empty());
}

#[test]
fn gradient_for_an_unknown_parameter_is_an_error() {
    let vars = model_params(DType::F64);
    let mut opt = driver("adamw", &vars);
    let mut g = grads_for(&vars, 1);
    g.insert("nope".into(), tensor(1, &[2], DType::F64));
    assert!(opt.step_named(&g).unwrap_err().to_string().contains("nope"));
}

#[test]
fn state_of_another_optimizer_or_parameter_set_is_refused() {
    let vars = model_params(DType::F64);
    let mut a = driver("adamw", &vars);
    synthetic_step(&mut a, &vars, 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    a.save_state(&path).unwrap();

    for other in OptimConfig::NAMES.iter().filter(|n| **n != "adamw") {
        let mut b = driver(other, &copy_vars(&vars));
        let err = b.load_state(&path).unwrap_err();
        assert!(err.to_string().contains("adamw"), "{other}: {err}");
    }

    let mut fewer = copy_vars(&vars);
    fewer.pop();
    let mut c = driver("adamw", &fewer);
    let err = c.load_state(&path).unwrap_err();
    assert!(err.to_string().contains("another parameter set"), "{err}");
}

#[test]
fn truncated_or_garbage_state_files_give_clear_errors() {
    let vars = model_params(DType::F64);
    let mut a = driver("adamw", &vars);
    synthetic_step(&mut a, &vars, 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    a.save_state(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let before = snapshot(&a);
    for (label, data) in [
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("empty", Vec::new()),
        ("garbage", b"definitely not safetensors".to_vec()),
    ] {
        let p = dir.path().join(label);
        std::fs::write(&p, &data).unwrap();
        let err = a.load_state(&p).unwrap_err();
        assert!(err.to_string().contains(label), "{label}: {err}");
    }
    assert!(a.load_state(&dir.path().join("missing")).is_err());
    // Failed loads leave the optimizer as it was.
    assert_eq!(before, snapshot(&a));
    assert_eq!(a.step_count(), 1);
}

#[test]
fn groups_must_not_overlap_and_name_patterns_must_match() {
    let vars = model_params(DType::F64);
    let spec = OptimizerSpec {
        optimizer: OptimConfig::default_for("adamw").unwrap(),
        groups: vec![
            GroupSpec {
                roles: vec![Role::Norm],
                weight_decay: Some(0.0),
                ..Default::default()
            },
            GroupSpec {
                names: vec!["blocks.0.*".into()],
                lr: Some(0.1),
                ..Default::default()
            },
        ],
    };
    let err = Driver::new(spec, NamedParams::new(vars.clone()).unwrap())
        .err()
        .unwrap();
    assert!(err.to_string().contains("blocks.0.norm.weight"), "{err}");

    let spec = OptimizerSpec {
        optimizer: OptimConfig::default_for("adamw").unwrap(),
        groups: vec![GroupSpec {
            names: vec!["decoder.*".into()],
            ..Default::default()
        }],
    };
    let err = Driver::new(spec, NamedParams::new(vars).unwrap())
        .err()
        .unwrap();
    assert!(err.to_string().contains("decoder.*"), "{err}");
}

#[test]
fn groups_route_parameters_and_hyperparameters() {
    let vars = model_params(DType::F64);
    let toml = r#"
        [optimizer]
        name = "adamw"
        lr = 0.01
        weight_decay = 0.1

        [[groups]]
        label = "no_decay"
        roles = ["norm", "bias"]
        weight_decay = 0.0

        [[groups]]
        label = "head"
        names = ["lm_head.*"]
        lr = 0.03
    "#;
    let spec: OptimizerSpec = toml::from_str(toml).unwrap();
    let opt = Driver::new(spec, NamedParams::new(vars).unwrap()).unwrap();
    let members: BTreeMap<String, Vec<String>> = opt.group_members().into_iter().collect();
    assert_eq!(
        members["no_decay"],
        vec!["blocks.0.mlp.fc.bias", "blocks.0.norm.weight"]
    );
    assert_eq!(members["head"], vec!["lm_head.weight"]);
    assert_eq!(
        members["default"],
        vec![
            "blocks.0.attn.q.weight",
            "blocks.0.mlp.fc.weight",
            "wte.weight"
        ]
    );
    assert_eq!(opt.group_config("head").unwrap().lr(), 0.03);
    assert_eq!(opt.group_config("no_decay").unwrap().weight_decay(), 0.0);
    let total: usize = members.values().map(Vec::len).sum();
    assert_eq!(total, 6, "every parameter in exactly one group");
}

#[test]
fn set_lr_scales_every_group() {
    let vars = model_params(DType::F64);
    let spec = OptimizerSpec {
        optimizer: OptimConfig::from_toml("name = \"adamw\"\nlr = 0.01").unwrap(),
        groups: vec![GroupSpec {
            roles: vec![Role::Head],
            lr: Some(0.04),
            ..Default::default()
        }],
    };
    let mut opt = Driver::new(spec, NamedParams::new(vars).unwrap()).unwrap();
    assert_eq!(opt.lr(), 0.01);
    opt.set_lr(0.005);
    assert_eq!(opt.lr_factor(), 0.5);
    opt.set_lr_factor(0.25);
    assert!((opt.lr() - 0.0025).abs() < 1e-15);
}
