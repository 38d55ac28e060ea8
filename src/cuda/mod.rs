//! CUDA side of the fused optimizer updates (feature `cuda`).
//!
//! The kernels are in `kernels/fused.cu`, compiled to PTX by `build.rs` and loaded once per
//! device as the module `optlab_fused`. Each is the GPU twin of a plain-Rust loop in
//! `src/optim/` (a [`zip_mut`](crate::fused::zip_mut) body): the optimizer's code
//! computes the same per-step scalars in f64 for both, and
//! [`zip_mut_or_kernel`](crate::fused::zip_mut_or_kernel) picks the loop or the kernel by
//! the parameter's device. `tests/cuda_twins.rs` compares every kernel with its twin.
//!
//! Memory safety rests on one function, [`with_device_ptrs`]: it takes candle's write lock on
//! every tensor the kernel writes (nested in-place ops, as the CPU twin does) and a read lock on
//! every tensor it only reads, checks dtype, device, contiguity and distinctness, and hands the
//! raw device pointers to a launch closure while all locks and cudarc's stream-order guards are
//! held. The kernels index only within the element counts checked here.

pub mod solver;

use std::cell::RefCell;

use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, Tensor};
use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::error::{Error, Result};
use crate::float::Float;
use crate::launch::{
    check_sizes, elementwise_blocks, AdafactorLaunch, AdafactorPlan, AdalayerPlan, Args, RawLaunch,
    THREADS,
};

/// PTX of `kernels/fused.cu`.
pub const FUSED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
/// Module name under which candle caches the loaded PTX.
const MODULE: &str = "optlab_fused";

/// The CUDA version the installed driver supports (`cuDriverGetVersion`), as `major.minor`.
pub fn driver_cuda_version() -> Option<String> {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: cuDriverGetVersion only writes the int it is given; it needs no context.
    let status = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    (status == cudarc::driver::sys::CUresult::CUDA_SUCCESS)
        .then(|| format!("{}.{}", v / 1000, (v % 1000) / 10))
}
// SAFETY: a plain `#[repr(C)]` aggregate of integers and f32/f64 whose layout matches the C++
// struct (8-byte fields first, no padding before the scalar array for either float type).
unsafe impl<T: DeviceRepr> DeviceRepr for Args<T> {}

/// Launches `kernel` (suffixed `_f32`/`_f64` by `T`) with `blocks` blocks of [`THREADS`].
///
/// # Safety
/// `args` must satisfy the kernel's contract in `kernels/fused.cu`: every pointer it uses
/// valid for the element count it indexes, written buffers not aliased.
unsafe fn launch<T: Float>(
    dev: &CudaDevice,
    kernel: &str,
    blocks: usize,
    args: &Args<T>,
) -> Result<()> {
    if blocks == 0 {
        return Ok(());
    }
    let blocks = u32::try_from(blocks)
        .map_err(|_| Error::Msg(format!("{kernel}: {blocks} blocks is too large a grid")))?;
    let name = format!("{kernel}_{}", T::DTYPE.as_str());
    let func = dev.get_or_load_custom_func(&name, MODULE, FUSED_PTX)?;
    let mut builder = func.builder();
    builder.arg(args);
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    builder.launch(cfg).w()?;
    Ok(())
}

/// One launch of the elementwise kernel `name` over `outs` (written) and `ins` (read), all of
/// the same element count, with `scalars` as its `s[..]` arguments.
pub fn launch_elementwise<T: Float>(
    name: &'static str,
    outs: &[&Tensor],
    ins: &[&Tensor],
    scalars: &[T],
) -> Result<()> {
    let n = outs.first().map(|t| t.elem_count()).unwrap_or(0);
    check_sizes(name, n, outs)?;
    check_sizes(name, n, ins)?;
    with_device_ptrs::<T>(outs, ins, |dev, o, i| {
        let args = Args::new(o, i, n, scalars)?;
        // SAFETY: every pointer addresses `n` elements (checked above and by
        // `with_device_ptrs`), and the elementwise kernels index below `n` only.
        unsafe { launch(dev, name, elementwise_blocks(n), &args) }
    })
}

