//! The one driver behind every optimizer: it owns parameter names and roles, group membership,
//! missing gradients, input checks, learning rate and weight decay per group, the step counter,
//! modes, and state I/O. Rules only say how one tensor moves.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{Error, Result};
use crate::optim::config::OptimConfig;
use crate::optim::fused::{all_finite_each, prepare_grad};
use crate::optim::groups::OptimizerSpec;
use crate::optim::params::{NamedParams, ParamMeta};
use crate::optim::rule::{ExtraInput, Mode, Rule, StepCtx};
use crate::optim::state::{State, StateDict};
use crate::optim::Optimizer;

/// What to do when a gradient holds NaN or infinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFinitePolicy {
    /// Refuse the step with [`Error::NonFiniteGradient`]; nothing changes.
    #[default]
    Error,
    /// Skip the whole step (no parameter or state changes, the step counter does not advance)
    /// and count it in [`Driver::skipped_steps`].
    Skip,
}

struct Group {
    label: String,
    config: OptimConfig,
    rule: Box<dyn Rule>,
    base_lr: f64,
    weight_decay: f64,
    state: State,
}

struct Slot {
    meta: ParamMeta,
    var: Var,
    group: usize,
    state: State,
}

/// A named-parameter optimizer built from an [`OptimizerSpec`].
pub struct Driver {
    spec: OptimizerSpec,
    groups: Vec<Group>,
    slots: Vec<Slot>,
    step: u64,
    lr_factor: f64,
    mode: Mode,
    nonfinite: NonFinitePolicy,
    skipped: u64,
}

fn group_key(i: usize) -> String {
    format!("__group{i}")
}

impl Driver {
    /// Builds the optimizer over `params` (sorted by name) as `spec` says.
    pub fn new(spec: impl Into<OptimizerSpec>, params: NamedParams) -> Result<Self> {
        let spec = spec.into();
        let params = params.into_vec();
        let metas: Vec<ParamMeta> = params.iter().map(|p| p.meta.clone()).collect();
        let resolved = spec.assign(&metas)?;
        let mut slots: Vec<Slot> = params
            .into_iter()
            .map(|p| Slot {
                meta: p.meta,
                var: p.var,
                group: 0,
                state: State::default(),
            })
            .collect();
        let mut groups = Vec::new();
        for (gi, g) in resolved.into_iter().enumerate() {
            let rule = g.config.build_rule()?;
            for &pi in &g.members {
                slots[pi].group = gi;
                rule.check_param(&slots[pi].meta)?;
                let dtype = slots[pi].var.dtype();
                if !matches!(dtype, candle_core::DType::F32 | candle_core::DType::F64) {
                    return Err(Error::DType {
                        what: slots[pi].meta.name.clone(),
                        dtype,
                    });
                }
            }
            groups.push(Group {
                label: g.label,
                base_lr: g.config.lr(),
                weight_decay: g.config.weight_decay(),
                config: g.config,
                rule,
                state: State::default(),
            });
        }
        Ok(Self {
            spec,
            groups,
            slots,
            step: 0,
            lr_factor: 1.0,
            mode: Mode::Train,
            nonfinite: NonFinitePolicy::Error,
            skipped: 0,
        })
    }

    /// Sets the policy for non-finite gradients.
    pub fn with_nonfinite_policy(mut self, policy: NonFinitePolicy) -> Self {
        self.nonfinite = policy;
        self
    }

    /// Steps skipped because of non-finite gradients (with [`NonFinitePolicy::Skip`]).
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// The spec this optimizer was built from.
    pub fn spec(&self) -> &OptimizerSpec {
        &self.spec
    }

    /// Group labels with their member parameter names.
    pub fn group_members(&self) -> Vec<(String, Vec<String>)> {
        self.groups
            .iter()
            .enumerate()
            .map(|(gi, g)| {
                (
                    g.label.clone(),
                    self.slots
                        .iter()
                        .filter(|s| s.group == gi)
                        .map(|s| s.meta.name.clone())
                        .collect(),
                )
            })
            .collect()
    }

