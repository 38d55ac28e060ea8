//! The embedded default corpus: the Brown corpus (Francis & Kučera, 1964/1979) as plain
//! English text, about 6 MB, compressed into the binary so a first run needs no network.
//! Provenance, license and how it was made: `data/corpus/README.md`.

use std::io::Read;

use crate::error::{Error, Result};

/// The gzip file as committed.
const BROWN_GZ: &[u8] = include_bytes!("../../data/corpus/brown.txt.gz");

/// Bytes of the decompressed text (checked on load).
pub const BROWN_BYTES: usize = 5_965_977;

/// Documents in the corpus (its 500 samples, separated by blank lines).
pub const BROWN_DOCUMENTS: usize = 500;

/// Embedded corpora, by name.
pub const EMBEDDED: [&str; 1] = ["brown"];

/// The decompressed text of the embedded corpus `name`.
pub fn embedded_text(name: &str) -> Result<Vec<u8>> {
    if name != "brown" {
        return Err(Error::config(
            "data.corpus",
            format!(
                "unknown embedded corpus `{name}`; known: {}",
                EMBEDDED.join(", ")
            ),
        ));
    }
    let mut text = Vec::with_capacity(BROWN_BYTES);
    flate2::read::GzDecoder::new(BROWN_GZ)
        .read_to_end(&mut text)
        .map_err(|e| Error::Msg(format!("embedded corpus `brown` is corrupt: {e}")))?;
    if text.len() != BROWN_BYTES {
        return Err(Error::Msg(format!(
            "embedded corpus `brown` decompressed to {} bytes, expected {BROWN_BYTES}",
            text.len()
        )));
    }
    Ok(text)
}

/// Splits a text into documents at blank lines (`"\n\n"`), as the embedded corpus separates its
/// samples.
pub fn documents(text: &[u8]) -> Vec<&[u8]> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < text.len() {
        if text[i] == b'\n' && text[i + 1] == b'\n' {
            docs.push(&text[start..i]);
            i += 2;
            start = i;
        } else {
            i += 1;
        }
    }
    let last = text[start..].strip_suffix(b"\n").unwrap_or(&text[start..]);
    if !last.is_empty() {
        docs.push(last);
    }
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brown_is_real_english_of_the_promised_size() {
        let text = embedded_text("brown").unwrap();
        assert!(text.len() >= 5_000_000);
        assert!(text.is_ascii());
        assert!(text.starts_with(b"The Fulton County Grand Jury said Friday"));
        assert_eq!(documents(&text).len(), BROWN_DOCUMENTS);
        assert!(embedded_text("enwik8").is_err());
    }

    #[test]
    fn documents_split_on_blank_lines() {
        assert_eq!(documents(b"a\nb\n\nc\n"), vec![&b"a\nb"[..], &b"c"[..]]);
        assert!(documents(b"").is_empty());
    }
}
