//! Adam's infinite-width limit (issue 15; `tpc::limit::outer`): the unrolled program
//! with nonlinear outer products, by particles.
//!
//! * a linear network, one Adam step: `f_1` against the closed form derived below;
//! * `adam_mlp.tp`: the finite-width gap shrinks with N (CI-sized: N = 32, 128, 512);
//!   and, `#[ignore]`d (minutes), the default `tpc limit` against `tpc run` at
//!   N = 1024 … 8192 (K = 32) within 4 combined standard errors at every step and point:
//!   `cargo test --release --test it adam_limit:: -- --ignored`;
//! * a width-independent ε under muP: the input and hidden layers are frozen in the limit.

use crate::common;

use nalgebra::DMatrix;
use tpc::finite::exec::{run, RunConfig};
use tpc::ir::Program;
use tpc::limit::particle::ParticleConfig;
use tpc::limit::train::particle_trajectory;

fn compile(src: &str) -> Program {
    tpc::compile(src).unwrap_or_else(|e| panic!("{e}"))
}

fn example(name: &str) -> Program {
    let src = std::fs::read_to_string(common::example_path(name)).unwrap();
    compile(&src)
}

const LINEAR: &str = "width n
input x : 1
param U : n x 1 ~ N(0, 1)
param W : n x n ~ N(0, 1/n)   lr n^(-1)
param v : 1 x n ~ N(0, 1/n^2) lr n^(-1)
h1 = U @ x
h2 = W @ h1
output f = v @ h2
train {
    loss = mse
    lr = 0.05
    steps = 1
    optimizer = adam(0.9, 0.999, 1e-8 * n^(-1))
    data = [ ([1.0], 1.0) ]
}
";

/// One Adam step on `f = v W U x` (muP's Adam column, x = 1, y = 1, η = 0.05).
/// In scaled variables u = Z^U ~ N(0,1), r = n·v ~ N(0,1), w̃ = Ẑ^{W u} ~ N(0,1),
/// f_0 = 0, χ = −y, s = sign(χ). Adam's first step is the sign of the gradient entry
/// (ε' = 1e-8 against Θ(1) entries): with g = Ẑ^{Wᵀ(χ r)} ~ N(0, χ²),
/// `u_1 = u − η sign(g)`, `r_1 = r − η s sign(w̃)`, and the hidden update acts as
/// `−η s sign(r_α) E_β[sign(u_β) u_1β] = −η s sign(r_α) √(2/π)`. `W_0 u_1` has the
/// Ż term `χ r · E[∂u_1/∂g] = −2η s r/√(2π)` (sign' = 2δ) and a Gaussian part with
/// `Cov(·, w̃) = 1`. Hence
/// `f_1 = E[r_1 h2_1] = −s η (2√(2/π) + 2/π)`.
#[test]
fn linear_network_one_adam_step_matches_the_closed_form() {
    let prog = compile(LINEAR);
    let cfg = ParticleConfig {
        particles: 1 << 18,
        replicas: 16,
        seed: 5,
        outer_samples: 256,
    };
    let (f, se, _) = particle_trajectory(&prog, &[vec![1.0]], &cfg).unwrap();
    let pi = std::f64::consts::PI;
    let want = 0.05 * (2.0 * (2.0 / pi).sqrt() + 2.0 / pi);
    for (t, w) in [(0, 0.0), (1, want)] {
        let dev = (f[(t, 0)] - w).abs() / se[(t, 0)];
        assert!(
            dev < 4.0,
            "f_{t} = {} ± {} vs {w} ({dev:.2} SE)",
            f[(t, 0)],
            se[(t, 0)]
        );
    }
    // The standard error is small enough for the test to fail on a wrong Ż (it is
    // −2η s/√(2π) ≈ 0.04 of f_1) or a wrong outer product (0.032).
    assert!(se[(1, 0)] < 0.005, "{}", se[(1, 0)]);
}

/// Mean over seeds and the draws' standard deviation of f_t at width N.
fn finite(prog: &Program, width: usize, seeds: usize) -> (DMatrix<f64>, DMatrix<f64>) {
    let cfg = RunConfig {
        width,
        seeds,
        seed: 11,
    };
    let r = run(prog, &[], &cfg, &|| {}).unwrap();
    let t = r.train.unwrap().f_t;
    let se = t.se.unwrap();
    (t.mean, se)
}