    /// The config a group runs with.
    pub fn group_config(&self, label: &str) -> Option<&OptimConfig> {
        self.groups
            .iter()
            .find(|g| g.label == label)
            .map(|g| &g.config)
    }

    /// The state of one parameter (empty before its first update).
    pub fn param_state(&self, name: &str) -> Option<&State> {
        self.slots
            .iter()
            .find(|s| s.meta.name == name)
            .map(|s| &s.state)
    }

    /// Gradients for every slot (None where missing), checked for shape, dtype and finiteness.
    /// Returns `Ok(None)` when the step must be skipped under [`NonFinitePolicy::Skip`].
    ///
    /// The checks behave as if made slot by slot in order (the first failing slot decides),
    /// but the finiteness of all gradients is checked in one batch, so that on a GPU the step
    /// waits for the device once rather than once per gradient.
    fn collect(
        &self,
        lookup: &dyn Fn(&Var) -> Option<Tensor>,
    ) -> Result<Option<Vec<Option<Tensor>>>> {
        let mut out = Vec::with_capacity(self.slots.len());
        let mut owners = Vec::with_capacity(self.slots.len());
        // A shape or conversion failure at slot i, reported unless a gradient before it is
        // non-finite.
        let mut failure = None;
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(g) = lookup(&slot.var) else {
                out.push(None);
                continue;
            };
            if g.dims() != slot.meta.shape.as_slice() {
                failure = Some(Error::Shape {
                    param: slot.meta.name.clone(),
                    expected: slot.meta.shape.clone(),
                    got: g.dims().to_vec(),
                });
                break;
            }
            match prepare_grad(&g, slot.var.dtype()) {
                Ok(g) => {
                    out.push(Some(g));
                    owners.push(i);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let present: Vec<&Tensor> = out.iter().flatten().collect();
        let finite = all_finite_each(&present)?;
        if let Some(k) = finite.iter().position(|ok| !ok) {
            return match self.nonfinite {
                NonFinitePolicy::Error => Err(Error::NonFiniteGradient {
                    param: self.slots[owners[k]].meta.name.clone(),
                    step: self.step + 1,
                }),
                NonFinitePolicy::Skip => Ok(None),
            };
        }
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(Some(out))
    }

    /// Extra-input values of any shape, in each parameter's dtype; `None` if any is non-finite.
    fn collect_unshaped(
        &self,
        lookup: &dyn Fn(&Var) -> Option<Tensor>,
    ) -> Result<Option<Vec<Option<Tensor>>>> {
        let mut out = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let v = match lookup(&slot.var) {
                Some(v) => Some(prepare_grad(&v, slot.var.dtype())?),
                None => None,
            };
            out.push(v);
        }
        let present: Vec<&Tensor> = out.iter().flatten().collect();
        Ok(all_finite_each(&present)?
            .iter()
            .all(|ok| *ok)
            .then_some(out))
    }

    /// One step from gradients given by a lookup (by variable).
    pub fn step_with(&mut self, lookup: &dyn Fn(&Var) -> Option<Tensor>) -> Result<()> {
        if self.mode != Mode::Train {
            return Err(Error::Msg(
                "optimizer is in eval mode: call train() before stepping".into(),
            ));
        }
        let Some(grads) = self.collect(lookup)? else {
            self.skipped += 1;
            return Ok(());
        };
        let step = self.step + 1;
        // A step is all or nothing: on an error, every parameter, every state and the step
        // counter stay as they were. Group states (small) are always saved; a parameter and its
        // state only where its rule can fail part-way through a step (a numerical failure such
        // as Shampoo's matrix root, see `OptimConfig::update_may_fail`). The elementwise rules
        // fail only on bad input, which `collect` has ruled out, so they are not copied.
        let saved_groups = self
            .groups
            .iter()
            .map(|g| g.state.deep_clone())
            .collect::<Result<Vec<_>>>()?;
        let saved_slots = self
            .slots
            .iter()
            .zip(&grads)
            .map(|(slot, grad)| {
                if grad.is_none() || !self.groups[slot.group].config.update_may_fail() {
                    return Ok(None);
                }
                Ok(Some((
                    slot.var.as_tensor().copy()?,
                    slot.state.deep_clone()?,
                )))
            })
            .collect::<Result<Vec<_>>>()?;
        match self.update_all(step, grads) {
            Ok(()) => {
                self.step = step;
                Ok(())
            }
            Err(e) => {
                for (g, saved) in self.groups.iter_mut().zip(saved_groups) {
                    g.state = saved;
                }
                for (slot, saved) in self.slots.iter_mut().zip(saved_slots) {
                    if let Some((param, state)) = saved {
                        slot.var.set(&param)?;
                        slot.state = state;
                    }
                }
                Err(e)
            }
        }
    }

    /// The group preparations and parameter updates of step number `step`; on an error, some
    /// of them may have been made.
    fn update_all(&mut self, step: u64, grads: Vec<Option<Tensor>>) -> Result<()> {
        for g in &mut self.groups {
            let lr = g.base_lr * self.lr_factor;
            g.rule.begin_step(lr, &mut g.state)?;
        }
        for (gi, g) in self.groups.iter_mut().enumerate() {
            let members: Vec<&Tensor> = (self.slots.iter().zip(&grads))
                .filter(|(s, _)| s.group == gi)
                .filter_map(|(_, g)| g.as_ref())
                .collect();
            g.rule.begin_step_grads(&members, &mut g.state)?;
        }
        let (groups, lr_factor) = (&self.groups, self.lr_factor);
        let update = |(slot, grad): (&mut Slot, Option<Tensor>)| -> Result<()> {
            let Some(grad) = grad else { return Ok(()) };
            let group = &groups[slot.group];
            let ctx = StepCtx {
                lr: group.base_lr * lr_factor,
                lr_factor,
                weight_decay: group.weight_decay,
                step,
                group: &group.state,
            };
            group
                .rule
                .update(&ctx, &slot.meta, &slot.var, &grad, &mut slot.state)
        };
        if self.parallel_updates() {
            // Parameters move independently (a rule sees only its own tensor, state and the
            // group's read-only state), so the result is the same bits in any order; the first
            // error in parameter order is the one reported.
            use rayon::prelude::*;
            let results: Vec<Result<()>> = self
                .slots
                .par_iter_mut()
                .zip(grads.into_par_iter())
                .map(update)
                .collect();
            results.into_iter().collect()
        } else {
            self.slots.iter_mut().zip(grads).try_for_each(update)
        }
    }

    /// Whether a step updates its parameters on several threads: on the CPU, with more than
    /// one worker thread, and outside kernel emulation (whose switch is per thread).
    fn parallel_updates(&self) -> bool {
        #[cfg(optlab_emulate_kernels)]
        if crate::launch::emulate::active() {
            return false;
        }
        self.slots.len() > 1
            && rayon::current_num_threads() > 1
            && self.slots.iter().all(|s| s.var.device().is_cpu())
    }

    /// One step from parameter-name → gradient pairs (missing names are skipped; unknown names
    /// are an error).
    pub fn step_named(&mut self, grads: &BTreeMap<String, Tensor>) -> Result<()> {
        for name in grads.keys() {
            if !self.slots.iter().any(|s| &s.meta.name == name) {
                return Err(Error::Msg(format!(
                    "gradient for unknown parameter `{name}`"
                )));
            }
        }
        let by_id: std::collections::HashMap<_, _> = self
            .slots
            .iter()
            .filter_map(|s| grads.get(&s.meta.name).map(|g| (s.var.id(), g.clone())))
            .collect();
        self.step_with(&|v: &Var| by_id.get(&v.id()).cloned())
    }

    fn observe_with(
        &mut self,
        input: ExtraInput,
        lookup: &dyn Fn(&Var) -> Option<Tensor>,
    ) -> Result<()> {
        let values = if input.shaped_like_param() {
            self.collect(lookup)?
        } else {
            self.collect_unshaped(lookup)?
        };
        let Some(values) = values else {
            return Err(Error::Msg(format!(
                "non-finite values in extra input {input:?}"
            )));
        };
        for (slot, v) in self.slots.iter_mut().zip(values) {
            let Some(v) = v else { continue };
            self.groups[slot.group].rule.observe(
                input,
                &slot.meta,
                &slot.var,
                &v,
                &mut slot.state,
            )?;
        }
        Ok(())
    }

    /// Extra input by parameter name (see [`Optimizer::observe`]).
    pub fn observe_named(
        &mut self,
        input: ExtraInput,
        values: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let by_id: std::collections::HashMap<_, _> = self
            .slots
            .iter()
            .filter_map(|s| values.get(&s.meta.name).map(|g| (s.var.id(), g.clone())))
            .collect();
        self.observe_with(input, &|v: &Var| by_id.get(&v.id()).cloned())
    }

    fn default_base_lr(&self) -> f64 {
        self.groups[0].base_lr
    }
}

impl Optimizer for Driver {
    fn name(&self) -> &str {
        self.spec.optimizer.name()
    }

