//! Issue 12, items 2 and 5: the limit never prints a wrong number with exit 0.
//!
//! Expectations that do not exist (E[1/Z], E[Z^-2], a Cauchy ratio) are refused with
//! E0031 at the expression; non-finite limit quantities with E0032 at the output or
//! observe; bad library points with E0033 at the input; law constants past f64 with
//! E0034. Well-defined expectations with denominators still give the right numbers,
//! checked against closed forms and an independent quadrature.

use std::io::Write;
use std::process::{Command, Output};

use tpc::diag::Diagnostic;

const HEAD: &str = "\
width n
input x : 1
param U : n x 1 ~ N(0, 1)
param V : n x 1 ~ N(0, 1)
param v : 1 x n ~ N(0, 1) * n^(-1/2)
h = U @ x
g = V @ x
y = tanh(h)
output f = v @ y
";

fn program(observe: &str) -> String {
    format!("{HEAD}observe m = mean({observe})\n")
}

/// The single diagnostic of a refused limit.
fn refusal(src: &str, points: &[Vec<f64>]) -> Diagnostic {
    match tpc::limit_of(src, points) {
        Ok(r) => panic!("expected a refusal, got {:?}", r.observe),
        Err(e) => {
            assert_eq!(e.diagnostics.len(), 1, "{}", e.render());
            e.diagnostics[0].clone()
        }
    }
}

fn spanned<'a>(src: &'a str, d: &Diagnostic) -> &'a str {
    &src[d.span.range()]
}

/// The observe `m` on the points x = 1, 2.
fn observe(src: &str) -> Vec<f64> {
    let r =
        tpc::limit_of(src, &[vec![1.0], vec![2.0]]).unwrap_or_else(|e| panic!("{}", e.render()));
    let (name, v) = &r.observe[0];
    assert_eq!(name, "m");
    v.clone()
}

#[test]
fn moments_that_do_not_exist_are_refused_at_the_expression() {
    // The three: E[Z^-2] = ∞ (was 55.7254), E[1/Z] undefined (was 0), and a
    // Cauchy ratio (was −0.000000000000 with a stated error of 1.8e-15).
    for integrand in [
        "1 / (h * h)",
        "h^-2",
        "1 / h",
        "h / g",
        "1 / abs(h)",
        "1 / relu(h)",
        "exp(h * h)",
    ] {
        let src = program(integrand);
        let d = refusal(&src, &[vec![1.0]]);
        assert_eq!(d.code, "E0031", "{integrand}: {}", d.message);
        assert!(
            spanned(&src, &d).contains(&format!("mean({integrand})")),
            "{integrand}: the span is `{}`",
            spanned(&src, &d)
        );
        assert!(!d.notes.is_empty() && d.help.is_some(), "{d:?}");
    }
}

#[test]
fn a_vector_read_out_or_multiplied_must_have_moments() {
    // f = v @ (1/h): the NNGP is σ_v² E[1/Z²] = ∞.
    let src = HEAD.replace("y = tanh(h)", "y = 1 / h");
    let d = refusal(&src, &[vec![1.0]]);
    assert_eq!(d.code, "E0031");
    assert!(spanned(&src, &d).contains("1 / h"), "{}", spanned(&src, &d));
    // tanh(1/h) is bounded: its law exists even though 1/h has no mean.
    let ok = HEAD.replace("y = tanh(h)", "r = 1 / h\ny = tanh(r)");
    let r = tpc::limit_of(&ok, &[vec![1.0]]).unwrap_or_else(|e| panic!("{}", e.render()));
    let k = r.nngp.unwrap()[(0, 0)];
    assert!(k.is_finite() && k > 0.0 && k < 1.0, "{k}");
}

/// E[1/(1 + Z²)] for Z ~ N(0, s2): √(π/(2 s2)) e^(1/(2 s2)) erfc(1/√(2 s2)).
fn mean_inv_one_plus_sq(s2: f64) -> f64 {
    let a = 1.0 / (2.0 * s2);
    (std::f64::consts::PI * a).sqrt() * a.exp() * libm::erfc(a.sqrt())
}

