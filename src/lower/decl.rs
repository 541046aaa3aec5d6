//! Declarations: `width`, `parameterization`, `const`, `input` and `param` — the
//! globals every statement refers to, with their shapes and laws (`laws.rs`).

use super::{Binding, Lowerer};
use crate::diag::{nearest, Diagnostic};
use crate::ir::{InputDecl, Op, Param, Preset, Shape, Span};
use crate::syntax::{self, Dim, File, Ident, Item};

impl<'a> Lowerer<'a> {
    /// `width` and `parameterization` are global: exactly one width, at most one preset.
    pub(super) fn globals(&mut self, file: &File) {
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

    pub(super) fn const_decl(&mut self, name: &Ident, value: &syntax::Expr, span: Span) {
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

    pub(super) fn shadow_width(&self, name: &Ident) -> Diagnostic {
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

    pub(super) fn input_decl(&mut self, name: &Ident, dim: &Dim, len: Option<&Dim>, span: Span) {
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

    pub(super) fn param_decl(&mut self, p: &syntax::ParamDecl) {
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

    pub(super) fn shape(&mut self, p: &syntax::ParamDecl) -> Option<Shape> {
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
}
