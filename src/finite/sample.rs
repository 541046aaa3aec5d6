//! Reproducible, parallel, fast Gaussian sampling of parameters.
//!
//! # Seeding scheme (stable: changing it changes every finite-width result)
//!
//! Every random stream is named by a [`StreamKey`] `(seed, draw, tensor, column)`:
//!
//! - `seed`: the run's seed, chosen by the user;
//! - `draw`: which independent sample of the whole network this is (draw `k` of
//!   `K`, e.g. for Monte-Carlo averages over initialisations);
//! - `tensor`: which parameter tensor (the executor numbers them, e.g. in IR order);
//! - `column`: which column of that tensor (column-major storage).
//!
//! The key is hashed to one `u64` by absorbing its four words in that order into a
//! SplitMix64 state:
//!
//! ```text
//! h = KEY_DOMAIN
//! for w in [seed, draw, tensor, column]:  h = mix64((h + GAMMA) XOR w)
//! ```
//!
//! where `mix64` is SplitMix64's output finaliser and `GAMMA = 0x9E3779B97F4A7C15`.
//! `h` then seeds a SplitMix64 generator whose first four outputs, written
//! little-endian, are the 256-bit state of a [`Xoshiro256PlusPlus`] (named
//! explicitly: `rand::rngs::SmallRng` is documented as non-portable, its algorithm
//! may change between rand versions). Each column of every tensor thus has its own
//! stream, and a value depends only on its key and its row, so:
//!
//! - draw `k` of seed `S` is the same whether 1 or 1000 draws are run, in any order;
//! - results do not depend on the number of threads, since threads only decide
//!   which columns are filled when, never which stream a column uses;
//! - a block of columns `[c0, c1)` can be filled on its own (key `column = c0`) and
//!   equals the same columns of the whole matrix.
//!
//! Distinct keys collide in `h` with probability about `n²/2^65` for `n` streams
//! (below 10⁻⁷ for a million streams); distinct seeds of Xoshiro256++ give streams
//! that do not overlap in practice (period 2²⁵⁶ − 1).
//!
//! # Sampler
//!
//! [`standard_normal`] is a 256-layer ziggurat (Marsaglia & Tsang, 2000) that uses
//! **one** `u64` per draw on its fast path (≈ 99 % of draws): bits 0–7 pick the
//! layer, bit 8 the sign and bits 11–63 give a 53-bit uniform `m·2⁻⁵³`. The
//! wedges and the tail beyond `r ≈ 3.654` are sampled exactly (the tail by
//! Marsaglia's 1964 exponential method), so the output is exactly N(0,1) up to
//! the 2⁻⁵³ grid of the uniform. The tests check moments, a Kolmogorov–Smirnov
//! test against Φ, a 550-bin histogram of 10⁸ draws, tail frequencies and a
//! separate KS test of the tail sampler; each was shown to fail on a deliberately
//! wrong wedge test, tail test or table entry.
//!
//! Why not `rand_distr::StandardNormal`: it is the same algorithm, but its fast
//! path converts to a float, multiplies and compares in floating point, flips the
//! sign with a second multiply and calls the generator through a `&mut`; ours
//! decides acceptance with one integer compare against a precomputed table,
//! absorbs the sign and the standard deviation into a 512-entry multiplier table,
//! and keeps the generator's state in registers in the fill loop. Measured
//! on this project's 2-vCPU machine (`benches/finite_kernels.rs`, interleaved
//! rounds): about 2.0 ns per value at best and 3–4 ns typical on one thread,
//! against 2.7 / 4.6 ns for `rand_distr` and 1.0 / 1.3 ns for the raw generator
//! alone. Its values are therefore *not* those of `rand_distr`.

use nalgebra::DMatrix;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use std::sync::OnceLock;

/// SplitMix64's increment (2⁶⁴/φ, odd).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Initial hash state: separates tpc's streams from any other user of SplitMix64
/// hashing of small integers. (The ASCII bytes of "tpc-fin1".)
const KEY_DOMAIN: u64 = 0x7470_632d_6669_6e31;

