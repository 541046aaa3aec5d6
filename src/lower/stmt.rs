//! Statements: assignments, `observe`, `output` and `for` loops (unrolled here, each
//! iteration's names indexed by the loop variable), lowered in source order.

use std::collections::HashMap;

use super::{count_stmts, show_name, Binding, Family, Lowerer, MAX_INSTRUCTIONS};
use crate::diag::Diagnostic;
use crate::ir::{Op, Span, Ty};
use crate::syntax::{self, Ident, Stmt, StmtKind};

impl<'a> Lowerer<'a> {
    pub(super) fn stmt(&mut self, s: &Stmt) {
        if self.budget_error {
            return;
        }
        self.stmt_start = self.prog.len();
        match &s.kind {
            StmtKind::Assign { lhs, rhs } => self.assign(lhs, rhs),
            StmtKind::Output { lhs, rhs } => self.output(lhs, rhs, s.span),
            StmtKind::Observe { lhs, rhs } => self.observe(lhs, rhs, s.span),
            StmtKind::For {
                var,
                lo,
                hi,
                inclusive,
                body,
            } => self.for_loop(var, lo, hi, *inclusive, body, s.span),
        }
        self.defining = None;
    }

    pub(super) fn lhs_index(&mut self, lhs: &syntax::Lhs) -> Option<Vec<i64>> {
        let mut out = Vec::new();
        for e in &lhs.index {
            out.push(self.eval_int(e)?);
        }
        if lhs.name.name == self.prog.width {
            self.err(self.shadow_width(&lhs.name));
            return None;
        }
        Some(out)
    }

    pub(super) fn assign(&mut self, lhs: &syntax::Lhs, rhs: &syntax::Expr) {
        let Some(index) = self.lhs_index(lhs) else {
            return;
        };
        self.defining = Some((lhs.name.name.clone(), index.clone()));
        let name = show_name(&lhs.name.name, &index);
        let value = self.vector_expr(rhs);
        if let Some(p) = &value {
            if self.is_scalar(p) && p.as_node().is_none() {
                // A function of moments: a named scalar, inlined where it is used.
                self.define(&lhs.name, index, Binding::Scalar(p.clone()), lhs.span);
                return;
            }
        }
        match value.and_then(|v| self.materialize(v, Some(name), rhs.span)) {
            Some(id) => {
                let b = match self.prog.ty(id) {
                    Ty::Moment => Binding::Moment(id),
                    _ => Binding::Vector(id),
                };
                self.define(&lhs.name, index, b, lhs.span);
            }
            None => self.poison(&lhs.name, index),
        }
    }

    pub(super) fn observe(&mut self, lhs: &syntax::Lhs, rhs: &syntax::Expr, span: Span) {
        let Some(index) = self.lhs_index(lhs) else {
            return;
        };
        self.defining = Some((lhs.name.name.clone(), index.clone()));
        let name = show_name(&lhs.name.name, &index);
        let arg = match &rhs.kind {
            syntax::ExprKind::Call { fun, args } if fun.name == "mean" && args.len() == 1 => {
                &args[0]
            }
            _ => return self.observe_scalar(lhs, index, rhs, name, span),
        };
        let Some(p) = self.vector_expr(arg) else {
            return self.poison(&lhs.name, index);
        };
        if !self.require_vector_arg_of_mean(&p, arg.span) {
            return self.poison(&lhs.name, index);
        }
        match self.push(Op::Moment(p.expr), &p.ops, Some(name), span) {
            Some(id) => {
                if self.define(&lhs.name, index.clone(), Binding::Moment(id), lhs.span) {
                    let order = self.names.get(&lhs.name.name).map_or(0, |f| f.order);
                    self.observes.push((order, index, id));
                }
            }
            None => self.poison(&lhs.name, index),
        }
    }

