//! 1/√n attention logits in the limit (issue 14, `src/limit/random_logits.rs`): random
//! Gaussian scalars G, the output a Gaussian mixture over G, its NNGP `E_G[K(·|G)]`.
//!
//! * the limit against a direct Monte Carlo over G written here, independently of the
//!   engine (the covariance of G and the conditional kernel of this one-layer network by
//!   hand), within the combined 3σ;
//! * the finite-width mean (`tpc run`, K = 32 draws) against the limit within combined
//!   standard errors;
//! * `tpc compare`: each draw against the limit given its own logits, slope −1/2;
//! * the derivation and the no-NTK note on `examples/sp_attention.tp` (snapshot).

use crate::common;

use nalgebra::{DMatrix, DVector};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

/// sp_attention with a standard readout (`v ~ N(0, 1/n)`: the NNGP is Θ(1)) and no
/// `train` block.
const SRC: &str = "width n
const L = 3
input x : 2 [L]
parameterization mup

param E : n x 2
param Q : n x n ~ N(0, 1/n) * n^(1/2) lr n^(-1)
param K : n x n
param V : n x n
param v : 1 x n ~ N(0, 1/n)

for t in 1..=L {
    u[t] = E @ x[t]
    q[t] = Q @ u[t]
    k[t] = K @ u[t]
    w[t] = V @ u[t]
}
for t in 1..=L {
    for s in 1..=L {
        a[t, s] = mean(q[t] * k[s])
    }
    o[t] = u[t] + sum(s in 1..=L, softmax(s in 1..=L, a[t, s]) * w[s])
}
output f = v @ (sum(t in 1..=L, o[t]) / L)
observe m1 = mean(o[1] * o[1])
";

const POINTS: [[f64; 6]; 2] = [
    [1.0, 0.0, 0.0, 1.0, 0.5, -0.5],
    [0.3, 1.0, -1.0, 0.2, 0.8, 0.4],
];

fn files() -> (PathBuf, PathBuf) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let src = dir.join("random_logits_sp.tp");
    std::fs::write(&src, SRC).unwrap();
    let pts = dir.join("random_logits_pts.csv");
    let text: String = POINTS
        .iter()
        .map(|r| r.map(|v| v.to_string()).join(",") + "\n")
        .collect();
    std::fs::write(&pts, text).unwrap();
    (src, pts)
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_slice(&common::tpc_ok(args, None)).unwrap()
}

fn flat(v: &serde_json::Value) -> Vec<f64> {
    match v {
        serde_json::Value::Number(n) => vec![n.as_f64().unwrap()],
        serde_json::Value::Array(a) => a.iter().flat_map(flat).collect(),
        serde_json::Value::Object(o) => o.values().flat_map(flat).collect(),
        _ => Vec::new(),
    }
}

