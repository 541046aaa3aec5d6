//! Issue 12, items 1, 4 and 8: at finite width tpc never prints a wrong number with
//! exit 0 and never aborts. Overflowing training is a diagnostic (both engines), a run
//! that cannot fit is refused before it allocates (saying what fits), and input files
//! are read to their size limit plus one byte at most.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tpc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tpc"))
        .args(args)
        .output()
        .expect("tpc runs")
}

/// A fresh directory for this test's files.
fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tpc_refusals_{tag}_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The repository's `examples/sgd_mlp.tp` with its learning rate replaced.
fn sgd_mlp_with_lr(dir: &Path, lr: &str) -> PathBuf {
    let src = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/sgd_mlp.tp"),
    )
    .unwrap();
    assert!(src.contains("lr    = 0.5"), "the example changed");
    let file = dir.join(format!("sgd_lr{lr}.tp"));
    std::fs::write(&file, src.replace("lr    = 0.5", &format!("lr    = {lr}"))).unwrap();
    file
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A refusal: exit 1, no numbers on stdout (nothing, or under `--format json` only the
/// error object of issue 18, with its code), the code on stderr.
fn assert_refused(o: &Output, code: &str) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    if !o.stdout.is_empty() {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}",
                String::from_utf8_lossy(&o.stdout)
            )
        });
        assert_eq!(v["error"]["code"], code, "a refusal prints no numbers: {v}");
        assert!(v.get("nngp").is_none(), "a refusal prints no numbers: {v}");
    }
    assert!(err.contains(code), "expected {code}: {err}");
    err
}

/// Issue 12.1: lr = 1e3 at width 256 printed `1.466e163 ± inf` (dense) with exit 0,
/// and lr = 1e10 `-3.47e159 ± inf` then `0 ± 0` (conditional). The engines now stop at
/// the step that overflows, point at the value and the learning rate, and say what to
/// do. At lr = 1e3 most draws of *either* engine end with every relu dead and f_3 = 0
/// exactly (dense: 8 of seeds 0–9; conditional: 11 of 0–11); that zero is the dynamics,
/// not an overflow. The draws that do overflow are refused on both engines
/// ([`the_conditional_engine_refuses_its_overflowing_draw`]).
#[test]
fn divergent_training_is_a_diagnostic_on_both_engines() {
    let dir = temp_dir("lr");
    for (lr, engines) in [
        ("1e3", &["dense"][..]),
        ("1e10", &["dense", "conditional"][..]),
    ] {
        let file = sgd_mlp_with_lr(&dir, lr);
        for &engine in engines {
            let o = tpc(&[
                "run",
                file.to_str().unwrap(),
                "--width",
                "256",
                "--seeds",
                "4",
                "--engine",
                engine,
            ]);
            let err = assert_refused(&o, "E0035");
            assert!(err.contains("training"), "{engine}, lr {lr}: {err}");
            assert!(
                err.contains("learning rate is too large for this width"),
                "{engine}, lr {lr}: {err}"
            );
            assert!(
                err.contains(&format!("learning rate {}", lr.parse::<f64>().unwrap())),
                "{err}"
            );
            assert!(!err.contains("± inf") && !err.contains("0.00e0"), "{err}");
        }
    }
}

/// The same learning rate in JSON: no `null` standard error, a refusal instead.
#[test]
fn divergent_training_prints_no_json() {
    let dir = temp_dir("json");
    let file = sgd_mlp_with_lr(&dir, "1e10");
    let o = tpc(&[
        "run",
        file.to_str().unwrap(),
        "--width",
        "64",
        "--seeds",
        "2",
        "--engine",
        "conditional",
        "--format",
        "json",
    ]);
    assert_refused(&o, "E0035");
}

/// Issue 12.4: 10^5 points made `run` abort (`memory allocation of 80000000000 bytes
/// failed`, rc 134): the O·P × O·P kernels. It is refused up front with the number of
/// points that fit.
#[test]
fn too_many_points_are_refused_with_how_many_fit() {
    let dir = temp_dir("points");
    let csv = dir.join("x.csv");
    let rows: String = (0..100_000)
        .map(|i| format!("{}\n", (i % 7) as f64 * 0.25 - 0.75))
        .collect();
    std::fs::write(&csv, rows).unwrap();
    let mlp = common::example_path("mlp3");
    for engine in ["dense", "conditional"] {
        let t = Instant::now();
        let o = tpc(&[
            "run",
            mlp.to_str().unwrap(),
            "--width",
            "64",
            "--seeds",
            "2",
            "--inputs",
            csv.to_str().unwrap(),
            "--engine",
            engine,
        ]);
        let err = assert_refused(&o, "E0037");
        assert!(err.contains("100000 points"), "{err}");
        assert!(err.contains("points fit at width 64"), "{err}");
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "refused only after {:?}",
            t.elapsed()
        );
    }
}