/// SplitMix64's output function (Steele, Lea & Flood 2014): a bijection on `u64`
/// with strong avalanche, so nearby counters give unrelated seeds.
#[inline]
const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Name of one random stream; see the module documentation for the scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct StreamKey {
    /// The run's seed.
    pub seed: u64,
    /// Which independent sample of the network (draw `k` of `K`).
    pub draw: u64,
    /// Which parameter tensor.
    pub tensor: u64,
    /// Which column; when filling a matrix, the key's column is the index of its
    /// first column, and column `j` of the buffer uses `column + j`.
    pub column: u64,
}

impl StreamKey {
    /// Key of column 0 of `tensor` in draw `draw` of run `seed`.
    pub const fn new(seed: u64, draw: u64, tensor: u64) -> Self {
        StreamKey {
            seed,
            draw,
            tensor,
            column: 0,
        }
    }

    /// The same key for another column.
    pub const fn with_column(self, column: u64) -> Self {
        StreamKey { column, ..self }
    }

    /// The 64-bit hash of the key (the SplitMix64 state that seeds the stream).
    pub const fn hash64(&self) -> u64 {
        let mut h = KEY_DOMAIN;
        h = mix64(h.wrapping_add(GAMMA) ^ self.seed);
        h = mix64(h.wrapping_add(GAMMA) ^ self.draw);
        h = mix64(h.wrapping_add(GAMMA) ^ self.tensor);
        mix64(h.wrapping_add(GAMMA) ^ self.column)
    }

    /// The 256-bit Xoshiro256++ state of this stream: the first four outputs of
    /// SplitMix64 started at [`StreamKey::hash64`]. They are never all zero
    /// (mix64 is a bijection with mix64(0) = 0, and the four inputs differ), as
    /// Xoshiro requires.
    pub const fn state(&self) -> [u64; 4] {
        let h = self.hash64();
        [
            mix64(h.wrapping_add(GAMMA)),
            mix64(h.wrapping_add(GAMMA.wrapping_mul(2))),
            mix64(h.wrapping_add(GAMMA.wrapping_mul(3))),
            mix64(h.wrapping_add(GAMMA.wrapping_mul(4))),
        ]
    }

    /// The generator of this stream, positioned at its start.
    pub fn rng(&self) -> Xoshiro256PlusPlus {
        let mut seed = [0u8; 32];
        for (bytes, word) in seed.chunks_exact_mut(8).zip(self.state()) {
            bytes.copy_from_slice(&word.to_le_bytes());
        }
        Xoshiro256PlusPlus::from_seed(seed)
    }
}

/// Xoshiro256++ with its state in plain `Copy` words: the same sequence as
/// [`Xoshiro256PlusPlus`] from the same state (checked by a test), but the fill
/// loop can keep it in registers. With rand's type, passing `&mut rng` to the
/// out-of-line slow path made LLVM keep the state in memory, and the load/store
/// round trip on the generator's dependency chain cost 0.5–1 ns per value.
#[derive(Clone, Copy)]
struct Xoshiro {
    s: [u64; 4],
}

impl Xoshiro {
    #[inline(always)]
    fn next(&mut self) -> u64 {
        let s = &mut self.s;
        let res = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        res
    }
}

impl rand::TryRng for Xoshiro {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok((self.next() >> 32) as u32)
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(self.next())
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for chunk in dst.chunks_mut(8) {
            let w = self.next().to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
        Ok(())
    }
}

/// Why a sampling request was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SampleError {
    /// The buffer is not a whole number of columns.
    #[error("a buffer of {len} values is not a whole number of columns of {rows} rows")]
    Shape {
        /// Buffer length.
        len: usize,
        /// Requested column length.
        rows: usize,
    },
    /// `rows × cols` does not fit in memory addressing.
    #[error("a {rows}×{cols} matrix has more elements than can be addressed")]
    TooLarge {
        /// Rows requested.
        rows: usize,
        /// Columns requested.
        cols: usize,
    },
    /// The standard deviation is negative, infinite or NaN.
    #[error("the standard deviation must be finite and non-negative, got {0}")]
    BadStd(f64),
}

