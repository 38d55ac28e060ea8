//! LayerNorm over the last dimension with a gain and no bias.
//!
//! Forward, per row `x` of width `D` (biased variance, as torch):
//!
//! ```text
//! μ = Σ x / D,   σ² = Σ (x − μ)² / D,   r = 1 / √(σ² + ε),   x̂ = (x − μ)·r,   y = x̂ ⊙ w
//! ```
//!
//! Backward, from the output gradient `g` (per row; `ĝ = g ⊙ w`):
//!
//! ```text
//! ∂L/∂x = r · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂)),    ∂L/∂w = Σ_rows g ⊙ x̂
//! ```
//!
//! The row statistics are recomputed in the backward pass (one pass over the row) instead of
//! being kept between the passes.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{check_float, for_row_blocks, op_err, slice, tensor, threads, with_data, Elem};
use crate::error::{Error, Result};

const NAME: &str = "fused layer_norm";

/// `LayerNorm(x) ⊙ weight` over the last dimension of `x` (CPU, f32/f64); differentiable in
/// `x` and `weight`. Errors when `weight` is not a vector as wide as that dimension.
pub fn layer_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    check_float(NAME, "input", x)?;
    check_float(NAME, "weight", weight)?;
    let d = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [d] {
        return Err(Error::Msg(format!(
            "{NAME}: weight of shape {:?} for rows of width {d}",
            weight.dims()
        )));
    }
    if x.dtype() != weight.dtype() {
        return Err(Error::Msg(format!(
            "{NAME}: input is {:?}, weight {:?}",
            x.dtype(),
            weight.dtype()
        )));
    }
    if eps.is_nan() || eps <= 0.0 {
        return Err(Error::Msg(format!(
            "{NAME}: eps must be positive, got {eps}"
        )));
    }
    Ok(x.contiguous()?
        .apply_op2(&weight.contiguous()?, LayerNorm { eps })?)
}

struct LayerNorm {
    eps: f64,
}

/// Lanes of the row sums: independent partial sums the compiler can keep in one vector
/// register (a single running sum is a serial chain it may not reorder).
const LANES: usize = 8;

/// `Σ_j f(a_j, b_j)` over two equally long rows, in [`LANES`] partial sums.
#[inline(always)]
fn sum2<T: Elem>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let mut acc = [T::ZERO; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for ((a, &x), &y) in acc.iter_mut().zip(xa).zip(xb) {
            *a += f(x, y);
        }
    }
    let mut total = T::ZERO;
    for (&x, &y) in ra.iter().zip(rb) {
        total += f(x, y);
    }
    for v in acc {
        total += v;
    }
    total
}

/// `Σ_j f(a_j, b_j, c_j)` over three equally long rows, in [`LANES`] partial sums.
#[inline(always)]
fn sum3<T: Elem>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> T) -> T {
    let mut acc = [T::ZERO; LANES];
    let (ca, cb, cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let (ra, rb, rc) = (ca.remainder(), cb.remainder(), cc.remainder());
    for ((xa, xb), xc) in ca.zip(cb).zip(cc) {
        for (((a, &x), &y), &z) in acc.iter_mut().zip(xa).zip(xb).zip(xc) {
            *a += f(x, y, z);
        }
    }
    let mut total = T::ZERO;
    for ((&x, &y), &z) in ra.iter().zip(rb).zip(rc) {
        total += f(x, y, z);
    }
    for v in acc {
        total += v;
    }
    total
}

/// Mean and 1/√(σ² + ε) of one row.
#[inline]
fn stats<T: Elem>(row: &[T], eps: f64) -> (T, T) {
    let d = T::from_f64(row.len() as f64);
    let mean = sum2(row, row, |v, _| v) / d;
    let sq = sum2(row, row, |v, _| (v - mean) * (v - mean));
    (mean, T::ONE / (sq / d + T::from_f64(eps)).sqrt())
}

impl LayerNorm {
    fn fwd<T: Elem>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let d = w.len();
        let mut y = vec![T::ZERO; x.len()];
        for_row_blocks(&mut y, d, |row0, out| {
            for (i, yr) in out.chunks_exact_mut(d).enumerate() {
                let xr = &x[(row0 + i) * d..(row0 + i + 1) * d];
                let (mean, r) = stats(xr, self.eps);
                for ((o, &v), &wj) in yr.iter_mut().zip(xr).zip(w) {
                    *o = (v - mean) * r * wj;
                }
            }
        });
        y
    }

    /// The gradients `(dx, dw)`. `dw[j] = Σ_rows g·x̂` is summed over the rows in order for
    /// every column, whatever the thread count (threads split the columns, never the rows of a
    /// sum), so the result is the same bits on any number of threads.
    fn bwd_t<T: Elem>(&self, x: &[T], w: &[T], g: &[T]) -> (Vec<T>, Vec<T>) {
        let d = w.len();
        let rows = x.len() / d.max(1);
        let inv_d = T::from_f64(1.0 / d as f64);
        // Mean and 1/σ of every row, once.
        let mut st = vec![T::ZERO; 2 * rows];
        for_row_blocks(&mut st, 2, |row0, out| {
            for (i, s) in out.chunks_exact_mut(2).enumerate() {
                let (mean, r) = stats(&x[(row0 + i) * d..(row0 + i + 1) * d], self.eps);
                s[0] = mean;
                s[1] = r;
            }
        });
        let mut dx = vec![T::ZERO; x.len()];
        for_row_blocks(&mut dx, d, |row0, out| {
            for (i, dxr) in out.chunks_exact_mut(d).enumerate() {
                let row = row0 + i;
                let base = row * d;
                let (xr, gr) = (&x[base..base + d], &g[base..base + d]);
                let (mean, r) = (st[2 * row], st[2 * row + 1]);
                // Σ ĝ and Σ ĝ·x̂ (the gain folded into g as ĝ = g ⊙ w).
                let sum_g = sum2(gr, w, |g, w| g * w);
                let sum_gx = sum3(xr, gr, w, |x, g, w| g * w * (x - mean)) * r;
                let (mg, mgx) = (sum_g * inv_d, sum_gx * inv_d);
                for (((o, &xj), &gj), &wj) in dxr.iter_mut().zip(xr).zip(gr).zip(w) {
                    let xh = (xj - mean) * r;
                    *o = r * (gj * wj - mg - xh * mgx);
                }
            }
        });
        let mut dw = vec![T::ZERO; d];
        let column_sums = |j0: usize, out: &mut [T]| {
            for row in 0..rows {
                let base = row * d + j0;
                let (mean, r) = (st[2 * row], st[2 * row + 1]);
                let (xr, gr) = (&x[base..base + out.len()], &g[base..base + out.len()]);
                for ((dwj, &gj), &xj) in out.iter_mut().zip(gr).zip(xr) {
                    *dwj += gj * ((xj - mean) * r);
                }
            }
        };
        let n = threads();
        if n == 1 || x.len() < 32 * 1024 || d < 2 {
            column_sums(0, &mut dw);
        } else {
            let cols = d.div_ceil(n);
            dw.par_chunks_mut(cols)
                .enumerate()
                .for_each(|(i, out)| column_sums(i * cols, out));
        }
        (dx, dw)
    }
}

