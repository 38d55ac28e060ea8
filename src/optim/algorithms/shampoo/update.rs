//! Steps 2–7 of the update: grafting state, filtered gradient and grafted direction in one
//! fused pass, the preconditioned direction per block, then weight decay, momentum and the
//! parameter update.

use candle_core::{Tensor, Var};

use super::blocking::Plan;
use super::config::{IterateAveraging, PreconditionerKind, WeightDecayType};
use super::grafting::{GraftCoeffs, Grafting};
use super::roots::cast;
use super::Shampoo;
use crate::error::Result;
use crate::optim::fused::{
    exactly, exactly_mut, flag, sum_sq, vectorized, zip_mut_or_kernel, Float, Kernel,
};
use crate::optim::kron::mode_products;
use crate::optim::rule::StepCtx;
use crate::optim::state::State;
use crate::with_float;

impl Shampoo {
    /// Steps 2–7: grafting state, filtered gradient, direction, weight decay, momentum, update.
    pub(super) fn apply<T: Float>(
        &self,
        ctx: &StepCtx<'_>,
        plan: &Plan,
        param: &Var,
        g: &Tensor,
        state: &mut State,
        t: u64,
    ) -> Result<()> {
        let c = &self.0;
        let (beta1, beta3) = (c.betas.0, c.beta3());
        let graft = c.grafting_config.coeffs(t);
        let graft_only = t < c.start() && !c.grafting_config.is_none();

        // 2–3. Grafting state, filtered gradient and grafted direction, one pass.
        let v = match graft {
            Some(_) => Some(state.tensor_or_zeros("grafting_state", param)?.clone()),
            None => None,
        };
        let m = if beta1 != 0.0 {
            Some(state.tensor_or_zeros("filtered_grad", param)?.clone())
        } else {
            None
        };
        let gbar_out = match m {
            Some(_) => Some(g.zeros_like()?),
            None => None,
        };
        let a_out = match graft {
            Some(_) => Some(g.zeros_like()?),
            None => None,
        };
        fn slot<'a>(outs: &mut Vec<&'a Tensor>, x: Option<&'a Tensor>) -> Option<usize> {
            x.map(|x| {
                outs.push(x);
                outs.len() - 1
            })
        }
        let mut outs: Vec<&Tensor> = Vec::new();
        let iv = slot(&mut outs, v.as_ref());
        let im = slot(&mut outs, m.as_ref());
        let ig = slot(&mut outs, gbar_out.as_ref());
        let ia = slot(&mut outs, a_out.as_ref());
        if !outs.is_empty() {
            let bc1 = if c.use_bias_correction {
                1.0 - beta3 * beta1.powf(t as f64 - 1.0)
            } else {
                1.0
            };
            let (bc1, b1w, b3w) = (T::of(bc1), 1.0 - beta1, 1.0 - beta3);
            let use_bc1 = c.use_bias_correction;
            let same_beta = beta3 == beta1;
            let gc = graft.unwrap_or(GraftCoeffs {
                decay: 1.0,
                weight: 1.0,
                bias_correction: 1.0,
                epsilon: 1.0,
            });
            let (decay, wg, bcg, epsg) = (
                T::of(gc.decay),
                T::of(gc.weight),
                T::of(gc.bias_correction),
                T::of(gc.epsilon),
            );
            let skip_decay = gc.decay == 1.0;
            let flags = u8::from(use_bc1)
                | u8::from(same_beta) << 1
                | u8::from(skip_decay) << 2
                | u8::from(b1w < 0.5) << 3
                | u8::from(b3w < 0.5) << 4;
            let index = |i: Option<usize>| T::of(i.map_or(-1.0, |i| i as f64));
            let scalars = [
                bc1,
                T::of(b1w),
                T::of(1.0 - b1w),
                T::of(b3w),
                T::of(1.0 - b3w),
                T::of(f64::from(flags)),
                decay,
                wg,
                bcg,
                epsg,
                index(iv),
                index(im),
                index(ig),
                index(ia),
            ];
            let kernel = Kernel::new("shampoo_graft", &scalars);
            zip_mut_or_kernel::<T>(kernel, &outs, &[g], move |o, i| {
                let g = i[0];
                let n = g.len();
                // The outputs present, by role (the slot indices say which is which).
                let (mut v, mut m, mut gb_out, mut a) = (None, None, None, None);
                for (j, s) in o.iter_mut().enumerate() {
                    let s = Some(exactly_mut(s, n, "shampoo state")?);
                    match Some(j) {
                        j if j == iv => v = s,
                        j if j == im => m = s,
                        j if j == ig => gb_out = s,
                        _ => a = s,
                    }
                }
                vectorized! {
                    for k in 0..n {
                        let gk = g[k];
                        if let Some(v) = v.as_deref_mut() {
                            let old = if skip_decay { v[k] } else { decay * v[k] };
                            v[k] = old + wg * gk * gk;
                        }
                        let gb = match m.as_deref_mut() {
                            Some(m) => {
                                let old = m[k];
                                let new = lerp(old, gk, b1w);
                                m[k] = new;
                                let gb = if same_beta { new } else { lerp(old, gk, b3w) };
                                if use_bc1 {
                                    gb / bc1
                                } else {
                                    gb
                                }
                            }
                            None => gk,
                        };
                        if let Some(o) = gb_out.as_deref_mut() {
                            o[k] = gb;
                        }
                        if let (Some(a), Some(v)) = (a.as_deref_mut(), v.as_deref()) {
                            a[k] = gb / ((v[k] / bcg).sqrt() + epsg);
                        }
                    }
                }
                Ok(())
            })?;
        }
        let gbar = gbar_out.unwrap_or_else(|| g.clone());
        let a = match c.grafting_config {
            Grafting::None => None,
            Grafting::Sgd => Some(gbar.clone()),
            _ => a_out,
        };

