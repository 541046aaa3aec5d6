//! Coordinatewise functions: the body of a `Nonlin` or `Moment` instruction.
//!
//! A Tensor Program applies a function coordinatewise to several width-n vectors
//! (and deterministic scalars, Netsor+). tpc fuses a whole right-hand side such as
//! `tanh(W @ h + U @ x + b)` into one [`Expr`] over numbered operands, so the IR stays
//! close to the paper's `h := phi(g^1, ..., g^k)` (theory.md §1.1).
//!
//! Adding a nonlinearity is one local change: a variant of [`Fun`], its name, its value
//! and its derivative (written with existing functions, so that the backward program and
//! the Ż coefficients of theory.md §2.1 stay inside this language). Closed-form Gaussian
//! kernels, if any, live in `limit::dual`.

use std::fmt;

/// A scalar function of one real argument, applied coordinatewise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fun {
    Relu,
    Tanh,
    Erf,
    Gelu,
    Sigmoid,
    Sin,
    Cos,
    Step,
    Id,
    Exp,
    Abs,
    /// sqrt and log: functions of Netsor+ scalars only (moments and their functions);
    /// the front end refuses them on width-n vectors, so no Gaussian expectation of
    /// them is ever taken (README, "Scalars and reductions").
    Sqrt,
    Log,
}

