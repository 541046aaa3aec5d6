//! Tied weights in the forward pass (issue 18): `h2 = W.T @ tanh(W @ h1)`. The limit
//! (theory.md §2.1) is `Z^{h2} = Ẑ^{Wᵀ x} + s(ξ) Z^{h1}` with `x = tanh(W h1)` and the Ż
//! coefficient `s(ξ) = σ_W² E[tanh'(Ẑ^{W h1}(ξ))]`, a number per point; Ẑ^{Wᵀ x} is
//! independent of everything but its own family, with covariance `σ_W² E[Z^x Z^x']`.
//!
//! * an independent computation of the NNGP and observes written here from those
//!   formulas (trapezoidal Gaussian quadrature, the arc-cosine kernel of relu);
//! * finite width, both engines, entry by entry within 3 standard errors (plus the
//!   limit's stated error): the conditional engine at N = 4096, K = 64 in CI, the dense
//!   one at N = 1024, K = 64 in CI and at N = 4096, K = 64 under `#[ignore]`
//!   (`cargo test --release --test it tied:: -- --ignored`);
//! * the derivation with its Ż terms (snapshot), JSON output, the NTK's note under SP
//!   and a constant next to Gaussians in a Ż term (`U @ x + 1`).

use crate::common;

use nalgebra::DMatrix;
use tpc::finite::exec::{run_engine, Engine, RunConfig};

const HEAD: &str = "width n\ninput x : 2\nparam U : n x 2 ~ N(0, 1/2)\n\
                    param W : n x n ~ N(0, 1/n)\nparam v : 1 x n ~ N(0, 1/n)\n";

/// h1 = U x (Gaussian): `v @ h2` and `v @ relu(h2)` with an observe.
fn gaussian_h1(readout: &str) -> String {
    format!(
        "{HEAD}h1 = U @ x\nh2 = W.T @ tanh(W @ h1)\nobserve m = mean(h2 * h2)\noutput f = v @ {readout}\n"
    )
}

/// h1 = relu(U x) (not Gaussian: the Ż term is s(ξ) relu(Ẑ^{U x})).
fn relu_h1() -> String {
    format!(
        "{HEAD}h1 = relu(U @ x)\nh2 = W.T @ tanh(W @ h1)\nobserve m = mean(h2 * h1)\noutput f = v @ h2\n"
    )
}

/// h1 = U x + 1: a constant next to a Gaussian in the Ż term s(ξ) Z^{h1}.
fn shifted() -> String {
    format!(
        "{HEAD}h1 = U @ x + 1\nh2 = W.T @ tanh(W @ h1)\nobserve m = mean(h2 * h1)\noutput f = v @ h2\n"
    )
}

fn points() -> Vec<Vec<f64>> {
    vec![vec![1.0, 0.5], vec![-0.3, 1.2], vec![0.7, -0.8]]
}

fn compile(src: &str) -> tpc::ir::Program {
    tpc::compile(src).unwrap_or_else(|e| panic!("{e}"))
}

// ---- an independent computation -------------------------------------------------

