//! SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam", ICLR 2025):
//! Adam run in the eigenbasis of Shampoo's Kronecker factors, exactly as the reference
//! `soap.py` of github.com/nikhilvyas/SOAP @ a1e5535 computes it.
//!
//! Per parameter, with `G` the gradient seen in the (possibly merged) view, one factor per
//! view dim `k` of size `≤ max_precond_dim` (1-D parameters only with `precondition_1d`):
//!
//! ```text
//! call 1:   GG_k = (1 − βs)·G_(k) G_(k)ᵀ ;  Q_k = eigvecs(GG_k + 1e-30·I), descending
//!           (no parameter update, no weight decay, the Adam counter stays 0)
//! call n≥2: t ← t + 1
//!           m  ← β1·m + (1 − β1)·G                       first moment, original space
//!           G' = G ×_k Q_kᵀ ;  M' = m ×_k Q_kᵀ            rotate into the eigenbasis
//!           v  ← β2·v + (1 − β2)·G'²                      second moment, eigenbasis
//!           U  = (M' / (√v + ε)) ×_k Q_k                  rotate back
//!           U  ← U / (1e-30 + rms(U))                     if normalize_grads
//!           p  ← p − lr·√(1 − β2^t)/(1 − β1^t)·U          (plain lr without correct_bias)
//!           p  ← p − lr·λ·p                               if λ > 0, on the UPDATED p
//!           GG_k ← lerp(GG_k, G_(k) G_(k)ᵀ, 1 − βs)      current gradient, after the update
//!           if t % precondition_frequency == 0, for every k:
//!               π = argsort_desc(diag(Q_kᵀ GG_k Q_k)) ; v permuted along k by π
//!               Q_k = qr(GG_k · Q_k[:, π]).Q              one power-iteration step
//! ```
//!
//! `βs = shampoo_beta`, or β2 when it is negative. ε is added to `√v` *before* the bias
//! correction (effective denominator `√v̂ + ε/√(1−β2^t)`). A parameter with no preconditioned
//! dim (scalars, 1-D without `precondition_1d`, dims all above `max_precond_dim`) runs exactly
//! this Adam with the first call skipped. `shampoo_beta` and `precondition_frequency` are
//! copied into the parameter's state on its first call (as the reference does) and read from
//! there afterwards.
//!
//! Conventions and deliberate choices:
//! * `exp_avg` is kept in the *original* space and rotated each step (the reference before
//!   2024-12-02); the current reference keeps it in the eigenbasis and re-rotates it when `Q`
//!   changes. Both are the same math (measured ≤ 7e-16 on the golden cases); this one costs
//!   three projections per step instead of four. `exp_avg_sq` lives in the eigenbasis, in the
//!   parameter's shape and layout (as in the reference).
//! * Factors (`GG.k`) and bases (`Q.k`) are stored per view dim `k` in the parameter dtype
//!   (`precond_dtype = "param"`, the reference with float32 parameters) or in f64
//!   (`precond_dtype = "float64"`, an optlab extension: more accurate and immune to f32 overflow
//!   of `G Gᵀ` for huge gradients). The reference casts factors to float32 for its eigh/QR even
//!   for float64 parameters; the golden trajectories are float64 runs with that cast removed.
//! * Robustness: an eigendecomposition or QR refresh that fails or returns non-finite values is
//!   retried in f64; if that fails too the factor keeps its previous basis (the identity for a
//!   failed initial eigh) and `factor_failures` is incremented (`factor_f64_retries` counts
//!   successful retries). Both are state scalars, saved with the state, and surfaced by
//!   [`Rule::diagnostics`] as `soap.factor_failures` / `soap.factor_f64_retries`.
//! * `merge_dims` follows the reference's greedy left-to-right rule
//!   ([`merge_dims`](crate::optim::kron::merge_dims)); with the default `max_precond_dim =
//!   10000` it turns every small tensor into ONE dim (a 64×64 matrix becomes a 4096×4096
//!   full-matrix factor). `data_format = "channels_last"` permutes 4-D tensors (0,3,1,2) before
//!   merging and has no effect without `merge_dims` (as in the reference).
//! * Degenerate eigenspaces: for a rank-deficient factor (e.g. an `m×n` gradient with `m < n` on
//!   the first call) the basis of the null space is round-off determined and Adam is not
//!   rotation invariant inside it, so trajectories from different eigensolvers diverge after
//!   step 2 on such inputs. This is inherent to the reference algorithm. faer's solver keeps an
//!   exactly block-diagonal factor block-diagonal, which the golden cases rely on.
//!
//! Defaults are the reference's: lr 3e-3, β = (0.95, 0.95), shampoo_beta −1, ε = 1e-8,
//! λ = 0.01, precondition_frequency 10, max_precond_dim 10000, everything else off,
//! correct_bias on.
//!
//! The elementwise rule in the eigenbasis is an [`InnerRule`]; [`AdamInner`] is SOAP's. Another
//! inner rule (e.g. AdEMAMix in the eigenbasis) declares its original-space moments and its
//! eigenbasis statistics and writes one fused pass; [`Soap`] does the rotations, factors,
//! refreshes and permutations for it.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{check, Error, Result};
use crate::linalg::{Order, Robust};
use crate::optim::config::{hyper_accessors, RuleConfig};
use crate::optim::fused::{
    exactly, exactly_mut, flag, sum_sq, vectorized, zip_mut_or_kernel, Float, Kernel,
};
use crate::optim::kron::{self, FactorEma, KronLayout, Refresh};
use crate::optim::params::ParamMeta;
use crate::optim::rule::{expect_state_shape, Rule, StepCtx};
use crate::optim::state::State;
use crate::with_float;

/// Memory layout of 4-D (convolution) tensors, used only with `merge_dims`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// NCHW: merged as is.
    #[default]
    ChannelsFirst,
    /// NHWC: permuted to NCHW before merging.
    ChannelsLast,
}

/// Dtype of the factors `GG`, the bases `Q` and their decompositions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrecondDtype {
    /// The parameter's dtype (the reference with float32 parameters).
    #[default]
    Param,
    /// Always f64.
    Float64,
}

