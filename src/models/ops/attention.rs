//! Causal multi-head attention on `(batch, time, heads·head_dim)` tensors, heads kept in place.
//!
//! Per batch row and head, with `Q, K, V` its `(T, dₕ)` slices, `s = 1/√dₕ` and the causal mask
//! (`j ≤ i`):
//!
//! ```text
//! forward:   S = s·Q Kᵀ,   P_ij = exp(S_ij) / Σ_{k≤i} exp(S_ik)  (j ≤ i; 0 above),   Y = P V
//! backward:  ∂V = Pᵀ G,   ∂P = G Vᵀ,   ∂S_ij = P_ij (∂P_ij − Σ_k P_ik ∂P_ik),
//!            ∂Q = s·∂S K,   ∂K = s·∂Sᵀ Q
//! ```
//!
//! `P` is kept from the forward pass for the backward one (the composition keeps it too). The
//! products skip the blocks above the diagonal (rows and columns in blocks of [`BLOCK`]), which
//! halves their work at long contexts. Each (batch row, head) pair is one task: its products run
//! single-threaded in gemm and the tasks spread over the threads, where the composition's
//! batched matmul runs one small product after another.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{check_float, check_rows, op_err, slice, tensor, threads, with_data, Elem};
use crate::error::{Error, Result};

const NAME: &str = "fused attention";
/// Rows (and columns) per block of the causal products.
const BLOCK: usize = 64;

/// Causal softmax attention of `q`, `k`, `v` `(batch, time, n_heads·head_dim)` (or flattened
/// to `(batch·time, n_heads·head_dim)`; sequences of `time` rows) with the scores scaled by
/// 1/√head_dim; returns the heads' outputs side by side in the shape of `q` (as the
/// composition's transpose and reshape lay them out). CPU, f32/f64; differentiable in all
/// three inputs.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    n_heads: usize,
    time: usize,
) -> Result<Tensor> {
    for (name, x) in [("q", q), ("k", k), ("v", v)] {
        check_float(NAME, name, x)?;
        if x.dims() != q.dims() || x.dtype() != q.dtype() {
            return Err(Error::Msg(format!(
                "{NAME}: {name} is {:?} {:?}, q {:?} {:?}",
                x.dims(),
                x.dtype(),
                q.dims(),
                q.dtype()
            )));
        }
    }
    check_rows(NAME, q, time)?;
    let d = q.dim(candle_core::D::Minus1)?;
    if n_heads == 0 || !d.is_multiple_of(n_heads) {
        return Err(Error::Msg(format!(
            "{NAME}: width {d} does not split into {n_heads} heads"
        )));
    }
    Ok(q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention {
            n_heads,
            t: time,
            probs: Mutex::new(None),
        },
    )?)
}

struct Attention {
    n_heads: usize,
    /// Positions per sequence.
    t: usize,
    /// The attention weights `(batch, heads, T, T)` of the forward pass.
    probs: Mutex<Option<CpuStorage>>,
}

/// A raw pointer that tasks on other threads may use: every task touches its own head's
/// columns of the outputs and its own slice of the weights, so the writes never overlap.
#[derive(Clone, Copy)]
struct Ptr<T>(*mut T);
unsafe impl<T> Send for Ptr<T> {}
unsafe impl<T> Sync for Ptr<T> {}
impl<T> Ptr<T> {
    /// The pointer `offset` elements on (a method, so closures capture the whole `Ptr`).
    unsafe fn at(self, offset: usize) -> *mut T {
        self.0.add(offset)
    }
}

/// Sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    d: usize,
    nh: usize,
    hd: usize,
}

impl Dims {
    fn new(shape: &Shape, nh: usize, t: usize) -> candle_core::Result<Self> {
        let d = shape.dims().last().copied().unwrap_or(1);
        let b = shape.elem_count() / (t * d).max(1);
        Ok(Self {
            b,
            t,
            d,
            nh,
            hd: d / nh,
        })
    }
    /// Offset of task `task`'s (batch row, head) slice in a `(b, t, d)` tensor.
    fn base(&self, task: usize) -> usize {
        (task / self.nh) * self.t * self.d + (task % self.nh) * self.hd
    }
}

