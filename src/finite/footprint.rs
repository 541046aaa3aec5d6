//! Memory: what one draw needs as a function of the width, whether a run fits, and
//! how many draws may run side by side (E0037 when it does not fit).

use rayon::prelude::*;

use super::draw::run_draw_with;
use super::plan::{run_points, sample_non_hidden, with_mults, Plan};
use super::stats::Moments;
use super::types::{Engine, RunError, COORD_CHUNK};
use crate::ir::{Op, Optimizer, Program, Shape};

/// Bytes one dense draw needs at width `n` with `p` points: [`engine_bytes`].
pub fn draw_bytes(prog: &Program, n: usize, p: usize) -> u128 {
    engine_bytes(prog, n, p, Engine::Dense)
}

/// Bytes one draw needs at width `n` with `p` points (an upper bound on the buffers
/// of `run_draw_with`): the parameters, every vector's N×P block and N×(O·P)
/// cotangent, and a few N×P temporaries. A hidden matrix is N×N under the dense
/// engine; under the conditional one it is its history ([`super::cond`]): a basis
/// vector and its product, 2N words, per product column (P per forward use, O·P per
/// reverse one), at most 2N columns. It does not model a `train` block's unrolled
/// program; [`Footprint`] measures that.
pub fn engine_bytes(prog: &Program, n: usize, p: usize, engine: Engine) -> u128 {
    let (n, p) = (n as u128, p.max(1) as u128);
    let o = prog.outputs.len().max(1) as u128;
    let mut words: u128 = 0;
    for prm in &prog.params {
        words += match prm.shape {
            Shape::Hidden => match engine {
                Engine::Dense => n * n,
                Engine::Conditional => {
                    let uses = prog.users(prm.node).len() as u128;
                    2 * n * (uses * (p + o * p)).min(2 * n)
                }
            },
            Shape::Input(d) => n * d as u128,
            Shape::Readout | Shape::Vector => 2 * n + n * o * p,
            Shape::Scalar => 1,
        };
    }
    for id in prog.ids() {
        if let Op::MatMul { .. } | Op::Nonlin(_) = &prog.node(id).op {
            words += n * p + n * o * p;
        }
    }
    // A derivative block, a product's output and the sampler's scratch vectors.
    words += 2 * n * o * p + 4 * n;
    // Dense training with another optimizer than plain SGD forms each gradient and
    // keeps the optimizer's state beside every parameter (README, "Training:
    // optimizers"): the gradient, plus a momentum buffer or Adam's two moments.
    if let Some(t) = prog.train.as_ref().filter(|t| !t.is_plain_sgd()) {
        if engine == Engine::Dense {
            let copies: u128 = 1 + match t.optimizer {
                Optimizer::Sgd => 0,
                Optimizer::Momentum { .. } => 1,
                Optimizer::Adam { .. } | Optimizer::AdamW { .. } => 2,
            };
            let stored: u128 = prog
                .params
                .iter()
                .map(|prm| match prm.shape {
                    Shape::Hidden => n * n,
                    Shape::Input(d) => n * d as u128,
                    Shape::Readout | Shape::Vector => n,
                    Shape::Scalar => 1,
                })
                .sum();
            words += copies * stored;
        }
    }
    8 * words
}

/// Bytes of the O·P × O·P matrices a draw holds while forming its kernels: the NNGP
/// and NTK, a Gram matrix per side of a matrix's uses, their product and its
/// transpose, and the draw's copy of both kernels.
pub fn kernel_bytes(prog: &Program, p: usize) -> u128 {
    let op = (prog.outputs.len().max(1) * p.max(1)) as u128;
    8 * 8 * op * op
}

pub use crate::machine::mem_available;

/// The memory one draw needs as a function of the width, and what follows from it:
/// whether a run fits, and how many draws may run side by side.
///
/// The dense engine uses the a-priori bound [`engine_bytes`] (its N×N matrices dominate
/// and are exact). The conditional engine's bound counts every possible history column
/// and every cotangent, which overstates a real draw ≈ 2× (a 10^7-wide RNN would be
/// refused); so above a small width it runs one draw at a probe width N₀ and counts the
/// width-N vectors the draw holds at its widest point (values, the cotangents kept for
/// the NTK, the sampler's history; for `train` blocks the unrolled program's peak) plus
/// the transient blocks of the reverse pass. That count does not depend on N once N₀
/// exceeds every history's rank, so bytes(N) = 8·N·count.
pub struct Footprint<'p> {
    prog: &'p Program,
    p: usize,
    engine: Engine,
    /// (N₀, width-N vectors per draw), when measured.
    measured: Option<(usize, u128)>,
}

