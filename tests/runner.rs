//! The training runner end to end: learning on the embedded corpus, exact resumption, every
//! optimizer family's extra inputs, the run directory's files, and clear errors.

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use optlab::data::{DataConfig, Dataset, ShardMeta};
use optlab::optim::StateDict;
use optlab::runner::checkpoint::{self, Manifest};
use optlab::runner::metrics::TIMING_FIELDS;
use optlab::runner::{read_metrics, run, EnvInfo, RunConfig, RunOptions, RunReport, Summary};

/// The embedded corpus, loaded once for every test.
fn brown() -> Dataset {
    static DATA: OnceLock<Dataset> = OnceLock::new();
    DATA.get_or_init(|| Dataset::load(&DataConfig::default()).unwrap())
        .clone()
}

/// A config on the `test` decoder (d 32, 2 layers, context 32) with `body` appended.
fn config(optimizer: &str, body: &str) -> String {
    format!("seed = 3\n[model]\npreset = \"test\"\n[optimizer]\n{optimizer}\n{body}\n",)
}

fn parse(text: &str) -> RunConfig {
    RunConfig::parse(text, &[]).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn opts(dir: &Path) -> RunOptions {
    let mut o = RunOptions::new(dir);
    o.dataset = Some(brown());
    o
}

fn run_ok(cfg: &RunConfig, o: &RunOptions) -> RunReport {
    run(cfg, o).unwrap_or_else(|e| panic!("run failed: {e}"))
}

/// Metrics lines as JSON values without their timing fields.
fn metrics_without_timing(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for f in TIMING_FIELDS {
                v.as_object_mut().unwrap().remove(f);
            }
            v
        })
        .collect()
}

fn bits(t: &Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| u64::from(x.to_bits()))
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

fn final_checkpoint(dir: &Path) -> checkpoint::Loaded {
    checkpoint::latest(dir).unwrap().expect("a checkpoint")
}

/// Asserts two finished runs are bit-identical: metrics (timing aside), parameters, optimizer
/// and EWA state, and the summary (timing aside).
fn assert_same_run(a: &Path, b: &Path) {
    assert_eq!(metrics_without_timing(a), metrics_without_timing(b));
    let (ca, cb) = (final_checkpoint(a), final_checkpoint(b));
    assert_eq!(ca.manifest.state.step, cb.manifest.state.step);
    let load = |l: &checkpoint::Loaded| {
        checkpoint::tensors_from_bytes(&l.files[checkpoint::MODEL_FILE], &Device::Cpu).unwrap()
    };
    let (pa, pb) = (load(&ca), load(&cb));
    assert_eq!(pa.len(), pb.len());
    for (name, t) in &pa {
        assert_eq!(bits(t), bits(&pb[name]), "parameter {name}");
    }
    for file in [checkpoint::OPTIMIZER_FILE, checkpoint::EWA_FILE] {
        let (Some(x), Some(y)) = (ca.files.get(file), cb.files.get(file)) else {
            assert_eq!(ca.files.contains_key(file), cb.files.contains_key(file));
            continue;
        };
        let sa = StateDict::from_bytes(x, &Device::Cpu).unwrap();
        let sb = StateDict::from_bytes(y, &Device::Cpu).unwrap();
        assert_eq!(sa.step, sb.step, "{file}");
        assert_eq!(sa.extra, sb.extra, "{file}");
        assert_eq!(
            sa.entries.keys().collect::<Vec<_>>(),
            sb.entries.keys().collect::<Vec<_>>()
        );
        for (k, st) in &sa.entries {
            let other = &sb.entries[k];
            assert_eq!(st.scalars, other.scalars, "{file} {k}");
            for (f, t) in &st.tensors {
                assert_eq!(bits(t), bits(&other.tensors[f]), "{file} {k}.{f}");
            }
        }
    }
    let summary = |d: &Path| {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap())
                .unwrap();
        v.as_object_mut().unwrap().remove("timing");
        v
    };
    assert_eq!(summary(a), summary(b));
}

