//! Half-split rotary position embedding, applied per head to a `(batch, time, heads·head_dim)`
//! tensor, so the heads need not be split into their own axis first.
//!
//! With `h = head_dim / 2`, a head's slice `x` at position `p`, and the tables `c = cos[p]`,
//! `s = sin[p]` (each `head_dim` wide):
//!
//! ```text
//! forward:   y_j = x_j c_j − x_{j+h} s_j          (j < h)
//!            y_j = x_j c_j + x_{j−h} s_j          (j ≥ h)
//! backward:  ∂L/∂x_j = g_j c_j + g_{j+h} s_{j+h}  (j < h)
//!            ∂L/∂x_j = g_j c_j − g_{j−h} s_{j−h}  (j ≥ h)
//! ```
//!
//! that is `y = x ⊙ cos + rotate_half(x) ⊙ sin` with `rotate_half([x₁, x₂]) = [−x₂, x₁]`, and the
//! backward is the transposed rotation. The tables are constants (no gradient).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::{check_float, check_rows, for_row_blocks, op_err, slice, tensor, with_data, Elem};
use crate::error::{Error, Result};

const NAME: &str = "fused rope";

/// Rotates every head of `x` by the angles of its position; `x` holds sequences of `time`
/// rows of width `n_heads·head_dim`, as `(batch, time, width)` or flattened to
/// `(batch·time, width)` (the shape is kept). `cos` and `sin` are `(≥ time, head_dim)` tables
/// (rows past `time` are ignored). CPU, f32/f64; differentiable in `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, n_heads: usize, time: usize) -> Result<Tensor> {
    check_float(NAME, "input", x)?;
    let d = x.dim(candle_core::D::Minus1)?;
    let t = time;
    check_rows(NAME, x, t)?;
    if n_heads == 0 || !d.is_multiple_of(n_heads) || !(d / n_heads).is_multiple_of(2) {
        return Err(Error::Msg(format!(
            "{NAME}: width {d} does not split into {n_heads} heads of even width"
        )));
    }
    let hd = d / n_heads;
    for (name, table) in [("cos", cos), ("sin", sin)] {
        let (rows, cols) = table.dims2()?;
        if rows < t || cols != hd || table.dtype() != x.dtype() || !table.device().is_cpu() {
            return Err(Error::Msg(format!(
                "{NAME}: {name} table {:?} {:?} for {t} positions of head width {hd} ({:?})",
                table.dims(),
                table.dtype(),
                x.dtype()
            )));
        }
    }
    let cos = cos.narrow(0, 0, t)?.contiguous()?;
    let sin = sin.narrow(0, 0, t)?.contiguous()?;
    Ok(x.contiguous()?.apply_op3(&cos, &sin, Rope { n_heads, t })?)
}

struct Rope {
    n_heads: usize,
    /// Positions per sequence.
    t: usize,
}

