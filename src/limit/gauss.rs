//! Gauss–Hermite quadrature for expectations of functions of centered Gaussians.
//!
//! The Master Theorem turns every limit quantity into `E[phi(Z)]` for a centered
//! Gaussian vector `Z` (theory.md §1.2). For one or two coordinates and smooth `phi`
//! the tool of choice is Gauss–Hermite quadrature (theory.md §3.3): with the
//! physicists' nodes `x_i` and weights `w_i` for the weight `e^{-x^2}`,
//!
//! ```text
//! E[f(u)]       ~= pi^{-1/2} sum_i   w_i     f( sqrt(2 S11) x_i )
//! E[f(u) g(v)]  ~= pi^{-1}   sum_ij  w_i w_j f( sqrt(2) L11 x_i ) g( sqrt(2) (L21 x_i + L22 x_j) )
//! ```
//!
//! where `L` is the Cholesky factor of `[[S11, S12], [S12, S22]]`. An `m`-point rule
//! is exact for polynomials of degree `2m - 1` and converges geometrically for
//! functions analytic in a strip (tanh, erf, sigmoid, gelu), but only algebraically
//! for kinked ones (relu, step, abs; theory.md §3.3 measured 1e-3 and 1e-2 errors):
//! those get closed forms in [`super::dual`] where possible, and an honest, larger
//! error bound where not.
//!
//! Every number this module hands out is an [`Estimate`]: a value, an error estimate and
//! the [`Method`] that produced it, because the limit engine prints all three.

use std::f64::consts::{PI, SQRT_2};
use std::fmt;
use std::sync::OnceLock;

use nalgebra::DMatrix;

use super::qmc;

/// `sqrt(pi)`: the total mass of the weight `e^{-x^2}`.
pub const SQRT_PI: f64 = 1.772_453_850_905_516;

/// Largest rule this module builds. The Hermite-function recurrence used to find the
/// nodes starts from `e^{-x^2/2}` at the largest node `~ sqrt(2m)`, which stays above
/// the smallest normal double up to `m ~ 700`; 512 leaves margin and is more than any
/// smooth integrand needs (tanh to 1e-10 needs ~256 at variance 4).
pub const MAX_DEGREE: usize = 2048;

/// Variances at or below this are treated as exactly zero (the coordinate is the
/// constant 0). Anything this small is round-off of a zero variance.
pub(crate) const TINY_VAR: f64 = 1e-290;

/// An `m`-point Gauss–Hermite rule for the weight `e^{-x^2}` on the real line.
///
/// Nodes are in increasing order and symmetric about 0; weights sum to `sqrt(pi)`.
#[derive(Clone, Debug)]
pub struct Rule {
    pub nodes: Vec<f64>,
    pub weights: Vec<f64>,
}

impl Rule {
    pub fn degree(&self) -> usize {
        self.nodes.len()
    }
}

/// The `m`-point rule, built once per degree and shared.
///
/// One `OnceLock` per degree: after the first call a lookup is a single atomic load, so
/// per-entry calls from parallel block evaluation do not contend on a lock. `m` is
/// clamped to `1..=MAX_DEGREE`.
pub fn rule(m: usize) -> &'static Rule {
    static RULES: [OnceLock<Rule>; MAX_DEGREE + 1] = [const { OnceLock::new() }; MAX_DEGREE + 1];
    let m = m.clamp(1, MAX_DEGREE);
    RULES[m].get_or_init(|| compute_rule(m))
}

/// Orthonormal Hermite functions `psi_k(x) = p_k(x) e^{-x^2/2}` at `x`, returning
/// `(psi_n(x), psi_{n-1}(x))`.
///
/// Why functions and not polynomials: `p_n(x)` at the largest node of a 400-point rule
/// is ~e^{400}; the Gaussian factor keeps every intermediate of the three-term
/// recurrence `psi_k = x sqrt(2/k) psi_{k-1} - sqrt((k-1)/k) psi_{k-2}` in range.
fn hermite_fn(n: usize, x: f64) -> (f64, f64) {
    // pi^{-1/4}
    let mut p1 = 0.751_125_544_464_942_5 * (-0.5 * x * x).exp();
    let mut p2 = 0.0;
    for j in 1..=n {
        let jf = j as f64;
        let p3 = p2;
        p2 = p1;
        p1 = x * (2.0 / jf).sqrt() * p2 - ((jf - 1.0) / jf).sqrt() * p3;
    }
    (p1, p2)
}