// ---------------------------------------------------------------------------
// Ziggurat tables
// ---------------------------------------------------------------------------

/// Number of layers; a power of two so that the layer index is 8 raw bits.
const LAYERS: usize = 256;

/// Start of the tail for 256 layers under exp(-x²/2): the root `r` for which the
/// layer recursion below closes exactly at x = 0 (Marsaglia & Tsang 2000, also
/// `rand_distr`'s `ZIG_NORM_R`). Checked by a test (`tables_close_at_zero`).
const ZIG_R: f64 = 3.654_152_885_361_009;

/// Layer `i` is the rectangle `[0, x[i]) × [f[i], f[i+1])` with `f = exp(-x²/2)`;
/// `x` decreases from `x[0] = v/f(r)` (the base strip, which includes the tail)
/// through `x[1] = r` down to `x[256] = 0`. All 256 layers have area `v`.
///
/// The fast path never touches `x` or `f`: it works on the 53-bit integer `m`
/// (the uniform is `m·2⁻⁵³`) with two derived tables, so a value costs one
/// integer compare, one conversion and one multiply:
/// - accept iff `m < k[i]`, with `k[i] = ⌊x[i+1]/x[i] · 2⁵³⌋` (that is
///   `(m·2⁻⁵³)·x[i] < x[i+1]`, up to the 2⁻⁵³ grid);
/// - the value is then `m · w[s·256 + i]` with `w = ±x[i]·2⁻⁵³`, the sign `s`
///   being bit 8 — so the sign costs nothing either.
struct Tables {
    x: [f64; LAYERS + 1],
    f: [f64; LAYERS + 1],
    k: [u64; LAYERS],
    w: [f64; 2 * LAYERS],
}

/// Unnormalised density: the tables and the acceptance tests need only ratios.
#[inline]
fn pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp()
}

/// 2⁻⁵³, the spacing of the uniform's grid.
const EPS53: f64 = 1.0 / (1u64 << 53) as f64;

impl Tables {
    /// Computes the tables from `r`. Computed at run time (once) rather than
    /// pasted as constants so that their origin is checkable; it costs ~10 µs.
    fn build() -> Tables {
        let r = ZIG_R;
        let tail = (std::f64::consts::PI / 2.0).sqrt() * libm::erfc(r / std::f64::consts::SQRT_2);
        let v = r * pdf(r) + tail;
        let mut x = [0.0; LAYERS + 1];
        let mut f = [0.0; LAYERS + 1];
        x[0] = v / pdf(r);
        x[1] = r;
        for i in 1..LAYERS - 1 {
            let y = v / x[i] + pdf(x[i]);
            x[i + 1] = (-2.0 * y.ln()).sqrt();
        }
        x[LAYERS] = 0.0;
        for i in 1..=LAYERS {
            f[i] = pdf(x[i]);
        }
        // The base strip spans y in [0, f(r)); f[0] is only used as its bottom.
        f[0] = 0.0;
        let mut k = [0u64; LAYERS];
        let mut w = [0.0; 2 * LAYERS];
        for i in 0..LAYERS {
            // x[i+1]/x[i] < 1, so the product is below 2⁵³ and exact to convert.
            k[i] = (x[i + 1] / x[i] * (1u64 << 53) as f64) as u64;
            w[i] = x[i] * EPS53;
            w[LAYERS + i] = -x[i] * EPS53;
        }
        Tables { x, f, k, w }
    }

