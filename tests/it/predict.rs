//! Issue 16 (prediction): `tpc predict` against an independent numpy implementation of
//! Neural Tangents' `gradient_descent_mse_ensemble` on the same limit kernels
//! (`tests/data/predict_ref.json`, written by `tests/data/gen_predict.py` from
//! scikit-learn's digits), and its refusals.

use crate::common;

use std::path::{Path, PathBuf};

use serde_json::Value;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tpc-predict-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// The first `n` rows of a digits CSV into `dir/file`.
fn head(src: &str, n: usize, dir: &Path, file: &str) -> String {
    let path = common::manifest().join("tests/data/digits").join(src);
    let text = std::fs::read_to_string(path).expect("digits data");
    let rows: Vec<&str> = text.lines().take(n).collect();
    let out = dir.join(file);
    std::fs::write(&out, rows.join("\n") + "\n").expect("write");
    out.display().to_string()
}

fn matrix(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .expect("rows")
        .iter()
        .map(|r| match r {
            Value::Array(a) => a.iter().map(|x| x.as_f64().expect("number")).collect(),
            x => vec![x.as_f64().expect("number")],
        })
        .collect()
}

/// Every mean and variance within 1e-10 of numpy's, relative to the largest entry of
/// the compared matrix (the variances at t = inf are differences of O(1) terms, so an
/// entrywise relative bound would measure numpy's rounding, not tpc's).
fn close(what: &str, got: &[Vec<f64>], want: &[Vec<f64>]) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    let scale = want
        .iter()
        .flatten()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-300);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: columns of row {i}");
        for (j, (a, b)) in g.iter().zip(w).enumerate() {
            assert!(
                (a - b).abs() <= 1e-10 * scale,
                "{what}[{i}][{j}]: tpc {a:e}, numpy {b:e} (scale {scale:e})"
            );
        }
    }
}

#[test]
fn predictions_match_an_independent_numpy_implementation() {
    let refs: Value = serde_json::from_str(
        &std::fs::read_to_string(common::manifest().join("tests/data/predict_ref.json"))
            .expect("reference"),
    )
    .expect("json");
    let m = refs["train_rows"].as_array().expect("rows").len();
    let t = refs["test_rows"].as_array().expect("rows").len();
    let dir = tmp("numpy");
    let x = head("train_x.csv", m, &dir, "x.csv");
    let y = head("train_y.csv", m, &dir, "y.csv");
    let xt = head("test_x.csv", t, &dir, "xt.csv");
    let prog = common::manifest().join(refs["program"].as_str().expect("program"));
    let prog = prog.display().to_string();
    for case in refs["cases"].as_array().expect("cases") {
        let time = match &case["t"] {
            Value::String(s) => s.clone(),
            v => format!("{}", v.as_f64().expect("t")),
        };
        let reg = format!("{}", case["diag_reg"].as_f64().expect("reg"));
        let out = common::tpc_ok(
            &[
                "predict",
                &prog,
                "--train",
                &x,
                "--targets",
                &y,
                "--test",
                &xt,
                "--t",
                &time,
                "--diag-reg",
                &reg,
                "--format",
                "json",
            ],
            None,
        );
        let v: Value = serde_json::from_slice(&out).expect("predict JSON");
        let p = &v["predictions"][0];
        for k in ["nngp", "ntk"] {
            let what = format!("t = {time}, ε = {reg}, {k}");
            close(
                &format!("{what} mean"),
                &matrix(&p[k]["mean"]),
                &matrix(&case[format!("{k}_mean")]),
            );
            close(
                &format!("{what} var"),
                &matrix(&p[k]["var"]),
                &matrix(&case[format!("{k}_var")]),
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--steps` needs a `train` block; wrong target rows are an E0028 against the file;
/// an output-less time is refused; every failure exits 1 with a message.
#[test]
fn bad_requests_are_refused() {
    let dir = tmp("bad");
    let x = head("train_x.csv", 5, &dir, "x.csv");
    let y = head("train_y.csv", 4, &dir, "y.csv");
    let xt = head("test_x.csv", 2, &dir, "xt.csv");
    let prog = common::manifest()
        .join("tests/data/programs/digits_mlp3.tp")
        .display()
        .to_string();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tpc"))
            .args(args)
            .output()
            .expect("tpc runs")
    };
    let o = run(&[
        "predict",
        &prog,
        "--train",
        &x,
        "--targets",
        &y,
        "--test",
        &xt,
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("E0028") && err.contains("4 rows of targets for 5"),
        "{err}"
    );
    let y5 = head("train_y.csv", 5, &dir, "y5.csv");
    let o = run(&[
        "predict",
        &prog,
        "--train",
        &x,
        "--targets",
        &y5,
        "--test",
        &xt,
        "--steps",
        "3",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--steps"));
    let o = run(&[
        "predict",
        &prog,
        "--train",
        &x,
        "--targets",
        &y5,
        "--test",
        &xt,
        "--t=-1",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let _ = std::fs::remove_dir_all(&dir);
}

/// With a `train` block, its data are the default training set and `--steps k` is k
/// steps of its gradient descent: the NTK mean on the training points themselves
/// equals the limit engine's kernel-regime trajectory f_k (the same recursion, two
/// implementations).
#[test]
fn steps_of_the_train_block_match_the_kernel_regime_trajectory() {
    // sgd_mlp.tp in the NTK parameterization: the kernel regime.
    let src = common::example("sgd_mlp").replace("parameterization mup", "parameterization ntk");
    let prog = tpc::compile(&src).expect("the program compiles");
    let Some(tr) = &prog.train else {
        panic!("the program has a train block")
    };
    let steps = tr.steps;
    let pts: Vec<Vec<f64>> = tr.data.iter().map(|s| s.x.clone()).collect();
    let lim = tpc::limit_of(&src, &pts).expect("limit");
    assert_eq!(lim.regime.as_deref(), Some("kernel"));
    let tr = lim.train.expect("trajectory");
    let (Some(ft), Some(var)) = (&tr.f_t, &tr.f_t_var) else {
        panic!("the kernel regime gives f_t and its variance")
    };
    let dir = tmp("steps");
    let file = dir.join("ntk_mlp.tp");
    std::fs::write(&file, &src).expect("write");
    let xt = dir.join("xt.csv");
    let text: String = pts
        .iter()
        .map(|p| {
            p.iter()
                .map(|v| format!("{v}"))
                .collect::<Vec<_>>()
                .join(",")
                + "\n"
        })
        .collect();
    std::fs::write(&xt, text).expect("write");
    let out = common::tpc_ok(
        &[
            "predict",
            &file.display().to_string(),
            "--test",
            &xt.display().to_string(),
            "--steps",
            &steps.to_string(),
            "--format",
            "json",
        ],
        None,
    );
    let v: Value = serde_json::from_slice(&out).expect("json");
    let mean = matrix(&v["predictions"][0]["ntk"]["mean"]);
    let got_var = matrix(&v["predictions"][0]["ntk"]["var"]);
    assert_eq!(mean.len(), pts.len());
    for (i, row) in mean.iter().enumerate() {
        let (want, want_var) = (ft[(steps, i)], var[(steps, i)]);
        assert!(
            (row[0] - want).abs() < 1e-10,
            "point {i}: {} vs {want}",
            row[0]
        );
        assert!(
            (got_var[i][0] - want_var).abs() < 1e-10,
            "point {i}: variance {} vs {want_var}",
            got_var[i][0]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
