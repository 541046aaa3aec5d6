//! The finite-width executor: sample every parameter at width N, run the program on all
//! points at once, and estimate the kernels and moments over independent draws.
//!
//! This is the *finite* meaning of a program (language.md): what a real network of
//! width N computes. Its averages converge to what `limit` derives by the Master
//! Theorem (theory.md §1.2) at rate N^(-1/2), so the two interpreters check each other.
//!
//! # One draw
//!
//! * **Sampling.** Parameter `i` is `mult · w` with `w ~ N(0, var)` entrywise
//!   (language.md, Declarations), drawn from the stream `StreamKey(seed, draw, i)`
//!   ([`super::sample`]): draw k of seed S is the same whatever K or the thread count.
//!   `w` and `mult` stay separate because the NTK differentiates with respect to `w`
//!   (theory.md §2.3, convention warning).
//! * **Forward.** Every width-n vector is an N×P block, one column per point; a vector
//!   that depends on no input (a bias, `h[0] = 0`, a random-matrix program) is one
//!   column, broadcast. `MatMul` goes through [`super::linalg`] (the transpose is a
//!   strided view, never a copy), `Nonlin` is evaluated coordinatewise with
//!   [`Expr::eval`](crate::ir::Expr::eval), a `Moment` is the mean over the N coordinates, per point (Netsor+,
//!   theory.md §1.1).
//! * **Backward.** Reverse mode over the IR for every (output, point) pair at once: the
//!   cotangent of a vector is an N×(O·P) block, output-major like cli.md's kernels.
//! * **NTK, exactly.** The gradient with respect to a matrix is a sum of outer products
//!   over the matrix's uses, so Gram entries factor (⟨a⊗b, c⊗d⟩ = (a·c)(b·d)) into
//!   products of small (uses·O·P)² Gram matrices: no N×N gradient is ever formed.
//!   This is the finite-width counterpart of theory.md §2.3's per-matrix sum over uses.
//! * **NNGP, conditioned on the features.** Readouts are independent N(0, σ²) vectors
//!   used only as readouts (the language guarantees it), so given the last features the
//!   outputs are exactly Gaussian with covariance `Var(v_a) x·x'` (theory.md §1.2, GP
//!   corollary; cli.md). Averaging this conditional covariance is unbiased for the
//!   covariance over draws and has far smaller variance than the raw outer products.
//!
//! # Many draws
//!
//! Draws are independent; each yields a full set of numbers, and means and standard
//! errors (sd/√K) are taken in draw order, so results are bit-identical whatever the
//! number of threads (the faer products are deterministic too: a test checks 1 vs 2
//! threads). Draws run in parallel, a few at a time so that memory stays bounded.
//!
//! # Where things are
//!
//! Types every engine shares are below the engines ([`super::types`], `plan`);
//! the engines are siblings that do not import each other; this module drives them.
//!
//! | module | owns |
//! |---|---|
//! | [`super::types`] | run configuration, errors, per-draw and per-run results, the hidden-product interface |
//! | `plan` | per-program facts, coordinatewise evaluation, parameter sampling |
//! | `pass` | the forward and reverse passes of one draw |
//! | `draw` | one draw's kernels (conditional NNGP, factored NTK) |
//! | [`super::cond`] | the conditional engine's hidden products (Netsor-transpose history) |
//! | [`super::train`], [`super::unrolled`] | training: step by step, and as one unrolled program |
//! | [`super::footprint`] | memory per draw, draws at once, refusals (E0037) |
//! | `stats` | means and standard errors over streamed draws |
//! | `exec` (this) | running K draws of a program: `tpc run` |

use nalgebra::DMatrix;
use rayon::prelude::*;

use super::draw::{run_draw, run_draw_with};
use super::footprint::{result_words, traj_words};
use super::plan::sample_params_into;
use super::plan::{run_points, sample_non_hidden, with_mults, Plan};
use super::stats::Moments;
use super::types::bug;
use crate::ir::{NodeId, Program};

pub use super::footprint::{
    conditional_vectors, draw_bytes, engine_bytes, kernel_bytes, mem_available, Footprint,
};
pub use super::plan::sample_params;
pub use super::types::{
    describe_value, out_of_range, Draw, Engine, Estimate, RunConfig, RunError, RunResult, MAX_VALUE,
};

