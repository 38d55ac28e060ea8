//! The fused moment passes that several optimizers share, one definition each so that every
//! optimizer reusing one stays bit-identical to the optimizer it came from.
//!
//! * [`AdamStep`]: AdamW's pass (decoupled decay, both moments, bias correction, optional
//!   AMSGrad), run by AdamW, by Muon for its non-matrix parameters and by MARS on 1-D
//!   parameters (equations in [`adamw`](crate::optim::algorithms::adamw));
//! * [`SignMomentumStep`]: Lion's interpolate-sign-then-update pass, which is Signum when
//!   β1 = β2 (equations in [`lion`](crate::optim::algorithms::lion)), with [`sign`], torch's
//!   sign (0 at ±0), which Sophia uses too.

use candle_core::{Tensor, Var};

use crate::error::Result;
use crate::optim::fused::{exactly, exactly_mut, vectorized, zip_mut_or_kernel, Float, Kernel};
use crate::with_float;

/// One fused AdamW pass over a parameter. Shared by every optimizer that falls back to AdamW
/// (Muon's non-matrix parameters, MARS's 1-D path) so they stay bit-identical to it.
pub struct AdamStep {
    /// Learning rate.
    pub lr: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay (multiplied by lr).
    pub weight_decay: f64,
    /// 1-based step.
    pub t: u64,
    /// Negate the gradient.
    pub maximize: bool,
}

impl AdamStep {
    /// Applies the step to `param` with moments `m`, `v` (and `vmax` for AMSGrad).
    pub fn apply(
        &self,
        param: &Var,
        grad: &Tensor,
        m: &Tensor,
        v: &Tensor,
        vmax: Option<&Tensor>,
    ) -> Result<()> {
        with_float!(param.dtype(), "adamw", T => self.apply_typed::<T>(param, grad, m, v, vmax))
    }

    fn apply_typed<T: Float>(
        &self,
        param: &Var,
        grad: &Tensor,
        m: &Tensor,
        v: &Tensor,
        vmax: Option<&Tensor>,
    ) -> Result<()> {
        let decay = T::of(1.0 - self.lr * self.weight_decay);
        let (b1, b2) = (T::of(self.beta1), T::of(self.beta2));
        let (c1, c2) = (T::of(1.0 - self.beta1), T::of(1.0 - self.beta2));
        let step_size = T::of(self.lr / (1.0 - self.beta1.powi(self.t as i32)));
        let bc2_sqrt = T::of((1.0 - self.beta2.powi(self.t as i32)).sqrt());
        let eps = T::of(self.eps);
        let sign = if self.maximize { -T::one() } else { T::one() };
        let mut outs: Vec<&Tensor> = vec![param.as_tensor(), m, v];
        if let Some(vm) = vmax {
            outs.push(vm);
        }
        let name = if vmax.is_some() {
            "adamw_amsgrad"
        } else {
            "adamw"
        };
        let scalars = [decay, b1, c1, b2, c2, step_size, bc2_sqrt, eps, sign];
        zip_mut_or_kernel::<T>(Kernel::new(name, &scalars), &outs, &[grad], move |o, i| {
            let [p, m, v, vmax @ ..] = o else {
                unreachable!("param, m and v")
            };
            // One level of reference, so the loop keeps the slices in registers.
            let (p, m, v) = (&mut **p, &mut **m, &mut **v);
            let n = p.len();
            let g = exactly(i[0], n, "grad")?;
            let m = exactly_mut(m, n, "exp_avg")?;
            let v = exactly_mut(v, n, "exp_avg_sq")?;
            match vmax.first_mut() {
                None => vectorized! {
                    for k in 0..n {
                        let gk = sign * g[k];
                        m[k] = b1 * m[k] + c1 * gk;
                        v[k] = b2 * v[k] + c2 * gk * gk;
                        let denom = v[k].sqrt() / bc2_sqrt + eps;
                        p[k] = p[k] * decay - step_size * m[k] / denom;
                    }
                },
                Some(vmax) => {
                    let vmax = exactly_mut(vmax, n, "max_exp_avg_sq")?;
                    vectorized! {
                        for k in 0..n {
                            let gk = sign * g[k];
                            m[k] = b1 * m[k] + c1 * gk;
                            v[k] = b2 * v[k] + c2 * gk * gk;
                            vmax[k] = num_traits::Float::max(vmax[k], v[k]);
                            let denom = vmax[k].sqrt() / bc2_sqrt + eps;
                            p[k] = p[k] * decay - step_size * m[k] / denom;
                        }
                    }
                }
            }
            Ok(())
        })
    }
}

/// `sign(x)` with `sign(±0) = 0` (torch.sign); `Float::signum` would give ±1 at zero, which
/// moves coordinates whose momentum is exactly zero.
#[inline(always)]
pub fn sign<T: Float>(x: T) -> T {
    if x > T::zero() {
        T::one()
    } else if x < T::zero() {
        -T::one()
    } else {
        // ±0 gives 0; NaN stays NaN (as torch.sign), so a broken state is not hidden.
        if x.is_nan() {
            x
        } else {
            T::zero()
        }
    }
}

/// One fused sign-momentum pass (Lion; Signum when β1 = β2) over a parameter and its momentum.
pub struct SignMomentumStep {
    /// Learning rate.
    pub lr: f64,
    /// β1: interpolation weight of the momentum in the update direction.
    pub beta1: f64,
    /// β2: decay of the stored momentum.
    pub beta2: f64,
    /// Decoupled weight decay (multiplied by lr).
    pub weight_decay: f64,
}

impl SignMomentumStep {
    /// Applies the step to `param`, updating the momentum `m` in place.
    pub fn apply(&self, param: &Var, grad: &Tensor, m: &Tensor) -> Result<()> {
        with_float!(param.dtype(), "lion", T => self.apply_typed::<T>(param, grad, m))
    }

    fn apply_typed<T: Float>(&self, param: &Var, grad: &Tensor, m: &Tensor) -> Result<()> {
        let decay = T::of(1.0 - self.lr * self.weight_decay);
        let lr = T::of(self.lr);
        let (b1, c1) = (T::of(self.beta1), T::of(1.0 - self.beta1));
        let (b2, c2) = (T::of(self.beta2), T::of(1.0 - self.beta2));
        let scalars = [decay, lr, b1, c1, b2, c2];
        let kernel = Kernel::new("sign_momentum", &scalars);
        zip_mut_or_kernel::<T>(kernel, &[param.as_tensor(), m], &[grad], move |o, i| {
            let [p, m] = o else {
                unreachable!("two outputs")
            };
            // One level of reference, so the loop keeps the slices in registers.
            let (p, m) = (&mut **p, &mut **m);
            let n = p.len();
            let g = exactly(i[0], n, "grad")?;
            let m = exactly_mut(m, n, "exp_avg")?;
            vectorized! {
                for k in 0..n {
                    let c = m[k] * b1 + g[k] * c1;
                    p[k] = p[k] * decay - lr * sign(c);
                    m[k] = m[k] * b2 + g[k] * c2;
                }
            }
            Ok(())
        })
    }
}
