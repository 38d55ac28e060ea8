//! Optimizer state: tensors and scalars per parameter, keyed by name, saved as safetensors.
//!
//! A state file holds one tensor per `"<param>.<field>"` (scalars as 0-D f64 tensors) and a
//! header (safetensors metadata) naming the format, the optimizer, its config and the step. Keys
//! never depend on positions or code layout, so reordering parameters or code never breaks a
//! checkpoint; loading state for another optimizer or another parameter set is an error.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, TensorView};

use crate::error::{Error, Result};

/// Format tag written into every state file.
pub const STATE_FORMAT: &str = "optlab-state-v1";

/// The state of one parameter (or of one group, for group-wide counters).
#[derive(Debug, Clone, Default)]
pub struct State {
    /// Named tensors (moments, factors, bases …), on the parameter's device.
    pub tensors: BTreeMap<String, Tensor>,
    /// Named scalars (step counters, running sums …).
    pub scalars: BTreeMap<String, f64>,
}

impl State {
    /// True when nothing has been stored yet (lazy initialization happens on the first step).
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty() && self.scalars.is_empty()
    }

    /// The tensor `field`, which must exist.
    pub fn tensor(&self, field: &str) -> Result<&Tensor> {
        self.tensors
            .get(field)
            .ok_or_else(|| Error::State(format!("missing state tensor `{field}`")))
    }

    /// The tensor `field`, created as zeros like `like` if absent.
    pub fn tensor_or_zeros(&mut self, field: &str, like: &Tensor) -> Result<&Tensor> {
        if !self.tensors.contains_key(field) {
            self.tensors.insert(field.to_string(), like.zeros_like()?);
        }
        Ok(&self.tensors[field])
    }

    /// The tensor `field`, created as zeros of `shape` and `dtype` on `device` if absent.
    pub fn tensor_or_zeros_shaped(
        &mut self,
        field: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<&Tensor> {
        if !self.tensors.contains_key(field) {
            self.tensors
                .insert(field.to_string(), Tensor::zeros(shape, dtype, device)?);
        }
        Ok(&self.tensors[field])
    }

    /// The scalar `field`, 0 if absent.
    pub fn scalar(&self, field: &str) -> f64 {
        self.scalars.get(field).copied().unwrap_or(0.0)
    }

    /// Sets the scalar `field`.
    pub fn set_scalar(&mut self, field: &str, value: f64) {
        self.scalars.insert(field.to_string(), value);
    }

    /// Increments the per-parameter step counter `step` and returns the new value (1 on the
    /// first call).
    pub fn next_step(&mut self) -> u64 {
        let t = self.scalar("step") + 1.0;
        self.set_scalar("step", t);
        t as u64
    }

    /// A deep copy (tensors copied, so the clone evolves independently).
    pub fn deep_clone(&self) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        for (k, t) in &self.tensors {
            tensors.insert(k.clone(), t.copy()?);
        }
        Ok(Self {
            tensors,
            scalars: self.scalars.clone(),
        })
    }
}

/// Every state of an optimizer plus its identity, ready to be written to or read from disk.
#[derive(Debug, Clone, Default)]
pub struct StateDict {
    /// Optimizer name (e.g. `adamw`).
    pub optimizer: String,
    /// The optimizer's config, as JSON.
    pub config: String,
    /// Number of completed steps.
    pub step: u64,
    /// State per key (parameter name, or `__group<i>` for group-wide state).
    pub entries: BTreeMap<String, State>,
    /// Free-form extra metadata (e.g. current lr), stored in the header.
    pub extra: BTreeMap<String, String>,
}