/// Root mean square over steps and points of a draw's distance to the limit,
/// `√(bias² + sd²)` (sd = se·√K).
fn rms_gap(mean: &DMatrix<f64>, se: &DMatrix<f64>, lim: &DMatrix<f64>, seeds: usize) -> f64 {
    let k = seeds as f64;
    let mut s = 0.0;
    for i in 0..lim.len() {
        s += (mean[i] - lim[i]).powi(2) + se[i].powi(2) * k;
    }
    (s / lim.len() as f64).sqrt()
}

/// The finite-width gap of adam_mlp.tp shrinks like N^(-1/2) (a draw's f_t fluctuates
/// around the limit by Θ(N^(-1/2)) in muP): from N = 32 to 512 it falls by about 4;
/// the test asks for more than 2 at every factor 16, and the N = 512 mean within 4
/// combined standard errors of the limit.
#[test]
fn adam_mlp_finite_width_gap_shrinks() {
    let prog = example("adam_mlp");
    let cfg = ParticleConfig {
        particles: 1 << 16,
        replicas: 16,
        seed: 2,
        outer_samples: 256,
    };
    let (lim, lse, _) = particle_trajectory(&prog, &[], &cfg).unwrap();
    let seeds = 16;
    let mut gaps = Vec::new();
    for n in [32, 128, 512] {
        let (m, se) = finite(&prog, n, seeds);
        gaps.push(rms_gap(&m, &se, &lim, seeds));
        if n == 512 {
            for i in 0..lim.len() {
                let z = (m[i] - lim[i]).abs() / (se[i].powi(2) + lse[i].powi(2)).sqrt();
                assert!(z < 4.0, "entry {i}: {} vs {} ({z:.2} SE)", m[i], lim[i]);
            }
        }
    }
    assert!(
        gaps[0] > 2.0 * gaps[2] && gaps[0] > gaps[1] && gaps[1] > gaps[2],
        "{gaps:?}"
    );
}

/// Done-when of issue 15: the default `tpc limit` (2^20 particles) against dense
/// training at N = 1024 … 8192, K = 32, within 4 combined SE at every step and point,
/// and f_t_se ≤ 0.002.
#[test]
#[ignore = "minutes: dense Adam at N = 8192"]
fn adam_mlp_limit_agrees_with_finite_width_up_to_8192() {
    let prog = example("adam_mlp");
    let (lim, lse, _) = particle_trajectory(&prog, &[], &ParticleConfig::default()).unwrap();
    assert!(lse.iter().all(|&s| s <= 0.002), "{lse}");
    for n in [1024, 2048, 4096, 8192] {
        let (m, se) = finite(&prog, n, 32);
        for i in 0..lim.len() {
            let z = (m[i] - lim[i]).abs() / (se[i].powi(2) + lse[i].powi(2)).sqrt();
            assert!(
                z < 4.0,
                "N = {n}, entry {i}: {} vs {} ({z:.2} SE)",
                m[i],
                lim[i]
            );
        }
    }
}

/// A width-independent ε under muP outgrows the Θ(1/n) gradient entries of the input
/// and hidden layers: in the limit their updates vanish. The trajectory is still
/// computed (only the readout trains) and the note names the frozen parameters.
#[test]
fn a_constant_eps_freezes_the_hidden_layers_in_the_limit() {
    let src = common::example("adam_mlp").replace("1e-8 * n^(-1)", "1e-8");
    let prog = compile(&src);
    let u = tpc::autodiff::unroll(&prog, &[], tpc::autodiff::Width::Limit).unwrap();
    assert_eq!(u.frozen, ["U", "W"]);
    let cfg = ParticleConfig {
        particles: 1 << 14,
        replicas: 16,
        seed: 1,
        outer_samples: 64,
    };
    let (frozen, fse, _) = particle_trajectory(&prog, &[], &cfg).unwrap();
    let (moving, mse, _) = particle_trajectory(&example("adam_mlp"), &[], &cfg).unwrap();
    // After 4 steps the frozen network has moved much less at the first point.
    let (a, b) = (frozen[(4, 0)], moving[(4, 0)]);
    assert!(
        b - a > 4.0 * (fse[(4, 0)].powi(2) + mse[(4, 0)].powi(2)).sqrt(),
        "{a} vs {b}"
    );
}
