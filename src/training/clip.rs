//! Global-norm gradient clipping, as `torch.nn.utils.clip_grad_norm_` computes it (and as the
//! OLMo trainers of the critical-batch-size and Deconstructing papers clip, at max norm 1.0):
//!
//! ```text
//! ‖g‖ = sqrt(Σ_params Σ_i g_i²)          over every listed variable that has a gradient
//! c   = max_norm / (‖g‖ + 1e-6)
//! g  ← c · g   for every such gradient, when c < 1
//! ```
//!
//! The norm is accumulated in f64 (torch accumulates in the gradients' dtype, so f32 runs agree
//! to f32 rounding); the factor is rounded to the gradients' dtype once, as torch's `mul_` does.
//! Scaled gradients are new tensors put back into the [`GradStore`]: candle may hand the same
//! gradient tensor to several variables (both operands of an `add`), so scaling in place could
//! scale a shared gradient twice.
//!
//! A NaN or infinite norm is an error naming the first offending variable, and nothing is
//! scaled: torch (with its default `error_if_nonfinite=False`) would multiply every gradient by
//! NaN and let the step go ahead. [`grad_norm`] measures without clipping, for loops that want
//! to log or skip instead.
//!
//! ```
//! use candle_core::{Device, Var};
//! use optlab::training::clip_grad_norm;
//!
//! # fn main() -> optlab::Result<()> {
//! let w = Var::new(&[3f32, 4.], &Device::Cpu)?;
//! let loss = w.sqr()?.sum_all()?.affine(0.5, 0.)?; // gradient = w, norm 5
//! let mut grads = loss.backward()?;
//! let norm = clip_grad_norm(&mut grads, [&w], 1.0)?;
//! assert_eq!(norm, 5.0);
//! let g = grads.get(&w).unwrap().to_vec1::<f32>()?;
//! assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
//! # Ok(()) }
//! ```

use std::collections::HashSet;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::optim::fused::sum_sq;

/// Added to the norm before dividing (torch's constant).
pub const CLIP_EPS: f64 = 1e-6;

/// Sum of squares of a gradient in f64, whatever its float dtype.
fn grad_sum_sq(g: &Tensor) -> Result<f64> {
    match g.dtype() {
        DType::F32 | DType::F64 => sum_sq(g),
        _ => sum_sq(&g.to_dtype(DType::F64)?),
    }
}

/// The distinct variables (by id) that have a gradient, with a label for errors.
fn with_grads<'a>(
    grads: &GradStore,
    vars: impl IntoIterator<Item = (String, &'a Var)>,
) -> Vec<(String, &'a Var, Tensor)> {
    let mut seen = HashSet::new();
    vars.into_iter()
        .filter(|(_, v)| seen.insert(v.id()))
        .filter_map(|(name, v)| grads.get(v.as_tensor()).map(|g| (name, v, g.clone())))
        .collect()
}

/// Per-variable sums of squares and the total norm.
fn norms(present: &[(String, &Var, Tensor)]) -> Result<(Vec<f64>, f64)> {
    let sums = present
        .iter()
        .map(|(_, _, g)| grad_sum_sq(g))
        .collect::<Result<Vec<f64>>>()?;
    let total = sums.iter().sum::<f64>().sqrt();
    Ok((sums, total))
}

fn clip_labelled<'a>(
    grads: &mut GradStore,
    vars: impl IntoIterator<Item = (String, &'a Var)>,
    max_norm: f64,
) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::config(
            "max_norm",
            format!("must be finite and > 0, got {max_norm}"),
        ));
    }
    let present = with_grads(grads, vars);
    let (sums, norm) = norms(&present)?;
    if !norm.is_finite() {
        let culprit = present
            .iter()
            .zip(&sums)
            .find(|(_, s)| !s.is_finite())
            .map(|((name, _, _), _)| format!("the gradient of `{name}` holds NaN or infinity"))
            .unwrap_or_else(|| "the sum of squares overflowed f64".into());
        return Err(Error::Numerical(format!(
            "gradient norm is {norm} ({culprit}); no gradient was clipped"
        )));
    }
    let coef = max_norm / (norm + CLIP_EPS);
    if coef < 1.0 {
        for (_, var, g) in &present {
            grads.insert(var.as_tensor(), g.affine(coef, 0.0)?);
        }
    }
    Ok(norm)
}