impl CustomOp2 for LayerNorm {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = l1.shape().clone();
        let y = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(self.fwd::<f32>(slice(NAME, s1, l1)?, slice(NAME, s2, l2)?))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(self.fwd::<f64>(slice(NAME, s1, l1)?, slice(NAME, s2, l2)?))
            }
            _ => {
                return Err(op_err(
                    NAME,
                    "needs f32 or f64 input and weight of one dtype",
                ))
            }
        };
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        macro_rules! run {
            ($t:ty) => {
                with_data::<$t, _>(NAME, x, |xs| {
                    with_data::<$t, _>(NAME, w, |ws| {
                        with_data::<$t, _>(NAME, &grad, |gs| {
                            let (dx, dw) = self.bwd_t(xs, ws, gs);
                            Ok((tensor(dx, x.shape())?, tensor(dw, w.shape())?))
                        })
                    })
                })
            };
        }
        let (dx, dw) = match x.dtype() {
            candle_core::DType::F32 => run!(f32)?,
            candle_core::DType::F64 => run!(f64)?,
            dt => return Err(op_err(NAME, format!("unsupported dtype {dt:?}"))),
        };
        Ok((Some(dx), Some(dw)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::check::{noise, rel_err, tol};
    use super::*;
    use candle_core::{DType, Device, Var};

    fn compare(dtype: DType, shape: &[usize]) {
        let d = *shape.last().unwrap();
        let x = Var::from_tensor(&noise(shape, 1, 2.0, dtype)).unwrap();
        let w = Var::from_tensor(&(noise(&[d], 2, 0.5, dtype) + 1.0).unwrap()).unwrap();
        let g = noise(shape, 3, 1.0, dtype);
        let eps = 1e-5;
        let fused = layer_norm(&x, &w, eps).unwrap();
        let reference = crate::models::layer_norm(&x, Some(&w), None, eps).unwrap();
        assert!(
            rel_err(&fused, &reference) < tol(dtype),
            "forward {dtype:?}"
        );
        let gf = (fused * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (reference * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w] {
            let e = rel_err(gf.get(v).unwrap(), gr.get(v).unwrap());
            assert!(e < tol(dtype), "gradient {dtype:?} {shape:?}: {e}");
        }
    }

    #[test]
    fn matches_the_composition() {
        for dtype in [DType::F32, DType::F64] {
            compare(dtype, &[3, 5, 16]);
            compare(dtype, &[1, 7]);
            // Large enough to be split over threads when more than one is configured.
            compare(dtype, &[64, 9, 128]);
        }
    }

    #[test]
    fn non_contiguous_input_and_bad_shapes() {
        let x = noise(&[6, 4], 4, 1.0, DType::F64).t().unwrap();
        let w = Tensor::ones(6, DType::F64, &Device::Cpu).unwrap();
        let fused = layer_norm(&x, &w, 1e-5).unwrap();
        let reference = crate::models::layer_norm(&x, Some(&w), None, 1e-5).unwrap();
        assert!(rel_err(&fused, &reference) < 1e-12);
        let short = Tensor::ones(5, DType::F64, &Device::Cpu).unwrap();
        assert!(layer_norm(&x, &short, 1e-5).is_err());
        let f32w = Tensor::ones(6, DType::F32, &Device::Cpu).unwrap();
        assert!(layer_norm(&x, &f32w, 1e-5).is_err());
        assert!(layer_norm(&x.to_dtype(DType::U32).unwrap(), &w, 1e-5).is_err());
        assert!(layer_norm(&x, &w, 0.0).is_err());
    }
}
