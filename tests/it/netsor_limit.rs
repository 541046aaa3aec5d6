//! The Netsor+ limit (issue 14, theory.md §1.1): layernorm and 1/n softmax attention in
//! `tpc limit`, against Neural Tangents (`tests/data/nt_netsor.json`, made and checked
//! against an independent numpy recursion by `tests/data/gen_nt_netsor.py`) and against
//! the finite network at large width (whose exact NTK includes the rank-one backward
//! terms through the moments that the limit drops as O(1/n), `limit::netsor`).

use crate::common;

use std::path::{Path, PathBuf};

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data")
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn matrix(v: &serde_json::Value) -> nalgebra::DMatrix<f64> {
    let rows: Vec<Vec<f64>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    nalgebra::DMatrix::from_fn(rows.len(), rows[0].len(), |i, j| rows[i][j])
}

/// (source, points) of a reference case.
fn case(name: &str) -> (String, Vec<Vec<f64>>, serde_json::Value) {
    let refs = read_json(&data().join("nt_netsor.json"));
    let c = refs["cases"][name].clone();
    let src = std::fs::read_to_string(data().join(c["program"].as_str().unwrap())).unwrap();
    let prog = tpc::compile(&src).unwrap_or_else(|e| panic!("{name}: {e}"));
    let csv = std::fs::read_to_string(data().join(c["inputs"].as_str().unwrap())).unwrap();
    let points = tpc::data::parse_points(&prog, name, &csv).unwrap();
    (src, points, c)
}

const CASES: [&str; 4] = [
    "ln_relu_2hidden_X5",
    "ln_erf_3hidden_bias_X5",
    "attn_linear_L3_X4",
    "attn_ln_attn_L3_X4",
];

/// Closed forms throughout (arc-cosine, Williams' erf, linear): 1e-10 relative to the
/// largest entry, and never more than the engine's own stated error allows.
#[test]
fn neural_tangents_layernorm_and_attention_to_1e10() {
    for name in CASES {
        let (src, points, c) = case(name);
        let r = tpc::limit_of(&src, &points).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (what, got) in [("nngp", &r.nngp), ("ntk", &r.ntk)] {
            let got = got.as_ref().unwrap_or_else(|| panic!("{name}: no {what}"));
            let want = matrix(&c[what]);
            let scale = want.amax();
            let tol = (1e-10 * scale).max(0.0);
            for i in 0..want.nrows() {
                for j in 0..want.ncols() {
                    let (g, w) = (got[(i, j)], want[(i, j)]);
                    assert!(
                        (g - w).abs() <= tol,
                        "{name} {what}[{i}][{j}]: tpc {g}, Neural Tangents {w}"
                    );
                }
            }
        }
        assert!(r.max_error < 1e-7, "{name}: stated error {}", r.max_error);
    }
}

/// The finite network at large width agrees with the limit within 4 standard errors
/// (the O(1/N) bias is far below the SE here): the NTK includes, at finite width, the
/// rank-one terms through layernorm's moments and the attention logits exactly.
#[test]
fn finite_width_agrees_with_the_netsor_limit() {
    for (name, width, seeds) in [
        ("ln_relu_2hidden_X5", 2048, 16),
        ("attn_ln_attn_L3_X4", 1024, 8),
    ] {
        let (src, points, _) = case(name);
        let lim = tpc::limit_of(&src, &points).unwrap();
        let cfg = tpc::RunConfig {
            width,
            seeds,
            seed: 7,
        };
        let fin = tpc::run(&src, &points, &cfg).unwrap();
        for (what, l, f) in [
            ("nngp", lim.nngp.as_ref().unwrap(), &fin.nngp),
            ("ntk", lim.ntk.as_ref().unwrap(), &fin.ntk),
        ] {
            let se = f.se.as_ref().unwrap();
            for i in 0..l.nrows() {
                for j in 0..l.ncols() {
                    let z = (f.mean[(i, j)] - l[(i, j)]) / se[(i, j)];
                    assert!(
                        z.abs() <= 4.0,
                        "{name} {what}[{i}][{j}]: finite {} ± {}, limit {}",
                        f.mean[(i, j)],
                        se[(i, j)],
                        l[(i, j)]
                    );
                }
            }
        }
    }
}

/// The examples' kernels: finite numbers, a PSD-looking diagonal, and the moments
/// printed in the derivation with their per-point limits.
#[test]
fn examples_have_kernels_and_moment_lines() {
    for name in ["layernorm_mlp", "transformer"] {
        let src = common::example(name);
        let prog = tpc::compile(&src).unwrap();
        let points = common::train_inputs(&prog);
        let text = tpc::derive(&src).unwrap();
        assert!(text.contains("(ξ) = E["), "{name}: {text}");
        let der = tpc::limit::derivation(&prog).unwrap();
        let r = tpc::limit::limit_general(&prog, &der, points)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let ntk = r.ntk.as_ref().unwrap();
        assert!(ntk.iter().all(|v| v.is_finite()), "{name}");
        for i in 0..ntk.nrows() {
            assert!(ntk[(i, i)] > 0.0, "{name}");
        }
    }
}
