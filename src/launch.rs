//! The calling convention of the fused kernels in `kernels/fused.cu`, shared by the CUDA
//! launcher ([`crate::cuda`], feature `cuda`) and the host emulator ([`emulate`], built when
//! `OPTLAB_EMULATE_KERNELS=1` is set at build time).

use crate::error::{Error, Result};
use crate::float::Float;

/// Threads per block of every launch (the reduction kernels assume exactly this).
pub const THREADS: u32 = 256;
/// Most blocks of an elementwise launch; the kernels loop over the rest (grid stride).
pub const MAX_BLOCKS: usize = 1 << 16;
/// Elements per partial sum in Adalayer's block statistics.
pub const SUMSQ_CHUNK: usize = 8192;

/// The single argument of every kernel, laid out as `Args<T>` in `kernels/fused.cu`: written
/// buffers, read buffers, an f64 workspace, the element count, two integer parameters and the
/// scalar hyperparameters (addresses are device addresses, or host addresses in the emulator).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Args<T> {
    /// Buffers written in place, in the order of the Rust call site.
    pub out: [u64; 4],
    /// Buffers only read (the gradient first).
    pub ins: [u64; 2],
    /// f64 workspace, or 0.
    pub scratch: u64,
    /// Element count of every elementwise operand.
    pub n: u64,
    /// Integer parameters of the kernel.
    pub aux: [u64; 2],
    /// Scalar hyperparameters, in the order the kernel documents.
    pub s: [T; 16],
}

impl<T: Float> Args<T> {
    /// Arguments with `outs`, `ins`, `n` and `scalars`; scratch and aux zero.
    pub fn new(outs: &[u64], ins: &[u64], n: usize, scalars: &[T]) -> Result<Self> {
        let mut a = Args {
            out: [0; 4],
            ins: [0; 2],
            scratch: 0,
            n: n as u64,
            aux: [0; 2],
            s: [T::zero(); 16],
        };
        if outs.len() > a.out.len() || ins.len() > a.ins.len() || scalars.len() > a.s.len() {
            return Err(Error::Msg(format!(
                "fused kernel: at most 4 outputs, 2 inputs and 16 scalars (got {}, {}, {})",
                outs.len(),
                ins.len(),
                scalars.len()
            )));
        }
        a.out[..outs.len()].copy_from_slice(outs);
        a.ins[..ins.len()].copy_from_slice(ins);
        a.s[..scalars.len()].copy_from_slice(scalars);
        Ok(a)
    }
}

/// A launch with an explicit shape: the kernel, its grid (blocks of [`THREADS`]), the element
/// count `n`, the integer parameters, the scalars and an f64 workspace of `scratch_len`
/// elements (zeroed before, returned after the launch). The matrix kernels of the factor
/// refresh use it (src/linalg/on_device.rs); the elementwise updates need none of it.
#[derive(Debug, Clone, Copy)]
pub struct RawLaunch<'a, T> {
    /// Kernel name, without the dtype suffix.
    pub name: &'static str,
    /// Blocks of the grid.
    pub blocks: usize,
    /// The kernel's `n`.
    pub n: usize,
    /// The kernel's integer parameters.
    pub aux: [u64; 2],
    /// Scalar arguments (at most 16).
    pub scalars: &'a [T],
    /// f64 elements of the workspace.
    pub scratch_len: usize,
}

impl<T: Float> RawLaunch<'_, T> {
    /// The argument block for device (or host) addresses `outs`, `ins` and `scratch`.
    pub fn args(&self, outs: &[u64], ins: &[u64], scratch: u64) -> Result<Args<T>> {
        let mut a = Args::new(outs, ins, self.n, self.scalars)?;
        a.aux = self.aux;
        a.scratch = scratch;
        Ok(a)
    }
}

/// Blocks for a grid-stride elementwise launch over `n` elements.
pub fn elementwise_blocks(n: usize) -> usize {
    n.div_ceil(THREADS as usize).min(MAX_BLOCKS)
}

