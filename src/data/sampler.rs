//! Deterministic single-pass batching.
//!
//! The training stream is cut into non-overlapping windows of `context + 1` tokens (window `i`
//! starts at token `i·context`; its first `context` tokens are the inputs, its last `context`
//! the targets). Each pass ("epoch") visits every window once, in an order drawn from the seed
//! and the epoch number, so a run is a pure function of (data, seed) and resumes exactly from a
//! [`SamplerPosition`]. The papers train for a single pass; a run that goes past it sees data
//! again, and every batch says how many of its sequences are such repeats.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;
use serde::{Deserialize, Serialize};

use super::tokens::Tokens;
use crate::error::{Error, Result};

/// `context + 1`-token sequences of a batch, flattened row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Input ids, `rows × context`.
    pub inputs: Vec<u32>,
    /// Target ids (inputs shifted by one), `rows × context`.
    pub targets: Vec<u32>,
    /// Number of sequences.
    pub rows: usize,
    /// Sequence length.
    pub context: usize,
    /// Sequences of this batch that an earlier pass already served (0 during the first pass).
    pub repeated: usize,
    /// Pass of the batch's last sequence (0 = first pass).
    pub epoch: u64,
}

impl Batch {
    /// Tokens predicted by this batch (`rows × context`).
    pub fn tokens(&self) -> usize {
        self.rows * self.context
    }

    /// `(inputs, targets)` as U32 tensors of shape `(rows, context)` on `device`.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let shape = (self.rows, self.context);
        Ok((
            Tensor::from_slice(&self.inputs, shape, device)?,
            Tensor::from_slice(&self.targets, shape, device)?,
        ))
    }

    /// Splits into consecutive micro-batches of at most `rows` sequences each (the last may be
    /// smaller), for gradient accumulation. `repeated` is attributed to the rows it counts from
    /// the end, where an epoch boundary puts them.
    pub fn split(&self, rows: usize) -> Result<Vec<Batch>> {
        if rows == 0 {
            return Err(Error::config("micro_batch", "must be >= 1"));
        }
        let fresh = self.rows - self.repeated;
        let mut out = Vec::with_capacity(self.rows.div_ceil(rows));
        let mut start = 0;
        while start < self.rows {
            let n = rows.min(self.rows - start);
            let (a, b) = (start * self.context, (start + n) * self.context);
            let end = start + n;
            out.push(Batch {
                inputs: self.inputs[a..b].to_vec(),
                targets: self.targets[a..b].to_vec(),
                rows: n,
                context: self.context,
                repeated: end.saturating_sub(fresh.max(start)).min(n),
                epoch: self.epoch,
            });
            start = end;
        }
        Ok(out)
    }
}

/// Where a [`Sampler`] stands: the pass and the index of the next window in that pass's order.
/// Save it in checkpoints; [`Sampler::seek`] restores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SamplerPosition {
    /// Current pass (0 = first).
    pub epoch: u64,
    /// Windows of this pass already served.
    pub cursor: u64,
}

/// Serves training batches in a seeded order, one pass at a time.
#[derive(Debug, Clone)]
pub struct Sampler {
    tokens: Tokens,
    context: usize,
    batch_size: usize,
    seed: u64,
    order: Vec<u32>,
    pos: SamplerPosition,
}

impl Sampler {
    /// A sampler over `tokens` with `batch_size` sequences of `context` tokens per batch.
    pub fn new(tokens: Tokens, context: usize, batch_size: usize, seed: u64) -> Result<Self> {
        if context == 0 {
            return Err(Error::config("model.context", "must be >= 1"));
        }
        if batch_size == 0 {
            return Err(Error::config("batch_size", "must be >= 1"));
        }
        let windows = windows(tokens.len(), context);
        if windows == 0 {
            return Err(Error::config(
                "model.context",
                format!(
                    "{context} is longer than the training data: a sequence needs {} tokens, the \
                     train split holds {}",
                    context.saturating_add(1),
                    tokens.len()
                ),
            ));
        }
        if windows > u32::MAX as usize {
            return Err(Error::Msg(format!(
                "{windows} training sequences: more than this sampler indexes (2^32)"
            )));
        }
        let mut s = Self {
            tokens,
            context,
            batch_size,
            seed,
            order: Vec::new(),
            pos: SamplerPosition::default(),
        };
        s.order = s.order_for(0);
        Ok(s)
    }

    fn order_for(&self, epoch: u64) -> Vec<u32> {
        let n = windows(self.tokens.len(), self.context);
        let mut order: Vec<u32> = (0..n as u32).collect();
        // Fisher-Yates from a stream keyed by (seed, epoch).
        let mut rng = ChaCha12Rng::seed_from_u64(self.seed);
        rng.set_stream(epoch);
        for i in (1..n).rev() {
            let j = rng.random_range(0..=i);
            order.swap(i, j);
        }
        order
    }

