//! The library API as a crate outside tpc sees it (issue 12): derivation names that
//! survive unrelated edits, points that are checked instead of padded, error types that
//! are `std::error::Error`, and a text report that fits the screen.

use std::path::PathBuf;

fn example(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    std::fs::read_to_string(p).expect("bundled example")
}

/// `src` with `extra` inserted after its first line that starts with `after`.
fn insert_after(src: &str, after: &str, extra: &str) -> String {
    let mut out = String::new();
    let mut done = false;
    for line in src.lines() {
        out.push_str(line);
        out.push('\n');
        if !done && line.starts_with(after) {
            out.push_str(extra);
            done = true;
        }
    }
    assert!(done, "no line starts with `{after}`");
    out
}

/// The text without the lines that mention `name` (the unrelated statement's own lines).
fn without(text: &str, name: &str) -> String {
    text.lines()
        .filter(|l| !l.contains(name))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// An unused `param` and an unrelated statement placed before every other vector shift
/// every node number; no name in the derivation or the report may change.
#[test]
fn names_survive_an_unused_param_and_an_unrelated_statement() {
    let src = example("rnn.tp");
    let edited = insert_after(
        &src,
        "param b",
        "param unused : n x n\nunrelated = sin(b)\n",
    );
    // The edit compiles, with warnings only, and really renumbers the nodes.
    let (p0, p1) = (tpc::compile(&src).unwrap(), tpc::compile(&edited).unwrap());
    assert_eq!(p1.len(), p0.len() + 2);

    let d0 = tpc::derive(&src).unwrap();
    let d1 = tpc::derive(&edited).unwrap();
    assert!(d1.contains("Z^unrelated = sin(Z^b)"), "{d1}");
    assert_eq!(without(&d1, "unrelated"), d0);
    assert!(d0.contains("Z^{W h[0]} = Ẑ^{W h[0]}"), "{d0}");
    assert!(!d0.contains('%'), "a numbered name in\n{d0}");

    let pts = [vec![1.0, 0.5, -0.3, 0.2], vec![0.0, 1.0, 0.0, -1.0]];
    let r0 = tpc::report_limit(&src, &pts).unwrap();
    let r1 = tpc::report_limit(&edited, &pts).unwrap();
    assert_eq!(without(&r1, "unrelated"), r0);
}

/// The same for Ż terms (semicircle) and for the unrolled training program, whose
/// intermediates are all unnamed.
#[test]
fn transposed_and_unrolled_names_survive_an_unused_param() {
    let src = example("semicircle.tp");
    let edited = insert_after(&src, "width", "param unused : n x n\n");
    let d0 = tpc::derive(&src).unwrap();
    assert_eq!(tpc::derive(&edited).unwrap(), d0);
    assert!(d0.contains("Z^{W x[1]} = Ẑ^{W x[1]} + 0.5·Z^v"), "{d0}");
    assert!(d0.contains("Z^{Wᵀ x[1]} = Ẑ^{Wᵀ x[1]} + 0.5·Z^v"), "{d0}");
    assert!(!d0.contains('%'), "{d0}");

    let src = example("sgd_mlp.tp");
    let edited = insert_after(&src, "param U", "param unused : n\n");
    let u0 = tpc::derive_unrolled(&src, &[]).unwrap();
    let u1 = tpc::derive_unrolled(&edited, &[]).unwrap();
    assert!(u1.contains("Z^unused ~ N(0, 1)"), "{u1}");
    assert_eq!(without(&u1, "unused"), u0);
    assert!(u0.contains("f_1(ξ1) = E[v_1 * h2_1(ξ1)]"), "{u0}");
    assert!(!u0.contains('%'), "{u0}");
}

/// Every bundled example's derivation names every vector from the source.
#[test]
fn no_numbered_names_in_the_examples() {
    for name in [
        "mlp3",
        "rnn",
        "erf_deep",
        "sgd_mlp",
        "sp_blowup",
        "semicircle",
    ] {
        if let Ok(d) = tpc::derive(&example(&format!("{name}.tp"))) {
            assert!(!d.contains('%'), "{name}:\n{d}");
        }
    }
}

const RELU: &str =
    "width n\ninput x : 2\nparam U : n x 2\nparam v : 1 x n\nh = relu(U @ x)\noutput f = v @ h\n";

/// Points of the wrong dimension, no points, and non-finite points are errors (E0033),
/// never padded, truncated or computed on.
#[test]
fn points_are_checked() {
    let msg = |pts: &[Vec<f64>]| tpc::limit_of(RELU, pts).unwrap_err().render();
    let e = msg(&[vec![1.0, 2.0], vec![1.0]]);
    assert!(
        e.contains("error[E0033]: point 2 has 1 number(s); the program's inputs need 2"),
        "{e}"
    );
    assert!(e.contains("x (2 numbers)"), "{e}");
    let e = msg(&[vec![1.0, 2.0, 3.0]]);
    assert!(e.contains("point 1 has 3 number(s)"), "{e}");
    let e = msg(&[]);
    assert!(e.contains("no points"), "{e}");
    let e = msg(&[vec![1.0, f64::NAN]]);
    assert!(e.contains("point 1, number 2, is NaN"), "{e}");
    let e = tpc::report_limit(RELU, &[vec![f64::INFINITY, 0.0]])
        .unwrap_err()
        .render();
    assert!(e.contains("is inf"), "{e}");
    let cfg = tpc::RunConfig {
        width: 16,
        seeds: 2,
        seed: 0,
    };
    assert!(tpc::run(RELU, &[vec![1.0]], &cfg).is_err());

    // A program without inputs takes its one empty point, and refuses numbers.
    let free = "width n\nparam W : n x n ~ N(0, 1/n)\nparam v : n ~ N(0, 1)\n\
                observe m = mean(v * (W @ v))\n";
    assert_eq!(tpc::limit_of(free, &[]).unwrap().observe.len(), 1);
    let e = tpc::limit_of(free, &[vec![1.0]]).unwrap_err().render();
    assert!(
        e.contains("point 1 has 1 number(s), but the program has no `input`"),
        "{e}"
    );

    // Without points, a program with training data uses its training inputs.
    let r = tpc::limit_of(&example("sgd_mlp.tp"), &[]).unwrap();
    assert_eq!(r.points.len(), 3);
}

/// The `--inputs` message for a program without inputs says so instead of
/// "need 0: " with an empty list.
#[test]
fn csv_rows_for_a_program_without_inputs() {
    let prog = tpc::compile("width n\nparam v : n ~ N(0, 1)\nobserve m = mean(v * v)\n").unwrap();
    let e = tpc::data::parse_points(&prog, "p.csv", "1, 2\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "p.csv:1:1: the row has 2 numbers, but the program has no `input`"
    );
    assert_eq!(e.help, "omit --inputs: the program has no `input`");
}

fn is_error<E: std::error::Error + Send + Sync + 'static>() {}

#[test]
fn public_errors_are_std_errors() {
    is_error::<tpc::Error>();
    is_error::<tpc::LimitError>();
    is_error::<tpc::DataError>();
    is_error::<tpc::RunError>();
    is_error::<tpc::diag::Diagnostic>();
    is_error::<tpc::autodiff::UnrollError>();
    is_error::<tpc::limit::engine::NumError>();
    let e: Box<dyn std::error::Error> =
        Box::new(tpc::compile("width n\noutput f = v @ h\n").unwrap_err());
    assert!(e.to_string().contains("error[E0004]"), "{e}");
    // nalgebra is re-exported: callers name its types without depending on it.
    let r = tpc::limit_of(RELU, &[vec![1.0, 0.0]]).unwrap();
    let k: &tpc::nalgebra::DMatrix<f64> = r.ntk.as_ref().unwrap();
    assert_eq!(k.shape(), (1, 1));
}

/// Matrices have column headers and no line passes 100 characters, however many
/// (output, point) pairs there are; the points are said to be the CSV rows. Up to 12
/// rows a kernel is printed whole, in column blocks; past that it is summarized.
#[test]
fn the_report_fits_100_columns() {
    let pts = [
        vec![1.0, 0.5, -0.3, 0.2],
        vec![0.0, 1.0, 0.0, -1.0],
        vec![0.3, 0.3, 0.3, 0.3],
    ];
    // 5 outputs × 2 points: 10 columns, in blocks with a header each.
    let text = tpc::report_limit(&example("rnn.tp"), &pts[..2]).unwrap();
    let nngp = &text[text.find("# NNGP").unwrap()..text.find("# NTK").unwrap()];
    assert!(nngp.contains("columns 1–"), "{nngp}");
    assert!(nngp.contains("of 10"), "{nngp}");
    let header = nngp.lines().nth(2).unwrap();
    assert!(header.trim_start().starts_with("y[1](p1)"), "{header}");
    // 5 outputs × 3 points: 15 rows, summarized.
    let big = tpc::report_limit(&example("rnn.tp"), &pts).unwrap();
    assert!(big.contains("15×15 (summarized"), "{big}");
    for line in text
        .lines()
        .chain(big.lines())
        .filter(|l| !l.starts_with("Z^") && !l.contains(" ~ "))
    {
        assert!(
            line.chars().count() <= 100,
            "{} characters: {line}",
            line.chars().count()
        );
    }
    assert!(
        big.contains("# points p1…p3: the rows of the --inputs CSV"),
        "{big}"
    );
    assert!(big.contains("  p1 = (1, 0.5, -0.3, 0.2)"), "{big}");
}

/// No `# methods: ;` when nothing had to be integrated.
#[test]
fn empty_methods_are_said_in_words() {
    let r = tpc::LimitResult {
        outputs: vec![],
        points: vec![vec![]],
        nngp: None,
        nngp_note: None,
        ntk: None,
        ntk_note: None,
        observe: vec![],
        methods: vec![],
        max_error: 0.0,
        qmc_3sigma: None,
        regime: None,
        train: None,
    };
    let text = tpc::report::limit::text("", &r);
    assert!(!text.contains("methods: ;"), "{text}");
    assert!(
        text.contains("# methods: none (no expectation had to be computed)"),
        "{text}"
    );
}

/// A QMC error is said to be a 3σ statistical estimate, never a bound, in the text and
/// in JSON (`qmc_3sigma`, issue 18).
#[test]
fn a_qmc_error_is_stated_as_what_it_is() {
    let r = tpc::LimitResult {
        outputs: vec![],
        points: vec![vec![]],
        nngp: None,
        nngp_note: None,
        ntk: None,
        ntk_note: None,
        observe: vec![],
        methods: vec![
            "QMC, 16×262144 points, 3σ ≈ 7.5e-7 (a statistical error, not a bound)".into(),
        ],
        max_error: 7.5e-7,
        qmc_3sigma: Some(7.5e-7),
        regime: None,
        train: None,
    };
    let text = tpc::report::limit::text("", &r);
    assert!(
        text.contains("largest stated error 7.5e-7, a QMC 3σ estimate (statistical, not a bound)"),
        "{text}"
    );
    let v = tpc::report::limit::json(&r);
    assert_eq!(v["qmc_3sigma"].as_f64(), Some(7.5e-7), "{v}");
}

/// A trajectory over many (output, point) pairs is printed in column blocks too.
#[test]
fn wide_trajectories_fit_100_columns() {
    use tpc::nalgebra::DMatrix;
    let k = 12;
    for se in [true, false] {
        let r = tpc::LimitResult {
            outputs: vec!["y".into()],
            points: (0..k).map(|i| vec![i as f64]).collect(),
            nngp: None,
            nngp_note: Some("not Gaussian".into()),
            ntk: None,
            ntk_note: Some("not computed".into()),
            observe: vec![],
            methods: vec!["closed form".into()],
            max_error: 0.0,
            qmc_3sigma: None,
            regime: Some("kernel".into()),
            train: Some(tpc::limit::train::LimitTrain {
                loss: tpc::ir::Loss::Mse,
                lr: 0.5,
                steps: 2,
                f_t: Some(DMatrix::from_fn(3, k, |i, j| (i * k + j) as f64)),
                f_t_var: (!se).then(|| DMatrix::from_element(3, k, 0.25)),
                f_t_se: se.then(|| DMatrix::from_element(3, k, 0.001)),
                method: "a method".into(),
                note: None,
            }),
        };
        let text = tpc::report::limit::text("", &r);
        for line in text.lines() {
            assert!(
                line.chars().count() <= 100,
                "{} characters: {line}",
                line.chars().count()
            );
        }
        // Every value is printed once, under its own column label.
        assert!(text.contains(&format!("y(p{k})")), "{text}");
        assert!(
            text.contains(&format!("{:.6}", (2 * k + k - 1) as f64)),
            "{text}"
        );
        assert!(text.contains(&format!("of {k}")), "{text}");
    }
}