    fn params(&self) -> Vec<ParamMeta> {
        self.slots.iter().map(|s| s.meta.clone()).collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        self.slots
            .iter()
            .map(|s| (s.meta.name.clone(), s.var.clone()))
            .collect()
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_with(&|v: &Var| grads.get(v.as_tensor()).cloned())
    }

    fn lr(&self) -> f64 {
        self.default_base_lr() * self.lr_factor
    }

    fn set_lr(&mut self, lr: f64) {
        let base = self.default_base_lr();
        self.lr_factor = if base > 0.0 { lr / base } else { 1.0 };
    }

    fn lr_factor(&self) -> f64 {
        self.lr_factor
    }

    fn set_lr_factor(&mut self, factor: f64) {
        self.lr_factor = factor;
    }

    fn step_count(&self) -> u64 {
        self.step
    }

    fn observe(&mut self, input: ExtraInput, values: &GradStore) -> Result<()> {
        self.observe_with(input, &|v: &Var| values.get(v.as_tensor()).cloned())
    }

    fn mode(&self) -> Mode {
        self.mode
    }

    fn set_mode(&mut self, mode: Mode) -> Result<()> {
        if mode == self.mode {
            return Ok(());
        }
        for slot in &mut self.slots {
            let g = &self.groups[slot.group];
            g.rule
                .switch_mode(mode, &slot.meta, &slot.var, &mut slot.state, &g.state)?;
        }
        self.mode = mode;
        Ok(())
    }

