//! Closed-form Gaussian kernels ("dual activations") and a prepared pair evaluator.
//!
//! The NNGP/NTK recursions (theory.md §3.1) need, for every pair of inputs,
//! `E[f(u) g(v)]` with `(u, v) ~ N(0, [[S11, S12], [S12, S22]])`, typically for
//! `(f, g) = (phi, phi)` and `(phi', phi')`. Kinked `phi` (relu, step, abs) defeat
//! quadrature (theory.md §3.3: 1e-3 and 1e-2 errors at m = 60 and 200), and the
//! recursions are evaluated on 4000 x 4000 blocks, so closed forms are worth a lot.
//!
//! # Recognition
//! A one-argument [`Expr`] (in `Arg(0)`) is rewritten as a finite sum `sum_k c_k A_k(u)`
//! of *atoms*:
//! * the piecewise-linear family `1, u, step(u), relu(u)`. It is closed under the
//!   rewrites the IR produces: `relu(-a u) = a (relu(u) - u)`, `step(-u) = 1 - step(u)`
//!   (a.e.), `abs(a u) = |a| (2 relu(u) - u)`, `abs' = 2 step - 1`, leaky/AB-ReLU
//!   `a min(u,0) + b max(u,0) = a u + (b - a) relu(u)` (theory.md §3.2);
//! * `erf(a u)`;
//! * the Gaussian-exponential family `Re(c e^{b u - alpha u^2})`, `alpha >= 0`, complex
//!   `b, c`: it contains `exp(c0 + c1 u + c2 u^2)` (`c2 <= 0`), hence erf' =
//!   `(2/sqrt pi) e^{-u^2}`, and `sin`, `cos` of affine arguments, and it is closed
//!   under products.
//!
//! # Pair identities (each verified in the tests against quadrature or Monte Carlo)
//! With `rho = S12/sqrt(S11 S22)`, `theta = arccos rho`, `Phi`/`phi` the normal cdf/pdf:
//! * arc-cosine (theory.md §3.2): `E[relu relu] = sqrt(S11 S22)/(2pi) (sin theta +
//!   (pi - theta) cos theta)`, `E[step step] = (pi - theta)/(2pi)` — the *step* kernel,
//!   not GP4A's `VStep` which is the sign kernel `(2/pi) arcsin rho` (bug warning §3.2);
//!   `E[step(u) relu(v)] = sqrt(S22) (1 + rho)/(2 sqrt(2pi))` (Stein on the orthant);
//! * Stein's lemma `E[u g(v)] = S12 E[g'(v)]`: `E[u step(v)] = S12/sqrt(2pi S22)`,
//!   `E[u relu(v)] = S12/2`, `E[u erf(b v)] = S12 (2b/sqrt pi)/sqrt(1 + 2b^2 S22)`,
//!   `E[relu(u) erf(b v)] = S12 b / (sqrt pi sqrt(1 + 2 b^2 S22))`;
//! * Williams (theory.md §3.2, the NTK4A form): `E[erf(au) erf(bv)] = (2/pi)
//!   arcsin(2ab S12 / sqrt((1 + 2a^2 S11)(1 + 2b^2 S22)))`; erf' pairs come from the
//!   Gaussian family and give `(4/pi)((1+2S11)(1+2S22) - 4S12^2)^{-1/2}` — with `S11`,
//!   not GP4A's `sqrt(S11)` (bug warning §3.2);
//! * orthant probability: `E[step(u) erf(b v)] = arcsin(sqrt2 b S12 / sqrt(S11 (1 +
//!   2 b^2 S22))) / pi` (write `erf(y) = 2 P(W < sqrt2 y) - 1` with `W` independent);
//! * Gaussian integral: `E[e^{b.x - x'Dx/2}] = det(I + Sigma D)^{-1/2}
//!   exp(b' (Sigma^{-1} + D)^{-1} b / 2)`, analytic in complex `b`; e.g.
//!   `E[exp u exp v] = exp((S11 + S22)/2 + S12)`, `E[sin u sin v] =
//!   e^{-(S11+S22)/2} sinh S12`, `E[cos u cos v] = e^{-(S11+S22)/2} cosh S12`;
//! * exponential tilting: `E[h(u) e^{b v - alpha v^2}] = Z E[h(U)]` with
//!   `Z = (1 + 2 alpha S22)^{-1/2} exp(b^2 S22 / (2(1 + 2 alpha S22)))` and
//!   `U ~ N(b S12/(1 + 2 alpha S22), S11 - 2 alpha S12^2/(1 + 2 alpha S22))`, closed for
//!   `h` in {1, u, step, relu, erf} when `b` is real;
//! * parity: odd against even vanishes (`erf` against `cos`, `1`, `e^{-u^2}`).
//!
//! Pairs outside these (tanh, gelu, sigmoid, erf against sin, relu against cos, ...) use
//! 2-D Gauss–Hermite with the degree chosen for the tolerance at the largest variance
//! (theory.md §3.3), and say so, including whether the integrand is kinked. A constant
//! or linear partner reduces them to 1-D (`E[c g] = c E g`; Stein's lemma).
//!
//! # Blocks
//! [`PairKernel::block_in_place`] evaluates a whole covariance block in parallel over
//! columns (upper triangle only when symmetric). Closed forms cost one transcendental
//! per entry (relu·relu and step·step share one `acos` in
//! [`PairKernel::block_pair_in_place`]). Smooth quadrature kernels are evaluated on
//! blocks by Mehler's Hermite series (per-row coefficients, `O(K)` per entry, with a
//! rigorous truncation bound and the 2-D rule as fallback), which turns a 4000 x 4000
//! tanh kernel from hours of 2-D quadrature into seconds; see `smooth.rs`.

use std::f64::consts::{FRAC_1_SQRT_2, PI, SQRT_2};

use nalgebra::DMatrix;
use rayon::prelude::*;

use super::fastmath;
use super::gauss::{self, clamp_cov, Estimate, Families, Method, TINY_VAR};
use super::smooth::{Smooth, SmoothBlock};
use crate::ir::expr::{Expr, Fun};
use std::sync::Arc;

/// `1/sqrt(2 pi)`
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
/// `1/sqrt(pi)`
const INV_SQRT_PI: f64 = 0.564_189_583_547_756_3;

// ----------------------------------------------------------------------------------
// A minimal complex type for the Gaussian-exponential family.

#[derive(Clone, Copy, Debug, PartialEq)]
struct C64 {
    re: f64,
    im: f64,
}

impl C64 {
    const ZERO: C64 = C64 { re: 0.0, im: 0.0 };
    fn new(re: f64, im: f64) -> C64 {
        C64 { re, im }
    }
    fn real(re: f64) -> C64 {
        C64 { re, im: 0.0 }
    }
    fn add(self, o: C64) -> C64 {
        C64::new(self.re + o.re, self.im + o.im)
    }
    fn mul(self, o: C64) -> C64 {
        C64::new(
            self.re * o.re - self.im * o.im,
            self.re * o.im + self.im * o.re,
        )
    }
    fn scale(self, k: f64) -> C64 {
        C64::new(self.re * k, self.im * k)
    }
    fn conj(self) -> C64 {
        C64::new(self.re, -self.im)
    }
    fn exp(self) -> C64 {
        let m = self.re.exp();
        C64::new(m * self.im.cos(), m * self.im.sin())
    }
    fn is_real(self) -> bool {
        self.im == 0.0
    }
}

// ----------------------------------------------------------------------------------
// Atoms and recognition

/// A building block whose Gaussian expectations are known.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Atom {
    One,
    X,
    Step,
    Relu,
    /// `erf(a u)`, `a != 0`.
    Erf(f64),
    /// `Re(c e^{b u - alpha u^2})`, `alpha >= 0`.
    Wave {
        c: C64,
        alpha: f64,
        b: C64,
    },
}

impl Atom {
    fn rank(self) -> u8 {
        match self {
            Atom::One => 0,
            Atom::X => 1,
            Atom::Step => 2,
            Atom::Relu => 3,
            Atom::Erf(_) => 4,
            Atom::Wave { .. } => 5,
        }
    }
}

/// `sum_k c_k A_k(u)`.
type Terms = Vec<(f64, Atom)>;

/// Normal form of a wave: constants become `One`, a real `b` makes `c` real.
fn wave(c: C64, alpha: f64, b: C64) -> (f64, Atom) {
    if alpha == 0.0 && b == C64::ZERO {
        return (c.re, Atom::One);
    }
    let c = if b.is_real() { C64::real(c.re) } else { c };
    (1.0, Atom::Wave { c, alpha, b })
}

/// The value of a constant combination, if every atom is `One`.
fn const_value(t: &Terms) -> Option<f64> {
    t.iter()
        .try_fold(0.0, |acc, (c, a)| (*a == Atom::One).then_some(acc + c))
}

/// A combination of waves (with constants as waves), for products.
fn as_waves(t: &Terms) -> Option<Vec<(C64, f64, C64)>> {
    t.iter()
        .map(|&(k, a)| match a {
            Atom::One => Some((C64::real(k), 0.0, C64::ZERO)),
            Atom::Wave { c, alpha, b } => Some((c.scale(k), alpha, b)),
            _ => None,
        })
        .collect()
}

/// `Re(A) Re(B) = (Re(A B) + Re(A conj B)) / 2` keeps products of waves in the family.
fn wave_product(x: &[(C64, f64, C64)], y: &[(C64, f64, C64)]) -> Terms {
    let mut out = Vec::new();
    for &(c1, a1, b1) in x {
        for &(c2, a2, b2) in y {
            out.push(wave(c1.mul(c2).scale(0.5), a1 + a2, b1.add(b2)));
            out.push(wave(
                c1.mul(c2.conj()).scale(0.5),
                a1 + a2,
                b1.add(b2.conj()),
            ));
        }
    }
    out
}

fn scaled(t: Terms, k: f64) -> Terms {
    t.into_iter().map(|(c, a)| (c * k, a)).collect()
}

