//! Lowering expressions: integer arithmetic for indices and bounds, coordinatewise
//! expressions fused into one `Nonlin`, matrix products and output readouts.

use super::{Binding, Lowerer};
use crate::diag::{nearest, Diagnostic};
use crate::ir::{Expr, Fun, NodeId, Op, OutTerm, Shape, Span, Ty};
use crate::syntax::{self, BinOp, ExprKind};

/// A coordinatewise expression not yet made into a node: `expr` over `ops`.
#[derive(Clone, Debug)]
pub(crate) struct Pending {
    pub expr: Expr,
    pub ops: Vec<NodeId>,
}

impl Pending {
    pub(crate) fn constant(c: f64) -> Pending {
        Pending {
            expr: Expr::Const(c),
            ops: vec![],
        }
    }
    pub(crate) fn node(id: NodeId) -> Pending {
        Pending {
            expr: Expr::Arg(0),
            ops: vec![id],
        }
    }
    /// The single node this expression is, if it is just one.
    pub(crate) fn as_node(&self) -> Option<NodeId> {
        (self.expr == Expr::Arg(0) && self.ops.len() == 1).then(|| self.ops[0])
    }
    pub(crate) fn as_const(&self) -> Option<f64> {
        match self.expr {
            Expr::Const(c) => Some(c),
            _ => None,
        }
    }
    /// Combines two expressions, merging their operand lists.
    pub(crate) fn combine(a: Pending, b: Pending, f: impl FnOnce(Expr, Expr) -> Expr) -> Pending {
        let mut ops = a.ops;
        let remap: Vec<usize> = b
            .ops
            .iter()
            .map(|id| match ops.iter().position(|x| x == id) {
                Some(i) => i,
                None => {
                    ops.push(*id);
                    ops.len() - 1
                }
            })
            .collect();
        let be = b.expr.substitute(&|i| Expr::Arg(remap[i]));
        Pending {
            expr: f(a.expr, be),
            ops,
        }
    }
}

const MAX_EXPR_DEPTH: usize = crate::syntax::MAX_NESTING;