fn dtype_to_st(dtype: DType) -> Result<StDtype> {
    Ok(match dtype {
        DType::F32 => StDtype::F32,
        DType::F64 => StDtype::F64,
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
        DType::U32 => StDtype::U32,
        DType::I64 => StDtype::I64,
        DType::U8 => StDtype::U8,
        other => return Err(Error::State(format!("cannot save dtype {other:?}"))),
    })
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.to_device(&Device::Cpu)?.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::U32 => t
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::I64 => t
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::U8 => t.to_vec1::<u8>()?,
        other => return Err(Error::State(format!("cannot save dtype {other:?}"))),
    })
}

/// The same safetensors bytes with the header's keys in sorted order: `safetensors` writes the
/// metadata in hash-map order, which differs from one call to the next, so that the same state
/// would give different files. Returns the bytes unchanged if the header does not parse or
/// would not fit its space.
fn sorted_header(mut bytes: Vec<u8>) -> Vec<u8> {
    let Some(n) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize)
    else {
        return bytes;
    };
    let Some(header) = bytes.get(8..8usize.saturating_add(n)) else {
        return bytes;
    };
    let Ok(mut top) = serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(header) else {
        return bytes;
    };
    if let Some(meta) = top.get_mut("__metadata__") {
        match serde_json::from_value::<BTreeMap<String, String>>(meta.take())
            .and_then(serde_json::to_value)
        {
            Ok(sorted) => *meta = sorted,
            Err(_) => return bytes,
        }
    }
    match serde_json::to_string(&top) {
        Ok(text) if text.len() <= n => {
            bytes[8..8 + text.len()].copy_from_slice(text.as_bytes());
            bytes[8 + text.len()..8 + n].fill(b' ');
            bytes
        }
        _ => bytes,
    }
}

impl StateDict {
    /// Serializes to safetensors bytes (the same state always gives the same bytes).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut owned: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut scalar_keys = Vec::new();
        for (key, state) in &self.entries {
            for (field, t) in &state.tensors {
                owned.push((
                    format!("{key}.{field}"),
                    dtype_to_st(t.dtype())?,
                    t.dims().to_vec(),
                    tensor_bytes(t)?,
                ));
            }
            for (field, v) in &state.scalars {
                let name = format!("{key}.{field}");
                scalar_keys.push(name.clone());
                owned.push((name, StDtype::F64, vec![], v.to_le_bytes().to_vec()));
            }
        }
        let mut layout: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (key, state) in &self.entries {
            let mut fields: Vec<String> = state.tensors.keys().cloned().collect();
            fields.extend(state.scalars.keys().map(|s| format!("#{s}")));
            layout.insert(key.clone(), fields);
        }
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), STATE_FORMAT.to_string());
        meta.insert("optimizer".to_string(), self.optimizer.clone());
        meta.insert("config".to_string(), self.config.clone());
        meta.insert("step".to_string(), self.step.to_string());
        meta.insert(
            "layout".to_string(),
            serde_json::to_string(&layout).map_err(|e| Error::State(e.to_string()))?,
        );
        meta.insert(
            "extra".to_string(),
            serde_json::to_string(&self.extra).map_err(|e| Error::State(e.to_string()))?,
        );
        let views: Vec<(String, TensorView<'_>)> = owned
            .iter()
            .map(|(n, d, s, b)| {
                TensorView::new(*d, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::State(format!("{n}: {e}")))
            })
            .collect::<Result<_>>()?;
        let bytes =
            safetensors::serialize(views, Some(meta)).map_err(|e| Error::State(e.to_string()))?;
        Ok(sorted_header(bytes))
    }

    /// Parses safetensors bytes; tensors land on `device`.
    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::State(format!("not a safetensors state file: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| Error::State(format!("corrupt state file: {e}")))?;
        let meta = meta
            .metadata()
            .clone()
            .ok_or_else(|| Error::State("state file has no header".into()))?;
        let get = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| Error::State(format!("state header lacks `{k}`")))
        };
        let format = get("format")?;
        if format != STATE_FORMAT {
            return Err(Error::State(format!(
                "unknown state format `{format}` (expected {STATE_FORMAT})"
            )));
        }
        let layout: BTreeMap<String, Vec<String>> = serde_json::from_str(&get("layout")?)
            .map_err(|e| Error::State(format!("bad layout header: {e}")))?;
        let extra: BTreeMap<String, String> = serde_json::from_str(&get("extra")?)
            .map_err(|e| Error::State(format!("bad extra header: {e}")))?;
        let step: u64 = get("step")?
            .parse()
            .map_err(|e| Error::State(format!("bad step header: {e}")))?;
        let mut entries = BTreeMap::new();
        for (key, fields) in layout {
            let mut state = State::default();
            for field in fields {
                let (is_scalar, field) = match field.strip_prefix('#') {
                    Some(f) => (true, f.to_string()),
                    None => (false, field),
                };
                let name = format!("{key}.{field}");
                let view = st
                    .tensor(&name)
                    .map_err(|e| Error::State(format!("missing tensor `{name}`: {e}")))?;
                if is_scalar {
                    let b: [u8; 8] = view
                        .data()
                        .try_into()
                        .map_err(|_| Error::State(format!("scalar `{name}` is not 8 bytes")))?;
                    state.scalars.insert(field, f64::from_le_bytes(b));
                } else {
                    state
                        .tensors
                        .insert(field, view_to_tensor(&name, &view, device)?);
                }
            }
            entries.insert(key, state);
        }
        Ok(Self {
            optimizer: get("optimizer")?,
            config: get("config")?,
            step,
            entries,
            extra,
        })
    }

    /// Writes atomically: to a temporary file beside `path`, then renamed over it.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::io::write_atomic(path, &self.to_bytes()?)
    }

    /// Reads a state file written by [`StateDict::save`].
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
        Self::from_bytes(&bytes, device).map_err(|e| Error::file(path, e))
    }
}

