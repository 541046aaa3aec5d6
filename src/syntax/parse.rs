//! From text to [`File`]: the pest grammar (`grammar/tp.pest`) and the tree builder.
//!
//! pest parses by recursive descent, so deep nesting would exhaust the stack. Two guards
//! keep every input safe: a linear pre-scan refuses nesting deeper than [`MAX_NESTING`]
//! before pest runs, and `crate::compile` runs the front end on a thread with a large
//! stack. A call limit stops pathological backtracking.

use pest::iterators::Pair;
use pest::Parser;

use super::*;
use crate::diag::Diagnostic;

#[derive(pest_derive::Parser)]
#[grammar = "../grammar/tp.pest"]
struct TpParser;

/// Deepest bracket nesting (and longest `@` chain) accepted.
pub const MAX_NESTING: usize = 256;

/// Most bytes in one source file.
pub const MAX_SOURCE: usize = 4 << 20;

type R<T> = Result<T, Box<Diagnostic>>;

/// The span of a pair without the whitespace pest skips after its last token.
fn span_of(p: &Pair<Rule>) -> Span {
    let s = p.as_span();
    Span::new(s.start(), s.start() + p.as_str().trim_end().len())
}

/// Parses one source file.
pub fn parse(src: &str) -> R<File> {
    prescan(src)?;
    pest::set_call_limit(std::num::NonZeroUsize::new(50_000_000));
    let mut pairs =
        TpParser::parse(Rule::program, src).map_err(|e| Box::new(syntax_error(src, e)))?;
    let program = pairs.next().ok_or_else(|| internal(Span::new(0, 0)))?;
    let mut items = Vec::new();
    for p in program.into_inner() {
        if p.as_rule() == Rule::EOI {
            break;
        }
        items.push(item(p)?);
    }
    Ok(File { items })
}

/// Refuses inputs that would make the recursive-descent parser recurse too deeply.
fn prescan(src: &str) -> R<()> {
    if src.len() > MAX_SOURCE {
        return Err(Box::new(
            Diagnostic::error(
                "E0003",
                format!(
                    "the file is {} bytes; tpc reads at most {MAX_SOURCE}",
                    src.len()
                ),
                Span::new(0, 0),
                "file too large",
            )
            .with_help("split the program or generate it with loops"),
        ));
    }
    let bytes = src.as_bytes();
    let (mut depth, mut ats, mut i) = (0usize, 0usize, 0usize);
    while i < bytes.len() {
        match bytes[i] {
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' && bytes[i] != b'\r' {
                    i += 1;
                }
                continue;
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'@' => ats += 1,
            _ => {}
        }
        if depth > MAX_NESTING || ats > 64 * MAX_NESTING {
            let what = if depth > MAX_NESTING {
                format!("nesting deeper than {MAX_NESTING} levels")
            } else {
                format!(
                    "more than {} matrix products `@` in one file",
                    64 * MAX_NESTING
                )
            };
            return Err(Box::new(
                Diagnostic::error("E0003", what, Span::new(i, i + 1), "too deeply nested here")
                    .with_help("name intermediate values with assignments, or use a `for` loop"),
            ));
        }
        i += 1;
    }
    Ok(())
}

fn rule_name(r: &Rule) -> &'static str {
    match r {
        Rule::EOI => "end of file",
        Rule::ident | Rule::lhs | Rule::name_ref | Rule::mat_ref => "a name",
        Rule::integer | Rule::dim => "an integer",
        Rule::number | Rule::signed_num | Rule::signed_ratio => "a number",
        Rule::expr | Rule::term | Rule::factor | Rule::power | Rule::atom | Rule::reduce => {
            "an expression"
        }
        Rule::mono | Rule::mono_term | Rule::mono_atom => "a monomial such as `1/n`",
        Rule::exponent => "an exponent such as `(-1/2)`",
        Rule::shape => "a shape such as `n x n`",
        Rule::add_op | Rule::mul_op => "an operator",
        Rule::range_op => "`..=` or `..`",
        Rule::rparen => "`)`",
        Rule::eq => "`=`",
        Rule::block => "`{`",
        Rule::explicit_law | Rule::preset_law => "a law (`~ N(0, var)` or `{ std = .. }`)",
        Rule::assign | Rule::output_stmt | Rule::observe_stmt | Rule::for_loop => "a statement",
        Rule::width_decl | Rule::const_decl | Rule::input_decl | Rule::param_decl => {
            "a declaration"
        }
        Rule::preset_decl | Rule::train_block => "a declaration",
        Rule::data_list | Rule::sample | Rule::vector => "training data `[ ([..], y), .. ]`",
        Rule::index => "`[`",
        Rule::transpose => "`.T`",
        Rule::mult => "`*`",
        Rule::lr_clause | Rule::lr_key => "`lr`",
        _ => "something else",
    }
}