    fn get() -> &'static Tables {
        static TABLES: OnceLock<Tables> = OnceLock::new();
        TABLES.get_or_init(Tables::build)
    }

    /// `w` scaled by `std`, so that the fast path also absorbs the scaling.
    fn scaled(&self, std: f64) -> [f64; 2 * LAYERS] {
        self.w.map(|w| std * w)
    }

    /// The ~1.2 % of draws that fall outside the inner rectangles: the tail (layer
    /// 0) or a wedge, starting from the rejected draw `bits`. Returns an N(0,1)
    /// value (unscaled). Kept out of line so the fast path stays small.
    #[cold]
    #[inline(never)]
    fn slow<R: Rng + ?Sized>(&self, rng: &mut R, bits: u64) -> f64 {
        // Bit 8 of the first draw, moved to the f64 sign bit. The sign is
        // independent of everything that decides acceptance below, so it is
        // kept across rejections and the result stays symmetric.
        let sign = (bits & 0x100) << 55;
        let mut i = (bits & 0xff) as usize;
        let mut x = ((bits >> 11) as i64) as f64 * EPS53 * self.x[i];
        loop {
            if i == 0 {
                // Tail x > r (Marsaglia 1964): with E1, E2 exponential, accept
                // r + E1/r when 2·E2 > (E1/r)².
                loop {
                    let a = -open01(rng).ln() / ZIG_R;
                    let b = -open01(rng).ln();
                    if 2.0 * b > a * a {
                        return f64::from_bits((ZIG_R + a).to_bits() ^ sign);
                    }
                }
            }
            // Wedge of layer i (x[i+1] ≤ x < x[i]): uniform height in the layer.
            let y = self.f[i] + (self.f[i + 1] - self.f[i]) * open01(rng);
            if y < pdf(x) {
                return f64::from_bits(x.to_bits() ^ sign);
            }
            // Rejected: a whole new draw of layer and position.
            let bits = rng.next_u64();
            i = (bits & 0xff) as usize;
            let m = bits >> 11;
            x = (m as i64) as f64 * EPS53 * self.x[i];
            if m < self.k[i] {
                return f64::from_bits(x.to_bits() ^ sign);
            }
        }
    }
}

/// The fast path on one raw draw: `Some(±std·x)` (with `w` scaled by `std`) when
/// the point is inside layer `bits & 0xff`'s inner rectangle.
#[inline(always)]
fn fast(k: &[u64; LAYERS], w: &[f64; 2 * LAYERS], bits: u64) -> Option<f64> {
    let m = bits >> 11;
    // The signed conversion is one instruction; m < 2⁵³ so it is exact.
    (m < k[(bits & 0xff) as usize]).then(|| (m as i64) as f64 * w[(bits & 0x1ff) as usize])
}

/// A uniform in the open interval (0, 1), 53-bit midpoints: never 0, so its log
/// is finite.
#[inline]
fn open01<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    ((rng.next_u64() >> 11) as f64 + 0.5) * EPS53
}

// ---------------------------------------------------------------------------
// Public sampling API
// ---------------------------------------------------------------------------

/// One exact N(0,1) value from `rng` (see the module documentation).
#[inline]
pub fn standard_normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    let t = Tables::get();
    let bits = rng.next_u64();
    match fast(&t.k, &t.w, bits) {
        Some(z) => z,
        None => t.slow(rng, bits),
    }
}

/// Fills `dst` with N(0, std²) values from one generator, in order. With
/// `key.rng()` this gives the same values as column 0 of [`fill_normal`] with
/// `key` (the matrix fills use a register-resident copy of the same generator).
pub fn fill_standard_normal<R: Rng + ?Sized>(rng: &mut R, dst: &mut [f64], std: f64) {
    let t = Tables::get();
    let w = t.scaled(std);
    for out in dst.iter_mut() {
        let bits = rng.next_u64();
        *out = match fast(&t.k, &w, bits) {
            Some(z) => z,
            None => std * t.slow(rng, bits),
        };
    }
}

