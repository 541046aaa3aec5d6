//! The conditional engine (issue 7): a hidden N×N Gaussian matrix is never sampled.
//!
//! A program only sees a Gaussian matrix M (entries iid N(0, s²), s = mult·√var)
//! through products M x and Mᵀ y. Given the products drawn so far, M X = G and
//! Mᵀ Y = H, M is again Gaussian:
//!
//! M | (M X = G, Mᵀ Y = H) = E + Π_Y^⊥ M̃ Π_X^⊥,  E = G X⁺ + (Y⁺)ᵀ Hᵀ − (Y⁺)ᵀ Yᵀ G X⁺,
//!
//! with M̃ an independent copy. [`CondMatrix`] keeps orthonormal bases Q_X (inputs seen)
//! and Q_Y (transposed inputs seen) with A = M Q_X and B = Mᵀ Q_Y. In these bases
//! E z = A Q_Xᵀ z + Q_Y (Bᵀ z − Q_Yᵀ A Q_Xᵀ z). For a new z with c = Q_Xᵀ z and
//! u = z − Q_X c ≠ 0 (q = u/‖u‖), M q = Q_Y Bᵀ q + Π_Y^⊥ g with g ~ N(0, s² I) fresh,
//! so M z = A c + ‖u‖ M q, and (q, M q) joins the history. Everything is exact in law
//! at every N; memory is O(N·k) for k products, time O(N·k²).
//!
//! The NTK's reverse pass asks the same [`CondMatrix`] for Wᵀδ and Wδ: they join the
//! history like any product, so backward products are drawn given the forward ones,
//! which is their joint law (Netsor-transpose, theory.md). The Gram of a matrix
//! gradient, (δ·δ')(x·x') per pair of uses, needs no W at all.
//!
//! The fresh vectors come from the run's counter-based streams: product number j of
//! hidden parameter i in draw k of seed S uses `StreamKey(S, k, COND_TENSOR + i, j)`,
//! so a conditional run is deterministic, whatever the thread count.

use std::collections::HashMap;

use nalgebra::DMatrix;
use rayon::prelude::*;

use super::sample::{fill_normal_seq, StreamKey};
use super::types::{bug, HiddenProducts, RunError, COORD_CHUNK};

/// Offset of the tensor ids of the conditional engine's fresh streams (distinct from
/// the parameter ids used by the dense sampler).
pub const COND_TENSOR: u64 = 1 << 40;

/// Relative size below which the part of a new vector outside the span seen so far
/// counts as zero (the product is then fully determined by the history).
const RANK_TOL: f64 = 1e-10;

/// One side of the history: an orthonormal basis and the products of its columns.
#[derive(Clone, Debug, Default)]
struct Side {
    /// Orthonormal columns q_j (each of length N).
    q: Vec<Vec<f64>>,
    /// The products of the q_j (M q_j for the input side, Mᵀ q_j for the other).
    img: Vec<Vec<f64>>,
}

/// a·b, summed over fixed chunks of coordinates in parallel and the chunk sums in
/// order: the same bits whatever the thread count.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let seq = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    if a.len() <= COORD_CHUNK {
        return seq(a, b);
    }
    let parts: Vec<f64> = a
        .par_chunks(COORD_CHUNK)
        .zip(b.par_chunks(COORD_CHUNK))
        .map(|(x, y)| seq(x, y))
        .collect();
    parts.iter().sum()
}

/// y += αx, in parallel over fixed chunks.
fn axpy(alpha: f64, x: &[f64], y: &mut [f64]) {
    let seq = |x: &[f64], y: &mut [f64]| {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += alpha * xi;
        }
    };
    if y.len() <= COORD_CHUNK {
        return seq(x, y);
    }
    y.par_chunks_mut(COORD_CHUNK)
        .zip(x.par_chunks(COORD_CHUNK))
        .for_each(|(y, x)| seq(x, y));
}

impl Side {
    /// Modified Gram–Schmidt, twice: returns the coefficients c = Qᵀ z and leaves
    /// z − Q c in `u`.
    fn project_out(&self, u: &mut [f64]) -> Vec<f64> {
        let mut c = vec![0.0; self.q.len()];
        for _ in 0..2 {
            for (cj, qj) in c.iter_mut().zip(&self.q) {
                let d = dot(qj, u);
                *cj += d;
                axpy(-d, qj, u);
            }
        }
        c
    }
}