/// `c0 + c1 u + c2 u^2` if `e` is such a polynomial in `Arg(0)`.
fn poly(e: &Expr) -> Option<[f64; 3]> {
    let mul = |p: [f64; 3], q: [f64; 3]| -> Option<[f64; 3]> {
        let mut r = [0.0; 5];
        for i in 0..3 {
            for j in 0..3 {
                r[i + j] += p[i] * q[j];
            }
        }
        (r[3] == 0.0 && r[4] == 0.0).then_some([r[0], r[1], r[2]])
    };
    match e {
        Expr::Arg(0) => Some([0.0, 1.0, 0.0]),
        Expr::Arg(_) => None,
        Expr::Const(c) => Some([*c, 0.0, 0.0]),
        Expr::Call(Fun::Id, x) => poly(x),
        Expr::Call(f, x) => {
            let p = poly(x)?;
            (p[1] == 0.0 && p[2] == 0.0).then(|| [f.eval(p[0]), 0.0, 0.0])
        }
        Expr::Neg(x) => poly(x).map(|p| p.map(|v| -v)),
        Expr::Add(a, b) => {
            let (p, q) = (poly(a)?, poly(b)?);
            Some([p[0] + q[0], p[1] + q[1], p[2] + q[2]])
        }
        Expr::Sub(a, b) => {
            let (p, q) = (poly(a)?, poly(b)?);
            Some([p[0] - q[0], p[1] - q[1], p[2] - q[2]])
        }
        Expr::Mul(a, b) => mul(poly(a)?, poly(b)?),
        Expr::Div(a, b) => {
            let q = poly(b)?;
            (q[1] == 0.0 && q[2] == 0.0 && q[0] != 0.0)
                .then(|| poly(a).map(|p| p.map(|v| v / q[0])))
                .flatten()
        }
        Expr::Powi(a, k) => {
            let p = poly(a)?;
            if *k < 0 {
                return (p[1] == 0.0 && p[2] == 0.0).then(|| [p[0].powi(*k), 0.0, 0.0]);
            }
            let mut r = [1.0, 0.0, 0.0];
            for _ in 0..*k {
                r = mul(r, p)?;
            }
            Some(r)
        }
    }
}

/// Rewrites a one-argument expression as atoms, or `None` if some part has no
/// closed-form family (tanh, gelu, sigmoid, erf of a non-linear argument, ...).
fn recognize(e: &Expr) -> Option<Terms> {
    match e {
        Expr::Arg(0) => Some(vec![(1.0, Atom::X)]),
        Expr::Arg(_) => None,
        Expr::Const(c) => Some(vec![(*c, Atom::One)]),
        Expr::Neg(x) => recognize(x).map(|t| scaled(t, -1.0)),
        Expr::Add(a, b) => {
            let mut t = recognize(a)?;
            t.extend(recognize(b)?);
            Some(t)
        }
        Expr::Sub(a, b) => {
            let mut t = recognize(a)?;
            t.extend(scaled(recognize(b)?, -1.0));
            Some(t)
        }
        Expr::Mul(a, b) => {
            let (ta, tb) = (recognize(a)?, recognize(b)?);
            if let Some(k) = const_value(&ta) {
                Some(scaled(tb, k))
            } else if let Some(k) = const_value(&tb) {
                Some(scaled(ta, k))
            } else {
                Some(wave_product(&as_waves(&ta)?, &as_waves(&tb)?))
            }
        }
        Expr::Div(a, b) => {
            let k = const_value(&recognize(b)?)?;
            (k != 0.0).then(|| recognize(a).map(|t| scaled(t, 1.0 / k)))?
        }
        Expr::Powi(a, k) => {
            let ta = recognize(a)?;
            if let Some(c) = const_value(&ta) {
                return Some(vec![(c.powi(*k), Atom::One)]);
            }
            if !(0..=8).contains(k) {
                return None;
            }
            let w = as_waves(&ta)?;
            let mut acc: Terms = vec![(1.0, Atom::One)];
            for _ in 0..*k {
                acc = wave_product(&as_waves(&acc)?, &w);
            }
            Some(acc)
        }
        Expr::Call(f, x) => recognize_call(*f, x),
    }
}

fn recognize_call(f: Fun, x: &Expr) -> Option<Terms> {
    if f == Fun::Id {
        return recognize(x);
    }
    let [c0, c1, c2] = poly(x)?;
    if c1 == 0.0 && c2 == 0.0 {
        return Some(vec![(f.eval(c0), Atom::One)]);
    }
    let homogeneous_linear = c0 == 0.0 && c2 == 0.0;
    match f {
        Fun::Relu if homogeneous_linear => Some(if c1 > 0.0 {
            vec![(c1, Atom::Relu)]
        } else {
            // relu(-|a| u) = |a| (relu(u) - u)
            vec![(-c1, Atom::Relu), (c1, Atom::X)]
        }),
        Fun::Step if homogeneous_linear => Some(if c1 > 0.0 {
            vec![(1.0, Atom::Step)]
        } else {
            // step(-u) = 1 - step(u) except at u = 0 (a null set unless Var u = 0,
            // which the evaluator handles with the true f(0)).
            vec![(1.0, Atom::One), (-1.0, Atom::Step)]
        }),
        Fun::Abs if homogeneous_linear => {
            let a = c1.abs();
            Some(vec![(2.0 * a, Atom::Relu), (-a, Atom::X)])
        }
        Fun::Erf if homogeneous_linear => Some(vec![(1.0, Atom::Erf(c1))]),
        Fun::Exp if c2 <= 0.0 => Some(vec![wave(C64::real(c0.exp()), -c2, C64::real(c1))]),
        // sin(c1 u + c0) = Re(-i e^{i c0} e^{i c1 u})
        Fun::Sin if c2 == 0.0 => Some(vec![wave(
            C64::new(c0.sin(), -c0.cos()),
            0.0,
            C64::new(0.0, c1),
        )]),
        // cos(c1 u + c0) = Re(e^{i c0} e^{i c1 u})
        Fun::Cos if c2 == 0.0 => Some(vec![wave(
            C64::new(c0.cos(), c0.sin()),
            0.0,
            C64::new(0.0, c1),
        )]),
        _ => None,
    }
}

// ----------------------------------------------------------------------------------
// Expectations of atoms

/// Standard normal cdf.
fn big_phi(x: f64) -> f64 {
    0.5 * libm::erfc(-x * FRAC_1_SQRT_2)
}

/// `E[e^{b u - alpha u^2}]`, `u ~ N(0, s)`.
fn wave_z(alpha: f64, b: C64, s: f64) -> C64 {
    let t = 1.0 + 2.0 * alpha * s;
    b.mul(b).scale(s / (2.0 * t)).exp().scale(1.0 / t.sqrt())
}

/// `E[A(u)]`, `u ~ N(0, s)`, `s > 0`. Always closed.
fn atom_mean(a: Atom, s: f64) -> f64 {
    match a {
        Atom::One => 1.0,
        Atom::X | Atom::Erf(_) => 0.0,
        Atom::Step => 0.5,
        Atom::Relu => (s / (2.0 * PI)).sqrt(),
        Atom::Wave { c, alpha, b } => c.mul(wave_z(alpha, b, s)).re,
    }
}

fn terms_mean(t: &Terms, s: f64) -> f64 {
    t.iter().map(|&(c, a)| c * atom_mean(a, s)).sum()
}

/// `E[e^{b1 u + b2 v - a1 u^2 - a2 v^2}]` (complex `b`), the Gaussian integral with
/// `D = diag(2 a1, 2 a2)`: `det(I + D Sigma)^{-1/2} exp(b' M b / 2)` with
/// `M = Sigma (I + D Sigma)^{-1}` written out for 2x2 (no `Sigma^{-1}`, so singular
/// `Sigma` is fine).
fn gauss_integral(a1: f64, b1: C64, a2: f64, b2: C64, s11: f64, s12: f64, s22: f64) -> C64 {
    let t1 = 1.0 + 2.0 * a1 * s11;
    let t2 = 1.0 + 2.0 * a2 * s22;
    let det = t1 * t2 - 4.0 * a1 * a2 * s12 * s12;
    let m11 = (s11 * t2 - 2.0 * a2 * s12 * s12) / det;
    let m22 = (s22 * t1 - 2.0 * a1 * s12 * s12) / det;
    let m12 = s12 / det;
    let q = b1
        .mul(b1)
        .scale(m11)
        .add(b1.mul(b2).scale(2.0 * m12))
        .add(b2.mul(b2).scale(m22));
    q.scale(0.5).exp().scale(1.0 / det.sqrt())
}

/// Law of `u` under the tilt `e^{b v - alpha v^2}`: `(Z, mean, variance)`.
fn tilt(alpha: f64, b: C64, s11: f64, s12: f64, s22: f64) -> (C64, C64, f64) {
    let t = 1.0 + 2.0 * alpha * s22;
    let z = wave_z(alpha, b, s22);
    let m = b.scale(s12 / t);
    let var = (s11 - 2.0 * alpha * s12 * s12 / t).max(0.0);
    (z, m, var)
}