    fn eval_params(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let g = &self.groups[slot.group];
            let t =
                match g
                    .rule
                    .eval_value(&slot.meta, &slot.var, &slot.state, &g.state, self.mode)?
                {
                    Some(t) => t,
                    None => slot.var.as_tensor().copy()?,
                };
            out.push((slot.meta.name.clone(), t));
        }
        Ok(out)
    }

    fn diagnostics(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        out.insert("skipped_steps".into(), self.skipped as f64);
        for slot in &self.slots {
            let mut d = BTreeMap::new();
            self.groups[slot.group]
                .rule
                .diagnostics(&slot.state, &mut d);
            for (k, v) in d {
                *out.entry(k).or_insert(0.0) += v;
            }
        }
        out
    }

    fn state_dict(&self) -> Result<StateDict> {
        let mut entries = BTreeMap::new();
        for slot in &self.slots {
            if !slot.state.is_empty() {
                entries.insert(slot.meta.name.clone(), slot.state.deep_clone()?);
            }
        }
        for (gi, g) in self.groups.iter().enumerate() {
            if !g.state.is_empty() {
                entries.insert(group_key(gi), g.state.deep_clone()?);
            }
        }
        let mut extra = BTreeMap::new();
        extra.insert("lr_factor".into(), format!("{:e}", self.lr_factor));
        extra.insert(
            "lr_factor_bits".into(),
            self.lr_factor.to_bits().to_string(),
        );
        extra.insert("mode".into(), format!("{:?}", self.mode).to_lowercase());
        extra.insert("skipped".into(), self.skipped.to_string());
        extra.insert(
            "params".into(),
            serde_json::to_string(&self.params()).map_err(|e| Error::State(e.to_string()))?,
        );
        Ok(StateDict {
            optimizer: self.name().to_string(),
            config: serde_json::to_string(&self.spec).map_err(|e| Error::State(e.to_string()))?,
            step: self.step,
            entries,
            extra,
        })
    }

