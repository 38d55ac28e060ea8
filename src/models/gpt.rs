//! An OLMo-style decoder, as the critical-batch-size, Deconstructing and SOAP papers train:
//!
//! ```text
//! x = wte[tokens]
//! per block:  x = x + Attn(LN(x)),  x = x + MLP(LN(x))
//! logits = LN(x) · lm_headᵀ
//! Attn(h) = softmax(RoPE(q) RoPE(k)ᵀ / √d_head + causal) v · o_projᵀ,
//!           q = [LN](h q_projᵀ), k = [LN](h k_projᵀ), v = h v_projᵀ   ([LN] = QK-LayerNorm, optional)
//! MLP(h)  = GeLU(h fc_inᵀ) fc_outᵀ          (fc_in: 4d × d, exact erf GeLU)
//! ```
//!
//! Pre-LayerNorm blocks with affine gains and no biases anywhere (OLMo's `include_bias: false`,
//! which also drops the LayerNorm biases), rotary position embeddings on every head (the
//! half-split "rotate_half" form, θ = 10 000), no weight tying, no dropout. QK-LayerNorm normalises
//! q and k over the full model width before the heads are split, as OLMo's
//! `attention_layer_norm` does. The z-loss (OLMo's `softmax_auxiliary_loss`) is applied by
//! [`lm_loss`](super::lm_loss) from the config's coefficient.
//!
//! Parameter names: `wte.weight`, `blocks.{i}.attn_norm.weight`,
//! `blocks.{i}.attn.{q,k,v,o}_proj.weight`, `blocks.{i}.attn.{q,k}_norm.weight`,
//! `blocks.{i}.mlp_norm.weight`, `blocks.{i}.mlp.fc_in.weight`, `blocks.{i}.mlp.fc_out.weight`,
//! `final_norm.weight`, `lm_head.weight`. Matrices are stored `(out, in)` as torch stores them.

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use super::{check_tokens, layer_norm, linear, ops, ParamInit};
use crate::error::{check, Error, Result};

/// How the decoder's matrices are initialised (norm gains always start at 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitScheme {
    /// OLMo's "mitchell" init, which the papers use: every matrix N(0, 1/d_in) truncated at ±3σ,
    /// where d_in is its input width; the two residual-output matrices (`o_proj`, `fc_out`) of
    /// block i (0-based) are further scaled by 1/√(2(i+1)); embedding and head use 1/√d_model.
    Mitchell,
    /// OLMo's "normal" init: every matrix N(0, `init_std`²), untruncated, and the MLP output
    /// matrix (`fc_out`, OLMo's only `_is_residual` module) further scaled by 1/√(2·n_layers).
    Normal,
}

/// Decoder hyperparameters. Defaults: the `test` preset's shape (d 32, 2 layers, 2 heads,
/// context 32, vocab 256) with QK-LayerNorm, no z-loss and Mitchell init.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GptConfig {
    /// Model width.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Attention heads; must divide `d_model`, and the head width must be even (RoPE).
    pub n_heads: usize,
    /// Vocabulary size (embedding rows and head outputs).
    pub vocab_size: usize,
    /// Longest sequence (positions) the model accepts.
    pub context: usize,
    /// LayerNorm on q and k before RoPE (OLMo's `attention_layer_norm`).
    pub qk_norm: bool,
    /// z-loss coefficient (0 = off; the SOAP/Deconstructing papers use 1e-4).
    pub z_loss: f64,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// LayerNorm ε.
    pub layer_norm_eps: f64,
    /// Initialisation scheme.
    pub init: InitScheme,
    /// Standard deviation for [`InitScheme::Normal`].
    pub init_std: f64,
    /// Seed of the initial parameters.
    pub seed: u64,
}

impl Default for GptConfig {
    fn default() -> Self {
        Self {
            d_model: 32,
            n_layers: 2,
            n_heads: 2,
            vocab_size: 256,
            context: 32,
            qk_norm: true,
            z_loss: 0.0,
            rope_theta: 10_000.0,
            layer_norm_eps: 1e-5,
            init: InitScheme::Mitchell,
            init_std: 0.02,
            seed: 0,
        }
    }
}

