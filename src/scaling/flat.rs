//! Coordinatewise expressions flattened for the analysis: value and partial-derivative sizes of a Nonlin or Moment's function.

use super::*;
use crate::ir::{Expr, Fun};

// ---------------------------------------------------------------------------------
// Coordinatewise expressions: value and partial-derivative sizes
// ---------------------------------------------------------------------------------

/// phi(x)'s size from x's: homogeneous functions pass it, saturating ones cap it at 1.
pub(super) fn fun_value(f: Fun, x: Ex) -> Ex {
    match f {
        Fun::Relu | Fun::Id | Fun::Abs | Fun::Gelu => x,
        // functions of scalars: Θ(1) scalars stay Θ(1) (an upper bound when not)
        Fun::Sqrt | Fun::Log => {
            if x.blows_up() {
                Ex::Inf
            } else {
                Ex::ONE
            }
        }
        // odd, linear at 0, bounded
        Fun::Tanh | Fun::Erf | Fun::Sin => x.min(Ex::ONE),
        // phi(0) != 0, bounded
        Fun::Sigmoid | Fun::Cos => Ex::ONE,
        Fun::Step => {
            if x == Ex::Zero {
                Ex::Zero
            } else {
                Ex::ONE
            }
        }
        Fun::Exp => {
            if x.blows_up() {
                Ex::Inf
            } else {
                Ex::ONE
            }
        }
    }
}

/// phi'(x)'s size from x's (bounded derivatives count as Θ(1): an upper bound).
pub(super) fn fun_deriv(f: Fun, x: Ex) -> Ex {
    match f {
        Fun::Relu => {
            // relu'(0) = 0, as the executor takes it
            if x == Ex::Zero {
                Ex::Zero
            } else {
                Ex::ONE
            }
        }
        Fun::Id | Fun::Abs | Fun::Gelu | Fun::Tanh | Fun::Erf | Fun::Sigmoid | Fun::Sin => Ex::ONE,
        Fun::Cos => x.min(Ex::ONE),
        Fun::Step => Ex::Zero,
        Fun::Exp | Fun::Sqrt | Fun::Log => fun_value(f, x),
    }
}

#[derive(Clone, Debug)]
pub(super) enum Flat {
    Arg(usize),
    Const(f64),
    Call(Fun, usize),
    Neg(usize),
    Add(usize, usize),
    Mul(usize, usize),
    Div(usize, usize),
    Powi(usize, i32),
}

/// An expression flattened in post-order (children before parents).
#[derive(Clone, Debug)]
pub(super) struct FlatExpr(Vec<Flat>);

impl FlatExpr {
    pub(super) fn new(e: &Expr) -> FlatExpr {
        fn go(e: &Expr, out: &mut Vec<Flat>) -> usize {
            let node = match e {
                Expr::Arg(i) => Flat::Arg(*i),
                Expr::Const(c) => Flat::Const(*c),
                Expr::Call(f, x) => Flat::Call(*f, go(x, out)),
                Expr::Neg(x) => Flat::Neg(go(x, out)),
                Expr::Add(a, b) | Expr::Sub(a, b) => {
                    let a = go(a, out);
                    Flat::Add(a, go(b, out))
                }
                Expr::Mul(a, b) => {
                    let a = go(a, out);
                    Flat::Mul(a, go(b, out))
                }
                Expr::Div(a, b) => {
                    let a = go(a, out);
                    Flat::Div(a, go(b, out))
                }
                Expr::Powi(a, k) => Flat::Powi(go(a, out), *k),
            };
            out.push(node);
            out.len() - 1
        }
        let mut v = Vec::new();
        go(e, &mut v);
        FlatExpr(v)
    }

    pub(super) fn values(&self, args: &[Ex]) -> Vec<Ex> {
        let mut v: Vec<Ex> = Vec::with_capacity(self.0.len());
        for n in &self.0 {
            let x = match *n {
                Flat::Arg(i) => args.get(i).copied().unwrap_or(Ex::ONE),
                Flat::Const(c) => {
                    if c == 0.0 {
                        Ex::Zero
                    } else {
                        Ex::ONE
                    }
                }
                Flat::Call(f, a) => fun_value(f, v[a]),
                Flat::Neg(a) => v[a],
                Flat::Add(a, b) => v[a].max(v[b]),
                Flat::Mul(a, b) => v[a].mul(v[b]),
                Flat::Div(a, b) => {
                    if v[a] == Ex::Zero {
                        Ex::Zero
                    } else {
                        v[a].mul(v[b].recip())
                    }
                }
                Flat::Powi(a, k) => v[a].powi(k),
            };
            v.push(x);
        }
        v
    }

    /// The size of the value.
    pub(super) fn value(&self, args: &[Ex]) -> Ex {
        self.values(args).last().copied().unwrap_or(Ex::Zero)
    }

    /// The sizes of the value and of the partial derivative in every argument
    /// (reverse mode on sizes: one pass whatever the number of arguments).
    pub(super) fn partials(&self, args: &[Ex]) -> (Ex, Vec<Ex>) {
        let v = self.values(args);
        let mut adj = vec![Ex::Zero; v.len()];
        let mut d = vec![Ex::Zero; args.len()];
        if let Some(last) = adj.last_mut() {
            *last = Ex::ONE;
        }
        for k in (0..self.0.len()).rev() {
            let g = adj[k];
            if g == Ex::Zero {
                continue;
            }
            let mut bump = |i: usize, e: Ex| adj[i] = adj[i].max(e);
            match self.0[k] {
                Flat::Arg(i) => {
                    if i < d.len() {
                        d[i] = d[i].max(g);
                    }
                }
                Flat::Const(_) => {}
                Flat::Call(f, a) => bump(a, g.mul(fun_deriv(f, v[a]))),
                Flat::Neg(a) => bump(a, g),
                Flat::Add(a, b) => {
                    bump(a, g);
                    bump(b, g);
                }
                Flat::Mul(a, b) => {
                    bump(a, g.mul(v[b]));
                    bump(b, g.mul(v[a]));
                }
                Flat::Div(a, b) => {
                    let inv = v[b].recip();
                    bump(a, g.mul(inv));
                    bump(b, g.mul(v[a]).mul(inv).mul(inv));
                }
                Flat::Powi(a, k) => bump(a, g.mul(v[a].powi(k - 1))),
            }
        }
        (v.last().copied().unwrap_or(Ex::Zero), d)
    }
}
