//! Parameter laws: how a parameter is sampled, multiplied and trained, as monomials in n.
//!
//! Every `param` is `mult * w` with the trainable entries `w ~ N(0, var)` and learning
//! rate `lr * base_lr`, each a monomial `c * n^p` with rational `p` (language.md,
//! Declarations). The abc exponents of TP4 (theory.md §5.1) are read off the exponents:
//! `a = -p(mult)`, `b = -p(var)/2`, `c = -p(lr)`.

use std::fmt;
use std::ops::{Add, Mul, Neg, Sub};

use super::expr::fmt_num;

/// An exact rational number `num/den`, `den > 0`, in lowest terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rational {
    num: i64,
    den: i64,
}

fn gcd(a: i64, b: i64) -> i64 {
    let (mut a, mut b) = (a.abs(), b.abs());
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Rational {
    pub const ZERO: Rational = Rational { num: 0, den: 1 };
    pub const HALF: Rational = Rational { num: 1, den: 2 };
    pub const ONE: Rational = Rational { num: 1, den: 1 };

    /// `num/den`; `None` when `den == 0` or the parts are too large to keep exact.
    pub fn new(num: i64, den: i64) -> Option<Rational> {
        if den == 0 || num.unsigned_abs() > 1 << 40 || den.unsigned_abs() > 1 << 40 {
            return None;
        }
        let g = gcd(num, den).max(1);
        let s = if den < 0 { -1 } else { 1 };
        Some(Rational {
            num: s * num / g,
            den: s * den / g,
        })
    }

    pub fn int(k: i64) -> Rational {
        Rational::new(k, 1).unwrap_or(Rational::ZERO)
    }

    pub fn num(self) -> i64 {
        self.num
    }
    pub fn den(self) -> i64 {
        self.den
    }
    pub fn to_f64(self) -> f64 {
        self.num as f64 / self.den as f64
    }
    pub fn is_zero(self) -> bool {
        self.num == 0
    }

    /// The rational with denominator at most `max_den` equal to `x` within 1e-12, if any
    /// (used for decimal exponents such as `n^0.5`).
    pub fn approximate(x: f64, max_den: i64) -> Option<Rational> {
        if !x.is_finite() || x.abs() > 1e6 {
            return None;
        }
        (1..=max_den).find_map(|d| {
            let n = (x * d as f64).round();
            ((n / d as f64 - x).abs() < 1e-12)
                .then(|| Rational::new(n as i64, d))
                .flatten()
        })
    }

    fn checked(num: i128, den: i128) -> Rational {
        let g = {
            let (mut a, mut b) = (num.abs(), den.abs());
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a.max(1)
        };
        let s = if den < 0 { -1 } else { 1 };
        Rational {
            num: (s * num / g) as i64,
            den: (s * den / g) as i64,
        }
    }
}

impl Add for Rational {
    type Output = Rational;
    fn add(self, o: Rational) -> Rational {
        Rational::checked(
            self.num as i128 * o.den as i128 + o.num as i128 * self.den as i128,
            self.den as i128 * o.den as i128,
        )
    }
}
impl Sub for Rational {
    type Output = Rational;
    fn sub(self, o: Rational) -> Rational {
        self + (-o)
    }
}
impl Neg for Rational {
    type Output = Rational;
    fn neg(self) -> Rational {
        Rational {
            num: -self.num,
            den: self.den,
        }
    }
}
impl Mul for Rational {
    type Output = Rational;
    fn mul(self, o: Rational) -> Rational {
        Rational::checked(
            self.num as i128 * o.num as i128,
            self.den as i128 * o.den as i128,
        )
    }
}
impl PartialOrd for Rational {
    fn partial_cmp(&self, o: &Rational) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Rational {
    fn cmp(&self, o: &Rational) -> std::cmp::Ordering {
        (self.num as i128 * o.den as i128).cmp(&(o.num as i128 * self.den as i128))
    }
}
impl fmt::Display for Rational {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.den == 1 {
            write!(f, "{}", self.num)
        } else {
            write!(f, "{}/{}", self.num, self.den)
        }
    }
}

/// `coef * n^exp`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Monomial {
    pub coef: f64,
    pub exp: Rational,
}

impl Monomial {
    pub const ONE: Monomial = Monomial {
        coef: 1.0,
        exp: Rational::ZERO,
    };