impl GptConfig {
    /// Checks every field; errors name it (`model.n_heads` …).
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("model.d_model", self.d_model),
            ("model.n_layers", self.n_layers),
            ("model.n_heads", self.n_heads),
            ("model.vocab_size", self.vocab_size),
            ("model.context", self.context),
        ] {
            check::at_least_one(field, v as u64)?;
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(Error::config(
                "model.n_heads",
                format!(
                    "must divide d_model = {}, got {}",
                    self.d_model, self.n_heads
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(Error::config(
                "model.n_heads",
                format!(
                    "gives an odd head width {} (d_model {} / {} heads); RoPE needs an even one",
                    self.head_dim(),
                    self.d_model,
                    self.n_heads
                ),
            ));
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(Error::config("model.vocab_size", "must fit in u32"));
        }
        check::non_negative("model.z_loss", self.z_loss)?;
        check::positive("model.rope_theta", self.rope_theta)?;
        check::positive("model.layer_norm_eps", self.layer_norm_eps)?;
        check::positive("model.init_std", self.init_std)?;
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// 12·L·d²: the attention (4d²) and MLP (8d²) matrices; norms and embeddings excluded.
    pub fn non_embedding_params(&self) -> usize {
        12 * self.n_layers * self.d_model * self.d_model
    }

    /// Every parameter: non-embedding matrices, the embedding and head (2·V·d) and the norm
    /// gains.
    pub fn num_params(&self) -> usize {
        let d = self.d_model;
        let norms_per_block = if self.qk_norm { 4 } else { 2 };
        self.non_embedding_params()
            + 2 * self.vocab_size * d
            + self.n_layers * norms_per_block * d
            + d
    }
}

struct Block {
    attn_norm: Tensor,
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
    qk_norm: Option<(Tensor, Tensor)>,
    mlp_norm: Tensor,
    fc_in: Tensor,
    fc_out: Tensor,
}

/// The decoder. Build it through [`ModelConfig::build`](super::ModelConfig::build) or
/// [`Gpt::new`].
pub struct Gpt {
    cfg: GptConfig,
    wte: Tensor,
    blocks: Vec<Block>,
    final_norm: Tensor,
    lm_head: Tensor,
    /// `(context, head_dim)` cosines and sines of the rotary angles, in the model dtype.
    cos: Tensor,
    sin: Tensor,
    /// `(context, context)` additive causal mask: 0 on and below the diagonal, −∞ above.
    mask: Tensor,
    /// Whether [`forward`](Self::forward) runs the fused CPU kernels of [`super::ops`] (only
    /// possible on the CPU in f32/f64) instead of the primitive-op composition.
    fused: bool,
}

impl Gpt {
    /// Creates the parameters in `init`'s `VarMap` and the RoPE/mask constants.
    pub fn new(cfg: &GptConfig, init: &ParamInit<'_>) -> Result<Self> {
        cfg.validate()?;
        let (d, v, l) = (cfg.d_model, cfg.vocab_size, cfg.n_layers);
        let seed = cfg.seed;
        // (std, truncation in σ) of a matrix with input width `d_in`; `layer` is set for the
        // residual-output matrices of block `layer`.
        let std_for = |d_in: usize, layer: Option<usize>, is_fc_out: bool| match cfg.init {
            InitScheme::Normal => {
                let scale = if is_fc_out {
                    1.0 / (2.0 * l as f64).sqrt()
                } else {
                    1.0
                };
                (cfg.init_std * scale, None)
            }
            InitScheme::Mitchell => {
                let base = 1.0 / (d_in as f64).sqrt();
                let std = match layer {
                    Some(i) => base / (2.0 * (i as f64 + 1.0)).sqrt(),
                    None => base,
                };
                (std, Some(3.0))
            }
        };
        let matrix = |name: &str, out: usize, inp: usize, layer: Option<usize>| {
            let is_fc_out = name.ends_with("mlp.fc_out.weight");
            let (std, cutoff) = std_for(inp, layer, is_fc_out);
            init.normal(name, &[out, inp], std, cutoff, seed)
        };
        let wte = matrix("wte.weight", v, d, None)?;
        let mut blocks = Vec::with_capacity(l);
        for i in 0..l {
            let p = format!("blocks.{i}");
            let qk_norm = if cfg.qk_norm {
                Some((
                    init.constant(&format!("{p}.attn.q_norm.weight"), &[d], 1.0)?,
                    init.constant(&format!("{p}.attn.k_norm.weight"), &[d], 1.0)?,
                ))
            } else {
                None
            };
            blocks.push(Block {
                attn_norm: init.constant(&format!("{p}.attn_norm.weight"), &[d], 1.0)?,
                q_proj: matrix(&format!("{p}.attn.q_proj.weight"), d, d, None)?,
                k_proj: matrix(&format!("{p}.attn.k_proj.weight"), d, d, None)?,
                v_proj: matrix(&format!("{p}.attn.v_proj.weight"), d, d, None)?,
                o_proj: matrix(&format!("{p}.attn.o_proj.weight"), d, d, Some(i))?,
                qk_norm,
                mlp_norm: init.constant(&format!("{p}.mlp_norm.weight"), &[d], 1.0)?,
                fc_in: matrix(&format!("{p}.mlp.fc_in.weight"), 4 * d, d, None)?,
                fc_out: matrix(&format!("{p}.mlp.fc_out.weight"), d, 4 * d, Some(i))?,
            });
        }
        let final_norm = init.constant("final_norm.weight", &[d], 1.0)?;
        let lm_head = matrix("lm_head.weight", v, d, None)?;
        let (cos, sin) = rope_tables(cfg, init.dtype, init.device)?;
        let mask = causal_mask(cfg.context, init.dtype, init.device)?;
        Ok(Self {
            cfg: cfg.clone(),
            wte,
            blocks,
            final_norm,
            lm_head,
            cos,
            sin,
            mask,
            fused: ops::supported(init.device, init.dtype),
        })
    }

    /// Selects the fused CPU kernels (`true`, the default where they can run) or the
    /// primitive-op composition, the reference path and the one every other device takes.
    /// Returns whether the fused kernels are now in use: `false` where they cannot run.
    pub fn set_fused_ops(&mut self, on: bool) -> bool {
        self.fused = on && ops::supported(self.wte.device(), self.wte.dtype());
        self.fused
    }

    /// Whether the fused CPU kernels are in use.
    pub fn fused_ops(&self) -> bool {
        self.fused
    }

    /// The config.
    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// Logits `(batch, time, vocab)` for U32 token ids `(batch, time)`, `time <= context`.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        if self.fused {
            return self.forward_fused(tokens);
        }
        let (b, t) = check_tokens(tokens, self.cfg.context)?;
        let d = self.cfg.d_model;
        let eps = self.cfg.layer_norm_eps;
        let mut x = self
            .wte
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        let mask = self.mask.narrow(0, 0, t)?.narrow(1, 0, t)?;
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        for block in &self.blocks {
            let h = layer_norm(&x, Some(&block.attn_norm), None, eps)?;
            x = (x + self.attention(block, &h, &mask, &cos, &sin)?)?;
            let h = layer_norm(&x, Some(&block.mlp_norm), None, eps)?;
            let h = linear(&h, &block.fc_in, None)?.gelu_erf()?;
            x = (x + linear(&h, &block.fc_out, None)?)?;
        }
        let x = layer_norm(&x, Some(&self.final_norm), None, eps)?;
        linear(&x, &self.lm_head, None)
    }

    fn attention(
        &self,
        block: &Block,
        h: &Tensor,
        mask: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let nh = self.cfg.n_heads;
        let eps = self.cfg.layer_norm_eps;
        let mut q = linear(h, &block.q_proj, None)?;
        let mut k = linear(h, &block.k_proj, None)?;
        let v = linear(h, &block.v_proj, None)?;
        if let Some((qn, kn)) = &block.qk_norm {
            q = layer_norm(&q, Some(qn), None, eps)?;
            k = layer_norm(&k, Some(kn), None, eps)?;
        }
        let q = rope_composed(&split_heads(&q, nh)?, cos, sin)?;
        let k = rope_composed(&split_heads(&k, nh)?, cos, sin)?;
        let v = split_heads(&v, nh)?;
        let y = attention_heads(&q, &k, &v, mask)?;
        linear(&y, &block.o_proj, None)
    }

    /// [`forward`](Self::forward) with the fused CPU kernels: the same function, rounded
    /// differently. The heads stay side by side in `(batch, time, d_model)` tensors throughout
    /// (RoPE and attention work per head in place), so no head split or merge is copied.
    fn forward_fused(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = check_tokens(tokens, self.cfg.context)?;
        Ok(self.logits_fused(tokens, t)?.reshape((b, t, ()))?)
    }

    /// The fused forward pass on `(batch·time, width)` activations: the products need no
    /// reshape around them, and every reshape would cost a gradient buffer in the backward pass.
    fn logits_fused(&self, tokens: &Tensor, t: usize) -> Result<Tensor> {
        let nh = self.cfg.n_heads;
        let eps = self.cfg.layer_norm_eps;
        let mm = ops::linear;
        let mut x = self.wte.index_select(&tokens.flatten_all()?, 0)?;
        for block in &self.blocks {
            let h = ops::layer_norm(&x, &block.attn_norm, eps)?;
            let mut q = mm(&h, &block.q_proj)?;
            let mut k = mm(&h, &block.k_proj)?;
            let v = mm(&h, &block.v_proj)?;
            if let Some((qn, kn)) = &block.qk_norm {
                q = ops::layer_norm(&q, qn, eps)?;
                k = ops::layer_norm(&k, kn, eps)?;
            }
            let q = ops::rope(&q, &self.cos, &self.sin, nh, t)?;
            let k = ops::rope(&k, &self.cos, &self.sin, nh, t)?;
            let y = ops::attention(&q, &k, &v, nh, t)?;
            x = (x + mm(&y, &block.o_proj)?)?;
            let h = ops::layer_norm(&x, &block.mlp_norm, eps)?;
            let h = ops::gelu(&mm(&h, &block.fc_in)?)?;
            x = (x + mm(&h, &block.fc_out)?)?;
        }
        let x = ops::layer_norm(&x, &self.final_norm, eps)?;
        mm(&x, &self.lm_head)
    }
}