/// `E[A(u) B(v)]` for non-degenerate variances, with the family used; `None` when no
/// closed form is known. Atoms are ordered by rank (the swapped case transposes Sigma).
fn atom_pair(a: Atom, b: Atom, s11: f64, s12: f64, s22: f64) -> Option<(f64, Families)> {
    if a.rank() > b.rank() {
        return atom_pair(b, a, s22, s12, s11);
    }
    use Atom::*;
    let (sd1, sd2) = (s11.sqrt(), s22.sqrt());
    let rho = snap_rho(s12 / (sd1 * sd2));
    let r = match (a, b) {
        (One, One) => (1.0, Families::LINEAR),
        (One, X) => (0.0, Families::LINEAR),
        (One, Step) => (0.5, Families::ARC_COSINE),
        (One, Relu) => (sd2 * INV_SQRT_2PI, Families::ARC_COSINE),
        (One, Erf(_)) => (0.0, Families::PARITY),
        (One, w @ Wave { .. }) => (atom_mean(w, s22), Families::GAUSSIAN),
        (X, X) => (s12, Families::LINEAR),
        (X, Step) => (s12 / sd2 * INV_SQRT_2PI, Families::STEIN),
        (X, Relu) => (0.5 * s12, Families::STEIN),
        (X, Erf(bb)) => (
            s12 * bb * 2.0 * INV_SQRT_PI / (1.0 + 2.0 * bb * bb * s22).sqrt(),
            Families::STEIN,
        ),
        (X, Wave { c, alpha, b }) => {
            let (z, m, _) = tilt(alpha, b, s11, s12, s22);
            (c.mul(z).mul(m).re, Families::STEIN)
        }
        (Step, Step) => ((PI - rho.acos()) / (2.0 * PI), Families::ARC_COSINE),
        (Step, Relu) => (sd2 * (1.0 + rho) * 0.5 * INV_SQRT_2PI, Families::ARC_COSINE),
        (Step, Erf(bb)) => {
            let r =
                (SQRT_2 * bb * s12 / (s11 * (1.0 + 2.0 * bb * bb * s22)).sqrt()).clamp(-1.0, 1.0);
            (r.asin() / PI, Families::ORTHANT)
        }
        (Relu, Relu) => (sd1 * sd2 * arccos1(rho) / (2.0 * PI), Families::ARC_COSINE),
        (Relu, Erf(bb)) => (
            s12 * bb * INV_SQRT_PI / (1.0 + 2.0 * bb * bb * s22).sqrt(),
            Families::STEIN,
        ),
        (Step | Relu, Wave { c, alpha, b }) if b.is_real() => {
            let (z, m, var) = tilt(alpha, b, s11, s12, s22);
            let (m, sd) = (m.re, var.sqrt());
            let e = match a {
                Step if sd > 0.0 => big_phi(m / sd),
                Step => f64::from(m > 0.0) + 0.5 * f64::from(m == 0.0),
                _ if sd > 0.0 => {
                    m * big_phi(m / sd) + sd * INV_SQRT_2PI * (-0.5 * (m / sd).powi(2)).exp()
                }
                _ => m.max(0.0),
            };
            (c.re * z.re * e, Families::TILTING)
        }
        (Erf(aa), Erf(bb)) => {
            let den = ((1.0 + 2.0 * aa * aa * s11) * (1.0 + 2.0 * bb * bb * s22)).sqrt();
            let r = (2.0 * aa * bb * s12 / den).clamp(-1.0, 1.0);
            (2.0 / PI * r.asin(), Families::WILLIAMS)
        }
        (Erf(aa), Wave { c, alpha, b }) => {
            if b.is_real() {
                let (z, m, var) = tilt(alpha, b, s11, s12, s22);
                let e = libm::erf(aa * m.re / (1.0 + 2.0 * aa * aa * var).sqrt());
                (c.re * z.re * e, Families::TILTING)
            } else if b.re == 0.0 && c.im == 0.0 {
                // c cos(w v) e^{-alpha v^2} is even, erf odd.
                (0.0, Families::PARITY)
            } else {
                return None;
            }
        }
        (
            Wave {
                c: c1,
                alpha: a1,
                b: b1,
            },
            Wave {
                c: c2,
                alpha: a2,
                b: b2,
            },
        ) => {
            let e1 = gauss_integral(a1, b1, a2, b2, s11, s12, s22).mul(c1.mul(c2));
            let e2 = gauss_integral(a1, b1, a2, b2.conj(), s11, s12, s22).mul(c1.mul(c2.conj()));
            (0.5 * (e1.re + e2.re), Families::GAUSSIAN)
        }
        _ => return None,
    };
    Some(r)
}

/// The coefficients of `e` over the piecewise-linear atoms `[1, u, step(u), relu(u)]`
/// when it is such a sum (see Recognition above), else None: the kernels that the fused
/// general engine ([`super::fused`]) evaluates per entry.
pub(crate) fn arccos_terms(e: &Expr) -> Option<[f64; 4]> {
    let mut out = [0.0; 4];
    for (c, a) in recognize(e)? {
        let k = match a {
            Atom::One => 0,
            Atom::X => 1,
            Atom::Step => 2,
            Atom::Relu => 3,
            _ => return None,
        };
        out[k] += c;
    }
    Some(out)
}

/// `sin theta + (pi - theta) cos theta` at `cos theta = rho`, with `sin theta` from
/// `(1 - rho)(1 + rho)` to keep accuracy near `rho = ±1`.
#[inline]
fn arccos1(rho: f64) -> f64 {
    // libm's (fdlibm) acos: same accuracy as the system one, ~25% faster here.
    let th = libm::acos(rho);
    ((1.0 - rho) * (1.0 + rho)).sqrt() + (PI - th) * rho
}

/// `sum_ij c_i d_j E[A_i(u) B_j(v)]` and the families used; `None` if any pair with
/// non-zero weight has no closed form.
fn terms_pair(f: &Terms, g: &Terms, s11: f64, s12: f64, s22: f64) -> Option<(f64, Families)> {
    let mut total = 0.0;
    let mut fam = Families::default();
    for &(c, a) in f {
        for &(d, b) in g {
            if c == 0.0 || d == 0.0 {
                continue;
            }
            let (v, fa) = atom_pair(a, b, s11, s12, s22)?;
            total += c * d * v;
            fam = fam.union(fa);
        }
    }
    Some((total, fam))
}

// ----------------------------------------------------------------------------------
// The prepared pair kernel

/// How a [`PairKernel`] evaluates. Fast paths for the kernels the recursions use most.
#[derive(Clone, Debug)]
enum Plan {
    /// `c E[relu(u) relu(v)]`
    ReluRelu(f64),
    /// `c E[step(u) step(v)]`
    StepStep(f64),
    /// `c E[erf(a u) erf(b v)]`
    ErfErf { c: f64, a: f64, b: f64 },
    /// `c E[e^{-a1 u^2} e^{-a2 v^2}]` (erf' pairs)
    GaussGauss { c: f64, a1: f64, a2: f64 },
    /// Any recognized combination.
    Terms(Terms, Terms),
    /// `scale * (S12 or 1) * E[h(w)]`: a 1-D Gauss–Hermite integral, see [`OneDim`].
    OneDim {
        kind: OneDim,
        scale: f64,
        h: Expr,
        degree: usize,
    },
    /// 2-D Gauss–Hermite of the given degree (kinked integrands).
    Quad { degree: usize },
    /// Smooth integrands: Mehler series with cached per-variance coefficients and a
    /// conditional 1-D fallback (`smooth.rs`).
    Smooth(Arc<Smooth>),
}

/// Pairs without a closed form that still reduce to one dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OneDim {
    /// `f` constant: `E[f g(v)] = f(0) E[g(v)]`, `h = g` at `Var = S22`.
    ConstF,
    /// `g` constant: `g(0) E[f(u)]`, `h = f` at `Var = S11`.
    ConstG,
    /// `f(u) = a u`: Stein's lemma `E[a u g(v)] = a S12 E[g'(v)]`, `h = g'`.
    SteinF,
    /// `g(v) = b v`: `b S12 E[f'(u)]`, `h = f'`.
    SteinG,
}

/// `a` if `t` is `a u` (only `X` atoms).
fn linear_coef(t: &Terms) -> Option<f64> {
    t.iter()
        .try_fold(0.0, |acc, (c, a)| (*a == Atom::X).then_some(acc + c))
}

/// Stein's lemma needs the weak derivative of `h`; `Fun::deriv` writes step' = 0, which
/// misses the jump's delta, so expressions calling step are excluded.
fn has_jump(e: &Expr) -> bool {
    let mut j = false;
    e.visit_funs(&mut |f| j |= f == Fun::Step);
    j
}

/// The 1-D reduction of `(f, g)`, if any: `(kind, scale, h)`.
fn one_dim(f: &Expr, g: &Expr, f0: f64, g0: f64) -> Option<(OneDim, f64, Expr)> {
    if f.is_constant() {
        return Some((OneDim::ConstF, f0, g.clone()));
    }
    if g.is_constant() {
        return Some((OneDim::ConstG, g0, f.clone()));
    }
    if let Some(a) = recognize(f).as_ref().and_then(linear_coef) {
        if !has_jump(g) {
            return Some((OneDim::SteinF, a, g.diff(0)));
        }
    }
    if let Some(b) = recognize(g).as_ref().and_then(linear_coef) {
        if !has_jump(f) {
            return Some((OneDim::SteinG, b, f.diff(0)));
        }
    }
    None
}

/// Second output of [`PairKernel::block_pair_in_place`]: overwrite it, or multiply it
/// entrywise (the NTK update `Theta <- Sdot ⊙ Theta` without a temporary matrix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combine {
    Overwrite,
    Multiply,
}

/// `E[f(u) g(v)]` for a fixed pair `(f, g)`, prepared once: the method (closed form or
/// Gauss–Hermite degree) is chosen at construction, so that evaluating millions of
/// covariances costs one formula each.
#[derive(Clone, Debug)]
pub struct PairKernel {
    f: Expr,
    g: Expr,
    /// `f(0)`, `g(0)`: exact values for zero variances.
    f0: f64,
    g0: f64,
    plan: Plan,
    method: Method,
    error: f64,
}

fn assert_one_argument(e: &Expr) {
    let mut ok = true;
    e.visit_args(&mut |i| ok &= i == 0);
    assert!(ok, "limit::dual expects a function of Arg(0) only");
}

/// Does `e` call relu, step or abs?
fn is_kinked(e: &Expr) -> bool {
    let mut k = false;
    e.visit_funs(&mut |f| k |= !f.is_smooth());
    k
}

/// A nominal covariance at which closedness is decided (closedness does not depend on
/// the covariance, only on the atoms).
const NOMINAL: (f64, f64, f64) = (1.0, 0.3, 2.0);

/// Largest 2-D degree for kinked integrands without a closed form: their error falls
/// only algebraically, and each entry costs `degree^2` evaluations.
pub const MAX_KINKED_DEGREE: usize = 256;

