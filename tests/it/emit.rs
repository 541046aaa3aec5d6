//! `tpc emit --target torch` (issue 17): every example, emitted, imported by PyTorch and
//! run on the parameters `tpc run --save-params` writes, gives the outputs, the NTK
//! Gram (by autograd) and the training trajectory of tpc's finite executor on the same
//! draw to 1e-10 relative (float64 on both sides: what remains is rounding, ~1e-14); the
//! emitted code passes `python -m py_compile` and `ruff check`.
//!
//! Python comes from `tests/emit/venv.sh` (a venv with CPU torch, numpy and ruff; `.ci/run`
//! makes it and exports `TPC_EMIT_PYTHON`). Without it the Python tests skip with a
//! message on stderr; with `TPC_EMIT_REQUIRE=1` they fail instead.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use tpc::emit::{emit, npz::params_npz, Target};
use tpc::finite::exec::{run_one, RunConfig};
use tpc::finite::train::train_one;
use tpc::ir::Program;

/// Width and seed of the compared draw (draw 0 of seed SEED).
const WIDTH: usize = 24;
const SEED: u64 = 3;
/// Relative agreement asked of every quantity: max |emitted − tpc| ≤ TOL · max |tpc|.
const TOL: f64 = 1e-10;

/// The venv's python, or None (with the reason printed) when there is none.
fn python() -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("TPC_EMIT_PYTHON") {
        Some(p) if !p.is_empty() => vec![PathBuf::from(p)],
        // tests/emit/venv.sh's default place
        _ => {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
            cache
                .map(|c| c.join("tpc/emit-venv/bin/python"))
                .into_iter()
                .collect()
        }
    };
    if let Some(p) = candidates.into_iter().find(|p| p.exists()) {
        return Some(p);
    }
    let msg =
        "SKIP emit: no Python venv with torch (run tests/emit/venv.sh and set TPC_EMIT_PYTHON)";
    assert!(
        std::env::var("TPC_EMIT_REQUIRE").ok().as_deref() != Some("1"),
        "{msg}"
    );
    eprintln!("{msg}");
    None
}

/// Points of a case: the training inputs with a `train` block, else three fixed rows.
fn rows(prog: &Program) -> Vec<Vec<f64>> {
    if prog.train.is_some() {
        return common::train_inputs(prog);
    }
    if prog.inputs.is_empty() {
        return vec![vec![]];
    }
    let len: usize = prog.inputs.iter().map(|i| i.row_len()).sum();
    (0..3)
        .map(|k| {
            (0..len)
                .map(|j| ((k * 7 + j * 3) % 11) as f64 / 5.0 - 1.0)
                .collect()
        })
        .collect()
}

/// Every example and the two test programs that reach the remaining rules (a matrix
/// used forward and transposed, a scalar bias, constants, two outputs, two targets).
fn cases() -> Vec<(String, Program)> {
    let mut out: Vec<(String, Program)> = common::examples()
        .into_iter()
        .map(|(name, src)| {
            let prog = tpc::compile(&src).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, prog)
        })
        .collect();
    for (name, src) in [
        ("every_rule", common::EVERY_RULE),
        ("mup_linear", common::MUP_LINEAR),
    ] {
        out.push((name.to_string(), tpc::compile(src).unwrap()));
    }
    out
}

fn max_rel(name: &str, what: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{name}: {what}: {got:?} vs {want:?}");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    let rel = err / scale;
    assert!(
        rel <= TOL,
        "{name}: {what}: relative error {rel:.3e} > {TOL:e}\n emitted {got:?}\n tpc     {want:?}"
    );
    rel
}

fn flat(v: &serde_json::Value) -> Vec<f64> {
    match v {
        serde_json::Value::Array(a) => a.iter().flat_map(flat).collect(),
        serde_json::Value::Number(x) => vec![x.as_f64().unwrap()],
        other => panic!("not a number: {other}"),
    }
}

fn row_major(m: &tpc::nalgebra::DMatrix<f64>) -> Vec<f64> {
    (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)]))
        .collect()
}