/// Checks that every operand of an elementwise kernel has `n` elements.
pub fn check_sizes(name: &str, n: usize, tensors: &[&candle_core::Tensor]) -> Result<()> {
    for t in tensors {
        if t.elem_count() != n {
            return Err(Error::Msg(format!(
                "{name}: operands of {n} and {} elements; the fused kernel needs equal sizes",
                t.elem_count()
            )));
        }
    }
    Ok(())
}

/// Adalayer's launches for a parameter of `n` elements in `nb` blocks of `len = n / nb`
/// consecutive elements: with a new block statistic, `adalayer_sumsq` (partial sums of g² over
/// chunks of [`SUMSQ_CHUNK`], in f64) and `adalayer_v` (v ← lerp(v, Σ/len, w2), one block per
/// Adalayer block), then the elementwise `adalayer_update`.
#[derive(Debug, Clone, Copy)]
pub struct AdalayerPlan {
    /// Adalayer blocks.
    pub nb: usize,
    /// Elements per block.
    pub len: usize,
    /// Partial sums per block.
    pub chunks: usize,
}

impl AdalayerPlan {
    /// The plan, or `None` when there is nothing to do (no elements or no blocks).
    pub fn new(n: usize, nb: usize) -> Option<Self> {
        if n == 0 || nb == 0 {
            return None;
        }
        let len = n / nb;
        Some(Self {
            nb,
            len,
            chunks: len.div_ceil(SUMSQ_CHUNK),
        })
    }

    /// f64 elements of the partial-sum workspace.
    pub fn scratch_len(&self) -> usize {
        self.nb * self.chunks
    }

    /// The launches in order, as (kernel, blocks, arguments), for outputs `o` = (p, m, v),
    /// inputs `i` = (g), the workspace address `scratch`, the statistic weight `w2` (`None`: v
    /// frozen) and `s` = (w1, decay, neg_step, bc2_sqrt, eps).
    pub fn launches<T: Float>(
        &self,
        o: &[u64],
        i: &[u64],
        scratch: u64,
        w2: Option<T>,
        s: [T; 5],
    ) -> Result<Vec<(&'static str, usize, Args<T>)>> {
        let covered = self.nb * self.len;
        let mut out = Vec::with_capacity(3);
        if let Some(w2) = w2 {
            if self.len > 0 {
                // Block (b, c) reads g[b·len + c·chunk ..] below (b + 1)·len and writes
                // scratch[b·chunks + c].
                let mut a = Args::new(&[], i, covered, &[])?;
                a.scratch = scratch;
                a.aux = [self.len as u64, SUMSQ_CHUNK as u64];
                out.push(("adalayer_sumsq", self.nb * self.chunks, a));
                // Block b reads scratch[b·chunks ..(b + 1)·chunks] and writes v[b].
                let mut a = Args::new(&o[2..3], &[], self.nb, &[w2])?;
                a.scratch = scratch;
                a.aux = [self.len as u64, self.chunks as u64];
                out.push(("adalayer_v", self.nb, a));
            }
        }
        // Element k < nb·len of p, m, g, and v[k / len].
        let mut a = Args::new(o, i, covered, &s)?;
        a.aux = [self.len.max(1) as u64, 0];
        out.push(("adalayer_update", elementwise_blocks(covered), a));
        Ok(out)
    }
}

/// Every kernel of `kernels/fused.cu` the Rust side launches.
pub const KERNEL_NAMES: &[&str] = &[
    "adamw",
    "adamw_amsgrad",
    "sign_momentum",
    "ademamix",
    "ademamix_no_m1",
    "simplified_ademamix",
    "adopt_init",
    "adopt",
    "cautious_moments",
    "cautious_update",
    "adalayer_sumsq",
    "adalayer_v",
    "adalayer_update",
    "adalayer_sgd",
    "schedule_free_adam",
    "schedule_free_sgd",
    "lerp_toward",
    "nonfinite",
    "muon_momentum",
    "muon_apply",
    "factor_ema",
    "ema_many",
    "soap_adam",
    "soap_apply",
    "sgd",
    "sgd_momentum",
    "sophia",
    "sophia_hessian",
    "shampoo_graft",
    "shampoo_update",
    "shampoo_update_momentum",
    "divide_by",
    "add_scaled",
    "mars_adam",
    "mars_lion",
    "mars_momentum",
    "mars_apply",
    "scale_by",
    "column_dots",
    "adafactor_row_partials",
    "adafactor_col_partials",
    "adafactor_cols",
    "adafactor_rows",
    "adafactor_sumsq",
    "adafactor_scale",
    "adafactor_apply",
];

