//! `tpc compare`: finite width against the infinite-width limit, width by width, with
//! the fitted rate of convergence and a log–log plot.
//!
//! The limit is computed once ([`crate::limit::limit`]); at each width N the finite
//! executor runs K draws ([`crate::finite::exec::run_one`]: draw k of seed S is the same
//! draw as in `tpc run --width N --seed S`, so any row can be reproduced there). For each
//! quantity group (NNGP entries, NTK entries, observes) and each width it reports
//!
//! * `|mean − limit|`, max and RMS over entries, where `mean` is the finite mean over the
//!   K draws, and the RMS of that mean's standard error (sd/√K): an error well above the
//!   SE is the O(1/N) bias showing, an error of the order of the SE is noise;
//! * `rms|draw − limit|`: the root mean square over draws *and* entries of one draw's
//!   deviation from the limit, with its Monte-Carlo standard error. This is the typical
//!   error of one network of width N; by the CLT (theory.md §1.2) it scales as N^(-1/2)
//!   (its square is variance + bias² = c/N + O(1/N²)), and it is what the slope is fitted
//!   to.
//!
//! # The slope and its standard error
//!
//! `y_i = ln rms|draw − limit|` at `x_i = ln N_i` is fitted by ordinary least squares:
//! `slope = Σ c_i y_i` with `c_i = (x_i − x̄) / Σ_j (x_j − x̄)²`.
//!
//! The draws are *paired* across widths: draw k of seed S fills every column of every
//! parameter from its own stream (`finite::sample`), so the width-256 network of draw k
//! is the top-left corner of its width-4096 network. The errors at different widths are
//! therefore positively correlated (common random numbers), which makes the slope less
//! noisy than independent draws would, and its standard error must use the pairing.
//! With `s_ik` the mean over entries of `(draw_k − limit)²` at width `N_i` and
//! `e_i² = mean_k s_ik`, the delta method gives `y_i ≈ const + mean_k u_ik` with
//! `u_ik = s_ik / (2 e_i²)`, so the slope is (to first order) a mean over draws of
//! `t_k = Σ_i c_i u_ik`, and its Monte-Carlo standard error is `sd(t_k)/√K`.
//!
//! That error is scaled up by `sqrt(χ²/dof)` when the residuals are larger than the
//! noise explains (χ² = Σ r_i² / var(y_i), the same delta-method variances;
//! dof = widths − 2; never scaled down): a curved
//! log–log line (the O(1/N) terms at small widths) widens the error bar instead of
//! hiding in it.

use nalgebra::DMatrix;
use plotters::prelude::*;
use serde_json::{json, Value};

use super::limit::num;
use crate::finite::exec::{
    describe_value, out_of_range, run_one_engine, Draw, Engine, Footprint, RunError,
};
use crate::ir::Program;
use crate::limit::LimitResult;

/// The default widths of `tpc compare` (documented in `--help`).
pub const DEFAULT_WIDTHS: [u64; 3] = [256, 1024, 4096];
/// The default number of draws per width.
pub const DEFAULT_SEEDS: u64 = 32;

/// What to compare.
#[derive(Clone, Debug)]
pub struct CompareConfig {
    /// Widths, at least two distinct ones (sorted and deduplicated by [`compare`]).
    pub widths: Vec<usize>,
    /// Draws per width K (at least 2).
    pub seeds: usize,
    /// The seed S, the same at every width.
    pub seed: u64,
    /// How hidden-matrix products are drawn: the conditional engine takes the widths
    /// past what an N×N matrix allows (10^6 and beyond).
    pub engine: Engine,
}

/// One width of one quantity group.
#[derive(Clone, Debug)]
pub struct Row {
    pub width: usize,
    /// max over entries of |mean − limit|.
    pub mean_err_max: f64,
    /// RMS over entries of |mean − limit|.
    pub mean_err_rms: f64,
    /// max over entries of the standard error of the mean.
    pub se_max: f64,
    /// RMS over entries of the standard error of the mean.
    pub se_rms: f64,
    /// RMS over draws and entries of |draw − limit|.
    pub draw_rms: f64,
    /// Monte-Carlo standard error of `draw_rms` (delta method).
    pub draw_rms_se: f64,
}