/// `E[g(z)]`, z ~ N(0, 1), by the trapezoidal rule on [-12, 12] (spectrally accurate
/// for the analytic integrands used here).
fn e1(g: &dyn Fn(f64) -> f64) -> f64 {
    let h = 0.02;
    let n = (12.0 / h) as i64;
    let w = |z: f64| (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (-n..=n)
        .map(|k| {
            let z = k as f64 * h;
            g(z) * w(z)
        })
        .sum::<f64>()
        * h
}

/// `E[f(a) g(b)]` for (a, b) centered Gaussian with covariance [[saa, sab], [sab, sbb]].
fn e2(f: &dyn Fn(f64) -> f64, g: &dyn Fn(f64) -> f64, saa: f64, sab: f64, sbb: f64) -> f64 {
    let a = saa.sqrt();
    let b = if a > 0.0 { sab / a } else { 0.0 };
    let c = (sbb - b * b).max(0.0).sqrt();
    e1(&|z1| f(a * z1) * e1(&|z2| g(b * z1 + c * z2)))
}

/// The arc-cosine kernel `E[relu(a) relu(b)]` (Cho & Saul).
fn relu_kernel(saa: f64, sab: f64, sbb: f64) -> f64 {
    let s = (saa * sbb).sqrt();
    let cos = (sab / s).clamp(-1.0, 1.0);
    let t = cos.acos();
    s / (2.0 * std::f64::consts::PI) * (t.sin() + (std::f64::consts::PI - t) * cos)
}

/// `Cov(Z^{h1}(p), Z^{h1}(q))` for h1 = U x: 0.5 ⟨x_p, x_q⟩.
fn input_cov(pts: &[Vec<f64>]) -> DMatrix<f64> {
    let p = pts.len();
    DMatrix::from_fn(p, p, |i, j| {
        0.5 * pts[i].iter().zip(&pts[j]).map(|(a, b)| a * b).sum::<f64>()
    })
}

/// `E[Z^{h2}(p) Z^{h2}(q)]` for `h2 = Wᵀ tanh(W h1)`, σ_W² = 1, given
/// `c = E[Z^{h1} Z^{h1}']`: `E[tanh tanh'] + s_p s_q c_pq`, s = E[tanh'(Ẑ^{W h1})].
fn tied_cov(c: &DMatrix<f64>) -> (DMatrix<f64>, Vec<f64>) {
    let p = c.nrows();
    let s: Vec<f64> = (0..p)
        .map(|i| e1(&|z| 1.0 - (c[(i, i)].sqrt() * z).tanh().powi(2)))
        .collect();
    let k = DMatrix::from_fn(p, p, |i, j| {
        e2(&f64::tanh, &f64::tanh, c[(i, i)], c[(i, j)], c[(j, j)]) + s[i] * s[j] * c[(i, j)]
    });
    (k, s)
}

fn assert_close(what: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol,
        "{what}: limit {got}, independent {want}, |Δ| = {:.2e} > {tol:.1e}",
        (got - want).abs()
    );
}

/// The quadrature error of this file's own computation (trapezoid, nested).
const OURS: f64 = 1e-9;

#[test]
fn nngp_and_observes_match_an_independent_computation() {
    let pts = points();
    let c = input_cov(&pts);
    let (k, _) = tied_cov(&c);
    let p = pts.len();

    // v @ h2: the NNGP is E[Z^{h2} Z^{h2}'] itself (σ_v² = 1); m = E[(Z^{h2})²].
    let prog = compile(&gaussian_h1("h2"));
    let r = tpc::limit::limit(&prog, &pts).unwrap();
    let nngp = r.nngp.as_ref().unwrap();
    let tol = r.max_error + OURS;
    for i in 0..p {
        for j in 0..p {
            assert_close(&format!("nngp[{i}][{j}]"), nngp[(i, j)], k[(i, j)], tol);
        }
        assert_close(&format!("m[{i}]"), r.observe[0].1[i], k[(i, i)], tol);
    }
    // Without Ż the answer would be E[tanh tanh'] alone: the term is large here.
    let (_, s) = tied_cov(&c);
    assert!(s[0] * s[0] * c[(0, 0)] > 0.1);

    // v @ relu(h2): Z^{h2} is Gaussian (s(ξ) Ẑ^{U x} plus an independent Ẑ), so the
    // readout is the arc-cosine kernel of k.
    let prog = compile(&gaussian_h1("relu(h2)"));
    let r = tpc::limit::limit(&prog, &pts).unwrap();
    let nngp = r.nngp.as_ref().unwrap();
    let tol = r.max_error + OURS;
    for i in 0..p {
        for j in 0..p {
            let want = relu_kernel(k[(i, i)], k[(i, j)], k[(j, j)]);
            assert_close(&format!("relu nngp[{i}][{j}]"), nngp[(i, j)], want, tol);
        }
    }

    // h1 = relu(U x): c is the arc-cosine kernel of the input covariance; the observe
    // m = E[Z^{h2} Z^{h1}] = s E[relu(Ẑ^{U x})²] (Ẑ^{Wᵀ x} is independent, mean 0).
    let c0 = input_cov(&pts);
    let c = DMatrix::from_fn(p, p, |i, j| relu_kernel(c0[(i, i)], c0[(i, j)], c0[(j, j)]));
    let (k, s) = tied_cov(&c);
    let prog = compile(&relu_h1());
    let r = tpc::limit::limit(&prog, &pts).unwrap();
    let nngp = r.nngp.as_ref().unwrap();
    let tol = r.max_error + OURS;
    for i in 0..p {
        for j in 0..p {
            assert_close(
                &format!("relu-h1 nngp[{i}][{j}]"),
                nngp[(i, j)],
                k[(i, j)],
                tol,
            );
        }
        assert_close(
            &format!("relu-h1 m[{i}]"),
            r.observe[0].1[i],
            s[i] * c[(i, i)],
            tol,
        );
    }
}

