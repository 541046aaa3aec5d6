//! Issue 13 (outputs) and issue 18 (JSON on error): `--out DIR` writes `.npy` files and
//! `meta.json`; `--format json` is streamed byte for byte as the `Value` it replaces;
//! large kernels are summarized in text; every failure under `--format json` prints one
//! JSON object on stdout.

use crate::common;

use std::process::{Command, Output};

use nalgebra::DMatrix;
use serde_json::{json, Map, Value};

fn tpc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tpc"))
        .args(args)
        .output()
        .expect("tpc runs")
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tpc-outputs-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Points x = -1, -0.8, …: `n` one-dimensional points as CSV.
fn points_csv(dir: &std::path::Path, n: usize) -> String {
    let p = dir.join("points.csv");
    let text: String = (0..n)
        .map(|i| format!("{}\n", -1.0 + 0.2 * i as f64))
        .collect();
    std::fs::write(&p, text).expect("write points");
    p.display().to_string()
}

/// Entries as the JSON report shows them after serde_json's parse: printed as the
/// report prints them (shortest round trip) and parsed by the same parser, so that the
/// comparison with a parsed report is exact (serde_json's default parser is not
/// correctly rounded, so the raw f64 may differ from it in the last bit).
fn as_json_reads(vals: &[f64]) -> Vec<f64> {
    vals.iter()
        .map(|v| {
            let text = serde_json::Number::from_f64(*v)
                .expect("finite")
                .to_string();
            serde_json::from_str::<f64>(&text).expect("number")
        })
        .collect()
}

/// A `.npy` file's shape and entries (row-major), via the writer's own header parser.
fn load_npy(path: &std::path::Path) -> (Vec<usize>, Vec<f64>) {
    let bytes = std::fs::read(path).expect("npy file");
    let (shape, start) = tpc::report::npy::parse_header(&bytes).expect("a v1.0 f64 header");
    let vals = bytes[start..]
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    (shape, vals)
}

fn json_matrix_flat(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("rows")
        .iter()
        .flat_map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|x| x.as_f64().expect("number"))
        })
        .collect()
}