fn syntax_error(src: &str, e: pest::error::Error<Rule>) -> Diagnostic {
    use pest::error::{ErrorVariant, InputLocation};
    let (start, end) = match e.location {
        InputLocation::Pos(p) => (p, p),
        InputLocation::Span((a, b)) => (a, b),
    };
    // Point at the offending token (to the end of the word), or the end of the file.
    let tok_end = if end > start {
        end
    } else {
        let rest = src.get(start.min(src.len())..).unwrap_or("");
        let word = |c: char| c.is_alphanumeric() || c == '_';
        let n = match rest.chars().next() {
            None => 0,
            Some(c) if word(c) => rest
                .char_indices()
                .find(|(_, c)| !word(*c))
                .map_or(rest.len(), |(i, _)| i)
                .min(32),
            Some(c) => c.len_utf8(),
        };
        start + n
    };
    let found = src.get(start..tok_end.min(src.len())).unwrap_or("");
    let (message, label) = match &e.variant {
        ErrorVariant::ParsingError { positives, .. } => {
            // A missing closing bracket or `=` says more than the list of everything
            // that could have continued the expression.
            if positives.contains(&Rule::rparen) {
                let found = if found.is_empty() {
                    "end of file".to_string()
                } else {
                    crate::diag::quote(found)
                };
                return Diagnostic::error(
                    "E0001",
                    format!("syntax error: expected `)`, found {found}"),
                    Span::new(start, tok_end.min(src.len())),
                    "expected `)`",
                )
                .with_help("a `(` opened earlier is not closed");
            }
            if positives.contains(&Rule::eq) && !positives.contains(&Rule::expr) {
                let found = if found.is_empty() {
                    "end of file".to_string()
                } else {
                    crate::diag::quote(found)
                };
                return Diagnostic::error("E0001", format!("syntax error: expected `=`, found {found}"), Span::new(start, tok_end.min(src.len())), "expected `=`")
                    .with_help("statements are `name = expr`, `output f = v @ x`, `observe m = mean(..)`, `for t in 1..=T { .. }`");
            }
            let mut names: Vec<&str> = positives.iter().map(rule_name).collect();
            names.sort_unstable();
            names.dedup();
            names.retain(|n| *n != "something else");
            let want = match names.len() {
                0 => "valid syntax".to_string(),
                1 => names[0].to_string(),
                _ => {
                    let last = names.pop().unwrap_or_default();
                    format!("{} or {last}", names.join(", "))
                }
            };
            let found = if found.is_empty() {
                "end of file".to_string()
            } else {
                crate::diag::quote(found)
            };
            (
                format!("expected {want}, found {found}"),
                format!("expected {want}"),
            )
        }
        ErrorVariant::CustomError { message } => (message.clone(), "here".to_string()),
    };
    let call_limit = message.contains("call limit");
    let mut d = Diagnostic::error(
        "E0001",
        format!("syntax error: {message}"),
        Span::new(start, tok_end.min(src.len())),
        label,
    );
    d = if call_limit {
        d.with_help("the parser gave up on this input; simplify the nesting")
    } else {
        d.with_help("see the language reference in the README; statements are `name = expr`, `output f = v @ x`, `observe m = mean(..)`, `for t in 1..=T { .. }`")
    };
    d
}

