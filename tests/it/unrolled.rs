//! The unrolled training program (`tpc::autodiff`, theory.md §6.1) run by the finite
//! executor equals dense-update training (`tpc::finite::train`) draw by draw, to 1e-10:
//! the rank-t corrections through moments are an identity at every width, not an
//! approximation. Programs cover every backward rule: input layers, biases, a moment
//! inside a Nonlin, a matrix used forward and transposed, shared readouts, scalar
//! biases, two outputs, xent, weight sharing across time (an RNN), evaluation points
//! that are not training inputs, and an SP program whose update is Θ(n) large.

use crate::common;

use tpc::autodiff::{unroll, Width};
use tpc::finite::exec::{Engine, RunConfig};
use tpc::finite::train::train_one;
use tpc::finite::unrolled::UnrolledRun;
use tpc::ir::Program;

fn compile(src: &str) -> Program {
    tpc::compile(src).unwrap_or_else(|e| panic!("{e}"))
}

fn example(name: &str) -> Program {
    let path = common::examples_dir().join(name);
    compile(&std::fs::read_to_string(path).unwrap())
}

/// The train block appended to `common::EVERY_RULE`, with the loss to fill in.
const EVERY_RULE_TRAIN: &str = "\
train {
    loss  = LOSS
    lr    = 0.3
    steps = 3
    data  = [ ([1.0, 0.0], [1.0, 0.0]), ([0.0, 1.0], [0.0, 1.0]), ([0.6, -0.8], [1.0, 1.0]) ]
}
";

const RNN_TRAINED: &str = "\
width n
const T = 3
input x : 1 [T]
parameterization mup
param U : n x 1
param W : n x n { std = 1.1 }
param b : n { std = 0.3 }
param v : 1 x n
h[0] = 0
for t in 1..=T {
    h[t] = tanh(W @ h[t-1] + U @ x[t] + b)
}
output f = v @ h[T]
train {
    loss  = mse
    lr    = 0.4
    steps = 2
    data  = [ ([1.0, -0.5, 0.2], 0.5), ([0.3, 0.8, -1.0], -0.5) ]
}
";

/// Both trajectories of one draw; asserts |dense − unrolled| ≤ 1e-10·max(1, |dense|).
fn agree(prog: &Program, eval: &[Vec<f64>], n: usize, draw: usize) -> f64 {
    let cfg = RunConfig {
        width: n,
        seeds: 1,
        seed: 7,
    };
    let dense = train_one(prog, eval, &cfg, draw).unwrap_or_else(|e| panic!("{e}"));
    let run = UnrolledRun::new(prog, eval, n).unwrap_or_else(|e| panic!("{e}"));
    let unrolled = run
        .run(cfg.seed, draw, Engine::Dense)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dense.shape(), unrolled.shape());
    let mut worst: f64 = 0.0;
    for (a, b) in dense.iter().zip(unrolled.iter()) {
        let rel = (a - b).abs() / a.abs().max(1.0);
        worst = worst.max(rel);
    }
    assert!(
        worst <= 1e-10,
        "unrolled training differs from dense training by {worst:e}\ndense {dense}\nunrolled {unrolled}"
    );
    eprintln!("N = {n}: worst relative difference {worst:.2e}");
    // Training moved the outputs: the comparison is not of two constant sequences.
    let moved =
        (0..dense.ncols()).any(|j| (dense[(dense.nrows() - 1, j)] - dense[(0, j)]).abs() > 1e-3);
    assert!(moved, "training did not move f: {dense}");
    worst
}

#[test]
fn sgd_mlp_unrolled_equals_dense_training() {
    let prog = example("sgd_mlp.tp");
    for (n, draw) in [(16, 0), (64, 1), (200, 2)] {
        agree(&prog, &[], n, draw);
    }
}

#[test]
fn sp_blowup_unrolled_equals_dense_training() {
    let prog = example("sp_blowup.tp");
    agree(&prog, &[], 128, 0);
}

#[test]
fn every_backward_rule_mse_and_xent() {
    for loss in ["mse", "xent"] {
        let prog = compile(&format!(
            "{}{}",
            common::EVERY_RULE,
            EVERY_RULE_TRAIN.replace("LOSS", loss)
        ));
        agree(&prog, &[], 24, 0);
        // Evaluation points that are not all training inputs.
        let eval = vec![vec![0.5, 0.5], vec![1.0, 0.0], vec![-1.0, 0.2]];
        agree(&prog, &eval, 24, 3);
    }
}

