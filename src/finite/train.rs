//! Training at finite width: dense full-batch gradient descent on the sampled network.
//!
//! This is the *reference* meaning of a `train` block (language.md, Training): sample
//! the parameters exactly as `tpc run` does (same seed and streams, so `f_0` is the
//! untrained run's output bit for bit), then for t = 0..steps
//!
//! 1. run the forward pass on the training inputs (and on the evaluation points, when
//!    they differ) and record `f_t`;
//! 2. form χ = ∂L/∂f on the batch: `(f − y)/B` for `mse`, `(σ(f) − y)/B` for `xent`,
//!    one target per output (the loss sums over outputs);
//! 3. backpropagate χ with the executor's reverse pass (`pass`), seeded with χ
//!    rather than one cotangent per (output, point), so every cotangent is one N×B block;
//! 4. update every trainable variable `w` (the N(0, var) variable of its law; the
//!    parameter is `mult · w`) by `w ← w − lr · lr_mult(N) · ∂L/∂w`, all at once — or,
//!    with another `optimizer`, by that optimizer's step on g = ∂L/∂w with the rate
//!    `lr · lr_mult(N)` (torch.optim's updates, [`crate::ir::Optimizer`]; see
//!    `Trainer::apply`).
//!
//! With `batch = B < D`, step t's χ is nonzero only on its minibatch
//! ([`crate::ir::Train::batch_at`]) and divided by B.
//!
//! The gradient of a matrix is a sum over its uses of outer products, `mult · δ xᵀ` for
//! `W x` and `mult · x δᵀ` for `Wᵀ x`; they are accumulated straight into the N×N
//! variable (a dense rank-B update per use and step). That costs O(N² B) per use, which
//! is what a later rank-t unrolled program (theory.md §6.1) avoids; this module is the
//! oracle it must match.
//!
//! Non-finite values (SP with a width-independent learning rate blows up, theory.md
//! §5.2) are errors that name the step and the node, never numbers.
//!
//! [`coord_sizes`] exposes the per-step coordinate sizes of every vector for
//! coordinate checks (theory.md §7).

use nalgebra::DMatrix;

use super::draw::outputs;
use super::linalg::{gemm, Trans};
use super::pass::{backward, forward};
use super::plan::{col, sample_params, sampled_of, Plan, Sampled, Val};
use super::types::{bug, describe_value, out_of_range, Estimate, RunConfig, RunError};
use crate::diag::Diagnostic;
use crate::ir::{Loss, NodeId, Op, Optimizer, OutTerm, Program, Shape, Train, Ty};

/// Everything needed to train one draw, computed once per program and points.
pub(super) struct Trainer<'a> {
    prog: &'a Program,
    train: &'a Train,
    /// The plan over the training inputs.
    tplan: Plan<'a>,
    /// The plan over the evaluation points; `None` when they are the training inputs.
    eplan: Option<Plan<'a>>,
    /// Column of the training plan holding sample b (b, or 0 without inputs).
    cols: Vec<usize>,
}

/// The trajectory of one draw: row t is f_t on the evaluation points, O·P columns,
/// output-major (column o·P + p).
pub type Trajectory = DMatrix<f64>;

/// `tpc run`'s training estimate: means and standard errors of f_t over the draws,
/// (steps+1) × O·P, output-major.
#[derive(Clone, Debug)]
pub struct TrainResult {
    pub loss: Loss,
    pub lr: f64,
    pub steps: usize,
    /// The optimizer in words ([`Train::describe`]).
    pub optimizer: String,
    /// Plain full-batch SGD ([`Train::is_plain_sgd`]).
    pub plain_sgd: bool,
    /// The optimizer with its hyperparameters, the weight decay and the minibatch size,
    /// as the `train` block sets them (`tpc run --format json`'s `train.optimizer`).
    pub optim: crate::ir::Optimizer,
    pub weight_decay: crate::ir::Monomial,
    pub batch: usize,
    pub f_t: Estimate,
    /// `peak[t]`: the largest |f_t| over the draws and columns, for [`divergence`].
    pub peak: Vec<f64>,
}

