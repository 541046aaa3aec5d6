//! The warnings and notes of `tpc check` from the exponents and the classification.

use super::*;
use crate::diag::Diagnostic;
use crate::ir::{NodeId, Op, Program, Role, Span, Ty};

// ---------------------------------------------------------------------------------
// Diagnostics
// ---------------------------------------------------------------------------------

/// A display name for a node: its name, or `W @ x` for an unnamed MatMul.
pub fn node_name(prog: &Program, id: NodeId) -> String {
    if let Some(n) = &prog.node(id).name {
        return n.clone();
    }
    if let Op::MatMul { transpose } = prog.node(id).op {
        let ops = prog.operands(id);
        let w = prog.label(ops[0]);
        let t = if transpose { ".T" } else { "" };
        return format!("{w}{t} @ {}", prog.label(ops[1]));
    }
    prog.label(id)
}

/// The span of `lr ...` inside a parameter's law, when the source writes one.
pub(super) fn lr_span(src: &str, law: Span) -> Option<Span> {
    let text = src.get(law.range())?;
    let bytes = text.as_bytes();
    let mut found = None;
    let mut i = 0;
    while let Some(k) = text[i..].find("lr") {
        let at = i + k;
        let before = at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        let after = bytes
            .get(at + 2)
            .is_none_or(|b| !(b.is_ascii_alphanumeric() || *b == b'_'));
        if before && after {
            found = Some(at);
        }
        i = at + 2;
    }
    let at = found?;
    let end = text[at..]
        .find([',', '}'])
        .map_or(text.len(), |e| at + e)
        .min(text.len());
    let end = at + text[at..end].trim_end().len();
    Some(Span::new(law.start + at, law.start + end))
}

/// `a`, `a and b`, `a, b and c`.
pub(super) fn and_list(items: &[String]) -> String {
    match items.len() {
        0 => String::new(),
        1 => items[0].clone(),
        k => format!("{} and {}", items[..k - 1].join(", "), items[k - 1]),
    }
}