/// Runs a program at width N over K draws: `tpc run`.
///
/// `progress` is called once after each draw (from any thread).
pub fn run(
    prog: &Program,
    points: &[Vec<f64>],
    cfg: &RunConfig,
    progress: &(dyn Fn() + Sync),
) -> Result<RunResult, RunError> {
    run_engine(prog, points, cfg, Engine::Dense, progress)
}

/// One draw with the conditional engine: every parameter but the hidden matrices is
/// sampled as [`sample_params`] samples it (same streams, so the same values); hidden
/// products come from a [`super::cond::CondEngine`].
pub fn run_one_conditional(
    prog: &Program,
    points: &[Vec<f64>],
    width: usize,
    seed: u64,
    draw: usize,
) -> Result<Draw, RunError> {
    let points = run_points(prog, points);
    let plan = Plan::new(prog, &points)?;
    cond_draw(&plan, width, seed, draw)
}

fn cond_draw(plan: &Plan<'_>, n: usize, seed: u64, draw: usize) -> Result<Draw, RunError> {
    let prog = plan.prog;
    let ws = sample_non_hidden(prog, n, seed, draw)?;
    let sampled = with_mults(prog, n, &ws);
    let mut engine = super::cond::CondEngine::new(prog, n, seed, draw);
    run_draw_with(plan, n, &sampled, draw, Some(&mut engine)).map(|(d, _)| d)
}

/// [`run`] with a choice of engine for the hidden-matrix products.
pub fn run_engine(
    prog: &Program,
    points: &[Vec<f64>],
    cfg: &RunConfig,
    engine: Engine,
    progress: &(dyn Fn() + Sync),
) -> Result<RunResult, RunError> {
    if cfg.width == 0 {
        return Err(bug(None, "the width must be at least 1"));
    }
    if cfg.seeds == 0 {
        return Err(bug(None, "at least one draw (--seeds 1) is needed"));
    }
    let points = run_points(prog, points);
    if engine == Engine::Conditional {
        return run_conditional(prog, points, cfg, progress);
    }
    let plan = Plan::new(prog, &points)?;
    let memory = Footprint::new(prog, &points, cfg.width, Engine::Dense);
    memory.check(cfg.width)?;
    let at_once = memory.at_once(cfg.width, cfg.seeds);
    let trainer = match prog.train {
        Some(_) => Some(super::train::Trainer::new(prog, &points)?),
        None => None,
    };
    let mut stats = RunStats::new(prog, plan.p);
    let mut trajs = trainer
        .as_ref()
        .map(|_| Moments::new(Moments::block_for(traj_words(prog, plan.p))));
    let mut peaks = super::train::Peaks::default();
    // One parameter buffer set per concurrent draw, refilled in place draw after draw.
    let mut buffers: Vec<Vec<DMatrix<f64>>> = vec![Vec::new(); at_once];
    let mut start = 0;
    while start < cfg.seeds {
        let chunk = start..(start + at_once).min(cfg.seeds);
        start = chunk.end;
        type Got = (Draw, Option<super::train::Trajectory>);
        let got: Vec<Result<Got, RunError>> = chunk
            .into_par_iter()
            .zip(buffers.par_iter_mut())
            .map(|(k, ws)| {
                let d = sample_params_into(prog, cfg.width, cfg.seed, k, ws)
                    .and_then(|()| run_draw(&plan, cfg.width, ws, k))
                    .and_then(|d| {
                        // Training moves `ws`; the next draw refills them.
                        let traj = match &trainer {
                            Some(tr) => Some(tr.run(cfg.width, ws, k, &mut |_, _, _| {})?),
                            None => None,
                        };
                        Ok((d, traj))
                    });
                progress();
                d
            })
            .collect();
        for d in got {
            let (d, traj) = d?;
            stats.push(d);
            if let (Some(m), Some(t)) = (trajs.as_mut(), traj) {
                peaks.push(&t);
                m.push(t);
            }
        }
    }
    let train = prog
        .train
        .as_ref()
        .zip(trajs)
        .map(|(t, m)| super::train::summarize(t, m.finish(), peaks));
    let r = stats.finish(prog, points, cfg, train);
    check_reportable(prog, &r)?;
    Ok(r)
}

