//! `tpc graph`: the IR as a numbered listing, as Graphviz, and as cli.md's JSON.

use serde_json::{json, Value};

use crate::ir::expr::fmt_num;
use crate::ir::{Law, NodeId, Op, OutTerm, Program};

/// How an operand is shown: by its source name when it has one (`h1`, `x[2]`, `W`), so
/// a listing reads like the program; unnamed intermediates by their instruction `%id`.
fn operand(prog: &Program, id: NodeId) -> String {
    match &prog.node(id).name {
        Some(n) => n.clone(),
        None => format!("%{}", id.index()),
    }
}

/// `~ N(0, var) * mult lr rate`, as the language writes it.
pub fn law_text(law: &Law) -> String {
    let mut s = format!("~ N(0, {})", law.var);
    if law.mult != crate::ir::Monomial::ONE {
        s.push_str(&format!(" * {}", law.mult));
    }
    s.push_str(&format!(" lr {}", law.lr));
    s
}

/// The instruction of one node in tensor-program notation, e.g. `MatMul(W, %6)`.
pub fn instruction(prog: &Program, id: NodeId) -> String {
    let ops = prog.operands(id);
    let arg = |i: usize| operand(prog, ops[i]);
    match &prog.node(id).op {
        Op::Input { input, .. } => {
            let d = &prog.inputs[*input];
            format!("input {} : {}", prog.label(id), d.dim)
        }
        Op::Param(p) => {
            let p = &prog.params[*p];
            let preset = p
                .preset
                .map(|s| format!("  ({} preset)", s.name()))
                .unwrap_or_default();
            format!(
                "param {} : {} {}{preset}",
                p.name,
                p.shape,
                law_text(&p.law)
            )
        }
        Op::MatMul { transpose } => {
            let w = arg(0);
            if *transpose {
                format!("MatMul({w}.T, {})", arg(1))
            } else {
                format!("MatMul({w}, {})", arg(1))
            }
        }
        Op::Nonlin(e) => format!("Nonlin({})", e.display(&arg)),
        Op::Moment(e) => format!("Moment(mean({}))", e.display(&arg)),
        Op::Scalar(e) => format!("Scalar({})", e.display(&arg)),
        Op::Outer { expr, groups } => format!(
            "Outer(mean_β(({}) · z_β), ĝ groups {groups:?})",
            expr.display(&|s| format!("ĝ{s}"))
        ),
        Op::Output { terms, constant } => {
            format!("Output({})", output_text(terms, *constant, &arg))
        }
    }
}

fn output_text(terms: &[OutTerm], constant: f64, arg: &dyn Fn(usize) -> String) -> String {
    let mut parts: Vec<String> = terms
        .iter()
        .map(|t| {
            let (c, body) = match t {
                OutTerm::Readout {
                    coef,
                    readout,
                    vector,
                } => (*coef, format!("{} @ {}", arg(*readout), arg(*vector))),
                OutTerm::Scalar { coef, param } => (*coef, arg(*param)),
            };
            if c == 1.0 {
                body
            } else {
                format!("{} * {body}", fmt_num(c))
            }
        })
        .collect();
    if constant != 0.0 {
        parts.push(fmt_num(constant));
    }
    parts.join(" + ")
}

/// The numbered listing followed by the abc table.
pub fn listing(prog: &Program) -> String {
    let mut out = String::new();
    let lines: Vec<(String, String)> = prog
        .ids()
        .map(|id| {
            let head = format!("%{} = {}", id.index(), instruction(prog, id));
            let name = match &prog.node(id).op {
                Op::Param(_) | Op::Input { .. } => String::new(),
                _ => prog.node(id).name.clone().unwrap_or_default(),
            };
            (head, name)
        })
        .collect();
    let width = lines
        .iter()
        .filter(|l| !l.1.is_empty())
        .map(|l| l.0.chars().count())
        .max()
        .unwrap_or(0)
        .min(64); // long corrections of unrolled programs would push names far right
    out.push_str(&format!(
        "# tensor program: {} instructions, width {}, {} parameter(s)\n",
        prog.len(),
        prog.width,
        prog.params.len()
    ));
    for (head, name) in lines {
        if name.is_empty() {
            out.push_str(&format!("{head}\n"));
        } else {
            out.push_str(&format!("{head:width$}  # {name}\n"));
        }
    }
    if let Some(t) = &prog.train {
        out.push_str(&format!(
            "train: loss {}, lr {}, {} step(s), {} sample(s)\n",
            t.loss.name(),
            fmt_num(t.lr),
            t.steps,
            t.data.len()
        ));
        if !t.is_plain_sgd() {
            out.push_str(&format!("optimizer: {}\n", t.describe()));
        }
    }
    out.push('\n');
    out.push_str(&abc_table(prog));
    out
}

