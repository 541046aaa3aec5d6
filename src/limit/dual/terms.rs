//! Recognition: a one-argument expression rewritten as a finite sum of atoms
//! (`1, u, step, relu`, `erf(a u)`, the Gaussian-exponential family), with the small
//! complex type the exponential family needs (see the parent module's doc).

use super::*;
// ----------------------------------------------------------------------------------
// A minimal complex type for the Gaussian-exponential family.

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct C64 {
    pub(super) re: f64,
    pub(super) im: f64,
}

impl C64 {
    pub(super) const ZERO: C64 = C64 { re: 0.0, im: 0.0 };
    pub(super) fn new(re: f64, im: f64) -> C64 {
        C64 { re, im }
    }
    pub(super) fn real(re: f64) -> C64 {
        C64 { re, im: 0.0 }
    }
    pub(super) fn add(self, o: C64) -> C64 {
        C64::new(self.re + o.re, self.im + o.im)
    }
    pub(super) fn mul(self, o: C64) -> C64 {
        C64::new(
            self.re * o.re - self.im * o.im,
            self.re * o.im + self.im * o.re,
        )
    }
    pub(super) fn scale(self, k: f64) -> C64 {
        C64::new(self.re * k, self.im * k)
    }
    pub(super) fn conj(self) -> C64 {
        C64::new(self.re, -self.im)
    }
    pub(super) fn exp(self) -> C64 {
        let m = self.re.exp();
        C64::new(m * self.im.cos(), m * self.im.sin())
    }
    pub(super) fn is_real(self) -> bool {
        self.im == 0.0
    }
}

// ----------------------------------------------------------------------------------
// Atoms and recognition

/// A building block whose Gaussian expectations are known.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Atom {
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
    pub(super) fn rank(self) -> u8 {
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
pub(super) type Terms = Vec<(f64, Atom)>;

/// Normal form of a wave: constants become `One`, a real `b` makes `c` real.
pub(super) fn wave(c: C64, alpha: f64, b: C64) -> (f64, Atom) {
    if alpha == 0.0 && b == C64::ZERO {
        return (c.re, Atom::One);
    }
    let c = if b.is_real() { C64::real(c.re) } else { c };
    (1.0, Atom::Wave { c, alpha, b })
}

/// The value of a constant combination, if every atom is `One`.
pub(super) fn const_value(t: &Terms) -> Option<f64> {
    t.iter()
        .try_fold(0.0, |acc, (c, a)| (*a == Atom::One).then_some(acc + c))
}

/// A combination of waves (with constants as waves), for products.
pub(super) fn as_waves(t: &Terms) -> Option<Vec<(C64, f64, C64)>> {
    t.iter()
        .map(|&(k, a)| match a {
            Atom::One => Some((C64::real(k), 0.0, C64::ZERO)),
            Atom::Wave { c, alpha, b } => Some((c.scale(k), alpha, b)),
            _ => None,
        })
        .collect()
}

/// `Re(A) Re(B) = (Re(A B) + Re(A conj B)) / 2` keeps products of waves in the family.
pub(super) fn wave_product(x: &[(C64, f64, C64)], y: &[(C64, f64, C64)]) -> Terms {
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

pub(super) fn scaled(t: Terms, k: f64) -> Terms {
    t.into_iter().map(|(c, a)| (c * k, a)).collect()
}

/// `c0 + c1 u + c2 u^2` if `e` is such a polynomial in `Arg(0)`.
pub(super) fn poly(e: &Expr) -> Option<[f64; 3]> {
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
pub(super) fn recognize(e: &Expr) -> Option<Terms> {
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

pub(super) fn recognize_call(f: Fun, x: &Expr) -> Option<Terms> {
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
