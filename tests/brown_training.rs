//! Models and data together: a few AdamW steps on the embedded corpus bring the held-out loss
//! below the corpus's unigram entropy (what a model that ignores context can reach).

use candle_core::{DType, Device};
use optlab::data::{DataConfig, Dataset};
use optlab::models::{Model, ModelConfig};
use optlab::optim::adamw::AdamWConfig;
use optlab::optim::{Driver, OptimConfig, Optimizer};

fn eval_loss(model: &Model, data: &Dataset, context: usize) -> f64 {
    let (mut sum, mut tokens) = (0.0, 0);
    for b in data.eval_batches(context, 16, 16 * 32 * 4).unwrap() {
        let (x, y) = b.to_tensors(&Device::Cpu).unwrap();
        let ce = model.forward_loss(&x, &y).unwrap().ce;
        sum += f64::from(ce.to_scalar::<f32>().unwrap()) * b.tokens() as f64;
        tokens += b.tokens();
    }
    sum / tokens as f64
}

fn train(preset: &str, steps: usize) -> (f64, f64, f64) {
    let data = Dataset::load(&DataConfig::default()).unwrap();
    let cfg = ModelConfig::preset(preset).unwrap();
    let context = cfg.context();
    data.check_model(cfg.vocab_size(), context).unwrap();
    let model = cfg.build(DType::F32, &Device::Cpu).unwrap();
    let adamw = AdamWConfig {
        lr: 1e-2,
        betas: (0.9, 0.95),
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    let mut opt = Driver::new(OptimConfig::Adamw(adamw), model.params().unwrap()).unwrap();
    let mut sampler = data.sampler(context, 16, 0).unwrap();
    let before = eval_loss(&model, &data, context);
    for _ in 0..steps {
        let batch = sampler.next_batch();
        assert_eq!(batch.repeated, 0);
        let (x, y) = batch.to_tensors(&Device::Cpu).unwrap();
        let loss = model.forward_loss(&x, &y).unwrap();
        opt.step(&loss.total.backward().unwrap()).unwrap();
    }
    (
        before,
        eval_loss(&model, &data, context),
        data.unigram_entropy(),
    )
}

#[test]
fn mlp_beats_the_unigram_entropy() {
    let (before, after, unigram) = train("mlp-test", 60);
    assert!(before > 5.0, "{before}");
    assert!(
        after < unigram - 0.3,
        "{before} -> {after} (unigram {unigram})"
    );
}

#[test]
fn decoder_beats_the_unigram_entropy() {
    let (before, after, unigram) = train("test", 40);
    assert!(before > 5.0, "{before}");
    assert!(
        after < unigram - 0.2,
        "{before} -> {after} (unigram {unigram})"
    );
}