/// One launch of `l` over `outs` (written) and `ins` (read), all of dtype `T` on one CUDA
/// device; returns the f64 workspace after the launch (one copy to the host, which waits for
/// the device).
pub fn launch_raw<T: Float>(
    l: &RawLaunch<'_, T>,
    outs: &[&Tensor],
    ins: &[&Tensor],
) -> Result<Vec<f64>> {
    let first = outs.iter().chain(ins).next();
    let Some(candle_core::Device::Cuda(dev)) = first.map(|t| t.device()) else {
        return Err(Error::Msg(format!(
            "{}: operands not on a CUDA device",
            l.name
        )));
    };
    let mut scratch = dev.alloc_zeros::<f64>(l.scratch_len.max(1))?;
    {
        let stream = dev.cuda_stream();
        let (scratch_ptr, _sync) = scratch.device_ptr_mut(&stream);
        with_device_ptrs::<T>(outs, ins, |dev, o, i| {
            let args = l.args(o, i, scratch_ptr)?;
            // SAFETY: the callers in `linalg::on_device` size `outs`, `ins`, `n`, `aux` and the
            // workspace as each kernel's comment in kernels/fused.cu documents.
            unsafe { launch(dev, l.name, l.blocks, &args) }
        })?;
    }
    let mut out = dev.clone_dtoh(&scratch)?;
    out.truncate(l.scratch_len);
    Ok(out)
}

/// Runs an elementwise body that has no kernel (a [`zip_mut`](crate::fused::zip_mut)
/// body of MARS with AMSGrad) on host copies of CUDA operands,
/// then writes the outputs back: every optimizer works on the GPU, the passes without kernels at
/// the cost of two transfers each. The arithmetic is the CPU path's, so results equal the CPU's.
pub fn on_host<T: Float>(
    outs: &[&Tensor],
    ins: &[&Tensor],
    body: impl FnMut(&mut [&mut [T]], &[&[T]]) -> Result<()>,
) -> Result<()> {
    let host = |t: &&Tensor| -> Result<Tensor> {
        Ok(t.to_device(&candle_core::Device::Cpu)?
            .contiguous()?
            .copy()?)
    };
    let h_outs: Vec<Tensor> = outs.iter().map(host).collect::<Result<_>>()?;
    let h_ins: Vec<Tensor> = ins.iter().map(host).collect::<Result<_>>()?;
    crate::float::host_slices::<T>(
        &h_outs.iter().collect::<Vec<_>>(),
        &h_ins.iter().collect::<Vec<_>>(),
        body,
    )?;
    for (dst, src) in outs.iter().zip(&h_outs) {
        if !dst.device().is_cuda() {
            return Err(Error::Msg(
                "fused pass: outputs on different devices".into(),
            ));
        }
        let data: Vec<T> = src.flatten_all()?.to_vec1::<T>()?;
        with_device_ptrs::<T>(&[dst], &[], |dev, o, _| {
            let stream = dev.cuda_stream();
            // SAFETY: `o[0]` addresses the tensor's `data.len()` elements (checked by
            // `with_device_ptrs`, same element count as its host copy); the stream is
            // synchronized before `data` is dropped.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(o[0], &data, stream.cu_stream()).w()?;
            }
            stream.synchronize().w()?;
            Ok(())
        })?;
    }
    Ok(())
}

/// Adalayer's update on the device (the twin of `Plan::apply` in `src/optim/algorithms/adalayer.rs`):
/// `p` and `m` of `n` elements, `v` of `nb` block scalars (blocks of `n / nb` consecutive
/// elements), `g` of `n` elements. With `w2` the block statistics are folded into `v` first.
/// `s` = (w1, decay, neg_step, bc2_sqrt, eps).
pub fn adalayer<T: Float>(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    w2: Option<T>,
    s: [T; 5],
) -> Result<()> {
    let n = p.elem_count();
    check_sizes("adalayer", n, &[m, g])?;
    let Some(plan) = AdalayerPlan::new(n, v.elem_count()) else {
        return Ok(());
    };
    with_device_ptrs::<T>(&[p, m, v], &[g], |dev, o, i| {
        let mut scratch = dev.alloc_zeros::<f64>(plan.scratch_len().max(1))?;
        let stream = dev.cuda_stream();
        let (scratch_ptr, _sync) = scratch.device_ptr_mut(&stream);
        for (kernel, blocks, args) in plan.launches(o, i, scratch_ptr, w2, s)? {
            // SAFETY: `AdalayerPlan::launches` documents each kernel's accesses: all within
            // p, m, g (n elements, checked), v (nb elements) and the workspace (scratch_len).
            unsafe { launch(dev, kernel, blocks, &args)? };
        }
        Ok(())
    })
}