#[test]
fn rnn_weight_sharing_unrolled_equals_dense_training() {
    let prog = compile(RNN_TRAINED);
    agree(&prog, &[], 40, 0);
}

#[test]
fn the_unrolled_program_holds_only_initial_matrices() {
    // Every MatMul multiplies a parameter node (W_0, U_0); the program has no Output
    // nodes, and f_t / χ_t are scalars.
    let prog = example("sgd_mlp.tp");
    let u = unroll(&prog, &[], Width::Limit).unwrap();
    u.prog.validate().unwrap();
    let mut matmuls = 0;
    for id in u.prog.ids() {
        match &u.prog.node(id).op {
            tpc::ir::Op::MatMul { .. } => {
                matmuls += 1;
                assert!(u.prog.param_of(u.prog.operands(id)[0]).is_some());
            }
            tpc::ir::Op::Output { .. } => panic!("an Output in an unrolled program"),
            _ => {}
        }
    }
    // U_0 ξ once per point (the same vector at every step), W_0 h1_t for 4 forward
    // passes (t = 0..3) × 3 points, and W_0ᵀ dh2 for 3 backward passes × 3 samples.
    assert_eq!(matmuls, 3 + 4 * 3 + 3 * 3);
    assert_eq!(u.f.len(), 4);
    assert!(u.f.iter().all(|r| r.len() == 3));
    assert_eq!(u.chi.len(), 3);
}

#[test]
fn the_limit_refuses_a_learning_rate_that_blows_up() {
    // SP with a width-independent lr: the readout's update coefficient grows like n.
    let prog = example("sp_blowup.tp");
    let e = unroll(&prog, &[], Width::Limit).unwrap_err();
    assert!(e.message.contains("grows without bound"), "{}", e.message);
}

/// The conditional engine trains through the unrolled program; its trajectories have
/// the dense engine's law: every f_t mean within 4 combined standard errors.
#[test]
fn conditional_engine_training_has_the_dense_law() {
    use tpc::finite::exec::run_engine;
    let prog = example("sgd_mlp.tp");
    let cfg = RunConfig {
        width: 256,
        seeds: 96,
        seed: 3,
    };
    let est = |engine| {
        let r = run_engine(&prog, &[], &cfg, engine, &|| {}).unwrap_or_else(|e| panic!("{e}"));
        r.train.expect("a trajectory").f_t
    };
    let (d, c) = (est(Engine::Dense), est(Engine::Conditional));
    let (sd, sc) = (d.se.unwrap(), c.se.unwrap());
    let mut worst: f64 = 0.0;
    for j in 0..d.mean.len() {
        let z = (d.mean[j] - c.mean[j]).abs() / (sd[j].powi(2) + sc[j].powi(2)).sqrt();
        worst = worst.max(z);
    }
    eprintln!("dense vs conditional training: worst z = {worst:.2}");
    assert!(
        worst < 4.0,
        "engines disagree: z = {worst}\n{}\n{}",
        d.mean,
        c.mean
    );
}

/// The listing of a one-step unrolled program (`tpc graph --unrolled`): every
/// instruction of the forward pass, χ, the backward pass through W_0ᵀ, and the
/// rank-one corrections of the next forward pass (read and checked by hand).
#[test]
fn unrolled_listing_snapshot() {
    let src = std::fs::read_to_string(common::example_path("sgd_mlp"))
        .unwrap()
        .replace("steps = 3", "steps = 1")
        .replace(
            "data  = [ ([1.0, 0.0], 1.0), ([0.0, 1.0], -1.0), ([0.7, 0.7], 0.5) ]",
            "data  = [ ([1.0, 0.0], 1.0), ([0.0, 1.0], -1.0) ]",
        );
    let prog = compile(&src);
    let u = unroll(&prog, &[], Width::Limit).unwrap();
    insta::assert_snapshot!(tpc::report::graph::listing(&u.prog));
}

#[test]
fn few_vectors_are_alive_at_once() {
    // sgd_mlp's unrolled program has ~200 vectors; the forward and backward vectors of
    // earlier steps stay alive (the rank-one corrections read them), the rest is freed.
    let prog = example("sgd_mlp.tp");
    let run = UnrolledRun::new(&prog, &[], 64).unwrap();
    let total = run
        .unrolled
        .prog
        .ids()
        .filter(|&id| run.unrolled.prog.ty(id) == tpc::ir::Ty::Vector)
        .count();
    let peak = run.peak_vectors();
    eprintln!("sgd_mlp unrolled: {total} vectors, at most {peak} alive");
    assert!(peak < total / 2, "{peak} of {total}");
}
