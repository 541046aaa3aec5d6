//! `tpc limit`: the derivation, then the kernels and moments, as text or cli.md's JSON.

use nalgebra::DMatrix;
use serde_json::{json, Map, Value};

use crate::limit::LimitResult;

fn matrix_json(m: &DMatrix<f64>) -> Value {
    Value::Array(
        (0..m.nrows())
            .map(|i| Value::Array((0..m.ncols()).map(|j| num(m[(i, j)])).collect()))
            .collect(),
    )
}

/// A finite number as JSON (non-finite numbers never reach here: engines report them).
pub fn num(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// cli.md's `limit` JSON.
pub fn json(r: &LimitResult) -> Value {
    let mut obs = Map::new();
    for (name, v) in &r.observe {
        obs.insert(
            name.clone(),
            if v.len() == 1 {
                num(v[0])
            } else {
                Value::Array(v.iter().map(|x| num(*x)).collect())
            },
        );
    }
    let mut out = json!({
        "outputs": r.outputs,
        "points": r.points,
        "nngp": r.nngp.as_ref().map(matrix_json),
        "ntk": r.ntk.as_ref().map(matrix_json),
        "observe": obs,
    });
    let mut notes = Map::new();
    if let Some(n) = &r.nngp_note {
        notes.insert("nngp".into(), json!(n));
    }
    if let Some(n) = &r.ntk_note {
        notes.insert("ntk".into(), json!(n));
    }
    if !notes.is_empty() {
        out["notes"] = Value::Object(notes);
    }
    if let Some(t) = &r.train {
        let mut tr = Map::new();
        tr.insert(
            "f_t".into(),
            t.f_t.as_ref().map_or(Value::Null, matrix_json),
        );
        if let Some(v) = &t.f_t_var {
            tr.insert("f_t_var".into(), matrix_json(v));
        }
        if let Some(v) = &t.f_t_se {
            tr.insert("f_t_se".into(), matrix_json(v));
        }
        tr.insert("method".into(), json!(t.method));
        if let Some(n) = &t.note {
            tr.insert("note".into(), json!(n));
        }
        out["train"] = Value::Object(tr);
    }
    if let Some(regime) = &r.regime {
        out["regime"] = json!(regime);
    }
    out["methods"] = json!(r.methods);
    out["max_error"] = num(r.max_error);
    out
}

/// Width of the text report: matrices wider than this are printed in column blocks.
pub const TEXT_WIDTH: usize = 100;

/// A labelled matrix: a header row of column labels, then one labelled row per entry,
/// split into blocks of columns so that no line passes [`TEXT_WIDTH`] characters.
fn matrix_text(m: &DMatrix<f64>, labels: &[String]) -> String {
    const CELL: usize = 13; // " " + 12 characters
    let label = |i: usize| labels.get(i).map(String::as_str).unwrap_or("");
    let w = (0..m.nrows().max(m.ncols()))
        .map(|i| label(i).chars().count())
        .max()
        .unwrap_or(0);
    let per_block = ((TEXT_WIDTH.saturating_sub(w + 3)) / CELL).max(1);
    let mut s = String::new();
    let mut start = 0;
    while start < m.ncols() {
        let end = (start + per_block).min(m.ncols());
        if m.ncols() > per_block {
            s.push_str(&format!(
                "  columns {}–{} of {}\n",
                start + 1,
                end,
                m.ncols()
            ));
        }
        s.push_str(&format!("  {:w$} ", ""));
        for j in start..end {
            s.push_str(&format!(" {:>12}", label(j)));
        }
        s.push('\n');
        for i in 0..m.nrows() {
            s.push_str(&format!("  {:w$} ", label(i)));
            for j in start..end {
                s.push_str(&format!(" {:>12.8}", m[(i, j)]));
            }
            s.push('\n');
        }
        start = end;
    }
    s
}

/// Row labels `f(p1)`: output-major over points.
pub fn labels(r: &LimitResult) -> Vec<String> {
    let p = r.points.len().max(1);
    r.outputs
        .iter()
        .flat_map(|o| (1..=p).map(move |i| format!("{o}(p{i})")))
        .collect()
}

/// Points listed in full up to this many; beyond, only their number.
const LISTED_POINTS: usize = 10;

/// What p1…pP are: the rows of `--inputs` (or, without it, the training inputs).
fn points_text(r: &LimitResult) -> String {
    if r.points.iter().all(Vec::is_empty) {
        return String::new();
    }
    let p = r.points.len();
    let mut s = format!(
        "\n# points p1…p{p}: the rows of the --inputs CSV (or the points passed), in order; \
         by default\n# the training inputs\n"
    );
    if p <= LISTED_POINTS {
        for (i, x) in r.points.iter().enumerate() {
            let nums: Vec<String> = x.iter().map(|v| crate::ir::expr::fmt_num(*v)).collect();
            let mut row = nums.join(", ");
            if row.chars().count() > TEXT_WIDTH - 12 {
                row = row.chars().take(TEXT_WIDTH - 16).collect::<String>() + ", …";
            }
            s.push_str(&format!("  p{} = ({row})\n", i + 1));
        }
    }
    s
}

/// The whole `tpc limit` text report: the derivation ([`crate::limit::derivation_text`]),
/// the points, the NNGP and NTK over (output, point) pairs, every observe, the regime and
/// training trajectory when there is a `train` block, and how the numbers were computed.
/// [`crate::report_limit`] builds it from a source text.
pub fn text(derivation: &str, r: &LimitResult) -> String {
    let mut s = String::from(
        "# Z derivation (Master Theorem, theory.md §1-2): Z^x is the limit law of a \
         coordinate of vector x;\n# Ẑ are Gaussians; p, q are two input points\n",
    );
    s.push_str(derivation);
    s.push_str(&points_text(r));
    let l = labels(r);
    if !r.outputs.is_empty() {
        s.push_str("\n# NNGP (output-major: row k = output*P + point)\n");
        match &r.nngp {
            Some(m) => s.push_str(&matrix_text(m, &l)),
            None => s.push_str(&format!(
                "  none: {}\n",
                r.nngp_note.as_deref().unwrap_or("")
            )),
        }
        s.push_str("\n# NTK (lr-weighted, theory.md §2.3)\n");
        match &r.ntk {
            Some(m) => s.push_str(&matrix_text(m, &l)),
            None => s.push_str(&format!(
                "  none: {}\n",
                r.ntk_note.as_deref().unwrap_or("")
            )),
        }
    }
    if !r.observe.is_empty() {
        s.push_str("\n# observe\n");
        for (name, v) in &r.observe {
            let vals: Vec<String> = v.iter().map(|x| format!("{x:.12}")).collect();
            s.push_str(&format!("  {name} = {}\n", vals.join(", ")));
        }
    }
    if let Some(regime) = &r.regime {
        s.push_str(&format!(
            "\n# regime (scaling exponents, theory.md §5): {regime}\n"
        ));
    }
    if let Some(t) = &r.train {
        s.push_str(&trajectory_text(t, &l));
    }
    if r.methods.is_empty() {
        s.push_str("\n# methods: none (no expectation had to be computed)\n");
    } else {
        let line = format!(
            "# methods: {}; largest stated error {:.1e}",
            r.methods.join("; "),
            r.max_error
        );
        if line.chars().count() <= TEXT_WIDTH {
            s.push_str(&format!("\n{line}\n"));
        } else {
            s.push_str(&format!(
                "\n# methods (largest stated error {:.1e}):\n",
                r.max_error
            ));
            for m in &r.methods {
                s.push_str(&format!("#   {m}\n"));
            }
        }
    }
    s
}

/// A `#` comment line broken at spaces into lines of at most [`TEXT_WIDTH`] characters
/// (a longer word stays whole), continued with `#   `.
fn wrap_comment(line: &str) -> String {
    let mut out = String::new();
    let mut cur = String::new();
    for word in line.split(' ') {
        let len = cur.chars().count();
        if len > 4 && len + 1 + word.chars().count() > TEXT_WIDTH {
            out.push_str(cur.trim_end());
            out.push('\n');
            cur = String::from("#  ");
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    out.push_str(cur.trim_end());
    out.push('\n');
    out
}

/// The training trajectory: the method line, then one row per step.
fn trajectory_text(t: &crate::limit::train::LimitTrain, labels: &[String]) -> String {
    let mut s = String::from("\n");
    s.push_str(&wrap_comment(&format!(
        "# training trajectory f_t ({}, lr {}, {} step(s)): {}",
        t.loss.name(),
        t.lr,
        t.steps,
        t.method
    )));
    if let Some(n) = &t.note {
        s.push_str(&wrap_comment(&format!("#   {n}")));
    }
    let Some(f) = &t.f_t else {
        s.push_str("  f_t: none\n");
        return s;
    };
    // Columns in blocks that fit TEXT_WIDTH, each block under its own header.
    let cell = if t.f_t_se.is_some() { 23 } else { 15 };
    let per_block = ((TEXT_WIDTH - 5) / cell).max(1);
    let blocks: Vec<(usize, usize)> = (0..f.ncols())
        .step_by(per_block)
        .map(|a| (a, (a + per_block).min(f.ncols())))
        .collect();
    for &(a, b) in &blocks {
        if blocks.len() > 1 {
            s.push_str(&format!("  columns {}–{} of {}\n", a + 1, b, f.ncols()));
        }
        let mut header = String::from("  t  ");
        for l in &labels[a.min(labels.len())..b.min(labels.len())] {
            match &t.f_t_se {
                Some(_) => header.push_str(&format!(" {l:>10}{:11}", "")),
                None => header.push_str(&format!(" {l:>14}")),
            }
        }
        s.push_str(header.trim_end());
        s.push('\n');
        for i in 0..f.nrows() {
            s.push_str(&format!("  {i:<3}"));
            for j in a..b {
                match &t.f_t_se {
                    Some(se) => s.push_str(&format!(" {:>10.6} ± {:<8.6}", f[(i, j)], se[(i, j)])),
                    None => s.push_str(&format!(" {:>14.10}", f[(i, j)])),
                }
            }
            s.push('\n');
        }
    }
    if let Some(v) = &t.f_t_var {
        s.push_str("  standard deviation of f_t over f_0 (the NNGP):\n");
        for &(a, b) in &blocks {
            if blocks.len() > 1 {
                s.push_str(&format!("  columns {}–{} of {}\n", a + 1, b, v.ncols()));
            }
            for i in 0..v.nrows() {
                s.push_str(&format!("  {i:<3}"));
                for j in a..b.min(v.ncols()) {
                    s.push_str(&format!(" {:>14.10}", v[(i, j)].sqrt()));
                }
                s.push('\n');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_comments_wrap_at_the_text_width() {
        let words = vec!["particle"; 40].join(" ");
        let text = wrap_comment(&format!("# method: {words}"));
        assert!(text.lines().count() > 1, "{text}");
        for line in text.lines() {
            assert!(line.chars().count() <= TEXT_WIDTH, "{line}");
            assert!(line.starts_with('#'), "{line}");
        }
        let back: Vec<&str> = text.split_whitespace().filter(|w| *w != "#").collect();
        assert_eq!(back.join(" "), format!("method: {words}"));
        assert_eq!(wrap_comment("#   short note"), "#   short note\n");
    }
}
