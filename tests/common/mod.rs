//! Shared helpers for the generic optimizer tests: every registered optimizer goes through the
//! same table, so a new optimizer is covered the moment it is registered.

#![allow(dead_code)]

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use optlab::optim::{Driver, ExtraInput, NamedParams, OptimConfig, Optimizer};

/// The hyperparameters (a TOML fragment) each optimizer runs the generic problems with: its
/// defaults plus what is written here. Every registered optimizer must appear here.
pub fn tuned(name: &str) -> Option<&'static str> {
    Some(match name {
        "sgd" => "lr = 0.002\nmomentum = 0.9",
        "adamw" => "lr = 0.02",
        "adopt" => "lr = 0.02\nbetas = [0.9, 0.999]",
        "cautious_adamw" => "lr = 0.02",
        "normuon" => "lr = 0.02\nweight_decay = 0.0",
        "psgd_kron" => "lr_params = 0.01\nmomentum = 0.9\npreconditioner_max_skew = 2.0",
        "signum" | "lion" => "lr = 0.003",
        "sophia" => "lr = 0.01\nbs = 1\nrho = 0.05",
        "adafactor" => "lr = 0.05",
        "adafactor_hf" => "lr = 0.02\nrelative_step = false\nscale_parameter = false",
        "adalayer" => "lr = 0.02",
        "adalayer_sgd" => "lr = 0.01",
        "ademamix" => "lr = 0.01",
        "simplified_ademamix" => "lr = 0.002\nbetas = [0.9, 0.95]",
        "schedulefree_adamw" => "lr = 0.02",
        "schedulefree_sgd" => "lr = 0.012",
        "mars" => "lr = 0.02",
        "muon" => "lr = 0.01\nadam_lr = 0.02",
        "soap" => "lr = 0.02\nprecondition_frequency = 2",
        "shampoo" => "lr = 0.02\nbetas = [0.9, 0.95]\nepsilon = 1e-8\nprecondition_frequency = 2\nstart_preconditioning_step = 2\ngrafting_config = { type = \"adam\", beta2 = 0.95, epsilon = 1e-8 }",
        _ => return None,
    })
}

/// Variants of a registered optimizer that the generic suites run beside the registered names:
/// `(label, optimizer name, TOML fragment)`. Shampoo's preconditioner kinds share its name.
pub const VARIANTS: &[(&str, &str, &str)] = &[
    (
        "shampoo_eigenvalue_corrected",
        "shampoo",
        "lr = 0.02\nbetas = [0.9, 0.95]\nepsilon = 1e-8\npreconditioner = \"eigenvalue_corrected\"\nprecondition_frequency = 2\nstart_preconditioning_step = 2",
    ),
    (
        "shampoo_eigenvalue_corrected_qr",
        "shampoo",
        "lr = 0.02\nbetas = [0.9, 0.95]\nepsilon = 1e-8\npreconditioner = \"eigenvalue_corrected\"\nprecondition_frequency = 2\nstart_preconditioning_step = 2\namortized_computation_config = { type = \"qr\" }\nignored_basis_change_dims = { 1 = [0] }",
    ),
    (
        "shampoo_root_inv_kl",
        "shampoo",
        "lr = 0.02\nbetas = [0.9, 0.95]\nepsilon = 1e-8\npreconditioner = \"root_inv_kl\"\ntarget_parameter_dimensionality = \"inf\"\nprecondition_frequency = 2\nstart_preconditioning_step = 2\ngrafting_config = { type = \"adam\", beta2 = 0.95, epsilon = 1e-8 }",
    ),
    (
        "shampoo_eigendecomposed_kl",
        "shampoo",
        "lr = 0.02\nbetas = [0.9, 0.95]\nepsilon = 1e-8\npreconditioner = \"eigendecomposed_kl\"\ntarget_parameter_dimensionality = \"inf\"\nprecondition_frequency = 2\nstart_preconditioning_step = 2\ngrafting_config = { type = \"adam\", beta2 = 0.95, epsilon = 1e-8 }",
    ),
];

/// Every registered optimizer name, then every [`VARIANTS`] label.
pub fn labels() -> Vec<&'static str> {
    OptimConfig::NAMES
        .iter()
        .copied()
        .chain(VARIANTS.iter().map(|v| v.0))
        .collect()
}

