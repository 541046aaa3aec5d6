//! `tpc compare` on Netsor+ programs (issue 14.4). Where the kernel limit refuses a
//! program (E0030), the observes (moments of one point) get their limits from the
//! particle engine (`tpc::limit::observe_particles`), with a stated Monte Carlo error,
//! and NNGP and NTK are left out with the reason; `layernorm_mlp.tp` now has its kernel
//! limit (`src/limit/netsor.rs`), so compare reports all three.
//!
//! Checked: the particle observe limit against the exact limit where the kernel engine
//! computes one (a tanh MLP's second moments: within 4 standard errors), and
//! `layernorm_mlp.tp`'s observed variance converging at slope −1/2 within 3 fitted SE,
//! every finite mean within 4 combined SE of the limit.

use crate::common;

use serde_json::Value;
use tpc::limit::observe_particles::observe_limit;
use tpc::limit::particle::ParticleConfig;

/// An MLP the kernel engine covers, with observes.
const OBSERVED: &str = "\
width n
input x : 2
parameterization mup
param U : n x 2
param W : n x n
param v : 1 x n
h1 = tanh(U @ x)
h2 = W @ h1
observe m2 = mean(h2 * h2)
observe m4 = mean(h1 * h1 * h2 * h2)
output f = v @ relu(h2)
";

#[test]
fn particle_observes_match_the_exact_limit() {
    let prog = tpc::compile(OBSERVED).unwrap();
    let points = vec![vec![1.0, 0.0], vec![0.6, -1.2]];
    let exact = tpc::limit::limit(&prog, &points).unwrap();
    let cfg = ParticleConfig {
        particles: 1 << 18,
        replicas: 16,
        seed: 3,
        ..Default::default()
    };
    let est = observe_limit(&prog, &points, &cfg, "test").unwrap();
    assert!(est.nngp.is_none() && est.ntk.is_none());
    assert_eq!(est.nngp_note.as_deref(), Some("not computed: test"));
    let se = est.max_error / 3.0;
    assert!(se > 0.0 && se < 0.01, "{se}");
    for ((name, want), (_, got)) in exact.observe.iter().zip(&est.observe) {
        for (p, g) in got.iter().enumerate() {
            let w = if want.len() == 1 { want[0] } else { want[p] };
            assert!(
                (g - w).abs() <= 4.0 * se,
                "{name} at point {p}: particles {g} vs exact {w} (SE {se})"
            );
        }
    }
}

#[test]
fn layernorm_observe_converges_at_n_to_the_minus_half() {
    let file = common::example_path("layernorm_mlp");
    let out = common::tpc_ok(
        &[
            "compare",
            file.to_str().unwrap(),
            "--widths",
            "128,512,2048",
            "--seeds",
            "32",
            "--format",
            "json",
            "--no-svg",
        ],
        None,
    );
    let v: Value = serde_json::from_slice(&out).unwrap();
    let groups = v["groups"].as_array().unwrap();
    let quantities: Vec<&str> = groups
        .iter()
        .map(|g| g["quantity"].as_str().unwrap())
        .collect();
    assert_eq!(quantities, ["nngp", "ntk", "observe"], "{v}");
    let g = &groups[2];
    let lim_se = v["limit_max_error"].as_f64().unwrap() / 3.0;
    for r in g["rows"].as_array().unwrap() {
        let err = r["mean_err_max"].as_f64().unwrap();
        let se = (r["se_max"].as_f64().unwrap().powi(2) + lim_se.powi(2)).sqrt();
        assert!(err <= 4.0 * se, "width {}: {err} vs SE {se}", r["width"]);
    }
    let slope = g["fit"]["slope"].as_f64().unwrap();
    let se = g["fit"]["se"].as_f64().unwrap();
    assert!(se < 0.15, "{se}");
    assert!((slope + 0.5).abs() <= 3.0 * se, "slope {slope} ± {se}");
}