/// `dst (m×n) = beta·lhs (m×k) · rhs (k×n)` (`acc`: `dst += …`), single-threaded, with
/// (row stride, column stride) pairs, summed in the fixed order of
/// [`super::matmul::gemm_fixed`] (it matters from contexts above 512 on).
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn matmul<T: Elem>(
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
) {
    super::matmul::gemm_fixed(
        m,
        n,
        k,
        dst,
        dst_s,
        lhs,
        lhs_s,
        rhs,
        rhs_s,
        beta,
        acc,
        Parallelism::None,
    )
}

/// Runs `f(task, scratch)` for every (batch row, head) task, spread over the threads, with a
/// zeroed-once scratch buffer of `scratch_len` per worker.
fn for_tasks<T: Elem>(n_tasks: usize, scratch_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if threads() == 1 || n_tasks == 1 {
        let mut scratch = vec![T::ZERO; scratch_len];
        (0..n_tasks).for_each(|task| f(task, &mut scratch));
    } else {
        (0..n_tasks).into_par_iter().for_each_init(
            || vec![T::ZERO; scratch_len],
            |scratch, task| f(task, scratch),
        );
    }
}

/// The row blocks `[r0, r1)` of a causal `t × t` matrix.
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(BLOCK)
        .map(move |r0| (r0, (r0 + BLOCK).min(t)))
}

fn forward<T: Elem>(q: &[T], k: &[T], v: &[T], dm: Dims) -> (Vec<T>, Vec<T>) {
    let Dims { b, t, d, nh, hd } = dm;
    let scale = T::from_f64(1.0 / (hd as f64).sqrt());
    let mut y = vec![T::ZERO; q.len()];
    let mut probs = vec![T::ZERO; b * nh * t * t];
    let (yp, pp) = (Ptr(y.as_mut_ptr()), Ptr(probs.as_mut_ptr()));
    for_tasks::<T>(b * nh, 0, |task, _| {
        let base = dm.base(task);
        // SAFETY: this task's weights are its own t×t slice; its outputs are its head's columns.
        unsafe {
            let p = pp.at(task * t * t);
            let (qb, kb, vb, yb) = (
                q.as_ptr().add(base),
                k.as_ptr().add(base),
                v.as_ptr().add(base),
                yp.at(base),
            );
            for (r0, r1) in blocks(t) {
                let m = r1 - r0;
                matmul(
                    m,
                    r1,
                    hd,
                    p.add(r0 * t),
                    (t, 1),
                    qb.add(r0 * d),
                    (d, 1),
                    kb,
                    (1, d),
                    scale,
                    false,
                );
                for i in r0..r1 {
                    let row = std::slice::from_raw_parts_mut(p.add(i * t), r1);
                    let (live, dead) = row.split_at_mut(i + 1);
                    dead.fill(T::ZERO);
                    let mut max = live[0];
                    for &s in live.iter() {
                        max = max.fmax(s);
                    }
                    let mut sum = T::ZERO;
                    for s in live.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let inv = T::ONE / sum;
                    for s in live.iter_mut() {
                        *s *= inv;
                    }
                }
                matmul(
                    m,
                    hd,
                    r1,
                    yb.add(r0 * d),
                    (d, 1),
                    p.add(r0 * t),
                    (t, 1),
                    vb,
                    (d, 1),
                    T::ONE,
                    false,
                );
            }
        }
    });
    (y, probs)
}