impl Fun {
    /// Every function, in the order the language reference lists them.
    pub const ALL: [Fun; 11] = [
        Fun::Relu,
        Fun::Tanh,
        Fun::Erf,
        Fun::Gelu,
        Fun::Sigmoid,
        Fun::Sin,
        Fun::Cos,
        Fun::Step,
        Fun::Id,
        Fun::Exp,
        Fun::Abs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fun::Relu => "relu",
            Fun::Tanh => "tanh",
            Fun::Erf => "erf",
            Fun::Gelu => "gelu",
            Fun::Sigmoid => "sigmoid",
            Fun::Sin => "sin",
            Fun::Cos => "cos",
            Fun::Step => "step",
            Fun::Id => "id",
            Fun::Exp => "exp",
            Fun::Abs => "abs",
            Fun::Sqrt => "sqrt",
            Fun::Log => "log",
        }
    }

    pub fn from_name(name: &str) -> Option<Fun> {
        Fun::ALL.iter().copied().find(|f| f.name() == name)
    }

    /// The functions of scalars only (not applied coordinatewise to width-n vectors).
    pub const SCALAR: [Fun; 2] = [Fun::Sqrt, Fun::Log];

    /// A scalar-only function by name.
    pub fn scalar_from_name(name: &str) -> Option<Fun> {
        Fun::SCALAR.iter().copied().find(|f| f.name() == name)
    }

    /// phi(x).
    #[inline]
    pub fn eval(self, x: f64) -> f64 {
        match self {
            // NaN passes through (`f64::max` would swallow it into 0, and a run whose
            // values overflowed would then print a clean 0).
            Fun::Relu => {
                if x > 0.0 || x.is_nan() {
                    x
                } else {
                    0.0
                }
            }
            Fun::Tanh => x.tanh(),
            Fun::Erf => libm::erf(x),
            // gelu(x) = x Phi(x), exact (not the tanh approximation).
            Fun::Gelu => x * 0.5 * libm::erfc(-x * std::f64::consts::FRAC_1_SQRT_2),
            Fun::Sigmoid => {
                if x >= 0.0 {
                    1.0 / (1.0 + (-x).exp())
                } else {
                    let e = x.exp();
                    e / (1.0 + e)
                }
            }
            Fun::Sin => x.sin(),
            Fun::Cos => x.cos(),
            Fun::Step => {
                if x > 0.0 {
                    1.0
                } else if x.is_nan() {
                    x
                } else {
                    0.0
                }
            }
            Fun::Id => x,
            Fun::Exp => x.exp(),
            Fun::Abs => x.abs(),
            Fun::Sqrt => x.sqrt(),
            Fun::Log => x.ln(),
        }
    }

    /// phi'(x) as an expression in `x`, built from functions of this module, so that
    /// derivatives of derivatives (training, Ż coefficients) need nothing new.
    /// Kinks take the one-sided value the finite executor uses: relu'(0) = step(0) = 0.
    pub fn deriv(self, x: Expr) -> Expr {
        use std::f64::consts::PI;
        match self {
            Fun::Relu => Expr::call(Fun::Step, x),
            // tanh' = 1 - tanh^2
            Fun::Tanh => Expr::sub(Expr::Const(1.0), Expr::powi(Expr::call(Fun::Tanh, x), 2)),
            // erf'(x) = 2/sqrt(pi) exp(-x^2)
            Fun::Erf => Expr::mul(
                Expr::Const(2.0 / PI.sqrt()),
                Expr::call(Fun::Exp, Expr::neg(Expr::powi(x, 2))),
            ),
            // gelu'(x) = Phi(x) + x phi(x),  Phi(x) = (1 + erf(x/sqrt 2))/2
            Fun::Gelu => {
                let cdf = Expr::add(
                    Expr::Const(0.5),
                    Expr::mul(
                        Expr::Const(0.5),
                        Expr::call(
                            Fun::Erf,
                            Expr::mul(Expr::Const(std::f64::consts::FRAC_1_SQRT_2), x.clone()),
                        ),
                    ),
                );
                let pdf = Expr::mul(
                    Expr::Const(1.0 / (2.0 * PI).sqrt()),
                    Expr::call(
                        Fun::Exp,
                        Expr::mul(Expr::Const(-0.5), Expr::powi(x.clone(), 2)),
                    ),
                );
                Expr::add(cdf, Expr::mul(x, pdf))
            }
            // sigmoid' = s (1 - s)
            Fun::Sigmoid => {
                let s = Expr::call(Fun::Sigmoid, x);
                Expr::mul(s.clone(), Expr::sub(Expr::Const(1.0), s))
            }
            Fun::Sin => Expr::call(Fun::Cos, x),
            Fun::Cos => Expr::neg(Expr::call(Fun::Sin, x)),
            // step' = 0 away from the jump; the jump's delta is invisible coordinatewise.
            Fun::Step => Expr::Const(0.0),
            Fun::Id => Expr::Const(1.0),
            Fun::Exp => Expr::call(Fun::Exp, x),
            // abs' = sign = 2 step(x) - 1 (with abs'(0) = -1, measure zero)
            Fun::Abs => Expr::sub(
                Expr::mul(Expr::Const(2.0), Expr::call(Fun::Step, x)),
                Expr::Const(1.0),
            ),
            // sqrt'(x) = 1 / (2 sqrt(x))
            Fun::Sqrt => Expr::div(Expr::Const(0.5), Expr::call(Fun::Sqrt, x)),
            // log'(x) = 1 / x
            Fun::Log => Expr::div(Expr::Const(1.0), x),
        }
    }

    /// Smooth (analytic) functions take Gauss–Hermite quadrature well; kinked ones
    /// (relu, step, abs) do not (theory.md §3.3) and need closed forms.
    pub fn is_smooth(self) -> bool {
        !matches!(self, Fun::Relu | Fun::Step | Fun::Abs)
    }

    /// phi(0) = 0 and phi is positively homogeneous of degree 1 or linear: scaling the
    /// argument scales the value (used by the exponent analysis).
    pub fn is_homogeneous(self) -> bool {
        matches!(self, Fun::Relu | Fun::Id | Fun::Abs)
    }
}

/// A coordinatewise expression over the operands of one instruction.
///
/// `Arg(i)` is the i-th operand of the instruction (a width-n vector, or a scalar
/// moment broadcast to every coordinate).
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Arg(usize),
    Const(f64),
    Call(Fun, Box<Expr>),
    Neg(Box<Expr>),
    Add(Box<Expr>, Box<Expr>),
    Sub(Box<Expr>, Box<Expr>),
    Mul(Box<Expr>, Box<Expr>),
    Div(Box<Expr>, Box<Expr>),
    Powi(Box<Expr>, i32),
}

/// An operand of a coordinatewise expression evaluated over a run of coordinates
/// ([`Expr::eval_run`]): a vector (indexed by coordinate) or one number for all.
#[derive(Clone, Copy, Debug)]
pub enum Operand<'a> {
    Column(&'a [f64]),
    Scalar(f64),
}

