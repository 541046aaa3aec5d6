//! Randomized quasi-Monte Carlo for Gaussian expectations in many dimensions.
//!
//! When the covariance of a Master-Theorem expectation has rank above 3, tensor
//! Gauss–Hermite costs `m^rank` evaluations and stops being practical (theory.md §3.3
//! covers only the 2-D case). Quasi-Monte Carlo keeps an error close to `O(1/M)` for
//! smooth integrands instead of Monte Carlo's `O(1/sqrt M)`, and *randomizing* it makes
//! the error measurable: `R` independent random digital shifts of one Sobol' net give
//! `R` i.i.d. unbiased estimates, whose spread is an honest standard error.
//!
//! * Points: Sobol' sequence, Joe–Kuo direction numbers (`new-joe-kuo-6.21201`) for the
//!   first 32 dimensions, generated in Gray-code order.
//! * Randomization: a uniform random 64-bit digital shift (XOR) per dimension and
//!   replicate, from `Xoshiro256PlusPlus` seeded by the caller's seed (portable across
//!   platforms, unlike `SmallRng`). Each shifted point is exactly uniform on the
//!   `2^-53` grid of (0, 1), so every replicate is unbiased.
//! * Dimensions beyond 32 are padded with pseudo-random uniforms from a per-replicate
//!   stream; callers order coordinates by importance (principal components first),
//!   so the Sobol' dimensions carry most of the variance.
//! * Uniform to normal: [`inv_norm_cdf`], Acklam's rational approximation polished by one
//!   Halley step against `erfc`, which brings it to full double precision.

use rand::rngs::Xoshiro256PlusPlus;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::gauss::{Estimate, Method};

/// Number of dimensions with hard-coded Sobol' direction numbers.
pub const SOBOL_MAX_DIM: usize = 32;

/// Bits of each Sobol' coordinate: at most `2^BITS` points.
const BITS: usize = 32;

/// Joe–Kuo (2008) `new-joe-kuo-6.21201`, dimensions 2..=32: degree `s` of the primitive
/// polynomial, its interior coefficients `a`, initial direction numbers `m_1..m_s`.
const JOE_KUO: [(u32, u32, &[u64]); SOBOL_MAX_DIM - 1] = [
    (1, 0, &[1]),
    (2, 1, &[1, 3]),
    (3, 1, &[1, 3, 1]),
    (3, 2, &[1, 1, 1]),
    (4, 1, &[1, 1, 3, 3]),
    (4, 4, &[1, 3, 5, 13]),
    (5, 2, &[1, 1, 5, 5, 17]),
    (5, 4, &[1, 1, 5, 5, 5]),
    (5, 7, &[1, 1, 7, 11, 19]),
    (5, 11, &[1, 1, 5, 1, 1]),
    (5, 13, &[1, 1, 1, 3, 11]),
    (5, 14, &[1, 3, 5, 5, 31]),
    (6, 1, &[1, 3, 3, 9, 7, 49]),
    (6, 13, &[1, 1, 1, 15, 21, 21]),
    (6, 16, &[1, 3, 1, 13, 27, 49]),
    (6, 19, &[1, 1, 1, 15, 7, 5]),
    (6, 22, &[1, 3, 1, 15, 13, 25]),
    (6, 25, &[1, 1, 5, 5, 19, 61]),
    (7, 1, &[1, 3, 7, 11, 23, 15, 103]),
    (7, 4, &[1, 3, 7, 13, 13, 15, 69]),
    (7, 7, &[1, 1, 3, 13, 7, 35, 63]),
    (7, 8, &[1, 3, 5, 9, 1, 25, 53]),
    (7, 14, &[1, 3, 1, 13, 9, 35, 107]),
    (7, 19, &[1, 3, 1, 5, 27, 61, 31]),
    (7, 21, &[1, 1, 5, 11, 19, 41, 61]),
    (7, 28, &[1, 3, 5, 3, 3, 13, 69]),
    (7, 31, &[1, 1, 7, 13, 1, 19, 1]),
    (7, 32, &[1, 3, 7, 5, 13, 19, 59]),
    (7, 37, &[1, 1, 3, 9, 25, 29, 41]),
    (7, 41, &[1, 3, 5, 13, 23, 1, 55]),
    (7, 42, &[1, 3, 7, 3, 13, 59, 17]),
];