fn number(p: &Pair<Rule>) -> R<f64> {
    let s = p.as_str().trim();
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(Box::new(
            Diagnostic::error(
                "E0024",
                format!("`{s}` is not a finite number"),
                span_of(p),
                "out of range",
            )
            .with_help("numbers must fit in a 64-bit float"),
        )),
    }
}

fn signed(p: Pair<Rule>) -> R<f64> {
    // signed_num = "-"? number
    let neg = p.as_str().trim_start().starts_with('-');
    let inner = p
        .into_inner()
        .next()
        .ok_or_else(|| internal(Span::default()))?;
    let v = number(&inner)?;
    Ok(if neg { -v } else { v })
}

fn internal(span: Span) -> Box<Diagnostic> {
    Box::new(
        Diagnostic::error("E0001", "syntax error", span, "unexpected structure")
            .with_help("simplify the statement"),
    )
}

fn ident(p: Pair<Rule>) -> Ident {
    Ident {
        name: p.as_str().to_string(),
        span: span_of(&p),
    }
}

fn item(p: Pair<Rule>) -> R<Item> {
    let span = span_of(&p);
    let rule = p.as_rule();
    if matches!(
        rule,
        Rule::assign | Rule::output_stmt | Rule::observe_stmt | Rule::for_loop
    ) {
        return Ok(Item::Stmt(stmt(p)?));
    }
    let mut it = p.into_inner();
    let mut next = || it.next().ok_or_else(|| internal(span));
    Ok(match rule {
        Rule::width_decl => Item::Width(ident(next()?), span),
        Rule::const_decl => {
            let name = ident(next()?);
            Item::Const {
                name,
                value: expr(next()?)?,
                span,
            }
        }
        Rule::input_decl => {
            let name = ident(next()?);
            let dim = dim(next()?)?;
            let len = match next() {
                Ok(s) => Some(dim_inner(s)?),
                Err(_) => None,
            };
            Item::Input {
                name,
                dim,
                len,
                span,
            }
        }
        Rule::preset_decl => Item::Preset(ident(next()?), span),
        Rule::param_decl => Item::Param(param(span, next()?, next()?, next().ok())?),
        Rule::train_block => Item::Train(train(span, it)?),
        _ => return Err(internal(span)),
    })
}

fn dim(p: Pair<Rule>) -> R<Dim> {
    let inner = p
        .into_inner()
        .next()
        .ok_or_else(|| internal(Span::default()))?;
    let span = span_of(&inner);
    match inner.as_rule() {
        Rule::integer => inner
            .as_str()
            .parse::<u64>()
            .map(|v| Dim::Int(v, span))
            .map_err(|_| {
                Diagnostic::error(
                    "E0024",
                    format!("`{}` is too large", inner.as_str()),
                    span,
                    "integer overflow",
                )
                .with_help("dimensions must fit in 64 bits")
                .into()
            }),
        _ => Ok(Dim::Name(ident(inner))),
    }
}

fn dim_inner(seq: Pair<Rule>) -> R<Dim> {
    let span = span_of(&seq);
    dim(seq.into_inner().next().ok_or_else(|| internal(span))?)
}

fn param(span: Span, name: Pair<Rule>, shape: Pair<Rule>, law: Option<Pair<Rule>>) -> R<ParamDecl> {
    let shape_span = span_of(&shape);
    let dims = shape
        .into_inner()
        .filter(|d| d.as_rule() == Rule::dim)
        .map(dim)
        .collect::<R<Vec<_>>>()?;
    let law = match law {
        None => None,
        Some(l) => Some(law_syntax(l)?),
    };
    Ok(ParamDecl {
        name: ident(name),
        shape: dims,
        shape_span,
        law,
        span,
    })
}

