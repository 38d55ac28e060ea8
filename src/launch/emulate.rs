//! Host emulation of the fused CUDA kernels (built with `OPTLAB_EMULATE_KERNELS=1`).
//!
//! `build.rs` then also compiles `kernels/fused.cu` as ordinary C++ (`kernels/emulate/host.cpp`)
//! and links it. Inside [`with_emulation`], the optimizers' CPU paths launch that code instead
//! of running their plain-Rust twins, with exactly the kernel names, scalar lists and launch
//! shapes the CUDA path uses, on the CPU tensors' memory. Comparing the two runs checks the
//! kernels' arithmetic and indexing and the call sites' arguments without a GPU; what it cannot
//! check is the device itself (PTX compilation by the driver, device memory, streams).

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::float::{host_slices, Float};
use crate::launch::{
    check_sizes, elementwise_blocks, AdafactorLaunch, AdafactorPlan, AdalayerPlan, Args, RawLaunch,
    THREADS,
};

extern "C" {
    fn optlab_emulate_launch(
        name: *const c_char,
        args: *const c_void,
        grid: c_uint,
        block: c_uint,
    ) -> c_int;
}

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
}

static LAUNCHES: AtomicU64 = AtomicU64::new(0);

/// Emulated launches so far (all threads): lets a test prove the kernels ran.
pub fn launch_count() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

/// Runs `f` with the fused updates of this thread going through the emulated kernels.
pub fn with_emulation<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            ACTIVE.with(|a| a.set(self.0));
        }
    }
    let _reset = Reset(ACTIVE.with(|a| a.replace(true)));
    f()
}

/// Whether this thread is inside [`with_emulation`].
pub fn active() -> bool {
    ACTIVE.with(|a| a.get())
}

/// Runs one emulated launch.
///
/// # Safety
/// As for a CUDA launch: the addresses in `args` must be valid for what the kernel accesses.
unsafe fn launch<T: Float>(kernel: &str, blocks: usize, args: &Args<T>) -> Result<()> {
    if blocks == 0 {
        return Ok(());
    }
    let name = CString::new(format!("{kernel}_{}", T::DTYPE.as_str()))
        .map_err(|e| Error::Msg(e.to_string()))?;
    let blocks = c_uint::try_from(blocks).map_err(|e| Error::Msg(e.to_string()))?;
    let rc = optlab_emulate_launch(
        name.as_ptr(),
        (args as *const Args<T>).cast(),
        blocks,
        THREADS,
    );
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
    if rc != 0 {
        return Err(Error::Msg(format!(
            "emulated kernel {}: not found",
            name.to_string_lossy()
        )));
    }
    Ok(())
}

/// The emulated twin of [`crate::cuda::launch_elementwise`] on CPU tensors.
pub fn launch_elementwise<T: Float>(
    name: &'static str,
    outs: &[&Tensor],
    ins: &[&Tensor],
    scalars: &[T],
) -> Result<()> {
    let n = outs.first().map(|t| t.elem_count()).unwrap_or(0);
    check_sizes(name, n, outs)?;
    check_sizes(name, n, ins)?;
    host_slices::<T>(outs, ins, |o, i| {
        let o: Vec<u64> = o.iter_mut().map(|s| s.as_mut_ptr() as u64).collect();
        let i: Vec<u64> = i.iter().map(|s| s.as_ptr() as u64).collect();
        let args = Args::new(&o, &i, n, scalars)?;
        // SAFETY: every slice holds `n` elements (checked above) and stays borrowed by
        // `zip_mut` for the call.
        unsafe { launch(name, elementwise_blocks(n), &args) }
    })
}

/// The emulated twin of [`crate::cuda::launch_raw`] on CPU tensors.
pub fn launch_raw<T: Float>(
    l: &RawLaunch<'_, T>,
    outs: &[&Tensor],
    ins: &[&Tensor],
) -> Result<Vec<f64>> {
    let mut scratch = vec![0.0f64; l.scratch_len.max(1)];
    let scratch_ptr = scratch.as_mut_ptr() as u64;
    host_slices::<T>(outs, ins, |o, i| {
        let o: Vec<u64> = o.iter_mut().map(|s| s.as_mut_ptr() as u64).collect();
        let i: Vec<u64> = i.iter().map(|s| s.as_ptr() as u64).collect();
        let args = l.args(&o, &i, scratch_ptr)?;
        // SAFETY: as for the CUDA launch; the slices stay borrowed by `zip_mut` for the call.
        unsafe { launch(l.name, l.blocks, &args) }
    })?;
    scratch.truncate(l.scratch_len);
    Ok(scratch)
}

/// The emulated twin of [`crate::cuda::adalayer`] on CPU tensors.
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
    let mut scratch = vec![0.0f64; plan.scratch_len().max(1)];
    let scratch_ptr = scratch.as_mut_ptr() as u64;
    host_slices::<T>(&[p, m, v], &[g], |o, i| {
        let o: Vec<u64> = o.iter_mut().map(|s| s.as_mut_ptr() as u64).collect();
        let i: Vec<u64> = i.iter().map(|s| s.as_ptr() as u64).collect();
        for (kernel, blocks, args) in plan.launches(&o, &i, scratch_ptr, w2, s)? {
            // SAFETY: see `AdalayerPlan::launches`; the workspace holds scratch_len f64.
            unsafe { launch(kernel, blocks, &args)? };
        }
        Ok(())
    })
}

/// The emulated twin of [`crate::cuda::all_finite`] on a contiguous CPU tensor.
pub fn all_finite<T: Float>(t: &Tensor) -> Result<bool> {
    let n = t.elem_count();
    let mut flag = [0.0f64];
    host_slices::<T>(&[], &[t], |_, i| {
        let mut args = Args::<T>::new(&[], &[i[0].as_ptr() as u64], n, &[])?;
        args.scratch = flag.as_mut_ptr() as u64;
        // SAFETY: reads n elements of the slice, writes flag[0].
        unsafe { launch("nonfinite", elementwise_blocks(n), &args) }
    })?;
    Ok(flag[0] == 0.0)
}

/// The emulated twin of [`crate::cuda::adafactor`] on CPU tensors.
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
    let mut scratch = vec![0.0f64; plan.scratch_len()];
    let scratch_ptr = scratch.as_mut_ptr() as u64;
    host_slices::<T>(outs, &[g], |o, i| {
        let o: Vec<u64> = o.iter_mut().map(|s| s.as_mut_ptr() as u64).collect();
        let o = AdafactorPlan::out_slots(&o, has.0, has.1)?;
        let i = i[0].as_ptr() as u64;
        let run = |rms_ptr: u64| -> Result<()> {
            for l in plan.launches(&o, i, scratch_ptr, rms_ptr, s, wide)? {
                // SAFETY: as for the CUDA launches; the slices stay borrowed by `zip_mut` and
                // the workspace holds scratch_len f64.
                match l {
                    AdafactorLaunch::Typed(name, blocks, args) => unsafe {
                        launch::<T>(name, blocks, &args)?
                    },
                    AdafactorLaunch::Wide(name, blocks, args) => unsafe {
                        launch::<f64>(name, blocks, &args)?
                    },
                }
            }
            Ok(())
        };
        match rms {
            Some(t) => host_slices::<f64>(&[t], &[], |r, _| run(r[0].as_mut_ptr() as u64)),
            None => run(0),
        }
    })
}