/// A hidden N×N Gaussian matrix M with entry std `s`, drawn lazily through its
/// products, conditioned on every product drawn so far.
#[derive(Clone, Debug)]
pub struct CondMatrix {
    n: usize,
    s: f64,
    key: StreamKey,
    /// Fresh vectors drawn so far (the next one's stream column).
    counter: u64,
    /// Q_X and A = M Q_X.
    x: Side,
    /// Q_Y and B = Mᵀ Q_Y.
    y: Side,
}

impl CondMatrix {
    /// A matrix of width `n` with entries N(0, s²); fresh noise from `key`'s stream
    /// columns 0, 1, 2, ….
    pub fn new(n: usize, s: f64, key: StreamKey) -> Self {
        CondMatrix {
            n,
            s,
            key,
            counter: 0,
            x: Side::default(),
            y: Side::default(),
        }
    }

    /// The number of basis vectors held on the input and transposed sides.
    pub fn rank(&self) -> (usize, usize) {
        (self.x.q.len(), self.y.q.len())
    }

    /// M z for each column of `z` (N×c), columns in order, each joining the history.
    pub fn apply(&mut self, z: &DMatrix<f64>) -> DMatrix<f64> {
        self.apply_block(z, false)
    }

    /// Mᵀ y for each column of `y` (N×c), columns in order, each joining the history.
    pub fn apply_t(&mut self, y: &DMatrix<f64>) -> DMatrix<f64> {
        self.apply_block(y, true)
    }

    fn apply_block(&mut self, z: &DMatrix<f64>, transpose: bool) -> DMatrix<f64> {
        assert_eq!(z.nrows(), self.n, "a block of the wrong height");
        let n = self.n;
        let mut out = DMatrix::zeros(n, z.ncols());
        // One scratch vector for the part outside the history, reused until it joins
        // the history: a column in the span seen (common in the reverse pass) then
        // allocates nothing, which at N = 10^6 saves most page faults of a draw.
        let mut scratch: Vec<f64> = Vec::new();
        for j in 0..z.ncols() {
            let zj = &z.as_slice()[j * n..(j + 1) * n];
            let oj = &mut out.as_mut_slice()[j * n..(j + 1) * n];
            self.apply_one(zj, transpose, oj, &mut scratch);
        }
        out
    }

    /// The next fresh N(0, s²) vector, projected off `other`'s basis.
    fn fresh(&mut self, other: &Side) -> Vec<f64> {
        let mut g = vec![0.0; self.n];
        fill_normal_seq(&mut g, self.n, self.s, self.key.with_column(self.counter))
            .expect("a finite non-negative std");
        self.counter += 1;
        other.project_out(&mut g);
        g
    }

    /// M z (or Mᵀ z) into `out` (zeroed): `mine` is the side z lives on, `other` the
    /// opposite side; `scratch` is a reusable buffer (left empty when it joins the
    /// history).
    ///
    /// M is linear, so M z = s·M(z/s): the history only ever sees z/s with s the power
    /// of two at the top of z's largest entry. Norms of z itself would overflow once
    /// its entries pass ~1e154 (‖z‖² = inf), and then `r > RANK_TOL·‖z‖` fails for
    /// every z, so every product came out as its (empty) determined part: an exact 0
    /// that the forward pass could not tell from a real value (issue 12). Scaling by a
    /// power of two is exact, so results below that size are bit for bit unchanged;
    /// the product itself may still overflow, and the forward pass reports that.
    fn apply_one(&mut self, z: &[f64], transpose: bool, out: &mut [f64], scratch: &mut Vec<f64>) {
        let scale = pow2_scale(z);
        if scale == 0.0 {
            return; // M 0 = 0 (a cotangent column no output reaches)
        }
        let (mine, other) = if transpose {
            (std::mem::take(&mut self.y), std::mem::take(&mut self.x))
        } else {
            (std::mem::take(&mut self.x), std::mem::take(&mut self.y))
        };
        let (mut mine, other) = (mine, other);
        let mut u = std::mem::take(scratch);
        u.clear();
        u.extend(z.iter().map(|v| v / scale));
        let znorm = dot(&u, &u).sqrt();
        let c = mine.project_out(&mut u);
        let r = dot(&u, &u).sqrt();
        // The determined part: A c (Bᵀ Q_X = Q_Yᵀ A makes the other terms cancel).
        for (cj, aj) in c.iter().zip(&mine.img) {
            axpy(*cj, aj, out);
        }
        if r > RANK_TOL * znorm && r > 0.0 {
            for ui in u.iter_mut() {
                *ui /= r;
            }
            // M q = Q_Y Bᵀ q + Π_Y^⊥ g.
            let mut mq = self.fresh(&other);
            for (qj, bj) in other.q.iter().zip(&other.img) {
                axpy(dot(bj, &u), qj, &mut mq);
            }
            axpy(r, &mq, out);
            mine.q.push(u);
            mine.img.push(mq);
        } else {
            *scratch = u;
        }
        if scale != 1.0 {
            for o in out.iter_mut() {
                *o *= scale;
            }
        }
        if transpose {
            self.y = mine;
            self.x = other;
        } else {
            self.x = mine;
            self.y = other;
        }
    }
}

