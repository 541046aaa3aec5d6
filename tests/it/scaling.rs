//! Scaling diagnostics (theory.md §5): exponents read off the IR against TP4's closed
//! forms, the §5.4 table of named parameterizations, and every warning's rendering.
//! Snapshots are assertions: each was read when accepted.

use crate::common;

use std::process::Command;

use tpc::ir::{Rational, Role};
use tpc::scaling::{self, classify, exponents, Ex, Regime};

fn r(p: i64, q: i64) -> Rational {
    Rational::new(p, q).unwrap()
}

/// `n^(p)` in the language.
fn npow(p: Rational) -> String {
    if p.is_zero() {
        "1".into()
    } else if p.den() == 1 {
        format!("n^({})", p.num())
    } else {
        format!("n^({}/{})", p.num(), p.den())
    }
}

/// An explicit law with abc exponents (a, b, c) (language.md: a = -p(mult),
/// b = -p(var)/2, c = -p(lr)).
fn law(a: Rational, b: Rational, c: Rational) -> String {
    format!(
        "~ N(0, {}) * {} lr {}",
        npow(-(b * Rational::int(2))),
        npow(-a),
        npow(-c)
    )
}

/// An L-hidden-layer relu MLP on inputs in R^2 with one (a, b, c) per layer
/// (input, hidden..., readout) and one step of SGD.
fn mlp(layers: &[(Rational, Rational, Rational)], steps: usize) -> String {
    let l = layers.len() - 1;
    let mut s = String::from("width n\ninput x : 2\n");
    for (i, &(a, b, c)) in layers.iter().enumerate() {
        let shape = if i == 0 {
            "n x 2"
        } else if i == l {
            "1 x n"
        } else {
            "n x n"
        };
        s.push_str(&format!("param W{} : {shape} {}\n", i + 1, law(a, b, c)));
    }
    s.push_str("h1 = relu(W1 @ x)\n");
    for i in 2..=l {
        s.push_str(&format!("h{i} = relu(W{i} @ h{})\n", i - 1));
    }
    s.push_str(&format!("output f = W{} @ h{l}\n", l + 1));
    s.push_str(&format!(
        "train {{ loss = mse lr = 0.1 steps = {steps} data = [ ([1.0, 0.0], 1.0) ] }}\n"
    ));
    s
}

fn ex_of(e: Ex) -> Rational {
    e.exponent().unwrap_or_else(|| panic!("not a power: {e:?}"))
}

// ---- the named parameterizations of theory.md §5.4 --------------------------------

/// (name, program, regime, r, r_l per hidden-or-input layer, muP detected)
type Named = (
    &'static str,
    String,
    Regime,
    Option<Rational>,
    Vec<Rational>,
    bool,
);