/// A least-squares fit of ln(draw_rms) against ln(width).
#[derive(Clone, Copy, Debug)]
pub struct Fit {
    pub slope: f64,
    /// The reported standard error: `se_mc` scaled by max(1, sqrt(χ²/dof)).
    pub se: f64,
    /// The standard error propagated from the Monte-Carlo errors alone.
    pub se_mc: f64,
    /// ln of the fitted error at width 1.
    pub intercept: f64,
    pub chi2: f64,
    pub dof: usize,
}

/// One quantity group: NNGP, NTK or the observes.
#[derive(Clone, Debug)]
pub struct Group {
    /// "nngp", "ntk" or "observe" (the JSON key).
    pub key: &'static str,
    /// "NNGP", "NTK", "observe" (for text and the plot).
    pub label: &'static str,
    pub entries: usize,
    pub rows: Vec<Row>,
    /// None when the error is zero or not finite at some width (no logarithm).
    pub fit: Option<Fit>,
}

/// Everything `tpc compare` reports.
#[derive(Clone, Debug)]
pub struct CompareResult {
    /// The program's file name, as the caption names it.
    pub program: String,
    pub outputs: Vec<String>,
    /// The number of points (1 for a program without inputs).
    pub points: usize,
    pub widths: Vec<usize>,
    pub seeds: usize,
    pub seed: u64,
    /// The engine the finite draws came from.
    pub engine: Engine,
    pub groups: Vec<Group>,
    /// Groups left out and why (e.g. an NNGP with no Gaussian limit).
    pub notes: Vec<String>,
    /// How the limit was computed, and its largest stated error.
    pub limit_methods: Vec<String>,
    pub limit_max_error: f64,
}

/// The limit values of one group, flattened (column-major for matrices).
struct Target {
    key: &'static str,
    label: &'static str,
    values: Vec<f64>,
}

fn targets(prog: &Program, lim: &LimitResult, notes: &mut Vec<String>) -> Vec<Target> {
    let mut out = Vec::new();
    if !lim.outputs.is_empty() {
        match &lim.nngp {
            Some(m) => out.push(Target {
                key: "nngp",
                label: "NNGP",
                values: m.iter().copied().collect(),
            }),
            None => notes.push(format!(
                "NNGP left out: {}",
                lim.nngp_note.as_deref().unwrap_or("no limit")
            )),
        }
        match &lim.ntk {
            Some(m) => out.push(Target {
                key: "ntk",
                label: "NTK",
                values: m.iter().copied().collect(),
            }),
            None => notes.push(format!(
                "NTK left out: {}",
                lim.ntk_note.as_deref().unwrap_or("no limit")
            )),
        }
    }
    if !prog.observes.is_empty() && !lim.observe.is_empty() {
        out.push(Target {
            key: "observe",
            label: "observe",
            values: lim
                .observe
                .iter()
                .flat_map(|(_, v)| v.iter().copied())
                .collect(),
        });
    }
    out
}

/// One draw's values of a group, in the order of [`targets`].
fn draw_values(key: &str, d: &Draw, lim: &LimitResult) -> Vec<f64> {
    let flat = |m: &DMatrix<f64>| m.iter().copied().collect::<Vec<f64>>();
    match key {
        "nngp" => flat(&d.nngp),
        "ntk" => flat(&d.ntk),
        _ => {
            // An observe that does not depend on the point is one value on either side;
            // broadcast if the two interpreters disagree on that.
            let mut v = Vec::new();
            for (i, (_, l)) in lim.observe.iter().enumerate() {
                let f = d.observe.get(i).map(Vec::as_slice).unwrap_or(&[]);
                for j in 0..l.len() {
                    v.push(match f.len() {
                        1 => f[0],
                        _ => f.get(j).copied().unwrap_or(f64::NAN),
                    });
                }
            }
            v
        }
    }
}

