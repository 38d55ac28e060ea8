//! Property-based fuzzing of every file a user can hand optlab: run configs, sweep files,
//! optimizer and group configs, token shards with their `meta.json` (and `prepare`'s input),
//! optimizer and EWA state files, checkpoints, golden files and the `cbs fit` CSV.
//!
//! Inputs are random bytes, byte-level mutations of valid files (truncation, bit flips, inserted
//! tokens such as `nan`, `-1`, `1e309` or `2^60`, deleted and duplicated ranges), structure-aware
//! mutations of their TOML/JSON/safetensors structure (fields deleted, duplicated, renamed or
//! replaced by values of another type, huge, negative, non-finite or unicode), and deeply nested
//! documents. The property: loading returns `Ok` or an `Err`, never panics, never aborts and
//! never makes an allocation above [`ALLOC_CAP`] (a header claiming 2^60 elements must be an
//! error, not an out-of-memory abort); where a file is loaded into an existing object (state
//! into an optimizer or EWA, a checkpoint into a run directory), an `Err` leaves it unchanged.
//!
//! `cargo test` runs a short seeded pass of every target (the same cases every time). Longer
//! runs (`scripts/fuzz-parsers.sh`) set
//! - `OPTLAB_FUZZ_SECONDS`: time budget per target; rounds with fresh seeds run until it is spent;
//! - `OPTLAB_FUZZ_CASES`: cases per round (default: each target's short-run count);
//! - `OPTLAB_FUZZ_SEED`: the base seed (default fixed), to replay or vary a run.
//!
//! A failure prints the target, the round's seed and the shrunk input; each bug found this way
//! has a regression test with that input at the end of this file.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as ProptestConfig, RngAlgorithm, TestRng, TestRunner};
use serde_json::Value as Json;

use optlab::analysis::csv::parse_cbs_csv;
use optlab::analysis::{analyze, CbsReport};
use optlab::conformance::{replay, GoldenCase};
use optlab::data::{prepare_shards, Dataset, ShardMeta, Tokenizer};
use optlab::optim::{Driver, NamedParams, OptimConfig, Optimizer, OptimizerSpec, StateDict};
use optlab::plots::{
    plot_b_star_scaling, plot_steps_to_target, BStarScalingPlot, Layout as PlotLayout,
    ScalingPoint, StepsSeries, StepsToTargetPlot,
};
use optlab::runner::{run, RunConfig, RunOptions};
use optlab::sweep::spec::SweepSpec;
use optlab::training::Ewa;

// ---------------------------------------------------------------------------------------------
// Allocation cap

/// The largest single allocation a loader may make while fuzzed (1 GiB). Above it the
/// allocation fails, which aborts the test binary with "memory allocation of N bytes failed":
/// an input that makes a loader allocate what its header claims, unchecked, shows up as a crash
/// here instead of as an out-of-memory kill on a user's machine.
const ALLOC_CAP: usize = 1 << 30;

struct CappedAlloc;

// SAFETY: forwards to the system allocator; refusing a request (null) is allowed by the trait.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_CAP {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_CAP {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOC_CAP {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: CappedAlloc = CappedAlloc;

// ---------------------------------------------------------------------------------------------
// The driver: seeded rounds, a case count or a time budget per target

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v}: {e}")))
}

/// How far inputs got, per target and stage (`parsed`, `loaded`, `stepped` …): printed with
/// each target's summary, so a run shows that the damage reaches the code past the first check.
static STAGES: std::sync::Mutex<BTreeMap<(&'static str, &'static str), u64>> =
    std::sync::Mutex::new(BTreeMap::new());

fn reached(target: &'static str, stage: &'static str) {
    *STAGES.lock().unwrap().entry((target, stage)).or_insert(0) += 1;
}

fn stages_of(target: &str) -> String {
    let stages = STAGES.lock().unwrap();
    let parts: Vec<String> = stages
        .iter()
        .filter(|((t, _), _)| *t == target)
        .map(|((_, s), n)| format!("{s} {n}"))
        .collect();
    if parts.is_empty() {
        "none accepted".into()
    } else {
        parts.join(", ")
    }
}

/// FNV-1a of the target name, to give each target its own stream.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Runs `test` on inputs drawn from `strategy`: one round of `cases` cases with a fixed seed,
/// or rounds with fresh seeds until `OPTLAB_FUZZ_SECONDS` are spent. A failing case (an `Err`
/// from `test` or a panic inside it) is shrunk and reported with the round's seed.
fn fuzz<S>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: fmt::Debug,
{
    let budget = env_u64("OPTLAB_FUZZ_SECONDS").map(Duration::from_secs);
    let cases = env_u64("OPTLAB_FUZZ_CASES").map_or(cases, |c| c as u32);
    let base = env_u64("OPTLAB_FUZZ_SEED").unwrap_or(0x6f70_746c_6162);
    let start = Instant::now();
    let (mut rounds, mut total) = (0u64, 0u64);
    loop {
        let seed = base ^ name_hash(name) ^ rounds.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut seed_bytes = [0u8; 32];
        for (i, chunk) in seed_bytes.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&(seed.rotate_left(16 * i as u32)).to_le_bytes());
        }
        let config = ProptestConfig {
            cases,
            failure_persistence: None,
            rng_algorithm: RngAlgorithm::ChaCha,
            max_shrink_iters: 2048,
            ..ProptestConfig::default()
        };
        let mut runner = TestRunner::new_with_rng(
            config,
            TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
        );
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("fuzz {name}: round {rounds} (seed {seed:#x}, base {base:#x}) failed: {e}");
        }
        rounds += 1;
        total += u64::from(cases);
        match budget {
            Some(b) if start.elapsed() < b => continue,
            _ => break,
        }
    }
    println!(
        "fuzz {name}: {total} cases in {rounds} rounds, {:.2} s, base seed {base:#x}: no failure \
         (reached: {})",
        start.elapsed().as_secs_f64(),
        stages_of(name)
    );
}

// ---------------------------------------------------------------------------------------------
// Inputs

/// Bytes that print as (lossy) text, so a shrunk failing input can be read and copied.
#[derive(Clone)]
struct Bytes(Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes: {:?}",
            self.0.len(),
            String::from_utf8_lossy(&self.0)
        )
    }
}

impl Bytes {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

/// Snippets worth inserting into text formats: numbers at the edges of every type, non-finite
/// spellings, structure characters, unicode, escapes.
const TOKENS: &[&str] = &[
    "-1",
    "0",
    "-0",
    "1e309",
    "-1e309",
    "5e-324",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "Infinity",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "-9223372036854775808",
    "1152921504606846976",
    "4294967296",
    "65536",
    "1e18",
    "0.0",
    "true",
    "null",
    "\"\"",
    "''",
    "\"",
    "'",
    "[",
    "]",
    "{",
    "}",
    ",",
    "=",
    ":",
    ".",
    "\n",
    "\r\n",
    "#",
    "\\",
    "\\u0000",
    "\\uD800",
    "\u{0}",
    "é",
    "\u{202e}",
    "🦀",
    "\u{feff}",
    "[[groups]]\n",
    "[optimizer]\n",
    "[[optimizers]]\n",
    "name = \"soap\"\n",
    "a.b.c = 1\n",
    "1979-05-27T07:32:00Z",
];

/// One byte-level edit. Positions are [`Index`]es, scaled to the current length.
#[derive(Clone, Debug)]
enum ByteOp {
    Truncate(Index),
    Flip(Index, u8),
    Set(Index, u8),
    Insert(Index, Vec<u8>),
    Token(Index, Index),
    Delete(Index, u8),
    Duplicate(Index, u16),
}

fn byte_op() -> impl Strategy<Value = ByteOp> {
    prop_oneof![
        any::<Index>().prop_map(ByteOp::Truncate),
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| ByteOp::Flip(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| ByteOp::Set(i, b)),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| ByteOp::Insert(i, b)),
        (any::<Index>(), any::<Index>()).prop_map(|(i, t)| ByteOp::Token(i, t)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, n)| ByteOp::Delete(i, n)),
        (any::<Index>(), any::<u16>()).prop_map(|(i, n)| ByteOp::Duplicate(i, n)),
    ]
}

