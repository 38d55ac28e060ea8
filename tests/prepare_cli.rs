//! The `prepare` binary writes shards the library loads, and fails clearly on bad input.

use std::process::Command;

use optlab::data::{DataConfig, Dataset, Tokenizer};

fn prepare() -> Command {
    Command::new(env!("CARGO_BIN_EXE_prepare"))
}

#[test]
fn files_and_directories_to_byte_shards() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.txt");
    std::fs::write(&a, "First document. ".repeat(50)).unwrap();
    let sub = dir.path().join("more");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("b.txt"), "Second one. ".repeat(50)).unwrap();
    let out = dir.path().join("shards");
    let status = prepare()
        .arg("--out")
        .arg(&out)
        .arg(&a)
        .arg(&sub)
        .status()
        .unwrap();
    assert!(status.success());
    let cfg = DataConfig {
        dir: Some(out.clone()),
        ..DataConfig::default()
    };
    let data = Dataset::load(&cfg).unwrap();
    assert_eq!((data.vocab_size(), data.tokenizer()), (256, "byte"));
    let total = data.train().len() + data.val().len();
    assert_eq!(total, 800 + 2 + 600); // both files and the blank line between them
    let mut all: Vec<u16> = data.train().to_vec();
    all.extend(data.val().to_vec());
    all.sort();
    let mut expected: Vec<u16> =
        ("First document. ".repeat(50) + "\n\n" + &"Second one. ".repeat(50))
            .bytes()
            .map(u16::from)
            .collect();
    expected.sort();
    assert_eq!(all, expected);
    let meta = std::fs::read_to_string(out.join("meta.json")).unwrap();
    assert!(meta.contains("b.txt"), "{meta}");
}

#[test]
fn embedded_corpus_to_gpt2_shards() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("brown-gpt2");
    let output = prepare()
        .args(["--builtin", "brown", "--tokenizer", "gpt2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let data = Dataset::from_shards(&out).unwrap();
    assert_eq!((data.vocab_size(), data.tokenizer()), (50_257, "gpt2"));
    let same = Dataset::embedded("brown", Tokenizer::Gpt2, 0.1).unwrap();
    assert_eq!(data.train().to_vec(), same.train().to_vec());
    assert_eq!(data.val().to_vec(), same.val().to_vec());
    let n = (data.train().len() + data.val().len()) as f64;
    assert!((data.val().len() as f64 / n - 0.1).abs() < 0.001);
}

#[test]
fn bad_input_fails_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = prepare()
        .arg("--out")
        .arg(dir.path())
        .arg(dir.path().join("missing.txt"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.txt"));
    let f = dir.path().join("x.txt");
    std::fs::write(&f, "some text").unwrap();
    let out = prepare()
        .args(["--val-fraction", "0.9", "--out"])
        .arg(dir.path())
        .arg(&f)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("val_fraction"));
    assert!(!dir.path().join("train.bin").exists());
}

/// A symbolic link back to an enclosing directory is a cycle: the walk reads each directory
/// once instead of recursing until the stack overflows.
#[cfg(unix)]
#[test]
fn a_symlink_cycle_is_read_once() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    let sub = corpus.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::write(corpus.join("a.txt"), "abc ".repeat(40)).unwrap();
    std::fs::write(sub.join("b.txt"), "xyz ".repeat(40)).unwrap();
    std::os::unix::fs::symlink(&corpus, sub.join("back")).unwrap();
    std::os::unix::fs::symlink(".", corpus.join("self")).unwrap();
    let out = dir.path().join("shards");
    let output = prepare()
        .arg("--out")
        .arg(&out)
        .arg(&corpus)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let data = Dataset::from_shards(&out).unwrap();
    // Two documents of 160 bytes each and the blank line between them.
    assert_eq!(data.train().len() + data.val().len(), 160 + 2 + 160);
}
