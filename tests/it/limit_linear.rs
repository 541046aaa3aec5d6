//! Exact Gaussian algebra for linear networks (`tpc::limit::linear`, theory.md §2.1,
//! §6.2): the unrolled training program read with exact Ẑ/Ż linear algebra.
//!
//! * one hidden layer: equals the width-(d + d_o) construction of theory.md §6.3
//!   (`limit::train::linear_trajectory`) to 1e-12;
//! * deep linear muP (two hidden layers, W used forward and by backprop's Wᵀ): within
//!   4 standard errors of a finite-width run (conditional engine, N = 2^14).

use crate::common;

use nalgebra::DMatrix;
use tpc::finite::exec::{run_engine, Engine, RunConfig};
use tpc::ir::Program;

fn compile(src: &str) -> Program {
    tpc::compile(src).unwrap_or_else(|e| panic!("{e}"))
}

const DEEP_LINEAR: &str = "\
width n
input x : 2
parameterization mup
param U : n x 2
param W : n x n { std = 1.2 }
param V : n x n
param v : 1 x n
h1 = U @ x
h2 = W @ h1
h3 = V @ h2 + 0.5 * h1
output f = v @ h3
train {
    loss  = mse
    lr    = 0.3
    steps = 4
    data  = [ ([1.0, 0.0], 1.0), ([0.0, 1.0], -1.0), ([0.7, 0.7], 0.5) ]
}
";

#[test]
fn one_hidden_layer_equals_the_width_d_plus_do_construction() {
    let prog = compile(common::MUP_LINEAR);
    let eval = vec![vec![1.0, 0.0], vec![0.7, 0.7], vec![-0.5, 0.2]];
    let exact = tpc::limit::linear::trajectory(&prog, &eval).unwrap();
    let tp4 =
        tpc::limit::train::linear_trajectory(&prog, prog.train.as_ref().unwrap(), &eval).unwrap();
    let d = (&exact - &tp4).abs().max();
    eprintln!("unrolled exact vs width-(d+d_o): {d:.1e}");
    assert!(d < 1e-12, "{d:e}\n{exact}\n{tp4}");
    assert!(exact
        .row(5)
        .iter()
        .zip(exact.row(0).iter())
        .any(|(a, b)| (a - b).abs() > 0.1));
}

#[test]
fn deep_linear_mup_matches_finite_width() {
    let prog = compile(DEEP_LINEAR);
    let f = tpc::limit::linear::trajectory(&prog, &[]).unwrap();
    assert_eq!(f.shape(), (5, 3));
    assert!(f.row(0).iter().all(|v| *v == 0.0), "f_0 = 0 in muP: {f}");
    assert!((f[(4, 0)] - f[(0, 0)]).abs() > 0.1, "it learns: {f}");
    let cfg = RunConfig {
        width: 1 << 14,
        seeds: 16,
        seed: 5,
    };
    let r = run_engine(&prog, &[], &cfg, Engine::Conditional, &|| {}).unwrap();
    let t = r.train.unwrap().f_t;
    let se = t.se.unwrap();
    let z: DMatrix<f64> = DMatrix::from_fn(f.nrows(), f.ncols(), |i, j| {
        (t.mean[(i, j)] - f[(i, j)]).abs() / se[(i, j)].max(1e-12)
    });
    eprintln!(
        "deep linear: worst {:.2} SE\nlimit {f}\nfinite {}",
        z.max(),
        t.mean
    );
    assert!(z.max() < 4.0, "{z}");
}
