//! Parameter groups: which parameters get which optimizer and hyperparameters.
//!
//! A spec has a default optimizer config and a list of groups. Each group selects parameters by
//! role and/or name pattern and may override the learning rate, the weight decay or the whole
//! optimizer (Muon on hidden matrices with AdamW elsewhere). A parameter matched by two groups
//! is an error; parameters matched by none use the default. So every parameter belongs to
//! exactly one group, and [`OptimizerSpec::assign`] proves it.
//!
//! ```toml
//! [optimizer]
//! name = "adamw"
//! lr = 1e-3
//! weight_decay = 0.1
//!
//! [[groups]]          # no weight decay on norms and biases
//! roles = ["norm", "bias"]
//! weight_decay = 0.0
//!
//! [[groups]]          # another lr for the head
//! names = ["lm_head.*"]
//! lr = 3e-3
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::optim::config::OptimConfig;
use crate::optim::params::{ParamMeta, Role};

/// One parameter group.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// A label for logs and errors (defaults to `group<i>`).
    #[serde(default)]
    pub label: Option<String>,
    /// Roles this group takes (any of them).
    #[serde(default)]
    pub roles: Vec<Role>,
    /// Name patterns this group takes: exact names, or with `*` matching any run of characters.
    #[serde(default)]
    pub names: Vec<String>,
    /// Learning rate override (of the group's optimizer config).
    #[serde(default)]
    pub lr: Option<f64>,
    /// Weight-decay override.
    #[serde(default)]
    pub weight_decay: Option<f64>,
    /// Another optimizer for this group (defaults to the spec's optimizer).
    #[serde(default)]
    pub optimizer: Option<OptimConfig>,
}

/// An optimizer with its groups: what a run config names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    /// The default optimizer and hyperparameters.
    pub optimizer: OptimConfig,
    /// Groups, each overriding the default for the parameters it selects.
    #[serde(default)]
    pub groups: Vec<GroupSpec>,
}

impl From<OptimConfig> for OptimizerSpec {
    fn from(optimizer: OptimConfig) -> Self {
        Self {
            optimizer,
            groups: Vec::new(),
        }
    }
}

/// Glob match with `*` only.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

impl GroupSpec {
    fn selects(&self, meta: &ParamMeta) -> bool {
        self.roles.contains(&meta.role) || self.names.iter().any(|p| pattern_matches(p, &meta.name))
    }

    fn label(&self, i: usize) -> String {
        self.label.clone().unwrap_or_else(|| format!("group{i}"))
    }
}

/// A resolved group: its label, config (overrides applied) and member parameter indices.
#[derive(Debug, Clone)]
pub struct ResolvedGroup {
    /// Label.
    pub label: String,
    /// The group's optimizer config with lr / weight-decay overrides applied.
    pub config: OptimConfig,
    /// Indices into the parameter list.
    pub members: Vec<usize>,
}

impl OptimizerSpec {
    /// Validates every config and override.
    pub fn validate(&self) -> Result<()> {
        self.optimizer.validate()?;
        for (i, g) in self.groups.iter().enumerate() {
            let label = g.label(i);
            if g.roles.is_empty() && g.names.is_empty() {
                return Err(Error::Groups(format!(
                    "`{label}` selects nothing: give it `roles` or `names`"
                )));
            }
            if let Some(lr) = g.lr {
                crate::error::check::non_negative(&format!("groups.{label}.lr"), lr)?;
            }
            if let Some(wd) = g.weight_decay {
                crate::error::check::non_negative(&format!("groups.{label}.weight_decay"), wd)?;
            }
            if let Some(o) = &g.optimizer {
                o.validate()?;
            }
        }
        Ok(())
    }

    /// Assigns every parameter to exactly one group. Group 0 is the default (unmatched
    /// parameters); groups `1..` are the spec's groups in order. A parameter selected by two
    /// groups, or a name pattern that selects nothing, is an error.
    pub fn assign(&self, params: &[ParamMeta]) -> Result<Vec<ResolvedGroup>> {
        self.validate()?;
        let mut groups = vec![ResolvedGroup {
            label: "default".into(),
            config: self.optimizer.clone(),
            members: Vec::new(),
        }];
        for (i, g) in self.groups.iter().enumerate() {
            let mut config = g
                .optimizer
                .clone()
                .unwrap_or_else(|| self.optimizer.clone());
            if let Some(lr) = g.lr {
                config.set_lr(lr);
            }
            if let Some(wd) = g.weight_decay {
                config.set_weight_decay(wd);
            }
            groups.push(ResolvedGroup {
                label: g.label(i),
                config,
                members: Vec::new(),
            });
        }
        for (pi, meta) in params.iter().enumerate() {
            let hits: Vec<usize> = self
                .groups
                .iter()
                .enumerate()
                .filter(|(_, g)| g.selects(meta))
                .map(|(i, _)| i)
                .collect();
            match hits.as_slice() {
                [] => groups[0].members.push(pi),
                [g] => groups[g + 1].members.push(pi),
                many => {
                    let labels: Vec<String> =
                        many.iter().map(|&i| self.groups[i].label(i)).collect();
                    return Err(Error::Groups(format!(
                        "parameter `{}` (role {}) is selected by several groups: {}",
                        meta.name,
                        meta.role,
                        labels.join(", ")
                    )));
                }
            }
        }
        for (i, g) in self.groups.iter().enumerate() {
            for pat in &g.names {
                if !params.iter().any(|m| pattern_matches(pat, &m.name)) {
                    return Err(Error::Groups(format!(
                        "`{}`: name pattern `{pat}` matches no parameter",
                        g.label(i)
                    )));
                }
            }
        }
        let total: usize = groups.iter().map(|g| g.members.len()).sum();
        debug_assert_eq!(total, params.len());
        Ok(groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns() {
        assert!(pattern_matches("lm_head.*", "lm_head.weight"));
        assert!(pattern_matches("*.bias", "blocks.0.fc.bias"));
        assert!(pattern_matches("blocks.*.attn.*", "blocks.3.attn.q.weight"));
        assert!(!pattern_matches("blocks.*.attn.*", "blocks.3.mlp.weight"));
        assert!(pattern_matches("w", "w"));
        assert!(!pattern_matches("w", "w0"));
    }
}