fn named() -> Vec<Named> {
    let (z, h, o) = (Rational::ZERO, Rational::HALF, Rational::ONE);
    let preset = |p: &str| {
        format!(
            "width n\ninput x : 2\nparameterization {p}\nparam U : n x 2\nparam W : n x n\nparam v : 1 x n\n\
             h1 = relu(U @ x)\nh2 = relu(W @ h1)\noutput f = v @ h2\n\
             train {{ loss = mse lr = 0.5 steps = 1 data = [ ([1.0, 0.0], 1.0) ] }}\n"
        )
    };
    vec![
        // SP, lr 1: r = min(1/2, 0) + 0 - 1 + min(1, 0) = -1 at later steps; at step 1 the
        // gradient is n^(-1/2), so h2 moves by n^(1/2) and f by n.
        (
            "sp_lr_1",
            mlp(&[(z, z, z), (z, h, z), (z, h, z)], 1),
            Regime::Unstable,
            Some(-h),
            vec![h, -h],
            false,
        ),
        // SP, lr 1/n: r = 1/2, r_1 = 3/2 (the input layer drops out), kernel.
        (
            "sp_lr_1_over_n",
            mlp(&[(z, z, o), (z, h, o), (z, h, o)], 1),
            Regime::Kernel,
            Some(h),
            vec![r(3, 2), h],
            false,
        ),
        // NTP: a = (0, 1/2, 1/2), b = 0, c = 0: r = 1/2, kernel (K = NTK).
        (
            "ntk",
            mlp(&[(z, z, z), (h, z, z), (h, z, z)], 1),
            Regime::Kernel,
            Some(h),
            vec![h, h],
            false,
        ),
        (
            "ntk_preset",
            preset("ntk"),
            Regime::Kernel,
            Some(h),
            vec![h, h],
            false,
        ),
        // muP (TP4 form): a = (-1/2, 0, 1/2), b = 1/2, c = 0: r = 0, every layer maximal.
        (
            "mup",
            mlp(&[(-h, h, z), (z, h, z), (h, h, z)], 1),
            Regime::FeatureLearning,
            Some(z),
            vec![z, z],
            true,
        ),
        (
            "mup_preset",
            preset("mup"),
            Regime::FeatureLearning,
            Some(z),
            vec![z, z],
            true,
        ),
        // mean-field-like for L = 2: muP shifted by the symmetry to c = -1:
        // a = (0, 1/2, 1), b = 0.
        (
            "mean_field_like",
            mlp(&[(z, z, -o), (h, z, -o), (o, z, -o)], 1),
            Regime::FeatureLearning,
            Some(z),
            vec![z, z],
            true,
        ),
        // MFP for L = 1 (TP4 Table 1): a = (0, 1), b = 0, c = -1.
        (
            "mfp_l1",
            mlp(&[(z, z, -o), (o, z, -o)], 1),
            Regime::FeatureLearning,
            Some(z),
            vec![z],
            true,
        ),
        // SP with lr 1/sqrt(n): the logits grow like sqrt(n) (TP4 §5.1).
        (
            "sp_lr_1_over_sqrt_n",
            mlp(&[(z, z, h), (z, h, h), (z, h, h)], 1),
            Regime::Unstable,
            Some(z),
            vec![o, z],
            false,
        ),
        // Trivial: NTK with lr 1/n moves nothing.
        (
            "ntk_lr_1_over_n",
            mlp(&[(z, z, o), (h, z, o), (h, z, o)], 1),
            Regime::Trivial,
            Some(r(3, 2)),
            vec![r(3, 2), r(3, 2)],
            false,
        ),
    ]
}

#[test]
fn the_named_parameterizations_of_the_table() {
    for (name, src, regime, rr, rl, mup) in named() {
        let prog = tpc::compile(&src).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ex = exponents(&prog);
        let c = classify(&prog, &ex).expect("train");
        assert_eq!(c.regime, regime, "{name}\n{}", scaling::table(&prog));
        assert_eq!(c.mup, mup, "{name}\n{}", scaling::table(&prog));
        if let Some(rr) = rr {
            assert_eq!(
                -ex_of(c.feature),
                rr,
                "{name}: r\n{}",
                scaling::table(&prog)
            );
        }
        let got: Vec<Rational> = prog
            .params
            .iter()
            .zip(&c.params)
            .filter(|(p, _)| p.role() != Role::Output)
            .map(|(_, s)| -ex_of(s.feature))
            .collect();
        assert_eq!(got, rl, "{name}: r_l\n{}", scaling::table(&prog));
        // Table 1: every stable nontrivial row has 2a_{L+1} + c = 1 and a+b+r = 1, i.e.
        // the readout is updated and initialized maximally.
        if matches!(regime, Regime::Kernel | Regime::FeatureLearning) {
            let v = c.params.last().unwrap();
            assert!(v.maximal, "{name}: readout not updated maximally");
            assert_eq!(v.init_maximal, Some(true), "{name}");
        }
    }
}

// ---- TP4's closed forms on a grid of abc-parameterizations ------------------------