fn run_python(py: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new(py).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{} {}: {}\n{}",
        py.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The test's scratch directory.
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tpc-emit-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every example, emitted for torch, equals tpc on draw 0 of seed 3 at width 24:
/// outputs, observes, the NTK Gram and f_t to 1e-10 relative; py_compile and ruff pass.
#[test]
fn emitted_torch_modules_match_tpc_on_saved_parameters() {
    if let Some(py) = python() {
        check_target(&py, Target::Torch, "check.py");
    }
}

/// The same for `--target jax` (params pytree, `jax.grad` training, the NTK by
/// `jax.jacrev`), when the venv has JAX.
#[test]
fn emitted_jax_modules_match_tpc_on_saved_parameters() {
    let Some(py) = python() else { return };
    let has_jax = Command::new(&py)
        .args(["-c", "import jax"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_jax {
        let msg = "SKIP emit jax: the venv has no jax (tests/emit/venv.sh installs it)";
        assert!(
            std::env::var("TPC_EMIT_REQUIRE").ok().as_deref() != Some("1"),
            "{msg}"
        );
        eprintln!("{msg}");
        return;
    }
    check_target(&py, Target::Jax, "check_jax.py");
}

fn check_target(py: &Path, target: Target, checker: &str) {
    let py = py.to_path_buf();
    let dir = scratch(&format!("{target:?}"));
    let mut manifest = Vec::new();
    let mut refs = Vec::new();
    let mut modules = Vec::new();
    for (name, prog) in cases() {
        let module = dir.join(format!("{name}.py"));
        std::fs::write(&module, emit(&prog, target, &format!("{name}.tp"), None)).unwrap();
        let npz = dir.join(format!("{name}.npz"));
        std::fs::write(&npz, params_npz(&prog, WIDTH, SEED, 0).unwrap()).unwrap();
        let rows = rows(&prog);
        let draw =
            run_one(&prog, &rows, WIDTH, SEED, 0).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let traj = prog.train.as_ref().map(|_| {
            let cfg = RunConfig {
                width: WIDTH,
                seeds: 1,
                seed: SEED,
            };
            train_one(&prog, &rows, &cfg, 0).unwrap_or_else(|e| panic!("{name}: {e:?}"))
        });
        manifest.push(serde_json::json!({
            "module": module, "npz": npz, "rows": rows, "width": WIDTH, "train": traj.is_some(),
        }));
        modules.push(module.display().to_string());
        refs.push((name, prog, draw, traj));
    }
    let mpath = dir.join("manifest.json");
    std::fs::write(&mpath, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let script = common::manifest().join("tests/emit").join(checker);
    let out = run_python(&py, &[script.to_str().unwrap(), mpath.to_str().unwrap()]);
    let got: Vec<serde_json::Value> = serde_json::from_slice(&out).unwrap();
    let mut worst = 0.0f64;
    for ((name, prog, draw, traj), g) in refs.iter().zip(&got) {
        worst = worst.max(max_rel(
            name,
            "outputs",
            &flat(&g["f"]),
            &row_major(&draw.f),
        ));
        if !prog.outputs.is_empty() {
            worst = worst.max(max_rel(
                name,
                "ntk",
                &flat(&g["ntk"]),
                &row_major(&draw.ntk),
            ));
        }
        for (k, &o) in prog.observes.iter().enumerate() {
            let label = prog.label(o);
            let mut e = flat(&g["observe"][&label]);
            let w = &draw.observe[k];
            if e.len() == 1 && w.len() > 1 {
                e = vec![e[0]; w.len()];
            }
            worst = worst.max(max_rel(name, &format!("observe {label}"), &e, w));
        }
        if let Some(t) = traj {
            worst = worst.max(max_rel(name, "f_t", &flat(&g["f_t"]), &row_major(t)));
        }
    }
    eprintln!(
        "emit {target:?}: {} programs, worst relative difference {worst:.2e}",
        refs.len()
    );
    let mut args = vec!["-m", "py_compile"];
    args.extend(modules.iter().map(String::as_str));
    run_python(&py, &args);
    let ruff = py.with_file_name("ruff");
    let out = Command::new(&ruff)
        .args(["check", "--no-cache", "--isolated"])
        .args(&modules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ruff check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tpc run --save-params` writes draw 0 of the run's seed: the bytes of
/// `params_npz`, whatever `--seeds`.
#[test]
fn run_save_params_writes_draw_zero() {
    let dir = scratch("save");
    let path = dir.join("p.npz");
    let file = common::example_path("sgd_mlp");
    common::tpc_ok(
        &[
            "run",
            file.to_str().unwrap(),
            "--width",
            "16",
            "--seeds",
            "3",
            "--seed",
            "5",
            "--save-params",
            path.to_str().unwrap(),
        ],
        None,
    );
    let prog = tpc::compile(&common::example("sgd_mlp")).unwrap();
    let want = params_npz(&prog, 16, 5, 0).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), want);
    let _ = std::fs::remove_dir_all(&dir);
}