/// E[φ(Z)], Z ~ N(0, s2), by the trapezoid rule on [-12σ, 12σ] (the integrand is
/// smooth and bounded, the error far below 1e-10): independent of tpc's quadrature.
fn trapezoid(phi: impl Fn(f64) -> f64, s2: f64) -> f64 {
    let s = s2.sqrt();
    let m = 200_000;
    let (a, b) = (-12.0 * s, 12.0 * s);
    let h = (b - a) / m as f64;
    let dens = |z: f64| (-z * z / (2.0 * s2)).exp() / (2.0 * std::f64::consts::PI * s2).sqrt();
    (0..=m)
        .map(|i| {
            let z = a + h * i as f64;
            let w = if i == 0 || i == m { 0.5 } else { 1.0 };
            w * phi(z) * dens(z)
        })
        .sum::<f64>()
        * h
}

#[test]
fn well_defined_expectations_with_denominators_keep_their_values() {
    // Points x = 1, 2: Var(Z^h) = x².
    let tol = 1e-8;
    let got = observe(&program("1 / (1 + h * h)"));
    for (g, s2) in got.iter().zip([1.0, 4.0]) {
        let want = mean_inv_one_plus_sq(s2);
        assert!(
            (g - want).abs() < tol,
            "E[1/(1+Z²)] at s2={s2}: {g} vs {want}"
        );
    }
    let got = observe(&program("h * h / (1 + h * h)"));
    for (g, s2) in got.iter().zip([1.0, 4.0]) {
        let want = 1.0 - mean_inv_one_plus_sq(s2);
        assert!(
            (g - want).abs() < tol,
            "E[Z²/(1+Z²)] at s2={s2}: {g} vs {want}"
        );
    }
    // E[1/exp(Z)] = e^(s2/2).
    let got = observe(&program("1 / exp(h)"));
    for (g, s2) in got.iter().zip([1.0f64, 4.0]) {
        let want = (s2 / 2.0).exp();
        assert!(
            (g - want).abs() < 1e-8 * want,
            "E[e^-Z] at s2={s2}: {g} vs {want}"
        );
    }
    // A removable singularity: E[tanh(Z)/Z].
    let got = observe(&program("tanh(h) / h"));
    for (g, s2) in got.iter().zip([1.0, 4.0]) {
        let want = trapezoid(|z| if z == 0.0 { 1.0 } else { z.tanh() / z }, s2);
        assert!(
            (g - want).abs() < 1e-6,
            "E[tanh(Z)/Z] at s2={s2}: {g} vs {want}"
        );
    }
}

#[test]
fn a_point_at_zero_makes_a_removable_singularity_zero_over_zero() {
    // At x = 0, Z^h = 0 exactly, and tanh(0)/0 is NaN: refused at the observe, not
    // printed.
    let src = program("tanh(h) / h");
    let d = refusal(&src, &[vec![1.0], vec![0.0]]);
    assert_eq!(d.code, "E0032", "{}", d.message);
    assert!(
        spanned(&src, &d).starts_with("observe m"),
        "{}",
        spanned(&src, &d)
    );
    assert!(d.message.contains("point 2"), "{}", d.message);
}

#[test]
fn non_finite_library_points_point_at_the_input() {
    let src = program("h * h");
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let d = refusal(&src, &[vec![1.0], vec![bad]]);
        assert_eq!(d.code, "E0033");
        assert_eq!(spanned(&src, &d), "input x : 1", "{}", d.message);
        assert!(d.message.contains("point 2"), "{}", d.message);
    }
    let d = refusal(&src, &[vec![1.0, 2.0]]);
    assert_eq!(d.code, "E0033");
    assert!(d.message.contains("has 2 number(s)"), "{}", d.message);
}

#[test]
fn an_overflowing_moment_is_refused_at_the_observe() {
    // E[exp(Z)] = e^(s2/2) = e^1000 overflows f64: refused, not printed as inf.
    let src = program("exp(h)").replace("U : n x 1 ~ N(0, 1)", "U : n x 1 ~ N(0, 2000)");
    let d = refusal(&src, &[vec![1.0]]);
    assert_eq!(d.code, "E0032", "{}", d.message);
    assert!(
        spanned(&src, &d).starts_with("observe m"),
        "{}",
        spanned(&src, &d)
    );
}