/// `F ← β·F + α·U Uᵀ` in one cuBLAS gemm (the Kronecker-factor statistics update without
/// forming `U Uᵀ`): `u` is a contiguous row-major `d×m` matrix, `factor` a contiguous `d×d`
/// matrix, both of dtype `T` on one CUDA device. The result equals `ema_update(factor,
/// u·uᵀ, ..)` up to rounding (another summation order, and no separate rounding of `U Uᵀ`).
pub fn gram_ema<T: Float>(factor: &Tensor, u: &Tensor, alpha: f64, beta: f64) -> Result<()> {
    use cudarc::cublas::sys::{cublasDgemm_v2, cublasOperation_t, cublasSgemm_v2};
    let (d, m) = u.dims2()?;
    if factor.dims() != [d, d] {
        return Err(Error::Msg(format!(
            "gram_ema: factor {:?} for a {d}×{m} unfolding",
            factor.dims()
        )));
    }
    let too_big = |_| Error::Msg(format!("gram_ema: {d}×{m} exceeds cuBLAS's 32-bit sizes"));
    let (di, mi) = (
        i32::try_from(d).map_err(too_big)?,
        i32::try_from(m.max(1)).map_err(too_big)?,
    );
    if d == 0 {
        return Ok(());
    }
    with_device_ptrs::<T>(&[factor], &[u], |dev, o, i| {
        // cuBLAS runs in the calling thread's current context: make it the device's.
        dev.cuda_stream().context().bind_to_thread().w()?;
        let blas = dev.cublas_handle();
        let handle = *blas.handle();
        let (op_t, op_n) = (
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
        );
        // Row-major U (d×m) is column-major Uᶜ (m×d, leading dimension m), so U Uᵀ = Uᶜᵀ Uᶜ:
        // gemm(T, N) with k = m. C is F read and written in place as column-major d×d: each
        // memory location is updated from its own old value, so F's layout does not matter
        // (the new term lands transposed, and U Uᵀ is symmetric).
        // SAFETY: A = B = U holds m·d elements (lda = ldb = m), C = F holds d·d (ldc = d),
        // both checked by `with_device_ptrs` against their tensors; alpha/beta are host
        // scalars (cuBLAS's default pointer mode) living across the call; the handle is bound
        // to the device's stream.
        let status = unsafe {
            match T::DTYPE {
                candle_core::DType::F32 => {
                    let (a, b) = (alpha as f32, beta as f32);
                    let (u, f) = (i[0] as *const f32, o[0] as *mut f32);
                    cublasSgemm_v2(handle, op_t, op_n, di, di, mi, &a, u, mi, u, mi, &b, f, di)
                }
                candle_core::DType::F64 => {
                    let (u, f) = (i[0] as *const f64, o[0] as *mut f64);
                    cublasDgemm_v2(
                        handle, op_t, op_n, di, di, mi, &alpha, u, mi, u, mi, &beta, f, di,
                    )
                }
                other => {
                    return Err(Error::DType {
                        what: "gram_ema".into(),
                        dtype: other,
                    })
                }
            }
        };
        status
            .result()
            .map_err(|e| Error::Msg(format!("cuBLAS gemm in gram_ema: {e:?}")))
    })
}

/// Whether every element of `t` (contiguous, dtype `T`, on a CUDA device) is finite: one
/// reading pass on the device and one 8-byte copy back.
pub fn all_finite<T: Float>(t: &Tensor) -> Result<bool> {
    Ok(all_finite_each(&[t])?[0])
}