/// The largest |f_t| of every step over the draws pushed so far.
#[derive(Clone, Debug, Default)]
pub struct Peaks(Vec<f64>);

impl Peaks {
    pub fn push(&mut self, traj: &Trajectory) {
        if self.0.len() < traj.nrows() {
            self.0.resize(traj.nrows(), 0.0);
        }
        for (t, row) in traj.row_iter().enumerate() {
            let m = row.iter().fold(0.0_f64, |m, v| m.max(v.abs()));
            self.0[t] = self.0[t].max(m);
        }
    }
}

/// How many times larger than the scale of f_0 and the targets |f_t| must grow before
/// training is said to diverge. Gradient descent that converges keeps f_t within a
/// modest multiple of that scale (it moves f toward the targets); a factor of 10^6 is
/// reached only when a step overshoots geometrically — the learning rate is beyond the
/// stable range for this width. Values up to ±1e150 are still reported (they are what
/// the finite network computes, E0035 refuses beyond), so this is a warning.
pub const DIVERGENCE_FACTOR: f64 = 1e6;

/// W0105 at the learning rate when some draw's |f_t| grows past [`DIVERGENCE_FACTOR`]
/// times the scale of f_0 and the targets: the trajectory is what this network computes
/// (after a divergence, e.g. f_t = 0 once every relu has died), not gradient descent
/// converging, and its mean over draws is dominated by rare huge values.
pub fn divergence(prog: &Program, r: &TrainResult, width: usize) -> Option<Diagnostic> {
    let train = prog.train.as_ref()?;
    let targets = train
        .data
        .iter()
        .flat_map(|s| s.y.iter())
        .fold(0.0_f64, |m, y| m.max(y.abs()));
    let scale = 1.0 + targets + r.peak.first().copied().unwrap_or(0.0);
    let (t, &peak) = r
        .peak
        .iter()
        .enumerate()
        .find(|(_, &p)| p.is_nan() || p > DIVERGENCE_FACTOR * scale)?;
    Some(
        Diagnostic::warning(
            "W0105",
            format!(
                "training diverges at width {width}: |f_t| reaches {peak:.3e} at step {t} \
                 (|f_0| and the targets are at most {:.3e})",
                scale - 1.0
            ),
            train.lr_span,
            format!("learning rate {}", train.lr),
        )
        .with_help(
            "the printed f_t is what this network computes after a divergence (e.g. 0 once \
             every relu has died), and its mean over draws is dominated by rare huge values: \
             lower `lr` for this width",
        ),
    )
}

/// The per-step root-mean-square coordinate size of every vector node of one draw,
/// for coordinate checks (theory.md §5.2, §7). See [`coord_sizes`].
#[derive(Clone, Debug)]
pub struct CoordSizes {
    /// The vector nodes (parameters of shape `n`, products, coordinatewise
    /// functions) and the moments (their RMS is over the training inputs), in node
    /// order.
    pub nodes: Vec<NodeId>,
    /// Their display names (`h1`, `%5`).
    pub labels: Vec<String>,
    /// `rms[t][j]`: after t steps, sqrt of the mean of x² over the N coordinates and
    /// the training inputs of vector `nodes[j]` (a vector that depends on no input is
    /// the same at every point). steps+1 rows.
    pub rms: Vec<Vec<f64>>,
    /// `change[t][j]`: the same root mean square of `x_t − x_0`, the change since
    /// initialization (row 0 is zero).
    pub change: Vec<Vec<f64>>,
    /// `f[t]`: f_t at the training inputs, O·B values, output-major.
    pub f: Vec<Vec<f64>>,
    /// `f_abs[t]`: |f_t|, the root mean square of `f[t]`.
    pub f_abs: Vec<f64>,
    /// `f_change[t]`: |f_t − f_0|, the root mean square of `f[t] − f[0]`.
    pub f_change: Vec<f64>,
}

