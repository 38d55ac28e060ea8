//! Tokenizes text into nanoGPT-style shards:
//! `prepare --out DIR [--tokenizer byte|gpt2] [--val-fraction F] (FILE|DIR... | --builtin brown)`.
//!
//! Every input file is one document (directories are read recursively, in name order). Symbolic
//! links are followed, but each directory is read once: a link back to a directory already read
//! (a cycle such as `dir/loop -> ..`, or a second path to the same directory) is skipped. Writes
//! `DIR/train.bin` and `DIR/val.bin` (little-endian u16 token ids) and `DIR/meta.json`, each
//! atomically; point a run's `data.dir` at `DIR`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use optlab::data::{corpus, prepare_shards, Tokenizer};
use optlab::{Error, Result};

#[derive(Clone, Copy, ValueEnum)]
enum TokenizerArg {
    /// One token per byte (vocab 256).
    Byte,
    /// GPT-2 BPE, r50k_base (vocab 50257), offline.
    Gpt2,
}

/// Tokenize text files into train.bin / val.bin token shards.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Tokenizer.
    #[arg(long, value_enum, default_value = "byte")]
    tokenizer: TokenizerArg,
    /// Share of the tokens held out for validation, in (0, 0.5].
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Use an embedded corpus (`brown`) instead of files.
    #[arg(long, conflicts_with = "inputs")]
    builtin: Option<String>,
    /// Text files or directories of text files.
    #[arg(required_unless_present = "builtin")]
    inputs: Vec<PathBuf>,
}

/// Appends the files under `path` (recursively, in name order) to `out`. `seen` holds the
/// canonical paths of the directories already read, so a symbolic link cycle or a directory
/// reached twice is read once.
fn collect_files(
    path: &Path,
    seen: &mut std::collections::HashSet<PathBuf>,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    if path.is_dir() {
        let canonical = std::fs::canonicalize(path).map_err(|e| Error::file(path, e))?;
        if !seen.insert(canonical) {
            return Ok(());
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::file(path, e))?
            .map(|e| e.map(|e| e.path()).map_err(|e| Error::file(path, e)))
            .collect::<Result<_>>()?;
        entries.sort();
        for entry in entries {
            collect_files(&entry, seen, out)?;
        }
    } else if path.is_file() {
        out.push(path.to_path_buf());
    } else {
        return Err(Error::file(path, "no such file or directory"));
    }
    Ok(())
}

fn run(args: &Args) -> Result<()> {
    let tokenizer = match args.tokenizer {
        TokenizerArg::Byte => Tokenizer::Byte,
        TokenizerArg::Gpt2 => Tokenizer::Gpt2,
    };
    let (docs, sources): (Vec<(String, Vec<u8>)>, Vec<String>) = match &args.builtin {
        Some(name) => {
            let text = corpus::embedded_text(name)?;
            let docs = corpus::documents(&text)
                .into_iter()
                .enumerate()
                .map(|(i, d)| (format!("embedded:{name} document {i}"), d.to_vec()))
                .collect();
            (docs, vec![format!("embedded:{name}")])
        }
        None => {
            let (mut files, mut seen) = (Vec::new(), Default::default());
            for p in &args.inputs {
                collect_files(p, &mut seen, &mut files)?;
            }
            let docs = files
                .iter()
                .map(|f| {
                    let bytes = std::fs::read(f).map_err(|e| Error::file(f, e))?;
                    Ok((f.display().to_string(), bytes))
                })
                .collect::<Result<Vec<_>>>()?;
            let sources = docs.iter().map(|(n, _)| n.clone()).collect();
            (docs, sources)
        }
    };
    let meta = prepare_shards(&docs, tokenizer, args.val_fraction, &args.out, sources)?;
    println!(
        "{}: {} train + {} val tokens ({} tokenizer, vocab {}) from {} documents",
        args.out.display(),
        meta.train_tokens,
        meta.val_tokens,
        meta.tokenizer,
        meta.vocab_size,
        docs.len()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("prepare: {e}");
            ExitCode::FAILURE
        }
    }
}