/// Gradients `(∂q, ∂k, ∂v)` from the output gradient `g` and the kept weights `probs`.
fn backward<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    g: &[T],
    probs: &[T],
    dm: Dims,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Dims { b, t, d, nh, hd } = dm;
    let scale = T::from_f64(1.0 / (hd as f64).sqrt());
    let (mut dq, mut dk, mut dv) = (
        vec![T::ZERO; q.len()],
        vec![T::ZERO; q.len()],
        vec![T::ZERO; q.len()],
    );
    let (dqp, dkp, dvp) = (
        Ptr(dq.as_mut_ptr()),
        Ptr(dk.as_mut_ptr()),
        Ptr(dv.as_mut_ptr()),
    );
    for_tasks::<T>(b * nh, t * t, |task, ds| {
        let base = dm.base(task);
        let p = &probs[task * t * t..(task + 1) * t * t];
        // SAFETY: as in `forward`; `ds` is this worker's own scratch.
        unsafe {
            let (qb, kb, vb, gb) = (
                q.as_ptr().add(base),
                k.as_ptr().add(base),
                v.as_ptr().add(base),
                g.as_ptr().add(base),
            );
            let (dqb, dkb, dvb) = (dqp.at(base), dkp.at(base), dvp.at(base));
            let pp = p.as_ptr();
            let dsp = ds.as_mut_ptr();
            for (r0, r1) in blocks(t) {
                let m = r1 - r0;
                // ∂V rows [r0, r1) = P[r0.., r0..r1]ᵀ G[r0..]
                matmul(
                    m,
                    hd,
                    t - r0,
                    dvb.add(r0 * d),
                    (d, 1),
                    pp.add(r0 * t + r0),
                    (1, t),
                    gb.add(r0 * d),
                    (d, 1),
                    T::ONE,
                    false,
                );
                // ∂P rows [r0, r1), columns [0, r1) = G Vᵀ, then ∂S in place (scale folded in).
                matmul(
                    m,
                    r1,
                    hd,
                    dsp.add(r0 * t),
                    (t, 1),
                    gb.add(r0 * d),
                    (d, 1),
                    vb,
                    (1, d),
                    T::ONE,
                    false,
                );
                for i in r0..r1 {
                    let prow = &p[i * t..i * t + i + 1];
                    let drow = std::slice::from_raw_parts_mut(dsp.add(i * t), r1);
                    let (live, dead) = drow.split_at_mut(i + 1);
                    dead.fill(T::ZERO);
                    let mut dot = T::ZERO;
                    for (&pj, &dj) in prow.iter().zip(live.iter()) {
                        dot += pj * dj;
                    }
                    for (dj, &pj) in live.iter_mut().zip(prow) {
                        *dj = scale * pj * (*dj - dot);
                    }
                }
                // ∂Q rows [r0, r1) = ∂S[r0..r1, ..r1] K[..r1]
                matmul(
                    m,
                    hd,
                    r1,
                    dqb.add(r0 * d),
                    (d, 1),
                    dsp.add(r0 * t),
                    (t, 1),
                    kb,
                    (d, 1),
                    T::ONE,
                    false,
                );
            }
            // ∂K rows [c0, c1) = ∂S[c0.., c0..c1]ᵀ Q[c0..], once every row of ∂S is known.
            for (c0, c1) in blocks(t) {
                matmul(
                    c1 - c0,
                    hd,
                    t - c0,
                    dkb.add(c0 * d),
                    (d, 1),
                    dsp.add(c0 * t + c0),
                    (1, t),
                    qb.add(c0 * d),
                    (d, 1),
                    T::ONE,
                    false,
                );
            }
        }
    });
    (dq, dk, dv)
}

