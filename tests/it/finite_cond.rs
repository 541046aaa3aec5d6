//! The conditional engine (`tpc run --engine conditional`, issue 7) against the dense
//! one: the two draw hidden-matrix products from the same law, so every estimate
//! agrees within 4 combined standard errors (√(se_dense² + se_cond²)); a width-10^5
//! RNN runs in seconds; runs are deterministic.

use crate::common;

use std::time::Instant;

use nalgebra::DMatrix;
use tpc::finite::cond::CondMatrix;
use tpc::finite::exec::{run_engine, run_one_conditional, Engine, Estimate, RunConfig};
use tpc::finite::sample::StreamKey;
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

/// The largest |mean_a − mean_b| / √(se_a² + se_b²) over entries.
fn max_z(a: &Estimate, b: &Estimate) -> f64 {
    let (sa, sb) = (a.se.as_ref().unwrap(), b.se.as_ref().unwrap());
    let mut worst: f64 = 0.0;
    for i in 0..a.mean.len() {
        let se = sa[i].hypot(sb[i]);
        let d = (a.mean[i] - b.mean[i]).abs();
        let z = if se > 0.0 {
            d / se
        } else if d < 1e-12 {
            0.0
        } else {
            f64::INFINITY
        };
        worst = worst.max(z);
    }
    worst
}

fn both(
    prog: &Program,
    pts: &[Vec<f64>],
    cfg: &RunConfig,
) -> (tpc::finite::exec::RunResult, tpc::finite::exec::RunResult) {
    let d = run_engine(prog, pts, cfg, Engine::Dense, &|| {}).unwrap();
    let c = run_engine(prog, pts, cfg, Engine::Conditional, &|| {}).unwrap();
    (d, c)
}

#[test]
fn cond_matrix_is_consistent_with_its_history() {
    let n = 50;
    let mut m = CondMatrix::new(n, 0.3, StreamKey::new(1, 2, 3));
    let z = DMatrix::from_fn(n, 3, |i, j| (((i + 1) * (j + 2)) as f64 * 0.37).sin());
    let y = DMatrix::from_fn(n, 2, |i, j| ((i * 5 + j) as f64).cos());
    let mz = m.apply(&z);
    let mty = m.apply_t(&y);
    // ⟨y, M z⟩ = ⟨Mᵀ y, z⟩: the transposed products are drawn given the direct ones.
    let lhs = y.transpose() * &mz;
    let rhs = mty.transpose() * &z;
    assert!((&lhs - &rhs).amax() < 1e-10, "{lhs} vs {rhs}");
    // A vector in the span seen is determined: M (z0 + 2 z1) = M z0 + 2 M z1.
    let comb = z.column(0) + z.column(1) * 2.0;
    let again = m.apply(&DMatrix::from_column_slice(n, 1, comb.as_slice()));
    let want = mz.column(0) + mz.column(1) * 2.0;
    assert!((again.column(0) - want).amax() < 1e-10);
    assert_eq!(m.rank(), (3, 2));
}

#[test]
fn conditional_agrees_in_law_on_forward_and_transposed_products() {
    let prog = compile(
        "\
width n
param W : n x n { std = 1.1 }
param v : n ~ N(0, 1)
x = W @ v
y = W.T @ x
z = W @ tanh(y)
observe a = mean(x * x)
observe b = mean(y * y)
observe c = mean(v * y)
observe d = mean(x * x * x * x)
observe e = mean(z * x)
observe g = mean(z * tanh(y))
",
    );
    let cfg = RunConfig {
        width: 40,
        seeds: 3000,
        seed: 11,
    };
    let (d, c) = both(&prog, &[], &cfg);
    for ((name, ed), (_, ec)) in d.observe.iter().zip(&c.observe) {
        let z = max_z(ed, ec);
        eprintln!("{name}: dense {} cond {} z {z:.2}", ed.mean[0], ec.mean[0]);
        assert!(z < 4.0, "{name}: z = {z}");
    }
}

#[test]
fn semicircle_moments_agree_between_engines() {
    let prog = compile(&common::example("semicircle"));
    let cfg = RunConfig {
        width: 256,
        seeds: 600,
        seed: 3,
    };
    let (d, c) = both(&prog, &[], &cfg);
    for ((name, ed), (_, ec)) in d.observe.iter().zip(&c.observe) {
        let z = max_z(ed, ec);
        eprintln!("{name}: dense {} cond {} z {z:.2}", ed.mean[0], ec.mean[0]);
        assert!(z < 4.0, "{name}: z = {z}");
    }
}

