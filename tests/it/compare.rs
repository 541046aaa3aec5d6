//! `tpc compare`: the finite executor converges to the limit at rate N^(-1/2).
//!
//! * erf_deep (the done-when, at modest cost): the fitted slope of
//!   rms|draw − limit| against the width is −1/2 within three of its own standard
//!   errors, and that error is small enough (≤ 0.05) that the slope lies in
//!   [−0.65, −0.35];
//! * the SVG is written, well formed enough to start with `<svg` and close, and carries
//!   the caption naming the program; the default file name is `<stem>_convergence.svg`;
//! * the output (text, JSON and SVG) is byte-identical across runs and thread counts;
//! * observes form their own group (semicircle: random-matrix moments, no inputs);
//! * fewer than two widths, or one draw, is a usage error (exit 2).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn erf_deep() -> PathBuf {
    common::example_path("erf_deep")
}

fn erf_points() -> PathBuf {
    manifest().join("tests/data/erf_X5.csv")
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("compare_{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tpc(args: &[&str], dir: &Path, threads: Option<usize>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tpc"));
    c.args(args).current_dir(dir);
    if let Some(t) = threads {
        c.env("RAYON_NUM_THREADS", t.to_string());
    }
    c.output().unwrap()
}

fn ok_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "tpc compare failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn group<'a>(v: &'a Value, key: &str) -> &'a Value {
    v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["quantity"] == key)
        .unwrap_or_else(|| panic!("no {key} group in {v}"))
}

fn slope(v: &Value, key: &str) -> (f64, f64) {
    let f = &group(v, key)["fit"];
    (f["slope"].as_f64().unwrap(), f["se"].as_f64().unwrap())
}

