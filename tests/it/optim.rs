//! Optimizers (README, "Training: optimizers"): dense finite-width training with
//! momentum, weight decay, minibatches, Adam and AdamW equals an independent
//! re-implementation — this file's own forward pass, backward pass and optimizer step,
//! written from torch.optim's definitions — on the same sampled weights, to 1e-12
//! relative at every step and point; the unrolled program of the linear optimizers
//! (momentum, weight decay, minibatches) equals dense training to 1e-12 relative; Adam
//! has no unrolled program and says why.

use crate::common;

use nalgebra::{DMatrix, DVector};
use tpc::finite::exec::{sample_params, Engine, RunConfig};
use tpc::finite::train::train_one;
use tpc::finite::unrolled::UnrolledRun;
use tpc::ir::Program;

/// A muP network with an input layer, a hidden matrix and a readout, three samples.
fn program(train_extra: &str) -> Program {
    let src = format!(
        "width n\ninput x : 2\nparameterization mup\nparam U : n x 2\nparam W : n x n\n\
         param v : 1 x n\nh = tanh(U @ x)\ng = tanh(W @ h)\noutput f = v @ g\n\
         train {{ loss = mse  lr = 0.2  steps = 4  {train_extra}\n\
         data = [ ([1.0, 0.0], 1.0), ([0.0, 1.0], -1.0), ([0.6, -0.8], 0.5) ] }}\n"
    );
    tpc::compile(&src).unwrap_or_else(|e| panic!("{e}"))
}

/// The optimizer of the hand computation, with torch.optim's hyperparameters.
#[derive(Clone, Copy)]
enum Opt {
    Sgd {
        wd: f64,
    },
    Momentum {
        beta: f64,
        wd: f64,
    },
    Adam {
        b1: f64,
        b2: f64,
        eps: f64,
        wd: f64,
        decoupled: bool,
    },
}

/// f_t on the three samples, t = 0..=4, by hand: the network's gradients written out
/// (f = mv·vᵀ tanh(mW·W tanh(mU·U ξ))) and the optimizer step in torch's form.
fn by_hand(prog: &Program, n: usize, opt: Opt, batch: usize) -> Vec<Vec<f64>> {
    let nf = n as f64;
    let mut ws = sample_params(prog, n, 5, 2).unwrap();
    let m: Vec<f64> = prog.params.iter().map(|p| p.law.mult.at(nf)).collect();
    let lr: Vec<f64> = prog.params.iter().map(|p| 0.2 * p.law.lr.at(nf)).collect();
    let data = [([1.0, 0.0], 1.0), ([0.0, 1.0], -1.0), ([0.6, -0.8], 0.5)];
    let forward = |ws: &[DMatrix<f64>], xi: [f64; 2]| {
        let a1 = (&ws[0] * DVector::from_row_slice(&xi)) * m[0];
        let h = a1.map(f64::tanh);
        let g = ((&ws[1] * &h) * m[1]).map(f64::tanh);
        let f = m[2] * ws[2].column(0).dot(&g);
        (h, g, f)
    };
    let mut buf: Vec<Option<DMatrix<f64>>> = vec![None; 3];
    let mut sq: Vec<Option<DMatrix<f64>>> = vec![None; 3];
    let mut out = Vec::new();
    for t in 0..=4 {
        out.push(data.iter().map(|(x, _)| forward(&ws, *x).2).collect());
        if t == 4 {
            break;
        }
        let mut grads = [
            DMatrix::zeros(n, 2),
            DMatrix::zeros(n, n),
            DMatrix::zeros(n, 1),
        ];
        for j in 0..batch {
            let (x, y) = data[(t * batch + j) % data.len()];
            let (h, g, f) = forward(&ws, x);
            let chi = (f - y) / batch as f64;
            let v = ws[2].column(0).clone_owned();
            grads[2] += &g * (chi * m[2]);
            let d2 = v.component_mul(&g.map(|z| 1.0 - z * z)) * (chi * m[2]);
            grads[1] += &d2 * h.transpose() * m[1];
            let d1 = (ws[1].transpose() * &d2 * m[1]).component_mul(&h.map(|z| 1.0 - z * z));
            grads[0] += &d1 * DVector::from_row_slice(&x).transpose() * m[0];
        }
        let k = (t + 1) as i32;
        for i in 0..3 {
            let p = &mut ws[i];
            let mut g = grads[i].clone();
            match opt {
                Opt::Sgd { wd } => {
                    g += &*p * wd;
                    *p -= g * lr[i];
                }
                Opt::Momentum { beta, wd } => {
                    g += &*p * wd;
                    let b = match buf[i].take() {
                        None => g,
                        Some(b) => b * beta + g,
                    };
                    *p -= &b * lr[i];
                    buf[i] = Some(b);
                }
                Opt::Adam {
                    b1,
                    b2,
                    eps,
                    wd,
                    decoupled,
                } => {
                    if decoupled {
                        *p *= 1.0 - lr[i] * wd;
                    } else {
                        g += &*p * wd;
                    }
                    let m1 = buf[i].take().unwrap_or_else(|| g.map(|_| 0.0)) * b1 + &g * (1.0 - b1);
                    let m2 = sq[i].take().unwrap_or_else(|| g.map(|_| 0.0)) * b2
                        + g.map(|z| z * z) * (1.0 - b2);
                    let mhat = &m1 / (1.0 - b1.powi(k));
                    let vhat = &m2 / (1.0 - b2.powi(k));
                    let step = mhat.zip_map(&vhat, |a, b| a / (b.sqrt() + eps));
                    *p -= step * lr[i];
                    buf[i] = Some(m1);
                    sq[i] = Some(m2);
                }
            }
        }
    }
    out
}