/// SOAP hyperparameters (reference names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SoapConfig {
    /// Learning rate.
    pub lr: f64,
    /// Adam's (β1, β2) in the eigenbasis.
    pub betas: (f64, f64),
    /// EMA factor of the Kronecker factors; negative means β2.
    pub shampoo_beta: f64,
    /// Added to `√v` before bias correction.
    pub eps: f64,
    /// Decoupled weight decay, applied after the update on the updated parameter.
    pub weight_decay: f64,
    /// Eigenbasis refresh period, in Adam steps.
    pub precondition_frequency: u64,
    /// A (merged) dim larger than this gets no factor.
    pub max_precond_dim: usize,
    /// Merge adjacent small dims (greedy, left to right) before factoring (tensors with ≥ 2 dims).
    pub merge_dims: bool,
    /// Give 1-D parameters a full `n×n` factor (otherwise they run plain Adam).
    pub precondition_1d: bool,
    /// Divide the update by its RMS (per tensor).
    pub normalize_grads: bool,
    /// Layout of 4-D tensors, for `merge_dims`.
    pub data_format: DataFormat,
    /// Fold Adam's bias corrections into the step size.
    pub correct_bias: bool,
    /// Dtype of factors, bases and their decompositions (optlab extension).
    pub precond_dtype: PrecondDtype,
}

impl Default for SoapConfig {
    fn default() -> Self {
        Self {
            lr: 3e-3,
            betas: (0.95, 0.95),
            shampoo_beta: -1.0,
            eps: 1e-8,
            weight_decay: 0.01,
            precondition_frequency: 10,
            max_precond_dim: 10000,
            merge_dims: false,
            precondition_1d: false,
            normalize_grads: false,
            data_format: DataFormat::ChannelsFirst,
            correct_bias: true,
            precond_dtype: PrecondDtype::Param,
        }
    }
}

impl SoapConfig {
    /// The factor EMA factor βs (shampoo_beta, or β2 when negative).
    pub fn factor_beta(&self) -> f64 {
        if self.shampoo_beta >= 0.0 {
            self.shampoo_beta
        } else {
            self.betas.1
        }
    }

    /// How a parameter of `shape` is seen by its factors (merging, channels_last, which dims
    /// carry a factor), as the reference decides.
    pub fn layout(&self, shape: &[usize]) -> Result<KronLayout> {
        let max = self.max_precond_dim;
        match shape.len() {
            0 => KronLayout::new(shape, vec![], vec![], false),
            1 => KronLayout::new(
                shape,
                shape.to_vec(),
                vec![self.precondition_1d && shape[0] <= max],
                false,
            ),
            n => {
                let channels_last =
                    self.merge_dims && n == 4 && self.data_format == DataFormat::ChannelsLast;
                let dims = if self.merge_dims {
                    let seen = if channels_last {
                        vec![shape[0], shape[3], shape[1], shape[2]]
                    } else {
                        shape.to_vec()
                    };
                    kron::merge_dims(&seen, max)
                } else {
                    shape.to_vec()
                };
                let pre = dims.iter().map(|&d| d <= max).collect();
                KronLayout::new(shape, dims, pre, channels_last)
            }
        }
    }
}

impl RuleConfig for SoapConfig {
    const NAME: &'static str = "soap";

    fn validate(&self) -> Result<()> {
        check::non_negative("soap.lr", self.lr)?;
        check::unit_interval("soap.betas[0]", self.betas.0)?;
        check::unit_interval("soap.betas[1]", self.betas.1)?;
        if !(self.shampoo_beta.is_finite() && self.shampoo_beta < 1.0) {
            return Err(Error::config(
                "soap.shampoo_beta",
                format!(
                    "must be < 1 (negative means betas[1]), got {}",
                    self.shampoo_beta
                ),
            ));
        }
        check::positive("soap.eps", self.eps)?;
        check::non_negative("soap.weight_decay", self.weight_decay)?;
        check::at_least_one("soap.precondition_frequency", self.precondition_frequency)
    }
    hyper_accessors!();
    fn build(&self) -> Result<Box<dyn Rule>> {
        Ok(Box::new(Soap::new(self.clone(), AdamInner::from(self))))
    }
}

/// The elementwise optimizer SOAP runs in the rotated basis.
///
/// Gradient accumulators that are linear in the gradient ("moments") are kept in the original
/// space and rotated on demand; nonlinear statistics live in the eigenbasis and are permuted with
/// it at every refresh. AdEMAMix in the eigenbasis, for instance, declares
/// `moments = [("exp_avg", β1, 1−β1), ("exp_avg_slow", β3(t), 1−β3(t))]`,
/// `basis_stats = ["exp_avg_sq"]`, and writes `(m₁'/bc₁ + α(t)·m₂') / (√(v/bc₂) + ε)` in
/// [`InnerRule::direction`].
pub trait InnerRule: Send + Sync + std::fmt::Debug {
    /// The rule's name as registered (diagnostic keys are prefixed with it).
    fn name(&self) -> &'static str;

    /// Original-space accumulators at Adam step `t`: `(state field, decay, weight)`, updated as
    /// `m ← decay·m + weight·g` before the step and handed to [`InnerRule::direction`] rotated.
    fn moments(&self, t: u64) -> Vec<(&'static str, f64, f64)>;

    /// Elementwise statistics kept in the eigenbasis (parameter-shaped, zero-initialized,
    /// permuted along a mode whenever that mode's basis is re-sorted).
    fn basis_stats(&self) -> &'static [&'static str];

    /// The scalar multiplying the back-rotated direction in the parameter update.
    fn step_size(&self, lr: f64, t: u64) -> f64;

    /// One fused pass at Adam step `t`: reads the rotated gradient from `dir`, updates the
    /// eigenbasis statistics `stats` (in [`InnerRule::basis_stats`] order) and overwrites `dir`
    /// with the rotated direction, using the rotated `moments` (in [`InnerRule::moments`] order).
    fn direction(&self, t: u64, dir: &Tensor, moments: &[Tensor], stats: &[Tensor]) -> Result<()>;
}

/// SOAP's inner Adam: `v ← β2·v + (1−β2)·g'²`, direction `m'/(√v + ε)`, step size
/// `lr·√(1−β2^t)/(1−β1^t)` (or `lr` without bias correction).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamInner {
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε, added to `√v`.
    pub eps: f64,
    /// Fold the bias corrections into the step size.
    pub correct_bias: bool,
}

