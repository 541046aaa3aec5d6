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
//!   [`Expr::eval`], a `Moment` is the mean over the N coordinates, per point (Netsor+,
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

use std::collections::HashMap;

use nalgebra::DMatrix;
use rayon::prelude::*;

use super::linalg::{gemm, matmul_tn, Trans};
use super::sample::{fill_normal_matrix, normal_matrix, StreamKey};
use crate::ir::{Expr, NodeId, Op, OutTerm, Program, Shape};

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct RunConfig {
    /// The width N.
    pub width: usize,
    /// The number of independent draws K.
    pub seeds: usize,
    /// The run's seed S.
    pub seed: u64,
}

/// How hidden-matrix products are computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Engine {
    /// Sample every N×N hidden matrix and multiply (exact NTK).
    #[default]
    Dense,
    /// Draw each hidden product from its law conditioned on the products drawn so far
    /// ([`super::cond`]): O(N·k) memory, no NTK.
    Conditional,
}

/// The products of hidden matrices, as the forward pass asks for them: `mult·W x` (or
/// `mult·Wᵀ x`) for hidden parameter `pi` on the N×c block `x`.
pub(super) trait HiddenProducts {
    fn product(
        &mut self,
        pi: usize,
        transpose: bool,
        x: &DMatrix<f64>,
    ) -> Result<DMatrix<f64>, RunError>;
}

/// Why a run could not be done (or gave a non-finite number), against the node
/// responsible when there is one.
#[derive(Clone, Debug)]
pub struct RunError {
    pub node: Option<NodeId>,
    pub message: String,
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RunError {}

pub(super) fn bug(node: Option<NodeId>, message: impl Into<String>) -> RunError {
    RunError {
        node,
        message: message.into(),
    }
}

/// The numbers of one draw.
#[derive(Clone, Debug)]
pub struct Draw {
    /// Outputs, O×P.
    pub f: DMatrix<f64>,
    /// Conditional NNGP, O·P × O·P, output-major.
    pub nngp: DMatrix<f64>,
    /// Empirical NTK, O·P × O·P, output-major, lr-weighted (language.md, Training).
    pub ntk: DMatrix<f64>,
    /// Each observe: one value per point, or one value when it depends on no input.
    pub observe: Vec<Vec<f64>>,
}

/// A mean over draws and its standard error (`None` with a single draw).
#[derive(Clone, Debug)]
pub struct Estimate {
    pub mean: DMatrix<f64>,
    pub se: Option<DMatrix<f64>>,
}

/// Everything `tpc run` reports (cli.md's `run` JSON).
#[derive(Clone, Debug)]
pub struct RunResult {
    pub outputs: Vec<String>,
    /// The points as read; empty for a program without inputs.
    pub points: Vec<Vec<f64>>,
    pub width: usize,
    pub seeds: usize,
    pub seed: u64,
    /// Outputs, O×P.
    pub f: Estimate,
    pub nngp: Estimate,
    pub ntk: Estimate,
    /// Each observe by name: a 1×c estimate (c = P, or 1 when it depends on no input).
    pub observe: Vec<(String, Estimate)>,
    /// With a `train` block: the trajectory f_t on the points ([`super::train`]).
    pub train: Option<super::train::TrainResult>,
    /// Why there is no NTK (the conditional engine); `ntk` is then zero.
    pub ntk_note: Option<String>,
}

/// The per-program facts every draw needs, computed once.
pub(super) struct Plan<'a> {
    pub(super) prog: &'a Program,
    /// Points (at least one; an empty one for a program without inputs).
    pub(super) p: usize,
    pub(super) o: usize,
    /// Node's value depends on no input point: stored as one column, broadcast.
    pub(super) shared: Vec<bool>,
    /// Partial derivatives of each Nonlin/Moment expression, by operand slot.
    derivs: Vec<Vec<Expr>>,
    /// P×d values of every `Input` node.
    pub(super) inputs: HashMap<NodeId, DMatrix<f64>>,
    /// Operands of every node (read once from the graph).
    pub(super) operands: Vec<Vec<NodeId>>,
}

/// A forward value.
#[derive(Clone, Debug)]
pub(super) enum Val {
    /// Matrices (held in `Sampled`), outputs, unused slots.
    None,
    /// A width-n vector: N×c, c = P or 1 (broadcast).
    Vector(DMatrix<f64>),
    /// A moment: c values, c = P or 1.
    Scalar(Vec<f64>),
}

/// A sampled parameter: the trainable `w` and its multiplier.
pub(super) struct Sampled<'w> {
    pub(super) w: &'w DMatrix<f64>,
    pub(super) mult: f64,
}

