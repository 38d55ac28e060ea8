//! Single-pass elementwise kernels over parameter and state buffers: the fused passes every
//! optimizer (and the device linear algebra) is written in, each a plain-Rust loop (its CPU
//! twin) or a kernel of `kernels/fused.cu` on a CUDA device. Below it: [`crate::float`] (element
//! types, CPU slices), [`crate::launch`] (the kernels' calling convention, host emulation) and
//! [`crate::cuda`] (device pointers, launches, cuBLAS/cuSOLVER); above it, [`crate::linalg`] and
//! [`crate::optim`] (which re-exports it as `optim::fused`).
//!
//! An optimizer update touches the parameter, its gradient and one to three moment buffers.
//! Written as candle ops that is ~15 allocating passes; here it is one loop that reads every
//! operand once and writes the mutated buffers in place. [`zip_mut`] hands the loop body
//! mutable slices of the `outs` tensors (parameters, moments) and shared slices of the `ins`
//! (gradients), taking each tensor's storage lock through candle's in-place op interface, so no
//! copy is made. This plain-Rust loop is the CPU twin of the fused CUDA kernels: with the
//! `cuda` feature, [`zip_mut_or_kernel`] runs the named kernel of `kernels/fused.cu` instead when
//! the tensors live on a CUDA device (see [`crate::cuda`]).

use candle_core::{DType, Tensor};

use crate::error::Result;

pub use crate::float::{check_operands, host_slices, DeviceFloat, Float};

/// Runs `body` once over contiguous slices: `outs` mutable (written in place), `ins` shared.
///
/// All tensors must be contiguous, of dtype `T`, and distinct (no two sharing storage). Lengths
/// are checked by the caller's body; this only guarantees exclusive access. On the CPU this is
/// [`host_slices`]; with the `cuda` feature, CUDA operands are copied to the host for the body
/// and the outputs written back ([`crate::cuda::on_host`]): the path of the passes that have no
/// kernel.
pub fn zip_mut<T: Float>(
    outs: &[&Tensor],
    ins: &[&Tensor],
    body: impl FnMut(&mut [&mut [T]], &[&[T]]) -> Result<()>,
) -> Result<()> {
    check_operands::<T>(outs, ins)?;
    #[cfg(feature = "cuda")]
    if outs.iter().chain(ins).any(|t| t.device().is_cuda()) {
        return crate::cuda::on_host(outs, ins, body);
    }
    host_slices(outs, ins, body)
}

/// A kernel of `kernels/fused.cu` and its scalar arguments: the GPU twin of a [`zip_mut`] body.
///
/// `name` is the kernel's name without its `_f32`/`_f64` suffix; `scalars` are its `s[..]`
/// arguments in the order the kernel documents. The kernel receives the `outs` and `ins` of the
/// call in the same order as the body does.
#[derive(Debug, Clone, Copy)]
pub struct Kernel<'a, T> {
    /// Kernel name, without the dtype suffix.
    pub name: &'static str,
    /// Scalar arguments (at most 16).
    pub scalars: &'a [T],
}

impl<'a, T> Kernel<'a, T> {
    /// The kernel `name` with `scalars`.
    pub fn new(name: &'static str, scalars: &'a [T]) -> Self {
        Self { name, scalars }
    }
}

/// A boolean kernel argument: the kernels read a scalar `≠ 0` as true.
pub fn flag<T: Float>(b: bool) -> T {
    if b {
        T::one()
    } else {
        T::zero()
    }
}

/// Whether [`zip_mut_or_kernel`] launches its kernel for operands like `t`: `t` is on a CUDA
/// device, or the kernels are being emulated on the host. Rules whose kernel path has another
/// shape than their CPU loop (two launches with a reduction between) branch on it.
pub fn kernels_run(t: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    if t.device().is_cuda() {
        return true;
    }
    #[cfg(optlab_emulate_kernels)]
    if crate::launch::emulate::active() {
        return true;
    }
    let _ = t;
    false
}

/// [`zip_mut`] on the CPU; on a CUDA device (feature `cuda`) one launch of `kernel` over the
/// same operands, which must then all have the same number of elements.
pub fn zip_mut_or_kernel<T: Float>(
    kernel: Kernel<'_, T>,
    outs: &[&Tensor],
    ins: &[&Tensor],
    body: impl FnMut(&mut [&mut [T]], &[&[T]]) -> Result<()>,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    if outs.first().is_some_and(|t| t.device().is_cuda()) {
        return crate::cuda::launch_elementwise::<T>(kernel.name, outs, ins, kernel.scalars);
    }
    #[cfg(optlab_emulate_kernels)]
    if crate::launch::emulate::active() {
        return crate::launch::emulate::launch_elementwise::<T>(
            kernel.name,
            outs,
            ins,
            kernel.scalars,
        );
    }
    #[cfg(not(any(feature = "cuda", optlab_emulate_kernels)))]
    let _ = kernel;
    zip_mut(outs, ins, body)
}