/// tpc's dense trajectory of the same draw against the hand computation.
fn agree(train_extra: &str, opt: Opt, batch: usize, n: usize) {
    let prog = program(train_extra);
    let cfg = RunConfig {
        width: n,
        seeds: 1,
        seed: 5,
    };
    let got = train_one(&prog, &[], &cfg, 2).unwrap();
    let want = by_hand(&prog, n, opt, batch);
    let mut moved = 0.0f64;
    for (t, row) in want.iter().enumerate() {
        for (p, &w) in row.iter().enumerate() {
            let g = got[(t, p)];
            assert!(
                (g - w).abs() <= 1e-12 * w.abs().max(1e-3),
                "{train_extra}: f_{t}(ξ{}) = {g:e}, by hand {w:e}",
                p + 1
            );
            moved = moved.max((w - want[0][p]).abs());
        }
    }
    // Training moved f: the comparison is not of two untrained networks.
    assert!(moved > 1e-2, "{train_extra}: f moved by {moved:e} only");
}

#[test]
fn sgd_with_weight_decay_and_minibatches_matches_by_hand() {
    agree("weight_decay = 0.1  batch = 2", Opt::Sgd { wd: 0.1 }, 2, 12);
}

#[test]
fn momentum_matches_torch_sgd_with_momentum_by_hand() {
    agree(
        "optimizer = momentum(0.9)",
        Opt::Momentum { beta: 0.9, wd: 0.0 },
        3,
        12,
    );
    agree(
        "optimizer = momentum(0.5)  weight_decay = 0.05  batch = 1",
        Opt::Momentum {
            beta: 0.5,
            wd: 0.05,
        },
        1,
        10,
    );
}

#[test]
fn adam_matches_torch_adam_by_hand() {
    let n = 12;
    agree(
        "optimizer = adam(0.9, 0.999, 1e-8)",
        Opt::Adam {
            b1: 0.9,
            b2: 0.999,
            eps: 1e-8,
            wd: 0.0,
            decoupled: false,
        },
        3,
        n,
    );
    // ε a monomial in the width, L2 weight decay, minibatches of 2.
    agree(
        "optimizer = adam(0.8, 0.99, 1e-3 * n^(-1))  weight_decay = 0.01  batch = 2",
        Opt::Adam {
            b1: 0.8,
            b2: 0.99,
            eps: 1e-3 / n as f64,
            wd: 0.01,
            decoupled: false,
        },
        2,
        n,
    );
}

#[test]
fn adamw_decays_decoupled_as_torch_adamw() {
    agree(
        "optimizer = adamw(0.9, 0.999, 1e-6, 0.1)  batch = 2",
        Opt::Adam {
            b1: 0.9,
            b2: 0.999,
            eps: 1e-6,
            wd: 0.1,
            decoupled: true,
        },
        2,
        9,
    );
}

#[test]
fn full_batch_sgd_is_unchanged_by_naming_it() {
    // `optimizer = sgd` and `batch = D` are the default: the same numbers bit for bit.
    let cfg = RunConfig {
        width: 16,
        seeds: 1,
        seed: 5,
    };
    let a = train_one(&program(""), &[], &cfg, 0).unwrap();
    let b = train_one(&program("optimizer = sgd  batch = 3"), &[], &cfg, 0).unwrap();
    assert_eq!(a, b);
}

/// The unrolled program (autodiff, "Momentum, weight decay, minibatches") at width n
/// against dense training of the same draw: |dense − unrolled| ≤ 1e-12·max(1, |dense|).
fn unrolled_agrees(prog: &Program, n: usize, draw: usize) {
    let cfg = RunConfig {
        width: n,
        seeds: 1,
        seed: 7,
    };
    let dense = train_one(prog, &[], &cfg, draw).unwrap_or_else(|e| panic!("{e}"));
    let run = UnrolledRun::new(prog, &[], n).unwrap_or_else(|e| panic!("{e}"));
    let unrolled = run
        .run(cfg.seed, draw, Engine::Dense)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dense.shape(), unrolled.shape());
    let mut worst: f64 = 0.0;
    for (a, b) in dense.iter().zip(unrolled.iter()) {
        worst = worst.max((a - b).abs() / a.abs().max(1.0));
    }
    eprintln!("N = {n}: worst relative difference {worst:.2e}");
    assert!(
        worst <= 1e-12,
        "unrolled differs from dense by {worst:e}\ndense {dense}\nunrolled {unrolled}"
    );
    let last = dense.nrows() - 1;
    assert!(
        (0..dense.ncols()).any(|j| (dense[(last, j)] - dense[(0, j)]).abs() > 1e-3),
        "training did not move f: {dense}"
    );
}