#[test]
fn tiny_decoder_learns_with_adamw_soap_and_sgd() {
    // The `test` decoder (d 32, 2 layers, context 32, 41k parameters) for 100 steps of 16
    // sequences (51k tokens): a few seconds per optimizer in the debug profile. The larger
    // `tiny` preset would take minutes there. Measured: AdamW 6.15 -> 2.49, SOAP -> 2.45,
    // SGD -> 2.58 nats against a unigram entropy of 3.08.
    let unigram = brown().unigram_entropy();
    let cases = [
        (
            "name = \"adamw\"\nlr = 0.01\nbetas = [0.9, 0.95]\nweight_decay = 0.0",
            0.5,
        ),
        (
            "name = \"soap\"\nlr = 0.01\nbetas = [0.9, 0.95]\nprecondition_frequency = 10",
            0.5,
        ),
        ("name = \"sgd\"\nlr = 0.5\nmomentum = 0.9", 0.4),
    ];
    for (opt, margin) in cases {
        let dir = tempfile::tempdir().unwrap();
        let cfg = parse(&config(
            opt,
            "[train]\nbatch_size = 16\nsteps = 100\ngrad_clip = 1.0\nlog_interval = 10\n\
             [eval]\ninterval = 50\ntokens = 4096\n[checkpoint]\ninterval = 0",
        ));
        let report = run_ok(&cfg, &opts(dir.path()));
        let s = report.summary.unwrap();
        let start = read_metrics(&dir.path().join("metrics.jsonl")).unwrap()[0]
            .eval_loss
            .unwrap();
        let end = s.final_losses.eval_loss.unwrap();
        eprintln!("{opt}: {start} -> {end} (unigram {unigram})");
        assert!(start > 5.0, "{opt}: initial loss {start}");
        assert!(
            end < unigram - margin,
            "{opt}: {start} -> {end}, unigram entropy {unigram}"
        );
        assert!((s.data.unigram_entropy - unigram).abs() < 1e-12);
        assert!(!s.data.repeated);
    }
}

/// Runs `text` uninterrupted and stopped after `stop` then resumed; asserts identity.
fn check_resume(text: &str, stop: u64) {
    let cfg = parse(text);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let full = run_ok(&cfg, &opts(a.path()));
    assert!(full.summary.is_some());
    let mut first = opts(b.path());
    first.stop_after = Some(stop);
    let part = run_ok(&cfg, &first);
    assert_eq!(part.steps, stop);
    assert!(part.summary.is_none());
    assert!(!b.path().join("summary.json").exists());
    let mut again = opts(b.path());
    again.resume = true;
    let rest = run_ok(&cfg, &again);
    assert!(rest
        .notes
        .iter()
        .any(|n| n.contains(&format!("from step {stop}"))));
    assert_same_run(a.path(), b.path());
}

#[test]
fn resume_is_bit_identical_with_micro_batches_clipping_ewa_and_a_schedule() {
    check_resume(
        &config(
            "name = \"adamw\"\nlr = 0.01",
            "[schedule]\nkind = \"warmup_cosine\"\nwarmup_steps = 3\n\
             [train]\nbatch_size = 6\nmicro_batch = 4\nsteps = 12\ngrad_clip = 0.5\n\
             [eval]\ninterval = 4\ntokens = 2048\ntargets = [5.0, 4.0]\n\
             [ewa]\ntaus = [0.5, 0.9]\n[checkpoint]\ninterval = 4",
        ),
        6,
    );
}

#[test]
fn sophia_resumes_exactly_across_hessian_updates() {
    check_resume(
        &config(
            "name = \"sophia\"\nlr = 0.01\nrho = 0.05",
            "[train]\nbatch_size = 4\nmicro_batch = 2\nsteps = 9\nhessian_interval = 2\n\
             grad_clip = 1.0\n[eval]\ninterval = 3\ntokens = 1024\n[checkpoint]\ninterval = 0",
        ),
        5,
    );
}

