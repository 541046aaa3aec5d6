//! Netsor+ scalars in the front end (theory.md §1.1; README "Scalars and reductions").
//!
//! A scalar is a moment `mean(expr)` of width-n vectors, a constant, or a function of
//! scalars (`sqrt`, `rsqrt`, `log`, `exp`, rational powers, `+ - * /`). Moments become
//! `Moment` nodes wherever they are written; every function of them is fused into the
//! coordinatewise expression that uses it, so the IR holds only `Moment`s feeding
//! `Nonlin`s — a Nonlin with scalar operands, each a deterministic function of the input
//! point in the limit. Reductions `sum(s in a..=b, e)` and `softmax(s in a..=b, e)`
//! unroll over their range like loops.

use std::collections::HashMap;

use super::expr::Pending;
use super::{Binding, Family, Lowerer};
use crate::diag::Diagnostic;
use crate::ir::{Expr, Fun, NodeId, Op, Span, Ty};
use crate::syntax;

/// Functions of scalars only, besides the coordinatewise ones (`Fun::ALL`).
pub(crate) const SCALAR_FUNCTIONS: [&str; 4] = ["mean", "sqrt", "rsqrt", "log"];

/// The most terms a reduction may unroll to.
const MAX_REDUCE_TERMS: i64 = 10_000;

/// The most nodes one fused expression may have (nested reductions and inlined named
/// scalars grow expressions multiplicatively).
pub(crate) const MAX_EXPR_NODES: usize = 200_000;

fn size(e: &Expr) -> usize {
    1 + match e {
        Expr::Arg(_) | Expr::Const(_) => 0,
        Expr::Call(_, x) | Expr::Neg(x) | Expr::Powi(x, _) => size(x),
        Expr::Add(a, b) | Expr::Sub(a, b) | Expr::Mul(a, b) | Expr::Div(a, b) => size(a) + size(b),
    }
}