fn law_syntax(p: Pair<Rule>) -> R<LawSyntax> {
    let span = span_of(&p);
    match p.as_rule() {
        Rule::explicit_law => {
            let mut it = p.into_inner();
            let normal = it.next().ok_or_else(|| internal(span))?;
            let mut n = normal.into_inner();
            let dist = ident(n.next().ok_or_else(|| internal(span))?);
            let mean = mono(n.next().ok_or_else(|| internal(span))?)?;
            let var = mono(n.next().ok_or_else(|| internal(span))?)?;
            let (mut mult, mut lr) = (None, None);
            for q in it {
                let r = q.as_rule();
                let m = mono(q.into_inner().next().ok_or_else(|| internal(span))?)?;
                if r == Rule::mult {
                    mult = Some(m)
                } else {
                    lr = Some(m)
                }
            }
            Ok(LawSyntax::Explicit {
                dist,
                mean,
                var,
                mult,
                lr,
                span,
            })
        }
        _ => {
            let mut entries = Vec::new();
            for e in p.into_inner() {
                let mut it = e.into_inner();
                let k = it.next().ok_or_else(|| internal(span))?;
                let v = mono(it.next().ok_or_else(|| internal(span))?)?;
                entries.push((ident(k), v));
            }
            Ok(LawSyntax::Preset { entries, span })
        }
    }
}

fn mono(p: Pair<Rule>) -> R<Mono> {
    let span = span_of(&p);
    match p.as_rule() {
        Rule::mono => {
            let mut it = p.into_inner().peekable();
            let neg = it.peek().is_some_and(|q| q.as_rule() == Rule::mono_neg);
            if neg {
                it.next();
            }
            let mut acc = mono(it.next().ok_or_else(|| internal(span))?)?;
            while let Some(op) = it.next() {
                let rhs = mono(it.next().ok_or_else(|| internal(span))?)?;
                let s = acc.span().join(rhs.span());
                acc = if op.as_str() == "*" {
                    Mono::Mul(Box::new(acc), Box::new(rhs), s)
                } else {
                    Mono::Div(Box::new(acc), Box::new(rhs), s)
                };
            }
            Ok(if neg {
                Mono::Neg(Box::new(acc), span)
            } else {
                acc
            })
        }
        Rule::mono_term => {
            let mut it = p.into_inner();
            let base = mono(it.next().ok_or_else(|| internal(span))?)?;
            match it.next() {
                None => Ok(base),
                Some(e) => Ok(Mono::Pow(Box::new(base), exponent(e)?, span)),
            }
        }
        Rule::mono_atom => {
            let inner = p.into_inner().next().ok_or_else(|| internal(span))?;
            match inner.as_rule() {
                Rule::number => Ok(Mono::Num(number(&inner)?, span)),
                Rule::ident => Ok(Mono::Name(ident(inner))),
                Rule::mono_call => {
                    let mut it = inner.into_inner();
                    let f = ident(it.next().ok_or_else(|| internal(span))?);
                    let a = mono(it.next().ok_or_else(|| internal(span))?)?;
                    Ok(Mono::Call(f, Box::new(a), span))
                }
                _ => mono(inner),
            }
        }
        _ => Err(internal(span)),
    }
}

fn exponent(p: Pair<Rule>) -> R<Exponent> {
    let span = span_of(&p);
    let inner = p.into_inner().next().ok_or_else(|| internal(span))?;
    match inner.as_rule() {
        Rule::signed_num => Ok(Exponent {
            num: signed(inner)?,
            den: None,
            span,
        }),
        _ => ratio(inner, span),
    }
}

/// `signed_ratio = "-"? number ("/" "-"? number)?` as an exponent.
fn ratio(inner: Pair<Rule>, span: Span) -> R<Exponent> {
    let text = inner.as_str().to_string();
    let nums: Vec<Pair<Rule>> = inner.into_inner().collect();
    let mut vals = nums.iter().map(number).collect::<R<Vec<f64>>>()?;
    // Signs: a '-' before the first number, and one after '/'.
    let parts: Vec<&str> = text.splitn(2, '/').collect();
    if parts[0].trim_start().starts_with('-') {
        vals[0] = -vals[0];
    }
    if vals.len() > 1
        && parts
            .get(1)
            .is_some_and(|s| s.trim_start().starts_with('-'))
    {
        vals[1] = -vals[1];
    }
    Ok(Exponent {
        num: vals[0],
        den: vals.get(1).copied(),
        span,
    })
}