/// [`all_finite`] of tensors on one CUDA device (f32 or f64, any mix): one `nonfinite` launch
/// per tensor into its own flag, then a single copy of all flags to the host.
pub fn all_finite_each(ts: &[&Tensor]) -> Result<Vec<bool>> {
    let Some(first) = ts.first() else {
        return Ok(vec![]);
    };
    let candle_core::Device::Cuda(dev) = first.device() else {
        return Err(Error::Msg("all_finite_each: not a CUDA tensor".into()));
    };
    let mut flags = dev.alloc_zeros::<f64>(ts.len())?;
    {
        let stream = dev.cuda_stream();
        let (base, _sync) = flags.device_ptr_mut(&stream);
        for (k, t) in ts.iter().enumerate() {
            let t = t.contiguous()?;
            let n = t.elem_count();
            let flag = base + (k * std::mem::size_of::<f64>()) as u64;
            crate::with_float!(t.dtype(), "all_finite", T => {
                with_device_ptrs::<T>(&[], &[&t], |dev, _, i| {
                    let mut a = Args::<T>::new(&[], i, n, &[])?;
                    a.scratch = flag;
                    // SAFETY: reads x[j] for j < n (checked by `with_device_ptrs`) and writes
                    // flags[k], k < ts.len(), the allocation's length.
                    unsafe { launch(dev, "nonfinite", elementwise_blocks(n), &a) }
                })?;
            });
        }
    }
    let flags = dev.clone_dtoh(&flags)?;
    Ok(flags.iter().map(|&f| f == 0.0).collect())
}

/// Checks that the tensors all live on one CUDA device.
fn common_cuda_device(tensors: &[&Tensor]) -> Result<()> {
    let Some(first) = tensors.first() else {
        return Ok(());
    };
    for t in tensors {
        if !t.device().is_cuda() || !t.device().same_device(first.device()) {
            return Err(Error::Msg(format!(
                "fused CUDA kernel: every operand must be on the same CUDA device (found {:?} and {:?})",
                first.device().location(),
                t.device().location()
            )));
        }
    }
    Ok(())
}

type Launch<'a> = dyn FnMut(&CudaDevice, &[u64], &[u64]) -> Result<()> + 'a;

/// One level of the nesting: write-locks one output (through candle's in-place op), records
/// its device pointer and recurses into the next output, so every lock and cudarc stream guard
/// of the outer levels is still held when the innermost level launches.
struct Nest<'a, 'b> {
    rest: &'a [&'a Tensor],
    ins: &'a [&'a Tensor],
    elem_size: usize,
    ptrs: RefCell<&'b mut Vec<u64>>,
    launch: RefCell<&'b mut Launch<'a>>,
    dtype_ok: fn(&CudaStorage) -> bool,
    result: RefCell<Option<Result<()>>>,
}

impl InplaceOp1 for Nest<'_, '_> {
    fn name(&self) -> &'static str {
        "optlab-fused-cuda"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        *self.result.borrow_mut() = Some(Err(Error::Msg(
            "fused CUDA kernel called on a CPU tensor".into(),
        )));
        Ok(())
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let outcome = self.level(storage, layout);
        *self.result.borrow_mut() = Some(outcome);
        Ok(())
    }
}

impl Nest<'_, '_> {
    fn level(&self, storage: &mut CudaStorage, layout: &Layout) -> Result<()> {
        let (start, end) = contiguous_range(layout, "output")?;
        if !(self.dtype_ok)(storage) {
            return Err(Error::Msg(
                "fused CUDA kernel: output of the wrong dtype".into(),
            ));
        }
        let dev = storage.device.clone();
        let stream = dev.cuda_stream();
        // `as_cuda_slice_mut` is generic over the element type, but only the byte address is
        // needed here; the dtype was checked above.
        let (base, _sync) = match &mut storage.slice {
            candle_core::cuda_backend::CudaStorageSlice::F32(s) => {
                check_len(s.len(), end)?;
                s.device_ptr_mut(&stream)
            }
            candle_core::cuda_backend::CudaStorageSlice::F64(s) => {
                check_len(s.len(), end)?;
                s.device_ptr_mut(&stream)
            }
            _ => {
                return Err(Error::Msg(
                    "fused CUDA kernel: not an f32/f64 tensor".into(),
                ))
            }
        };
        self.ptrs
            .borrow_mut()
            .push(base + (start * self.elem_size) as u64);
        let mut ptrs = self.ptrs.borrow_mut();
        let mut launch = self.launch.borrow_mut();
        nest(
            self.rest,
            self.ins,
            self.elem_size,
            self.dtype_ok,
            &dev,
            &mut ptrs,
            &mut **launch,
        )
        // `_sync` drops here, after the launch was queued: cudarc records the write.
    }
}

