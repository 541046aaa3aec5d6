//! `tpc predict` output: a summary table per time (with test metrics when test targets
//! are given), JSON with every mean and variance, `.npy` files with the covariances.

use std::path::Path;

use nalgebra::DMatrix;
use serde_json::{json, Value};

use crate::predict::{Gaussian, Prediction, Time};

/// Test metrics of one predictor against test targets: mean squared error per target
/// entry and, with several target columns, the fraction whose largest mean is the
/// largest target (classification accuracy with one-hot targets).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Metrics {
    pub mse: f64,
    pub accuracy: Option<f64>,
}

/// [`Metrics`] of `mean` (T×C) against `targets` (T×C).
pub fn metrics(mean: &DMatrix<f64>, targets: &DMatrix<f64>) -> Metrics {
    let mse = (mean - targets).iter().map(|d| d * d).sum::<f64>() / mean.len().max(1) as f64;
    let accuracy = (mean.ncols() > 1).then(|| {
        let argmax = |m: &DMatrix<f64>, i: usize| {
            (0..m.ncols()).fold(0, |b, j| if m[(i, j)] > m[(i, b)] { j } else { b })
        };
        let hits = (0..mean.nrows())
            .filter(|&i| argmax(mean, i) == argmax(targets, i))
            .count();
        hits as f64 / mean.nrows().max(1) as f64
    });
    Metrics { mse, accuracy }
}

fn time_json(t: &Time) -> Value {
    match t {
        Time::Flow(t) => json!({"t": t}),
        Time::Steps { steps, lr } => json!({"steps": steps, "lr": lr}),
        Time::Infinity => json!({"t": "inf"}),
    }
}

fn rows(m: &DMatrix<f64>) -> Value {
    Value::Array(
        (0..m.nrows())
            .map(|i| Value::Array((0..m.ncols()).map(|j| json!(m[(i, j)])).collect()))
            .collect(),
    )
}

/// The variances of the test points, T×O (the covariance's diagonal, output-major).
pub fn variances(g: &Gaussian, outputs: usize) -> DMatrix<f64> {
    let o = outputs.max(1);
    let t = g.cov.nrows() / o;
    DMatrix::from_fn(t, o, |i, oi| g.cov[(oi * t + i, oi * t + i)])
}

/// The JSON document: cli.md's conventions (outputs by name, matrices as rows).
pub fn json(
    outputs: &[String],
    train: usize,
    preds: &[Prediction],
    targets: Option<&DMatrix<f64>>,
) -> Value {
    let o = outputs.len();
    let one = |g: &Gaussian| {
        let mut v = json!({"mean": rows(&g.mean), "var": rows(&variances(g, o))});
        if let Some(y) = targets {
            let m = metrics(&g.mean, y);
            v["test_mse"] = json!(m.mse);
            if let Some(a) = m.accuracy {
                v["test_accuracy"] = json!(a);
            }
        }
        v
    };
    json!({
        "outputs": outputs,
        "train_points": train,
        "test_points": preds.first().map(|p| p.nngp.mean.nrows()).unwrap_or(0),
        "predictions": preds.iter().map(|p| json!({
            "time": time_json(&p.time),
            "nngp": one(&p.nngp),
            "ntk": one(&p.ntk),
        })).collect::<Vec<_>>(),
    })
}

/// A table: one row per (time, predictor) with its test metrics when targets are
/// given, else the mean of the first test point and the mean variance.
pub fn text(
    outputs: &[String],
    train: usize,
    preds: &[Prediction],
    targets: Option<&DMatrix<f64>>,
) -> String {
    let o = outputs.len();
    let t = preds.first().map(|p| p.nngp.mean.nrows()).unwrap_or(0);
    let mut s = format!(
        "# Infinite-width prediction: {train} training points, {t} test points, outputs {}\n",
        outputs.join(", ")
    );
    s.push_str(
        "# NNGP: readout trained (t = inf: the GP posterior); NTK: every layer trained \
         (linearized dynamics)\n",
    );
    match targets {
        Some(_) => s.push_str(&format!(
            "{:<28} {:<6} {:>14} {:>10} {:>14}\n",
            "time", "kernel", "test MSE", "accuracy", "mean variance"
        )),
        None => s.push_str(&format!(
            "{:<28} {:<6} {:>22} {:>14}\n",
            "time", "kernel", "mean at 1st test point", "mean variance"
        )),
    }
    for p in preds {
        for (name, g) in [("NNGP", &p.nngp), ("NTK", &p.ntk)] {
            let var = variances(g, o);
            let mean_var = var.iter().sum::<f64>() / var.len().max(1) as f64;
            let time = p.time.to_string();
            match targets {
                Some(y) => {
                    let m = metrics(&g.mean, y);
                    let acc = m
                        .accuracy
                        .map(|a| format!("{:.4}", a))
                        .unwrap_or_else(|| "-".into());
                    s.push_str(&format!(
                        "{time:<28} {name:<6} {:>14.6e} {acc:>10} {mean_var:>14.6e}\n",
                        m.mse
                    ));
                }
                None => s.push_str(&format!(
                    "{time:<28} {name:<6} {:>22.10e} {mean_var:>14.6e}\n",
                    g.mean[(0, 0)]
                )),
            }
        }
    }
    s
}

/// Writes `k_nngp_mean.npy`, `k_nngp_cov.npy`, `k_ntk_mean.npy`, `k_ntk_cov.npy` for
/// each time k (0-based, in the order given) into `dir`, and returns the JSON of
/// [`json()`] with file names instead of the matrices.
pub fn save(
    dir: &Path,
    outputs: &[String],
    train: usize,
    preds: &[Prediction],
    targets: Option<&DMatrix<f64>>,
) -> std::io::Result<Value> {
    std::fs::create_dir_all(dir)?;
    let mut meta = json(outputs, train, preds, targets);
    for (k, p) in preds.iter().enumerate() {
        for (name, g) in [("nngp", &p.nngp), ("ntk", &p.ntk)] {
            let (mf, cf) = (
                format!("{k}_{name}_mean.npy"),
                format!("{k}_{name}_cov.npy"),
            );
            super::npy::save_matrix(&dir.join(&mf), &g.mean)?;
            super::npy::save_matrix(&dir.join(&cf), &g.cov)?;
            let v = &mut meta["predictions"][k][name];
            v["mean"] = json!(mf);
            v["cov"] = json!(cf);
            v.as_object_mut().map(|o| o.remove("var"));
        }
    }
    std::fs::write(
        dir.join("meta.json"),
        serde_json::to_string_pretty(&meta).map_err(std::io::Error::other)? + "\n",
    )?;
    Ok(meta)
}
