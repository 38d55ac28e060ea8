//! Mean cross-entropy over the vocabulary, with OLMo's z-loss, from logits and target ids.
//!
//! For `N` rows of logits `x` (width `V`), targets `y`, `lse = log Σ_j exp(x_j)`, the softmax
//! `p = exp(x − lse)` and the z-loss coefficient `c`:
//!
//! ```text
//! forward:   ce = Σ_rows (lse − x_y) / N,   z = Σ_rows lse² / N,   total = ce + c·z
//! backward:  ∂total/∂x_j = g · (p_j (1 + 2c·lse) − [j = y]) / N
//! ```
//!
//! The op's output is `total`; `ce` and `z` come back as plain scalars for reporting. The
//! exponentials run in the logits' dtype, the sums in f64; the forward pass keeps `lse` per row
//! for the backward one.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::{check_float, for_row_blocks, op_err, slice, tensor, with_data, Elem};
use crate::error::{Error, Result};

const NAME: &str = "fused cross_entropy";

/// The loss terms of [`cross_entropy`].
#[derive(Debug, Clone)]
pub struct FusedLoss {
    /// `ce + z_loss · z`, a differentiable scalar.
    pub total: Tensor,
    /// Mean cross-entropy (a scalar without gradient).
    pub ce: Tensor,
    /// Mean squared log-partition (a scalar without gradient).
    pub z: Tensor,
}

/// Mean cross-entropy of `logits` `(…, V)` against U32 `targets` `(…)` (as many as there are
/// logit rows), plus `z_loss` times the mean squared log-sum-exp; CPU, f32/f64. Errors on
/// mismatched shapes, non-U32 targets and targets outside the vocabulary.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, z_loss: f64) -> Result<FusedLoss> {
    check_float(NAME, "logits", logits)?;
    let vocab = logits.dim(candle_core::D::Minus1)?;
    let logits = logits.reshape(((), vocab))?.contiguous()?;
    let targets = targets.flatten_all()?.contiguous()?;
    if targets.dtype() != DType::U32 {
        return Err(Error::DType {
            what: format!("{NAME} targets (token ids must be U32)"),
            dtype: targets.dtype(),
        });
    }
    let rows = logits.dim(0)?;
    if targets.dim(0)? != rows || rows == 0 {
        return Err(Error::Msg(format!(
            "{NAME}: {} targets for {rows} logit rows",
            targets.dim(0)?
        )));
    }
    if !targets.device().is_cpu() {
        return Err(Error::Msg(format!("{NAME}: targets must be on the CPU")));
    }
    if z_loss.is_nan() || z_loss < 0.0 || z_loss.is_infinite() {
        return Err(Error::Msg(format!(
            "{NAME}: z_loss must be ≥ 0, got {z_loss}"
        )));
    }
    let op = CrossEntropy {
        z_loss,
        terms: Mutex::new((0.0, 0.0)),
        lse: Mutex::new(Vec::new()),
    };
    // The op is moved into the graph; its reported terms travel back through a shared cell.
    let terms = std::sync::Arc::new(op);
    let total = logits.apply_op2_arc(
        &targets,
        std::sync::Arc::new(Box::new(Shared(terms.clone()))),
    )?;
    let (ce, z) = *terms
        .terms
        .lock()
        .map_err(|_| Error::Msg(format!("{NAME}: state poisoned")))?;
    let scalar = |v: f64| -> Result<Tensor> {
        Ok(Tensor::new(v, &candle_core::Device::Cpu)?.to_dtype(logits.dtype())?)
    };
    Ok(FusedLoss {
        total,
        ce: scalar(ce)?,
        z: scalar(z)?,
    })
}

struct CrossEntropy {
    z_loss: f64,
    /// `(ce, z)` of the last forward pass.
    terms: Mutex<(f64, f64)>,
    /// Log-sum-exp of every row, from the forward pass.
    lse: Mutex<Vec<f64>>,
}

/// Lets the op live both in the graph and with the caller, who reads the terms back.
struct Shared(std::sync::Arc<CrossEntropy>);

/// Log-sum-exp of one row, in f64.
#[inline]
fn lse<T: Elem>(row: &[T]) -> f64 {
    let mut max = row[0];
    for &v in row {
        max = max.fmax(v);
    }
    let mut sum = 0.0;
    for &v in row {
        sum += (v - max).exp().to_f64();
    }
    max.to_f64() + sum.ln()
}

fn check_targets(y: &[u32], vocab: usize) -> candle_core::Result<()> {
    match y.iter().find(|&&t| t as usize >= vocab) {
        Some(t) => Err(op_err(
            NAME,
            format!("target {t} outside the vocabulary of {vocab}"),
        )),
        None => Ok(()),
    }
}

impl CrossEntropy {
    fn fwd<T: Elem>(&self, x: &[T], y: &[u32]) -> candle_core::Result<T> {
        let n = y.len();
        let vocab = x.len() / n;
        check_targets(y, vocab)?;
        let (mut ce, mut z) = (0.0, 0.0);
        let mut lses = Vec::with_capacity(n);
        for (row, &t) in x.chunks_exact(vocab).zip(y) {
            let l = lse(row);
            ce += l - row[t as usize].to_f64();
            z += l * l;
            lses.push(l);
        }
        *self
            .lse
            .lock()
            .map_err(|_| op_err(NAME, "state poisoned"))? = lses;
        let (ce, z) = (ce / n as f64, z / n as f64);
        *self
            .terms
            .lock()
            .map_err(|_| op_err(NAME, "state poisoned"))? = (ce, z);
        Ok(T::from_f64(ce + self.z_loss * z))
    }