/// Statistics of one group at one width from K draws (`vals[k][e]`), summed in draw
/// order so they do not depend on scheduling; and `s_k`, each draw's mean square
/// deviation from the limit over the entries.
fn row(width: usize, vals: &[Vec<f64>], lim: &[f64]) -> (Row, Vec<f64>) {
    let k = vals.len() as f64;
    let m = lim.len().max(1) as f64;
    let mut mean = vec![0.0; lim.len()];
    for v in vals {
        for (a, x) in mean.iter_mut().zip(v) {
            *a += x;
        }
    }
    mean.iter_mut().for_each(|a| *a /= k);
    let mut ss = vec![0.0; lim.len()];
    for v in vals {
        for ((a, x), mu) in ss.iter_mut().zip(v).zip(&mean) {
            *a += (x - mu) * (x - mu);
        }
    }
    let se: Vec<f64> = ss.iter().map(|s| (s / (k - 1.0) / k).sqrt()).collect();
    let err: Vec<f64> = mean.iter().zip(lim).map(|(a, l)| (a - l).abs()).collect();
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let rms = |v: &[f64]| (v.iter().map(|x| x * x).sum::<f64>() / m).sqrt();
    let s: Vec<f64> = vals
        .iter()
        .map(|v| {
            v.iter()
                .zip(lim)
                .map(|(x, l)| (x - l) * (x - l))
                .sum::<f64>()
                / m
        })
        .collect();
    let e2 = s.iter().sum::<f64>() / k;
    let var_s = s.iter().map(|x| (x - e2) * (x - e2)).sum::<f64>() / (k - 1.0);
    let draw_rms = e2.sqrt();
    // se(e) = se(e²) / (2e) by the delta method.
    let draw_rms_se = if draw_rms > 0.0 {
        (var_s / k).sqrt() / (2.0 * draw_rms)
    } else {
        0.0
    };
    let r = Row {
        width,
        mean_err_max: max(&err),
        mean_err_rms: rms(&err),
        se_max: max(&se),
        se_rms: rms(&se),
        draw_rms,
        draw_rms_se,
    };
    (r, s)
}

