//! Issue 16 (out of core, tiles): `tpc limit --out DIR --memory SIZE [--tile I/K]`
//! computes the kernels band by band into the `.npy` files. The banded files equal the
//! in-memory ones (byte for byte on the closed-form chain path; within the stated
//! quadrature error on an RNN), and K processes writing their tiles into one directory
//! produce the same bytes as one process.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tpc-tiles-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn limit_out(prog: &Path, inputs: &Path, dir: &Path, extra: &[&str]) {
    let mut args = vec![
        "limit".to_string(),
        prog.display().to_string(),
        "--inputs".into(),
        inputs.display().to_string(),
        "--out".into(),
        dir.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = Command::new(env!("CARGO_BIN_EXE_tpc"))
        .args(&args)
        .output()
        .expect("tpc runs");
    assert!(
        o.status.success(),
        "tpc {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn bytes(dir: &Path, k: &str) -> Vec<u8> {
    std::fs::read(dir.join(format!("{k}.npy"))).expect("npy written")
}

/// 37 points of the depth-10 relu benchmark (d = 32), bands of a few points.
#[test]
fn banded_chain_kernels_equal_the_in_memory_ones_byte_for_byte() {
    let dir = tmp("chain");
    let pts = dir.join("p.csv");
    let text: String = (0..37)
        .map(|i| {
            (0..32)
                .map(|j| format!("{}", (((i * 32 + j) as f64) * 0.61).sin()))
                .collect::<Vec<_>>()
                .join(",")
                + "\n"
        })
        .collect();
    std::fs::write(&pts, text).expect("points");
    let prog = common::manifest().join("benches/mlp10.tp");
    let (full, banded, tiled) = (dir.join("full"), dir.join("banded"), dir.join("tiled"));
    limit_out(&prog, &pts, &full, &[]);
    // 64 bytes per entry: 40 KB gives bands of 12 points (4 bands).
    limit_out(&prog, &pts, &banded, &["--memory", "40K"]);
    for i in 0..3 {
        limit_out(
            &prog,
            &pts,
            &tiled,
            &["--memory", "40K", "--tile", &format!("{i}/3")],
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(banded.join("meta.json")).expect("meta.json"))
            .expect("json");
    assert!(
        meta["tiles"]["bands"].as_u64().expect("bands") >= 3,
        "{meta}"
    );
    for k in ["nngp", "ntk"] {
        assert!(bytes(&full, k) == bytes(&banded, k), "{k}: banded differs");
        assert!(bytes(&banded, k) == bytes(&tiled, k), "{k}: tiles differ");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The bundled RNN (quadrature, general engine): banded = in-memory within the stated
/// error, and 2 tiles = 1 process byte for byte.
#[test]
fn banded_rnn_kernels_agree_and_tiles_are_byte_identical() {
    let dir = tmp("rnn");
    let prog = common::example_path("rnn");
    let pts = common::examples_dir().join("rnn_points.csv");
    let (full, banded, tiled) = (dir.join("full"), dir.join("banded"), dir.join("tiled"));
    limit_out(&prog, &pts, &full, &[]);
    limit_out(&prog, &pts, &banded, &["--memory", "1K"]);
    for i in 0..2 {
        limit_out(
            &prog,
            &pts,
            &tiled,
            &["--memory", "1K", "--tile", &format!("{i}/2")],
        );
    }
    for k in ["nngp", "ntk"] {
        let a = tpc::tiles::read_npy(&full.join(format!("{k}.npy"))).expect("read");
        let b = tpc::tiles::read_npy(&banded.join(format!("{k}.npy"))).expect("read");
        assert_eq!(a.shape(), b.shape());
        let err = (&a - &b).amax();
        // The limit's stated error for rnn.tp is ≤ 1e-12 per expectation.
        assert!(err <= 1e-11 * a.amax().max(1.0), "{k}: {err:e}");
        assert!(bytes(&banded, k) == bytes(&tiled, k), "{k}: tiles differ");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tile that is not I/K with I < K is a usage error with a message.
#[test]
fn a_bad_tile_is_refused() {
    let dir = tmp("bad");
    let o = Command::new(env!("CARGO_BIN_EXE_tpc"))
        .args([
            "limit",
            &common::example_path("rnn").display().to_string(),
            "--inputs",
            &common::examples_dir()
                .join("rnn_points.csv")
                .display()
                .to_string(),
            "--out",
            &dir.display().to_string(),
            "--tile",
            "3/3",
        ])
        .output()
        .expect("tpc runs");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("0 ≤ I < K"));
    let _ = std::fs::remove_dir_all(&dir);
}
