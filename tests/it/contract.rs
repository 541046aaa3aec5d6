//! The project carries what it tests: its copies of the contract (`examples/*.tp`,
//! `tests/data/refs/`, `docs/{language,cli,theory}.md`) must equal `../shared` byte for
//! byte whenever `../shared` is beside the clone. Without it (a fresh clone) there is
//! nothing to compare against and the test says so.

use crate::common;

use std::path::{Path, PathBuf};

/// Every regular file under `dir`, as paths relative to `dir`, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn assert_same_bytes(ours: &Path, theirs: &Path) {
    let a = std::fs::read(ours).unwrap_or_else(|e| panic!("{}: {e}", ours.display()));
    let b = std::fs::read(theirs).unwrap_or_else(|e| panic!("{}: {e}", theirs.display()));
    assert!(
        a == b,
        "{} differs from {}: copy the contract's version into the project",
        ours.display(),
        theirs.display()
    );
}

#[test]
fn project_copies_equal_the_shared_contract() {
    let Some(shared) = common::upstream_shared() else {
        eprintln!(
            "skipped: no ../shared beside the crate; the tests use the project's copies \
             (examples/, tests/data/refs/, docs/) without comparing them"
        );
        return;
    };
    // The examples: every contract example has its copy, byte for byte. The project's
    // examples/ may hold more (CSV points of its own), so only `.tp` files are compared
    // and only in one direction for non-contract files.
    let theirs = shared.join("spec").join("examples");
    let names = files_under(&theirs);
    assert!(names.len() >= 6, "expected the six contract examples");
    for rel in &names {
        assert_same_bytes(&common::examples_dir().join(rel), &theirs.join(rel));
    }
    // The project's own examples (README "Scalars and reductions") are not contract
    // files; every other `.tp` is.
    let ours_tp: Vec<PathBuf> = files_under(&common::examples_dir())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "tp"))
        .filter(|p| {
            let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned());
            !stem.is_some_and(|s| {
                common::PROJECT_EXAMPLES.contains(&s.as_str())
                    || common::OPTIM_EXAMPLES.contains(&s.as_str())
            })
        })
        .collect();
    assert_eq!(
        ours_tp,
        names
            .iter()
            .filter(|p| p.extension().is_some_and(|x| x == "tp"))
            .cloned()
            .collect::<Vec<_>>(),
        "examples/*.tp are exactly the contract's examples"
    );
    // The references: the same set of files, byte for byte.
    let theirs = shared.join("refs");
    let names = files_under(&theirs);
    assert_eq!(files_under(&common::refs_dir()), names, "tests/data/refs/");
    for rel in &names {
        assert_same_bytes(&common::refs_dir().join(rel), &theirs.join(rel));
    }
    // The specification.
    for doc in ["language.md", "cli.md", "theory.md"] {
        assert_same_bytes(
            &common::manifest().join("docs").join(doc),
            &shared.join("spec").join(doc),
        );
    }
}

#[test]
fn project_copies_are_present() {
    // Whatever is beside the clone, the copies the tests read are in the repository.
    assert!(common::examples().len() >= 6);
    for f in ["nt_kernels.json", "programs/X1.csv", "programs/X3.csv"] {
        assert!(common::refs_dir().join(f).is_file(), "tests/data/refs/{f}");
    }
    for doc in ["language.md", "cli.md", "theory.md"] {
        assert!(
            common::manifest().join("docs").join(doc).is_file(),
            "docs/{doc}"
        );
    }
}
