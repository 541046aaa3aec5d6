//! Smooth pair kernels without a closed form (tanh, gelu, sigmoid, their derivatives and
//! compositions): `E[f(u) g(v)]` on whole covariance blocks at a stated accuracy, in
//! `O(K)` per entry (issue 13).
//!
//! # Method (theory.md §3.3, Mehler's formula)
//! With `u = s1 z1`, `v = s2 (rho z1 + sqrt(1 - rho^2) z2)` and `h_k` the orthonormal
//! probabilists' Hermite polynomials,
//!
//! ```text
//! E[f(u) g(v)] = sum_k rho^k a_k b_k,   a_k = E[f(s1 z) h_k(z)],  b_k = E[g(s2 z) h_k(z)].
//! ```
//!
//! The coefficients depend on one variance only: they are computed once per distinct
//! variance ("row") for all `k <= K = 256` at once by one quadrature rule (two matrix
//! products against a precomputed table of `w_i h_k(z_i)`), and cached in the kernel
//! across blocks. The rule is the trapezoid rule on a uniform grid in `z`, not
//! Gauss–Hermite: tanh's poles sit at `Im u = ±pi/2` whatever the variance, i.e. at
//! `pi/(2 sd)` in `z`, and the trapezoid rule's error `~ exp(-2 pi a / h)` for an
//! integrand analytic in `|Im z| < a` only asks for a step `h ∝ 1/sd` (nodes `∝ sd`),
//! where Gauss–Hermite needs a degree `∝ sd^2` (1024–2048 at variance 13). An entry then costs a polynomial in `rho` of the first degree
//! `L` whose truncation bound (Cauchy–Schwarz and Parseval)
//!
//! ```text
//! |sum_{k>L} rho^k a_k b_k| <= |rho|^{L+1} sqrt(A_L B_L),   A_L = sum_{k>L} a_k^2
//! ```
//!
//! is within the budget. `A_L` is summed from the computed coefficients above `L` plus the
//! energy of the residual `f - sum_{k<=K} a_k h_k` on the nodes, so it carries no
//! cancellation (the difference `E f^2 - sum a_k^2` would floor at 1e-15).
//!
//! Where no level meets the budget (`|rho|` near 1 at large variances, where tanh's
//! coefficients fall only like `exp(-c sqrt k)`), the entry is the 1-D integral of `f`
//! against the conditional mean of `g`:
//!
//! ```text
//! E[f(u) g(v)] = E_z[ f(s1 z) G(rho s2 z) ],   G(mu) = E[g(mu + sigma eps)],  sigma^2 = s22 (1 - rho^2),
//! ```
//!
//! the outer integral on the row's grid (values of `f` cached; every `stride`-th node,
//! as fine as the outer integrand's strip needs), the inner one by a small
//! Gauss–Hermite rule, doubled until two rules agree within the budget (`sigma` is small
//! exactly where this path is taken: `sigma <= 0.3` on the issue-13 RNN). Rank one
//! (`rho = ±1`) is the same formula with `sigma = 0`.
//!
//! # Stated error
//! The step is chosen at construction by comparing the coefficient vectors of steps
//! `h` and `h/2` at the largest variance and a quarter of it, `h` from
//! `STEPS / sd_max` down: with `d` the largest l2 distance, the finer rule is used and
//! its coefficient error is taken to be at most `d` (the error falls like `exp(-c/h)`,
//! so the finer rule's is about `d^2`), contributing at most `SAFETY d (||a|| + ||b||)`
//! to every entry (Cauchy–Schwarz, `|rho|^k <= 1`). The stated error is that plus the
//! per-entry budget; an entry whose fallback cannot meet the budget raises the
//! kernel's stated error to what it achieved (`Smooth::error`), so the number printed
//! never claims more than was computed. `tests/it/quadrature.rs` checks every entry of
//! a block with variances up to 13 and `|rho|` up to 1 against an independent
//! degree-1024 2-D Gauss–Hermite reference.
//! Integrands are evaluated with [`Expr::eval_run`] on whole node arrays, not one
//! interpreted call per node.