#[test]
fn schedule_free_resumes_exactly_and_evaluation_does_not_perturb_training() {
    let text = |interval: u64| {
        config(
            "name = \"schedulefree_adamw\"\nlr = 0.01\nwarmup_steps = 2",
            &format!(
                "[train]\nbatch_size = 4\nsteps = 8\n[eval]\ninterval = {interval}\n\
                 tokens = 1024\n[ewa]\ntaus = [0.8]\n[checkpoint]\ninterval = 3"
            ),
        )
    };
    check_resume(&text(1), 4);
    // Evaluating at every step (swapping the averaged point in and out) leaves the training
    // trajectory bit-identical to evaluating only at the end.
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run_ok(&parse(&text(1)), &opts(a.path()));
    run_ok(&parse(&text(0)), &opts(b.path()));
    let train = |d: &Path| {
        read_metrics(&d.join("metrics.jsonl"))
            .unwrap()
            .iter()
            .filter_map(|l| l.train_loss.map(|x| (l.step, x.to_bits())))
            .collect::<Vec<_>>()
    };
    assert_eq!(train(a.path()), train(b.path()));
    let last = |d: &Path| {
        read_metrics(&d.join("metrics.jsonl"))
            .unwrap()
            .pop()
            .unwrap()
    };
    assert_eq!(last(a.path()).eval_loss, last(b.path()).eval_loss);
    // And the evaluated (averaged) point learns.
    let l = last(a.path());
    assert!(l.eval_loss.unwrap() < 5.0, "{l:?}");
}

#[test]
fn mars_exact_resumes_exactly_with_its_look_ahead_gradient() {
    check_resume(
        &config(
            "name = \"mars\"\nlr = 0.01\nis_approx = false",
            "[train]\nbatch_size = 4\nsteps = 7\ngrad_clip = 1.0\n[eval]\ninterval = 0\n\
             tokens = 1024\n[checkpoint]\ninterval = 2",
        ),
        3,
    );
}

#[test]
fn mixed_groups_feed_extra_inputs_only_to_their_members() {
    // Sophia on matrices, AdamW elsewhere: the sampled-label gradient reaches only Sophia's
    // parameters (AdamW would refuse it).
    let text = config(
        "name = \"adamw\"\nlr = 0.01",
        "[[groups]]\nroles = [\"matrix\"]\noptimizer = { name = \"sophia\", lr = 0.01 }\n\
         [train]\nbatch_size = 4\nsteps = 4\nhessian_interval = 2\n[eval]\ninterval = 0\n\
         tokens = 1024\n[checkpoint]\ninterval = 0",
    );
    let cfg = parse(&text);
    match &cfg.groups[0].optimizer {
        Some(optlab::optim::OptimConfig::Sophia(s)) => assert_eq!(s.bs, 4 * 32),
        other => panic!("{other:?}"),
    }
    let dir = tempfile::tempdir().unwrap();
    run_ok(&cfg, &opts(dir.path()));
}

#[test]
fn micro_batches_match_the_full_batch_gradient() {
    let losses = |micro: usize| {
        let text = format!(
            "dtype = \"f64\"\n{}",
            config(
                "name = \"sgd\"\nlr = 0.1",
                &format!(
                    "[train]\nbatch_size = 6\nmicro_batch = {micro}\nsteps = 3\n\
                     [eval]\ninterval = 0\ntokens = 1024\n[checkpoint]\ninterval = 0"
                ),
            )
        );
        let dir = tempfile::tempdir().unwrap();
        run_ok(&parse(&text), &opts(dir.path()));
        read_metrics(&dir.path().join("metrics.jsonl"))
            .unwrap()
            .iter()
            .filter_map(|l| l.train_loss)
            .collect::<Vec<_>>()
    };
    // 6 sequences at once against micro-batches of 4 and 2 (unequal shares).
    let (whole, parts) = (losses(6), losses(4));
    assert_eq!(whole.len(), 3);
    for (a, b) in whole.iter().zip(&parts) {
        assert!((a - b).abs() < 1e-10, "{whole:?} vs {parts:?}");
    }
}

