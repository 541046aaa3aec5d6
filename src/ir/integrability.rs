//! Does a Gaussian expectation exist? A static analysis of coordinatewise expressions.
//!
//! The Master Theorem (theory.md §1.2) says `(1/n) Σ_a ψ(x_a, ...)` converges to
//! `E ψ(Z^x, ...)` for ψ *pseudo-Lipschitz* (polynomially bounded with a polynomially
//! bounded derivative), and to the same expectation for the wider classes of later
//! versions, all of which need the expectation to exist. When it does not — `E[1/Z]`
//! (undefined), `E[Z^-2]` (= ∞), the Cauchy ratio `E[Z₁/Z₂]`, `E[exp(Z²)]` for a large
//! variance — quadrature still returns a finite number (its nodes avoid the pole), and
//! the finite-width mean over seeds has no limit to converge to. So before any number is
//! computed, this module decides for every expectation the engines take whether it
//! exists, from the expression alone; both engines read the verdict (the limit refuses,
//! the finite executor and `check` warn).
//!
//! The analysis is an abstract interpretation of [`Expr`] over the program's graph.
//! Every vector is a function of *leaves*: `W @ x` products and initial vectors, each a
//! Gaussian with a density (plus, with transposes, Ż terms, theory.md §2.1); moments and
//! scalars are deterministic in the limit. For every expression it tracks a range, the
//! growth of its positive and negative parts at infinity (bounded, polynomial,
//! `exp(c|z|)`, `exp(c z²)`, faster), how fast `1/|f|` grows when `f` never vanishes,
//! and, for functions of one leaf `L`, the order of vanishing at `L = 0`. Then
//!
//! * `a / b` is accepted when `b` provably never vanishes (`1 + Z²`, `exp(Z)`,
//!   `sigmoid(Z)`, a constant), with `1/b` growing at most like `exp(c|z|)`; or when the
//!   only zero of `b` is `L = 0`, of exact order k (`Z`, `Z^k`, `tanh(Z)`), and `a` is a
//!   function of the same `L` vanishing there to order ≥ k: a removable singularity
//!   (`tanh(Z)/Z`, `sin(Z)/Z`, `Z²/Z`). Any other pole lies on a set where the Gaussian
//!   has density, and `∫ |L|^(-k) dL` diverges for k ≥ 1: refused.
//! * Growth up to `exp(c|z|)` has every Gaussian moment. `exp(c z²)` has a mean only
//!   when `c·Var < 1/2`, which depends on the points: refused, as is anything faster.
//!
//! It is sound for what it accepts (each accepted expression is locally bounded with at
//! most `exp(c|z|)` growth, hence in every L^p of the Gaussian), and conservative where
//! it cannot decide (`1/(Z₁² + Z₂² + Z₃²)` exists in 3-D but is refused, with a reason).
//! A leaf whose variance is 0 at some point (an input point of zero) makes even `tanh(Z)/Z`
//! 0/0 there: that is a property of the points, caught by the engines' final check that
//! every reported number is finite.

use std::collections::{HashMap, HashSet};

use super::expr::{Expr, Fun};
use super::{NodeId, Op, Program, Span};
use crate::diag::Diagnostic;

/// The diagnostic code of an expectation that does not exist.
pub const CODE: &str = "E0031";

/// How fast `|f|` can grow as the Gaussians go to infinity. Ordered: a later variant
/// grows faster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Growth {
    Bounded,
    /// `O(|z|^k)`.
    Poly(u32),
    /// `O(exp(c |z|))`: every Gaussian moment exists.
    ExpLin,
    /// `O(exp(c z²))`: a Gaussian mean exists only for small enough variance.
    ExpQuad,
    /// Faster than any `exp(c z²)`: no Gaussian mean.
    Beyond,
}

impl Growth {
    /// Growth of a product.
    fn mul(self, o: Growth) -> Growth {
        use Growth::*;
        match (self, o) {
            (Bounded, g) | (g, Bounded) => g,
            (Poly(i), Poly(j)) => Poly(i.saturating_add(j)),
            (a, b) => a.max(b),
        }
    }
    fn pow(self, k: u32) -> Growth {
        (0..k).fold(Growth::Bounded, |g, _| g.mul(self))
    }
    /// Growth of `exp(h)` from the growth of `h`'s positive part.
    fn exp_of(self) -> Growth {
        use Growth::*;
        match self {
            Bounded => Bounded,
            Poly(0) => Bounded,
            Poly(1) => ExpLin,
            Poly(2) => ExpQuad,
            _ => Beyond,
        }
    }
}