impl<'a> Plan<'a> {
    pub(super) fn new(prog: &'a Program, points: &[Vec<f64>]) -> Result<Plan<'a>, RunError> {
        let p = points.len().max(1);
        let o = prog.outputs.len();
        let mut offsets = Vec::new();
        let mut off = 0;
        for d in &prog.inputs {
            offsets.push(off);
            off += d.row_len();
        }
        let mut shared = vec![true; prog.len()];
        let mut derivs = vec![Vec::new(); prog.len()];
        let mut inputs = HashMap::new();
        let mut operands = Vec::with_capacity(prog.len());
        for id in prog.ids() {
            let ops = prog.operands(id);
            let any_point = ops.iter().any(|a| !shared[a.index()]);
            shared[id.index()] = match &prog.node(id).op {
                Op::Input { input, time } => {
                    let d = prog.inputs[*input].dim;
                    let base = offsets[*input] + (time.unwrap_or(1) - 1) * d;
                    let m = DMatrix::from_fn(p, d, |i, j| {
                        points
                            .get(i)
                            .and_then(|r| r.get(base + j))
                            .copied()
                            .unwrap_or(0.0)
                    });
                    inputs.insert(id, m);
                    false
                }
                Op::Param(_) => true,
                Op::MatMul { .. } | Op::Output { .. } => !any_point,
                Op::Nonlin(e) | Op::Moment(e) | Op::Scalar(e) => {
                    derivs[id.index()] = (0..ops.len()).map(|i| e.diff(i)).collect();
                    !any_point
                }
            };
            operands.push(ops);
        }
        if prog.inputs.is_empty() && points.len() > 1 {
            return Err(bug(None, "a program without inputs runs on one point"));
        }
        Ok(Plan {
            prog,
            p,
            o,
            shared,
            derivs,
            inputs,
            operands,
        })
    }

    pub(super) fn label(&self, id: NodeId) -> String {
        let prog = self.prog;
        match &prog.node(id).name {
            Some(n) => n.clone(),
            None => {
                // An unnamed intermediate: say what it computes.
                let ops = &self.operands[id.index()];
                match &prog.node(id).op {
                    Op::MatMul { transpose } => format!(
                        "the product {}{} @ {}",
                        prog.label(ops[0]),
                        if *transpose { ".T" } else { "" },
                        prog.label(ops[1])
                    ),
                    _ => prog.label(id),
                }
            }
        }
    }

    pub(super) fn nonfinite(&self, id: NodeId, n: usize, draw: usize, what: &str) -> RunError {
        RunError {
            node: Some(id),
            message: format!(
                "{} {what} at width {n} (draw {draw}): a value is infinite or NaN",
                self.label(id)
            ),
        }
    }
}

/// Column of a forward block for point `p` (a broadcast block has one column).
#[inline]
pub(super) fn col(m: &DMatrix<f64>, p: usize) -> usize {
    if m.ncols() == 1 {
        0
    } else {
        p
    }
}

/// Where an expression operand comes from at one point.
enum Src<'v> {
    Col(&'v [f64]),
    Const(f64),
}

/// The operand sources of a Nonlin/Moment at point `p`.
fn sources<'v>(vals: &'v [Val], ops: &[NodeId], p: usize) -> Option<Vec<Src<'v>>> {
    ops.iter()
        .map(|a| match &vals[a.index()] {
            Val::Vector(m) => {
                let c = col(m, p);
                let n = m.nrows();
                Some(Src::Col(&m.as_slice()[c * n..(c + 1) * n]))
            }
            Val::Scalar(s) => Some(Src::Const(if s.len() == 1 { s[0] } else { s[p] })),
            Val::None => None,
        })
        .collect()
}

/// `e` at every coordinate of point `p`, into `out` (length N).
fn eval_column(e: &Expr, src: &[Src<'_>], out: &mut [f64]) {
    let mut args = vec![0.0; src.len()];
    for (a, o) in out.iter_mut().enumerate() {
        for (slot, s) in args.iter_mut().zip(src) {
            *slot = match s {
                Src::Col(c) => c[a],
                Src::Const(v) => *v,
            };
        }
        *o = e.eval(&args);
    }
}

/// The values of `e` over all points: N×c.
fn eval_block(e: &Expr, vals: &[Val], ops: &[NodeId], n: usize, c: usize) -> Option<DMatrix<f64>> {
    let mut out = DMatrix::zeros(n, c);
    for p in 0..c {
        let src = sources(vals, ops, p)?;
        let slice = &mut out.as_mut_slice()[p * n..(p + 1) * n];
        eval_column(e, &src, slice);
    }
    Some(out)
}

/// How a parameter's `w` is stored at width `n`; a readout is a column (f = w · x).
pub(super) fn stored_shape(shape: Shape, n: usize) -> (usize, usize) {
    match shape {
        Shape::Hidden => (n, n),
        Shape::Input(d) => (n, d),
        Shape::Readout | Shape::Vector => (n, 1),
        Shape::Scalar => (1, 1),
    }
}

/// Samples every parameter's trainable `w` for draw `draw` of seed `seed` at width `n`:
/// parameter `i` from stream `StreamKey(seed, draw, i)`, entries N(0, var(n)).
/// Shapes: hidden N×N, input N×d, readout and vector N×1, scalar 1×1.
pub fn sample_params(
    prog: &Program,
    n: usize,
    seed: u64,
    draw: usize,
) -> Result<Vec<DMatrix<f64>>, RunError> {
    let nf = n as f64;
    prog.params
        .iter()
        .enumerate()
        .map(|(i, prm)| {
            let (rows, cols) = stored_shape(prm.shape, n);
            let std = prm.law.var.at(nf).max(0.0).sqrt();
            normal_matrix(rows, cols, std, StreamKey::new(seed, draw as u64, i as u64))
                .map_err(|e| bug(Some(prm.node), format!("cannot sample {}: {e}", prm.name)))
        })
        .collect()
}

/// [`sample_params`] into buffers kept from an earlier draw (same program and width),
/// so that a long run does not pay the kernel's page zeroing for every draw.
pub(super) fn sample_params_into(
    prog: &Program,
    n: usize,
    seed: u64,
    draw: usize,
    ws: &mut Vec<DMatrix<f64>>,
) -> Result<(), RunError> {
    if ws.len() != prog.params.len() {
        *ws = sample_params(prog, n, seed, draw)?;
        return Ok(());
    }
    for (i, (w, prm)) in ws.iter_mut().zip(&prog.params).enumerate() {
        let std = prm.law.var.at(n as f64).max(0.0).sqrt();
        fill_normal_matrix(w, std, StreamKey::new(seed, draw as u64, i as u64))
            .map_err(|e| bug(Some(prm.node), format!("cannot sample {}: {e}", prm.name)))?;
    }
    Ok(())
}

/// Pairs each trainable value with its multiplier at width `n`, after checking that
/// `ws` has one value per parameter, shaped as [`sample_params`] shapes them.
pub(super) fn sampled_of<'w>(
    prog: &Program,
    n: usize,
    ws: &'w [DMatrix<f64>],
) -> Result<Vec<Sampled<'w>>, RunError> {
    if ws.len() != prog.params.len() {
        return Err(bug(None, "one value per parameter is needed"));
    }
    for (w, prm) in ws.iter().zip(&prog.params) {
        if w.shape() != stored_shape(prm.shape, n) {
            return Err(bug(
                Some(prm.node),
                format!(
                    "{} has shape {:?}, not the stored shape at width {n}",
                    prm.name,
                    w.shape()
                ),
            ));
        }
    }
    Ok(ws
        .iter()
        .zip(&prog.params)
        .map(|(w, prm)| Sampled {
            w,
            mult: prm.law.mult.at(n as f64),
        })
        .collect())
}

