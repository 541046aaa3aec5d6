//! The text table of every node's exponents (`tpc check --exponents`).

use super::*;
use crate::ir::{Op, Program, Ty};

// ---------------------------------------------------------------------------------
// A text table of the exponents
// ---------------------------------------------------------------------------------

/// Every node's exponents, and the classification: `node  init  grad  delta`.
pub fn table(prog: &Program) -> String {
    let ex = exponents(prog);
    let mut rows: Vec<[String; 4]> =
        vec![["node".into(), "init".into(), "dL/d".into(), "step".into()]];
    for id in prog.ids() {
        if matches!(prog.node(id).op, Op::Input { .. }) || matches!(prog.ty(id), Ty::Matrix) {
            continue;
        }
        let (g, d) = match &ex.step {
            Some(s) => (
                s.grad[id.index()].to_string(),
                s.delta[id.index()].to_string(),
            ),
            None => ("".into(), "".into()),
        };
        rows.push([node_name(prog, id), ex.init[id.index()].to_string(), g, d]);
    }
    let w: Vec<usize> = (0..4)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut s =
        String::from("# exponents e of Θ(n^e): per coordinate for vectors; -inf = exactly 0\n");
    for r in &rows {
        let line: Vec<String> = (0..4).map(|c| format!("{:w$}", r[c], w = w[c])).collect();
        s.push_str(line.join("  ").trim_end());
        s.push('\n');
    }
    if let (Some(step), Some(cls)) = (&ex.step, classify(prog, &ex)) {
        for (o, &f) in prog.outputs.iter().enumerate() {
            s.push_str(&format!(
                "chi({}): {} at step 0, {} at step 1\n",
                node_name(prog, f),
                step.chi0[o],
                step.chi1[o]
            ));
        }
        s.push_str("param  update  features  outputs  maximal\n");
        for (p, par) in prog.params.iter().enumerate() {
            let c = &cls.params[p];
            s.push_str(&format!(
                "{}  {}  {}  {}  {}{}\n",
                par.name,
                step.update[p],
                c.feature,
                c.output,
                c.maximal,
                match c.init_maximal {
                    Some(b) => format!(" (init maximal: {b})"),
                    None => String::new(),
                }
            ));
        }
        s.push_str(&format!(
            "regime: {}{}{}\n",
            cls.regime,
            if cls.mup { " (muP)" } else { "" },
            if cls.step == 2 {
                " (from a later step)"
            } else {
                ""
            }
        ));
    }
    s
}