/// 1 when z's sums of squares cannot overflow or underflow (every |z_i| within
/// 2^±500: then nothing changes, bit for bit); otherwise the power of two at the top of
/// the largest |z_i| (2^⌊log₂ max⌋, at least the smallest normal number), so that z/s
/// has entries below 2 with no rounding. 0 for z = 0. Entries must be finite
/// ([`CondEngine`] checks).
fn pow2_scale(z: &[f64]) -> f64 {
    let m = z.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    if m == 0.0 {
        return 0.0;
    }
    let bound = 2f64.powi(500);
    if (1.0 / bound..=bound).contains(&m) {
        return 1.0;
    }
    let top = f64::from_bits(m.to_bits() & 0x7ff0_0000_0000_0000);
    top.max(f64::MIN_POSITIVE)
}

/// The conditional engine of one draw: a [`CondMatrix`] per hidden parameter.
pub struct CondEngine {
    mats: HashMap<usize, CondMatrix>,
}

impl CondEngine {
    /// Matrices for every hidden parameter of `prog` at width `n`, draw `draw` of
    /// `seed`: entry std mult·√var (the product is mult·W x).
    pub fn new(prog: &crate::ir::Program, n: usize, seed: u64, draw: usize) -> Self {
        let nf = n as f64;
        let mats = prog
            .params
            .iter()
            .enumerate()
            .filter(|(_, p)| p.shape == crate::ir::Shape::Hidden)
            .map(|(i, p)| {
                let s = p.law.var.at(nf).max(0.0).sqrt() * p.law.mult.at(nf).abs();
                let key = StreamKey::new(seed, draw as u64, COND_TENSOR + i as u64);
                (i, CondMatrix::new(n, s, key))
            })
            .collect();
        CondEngine { mats }
    }
}

impl HiddenProducts for CondEngine {
    fn product(
        &mut self,
        pi: usize,
        transpose: bool,
        x: &DMatrix<f64>,
    ) -> Result<DMatrix<f64>, RunError> {
        let m = self
            .mats
            .get_mut(&pi)
            .ok_or_else(|| bug(None, "a conditional product of a matrix that is not hidden"))?;
        if !m.s.is_finite() {
            return Err(bug(None, "a hidden matrix whose entry std is not finite"));
        }
        if x.iter().any(|v| !v.is_finite()) {
            return Err(bug(None, "a product of a vector that is infinite or NaN"));
        }
        Ok(if transpose { m.apply_t(x) } else { m.apply(x) })
    }

