//! Property tests over the grammar: no input crashes or hangs the front end.
//!
//! Bounded for CI (256 cases per property by default). Run longer with e.g.
//! `PROPTEST_CASES=200000 cargo test --release --test it fuzz_frontend::`.

use crate::common;

use proptest::prelude::*;

/// Tokens of the language and a few that are not.
const TOKENS: &[&str] = &[
    "width",
    "n",
    "const",
    "T",
    "=",
    "4",
    "input",
    "x",
    ":",
    "3",
    "[",
    "]",
    "param",
    "W",
    "U",
    "v",
    "b",
    "n x n",
    "n x 3",
    "1 x n",
    "~",
    "N(0, 1/n)",
    "N",
    "(",
    ")",
    ",",
    "*",
    "/",
    "+",
    "-",
    "n^(-1/2)",
    "lr",
    "{",
    "}",
    "std",
    "1.5",
    "parameterization",
    "ntk",
    "mup",
    "sp",
    "h",
    "h[t]",
    "h[t-1]",
    "h[0]",
    "@",
    ".T",
    "relu",
    "tanh",
    "erf",
    "mean",
    "for",
    "t",
    "in",
    "1..=T",
    "..",
    "output",
    "f",
    "observe",
    "m",
    "train",
    "loss",
    "mse",
    "steps",
    "data",
    "([1.0, 0.0], 1.0)",
    "\n",
    " ",
    "#c\n",
    "0",
    "-1",
    "1e308",
    "9999999999999999999",
    "^",
    "x[1]",
    "$",
    "\u{e9}",
    "\"",
    "..=",
];

fn check(src: &[u8]) -> Result<(), TestCaseError> {
    let (text, prog, diags) = tpc::check_bytes(src);
    for d in &diags {
        prop_assert!(
            !d.message.contains("internal error"),
            "internal error on {:?}",
            String::from_utf8_lossy(src)
        );
        prop_assert!(
            d.span.start <= d.span.end && d.span.end <= text.len() + 4,
            "span {:?} of {}",
            d.span,
            text.len()
        );
        if d.is_error() {
            prop_assert!(d.help.is_some(), "{} without help", d.code);
        }
    }
    prop_assert_eq!(prog.is_some(), !diags.iter().any(|d| d.is_error()));
    if let Some(p) = prog {
        prop_assert!(p.validate().is_ok());
        let _ = tpc::report::graph::listing(&p);
        let _ = tpc::report::graph::json(&p);
    }
    // Rendering must not panic either.
    let _ = tpc::error_for("fuzz.tp", &text, diags).render();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn token_soup(toks in prop::collection::vec(prop::sample::select(TOKENS), 0..60)) {
        let src = toks.join(" ");
        check(src.as_bytes())?;
    }

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        check(&bytes)?;
    }

    #[test]
    fn mutated_examples(which in 0usize..6, edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..4, prop::sample::select(TOKENS)), 1..6)) {
        let examples = common::examples();
        let mut src = examples[which % examples.len()].1.clone().into_bytes();
        for (at, op, tok) in edits {
            let i = if src.is_empty() { 0 } else { at.index(src.len()) };
            match op {
                0 => { src.drain(i..(i + 3).min(src.len())); }
                1 => { src.splice(i..i, tok.bytes()); }
                2 => { let j = (i + tok.len()).min(src.len()); src.splice(i..j, tok.bytes()); }
                _ => { if i < src.len() { src[i] ^= 0x20; } }
            }
        }
        check(&src)?;
    }
}