// Smart constructors, named like the operations they build (not operator impls:
// they fold constants as they go).
#[allow(clippy::should_implement_trait, clippy::redundant_guards)]
impl Expr {
    pub fn call(f: Fun, x: Expr) -> Expr {
        Expr::Call(f, Box::new(x))
    }
    pub fn neg(x: Expr) -> Expr {
        match x {
            Expr::Const(c) => Expr::Const(-c),
            Expr::Neg(y) => *y,
            x => Expr::Neg(Box::new(x)),
        }
    }
    pub fn add(a: Expr, b: Expr) -> Expr {
        match (a, b) {
            (Expr::Const(x), Expr::Const(y)) => Expr::Const(x + y),
            (Expr::Const(z), e) | (e, Expr::Const(z)) if z == 0.0 => e,
            (a, b) => Expr::Add(Box::new(a), Box::new(b)),
        }
    }
    pub fn sub(a: Expr, b: Expr) -> Expr {
        match (a, b) {
            (Expr::Const(x), Expr::Const(y)) => Expr::Const(x - y),
            (e, Expr::Const(z)) if z == 0.0 => e,
            (Expr::Const(z), e) if z == 0.0 => Expr::neg(e),
            (a, b) => Expr::Sub(Box::new(a), Box::new(b)),
        }
    }
    pub fn mul(a: Expr, b: Expr) -> Expr {
        match (a, b) {
            (Expr::Const(x), Expr::Const(y)) => Expr::Const(x * y),
            (Expr::Const(z), _) | (_, Expr::Const(z)) if z == 0.0 => Expr::Const(0.0),
            (Expr::Const(o), e) | (e, Expr::Const(o)) if o == 1.0 => e,
            (a, b) => Expr::Mul(Box::new(a), Box::new(b)),
        }
    }
    pub fn div(a: Expr, b: Expr) -> Expr {
        match (a, b) {
            (Expr::Const(x), Expr::Const(y)) if y != 0.0 => Expr::Const(x / y),
            (e, Expr::Const(o)) if o == 1.0 => e,
            (a, b) => Expr::Div(Box::new(a), Box::new(b)),
        }
    }
    pub fn powi(a: Expr, k: i32) -> Expr {
        match (a, k) {
            (_, 0) => Expr::Const(1.0),
            (a, 1) => a,
            (Expr::Const(c), k) => Expr::Const(c.powi(k)),
            (a, k) => Expr::Powi(Box::new(a), k),
        }
    }

    /// Value at one coordinate, given the operands' values there.
    pub fn eval(&self, args: &[f64]) -> f64 {
        match self {
            Expr::Arg(i) => args[*i],
            Expr::Const(c) => *c,
            Expr::Call(f, x) => f.eval(x.eval(args)),
            Expr::Neg(x) => -x.eval(args),
            Expr::Add(a, b) => a.eval(args) + b.eval(args),
            Expr::Sub(a, b) => a.eval(args) - b.eval(args),
            Expr::Mul(a, b) => a.eval(args) * b.eval(args),
            Expr::Div(a, b) => a.eval(args) / b.eval(args),
            Expr::Powi(a, k) => a.eval(args).powi(*k),
        }
    }

    /// The partial derivative with respect to operand `i`, symbolically.
    pub fn diff(&self, i: usize) -> Expr {
        match self {
            Expr::Arg(j) => Expr::Const(if *j == i { 1.0 } else { 0.0 }),
            Expr::Const(_) => Expr::Const(0.0),
            Expr::Call(f, x) => Expr::mul(f.deriv((**x).clone()), x.diff(i)),
            Expr::Neg(x) => Expr::neg(x.diff(i)),
            Expr::Add(a, b) => Expr::add(a.diff(i), b.diff(i)),
            Expr::Sub(a, b) => Expr::sub(a.diff(i), b.diff(i)),
            Expr::Mul(a, b) => Expr::add(
                Expr::mul(a.diff(i), (**b).clone()),
                Expr::mul((**a).clone(), b.diff(i)),
            ),
            Expr::Div(a, b) => Expr::div(
                Expr::sub(
                    Expr::mul(a.diff(i), (**b).clone()),
                    Expr::mul((**a).clone(), b.diff(i)),
                ),
                Expr::powi((**b).clone(), 2),
            ),
            Expr::Powi(a, k) => Expr::mul(
                Expr::mul(Expr::Const(*k as f64), Expr::powi((**a).clone(), k - 1)),
                a.diff(i),
            ),
        }
    }

    /// Does operand `i` appear?
    pub fn uses(&self, i: usize) -> bool {
        let mut found = false;
        self.visit_args(&mut |j| found |= j == i);
        found
    }

