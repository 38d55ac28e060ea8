//! Language models to train optimizers on: an OLMo-style decoder ([`gpt::Gpt`]) as the seed
//! papers use, and a tiny next-token MLP ([`mlp::Mlp`]) for fast tests.
//!
//! Every model is built only from differentiable candle ops. candle-nn's fused kernels
//! (`LayerNorm::forward`, `RmsNorm::forward`, `softmax_last_dim`, `rope`, `sdpa`) have no backward
//! pass and silently detach whatever sits before them, so a model using them "trains" with most
//! parameters frozen; the layers here ([`layer_norm`], [`lm_loss`], the attention in `gpt`) are
//! composed from primitive ops instead, and a test checks that every parameter gets a gradient.
//! On the CPU the decoder and the loss run [`ops`]' fused kernels instead, which carry their own
//! backward passes; the composition stays the reference path (and the path on other devices),
//! selectable with [`Model::set_fused_ops`].
//!
//! Parameters live in a [`VarMap`] under names that make their role obvious to
//! [`Role::infer`](crate::optim::Role::infer): `wte.weight` (embedding), `lm_head.weight`
//! (head), `*norm*` (norm gains), `*.bias` (biases), everything else a matrix. Initial values are
//! drawn from a ChaCha12 generator seeded by the config's seed and the parameter's name, so a
//! model is a pure function of its config (and adding a parameter never shifts the others).

pub mod gpt;
pub mod mlp;
pub mod ops;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::optim::NamedParams;

pub use gpt::{Gpt, GptConfig, InitScheme};
pub use mlp::{Mlp, MlpConfig};

/// Which model to build, tagged by `kind` (`"gpt"` or `"mlp"`) in TOML/JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ModelConfig {
    /// The OLMo-style decoder.
    Gpt(GptConfig),
    /// The tiny next-token MLP.
    Mlp(MlpConfig),
}

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: [&str; 8] = [
    "test", "mlp-test", "tiny", "d256-l3", "d512-l3", "d512-l6", "small", "d768-l6",
];

impl ModelConfig {
    /// A named preset (vocab 256, byte-level; override `vocab_size` for other tokenizers):
    ///
    /// | name | kind | d_model | layers | heads | context | use |
    /// |---|---|---|---|---|---|---|
    /// | `test` | gpt | 32 | 2 | 2 | 32 | unit tests |
    /// | `mlp-test` | mlp | 32 | – | – | 32 | unit tests |
    /// | `tiny` | gpt | 128 | 2 | 4 | 128 | a run in about a minute on 2 cores |
    /// | `d256-l3` | gpt | 256 | 3 | 4 | 512 | the CBS paper's 2.4M proxy |
    /// | `d512-l3` | gpt | 512 | 3 | 8 | 512 | the 9.4M proxy |
    /// | `d512-l6`, `small` | gpt | 512 | 6 | 8 | 512 | the 19M proxy |
    /// | `d768-l6` | gpt | 768 | 6 | 12 | 512 | the 42M proxy |
    ///
    /// The decoders use QK-LayerNorm, no z-loss and Mitchell init, as the CBS paper's proxies do.
    pub fn preset(name: &str) -> Result<Self> {
        let gpt = |d_model, n_layers, n_heads, context| {
            ModelConfig::Gpt(GptConfig {
                d_model,
                n_layers,
                n_heads,
                context,
                ..GptConfig::default()
            })
        };
        Ok(match name {
            "test" => gpt(32, 2, 2, 32),
            "mlp-test" => ModelConfig::Mlp(MlpConfig::default()),
            "tiny" => gpt(128, 2, 4, 128),
            "d256-l3" => gpt(256, 3, 4, 512),
            "d512-l3" => gpt(512, 3, 8, 512),
            "d512-l6" | "small" => gpt(512, 6, 8, 512),
            "d768-l6" => gpt(768, 6, 12, 512),
            _ => {
                return Err(Error::config(
                    "model.preset",
                    format!("unknown preset `{name}`; known: {}", PRESETS.join(", ")),
                ))
            }
        })
    }