/// Every stable-at-init (Thm 3.3 (1)) abc-parameterization of 1-, 2- and 3-hidden-layer
/// MLPs on a grid: the graph analysis gives TP4's first-step exponents
///   f_0 = 1/2 - (a+b)_{L+1},
///   r_l = (a+b)_{L+1} + c - 1 + 2 a_l + 1(l = 1),   r = min r_l,
///   Δf = max(1 - 2a_{L+1} - c, 1 - (a+b)_{L+1} - r),
/// and the regime of Thm 3.3 / 3.6 / 3.8 (theory.md §5.2, first step: the gradient
/// comes from W_0^{L+1} alone).
#[test]
fn tp4_closed_forms_on_a_grid() {
    let grid_a = [r(-1, 2), r(0, 1), r(1, 2), r(1, 1)];
    let grid_ab_out = [r(1, 2), r(1, 1), r(3, 2)];
    let grid_c = [r(-1, 1), r(0, 1), r(1, 2), r(1, 1)];
    let mut checked = 0;
    let mut seen = std::collections::HashSet::new();
    for depth in 1..=3usize {
        for &c in &grid_c {
            for &ab_out in &grid_ab_out {
                for &a_out in &grid_a {
                    for (k, &a1) in grid_a.iter().enumerate() {
                        // hidden layers: cycle through the grid so depth 3 stays small
                        let a_hidden: Vec<Rational> =
                            (0..depth - 1).map(|j| grid_a[(k + j + 1) % 4]).collect();
                        let mut layers = vec![(a1, -a1, c)];
                        for &a in &a_hidden {
                            layers.push((a, Rational::HALF - a, c));
                        }
                        layers.push((a_out, ab_out - a_out, c));
                        let src = mlp(&layers, 1);
                        let prog = tpc::compile(&src).unwrap();
                        let ex = exponents(&prog);
                        let cls = classify(&prog, &ex).unwrap();
                        // closed forms
                        let one = Rational::ONE;
                        let two = Rational::int(2);
                        let rl: Vec<Rational> = layers[..depth]
                            .iter()
                            .enumerate()
                            .map(|(l, &(a, _, _))| {
                                ab_out + c - one
                                    + two * a
                                    + if l == 0 { one } else { Rational::ZERO }
                            })
                            .collect();
                        let rr = *rl.iter().min().unwrap();
                        let df = (one - two * a_out - c).max(one - ab_out - rr);
                        let f0 = Rational::HALF - ab_out;
                        let f = prog.outputs[0].index();
                        let ctx = format!("{src}\n{}", scaling::table(&prog));
                        assert_eq!(ex_of(ex.init[f]), f0, "{ctx}");
                        let got: Vec<Rational> = cls.params[..depth]
                            .iter()
                            .map(|s| -ex_of(s.feature))
                            .collect();
                        assert_eq!(got, rl, "r_l\n{ctx}");
                        assert_eq!(-ex_of(cls.feature), rr, "r\n{ctx}");
                        assert_eq!(ex_of(cls.output), df, "Δf\n{ctx}");
                        // Thm 3.3 (first step): stable iff r >= 0, 2a+c >= 1, a+b+r >= 1;
                        // nontrivial iff one of the last two is an equality
                        let stable =
                            rr >= Rational::ZERO && two * a_out + c >= one && ab_out + rr >= one;
                        let nontrivial = two * a_out + c == one || ab_out + rr == one;
                        let want = if !stable {
                            Regime::Unstable
                        } else if !nontrivial {
                            Regime::Trivial
                        } else if rr == Rational::ZERO {
                            Regime::FeatureLearning
                        } else {
                            Regime::Kernel
                        };
                        assert_eq!(cls.regime, want, "{ctx}");
                        seen.insert(want.name());
                        checked += 1;
                    }
                }
            }
        }
    }
    assert_eq!(checked, 3 * 4 * 3 * 4 * 4);
    assert_eq!(seen.len(), 4, "every regime occurs on the grid: {seen:?}");
}

// ---- the contract examples ----------------------------------------------------------

fn example(name: &str) -> String {
    std::fs::read_to_string(common::example_path(name)).unwrap()
}

/// The exponent of the node named `name` (or `W @ h1` for an unnamed MatMul).
fn node(prog: &tpc::ir::Program, name: &str) -> usize {
    prog.ids()
        .find(|&i| scaling::node_name(prog, i) == name)
        .unwrap_or_else(|| panic!("no node {name}"))
        .index()
}

#[test]
fn sp_blowup_moves_f_by_n_and_w_h1_by_sqrt_n() {
    let prog = tpc::compile(&example("sp_blowup")).unwrap();
    let ex = exponents(&prog);
    let s = ex.step.as_ref().unwrap();
    let (h, o) = (Rational::HALF, Rational::ONE);
    let z = Rational::ZERO;
    for n in ["U @ x", "h1", "W @ h1", "h2", "f"] {
        assert_eq!(ex_of(ex.init[node(&prog, n)]), z, "{n} at init");
    }
    assert_eq!(ex_of(s.delta[node(&prog, "W @ h1")]), h);
    assert_eq!(ex_of(s.delta[node(&prog, "h2")]), h);
    assert_eq!(ex_of(s.delta[node(&prog, "f")]), o);
    assert_eq!(ex_of(s.delta[node(&prog, "U @ x")]), -h);
    assert_eq!(ex_of(s.grad[node(&prog, "W @ h1")]), -h);
    assert_eq!(ex_of(s.chi0[0]), z);
    assert_eq!(ex_of(s.chi1[0]), o, "after the step f - y is Θ(n)");
    assert_eq!(regime_of(&prog), Regime::Unstable);
    insta::assert_snapshot!("exponents_sp_blowup", scaling::table(&prog));
}

