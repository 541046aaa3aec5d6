//! Source and data files as editors and other tools write them (issue 12, item 8):
//! integer constants with `^` and up to 2^63 - 1, a UTF-8 byte-order mark, CRLF and
//! lone-CR line endings, invisible characters in diagnostics, and the same for
//! `--inputs` CSV files. Rendered diagnostics are snapshot-tested (each was read when
//! accepted).

use std::process::Command;

const TAIL: &str = "param U : n x 1\nparam v : 1 x n\nh = relu(U @ x)\noutput f = v @ h\n";

/// Checks bytes as the command line does and renders the diagnostics.
fn rendered(bytes: &[u8]) -> (bool, String) {
    let (src, prog, diags) = tpc::check_bytes(bytes);
    let errors: Vec<_> = diags.into_iter().filter(|d| d.is_error()).collect();
    (
        prog.is_some() && errors.is_empty(),
        tpc::diag::Renderer::new("case.tp", &src).render(&errors),
    )
}

fn compiles(src: &str) -> tpc::ir::Program {
    tpc::compile(src).unwrap_or_else(|e| panic!("{src}\n{e}"))
}

#[test]
fn integer_constants_take_powers() {
    let p = compiles(
        "width n\nconst T = 2^3\nconst S = (T - 2)^2 / 4 - 2^0\ninput x : 1 [T]\nparam U : n x 1\n\
         param v : 1 x n\nh[0] = 0\nfor t in 1..=S { h[t] = relu(U @ x[t] + h[t-1]) }\noutput f = v @ h[S]\n",
    );
    assert_eq!(p.inputs[0].len, Some(8));
    // S = 36/4 - 1 = 8 steps: eight input-layer products U @ x[t].
    let listing = tpc::report::graph::listing(&p);
    assert_eq!(listing.matches("MatMul(U").count(), 8, "{listing}");
}

#[test]
fn integer_constants_reach_64_bits_exactly() {
    // 2^53 and beyond are exact when written with digits (they were read through f64).
    for k in [
        "9007199254740992",
        "9007199254740993",
        "9223372036854775807",
        "2^62 + (2^62 - 1)",
    ] {
        let (ok, text) =
            rendered(format!("width n\nconst K = {k}\ninput x : 1\n{TAIL}").as_bytes());
        assert!(ok, "{k}: {text}");
    }
    // An index reads a huge constant exactly: K - (K - 3) = 3 is in range, and only an
    // exact K gives 3 (through f64 both would round to 2^53).
    compiles(
        "width n\nconst K = 9007199254740993\nconst J = 9007199254740990\ninput x : 1 [3]\n\
         param U : n x 1\nparam v : 1 x n\nh = relu(U @ x[K - J])\noutput f = v @ h\n",
    );
}

#[test]
fn integer_constant_errors() {
    for (name, k) in [
        ("int_literal_past_64_bits", "9223372036854775808"),
        ("int_power_overflows", "2^63"),
        ("int_power_negative", "2^-1"),
        ("int_power_fractional", "4^0.5"),
        ("int_exponent_form_past_2_53", "1e17"),
    ] {
        let (ok, text) = rendered(format!("width n\nconst K = {k}\n").as_bytes());
        assert!(!ok, "{name}");
        insta::assert_snapshot!(name, text);
    }
}

#[test]
fn law_coefficients_must_be_finite() {
    // In SP, std = 1e300 squares to an infinite variance; 1e154 is fine.
    let (ok, text) = rendered(b"width n\nparameterization sp\nparam W : n x n { std = 1e154 }\n");
    assert!(ok, "{text}");
    let (ok, text) = rendered(b"width n\nparameterization sp\nparam W : n x n { std = 1e300 }\n");
    assert!(!ok);
    insta::assert_snapshot!("law_std_overflows", text);
}

#[test]
fn a_byte_order_mark_is_dropped_and_spans_stay_right() {
    let body = format!("width n\ninput x : 1\n{TAIL}");
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend(body.as_bytes());
    let (ok, text) = rendered(&bytes);
    assert!(ok, "{text}");
    // The library accepts it too, with spans into the text it was given.
    compiles(&format!("\u{FEFF}{body}"));
    // An error on line 1 after the mark: column 1 is the first visible character.
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend(b"widht n\n");
    let (ok, text) = rendered(&bytes);
    assert!(!ok);
    insta::assert_snapshot!("bom_then_syntax_error", text);
}