/// Direction numbers of one dimension, left-aligned in a u64: `v[k] = m_{k+1} / 2^{k+1}`.
fn directions(dim: usize) -> [u64; BITS] {
    let mut v = [0u64; BITS];
    if dim == 0 {
        for (k, vk) in v.iter_mut().enumerate() {
            *vk = 1u64 << (63 - k);
        }
        return v;
    }
    let (s, a, m) = JOE_KUO[dim - 1];
    let s = s as usize;
    for k in 0..s.min(BITS) {
        v[k] = m[k] << (63 - k);
    }
    for k in s..BITS {
        let mut x = v[k - s] ^ (v[k - s] >> s);
        for l in 1..s {
            if (a >> (s - 1 - l)) & 1 == 1 {
                x ^= v[k - l];
            }
        }
        v[k] = x;
    }
    v
}

/// The unshifted Sobol' points `0..n` in dimension `dim` (<= 32), Gray-code order, as
/// left-aligned 64-bit fractions. Mainly for tests; [`gaussian_mean`] streams them.
pub fn sobol_points(dim: usize, n: usize) -> Vec<Vec<f64>> {
    let dim = dim.min(SOBOL_MAX_DIM);
    let v: Vec<[u64; BITS]> = (0..dim).map(directions).collect();
    let mut x = vec![0u64; dim];
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        if i > 0 {
            let c = (i as u64).trailing_zeros() as usize;
            for (xj, vj) in x.iter_mut().zip(&v) {
                *xj ^= vj[c];
            }
        }
        out.push(
            x.iter()
                .map(|&b| b as f64 / 18_446_744_073_709_551_616.0)
                .collect(),
        );
    }
    out
}

/// `Phi^{-1}(p)`, the standard normal quantile, to full double precision for
/// `p in [1e-300, 1 - 2^-53]`.
///
/// Acklam's rational approximation (relative error 1.15e-9) followed by one Halley step
/// `x -= u / (1 + x u / 2)`, `u = (Phi(x) - p) sqrt(2 pi) e^{x^2/2}`, with `Phi` from
/// `erfc` (accurate in the lower tail). Upper-tail `p` are reflected, `1 - p` being
/// exact for `p >= 1/2`, so the refinement always works in the accurate tail.
pub fn inv_norm_cdf(p: f64) -> f64 {
    if p.is_nan() || !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    if p == 0.0 {
        return f64::NEG_INFINITY;
    }
    if p == 1.0 {
        return f64::INFINITY;
    }
    if p > 0.5 {
        return -inv_lower(1.0 - p);
    }
    inv_lower(p)
}

/// Acklam + Halley for `0 < p <= 1/2`.
fn inv_lower(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const P_LOW: f64 = 0.02425;
    let x = if p < P_LOW {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    };
    let e = 0.5 * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2) - p;
    let u = e * (2.0 * std::f64::consts::PI).sqrt() * (0.5 * x * x).exp();
    x - u / (1.0 + 0.5 * x * u)
}

/// Maps a shifted 64-bit fraction to a uniform in (0, 1) on the `2^-53` grid, never 0.
#[inline]
fn to_unit(bits: u64) -> f64 {
    ((bits >> 11) as f64 + 0.5) * (1.0 / 9_007_199_254_740_992.0)
}

/// Result of one randomized-QMC run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QmcResult {
    /// Mean over the replicates.
    pub mean: f64,
    /// Standard error of `mean`: sample standard deviation of the replicate means over
    /// `sqrt(shifts)`.
    pub std_error: f64,
    pub shifts: usize,
    pub points: usize,
}