/// Near the zero of a single leaf `L`: how a function of `L` alone behaves.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Single {
    leaf: NodeId,
    /// `|f| ≤ C |L|^order` near `L = 0` (a lower bound on the true order; `u32::MAX`
    /// for the zero function).
    order: u32,
    /// `Some(k)`: `f`'s only zero is `L = 0`, where `|f| ≥ c |L|^k`, and `|f| ≥ c > 0`
    /// for `|L| ≥ 1` (so `1/f` has a pole of order exactly k at 0 and is bounded
    /// elsewhere).
    exact: Option<u32>,
}

/// What the analysis knows about one expression.
#[derive(Clone, Debug)]
struct Info {
    /// `f ∈ [lo, hi]` everywhere (loose bounds; infinite when unknown).
    lo: f64,
    hi: f64,
    /// `f > 0` (`f < 0`) everywhere.
    pos: bool,
    neg: bool,
    /// Growth of `max(f, 0)` and of `max(-f, 0)`.
    up: Growth,
    down: Growth,
    /// `Some(g)`: `f` never vanishes, `1/|f|` is locally bounded and grows like `g`.
    inv: Option<Growth>,
    /// Depends on some Gaussian (false for constants and moments).
    random: bool,
    /// `f` is a function of one leaf only.
    single: Option<Single>,
    /// Why `f` is not locally integrable (a pole, a division by zero), if it is not.
    singular: Option<String>,
}

impl Info {
    fn constant(c: f64) -> Info {
        Info {
            lo: c,
            hi: c,
            pos: c > 0.0,
            neg: c < 0.0,
            up: Growth::Bounded,
            down: Growth::Bounded,
            inv: (c != 0.0).then_some(Growth::Bounded),
            random: false,
            single: None,
            singular: None,
        }
    }

    /// A moment or scalar: a deterministic number in the limit, of unknown value. It is
    /// taken to be nonzero in a denominator: if it is 0 the engines' final check refuses
    /// the non-finite result.
    fn deterministic() -> Info {
        Info {
            lo: f64::NEG_INFINITY,
            hi: f64::INFINITY,
            inv: Some(Growth::Bounded),
            ..Info::constant(1.0)
        }
        .unsigned()
    }

    /// A leaf: a Gaussian `Z` with a density (its only zero is `Z = 0`, of order 1).
    /// `growth` is `Poly(1)` for a Gaussian, more when Ż terms add faster functions.
    fn leaf(id: NodeId, growth: Growth) -> Info {
        Info {
            lo: f64::NEG_INFINITY,
            hi: f64::INFINITY,
            pos: false,
            neg: false,
            up: growth,
            down: growth,
            inv: None,
            random: true,
            single: Some(Single {
                leaf: id,
                order: 1,
                exact: Some(1),
            }),
            singular: None,
        }
    }

    fn unsigned(mut self) -> Info {
        self.pos = false;
        self.neg = false;
        self
    }

    fn abs_growth(&self) -> Growth {
        self.up.max(self.down)
    }

    fn is_zero(&self) -> bool {
        !self.random && self.lo == 0.0 && self.hi == 0.0
    }

    /// The order of vanishing at `leaf = 0` if `self` is a function of that leaf alone
    /// (a constant counts, with order 0 unless it is 0).
    fn order_at(&self, leaf: NodeId) -> Option<u32> {
        if !self.random {
            return Some(if self.is_zero() { u32::MAX } else { 0 });
        }
        self.single.filter(|s| s.leaf == leaf).map(|s| s.order)
    }

    /// `Ok` when every Gaussian moment of `f` exists; else why not.
    fn verdict(&self) -> Result<(), String> {
        if let Some(why) = &self.singular {
            return Err(why.clone());
        }
        match self.abs_growth() {
            Growth::ExpQuad => Err(
                "it grows like exp(c·Z²): its Gaussian expectation exists only when c·Var(Z) < 1/2, \
                 which tpc does not establish"
                    .into(),
            ),
            Growth::Beyond => {
                Err("it grows faster than exp(c·Z²): no Gaussian expectation exists".into())
            }
            _ => Ok(()),
        }
    }
}

/// Both operands' `single`, combined by `f` when they are functions of the same leaf
/// (or one is deterministic).
fn join_single(
    a: &Info,
    b: &Info,
    f: impl Fn(u32, u32, Option<u32>, Option<u32>) -> (u32, Option<u32>),
) -> Option<Single> {
    let (leaf, sa, sb) = match (a.random, b.random) {
        (true, true) => {
            let (sa, sb) = (a.single?, b.single?);
            if sa.leaf != sb.leaf {
                return None;
            }
            (sa.leaf, sa, sb)
        }
        (true, false) => {
            let s = a.single?;
            let c = Single {
                leaf: s.leaf,
                order: b.order_at(s.leaf)?,
                exact: (!b.is_zero()).then_some(0),
            };
            (s.leaf, s, c)
        }
        (false, true) => {
            let s = b.single?;
            let c = Single {
                leaf: s.leaf,
                order: a.order_at(s.leaf)?,
                exact: (!a.is_zero()).then_some(0),
            };
            (s.leaf, c, s)
        }
        (false, false) => return None,
    };
    let (order, exact) = f(sa.order, sb.order, sa.exact, sb.exact);
    Some(Single { leaf, order, exact })
}