impl From<&SoapConfig> for AdamInner {
    fn from(c: &SoapConfig) -> Self {
        Self {
            beta1: c.betas.0,
            beta2: c.betas.1,
            eps: c.eps,
            correct_bias: c.correct_bias,
        }
    }
}

impl InnerRule for AdamInner {
    fn name(&self) -> &'static str {
        SoapConfig::NAME
    }

    fn moments(&self, _t: u64) -> Vec<(&'static str, f64, f64)> {
        vec![("exp_avg", self.beta1, 1.0 - self.beta1)]
    }

    fn basis_stats(&self) -> &'static [&'static str] {
        &["exp_avg_sq"]
    }

    fn step_size(&self, lr: f64, t: u64) -> f64 {
        if self.correct_bias {
            let t = t as i32;
            lr * (1.0 - self.beta2.powi(t)).sqrt() / (1.0 - self.beta1.powi(t))
        } else {
            lr
        }
    }

    fn direction(&self, _t: u64, dir: &Tensor, moments: &[Tensor], stats: &[Tensor]) -> Result<()> {
        with_float!(dir.dtype(), "soap", T => {
            let (b2, c2, eps) = (T::of(self.beta2), T::of(1.0 - self.beta2), T::of(self.eps));
            let scalars = [b2, c2, eps];
            let kernel = Kernel::new("soap_adam", &scalars);
            zip_mut_or_kernel::<T>(kernel, &[dir, &stats[0]], &[&moments[0]], move |o, i| {
                let [d, v] = o else {
                    unreachable!("direction and exp_avg_sq")
                };
                // One level of reference, so the loop keeps the slices in registers.
                let (d, v) = (&mut **d, &mut **v);
                let n = d.len();
                let (v, m) = (exactly_mut(v, n, "exp_avg_sq")?, exactly(i[0], n, "exp_avg")?);
                vectorized! {
                    for k in 0..n {
                        let g = d[k];
                        v[k] = b2 * v[k] + c2 * (g * g);
                        d[k] = m[k] / (v[k].sqrt() + eps);
                    }
                }
                Ok(())
            })
        })
    }
}

/// Shift added to the factor before the initial eigendecomposition (reference: `1e-30·I`).
pub const INITIAL_EIGH_SHIFT: f64 = 1e-30;

/// The SOAP rule, generic over the rule run in the eigenbasis.
#[derive(Debug, Clone)]
pub struct Soap<I: InnerRule = AdamInner> {
    config: SoapConfig,
    inner: I,
}

impl<I: InnerRule> Soap<I> {
    /// SOAP with `config` (layout, factors, refresh, weight decay, normalization) around `inner`.
    pub fn new(config: SoapConfig, inner: I) -> Self {
        Self { config, inner }
    }

    /// The config.
    pub fn config(&self) -> &SoapConfig {
        &self.config
    }

    fn factor_dtype(&self, param_dtype: DType) -> DType {
        match self.config.precond_dtype {
            PrecondDtype::Param => param_dtype,
            PrecondDtype::Float64 => DType::F64,
        }
    }

    /// First call: factors from the first gradient and their eigenbases; nothing moves.
    fn initialize(
        &self,
        layout: &KronLayout,
        param: &Var,
        grad: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        for (field, _, _) in self.inner.moments(1) {
            state.tensor_or_zeros(field, param)?;
        }
        for field in self.inner.basis_stats() {
            state.tensor_or_zeros(field, param)?;
        }
        let beta = self.config.factor_beta();
        state.set_scalar("step", 0.0);
        state.set_scalar("shampoo_beta", beta);
        state.set_scalar(
            "precondition_frequency",
            self.config.precondition_frequency as f64,
        );
        state.set_scalar("factor_failures", 0.0);
        state.set_scalar("factor_f64_retries", 0.0);
        let dtype = self.factor_dtype(param.dtype());
        let g_view = layout.to_view(grad)?;
        kron::accumulate_factors(
            state,
            "GG",
            layout,
            &g_view,
            dtype,
            FactorEma::Lerp { weight: 1.0 - beta },
        )?;
        for (k, d) in layout.factor_dims() {
            let gg = state.tensor(&kron::field("GG", k))?.clone();
            let outcome = kron::eigenbasis(&gg, INITIAL_EIGH_SHIFT, Order::Descending)?;
            count(state, &outcome);
            let q = match outcome.value() {
                Some(q) => q,
                None => kron::identity(d, dtype, gg.device())?,
            };
            state.tensors.insert(kron::field("Q", k), q);
        }
        Ok(())
    }

    /// Rotates a parameter-shaped tensor into (`transpose`) or out of the eigenbasis.
    fn rotate(
        layout: &KronLayout,
        qs: &[Option<Tensor>],
        x: &Tensor,
        transpose: bool,
    ) -> Result<Tensor> {
        layout.from_view(&kron::mode_products(&layout.to_view(x)?, qs, transpose)?)
    }

    /// The refresh after Adam step `t`: one power-iteration/QR step per factor, with the
    /// eigenbasis statistics permuted to follow the re-sorted columns.
    fn refresh(&self, layout: &KronLayout, state: &mut State) -> Result<()> {
        for (k, _) in layout.factor_dims() {
            let gg = state.tensor(&kron::field("GG", k))?.clone();
            let q = state.tensor(&kron::field("Q", k))?.clone();
            let outcome = kron::power_iteration_qr(&gg, &q)?;
            count(state, &outcome);
            if let Some((perm, q_new)) = outcome.value() {
                for field in self.inner.basis_stats() {
                    let v = state.tensor(field)?;
                    let permuted = kron::permute_mode(&layout.to_view(v)?, k, &perm)?;
                    state
                        .tensors
                        .insert(field.to_string(), layout.from_view(&permuted)?);
                }
                state.tensors.insert(kron::field("Q", k), q_new);
            }
        }
        Ok(())
    }
}

