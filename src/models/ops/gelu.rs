//! Exact (erf) GeLU, elementwise.
//!
//! ```text
//! forward:   y = x · Φ(x) = x · (1 + erf(x / √2)) / 2
//! backward:  ∂L/∂x = g · (Φ(x) + x · φ(x)),   φ(x) = exp(−x² / 2) / √(2π)
//! ```
//!
//! In f64 the forward matches candle's `gelu_erf` bit for bit (same erf, same expression); in
//! f32 it uses a branch-free erf ([`super::erf_f32`], within 3.4e-7 of erf) so the loops
//! vectorise. The backward is one pass where candle's composes about ten ops.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::{check_float, for_row_blocks, op_err, slice, tensor, with_data, Elem};
use crate::error::Result;

const NAME: &str = "fused gelu";
/// Elements per parallel block.
const BLOCK: usize = 4096;

/// Exact-erf GeLU of `x` (CPU, f32/f64), differentiable.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    check_float(NAME, "input", x)?;
    Ok(x.contiguous()?.apply_op1(Gelu)?)
}

struct Gelu;

#[inline(always)]
fn phi_cdf<T: Elem>(x: T) -> T {
    (T::from_f64(std::f64::consts::FRAC_1_SQRT_2) * x).erf() * T::from_f64(0.5) + T::from_f64(0.5)
}

fn fwd<T: Elem>(x: &[T]) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    for_row_blocks(&mut y, BLOCK, |start, out| {
        let start = start * BLOCK;
        for (o, &v) in out.iter_mut().zip(&x[start..]) {
            // The expression of candle's gelu_erf, so both paths agree exactly in f64.
            *o = ((v * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf() + T::ONE)
                * T::from_f64(0.5)
                * v;
        }
    });
    y
}

fn bwd_t<T: Elem>(x: &[T], g: &[T]) -> Vec<T> {
    let inv_sqrt_2pi = T::from_f64(1.0 / (2.0 * std::f64::consts::PI).sqrt());
    let mut dx = vec![T::ZERO; x.len()];
    for_row_blocks(&mut dx, BLOCK, |start, out| {
        let start = start * BLOCK;
        for ((o, &v), &gv) in out.iter_mut().zip(&x[start..]).zip(&g[start..]) {
            let pdf = (-(v * v) * T::from_f64(0.5)).exp() * inv_sqrt_2pi;
            *o = gv * (phi_cdf(v) + v * pdf);
        }
    });
    dx
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = match s {
            CpuStorage::F32(_) => CpuStorage::F32(fwd::<f32>(slice(NAME, s, l)?)),
            CpuStorage::F64(_) => CpuStorage::F64(fwd::<f64>(slice(NAME, s, l)?)),
            _ => return Err(op_err(NAME, "needs f32 or f64 input")),
        };
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        macro_rules! run {
            ($t:ty) => {
                with_data::<$t, _>(NAME, x, |xs| {
                    with_data::<$t, _>(NAME, &grad, |gs| tensor(bwd_t(xs, gs), x.shape()))
                })
            };
        }
        let dx = match x.dtype() {
            candle_core::DType::F32 => run!(f32)?,
            candle_core::DType::F64 => run!(f64)?,
            dt => return Err(op_err(NAME, format!("unsupported dtype {dt:?}"))),
        };
        Ok(Some(dx))
    }
}

#[cfg(test)]
mod tests {
    use super::super::check::{noise, rel_err, tol};
    use super::*;
    use candle_core::{DType, Var};

    /// Φ(x) + x·φ(x) from primitive ops.
    fn exact_derivative(x: &Tensor) -> Tensor {
        let cdf = ((x / 2f64.sqrt()).unwrap().erf().unwrap() + 1.0)
            .unwrap()
            .affine(0.5, 0.0)
            .unwrap();
        let pdf = (x.sqr().unwrap().affine(-0.5, 0.0).unwrap().exp().unwrap()
            / (2.0 * std::f64::consts::PI).sqrt())
        .unwrap();
        (cdf + (x * pdf).unwrap()).unwrap()
    }

    #[test]
    fn matches_the_composition() {
        for dtype in [DType::F32, DType::F64] {
            for shape in [&[4usize, 33][..], &[7, 64, 150]] {
                let x = Var::from_tensor(&noise(shape, 5, 4.0, dtype)).unwrap();
                let g = noise(shape, 6, 1.0, dtype);
                let fused = gelu(&x).unwrap();
                let reference = x.gelu_erf().unwrap();
                let e = rel_err(&fused, &reference);
                if dtype == DType::F64 {
                    assert_eq!(e, 0.0, "forward {dtype:?}");
                } else {
                    assert!(e < tol(dtype), "forward {dtype:?}: {e}");
                }
                let gf = (fused * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let gr = (reference * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let (gf, gr) = (gf.get(&x).unwrap(), gr.get(&x).unwrap());
                // candle's own backward writes 1/√(2π) as 0.398942 (6 digits): it is off by up
                // to ~3e-7 relative, so it is only the reference to that precision …
                let e = rel_err(gf, gr);
                assert!(e < 1e-6, "gradient vs candle {dtype:?}: {e}");
                // … and the exact derivative, composed from primitive ops, the tight one.
                let exact = exact_derivative(&x);
                let e = rel_err(gf, &(exact * &g).unwrap());
                assert!(e < tol(dtype), "gradient {dtype:?}: {e}");
            }
        }
        // Non-contiguous input.
        let x = noise(&[5, 3], 7, 2.0, DType::F64).t().unwrap();
        assert_eq!(
            rel_err(&gelu(&x).unwrap(), &x.gelu_erf().unwrap()),
            0.0,
            "transposed"
        );
        // The f32 erf against f64's, over the range where it is not saturated and beyond.
        for i in -50_000..=50_000 {
            let x = i as f32 * 1e-4;
            let want = candle_core::cpu::erf::erf_f64(x as f64);
            let got = super::super::erf_f32(x) as f64;
            assert!((got - want).abs() < 3.5e-7, "erf({x}) = {got}, want {want}");
        }
        assert!(gelu(&x.to_dtype(DType::U32).unwrap()).is_err());
    }
}