/// The forward pass: the value of every node on the plan's points (matrices, inputs
/// and outputs are `Val::None`; outputs are read out by the caller). A non-finite
/// value is an error naming its node; `draw` only labels error messages.
pub(super) fn forward(
    plan: &Plan<'_>,
    n: usize,
    sampled: &[Sampled<'_>],
    draw: usize,
) -> Result<Vec<Val>, RunError> {
    forward_with(plan, n, sampled, draw, None)
}

/// [`forward`], with hidden-matrix products from `engine` when given (the dense
/// `sampled` hidden matrices are then not read).
pub(super) fn forward_with(
    plan: &Plan<'_>,
    n: usize,
    sampled: &[Sampled<'_>],
    draw: usize,
    engine: Option<&mut dyn HiddenProducts>,
) -> Result<Vec<Val>, RunError> {
    forward_releasing(plan, n, sampled, draw, engine, None)
}

/// [`forward_with`] that drops each vector after its last use when `last_use` (the
/// index of the last node reading each node — its own index when nothing reads it —
/// or `usize::MAX` to keep it) is given:
/// unrolled training programs hold hundreds of width-N vectors, few of them live at
/// once. Dropped vectors are `Val::None` in the result; scalars are kept.
pub(super) fn forward_releasing(
    plan: &Plan<'_>,
    n: usize,
    sampled: &[Sampled<'_>],
    draw: usize,
    mut engine: Option<&mut dyn HiddenProducts>,
    last_use: Option<&[usize]>,
) -> Result<Vec<Val>, RunError> {
    let prog = plan.prog;
    let release = |vals: &mut [Val], ops: &[NodeId], id: NodeId| {
        if let Some(lu) = last_use {
            for a in ops.iter().chain(std::iter::once(&id)) {
                if lu[a.index()] == id.index() && matches!(vals[a.index()], Val::Vector(_)) {
                    vals[a.index()] = Val::None;
                }
            }
        }
    };
    let p = plan.p;
    let nf = n as f64;
    let mut vals: Vec<Val> = vec![Val::None; prog.len()];
    for id in prog.ids() {
        let ops = &plan.operands[id.index()];
        let c = if plan.shared[id.index()] { 1 } else { p };
        let v = match &prog.node(id).op {
            Op::Input { .. } | Op::Output { .. } => Val::None,
            Op::Param(pi) => match prog.params[*pi].shape {
                Shape::Vector => {
                    let s = &sampled[*pi];
                    Val::Vector(s.w * s.mult)
                }
                Shape::Scalar => {
                    let s = &sampled[*pi];
                    Val::Scalar(vec![s.w[(0, 0)] * s.mult])
                }
                _ => Val::None,
            },
            Op::MatMul { transpose } => {
                let Op::Param(pi) = prog.node(ops[0]).op else {
                    return Err(bug(Some(id), "a product whose matrix is not a parameter"));
                };
                if let (Some(e), Shape::Hidden) = (engine.as_deref_mut(), prog.params[pi].shape) {
                    let Val::Vector(x) = &vals[ops[1].index()] else {
                        return Err(bug(Some(id), "a product of a non-vector"));
                    };
                    let out = e.product(pi, *transpose, x).map_err(|e| RunError {
                        node: Some(id),
                        ..e
                    })?;
                    vals[id.index()] = Val::Vector(out);
                    if let Val::Vector(m) = &vals[id.index()] {
                        if !m.iter().all(|x| x.is_finite()) {
                            return Err(plan.nonfinite(id, n, draw, "overflows"));
                        }
                    }
                    release(&mut vals, ops, id);
                    continue;
                }
                let s = &sampled[pi];
                let mut out = DMatrix::zeros(n, c);
                let shape_err = |e| bug(Some(id), format!("internal shape error: {e}"));
                if let Some(x) = plan.inputs.get(&ops[1]) {
                    // U ξ for all points: U (N×d) times the P×d points, transposed.
                    if *transpose {
                        return Err(bug(Some(id), "an input layer used transposed"));
                    }
                    gemm(&mut out, s.mult, s.w, Trans::No, x, Trans::Yes, 0.0)
                        .map_err(shape_err)?;
                } else {
                    let Val::Vector(x) = &vals[ops[1].index()] else {
                        return Err(bug(Some(id), "a product of a non-vector"));
                    };
                    let t = if *transpose { Trans::Yes } else { Trans::No };
                    gemm(&mut out, s.mult, s.w, t, x, Trans::No, 0.0).map_err(shape_err)?;
                }
                Val::Vector(out)
            }
            Op::Nonlin(e) => Val::Vector(
                eval_block(e, &vals, ops, n, c)
                    .ok_or_else(|| bug(Some(id), "a coordinatewise function of a non-vector"))?,
            ),
            Op::Moment(e) => {
                let block = eval_block(e, &vals, ops, n, c)
                    .ok_or_else(|| bug(Some(id), "a moment of a non-vector"))?;
                // Mean over coordinates, summed in index order (deterministic).
                Val::Scalar(
                    (0..c)
                        .map(|j| block.column(j).iter().sum::<f64>() / nf)
                        .collect(),
                )
            }
            Op::Scalar(e) => {
                // A function of scalars only: one value per column.
                let mut out = Vec::with_capacity(c);
                for j in 0..c {
                    let mut args = Vec::with_capacity(ops.len());
                    for a in ops {
                        match &vals[a.index()] {
                            Val::Scalar(s) => args.push(if s.len() == 1 { s[0] } else { s[j] }),
                            _ => return Err(bug(Some(id), "a scalar function of a non-scalar")),
                        }
                    }
                    out.push(e.eval(&args));
                }
                Val::Scalar(out)
            }
        };
        let finite = match &v {
            Val::Vector(m) => m.iter().all(|x| x.is_finite()),
            Val::Scalar(s) => s.iter().all(|x| x.is_finite()),
            Val::None => true,
        };
        if !finite {
            return Err(plan.nonfinite(id, n, draw, "overflows"));
        }
        vals[id.index()] = v;
        release(&mut vals, ops, id);
    }

    Ok(vals)
}

/// The reverse pass. On entry `delta` holds the cotangents seeded at the outputs'
/// read-out vectors, each an N×`cols` block whose column k belongs to point `k % P`
/// (`cols` = O·P for per-(output, point) gradients, P for the gradient of a loss). On
/// return it holds the cotangent of every vector node the seeds reach: for a product
/// node `y = W x` this is ∂/∂y, from which the gradient of `W` is assembled.
pub(super) fn backward(
    plan: &Plan<'_>,
    n: usize,
    sampled: &[Sampled<'_>],
    vals: &[Val],
    delta: &mut [Option<DMatrix<f64>>],
    cols: usize,
    draw: usize,
) -> Result<(), RunError> {
    let prog = plan.prog;
    let p = plan.p;
    let nf = n as f64;
    let op_cols = cols;
    let mut mdelta: Vec<Option<Vec<f64>>> = vec![None; prog.len()];
    for id in prog.ids().collect::<Vec<_>>().into_iter().rev() {
        let ops = &plan.operands[id.index()];
        match &prog.node(id).op {
            Op::MatMul { transpose } => {
                if plan.inputs.contains_key(&ops[1]) {
                    continue; // inputs are data: nothing to propagate
                }
                let Some(dy) = delta[id.index()].take() else {
                    continue;
                };
                let Op::Param(pi) = prog.node(ops[0]).op else {
                    return Err(bug(Some(id), "a product whose matrix is not a parameter"));
                };
                let s = &sampled[pi];
                // y = mult·W x  ⇒  ∂/∂x = mult·Wᵀ δ;  y = mult·Wᵀ x  ⇒  mult·W δ.
                let t = if *transpose { Trans::No } else { Trans::Yes };
                let xi = ops[1].index();
                let (dx, beta) = match delta[xi].take() {
                    Some(d) => (d, 1.0),
                    None => (DMatrix::zeros(n, op_cols), 0.0),
                };
                let mut dx = dx;
                gemm(&mut dx, s.mult, s.w, t, &dy, Trans::No, beta)
                    .map_err(|e| bug(Some(id), format!("internal shape error: {e}")))?;
                delta[xi] = Some(dx);
                delta[id.index()] = Some(dy);
            }
            Op::Nonlin(_) => {
                let Some(dy) = delta[id.index()].take() else {
                    continue;
                };
                let c = if plan.shared[id.index()] { 1 } else { p };
                for (slot, de) in plan.derivs[id.index()].iter().enumerate() {
                    if matches!(de, Expr::Const(z) if *z == 0.0) {
                        continue;
                    }
                    let dv = eval_block(de, vals, ops, n, c)
                        .ok_or_else(|| bug(Some(id), "a derivative of a non-vector"))?;
                    let a = ops[slot].index();
                    match &vals[a] {
                        Val::Vector(_) => {
                            let d = delta[a].get_or_insert_with(|| DMatrix::zeros(n, op_cols));
                            for k in 0..op_cols {
                                let dc = dv.column(col(&dv, k % p));
                                let src = dy.column(k);
                                let mut dst = d.column_mut(k);
                                for r in 0..n {
                                    dst[r] += dc[r] * src[r];
                                }
                            }
                        }
                        Val::Scalar(_) => {
                            let d = mdelta[a].get_or_insert_with(|| vec![0.0; op_cols]);
                            for (k, dk) in d.iter_mut().enumerate() {
                                let dc = dv.column(col(&dv, k % p));
                                *dk += dc.dot(&dy.column(k));
                            }
                        }
                        Val::None => {}
                    }
                }
                delta[id.index()] = Some(dy);
            }
            Op::Moment(_) => {
                let Some(dm) = mdelta[id.index()].take() else {
                    continue;
                };
                let c = if plan.shared[id.index()] { 1 } else { p };
                for (slot, de) in plan.derivs[id.index()].iter().enumerate() {
                    if matches!(de, Expr::Const(z) if *z == 0.0) {
                        continue;
                    }
                    let dv = eval_block(de, vals, ops, n, c)
                        .ok_or_else(|| bug(Some(id), "a derivative of a non-vector"))?;
                    let a = ops[slot].index();
                    match &vals[a] {
                        // θ = (1/N) Σ ψ  ⇒  ∂θ/∂x_a = ψ_i'(a) / N.
                        Val::Vector(_) => {
                            let d = delta[a].get_or_insert_with(|| DMatrix::zeros(n, op_cols));
                            for (k, &g) in dm.iter().enumerate() {
                                let dc = dv.column(col(&dv, k % p));
                                d.column_mut(k).axpy(g / nf, &dc, 1.0);
                            }
                        }
                        Val::Scalar(_) => {
                            let d = mdelta[a].get_or_insert_with(|| vec![0.0; op_cols]);
                            for (k, dk) in d.iter_mut().enumerate() {
                                let dc = dv.column(col(&dv, k % p));
                                *dk += dm[k] * dc.sum() / nf;
                            }
                        }
                        Val::None => {}
                    }
                }
                mdelta[id.index()] = Some(dm);
            }
            _ => {}
        }
        if let Some(d) = &delta[id.index()] {
            if d.iter().any(|v| !v.is_finite()) {
                return Err(plan.nonfinite(id, n, draw, "has a gradient that overflows"));
            }
        }
    }

    Ok(())
}

/// Runs one draw on given trainable values `ws` (as [`sample_params`] shapes them):
/// forward, backward, kernels. `draw` only labels error messages.
fn run_draw(plan: &Plan<'_>, n: usize, ws: &[DMatrix<f64>], draw: usize) -> Result<Draw, RunError> {
    let sampled = sampled_of(plan.prog, n, ws)?;
    run_draw_with(plan, n, &sampled, draw, None)
}

/// [`run_draw`] on paired values, with hidden products from `engine` when given; the
/// NTK (which needs the reverse pass through the dense matrices) is then left zero.
fn run_draw_with(
    plan: &Plan<'_>,
    n: usize,
    sampled: &[Sampled<'_>],
    draw: usize,
    engine: Option<&mut dyn HiddenProducts>,
) -> Result<Draw, RunError> {
    let prog = plan.prog;
    let (p, o) = (plan.p, plan.o);
    let op_cols = o * p;
    let nf = n as f64;
    let with_ntk = engine.is_none();
    let vals = forward_with(plan, n, sampled, draw, engine)?;

    // ---- outputs ------------------------------------------------------------------
    let f = outputs(plan, n, sampled, &vals, draw)?;
    // Per readout parameter: H (N×OP), column (o,p) = sum of coef·x over o's terms
    // read by it. Per scalar parameter: g (OP), sum of coefs.
    let mut readout_h: Vec<Option<DMatrix<f64>>> = vec![None; prog.params.len()];
    let mut scalar_g: Vec<Option<Vec<f64>>> = vec![None; prog.params.len()];
    // Cotangents: N×OP per vector node, OP per moment.
    let mut delta: Vec<Option<DMatrix<f64>>> = vec![None; prog.len()];
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
                    let h = readout_h[ri].get_or_insert_with(|| DMatrix::zeros(n, op_cols));
                    let d = delta[xid.index()].get_or_insert_with(|| DMatrix::zeros(n, op_cols));
                    let wcol = s.w.column(0);
                    for pp in 0..p {
                        let xc = x.column(col(x, pp));
                        h.column_mut(oi * p + pp).axpy(coef, &xc, 1.0);
                        // ∂f/∂x = coef · mult · w.
                        d.column_mut(oi * p + pp).axpy(coef * s.mult, &wcol, 1.0);
                    }
                }
                OutTerm::Scalar { coef, param } => {
                    let Op::Param(bi) = prog.node(ops[param]).op else {
                        return Err(bug(Some(out), "a scalar term that is not a parameter"));
                    };
                    let g = scalar_g[bi].get_or_insert_with(|| vec![0.0; op_cols]);
                    for pp in 0..p {
                        g[oi * p + pp] += coef;
                    }
                }
            }
        }
    }

    if with_ntk {
        backward(plan, n, sampled, &vals, &mut delta, op_cols, draw)?;
    }

    // ---- kernels ------------------------------------------------------------------
    let mut nngp = DMatrix::zeros(op_cols, op_cols);
    let mut ntk = DMatrix::zeros(op_cols, op_cols);
    let gram_err = |e| bug(None, format!("internal shape error: {e}"));
    for (pi, prm) in prog.params.iter().enumerate() {
        let law = prm.law;
        let lr = law.lr.at(nf);
        let mult = sampled[pi].mult;
        if !with_ntk && !matches!(prm.shape, Shape::Readout | Shape::Scalar) {
            continue;
        }
        match prm.shape {
            Shape::Readout => {
                if let Some(h) = &readout_h[pi] {
                    let g = matmul_tn(h, h).map_err(gram_err)?;
                    // Cov(v·x, v·x' | x) = Var(v_a) x·x'; ∂f/∂w = mult·x.
                    nngp += &g * law.entry_var().at(nf);
                    if with_ntk {
                        ntk += &g * (lr * mult * mult);
                    }
                }
            }
            Shape::Scalar => {
                if let Some(g) = &scalar_g[pi] {
                    let gv = nalgebra::DVector::from_column_slice(g);
                    let outer = &gv * gv.transpose();
                    nngp += &outer * law.entry_var().at(nf);
                    if with_ntk {
                        ntk += &outer * (lr * mult * mult);
                    }
                }
            }
            Shape::Vector => {
                if let Some(d) = &delta[prm.node.index()] {
                    let g = matmul_tn(d, d).map_err(gram_err)?;
                    ntk += &g * (lr * mult * mult);
                }
            }
            Shape::Hidden | Shape::Input(_) => {
                // Each use i contributes mult·(a_i ⊗ b_i) to ∂f/∂w for every (o,p)
                // column: (δ_y, x) for W x, (x, δ_y) for Wᵀ x, (δ_y, ξ) for U ξ.
                let mut a_blocks: Vec<DMatrix<f64>> = Vec::new();
                let mut b_blocks: Vec<DMatrix<f64>> = Vec::new();
                for u in prog.users(prm.node) {
                    let Op::MatMul { transpose } = prog.node(u).op else {
                        continue;
                    };
                    let Some(dy) = &delta[u.index()] else {
                        continue; // this use does not reach any output
                    };
                    let arg = plan.operands[u.index()][1];
                    let xe = if let Some(x) = plan.inputs.get(&arg) {
                        // d×OP: column (o,p) is the point ξ_p.
                        DMatrix::from_fn(x.ncols(), op_cols, |r, k| x[(k % p, r)])
                    } else if let Val::Vector(x) = &vals[arg.index()] {
                        DMatrix::from_fn(n, op_cols, |r, k| x[(r, col(x, k % p))])
                    } else {
                        return Err(bug(Some(u), "a product of a non-vector"));
                    };
                    if transpose {
                        a_blocks.push(xe);
                        b_blocks.push(dy.clone());
                    } else {
                        a_blocks.push(dy.clone());
                        b_blocks.push(xe);
                    }
                }
                if a_blocks.is_empty() {
                    continue;
                }
                let ga = stacked_gram(&a_blocks).map_err(gram_err)?;
                let gb = stacked_gram(&b_blocks).map_err(gram_err)?;
                let uses = a_blocks.len();
                let scale = lr * mult * mult;
                for i in 0..uses {
                    for j in 0..uses {
                        let bi = ga.view((i * op_cols, j * op_cols), (op_cols, op_cols));
                        let bj = gb.view((i * op_cols, j * op_cols), (op_cols, op_cols));
                        ntk += bi.component_mul(&bj) * scale;
                    }
                }
            }
        }
    }
    if nngp.iter().any(|v| !v.is_finite()) || ntk.iter().any(|v| !v.is_finite()) {
        let last = prog.outputs.first().copied();
        return Err(RunError {
            node: last,
            message: format!(
                "the kernels overflow at width {n} (draw {draw}): a value is infinite or NaN"
            ),
        });
    }

    let observe = prog
        .observes
        .iter()
        .map(|m| match &vals[m.index()] {
            Val::Scalar(s) => s.clone(),
            _ => Vec::new(),
        })
        .collect();
    Ok(Draw {
        f,
        nngp,
        ntk,
        observe,
    })
}

/// Gram matrix of blocks stacked side by side: `[A_1 … A_U]ᵀ [A_1 … A_U]`.
fn stacked_gram(blocks: &[DMatrix<f64>]) -> Result<DMatrix<f64>, super::linalg::ShapeError> {
    let rows = blocks[0].nrows();
    let w = blocks[0].ncols();
    let mut s = DMatrix::zeros(rows, w * blocks.len());
    for (i, b) in blocks.iter().enumerate() {
        s.columns_mut(i * w, w).copy_from(b);
    }
    matmul_tn(&s, &s)
}

/// Bytes one draw needs at width `n` with `p` points (an upper bound on the buffers
/// of [`run_draw`]): the parameters, every vector's N×P block and N×(O·P) cotangent,
/// and the stacked Gram operands of the largest matrix.
pub fn draw_bytes(prog: &Program, n: usize, p: usize) -> u128 {
    let (n, p) = (n as u128, p.max(1) as u128);
    let o = prog.outputs.len().max(1) as u128;
    let mut words: u128 = 0;
    for prm in &prog.params {
        words += match prm.shape {
            Shape::Hidden => n * n,
            Shape::Input(d) => n * d as u128,
            Shape::Readout | Shape::Vector => 2 * n + n * o * p,
            Shape::Scalar => 1,
        };
    }
    let mut biggest_uses: u128 = 0;
    for id in prog.ids() {
        match &prog.node(id).op {
            Op::MatMul { .. } | Op::Nonlin(_) => words += n * p + n * o * p,
            _ => {}
        }
        if let Some(prm) = prog.param_of(id) {
            if prm.shape.is_matrix() {
                biggest_uses = biggest_uses.max(prog.users(id).len() as u128);
            }
        }
    }
    // Stacked Gram operands (A and B with their blocks), and a derivative block.
    words += 4 * n * biggest_uses * o * p + n * p;
    8 * words
}

pub use crate::machine::mem_available;

/// Refuses a run that cannot fit in memory, naming the largest width that would.
pub(super) fn check_memory(prog: &Program, cfg: &RunConfig, p: usize) -> Result<(), RunError> {
    let Some(avail) = mem_available() else {
        return Ok(());
    };
    let need = draw_bytes(prog, cfg.width, p);
    if need <= avail {
        return Ok(());
    }
    let (mut lo, mut hi) = (0usize, cfg.width);
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if draw_bytes(prog, mid, p) <= avail {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
    Err(RunError {
        node: None,
        message: format!(
            "width {} needs about {:.1} GiB per draw but {:.1} GiB is available; the largest width that fits is {lo}",
            cfg.width,
            gib(need),
            gib(avail)
        ),
    })
}

/// How many draws to hold in memory at once: one per thread when they fit, else one
/// (whose products still use every thread).
pub(super) fn concurrency(prog: &Program, cfg: &RunConfig, p: usize) -> usize {
    let threads = rayon::current_num_threads().max(1).min(cfg.seeds.max(1));
    let avail = mem_available().unwrap_or(u128::MAX);
    let per = draw_bytes(prog, cfg.width, p);
    // Leave a quarter of the memory free for everything else.
    let fit = (avail / 4 * 3) / per.max(1);
    (fit.min(threads as u128) as usize).max(1)
}

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
    let points: Vec<Vec<f64>> = if prog.inputs.is_empty() {
        vec![vec![]]
    } else {
        points.to_vec()
    };
    let plan = Plan::new(prog, &points)?;
    cond_draw(&plan, width, seed, draw)
}

/// Every parameter but the hidden matrices (left 0×0: the conditional engine draws
/// their products), sampled exactly as [`sample_params`] samples them.
pub(super) fn sample_non_hidden(
    prog: &Program,
    n: usize,
    seed: u64,
    draw: usize,
) -> Result<Vec<DMatrix<f64>>, RunError> {
    let nf = n as f64;
    prog.params
        .iter()
        .enumerate()
        .map(|(i, prm)| {
            if prm.shape == Shape::Hidden {
                return Ok(DMatrix::zeros(0, 0));
            }
            let (rows, cols) = stored_shape(prm.shape, n);
            let std = prm.law.var.at(nf).max(0.0).sqrt();
            normal_matrix(rows, cols, std, StreamKey::new(seed, draw as u64, i as u64))
                .map_err(|e| bug(Some(prm.node), format!("cannot sample {}: {e}", prm.name)))
        })
        .collect()
}

/// Pairs each value with its parameter's multiplier at width `n`, unchecked (hidden
/// matrices may be 0×0 placeholders of the conditional engine).
pub(super) fn with_mults<'w>(prog: &Program, n: usize, ws: &'w [DMatrix<f64>]) -> Vec<Sampled<'w>> {
    ws.iter()
        .zip(&prog.params)
        .map(|(w, prm)| Sampled {
            w,
            mult: prm.law.mult.at(n as f64),
        })
        .collect()
}