use std::collections::HashMap;
use std::f64::consts::SQRT_2;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nalgebra::DMatrix;

use super::gauss::{self, TINY_VAR};
use crate::ir::expr::{Expr, Operand};

/// Series truncation levels tried per entry (polynomial degrees in `rho`).
pub(crate) const LEVELS: [usize; 8] = [4, 8, 16, 32, 64, 128, 192, 256];
/// Highest Hermite index kept.
pub(crate) const KMAX: usize = 256;
/// Steps tried for the coefficient rule, as `h * sd_max` (the trapezoid rule on an
/// integrand analytic in the strip `|Im u| < pi/2` of tanh's poles, in units of `u`,
/// has error `~ exp(-2 pi a / h)`, so its step must scale with `1/sd`), each step
/// compared with its half; capped at [`HMAX`].
const STEPS: [f64; 5] = [0.4, 0.2, 0.1, 0.05, 0.025];
/// Largest step: the discrete inner product must keep the `h_k`, `k <= KMAX`,
/// orthonormal (their spectrum reaches frequency `sqrt(4 KMAX) = 32`, far below
/// `2 pi / HMAX`).
const HMAX: f64 = 0.1;
/// Largest outer step of the conditional rule, times `max(s1, |rho s2|)`.
const OUTER_STEP: f64 = 0.25;
/// `1/sqrt(2 pi)`
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
/// Safety factor on the coefficient-error estimate (as `gauss::SAFETY`).
const SAFETY: f64 = 2.0;
/// Nodes whose weight times Cramér's bound `|h_k(z)| <= 1.09 e^{z^2/4}` is below this
/// contribute nothing at f64 accuracy and are dropped.
const DROP: f64 = 1e-25;

/// One Gauss–Hermite rule in standard-normal form with the Hermite table.
#[derive(Debug)]
struct Table {
    degree: usize,
    /// step of the grid
    h: f64,
    /// kept nodes `z_i` (standard normal) and weights `w_i` (summing to 1)
    z: Vec<f64>,
    w: Vec<f64>,
    /// `(K+1) x n`: `w_i h_k(z_i)`
    hw: DMatrix<f64>,
    /// `n x (K+1)`: `h_k(z_i)`
    hu: DMatrix<f64>,
}

impl Table {
    /// The trapezoid rule of step `h` on the standard normal density, nodes
    /// `(i + 1/2) h` (symmetric about 0, and none at 0, where `tanh(1/x)` and the like
    /// are undefined), cut where Cramér's bound makes them negligible.
    fn new(h: f64) -> Table {
        let (z, w): (Vec<f64>, Vec<f64>) = {
            let c = h * INV_SQRT_2PI;
            let mut half = Vec::new();
            let mut i = 0usize;
            loop {
                let z = (i as f64 + 0.5) * h;
                let w = c * (-0.5 * z * z).exp();
                if w * (0.25 * z * z).exp() <= DROP {
                    break;
                }
                half.push((z, w));
                i += 1;
            }
            let mut v: Vec<(f64, f64)> = half.iter().rev().map(|&(z, w)| (-z, w)).collect();
            v.extend(half);
            v.into_iter().unzip()
        };
        let n = z.len();
        let mut hu = DMatrix::zeros(n, KMAX + 1);
        for (i, &zi) in z.iter().enumerate() {
            // h_0 = 1, h_1 = z, h_{k+1} = (z h_k - sqrt(k) h_{k-1}) / sqrt(k+1)
            let (mut prev, mut cur) = (0.0, 1.0);
            for k in 0..=KMAX {
                hu[(i, k)] = cur;
                let kf = k as f64;
                let next = (zi * cur - kf.sqrt() * prev) / (kf + 1.0).sqrt();
                prev = cur;
                cur = next;
            }
        }
        let mut hw = hu.transpose();
        for (i, &wi) in w.iter().enumerate() {
            hw.column_mut(i).scale_mut(wi);
        }
        Table {
            degree: z.len(),
            h,
            z,
            w,
            hw,
            hu,
        }
    }
}