        // 4. Direction.
        let d = match (&a, graft_only) {
            (Some(a), true) => a.clone(),
            _ => {
                let corrected = c.preconditioner == PreconditionerKind::EigenvalueCorrected;
                let rdt = self.root_dtype();
                let gbar_blocks = plan.blocks.split(&plan.layout.to_view(&gbar)?)?;
                let a_blocks = match &a {
                    Some(a) => Some(plan.blocks.split(&plan.layout.to_view(a)?)?),
                    None => None,
                };
                let mut ds = Vec::with_capacity(gbar_blocks.len());
                for (b, gb) in gbar_blocks.iter().enumerate() {
                    let s = if corrected {
                        self.corrected_direction(plan, b, gb, state, t)?
                    } else {
                        let mats: Vec<Option<Tensor>> = (0..plan.roots.len())
                            .map(|k| self.current_root(state, plan, b, k, rdt, gb.device()))
                            .collect::<Result<_>>()?;
                        if mats.iter().all(Option::is_none) {
                            // No root yet: the identity, skipped exactly.
                            gb.clone()
                        } else {
                            let x = cast(gb, rdt)?;
                            cast(&mode_products(&x, &mats, true)?, T::DTYPE)?
                        }
                    };
                    let d = match &a_blocks {
                        None => s,
                        Some(ab) => {
                            let na = sum_sq(&ab[b])?.sqrt();
                            let ns = sum_sq(&s)?.sqrt();
                            s.affine(na / (ns + 1e-16), 0.0)?
                        }
                    };
                    ds.push(d);
                }
                plan.layout.from_view(&plan.blocks.merge(&ds)?)?
            }
        };

        // 5–7. Weight decay, momentum, update.
        let wd = ctx.weight_decay;
        let alpha = if wd == 0.0 {
            0.0
        } else {
            match c.weight_decay_type {
                WeightDecayType::L2 => 0.0,
                WeightDecayType::Decoupled => wd,
                WeightDecayType::Corrected => wd * ctx.lr / c.lr,
                WeightDecayType::Independent => wd / c.lr,
            }
        };
        let (alpha_t, neg_lr) = (T::of(alpha), T::of(-ctx.lr));
        let d = d.contiguous()?;
        let has_decay = flag::<T>(alpha != 0.0);
        match c.iterate_averaging_config {
            IterateAveraging::None => {
                let scalars = [alpha_t, neg_lr, has_decay];
                let kernel = Kernel::new("shampoo_update", &scalars);
                zip_mut_or_kernel::<T>(kernel, &[param.as_tensor()], &[&d], move |o, i| {
                    let p = &mut *o[0];
                    let d = exactly(i[0], p.len(), "direction")?;
                    vectorized! {
                        for (p, &d) in p.iter_mut().zip(d) {
                            let mut d = d;
                            if alpha != 0.0 {
                                d += alpha_t * *p;
                            }
                            *p += d * neg_lr;
                        }
                    }
                    Ok(())
                })
            }
            IterateAveraging::ClassicMomentum {
                momentum,
                dampening,
                use_nesterov,
            } => {
                let buf = state.tensor_or_zeros("momentum_buffer", param)?.clone();
                let (mu, keep) = (T::of(momentum), T::of(1.0 - dampening));
                let nesterov = flag::<T>(use_nesterov);
                let scalars = [alpha_t, neg_lr, has_decay, mu, keep, nesterov];
                let kernel = Kernel::new("shampoo_update_momentum", &scalars);
                zip_mut_or_kernel::<T>(kernel, &[param.as_tensor(), &buf], &[&d], move |o, i| {
                    let [p, b] = o else {
                        unreachable!("two outputs")
                    };
                    // One level of reference, so the loop keeps the slices in registers.
                    let (p, b) = (&mut **p, &mut **b);
                    let n = p.len();
                    let (d, b) = (
                        exactly(i[0], n, "direction")?,
                        exactly_mut(b, n, "momentum")?,
                    );
                    vectorized! { for k in 0..n {
                        let mut dk = d[k];
                        if alpha != 0.0 {
                            dk += alpha_t * p[k];
                        }
                        b[k] = b[k] * mu + keep * dk;
                        dk = if use_nesterov {
                            dk * keep + mu * b[k]
                        } else {
                            b[k]
                        };
                        p[k] += dk * neg_lr;
                    } }
                    Ok(())
                })
            }
        }
    }
}

/// torch's `lerp(a, b, w)`: `a + w(b − a)` for `w < 0.5`, else `b − (b − a)(1 − w)`.
#[inline]
fn lerp<T: Float>(a: T, b: T, w: f64) -> T {
    if w < 0.5 {
        a + T::of(w) * (b - a)
    } else {
        b - (b - a) * T::of(1.0 - w)
    }
}

/// `g + λ·w` as a new tensor (L2 weight decay).
pub(super) fn with_l2(g: &Tensor, w: &Tensor, wd: f64) -> Result<Tensor> {
    let out = g.zeros_like()?;
    with_float!(g.dtype(), "shampoo", T => {
        let wd = T::of(wd);
        let scalars = [wd];
        zip_mut_or_kernel::<T>(Kernel::new("add_scaled", &scalars), &[&out], &[g, w], move |o, i| {
            let out = &mut *o[0];
            let n = out.len();
            let (g, w) = (exactly(i[0], n, "grad")?, exactly(i[1], n, "param")?);
            vectorized! {
                for k in 0..n {
                    out[k] = g[k] + wd * w[k];
                }
            }
            Ok(())
        })?;
    });
    Ok(out)
}