fn stmt(p: Pair<Rule>) -> R<Stmt> {
    let span = span_of(&p);
    let rule = p.as_rule();
    let mut it = p.into_inner().filter(|q| q.as_rule() != Rule::eq);
    let mut next = || it.next().ok_or_else(|| internal(span));
    let kind = match rule {
        Rule::assign => StmtKind::Assign {
            lhs: lhs(next()?)?,
            rhs: expr(next()?)?,
        },
        Rule::output_stmt => StmtKind::Output {
            lhs: lhs(next()?)?,
            rhs: expr(next()?)?,
        },
        Rule::observe_stmt => StmtKind::Observe {
            lhs: lhs(next()?)?,
            rhs: expr(next()?)?,
        },
        Rule::for_loop => {
            let var = ident(next()?);
            let lo = expr(next()?)?;
            let inclusive = next()?.as_str() == "..=";
            let hi = expr(next()?)?;
            let body = next()?.into_inner().map(stmt).collect::<R<Vec<_>>>()?;
            StmtKind::For {
                var,
                lo,
                hi,
                inclusive,
                body,
            }
        }
        _ => return Err(internal(span)),
    };
    Ok(Stmt { kind, span })
}

fn lhs(p: Pair<Rule>) -> R<Lhs> {
    let span = span_of(&p);
    let mut it = p.into_inner();
    let name = ident(it.next().ok_or_else(|| internal(span))?);
    let index = match it.next() {
        Some(ix) => ix.into_inner().map(expr).collect::<R<Vec<_>>>()?,
        None => Vec::new(),
    };
    Ok(Lhs { name, index, span })
}