#[test]
fn an_overflowing_kernel_names_the_node() {
    // Var(Z^h) = 1e300 · x² overflows at x = 1e10: the error carries a span inside the
    // program (not the `width n` line) and names what overflowed.
    let src = HEAD
        .replace("U : n x 1 ~ N(0, 1)", "U : n x 1 ~ N(0, 1e300)")
        .replace("y = tanh(h)", "y = h");
    let d = refusal(&src, &[vec![1e10]]);
    assert_eq!(d.code, "E0032", "{}", d.message);
    // The first value that overflows is Z^h = U @ x (or, through the layer-chain fast
    // path, the output that reads it): never the `width n` line.
    let at = spanned(&src, &d);
    assert!(
        d.span.start >= src.find("h = U").unwrap(),
        "{at}: {}",
        d.message
    );
    assert!(at == "U @ x" || at.starts_with("output f"), "{at}");
    assert!(d.message.contains("not finite"), "{}", d.message);
}

#[test]
fn huge_finite_laws_print_readably_and_overflowing_ones_are_refused() {
    let src = HEAD.replace("U : n x 1 ~ N(0, 1)", "U : n x 1 ~ N(0, 1e300)");
    let text = tpc::derive(&src).unwrap_or_else(|e| panic!("{}", e.render()));
    assert!(text.contains("1e300"), "{text}");
    assert!(!text.contains("inf"), "{text}");
    let prog = tpc::compile(&src).unwrap();
    let listing = tpc::report::graph::listing(&prog);
    assert!(!listing.contains("000000000000000000"), "{listing}");
    assert!(listing.contains("1e300"), "{listing}");
    // σ = 1e200: σ² = 1e400 is past f64.
    let over = HEAD.replace("U : n x 1 ~ N(0, 1)", "U : n x 1 ~ N(0, 1) * 1e200");
    let e = tpc::derive(&over).expect_err("variance 1e400 overflows");
    let d = &e.diagnostics[0];
    assert_eq!(d.code, "E0034", "{}", e.render());
    assert!(
        over[d.span.range()].contains("1e200"),
        "{}",
        &over[d.span.range()]
    );
}

fn tpc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tpc"))
        .args(args)
        .output()
        .unwrap()
}

fn temp(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tpc_limit_refusals_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::File::create(&p)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    p
}

#[test]
fn the_command_line_refuses_in_limit_and_warns_in_check_and_run() {
    let file = temp("inv_sq.tp", &program("1 / (h * h)"));
    let pts = temp("pts.csv", "1\n2\n");
    let (f, p) = (file.to_str().unwrap(), pts.to_str().unwrap());
    for format in ["text", "json"] {
        let out = tpc(&["limit", f, "--inputs", p, "--format", format]);
        assert_eq!(out.status.code(), Some(1));
        if format == "text" {
            assert!(
                out.stdout.is_empty(),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
        } else {
            // Issue 18: the error as one JSON object on stdout, no numbers.
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["error"]["code"], "E0031", "{v}");
            assert!(v.get("nngp").is_none(), "{v}");
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("error[E0031]"), "{err}");
        assert!(err.contains("mean(1 / (h * h))"), "{err}");
        // Not also a warning.
        assert!(!err.contains("warning[E0031]"), "{err}");
    }
    let out = tpc(&["check", f]);
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("warning[E0031]"), "{err}");
    let out = tpc(&["run", f, "--inputs", p, "--width", "64", "--seeds", "2"]);
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("warning[E0031]"), "{err}");
    let out = tpc(&["explain", "E0031"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("does not exist"));
}

#[test]
fn a_training_trajectory_that_overflows_is_refused_at_the_output() {
    // Kernel regime, lr = 1e100: f_t grows like (η Θ)^t and overflows by step 4.
    let src = "\
width n
input x : 1
param U : n x 1 ~ N(0, 1)
param v : 1 x n ~ N(0, 1) * n^(-1/2)
h = tanh(U @ x)
output f = v @ h
train { loss = mse  lr = 1e100  steps = 4  data = [ ([1.0], 1.0) ] }
";
    let d = refusal(src, &[vec![1.0]]);
    assert_eq!(d.code, "E0032", "{}", d.message);
    assert_eq!(spanned(src, &d), "output f = v @ h");
    assert!(d.message.contains("f_t"), "{}", d.message);
    // With lr = 0.5 the same program trains to finite numbers.
    let ok = src.replace("1e100", "0.5");
    let r = tpc::limit_of(&ok, &[vec![1.0]]).unwrap_or_else(|e| panic!("{}", e.render()));
    let f_t = r.train.unwrap().f_t.unwrap();
    assert!(f_t.iter().all(|v| v.is_finite()), "{f_t}");
}
