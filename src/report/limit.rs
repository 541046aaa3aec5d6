//! `tpc limit`: the derivation, then the kernels and moments, as text or cli.md's JSON.

use nalgebra::DMatrix;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::npy;
use super::stream::Node;
use crate::limit::LimitResult;

/// A finite number as JSON (non-finite numbers never reach here: engines report them).
pub fn num(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// The observes as cli.md prints them: a number per observe that depends on no
/// point, else an array over the points.
fn observe_json(r: &LimitResult) -> Value {
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
    Value::Object(obs)
}

/// The notes on kernels that are not finite, if any.
fn notes_json(r: &LimitResult) -> Option<Value> {
    let mut notes = Map::new();
    if let Some(n) = &r.nngp_note {
        notes.insert("nngp".into(), json!(n));
    }
    if let Some(n) = &r.ntk_note {
        notes.insert("ntk".into(), json!(n));
    }
    (!notes.is_empty()).then_some(Value::Object(notes))
}

/// cli.md's `limit` JSON as a tree whose matrices are borrowed, for streaming
/// ([`Node::write_pretty`]).
pub fn tree(r: &LimitResult) -> Node<'_> {
    let mut out = Node::object();
    out.push("outputs", json!(r.outputs));
    out.push("points", json!(r.points));
    out.push("nngp", r.nngp.as_ref());
    out.push("ntk", r.ntk.as_ref());
    out.push("observe", observe_json(r));
    if let Some(n) = notes_json(r) {
        out.push("notes", n);
    }
    if let Some(t) = &r.train {
        let mut tr = Node::object();
        tr.push("f_t", t.f_t.as_ref());
        if let Some(v) = &t.f_t_var {
            tr.push("f_t_var", v);
        }
        if let Some(v) = &t.f_t_se {
            tr.push("f_t_se", v);
        }
        tr.push("method", json!(t.method));
        if let Some(n) = &t.note {
            tr.push("note", json!(n));
        }
        out.push("train", tr);
    }
    if let Some(regime) = &r.regime {
        out.push("regime", json!(regime));
    }
    out.push("methods", json!(r.methods));
    out.push("max_error", num(r.max_error));
    if let Some(e) = r.qmc_3sigma {
        // A statistical error (3 standard errors of a randomized QMC estimate), not a
        // bound; `max_error` includes it.
        out.push("qmc_3sigma", num(e));
    }
    out
}

/// cli.md's `limit` JSON.
pub fn json(r: &LimitResult) -> Value {
    tree(r).to_value()
}

/// `tpc limit --out DIR`: every matrix as a `.npy` file (float64, row-major; see
/// [`super::npy`]) and `meta.json` with everything else and the files' names.
pub fn save(dir: &Path, r: &LimitResult) -> std::io::Result<Value> {
    std::fs::create_dir_all(dir)?;
    let mut files = Map::new();
    let mut save = |name: &str, m: &DMatrix<f64>| -> std::io::Result<()> {
        let file = format!("{name}.npy");
        npy::save_matrix(&dir.join(&file), m)?;
        files.insert(
            name.to_string(),
            json!({"file": file, "shape": [m.nrows(), m.ncols()]}),
        );
        Ok(())
    };
    if let Some(m) = &r.nngp {
        save("nngp", m)?;
    }
    if let Some(m) = &r.ntk {
        save("ntk", m)?;
    }
    if let Some(t) = &r.train {
        for (name, m) in [
            ("f_t", &t.f_t),
            ("f_t_var", &t.f_t_var),
            ("f_t_se", &t.f_t_se),
        ] {
            if let Some(m) = m {
                save(name, m)?;
            }
        }
    }
    let mut meta = Map::new();
    meta.insert("outputs".into(), json!(r.outputs));
    meta.insert("points".into(), json!(r.points));
    meta.insert("order".into(), json!(KERNEL_ORDER));
    meta.insert("files".into(), Value::Object(files));
    meta.insert("observe".into(), observe_json(r));
    if let Some(n) = notes_json(r) {
        meta.insert("notes".into(), n);
    }
    if let Some(t) = &r.train {
        meta.insert(
            "train".into(),
            json!({"method": t.method, "note": t.note, "loss": t.loss.name(), "lr": t.lr, "steps": t.steps}),
        );
    }
    if let Some(regime) = &r.regime {
        meta.insert("regime".into(), json!(regime));
    }
    meta.insert("methods".into(), json!(r.methods));
    meta.insert("max_error".into(), num(r.max_error));
    let meta = Value::Object(meta);
    write_meta(dir, &meta)?;
    Ok(meta)
}