/// `(batch, time, heads·head_dim)` → `(batch, heads, time, head_dim)`, contiguous.
fn split_heads(x: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    Ok(x.reshape((b, t, n_heads, d / n_heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// Causal softmax attention composed from primitive ops, on heads split into their own axis
/// `(batch, heads, time, head_dim)`; returns the heads merged back, `(batch, time, d_model)`.
/// `mask` is the additive `(time, time)` causal mask.
fn attention_heads(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(mask)?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    Ok(probs.matmul(v)?.transpose(1, 2)?.reshape((b, t, nh * hd))?)
}

/// The composition that [`ops::attention`] replaces, on `(batch, time, d_model)` inputs.
#[cfg(test)]
pub(crate) fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    n_heads: usize,
    mask: &Tensor,
) -> Result<Tensor> {
    attention_heads(
        &split_heads(q, n_heads)?,
        &split_heads(k, n_heads)?,
        &split_heads(v, n_heads)?,
        mask,
    )
}

/// Rotates `x` `(batch, heads, time, head_dim)` by the per-position angles:
/// `x·cos + rotate_half(x)·sin`, with `rotate_half([x1, x2]) = [−x2, x1]` over the two halves of
/// the head width. Built from narrow/cat/mul so it is differentiable.
pub(crate) fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let half = hd / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// cos/sin tables `(context, head_dim)`: position p, frequency index j < head_dim/2 gives the
/// angle p·θ^(−2j/head_dim), repeated for both halves.
fn rope_tables(cfg: &GptConfig, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let half = hd / 2;
    let mut cos = Vec::with_capacity(cfg.context * hd);
    let mut sin = Vec::with_capacity(cfg.context * hd);
    for p in 0..cfg.context {
        for j in 0..hd {
            let freq = cfg.rope_theta.powf(-2.0 * (j % half) as f64 / hd as f64);
            let angle = p as f64 * freq;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (cfg.context, hd), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (cfg.context, hd), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

pub(crate) fn causal_mask(context: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let values: Vec<f64> = (0..context)
        .flat_map(|i| (0..context).map(move |j| if j <= i { 0.0 } else { f64::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(values, (context, context), device)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::super::{ModelConfig, PRESETS};
    use super::*;
    use crate::optim::Role;

    fn tokens(b: usize, t: usize, vocab: u32, salt: u32) -> Tensor {
        let v: Vec<u32> = (0..(b * t) as u32)
            .map(|i| (i * 7 + salt * 13 + i * i) % vocab)
            .collect();
        Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
    }

    fn cfg(qk_norm: bool, z_loss: f64) -> ModelConfig {
        ModelConfig::Gpt(GptConfig {
            d_model: 16,
            n_layers: 2,
            n_heads: 2,
            vocab_size: 11,
            context: 8,
            qk_norm,
            z_loss,
            ..GptConfig::default()
        })
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |f: fn(&mut GptConfig), field: &str| {
            let mut c = GptConfig::default();
            f(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        };
        bad(|c| c.n_heads = 3, "model.n_heads");
        bad(|c| c.n_heads = 32, "model.n_heads"); // head width 1: odd
        bad(|c| c.d_model = 0, "model.d_model");
        bad(|c| c.context = 0, "model.context");
        bad(|c| c.vocab_size = 0, "model.vocab_size");
        bad(|c| c.z_loss = -1.0, "model.z_loss");
        bad(|c| c.init_std = 0.0, "model.init_std");
        bad(|c| c.rope_theta = f64::NAN, "model.rope_theta");
    }

    #[test]
    fn shapes_names_roles_and_counts() {
        let c = cfg(true, 0.0);
        let model = c.build(DType::F32, &Device::Cpu).unwrap();
        let logits = model.forward(&tokens(3, 8, 11, 0)).unwrap();
        assert_eq!(logits.dims(), &[3, 8, 11]);
        let short = model.forward(&tokens(2, 5, 11, 0)).unwrap();
        assert_eq!(short.dims(), &[2, 5, 11]);
        let params = model.params().unwrap();
        let ModelConfig::Gpt(g) = &c else {
            unreachable!()
        };
        assert_eq!(model.num_params(), g.num_params());
        assert_eq!(model.non_embedding_params(), 12 * 2 * 16 * 16);
        for p in params.iter() {
            let expected = if p.meta.name == "wte.weight" {
                Role::Embedding
            } else if p.meta.name == "lm_head.weight" {
                Role::Head
            } else if p.meta.name.contains("norm") {
                Role::Norm
            } else {
                Role::Matrix
            };
            assert_eq!(p.meta.role, expected, "{}", p.meta.name);
        }
        let names: Vec<_> = params.iter().map(|p| p.meta.name.clone()).collect();
        for n in [
            "blocks.1.attn.q_proj.weight",
            "blocks.1.attn.k_proj.weight",
            "blocks.1.attn.v_proj.weight",
            "blocks.1.attn.o_proj.weight",
            "blocks.1.attn.q_norm.weight",
            "blocks.0.mlp.fc_in.weight",
            "final_norm.weight",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
        let no_qk = cfg(false, 0.0).build(DType::F32, &Device::Cpu).unwrap();
        assert_eq!(no_qk.params().unwrap().len(), params.len() - 4);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let model = cfg(true, 0.0).build(DType::F32, &Device::Cpu).unwrap();
        let long = tokens(1, 9, 11, 0);
        assert!(model
            .forward(&long)
            .unwrap_err()
            .to_string()
            .contains("context"));
        let wrong_dtype = tokens(1, 4, 11, 0).to_dtype(DType::I64).unwrap();
        assert!(model.forward(&wrong_dtype).is_err());
        let flat = Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap();
        assert!(model.forward(&flat).is_err());
        assert!(cfg(true, 0.0).build(DType::U32, &Device::Cpu).is_err());
    }

    #[test]
    fn same_seed_same_model_other_seed_differs() {
        let a = cfg(true, 0.0).build(DType::F32, &Device::Cpu).unwrap();
        let b = cfg(true, 0.0).build(DType::F32, &Device::Cpu).unwrap();
        let mut c2 = cfg(true, 0.0);
        if let ModelConfig::Gpt(g) = &mut c2 {
            g.seed = 1;
        }
        let c = c2.build(DType::F32, &Device::Cpu).unwrap();
        let x = tokens(2, 8, 11, 3);
        let la = a.forward(&x).unwrap().flatten_all().unwrap();
        let lb = b.forward(&x).unwrap().flatten_all().unwrap();
        let lc = c.forward(&x).unwrap().flatten_all().unwrap();
        assert_eq!(la.to_vec1::<f32>().unwrap(), lb.to_vec1::<f32>().unwrap());
        assert_ne!(la.to_vec1::<f32>().unwrap(), lc.to_vec1::<f32>().unwrap());
    }

    #[test]
    fn mitchell_init_scales() {
        let c = GptConfig {
            d_model: 64,
            n_heads: 4,
            n_layers: 2,
            ..GptConfig::default()
        };
        let model = ModelConfig::Gpt(c.clone())
            .build(DType::F64, &Device::Cpu)
            .unwrap();
        let data = model.varmap().data().lock().unwrap();
        let std = |n: &str| {
            let v = data[n].flatten_all().unwrap().to_vec1::<f64>().unwrap();
            (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
        };
        // Truncation at 3σ shrinks the std by ~1.3 %.
        let close = |got: f64, want: f64| assert!((got / want - 1.0).abs() < 0.06, "{got} {want}");
        close(std("blocks.0.attn.q_proj.weight"), 1.0 / 8.0);
        close(std("blocks.1.attn.o_proj.weight"), 1.0 / 8.0 / 2.0);
        close(std("blocks.1.mlp.fc_out.weight"), 1.0 / 16.0 / 2.0);
        close(std("wte.weight"), 1.0 / 8.0);
        assert_eq!(
            data["final_norm.weight"].to_vec1::<f64>().unwrap(),
            vec![1.0; 64]
        );
        drop(data);

        let normal = GptConfig {
            init: InitScheme::Normal,
            init_std: 0.05,
            ..c
        };
        let model = ModelConfig::Gpt(normal)
            .build(DType::F64, &Device::Cpu)
            .unwrap();
        let data = model.varmap().data().lock().unwrap();
        let std = |n: &str| {
            let v = data[n].flatten_all().unwrap().to_vec1::<f64>().unwrap();
            (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
        };
        close(std("blocks.1.attn.o_proj.weight"), 0.05);
        close(std("lm_head.weight"), 0.05);
        close(std("blocks.0.mlp.fc_out.weight"), 0.05 / 2.0);
    }

    #[test]
    fn causal_future_tokens_do_not_change_past_logits() {
        let model = cfg(true, 0.0).build(DType::F64, &Device::Cpu).unwrap();
        let a = tokens(1, 8, 11, 0);
        let mut v = a.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        v[6] = (v[6] + 1) % 11;
        v[7] = (v[7] + 5) % 11;
        let b = Tensor::from_vec(v, (1, 8), &Device::Cpu).unwrap();
        let la = model.forward(&a).unwrap();
        let lb = model.forward(&b).unwrap();
        let diff = |r: std::ops::Range<usize>| {
            (la.narrow(1, r.start, r.len()).unwrap() - lb.narrow(1, r.start, r.len()).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert!(diff(0..6) < 1e-12);
        assert!(diff(6..8) > 1e-6);
    }

    #[test]
    fn rope_is_a_rotation_with_relative_scores() {
        let c = GptConfig {
            d_model: 8,
            n_heads: 1,
            context: 6,
            ..GptConfig::default()
        };
        let (cos, sin) = rope_tables(&c, DType::F64, &Device::Cpu).unwrap();
        let q = Tensor::new(&[0.3f64, -1.0, 0.5, 2.0, 0.1, 0.7, -0.4, 1.1], &Device::Cpu).unwrap();
        let k = Tensor::new(
            &[1.0f64, 0.2, -0.3, 0.4, 0.9, -0.6, 0.8, 0.05],
            &Device::Cpu,
        )
        .unwrap();
        let at = |x: &Tensor| {
            let xs = x
                .reshape((1, 1, 1, 8))
                .unwrap()
                .repeat((1, 1, 6, 1))
                .unwrap();
            rope_composed(&xs, &cos, &sin)
                .unwrap()
                .reshape((6, 8))
                .unwrap()
        };
        let (rq, rk) = (at(&q), at(&k));
        // Norm preserved at every position.
        let n0 = q
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let norms = rq.sqr().unwrap().sum(1).unwrap().to_vec1::<f64>().unwrap();
        assert!(norms.iter().all(|n| (n - n0).abs() < 1e-12));
        // q_m · k_n depends only on m − n.
        let dot = |m: usize, n: usize| {
            (rq.get(m).unwrap() * rk.get(n).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert!((dot(3, 1) - dot(5, 3)).abs() < 1e-12);
        assert!((dot(2, 2) - dot(0, 0)).abs() < 1e-12);
    }

    /// The trap this crate guards against: candle-nn's fused kernels cut the graph. Every
    /// parameter must receive a non-zero gradient, in every model variant and preset shape.
    #[test]
    fn every_parameter_gets_a_gradient() {
        let mut configs = vec![cfg(true, 1e-4), cfg(false, 0.0)];
        configs.push(ModelConfig::preset(PRESETS[0]).unwrap());
        for (c, fused) in configs.iter().flat_map(|c| [(c, true), (c, false)]) {
            let mut model = c.build(DType::F32, &Device::Cpu).unwrap();
            assert_eq!(model.set_fused_ops(fused), fused);
            let x = tokens(2, c.context(), c.vocab_size() as u32, 1);
            let y = tokens(2, c.context(), c.vocab_size() as u32, 2);
            let loss = model.forward_loss(&x, &y).unwrap();
            let grads = loss.total.backward().unwrap();
            let params = model.params().unwrap();
            for p in params.iter() {
                let g = grads
                    .get(p.var.as_tensor())
                    .unwrap_or_else(|| panic!("{} got no gradient (fused {fused})", p.meta.name));
                let norm = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    norm > 0.0 && norm.is_finite(),
                    "{}: |g|² = {norm}",
                    p.meta.name
                );
            }
        }
    }

    /// The fused CPU kernels and the primitive-op composition compute the same loss and the
    /// same gradient of every parameter. Contexts of 8 and 80 (the attention kernel's causal
    /// blocks are 64 rows), with and without QK-LayerNorm and the z-loss.
    #[test]
    fn fused_and_composed_paths_agree() {
        let long = ModelConfig::Gpt(GptConfig {
            d_model: 24,
            n_layers: 2,
            n_heads: 3,
            vocab_size: 19,
            context: 80,
            ..GptConfig::default()
        });
        for c in [cfg(true, 1e-2), cfg(false, 0.0), long] {
            for dtype in [DType::F32, DType::F64] {
                let mut model = c.build(dtype, &Device::Cpu).unwrap();
                assert!(model.fused_ops(), "fused kernels are the CPU default");
                let x = tokens(3, c.context(), c.vocab_size() as u32, 8);
                let y = tokens(3, c.context(), c.vocab_size() as u32, 9);
                let run = |m: &crate::models::Model| {
                    let l = m.forward_loss(&x, &y).unwrap();
                    let g = l.total.backward().unwrap();
                    (l, g)
                };
                let (lf, gf) = run(&model);
                assert!(!model.set_fused_ops(false));
                let (lc, gc) = run(&model);
                let err = crate::models::ops::check::rel_err;
                // Loss: the kernels' rounding only. Gradients: candle's GeLU backward writes
                // 1/√(2π) with 6 digits (3e-7 relative), so in f64 the composition is the
                // reference only to ~1e-7; the fused gradients are checked against finite
                // differences in `gradient_matches_finite_differences`.
                let (loss_tol, grad_tol) = if dtype == DType::F64 {
                    (1e-12, 1e-6)
                } else {
                    (1e-5, 1e-5)
                };
                assert!(err(&lf.total, &lc.total) < loss_tol, "{dtype:?} total");
                assert!(err(&lf.ce, &lc.ce) < loss_tol, "{dtype:?} ce");
                assert_eq!(lf.z.is_some(), lc.z.is_some());
                if let (Some(a), Some(b)) = (&lf.z, &lc.z) {
                    assert!(err(a, b) < loss_tol, "{dtype:?} z");
                }
                for p in model.params().unwrap().iter() {
                    let (a, b) = (gf.get(p.var.as_tensor()), gc.get(p.var.as_tensor()));
                    let (a, b) = (a.unwrap(), b.unwrap());
                    let e = err(a, b);
                    assert!(e < grad_tol, "{dtype:?} {}: {e}", p.meta.name);
                }
            }
        }
    }

    /// A tiny decoder memorises a fixed batch with AdamW: the loss falls far below ln(vocab).
    #[test]
    fn overfits_a_fixed_batch() {
        use crate::optim::adamw::AdamWConfig;
        use crate::optim::{Driver, OptimConfig, Optimizer};
        let c = cfg(true, 1e-4);
        let model = c.build(DType::F32, &Device::Cpu).unwrap();
        let x = tokens(4, 8, 11, 6);
        let y = tokens(4, 8, 11, 7);
        let adamw = AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        };
        let mut opt = Driver::new(OptimConfig::Adamw(adamw), model.params().unwrap()).unwrap();
        let mut losses = Vec::new();
        for _ in 0..60 {
            let loss = model.forward_loss(&x, &y).unwrap();
            losses.push(loss.ce.to_scalar::<f32>().unwrap());
            opt.step(&loss.total.backward().unwrap()).unwrap();
        }
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!((first - (11f32).ln()).abs() < 0.5, "initial loss {first}");
        assert!(last < 0.2, "loss {first} -> {last}");
    }

    /// Gradients agree with central finite differences along a random direction (f64), with
    /// the fused kernels and with the composition.
    #[test]
    fn gradient_matches_finite_differences() {
        finite_differences(true);
        finite_differences(false);
    }

    fn finite_differences(fused: bool) {
        let mut model = cfg(true, 1e-2).build(DType::F64, &Device::Cpu).unwrap();
        assert_eq!(model.set_fused_ops(fused), fused);
        let x = tokens(2, 6, 11, 4);
        let y = tokens(2, 6, 11, 5);
        let loss = model.forward_loss(&x, &y).unwrap();
        let grads = loss.total.backward().unwrap();
        let params = model.params().unwrap();
        let mut directional = 0.0;
        let mut dirs = Vec::new();
        for (i, p) in params.iter().enumerate() {
            let n = p.var.elem_count();
            let d: Vec<f64> = (0..n)
                .map(|j| (((i * 31 + j * 17) % 13) as f64 - 6.0) / 6.0)
                .collect();
            let d = Tensor::from_vec(d, p.var.shape(), &Device::Cpu).unwrap();
            let g = grads.get(p.var.as_tensor()).unwrap();
            directional += (g * &d)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            dirs.push(d);
        }
        let h = 1e-5;
        let originals: Vec<Tensor> = params
            .iter()
            .map(|p| p.var.as_tensor().copy().unwrap())
            .collect();
        let eval_at = |s: f64| {
            for ((p, d), o) in params.iter().zip(&dirs).zip(&originals) {
                p.var.set(&(o + (d * s).unwrap()).unwrap()).unwrap();
            }
            model
                .forward_loss(&x, &y)
                .unwrap()
                .total
                .to_scalar::<f64>()
                .unwrap()
        };
        let fd = (eval_at(h) - eval_at(-h)) / (2.0 * h);
        eval_at(0.0);
        assert!(
            (fd - directional).abs() < 1e-6 * directional.abs().max(1.0),
            "fused {fused}: finite difference {fd} vs gradient {directional}"
        );
    }
}