    /// Calls `f` on every operand index, in order of appearance (with repeats).
    pub fn visit_args(&self, f: &mut dyn FnMut(usize)) {
        match self {
            Expr::Arg(j) => f(*j),
            Expr::Const(_) => {}
            Expr::Call(_, x) | Expr::Neg(x) | Expr::Powi(x, _) => x.visit_args(f),
            Expr::Add(a, b) | Expr::Sub(a, b) | Expr::Mul(a, b) | Expr::Div(a, b) => {
                a.visit_args(f);
                b.visit_args(f)
            }
        }
    }

    /// Every function called anywhere in the expression.
    pub fn visit_funs(&self, f: &mut dyn FnMut(Fun)) {
        match self {
            Expr::Arg(_) | Expr::Const(_) => {}
            Expr::Call(g, x) => {
                f(*g);
                x.visit_funs(f)
            }
            Expr::Neg(x) | Expr::Powi(x, _) => x.visit_funs(f),
            Expr::Add(a, b) | Expr::Sub(a, b) | Expr::Mul(a, b) | Expr::Div(a, b) => {
                a.visit_funs(f);
                b.visit_funs(f)
            }
        }
    }

    /// `self` at coordinates `lo..lo + out.len()` of its operands, one expression node
    /// at a time over the whole run instead of the whole tree per coordinate (both
    /// interpreters evaluate Nonlins this way, on runs short enough that the
    /// temporaries stay in L1). Each coordinate sees the operations of [`Expr::eval`]
    /// in the same order, so the bits are the same.
    pub fn eval_run(&self, args: &[Operand<'_>], lo: usize, out: &mut [f64]) {
        let binary = |a: &Expr, b: &Expr, out: &mut [f64], f: fn(f64, f64) -> f64| {
            a.eval_run(args, lo, out);
            let mut rhs = vec![0.0; out.len()];
            b.eval_run(args, lo, &mut rhs);
            for (o, y) in out.iter_mut().zip(&rhs) {
                *o = f(*o, *y);
            }
        };
        let unary = |x: &Expr, out: &mut [f64], f: &dyn Fn(f64) -> f64| {
            x.eval_run(args, lo, out);
            for o in out.iter_mut() {
                *o = f(*o);
            }
        };
        match self {
            Expr::Arg(i) => match args[*i] {
                Operand::Column(v) => out.copy_from_slice(&v[lo..lo + out.len()]),
                Operand::Scalar(s) => out.fill(s),
            },
            Expr::Const(c) => out.fill(*c),
            Expr::Call(f, x) => unary(x, out, &|v| f.eval(v)),
            Expr::Neg(x) => unary(x, out, &|v| -v),
            // x.powi(2) is x * x bit for bit (repeated squaring), without the libcall
            Expr::Powi(x, 2) => unary(x, out, &|v| v * v),
            Expr::Powi(x, k) => unary(x, out, &|v| v.powi(*k)),
            Expr::Add(a, b) => binary(a, b, out, |x, y| x + y),
            Expr::Sub(a, b) => binary(a, b, out, |x, y| x - y),
            Expr::Mul(a, b) => binary(a, b, out, |x, y| x * y),
            Expr::Div(a, b) => binary(a, b, out, |x, y| x / y),
        }
    }

    /// `self` with every subexpression that reads only scalar operands (`scalar(i)` is
    /// `Some`) and constants replaced by its value: a function of Netsor+ scalars
    /// (softmax weights, a layernorm's `rsqrt`) is then computed once per point instead
    /// of at every coordinate. Values are bit for bit those of [`Expr::eval_run`]: the
    /// same operations in the same order, and the rest is rebuilt without simplifying.
    pub fn fold_scalars(&self, scalar: &dyn Fn(usize) -> Option<f64>) -> Expr {
        self.fold(scalar).0
    }

    fn fold(&self, scalar: &dyn Fn(usize) -> Option<f64>) -> (Expr, Option<f64>) {
        let done = |v: f64| (Expr::Const(v), Some(v));
        let unary = |x: &Expr, f: &dyn Fn(f64) -> f64, make: &dyn Fn(Box<Expr>) -> Expr| match x
            .fold(scalar)
        {
            (_, Some(v)) => done(f(v)),
            (e, None) => (make(Box::new(e)), None),
        };
        let binary =
            |a: &Expr, b: &Expr, f: fn(f64, f64) -> f64, make: fn(Box<Expr>, Box<Expr>) -> Expr| {
                let (ea, va) = a.fold(scalar);
                let (eb, vb) = b.fold(scalar);
                match (va, vb) {
                    (Some(x), Some(y)) => done(f(x, y)),
                    _ => (make(Box::new(ea), Box::new(eb)), None),
                }
            };
        match self {
            Expr::Arg(i) => match scalar(*i) {
                Some(v) => done(v),
                None => (Expr::Arg(*i), None),
            },
            Expr::Const(c) => done(*c),
            Expr::Call(f, x) => unary(x, &|v| f.eval(v), &|e| Expr::Call(*f, e)),
            Expr::Neg(x) => unary(x, &|v| -v, &Expr::Neg),
            Expr::Powi(x, k) => unary(x, &|v| v.powi(*k), &|e| Expr::Powi(e, *k)),
            Expr::Add(a, b) => binary(a, b, |x, y| x + y, Expr::Add),
            Expr::Sub(a, b) => binary(a, b, |x, y| x - y, Expr::Sub),
            Expr::Mul(a, b) => binary(a, b, |x, y| x * y, Expr::Mul),
            Expr::Div(a, b) => binary(a, b, |x, y| x / y, Expr::Div),
        }
    }

    /// Every subexpression equal to `target` replaced by `with`, the rest rebuilt as
    /// it is (no folding, so what is left evaluates bit for bit as before). The finite
    /// executor uses it so that tanh' = 1 − tanh² reads the forward value of the
    /// Nonlin instead of computing tanh again.
    pub fn replace(&self, target: &Expr, with: &Expr) -> Expr {
        if self == target {
            return with.clone();
        }
        let r = |x: &Expr| Box::new(x.replace(target, with));
        match self {
            Expr::Arg(_) | Expr::Const(_) => self.clone(),
            Expr::Call(f, x) => Expr::Call(*f, r(x)),
            Expr::Neg(x) => Expr::Neg(r(x)),
            Expr::Add(a, b) => Expr::Add(r(a), r(b)),
            Expr::Sub(a, b) => Expr::Sub(r(a), r(b)),
            Expr::Mul(a, b) => Expr::Mul(r(a), r(b)),
            Expr::Div(a, b) => Expr::Div(r(a), r(b)),
            Expr::Powi(a, k) => Expr::Powi(r(a), *k),
        }
    }

    /// Replace every `Arg(i)` by `sub(i)`.
    pub fn substitute(&self, sub: &dyn Fn(usize) -> Expr) -> Expr {
        match self {
            Expr::Arg(j) => sub(*j),
            Expr::Const(c) => Expr::Const(*c),
            Expr::Call(f, x) => Expr::call(*f, x.substitute(sub)),
            Expr::Neg(x) => Expr::neg(x.substitute(sub)),
            Expr::Add(a, b) => Expr::add(a.substitute(sub), b.substitute(sub)),
            Expr::Sub(a, b) => Expr::sub(a.substitute(sub), b.substitute(sub)),
            Expr::Mul(a, b) => Expr::mul(a.substitute(sub), b.substitute(sub)),
            Expr::Div(a, b) => Expr::div(a.substitute(sub), b.substitute(sub)),
            Expr::Powi(a, k) => Expr::powi(a.substitute(sub), *k),
        }
    }

    /// Is the expression affine in its operands (a LinComb in the paper's terms)?
    pub fn is_affine(&self) -> bool {
        match self {
            Expr::Arg(_) | Expr::Const(_) => true,
            Expr::Call(Fun::Id, x) | Expr::Neg(x) => x.is_affine(),
            Expr::Call(..) | Expr::Powi(..) => self.is_constant(),
            Expr::Add(a, b) | Expr::Sub(a, b) => a.is_affine() && b.is_affine(),
            Expr::Mul(a, b) => {
                (a.is_constant() && b.is_affine()) || (b.is_constant() && a.is_affine())
            }
            Expr::Div(a, b) => a.is_affine() && b.is_constant(),
        }
    }

    /// No operand appears.
    pub fn is_constant(&self) -> bool {
        let mut any = false;
        self.visit_args(&mut |_| any = true);
        !any
    }

    /// Writes the expression with operand `i` printed by `arg(i)`.
    pub fn display<'a>(&'a self, arg: &'a dyn Fn(usize) -> String) -> ExprDisplay<'a> {
        ExprDisplay { expr: self, arg }
    }

    fn precedence(&self) -> u8 {
        match self {
            Expr::Add(..) | Expr::Sub(..) => 1,
            Expr::Mul(..) | Expr::Div(..) => 2,
            Expr::Neg(..) => 3,
            Expr::Powi(..) => 4,
            Expr::Const(c) if *c < 0.0 => 3,
            Expr::Arg(_) | Expr::Const(_) | Expr::Call(..) => 5,
        }
    }
}

/// Formatting helper returned by [`Expr::display`].
pub struct ExprDisplay<'a> {
    expr: &'a Expr,
    arg: &'a dyn Fn(usize) -> String,
}

