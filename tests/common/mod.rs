//! Helpers shared by the integration tests: where the contract lives.
#![allow(dead_code)]

use std::path::PathBuf;

/// `../shared` beside the crate (CI has it at the same place).
pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("shared")
}

/// Every contract example, sorted by name: (stem, source).
pub fn examples() -> Vec<(String, String)> {
    let dir = shared().join("spec").join("examples");
    let mut out: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "tp"))
        .map(|p| {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            (stem, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(
        out.len() >= 6,
        "expected the six contract examples in {}",
        dir.display()
    );
    out
}

pub fn example(name: &str) -> String {
    std::fs::read_to_string(
        shared()
            .join("spec")
            .join("examples")
            .join(format!("{name}.tp")),
    )
    .unwrap()
}