impl Lowerer<'_> {
    fn int_err(&mut self, span: Span, msg: String, help: &str) -> Option<i64> {
        self.err(
            Diagnostic::error("E0014", msg, span, "not an integer here")
                .with_help(help.to_string()),
        );
        None
    }

    /// An integer expression: literals, `const`s, loop variables, `+ - * /`.
    pub(crate) fn eval_int(&mut self, e: &syntax::Expr) -> Option<i64> {
        let overflow = |l: &mut Self, span: Span| {
            l.err(
                Diagnostic::error("E0024", "integer overflow", span, "overflows 64 bits")
                    .with_help("use smaller numbers"),
            );
            None
        };
        match &e.kind {
            ExprKind::Num(v) => {
                // A literal of digits is read exactly from the source (an f64 holds
                // integers exactly only up to 2^53); other forms (`1e3`, `8.0`) are exact
                // integers only while |v| <= 2^53.
                let text = self.src.get(e.span.range()).unwrap_or("").trim();
                if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
                    return text.parse::<i64>().ok().or_else(|| overflow(self, e.span));
                }
                const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
                if v.fract() == 0.0 && v.abs() <= EXACT {
                    Some(*v as i64)
                } else if v.fract() == 0.0 && v.abs() >= i64::MAX as f64 {
                    overflow(self, e.span)
                } else if v.fract() == 0.0 {
                    self.int_err(
                        e.span,
                        format!("`{text}` is beyond 2^53 and not exact in this form"),
                        "write an integer above 2^53 with its digits",
                    )
                } else {
                    self.int_err(
                        e.span,
                        format!("`{v}` is not an integer"),
                        "indices, bounds and constants are integers",
                    )
                }
            }
            ExprKind::Pow(a, p) => {
                let x = self.eval_int(a)?;
                // Integer powers: a non-negative integer exponent (or ±1 to any integer).
                if p.fract() != 0.0 {
                    return self.int_err(
                        e.span,
                        format!("`^{p}` is not an integer power"),
                        "integer constants use whole exponents such as `2^3`",
                    );
                }
                if *p < 0.0 {
                    return match x {
                        1 => Some(1),
                        -1 => Some(if (*p as i64) % 2 == 0 { 1 } else { -1 }),
                        _ => self.int_err(
                            e.span,
                            format!("{x}^{p} is not an integer"),
                            "integer constants use non-negative exponents",
                        ),
                    };
                }
                match u32::try_from(*p as u64).ok().and_then(|k| x.checked_pow(k)) {
                    Some(r) => Some(r),
                    // 0, ±1 to a huge power are still exact.
                    None if x == 0 || x == 1 => Some(x),
                    None if x == -1 => Some(if *p % 2.0 == 0.0 { 1 } else { -1 }),
                    None => overflow(self, e.span),
                }
            }
            ExprKind::Name { name, index } if index.is_empty() => {
                match self.lookup(name, &[], e.span)? {
                    Binding::Const(v) | Binding::LoopVar(v) => Some(v),
                    _ => self.int_err(
                        e.span,
                        format!(
                            "`{}` is not an integer constant or loop variable",
                            name.name
                        ),
                        "indices and bounds use `const` names, loop variables and integer literals",
                    ),
                }
            }
            ExprKind::Neg(a) => {
                let v = self.eval_int(a)?;
                v.checked_neg().or_else(|| overflow(self, e.span))
            }
            ExprKind::Bin(op, a, b) => {
                let (x, y) = (self.eval_int(a)?, self.eval_int(b)?);
                let r = match op {
                    BinOp::Add => x.checked_add(y),
                    BinOp::Sub => x.checked_sub(y),
                    BinOp::Mul => x.checked_mul(y),
                    BinOp::Div => {
                        if y == 0 {
                            self.err(
                                Diagnostic::error("E0024", "division by zero", b.span, "zero")
                                    .with_help("check the bound"),
                            );
                            return None;
                        }
                        if x % y != 0 {
                            return self.int_err(
                                e.span,
                                format!("{x} / {y} is not an integer"),
                                "integer division must be exact",
                            );
                        }
                        x.checked_div(y)
                    }
                };
                r.or_else(|| overflow(self, e.span))
            }
            _ => self.int_err(
                e.span,
                "expected an integer expression".to_string(),
                "indices and bounds are integer arithmetic on constants",
            ),
        }
    }

    /// A real constant expression (the learning rate): numbers and `const`s.
    pub(crate) fn eval_num(&mut self, e: &syntax::Expr) -> Option<f64> {
        match &e.kind {
            ExprKind::Num(v) => Some(*v),
            ExprKind::Name { name, index } if index.is_empty() => {
                match self.lookup(name, &[], e.span)? {
                    Binding::Const(v) | Binding::LoopVar(v) => Some(v as f64),
                    _ => {
                        self.err(
                            Diagnostic::error(
                                "E0020",
                                format!("`{}` is not a number", name.name),
                                e.span,
                                "not a constant",
                            )
                            .with_help("use a number or a `const`"),
                        );
                        None
                    }
                }
            }
            ExprKind::Neg(a) => Some(-self.eval_num(a)?),
            ExprKind::Pow(a, p) => Some(self.eval_num(a)?.powf(*p)),
            ExprKind::Bin(op, a, b) => {
                let (x, y) = (self.eval_num(a)?, self.eval_num(b)?);
                Some(match op {
                    BinOp::Add => x + y,
                    BinOp::Sub => x - y,
                    BinOp::Mul => x * y,
                    BinOp::Div => x / y,
                })
            }
            _ => {
                self.err(
                    Diagnostic::error("E0020", "expected a number", e.span, "not a constant")
                        .with_help("write a number such as `0.5`"),
                );
                None
            }
        }
    }

    fn indices(&mut self, index: &[syntax::Expr]) -> Option<Vec<i64>> {
        let mut out = Vec::with_capacity(index.len());
        for e in index {
            out.push(self.eval_int(e)?);
        }
        Some(out)
    }

    /// A coordinatewise expression over width-n vectors and scalar moments.
    pub(crate) fn vector_expr(&mut self, e: &syntax::Expr) -> Option<Pending> {
        if e.depth() > MAX_EXPR_DEPTH {
            self.err(
                Diagnostic::error(
                    "E0003",
                    format!("expression nested deeper than {MAX_EXPR_DEPTH} levels"),
                    e.span,
                    "too deep",
                )
                .with_help("name intermediate values with assignments"),
            );
            return None;
        }
        self.vexpr(e)
    }

    pub(crate) fn vexpr(&mut self, e: &syntax::Expr) -> Option<Pending> {
        let p = self.vexpr_inner(e)?;
        self.check_size(p, e.span)
    }

    fn vexpr_inner(&mut self, e: &syntax::Expr) -> Option<Pending> {
        match &e.kind {
            ExprKind::Num(v) => Some(Pending::constant(*v)),
            ExprKind::Reduce {
                op,
                var,
                lo,
                hi,
                inclusive,
                body,
            } => self.reduce(op, var, lo, hi, *inclusive, body, e.span),
            ExprKind::Call { fun, args } if self.is_scalar_call(&fun.name) => {
                self.scalar_call(fun, args, e.span)
            }
            ExprKind::Pow(a, k) if k.fract() != 0.0 => self.scalar_pow(a, *k, e.span),
            ExprKind::Name { name, index } => {
                let ix = self.indices(index)?;
                let b = self.lookup(name, &ix, e.span)?;
                self.binding_value(b, name, e.span)
            }
            ExprKind::Call { fun, args } => {
                let Some(f) = Fun::from_name(&fun.name) else {
                    let names = Fun::ALL
                        .iter()
                        .map(|f| f.name())
                        .chain(super::scalar::SCALAR_FUNCTIONS.iter().copied());
                    let help = match nearest(&fun.name, names) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None => format!(
                            "the functions are {}",
                            Fun::ALL
                                .iter()
                                .map(|f| f.name())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    };
                    self.err(
                        Diagnostic::error(
                            "E0013",
                            format!("unknown function `{}`", fun.name),
                            fun.span,
                            "not a function of the language",
                        )
                        .with_help(help),
                    );
                    return None;
                };
                if args.len() != 1 {
                    self.err(
                        Diagnostic::error(
                            "E0020",
                            format!("`{}` takes one argument, given {}", fun.name, args.len()),
                            e.span,
                            "wrong number of arguments",
                        )
                        .with_help(format!("write `{}(x)`", fun.name)),
                    );
                    return None;
                }
                let a = self.vexpr(&args[0])?;
                Some(Pending {
                    expr: Expr::call(f, a.expr),
                    ops: a.ops,
                })
            }
            ExprKind::Neg(a) => {
                let a = self.vexpr(a)?;
                Some(Pending {
                    expr: Expr::neg(a.expr),
                    ops: a.ops,
                })
            }
            ExprKind::Pow(a, k) => {
                if k.fract() != 0.0 || k.abs() > 64.0 {
                    self.err(
                        Diagnostic::error(
                            "E0024",
                            format!("`^{k}`: only integer powers up to 64 are supported"),
                            e.span,
                            "bad power",
                        )
                        .with_help("write `x^2`, or use `exp` for other powers"),
                    );
                    return None;
                }
                let a = self.vexpr(a)?;
                Some(Pending {
                    expr: Expr::powi(a.expr, *k as i32),
                    ops: a.ops,
                })
            }
            ExprKind::Bin(op, a, b) => {
                let (pa, pb) = (self.vexpr(a), self.vexpr(b));
                let (pa, pb) = (pa?, pb?);
                if *op == BinOp::Div && pb.as_const() == Some(0.0) {
                    self.err(
                        Diagnostic::error("E0024", "division by zero", b.span, "zero")
                            .with_help("divide by a nonzero number"),
                    );
                    return None;
                }
                Some(Pending::combine(pa, pb, |x, y| match op {
                    BinOp::Add => Expr::add(x, y),
                    BinOp::Sub => Expr::sub(x, y),
                    BinOp::Mul => Expr::mul(x, y),
                    BinOp::Div => Expr::div(x, y),
                }))
            }
            ExprKind::MatMul {
                mat,
                transpose,
                arg,
            } => self.matmul(mat, *transpose, arg, e.span),
        }
    }

    /// The value of a name inside a width-n expression.
    fn binding_value(&mut self, b: Binding, name: &syntax::Ident, span: Span) -> Option<Pending> {
        match b {
            Binding::Const(v) | Binding::LoopVar(v) => Some(Pending::constant(v as f64)),
            Binding::Scalar(p) => Some(p),
            Binding::Vector(id) | Binding::Moment(id) => {
                if matches!(self.prog.node(id).op, Op::Input { .. }) {
                    return self.point_as_vector(name, span);
                }
                Some(Pending::node(id))
            }
            Binding::Input { .. } => self.point_as_vector(name, span),
            Binding::Param(p) => {
                let prm = &self.prog.params[p];
                match prm.shape {
                    Shape::Vector => {
                        let id = prm.node;
                        self.mark_used(p);
                        Some(Pending::node(id))
                    }
                    Shape::Scalar => {
                        self.err(
                            Diagnostic::error(
                                "E0020",
                                format!("`{}` is a finite scalar parameter", name.name),
                                span,
                                "used in a width-n expression",
                            )
                            .with_help(format!(
                                "scalar parameters are output biases: `output f = v @ x + {}`",
                                name.name
                            )),
                        );
                        None
                    }
                    _ => {
                        self.err(
                            Diagnostic::error(
                                "E0020",
                                format!("`{}` is a matrix, used here as a vector", name.name),
                                span,
                                "a matrix",
                            )
                            .with_help(format!("multiply it: `{} @ x`", name.name)),
                        );
                        None
                    }
                }
            }
            Binding::Output => {
                self.err(
                    Diagnostic::error("E0020", format!("`{}` is an output, a finite random scalar", name.name), span, "used in a width-n expression")
                        .with_help("outputs are read out at the end; compute with the vector they read instead"),
                );
                None
            }
            Binding::Poison => None,
        }
    }

    fn point_as_vector(&mut self, name: &syntax::Ident, span: Span) -> Option<Pending> {
        self.err(
            Diagnostic::error(
                "E0020",
                format!(
                    "`{}` is a finite input point, not a width-n vector",
                    name.name
                ),
                span,
                "used as a vector",
            )
            .with_help(format!(
                "map it to width n with an input-layer matrix: `U @ {}` with `param U : n x d`",
                name.name
            )),
        );
        None
    }

    /// `W @ x` and `W.T @ x`, with their shape rules.
    fn matmul(
        &mut self,
        mat: &syntax::Ident,
        transpose: bool,
        arg: &syntax::Expr,
        span: Span,
    ) -> Option<Pending> {
        let p = self.matrix_param(mat)?;
        let prm = self.prog.params[p].clone();
        let w = self.prog.width.clone();
        match prm.shape {
            Shape::Hidden => {
                let a = self.vexpr_or_point(arg)?;
                let x = match a {
                    Arg::Vector(v) => {
                        self.require_vector(&v, arg.span, "a matrix multiplies a width-n vector")?;
                        self.materialize(v, None, arg.span)?
                    }
                    Arg::Point(_, d) => {
                        self.err(
                            Diagnostic::error(
                                "E0008",
                                format!(
                                    "`{}` is {w} x {w} but `{}` is a point in R^{d}",
                                    mat.name,
                                    self.text(arg.span)
                                ),
                                arg.span,
                                format!("a vector in R^{d}, not R^{w}"),
                            )
                            .with_secondary(prm.span, "declared here")
                            .with_help(format!(
                                "declare an input layer `param U : {w} x {d}` and write `U @ {}`",
                                self.text(arg.span)
                            )),
                        );
                        return None;
                    }
                };
                self.mark_used(p);
                let id = self.push(Op::MatMul { transpose }, &[prm.node, x], None, span)?;
                Some(Pending::node(id))
            }
            Shape::Input(d) => {
                if transpose {
                    self.err(
                        Diagnostic::error("E0010", format!("`{}.T` maps width-n vectors to R^{d}, which this language cannot hold", mat.name), mat.span, "transpose of an input layer")
                            .with_secondary(prm.span, format!("`{}` is {w} x {d}", mat.name))
                            .with_help("only square `n x n` matrices are used with `.T`"),
                    );
                    return None;
                }
                match self.vexpr_or_point(arg)? {
                    Arg::Point(id, e) if e == d => {
                        self.mark_used(p);
                        let m = self.push(
                            Op::MatMul { transpose: false },
                            &[prm.node, id],
                            None,
                            span,
                        )?;
                        Some(Pending::node(m))
                    }
                    Arg::Point(_, e) => {
                        self.err(
                            Diagnostic::error(
                                "E0008",
                                format!(
                                    "`{}` is {w} x {d} but `{}` is in R^{e}",
                                    mat.name,
                                    self.text(arg.span)
                                ),
                                arg.span,
                                format!("dimension {e}, expected {d}"),
                            )
                            .with_secondary(prm.span, "declared here")
                            .with_help(format!(
                                "declare `{}` as `{w} x {e}`, or pass an input in R^{d}",
                                mat.name
                            )),
                        );
                        None
                    }
                    Arg::Vector(_) => {
                        self.err(
                            Diagnostic::error("E0008", format!("`{}` is {w} x {d} and needs an input in R^{d}, but this is a width-{w} vector", mat.name), arg.span, "a width-n vector")
                                .with_secondary(prm.span, "declared here")
                                .with_help(format!("use a hidden matrix `param W : {w} x {w}` for width-n vectors")),
                        );
                        None
                    }
                }
            }
            Shape::Readout => {
                let (code, msg, help) = if transpose {
                    (
                        "E0010",
                        format!(
                            "`{}.T` would turn a scalar into a vector; readouts are only read out",
                            mat.name
                        ),
                        "use `v @ x` in an `output`".to_string(),
                    )
                } else {
                    (
                        "E0009",
                        format!(
                            "`{} @ ..` is a finite scalar, not a width-n vector",
                            mat.name
                        ),
                        format!("read it out as an output: `output f = {} @ x`", mat.name),
                    )
                };
                self.err(
                    Diagnostic::error(code, msg, span, "readout used inside an expression")
                        .with_secondary(prm.span, "a 1 x n readout")
                        .with_help(help),
                );
                None
            }
            Shape::Vector | Shape::Scalar => unreachable_shape(self, mat, &prm.shape),
        }
    }

    fn text(&self, span: Span) -> String {
        self.src.get(span.range()).unwrap_or("").to_string()
    }

    /// The parameter named `mat`, which must be a matrix.
    fn matrix_param(&mut self, mat: &syntax::Ident) -> Option<usize> {
        match self.lookup(mat, &[], mat.span)? {
            Binding::Param(p) if self.prog.params[p].shape.is_matrix() => Some(p),
            Binding::Param(p) => {
                let s = self.prog.params[p].shape;
                unreachable_shape(self, mat, &s).map(|_| p)
            }
            _ => {
                self.err(
                    Diagnostic::error(
                        "E0020",
                        format!("`{}` is not a matrix parameter", mat.name),
                        mat.span,
                        "left of `@`",
                    )
                    .with_help(
                        "only `param`s of shape `n x n`, `n x d` or `1 x n` multiply vectors",
                    ),
                );
                None
            }
        }
    }

    fn vexpr_or_point(&mut self, e: &syntax::Expr) -> Option<Arg> {
        if let ExprKind::Name { name, index } = &e.kind {
            let ix = self.indices(index)?;
            let b = self.lookup(name, &ix, e.span)?;
            let point = match &b {
                Binding::Input { input, nodes } if nodes.len() == 1 => Some((nodes[0], *input)),
                Binding::Vector(id) => match self.prog.node(*id).op {
                    Op::Input { input, .. } => Some((*id, input)),
                    _ => None,
                },
                _ => None,
            };
            if let Some((id, input)) = point {
                return Some(Arg::Point(id, self.prog.inputs[input].dim));
            }
            return Some(Arg::Vector(self.binding_value(b, name, e.span)?));
        }
        Some(Arg::Vector(self.vexpr(e)?))
    }

    /// Makes a node of a pending expression (or reuses the node it already is).
    pub(crate) fn materialize(
        &mut self,
        p: Pending,
        name: Option<String>,
        span: Span,
    ) -> Option<NodeId> {
        if let Some(id) = p.as_node() {
            let fresh = id.index() >= self.stmt_start
                && (self.prog.graph[id].name.is_none()
                    || matches!(self.prog.graph[id].op, Op::Moment(_)));
            if fresh {
                if let Some(n) = name {
                    self.prog.graph[id].name = Some(n);
                }
            }
            return Some(id);
        }
        self.push(Op::Nonlin(p.expr), &p.ops, name, span)
    }

    /// `output f = sum of (c * v @ x) and (c * b)` terms.
    pub(crate) fn output_expr(
        &mut self,
        e: &syntax::Expr,
        name: String,
        span: Span,
    ) -> Option<NodeId> {
        let mut terms = Vec::new();
        flatten_sum(e, 1.0, &mut terms);
        let mut ops: Vec<NodeId> = Vec::new();
        let mut out_terms = Vec::new();
        let mut constant = 0.0;
        let mut ok = true;
        let slot = |ops: &mut Vec<NodeId>, id: NodeId| match ops.iter().position(|&x| x == id) {
            Some(i) => i,
            None => {
                ops.push(id);
                ops.len() - 1
            }
        };
        for (coef, t) in terms {
            let (c, inner) = match split_coef(t) {
                Some(x) => x,
                None => {
                    self.bad_output(t);
                    ok = false;
                    continue;
                }
            };
            let coef = coef * c;
            match &inner.kind {
                ExprKind::Num(v) => constant += coef * v,
                ExprKind::MatMul {
                    mat,
                    transpose: false,
                    arg,
                } => {
                    let Some(p) = self.matrix_param(mat) else {
                        ok = false;
                        continue;
                    };
                    let prm = self.prog.params[p].clone();
                    if prm.shape != Shape::Readout {
                        self.err(
                            Diagnostic::error("E0009", format!("an output must be finite, but `{} @ ..` is a width-n vector", mat.name), inner.span, "not a readout")
                                .with_secondary(prm.span, format!("`{}` is {}", mat.name, prm.shape))
                                .with_help(format!("read the vector out with a `1 x {}` parameter: `output f = v @ ({})`", self.prog.width, self.text(inner.span))),
                        );
                        ok = false;
                        continue;
                    }
                    let Some(v) = self.vexpr(arg) else {
                        ok = false;
                        continue;
                    };
                    if self
                        .require_vector(&v, arg.span, "a readout reads a width-n vector")
                        .is_none()
                    {
                        ok = false;
                        continue;
                    }
                    let Some(x) = self.materialize(v, None, arg.span) else {
                        ok = false;
                        continue;
                    };
                    if self.prog.ty(x) != Ty::Vector {
                        self.err(
                            Diagnostic::error(
                                "E0020",
                                "a readout needs a width-n vector",
                                arg.span,
                                "not a vector",
                            )
                            .with_help("read out a hidden vector, e.g. `v @ h`"),
                        );
                        ok = false;
                        continue;
                    }
                    self.mark_used(p);
                    let r = slot(&mut ops, prm.node);
                    let xs = slot(&mut ops, x);
                    out_terms.push(OutTerm::Readout {
                        coef,
                        readout: r,
                        vector: xs,
                    });
                }
                ExprKind::Name { name: n, index } if index.is_empty() => {
                    match self.lookup(n, &[], inner.span) {
                        Some(Binding::Param(p)) if self.prog.params[p].shape == Shape::Scalar => {
                            self.mark_used(p);
                            let id = self.prog.params[p].node;
                            let s = slot(&mut ops, id);
                            out_terms.push(OutTerm::Scalar { coef, param: s });
                        }
                        Some(Binding::Const(v)) => constant += coef * v as f64,
                        Some(_) => {
                            self.bad_output(inner);
                            ok = false;
                        }
                        None => ok = false,
                    }
                }
                _ => {
                    self.bad_output(inner);
                    ok = false;
                }
            }
        }
        if !ok {
            return None;
        }
        if !out_terms
            .iter()
            .any(|t| matches!(t, OutTerm::Readout { .. }))
        {
            self.err(
                Diagnostic::error(
                    "E0009",
                    "an output needs a readout `v @ x`",
                    e.span,
                    "no readout here",
                )
                .with_help("write `output f = v @ h` with `param v : 1 x n`"),
            );
            return None;
        }
        self.push(
            Op::Output {
                terms: out_terms,
                constant,
            },
            &ops,
            Some(name),
            span,
        )
    }

    fn bad_output(&mut self, t: &syntax::Expr) {
        self.err(
            Diagnostic::error(
                "E0009",
                "an output must be a sum of readouts `v @ x` and scalar biases",
                t.span,
                "not a finite readout",
            )
            .with_help("move the computation into the vector: `output f = v @ (expression)`"),
        );
    }
}

