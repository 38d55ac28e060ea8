//! Replays `optlab-golden-v1` trajectories (gradients recorded against a reference
//! implementation) through optlab and checks every parameter after every step.
//!
//! The reference's hyperparameter names are mapped onto optlab configs here; a hyperparameter
//! that has no optlab meaning makes the case fail with that reason, never silently ignored.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::optim::{Driver, ExtraInput, Mode, NamedParams, OptimConfig, Optimizer, Role};

/// Format tag of golden files.
pub const GOLDEN_FORMAT: &str = "optlab-golden-v1";

/// Elementwise tolerance: `|actual − expected| ≤ atol + rtol·|expected|`.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Tolerance {
    /// Relative part.
    pub rtol: f64,
    /// Absolute part.
    pub atol: f64,
}

/// Tolerances per replay dtype.
#[derive(Debug, Clone, Deserialize)]
pub struct Tolerances {
    /// For the f64 replay.
    pub f64: Tolerance,
    /// For the f32 replay.
    pub f32: Tolerance,
}

/// One parameter of a golden case.
#[derive(Debug, Clone, Deserialize)]
pub struct GoldenParam {
    /// Name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Role tag.
    pub role: Role,
}

/// A golden case, as stored on disk. Unknown top-level fields are errors (a misspelt optional
/// field would otherwise be ignored silently).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenCase {
    /// Must be [`GOLDEN_FORMAT`].
    pub format: String,
    /// Canonical optimizer name.
    pub optimizer: String,
    /// Where the trajectory comes from.
    #[serde(default)]
    pub reference: String,
    /// Reference hyperparameters, by the reference's own names.
    pub hparams: Map<String, Value>,
    /// Parameters.
    pub param_meta: Vec<GoldenParam>,
    /// Initial values, flat row-major, per parameter.
    pub init: Vec<Vec<f64>>,
    /// Gradients: steps × params × flat.
    pub grads: Vec<Vec<Vec<f64>>>,
    /// Optional per-step inputs (e.g. Sophia's Hessian).
    #[serde(default)]
    pub extra: Map<String, Value>,
    /// Parameters after each step: steps × params × flat.
    pub expected: Vec<Vec<Vec<f64>>>,
    /// Parameters in eval mode after the last step (Schedule-Free).
    #[serde(default)]
    pub expected_eval: Option<Vec<Vec<f64>>>,
    /// Per-step learning rates, when they change.
    #[serde(default)]
    pub lr_schedule: Option<Vec<f64>>,
    /// Tolerances.
    pub tolerance: Tolerances,
    /// Notes from the generator.
    #[serde(default)]
    pub notes: String,
    /// The dtype the reference ran in (informative).
    #[serde(default)]
    pub dtype: Option<String>,
}

/// The element count of a parameter's shape; a shape whose product overflows is an error (it
/// cannot match any list of values).
fn numel(p: &GoldenParam) -> std::result::Result<usize, String> {
    p.shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| {
            format!(
                "param_meta: `{}` has shape {:?}, too large",
                p.name, p.shape
            )
        })
}

/// How an `extra` key is laid out: its first dim is always the step count.
#[derive(Clone, Copy)]
enum ExtraLayout {
    /// One value per step.
    Steps,
    /// Per step, one list per parameter.
    StepsParams,
    /// Per step, the parameter's values, flat (exactly its element count).
    StepsParamsFlat,
    /// Per step either `[]` (no update at that step) or one list per parameter.
    StepsParamsOrEmpty,
}

/// The `extra` keys of the format (FORMAT.md) and their layouts.
const EXTRA_KEYS: &[(&str, ExtraLayout)] = &[
    ("hessian", ExtraLayout::StepsParamsFlat),
    ("hessian_grad", ExtraLayout::StepsParamsFlat),
    ("hessian_consumed", ExtraLayout::Steps),
    ("last_grad", ExtraLayout::StepsParamsFlat),
    ("update_probability", ExtraLayout::Steps),
    ("precond_update_u", ExtraLayout::Steps),
    ("precond_update", ExtraLayout::Steps),
    ("damping_noise", ExtraLayout::StepsParamsOrEmpty),
    ("spd_probes", ExtraLayout::StepsParamsOrEmpty),
    ("skh_probes", ExtraLayout::StepsParamsOrEmpty),
    ("balance_u", ExtraLayout::StepsParamsOrEmpty),
    ("balance", ExtraLayout::StepsParams),
];