/// Nodes are the eigenvalues of the Jacobi matrix of the Hermite recurrence (zero
/// diagonal, off-diagonal `sqrt(k/2)`), located one by one by Sturm-sequence bisection
/// (the inertia of `J - x I` counts eigenvalues below `x`; backward stable, and it
/// cannot skip or duplicate a root, which Newton from the asymptotic guesses of
/// Numerical Recipes' `gauher` does for `n >~ 200`), then polished by Newton on the
/// recurrence using `p_n' = sqrt(2n) p_{n-1}` for orthonormal Hermite polynomials.
/// O(n^2) per rule.
///
/// Weights are `w_i = e^{-x_i^2} / (n psi_{n-1}(x_i)^2)`, accurate in the relative sense
/// even for the tiny outer weights (Golub–Welsch eigenvectors give them only to
/// absolute precision).
fn compute_rule(n: usize) -> Rule {
    let half = n.div_ceil(2);
    let upper = (2.0 * n as f64 + 1.0).sqrt() + 1.0;
    let mut roots: Vec<(f64, f64)> = Vec::with_capacity(half);
    for k in 0..half {
        // k-th largest root = eigenvalue number n-1-k in increasing order.
        let idx = n - 1 - k;
        let z = if n % 2 == 1 && k == half - 1 {
            0.0
        } else {
            let hi0 = roots.last().map_or(upper, |r| r.0);
            // Gaps shrink towards the centre: the next root lies within three times the
            // previous gap below the previous root (checked by the Sturm count; else the
            // whole half-line is searched).
            let mut lo = 0.0f64;
            let mut hi = hi0;
            if roots.len() >= 2 {
                let gap = roots[roots.len() - 2].0 - hi0;
                // Newton from the previous gap, accepted when two Sturm counts confirm
                // that it found eigenvalue `idx` (and not a neighbour).
                if let Some(z) = newton_root(n, hi0 - gap, idx, 0.0, hi0) {
                    roots.push((z, weight(n, z)));
                    continue;
                }
                let guess = hi0 - 3.0 * gap;
                if guess > 0.0 && sturm_count(n, guess) <= idx {
                    lo = guess;
                }
            }
            // Bisection to 1e-7 (relative), then Newton on the recurrence, accepted only
            // while it stays inside the bracket; bisection to the ulp otherwise. Beyond
            // z^2 = 690 the weight is 0 (see `weight`) and the node is never used: the
            // coarse position is kept.
            let coarse = 1e-7 * hi.max(1.0);
            bisect(n, idx, &mut lo, &mut hi, coarse);
            let mid = 0.5 * (lo + hi);
            if mid * mid > 700.0 {
                mid
            } else if let Some(z) = newton_root(n, mid, idx, lo, hi) {
                z
            } else {
                bisect(n, idx, &mut lo, &mut hi, 0.0);
                newton_polish(n, 0.5 * (lo + hi))
            }
        };
        roots.push((z, weight(n, z)));
    }
    assemble(n, roots)
}

/// Newton's method on `psi_n` from `z` for eigenvalue `idx`, kept inside `(lo, hi)`;
/// the result is accepted only if the Sturm counts just below and above it bracket
/// exactly that eigenvalue.
fn newton_root(n: usize, mut z: f64, idx: usize, lo: f64, hi: f64) -> Option<f64> {
    if !(z > lo && z < hi) || z * z > 600.0 {
        return None;
    }
    let s = (2.0 * n as f64).sqrt();
    let mut converged = false;
    for _ in 0..12 {
        let (pn, pn1) = hermite_fn(n, z);
        let dz = pn / (s * pn1);
        if !dz.is_finite() {
            return None;
        }
        let next = z - dz;
        if next <= lo || next >= hi {
            return None;
        }
        z = next;
        if dz.abs() <= 4.0 * f64::EPSILON * z.abs().max(1.0) {
            converged = true;
            break;
        }
    }
    let d = 1e-9 * z.abs().max(1e-3);
    (converged && sturm_count(n, z - d) == idx && sturm_count(n, z + d) == idx + 1).then_some(z)
}

/// Sturm bisection for eigenvalue `idx` on `[lo, hi]` until the bracket is at most
/// `width` wide (0: to the ulp).
fn bisect(n: usize, idx: usize, lo: &mut f64, hi: &mut f64, width: f64) {
    for _ in 0..200 {
        let mid = 0.5 * (*lo + *hi);
        if mid <= *lo || mid >= *hi || *hi - *lo <= width {
            break;
        }
        if sturm_count(n, mid) <= idx {
            *lo = mid;
        } else {
            *hi = mid;
        }
    }
}

/// Number of eigenvalues of the `n x n` Hermite Jacobi matrix below `x` (LDL^T inertia).
fn sturm_count(n: usize, x: f64) -> usize {
    let mut count = 0;
    let mut q = -x;
    if q < 0.0 {
        count += 1;
    }
    for i in 1..n {
        let qq = if q == 0.0 { f64::MIN_POSITIVE } else { q };
        q = -x - (i as f64 / 2.0) / qq;
        if q < 0.0 {
            count += 1;
        }
    }
    count
}

/// Two Newton steps from a bisection result that is already within a few ulps; a step
/// that would move more than 1e-10 (relative) is rejected as round-off noise.
fn newton_polish(n: usize, mut z: f64) -> f64 {
    let s = (2.0 * n as f64).sqrt();
    for _ in 0..2 {
        let (pn, pn1) = hermite_fn(n, z);
        let dz = pn / (s * pn1);
        if !dz.is_finite() || dz.abs() > 1e-10 * z.abs().max(1.0) {
            break;
        }
        z -= dz;
    }
    z
}

fn weight(n: usize, z: f64) -> f64 {
    // Beyond |z| ~ 26 the weight is below 1e-300 and the Hermite functions underflow:
    // such nodes contribute nothing representable, so their weight is 0.
    if z * z > 690.0 {
        return 0.0;
    }
    let (_, pn1) = hermite_fn(n, z);
    let w = (-z * z).exp() / (n as f64 * pn1 * pn1);
    if w.is_finite() {
        w
    } else {
        0.0
    }
}

