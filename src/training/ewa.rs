//! Exponential weight averaging (EWA) of parameters, as the critical-batch-size paper evaluates
//! its constant-lr runs (reference: `hlzhang109/critical-batch-size@d30de49`, `olmo/optim.py`,
//! `AdamW.step` / `eval` / `train` with `use_w_avg`).
//!
//! After every optimizer step, for each decay τ (several may be tracked at once, like the
//! reference's `multiple_ewa` list `[0.99, 0.9968, 0.999, 0.99968, 0.9999]`):
//!
//! ```text
//! w_τ ← τ·w_τ + (1 − τ)·θ           w_τ = 0 before the first update
//! θ_eval = w_τ · (1 / (1 − τ^t))     bias-corrected, t = number of updates
//! ```
//!
//! exactly in the reference's arithmetic: τ and 1 − τ (computed in f64) rounded once to the
//! parameter's dtype, `1 − τ^t` with a floating-point power, and the correction applied as a
//! multiplication by its reciprocal. Zero initialisation plus the bias correction make the
//! evaluated average a proper weighted mean of the iterates from the first step on.
//!
//! Differences from the reference: the reference keeps a per-parameter step and skips
//! parameters without a gradient; here [`Ewa::update`] averages every variable and keeps one
//! count (the same whenever every parameter gets a gradient every step, as in LM training). The
//! reference selects the evaluated τ by cycling through its list on each `eval()`; here it is
//! named explicitly.
//!
//! Evaluation either reads the averages ([`Ewa::eval_params`]) or swaps them into the variables
//! ([`Ewa::swap_in`] / [`Ewa::restore`], or [`Ewa::with_swapped`] which always restores). While
//! swapped, the raw weights are held aside; [`Ewa::update`] refuses to run (it would average the
//! averages), a second swap refuses, and dropping the `Ewa` restores them.
//!
//! ```
//! use candle_core::{Device, Var};
//! use optlab::optim::ewa::Ewa;
//!
//! # fn main() -> optlab::Result<()> {
//! let w = Var::new(&[1f64, 2.], &Device::Cpu)?;
//! let mut ewa = Ewa::new(vec![("w".to_string(), w.clone())], &[0.9, 0.99])?;
//! for _ in 0..3 {
//!     // ... optimizer step ...
//!     ewa.update()?;
//! }
//! let loss_at_average = ewa.with_swapped(0.99, || Ok(w.sum_all()?.to_scalar::<f64>()?))?;
//! assert!((loss_at_average - 3.0).abs() < 1e-12); // average of a constant sequence
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::optim::fused::{zip_mut_or_kernel, Float, Kernel};
use crate::optim::params::NamedParams;
use crate::optim::state::{State, StateDict};
use crate::optim::Optimizer;
use crate::with_float;

/// Name written into EWA state files (the `optimizer` header of a [`StateDict`]).
pub const EWA_STATE_NAME: &str = "ewa";

/// Raw weights held aside while an average is swapped in.
struct Stash {
    tau: f64,
    raw: Vec<Tensor>,
}

/// Exponential weight averages of a set of named variables, for one or more decays τ.
pub struct Ewa {
    taus: Vec<f64>,
    names: Vec<String>,
    vars: Vec<Var>,
    /// `avgs[param][k]` is the average for `taus[k]`, in the parameter's dtype.
    avgs: Vec<Vec<Tensor>>,
    count: u64,
    stash: Option<Stash>,
}

/// The state-file field of the average for `tau` (the reference's `w_avg_{tau}`).
fn field(tau: f64) -> String {
    format!("w_avg_{tau}")
}

#[derive(serde::Serialize, serde::Deserialize)]
struct EwaHeader {
    taus: Vec<f64>,
}