#[test]
fn sgd_mlp_is_feature_learning_without_warnings() {
    let src = example("sgd_mlp");
    let prog = tpc::compile(&src).unwrap();
    let ex = exponents(&prog);
    let cls = classify(&prog, &ex).unwrap();
    assert_eq!(cls.regime, Regime::FeatureLearning);
    assert!(cls.mup);
    assert!(cls.params.iter().all(|p| p.maximal));
    let (_, diags) = tpc::check_source(&src);
    assert!(
        diags
            .iter()
            .all(|d| d.severity == tpc::diag::Severity::Note),
        "{diags:?}"
    );
    assert_eq!(diags.len(), 1);
    assert_eq!(diags[0].code, "N0102");
    insta::assert_snapshot!("exponents_sgd_mlp", scaling::table(&prog));
}

fn regime_of(prog: &tpc::ir::Program) -> Regime {
    scaling::regime(prog).unwrap()
}

#[test]
fn examples_without_train_get_no_scaling_warning() {
    for (name, src) in common::examples() {
        let (prog, diags) = tpc::check_source(&src);
        let prog = prog.unwrap();
        if prog.train.is_none() {
            assert!(diags.is_empty(), "{name}: {diags:?}");
            assert!(scaling::regime(&prog).is_none());
        }
    }
}

/// The RNN, the random-matrix program and the deep erf network, trained: the analysis
/// runs on weight sharing, transposes and biases and gives the NTK programs the kernel
/// regime.
#[test]
fn other_architectures_with_train() {
    let train = |data: &str| {
        format!("\ntrain {{ loss = mse lr = 0.1 steps = 2 data = [ ({data}, 1.0) ] }}\n")
    };
    // one output (f), so one target per sample
    let rnn = format!(
        "{}{}",
        example("rnn").replace("output y[t] = v @ h[t]\n", ""),
        train("[1.0, 0.5, -0.5, 0.2]")
    );
    let prog = tpc::compile(&rnn).unwrap();
    assert_eq!(
        regime_of(&prog),
        Regime::Kernel,
        "{}",
        scaling::table(&prog)
    );
    let erf = format!("{}{}", example("erf_deep"), train("[1.0, 0.5, -0.5]"));
    let prog = tpc::compile(&erf).unwrap();
    assert_eq!(
        regime_of(&prog),
        Regime::Kernel,
        "{}",
        scaling::table(&prog)
    );
    // W and W.T both used: the update of W reaches both uses.
    let tied = "width n\ninput x : 2\nparameterization mup\nparam U : n x 2\nparam W : n x n\nparam v : 1 x n\n\
                h1 = relu(U @ x)\nh2 = relu(W @ h1 + W.T @ h1)\nobserve m = mean(h2 * h1)\noutput f = v @ h2\n\
                train { loss = mse lr = 0.1 steps = 1 data = [ ([1.0, 0.0], 1.0) ] }\n";
    let prog = tpc::compile(tied).unwrap();
    let c = classify(&prog, &exponents(&prog)).unwrap();
    assert_eq!(
        c.regime,
        Regime::FeatureLearning,
        "{}",
        scaling::table(&prog)
    );
    assert!(c.mup);
}