/// Mirrors the non-negative half (largest first) into an increasing rule.
fn assemble(n: usize, half: Vec<(f64, f64)>) -> Rule {
    let mut nodes = vec![0.0; n];
    let mut weights = vec![0.0; n];
    for (i, &(z, w)) in half.iter().enumerate() {
        nodes[n - 1 - i] = z;
        weights[n - 1 - i] = w;
        nodes[i] = -z;
        weights[i] = w;
    }
    Rule { nodes, weights }
}

// ----------------------------------------------------------------------------------
// Estimates and methods

/// How a number was computed. Displayed to users next to the number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// An exact formula (theory.md §3.2); the families used are listed.
    ClosedForm(Families),
    /// Tensor-product Gauss–Hermite with `degree` nodes per dimension, in `dims`
    /// dimensions. `kinked` flags an integrand with relu/step/abs, for which the rule
    /// converges only algebraically (theory.md §3.3).
    GaussHermite {
        degree: usize,
        dims: usize,
        kinked: bool,
    },
    /// Randomized quasi-Monte Carlo: `shifts` independent random shifts of a
    /// `points`-point Sobol' net; the error is [`qmc::STATED_SIGMAS`] standard errors over
    /// the shifts: a statistical statement, not a bound.
    Qmc { shifts: usize, points: usize },
    /// Mehler's Hermite series in the correlation, coefficients per variance by a
    /// `degree`-node trapezoid rule, with a conditional 1-D rule near `|rho| = 1`
    /// (smooth integrands; `smooth.rs`).
    HermiteSeries { degree: usize },
    /// Independent Gaussian families integrated one inside the other (`nested.rs`):
    /// conditional 1-D Gauss–Legendre rules of `degree` nodes per panel, panels split at
    /// the integrand's kinks, over `dims` standard variables.
    Nested { degree: usize, dims: usize },
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Method::ClosedForm(fam) => write!(f, "closed form ({fam})"),
            Method::GaussHermite {
                degree,
                dims,
                kinked,
            } => {
                write!(f, "Gauss–Hermite, degree {degree}")?;
                if *dims > 2 {
                    write!(f, " in {dims} dimensions")?;
                }
                if *kinked {
                    write!(f, " (kinked integrand: slow convergence)")?;
                }
                Ok(())
            }
            Method::Qmc { shifts, points } => write!(f, "QMC, {shifts}×{points} points"),
            Method::HermiteSeries { degree } => write!(
                f,
                "Hermite (Mehler) series, coefficients by a {degree}-node trapezoid rule"
            ),
            Method::Nested { degree, dims } => write!(
                f,
                "nested over independent families: Gauss–Legendre, {degree} nodes per panel, \
                 split at kinks, in {dims} dimensions"
            ),
        }
    }
}

/// A set of closed-form families (a bit set), so that a kernel assembled from several
/// identities can say which ones it used, e.g. "arc-cosine + Stein's lemma".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Families(pub u16);

impl Families {
    /// relu/step arc-cosine kernels (Cho & Saul), theory.md §3.2.
    pub const ARC_COSINE: Families = Families(1);
    /// Moments of linear functions: `E[1] = 1`, `E[u v] = S12`.
    pub const LINEAR: Families = Families(1 << 1);
    /// Williams' erf kernel, theory.md §3.2.
    pub const WILLIAMS: Families = Families(1 << 2);
    /// Gaussian integrals of `exp(b u - a u^2)` (covers exp, sin, cos, erf').
    pub const GAUSSIAN: Families = Families(1 << 3);
    /// Stein's lemma `E[u g(v)] = S12 E[g'(v)]`.
    pub const STEIN: Families = Families(1 << 4);
    /// Exponential tilting: a factor `exp(b v - a v^2)` shifts and shrinks the law of `u`.
    pub const TILTING: Families = Families(1 << 5);
    /// Bivariate orthant probabilities (erf against step).
    pub const ORTHANT: Families = Families(1 << 6);
    /// Zero by symmetry (odd against even).
    pub const PARITY: Families = Families(1 << 7);

    const NAMES: [&'static str; 8] = [
        "arc-cosine",
        "linear",
        "Williams erf",
        "Gaussian integral",
        "Stein's lemma",
        "exponential tilting",
        "orthant probability",
        "odd/even symmetry",
    ];

    pub fn union(self, other: Families) -> Families {
        Families(self.0 | other.0)
    }
    pub fn contains(self, other: Families) -> bool {
        self.0 & other.0 == other.0
    }
}

impl fmt::Display for Families {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (i, name) in Self::NAMES.iter().enumerate() {
            if self.0 & (1 << i) != 0 {
                if !first {
                    write!(f, " + ")?;
                }
                write!(f, "{name}")?;
                first = false;
            }
        }
        if first {
            write!(f, "trivial")?;
        }
        Ok(())
    }
}

/// A computed expectation: value, error estimate (absolute), and how it was obtained.
///
/// For closed forms `error` is a round-off allowance; for Gauss–Hermite it is the
/// difference between successive rules (see [`choose_degree_2d`]); for QMC it is one
/// 3 standard errors over the random shifts (not a bound).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    pub value: f64,
    pub error: f64,
    pub method: Method,
}

impl fmt::Display for Estimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ± {:.1e} ({})", self.value, self.error, self.method)
    }
}

// ----------------------------------------------------------------------------------
// Expectations