impl CustomOp3 for Attention {
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
        let dm = Dims::new(l1.shape(), self.n_heads, self.t)?;
        macro_rules! run {
            ($t:ty, $variant:ident) => {{
                let (y, p) = forward::<$t>(
                    slice(NAME, s1, l1)?,
                    slice(NAME, s2, l2)?,
                    slice(NAME, s3, l3)?,
                    dm,
                );
                (CpuStorage::$variant(y), CpuStorage::$variant(p))
            }};
        }
        let (y, p) = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => run!(f32, F32),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => run!(f64, F64),
            _ => return Err(op_err(NAME, "needs f32 or f64 tensors of one dtype")),
        };
        *self
            .probs
            .lock()
            .map_err(|_| op_err(NAME, "state poisoned"))? = Some(p);
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = Dims::new(q.shape(), self.n_heads, self.t)?;
        let grad = grad.contiguous()?;
        let probs = self
            .probs
            .lock()
            .map_err(|_| op_err(NAME, "state poisoned"))?;
        let probs = probs
            .as_ref()
            .ok_or_else(|| op_err(NAME, "backward before forward"))?;
        macro_rules! run {
            ($t:ty) => {
                with_data::<$t, _>(NAME, q, |qs| {
                    with_data::<$t, _>(NAME, k, |ks| {
                        with_data::<$t, _>(NAME, v, |vs| {
                            with_data::<$t, _>(NAME, &grad, |gs| {
                                let ps =
                                    <$t as candle_core::WithDType>::cpu_storage_as_slice(probs)?;
                                let (dq, dk, dv) = backward(qs, ks, vs, gs, ps, dm);
                                Ok((
                                    tensor(dq, q.shape())?,
                                    tensor(dk, q.shape())?,
                                    tensor(dv, q.shape())?,
                                ))
                            })
                        })
                    })
                })
            };
        }
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => run!(f32)?,
            DType::F64 => run!(f64)?,
            dt => return Err(op_err(NAME, format!("unsupported dtype {dt:?}"))),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::check::{noise, rel_err, tol};
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_the_composition() {
        // Contexts below, at and across the block size, odd ones included.
        for dtype in [DType::F32, DType::F64] {
            for (b, t, nh, hd) in [(2, 5, 2, 4), (1, 1, 1, 2), (2, 64, 2, 8), (1, 150, 3, 16)] {
                let d = nh * hd;
                let mk = |seed| Var::from_tensor(&noise(&[b, t, d], seed, 1.5, dtype)).unwrap();
                let (q, k, v) = (mk(1), mk(2), mk(3));
                let g = noise(&[b, t, d], 4, 1.0, dtype);
                let mask = crate::models::gpt::causal_mask(t, dtype, &Device::Cpu).unwrap();
                let fused = attention(&q, &k, &v, nh, t).unwrap();
                let flat = |x: &Var| x.reshape((b * t, d)).unwrap();
                let flat = attention(&flat(&q), &flat(&k), &flat(&v), nh, t).unwrap();
                assert_eq!(rel_err(&flat.reshape((b, t, d)).unwrap(), &fused), 0.0);
                let reference =
                    crate::models::gpt::attention_composed(&q, &k, &v, nh, &mask).unwrap();
                let e = rel_err(&fused, &reference);
                assert!(e < tol(dtype), "forward {dtype:?} t {t}: {e}");
                let gf = (fused * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let gr = (reference * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for x in [&q, &k, &v] {
                    let e = rel_err(gf.get(x).unwrap(), gr.get(x).unwrap());
                    assert!(e < tol(dtype), "gradient {dtype:?} t {t}: {e}");
                }
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let x = noise(&[2, 4, 8], 1, 1.0, DType::F32);
        assert!(attention(&x, &x, &x, 2, 4).is_ok());
        assert!(attention(&x, &x, &x, 3, 4).is_err());
        assert!(attention(&x, &x, &x, 0, 4).is_err());
        assert!(attention(&x, &x, &x, 2, 3).is_err());
        assert!(attention(&x, &x, &x, 2, 0).is_err());
        let short = noise(&[2, 3, 8], 1, 1.0, DType::F32);
        assert!(attention(&x, &short, &x, 2, 4).is_err());
        assert!(attention(&x, &x, &x.to_dtype(DType::F64).unwrap(), 2, 4).is_err());
        let flat = x.flatten_all().unwrap();
        assert!(attention(&flat, &flat, &flat, 2, 4).is_err());
        // Non-contiguous inputs are made contiguous.
        let xt = noise(&[2, 8, 4], 2, 1.0, DType::F64)
            .transpose(1, 2)
            .unwrap();
        let mask = crate::models::gpt::causal_mask(4, DType::F64, &Device::Cpu).unwrap();
        let want = crate::models::gpt::attention_composed(&xt, &xt, &xt, 2, &mask).unwrap();
        assert!(rel_err(&attention(&xt, &xt, &xt, 2, 4).unwrap(), &want) < 1e-12);
    }
}
