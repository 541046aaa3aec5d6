//! Every failure of every subcommand that takes `--format json` prints one valid JSON
//! object with an `error` on stdout (issue 18, docs/cli.md "Errors as JSON"), and exits
//! with a failure code: a missing file, a syntax error, an undefined name, a bad
//! `--inputs` file, a refused limit, a refused run, a usage error.

use std::process::Command;

fn tpc(args: &[&str]) -> (Option<i32>, Vec<u8>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tpc"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_failure_is_json_on_stdout() {
    let dir = std::env::temp_dir().join(format!("tpc-json-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let good = write(
        "good.tp",
        "width n\ninput x : 2\nparam U : n x 2\nparam v : 1 x n\noutput f = v @ relu(U @ x)\n",
    );
    let files = [
        ("missing file", dir.join("none.tp").to_str().unwrap().to_string()),
        ("syntax", write("syntax.tp", "width n\nparam W : n x\n")),
        ("undefined", write("undef.tp", "width n\nparam W : n x n\nh = W @ zz\n")),
        // No Gaussian expectation: the limit refuses (E0031), the run warns.
        (
            "no expectation",
            write(
                "pole.tp",
                "width n\ninput x : 2\nparam U : n x 2\nparam v : 1 x n\noutput f = v @ (1 / (U @ x))\n",
            ),
        ),
    ];
    let bad_csv = write("bad.csv", "1.0,zz\n");
    let mut cases: Vec<(String, Vec<String>)> = Vec::new();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    for (what, f) in &files {
        for cmd in [
            s(&["graph", f]),
            s(&["limit", f]),
            s(&["run", f, "--width", "8", "--seeds", "2"]),
            s(&["compare", f, "--widths", "8", "16", "--seeds", "2"]),
            s(&[
                "coord-check",
                f,
                "--widths",
                "8",
                "16",
                "--seeds",
                "2",
                "--no-svg",
            ]),
        ] {
            if *what == "no expectation" && (cmd[0] == "graph" || cmd[0] == "run") {
                continue; // not a failure of these commands (a warning)
            }
            cases.push((format!("{what}: {}", cmd[0]), cmd));
        }
    }
    cases.push((
        "bad --inputs: limit".into(),
        s(&["limit", &good, "--inputs", &bad_csv]),
    ));
    cases.push((
        "bad --inputs: run".into(),
        s(&[
            "run", &good, "--inputs", &bad_csv, "--width", "8", "--seeds", "2",
        ]),
    ));
    cases.push((
        "missing --inputs file: limit".into(),
        s(&["limit", &good, "--inputs", "/nonexistent/p.csv"]),
    ));
    cases.push((
        "usage: run without --width".into(),
        s(&["run", &good, "--seeds", "2"]),
    ));
    cases.push((
        "usage: compare with one width".into(),
        s(&["compare", &good, "--widths", "8", "--seeds", "2"]),
    ));
    cases.push((
        "usage: unknown flag".into(),
        s(&["limit", &good, "--bogus"]),
    ));
    for (what, mut args) in cases {
        args.push("--format".into());
        args.push("json".into());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = tpc(&argv);
        assert!(code != Some(0), "{what}: exit 0\n{err}");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_else(|e| {
            panic!(
                "{what}: stdout is not JSON ({e}): {:?}\nstderr: {err}",
                String::from_utf8_lossy(&out)
            )
        });
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !msg.is_empty() || v["error"]["code"].is_string(),
            "{what}: {v}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
