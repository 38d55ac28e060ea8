//! Typed optimizer configs: one serde struct per optimizer, and [`OptimConfig`], the enum over
//! all of them, tagged by `name` so a TOML table selects one:
//!
//! ```toml
//! name = "adamw"
//! lr = 3e-4
//! betas = [0.9, 0.95]
//! weight_decay = 0.1
//! ```
//!
//! A config implements [`RuleConfig`]: its checks and its rule are its own, its lr and
//! weight-decay accessors come from `hyper_accessors!()`. Registering it is one line in
//! `optimizers!` below.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::optim::rule::Rule;

/// What every optimizer config provides to the driver.
pub trait RuleConfig: Serialize + DeserializeOwned + Default + Clone + std::fmt::Debug {
    /// Canonical lower-case name.
    const NAME: &'static str;
    /// Checks every field, naming the first bad one.
    fn validate(&self) -> Result<()>;
    /// Base learning rate.
    fn lr(&self) -> f64;
    /// Sets the base learning rate.
    fn set_lr(&mut self, lr: f64);
    /// Weight decay.
    fn weight_decay(&self) -> f64;
    /// Sets the weight decay.
    fn set_weight_decay(&mut self, wd: f64);
    /// Builds the per-tensor rule (after validation).
    fn build(&self) -> Result<Box<dyn Rule>>;
}

/// The [`RuleConfig`] accessors of a config whose fields are `lr: f64` and `weight_decay: f64`
/// (every config names them so), written once here instead of in every config. Invoke inside
/// the `impl RuleConfig` block: `hyper_accessors!();`, or `hyper_accessors!(optional lr);` for an
/// `lr: Option<f64>` that may stay unset (read as 0; setting it makes it explicit).
macro_rules! hyper_accessors {
    () => {
        fn lr(&self) -> f64 {
            self.lr
        }
        fn set_lr(&mut self, lr: f64) {
            self.lr = lr;
        }
        $crate::optim::config::hyper_accessors!(@weight_decay);
    };
    (optional lr) => {
        fn lr(&self) -> f64 {
            self.lr.unwrap_or(0.0)
        }
        fn set_lr(&mut self, lr: f64) {
            self.lr = Some(lr);
        }
        $crate::optim::config::hyper_accessors!(@weight_decay);
    };
    (@weight_decay) => {
        fn weight_decay(&self) -> f64 {
            self.weight_decay
        }
        fn set_weight_decay(&mut self, wd: f64) {
            self.weight_decay = wd;
        }
    };
}
pub(crate) use hyper_accessors;

macro_rules! optimizers {
    ($($variant:ident($cfg:ty)),* $(,)?) => {
        /// Any optimizer's config, tagged by `name`.
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(tag = "name", rename_all = "snake_case")]
        #[allow(clippy::large_enum_variant)]
        pub enum OptimConfig {
            $(
                #[doc = concat!("See [`", stringify!($cfg), "`].")]
                $variant($cfg),
            )*
        }

        impl OptimConfig {
            /// Every registered optimizer name.
            pub const NAMES: &'static [&'static str] = &[$(<$cfg as RuleConfig>::NAME),*];

            /// The canonical name.
            pub fn name(&self) -> &'static str {
                match self { $(OptimConfig::$variant(_) => <$cfg as RuleConfig>::NAME,)* }
            }
            /// Validates every field.
            pub fn validate(&self) -> Result<()> {
                match self { $(OptimConfig::$variant(c) => c.validate(),)* }
            }
            /// Base learning rate.
            pub fn lr(&self) -> f64 {
                match self { $(OptimConfig::$variant(c) => c.lr(),)* }
            }
            /// Sets the base learning rate.
            pub fn set_lr(&mut self, lr: f64) {
                match self { $(OptimConfig::$variant(c) => c.set_lr(lr),)* }
            }
            /// Weight decay.
            pub fn weight_decay(&self) -> f64 {
                match self { $(OptimConfig::$variant(c) => c.weight_decay(),)* }
            }
            /// Sets the weight decay.
            pub fn set_weight_decay(&mut self, wd: f64) {
                match self { $(OptimConfig::$variant(c) => c.set_weight_decay(wd),)* }
            }
            /// Validates, then builds the rule.
            pub fn build_rule(&self) -> Result<Box<dyn Rule>> {
                self.validate()?;
                match self { $(OptimConfig::$variant(c) => c.build(),)* }
            }
            /// The default config of the optimizer called `name`.
            pub fn default_for(name: &str) -> Result<Self> {
                $(if name == <$cfg as RuleConfig>::NAME {
                    return Ok(OptimConfig::$variant(<$cfg>::default()));
                })*
                Err(Error::config("name", format!(
                    "unknown optimizer `{name}`; known: {}", Self::NAMES.join(", "))))
            }
        }
    };
}