    /// `observe s = f(moments)`: a Netsor+ scalar observed per point (an `Op::Scalar`
    /// over its moments; README "Scalars and reductions"). Anything depending on a
    /// width-n vector is E0026.
    fn observe_scalar(
        &mut self,
        lhs: &syntax::Lhs,
        index: Vec<i64>,
        rhs: &syntax::Expr,
        name: String,
        span: Span,
    ) {
        let Some(p) = self.vector_expr(rhs) else {
            return self.poison(&lhs.name, index);
        };
        if !self.is_scalar(&p) {
            self.err(
                Diagnostic::error(
                    "E0026",
                    "an `observe` must be `mean(expr)`",
                    rhs.span,
                    "not a mean over coordinates",
                )
                .with_help(
                    "write `observe m = mean(x * y)`: the moment (1/n) sum_a x_a y_a, \
                     or a function of moments such as `sqrt(mean(h * h))`",
                ),
            );
            return self.poison(&lhs.name, index);
        }
        match self.push(Op::Scalar(p.expr.clone()), &p.ops, Some(name), span) {
            Some(id) => {
                if self.define(&lhs.name, index.clone(), Binding::Scalar(p), lhs.span) {
                    let order = self.names.get(&lhs.name.name).map_or(0, |f| f.order);
                    self.observes.push((order, index, id));
                }
            }
            None => self.poison(&lhs.name, index),
        }
    }

    pub(super) fn for_loop(
        &mut self,
        var: &Ident,
        lo: &syntax::Expr,
        hi: &syntax::Expr,
        inclusive: bool,
        body: &[Stmt],
        span: Span,
    ) {
        let (Some(a), Some(b)) = (self.eval_int(lo), self.eval_int(hi)) else {
            return;
        };
        let end = if inclusive { b.checked_add(1) } else { Some(b) };
        let Some(end) = end else {
            self.err(
                Diagnostic::error("E0024", "loop bound overflows", hi.span, "too large")
                    .with_help("use a smaller bound"),
            );
            return;
        };
        let trips = if end > a {
            (end as i128 - a as i128) as u128
        } else {
            0
        };
        let per_trip = count_stmts(body).max(1) as u128;
        let room = (MAX_INSTRUCTIONS - self.prog.len().min(MAX_INSTRUCTIONS)) as u128;
        if trips.saturating_mul(per_trip) > room {
            self.budget_error = true;
            self.err(
                Diagnostic::error(
                    "E0016",
                    format!("this loop unrolls {trips} times, past the limit of {MAX_INSTRUCTIONS} instructions"),
                    lo.span.join(hi.span),
                    format!("{trips} iterations"),
                )
                .with_secondary(span, "the loop")
                .with_help("tpc unrolls loops into one tensor program; shorten the loop or the sequence"),
            );
            return;
        }
        if self.names.contains_key(&var.name) || var.name == self.prog.width {
            self.err(
                Diagnostic::error(
                    "E0005",
                    format!("loop variable `{}` shadows an existing name", var.name),
                    var.span,
                    "already defined",
                )
                .with_help("use a fresh name for the loop variable"),
            );
            return;
        }
        for t in a..end {
            if self.budget_error {
                break;
            }
            let order = self.next_order;
            self.next_order += 1;
            self.names.insert(
                var.name.clone(),
                Family {
                    arity: 0,
                    def_span: var.span,
                    elems: HashMap::from([(vec![], Binding::LoopVar(t))]),
                    order,
                },
            );
            for s in body {
                self.stmt(s);
            }
            self.names.remove(&var.name);
        }
    }

    pub(super) fn output(&mut self, lhs: &syntax::Lhs, rhs: &syntax::Expr, span: Span) {
        let Some(index) = self.lhs_index(lhs) else {
            return;
        };
        self.defining = Some((lhs.name.name.clone(), index.clone()));
        let name = show_name(&lhs.name.name, &index);
        match self.output_expr(rhs, name, span) {
            Some(id) => {
                if self.define(&lhs.name, index.clone(), Binding::Output, lhs.span) {
                    let order = self.names.get(&lhs.name.name).map_or(0, |f| f.order);
                    self.outputs.push((order, index, id));
                }
            }
            None => self.poison(&lhs.name, index),
        }
    }

    // ---- training ---------------------------------------------------------------
}