/// Issue 12.8: the dense engine's memory refusal names the conditional engine when that
/// would fit (no N×N matrix at width 10^6).
#[test]
fn the_dense_refusal_suggests_the_conditional_engine() {
    let mlp = common::example_path("mlp3");
    let x1 = common::refs_dir().join("programs/X1.csv");
    let o = tpc(&[
        "run",
        mlp.to_str().unwrap(),
        "--width",
        "1000000",
        "--seeds",
        "1",
        "--inputs",
        x1.to_str().unwrap(),
    ]);
    let err = assert_refused(&o, "E0037");
    assert!(err.contains("the largest width that fits is"), "{err}");
    assert!(err.contains("--engine conditional"), "{err}");
}

/// Issue 12.4: `coord-check --steps` is capped like a `train` block's `steps` (1000).
#[test]
fn coord_check_steps_are_capped_like_train_steps() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/sgd_mlp.tp");
    let o = tpc(&[
        "coord-check",
        file.to_str().unwrap(),
        "--steps",
        "1000000",
        "--no-svg",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("1000"), "{}", stderr(&o));
}

/// Runs tpc with a deadline; a hang is a failure, not a stuck test.
fn tpc_within(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tpc"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tpc runs");
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("tpc {args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 12.4: `tpc check /dev/zero` read ≈ 3 GB and `/dev/urandom` hung; both are
/// read to the 4 MiB limit plus one byte and refused.
#[test]
fn endless_files_are_refused_after_the_size_limit() {
    for dev in ["/dev/zero", "/dev/urandom"] {
        if !Path::new(dev).exists() {
            continue;
        }
        for cmd in ["check", "graph"] {
            let o = tpc_within(&[cmd, dev], Duration::from_secs(20));
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(1), "{cmd} {dev}: {err}");
            assert!(err.contains("larger than 4 MiB"), "{cmd} {dev}: {err}");
        }
        let mlp = common::example_path("mlp3");
        let o = tpc_within(
            &[
                "run",
                mlp.to_str().unwrap(),
                "--width",
                "4",
                "--seeds",
                "1",
                "--inputs",
                dev,
            ],
            Duration::from_secs(20),
        );
        assert_eq!(o.status.code(), Some(1), "--inputs {dev}: {}", stderr(&o));
        assert!(stderr(&o).contains("larger than 64 MiB"), "{}", stderr(&o));
    }
}

/// Draw 0 of seed 2 at lr = 1e3 overflows on the conditional engine (f reaches ~7e163
/// in the unrolled step 3, as draws 0 and 3 do on the dense one): an E0035, not a number.
#[test]
fn the_conditional_engine_refuses_its_overflowing_draw() {
    let dir = temp_dir("cond_seed");
    let file = sgd_mlp_with_lr(&dir, "1e3");
    let run = |seed: &str| {
        tpc(&[
            "run",
            file.to_str().unwrap(),
            "--width",
            "256",
            "--seeds",
            "1",
            "--seed",
            seed,
            "--engine",
            "conditional",
        ])
    };
    let err = assert_refused(&run("2"), "E0035");
    assert!(err.contains("beyond ±1e150"), "{err}");
    // A draw whose relus all die reports f_3 = 0, which is its value.
    let o = run("0");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("inf") && !out.contains("NaN"), "{out}");
}

/// Issue 12.1, the conditional engine at lr = 1e3, 4 draws: every draw ends with its
/// relus dead and f_3 = 0 exactly after |f_2| ≈ 1e34, which is what these networks
/// compute — but printed alone, `0 ± 0` reads as converged training. The run now warns
/// (W0105) at the learning rate that training diverged, with the size reached; the
/// bundled lr = 0.5 gets no such warning.
#[test]
fn a_diverging_trajectory_is_flagged_at_the_learning_rate() {
    let dir = temp_dir("diverging");
    let file = sgd_mlp_with_lr(&dir, "1e3");
    let f = file.to_str().unwrap();
    let args = [
        "run",
        f,
        "--width",
        "256",
        "--seeds",
        "4",
        "--engine",
        "conditional",
    ];
    let o = tpc(&args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("warning[W0105]: training diverges at width 256"),
        "{err}"
    );
    assert!(
        err.contains("lr    = 1e3"),
        "the warning points at the lr line: {err}"
    );
    let ok = sgd_mlp_with_lr(&dir, "0.5");
    let o = tpc(&[
        "run",
        ok.to_str().unwrap(),
        "--width",
        "256",
        "--seeds",
        "4",
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert!(!stderr(&o).contains("W0105"), "{}", stderr(&o));
}