/// Least squares of `ln rms|draw − limit|` on `ln width`, with the paired delta-method
/// standard error of the module documentation. `s[i][k]` is draw k's mean square
/// deviation at `widths[i]` (the same K draws, paired across widths). None when some
/// error is zero or not finite, or there are fewer than two widths or draws.
pub fn fit(widths: &[usize], s: &[Vec<f64>]) -> Option<Fit> {
    let n = widths.len();
    if n < 2 || s.len() != n {
        return None;
    }
    let kk = s[0].len();
    if kk < 2 || s.iter().any(|v| v.len() != kk) {
        return None;
    }
    let k = kk as f64;
    let e2: Vec<f64> = s.iter().map(|v| v.iter().sum::<f64>() / k).collect();
    if e2.iter().any(|e| !(*e > 0.0 && e.is_finite())) {
        return None;
    }
    let x: Vec<f64> = widths.iter().map(|&w| (w as f64).ln()).collect();
    let y: Vec<f64> = e2.iter().map(|e| 0.5 * e.ln()).collect();
    let xm = x.iter().sum::<f64>() / n as f64;
    let ym = y.iter().sum::<f64>() / n as f64;
    let sxx: f64 = x.iter().map(|a| (a - xm) * (a - xm)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let c: Vec<f64> = x.iter().map(|a| (a - xm) / sxx).collect();
    let slope: f64 = c.iter().zip(&y).map(|(c, y)| c * y).sum();
    let intercept = ym - slope * xm;
    // δy_i ≈ mean_k u_ik − 1/2 with u_ik = s_ik / (2 e2_i): slope and covariances are
    // means over the same draws.
    let u: Vec<Vec<f64>> = s
        .iter()
        .zip(&e2)
        .map(|(v, e)| v.iter().map(|x| x / (2.0 * e)).collect())
        .collect();
    let um: Vec<f64> = u.iter().map(|v| v.iter().sum::<f64>() / k).collect();
    let t: Vec<f64> = (0..kk)
        .map(|j| c.iter().zip(&u).map(|(c, v)| c * v[j]).sum())
        .collect();
    let tm = t.iter().sum::<f64>() / k;
    let se_mc = (t.iter().map(|a| (a - tm) * (a - tm)).sum::<f64>() / (k - 1.0) / k).sqrt();
    let var: Vec<f64> = u
        .iter()
        .zip(&um)
        .map(|(v, m)| v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (k - 1.0) / k)
        .collect();
    let dof = n - 2;
    // χ² over the marginal variances (the correlations across widths are weak and a
    // K-draw covariance matrix can be near singular).
    let chi2: f64 = (0..n)
        .map(|i| {
            let r = y[i] - intercept - slope * x[i];
            if var[i] > 0.0 {
                r * r / var[i]
            } else if r.abs() < 1e-12 {
                0.0
            } else {
                f64::INFINITY
            }
        })
        .sum();
    let scale = if dof == 0 {
        1.0
    } else if chi2.is_finite() {
        (chi2 / dof as f64).sqrt().max(1.0)
    } else {
        f64::INFINITY
    };
    Some(Fit {
        slope,
        se: if scale.is_finite() {
            se_mc * scale
        } else {
            f64::INFINITY
        },
        se_mc,
        intercept,
        chi2,
        dof,
    })
}

/// Runs the comparison: `lim` is the program's limit on `points`, `name` the program's
/// file name (for the caption). `progress` is called once after each draw.
pub fn compare(
    prog: &Program,
    points: &[Vec<f64>],
    lim: &LimitResult,
    cfg: &CompareConfig,
    name: &str,
    progress: &(dyn Fn() + Sync),
) -> Result<CompareResult, RunError> {
    let mut widths = cfg.widths.clone();
    widths.sort_unstable();
    widths.dedup();
    if widths.len() < 2 || widths[0] == 0 {
        return Err(RunError::new(
            None,
            "at least two distinct positive widths are needed for a slope",
        ));
    }
    if cfg.seeds < 2 {
        return Err(RunError::new(
            None,
            "at least two draws per width (--seeds 2) are needed",
        ));
    }
    let mut notes = Vec::new();
    let tg = targets(prog, lim, &mut notes);
    // Random 1/√n logits: each draw against the limit given its own logits.
    let cond = crate::limit::random_logits::Conditioner::new(prog);
    if cond.is_some() {
        notes.push(
            "random 1/√n logits: the limit is a Gaussian mixture over the logits G; each draw is compared \
             with the limit given its own (measured) logits, K(·|G_N), shown as draw − K(·|G_N) + E_G K \
             (its mean still estimates E_G K)"
                .to_string(),
        );
    }
    let run_prog = cond.as_ref().map_or(prog, |c| &c.run);
    let p = points.len().max(1);
    let mut rows: Vec<Vec<Row>> = vec![Vec::new(); tg.len()];
    // sq[g][i][k]: draw k's mean square deviation in group g at the i-th width.
    let mut sq: Vec<Vec<Vec<f64>>> = vec![Vec::new(); tg.len()];
    // Every draw's values of every group at one width, and each draw's mean square
    // deviation at every width.
    let entries: usize = tg.iter().map(|t| t.values.len()).sum();
    Footprint::check_kept((entries + widths.len() * tg.len()) as u128, cfg.seeds)?;
    let memory = Footprint::new(prog, points, widths[widths.len() - 1], cfg.engine);
    for &n in &widths {
        memory.check_listed(n)?;
        // vals[g][k] = draw k's entries of group g.
        let mut vals: Vec<Vec<Vec<f64>>> = vec![Vec::with_capacity(cfg.seeds); tg.len()];
        let per_draw = memory.draws(n, cfg.seeds, |k| {
            let d = run_one_engine(run_prog, points, n, cfg.seed, k, cfg.engine)
                .and_then(|d| match &cond {
                    Some(c) => c
                        .shift(prog, points, &d, lim)
                        .map_err(|e| RunError::new(None, e.message)),
                    None => Ok(d),
                })
                .map(|d| {
                    tg.iter()
                        .map(|t| draw_values(t.key, &d, lim))
                        .collect::<Vec<_>>()
                });
            progress();
            d
        })?;
        for g in per_draw {
            for (slot, v) in vals.iter_mut().zip(g) {
                slot.push(v);
            }
        }
        for (i, t) in tg.iter().enumerate() {
            let (r, s) = row(n, &vals[i], &t.values);
            let nums = [
                r.mean_err_max,
                r.mean_err_rms,
                r.se_max,
                r.se_rms,
                r.draw_rms,
                r.draw_rms_se,
            ];
            if let Some(bad) = out_of_range(nums) {
                let first = prog.outputs.first().copied();
                return Err(RunError {
                    code: Some("E0036"),
                    span: first.map(|o| prog.node(o).span),
                    help: Some(
                        "no number is printed for it; a smaller width or other laws keep values finite"
                            .into(),
                    ),
                    ..RunError::new(
                        first,
                        format!(
                            "the {} error at width {n} cannot be reported: {}",
                            t.label,
                            describe_value(bad)
                        ),
                    )
                });
            }
            rows[i].push(r);
            sq[i].push(s);
        }
    }
    let groups = tg
        .iter()
        .zip(rows)
        .zip(&sq)
        .map(|((t, rows), s)| Group {
            key: t.key,
            label: t.label,
            entries: t.values.len(),
            fit: fit(&widths, s),
            rows,
        })
        .collect();
    Ok(CompareResult {
        program: name.to_string(),
        outputs: lim.outputs.clone(),
        points: p,
        widths,
        seeds: cfg.seeds,
        seed: cfg.seed,
        engine: cfg.engine,
        groups,
        notes,
        limit_methods: lim.methods.clone(),
        limit_max_error: lim.max_error,
    })
}

/// `x` in scientific notation with a signed two-digit exponent: `3.4987e-02`.
pub(crate) fn sci(x: f64, digits: usize) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let t = format!("{x:.digits$e}");
    match t.split_once('e') {
        Some((m, e)) => {
            let e: i32 = e.parse().unwrap_or(0);
            format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
        }
        None => t,
    }
}