fn view_to_tensor(name: &str, view: &TensorView<'_>, device: &Device) -> Result<Tensor> {
    let shape = view.shape().to_vec();
    let data = view.data();
    let t = match view.dtype() {
        StDtype::F32 => Tensor::from_vec(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>(),
            shape,
            device,
        )?,
        StDtype::F64 => Tensor::from_vec(
            data.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>(),
            shape,
            device,
        )?,
        StDtype::BF16 => Tensor::from_vec(
            data.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>(),
            shape,
            device,
        )?,
        StDtype::F16 => Tensor::from_vec(
            data.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>(),
            shape,
            device,
        )?,
        StDtype::U32 => Tensor::from_vec(
            data.chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>(),
            shape,
            device,
        )?,
        StDtype::I64 => Tensor::from_vec(
            data.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>(),
            shape,
            device,
        )?,
        StDtype::U8 => Tensor::from_vec(data.to_vec(), shape, device)?,
        other => {
            return Err(Error::State(format!(
                "tensor `{name}` has unsupported dtype {other:?}"
            )))
        }
    };
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same state gives the same bytes every time (the metadata once came out in hash-map
    /// order, different from one call to the next).
    #[test]
    fn the_same_state_gives_the_same_bytes() {
        let mut st = State::default();
        st.set_scalar("step", 3.0);
        st.tensors.insert(
            "exp_avg".into(),
            Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap(),
        );
        let mut entries = BTreeMap::new();
        entries.insert("w".to_string(), st);
        let mut extra = BTreeMap::new();
        for k in ["a", "b", "c", "d"] {
            extra.insert(k.to_string(), k.repeat(3));
        }
        let sd = StateDict {
            optimizer: "adamw".into(),
            config: "{}".into(),
            step: 3,
            entries,
            extra,
        };
        let first = sd.to_bytes().unwrap();
        for _ in 0..20 {
            assert!(sd.to_bytes().unwrap() == first);
        }
        let back = StateDict::from_bytes(&first, &Device::Cpu).unwrap();
        assert_eq!((back.step, back.extra), (3, sd.extra.clone()));
    }
}
