//! Matrix products with a summation order fixed by their shapes alone, and the decoder's
//! `linear` (`x · wᵀ`) built on them.
//!
//! gemm, which candle's CPU matmul calls, sums the inner dimension `k` of a product in blocks
//! and adds the block sums in turn. For `k > 512` it derives the block length at run time from
//! the L1 cache's size and associativity (`gemm_common::cache::kernel_params`), so the same
//! product rounds differently on machines with another L1: in the decoder, every weight
//! gradient sums over the batch's tokens, more than 512 of them from a few sequences on.
//!
//! [`gemm_fixed`] cuts `k` before gemm sees it, into blocks of at most [`SUM_BLOCK`] terms,
//! which gemm never splits further on any machine, and adds the block products in order. Each
//! element of a block product is then one chain of fused multiply-adds over the block, in
//! order, whatever the register tiling, the thread count or the cache: the result is a function
//! of the operands and the shapes on every x86-64 CPU with AVX2 and FMA (gemm's AVX-512
//! kernels are not compiled in; see `docs/reproducibility.md` for what is not covered).
//!
//! The cut is the one gemm makes itself on the common 32 KiB 8-way L1 with its AVX2 kernels:
//! `⌈k/512⌉` blocks of equal length (the first ones one longer where `k` does not divide),
//! except when both other dimensions are at most 64, where gemm takes blocks of exactly 512 and
//! a shorter last one. Runs made on such machines before this module existed keep their bits.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use gemm::Parallelism;

use super::{check_float, op_err, slice, tensor, threads, with_data, Elem};
use crate::error::{Error, Result};

/// The longest sum gemm is handed at once.
pub const SUM_BLOCK: usize = 512;

/// The blocks `(start, len)` the inner dimension `k` of an `m × k · k × n` product is summed
/// in (see the module documentation).
pub fn sum_blocks(m: usize, n: usize, k: usize) -> impl Iterator<Item = (usize, usize)> {
    let (count, len) = if m <= 64 && n <= 64 {
        (k.div_ceil(SUM_BLOCK), SUM_BLOCK)
    } else {
        let count = k.div_ceil(SUM_BLOCK).max(1);
        (count, k.div_ceil(count))
    };
    (0..count)
        .map(move |i| (i * len, len.min(k.saturating_sub(i * len))))
        .filter(|&(_, len)| len > 0)
}