/// Total L2 norm (in f64) of the gradients of `vars`; variables without a gradient are skipped,
/// a variable listed twice counts once. Non-finite values give a non-finite norm, not an error.
pub fn grad_norm<'a>(grads: &GradStore, vars: impl IntoIterator<Item = &'a Var>) -> Result<f64> {
    let present = with_grads(grads, vars.into_iter().map(|v| (String::new(), v)));
    Ok(norms(&present)?.1)
}

/// Clips the gradients of `vars` in `grads` to a total L2 norm of `max_norm` and returns the
/// norm before clipping (see the module docs). Variables without a gradient are skipped; a
/// variable listed twice counts once. Errors, changing nothing, if the norm is not finite.
pub fn clip_grad_norm<'a>(
    grads: &mut GradStore,
    vars: impl IntoIterator<Item = &'a Var>,
    max_norm: f64,
) -> Result<f64> {
    clip_labelled(
        grads,
        vars.into_iter()
            .enumerate()
            .map(|(i, v)| (format!("#{i} (shape {:?})", v.dims()), v)),
        max_norm,
    )
}

/// [`clip_grad_norm`] over named variables (as [`Optimizer::vars`] lists them), so a non-finite
/// gradient is reported by name.
///
/// [`Optimizer::vars`]: crate::optim::Optimizer::vars
pub fn clip_grad_norm_named(
    grads: &mut GradStore,
    vars: &[(String, Var)],
    max_norm: f64,
) -> Result<f64> {
    clip_labelled(grads, vars.iter().map(|(n, v)| (n.clone(), v)), max_norm)
}