/// A typographic minus for a printed number.
pub(crate) fn minus(s: &str) -> String {
    s.replace('-', "−")
}

fn fit_text(f: &Option<Fit>) -> String {
    match f {
        Some(f) => format!(
            "{} ± {:.3}  (expected −1/2; least squares over paired draws: Monte-Carlo SE {:.3}, χ² = {:.2} on {} dof)",
            minus(&format!("{:.3}", f.slope)),
            f.se,
            f.se_mc,
            f.chi2,
            f.dof
        ),
        None => "none (the error is zero or not finite at some width)".into(),
    }
}

/// The engine as `--engine` spells it.
fn engine_name(e: Engine) -> &'static str {
    match e {
        Engine::Dense => "dense",
        Engine::Conditional => "conditional",
    }
}

/// The `tpc run` flag that reproduces a draw: none for the default engine.
fn engine_flag(e: Engine) -> String {
    match e {
        Engine::Dense => String::new(),
        e => format!(" --engine {}", engine_name(e)),
    }
}

/// The text report: one table per quantity group, then its slope.
pub fn text(r: &CompareResult) -> String {
    let mut s = format!(
        "# tpc compare {}: finite width against the infinite-width limit\n\
         # {} point(s); {} draws per width from seed {} (draw k is `tpc run --seed {}{}`'s draw k)\n\
         # limit: {}; largest stated error {:.1e}\n\
         # |mean − limit|: the finite mean over the draws, max and RMS over entries; SE: RMS over\n\
         #   entries of the mean's standard error (error ≫ SE is the O(1/N) bias, error ~ SE is noise)\n\
         # rms|draw − limit|: RMS over draws and entries of one draw's deviation, ± its standard\n\
         #   error; the slope is fitted to it on log–log axes (CLT: N^(-1/2))\n",
        r.program,
        r.points,
        r.seeds,
        r.seed,
        r.seed,
        engine_flag(r.engine),
        r.limit_methods.join("; "),
        r.limit_max_error
    );
    for n in &r.notes {
        s.push_str(&format!("# {n}\n"));
    }
    for g in &r.groups {
        s.push_str(&format!("\n## {} ({} entries)\n", g.label, g.entries));
        s.push_str(&format!(
            "  {:>8}  {:>13}  {:>13}  {:>9}  {:>22}\n",
            "width", "max|mean−lim|", "rms|mean−lim|", "SE(mean)", "rms|draw−lim| ± SE"
        ));
        for row in &g.rows {
            s.push_str(&format!(
                "  {:>8}  {:>13}  {:>13}  {:>9}  {:>11} ± {:<8}\n",
                row.width,
                sci(row.mean_err_max, 4),
                sci(row.mean_err_rms, 4),
                sci(row.se_rms, 2),
                sci(row.draw_rms, 4),
                sci(row.draw_rms_se, 2)
            ));
        }
        s.push_str(&format!("  slope: {}\n", fit_text(&g.fit)));
    }
    if r.groups.is_empty() {
        s.push_str(
            "\n# nothing to compare: the program has no output with a limit and no observe\n",
        );
    }
    s
}

