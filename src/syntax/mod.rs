//! The abstract syntax tree of a `.tp` file, with a span on every node.
//!
//! The tree is exactly what was written: names are not resolved, loops not unrolled,
//! laws not evaluated. `lower` gives it meaning; this module knows nothing of numerics.

mod parse;
pub use parse::MAX_SOURCE;

pub use parse::{parse, MAX_NESTING};

use crate::ir::Span;

#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct File {
    pub items: Vec<Item>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Width(Ident, Span),
    Const {
        name: Ident,
        value: Expr,
        span: Span,
    },
    Input {
        name: Ident,
        dim: Dim,
        len: Option<Dim>,
        span: Span,
    },
    Preset(Ident, Span),
    Param(ParamDecl),
    Train(TrainBlock),
    Stmt(Stmt),
}

/// A dimension written as an integer literal or a name (`n`, a `const`).
#[derive(Clone, Debug, PartialEq)]
pub enum Dim {
    Int(u64, Span),
    Name(Ident),
}

impl Dim {
    pub fn span(&self) -> Span {
        match self {
            Dim::Int(_, s) => *s,
            Dim::Name(i) => i.span,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamDecl {
    pub name: Ident,
    pub shape: Vec<Dim>,
    pub shape_span: Span,
    pub law: Option<LawSyntax>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum LawSyntax {
    /// `~ N(mean, var) * mult lr rate`
    Explicit {
        dist: Ident,
        mean: Mono,
        var: Mono,
        mult: Option<Mono>,
        lr: Option<Mono>,
        span: Span,
    },
    /// `{ std = s, lr = r }`
    Preset {
        entries: Vec<(Ident, Mono)>,
        span: Span,
    },
}

impl LawSyntax {
    pub fn span(&self) -> Span {
        match self {
            LawSyntax::Explicit { span, .. } | LawSyntax::Preset { span, .. } => *span,
        }
    }
}

/// A monomial expression such as `1/(2*n)` or `1.5 * n^(-1/2)`.
#[derive(Clone, Debug, PartialEq)]
pub enum Mono {
    Num(f64, Span),
    Name(Ident),
    Call(Ident, Box<Mono>, Span),
    /// base ^ exponent, the exponent as written: numerator and optional denominator.
    Pow(Box<Mono>, Exponent, Span),
    Mul(Box<Mono>, Box<Mono>, Span),
    Div(Box<Mono>, Box<Mono>, Span),
    Neg(Box<Mono>, Span),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Exponent {
    pub num: f64,
    pub den: Option<f64>,
    pub span: Span,
}

impl Mono {
    pub fn span(&self) -> Span {
        match self {
            Mono::Num(_, s)
            | Mono::Call(_, _, s)
            | Mono::Pow(_, _, s)
            | Mono::Mul(_, _, s)
            | Mono::Div(_, _, s)
            | Mono::Neg(_, s) => *s,
            Mono::Name(i) => i.span,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Lhs {
    pub name: Ident,
    pub index: Vec<Expr>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum StmtKind {
    Assign {
        lhs: Lhs,
        rhs: Expr,
    },
    Output {
        lhs: Lhs,
        rhs: Expr,
    },
    Observe {
        lhs: Lhs,
        rhs: Expr,
    },
    For {
        var: Ident,
        lo: Expr,
        hi: Expr,
        inclusive: bool,
        body: Vec<Stmt>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stmt {
    pub kind: StmtKind,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Num(f64),
    Name {
        name: Ident,
        index: Vec<Expr>,
    },
    Call {
        fun: Ident,
        args: Vec<Expr>,
    },
    MatMul {
        mat: Ident,
        transpose: bool,
        arg: Box<Expr>,
    },
    Neg(Box<Expr>),
    Bin(BinOp, Box<Expr>, Box<Expr>),
    Pow(Box<Expr>, f64),
    /// `op(var in lo..=hi, body)`: `sum` or `softmax` over an index range (Netsor+
    /// scalars, README "Scalars and reductions").
    Reduce {
        op: Ident,
        var: Ident,
        lo: Box<Expr>,
        hi: Box<Expr>,
        inclusive: bool,
        body: Box<Expr>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

impl Expr {
    /// Nesting depth of the tree (bounded by the parser, so safe to recurse on).
    pub fn depth(&self) -> usize {
        1 + match &self.kind {
            ExprKind::Num(_) => 0,
            ExprKind::Name { index, .. } => index.iter().map(Expr::depth).max().unwrap_or(0),
            ExprKind::Call { args, .. } => args.iter().map(Expr::depth).max().unwrap_or(0),
            ExprKind::MatMul { arg, .. } => arg.depth(),
            ExprKind::Neg(e) | ExprKind::Pow(e, _) => e.depth(),
            ExprKind::Bin(_, a, b) => a.depth().max(b.depth()),
            ExprKind::Reduce { lo, hi, body, .. } => lo.depth().max(hi.depth()).max(body.depth()),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TrainBlock {
    pub entries: Vec<TrainEntry>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TrainEntry {
    pub key: Ident,
    pub value: TrainValue,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TrainValue {
    Expr(Expr),
    Data(Vec<SampleSyntax>, Span),
}

/// `([x...], y)` or `([x...], [y...])`, nested brackets flattened.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleSyntax {
    pub x: Vec<f64>,
    pub x_span: Span,
    pub y: Vec<f64>,
    pub y_span: Span,
    pub span: Span,
}
