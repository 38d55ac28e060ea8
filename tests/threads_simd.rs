//! A step's result does not depend on the number of worker threads (parameters update in
//! parallel) nor on the instruction set the fused passes run with (AVX2 or baseline
//! x86-64): for every registered optimizer, in f32 and f64, the parameters and the saved state
//! are the same bits.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Var};
use common::*;
use optlab::optim::Optimizer;

/// Parameters long enough for whole vectors plus a remainder, of every role.
fn params(dtype: DType) -> Vec<(String, Var)> {
    let spec: &[(&str, &[usize])] = &[
        ("wte.weight", &[23, 13]),
        ("blocks.0.attn.q.weight", &[19, 19]),
        ("blocks.0.mlp.fc.weight", &[37, 19]),
        ("blocks.0.mlp.fc.bias", &[301]),
        ("blocks.0.norm.weight", &[19]),
        ("lm_head.weight", &[23, 13]),
    ];
    spec.iter()
        .enumerate()
        .map(|(i, (n, s))| {
            let t = tensor(300 + i as u64, s, dtype);
            (n.to_string(), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

type Outcome = (Vec<(String, Vec<u64>)>, BTreeMap<String, Vec<u8>>);

fn run(name: &str, dtype: DType, threads: usize, scalar_only: bool) -> Outcome {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        optlab::fused::set_scalar_only(scalar_only);
        let vars = params(dtype);
        let mut opt = driver(name, &vars);
        for s in 1..=4 {
            synthetic_step(&mut opt, &vars, s);
        }
        optlab::fused::set_scalar_only(false);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.safetensors");
        opt.save_state(&path).unwrap();
        let state = safetensors_bytes(&path);
        (snapshot(&opt), state)
    })
}

/// Every tensor of a state file, by name, as raw bytes.
fn safetensors_bytes(path: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect()
}

#[test]
fn steps_are_the_same_bits_on_any_thread_count_and_instruction_set() {
    for name in &labels() {
        for dtype in [DType::F64, DType::F32] {
            let reference = run(name, dtype, 1, true);
            let simd = run(name, dtype, 1, false);
            assert_eq!(
                reference, simd,
                "{name} {dtype:?}: scalar and SIMD passes differ (1 thread)"
            );
            let threaded = run(name, dtype, 4, false);
            assert_eq!(
                reference.0, threaded.0,
                "{name} {dtype:?}: parameters differ (1 thread vs 4 threads)"
            );
            assert_eq!(
                reference.1, threaded.1,
                "{name} {dtype:?}: saved state differs (1 thread vs 4 threads)"
            );
        }
    }
}