impl Ewa {
    /// Averages of `vars` (sorted by name; names unique; f32/f64, contiguous) for each decay in
    /// `taus` (each in [0, 1), distinct, at least one).
    pub fn new(vars: impl IntoIterator<Item = (String, Var)>, taus: &[f64]) -> Result<Self> {
        if taus.is_empty() {
            return Err(Error::config("ewa.taus", "needs at least one decay"));
        }
        for (i, &tau) in taus.iter().enumerate() {
            crate::error::check::unit_interval(&format!("ewa.taus[{i}]"), tau)?;
            if taus[..i].contains(&tau) {
                return Err(Error::config(
                    format!("ewa.taus[{i}]"),
                    format!("{tau} is listed twice"),
                ));
            }
        }
        let params = NamedParams::new(vars)?.into_vec();
        let mut names = Vec::with_capacity(params.len());
        let mut out_vars = Vec::with_capacity(params.len());
        let mut avgs = Vec::with_capacity(params.len());
        for p in params {
            let dtype = p.var.dtype();
            if !matches!(dtype, candle_core::DType::F32 | candle_core::DType::F64) {
                return Err(Error::DType {
                    what: p.meta.name,
                    dtype,
                });
            }
            avgs.push(
                taus.iter()
                    .map(|_| p.var.as_tensor().zeros_like())
                    .collect::<candle_core::Result<Vec<_>>>()?,
            );
            names.push(p.meta.name);
            out_vars.push(p.var);
        }
        Ok(Self {
            taus: taus.to_vec(),
            names,
            vars: out_vars,
            avgs,
            count: 0,
            stash: None,
        })
    }

    /// Averages of every variable of `opt`.
    pub fn from_optimizer(opt: &dyn Optimizer, taus: &[f64]) -> Result<Self> {
        Self::new(opt.vars(), taus)
    }

    /// The decays, in the order given.
    pub fn taus(&self) -> &[f64] {
        &self.taus
    }

    /// The averaged variables' names, sorted.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Number of updates so far (t in the bias correction).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether an average is swapped into the variables (and which).
    pub fn swapped_tau(&self) -> Option<f64> {
        self.stash.as_ref().map(|s| s.tau)
    }

    fn tau_index(&self, tau: f64) -> Result<usize> {
        self.taus.iter().position(|&t| t == tau).ok_or_else(|| {
            Error::config(
                "ewa.tau",
                format!("{tau} is not tracked; tracked decays: {:?}", self.taus),
            )
        })
    }

    /// Folds the variables' current values into every average (call after each optimizer step).
    pub fn update(&mut self) -> Result<()> {
        if let Some(s) = &self.stash {
            return Err(Error::Msg(format!(
                "EWA update while the τ = {} average is swapped into the parameters: call \
                 restore() first, or the averages would average themselves",
                s.tau
            )));
        }
        for (var, avgs) in self.vars.iter().zip(&self.avgs) {
            with_float!(var.dtype(), "ewa", T => update_typed::<T>(&self.taus, var, avgs)?);
        }
        self.count += 1;
        Ok(())
    }

    /// `1 / (1 − τ^t)`, the bias-correction multiplier, as the reference computes it.
    fn correction(&self, tau: f64) -> Result<f64> {
        if self.count == 0 {
            return Err(Error::Msg(
                "no EWA update yet: the bias-corrected average is undefined before the first \
                 update"
                    .into(),
            ));
        }
        Ok(1.0 / (1.0 - tau.powf(self.count as f64)))
    }

    /// The bias-corrected averages for `tau`, by name (new tensors; nothing changes).
    pub fn eval_params(&self, tau: f64) -> Result<Vec<(String, Tensor)>> {
        let k = self.tau_index(tau)?;
        let scale = self.correction(tau)?;
        let mut out = Vec::with_capacity(self.vars.len());
        for ((name, var), avgs) in self.names.iter().zip(&self.vars).zip(&self.avgs) {
            let t = var.as_tensor().zeros_like()?;
            with_float!(var.dtype(), "ewa", T => scale_into::<T>(&t, &avgs[k], scale)?);
            out.push((name.clone(), t));
        }
        Ok(out)
    }

