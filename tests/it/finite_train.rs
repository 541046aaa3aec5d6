//! Training at finite width (`tpc::finite::train`, `tpc run` on a `train` block):
//!
//! * one step's update equals −lr·lr_mult·∂L/∂w, every entry of every parameter against
//!   central finite differences of the loss (mse and xent, a program that exercises
//!   every backward rule), and the loss then falls by the first-order prediction;
//! * f_0 is the untrained run's output, draw by draw;
//! * muP (`sgd_mlp.tp`) is stable: |f_t| = O(1) at N = 256 and 1024 over steps 0..3,
//!   f_0 shrinks like N^(-1/2) with mean ~0, and the trajectories agree across widths;
//! * SP with a width-independent lr (`sp_blowup.tp`) is not: |f_1 − f_0| grows like N
//!   (theory.md §5.2, "First step vs later steps");
//! * non-finite values are errors naming the step and the node;
//! * `tpc run` JSON has `train.f_t` / `train.f_t_se` and is identical with 1 and 2 threads.

use crate::common;

use std::process::Command;

use nalgebra::DMatrix;
use tpc::finite::exec::{run, run_one, sample_params, RunConfig};
use tpc::finite::train::{coord_sizes, gd_step, loss_at, train_one};
use tpc::ir::Program;

fn compile(src: &str) -> Program {
    tpc::compile(src).unwrap_or_else(|e| panic!("{e}"))
}

fn grad_program(loss: &str, ys: [&str; 3]) -> Program {
    compile(&format!(
        "{}train {{\n  loss = {loss}\n  lr = 0.3\n  steps = 2\n  data = [ ([1.0, 0.0], {}), ([0.6, 0.8], {}), ([-2.0, 0.5], {}) ]\n}}\n",
        common::EVERY_RULE, ys[0], ys[1], ys[2]
    ))
}

/// Δw of one step against −lr·lr_mult·∂L/∂w by central differences, every entry.
fn check_step_against_fd(prog: &Program, n: usize) {
    let nf = n as f64;
    let ws0 = sample_params(prog, n, 3, 1).unwrap();
    let mut ws1 = ws0.clone();
    gd_step(prog, n, &mut ws1).unwrap();
    let lr = prog.train.as_ref().unwrap().lr;
    let eps = 1e-5;
    let mut worst: f64 = 0.0;
    let mut predicted_dl = 0.0;
    for (i, prm) in prog.params.iter().enumerate() {
        let rate = lr * prm.law.lr.at(nf);
        for e in 0..ws0[i].len() {
            let mut wp = ws0.clone();
            wp[i].as_mut_slice()[e] += eps;
            let mut wm = ws0.clone();
            wm[i].as_mut_slice()[e] -= eps;
            let g = (loss_at(prog, n, &wp).unwrap() - loss_at(prog, n, &wm).unwrap()) / (2.0 * eps);
            let got = ws1[i].as_slice()[e] - ws0[i].as_slice()[e];
            let want = -rate * g;
            let err = (got - want).abs() / (want.abs() + 1e-6 * rate.max(1.0));
            worst = worst.max(err);
            assert!(
                err < 1e-5,
                "{} entry {e}: update {got:e}, −lr·lr_mult·∂L/∂w = {want:e}",
                prm.name
            );
            predicted_dl += g * got;
        }
    }
    // The loss falls, by the first-order prediction Σ ∂L/∂w · Δw up to O(lr²).
    let l0 = loss_at(prog, n, &ws0).unwrap();
    let l1 = loss_at(prog, n, &ws1).unwrap();
    assert!(l1 < l0, "the loss rose: {l0} -> {l1}");
    assert!(predicted_dl < 0.0);
    eprintln!(
        "worst relative error {worst:.2e}; ΔL = {:.4e}, predicted {predicted_dl:.4e}",
        l1 - l0
    );
}

#[test]
fn one_step_is_minus_lr_times_the_gradient_mse() {
    let prog = grad_program("mse", ["[1.0, -0.5]", "[-1.0, 0.3]", "[0.5, 2.0]"]);
    check_step_against_fd(&prog, 6);
}

