//! `tpc coord-check`: the coordinate check of mup (theory.md §7) made quantitative.
//!
//! The program's `train` block is run at finite width ([`crate::finite::train::coord_sizes`])
//! for K draws at each width (draw k of seed S is `tpc run --seed S`'s draw k, paired
//! across widths: the width-256 network of a draw is the top-left corner of its
//! width-4096 network). At every step t = 0..steps (t = 0 is initialization) it records,
//! for every vector of the program, the root mean square over coordinates and training
//! inputs of
//!
//! * the vector itself, `x_t` (its *size*), and
//! * its change since initialization, `x_t − x_0`,
//!
//! and the same for the outputs, `|f_t|` and `|f_t − f_0|` (RMS over outputs and inputs).
//! For each of these curves the log–log slope against the width is fitted by least
//! squares with the paired-draw standard error of `tpc compare`
//! ([`super::compare::fit`], fitted to the root mean square over draws), and set
//! against the exponent predicted by the exponent analysis ([`crate::scaling`]):
//!
//! * t = 0: the sizes at initialization (`Exponents::init`);
//! * t = 1: the first step's first-order change (`Exponents::step`): the change is
//!   `delta`, the size `max(init, delta)`. Beyond Θ(1) a first-order change is a lower
//!   bound on a blow-up (the scaling module's caveat);
//! * t = 2: the change is `max(delta_1, delta_2)` with `delta_2` the analysis' *later*
//!   step (`Exponents::later`: from the sizes after the first step, the gradient also
//!   flowing through the updated readouts). Approximate: the low-rank first updates of
//!   the matrices enter only through the vectors' sizes;
//! * t ≥ 3: the same as t = 2 when the later step is a fixed point of the analysis (no
//!   size, loss derivative or readout grows further); otherwise nothing is predicted,
//!   since blow-ups compound (theory.md §5.2, "First step vs later steps").
//!
//! A measured slope further than [`TOLERANCE`] from its prediction is flagged.

use plotters::prelude::*;
use serde_json::{json, Value};

use super::compare::{axis_number, fit, minus, sci, Fit};
use super::limit::num;
use crate::finite::exec::{describe_value, out_of_range, RunConfig, RunError};
use crate::finite::train::{coord_sizes, CoordSizes};
use crate::ir::{NodeId, Program, Role};
use crate::scaling::{self, Ex, Exponents};

/// The default widths of `tpc coord-check` (documented in `--help`).
pub const DEFAULT_WIDTHS: [u64; 5] = [256, 512, 1024, 2048, 4096];
/// The default number of draws per width.
pub const DEFAULT_SEEDS: u64 = 8;
/// A measured exponent further than this from the predicted one is flagged.
pub const TOLERANCE: f64 = 0.15;

/// What to check.
#[derive(Clone, Debug)]
pub struct CoordConfig {
    /// Widths, at least two distinct ones (sorted and deduplicated by [`coord_check`]).
    pub widths: Vec<usize>,
    /// Draws per width K (at least 2).
    pub seeds: usize,
    /// The seed S, the same at every width.
    pub seed: u64,
    /// Training steps, overriding the program's `steps`.
    pub steps: Option<usize>,
}

/// What a curve measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// RMS of x_t.
    Size,
    /// RMS of x_t − x_0.
    Change,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Size => "size",
            Kind::Change => "change",
        }
    }
}

/// Where a prediction comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Basis {
    /// Sizes at initialization (exact).
    Init,
    /// The first step's first-order change.
    FirstStep,
    /// The analysis' later step (approximate).
    LaterStep,
    /// Not predicted.
    None,
}

impl Basis {
    pub fn name(self) -> &'static str {
        match self {
            Basis::Init => "init",
            Basis::FirstStep => "first step",
            Basis::LaterStep => "later step",
            Basis::None => "none",
        }
    }
}

/// The verdict on one curve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Within the tolerance, with a standard error below it (or exactly zero as predicted).
    Ok,
    /// Further than the tolerance from the prediction (or zero against nonzero).
    Disagree,
    /// Within the tolerance, but the standard error exceeds it: more draws or widths.
    Uncertain,
    /// The analysis makes no prediction here.
    NotPredicted,
    /// A size `x_t = x_0 + Δx_t` whose predicted exponent is the change's, above the
    /// initial one, measured between the two: at these widths neither part dominates.
    /// Not a disagreement when the change itself agrees and the slope is what the sum of
    /// the two predicted power laws shows at these widths ([`Curve::effective`]).
    Crossover,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Disagree => "DISAGREE",
            Status::Uncertain => "uncertain",
            Status::NotPredicted => "not predicted",
            Status::Crossover => "crossover",
        }
    }
}

