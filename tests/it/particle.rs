//! The particle engine (`tpc::limit::particle`) against exact limits: the semicircle
//! law (Ż through shared W and W.T), a W / W.T / tanh program the block engine
//! integrates exactly, a Dirac delta that only Stein's lemma sees, and determinism.

use crate::common;

use tpc::ir::{NodeId, Program};
use tpc::limit::particle::{particles, ParticleConfig, ParticleEstimate};

fn run(prog: &Program, m: usize, seed: u64) -> ParticleEstimate {
    let cfg = ParticleConfig {
        particles: m,
        replicas: 16,
        seed,
        ..Default::default()
    };
    particles(prog, &[], &prog.observes, &cfg).unwrap()
}

/// Every estimate within 4 standard errors (plus the exact side's stated error).
fn assert_agrees(what: &str, est: &ParticleEstimate, want: &[f64], slack: f64) {
    for (i, &w) in want.iter().enumerate() {
        let (m, se) = (est.mean[i], est.se[i]);
        println!("{what}[{i}]: {m} ± {se} (exact {w})");
        assert!(
            (m - w).abs() <= 4.0 * se + slack,
            "{what}[{i}]: particles {m} ± {se}, exact {w}"
        );
    }
}

#[test]
fn semicircle_moments_are_catalan_numbers() {
    let prog = tpc::compile(&common::example("semicircle")).unwrap();
    let est = run(&prog, 1 << 16, 1);
    assert_agrees("m", &est, &[0.0, 1.0, 0.0, 2.0, 0.0, 5.0, 0.0, 14.0], 1e-9);
    // The standard errors are honest, not zero: Ẑ is sampled.
    assert!(est.se[7] > 0.0 && est.se[7] < 0.5, "se {:?}", est.se);
}

const W_WT_TANH: &str = "width n
param W : n x n ~ N(0, 2/n)
param v : n ~ N(0, 1)
x = W @ v
u = W.T @ x
h = tanh(u)
g = W @ tanh(v)
k = W.T @ g
observe a = mean(h * v)
observe b = mean(h * h)
observe c = mean(tanh(k) * h)
observe d = mean(k * v)
";

#[test]
fn w_wt_tanh_matches_the_block_engine() {
    let prog = tpc::compile(W_WT_TANH).unwrap();
    let exact = tpc::limit::limit(&prog, &[]).unwrap();
    let want: Vec<f64> = exact.observe.iter().map(|(_, v)| v[0]).collect();
    let est = run(&prog, 1 << 17, 2);
    assert_agrees("observe", &est, &want, exact.max_error);
}

#[test]
fn stein_sees_the_dirac_delta_of_a_step() {
    // Z^u = Ẑ^{W.T step(x)} + Z^v E[δ(Z^x)], Z^x ~ N(0, 1): E[Z^u Z^v] = 1/√(2π).
    // Forward-mode derivatives of step are 0 and would give 0.
    let prog = tpc::compile(
        "width n
param W : n x n ~ N(0, 1/n)
param v : n ~ N(0, 1)
x = W @ v
u = W.T @ step(x)
observe a = mean(u * v)
",
    )
    .unwrap();
    let est = run(&prog, 1 << 17, 3);
    let want = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
    assert_agrees("a", &est, &[want], 0.0);
    assert!(est.se[0] < 0.02, "se {}", est.se[0]);
}

#[test]
fn same_seed_same_bytes_whatever_the_threads() {
    let prog = tpc::compile(W_WT_TANH).unwrap();
    let bits = |e: &ParticleEstimate| -> Vec<u64> {
        e.mean.iter().chain(&e.se).map(|x| x.to_bits()).collect()
    };
    let a = run(&prog, 1 << 12, 7);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| run(&prog, 1 << 12, 7));
    assert_eq!(bits(&a), bits(&one));
    assert_ne!(bits(&a), bits(&run(&prog, 1 << 12, 8)));
}

#[test]
fn refuses_what_is_not_a_particle_quantity() {
    let prog = tpc::compile(&common::example("mlp3")).unwrap();
    let out: Vec<NodeId> = prog.outputs.clone();
    let e = particles(
        &prog,
        &[1.0, 0.0, 0.0, 0.0],
        &out,
        &ParticleConfig::default(),
    )
    .unwrap_err();
    assert!(e.contains("not a scalar") || e.contains("random"), "{e}");
}

#[test]
fn derivation_of_semicircle() {
    let prog = tpc::compile(&common::example("semicircle")).unwrap();
    insta::assert_snapshot!(tpc::limit::particle::derivation_text(&prog));
}

#[test]
fn derivation_of_unrolled_sgd_mlp() {
    let prog = tpc::compile(&common::example("sgd_mlp")).unwrap();
    let u = tpc::autodiff::unroll(&prog, &[], tpc::autodiff::Width::Limit).unwrap();
    insta::assert_snapshot!(tpc::limit::particle::derivation_text(&u.prog));
}

#[test]
fn dependent_arguments_give_a_singular_family() {
    // W (2v) is exactly 2·W v: the family's Gram is singular, the conditional variance 0.
    let prog = tpc::compile(
        "width n
param W : n x n ~ N(0, 1/n)
param v : n ~ N(0, 1)
a = W @ v
b = W @ (2 * v)
observe d = mean((b - 2 * a)^2)
observe e = mean(b * b)
",
    )
    .unwrap();
    let est = run(&prog, 1 << 12, 4);
    assert!(est.mean[0].abs() < 1e-12, "{:?}", est.mean);
    assert!(
        (est.mean[1] - 4.0).abs() < 4.0 * est.se[1] + 1e-9,
        "{:?}",
        est
    );
}

/// `tpc limit --unrolled` prints the unrolled training program's Z derivation, Ż terms
/// included, after the forward one; the trajectory's method names the particle engine.
#[test]
fn cli_prints_the_unrolled_derivation() {
    let file = common::example_path("sgd_mlp");
    let out = common::tpc_ok(
        &[
            "limit",
            "--unrolled",
            "--particles",
            "4096",
            file.to_str().unwrap(),
        ],
        None,
    );
    let text = String::from_utf8(out).unwrap();
    let at = text
        .find("# Z derivation of the unrolled training program")
        .expect("the unrolled derivation");
    let unrolled = &text[at..];
    assert!(unrolled.contains(
        "Z^dh1_0(ξ1) = Ẑ^{Wᵀ (step(W h1_0(ξ1)) * dh2_0(ξ1))} \
         + Z^h1_0(ξ1)·E[∂Z^{step(W h1_0(ξ1)) * dh2_0(ξ1)}/∂Ẑ^{W h1_0(ξ1)}]"
    ));
    assert!(unrolled.contains("f_3(ξ3) = "));
    assert!(text.contains("particle engine: 4096 particles"));
}