#[test]
fn one_step_is_minus_lr_times_the_gradient_xent() {
    let prog = grad_program("xent", ["[1.0, 0.0]", "[0.0, 1.0]", "[1.0, 1.0]"]);
    check_step_against_fd(&prog, 6);
}

/// With a tiny learning rate the change in f is the first-order prediction
/// −lr Σ_w lr_mult ⟨∂f/∂w, ∂L/∂w⟩ = −lr Σ_b Θ(x, x_b) χ_b (the lr-weighted NTK).
#[test]
fn a_small_step_moves_f_by_the_ntk_times_chi() {
    let src = std::fs::read_to_string(common::example_path("sgd_mlp"))
        .unwrap()
        .replace("lr    = 0.5", "lr    = 1e-6")
        .replace("steps = 3", "steps = 1");
    let prog = compile(&src);
    let t = prog.train.as_ref().unwrap();
    assert_eq!(t.lr, 1e-6);
    let pts: Vec<Vec<f64>> = t.data.iter().map(|s| s.x.clone()).collect();
    let cfg = RunConfig {
        width: 64,
        seeds: 1,
        seed: 4,
    };
    let traj = train_one(&prog, &pts, &cfg, 0).unwrap();
    let d = run_one(&prog, &pts, 64, 4, 0).unwrap();
    let b = pts.len();
    for p in 0..b {
        let mut pred = 0.0;
        for q in 0..b {
            let chi = (d.f[(0, q)] - t.data[q].y[0]) / b as f64;
            pred -= t.lr * d.ntk[(p, q)] * chi;
        }
        let got = traj[(1, p)] - traj[(0, p)];
        assert!(
            (got - pred).abs() < 1e-4 * pred.abs(),
            "point {p}: Δf = {got:e}, predicted {pred:e}"
        );
    }
}

#[test]
fn f0_is_the_untrained_output() {
    let prog = compile(&common::example("sgd_mlp"));
    let pts: Vec<Vec<f64>> = vec![vec![0.3, -0.2], vec![1.0, 0.0], vec![2.0, 1.0]];
    let cfg = RunConfig {
        width: 40,
        seeds: 3,
        seed: 7,
    };
    let r = run(&prog, &pts, &cfg, &|| {}).unwrap();
    let t = r.train.as_ref().expect("a trajectory");
    assert_eq!(t.f_t.mean.shape(), (4, 3));
    for p in 0..3 {
        assert_eq!(t.f_t.mean[(0, p)], r.f.mean[(0, p)]);
    }
    // Draw by draw, and the run's mean is the mean of the draws.
    let mut sum = DMatrix::zeros(4, 3);
    for k in 0..3 {
        let one = train_one(&prog, &pts, &cfg, k).unwrap();
        let d = run_one(&prog, &pts, 40, 7, k).unwrap();
        for p in 0..3 {
            assert_eq!(one[(0, p)], d.f[(0, p)]);
        }
        sum += one;
    }
    assert!((sum / 3.0 - &t.f_t.mean).amax() < 1e-14);
}

/// RMS over draws and points of f_t, per t, and the mean over draws of f_0 with its SE.
fn sgd_stats(prog: &Program, n: usize, k: usize) -> (Vec<f64>, DMatrix<f64>) {
    let pts = common::train_inputs(prog);
    let cfg = RunConfig {
        width: n,
        seeds: k,
        seed: 11,
    };
    let r = run(prog, &pts, &cfg, &|| {}).unwrap();
    let mut rms = vec![0.0; 4];
    for d in 0..k {
        let traj = train_one(prog, &pts, &cfg, d).unwrap();
        for (t, r) in rms.iter_mut().enumerate() {
            *r += traj.row(t).iter().map(|v| v * v).sum::<f64>() / (3 * k) as f64;
        }
    }
    let rms = rms.into_iter().map(f64::sqrt).collect();
    (rms, r.train.unwrap().f_t.mean)
}

