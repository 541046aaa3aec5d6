//! Kernels larger than memory, and kernels across processes: the limit NNGP and NTK
//! computed band by band into disk-backed `.npy` files (`tpc limit --out DIR --memory
//! 4G [--tile I/K]`).
//!
//! Why it works: in the limit every kernel entry K(x, x') is a function of the two points
//! alone (theory.md §1.2: the Master Theorem's expectations are over the pair's joint
//! law), so the M×M matrix splits into blocks computed independently. The points are cut
//! into row bands of b points, b set by the memory budget; for every pair of bands
//! (I ≤ J) the engine runs on the points of I followed by those of J, and the block
//! (I, J) and its transpose (J, I) are written at their offsets of the preallocated
//! files. Every entry is thus computed by exactly one engine run whose inputs do not
//! depend on how many processes share the work: `--tile I/K` (process I of K, bands
//! I, I+K, I+2K, …; for instance from a Slurm job array or under `mpirun`, see
//! [`tile_from_env`]) writes the same bytes as one process does, at the same offsets,
//! and K processes on a shared file system together write the whole matrix.
//!
//! Engine-neutral: this module calls [`crate::limit::limit`] on point subsets and
//! never looks inside the engines. The cost is two engine runs' worth of work per
//! entry pair at most (a band pair recomputes its own diagonal blocks); the chain path
//! makes that cheap next to writing the bytes.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nalgebra::DMatrix;

use crate::ir::Program;
use crate::limit::{limit, LimitError};
use crate::report::npy;

/// Which share of the bands this process computes: bands `index`, `index + count`, …
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub index: usize,
    pub count: usize,
}

impl Tile {
    /// The whole matrix (one process).
    pub const ALL: Tile = Tile { index: 0, count: 1 };