/// Every reported estimate (outputs, NNGP, NTK, each observe) of the two engines
/// within 4 combined SE; returns the worst z.
fn all_agree(name: &str, prog: &Program, pts: &[Vec<f64>], width: usize, seeds: usize) -> f64 {
    let cfg = RunConfig {
        width,
        seeds,
        seed: 21,
    };
    let t = Instant::now();
    let d = run_engine(prog, pts, &cfg, Engine::Dense, &|| {}).unwrap();
    let td = t.elapsed();
    let t = Instant::now();
    let c = run_engine(prog, pts, &cfg, Engine::Conditional, &|| {}).unwrap();
    let tc = t.elapsed();
    let mut worst: f64 = 0.0;
    let mut pairs = vec![("f", &d.f, &c.f), ("nngp", &d.nngp, &c.nngp)];
    pairs.push(("ntk", &d.ntk, &c.ntk));
    for ((n, ed), (_, ec)) in d.observe.iter().zip(&c.observe) {
        pairs.push((n.as_str(), ed, ec));
    }
    for (what, ed, ec) in pairs {
        let z = max_z(ed, ec);
        assert!(z < 4.0, "{name} {what} at width {width}: max z = {z}");
        worst = worst.max(z);
    }
    eprintln!(
        "{name} width {width}, {seeds} draws: dense {td:.2?}, conditional {tc:.2?}, max z {worst:.2}"
    );
    worst
}

fn mlp3_points(prog: &Program) -> Vec<Vec<f64>> {
    points(prog, &common::refs_dir().join("programs/X1.csv"))
}

#[test]
fn mlp3_estimates_agree_between_engines() {
    let prog = compile(&common::example("mlp3"));
    all_agree("mlp3", &prog, &mlp3_points(&prog), 1024, 200);
}

#[test]
fn rnn_estimates_agree_between_engines() {
    let prog = compile(&common::example("rnn"));
    let pts = points(&prog, &manifest().join("examples/rnn_points.csv"));
    all_agree("rnn", &prog, &pts, 1024, 200);
}

#[test]
fn semicircle_estimates_agree_between_engines_at_1024() {
    let prog = compile(&common::example("semicircle"));
    all_agree("semicircle", &prog, &[], 1024, 200);
}

/// The same at width 4096 (a dense draw samples 16 M entries per matrix): minutes, so
/// run by hand with `cargo test --release --test it finite_cond:: -- --ignored`.
#[test]
#[ignore]
fn estimates_agree_between_engines_at_4096() {
    let mlp = compile(&common::example("mlp3"));
    all_agree("mlp3", &mlp, &mlp3_points(&mlp), 4096, 100);
    let rnn = compile(&common::example("rnn"));
    let pts = points(&rnn, &manifest().join("examples/rnn_points.csv"));
    all_agree("rnn", &rnn, &pts, 4096, 100);
    let semi = compile(&common::example("semicircle"));
    all_agree("semicircle", &semi, &[], 4096, 100);
}

/// The conditional engine's NTK against the infinite-width one at a width no dense
/// draw reaches cheaply: within 4 SE (plus the O(1/N) bias, far below it here).
#[test]
fn conditional_ntk_agrees_with_the_limit() {
    for (name, width, seeds) in [("mlp3", 20_000, 32), ("rnn", 20_000, 32)] {
        let prog = compile(&common::example(name));
        let pts = if name == "rnn" {
            points(&prog, &manifest().join("examples/rnn_points.csv"))
        } else {
            mlp3_points(&prog)
        };
        let cfg = RunConfig {
            width,
            seeds,
            seed: 5,
        };
        let fin = run_engine(&prog, &pts, &cfg, Engine::Conditional, &|| {}).unwrap();
        let lim = tpc::limit::limit(&prog, &pts).unwrap();
        let mut worst: f64 = 0.0;
        for (what, est, l) in [("nngp", &fin.nngp, &lim.nngp), ("ntk", &fin.ntk, &lim.ntk)] {
            let l = l.as_ref().expect("a limit kernel");
            let se = est.se.as_ref().unwrap();
            for i in 0..l.len() {
                let (f, lv, s) = (est.mean[i], l[i], se[i]);
                assert!(
                    (f - lv).abs() <= 4.0 * s + 1e-9 * (1.0 + lv.abs()),
                    "{name} {what}[{i}]: finite {f} ± {s}, limit {lv}"
                );
                if s > 0.0 {
                    worst = worst.max((f - lv).abs() / s);
                }
            }
        }
        eprintln!("{name} conditional width {width}, {seeds} draws: max |finite - limit| / SE = {worst:.2}");
    }
}

#[test]
fn wide_rnn_runs_quickly() {
    let prog = compile(&common::example("rnn"));
    let pts = points(&prog, &manifest().join("examples/rnn_points.csv"));
    let cfg = RunConfig {
        width: 100_000,
        seeds: 2,
        seed: 0,
    };
    let t = Instant::now();
    let r = run_engine(&prog, &pts, &cfg, Engine::Conditional, &|| {}).unwrap();
    let secs = t.elapsed().as_secs_f64();
    eprintln!("width 1e5, 2 draws: {secs:.2}s");
    assert!(r.nngp.mean.iter().all(|x| x.is_finite()));
    // A dense draw would need 80 GB for W alone.
    assert!(secs < 60.0, "{secs}s");
}