/// A zero-initialized readout (common with muP) passes no gradient at the first step;
/// from the second step on it does, and the program learns features.
#[test]
fn zero_readout_learns_features_from_the_second_step() {
    let src = |steps: usize| {
        format!(
            "width n\ninput x : 2\nparameterization mup\nparam U : n x 2\nparam W : n x n\n\
             param v : 1 x n ~ N(0, 0) lr 1/n\nh1 = relu(U @ x)\nh2 = relu(W @ h1)\noutput f = v @ h2\n\
             train {{ loss = mse lr = 0.1 steps = {steps} data = [ ([1.0, 0.0], 1.0) ] }}\n"
        )
    };
    let prog = tpc::compile(&src(1)).unwrap();
    let ex = exponents(&prog);
    let first = ex.step.as_ref().unwrap();
    assert_eq!(first.delta[node(&prog, "h2")], Ex::Zero);
    assert_eq!(
        regime_of(&prog),
        Regime::Kernel,
        "{}",
        scaling::table(&prog)
    );
    let prog = tpc::compile(&src(3)).unwrap();
    let c = classify(&prog, &exponents(&prog)).unwrap();
    assert_eq!(
        (c.regime, c.step),
        (Regime::FeatureLearning, 2),
        "{}",
        scaling::table(&prog)
    );
    // SP at lr 1 keeps blowing up; the first step is what is reported
    let sp = mlp(
        &[
            (Rational::ZERO, Rational::ZERO, Rational::ZERO),
            (Rational::ZERO, Rational::HALF, Rational::ZERO),
            (Rational::ZERO, Rational::HALF, Rational::ZERO),
        ],
        3,
    );
    let prog = tpc::compile(&sp).unwrap();
    let ex = exponents(&prog);
    let c = classify(&prog, &ex).unwrap();
    assert_eq!((c.regime, c.step), (Regime::Unstable, 1));
    // the later step compounds the blow-up (theory.md §5.2: slope about 2 after step 2)
    let later = ex.later.as_ref().unwrap();
    assert_eq!(ex_of(later.delta[node(&prog, "W2 @ h1")]), Rational::int(2));
}

// ---- diagnostics -------------------------------------------------------------------

const MLP_BODY: &str = "h1 = relu(U @ x)\nh2 = relu(W @ h1)\noutput f = v @ h2\n";
const TRAIN: &str = "train {\n    loss  = mse\n    lr    = 0.1\n    steps = 1\n    data  = [ ([1.0, 0.0], 1.0) ]\n}\n";

fn mlp_src(u: &str, w: &str, v: &str, train: bool) -> String {
    format!(
        "width n\ninput x : 2\n\nparam U : n x 2 {u}\nparam W : n x n {w}\nparam v : 1 x n {v}\n\n{MLP_BODY}{}",
        if train { format!("\n{TRAIN}") } else { String::new() }
    )
}

/// (snapshot name, source, the codes it must get)
fn warning_cases() -> Vec<(&'static str, String, Vec<&'static str>)> {
    vec![
        ("sp_blowup", example("sp_blowup"), vec!["W0103", "W0103"]),
        ("sgd_mlp", example("sgd_mlp"), vec!["N0102"]),
        (
            "hidden_blows_up_at_init",
            mlp_src("~ N(0, 1/2)", "~ N(0, 1)", "~ N(0, 1/n)", false),
            vec!["W0101"],
        ),
        (
            "hidden_vanishes_at_init",
            mlp_src("~ N(0, 1/2)", "~ N(0, 1/n^2)", "~ N(0, 1/n)", false),
            vec!["W0102"],
        ),
        (
            "input_blows_up_at_init",
            mlp_src("~ N(0, n)", "~ N(0, 1/n)", "~ N(0, 1/n)", false),
            vec!["W0101"],
        ),
        (
            "readout_blows_up_at_init",
            mlp_src("~ N(0, 1/2)", "~ N(0, 1/n)", "~ N(0, 1)", true),
            vec!["W0101"],
        ),
        (
            "readout_lr_too_large",
            mlp_src("~ N(0, 1/2) lr n", "~ N(0, 1/n)", "~ N(0, 1/n^2) lr 1", true),
            vec!["W0103"],
        ),
        (
            "ntk_kernel_regime",
            format!("width n\ninput x : 2\nparameterization ntk\n\nparam U : n x 2\nparam W : n x n\nparam v : 1 x n\n\n{MLP_BODY}\n{TRAIN}"),
            vec!["N0101"],
        ),
        (
            "sp_lr_1_over_n_kernel_regime",
            mlp_src("~ N(0, 1/2) lr 1/n", "~ N(0, 1/n) lr 1/n", "~ N(0, 1/n) lr 1/n", true),
            vec!["N0101"],
        ),
        (
            "sp_preset_lr_1",
            format!("width n\ninput x : 2\nparameterization sp\n\nparam U : n x 2\nparam W : n x n\nparam v : 1 x n\n\n{MLP_BODY}\n{TRAIN}"),
            vec!["W0103", "W0103"],
        ),
        (
            "trivial_training",
            mlp_src(
                "~ N(0, 1/2) lr 1/n",
                "~ N(0, 1) * n^(-1/2) lr 1/n",
                "~ N(0, 1) * n^(-1/2) lr 1/n",
                true,
            ),
            vec!["W0104"],
        ),
    ]
}