    pub fn new(coef: f64, exp: Rational) -> Monomial {
        Monomial { coef, exp }
    }
    pub fn constant(coef: f64) -> Monomial {
        Monomial {
            coef,
            exp: Rational::ZERO,
        }
    }
    /// `n^p`.
    pub fn n_pow(p: Rational) -> Monomial {
        Monomial { coef: 1.0, exp: p }
    }
    pub fn powi(self, k: i64) -> Monomial {
        Monomial {
            coef: self.coef.powi(k as i32),
            exp: self.exp * Rational::int(k),
        }
    }
    /// Square root, for `std` from `var`.
    pub fn sqrt(self) -> Monomial {
        Monomial {
            coef: self.coef.sqrt(),
            exp: self.exp * Rational::HALF,
        }
    }
    pub fn recip(self) -> Monomial {
        Monomial {
            coef: 1.0 / self.coef,
            exp: -self.exp,
        }
    }
    /// Value at a concrete width.
    pub fn at(self, n: f64) -> f64 {
        self.coef * n.powf(self.exp.to_f64())
    }
    /// The limit as n -> infinity: the coefficient when the exponent is 0, 0 when it is
    /// negative (or the coefficient is 0), `None` when it diverges.
    pub fn limit(self) -> Option<f64> {
        if self.coef == 0.0 || self.exp < Rational::ZERO {
            Some(0.0)
        } else if self.exp.is_zero() {
            Some(self.coef)
        } else {
            None
        }
    }
}

impl Mul for Monomial {
    type Output = Monomial;
    fn mul(self, o: Monomial) -> Monomial {
        Monomial {
            coef: self.coef * o.coef,
            exp: self.exp + o.exp,
        }
    }
}

impl fmt::Display for Monomial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.exp;
        if p.is_zero() || self.coef == 0.0 {
            return write!(f, "{}", fmt_num(self.coef));
        }
        let np = if p == Rational::ONE {
            "n".to_string()
        } else if p.den() == 1 && p.num() > 0 {
            format!("n^{}", p.num())
        } else {
            format!("n^({p})")
        };
        if self.coef == 1.0 {
            write!(f, "{np}")
        } else {
            write!(f, "{} * {np}", fmt_num(self.coef))
        }
    }
}

/// The law of one parameter: `param = mult * w`, `w ~ N(0, var)`, learning rate `lr`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Law {
    pub var: Monomial,
    pub mult: Monomial,
    pub lr: Monomial,
}

/// TP4's abc exponents of one parameter (theory.md §5.1). `b` is infinite for a
/// zero-initialized parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Abc {
    pub a: Rational,
    pub b: Option<Rational>,
    pub c: Rational,
}

impl Law {
    pub fn abc(&self) -> Abc {
        Abc {
            a: -self.mult.exp,
            b: (self.var.coef != 0.0).then(|| -(self.var.exp * Rational::HALF)),
            c: -self.lr.exp,
        }
    }

    /// Variance of one entry of the parameter itself: `var * mult^2`.
    pub fn entry_var(&self) -> Monomial {
        self.var * self.mult.powi(2)
    }
}

/// Shapes of the language (language.md, Declarations).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shape {
    /// `n x n`
    Hidden,
    /// `n x d`, d finite
    Input(usize),
    /// `1 x n`
    Readout,
    /// `n`
    Vector,
    /// `1`
    Scalar,
}

/// The role of a parameter follows from its shape; presets assign laws by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Input,
    Hidden,
    Output,
    Bias,
    OutputBias,
}

impl Shape {
    pub fn role(self) -> Role {
        match self {
            Shape::Hidden => Role::Hidden,
            Shape::Input(_) => Role::Input,
            Shape::Readout => Role::Output,
            Shape::Vector => Role::Bias,
            Shape::Scalar => Role::OutputBias,
        }
    }
    /// Matrices are `matrix` nodes of the graph; `n` and `1` parameters are `vector` nodes.
    pub fn is_matrix(self) -> bool {
        matches!(self, Shape::Hidden | Shape::Input(_) | Shape::Readout)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shape::Hidden => write!(f, "n x n"),
            Shape::Input(d) => write!(f, "n x {d}"),
            Shape::Readout => write!(f, "1 x n"),
            Shape::Vector => write!(f, "n"),
            Shape::Scalar => write!(f, "1"),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Input => "input",
            Role::Hidden => "hidden",
            Role::Output => "output",
            Role::Bias => "bias",
            Role::OutputBias => "output bias",
        })
    }
}

/// `parameterization` presets (language.md, Presets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    Sp,
    Ntk,
    Mup,
}