/// Runs `f` compiled for the widest vector instruction set it is built for that this CPU has:
/// AVX2 + FMA or baseline x86-64, chosen at run time (AVX-512 is left out on purpose: enabling
/// pulp's `x86-v4` for these passes would also switch faer's linear algebra to AVX-512 code that
/// rounds differently; see `docs/reproducibility.md`) (the release build targets baseline x86-64, so loops
/// written plainly would never use wider registers). `f` must be inlined into the dispatched
/// copies for this to take effect: use it through [`vectorized!`](crate::vectorized), which
/// marks the closure `#[inline(always)]`.
///
/// The results are the same bits on every instruction set: Rust never contracts `a * b + c`
/// into a fused multiply-add, vector `+ − × ÷ √ min max` round exactly as their scalar forms
/// do, and reductions that accumulate in order are left in order by the compiler.
#[inline(always)]
pub fn on_widest_simd<R>(f: impl FnOnce() -> R) -> R {
    if SCALAR_ONLY.load(std::sync::atomic::Ordering::Relaxed) {
        return f();
    }
    pulp::Arch::new().dispatch(f)
}

static SCALAR_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns the wide-vector code of [`on_widest_simd`] off (`true`: every pass runs its
/// baseline-x86-64 copy) or back on, for the whole process. Results do not depend on it; it
/// exists to check exactly that, and to rule SIMD out when chasing a numerical problem.
pub fn set_scalar_only(scalar_only: bool) {
    SCALAR_ONLY.store(scalar_only, std::sync::atomic::Ordering::Relaxed);
}

/// Runs the statements given, compiled for the widest vector instruction set this CPU has
/// ([`on_widest_simd`]); evaluates to their value.
///
/// Every fused pass runs its loop inside this, over slices resliced to one length
/// ([`exactly`], [`exactly_mut`]) or zipped, so that the compiler drops the bounds checks and
/// vectorizes.
#[macro_export]
macro_rules! vectorized {
    ($($body:tt)*) => {
        $crate::fused::on_widest_simd(#[inline(always)] move || { $($body)* })
    };
}
pub use crate::vectorized;

/// Reslices `s` to its first `n` elements, or an error naming `what` when it is shorter: the
/// loop over `0..n` that follows then indexes without bounds checks (and vectorizes).
#[inline(always)]
pub fn exactly<'s, T>(s: &'s [T], n: usize, what: &str) -> Result<&'s [T]> {
    if s.len() != n {
        return Err(length_error(what, s.len(), n));
    }
    Ok(s)
}

/// [`exactly`] for a mutable slice.
#[inline(always)]
pub fn exactly_mut<'s, T>(s: &'s mut [T], n: usize, what: &str) -> Result<&'s mut [T]> {
    let len = s.len();
    if len != n {
        return Err(length_error(what, len, n));
    }
    Ok(s)
}

#[cold]
fn length_error(what: &str, len: usize, n: usize) -> crate::error::Error {
    crate::error::Error::Msg(format!(
        "fused pass: `{what}` has {len} elements where {n} are needed"
    ))
}

/// A gradient as a contiguous tensor of the parameter's dtype (a no-op when it already is).
pub fn prepare_grad(g: &Tensor, dtype: DType) -> Result<Tensor> {
    let g = if g.dtype() == dtype {
        g.clone()
    } else {
        g.to_dtype(dtype)?
    };
    Ok(g.contiguous()?)
}

/// Sum of squares of a tensor, computed in f64 in one pass (on other devices than the CPU: in
/// f64 with candle's reduction, whose summation order differs).
pub fn sum_sq(t: &Tensor) -> Result<f64> {
    if !t.device().is_cpu() {
        let t = t.to_dtype(DType::F64)?;
        return Ok(t.sqr()?.sum_all()?.to_scalar::<f64>()?);
    }
    let t = t.contiguous()?;
    let mut acc = 0.0;
    crate::with_float!(t.dtype(), "sum_sq", T => {
        zip_mut::<T>(&[], &[&t], |_, i| {
            acc = i[0].iter().map(|x| { let x = x.f64(); x * x }).sum();
            Ok(())
        })?;
    });
    Ok(acc)
}

