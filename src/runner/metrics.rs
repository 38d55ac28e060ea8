//! What a run records: one JSON line per logged step (`metrics.jsonl`), the first evaluations
//! below each target loss, and the final `summary.json`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One line of `metrics.jsonl`. Optional fields are omitted when they do not apply (no
/// evaluation at this step, no EWA, the step-0 evaluation before training).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsLine {
    /// Optimizer steps taken.
    pub step: u64,
    /// Training tokens consumed (`step × batch tokens`).
    pub tokens: u64,
    /// Mean cross-entropy of this step's batch (nats/token; z-loss excluded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    /// Mean validation cross-entropy at the raw parameters (Schedule-Free: at its averaged
    /// evaluation point), over the fixed evaluation set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Validation cross-entropy at the bias-corrected EWA parameters, keyed by τ.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub eval_loss_ewa: BTreeMap<String, f64>,
    /// Learning rate of the default group used by this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Global L2 norm of this step's gradient, before clipping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Training seconds so far (evaluation and checkpointing excluded). The only field that
    /// differs between identical runs.
    pub elapsed: f64,
}

/// Names of the fields that measure time (they legitimately differ between identical runs).
pub const TIMING_FIELDS: [&str; 1] = ["elapsed"];

/// The key of an EWA decay in metrics and summaries (`0.99` → `"0.99"`).
pub fn tau_key(tau: f64) -> String {
    format!("{tau}")
}

/// Appends metrics lines, flushed one by one, so a crash loses at most the line being written.
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
    bytes: u64,
    lines: u64,
}

impl MetricsWriter {
    /// Creates (or empties) `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| Error::file(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            bytes: 0,
            lines: 0,
        })
    }

    /// Opens `path` for appending after cutting it back to `bytes` (what a checkpoint
    /// recorded), dropping lines written after that checkpoint. The file must hold at least
    /// `bytes` bytes, ending with a complete line.
    pub fn resume(path: &Path, bytes: u64, lines: u64) -> Result<Self> {
        // Check before cutting anything: a mismatch leaves the file as it was.
        let text = std::fs::read(path).map_err(|e| Error::file(path, e))?;
        if (text.len() as u64) < bytes {
            return Err(Error::file(
                path,
                format!(
                    "holds {} bytes but the checkpoint recorded {bytes}: the metrics file was \
                     truncated or replaced",
                    text.len()
                ),
            ));
        }
        let kept = &text[..bytes as usize];
        let found = kept.iter().filter(|&&b| b == b'\n').count() as u64;
        if found != lines || kept.last().is_some_and(|&b| b != b'\n') {
            return Err(Error::file(
                path,
                format!(
                    "its first {bytes} bytes hold {found} complete lines, the checkpoint \
                     recorded {lines}: the metrics file does not belong to this checkpoint"
                ),
            ));
        }
        let mut file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::file(path, e))?;
        file.set_len(bytes).map_err(|e| Error::file(path, e))?;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::End(0))
            .map_err(|e| Error::file(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            bytes,
            lines,
        })
    }

    /// Appends one line and flushes it.
    pub fn append(&mut self, line: &MetricsLine) -> Result<()> {
        let mut text = serde_json::to_string(line).map_err(|e| Error::file(&self.path, e))?;
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::file(&self.path, e))?;
        self.bytes += text.len() as u64;
        self.lines += 1;
        Ok(())
    }

    /// Forces the written lines to disk (before a checkpoint records the length).
    pub fn sync(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::file(&self.path, e))
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Lines written so far.
    pub fn lines(&self) -> u64 {
        self.lines
    }
}

/// Reads every line of a `metrics.jsonl`.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsLine>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::file(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// Where an evaluation first went below a target.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Crossing {
    /// The step of that evaluation.
    pub step: u64,
    /// Training tokens at that step.
    pub tokens: u64,
    /// The loss it measured.
    pub loss: f64,
}

/// Steps and tokens to one target loss: the first evaluation strictly below it (the CBS
/// paper's steps-to-target), for the raw and each EWA parameters; `None` = not reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetResult {
    /// The target loss.
    pub target: f64,
    /// First crossing at the raw (or Schedule-Free evaluation) parameters.
    pub raw: Option<Crossing>,
    /// First crossing at each EWA's parameters, keyed by τ.
    pub ewa: BTreeMap<String, Option<Crossing>>,
}

/// Tracks first crossings of the target losses as evaluations come in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetTracker {
    /// One entry per target, in config order.
    pub targets: Vec<TargetResult>,
}

impl TargetTracker {
    /// A tracker for `targets` and EWA decays `taus`.
    pub fn new(targets: &[f64], taus: &[f64]) -> Self {
        Self {
            targets: targets
                .iter()
                .map(|&target| TargetResult {
                    target,
                    raw: None,
                    ewa: taus.iter().map(|&t| (tau_key(t), None)).collect(),
                })
                .collect(),
        }
    }

