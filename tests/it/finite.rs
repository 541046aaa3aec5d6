//! The finite-width executor (`tpc run`) against two oracles:
//!
//! * finite differences (test-only): the exact reverse-mode NTK of one draw equals
//!   Σ_w lr(w) ⟨∂f/∂w, ∂f'/∂w⟩ with every gradient entry taken by central differences;
//! * the infinite-width limit (`tpc::limit::limit`): over K draws at width N the finite
//!   estimates agree with the limit within 4 standard errors on every NNGP and NTK entry
//!   and every observe (theory.md §1.2: the finite quantities converge at rate N^(-1/2),
//!   so at the chosen N, K the O(1/N) bias is well below the SE and needs no allowance;
//!   `max_z` prints how far each example is from the bound).
//!
//! and for determinism: the same command twice, and with 1 vs 2 threads, prints
//! byte-identical JSON.

use crate::common;

use std::process::Command;

use nalgebra::DMatrix;
use tpc::finite::exec::{run, run_one, run_with, sample_params, RunConfig, RunResult};
use tpc::ir::Program;

fn manifest() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn compile(src: &str) -> Program {
    tpc::compile(src).unwrap_or_else(|e| panic!("{e}"))
}

fn points(prog: &Program, path: &std::path::Path) -> Vec<Vec<f64>> {
    let text = std::fs::read_to_string(path).unwrap();
    tpc::data::parse_points(prog, &path.display().to_string(), &text).unwrap()
}

#[test]
fn ntk_equals_finite_differences() {
    let prog = compile(common::EVERY_RULE);
    let pts = points(&prog, &manifest().join("tests/data/X2_4.csv"));
    let n = 7;
    let ws = sample_params(&prog, n, 11, 3).unwrap();
    let draw = run_with(&prog, &pts, n, ws.clone()).unwrap();
    // The same draw through the public entry point.
    let again = run_one(&prog, &pts, n, 11, 3).unwrap();
    assert_eq!(draw.ntk, again.ntk);

    let o = prog.outputs.len();
    let p = pts.len();
    let flat = |d: &tpc::finite::exec::Draw| -> Vec<f64> {
        // output-major (o, p)
        (0..o * p).map(|k| d.f[(k / p, k % p)]).collect()
    };
    let mut theta = DMatrix::<f64>::zeros(o * p, o * p);
    for (pi, prm) in prog.params.iter().enumerate() {
        let lr = prm.law.lr.at(n as f64);
        for e in 0..ws[pi].len() {
            let h = 1e-5;
            let mut plus = ws.clone();
            plus[pi].as_mut_slice()[e] += h;
            let mut minus = ws.clone();
            minus[pi].as_mut_slice()[e] -= h;
            let fp = flat(&run_with(&prog, &pts, n, plus).unwrap());
            let fm = flat(&run_with(&prog, &pts, n, minus).unwrap());
            let g: Vec<f64> = fp
                .iter()
                .zip(&fm)
                .map(|(a, b)| (a - b) / (2.0 * h))
                .collect();
            for i in 0..o * p {
                for j in 0..o * p {
                    theta[(i, j)] += lr * g[i] * g[j];
                }
            }
        }
    }
    let scale = theta.amax();
    for i in 0..o * p {
        for j in 0..o * p {
            let (a, b) = (draw.ntk[(i, j)], theta[(i, j)]);
            assert!(
                (a - b).abs() <= 1e-7 * scale,
                "NTK[{i},{j}]: reverse mode {a}, finite differences {b}"
            );
        }
    }
    assert!(scale > 0.1, "a degenerate test: the NTK is {scale}");
}

/// max over entries of |finite − limit| / SE, asserting each is within 4 SE.
fn check_matrix(
    name: &str,
    what: &str,
    fin: &tpc::finite::exec::Estimate,
    lim: &DMatrix<f64>,
) -> f64 {
    let se = fin.se.as_ref().expect("K >= 2");
    assert_eq!(fin.mean.shape(), lim.shape(), "{name} {what}");
    let mut worst: f64 = 0.0;
    for i in 0..lim.nrows() {
        for j in 0..lim.ncols() {
            let (f, l, s) = (fin.mean[(i, j)], lim[(i, j)], se[(i, j)]);
            let tol = 4.0 * s + 1e-9 * (1.0 + l.abs());
            assert!(
                (f - l).abs() <= tol,
                "{name} {what}[{i},{j}]: finite {f} ± {s}, limit {l}"
            );
            if s > 0.0 {
                worst = worst.max((f - l).abs() / s);
            }
        }
    }
    worst
}

