//! `tpc predict`: its options and the glue from files to `tpc::predict` (README,
//! "Prediction on test points").

use std::path::{Path, PathBuf};

use super::io::{
    compile_file_for_limit, emit, fail, limit_fail, load_points, print_out, read_limited,
};
use crate::{Format, Reported};

/// `tpc predict`'s options.
#[derive(clap::Args)]
pub(crate) struct PredictArgs {
    pub(crate) file: PathBuf,
    /// CSV of training points, one per row [default: the `train` block's data]
    #[arg(long, requires = "targets")]
    pub(crate) train: Option<PathBuf>,
    /// CSV of training targets, one row per training point
    #[arg(long, requires = "train")]
    pub(crate) targets: Option<PathBuf>,
    /// CSV of test points, one per row
    #[arg(long)]
    pub(crate) test: PathBuf,
    /// CSV of test targets: adds test MSE (and accuracy, with several columns)
    #[arg(long)]
    pub(crate) test_targets: Option<PathBuf>,
    /// Times of gradient flow, comma-separated; `inf` for the converged ensemble
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub(crate) t: Vec<String>,
    /// Discrete steps of the `train` block's gradient descent, comma-separated
    #[arg(long, value_delimiter = ',', num_args = 1..,
              value_parser = clap::value_parser!(u64).range(0..=1_000_000_000))]
    pub(crate) steps: Vec<u64>,
    /// Diagonal regularization ε of the training kernels: ε·trace/size (relative,
    /// NT's default) or ε (with --diag-reg-absolute)
    #[arg(long, default_value_t = 0.0)]
    pub(crate) diag_reg: f64,
    #[arg(long)]
    pub(crate) diag_reg_absolute: bool,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub(crate) format: Format,
    /// Write means and covariances as NumPy `.npy` files and `meta.json` into DIR
    #[arg(long, value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
}

/// `tpc predict`: the limit kernels over training and test points together, then the
/// NNGP and NTK predictors ([`tpc::predict`]) at every time asked for.
pub(crate) fn predict(a: PredictArgs) -> Result<(), Reported> {
    let file = a.file.as_path();
    let mut prog = compile_file_for_limit(file)?;
    let what = file.display();
    if prog.inputs.is_empty() {
        return Err(fail(&format!(
            "{what}: prediction needs a program with an `input`"
        )));
    }
    let (xs, ys) = match (&a.train, &a.targets) {
        (Some(x), Some(y)) => {
            let xs = load_points(&prog, Some(x))?;
            let ys = load_targets(y, xs.len())?;
            (xs, ys)
        }
        _ => match &prog.train {
            Some(tr) => tr.data.iter().map(|s| (s.x.clone(), s.y.clone())).unzip(),
            None => {
                return Err(fail(&format!(
                    "{what}: give --train and --targets (the program has no `train` block \
                     whose data could be used)"
                )))
            }
        },
    };
    let xt = load_points(&prog, Some(&a.test))?;
    let yt = match &a.test_targets {
        Some(p) => Some(load_targets(p, xt.len())?),
        None => None,
    };
    let cols = ys.first().map_or(0, Vec::len);
    if let Some(yt) = &yt {
        if yt.first().map_or(0, Vec::len) != cols {
            return Err(fail(&format!(
                "the test targets have {} columns, the training targets {cols}",
                yt.first().map_or(0, Vec::len)
            )));
        }
    }
    let mut times = Vec::new();
    for s in &a.t {
        match s.trim() {
            "inf" | "infinity" => times.push(tpc::predict::Time::Infinity),
            v => match v.parse::<f64>() {
                Ok(t) if t.is_finite() && t >= 0.0 => times.push(tpc::predict::Time::Flow(t)),
                _ => {
                    return Err(fail(&format!(
                        "--t {v}: a time is a finite number ≥ 0, or `inf`"
                    )))
                }
            },
        }
    }
    if !a.steps.is_empty() {
        let Some(lr) = prog.train.as_ref().map(|t| t.lr) else {
            return Err(fail(&format!(
                "{what}: --steps counts steps of the `train` block's gradient descent, and the \
                 program has none: use --t (continuous time)"
            )));
        };
        for &k in &a.steps {
            times.push(tpc::predict::Time::Steps {
                steps: k as usize,
                lr,
            });
        }
    }
    if times.is_empty() {
        times.push(tpc::predict::Time::Infinity);
    }
    let outputs = prog.output_names();
    let prior: Vec<f64> = prog
        .outputs
        .iter()
        .map(|&o| match &prog.node(o).op {
            tpc::ir::Op::Output { constant, .. } => *constant,
            _ => 0.0,
        })
        .collect();
    // The kernels only: the `train` block's own trajectory is not needed here.
    prog.train = None;
    let all: Vec<Vec<f64>> = xs.iter().chain(&xt).cloned().collect();
    let r = tpc::limit::limit(&prog, &all).map_err(|e| limit_fail(file, &e))?;
    let (Some(k), Some(th)) = (&r.nngp, &r.ntk) else {
        let note = r.nngp_note.or(r.ntk_note).unwrap_or_default();
        return Err(fail(&format!(
            "{what}: the limit kernels are not finite: {note}"
        )));
    };
    let matrix = |rows: &[Vec<f64>]| {
        let c = rows.first().map_or(0, Vec::len);
        nalgebra::DMatrix::from_fn(rows.len(), c, |i, j| rows[i][j])
    };
    let (y, ytm) = (matrix(&ys), yt.as_deref().map(matrix));
    let prob = tpc::predict::Problem {
        nngp: k,
        ntk: th,
        outputs: outputs.len(),
        train: xs.len(),
        targets: &y,
        prior_mean: &prior,
        diag_reg: a.diag_reg,
        diag_reg_absolute: a.diag_reg_absolute,
    };
    let preds = prob
        .predict(&times)
        .map_err(|e| fail(&format!("{what}: {e}")))?;
    if let Some(dir) = &a.out {
        let meta = tpc::report::predict::save(dir, &outputs, xs.len(), &preds, ytm.as_ref())
            .map_err(|e| fail(&format!("cannot write into `{}`: {e}", dir.display())))?;
        let text = serde_json::to_string_pretty(&meta)
            .map_err(|e| fail(&format!("cannot write JSON: {e}")))?;
        return print_out(&(text + "\n"));
    }
    if a.format == Format::Json {
        let v = tpc::report::predict::json(&outputs, xs.len(), &preds, ytm.as_ref());
        let text = serde_json::to_string_pretty(&v)
            .map_err(|e| fail(&format!("cannot write JSON: {e}")))?;
        return print_out(&(text + "\n"));
    }
    print_out(&tpc::report::predict::text(
        &outputs,
        xs.len(),
        &preds,
        ytm.as_ref(),
    ))
}

/// Reads a CSV of targets, `rows` rows (E0028 against the file when malformed).
pub(crate) fn load_targets(path: &Path, rows: usize) -> Result<Vec<Vec<f64>>, Reported> {
    let name = path.display().to_string();
    let bytes = read_limited(path, tpc::data::MAX_BYTES)?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    tpc::data::parse_targets(&name, &text, rows).map_err(|e| {
        emit(&name, &text, &[e.diagnostic()]);
        Reported
    })
}