/// `E[f(z)]`, `z ~ N(0, I_dim)`, by `shifts` digitally shifted copies of the first
/// `points` Sobol' points (`points` rounded up to a power of two, so every replicate is
/// a full (t, m, s)-net). Deterministic for a given `seed`: shifts are drawn in order
/// from one `Xoshiro256PlusPlus` stream before the replicates run in parallel.
pub fn gaussian_mean(
    f: &(dyn Fn(&[f64]) -> f64 + Sync),
    dim: usize,
    points: usize,
    shifts: usize,
    seed: u64,
) -> QmcResult {
    let points = points.clamp(1, 1 << 31).next_power_of_two();
    let shifts = shifts.max(2);
    let qdim = dim.min(SOBOL_MAX_DIM);
    let v: Vec<[u64; BITS]> = (0..qdim).map(directions).collect();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let plans: Vec<(Vec<u64>, u64)> = (0..shifts)
        .map(|_| {
            let sh: Vec<u64> = (0..qdim).map(|_| rng.next_u64()).collect();
            (sh, rng.next_u64())
        })
        .collect();
    let means: Vec<f64> = plans
        .par_iter()
        .map(|(shift, pad_seed)| {
            let mut pad = Xoshiro256PlusPlus::seed_from_u64(*pad_seed);
            let mut x = vec![0u64; qdim];
            let mut z = vec![0.0; dim];
            // Neumaier-compensated sum: 2^20 terms of mixed sign lose digits otherwise.
            let (mut sum, mut comp) = (0.0f64, 0.0f64);
            for i in 0..points {
                if i > 0 {
                    let c = (i as u64).trailing_zeros() as usize;
                    for (xj, vj) in x.iter_mut().zip(&v) {
                        *xj ^= vj[c];
                    }
                }
                for j in 0..qdim {
                    z[j] = inv_norm_cdf(to_unit(x[j] ^ shift[j]));
                }
                for zj in z.iter_mut().skip(qdim) {
                    *zj = inv_norm_cdf(to_unit(pad.next_u64()));
                }
                let y = f(&z);
                let t = sum + y;
                if sum.abs() >= y.abs() {
                    comp += (sum - t) + y;
                } else {
                    comp += (y - t) + sum;
                }
                sum = t;
            }
            (sum + comp) / points as f64
        })
        .collect();
    let r = means.len() as f64;
    let mean = means.iter().sum::<f64>() / r;
    let var = means.iter().map(|m| (m - mean).powi(2)).sum::<f64>() / (r - 1.0);
    QmcResult {
        mean,
        std_error: (var / r).sqrt(),
        shifts,
        points,
    }
}

/// Number of random shifts used by [`gaussian_mean_tol`].
pub const DEFAULT_SHIFTS: usize = 16;

/// The QMC error stated to users is this many standard errors over the shifts.
pub const STATED_SIGMAS: f64 = 3.0;

/// Largest point count per shift tried by [`gaussian_mean_tol`].
pub const MAX_POINTS: usize = 1 << 18;