/// Means and standard errors over the draws as they arrive, as cli.md's `run` result
/// (both engines): no per-draw result is kept ([`Moments`]).
struct RunStats {
    f: Moments,
    nngp: Moments,
    ntk: Moments,
    observe: Vec<Moments>,
}

impl RunStats {
    fn new(prog: &Program, p: usize) -> RunStats {
        let block = Moments::block_for(result_words(prog, p));
        RunStats {
            f: Moments::new(block),
            nngp: Moments::new(block),
            ntk: Moments::new(block),
            observe: prog.observes.iter().map(|_| Moments::new(block)).collect(),
        }
    }

    fn push(&mut self, d: Draw) {
        self.f.push(d.f);
        self.nngp.push(d.nngp);
        self.ntk.push(d.ntk);
        for (m, o) in self.observe.iter_mut().zip(d.observe) {
            m.push(DMatrix::from_row_slice(1, o.len(), &o));
        }
    }

    fn finish(
        self,
        prog: &Program,
        points: Vec<Vec<f64>>,
        cfg: &RunConfig,
        train: Option<super::train::TrainResult>,
    ) -> RunResult {
        let observe = prog
            .observes
            .iter()
            .zip(self.observe)
            .map(|(&m, e)| (prog.label(m), e.finish()))
            .collect();
        RunResult {
            outputs: prog.output_names(),
            points: prog.reported_points(points),
            width: cfg.width,
            seeds: cfg.seeds,
            seed: cfg.seed,
            f: self.f.finish(),
            nngp: self.nngp.finish(),
            ntk: self.ntk.finish(),
            observe,
            train,
        }
    }
}

/// The last guard before a run's numbers are printed: every mean and standard error
/// must be a number tpc can report ([`out_of_range`]); otherwise an error (E0036)
/// naming the quantity and pointing at its output or observe. The engines refuse
/// overflow as it happens, so this only fires if some path let one through — but then
/// a wrong number is never printed with exit 0.
pub fn check_reportable(prog: &Program, r: &RunResult) -> Result<(), RunError> {
    let first = prog.outputs.first().copied();
    let mut items: Vec<(String, Option<NodeId>, &Estimate)> = vec![
        ("the output mean f".into(), first, &r.f),
        ("the NNGP".into(), first, &r.nngp),
        ("the NTK".into(), first, &r.ntk),
    ];
    for ((name, e), &id) in r.observe.iter().zip(&prog.observes) {
        items.push((format!("observe `{name}`"), Some(id), e));
    }
    if let Some(t) = &r.train {
        items.push(("the training trajectory f_t".into(), first, &t.f_t));
    }
    for (what, node, e) in items {
        let se = e.se.iter().flat_map(|m| m.iter());
        for (kind, bad) in [
            ("mean", out_of_range(e.mean.iter().copied())),
            ("standard error", out_of_range(se.copied())),
        ] {
            if let Some(bad) = bad {
                return Err(RunError {
                    code: Some("E0036"),
                    span: node.map(|n| prog.node(n).span),
                    help: Some(
                        "no number is printed for it; a smaller width, learning rate or other laws keep values finite"
                            .into(),
                    ),
                    ..RunError::new(
                        node,
                        format!(
                            "the {kind} of {what} at width {} cannot be reported: {}",
                            r.width,
                            describe_value(bad)
                        ),
                    )
                });
            }
        }
    }
    Ok(())
}