/// The same content as JSON.
pub fn json(r: &CompareResult, svg: Option<&str>) -> Value {
    let groups: Vec<Value> = r
        .groups
        .iter()
        .map(|g| {
            let rows: Vec<Value> = g
                .rows
                .iter()
                .map(|w| {
                    json!({
                        "width": w.width,
                        "mean_err_max": num(w.mean_err_max),
                        "mean_err_rms": num(w.mean_err_rms),
                        "se_max": num(w.se_max),
                        "se_rms": num(w.se_rms),
                        "draw_rms": num(w.draw_rms),
                        "draw_rms_se": num(w.draw_rms_se),
                    })
                })
                .collect();
            let fit = g.fit.map_or(Value::Null, |f| {
                json!({
                    "slope": num(f.slope),
                    "se": num(f.se),
                    "se_mc": num(f.se_mc),
                    "intercept": num(f.intercept),
                    "chi2": num(f.chi2),
                    "dof": f.dof,
                })
            });
            json!({"quantity": g.key, "entries": g.entries, "rows": rows, "fit": fit})
        })
        .collect();
    json!({
        "program": r.program,
        "outputs": r.outputs,
        "points": r.points,
        "widths": r.widths,
        "seeds": r.seeds,
        "seed": r.seed,
        "engine": engine_name(r.engine),
        "groups": groups,
        "notes": r.notes,
        "limit_methods": r.limit_methods,
        "limit_max_error": num(r.limit_max_error),
        "svg": svg,
    })
}

/// The plot's caption (a test looks for it in the SVG).
pub fn caption(r: &CompareResult) -> String {
    format!("{}: finite width vs infinite-width limit", r.program)
}

/// A tick label on a log axis: powers of ten as plain decimals (0.01, 1, 100), other
/// values with three significant digits.
pub(crate) fn axis_number(y: f64) -> String {
    if !(y > 0.0 && y.is_finite()) {
        return format!("{y}");
    }
    let e = y.log10().round();
    if (y / 10f64.powf(e) - 1.0).abs() < 1e-9 && (-6.0..=6.0).contains(&e) {
        format!("{:.*}", (-e).max(0.0) as usize, y)
    } else {
        let e = y.log10().floor() as i32;
        format!("{:.*}", (2 - e).max(0) as usize, y)
    }
}

const COLORS: [RGBColor; 3] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
];

