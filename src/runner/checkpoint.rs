//! Checkpoints: everything a run needs to continue bit-identically, in one directory per step.
//!
//! ```text
//! <run>/checkpoints/step-0000000100/
//!     model.safetensors       parameters, by name
//!     optimizer.safetensors   Optimizer::state_dict (every rule's state, step, lr factor)
//!     ewa.safetensors         the EWA averages and their count (when EWA is on)
//!     manifest.json           written last: step, data position, metrics length, timers,
//!                             target crossings, the resolved config, parameter shapes, and
//!                             the size and CRC-32 of every file above
//! ```
//!
//! Every file is written atomically and the manifest last, so a directory without a manifest
//! is a checkpoint torn by a crash: resuming skips it (with a note) and takes the previous one,
//! which is deleted only once a newer checkpoint is complete. A manifest whose files do not
//! match their recorded size and checksum is a corrupt checkpoint and an error.
//!
//! The only randomness in a run besides the data order (restored from the sampler position) is
//! Sophia's label sampling, drawn from a ChaCha12 stream keyed by (seed, step): it needs no
//! saved state.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::SamplerPosition;
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::runner::metrics::{MetricsLine, TargetTracker};

/// The manifest's `format` tag.
pub const CHECKPOINT_FORMAT: &str = "optlab-checkpoint-v1";
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// Model parameters' file name.
pub const MODEL_FILE: &str = "model.safetensors";
/// Optimizer state's file name.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// EWA state's file name.
pub const EWA_FILE: &str = "ewa.safetensors";

/// Size and checksum of one checkpoint file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Length in bytes.
    pub bytes: u64,
    /// CRC-32 (IEEE) of the contents.
    pub crc32: u32,
}

impl FileEntry {
    /// The entry of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            bytes: bytes.len() as u64,
            crc32: crc32fast::hash(bytes),
        }
    }
}

/// The loop's own state at a checkpoint (besides model, optimizer and EWA).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Training tokens consumed.
    pub tokens: u64,
    /// Where the training data stands.
    pub sampler: SamplerPosition,
    /// Length of `metrics.jsonl` in bytes and lines at this point.
    pub metrics_bytes: u64,
    /// Lines of `metrics.jsonl` at this point.
    pub metrics_lines: u64,
    /// Training seconds so far.
    pub train_seconds: f64,
    /// Evaluation seconds so far.
    pub eval_seconds: f64,
    /// First crossings of the target losses so far.
    pub tracker: TargetTracker,
    /// The last metrics line written (for the summary's final losses).
    pub last_line: Option<MetricsLine>,
    /// The last line with an evaluation.
    pub last_eval: Option<MetricsLine>,
    /// The lowest raw evaluation loss so far.
    pub best_eval_loss: Option<f64>,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`CHECKPOINT_FORMAT`].
    pub format: String,
    /// The loop state.
    pub state: LoopState,
    /// The resolved run config (TOML) the checkpoint belongs to.
    pub config: String,
    /// Parameter names and shapes, sorted by name.
    pub params: Vec<(String, Vec<usize>)>,
    /// How the run's random streams are derived (documentation; nothing to restore).
    pub rng: String,
    /// Every other file of the checkpoint.
    pub files: BTreeMap<String, FileEntry>,
}

/// The directory holding a run's checkpoints.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn step_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(format!("step-{step:010}"))
}

fn parse_step(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Checkpoint directories under `run_dir`, newest first.
fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = checkpoints_dir(run_dir);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&root).map_err(|e| Error::file(&root, e))? {
        let entry = entry.map_err(|e| Error::file(&root, e))?;
        if let Some(step) = entry.file_name().to_str().and_then(parse_step) {
            if entry.path().is_dir() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    Ok(out)
}

/// Writes a checkpoint: `files` (name, bytes) first, each atomically, then the manifest; then
/// removes every other checkpoint directory. Returns the checkpoint's directory.
pub fn write(
    run_dir: &Path,
    mut manifest: Manifest,
    files: Vec<(&'static str, Vec<u8>)>,
) -> Result<PathBuf> {
    let dir = step_dir(run_dir, manifest.state.step);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::file(&dir, e))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, e))?;
    manifest.files.clear();
    let written = (|| -> Result<()> {
        for (name, bytes) in &files {
            write_atomic(&dir.join(name), bytes)?;
            manifest
                .files
                .insert(name.to_string(), FileEntry::of(bytes));
        }
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::file(&dir, e))?;
        write_atomic(&dir.join(MANIFEST), &json)
    })();
    if let Err(e) = written {
        // A full disk or a failing device: give the space of the torn checkpoint back at once
        // (it would only be skipped on resume); the previous checkpoint is untouched.
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    remove_others(run_dir, &dir)?;
    Ok(dir)
}

/// Removes every checkpoint directory under `run_dir` except `keep`: older complete ones and
/// torn ones. A writer killed after a checkpoint's manifest and before this cleanup leaves the
/// previous checkpoint behind; resuming calls it with the checkpoint it loaded.
pub fn remove_others(run_dir: &Path, keep: &Path) -> Result<()> {
    for (_, other) in list(run_dir)? {
        if other != keep {
            std::fs::remove_dir_all(&other).map_err(|e| Error::file(&other, e))?;
        }
    }
    Ok(())
}

/// A checkpoint read back and verified.
#[derive(Debug)]
pub struct Loaded {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Its files' contents, by name (checked against the manifest).
    pub files: HashMap<String, Vec<u8>>,
    /// Newer checkpoint directories skipped because they were torn (no manifest).
    pub skipped: Vec<PathBuf>,
}

