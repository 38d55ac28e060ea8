//! The float element types of the fused passes (f32 and f64) and the CPU storage access they
//! share: [`host_slices`] hands a loop body mutable slices of some CPU tensors and shared
//! slices of others, through candle's in-place op interface (no copy). The bottom layer of the
//! crate's machinery: it depends on nothing else in the crate but [`crate::error`].

use std::cell::RefCell;

use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Tensor, WithDType};

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

pub(crate) type Body<'a, T> = dyn FnMut(&mut [&mut [T]], &[&[T]]) -> Result<()> + 'a;

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

/// Checks the operands of a fused pass: every tensor of dtype `T`, no output also another
/// operand.
pub fn check_operands<T: Float>(outs: &[&Tensor], ins: &[&Tensor]) -> Result<()> {
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
    Ok(())
}

/// Runs `body` once over contiguous slices of CPU tensors: `outs` mutable (written in place),
/// `ins` shared. All tensors must be contiguous, of dtype `T`, distinct (no two sharing
/// storage) and on the CPU. Lengths are checked by the caller's body; this only guarantees
/// exclusive access. [`crate::fused::zip_mut`] is the same for tensors on any device.
pub fn host_slices<T: Float>(
    outs: &[&Tensor],
    ins: &[&Tensor],
    mut body: impl FnMut(&mut [&mut [T]], &[&[T]]) -> Result<()>,
) -> Result<()> {
    check_operands::<T>(outs, ins)?;
    let mut ptrs: Vec<(*mut T, usize)> = Vec::with_capacity(outs.len());
    run_nested::<T>(outs, ins, &mut ptrs, &mut body)
}