fn check_len(len: usize, end: usize) -> Result<()> {
    if end > len {
        return Err(Error::Msg(format!(
            "fused CUDA kernel: layout ends at {end}, storage holds {len}"
        )));
    }
    Ok(())
}

fn contiguous_range(layout: &Layout, what: &str) -> Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg(format!("{what}: fused kernels need contiguous tensors")))
}

fn nest<'a>(
    outs: &'a [&'a Tensor],
    ins: &'a [&'a Tensor],
    elem_size: usize,
    dtype_ok: fn(&CudaStorage) -> bool,
    dev: &CudaDevice,
    ptrs: &mut Vec<u64>,
    launch: &mut Launch<'a>,
) -> Result<()> {
    if let Some((first, rest)) = outs.split_first() {
        let op = Nest {
            rest,
            ins,
            elem_size,
            ptrs: RefCell::new(ptrs),
            launch: RefCell::new(launch),
            dtype_ok,
            result: RefCell::new(None),
        };
        first.inplace_op1(&op)?;
        return op
            .result
            .into_inner()
            .unwrap_or_else(|| Err(Error::Msg("fused CUDA kernel did not run".into())));
    }
    // Innermost level: every output is write-locked by an enclosing frame. Read-lock the
    // inputs and hold their stream guards across the launch.
    let guards: Vec<_> = ins.iter().map(|t| t.storage_and_layout()).collect();
    let stream = dev.cuda_stream();
    let mut syncs = Vec::with_capacity(guards.len());
    let mut in_ptrs = Vec::with_capacity(guards.len());
    for (guard, layout) in &guards {
        let (start, end) = contiguous_range(layout, "input")?;
        let Storage::Cuda(s) = &**guard else {
            return Err(Error::Msg(
                "fused CUDA kernel: input not on a CUDA device".into(),
            ));
        };
        if !dtype_ok(s) {
            return Err(Error::Msg(
                "fused CUDA kernel: input of the wrong dtype".into(),
            ));
        }
        let (base, sync) = match &s.slice {
            candle_core::cuda_backend::CudaStorageSlice::F32(s) => {
                check_len(s.len(), end)?;
                s.device_ptr(&stream)
            }
            candle_core::cuda_backend::CudaStorageSlice::F64(s) => {
                check_len(s.len(), end)?;
                s.device_ptr(&stream)
            }
            _ => {
                return Err(Error::Msg(
                    "fused CUDA kernel: not an f32/f64 tensor".into(),
                ))
            }
        };
        syncs.push(sync);
        in_ptrs.push(base + (start * elem_size) as u64);
    }
    let result = launch(dev, ptrs, &in_ptrs);
    drop(syncs);
    result
}