#[test]
fn conditional_draws_are_deterministic() {
    let prog = compile(&common::example("rnn"));
    let pts = points(&prog, &manifest().join("examples/rnn_points.csv"));
    let a = run_one_conditional(&prog, &pts, 300, 7, 2).unwrap();
    let b = run_one_conditional(&prog, &pts, 300, 7, 2).unwrap();
    assert_eq!(a.f, b.f);
    assert_eq!(a.nngp, b.nngp);
    let c = run_one_conditional(&prog, &pts, 300, 7, 3).unwrap();
    assert_ne!(a.f, c.f);
    // Draw k inside a run is run_one_conditional's draw k: mean of 3 minus 2 is the third.
    let cfg = RunConfig {
        width: 300,
        seeds: 3,
        seed: 7,
    };
    let all = run_engine(&prog, &pts, &cfg, Engine::Conditional, &|| {}).unwrap();
    let d0 = run_one_conditional(&prog, &pts, 300, 7, 0).unwrap();
    let d1 = run_one_conditional(&prog, &pts, 300, 7, 1).unwrap();
    assert!((&all.f.mean * 3.0 - &d0.f - &d1.f - &a.f).amax() < 1e-12);
    // And the CLI gives byte-identical JSON with 1 and 2 threads.
    let rnn = common::example_path("rnn");
    let p = manifest().join("examples/rnn_points.csv");
    let (rnn, p) = (rnn.to_str().unwrap(), p.to_str().unwrap());
    let args = [
        "run",
        rnn,
        "--engine",
        "conditional",
        "--width",
        "300",
        "--seeds",
        "5",
        "--inputs",
        p,
        "--format",
        "json",
    ];
    let run = |threads: &str| common::tpc_ok(&args, Some(threads));
    assert_eq!(run("1"), run("2"));
}

/// The two-sample Kolmogorov–Smirnov statistic D = sup |F_a − F_b| (ties handled by
/// stepping over every copy of a value before comparing).
fn ks_statistic(a: &[f64], b: &[f64]) -> f64 {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0, 0, 0.0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / na - j as f64 / nb).abs());
    }
    d
}

/// P(K > λ) for the Kolmogorov distribution: 2 Σ_{j≥1} (−1)^(j−1) e^(−2 j² λ²).
fn kolmogorov_sf(lambda: f64) -> f64 {
    if lambda < 0.2 {
        return 1.0; // the series converges slowly here and the value is 1 to 1e-9
    }
    let mut s = 0.0;
    for j in 1..=100 {
        let jf = j as f64;
        let term = (-2.0 * jf * jf * lambda * lambda).exp();
        s += if j % 2 == 1 { term } else { -term };
        if term < 1e-17 {
            break;
        }
    }
    (2.0 * s).clamp(0.0, 1.0)
}

/// The asymptotic p-value of a two-sample KS statistic `d` for sample sizes `n` and
/// `m`, with Stephens' small-sample correction (√n_e + 0.12 + 0.11/√n_e) D.
fn ks_p_value(d: f64, n: usize, m: usize) -> f64 {
    let ne = (n * m) as f64 / (n + m) as f64;
    let r = ne.sqrt();
    kolmogorov_sf((r + 0.12 + 0.11 / r) * d)
}

#[test]
fn ks_p_value_matches_known_values() {
    // The Kolmogorov distribution's tabulated upper quantiles.
    for (lambda, p) in [
        (1.2238, 0.10),
        (1.3581, 0.05),
        (1.6276, 0.01),
        (1.9495, 0.001),
    ] {
        let got = kolmogorov_sf(lambda);
        assert!(
            (got - p).abs() < 2e-4 * (1.0 + 10.0 * p),
            "Q({lambda}) = {got}, want {p}"
        );
    }
    assert_eq!(kolmogorov_sf(0.0), 1.0);
    assert!(kolmogorov_sf(5.0) < 1e-20);
    // D by hand: after 3 (three of a, one of b) |1 − 1/4| = 3/4.
    let d = ks_statistic(&[1.0, 2.0, 3.0], &[2.5, 4.0, 5.0, 6.0]);
    assert!((d - 0.75).abs() < 1e-15, "{d}");
    // Ties across samples step together: identical samples give D = 0.
    assert_eq!(ks_statistic(&[1.0, 1.0, 2.0], &[2.0, 1.0, 1.0]), 0.0);
    // Two normal samples: one law passes, a shift of 0.2 sd with 3000 each fails.
    let normals = |col: u64, shift: f64| {
        let mut g = vec![0.0; 3000];
        tpc::finite::sample::fill_normal_seq(
            &mut g,
            3000,
            1.0,
            StreamKey::new(9, 0, 0).with_column(col),
        )
        .unwrap();
        g.iter().map(|x| x + shift).collect::<Vec<f64>>()
    };
    let (a, b, c) = (normals(0, 0.0), normals(1, 0.0), normals(2, 0.2));
    let p_same = ks_p_value(ks_statistic(&a, &b), 3000, 3000);
    let p_shift = ks_p_value(ks_statistic(&a, &c), 3000, 3000);
    eprintln!("same law p = {p_same:.3}, shifted p = {p_shift:.2e}");
    assert!(p_same > 0.01 && p_shift < 1e-6);
}