/// Makes a 2x2 covariance usable: negative variances from round-off become 0 and the
/// covariance is clamped to `|S12| <= sqrt(S11 S22)` (a PSD matrix). `None` if any
/// entry is not finite.
pub(crate) fn clamp_cov(s11: f64, s12: f64, s22: f64) -> Option<(f64, f64, f64)> {
    if !(s11.is_finite() && s12.is_finite() && s22.is_finite()) {
        return None;
    }
    let s11 = s11.max(0.0);
    let s22 = s22.max(0.0);
    let bound = (s11 * s22).sqrt();
    Some((s11, s12.clamp(-bound, bound), s22))
}

/// `E[f(u)]`, `u ~ N(0, var)`, by the `degree`-point rule (theory.md §3.3, 1-D formula).
/// A zero (or round-off negative) variance gives `f(0)`; a non-finite one gives NaN.
pub fn expect1(f: &dyn Fn(f64) -> f64, var: f64, degree: usize) -> f64 {
    if !var.is_finite() {
        return f64::NAN;
    }
    if var <= TINY_VAR {
        return f(0.0);
    }
    let r = rule(degree);
    let scale = (2.0 * var).sqrt();
    let mut total = 0.0;
    for (&x, &w) in r.nodes.iter().zip(&r.weights) {
        if w != 0.0 {
            total += w * f(scale * x);
        }
    }
    total / SQRT_PI
}

/// `E[f(u) g(v)]` for `(u, v) ~ N(0, [[s11, s12], [s12, s22]])` by the tensor rule of
/// theory.md §3.3: Cholesky `L11 = sqrt(S11)`, `L21 = S12/L11`,
/// `L22 = sqrt(max(S22 - S12^2/S11, 0))`.
///
/// Degenerate cases are exact rather than approximate: `S11 = 0` gives `f(0) E[g(v)]`;
/// rank one (`L22 = 0`, i.e. `rho = ±1`) collapses the inner sum to one evaluation, so
/// `E[f(u)^2]` is the 1-D rule on the diagonal. Slightly non-PSD input is clamped.
pub fn expect2(
    f: &dyn Fn(f64) -> f64,
    g: &dyn Fn(f64) -> f64,
    s11: f64,
    s12: f64,
    s22: f64,
    degree: usize,
) -> f64 {
    let Some((s11, s12, s22)) = clamp_cov(s11, s12, s22) else {
        return f64::NAN;
    };
    if s11 <= TINY_VAR {
        return f(0.0) * expect1(g, s22, degree);
    }
    let r = rule(degree);
    let l11 = s11.sqrt();
    let l21 = s12 / l11;
    let l22 = (s22 - s12 * s12 / s11).max(0.0).sqrt();
    let rank_one = l22 <= 1e-154 * l11.max(l21.abs()) || l22 * l22 <= TINY_VAR;
    let mut total = 0.0;
    for (&xi, &wi) in r.nodes.iter().zip(&r.weights) {
        if wi == 0.0 {
            continue;
        }
        let fu = f(SQRT_2 * l11 * xi);
        if fu == 0.0 {
            // relu/step vanish on half the nodes: skip their inner sums.
            continue;
        }
        let inner = if rank_one {
            SQRT_PI * g(SQRT_2 * l21 * xi)
        } else {
            let base = SQRT_2 * l21 * xi;
            let step = SQRT_2 * l22;
            let mut s = 0.0;
            for (&xj, &wj) in r.nodes.iter().zip(&r.weights) {
                if wj != 0.0 {
                    s += wj * g(base + step * xj);
                }
            }
            s
        };
        total += wi * fu * inner;
    }
    total / PI
}

/// The result of a degree search.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DegreeChoice {
    /// The degree to use.
    pub degree: usize,
    /// Estimated absolute error of the `degree`-point rule over the test covariances.
    pub error: f64,
    /// Whether the requested tolerance was met (else `degree` is the largest tried).
    pub converged: bool,
}

/// Safety factor on every quadrature error estimate. Successive differences of
/// Gauss–Hermite rules on kinked integrands oscillate around their power law (measured:
/// the rate-corrected difference understated the true relu error by 4% at m = 64), so
/// the estimate is doubled; for smooth integrands this rarely changes the degree, since
/// the differences fall by orders of magnitude per doubling.
const SAFETY: f64 = 2.0;