impl PairKernel {
    /// Prepares `E[f(u) g(v)]` for one-argument expressions `f`, `g` (in `Arg(0)`).
    ///
    /// Closed form when both are recognized and every atom pair has an identity (see the
    /// module doc); otherwise 2-D Gauss–Hermite with the degree chosen so that the
    /// estimated error is below `tol` (relative to `max(1, |value|)`) for variances up to
    /// `max_var` (larger variances need higher degrees for non-polynomial `f, g`). Kinked
    /// integrands without a closed form are capped at [`MAX_KINKED_DEGREE`] and report
    /// their (larger) estimated error honestly through [`Self::error_bound`].
    /// Constant or linear partners reduce to 1-D quadrature (`E[c g] = c E g`, and
    /// Stein's lemma `E[a u g(v)] = a S12 E[g'(v)]`).
    ///
    /// # Panics
    /// If `f` or `g` reads an operand other than `Arg(0)` (a caller bug: substitute the
    /// operand first).
    pub fn new(f: &Expr, g: &Expr, max_var: f64, tol: f64) -> PairKernel {
        assert_one_argument(f);
        assert_one_argument(g);
        let f0 = f.eval(&[0.0]);
        let g0 = g.eval(&[0.0]);
        let scale = max_var.abs().max(1.0);
        if let (Some(tf), Some(tg)) = (recognize(f), recognize(g)) {
            let (s11, s12, s22) = NOMINAL;
            if let Some((_, fam)) = terms_pair(&tf, &tg, s11, s12, s22) {
                let plan = fast_plan(&tf, &tg).unwrap_or(Plan::Terms(tf, tg));
                return PairKernel {
                    f: f.clone(),
                    g: g.clone(),
                    f0,
                    g0,
                    plan,
                    method: Method::ClosedForm(fam),
                    // Round-off allowance: a few ulps of the largest value.
                    error: 64.0 * f64::EPSILON * scale,
                };
            }
        }
        if let Some((kind, scale, h)) = one_dim(f, g, f0, g0) {
            let he = |x: f64| h.eval(&[x]);
            let c = gauss::choose_degree_1d(&he, max_var, tol);
            let stein = matches!(kind, OneDim::SteinF | OneDim::SteinG);
            // |S12| <= max_var multiplies the 1-D error in the Stein case.
            let error = c.error * scale.abs() * if stein { max_var.abs() } else { 1.0 };
            return PairKernel {
                f: f.clone(),
                g: g.clone(),
                f0,
                g0,
                method: Method::GaussHermite {
                    degree: c.degree,
                    dims: 1,
                    kinked: is_kinked(&h),
                },
                plan: Plan::OneDim {
                    kind,
                    scale,
                    h,
                    degree: c.degree,
                },
                error,
            };
        }
        let kinked = is_kinked(f) || is_kinked(g);
        if !kinked {
            let sm = Smooth::new(f, g, max_var, tol);
            return PairKernel {
                f: f.clone(),
                g: g.clone(),
                f0,
                g0,
                method: Method::HermiteSeries {
                    degree: sm.degree(),
                },
                error: sm.error(),
                plan: Plan::Smooth(Arc::new(sm)),
            };
        }
        let fe = |x: f64| f.eval(&[x]);
        let ge = |x: f64| g.eval(&[x]);
        let cap = if kinked {
            MAX_KINKED_DEGREE
        } else {
            gauss::MAX_DEGREE
        };
        let choice = gauss::choose_degree_2d(&fe, &ge, max_var, tol, cap);
        PairKernel {
            f: f.clone(),
            g: g.clone(),
            f0,
            g0,
            plan: Plan::Quad {
                degree: choice.degree,
            },
            method: Method::GaussHermite {
                degree: choice.degree,
                dims: 2,
                kinked,
            },
            error: choice.error,
        }
    }

    pub fn method(&self) -> Method {
        self.method
    }

    /// Reuses what `old` (the same functions, prepared for smaller variances) has
    /// already computed and is still valid here: the smooth path's per-variance rows
    /// when both chose the same grid.
    pub fn adopt(&mut self, old: &PairKernel) {
        if let (Plan::Smooth(new), Plan::Smooth(prev)) = (&mut self.plan, &old.plan) {
            if let Some(new) = Arc::get_mut(new) {
                new.adopt_cache(prev);
            }
        }
    }

    /// Estimated absolute error of [`Self::eval`] for variances up to the `max_var`
    /// given at construction.
    pub fn error_bound(&self) -> f64 {
        match &self.plan {
            // may have grown with the entries evaluated so far (smooth.rs)
            Plan::Smooth(s) => s.error(),
            _ => self.error,
        }
    }

    /// `(c1, c2)` when `self` is `c1' E[relu relu]` and `second` is `c2' E[step step]`:
    /// the arc-cosine pair of a ReLU layer, `c1 = c1'/(2π)`, `c2 = c2'/(2π)`, so that
    /// `E = (c1 n J(rho), c2 (π - θ))` with [`fastmath::arccos_pair`].
    pub fn relu_step_consts(&self, second: &PairKernel) -> Option<(f64, f64)> {
        match (&self.plan, &second.plan) {
            (Plan::ReluRelu(c1), Plan::StepStep(c2)) => Some((*c1 / (2.0 * PI), *c2 / (2.0 * PI))),
            _ => None,
        }
    }

    pub fn is_closed_form(&self) -> bool {
        matches!(self.method, Method::ClosedForm(_))
    }

    /// `E[f(u) g(v)]` with `Var u = s11`, `Cov = s12`, `Var v = s22`. Slightly non-PSD
    /// input (round-off) is clamped; non-finite input gives NaN.
    pub fn eval(&self, s11: f64, s12: f64, s22: f64) -> f64 {
        let Some((s11, s12, s22)) = clamp_cov(s11, s12, s22) else {
            return f64::NAN;
        };
        match &self.plan {
            Plan::ReluRelu(c) => c * relu_relu(s11.sqrt() * s22.sqrt(), s12),
            Plan::StepStep(c) => c * step_step(s11.sqrt() * s22.sqrt(), s12),
            Plan::ErfErf { c, a, b } => {
                let r1 = 1.0 / (1.0 + 2.0 * a * a * s11).sqrt();
                let r2 = 1.0 / (1.0 + 2.0 * b * b * s22).sqrt();
                c * erf_erf(2.0 * a * b * r1 * r2, s12)
            }
            Plan::GaussGauss { c, a1, a2 } => {
                let t1 = 1.0 + 2.0 * a1 * s11;
                let t2 = 1.0 + 2.0 * a2 * s22;
                c * gauss_gauss(t1 * t2, 4.0 * a1 * a2, s12)
            }
            Plan::Terms(tf, tg) => {
                let z1 = s11 <= TINY_VAR;
                let z2 = s22 <= TINY_VAR;
                match (z1, z2) {
                    (true, true) => self.f0 * self.g0,
                    (true, false) => self.f0 * terms_mean(tg, s22),
                    (false, true) => self.g0 * terms_mean(tf, s11),
                    (false, false) => terms_pair(tf, tg, s11, s12, s22).map_or(f64::NAN, |r| r.0),
                }
            }
            Plan::OneDim {
                kind,
                scale,
                h,
                degree,
            } => {
                let e = |var: f64| gauss::expect1(&|x| h.eval(&[x]), var, *degree);
                match kind {
                    OneDim::ConstF => scale * e(s22),
                    OneDim::ConstG => scale * e(s11),
                    OneDim::SteinF => scale * s12 * e(s22),
                    OneDim::SteinG => scale * s12 * e(s11),
                }
            }
            Plan::Smooth(sm) => sm.eval(s11, s12, s22),
            Plan::Quad { degree } => {
                let fe = |x: f64| self.f.eval(&[x]);
                let ge = |x: f64| self.g.eval(&[x]);
                gauss::expect2(&fe, &ge, s11, s12, s22, *degree)
            }
        }
    }

    /// [`Self::eval`] with its error bound and method.
    pub fn estimate(&self, s11: f64, s12: f64, s22: f64) -> Estimate {
        Estimate {
            value: self.eval(s11, s12, s22),
            error: self.error,
            method: self.method,
        }
    }

    /// `out[(p, q)] = E[f(u_p) g(v_q)]` with `Var u_p = d1[p]`, `Var v_q = d2[q]`,
    /// `Cov(u_p, v_q) = cross[(p, q)]`. With `symmetric` (`d1 == d2`, `cross` symmetric)
    /// only the upper triangle is computed and then mirrored; the flag is ignored when
    /// `f != g`, since then `out` is not symmetric even if `cross` is.
    pub fn block(
        &self,
        d1: &[f64],
        d2: &[f64],
        cross: &DMatrix<f64>,
        symmetric: bool,
    ) -> DMatrix<f64> {
        let mut out = cross.clone();
        self.block_in_place(d1, d2, &mut out, symmetric);
        out
    }

    /// [`Self::block`] overwriting `cross`, so a kernel recursion on M points needs no
    /// second M x M matrix. Parallel over columns (rayon).
    pub fn block_in_place(
        &self,
        d1: &[f64],
        d2: &[f64],
        cross: &mut DMatrix<f64>,
        symmetric: bool,
    ) {
        check_shapes(d1, d2, cross, symmetric);
        let symmetric = symmetric && self.f == self.g;
        // The arc-cosine kernels: vectorized columns (one `acos` per entry).
        let arccos = match self.plan {
            Plan::ReluRelu(c) => Some((c / (2.0 * PI), true)),
            Plan::StepStep(c) => Some((c / (2.0 * PI), false)),
            _ => None,
        };
        if let Some((c, relu)) = arccos {
            let (s1, s2) = (sqrt_clamped(d1), sqrt_clamped(d2));
            let n = cross.nrows();
            if n > 0 {
                cross
                    .as_mut_slice()
                    .par_chunks_mut(n)
                    .enumerate()
                    .for_each(|(q, col)| {
                        let end = if symmetric { (q + 1).min(n) } else { n };
                        let mut scratch = [0.0f64; ARCCOS_CHUNK];
                        for (k, a) in col[..end].chunks_mut(ARCCOS_CHUNK).enumerate() {
                            let s1 = &s1[k * ARCCOS_CHUNK..k * ARCCOS_CHUNK + a.len()];
                            let b = &mut scratch[..a.len()];
                            if relu {
                                arccos_column(a, b, s1, s2[q], [c, 0.0], false);
                            } else {
                                // the covariances are read from the first slice
                                b.copy_from_slice(a);
                                arccos_column(b, a, s1, s2[q], [0.0, c], false);
                            }
                        }
                    });
                if symmetric {
                    fastmath::mirror_upper_par(cross.as_mut_slice(), n);
                }
            }
            return;
        }
        let prep = Prepared::new(self, d1, d2);
        drive(cross, symmetric, |p, q, x| prep.at(p, q, x));
    }