    /// Sequences in one pass over the training data.
    pub fn windows_per_epoch(&self) -> usize {
        self.order.len()
    }

    /// Tokens predicted in one pass (`windows × context`).
    pub fn tokens_per_epoch(&self) -> u64 {
        (self.order.len() * self.context) as u64
    }

    /// Batches that fit in the first pass without repeating data.
    pub fn batches_per_epoch(&self) -> u64 {
        (self.order.len() / self.batch_size) as u64
    }

    /// Sequences per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Sequence length.
    pub fn context(&self) -> usize {
        self.context
    }

    /// The current position.
    pub fn position(&self) -> SamplerPosition {
        self.pos
    }

    /// Sequences served so far, over all passes.
    pub fn sequences_served(&self) -> u64 {
        self.pos.epoch * self.order.len() as u64 + self.pos.cursor
    }

    /// Sequences served that an earlier pass had already served (0 while in the first pass).
    pub fn sequences_repeated(&self) -> u64 {
        self.sequences_served()
            .saturating_sub(self.order.len() as u64)
    }

    /// Moves to `pos` (from [`position`](Self::position), e.g. in a checkpoint).
    pub fn seek(&mut self, pos: SamplerPosition) -> Result<()> {
        if pos.cursor > self.order.len() as u64 {
            return Err(Error::State(format!(
                "data position {pos:?} is past the end of a pass ({} sequences): the data or \
                 context differs from the run that saved it",
                self.order.len()
            )));
        }
        if pos.epoch != self.pos.epoch {
            self.order = self.order_for(pos.epoch);
        }
        self.pos = pos;
        Ok(())
    }

    /// The next batch. At the end of a pass it continues into the next one (a fresh order), and
    /// the batch counts the repeated sequences.
    pub fn next_batch(&mut self) -> Batch {
        let t = self.context;
        let mut inputs = Vec::with_capacity(self.batch_size * t);
        let mut targets = Vec::with_capacity(self.batch_size * t);
        let mut window = Vec::with_capacity(t + 1);
        let mut repeated = 0;
        for _ in 0..self.batch_size {
            if self.pos.cursor as usize == self.order.len() {
                self.pos = SamplerPosition {
                    epoch: self.pos.epoch + 1,
                    cursor: 0,
                };
                self.order = self.order_for(self.pos.epoch);
            }
            let w = self.order[self.pos.cursor as usize] as usize;
            window.clear();
            self.tokens.extend_u32(w * t, t + 1, &mut window);
            inputs.extend_from_slice(&window[..t]);
            targets.extend_from_slice(&window[1..]);
            if self.pos.epoch > 0 {
                repeated += 1;
            }
            self.pos.cursor += 1;
        }
        Batch {
            inputs,
            targets,
            rows: self.batch_size,
            context: t,
            repeated,
            epoch: self.pos.epoch,
        }
    }
}

/// Non-overlapping `context + 1`-token windows in `n` tokens (consecutive windows share one
/// token: the last target of one is the first input of the next).
pub fn windows(n: usize, context: usize) -> usize {
    n.saturating_sub(1).checked_div(context).unwrap_or(0)
}

