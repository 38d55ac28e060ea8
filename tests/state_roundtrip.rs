//! Save at step k, load into a fresh optimizer, continue: bit-identical to an uninterrupted run,
//! for every registered optimizer, in f32 and f64.

mod common;

use candle_core::DType;
use common::*;
use optlab::optim::{Mode, Optimizer};

fn roundtrip(name: &str, dtype: DType) {
    let (k, n) = (4u64, 5u64);
    let vars_a = model_params(dtype);
    let mut a = driver(name, &vars_a);
    for s in 1..=k + n {
        synthetic_step(&mut a, &vars_a, s);
    }

    let vars_b = model_params(dtype);
    let mut b = driver(name, &vars_b);
    for s in 1..=k {
        synthetic_step(&mut b, &vars_b, s);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors");
    b.save_state(&path).unwrap();
    // The fresh optimizer starts from copies of the parameters as they were at step k.
    let vars_c = copy_vars(&vars_b);
    drop(b);
    let mut c = driver(name, &vars_c);
    c.load_state(&path).unwrap();
    assert_eq!(c.step_count(), k);
    for s in k + 1..=k + n {
        synthetic_step(&mut c, &vars_c, s);
    }
    assert_eq!(
        snapshot(&a),
        snapshot(&c),
        "{name} {dtype:?}: resumed run differs"
    );
    let eval = |o: &dyn Optimizer| -> Vec<Vec<u64>> {
        o.eval_params()
            .unwrap()
            .iter()
            .map(|(_, t)| values_of(t).iter().map(|x| x.to_bits()).collect())
            .collect()
    };
    assert_eq!(eval(&a), eval(&c), "{name} {dtype:?}: eval params differ");
}

#[test]
fn save_load_continue_is_bit_exact_for_every_optimizer() {
    for name in &labels() {
        for dtype in [DType::F64, DType::F32] {
            roundtrip(name, dtype);
        }
    }
}

#[test]
fn eval_mode_is_saved_and_restored() {
    for name in &labels() {
        let vars = model_params(DType::F64);
        let mut a = driver(name, &vars);
        for s in 1..=3 {
            synthetic_step(&mut a, &vars, s);
        }
        a.set_mode(Mode::Eval).unwrap();
        let sd = a.state_dict().unwrap();
        let vars2 = copy_vars(&vars);
        let mut b = driver(name, &vars2);
        b.load_state_dict(sd).unwrap();
        assert_eq!(b.mode(), Mode::Eval, "{name}");
        // Back in train mode, both continue identically.
        a.set_mode(Mode::Train).unwrap();
        b.set_mode(Mode::Train).unwrap();
        synthetic_step(&mut a, &vars, 4);
        synthetic_step(&mut b, &vars2, 4);
        assert_eq!(snapshot(&a), snapshot(&b), "{name}");
    }
}