/// Doubling search shared by the 1-D and 2-D selectors.
///
/// `eval(m)` returns the rule-`m` values on a fixed set of test problems. With
/// `d_m = max_i |Q_m,i - Q_2m,i|` and the observed contraction `r = d_m / d_{m/2}`
/// (clamped to [0.05, 0.9]; 0.5 when unknown), the error of `Q_m` is estimated as
/// `SAFETY * d_m / (1 - r)`: a geometric tail for smooth integrands, and for kinked ones
/// (algebraic `m^{-p}`, `r = 2^{-p}` near 0.35–0.7) a correction that keeps the bound
/// honest where the plain difference would understate it by 1.5–3.4x. The search stops
/// at the first `m` whose estimate is <= `tol * max(1, max_i |Q_i|)`, trusting an
/// agreement only once two differences have been seen (one lucky agreement of two
/// coarse rules is no evidence). Otherwise the largest rule is returned with error
/// `SAFETY * d * r / (1 - r)` (`d` its last difference), converged if that meets `tol`.
fn select_degree(
    eval: &dyn Fn(usize) -> Vec<f64>,
    start: usize,
    max: usize,
    tol: f64,
) -> DegreeChoice {
    let mut m = start.clamp(1, max);
    let mut prev = eval(m);
    let mut prev_diff: Option<f64> = None;
    let mut ratio = 0.5;
    let scale_of = |v: &[f64]| v.iter().fold(1.0f64, |a, x| a.max(x.abs()));
    while 2 * m <= max {
        let next = eval(2 * m);
        let scale = scale_of(&next);
        let d = prev
            .iter()
            .zip(&next)
            .map(|(a, b)| (a - b).abs())
            .fold(
                0.0f64,
                |a, v| if v.is_nan() { f64::INFINITY } else { a.max(v) },
            );
        ratio = match prev_diff {
            Some(pd) if pd > 0.0 => (d / pd).clamp(0.05, 0.9),
            _ => 0.5,
        };
        let floor = 8.0 * f64::EPSILON * scale;
        let err = (SAFETY * d / (1.0 - ratio)).max(floor);
        let trusted = prev_diff.is_some() || d <= floor;
        if trusted && err <= tol * scale {
            return DegreeChoice {
                degree: m,
                error: err,
                converged: true,
            };
        }
        prev_diff = Some(d);
        prev = next;
        m *= 2;
    }
    let scale = scale_of(&prev);
    let error = match prev_diff {
        Some(d) => (SAFETY * d * ratio / (1.0 - ratio)).max(8.0 * f64::EPSILON * scale),
        None => f64::INFINITY,
    };
    DegreeChoice {
        degree: m,
        error,
        converged: error <= tol * scale,
    }
}

/// Test covariances for degree selection at largest variance `v`: equal and unequal
/// variances, correlations across [-1, 1] with emphasis near ±1 (where the inner
/// integrand of the 2-D rule is most concentrated), and one small-variance case.
pub fn test_covariances(v: f64) -> Vec<(f64, f64, f64)> {
    let mut out = Vec::new();
    for &rho in &[-1.0, -0.999, -0.9, -0.5, 0.0, 0.3, 0.7, 0.95, 0.999, 1.0] {
        out.push((v, rho * v, v));
    }
    let w = v / 4.0;
    for &rho in &[-0.99, -0.4, 0.6, 0.99] {
        out.push((v, rho * (v * w).sqrt(), w));
    }
    let s = v / 16.0;
    out.push((s, 0.5 * s, s));
    out
}

/// Chooses the 1-D degree for `E[f(u)]`, `Var u <= max_var`, by doubling from 8
/// (error estimate as in [`choose_degree_2d`]). Tested at `max_var`, `max_var/4` and
/// `max_var/16`.
pub fn choose_degree_1d(f: &dyn Fn(f64) -> f64, max_var: f64, tol: f64) -> DegreeChoice {
    let vars = [max_var, max_var / 4.0, max_var / 16.0];
    let eval = |m: usize| vars.iter().map(|&v| expect1(f, v, m)).collect();
    select_degree(&eval, 8, MAX_DEGREE, tol)
}

/// Chooses the 2-D degree for `E[f(u) g(v)]` with variances up to `max_var`, by doubling
/// from 8 up to `max_degree` (at most [`MAX_DEGREE`]) until two successive rules agree
/// on all of [`test_covariances`]. The reported error is the estimated error of the
/// chosen rule `m`: with `d_m = max |Q_m - Q_2m|` over the test set and the observed
/// contraction `r = d_m / d_{m/2}`, it is `2 d_m / (1 - r)` — geometric tail for smooth
/// integrands, and for kinked ones (algebraic convergence) a correction without which
/// the plain difference understates the error by 1.5–3.4x; the factor 2 covers the
/// oscillation of those differences. Unconverged searches return the largest rule.
pub fn choose_degree_2d(
    f: &dyn Fn(f64) -> f64,
    g: &dyn Fn(f64) -> f64,
    max_var: f64,
    tol: f64,
    max_degree: usize,
) -> DegreeChoice {
    let covs = test_covariances(max_var.max(0.0));
    let eval = |m: usize| {
        covs.iter()
            .map(|&(a, b, c)| expect2(f, g, a, b, c, m))
            .collect()
    };
    select_degree(&eval, 8, max_degree.min(MAX_DEGREE), tol)
}

/// `E[f(u)]`, `Var u = var`, to tolerance `tol` (relative to `max(1, |value|)`), by
/// Gauss–Hermite with the degree chosen at this variance.
pub fn expect1_tol(f: &dyn Fn(f64) -> f64, var: f64, tol: f64) -> Estimate {
    let c = choose_degree_1d(f, var, tol);
    Estimate {
        value: expect1(f, var, c.degree),
        error: c.error,
        method: Method::GaussHermite {
            degree: c.degree,
            dims: 1,
            kinked: false,
        },
    }
}

/// Largest tensor-rule size (nodes^dims) `expect_multi` will evaluate.
const MAX_TENSOR_POINTS: usize = 1 << 21;

