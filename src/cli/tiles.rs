//! `tpc limit --out DIR --memory SIZE [--tile I/K]`: kernels beyond memory and across
//! processes, the glue from the command line to `tpc::tiles` (README, "Kernels beyond
//! memory and across processes").

use std::path::Path;

use tpc::ir::Program;

use super::io::{fail, limit_fail, with_progress_of};
use crate::Reported;

/// A size such as `4G`, `512M`, `100000` (bytes; K, M, G, T are powers of 1024).
pub(crate) fn parse_size(s: &str) -> Result<u128, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u128 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("`{s}`: a size is a number with K, M, G or T")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: a size is a number with K, M, G or T"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("`{s}`: a size is positive"));
    }
    Ok((v * mult as f64) as u128)
}

/// `tpc limit --out DIR` band by band ([`tpc::tiles`]) when asked for (`--memory`,
/// `--tile`) or when the kernels would not fit in the free memory; `None` to compute
/// them in memory as usual.
pub(crate) fn tiled_limit(
    file: &Path,
    prog: &Program,
    points: &[Vec<f64>],
    dir: &Path,
    memory: Option<u128>,
    tile: Option<String>,
) -> Result<Option<serde_json::Value>, Reported> {
    let free = tpc::machine::mem_available();
    let n = (prog.outputs.len().max(1) * points.len()) as u128;
    // The in-memory path holds ≈ 3 n×n matrices at its peak (README, "Outputs").
    let too_big = free.is_some_and(|f| 3 * 8 * n * n > f / 2);
    if memory.is_none() && tile.is_none() && !too_big {
        return Ok(None);
    }
    if prog.train.is_some() || !prog.observes.is_empty() {
        eprintln!("note: the banded computation writes the kernels only (no f_t, no observes)");
    }
    let tile = match tile.as_deref() {
        None => tpc::tiles::Tile::ALL,
        Some("auto") => tpc::tiles::tile_from_env(&|k| std::env::var(k).ok()).ok_or_else(|| {
            fail("--tile auto: no OMPI_COMM_WORLD_RANK/SIZE, PMI_RANK/SIZE or SLURM_ARRAY_TASK_ID/COUNT in the environment")
        })?,
        Some(t) => tpc::tiles::Tile::parse(t).map_err(|e| fail(&format!("--tile {e}")))?,
    };
    let memory = memory.unwrap_or_else(|| free.map_or(4 << 30, |f| f / 2));
    let bands = points
        .len()
        .div_ceil(tpc::tiles::band_size(memory, prog.outputs.len()));
    let pairs = tpc::tiles::band_pairs(bands, tile).len();
    let r = with_progress_of(pairs, "band pairs", |tick| {
        tpc::tiles::kernels_to_npy(prog, points, dir, memory, tile, &|_, _| tick())
    });
    let t = r.map_err(|e| match e {
        tpc::tiles::TileError::Limit(e) => limit_fail(file, &e),
        tpc::tiles::TileError::Io(e) => {
            fail(&format!("cannot write into `{}`: {e}", dir.display()))
        }
        tpc::tiles::TileError::NotFinite(note) => fail(&format!(
            "{}: the limit kernels are not finite: {note}",
            file.display()
        )),
    })?;
    let meta = tpc::tiles::meta(prog, points.len(), &t);
    if tile.index == 0 {
        tpc::tiles::write_meta(dir, &meta)
            .map_err(|e| fail(&format!("cannot write into `{}`: {e}", dir.display())))?;
    }
    Ok(Some(meta))
}