/// Interval sum with `∞ − ∞` read as unknown.
fn add_bound(x: f64, y: f64, lower: bool) -> f64 {
    let s = x + y;
    if s.is_nan() {
        if lower {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        }
    } else {
        s
    }
}

fn add(a: &Info, b: &Info) -> Info {
    let lo = add_bound(a.lo, b.lo, true);
    let hi = add_bound(a.hi, b.hi, false);
    let pos = lo > 0.0 || (a.pos && b.lo >= 0.0) || (b.pos && a.lo >= 0.0) || (a.pos && b.pos);
    let neg = hi < 0.0 || (a.neg && b.hi <= 0.0) || (b.neg && a.hi <= 0.0) || (a.neg && b.neg);
    // 1/|a + b| ≤ 1/|a| when b has a's sign (or is 0): the smaller bound wins.
    let inv = if lo > 0.0 || hi < 0.0 {
        Some(Growth::Bounded)
    } else if pos || neg {
        let same = |x: &Info, y: &Info| {
            if pos {
                x.pos && y.lo >= 0.0
            } else {
                x.neg && y.hi <= 0.0
            }
        };
        [(a, b), (b, a)]
            .iter()
            .filter(|(x, y)| same(x, y))
            .filter_map(|(x, _)| x.inv)
            .min()
    } else {
        None
    };
    Info {
        lo,
        hi,
        pos,
        neg,
        up: a.up.max(b.up),
        down: a.down.max(b.down),
        inv: inv.filter(|_| a.singular.is_none() && b.singular.is_none()),
        random: a.random || b.random,
        single: join_single(a, b, |x, y, _, _| (x.min(y), None)),
        singular: a.singular.clone().or_else(|| b.singular.clone()),
    }
}

fn neg(a: &Info) -> Info {
    Info {
        lo: -a.hi,
        hi: -a.lo,
        pos: a.neg,
        neg: a.pos,
        up: a.down,
        down: a.up,
        ..a.clone()
    }
}