fn expr(p: Pair<Rule>) -> R<Expr> {
    let span = span_of(&p);
    match p.as_rule() {
        Rule::expr | Rule::term => {
            let mut it = p.into_inner();
            let mut acc = expr(it.next().ok_or_else(|| internal(span))?)?;
            while let Some(op) = it.next() {
                let rhs = expr(it.next().ok_or_else(|| internal(span))?)?;
                let op = match op.as_str() {
                    "+" => BinOp::Add,
                    "-" => BinOp::Sub,
                    "*" => BinOp::Mul,
                    _ => BinOp::Div,
                };
                let s = acc.span.join(rhs.span);
                acc = Expr {
                    kind: ExprKind::Bin(op, Box::new(acc), Box::new(rhs)),
                    span: s,
                };
            }
            Ok(acc)
        }
        Rule::factor => {
            let mut negs = Vec::new();
            let mut body = None;
            for q in p.into_inner() {
                if q.as_rule() == Rule::neg {
                    negs.push(span_of(&q));
                } else {
                    body = Some(expr(q)?);
                }
            }
            let mut e = body.ok_or_else(|| internal(span))?;
            for s in negs.into_iter().rev() {
                let sp = s.join(e.span);
                e = Expr {
                    kind: ExprKind::Neg(Box::new(e)),
                    span: sp,
                };
            }
            Ok(e)
        }
        Rule::matmul => {
            let mut it = p.into_inner();
            let m = it.next().ok_or_else(|| internal(span))?;
            let mut mi = m.into_inner();
            let mat = ident(mi.next().ok_or_else(|| internal(span))?);
            let transpose = mi.next().is_some();
            let arg = expr(it.next().ok_or_else(|| internal(span))?)?;
            Ok(Expr {
                kind: ExprKind::MatMul {
                    mat,
                    transpose,
                    arg: Box::new(arg),
                },
                span,
            })
        }
        Rule::power => {
            let mut it = p.into_inner();
            let base = expr(it.next().ok_or_else(|| internal(span))?)?;
            match it.next() {
                None => Ok(base),
                Some(e) if e.as_rule() == Rule::signed_ratio => {
                    // `x^(p/q)`: the exponent of a Netsor+ scalar, read as p / q.
                    let es = span_of(&e);
                    let r = ratio(e, es)?;
                    let k = match r.den {
                        Some(d) => r.num / d,
                        None => r.num,
                    };
                    Ok(Expr {
                        kind: ExprKind::Pow(Box::new(base), k),
                        span,
                    })
                }
                Some(e) => Ok(Expr {
                    kind: ExprKind::Pow(Box::new(base), signed(e)?),
                    span,
                }),
            }
        }
        Rule::atom => {
            let inner = p.into_inner().next().ok_or_else(|| internal(span))?;
            match inner.as_rule() {
                Rule::number => Ok(Expr {
                    kind: ExprKind::Num(number(&inner)?),
                    span,
                }),
                Rule::call => {
                    let mut it = inner.into_inner();
                    let fun = ident(it.next().ok_or_else(|| internal(span))?);
                    let args = it
                        .filter(|a| a.as_rule() != Rule::rparen)
                        .map(expr)
                        .collect::<R<Vec<_>>>()?;
                    Ok(Expr {
                        kind: ExprKind::Call { fun, args },
                        span,
                    })
                }
                Rule::reduce => {
                    // reduce = ident "(" ident "in" expr range_op expr "," expr ")"
                    let mut it = inner.into_inner().filter(|a| a.as_rule() != Rule::rparen);
                    let op = ident(it.next().ok_or_else(|| internal(span))?);
                    let var = ident(it.next().ok_or_else(|| internal(span))?);
                    let lo = expr(it.next().ok_or_else(|| internal(span))?)?;
                    let inclusive = it.next().ok_or_else(|| internal(span))?.as_str() == "..=";
                    let hi = expr(it.next().ok_or_else(|| internal(span))?)?;
                    let body = expr(it.next().ok_or_else(|| internal(span))?)?;
                    Ok(Expr {
                        kind: ExprKind::Reduce {
                            op,
                            var,
                            lo: Box::new(lo),
                            hi: Box::new(hi),
                            inclusive,
                            body: Box::new(body),
                        },
                        span,
                    })
                }
                Rule::name_ref => {
                    let mut it = inner.into_inner();
                    let name = ident(it.next().ok_or_else(|| internal(span))?);
                    let index = match it.next() {
                        Some(ix) => ix.into_inner().map(expr).collect::<R<Vec<_>>>()?,
                        None => Vec::new(),
                    };
                    Ok(Expr {
                        kind: ExprKind::Name { name, index },
                        span,
                    })
                }
                _ => expr(inner),
            }
        }
        _ => Err(internal(span)),
    }
}

fn train<'a>(span: Span, entries: impl Iterator<Item = Pair<'a, Rule>>) -> R<TrainBlock> {
    let mut out = Vec::new();
    for e in entries {
        let es = span_of(&e);
        let mut it = e.into_inner();
        let key = ident(it.next().ok_or_else(|| internal(es))?);
        let v = it.next().ok_or_else(|| internal(es))?;
        let value = if v.as_rule() == Rule::data_list {
            let vs = span_of(&v);
            let mut samples = Vec::new();
            for s in v.into_inner() {
                let ss = span_of(&s);
                let mut si = s.into_inner();
                let xp = si.next().ok_or_else(|| internal(ss))?;
                let yp = si.next().ok_or_else(|| internal(ss))?;
                let (x_span, y_span) = (span_of(&xp), span_of(&yp));
                let mut x = Vec::new();
                flatten(xp, &mut x)?;
                let mut y = Vec::new();
                flatten(yp, &mut y)?;
                samples.push(SampleSyntax {
                    x,
                    x_span,
                    y,
                    y_span,
                    span: ss,
                });
            }
            TrainValue::Data(samples, vs)
        } else {
            TrainValue::Expr(expr(v)?)
        };
        out.push(TrainEntry {
            key,
            value,
            span: es,
        });
    }
    Ok(TrainBlock { entries: out, span })
}

fn flatten(p: Pair<Rule>, out: &mut Vec<f64>) -> R<()> {
    match p.as_rule() {
        Rule::signed_num => out.push(signed(p)?),
        _ => {
            for q in p.into_inner() {
                flatten(q, out)?;
            }
        }
    }
    Ok(())
}