#[test]
fn every_line_ending_is_a_line_ending() {
    let lf = format!("# a comment\nwidth n # trailing\ninput x : 1\n{TAIL}");
    let p = compiles(&lf);
    for ending in ["\r\n", "\r"] {
        let src = lf.replace('\n', ending);
        let q = compiles(&src);
        assert_eq!(
            tpc::report::graph::listing(&q),
            tpc::report::graph::listing(&p),
            "{ending:?}"
        );
    }
    // An error on line 4 of a lone-CR file is reported on line 4, with its own text.
    let bad = "# comment\rwidth n\rinput x : 1\rh = relu(Q @ x)\r";
    let (ok, text) = rendered(bad.as_bytes());
    assert!(!ok);
    insta::assert_snapshot!("cr_only_error_on_line_4", text);
    let (ok, text2) = rendered(bad.replace('\r', "\r\n").as_bytes());
    assert!(!ok);
    assert_eq!(text, text2, "CRLF renders as LF does");
}

#[test]
fn invisible_characters_are_named_not_quoted() {
    for (name, src) in [
        (
            "zero_width_space_in_statement",
            format!("width n\ninput x : 1\n{TAIL}g = h\u{200B}\n"),
        ),
        (
            "byte_order_mark_mid_file",
            format!("width n\ninput x : 1\n\u{FEFF}{TAIL}"),
        ),
    ] {
        let (ok, text) = rendered(src.as_bytes());
        assert!(!ok, "{name}");
        assert!(text.contains("U+"), "{name}: {text}");
        insta::assert_snapshot!(name, text);
    }
}

/// Runs `tpc` in a fresh directory holding `files`, so that rendered paths are stable.
fn tpc_in(tag: &str, files: &[(&str, &[u8])], args: &[&str]) -> std::process::Output {
    let dir = std::env::temp_dir().join(format!("tpc-frontend-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tpc"))
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

#[test]
fn csv_points_with_a_mark_and_any_line_ending() {
    let prog = format!(
        "\u{FEFF}width n\r\ninput x : 1\r\n{}",
        TAIL.replace('\n', "\r\n")
    );
    let plain = tpc_in(
        "csv-lf",
        &[("p.tp", prog.as_bytes()), ("x.csv", b"0.5\n-1\n")],
        &["limit", "p.tp", "--inputs", "x.csv", "--format", "json"],
    );
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    for (tag, csv) in [
        ("csv-bom", &b"\xEF\xBB\xBF0.5\n-1\n"[..]),
        ("csv-cr", b"0.5\r-1\r"),
        ("csv-crlf", b"0.5\r\n-1"),
    ] {
        let out = tpc_in(
            tag,
            &[("p.tp", prog.as_bytes()), ("x.csv", csv)],
            &["limit", "p.tp", "--inputs", "x.csv", "--format", "json"],
        );
        assert!(
            out.status.success(),
            "{tag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, plain.stdout, "{tag}");
    }
}

#[test]
fn csv_errors_are_diagnostics_with_spans() {
    let prog = format!("width n\ninput x : 2\n{}", TAIL.replace("n x 1", "n x 2"));
    for (name, csv) in [
        ("csv_nan", &b"0.5, 1\n2, nan\n"[..]),
        ("csv_invisible", b"\xEF\xBB\xBF0.5,1\n2,3\xE2\x80\x8B\n"),
        ("csv_short_row", b"0.5,1\r2\r"),
        ("csv_not_utf8", b"0.5,1\n2,\xff\n"),
    ] {
        let out = tpc_in(
            name,
            &[("p.tp", prog.as_bytes()), ("x.csv", csv)],
            &[
                "run", "p.tp", "--inputs", "x.csv", "--width", "4", "--seeds", "2",
            ],
        );
        assert_eq!(out.status.code(), Some(1), "{name}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            err.contains("error[E0028]") && err.contains("┌─ x.csv:"),
            "{name}: {err}"
        );
        insta::assert_snapshot!(name, err);
    }
}