/// Sees, at every step t = 0..steps, the forward values on the training inputs and
/// the outputs there (O×B).
pub(super) type Observer<'o> = dyn FnMut(usize, &[Val], &DMatrix<f64>) + 'o;

/// A contribution to ∂L/∂w of one parameter.
enum Grad {
    /// The whole gradient as a matrix shaped like `w` (vectors, readouts, scalars).
    Dense(DMatrix<f64>),
    /// `mult · A · op(B)` (a use of a matrix): A is rows(w)×B, op(B) is B×cols(w).
    Outer(DMatrix<f64>, DMatrix<f64>, Trans),
}

/// The optimizer's memory for one draw: per parameter, the momentum buffer (SGD with
/// momentum) or Adam's first moment, and Adam's second moment; `steps` taken so far.
#[derive(Default)]
struct OptState {
    steps: usize,
    first: Vec<Option<DMatrix<f64>>>,
    second: Vec<Option<DMatrix<f64>>>,
}

/// Relabels an error with the training step it happened at.
fn at_step(what: String) -> impl Fn(RunError) -> RunError {
    move |e| e.in_training(&what)
}

impl<'a> Trainer<'a> {
    /// A trainer for `prog` (which must have a `train` block), reporting f_t on
    /// `eval_points` (`--inputs` rows; none means the training inputs).
    pub(super) fn new(
        prog: &'a Program,
        eval_points: &[Vec<f64>],
    ) -> Result<Trainer<'a>, RunError> {
        let train = prog
            .train
            .as_ref()
            .ok_or_else(|| bug(None, "this program has no `train` block"))?;
        if train.data.is_empty() {
            return Err(bug(None, "the training data is empty"));
        }
        let no_inputs = prog.inputs.is_empty();
        let tpoints: Vec<Vec<f64>> = if no_inputs {
            vec![vec![]]
        } else {
            train.data.iter().map(|s| s.x.clone()).collect()
        };
        let cols = (0..train.data.len())
            .map(|b| if no_inputs { 0 } else { b })
            .collect();
        let epoints: Vec<Vec<f64>> = if no_inputs {
            vec![vec![]]
        } else {
            eval_points.to_vec()
        };
        let tplan = Plan::new(prog, &tpoints)?;
        let eplan = if epoints.is_empty() || epoints == tpoints {
            None
        } else {
            Some(Plan::new(prog, &epoints)?)
        };
        for s in &train.data {
            if s.y.len() != prog.outputs.len() {
                return Err(bug(None, "a training target needs one number per output"));
            }
        }
        Ok(Trainer {
            prog,
            train,
            tplan,
            eplan,
            cols,
        })
    }

    /// The number of evaluation points.
    fn eval_p(&self) -> usize {
        self.eplan.as_ref().unwrap_or(&self.tplan).p
    }

    /// Trains the variables `ws` (as [`sample_params`] shapes them) at width `n` in
    /// place for `steps` steps; returns the trajectory on the evaluation points.
    /// `observe(t, vals, f)` sees the training-input forward values and outputs of
    /// every step t = 0..steps. `draw` labels error messages.
    pub(super) fn run(
        &self,
        n: usize,
        ws: &mut [DMatrix<f64>],
        draw: usize,
        observe: &mut Observer<'_>,
    ) -> Result<Trajectory, RunError> {
        let steps = self.train.steps;
        let o = self.prog.outputs.len();
        let pe = self.eval_p();
        let mut traj = DMatrix::zeros(steps + 1, o * pe);
        let mut state = OptState::default();
        for t in 0..=steps {
            let after = || format!("after {t} training step(s)");
            let sampled = sampled_of(self.prog, n, ws)?;
            let vals = forward(&self.tplan, n, &sampled, draw).map_err(at_step(after()))?;
            let ftr = outputs(&self.tplan, n, &sampled, &vals, draw).map_err(at_step(after()))?;
            observe(t, &vals, &ftr);
            let fe = match &self.eplan {
                None => ftr.clone(),
                Some(ep) => {
                    let ev = forward(ep, n, &sampled, draw).map_err(at_step(after()))?;
                    outputs(ep, n, &sampled, &ev, draw).map_err(at_step(after()))?
                }
            };
            for oi in 0..o {
                for p in 0..pe {
                    traj[(t, oi * pe + p)] = fe[(oi, p)];
                }
            }
            if t == steps {
                break;
            }
            let chi = self.chi(&ftr, t);
            let grads = gradients(&self.tplan, n, &sampled, vals, &chi, draw).map_err(at_step(
                format!("in training step {} (the gradient at f_{t})", t + 1),
            ))?;
            drop(sampled);
            self.apply(n, ws, grads, &mut state)
                .map_err(at_step(format!("in training step {}", t + 1)))?;
        }
        Ok(traj)
    }

    /// χ = ∂L/∂f of step t's minibatch loss on the training plan's columns, O × P
    /// (zero outside the minibatch).
    fn chi(&self, f: &DMatrix<f64>, t: usize) -> DMatrix<f64> {
        let batch = self.train.batch_at(t);
        let b = batch.len() as f64;
        let mut chi = DMatrix::zeros(f.nrows(), f.ncols());
        for i in batch {
            let (s, c) = (&self.train.data[i], self.cols[i]);
            for (oi, &y) in s.y.iter().enumerate() {
                chi[(oi, c)] += dloss(self.train.loss, f[(oi, c)], y) / b;
            }
        }
        chi
    }

    /// The training loss of the outputs `f` on the training plan.
    fn loss(&self, f: &DMatrix<f64>) -> f64 {
        let b = self.train.data.len() as f64;
        let mut l = 0.0;
        for (s, &c) in self.train.data.iter().zip(&self.cols) {
            for (oi, &y) in s.y.iter().enumerate() {
                l += loss(self.train.loss, f[(oi, c)], y);
            }
        }
        l / b
    }

    /// One optimizer step for every parameter with the rate `lr · lr_mult(n)`: for
    /// full-batch SGD without weight decay `w ← w − rate · ∂L/∂w`, the gradient's
    /// outer products added straight into `w`; otherwise the gradient g is formed and
    /// (torch.optim's updates, [`Optimizer`]):
    ///
    /// * `weight_decay = λ` (SGD, momentum, Adam): `g ← g + λ w` (L2);
    /// * momentum β: `b ← g` at the first step, `b ← β b + g` after; `w ← w − rate·b`;
    /// * Adam: `m ← β1 m + (1−β1) g`, `v ← β2 v + (1−β2) g²`, and with the step count
    ///   k = 1, 2, … `w ← w − (rate/(1−β1^k)) · m / (sqrt(v)/sqrt(1−β2^k) + ε)`;
    /// * AdamW: first `w ← w·(1 − rate·wd)`, then Adam's step without L2.
    ///
    /// A parameter the loss does not depend on is left alone (torch skips parameters
    /// without a gradient). A non-finite result is an error naming the parameter.
    fn apply(
        &self,
        n: usize,
        ws: &mut [DMatrix<f64>],
        grads: Vec<Vec<Grad>>,
        state: &mut OptState,
    ) -> Result<(), RunError> {
        let nf = n as f64;
        let np = self.prog.params.len();
        state.first.resize(np, None);
        state.second.resize(np, None);
        state.steps += 1;
        let k = state.steps as i32;
        let plain = self.train.optimizer == Optimizer::Sgd && self.train.weight_decay.coef == 0.0;
        let l2 = self.train.weight_decay.at(nf);
        for (pi, ((w, prm), gs)) in ws.iter_mut().zip(&self.prog.params).zip(grads).enumerate() {
            let rate = self.train.lr * prm.law.lr.at(nf);
            let mult = prm.law.mult.at(nf);
            let touched = !gs.is_empty();
            let shape_err = |e| bug(Some(prm.node), format!("internal shape error: {e}"));
            if plain {
                for g in gs {
                    match g {
                        Grad::Dense(d) => *w -= d * rate,
                        Grad::Outer(a, b, tb) => {
                            gemm(w, -rate * mult, &a, Trans::No, &b, tb, 1.0).map_err(shape_err)?
                        }
                    }
                }
            } else if touched {
                let mut g = DMatrix::zeros(w.nrows(), w.ncols());
                for gr in gs {
                    match gr {
                        Grad::Dense(d) => g += d,
                        Grad::Outer(a, b, tb) => {
                            gemm(&mut g, mult, &a, Trans::No, &b, tb, 1.0).map_err(shape_err)?
                        }
                    }
                }
                if l2 != 0.0 && !matches!(self.train.optimizer, Optimizer::AdamW { .. }) {
                    axpy(&mut g, l2, w, 1.0);
                }
                match self.train.optimizer {
                    Optimizer::Sgd => axpy(w, -rate, &g, 1.0),
                    Optimizer::Momentum { beta } => {
                        let b = match state.first[pi].take() {
                            None => g,
                            Some(mut b) => {
                                axpy(&mut b, 1.0, &g, beta);
                                b
                            }
                        };
                        axpy(w, -rate, &b, 1.0);
                        state.first[pi] = Some(b);
                    }
                    Optimizer::Adam { beta1, beta2, eps }
                    | Optimizer::AdamW {
                        beta1, beta2, eps, ..
                    } => {
                        if let Optimizer::AdamW { wd, .. } = self.train.optimizer {
                            *w *= 1.0 - rate * wd.at(nf);
                        }
                        let m = state.first[pi].get_or_insert_with(|| g.map(|_| 0.0));
                        axpy(m, 1.0 - beta1, &g, beta1);
                        let v = state.second[pi].get_or_insert_with(|| g.map(|_| 0.0));
                        v.zip_apply(&g, |v, g| *v = beta2 * *v + (1.0 - beta2) * g * g);
                        let step = rate / (1.0 - beta1.powi(k));
                        let bc2 = (1.0 - beta2.powi(k)).sqrt();
                        let e = eps.at(nf);
                        for ((w, m), v) in w.iter_mut().zip(m.iter()).zip(v.iter()) {
                            *w -= step * m / (v.sqrt() / bc2 + e);
                        }
                    }
                }
            }
            if let Some(bad) = out_of_range(w.iter().copied()).filter(|_| touched) {
                return Err(RunError {
                    span: Some(self.prog.node(prm.node).span),
                    ..RunError::overflow(
                        Some(prm.node),
                        format!(
                            "the update of {} at width {n}: {}",
                            prm.name,
                            describe_value(bad)
                        ),
                    )
                });
            }
        }
        Ok(())
    }
}