/// Elements per partial sum of Adafactor's Σp² and Σu² (`AF_CHUNK` in kernels/fused.cu).
pub const ADAFACTOR_CHUNK: usize = 8192;
/// Rows per partial column sum, and columns per partial row sum, of Adafactor's factored
/// statistics (`AF_PART`).
pub const ADAFACTOR_PART: usize = 64;
/// f64 slots at the start of Adafactor's workspace (the step's scalars).
const ADAFACTOR_SLOTS: usize = 4;

/// Adafactor's launches for one parameter of `n` elements (the order and workspace layout of
/// the `adafactor_*` kernels in kernels/fused.cu): factored over `batch` matrices of `rows ×
/// cols`, or full (`rows = cols = 0`).
#[derive(Debug, Clone, Copy)]
pub struct AdafactorPlan {
    /// Elements of the parameter.
    pub n: usize,
    /// Matrices (0 for full storage).
    pub batch: usize,
    /// Rows per matrix (0 for full storage).
    pub rows: usize,
    /// Columns per matrix (0 for full storage).
    pub cols: usize,
}

/// One launch of an Adafactor step: in the parameter's dtype, or (the step's scalars, which
/// only touch the f64 workspace) always in f64.
#[derive(Debug, Clone, Copy)]
pub enum AdafactorLaunch<T> {
    /// `name_{f32,f64}` by the parameter's dtype.
    Typed(&'static str, usize, Args<T>),
    /// `name_f64`.
    Wide(&'static str, usize, Args<f64>),
}

impl AdafactorPlan {
    /// The plan, or `None` when there is nothing to do. `factored` is `(batch, rows, cols)`.
    pub fn new(n: usize, factored: Option<(usize, usize, usize)>) -> Option<Self> {
        if n == 0 {
            return None;
        }
        let (batch, rows, cols) = factored.unwrap_or((0, 0, 0));
        Some(Self {
            n,
            batch,
            rows,
            cols,
        })
    }

    /// Chunks of Σp² and Σu².
    pub fn chunks(&self) -> usize {
        self.n.div_ceil(ADAFACTOR_CHUNK)
    }

    /// Partial column sums per column.
    pub fn row_chunks(&self) -> usize {
        self.rows.div_ceil(ADAFACTOR_PART)
    }

    /// Partial row sums per row.
    pub fn col_chunks(&self) -> usize {
        self.cols.div_ceil(ADAFACTOR_PART)
    }

    /// f64 elements of the workspace: slots, row means, two chunk partials, row partials, column
    /// partials.
    pub fn scratch_len(&self) -> usize {
        ADAFACTOR_SLOTS
            + self.batch
            + 2 * self.chunks()
            + self.batch * self.rows * self.col_chunks()
            + self.batch * self.row_chunks() * self.cols
    }

    /// The kernels' output slots (p, r or v, c or 0, m or 0) from the addresses `o` of the
    /// outputs present, in that order.
    pub fn out_slots(o: &[u64], has_c: bool, has_m: bool) -> Result<[u64; 4]> {
        let want = 2 + usize::from(has_c) + usize::from(has_m);
        if o.len() != want {
            return Err(Error::Msg(format!(
                "adafactor: {} outputs, expected {want}",
                o.len()
            )));
        }
        let mut rest = o[2..].iter();
        let mut next = |present: bool| if present { rest.next().copied() } else { None };
        let c = next(has_c).unwrap_or(0);
        let m = next(has_m).unwrap_or(0);
        Ok([o[0], o[1], c, m])
    }

    /// The launches in order for outputs `o` = (p, r or v, c or 0, m or 0), input `i` = (g),
    /// the workspace at `scratch`, the f64 0-D tensor that receives RMS(p) at `rms` (or 0),
    /// the kernels' scalars `s` and the step scalars' `wide` (see kernels/fused.cu for both
    /// lists).
    pub fn launches<T: Float>(
        &self,
        o: &[u64; 4],
        i: u64,
        scratch: u64,
        rms: u64,
        s: &[T],
        wide: &[f64],
    ) -> Result<Vec<AdafactorLaunch<T>>> {
        let mut a = Args::new(o, &[i], self.n, s)?;
        a.scratch = scratch;
        a.aux = [self.rows as u64, self.cols as u64];
        let mut w = Args::<f64>::new(&[rms], &[], self.n, wide)?;
        w.scratch = scratch;
        w.aux = a.aux;
        let mut out = Vec::with_capacity(7);
        if self.batch > 0 {
            out.push(AdafactorLaunch::Typed(
                "adafactor_row_partials",
                elementwise_blocks(self.batch * self.rows * self.col_chunks()),
                a,
            ));
            out.push(AdafactorLaunch::Typed(
                "adafactor_col_partials",
                elementwise_blocks(self.batch * self.row_chunks() * self.cols),
                a,
            ));
            out.push(AdafactorLaunch::Typed(
                "adafactor_cols",
                elementwise_blocks(self.batch * self.cols),
                a,
            ));
            out.push(AdafactorLaunch::Typed(
                "adafactor_rows",
                self.batch.min(MAX_BLOCKS),
                a,
            ));
        }
        out.push(AdafactorLaunch::Typed("adafactor_sumsq", self.chunks(), a));
        out.push(AdafactorLaunch::Wide("adafactor_scale", 1, w));
        out.push(AdafactorLaunch::Typed(
            "adafactor_apply",
            elementwise_blocks(self.n),
            a,
        ));
        Ok(out)
    }
}

#[cfg(optlab_emulate_kernels)]
pub mod emulate;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_layout_matches_the_cuda_struct() {
        // 4 + 2 pointers, scratch, n, 2 aux (8 bytes each), then 16 scalars, no padding.
        assert_eq!(std::mem::size_of::<Args<f32>>(), 80 + 16 * 4);
        assert_eq!(std::mem::size_of::<Args<f64>>(), 80 + 16 * 8);
        assert_eq!(std::mem::offset_of!(Args<f32>, s), 80);
    }

    #[test]
    fn every_kernel_has_an_entry_point() {
        let src = include_str!("../kernels/fused.cu");
        for name in KERNEL_NAMES {
            assert!(
                src.contains(&format!("ENTRY({name},"))
                    || src.contains(&format!("ENTRY2({name},"))
                    || src.contains(&format!("ENTRY_SYNC({name},")),
                "no entry point for {name}"
            );
        }
    }

    #[test]
    fn adafactor_constants_match_the_kernels() {
        let src = include_str!("../kernels/fused.cu");
        assert!(src.contains(&format!("#define AF_CHUNK {ADAFACTOR_CHUNK}\n")));
        assert!(src.contains(&format!("#define AF_PART {ADAFACTOR_PART}\n")));
        assert!(src.contains(&format!("#define AF_THREADS {THREADS}\n")));
        assert!(src.contains(&format!("l.mean = l.slots + {ADAFACTOR_SLOTS};")));
    }

    #[test]
    fn grid_is_capped() {
        assert_eq!(elementwise_blocks(0), 0);
        assert_eq!(elementwise_blocks(1), 1);
        assert_eq!(elementwise_blocks(257), 2);
        assert_eq!(elementwise_blocks(usize::MAX / 2), MAX_BLOCKS);
    }
}