/// Ż through `step`: the derivative is a Dirac delta, taken by Stein's lemma.
/// Z^u = Ẑ^{Wᵀ step(x)} + Z^v E[δ(Z^x)] with Z^x ~ N(0, 1): E[Z^u Z^v] = 1/√(2π).
#[test]
fn a_step_contributes_its_delta() {
    let prog = compile(
        "width n\nparam W : n x n ~ N(0, 1/n)\nparam v : n ~ N(0, 1)\n\
         x = W @ v\nu = W.T @ step(x)\nobserve a = mean(u * v)\n",
    );
    let r = tpc::limit::limit(&prog, &[]).unwrap();
    let want = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
    assert_close("a", r.observe[0].1[0], want, r.max_error);
    assert!(r.max_error < 1e-3, "stated error {}", r.max_error);
}

// ---- finite width ------------------------------------------------------------------

/// Every NNGP and observe entry of a finite run within 3 standard errors (plus the
/// limit's stated error) of the limit; returns the largest |z|.
fn finite_agrees(src: &str, engine: Engine, width: usize, seeds: usize) -> f64 {
    let prog = compile(src);
    let pts = points();
    let lim = tpc::limit::limit(&prog, &pts).unwrap();
    let cfg = RunConfig {
        width,
        seeds,
        seed: 0,
    };
    let run = run_engine(&prog, &pts, &cfg, engine, &|| {}).unwrap();
    let mut worst: f64 = 0.0;
    let lim_err = lim.max_error;
    let mut check = |what: String, fin: f64, se: f64, lim: f64| {
        let z = (fin - lim).abs() / se;
        worst = worst.max(z);
        assert!(
            (fin - lim).abs() <= 3.0 * se + lim_err,
            "{what} ({engine:?}, N = {width}, K = {seeds}): finite {fin} ± {se}, limit {lim}, z = {z:.2}"
        );
    };
    let nngp = lim.nngp.as_ref().unwrap();
    let se = run.nngp.se.as_ref().unwrap();
    for i in 0..nngp.nrows() {
        for j in 0..nngp.ncols() {
            check(
                format!("nngp[{i}][{j}]"),
                run.nngp.mean[(i, j)],
                se[(i, j)],
                nngp[(i, j)],
            );
        }
    }
    for ((name, vals), (_, est)) in lim.observe.iter().zip(&run.observe) {
        let se = est.se.as_ref().unwrap();
        for (i, v) in vals.iter().enumerate() {
            check(format!("{name}[{i}]"), est.mean[(0, i)], se[(0, i)], *v);
        }
    }
    worst
}

fn programs() -> Vec<String> {
    vec![
        gaussian_h1("h2"),
        gaussian_h1("relu(h2)"),
        relu_h1(),
        shifted(),
    ]
}

#[test]
fn conditional_engine_at_4096_matches_the_limit() {
    for src in programs() {
        finite_agrees(&src, Engine::Conditional, 4096, 64);
    }
}