    /// Checks every field; errors name the field (`model.d_model` …).
    pub fn validate(&self) -> Result<()> {
        match self {
            ModelConfig::Gpt(c) => c.validate(),
            ModelConfig::Mlp(c) => c.validate(),
        }
    }

    /// Number of token ids the model accepts and predicts.
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Gpt(c) => c.vocab_size,
            ModelConfig::Mlp(c) => c.vocab_size,
        }
    }

    /// Longest sequence the model accepts (the training context).
    pub fn context(&self) -> usize {
        match self {
            ModelConfig::Gpt(c) => c.context,
            ModelConfig::Mlp(c) => c.context,
        }
    }

    /// Sets the vocabulary size (to match the data's tokenizer).
    pub fn set_vocab_size(&mut self, vocab_size: usize) {
        match self {
            ModelConfig::Gpt(c) => c.vocab_size = vocab_size,
            ModelConfig::Mlp(c) => c.vocab_size = vocab_size,
        }
    }

    /// Coefficient of the z-loss (0 when off).
    pub fn z_loss(&self) -> f64 {
        match self {
            ModelConfig::Gpt(c) => c.z_loss,
            ModelConfig::Mlp(_) => 0.0,
        }
    }

    /// Non-embedding parameter count as the papers define it (12·L·d² for the decoder: the
    /// attention and MLP matrices, norms excluded).
    pub fn non_embedding_params(&self) -> usize {
        match self {
            ModelConfig::Gpt(c) => c.non_embedding_params(),
            ModelConfig::Mlp(c) => c.non_embedding_params(),
        }
    }

    /// Validates and builds the model with fresh, seeded parameters in `dtype` on `device`.
    pub fn build(&self, dtype: DType, device: &Device) -> Result<Model> {
        self.validate()?;
        if !dtype.is_float() {
            return Err(Error::DType {
                what: "model parameters".into(),
                dtype,
            });
        }
        let varmap = VarMap::new();
        let init = ParamInit::new(&varmap, dtype, device);
        let net = match self {
            ModelConfig::Gpt(c) => Net::Gpt(Gpt::new(c, &init)?),
            ModelConfig::Mlp(c) => Net::Mlp(Mlp::new(c, &init)?),
        };
        Ok(Model {
            net,
            varmap,
            config: self.clone(),
            dtype,
            device: device.clone(),
            fused: ops::supported(device, dtype),
        })
    }
}

enum Net {
    Gpt(Gpt),
    Mlp(Mlp),
}

/// A built model: its network, the [`VarMap`] holding its parameters, and its config.
pub struct Model {
    net: Net,
    varmap: VarMap,
    config: ModelConfig,
    dtype: DType,
    device: Device,
    /// Whether the loss (and the decoder) use the fused CPU kernels.
    fused: bool,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Logits `(batch, time, vocab)` for token ids `(batch, time)` (U32, `time <= context`).
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        match &self.net {
            Net::Gpt(m) => m.forward(tokens),
            Net::Mlp(m) => m.forward(tokens),
        }
    }

    /// The training loss of `logits` against `targets` `(batch, time)`: mean cross-entropy plus
    /// the z-loss when the config enables it.
    pub fn loss(&self, logits: &Tensor, targets: &Tensor) -> Result<Loss> {
        if self.fused && ops::supported(logits.device(), logits.dtype()) {
            lm_loss_fused(logits, targets, self.config.z_loss())
        } else {
            lm_loss(logits, targets, self.config.z_loss())
        }
    }

    /// Selects the fused CPU kernels of [`ops`] for the decoder's forward pass and the loss
    /// (`true`, the default on the CPU in f32/f64) or the primitive-op composition they replace
    /// (the reference path, and the only one on other devices). Both compute the same function
    /// and gradients up to rounding. Returns whether the fused kernels are now in use.
    pub fn set_fused_ops(&mut self, on: bool) -> bool {
        self.fused = on && ops::supported(&self.device, self.dtype);
        if let Net::Gpt(g) = &mut self.net {
            g.set_fused_ops(self.fused);
        }
        self.fused
    }

    /// Whether the fused CPU kernels are in use.
    pub fn fused_ops(&self) -> bool {
        self.fused
    }

    /// [`forward`](Self::forward) then [`loss`](Self::loss).
    pub fn forward_loss(&self, tokens: &Tensor, targets: &Tensor) -> Result<Loss> {
        let logits = self.forward(tokens)?;
        self.loss(&logits, targets)
    }

    /// The parameters, sorted by name, with their roles (what optimizers take).
    pub fn params(&self) -> Result<NamedParams> {
        NamedParams::from_varmap(&self.varmap)
    }

    /// The variable map holding the parameters (for saving, loading, swapping in eval weights).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Parameter dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device holding the parameters.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Total number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Non-embedding parameters as the papers count them (see
    /// [`ModelConfig::non_embedding_params`]).
    pub fn non_embedding_params(&self) -> usize {
        self.config.non_embedding_params()
    }
}

