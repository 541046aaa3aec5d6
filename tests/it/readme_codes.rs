//! README's list of diagnostic codes names exactly the codes of `tpc::diag::CODES`.

use std::collections::BTreeSet;

/// Every token shaped like a code (`E0001`, `W0101`, `N0102`) in `text`.
fn codes_in(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| {
            w.len() == 5
                && matches!(w.as_bytes()[0], b'E' | b'W' | b'N')
                && w[1..].bytes().all(|b| b.is_ascii_digit())
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn readme_lists_every_diagnostic_code() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("## Diagnostic codes")
        .expect("README has a `## Diagnostic codes` section");
    let rest = &readme[start + 3..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let listed = codes_in(section);
    let known: BTreeSet<String> = tpc::diag::CODES.iter().map(|c| c.0.to_string()).collect();
    let missing: Vec<_> = known.difference(&listed).collect();
    let unknown: Vec<_> = listed.difference(&known).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "README's code list: missing {missing:?}, not in CODES {unknown:?}"
    );
}

#[test]
fn the_scan_finds_codes_and_only_codes() {
    let got = codes_in("E0001 syntax, W0101 x; N0102. E00012 E001 X0001 `E0030`");
    let want: BTreeSet<String> = ["E0001", "W0101", "N0102", "E0030"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(got, want);
}