/// Counts a decomposition outcome into the state's failure/retry counters.
fn count<V>(state: &mut State, outcome: &Robust<V>) {
    if outcome.is_failed() {
        state.set_scalar("factor_failures", state.scalar("factor_failures") + 1.0);
    } else if outcome.was_retried() {
        state.set_scalar(
            "factor_f64_retries",
            state.scalar("factor_f64_retries") + 1.0,
        );
    }
}

/// `m ← decay·m + weight·g` for every original-space moment, in one pass.
fn update_moments(moments: &[(Tensor, f64, f64)], grad: &Tensor) -> Result<()> {
    if moments.is_empty() {
        return Ok(());
    }
    with_float!(grad.dtype(), "soap", T => {
        let outs: Vec<&Tensor> = moments.iter().map(|(m, _, _)| m).collect();
        let coef: Vec<(T, T)> = moments.iter().map(|(_, d, w)| (T::of(*d), T::of(*w))).collect();
        // The kernel takes up to four moments: (count, d₀, w₀, d₁, w₁, …).
        let mut scalars = vec![T::of(coef.len() as f64)];
        scalars.extend(coef.iter().flat_map(|&(d, w)| [d, w]));
        let kernel = Kernel::new("ema_many", &scalars);
        zip_mut_or_kernel::<T>(kernel, &outs, &[grad], move |o, i| {
            let g = i[0];
            for (m, &(d, w)) in o.iter_mut().zip(&coef) {
                let m = exactly_mut(m, g.len(), "moment")?;
                vectorized! {
                    for (m, &g) in m.iter_mut().zip(g) {
                        *m = d * *m + w * g;
                    }
                }
            }
            Ok(())
        })
    })
}

/// `p ← p − step·(u / norm)`, then `p ← p − lr·λ·p` when `λ > 0`, in one pass.
fn apply_update(param: &Var, u: &Tensor, step: f64, norm: f64, decay: f64) -> Result<()> {
    with_float!(param.dtype(), "soap", T => {
        let normalize = norm != 1.0;
        let has_decay = decay != 0.0;
        let (step, norm, decay) = (T::of(step), T::of(norm), T::of(decay));
        let scalars = [step, norm, decay, flag(normalize), flag(has_decay)];
        let kernel = Kernel::new("soap_apply", &scalars);
        zip_mut_or_kernel::<T>(kernel, &[param.as_tensor()], &[u], move |o, i| {
            let p = &mut *o[0];
            let u = exactly(i[0], p.len(), "update")?;
            vectorized! {
                for (p, &u) in p.iter_mut().zip(u) {
                    let u = if normalize { u / norm } else { u };
                    *p -= step * u;
                    if has_decay {
                        *p = *p + decay * *p;
                    }
                }
            }
            Ok(())
        })
    })
}