impl Rope {
    /// Applies the rotation (or, when `inverse`, its transpose: the backward pass) to every row
    /// of `x`.
    fn run<T: Elem>(
        &self,
        x: &[T],
        cos: &[T],
        sin: &[T],
        t: usize,
        d: usize,
        inverse: bool,
    ) -> Vec<T> {
        let hd = d / self.n_heads;
        let h = hd / 2;
        let mut y = vec![T::ZERO; x.len()];
        for_row_blocks(&mut y, d, |row0, out| {
            for (i, yr) in out.chunks_exact_mut(d).enumerate() {
                let row = row0 + i;
                let p = row % t;
                let (c, s) = (&cos[p * hd..(p + 1) * hd], &sin[p * hd..(p + 1) * hd]);
                let xr = &x[row * d..(row + 1) * d];
                for (yh, xh) in yr.chunks_exact_mut(hd).zip(xr.chunks_exact(hd)) {
                    for j in 0..h {
                        let (a, b) = (xh[j], xh[j + h]);
                        if inverse {
                            yh[j] = a * c[j] + b * s[j + h];
                            yh[j + h] = b * c[j + h] - a * s[j];
                        } else {
                            yh[j] = a * c[j] - b * s[j];
                            yh[j + h] = b * c[j + h] + a * s[j + h];
                        }
                    }
                }
            }
        });
        y
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, d) = (self.t, l1.shape().dims().last().copied().unwrap_or(1));
        macro_rules! run {
            ($t:ty) => {
                self.run::<$t>(
                    slice(NAME, s1, l1)?,
                    slice(NAME, s2, l2)?,
                    slice(NAME, s3, l3)?,
                    t,
                    d,
                    false,
                )
            };
        }
        let y = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(run!(f32))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(run!(f64))
            }
            _ => return Err(op_err(NAME, "needs f32 or f64 tensors of one dtype")),
        };
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (t, d) = (self.t, x.dim(candle_core::D::Minus1)?);
        let grad = grad.contiguous()?;
        macro_rules! run {
            ($t:ty) => {
                with_data::<$t, _>(NAME, &grad, |gs| {
                    with_data::<$t, _>(NAME, cos, |cs| {
                        with_data::<$t, _>(NAME, sin, |ss| {
                            tensor(self.run(gs, cs, ss, t, d, true), x.shape())
                        })
                    })
                })
            };
        }
        let dx = match x.dtype() {
            candle_core::DType::F32 => run!(f32)?,
            candle_core::DType::F64 => run!(f64)?,
            dt => return Err(op_err(NAME, format!("unsupported dtype {dt:?}"))),
        };
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::super::check::{noise, rel_err, tol};
    use super::*;
    use candle_core::{DType, Var};

    /// The model's reference path: split the heads, rotate with the composed op, merge back.
    fn composed(x: &Tensor, cos: &Tensor, sin: &Tensor, nh: usize) -> Tensor {
        let (b, t, d) = x.dims3().unwrap();
        let heads = x
            .reshape((b, t, nh, d / nh))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let cos = cos.narrow(0, 0, t).unwrap();
        let sin = sin.narrow(0, 0, t).unwrap();
        crate::models::gpt::rope_composed(&heads, &cos, &sin)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, d))
            .unwrap()
    }

    #[test]
    fn matches_the_composition() {
        for dtype in [DType::F32, DType::F64] {
            for (b, t, nh, hd, ctx) in [(2, 5, 3, 4, 8), (4, 64, 4, 32, 64), (1, 1, 1, 2, 3)] {
                let d = nh * hd;
                let x = Var::from_tensor(&noise(&[b, t, d], 8, 1.0, dtype)).unwrap();
                let cos = noise(&[ctx, hd], 9, 1.0, dtype);
                let sin = noise(&[ctx, hd], 10, 1.0, dtype);
                let g = noise(&[b, t, d], 11, 1.0, dtype);
                let fused = rope(&x, &cos, &sin, nh, t).unwrap();
                let flat = rope(&x.reshape((b * t, d)).unwrap(), &cos, &sin, nh, t).unwrap();
                assert_eq!(rel_err(&flat.reshape((b, t, d)).unwrap(), &fused), 0.0);
                let reference = composed(&x, &cos, &sin, nh);
                assert!(rel_err(&fused, &reference) < tol(dtype), "forward");
                let gf = (fused * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let gr = (reference * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let e = rel_err(gf.get(&x).unwrap(), gr.get(&x).unwrap());
                assert!(e < tol(dtype), "gradient {dtype:?}: {e}");
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = noise(&[2, 4, 8], 1, 1.0, DType::F32);
        let tab = noise(&[4, 4], 2, 1.0, DType::F32);
        assert!(rope(&x, &tab, &tab, 2, 4).is_ok());
        assert!(rope(&x, &tab, &tab, 3, 4).is_err()); // 8 / 3
        assert!(rope(&x, &tab, &tab, 8, 4).is_err()); // odd head width 1
        assert!(rope(&x, &tab, &tab, 0, 4).is_err());
        assert!(rope(&x, &tab, &tab, 2, 3).is_err()); // 8 rows are not sequences of 3
        assert!(rope(&x, &tab, &tab, 2, 0).is_err());
        let short = noise(&[3, 4], 2, 1.0, DType::F32);
        assert!(rope(&x, &short, &tab, 2, 4).is_err());
        assert!(rope(&x, &tab.to_dtype(DType::F64).unwrap(), &tab, 2, 4).is_err());
        assert!(rope(
            &Tensor::new(1f32, &candle_core::Device::Cpu).unwrap(),
            &tab,
            &tab,
            2,
            1
        )
        .is_err());
        // A transposed input is made contiguous.
        let xt = noise(&[2, 8, 4], 3, 1.0, DType::F64)
            .transpose(1, 2)
            .unwrap();
        let tab = noise(&[4, 4], 2, 1.0, DType::F64);
        let want = composed(&xt, &tab, &tab, 2);
        assert!(rel_err(&rope(&xt, &tab, &tab, 2, 4).unwrap(), &want) < 1e-12);
    }
}
