//! Fused CPU kernels, with backward passes, for the decoder's hot chains: LayerNorm without bias
//! ([`layer_norm`]), exact-erf GeLU ([`gelu`]), half-split RoPE over the heads of a `(batch,
//! time, d_model)` tensor ([`rope`]), causal multi-head attention ([`attention`]), mean
//! cross-entropy with the optional z-loss ([`cross_entropy`]), and the linear layers' products
//! ([`linear`]), whose sums run in an order fixed by the shapes alone (`matmul.rs`), so a run's
//! bits do not depend on the machine's L1 cache.
//!
//! Each is one candle custom op whose `bwd` computes the input gradients in one pass over the
//! saved inputs, where the primitive-op composition allocates a tensor per step of the chain in
//! the forward pass and several more per step in the backward pass. The backward results are
//! plain tensors (no graph of their own): first-order gradients only, which is all training
//! needs.
//!
//! They run on the CPU only, in f32 and f64. The callers ([`super::gpt`], [`super::Model`]) keep
//! the primitive-op composition as the reference path and use it on every other device, so a
//! GPU run computes exactly what it did before. Inputs are made contiguous by the wrappers;
//! wrong shapes and dtypes are errors.
//!
//! Work is spread over candle's thread count (`RAYON_NUM_THREADS`) in rayon's global pool, the
//! pool gemm runs in; with one thread everything runs on the calling thread.

mod attention;
mod cross_entropy;
mod gelu;
mod layer_norm;
mod matmul;
mod rope;

pub use attention::attention;
pub use cross_entropy::{cross_entropy, FusedLoss};
pub use gelu::gelu;
pub use layer_norm::layer_norm;
pub use matmul::{linear, sum_blocks, SUM_BLOCK};
pub use rope::rope;

use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub};

use candle_core::{CpuStorage, DType, Device, Layout, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// The float types the kernels run in.
pub(crate) trait Elem:
    WithDType
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + MulAssign
    + PartialOrd
{
    const ZERO: Self;
    const ONE: Self;
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    /// The error function, to the type's precision (see [`erf_f32`] for f32).
    fn erf(self) -> Self;
    fn fmax(self, other: Self) -> Self;
}

macro_rules! elem {
    ($t:ty, $erf:path) => {
        impl Elem for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn erf(self) -> Self {
                $erf(self)
            }
            #[inline(always)]
            fn fmax(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
        }
    };
}
elem!(f32, erf_f32);
elem!(f64, candle_core::cpu::erf::erf_f64);

/// erf in f32 as `x·P(x²)/Q(x²)` on |x| ≤ 3.92 (beyond, erf rounds to ±1 in f32): a rational
/// fit of degrees 6/5 in x², within 3.4e-7 of erf everywhere (about 5 f32 ulps at 1, and
/// 1e-8 relative near 0). Unlike a libm call it has no branches or calls, so the GeLU loops
/// vectorise; libm's erff was a tenth of a d256 training step.
#[inline(always)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    const P: [f32; 7] = [
        // The fit's leading coefficient: erf's slope at 0, which in f32 is 2/√π.
        std::f32::consts::FRAC_2_SQRT_PI,
        0.184_754_36,
        0.054_312_38,
        0.003_838_213_4,
        0.000_381_608_9,
        4.748_937e-6,
        -1.349_921_4e-8,
    ];
    const Q: [f32; 6] = [
        1.0,
        0.497_067_8,
        0.113_821_5,
        0.015_446_671,
        0.001_307_908_2,
        6.371_688_6e-5,
    ];
    let x = x.clamp(-3.92, 3.92);
    let z = x * x;
    let mut p = P[6];
    for &c in P[..6].iter().rev() {
        p = p * z + c;
    }
    let mut q = Q[5];
    for &c in Q[..5].iter().rev() {
        q = q * z + c;
    }
    (x * p / q).clamp(-1.0, 1.0)
}

/// Whether the fused kernels can run on tensors of this device and dtype.
pub fn supported(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
}

/// A CPU-only error from the `cuda_fwd`/`metal_fwd` fallbacks and the checks below, as
/// candle's error type (custom ops must return it).
fn op_err(op: &str, msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: {msg}"))
}

/// The contiguous slice behind `storage` at `layout`, typed.
fn slice<'a, T: WithDType>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [T]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| op_err(op, "input must be contiguous"))?;
    let all = T::cpu_storage_as_slice(storage)?;
    Ok(&all[start..end])
}

/// Calls `f` on the contiguous CPU data of `t` (which must be contiguous and on the CPU).
fn with_data<T: WithDType, R>(
    op: &str,
    t: &Tensor,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(slice(op, s, layout)?),
        _ => Err(op_err(op, "runs on the CPU only")),
    }
}

/// A graph-free CPU tensor from `data`.
fn tensor<T: WithDType>(data: Vec<T>, shape: impl Into<Shape>) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// Checks what every wrapper needs: a CPU tensor of a supported float dtype.
fn check_float(op: &str, what: &str, t: &Tensor) -> Result<()> {
    if !t.device().is_cpu() {
        return Err(Error::Msg(format!("{op}: {what} must be on the CPU")));
    }
    if !matches!(t.dtype(), DType::F32 | DType::F64) {
        return Err(Error::DType {
            what: format!("{op} {what}"),
            dtype: t.dtype(),
        });
    }
    Ok(())
}

/// Checks that `x` (rank ≥ 1) holds whole sequences of `time` rows.
fn check_rows(op: &str, x: &Tensor, time: usize) -> Result<()> {
    let d = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / d.max(1);
    if x.rank() < 2 || time == 0 || !rows.is_multiple_of(time) {
        return Err(Error::Msg(format!(
            "{op}: input {:?} is not sequences of {time} rows",
            x.dims()
        )));
    }
    Ok(())
}

/// Threads the kernels may use: candle's count (`RAYON_NUM_THREADS`, else the cores).
fn threads() -> usize {
    candle_core::utils::get_num_threads().max(1)
}

/// Runs `f(first_row, rows)` over consecutive row blocks of `out` (rows of `width` elements),
/// in parallel when more than one thread is configured and the work is worth splitting.
fn for_row_blocks<T: Send>(out: &mut [T], width: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let rows = out.len() / width.max(1);
    let n = threads();
    // Below ~32k elements per thread the hand-off costs more than it saves.
    if n == 1 || rows < 2 || out.len() < 32 * 1024 {
        f(0, out);
        return;
    }
    let block = rows.div_ceil(4 * n).max(1);
    out.par_chunks_mut(block * width)
        .enumerate()
        .for_each(|(i, chunk)| f(i * block, chunk));
}

#[cfg(test)]
pub(crate) mod check {
    //! Comparison helpers for the op tests.
    use candle_core::{DType, Device, Tensor};

    /// Largest |a − b| / max(1, |b|) over all elements.
    pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims(), "shapes differ");
        let a = a
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let b = b
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
            .fold(0.0, f64::max)
    }

    /// Deterministic pseudo-random values in [−scale, scale).
    pub fn noise(shape: &[usize], seed: u64, scale: f64, dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// Tolerance of a fused-vs-composed comparison in `dtype`.
    pub fn tol(dtype: DType) -> f64 {
        if dtype == DType::F64 {
            1e-12
        } else {
            1e-5
        }
    }
}