/// The series data of one function at one variance.
#[derive(Debug)]
struct Row {
    sd: f64,
    /// `a_0..=a_K`
    coef: Vec<f64>,
    /// `A_L` at each of [`LEVELS`]
    tail: [f64; LEVELS.len()],
    /// `f(sd z_i)` on the table's nodes
    fval: Vec<f64>,
}

/// Rows for the variances `vars` (clamped at 0; NaN rows for non-finite ones).
fn rows(f: &Expr, t: &Table, vars: &[f64]) -> Vec<Row> {
    let n = t.z.len();
    let r = vars.len();
    let mut fv = DMatrix::zeros(n, r);
    let mut arg = vec![0.0; n];
    for (j, &v) in vars.iter().enumerate() {
        let s = if v.is_finite() {
            v.max(0.0).sqrt()
        } else {
            f64::NAN
        };
        for (a, &z) in arg.iter_mut().zip(&t.z) {
            *a = s * z;
        }
        f.eval_run(&[Operand::Column(&arg)], 0, fv.column_mut(j).as_mut_slice());
    }
    let coef = &t.hw * &fv;
    let resid = &fv - &t.hu * &coef;
    (0..r)
        .map(|j| {
            let c: Vec<f64> = coef.column(j).iter().copied().collect();
            let e: f64 = resid
                .column(j)
                .iter()
                .zip(&t.w)
                .map(|(x, w)| w * x * x)
                .sum();
            let mut tail = [0.0; LEVELS.len()];
            let mut acc = e;
            let mut li = LEVELS.len();
            for k in (0..=KMAX).rev() {
                while li > 0 && LEVELS[li - 1] == k {
                    li -= 1;
                    tail[li] = acc;
                }
                acc += c[k] * c[k];
            }
            let v = vars[j];
            Row {
                sd: if v.is_finite() {
                    v.max(0.0).sqrt()
                } else {
                    f64::NAN
                },
                coef: c,
                tail,
                fval: fv.column(j).iter().copied().collect(),
            }
        })
        .collect()
}

/// A prepared smooth pair kernel; see the module doc.
#[derive(Debug)]
pub(crate) struct Smooth {
    f: Expr,
    g: Expr,
    same: bool,
    table: Table,
    /// per-entry allowance for truncation and the fallback's inner rule
    budget: f64,
    /// stated error: coefficient error + budget
    error: f64,
    coef_error: f64,
    cache_f: Arc<Mutex<HashMap<u64, Arc<Row>>>>,
    cache_g: Arc<Mutex<HashMap<u64, Arc<Row>>>>,
    /// largest per-entry error above the budget seen (f64 bits), see the module doc
    worst: AtomicU64,
}