/// Exact in law means every per-draw quantity has the same distribution under both
/// engines, not only the same mean: a two-sample KS test per quantity (independent
/// seeds, so the samples are independent) must not reject at the 1% family-wise
/// level (Bonferroni: each at 1%/m). A program with W, Wᵀ and tanh, one point.
#[test]
fn per_draw_values_have_the_same_law_under_both_engines() {
    let prog = compile(
        "\
width n
input xi : 1
param U : n x 1 ~ N(0, 1)
param W : n x n ~ N(0, 1) * n^(-1/2)
param v : 1 x n ~ N(0, 1) * n^(-1/2)
h = U @ xi
x = W @ tanh(h)
y = W.T @ tanh(x)
output f = v @ tanh(y)
observe a = mean(x * y)
observe b = mean(y * y)
observe c = mean(tanh(x) * h)
",
    );
    let pts = vec![vec![0.8]];
    let (n, draws) = (48, 3000);
    // Per draw: f, NNGP, NTK, then the observes.
    let values = |d: &tpc::finite::exec::Draw| {
        let mut v = vec![d.f[0], d.nngp[0], d.ntk[0]];
        v.extend(d.observe.iter().map(|o| o[0]));
        v
    };
    let dense: Vec<Vec<f64>> = (0..draws)
        .map(|k| values(&tpc::finite::exec::run_one(&prog, &pts, n, 1, k).unwrap()))
        .collect();
    let cond: Vec<Vec<f64>> = (0..draws)
        .map(|k| values(&run_one_conditional(&prog, &pts, n, 2, k).unwrap()))
        .collect();
    let names = ["f", "nngp", "ntk", "a", "b", "c"];
    let m = names.len();
    for (q, name) in names.iter().enumerate() {
        let a: Vec<f64> = dense.iter().map(|v| v[q]).collect();
        let b: Vec<f64> = cond.iter().map(|v| v[q]).collect();
        let d = ks_statistic(&a, &b);
        let p = ks_p_value(d, draws, draws);
        eprintln!("{name}: D = {d:.4}, p = {p:.3}");
        assert!(p > 0.01 / m as f64, "{name}: KS rejects, D = {d}, p = {p}");
    }
}

/// The conditional engine's memory estimate counts the width-N vectors of a draw at a
/// small probe width and scales them by N (`Footprint`): that count must not depend on
/// the probe width once it exceeds every history's rank, and must stay below the
/// a-priori bound that counts every possible history column and cotangent (for
/// programs without `train`, which that bound does not model).
#[test]
fn footprint_count_does_not_depend_on_the_probe_width() {
    use tpc::finite::exec::{conditional_vectors, engine_bytes, Footprint};
    for name in ["rnn", "semicircle", "sgd_mlp", "mlp3"] {
        let prog = compile(&common::example(name));
        let pts = match name {
            "rnn" => points(&prog, &manifest().join("examples/rnn_points.csv")),
            "mlp3" => mlp3_points(&prog),
            _ => Vec::new(),
        };
        let counts: Vec<u128> = [300, 601, 1500]
            .iter()
            .map(|&n0| conditional_vectors(&prog, &pts, n0).unwrap())
            .collect();
        assert!(
            counts.windows(2).all(|w| w[0] == w[1]),
            "{name}: {counts:?}"
        );
        let fp = Footprint::new(&prog, &pts, 10_000_000, Engine::Conditional);
        let (n0, v) = fp.measured().expect("a probe at a large width");
        assert_eq!(v, counts[0], "{name}: probe at {n0}");
        let n = 10_000_000usize;
        if prog.train.is_some() {
            // The a-priori bound knows nothing of the unrolled training program.
            continue;
        }
        let bound = engine_bytes(&prog, n, pts.len().max(1), Engine::Conditional);
        assert!(
            fp.bytes(n) <= bound && fp.bytes(n) > 0,
            "{name}: {} vs {bound}",
            fp.bytes(n)
        );
    }
}
