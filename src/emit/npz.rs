//! `tpc run --save-params FILE.npz`: the sampled parameters of one draw as a NumPy
//! `.npz` (a zip of `.npy` files, stored without compression, written by hand: the
//! local headers, the central directory and its end record of the zip format,
//! <https://pkware.cachefly.net/webdocs/casestudies/APPNOTE.TXT>), one float64 array
//! per parameter named by its `.tp` name and shaped as declared
//! ([`super::declared_shape`]). `np.load` reads it; the emitted module's `load_npz`
//! loads it, so tpc's finite executor and the emitted module run on identical weights.

use std::io::{self, Write};

use nalgebra::DMatrix;

use crate::finite::exec::{sample_params, RunError};
use crate::ir::Program;
use crate::report::npy;

/// The `.npy` bytes of parameter `w` (stored as `finite` stores it: hidden N×N,
/// input N×d, readout and vector N×1, scalar 1×1) in its declared shape.
fn npy_bytes(w: &DMatrix<f64>, shape: &[usize]) -> Vec<u8> {
    let mut out = npy::header(shape);
    out.reserve(w.len() * 8);
    // Row-major: entry (i, j) of the stored matrix at i * ncols + j. A readout's and a
    // vector's N×1 column is the same sequence as its declared (1, n) or (n,).
    for i in 0..w.nrows() {
        for j in 0..w.ncols() {
            out.extend_from_slice(&w[(i, j)].to_le_bytes());
        }
    }
    out
}

/// CRC-32 (IEEE, reflected, polynomial 0xEDB88320) of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, t) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *t = c;
    }
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Writes a stored (uncompressed) zip of `files` (name, bytes). Sizes and offsets
/// must fit the 32-bit fields of the classic format (no zip64): an error otherwise.
pub fn write_zip(w: &mut impl Write, files: &[(String, Vec<u8>)]) -> io::Result<()> {
    let too_big = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the parameters pass 4 GiB, the limit of a .npz without zip64: save a smaller width",
        )
    };
    let mut offset: u64 = 0;
    let mut central = Vec::new();
    // 1980-01-01 00:00, the zip epoch: fixed, so the same draw writes the same bytes.
    let (time, date) = (0u16, (1u16 << 5) | 1);
    for (name, data) in files {
        let crc = crc32(data);
        let size = u32::try_from(data.len()).map_err(|_| too_big())?;
        let off = u32::try_from(offset).map_err(|_| too_big())?;
        let nm = name.as_bytes();
        let mut local = Vec::with_capacity(30 + nm.len());
        local.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        local.extend_from_slice(&20u16.to_le_bytes()); // version needed: 2.0
        local.extend_from_slice(&0u16.to_le_bytes()); // flags
        local.extend_from_slice(&0u16.to_le_bytes()); // stored
        local.extend_from_slice(&time.to_le_bytes());
        local.extend_from_slice(&date.to_le_bytes());
        local.extend_from_slice(&crc.to_le_bytes());
        local.extend_from_slice(&size.to_le_bytes());
        local.extend_from_slice(&size.to_le_bytes());
        local.extend_from_slice(&(nm.len() as u16).to_le_bytes());
        local.extend_from_slice(&0u16.to_le_bytes()); // extra
        local.extend_from_slice(nm);
        w.write_all(&local)?;
        w.write_all(data)?;
        offset += local.len() as u64 + data.len() as u64;

        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes()); // made by
        central.extend_from_slice(&20u16.to_le_bytes()); // needed
        central.extend_from_slice(&0u16.to_le_bytes());
        central.extend_from_slice(&0u16.to_le_bytes());
        central.extend_from_slice(&time.to_le_bytes());
        central.extend_from_slice(&date.to_le_bytes());
        central.extend_from_slice(&crc.to_le_bytes());
        central.extend_from_slice(&size.to_le_bytes());
        central.extend_from_slice(&size.to_le_bytes());
        central.extend_from_slice(&(nm.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0u8; 12]); // extra, comment, disk, internal, external (2+2+2+2+4)
        central.extend_from_slice(&off.to_le_bytes());
        central.extend_from_slice(nm);
    }
    let cd_off = u32::try_from(offset).map_err(|_| too_big())?;
    let cd_len = u32::try_from(central.len()).map_err(|_| too_big())?;
    let count = u16::try_from(files.len()).map_err(|_| too_big())?;
    w.write_all(&central)?;
    let mut end = Vec::with_capacity(22);
    end.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    end.extend_from_slice(&[0u8; 4]); // disk numbers
    end.extend_from_slice(&count.to_le_bytes());
    end.extend_from_slice(&count.to_le_bytes());
    end.extend_from_slice(&cd_len.to_le_bytes());
    end.extend_from_slice(&cd_off.to_le_bytes());
    end.extend_from_slice(&0u16.to_le_bytes()); // comment
    w.write_all(&end)
}

/// The `.npz` bytes of draw `draw` of seed `seed` at width `n`: every parameter's
/// trainable `w` (the N(0, var) draw, without its multiplier), by `.tp` name.
pub fn params_npz(prog: &Program, n: usize, seed: u64, draw: usize) -> Result<Vec<u8>, RunError> {
    let ws = sample_params(prog, n, seed, draw)?;
    let files: Vec<(String, Vec<u8>)> = prog
        .params
        .iter()
        .zip(&ws)
        .map(|(p, w)| {
            (
                format!("{}.npy", p.name),
                npy_bytes(w, &super::declared_shape(p.shape, n)),
            )
        })
        .collect();
    let mut out = Vec::new();
    write_zip(&mut out, &files)
        .map_err(|e| RunError::resources(e.to_string(), "save a smaller width"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check value of CRC-32/ISO-HDLC.
    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