impl Smooth {
    /// Prepares `E[f(u) g(v)]` for variances up to `max_var`, with a per-entry error
    /// target `tol * max(1, ||f|| ||g||)` (norms in L2 of the Gaussian at `max_var`).
    pub(crate) fn new(f: &Expr, g: &Expr, max_var: f64, tol: f64) -> Smooth {
        let v = if max_var.is_finite() {
            max_var.max(1e-3)
        } else {
            1.0
        };
        let test = [v, v / 4.0];
        let norm = |r: &Row| r.coef.iter().map(|c| c * c).sum::<f64>().sqrt() + r.tail[0].sqrt();
        let same = f == g;
        let fns: Vec<&Expr> = if same { vec![f] } else { vec![f, g] };
        // coefficient vectors at rule m for every test (function, variance)
        let at = |t: &Table| -> Vec<Row> { fns.iter().flat_map(|h| rows(h, t, &test)).collect() };
        let sd = v.sqrt();
        let step = |c: f64| (c / sd).min(HMAX);
        let mut table = Table::new(step(STEPS[0]));
        let mut cur = at(&table);
        let mut diff = f64::INFINITY;
        for &c in &STEPS {
            let next_t = Table::new(0.5 * step(c));
            let next = at(&next_t);
            let d = cur
                .iter()
                .zip(&next)
                .map(|(a, b)| {
                    a.coef
                        .iter()
                        .zip(&b.coef)
                        .map(|(x, y)| (x - y) * (x - y))
                        .sum::<f64>()
                        .sqrt()
                })
                .fold(0.0f64, |acc, x| {
                    if x.is_nan() {
                        f64::INFINITY
                    } else {
                        acc.max(x)
                    }
                });
            // The finer rule, whose error is (far) below this difference.
            diff = d;
            table = next_t;
            cur = next;
            let scale = cur.iter().map(norm).fold(1.0f64, f64::max);
            if SAFETY * d <= 0.1 * tol * scale {
                break;
            }
        }
        let nf = cur.iter().take(test.len()).map(norm).fold(0.0f64, f64::max);
        let ng = if same {
            nf
        } else {
            cur.iter().skip(test.len()).map(norm).fold(0.0f64, f64::max)
        };
        let scale = (nf * ng).max(1.0);
        let coef_error = SAFETY * diff * (nf + ng) + 16.0 * f64::EPSILON * scale;
        // A twentieth of the target: the recursions add several kernels per entry (an
        // NTK entry sums products of two of them), and existing references hold the
        // results to 1e-12 absolute.
        let budget = 0.05 * tol * scale;
        Smooth {
            f: f.clone(),
            g: g.clone(),
            same,
            table,
            budget,
            error: coef_error + budget,
            coef_error,
            cache_f: Arc::new(Mutex::new(HashMap::new())),
            cache_g: Arc::new(Mutex::new(HashMap::new())),
            worst: AtomicU64::new(0),
        }
    }

    /// Shares the row caches of `old` (a kernel of the same functions prepared for
    /// smaller variances) when both use the same grid: rows depend only on the
    /// function, the grid and the variance.
    pub(crate) fn adopt_cache(&mut self, old: &Smooth) {
        if old.f == self.f && old.g == self.g && old.table.h == self.table.h {
            self.cache_f = Arc::clone(&old.cache_f);
            self.cache_g = Arc::clone(&old.cache_g);
        }
    }

    pub(crate) fn degree(&self) -> usize {
        self.table.degree
    }

    /// The stated error, including any entry that needed more than the budget.
    pub(crate) fn error(&self) -> f64 {
        let w = f64::from_bits(self.worst.load(Ordering::Relaxed));
        if w > self.budget {
            self.coef_error + w
        } else {
            self.error
        }
    }

    fn note(&self, e: f64) {
        if e > self.budget || e.is_nan() {
            let e = if e.is_nan() { f64::INFINITY } else { e };
            self.worst.fetch_max(e.to_bits(), Ordering::Relaxed);
        }
    }

    /// Cached rows of `f` (`second = false`) or `g` for `vars`.
    fn rows_for(&self, second: bool, vars: &[f64]) -> Vec<Arc<Row>> {
        let second = second && !self.same;
        let (h, cache) = if second {
            (&self.g, &self.cache_g)
        } else {
            (&self.f, &self.cache_f)
        };
        let key = |v: f64| if v.is_finite() { v.max(0.0) } else { f64::NAN }.to_bits();
        let mut missing: Vec<f64> = {
            let c = cache.lock().unwrap_or_else(|e| e.into_inner());
            vars.iter()
                .copied()
                .filter(|&v| !c.contains_key(&key(v)))
                .collect()
        };
        missing.sort_by(|a, b| a.total_cmp(b));
        missing.dedup_by(|a, b| key(*a) == key(*b));
        let fresh = if missing.is_empty() {
            Vec::new()
        } else {
            rows(h, &self.table, &missing)
        };
        let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
        for (v, r) in missing.iter().zip(fresh) {
            c.insert(key(*v), Arc::new(r));
        }
        vars.iter().map(|&v| Arc::clone(&c[&key(v)])).collect()
    }

    /// Prepares a block: rows of `f` for `d1` and of `g` for `d2`.
    pub(crate) fn block<'a>(&'a self, d1: &[f64], d2: &[f64]) -> SmoothBlock<'a> {
        SmoothBlock {
            k: self,
            a: self.rows_for(false, d1),
            b: self.rows_for(true, d2),
        }
    }

    /// One entry (clamped covariance).
    pub(crate) fn eval(&self, s11: f64, s12: f64, s22: f64) -> f64 {
        let b = self.block(&[s11], &[s22]);
        b.at(0, 0, s12)
    }
}