impl<I: InnerRule> Rule for Soap<I> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn update(
        &self,
        ctx: &StepCtx<'_>,
        meta: &ParamMeta,
        param: &Var,
        grad: &Tensor,
        state: &mut State,
    ) -> Result<()> {
        let layout = self.config.layout(&meta.shape)?;
        let first_moment = self.inner.moments(1).first().map(|m| m.0);
        let initialized = match first_moment {
            Some(f) => state.tensors.contains_key(f),
            None => state.scalars.contains_key("shampoo_beta"),
        };
        if !initialized {
            return self.initialize(&layout, param, grad, state);
        }
        let t = state.next_step();

        // Original-space moments with the current gradient.
        let specs = self.inner.moments(t);
        let mut moments = Vec::with_capacity(specs.len());
        for (field, decay, weight) in &specs {
            moments.push((state.tensor(field)?.clone(), *decay, *weight));
        }
        update_moments(&moments, grad)?;

        // Into the eigenbasis, the inner rule, and back.
        let qs = kron::mats(state, "Q", &layout);
        let trivial = qs.iter().all(Option::is_none);
        let (dir, rotated) = if trivial {
            (
                grad.copy()?,
                moments.iter().map(|(m, _, _)| m.clone()).collect(),
            )
        } else {
            let mut rotated = Vec::with_capacity(moments.len());
            for (m, _, _) in &moments {
                rotated.push(Self::rotate(&layout, &qs, m, true)?);
            }
            (Self::rotate(&layout, &qs, grad, true)?, rotated)
        };
        let mut stats = Vec::new();
        for field in self.inner.basis_stats() {
            stats.push(state.tensor(field)?.clone());
        }
        self.inner.direction(t, &dir, &rotated, &stats)?;
        let u = if trivial {
            dir
        } else {
            Self::rotate(&layout, &qs, &dir, false)?
        };

        let norm = if self.config.normalize_grads {
            let n = u.elem_count().max(1) as f64;
            1e-30 + (sum_sq(&u)? / n).sqrt()
        } else {
            1.0
        };
        let decay = if ctx.weight_decay > 0.0 {
            -(ctx.lr * ctx.weight_decay)
        } else {
            0.0
        };
        apply_update(param, &u, self.inner.step_size(ctx.lr, t), norm, decay)?;

        // Factors with the current gradient (after the update), then the amortized refresh.
        if !layout.is_trivial() {
            let beta = state.scalar("shampoo_beta");
            let dtype = self.factor_dtype(param.dtype());
            kron::accumulate_factors(
                state,
                "GG",
                &layout,
                &layout.to_view(grad)?,
                dtype,
                FactorEma::Lerp { weight: 1.0 - beta },
            )?;
            let frequency = state.scalar("precondition_frequency").max(1.0) as u64;
            if (Refresh::Every { frequency }).due(t) {
                self.refresh(&layout, state)?;
            }
        }
        Ok(())
    }

    fn check_state(&self, meta: &ParamMeta, state: &State) -> Result<()> {
        for (field, _, _) in self.inner.moments(1) {
            expect_state_shape(meta, state, field, &meta.shape)?;
        }
        for field in self.inner.basis_stats() {
            expect_state_shape(meta, state, field, &meta.shape)?;
        }
        let layout = self.config.layout(&meta.shape)?;
        for (k, d) in layout.factor_dims() {
            for prefix in ["GG", "Q"] {
                expect_state_shape(meta, state, &kron::field(prefix, k), &[d, d])?;
            }
        }
        let has_factors = layout
            .factor_dims()
            .all(|(k, _)| state.tensors.contains_key(&kron::field("Q", k)));
        let started = state.scalars.contains_key("shampoo_beta");
        if started && !has_factors {
            return Err(Error::State(format!(
                "`{}`: SOAP state lacks the factor bases this parameter's layout needs",
                meta.name
            )));
        }
        Ok(())
    }

    fn diagnostics(&self, state: &State, out: &mut std::collections::BTreeMap<String, f64>) {
        let name = self.inner.name();
        for (field, key) in [
            ("factor_failures", "factor_failures"),
            ("factor_f64_retries", "factor_f64_retries"),
        ] {
            *out.entry(format!("{name}.{key}")).or_insert(0.0) += state.scalar(field);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::Device;

    use super::*;
    use crate::optim::adamw::AdamWConfig;
    use crate::optim::fused::zip_mut;
    use crate::optim::testing::{self, flat, noise};
    use crate::optim::{Driver, NamedParams, OptimConfig, Optimizer};

    fn tensor(seed: u64, shape: &[usize], dtype: DType) -> Tensor {
        testing::tensor(noise(seed, shape.iter().product()), shape, dtype)
    }

    fn soap(cfg: SoapConfig, params: &[(&str, Tensor)]) -> (Driver, Vec<(String, Var)>) {
        let vars: Vec<(String, Var)> = params
            .iter()
            .map(|(n, t)| (n.to_string(), Var::from_tensor(t).unwrap()))
            .collect();
        let d = Driver::new(
            OptimConfig::Soap(cfg),
            NamedParams::new(vars.clone()).unwrap(),
        )
        .unwrap();
        (d, vars)
    }

    fn step(d: &mut Driver, grads: &[(&str, Tensor)]) -> Result<()> {
        let g: BTreeMap<String, Tensor> = grads
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        d.step_named(&g)
    }

    fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
        let scale = b.iter().fold(1e-300f64, |m, x| m.max(x.abs()));
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
            / scale
    }

    #[test]
    fn defaults_and_validation() {
        let c = SoapConfig::default();
        assert_eq!(c.lr, 3e-3);
        assert_eq!(c.betas, (0.95, 0.95));
        assert_eq!(c.factor_beta(), 0.95);
        assert_eq!(c.precondition_frequency, 10);
        assert_eq!(c.max_precond_dim, 10000);
        c.validate().unwrap();
        let bad = |f: &dyn Fn(&mut SoapConfig), field: &str| {
            let mut c = SoapConfig::default();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e} should name {field}");
        };
        bad(&|c| c.betas.1 = 1.0, "soap.betas[1]");
        bad(&|c| c.betas.0 = -0.1, "soap.betas[0]");
        bad(&|c| c.shampoo_beta = 1.0, "soap.shampoo_beta");
        bad(&|c| c.shampoo_beta = f64::NAN, "soap.shampoo_beta");
        bad(&|c| c.eps = 0.0, "soap.eps");
        bad(&|c| c.weight_decay = -1.0, "soap.weight_decay");
        bad(
            &|c| c.precondition_frequency = 0,
            "soap.precondition_frequency",
        );
        bad(&|c| c.lr = f64::INFINITY, "soap.lr");
        // TOML: reference names, enum values, unknown keys refused.
        let cfg = OptimConfig::from_toml(
            "name = \"soap\"\nshampoo_beta = 0.9\ndata_format = \"channels_last\"\nmerge_dims = true\nprecond_dtype = \"float64\"",
        )
        .unwrap();
        match cfg {
            OptimConfig::Soap(c) => {
                assert_eq!(c.factor_beta(), 0.9);
                assert_eq!(c.data_format, DataFormat::ChannelsLast);
                assert_eq!(c.precond_dtype, PrecondDtype::Float64);
            }
            other => panic!("{other:?}"),
        }
        assert!(OptimConfig::from_toml("name = \"soap\"\ndata_format = \"nhwc\"").is_err());
        assert!(OptimConfig::from_toml("name = \"soap\"\nmax_precondition_dim = 3").is_err());
    }

    #[test]
    fn layouts_follow_the_reference() {
        let c = SoapConfig {
            max_precond_dim: 12,
            merge_dims: true,
            ..SoapConfig::default()
        };
        let l = c.layout(&[2, 3, 4, 5]).unwrap();
        assert_eq!(l.dims(), &[6, 4, 5]);
        // 1-D: never merged, preconditioned only with precondition_1d and n <= max.
        assert!(c.layout(&[7]).unwrap().is_trivial());
        let c1 = SoapConfig {
            precondition_1d: true,
            max_precond_dim: 7,
            ..SoapConfig::default()
        };
        assert!(!c1.layout(&[7]).unwrap().is_trivial());
        assert!(c1.layout(&[8]).unwrap().is_trivial());
        assert!(c1.layout(&[]).unwrap().is_trivial());
        // Size-1 dims are not special without merging: [1, 50] gets a 1×1 factor.
        let l = SoapConfig::default().layout(&[1, 50]).unwrap();
        assert_eq!(l.factor_dims().collect::<Vec<_>>(), vec![(0, 1), (1, 50)]);
        // channels_last only matters with merge_dims.
        let cl = SoapConfig {
            data_format: DataFormat::ChannelsLast,
            ..SoapConfig::default()
        };
        assert_eq!(cl.layout(&[2, 3, 3, 4]).unwrap().dims(), &[2, 3, 3, 4]);
    }

    #[test]
    fn first_call_only_builds_the_basis() {
        let w = tensor(1, &[4, 6], DType::F64);
        let (mut d, vars) = soap(SoapConfig::default(), &[("w", w.clone())]);
        step(&mut d, &[("w", tensor(2, &[4, 6], DType::F64))]).unwrap();
        assert_eq!(flat(vars[0].1.as_tensor()), flat(&w), "no update on call 1");
        let st = d.param_state("w").unwrap();
        assert_eq!(st.scalar("step"), 0.0);
        for f in ["GG.0", "GG.1", "Q.0", "Q.1", "exp_avg", "exp_avg_sq"] {
            assert!(st.tensors.contains_key(f), "{f}");
        }
        // Q is orthogonal and sorted by descending eigenvalue of GG.
        let q = st.tensor("Q.1").unwrap();
        let gg = st.tensor("GG.1").unwrap();
        let diag = flat(&q.t().unwrap().matmul(gg).unwrap().matmul(q).unwrap());
        let ev: Vec<f64> = (0..6).map(|i| diag[i * 6 + i]).collect();
        assert!(ev.windows(2).all(|p| p[0] >= p[1] - 1e-15), "{ev:?}");
        step(&mut d, &[("w", tensor(3, &[4, 6], DType::F64))]).unwrap();
        assert_eq!(d.param_state("w").unwrap().scalar("step"), 1.0);
        assert_ne!(flat(vars[0].1.as_tensor()), flat(&w));
    }

    /// SOAP whose basis never refreshes is AdamW run on the rotated parameter `Q_Lᵀ W Q_R`
    /// with rotated gradients (first call skipped; ε negligible, no weight decay, where the two
    /// conventions coincide).
    #[test]
    fn frozen_basis_is_adam_in_the_rotated_basis() {
        for (shape, max_dim) in [(vec![5usize, 7], 10000usize), (vec![3, 4, 9], 8)] {
            let cfg = SoapConfig {
                lr: 0.01,
                eps: 1e-30,
                weight_decay: 0.0,
                precondition_frequency: 1_000_000,
                max_precond_dim: max_dim,
                ..SoapConfig::default()
            };
            let w0 = tensor(10, &shape, DType::F64);
            let (mut d, vars) = soap(cfg.clone(), &[("w", w0.clone())]);
            step(&mut d, &[("w", tensor(11, &shape, DType::F64))]).unwrap();
            let layout = cfg.layout(&shape).unwrap();
            let qs = kron::mats(d.param_state("w").unwrap(), "Q", &layout);
            let rot = |x: &Tensor| kron::mode_products(x, &qs, true).unwrap();
            let unrot = |x: &Tensor| kron::mode_products(x, &qs, false).unwrap();
            let adam = AdamWConfig {
                lr: 0.01,
                betas: cfg.betas,
                eps: 1e-30,
                weight_decay: 0.0,
                ..AdamWConfig::default()
            };
            let wr = Var::from_tensor(&rot(&w0)).unwrap();
            let mut a = Driver::new(
                OptimConfig::Adamw(adam),
                NamedParams::new(vec![("w".to_string(), wr.clone())]).unwrap(),
            )
            .unwrap();
            for s in 0..12u64 {
                let g = tensor(100 + s, &shape, DType::F64);
                step(&mut d, &[("w", g.clone())]).unwrap();
                step(&mut a, &[("w", rot(&g))]).unwrap();
                let got = flat(vars[0].1.as_tensor());
                let want = flat(&unrot(wr.as_tensor()));
                let err = max_rel_diff(&got, &want);
                assert!(err < 1e-13, "{shape:?} step {s}: {err:e}");
            }
        }
    }

    /// Adam in SOAP's convention (ε on √v before bias correction, decay after the update).
    fn reference_adam(cfg: &SoapConfig, p0: &[f64], grads: &[Vec<f64>], lr: f64) -> Vec<Vec<f64>> {
        let (b1, b2) = cfg.betas;
        let mut p = p0.to_vec();
        let mut m = vec![0.0; p.len()];
        let mut v = vec![0.0; p.len()];
        let mut out = vec![p.clone()]; // after call 1: unchanged
        for (t, g) in grads[1..].iter().enumerate() {
            let t = (t + 1) as i32;
            let step = lr * (1.0 - b2.powi(t)).sqrt() / (1.0 - b1.powi(t));
            for k in 0..p.len() {
                m[k] = b1 * m[k] + (1.0 - b1) * g[k];
                v[k] = b2 * v[k] + (1.0 - b2) * g[k] * g[k];
                p[k] -= step * (m[k] / (v[k].sqrt() + cfg.eps));
                p[k] += -(lr * cfg.weight_decay) * p[k];
            }
            out.push(p.clone());
        }
        out
    }

    #[test]
    fn no_preconditioned_dim_is_adam_with_the_first_step_skipped() {
        let cfg = SoapConfig {
            lr: 0.01,
            max_precond_dim: 3,
            ..SoapConfig::default()
        };
        // A vector, a matrix with both dims above max_precond_dim, a scalar.
        for shape in [vec![7usize], vec![4, 5], vec![]] {
            for dtype in [DType::F64, DType::F32] {
                let p0 = tensor(20, &shape, dtype);
                let grads: Vec<Tensor> = (0..8).map(|s| tensor(30 + s, &shape, dtype)).collect();
                let (mut d, vars) = soap(cfg.clone(), &[("p", p0.clone())]);
                let want = reference_adam(
                    &cfg,
                    &flat(&p0),
                    &grads.iter().map(flat).collect::<Vec<_>>(),
                    cfg.lr,
                );
                for (s, g) in grads.iter().enumerate() {
                    step(&mut d, &[("p", g.clone())]).unwrap();
                    let err = max_rel_diff(&flat(vars[0].1.as_tensor()), &want[s]);
                    let tol = if dtype == DType::F64 { 1e-15 } else { 1e-6 };
                    assert!(err <= tol, "{shape:?} {dtype:?} step {s}: {err:e}");
                }
                let st = d.param_state("p").unwrap();
                assert!(!st
                    .tensors
                    .keys()
                    .any(|k| k.starts_with("GG") || k.starts_with("Q")));
            }
        }
    }

    /// Runs `steps` SOAP steps on `shape` with gradients from `grad(s)`; returns the driver.
    fn run_degenerate(
        cfg: SoapConfig,
        shape: &[usize],
        dtype: DType,
        grad: &dyn Fn(u64) -> Tensor,
    ) -> (Driver, Vec<(String, Var)>) {
        let (mut d, vars) = soap(cfg, &[("w", tensor(50, shape, dtype))]);
        for s in 0..9 {
            step(&mut d, &[("w", grad(s))]).unwrap();
            let p = flat(vars[0].1.as_tensor());
            assert!(
                p.iter().all(|x| x.is_finite()),
                "{shape:?} {dtype:?}: non-finite parameter at step {s}"
            );
        }
        (d, vars)
    }

    #[test]
    fn degenerate_gradients_never_give_nan_parameters() {
        let shape = [4usize, 6];
        for dtype in [DType::F64, DType::F32] {
            for precond_dtype in [PrecondDtype::Param, PrecondDtype::Float64] {
                let cfg = SoapConfig {
                    precondition_frequency: 2,
                    precondition_1d: true,
                    precond_dtype,
                    ..SoapConfig::default()
                };
                let zeros = |_s: u64| Tensor::zeros(&shape[..], dtype, &Device::Cpu).unwrap();
                let rank1 = |s: u64| {
                    let u = tensor(60 + s, &[4, 1], dtype);
                    let v = tensor(70, &[1, 6], dtype);
                    u.matmul(&v).unwrap()
                };
                let scaled = |k: f64| {
                    move |s: u64| {
                        (tensor(80 + s, &shape, DType::F64) * k)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap()
                    }
                };
                // Repeated eigenvalues: orthogonal rows of equal norm (G Gᵀ = c·I).
                let repeated = |s: u64| {
                    let q = crate::linalg::qr_q(&tensor(90 + s, &[6, 6], DType::F64))
                        .unwrap()
                        .value()
                        .unwrap();
                    q.narrow(0, 0, 4).unwrap().to_dtype(dtype).unwrap()
                };
                type GradAt<'a> = Box<dyn Fn(u64) -> Tensor + 'a>;
                let cases: Vec<(&str, GradAt)> = vec![
                    ("zero", Box::new(zeros)),
                    ("rank-1", Box::new(rank1)),
                    ("1e-20", Box::new(scaled(1e-20))),
                    ("1e20", Box::new(scaled(1e20))),
                    ("repeated", Box::new(repeated)),
                ];
                for (name, g) in &cases {
                    let (d, _) = run_degenerate(cfg.clone(), &shape, dtype, g.as_ref());
                    let diag = d.diagnostics();
                    let failures = diag["soap.factor_failures"];
                    // Only f32 factors overflow (|g|² ~ 1e40 > f32::MAX); that is counted.
                    let may_fail = *name == "1e20"
                        && dtype == DType::F32
                        && precond_dtype == PrecondDtype::Param;
                    assert!(
                        failures == 0.0 || may_fail,
                        "{name} {dtype:?} {precond_dtype:?}: {failures} factor failures"
                    );
                    if may_fail {
                        assert!(failures > 0.0, "f32 overflow must be counted");
                    }
                }
                // 1-D with precondition_1d: rank-1 factor every step.
                let (mut d, vars) = soap(cfg.clone(), &[("b", tensor(51, &[5], dtype))]);
                for s in 0..7 {
                    step(&mut d, &[("b", tensor(52 + s, &[5], dtype))]).unwrap();
                }
                assert!(flat(vars[0].1.as_tensor()).iter().all(|x| x.is_finite()));
            }
        }
    }

    #[test]
    fn nan_gradient_is_the_drivers_clear_error() {
        let (mut d, vars) = soap(
            SoapConfig::default(),
            &[("w", tensor(1, &[3, 4], DType::F64))],
        );
        step(&mut d, &[("w", tensor(2, &[3, 4], DType::F64))]).unwrap();
        step(&mut d, &[("w", tensor(3, &[3, 4], DType::F64))]).unwrap();
        let before = flat(vars[0].1.as_tensor());
        let st_before = flat(d.param_state("w").unwrap().tensor("GG.0").unwrap());
        let mut bad = noise(4, 12);
        bad[5] = f64::NAN;
        let g = Tensor::from_vec(bad, (3, 4), &Device::Cpu).unwrap();
        let e = step(&mut d, &[("w", g)]).unwrap_err();
        assert!(
            matches!(e, Error::NonFiniteGradient { ref param, step: 3 } if param == "w"),
            "{e}"
        );
        assert_eq!(flat(vars[0].1.as_tensor()), before);
        assert_eq!(
            flat(d.param_state("w").unwrap().tensor("GG.0").unwrap()),
            st_before
        );
        assert_eq!(d.param_state("w").unwrap().scalar("step"), 1.0);
    }

    #[test]
    fn save_load_across_refreshes_is_bit_exact() {
        let cfg = SoapConfig {
            precondition_frequency: 2,
            merge_dims: true,
            max_precond_dim: 6,
            ..SoapConfig::default()
        };
        for dtype in [DType::F64, DType::F32] {
            let params = |dt| vec![("a", tensor(1, &[2, 3, 4], dt)), ("b", tensor(2, &[5], dt))];
            let grads = |s: u64, dt| {
                vec![
                    ("a", tensor(10 + s, &[2, 3, 4], dt)),
                    ("b", tensor(20 + s, &[5], dt)),
                ]
            };
            let (mut a, va) = soap(cfg.clone(), &params(dtype));
            let (mut b, _) = soap(cfg.clone(), &params(dtype));
            for s in 0..5 {
                step(&mut a, &grads(s, dtype)).unwrap();
                step(&mut b, &grads(s, dtype)).unwrap();
            }
            let bytes = b.state_dict().unwrap().to_bytes().unwrap();
            let vb: Vec<(&str, Tensor)> = b
                .vars()
                .iter()
                .map(|(n, v)| {
                    (
                        if n == "a" { "a" } else { "b" },
                        v.as_tensor().copy().unwrap(),
                    )
                })
                .collect();
            let (mut c, vc) = soap(cfg.clone(), &vb);
            c.load_state_dict(crate::optim::StateDict::from_bytes(&bytes, &Device::Cpu).unwrap())
                .unwrap();
            for s in 5..11 {
                step(&mut a, &grads(s, dtype)).unwrap();
                step(&mut c, &grads(s, dtype)).unwrap();
            }
            for ((_, x), (_, y)) in va.iter().zip(&vc) {
                let bits = |t: &Tensor| flat(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(x.as_tensor()), bits(y.as_tensor()), "{dtype:?}");
            }
        }
    }

    #[test]
    fn channels_last_equals_channels_first_on_the_permuted_tensor() {
        let base = SoapConfig {
            merge_dims: true,
            max_precond_dim: 8,
            precondition_frequency: 2,
            ..SoapConfig::default()
        };
        let nhwc = [2usize, 3, 2, 4];
        let to_nchw = |t: &Tensor| t.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap();
        let p = tensor(5, &nhwc, DType::F64);
        let (mut last, vl) = soap(
            SoapConfig {
                data_format: DataFormat::ChannelsLast,
                ..base.clone()
            },
            &[("w", p.clone())],
        );
        let (mut first, vf) = soap(base, &[("w", to_nchw(&p))]);
        for s in 0..8 {
            let g = tensor(40 + s, &nhwc, DType::F64);
            step(&mut last, &[("w", g.clone())]).unwrap();
            step(&mut first, &[("w", to_nchw(&g))]).unwrap();
            let err = max_rel_diff(
                &flat(&to_nchw(vl[0].1.as_tensor())),
                &flat(vf[0].1.as_tensor()),
            );
            assert!(err < 1e-14, "step {s}: {err:e}");
        }
    }

    #[test]
    fn shampoo_beta_and_frequency_come_from_the_state() {
        let (mut d, _) = soap(
            SoapConfig {
                shampoo_beta: 0.5,
                precondition_frequency: 7,
                ..SoapConfig::default()
            },
            &[("w", tensor(1, &[2, 3], DType::F64))],
        );
        step(&mut d, &[("w", tensor(2, &[2, 3], DType::F64))]).unwrap();
        let st = d.param_state("w").unwrap();
        assert_eq!(st.scalar("shampoo_beta"), 0.5);
        assert_eq!(st.scalar("precondition_frequency"), 7.0);
        // GG = (1 − βs)·G Gᵀ after the first call.
        let g = tensor(2, &[2, 3], DType::F64);
        let want = flat(&(g.matmul(&g.t().unwrap()).unwrap() * 0.5).unwrap());
        assert!(max_rel_diff(&flat(st.tensor("GG.0").unwrap()), &want) < 1e-15);
    }

    /// A second inner rule in a few lines: AdEMAMix-style, two original-space EMAs and
    /// `(m₁' + α·m₂')/(√v + ε)`. With α = 0 it must be SOAP's Adam exactly.
    #[derive(Debug)]
    struct TwoEma {
        adam: AdamInner,
        beta3: f64,
        alpha: f64,
    }

    impl InnerRule for TwoEma {
        fn name(&self) -> &'static str {
            "soap_two_ema"
        }
        fn moments(&self, _t: u64) -> Vec<(&'static str, f64, f64)> {
            vec![
                ("exp_avg", self.adam.beta1, 1.0 - self.adam.beta1),
                ("exp_avg_slow", self.beta3, 1.0 - self.beta3),
            ]
        }
        fn basis_stats(&self) -> &'static [&'static str] {
            &["exp_avg_sq"]
        }
        fn step_size(&self, lr: f64, t: u64) -> f64 {
            self.adam.step_size(lr, t)
        }
        fn direction(&self, _t: u64, dir: &Tensor, m: &[Tensor], s: &[Tensor]) -> Result<()> {
            let (b2, eps, alpha) = (self.adam.beta2, self.adam.eps, self.alpha);
            zip_mut::<f64>(&[dir, &s[0]], &[&m[0], &m[1]], |o, i| {
                let (d, rest) = o.split_first_mut().unwrap();
                for k in 0..d.len() {
                    let g = d[k];
                    rest[0][k] = b2 * rest[0][k] + (1.0 - b2) * (g * g);
                    d[k] = (i[0][k] + alpha * i[1][k]) / (rest[0][k].sqrt() + eps);
                }
                Ok(())
            })
        }
    }

    #[test]
    fn another_inner_rule_plugs_in() {
        let cfg = SoapConfig {
            precondition_frequency: 2,
            ..SoapConfig::default()
        };
        let meta = ParamMeta {
            name: "w".into(),
            shape: vec![3, 5],
            role: crate::optim::Role::Matrix,
        };
        let run = |rule: &dyn Rule| {
            let p = Var::from_tensor(&tensor(1, &[3, 5], DType::F64)).unwrap();
            let mut st = State::default();
            let group = State::default();
            for s in 0..7u64 {
                let ctx = StepCtx {
                    lr: cfg.lr,
                    lr_factor: 1.0,
                    weight_decay: cfg.weight_decay,
                    step: s + 1,
                    group: &group,
                };
                rule.update(
                    &ctx,
                    &meta,
                    &p,
                    &tensor(2 + s, &[3, 5], DType::F64),
                    &mut st,
                )
                .unwrap();
            }
            (flat(p.as_tensor()), st)
        };
        let adam = AdamInner::from(&cfg);
        let (want, _) = run(&Soap::new(cfg.clone(), adam));
        let two = |alpha| TwoEma {
            adam,
            beta3: 0.999,
            alpha,
        };
        let (got, st) = run(&Soap::new(cfg.clone(), two(0.0)));
        assert_eq!(got, want);
        assert!(st.tensors.contains_key("exp_avg_slow"));
        let (other, _) = run(&Soap::new(cfg.clone(), two(2.0)));
        assert_ne!(other, want);
        let rule = Soap::new(cfg, two(2.0));
        assert_eq!(rule.name(), "soap_two_ema");
        let mut diag = BTreeMap::new();
        rule.diagnostics(&st, &mut diag);
        assert_eq!(diag["soap_two_ema.factor_failures"], 0.0);
    }

    #[test]
    fn mismatched_state_is_refused() {
        let rule = Soap::new(
            SoapConfig::default(),
            AdamInner::from(&SoapConfig::default()),
        );
        let meta = ParamMeta {
            name: "w".into(),
            shape: vec![3, 4],
            role: crate::optim::Role::Matrix,
        };
        let mut st = State::default();
        st.tensors.insert(
            "Q.0".into(),
            Tensor::zeros((4, 4), DType::F64, &Device::Cpu).unwrap(),
        );
        assert!(rule.check_state(&meta, &st).is_err());
        let mut st = State::default();
        st.set_scalar("shampoo_beta", 0.95);
        st.tensors.insert(
            "exp_avg".into(),
            Tensor::zeros((3, 4), DType::F64, &Device::Cpu).unwrap(),
        );
        assert!(rule.check_state(&meta, &st).is_err(), "bases missing");
    }
}