#[test]
fn resume_after_a_crash_skips_the_torn_checkpoint_and_drops_later_lines() {
    let text = config(
        "name = \"adamw\"\nlr = 0.01",
        "[train]\nbatch_size = 4\nsteps = 8\n[eval]\ninterval = 2\ntokens = 1024\n\
         [ewa]\ntaus = [0.9]\n[checkpoint]\ninterval = 3",
    );
    let cfg = parse(&text);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run_ok(&cfg, &opts(a.path()));
    let mut first = opts(b.path());
    first.stop_after = Some(3);
    run_ok(&cfg, &first);
    // What a crash during step 6's checkpoint leaves: lines for steps 4-6 (the last one cut
    // short) and a checkpoint directory without its manifest.
    let metrics = b.path().join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&metrics).unwrap();
    text.push_str("{\"step\":4,\"tokens\":512}\n{\"step\":5,\"tok");
    std::fs::write(&metrics, text).unwrap();
    let torn = checkpoint::checkpoints_dir(b.path()).join("step-0000000006");
    std::fs::create_dir_all(&torn).unwrap();
    std::fs::write(torn.join(checkpoint::MODEL_FILE), b"partial").unwrap();
    let mut again = opts(b.path());
    again.resume = true;
    let report = run_ok(&cfg, &again);
    assert!(
        report.notes.iter().any(|n| n.contains("torn")),
        "{:?}",
        report.notes
    );
    assert_same_run(a.path(), b.path());
    assert!(!torn.exists(), "the torn checkpoint is cleaned up");
}

/// A kill after the last checkpoint's manifest, before the previous checkpoint was removed and
/// before the summary: resuming writes the summary and leaves exactly one checkpoint.
#[test]
fn resume_after_a_kill_behind_the_last_checkpoint_leaves_one_checkpoint() {
    let text = config(
        "name = \"adamw\"\nlr = 0.01",
        "[train]\nbatch_size = 4\nsteps = 8\n[eval]\ninterval = 2\ntokens = 1024\n\
         [ewa]\ntaus = [0.9]\n[checkpoint]\ninterval = 3",
    );
    let cfg = parse(&text);
    let (a, b, saved) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    run_ok(&cfg, &opts(a.path()));
    let mut first = opts(b.path());
    first.stop_after = Some(6);
    run_ok(&cfg, &first);
    let step6 = checkpoint::checkpoints_dir(b.path()).join("step-0000000006");
    let copy = saved.path().join("step-0000000006");
    std::fs::create_dir_all(&copy).unwrap();
    for e in std::fs::read_dir(&step6).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    let mut rest = opts(b.path());
    rest.resume = true;
    run_ok(&cfg, &rest);
    // Put back what the kill would have left: step 6's checkpoint, no summary.
    std::fs::rename(&copy, &step6).unwrap();
    std::fs::remove_file(b.path().join("summary.json")).unwrap();
    run_ok(&cfg, &rest);
    assert_same_run(a.path(), b.path());
    let left: Vec<_> = std::fs::read_dir(checkpoint::checkpoints_dir(b.path()))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec!["step-0000000008"]);
}

#[test]
fn run_directory_files_parse() {
    let text = config(
        "name = \"adamw\"\nlr = 0.01",
        "[train]\nbatch_size = 4\nsteps = 6\nlog_interval = 2\n[eval]\ninterval = 3\n\
         tokens = 1024\ntargets = [6.0, 0.1]\n[ewa]\ntaus = [0.5]\n[checkpoint]\ninterval = 4",
    );
    let cfg = parse(&text);
    let dir = tempfile::tempdir().unwrap();
    let report = run_ok(&cfg, &opts(dir.path()));
    let d = dir.path();
    // config.toml is the resolved config and reads back to itself.
    let saved = std::fs::read_to_string(d.join("config.toml")).unwrap();
    assert_eq!(parse(&saved).to_toml().unwrap(), saved);
    assert_eq!(saved, cfg.to_toml().unwrap());
    // metrics.jsonl: step 0 evaluation, every 2nd step, evaluations at 3 and 6.
    let lines = read_metrics(&d.join("metrics.jsonl")).unwrap();
    assert_eq!(
        lines.iter().map(|l| l.step).collect::<Vec<_>>(),
        vec![0, 2, 3, 4, 6]
    );
    assert!(lines[0].train_loss.is_none() && lines[0].eval_loss.is_some());
    assert!(lines[0].eval_loss_ewa.is_empty());
    assert!(lines[1].eval_loss.is_none() && lines[1].train_loss.is_some());
    assert_eq!(lines[2].eval_loss_ewa.len(), 1);
    assert_eq!(lines[4].tokens, 6 * 4 * 32);
    assert!(lines
        .iter()
        .skip(1)
        .all(|l| l.lr == Some(0.01) && l.grad_norm.is_some()));
    assert!(lines.windows(2).all(|w| w[0].elapsed <= w[1].elapsed));
    // summary.json
    let summary: Summary =
        serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap()).unwrap();
    assert_eq!(Some(&summary), report.summary.as_ref());
    assert_eq!((summary.steps, summary.tokens), (6, 6 * 128));
    let easy = &summary.targets[0];
    assert_eq!(
        easy.raw.unwrap().step,
        3,
        "first evaluation below 6.0 after step 0"
    );
    assert_eq!(easy.ewa["0.5"].unwrap().step, 3);
    assert!(summary.targets[1].raw.is_none());
    assert!(summary.timing.tokens_per_second > 0.0);
    assert_eq!(summary.final_losses.eval_loss, lines[4].eval_loss);
    // env.json
    let env: EnvInfo =
        serde_json::from_str(&std::fs::read_to_string(d.join("env.json")).unwrap()).unwrap();
    assert_eq!(env.device, "cpu");
    assert_eq!(env.candle_version, "0.11.1");
    // The checkpoint manifest.
    let ck = final_checkpoint(d);
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(ck.dir.join(checkpoint::MANIFEST)).unwrap()).unwrap();
    assert_eq!(manifest.state.step, 6);
    assert_eq!(manifest.config, saved);
    assert_eq!(manifest.files.len(), 3);
}

