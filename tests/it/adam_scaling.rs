//! Adam's abcd exponents in `tpc check` and `tpc coord-check` (issue 15, Diagnostics).
//!
//! * sp_adam.tp (SP + Adam at a width-independent lr): W0107 at `W`'s and `v`'s `lr`,
//!   with `W @ h1` moving by Θ(n) per coordinate and `f` by Θ(n^(1/2)) (the readout's
//!   own Θ(n) step meets features the hidden step saturated), and W0109 for ε = 1e-8
//!   against `U`'s Θ(n^(-1/2)) gradient entries;
//! * adam_mlp.tp (muP for Adam, ε ∝ 1/n): no warning, feature learning, muP;
//! * the same with ε = 1e-8 fixed: W0109 at the ε argument, with the exponent the
//!   fix needs (Θ(n^(-1))), still feature learning at practical widths;
//! * SGD's muP learning rates written out under Adam: W0108 on `U` and `W` with the Adam
//!   lrs; not on `v`, whose SGD and Adam muP laws coincide; the `mup` preset under Adam
//!   takes Adam's column itself (same laws as adam_mlp.tp, no warning);
//! * coord-check on sp_adam.tp measures every predicted exponent of the first step
//!   within ±0.15 (CI size: N = 256..2048, 8 draws; `#[ignore]`d: N = 512..4096).

use crate::common;

use std::path::{Path, PathBuf};

use serde_json::Value;
use tpc::scaling::{self, Regime};

fn codes(src: &str) -> Vec<&'static str> {
    let (prog, diags) = tpc::check_source(src);
    assert!(prog.is_some(), "{diags:?}");
    diags.iter().map(|d| d.code).collect()
}

fn rendered(name: &str, src: &str) -> String {
    let (_, diags) = tpc::check_source(src);
    for d in &diags {
        if d.severity == tpc::diag::Severity::Warning {
            assert!(d.help.is_some(), "{name}: {} without help", d.code);
        }
    }
    tpc::error_for(&format!("{name}.tp"), src, diags).render()
}

fn compile(src: &str) -> tpc::ir::Program {
    tpc::compile(src).unwrap()
}

fn eps_fixed() -> String {
    common::example("adam_mlp").replace("1e-8 * n^(-1)", "1e-8")
}

const MUP_SGD_UNDER_ADAM: &str =
    "# muP's SGD learning rates (language.md's `mup` table) trained with Adam.
width n
input x : 2

param U : n x 2 ~ N(0, 1/2)   lr n
param W : n x n ~ N(0, 1/n)
param v : 1 x n ~ N(0, 1/n^2) lr n^(-1)

h1 = tanh(U @ x)
h2 = tanh(W @ h1)
output f = v @ h2

train {
    loss      = mse
    lr        = 0.05
    steps     = 2
    optimizer = adam(0.9, 0.999, 1e-8 * n^(-1))
    data      = [ ([1.0, 0.0], 1.0), ([0.0, 1.0], -1.0) ]
}
";

#[test]
fn sp_adam_blows_up_at_the_hidden_and_readout_lr() {
    let src = common::example("sp_adam");
    assert_eq!(codes(&src), ["W0107", "W0107", "W0109"]);
    let (_, diags) = tpc::check_source(&src);
    // at the `lr 1` of W's and v's laws
    for (d, line) in diags.iter().zip(["param W", "param v"]) {
        let at = src.find(line).unwrap();
        let lr = at + src[at..].find("lr 1").unwrap();
        assert_eq!((d.span.start, d.span.end), (lr, lr + 4), "{}", d.message);
    }
    assert!(diags[0].message.contains("`W @ h1` by Θ(n) per coordinate"));
    assert!(diags[0].message.contains("`f` by Θ(n^(1/2))"));
    assert!(diags[0].help.as_deref().unwrap().contains("lr n^(-1)"));
    assert!(diags[1]
        .help
        .as_deref()
        .unwrap()
        .contains("N(0, n^(-2)) lr n^(-1)"));
    let prog = compile(&src);
    assert_eq!(scaling::regime(&prog), Some(Regime::Unstable));
    insta::assert_snapshot!("sp_adam", rendered("sp_adam", &src));
}