impl fmt::Display for ExprDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_expr(self.expr, self.arg, f)
    }
}

/// Shortest decimal that reads back as the same f64, in scientific notation (which
/// the language reads too) when plain digits would be long: `1e300`, not 301 digits.
pub fn fmt_num(c: f64) -> String {
    if c.is_finite() && c == c.trunc() && c.abs() < 1e15 {
        format!("{}", c as i64)
    } else if c.is_finite() && c != 0.0 && (c.abs() >= 1e15 || c.abs() < 1e-5) {
        format!("{c:e}")
    } else {
        format!("{c}")
    }
}

fn write_expr(e: &Expr, arg: &dyn Fn(usize) -> String, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let sub = |x: &Expr, min: u8, f: &mut fmt::Formatter<'_>| -> fmt::Result {
        if x.precedence() < min {
            write!(f, "(")?;
            write_expr(x, arg, f)?;
            write!(f, ")")
        } else {
            write_expr(x, arg, f)
        }
    };
    match e {
        Expr::Arg(i) => write!(f, "{}", arg(*i)),
        Expr::Const(c) => write!(f, "{}", fmt_num(*c)),
        Expr::Call(g, x) => {
            write!(f, "{}(", g.name())?;
            write_expr(x, arg, f)?;
            write!(f, ")")
        }
        Expr::Neg(x) => {
            write!(f, "-")?;
            sub(x, 4, f)
        }
        Expr::Add(a, b) => {
            sub(a, 1, f)?;
            write!(f, " + ")?;
            sub(b, 2, f)
        }
        Expr::Sub(a, b) => {
            sub(a, 1, f)?;
            write!(f, " - ")?;
            sub(b, 2, f)
        }
        Expr::Mul(a, b) => {
            sub(a, 2, f)?;
            write!(f, " * ")?;
            sub(b, 3, f)
        }
        Expr::Div(a, b) => {
            sub(a, 2, f)?;
            write!(f, " / ")?;
            sub(b, 3, f)
        }
        Expr::Powi(a, k) => {
            sub(a, 5, f)?;
            if *k < 0 {
                write!(f, "^({k})")
            } else {
                write!(f, "^{k}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// relu and its derivative pass NaN through: `f64::max` swallowed it into 0, so a
    /// run whose values had overflowed printed a clean 0 (issue 12).
    #[test]
    fn relu_and_step_propagate_nan() {
        assert!(Fun::Relu.eval(f64::NAN).is_nan());
        assert!(Fun::Step.eval(f64::NAN).is_nan());
        assert_eq!(Fun::Relu.eval(-2.0), 0.0);
        assert_eq!(Fun::Relu.eval(3.0), 3.0);
        assert_eq!(Fun::Step.eval(-0.0), 0.0);
        assert_eq!(Fun::Relu.eval(f64::INFINITY), f64::INFINITY);
    }

    /// A partial that reads the forward value (Arg 3 = the Nonlin's value) instead of
    /// recomputing it gives the same bits, and the recomputation is gone.
    #[test]
    fn replace_reads_the_forward_value() {
        let e = Expr::call(
            Fun::Tanh,
            Expr::add(Expr::add(Expr::Arg(0), Expr::Arg(1)), Expr::Arg(2)),
        );
        let own = Expr::Arg(3);
        for i in 0..3 {
            let d = e.diff(i);
            let r = d.replace(&e, &own);
            let mut funs = Vec::new();
            r.visit_funs(&mut |f| funs.push(f));
            assert!(!funs.contains(&Fun::Tanh), "{r:?}");
            for x in [-2.5, -0.3, 0.0, 0.7, 4.0] {
                let args = [x, 0.25 * x, -0.1];
                let v = e.eval(&args);
                let with = [args[0], args[1], args[2], v];
                assert_eq!(d.eval(&args).to_bits(), r.eval(&with).to_bits());
            }
        }
    }

    fn num_deriv(f: Fun, x: f64) -> f64 {
        let h = 1e-6;
        (f.eval(x + h) - f.eval(x - h)) / (2.0 * h)
    }

    #[test]
    fn derivatives_match_finite_differences() {
        for f in Fun::ALL {
            for &x in &[-1.7, -0.3, 0.4, 1.1, 2.5] {
                let d = f.deriv(Expr::Arg(0)).eval(&[x]);
                let n = num_deriv(f, x);
                assert!(
                    (d - n).abs() < 1e-6,
                    "{}'({x}) = {d}, numeric {n}",
                    f.name()
                );
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for f in Fun::ALL {
            assert_eq!(Fun::from_name(f.name()), Some(f));
        }
    }

    #[test]
    fn gelu_is_x_times_normal_cdf() {
        // Phi(1) = 0.8413447460685429
        assert!((Fun::Gelu.eval(1.0) - 0.8413447460685429).abs() < 1e-15);
    }

    /// Folding the scalar operands of a softmax-weighted sum gives the same bits as
    /// evaluating it coordinate by coordinate.
    #[test]
    fn folding_scalars_keeps_every_bit() {
        let (a1, a2, v) = (Expr::Arg(0), Expr::Arg(1), Expr::Arg(2));
        let w = |x: &Expr, y: &Expr| {
            Expr::div(
                Expr::Const(1.0),
                Expr::add(
                    Expr::call(Fun::Exp, Expr::sub(x.clone(), x.clone())),
                    Expr::call(Fun::Exp, Expr::sub(y.clone(), x.clone())),
                ),
            )
        };
        let e = Expr::add(
            Expr::mul(w(&a1, &a2), v.clone()),
            Expr::mul(
                Expr::call(Fun::Sqrt, Expr::add(a2.clone(), Expr::Const(1e-5))),
                Expr::powi(v.clone(), 2),
            ),
        );
        let (s1, s2) = (0.37, -1.25);
        let f = e.fold_scalars(&|i| [Some(s1), Some(s2), None][i]);
        let mut consts = 0;
        f.visit_args(&mut |i| assert_eq!(i, 2, "only the vector operand is left"));
        f.visit_funs(&mut |_| consts += 1);
        assert_eq!(consts, 0, "every function of scalars is folded: {f:?}");
        for x in [-2.0, 0.0, 0.3, 7.5] {
            let want = e.eval(&[s1, s2, x]);
            assert_eq!(f.eval(&[s1, s2, x]).to_bits(), want.to_bits());
        }
    }

    #[test]
    fn diff_of_fused_expression() {
        // d/da0 tanh(a0 + 2 a1) = 1 - tanh^2(a0 + 2 a1)
        let e = Expr::call(
            Fun::Tanh,
            Expr::add(Expr::Arg(0), Expr::mul(Expr::Const(2.0), Expr::Arg(1))),
        );
        let d0 = e.diff(0).eval(&[0.3, 0.1]);
        let d1 = e.diff(1).eval(&[0.3, 0.1]);
        let t = (0.5f64).tanh();
        assert!((d0 - (1.0 - t * t)).abs() < 1e-14);
        assert!((d1 - 2.0 * (1.0 - t * t)).abs() < 1e-14);
    }

    /// Large and tiny constants print in scientific notation and read back exactly.
    #[test]
    fn fmt_num_is_short_and_round_trips() {
        for (c, want) in [
            (1e300, "1e300"),
            (-2.5e300, "-2.5e300"),
            (1e-300, "1e-300"),
            (1e15, "1e15"),
            (123456789012345.0, "123456789012345"),
            (0.25, "0.25"),
            (3.0, "3"),
            (f64::MAX, "1.7976931348623157e308"),
        ] {
            let s = fmt_num(c);
            assert_eq!(s, want);
            assert_eq!(s.parse::<f64>(), Ok(c));
        }
    }

    #[test]
    fn display_parenthesizes_by_precedence() {
        let e = Expr::div(
            Expr::add(Expr::add(Expr::Arg(0), Expr::Arg(1)), Expr::Arg(2)),
            Expr::Const(4.0),
        );
        let names = |i: usize| format!("%{i}");
        assert_eq!(e.display(&names).to_string(), "(%0 + %1 + %2) / 4");
    }
}
