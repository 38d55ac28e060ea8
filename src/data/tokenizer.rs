//! Tokenizers that turn text into `u16` ids, both offline: raw bytes (vocab 256) and the GPT-2
//! BPE (`r50k_base`, vocab 50 257, embedded in the `tiktoken-rs` crate).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// GPT-2's end-of-text token, placed after every document as nanoGPT's OpenWebText preparation
/// does.
pub const GPT2_EOT: u16 = 50_256;

/// A tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tokenizer {
    /// One token per byte (vocab 256); documents are joined by a blank line.
    #[default]
    Byte,
    /// GPT-2 BPE (`r50k_base`); every document ends with `<|endoftext|>` (50256).
    Gpt2,
}

impl Tokenizer {
    /// Name as written in configs and `meta.json`.
    pub fn name(self) -> &'static str {
        match self {
            Tokenizer::Byte => "byte",
            Tokenizer::Gpt2 => "gpt2",
        }
    }

    /// Parses a name (`byte`, `gpt2`).
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "byte" => Ok(Tokenizer::Byte),
            "gpt2" | "r50k_base" => Ok(Tokenizer::Gpt2),
            _ => Err(Error::config(
                "data.tokenizer",
                format!("unknown tokenizer `{name}`; known: byte, gpt2"),
            )),
        }
    }

    /// Number of distinct token ids.
    pub fn vocab_size(self) -> usize {
        match self {
            Tokenizer::Byte => 256,
            Tokenizer::Gpt2 => 50_257,
        }
    }

    /// Tokenizes documents into one stream, marking document ends as the tokenizer does
    /// (byte: a blank line between documents; gpt2: `<|endoftext|>` after each). `name(i)`
    /// names document `i` in errors (GPT-2 needs UTF-8 text).
    pub fn encode_documents(
        self,
        docs: &[&[u8]],
        name: &dyn Fn(usize) -> String,
    ) -> Result<Vec<u16>> {
        match self {
            Tokenizer::Byte => {
                let mut out = Vec::with_capacity(docs.iter().map(|d| d.len() + 2).sum());
                for (i, doc) in docs.iter().enumerate() {
                    if i > 0 {
                        out.extend([u16::from(b'\n'), u16::from(b'\n')]);
                    }
                    out.extend(doc.iter().map(|&b| u16::from(b)));
                }
                Ok(out)
            }
            Tokenizer::Gpt2 => {
                let bpe = tiktoken_rs::r50k_base_singleton();
                let mut out = Vec::new();
                for (i, doc) in docs.iter().enumerate() {
                    let text = std::str::from_utf8(doc).map_err(|e| {
                        Error::Msg(format!(
                            "{}: not valid UTF-8 ({e}); the gpt2 tokenizer needs UTF-8 text",
                            name(i)
                        ))
                    })?;
                    // Every r50k_base id is below 50 257, so it fits in u16.
                    out.extend(bpe.encode_ordinary(text).into_iter().map(|t| t as u16));
                    out.push(GPT2_EOT);
                }
                Ok(out)
            }
        }
    }

    /// Turns ids back into text (lossy for invalid UTF-8), for inspection and tests.
    pub fn decode(self, tokens: &[u16]) -> Result<String> {
        match self {
            Tokenizer::Byte => {
                let bytes: Vec<u8> = tokens
                    .iter()
                    .map(|&t| {
                        u8::try_from(t)
                            .map_err(|_| Error::Msg(format!("byte tokenizer: id {t} is above 255")))
                    })
                    .collect::<Result<_>>()?;
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Tokenizer::Gpt2 => {
                let ids: Vec<u32> = tokens.iter().map(|&t| u32::from(t)).collect();
                let bytes = tiktoken_rs::r50k_base_singleton()
                    .decode_bytes(&ids)
                    .map_err(|e| Error::Msg(format!("gpt2 tokenizer: {e}")))?;
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_round_trip_and_separator() {
        let docs: [&[u8]; 2] = [b"ab", b"c"];
        let ids = Tokenizer::Byte
            .encode_documents(&docs, &|i| i.to_string())
            .unwrap();
        assert_eq!(ids, vec![97, 98, 10, 10, 99]);
        assert_eq!(Tokenizer::Byte.decode(&ids).unwrap(), "ab\n\nc");
        assert!(Tokenizer::Byte.decode(&[300]).is_err());
    }

    #[test]
    fn gpt2_known_ids_offline() {
        let docs: [&[u8]; 1] = [b"Hello world"];
        let ids = Tokenizer::Gpt2
            .encode_documents(&docs, &|i| i.to_string())
            .unwrap();
        // GPT-2: "Hello" = 15496, " world" = 995, then <|endoftext|>.
        assert_eq!(ids, vec![15496, 995, GPT2_EOT]);
        assert_eq!(
            Tokenizer::Gpt2.decode(&ids).unwrap(),
            "Hello world<|endoftext|>"
        );
        let bad: [&[u8]; 1] = [&[0xff, 0xfe]];
        let err = Tokenizer::Gpt2
            .encode_documents(&bad, &|_| "x.txt".into())
            .unwrap_err();
        assert!(err.to_string().contains("x.txt"), "{err}");
    }
}
