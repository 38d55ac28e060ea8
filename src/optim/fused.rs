//! Single-pass elementwise kernels over parameter and state buffers.
//!
//! An optimizer update touches the parameter, its gradient and one to three moment buffers.
//! Written as candle ops that is ~15 allocating passes; here it is one loop that reads every
//! operand once and writes the mutated buffers in place. [`zip_mut`] hands the loop body
//! mutable slices of the `outs` tensors (parameters, moments) and shared slices of the `ins`
//! (gradients), taking each tensor's storage lock through candle's in-place op interface, so no
//! copy is made. This plain-Rust loop is the CPU twin of the fused CUDA kernels: with the
//! `cuda` feature, [`zip_mut_or_kernel`] runs the named kernel of `kernels/fused.cu` instead when
//! the tensors live on a CUDA device (see [`crate::cuda`]).

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor, WithDType};

use crate::error::{Error, Result};

/// What a float type needs to live on a CUDA device (nothing without the `cuda` feature).
#[cfg(feature = "cuda")]
pub trait DeviceFloat: candle_core::cuda_backend::CudaDType + cudarc::driver::DeviceRepr {}
/// What a float type needs to live on a CUDA device (nothing without the `cuda` feature).
#[cfg(not(feature = "cuda"))]
pub trait DeviceFloat {}
impl DeviceFloat for f32 {}
impl DeviceFloat for f64 {}

/// Float element types optimizers run in (f32 and f64).
pub trait Float:
    WithDType + num_traits::Float + DeviceFloat + Send + Sync + std::fmt::Debug
{
    /// Converts an f64 hyperparameter to this type (rounding for f32).
    fn of(x: f64) -> Self {
        <Self as WithDType>::from_f64(x)
    }
    /// Converts to f64.
    fn f64(self) -> f64 {
        <Self as WithDType>::to_f64(self)
    }
    /// The mutable data of a CPU storage of this type.
    fn storage_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>>;
}
impl Float for f32 {
    fn storage_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}
impl Float for f64 {
    fn storage_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// Runs `$body` with the type alias `$T` bound to the float type of `$dtype` (f32 or f64), or
/// returns a [`Error::DType`] naming `$what`.
#[macro_export]
macro_rules! with_float {
    ($dtype:expr, $what:expr, $T:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $T = f64;
                $body
            }
            other => {
                return Err($crate::error::Error::DType {
                    what: ($what).to_string(),
                    dtype: other,
                })
            }
        }
    };
}

type Body<'a, T> = dyn FnMut(&mut [&mut [T]], &[&[T]]) -> Result<()> + 'a;

struct Nest<'a, 'b, T: Float> {
    rest: &'a [&'a Tensor],
    ins: &'a [&'a Tensor],
    ptrs: RefCell<&'b mut Vec<(*mut T, usize)>>,
    body: RefCell<&'b mut Body<'a, T>>,
    result: RefCell<Option<Result<()>>>,
}

fn contiguous_range(layout: &Layout, what: &str) -> Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg(format!("{what}: fused kernels need contiguous tensors")))
}

impl<T: Float> InplaceOp1 for Nest<'_, '_, T> {
    fn name(&self) -> &'static str {
        "optlab-fused-elementwise"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let outcome = (|| -> Result<()> {
            let (start, end) = contiguous_range(layout, "output")?;
            let dtype = candle_core::backend::BackendStorage::dtype(storage);
            let slice = T::storage_mut(storage).ok_or_else(|| Error::DType {
                what: "fused kernel output".into(),
                dtype,
            })?;
            let slice = &mut slice[start..end];
            self.ptrs
                .borrow_mut()
                .push((slice.as_mut_ptr(), slice.len()));
            let mut ptrs = self.ptrs.borrow_mut();
            let mut body = self.body.borrow_mut();
            run_nested::<T>(self.rest, self.ins, &mut ptrs, &mut **body)
        })();
        *self.result.borrow_mut() = Some(outcome);
        Ok(())
    }
}

