//! `tpc run`: finite-width estimates with standard errors, as text or cli.md's JSON.
//!
//! Mirrors [`super::limit`] key for key, so a script can compare `limit` and `run`
//! output entry by entry: each estimate `X` comes with `X_se` of the same shape.

use std::path::Path;

use nalgebra::DMatrix;
use serde_json::{json, Map, Value};

use super::limit::num;
use super::npy;
use super::stream::Node;
use crate::finite::exec::{Estimate, RunResult};

/// A 1×c estimate as `limit` prints observes: a number when c = 1, else an array.
fn row_json(m: &DMatrix<f64>) -> Value {
    if m.len() == 1 {
        num(m[(0, 0)])
    } else {
        Value::Array(m.iter().map(|x| num(*x)).collect())
    }
}

fn observes_json(r: &RunResult) -> (Value, Value) {
    let mut obs = Map::new();
    let mut obs_se = Map::new();
    for (name, e) in &r.observe {
        obs.insert(name.clone(), row_json(&e.mean));
        obs_se.insert(name.clone(), e.se.as_ref().map_or(Value::Null, row_json));
    }
    (Value::Object(obs), Value::Object(obs_se))
}

/// cli.md's `run` JSON as a tree whose matrices are borrowed, for streaming
/// ([`Node::write_pretty`]).
pub fn tree(r: &RunResult) -> Node<'_> {
    let (obs, obs_se) = observes_json(r);
    let mut v = Node::object();
    v.push("outputs", json!(r.outputs));
    v.push("points", json!(r.points));
    v.push("nngp", &r.nngp.mean);
    v.push("ntk", &r.ntk.mean);
    v.push("observe", obs);
    v.push("nngp_se", r.nngp.se.as_ref());
    v.push("ntk_se", r.ntk.se.as_ref());
    v.push("observe_se", obs_se);
    v.push("f", &r.f.mean);
    v.push("f_se", r.f.se.as_ref());
    v.push("width", json!(r.width));
    v.push("seeds", json!(r.seeds));
    v.push("seed", json!(r.seed));
    if let Some(t) = &r.train {
        let mut tr = Node::object();
        tr.push("f_t", &t.f_t.mean);
        tr.push("f_t_se", t.f_t.se.as_ref());
        tr.push("optimizer", optimizer_json(t, r.width));
        tr.push("weight_decay", monomial_json(t.weight_decay, r.width));
        tr.push("batch", json!(t.batch));
        v.push("train", tr);
    }
    v
}

/// A width-dependent hyperparameter: its value at this width and, when it depends on
/// the width, its law (`{"value": 1.5625e-10, "law": "1e-8 * n^(-1)"}` at n = 64); a plain
/// number otherwise.
fn monomial_json(m: crate::ir::Monomial, width: usize) -> Value {
    if m.exp.is_zero() {
        json!(m.coef)
    } else {
        json!({"value": m.at(width as f64), "law": m.to_string()})
    }
}

/// `train.optimizer` in `tpc run --format json` (README, "Training: optimizers"): the
/// name and the hyperparameters, keys added beside cli.md's `f_t` and `f_t_se`.
fn optimizer_json(t: &crate::finite::train::TrainResult, width: usize) -> Value {
    use crate::ir::Optimizer;
    match t.optim {
        Optimizer::Sgd => json!({"name": "sgd"}),
        Optimizer::Momentum { beta } => json!({"name": "momentum", "beta": beta}),
        Optimizer::Adam { beta1, beta2, eps } => json!({
            "name": "adam", "beta1": beta1, "beta2": beta2, "eps": monomial_json(eps, width)
        }),
        Optimizer::AdamW {
            beta1,
            beta2,
            eps,
            wd,
        } => json!({
            "name": "adamw", "beta1": beta1, "beta2": beta2,
            "eps": monomial_json(eps, width), "wd": monomial_json(wd, width)
        }),
    }
}