/// [`run`] with the conditional engine: no N×N matrix is ever formed. `points` and
/// `cfg` are checked by [`run_engine`].
fn run_conditional(
    prog: &Program,
    points: Vec<Vec<f64>>,
    cfg: &RunConfig,
    progress: &(dyn Fn() + Sync),
) -> Result<RunResult, RunError> {
    let plan = Plan::new(prog, &points)?;
    let memory = Footprint::new(prog, &points, cfg.width, Engine::Conditional);
    memory.check(cfg.width)?;
    let mut stats = RunStats::new(prog, plan.p);
    memory.for_each_draw(
        cfg.width,
        cfg.seeds,
        |k| {
            let d = cond_draw(&plan, cfg.width, cfg.seed, k);
            progress();
            d
        },
        |d| stats.push(d),
    )?;
    // Training runs the unrolled program (crate::autodiff): only initial matrices, so
    // the conditional sampler answers every product of every step.
    let train = match &prog.train {
        Some(t) => {
            let run = super::unrolled::UnrolledRun::new(prog, &points, cfg.width)?;
            let mut trajs = Moments::new(Moments::block_for(traj_words(prog, plan.p)));
            let mut peaks = super::train::Peaks::default();
            memory.for_each_draw(
                cfg.width,
                cfg.seeds,
                |k| run.run(cfg.seed, k, Engine::Conditional),
                |t| {
                    peaks.push(&t);
                    trajs.push(t)
                },
            )?;
            Some(super::train::summarize(t, trajs.finish(), peaks))
        }
        None => None,
    };
    let r = stats.finish(prog, points, cfg, train);
    check_reportable(prog, &r)?;
    Ok(r)
}

/// Draw `k` of seed `seed` alone with either engine: the same numbers as inside
/// [`run_engine`].
pub fn run_one_engine(
    prog: &Program,
    points: &[Vec<f64>],
    width: usize,
    seed: u64,
    draw: usize,
    engine: Engine,
) -> Result<Draw, RunError> {
    match engine {
        Engine::Dense => run_one(prog, points, width, seed, draw),
        Engine::Conditional => run_one_conditional(prog, points, width, seed, draw),
    }
}

/// Runs draw `k` of seed `seed` alone: the same numbers as inside [`run`].
pub fn run_one(
    prog: &Program,
    points: &[Vec<f64>],
    width: usize,
    seed: u64,
    draw: usize,
) -> Result<Draw, RunError> {
    let ws = sample_params(prog, width, seed, draw)?;
    run_with(prog, points, width, ws)
}

/// Runs the program at width `width` on given trainable values (shaped as
/// [`sample_params`] returns them): for gradient checks and tools that perturb weights.
pub fn run_with(
    prog: &Program,
    points: &[Vec<f64>],
    width: usize,
    ws: Vec<DMatrix<f64>>,
) -> Result<Draw, RunError> {
    let points = run_points(prog, points);
    let plan = Plan::new(prog, &points)?;
    run_draw(&plan, width, &ws, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(v: f64) -> DMatrix<f64> {
        DMatrix::from_element(1, 1, v)
    }

    /// The report-time guard names the quantity (an observe, with its node) and
    /// refuses an infinite standard error or a value beyond [`MAX_VALUE`].
    #[test]
    fn an_unreportable_number_is_refused_at_report_time() {
        let prog = crate::check_source(
            "width n\ninput xi : 1\nparam U : n x 1 ~ N(0, 1)\nparam v : 1 x n ~ N(0, 1) * n^(-1/2)\nh1 = relu(U @ xi)\nobserve q = mean(h1 * h1)\noutput f = v @ h1\n",
        )
        .0
        .expect("a valid program");
        let est = |v: f64, se: f64| Estimate {
            mean: one(v),
            se: Some(one(se)),
        };
        let mut r = RunResult {
            outputs: prog.output_names(),
            points: vec![vec![1.0]],
            width: 8,
            seeds: 2,
            seed: 0,
            f: est(0.5, 0.1),
            nngp: est(1.0, 0.1),
            ntk: est(1.0, 0.1),
            observe: vec![("q".into(), est(0.5, 0.1))],
            train: None,
        };
        assert!(check_reportable(&prog, &r).is_ok());
        r.observe[0].1 = est(0.5, f64::INFINITY);
        let e = check_reportable(&prog, &r).unwrap_err();
        assert_eq!(e.code, Some("E0036"));
        assert_eq!(e.node, Some(prog.observes[0]));
        assert!(e.message.contains("observe `q`"), "{}", e.message);
        r.observe[0].1 = est(0.5, 0.1);
        r.f = est(2e150, 1.0);
        let e = check_reportable(&prog, &r).unwrap_err();
        assert!(e.message.contains("the output mean f"), "{}", e.message);
    }
}