/// `E[f(x)]` for `x ~ N(0, cov)` in any dimension, to tolerance `tol` (relative to
/// `max(1, |value|)`).
///
/// Why an eigendecomposition: `x = sum_k sqrt(lambda_k) z_k e_k` with `z ~ N(0, I)`
/// makes the integral exactly as many-dimensional as the *rank* of `cov`, and kernels
/// of the Master Theorem are often low-rank (repeated inputs, tied coordinates).
/// Eigenvalues below `1e-12 lambda_max` are round-off of zero and dropped (the clamp
/// for slightly non-PSD input; changing `cov` by that much moves `E f` by the same
/// relative order). Then
/// * rank 0: `f(0)`, exactly;
/// * rank 1..=3: a tensor Gauss–Hermite rule in the eigen-coordinates, degree doubled
///   until two rules agree; the finer rule's value is returned with the difference as
///   its (conservative) error;
/// * rank > 3: randomized QMC ([`qmc::gaussian_mean_tol`]), principal directions on the
///   first Sobol' coordinates, seeded by `seed` (deterministic).
///
/// Non-finite input yields NaN with infinite error rather than a panic.
pub fn expect_multi(
    f: &(dyn Fn(&[f64]) -> f64 + Sync),
    cov: &DMatrix<f64>,
    tol: f64,
    seed: u64,
) -> Estimate {
    let k = cov.nrows();
    let nan = Estimate {
        value: f64::NAN,
        error: f64::INFINITY,
        method: Method::GaussHermite {
            degree: 0,
            dims: k,
            kinked: false,
        },
    };
    if cov.ncols() != k || cov.iter().any(|v| !v.is_finite()) {
        return nan;
    }
    if k == 0 {
        return Estimate {
            value: f(&[]),
            error: 0.0,
            method: Method::ClosedForm(Families::LINEAR),
        };
    }
    let sym = (cov + cov.transpose()) * 0.5;
    let Some(eig) = nalgebra::SymmetricEigen::try_new(sym, f64::EPSILON, 10_000) else {
        return nan;
    };
    let lmax = eig.eigenvalues.iter().fold(0.0f64, |a, &v| a.max(v));
    let mut dirs: Vec<(f64, usize)> = eig
        .eigenvalues
        .iter()
        .enumerate()
        .filter(|&(_, &l)| lmax > 0.0 && l > 1e-12 * lmax)
        .map(|(i, &l)| (l, i))
        .collect();
    dirs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let r = dirs.len();
    // Columns: sqrt(lambda_k) e_k, principal first.
    let basis: Vec<Vec<f64>> = dirs
        .iter()
        .map(|&(l, i)| {
            let s = l.sqrt();
            eig.eigenvectors.column(i).iter().map(|v| v * s).collect()
        })
        .collect();
    let map = |z: &[f64], x: &mut [f64]| {
        x.iter_mut().for_each(|v| *v = 0.0);
        for (zj, col) in z.iter().zip(&basis) {
            for (xi, c) in x.iter_mut().zip(col) {
                *xi += zj * c;
            }
        }
    };
    if r == 0 {
        let zero = vec![0.0; k];
        return Estimate {
            value: f(&zero),
            error: 0.0,
            method: Method::ClosedForm(Families::LINEAR),
        };
    }
    if r <= 3 {
        let tensor = |m: usize| -> f64 {
            let rl = rule(m);
            let mut idx = vec![0usize; r];
            let mut z = vec![0.0; r];
            let mut x = vec![0.0; k];
            let mut total = 0.0;
            loop {
                let mut w = 1.0;
                for (j, &i) in idx.iter().enumerate() {
                    z[j] = SQRT_2 * rl.nodes[i];
                    w *= rl.weights[i];
                }
                if w != 0.0 {
                    map(&z, &mut x);
                    total += w * f(&x);
                }
                // odometer
                let mut j = 0;
                loop {
                    if j == r {
                        return total / SQRT_PI.powi(r as i32);
                    }
                    idx[j] += 1;
                    if idx[j] < m {
                        break;
                    }
                    idx[j] = 0;
                    j += 1;
                }
            }
        };
        let mut m = 8;
        let mut prev = tensor(m);
        loop {
            let m2 = 2 * m;
            let too_big = m2 > MAX_DEGREE
                || m2
                    .checked_pow(r as u32)
                    .is_none_or(|p| p > MAX_TENSOR_POINTS);
            if too_big {
                return Estimate {
                    value: prev,
                    error: f64::INFINITY,
                    method: Method::GaussHermite {
                        degree: m,
                        dims: r,
                        kinked: false,
                    },
                };
            }
            let next = tensor(m2);
            let d = (next - prev).abs();
            let scale = next.abs().max(1.0);
            let done = d <= tol * scale;
            let next_too_big = 2 * m2 > MAX_DEGREE
                || (2 * m2)
                    .checked_pow(r as u32)
                    .is_none_or(|p| p > MAX_TENSOR_POINTS);
            if done || next_too_big {
                return Estimate {
                    value: next,
                    error: d.max(8.0 * f64::EPSILON * scale),
                    method: Method::GaussHermite {
                        degree: m2,
                        dims: r,
                        kinked: false,
                    },
                };
            }
            prev = next;
            m = m2;
        }
    }
    let g = |z: &[f64]| {
        let mut x = vec![0.0; k];
        map(z, &mut x);
        f(&x)
    };
    qmc::gaussian_mean_tol(&g, r, tol, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// E[x^{2k}] under e^{-x^2}/sqrt(pi) is (2k-1)!!/2^k.
    fn even_moment(k: u32) -> f64 {
        let mut v = 1.0;
        for j in 0..k {
            v *= (2 * j + 1) as f64 / 2.0;
        }
        v
    }

    #[test]
    fn rules_are_valid_for_every_degree() {
        // Every degree up to 512, then the doubling steps the degree search uses above.
        for n in (1..=512).chain([640, 1024, MAX_DEGREE]) {
            let r = compute_rule(n);
            assert_eq!(r.nodes.len(), n);
            let total: f64 = r.weights.iter().sum();
            assert!((total - SQRT_PI).abs() < 1e-13, "n={n}: sum w = {total}");
            for w in r.nodes.windows(2) {
                assert!(w[1] > w[0], "n={n}: nodes not increasing");
            }
            for i in 0..n {
                assert_eq!(r.nodes[i], -r.nodes[n - 1 - i]);
                assert!(r.weights[i] >= 0.0);
            }
            // Exact on x^{2k} for 2k <= 2n-1 (checked up to degree 20 where the
            // moments are well scaled).
            for k in 1..=10u32 {
                if 2 * k as usize > 2 * n - 1 {
                    break;
                }
                let q: f64 = r
                    .nodes
                    .iter()
                    .zip(&r.weights)
                    .map(|(x, w)| w * x.powi(2 * k as i32))
                    .sum::<f64>()
                    / SQRT_PI;
                let e = even_moment(k);
                assert!(((q - e) / e).abs() < 1e-12, "n={n}, k={k}: {q} vs {e}");
            }
        }
    }

    /// Golub–Welsch by a dense symmetric eigensolver: an independent computation of
    /// the nodes.
    #[test]
    fn nodes_agree_with_golub_welsch() {
        for n in [5usize, 20, 64, 101, 256] {
            let mut j = DMatrix::<f64>::zeros(n, n);
            for k in 1..n {
                let b = (k as f64 / 2.0).sqrt();
                j[(k - 1, k)] = b;
                j[(k, k - 1)] = b;
            }
            let mut ev: Vec<f64> = nalgebra::SymmetricEigen::new(j)
                .eigenvalues
                .iter()
                .copied()
                .collect();
            ev.sort_by(|a, b| a.total_cmp(b));
            let r = rule(n);
            for (a, b) in r.nodes.iter().zip(&ev) {
                assert!(
                    (a - b).abs() < 1e-12 * b.abs().max(1.0),
                    "n={n}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn known_small_rule() {
        // 2-point rule: nodes ±1/sqrt(2), weights sqrt(pi)/2.
        let r = rule(2);
        assert!((r.nodes[1] - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-15);
        assert!((r.weights[0] - SQRT_PI / 2.0).abs() < 1e-15);
        // 3-point rule: nodes 0, ±sqrt(3/2); weights 2 sqrt(pi)/3, sqrt(pi)/6.
        let r = rule(3);
        assert_eq!(r.nodes[1], 0.0);
        assert!((r.nodes[2] - 1.5f64.sqrt()).abs() < 1e-15);
        assert!((r.weights[1] - 2.0 * SQRT_PI / 3.0).abs() < 1e-15);
        assert!((r.weights[2] - SQRT_PI / 6.0).abs() < 1e-15);
    }

    #[test]
    fn expect2_on_polynomials_and_degenerate_cases() {
        // E[u^2 v^2] = S11 S22 + 2 S12^2 (Isserlis)
        let (a, b, c) = (1.3, -0.4, 0.7);
        let q = expect2(&|x| x * x, &|y| y * y, a, b, c, 6);
        assert!((q - (a * c + 2.0 * b * b)).abs() < 1e-13);
        // rho = 1 exactly: E[u^2 v^2] with v = 2u, Var u = 1 -> 4 E u^4 = 12
        let q = expect2(&|x| x * x, &|y| y * y, 1.0, 2.0, 4.0, 6);
        assert!((q - 12.0).abs() < 1e-12);
        // slightly non-PSD from round-off: clamped, no NaN
        let q = expect2(&|x| x, &|y| y, 1.0, 1.0 + 1e-15, 1.0, 6);
        assert!((q - 1.0).abs() < 1e-12);
        // zero and negative-zero variances
        let q = expect2(&|x| x + 2.0, &|y| y * y, 0.0, 0.0, 3.0, 6);
        assert!((q - 6.0).abs() < 1e-12);
        let q = expect2(&|x| x * x, &|y| y + 2.0, 3.0, 1e-17, -1e-17, 6);
        assert!((q - 6.0).abs() < 1e-12);
        assert!(expect2(&|x| x, &|y| y, f64::NAN, 0.0, 1.0, 6).is_nan());
    }

    #[test]
    fn tanh_degree_selection_meets_1e_10() {
        let th = |x: f64| x.tanh();
        for &v in &[0.5, 1.0, 4.0] {
            let c = choose_degree_2d(&th, &th, v, 1e-10, MAX_DEGREE);
            assert!(c.converged, "v={v}: {c:?}");
            assert!(c.error <= 1e-10);
            // Check against a much higher-degree rule on fresh covariances.
            for &(a, b, cc) in &[
                (v, 0.8 * v, v),
                (v, -0.97 * v, v),
                (0.6 * v, 0.2 * v, 0.9 * v),
                (v, v, v),
            ] {
                let q = expect2(&th, &th, a, b, cc, c.degree);
                let hi = expect2(&th, &th, a, b, cc, MAX_DEGREE);
                assert!(
                    (q - hi).abs() <= 1e-10,
                    "v={v} m={}: {}",
                    c.degree,
                    (q - hi).abs()
                );
            }
        }
    }

    #[test]
    fn kinked_error_is_honest() {
        // E[relu(u) relu(v)] with closed form (theory.md §3.2); the reported bound for
        // an unconverged rule must cover the true error.
        let relu = |x: f64| x.max(0.0);
        let c = choose_degree_2d(&relu, &relu, 1.0, 1e-10, 64);
        assert!(!c.converged);
        for &rho in &[-0.9f64, 0.0, 0.5, 0.95] {
            let th = rho.acos();
            let exact = (th.sin() + (PI - th) * rho) / (2.0 * PI);
            let q = expect2(&relu, &relu, 1.0, rho, 1.0, c.degree);
            assert!(
                (q - exact).abs() <= c.error,
                "rho={rho}: {} > {}",
                (q - exact).abs(),
                c.error
            );
        }
        let step = |x: f64| if x > 0.0 { 1.0 } else { 0.0 };
        let c = choose_degree_2d(&step, &step, 1.0, 1e-10, 128);
        for &rho in &[-0.9f64, 0.0, 0.5, 0.95] {
            let exact = (PI - rho.acos()) / (2.0 * PI);
            let q = expect2(&step, &step, 1.0, rho, 1.0, c.degree);
            assert!(
                (q - exact).abs() <= c.error,
                "step rho={rho}: {} > {}",
                (q - exact).abs(),
                c.error
            );
        }
    }

    #[test]
    fn expect1_tol_on_tanh_square() {
        // E[tanh(u)^2] at var 1 vs a 512-point rule.
        let f = |x: f64| x.tanh().powi(2);
        let e = expect1_tol(&f, 1.0, 1e-12);
        let hi = expect1(&f, 1.0, MAX_DEGREE);
        assert!((e.value - hi).abs() < 1e-12);
    }

    #[test]
    fn expect_multi_uses_rank() {
        // 4-D covariance of rank 2: x = A z, A 4x2.
        let a = DMatrix::from_row_slice(4, 2, &[1.0, 0.0, 0.5, 0.5, 0.0, 1.0, -0.3, 0.8]);
        let cov = &a * a.transpose();
        // E[x0 x1 x2 x3] by Isserlis = S01 S23 + S02 S13 + S03 S12
        let f = |x: &[f64]| x[0] * x[1] * x[2] * x[3];
        let exact =
            cov[(0, 1)] * cov[(2, 3)] + cov[(0, 2)] * cov[(1, 3)] + cov[(0, 3)] * cov[(1, 2)];
        let e = expect_multi(&f, &cov, 1e-12, 1);
        assert!(
            matches!(e.method, Method::GaussHermite { dims: 2, .. }),
            "{e}"
        );
        assert!((e.value - exact).abs() < 1e-12, "{e} vs {exact}");
        // Same through rank 4 -> QMC, within 4 SE.
        let cov4 = &cov + DMatrix::<f64>::identity(4, 4) * 0.5;
        let exact4 =
            cov4[(0, 1)] * cov4[(2, 3)] + cov4[(0, 2)] * cov4[(1, 3)] + cov4[(0, 3)] * cov4[(1, 2)];
        let e4 = expect_multi(&f, &cov4, 1e-3, 7);
        assert!(matches!(e4.method, Method::Qmc { .. }), "{e4}");
        assert!(
            (e4.value - exact4).abs() < 4.0 * e4.error / qmc::STATED_SIGMAS,
            "{e4} vs {exact4}"
        );
        // Rank 0 and non-finite input.
        let z = expect_multi(&|x: &[f64]| x[0] + 3.0, &DMatrix::zeros(2, 2), 1e-10, 0);
        assert_eq!(z.value, 3.0);
        let mut bad = cov.clone();
        bad[(0, 0)] = f64::NAN;
        assert!(expect_multi(&f, &bad, 1e-10, 0).value.is_nan());
    }

    #[test]
    fn expect_multi_rank_three_smooth() {
        // E[exp(x0 + x1 + x2)] = exp(1' S 1 / 2)
        let cov = DMatrix::from_row_slice(3, 3, &[1.0, 0.3, 0.1, 0.3, 0.5, -0.2, 0.1, -0.2, 0.8]);
        let s: f64 = cov.iter().sum();
        let e = expect_multi(&|x: &[f64]| (x[0] + x[1] + x[2]).exp(), &cov, 1e-12, 0);
        // rank 3 but f depends on one direction: still exact to the tolerance
        assert!((e.value - (s / 2.0).exp()).abs() < 1e-11, "{e}");
    }

    #[test]
    fn method_display() {
        let m = Method::GaussHermite {
            degree: 64,
            dims: 2,
            kinked: false,
        };
        assert_eq!(m.to_string(), "Gauss–Hermite, degree 64");
        let q = Method::Qmc {
            shifts: 16,
            points: 4096,
        };
        assert_eq!(q.to_string(), "QMC, 16×4096 points");
        let c = Method::ClosedForm(Families::ARC_COSINE);
        assert_eq!(c.to_string(), "closed form (arc-cosine)");
        let c = Method::ClosedForm(Families::ARC_COSINE.union(Families::STEIN));
        assert_eq!(c.to_string(), "closed form (arc-cosine + Stein's lemma)");
    }
}