    /// Two kernels on the same covariances in one pass: `cross` is overwritten by this
    /// kernel and `second_out` receives `second` (overwritten or multiplied into,
    /// per `mode`). When `self` is relu·relu and `second` is step·step (the NNGP and
    /// `Sdot` of a ReLU layer, theory.md §3.1) both come from one `acos` per entry.
    /// With `symmetric`, only upper triangles are computed and mirrored, so in
    /// [`Combine::Multiply`] mode `second_out` must be symmetric on entry (as an NTK is).
    #[allow(clippy::too_many_arguments)]
    pub fn block_pair_in_place(
        &self,
        second: &PairKernel,
        d1: &[f64],
        d2: &[f64],
        cross: &mut DMatrix<f64>,
        second_out: &mut DMatrix<f64>,
        mode: Combine,
        symmetric: bool,
    ) {
        check_shapes(d1, d2, cross, symmetric);
        assert_eq!(cross.shape(), second_out.shape(), "second output shape");
        let symmetric = symmetric && self.f == self.g && second.f == second.g;
        let multiply = mode == Combine::Multiply;
        if let (Plan::ReluRelu(c1), Plan::StepStep(c2)) = (&self.plan, &second.plan) {
            let (c1, c2) = (*c1 / (2.0 * PI), *c2 / (2.0 * PI));
            let s1 = sqrt_clamped(d1);
            let s2 = sqrt_clamped(d2);
            let n = cross.nrows();
            if n == 0 {
                return;
            }
            cross
                .as_mut_slice()
                .par_chunks_mut(n)
                .zip(second_out.as_mut_slice().par_chunks_mut(n))
                .enumerate()
                .for_each(|(q, (ca, cb))| {
                    let end = if symmetric { (q + 1).min(n) } else { n };
                    arccos_column(
                        &mut ca[..end],
                        &mut cb[..end],
                        &s1[..end],
                        s2[q],
                        [c1, c2],
                        multiply,
                    );
                });
            if symmetric {
                fastmath::mirror_upper_par(cross.as_mut_slice(), n);
                fastmath::mirror_upper_par(second_out.as_mut_slice(), n);
            }
            return;
        }
        let p1 = Prepared::new(self, d1, d2);
        let p2 = Prepared::new(second, d1, d2);
        drive2(cross, second_out, multiply, symmetric, |p, q, x| {
            (p1.at(p, q, x), p2.at(p, q, x))
        });
    }
}

/// Entries per chunk when [`arccos_column`] needs a scratch column.
const ARCCOS_CHUNK: usize = 256;

fastmath::simd_fn! {
    /// One column of the arc-cosine pair (theory.md §3.2): with `n = s1[p] * s2q`,
    /// `a[p] <- c[0] E[relu relu] = c[0] n J(rho)` and `b[p] <- c[1] (π - θ)` (times the
    /// old `b[p]` when `multiply`), `rho = a[p] / n` snapped ([`snap_rho`]); zero
    /// variances give 0 (relu(0) = step(0) = 0) and NaN input NaN. Branch-free, so it
    /// vectorizes with [`fastmath::acos`].
    fn arccos_column(a: &mut [f64], b: &mut [f64], s1: &[f64], s2q: f64, c: [f64; 2], multiply: bool) {
        let [c1, c2] = c;
        for ((x, y), &sp) in a.iter_mut().zip(b.iter_mut()).zip(s1) {
            let n = sp * s2q;
            let xv = *x;
            let bad = n.is_nan() || xv.is_nan();
            let r = xv / n;
            let r = if r >= 1.0 - SNAP { 1.0 } else { r };
            let rho = if r <= -1.0 + SNAP { -1.0 } else { r };
            let (j, pt) = fastmath::arccos_pair(rho);
            let ok = n > 0.0;
            let u = if ok { c1 * (n * j) } else { 0.0 };
            let v = if ok { c2 * pt } else { 0.0 };
            *x = if bad { f64::NAN } else { u };
            let v = if bad { f64::NAN } else { v };
            *y = if multiply { *y * v } else { v };
        }
    }
}

/// Chooses a fast path when each side is a single atom of a matching kind.
fn fast_plan(tf: &Terms, tg: &Terms) -> Option<Plan> {
    match (tf.as_slice(), tg.as_slice()) {
        ([(c1, Atom::Relu)], [(c2, Atom::Relu)]) => Some(Plan::ReluRelu(c1 * c2)),
        ([(c1, Atom::Step)], [(c2, Atom::Step)]) => Some(Plan::StepStep(c1 * c2)),
        ([(c1, Atom::Erf(a))], [(c2, Atom::Erf(b))]) => Some(Plan::ErfErf {
            c: c1 * c2,
            a: *a,
            b: *b,
        }),
        (
            [(
                k1,
                Atom::Wave {
                    c: w1,
                    alpha: a1,
                    b: b1,
                },
            )],
            [(
                k2,
                Atom::Wave {
                    c: w2,
                    alpha: a2,
                    b: b2,
                },
            )],
        ) if *b1 == C64::ZERO && *b2 == C64::ZERO && w1.is_real() && w2.is_real() => {
            Some(Plan::GaussGauss {
                c: k1 * k2 * w1.re * w2.re,
                a1: *a1,
                a2: *a2,
            })
        }
        _ => None,
    }
}

/// `E[relu(u) relu(v)]` given `n = sqrt(S11 S22)` (theory.md §3.2).
#[inline]
fn relu_relu(n: f64, s12: f64) -> f64 {
    if n.is_nan() || s12.is_nan() {
        return f64::NAN;
    }
    if n <= 0.0 {
        return 0.0;
    }
    let rho = snap_rho(s12 / n);
    n * arccos1(rho) / (2.0 * PI)
}

/// `E[step(u) step(v)] = (pi - theta)/(2 pi)`; 0 if a variance is 0 (step(0) = 0).
#[inline]
fn step_step(n: f64, s12: f64) -> f64 {
    if n.is_nan() || s12.is_nan() {
        return f64::NAN;
    }
    if n <= 0.0 {
        return 0.0;
    }
    let rho = snap_rho(s12 / n);
    (PI - libm::acos(rho)) / (2.0 * PI)
}

/// Williams: `(2/pi) asin(k S12)` with `k = 2ab / sqrt((1+2a^2 S11)(1+2b^2 S22))`.
#[inline]
fn erf_erf(k: f64, s12: f64) -> f64 {
    2.0 / PI * (k * s12).clamp(-1.0, 1.0).asin()
}

/// `E[e^{-a1 u^2} e^{-a2 v^2}] = (t1 t2 - 4 a1 a2 S12^2)^{-1/2}`, `t = 1 + 2 a S`.
#[inline]
fn gauss_gauss(t1t2: f64, four_a1a2: f64, s12: f64) -> f64 {
    // det >= t1 + t2 - 1 >= 1 for PSD input; the max guards against round-off only.
    1.0 / (t1t2 - four_a1a2 * s12 * s12).max(1.0).sqrt()
}

fn sqrt_clamped(d: &[f64]) -> Vec<f64> {
    d.iter()
        .map(|&v| {
            if v.is_nan() {
                f64::NAN
            } else {
                v.max(0.0).sqrt()
            }
        })
        .collect()
}

fn check_shapes(d1: &[f64], d2: &[f64], cross: &DMatrix<f64>, symmetric: bool) {
    assert_eq!(cross.nrows(), d1.len(), "rows of cross vs d1");
    assert_eq!(cross.ncols(), d2.len(), "columns of cross vs d2");
    if symmetric {
        assert_eq!(d1.len(), d2.len(), "symmetric block must be square");
    }
}

/// Per-block precomputation (square roots, erf normalizers), so that an entry costs one
/// transcendental function on the fast paths.
enum Prepared<'a> {
    Relu {
        c: f64,
        s1: Vec<f64>,
        s2: Vec<f64>,
    },
    Step {
        c: f64,
        s1: Vec<f64>,
        s2: Vec<f64>,
    },
    Erf {
        c: f64,
        r1: Vec<f64>,
        r2: Vec<f64>,
    },
    Gauss {
        c: f64,
        t1: Vec<f64>,
        t2: Vec<f64>,
        k: f64,
    },
    Smooth(SmoothBlock<'a>),
    General {
        k: &'a PairKernel,
        d1: &'a [f64],
        d2: &'a [f64],
    },
}

