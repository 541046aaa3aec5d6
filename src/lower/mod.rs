//! Checks and lowering: from the syntax tree to the tensor-program IR.
//!
//! One pass in source order resolves names, evaluates integer expressions and laws,
//! unrolls loops and type-checks every use, pushing IR nodes as it goes. A statement
//! with an error is reported and its name "poisoned", so one mistake gives one
//! diagnostic rather than a cascade. Loops are refused before they unroll when they
//! would pass [`MAX_INSTRUCTIONS`].

mod expr;
mod laws;
mod scalar;

use std::collections::HashMap;

use crate::diag::{nearest, Diagnostic};
use crate::ir::{
    InputDecl, Loss, NodeId, Op, Param, Preset, Program, Sample, Shape, Span, Train, Ty,
};
use crate::syntax::{self, Dim, File, Ident, Item, Stmt, StmtKind, TrainValue};

/// The most instructions a program may have after unrolling.
pub const MAX_INSTRUCTIONS: usize = 100_000;
/// The most training steps a `train` block may ask for.
pub const MAX_STEPS: usize = 1_000;

/// What a name stands for.
#[derive(Clone, Debug)]
pub(crate) enum Binding {
    Const(i64),
    LoopVar(i64),
    /// An input: a point, or a sequence whose elements are `Input` nodes by time.
    Input {
        input: usize,
        nodes: Vec<NodeId>,
    },
    Param(usize),
    Vector(NodeId),
    Output,
    Moment(NodeId),
    /// A named function of moments (Netsor+ scalar, README "Scalars and reductions"):
    /// kept as an expression over its moments and inlined where it is used, so the IR
    /// holds only `Moment`s feeding `Nonlin`s.
    Scalar(crate::lower::expr::Pending),
    /// Its definition failed; uses are silent.
    Poison,
}

/// A family of values under one name: a plain name has one element at index `[]`.
#[derive(Debug)]
struct Family {
    arity: usize,
    def_span: Span,
    elems: HashMap<Vec<i64>, Binding>,
    /// Order of first definition, for cli.md's output order.
    order: usize,
}

pub(crate) struct Lowerer<'a> {
    pub(crate) src: &'a str,
    pub(crate) prog: Program,
    pub(crate) diags: Vec<Diagnostic>,
    names: HashMap<String, Family>,
    /// Every name assigned anywhere in the file, with its first assignment: tells
    /// "defined later" (E0006) from "never defined" (E0004).
    pub(crate) assigned_later: HashMap<String, Span>,
    /// Being defined by the current statement (for E0007).
    pub(crate) defining: Option<(String, Vec<i64>)>,
    /// First node created by the current statement.
    pub(crate) stmt_start: usize,
    pub(crate) width_span: Span,
    outputs: Vec<(usize, Vec<i64>, NodeId)>,
    observes: Vec<(usize, Vec<i64>, NodeId)>,
    used_params: Vec<bool>,
    budget_error: bool,
    /// Counter giving each family its order of first definition.
    next_order: usize,
    /// Every `mean(..)` lowered so far, by its integrand over operand ids: a moment
    /// written twice is one node (`scalar.rs`).
    pub(crate) moments: HashMap<String, NodeId>,
}

