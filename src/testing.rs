//! Helpers the crate's unit tests share: deterministic noise (an LCG, and the xorshift some
//! linear-algebra and Adafactor tests draw from), tensors and drivers built from it, and
//! readers of the parameters. (The integration tests in `tests/` have theirs in
//! `tests/common`.) Each test keeps its own seeds; only the machinery
//! lives here.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::Result;
use crate::optim::{Driver, NamedParams, OptimConfig, Optimizer};

/// Parameter names and shapes.
pub type Shapes<'a> = &'a [(&'a str, &'a [usize])];

/// Knuth's MMIX linear congruential step.
fn lcg_step(x: u64) -> u64 {
    x.wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
}

/// `n` values in [-1, 1) from the LCG started at `state` (the first value is one step on).
pub fn lcg_from_state(state: u64, n: usize) -> Vec<f64> {
    let mut x = state;
    (0..n)
        .map(|_| {
            x = lcg_step(x);
            ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

/// `n` deterministic values in [-1, 1) for `seed` (the seed is mixed once first, so that
/// small seeds do not start near zero).
pub fn noise(seed: u64, n: usize) -> Vec<f64> {
    lcg_from_state(lcg_step(seed), n)
}

/// `n` values in [-1, 1) from Marsaglia's xorshift (13, 7, 17) started at `state`.
pub fn xorshift_from_state(state: u64, n: usize) -> Vec<f64> {
    let mut s = state;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

/// A CPU tensor of `values` in `shape`, converted to `dtype`.
pub fn tensor(values: Vec<f64>, shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_vec(values, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// One tensor per entry of `shapes`, the `i`-th holding `fill(i, elements)`.
pub fn named(
    shapes: Shapes<'_>,
    dtype: DType,
    fill: impl Fn(u64, usize) -> Vec<f64>,
) -> BTreeMap<String, Tensor> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product();
            (name.to_string(), tensor(fill(i as u64, n), shape, dtype))
        })
        .collect()
}

/// A driver over the parameters `shapes`, initialised by `fill` as in [`named`].
pub fn driver(
    cfg: OptimConfig,
    shapes: Shapes<'_>,
    dtype: DType,
    fill: impl Fn(u64, usize) -> Vec<f64>,
) -> Driver {
    let vars = named(shapes, dtype, fill)
        .into_iter()
        .map(|(name, t)| (name, Var::from_tensor(&t).unwrap()));
    Driver::new(cfg, NamedParams::new(vars).unwrap()).unwrap()
}

/// A driver over one f64 vector parameter `w` starting at `init`.
pub fn driver_w(cfg: OptimConfig, init: &[f64]) -> Result<Driver> {
    let var = Var::from_tensor(&Tensor::new(init, &Device::Cpu)?)?;
    Driver::new(cfg, NamedParams::new(vec![("w".to_string(), var)])?)
}

/// One step of a [`driver_w`] driver with gradient `g`; returns the new `w`.
pub fn step_w(opt: &mut Driver, g: &[f64]) -> Result<Vec<f64>> {
    let mut grads = BTreeMap::new();
    grads.insert("w".to_string(), Tensor::new(g, &Device::Cpu)?);
    opt.step_named(&grads)?;
    Ok(opt.vars()[0].1.to_vec1::<f64>()?)
}

/// The elements of `t` as f64, flattened.
pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// The parameter `name` of `opt` as f64, flattened.
pub fn param(opt: &Driver, name: &str) -> Vec<f64> {
    let vars: BTreeMap<String, Var> = opt.vars().into_iter().collect();
    flat(vars[name].as_tensor())
}

/// The largest absolute elementwise difference.
pub fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}