impl Lowerer<'_> {
    /// A function of moments only (at least one).
    pub(crate) fn is_scalar(&self, p: &Pending) -> bool {
        !p.ops.is_empty() && p.ops.iter().all(|&o| self.prog.ty(o) == Ty::Moment)
    }

    /// Depends on some width-n vector.
    fn has_vector(&self, p: &Pending) -> bool {
        p.ops.iter().any(|&o| self.prog.ty(o) == Ty::Vector)
    }

    pub(crate) fn is_scalar_call(&self, name: &str) -> bool {
        SCALAR_FUNCTIONS.contains(&name)
    }

    pub(crate) fn check_size(&mut self, p: Pending, span: Span) -> Option<Pending> {
        if size(&p.expr) > MAX_EXPR_NODES {
            self.err(
                Diagnostic::error(
                    "E0003",
                    format!("this expression expands to more than {MAX_EXPR_NODES} operations"),
                    span,
                    "too large",
                )
                .with_help("name intermediate vectors with assignments; nested reductions multiply in size"),
            );
            return None;
        }
        Some(p)
    }

    /// E0043: a scalar where a width-n vector is required.
    pub(crate) fn require_vector(&mut self, p: &Pending, span: Span, why: &str) -> Option<()> {
        if self.is_scalar(p) {
            self.err(
                Diagnostic::error(
                    "E0043",
                    "a scalar is used where a width-n vector is required",
                    span,
                    "a scalar (a function of moments)",
                )
                .with_help(format!(
                    "{why}; a scalar scales a vector coordinatewise, e.g. `h * s` or `h / sqrt(s)`"
                )),
            );
            return None;
        }
        Some(())
    }

    /// E0044: a width-n vector where a scalar is required.
    fn require_scalar(&mut self, p: &Pending, span: Span, what: &str) -> Option<()> {
        if self.has_vector(p) {
            self.err(
                Diagnostic::error(
                    "E0044",
                    format!("{what} needs a scalar, but this is a width-n vector"),
                    span,
                    "a width-n vector",
                )
                .with_help("make a scalar of it with a moment, e.g. `mean(h * h)`"),
            );
            return None;
        }
        Some(())
    }

    /// E0041: `mean` of something with no width-n vector in it.
    pub(crate) fn require_vector_arg_of_mean(&mut self, p: &Pending, span: Span) -> bool {
        if self.has_vector(p) {
            return true;
        }
        self.err(
            Diagnostic::error(
                "E0041",
                "a moment of a scalar: `mean` averages a width-n vector over its coordinates",
                span,
                "no width-n vector here",
            )
            .with_help("a scalar is already a number: use it without `mean`"),
        );
        false
    }

    /// `mean(e)`: a `Moment` node, shared with an identical moment written before.
    fn moment(&mut self, p: Pending, span: Span) -> Option<Pending> {
        let key = Self::canon(&p.expr, &p.ops);
        if let Some(&id) = self.moments.get(&key) {
            return Some(Pending::node(id));
        }
        // Named by its integrand over its operands' names, `E[h * h]` (as
        // `Program::stable_names` would), so listings and refusals read from the source.
        let shown = {
            let prog = &self.prog;
            let ops = &p.ops;
            format!(
                "E[{}]",
                p.expr
                    .display(&|k| ops.get(k).map_or("?".into(), |&o| prog.label(o)))
            )
        };
        let name = (shown.chars().count() <= crate::ir::MAX_STRUCTURAL_NAME).then_some(shown);
        let id = self.push(Op::Moment(p.expr), &p.ops, name, span)?;
        self.moments.insert(key, id);
        Some(Pending::node(id))
    }

    /// `mean`, `sqrt`, `rsqrt`, `log`.
    pub(crate) fn scalar_call(
        &mut self,
        fun: &syntax::Ident,
        args: &[syntax::Expr],
        span: Span,
    ) -> Option<Pending> {
        if args.len() != 1 {
            self.err(
                Diagnostic::error(
                    "E0020",
                    format!("`{}` takes one argument, given {}", fun.name, args.len()),
                    span,
                    "wrong number of arguments",
                )
                .with_help(format!("write `{}(x)`", fun.name)),
            );
            return None;
        }
        let a = self.vexpr(&args[0])?;
        if fun.name == "mean" {
            if !self.require_vector_arg_of_mean(&a, args[0].span) {
                return None;
            }
            return self.moment(a, span);
        }
        self.require_scalar(&a, args[0].span, &format!("`{}`", fun.name))?;
        let strict = fun.name != "sqrt";
        self.warn_sign(&a, args[0].span, &format!("`{}`", fun.name), strict);
        let expr = match fun.name.as_str() {
            "sqrt" => Expr::call(Fun::Sqrt, a.expr),
            "rsqrt" => Expr::powi(Expr::call(Fun::Sqrt, a.expr), -1),
            _ => Expr::call(Fun::Log, a.expr),
        };
        Some(Pending { expr, ops: a.ops })
    }

    /// `s^(p/q)` for a non-integer exponent: `sqrt(s)^(2k)` for half-integers, else
    /// `exp(k log s)`; defined for positive scalars.
    pub(crate) fn scalar_pow(&mut self, a: &syntax::Expr, k: f64, span: Span) -> Option<Pending> {
        if !k.is_finite() || k.abs() > 64.0 {
            self.err(
                Diagnostic::error(
                    "E0024",
                    format!("`^{k}`: powers are at most 64 in size"),
                    span,
                    "bad power",
                )
                .with_help("write a smaller exponent"),
            );
            return None;
        }
        let p = self.vexpr(a)?;
        self.require_scalar(&p, a.span, "a fractional power")?;
        let half = (2.0 * k).fract() == 0.0;
        self.warn_sign(&p, a.span, "a fractional power", !half || k < 0.0);
        let expr = if half {
            Expr::powi(Expr::call(Fun::Sqrt, p.expr), (2.0 * k) as i32)
        } else {
            Expr::call(
                Fun::Exp,
                Expr::mul(Expr::Const(k), Expr::call(Fun::Log, p.expr)),
            )
        };
        Some(Pending { expr, ops: p.ops })
    }

    /// W0003: `sqrt` (or a power, `log`) of a scalar that tpc cannot show is
    /// non-negative (positive, when `strict`).
    fn warn_sign(&mut self, p: &Pending, span: Span, what: &str, strict: bool) {
        let ok = if strict {
            self.positive(&p.expr, &p.ops)
        } else {
            self.nonneg(&p.expr, &p.ops)
        };
        if ok {
            return;
        }
        let (adj, fix) = if strict {
            ("negative or zero", "add a positive constant, e.g. `+ 1e-5`")
        } else {
            (
                "negative",
                "a variance `mean(h * h) - mean(h)^2` or a `mean` of squares is non-negative",
            )
        };
        self.diags.push(
            Diagnostic::warning(
                "W0003",
                format!("{what} of a scalar that can be {adj}"),
                span,
                format!("tpc cannot show this is never {adj}"),
            )
            .with_help(format!(
                "a run stops with an error (E0024) where it is; {fix}"
            )),
        );
    }

    /// A canonical text of `e` over node ids (to compare moments' integrands).
    fn canon(e: &Expr, ops: &[NodeId]) -> String {
        e.display(&|k| format!("#{}", ops.get(k).map_or(usize::MAX, |o| o.index())))
            .to_string()
    }

    /// The moment behind operand `i`, with its operands.
    fn moment_of(&self, e: &Expr, ops: &[NodeId]) -> Option<(Expr, Vec<NodeId>)> {
        let Expr::Arg(i) = e else { return None };
        let id = *ops.get(*i)?;
        match &self.prog.node(id).op {
            Op::Moment(m) => Some((m.clone(), self.prog.operands(id))),
            _ => None,
        }
    }

    /// `e ≥ 0` for every value of the Gaussians (a sufficient syntactic test).
    fn nonneg(&self, e: &Expr, ops: &[NodeId]) -> bool {
        match e {
            Expr::Const(c) => *c >= 0.0,
            Expr::Arg(_) => match self.moment_of(e, ops) {
                Some((m, mops)) => self.nonneg(&m, &mops),
                None => false,
            },
            // x * x ≥ 0
            Expr::Mul(a, b) if a == b => true,
            Expr::Add(a, b) | Expr::Mul(a, b) | Expr::Div(a, b) => {
                self.nonneg(a, ops) && self.nonneg(b, ops)
            }
            Expr::Powi(a, k) => k % 2 == 0 || self.nonneg(a, ops),
            Expr::Call(f, a) => match f {
                Fun::Exp | Fun::Sqrt | Fun::Abs | Fun::Relu | Fun::Sigmoid | Fun::Step => true,
                Fun::Id => self.nonneg(a, ops),
                _ => false,
            },
            // Jensen: mean(x*x) - mean(x)^2 ≥ 0.
            Expr::Sub(a, b) => self.is_variance(a, b, ops),
            Expr::Neg(_) => false,
        }
    }

    /// `a - b` is `mean(ψ²) - mean(ψ)²` for one ψ.
    fn is_variance(&self, a: &Expr, b: &Expr, ops: &[NodeId]) -> bool {
        let Expr::Powi(b, 2) = b else { return false };
        let (Some((ma, aops)), Some((mb, bops))) = (self.moment_of(a, ops), self.moment_of(b, ops))
        else {
            return false;
        };
        let psi = Self::canon(&mb, &bops);
        match &ma {
            Expr::Mul(x, y) => Self::canon(x, &aops) == psi && Self::canon(y, &aops) == psi,
            Expr::Powi(x, 2) => Self::canon(x, &aops) == psi,
            _ => false,
        }
    }

    /// `e > 0` (a sufficient syntactic test).
    fn positive(&self, e: &Expr, ops: &[NodeId]) -> bool {
        match e {
            Expr::Const(c) => *c > 0.0,
            Expr::Add(a, b) => {
                (self.positive(a, ops) && self.nonneg(b, ops))
                    || (self.nonneg(a, ops) && self.positive(b, ops))
            }
            Expr::Mul(a, b) | Expr::Div(a, b) => self.positive(a, ops) && self.positive(b, ops),
            Expr::Powi(a, _) => self.positive(a, ops),
            Expr::Call(Fun::Exp, _) => true,
            Expr::Call(Fun::Sqrt, a) => self.positive(a, ops),
            Expr::Arg(_) => match self.moment_of(e, ops) {
                Some((m, mops)) => self.positive(&m, &mops),
                None => false,
            },
            _ => false,
        }
    }

    /// `sum(var in lo..=hi, body)` and `softmax(var in lo..=hi, body)`, unrolled.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn reduce(
        &mut self,
        op: &syntax::Ident,
        var: &syntax::Ident,
        lo: &syntax::Expr,
        hi: &syntax::Expr,
        inclusive: bool,
        body: &syntax::Expr,
        span: Span,
    ) -> Option<Pending> {
        if op.name != "sum" && op.name != "softmax" {
            self.err(
                Diagnostic::error(
                    "E0013",
                    format!("unknown reduction `{}`", op.name),
                    op.span,
                    "not a reduction of the language",
                )
                .with_help("the reductions over an index range are `sum(s in 1..=L, e)` and `softmax(s in 1..=L, e)`"),
            );
            return None;
        }
        let (a, b) = (self.eval_int(lo)?, self.eval_int(hi)?);
        let end = if inclusive { b.saturating_add(1) } else { b };
        if end <= a {
            self.err(
                Diagnostic::error(
                    "E0042",
                    format!(
                        "`{}` over an empty range: {a}{}{b} has no index",
                        op.name,
                        if inclusive { "..=" } else { ".." }
                    ),
                    lo.span.join(hi.span),
                    "empty range",
                )
                .with_help("a reduction needs at least one term; check the bounds"),
            );
            return None;
        }
        if end.saturating_sub(a) > MAX_REDUCE_TERMS {
            self.err(
                Diagnostic::error(
                    "E0016",
                    format!("`{}` over more than {MAX_REDUCE_TERMS} terms", op.name),
                    lo.span.join(hi.span),
                    "too many terms",
                )
                .with_help("shorten the range"),
            );
            return None;
        }
        // The position a softmax weight is for: `var` as bound outside.
        let outer = match self.names.get(&var.name) {
            Some(f) => match f.elems.get(&Vec::new()) {
                Some(Binding::LoopVar(v)) => Some(*v),
                _ => {
                    self.err(
                        Diagnostic::error(
                            "E0005",
                            format!("reduction variable `{}` shadows an existing name", var.name),
                            var.span,
                            "already defined",
                        )
                        .with_help("use a fresh name, or a loop or reduction variable"),
                    );
                    return None;
                }
            },
            None => None,
        };
        let softmax = op.name == "softmax";
        let at = if softmax {
            match outer {
                Some(s) if (a..end).contains(&s) => Some(s),
                Some(s) => {
                    self.err(
                        Diagnostic::error(
                            "E0015",
                            format!(
                                "the softmax weight of position {s} is asked for, but the range is {a}{}{b}",
                                if inclusive { "..=" } else { ".." }
                            ),
                            span,
                            "index out of range",
                        )
                        .with_help(format!("`softmax({} in ..)` is the weight of the current `{}`, which must lie in the range", var.name, var.name)),
                    );
                    return None;
                }
                None => {
                    self.err(
                        Diagnostic::error(
                            "E0014",
                            format!("`softmax({} in ..)` is the weight of position `{}`, but `{}` is not bound here", var.name, var.name, var.name),
                            var.span,
                            "no current position",
                        )
                        .with_help(format!("use it inside a reduction or loop over `{}`: `sum({} in 1..=L, softmax({} in 1..=L, a[t, {}]) * v[{}])`", var.name, var.name, var.name, var.name, var.name)),
                    );
                    return None;
                }
            }
        } else {
            None
        };
        let saved = self.names.remove(&var.name);
        let mut terms: Vec<Pending> = Vec::new();
        let mut ok = true;
        for k in a..end {
            self.names.insert(
                var.name.clone(),
                Family {
                    arity: 0,
                    def_span: var.span,
                    elems: HashMap::from([(vec![], Binding::LoopVar(k))]),
                    order: 0,
                },
            );
            match self.vexpr(body) {
                Some(t) => terms.push(t),
                None => {
                    ok = false;
                    break;
                }
            }
        }
        self.names.remove(&var.name);
        if let Some(f) = saved {
            self.names.insert(var.name.clone(), f);
        }
        if !ok {
            return None;
        }
        if let Some(s) = at {
            for t in &terms {
                self.require_scalar(t, body.span, "`softmax`")?;
            }
            // w_s = exp(b_s) / Σ_k exp(b_k) = 1 / Σ_k exp(b_k − b_s): no overflow for
            // a large common shift of the logits.
            let bs = terms[(s - a) as usize].clone();
            let mut den: Option<Pending> = None;
            for t in terms {
                let e =
                    Pending::combine(t, bs.clone(), |x, y| Expr::call(Fun::Exp, Expr::sub(x, y)));
                den = Some(match den {
                    None => e,
                    Some(d) => Pending::combine(d, e, Expr::add),
                });
            }
            let den = den?;
            return Some(Pending::combine(Pending::constant(1.0), den, Expr::div));
        }
        let mut acc: Option<Pending> = None;
        for t in terms {
            acc = Some(match acc {
                None => t,
                Some(x) => Pending::combine(x, t, Expr::add),
            });
        }
        acc
    }
}