/// The config of `label` (a registered name with its [`tuned`] hyperparameters, or a
/// [`VARIANTS`] label).
pub fn config(label: &str) -> OptimConfig {
    let (name, fragment) = match VARIANTS.iter().find(|v| v.0 == label) {
        Some(&(_, name, fragment)) => (name, fragment),
        None => (
            label,
            tuned(label).unwrap_or_else(|| panic!("{label} has no entry in the test table")),
        ),
    };
    OptimConfig::from_toml(&format!("name = \"{name}\"\n{fragment}"))
        .unwrap_or_else(|e| panic!("{label}: {e}"))
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(seed: u64, n: usize) -> Vec<f64> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

pub fn tensor(seed: u64, shape: &[usize], dtype: DType) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(values(seed, n), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A small GPT-like parameter set: matrices, an embedding, a head, norms and a bias.
pub fn model_params(dtype: DType) -> Vec<(String, Var)> {
    let spec: &[(&str, &[usize])] = &[
        ("wte.weight", &[11, 6]),
        ("blocks.0.attn.q.weight", &[6, 6]),
        ("blocks.0.mlp.fc.weight", &[12, 6]),
        ("blocks.0.mlp.fc.bias", &[12]),
        ("blocks.0.norm.weight", &[6]),
        ("lm_head.weight", &[11, 6]),
    ];
    spec.iter()
        .enumerate()
        .map(|(i, (n, s))| {
            (
                n.to_string(),
                Var::from_tensor(&tensor(100 + i as u64, s, dtype)).unwrap(),
            )
        })
        .collect()
}

/// Deep copies of variables (fresh storage).
pub fn copy_vars(vars: &[(String, Var)]) -> Vec<(String, Var)> {
    vars.iter()
        .map(|(n, v)| {
            (
                n.clone(),
                Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap(),
            )
        })
        .collect()
}

pub fn driver(name: &str, vars: &[(String, Var)]) -> Driver {
    Driver::new(config(name), NamedParams::new(vars.to_vec()).unwrap()).unwrap()
}

/// Synthetic gradients for step `s` (deterministic), one per parameter.
pub fn grads_for(vars: &[(String, Var)], s: u64) -> BTreeMap<String, Tensor> {
    vars.iter()
        .enumerate()
        .map(|(i, (n, v))| {
            let g = tensor(1000 * s + i as u64, v.dims(), v.dtype());
            (n.clone(), g)
        })
        .collect()
}

/// One step of the synthetic run, with the extra inputs some optimizers take.
pub fn synthetic_step(opt: &mut Driver, vars: &[(String, Var)], s: u64) {
    opt.step_named(&grads_for(vars, s)).unwrap();
    if opt.spec().optimizer.name() == "sophia" && s.is_multiple_of(3) {
        opt.observe_named(ExtraInput::HessianGrad, &grads_for(vars, s + 7_000))
            .unwrap();
    }
}

pub fn values_of(v: &Tensor) -> Vec<f64> {
    v.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Bit patterns of every parameter, for exact comparisons.
pub fn snapshot(opt: &dyn Optimizer) -> Vec<(String, Vec<u64>)> {
    opt.vars()
        .into_iter()
        .map(|(n, v)| (n, values_of(&v).iter().map(|x| x.to_bits()).collect()))
        .collect()
}

/// Parameters for the fused-kernel twin tests: every Adalayer block kind (embedding rows, fused
/// QKV thirds, whole tensor over several partial-sum chunks, head rows longer than one chunk,
/// norms), sizes that are not multiples of the block size, and a single element.
pub const KERNEL_SHAPES: &[(&str, &[usize])] = &[
    ("blocks.0.attn.att_proj.weight", &[21, 19]),
    ("blocks.0.mlp.fc.bias", &[300]),
    ("blocks.0.mlp.fc.weight", &[300, 257]),
    ("blocks.0.norm.weight", &[19]),
    ("lm_head.weight", &[5, 20001]),
    ("scale", &[1]),
    ("wte.weight", &[37, 19]),
];

const ADALAYER_ALL: &str =
    "att_correction = true\nlastlayer_correction = true\nfirstlayer_correction = true\nupdate_norm = true";

/// Optimizer configurations (TOML) and step counts that together run every fused kernel.
pub fn kernel_cases() -> Vec<(String, u64)> {
    let cases: &[(&str, &str, u64)] = &[
        ("adamw", "lr = 0.02\nweight_decay = 0.1", 3),
        ("adamw", "lr = 0.02\namsgrad = true\nmaximize = true", 3),
        ("lion", "lr = 0.003\nweight_decay = 0.5", 3),
        // ADOPT: the first call (v only), then decoupled decay with the clip; coupled L2,
        // maximize and no clip.
        ("adopt", "lr = 0.02\nweight_decay = 0.1\ndecouple = true", 4),
        // Cautious AdamW: moments and mask, the count, the masked update.
        ("cautious_adamw", "lr = 0.02\nweight_decay = 0.1", 3),
        (
            "adopt",
            "lr = 0.02\nweight_decay = 0.05\nclip = false\nmaximize = true",
            3,
        ),
        ("signum", "lr = 0.003", 3),
        (
            "ademamix",
            "lr = 0.01\nalpha_warmup = 5\nbeta3_warmup = 5\nweight_decay = 0.1",
            3,
        ),
        // β1 = 0: no fast EMA, the kernel without m1.
        ("ademamix", "lr = 0.01\nbetas = [0.0, 0.999, 0.9999]", 3),
        (
            "simplified_ademamix",
            "lr = 0.002\nbetas = [0.9, 0.95]\nalpha = 2.0\nbeta1_warmup = 4",
            3,
        ),
        (
            "simplified_ademamix",
            "lr = 0.002\nbias_correction1 = true\nbias_correction2 = false\nweight_decay = 0.1",
            3,
        ),
        ("adalayer", ADALAYER_ALL, 3),
        ("adalayer", "lr = 0.02", 2),
        // Frozen: running averages up to t_freeze, then frozen scalars.
        ("adalayer", "t_freeze = 2", 4),
        (
            "adalayer_sgd",
            "lr = 0.01\nlastlayer_correction = true\nfirstlayer_correction = true\nupdate_norm = true",
            3,
        ),
        (
            "schedulefree_adamw",
            "lr = 0.02\nweight_decay = 0.1\nwarmup_steps = 2",
            4,
        ),
        ("schedulefree_adamw", "lr = 0.02", 2),
        ("schedulefree_sgd", "lr = 0.012\nweight_decay = 0.05", 3),
        // Muon: momentum and update kernels around Newton–Schulz (matrix products); the other
        // roles take the AdamW kernel.
        ("muon", "lr = 0.02\nweight_decay = 0.1", 2),
        ("muon", "nesterov = false\nns_steps = 3", 2),
        ("sgd", "lr = 0.01\nweight_decay = 0.1", 2),
        (
            "sgd",
            "lr = 0.01\nmomentum = 0.9\ndampening = 0.1\nnesterov = false\nweight_decay = 0.05",
            3,
        ),
        (
            "sgd",
            "lr = 0.01\nmomentum = 0.9\nnesterov = true\ndecoupled_weight_decay = true\nweight_decay = 0.05\nmaximize = true",
            3,
        ),
        ("sophia", "lr = 0.01\nbs = 1\nrho = 0.05\nweight_decay = 0.1", 3),
        // Shampoo: grafting/filtering pass, update passes, bias-corrected factors; the inverse
        // roots (eigendecompositions) run the same way in both runs.
        (
            "shampoo",
            "lr = 0.01\nbetas = [0.9, 0.95]\nbeta3 = 0.8\nweight_decay = 0.05\nweight_decay_type = \"l2\"\nmax_preconditioner_dim = 128\nprecondition_frequency = 2\nstart_preconditioning_step = 2\ngrafting_config = { type = \"adam\", beta2 = 0.95, epsilon = 1e-8 }\niterate_averaging_config = { type = \"classic_momentum\", momentum = 0.5, dampening = 0.1, use_nesterov = true }",
            4,
        ),
        (
            "shampoo",
            "lr = 0.01\nbetas = [0.6, 0.99]\nweight_decay = 0.05\nuse_bias_correction = false\nmax_preconditioner_dim = 128\nprecondition_frequency = 2\nstart_preconditioning_step = 3\ngrafting_config = { type = \"sgd\" }",
            4,
        ),
        // MARS: the three forms (approximate: exact MARS needs observe), clipping on; the AdamW fallback for
        // other tensors takes AdamW's kernel.
        ("mars", "lr = 0.01\ngamma = 0.025\nweight_decay = 0.1\noptimize_1d = true", 3),
        (
            "mars",
            "lr = 0.001\nmars_type = \"mars-lion\"\nweight_decay = 0.1",
            3,
        ),
        ("mars", "lr = 0.01\nmars_type = \"mars-shampoo\"\nweight_decay = 0.1", 3),
        // SOAP: moments, Adam in the eigenbasis and the update around the rotations (matrix
        // products) and refreshes (every 2 steps here).
        (
            "soap",
            "lr = 0.01\nweight_decay = 0.1\nprecondition_frequency = 2",
            4,
        ),
        (
            "soap",
            "lr = 0.01\nnormalize_grads = true\ncorrect_bias = false\nprecondition_1d = true",
            3,
        ),
        // Adafactor (torch): factored matrices and full vectors, decoupled decay; then a large
        // lr (ρ_t = 1/√t), a small d (the update clipping bites), a tiny ε1 and maximize.
        ("adafactor", "lr = 0.05\nweight_decay = 0.1", 3),
        (
            "adafactor",
            "lr = 2.0\nd = 0.5\neps1 = 1e-20\nbeta2_decay = -0.5\nmaximize = true",
            3,
        ),
        // Adafactor (HF): relative step with parameter scaling (the defaults); warm-up init with
        // the first moment and decay; an external lr without scaling, clipping below 1.
        ("adafactor_hf", "", 3),
        (
            "adafactor_hf",
            "warmup_init = true\nbeta1 = 0.9\nweight_decay = 0.01",
            3,
        ),
        (
            "adafactor_hf",
            "lr = 0.3\nrelative_step = false\nscale_parameter = false\nclip_threshold = 0.5\nbeta1 = 0.8\nweight_decay = 0.05",
            3,
        ),
    ];
    cases
        .iter()
        .map(|(name, body, steps)| {
            let mut toml = format!("name = \"{name}\"\n{body}");
            if *name == "adalayer" && body.starts_with("t_freeze") {
                toml.push('\n');
                toml.push_str(ADALAYER_ALL);
            }
            (toml, *steps)
        })
        .collect()
}

/// The [`kernel_cases`] of optimizer `name`.
pub fn kernel_cases_of(name: &str) -> Vec<(String, u64)> {
    let prefix = format!("name = \"{name}\"\n");
    kernel_cases()
        .into_iter()
        .filter(|(t, _)| t.starts_with(&prefix))
        .collect()
}
