//! Checks and lowering: from the syntax tree to the tensor-program IR.
//!
//! One pass in source order resolves names, evaluates integer expressions and laws,
//! unrolls loops and type-checks every use, pushing IR nodes as it goes. A statement
//! with an error is reported and its name "poisoned", so one mistake gives one
//! diagnostic rather than a cascade. Loops are refused before they unroll when they
//! would pass [`MAX_INSTRUCTIONS`].
//!
//! The `Lowerer` (names, scopes, node pushing) lives here; its passes are split by
//! what they lower: `decl` (width, preset, const, input, param), `stmt` (assignments,
//! observe, output, for loops), `expr` (expressions and laws of vectors), `scalar`
//! (Netsor+ moments and functions of them), `laws` (initialization laws and
//! multipliers), `train` (the `train` block).

mod decl;
mod expr;
mod laws;
mod scalar;
mod stmt;
mod train;

use std::collections::HashMap;

use crate::diag::{nearest, Diagnostic};
use crate::ir::{InputDecl, NodeId, Op, Preset, Program, Span};
use crate::syntax::{self, File, Ident, Item, Stmt, StmtKind};

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
    /// The `train` block's optimizer is entrywise (`adam`, `adamw`): the `mup` preset
    /// then takes Adam's learning rates (`Preset::law_for`). Read from the syntax before
    /// any parameter is declared, since `train` comes last in a file.
    pub(crate) entrywise_optimizer: bool,
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
        entrywise_optimizer: entrywise_optimizer(file),
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

/// Whether a `train` block names an entrywise optimizer (`optimizer = adam(…)` or
/// `adamw(…)`); the block itself is checked later, in `train.rs`.
fn entrywise_optimizer(file: &File) -> bool {
    file.items.iter().any(|i| match i {
        Item::Train(t) => t.entries.iter().any(|e| {
            e.key.name == "optimizer"
                && matches!(&e.value, syntax::TrainValue::Expr(ex) if matches!(
                    &ex.kind,
                    syntax::ExprKind::Call { fun, .. } if fun.name == "adam" || fun.name == "adamw"
                ))
        }),
        _ => false,
    })
}