/// The limit by hand, by plain Monte Carlo over G. `C[t][s](p, q) = ½⟨x_t(p), x_s(q)⟩`
/// is `E[Z^{u_t}(p) Z^{u_s}(q)]` (input layer of variance 1/2 per entry, muP), and
/// Q, K, V have `n·Var = 1`, so `Cov(G_ts(p), G_t's'(q)) = C[t][t'](p,q)·C[s][s'](p,q)`.
/// Given G with softmax rows `P_t·(p)`: `o_t = u_t + Σ_s P_ts w_s` (V independent), so
/// `K(p,q|G) = (1/L²) Σ_tt' (C_tt' + Σ_ss' P_ts(p) P_t's'(q) C_ss')(p,q)` (readout
/// `n·Var(v) = 1`) and `m1(p|G) = C_11(p,p) + Σ_ss' P_1s P_1s' C_ss'(p,p)`.
/// Returns the means (K row-major, then m1 per point) and their standard errors.
fn direct_mc(samples: usize) -> (Vec<f64>, Vec<f64>) {
    const L: usize = 3;
    let np = POINTS.len();
    let c = |p: usize, t: usize, q: usize, s: usize| {
        0.5 * (POINTS[p][2 * t] * POINTS[q][2 * s] + POINTS[p][2 * t + 1] * POINTS[q][2 * s + 1])
    };
    let idx: Vec<(usize, usize, usize)> = (0..np)
        .flat_map(|p| (0..L).flat_map(move |t| (0..L).map(move |s| (p, t, s))))
        .collect();
    let d = idx.len();
    let cov = DMatrix::from_fn(d, d, |i, j| {
        let ((p, t, s), (q, t2, s2)) = (idx[i], idx[j]);
        c(p, t, q, t2) * c(p, s, q, s2)
    });
    let eig = nalgebra::SymmetricEigen::new(cov);
    let a = DMatrix::from_fn(d, d, |i, j| {
        eig.eigenvectors[(i, j)] * eig.eigenvalues[j].max(0.0).sqrt()
    });
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(20261130);
    let mut normal = || {
        // Box–Muller.
        let u1 = ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    };
    let ne = np * np + np;
    let (mut sum, mut sq) = (vec![0.0; ne], vec![0.0; ne]);
    for _ in 0..samples {
        let z = DVector::from_fn(d, |_, _| normal());
        let g = &a * z;
        // Softmax rows per point and t.
        let mut pr = vec![[[0.0; L]; L]; np];
        for (p, rows) in pr.iter_mut().enumerate() {
            for (t, row) in rows.iter_mut().enumerate() {
                let gs: Vec<f64> = (0..L).map(|s| g[(p * L + t) * L + s]).collect();
                let mx = gs.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = gs.iter().map(|x| (x - mx).exp()).collect();
                let tot: f64 = e.iter().sum();
                for s in 0..L {
                    row[s] = e[s] / tot;
                }
            }
        }
        let mut vals = Vec::with_capacity(ne);
        for p in 0..np {
            for q in 0..np {
                let mut k = 0.0;
                for t in 0..L {
                    for t2 in 0..L {
                        k += c(p, t, q, t2);
                        for s in 0..L {
                            for s2 in 0..L {
                                k += pr[p][t][s] * pr[q][t2][s2] * c(p, s, q, s2);
                            }
                        }
                    }
                }
                vals.push(k / (L * L) as f64);
            }
        }
        for (p, rows) in pr.iter().enumerate() {
            let mut m = c(p, 0, p, 0);
            for s in 0..L {
                for s2 in 0..L {
                    m += rows[0][s] * rows[0][s2] * c(p, s, p, s2);
                }
            }
            vals.push(m);
        }
        for (i, v) in vals.into_iter().enumerate() {
            sum[i] += v;
            sq[i] += v * v;
        }
    }
    let m = samples as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / m).collect();
    let se = sq
        .iter()
        .zip(&mean)
        .map(|(s, mu)| ((s / m - mu * mu) / (m - 1.0)).sqrt())
        .collect();
    (mean, se)
}

/// The mixture NNGP and observe against the direct Monte Carlo over G: every entry
/// within 3·sqrt(σ_limit² + σ_mc²), σ_limit the limit's QMC standard error (its stated
/// 3σ over 3).
#[test]
fn limit_matches_direct_monte_carlo_over_the_logits() {
    let (src, pts) = files();
    let v = json(&[
        "limit",
        src.to_str().unwrap(),
        "--inputs",
        pts.to_str().unwrap(),
        "--format",
        "json",
    ]);
    let mut lim = flat(&v["nngp"]);
    lim.extend(flat(&v["observe"]));
    let s_lim = v["qmc_3sigma"].as_f64().unwrap() / 3.0;
    assert!(s_lim > 0.0 && s_lim < 1e-3, "{v}");
    assert!(v["ntk"].is_null(), "{v}");
    let (mc, se) = direct_mc(100_000);
    assert_eq!(lim.len(), mc.len());
    for i in 0..mc.len() {
        let tol = 3.0 * (s_lim * s_lim + se[i] * se[i]).sqrt();
        assert!(
            (lim[i] - mc[i]).abs() <= tol,
            "entry {i}: limit {} vs direct MC {} ± {}",
            lim[i],
            mc[i],
            tol
        );
    }
    // The logits' randomness matters: with the logits at their mean (0, uniform
    // attention) the kernel at (p1, p1) differs by more than ten times the stated error.
    let uniform = {
        let c = |p: usize, t: usize, q: usize, s: usize| {
            0.5 * (POINTS[p][2 * t] * POINTS[q][2 * s]
                + POINTS[p][2 * t + 1] * POINTS[q][2 * s + 1])
        };
        let mut k = 0.0;
        for t in 0..3 {
            for t2 in 0..3 {
                k += c(0, t, 0, t2);
                for s in 0..3 {
                    for s2 in 0..3 {
                        k += c(0, s, 0, s2) / 9.0;
                    }
                }
            }
        }
        k / 9.0
    };
    assert!(
        (lim[0] - uniform).abs() > 10.0 * 3.0 * s_lim,
        "{} vs {uniform}",
        lim[0]
    );
}