/// One quantity (a vector or f), one step, one kind.
#[derive(Clone, Debug)]
pub struct Curve {
    /// Index into [`CoordResult::quantities`].
    pub quantity: usize,
    pub step: usize,
    pub kind: Kind,
    /// Per width: the root mean square over draws of the per-draw RMS.
    pub rms: Vec<f64>,
    /// Its Monte-Carlo standard error (delta method).
    pub rms_se: Vec<f64>,
    /// The fitted exponent; None when the RMS is zero or not finite at some width.
    pub fit: Option<Fit>,
    /// The predicted exponent.
    pub predicted: Option<Ex>,
    /// For a size whose predicted exponent is its change's, above the initial one: the
    /// slope a sum of the two predicted power laws shows at these widths, with their
    /// amplitudes fitted to the measured initial size and change.
    pub effective: Option<f64>,
    pub basis: Basis,
    pub status: Status,
}

impl Curve {
    /// The measured slope minus the predicted exponent, when both are numbers.
    pub fn diff(&self) -> Option<f64> {
        let p = self.predicted?.exponent()?.to_f64();
        Some(self.fit?.slope - p)
    }
}

/// Everything `tpc coord-check` reports.
#[derive(Clone, Debug)]
pub struct CoordResult {
    /// The program's file name, as the caption names it.
    pub program: String,
    pub widths: Vec<usize>,
    pub seeds: usize,
    pub seed: u64,
    pub steps: usize,
    pub loss: &'static str,
    pub lr: f64,
    /// How the training steps ([`crate::ir::Train::describe`]): `full-batch gradient
    /// descent`, or the optimizer with its hyperparameters.
    pub training: String,
    /// The training inputs.
    pub points: usize,
    /// The quantities: every vector of the program (in node order), then the outputs.
    pub quantities: Vec<String>,
    /// Step-major, then quantity, size before change (no change at t = 0).
    pub curves: Vec<Curve>,
    /// How each step's predictions were made.
    pub notes: Vec<String>,
}

impl CoordResult {
    /// How many curves have each status: ok, disagree, uncertain, not predicted,
    /// crossover.
    pub fn counts(&self) -> [usize; 5] {
        let c = |s| self.curves.iter().filter(|c| c.status == s).count();
        [
            c(Status::Ok),
            c(Status::Disagree),
            c(Status::Uncertain),
            c(Status::NotPredicted),
            c(Status::Crossover),
        ]
    }
}

fn usage(message: &str) -> RunError {
    RunError::new(None, message)
}

/// A coordinate size that cannot be printed as a number (E0036): the run is refused
/// rather than fitted.
fn unreportable(prog: &Program, what: &str, node: Option<NodeId>, t: usize, bad: f64) -> RunError {
    RunError {
        code: Some("E0036"),
        span: node.map(|n| prog.node(n).span),
        help: Some(
            "the training blows up at these widths: fewer steps, a smaller learning rate or muP keep sizes finite"
                .into(),
        ),
        ..RunError::new(
            node,
            format!(
                "the coordinate size of {what} after {t} step(s) cannot be reported: {}",
                describe_value(bad)
            ),
        )
    }
}

/// Whether the analysis' later step leaves every exponent where it found it: then
/// further steps change nothing and the predictions of t = 2 hold at every t ≥ 2.
fn later_is_fixed(prog: &Program, ex: &Exponents) -> bool {
    let (Some(s1), Some(l)) = (&ex.step, &ex.later) else {
        return false;
    };
    let sizes = ex
        .init
        .iter()
        .zip(&s1.delta)
        .zip(&l.delta)
        .all(|((a, b), c)| *c <= (*a).max(*b));
    let readouts = prog.params.iter().enumerate().all(|(p, par)| {
        par.role() != Role::Output || l.update[p] <= scaling::entry(&par.law).max(s1.update[p])
    });
    sizes && readouts && l.chi1 == l.chi0
}

/// Whether the first step's first-order change of some node grows with the width. The
/// analysis' later step is first order too; after a blow-up, nonlinear effects (units
/// pushed far into saturation or out of a relu's support, a loss derivative of order n)
/// decide the next steps, so they are not predicted (theory.md §5.2).
fn first_blows_up(ex: &Exponents) -> bool {
    ex.step
        .as_ref()
        .is_some_and(|s| s.delta.iter().any(|d| d.blows_up()))
}

