//! Training data: an embedded English corpus, nanoGPT-style token shards, and deterministic
//! single-pass batching with a held-out validation split.
//!
//! ```no_run
//! use optlab::data::{DataConfig, Dataset};
//! let data = Dataset::load(&DataConfig::default())?; // embedded Brown corpus, byte tokens
//! data.check_model(256, 128)?;                        // vocab and context fit, before training
//! let mut train = data.sampler(128, 32, 0)?;          // seed 0, 32 sequences of 128 tokens
//! let batch = train.next_batch();
//! let eval = data.eval_batches(128, 32, 65_536)?;     // the same evaluation set every time
//! # Ok::<(), optlab::Error>(())
//! ```

pub mod corpus;
pub mod sampler;
pub mod tokenizer;
pub mod tokens;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use sampler::{eval_batches, windows, Batch, Sampler, SamplerPosition};
pub use tokenizer::Tokenizer;
pub use tokens::{ShardMeta, Tokens};

/// Where the data comes from. With `dir` unset, the embedded corpus is tokenized in memory and
/// split; with `dir` set, `train.bin`/`val.bin` there are used as they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Directory with `train.bin`, `val.bin` (little-endian u16 tokens) and optionally
    /// `meta.json` (as the `prepare` binary writes them).
    pub dir: Option<PathBuf>,
    /// Embedded corpus to use when `dir` is unset.
    pub corpus: String,
    /// Tokenizer for the embedded corpus (`byte` or `gpt2`).
    pub tokenizer: Tokenizer,
    /// Share of the embedded corpus held out for validation, in (0, 0.5].
    pub val_fraction: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dir: None,
            corpus: "brown".into(),
            tokenizer: Tokenizer::Byte,
            val_fraction: 0.1,
        }
    }
}