/// [`clip_grad_norm_named`] for gradients on a GPU, without waiting for the device: the total
/// norm (f64) and the factor `min(1, max_norm / (norm + 1e-6))` are computed on the device and
/// every gradient is multiplied by the factor (exactly 1 when no clipping is needed, so the
/// gradients are then unchanged); with `max_norm = None` nothing is clipped. Returns the norm
/// before clipping as a 0-d f64 tensor on the gradients' device.
///
/// Unlike the host version it cannot refuse a non-finite norm before touching the gradients:
/// a NaN or infinite gradient stays non-finite after the multiplication, and the optimizer's
/// finiteness check ([`NonFinitePolicy`](crate::optim::NonFinitePolicy)) refuses the step.
/// The norm's summation order is candle's reduction, not the host's.
pub fn clip_grad_norm_on_device(
    grads: &mut GradStore,
    vars: &[(String, Var)],
    max_norm: Option<f64>,
) -> Result<Tensor> {
    if let Some(max) = max_norm {
        if !(max.is_finite() && max > 0.0) {
            return Err(Error::config(
                "max_norm",
                format!("must be finite and > 0, got {max}"),
            ));
        }
    }
    let present = with_grads(grads, vars.iter().map(|(n, v)| (n.clone(), v)));
    let Some((_, _, first)) = present.first() else {
        let device = vars
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        return Ok(Tensor::zeros((), DType::F64, &device)?);
    };
    let device = first.device().clone();
    let sums = present
        .iter()
        .map(|(_, _, g)| Ok(g.to_dtype(DType::F64)?.sqr()?.sum_all()?))
        .collect::<Result<Vec<Tensor>>>()?;
    let norm = Tensor::stack(&sums, 0)?.sum_all()?.sqrt()?;
    let Some(max) = max_norm else {
        return Ok(norm);
    };
    let denom = norm.affine(1.0, CLIP_EPS)?;
    let coef = Tensor::full(max, (), &device)?.div(&denom)?.minimum(1.0)?;
    for (_, var, g) in &present {
        let c = coef.to_dtype(g.dtype())?;
        grads.insert(var.as_tensor(), g.broadcast_mul(&c)?);
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn store(pairs: &[(&Var, Tensor)]) -> GradStore {
        let mut g = GradStore::default();
        for (v, t) in pairs {
            g.insert(v.as_tensor(), t.clone());
        }
        g
    }

    #[test]
    fn the_device_form_clips_like_the_host_form() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::new(&[0.0f32, 0.0], &dev)?;
        let b = Var::new(&[[0.0f32, 0.0]], &dev)?;
        let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        for max in [2.0, 10.0] {
            let grads = || -> Result<GradStore> {
                Ok(store(&[
                    (&a, Tensor::new(&[1.0f32, 2.0], &dev)?),
                    (&b, Tensor::new(&[[2.0f32, 4.0]], &dev)?),
                ]))
            };
            let (mut host, mut device) = (grads()?, grads()?);
            let norm = clip_grad_norm_named(&mut host, &vars, max)?;
            let on_device = clip_grad_norm_on_device(&mut device, &vars, Some(max))?;
            assert_eq!(on_device.to_scalar::<f64>()?, norm);
            for v in [&a, &b] {
                let h = host.get(v).unwrap().flatten_all()?.to_vec1::<f32>()?;
                let d = device.get(v).unwrap().flatten_all()?.to_vec1::<f32>()?;
                assert_eq!(h, d, "max_norm {max}");
            }
        }
        // No clipping asked: the norm only, gradients untouched.
        let mut g = store(&[(&a, Tensor::new(&[3.0f32, 4.0], &dev)?)]);
        let n = clip_grad_norm_on_device(&mut g, &vars, None)?;
        assert_eq!(n.to_scalar::<f64>()?, 5.0);
        assert_eq!(g.get(&a).unwrap().to_vec1::<f32>()?, vec![3.0, 4.0]);
        // A NaN gradient stays NaN (the optimizer's check refuses it), nothing panics.
        let mut g = store(&[(&a, Tensor::new(&[f32::NAN, 1.0], &dev)?)]);
        let n = clip_grad_norm_on_device(&mut g, &vars, Some(1.0))?;
        assert!(n.to_scalar::<f64>()?.is_nan());
        assert!(g.get(&a).unwrap().to_vec1::<f32>()?[0].is_nan());
        assert!(clip_grad_norm_on_device(&mut g, &vars, Some(0.0)).is_err());
        Ok(())
    }

    #[test]
    fn scales_when_above_and_returns_pre_clip_norm() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::zeros(2, DType::F64, &dev)?;
        let b = Var::zeros((1, 2), DType::F64, &dev)?;
        let c = Var::zeros(3, DType::F64, &dev)?; // no gradient: skipped
        let mut grads = store(&[
            (&a, Tensor::new(&[1.0f64, 2.0], &dev)?),
            (&b, Tensor::new(&[[2.0f64, 4.0]], &dev)?),
        ]);
        // ‖g‖ = sqrt(1 + 4 + 4 + 16) = 5.
        let norm = clip_grad_norm(&mut grads, [&a, &b, &c], 2.0)?;
        assert_eq!(norm, 5.0);
        let coef = 2.0 / (5.0 + 1e-6);
        assert_eq!(
            grads.get(&a).unwrap().to_vec1::<f64>()?,
            vec![coef, 2.0 * coef]
        );
        assert_eq!(
            grads.get(&b).unwrap().to_vec2::<f64>()?,
            vec![vec![2.0 * coef, 4.0 * coef]]
        );
        assert!(grads.get(&c).is_none());
        let after = grad_norm(&grads, [&a, &b])?;
        assert!((after - 2.0).abs() < 1e-6, "{after}");
        Ok(())
    }

    #[test]
    fn leaves_small_gradients_alone() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::zeros(2, DType::F32, &dev)?;
        let g = Tensor::new(&[0.3f32, 0.4], &dev)?;
        let mut grads = store(&[(&a, g.clone())]);
        let norm = clip_grad_norm(&mut grads, [&a], 1.0)?;
        assert!((norm - 0.5).abs() < 1e-7);
        // Untouched: the very same tensor is still in the store.
        assert_eq!(grads.get(&a).unwrap().id(), g.id());
        // Exactly at the limit torch's rule (c = max/(norm + 1e-6) < 1) still scales.
        let mut grads = store(&[(&a, g)]);
        clip_grad_norm(&mut grads, [&a], 0.5)?;
        let v = grads.get(&a).unwrap().to_vec1::<f32>()?;
        assert!(v[0] < 0.3 && v[0] > 0.3 - 1e-5, "{v:?}");
        Ok(())
    }

    #[test]
    fn duplicate_vars_count_once_and_shared_grads_scale_once() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::zeros(2, DType::F64, &dev)?;
        let b = Var::zeros(2, DType::F64, &dev)?;
        // Both variables get the same gradient tensor, as `a + b` would give them.
        let shared = Tensor::new(&[3.0f64, 4.0], &dev)?;
        let mut grads = store(&[(&a, shared.clone()), (&b, shared.clone())]);
        let norm = clip_grad_norm(&mut grads, [&a, &b, &a], 1.0)?;
        assert!((norm - 50f64.sqrt()).abs() < 1e-12);
        let coef = 1.0 / (50f64.sqrt() + 1e-6);
        for v in [&a, &b] {
            assert_eq!(
                grads.get(v).unwrap().to_vec1::<f64>()?,
                vec![3.0 * coef, 4.0 * coef]
            );
        }
        assert_eq!(shared.to_vec1::<f64>()?, vec![3.0, 4.0]);
        Ok(())
    }

    #[test]
    fn norm_in_f64_for_f32_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::zeros(4, DType::F32, &dev)?;
        // 1e20² overflows f32 but not f64.
        let grads = store(&[(&a, Tensor::new(&[1e20f32, 0.0, 0.0, 0.0], &dev)?)]);
        let norm = grad_norm(&grads, [&a])?;
        assert!((norm / 1e20 - 1.0).abs() < 1e-7, "{norm}");
        Ok(())
    }

    #[test]
    fn non_finite_norm_is_an_error_naming_the_parameter() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::zeros(2, DType::F32, &dev)?;
        let b = Var::zeros(2, DType::F32, &dev)?;
        let bad = Tensor::new(&[1.0f32, f32::NAN], &dev)?;
        let good = Tensor::new(&[3.0f32, 4.0], &dev)?;
        let mut grads = store(&[(&a, good.clone()), (&b, bad)]);
        let named = vec![
            ("fc.bias".to_string(), a.clone()),
            ("fc.weight".into(), b.clone()),
        ];
        let e = clip_grad_norm_named(&mut grads, &named, 1.0).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("NaN") && msg.contains("`fc.weight`"), "{msg}");
        assert_eq!(grads.get(&a).unwrap().id(), good.id());
        assert!(grad_norm(&grads, [&a, &b])?.is_nan());
        let mut grads = store(&[(&b, Tensor::new(&[f32::INFINITY, 0.0], &dev)?)]);
        let msg = clip_grad_norm(&mut grads, [&a, &b], 1.0)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("inf") && msg.contains("#1"), "{msg}");
        Ok(())
    }

    #[test]
    fn bad_max_norm_and_empty_lists() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::zeros(2, DType::F32, &dev)?;
        let mut grads = GradStore::default();
        for m in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            match clip_grad_norm(&mut grads, [&a], m) {
                Err(Error::Config { field, .. }) => assert_eq!(field, "max_norm"),
                other => panic!("{m}: {other:?}"),
            }
        }
        assert_eq!(clip_grad_norm(&mut grads, [&a], 1.0)?, 0.0);
        assert_eq!(clip_grad_norm(&mut grads, [], 1.0)?, 0.0);
        Ok(())
    }
}