impl<'a> Prepared<'a> {
    fn new(k: &'a PairKernel, d1: &'a [f64], d2: &'a [f64]) -> Prepared<'a> {
        let pos = |v: f64| if v.is_nan() { f64::NAN } else { v.max(0.0) };
        match k.plan {
            Plan::ReluRelu(c) => Prepared::Relu {
                c,
                s1: sqrt_clamped(d1),
                s2: sqrt_clamped(d2),
            },
            Plan::StepStep(c) => Prepared::Step {
                c,
                s1: sqrt_clamped(d1),
                s2: sqrt_clamped(d2),
            },
            Plan::ErfErf { c, a, b } => Prepared::Erf {
                c,
                // fold 2ab into the row factor
                r1: d1
                    .iter()
                    .map(|&s| 2.0 * a * b / (1.0 + 2.0 * a * a * pos(s)).sqrt())
                    .collect(),
                r2: d2
                    .iter()
                    .map(|&s| 1.0 / (1.0 + 2.0 * b * b * pos(s)).sqrt())
                    .collect(),
            },
            Plan::GaussGauss { c, a1, a2 } => Prepared::Gauss {
                c,
                t1: d1.iter().map(|&s| 1.0 + 2.0 * a1 * pos(s)).collect(),
                t2: d2.iter().map(|&s| 1.0 + 2.0 * a2 * pos(s)).collect(),
                k: 4.0 * a1 * a2,
            },
            Plan::Smooth(ref sm) => Prepared::Smooth(sm.block(d1, d2)),
            _ => Prepared::General { k, d1, d2 },
        }
    }

    #[inline]
    fn at(&self, p: usize, q: usize, x: f64) -> f64 {
        match self {
            Prepared::Relu { c, s1, s2 } => c * relu_relu(s1[p] * s2[q], x),
            Prepared::Step { c, s1, s2 } => c * step_step(s1[p] * s2[q], x),
            Prepared::Erf { c, r1, r2 } => c * erf_erf(r1[p] * r2[q], x),
            Prepared::Gauss { c, t1, t2, k } => c * gauss_gauss(t1[p] * t2[q], *k, x),
            Prepared::Smooth(s) => s.at(p, q, x),
            Prepared::General { k, d1, d2 } => k.eval(d1[p], x, d2[q]),
        }
    }
}

/// Applies `entry(p, q, cross[(p, q)])` to every entry (upper triangle only when
/// `symmetric`, then mirrored), columns in parallel.
fn drive<F>(m: &mut DMatrix<f64>, symmetric: bool, entry: F)
where
    F: Fn(usize, usize, f64) -> f64 + Sync,
{
    let n = m.nrows();
    if n == 0 || m.ncols() == 0 {
        return;
    }
    m.as_mut_slice()
        .par_chunks_mut(n)
        .enumerate()
        .for_each(|(q, col)| {
            let end = if symmetric { (q + 1).min(n) } else { n };
            for (p, x) in col[..end].iter_mut().enumerate() {
                *x = entry(p, q, *x);
            }
        });
    if symmetric {
        fastmath::mirror_upper_par(m.as_mut_slice(), n);
    }
}

/// Two outputs from one pass; see [`PairKernel::block_pair_in_place`].
fn drive2<F>(a: &mut DMatrix<f64>, b: &mut DMatrix<f64>, multiply: bool, symmetric: bool, entry: F)
where
    F: Fn(usize, usize, f64) -> (f64, f64) + Sync,
{
    let n = a.nrows();
    if n == 0 || a.ncols() == 0 {
        return;
    }
    a.as_mut_slice()
        .par_chunks_mut(n)
        .zip(b.as_mut_slice().par_chunks_mut(n))
        .enumerate()
        .for_each(|(q, (ca, cb))| {
            let end = if symmetric { (q + 1).min(n) } else { n };
            for (p, (x, y)) in ca[..end].iter_mut().zip(&mut cb[..end]).enumerate() {
                let (u, v) = entry(p, q, *x);
                *x = u;
                *y = if multiply { *y * v } else { v };
            }
        });
    if symmetric {
        fastmath::mirror_upper_par(a.as_mut_slice(), n);
        fastmath::mirror_upper_par(b.as_mut_slice(), n);
    }
}

// ----------------------------------------------------------------------------------
// One-dimensional expectations

/// `E[f(u)]`, `u ~ N(0, s)`, prepared once: closed form when `f` is recognized (every
/// atom has a closed mean), else 1-D Gauss–Hermite with the degree chosen for `tol`
/// at `max_var`. (For `E[f(u)^2]` use `PairKernel::new(f, f, ..).eval(s, s, s)`, which
/// collapses to the 1-D rule on the diagonal.)
#[derive(Clone, Debug)]
pub struct MeanKernel {
    f: Expr,
    f0: f64,
    terms: Option<Terms>,
    degree: usize,
    method: Method,
    error: f64,
}

impl MeanKernel {
    /// # Panics
    /// If `f` reads an operand other than `Arg(0)`.
    pub fn new(f: &Expr, max_var: f64, tol: f64) -> MeanKernel {
        assert_one_argument(f);
        let f0 = f.eval(&[0.0]);
        if let Some(t) = recognize(f) {
            let mut fam = Families::default();
            for &(_, a) in &t {
                fam = fam.union(match a {
                    Atom::One | Atom::X => Families::LINEAR,
                    Atom::Step | Atom::Relu => Families::ARC_COSINE,
                    Atom::Erf(_) => Families::PARITY,
                    Atom::Wave { .. } => Families::GAUSSIAN,
                });
            }
            return MeanKernel {
                f: f.clone(),
                f0,
                terms: Some(t),
                degree: 0,
                method: Method::ClosedForm(fam),
                error: 64.0 * f64::EPSILON * max_var.abs().max(1.0),
            };
        }
        let kinked = is_kinked(f);
        let fe = |x: f64| f.eval(&[x]);
        let c = gauss::choose_degree_1d(&fe, max_var, tol);
        MeanKernel {
            f: f.clone(),
            f0,
            terms: None,
            degree: c.degree,
            method: Method::GaussHermite {
                degree: c.degree,
                dims: 1,
                kinked,
            },
            error: c.error,
        }
    }

    pub fn method(&self) -> Method {
        self.method
    }

    pub fn error_bound(&self) -> f64 {
        self.error
    }