/// `E[f(z)]`, `z ~ N(0, I_dim)`, doubling the points per shift from 1024 until the
/// standard error is below `tol * max(1, |mean|)` or [`MAX_POINTS`] is reached. The
/// returned error is three standard errors ([`STATED_SIGMAS`]): a statistical
/// statement (exceeded with probability ~0.3% under normality), never a bound, and the
/// report says so.
pub fn gaussian_mean_tol(
    f: &(dyn Fn(&[f64]) -> f64 + Sync),
    dim: usize,
    tol: f64,
    seed: u64,
) -> Estimate {
    let mut points = 1024;
    loop {
        let r = gaussian_mean(f, dim, points, DEFAULT_SHIFTS, seed);
        let ok = r.std_error <= tol * r.mean.abs().max(1.0);
        if ok || points >= MAX_POINTS || !r.mean.is_finite() {
            return Estimate {
                value: r.mean,
                error: STATED_SIGMAS * r.std_error,
                method: Method::Qmc {
                    shifts: r.shifts,
                    points: r.points,
                },
            };
        }
        points *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::PI;

    #[test]
    fn first_sobol_points() {
        let pts = sobol_points(3, 8);
        let expect = [
            [0.0, 0.0, 0.0],
            [0.5, 0.5, 0.5],
            [0.75, 0.25, 0.25],
            [0.25, 0.75, 0.75],
            [0.375, 0.375, 0.625],
            [0.875, 0.875, 0.125],
            [0.625, 0.125, 0.875],
            [0.125, 0.625, 0.375],
        ];
        for (p, e) in pts.iter().zip(&expect) {
            assert_eq!(p.as_slice(), e.as_slice());
        }
    }

    #[test]
    fn sobol_coordinates_are_stratified() {
        // Each generator matrix is upper triangular with a unit diagonal (odd m_k), so
        // every 1-D projection of the first 2^k points hits each of the 2^k intervals
        // exactly once.
        let n = 1 << 10;
        let pts = sobol_points(SOBOL_MAX_DIM, n);
        for j in 0..SOBOL_MAX_DIM {
            let mut seen = vec![false; n];
            for p in &pts {
                let b = (p[j] * n as f64) as usize;
                assert!(!seen[b], "dim {j}");
                seen[b] = true;
            }
        }
    }

    #[test]
    fn inverse_cdf_round_trips() {
        assert!((inv_norm_cdf(0.975) - 1.959_963_984_540_054).abs() < 2e-15);
        assert_eq!(inv_norm_cdf(0.5), 0.0);
        let phi = |x: f64| 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
        for k in 1..300 {
            let p = 10f64.powi(-k);
            let x = inv_norm_cdf(p);
            // Phi amplifies a relative change of x by x^2: one ulp of x is ~x^2 1e-16.
            let bound = 1e-14 * x * x;
            assert!(
                ((phi(x) - p) / p).abs() < bound.max(1e-14),
                "p=1e-{k}: {}",
                phi(x)
            );
        }
        for i in 1..1000 {
            let p = i as f64 / 1000.0;
            let x = inv_norm_cdf(p);
            // relative error of Phi in the upper half measured on 1 - Phi
            let err = if p <= 0.5 {
                (phi(x) - p) / p
            } else {
                (phi(-x) - (1.0 - p)) / (1.0 - p)
            };
            assert!(err.abs() < 1e-14, "p={p}: {err}");
        }
        assert!(inv_norm_cdf(f64::NAN).is_nan());
        assert_eq!(inv_norm_cdf(0.0), f64::NEG_INFINITY);
    }

    /// E[relu(z1) relu(z2) ... ] in 5 dims with a known product form, and a correlated
    /// one through an explicit factor.
    #[test]
    fn five_dim_relu_products_within_4_se() {
        // independent: E[prod relu(z_i)] = (2 pi)^{-5/2}
        let f = |z: &[f64]| z.iter().map(|x| x.max(0.0)).product::<f64>();
        let exact = (2.0 * PI).powf(-2.5);
        let r = gaussian_mean(&f, 5, 4096, 16, 11);
        assert!(
            (r.mean - exact).abs() < 4.0 * r.std_error,
            "{r:?} vs {exact}"
        );
        // E[relu(u) relu(v)] with u = z0 + z1 + z2, v = z2 + z3 + z4 (Var 3, Cov 1):
        // arc-cosine kernel (theory.md §3.2).
        let g = |z: &[f64]| (z[0] + z[1] + z[2]).max(0.0) * (z[2] + z[3] + z[4]).max(0.0);
        let rho: f64 = 1.0 / 3.0;
        let th = rho.acos();
        let exact = 3.0 * (th.sin() + (PI - th) * rho) / (2.0 * PI);
        let r = gaussian_mean(&g, 5, 4096, 16, 12);
        assert!(
            (r.mean - exact).abs() < 4.0 * r.std_error,
            "{r:?} vs {exact}"
        );
        assert!(r.std_error < 1e-3);
    }

    #[test]
    fn standard_error_shrinks_and_is_deterministic() {
        let g = |z: &[f64]| (z[0] + 0.5 * z[3]).tanh() * (z[1] - z[2] + z[4]).max(0.0);
        let a = gaussian_mean(&g, 5, 1024, 16, 3);
        let b = gaussian_mean(&g, 5, 16384, 16, 3);
        assert!(b.std_error < a.std_error / 4.0, "{a:?} {b:?}");
        let c = gaussian_mean(&g, 5, 1024, 16, 3);
        assert_eq!(a, c);
        let d = gaussian_mean(&g, 5, 1024, 16, 4);
        assert_ne!(a.mean, d.mean);
    }

    #[test]
    fn padding_beyond_sobol_dims() {
        // 40 dims: E[(sum z)^2 / 40] = 1
        let f = |z: &[f64]| z.iter().sum::<f64>().powi(2) / 40.0;
        let r = gaussian_mean(&f, 40, 4096, 16, 5);
        assert!((r.mean - 1.0).abs() < 4.0 * r.std_error, "{r:?}");
    }
}