fn cond_draw(plan: &Plan<'_>, n: usize, seed: u64, draw: usize) -> Result<Draw, RunError> {
    let prog = plan.prog;
    let ws = sample_non_hidden(prog, n, seed, draw)?;
    let sampled = with_mults(prog, n, &ws);
    let mut engine = super::cond::CondEngine::new(prog, n, seed, draw);
    run_draw_with(plan, n, &sampled, draw, Some(&mut engine))
}

/// [`run`] with a choice of engine for the hidden-matrix products.
pub fn run_engine(
    prog: &Program,
    points: &[Vec<f64>],
    cfg: &RunConfig,
    engine: Engine,
    progress: &(dyn Fn() + Sync),
) -> Result<RunResult, RunError> {
    if engine == Engine::Conditional {
        return run_conditional(prog, points, cfg, progress);
    }
    if cfg.width == 0 {
        return Err(bug(None, "the width must be at least 1"));
    }
    if cfg.seeds == 0 {
        return Err(bug(None, "at least one draw (--seeds 1) is needed"));
    }
    let points: Vec<Vec<f64>> = if prog.inputs.is_empty() {
        vec![vec![]]
    } else {
        points.to_vec()
    };
    let plan = Plan::new(prog, &points)?;
    check_memory(prog, cfg, plan.p)?;
    let at_once = concurrency(prog, cfg, plan.p);
    let trainer = match prog.train {
        Some(_) => Some(super::train::Trainer::new(prog, &points)?),
        None => None,
    };
    let mut draws: Vec<Draw> = Vec::with_capacity(cfg.seeds);
    let mut trajs: Vec<super::train::Trajectory> = Vec::new();
    let ids: Vec<usize> = (0..cfg.seeds).collect();
    // One parameter buffer set per concurrent draw, refilled in place draw after draw.
    let mut buffers: Vec<Vec<DMatrix<f64>>> = vec![Vec::new(); at_once];
    for chunk in ids.chunks(at_once) {
        type Got = (Draw, Option<super::train::Trajectory>);
        let got: Vec<Result<Got, RunError>> = chunk
            .par_iter()
            .zip(buffers.par_iter_mut())
            .map(|(&k, ws)| {
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
            draws.push(d);
            trajs.extend(traj);
        }
    }
    let train = prog
        .train
        .as_ref()
        .map(|t| super::train::summarize(t, &trajs));
    Ok(summarize_draws(prog, points, cfg, &draws, train, None))
}

/// Means and standard errors over the draws, as cli.md's `run` result (both engines).
fn summarize_draws(
    prog: &Program,
    points: Vec<Vec<f64>>,
    cfg: &RunConfig,
    draws: &[Draw],
    train: Option<super::train::TrainResult>,
    ntk_note: Option<String>,
) -> RunResult {
    let est = |get: &dyn Fn(&Draw) -> DMatrix<f64>| estimate(draws, get);
    let observe = prog
        .observes
        .iter()
        .enumerate()
        .map(|(i, &m)| {
            let e = est(&|d| DMatrix::from_row_slice(1, d.observe[i].len(), &d.observe[i]));
            (prog.label(m), e)
        })
        .collect();
    RunResult {
        outputs: prog.output_names(),
        points: if prog.inputs.is_empty() {
            Vec::new()
        } else {
            points
        },
        width: cfg.width,
        seeds: cfg.seeds,
        seed: cfg.seed,
        f: est(&|d| d.f.clone()),
        nngp: est(&|d| d.nngp.clone()),
        ntk: est(&|d| d.ntk.clone()),
        observe,
        train,
        ntk_note,
    }
}

/// The outputs O×P from the forward values: the one place outputs are summed, so the
/// NTK run, training (f_0 equals `tpc run`'s outputs bit for bit) and both engines agree.
pub(super) fn outputs(
    plan: &Plan<'_>,
    n: usize,
    sampled: &[Sampled<'_>],
    vals: &[Val],
    draw: usize,
) -> Result<DMatrix<f64>, RunError> {
    let prog = plan.prog;
    let (p, o) = (plan.p, plan.o);
    let mut f = DMatrix::zeros(o, p);
    for (oi, &out) in prog.outputs.iter().enumerate() {
        let Op::Output { terms, constant } = &prog.node(out).op else {
            return Err(bug(Some(out), "an output that is not an Output"));
        };
        let ops = &plan.operands[out.index()];
        for pp in 0..p {
            f[(oi, pp)] = *constant;
        }
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
                    let Val::Vector(x) = &vals[ops[vector].index()] else {
                        return Err(bug(Some(out), "a readout of a non-vector"));
                    };
                    let s = &sampled[ri];
                    let wcol = s.w.column(0);
                    for pp in 0..p {
                        let xc = x.column(col(x, pp));
                        f[(oi, pp)] += coef * s.mult * wcol.dot(&xc);
                    }
                }
                OutTerm::Scalar { coef, param } => {
                    let Op::Param(bi) = prog.node(ops[param]).op else {
                        return Err(bug(Some(out), "a scalar term that is not a parameter"));
                    };
                    let s = &sampled[bi];
                    for pp in 0..p {
                        f[(oi, pp)] += coef * s.mult * s.w[(0, 0)];
                    }
                }
            }
        }
        if f.row(oi).iter().any(|v| !v.is_finite()) {
            return Err(plan.nonfinite(out, n, draw, "overflows"));
        }
    }
    Ok(f)
}

