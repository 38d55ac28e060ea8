//! The parameter set the step benchmarks time: GPT-like shapes (an embedding and a head of
//! 512×256; six blocks of a 1024×256 and a 256×1024 matrix, a 1024 bias and a 256 norm), 3.4 M
//! f32 parameters, with fixed N(0, 1e-3) gradients. `benches/vs_torch.py` builds the same set
//! in PyTorch.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};

/// Names and shapes of the set, in the order the benchmarks create them.
pub fn shapes() -> Vec<(String, Vec<usize>)> {
    let mut out = vec![
        ("wte.weight".to_string(), vec![512, 256]),
        ("lm_head.weight".to_string(), vec![512, 256]),
    ];
    for layer in 0..6 {
        out.push((format!("blocks.{layer}.mlp.fc.weight"), vec![1024, 256]));
        out.push((format!("blocks.{layer}.mlp.proj.weight"), vec![256, 1024]));
        out.push((format!("blocks.{layer}.mlp.fc.bias"), vec![1024]));
        out.push((format!("blocks.{layer}.norm.weight"), vec![256]));
    }
    out
}

/// Fresh parameters, N(0, 0.02).
pub fn param_set() -> Vec<(String, Var)> {
    shapes()
        .into_iter()
        .map(|(name, shape)| {
            let t = Tensor::randn(0f32, 0.02, shape, &Device::Cpu).unwrap();
            (name, Var::from_tensor(&t).unwrap())
        })
        .collect()
}

/// A fixed gradient for every parameter of `vars`, N(0, 1e-3).
pub fn grads_for(vars: &[(String, Var)]) -> BTreeMap<String, Tensor> {
    vars.iter()
        .map(|(n, v)| {
            let g = Tensor::randn(0f32, 1e-3, v.dims(), &Device::Cpu).unwrap();
            (n.clone(), g)
        })
        .collect()
}