    fn held_words(&self) -> usize {
        self.mats
            .values()
            .map(|m| {
                let (rx, ry) = m.rank();
                2 * m.n * (rx + ry)
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Modified Gram–Schmidt twice keeps the history orthonormal to working precision
    /// even for nearly dependent inputs, across the parallel chunks of a wide vector.
    #[test]
    fn history_stays_orthonormal() {
        let n = 2 * COORD_CHUNK + 1234; // three chunks, the last one short
        let v = |k: usize| -> Vec<f64> {
            (0..n)
                .map(|i| (((i * (k + 3)) % 1009) as f64 * 0.013 + k as f64).sin())
                .collect()
        };
        // 30 directions, each new one within 1e-6 of the span of the earlier ones.
        let mut m = CondMatrix::new(n, 1.0, StreamKey::new(4, 0, 7));
        let mut prev = v(0);
        let mut cols = Vec::new();
        for k in 0..30 {
            let w = v(k + 1);
            let z: Vec<f64> = prev.iter().zip(&w).map(|(a, b)| a + 1e-6 * b).collect();
            cols.extend_from_slice(&z);
            prev = z;
        }
        m.apply(&DMatrix::from_column_slice(n, 30, &cols));
        let basis = &m.x.q;
        assert_eq!(basis.len(), 30);
        let mut worst: f64 = 0.0;
        for (i, a) in basis.iter().enumerate() {
            for (j, b) in basis.iter().enumerate() {
                let g = dot(a, b) - if i == j { 1.0 } else { 0.0 };
                worst = worst.max(g.abs());
            }
        }
        assert!(worst < 1e-12, "QᵀQ − I: {worst:e}");
    }

    /// Issue 12: a vector with entries near 1e160 has ‖z‖² = inf; every product of it
    /// came out as exactly 0. M is linear, so M(c·z) must be c·M z, bit for bit when
    /// c is a power of two, for huge and tiny c alike, and never zero.
    #[test]
    fn products_of_huge_and_tiny_vectors_scale_exactly() {
        let n = 300;
        let z: Vec<f64> = (0..n)
            .map(|i| ((i * 37 % 101) as f64 - 50.0) / 17.0)
            .collect();
        let key = StreamKey::new(9, 1, 3);
        let mut plain = CondMatrix::new(n, 0.1, key);
        let base = plain.apply(&DMatrix::from_column_slice(n, 1, &z));
        assert!(base.iter().any(|v| *v != 0.0));
        for c in [2f64.powi(530), 2f64.powi(-600)] {
            let big: Vec<f64> = z.iter().map(|v| v * c).collect();
            let mut m = CondMatrix::new(n, 0.1, key);
            let out = m.apply(&DMatrix::from_column_slice(n, 1, &big));
            for (a, b) in out.iter().zip(base.iter()) {
                assert_eq!(*a, b * c, "scale {c:e}");
            }
            // It joined the history: the same vector again is determined by it.
            let again = m.apply(&DMatrix::from_column_slice(n, 1, &big));
            assert_eq!(m.rank(), (1, 0));
            for (a, b) in again.iter().zip(out.iter()) {
                assert!((a - b).abs() <= 1e-12 * b.abs().max(c * 1e-3), "{a} vs {b}");
            }
        }
        // A value beyond 1e154 (‖z‖² = inf unscaled) gives a nonzero product.
        let huge: Vec<f64> = z.iter().map(|v| v * 1e160).collect();
        let mut m = CondMatrix::new(n, 0.1, key);
        let out = m.apply(&DMatrix::from_column_slice(n, 1, &huge));
        assert!(out.iter().all(|v| v.is_finite()) && out.iter().any(|v| v.abs() > 1e150));
    }

    /// A non-finite input is an error, not a product.
    #[test]
    fn a_non_finite_input_is_refused() {
        let prog = crate::check_source(
            "width n\ninput xi : 1\nparam U : n x 1 ~ N(0, 1)\nparam W : n x n ~ N(0, 1) * n^(-1/2)\nparam v : 1 x n ~ N(0, 1) * n^(-1/2)\nh1 = U @ xi\nx1 = relu(h1)\nh2 = W @ x1\nx2 = relu(h2)\noutput f = v @ x2\n",
        )
        .0
        .expect("a valid program");
        let wi = prog
            .params
            .iter()
            .position(|p| p.shape == crate::ir::Shape::Hidden)
            .unwrap();
        let mut e = CondEngine::new(&prog, 8, 0, 0);
        let mut x = DMatrix::from_element(8, 1, 1.0);
        x[3] = f64::INFINITY;
        assert!(e.product(wi, false, &x).is_err());
    }
}