    fn load_state_dict(&mut self, sd: StateDict) -> Result<()> {
        if sd.optimizer != self.name() {
            return Err(Error::State(format!(
                "state was saved by `{}`, this optimizer is `{}`",
                sd.optimizer,
                self.name()
            )));
        }
        if let Some(saved) = sd.extra.get("params") {
            let saved: Vec<ParamMeta> = serde_json::from_str(saved)
                .map_err(|e| Error::State(format!("bad parameter list in state: {e}")))?;
            let mine = self.params();
            let names = |v: &[ParamMeta]| v.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
            if names(&saved) != names(&mine) {
                return Err(Error::State(format!(
                    "state is for another parameter set: saved {:?}, this optimizer has {:?}",
                    names(&saved),
                    names(&mine)
                )));
            }
            for (a, b) in saved.iter().zip(&mine) {
                if a.shape != b.shape {
                    return Err(Error::State(format!(
                        "parameter `{}` has shape {:?} here but {:?} in the state file",
                        b.name, b.shape, a.shape
                    )));
                }
            }
        }
        let mut new_slots: Vec<State> = vec![State::default(); self.slots.len()];
        let mut new_groups: Vec<State> = vec![State::default(); self.groups.len()];
        for (key, state) in sd.entries {
            if let Some(pi) = self.slots.iter().position(|s| s.meta.name == key) {
                let slot = &self.slots[pi];
                for (field, t) in &state.tensors {
                    if t.dtype() != slot.var.dtype() && t.dtype() != candle_core::DType::F64 {
                        return Err(Error::State(format!(
                            "`{key}.{field}` has dtype {:?}, parameter has {:?}",
                            t.dtype(),
                            slot.var.dtype()
                        )));
                    }
                }
                self.groups[slot.group]
                    .rule
                    .check_state(&slot.meta, &state)?;
                new_slots[pi] = state;
            } else if let Some(gi) = (0..self.groups.len()).find(|&gi| group_key(gi) == key) {
                new_groups[gi] = state;
            } else {
                return Err(Error::State(format!(
                    "state holds `{key}`, which is not a parameter of this optimizer"
                )));
            }
        }
        let get = |k: &str| sd.extra.get(k).cloned();
        let lr_factor = match get("lr_factor_bits") {
            Some(b) => f64::from_bits(
                b.parse()
                    .map_err(|e| Error::State(format!("bad lr_factor: {e}")))?,
            ),
            None => 1.0,
        };
        let mode = match get("mode").as_deref() {
            Some("eval") => Mode::Eval,
            _ => Mode::Train,
        };
        let skipped = get("skipped").and_then(|s| s.parse().ok()).unwrap_or(0);
        for (slot, st) in self.slots.iter_mut().zip(new_slots) {
            slot.state = st;
        }
        for (g, st) in self.groups.iter_mut().zip(new_groups) {
            g.state = st;
        }
        self.step = sd.step;
        self.lr_factor = lr_factor;
        self.mode = mode;
        self.skipped = skipped;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use candle_core::Device;

    use super::*;

    /// The wrapped rule, except that once armed it fails on the parameter `fail_on` after its
    /// update has changed the parameter and its state: a numerical failure found late, as when
    /// Shampoo's root of the last parameter comes out non-finite.
    struct FailsLate {
        inner: Box<dyn Rule>,
        fail_on: String,
        armed: Arc<AtomicBool>,
    }

    impl Rule for FailsLate {
        fn name(&self) -> &'static str {
            self.inner.name()
        }
        fn begin_step(&self, lr: f64, group: &mut State) -> Result<()> {
            self.inner.begin_step(lr, group)
        }
        fn update(
            &self,
            ctx: &StepCtx<'_>,
            meta: &ParamMeta,
            param: &Var,
            grad: &Tensor,
            state: &mut State,
        ) -> Result<()> {
            self.inner.update(ctx, meta, param, grad, state)?;
            if meta.name == self.fail_on && self.armed.load(Ordering::Relaxed) {
                return Err(Error::Msg("injected failure".into()));
            }
            Ok(())
        }
    }