fn every_rule(train: &str) -> Program {
    let src = format!(
        "{}train {{\n  loss = mse  lr = 0.3  steps = 4  {train}\n  data = [ ([1.0, 0.0], [1.0, 0.0]), ([0.0, 1.0], [0.0, 1.0]), ([0.6, -0.8], [1.0, 1.0]) ]\n}}\n",
        common::EVERY_RULE
    );
    tpc::compile(&src).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn unrolled_momentum_decay_and_minibatches_equal_dense_training() {
    // Every backward rule (input layer, bias, moment, W and Wᵀ, shared readouts, scalar
    // bias, two outputs) under each linear optimizer.
    for train in [
        "optimizer = momentum(0.9)",
        "weight_decay = 0.2  batch = 2",
        "optimizer = momentum(0.7)  weight_decay = 0.1 * n^(-1/2)  batch = 1",
    ] {
        unrolled_agrees(&every_rule(train), 24, 1);
    }
    unrolled_agrees(
        &program("optimizer = momentum(0.9)  weight_decay = 0.05  batch = 2"),
        40,
        0,
    );
}

#[test]
fn adam_has_no_unrolled_program_and_says_why() {
    let prog = program("optimizer = adam(0.9, 0.999, 1e-8)");
    let e = UnrolledRun::new(&prog, &[], 16).err().expect("refused");
    assert!(
        e.message.contains("not a linear optimizer"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("not a sum of low-rank terms"),
        "{}",
        e.message
    );
}

/// The optimizer examples pass check, graph (which names the optimizer) and run;
/// `limit` computes momentum_rnn (feature learning, through the unrolled program) and
/// adam_mlp (nonlinear outer products, by particles); sp_adam has no trajectory and
/// the note says why.
#[test]
fn optimizer_examples_through_every_command() {
    for name in common::OPTIM_EXAMPLES {
        let path = common::example_path(name);
        let file = path.to_str().unwrap();
        common::tpc_ok(&["check", file], None);
        let g = String::from_utf8(common::tpc_ok(&["graph", file], None)).unwrap();
        assert!(g.contains("optimizer: "), "{name}: {g}");
        let out = common::tpc_ok(
            &[
                "run", file, "--width", "32", "--seeds", "2", "--format", "json",
            ],
            None,
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let f_t = v["train"]["f_t"].as_array().expect("train.f_t");
        assert!(f_t.len() >= 4, "{name}: {f_t:?}");
        let lim = std::process::Command::new(env!("CARGO_BIN_EXE_tpc"))
            .args(["limit", file, "--particles", "4096", "--format", "json"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&lim.stderr);
        if name == "momentum_rnn" {
            assert!(lim.status.success(), "{name}: {err}");
            let v: serde_json::Value = serde_json::from_slice(&lim.stdout).unwrap();
            let method = v["train"]["method"].as_str().unwrap_or_default();
            assert!(
                method.starts_with("momentum(0.9), minibatches of 2: particle engine"),
                "{name}: {method}"
            );
            assert_eq!(v["train"]["f_t"].as_array().map(Vec::len), Some(5));
        } else {
            assert!(lim.status.success(), "{name}: {err}");
            let v: serde_json::Value = serde_json::from_slice(&lim.stdout).unwrap();
            let method = v["train"]["method"].as_str().unwrap_or_default();
            let note = v["train"]["note"].as_str().unwrap_or_default();
            if name == "adam_mlp" {
                assert!(
                    method.starts_with(
                        "adam(0.9, 0.999, 1e-8 * n^(-1)), full batch: particle engine"
                    ) && method.contains("nonlinear outer product"),
                    "{name}: {method}"
                );
                assert_eq!(v["train"]["f_t"].as_array().map(Vec::len), Some(5));
            } else {
                assert!(v["train"]["f_t"].is_null(), "{name}: {v}");
                assert!(note.contains("does not vanish"), "{name}: {note}");
            }
        }
    }
}

/// `tpc check` applies Adam's own exponents (tests/it/adam_scaling.rs), never SGD's
/// W0103/N0101.
#[test]
fn adam_programs_get_adam_scaling() {
    for (name, want) in [
        ("adam_mlp", vec!["N0102"]),
        ("sp_adam", vec!["W0107", "W0107", "W0109"]),
    ] {
        let (_, diags) = tpc::check_source(&common::example(name));
        let codes: Vec<&str> = diags.iter().map(|d| d.code).collect();
        assert_eq!(codes, want, "{name}");
    }
}