    /// `E[f(u)]`, `Var u = s` (clamped at 0; NaN for non-finite `s`).
    pub fn eval(&self, s: f64) -> f64 {
        if !s.is_finite() {
            return f64::NAN;
        }
        if s <= TINY_VAR {
            return self.f0;
        }
        match &self.terms {
            Some(t) => terms_mean(t, s),
            None => gauss::expect1(&|x| self.f.eval(&[x]), s, self.degree),
        }
    }
}

/// One-off `E[f(u) g(v)]` with its error and method (builds a [`PairKernel`] for the
/// larger of the two variances).
pub fn pair_expectation(f: &Expr, g: &Expr, s11: f64, s12: f64, s22: f64, tol: f64) -> Estimate {
    PairKernel::new(f, g, s11.max(s22), tol).estimate(s11, s12, s22)
}

/// Correlations within this of ±1 are read as ±1 ([`snap_rho`]).
pub const SNAP: f64 = 1e-14;

/// A correlation clamped to [-1, 1], with values within 1e-14 of ±1 taken as exactly ±1.
///
/// Why: `acos` is not Lipschitz at ±1 (θ ≈ sqrt(2(1-ρ))), so the few ulps of round-off
/// that every covariance recursion leaves on collinear inputs (ρ exactly 1 in exact
/// arithmetic) would become errors of 1e-8 in θ. Snapping reads such inputs as what they
/// are; a genuine 1 - ρ below 1e-14 is below the accuracy ρ is known to anyway.
#[inline]
pub fn snap_rho(r: f64) -> f64 {
    if r >= 1.0 - SNAP {
        1.0
    } else if r <= -1.0 + SNAP {
        -1.0
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::Xoshiro256PlusPlus;
    use rand::{RngExt, SeedableRng};
    use rand_distr::StandardNormal;

    fn x() -> Expr {
        Expr::Arg(0)
    }
    fn call(f: Fun) -> Expr {
        Expr::call(f, x())
    }
    fn erf_prime() -> Expr {
        Fun::Erf.deriv(x())
    }

    /// Covariances: unequal variances, rho near ±1, zero correlation.
    const COVS: [(f64, f64, f64); 5] = [
        (1.0, 0.3, 2.0),
        (1.5, -1.45, 1.5),
        (0.7, 0.699_9, 0.7),
        (2.0, 0.0, 0.5),
        (0.5, -0.3, 1.2),
    ];

    /// Smooth closed forms against 2-D Gauss–Hermite at degree 256.
    #[test]
    fn smooth_closed_forms_match_quadrature() {
        let pairs: Vec<(Expr, Expr)> = vec![
            (call(Fun::Erf), call(Fun::Erf)),
            (
                Expr::call(Fun::Erf, Expr::mul(Expr::Const(0.7), x())),
                Expr::call(Fun::Erf, Expr::mul(Expr::Const(-1.3), x())),
            ),
            (erf_prime(), erf_prime()),
            (call(Fun::Exp), call(Fun::Exp)),
            (call(Fun::Sin), call(Fun::Sin)),
            (call(Fun::Cos), call(Fun::Cos)),
            (call(Fun::Sin), call(Fun::Cos)),
            (call(Fun::Exp), call(Fun::Sin)),
            (call(Fun::Exp), call(Fun::Cos)),
            (call(Fun::Exp), erf_prime()),
            (erf_prime(), call(Fun::Cos)),
            (x(), call(Fun::Erf)),
            (x(), call(Fun::Sin)),
            (x(), call(Fun::Exp)),
            (x(), erf_prime()),
            (x(), x()),
            (Expr::Const(2.5), call(Fun::Exp)),
            (Expr::Const(2.5), call(Fun::Erf)),
            (call(Fun::Erf), call(Fun::Exp)),
            (call(Fun::Erf), call(Fun::Cos)),
            (call(Fun::Erf), erf_prime()),
            // sin(2u + 1), exp(-u^2/2) * cos(u)  (products and affine arguments)
            (
                Expr::call(
                    Fun::Sin,
                    Expr::add(Expr::mul(Expr::Const(2.0), x()), Expr::Const(1.0)),
                ),
                Expr::mul(
                    Expr::call(Fun::Exp, Expr::mul(Expr::Const(-0.5), Expr::powi(x(), 2))),
                    call(Fun::Cos),
                ),
            ),
            (Expr::powi(call(Fun::Cos), 2), call(Fun::Sin)),
        ];
        for (f, g) in &pairs {
            let k = PairKernel::new(f, g, 2.0, 1e-12);
            let name = format!(
                "{} · {}",
                f.display(&|_| "x".into()),
                g.display(&|_| "x".into())
            );
            assert!(k.is_closed_form(), "{name}: {}", k.method());
            for &(a, b, c) in &COVS {
                let v = k.eval(a, b, c);
                let fe = |t: f64| f.eval(&[t]);
                let ge = |t: f64| g.eval(&[t]);
                let q = gauss::expect2(&fe, &ge, a, b, c, 256);
                assert!(
                    (v - q).abs() <= 1e-10 * q.abs().max(1.0),
                    "{name} at ({a},{b},{c}): closed {v} vs GH {q}"
                );
            }
        }
    }

    /// Kinked closed forms against seeded Monte Carlo (10^6 samples, 4 SE) and, as a
    /// coarse second opinion, 2-D Gauss–Hermite of degree 512.
    #[test]
    fn kinked_closed_forms_match_monte_carlo() {
        let neg = |e: Expr| Expr::neg(e);
        let leaky = Expr::add(
            Expr::mul(
                Expr::Const(0.1),
                Expr::neg(Expr::call(Fun::Relu, Expr::neg(x()))),
            ),
            Expr::mul(Expr::Const(1.5), call(Fun::Relu)),
        ); // 0.1 min(x,0) + 1.5 max(x,0)
        let pairs: Vec<(Expr, Expr)> = vec![
            (call(Fun::Relu), call(Fun::Relu)),
            (call(Fun::Step), call(Fun::Step)),
            (call(Fun::Relu), call(Fun::Step)),
            (call(Fun::Step), call(Fun::Relu)),
            (call(Fun::Abs), call(Fun::Abs)),
            (call(Fun::Abs), call(Fun::Relu)),
            (call(Fun::Relu), x()),
            (call(Fun::Step), x()),
            (Fun::Abs.deriv(x()), Fun::Abs.deriv(x())),
            (leaky.clone(), leaky.clone()),
            (Expr::call(Fun::Relu, neg(x())), call(Fun::Step)),
            (Expr::call(Fun::Step, neg(x())), call(Fun::Relu)),
            (call(Fun::Step), call(Fun::Erf)),
            (call(Fun::Relu), call(Fun::Erf)),
            (
                call(Fun::Step),
                Expr::call(Fun::Erf, Expr::mul(Expr::Const(2.0), x())),
            ),
            (call(Fun::Relu), call(Fun::Exp)),
            (call(Fun::Step), call(Fun::Exp)),
            (call(Fun::Relu), erf_prime()),
            (call(Fun::Step), erf_prime()),
            (
                call(Fun::Abs),
                Expr::call(Fun::Exp, Expr::neg(Expr::mul(Expr::Const(0.3), x()))),
            ),
            (Expr::Const(3.0), call(Fun::Relu)),
        ];
        let n = 1_000_000;
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(2024);
        let z: Vec<(f64, f64)> = (0..n)
            .map(|_| (rng.sample(StandardNormal), rng.sample(StandardNormal)))
            .collect();
        for (f, g) in &pairs {
            let name = format!(
                "{} · {}",
                f.display(&|_| "x".into()),
                g.display(&|_| "x".into())
            );
            let k = PairKernel::new(f, g, 2.0, 1e-10);
            assert!(k.is_closed_form(), "{name}: {}", k.method());
            for &(a, b, c) in &COVS {
                let v = k.eval(a, b, c);
                let l11 = a.sqrt();
                let l21 = b / l11;
                let l22 = (c - l21 * l21).max(0.0).sqrt();
                let (mut s, mut s2) = (0.0, 0.0);
                for &(z1, z2) in &z {
                    let y = f.eval(&[l11 * z1]) * g.eval(&[l21 * z1 + l22 * z2]);
                    s += y;
                    s2 += y * y;
                }
                let mean = s / n as f64;
                let se = ((s2 / n as f64 - mean * mean) / n as f64).sqrt();
                assert!(
                    (v - mean).abs() <= 4.0 * se + 1e-12,
                    "{name} at ({a},{b},{c}): closed {v} vs MC {mean} ± {se}"
                );
                let fe = |t: f64| f.eval(&[t]);
                let ge = |t: f64| g.eval(&[t]);
                let q = gauss::expect2(&fe, &ge, a, b, c, 512);
                assert!((v - q).abs() < 2e-2, "{name}: closed {v} vs GH {q}");
            }
        }
    }

    /// theory.md §3.2: the correct erf' kernel at S = [[1,.3],[.3,2]] is 0.3328 (GP4A's
    /// buggy VDerErf gives 0.3817).
    #[test]
    fn erf_prime_kernel_theory_number() {
        let k = PairKernel::new(&erf_prime(), &erf_prime(), 2.0, 1e-12);
        assert!(k.is_closed_form());
        let v = k.eval(1.0, 0.3, 2.0);
        let q = gauss::expect2(
            &|t| erf_prime().eval(&[t]),
            &|t| erf_prime().eval(&[t]),
            1.0,
            0.3,
            2.0,
            256,
        );
        assert!((v - q).abs() < 1e-13, "{v} vs {q}");
        assert!((v - 0.3328).abs() < 5e-5, "{v}");
        // The GP4A formula with sqrt(S11) in place of S11 is indeed different:
        let gp4a = 4.0 / PI / ((1.0 + 2.0) * (1.0 + 2.0 * 2f64.sqrt()) - 4.0 * 0.09f64).sqrt();
        assert!((gp4a - 0.3817).abs() < 5e-5 && (gp4a - v).abs() > 0.04);
        // and the step kernel is not the sign kernel (GP4A VStep bug)
        let s = PairKernel::new(&call(Fun::Step), &call(Fun::Step), 1.0, 1e-12);
        let rho: f64 = 0.4;
        assert!((s.eval(1.0, rho, 1.0) - (PI - rho.acos()) / (2.0 * PI)).abs() < 1e-15);
        assert!((s.eval(1.0, rho, 1.0) - 2.0 / PI * rho.asin()).abs() > 0.05);
    }

    #[test]
    fn recognition() {
        let kind = |f: &Expr, g: &Expr| PairKernel::new(f, g, 1.0, 1e-8).method();
        // relu' = step, erf' and abs' as produced by Fun::deriv
        let relu_d = Fun::Relu.deriv(x());
        assert_eq!(recognize(&relu_d), Some(vec![(1.0, Atom::Step)]));
        assert!(
            matches!(kind(&erf_prime(), &erf_prime()), Method::ClosedForm(f) if f == Families::GAUSSIAN)
        );
        assert!(
            matches!(kind(&call(Fun::Relu), &call(Fun::Relu)), Method::ClosedForm(f) if f == Families::ARC_COSINE)
        );
        assert_eq!(
            kind(&call(Fun::Relu), &call(Fun::Relu)).to_string(),
            "closed form (arc-cosine)"
        );
        // tanh has no closed form: the smooth path (Hermite series, smooth.rs)
        let m = kind(&call(Fun::Tanh), &call(Fun::Tanh));
        assert!(matches!(m, Method::HermiteSeries { .. }), "{m}");
        // relu against cos: no closed form (complex tilt) -> kinked quadrature
        let m = kind(&call(Fun::Relu), &call(Fun::Cos));
        assert!(
            matches!(m, Method::GaussHermite { kinked: true, .. }),
            "{m}"
        );
        assert!(m.to_string().contains("kinked"));
        // relu(x) + tanh(x): kinked, quadrature
        let f = Expr::add(call(Fun::Relu), call(Fun::Tanh));
        assert!(matches!(
            kind(&f, &f),
            Method::GaussHermite { kinked: true, .. }
        ));
        // exp(x^2) diverges: not recognized
        assert!(recognize(&Expr::call(Fun::Exp, Expr::powi(x(), 2))).is_none());
        // relu(x + 1) has no elementary closed form
        assert!(recognize(&Expr::call(Fun::Relu, Expr::add(x(), Expr::Const(1.0)))).is_none());
        // a second operand is not a one-argument function
        assert!(recognize(&Expr::Arg(1)).is_none());
    }

    /// Constant or linear partner without a closed form: 1-D quadrature (Stein's lemma
    /// for the linear one), checked against 2-D quadrature.
    #[test]
    fn one_dimensional_reductions() {
        let tanh = call(Fun::Tanh);
        let gelu = call(Fun::Gelu);
        let two_x = Expr::mul(Expr::Const(2.0), x());
        let cases = [
            (Expr::Const(1.5), tanh.clone()),
            (gelu.clone(), Expr::Const(-0.5)),
            (two_x.clone(), tanh.clone()),
            (gelu.clone(), x()),
            (x(), Expr::add(call(Fun::Relu), call(Fun::Sigmoid))),
        ];
        for (f, g) in &cases {
            let k = PairKernel::new(f, g, 2.0, 1e-11);
            assert!(
                matches!(k.method(), Method::GaussHermite { dims: 1, .. }),
                "{}",
                k.method()
            );
            for &(a, b, c) in &COVS {
                let q = gauss::expect2(&|t| f.eval(&[t]), &|t| g.eval(&[t]), a, b, c, 512);
                let v = k.eval(a, b, c);
                // relu + sigmoid is kinked: 2-D GH itself is only good to ~1e-4 there
                let tol = if is_kinked(g) { 1e-4 } else { 1e-10 };
                assert!(
                    (v - q).abs() < tol,
                    "{} at ({a},{b},{c}): {v} vs {q}",
                    k.method()
                );
            }
        }
        // x against step + tanh: Stein would need the delta of step, so 2-D quadrature
        let k = PairKernel::new(
            &x(),
            &Expr::add(call(Fun::Step), call(Fun::Tanh)),
            2.0,
            1e-8,
        );
        assert!(matches!(k.method(), Method::GaussHermite { dims: 2, .. }));
    }

    #[test]
    fn estimate_display() {
        let e = pair_expectation(&call(Fun::Relu), &call(Fun::Relu), 1.0, 0.5, 1.0, 1e-10);
        let th = 0.5f64.acos();
        let exact = (th.sin() + (PI - th) * 0.5) / (2.0 * PI);
        assert!((e.value - exact).abs() < 1e-15);
        assert!(e.to_string().ends_with("(closed form (arc-cosine))"), "{e}");
        let e = pair_expectation(&call(Fun::Tanh), &call(Fun::Tanh), 1.0, 0.5, 1.0, 1e-10);
        assert!(e.to_string().contains("Hermite (Mehler) series"), "{e}");
        assert!(e.error <= 1e-10);
    }

    #[test]
    #[should_panic(expected = "Arg(0) only")]
    fn second_operand_is_rejected() {
        PairKernel::new(&Expr::Arg(1), &x(), 1.0, 1e-8);
    }

    #[test]
    fn zero_variances_use_true_values_at_zero() {
        // step(-x) at u = 0 is step(0) = 0, not 1 - step(0).
        let f = Expr::call(Fun::Step, Expr::neg(x()));
        let k = PairKernel::new(&f, &call(Fun::Relu), 1.0, 1e-10);
        assert_eq!(k.eval(0.0, 0.0, 1.0), 0.0);
        let k = PairKernel::new(&call(Fun::Cos), &call(Fun::Step), 1.0, 1e-10);
        assert!((k.eval(0.0, 0.0, 1.0) - 0.5).abs() < 1e-15);
        assert!((k.eval(1.0, 0.0, -1e-18) - 0.0).abs() < 1e-15);
        let k = PairKernel::new(&call(Fun::Relu), &call(Fun::Relu), 1.0, 1e-10);
        assert_eq!(k.eval(0.0, 0.0, 1.0), 0.0);
        assert!(k.eval(f64::NAN, 0.0, 1.0).is_nan());
        // slightly non-PSD: |S12| > sqrt(S11 S22) by round-off
        let v = k.eval(1.0, 1.0 + 1e-14, 1.0);
        assert!((v - 0.5).abs() < 1e-12, "{v}");
        let m = MeanKernel::new(&f, 1.0, 1e-10);
        assert_eq!(m.eval(0.0), 0.0);
        assert!((m.eval(1.0) - 0.5).abs() < 1e-15);
    }

    #[test]
    fn means_and_diagonals() {
        let s: f64 = 1.7;
        let relu = MeanKernel::new(&call(Fun::Relu), 2.0, 1e-12);
        assert!((relu.eval(s) - (s / (2.0 * PI)).sqrt()).abs() < 1e-15);
        let ep = MeanKernel::new(&erf_prime(), 2.0, 1e-12);
        assert!((ep.eval(s) - 2.0 / PI.sqrt() / (1.0 + 2.0 * s).sqrt()).abs() < 1e-15);
        let st = MeanKernel::new(&call(Fun::Step), 2.0, 1e-12);
        assert_eq!(st.eval(s), 0.5);
        let th = MeanKernel::new(&Expr::powi(call(Fun::Tanh), 2), 2.0, 1e-12);
        assert!(matches!(th.method(), Method::GaussHermite { dims: 1, .. }));
        let q = gauss::expect1(&|t: f64| t.tanh().powi(2), s, 512);
        assert!((th.eval(s) - q).abs() < 1e-12);
        // E[relu(u)^2] = S/2 on the diagonal
        let k = PairKernel::new(&call(Fun::Relu), &call(Fun::Relu), 2.0, 1e-12);
        assert!((k.eval(s, s, s) - s / 2.0).abs() < 1e-15);
        // E[erf(u)^2] = (2/pi) asin(2S/(1+2S))
        let k = PairKernel::new(&call(Fun::Erf), &call(Fun::Erf), 2.0, 1e-12);
        assert!((k.eval(s, s, s) - 2.0 / PI * (2.0 * s / (1.0 + 2.0 * s)).asin()).abs() < 1e-15);
    }

    #[test]
    fn tanh_kernel_meets_tolerance() {
        let t = call(Fun::Tanh);
        let k = PairKernel::new(&t, &t, 2.0, 1e-10);
        assert!(k.error_bound() <= 1e-10);
        let hi = |a, b, c| gauss::expect2(&|v: f64| v.tanh(), &|v: f64| v.tanh(), a, b, c, 512);
        for &(a, b, c) in &COVS {
            assert!((k.eval(a, b, c) - hi(a, b, c)).abs() <= 1e-10);
        }
        let d = Fun::Tanh.deriv(x());
        let k = PairKernel::new(&d, &d, 2.0, 1e-10);
        for &(a, b, c) in &COVS {
            let q = gauss::expect2(&|v| d.eval(&[v]), &|v| d.eval(&[v]), a, b, c, 512);
            assert!((k.eval(a, b, c) - q).abs() <= 1e-10);
        }
    }

    fn random_psd(m: usize, seed: u64) -> DMatrix<f64> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let a = DMatrix::<f64>::from_fn(m, 3, |_, _| rng.sample::<f64, _>(StandardNormal));
        let mut k = &a * a.transpose() / 3.0;
        // one zero-variance point
        for j in 0..m {
            k[(0, j)] = 0.0;
            k[(j, 0)] = 0.0;
        }
        k
    }

    #[test]
    fn blocks_match_entrywise() {
        let m = 37;
        let k = random_psd(m, 5);
        let d: Vec<f64> = (0..m).map(|i| k[(i, i)]).collect();
        let kernels = [
            PairKernel::new(&call(Fun::Relu), &call(Fun::Relu), 4.0, 1e-10),
            PairKernel::new(&call(Fun::Step), &call(Fun::Step), 4.0, 1e-10),
            PairKernel::new(&call(Fun::Erf), &call(Fun::Erf), 4.0, 1e-10),
            PairKernel::new(&erf_prime(), &erf_prime(), 4.0, 1e-10),
            PairKernel::new(&call(Fun::Abs), &call(Fun::Relu), 4.0, 1e-10),
            PairKernel::new(&call(Fun::Tanh), &call(Fun::Tanh), 4.0, 1e-6),
            PairKernel::new(&call(Fun::Tanh), &call(Fun::Tanh), 4.0, 1e-10),
            PairKernel::new(&call(Fun::Gelu), &call(Fun::Sigmoid), 4.0, 1e-9),
        ];
        for kern in &kernels {
            let sym = kern.block(&d, &d, &k, true);
            let full = kern.block(&d, &d, &k, false);
            for p in 0..m {
                for q in 0..m {
                    let e = kern.eval(d[p], k[(p, q)], d[q]);
                    // Blocks of smooth quadrature kernels use the Hermite series (and
                    // the 2-D rule is not exactly symmetric under swapping u and v):
                    // both agree with the entrywise value to the error bound.
                    let tol = if kern.is_closed_form() {
                        1e-14 * e.abs().max(1.0)
                    } else {
                        2.0 * kern.error_bound()
                    };
                    let name = kern.method();
                    assert!(
                        (full[(p, q)] - e).abs() <= tol,
                        "{name} ({p},{q}) {} vs {e}",
                        full[(p, q)]
                    );
                    assert!((sym[(p, q)] - full[(p, q)]).abs() <= tol, "{name}");
                }
            }
            let mut inplace = k.clone();
            kern.block_in_place(&d, &d, &mut inplace, true);
            assert_eq!(inplace, sym);
        }
        // rectangular block
        let d2: Vec<f64> = d[..20].to_vec();
        let cross = k.columns(0, 20).into_owned();
        let out = kernels[0].block(&d, &d2, &cross, false);
        assert_eq!(out[(5, 7)], kernels[0].eval(d[5], k[(5, 7)], d[7]));
    }

    /// The Hermite series is used (not just its fallback) and is accurate.
    #[test]
    fn mehler_series_matches_quadrature() {
        let t = call(Fun::Tanh);
        let g = call(Fun::Gelu);
        for (f, gg, v) in [(&t, &t, 2.0), (&g, &t, 4.0)] {
            let k = PairKernel::new(f, gg, v, 1e-10);
            let d = [v, 0.5 * v, 0.1];
            let Plan::Smooth(sm) = &k.plan else {
                panic!("not the smooth plan: {}", k.method());
            };
            let s = sm.block(&d, &d);
            for p in 0..3 {
                for q in 0..3 {
                    for rho in [-0.95, -0.6, 0.0, 0.3, 0.8, 0.95] {
                        let x = rho * (d[p] * d[q]).sqrt();
                        let val = s.at(p, q, x);
                        let q2 = gauss::expect2(
                            &|y| f.eval(&[y]),
                            &|y| gg.eval(&[y]),
                            d[p],
                            x,
                            d[q],
                            512,
                        );
                        assert!((val - q2).abs() <= 1e-10, "rho={rho}: {val} vs {q2}");
                    }
                }
            }
        }
    }

    #[test]
    fn pair_block_relu_step() {
        let m = 41;
        let k = random_psd(m, 9);
        let d: Vec<f64> = (0..m).map(|i| k[(i, i)]).collect();
        let relu = PairKernel::new(&call(Fun::Relu), &call(Fun::Relu), 4.0, 1e-10);
        let step = PairKernel::new(&Fun::Relu.deriv(x()), &Fun::Relu.deriv(x()), 4.0, 1e-10);
        let r = relu.block(&d, &d, &k, true);
        let s = step.block(&d, &d, &k, true);
        let theta = DMatrix::from_fn(m, m, |i, j| 1.0 + (i + j) as f64);
        for symmetric in [true, false] {
            let mut a = k.clone();
            let mut b = theta.clone();
            relu.block_pair_in_place(&step, &d, &d, &mut a, &mut b, Combine::Multiply, symmetric);
            let expect_b = s.component_mul(&theta);
            assert!((&a - &r).amax() < 1e-14);
            assert!((&b - &expect_b).amax() < 1e-13);
            let mut a = k.clone();
            let mut b = DMatrix::zeros(m, m);
            relu.block_pair_in_place(&step, &d, &d, &mut a, &mut b, Combine::Overwrite, symmetric);
            assert!((&b - &s).amax() < 1e-15);
            // generic (non-fused) path gives the same
            let erf = PairKernel::new(&call(Fun::Erf), &call(Fun::Erf), 4.0, 1e-10);
            let mut a = k.clone();
            let mut b = DMatrix::zeros(m, m);
            erf.block_pair_in_place(&step, &d, &d, &mut a, &mut b, Combine::Overwrite, symmetric);
            assert!((&b - &s).amax() < 1e-15);
            assert!((&a - &erf.block(&d, &d, &k, true)).amax() < 1e-15);
        }
    }

    /// Timing of the relu hot path on a 4000 x 4000 block. Run with
    /// `cargo test --release --lib bench_relu_block -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_relu_block() {
        use std::time::Instant;
        let m = 4000;
        // 4000 random inputs in 16 dims: distinct points, correlations spread in (-1, 1)
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
        let x = DMatrix::<f64>::from_fn(m, 16, |_, _| rng.sample::<f64, _>(StandardNormal));
        let k = &x * x.transpose() / 16.0;
        let d: Vec<f64> = (0..m).map(|i| k[(i, i)]).collect();
        let relu = PairKernel::new(&call(Fun::Relu), &call(Fun::Relu), 4.0, 1e-10);
        let step = PairKernel::new(&call(Fun::Step), &call(Fun::Step), 4.0, 1e-10);
        let erf = PairKernel::new(&call(Fun::Erf), &call(Fun::Erf), 4.0, 1e-10);
        let per = |t: f64| t / (m * m) as f64 * 1e9;
        // best of 3, after a warm-up that starts the rayon pool and faults the pages in
        let time = |f: &mut dyn FnMut(&mut DMatrix<f64>, &mut DMatrix<f64>)| {
            let mut best = f64::INFINITY;
            for _ in 0..4 {
                let mut a = k.clone();
                let mut b = k.clone();
                let t = Instant::now();
                f(&mut a, &mut b);
                best = best.min(t.elapsed().as_secs_f64());
            }
            best
        };
        for symmetric in [true, false] {
            let e = time(&mut |a, _| relu.block_in_place(&d, &d, a, symmetric));
            println!(
                "relu block symmetric={symmetric}: {e:.3} s, {:.2} ns/entry",
                per(e)
            );
            let e = time(&mut |a, b| {
                relu.block_pair_in_place(&step, &d, &d, a, b, Combine::Multiply, symmetric)
            });
            println!(
                "relu+step fused symmetric={symmetric}: {e:.3} s, {:.2} ns/entry",
                per(e)
            );
            let e = time(&mut |a, _| erf.block_in_place(&d, &d, a, symmetric));
            println!(
                "erf block symmetric={symmetric}: {e:.3} s, {:.2} ns/entry",
                per(e)
            );
        }
        let e = time(&mut |a, _| {
            let n = a.nrows();
            fastmath::mirror_upper_par(a.as_mut_slice(), n)
        });
        println!("mirror alone: {e:.3} s");
        let tanh = PairKernel::new(&call(Fun::Tanh), &call(Fun::Tanh), 4.0, 1e-10);
        let t = Instant::now();
        let mut a = k.clone();
        tanh.block_in_place(&d, &d, &mut a, true);
        let e = t.elapsed().as_secs_f64();
        println!(
            "tanh block ({}, Hermite series) symmetric: {e:.3} s, {:.2} ns/entry",
            tanh.method(),
            per(e)
        );
        println!("threads: {}", rayon::current_num_threads());
    }
}