optimizers! {
    Adamw(crate::optim::adamw::AdamWConfig),
    Adafactor(crate::optim::adafactor::AdafactorConfig),
    AdafactorHf(crate::optim::adafactor_hf::AdafactorHfConfig),
    SchedulefreeAdamw(crate::optim::schedule_free::ScheduleFreeAdamWConfig),
    SchedulefreeSgd(crate::optim::schedule_free::ScheduleFreeSgdConfig),
    Mars(crate::optim::mars::MarsConfig),
    Muon(crate::optim::muon::MuonConfig),
    Sgd(crate::optim::sgd::SgdConfig),
    Signum(crate::optim::signum::SignumConfig),
    Lion(crate::optim::lion::LionConfig),
    Sophia(crate::optim::sophia::SophiaConfig),
    Ademamix(crate::optim::ademamix::AdEMAMixConfig),
    SimplifiedAdemamix(crate::optim::simplified_ademamix::SimplifiedAdEMAMixConfig),
    Adalayer(crate::optim::adalayer::AdalayerConfig),
    AdalayerSgd(crate::optim::adalayer::AdalayerSgdConfig),
    Soap(crate::optim::soap::SoapConfig),
    Shampoo(crate::optim::shampoo::ShampooConfig),
    Adopt(crate::optim::algorithms::adopt::AdoptConfig),
    CautiousAdamw(crate::optim::algorithms::cautious_adamw::CautiousAdamWConfig),
    Normuon(crate::optim::algorithms::normuon::NorMuonConfig),
    PsgdKron(crate::optim::algorithms::psgd_kron::PsgdKronConfig),
}

impl OptimConfig {
    /// Parses a TOML table (with a `name` key) into a validated config.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: OptimConfig =
            toml::from_str(text).map_err(|e| Error::config("optimizer", e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a JSON object (with a `name` key) into a validated config.
    pub fn from_json(value: serde_json::Value) -> Result<Self> {
        let cfg: OptimConfig =
            serde_json::from_value(value).map_err(|e| Error::config("optimizer", e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// JSON text of this config (stored in state headers).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
    /// Whether this optimizer's update of one parameter can fail on input that passed the
    /// driver's checks (shape, dtype, finite gradient), after having changed something: a matrix
    /// root, eigenbasis or orthogonalization that does not converge or comes out non-finite.
    /// The driver saves a copy of such parameters and their states before a step and puts it
    /// back when the step fails. The purely elementwise rules (one fused pass over the
    /// parameter, its gradient and its moments) fail only on a device fault; `false` for them
    /// keeps their step free of that copy.
    pub fn update_may_fail(&self) -> bool {
        !matches!(
            self,
            OptimConfig::Adamw(_)
                | OptimConfig::CautiousAdamw(_)
                | OptimConfig::Adopt(_)
                | OptimConfig::SchedulefreeAdamw(_)
                | OptimConfig::SchedulefreeSgd(_)
                | OptimConfig::Mars(_)
                | OptimConfig::Sgd(_)
                | OptimConfig::Signum(_)
                | OptimConfig::Lion(_)
                | OptimConfig::Sophia(_)
                | OptimConfig::Ademamix(_)
                | OptimConfig::SimplifiedAdemamix(_)
                // A sum of squares per block, then one fused pass per block; every length is
                // checked before the first write.
                | OptimConfig::Adalayer(_)
                | OptimConfig::AdalayerSgd(_)
                // Factored or full second moments and the parameter in one pass, every size
                // (and the RMS slot written after it) checked before the first write.
                | OptimConfig::Adafactor(_)
                | OptimConfig::AdafactorHf(_)
        )
    }
}