#[test]
fn mup_training_is_stable_across_widths() {
    let prog = compile(&common::example("sgd_mlp"));
    let (small, mean_s) = sgd_stats(&prog, 256, 12);
    let (large, mean_l) = sgd_stats(&prog, 1024, 12);
    eprintln!("RMS f_t at N=256: {small:?}\nRMS f_t at N=1024: {large:?}");
    eprintln!("mean f_t at 256: {mean_s}\nmean f_t at 1024: {mean_l}");
    for t in 0..4 {
        // O(1): bounded (the targets are ±1 and 0.5) and not blowing up with N.
        assert!(small[t] < 1.0 && large[t] < 1.0, "t={t}");
        assert!(large[t] < 2.0 * small[t], "t={t}: |f_t| grows with N");
    }
    // f_0 = Θ(N^(-1/2)): halves from 256 to 1024, and is tiny.
    let ratio = large[0] / small[0];
    assert!((0.3..0.75).contains(&ratio), "f_0 ratio {ratio}");
    assert!(large[0] < 0.05);
    // Training moves f by Θ(1) (nontrivial), the same at both widths (feature learning
    // converges to a deterministic limit).
    assert!(large[3] > 0.1 && small[3] > 0.1);
    for p in 0..3 {
        let (a, b) = (mean_s[(3, p)], mean_l[(3, p)]);
        assert!(
            (a - b).abs() < 0.25 * a.abs().max(b.abs()),
            "f_3 at point {p}: {a} vs {b}"
        );
    }
}

/// Mean over draws of |f_1 − f_0| at width n.
fn first_step_move(prog: &Program, n: usize, k: usize) -> f64 {
    let pts = vec![vec![1.0, 0.0]];
    let cfg = RunConfig {
        width: n,
        seeds: k,
        seed: 2,
    };
    (0..k)
        .map(|d| {
            let t = train_one(prog, &pts, &cfg, d).unwrap();
            (t[(1, 0)] - t[(0, 0)]).abs()
        })
        .sum::<f64>()
        / k as f64
}

#[test]
fn sp_first_step_grows_linearly_in_width() {
    let prog = compile(&common::example("sp_blowup"));
    let ns = [128usize, 512, 2048];
    let moves: Vec<f64> = ns.iter().map(|&n| first_step_move(&prog, n, 8)).collect();
    // Least-squares slope of log|Δf| on log N.
    let xs: Vec<f64> = ns.iter().map(|&n| (n as f64).ln()).collect();
    let ys: Vec<f64> = moves.iter().map(|m| m.ln()).collect();
    let (mx, my) = (xs.iter().sum::<f64>() / 3.0, ys.iter().sum::<f64>() / 3.0);
    let slope = xs
        .iter()
        .zip(&ys)
        .map(|(x, y)| (x - mx) * (y - my))
        .sum::<f64>()
        / xs.iter().map(|x| (x - mx) * (x - mx)).sum::<f64>();
    eprintln!("|f_1 - f_0| at N = {ns:?}: {moves:?}; slope {slope:.3}");
    assert!((0.7..1.3).contains(&slope), "slope {slope}");
}