#[test]
fn erf_deep_converges_at_rate_one_over_sqrt_n() {
    let dir = scratch("slope");
    let svg = dir.join("plot.svg");
    let t = std::time::Instant::now();
    let out = tpc(
        &[
            "compare",
            erf_deep().to_str().unwrap(),
            "--inputs",
            erf_points().to_str().unwrap(),
            "--widths",
            "128,256,512,1024,2048",
            "--seeds",
            "48",
            "--format",
            "json",
            "--svg",
            svg.to_str().unwrap(),
        ],
        &dir,
        None,
    );
    let v = ok_json(&out);
    let secs = t.elapsed().as_secs_f64();
    let (b, se) = slope(&v, "nngp");
    let (bk, sek) = slope(&v, "ntk");
    eprintln!("erf_deep in {secs:.1} s: NNGP slope {b:.4} ± {se:.4}, NTK slope {bk:.4} ± {sek:.4}");
    // The tolerance is the fit's own standard error (Monte-Carlo, paired draws, widened
    // by χ²/dof when the line is curved), not a band chosen to pass.
    assert!((b + 0.5).abs() <= 3.0 * se, "NNGP slope {b} ± {se}");
    assert!((bk + 0.5).abs() <= 3.0 * sek, "NTK slope {bk} ± {sek}");
    // Precise enough that three standard errors already put it in the band.
    assert!(se <= 0.05, "NNGP slope error {se} too large to decide");
    assert!((-0.65..=-0.35).contains(&b), "NNGP slope {b}");
    // Every width is reported for both kernels, with finite errors.
    for key in ["nngp", "ntk"] {
        let rows = group(&v, key)["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 5);
        for r in rows {
            for f in [
                "mean_err_max",
                "mean_err_rms",
                "se_rms",
                "draw_rms",
                "draw_rms_se",
            ] {
                assert!(r[f].as_f64().unwrap().is_finite(), "{key} {f}: {r}");
            }
        }
    }
    assert_eq!(v["svg"], svg.to_str().unwrap());
    check_svg(&svg, "erf_deep.tp");
}

fn check_svg(path: &Path, program: &str) {
    let s = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no plot at {}: {e}", path.display()));
    assert!(s.starts_with("<svg"), "{}", &s[..s.len().min(200)]);
    assert!(s.trim_end().ends_with("</svg>"));
    assert!(s.contains(&format!("{program}: finite width vs infinite-width limit")));
    assert!(s.contains("width n"), "x axis label");
    assert!(s.contains("rms |one draw − limit|"), "y axis label");
    assert!(s.contains("reference slope −1/2"));
    assert!(
        s.contains("stroke-dasharray")
            || s.matches("<line").count() + s.matches("<polyline").count() > 10
    );
    // Balanced tags: every opened element is closed (self-closing or paired).
    let opened = s.matches("<text").count();
    assert_eq!(opened, s.matches("</text>").count());
}

#[test]
fn output_is_deterministic_and_the_default_plot_is_named_after_the_program() {
    let mut runs = Vec::new();
    for (i, threads) in [1, 2, 2].into_iter().enumerate() {
        let dir = scratch(&format!("det{i}"));
        let out = tpc(
            &[
                "compare",
                erf_deep().to_str().unwrap(),
                "--inputs",
                erf_points().to_str().unwrap(),
                "--widths",
                "64,32",
                "--seeds",
                "4",
                "--seed",
                "7",
            ],
            &dir,
            Some(threads),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("## NNGP (25 entries)"), "{text}");
        assert!(text.contains("slope: "), "{text}");
        assert!(text.contains("# plot: erf_deep_convergence.svg"), "{text}");
        let plot = dir.join("erf_deep_convergence.svg");
        check_svg(&plot, "erf_deep.tp");
        runs.push((text, std::fs::read(&plot).unwrap()));
    }
    assert!(
        runs.windows(2).all(|w| w[0] == w[1]),
        "output differs between runs"
    );
}

#[test]
fn observes_are_a_group_of_their_own() {
    let dir = scratch("observe");
    let prog = common::example_path("semicircle");
    let out = tpc(
        &[
            "compare",
            prog.to_str().unwrap(),
            "--widths",
            "64,256",
            "--seeds",
            "8",
            "--format",
            "json",
            "--no-svg",
        ],
        &dir,
        None,
    );
    let v = ok_json(&out);
    let g = group(&v, "observe");
    assert_eq!(g["entries"], 8);
    assert_eq!(
        v["groups"].as_array().unwrap().len(),
        1,
        "no outputs, no kernels"
    );
    assert!(g["fit"]["slope"].as_f64().unwrap() < 0.0, "{g}");
    assert_eq!(v["svg"], Value::Null);
    assert!(
        std::fs::read_dir(&dir).unwrap().next().is_none(),
        "--no-svg wrote a file"
    );
}

/// `--engine conditional` (issue 7): the same report from the conditional engine's
/// draws, which reach widths no N×N matrix does; it converges at the same rate.
#[test]
fn the_conditional_engine_converges_at_rate_one_over_sqrt_n() {
    let dir = scratch("conditional");
    let rnn = common::example_path("rnn");
    let pts = manifest().join("examples/rnn_points.csv");
    let args = [
        "compare",
        rnn.to_str().unwrap(),
        "--inputs",
        pts.to_str().unwrap(),
        "--engine",
        "conditional",
        "--widths",
        "256,1024,4096,16384",
        "--seeds",
        "24",
        "--format",
        "json",
        "--no-svg",
    ];
    let v = ok_json(&tpc(&args, &dir, None));
    assert_eq!(v["engine"], "conditional");
    for key in ["nngp", "ntk"] {
        let (b, se) = slope(&v, key);
        eprintln!("rnn conditional {key} slope {b:.4} ± {se:.4}");
        assert!((b + 0.5).abs() <= 3.0 * se, "{key} slope {b} ± {se}");
        assert!(se <= 0.1, "{key} slope error {se} too large to decide");
    }
    // The text names the flag that reproduces a draw with `tpc run`.
    let text_args: Vec<&str> = args[..args.len() - 3].to_vec();
    let mut text_args = text_args;
    text_args.push("--no-svg");
    let out = tpc(&text_args, &dir, Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("`tpc run --seed 0 --engine conditional`'s draw k"),
        "{text}"
    );
}

#[test]
fn too_few_widths_or_draws_is_a_usage_error() {
    let dir = scratch("usage");
    let f = erf_deep();
    let p = erf_points();
    for extra in [
        &["--widths", "256"][..],
        &["--widths", "64,64"],
        &["--seeds", "1"],
    ] {
        let mut args = vec![
            "compare",
            f.to_str().unwrap(),
            "--inputs",
            p.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = tpc(&args, &dir, None);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn each_row_is_what_tpc_run_reports_at_that_width() {
    // Draw k of seed S is `tpc run`'s draw k: the error of the finite mean at width 32
    // equals the one computed from `tpc run` and `tpc limit` JSON.
    let dir = scratch("rows");
    let (f, p) = (erf_deep(), erf_points());
    let (f, p) = (f.to_str().unwrap(), p.to_str().unwrap());
    let cmp = ok_json(&tpc(
        &[
            "compare", f, "--inputs", p, "--widths", "32,64", "--seeds", "4", "--seed", "7",
            "--format", "json", "--no-svg",
        ],
        &dir,
        None,
    ));
    let run = ok_json(&tpc(
        &[
            "run", f, "--inputs", p, "--width", "32", "--seeds", "4", "--seed", "7", "--format",
            "json",
        ],
        &dir,
        None,
    ));
    let lim = ok_json(&tpc(
        &["limit", f, "--inputs", p, "--format", "json"],
        &dir,
        None,
    ));
    let flat = |v: &Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
            .collect()
    };
    for key in ["nngp", "ntk"] {
        let (m, l, se) = (
            flat(&run[key]),
            flat(&lim[key]),
            flat(&run[format!("{key}_se")]),
        );
        let max = m
            .iter()
            .zip(&l)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let se_rms = (se.iter().map(|x| x * x).sum::<f64>() / se.len() as f64).sqrt();
        let row = &group(&cmp, key)["rows"][0];
        assert_eq!(row["width"], 32);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1e-300);
        assert!(
            close(row["mean_err_max"].as_f64().unwrap(), max),
            "{key}: {row} vs {max}"
        );
        assert!(
            close(row["se_rms"].as_f64().unwrap(), se_rms),
            "{key}: {row} vs {se_rms}"
        );
    }
}
