//! Helpers shared by the integration tests: where the contract's examples and the
//! reference data live. The project carries its own copies (`examples/`,
//! `tests/data/refs/`, `docs/`), so a fresh clone tests itself; `tests/it/contract.rs`
//! checks them byte for byte against `../shared` when that directory is present.
#![allow(dead_code)]

use std::path::PathBuf;

/// The crate root.
pub fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The project's copies of the contract examples (`../shared/spec/examples`).
pub fn examples_dir() -> PathBuf {
    manifest().join("examples")
}

/// The path of the contract example `name` (without `.tp`).
pub fn example_path(name: &str) -> PathBuf {
    examples_dir().join(format!("{name}.tp"))
}

/// The project's copy of the Neural Tangents references (`../shared/refs`):
/// `nt_kernels.json` and `programs/` (the reference programs and X1.csv, X3.csv).
pub fn refs_dir() -> PathBuf {
    manifest().join("tests").join("data").join("refs")
}

/// `../shared` beside the crate, when it is there (the upstream contract); a fresh
/// clone has none, and the tests use the project's copies only.
pub fn upstream_shared() -> Option<PathBuf> {
    let p = manifest().join("..").join("shared");
    p.join("spec").is_dir().then_some(p)
}

/// Examples of the project's own (Netsor+ scalars, issue 14), beside the contract's.
pub const PROJECT_EXAMPLES: [&str; 3] = ["layernorm_mlp", "sp_attention", "transformer"];

/// Examples of the project's own for optimizers (issue 15, README "Training: optimizers").
pub const OPTIM_EXAMPLES: [&str; 3] = ["adam_mlp", "momentum_rnn", "sp_adam"];

/// Every example (the contract's and the project's), sorted by name: (stem, source).
pub fn examples() -> Vec<(String, String)> {
    let dir = examples_dir();
    let mut out: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "tp"))
        .map(|p| {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            (stem, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(
        out.len() >= 6,
        "expected the six contract examples in {}",
        dir.display()
    );
    out
}

pub fn example(name: &str) -> String {
    let p = example_path(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// Every backward rule: an input layer, a bias, a moment feeding a Nonlin, a matrix
/// used three times (forward and transposed), two outputs sharing a readout, a scalar
/// bias, a constant, non-unit learning rates (muP). No `train` block.
pub const EVERY_RULE: &str = "\
width n
input x : 2
parameterization mup
param U : n x 2
param W : n x n { std = 1.3 }
param b : n { std = 0.5 }
param v : 1 x n
param c : 1 { std = 0.2 }
param u : 1 x n ~ N(0, 1) * n^(-1/2) lr 2.5
h1 = tanh(U @ x + b)
observe m = mean(h1 * h1)
h2 = sin(W @ h1) * h1 + m * h1
g = erf(W.T @ h2) + gelu(W @ h2)
output f = v @ g + c
output k = u @ h1 + 2 * v @ h2 - 0.5
";

/// A linear one-hidden-layer muP network: a bias, two outputs (one reading out a sum
/// of features), a constant; five steps on three samples with two targets each.
pub const MUP_LINEAR: &str = "\
width n
input x : 2
parameterization mup
param U : n x 2
param b : n { std = 0.5 }
param v : 1 x n
param u : 1 x n
h = U @ x + b
k = 2 * h - 0.5 * (U @ x)
output f = v @ h
output g = u @ k + 0.5 * v @ h + 0.1
train {
    loss  = mse
    lr    = 0.2
    steps = 5
    data  = [ ([1.0, 0.0], [1.0, 0.0]), ([0.0, 1.0], [-1.0, 0.5]), ([0.7, 0.7], [0.5, -0.5]) ]
}
";

/// The training inputs of a program's `train` block, in data order.
pub fn train_inputs(prog: &tpc::ir::Program) -> Vec<Vec<f64>> {
    prog.train
        .as_ref()
        .expect("a train block")
        .data
        .iter()
        .map(|s| s.x.clone())
        .collect()
}

/// Runs the `tpc` binary with `args` (on `threads` rayon threads when given) and
/// returns its standard output; panics with its standard error unless it succeeds.
pub fn tpc_ok(args: &[&str], threads: Option<&str>) -> Vec<u8> {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_tpc"));
    c.args(args);
    if let Some(t) = threads {
        c.env("RAYON_NUM_THREADS", t);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "tpc {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// [`tpc_ok`] for a command run with `--format json` (the caller passes it): its
/// standard output parsed as one JSON value.
pub fn tpc_json(args: &[&str]) -> serde_json::Value {
    let out = tpc_ok(args, None);
    serde_json::from_slice(&out).unwrap_or_else(|e| {
        panic!(
            "tpc {}: not JSON ({e}): {}",
            args.join(" "),
            String::from_utf8_lossy(&out)
        )
    })
}