/// The SVG: rms|draw − limit| against width on log–log axes, one line per group with
/// its points and ±SE bars, and a dashed reference line of slope −1/2.
pub fn svg(r: &CompareResult) -> Result<String, String> {
    let err = |e: &dyn std::fmt::Display| format!("cannot draw the plot: {e}");
    let plotted: Vec<&Group> = r
        .groups
        .iter()
        .filter(|g| {
            g.rows
                .iter()
                .all(|w| w.draw_rms > 0.0 && w.draw_rms.is_finite())
        })
        .collect();
    let wmin = *r.widths.first().ok_or("no widths")? as f64;
    let wmax = *r.widths.last().ok_or("no widths")? as f64;
    // The reference line of slope −1/2 through the geometric centre of the first
    // plotted group's points.
    let reference: Option<Vec<(f64, f64)>> = plotted.first().map(|g| {
        let k = g.rows.len() as f64;
        let lx = g.rows.iter().map(|w| (w.width as f64).ln()).sum::<f64>() / k;
        let ly = g.rows.iter().map(|w| w.draw_rms.ln()).sum::<f64>() / k;
        let at = |x: f64| (ly - 0.5 * (x.ln() - lx)).exp();
        vec![(wmin, at(wmin)), (wmax, at(wmax))]
    });
    let mut ys: Vec<f64> = Vec::new();
    for g in &plotted {
        for w in &g.rows {
            ys.push(w.draw_rms + w.draw_rms_se);
            ys.push((w.draw_rms - w.draw_rms_se).max(w.draw_rms / 2.0));
        }
    }
    if let Some(rf) = &reference {
        ys.extend(rf.iter().map(|p| p.1));
    }
    let (ylo, yhi) = if ys.is_empty() {
        (1e-3, 1.0)
    } else {
        let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ys.iter().copied().fold(0.0, f64::max);
        (lo / 2.0, hi * 3.0)
    };
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (760, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (top, foot) = root.split_vertically(510);
        let mut chart = ChartBuilder::on(&top)
            .caption(caption(r), ("sans-serif", 22))
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(78)
            .build_cartesian_2d(
                (wmin / 1.5..wmax * 1.5)
                    .log_scale()
                    .with_key_points(r.widths.iter().map(|&w| w as f64).collect()),
                (ylo..yhi).log_scale(),
            )
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("width n")
            .y_desc("rms |one draw − limit|")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| axis_number(*y))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .light_line_style(WHITE)
            .draw()
            .map_err(|e| err(&e))?;
        for (i, g) in plotted.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            let pts: Vec<(f64, f64)> = g
                .rows
                .iter()
                .map(|w| (w.width as f64, w.draw_rms))
                .collect();
            let label = match &g.fit {
                Some(f) => format!(
                    "{}: slope {} ± {:.3}",
                    g.label,
                    minus(&format!("{:.3}", f.slope)),
                    f.se
                ),
                None => g.label.to_string(),
            };
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
                .map_err(|e| err(&e))?;
            chart
                .draw_series(g.rows.iter().map(|w| {
                    let x = w.width as f64;
                    let lo = (w.draw_rms - w.draw_rms_se).max(w.draw_rms / 2.0);
                    PathElement::new(
                        vec![(x, lo), (x, w.draw_rms + w.draw_rms_se)],
                        c.stroke_width(1),
                    )
                }))
                .map_err(|e| err(&e))?;
        }
        if let Some(rf) = reference {
            chart
                .draw_series(DashedLineSeries::new(rf, 8, 6, BLACK.stroke_width(1)))
                .map_err(|e| err(&e))?
                .label("reference slope −1/2")
                .legend(|(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (6, 0)], BLACK.stroke_width(1))
                        + PathElement::new(vec![(9, 0), (14, 0)], BLACK.stroke_width(1))
                        + PathElement::new(vec![(17, 0), (22, 0)], BLACK.stroke_width(1))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(|e| err(&e))?;
        foot.draw_text(
            &format!(
                "{} draws per width (seed {}), {} point(s); bars: ±1 Monte-Carlo SE; slopes by least squares on log–log axes",
                r.seeds, r.seed, r.points
            ),
            &("sans-serif", 12).into_font().color(&BLACK.mix(0.7)),
            (16, 6),
        )
        .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator for synthetic draws (xorshift + Box–Muller).
    struct Rng(u64);
    impl Rng {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let (a, b) = (self.uniform(), self.uniform());
            (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
        }
    }

    #[test]
    fn common_noise_cancels_in_the_slope() {
        // s_ik = N_i^(-1) (1 + ε_k)²: every draw is off by the same factor at every
        // width, so the slope is exactly −1/2 with no Monte-Carlo error.
        let widths = [100, 400, 1600, 6400];
        let eps = [0.3, -0.2, 0.5, 0.1, -0.4];
        let s: Vec<Vec<f64>> = widths
            .iter()
            .map(|&w| {
                eps.iter()
                    .map(|e| (1.0 + e) * (1.0 + e) / w as f64)
                    .collect()
            })
            .collect();
        let f = fit(&widths, &s).unwrap();
        assert!((f.slope + 0.5).abs() < 1e-12, "{f:?}");
        assert!(f.se_mc < 1e-12, "{f:?}");
        assert!(fit(&widths, &vec![vec![0.0; 5]; 4]).is_none());
        assert!(fit(&[100], &s[..1]).is_none());
    }

    #[test]
    fn standard_error_matches_the_spread_of_slopes() {
        // Synthetic paired draws: the deviation at width N is a shared part (the
        // nested sub-network) plus a fresh part, s = (a·sqrt(ρ) + b·sqrt(1−ρ))² / N
        // with correlation ρ = 0.5 between neighbours. Over many replicates the
        // spread of fitted slopes must match the stated standard error.
        let widths = [128, 512, 2048];
        let mut rng = Rng(0x9e3779b97f4a7c15);
        let (reps, k) = (400, 32);
        let mut slopes = Vec::new();
        let mut ses = Vec::new();
        for _ in 0..reps {
            let mut s = vec![Vec::new(); widths.len()];
            for _ in 0..k {
                let mut z = rng.normal();
                for (i, &w) in widths.iter().enumerate() {
                    if i > 0 {
                        z = z * 0.5f64.sqrt() + rng.normal() * 0.5f64.sqrt();
                    }
                    // Four entries per draw, one of them shared.
                    let e: f64 = (0..3).map(|_| rng.normal().powi(2)).sum::<f64>() + z * z;
                    s[i].push(e / 4.0 / w as f64);
                }
            }
            let f = fit(&widths, &s).unwrap();
            slopes.push(f.slope);
            ses.push(f.se_mc);
        }
        let m = slopes.iter().sum::<f64>() / reps as f64;
        let sd = (slopes.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (reps - 1) as f64).sqrt();
        let se = ses.iter().sum::<f64>() / reps as f64;
        assert!(
            (m + 0.5).abs() < 3.0 * sd / (reps as f64).sqrt() + 0.01,
            "mean {m}"
        );
        assert!((se / sd - 1.0).abs() < 0.15, "stated {se}, spread {sd}");
    }

    #[test]
    fn a_bad_fit_widens_the_error() {
        // A curved log–log line with little noise: χ²/dof ≫ 1 scales the SE up.
        let widths = [100, 400, 1600, 6400];
        let mut rng = Rng(12345);
        let s: Vec<Vec<f64>> = widths
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let bend = if i == 1 { 1.5 } else { 1.0 };
                (0..8)
                    .map(|_| bend / w as f64 * (1.0 + 0.01 * rng.normal()))
                    .collect()
            })
            .collect();
        let f = fit(&widths, &s).unwrap();
        assert!(f.chi2 > 2.0 * f.dof as f64, "{f:?}");
        assert!(f.se > f.se_mc, "{f:?}");
    }

    #[test]
    fn row_statistics() {
        // Two draws of two entries around a limit of zero.
        let vals = vec![vec![1.0, -1.0], vec![3.0, 1.0]];
        let (r, s) = row(10, &vals, &[0.0, 0.0]);
        assert_eq!(r.mean_err_max, 2.0);
        assert!((r.mean_err_rms - 2f64.sqrt()).abs() < 1e-15);
        // s_k = 1 and 5: e² = 3.
        assert_eq!(s, vec![1.0, 5.0]);
        assert!((r.draw_rms - 3f64.sqrt()).abs() < 1e-15);
        // sd(s) = sqrt(8), se(e²) = 2, se(e) = 2 / (2 sqrt 3).
        assert!((r.draw_rms_se - 1.0 / 3f64.sqrt()).abs() < 1e-15);
        // Each entry's SE: sd sqrt(2) over sqrt(2) = 1.
        assert!((r.se_rms - 1.0).abs() < 1e-15);
    }

    #[test]
    fn scientific_notation() {
        assert_eq!(sci(0.034987, 4), "3.4987e-02");
        assert_eq!(sci(1.6572, 2), "1.66e+00");
        assert_eq!(sci(0.0, 2), "0.00e+00");
        assert_eq!(minus("-0.507"), "−0.507");
    }
}
