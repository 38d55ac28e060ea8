//! A tiny next-token MLP for fast tests: each position predicts the next token from its own
//! token only (a learned bigram model with one hidden layer), yet it carries every parameter
//! role an optimizer must handle (embedding, matrices, biases, norm gain and bias, head):
//!
//! ```text
//! x = wte[token]
//! x = x + GeLU(x fc_inᵀ + b_in) fc_outᵀ + b_out
//! logits = LN(x; final_norm.weight, final_norm.bias) · lm_headᵀ
//! ```
//!
//! Names: `wte.weight`, `mlp.fc_in.{weight,bias}`, `mlp.fc_out.{weight,bias}`,
//! `final_norm.{weight,bias}`, `lm_head.weight`.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{check_tokens, layer_norm, linear, ParamInit};
use crate::error::{check, Error, Result};

/// MLP hyperparameters; the defaults are the `mlp-test` preset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MlpConfig {
    /// Embedding width.
    pub d_model: usize,
    /// Hidden width.
    pub d_hidden: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence accepted (the model itself has no positional state).
    pub context: usize,
    /// Standard deviation of the embedding; matrices use 1/√fan_in, biases start at 0.
    pub init_std: f64,
    /// Seed of the initial parameters.
    pub seed: u64,
}

impl Default for MlpConfig {
    fn default() -> Self {
        Self {
            d_model: 32,
            d_hidden: 64,
            vocab_size: 256,
            context: 32,
            init_std: 1.0,
            seed: 0,
        }
    }
}

impl MlpConfig {
    /// Checks every field; errors name it.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("model.d_model", self.d_model),
            ("model.d_hidden", self.d_hidden),
            ("model.vocab_size", self.vocab_size),
            ("model.context", self.context),
        ] {
            check::at_least_one(field, v as u64)?;
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(Error::config("model.vocab_size", "must fit in u32"));
        }
        check::positive("model.init_std", self.init_std)
    }

    /// The two hidden matrices and their biases.
    pub fn non_embedding_params(&self) -> usize {
        2 * self.d_model * self.d_hidden + self.d_hidden + self.d_model
    }
}

/// The MLP. Build it through [`ModelConfig::build`](super::ModelConfig::build) or [`Mlp::new`].
pub struct Mlp {
    cfg: MlpConfig,
    wte: Tensor,
    fc_in: (Tensor, Tensor),
    fc_out: (Tensor, Tensor),
    final_norm: (Tensor, Tensor),
    lm_head: Tensor,
}

impl Mlp {
    /// Creates the parameters in `init`'s `VarMap`.
    pub fn new(cfg: &MlpConfig, init: &ParamInit<'_>) -> Result<Self> {
        cfg.validate()?;
        let (d, h, v, s) = (cfg.d_model, cfg.d_hidden, cfg.vocab_size, cfg.seed);
        let fan_in = |n: usize| 1.0 / (n as f64).sqrt();
        Ok(Self {
            cfg: cfg.clone(),
            wte: init.trunc_normal("wte.weight", &[v, d], cfg.init_std, s)?,
            fc_in: (
                init.trunc_normal("mlp.fc_in.weight", &[h, d], fan_in(d), s)?,
                init.constant("mlp.fc_in.bias", &[h], 0.0)?,
            ),
            fc_out: (
                init.trunc_normal("mlp.fc_out.weight", &[d, h], fan_in(h), s)?,
                init.constant("mlp.fc_out.bias", &[d], 0.0)?,
            ),
            final_norm: (
                init.constant("final_norm.weight", &[d], 1.0)?,
                init.constant("final_norm.bias", &[d], 0.0)?,
            ),
            lm_head: init.trunc_normal("lm_head.weight", &[v, d], fan_in(d), s)?,
        })
    }

    /// The config.
    pub fn config(&self) -> &MlpConfig {
        &self.cfg
    }

    /// Logits `(batch, time, vocab)` for U32 token ids `(batch, time)`.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = check_tokens(tokens, self.cfg.context)?;
        let x =
            self.wte
                .index_select(&tokens.flatten_all()?, 0)?
                .reshape((b, t, self.cfg.d_model))?;
        let h = linear(&x, &self.fc_in.0, Some(&self.fc_in.1))?.gelu_erf()?;
        let x = (&x + linear(&h, &self.fc_out.0, Some(&self.fc_out.1))?)?;
        let x = layer_norm(&x, Some(&self.final_norm.0), Some(&self.final_norm.1), 1e-5)?;
        linear(&x, &self.lm_head, None)
    }
}

#[cfg(test)]
mod tests {
    use super::super::ModelConfig;
    use super::*;
    use crate::optim::Role;
    use candle_core::{DType, Device};

    #[test]
    fn every_role_and_every_gradient() {
        let cfg = ModelConfig::preset("mlp-test").unwrap();
        let model = cfg.build(DType::F64, &Device::Cpu).unwrap();
        let x = Tensor::from_vec(
            (0..64u32).map(|i| i * 5 % 256).collect(),
            (2, 32),
            &Device::Cpu,
        )
        .unwrap();
        let y = Tensor::from_vec(
            (0..64u32).map(|i| i * 11 % 256).collect(),
            (2, 32),
            &Device::Cpu,
        )
        .unwrap();
        let loss = model.forward_loss(&x, &y).unwrap();
        let grads = loss.total.backward().unwrap();
        let params = model.params().unwrap();
        let mut roles: Vec<Role> = params.iter().map(|p| p.meta.role).collect();
        roles.sort();
        roles.dedup();
        assert_eq!(
            roles,
            vec![
                Role::Matrix,
                Role::Embedding,
                Role::Head,
                Role::Norm,
                Role::Bias
            ]
        );
        for p in params.iter() {
            let g = grads.get(p.var.as_tensor()).expect("gradient");
            let n = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(n > 0.0, "{}", p.meta.name);
        }
        assert_eq!(
            model.num_params(),
            2 * 256 * 32 + cfg.non_embedding_params() + 2 * 32
        );
    }

    #[test]
    fn learns_a_bigram_map() {
        use crate::optim::adamw::AdamWConfig;
        use crate::optim::{Driver, OptimConfig, Optimizer};
        let cfg = ModelConfig::Mlp(MlpConfig {
            vocab_size: 16,
            context: 8,
            ..MlpConfig::default()
        });
        let model = cfg.build(DType::F32, &Device::Cpu).unwrap();
        // Next token = (3·token + 1) mod 16: deterministic, learnable from one token.
        let xs: Vec<u32> = (0..32u32).map(|i| (i * 7) % 16).collect();
        let ys: Vec<u32> = xs.iter().map(|x| (3 * x + 1) % 16).collect();
        let x = Tensor::from_vec(xs, (4, 8), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(ys, (4, 8), &Device::Cpu).unwrap();
        let adamw = AdamWConfig {
            lr: 3e-2,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        };
        let mut opt = Driver::new(OptimConfig::Adamw(adamw), model.params().unwrap()).unwrap();
        let first = model
            .forward_loss(&x, &y)
            .unwrap()
            .ce
            .to_scalar::<f32>()
            .unwrap();
        for _ in 0..60 {
            let loss = model.forward_loss(&x, &y).unwrap();
            opt.step(&loss.total.backward().unwrap()).unwrap();
        }
        let last = model
            .forward_loss(&x, &y)
            .unwrap()
            .ce
            .to_scalar::<f32>()
            .unwrap();
        assert!(last < 0.1, "loss {first} -> {last}");
    }
}