#[test]
fn dense_engine_at_1024_matches_the_limit() {
    for src in programs() {
        finite_agrees(&src, Engine::Dense, 1024, 64);
    }
}

/// The criterion with the dense engine (about 30 s a program).
#[test]
#[ignore]
fn dense_engine_at_4096_matches_the_limit() {
    for src in programs() {
        let z = finite_agrees(&src, Engine::Dense, 4096, 64);
        eprintln!("max |z| = {z:.2}");
    }
}

// ---- reports -----------------------------------------------------------------------

#[test]
fn derivation_shows_the_zdot_terms() {
    let mut text = String::new();
    for src in [
        relu_h1(),
        format!(
            "{HEAD}h1 = U @ x\nh2 = W.T @ tanh(W @ h1)\nh3 = W @ relu(h2)\noutput f = v @ h3\n"
        ),
    ] {
        let prog = compile(&src);
        let der = tpc::limit::derivation(&prog).unwrap();
        text.push_str(&tpc::limit::derivation_text(&prog, &der));
        text.push('\n');
    }
    insta::assert_snapshot!("derivation", text);
}

/// The NTK through the backward pass (tests/it/tied_ntk.rs checks its numbers); here
/// the SP laws of this file make it grow like n, which the JSON says in `notes.ntk`.
#[test]
fn the_ntk_note_and_json_are_valid() {
    let dir = std::env::temp_dir().join(format!("tpc-tied-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tied.tp");
    std::fs::write(&file, gaussian_h1("relu(h2)")).unwrap();
    let csv = dir.join("pts.csv");
    std::fs::write(&csv, "1.0,0.5\n-0.3,1.2\n0.7,-0.8\n").unwrap();
    let (f, c) = (file.to_str().unwrap(), csv.to_str().unwrap());
    let out = common::tpc_ok(&["limit", f, "--inputs", c, "--format", "json"], None);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert!(v["nngp"].is_array(), "{v}");
    assert!(v["ntk"].is_null(), "{v}");
    let note = v["notes"]["ntk"].as_str().unwrap_or_default();
    assert!(note.contains("grows like n^(1)"), "{note}");
    let text = String::from_utf8(common::tpc_ok(&["limit", f, "--inputs", c], None)).unwrap();
    assert!(text.contains("s1(ξ)·Z^h1"), "{text}");
    assert!(text.contains("# backward pass for the NTK"), "{text}");
    for engine in ["dense", "conditional"] {
        let out = common::tpc_ok(
            &[
                "run", f, "--inputs", c, "--width", "64", "--seeds", "4", "--engine", engine,
                "--format", "json",
            ],
            None,
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v["nngp"].is_array(), "{v}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A constant next to Gaussians in a Ż term (`h1 = U @ x + 1`): `s(ξ)·Z^{h1}` is the
/// Gaussian `s(ξ) Ẑ^{U x}` plus the value `s(ξ)` at each point (a degenerate Gaussian).
/// Independently: `c = E[Z^{h1} Z^{h1}'] = 0.5⟨x, x'⟩ + 1`, the NNGP of `v @ h2` is
/// [`tied_cov`] of c and `m = E[Z^{h2} Z^{h1}] = s c` (Ẑ^{Wᵀ ·} is centered and
/// independent of Z^{h1}).
#[test]
fn a_constant_next_to_a_point_coefficient() {
    let pts = points();
    let p = pts.len();
    let c = input_cov(&pts).add_scalar(1.0);
    let (k, s) = tied_cov(&c);
    let r = tpc::limit::limit(&compile(&shifted()), &pts).unwrap();
    let nngp = r.nngp.as_ref().unwrap();
    let tol = r.max_error + OURS;
    for i in 0..p {
        for j in 0..p {
            assert_close(&format!("nngp[{i}][{j}]"), nngp[(i, j)], k[(i, j)], tol);
        }
        assert_close(&format!("m[{i}]"), r.observe[0].1[i], s[i] * c[(i, i)], tol);
    }
}