/// The matrix fill loop: one stream, started at `state`, with `w` scaled by `std`.
#[inline]
fn fill_stream(t: &Tables, w: &[f64; 2 * LAYERS], state: [u64; 4], dst: &mut [f64], std: f64) {
    let mut g = Xoshiro { s: state };
    for out in dst.iter_mut() {
        let bits = g.next();
        *out = match fast(&t.k, w, bits) {
            Some(z) => z,
            None => {
                // Only this copy's address escapes; `g` stays in registers.
                let mut tmp = g;
                let z = t.slow(&mut tmp, bits);
                g = tmp;
                std * z
            }
        };
    }
}

/// Below this many values per rayon task, splitting costs more than it gains.
const MIN_VALUES_PER_TASK: usize = 1 << 14;

fn check(dst: &[f64], rows: usize, std: f64) -> Result<(), SampleError> {
    if !(std.is_finite() && std >= 0.0) {
        return Err(SampleError::BadStd(std));
    }
    let whole = if rows == 0 {
        dst.is_empty()
    } else {
        dst.len().is_multiple_of(rows)
    };
    if !whole {
        return Err(SampleError::Shape {
            len: dst.len(),
            rows,
        });
    }
    Ok(())
}

fn fill_column(
    t: &Tables,
    w: &[f64; 2 * LAYERS],
    col: &mut [f64],
    std: f64,
    key: StreamKey,
    j: usize,
) {
    let state = key.with_column(key.column.wrapping_add(j as u64)).state();
    fill_stream(t, w, state, col, std);
}

/// Fills a column-major `rows × (dst.len() / rows)` buffer with N(0, std²) values,
/// one stream per column (column `j` uses `key.with_column(key.column + j)`),
/// columns in parallel on the current rayon pool.
///
/// The result is bit-identical whatever the number of threads.
pub fn fill_normal(
    dst: &mut [f64],
    rows: usize,
    std: f64,
    key: StreamKey,
) -> Result<(), SampleError> {
    check(dst, rows, std)?;
    if dst.is_empty() {
        return Ok(());
    }
    let t = Tables::get();
    let w = t.scaled(std);
    if dst.len() <= MIN_VALUES_PER_TASK {
        // One task's worth: skip rayon's dispatch (vectors, small matrices).
        for (j, col) in dst.chunks_mut(rows).enumerate() {
            fill_column(t, &w, col, std, key, j);
        }
        return Ok(());
    }
    let min_cols = MIN_VALUES_PER_TASK.div_ceil(rows).max(1);
    dst.par_chunks_mut(rows)
        .with_min_len(min_cols)
        .enumerate()
        .for_each(|(j, col)| fill_column(t, &w, col, std, key, j));
    Ok(())
}

/// [`fill_normal`] on the calling thread only: the same values. For callers that
/// are already parallel at a coarser grain, and for measuring one core.
pub fn fill_normal_seq(
    dst: &mut [f64],
    rows: usize,
    std: f64,
    key: StreamKey,
) -> Result<(), SampleError> {
    check(dst, rows, std)?;
    if dst.is_empty() {
        return Ok(());
    }
    let t = Tables::get();
    let w = t.scaled(std);
    for (j, col) in dst.chunks_mut(rows).enumerate() {
        fill_column(t, &w, col, std, key, j);
    }
    Ok(())
}

/// Overwrites `m` in place with N(0, std²) values as [`fill_normal`] does, so a
/// parameter buffer can be reused across draws without reallocating.
pub fn fill_normal_matrix(
    m: &mut DMatrix<f64>,
    std: f64,
    key: StreamKey,
) -> Result<(), SampleError> {
    let rows = m.nrows();
    fill_normal(m.as_mut_slice(), rows, std, key)
}