#[test]
fn a_blow_up_is_an_error_naming_the_step_and_node() {
    // Linear, so that the blow-up compounds (χ = Θ(N) scales every later gradient)
    // instead of killing every relu.
    let src = common::example("sp_blowup")
        .replace("relu", "id")
        .replace("lr    = 0.1", "lr    = 1.0")
        .replace("steps = 1", "steps = 40");
    let prog = compile(&src);
    let cfg = RunConfig {
        width: 256,
        seeds: 1,
        seed: 0,
    };
    let err = train_one(&prog, &[vec![1.0, 0.0]], &cfg, 0).unwrap_err();
    assert!(err.message.contains("training step"), "{}", err.message);
    assert!(err.node.is_some(), "{}", err.message);
    assert!(err.message.contains("infinite or NaN"), "{}", err.message);
    // The command line reports it as a diagnostic, never a number.
    let dir = std::env::temp_dir().join(format!("tpc_train_blowup_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("blow.tp");
    std::fs::write(&file, &src).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tpc"))
        .args([
            "run",
            file.to_str().unwrap(),
            "--width",
            "256",
            "--seeds",
            "2",
        ])
        .args(["--format", "json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // Under --format json the refusal is one JSON error object on stdout, no numbers.
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["error"]["code"].is_string(), "{v}");
    assert!(v.get("nngp").is_none() && v.get("train").is_none(), "{v}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("training step") && stderr.contains("h2"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn coord_sizes_cover_every_vector_and_step() {
    let prog = compile(&common::example("sgd_mlp"));
    let cfg = RunConfig {
        width: 128,
        seeds: 1,
        seed: 0,
    };
    let c = coord_sizes(&prog, &cfg, 0).unwrap();
    assert_eq!(c.rms.len(), 4);
    assert_eq!(c.f.len(), 4);
    assert_eq!(c.f_abs.len(), 4);
    assert!(c.labels.iter().any(|l| l == "h1") && c.labels.iter().any(|l| l == "h2"));
    for row in &c.rms {
        assert_eq!(row.len(), c.nodes.len());
        // muP: every coordinate is Θ(1).
        assert!(
            row.iter().all(|v| v.is_finite() && *v > 0.05 && *v < 10.0),
            "{row:?}"
        );
    }
    // f_t at the training inputs is the trajectory on the default points.
    let pts = common::train_inputs(&prog);
    let traj = train_one(&prog, &pts, &cfg, 0).unwrap();
    for (t, f) in c.f.iter().enumerate() {
        for (p, v) in f.iter().enumerate() {
            assert_eq!(*v, traj[(t, p)]);
        }
    }
}

fn tpc_run(args: &[&str], threads: &str) -> Vec<u8> {
    common::tpc_ok(args, Some(threads))
}

#[test]
fn train_json_is_deterministic_across_threads() {
    let sgd = common::example_path("sgd_mlp");
    let x = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/X2_4.csv");
    for extra in [vec![], vec!["--inputs", x.to_str().unwrap()]] {
        let mut args = vec![
            "run",
            sgd.to_str().unwrap(),
            "--width",
            "700",
            "--seeds",
            "3",
            "--seed",
            "5",
            "--format",
            "json",
        ];
        args.extend(extra.iter().copied());
        let a = tpc_run(&args, "1");
        let b = tpc_run(&args, "2");
        assert_eq!(a, b, "1 and 2 threads differ");
        let v: serde_json::Value = serde_json::from_slice(&a).unwrap();
        let p = v["points"].as_array().unwrap().len();
        let f_t = v["train"]["f_t"].as_array().unwrap();
        let se = v["train"]["f_t_se"].as_array().unwrap();
        assert_eq!(f_t.len(), 4);
        assert_eq!(se.len(), 4);
        assert!(f_t.iter().all(|r| r.as_array().unwrap().len() == p));
        assert_eq!(f_t[0], v["f"][0]);
    }
    // Without a train block there is no "train" key.
    let mlp = common::example_path("mlp3");
    let x1 = common::refs_dir().join("programs/X1.csv");
    let out = tpc_run(
        &[
            "run",
            mlp.to_str().unwrap(),
            "--width",
            "16",
            "--seeds",
            "2",
            "--inputs",
            x1.to_str().unwrap(),
            "--format",
            "json",
        ],
        "1",
    );
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert!(v.get("train").is_none());
}

#[test]
fn evaluation_points_other_than_the_training_inputs() {
    let prog = compile(&common::example("sgd_mlp"));
    let train_pts = common::train_inputs(&prog);
    let cfg = RunConfig {
        width: 50,
        seeds: 1,
        seed: 1,
    };
    let on_train = train_one(&prog, &train_pts, &cfg, 0).unwrap();
    // The third and first training inputs, and a new point: the training is the same.
    let eval = vec![train_pts[2].clone(), train_pts[0].clone(), vec![-1.0, 2.0]];
    let on_eval = train_one(&prog, &eval, &cfg, 0).unwrap();
    assert_eq!(on_eval.shape(), (4, 3));
    for t in 0..4 {
        assert!((on_eval[(t, 0)] - on_train[(t, 2)]).abs() < 1e-13);
        assert!((on_eval[(t, 1)] - on_train[(t, 0)]).abs() < 1e-13);
    }
}
