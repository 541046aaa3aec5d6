//! NumPy `.npy` files (format version 1.0), written by hand: a magic string, a header
//! dict `{'descr': '<f8', 'fortran_order': False, 'shape': (r, c), }` padded with
//! spaces and a newline so that the data starts at a multiple of 64 bytes, then the
//! entries as little-endian f64 in row-major (C) order
//! (<https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html>).
//!
//! `tpc limit --out DIR` and `tpc run --out DIR` write every kernel this way, with a
//! small `meta.json` beside it (docs/cli.md), so that `np.load` reads an M×M kernel
//! without anyone parsing M² JSON numbers.

use std::io::{self, Write};
use std::path::Path;

use nalgebra::DMatrix;

/// The magic string and version 1.0.
const MAGIC: &[u8] = b"\x93NUMPY\x01\x00";

/// The header of an f64 C-order array of `shape`: magic, version, header length
/// (u16 little-endian), the dict, padding to a multiple of 64 bytes ending in `\n`.
pub fn header(shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {dims}, }}");
    // magic (8) + length (2) + dict + padding + '\n' ≡ 0 (mod 64)
    let unpadded = MAGIC.len() + 2 + dict.len() + 1;
    dict.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    dict.push('\n');
    let mut out = MAGIC.to_vec();
    // A v1.0 header is at most 65535 bytes; shapes here are two numbers.
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Writes `m` as an r×c `.npy` array in row-major order.
///
/// Why blocks of rows: `m` is column-major, so a row is strided in memory. Gathering
/// `ROW_BLOCK` rows at a time reads each column's segment contiguously and hands the
/// writer one large buffer (≈ 1 MB at c = 2000) instead of r small ones.
pub fn write_matrix(w: &mut impl Write, m: &DMatrix<f64>) -> io::Result<()> {
    w.write_all(&header(&[m.nrows(), m.ncols()]))?;
    let (r, c) = (m.nrows(), m.ncols());
    let mut vals = vec![0.0f64; ROW_BLOCK.min(r) * c];
    let mut bytes = Vec::with_capacity(vals.len() * 8);
    let mut r0 = 0;
    while r0 < r {
        let b = ROW_BLOCK.min(r - r0);
        for j in 0..c {
            let col = &m.column(j);
            for i in 0..b {
                vals[i * c + j] = col[r0 + i];
            }
        }
        bytes.clear();
        for v in &vals[..b * c] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        w.write_all(&bytes)?;
        r0 += b;
    }
    Ok(())
}

/// Rows gathered per write in [`write_matrix`].
const ROW_BLOCK: usize = 64;

/// Writes `values` as a one-dimensional `.npy` array.
pub fn write_vector(w: &mut impl Write, values: &[f64]) -> io::Result<()> {
    w.write_all(&header(&[values.len()]))?;
    for v in values {
        w.write_all(&v.to_le_bytes())?;
    }
    Ok(())
}

/// Writes `m` to the file `path` (buffered).
pub fn save_matrix(path: &Path, m: &DMatrix<f64>) -> io::Result<()> {
    let mut w = io::BufWriter::new(std::fs::File::create(path)?);
    write_matrix(&mut w, m)?;
    w.flush()
}

/// Reads back what [`header`] wrote: the shape and the offset of the data; `None` for
/// anything else (the unit tests' check of the format).
pub fn parse_header(bytes: &[u8]) -> Option<(Vec<usize>, usize)> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let len = u16::from_le_bytes([*rest.first()?, *rest.get(1)?]) as usize;
    let dict = std::str::from_utf8(rest.get(2..2 + len)?).ok()?;
    let start = MAGIC.len() + 2 + len;
    if !start.is_multiple_of(64) || !dict.ends_with('\n') {
        return None;
    }
    let body = dict
        .trim_end()
        .strip_prefix("{'descr': '<f8', 'fortran_order': False, 'shape': (")?
        .strip_suffix("), }")?;
    let shape = body
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().ok())
        .collect::<Option<Vec<usize>>>()?;
    Some((shape, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_parses_back_and_aligns_the_data() {
        for shape in [
            vec![0, 0],
            vec![3, 2],
            vec![2000, 2000],
            vec![7],
            vec![123456789, 1],
        ] {
            let h = header(&shape);
            assert_eq!(h.len() % 64, 0, "{shape:?}");
            let (back, start) = parse_header(&h).expect("parses");
            assert_eq!((back, start), (shape, h.len()));
        }
    }

    #[test]
    fn entries_are_little_endian_row_major() {
        let m = DMatrix::from_row_slice(2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, -0.5]);
        let mut bytes = Vec::new();
        write_matrix(&mut bytes, &m).expect("in memory");
        let (shape, start) = parse_header(&bytes).expect("parses");
        assert_eq!(shape, vec![2, 3]);
        let vals: Vec<f64> = bytes[start..]
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        assert_eq!(vals, vec![1.0, 2.0, 3.0, 4.0, 5.0, -0.5]);
    }

    #[test]
    fn blocks_of_rows_keep_row_major_order() {
        // more rows than one block, and a partial last block
        let (r, c) = (2 * ROW_BLOCK + 5, 3);
        let m = DMatrix::from_fn(r, c, |i, j| (i * c + j) as f64);
        let mut bytes = Vec::new();
        write_matrix(&mut bytes, &m).expect("in memory");
        let (shape, start) = parse_header(&bytes).expect("parses");
        assert_eq!(shape, vec![r, c]);
        let vals: Vec<f64> = bytes[start..]
            .chunks_exact(8)
            .map(|ch| f64::from_le_bytes(ch.try_into().expect("8 bytes")))
            .collect();
        assert_eq!(vals, (0..r * c).map(|k| k as f64).collect::<Vec<_>>());
    }
}