/// The predicted (initial size, change) of the quantity made of `ids` (the largest over
/// them) after t steps; the size is the larger of the two.
fn predict(ex: &Exponents, fixed: bool, ids: &[NodeId], t: usize) -> (Ex, Option<Ex>, Basis) {
    let max = |v: &[Ex]| ids.iter().map(|i| v[i.index()]).max().unwrap_or(Ex::Zero);
    let init = max(&ex.init);
    if t == 0 {
        return (init, Some(Ex::Zero), Basis::Init);
    }
    let Some(s1) = &ex.step else {
        return (init, None, Basis::None);
    };
    let d1 = max(&s1.delta);
    if t == 1 {
        return (init, Some(d1), Basis::FirstStep);
    }
    match &ex.later {
        Some(l) if !first_blows_up(ex) && (t == 2 || fixed) => {
            (init, Some(d1.max(max(&l.delta))), Basis::LaterStep)
        }
        _ => (init, None, Basis::None),
    }
}

/// The log–log slope at `widths` of `A n^(2 e0) + B n^(2 e1)` (a mean square): what a
/// size `x_0 + Δx` shows at these widths when x_0 has exponent e0 and Δx exponent e1
/// (and they are uncorrelated). Nothing is fitted to the size itself: A is fitted to
/// the mean squares `init` of x_0, B to those of Δx, `change`, each with its exponent
/// fixed at the predicted one.
fn effective_slope(
    widths: &[usize],
    init: &[f64],
    change: &[f64],
    e0: f64,
    e1: f64,
) -> Option<f64> {
    let positive = |v: &[f64]| v.iter().all(|x| *x > 0.0 && x.is_finite());
    if widths.len() < 2 || !positive(init) || !positive(change) {
        return None;
    }
    let n0 = widths[0] as f64;
    let x: Vec<f64> = widths.iter().map(|&w| (w as f64 / n0).ln()).collect();
    let k = x.len() as f64;
    // ln A = mean of ln e2 − 2 e x: the amplitude of a power law with a fixed exponent.
    let amp = |e2: &[f64], e: f64| {
        x.iter()
            .zip(e2)
            .map(|(x, v)| v.ln() - 2.0 * e * x)
            .sum::<f64>()
            / k
    };
    let (la, lb) = (amp(init, e0), amp(change, e1));
    let y: Vec<f64> = x
        .iter()
        .map(|x| 0.5 * ((la + 2.0 * e0 * x).exp() + (lb + 2.0 * e1 * x).exp()).ln())
        .collect();
    let (xm, ym) = (x.iter().sum::<f64>() / k, y.iter().sum::<f64>() / k);
    let sxx: f64 = x.iter().map(|v| (v - xm) * (v - xm)).sum();
    let sxy: f64 = x.iter().zip(&y).map(|(p, q)| (p - xm) * (q - ym)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Root mean square over draws of `v[k]` and its delta-method standard error; and the
/// squares, for the fit.
fn over_draws(v: &[f64]) -> (f64, f64, Vec<f64>) {
    let s: Vec<f64> = v.iter().map(|x| x * x).collect();
    let k = s.len() as f64;
    let m = s.iter().sum::<f64>() / k;
    let var = s.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (k - 1.0).max(1.0);
    let e = m.sqrt();
    let se = if e > 0.0 {
        (var / k).sqrt() / (2.0 * e)
    } else {
        0.0
    };
    (e, se, s)
}

fn status(predicted: Option<Ex>, rms: &[f64], f: &Option<Fit>) -> Status {
    match predicted {
        None | Some(Ex::Inf) => Status::NotPredicted,
        Some(Ex::Zero) => {
            if rms.iter().all(|v| *v == 0.0) {
                Status::Ok
            } else {
                Status::Disagree
            }
        }
        Some(Ex::Pow(p)) => match f {
            None => Status::Disagree,
            Some(f) if (f.slope - p.to_f64()).abs() > TOLERANCE => Status::Disagree,
            Some(f) if f.se.is_nan() || f.se > TOLERANCE => Status::Uncertain,
            Some(_) => Status::Ok,
        },
    }
}

/// Runs the coordinate check of `prog` (which must have a `train` block); `name` is the
/// program's file name (for the caption). `progress` is called once after each draw.
pub fn coord_check(
    prog: &Program,
    cfg: &CoordConfig,
    name: &str,
    progress: &(dyn Fn() + Sync),
) -> Result<CoordResult, RunError> {
    let mut widths = cfg.widths.clone();
    widths.sort_unstable();
    widths.dedup();
    if widths.len() < 2 || widths[0] == 0 {
        return Err(usage(
            "at least two distinct positive widths are needed for a slope",
        ));
    }
    if cfg.seeds < 2 {
        return Err(usage("at least two draws per width (--seeds 2) are needed"));
    }
    let mut prog = prog.clone();
    let Some(train) = prog.train.as_mut() else {
        return Err(usage(
            "this program has no `train` block: a coordinate check trains it (docs/language.md, Training)",
        ));
    };
    if let Some(s) = cfg.steps {
        train.steps = s;
    }
    let training = train.describe();
    let (steps, loss, lr, points) = (
        train.steps,
        match train.loss {
            crate::ir::Loss::Mse => "mse",
            crate::ir::Loss::Xent => "xent",
        },
        train.lr,
        train.data.len(),
    );
    let prog = &prog;

    // sizes[i][k]: draw k at the i-th width: per step, a size and a change per vector
    // node, f_t and its two summaries.
    let vectors = prog
        .ids()
        .filter(|&id| matches!(prog.ty(id), crate::ir::Ty::Vector | crate::ir::Ty::Moment))
        .count();
    let per_draw = (steps + 1) * (2 * vectors + prog.outputs.len() * points + 2);
    crate::finite::exec::Footprint::check_kept((per_draw * widths.len()) as u128, cfg.seeds)?;
    let mut sizes: Vec<Vec<CoordSizes>> = Vec::with_capacity(widths.len());
    for &n in &widths {
        let memory = crate::finite::exec::Footprint::dense(prog, points);
        memory.check_listed(n)?;
        let at_n = memory.draws(n, cfg.seeds, |k| {
            let rc = RunConfig {
                width: n,
                seeds: 1,
                seed: cfg.seed,
            };
            let c = coord_sizes(prog, &rc, k);
            progress();
            c
        })?;
        sizes.push(at_n);
    }

    let first = &sizes[0][0];
    // Every vector, and the cross moments (attention logits `mean(q * k)`, whose sizes
    // the analysis predicts; other moments it bounds at coordinate level only):
    // `rows[q]` is quantity q's index in the measured nodes.
    let rows: Vec<usize> = (0..first.nodes.len())
        .filter(|&j| {
            let id = first.nodes[j];
            prog.ty(id) == crate::ir::Ty::Vector || scaling::is_cross_moment(prog, id)
        })
        .collect();
    let stable = prog.stable_names();
    let mut quantities: Vec<String> = rows
        .iter()
        .map(|&j| {
            let id = first.nodes[j];
            let name = scaling::node_name(prog, id);
            if prog.ty(id) == crate::ir::Ty::Moment || name.starts_with('%') {
                stable[id.index()].clone()
            } else {
                name
            }
        })
        .collect();
    let outs: Vec<String> = prog
        .outputs
        .iter()
        .map(|&o| scaling::node_name(prog, o))
        .collect();
    quantities.push(outs.join(", "));
    let nv = rows.len();
    let members: Vec<Vec<NodeId>> = rows
        .iter()
        .map(|&j| vec![first.nodes[j]])
        .chain(std::iter::once(prog.outputs.clone()))
        .collect();

    let ex = scaling::exponents(prog);
    let fixed = later_is_fixed(prog, &ex);
    let logit = |ids: &[NodeId]| ids.len() == 1 && scaling::is_cross_moment(prog, ids[0]);
    let has_logits = members.iter().any(|ids| logit(ids));
    let mut curves = Vec::new();
    for t in 0..=steps {
        for (q, ids) in members.iter().enumerate() {
            let (p0, pc, basis) = if t >= 2 && logit(ids) {
                // a logit's later change adds a Θ(1) part (the readout has moved along
                // the features) to the first step's smaller one; not predicted
                (ex.init[ids[0].index()], None, Basis::None)
            } else {
                predict(&ex, fixed, ids, t)
            };
            let ps = pc.map(|c| p0.max(c));
            let kinds: &[(Kind, Option<Ex>)] = if t == 0 {
                &[(Kind::Size, ps)]
            } else {
                &[(Kind::Size, ps), (Kind::Change, pc)]
            };
            for &(kind, predicted) in kinds {
                let value = |c: &CoordSizes| match (kind, q < nv) {
                    (Kind::Size, true) => c.rms[t][rows[q]],
                    (Kind::Change, true) => c.change[t][rows[q]],
                    (Kind::Size, false) => c.f_abs[t],
                    (Kind::Change, false) => c.f_change[t],
                };
                let mut rms = Vec::new();
                let mut rms_se = Vec::new();
                let mut sq = Vec::new();
                for at_n in &sizes {
                    let v: Vec<f64> = at_n.iter().map(value).collect();
                    let (e, se, s) = over_draws(&v);
                    rms.push(e);
                    rms_se.push(se);
                    sq.push(s);
                }
                if let Some(bad) = out_of_range(rms.iter().chain(&rms_se).copied()) {
                    return Err(unreportable(
                        prog,
                        &quantities[q],
                        members[q].first().copied(),
                        t,
                        bad,
                    ));
                }
                let f = fit(&widths, &sq);
                curves.push(Curve {
                    quantity: q,
                    step: t,
                    kind,
                    status: status(predicted, &rms, &f),
                    rms,
                    rms_se,
                    fit: f,
                    predicted,
                    effective: None,
                    basis: if predicted.is_some() {
                        basis
                    } else {
                        Basis::None
                    },
                });
            }
        }
    }

    // A size whose predicted exponent is its change's, above its initial one: the slope
    // the two parts show together at these widths, from their own amplitudes.
    let mean_squares = |c: &Curve| c.rms.iter().map(|v| v * v).collect::<Vec<f64>>();
    for i in 0..curves.len() {
        let c = &curves[i];
        if c.kind != Kind::Size || c.step == 0 {
            continue;
        }
        let find = |step: usize, kind: Kind| {
            curves
                .iter()
                .find(|d| d.quantity == c.quantity && d.step == step && d.kind == kind)
        };
        let (Some(c0), Some(cc)) = (find(0, Kind::Size), find(c.step, Kind::Change)) else {
            continue;
        };
        if let (Some(Ex::Pow(e0)), Some(Ex::Pow(e1))) = (c0.predicted, cc.predicted) {
            if e1 > e0 {
                curves[i].effective = effective_slope(
                    &widths,
                    &mean_squares(c0),
                    &mean_squares(cc),
                    e0.to_f64(),
                    e1.to_f64(),
                );
            }
        }
    }
    // A size measured away from its prediction whose change agrees and whose slope is
    // the two parts' at these widths is a crossover.
    let change_ok: Vec<(usize, usize)> = curves
        .iter()
        .filter(|c| c.kind == Kind::Change && c.status == Status::Ok)
        .map(|c| (c.quantity, c.step))
        .collect();
    for c in curves.iter_mut() {
        if let (Status::Disagree, Some(eff), Some(f)) = (c.status, c.effective, c.fit) {
            if change_ok.contains(&(c.quantity, c.step))
                && (f.slope - eff).abs() <= TOLERANCE
                && f.se <= TOLERANCE
            {
                c.status = Status::Crossover;
            }
        }
    }
    let mut notes =
        vec!["t = 0: sizes at initialization (the exponent analysis at init)".to_string()];
    if steps >= 1 {
        notes.push(
            "t = 1: the first step's first-order change; size = max(init, change) \
             (beyond Θ(1) a first-order change is a lower bound on a blow-up)"
                .to_string(),
        );
    }
    if steps >= 2 && first_blows_up(&ex) {
        notes.push(
            "t ≥ 2: not predicted: the first step already blows up, and after a blow-up \
             nonlinear effects decide the next steps (blow-ups compound, theory.md §5.2)"
                .to_string(),
        );
    } else if steps >= 2 {
        notes.push(
            "t = 2: change = max(first step, the analysis' later step from the sizes after \
             the first, gradient through the updated readouts); approximate"
                .to_string(),
        );
    }
    if steps >= 2 && has_logits {
        notes.push(
            "logits (moments `mean(q * k)` of independent vectors): sizes and changes at t = 0 \
             and t = 1 only; later, the change the moved readouts bring (Θ(1) in muP) adds to \
             the first step's, and which one shows depends on the widths: not predicted"
                .to_string(),
        );
    }
    if steps >= 3 && !first_blows_up(&ex) {
        notes.push(if fixed {
            "t ≥ 3: the later step is a fixed point of the analysis, so t = 2's exponents \
             carry over (approximate)"
                .to_string()
        } else {
            "t ≥ 3: not predicted: the later step changes the exponents again \
             (blow-ups compound, theory.md §5.2)"
                .to_string()
        });
    }
    Ok(CoordResult {
        program: name.to_string(),
        widths,
        seeds: cfg.seeds,
        seed: cfg.seed,
        steps,
        loss,
        lr,
        training,
        points,
        quantities,
        curves,
        notes,
    })
}

/// A predicted exponent as a table cell.
fn pred_text(e: Option<Ex>) -> String {
    match e {
        None => "—".into(),
        Some(Ex::Zero) => "0 exactly".into(),
        Some(e) => minus(&e.to_string()),
    }
}

fn signed(x: f64) -> String {
    minus(&format!("{x:+.3}"))
}

/// The text report: one row per quantity, step and kind.
pub fn text(r: &CoordResult) -> String {
    let mut s = format!(
        "# tpc coord-check {}: coordinate sizes against width, predicted vs measured exponents\n\
         # {} step(s) of {} (loss {}, lr {}) on {} training input(s);\n\
         #   {} draws per width from seed {} (draw k is `tpc run --seed {}`'s draw k), widths {}\n\
         # size: RMS over coordinates and training inputs of x_t; change: of x_t − x_0; f: over\n\
         #   outputs and inputs. measured: least-squares slope of ln RMS (over draws) on ln width,\n\
         #   ± its standard error over the paired draws; flagged when |measured − predicted| > {}\n",
        r.program,
        r.steps,
        r.training,
        r.loss,
        r.lr,
        r.points,
        r.seeds,
        r.seed,
        r.seed,
        r.widths
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        TOLERANCE
    );
    s.push_str("# predicted:\n");
    for n in &r.notes {
        s.push_str(&format!("#   {n}\n"));
    }
    let qw = r
        .quantities
        .iter()
        .map(|q| q.chars().count())
        .max()
        .unwrap_or(1)
        .max(8);
    let wmin = r.widths.first().copied().unwrap_or(0);
    let wmax = r.widths.last().copied().unwrap_or(0);
    for t in 0..=r.steps {
        s.push_str(&format!(
            "\n## t = {t}{}\n",
            if t == 0 { " (initialization)" } else { "" }
        ));
        s.push_str(&format!(
            "  {:<qw$}  {:<6}  {:>9}  {:>16}  {:>7}  {:>10}  {:>10}  {}\n",
            "quantity",
            "kind",
            "predicted",
            "measured ± SE",
            "diff",
            format!("rms@{wmin}"),
            format!("rms@{wmax}"),
            "status"
        ));
        for c in r.curves.iter().filter(|c| c.step == t) {
            let measured = match &c.fit {
                Some(f) => format!("{} ± {:.3}", signed(f.slope), f.se),
                None => "—".into(),
            };
            s.push_str(&format!(
                "  {:<qw$}  {:<6}  {:>9}  {:>16}  {:>7}  {:>10}  {:>10}  {}\n",
                r.quantities[c.quantity],
                c.kind.name(),
                pred_text(c.predicted),
                measured,
                c.diff().map_or("".into(), signed),
                sci(c.rms[0], 3),
                sci(*c.rms.last().unwrap_or(&f64::NAN), 3),
                match (c.status, c.effective) {
                    (Status::Crossover, Some(e)) => format!("crossover (effective {})", signed(e)),
                    (st, _) => st.name().to_string(),
                }
            ));
        }
    }
    let [ok, bad, unsure, none, cross] = r.counts();
    s.push_str(&format!(
        "\n# {ok} agree, {bad} disagree, {unsure} uncertain (SE > {TOLERANCE}), {none} not predicted, \
         {cross} crossover\n"
    ));
    if cross > 0 {
        s.push_str(
            "# crossover: a size x_t = x_0 + Δx_t whose change grows faster than x_0 but does not yet\n\
             #   dominate it at these widths; its change agrees, and the slope is within the tolerance of\n\
             #   `effective`: the slope of A n^(2 e0) + B n^(2 e1) here, with the predicted exponents and\n\
             #   A, B fitted to the measured x_0 and Δx_t alone; wider widths approach the prediction\n",
        );
    }
    s
}

fn fit_json(f: &Option<Fit>) -> Value {
    f.map_or(Value::Null, |f| {
        json!({
            "slope": num(f.slope),
            "se": num(f.se),
            "se_mc": num(f.se_mc),
            "intercept": num(f.intercept),
            "chi2": num(f.chi2),
            "dof": f.dof,
        })
    })
}

/// The same content as JSON.
pub fn json(r: &CoordResult, svg: Option<&str>) -> Value {
    let curves: Vec<Value> = r
        .curves
        .iter()
        .map(|c| {
            json!({
                "step": c.step,
                "quantity": r.quantities[c.quantity],
                "kind": c.kind.name(),
                "predicted": c.predicted.map(|e| e.to_string()),
                "predicted_exponent": c.predicted.and_then(|e| e.exponent()).map(|p| num(p.to_f64())),
                "basis": c.basis.name(),
                "rms": c.rms.iter().map(|v| num(*v)).collect::<Vec<_>>(),
                "rms_se": c.rms_se.iter().map(|v| num(*v)).collect::<Vec<_>>(),
                "fit": fit_json(&c.fit),
                "diff": c.diff().map(num),
                "effective": c.effective.map(num),
                "status": match c.status {
                    Status::Ok => "ok",
                    Status::Disagree => "disagree",
                    Status::Uncertain => "uncertain",
                    Status::NotPredicted => "not_predicted",
                    Status::Crossover => "crossover",
                },
            })
        })
        .collect();
    let [ok, bad, unsure, none, cross] = r.counts();
    json!({
        "program": r.program,
        "widths": r.widths,
        "seeds": r.seeds,
        "seed": r.seed,
        "steps": r.steps,
        "loss": r.loss,
        "lr": num(r.lr),
        "points": r.points,
        "tolerance": TOLERANCE,
        "quantities": r.quantities,
        "curves": curves,
        "summary": {"ok": ok, "disagree": bad, "uncertain": unsure, "not_predicted": none, "crossover": cross},
        "notes": r.notes,
        "svg": svg,
    })
}

/// The plot's caption (a test looks for it in the SVG).
pub fn caption(r: &CoordResult) -> String {
    format!("{}: coordinate check", r.program)
}

/// matplotlib's tab10.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];

/// The y range of a row of panels: every positive plotted value (with its SE bar).
fn y_range(curves: &[&Curve]) -> (f64, f64) {
    let mut lo = f64::INFINITY;
    let mut hi: f64 = 0.0;
    for c in curves {
        for (v, se) in c.rms.iter().zip(&c.rms_se) {
            if *v > 0.0 && v.is_finite() {
                lo = lo.min((v - se).max(v / 2.0));
                hi = hi.max(v + se);
            }
        }
    }
    if hi > 0.0 && lo.is_finite() {
        (lo / 1.6, hi * 1.6)
    } else {
        (1e-3, 1.0)
    }
}

/// The SVG in the style of mup's coordinate check: one panel per step (t = 0 is
/// initialization), width and RMS on log axes, one line per quantity; the top row is
/// the size of each vector, the bottom row its change since initialization, and the
/// legend sits where the (identically zero) change at t = 0 would be. Each row shares
/// its y range.
pub fn svg(r: &CoordResult) -> Result<String, String> {
    let err = |e: &dyn std::fmt::Display| format!("cannot draw the plot: {e}");
    let wmin = *r.widths.first().ok_or("no widths")? as f64;
    let wmax = *r.widths.last().ok_or("no widths")? as f64;
    let cols = r.steps + 1;
    let (pw, ph) = (300u32, 270u32);
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (pw * cols as u32 + 20, 2 * ph + 80))
            .into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let root = root
            .titled(&caption(r), ("sans-serif", 20))
            .map_err(|e| err(&e))?;
        let (grid, foot) = root.split_vertically(2 * ph + 20);
        let panels = grid.split_evenly((2, cols));
        for (row, kind) in [Kind::Size, Kind::Change].into_iter().enumerate() {
            let of_kind: Vec<&Curve> = r.curves.iter().filter(|c| c.kind == kind).collect();
            let (ylo, yhi) = y_range(&of_kind);
            for t in 0..=r.steps {
                let area = &panels[row * cols + t];
                if kind == Kind::Change && t == 0 {
                    // The legend: one swatch per quantity.
                    let font = ("sans-serif", 13).into_font();
                    area.draw_text("legend", &font.color(&BLACK.mix(0.6)), (40, 24))
                        .map_err(|e| err(&e))?;
                    for (q, name) in r.quantities.iter().enumerate() {
                        let c = PALETTE[q % PALETTE.len()];
                        let per_col = 13;
                        let x = 40 + 130 * (q / per_col) as i32;
                        let y = 48 + 16 * (q % per_col) as i32;
                        area.draw(&PathElement::new(
                            vec![(x, y), (x + 20, y)],
                            c.stroke_width(2),
                        ))
                        .map_err(|e| err(&e))?;
                        let shown: String = name.chars().take(16).collect();
                        area.draw_text(&shown, &font.color(&BLACK), (x + 26, y - 7))
                            .map_err(|e| err(&e))?;
                    }
                    continue;
                }
                let here: Vec<&Curve> = of_kind.iter().copied().filter(|c| c.step == t).collect();
                let flagged = here.iter().filter(|c| c.status == Status::Disagree).count();
                let title = match (kind, t) {
                    (Kind::Size, 0) => "t = 0 (init): RMS x_0".to_string(),
                    (Kind::Size, _) => format!("t = {t}: RMS x_{t}"),
                    (Kind::Change, _) => format!("t = {t}: RMS (x_{t} − x_0)"),
                } + &if flagged > 0 {
                    format!(" [{flagged} flagged]")
                } else {
                    String::new()
                };
                let mut chart = ChartBuilder::on(area)
                    .caption(title, ("sans-serif", 14))
                    .margin(8)
                    .x_label_area_size(34)
                    .y_label_area_size(58)
                    .build_cartesian_2d(
                        (wmin / 1.3..wmax * 1.3)
                            .log_scale()
                            .with_key_points(r.widths.iter().map(|&w| w as f64).collect()),
                        (ylo..yhi).log_scale(),
                    )
                    .map_err(|e| err(&e))?;
                chart
                    .configure_mesh()
                    .x_desc("width")
                    .x_label_formatter(&|x| format!("{x:.0}"))
                    .y_label_formatter(&|y| axis_number(*y))
                    .label_style(("sans-serif", 11))
                    .axis_desc_style(("sans-serif", 12))
                    .light_line_style(WHITE)
                    .draw()
                    .map_err(|e| err(&e))?;
                for c in &here {
                    if !c.rms.iter().all(|v| *v > 0.0 && v.is_finite()) {
                        continue; // exactly zero: no point on a log axis
                    }
                    let col = PALETTE[c.quantity % PALETTE.len()];
                    let pts: Vec<(f64, f64)> = r
                        .widths
                        .iter()
                        .zip(&c.rms)
                        .map(|(&w, &v)| (w as f64, v))
                        .collect();
                    chart
                        .draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))
                        .map_err(|e| err(&e))?;
                    chart
                        .draw_series(pts.iter().map(|&p| Circle::new(p, 3, col.filled())))
                        .map_err(|e| err(&e))?;
                    chart
                        .draw_series(r.widths.iter().zip(c.rms.iter().zip(&c.rms_se)).map(
                            |(&w, (&v, &se))| {
                                PathElement::new(
                                    vec![(w as f64, (v - se).max(v / 2.0)), (w as f64, v + se)],
                                    col.stroke_width(1),
                                )
                            },
                        ))
                        .map_err(|e| err(&e))?;
                }
            }
        }
        foot.draw_text(
            &format!(
                "{} draws per width (seed {}), {} step(s), lr {}, loss {}; RMS over coordinates and training inputs, then over draws; bars: ±1 SE",
                r.seeds, r.seed, r.steps, r.lr, r.loss
            ),
            &("sans-serif", 12).into_font().color(&BLACK.mix(0.7)),
            (16, 16),
        )
        .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_mean_square_over_draws() {
        let (e, se, s) = over_draws(&[1.0, 3.0]);
        assert_eq!(s, vec![1.0, 9.0]);
        assert!((e - 5f64.sqrt()).abs() < 1e-15);
        // var(s) = 32, se(e²) = 4, se(e) = 4 / (2 sqrt 5).
        assert!((se - 2.0 / 5f64.sqrt()).abs() < 1e-15);
    }

    #[test]
    fn statuses() {
        let f = |slope, se| {
            Some(Fit {
                slope,
                se,
                se_mc: se,
                intercept: 0.0,
                chi2: 0.0,
                dof: 1,
            })
        };
        let half = Some(Ex::pow(crate::ir::Rational::HALF));
        assert_eq!(status(half, &[1.0], &f(0.6, 0.01)), Status::Ok);
        assert_eq!(status(half, &[1.0], &f(0.7, 0.01)), Status::Disagree);
        assert_eq!(status(half, &[1.0], &f(0.5, 0.3)), Status::Uncertain);
        assert_eq!(status(half, &[0.0], &None), Status::Disagree);
        assert_eq!(status(Some(Ex::Zero), &[0.0, 0.0], &None), Status::Ok);
        assert_eq!(
            status(Some(Ex::Zero), &[0.0, 1e-9], &None),
            Status::Disagree
        );
        assert_eq!(status(None, &[1.0], &f(0.5, 0.01)), Status::NotPredicted);
    }

    #[test]
    fn effective_slope_of_two_power_laws() {
        // 1 + n/1000 (exponents 0 and 1/2 for the RMS).
        let widths = [100, 400, 1600, 6400];
        let e2: Vec<f64> = widths.iter().map(|&w| 1.0 + w as f64 / 1000.0).collect();
        let init = vec![1.0; 4];
        let change: Vec<f64> = widths.iter().map(|&w| w as f64 / 1000.0).collect();
        let eff = effective_slope(&widths, &init, &change, 0.0, 0.5).unwrap();
        let x: Vec<f64> = widths.iter().map(|&w| (w as f64).ln()).collect();
        let y: Vec<f64> = e2.iter().map(|e| 0.5 * e.ln()).collect();
        let xm = x.iter().sum::<f64>() / 4.0;
        let ym = y.iter().sum::<f64>() / 4.0;
        let slope = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - xm) * (b - ym))
            .sum::<f64>()
            / x.iter().map(|a| (a - xm).powi(2)).sum::<f64>();
        assert!((eff - slope).abs() < 1e-9, "{eff} {slope}");
        assert!(eff > 0.1 && eff < 0.45, "{eff}");
        // A negligible initial part: the change's exponent.
        let tiny = vec![1e-12; 4];
        assert!((effective_slope(&widths, &tiny, &change, 0.0, 0.5).unwrap() - 0.5).abs() < 1e-6);
    }
}