    /// Parses `I/K` (0 ≤ I < K).
    pub fn parse(s: &str) -> Result<Tile, String> {
        let (i, k) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}`: a tile is I/K, e.g. 0/4"))?;
        let (index, count) = (
            i.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{s}`: I is not a number"))?,
            k.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{s}`: K is not a number"))?,
        );
        if count == 0 || index >= count {
            return Err(format!("`{s}`: need 0 ≤ I < K"));
        }
        Ok(Tile { index, count })
    }
}

/// The tile of this process from the environment of a launcher: Open MPI's
/// `OMPI_COMM_WORLD_RANK`/`_SIZE`, MPICH/PMI's `PMI_RANK`/`PMI_SIZE`, or a Slurm job
/// array's `SLURM_ARRAY_TASK_ID` / `SLURM_ARRAY_TASK_COUNT` (with `SLURM_ARRAY_TASK_MIN`
/// subtracted). `None` when none is set. No message passing is needed — every band is
/// independent and written at its own offset — so tpc reads the rank and size and does
/// not link an MPI library.
pub fn tile_from_env(get: &dyn Fn(&str) -> Option<String>) -> Option<Tile> {
    let num = |k: &str| get(k).and_then(|v| v.trim().parse::<usize>().ok());
    let pairs = [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
    ];
    for (r, s) in pairs {
        if let (Some(index), Some(count)) = (num(r), num(s)) {
            return (index < count).then_some(Tile { index, count });
        }
    }
    let (id, count) = (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?);
    let index = id.checked_sub(num("SLURM_ARRAY_TASK_MIN").unwrap_or(0))?;
    (index < count).then_some(Tile { index, count })
}

/// Bytes per pair-block entry the engine and this module hold at once: the two kernels
/// of the block, the engine's own M×M temporaries (measured ≤ 3 M×M for the chain path,
/// `benches/nt_kernels.py`), and a margin for the general engine.
const BYTES_PER_ENTRY: u128 = 8 * 8;

/// Points per band so that a pair of bands (2b points) fits in `memory` bytes.
pub fn band_size(memory: u128, outputs: usize) -> usize {
    let o = outputs.max(1) as u128;
    let entries = memory / (BYTES_PER_ENTRY * o * o);
    let two_b = (entries as f64).sqrt() as usize;
    (two_b / 2).max(1)
}

/// The band pairs (I, J), I ≤ J, that process `tile` computes: those touching one of
/// its bands.
pub fn band_pairs(bands: usize, tile: Tile) -> Vec<(usize, usize)> {
    let mine = |i: usize| i % tile.count == tile.index;
    (0..bands)
        .flat_map(|i| (i..bands).map(move |j| (i, j)))
        .filter(|&(i, j)| mine(i) || mine(j))
        .collect()
}

/// What a tiled run did.
#[derive(Clone, Debug)]
pub struct Tiled {
    pub nngp: PathBuf,
    pub ntk: PathBuf,
    /// Points per band, bands, and the band pairs this process computed.
    pub band: usize,
    pub bands: usize,
    pub pairs: usize,
}

/// Why a tiled run failed.
#[derive(Debug)]
pub enum TileError {
    Limit(LimitError),
    Io(io::Error),
    /// The limit gave no finite kernel (its note).
    NotFinite(String),
}

impl From<io::Error> for TileError {
    fn from(e: io::Error) -> Self {
        TileError::Io(e)
    }
}

/// Opens (creating when absent, never truncating: other processes may be writing) a
/// `.npy` file of an n×n f64 matrix, sized and with its header written.
fn open_npy(path: &Path, n: usize) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let head = npy::header(&[n, n]);
    let len = head.len() as u64 + 8 * (n as u64) * (n as u64);
    if f.metadata()?.len() != len {
        f.set_len(len)?;
    }
    f.write_all_at(&head, 0)?;
    Ok(f)
}

/// Writes rows `rows` (global indices) × columns `col0..col0 + cols` of an n×n
/// row-major matrix from `block` (rows of `block` = `rows`, columns in order).
fn write_rows(
    f: &File,
    base: u64,
    n: usize,
    rows: impl Iterator<Item = usize>,
    col0: usize,
    row_values: impl Fn(usize, &mut Vec<u8>),
) -> io::Result<()> {
    let mut buf = Vec::new();
    for (k, r) in rows.enumerate() {
        buf.clear();
        row_values(k, &mut buf);
        f.write_all_at(&buf, base + 8 * (r as u64 * n as u64 + col0 as u64))?;
    }
    Ok(())
}

/// Computes the NNGP and NTK of `prog` over `points` band by band into
/// `dir/nngp.npy` and `dir/ntk.npy` (O·M × O·M, output-major as cli.md's kernels), for
/// the bands of `tile`, with at most about `memory` bytes of kernel blocks at once.
/// `progress(done, total)` is called after every band pair.
pub fn kernels_to_npy(
    prog: &Program,
    points: &[Vec<f64>],
    dir: &Path,
    memory: u128,
    tile: Tile,
    progress: &dyn Fn(usize, usize),
) -> Result<Tiled, TileError> {
    let mut prog = prog.clone();
    prog.train = None; // kernels only
    let m = points.len();
    let o = prog.outputs.len().max(1);
    let n = o * m;
    let b = band_size(memory, o).min(m.max(1));
    let bands = m.div_ceil(b);
    std::fs::create_dir_all(dir)?;
    let (pn, pt) = (dir.join("nngp.npy"), dir.join("ntk.npy"));
    let (fnngp, fntk) = (open_npy(&pn, n)?, open_npy(&pt, n)?);
    let base = npy::header(&[n, n]).len() as u64;
    let range = |i: usize| i * b..((i + 1) * b).min(m);
    let mine = |i: usize| i % tile.count == tile.index;
    let pairs = band_pairs(bands, tile);
    for (done, &(bi, bj)) in pairs.iter().enumerate() {
        let (ri, rj) = (range(bi), range(bj));
        let sub: Vec<Vec<f64>> = if bi == bj {
            points[ri.clone()].to_vec()
        } else {
            points[ri.clone()]
                .iter()
                .chain(&points[rj.clone()])
                .cloned()
                .collect()
        };
        let r = limit(&prog, &sub).map_err(TileError::Limit)?;
        let (Some(kn), Some(kt)) = (&r.nngp, &r.ntk) else {
            return Err(TileError::NotFinite(
                r.nngp_note.or(r.ntk_note).unwrap_or_default(),
            ));
        };
        let p = sub.len();
        // Local index of global point g of band I (first) or J (after I's points).
        let (li, lj) = (0usize, if bi == bj { 0 } else { ri.len() });
        for (k, f) in [(kn, &fnngp), (kt, &fntk)] {
            for (o1, o2) in (0..o).flat_map(|a| (0..o).map(move |c| (a, c))) {
                let put = |rows: std::ops::Range<usize>,
                           lr: usize,
                           cols: std::ops::Range<usize>,
                           lc: usize,
                           oa: usize,
                           ob: usize|
                 -> io::Result<()> {
                    write_rows(
                        f,
                        base,
                        n,
                        rows.clone().map(|g| oa * m + g),
                        ob * m + cols.start,
                        |kk, buf| {
                            for c in 0..cols.len() {
                                let v = k[(oa * p + lr + kk, ob * p + lc + c)];
                                buf.extend_from_slice(&v.to_le_bytes());
                            }
                        },
                    )
                };
                if mine(bi) {
                    put(ri.clone(), li, rj.clone(), lj, o1, o2)?;
                }
                if bi != bj && mine(bj) {
                    put(rj.clone(), lj, ri.clone(), li, o1, o2)?;
                }
            }
        }
        progress(done + 1, pairs.len());
    }
    fnngp.sync_all()?;
    fntk.sync_all()?;
    Ok(Tiled {
        nngp: pn,
        ntk: pt,
        band: b,
        bands,
        pairs: pairs.len(),
    })
}

/// `meta.json` of a tiled run: outputs, the number of points, kernel order, files.
pub fn meta(prog: &Program, m: usize, t: &Tiled) -> serde_json::Value {
    let n = prog.outputs.len().max(1) * m;
    serde_json::json!({
        "outputs": prog.output_names(),
        "points": m,
        "order": crate::report::limit::KERNEL_ORDER,
        "files": {
            "nngp": {"file": "nngp.npy", "shape": [n, n]},
            "ntk": {"file": "ntk.npy", "shape": [n, n]},
        },
        "tiles": {"band": t.band, "bands": t.bands, "pairs_here": t.pairs},
    })
}

/// Writes `meta.json` into `dir`.
pub fn write_meta(dir: &Path, v: &serde_json::Value) -> io::Result<()> {
    let mut f = File::create(dir.join("meta.json"))?;
    f.write_all((serde_json::to_string_pretty(v).map_err(io::Error::other)? + "\n").as_bytes())
}

/// Reads an n×n `.npy` written by [`kernels_to_npy`] back (tests and small checks).
pub fn read_npy(path: &Path) -> io::Result<DMatrix<f64>> {
    let bytes = std::fs::read(path)?;
    let (shape, start) = npy::parse_header(&bytes)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an f64 .npy"))?;
    let (r, c) = match shape[..] {
        [r, c] => (r, c),
        _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "not a matrix")),
    };
    let data = &bytes[start..];
    if data.len() != 8 * r * c {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated"));
    }
    Ok(DMatrix::from_fn(r, c, |i, j| {
        let k = 8 * (i * c + j);
        let mut w = [0u8; 8];
        w.copy_from_slice(&data[k..k + 8]);
        f64::from_le_bytes(w)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_parse_and_come_from_launchers() {
        assert_eq!(Tile::parse("1/4"), Ok(Tile { index: 1, count: 4 }));
        assert!(Tile::parse("4/4").is_err() && Tile::parse("x").is_err());
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(a, _)| *a == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let ompi = env(&[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2")]);
        assert_eq!(tile_from_env(&ompi), Some(Tile { index: 1, count: 2 }));
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_MIN", "3"),
        ]);
        assert_eq!(tile_from_env(&slurm), Some(Tile { index: 2, count: 4 }));
        assert_eq!(tile_from_env(&env(&[])), None);
    }

    #[test]
    fn bands_fit_the_budget() {
        let b = band_size(4 << 30, 1);
        assert!((2 * b) as u128 * (2 * b) as u128 * BYTES_PER_ENTRY <= 4 << 30);
        assert!(b > 1000);
        assert_eq!(band_size(0, 1), 1);
    }
}
