//! Closed-form Gaussian expectations of atoms and of pairs of atom sums: arc-cosine,
//! Stein, Williams, orthant probabilities, Gaussian integrals and exponential tilting
//! (the identities listed in the parent module's doc).

use super::*;
// ----------------------------------------------------------------------------------
// Expectations of atoms

/// Standard normal cdf.
pub(super) fn big_phi(x: f64) -> f64 {
    0.5 * libm::erfc(-x * FRAC_1_SQRT_2)
}

/// `E[e^{b u - alpha u^2}]`, `u ~ N(0, s)`.
pub(super) fn wave_z(alpha: f64, b: C64, s: f64) -> C64 {
    let t = 1.0 + 2.0 * alpha * s;
    b.mul(b).scale(s / (2.0 * t)).exp().scale(1.0 / t.sqrt())
}

/// `E[A(u)]`, `u ~ N(0, s)`, `s > 0`. Always closed.
pub(super) fn atom_mean(a: Atom, s: f64) -> f64 {
    match a {
        Atom::One => 1.0,
        Atom::X | Atom::Erf(_) => 0.0,
        Atom::Step => 0.5,
        Atom::Relu => (s / (2.0 * PI)).sqrt(),
        Atom::Wave { c, alpha, b } => c.mul(wave_z(alpha, b, s)).re,
    }
}

pub(super) fn terms_mean(t: &Terms, s: f64) -> f64 {
    t.iter().map(|&(c, a)| c * atom_mean(a, s)).sum()
}

/// `E[e^{b1 u + b2 v - a1 u^2 - a2 v^2}]` (complex `b`), the Gaussian integral with
/// `D = diag(2 a1, 2 a2)`: `det(I + D Sigma)^{-1/2} exp(b' M b / 2)` with
/// `M = Sigma (I + D Sigma)^{-1}` written out for 2x2 (no `Sigma^{-1}`, so singular
/// `Sigma` is fine).
pub(super) fn gauss_integral(
    a1: f64,
    b1: C64,
    a2: f64,
    b2: C64,
    s11: f64,
    s12: f64,
    s22: f64,
) -> C64 {
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
pub(super) fn tilt(alpha: f64, b: C64, s11: f64, s12: f64, s22: f64) -> (C64, C64, f64) {
    let t = 1.0 + 2.0 * alpha * s22;
    let z = wave_z(alpha, b, s22);
    let m = b.scale(s12 / t);
    let var = (s11 - 2.0 * alpha * s12 * s12 / t).max(0.0);
    (z, m, var)
}

/// `E[A(u) B(v)]` for non-degenerate variances, with the family used; `None` when no
/// closed form is known. Atoms are ordered by rank (the swapped case transposes Sigma).
pub(super) fn atom_pair(a: Atom, b: Atom, s11: f64, s12: f64, s22: f64) -> Option<(f64, Families)> {
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
pub(super) fn arccos1(rho: f64) -> f64 {
    // libm's (fdlibm) acos: same accuracy as the system one, ~25% faster here.
    let th = libm::acos(rho);
    ((1.0 - rho) * (1.0 + rho)).sqrt() + (PI - th) * rho
}

/// `sum_ij c_i d_j E[A_i(u) B_j(v)]` and the families used; `None` if any pair with
/// non-zero weight has no closed form.
pub(super) fn terms_pair(
    f: &Terms,
    g: &Terms,
    s11: f64,
    s12: f64,
    s22: f64,
) -> Option<(f64, Families)> {
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