/// Writes shards holding `train` and `val` (vocab `vocab`) into `dir`.
fn shards(dir: &Path, train: &[u16], val: &[u16], vocab: usize) {
    let meta = ShardMeta {
        tokenizer: "test".into(),
        vocab_size: vocab,
        train_tokens: train.len() as u64,
        val_tokens: val.len() as u64,
        sources: vec![],
    };
    optlab::data::tokens::write_shards(dir, train, val, &meta).unwrap();
}

fn err_of(text: &str, data_dir: Option<&Path>) -> String {
    let cfg = match RunConfig::parse(text, &[]) {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    let out = tempfile::tempdir().unwrap();
    let mut o = RunOptions::new(out.path());
    if data_dir.is_none() {
        o.dataset = Some(brown());
    }
    match run(&cfg, &o) {
        Ok(_) => panic!("expected an error for\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_data_is_a_clear_error_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let body = |extra: &str| {
        config(
            "name = \"adamw\"",
            &format!(
                "[data]\ndir = \"{}\"\n[train]\nbatch_size = 2\nsteps = 5\n[eval]\ntokens = 32\n{extra}",
                d.display()
            ),
        )
    };
    // Missing shards.
    let err = err_of(&body(""), Some(d));
    assert!(err.contains("train.bin"), "{err}");
    // Token ids beyond the model's vocabulary.
    shards(d, &[300; 200], &[1; 100], 512);
    let err = err_of(&body(""), Some(d));
    assert!(err.contains("model.vocab_size"), "{err}");
    // A context longer than the data.
    shards(d, &[1; 20], &[1; 100], 256);
    let err = err_of(&body(""), Some(d));
    assert!(
        err.contains("model.context") && err.contains("training"),
        "{err}"
    );
    // An odd-length (truncated) shard.
    shards(d, &[1; 200], &[1; 100], 256);
    let train = d.join("train.bin");
    let mut bytes = std::fs::read(&train).unwrap();
    bytes.pop();
    std::fs::write(&train, bytes).unwrap();
    let err = err_of(&body(""), Some(d));
    assert!(err.contains("odd length"), "{err}");
    // An evaluation budget beyond the validation split (one sequence of 32 tokens).
    shards(d, &[1; 200], &[1; 40], 256);
    let err = err_of(&body("").replace("tokens = 32", "tokens = 64"), Some(d));
    assert!(err.contains("eval.tokens"), "{err}");
    // A budget that would repeat data, when repetition is not allowed.
    shards(d, &[1; 200], &[1; 100], 256);
    let strict = body("").replace("steps = 5", "steps = 5\nallow_repeat = false");
    let err = err_of(&strict, Some(d));
    assert!(
        err.contains("train.allow_repeat") && err.contains("repeat"),
        "{err}"
    );
    // Allowed, the run says so.
    let cfg = parse(&body(""));
    let out = tempfile::tempdir().unwrap();
    let report = run_ok(&cfg, &RunOptions::new(out.path()));
    assert!(
        report.notes.iter().any(|n| n.contains("repeat")),
        "{:?}",
        report.notes
    );
    let s = report.summary.unwrap();
    assert!(s.data.repeated && s.data.epochs > 1, "{:?}", s.data);
}

#[test]
fn bad_configs_and_mismatched_or_corrupt_checkpoints_are_clear_errors() {
    let base = "[train]\nbatch_size = 2\nsteps = 4\n[eval]\ninterval = 0\ntokens = 256\n\
                [checkpoint]\ninterval = 2";
    for (opt, body, needle) in [
        ("name = \"adamz\"", base, "adamz"),
        ("name = \"adamw\"\nbetas = [0.9, 1.5]", base, "betas"),
        (
            "name = \"adamw\"",
            "[train]\nsteps = 4\nmicro_batch = 64",
            "train.micro_batch",
        ),
        ("name = \"adamw\"", "[train]\nstepz = 4", "stepz"),
        (
            "name = \"adamw\"",
            "[train]\nsteps = 4\n[schedule]\nkind = \"cosine\"",
            "cosine",
        ),
        (
            "name = \"adamw\"",
            "[train]\nsteps = 4\n[[groups]]\nnames = [\"nope.*\"]\nlr = 0.1",
            "nope",
        ),
    ] {
        let err = err_of(&config(opt, body), None);
        assert!(err.contains(needle), "{needle}: {err}");
    }

    // A preloaded dataset that is not the one the config names.
    let gpt2 = parse(&config(
        "name = \"adamw\"",
        &format!("[data]\ntokenizer = \"gpt2\"\n{base}"),
    ));
    let elsewhere = tempfile::tempdir().unwrap();
    let err = run(&gpt2, &opts(elsewhere.path())).unwrap_err().to_string();
    assert!(err.contains("RunOptions"), "{err}");

    let cfg = parse(&config("name = \"adamw\"\nlr = 0.01", base));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Resuming nothing.
    let mut resume = opts(d);
    resume.resume = true;
    let err = run(&cfg, &resume).unwrap_err().to_string();
    assert!(err.contains("nothing to resume"), "{err}");
    // A finished run is not overwritten by a fresh one.
    run_ok(&cfg, &opts(d));
    let err = run(&cfg, &opts(d)).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    // A different run may not resume this one.
    let other = parse(&config("name = \"adamw\"\nlr = 0.02", base));
    let err = run(&other, &resume).unwrap_err().to_string();
    assert!(
        err.contains("optimizer.lr") && err.contains("different run"),
        "{err}"
    );
    let other =
        parse(&config("name = \"adamw\"\nlr = 0.01", base).replace("\"test\"", "\"mlp-test\""));
    let err = run(&other, &resume).unwrap_err().to_string();
    assert!(err.contains("model.kind"), "{err}");
    // Extending the budget is allowed.
    let longer = parse(&config(
        "name = \"adamw\"\nlr = 0.01",
        &base.replace("steps = 4", "steps = 6"),
    ));
    let r = run_ok(&longer, &resume);
    assert_eq!(r.steps, 6);
    // A corrupt checkpoint file.
    let ck = final_checkpoint(d);
    let model = ck.dir.join(checkpoint::MODEL_FILE);
    let mut bytes = std::fs::read(&model).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x40;
    std::fs::write(&model, bytes).unwrap();
    let err = run(&longer, &resume).unwrap_err().to_string();
    assert!(
        err.contains("corrupt") && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn checkpoint_of_another_model_is_refused() {
    // Same config text but a checkpoint whose parameter list was tampered with.
    let cfg = parse(&config(
        "name = \"adamw\"",
        "[train]\nbatch_size = 2\nsteps = 4\n[eval]\ninterval = 0\ntokens = 256\n\
         [checkpoint]\ninterval = 2",
    ));
    let dir = tempfile::tempdir().unwrap();
    let mut first = opts(dir.path());
    first.stop_after = Some(2);
    run_ok(&cfg, &first);
    let ck = final_checkpoint(dir.path());
    let mut manifest = ck.manifest.clone();
    manifest.params[0].1 = vec![1, 2, 3];
    let files: Vec<(&'static str, Vec<u8>)> = [checkpoint::MODEL_FILE, checkpoint::OPTIMIZER_FILE]
        .into_iter()
        .map(|f| (f, ck.files[f].clone()))
        .collect();
    checkpoint::write(dir.path(), manifest, files).unwrap();
    let mut resume = opts(dir.path());
    resume.resume = true;
    let err = run(&cfg, &resume).unwrap_err().to_string();
    assert!(err.contains("differ from this model"), "{err}");
}

#[test]
fn presets_parse_and_fit_the_embedded_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/configs");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        // Sweep definitions (with `axes`) live beside the run presets; the sweep tests own them.
        let text = std::fs::read_to_string(&path).unwrap();
        let table: toml::Table = text.parse().unwrap();
        if table.contains_key("axes") {
            continue;
        }
        let cfg = RunConfig::from_file(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
        let data = brown();
        let context = cfg.model.context();
        data.check_model(cfg.model.vocab_size(), context).unwrap();
        data.eval_batches(context, cfg.eval_batch_size(), cfg.eval.tokens)
            .unwrap();
        let sampler = data
            .sampler(context, cfg.train.batch_size, cfg.seed)
            .unwrap();
        let needed = cfg.total_steps() * cfg.batch_tokens();
        assert!(
            needed <= sampler.tokens_per_epoch(),
            "{}: {needed} tokens exceed one pass of {}",
            path.display(),
            sampler.tokens_per_epoch()
        );
        names.push(path.file_stem().unwrap().to_string_lossy().into_owned());
    }
    names.sort();
    assert_eq!(names, ["d256-l3", "d512-l3", "d512-l6", "tiny"]);
}

#[test]
fn readme_config_example_parses() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("### The run config")
        .nth(1)
        .expect("README has a run config section");
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a toml block");
    let cfg = RunConfig::parse(block, &[]).unwrap_or_else(|e| panic!("{e}\n{block}"));
    assert_eq!(cfg.total_steps(), 120);
    assert_eq!(cfg.groups.len(), 1);
}

#[test]
fn the_device_is_a_config_field_outside_the_runs_identity() {
    let base = "[train]\nbatch_size = 2\nsteps = 4\n[eval]\ninterval = 0\ntokens = 256\n\
                [checkpoint]\ninterval = 2";
    let cpu = parse(&config("name = \"adamw\"", base));
    assert!(cpu.device.is_cpu());
    // The CPU is the default and stays implicit in the resolved config (so resolved configs
    // and sweep ids from before the field existed are unchanged); a GPU is written out.
    assert!(!cpu.to_toml().unwrap().contains("device"));
    let gpu = parse(&format!(
        "device = \"cuda:1\"\n{}",
        config("name = \"adamw\"", base)
    ));
    assert!(gpu.to_toml().unwrap().contains("device = \"cuda:1\""));
    assert_eq!(parse(&gpu.to_toml().unwrap()).device, gpu.device);
    let set = RunConfig::parse(&config("name = \"adamw\"", base), &["device=cuda".into()]).unwrap();
    assert_eq!(set.device.to_string(), "cuda:0");
    for bad in ["\"gpu\"", "\"cuda:x\"", "3"] {
        let text = format!("device = {bad}\n{}", config("name = \"adamw\"", base));
        let err = RunConfig::parse(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("device"), "{bad}: {err}");
    }

    // A run stopped on the CPU may continue on another device: only opening it can fail.
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.stop_after = Some(2);
    assert_eq!(run_ok(&cpu, &o).steps, 2);
    let mut resume = opts(dir.path());
    resume.resume = true;
    let mut elsewhere = cpu.clone();
    elsewhere.device = "cuda".parse().unwrap();
    let err = run(&elsewhere, &resume).unwrap_err().to_string();
    assert!(!err.contains("different run"), "{err}");
    assert!(err.contains("device") && err.contains("cpu"), "{err}");
    #[cfg(not(feature = "cuda"))]
    assert!(err.contains("--features cuda"), "{err}");
    // The failed attempt touched nothing: the CPU resumes where it stopped.
    let done = run_ok(&cpu, &resume);
    assert_eq!(done.steps, 4);
    let env: EnvInfo =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("env.json")).unwrap())
            .unwrap();
    assert_eq!(env.device, "cpu");
    assert!(env.gpu.is_none());
}