    fn bwd_t<T: Elem>(&self, x: &[T], y: &[u32], lses: &[f64], g: f64) -> Vec<T> {
        let n = y.len();
        let vocab = x.len() / n;
        let scale = g / n as f64;
        let mut dx = vec![T::ZERO; x.len()];
        for_row_blocks(&mut dx, vocab, |row0, out| {
            for (i, dr) in out.chunks_exact_mut(vocab).enumerate() {
                let r = row0 + i;
                let row = &x[r * vocab..(r + 1) * vocab];
                let l = lses[r];
                let w = scale * (1.0 + 2.0 * self.z_loss * l);
                let (lt, wt) = (T::from_f64(l), T::from_f64(w));
                for (o, &v) in dr.iter_mut().zip(row) {
                    *o = (v - lt).exp() * wt;
                }
                let t = y[r] as usize;
                dr[t] = T::from_f64((row[t].to_f64() - l).exp() * w - scale);
            }
        });
        dx
    }
}

impl CustomOp2 for Shared {
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
        let y: &[u32] = match s2 {
            CpuStorage::U32(v) => {
                let (a, b) = l2
                    .contiguous_offsets()
                    .ok_or_else(|| op_err(NAME, "targets must be contiguous"))?;
                &v[a..b]
            }
            _ => return Err(op_err(NAME, "targets must be U32")),
        };
        let out = match s1 {
            CpuStorage::F32(_) => {
                CpuStorage::F32(vec![self.0.fwd::<f32>(slice(NAME, s1, l1)?, y)?])
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(vec![self.0.fwd::<f64>(slice(NAME, s1, l1)?, y)?])
            }
            _ => return Err(op_err(NAME, "needs f32 or f64 logits")),
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let lses = self
            .0
            .lse
            .lock()
            .map_err(|_| op_err(NAME, "state poisoned"))?;
        if lses.len() != targets.elem_count() {
            return Err(op_err(NAME, "backward before forward"));
        }
        let dx = with_data::<u32, _>(NAME, targets, |ys| {
            macro_rules! run {
                ($t:ty) => {
                    with_data::<$t, _>(NAME, logits, |xs| {
                        tensor(self.0.bwd_t(xs, ys, &lses, g), logits.shape())
                    })
                };
            }
            match logits.dtype() {
                DType::F32 => run!(f32),
                DType::F64 => run!(f64),
                dt => Err(op_err(NAME, format!("unsupported dtype {dt:?}"))),
            }
        })?;
        Ok((Some(dx), None))
    }
}

#[cfg(test)]
mod tests {
    use super::super::check::{noise, rel_err, tol};
    use super::*;
    use candle_core::{Device, Var};

    fn targets(n: usize, vocab: u32) -> Tensor {
        let v: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % vocab).collect();
        Tensor::from_vec(v, n, &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_the_composition() {
        for dtype in [DType::F32, DType::F64] {
            for z_loss in [0.0, 1e-2] {
                let x = Var::from_tensor(&noise(&[3, 40, 256], 1, 6.0, dtype)).unwrap();
                let y = targets(120, 256).reshape((3, 40)).unwrap();
                let fused = cross_entropy(&x, &y, z_loss).unwrap();
                let reference = crate::models::lm_loss(&x, &y, z_loss).unwrap();
                for (a, b) in [(&fused.total, &reference.total), (&fused.ce, &reference.ce)] {
                    assert!(rel_err(a, b) < tol(dtype), "forward {dtype:?}");
                }
                if let Some(z) = &reference.z {
                    assert!(rel_err(&fused.z, z) < tol(dtype));
                }
                let gf = fused.total.affine(0.7, 0.0).unwrap().backward().unwrap();
                let gr = reference
                    .total
                    .affine(0.7, 0.0)
                    .unwrap()
                    .backward()
                    .unwrap();
                let e = rel_err(gf.get(&x).unwrap(), gr.get(&x).unwrap());
                assert!(e < tol(dtype), "gradient {dtype:?} z {z_loss}: {e}");
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let x = noise(&[4, 5], 1, 1.0, DType::F32);
        assert!(cross_entropy(&x, &targets(4, 5), 0.0).is_ok());
        assert!(cross_entropy(&x, &targets(3, 5), 0.0).is_err());
        assert!(cross_entropy(&x, &targets(4, 5).to_dtype(DType::I64).unwrap(), 0.0).is_err());
        let out_of_range = Tensor::new(&[0u32, 1, 5, 2], &Device::Cpu).unwrap();
        let err = cross_entropy(&x, &out_of_range, 0.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside the vocabulary"), "{err}");
        assert!(cross_entropy(&x, &targets(4, 5), -1.0).is_err());
        assert!(cross_entropy(&x.to_dtype(DType::U32).unwrap(), &targets(4, 5), 0.0).is_err());
        // Transposed logits are made contiguous.
        let xt = noise(&[5, 4], 2, 1.0, DType::F64).t().unwrap();
        let a = cross_entropy(&xt, &targets(4, 5), 0.0).unwrap().total;
        let b = crate::models::lm_loss(&xt, &targets(4, 5), 0.0)
            .unwrap()
            .total;
        assert!(rel_err(&a, &b) < 1e-12);
    }
}