impl<'p> Footprint<'p> {
    /// The footprint of `prog` on `points` for runs up to width `width`.
    pub fn new(
        prog: &'p Program,
        points: &[Vec<f64>],
        width: usize,
        engine: Engine,
    ) -> Footprint<'p> {
        let p = points.len().max(1);
        let mut fp = Footprint {
            prog,
            p,
            engine,
            measured: None,
        };
        if engine == Engine::Conditional {
            // Above every history's rank: the count is then the count at any width.
            let o = prog.outputs.len().max(1);
            let cols: usize = prog
                .params
                .iter()
                .filter(|q| q.shape == Shape::Hidden)
                .map(|q| prog.users(q.node).len() * (p + o * p))
                .sum();
            let n0 = (2 * cols + 64).max(256);
            // The probe is a real draw: only when it surely fits (with many points its
            // N₀ × P blocks alone can exhaust memory; the a-priori bound then refuses).
            let probe_fits = mem_available().is_none_or(|avail| {
                engine_bytes(prog, n0, p, engine) + kernel_bytes(prog, p) <= avail / 2
            });
            if width > 4 * n0 && probe_fits {
                // A probe that fails (an overflow at N₀, say) leaves the a-priori bound.
                fp.measured = conditional_vectors(prog, points, n0).ok().map(|v| (n0, v));
            }
        }
        fp
    }

    /// The dense engine's footprint with `p` points (no probe is needed).
    pub fn dense(prog: &'p Program, p: usize) -> Footprint<'p> {
        Footprint {
            prog,
            p: p.max(1),
            engine: Engine::Dense,
            measured: None,
        }
    }

    /// Bytes one draw needs at width `n`: its width-N buffers and its (O·P)² kernels.
    pub fn bytes(&self, n: usize) -> u128 {
        let wide = match self.measured {
            Some((n0, v)) if n >= n0 => 8 * n as u128 * v,
            _ => engine_bytes(self.prog, n, self.p, self.engine),
        };
        wide + kernel_bytes(self.prog, self.p)
    }

    /// Bytes a run holds whatever its draws: the statistics of [`Moments`].
    fn run_bytes(prog: &Program, p: usize) -> u128 {
        let words = |w: usize| (Moments::block_for(w) + 2) as u128 * w as u128;
        8 * (words(result_words(prog, p)) + words(traj_words(prog, p)))
    }

    /// Bytes of a run at width `n` with `p` points, by the a-priori bound.
    fn apriori(&self, n: usize, p: usize) -> u128 {
        engine_bytes(self.prog, n, p, self.engine)
            + kernel_bytes(self.prog, p)
            + Self::run_bytes(self.prog, p)
    }

    /// Refuses a run that cannot fit in memory (E0037), before anything wide is
    /// allocated, saying what fits: the largest width at these points, or, when the
    /// (O·P)² kernels alone are too large, the most points; and, for the dense
    /// engine, the conditional engine when it would fit (no N×N matrix).
    pub fn check(&self, width: usize) -> Result<(), RunError> {
        let Some(avail) = mem_available() else {
            return Ok(());
        };
        let need = self.bytes(width) + Self::run_bytes(self.prog, self.p);
        if need <= avail {
            return Ok(());
        }
        let fits = |n: usize| self.bytes(n) + Self::run_bytes(self.prog, self.p) <= avail;
        let (mut lo, mut hi) = (0usize, width);
        while lo + 1 < hi {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
        let points = if self.p == 1 {
            "1 point".to_string()
        } else {
            format!("{} points", self.p)
        };
        let message = format!(
            "width {width} on {points} needs about {:.1} GiB but {:.1} GiB is available",
            gib(need),
            gib(avail)
        );
        let mut help = if lo >= 1 {
            format!("the largest width that fits is {lo}")
        } else {
            // Not even width 1: the kernels over the points are too large.
            let (mut plo, mut phi) = (0usize, self.p);
            while plo + 1 < phi {
                let mid = plo + (phi - plo) / 2;
                if self.apriori(width, mid) <= avail {
                    plo = mid;
                } else {
                    phi = mid;
                }
            }
            let o = self.prog.outputs.len().max(1);
            format!(
                "the {o}·P × {o}·P kernels grow with the square of the number of points P: at most {plo} points fit at width {width}; pass fewer rows with --inputs"
            )
        };
        if self.engine == Engine::Dense && lo < width {
            let cond = engine_bytes(self.prog, width, self.p, Engine::Conditional)
                + kernel_bytes(self.prog, self.p)
                + Self::run_bytes(self.prog, self.p);
            if cond <= avail {
                help.push_str(&format!(
                    "; or run with `--engine conditional`, which draws the hidden products without any N×N matrix (about {:.1} GiB here)",
                    gib(cond)
                ));
            }
        }
        Err(RunError::resources(message, help))
    }

    /// Refuses keeping `words` numbers per draw for `seeds` draws — statistics paired
    /// across widths (compare, coord-check) need every draw's values — when they would
    /// take more than half the available memory, naming how many draws fit. Checked
    /// before the first draw, so `--seeds 100000000` allocates nothing.
    pub fn check_kept(words: u128, seeds: usize) -> Result<(), RunError> {
        let Some(avail) = mem_available() else {
            return Ok(());
        };
        let per = 8 * words.max(1);
        let need = per * seeds as u128;
        if need <= avail / 2 {
            return Ok(());
        }
        let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
        Err(RunError::resources(
            format!(
                "{seeds} draws keep about {:.1} GiB of per-draw values (paired across widths) but {:.1} GiB is available",
                gib(need),
                gib(avail)
            ),
            format!("at most {} draws fit: lower --seeds", avail / 2 / per),
        ))
    }

    /// [`Footprint::check`] for one width of a `--widths` list, saying so.
    pub fn check_listed(&self, width: usize) -> Result<(), RunError> {
        self.check(width).map_err(|e| RunError {
            help: Some(format!(
                "{}; or drop it from --widths",
                e.help.as_deref().unwrap_or_default()
            )),
            ..e
        })
    }

    /// How many of `seeds` draws to hold in memory at once: one per thread when they
    /// fit in three quarters of the free memory, else one (whose products still use
    /// every thread). A wide conditional draw already spreads its coordinatewise loops
    /// over every thread, so such draws always run one after the other.
    pub fn at_once(&self, width: usize, seeds: usize) -> usize {
        if self.engine == Engine::Conditional && width >= 4 * COORD_CHUNK {
            return 1;
        }
        let threads = rayon::current_num_threads().clamp(1, seeds.max(1));
        let avail = mem_available().unwrap_or(u128::MAX);
        let fit = (avail / 4 * 3) / self.bytes(width).max(1);
        (fit.min(threads as u128) as usize).max(1)
    }

    /// `draw(k)` for k = 0..seeds, as many at once as [`Footprint::at_once`] allows at
    /// `width`, results in draw order (the first error, in draw order, wins).
    pub fn draws<T: Send>(
        &self,
        width: usize,
        seeds: usize,
        draw: impl Fn(usize) -> Result<T, RunError> + Sync,
    ) -> Result<Vec<T>, RunError> {
        let mut out = Vec::new();
        self.for_each_draw(width, seeds, draw, |d| out.push(d))?;
        Ok(out)
    }

    /// [`Footprint::draws`] handing each result to `sink` in draw order instead of
    /// keeping them: memory does not grow with `seeds`.
    pub fn for_each_draw<T: Send>(
        &self,
        width: usize,
        seeds: usize,
        draw: impl Fn(usize) -> Result<T, RunError> + Sync,
        mut sink: impl FnMut(T),
    ) -> Result<(), RunError> {
        let at_once = self.at_once(width, seeds);
        let mut start = 0;
        while start < seeds {
            let chunk = start..(start + at_once).min(seeds);
            start = chunk.end;
            let got: Vec<Result<T, RunError>> = chunk.into_par_iter().map(&draw).collect();
            for d in got {
                sink(d?);
            }
        }
        Ok(())
    }

    /// The measured count of width-N vectors per draw and the probe width, if any.
    pub fn measured(&self) -> Option<(usize, u128)> {
        self.measured
    }
}

/// Width-N vectors one conditional draw of `prog` holds at its widest point, counted
/// on a draw at width `n0` ([`Footprint`]): draw 0 of seed 0, plus the reverse pass's
/// transient blocks; for `train` blocks the larger of that and the unrolled program's.
pub fn conditional_vectors(
    prog: &Program,
    points: &[Vec<f64>],
    n0: usize,
) -> Result<u128, RunError> {
    let points = &run_points(prog, points)[..];
    let plan = Plan::new(prog, points)?;
    let ws = sample_non_hidden(prog, n0, 0, 0)?;
    let params: usize = ws.iter().map(|w| w.len()).sum();
    let sampled = with_mults(prog, n0, &ws);
    let mut engine = super::cond::CondEngine::new(prog, n0, 0, 0);
    let (_, held) = run_draw_with(&plan, n0, &sampled, 0, Some(&mut engine))?;
    // In flight during the reverse pass: a cotangent being propagated, a product's
    // output, a derivative block and the sampler's scratch vectors.
    let (p, op) = (plan.p, plan.o * plan.p);
    let transient = (2 * op + p + 4) as u128;
    let mut vectors = ((held + params).div_ceil(n0)) as u128 + transient;
    if prog.train.is_some() {
        let run = super::unrolled::UnrolledRun::new(prog, points, n0)?;
        let hist = run.history_words(0, 0)?;
        let train = (run.peak_vectors() + (hist + params).div_ceil(n0)) as u128 + 4;
        vectors = vectors.max(train);
    }
    Ok(vectors)
}

/// Numbers in one draw's trajectory f_t: (steps+1) × O·P.
pub(super) fn traj_words(prog: &Program, p: usize) -> usize {
    prog.train.as_ref().map_or(0, |t| t.steps + 1) * prog.outputs.len() * p.max(1)
}

/// Numbers in one draw's result: outputs, both kernels, observes (one per point).
pub(super) fn result_words(prog: &Program, p: usize) -> usize {
    let op = prog.outputs.len() * p.max(1);
    op + 2 * op * op + prog.observes.len() * p.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeping 10^8 draws of 10^6 numbers is refused before anything is allocated,
    /// saying how many draws fit.
    #[test]
    fn keeping_too_many_draws_is_refused() {
        if mem_available().is_none() {
            return;
        }
        let e = Footprint::check_kept(1_000_000, 100_000_000).unwrap_err();
        assert_eq!(e.code, Some("E0037"));
        assert!(e.help.unwrap().contains("draws fit"));
        assert!(Footprint::check_kept(10, 100).is_ok());
    }
}
