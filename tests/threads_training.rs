//! A training run is the same bits on any thread count: the decoder's fused CPU ops split rows
//! over threads but never a sum (LayerNorm's weight gradient once summed per-thread row blocks,
//! so 1 and 2 threads differed in the last bits). Its own binary: it sets `RAYON_NUM_THREADS`,
//! the count candle and the fused ops read, which no other test may read meanwhile.

use optlab::data::{DataConfig, Dataset};
use optlab::runner::checkpoint;
use optlab::runner::metrics::TIMING_FIELDS;
use optlab::runner::{run, RunConfig, RunOptions};

/// Metrics lines without timing and the final parameters' bytes.
fn train(threads: usize, data: &Dataset) -> (Vec<serde_json::Value>, Vec<u8>) {
    // 32 sequences of 32 tokens: LayerNorm inputs of 1024 rows × 32, enough to be split.
    let text = "seed = 5\n[model]\npreset = \"test\"\n[optimizer]\nname = \"adamw\"\nlr = 0.01\n\
                [train]\nbatch_size = 32\nsteps = 4\n[eval]\ninterval = 2\ntokens = 2048\n";
    let cfg = RunConfig::parse(text, &[]).unwrap();
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let dir = tempfile::tempdir().unwrap();
    let mut o = RunOptions::new(dir.path());
    o.dataset = Some(data.clone());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| run(&cfg, &o)).unwrap();
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for f in TIMING_FIELDS {
                v.as_object_mut().unwrap().remove(f);
            }
            v
        })
        .collect();
    let ck = checkpoint::latest(dir.path()).unwrap().unwrap();
    (metrics, ck.files[checkpoint::MODEL_FILE].clone())
}

#[test]
fn training_is_the_same_bits_on_one_two_and_four_threads() {
    let data = Dataset::load(&DataConfig::default()).unwrap();
    let one = train(1, &data);
    for threads in [2, 4] {
        let other = train(threads, &data);
        assert_eq!(one.0, other.0, "metrics differ: 1 vs {threads} threads");
        assert!(
            one.1 == other.1,
            "parameters differ: 1 vs {threads} threads"
        );
    }
}