/// cli.md's `run` JSON: the `limit` keys estimated, each with its standard error
/// (`null` with a single draw), and `width`, `seeds`.
pub fn json(r: &RunResult) -> Value {
    tree(r).to_value()
}

/// `tpc run --out DIR`: every estimate and its standard error as `.npy` files
/// ([`super::npy`]) and `meta.json` with the rest.
pub fn save(dir: &Path, r: &RunResult) -> std::io::Result<Value> {
    std::fs::create_dir_all(dir)?;
    let mut files = Map::new();
    let mut save = |name: &str, e: &Estimate| -> std::io::Result<()> {
        for (n, m) in [
            (name.to_string(), Some(&e.mean)),
            (format!("{name}_se"), e.se.as_ref()),
        ] {
            if let Some(m) = m {
                let file = format!("{n}.npy");
                npy::save_matrix(&dir.join(&file), m)?;
                files.insert(n, json!({"file": file, "shape": [m.nrows(), m.ncols()]}));
            }
        }
        Ok(())
    };
    save("nngp", &r.nngp)?;
    save("ntk", &r.ntk)?;
    save("f", &r.f)?;
    if let Some(t) = &r.train {
        save("f_t", &t.f_t)?;
    }
    let (obs, obs_se) = observes_json(r);
    let mut meta = Map::new();
    meta.insert("outputs".into(), json!(r.outputs));
    meta.insert("points".into(), json!(r.points));
    meta.insert("order".into(), json!(super::limit::KERNEL_ORDER));
    meta.insert("files".into(), Value::Object(files));
    meta.insert("observe".into(), obs);
    meta.insert("observe_se".into(), obs_se);
    if let Some(t) = &r.train {
        meta.insert(
            "train".into(),
            if t.plain_sgd {
                json!({"loss": t.loss.name(), "lr": t.lr, "steps": t.steps})
            } else {
                json!({"loss": t.loss.name(), "lr": t.lr, "steps": t.steps, "optimizer": t.optimizer})
            },
        );
    }
    meta.insert("width".into(), json!(r.width));
    meta.insert("seeds".into(), json!(r.seeds));
    meta.insert("seed".into(), json!(r.seed));
    let meta = Value::Object(meta);
    super::limit::write_meta(dir, &meta)?;
    Ok(meta)
}

/// A kernel estimate in text: every entry up to [`super::limit::TEXT_FULL_MAX`] rows,
/// else its shape, statistics of the mean, the largest standard error and the top-left
/// block (every entry with `--out DIR` or `--format json`).
fn kernel_text(e: &Estimate, labels: &[String]) -> String {
    use super::limit::{summary_stats, SUMMARY_BLOCK, TEXT_FULL_MAX};
    let m = &e.mean;
    if m.nrows() <= TEXT_FULL_MAX {
        return matrix_text(e, labels);
    }
    let mut s = format!(
        "  {}×{} (summarized: more than {TEXT_FULL_MAX} rows; every entry with --out DIR or --format json)\n",
        m.nrows(),
        m.ncols()
    );
    s.push_str(&summary_stats(m));
    if let Some(se) = &e.se {
        let max = se.iter().copied().fold(0.0, f64::max);
        s.push_str(&format!("  largest standard error: {max:.2e}\n"));
    }
    let b = SUMMARY_BLOCK.min(m.nrows()).min(m.ncols());
    s.push_str(&format!("  top-left {b}×{b} block:\n"));
    let block = Estimate {
        mean: m.view((0, 0), (b, b)).into_owned(),
        se: e.se.as_ref().map(|x| x.view((0, 0), (b, b)).into_owned()),
    };
    s.push_str(&matrix_text(&block, labels));
    s
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
        s.push_str(&kernel_text(&r.nngp, &l));
        s.push_str("\n# NTK (lr-weighted, theory.md §2.3; exact gradients)\n");
        s.push_str(&kernel_text(&r.ntk, &l));
    }
    if let Some(t) = &r.train {
        s.push_str(&format!(
            "\n# training: f_t after t steps of {} (loss {}, lr {}, {} step(s))\n",
            t.optimizer,
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
