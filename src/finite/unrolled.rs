//! Training at finite width by running the unrolled program ([`crate::autodiff`]).
//!
//! The unrolled program holds only the *initial* matrices, so it runs on either engine:
//! with the dense engine it must equal dense-update training ([`super::train`]) up to
//! rounding (tests/it/unrolled.rs: 1e-10), and with the conditional engine
//! ([`super::cond`]) it trains at widths where no N×N matrix fits. The parameters are
//! drawn from the same streams as `tpc run` draws them, so `f_0` is the untrained
//! output of the same draw.

use nalgebra::DMatrix;

use super::pass::forward_releasing;
use super::plan::{sample_non_hidden, sample_params, with_mults, Plan, Val};
use super::train::Trajectory;
use super::types::{bug, Engine, HiddenProducts, RunError};
use crate::autodiff::{unroll, Unrolled, Width};
use crate::ir::{NodeId, Program, Ty};

/// A training program unrolled at one width, with its plan: built once, run per draw.
pub struct UnrolledRun {
    pub unrolled: Unrolled,
    width: usize,
    row: Vec<Vec<f64>>,
    /// The last node reading each node (`usize::MAX`: never released).
    last_use: Vec<usize>,
}

impl UnrolledRun {
    /// Unrolls `prog`'s `train` block at width `n`, reporting f_t at `eval_points`
    /// (none means the training inputs).
    pub fn new(
        prog: &Program,
        eval_points: &[Vec<f64>],
        n: usize,
    ) -> Result<UnrolledRun, RunError> {
        if n == 0 {
            return Err(bug(None, "the width must be at least 1"));
        }
        let eval: Vec<Vec<f64>> = if prog.inputs.is_empty() {
            Vec::new()
        } else {
            eval_points.to_vec()
        };
        let unrolled =
            unroll(prog, &eval, Width::Finite(n)).map_err(|e| RunError::new(e.node, e.message))?;
        let row = vec![unrolled.row()];
        let prog = &unrolled.prog;
        // The last reader of every node (itself when nothing reads it).
        let last_use: Vec<usize> = prog
            .ids()
            .map(|id| prog.users(id).last().map_or(id.index(), |u| u.index()))
            .collect();
        Ok(UnrolledRun {
            unrolled,
            width: n,
            row,
            last_use,
        })
    }

    /// The most width-N vectors alive at once while [`UnrolledRun::run`] runs (values
    /// are released after their last use).
    pub fn peak_vectors(&self) -> usize {
        let prog = &self.unrolled.prog;
        let vector = |id: NodeId| prog.ty(id) == Ty::Vector;
        let (mut live, mut peak) = (0usize, 0usize);
        for id in prog.ids() {
            if vector(id) {
                live += 1;
                peak = peak.max(live);
            }
            let mut ops = prog.operands(id);
            ops.push(id);
            ops.sort_unstable();
            ops.dedup();
            for a in ops {
                if vector(a) && self.last_use[a.index()] == id.index() {
                    live -= 1;
                }
            }
        }
        peak
    }

    /// The trajectory of draw `draw` of `seed`: (steps+1) × O·P, output-major.
    pub fn run(&self, seed: u64, draw: usize, engine: Engine) -> Result<Trajectory, RunError> {
        self.run_counted(seed, draw, engine).map(|(t, _)| t)
    }

    /// Words the conditional sampler holds after draw `draw` of `seed` (its history at
    /// its largest), for [`super::footprint::Footprint`].
    pub fn history_words(&self, seed: u64, draw: usize) -> Result<usize, RunError> {
        self.run_counted(seed, draw, Engine::Conditional)
            .map(|(_, h)| h)
    }

    /// [`UnrolledRun::run`] and the words the hidden-product sampler holds at the end.
    fn run_counted(
        &self,
        seed: u64,
        draw: usize,
        engine: Engine,
    ) -> Result<(Trajectory, usize), RunError> {
        let prog = &self.unrolled.prog;
        let n = self.width;
        // Rank-one corrections of an unrolled product can cancel to below their
        // rounding error when training diverges: checked, not trusted.
        let plan = Plan::new(prog, &self.row)?.checking_cancellation();
        let ws = match engine {
            Engine::Dense => sample_params(prog, n, seed, draw)?,
            Engine::Conditional => sample_non_hidden(prog, n, seed, draw)?,
        };
        let sampled = with_mults(prog, n, &ws);
        let mut cond = match engine {
            Engine::Dense => None,
            Engine::Conditional => Some(super::cond::CondEngine::new(prog, n, seed, draw)),
        };
        let products = cond.as_mut().map(|c| c as &mut dyn HiddenProducts);
        // Errors name nodes of the unrolled program, whose labels (`h2_1(ξ3)`) say the
        // step and point; the node ids do not belong to the front-end program.
        let vals = forward_releasing(&plan, n, &sampled, draw, products, Some(&self.last_use))
            .map_err(|e| RunError { node: None, ..e }.in_training("training"))?;
        let f = &self.unrolled.f;
        let cols = f.first().map_or(0, Vec::len);
        let mut traj = DMatrix::zeros(f.len(), cols);
        for (t, row) in f.iter().enumerate() {
            for (j, id) in row.iter().enumerate() {
                let Val::Scalar(v) = &vals[id.index()] else {
                    return Err(bug(
                        None,
                        "an output of the unrolled program is not a scalar",
                    ));
                };
                traj[(t, j)] = v[0];
            }
        }
        Ok((traj, cond.as_ref().map_or(0, |c| c.held_words())))
    }
}