/// Runs `launch` with the device pointers of `outs` (each write-locked, in order) and `ins`
/// (each read-locked), element type `T`, all on one CUDA device, contiguous and distinct.
///
/// This is the only place raw device pointers of optimizer tensors are taken. The pointers
/// are valid, and no other candle operation can touch these buffers, for the duration of the
/// call; `launch` only queues work on the device's stream, which candle's later operations on
/// the same tensors are ordered after.
pub fn with_device_ptrs<T: Float>(
    outs: &[&Tensor],
    ins: &[&Tensor],
    mut launch: impl FnMut(&CudaDevice, &[u64], &[u64]) -> Result<()>,
) -> Result<()> {
    let all: Vec<&Tensor> = outs.iter().chain(ins).copied().collect();
    common_cuda_device(&all)?;
    for (i, a) in all.iter().enumerate() {
        if a.dtype() != T::DTYPE {
            return Err(Error::DType {
                what: "fused CUDA kernel operand".into(),
                dtype: a.dtype(),
            });
        }
        if i < outs.len() {
            for b in &all[i + 1..] {
                if a.id() == b.id() {
                    return Err(Error::Msg(
                        "fused kernel operands must be distinct tensors".into(),
                    ));
                }
            }
        }
    }
    let Some(first) = all.first() else {
        return Err(Error::Msg("fused CUDA kernel without operands".into()));
    };
    let dev = match first.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        _ => unreachable!("checked by common_cuda_device"),
    };
    fn is_f32(s: &CudaStorage) -> bool {
        matches!(s.slice, candle_core::cuda_backend::CudaStorageSlice::F32(_))
    }
    fn is_f64(s: &CudaStorage) -> bool {
        matches!(s.slice, candle_core::cuda_backend::CudaStorageSlice::F64(_))
    }
    let dtype_ok: fn(&CudaStorage) -> bool = match T::DTYPE {
        candle_core::DType::F32 => is_f32,
        candle_core::DType::F64 => is_f64,
        other => {
            return Err(Error::DType {
                what: "fused CUDA kernel".into(),
                dtype: other,
            })
        }
    };
    let mut ptrs = Vec::with_capacity(outs.len());
    nest(
        outs,
        ins,
        std::mem::size_of::<T>(),
        dtype_ok,
        &dev,
        &mut ptrs,
        &mut launch,
    )
}

/// Adafactor's step on the device (the twin of `adafactor::run_pass`'s CPU path): the
/// [`AdafactorPlan`] launches over `outs` = (p, r or v, c if `has.0`, m if `has.1`) and `g`,
/// with one f64 workspace; RMS(p) goes to the f64 0-D tensor `rms` when given. Everything is
/// queued on the device's stream: no copy to the host, no wait.
pub fn adafactor<T: Float>(
    plan: &AdafactorPlan,
    outs: &[&Tensor],
    has: (bool, bool),
    g: &Tensor,
    rms: Option<&Tensor>,
    s: &[T],
    wide: &[f64],
) -> Result<()> {
    check_sizes("adafactor", plan.n, &[outs[0], g])?;
    with_device_ptrs::<T>(outs, &[g], |dev, o, i| {
        let o = AdafactorPlan::out_slots(o, has.0, has.1)?;
        let mut scratch = dev.alloc_zeros::<f64>(plan.scratch_len())?;
        let stream = dev.cuda_stream();
        let (scratch_ptr, _sync) = scratch.device_ptr_mut(&stream);
        let run = |rms_ptr: u64| -> Result<()> {
            for l in plan.launches(&o, i[0], scratch_ptr, rms_ptr, s, wide)? {
                // SAFETY: `AdafactorPlan` sizes the workspace for every region the kernels
                // index (kernels/fused.cu, `af_layout`); p, g (and m) hold n elements, r/c
                // batch·rows / batch·cols or v n (checked by `with_device_ptrs` against the
                // state shapes the rule created), `rms` one f64.
                match l {
                    AdafactorLaunch::Typed(name, blocks, args) => unsafe {
                        launch::<T>(dev, name, blocks, &args)?
                    },
                    AdafactorLaunch::Wide(name, blocks, args) => unsafe {
                        launch::<f64>(dev, name, blocks, &args)?
                    },
                }
            }
            Ok(())
        };
        match rms {
            Some(t) => with_device_ptrs::<f64>(&[t], &[], |_, r, _| run(r[0])),
            None => run(0),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel the Rust side launches is in the PTX for both dtypes.
    #[test]
    fn every_launched_kernel_is_in_the_ptx() {
        for name in crate::launch::KERNEL_NAMES {
            for suffix in ["f32", "f64"] {
                let entry = format!(".entry {name}_{suffix}(");
                assert!(FUSED_PTX.contains(&entry), "missing {entry}");
            }
        }
    }
}
