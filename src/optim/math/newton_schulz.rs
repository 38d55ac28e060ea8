//! Quintic Newton–Schulz orthogonalization, shared by Muon and MARS-Shampoo.
//!
//! Both references iterate the same odd polynomial `X ← a·X + b·(XXᵀ)X + c·(XXᵀ)²X` with the
//! coefficients `(a, b, c) = (3.4445, −4.7750, 2.0315)`, chosen to maximize the slope at zero
//! rather than to converge: the result is roughly `U S' Vᵀ` with `S'_ii ∈ [0.5, 1.5]`, not the
//! exact polar factor `U Vᵀ`. They group the products differently, which changes the rounding, so
//! each grouping is a [`NsForm`]:
//!
//! ```text
//! Muon:  A = X Xᵀ;  B = b·A + (c·A) A;  X ← a·X + B X          (KellerJordan/Muon)
//! MARS:  A = X Xᵀ;  B = A X;            X ← a·X + b·B + (c·A) B  (AGI-Arena/MARS)
//! ```
//!
//! The input is scaled to Frobenius norm ≤ 1 first (`X / (‖X‖_F + ε)`), and the iteration runs
//! on the wide orientation (`rows ≤ cols`, transposing tall inputs and transposing back), so the
//! Gram matrix `A` is the smaller of the two. The references run this in bfloat16; here it runs
//! in the input's dtype (f32 or f64) with candle matmuls, which is what the golden files check.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};

/// The Newton–Schulz coefficients `(a, b, c)` of both references.
pub const NS_COEFFS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);

/// The ε Muon adds to the Frobenius norm before scaling.
pub const MUON_NS_EPS: f64 = 1e-7;

/// How one iteration groups its products (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NsForm {
    /// KellerJordan/Muon `zeropower_via_newtonschulz5`: `B = b·A + (c·A)·A; X = a·X + B·X`.
    /// Inputs with more than two dims are batched over the leading dims, each slice normalized
    /// by its own norm.
    Muon,
    /// AGI-Arena/MARS `NewtonSchulz`: `B = A·X; X = a·X + b·B + (c·A)·B`. 2-D only; normalized
    /// by the norm of the whole tensor.
    Mars,
}

/// Runs `steps` Newton–Schulz iterations on `g` (≥ 2 dims; iterates over the last two) and
/// returns a contiguous tensor of `g`'s shape and dtype. `eps` is added to the norm.
pub fn newton_schulz(g: &Tensor, steps: usize, eps: f64, form: NsForm) -> Result<Tensor> {
    let dims = g.dims().to_vec();
    let nd = dims.len();
    if nd < 2 || (form == NsForm::Mars && nd != 2) {
        return Err(Error::Msg(format!(
            "Newton–Schulz ({form:?}) needs a {} tensor, got shape {dims:?}",
            if form == NsForm::Mars {
                "2-D"
            } else {
                "≥ 2-D"
            }
        )));
    }
    let (rows, cols) = (dims[nd - 2], dims[nd - 1]);
    // Batch the leading dims into one so candle's batched matmul sees rank 2 or 3.
    let x = if nd > 3 {
        g.reshape((dims[..nd - 2].iter().product::<usize>(), rows, cols))?
    } else {
        g.clone()
    };
    let tall = rows > cols;
    let mut x = if tall { x.t()?.contiguous()? } else { x };
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sum_keepdim(D::Minus2)?
        .sqrt()?;
    x = x.broadcast_div(&(norm + eps)?)?;
    let (a, b, c) = NS_COEFFS;
    for _ in 0..steps {
        let xt = x.t()?.contiguous()?;
        let gram = x.matmul(&xt)?;
        x = match form {
            NsForm::Muon => {
                let poly = ((&gram * b)? + (&gram * c)?.matmul(&gram)?)?;
                ((&x * a)? + poly.matmul(&x)?)?
            }
            NsForm::Mars => {
                let bx = gram.matmul(&x)?;
                (((&x * a)? + (&bx * b)?)? + (&gram * c)?.matmul(&bx)?)?
            }
        };
    }
    let x = if tall { x.t()? } else { x };
    Ok(x.contiguous()?.reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::testing::lcg_from_state;
    use candle_core::Device;

    /// Values in [-0.5, 0.5): the shared LCG's [-1, 1) halved (exactly, bit for bit).
    fn sample(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = lcg_from_state(seed, n).iter().map(|x| x * 0.5).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn singular_values_land_near_one() -> Result<()> {
        // After enough iterations every singular value sits in the references' (0.5, 1.5) band:
        // the eigenvalues of O Oᵀ lie in (0.25, 2.25), so its trace per row does too.
        for form in [NsForm::Muon, NsForm::Mars] {
            for shape in [[5usize, 9], [9, 5]] {
                let o = newton_schulz(&sample(&shape, 7), 10, 1e-7, form)?;
                assert_eq!(o.dims(), &shape);
                let small = shape[0].min(shape[1]);
                let gram = if shape[0] <= shape[1] {
                    o.matmul(&o.t()?)?
                } else {
                    o.t()?.matmul(&o)?
                };
                let trace: f64 = (0..small)
                    .map(|i| {
                        gram.get(i)
                            .unwrap()
                            .get(i)
                            .unwrap()
                            .to_scalar::<f64>()
                            .unwrap()
                    })
                    .sum();
                assert!(
                    (0.25 * small as f64..2.25 * small as f64).contains(&trace),
                    "{form:?} {shape:?}: trace {trace}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn forms_agree_and_batches_match_slices() -> Result<()> {
        let g = sample(&[3, 4, 6], 11);
        let batched = newton_schulz(&g, 5, 1e-7, NsForm::Muon)?;
        for i in 0..3 {
            let one = newton_schulz(&g.get(i)?, 5, 1e-7, NsForm::Muon)?;
            let mars = newton_schulz(&g.get(i)?, 5, 1e-7, NsForm::Mars)?;
            let d1 = (batched.get(i)? - &one)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            let d2 = (mars - &one)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(d1 < 1e-14 && d2 < 1e-12, "{d1} {d2}");
        }
        Ok(())
    }

    #[test]
    fn rejects_vectors() {
        let v = sample(&[4], 1);
        assert!(newton_schulz(&v, 5, 1e-7, NsForm::Muon).is_err());
        assert!(newton_schulz(&sample(&[2, 3, 4], 1), 5, 1e-7, NsForm::Mars).is_err());
    }
}