/// The parts of a language-model loss. `total` is what to differentiate; `ce` is what to report
/// and compare (evaluation losses are cross-entropy only).
#[derive(Debug, Clone)]
pub struct Loss {
    /// `ce + z_loss_coefficient · z`: the training objective (a scalar tensor).
    pub total: Tensor,
    /// Mean cross-entropy in nats per token (a scalar tensor).
    pub ce: Tensor,
    /// Mean squared log-partition `mean(logsumexp(logits)²)`, unscaled; present only when the
    /// z-loss is on.
    pub z: Option<Tensor>,
}

/// Mean cross-entropy (nats per token) and, when `z_loss > 0`, OLMo's auxiliary z-loss
/// `z_loss · mean(logsumexp(logits)²)`, from logits `(…, vocab)` and U32 targets `(…)`.
///
/// One log-sum-exp serves both terms; the row maximum is detached, which leaves every gradient
/// unchanged (the log-sum-exp does not depend on the shift) and keeps it out of the graph.
pub fn lm_loss(logits: &Tensor, targets: &Tensor, z_loss: f64) -> Result<Loss> {
    let vocab = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), vocab))?;
    let targets = targets.flatten_all()?;
    if targets.dim(0)? != logits.dim(0)? {
        return Err(Error::Msg(format!(
            "loss: {} targets for {} logit rows",
            targets.dim(0)?,
            logits.dim(0)?
        )));
    }
    if targets.dtype() != DType::U32 {
        return Err(Error::DType {
            what: "loss targets (token ids must be U32)".into(),
            dtype: targets.dtype(),
        });
    }
    let max = logits.max_keepdim(1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse_shifted = shifted.exp()?.sum_keepdim(1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    let ce = (&lse_shifted - &picked)?.mean_all()?;
    if z_loss > 0.0 {
        let z = (&lse_shifted + &max)?.sqr()?.mean_all()?;
        let total = (&ce + z.affine(z_loss, 0.0)?)?;
        Ok(Loss {
            total,
            ce,
            z: Some(z),
        })
    } else {
        Ok(Loss {
            total: ce.clone(),
            ce,
            z: None,
        })
    }
}

/// [`lm_loss`] with the fused CPU kernel [`ops::cross_entropy`]: one pass forward, one
/// backward. `ce` and `z` are detached scalars (reporting only); `total` carries the gradient.
pub fn lm_loss_fused(logits: &Tensor, targets: &Tensor, z_loss: f64) -> Result<Loss> {
    let l = ops::cross_entropy(logits, targets, z_loss)?;
    if z_loss > 0.0 {
        Ok(Loss {
            total: l.total,
            ce: l.ce,
            z: Some(l.z),
        })
    } else {
        // Without the z-loss the total is the cross-entropy itself.
        Ok(Loss {
            ce: l.total.clone(),
            total: l.total,
            z: None,
        })
    }
}

/// LayerNorm over the last dimension, composed from primitive (differentiable) ops:
/// `(x − mean) / sqrt(var + eps) · weight + bias`, with the biased variance as torch uses.
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let mut y = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(w)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}

/// `x · wᵀ` for `x` of shape `(…, in)` and a torch-layout weight `(out, in)`.
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    let mut shape = x.dims().to_vec();
    let last = shape.len() - 1;
    if shape[last] != in_dim {
        return Err(Error::Msg(format!(
            "linear: input has {} features, weight expects {in_dim}",
            shape[last]
        )));
    }
    let y = x.reshape(((), in_dim))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    shape[last] = out_dim;
    Ok(y.reshape(shape)?)
}

