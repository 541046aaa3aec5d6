//! Feature-learning training through moments in the limit (issue 14.5, theory.md §1.1,
//! §6.1–6.3): the particle engine runs the unrolled `train` block of Netsor+ programs,
//! each moment of the unrolled program a particle mean (with the replicas' Monte Carlo
//! standard error), each Nonlin with scalar operands evaluated at those means. Checked
//! against dense finite-width training (the `tpc run` trajectory over K = 32 draws):
//! within 4 combined standard errors at every step and point.
//!
//! CI: `layernorm_mlp.tp` and a one-block attention program
//! (`tests/data/programs/attention_small.tp`: layernorm, 1/n softmax attention, relu MLP,
//! residuals). The full `transformer.tp` is `#[ignore]`d (about a minute on two cores):
//! `cargo test --release --test it train_moments:: -- --ignored`.

use crate::common;

use nalgebra::DMatrix;
use tpc::finite::exec::{run, RunConfig};
use tpc::ir::Program;
use tpc::limit::particle::ParticleConfig;
use tpc::limit::train::particle_trajectory;

fn compile(src: &str) -> Program {
    tpc::compile(src).unwrap_or_else(|e| panic!("{e}"))
}

/// The limit trajectory by particles on the training inputs, against dense training at
/// `width` with 32 draws: every |finite − limit| ≤ 4 √(se_finite² + se_limit²). Returns
/// the limit trajectory and the largest deviation in combined standard errors.
fn particles_vs_finite(prog: &Program, width: usize, particles: usize) -> (DMatrix<f64>, f64) {
    let pts = common::train_inputs(prog);
    let cfg = ParticleConfig {
        particles,
        replicas: 16,
        seed: 1,
        ..Default::default()
    };
    let (lim, lse, method) = particle_trajectory(prog, &pts, &cfg).unwrap();
    assert!(method.starts_with("particle engine"), "{method}");
    let r = run(
        prog,
        &pts,
        &RunConfig {
            width,
            seeds: 32,
            seed: 7,
        },
        &|| {},
    )
    .unwrap();
    let ft = r.train.unwrap().f_t;
    let fse = ft.se.unwrap();
    assert_eq!(ft.mean.shape(), lim.shape());
    let mut worst: f64 = 0.0;
    for i in 0..lim.nrows() {
        for j in 0..lim.ncols() {
            let se = (lse[(i, j)].powi(2) + fse[(i, j)].powi(2)).sqrt();
            assert!(se > 0.0 && se.is_finite(), "step {i}, point {j}: se {se}");
            let dev = (ft.mean[(i, j)] - lim[(i, j)]).abs() / se;
            assert!(
                dev < 4.0,
                "step {i}, point {j}: finite {} ± {} vs particles {} ± {} ({dev:.2} SE)",
                ft.mean[(i, j)],
                fse[(i, j)],
                lim[(i, j)],
                lse[(i, j)]
            );
            worst = worst.max(dev);
        }
    }
    (lim, worst)
}

/// Layernorm (moments in a Nonlin, their gradients a rank-one 1/n term) with trainable
/// gains: width 1024, 2^18 particles.
#[test]
fn layernorm_mlp_particles_match_finite_width() {
    let prog = compile(&common::example("layernorm_mlp"));
    let (lim, worst) = particles_vs_finite(&prog, 1024, 1 << 18);
    eprintln!("layernorm_mlp: worst deviation {worst:.2} SE");
    // It learns: both targets approached by step 2 (±1).
    assert!(lim[(2, 0)] > 0.5 && lim[(2, 1)] < -0.5, "{lim}");
}

/// 1/n softmax attention (logits are moments, softmax a function of scalars, the output
/// a sum of value vectors with scalar weights) after layernorm: width 1024, 2^17
/// particles.
#[test]
fn attention_particles_match_finite_width() {
    let src =
        std::fs::read_to_string(common::manifest().join("tests/data/programs/attention_small.tp"))
            .unwrap();
    let prog = compile(&src);
    let (lim, worst) = particles_vs_finite(&prog, 1024, 1 << 17);
    eprintln!("attention_small: worst deviation {worst:.2} SE");
    assert!((lim[(3, 0)] - lim[(0, 0)]).abs() > 0.2, "it learns: {lim}");
}

/// The full two-block transformer (`examples/transformer.tp`), width 1024, 2^18
/// particles.
#[test]
#[ignore = "about a minute on two cores"]
fn transformer_particles_match_finite_width() {
    let prog = compile(&common::example("transformer"));
    let (lim, worst) = particles_vs_finite(&prog, 1024, 1 << 18);
    eprintln!("transformer: worst deviation {worst:.2} SE\n{lim}");
}