/// A new `rows × cols` matrix of N(0, std²) values, as [`fill_normal`] fills it.
///
/// The buffer is allocated zeroed (for large sizes the allocator gets fresh pages
/// that the kernel zeroes on first touch, so this costs no extra pass), filled in
/// place and handed to nalgebra without a copy.
pub fn normal_matrix(
    rows: usize,
    cols: usize,
    std: f64,
    key: StreamKey,
) -> Result<DMatrix<f64>, SampleError> {
    let len = rows
        .checked_mul(cols)
        .filter(|&n| n <= isize::MAX as usize / std::mem::size_of::<f64>())
        .ok_or(SampleError::TooLarge { rows, cols })?;
    let mut data = vec![0.0; len];
    fill_normal(&mut data, rows, std, key)?;
    Ok(DMatrix::from_vec(rows, cols, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Φ(z), the standard normal CDF.
    fn phi(z: f64) -> f64 {
        0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
    }

    fn draws(n: usize, seed: u64) -> Vec<f64> {
        let mut v = vec![0.0; n];
        // Many columns, so that the test also mixes streams.
        fill_normal(&mut v, 1000, 1.0, StreamKey::new(seed, 0, 0)).unwrap();
        v
    }

    #[test]
    fn tables_close_at_zero() {
        // r is right iff the recursion leaves exactly area v for the top layer.
        let t = Tables::get();
        let r = ZIG_R;
        let v = r * pdf(r)
            + (std::f64::consts::PI / 2.0).sqrt() * libm::erfc(r / std::f64::consts::SQRT_2);
        let top = t.x[LAYERS - 1] * (1.0 - pdf(t.x[LAYERS - 1]));
        assert!((top - v).abs() < 1e-12 * v, "top layer area {top} vs {v}");
        for i in 1..LAYERS {
            let area = t.x[i] * (t.f[i + 1] - t.f[i]);
            assert!((area - v).abs() < 1e-11 * v, "layer {i} area {area} vs {v}");
            assert!(t.x[i + 1] < t.x[i]);
        }
        assert!((t.x[0] * pdf(r) - v).abs() < 1e-15);
    }

    #[test]
    fn moments() {
        let n = 1_000_000;
        let v = draws(n, 1);
        let nf = n as f64;
        let mean = v.iter().sum::<f64>() / nf;
        let m2 = v.iter().map(|x| x * x).sum::<f64>() / nf;
        let m3 = v.iter().map(|x| x * x * x).sum::<f64>() / nf;
        let m4 = v.iter().map(|x| x.powi(4)).sum::<f64>() / nf;
        // Standard errors: sqrt(Var(z^k)/n) with Var z = 1, Var z² = 2,
        // Var z³ = 15, Var z⁴ = 96. Allow 5 SE.
        assert!(mean.abs() < 5.0 / nf.sqrt(), "mean {mean}");
        assert!((m2 - 1.0).abs() < 5.0 * (2.0 / nf).sqrt(), "E z² {m2}");
        assert!(m3.abs() < 5.0 * (15.0 / nf).sqrt(), "E z³ {m3}");
        assert!((m4 - 3.0).abs() < 5.0 * (96.0 / nf).sqrt(), "E z⁴ {m4}");
    }

    #[test]
    fn kolmogorov_smirnov() {
        let n = 1_000_000;
        let mut v = draws(n, 2);
        v.sort_by(f64::total_cmp);
        let nf = n as f64;
        let mut d: f64 = 0.0;
        for (k, &x) in v.iter().enumerate() {
            let p = phi(x);
            d = d.max(p - k as f64 / nf).max((k + 1) as f64 / nf - p);
        }
        // Critical value at α = 0.001 is 1.949/√n.
        assert!(d < 1.949 / nf.sqrt(), "KS D = {d}");
    }

    #[test]
    fn chi_square_fine_bins() {
        // 2000 equiprobable bins over 10⁷ draws resolve relative errors of ~1 %
        // per bin, enough to catch a wrong table entry or wedge test.
        let n = 10_000_000;
        let bins = 2000;
        let v = draws(n, 3);
        let mut count = vec![0u64; bins];
        for &x in &v {
            let b = ((phi(x) * bins as f64) as usize).min(bins - 1);
            count[b] += 1;
        }
        let e = n as f64 / bins as f64;
        let chi2: f64 = count.iter().map(|&c| (c as f64 - e).powi(2) / e).sum();
        let dof = (bins - 1) as f64;
        assert!(
            chi2 < dof + 5.0 * (2.0 * dof).sqrt(),
            "chi2 {chi2} dof {dof}"
        );
    }

    #[test]
    fn tail_frequencies() {
        let n = 10_000_000;
        let v = draws(n, 4);
        let nf = n as f64;
        for (z, side) in [
            (3.0, 1.0),
            (3.0, -1.0),
            (4.0, 1.0),
            (4.0, -1.0),
            (ZIG_R, 1.0),
            (5.0, 1.0),
        ] {
            let p = phi(-z);
            let hits = v.iter().filter(|&&x| side * x > z).count() as f64;
            let se = (p * (1.0 - p) / nf).sqrt();
            assert!(
                (hits / nf - p).abs() < 4.0 * se,
                "P(±z > {z}, side {side}) = {} vs {p}",
                hits / nf
            );
        }
    }

    #[test]
    fn tail_sampler_is_exact() {
        // The tail path on its own must give |Z| conditioned on |Z| > r; KS against
        // P(|Z| ≤ z | |Z| > r) = 1 − Q(z)/Q(r) with Q the upper tail. Overall tests
        // barely see the tail (0.03 % of the mass), so it gets its own.
        let t = Tables::get();
        let n = 200_000;
        let mut rng = StreamKey::new(11, 0, 0).rng();
        let mut v: Vec<f64> = (0..n).map(|_| t.slow(&mut rng, 0)).collect();
        v.sort_by(f64::total_cmp);
        let q_r = phi(-ZIG_R);
        let nf = n as f64;
        let mut d: f64 = 0.0;
        for (k, &x) in v.iter().enumerate() {
            let p = 1.0 - phi(-x) / q_r;
            d = d.max(p - k as f64 / nf).max((k + 1) as f64 / nf - p);
        }
        assert!(v[0] > ZIG_R);
        assert!(d < 1.949 / nf.sqrt(), "tail KS D = {d}");
    }

    #[test]
    fn fine_histogram_of_magnitudes() {
        // 10⁸ draws of |Z| in bins of width 0.01 on [0, 5.5]: a per-bin
        // resolution of ~0.2 % where the mass is, which exposes a wrong layer
        // width or wedge test (wedges sit at every table abscissa).
        let width = 0.01;
        let bins = 550;
        let chunk = 10_000_000;
        let mut count = vec![0u64; bins + 1];
        let mut buf = vec![0.0; chunk];
        for c in 0..10 {
            fill_normal(&mut buf, 10_000, 1.0, StreamKey::new(12, c, 0)).unwrap();
            for &x in &buf {
                count[((x.abs() / width) as usize).min(bins)] += 1;
            }
        }
        let n = (chunk * 10) as f64;
        let mut chi2 = 0.0;
        let mut dof = 0.0_f64;
        for (b, &c) in count.iter().enumerate() {
            let lo = b as f64 * width;
            let p = if b == bins {
                2.0 * phi(-lo)
            } else {
                2.0 * (phi(-lo) - phi(-(lo + width)))
            };
            let e = n * p;
            if e >= 20.0 {
                chi2 += (c as f64 - e).powi(2) / e;
                dof += 1.0;
            }
        }
        assert!(
            chi2 < dof + 5.0 * (2.0 * dof).sqrt(),
            "chi2 {chi2} over {dof} bins"
        );
    }

    #[test]
    fn streams_uncorrelated() {
        // Adjacent columns, adjacent draws and adjacent tensors must be independent.
        let n = 1_000_000;
        let base = StreamKey::new(9, 0, 0);
        let mut a = vec![0.0; n];
        let mut rng = base.rng();
        fill_standard_normal(&mut rng, &mut a, 1.0);
        for other in [
            base.with_column(1),
            StreamKey::new(9, 1, 0),
            StreamKey::new(9, 0, 1),
            StreamKey::new(10, 0, 0),
        ] {
            let mut b = vec![0.0; n];
            fill_standard_normal(&mut other.rng(), &mut b, 1.0);
            let c = a.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>() / n as f64;
            assert!(c.abs() < 5.0 / (n as f64).sqrt(), "{other:?}: corr {c}");
        }
    }

    #[test]
    fn reproducible_across_threads_and_blocks() {
        let (rows, cols) = (300, 77);
        let key = StreamKey::new(42, 3, 7);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| normal_matrix(rows, cols, 0.5, key).unwrap())
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(3));
        let mut seq = vec![0.0; rows * cols];
        fill_normal_seq(&mut seq, rows, 0.5, key).unwrap();
        assert_eq!(one.as_slice(), &seq[..]);
        // A block of columns filled on its own equals the same columns.
        let mut block = vec![0.0; rows * 10];
        fill_normal(&mut block, rows, 0.5, key.with_column(20)).unwrap();
        assert_eq!(&one.as_slice()[rows * 20..rows * 30], &block[..]);
        // Draw 3 is the same whether or not draws 0..3 were made before it.
        let mut m = DMatrix::zeros(rows, cols);
        for d in 0..5 {
            fill_normal_matrix(&mut m, 0.5, StreamKey { draw: d, ..key }).unwrap();
            if d == 3 {
                assert_eq!(m, one);
            } else {
                assert_ne!(m, one);
            }
        }
    }

    #[test]
    fn scheme_is_pinned() {
        // Changing the hash, the seed expansion or the sampler changes every
        // finite-width result; this test makes such a change deliberate.
        let key = StreamKey::new(0, 0, 0);
        assert_eq!(key.hash64(), 0x4ab1_d7f3_795c_74e6);
        let mut v = [0.0; 4];
        fill_standard_normal(&mut key.rng(), &mut v, 1.0);
        let want = [
            -0.541372127657226,
            -1.7803279289378966,
            -1.3745365697492924,
            -0.6075447536016104,
        ];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{v:?}");
        }
    }

    #[test]
    fn register_generator_matches_rand() {
        let key = StreamKey::new(3, 1, 4).with_column(15);
        let mut ours = Xoshiro { s: key.state() };
        let mut theirs = key.rng();
        for _ in 0..1000 {
            assert_eq!(ours.next(), theirs.next_u64());
        }
        // And the generic path equals the matrix path.
        let mut a = vec![0.0; 5000];
        fill_standard_normal(&mut key.rng(), &mut a, 2.0);
        let mut b = vec![0.0; 5000];
        fill_normal(&mut b, 5000, 2.0, key).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn rejects_bad_input() {
        let mut v = vec![0.0; 10];
        let key = StreamKey::default();
        assert_eq!(
            fill_normal(&mut v, 3, 1.0, key),
            Err(SampleError::Shape { len: 10, rows: 3 })
        );
        assert_eq!(
            fill_normal(&mut v, 0, 1.0, key),
            Err(SampleError::Shape { len: 10, rows: 0 })
        );
        assert!(matches!(
            fill_normal(&mut v, 5, f64::NAN, key),
            Err(SampleError::BadStd(_))
        ));
        assert!(matches!(
            fill_normal(&mut v, 5, -1.0, key),
            Err(SampleError::BadStd(_))
        ));
        assert!(matches!(
            normal_matrix(usize::MAX, 2, 1.0, key),
            Err(SampleError::TooLarge { .. })
        ));
        assert_eq!(fill_normal(&mut [], 0, 1.0, key), Ok(()));
        let z = normal_matrix(4, 0, 1.0, key).unwrap();
        assert_eq!(z.shape(), (4, 0));
        // std = 0 gives exact zeros.
        fill_normal(&mut v, 5, 0.0, key).unwrap();
        assert!(v.iter().all(|&x| x == 0.0));
    }
}