fn apply_byte_ops(mut b: Vec<u8>, ops: &[ByteOp]) -> Vec<u8> {
    for op in ops {
        let pos = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len + 1) };
        match op {
            ByteOp::Truncate(i) => {
                let at = pos(i, b.len());
                b.truncate(at);
            }
            ByteOp::Flip(i, bit) if !b.is_empty() => {
                let at = i.index(b.len());
                b[at] ^= 1 << bit;
            }
            ByteOp::Set(i, v) if !b.is_empty() => {
                let at = i.index(b.len());
                b[at] = *v;
            }
            ByteOp::Insert(i, bytes) => {
                let at = pos(i, b.len());
                b.splice(at..at, bytes.iter().copied());
            }
            ByteOp::Token(i, t) => {
                let at = pos(i, b.len());
                let tok = TOKENS[t.index(TOKENS.len())].as_bytes();
                b.splice(at..at, tok.iter().copied());
            }
            ByteOp::Delete(i, n) if !b.is_empty() => {
                let at = i.index(b.len());
                let end = (at + usize::from(*n) + 1).min(b.len());
                b.drain(at..end);
            }
            ByteOp::Duplicate(i, n) if !b.is_empty() => {
                let at = i.index(b.len());
                let end = (at + usize::from(*n) + 1).min(b.len());
                let copy = b[at..end].to_vec();
                b.splice(end..end, copy);
            }
            _ => {}
        }
    }
    b
}

/// A value of any type and at the edges of every range, to put in place of a field.
#[derive(Clone, Debug)]
enum Weird {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    EmptyArray,
    EmptyTable,
    Array(Vec<Weird>),
}

fn weird() -> impl Strategy<Value = Weird> {
    let leaf = prop_oneof![
        prop::sample::select(vec![
            0i64,
            -1,
            1,
            2,
            -2,
            3,
            7,
            64,
            65535,
            65536,
            i64::from(u32::MAX),
            1 << 32,
            1 << 40,
            1 << 53,
            1 << 60,
            i64::MAX,
            i64::MIN,
            -(1 << 60),
        ])
        .prop_map(Weird::Int),
        any::<i64>().prop_map(Weird::Int),
        prop::sample::select(vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            1.5,
            1e-300,
            5e-324,
            1e300,
            f64::MAX,
            f64::MIN,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e18,
            1.152_921_504_606_847e18,
            0.999_999_999,
        ])
        .prop_map(Weird::Float),
        any::<f64>().prop_map(Weird::Float),
        prop::sample::select(vec![
            String::new(),
            "adamw".to_string(),
            "soap".to_string(),
            "shampoo".to_string(),
            "é🦀\u{202e}\u{0}".to_string(),
            "../../etc/passwd".to_string(),
            "/dev/zero".to_string(),
            "*".to_string(),
            "x".repeat(10_000),
            "1e3".to_string(),
            "nan".to_string(),
            "-1".to_string(),
            "f32".to_string(),
            "cuda:99".to_string(),
        ])
        .prop_map(Weird::Str),
        any::<String>().prop_map(Weird::Str),
        any::<bool>().prop_map(Weird::Bool),
        Just(Weird::EmptyArray),
        Just(Weird::EmptyTable),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop::collection::vec(inner, 1..4).prop_map(Weird::Array)
    })
}

/// One edit of a document tree (TOML or JSON), at the node an [`Index`] picks in pre-order.
#[derive(Clone, Debug)]
enum TreeOp {
    Delete(Index),
    Duplicate(Index),
    Replace(Index, Weird),
    Numeric(Index, u8),
    RenameKey(Index, Index),
    Nest(Index, u8),
}

fn tree_op() -> impl Strategy<Value = TreeOp> {
    prop_oneof![
        any::<Index>().prop_map(TreeOp::Delete),
        any::<Index>().prop_map(TreeOp::Duplicate),
        (any::<Index>(), weird()).prop_map(|(i, w)| TreeOp::Replace(i, w)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, k)| TreeOp::Numeric(i, k)),
        (any::<Index>(), any::<Index>()).prop_map(|(i, k)| TreeOp::RenameKey(i, k)),
        (any::<Index>(), 1u8..40).prop_map(|(i, d)| TreeOp::Nest(i, d)),
    ]
}

/// How a document is damaged.
#[derive(Clone, Debug)]
enum Damage {
    /// Random bytes, not derived from a valid file.
    Random(Vec<u8>),
    /// Byte edits of a valid file.
    Bytes(Vec<ByteOp>),
    /// Tree edits, then maybe byte edits.
    Tree(Vec<TreeOp>, Vec<ByteOp>),
    /// A valid file with one value nested `depth` levels deep (arrays or tables).
    Deep(u32, bool),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..512).prop_map(Damage::Random),
        3 => prop::collection::vec(byte_op(), 1..4).prop_map(Damage::Bytes),
        8 => prop::collection::vec(tree_op(), 1..3).prop_map(|t| Damage::Tree(t, vec![])),
        2 => (prop::collection::vec(tree_op(), 1..5), prop::collection::vec(byte_op(), 0..2))
            .prop_map(|(t, b)| Damage::Tree(t, b)),
        1 => (prop::sample::select(vec![64u32, 200, 1_000, 10_000, 100_000]), any::<bool>())
            .prop_map(|(d, t)| Damage::Deep(d, t)),
    ]
}

/// Keys to rename a field to: typos, case, unicode, the empty key.
const KEY_NAMES: &[&str] = &[
    "",
    "nmae",
    "Name",
    "expected_evals",
    "lr ",
    "é",
    "\u{0}",
    "__metadata__",
    "format",
    "groups",
    "step",
    "x",
    "/dev/zero",
    "../config.toml",
];

// --- TOML trees

fn toml_weird(w: &Weird) -> toml::Value {
    match w {
        Weird::Int(i) => toml::Value::Integer(*i),
        Weird::Float(f) => toml::Value::Float(*f),
        Weird::Str(s) => toml::Value::String(s.clone()),
        Weird::Bool(b) => toml::Value::Boolean(*b),
        Weird::EmptyArray => toml::Value::Array(vec![]),
        Weird::EmptyTable => toml::Value::Table(toml::Table::new()),
        Weird::Array(v) => toml::Value::Array(v.iter().map(toml_weird).collect()),
    }
}

