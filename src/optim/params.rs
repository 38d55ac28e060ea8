//! Named parameters and their roles.
//!
//! Optimizers treat layers differently (Muon only orthogonalizes hidden matrices, Adalayer splits
//! the head per row, SOAP leaves 1-D tensors to Adam), so every parameter carries a [`Role`]
//! inferred from its name and shape, which the user can override.

use std::collections::BTreeMap;

use candle_core::Var;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a parameter is in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A hidden weight matrix (attention, MLP); also any tensor with two or more dims by default.
    Matrix,
    /// The token embedding table.
    Embedding,
    /// The output (unembedding) head.
    Head,
    /// A normalization gain or bias.
    Norm,
    /// A bias vector.
    Bias,
    /// Any other 1-D tensor.
    Vector,
    /// A 0-D tensor.
    Scalar,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 7] = [
        Role::Matrix,
        Role::Embedding,
        Role::Head,
        Role::Norm,
        Role::Bias,
        Role::Vector,
        Role::Scalar,
    ];

    /// Infers the role from a parameter's name and shape.
    ///
    /// Name rules come first, in this order: a name with `norm` or `ln_` / `ln_f` is a norm (so a
    /// LayerNorm bias is a norm, as the Adalayer reference treats it); `wte`, `embed`, `tok_emb`
    /// is the embedding; `lm_head`, `head`, `ff_out_last`, `unembed` is the head; a name ending in
    /// `bias` is a bias. Otherwise the shape decides: 0-D scalar, 1-D vector, else matrix.
    pub fn infer(name: &str, shape: &[usize]) -> Role {
        let lower = name.to_ascii_lowercase();
        let last = lower.rsplit('.').next().unwrap_or(&lower);
        let has = |s: &str| lower.contains(s);
        if has("norm") || has("ln_") || lower.split('.').any(|part| part == "ln" || part == "ln_f")
        {
            Role::Norm
        } else if has("wte") || has("embed") && !has("unembed") || has("tok_emb") {
            Role::Embedding
        } else if has("lm_head") || has("ff_out_last") || has("unembed") || has("head.") {
            Role::Head
        } else if last == "bias" || last.ends_with("_bias") {
            Role::Bias
        } else {
            match shape.len() {
                0 => Role::Scalar,
                1 => Role::Vector,
                _ => Role::Matrix,
            }
        }
    }

    /// Whether this role holds a tensor with two or more dims in a transformer.
    pub fn is_matrix_like(self) -> bool {
        matches!(self, Role::Matrix | Role::Embedding | Role::Head)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Role::Matrix => "matrix",
            Role::Embedding => "embedding",
            Role::Head => "head",
            Role::Norm => "norm",
            Role::Bias => "bias",
            Role::Vector => "vector",
            Role::Scalar => "scalar",
        };
        f.write_str(s)
    }
}

/// A parameter's identity: name, shape and role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamMeta {
    /// Unique name (the `VarMap` key).
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Role.
    pub role: Role,
}

/// A named parameter.
#[derive(Debug, Clone)]
pub struct Param {
    /// Name, shape and role.
    pub meta: ParamMeta,
    /// The variable the optimizer updates in place.
    pub var: Var,
}

/// Parameters sorted by name, with roles. The only way optimizers receive parameters.
#[derive(Debug, Clone, Default)]
pub struct NamedParams {
    params: Vec<Param>,
}

impl NamedParams {
    /// Builds from `(name, var)` pairs, inferring roles. Names must be unique.
    pub fn new(vars: impl IntoIterator<Item = (String, Var)>) -> Result<Self> {
        let mut params: Vec<Param> = vars
            .into_iter()
            .map(|(name, var)| {
                let shape = var.dims().to_vec();
                let role = Role::infer(&name, &shape);
                Param {
                    meta: ParamMeta { name, shape, role },
                    var,
                }
            })
            .collect();
        params.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        for w in params.windows(2) {
            if w[0].meta.name == w[1].meta.name {
                return Err(Error::Groups(format!(
                    "parameter name `{}` appears twice",
                    w[0].meta.name
                )));
            }
        }
        for p in &params {
            if !p.var.is_contiguous() {
                return Err(Error::Msg(format!(
                    "parameter `{}` is not contiguous; optimizers update parameters in place",
                    p.meta.name
                )));
            }
        }
        Ok(Self { params })
    }

    /// All variables of a `VarMap`, sorted by name (its own order is not deterministic).
    pub fn from_varmap(varmap: &VarMap) -> Result<Self> {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| Error::Msg("VarMap mutex poisoned".into()))?;
        Self::new(data.iter().map(|(k, v)| (k.clone(), v.clone())))
    }

    /// Overrides the role of the named parameters. Unknown names are an error.
    pub fn with_roles(mut self, roles: &BTreeMap<String, Role>) -> Result<Self> {
        for (name, role) in roles {
            let p = self
                .params
                .iter_mut()
                .find(|p| &p.meta.name == name)
                .ok_or_else(|| {
                    Error::Groups(format!("role override for unknown parameter `{name}`"))
                })?;
            p.meta.role = *role;
        }
        Ok(self)
    }

    /// Sets one parameter's role.
    pub fn set_role(&mut self, name: &str, role: Role) -> Result<()> {
        let p = self
            .params
            .iter_mut()
            .find(|p| p.meta.name == name)
            .ok_or_else(|| {
                Error::Groups(format!("role override for unknown parameter `{name}`"))
            })?;
        p.meta.role = role;
        Ok(())
    }

    /// The parameters, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.params.iter()
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// True when there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Consumes into the sorted list.
    pub fn into_vec(self) -> Vec<Param> {
        self.params
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_from_names_and_shapes() {
        assert_eq!(
            Role::infer("transformer.wte.weight", &[11, 6]),
            Role::Embedding
        );
        assert_eq!(
            Role::infer("transformer.ff_out_last.weight", &[11, 6]),
            Role::Head
        );
        assert_eq!(Role::infer("lm_head.weight", &[11, 6]), Role::Head);
        assert_eq!(Role::infer("blocks.0.attn_norm.bias", &[6]), Role::Norm);
        assert_eq!(Role::infer("transformer.ln_f.weight", &[6]), Role::Norm);
        assert_eq!(Role::infer("blocks.0.mlp.fc.bias", &[6]), Role::Bias);
        assert_eq!(Role::infer("blocks.0.mlp.fc.weight", &[6, 4]), Role::Matrix);
        assert_eq!(Role::infer("w", &[3]), Role::Vector);
        assert_eq!(Role::infer("s", &[]), Role::Scalar);
    }
}