    fn params() -> NamedParams {
        let dev = Device::Cpu;
        let var = |shape: &[usize], seed: f64| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| ((i as f64 + seed).sin()) as f32).collect();
            Var::from_tensor(&Tensor::from_vec(v, shape, &dev).unwrap()).unwrap()
        };
        NamedParams::new(vec![
            ("a.weight".to_string(), var(&[6, 4], 0.3)),
            ("b.bias".to_string(), var(&[4], 1.7)),
            ("z.weight".to_string(), var(&[4, 5], 2.9)),
        ])
        .unwrap()
    }

    fn grads(opt: &Driver, k: usize) -> BTreeMap<String, Tensor> {
        opt.vars()
            .into_iter()
            .map(|(name, v)| {
                let n = v.elem_count();
                let g: Vec<f32> = (0..n)
                    .map(|i| ((i * 7 + k * 13) as f64).cos() as f32 * 0.1)
                    .collect();
                (name, Tensor::from_vec(g, v.dims(), &Device::Cpu).unwrap())
            })
            .collect()
    }

    fn snapshot(opt: &Driver) -> (Vec<Vec<f32>>, Vec<u8>, u64) {
        let params = opt
            .vars()
            .iter()
            .map(|(_, v)| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect();
        let state = opt.state_dict().unwrap().to_bytes().unwrap();
        (params, state, opt.step_count())
    }

    /// A step whose last parameter fails changes nothing, on one thread and on several; the
    /// next step then gives the same bits as on an optimizer that never failed.
    fn a_failed_step_changes_nothing(config: &str, threads: usize) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let cfg = OptimConfig::from_toml(config).unwrap();
            let mut opt = Driver::new(cfg.clone(), params()).unwrap();
            assert_eq!(opt.parallel_updates(), threads > 1);
            let mut twin = Driver::new(cfg, params()).unwrap();
            let armed = Arc::new(AtomicBool::new(false));
            let inner = opt.groups[0].config.build_rule().unwrap();
            opt.groups[0].rule = Box::new(FailsLate {
                inner,
                fail_on: "z.weight".into(),
                armed: armed.clone(),
            });
            for k in 0..3 {
                opt.step_named(&grads(&opt, k)).unwrap();
                twin.step_named(&grads(&twin, k)).unwrap();
            }
            let before = snapshot(&opt);
            let same = snapshot(&twin);
            assert_eq!(before.0, same.0, "the wrapped rule moved differently");
            assert!(before.1 == same.1, "the wrapped rule kept another state");
            armed.store(true, Ordering::Relaxed);
            let err = opt.step_named(&grads(&opt, 3)).unwrap_err();
            assert!(err.to_string().contains("injected"), "{err}");
            let after = snapshot(&opt);
            assert_eq!(after.2, before.2, "step counter moved");
            assert_eq!(after.0, before.0, "parameters moved");
            assert!(after.1 == before.1, "state changed");
            armed.store(false, Ordering::Relaxed);
            opt.step_named(&grads(&opt, 3)).unwrap();
            twin.step_named(&grads(&twin, 3)).unwrap();
            let (after, same) = (snapshot(&opt), snapshot(&twin));
            assert_eq!((after.0, after.2), (same.0, same.2));
            assert!(
                after.1 == same.1,
                "state differs from an optimizer that never failed"
            );
        });
    }

    #[test]
    fn a_failed_shampoo_step_changes_nothing_serial() {
        a_failed_step_changes_nothing("name = \"shampoo\"", 1);
    }

    #[test]
    fn a_failed_shampoo_step_changes_nothing_parallel() {
        a_failed_step_changes_nothing("name = \"shampoo\"", 2);
    }

    #[test]
    fn a_failed_soap_step_changes_nothing() {
        a_failed_step_changes_nothing("name = \"soap\"", 2);
    }
}