/// Parameters used by the nodes reachable from `from` (inclusive), in order.
pub(super) fn downstream_params(prog: &Program, from: &[NodeId]) -> Vec<usize> {
    let mut seen = vec![false; prog.len()];
    for &f in from {
        seen[f.index()] = true;
    }
    let mut out = Vec::new();
    for id in prog.ids() {
        if !seen[id.index()] {
            continue;
        }
        for u in prog.users(id) {
            seen[u.index()] = true;
        }
        for a in prog.operands(id) {
            if let Op::Param(p) = prog.node(a).op {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
    }
    out.sort_unstable();
    out
}

/// Scaling warnings and notes for a checked program (`src` locates the `lr` of laws).
pub fn diagnostics(prog: &Program, src: &str) -> Vec<Diagnostic> {
    let ex = exponents(prog);
    let mut out = Vec::new();
    let mut init_blowup = false;
    // -- initialization: each parameter's own factor
    for (p, par) in prog.params.iter().enumerate() {
        let f = init_factor(prog, p);
        let uses: Vec<NodeId> = match par.role() {
            Role::Hidden | Role::Input => prog
                .users(par.node)
                .into_iter()
                .filter(|&u| matches!(prog.node(u).op, Op::MatMul { .. }))
                .collect(),
            Role::Output => prog.users(par.node),
            Role::Bias | Role::OutputBias => vec![par.node],
        };
        let Some(&first) = uses.iter().max_by_key(|u| ex.init[u.index()]) else {
            continue;
        };
        let size = ex.init[first.index()];
        let what = node_name(prog, first);
        let need = match par.role() {
            Role::Hidden => "a hidden matrix needs entries Θ(n^(-1/2))",
            Role::Output => "a readout needs entries O(n^(-1/2))",
            _ => "it needs entries Θ(1)",
        };
        let entries = format!("entries are {}; {need}", entry(&par.law).theta());
        if f.blows_up() {
            init_blowup = true;
            let per = if prog.ty(first) == Ty::Vector {
                " per coordinate"
            } else {
                ""
            };
            out.push(
                Diagnostic::warning(
                    "W0101",
                    format!("`{what}` blows up at initialization: {}{per}", size.theta()),
                    par.law_span,
                    entries,
                )
                .with_help(mup_help(prog, p)),
            );
        } else if f.vanishes()
            && f != Ex::Zero
            && par.role() != Role::Output
            && par.role() != Role::OutputBias
        {
            out.push(
                Diagnostic::warning(
                    "W0102",
                    format!(
                        "`{what}` vanishes at initialization: {} per coordinate",
                        size.theta()
                    ),
                    par.law_span,
                    entries,
                )
                .with_help(mup_help(prog, p)),
            );
        }
    }
    // -- attention logits: a cross moment that one step blows up (W0106)
    out.extend(moments::logit_warnings(prog, &ex));
    let (Some(cls), Some(train)) = (classify(prog, &ex), &prog.train) else {
        return out;
    };
    let Some(step) = (if cls.step == 1 { &ex.step } else { &ex.later }) else {
        return out;
    };
    let name = match train.optimizer {
        crate::ir::Optimizer::Momentum { .. } => "momentum",
        _ => "SGD",
    };
    let one_step = if cls.step == 1 {
        format!("one {name} step")
    } else {
        format!("a later {name} step")
    };
    let one_step = one_step.as_str();
    if init_blowup {
        return out;
    }
    // an entrywise optimizer (Adam): its own exponents and warnings ([`optim`])
    if let Some(o) = optim::Entrywise::of(prog) {
        out.extend(optim::diagnostics(prog, src, &ex, &cls, o));
        return out;
    }
    let lr_label = |p: usize| -> Span {
        let par = &prog.params[p];
        lr_span(src, par.law_span).unwrap_or(par.law_span)
    };
    match cls.regime {
        Regime::Unstable => {
            for (p, par) in prog.params.iter().enumerate() {
                let s = &cls.params[p];
                let d = &step.by_param[p];
                let mut moved: Vec<String> = Vec::new();
                for &(n, e) in &step.direct[p] {
                    if e.blows_up() && prog.ty(n) == Ty::Vector {
                        moved.push(format!(
                            "`{}` by {} per coordinate",
                            node_name(prog, n),
                            e.theta()
                        ));
                    }
                }
                if moved.is_empty() && s.feature.blows_up() {
                    if let Some(n) = prog
                        .ids()
                        .filter(|&i| is_feature(prog, i))
                        .max_by_key(|i| d[i.index()])
                    {
                        moved.push(format!(
                            "`{}` by {} per coordinate",
                            node_name(prog, n),
                            d[n.index()].theta()
                        ));
                    }
                }
                for &o in &prog.outputs {
                    if d[o.index()].blows_up() {
                        moved.push(format!(
                            "`{}` by {}",
                            node_name(prog, o),
                            d[o.index()].theta()
                        ));
                    }
                }
                if moved.is_empty() {
                    continue;
                }
                let text = and_list(&moved);
                let span = lr_label(p);
                let label = if lr_span(src, par.law_span).is_none() {
                    format!("`{}` trains at the base rate (lr n^0)", par.name)
                } else if is_mup_law(par.role(), &par.law) {
                    "too large for the gradient this parameter receives".to_string()
                } else {
                    "this learning rate is too large for the width".to_string()
                };
                let mut d = Diagnostic::warning(
                    "W0103",
                    format!(
                        "training blows up: one SGD step of `{}` moves {text}",
                        par.name
                    ),
                    span,
                    label,
                );
                if is_mup_law(par.role(), &par.law) {
                    // its own law is muP: the gradient reaching it is too large, set by
                    // parameters downstream initialized larger than muP
                    let from: Vec<NodeId> = step.direct[p].iter().map(|x| x.0).collect();
                    let culprits: Vec<usize> = downstream_params(prog, &from)
                        .into_iter()
                        .filter(|&q| {
                            q != p && !is_mup_law(prog.params[q].role(), &prog.params[q].law)
                        })
                        .collect();
                    let grads: Vec<String> = step.direct[p]
                        .iter()
                        .filter(|x| prog.ty(x.0) == Ty::Vector)
                        .map(|x| {
                            format!(
                                "∂L/∂({}) is {}",
                                node_name(prog, x.0),
                                step.grad[x.0.index()].theta()
                            )
                        })
                        .collect();
                    for &q in &culprits {
                        let qp = &prog.params[q];
                        d = d.with_secondary(
                            qp.law_span,
                            format!(
                                "`{}` is not muP: entries {}",
                                qp.name,
                                entry(&qp.law).theta()
                            ),
                        );
                    }
                    let mut h = format!(
                        "`{}` already has muP exponents; its step is large because {}",
                        par.name,
                        and_list(&grads)
                    );
                    if let Some(&q) = culprits.first() {
                        h.push_str(&format!(
                            ", set by `{}`: {}",
                            prog.params[q].name,
                            mup_help(prog, q)
                        ));
                    }
                    d = d.with_help(h);
                } else {
                    d = d.with_help(mup_help(prog, p));
                }
                out.push(d);
            }
        }
        Regime::Trivial => {
            let best = (0..prog.params.len())
                .filter(|&p| prog.params[p].role() != Role::OutputBias)
                .max_by_key(|&p| {
                    (
                        cls.params[p].output,
                        prog.params[p].role() == Role::Output,
                        std::cmp::Reverse(p),
                    )
                });
            let span = best.map_or(train.lr_span, lr_label);
            let mut d = Diagnostic::warning(
                "W0104",
                format!(
                    "training is trivial in the limit: {one_step} moves the outputs by {}",
                    cls.output.theta()
                ),
                span,
                "this learning rate is too small for the width",
            );
            for (p, par) in prog.params.iter().enumerate() {
                if Some(p) != best && par.role() != Role::OutputBias {
                    d = d.with_secondary(
                        lr_label(p),
                        format!(
                            "`{}` moves the outputs by {}",
                            par.name,
                            cls.params[p].output.theta()
                        ),
                    );
                }
            }
            if let Some(p) = best {
                d = d.with_help(mup_help(prog, p));
            }
            if let Some(e) = cls.output.exponent() {
                // every update is linear in its learning rate (to first order)
                d = d.with_note(format!(
                    "multiplying every learning rate by {} would move the outputs by Θ(1)",
                    n_pow(-e)
                ));
            }
            out.push(d);
        }
        Regime::Kernel => {
            let r = cls.feature.exponent().map(|e| -e);
            let contributing: Vec<String> = prog
                .params
                .iter()
                .zip(&cls.params)
                .filter(|(_, s)| s.output == Ex::ONE)
                .map(|(p, _)| format!("`{}`", p.name))
                .collect();
            let dropped: Vec<String> = prog
                .params
                .iter()
                .zip(&cls.params)
                .filter(|(p, s)| s.output.vanishes() && kappa(&p.law, train.lr) != Ex::Zero)
                .map(|(p, s)| format!("`{}` ({})", p.name, s.output.theta()))
                .collect();
            let mut d = Diagnostic::note_diag(
                "N0101",
                format!(
                    "kernel regime: {one_step} moves the outputs by Θ(1) but the features only by {} per coordinate{}",
                    cls.feature.theta(),
                    r.map_or(String::new(), |r| format!(" (r = {r})"))
                ),
                train.lr_span,
                "features do not move in the limit at these learning rates",
            )
            .with_note(format!(
                "the limiting kernel gets Θ(1) contributions from {}",
                and_list(&contributing)
            ));
            if !dropped.is_empty() {
                d = d.with_note(format!(
                    "updates that drop out of the limit: {}",
                    and_list(&dropped)
                ));
            }
            out.push(d.with_help(
                "for feature learning use muP (`parameterization mup`, docs/theory.md §5.3)",
            ));
        }
        Regime::FeatureLearning => {
            out.push(feature_learning_note(
                prog,
                &cls,
                train.lr_span,
                one_step,
                "every parameter is updated maximally: this is muP (up to the abc symmetry)",
            ));
        }
    }
    out
}

/// N0102 (feature learning) for SGD-like and entrywise optimizers alike: the step that
/// moves the features, the parameters updated maximally, and `mup` when all are.
pub(super) fn feature_learning_note(
    prog: &Program,
    cls: &Classification,
    lr_span: Span,
    one_step: &str,
    mup: &str,
) -> Diagnostic {
    let maximal: Vec<String> = prog
        .params
        .iter()
        .zip(&cls.params)
        .filter(|(p, s)| s.maximal && p.role() != Role::OutputBias)
        .map(|(p, _)| format!("`{}`", p.name))
        .collect();
    let mut d = Diagnostic::note_diag(
        "N0102",
        format!("feature learning: {one_step} moves the features by Θ(1) per coordinate (r = 0) and the outputs by Θ(1)"),
        lr_span,
        "trained here",
    );
    if !maximal.is_empty() {
        d = d.with_note(format!("updated maximally: {}", and_list(&maximal)));
    }
    if cls.mup {
        d = d.with_note(mup.to_string());
    }
    d
}