/// How kernel rows and columns are ordered (docs/cli.md).
pub const KERNEL_ORDER: &str =
    "output-major: row/column k = output_index * P + point_index (0-based); f_t rows are steps 0..=steps, columns as kernel rows";

/// Writes `meta.json` into `dir`, pretty-printed.
pub fn write_meta(dir: &Path, meta: &Value) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(meta).map_err(std::io::Error::other)? + "\n";
    std::fs::write(dir.join("meta.json"), text)
}

/// Width of the text report: matrices wider than this are printed in column blocks.
pub const TEXT_WIDTH: usize = 100;

/// Kernels with more rows than this are summarized in text (shape, diagonal and
/// off-diagonal statistics, the top-left [`SUMMARY_BLOCK`]² block) instead of printing
/// M² numbers: a screen shows 12 rows of a block; `--out DIR` and `--format json` give
/// every entry.
pub const TEXT_FULL_MAX: usize = 12;

/// The side of the block a summarized kernel shows.
pub const SUMMARY_BLOCK: usize = 6;

/// Min, max and mean of the diagonal and of the off-diagonal entries of a square matrix.
pub fn summary_stats(m: &DMatrix<f64>) -> String {
    let stats = |vals: &mut dyn Iterator<Item = f64>| {
        let (mut lo, mut hi, mut sum, mut n) = (f64::INFINITY, f64::NEG_INFINITY, 0.0, 0usize);
        for v in vals {
            lo = lo.min(v);
            hi = hi.max(v);
            sum += v;
            n += 1;
        }
        if n == 0 {
            "none".to_string()
        } else {
            format!("min {lo:.8}, max {hi:.8}, mean {:.8}", sum / n as f64)
        }
    };
    let k = m.nrows().min(m.ncols());
    let diag = stats(&mut (0..k).map(|i| m[(i, i)]));
    let off = stats(
        &mut (0..m.nrows())
            .flat_map(|i| (0..m.ncols()).map(move |j| (i, j)))
            .filter(|(i, j)| i != j)
            .map(|(i, j)| m[(i, j)]),
    );
    format!("  diagonal: {diag}\n  off-diagonal: {off}\n")
}

/// The summary of a kernel too large to print: its shape, [`summary_stats`], the
/// top-left block, and where to find every entry.
fn summary_text(m: &DMatrix<f64>, labels: &[String]) -> String {
    let mut s = format!(
        "  {}×{} (summarized: more than {TEXT_FULL_MAX} rows; every entry with --out DIR or --format json)\n",
        m.nrows(),
        m.ncols()
    );
    s.push_str(&summary_stats(m));
    let b = SUMMARY_BLOCK.min(m.nrows()).min(m.ncols());
    s.push_str(&format!("  top-left {b}×{b} block:\n"));
    s.push_str(&full_matrix_text(
        &m.view((0, 0), (b, b)).into_owned(),
        labels,
    ));
    s
}

/// A kernel in text: every entry up to [`TEXT_FULL_MAX`] rows, else a summary.
fn matrix_text(m: &DMatrix<f64>, labels: &[String]) -> String {
    if m.nrows() > TEXT_FULL_MAX {
        summary_text(m, labels)
    } else {
        full_matrix_text(m, labels)
    }
}

/// A labelled matrix: a header row of column labels, then one labelled row per entry,
/// split into blocks of columns so that no line passes [`TEXT_WIDTH`] characters.
fn full_matrix_text(m: &DMatrix<f64>, labels: &[String]) -> String {
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
    // With QMC the largest error may be a 3σ statistical estimate, not a bound.
    let largest = match r.qmc_3sigma {
        Some(q) if q >= r.max_error => format!(
            "largest stated error {:.1e}, a QMC 3σ estimate (statistical, not a bound)",
            r.max_error
        ),
        Some(q) => format!(
            "largest stated error {:.1e}; QMC's 3σ estimate {q:.1e} is statistical, not a bound",
            r.max_error
        ),
        None => format!("largest stated error {:.1e}", r.max_error),
    };
    if r.methods.is_empty() {
        s.push_str("\n# methods: none (no expectation had to be computed)\n");
    } else {
        let line = format!("# methods: {}; {largest}", r.methods.join("; "));
        if line.chars().count() <= TEXT_WIDTH {
            s.push_str(&format!("\n{line}\n"));
        } else {
            s.push_str(&format!("\n# methods ({largest}):\n"));
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
