//! Netsor+ scalars (issue 14, first slice; README "Scalars and reductions"): moments
//! anywhere, functions of scalars, `sum`/`softmax` over positions. The project's three
//! examples run through every command: `check`, `graph`, `run` on both engines, and
//! `limit` (the Netsor+ engine, `tests/it/netsor_limit.rs`; sp_attention's 1/√n logits
//! are random in the limit: a Gaussian mixture, `tests/it/random_logits.rs`).

use crate::common;

use std::path::PathBuf;
use std::process::Command;

fn tpc(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tpc"))
        .args(args)
        .output()
        .unwrap()
}

/// A CSV of `rows` written under the test target's scratch directory.
fn csv(name: &str, rows: &[&[f64]]) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("netsor_{name}.csv"));
    let text: String = rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|v| format!("{v}"))
                .collect::<Vec<_>>()
                .join(",")
                + "\n"
        })
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

fn source(name: &str, src: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("netsor_{name}.tp"));
    std::fs::write(&p, src).unwrap();
    p
}

fn json(out: &[u8]) -> serde_json::Value {
    serde_json::from_slice(out).expect("valid JSON on stdout")
}

/// Every number in a JSON value (kernels, standard errors, trajectories).
fn numbers(v: &serde_json::Value, out: &mut Vec<f64>) {
    match v {
        serde_json::Value::Number(n) => out.push(n.as_f64().unwrap()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| numbers(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| numbers(x, out)),
        _ => {}
    }
}

fn inputs_for(name: &str) -> PathBuf {
    if name == "layernorm_mlp" {
        csv("pts2", &[&[1.0, 0.0], &[0.0, 1.0]])
    } else {
        csv(
            "seq3x2",
            &[
                &[1.0, 0.0, 0.0, 1.0, 0.5, 0.5],
                &[0.0, 1.0, 1.0, 0.0, -0.5, 0.5],
            ],
        )
    }
}

/// check, graph, run (dense and conditional, text and JSON) succeed with finite numbers;
/// `limit` gives finite kernels (the Netsor+ engine); on sp_attention (random 1/√n
/// logits) the NNGP and observe, and in place of the NTK and the trajectory a note
/// that they have no finite limit (no number).
#[test]
fn project_examples_through_every_command() {
    for name in common::PROJECT_EXAMPLES {
        let path = common::example_path(name);
        let file = path.to_str().unwrap();
        let pts = inputs_for(name);
        let pts = pts.to_str().unwrap();
        let out = tpc(&["check", file]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let g = String::from_utf8(common::tpc_ok(&["graph", file], None)).unwrap();
        assert!(g.contains("Moment("), "{name}: {g}");
        for engine in ["dense", "conditional"] {
            let v = json(&common::tpc_ok(
                &[
                    "run", file, "--width", "64", "--seeds", "2", "--inputs", pts, "--engine",
                    engine, "--format", "json",
                ],
                None,
            ));
            let mut xs = Vec::new();
            numbers(&v, &mut xs);
            assert!(
                xs.len() > 10 && xs.iter().all(|x| x.is_finite()),
                "{name}/{engine}"
            );
            assert_eq!(
                v["train"]["f_t"].as_array().map(|a| a.len()),
                Some(
                    tpc::compile(&common::example(name))
                        .unwrap()
                        .train
                        .unwrap()
                        .steps
                        + 1
                ),
                "{name}/{engine}"
            );
        }
        // The Netsor+ limit (tests/it/netsor_limit.rs); sp_attention's 1/√n logits are
        // random in the limit (tests/it/random_logits.rs): no NTK, no trajectory.
        if name == "sp_attention" {
            let v = json(&common::tpc_ok(
                &["limit", file, "--inputs", pts, "--format", "json"],
                None,
            ));
            let mut xs = Vec::new();
            numbers(&v["nngp"], &mut xs);
            numbers(&v["observe"], &mut xs);
            assert!(!xs.is_empty() && xs.iter().all(|x| x.is_finite()), "{v}");
            assert!(v["ntk"].is_null(), "{v}");
            let note = v["notes"]["ntk"].as_str().unwrap_or("");
            assert!(
                note.contains("no finite limit") && note.contains("Θ(n^(1/2))"),
                "{note}"
            );
            assert!(v["train"]["f_t"].is_null(), "{v}");
        } else {
            let v = json(&common::tpc_ok(
                &[
                    "limit",
                    file,
                    "--inputs",
                    pts,
                    "--particles",
                    "4096",
                    "--format",
                    "json",
                ],
                None,
            ));
            let mut xs = Vec::new();
            numbers(&v["ntk"], &mut xs);
            assert!(!xs.is_empty() && xs.iter().all(|x| x.is_finite()), "{name}");
        }
    }
}

/// Layernorm as written: (h - mean(h)) / sqrt(var + eps) has mean 0 and mean square
/// var / (var + eps) per draw, to rounding.
#[test]
fn layernorm_normalizes_each_draw() {
    let src = "width n\ninput x : 2\nparam U : n x 2\n\
               h = U @ x\n\
               g = (h - mean(h)) / sqrt(mean(h * h) - mean(h)^2 + 1e-5)\n\
               observe m1 = mean(g)\nobserve m2 = mean(g * g)\nobserve v = mean((h - mean(h))^2)\n";
    let (prog, diags) = tpc::check_source(src);
    assert!(prog.is_some() && diags.is_empty(), "{diags:?}");
    let p = source("layernorm", src);
    let pts = csv("pts2b", &[&[1.0, 0.0], &[0.3, -2.0]]);
    for width in ["16", "300"] {
        let v = json(&common::tpc_ok(
            &[
                "run",
                p.to_str().unwrap(),
                "--width",
                width,
                "--seeds",
                "1",
                "--inputs",
                pts.to_str().unwrap(),
                "--format",
                "json",
            ],
            None,
        ));
        for k in 0..2 {
            let m1 = v["observe"]["m1"][k].as_f64().unwrap();
            let m2 = v["observe"]["m2"][k].as_f64().unwrap();
            let var = v["observe"]["v"][k].as_f64().unwrap();
            assert!(m1.abs() < 1e-12, "mean {m1}");
            let want = var / (var + 1e-5);
            assert!((m2 - want).abs() < 1e-12, "{m2} vs {want}");
        }
    }
}

/// Softmax weights over positions sum to one: Σ_s w_s u₁² has the moment of u₁², to
/// rounding, whatever the logits.
#[test]
fn softmax_weights_sum_to_one() {
    let src = "width n\nconst L = 3\ninput x : 1 [L]\nparam U : n x 1\n\
               for t in 1..=L {\n    u[t] = tanh(U @ x[t])\n    a[t] = 3 * mean(u[t] * u[1])\n}\n\
               o = sum(s in 1..=L, softmax(s in 1..=L, a[s]) * u[1] * u[1])\n\
               observe tot = mean(o)\nobserve m = mean(u[1] * u[1])\n";
    let p = source("softmax", src);
    let pts = csv("seq3x1", &[&[1.0, -0.5, 2.0]]);
    let v = json(&common::tpc_ok(
        &[
            "run",
            p.to_str().unwrap(),
            "--width",
            "50",
            "--seeds",
            "3",
            "--inputs",
            pts.to_str().unwrap(),
            "--format",
            "json",
        ],
        None,
    ));
    // One point: each observe is one number.
    let tot = v["observe"]["tot"].as_f64().unwrap();
    let m = v["observe"]["m"].as_f64().unwrap();
    assert!((tot - m).abs() < 1e-12 * m.abs().max(1.0), "{tot} vs {m}");
}

/// Gradients through moments and functions of scalars (a moment's gradient is the
/// rank-one term ψ'/n): one step of gradient descent with a tiny rate moves f by
/// −lr (f₀ − y) Θ(x, x) to first order, Θ the NTK from the reverse pass. Checked per
/// draw (K = 1) on layernorm and attention with the dense engine, which trains with its
/// own reverse pass (the conditional engine is exact in law only: its trajectory and its
/// NTK draw the hidden products separately, so this per-draw identity fails there even
/// without moments; `autodiff` is checked against the dense pass below). With lr = 1e-6
/// the second-order term is ~1e-6 relative; rounding is far below; the tolerance 1e-4 is
/// their sum with a margin of 100.
#[test]
fn gradients_through_moments_match_finite_differences() {
    let ln = "width n\ninput x : 2\nparameterization mup\n\
              param U : n x 2\nparam W : n x n\nparam g : n { std = 0.5 }\nparam v : 1 x n\n\
              h = U @ x\n\
              z = tanh((h - mean(h)) * rsqrt(mean(h * h) - mean(h)^2 + 1e-5) * (1 + g))\n\
              h2 = W @ z\n\
              output f = v @ (h2 / sqrt(mean(h2 * h2) + 0.1))\n\
              train { loss = mse lr = 1e-6 steps = 1 data = [ ([0.6, -1.2], 1.0) ] }\n";
    let att = "width n\nconst L = 2\ninput x : 1 [L]\nparameterization mup\n\
               param U : n x 1\nparam Q : n x n\nparam K : n x n\nparam V : n x n\nparam v : 1 x n\n\
               for t in 1..=L {\n    u[t] = tanh(U @ x[t])\n    q[t] = Q @ u[t]\n    k[t] = K @ u[t]\n    w[t] = V @ u[t]\n}\n\
               for t in 1..=L {\n    for s in 1..=L {\n        a[t, s] = 4 * mean(q[t] * k[s])\n    }\n\
                   o[t] = u[t] + sum(s in 1..=L, softmax(s in 1..=L, a[t, s]) * w[s])\n}\n\
               output f = v @ (o[1] + o[2])\n\
               train { loss = mse lr = 1e-6 steps = 1 data = [ ([0.7, -1.1], 1.0) ] }\n";
    for (name, src, row) in [("ln", ln, [0.6, -1.2]), ("att", att, [0.7, -1.1])] {
        let p = source(&format!("fd_{name}"), src);
        let pts = csv(&format!("fd_{name}"), &[&row]);
        {
            let engine = "dense";
            let v = json(&common::tpc_ok(
                &[
                    "run",
                    p.to_str().unwrap(),
                    "--width",
                    "40",
                    "--seeds",
                    "1",
                    "--inputs",
                    pts.to_str().unwrap(),
                    "--engine",
                    engine,
                    "--format",
                    "json",
                ],
                None,
            ));
            let f0 = v["train"]["f_t"][0][0].as_f64().unwrap();
            let f1 = v["train"]["f_t"][1][0].as_f64().unwrap();
            let ntk = v["ntk"][0][0].as_f64().unwrap();
            let fd = (f1 - f0) / 1e-6;
            let want = -(f0 - 1.0) * ntk;
            assert!(
                (fd - want).abs() <= 1e-4 * want.abs(),
                "{name}/{engine}: finite difference {fd} vs -(f0 - y) NTK = {want}"
            );
        }
    }
}

/// W0003 where tpc cannot show a square root's argument is non-negative; none for a
/// variance (Jensen), a mean of squares or a positive constant.
#[test]
fn sqrt_sign_warnings() {
    let head = "width n\ninput x : 2\nparam U : n x 2\nparam v : 1 x n\nh = U @ x\n";
    let warned = |body: &str| {
        let src = format!("{head}{body}output f = v @ g\n");
        let (_, diags) = tpc::check_source(&src);
        diags
            .iter()
            .filter(|d| d.code == "W0003")
            .map(|d| tpc::diag::Renderer::new("t.tp", &src).render(std::slice::from_ref(d)))
            .collect::<Vec<_>>()
    };
    for ok in [
        "g = h / sqrt(mean(h * h) - mean(h)^2 + 1e-5)\n",
        "g = h * rsqrt(mean(h * h) + 1)\n",
        "g = h * mean(h^2 + 1)^(-1/2) * log(1 + mean(exp(h)))\n",
    ] {
        assert!(warned(ok).is_empty(), "{ok}: {:?}", warned(ok));
    }
    let w = warned("g = h * sqrt(mean(h) - 1)\n");
    assert_eq!(w.len(), 1);
    insta::assert_snapshot!("sqrt_of_a_scalar_that_can_be_negative", w[0]);
    let w = warned("g = h * rsqrt(mean(h * h) - mean(h)^2)\n");
    assert_eq!(
        w.len(),
        1,
        "a variance can be 0: rsqrt needs a positive argument"
    );
}

/// The unrolled training program (`autodiff`: reverse mode through moments, `sqrt`,
/// `rsqrt`, softmax weights) run on the dense engine equals dense-update training
/// draw by draw, to 1e-10 (as `tests/it/unrolled.rs` for the other programs), on the
/// three project examples at small widths.
#[test]
fn unrolled_training_through_scalars_equals_dense_training() {
    use tpc::finite::exec::{Engine, RunConfig};
    use tpc::finite::train::train_one;
    use tpc::finite::unrolled::UnrolledRun;
    for name in common::PROJECT_EXAMPLES {
        let prog = tpc::compile(&common::example(name)).unwrap();
        let eval = common::train_inputs(&prog);
        for n in [8, 24] {
            let cfg = RunConfig {
                width: n,
                seeds: 1,
                seed: 3,
            };
            let dense = train_one(&prog, &eval, &cfg, 0).unwrap_or_else(|e| panic!("{e}"));
            let run = UnrolledRun::new(&prog, &eval, n).unwrap_or_else(|e| panic!("{e}"));
            let unrolled = run
                .run(cfg.seed, 0, Engine::Dense)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(dense.shape(), unrolled.shape());
            let worst = dense
                .iter()
                .zip(unrolled.iter())
                .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
                .fold(0.0f64, f64::max);
            assert!(
                worst <= 1e-10,
                "{name} N = {n}: {worst:e}\ndense {dense}\nunrolled {unrolled}"
            );
        }
    }
}

/// Moments converge at rate N^(-1/2): the per-draw spread (sd over K draws) of an
/// observed moment of layernorm_mlp falls with slope −1/2 in log–log against the width
/// (`tpc compare` needs the limit, which the engine refuses for now, so the spread is
/// fitted instead of the error). The sd of K = 32 draws has relative standard error
/// ≈ 1/√(2K) = 0.125; over widths 64..4096 the fitted slope's SE is then ≈ 0.04, and the
/// test allows 3 SE. Heavy (about a minute on two cores):
/// `cargo test --release --test it netsor::moment_spread -- --ignored`.
#[test]
#[ignore]
fn moment_spread_falls_like_n_to_the_minus_half() {
    let path = common::example_path("layernorm_mlp");
    let pts = csv("slope_pts", &[&[1.0, 0.0], &[0.0, 1.0]]);
    let k = 32usize;
    let widths = [64usize, 256, 1024, 4096];
    for p in 0..2 {
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for w in widths {
            let v = json(&common::tpc_ok(
                &[
                    "run",
                    path.to_str().unwrap(),
                    "--width",
                    &w.to_string(),
                    "--seeds",
                    &k.to_string(),
                    "--inputs",
                    pts.to_str().unwrap(),
                    "--format",
                    "json",
                ],
                None,
            ));
            let se = v["observe_se"]["var2"][p].as_f64().unwrap();
            xs.push((w as f64).ln());
            ys.push((se * (k as f64).sqrt()).ln());
        }
        let mx = xs.iter().sum::<f64>() / xs.len() as f64;
        let my = ys.iter().sum::<f64>() / ys.len() as f64;
        let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
        let slope = xs
            .iter()
            .zip(&ys)
            .map(|(x, y)| (x - mx) * (y - my))
            .sum::<f64>()
            / sxx;
        let se = (1.0 / (2.0 * k as f64)).sqrt() / sxx.sqrt();
        assert!(
            (slope + 0.5).abs() <= 3.0 * se,
            "point {p}: slope {slope:.3}, expected -1/2 ± {:.3}",
            3.0 * se
        );
    }
}

/// `compare` and `coord-check` run on the project's examples and report finite numbers
/// (small widths: this checks that they work, the slopes are tested elsewhere:
/// `compare_moments.rs`, `random_logits.rs`, `scaling_logits.rs`). `transformer.tp`'s
/// `compare` computes its limit trajectory by particles (about two minutes on two
/// cores) and is left to `coord-check` here.
#[test]
fn project_examples_in_compare_and_coord_check() {
    for name in common::PROJECT_EXAMPLES {
        let path = common::example_path(name);
        let file = path.to_str().unwrap();
        let mut cmds = vec!["coord-check"];
        if name != "transformer" {
            cmds.push("compare");
        }
        for cmd in cmds {
            let v = json(&common::tpc_ok(
                &[
                    cmd, file, "--widths", "32,64", "--seeds", "2", "--no-svg", "--format", "json",
                ],
                None,
            ));
            let mut xs = Vec::new();
            numbers(&v, &mut xs);
            assert!(
                xs.len() > 4 && xs.iter().all(|x| x.is_finite()),
                "{name} {cmd}: {v}"
            );
        }
    }
}