fn toml_paths(v: &toml::Value, path: &mut Vec<PathSeg>, out: &mut Vec<Vec<PathSeg>>) {
    out.push(path.clone());
    match v {
        toml::Value::Table(t) => {
            for (k, c) in t {
                path.push(PathSeg::Key(k.clone()));
                toml_paths(c, path, out);
                path.pop();
            }
        }
        toml::Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                path.push(PathSeg::Idx(i));
                toml_paths(c, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug, PartialEq)]
enum PathSeg {
    Key(String),
    Idx(usize),
}

fn toml_at<'a>(v: &'a mut toml::Value, path: &[PathSeg]) -> Option<&'a mut toml::Value> {
    let mut cur = v;
    for seg in path {
        cur = match (seg, cur) {
            (PathSeg::Key(k), toml::Value::Table(t)) => t.get_mut(k)?,
            (PathSeg::Idx(i), toml::Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn numeric_edit_f64(x: f64, kind: u8) -> f64 {
    match kind % 10 {
        0 => -x,
        1 => 0.0,
        2 => x * 1e12,
        3 => x * 1e-12,
        4 => f64::NAN,
        5 => f64::INFINITY,
        6 => x + 1.0,
        7 => x - 1.0,
        8 => f64::MAX,
        _ => f64::MIN_POSITIVE,
    }
}

fn numeric_edit_i64(x: i64, kind: u8) -> i64 {
    match kind % 10 {
        0 => x.wrapping_neg(),
        1 => 0,
        2 => x.saturating_mul(1 << 20),
        3 => i64::MAX,
        4 => i64::MIN,
        5 => x.wrapping_add(1),
        6 => x.wrapping_sub(1),
        7 => 1 << 60,
        8 => -1,
        _ => u32::MAX as i64 + 1,
    }
}

fn apply_toml_op(root: &mut toml::Value, op: &TreeOp) {
    let mut paths = Vec::new();
    toml_paths(root, &mut Vec::new(), &mut paths);
    let pick = |i: &Index| paths[i.index(paths.len())].clone();
    match op {
        TreeOp::Delete(i) | TreeOp::Duplicate(i) | TreeOp::RenameKey(i, _) => {
            let path = pick(i);
            let Some((last, parent_path)) = path.split_last() else {
                return;
            };
            let Some(parent) = toml_at(root, parent_path) else {
                return;
            };
            match (parent, last, op) {
                (toml::Value::Table(t), PathSeg::Key(k), TreeOp::Delete(_)) => {
                    t.remove(k);
                }
                (toml::Value::Array(a), PathSeg::Idx(j), TreeOp::Delete(_)) => {
                    a.remove(*j);
                }
                (toml::Value::Table(t), PathSeg::Key(k), TreeOp::Duplicate(_)) => {
                    let v = t[k].clone();
                    t.insert(format!("{k}_"), v);
                }
                (toml::Value::Array(a), PathSeg::Idx(j), TreeOp::Duplicate(_)) => {
                    let v = a[*j].clone();
                    a.insert(*j, v);
                }
                (toml::Value::Table(t), PathSeg::Key(k), TreeOp::RenameKey(_, n)) => {
                    if let Some(v) = t.remove(k) {
                        t.insert(KEY_NAMES[n.index(KEY_NAMES.len())].to_string(), v);
                    }
                }
                _ => {}
            }
        }
        TreeOp::Replace(i, w) => {
            let path = pick(i);
            if path.is_empty() {
                return;
            }
            if let Some(v) = toml_at(root, &path) {
                *v = toml_weird(w);
            }
        }
        TreeOp::Numeric(i, k) => {
            if let Some(v) = toml_at(root, &pick(i)) {
                match v {
                    toml::Value::Integer(x) => *x = numeric_edit_i64(*x, *k),
                    toml::Value::Float(x) => *x = numeric_edit_f64(*x, *k),
                    toml::Value::String(s) => {
                        *s = format!("{s}{}", TOKENS[*k as usize % TOKENS.len()])
                    }
                    _ => {}
                }
            }
        }
        TreeOp::Nest(i, depth) => {
            let path = pick(i);
            if path.is_empty() {
                return;
            }
            if let Some(v) = toml_at(root, &path) {
                for d in 0..*depth {
                    let inner = std::mem::replace(v, toml::Value::Boolean(false));
                    *v = if d % 2 == 0 {
                        toml::Value::Array(vec![inner])
                    } else {
                        let mut t = toml::Table::new();
                        t.insert("a".into(), inner);
                        toml::Value::Table(t)
                    };
                }
            }
        }
    }
}

/// The damaged text of a valid TOML document.
fn damage_toml(valid: &str, d: &Damage) -> Bytes {
    match d {
        Damage::Random(b) => Bytes(b.clone()),
        Damage::Bytes(ops) => Bytes(apply_byte_ops(valid.as_bytes().to_vec(), ops)),
        Damage::Tree(ops, bytes) => {
            let mut root = toml::Value::Table(toml::from_str(valid).expect("valid sample"));
            for op in ops {
                apply_toml_op(&mut root, op);
            }
            let text = match &root {
                toml::Value::Table(t) => toml::to_string(t).unwrap_or_default(),
                _ => String::new(),
            };
            Bytes(apply_byte_ops(text.into_bytes(), bytes))
        }
        Damage::Deep(depth, tables) => {
            let n = *depth as usize;
            let deep = if *tables {
                format!("{}1{}", "{a = ".repeat(n), "}".repeat(n))
            } else {
                format!("{}1{}", "[".repeat(n), "]".repeat(n))
            };
            let dotted = format!("{} = 1\n", vec!["k"; n.min(20_000)].join("."));
            Bytes(format!("deep = {deep}\n{dotted}{valid}").into_bytes())
        }
    }
}

// --- JSON trees

fn json_weird(w: &Weird) -> Json {
    match w {
        Weird::Int(i) => Json::from(*i),
        Weird::Float(f) => serde_json::Number::from_f64(*f)
            .map(Json::Number)
            .unwrap_or(Json::Null),
        Weird::Str(s) => Json::String(s.clone()),
        Weird::Bool(b) => Json::Bool(*b),
        Weird::EmptyArray => Json::Array(vec![]),
        Weird::EmptyTable => Json::Object(Default::default()),
        Weird::Array(v) => Json::Array(v.iter().map(json_weird).collect()),
    }
}

fn json_paths(v: &Json, path: &mut Vec<PathSeg>, out: &mut Vec<Vec<PathSeg>>) {
    out.push(path.clone());
    match v {
        Json::Object(t) => {
            for (k, c) in t {
                path.push(PathSeg::Key(k.clone()));
                json_paths(c, path, out);
                path.pop();
            }
        }
        Json::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                path.push(PathSeg::Idx(i));
                json_paths(c, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn json_at<'a>(v: &'a mut Json, path: &[PathSeg]) -> Option<&'a mut Json> {
    let mut cur = v;
    for seg in path {
        cur = match (seg, cur) {
            (PathSeg::Key(k), Json::Object(t)) => t.get_mut(k)?,
            (PathSeg::Idx(i), Json::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn apply_json_op(root: &mut Json, op: &TreeOp) {
    let mut paths = Vec::new();
    json_paths(root, &mut Vec::new(), &mut paths);
    let pick = |i: &Index| paths[i.index(paths.len())].clone();
    match op {
        TreeOp::Delete(i) | TreeOp::Duplicate(i) | TreeOp::RenameKey(i, _) => {
            let path = pick(i);
            let Some((last, parent_path)) = path.split_last() else {
                return;
            };
            let Some(parent) = json_at(root, parent_path) else {
                return;
            };
            match (parent, last, op) {
                (Json::Object(t), PathSeg::Key(k), TreeOp::Delete(_)) => {
                    t.remove(k);
                }
                (Json::Array(a), PathSeg::Idx(j), TreeOp::Delete(_)) => {
                    a.remove(*j);
                }
                (Json::Object(t), PathSeg::Key(k), TreeOp::Duplicate(_)) => {
                    let v = t[k].clone();
                    t.insert(format!("{k}_"), v);
                }
                (Json::Array(a), PathSeg::Idx(j), TreeOp::Duplicate(_)) => {
                    let v = a[*j].clone();
                    a.insert(*j, v);
                }
                (Json::Object(t), PathSeg::Key(k), TreeOp::RenameKey(_, n)) => {
                    if let Some(v) = t.remove(k) {
                        t.insert(KEY_NAMES[n.index(KEY_NAMES.len())].to_string(), v);
                    }
                }
                _ => {}
            }
        }
        TreeOp::Replace(i, w) => {
            let path = pick(i);
            if let Some(v) = json_at(root, &path) {
                *v = json_weird(w);
            }
        }
        TreeOp::Numeric(i, k) => {
            if let Some(v) = json_at(root, &pick(i)) {
                let new = match &*v {
                    Json::Number(n) if n.is_i64() || n.is_u64() => {
                        let x = n.as_i64().unwrap_or(i64::MAX);
                        match k % 3 {
                            0 => Json::from(numeric_edit_i64(x, *k / 3)),
                            1 => Json::from(u64::MAX - u64::from(*k)),
                            _ => Json::from(numeric_edit_f64(x as f64, *k / 3)),
                        }
                    }
                    Json::Number(n) => json_weird(&Weird::Float(numeric_edit_f64(
                        n.as_f64().unwrap_or(0.0),
                        *k,
                    ))),
                    Json::String(s) => {
                        Json::String(format!("{s}{}", TOKENS[*k as usize % TOKENS.len()]))
                    }
                    other => other.clone(),
                };
                *v = new;
            }
        }
        TreeOp::Nest(i, depth) => {
            if let Some(v) = json_at(root, &pick(i)) {
                for d in 0..*depth {
                    let inner = v.take();
                    *v = if d % 2 == 0 {
                        Json::Array(vec![inner])
                    } else {
                        serde_json::json!({ "a": inner })
                    };
                }
            }
        }
    }
}

fn damage_json_value(valid: &Json, d: &Damage) -> Bytes {
    match d {
        Damage::Random(b) => Bytes(b.clone()),
        Damage::Bytes(ops) => Bytes(apply_byte_ops(
            serde_json::to_vec(valid).expect("serializable"),
            ops,
        )),
        Damage::Tree(ops, bytes) => {
            let mut root = valid.clone();
            for op in ops {
                apply_json_op(&mut root, op);
            }
            Bytes(apply_byte_ops(
                serde_json::to_vec(&root).expect("serializable"),
                bytes,
            ))
        }
        Damage::Deep(depth, objects) => {
            let n = *depth as usize;
            let deep = if *objects {
                format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n))
            } else {
                format!("{}1{}", "[".repeat(n), "]".repeat(n))
            };
            let text = serde_json::to_string(valid).expect("serializable");
            // The deep value as the first field of the top-level object (or the whole file).
            let out = match text.strip_prefix('{') {
                Some(rest) if rest != "}" => format!("{{\"deep\":{deep},{rest}"),
                _ => deep,
            };
            Bytes(out.into_bytes())
        }
    }
}

fn damage_json(valid: &str, d: &Damage) -> Bytes {
    let value: Json = serde_json::from_str(valid).expect("valid sample");
    damage_json_value(&value, d)
}

// --- safetensors

/// Damage to a safetensors file: to its bytes, to its JSON header (re-encoded with a correct
/// length prefix unless `bad_len`), to one metadata value that is itself JSON or a number, or
/// to the length prefix alone.
#[derive(Clone, Debug)]
enum StDamage {
    Bytes(Vec<ByteOp>),
    Header(Vec<TreeOp>, Option<u64>),
    Meta(Index, Vec<TreeOp>, Vec<ByteOp>),
    Prefix(u64),
}

fn st_damage() -> impl Strategy<Value = StDamage> {
    prop_oneof![
        3 => prop::collection::vec(byte_op(), 1..5).prop_map(StDamage::Bytes),
        5 => (
            prop::collection::vec(tree_op(), 1..4),
            prop::option::weighted(0.1, any::<u64>())
        )
            .prop_map(|(t, l)| StDamage::Header(t, l)),
        3 => (
            any::<Index>(),
            prop::collection::vec(tree_op(), 0..3),
            prop::collection::vec(byte_op(), 0..3)
        )
            .prop_map(|(i, t, b)| StDamage::Meta(i, t, b)),
        1 => prop::sample::select(vec![0u64, 1, 7, 8, 100_000_000, 100_000_001, 1 << 60, u64::MAX])
            .prop_map(StDamage::Prefix),
    ]
}

fn split_safetensors(bytes: &[u8]) -> (Json, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).expect("valid sample header");
    (header, bytes[8 + n..].to_vec())
}

fn join_safetensors(header: &Json, data: &[u8], len: Option<u64>) -> Vec<u8> {
    let h = serde_json::to_vec(header).expect("serializable");
    let mut out = len.unwrap_or(h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

fn damage_safetensors(valid: &[u8], d: &StDamage) -> Bytes {
    match d {
        StDamage::Bytes(ops) => Bytes(apply_byte_ops(valid.to_vec(), ops)),
        StDamage::Header(ops, len) => {
            let (mut header, data) = split_safetensors(valid);
            for op in ops {
                apply_json_op(&mut header, op);
            }
            Bytes(join_safetensors(&header, &data, *len))
        }
        StDamage::Meta(i, ops, bytes) => {
            let (mut header, data) = split_safetensors(valid);
            if let Some(Json::Object(meta)) = header.get_mut("__metadata__") {
                let keys: Vec<String> = meta.keys().cloned().collect();
                if !keys.is_empty() {
                    let key = &keys[i.index(keys.len())];
                    let old = meta[key].as_str().unwrap_or_default().to_string();
                    let mut text = match serde_json::from_str::<Json>(&old) {
                        Ok(mut v) if !ops.is_empty() => {
                            for op in ops {
                                apply_json_op(&mut v, op);
                            }
                            serde_json::to_string(&v).unwrap()
                        }
                        _ => old,
                    };
                    text = String::from_utf8_lossy(&apply_byte_ops(text.into_bytes(), bytes))
                        .into_owned();
                    meta.insert(key.clone(), Json::String(text));
                }
            }
            Bytes(join_safetensors(&header, &data, None))
        }
        StDamage::Prefix(n) => {
            let mut b = valid.to_vec();
            b[..8].copy_from_slice(&n.to_le_bytes());
            Bytes(b)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared fixtures

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_text(rel: &str) -> String {
    std::fs::read_to_string(manifest_dir().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// A small GPT-like parameter set (matrices, embedding, head, norm, bias), deterministic.
fn params(dtype: DType) -> Vec<(String, Var)> {
    let spec: &[(&str, &[usize])] = &[
        ("wte.weight", &[11, 6]),
        ("blocks.0.attn.q.weight", &[6, 6]),
        ("blocks.0.mlp.fc.weight", &[12, 6]),
        ("blocks.0.mlp.fc.bias", &[12]),
        ("blocks.0.norm.weight", &[6]),
        ("lm_head.weight", &[11, 6]),
    ];
    spec.iter()
        .enumerate()
        .map(|(i, (n, s))| {
            let len: usize = s.iter().product();
            let v: Vec<f64> = (0..len)
                .map(|j| (((i * 131 + j * 17) % 23) as f64 - 11.0) / 13.0)
                .collect();
            let t = Tensor::from_vec(v, *s, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            (n.to_string(), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

fn grads(vars: &[(String, Var)], step: u64) -> BTreeMap<String, Tensor> {
    vars.iter()
        .enumerate()
        .map(|(i, (n, v))| {
            let len = v.elem_count();
            let g: Vec<f64> = (0..len)
                .map(|j| ((((step as usize + 3) * 7 + i * 29 + j * 11) % 19) as f64 - 9.0) / 10.0)
                .collect();
            let t = Tensor::from_vec(g, v.dims(), &Device::Cpu)
                .unwrap()
                .to_dtype(v.dtype())
                .unwrap();
            (n.clone(), t)
        })
        .collect()
}

/// Every parameter, state tensor and scalar, the step count and the lr as bit patterns.
fn optimizer_bits(opt: &Driver) -> BTreeMap<String, Vec<u64>> {
    let mut out = BTreeMap::new();
    for (name, var) in opt.vars() {
        out.insert(format!("param:{name}"), tensor_bits(var.as_tensor()));
    }
    let sd = opt.state_dict().unwrap();
    for (key, st) in &sd.entries {
        for (f, t) in &st.tensors {
            out.insert(format!("{key}.{f}"), tensor_bits(t));
        }
        for (f, v) in &st.scalars {
            out.insert(format!("{key}.#{f}"), vec![v.to_bits()]);
        }
    }
    out.insert("step".into(), vec![opt.step_count()]);
    out.insert("lr".into(), vec![opt.lr().to_bits()]);
    for (k, v) in &sd.extra {
        out.insert(format!("extra:{k}:{v}"), vec![]);
    }
    out
}

fn tensor_bits(t: &Tensor) -> Vec<u64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// The optimizers whose state files are fuzzed: each kind of state (moments, factored moments,
/// preconditioner factors and eigenbases, Kronecker factors, previous gradients, the
/// Schedule-Free sequence, group-wide state).
const STATE_OPTIMIZERS: &[&str] = &[
    "adamw",
    "sgd",
    "adafactor",
    "shampoo",
    "soap",
    "muon",
    "psgd_kron",
    "mars",
    "schedulefree_adamw",
    "ademamix",
    "adalayer",
    "sophia",
];

fn fresh_driver(name: &str, steps: u64) -> Driver {
    let cfg = OptimConfig::default_for(name).unwrap();
    let mut d = Driver::new(cfg, NamedParams::new(params(DType::F32)).unwrap()).unwrap();
    for s in 0..steps {
        let vars = d.vars();
        d.step_named(&grads(&vars, s)).unwrap();
    }
    d
}

/// The state file of each optimizer after two steps.
fn state_samples() -> &'static Vec<(&'static str, Vec<u8>)> {
    static S: OnceLock<Vec<(&'static str, Vec<u8>)>> = OnceLock::new();
    S.get_or_init(|| {
        STATE_OPTIMIZERS
            .iter()
            .map(|&n| {
                (
                    n,
                    fresh_driver(n, 2).state_dict().unwrap().to_bytes().unwrap(),
                )
            })
            .collect()
    })
}

// ---------------------------------------------------------------------------------------------
// Targets

/// Run configs (`train CONFIG [--set a.b=c]`): parse, the derived sizes, and the resolved
/// config written to `config.toml` reads back to itself.
fn run_config_samples() -> &'static Vec<String> {
    static S: OnceLock<Vec<String>> = OnceLock::new();
    S.get_or_init(|| {
        let mut v: Vec<String> = ["tiny", "d256-l3", "d512-l3", "d512-l6"]
            .iter()
            .map(|n| read_text(&format!("experiments/configs/{n}.toml")))
            .collect();
        v.push(
            "seed = 3\ndtype = \"f64\"\n[model]\npreset = \"test\"\n[optimizer]\nname = \"soap\"\n\
             lr = 3e-3\n[[groups]]\nroles = [\"matrix\"]\noptimizer = { name = \"muon\", lr = 0.02 }\n\
             [train]\nbatch_size = 8\nmicro_batch_size = 4\ntokens = 100000\nallow_repeat = true\n\
             [eval]\ninterval = 5\ntokens = 1024\ntargets = [2.5]\n[ewa]\ntaus = [0.9, 0.99]\n\
             [checkpoint]\ninterval = 3\n"
                .into(),
        );
        v
    })
}

fn check_run_config(text: &str, overrides: &[String]) -> Result<(), TestCaseError> {
    let Ok(cfg) = RunConfig::parse(text, overrides) else {
        reached("run_config", "refused");
        return Ok(());
    };
    reached("run_config", "parsed");
    let _ = (cfg.total_steps(), cfg.batch_tokens(), cfg.micro_batch());
    let _ = (cfg.eval_batch_size(), cfg.optimizer_spec());
    let written = cfg
        .to_toml()
        .map_err(|e| TestCaseError::fail(format!("a valid config does not serialize: {e}")))?;
    let back = RunConfig::parse(&written, &[]).map_err(|e| {
        TestCaseError::fail(format!(
            "the written config.toml does not read back: {e}\n{written}"
        ))
    })?;
    let again = back.to_toml().unwrap();
    prop_assert_eq!(&written, &again, "config.toml is not a fixed point");
    Ok(())
}

fn override_strategy() -> impl Strategy<Value = Vec<String>> {
    let path = prop::sample::select(vec![
        "seed",
        "train.steps",
        "train.batch_size",
        "train.tokens",
        "model.d_model",
        "model.context",
        "optimizer.lr",
        "optimizer.name",
        "eval.interval",
        "schedule.kind",
        "a.b.c",
        "",
        "train",
        "groups.0.lr",
    ]);
    let value = prop_oneof![
        prop::sample::select(TOKENS.to_vec()).prop_map(str::to_string),
        any::<String>(),
        weird().prop_map(|w| toml_weird(&w).to_string()),
    ];
    prop::collection::vec(
        prop_oneof![
            (path, value).prop_map(|(p, v)| format!("{p}={v}")),
            any::<String>(),
        ],
        0..3,
    )
}

#[test]
fn fuzz_run_configs() {
    let n = run_config_samples().len();
    fuzz(
        "run_config",
        48,
        (0..n, damage(), override_strategy())
            .prop_map(|(i, d, o)| (damage_toml(&run_config_samples()[i], &d), o)),
        |(text, overrides)| check_run_config(&text.text(), &overrides),
    );
}

/// Sweep files: parse, then expand the plan (every run's resolved config).
fn sweep_samples() -> &'static Vec<String> {
    static S: OnceLock<Vec<String>> = OnceLock::new();
    S.get_or_init(|| {
        [
            "cbs-demo",
            "cbs-data-size",
            "cbs-model-size",
            "soap-adamw-shampoo",
            "gpu-smoke",
        ]
        .iter()
        .map(|n| read_text(&format!("experiments/configs/{n}.toml")))
        .collect()
    })
}

fn check_sweep(text: &str) -> Result<(), TestCaseError> {
    reached("sweep_file", "read");
    if let Ok(spec) = SweepSpec::parse(text) {
        reached("sweep_file", "parsed");
        let _ = spec.b0();
        if let Ok(plan) = spec.plan() {
            reached("sweep_file", "planned");
            for r in &plan.runs {
                let _ = r.coords.describe();
                let _ = r.config.to_toml();
            }
            let _ = plan.shard(0, 2);
        }
    }
    Ok(())
}

#[test]
fn fuzz_sweep_files() {
    let n = sweep_samples().len();
    fuzz(
        "sweep_file",
        24,
        (0..n, damage()).prop_map(|(i, d)| damage_toml(&sweep_samples()[i], &d)),
        |text| check_sweep(&text.text()),
    );
}

/// Optimizer configs and group configs: `OptimConfig::from_toml`/`from_json`, an
/// `[optimizer]` + `[[groups]]` spec, and for an accepted spec an optimizer built over a small
/// model that takes steps, saves its state and loads it back.
fn optim_samples() -> &'static Vec<String> {
    static S: OnceLock<Vec<String>> = OnceLock::new();
    S.get_or_init(|| {
        let mut v: Vec<String> = OptimConfig::NAMES
            .iter()
            .map(|n| {
                let cfg = OptimConfig::default_for(n).unwrap();
                let mut t = toml::Table::new();
                t.insert("optimizer".into(), toml::Value::try_from(&cfg).unwrap());
                toml::to_string(&t).unwrap()
            })
            .collect();
        v.push(
            "[optimizer]\nname = \"adamw\"\nlr = 1e-3\nweight_decay = 0.1\n\
             [[groups]]\nroles = [\"norm\", \"bias\"]\nweight_decay = 0.0\n\
             [[groups]]\nroles = [\"matrix\"]\noptimizer = { name = \"muon\", lr = 0.02 }\n\
             [[groups]]\nnames = [\"lm_head.*\"]\nlr = 3e-3\nlabel = \"head\"\n"
                .into(),
        );
        v.push(
            "[optimizer]\nname = \"soap\"\nlr = 3e-3\nprecondition_frequency = 2\n\
             [[groups]]\nroles = [\"embedding\", \"head\"]\noptimizer = { name = \"shampoo\" }\n"
                .into(),
        );
        // Shampoo's preconditioner variants, with the fields only they read.
        v.push(
            "[optimizer]\nname = \"shampoo\"\npreconditioner = \"eigenvalue_corrected\"\n\
             precondition_frequency = 2\namortized_computation_config = { type = \"qr\", max_iterations = 3 }\n\
             ignored_basis_change_dims = { 1 = [0] }\ninverse_exponent_override = { 2 = 0.5 }\n\
             corrected_eigenvalues_dtype = \"float64\"\n"
                .into(),
        );
        v.push(
            "[optimizer]\nname = \"shampoo\"\npreconditioner = \"eigendecomposed_kl\"\n\
             target_parameter_dimensionality = \"inf\"\nmax_preconditioner_dim = 4\n\
             amortized_computation_config = { type = \"eigen\", tolerance = 0.01 }\n\
             factor_matrix_eigenvalues_dtype = \"float64\"\n"
                .into(),
        );
        v
    })
}

fn check_optimizer_spec(text: &str) -> Result<(), TestCaseError> {
    // The `[optimizer]` table alone, as `OptimConfig::from_toml` and `from_json` read it.
    if let Ok(table) = toml::from_str::<toml::Table>(text) {
        if let Some(toml::Value::Table(inner)) = table.get("optimizer") {
            let inner_text = toml::to_string(inner).unwrap_or_default();
            if OptimConfig::from_toml(&inner_text).is_ok() {
                reached("optimizer_config", "from_toml ok");
            }
            if let Ok(json) = serde_json::to_value(inner) {
                if OptimConfig::from_json(json).is_ok() {
                    reached("optimizer_config", "from_json ok");
                }
            }
        }
    }
    let _ = OptimConfig::from_toml(text);
    let Ok(spec) = toml::from_str::<OptimizerSpec>(text) else {
        return Ok(());
    };
    reached("optimizer_config", "spec parsed");
    let Ok(mut opt) = Driver::new(spec, NamedParams::new(params(DType::F32)).unwrap()) else {
        return Ok(());
    };
    reached("optimizer_config", "built");
    let vars = opt.vars();
    for s in 0..3 {
        let before = optimizer_bits(&opt);
        if opt.step_named(&grads(&vars, s)).is_err() {
            prop_assert!(
                before == optimizer_bits(&opt),
                "a failed step changed the optimizer"
            );
            reached("optimizer_config", "step refused");
            return Ok(());
        }
    }
    reached("optimizer_config", "stepped");
    let bytes = opt
        .state_dict()
        .and_then(|sd| sd.to_bytes())
        .map_err(|e| TestCaseError::fail(format!("state does not serialize: {e}")))?;
    let sd = StateDict::from_bytes(&bytes, &Device::Cpu)
        .map_err(|e| TestCaseError::fail(format!("own state does not read back: {e}")))?;
    let before = optimizer_bits(&opt);
    opt.load_state_dict(sd)
        .map_err(|e| TestCaseError::fail(format!("own state does not load: {e}")))?;
    prop_assert!(
        before == optimizer_bits(&opt),
        "reloading its own state changed it"
    );
    Ok(())
}

#[test]
fn fuzz_optimizer_configs() {
    let n = optim_samples().len();
    fuzz(
        "optimizer_config",
        64,
        (0..n, damage()).prop_map(|(i, d)| damage_toml(&optim_samples()[i], &d)),
        |text| check_optimizer_spec(&text.text()),
    );
}

/// Optimizer state files: parsed, loaded into an optimizer of the same kind that has state of
/// its own (an error leaves it bit-identical), and an accepted state steps without panicking.
fn check_state_file(name: &str, bytes: &[u8]) -> Result<(), TestCaseError> {
    let Ok(sd) = StateDict::from_bytes(bytes, &Device::Cpu) else {
        return Ok(());
    };
    reached("optimizer_state", "parsed");
    let _ = sd.to_bytes();
    let mut opt = fresh_driver(name, 1);
    let before = optimizer_bits(&opt);
    if opt.load_state_dict(sd).is_err() {
        prop_assert!(
            before == optimizer_bits(&opt),
            "a refused state changed the optimizer"
        );
        reached("optimizer_state", "load refused");
        return Ok(());
    }
    reached("optimizer_state", "loaded");
    let vars = opt.vars();
    for s in 5..7 {
        let before = optimizer_bits(&opt);
        if opt.step_named(&grads(&vars, s)).is_err() {
            prop_assert!(
                before == optimizer_bits(&opt),
                "a failed step changed the optimizer"
            );
            break;
        }
    }
    let _ = opt.state_dict().and_then(|sd| sd.to_bytes());
    Ok(())
}

#[derive(Clone, Debug)]
enum StateInput {
    Damaged(usize, StDamage),
    Random(usize, Vec<u8>),
}

#[test]
fn fuzz_optimizer_state_files() {
    let n = state_samples().len();
    let strategy = prop_oneof![
        6 => (0..n, st_damage()).prop_map(|(i, d)| StateInput::Damaged(i, d)),
        1 => (0..n, prop::collection::vec(any::<u8>(), 0..256))
            .prop_map(|(i, b)| StateInput::Random(i, b)),
    ];
    fuzz("optimizer_state", 64, strategy, |input| {
        let (i, bytes) = match &input {
            StateInput::Damaged(i, d) => (*i, damage_safetensors(&state_samples()[*i].1, d).0),
            StateInput::Random(i, b) => (*i, b.clone()),
        };
        check_state_file(state_samples()[i].0, &bytes)
    });
}

/// EWA state files: loaded into an EWA with averages of its own; an error leaves it unchanged.
#[test]
fn fuzz_ewa_state_files() {
    let taus = [0.9, 0.99];
    let make = || {
        let mut ewa = Ewa::new(params(DType::F32), &taus).unwrap();
        ewa.update().unwrap();
        ewa
    };
    let valid = make().state_dict().unwrap().to_bytes().unwrap();
    fuzz("ewa_state", 48, st_damage(), |d| {
        let bytes = damage_safetensors(&valid, &d).0;
        let Ok(sd) = StateDict::from_bytes(&bytes, &Device::Cpu) else {
            return Ok(());
        };
        reached("ewa_state", "parsed");
        let mut ewa = make();
        let before = ewa.state_dict().unwrap().to_bytes().unwrap();
        match ewa.load_state_dict(sd) {
            Err(_) => {
                let after = ewa.state_dict().unwrap().to_bytes().unwrap();
                prop_assert!(before == after, "a refused EWA state changed the averages");
            }
            Ok(()) => {
                reached("ewa_state", "loaded");
                let _ = ewa.update();
                let _ = ewa.eval_params(0.9);
            }
        }
        Ok(())
    });
}

/// Token shards and `meta.json`: a shard directory is read, checked against a model, sampled
/// and evaluated on; `prepare` on arbitrary documents writes shards that read back.
#[derive(Clone, Debug)]
enum ShardInput {
    /// Damage to train.bin, val.bin, and meta.json (or its removal), plus the model's context
    /// and batch size to sample with.
    Damaged {
        train: Vec<ByteOp>,
        val: Vec<ByteOp>,
        meta: Option<Damage>,
        context: usize,
        batch: usize,
    },
    /// `prepare` on these documents.
    Prepare {
        docs: Vec<Vec<u8>>,
        gpt2: bool,
        val_fraction: f64,
    },
}

fn shard_strategy() -> impl Strategy<Value = ShardInput> {
    let ops = || {
        prop_oneof![
            2 => Just(Vec::new()),
            1 => prop::collection::vec(byte_op(), 1..3),
        ]
    };
    prop_oneof![
        5 => (
            ops(),
            ops(),
            prop::option::weighted(0.9, damage()),
            prop::sample::select(vec![0usize, 1, 2, 7, 64, 1 << 20, usize::MAX]),
            // The batch size is a memory request of the run config, not file content: a batch
            // of 2^40 sequences is asked for, not read; it stays within what a batch can be.
            prop::sample::select(vec![0usize, 1, 3, 1000]),
        )
            .prop_map(|(train, val, meta, context, batch)| ShardInput::Damaged {
                train,
                val,
                meta,
                context,
                batch
            }),
        1 => (
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..4),
            prop::bool::weighted(0.3),
            prop::sample::select(vec![0.1, 0.5, 0.0, -1.0, 0.51, f64::NAN, 1e-9]),
        )
            .prop_map(|(docs, gpt2, val_fraction)| ShardInput::Prepare {
                docs,
                gpt2,
                val_fraction
            }),
    ]
}

fn valid_shards() -> &'static (Vec<u8>, Vec<u8>, String) {
    static S: OnceLock<(Vec<u8>, Vec<u8>, String)> = OnceLock::new();
    S.get_or_init(|| {
        let train: Vec<u16> = (0..600u32).map(|i| ((i * 37 + 11) % 97) as u16).collect();
        let val: Vec<u16> = (0..150u32).map(|i| ((i * 53 + 5) % 97) as u16).collect();
        let meta = ShardMeta {
            tokenizer: "byte".into(),
            vocab_size: 97,
            train_tokens: train.len() as u64,
            val_tokens: val.len() as u64,
            sources: vec!["synthetic".into()],
        };
        (
            optlab::data::tokens::shard_bytes(&train),
            optlab::data::tokens::shard_bytes(&val),
            serde_json::to_string_pretty(&meta).unwrap(),
        )
    })
}

fn use_dataset(data: &Dataset, context: usize, batch: usize) {
    let _ = (data.vocab_size(), data.tokenizer(), data.source());
    let _ = data.unigram_entropy();
    let _ = data.check_model(data.vocab_size(), context);
    if let Ok(mut s) = data.sampler(context, batch, 7) {
        reached("token_shards", "sampled");
        for _ in 0..3 {
            let b = s.next_batch();
            let _ = b.to_tensors(&Device::Cpu);
        }
        let pos = s.position();
        let _ = s.seek(pos);
    }
    let _ = data.eval_batches(context, batch, 4096);
}

fn check_shards(input: &ShardInput) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    match input {
        ShardInput::Damaged {
            train,
            val,
            meta,
            context,
            batch,
        } => {
            let (t, v, m) = valid_shards();
            let p = dir.path();
            std::fs::write(p.join("train.bin"), apply_byte_ops(t.clone(), train)).unwrap();
            std::fs::write(p.join("val.bin"), apply_byte_ops(v.clone(), val)).unwrap();
            if let Some(d) = meta {
                std::fs::write(p.join("meta.json"), damage_json(m, d).0).unwrap();
            }
            if let Ok(data) = Dataset::from_shards(p) {
                reached("token_shards", "loaded");
                // Small contexts and batches so a valid corpus is actually sampled.
                use_dataset(&data, (*context).min(64), (*batch).min(8));
                use_dataset(&data, *context, *batch);
            }
        }
        ShardInput::Prepare {
            docs,
            gpt2,
            val_fraction,
        } => {
            let docs: Vec<(String, Vec<u8>)> = docs
                .iter()
                .enumerate()
                .map(|(i, d)| (format!("doc{i}.txt"), d.clone()))
                .collect();
            let tok = if *gpt2 {
                Tokenizer::Gpt2
            } else {
                Tokenizer::Byte
            };
            let out = dir.path().join("shards");
            std::fs::create_dir_all(&out).unwrap();
            if let Ok(meta) = prepare_shards(&docs, tok, *val_fraction, &out, vec!["fuzz".into()]) {
                reached("token_shards", "prepared");
                let data = Dataset::from_shards(&out).map_err(|e| {
                    TestCaseError::fail(format!("prepared shards do not read back: {e}"))
                })?;
                prop_assert_eq!(data.vocab_size(), meta.vocab_size);
                use_dataset(&data, 4, 2);
            }
        }
    }
    Ok(())
}

#[test]
fn fuzz_token_shards() {
    fuzz("token_shards", 64, shard_strategy(), |input| {
        check_shards(&input)
    });
}

/// Golden files: loaded, and an accepted file replayed in f64 without panicking.
fn golden_samples() -> &'static Vec<String> {
    static S: OnceLock<Vec<String>> = OnceLock::new();
    S.get_or_init(|| {
        [
            "adamw_basic",
            "lion_basic",
            "schedulefree_sgd_basic",
            "sophia_basic",
            "mars_exact_basic",
            "shampoo_basic",
            "shampoo_eigenvalue_corrected",
            "shampoo_kl",
        ]
        .iter()
        .map(|n| read_text(&format!("tests/golden/{n}.json")))
        .collect()
    })
}

fn check_golden(bytes: &[u8]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("case.json");
    std::fs::write(&path, bytes).unwrap();
    if let Ok(case) = GoldenCase::load(&path) {
        reached("golden_file", "loaded");
        let _ = replay(&case, DType::F64);
    }
    Ok(())
}

#[test]
fn fuzz_golden_files() {
    let n = golden_samples().len();
    fuzz(
        "golden_file",
        24,
        (0..n, damage()).prop_map(|(i, d)| damage_json(&golden_samples()[i], &d)),
        |bytes| check_golden(&bytes.0),
    );
}

/// The `cbs fit` CSV: parsed, fitted (with the default and odd reference batch sizes), printed
/// as JSON and as a table, and plotted.
fn csv_samples() -> &'static Vec<String> {
    static S: OnceLock<Vec<String>> = OnceLock::new();
    S.get_or_init(|| {
        vec![
            read_text("experiments/data/cbs-synthetic.csv"),
            read_text("results/cbs-demo/steps_to_target.csv"),
            "group,batch_size,steps,n_params,tokens\na,4,100,1000,5e5\na,8,60,1000,5e5\n\
             a,16,40,1000,5e5\nb,4,90,2000,1e6\nb,8,50,2000,1e6\nb,16,35,2000,1e6\n\
             c,4,80,4000,2e6\nc,8,45,4000,2e6\nc,16,30,4000,2e6\n"
                .into(),
        ]
    })
}

/// A cell-level edit of a CSV: a field replaced by an odd number or string.
#[derive(Clone, Debug)]
enum CsvInput {
    Bytes(usize, Vec<ByteOp>),
    Cells(usize, Vec<(Index, Index, usize)>, Vec<ByteOp>),
    Random(Vec<u8>),
}

const CSV_CELLS: &[&str] = &[
    "",
    "0",
    "-1",
    "nan",
    "inf",
    "-inf",
    "1e309",
    "1e-320",
    "1e300",
    "18446744073709551616",
    "4",
    "4.5",
    "\"a,b\"",
    "\"\"\"\"",
    "\"",
    "é",
    " 8",
    "8 ",
    "0x10",
    "1_000",
];

fn csv_strategy() -> impl Strategy<Value = CsvInput> {
    let n = csv_samples().len();
    prop_oneof![
        2 => (0..n, prop::collection::vec(byte_op(), 1..5)).prop_map(|(i, o)| CsvInput::Bytes(i, o)),
        4 => (
            0..n,
            prop::collection::vec((any::<Index>(), any::<Index>(), 0..CSV_CELLS.len()), 1..5),
            prop::collection::vec(byte_op(), 0..2)
        )
            .prop_map(|(i, c, b)| CsvInput::Cells(i, c, b)),
        1 => prop::collection::vec(any::<u8>(), 0..300).prop_map(CsvInput::Random),
    ]
}

fn csv_text(input: &CsvInput) -> Bytes {
    match input {
        CsvInput::Bytes(i, ops) => {
            Bytes(apply_byte_ops(csv_samples()[*i].clone().into_bytes(), ops))
        }
        CsvInput::Cells(i, cells, ops) => {
            let mut rows: Vec<Vec<String>> = csv_samples()[*i]
                .lines()
                .map(|l| l.split(',').map(str::to_string).collect())
                .collect();
            for (r, c, v) in cells {
                let r = r.index(rows.len());
                let row = &mut rows[r];
                let c = c.index(row.len());
                row[c] = CSV_CELLS[*v].to_string();
            }
            let text: String = rows.iter().map(|r| r.join(",") + "\n").collect();
            Bytes(apply_byte_ops(text.into_bytes(), ops))
        }
        CsvInput::Random(b) => Bytes(b.clone()),
    }
}

fn plot_report(report: &CbsReport, dir: &Path) {
    let series: Vec<StepsSeries> = report
        .groups
        .iter()
        .map(|g| StepsSeries {
            label: g.group.clone(),
            points: g.points.clone(),
            fit: Some(g.fit),
        })
        .collect();
    for layout in [PlotLayout::Panels, PlotLayout::Overlaid] {
        let plot = StepsToTargetPlot {
            title: format!("B0 = {}", report.b0),
            series: series.clone(),
            layout,
        };
        let _ = plot_steps_to_target(&plot, &dir.join("steps.svg"));
    }
    if let Some(law) = report.power_laws.n_params {
        let plot = BStarScalingPlot {
            title: "B* vs N".into(),
            x_label: "N".into(),
            points: report
                .groups
                .iter()
                .filter_map(|g| {
                    g.n_params.map(|x| ScalingPoint {
                        label: g.group.clone(),
                        x,
                        b_star: g.fit.b_star,
                    })
                })
                .collect(),
            fit: Some(law),
        };
        let _ = plot_b_star_scaling(&plot, &dir.join("bstar.svg"));
    }
}

fn check_csv(text: &str, b0: Option<f64>, plot: bool) -> Result<(), TestCaseError> {
    let Ok(rows) = parse_cbs_csv(text, Path::new("fuzz.csv")) else {
        return Ok(());
    };
    reached("cbs_csv", "parsed");
    let smallest = rows
        .iter()
        .map(|r| r.batch_size)
        .fold(f64::INFINITY, f64::min);
    let b0 = b0.unwrap_or(smallest);
    if let Ok(report) = analyze(&rows, b0) {
        reached("cbs_csv", "fitted");
        let json = report.to_json();
        let _ = report.to_table();
        serde_json::from_str::<Json>(&json)
            .map_err(|e| TestCaseError::fail(format!("--json output is not JSON: {e}\n{json}")))?;
        if plot {
            let dir = tempfile::tempdir().unwrap();
            plot_report(&report, dir.path());
        }
    }
    Ok(())
}

#[test]
fn fuzz_cbs_csv() {
    let b0 = prop::option::weighted(
        0.3,
        prop::sample::select(vec![
            0.0,
            -1.0,
            1.0,
            256.0,
            1e300,
            f64::NAN,
            f64::INFINITY,
            5e-324,
        ]),
    );
    fuzz(
        "cbs_csv",
        96,
        (
            csv_strategy().prop_map(|c| csv_text(&c)),
            b0,
            prop::bool::weighted(0.15),
        ),
        |(text, b0, plot)| check_csv(&text.text(), b0, plot),
    );
}

/// Checkpoints: a run stopped at step 2 of 4 has its checkpoint damaged (the manifest, a
/// tensor file with its size and CRC updated in the manifest so the damage reaches the parser,
/// or the metrics the checkpoint cuts back to) and is resumed. The resumption succeeds or fails
/// with an error; a failed one leaves every file of the run directory as it was.
const CHECKPOINT_RUN: &str =
    "seed = 5\n[model]\npreset = \"test\"\n[optimizer]\nname = \"adamw\"\n\
    lr = 1e-2\n[train]\nbatch_size = 2\nsteps = 4\n[eval]\ninterval = 2\ntokens = 256\n\
    targets = [9.0]\n[ewa]\ntaus = [0.9]\n[checkpoint]\ninterval = 2\n";

fn data() -> Dataset {
    static D: OnceLock<Dataset> = OnceLock::new();
    D.get_or_init(|| Dataset::load(&optlab::data::DataConfig::default()).unwrap())
        .clone()
}

/// The stopped run's files, relative path → bytes.
fn stopped_run() -> &'static BTreeMap<PathBuf, Vec<u8>> {
    static S: OnceLock<BTreeMap<PathBuf, Vec<u8>>> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RunConfig::parse(CHECKPOINT_RUN, &[]).unwrap();
        let mut o = RunOptions::new(dir.path());
        o.dataset = Some(data());
        o.stop_after = Some(2);
        run(&cfg, &o).unwrap();
        dir_files(dir.path())
    })
}

fn dir_files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

#[derive(Clone, Debug)]
enum CheckpointInput {
    Manifest(Damage),
    /// A checkpoint file (model, optimizer or EWA), its manifest entry updated when `fix_crc`.
    File(Index, StDamage, bool),
    Metrics(Vec<ByteOp>),
    Config(Damage),
}

fn checkpoint_strategy() -> impl Strategy<Value = CheckpointInput> {
    prop_oneof![
        3 => damage().prop_map(CheckpointInput::Manifest),
        4 => (any::<Index>(), st_damage(), prop::bool::weighted(0.8))
            .prop_map(|(i, d, f)| CheckpointInput::File(i, d, f)),
        1 => prop::collection::vec(byte_op(), 1..4).prop_map(CheckpointInput::Metrics),
        1 => damage().prop_map(CheckpointInput::Config),
    ]
}

fn check_checkpoint(input: &CheckpointInput) -> Result<(), TestCaseError> {
    let mut files = stopped_run().clone();
    let manifest_key = files
        .keys()
        .find(|k| k.ends_with("manifest.json"))
        .expect("a checkpoint")
        .clone();
    match input {
        CheckpointInput::Manifest(d) => {
            let m = String::from_utf8(files[&manifest_key].clone()).unwrap();
            files.insert(manifest_key.clone(), damage_json(&m, d).0);
        }
        CheckpointInput::File(i, d, fix) => {
            let names = [
                "model.safetensors",
                "optimizer.safetensors",
                "ewa.safetensors",
            ];
            let name = names[i.index(names.len())];
            let key = manifest_key.with_file_name(name);
            let damaged = damage_safetensors(&files[&key], d).0;
            if *fix {
                let mut m: Json = serde_json::from_slice(&files[&manifest_key]).unwrap();
                m["files"][name] = serde_json::json!({
                    "bytes": damaged.len(),
                    "crc32": crc32fast::hash(&damaged),
                });
                files.insert(manifest_key.clone(), serde_json::to_vec_pretty(&m).unwrap());
            }
            files.insert(key, damaged);
        }
        CheckpointInput::Metrics(ops) => {
            let key = PathBuf::from("metrics.jsonl");
            let b = apply_byte_ops(files[&key].clone(), ops);
            files.insert(key, b);
        }
        CheckpointInput::Config(d) => {
            let key = PathBuf::from("config.toml");
            let text = String::from_utf8(files[&key].clone()).unwrap();
            files.insert(key, damage_toml(&text, d).0);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    for (rel, bytes) in &files {
        let p = dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    let cfg = RunConfig::parse(CHECKPOINT_RUN, &[]).unwrap();
    let mut o = RunOptions::new(dir.path());
    o.dataset = Some(data());
    o.resume = true;
    let result = run(&cfg, &o);
    reached(
        "checkpoint",
        if result.is_ok() { "resumed" } else { "refused" },
    );
    if result.is_err() {
        let after = dir_files(dir.path());
        // A run that got past loading the checkpoint rewrites env.json (it records the step it
        // resumed from); one that failed before must have changed nothing.
        let env = PathBuf::from("env.json");
        if after.get(&env) != files.get(&env) {
            return Ok(());
        }
        prop_assert!(
            after == files,
            "a refused resumption changed the run directory: {:?}",
            after
                .keys()
                .chain(files.keys())
                .filter(|k| after.get(*k) != files.get(*k))
                .collect::<Vec<_>>()
        );
    }
    Ok(())
}

#[test]
fn fuzz_checkpoints() {
    fuzz("checkpoint", 16, checkpoint_strategy(), |input| {
        check_checkpoint(&input)
    });
}

// ---------------------------------------------------------------------------------------------
// The fuzzing itself is checked: damage reaches the parsers (a fuzzer whose inputs were all
// rejected by the first check, or never changed, would prove nothing).

#[test]
fn damage_changes_files_and_keeps_some_valid() {
    let valid = &run_config_samples()[0];
    let mut runner = TestRunner::new_with_rng(
        ProptestConfig::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let (mut changed, mut accepted) = (0, 0);
    for _ in 0..200 {
        let d = damage().new_tree(&mut runner).unwrap().current();
        let text = damage_toml(valid, &d).text();
        changed += usize::from(text != *valid);
        accepted += usize::from(RunConfig::parse(&text, &[]).is_ok());
    }
    assert!(
        changed > 150,
        "only {changed} of 200 damaged configs differ"
    );
    assert!(
        accepted > 5,
        "only {accepted} of 200 damaged configs parse: too destructive"
    );
}

// ---------------------------------------------------------------------------------------------
// Regression tests: each input below made a loader panic, hang or read without bound before
// its fix (the fuzz targets above found the first three).

/// `context + 1` in the error messages overflowed for a context of `usize::MAX` (found by
/// `token_shards`: `Damaged { train: [], val: [], meta: None, context: usize::MAX, batch: 0 }`).
#[test]
fn a_context_of_usize_max_is_an_error() {
    let (t, v, m) = valid_shards();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("train.bin"), t).unwrap();
    std::fs::write(dir.path().join("val.bin"), v).unwrap();
    std::fs::write(dir.path().join("meta.json"), m).unwrap();
    let data = Dataset::from_shards(dir.path()).unwrap();
    let err = data.check_model(data.vocab_size(), usize::MAX).unwrap_err();
    assert!(err.to_string().contains("model.context"), "{err}");
    assert!(data.sampler(usize::MAX, 1, 0).is_err());
    assert!(data.eval_batches(usize::MAX, 1, 4096).is_err());
}

/// A batch size of 1e300 in the `cbs fit` CSV fits, but padding the plot's log axis
/// overflowed to infinity and the tick code subtracted `i32::MIN` from `i32::MAX` (found by
/// `cbs_csv`, one cell of `experiments/data/cbs-synthetic.csv` set to 1e300).
#[test]
fn a_batch_size_of_1e300_plots_without_panicking() {
    let text = read_text("experiments/data/cbs-synthetic.csv").replacen(
        "chinchilla-85M,8.5e+07,1.7e+09,64,",
        "chinchilla-85M,8.5e+07,1.7e+09,1e300,",
        1,
    );
    let rows = parse_cbs_csv(&text, Path::new("x.csv")).unwrap();
    let report = analyze(&rows, 128.0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for layout in [PlotLayout::Panels, PlotLayout::Overlaid] {
        let plot = StepsToTargetPlot {
            title: "t".into(),
            series: vec![StepsSeries {
                label: "a".into(),
                points: report.groups[0].points.clone(),
                fit: Some(report.groups[0].fit),
            }],
            layout,
        };
        plot_steps_to_target(&plot, &dir.path().join("s.svg")).unwrap();
    }
}

/// Muon accepted any `ns_steps`; 2^60 Newton–Schulz iterations never finish (found by
/// `optimizer_config`: the test hung in `newton_schulz`).
#[test]
fn an_absurd_newton_schulz_count_is_refused() {
    let err =
        OptimConfig::from_toml("name = \"muon\"\nns_steps = 1152921504606846976").unwrap_err();
    assert!(err.to_string().contains("muon.ns_steps"), "{err}");
    OptimConfig::from_toml("name = \"muon\"\nns_steps = 100").unwrap();
}

/// A golden file whose shape's product overflows `usize` made the element count panic.
#[test]
fn a_golden_shape_that_overflows_is_an_error() {
    let mut v: Json = serde_json::from_str(&golden_samples()[0]).unwrap();
    v["param_meta"][1]["shape"] = serde_json::json!([4_294_967_296u64, 4_294_967_297u64]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("case.json");
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = GoldenCase::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("too large") && err.contains("case.json"),
        "{err}"
    );
}

/// A sweep whose axes multiply to 10^24 runs was expanded in memory until it ran out; it is
/// refused before expansion, naming the count.
#[test]
fn a_sweep_of_absurdly_many_runs_is_refused_before_expansion() {
    let values: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
    let list = values.join(", ");
    let text = format!(
        "name = \"huge\"\n[base]\nseed = 0\n[base.model]\npreset = \"test\"\n\
         [[optimizers]]\nlabel = \"adamw\"\nlr = [1e-3]\nconfig = {{ name = \"adamw\" }}\n\
         [axes]\nbatch_size = [4]\n\
         set = {{ \"train.steps\" = [{list}], \"optimizer.weight_decay\" = [{list}], \"eval.interval\" = [{list}], \
         \"checkpoint.interval\" = [{list}], \"train.log_interval\" = [{list}], \
         \"eval.tokens\" = [{list}], \"train.grad_clip\" = [{list}], \"optimizer.eps\" = [{list}] }}\n"
    );
    let spec = SweepSpec::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    let err = spec.plan().unwrap_err().to_string();
    assert!(err.contains("runs") && err.contains("100000"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

/// A checkpoint manifest that lists a file outside its directory (`/dev/zero` would be read
/// until memory runs out) is corrupt, and a file larger than recorded is not read.
#[test]
fn a_manifest_naming_files_outside_its_checkpoint_is_refused() {
    let files = stopped_run();
    let manifest_key = files
        .keys()
        .find(|k| k.ends_with("manifest.json"))
        .unwrap()
        .clone();
    for name in ["/dev/zero", "../config.toml", "sub/model.safetensors"] {
        let dir = tempfile::tempdir().unwrap();
        for (rel, bytes) in files {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        }
        let mut m: Json = serde_json::from_slice(&files[&manifest_key]).unwrap();
        m["files"][name] = serde_json::json!({ "bytes": 5, "crc32": 0 });
        std::fs::write(
            dir.path().join(&manifest_key),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        let err = optlab::runner::checkpoint::latest(dir.path())
            .unwrap_err()
            .to_string();
        // Refused by its name, before anything is read (the old loader read /dev/zero until an
        // allocation failed, and hashed `../config.toml`).
        assert!(
            err.contains("manifest") && err.contains(name) && err.contains("not a file name"),
            "{name}: {err}"
        );
    }
    // A file larger than its manifest entry: refused by its size before it is read.
    let dir = tempfile::tempdir().unwrap();
    for (rel, bytes) in files {
        let p = dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    let model = dir
        .path()
        .join(manifest_key.with_file_name("model.safetensors"));
    let mut bytes = std::fs::read(&model).unwrap();
    bytes.extend_from_slice(&[0; 16]);
    std::fs::write(&model, bytes).unwrap();
    let err = optlab::runner::checkpoint::latest(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("bytes") && !err.contains("CRC"),
        "refused by its size, before it is read and hashed: {err}"
    );
}

/// `train.batch_size × model.context` overflowed while the config was read (found by
/// `run_config`: `tiny.toml` with `--set train.batch_size=9223372036854775807`, and by
/// `sweep_file`: `cbs-model-size.toml` with `base.model.context = 9223372036854775807`).
#[test]
fn tokens_per_step_that_overflow_are_an_error() {
    let tiny = read_text("experiments/configs/tiny.toml");
    let err = RunConfig::parse(&tiny, &["train.batch_size=9223372036854775807".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("train.batch_size"), "{err}");
    let sweep = read_text("experiments/configs/cbs-model-size.toml").replacen(
        "context = 64\n",
        "context = 9223372036854775807\n",
        1,
    );
    let spec = SweepSpec::parse(&sweep).unwrap();
    let err = spec.plan().unwrap_err().to_string();
    assert!(
        err.contains("train.batch_size") || err.contains("context"),
        "{err}"
    );
}
