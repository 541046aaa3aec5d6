//! The NTK of tied programs (issue 18): the backward pass as a tensor program with its
//! Ż terms (src/limit/backprop.rs, theory.md §2.1, §2.3).
//!
//! * an independent closed form for `h2 = W.T @ relu(W @ U x)` (ntk preset), written
//!   here from the rules by hand (derivation in [`relu_tied_ntk`]);
//! * finite width, entry by entry within 3 combined standard errors (plus the limit's
//!   stated error): the conditional engine at N = 4096, K = 64 in CI; the dense one at
//!   N = 1024, K = 64 in CI and at N = 4096, K = 64 under `#[ignore]`
//!   (`cargo test --release --test it tied_ntk:: -- --ignored`);
//! * the derivation of the backward pass with its Ż terms (snapshot).

use nalgebra::DMatrix;
use tpc::finite::exec::{run_engine, Engine, RunConfig};

/// The ntk preset: `U = d^(-1/2) u`, `W = n^(-1/2) w`, `v = n^(-1/2) w_v`, lr 1.
const HEAD: &str = "width n\ninput x : 2\nparam U : n x 2\nparam W : n x n\nparam v : 1 x n\n";

fn tanh_tied() -> String {
    format!("{HEAD}h1 = U @ x\nh2 = W.T @ tanh(W @ h1)\noutput f = v @ h2\n")
}

fn relu_tied() -> String {
    format!("{HEAD}h1 = U @ x\nh2 = W.T @ relu(W @ h1)\noutput f = v @ h2\n")
}

/// W, Wᵀ and W again: backward Ż terms through `step` (Stein's lemma) and `tanh'`.
fn three_uses() -> String {
    format!("{HEAD}h1 = U @ x\nh2 = W.T @ tanh(W @ h1)\nh3 = W @ relu(h2)\noutput f = v @ h3\n")
}

fn points() -> Vec<Vec<f64>> {
    vec![vec![1.0, 0.5], vec![-0.3, 1.2], vec![0.7, -0.8]]
}

fn compile(src: &str) -> tpc::ir::Program {
    tpc::compile(src).unwrap_or_else(|e| panic!("{e}"))
}

/// The NTK of `f = v·h2`, `h2 = Wᵀ relu(W h1)`, `h1 = U x` in the ntk preset, by hand.
///
/// With `c = E[Z^{h1} Z^{h1}'] = ½⟨x, x'⟩`, `a = W h1` (Ẑ, covariance c), θ = ∠(c):
/// `K = E[relu(a) relu(a')]` (arc-cosine, degree 1), `J = E[step(a) step(a')] = (π − θ)/2π`.
/// Forward: `Z^{h2} = Ẑ^{Wᵀ relu(a)} + ½ Z^{h1}` (Ż, E[step] = ½). Backward with
/// `dh2 = v̂ ~ N(0, 1)`: `db = W v̂` is a fresh Ẑ of variance 1 (no Ż: v̂ is initial),
/// `da = step(a) db`, `dh1 = Wᵀ da = Ẑ^{Wᵀ da} + ½ v̂` (Ż through step(a)·, E = ½; the
/// term through δ(a)·db is odd in v̂, zero). Then (lr mult² n = 1 for W and v,
/// lr mult² ⟨x, x'⟩ = c for U):
///
/// ```text
///   readout v:        E[h2 h2']           = K + c/4
///   W forward (W h1): E[da da'] E[h1 h1'] = J c
///   W transposed:     E[b b'] E[dh2 dh2'] = K
///   U:                E[dh1 dh1'] c       = (J + 1/4) c
///   Θ = 2K + c/2 + 2 J c
/// ```
fn relu_tied_ntk(pts: &[Vec<f64>]) -> DMatrix<f64> {
    let p = pts.len();
    let c = DMatrix::from_fn(p, p, |i, j| {
        0.5 * pts[i].iter().zip(&pts[j]).map(|(a, b)| a * b).sum::<f64>()
    });
    DMatrix::from_fn(p, p, |i, j| {
        let s = (c[(i, i)] * c[(j, j)]).sqrt();
        let cos = (c[(i, j)] / s).clamp(-1.0, 1.0);
        let t = cos.acos();
        let pi = std::f64::consts::PI;
        let k = s / (2.0 * pi) * (t.sin() + (pi - t) * cos);
        let jj = (pi - t) / (2.0 * pi);
        2.0 * k + c[(i, j)] / 2.0 + 2.0 * jj * c[(i, j)]
    })
}

#[test]
fn relu_tied_ntk_matches_a_closed_form() {
    let pts = points();
    let r = tpc::limit::limit(&compile(&relu_tied()), &pts).unwrap();
    let ntk = r.ntk.as_ref().unwrap_or_else(|| panic!("{:?}", r.ntk_note));
    let want = relu_tied_ntk(&pts);
    let tol = r.max_error + 1e-12;
    for i in 0..pts.len() {
        for j in 0..pts.len() {
            let (got, w) = (ntk[(i, j)], want[(i, j)]);
            assert!(
                (got - w).abs() <= tol,
                "ntk[{i}][{j}]: limit {got}, by hand {w}, |Δ| = {:.1e} > {tol:.1e}",
                (got - w).abs()
            );
        }
    }
    // The backward Ż term (U's part c/4 at p1, c = 0.625) is far above the tolerance:
    // gradient independence would fail this test.
    assert!(0.25 * 0.625 > 1e6 * tol, "tolerance {tol:.1e}");
}

/// Every NTK and NNGP entry of a finite run within 3 standard errors (plus the limit's
/// stated error) of the limit; returns the largest |z|.
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
    for (what, lim_m, est) in [
        ("ntk", lim.ntk.as_ref().unwrap(), &run.ntk),
        ("nngp", lim.nngp.as_ref().unwrap(), &run.nngp),
    ] {
        let se = est.se.as_ref().unwrap();
        for i in 0..lim_m.nrows() {
            for j in 0..lim_m.ncols() {
                let (fin, se, l) = (est.mean[(i, j)], se[(i, j)], lim_m[(i, j)]);
                let z = (fin - l).abs() / se;
                worst = worst.max(z);
                assert!(
                    (fin - l).abs() <= 3.0 * se + lim.max_error,
                    "{what}[{i}][{j}] ({engine:?}, N = {width}, K = {seeds}): finite {fin} ± {se}, \
                     limit {l}, z = {z:.2}"
                );
            }
        }
    }
    worst
}

fn programs() -> Vec<String> {
    vec![tanh_tied(), relu_tied(), three_uses()]
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

/// The issue's criterion with the dense engine.
#[test]
#[ignore]
fn dense_engine_at_4096_matches_the_limit() {
    for src in programs() {
        let z = finite_agrees(&src, Engine::Dense, 4096, 64);
        eprintln!("max |z| = {z:.2}");
    }
}

#[test]
fn derivation_shows_the_backward_zdot_terms() {
    let mut text = String::new();
    for src in [relu_tied(), three_uses()] {
        let prog = compile(&src);
        let der = tpc::limit::derivation(&prog).unwrap();
        text.push_str(&tpc::limit::derivation_text(&prog, &der));
        text.push('\n');
    }
    insta::assert_snapshot!("derivation", text);
}