impl DataConfig {
    /// Checks the fields; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if !(self.val_fraction > 0.0 && self.val_fraction <= 0.5) {
            return Err(Error::config(
                "data.val_fraction",
                format!("must lie in (0, 0.5], got {}", self.val_fraction),
            ));
        }
        let default = DataConfig::default();
        if self.dir.is_some() {
            if self.tokenizer != default.tokenizer || self.val_fraction != default.val_fraction {
                return Err(Error::config(
                    "data.dir",
                    "shards come tokenized and split: `data.tokenizer` and `data.val_fraction` \
                     apply only to the embedded corpus (use the `prepare` binary for shards)",
                ));
            }
        } else if !corpus::EMBEDDED.contains(&self.corpus.as_str()) {
            return Err(Error::config(
                "data.corpus",
                format!(
                    "unknown embedded corpus `{}`; known: {}",
                    self.corpus,
                    corpus::EMBEDDED.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

/// Train and validation token streams with their vocabulary.
#[derive(Debug, Clone)]
pub struct Dataset {
    train: Tokens,
    val: Tokens,
    vocab_size: usize,
    tokenizer: String,
    source: String,
}

/// Chunks the stream is cut into for the train/validation split.
pub const SPLIT_CHUNKS: usize = 100;

/// Splits a token stream into train and validation parts: the stream is cut into
/// [`SPLIT_CHUNKS`] equal contiguous chunks and `round(SPLIT_CHUNKS · val_fraction)` of them (at
/// least one), evenly spaced, form the validation split. Evenly spaced chunks make validation
/// cover the whole corpus (the Brown corpus is ordered by genre) while keeping long contiguous
/// runs; no token is in both parts.
pub fn split_train_val(tokens: &[u16], val_fraction: f64) -> Result<(Vec<u16>, Vec<u16>)> {
    if !(val_fraction > 0.0 && val_fraction <= 0.5) {
        return Err(Error::config(
            "data.val_fraction",
            format!("must lie in (0, 0.5], got {val_fraction}"),
        ));
    }
    let k = SPLIT_CHUNKS;
    let m = ((k as f64 * val_fraction).round() as usize).clamp(1, k / 2);
    let n = tokens.len();
    let mut train = Vec::with_capacity(n);
    let mut val = Vec::with_capacity(n * m / k + 1);
    for j in 0..k {
        let (a, b) = (j * n / k, (j + 1) * n / k);
        // Chunk j is validation when the count of validation chunks steps up at j.
        if (j + 1) * m / k > j * m / k {
            val.extend_from_slice(&tokens[a..b]);
        } else {
            train.extend_from_slice(&tokens[a..b]);
        }
    }
    Ok((train, val))
}

impl Dataset {
    /// Loads what `cfg` names (validating it first).
    pub fn load(cfg: &DataConfig) -> Result<Self> {
        cfg.validate()?;
        match &cfg.dir {
            Some(dir) => Self::from_shards(dir),
            None => Self::embedded(&cfg.corpus, cfg.tokenizer, cfg.val_fraction),
        }
    }

    /// The embedded corpus `name`, tokenized and split (see [`split_train_val`]).
    pub fn embedded(name: &str, tokenizer: Tokenizer, val_fraction: f64) -> Result<Self> {
        let text = corpus::embedded_text(name)?;
        let docs = corpus::documents(&text);
        let ids = tokenizer.encode_documents(&docs, &|i| format!("{name} document {i}"))?;
        let (train, val) = split_train_val(&ids, val_fraction)?;
        Self::from_tokens(
            train,
            val,
            tokenizer.vocab_size(),
            tokenizer.name(),
            format!("embedded:{name}"),
        )
    }

    /// In-memory streams. Every id must be below `vocab_size`; both streams must be non-empty.
    pub fn from_tokens(
        train: Vec<u16>,
        val: Vec<u16>,
        vocab_size: usize,
        tokenizer: &str,
        source: String,
    ) -> Result<Self> {
        let (train, val) = (Tokens::from_vec(train), Tokens::from_vec(val));
        for (what, t) in [("train", &train), ("validation", &val)] {
            check_ids(what, t, vocab_size, &source)?;
        }
        Ok(Self {
            train,
            val,
            vocab_size,
            tokenizer: tokenizer.into(),
            source,
        })
    }

    /// Memory-maps `dir/train.bin` and `dir/val.bin`. With `dir/meta.json`, its token counts
    /// and vocabulary are checked against the files (a truncated shard is an error); without
    /// it, the vocabulary is the largest id + 1.
    pub fn from_shards(dir: &Path) -> Result<Self> {
        let (train_path, val_path, meta_path) = tokens::shard_paths(dir);
        for p in [&train_path, &val_path] {
            if !p.is_file() {
                return Err(Error::file(
                    p,
                    "missing: a shard directory holds train.bin and val.bin (see the `prepare` \
                     binary)",
                ));
            }
        }
        let train = Tokens::map(&train_path)?;
        let val = Tokens::map(&val_path)?;
        let source = dir.display().to_string();
        let (vocab_size, tokenizer) = if meta_path.is_file() {
            let text =
                std::fs::read_to_string(&meta_path).map_err(|e| Error::file(&meta_path, e))?;
            let meta: ShardMeta =
                serde_json::from_str(&text).map_err(|e| Error::file(&meta_path, e))?;
            for (p, t, declared) in [
                (&train_path, &train, meta.train_tokens),
                (&val_path, &val, meta.val_tokens),
            ] {
                if t.len() as u64 != declared {
                    return Err(Error::file(
                        p,
                        format!(
                            "holds {} tokens but meta.json declares {declared}: the shard is \
                             truncated or does not belong to this meta.json",
                            t.len()
                        ),
                    ));
                }
            }
            if meta.vocab_size == 0 || meta.vocab_size > 1 << 16 {
                return Err(Error::file(
                    &meta_path,
                    format!(
                        "vocab_size {} does not fit u16 token shards (1..=65536)",
                        meta.vocab_size
                    ),
                ));
            }
            for (what, t) in [("train", &train), ("validation", &val)] {
                check_ids(what, t, meta.vocab_size, &source)?;
            }
            (meta.vocab_size, meta.tokenizer)
        } else {
            let max = train.max_token().max(val.max_token()).unwrap_or(0);
            (usize::from(max) + 1, "unknown".to_string())
        };
        Ok(Self {
            train,
            val,
            vocab_size,
            tokenizer,
            source,
        })
    }

    /// Training tokens.
    pub fn train(&self) -> &Tokens {
        &self.train
    }

    /// Validation tokens (never served by [`sampler`](Self::sampler)).
    pub fn val(&self) -> &Tokens {
        &self.val
    }

    /// Vocabulary size: every id is below it; the model's must be at least this.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Tokenizer name (`byte`, `gpt2`, or `unknown` for shards without `meta.json`).
    pub fn tokenizer(&self) -> &str {
        &self.tokenizer
    }

    /// Where the data came from (`embedded:brown` or the shard directory).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Checks, before training, that a model with `vocab_size` ids and `context` positions can
    /// train on this data: the data's ids fit the model's vocabulary and both splits hold at
    /// least one sequence.
    pub fn check_model(&self, vocab_size: usize, context: usize) -> Result<()> {
        if self.vocab_size > vocab_size {
            return Err(Error::config(
                "model.vocab_size",
                format!(
                    "{vocab_size} is smaller than the data's vocabulary {} (tokenizer {}, {})",
                    self.vocab_size, self.tokenizer, self.source
                ),
            ));
        }
        for (what, t) in [("training", &self.train), ("validation", &self.val)] {
            if windows(t.len(), context) == 0 {
                return Err(Error::config(
                    "model.context",
                    format!(
                        "{context} is longer than the {what} data: a sequence needs {} tokens, \
                         the {what} split of {} holds {}",
                        context.saturating_add(1),
                        self.source,
                        t.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A seeded single-pass training sampler (see [`Sampler`]).
    pub fn sampler(&self, context: usize, batch_size: usize, seed: u64) -> Result<Sampler> {
        Sampler::new(self.train.clone(), context, batch_size, seed)
    }

    /// The fixed evaluation set from the validation split (see [`eval_batches`]).
    pub fn eval_batches(
        &self,
        context: usize,
        batch_size: usize,
        max_tokens: u64,
    ) -> Result<Vec<Batch>> {
        eval_batches(&self.val, context, batch_size, max_tokens)
    }

    /// Entropy (nats) of the training split's unigram distribution: the loss of the best model
    /// that ignores context, a yardstick for "the model learned something".
    pub fn unigram_entropy(&self) -> f64 {
        let mut counts = vec![0u64; self.vocab_size.max(1)];
        let mut buf = Vec::new();
        let n = self.train.len();
        let step = 1 << 20;
        for start in (0..n).step_by(step) {
            buf.clear();
            self.train.extend_u32(start, step.min(n - start), &mut buf);
            for &t in &buf {
                counts[t as usize] += 1;
            }
        }
        let total = n as f64;
        counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / total;
                -p * p.ln()
            })
            .sum()
    }
}

fn check_ids(what: &str, t: &Tokens, vocab_size: usize, source: &str) -> Result<()> {
    if t.is_empty() {
        return Err(Error::Msg(format!("{source}: the {what} split is empty")));
    }
    if let Some(max) = t.max_token() {
        if usize::from(max) >= vocab_size {
            return Err(Error::Msg(format!(
                "{source}: the {what} split holds token id {max}, outside the vocabulary of \
                 {vocab_size}"
            )));
        }
    }
    Ok(())
}

/// Tokenizes documents and writes `train.bin`, `val.bin` and `meta.json` into `out` (each
/// atomically), splitting with [`split_train_val`]. `docs` are (name for errors, bytes);
/// `sources` is what `meta.json` records as the data's origin. Returns the written meta.
pub fn prepare_shards(
    docs: &[(String, Vec<u8>)],
    tokenizer: Tokenizer,
    val_fraction: f64,
    out: &Path,
    sources: Vec<String>,
) -> Result<ShardMeta> {
    if docs.is_empty() {
        return Err(Error::Msg("prepare: no input documents".into()));
    }
    let bytes: Vec<&[u8]> = docs.iter().map(|(_, d)| d.as_slice()).collect();
    let ids = tokenizer.encode_documents(&bytes, &|i| docs[i].0.clone())?;
    let (train, val) = split_train_val(&ids, val_fraction)?;
    if train.is_empty() || val.is_empty() {
        return Err(Error::Msg(format!(
            "prepare: {} tokens are too few to split into train and validation",
            ids.len()
        )));
    }
    let meta = ShardMeta {
        tokenizer: tokenizer.name().into(),
        vocab_size: tokenizer.vocab_size(),
        train_tokens: train.len() as u64,
        val_tokens: val.len() as u64,
        sources,
    };
    tokens::write_shards(out, &train, &val, &meta)?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_disjoint_even_and_complete() {
        let ids: Vec<u16> = (0..1000).map(|i| i as u16).collect();
        let (train, val) = split_train_val(&ids, 0.1).unwrap();
        assert_eq!((train.len(), val.len()), (900, 100));
        // Ten evenly spaced chunks of ten: 90..100, 190..200, …
        assert_eq!(&val[..10], &(90..100).collect::<Vec<u16>>()[..]);
        assert_eq!(&val[90..], &(990..1000).collect::<Vec<u16>>()[..]);
        let mut all: Vec<u16> = train.iter().chain(&val).copied().collect();
        all.sort();
        assert_eq!(all, ids);
        let (_, tiny) = split_train_val(&ids, 0.001).unwrap();
        assert_eq!(tiny.len(), 10); // at least one chunk
        assert!(split_train_val(&ids, 0.0).is_err());
        assert!(split_train_val(&ids, 0.6).is_err());
    }

    #[test]
    fn embedded_brown_byte_level() {
        let data = Dataset::load(&DataConfig::default()).unwrap();
        assert_eq!(data.vocab_size(), 256);
        assert_eq!(data.tokenizer(), "byte");
        let n = data.train().len() + data.val().len();
        assert_eq!(n, corpus::BROWN_BYTES - 1); // the final newline is not a document byte
        assert!((data.val().len() as f64 / n as f64 - 0.1).abs() < 0.001);
        let h = data.unigram_entropy();
        assert!(h > 2.9 && h < 3.2, "unigram entropy {h}");
        data.check_model(256, 512).unwrap();
        let err = data.check_model(128, 512).unwrap_err().to_string();
        assert!(err.contains("model.vocab_size"), "{err}");
        let mut s = data.sampler(64, 4, 0).unwrap();
        let b = s.next_batch();
        let text = Tokenizer::Byte
            .decode(&b.inputs[..64].iter().map(|&t| t as u16).collect::<Vec<_>>())
            .unwrap();
        assert!(text.is_ascii() && text.contains(' '), "{text}");
    }

    #[test]
    fn config_validation() {
        let bad = DataConfig {
            val_fraction: 0.0,
            ..DataConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("data.val_fraction"));
        let bad = DataConfig {
            dir: Some("x".into()),
            tokenizer: Tokenizer::Gpt2,
            ..DataConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("data.dir"));
        let bad = DataConfig {
            corpus: "nope".into(),
            ..DataConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("data.corpus"));
        let parsed: DataConfig = toml::from_str("tokenizer = \"gpt2\"").unwrap();
        assert_eq!(parsed.tokenizer, Tokenizer::Gpt2);
        assert!(toml::from_str::<DataConfig>("tokeniser = \"gpt2\"").is_err());
    }

    #[test]
    fn shards_round_trip_and_bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let docs = vec![
            (
                "a.txt".to_string(),
                b"hello world, hello shards. ".repeat(20),
            ),
            ("b.txt".to_string(), b"a second document here. ".repeat(20)),
        ];
        let meta = prepare_shards(&docs, Tokenizer::Byte, 0.2, dir.path(), vec![]).unwrap();
        let data = Dataset::from_shards(dir.path()).unwrap();
        assert_eq!(data.vocab_size(), 256);
        assert_eq!(data.train().len() as u64, meta.train_tokens);
        assert_eq!(data.val().len() as u64, meta.val_tokens);
        assert_eq!(data.tokenizer(), "byte");
        let loaded = DataConfig {
            dir: Some(dir.path().to_path_buf()),
            ..DataConfig::default()
        };
        assert_eq!(
            Dataset::load(&loaded).unwrap().train().to_vec(),
            data.train().to_vec()
        );

        let train = dir.path().join("train.bin");
        let bytes = std::fs::read(&train).unwrap();
        let expect_err = |needle: &str| {
            let err = Dataset::from_shards(dir.path()).unwrap_err().to_string();
            assert!(err.contains(needle), "expected `{needle}` in: {err}");
        };
        // Odd length.
        std::fs::write(&train, &bytes[..bytes.len() - 1]).unwrap();
        expect_err("odd length");
        // Truncated by a whole token: caught by meta.json.
        std::fs::write(&train, &bytes[..bytes.len() - 2]).unwrap();
        expect_err("truncated");
        // Empty.
        std::fs::write(&train, b"").unwrap();
        expect_err("empty");
        // Missing.
        std::fs::remove_file(&train).unwrap();
        expect_err("missing");
        // An id outside meta.json's vocabulary is refused.
        let val = data.val().to_vec();
        let declared = ShardMeta {
            train_tokens: 5,
            ..meta.clone()
        };
        tokens::write_shards(dir.path(), &[1, 2, 3, 999, 4], &val, &declared).unwrap();
        expect_err("token id 999");
        // Without meta.json the vocabulary is inferred from the largest id.
        std::fs::remove_file(dir.path().join("meta.json")).unwrap();
        let inferred = Dataset::from_shards(dir.path()).unwrap();
        assert_eq!(inferred.vocab_size(), 1000);
        assert_eq!(inferred.tokenizer(), "unknown");
        let err = inferred.check_model(256, 2).unwrap_err().to_string();
        assert!(err.contains("model.vocab_size"), "{err}");
        // Context longer than the data.
        let err = inferred.check_model(1000, 8).unwrap_err().to_string();
        assert!(err.contains("longer than the training data"), "{err}");
    }

    #[test]
    fn prepare_gpt2_shards() {
        let dir = tempfile::tempdir().unwrap();
        let docs = vec![(
            "t.txt".to_string(),
            "The quick brown fox jumps over the lazy dog. "
                .repeat(30)
                .into_bytes(),
        )];
        let meta = prepare_shards(&docs, Tokenizer::Gpt2, 0.1, dir.path(), vec![]).unwrap();
        assert_eq!(meta.vocab_size, 50_257);
        let data = Dataset::from_shards(dir.path()).unwrap();
        assert_eq!(data.vocab_size(), 50_257);
        let all: Vec<u16> = data.train().to_vec();
        assert!(all.contains(&464)); // "The"
        assert!(data.check_model(256, 4).is_err());
        data.check_model(50_304, 4).unwrap();
        assert!(prepare_shards(&[], Tokenizer::Byte, 0.1, dir.path(), vec![]).is_err());
    }
}
