//! Exponents Θ(n^e): the [`Ex`] type, its arithmetic, order and printing.

use std::cmp::Ordering;
use std::fmt;

use crate::ir::Rational;

// ---------------------------------------------------------------------------------
// Exponents
// ---------------------------------------------------------------------------------

/// The size of a quantity as n grows: exactly zero, `Θ(n^p)`, or faster than any power.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ex {
    Zero,
    Pow(Rational),
    Inf,
}

impl Ex {
    /// Θ(1).
    pub const ONE: Ex = Ex::Pow(Rational::ZERO);

    pub fn pow(p: Rational) -> Ex {
        Ex::Pow(p)
    }
    pub(super) fn half() -> Ex {
        Ex::Pow(Rational::HALF)
    }
    pub(super) fn n() -> Ex {
        Ex::Pow(Rational::ONE)
    }
    pub(super) fn inv_n() -> Ex {
        Ex::Pow(-Rational::ONE)
    }

    /// The exponent p of Θ(n^p), if the size is a power.
    pub fn exponent(self) -> Option<Rational> {
        match self {
            Ex::Pow(p) => Some(p),
            _ => None,
        }
    }

    /// The size of a product.
    #[allow(clippy::should_implement_trait)]
    pub fn mul(self, o: Ex) -> Ex {
        match (self, o) {
            (Ex::Zero, _) | (_, Ex::Zero) => Ex::Zero,
            (Ex::Inf, _) | (_, Ex::Inf) => Ex::Inf,
            (Ex::Pow(a), Ex::Pow(b)) => Ex::Pow(a + b),
        }
    }

    /// The size of a reciprocal.
    pub fn recip(self) -> Ex {
        match self {
            Ex::Zero => Ex::Inf,
            Ex::Inf => Ex::Zero,
            Ex::Pow(p) => Ex::Pow(-p),
        }
    }

    /// `self^k`.
    pub fn powi(self, k: i32) -> Ex {
        match (self, k.cmp(&0)) {
            (_, Ordering::Equal) => Ex::ONE,
            (Ex::Pow(p), _) => Ex::Pow(p * Rational::int(k as i64)),
            (e, Ordering::Greater) => e,
            (e, Ordering::Less) => e.recip(),
        }
    }

    /// Grows without bound.
    pub fn blows_up(self) -> bool {
        self > Ex::ONE
    }
    /// Goes to zero (or is zero).
    pub fn vanishes(self) -> bool {
        self < Ex::ONE
    }

    /// `Θ(n^(1/2))`, `Θ(1)`, `0`.
    pub fn theta(self) -> String {
        match self {
            Ex::Zero => "0".to_string(),
            Ex::Inf => "more than any power of n".to_string(),
            Ex::Pow(p) => format!("Θ({})", n_pow(p)),
        }
    }
}

/// `1`, `n`, `n^2`, `n^(1/2)`, `n^(-1)`.
pub(super) fn n_pow(p: Rational) -> String {
    if p.is_zero() {
        "1".to_string()
    } else if p == Rational::ONE {
        "n".to_string()
    } else if p.den() == 1 && p.num() > 0 {
        format!("n^{}", p.num())
    } else {
        format!("n^({p})")
    }
}

impl PartialOrd for Ex {
    fn partial_cmp(&self, o: &Ex) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ex {
    fn cmp(&self, o: &Ex) -> Ordering {
        let rank = |e: &Ex| match e {
            Ex::Zero => 0,
            Ex::Pow(_) => 1,
            Ex::Inf => 2,
        };
        match (self, o) {
            (Ex::Pow(a), Ex::Pow(b)) => a.cmp(b),
            _ => rank(self).cmp(&rank(o)),
        }
    }
}

/// The exponent as a table cell: `1/2`, `0`, `-inf` (exactly zero), `inf`.
impl fmt::Display for Ex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ex::Zero => f.write_str("-inf"),
            Ex::Inf => f.write_str("inf"),
            Ex::Pow(p) => write!(f, "{p}"),
        }
    }
}