/// [`run`] with the conditional engine: no N×N matrix is ever formed; no NTK.
fn run_conditional(
    prog: &Program,
    points: &[Vec<f64>],
    cfg: &RunConfig,
    progress: &(dyn Fn() + Sync),
) -> Result<RunResult, RunError> {
    if cfg.width == 0 {
        return Err(bug(None, "the width must be at least 1"));
    }
    if cfg.seeds == 0 {
        return Err(bug(None, "at least one draw (--seeds 1) is needed"));
    }
    let points: Vec<Vec<f64>> = if prog.inputs.is_empty() {
        vec![vec![]]
    } else {
        points.to_vec()
    };
    let plan = Plan::new(prog, &points)?;
    let ids: Vec<usize> = (0..cfg.seeds).collect();
    let got: Vec<Result<Draw, RunError>> = ids
        .par_iter()
        .map(|&k| {
            let d = cond_draw(&plan, cfg.width, cfg.seed, k);
            progress();
            d
        })
        .collect();
    let draws: Vec<Draw> = got.into_iter().collect::<Result<_, _>>()?;
    // Training runs the unrolled program (crate::autodiff): only initial matrices, so
    // the conditional sampler answers every product of every step.
    let train = match &prog.train {
        Some(t) => {
            let run = super::unrolled::UnrolledRun::new(prog, &points, cfg.width)?;
            let trajs: Vec<super::train::Trajectory> = ids
                .par_iter()
                .map(|&k| run.run(cfg.seed, k, Engine::Conditional))
                .collect::<Result<_, _>>()?;
            Some(super::train::summarize(t, &trajs))
        }
        None => None,
    };
    let note = "not computed by the conditional engine (no reverse pass through hidden matrices); use --engine dense";
    Ok(summarize_draws(
        prog,
        points,
        cfg,
        &draws,
        train,
        Some(note.into()),
    ))
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
    let points: Vec<Vec<f64>> = if prog.inputs.is_empty() {
        vec![vec![]]
    } else {
        points.to_vec()
    };
    let plan = Plan::new(prog, &points)?;
    run_draw(&plan, width, &ws, 0)
}

/// Mean and standard error (sd/√K, sd with K−1) over draws, summed in draw order so
/// the result does not depend on scheduling.
pub(super) fn estimate<D>(draws: &[D], get: &dyn Fn(&D) -> DMatrix<f64>) -> Estimate {
    let k = draws.len();
    let first = get(&draws[0]);
    let mut mean = DMatrix::zeros(first.nrows(), first.ncols());
    let vals: Vec<DMatrix<f64>> = draws.iter().map(get).collect();
    for v in &vals {
        mean += v;
    }
    mean /= k as f64;
    if k < 2 {
        return Estimate { mean, se: None };
    }
    let mut ss = DMatrix::zeros(mean.nrows(), mean.ncols());
    for v in &vals {
        let d = v - &mean;
        ss += d.component_mul(&d);
    }
    let se = ss.map(|s| (s / (k as f64 - 1.0) / k as f64).sqrt());
    Estimate { mean, se: Some(se) }
}