impl Preset {
    pub const ALL: [Preset; 3] = [Preset::Sp, Preset::Ntk, Preset::Mup];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Sp => "sp",
            Preset::Ntk => "ntk",
            Preset::Mup => "mup",
        }
    }

    pub fn from_name(s: &str) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| p.name() == s)
    }

    /// The exact explicit law of the preset table for a parameter of `shape` with
    /// constant `std` = s and constant learning-rate factor `lr`, under SGD-like
    /// optimizers (language.md, Presets).
    pub fn law(self, shape: Shape, s: f64, lr: f64) -> Law {
        self.law_for(shape, s, lr, false)
    }

    /// The preset's law when the `train` block's optimizer is entrywise (`adam`,
    /// `adamw`) if `entrywise`. Only muP changes: an Adam step moves every entry by
    /// Θ(lr) whatever the gradient's size, so muP's learning rates become Tensor
    /// Programs V's Adam column (Table 3): input weights and biases Θ(1), hidden and
    /// readout matrices Θ(1/n), with the same initialization (theory.md §5.2 for the
    /// SGD column).
    pub fn law_for(self, shape: Shape, s: f64, lr: f64, entrywise: bool) -> Law {
        let n = |p: i64, q: i64| Monomial::n_pow(Rational::new(p, q).unwrap_or(Rational::ZERO));
        let c = Monomial::constant;
        let fan_in = |d: usize| c(1.0 / d as f64);
        let (var, mult, lrm) = match (self, shape) {
            (Preset::Ntk, Shape::Input(d)) => (c(1.0), c(s / (d as f64).sqrt()), c(1.0)),
            (Preset::Ntk, Shape::Hidden | Shape::Readout) => (c(1.0), c(s) * n(-1, 2), c(1.0)),
            (Preset::Ntk, Shape::Vector | Shape::Scalar) => (c(1.0), c(s), c(1.0)),
            (Preset::Sp, Shape::Input(d)) => (c(s * s) * fan_in(d), c(1.0), c(1.0)),
            (Preset::Sp, Shape::Hidden | Shape::Readout) => (c(s * s) * n(-1, 1), c(1.0), c(1.0)),
            (Preset::Sp, Shape::Vector | Shape::Scalar) => (c(s * s), c(1.0), c(1.0)),
            (Preset::Mup, Shape::Input(d)) if entrywise => (c(s * s) * fan_in(d), c(1.0), c(1.0)),
            (Preset::Mup, Shape::Hidden) if entrywise => (c(s * s) * n(-1, 1), c(1.0), n(-1, 1)),
            (Preset::Mup, Shape::Vector) if entrywise => (c(s * s), c(1.0), c(1.0)),
            (Preset::Mup, Shape::Input(d)) => (c(s * s) * fan_in(d), c(1.0), n(1, 1)),
            (Preset::Mup, Shape::Hidden) => (c(s * s) * n(-1, 1), c(1.0), c(1.0)),
            (Preset::Mup, Shape::Readout) => (c(s * s) * n(-2, 1), c(1.0), n(-1, 1)),
            (Preset::Mup, Shape::Vector) => (c(s * s), c(1.0), n(1, 1)),
            (Preset::Mup, Shape::Scalar) => (c(s * s), c(1.0), c(1.0)),
        };
        Law {
            var,
            mult,
            lr: lrm * c(lr),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(p: i64, q: i64) -> Rational {
        Rational::new(p, q).unwrap()
    }

    #[test]
    fn rationals_reduce_and_order() {
        assert_eq!(r(2, -4), r(-1, 2));
        assert!(r(-1, 2) < Rational::ZERO);
        assert_eq!(r(1, 2) + r(1, 3), r(5, 6));
        assert_eq!(Rational::approximate(0.5, 100), Some(r(1, 2)));
        assert_eq!(Rational::approximate(0.333, 100), None);
        assert!(Rational::new(1, 0).is_none());
    }

    #[test]
    fn abc_of_the_named_parameterizations() {
        // muP (SGD, language.md table) has TP4's exponents up to the abc symmetry.
        let h = Preset::Mup.law(Shape::Hidden, 1.0, 1.0).abc();
        assert_eq!(
            (h.a, h.b, h.c),
            (Rational::ZERO, Some(r(1, 2)), Rational::ZERO)
        );
        let o = Preset::Mup.law(Shape::Readout, 1.0, 1.0).abc();
        assert_eq!(
            (o.a, o.b, o.c),
            (Rational::ZERO, Some(Rational::ONE), Rational::ONE)
        );
        let i = Preset::Mup.law(Shape::Input(3), 1.0, 1.0).abc();
        assert_eq!(
            (i.a, i.b, i.c),
            (Rational::ZERO, Some(Rational::ZERO), r(-1, 1))
        );
        let ntk = Preset::Ntk.law(Shape::Hidden, 1.5, 1.0);
        assert_eq!(ntk.abc().a, r(1, 2));
        assert!((ntk.entry_var().coef - 2.25).abs() < 1e-15);
        assert_eq!(ntk.entry_var().exp, r(-1, 1));
    }

    #[test]
    fn monomials_display_like_the_language() {
        assert_eq!(Monomial::n_pow(r(-1, 2)).to_string(), "n^(-1/2)");
        assert_eq!(
            (Monomial::constant(2.25) * Monomial::n_pow(r(-1, 1))).to_string(),
            "2.25 * n^(-1)"
        );
        assert_eq!(Monomial::constant(0.5).to_string(), "0.5");
        assert_eq!(Monomial::n_pow(Rational::ONE).to_string(), "n");
        assert_eq!(Monomial::n_pow(r(-1, 1)).limit(), Some(0.0));
        assert_eq!(Monomial::n_pow(r(1, 2)).limit(), None);
    }
}