#[test]
fn mup_adam_gets_no_warning_and_learns_features() {
    let src = common::example("adam_mlp");
    assert_eq!(codes(&src), ["N0102"]);
    let prog = compile(&src);
    assert_eq!(scaling::regime(&prog), Some(Regime::FeatureLearning));
    let ex = scaling::exponents(&prog);
    let cls = scaling::classify(&prog, &ex).unwrap();
    assert!(cls.mup, "{cls:?}");
    for p in &prog.params {
        assert!(scaling::is_adam_mup_law(p.role(), &p.law), "{}", p.name);
    }
    insta::assert_snapshot!("adam_mlp", rendered("adam_mlp", &src));
}

#[test]
fn a_width_independent_eps_freezes_the_hidden_layers() {
    let src = eps_fixed();
    assert_eq!(codes(&src), ["W0109", "N0102"]);
    let (_, diags) = tpc::check_source(&src);
    let d = &diags[0];
    let at = src.find("1e-8)").unwrap();
    assert_eq!((d.span.start, d.span.end), (at, at + 4));
    assert!(
        d.message.contains("`U`") && d.message.contains("`W`"),
        "{}",
        d.message
    );
    assert!(!d.message.contains("`v`"), "{}", d.message);
    let help = d.help.as_deref().unwrap();
    assert!(
        help.contains("Θ(n^(-1))") && help.contains("`1e-8 * n^(-1)`"),
        "{help}"
    );
    insta::assert_snapshot!("eps_fixed", rendered("eps_fixed", &src));
    // with ε = 1e-3 it takes over at n ≈ 10^3: the exponents count it (kernel regime)
    let big = src.replace("adam(0.9, 0.999, 1e-8)", "adam(0.9, 0.999, 1e-3)");
    assert_eq!(codes(&big), ["W0109", "N0101"]);
    assert_eq!(scaling::regime(&compile(&big)), Some(Regime::Kernel));
}

#[test]
fn sgd_mup_learning_rates_under_adam() {
    assert_eq!(codes(MUP_SGD_UNDER_ADAM), ["W0108", "W0108"]);
    let (_, diags) = tpc::check_source(MUP_SGD_UNDER_ADAM);
    assert!(diags[0].message.contains("`U`") && diags[0].label.contains("lr 1"));
    assert!(diags[1].message.contains("`W`") && diags[1].label.contains("lr n^(-1)"));
    insta::assert_snapshot!(
        "mup_sgd_under_adam",
        rendered("mup_sgd_under_adam", MUP_SGD_UNDER_ADAM)
    );
}