/// The newest complete checkpoint under `run_dir`, verified; `None` if there is none.
/// Directories without a manifest (torn by a crash) are skipped and listed in
/// [`Loaded::skipped`]; a manifest that does not parse, or files that do not match it, are an
/// error naming the file.
pub fn latest(run_dir: &Path) -> Result<Option<Loaded>> {
    let mut skipped = Vec::new();
    for (_, dir) in list(run_dir)? {
        let mpath = dir.join(MANIFEST);
        if !mpath.is_file() {
            skipped.push(dir);
            continue;
        }
        let text = std::fs::read(&mpath).map_err(|e| Error::file(&mpath, e))?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| Error::file(&mpath, format!("corrupt checkpoint manifest: {e}")))?;
        if manifest.format != CHECKPOINT_FORMAT {
            return Err(Error::file(
                &mpath,
                format!(
                    "checkpoint format `{}`, expected `{CHECKPOINT_FORMAT}`",
                    manifest.format
                ),
            ));
        }
        let mut files = HashMap::new();
        for (name, entry) in &manifest.files {
            // Only files of the checkpoint's own directory: a manifest naming a path elsewhere
            // (`../x`, `/dev/zero`) is corrupt, not an instruction to read it.
            let plain = {
                let mut parts = Path::new(name).components();
                matches!(
                    (parts.next(), parts.next()),
                    (Some(std::path::Component::Normal(_)), None)
                )
            };
            if !plain {
                return Err(Error::file(
                    &mpath,
                    format!(
                        "corrupt checkpoint manifest: lists `{name}`, not a file name of the \
                         checkpoint directory"
                    ),
                ));
            }
            let p = dir.join(name);
            // The size first: a file larger than recorded is not read into memory.
            let size = std::fs::metadata(&p)
                .map_err(|e| {
                    Error::file(&p, format!("checkpoint file listed in the manifest: {e}"))
                })?
                .len();
            if size != entry.bytes {
                return Err(Error::file(
                    &p,
                    format!(
                        "corrupt checkpoint file: {size} bytes, the manifest records {} bytes",
                        entry.bytes
                    ),
                ));
            }
            let bytes = std::fs::read(&p).map_err(|e| {
                Error::file(&p, format!("checkpoint file listed in the manifest: {e}"))
            })?;
            let found = FileEntry::of(&bytes);
            if found != *entry {
                return Err(Error::file(
                    &p,
                    format!(
                        "corrupt checkpoint file: {} bytes with CRC-32 {:08x}, the manifest \
                         records {} bytes with CRC-32 {:08x}",
                        found.bytes, found.crc32, entry.bytes, entry.crc32
                    ),
                ));
            }
            files.insert(name.clone(), bytes);
        }
        return Ok(Some(Loaded {
            dir,
            manifest,
            files,
            skipped,
        }));
    }
    Ok(None)
}

/// Serializes named tensors (parameters) to safetensors bytes.
pub fn tensors_to_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::serialize(views, None).map_err(|e| Error::State(e.to_string()))
}

/// Parses safetensors bytes into named tensors on `device`.
pub fn tensors_from_bytes(bytes: &[u8], device: &Device) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load_buffer(bytes, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(step: u64) -> Manifest {
        Manifest {
            format: CHECKPOINT_FORMAT.into(),
            state: LoopState {
                step,
                tokens: step * 4,
                sampler: SamplerPosition::default(),
                metrics_bytes: 0,
                metrics_lines: 0,
                train_seconds: 0.0,
                eval_seconds: 0.0,
                tracker: TargetTracker::new(&[], &[]),
                last_line: None,
                last_eval: None,
                best_eval_loss: None,
            },
            config: String::new(),
            params: vec![],
            rng: String::new(),
            files: BTreeMap::new(),
        }
    }

    #[test]
    fn newest_complete_checkpoint_wins_and_torn_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        assert!(latest(run).unwrap().is_none());
        write(run, manifest(5), vec![("a.bin", vec![1, 2, 3])]).unwrap();
        write(run, manifest(10), vec![("a.bin", vec![4, 5])]).unwrap();
        assert_eq!(list(run).unwrap().len(), 1, "older checkpoints are removed");
        // A torn newer checkpoint: files but no manifest.
        let torn = step_dir(run, 15);
        std::fs::create_dir_all(&torn).unwrap();
        std::fs::write(torn.join("a.bin"), [9]).unwrap();
        let got = latest(run).unwrap().unwrap();
        assert_eq!(got.manifest.state.step, 10);
        assert_eq!(got.files["a.bin"], vec![4, 5]);
        assert_eq!(got.skipped, vec![torn]);
        // Corruption is an error naming the file.
        std::fs::write(step_dir(run, 10).join("a.bin"), [4, 6]).unwrap();
        let err = latest(run).unwrap_err().to_string();
        assert!(err.contains("a.bin") && err.contains("corrupt"), "{err}");
        std::fs::write(step_dir(run, 10).join(MANIFEST), b"{ not json").unwrap();
        let err = latest(run).unwrap_err().to_string();
        assert!(err.contains("manifest"), "{err}");
    }

    #[test]
    fn tensors_round_trip() {
        let t = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap();
        let bytes = tensors_to_bytes(&[("w".into(), t.clone())]).unwrap();
        let back = tensors_from_bytes(&bytes, &Device::Cpu).unwrap();
        assert_eq!(
            back["w"].to_vec2::<f32>().unwrap(),
            t.to_vec2::<f32>().unwrap()
        );
    }
}