impl GoldenCase {
    /// Reads and checks a golden file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        let case: GoldenCase = serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("not a golden file: {e}")))?;
        case.check()
            .map_err(|what| Error::file(path, format!("inconsistent golden file: {what}")))?;
        Ok(case)
    }

    /// Checks that the file is one case: the format tag, every array's length against
    /// `param_meta` (one entry per parameter, its element count) and against the step count
    /// (`grads`, `expected`, `lr_schedule`, each `extra` key), and `expected_eval`. Returns the
    /// first inconsistency, naming the field, step and parameter.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.format != GOLDEN_FORMAT {
            return Err(format!("format `{}` is not {GOLDEN_FORMAT}", self.format));
        }
        let steps = self.grads.len();
        if steps == 0 {
            return Err("grads has no steps".into());
        }
        let params = |field: &str, values: &[Vec<f64>]| -> std::result::Result<(), String> {
            if values.len() != self.param_meta.len() {
                return Err(format!(
                    "{field} has {} tensors, param_meta has {} parameters",
                    values.len(),
                    self.param_meta.len()
                ));
            }
            for (v, p) in values.iter().zip(&self.param_meta) {
                let numel = numel(p)?;
                if v.len() != numel {
                    return Err(format!(
                        "{field}: `{}` has {} values, its shape {:?} has {numel}",
                        p.name,
                        v.len(),
                        p.shape
                    ));
                }
            }
            Ok(())
        };
        params("init", &self.init)?;
        if self.expected.len() != steps {
            return Err(format!(
                "expected has {} steps, grads has {steps}",
                self.expected.len()
            ));
        }
        for (s, (g, e)) in self.grads.iter().zip(&self.expected).enumerate() {
            params(&format!("grads[{s}]"), g)?;
            params(&format!("expected[{s}]"), e)?;
        }
        if let Some(eval) = &self.expected_eval {
            params("expected_eval", eval)?;
        }
        if let Some(lrs) = &self.lr_schedule {
            if lrs.len() != steps {
                return Err(format!(
                    "lr_schedule has {} entries, grads has {steps} steps",
                    lrs.len()
                ));
            }
        }
        for (key, value) in &self.extra {
            let Some(&(_, layout)) = EXTRA_KEYS.iter().find(|(k, _)| k == key) else {
                return Err(format!(
                    "extra.{key} is not a key of the format (FORMAT.md lists them)"
                ));
            };
            self.check_extra(key, value, layout, steps)?;
        }
        Ok(())
    }

    fn check_extra(
        &self,
        key: &str,
        value: &Value,
        layout: ExtraLayout,
        steps: usize,
    ) -> std::result::Result<(), String> {
        let Value::Array(per_step) = value else {
            return Err(format!("extra.{key} is not a list"));
        };
        if per_step.len() != steps {
            return Err(format!(
                "extra.{key} has {} steps, grads has {steps}",
                per_step.len()
            ));
        }
        let n = self.param_meta.len();
        for (s, entry) in per_step.iter().enumerate() {
            let field = format!("extra.{key}[{s}]");
            match layout {
                ExtraLayout::Steps => {}
                ExtraLayout::StepsParams | ExtraLayout::StepsParamsOrEmpty => {
                    let Value::Array(list) = entry else {
                        return Err(format!("{field} is not a list"));
                    };
                    let empty_ok = matches!(layout, ExtraLayout::StepsParamsOrEmpty);
                    if list.len() != n && !(empty_ok && list.is_empty()) {
                        return Err(format!(
                            "{field} has {} entries, param_meta has {n} parameters",
                            list.len()
                        ));
                    }
                }
                ExtraLayout::StepsParamsFlat => {
                    let values: Vec<Vec<f64>> = serde_json::from_value(entry.clone())
                        .map_err(|e| format!("{field} is not a list of number lists: {e}"))?;
                    if values.len() != n {
                        return Err(format!(
                            "{field} has {} tensors, param_meta has {n} parameters",
                            values.len()
                        ));
                    }
                    for (v, p) in values.iter().zip(&self.param_meta) {
                        let numel = numel(p)?;
                        if v.len() != numel {
                            return Err(format!(
                                "{field}: `{}` has {} values, its shape {:?} has {numel}",
                                p.name,
                                v.len(),
                                p.shape
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// What the replay loop must do besides stepping (options that live in the reference's
/// training loop, not in its optimizer).
#[derive(Debug, Clone, Default)]
pub struct LoopOptions {
    /// Sophia: feed `extra.hessian_grad[t]` as the sampled-label gradient when
    /// `extra.hessian_consumed[t]` is true.
    pub hessian_from_extra: bool,
    /// MARS exact: before step t, feed `extra.last_grad[t + 1]` as the previous gradient (the
    /// value step t + 1 subtracts), zeros before the last step.
    pub last_grad_from_extra: bool,
    /// PSGD Kron: before each step feed the recorded random draws (`update_probability`,
    /// `precond_update_u`, `damping_noise`, `spd_probes`, `skh_probes`, `balance_u`).
    pub draws_from_extra: bool,
    /// dion's `param_groups` (each group's `params` and `algorithm`), checked against the
    /// parameters' roles before the replay.
    pub param_groups: Option<Value>,
}

const IMPLEMENTATION_ONLY: &[&str] = &["foreach", "fused", "capturable", "differentiable"];

fn take(h: &mut Map<String, Value>, key: &str) -> Option<Value> {
    h.remove(key)
}

/// Maps a reference's hyperparameters onto an optlab config (and loop options).
pub fn map_hparams(
    optimizer: &str,
    hparams: &Map<String, Value>,
) -> Result<(OptimConfig, LoopOptions)> {
    let mut h = hparams.clone();
    if optimizer == "cautious_adamw" {
        // Its `foreach = False` path is another algorithm (HF ε placement, per-tensor steps).
        if let Some(v) = h.get("foreach").filter(|v| **v != Value::Bool(true)) {
            return Err(Error::Msg(format!(
                "cautious_adamw: foreach = {v} is not supported (only the default path, true)"
            )));
        }
    }
    for k in IMPLEMENTATION_ONLY {
        h.remove(*k);
    }
    let mut opts = LoopOptions::default();
    match optimizer {
        "sophia" => {
            // `hess_interval` is the training loop's k; the replay follows `hessian_consumed`.
            take(&mut h, "hess_interval");
            opts.hessian_from_extra = true;
        }
        "adafactor" => {
            // torch's `eps = (eps1 | None, eps2)` becomes two TOML-friendly fields; a null eps1
            // stays None (the parameter dtype's machine epsilon).
            if let Some(eps) = take(&mut h, "eps") {
                match eps {
                    Value::Array(pair) if pair.len() == 2 => {
                        h.insert("eps1".into(), pair[0].clone());
                        h.insert("eps2".into(), pair[1].clone());
                    }
                    other => {
                        return Err(Error::Msg(format!(
                            "adafactor: `eps` must be [eps1 or null, eps2], got {other}"
                        )))
                    }
                }
            }
        }
        "shampoo" => map_shampoo(&mut h)?,
        "mars" => {
            opts.last_grad_from_extra = h.get("is_approx") == Some(&Value::Bool(false));
        }
        "muon" if is_dion(&h) => {
            opts.param_groups = map_dion(&mut h, "muon")?;
            // dion's scalar fallback inherits the constructor's lr, betas, ε and decay.
            for (from, to) in [
                ("lr", "adam_lr"),
                ("betas", "adam_betas"),
                ("epsilon", "adam_eps"),
                ("weight_decay", "adam_weight_decay"),
            ] {
                if let Some(v) = h.get(from).cloned() {
                    h.insert(to.into(), v);
                }
            }
            if let Some(mu) = take(&mut h, "mu") {
                h.insert("momentum".into(), mu);
            }
            take(&mut h, "betas");
            h.insert("form".into(), "dion".into());
        }
        "normuon" => opts.param_groups = map_dion(&mut h, "normuon")?,
        "adalayer_sgd" => {
            // AdalayerWLast has no freeze; the file records the training config's null.
            match take(&mut h, "t_freeze") {
                None | Some(Value::Null) => {}
                Some(v) => {
                    return Err(Error::Msg(format!(
                    "adalayer_sgd: t_freeze = {v} is not supported (AdalayerWLast has no freeze)"
                )))
                }
            }
        }
        "adopt" => map_adopt_clip(&mut h)?,
        "psgd_kron" => opts.draws_from_extra = true,
        "cautious_adamw" => {
            // Only silences a warning.
            take(&mut h, "no_deprecation_warning");
        }
        _ => {}
    }
    if OptimConfig::default_for(optimizer).is_err() {
        return Err(Error::Msg(format!(
            "optimizer `{optimizer}` not supported yet"
        )));
    }
    h.insert("name".into(), Value::String(optimizer.into()));
    let cfg = OptimConfig::from_json(Value::Object(h))?;
    Ok((cfg, opts))
}

/// Whether a `muon` case is microsoft/dion's (its hyperparameter names) rather than
/// KellerJordan's.
fn is_dion(h: &Map<String, Value>) -> bool {
    ["mu", "use_polar_express", "adjust_lr", "distributed_mesh"]
        .iter()
        .any(|k| h.contains_key(*k))
}

/// The arguments dion's `Muon` and `NorMuon` share: options that select devices or kernels are
/// accepted at their single-device value (`distributed_mesh = null`, no custom
/// `newton_schulz_func`, no Gram Newton–Schulz; `use_triton` is a GPU kernel of the same math and
/// accepted either way); `adjust_lr = null` is `"none"`. Returns the `param_groups`, taken out.
fn map_dion(h: &mut Map<String, Value>, name: &str) -> Result<Option<Value>> {
    for (key, ok) in [
        ("distributed_mesh", Value::Null),
        ("newton_schulz_func", Value::Null),
        ("use_gram_newton_schulz", Value::Bool(false)),
    ] {
        match take(h, key) {
            Some(v) if v != ok => {
                return Err(Error::Msg(format!(
                    "{name}: `{key}` = {v} is not supported (only {ok})"
                )))
            }
            _ => {}
        }
    }
    take(h, "use_triton");
    if h.get("adjust_lr") == Some(&Value::Null) {
        h.insert("adjust_lr".into(), "none".into());
    }
    Ok(take(h, "param_groups"))
}

/// Checks dion's `param_groups` against the roles: matrices (role `matrix`) in groups of the
/// optimizer's own algorithm, every other parameter in an `adamw` group, each parameter in
/// exactly one group, and no per-group overrides (the replay builds one group).
fn check_param_groups(case: &GoldenCase, groups: &Value) -> Result<()> {
    let bad = |what: String| Err(Error::Msg(format!("hparams.param_groups: {what}")));
    let Value::Array(groups) = groups else {
        return bad(format!("must be a list, got {groups}"));
    };
    let mut seen = BTreeMap::new();
    for (gi, group) in groups.iter().enumerate() {
        let Value::Object(group) = group else {
            return bad(format!("[{gi}] must be an object"));
        };
        let algorithm = match group.get("algorithm") {
            None => case.optimizer.as_str(),
            Some(Value::String(a)) => a.as_str(),
            Some(other) => return bad(format!("[{gi}].algorithm must be a string, got {other}")),
        };
        if let Some(key) = group.keys().find(|k| *k != "params" && *k != "algorithm") {
            return bad(format!(
                "[{gi}].{key}: per-group overrides are not supported"
            ));
        }
        let Some(Value::Array(names)) = group.get("params") else {
            return bad(format!("[{gi}].params must be a list of names"));
        };
        for name in names {
            let Some(name) = name.as_str() else {
                return bad(format!("[{gi}].params: {name} is not a name"));
            };
            let Some(meta) = case.param_meta.iter().find(|p| p.name == name) else {
                return bad(format!("[{gi}].params: `{name}` is not in param_meta"));
            };
            let ortho = meta.role == Role::Matrix;
            let fits = if algorithm == case.optimizer {
                ortho
            } else if algorithm == "adamw" {
                !ortho
            } else {
                return bad(format!(
                    "[{gi}].algorithm `{algorithm}` is not supported (only `{}` or `adamw`)",
                    case.optimizer
                ));
            };
            if !fits {
                return bad(format!(
                    "[{gi}]: `{name}` has role {} but is in an `{algorithm}` group; matrices are \
                     orthogonalized and every other role takes the AdamW fallback",
                    meta.role
                ));
            }
            if seen.insert(name.to_string(), gi).is_some() {
                return bad(format!("`{name}` is in two groups"));
            }
        }
    }
    if let Some(p) = case.param_meta.iter().find(|p| !seen.contains_key(&p.name)) {
        return bad(format!("`{}` is in no group", p.name));
    }
    Ok(())
}

/// ADOPT's `clip_lambda` (a callable of the step, recorded as its source text) onto `clip` and
/// `clip_exponent`: `null` is no clip, `lambda step: step**e` the power bound; any other callable
/// fails the case.
fn map_adopt_clip(h: &mut Map<String, Value>) -> Result<()> {
    match take(h, "clip_lambda") {
        None => {}
        Some(Value::Null) => {
            h.insert("clip".into(), Value::Bool(false));
        }
        Some(Value::String(text)) => {
            let exponent = text
                .strip_prefix("lambda step:")
                .map(str::trim)
                .and_then(|rest| rest.strip_prefix("step**"))
                .and_then(|e| e.trim().parse::<f64>().ok())
                .ok_or_else(|| {
                    Error::Msg(format!(
                        "adopt: clip_lambda `{text}` is not supported (only `lambda step: step**e` or null)"
                    ))
                })?;
            h.insert("clip".into(), Value::Bool(true));
            h.insert("clip_exponent".into(), exponent.into());
        }
        Some(other) => {
            return Err(Error::Msg(format!(
                "adopt: clip_lambda must be null or the text of a lambda, got {other}"
            )))
        }
    }
    Ok(())
}

/// A nested reference config object: its `type` and the remaining fields.
fn typed_object(what: &str, v: Value) -> Result<(String, Map<String, Value>)> {
    match v {
        Value::Object(mut m) => match m.remove("type") {
            Some(Value::String(t)) => Ok((t, m)),
            _ => Err(Error::Msg(format!("shampoo: `{what}` has no `type`"))),
        },
        other => Err(Error::Msg(format!(
            "shampoo: `{what}` must be an object, got {other}"
        ))),
    }
}

/// Removes `key` from `m`, failing unless it is absent or equal to `neutral` (options that only
/// matter for devices, memory layout or logging have no effect on one CPU only at that value).
fn neutral(m: &mut Map<String, Value>, what: &str, key: &str, neutral: Value) -> Result<()> {
    let same = |v: &Value| match (v.as_f64(), neutral.as_f64()) {
        (Some(a), Some(b)) => a == b,
        _ => *v == neutral,
    };
    match m.remove(key) {
        None => Ok(()),
        Some(v) if same(&v) => Ok(()),
        Some(v) => Err(Error::Msg(format!(
            "shampoo: `{what}.{key}` = {v} is not supported (only {neutral})"
        ))),
    }
}

fn no_leftovers(m: &Map<String, Value>, what: &str) -> Result<()> {
    match m.keys().next() {
        None => Ok(()),
        Some(k) => Err(Error::Msg(format!(
            "shampoo: `{what}.{k}` is not supported"
        ))),
    }
}

/// DistributedShampoo's nested hyperparameters onto [`crate::optim::shampoo::ShampooConfig`].
///
/// The nested config objects (`grafting_config`, `iterate_averaging_config`,
/// `preconditioner_config` with its `amortized_computation_config`, `distributed_config`) are
/// identified by their `type` (the reference's class name) and flattened onto the config's
/// tagged tables. Options that only concern devices, compilation or memory layout are accepted
/// at their neutral value only (`use_pin_memory = false`, `shampoo_pt2_compile_config = null`,
/// a single-device `distributed_config`, `retry_double_precision = true`,
/// `eigendecomposition_offload_device = ""`, `tolerance = 0`); `use_symmetric_packing` is a
/// lossless storage format and accepted either way. Anything else fails the case.
fn map_shampoo(h: &mut Map<String, Value>) -> Result<()> {
    neutral(h, "hparams", "use_pin_memory", Value::Bool(false))?;
    neutral(h, "hparams", "shampoo_pt2_compile_config", Value::Null)?;
    if let Some(v) = h.remove("distributed_config") {
        // Only the single-device distributor; its merging target changes the math and maps.
        let (ty, mut m) = typed_object("distributed_config", v)?;
        if ty != "SingleDeviceDistributedConfig" {
            return Err(Error::Msg(format!(
                "shampoo: distributed_config `{ty}` is not supported (single device only)"
            )));
        }
        if let Some(t) = m.remove("target_parameter_dimensionality") {
            h.insert("target_parameter_dimensionality".into(), t);
        }
        no_leftovers(&m, "distributed_config")?;
    }
    if let Some(v) = h.remove("iterate_averaging_config") {
        let mapped = if v.is_null() {
            serde_json::json!({ "type": "none" })
        } else {
            let (ty, mut m) = typed_object("iterate_averaging_config", v)?;
            if ty != "ClassicMomentumConfig" {
                return Err(Error::Msg(format!(
                    "shampoo: iterate_averaging_config `{ty}` is not supported (only ClassicMomentumConfig)"
                )));
            }
            m.insert("type".into(), "classic_momentum".into());
            Value::Object(m)
        };
        h.insert("iterate_averaging_config".into(), mapped);
    }
    if let Some(v) = h.remove("grafting_config") {
        let mapped = if v.is_null() {
            serde_json::json!({ "type": "none" })
        } else {
            let (ty, mut m) = typed_object("grafting_config", v)?;
            let short = match ty.as_str() {
                "SGDPreconditionerConfig" => "sgd",
                "AdaGradPreconditionerConfig" => "adagrad",
                "RMSpropPreconditionerConfig" => "rmsprop",
                "AdamPreconditionerConfig" => "adam",
                other => {
                    return Err(Error::Msg(format!(
                        "shampoo: grafting_config `{other}` is not supported"
                    )))
                }
            };
            m.insert("type".into(), short.into());
            Value::Object(m)
        };
        h.insert("grafting_config".into(), mapped);
    }
    if let Some(v) = h.remove("preconditioner_config") {
        let (ty, mut p) = typed_object("preconditioner_config", v)?;
        let known = [
            "RootInvShampooPreconditionerConfig",
            "EigendecomposedShampooPreconditionerConfig",
            "EigenvalueCorrectedShampooPreconditionerConfig",
            "RootInvKLShampooPreconditionerConfig",
            "EigendecomposedKLShampooPreconditionerConfig",
        ];
        if !known.contains(&ty.as_str()) {
            return Err(Error::Msg(format!(
                "shampoo: preconditioner_config `{ty}` is not supported (one of {})",
                known.join(", ")
            )));
        }
        h.insert("preconditioner".into(), ty.into());
        // Packing the symmetric factors is a lossless storage format: either value is exact.
        p.remove("use_symmetric_packing");
        if let Some(v) = p.remove("amortized_computation_config") {
            let (ty, mut a) = typed_object("amortized_computation_config", v)?;
            let what = "preconditioner_config.amortized_computation_config";
            let mapped = match ty.as_str() {
                "EigenConfig" | "EighEigendecompositionConfig" | "QREigendecompositionConfig" => {
                    let qr = ty == "QREigendecompositionConfig";
                    if !qr {
                        neutral(&mut a, what, "retry_double_precision", Value::Bool(true))?;
                        neutral(&mut a, what, "eigendecomposition_offload_device", "".into())?;
                    }
                    let tolerance = a.remove("tolerance").unwrap_or(serde_json::json!(0.0));
                    let mut mapped = match a.remove("rank_deficient_stability_config") {
                        None => serde_json::json!({ "type": "eigen" }),
                        Some(s) => {
                            let (sty, mut s) = typed_object("rank_deficient_stability_config", s)?;
                            let mapped = match sty.as_str() {
                                "PerturbationConfig" => "eigen",
                                "PseudoInverseConfig" if !qr => "pseudo_inverse",
                                other => {
                                    return Err(Error::Msg(format!(
                                        "shampoo: rank_deficient_stability_config `{other}` is not supported with {ty}"
                                    )))
                                }
                            };
                            s.insert("type".into(), mapped.into());
                            Value::Object(s)
                        }
                    };
                    let m = mapped.as_object_mut().expect("an object");
                    if qr {
                        m.insert("type".into(), "qr".into());
                        if let Some(i) = a.remove("max_iterations") {
                            m.insert("max_iterations".into(), i);
                        }
                        m.insert("tolerance".into(), tolerance);
                    } else if m["type"] == "eigen" {
                        m.insert("tolerance".into(), tolerance);
                    } else if tolerance.as_f64() != Some(0.0) {
                        return Err(Error::Msg(format!(
                            "shampoo: {what}.tolerance = {tolerance} is not supported with the pseudo-inverse"
                        )));
                    }
                    no_leftovers(&a, what)?;
                    mapped
                }
                "CoupledNewtonConfig" => {
                    a.insert("type".into(), "coupled_newton".into());
                    Value::Object(a)
                }
                other => {
                    return Err(Error::Msg(format!(
                        "shampoo: amortized_computation_config `{other}` is not supported"
                    )))
                }
            };
            h.insert("amortized_computation_config".into(), mapped);
        }
        for key in [
            "factor_matrix_dtype",
            "inv_factor_matrix_dtype",
            "factor_matrix_eigenvectors_dtype",
            "factor_matrix_eigenvalues_dtype",
            "corrected_eigenvalues_dtype",
        ] {
            if let Some(v) = p.remove(key) {
                let name = v
                    .as_str()
                    .map(|s| s.trim_start_matches("torch.").to_string());
                match name.as_deref() {
                    Some(d @ ("float32" | "float64")) => {
                        h.insert(key.into(), d.into());
                    }
                    _ => {
                        return Err(Error::Msg(format!(
                            "shampoo: preconditioner_config.{key} = {v} is not supported (float32 or float64)"
                        )))
                    }
                }
            }
        }
        for key in [
            "inverse_exponent_override",
            "ignored_basis_change_dims",
            "num_tolerated_failed_amortized_computations",
            "use_trace_scaling",
            "trace_scaling_exponent",
            "drop_weighting_factor_on_gsquare",
        ] {
            if let Some(v) = p.remove(key) {
                h.insert(key.into(), v);
            }
        }
        no_leftovers(&p, "preconditioner_config")?;
    }
    Ok(())
}

/// Worst deviation seen in a replay.
#[derive(Debug, Clone, Copy, Default)]
pub struct Deviation {
    /// Largest |a − e|.
    pub max_abs: f64,
    /// Largest |a − e| / |e| over elements with |e| ≥ 1e-2.
    pub max_rel: f64,
    /// Largest |a − e| / (atol + rtol·|e|); ≤ 1 passes.
    pub worst_ratio: f64,
}

/// Outcome of one case in one dtype.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Every step within tolerance.
    Pass(Deviation),
    /// The first failure, described.
    Fail(String),
}

fn compare(
    actual: &[f64],
    expected: &[f64],
    tol: Tolerance,
    dev: &mut Deviation,
) -> Result<Option<(usize, f64, f64)>> {
    if actual.len() != expected.len() {
        return Err(Error::Msg(format!(
            "{} values to compare with {} expected",
            actual.len(),
            expected.len()
        )));
    }
    let mut first_bad = None;
    for (k, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let err = (a - e).abs();
        let allowed = tol.atol + tol.rtol * e.abs();
        let ratio = if err.is_nan() {
            f64::INFINITY
        } else {
            err / allowed
        };
        dev.max_abs = dev.max_abs.max(err);
        if e.abs() >= 1e-2 {
            dev.max_rel = dev.max_rel.max(err / e.abs());
        }
        dev.worst_ratio = dev.worst_ratio.max(ratio);
        if ratio > 1.0 && first_bad.is_none() {
            first_bad = Some((k, a, e));
        }
    }
    Ok(first_bad)
}

fn tensor_of(values: &[f64], shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(values.to_vec(), shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

fn values_of(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// Replays `case` in `dtype` (f32 or f64) on the CPU.
pub fn replay(case: &GoldenCase, dtype: DType) -> Outcome {
    replay_on(case, dtype, &Device::Cpu)
}

/// How many times the file's f32 tolerance an f32 replay on a CUDA device may deviate, by
/// optimizer (the GPU tolerance policy; docs/cuda.md).
///
/// The file's f32 tolerance is five times the deviation of the reference's own f32 run from
/// its f64 run, and the CPU f32 replay meets it. On the GPU:
///
/// - **1**: every pass is a kernel that rounds like its CPU twin (bit-identical in host
///   emulation), or runs on the host (ADOPT, Cautious AdamW), so the GPU replay is the CPU
///   replay;
/// - **2**: one reduction runs in another order (Adalayer's block sums, MARS's clipping norm,
///   Adafactor's row and column sums): a few ulps in one scalar per tensor;
/// - **4**: matrix products on cuBLAS (Muon's Newton–Schulz, SOAP's rotations, the factor
///   statistics) and bases or roots from cuSOLVER and Cholesky-QR instead of faer: f32 rounding
///   in another order, amplified by Newton–Schulz's polynomial and by eigenvector conditioning.
///
/// Reordered f32 sums are the same kind of error as the reference's f32 run against its f64 run,
/// which the file's bound allows five times over: 4 allows them twenty times. TF32 products are
/// off (f32 accumulation in full precision): with them no f32 bound of this size could hold. An
/// unknown optimizer gets 4. `tests/gpu_tolerance.rs` replays every golden
/// file on the CPU under these bounds and checks that a 1 % error in the learning rate (or in
/// `1 − β2`) fails them.
pub fn gpu_f32_factor(optimizer: &str) -> f64 {
    match optimizer {
        "adamw"
        | "lion"
        | "signum"
        | "sgd"
        | "ademamix"
        | "simplified_ademamix"
        | "schedulefree_adamw"
        | "schedulefree_sgd"
        | "sophia"
        | "adopt"
        | "cautious_adamw"
        | "psgd_kron" => 1.0,
        "adalayer" | "adalayer_sgd" | "mars" | "adafactor" | "adafactor_hf" => 2.0,
        _ => 4.0,
    }
}

/// The tolerance a replay of `case` in `dtype` on `device` must meet: the file's, except in
/// f32 on a CUDA device, where both parts are widened by [`gpu_f32_factor`]. f64 keeps the
/// file's bound everywhere (its 1e-9 relative is far above any reordering in f64).
pub fn tolerance_on(case: &GoldenCase, dtype: DType, device: &Device) -> Result<Tolerance> {
    match dtype {
        DType::F64 => Ok(case.tolerance.f64),
        DType::F32 if device.is_cuda() => Ok(gpu_f32_tolerance(case)),
        DType::F32 => Ok(case.tolerance.f32),
        other => Err(Error::DType {
            what: "golden replay".into(),
            dtype: other,
        }),
    }
}

/// The file's f32 tolerance widened by [`gpu_f32_factor`] of its optimizer.
pub fn gpu_f32_tolerance(case: &GoldenCase) -> Tolerance {
    let k = gpu_f32_factor(&case.optimizer);
    Tolerance {
        rtol: case.tolerance.f32.rtol * k,
        atol: case.tolerance.f32.atol * k,
    }
}

/// Replays `case` in `dtype` with parameters, gradients and optimizer state on `device`, within
/// [`tolerance_on`] (on a CUDA device in f32: the GPU bound). On a CUDA device f32 matrix
/// products are set to full precision first (no TF32; process-wide).
pub fn replay_on(case: &GoldenCase, dtype: DType, device: &Device) -> Outcome {
    match tolerance_on(case, dtype, device) {
        Ok(tol) => replay_with(case, dtype, device, tol),
        Err(e) => Outcome::Fail(e.to_string()),
    }
}

/// Replays `case` in `dtype` on `device` within `tol` instead of the file's tolerance (e.g. the
/// GPU bound on the CPU, to show which errors it still catches).
pub fn replay_with(case: &GoldenCase, dtype: DType, device: &Device, tol: Tolerance) -> Outcome {
    if device.is_cuda() {
        candle_core::cuda::set_gemm_reduced_precision_f32(false);
    }
    match replay_inner(case, dtype, device, tol) {
        Ok(o) => o,
        Err(e) => Outcome::Fail(e.to_string()),
    }
}

fn replay_inner(
    case: &GoldenCase,
    dtype: DType,
    device: &Device,
    tol: Tolerance,
) -> Result<Outcome> {
    if !matches!(dtype, DType::F32 | DType::F64) {
        return Err(Error::DType {
            what: "golden replay".into(),
            dtype,
        });
    }
    case.check()
        .map_err(|what| Error::Msg(format!("inconsistent golden case: {what}")))?;
    let (config, opts) = map_hparams(&case.optimizer, &case.hparams)?;
    if let Some(groups) = &opts.param_groups {
        check_param_groups(case, groups)?;
    }
    let mut vars = Vec::new();
    for (p, init) in case.param_meta.iter().zip(&case.init) {
        vars.push((
            p.name.clone(),
            Var::from_tensor(&tensor_of(init, &p.shape, dtype, device)?)?,
        ));
    }
    let mut params = NamedParams::new(vars.clone())?;
    for p in &case.param_meta {
        params.set_role(&p.name, p.role)?;
    }
    let mut opt = Driver::new(config.clone(), params)?;
    let mut dev = Deviation::default();
    let extra_steps = |key: &str| -> Result<Option<Vec<Value>>> {
        match case.extra.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a.clone())),
            Some(_) => Err(Error::Msg(format!("extra.{key} is not a list"))),
        }
    };
    let consumed = extra_steps("hessian_consumed")?;
    let hessian_grad = extra_steps("hessian_grad")?;
    for (s, step_grads) in case.grads.iter().enumerate() {
        if let Some(lrs) = &case.lr_schedule {
            let lr = *lrs.get(s).ok_or_else(|| {
                Error::Msg(format!("lr_schedule has no entry for step {}", s + 1))
            })?;
            opt.set_lr(lr);
        }
        let mut grads = BTreeMap::new();
        for (p, g) in case.param_meta.iter().zip(step_grads) {
            grads.insert(p.name.clone(), tensor_of(g, &p.shape, dtype, device)?);
        }
        if opts.last_grad_from_extra {
            // The reference loop stores the next step's last_grad before this step; the last
            // step has none to store (zeros: the value is never used).
            let values = match case.extra.get("last_grad") {
                Some(Value::Array(steps)) if s + 1 < steps.len() => {
                    serde_json::from_value::<Vec<Vec<f64>>>(steps[s + 1].clone())
                        .map_err(|e| Error::Msg(format!("extra.last_grad[{}]: {e}", s + 1)))?
                }
                Some(_) => case.init.iter().map(|v| vec![0.0; v.len()]).collect(),
                None => {
                    return Err(Error::Msg(
                        "mars (is_approx = false) case lacks extra.last_grad".into(),
                    ))
                }
            };
            let mut previous = BTreeMap::new();
            for (p, v) in case.param_meta.iter().zip(&values) {
                previous.insert(p.name.clone(), tensor_of(v, &p.shape, dtype, device)?);
            }
            opt.observe_named(ExtraInput::PreviousGrad, &previous)?;
        }
        if opts.draws_from_extra {
            let draws = psgd_draws(case, &config, s)?;
            let mut values = BTreeMap::new();
            for (p, v) in case.param_meta.iter().zip(&draws) {
                values.insert(p.name.clone(), tensor_of(v, &[v.len()], dtype, device)?);
            }
            opt.observe_named(ExtraInput::RandomDraws, &values)?;
        }
        opt.step_named(&grads)?;
        if opts.hessian_from_extra {
            let (Some(consumed), Some(hg)) = (&consumed, &hessian_grad) else {
                return Err(Error::Msg(
                    "sophia case lacks extra.hessian_consumed / hessian_grad".into(),
                ));
            };
            if consumed.get(s).and_then(Value::as_bool).unwrap_or(false) {
                let entry = hg.get(s).cloned().unwrap_or(Value::Null);
                let per_param: Vec<Vec<f64>> = serde_json::from_value(entry)
                    .map_err(|e| Error::Msg(format!("extra.hessian_grad[{s}]: {e}")))?;
                let mut values = BTreeMap::new();
                for (p, v) in case.param_meta.iter().zip(&per_param) {
                    values.insert(p.name.clone(), tensor_of(v, &p.shape, dtype, device)?);
                }
                opt.observe_named(ExtraInput::HessianGrad, &values)?;
            }
        }
        let current: BTreeMap<String, Var> = opt.vars().into_iter().collect();
        for (pi, p) in case.param_meta.iter().enumerate() {
            let actual = values_of(&current[&p.name])?;
            if let Some((k, a, e)) = compare(&actual, &case.expected[s][pi], tol, &mut dev)? {
                return Ok(Outcome::Fail(format!(
                    "step {} param {} [{k}]: got {a:e}, expected {e:e} (|diff| {:.3e} > atol {:e} + rtol {:e}·|e|)",
                    s + 1,
                    p.name,
                    (a - e).abs(),
                    tol.atol,
                    tol.rtol
                )));
            }
        }
    }
    if let Some(expected_eval) = &case.expected_eval {
        let eval: BTreeMap<String, Tensor> = opt.eval_params()?.into_iter().collect();
        for (pi, p) in case.param_meta.iter().enumerate() {
            let actual = values_of(&eval[&p.name])?;
            if let Some((k, a, e)) = compare(&actual, &expected_eval[pi], tol, &mut dev)? {
                return Ok(Outcome::Fail(format!(
                    "eval params {} [{k}]: got {a:e}, expected {e:e}",
                    p.name
                )));
            }
        }
        // Switching to eval mode must land the parameters on the same point.
        opt.set_mode(Mode::Eval)?;
        let current: BTreeMap<String, Var> = opt.vars().into_iter().collect();
        for (pi, p) in case.param_meta.iter().enumerate() {
            let actual = values_of(&current[&p.name])?;
            if let Some((k, a, e)) = compare(&actual, &expected_eval[pi], tol, &mut dev)? {
                return Ok(Outcome::Fail(format!(
                    "eval mode {} [{k}]: got {a:e}, expected {e:e}",
                    p.name
                )));
            }
        }
    }
    Ok(Outcome::Pass(dev))
}

/// PSGD Kron's recorded draws of step `s`, one vector per parameter in the rule's layout:
/// `[u]`, or `[u, damping noise, spd probes, skh probes, balance u]` on an update step.
fn psgd_draws(case: &GoldenCase, config: &OptimConfig, s: usize) -> Result<Vec<Vec<f64>>> {
    let at = |key: &str| -> Result<&Value> {
        match case.extra.get(key) {
            Some(Value::Array(steps)) => steps
                .get(s)
                .ok_or_else(|| Error::Msg(format!("extra.{key} has no step {s}"))),
            _ => Err(Error::Msg(format!("psgd_kron case lacks extra.{key}"))),
        }
    };
    let number = |key: &str| -> Result<f64> {
        at(key)?
            .as_f64()
            .ok_or_else(|| Error::Msg(format!("extra.{key}[{s}] is not a number")))
    };
    let OptimConfig::PsgdKron(cfg) = config else {
        return Err(Error::Msg("psgd_kron draws for another optimizer".into()));
    };
    // The training loop's probability schedule must be the configured one (the replay does not
    // change the config between steps).
    let p = number("update_probability")?;
    if p != cfg.preconditioner_update_probability {
        return Err(Error::Msg(format!(
            "extra.update_probability[{s}] = {p} differs from \
             preconditioner_update_probability = {}",
            cfg.preconditioner_update_probability
        )));
    }
    let u = number("precond_update_u")?;
    let update = (u as f32) < (p as f32);
    if at("precond_update")?.as_bool() != Some(update) {
        return Err(Error::Msg(format!(
            "extra.precond_update[{s}] disagrees with u = {u} < p = {p}"
        )));
    }
    let lists = |key: &str| -> Result<Vec<Vec<f64>>> {
        serde_json::from_value(at(key)?.clone())
            .map_err(|e| Error::Msg(format!("extra.{key}[{s}]: {e}")))
    };
    let n = case.param_meta.len();
    if !update {
        return Ok(vec![vec![u]; n]);
    }
    let (noise, spd, skh, bal) = (
        lists("damping_noise")?,
        lists("spd_probes")?,
        lists("skh_probes")?,
        lists("balance_u")?,
    );
    for (key, l) in [
        ("damping_noise", &noise),
        ("spd_probes", &spd),
        ("skh_probes", &skh),
        ("balance_u", &bal),
    ] {
        if l.len() != n {
            return Err(Error::Msg(format!(
                "extra.{key}[{s}] has {} entries on an update step, expected {n}",
                l.len()
            )));
        }
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut v = vec![u];
        v.extend(&noise[i]);
        v.extend(&spd[i]);
        v.extend(&skh[i]);
        v.extend(&bal[i]);
        out.push(v);
    }
    Ok(out)
}

/// Formats one result line: `PASS <file> f64 max_rel_err=…` or `FAIL <file> f32 <reason>`.
pub fn report_line(file: &str, dtype: DType, outcome: &Outcome) -> String {
    let d = if dtype == DType::F64 { "f64" } else { "f32" };
    match outcome {
        Outcome::Pass(dev) => format!(
            "PASS {file} {d} max_rel_err={:.3e} max_abs_err={:.3e} worst_tolerance_ratio={:.3}",
            dev.max_rel, dev.max_abs, dev.worst_ratio
        ),
        Outcome::Fail(reason) => format!("FAIL {file} {d} {reason}"),
    }
}