/// Rows of one block.
pub(crate) struct SmoothBlock<'a> {
    k: &'a Smooth,
    a: Vec<Arc<Row>>,
    b: Vec<Arc<Row>>,
}

impl SmoothBlock<'_> {
    #[inline]
    pub(crate) fn at(&self, p: usize, q: usize, x: f64) -> f64 {
        let (ra, rb) = (&*self.a[p], &*self.b[q]);
        let n = ra.sd * rb.sd;
        if n.is_nan() || !x.is_finite() {
            return f64::NAN;
        }
        if ra.sd * ra.sd <= TINY_VAR || rb.sd * rb.sd <= TINY_VAR {
            // a constant side: f(0) E g or E f g(0) (a_0 = E f; a row at variance 0 has
            // a_0 = f(0) and no other coefficient)
            return ra.coef[0] * rb.coef[0];
        }
        let rho = super::dual::snap_rho((x / n).clamp(-1.0, 1.0));
        let r = rho.abs();
        if r < 1.0 {
            let budget = self.k.budget;
            // r^(L+1) by repeated squaring along the levels (powers of two, then
            // 192 = 128 + 64 and 256)
            let r2 = r * r;
            let r4 = r2 * r2;
            let mut rl = r4; // r^LEVELS[l]
            for (l, &lv) in LEVELS.iter().enumerate() {
                if l > 0 {
                    rl = match lv {
                        192 => rl * rl.sqrt(),
                        256 => rl * rl.powf(1.0 / 3.0),
                        _ => rl * rl,
                    };
                }
                if rl * r * (ra.tail[l] * rb.tail[l]).sqrt() <= budget {
                    // the levels are multiples of 4 (and even: rho^L = r^L)
                    return horner(&ra.coef[..lv], &rb.coef[..lv], rho)
                        + rl * ra.coef[lv] * rb.coef[lv];
                }
            }
        } else {
            // rank one: g(rho s2 z_i) = g(±s2 z_i) is the g row itself (nodes symmetric)
            let t = &self.k.table;
            let n = t.z.len();
            let s: f64 = if rho > 0.0 {
                (0..n).map(|i| t.w[i] * ra.fval[i] * rb.fval[i]).sum()
            } else {
                (0..n)
                    .map(|i| t.w[i] * ra.fval[i] * rb.fval[n - 1 - i])
                    .sum()
            };
            return s;
        }
        self.conditional(ra, rb, rho)
    }

    /// `E_z[f(s1 z) G(rho s2 z)]`; see the module doc.
    fn conditional(&self, ra: &Row, rb: &Row, rho: f64) -> f64 {
        let k = self.k;
        let t = &k.table;
        let c = rho * rb.sd;
        let sigma = rb.sd * ((1.0 - rho) * (1.0 + rho)).max(0.0).sqrt();
        let g = &k.g;
        // The outer integrand f(s1 z) G(c z) is analytic in |Im z| < (pi/2) / max(s1, |c|)
        // (G is g smoothed), so the trapezoid rule needs a step of at most
        // OUTER_STEP / max(s1, |c|) (error ~ exp(-2 pi (pi/2) / 0.25) ~ 1e-17 times the
        // integrand's size on the strip): every `stride`-th node of the row's grid (a
        // uniform grid again), with weights times `stride`; nodes whose weight is below
        // 1e-17 are dropped.
        let stride = ((OUTER_STEP / (t.h * ra.sd.max(c.abs()))).floor() as usize).max(1);
        let idx: Vec<usize> = (0..t.z.len())
            .filter(|&i| i % stride == 0 && t.w[i] > 1e-17)
            .collect();
        let sw = stride as f64;
        let mut mu: Vec<f64> = idx.iter().map(|&i| c * t.z[i]).collect();
        let outer = |gv: &[f64]| -> f64 {
            idx.iter()
                .zip(gv)
                .map(|(&i, gi)| sw * t.w[i] * ra.fval[i] * gi)
                .sum()
        };
        if sigma * sigma <= TINY_VAR {
            let mut gv = vec![0.0; mu.len()];
            g.eval_run(&[Operand::Column(&mu)], 0, &mut gv);
            return outer(&gv);
        }
        let inner = |m: usize| -> f64 {
            let r = gauss::rule(m);
            let n = mu.len();
            let mut args = Vec::with_capacity(n * m);
            let mut ws = Vec::with_capacity(m);
            for (&x, &w) in r.nodes.iter().zip(&r.weights) {
                ws.push(w / gauss::SQRT_PI);
                args.extend(mu.iter().map(|&u| u + sigma * SQRT_2 * x));
            }
            let mut gv = vec![0.0; args.len()];
            g.eval_run(&[Operand::Column(&args)], 0, &mut gv);
            let mut gsum = vec![0.0; n];
            for (j, &w) in ws.iter().enumerate() {
                for (s, v) in gsum.iter_mut().zip(&gv[j * n..(j + 1) * n]) {
                    *s += w * v;
                }
            }
            outer(&gsum)
        };
        let mut m = 3;
        let mut prev = inner(m);
        loop {
            let next = inner(2 * m);
            let d = (next - prev).abs();
            if d <= k.budget || 4 * m > gauss::MAX_DEGREE {
                k.note(SAFETY * d);
                mu.clear();
                return next;
            }
            prev = next;
            m *= 2;
        }
    }
}