/// Lowers a parsed file. Returns the program when there was no error, and every
/// diagnostic (errors and warnings) in source order.
pub fn lower(file: &File, src: &str) -> (Option<Program>, Vec<Diagnostic>) {
    let mut l = Lowerer {
        src,
        prog: Program::new(String::new(), Preset::Ntk),
        diags: Vec::new(),
        names: HashMap::new(),
        assigned_later: HashMap::new(),
        defining: None,
        stmt_start: 0,
        width_span: Span::default(),
        outputs: Vec::new(),
        observes: Vec::new(),
        used_params: Vec::new(),
        budget_error: false,
        next_order: 0,
        moments: HashMap::new(),
    };
    l.globals(file);
    collect_assigned(
        file.items.iter().filter_map(|i| match i {
            Item::Stmt(s) => Some(s),
            _ => None,
        }),
        &mut l.assigned_later,
    );
    let mut train = None;
    for item in &file.items {
        if l.budget_error {
            break;
        }
        match item {
            Item::Width(..) | Item::Preset(..) => {}
            Item::Const { name, value, span } => l.const_decl(name, value, *span),
            Item::Input {
                name,
                dim,
                len,
                span,
            } => l.input_decl(name, dim, len.as_ref(), *span),
            Item::Param(p) => l.param_decl(p),
            Item::Train(t) => {
                if let Some((_, first)) = &train {
                    l.diags.push(
                        Diagnostic::error(
                            "E0005",
                            "more than one `train` block",
                            t.span,
                            "second `train` block",
                        )
                        .with_secondary(*first, "first `train` block here")
                        .with_help("merge the blocks: one program trains once"),
                    );
                } else {
                    train = Some((t, t.span));
                }
            }
            Item::Stmt(s) => l.stmt(s),
        }
    }
    if let Some((t, _)) = train {
        if !l.budget_error {
            l.train(t);
        }
    }
    l.finish()
}

fn collect_assigned<'s>(stmts: impl Iterator<Item = &'s Stmt>, out: &mut HashMap<String, Span>) {
    for s in stmts {
        match &s.kind {
            StmtKind::Assign { lhs, .. }
            | StmtKind::Output { lhs, .. }
            | StmtKind::Observe { lhs, .. } => {
                out.entry(lhs.name.name.clone()).or_insert(lhs.name.span);
            }
            StmtKind::For { body, .. } => collect_assigned(body.iter(), out),
        }
    }
}