#[test]
fn limit_out_writes_the_kernels_as_npy_equal_to_the_json() {
    let dir = tmp("limit");
    let pts = points_csv(&dir, 4);
    let mlp = common::example_path("mlp3").display().to_string();
    let out = dir.join("out");
    let o = tpc(&[
        "limit",
        &mlp,
        "--inputs",
        &pts,
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = tpc(&["limit", &mlp, "--inputs", &pts, "--format", "json"]);
    let j: Value = serde_json::from_slice(&j.stdout).expect("JSON");
    for k in ["nngp", "ntk"] {
        let (shape, vals) = load_npy(&out.join(format!("{k}.npy")));
        assert_eq!(shape, vec![4, 4]);
        assert_eq!(as_json_reads(&vals), json_matrix_flat(&j[k]), "{k}");
    }
    let meta: Value =
        serde_json::from_slice(&std::fs::read(out.join("meta.json")).expect("meta")).expect("JSON");
    assert_eq!(meta["outputs"], j["outputs"]);
    assert_eq!(meta["points"], j["points"]);
    assert_eq!(meta["methods"], j["methods"]);
    assert_eq!(meta["files"]["nngp"]["file"], "nngp.npy");
    assert_eq!(meta["files"]["ntk"]["shape"], json!([4, 4]));
    let (_, ntk) = load_npy(&out.join("ntk.npy"));
    numpy_check(&out.join("ntk.npy"), &ntk);
}

/// Loads a file with Python's numpy when it is installed, and compares.
fn numpy_check(path: &std::path::Path, want: &[f64]) {
    let has = Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        eprintln!("SKIPPED: numpy is not installed; the .npy file was checked with the header parser only");
        return;
    }
    let o = Command::new("python3")
        .args([
            "-c",
            "import sys, numpy as np; a = np.load(sys.argv[1]); print(a.dtype, a.shape); print(' '.join(repr(float(x)) for x in a.ravel()))",
            path.to_str().expect("utf8"),
        ])
        .output()
        .expect("python3 runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut lines = text.lines();
    let n = (want.len() as f64).sqrt() as usize;
    assert_eq!(lines.next(), Some(format!("float64 ({n}, {n})").as_str()));
    let got: Vec<f64> = lines
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(|x| x.parse().expect("float"))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn run_out_writes_estimates_and_standard_errors() {
    let dir = tmp("run");
    let pts = points_csv(&dir, 3);
    let mlp = common::example_path("mlp3").display().to_string();
    let out = dir.join("out");
    let args = [
        "run", &mlp, "--inputs", &pts, "--width", "16", "--seeds", "3",
    ];
    let o = tpc(&[&args[..], &["--out", out.to_str().expect("utf8")]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = tpc(&[&args[..], &["--format", "json"]].concat());
    let j: Value = serde_json::from_slice(&j.stdout).expect("JSON");
    for k in ["nngp", "ntk", "nngp_se", "ntk_se", "f", "f_se"] {
        let (_, vals) = load_npy(&out.join(format!("{k}.npy")));
        assert_eq!(as_json_reads(&vals), json_matrix_flat(&j[k]), "{k}");
    }
}

/// The old, all-in-memory `limit` JSON (before streaming), kept here as the reference.
fn old_matrix_json(m: &DMatrix<f64>) -> Value {
    let num = |v: f64| serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number);
    Value::Array(
        (0..m.nrows())
            .map(|i| Value::Array((0..m.ncols()).map(|j| num(m[(i, j)])).collect()))
            .collect(),
    )
}

fn old_limit_json(r: &tpc::limit::LimitResult) -> Value {
    let num = |v: f64| serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number);
    let mut obs = Map::new();
    for (name, v) in &r.observe {
        obs.insert(
            name.clone(),
            if v.len() == 1 {
                num(v[0])
            } else {
                Value::Array(v.iter().map(|x| num(*x)).collect())
            },
        );
    }
    let mut out = json!({
        "outputs": r.outputs,
        "points": r.points,
        "nngp": r.nngp.as_ref().map(old_matrix_json),
        "ntk": r.ntk.as_ref().map(old_matrix_json),
        "observe": obs,
    });
    if let Some(regime) = &r.regime {
        out["regime"] = json!(regime);
    }
    out["methods"] = json!(r.methods);
    out["max_error"] = num(r.max_error);
    out
}

#[test]
fn streamed_json_is_byte_identical_to_the_old_value() {
    let src = std::fs::read_to_string(common::example_path("mlp3")).expect("example");
    let pts: Vec<Vec<f64>> = (0..5).map(|i| vec![-1.0 + 0.5 * i as f64]).collect();
    let r = tpc::limit_of(&src, &pts).expect("limit");
    assert!(r.train.is_none() && r.nngp_note.is_none());
    let want = serde_json::to_string_pretty(&old_limit_json(&r)).expect("json") + "\n";
    let mut got = Vec::new();
    tpc::report::limit::tree(&r)
        .write_pretty(&mut got)
        .expect("in memory");
    assert_eq!(String::from_utf8(got).expect("utf8"), want);
    // And the binary prints the same bytes.
    let dir = tmp("stream");
    let csv = dir.join("p.csv");
    std::fs::write(&csv, "-1\n-0.5\n0\n0.5\n1\n").expect("csv");
    let o = tpc(&[
        "limit",
        common::example_path("mlp3").to_str().expect("utf8"),
        "--inputs",
        csv.to_str().expect("utf8"),
        "--format",
        "json",
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), want);
}

#[test]
fn text_summarizes_kernels_over_twelve_rows() {
    let dir = tmp("text");
    let mlp = common::example_path("mlp3").display().to_string();
    let small = points_csv(&dir, tpc::report::limit::TEXT_FULL_MAX);
    let o = tpc(&["limit", &mlp, "--inputs", &small]);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(!t.contains("summarized"), "{t}");
    assert!(t.contains("f(p12)"), "{t}");
    let big = points_csv(&dir, 40);
    let o = tpc(&["limit", &mlp, "--inputs", &big]);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(t.contains("40×40 (summarized"), "{t}");
    assert!(t.contains("off-diagonal: min"), "{t}");
    assert!(t.contains("top-left 6×6 block"), "{t}");
    assert!(!t.contains("f(p7)"), "{t}");
    assert!(t.lines().count() < 80, "{t}");
    let o = tpc(&[
        "run", &mlp, "--inputs", &big, "--width", "8", "--seeds", "2",
    ]);
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.contains("40×40 (summarized") && t.contains("largest standard error"),
        "{t}"
    );
}

#[test]
fn every_failure_under_format_json_prints_one_json_object() {
    let dir = tmp("errors");
    let bad = dir.join("bad.tp");
    std::fs::write(&bad, "width n\nx = 1 +\n").expect("write");
    let bad_csv = dir.join("bad.csv");
    std::fs::write(&bad_csv, "1\nabc\n").expect("write");
    let mlp = common::example_path("mlp3").display().to_string();
    // f = v @ (1/h): the NNGP E[1/Z²] does not exist (E0031, a limit refusal).
    let inv = dir.join("inv.tp");
    let src = std::fs::read_to_string(common::example_path("mlp3")).expect("example");
    std::fs::write(&inv, src.replace("x2 = relu(h2)", "x2 = 1 / h2")).expect("write");
    let inv = inv.display().to_string();
    let b = bad.display().to_string();
    let c = bad_csv.display().to_string();
    std::fs::write(dir.join("ok.csv"), "1\n").expect("write");
    let ok = c.replace("bad.csv", "ok.csv");
    let cases: Vec<(Vec<&str>, Option<&str>)> = vec![
        (vec!["limit", &b], Some("E0001")),
        (
            vec!["run", &b, "--width", "4", "--seeds", "2"],
            Some("E0001"),
        ),
        (vec!["graph", &b], Some("E0001")),
        (vec!["limit", &mlp, "--inputs", &c], None),
        (vec!["limit", &mlp], None),
        (vec!["limit", "/nonexistent/x.tp"], None),
        (vec!["compare", &mlp, "--widths", "8,8"], None),
        (vec!["limit", &inv, "--inputs", &ok], Some("E0031")),
    ];
    for (args, code) in cases {
        let o = tpc(&[&args[..], &["--format", "json"]].concat());
        let shown = format!("{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(!o.status.success(), "{shown}");
        assert!(
            !o.stderr.is_empty(),
            "the rendered text stays on stderr: {shown}"
        );
        let v: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{shown}: stdout is not one JSON value ({e})"));
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(!msg.is_empty(), "{shown}: {v}");
        assert!(v["diagnostics"].is_array(), "{shown}");
        if let Some(code) = code {
            assert_eq!(v["error"]["code"], code, "{shown}");
            assert!(v["error"]["line"].as_u64() > Some(1), "{shown}");
            assert!(v["error"]["span"].is_array(), "{shown}");
        }
    }
    // Without --format json, stdout stays empty.
    let o = tpc(&["limit", &b]);
    assert!(o.stdout.is_empty());
}