/// Validates U32 token ids `(batch, time)` against the context length.
pub(crate) fn check_tokens(tokens: &Tensor, context: usize) -> Result<(usize, usize)> {
    let (b, t) = tokens.dims2().map_err(|_| {
        Error::Msg(format!(
            "model input must be token ids of shape (batch, time), got {:?}",
            tokens.dims()
        ))
    })?;
    if tokens.dtype() != DType::U32 {
        return Err(Error::DType {
            what: "model input (token ids must be U32)".into(),
            dtype: tokens.dtype(),
        });
    }
    if t == 0 || t > context {
        return Err(Error::Msg(format!(
            "model input has {t} positions; the model accepts 1..={context} (its context)"
        )));
    }
    Ok((b, t))
}

/// Creates seeded parameters in a [`VarMap`].
///
/// Each parameter draws from its own ChaCha12 stream, seeded by the model seed and the
/// parameter's name (FNV-1a), so values do not depend on creation order.
pub struct ParamInit<'a> {
    varmap: &'a VarMap,
    dtype: DType,
    device: &'a Device,
}

impl<'a> ParamInit<'a> {
    /// Creates parameters in `varmap` with `dtype` on `device`.
    pub fn new(varmap: &'a VarMap, dtype: DType, device: &'a Device) -> Self {
        Self {
            varmap,
            dtype,
            device,
        }
    }

    fn insert(&self, name: &str, shape: &[usize], values: Vec<f64>) -> Result<Tensor> {
        let t = Tensor::from_vec(values, shape, self.device)?;
        let t = if self.dtype == DType::F64 {
            t
        } else {
            t.to_dtype(self.dtype)?
        };
        let var = Var::from_tensor(&t)?;
        let tensor = var.as_tensor().clone();
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| Error::Msg("VarMap mutex poisoned".into()))?;
        if data.contains_key(name) {
            return Err(Error::Groups(format!(
                "parameter name `{name}` created twice"
            )));
        }
        data.insert(name.to_string(), var);
        Ok(tensor)
    }

    /// A parameter filled with `value`.
    pub fn constant(&self, name: &str, shape: &[usize], value: f64) -> Result<Tensor> {
        let n = shape.iter().product();
        self.insert(name, shape, vec![value; n])
    }

    /// A parameter drawn from N(0, std²) truncated to ±3·std (resampled, as torch's
    /// `trunc_normal_` with `a = −3σ, b = 3σ` does), from the stream of (`seed`, `name`).
    pub fn trunc_normal(&self, name: &str, shape: &[usize], std: f64, seed: u64) -> Result<Tensor> {
        self.normal(name, shape, std, Some(3.0), seed)
    }

    /// A parameter drawn from N(0, std²), resampling draws beyond `cutoff`·std when a cutoff is
    /// given, from the stream of (`seed`, `name`).
    pub fn normal(
        &self,
        name: &str,
        shape: &[usize],
        std: f64,
        cutoff: Option<f64>,
        seed: u64,
    ) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut rng = ChaCha12Rng::seed_from_u64(stream_seed(seed, name));
        let mut values = Vec::with_capacity(n);
        while values.len() < n {
            let z: f64 = StandardNormal.sample(&mut rng);
            if cutoff.is_none_or(|c| z.abs() <= c) {
                values.push(z * std);
            }
        }
        self.insert(name, shape, values)
    }
}