enum Arg {
    Vector(Pending),
    Point(NodeId, usize),
}

fn unreachable_shape(l: &mut Lowerer<'_>, mat: &syntax::Ident, shape: &Shape) -> Option<Pending> {
    l.err(
        Diagnostic::error(
            "E0020",
            format!("`{}` is a {} parameter, not a matrix", mat.name, shape),
            mat.span,
            "left of `@`",
        )
        .with_help("vectors combine coordinatewise: `b * x`, `x + b`"),
    );
    None
}

/// `a + b - c` into signed terms.
fn flatten_sum<'e>(e: &'e syntax::Expr, sign: f64, out: &mut Vec<(f64, &'e syntax::Expr)>) {
    match &e.kind {
        ExprKind::Bin(BinOp::Add, a, b) => {
            flatten_sum(a, sign, out);
            flatten_sum(b, sign, out);
        }
        ExprKind::Bin(BinOp::Sub, a, b) => {
            flatten_sum(a, sign, out);
            flatten_sum(b, -sign, out);
        }
        ExprKind::Neg(a) => flatten_sum(a, -sign, out),
        _ => out.push((sign, e)),
    }
}

/// `c * t`, `t * c`, `t / c` with a numeric c.
fn split_coef(e: &syntax::Expr) -> Option<(f64, &syntax::Expr)> {
    match &e.kind {
        ExprKind::Bin(BinOp::Mul, a, b) => match (&a.kind, &b.kind) {
            (ExprKind::Num(c), _) => split_coef(b).map(|(k, t)| (c * k, t)),
            (_, ExprKind::Num(c)) => split_coef(a).map(|(k, t)| (c * k, t)),
            _ => None,
        },
        ExprKind::Bin(BinOp::Div, a, b) => match &b.kind {
            ExprKind::Num(c) if *c != 0.0 => split_coef(a).map(|(k, t)| (k / c, t)),
            _ => None,
        },
        ExprKind::Neg(a) => split_coef(a).map(|(k, t)| (-k, t)),
        _ => Some((1.0, e)),
    }
}
