//! `tpc run`: finite-width estimates with standard errors, as text or cli.md's JSON.
//!
//! Mirrors [`super::limit`] key for key, so a script can compare `limit` and `run`
//! output entry by entry: each estimate `X` comes with `X_se` of the same shape.

use nalgebra::DMatrix;
use serde_json::{json, Map, Value};

use super::limit::num;
use crate::finite::exec::{Estimate, RunResult};

fn matrix_json(m: &DMatrix<f64>) -> Value {
    Value::Array(
        (0..m.nrows())
            .map(|i| Value::Array((0..m.ncols()).map(|j| num(m[(i, j)])).collect()))
            .collect(),
    )
}

/// A 1×c estimate as `limit` prints observes: a number when c = 1, else an array.
fn row_json(m: &DMatrix<f64>) -> Value {
    if m.len() == 1 {
        num(m[(0, 0)])
    } else {
        Value::Array(m.iter().map(|x| num(*x)).collect())
    }
}

fn se_json(e: &Estimate, f: fn(&DMatrix<f64>) -> Value) -> Value {
    e.se.as_ref().map_or(Value::Null, f)
}

/// cli.md's `run` JSON: the `limit` keys estimated, each with its standard error
/// (`null` with a single draw), and `width`, `seeds`.
pub fn json(r: &RunResult) -> Value {
    let mut obs = Map::new();
    let mut obs_se = Map::new();
    for (name, e) in &r.observe {
        obs.insert(name.clone(), row_json(&e.mean));
        obs_se.insert(name.clone(), se_json(e, row_json));
    }
    let mut v = json!({
        "outputs": r.outputs,
        "points": r.points,
        "nngp": matrix_json(&r.nngp.mean),
        "ntk": matrix_json(&r.ntk.mean),
        "observe": obs,
        "nngp_se": se_json(&r.nngp, matrix_json),
        "ntk_se": se_json(&r.ntk, matrix_json),
        "observe_se": obs_se,
        "f": matrix_json(&r.f.mean),
        "f_se": se_json(&r.f, matrix_json),
        "width": r.width,
        "seeds": r.seeds,
        "seed": r.seed,
    });
    if let (Some(t), Value::Object(m)) = (&r.train, &mut v) {
        m.insert(
            "train".into(),
            json!({
                "f_t": matrix_json(&t.f_t.mean),
                "f_t_se": se_json(&t.f_t, matrix_json),
            }),
        );
    }
    v
}

fn matrix_text(e: &Estimate, labels: &[String]) -> String {
    let w = labels.iter().map(|l| l.len()).max().unwrap_or(0);
    let m = &e.mean;
    let mut s = String::new();
    for i in 0..m.nrows() {
        s.push_str(&format!(
            "  {:w$} ",
            labels.get(i).map(String::as_str).unwrap_or("")
        ));
        for j in 0..m.ncols() {
            match &e.se {
                Some(se) => s.push_str(&format!(" {:>12.8} ± {:<10.2e}", m[(i, j)], se[(i, j)])),
                None => s.push_str(&format!(" {:>12.8}", m[(i, j)])),
            }
        }
        s.push('\n');
    }
    s
}

/// Row labels `f(p1)`: output-major over points.
fn labels(r: &RunResult) -> Vec<String> {
    let p = r.points.len().max(1);
    r.outputs
        .iter()
        .flat_map(|o| (1..=p).map(move |i| format!("{o}(p{i})")))
        .collect()
}

/// The text report: like `tpc limit`'s numbers, each with ± its standard error.
pub fn text(r: &RunResult) -> String {
    let mut s = format!(
        "# finite width n = {}, {} draw(s) from seed {}; ± is one standard error (sd/√K)\n",
        r.width, r.seeds, r.seed
    );
    if r.seeds < 2 {
        s.push_str("# one draw: no standard errors (use --seeds 2 or more)\n");
    }
    let l = labels(r);
    if !r.outputs.is_empty() {
        s.push_str(
            "\n# NNGP (output-major: row k = output*P + point; conditioned on the features)\n",
        );
        s.push_str(&matrix_text(&r.nngp, &l));
        s.push_str("\n# NTK (lr-weighted, theory.md §2.3; exact gradients)\n");
        s.push_str(&matrix_text(&r.ntk, &l));
    }
    if let Some(t) = &r.train {
        s.push_str(&format!(
            "\n# training: f_t after t steps of full-batch gradient descent (loss {}, lr {}, {} step(s))\n",
            t.loss.name(),
            t.lr,
            t.steps
        ));
        s.push_str(&format!("  columns: {}\n", l.join(", ")));
        let rows: Vec<String> = (0..=t.steps).map(|i| format!("t={i}")).collect();
        s.push_str(&matrix_text(&t.f_t, &rows));
    }
    if !r.observe.is_empty() {
        s.push_str("\n# observe\n");
        for (name, e) in &r.observe {
            let vals: Vec<String> = (0..e.mean.len())
                .map(|j| match &e.se {
                    Some(se) => format!("{:.12} ± {:.2e}", e.mean[(0, j)], se[(0, j)]),
                    None => format!("{:.12}", e.mean[(0, j)]),
                })
                .collect();
            s.push_str(&format!("  {name} = {}\n", vals.join(", ")));
        }
    }
    s
}