/// The abc table of every parameter (theory.md §5.1): `a = -p(mult)`, `b = -p(var)/2`,
/// `c = -p(lr)`.
pub fn abc_table(prog: &Program) -> String {
    let mut rows = vec![[
        "param".to_string(),
        "shape".to_string(),
        "role".to_string(),
        "law".to_string(),
        "a".to_string(),
        "b".to_string(),
        "c".to_string(),
    ]];
    for p in &prog.params {
        let abc = p.law.abc();
        rows.push([
            p.name.clone(),
            p.shape.to_string(),
            p.role_name().to_string(),
            law_text(&p.law),
            abc.a.to_string(),
            abc.b.map_or("inf".to_string(), |b| b.to_string()),
            abc.c.to_string(),
        ]);
    }
    let mut widths = [0usize; 7];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::from("# abc: param = n^-a w, w ~ N(0, n^-2b), lr ~ n^-c (TP4)\n");
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Graphviz `dot`.
pub fn dot(prog: &Program) -> String {
    let mut out =
        String::from("digraph tensor_program {\n  rankdir=TB;\n  node [fontname=\"monospace\"];\n");
    for id in prog.ids() {
        let shape = match prog.node(id).op {
            Op::Param(_) => "box",
            Op::Input { .. } => "invhouse",
            Op::Output { .. } => "doubleoctagon",
            Op::Moment(_) => "diamond",
            _ => "ellipse",
        };
        let mut label = format!("%{} = {}", id.index(), instruction(prog, id));
        if let Some(n) = &prog.node(id).name {
            if !matches!(prog.node(id).op, Op::Param(_) | Op::Input { .. }) {
                label = format!("{n}\\n{label}");
            }
        }
        let label = label.replace('"', "\\\"");
        out.push_str(&format!(
            "  n{} [shape={shape}, label=\"{label}\"];\n",
            id.index()
        ));
    }
    for e in prog.graph.edge_indices() {
        if let Some((a, b)) = prog.graph.edge_endpoints(e) {
            out.push_str(&format!("  n{} -> n{};\n", a.index(), b.index()));
        }
    }
    out.push_str("}\n");
    out
}

/// cli.md's graph JSON: nodes with id, op, name, transpose, fn, span; edges `[from, to]`.
pub fn json(prog: &Program) -> Value {
    let nodes: Vec<Value> = prog
        .ids()
        .map(|id| {
            let n = prog.node(id);
            let mut v = json!({
                "id": id.index(),
                "op": n.op.kind(prog),
                "name": n.name,
                "span": [n.span.start, n.span.end],
            });
            let ops = prog.operands(id);
            let arg = |i: usize| operand(prog, ops[i]);
            match &n.op {
                Op::MatMul { transpose } => v["transpose"] = json!(transpose),
                Op::Nonlin(e) | Op::Moment(e) | Op::Scalar(e) | Op::Outer { expr: e, .. } => {
                    let f = match e {
                        crate::ir::Expr::Call(f, _) => f.name().to_string(),
                        _ => e.display(&|i| format!("${i}")).to_string(),
                    };
                    v["fn"] = json!(f);
                    v["expr"] = json!(e.display(&arg).to_string());
                }
                Op::Param(p) => {
                    let p = &prog.params[*p];
                    let abc = p.law.abc();
                    v["shape"] = json!(p.shape.to_string());
                    v["role"] = json!(p.role_name());
                    v["law"] = json!({
                        "var": {"coef": p.law.var.coef, "exp": p.law.var.exp.to_string()},
                        "mult": {"coef": p.law.mult.coef, "exp": p.law.mult.exp.to_string()},
                        "lr": {"coef": p.law.lr.coef, "exp": p.law.lr.exp.to_string()},
                    });
                    v["abc"] = json!({"a": abc.a.to_string(), "b": abc.b.map(|b| b.to_string()), "c": abc.c.to_string()});
                }
                Op::Input { input, time } => {
                    v["dim"] = json!(prog.inputs[*input].dim);
                    if let Some(t) = time {
                        v["time"] = json!(t);
                    }
                }
                Op::Output { terms, constant } => v["expr"] = json!(output_text(terms, *constant, &arg)),
            }
            v
        })
        .collect();
    let mut edges: Vec<[usize; 2]> = prog
        .graph
        .edge_indices()
        .filter_map(|e| prog.graph.edge_endpoints(e))
        .map(|(a, b)| [a.index(), b.index()])
        .collect();
    edges.sort_unstable();
    json!({ "nodes": nodes, "edges": edges })
}