/// `y ← a·x + b·y`, entry by entry.
fn axpy(y: &mut DMatrix<f64>, a: f64, x: &DMatrix<f64>, b: f64) {
    y.zip_apply(x, |y, x| *y = a * x + b * *y);
}

/// One sample's loss.
fn loss(kind: Loss, f: f64, y: f64) -> f64 {
    match kind {
        Loss::Mse => 0.5 * (f - y) * (f - y),
        // log(1 + e^f) − y f, computed without overflow.
        Loss::Xent => f.max(0.0) + (-f.abs()).exp().ln_1p() - y * f,
    }
}

/// ∂(one sample's loss)/∂f.
fn dloss(kind: Loss, f: f64, y: f64) -> f64 {
    match kind {
        Loss::Mse => f - y,
        Loss::Xent => sigmoid(f) - y,
    }
}

fn sigmoid(f: f64) -> f64 {
    if f >= 0.0 {
        1.0 / (1.0 + (-f).exp())
    } else {
        let e = f.exp();
        e / (1.0 + e)
    }
}

/// ∂L/∂w of every parameter for the loss cotangent `chi` (O×P on the plan's points),
/// as contributions to be summed: one list per parameter (empty when L does not
/// depend on it).
fn gradients(
    plan: &Plan<'_>,
    n: usize,
    sampled: &[Sampled<'_>],
    vals: Vec<Val>,
    chi: &DMatrix<f64>,
    draw: usize,
) -> Result<Vec<Vec<Grad>>, RunError> {
    let prog = plan.prog;
    let p = plan.p;
    let mut grads: Vec<Vec<Grad>> = (0..prog.params.len()).map(|_| Vec::new()).collect();
    let mut delta: Vec<Option<super::types::Cot>> = vec![None; prog.len()];

    // Seeds at the outputs: f_o = Σ coef·mult·w·x + Σ coef·mult·b + c.
    for (oi, &out) in prog.outputs.iter().enumerate() {
        let Op::Output { terms, .. } = &prog.node(out).op else {
            return Err(bug(Some(out), "an output that is not an Output"));
        };
        let ops = &plan.operands[out.index()];
        for t in terms {
            match *t {
                OutTerm::Readout {
                    coef,
                    readout,
                    vector,
                } => {
                    let Op::Param(ri) = prog.node(ops[readout]).op else {
                        return Err(bug(Some(out), "a readout that is not a parameter"));
                    };
                    let xid = ops[vector];
                    let Val::Vector(x) = &vals[xid.index()] else {
                        return Err(bug(Some(out), "a readout of a non-vector"));
                    };
                    let s = &sampled[ri];
                    let wcol = s.w.column(0);
                    let mut g = DMatrix::zeros(n, 1);
                    let d = std::sync::Arc::make_mut(
                        delta[xid.index()]
                            .get_or_insert_with(|| std::sync::Arc::new(DMatrix::zeros(n, p))),
                    );
                    for pp in 0..p {
                        let k = chi[(oi, pp)] * coef * s.mult;
                        if k == 0.0 {
                            continue;
                        }
                        // ∂L/∂w += χ·coef·mult·x;  ∂L/∂x += χ·coef·mult·w.
                        g.column_mut(0).axpy(k, &x.column(col(x, pp)), 1.0);
                        d.column_mut(pp).axpy(k, &wcol, 1.0);
                    }
                    grads[ri].push(Grad::Dense(g));
                }
                OutTerm::Scalar { coef, param } => {
                    let Op::Param(bi) = prog.node(ops[param]).op else {
                        return Err(bug(Some(out), "a scalar term that is not a parameter"));
                    };
                    let k: f64 = (0..p).map(|pp| chi[(oi, pp)]).sum::<f64>() * coef;
                    let g = DMatrix::from_element(1, 1, k * sampled[bi].mult);
                    grads[bi].push(Grad::Dense(g));
                }
            }
        }
    }

    backward(plan, n, sampled, &vals, &mut delta, p, draw, None)?;

    for (pi, prm) in prog.params.iter().enumerate() {
        let mult = sampled[pi].mult;
        match prm.shape {
            Shape::Readout | Shape::Scalar => {}
            Shape::Vector => {
                // The node's value is mult·w: ∂L/∂w = mult Σ_points δ.
                if let Some(d) = &delta[prm.node.index()] {
                    let mut g = DMatrix::zeros(n, 1);
                    for k in 0..d.ncols() {
                        g.column_mut(0).axpy(mult, &d.column(k), 1.0);
                    }
                    grads[pi].push(Grad::Dense(g));
                }
            }
            Shape::Hidden | Shape::Input(_) => {
                for u in prog.users(prm.node) {
                    let Op::MatMul { transpose } = prog.node(u).op else {
                        continue;
                    };
                    let Some(dy) = &delta[u.index()] else {
                        continue; // this use does not reach the loss
                    };
                    let arg = plan.operands[u.index()][1];
                    if let Some(x) = plan.inputs.get(&arg) {
                        // y = mult·U ξ: ∂L/∂U = mult Σ_p δ_p ξ_pᵀ = mult·Δ·X (X is P×d).
                        grads[pi].push(Grad::Outer((**dy).clone(), x.clone(), Trans::No));
                    } else if let Val::Vector(x) = &vals[arg.index()] {
                        let xe = DMatrix::from_fn(n, p, |r, k| x[(r, col(x, k))]);
                        if transpose {
                            // y = mult·Wᵀ x: ∂L/∂W = mult Σ_p x_p δ_pᵀ.
                            grads[pi].push(Grad::Outer(xe, (**dy).clone(), Trans::Yes));
                        } else {
                            // y = mult·W x: ∂L/∂W = mult Σ_p δ_p x_pᵀ.
                            grads[pi].push(Grad::Outer((**dy).clone(), xe, Trans::Yes));
                        }
                    } else {
                        return Err(bug(Some(u), "a product of a non-vector"));
                    }
                }
            }
        }
    }
    Ok(grads)
}

/// Trains draw `draw` of `cfg.seed` at width `cfg.width` (`cfg.seeds` is ignored) and
/// returns f_t on `eval_points`: (steps+1) × O·P, output-major. The parameters are
/// sampled exactly as [`super::exec::run`] samples draw `draw`, so row 0 is that
/// draw's untrained output.
pub fn train_one(
    prog: &Program,
    eval_points: &[Vec<f64>],
    cfg: &RunConfig,
    draw: usize,
) -> Result<Trajectory, RunError> {
    let trainer = Trainer::new(prog, eval_points)?;
    let mut ws = sample_params(prog, cfg.width, cfg.seed, draw)?;
    trainer.run(cfg.width, &mut ws, draw, &mut |_, _, _| {})
}

/// The training loss L at the trainable values `ws` (shaped as [`sample_params`]
/// shapes them) at width `n`.
pub fn loss_at(prog: &Program, n: usize, ws: &[DMatrix<f64>]) -> Result<f64, RunError> {
    let trainer = Trainer::new(prog, &[])?;
    let sampled = sampled_of(prog, n, ws)?;
    let vals = forward(&trainer.tplan, n, &sampled, 0)?;
    let f = outputs(&trainer.tplan, n, &sampled, &vals, 0)?;
    Ok(trainer.loss(&f))
}

/// One full-batch gradient-descent step on `ws` in place at width `n`:
/// `w ← w − lr · lr_mult(n) · ∂L/∂w` for every parameter (with another `optimizer`,
/// its first step from a fresh state on step 0's minibatch).
pub fn gd_step(prog: &Program, n: usize, ws: &mut [DMatrix<f64>]) -> Result<(), RunError> {
    let trainer = Trainer::new(prog, &[])?;
    let sampled = sampled_of(prog, n, ws)?;
    let vals = forward(&trainer.tplan, n, &sampled, 0)?;
    let f = outputs(&trainer.tplan, n, &sampled, &vals, 0)?;
    let chi = trainer.chi(&f, 0);
    let grads = gradients(&trainer.tplan, n, &sampled, vals, &chi, 0)?;
    drop(sampled);
    trainer.apply(n, ws, grads, &mut OptState::default())
}

/// For a coordinate check: trains draw `draw` of `cfg.seed` at width `cfg.width`
/// (`cfg.seeds` is ignored) and returns, for every step t = 0..steps, the
/// root-mean-square coordinate size of every vector node of the IR at the training
/// inputs (RMS over the N coordinates and the points) and of its change since
/// initialization, and f_t with |f_t| and |f_t − f_0| (RMS over outputs and training
/// inputs). In muP every entry stays Θ(1) as the width grows
/// (theory.md §5.3); in SP with a width-independent learning rate the entries after
/// step 1 grow with it (theory.md §5.2).
pub fn coord_sizes(prog: &Program, cfg: &RunConfig, draw: usize) -> Result<CoordSizes, RunError> {
    let trainer = Trainer::new(prog, &[])?;
    // Vectors, and moments (RMS over the points; the coordinate check measures logits).
    let nodes: Vec<NodeId> = prog
        .ids()
        .filter(|&id| matches!(prog.ty(id), Ty::Vector | Ty::Moment))
        .collect();
    let labels = nodes.iter().map(|&id| trainer.tplan.label(id)).collect();
    let mut ws = sample_params(prog, cfg.width, cfg.seed, draw)?;
    let mut rms = Vec::new();
    let mut change = Vec::new();
    let mut fs: Vec<Vec<f64>> = Vec::new();
    let mut f_abs = Vec::new();
    let mut f_change = Vec::new();
    // The vectors at initialization, for the change since then.
    let mut x0: Vec<Option<Vec<f64>>> = Vec::new();
    // Squares of values near MAX_VALUE overflow: sum (v/s)² with s a power of two
    // above the largest |v| when that exceeds 2^500 (exact; the plain sum otherwise).
    let root_mean_square = |it: &mut dyn Iterator<Item = f64>| {
        let v: Vec<f64> = it.collect();
        let top = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let scale = if top > 2f64.powi(500) && top.is_finite() {
            f64::from_bits(top.to_bits() & 0x7ff0_0000_0000_0000)
        } else {
            1.0
        };
        let mut s = 0.0;
        for x in &v {
            let x = x / scale;
            s += x * x;
        }
        scale * (s / v.len().max(1) as f64).sqrt()
    };
    trainer.run(cfg.width, &mut ws, draw, &mut |t, vals, f| {
        if t == 0 {
            x0 = nodes
                .iter()
                .map(|id| match &vals[id.index()] {
                    Val::Vector(m) => Some(m.as_slice().to_vec()),
                    Val::Scalar(v) => Some(v.clone()),
                    Val::None => None,
                })
                .collect();
        }
        let mut size = Vec::with_capacity(nodes.len());
        let mut moved = Vec::with_capacity(nodes.len());
        for (id, m0) in nodes.iter().zip(&x0) {
            let now: Option<&[f64]> = match &vals[id.index()] {
                Val::Vector(m) => Some(m.as_slice()),
                Val::Scalar(v) => Some(v),
                Val::None => None,
            };
            match (now, m0) {
                (Some(m), Some(m0)) if m.len() == m0.len() => {
                    size.push(root_mean_square(&mut m.iter().copied()));
                    moved.push(root_mean_square(
                        &mut m.iter().zip(m0.iter()).map(|(a, b)| a - b),
                    ));
                }
                _ => {
                    size.push(f64::NAN);
                    moved.push(f64::NAN);
                }
            }
        }
        rms.push(size);
        change.push(moved);
        // Output-major over the training columns.
        let row: Vec<f64> = (0..f.nrows())
            .flat_map(|oi| (0..f.ncols()).map(move |p| f[(oi, p)]))
            .collect();
        f_abs.push(root_mean_square(&mut row.iter().copied()));
        let first = fs.first().unwrap_or(&row);
        f_change.push(root_mean_square(
            &mut row.iter().zip(first).map(|(a, b)| a - b),
        ));
        fs.push(row);
    })?;
    Ok(CoordSizes {
        nodes,
        labels,
        rms,
        change,
        f: fs,
        f_abs,
        f_change,
    })
}

/// `tpc run`'s training result from the means and standard errors of f_t over draws.
pub(super) fn summarize(train: &Train, f_t: Estimate, peaks: Peaks) -> TrainResult {
    TrainResult {
        loss: train.loss,
        lr: train.lr,
        steps: train.steps,
        optimizer: train.describe(),
        plain_sgd: train.is_plain_sgd(),
        optim: train.optimizer,
        weight_decay: train.weight_decay,
        batch: train.batch.min(train.data.len()),
        f_t,
        peak: peaks.0,
    }
}