    /// Writes the bias-corrected `tau` averages into the variables, keeping the raw weights
    /// aside until [`Ewa::restore`]. Errors if an average is already swapped in.
    pub fn swap_in(&mut self, tau: f64) -> Result<()> {
        if let Some(s) = &self.stash {
            return Err(Error::Msg(format!(
                "the τ = {} average is already swapped in: restore() before swapping in another",
                s.tau
            )));
        }
        let k = self.tau_index(tau)?;
        let scale = self.correction(tau)?;
        let raw = self
            .vars
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.stash = Some(Stash { tau, raw });
        for (var, avgs) in self.vars.iter().zip(&self.avgs) {
            let written = with_float!(var.dtype(), "ewa", T => {
                scale_into::<T>(var.as_tensor(), &avgs[k], scale)
            });
            if let Err(e) = written {
                self.restore()?;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Puts the raw weights back after [`Ewa::swap_in`]; returns whether anything was swapped.
    pub fn restore(&mut self) -> Result<bool> {
        let Some(stash) = self.stash.take() else {
            return Ok(false);
        };
        for (i, (var, raw)) in self.vars.iter().zip(&stash.raw).enumerate() {
            if let Err(e) = var.set(raw) {
                // Keep the raw weights so a retry (or drop) can still restore them.
                self.stash = Some(stash);
                return Err(Error::Msg(format!(
                    "restoring `{}` after EWA evaluation failed: {e}",
                    self.names[i]
                )));
            }
        }
        Ok(true)
    }

    /// Runs `f` with the bias-corrected `tau` averages in the variables and restores the raw
    /// weights afterwards, also when `f` fails.
    pub fn with_swapped<R>(&mut self, tau: f64, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.swap_in(tau)?;
        let out = f();
        self.restore()?;
        out
    }

    /// The averages and the update count, keyed by parameter name (fields `w_avg_<τ>`).
    pub fn state_dict(&self) -> Result<StateDict> {
        let mut entries = BTreeMap::new();
        for (name, avgs) in self.names.iter().zip(&self.avgs) {
            let mut state = State::default();
            for (&tau, a) in self.taus.iter().zip(avgs) {
                state.tensors.insert(field(tau), a.copy()?);
            }
            entries.insert(name.clone(), state);
        }
        let shapes: Vec<(String, Vec<usize>)> = self
            .names
            .iter()
            .zip(&self.vars)
            .map(|(n, v)| (n.clone(), v.dims().to_vec()))
            .collect();
        let mut extra = BTreeMap::new();
        extra.insert(
            "params".into(),
            serde_json::to_string(&shapes).map_err(|e| Error::State(e.to_string()))?,
        );
        Ok(StateDict {
            optimizer: EWA_STATE_NAME.into(),
            config: serde_json::to_string(&EwaHeader {
                taus: self.taus.clone(),
            })
            .map_err(|e| Error::State(e.to_string()))?,
            step: self.count,
            entries,
            extra,
        })
    }

    /// Restores averages saved by [`Ewa::state_dict`] for the same decays and parameters (names,
    /// shapes and dtypes must match). Nothing changes on error.
    pub fn load_state_dict(&mut self, sd: StateDict) -> Result<()> {
        if sd.optimizer != EWA_STATE_NAME {
            return Err(Error::State(format!(
                "state was saved by `{}`, not by EWA",
                sd.optimizer
            )));
        }
        let header: EwaHeader = serde_json::from_str(&sd.config)
            .map_err(|e| Error::State(format!("bad EWA header: {e}")))?;
        if header.taus != self.taus {
            return Err(Error::State(format!(
                "state tracks decays {:?}, this EWA tracks {:?}",
                header.taus, self.taus
            )));
        }
        let saved: Vec<&String> = sd.entries.keys().collect();
        let mine: Vec<&String> = self.names.iter().collect();
        if saved != mine {
            return Err(Error::State(format!(
                "EWA state is for another parameter set: saved {saved:?}, this EWA has {mine:?}"
            )));
        }
        let mut new_avgs = Vec::with_capacity(self.vars.len());
        for ((name, var), state) in self.names.iter().zip(&self.vars).zip(sd.entries.values()) {
            if state.tensors.len() != self.taus.len() || !state.scalars.is_empty() {
                return Err(Error::State(format!(
                    "EWA state for `{name}` has fields {:?}, expected {:?}",
                    state.tensors.keys().collect::<Vec<_>>(),
                    self.taus.iter().map(|&t| field(t)).collect::<Vec<_>>()
                )));
            }
            let mut avgs = Vec::with_capacity(self.taus.len());
            for &tau in &self.taus {
                let t = state.tensor(&field(tau)).map_err(|_| {
                    Error::State(format!("EWA state for `{name}` lacks `{}`", field(tau)))
                })?;
                if t.dims() != var.dims() {
                    return Err(Error::Shape {
                        param: format!("{name}.{}", field(tau)),
                        expected: var.dims().to_vec(),
                        got: t.dims().to_vec(),
                    });
                }
                if t.dtype() != var.dtype() {
                    return Err(Error::State(format!(
                        "EWA state `{name}.{}` is {:?}, the parameter is {:?}",
                        field(tau),
                        t.dtype(),
                        var.dtype()
                    )));
                }
                // Own, contiguous copies on the parameter's device: the fused update writes
                // them in place.
                avgs.push(t.to_device(var.device())?.contiguous()?.copy()?);
            }
            new_avgs.push(avgs);
        }
        self.avgs = new_avgs;
        self.count = sd.step;
        Ok(())
    }

    /// Writes the averages to `path` (safetensors, atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.state_dict()?.save(path)
    }

    /// Reads averages written by [`Ewa::save`].
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let device = self
            .vars
            .first()
            .map(|v| v.device().clone())
            .unwrap_or(Device::Cpu);
        let sd = StateDict::load(path, &device)?;
        self.load_state_dict(sd).map_err(|e| Error::file(path, e))
    }
}

impl Drop for Ewa {
    /// Puts the raw weights back if an average is still swapped in, so they are never lost.
    fn drop(&mut self) {
        let _ = self.restore();
    }
}

/// One pass over a parameter updating the averages of every decay.
fn update_typed<T: Float>(taus: &[f64], var: &Var, avgs: &[Tensor]) -> Result<()> {
    let coefs: Vec<(T, T)> = taus
        .iter()
        .map(|&tau| (T::of(tau), T::of(1.0 - tau)))
        .collect();
    // The kernel takes four averages at a time: (count, τ₀, 1−τ₀, τ₁, 1−τ₁, …).
    for (avgs, coefs) in avgs.chunks(4).zip(coefs.chunks(4)) {
        let outs: Vec<&Tensor> = avgs.iter().collect();
        let mut scalars = vec![T::of(coefs.len() as f64)];
        scalars.extend(coefs.iter().flat_map(|&(tau, one_minus)| [tau, one_minus]));
        let kernel = Kernel::new("ema_many", &scalars);
        zip_mut_or_kernel::<T>(kernel, &outs, &[var.as_tensor()], |w, i| {
            let theta = i[0];
            for (wk, &(tau, one_minus)) in w.iter_mut().zip(coefs) {
                for (a, &p) in wk.iter_mut().zip(theta) {
                    *a = tau * *a + one_minus * p;
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// `out ← avg · scale` (scale rounded once to the dtype).
fn scale_into<T: Float>(out: &Tensor, avg: &Tensor, scale: f64) -> Result<()> {
    let s = T::of(scale);
    let scalars = [s];
    zip_mut_or_kernel::<T>(Kernel::new("scale_by", &scalars), &[out], &[avg], |o, i| {
        for (x, &a) in o[0].iter_mut().zip(i[0]) {
            *x = a * s;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn var(values: &[f32]) -> Var {
        Var::new(values, &Device::Cpu).unwrap()
    }

    #[test]
    fn constant_sequence_averages_to_the_constant() -> Result<()> {
        let a = Var::new(&[[1.5f64, -2.0], [0.25, 3.0]], &Device::Cpu)?;
        let b = var(&[0.1, 7.0, -3.0]);
        let taus = [0.0, 0.5, 0.9, 0.999];
        let mut ewa = Ewa::new(
            vec![("b".into(), b.clone()), ("a".into(), a.clone())],
            &taus,
        )?;
        assert_eq!(ewa.names(), &["a".to_string(), "b".to_string()]);
        for t in 1..=5 {
            ewa.update()?;
            assert_eq!(ewa.count(), t);
            for &tau in &taus {
                let p = ewa.eval_params(tau)?;
                let got_a = p[0].1.to_vec2::<f64>()?;
                let want_a = a.to_vec2::<f64>()?;
                for (r, w) in got_a.iter().flatten().zip(want_a.iter().flatten()) {
                    assert!((r - w).abs() <= 1e-12 * w.abs(), "τ {tau}: {r} vs {w}");
                }
                let got_b = p[1].1.to_vec1::<f32>()?;
                for (r, w) in got_b.iter().zip(b.to_vec1::<f32>()?) {
                    assert!((r - w).abs() <= 1e-5 * w.abs(), "τ {tau}: {r} vs {w}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn matches_hand_computed_average() -> Result<()> {
        // θ = 1 then 3, τ = 0.5: w = 0.5 then 0.5·0.5 + 0.5·3 = 1.75; bias 1 − 0.25 → 7/3.
        let p = Var::new(&[1.0f64], &Device::Cpu)?;
        let mut ewa = Ewa::new(vec![("p".into(), p.clone())], &[0.5])?;
        ewa.update()?;
        assert_eq!(ewa.eval_params(0.5)?[0].1.to_vec1::<f64>()?, vec![1.0]);
        p.set(&Tensor::new(&[3.0f64], &Device::Cpu)?)?;
        ewa.update()?;
        let got = ewa.eval_params(0.5)?[0].1.to_vec1::<f64>()?[0];
        assert_eq!(got, 1.75 * (1.0 / 0.75));
        Ok(())
    }

    #[test]
    fn swap_in_and_restore_guard_the_raw_weights() -> Result<()> {
        let p = var(&[1.0, 2.0]);
        let mut ewa = Ewa::new(vec![("p".into(), p.clone())], &[0.9, 0.99])?;
        // Nothing to evaluate before the first update.
        assert!(ewa.swap_in(0.9).is_err());
        assert!(ewa.eval_params(0.9).is_err());
        ewa.update()?;
        p.set(&Tensor::new(&[5.0f32, 6.0], &Device::Cpu)?)?;
        ewa.update()?;
        let avg = ewa.eval_params(0.9)?[0].1.to_vec1::<f32>()?;
        ewa.swap_in(0.9)?;
        assert_eq!(ewa.swapped_tau(), Some(0.9));
        assert_eq!(p.to_vec1::<f32>()?, avg);
        assert!(ewa.update().is_err(), "update while swapped must refuse");
        assert!(ewa.swap_in(0.99).is_err(), "double swap must refuse");
        assert_eq!(p.to_vec1::<f32>()?, avg);
        assert!(ewa.restore()?);
        assert!(!ewa.restore()?);
        assert_eq!(p.to_vec1::<f32>()?, vec![5.0, 6.0]);
        // with_swapped restores even when the evaluation fails.
        let seen = ewa.with_swapped(0.99, || Ok(p.to_vec1::<f32>()?))?;
        assert_ne!(seen, vec![5.0, 6.0]);
        assert!(ewa
            .with_swapped(0.99, || -> Result<()> {
                Err(Error::Msg("eval failed".into()))
            })
            .is_err());
        assert_eq!(p.to_vec1::<f32>()?, vec![5.0, 6.0]);
        assert_eq!(ewa.swapped_tau(), None);
        // Dropping while swapped restores too.
        ewa.swap_in(0.9)?;
        drop(ewa);
        assert_eq!(p.to_vec1::<f32>()?, vec![5.0, 6.0]);
        Ok(())
    }

    #[test]
    fn save_load_is_exact_and_continues_identically() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ewa.safetensors");
        let a = Var::new(&[0.3f64, -1.1, 2.7], &Device::Cpu)?;
        let b = var(&[0.7, 1.3]);
        let named = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        let taus = [0.9968, 0.999];
        let mut ewa = Ewa::new(named.clone(), &taus)?;
        let bump = |k: f64| -> Result<()> {
            a.set(&a.affine(1.0 + k, 0.01)?)?;
            b.set(&b.affine(1.0 - k, -0.02)?)?;
            Ok(())
        };
        for k in 0..4 {
            bump(0.1 * k as f64)?;
            ewa.update()?;
        }
        ewa.save(&path)?;
        let mut other = Ewa::new(named.clone(), &taus)?;
        other.load(&path)?;
        assert_eq!(other.count(), 4);
        for &tau in &taus {
            let (x, y) = (ewa.eval_params(tau)?, other.eval_params(tau)?);
            assert_eq!(x[0].1.to_vec1::<f64>()?, y[0].1.to_vec1::<f64>()?);
            assert_eq!(x[1].1.to_vec1::<f32>()?, y[1].1.to_vec1::<f32>()?);
        }
        // Both continue bit-identically.
        bump(0.05)?;
        ewa.update()?;
        other.update()?;
        let (x, y) = (ewa.eval_params(0.999)?, other.eval_params(0.999)?);
        assert_eq!(x[0].1.to_vec1::<f64>()?, y[0].1.to_vec1::<f64>()?);
        assert_eq!(x[1].1.to_vec1::<f32>()?, y[1].1.to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn load_rejects_mismatches() -> Result<()> {
        let a = var(&[1.0, 2.0]);
        let mut ewa = Ewa::new(vec![("a".into(), a.clone())], &[0.9])?;
        ewa.update()?;
        let sd = ewa.state_dict()?;
        let other_taus = Ewa::new(vec![("a".into(), a.clone())], &[0.99])?.load_state_dict(sd);
        assert!(other_taus.unwrap_err().to_string().contains("decays"));
        let sd = ewa.state_dict()?;
        let renamed = Ewa::new(vec![("z".into(), a.clone())], &[0.9])?.load_state_dict(sd);
        assert!(renamed.unwrap_err().to_string().contains("parameter set"));
        let wide = Var::zeros(3, DType::F32, &Device::Cpu)?;
        let sd = ewa.state_dict()?;
        let reshaped = Ewa::new(vec![("a".into(), wide)], &[0.9])?.load_state_dict(sd);
        assert!(matches!(reshaped, Err(Error::Shape { .. })));
        let f64_var = Var::zeros(2, DType::F64, &Device::Cpu)?;
        let sd = ewa.state_dict()?;
        let retyped = Ewa::new(vec![("a".into(), f64_var)], &[0.9])?.load_state_dict(sd);
        assert!(retyped.unwrap_err().to_string().contains("F32"));
        let mut sd = ewa.state_dict()?;
        sd.optimizer = "adamw".into();
        assert!(ewa.load_state_dict(sd).is_err());
        Ok(())
    }

    #[test]
    fn bad_taus_and_params() {
        let a = var(&[1.0]);
        let named = || vec![("a".to_string(), a.clone())];
        for (taus, field) in [
            (vec![], "ewa.taus"),
            (vec![1.0], "ewa.taus[0]"),
            (vec![0.9, -0.1], "ewa.taus[1]"),
            (vec![0.9, 0.9], "ewa.taus[1]"),
        ] {
            match Ewa::new(named(), &taus) {
                Err(Error::Config { field: f, .. }) => assert_eq!(f, field),
                Err(e) => panic!("{taus:?}: {e}"),
                Ok(_) => panic!("{taus:?} accepted"),
            }
        }
        let ewa = Ewa::new(named(), &[0.9]).unwrap();
        assert!(ewa.eval_params(0.5).is_err());
        let ints = Var::from_tensor(&Tensor::new(&[1u32], &Device::Cpu).unwrap()).unwrap();
        assert!(matches!(
            Ewa::new(vec![("i".into(), ints)], &[0.9]),
            Err(Error::DType { .. })
        ));
    }
}