/// `dst (m×n) = beta · lhs (m×k) · rhs (k×n)`, or `dst += …` with `acc`, summing `k` in the
/// fixed [`sum_blocks`]. Strides are (row, column) pairs in elements.
///
/// # Safety
/// The pointers must address matrices of the given shapes and strides; `dst` must not overlap
/// the operands.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_fixed<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_s: (usize, usize),
    lhs: *const T,
    lhs_s: (usize, usize),
    rhs: *const T,
    rhs_s: (usize, usize),
    beta: T,
    acc: bool,
    parallelism: Parallelism,
) {
    if k == 0 {
        if !acc {
            for i in 0..m {
                for j in 0..n {
                    *dst.add(i * dst_s.0 + j * dst_s.1) = T::ZERO;
                }
            }
        }
        return;
    }
    for (start, len) in sum_blocks(m, n, k) {
        gemm::gemm(
            m,
            n,
            len,
            dst,
            dst_s.1 as isize,
            dst_s.0 as isize,
            acc || start > 0,
            lhs.add(start * lhs_s.1),
            lhs_s.1 as isize,
            lhs_s.0 as isize,
            rhs.add(start * rhs_s.0),
            rhs_s.1 as isize,
            rhs_s.0 as isize,
            T::ONE,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// gemm's parallelism for candle's thread count, as candle's matmul chooses it.
fn parallelism() -> Parallelism {
    match threads() {
        1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `a (m×k) · b (k×n)` of contiguous row-major slices, in the fixed summation order.
fn product<T: Elem>(
    a: &[T],
    a_s: (usize, usize),
    b: &[T],
    b_s: (usize, usize),
    m: usize,
    k: usize,
    n: usize,
) -> Vec<T> {
    let mut out = vec![T::ZERO; m * n];
    // SAFETY: the callers pass slices holding the m×k and k×n matrices at these strides.
    unsafe {
        gemm_fixed(
            m,
            n,
            k,
            out.as_mut_ptr(),
            (n, 1),
            a.as_ptr(),
            a_s,
            b.as_ptr(),
            b_s,
            T::ONE,
            false,
            parallelism(),
        )
    };
    out
}

const NAME: &str = "fused linear";

/// `x · wᵀ` for `x` of shape `(rows, in)` and a torch-layout weight `w` of shape `(out, in)`
/// (CPU, f32/f64), differentiable in both, with every product summed in the fixed order of
/// [`gemm_fixed`].
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    check_float(NAME, "input", x)?;
    check_float(NAME, "weight", w)?;
    let (_, in_dim) = x.dims2().map_err(|_| {
        Error::Msg(format!(
            "{NAME}: input must be (rows, features), got {:?}",
            x.dims()
        ))
    })?;
    let (_, w_in) = w.dims2().map_err(|_| {
        Error::Msg(format!(
            "{NAME}: weight must be (out, in), got {:?}",
            w.dims()
        ))
    })?;
    if in_dim != w_in || x.dtype() != w.dtype() {
        return Err(Error::Msg(format!(
            "{NAME}: input {:?} {:?} does not fit weight {:?} {:?}",
            x.dims(),
            x.dtype(),
            w.dims(),
            w.dtype()
        )));
    }
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, Linear)?)
}

struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, in_dim) = xl.shape().dims2()?;
        let (out_dim, _) = wl.shape().dims2()?;
        // y = x · wᵀ: wᵀ (in × out) is w read with swapped strides.
        let y = match (xs, ws) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(product::<f32>(
                slice(NAME, xs, xl)?,
                (in_dim, 1),
                slice(NAME, ws, wl)?,
                (1, in_dim),
                rows,
                in_dim,
                out_dim,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(product::<f64>(
                slice(NAME, xs, xl)?,
                (in_dim, 1),
                slice(NAME, ws, wl)?,
                (1, in_dim),
                rows,
                in_dim,
                out_dim,
            )),
            _ => return Err(op_err(NAME, "needs f32 or f64 operands of one dtype")),
        };
        Ok((y, Shape::from((rows, out_dim))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (rows, in_dim) = x.dims2()?;
        let (out_dim, _) = w.dims2()?;
        macro_rules! run {
            ($t:ty) => {
                with_data::<$t, _>(NAME, x, |xs| {
                    with_data::<$t, _>(NAME, w, |ws| {
                        with_data::<$t, _>(NAME, &grad, |gs| {
                            // ∂L/∂x = g · w: (rows × out) · (out × in), summed over out.
                            let dx = product(gs, (out_dim, 1), ws, (in_dim, 1), rows, out_dim, in_dim);
                            // ∂L/∂w = gᵀ · x: (out × rows) · (rows × in), summed over the rows.
                            let dw = product(gs, (1, out_dim), xs, (in_dim, 1), out_dim, rows, in_dim);
                            Ok((
                                tensor(dx, (rows, in_dim))?,
                                tensor(dw, (out_dim, in_dim))?,
                            ))
                        })
                    })
                })
            };
        }
        let (dx, dw) = match x.dtype() {
            DType::F32 => run!(f32)?,
            DType::F64 => run!(f64)?,
            dt => return Err(op_err(NAME, format!("unsupported dtype {dt:?}"))),
        };
        Ok((Some(dx), Some(dw)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::check::{noise, rel_err, tol};
    use super::*;
    use candle_core::Var;

    /// The blocks cover `0..k` in order, each at most [`SUM_BLOCK`] long.
    #[test]
    fn blocks_tile_the_sum() {
        for (m, n) in [(8, 8), (64, 64), (65, 8), (256, 64), (1, 1000)] {
            for k in [0, 1, 2, 511, 512, 513, 1000, 1024, 2047, 4096, 5000] {
                let blocks: Vec<_> = sum_blocks(m, n, k).collect();
                let mut next = 0;
                for &(start, len) in &blocks {
                    assert_eq!(start, next, "{m}×{n}, k {k}: {blocks:?}");
                    assert!((1..=SUM_BLOCK).contains(&len), "{m}×{n}, k {k}: {blocks:?}");
                    next += len;
                }
                assert_eq!(next, k, "{m}×{n}, k {k}: {blocks:?}");
            }
        }
        // gemm's own cut on a 32 KiB 8-way L1: balanced, except for small outputs.
        assert_eq!(
            sum_blocks(256, 64, 1000).collect::<Vec<_>>(),
            [(0, 500), (500, 500)]
        );
        assert_eq!(
            sum_blocks(64, 64, 1000).collect::<Vec<_>>(),
            [(0, 512), (512, 488)]
        );
        assert_eq!(sum_blocks(100, 100, 300).collect::<Vec<_>>(), [(0, 300)]);
    }

    /// Every element is the in-order fused multiply-add chain over each block, the block sums
    /// added in order: what the result must be on any machine with FMA, written as plain
    /// scalar code.
    fn reference<T: Elem + num_traits::Float>(
        a: &[T],
        b: &[T],
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<T> {
        let mut out = vec![T::ZERO; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut total = T::ZERO;
                for (bi, (start, len)) in sum_blocks(m, n, k).enumerate() {
                    let mut s = T::ZERO;
                    for p in start..start + len {
                        s = num_traits::Float::mul_add(a[i * k + p], b[p * n + j], s);
                    }
                    total = if bi == 0 { s } else { total + s };
                }
                out[i * n + j] = total;
            }
        }
        out
    }

    fn values<T: Elem>(len: usize, seed: u64) -> Vec<T> {
        noise(&[len], seed, 1.0, DType::F64)
            .to_vec1::<f64>()
            .unwrap()
            .into_iter()
            .map(T::from_f64)
            .collect()
    }

    fn fma_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("avx2")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    fn check_against_reference<T: Elem + num_traits::Float + std::fmt::Debug>() {
        // Outputs above 16×16 elements: smaller ones take gemm's horizontal kernels, which sum
        // in vector lanes (the same lanes on every AVX2 machine, but not this reference).
        for &(m, k, n) in &[
            (17, 37, 19),
            (64, 1000, 64),
            (256, 1000, 64),
            (40, 2048, 70),
            (96, 513, 130),
        ] {
            let a = values::<T>(m * k, 1);
            let b = values::<T>(k * n, 2);
            let want = reference(&a, &b, m, k, n);
            for par in [Parallelism::None, Parallelism::Rayon(4)] {
                let got = rayon::ThreadPoolBuilder::new()
                    .num_threads(4)
                    .build()
                    .unwrap()
                    .install(|| {
                        let mut out = vec![T::ZERO; m * n];
                        unsafe {
                            gemm_fixed(
                                m,
                                n,
                                k,
                                out.as_mut_ptr(),
                                (n, 1),
                                a.as_ptr(),
                                (k, 1),
                                b.as_ptr(),
                                (n, 1),
                                T::ONE,
                                false,
                                par,
                            )
                        };
                        out
                    });
                let differing = got.iter().zip(&want).filter(|(g, w)| g != w).count();
                assert_eq!(
                    differing, 0,
                    "{m}×{k}·{k}×{n} {par:?}: {differing} elements differ"
                );
            }
        }
    }

    #[test]
    fn products_are_the_fixed_fma_chains() {
        if !fma_available() {
            eprintln!("SKIP: no AVX2+FMA on this CPU; products round differently here");
            return;
        }
        check_against_reference::<f32>();
        check_against_reference::<f64>();
    }

    #[test]
    fn linear_matches_the_composition() {
        for dtype in [DType::F32, DType::F64] {
            for (rows, in_dim, out_dim) in [(3, 5, 4), (70, 64, 256), (1100, 48, 40)] {
                let x = Var::from_tensor(&noise(&[rows, in_dim], 1, 1.0, dtype)).unwrap();
                let w = Var::from_tensor(&noise(&[out_dim, in_dim], 2, 1.0, dtype)).unwrap();
                let g = noise(&[rows, out_dim], 3, 1.0, dtype);
                let fused = linear(&x, &w).unwrap();
                let composed = x.matmul(&w.t().unwrap()).unwrap();
                let e = rel_err(&fused, &composed);
                assert!(
                    e < tol(dtype),
                    "forward {dtype:?} {rows}×{in_dim}→{out_dim}: {e}"
                );
                let gf = (fused * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let gc = (composed * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for (name, v) in [("x", &x), ("w", &w)] {
                    let e = rel_err(gf.get(v).unwrap(), gc.get(v).unwrap());
                    assert!(
                        e < tol(dtype),
                        "∂/∂{name} {dtype:?} {rows}×{in_dim}→{out_dim}: {e}"
                    );
                }
            }
        }
        let x = noise(&[4, 3], 1, 1.0, DType::F32);
        assert!(linear(&x, &noise(&[2, 5], 1, 1.0, DType::F32)).is_err());
        assert!(linear(&x, &noise(&[2, 3], 1, 1.0, DType::F64)).is_err());
        assert!(linear(
            &x.reshape((2, 2, 3)).unwrap(),
            &noise(&[2, 3], 1, 1.0, DType::F32)
        )
        .is_err());
    }
}