fn against_limit(name: &str, prog: &Program, pts: &[Vec<f64>], width: usize, seeds: usize) {
    let t = std::time::Instant::now();
    let cfg = RunConfig {
        width,
        seeds,
        seed: 1,
    };
    let fin: RunResult = run(prog, pts, &cfg, &|| {}).unwrap();
    let elapsed = t.elapsed();
    let lim = tpc::limit::limit(prog, pts).unwrap();
    let mut worst: f64 = 0.0;
    if let Some(k) = &lim.nngp {
        worst = worst.max(check_matrix(name, "nngp", &fin.nngp, k));
    }
    if let Some(k) = &lim.ntk {
        worst = worst.max(check_matrix(name, "ntk", &fin.ntk, k));
    }
    for ((lname, lv), (fname, fe)) in lim.observe.iter().zip(&fin.observe) {
        assert_eq!(lname, fname);
        let lm = DMatrix::from_fn(1, fe.mean.ncols(), |_, j| {
            if lv.len() == 1 {
                lv[0]
            } else {
                lv[j]
            }
        });
        worst = worst.max(check_matrix(name, lname, fe, &lm));
    }
    eprintln!("{name}: width {width}, {seeds} draws in {elapsed:.2?}: max |finite - limit| / SE = {worst:.2}");
}

#[test]
fn mlp3_agrees_with_the_limit() {
    let prog = compile(&common::example("mlp3"));
    let pts = points(&prog, &common::refs_dir().join("programs/X1.csv"));
    against_limit("mlp3", &prog, &pts, 1024, 100);
}

#[test]
fn erf_deep_agrees_with_the_limit() {
    let prog = compile(&common::example("erf_deep"));
    let pts = points(&prog, &manifest().join("tests/data/erf_X5.csv"));
    against_limit("erf_deep", &prog, &pts, 1024, 100);
}

#[test]
fn rnn_agrees_with_the_limit() {
    let prog = compile(&common::example("rnn"));
    let pts = points(&prog, &manifest().join("examples/rnn_points.csv"));
    against_limit("rnn", &prog, &pts, 1024, 100);
}

#[test]
fn semicircle_moments_agree_with_the_limit() {
    let prog = compile(&common::example("semicircle"));
    against_limit("semicircle", &prog, &[], 1024, 100);
}

#[test]
fn draws_do_not_depend_on_how_many_are_run() {
    let prog = compile(&common::example("mlp3"));
    let pts = points(&prog, &common::refs_dir().join("programs/X1.csv"));
    let one = run_one(&prog, &pts, 64, 5, 2).unwrap();
    let cfg = RunConfig {
        width: 64,
        seeds: 3,
        seed: 5,
    };
    // The mean of 3 draws minus draws 0 and 1 is draw 2.
    let all = run(&prog, &pts, &cfg, &|| {}).unwrap();
    let d0 = run_one(&prog, &pts, 64, 5, 0).unwrap();
    let d1 = run_one(&prog, &pts, 64, 5, 1).unwrap();
    let back = &all.ntk.mean * 3.0 - &d0.ntk - &d1.ntk;
    assert!((back - &one.ntk).amax() < 1e-12);
}

fn tpc_run(args: &[&str], threads: &str) -> Vec<u8> {
    common::tpc_ok(args, Some(threads))
}

#[test]
fn run_json_is_deterministic_across_runs_and_threads() {
    let rnn = common::example_path("rnn");
    let pts = manifest().join("examples/rnn_points.csv");
    let args = [
        "run",
        rnn.to_str().unwrap(),
        "--width",
        "300",
        "--seeds",
        "5",
        "--seed",
        "9",
        "--inputs",
        pts.to_str().unwrap(),
        "--format",
        "json",
    ];
    let a = tpc_run(&args, "2");
    let b = tpc_run(&args, "2");
    let c = tpc_run(&args, "1");
    assert_eq!(a, b, "two runs differ");
    assert_eq!(a, c, "1 and 2 threads differ");
    let v: serde_json::Value = serde_json::from_slice(&a).unwrap();
    for key in [
        "outputs",
        "points",
        "nngp",
        "ntk",
        "observe",
        "nngp_se",
        "ntk_se",
        "observe_se",
        "width",
        "seeds",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["width"], 300);
    assert_eq!(v["nngp"].as_array().unwrap().len(), 15);
    // A width large enough for the products to run on both threads.
    let mlp = common::example_path("mlp3");
    let x1 = common::refs_dir().join("programs/X1.csv");
    let args = [
        "run",
        mlp.to_str().unwrap(),
        "--width",
        "1500",
        "--seeds",
        "2",
        "--inputs",
        x1.to_str().unwrap(),
        "--format",
        "json",
    ];
    assert_eq!(tpc_run(&args, "1"), tpc_run(&args, "2"));
}

#[test]
fn overflow_names_the_node() {
    let src = "width n\ninput x : 1\nparam U : n x 1 { std = 30 }\nparam v : 1 x n\nh = exp(exp(U @ x))\noutput f = v @ h\n";
    let prog = compile(src);
    let err = run_one(&prog, &[vec![3.0]], 50, 0, 0).unwrap_err();
    assert!(
        err.message.contains("h overflows at width 50"),
        "{}",
        err.message
    );
    assert!(err.node.is_some());
}

#[test]
fn too_large_a_width_is_refused_with_the_largest_that_fits() {
    let mlp = common::example_path("mlp3");
    let x1 = common::refs_dir().join("programs/X1.csv");
    let out = Command::new(env!("CARGO_BIN_EXE_tpc"))
        .args([
            "run",
            mlp.to_str().unwrap(),
            "--width",
            "100000000",
            "--seeds",
            "1",
        ])
        .args(["--inputs", x1.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the largest width that fits is"), "{err}");
}