/// [`all_finite`] of each tensor. On a CUDA device (feature `cuda`) the checks are queued
/// back to back and their results copied to the host together: one wait for the device.
pub fn all_finite_each(ts: &[&Tensor]) -> Result<Vec<bool>> {
    #[cfg(feature = "cuda")]
    if let Some(first) = ts.first() {
        let batchable = ts.iter().all(|t| {
            t.device().same_device(first.device()) && matches!(t.dtype(), DType::F32 | DType::F64)
        });
        if first.device().is_cuda() && batchable {
            return crate::cuda::all_finite_each(ts);
        }
    }
    #[cfg(optlab_emulate_kernels)]
    let serial = crate::launch::emulate::active(); // its switch is per thread
    #[cfg(not(optlab_emulate_kernels))]
    let serial = false;
    let on_cpu = ts.iter().all(|t| t.device().is_cpu());
    if !serial && on_cpu && ts.len() > 1 && rayon::current_num_threads() > 1 {
        // One read pass over every gradient: spread over the worker threads like the updates.
        use rayon::prelude::*;
        return ts.par_iter().map(|t| all_finite(t)).collect();
    }
    ts.iter().map(|t| all_finite(t)).collect()
}

/// Whether every element is finite.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    #[cfg(feature = "cuda")]
    if t.device().is_cuda() && matches!(t.dtype(), DType::F32 | DType::F64) {
        let t = t.contiguous()?;
        return crate::with_float!(t.dtype(), "all_finite", T => crate::cuda::all_finite::<T>(&t));
    }
    #[cfg(optlab_emulate_kernels)]
    if crate::launch::emulate::active() && t.device().is_cpu() {
        let t = t.contiguous()?;
        return crate::with_float!(t.dtype(), "all_finite", T =>
            crate::launch::emulate::all_finite::<T>(&t));
    }
    if !t.device().is_cpu() {
        // x − x is 0 for finite x and NaN for ±inf and NaN, so the sum is 0 exactly when every
        // element is finite (one reduction on the device, one scalar copied back).
        let s = t
            .sub(t)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        return Ok(s == 0.0);
    }
    let t = t.contiguous()?;
    let mut ok = true;
    crate::with_float!(t.dtype(), "all_finite", T => {
        zip_mut::<T>(&[], &[&t], |_, i| {
            // Blocks of a fixed size, each tested without an early exit (an OR of compare
            // masks, which vectorizes), with the exit between blocks.
            ok = vectorized! {
                i[0].chunks(4096)
                    .all(|c| !c.iter().fold(false, |bad, x| bad | !x.is_finite()))
            };
            Ok(())
        })?;
    });
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// pulp's AVX-512 dispatch stays compiled out: features are shared with faer, whose
    /// eigensolvers round differently on AVX-512 code paths (cbs-demo's SOAP run at B = 8 came
    /// out different on an AVX-512 machine until it was). Only an AVX-512 CPU can tell.
    #[test]
    fn simd_dispatch_never_picks_avx512() {
        let arch = format!("{:?}", pulp::Arch::new());
        assert!(
            !arch.starts_with("V4"),
            "pulp dispatches to {arch}: something enabled pulp's `x86-v4` feature"
        );
    }

    #[test]
    fn updates_several_buffers_in_place() -> Result<()> {
        let dev = Device::Cpu;
        let p = Var::new(&[1.0f64, 2.0, 3.0], &dev)?;
        let m = Tensor::zeros(3, DType::F64, &dev)?;
        let g = Tensor::new(&[0.5f64, 0.5, 0.5], &dev)?;
        zip_mut::<f64>(&[&p, &m], &[&g], |o, i| {
            let (p, rest) = o.split_first_mut().unwrap();
            for k in 0..p.len() {
                rest[0][k] += i[0][k];
                p[k] -= rest[0][k];
            }
            Ok(())
        })?;
        assert_eq!(p.to_vec1::<f64>()?, vec![0.5, 1.5, 2.5]);
        assert_eq!(m.to_vec1::<f64>()?, vec![0.5, 0.5, 0.5]);
        Ok(())
    }

    #[test]
    fn rejects_aliased_operands_and_wrong_dtype() {
        let dev = Device::Cpu;
        let p = Tensor::zeros(3, DType::F64, &dev).unwrap();
        assert!(zip_mut::<f64>(&[&p, &p], &[], |_, _| Ok(())).is_err());
        assert!(zip_mut::<f32>(&[&p], &[], |_, _| Ok(())).is_err());
    }
}