    /// Records an evaluation line.
    pub fn observe(&mut self, line: &MetricsLine) {
        let at = |loss: f64| Crossing {
            step: line.step,
            tokens: line.tokens,
            loss,
        };
        for t in &mut self.targets {
            if let Some(l) = line.eval_loss {
                if t.raw.is_none() && l < t.target {
                    t.raw = Some(at(l));
                }
            }
            for (k, &l) in &line.eval_loss_ewa {
                if let Some(slot) = t.ewa.get_mut(k) {
                    if slot.is_none() && l < t.target {
                        *slot = Some(at(l));
                    }
                }
            }
        }
    }
}

/// Final losses of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalLosses {
    /// The last step's training loss.
    pub train_loss: Option<f64>,
    /// The last evaluation at the raw parameters.
    pub eval_loss: Option<f64>,
    /// The last evaluation at each EWA's parameters.
    pub eval_loss_ewa: BTreeMap<String, f64>,
    /// The lowest raw evaluation loss of the run.
    pub best_eval_loss: Option<f64>,
}

/// Throughput, over the whole run (a resumed run adds up its parts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// Seconds spent training (evaluation and checkpointing excluded).
    pub train_seconds: f64,
    /// Seconds spent evaluating.
    pub eval_seconds: f64,
    /// `train_seconds / steps`.
    pub seconds_per_step: f64,
    /// Training tokens per training second.
    pub tokens_per_second: f64,
}

/// How the run used its data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataUse {
    /// Where the data came from.
    pub source: String,
    /// Tokens in one pass over the training split (whole sequences only).
    pub tokens_per_epoch: u64,
    /// Whether any training sequence was served twice (the run went past one pass).
    pub repeated: bool,
    /// Sequences served that an earlier pass had already served.
    pub sequences_repeated: u64,
    /// Passes begun over the training data (1 for a single-pass run).
    pub epochs: u64,
    /// Entropy of the training split's unigram distribution (nats): the loss of the best model
    /// that ignores context.
    pub unigram_entropy: f64,
}

/// `summary.json`: what a finished run reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Optimizer steps taken.
    pub steps: u64,
    /// Training tokens consumed.
    pub tokens: u64,
    /// Final and best losses.
    pub final_losses: FinalLosses,
    /// Steps and tokens to each target loss.
    pub targets: Vec<TargetResult>,
    /// Time and throughput (the only fields that differ between identical runs).
    pub timing: Timing,
    /// Data use.
    pub data: DataUse,
    /// Total model parameters.
    pub params: usize,
    /// Non-embedding parameters (12·L·d² for the decoder).
    pub non_embedding_params: usize,
    /// Optimizer counters (skipped steps, eigendecomposition failures …).
    pub diagnostics: BTreeMap<String, f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: u64, eval: Option<f64>, ewa: &[(f64, f64)]) -> MetricsLine {
        MetricsLine {
            step,
            tokens: step * 10,
            train_loss: Some(1.0),
            eval_loss: eval,
            eval_loss_ewa: ewa.iter().map(|&(t, l)| (tau_key(t), l)).collect(),
            lr: Some(0.1),
            grad_norm: Some(1.0),
            elapsed: 0.0,
        }
    }

    #[test]
    fn first_crossing_per_target_and_average() {
        let mut tr = TargetTracker::new(&[2.0, 1.0], &[0.9]);
        tr.observe(&line(1, Some(2.5), &[(0.9, 2.2)]));
        tr.observe(&line(2, Some(1.9), &[(0.9, 2.1)]));
        tr.observe(&line(3, Some(1.5), &[(0.9, 1.95)]));
        tr.observe(&line(4, Some(2.0), &[(0.9, 0.5)]));
        let t0 = &tr.targets[0];
        assert_eq!(t0.raw.unwrap().step, 2);
        assert_eq!(t0.ewa["0.9"].unwrap().step, 3);
        assert_eq!(tr.targets[1].raw, None);
        assert_eq!(tr.targets[1].ewa["0.9"].unwrap().tokens, 40);
    }

    #[test]
    fn writer_appends_and_resumes_at_a_recorded_length() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.jsonl");
        let mut w = MetricsWriter::create(&p).unwrap();
        w.append(&line(1, None, &[])).unwrap();
        let (b, n) = (w.bytes(), w.lines());
        w.append(&line(2, Some(1.0), &[(0.5, 1.0)])).unwrap();
        drop(w);
        assert_eq!(read_metrics(&p).unwrap().len(), 2);
        let mut w = MetricsWriter::resume(&p, b, n).unwrap();
        w.append(&line(3, None, &[])).unwrap();
        let back = read_metrics(&p).unwrap();
        assert_eq!(back.iter().map(|l| l.step).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(back[0], line(1, None, &[]));
        let before = std::fs::read(&p).unwrap();
        assert!(MetricsWriter::resume(&p, 10_000, 1).is_err());
        assert!(MetricsWriter::resume(&p, 3, 1).is_err());
        assert!(MetricsWriter::resume(&p, b, 5).is_err());
        assert_eq!(
            std::fs::read(&p).unwrap(),
            before,
            "a failed resume changes nothing"
        );
    }
}