impl<'a> Lowerer<'a> {
    pub(crate) fn err(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    /// `width` and `parameterization` are global: exactly one width, at most one preset.
    fn globals(&mut self, file: &File) {
        let mut width: Option<(&Ident, Span)> = None;
        let mut preset: Option<Span> = None;
        for item in &file.items {
            match item {
                Item::Width(name, span) => {
                    if let Some((first, fspan)) = width {
                        self.err(
                            Diagnostic::error(
                                "E0018",
                                "more than one `width` declaration",
                                *span,
                                "second width",
                            )
                            .with_secondary(fspan, format!("`{}` declared here", first.name))
                            .with_help(
                                "a program has exactly one infinite dimension; remove this line",
                            ),
                        );
                    } else {
                        width = Some((name, *span));
                        self.prog.width = name.name.clone();
                        self.width_span = name.span;
                    }
                }
                Item::Preset(name, span) => {
                    if let Some(f) = preset {
                        self.err(
                            Diagnostic::error(
                                "E0005",
                                "more than one `parameterization`",
                                *span,
                                "second one",
                            )
                            .with_secondary(f, "first one here")
                            .with_help(
                                "keep one preset; give single parameters explicit laws instead",
                            ),
                        );
                        continue;
                    }
                    preset = Some(*span);
                    match Preset::from_name(&name.name) {
                        Some(p) => self.prog.preset = p,
                        None => {
                            let sugg = nearest(&name.name, Preset::ALL.iter().map(|p| p.name()));
                            self.err(
                                Diagnostic::error(
                                    "E0019",
                                    format!("unknown parameterization `{}`", name.name),
                                    name.span,
                                    "not a preset",
                                )
                                .with_help(match sugg {
                                    Some(s) => format!(
                                        "did you mean `{s}`? presets are `sp`, `ntk` and `mup`"
                                    ),
                                    None => "presets are `sp`, `ntk` and `mup`".to_string(),
                                }),
                            );
                        }
                    }
                }
                _ => {}
            }
        }
        if width.is_none() {
            self.err(
                Diagnostic::error(
                    "E0018",
                    "the program declares no `width`",
                    Span::new(0, 0),
                    "no `width n` in this file",
                )
                .with_help(
                    "add `width n` at the top: it names the dimension that goes to infinity",
                ),
            );
            self.prog.width = "n".to_string();
        }
    }

    // ---- names ------------------------------------------------------------------

    /// Defines `name[index]`. Reports duplicates and arity mismatches.
    pub(crate) fn define(&mut self, name: &Ident, index: Vec<i64>, b: Binding, span: Span) -> bool {
        let order = self.next_order;
        self.next_order += 1;
        let fam = self
            .names
            .entry(name.name.clone())
            .or_insert_with(|| Family {
                arity: index.len(),
                def_span: span,
                elems: HashMap::new(),
                order,
            });
        if fam.arity != index.len() {
            let (arity, def) = (fam.arity, fam.def_span);
            self.err(
                Diagnostic::error(
                    "E0025",
                    format!("`{}` is defined with {arity} index(es) elsewhere, here with {}", name.name, index.len()),
                    name.span,
                    "inconsistent indexing",
                )
                .with_secondary(def, "first defined here")
                .with_help("a name is either plain (`h`) or indexed (`h[t]`) with the same number of indices everywhere"),
            );
            return false;
        }
        if let Some(prev) = fam.elems.get(&index) {
            if !matches!(prev, Binding::Poison) {
                let def = fam.def_span;
                self.err(
                    Diagnostic::error(
                        "E0005",
                        format!("`{}` is defined twice", show_name(&name.name, &index)),
                        name.span,
                        "redefined here",
                    )
                    .with_secondary(def, "first definition of this name")
                    .with_help("every value is assigned once (the program is straight-line code); use a new name or an index"),
                );
                return false;
            }
        }
        fam.elems.insert(index, b);
        true
    }

    pub(crate) fn poison(&mut self, name: &Ident, index: Vec<i64>) {
        let order = self.next_order;
        self.next_order += 1;
        let fam = self
            .names
            .entry(name.name.clone())
            .or_insert_with(|| Family {
                arity: index.len(),
                def_span: name.span,
                elems: HashMap::new(),
                order,
            });
        fam.elems.entry(index).or_insert(Binding::Poison);
    }

    /// Looks `name[index]` up, with E0004 / E0006 / E0007 / E0025 on failure.
    pub(crate) fn lookup(
        &mut self,
        name: &Ident,
        index: &[i64],
        use_span: Span,
    ) -> Option<Binding> {
        if let Some(fam) = self.names.get(&name.name) {
            // Inputs declared as sequences are indexed by time, 1-based.
            if let Some(Binding::Input { input, nodes }) = fam.elems.get(&Vec::new()) {
                let decl = &self.prog.inputs[*input];
                return match (decl.len, index.len()) {
                    (None, 0) => Some(Binding::Input {
                        input: *input,
                        nodes: nodes.clone(),
                    }),
                    (Some(t), 1) => {
                        let i = index[0];
                        if i < 1 || i as usize > t {
                            self.err(
                                Diagnostic::error(
                                    "E0015",
                                    format!("`{}[{i}]` is out of range: the sequence has elements 1..={t}", name.name),
                                    use_span,
                                    "index out of range",
                                )
                                .with_secondary(decl.span, format!("declared with length {t} here"))
                                .with_help("sequence elements are numbered from 1"),
                            );
                            None
                        } else {
                            Some(Binding::Vector(nodes[i as usize - 1]))
                        }
                    }
                    (None, _) => {
                        let span = decl.span;
                        self.err(
                            Diagnostic::error(
                                "E0025",
                                format!("`{}` is a single point, not a sequence", name.name),
                                use_span,
                                "indexed here",
                            )
                            .with_secondary(span, "declared here")
                            .with_help(format!(
                                "declare a sequence with `input {} : d [T]`",
                                name.name
                            )),
                        );
                        None
                    }
                    (Some(t), _) => {
                        let span = decl.span;
                        self.err(
                            Diagnostic::error(
                                "E0025",
                                format!(
                                    "`{}` is a sequence of {t} points and needs one index",
                                    name.name
                                ),
                                use_span,
                                "needs `[t]`",
                            )
                            .with_secondary(span, "declared here")
                            .with_help(format!("write `{}[t]` for the point at time t", name.name)),
                        );
                        None
                    }
                };
            }
            if fam.arity != index.len() {
                let (arity, def) = (fam.arity, fam.def_span);
                self.err(
                    Diagnostic::error(
                        "E0025",
                        format!(
                            "`{}` takes {arity} index(es), used with {}",
                            name.name,
                            index.len()
                        ),
                        use_span,
                        "wrong number of indices",
                    )
                    .with_secondary(def, "defined here")
                    .with_help(if arity == 0 {
                        format!("`{}` is a plain name: drop the brackets", name.name)
                    } else {
                        format!("write `{}[..]` with {arity} index(es)", name.name)
                    }),
                );
                return None;
            }
            if let Some(b) = fam.elems.get(index) {
                return match b {
                    Binding::Poison => None,
                    b => Some(b.clone()),
                };
            }
            // An index outside every defined element's range in some position (`a[t, 5]`
            // when `a` has positions 1..=3): out of range, unless assigned later.
            let itself = self
                .defining
                .as_ref()
                .is_some_and(|(d, dix)| *d == name.name && dix.as_slice() == index);
            if !index.is_empty() && !fam.elems.is_empty() && !itself {
                let mut lo = vec![i64::MAX; index.len()];
                let mut hi = vec![i64::MIN; index.len()];
                for k in fam.elems.keys() {
                    for (j, &v) in k.iter().enumerate() {
                        lo[j] = lo[j].min(v);
                        hi[j] = hi[j].max(v);
                    }
                }
                if let Some(j) = (0..index.len()).find(|&j| index[j] < lo[j] || index[j] > hi[j]) {
                    let def = fam.def_span;
                    let shown = show_name(&name.name, index);
                    let (l, h) = (lo[j], hi[j]);
                    self.err(
                        Diagnostic::error(
                            "E0015",
                            format!(
                                "`{shown}` is out of range: index {} of `{}` runs over {l}..={h} so far",
                                j + 1,
                                name.name
                            ),
                            use_span,
                            "index out of range",
                        )
                        .with_secondary(def, "first defined here")
                        .with_help("check the index; if this element is assigned later, move its definition above this use"),
                    );
                    return None;
                }
            }
        }
        let shown = show_name(&name.name, index);
        if let Some((def, dix)) = &self.defining {
            if *def == name.name && dix.as_slice() == index {
                self.err(
                    Diagnostic::error("E0007", format!("`{shown}` is defined in terms of itself"), use_span, "refers to the value being defined")
                        .with_help("a tensor program is straight-line code: use the previous value, e.g. `h[t-1]`, or a new name"),
                );
                return None;
            }
        }
        if self.names.contains_key(&name.name) || self.assigned_later.contains_key(&name.name) {
            let mut d = Diagnostic::error(
                "E0006",
                format!("`{shown}` is used before it is defined"),
                use_span,
                "not defined yet",
            );
            if let Some(s) = self.assigned_later.get(&name.name) {
                d = d.with_secondary(*s, "assigned here");
            }
            self.err(d.with_help("move the definition above this use (statements run in order)"));
            return None;
        }
        let cands: Vec<&str> = self.names.keys().map(|s| s.as_str()).collect();
        let help = match nearest(&name.name, cands) {
            Some(s) => format!("did you mean `{s}`?"),
            None => {
                "declare it with `param`, `input` or `const`, or assign it before use".to_string()
            }
        };
        self.err(
            Diagnostic::error(
                "E0004",
                format!("cannot find `{}` in this program", name.name),
                name.span,
                "not defined",
            )
            .with_help(help),
        );
        None
    }

    pub(crate) fn mark_used(&mut self, p: usize) {
        if let Some(u) = self.used_params.get_mut(p) {
            *u = true;
        }
    }

    /// Pushes a node, enforcing the instruction limit.
    pub(crate) fn push(
        &mut self,
        op: Op,
        operands: &[NodeId],
        name: Option<String>,
        span: Span,
    ) -> Option<NodeId> {
        if self.prog.len() >= MAX_INSTRUCTIONS {
            if !self.budget_error {
                self.budget_error = true;
                self.err(
                    Diagnostic::error(
                        "E0016",
                        format!("the program unrolls to more than {MAX_INSTRUCTIONS} instructions"),
                        span,
                        "limit reached while lowering this",
                    )
                    .with_help("shorten the loops; tpc's instruction limit keeps compilation and memory bounded"),
                );
            }
            return None;
        }
        Some(self.prog.push(op, operands, name, span))
    }

    // ---- declarations -----------------------------------------------------------

    fn const_decl(&mut self, name: &Ident, value: &syntax::Expr, span: Span) {
        if name.name == self.prog.width {
            self.err(self.shadow_width(name));
            return;
        }
        match self.eval_int(value) {
            Some(v) => {
                self.define(name, vec![], Binding::Const(v), span);
            }
            None => self.poison(name, vec![]),
        }
    }

    fn shadow_width(&self, name: &Ident) -> Diagnostic {
        Diagnostic::error(
            "E0005",
            format!("`{}` is the width and cannot be redefined", name.name),
            name.span,
            "redefines the width",
        )
        .with_secondary(self.width_span, "the width is declared here")
        .with_help("choose another name")
    }

    /// A finite dimension: a positive integer literal or a `const`.
    pub(crate) fn finite_dim(&mut self, d: &Dim, what: &str) -> Option<usize> {
        let v = match d {
            Dim::Int(v, _) => *v as i64,
            Dim::Name(id) if id.name == self.prog.width => {
                self.err(
                    Diagnostic::error(
                        "E0022",
                        format!("{what} must be finite, not the width `{}`", id.name),
                        id.span,
                        "infinite dimension here",
                    )
                    .with_help("inputs live in a fixed R^d; only hidden vectors have width n"),
                );
                return None;
            }
            Dim::Name(id) => match self.lookup(id, &[], id.span)? {
                Binding::Const(v) => v,
                _ => {
                    self.err(
                        Diagnostic::error(
                            "E0014",
                            format!("`{}` is not an integer constant", id.name),
                            id.span,
                            "not a `const`",
                        )
                        .with_help("dimensions are integer literals or `const` names"),
                    );
                    return None;
                }
            },
        };
        if !(1..=1 << 20).contains(&v) {
            self.err(
                Diagnostic::error(
                    "E0015",
                    format!("{what} must be between 1 and {}, found {v}", 1 << 20),
                    d.span(),
                    "out of range",
                )
                .with_help("finite dimensions are small positive integers"),
            );
            return None;
        }
        Some(v as usize)
    }

    fn input_decl(&mut self, name: &Ident, dim: &Dim, len: Option<&Dim>, span: Span) {
        let Some(d) = self.finite_dim(dim, "an input dimension") else {
            return self.poison(name, vec![]);
        };
        let t = match len {
            None => None,
            Some(l) => match self.finite_dim(l, "a sequence length") {
                Some(t) if t <= 10_000 => Some(t),
                Some(t) => {
                    self.err(
                        Diagnostic::error(
                            "E0015",
                            format!("sequence length {t} is above the limit of 10000"),
                            l.span(),
                            "too long",
                        )
                        .with_help("shorten the sequence"),
                    );
                    return self.poison(name, vec![]);
                }
                None => return self.poison(name, vec![]),
            },
        };
        let idx = self.prog.inputs.len();
        self.prog.inputs.push(InputDecl {
            name: name.name.clone(),
            dim: d,
            len: t,
            span,
        });
        let mut nodes = Vec::new();
        match t {
            None => {
                if let Some(id) = self.push(
                    Op::Input {
                        input: idx,
                        time: None,
                    },
                    &[],
                    Some(name.name.clone()),
                    span,
                ) {
                    nodes.push(id)
                }
            }
            Some(t) => {
                for k in 1..=t {
                    if let Some(id) = self.push(
                        Op::Input {
                            input: idx,
                            time: Some(k),
                        },
                        &[],
                        Some(format!("{}[{k}]", name.name)),
                        span,
                    ) {
                        nodes.push(id)
                    }
                }
            }
        }
        self.define(name, vec![], Binding::Input { input: idx, nodes }, span);
    }

    fn param_decl(&mut self, p: &syntax::ParamDecl) {
        if p.name.name == self.prog.width {
            self.err(self.shadow_width(&p.name));
            return;
        }
        let Some(shape) = self.shape(p) else {
            return self.poison(&p.name, vec![]);
        };
        let Some((law, preset, law_span)) = self.law(p, shape) else {
            return self.poison(&p.name, vec![]);
        };
        let idx = self.prog.params.len();
        let Some(node) = self.push(Op::Param(idx), &[], Some(p.name.name.clone()), p.span) else {
            return;
        };
        self.prog.params.push(Param {
            name: p.name.name.clone(),
            shape,
            law,
            law_span,
            preset,
            span: p.span,
            node,
        });
        self.used_params.push(false);
        self.define(&p.name, vec![], Binding::Param(idx), p.span);
    }

    fn shape(&mut self, p: &syntax::ParamDecl) -> Option<Shape> {
        let w = self.prog.width.clone();
        let is_n = |d: &Dim| matches!(d, Dim::Name(i) if i.name == w);
        let is_one = |d: &Dim| matches!(d, Dim::Int(1, _));
        let bad = |l: &mut Self, msg: &str| {
            l.err(
                Diagnostic::error("E0022", format!("invalid shape for `{}`: {msg}", p.name.name), p.shape_span, "this shape")
                    .with_help(format!(
                        "shapes are `{w} x {w}` (hidden), `{w} x d` (input layer), `1 x {w}` (readout), `{w}` (bias or initial vector) and `1` (scalar bias)"
                    )),
            );
            None
        };
        match p.shape.as_slice() {
            [a] if is_n(a) => Some(Shape::Vector),
            [a] if is_one(a) => Some(Shape::Scalar),
            [a, b] if is_n(a) && is_n(b) => Some(Shape::Hidden),
            [a, b] if is_one(a) && is_n(b) => Some(Shape::Readout),
            [a, b] if is_n(a) => {
                let d = self.finite_dim(b, "an input-layer fan-in")?;
                Some(Shape::Input(d))
            }
            [_] => bad(self, "a vector parameter has shape `n` or `1`"),
            [a, _] if is_n(a) || is_one(a) => bad(self, "unsupported dimensions"),
            [_, b] if is_n(b) => bad(
                self,
                "a readout has one row (`1 x n`); declare one readout per output",
            ),
            [_, _] => bad(self, "a matrix needs the width in its first dimension"),
            _ => bad(self, "at most two dimensions"),
        }
    }

    // ---- statements -------------------------------------------------------------

    fn stmt(&mut self, s: &Stmt) {
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

    fn lhs_index(&mut self, lhs: &syntax::Lhs) -> Option<Vec<i64>> {
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

    fn assign(&mut self, lhs: &syntax::Lhs, rhs: &syntax::Expr) {
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

    fn observe(&mut self, lhs: &syntax::Lhs, rhs: &syntax::Expr, span: Span) {
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

    fn for_loop(
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

    fn output(&mut self, lhs: &syntax::Lhs, rhs: &syntax::Expr, span: Span) {
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

    fn train(&mut self, t: &syntax::TrainBlock) {
        let mut loss = None;
        let mut lr = None;
        let mut steps = None;
        let mut data = None;
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for e in &t.entries {
            let key = e.key.name.as_str();
            if let Some(prev) = seen.insert(key, e.key.span) {
                self.err(
                    Diagnostic::error(
                        "E0005",
                        format!("`{key}` is set twice in `train`"),
                        e.key.span,
                        "set again here",
                    )
                    .with_secondary(prev, "first set here")
                    .with_help("keep one value"),
                );
                continue;
            }
            match (key, &e.value) {
                ("loss", TrainValue::Expr(ex)) => match &ex.kind {
                    syntax::ExprKind::Name { name, index } if index.is_empty() => {
                        match name.name.as_str() {
                            "mse" => loss = Some(Loss::Mse),
                            "xent" => loss = Some(Loss::Xent),
                            other => self.err(
                                Diagnostic::error(
                                    "E0021",
                                    format!("unknown loss `{other}`"),
                                    name.span,
                                    "not a loss",
                                )
                                .with_help("losses are `mse` and `xent`"),
                            ),
                        }
                    }
                    _ => self.err(
                        Diagnostic::error(
                            "E0021",
                            "`loss` must be `mse` or `xent`",
                            ex.span,
                            "not a loss name",
                        )
                        .with_help("write `loss = mse`"),
                    ),
                },
                ("lr", TrainValue::Expr(ex)) => {
                    if let Some(v) = self.eval_num(ex) {
                        if v > 0.0 && v.is_finite() {
                            lr = Some((v, ex.span));
                        } else {
                            self.err(
                                Diagnostic::error(
                                    "E0021",
                                    format!("the learning rate must be a positive finite number, found {v}"),
                                    ex.span,
                                    "not positive",
                                )
                                .with_help("write e.g. `lr = 0.1`"),
                            );
                        }
                    }
                }
                ("steps", TrainValue::Expr(ex)) => {
                    if let Some(v) = self.eval_int(ex) {
                        if (0..=MAX_STEPS as i64).contains(&v) {
                            steps = Some(v as usize);
                        } else {
                            self.err(
                                Diagnostic::error(
                                    "E0015",
                                    format!("`steps` must be between 0 and {MAX_STEPS}, found {v}"),
                                    ex.span,
                                    "out of range",
                                )
                                .with_help("training is unrolled into the program; keep it short"),
                            );
                        }
                    }
                }
                ("data", TrainValue::Data(samples, span)) => data = Some((samples, *span)),
                ("loss" | "lr" | "steps" | "data", _) => self.err(
                    Diagnostic::error(
                        "E0021",
                        format!("`{key}` has the wrong kind of value"),
                        e.span,
                        "here",
                    )
                    .with_help(
                        "`loss = mse`, `lr = 0.5`, `steps = 3`, `data = [ ([1.0, 0.0], 1.0), .. ]`",
                    ),
                ),
                (other, _) => {
                    let s = nearest(other, ["loss", "lr", "steps", "data"]);
                    self.err(
                        Diagnostic::error(
                            "E0021",
                            format!("unknown key `{other}` in `train`"),
                            e.key.span,
                            "unknown key",
                        )
                        .with_help(match s {
                            Some(s) => {
                                format!("did you mean `{s}`? keys are loss, lr, steps and data")
                            }
                            None => "keys are loss, lr, steps and data".to_string(),
                        }),
                    );
                }
            }
        }
        let unknown_key = t
            .entries
            .iter()
            .any(|e| !matches!(e.key.name.as_str(), "loss" | "lr" | "steps" | "data"));
        let mut missing = Vec::new();
        if loss.is_none() && !seen.contains_key("loss") {
            missing.push("loss");
        }
        if lr.is_none() && !seen.contains_key("lr") {
            missing.push("lr");
        }
        if steps.is_none() && !seen.contains_key("steps") {
            missing.push("steps");
        }
        if data.is_none() && !seen.contains_key("data") {
            missing.push("data");
        }
        // A misspelt key is already reported; do not also call the key missing.
        if !missing.is_empty() && !unknown_key {
            self.err(
                Diagnostic::error(
                    "E0021",
                    format!("`train` is missing {}", missing.join(", ")),
                    t.span,
                    "incomplete",
                )
                .with_help("a train block sets loss, lr, steps and data"),
            );
        }
        let row: usize = self.prog.inputs.iter().map(InputDecl::row_len).sum();
        let outs = self.outputs.len();
        if outs == 0 {
            self.err(
                Diagnostic::error(
                    "E0021",
                    "`train` needs an `output` to fit",
                    t.span,
                    "nothing to train",
                )
                .with_help("declare `output f = v @ x`"),
            );
            return;
        }
        let (Some(loss), Some((lr, lr_span)), Some(steps), Some((samples, dspan))) =
            (loss, lr, steps, data)
        else {
            return;
        };
        if samples.is_empty() {
            self.err(
                Diagnostic::error("E0021", "the training data is empty", dspan, "no samples")
                    .with_help("give at least one `([x..], y)`"),
            );
            return;
        }
        let mut ok = true;
        for s in samples.iter() {
            if s.x.len() != row {
                ok = false;
                self.err(
                    Diagnostic::error(
                        "E0017",
                        format!(
                            "a training input has {} numbers, the program's inputs need {row}",
                            s.x.len()
                        ),
                        s.x_span,
                        format!("expected {row} numbers"),
                    )
                    .with_help(input_help(&self.prog.inputs)),
                );
            }
            if s.y.len() != outs {
                ok = false;
                self.err(
                    Diagnostic::error(
                        "E0017",
                        format!(
                            "a training target has {} numbers, the program has {outs} output(s)",
                            s.y.len()
                        ),
                        s.y_span,
                        format!("expected {outs} target(s)"),
                    )
                    .with_help("give one target per output, in output order"),
                );
            }
            if loss == Loss::Xent && s.y.iter().any(|&y| y != 0.0 && y != 1.0) {
                ok = false;
                self.err(
                    Diagnostic::error(
                        "E0017",
                        "`xent` targets must be 0 or 1",
                        s.y_span,
                        "not 0 or 1",
                    )
                    .with_help("use `loss = mse` for real-valued targets"),
                );
            }
        }
        if ok {
            self.prog.train = Some(Train {
                loss,
                lr,
                steps,
                data: samples
                    .iter()
                    .map(|s| Sample {
                        x: s.x.clone(),
                        y: s.y.clone(),
                    })
                    .collect(),
                span: t.span,
                lr_span,
            });
        }
    }

    fn finish(mut self) -> (Option<Program>, Vec<Diagnostic>) {
        self.outputs.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        self.observes.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        self.prog.outputs = self.outputs.iter().map(|o| o.2).collect();
        self.prog.observes = self.observes.iter().map(|o| o.2).collect();
        let has_error = self.diags.iter().any(Diagnostic::is_error);
        if !has_error {
            for (i, used) in self.used_params.iter().enumerate() {
                if !used {
                    let p = &self.prog.params[i];
                    self.diags.push(
                        Diagnostic::warning(
                            "W0001",
                            format!("parameter `{}` is never used", p.name),
                            p.span,
                            "declared here",
                        )
                        .with_help("remove it, or use it in the network"),
                    );
                }
            }
            if self.prog.outputs.is_empty() && self.prog.observes.is_empty() {
                self.diags.push(
                    Diagnostic::warning(
                        "W0002",
                        "the program has no `output` and no `observe`",
                        Span::new(0, 0),
                        "nothing is reported",
                    )
                    .with_help("add `output f = v @ x` or `observe m = mean(x * x)`"),
                );
            }
        }
        self.diags.sort_by_key(|d| (d.span.start, d.span.end));
        // Loops repeat a statement's mistake once per iteration: report it once.
        self.diags
            .dedup_by(|a, b| a.code == b.code && a.span == b.span);
        if has_error {
            (None, self.diags)
        } else {
            debug_assert!(self.prog.validate().is_ok());
            (Some(self.prog), self.diags)
        }
    }
}

fn input_help(inputs: &[InputDecl]) -> String {
    let parts: Vec<String> = inputs
        .iter()
        .map(|i| match i.len {
            None => format!("`{}` in R^{}", i.name, i.dim),
            Some(t) => format!(
                "`{}`: {t} points in R^{} ({} numbers, time-major)",
                i.name,
                i.dim,
                t * i.dim
            ),
        })
        .collect();
    if parts.is_empty() {
        "the program declares no input".to_string()
    } else {
        format!("a training input is one row: {}", parts.join(", then "))
    }
}

fn count_stmts(body: &[Stmt]) -> usize {
    body.iter()
        .map(|s| match &s.kind {
            StmtKind::For { body, .. } => 1 + count_stmts(body),
            _ => 1,
        })
        .sum()
}

pub(crate) fn show_name(name: &str, index: &[i64]) -> String {
    if index.is_empty() {
        name.to_string()
    } else {
        let ix: Vec<String> = index.iter().map(|i| i.to_string()).collect();
        format!("{name}[{}]", ix.join(", "))
    }
}