/// Finite width (K = 32 draws at N = 1024) against the limit: every NNGP and observe
/// entry within 4 combined standard errors.
#[test]
fn finite_width_matches_the_mixture_limit() {
    let (src, pts) = files();
    let (src, pts) = (src.to_str().unwrap(), pts.to_str().unwrap());
    let l = json(&["limit", src, "--inputs", pts, "--format", "json"]);
    let r = json(&[
        "run", src, "--inputs", pts, "--width", "1024", "--seeds", "32", "--format", "json",
    ]);
    let s_lim = l["qmc_3sigma"].as_f64().unwrap() / 3.0;
    for (key, se_key) in [("nngp", "nngp_se"), ("observe", "observe_se")] {
        let (lim, fin, se) = (flat(&l[key]), flat(&r[key]), flat(&r[se_key]));
        assert_eq!(lim.len(), fin.len(), "{key}");
        for i in 0..lim.len() {
            let tol = 4.0 * (se[i] * se[i] + s_lim * s_lim).sqrt();
            assert!(
                (lim[i] - fin[i]).abs() <= tol,
                "{key} {i}: limit {} vs finite {} (4 combined SE {tol})",
                lim[i],
                fin[i]
            );
        }
    }
}

/// `tpc compare`: each draw against the limit given its own logits converges at
/// N^(-1/2); the fitted slope is within 4 of its standard errors of −1/2 (NNGP and
/// observe).
#[test]
fn compare_converges_given_the_draws_logits() {
    let (src, pts) = files();
    let v = json(&[
        "compare",
        src.to_str().unwrap(),
        "--inputs",
        pts.to_str().unwrap(),
        "--widths",
        "128,512,2048",
        "--seeds",
        "16",
        "--no-svg",
        "--format",
        "json",
    ]);
    let groups = v["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 2, "{v}");
    for g in groups {
        let slope = g["fit"]["slope"].as_f64().unwrap();
        let se = g["fit"]["se"].as_f64().unwrap();
        assert!(
            (slope + 0.5).abs() <= 4.0 * se && se < 0.2,
            "{}: slope {slope} ± {se}",
            g["quantity"]
        );
    }
}

/// The derivation (random logits, the mixture), the no-NTK diagnostic and the
/// trajectory's refusal on `examples/sp_attention.tp`: text before the numbers.
#[test]
fn sp_attention_derivation_snapshot() {
    let path = common::example_path("sp_attention");
    let out = String::from_utf8(common::tpc_ok(&["limit", path.to_str().unwrap()], None)).unwrap();
    let mut keep = Vec::new();
    let mut numbers = false;
    for line in out.lines() {
        if line.starts_with("# NNGP") || line.starts_with("# observe") {
            numbers = true;
        } else if line.starts_with("# NTK")
            || line.starts_with("# regime")
            || line.starts_with("# training")
        {
            numbers = false;
        } else if line.starts_with("# methods") {
            break;
        }
        if !numbers {
            keep.push(line);
        }
    }
    insta::assert_snapshot!("sp_attention_limit", keep.join("\n"));
}