fn run_nested<'a, T: Float>(
    outs: &'a [&'a Tensor],
    ins: &'a [&'a Tensor],
    ptrs: &mut Vec<(*mut T, usize)>,
    body: &mut Body<'a, T>,
) -> Result<()> {
    if let Some((first, rest)) = outs.split_first() {
        let op = Nest {
            rest,
            ins,
            ptrs: RefCell::new(ptrs),
            body: RefCell::new(body),
            result: RefCell::new(None),
        };
        first.inplace_op1(&op)?;
        return op
            .result
            .into_inner()
            .unwrap_or_else(|| Err(Error::Msg("fused kernel did not run".into())));
    }
    // Innermost level: every output storage is write-locked by an enclosing frame; take read
    // locks on the inputs and run the body.
    let guards: Vec<_> = ins.iter().map(|t| t.storage_and_layout()).collect();
    let mut in_slices: Vec<&[T]> = Vec::with_capacity(ins.len());
    for (guard, layout) in &guards {
        let (start, end) = contiguous_range(layout, "input")?;
        match &**guard {
            Storage::Cpu(cpu) => in_slices.push(&cpu.as_slice::<T>()?[start..end]),
            _ => {
                return Err(Error::Msg(
                    "fused kernels run on the CPU; this tensor lives on another device".into(),
                ))
            }
        }
    }
    // SAFETY: each pointer comes from a distinct tensor's storage (checked by `zip_mut`) whose
    // write lock is held by an enclosing `inplace_op1` frame for the whole call.
    let mut out_slices: Vec<&mut [T]> = ptrs
        .iter()
        .map(|&(p, n)| unsafe { std::slice::from_raw_parts_mut(p, n) })
        .collect();
    body(&mut out_slices, &in_slices)
}

/// Runs `body` once over contiguous slices: `outs` mutable (written in place), `ins` shared.
///
/// All tensors must be contiguous, of dtype `T`, and distinct (no two sharing storage). Lengths
/// are checked by the caller's body; this only guarantees exclusive access. With the `cuda`
/// feature, CUDA operands are copied to the host for the body and the outputs written back
/// ([`crate::cuda::on_host`]): the path of the passes that have no kernel.
pub fn zip_mut<T: Float>(
    outs: &[&Tensor],
    ins: &[&Tensor],
    mut body: impl FnMut(&mut [&mut [T]], &[&[T]]) -> Result<()>,
) -> Result<()> {
    for (i, a) in outs.iter().enumerate() {
        if a.dtype() != T::DTYPE {
            return Err(Error::DType {
                what: "fused kernel output".into(),
                dtype: a.dtype(),
            });
        }
        for b in outs[i + 1..].iter().chain(ins.iter()) {
            if a.id() == b.id() {
                return Err(Error::Msg(
                    "fused kernel operands must be distinct tensors".into(),
                ));
            }
        }
    }
    for t in ins {
        if t.dtype() != T::DTYPE {
            return Err(Error::DType {
                what: "fused kernel input".into(),
                dtype: t.dtype(),
            });
        }
    }
    #[cfg(feature = "cuda")]
    if outs.iter().chain(ins).any(|t| t.device().is_cuda()) {
        return crate::cuda::on_host(outs, ins, body);
    }
    let mut ptrs: Vec<(*mut T, usize)> = Vec::with_capacity(outs.len());
    run_nested::<T>(outs, ins, &mut ptrs, &mut body)
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
    if crate::kernels::emulate::active() {
        return crate::kernels::emulate::launch_elementwise::<T>(
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
    if crate::kernels::emulate::active() && t.device().is_cpu() {
        let t = t.contiguous()?;
        return crate::with_float!(t.dtype(), "all_finite", T =>
            crate::kernels::emulate::all_finite::<T>(&t));
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
            ok = i[0].iter().all(|x| x.is_finite());
            Ok(())
        })?;
    });
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

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
