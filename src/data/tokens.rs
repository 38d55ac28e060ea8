//! Token storage and nanoGPT-style shard files.
//!
//! A shard is a headerless file of little-endian `u16` token ids (`train.bin`, `val.bin`), as
//! nanoGPT's `prepare.py` scripts write them. An optional `meta.json` beside them records the
//! tokenizer, the vocabulary size and the token counts, so a truncated file is caught before
//! training rather than read as a shorter corpus.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

enum Repr {
    Owned(Vec<u16>),
    /// The raw little-endian bytes of a shard file.
    Mapped(Mmap),
}

/// A read-only sequence of token ids, in memory or memory-mapped from a shard. Cheap to clone.
#[derive(Clone)]
pub struct Tokens {
    repr: Arc<Repr>,
    len: usize,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &*self.repr {
            Repr::Owned(_) => "owned",
            Repr::Mapped(_) => "mapped",
        };
        write!(f, "Tokens({kind}, {} tokens)", self.len)
    }
}

impl Tokens {
    /// Tokens held in memory.
    pub fn from_vec(tokens: Vec<u16>) -> Self {
        let len = tokens.len();
        Self {
            repr: Arc::new(Repr::Owned(tokens)),
            len,
        }
    }

    /// Memory-maps a shard file, refusing empty and odd-length files.
    ///
    /// The file must not be modified while mapped (the usual memory-map contract).
    pub fn map(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
        let size = file.metadata().map_err(|e| Error::file(path, e))?.len();
        if size == 0 {
            return Err(Error::file(path, "shard is empty (0 bytes)"));
        }
        if size % 2 != 0 {
            return Err(Error::file(
                path,
                format!(
                    "shard has an odd length ({size} bytes): it must hold little-endian u16 \
                     tokens, so it is truncated or not a token shard"
                ),
            ));
        }
        // SAFETY: the map is read-only; shards are not written while a run reads them.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::file(path, e))?;
        Ok(Self {
            len: mmap.len() / 2,
            repr: Arc::new(Repr::Mapped(mmap)),
        })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Token `i` (panics if out of range, like slice indexing).
    pub fn get(&self, i: usize) -> u16 {
        match &*self.repr {
            Repr::Owned(v) => v[i],
            Repr::Mapped(m) => u16::from_le_bytes([m[2 * i], m[2 * i + 1]]),
        }
    }

    /// Appends tokens `start..start + len` to `out` as `u32`.
    pub fn extend_u32(&self, start: usize, len: usize, out: &mut Vec<u32>) {
        match &*self.repr {
            Repr::Owned(v) => out.extend(v[start..start + len].iter().map(|&t| u32::from(t))),
            Repr::Mapped(m) => out.extend(
                m[2 * start..2 * (start + len)]
                    .chunks_exact(2)
                    .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]]))),
            ),
        }
    }

    /// The largest token id (None when empty).
    pub fn max_token(&self) -> Option<u16> {
        match &*self.repr {
            Repr::Owned(v) => v.iter().copied().max(),
            Repr::Mapped(m) => m
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .max(),
        }
    }

    /// All tokens, copied (for tests and small corpora).
    pub fn to_vec(&self) -> Vec<u16> {
        (0..self.len).map(|i| self.get(i)).collect()
    }
}

/// Little-endian bytes of `tokens`, as a shard file holds them.
pub fn shard_bytes(tokens: &[u16]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

/// Contents of `meta.json` beside a pair of shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardMeta {
    /// Tokenizer name (`byte`, `gpt2`, or whatever produced the shards).
    pub tokenizer: String,
    /// Vocabulary size: every token id is below it.
    pub vocab_size: usize,
    /// Tokens in `train.bin`.
    pub train_tokens: u64,
    /// Tokens in `val.bin`.
    pub val_tokens: u64,
    /// Where the text came from (file names or the embedded corpus), for the record.
    #[serde(default)]
    pub sources: Vec<String>,
}

/// Paths of the shard files in `dir`.
pub fn shard_paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join("train.bin"),
        dir.join("val.bin"),
        dir.join("meta.json"),
    )
}

/// Writes `train.bin`, `val.bin` and `meta.json` into `dir`, each atomically.
pub fn write_shards(dir: &Path, train: &[u16], val: &[u16], meta: &ShardMeta) -> Result<()> {
    let (train_path, val_path, meta_path) = shard_paths(dir);
    crate::io::write_atomic(&train_path, &shard_bytes(train))?;
    crate::io::write_atomic(&val_path, &shard_bytes(val))?;
    let json = serde_json::to_string_pretty(meta).map_err(|e| Error::file(&meta_path, e))?;
    crate::io::write_atomic(&meta_path, json.as_bytes())
}