/// Interval product. An infinite bound is a limit that is not attained, so `0·∞` at a
/// corner is 0 (extended interval arithmetic).
fn mul_bounds(a: &Info, b: &Info) -> (f64, f64) {
    let m = |x: f64, y: f64| if x == 0.0 || y == 0.0 { 0.0 } else { x * y };
    let c = [m(a.lo, b.lo), m(a.lo, b.hi), m(a.hi, b.lo), m(a.hi, b.hi)];
    (
        c.iter().copied().fold(f64::INFINITY, f64::min),
        c.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}

fn mul(a: &Info, b: &Info) -> Info {
    if a.is_zero() || b.is_zero() {
        return Info::constant(0.0);
    }
    let (lo, hi) = mul_bounds(a, b);
    let g = a.abs_growth().mul(b.abs_growth());
    Info {
        lo,
        hi,
        pos: (a.pos && b.pos) || (a.neg && b.neg),
        neg: (a.pos && b.neg) || (a.neg && b.pos),
        up: if hi <= 0.0 { Growth::Bounded } else { g },
        down: if lo >= 0.0 { Growth::Bounded } else { g },
        inv: match (a.inv, b.inv) {
            (Some(x), Some(y)) => Some(x.mul(y)),
            _ => None,
        },
        random: a.random || b.random,
        single: join_single(a, b, |x, y, ex, ey| {
            (
                x.saturating_add(y),
                ex.zip(ey).map(|(p, q)| p.saturating_add(q)),
            )
        }),
        singular: a.singular.clone().or_else(|| b.singular.clone()),
    }
}

/// `1/b` for a `b` that never vanishes (`b.inv` is `Some`).
fn recip(b: &Info, ib: Growth) -> Info {
    let (lo, hi) = if b.lo > 0.0 || b.hi < 0.0 {
        let (x, y) = (1.0 / b.hi, 1.0 / b.lo);
        (x.min(y), x.max(y))
    } else if b.pos {
        (0.0, f64::INFINITY)
    } else if b.neg {
        (f64::NEG_INFINITY, 0.0)
    } else {
        (f64::NEG_INFINITY, f64::INFINITY)
    };
    Info {
        lo,
        hi,
        pos: b.pos,
        neg: b.neg,
        up: if b.neg { Growth::Bounded } else { ib },
        down: if b.pos { Growth::Bounded } else { ib },
        inv: Some(b.abs_growth()),
        random: b.random,
        single: b.single.map(|s| Single {
            leaf: s.leaf,
            order: 0,
            exact: None,
        }),
        singular: None,
    }
}

fn powi(a: &Info, k: i32, show: &dyn Fn() -> String) -> Info {
    if k < 0 {
        return div(&Info::constant(1.0), &powi(a, -k, show), show);
    }
    let k = k as u32;
    if k == 0 {
        return Info::constant(1.0);
    }
    let even = k.is_multiple_of(2);
    let p = |x: f64| x.powi(k as i32);
    let (lo, hi) = if even {
        let m = a.lo.abs().max(a.hi.abs());
        let lo = if a.lo > 0.0 {
            p(a.lo)
        } else if a.hi < 0.0 {
            p(a.hi)
        } else {
            0.0
        };
        (lo, p(m))
    } else {
        (p(a.lo), p(a.hi))
    };
    Info {
        lo,
        hi,
        pos: if even { a.inv.is_some() } else { a.pos },
        neg: !even && a.neg,
        up: if even {
            a.abs_growth().pow(k)
        } else {
            a.up.pow(k)
        },
        down: if even { Growth::Bounded } else { a.down.pow(k) },
        inv: a.inv.map(|g| g.pow(k)),
        random: a.random,
        single: a.single.map(|s| Single {
            leaf: s.leaf,
            order: s.order.saturating_mul(k),
            exact: s.exact.map(|e| e.saturating_mul(k)),
        }),
        singular: a.singular.clone(),
    }
}

/// `a / b`. `show` renders the quotient for the reason given when it is refused.
fn div(a: &Info, b: &Info, show: &dyn Fn() -> String) -> Info {
    if let Some(why) = &b.singular {
        let mut out = a.clone();
        out.singular = Some(why.clone());
        return out;
    }
    if let Some(ib) = b.inv {
        return mul(a, &recip(b, ib));
    }
    let singular = |why: String| Info {
        random: true,
        singular: a.singular.clone().or(Some(why)),
        ..Info::deterministic()
    };
    if b.is_zero() {
        return singular(format!("`{}` divides by zero", show()));
    }
    if a.is_zero() {
        return Info::constant(0.0);
    }
    // A removable singularity: b's only zero is L = 0, of order k, and a vanishes there
    // to order ≥ k as a function of L alone. Then |a/b| is locally bounded, and for
    // |L| ≥ 1 it is at most C|a|.
    if let Some(Single {
        leaf,
        exact: Some(k),
        ..
    }) = b.single
    {
        match a.order_at(leaf) {
            Some(o) if o >= k => {
                let g = a.abs_growth();
                return Info {
                    lo: f64::NEG_INFINITY,
                    hi: f64::INFINITY,
                    pos: false,
                    neg: false,
                    up: g,
                    down: g,
                    inv: None,
                    random: true,
                    single: Some(Single {
                        leaf,
                        order: o.saturating_sub(k),
                        exact: None,
                    }),
                    singular: a.singular.clone(),
                };
            }
            _ => {
                return singular(format!(
                    "`{}` has a pole of order {k} where a Gaussian vanishes, a set where its density is \
                     positive: ∫|z|^(-{k}) dz diverges near 0, so the expectation does not exist",
                    show()
                ))
            }
        }
    }
    singular(format!(
        "the denominator of `{}` can vanish where the Gaussians have positive density, and tpc cannot \
         show the singularity is integrable",
        show()
    ))
}

fn call(f: Fun, x: &Info) -> Info {
    let bounded = |lo: f64, hi: f64, pos: bool, neg: bool| Info {
        lo,
        hi,
        pos,
        neg,
        up: Growth::Bounded,
        down: Growth::Bounded,
        inv: None,
        random: x.random,
        single: None,
        // A bounded function of a value that is finite almost surely is integrable.
        singular: None,
    };
    let single = |keep_exact: bool| {
        x.single.map(|s| Single {
            leaf: s.leaf,
            order: s.order,
            exact: if keep_exact { s.exact } else { None },
        })
    };
    let order0 = x.single.map(|s| Single {
        leaf: s.leaf,
        order: 0,
        exact: None,
    });
    match f {
        Fun::Id => x.clone(),
        // |tanh(x)| ≥ c·min(|x|, 1): 1/tanh(x) grows like 1/x, and keeps x's zero.
        Fun::Tanh | Fun::Erf => {
            let g = |v: f64| f.eval(v);
            Info {
                inv: x.inv,
                single: single(true),
                ..bounded(g(x.lo).max(-1.0), g(x.hi).min(1.0), x.pos, x.neg)
            }
        }
        Fun::Sin => Info {
            single: single(false),
            ..bounded(-1.0, 1.0, false, false)
        },
        Fun::Cos => Info {
            single: order0,
            ..bounded(-1.0, 1.0, false, false)
        },
        Fun::Step => Info {
            single: order0,
            ..bounded(0.0, 1.0, x.pos, false)
        },
        // 1/sigmoid(x) = 1 + exp(-x).
        Fun::Sigmoid => Info {
            inv: x
                .singular
                .is_none()
                .then_some(x.down.exp_of().max(Growth::Bounded)),
            single: order0,
            ..bounded(
                Fun::Sigmoid.eval(x.lo),
                Fun::Sigmoid.eval(x.hi),
                true,
                false,
            )
        },
        Fun::Relu => Info {
            lo: x.lo.max(0.0),
            hi: x.hi.max(0.0),
            pos: x.pos,
            neg: false,
            up: x.up,
            down: Growth::Bounded,
            inv: if x.pos { x.inv } else { None },
            single: single(false),
            ..x.clone()
        },
        // gelu(x) = x Φ(x) ≥ -0.17, ≤ max(x, 0), ≥ x/2 for x ≥ 0.
        Fun::Gelu => Info {
            lo: if x.lo >= 0.0 { x.lo / 2.0 } else { -0.17 },
            hi: x.hi.max(0.0),
            pos: x.pos,
            neg: false,
            up: x.up,
            down: Growth::Bounded,
            inv: if x.pos { x.inv } else { None },
            single: single(false),
            ..x.clone()
        },
        Fun::Abs => Info {
            lo: if x.lo > 0.0 {
                x.lo
            } else if x.hi < 0.0 {
                -x.hi
            } else {
                0.0
            },
            hi: x.lo.abs().max(x.hi.abs()),
            pos: x.inv.is_some() || x.pos || x.neg,
            neg: false,
            up: x.abs_growth(),
            down: Growth::Bounded,
            ..x.clone()
        },
        Fun::Exp => Info {
            lo: x.lo.exp(),
            hi: x.hi.exp(),
            pos: true,
            neg: false,
            up: x.up.exp_of(),
            down: Growth::Bounded,
            // exp(x) ≥ exp(-|x|) > 0: 1/exp(x) = exp(-x), locally bounded when x is.
            inv: x.singular.is_none().then(|| x.down.exp_of()),
            single: order0,
            ..x.clone()
        },
        // sqrt and log are functions of Netsor+ scalars (the front end refuses them on
        // vectors); on a random argument they are integrable only where it is positive.
        Fun::Sqrt if x.pos || x.lo >= 0.0 => Info {
            lo: x.lo.max(0.0).sqrt(),
            hi: x.hi.sqrt(),
            pos: x.pos,
            neg: false,
            up: x.up,
            down: Growth::Bounded,
            inv: if x.pos { x.inv } else { None },
            single: single(false),
            ..x.clone()
        },
        Fun::Log if x.pos && x.inv.is_some() => Info {
            lo: if x.lo > 0.0 {
                x.lo.ln()
            } else {
                f64::NEG_INFINITY
            },
            hi: x.hi.ln(),
            pos: x.lo >= 1.0,
            neg: x.hi <= 1.0,
            up: x.up,
            down: x.inv.unwrap_or(Growth::Beyond),
            inv: None,
            single: single(false),
            ..x.clone()
        },
        Fun::Sqrt | Fun::Log => Info {
            singular: Some(format!(
                "`{}` of a value that can be negative or zero",
                f.name()
            )),
            ..x.clone()
        },
    }
}

/// The abstract value of `e` given its operands' values.
fn eval(e: &Expr, args: &[Info], show: &dyn Fn(&Expr) -> String) -> Info {
    // A function of moments and constants only is a number in the limit (Netsor+):
    // taken nonzero in a denominator like a moment itself (the engines' final checks
    // refuse a non-finite result).
    if !matches!(e, Expr::Arg(_) | Expr::Const(_)) {
        let mut random = false;
        let mut any = false;
        e.visit_args(&mut |i| {
            any = true;
            random |= args.get(i).is_some_and(|a| a.random);
        });
        if any && !random {
            return Info::deterministic();
        }
    }
    match e {
        Expr::Arg(i) => args[*i].clone(),
        Expr::Const(c) => Info::constant(*c),
        Expr::Call(f, x) => call(*f, &eval(x, args, show)),
        Expr::Neg(x) => neg(&eval(x, args, show)),
        Expr::Add(a, b) => add(&eval(a, args, show), &eval(b, args, show)),
        Expr::Sub(a, b) => add(&eval(a, args, show), &neg(&eval(b, args, show))),
        // A product is read as a product of powers of distinct factors, so that
        // `h * h` and `h * h * h * h` are known to be squares (≥ 0).
        Expr::Mul(..) => {
            let mut factors: Vec<(&Expr, i32)> = Vec::new();
            collect_factors(e, 1, &mut factors);
            factors
                .iter()
                .map(|(f, k)| powi(&eval(f, args, show), *k, &|| show(e)))
                .reduce(|x, y| mul(&x, &y))
                .unwrap_or_else(|| Info::constant(1.0))
        }
        Expr::Div(a, b) => div(&eval(a, args, show), &eval(b, args, show), &|| show(e)),
        Expr::Powi(a, k) => powi(&eval(a, args, show), *k, &|| show(e)),
    }
}

/// The factors of a product tree with their powers, equal factors merged.
fn collect_factors<'e>(e: &'e Expr, k: i32, out: &mut Vec<(&'e Expr, i32)>) {
    match e {
        Expr::Mul(a, b) => {
            collect_factors(a, k, out);
            collect_factors(b, k, out);
        }
        Expr::Powi(a, j) if *j > 0 => collect_factors(a, k.saturating_mul(*j), out),
        _ => match out.iter_mut().find(|(f, _)| *f == e) {
            Some((_, n)) => *n = n.saturating_add(k),
            None => out.push((e, k)),
        },
    }
}

/// `e` with every operand written as the first slot holding the same node, so that
/// equal subexpressions compare equal (`Arg(0) * Arg(1)` over one node is a square).
fn canonical(e: &Expr, ops: &[NodeId]) -> Expr {
    e.substitute(&|i| {
        Expr::Arg(
            ops.get(i)
                .and_then(|n| ops.iter().position(|o| o == n))
                .unwrap_or(i),
        )
    })
}

/// An expectation the limit would take that does not exist.
#[derive(Clone, Debug, PartialEq)]
pub struct NonIntegrable {
    /// The node whose value (a vector read by an expectation, or a moment) is at fault.
    pub node: NodeId,
    pub span: Span,
    /// The node's name.
    pub name: String,
    /// Why the expectation does not exist (or could not be shown to).
    pub reason: String,
}

impl NonIntegrable {
    /// The diagnostic: an error where the limit is refused, a warning for `check` and
    /// finite-width runs (whose mean over seeds then has no limit to converge to).
    pub fn diagnostic(&self, error: bool) -> Diagnostic {
        let message = format!(
            "the Gaussian expectation of `{}` does not exist in the limit",
            self.name
        );
        let label = "the limit takes an expectation of this";
        let d = if error {
            Diagnostic::error(CODE, message, self.span, label)
        } else {
            Diagnostic::warning(CODE, message, self.span, label)
        };
        let d = d.with_note(self.reason.clone());
        if error {
            d.with_help(
                "keep denominators away from 0 (e.g. `1 / (1 + h * h)`) and growth at most exp(c|h|); \
                 `tpc run` still computes finite-width values, but their mean over seeds has no limit",
            )
        } else {
            d.with_help(
                "finite-width means of this value do not converge as the width and the seeds grow; \
                 keep denominators away from 0 (e.g. `1 / (1 + h * h)`) and growth at most exp(c|h|)",
            )
        }
    }
}

/// The abstract value of every vector and scalar node, in topological order.
fn infos(prog: &Program) -> Vec<Info> {
    // Growth of the arguments multiplied by each matrix so far: with transposes, a
    // product's Z carries Ż terms that are multiples of earlier arguments' Z's.
    let mut through: HashMap<NodeId, Growth> = HashMap::new();
    let (mut fwd, mut bwd) = (HashSet::new(), HashSet::new());
    for id in prog.ids() {
        if let Op::MatMul { transpose } = prog.node(id).op {
            let w = prog.operands(id)[0];
            if transpose {
                bwd.insert(w);
            } else {
                fwd.insert(w);
            }
        }
    }
    let mut out: Vec<Info> = Vec::with_capacity(prog.len());
    let names = |id: NodeId| prog.label(id);
    for id in prog.ids() {
        let ops = prog.operands(id);
        let info = match &prog.node(id).op {
            Op::MatMul { .. } => {
                let w = ops[0];
                let arg = out[ops[1].index()].abs_growth();
                let g = through.get(&w).copied().unwrap_or(Growth::Poly(1));
                if fwd.contains(&w) && bwd.contains(&w) {
                    through.insert(w, g.max(arg).max(Growth::Poly(1)));
                }
                Info::leaf(id, g.max(Growth::Poly(1)))
            }
            Op::Param(p) if prog.params[*p].shape == super::Shape::Vector => {
                Info::leaf(id, Growth::Poly(1))
            }
            Op::Nonlin(e) | Op::Moment(e) | Op::Scalar(e) => {
                let args: Vec<Info> = ops.iter().map(|o| out[o.index()].clone()).collect();
                let show = |sub: &Expr| {
                    sub.display(&|i| ops.get(i).map_or("?".into(), |&o| names(o)))
                        .to_string()
                };
                let v = eval(&canonical(e, &ops), &args, &show);
                if matches!(prog.node(id).op, Op::Nonlin(_)) {
                    v
                } else {
                    // A moment is a number in the limit; its own existence is checked
                    // where it is defined.
                    Info::deterministic()
                }
            }
            _ => Info::deterministic(),
        };
        out.push(info);
    }
    out
}

/// Every expectation of the program that does not exist (or that tpc cannot show to
/// exist), one per node: each moment's integrand, and each vector that a matrix
/// multiplies or an output reads out (their second moments are kernel entries). A
/// vector used only inside other coordinatewise functions needs no expectation of its
/// own (`tanh(1/h)` is bounded).
pub fn check(prog: &Program) -> Vec<NonIntegrable> {
    let infos = infos(prog);
    let mut read = vec![false; prog.len()];
    for id in prog.ids() {
        let ops = prog.operands(id);
        match &prog.node(id).op {
            Op::MatMul { .. } => read[ops[1].index()] = true,
            Op::Output { .. } => ops.iter().for_each(|o| read[o.index()] = true),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for id in prog.ids() {
        let ops = prog.operands(id);
        let verdict = match &prog.node(id).op {
            Op::Moment(e) => {
                let args: Vec<Info> = ops.iter().map(|o| infos[o.index()].clone()).collect();
                let show = |sub: &Expr| {
                    sub.display(&|i| ops.get(i).map_or("?".into(), |&o| prog.label(o)))
                        .to_string()
                };
                eval(&canonical(e, &ops), &args, &show).verdict()
            }
            Op::Nonlin(_) if read[id.index()] => infos[id.index()].verdict(),
            _ => Ok(()),
        };
        if let Err(reason) = verdict {
            out.push(NonIntegrable {
                node: id,
                span: prog.node(id).span,
                name: prog.label(id),
                reason,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The verdict on `e`, an expression of independent standard Gaussians `Arg(i)`.
    fn verdict(e: &Expr, k: usize) -> Result<(), String> {
        let args: Vec<Info> = (0..k)
            .map(|i| Info::leaf(NodeId::new(i), Growth::Poly(1)))
            .collect();
        eval(e, &args, &|s| s.display(&|i| format!("z{i}")).to_string()).verdict()
    }

    fn z(i: usize) -> Expr {
        Expr::Arg(i)
    }
    fn c(v: f64) -> Expr {
        Expr::Const(v)
    }

    #[test]
    fn poles_where_a_gaussian_has_density_are_refused() {
        let refused = [
            ("1/z", Expr::div(c(1.0), z(0)), 1),
            ("z^-2", Expr::powi(z(0), -2), 1),
            ("1/z^2", Expr::div(c(1.0), Expr::powi(z(0), 2)), 1),
            ("z0/z1", Expr::div(z(0), z(1)), 2),
            ("1/|z|", Expr::div(c(1.0), Expr::call(Fun::Abs, z(0))), 1),
            ("1/relu", Expr::div(c(1.0), Expr::call(Fun::Relu, z(0))), 1),
            ("1/sin", Expr::div(c(1.0), Expr::call(Fun::Sin, z(0))), 1),
            ("1/cos", Expr::div(c(1.0), Expr::call(Fun::Cos, z(0))), 1),
            ("1/tanh", Expr::div(c(1.0), Expr::call(Fun::Tanh, z(0))), 1),
            ("1/(z0+z1)", Expr::div(c(1.0), Expr::add(z(0), z(1))), 2),
            ("1/(z-1)", Expr::div(c(1.0), Expr::sub(z(0), c(1.0))), 1),
            ("1/0", Expr::Div(Box::new(c(1.0)), Box::new(c(0.0))), 1),
            // tanh(z)/z^2 ~ 1/z: the numerator vanishes to order 1 only.
            (
                "tanh/z^2",
                Expr::div(Expr::call(Fun::Tanh, z(0)), Expr::powi(z(0), 2)),
                1,
            ),
            // Cancellation across leaves is not sought: z1·z0/z0 is refused (conservative).
            ("z1 z0 / z0", Expr::div(Expr::mul(z(1), z(0)), z(0)), 2),
            ("exp(z^2)", Expr::call(Fun::Exp, Expr::powi(z(0), 2)), 1),
            (
                "exp(exp(z))",
                Expr::call(Fun::Exp, Expr::call(Fun::Exp, z(0))),
                1,
            ),
            ("exp(z^3)", Expr::call(Fun::Exp, Expr::powi(z(0), 3)), 1),
            // exp(-z^3) blows up for z → −∞.
            (
                "exp(-z^3)",
                Expr::call(Fun::Exp, Expr::neg(Expr::powi(z(0), 3))),
                1,
            ),
        ];
        for (name, e, k) in refused {
            assert!(verdict(&e, k).is_err(), "{name} should be refused");
        }
    }

    #[test]
    fn well_defined_expectations_are_accepted() {
        let one_plus_sq = Expr::add(c(1.0), Expr::powi(z(0), 2));
        let accepted = [
            ("1/(1+z^2)", Expr::div(c(1.0), one_plus_sq.clone()), 1),
            (
                "z^2/(1+z^2)",
                Expr::div(Expr::powi(z(0), 2), one_plus_sq.clone()),
                1,
            ),
            ("1/exp(z)", Expr::div(c(1.0), Expr::call(Fun::Exp, z(0))), 1),
            (
                "1/sigmoid(z)",
                Expr::div(c(1.0), Expr::call(Fun::Sigmoid, z(0))),
                1,
            ),
            ("tanh(z)/z", Expr::div(Expr::call(Fun::Tanh, z(0)), z(0)), 1),
            ("sin(z)/z", Expr::div(Expr::call(Fun::Sin, z(0)), z(0)), 1),
            ("relu(z)/z", Expr::div(Expr::call(Fun::Relu, z(0)), z(0)), 1),
            (
                "tanh(z)^2/z^2",
                Expr::div(
                    Expr::powi(Expr::call(Fun::Tanh, z(0)), 2),
                    Expr::powi(z(0), 2),
                ),
                1,
            ),
            (
                "sin(z)/tanh(z)",
                Expr::div(Expr::call(Fun::Sin, z(0)), Expr::call(Fun::Tanh, z(0))),
                1,
            ),
            ("z/3", Expr::div(z(0), c(3.0)), 1),
            (
                "1/(1+relu(z0)+z1^2)",
                Expr::div(
                    c(1.0),
                    Expr::add(
                        Expr::add(c(1.0), Expr::call(Fun::Relu, z(0))),
                        Expr::powi(z(1), 2),
                    ),
                ),
                2,
            ),
            ("exp(z)", Expr::call(Fun::Exp, z(0)), 1),
            (
                "exp(-z^2)",
                Expr::call(Fun::Exp, Expr::neg(Expr::powi(z(0), 2))),
                1,
            ),
            (
                "exp(tanh(z) z)",
                Expr::call(Fun::Exp, Expr::mul(Expr::call(Fun::Tanh, z(0)), z(0))),
                1,
            ),
            (
                "z0^5 z1^3",
                Expr::mul(Expr::powi(z(0), 5), Expr::powi(z(1), 3)),
                2,
            ),
            (
                "tanh(1/z)",
                Expr::call(Fun::Tanh, Expr::div(c(1.0), z(0))),
                1,
            ),
            (
                "1/(exp(z0)+exp(z1))",
                Expr::div(
                    c(1.0),
                    Expr::add(Expr::call(Fun::Exp, z(0)), Expr::call(Fun::Exp, z(1))),
                ),
                2,
            ),
        ];
        for (name, e, k) in accepted {
            assert_eq!(verdict(&e, k), Ok(()), "{name} should be accepted");
        }
    }

    /// `h / m` for a moment m (language.md's own advice for normalizing): a number in
    /// the limit, taken to be nonzero (a zero is caught by the final finite check).
    #[test]
    fn division_by_a_moment_is_accepted() {
        let args = [
            Info::leaf(NodeId::new(0), Growth::Poly(1)),
            Info::deterministic(),
        ];
        let e = Expr::div(z(0), z(1));
        let show = |s: &Expr| s.display(&|i| format!("a{i}")).to_string();
        assert_eq!(eval(&e, &args, &show).verdict(), Ok(()));
        // ... but not a Gaussian divided by a moment times a Gaussian.
        let e = Expr::div(z(1), Expr::mul(z(1), z(0)));
        assert!(eval(&e, &args, &show).verdict().is_err());
    }

    #[test]
    fn every_derivative_of_the_library_functions_is_accepted() {
        for f in Fun::ALL {
            let d = f.deriv(z(0));
            assert_eq!(verdict(&d, 1), Ok(()), "{}'", f.name());
        }
    }
}