/// The abc symmetry of Adam: `(a, b, c) ~ (a + t, b − t, c − t)` keeps muP for Adam
/// (with ε shrunk by `n^(-t)` too: w's gradient is `mult · ∂L/∂W`).
#[test]
fn adam_mup_up_to_its_symmetry() {
    let src = common::example("adam_mlp")
        .replace(
            "param W : n x n ~ N(0, 1/n)   lr n^(-1)",
            "param W : n x n ~ N(0, 1) * n^(-1/2) lr n^(-1/2)",
        )
        .replace("1e-8 * n^(-1)", "1e-8 * n^(-3/2)");
    assert_eq!(codes(&src), ["N0102"]);
    let prog = compile(&src);
    let ex = scaling::exponents(&prog);
    assert!(scaling::classify(&prog, &ex).unwrap().mup);
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("adam_scaling_{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn coord(file: &Path, widths: &str, seeds: &str) -> Value {
    coord_steps(file, widths, seeds, "1")
}

fn coord_steps(file: &Path, widths: &str, seeds: &str, steps: &str) -> Value {
    let file = file.display().to_string();
    common::tpc_json(&[
        "coord-check",
        &file,
        "--widths",
        widths,
        "--seeds",
        seeds,
        "--steps",
        steps,
        "--format",
        "json",
        "--no-svg",
    ])
}

/// Every curve is predicted and agrees within ±0.15 (coord-check's own flag, with
/// the slope's standard error under 0.15 too); the check's figures are among them.
fn assert_all_agree(v: &Value) {
    let curves = v["curves"].as_array().unwrap();
    assert_eq!(curves.len(), 5 + 10, "{v}");
    for c in curves {
        assert_eq!(c["status"], "ok", "{c}");
    }
    let pred = |q: &str, kind: &str| {
        curves
            .iter()
            .find(|c| c["step"] == 1 && c["quantity"] == q && c["kind"] == kind)
            .map(|c| c["predicted"].as_str().unwrap().to_string())
            .unwrap()
    };
    // W0107's figures
    assert_eq!(pred("W @ h1", "change"), "1");
    assert_eq!(pred("f", "change"), "1/2");
}

/// CI size: the first step's blow-up is set by `lr · n` (W's step moves `W @ h1` by
/// about `lr · n · E|h1|`), so sp_adam.tp at lr 0.08 and N = 128..1024 is in the regime
/// the example reaches at N ≈ 1024..8192 (at lr 0.01 and N ≤ 2048 the saturation of
/// `h2` has not set in: its change still grows, slope 0.29 ± 0.11). 16 draws: `f` at
/// initialization has a slope SE of 0.09 (0.18 with 8). 1.6 s here.
#[test]
fn coord_check_confirms_sp_adam() {
    let dir = scratch("ci");
    let src = common::example("sp_adam");
    assert!(src.contains("lr        = 0.01"));
    let file = dir.join("sp_adam_fast.tp");
    std::fs::write(&file, src.replace("lr        = 0.01", "lr        = 0.08")).unwrap();
    assert_all_agree(&coord(&file, "128,256,512,1024", "16"));
}

/// The example itself at N = 512..4096 (8 draws; about 25 s and 1.3 GB here).
#[test]
#[ignore = "heavy: widths up to 4096"]
fn coord_check_confirms_sp_adam_wide() {
    let file = common::example_path("sp_adam");
    assert_all_agree(&coord(&file, "512,1024,2048,4096", "8"));
}

/// `lr = c * n^p` (README, "Training: optimizers"): the power of the width joins every
/// parameter's lr multiplier, so it trains exactly as the per-parameter form.
#[test]
fn global_lr_as_a_monomial_in_the_width() {
    let per_param = common::example("adam_mlp");
    let global = per_param
        .replace(
            "param U : n x 2 ~ N(0, 1/2)",
            "param U : n x 2 ~ N(0, 1/2)   lr n",
        )
        .replace("lr n^(-1)", "lr 1")
        .replace("lr        = 0.05", "lr        = 0.05 * n^(-1)");
    assert_ne!(per_param, global);
    let dir = scratch("lr_mono");
    let run = |name: &str, src: &str| {
        let f = dir.join(name);
        std::fs::write(&f, src).unwrap();
        let f = f.display().to_string();
        common::tpc_ok(
            &[
                "run", &f, "--width", "64", "--seeds", "2", "--format", "json",
            ],
            None,
        )
    };
    assert_eq!(run("a.tp", &per_param), run("b.tp", &global));
    assert_eq!(codes(&global), ["N0102"]);
    let prog = compile(&global);
    assert!(prog
        .params
        .iter()
        .all(|p| scaling::is_adam_mup_law(p.role(), &p.law)));
    // a non-monomial is refused with E0052, a non-positive rate with E0021
    for (bad, code) in [("0.05 + n", "E0052"), ("-0.05 * n^(-1)", "E0021")] {
        let src = global.replace("0.05 * n^(-1)", bad);
        let (prog, diags) = tpc::check_source(&src);
        assert!(prog.is_none());
        assert!(diags.iter().any(|d| d.code == code), "{bad}: {diags:?}");
    }
}

/// `tpc run --format json` names the optimizer and its hyperparameters beside
/// cli.md's `f_t`, `f_t_se` (which stay as they are).
#[test]
fn run_json_names_the_optimizer() {
    let json = |name: &str| -> Value {
        let f = common::example_path(name).display().to_string();
        common::tpc_json(&[
            "run", &f, "--width", "32", "--seeds", "2", "--format", "json",
        ])
    };
    let a = json("adam_mlp");
    let t = &a["train"];
    assert!(t["f_t"].is_array() && t["f_t_se"].is_array());
    assert_eq!(t["optimizer"]["name"], "adam");
    assert_eq!(t["optimizer"]["beta1"], 0.9);
    assert_eq!(t["optimizer"]["beta2"], 0.999);
    assert_eq!(t["optimizer"]["eps"]["law"], "1e-8 * n^(-1)");
    assert_eq!(t["optimizer"]["eps"]["value"], 1e-8 / 32.0);
    assert_eq!(t["weight_decay"], 0.0);
    assert_eq!(t["batch"], 3);
    let m = json("momentum_rnn");
    assert_eq!(m["train"]["optimizer"]["name"], "momentum");
    assert_eq!(m["train"]["optimizer"]["beta"], 0.9);
    assert_eq!(m["train"]["batch"], 2);
    let s = json("sgd_mlp");
    assert_eq!(s["train"]["optimizer"], serde_json::json!({"name": "sgd"}));
}

/// `regime` in the limit JSON of optimizer programs: every limit result takes it from
/// `scaling::regime`, which reads Adam's exponents for Adam and SGD's (which momentum
/// keeps) for momentum.
#[test]
fn regime_of_optimizer_programs() {
    let regime = |name: &str| scaling::regime(&compile(&common::example(name)));
    assert_eq!(regime("adam_mlp"), Some(Regime::FeatureLearning));
    assert_eq!(regime("sp_adam"), Some(Regime::Unstable));
    assert_eq!(regime("momentum_rnn"), Some(Regime::FeatureLearning));
    // Adam's limit is the particle engine's nonlinear outer product (adam_limit.rs).
    for name in ["momentum_rnn", "adam_mlp"] {
        let f = common::example_path(name).display().to_string();
        let v = common::tpc_json(&["limit", &f, "--particles", "4096", "--format", "json"]);
        assert_eq!(v["regime"], "feature-learning", "{name}");
    }
}

/// muP + Adam: every size and change Θ(1) at every step (f at initialization
/// Θ(n^(-1/2))), all 25 curves of two steps within ±0.15 (N = 128..1024, 16 draws;
/// with 4 steps all 45 agree, 6.5 s under load 14).
#[test]
fn coord_check_confirms_mup_adam() {
    let v = coord_steps(
        &common::example_path("adam_mlp"),
        "128,256,512,1024",
        "16",
        "2",
    );
    let curves = v["curves"].as_array().unwrap();
    assert_eq!(curves.len(), 5 + 10 + 10, "{v}");
    for c in curves {
        assert_eq!(c["status"], "ok", "{c}");
        let want = if c["step"] == 0 && c["quantity"] == "f" {
            "-1/2"
        } else {
            "0"
        };
        assert_eq!(c["predicted"], want, "{c}");
    }
}

/// `parameterization mup` under `adam` is Tensor Programs V's Adam column (Table 3):
/// the laws of adam_mlp.tp, no warning, feature learning.
#[test]
fn mup_preset_under_adam_is_the_adam_column() {
    let preset = MUP_SGD_UNDER_ADAM
        .replace("input x : 2\n", "parameterization mup\ninput x : 2\n")
        .replace(" ~ N(0, 1/2)   lr n\n", "\n")
        .replace(" ~ N(0, 1/n)\n", "\n")
        .replace(" ~ N(0, 1/n^2) lr n^(-1)\n", "\n");
    assert!(preset.contains("param W : n x n\n"), "{preset}");
    assert_eq!(codes(&preset), ["N0102"], "feature learning, no warning");
    let laws = |p: &tpc::ir::Program| -> Vec<String> {
        p.params
            .iter()
            .map(|q| format!("{}: {:?}", q.name, q.law))
            .collect()
    };
    let explicit = MUP_SGD_UNDER_ADAM
        .replace(" ~ N(0, 1/2)   lr n\n", " ~ N(0, 1/2)\n")
        .replace(" ~ N(0, 1/n)\n", " ~ N(0, 1/n) lr n^(-1)\n");
    assert_eq!(laws(&compile(&preset)), laws(&compile(&explicit)));
    // Under SGD the same preset keeps SGD's column.
    let sgd = preset.replace("    optimizer = adam(0.9, 0.999, 1e-8 * n^(-1))\n", "");
    assert_ne!(laws(&compile(&sgd)), laws(&compile(&explicit)));
}