/// `sum_k a_k b_k rho^k` with four interleaved Horner chains in `rho^4`; the length is
/// a multiple of 4.
#[inline]
fn horner(a: &[f64], b: &[f64], rho: f64) -> f64 {
    debug_assert!(a.len().is_multiple_of(4) && a.len() == b.len());
    let r2 = rho * rho;
    let r4 = r2 * r2;
    let mut acc = [0.0f64; 4];
    for (ca, cb) in a.chunks_exact(4).rev().zip(b.chunks_exact(4).rev()) {
        for j in 0..4 {
            acc[j] = acc[j] * r4 + ca[j] * cb[j];
        }
    }
    acc[0] + rho * acc[1] + r2 * (acc[2] + rho * acc[3])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::expr::Fun;

    #[test]
    fn horner_matches_naive() {
        let a: Vec<f64> = (0..24).map(|k| 1.0 / (k as f64 + 1.0)).collect();
        let b: Vec<f64> = (0..24).map(|k| (k as f64).cos()).collect();
        for &rho in &[-0.9f64, -0.3, 0.0, 0.5, 0.99] {
            let naive: f64 = (0..24).map(|k| a[k] * b[k] * rho.powi(k as i32)).sum();
            assert!((horner(&a, &b, rho) - naive).abs() < 1e-14);
        }
    }

    /// Independent reference: 2-D Gauss–Hermite of degree 2048 in native code.
    fn reference(f: fn(f64) -> f64, g: fn(f64) -> f64, s11: f64, s12: f64, s22: f64) -> f64 {
        gauss::expect2(&f, &g, s11, s12, s22, 2048)
    }

    #[test]
    fn tanh_entries_within_stated_error() {
        let f = Expr::call(Fun::Tanh, Expr::Arg(0));
        let k = Smooth::new(&f, &f, 13.0, 1e-11);
        for &(a, r, c) in &[
            (13.0, 0.5, 13.0),
            (13.0, 0.995, 12.0),
            (13.0, -0.9999, 13.0),
            (0.1, 0.3, 13.0),
            (2.0, 1.0, 2.0),
            (5.0, 0.999_999, 5.0),
        ] {
            let s12 = r * f64::sqrt(a * c);
            let v = k.eval(a, s12, c);
            let q = reference(f64::tanh, f64::tanh, a, s12, c);
            assert!(
                (v - q).abs() <= k.error(),
                "({a},{r},{c}): {v} vs {q}, stated {}",
                k.error()
            );
        }
        assert!(k.error() <= 1e-10, "{}", k.error());
    }
}