/// FNV-1a over the seed's bytes and the name: a stable per-parameter stream id.
fn stream_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in seed.to_le_bytes().iter().chain(name.as_bytes()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_count() {
        for name in PRESETS {
            let cfg = ModelConfig::preset(name).unwrap();
            cfg.validate().unwrap();
            assert_eq!(cfg.vocab_size(), 256);
        }
        let small = ModelConfig::preset("small").unwrap();
        assert_eq!(small.non_embedding_params(), 12 * 6 * 512 * 512);
        assert!(ModelConfig::preset("nope")
            .unwrap_err()
            .to_string()
            .contains("d512-l6"));
    }

    #[test]
    fn config_round_trips_through_toml() {
        let cfg = ModelConfig::preset("test").unwrap();
        let text = toml::to_string(&cfg).unwrap();
        assert!(text.contains("kind = \"gpt\""));
        let back: ModelConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, cfg);
        let partial: ModelConfig =
            toml::from_str("kind = \"gpt\"\nd_model = 64\nn_heads = 4").unwrap();
        match partial {
            ModelConfig::Gpt(c) => {
                assert_eq!(c.d_model, 64);
                assert_eq!(c.vocab_size, 256);
            }
            _ => panic!("expected gpt"),
        }
        let err = toml::from_str::<ModelConfig>("kind = \"gpt\"\nd_modle = 64").unwrap_err();
        assert!(err.to_string().contains("d_modle"), "{err}");
    }

    #[test]
    fn loss_matches_closed_form_and_z_loss() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[[1.0f64, 2.0, 3.0], [0.5, -1.0, 0.0]]], &dev).unwrap();
        let targets = Tensor::new(&[[2u32, 0]], &dev).unwrap();
        let lse = |r: [f64; 3]| r.iter().map(|x| x.exp()).sum::<f64>().ln();
        let (l0, l1) = (lse([1.0, 2.0, 3.0]), lse([0.5, -1.0, 0.0]));
        let ce = ((l0 - 3.0) + (l1 - 0.5)) / 2.0;
        let z = (l0 * l0 + l1 * l1) / 2.0;
        let plain = lm_loss(&logits, &targets, 0.0).unwrap();
        assert!((plain.ce.to_scalar::<f64>().unwrap() - ce).abs() < 1e-12);
        assert!(plain.z.is_none());
        let with_z = lm_loss(&logits, &targets, 1e-2).unwrap();
        assert!((with_z.total.to_scalar::<f64>().unwrap() - (ce + 1e-2 * z)).abs() < 1e-12);
        assert!((with_z.z.unwrap().to_scalar::<f64>().unwrap() - z).abs() < 1e-12);
        let reference = candle_nn::loss::cross_entropy(
            &logits.reshape((2, 3)).unwrap(),
            &targets.flatten_all().unwrap(),
        )
        .unwrap();
        assert!((reference.to_scalar::<f64>().unwrap() - ce).abs() < 1e-12);
    }

    #[test]
    fn layer_norm_matches_candle_slow_path() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1.0f64, 2.0, 4.0, -3.0], [0.1, 0.2, 0.3, 0.4]], &dev).unwrap();
        let w = Tensor::new(&[1.0f64, 0.5, 2.0, -1.0], &dev).unwrap();
        let b = Tensor::new(&[0.0f64, 0.1, 0.2, 0.3], &dev).unwrap();
        // candle takes ε as f32: use one that f32 represents exactly.
        let eps = 1.0 / 1024.0;
        let ours = layer_norm(&x, Some(&w), Some(&b), eps).unwrap();
        let theirs = candle_nn::ops::layer_norm_slow(&x, &w, &b, eps as f32).unwrap();
        let diff = (ours - theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-12, "{diff}");
    }

    #[test]
    fn init_is_seeded_and_order_free() {
        let dev = Device::Cpu;
        let (a, b) = (VarMap::new(), VarMap::new());
        let ia = ParamInit::new(&a, DType::F32, &dev);
        let ib = ParamInit::new(&b, DType::F32, &dev);
        let x1 = ia.trunc_normal("x", &[4, 5], 1.0, 7).unwrap();
        let _ = ia.trunc_normal("y", &[3], 1.0, 7).unwrap();
        let _ = ib.trunc_normal("y", &[3], 1.0, 7).unwrap();
        let x2 = ib.trunc_normal("x", &[4, 5], 1.0, 7).unwrap();
        let v1 = x1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let v2 = x2.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v1, v2);
        assert!(v1.iter().all(|v| v.abs() <= 3.0));
        let other = ia.trunc_normal("z", &[4, 5], 1.0, 8).unwrap();
        assert_ne!(other.flatten_all().unwrap().to_vec1::<f32>().unwrap(), v1);
        assert!(ia.constant("x", &[1], 0.0).is_err());
    }
}
