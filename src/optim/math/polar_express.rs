//! Polar Express (Amsel, Persson, Musco & Gower 2025, arXiv 2505.16932) and microsoft/dion's
//! quintic Newton–Schulz: orthogonalization by five odd degree-5 polynomials, each iteration
//! with its own coefficients, as `dion/polar_express.py` and `dion/newton_schulz_triton.py`
//! compute them.
//!
//! ```text
//! X = U / (s·‖U‖_F + ε)                  per trailing matrix; s = 1.02 (Polar Express) or 1
//! for (a, b, c) in the five triples:     on the wide orientation (tall inputs transposed)
//!     A = X Xᵀ
//!     X ← a·X + (b·A + c·A²)·X
//! ```
//!
//! The Polar Express triples were optimized for five iterations with a 2 % safety margin (the
//! 1.02 keeps the spectral norm safely below 1); they are modded-nanogpt's too. The output's
//! singular values are only roughly 1, by design. There is no iteration-count knob: one
//! iteration per triple. The references run this in bfloat16; here it runs in the input's dtype
//! (f32 or f64) with candle matmuls, which is what the golden files check.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};

/// Polar Express's five `(a, b, c)` (dion @ 0a059a4, = modded-nanogpt's).
pub const POLAR_EXPRESS_COEFFS: [(f64, f64, f64); 5] = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
];

/// Polar Express's inflation of the norm before the iteration.
pub const POLAR_EXPRESS_SAFETY: f64 = 1.02;

/// dion's quintic Newton–Schulz (`use_polar_express = false`): five distinct triples, no
/// inflation of the norm.
pub const DION_NS_COEFFS: [(f64, f64, f64); 5] = [
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
];

/// Which polynomial sequence orthogonalizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orthogonalizer {
    /// [`POLAR_EXPRESS_COEFFS`], norm inflated by [`POLAR_EXPRESS_SAFETY`].
    PolarExpress,
    /// [`DION_NS_COEFFS`], plain norm.
    DionNewtonSchulz,
}

impl Orthogonalizer {
    fn plan(self) -> (&'static [(f64, f64, f64); 5], f64) {
        match self {
            Orthogonalizer::PolarExpress => (&POLAR_EXPRESS_COEFFS, POLAR_EXPRESS_SAFETY),
            Orthogonalizer::DionNewtonSchulz => (&DION_NS_COEFFS, 1.0),
        }
    }
}

/// Orthogonalizes `u` (≥ 2 dims; batched over the leading dims, one norm per trailing matrix)
/// and returns a contiguous tensor of `u`'s shape and dtype. `eps` is added to the scaled norm.
pub fn orthogonalize(u: &Tensor, eps: f64, which: Orthogonalizer) -> Result<Tensor> {
    let dims = u.dims().to_vec();
    let nd = dims.len();
    if nd < 2 {
        return Err(Error::Msg(format!(
            "{which:?} needs a tensor of two or more dims, got shape {dims:?}"
        )));
    }
    let (rows, cols) = (dims[nd - 2], dims[nd - 1]);
    let x = if nd > 3 {
        u.reshape((dims[..nd - 2].iter().product::<usize>(), rows, cols))?
    } else {
        u.clone()
    };
    let tall = rows > cols;
    let mut x = if tall { x.t()?.contiguous()? } else { x };
    let (coeffs, safety) = which.plan();
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sum_keepdim(D::Minus2)?
        .sqrt()?;
    x = x.broadcast_div(&((norm * safety)? + eps)?)?;
    for &(a, b, c) in coeffs {
        let gram = x.matmul(&x.t()?.contiguous()?)?;
        let poly = ((&gram * b)? + (&gram * c)?.matmul(&gram)?)?;
        x = ((&x * a)? + poly.matmul(&x)?)?;
    }
    let x = if tall { x.t()? } else { x };
    Ok(x.contiguous()?.reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::testing::lcg_from_state;
    use candle_core::Device;

    fn sample(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_vec(lcg_from_state(seed, n), shape, &Device::Cpu).unwrap()
    }

    fn gram_diag(o: &Tensor) -> Vec<f64> {
        let (r, c) = o.dims2().unwrap();
        let g = if r <= c {
            o.matmul(&o.t().unwrap()).unwrap()
        } else {
            o.t().unwrap().matmul(o).unwrap()
        };
        let n = r.min(c);
        (0..n)
            .map(|i| {
                g.get(i)
                    .unwrap()
                    .get(i)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn roughly_orthogonal_in_both_orientations() -> Result<()> {
        for which in [
            Orthogonalizer::PolarExpress,
            Orthogonalizer::DionNewtonSchulz,
        ] {
            for shape in [[6usize, 10], [10, 6], [7, 7]] {
                let o = orthogonalize(&sample(&shape, 3), 1e-8, which)?;
                assert_eq!(o.dims(), &shape);
                // The squared row (or column) norms of the short side sit near 1.
                for d in gram_diag(&o) {
                    assert!((0.5..1.5).contains(&d), "{which:?} {shape:?}: {d}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn tall_is_the_transpose_of_wide_and_batches_match_slices() -> Result<()> {
        let u = sample(&[5, 9], 4);
        let wide = orthogonalize(&u, 1e-8, Orthogonalizer::PolarExpress)?;
        let tall = orthogonalize(&u.t()?.contiguous()?, 1e-8, Orthogonalizer::PolarExpress)?;
        let d = (wide - tall.t()?)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert_eq!(d, 0.0);
        let b = sample(&[2, 3, 4, 6], 5);
        let batched = orthogonalize(&b, 1e-8, Orthogonalizer::PolarExpress)?;
        for i in 0..2 {
            for j in 0..3 {
                let one = orthogonalize(&b.get(i)?.get(j)?, 1e-8, Orthogonalizer::PolarExpress)?;
                let d = (batched.get(i)?.get(j)? - one)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f64>()?;
                assert!(d < 1e-14, "{d}");
            }
        }
        Ok(())
    }

    #[test]
    fn scale_invariant_and_zero_stays_zero() -> Result<()> {
        let u = sample(&[4, 6], 6);
        let a = orthogonalize(&u, 0.0, Orthogonalizer::PolarExpress)?;
        let b = orthogonalize(&(&u * 1e3)?, 0.0, Orthogonalizer::PolarExpress)?;
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(d < 1e-12, "{d}");
        let z = orthogonalize(&u.zeros_like()?, 1e-8, Orthogonalizer::PolarExpress)?;
        assert_eq!(z.abs()?.max_all()?.to_scalar::<f64>()?, 0.0);
        assert!(orthogonalize(&sample(&[4], 1), 1e-8, Orthogonalizer::PolarExpress).is_err());
        Ok(())
    }
}