/// The fixed evaluation set: the first `max_tokens / context` windows of `tokens`, in order,
/// in batches of `batch_size` (the last may be smaller). Identical at every call.
pub fn eval_batches(
    tokens: &Tokens,
    context: usize,
    batch_size: usize,
    max_tokens: u64,
) -> Result<Vec<Batch>> {
    if batch_size == 0 {
        return Err(Error::config("eval.batch_size", "must be >= 1"));
    }
    let available = windows(tokens.len(), context);
    if available == 0 {
        return Err(Error::config(
            "model.context",
            format!(
                "{context} is longer than the validation data: a sequence needs {} tokens, the \
                 validation split holds {}",
                context.saturating_add(1),
                tokens.len()
            ),
        ));
    }
    let wanted = (max_tokens / context as u64) as usize;
    if wanted == 0 {
        return Err(Error::config(
            "eval.tokens",
            format!("{max_tokens} is less than one sequence of {context} tokens"),
        ));
    }
    if wanted > available {
        return Err(Error::config(
            "eval.tokens",
            format!(
                "{max_tokens} exceeds the validation split: it holds {available} sequences of \
                 {context} tokens ({} tokens)",
                available * context
            ),
        ));
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start < wanted {
        let rows = batch_size.min(wanted - start);
        let mut inputs = Vec::with_capacity(rows * context);
        let mut targets = Vec::with_capacity(rows * context);
        let mut window = Vec::with_capacity(context + 1);
        for w in start..start + rows {
            window.clear();
            tokens.extend_u32(w * context, context + 1, &mut window);
            inputs.extend_from_slice(&window[..context]);
            targets.extend_from_slice(&window[1..]);
        }
        out.push(Batch {
            inputs,
            targets,
            rows,
            context,
            repeated: 0,
            epoch: 0,
        });
        start += rows;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(n: usize) -> Tokens {
        Tokens::from_vec((0..n).map(|i| i as u16).collect())
    }

    #[test]
    fn one_pass_covers_every_window_once() {
        // 41 tokens, context 4 → 10 windows; batches of 3 → 3 full batches, then a boundary.
        let mut s = Sampler::new(stream(41), 4, 3, 7).unwrap();
        assert_eq!(s.windows_per_epoch(), 10);
        assert_eq!(s.batches_per_epoch(), 3);
        let mut starts = Vec::new();
        for _ in 0..3 {
            let b = s.next_batch();
            assert_eq!(b.repeated, 0);
            for r in 0..b.rows {
                let row = &b.inputs[r * 4..r * 4 + 4];
                let tgt = &b.targets[r * 4..r * 4 + 4];
                assert_eq!(row[0] % 4, 0);
                assert_eq!(tgt, &[row[0] + 1, row[0] + 2, row[0] + 3, row[0] + 4]);
                starts.push(row[0]);
            }
        }
        let b = s.next_batch();
        assert_eq!((b.repeated, b.epoch), (2, 1));
        assert_eq!(s.sequences_repeated(), 2);
        starts.push(b.inputs[0]);
        starts.sort();
        assert_eq!(starts, (0..10).map(|i| i * 4).collect::<Vec<u32>>());
    }

    #[test]
    fn seeded_and_resumable() {
        let a: Vec<Batch> = {
            let mut s = Sampler::new(stream(200), 5, 4, 1).unwrap();
            (0..20).map(|_| s.next_batch()).collect()
        };
        let mut s = Sampler::new(stream(200), 5, 4, 1).unwrap();
        for b in &a[..13] {
            assert_eq!(&s.next_batch(), b);
        }
        let pos = s.position();
        let mut resumed = Sampler::new(stream(200), 5, 4, 1).unwrap();
        resumed.seek(pos).unwrap();
        for b in &a[13..] {
            assert_eq!(&resumed.next_batch(), b);
        }
        let mut other = Sampler::new(stream(200), 5, 4, 2).unwrap();
        assert_ne!(other.next_batch(), a[0]);
        let bad = SamplerPosition {
            epoch: 0,
            cursor: 1000,
        };
        assert!(resumed.seek(bad).is_err());
    }

    #[test]
    fn split_into_micro_batches() {
        let mut s = Sampler::new(stream(41), 4, 3, 7).unwrap();
        for _ in 0..3 {
            s.next_batch();
        }
        let b = s.next_batch(); // 1 fresh + 2 repeated rows
        let parts = b.split(2).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!((parts[0].rows, parts[0].repeated), (2, 1));
        assert_eq!((parts[1].rows, parts[1].repeated), (1, 1));
        let joined: Vec<u32> = parts.iter().flat_map(|p| p.inputs.clone()).collect();
        assert_eq!(joined, b.inputs);
        assert!(b.split(0).is_err());
        let (x, y) = b.to_tensors(&Device::Cpu).unwrap();
        assert_eq!((x.dims(), y.dims()), (&[3usize, 4][..], &[3usize, 4][..]));
    }

    #[test]
    fn context_longer_than_data_is_an_error() {
        let err = Sampler::new(stream(8), 8, 1, 0).unwrap_err().to_string();
        assert!(err.contains("longer than the training data"), "{err}");
        assert!(Sampler::new(stream(9), 8, 1, 0).is_ok());
    }

    #[test]
    fn eval_set_is_fixed_and_bounded() {
        let v = stream(101);
        let a = eval_batches(&v, 10, 4, 70).unwrap();
        assert_eq!(a.iter().map(|b| b.rows).collect::<Vec<_>>(), vec![4, 3]);
        assert_eq!(a[0].inputs[10], 10);
        assert_eq!(a, eval_batches(&v, 10, 4, 70).unwrap());
        assert_eq!(eval_batches(&v, 10, 4, 101).unwrap().len(), 3); // all 10 windows
        assert!(eval_batches(&v, 10, 4, 110).is_err());
        assert!(eval_batches(&v, 10, 4, 5).is_err());
        assert!(eval_batches(&v, 200, 4, 500).is_err());
    }
}