#[test]
fn warnings_snapshots() {
    for (name, src, codes) in warning_cases() {
        let (prog, diags) = tpc::check_source(&src);
        assert!(prog.is_some(), "{name}: {diags:?}");
        let got: Vec<&str> = diags.iter().map(|d| d.code).collect();
        assert_eq!(got, codes, "{name}");
        for d in &diags {
            assert!(!d.is_error());
            if d.severity == tpc::diag::Severity::Warning {
                assert!(d.help.is_some(), "{name}: {} without help", d.code);
            }
        }
        let rendered = tpc::error_for(&format!("{name}.tp"), &src, diags).render();
        insta::assert_snapshot!(format!("warning_{name}"), rendered);
    }
}

#[test]
fn warnings_never_change_the_exit_code() {
    let dir = std::env::temp_dir().join(format!("tpc-scaling-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, src, codes) in warning_cases() {
        let path = dir.join(format!("{name}.tp"));
        std::fs::write(&path, &src).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tpc"))
            .arg("check")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{name}: {err}");
        for c in codes {
            assert!(err.contains(c), "{name}: {err}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The muP law given as help, put back into the program, is muP.
#[test]
fn the_suggested_mup_laws_are_mup() {
    let (z, h, o) = (Rational::ZERO, Rational::HALF, Rational::ONE);
    // SP with various learning-rate exponents per layer
    for c in [-o, z, h, o] {
        let layers = [(z, z, c), (z, h, c), (z, h, c)];
        let src = mlp(&layers, 1);
        let prog = tpc::compile(&src).unwrap();
        let laws: Vec<String> = prog
            .params
            .iter()
            .map(|p| {
                let (own, free) = scaling::mup_laws(p.role(), &p.law);
                assert!(scaling::is_mup_law(p.role(), &own));
                if let Some(f) = free {
                    assert!(scaling::is_mup_law(p.role(), &f));
                    assert_eq!(f.mult.exp, Rational::ZERO);
                }
                assert_eq!(own.lr.exp, p.law.lr.exp, "keeps the learning rate");
                scaling::law_text(&own)
            })
            .collect();
        let fixed = format!(
            "width n\ninput x : 2\nparam W1 : n x 2 {}\nparam W2 : n x n {}\nparam W3 : 1 x n {}\n\
             h1 = relu(W1 @ x)\nh2 = relu(W2 @ h1)\noutput f = W3 @ h2\n\
             train {{ loss = mse lr = 0.1 steps = 1 data = [ ([1.0, 0.0], 1.0) ] }}\n",
            laws[0], laws[1], laws[2]
        );
        let prog = tpc::compile(&fixed).unwrap_or_else(|e| panic!("{fixed}\n{e}"));
        let cls = classify(&prog, &exponents(&prog)).unwrap();
        assert_eq!(cls.regime, Regime::FeatureLearning, "{fixed}");
        assert!(cls.mup, "{fixed}");
        let (_, diags) = tpc::check_source(&fixed);
        assert!(
            diags.iter().all(|d| d.code == "N0102"),
            "{fixed}: {diags:?}"
        );
    }
}

#[test]
fn limit_json_reports_the_regime_only_with_train() {
    let run = |path: &std::path::Path, extra: &[&str]| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_tpc"))
            .arg("limit")
            .arg(path)
            .args(extra)
            .args(["--format", "json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let ex = |n: &str| common::example_path(n);
    assert_eq!(run(&ex("sgd_mlp"), &[])["regime"], "feature-learning");
    assert_eq!(run(&ex("sp_blowup"), &[])["regime"], "unstable");
    let dir = std::env::temp_dir().join(format!("tpc-scaling-limit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ntk = dir.join("ntk.tp");
    let src = warning_cases()
        .into_iter()
        .find(|c| c.0 == "ntk_kernel_regime")
        .unwrap()
        .1;
    std::fs::write(&ntk, src).unwrap();
    assert_eq!(run(&ntk, &[])["regime"], "kernel");
    let pts = dir.join("pts.csv");
    std::fs::write(&pts, "1.0\n0.5\n").unwrap();
    let v = run(&ex("mlp3"), &["--inputs", pts.to_str().unwrap()]);
    assert!(v.get("regime").is_none(), "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}
