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
use std::sync::Arc;

use nalgebra::DMatrix;
use rayon::prelude::*;

use super::linalg::{gemm, gram_tn, Trans};
use super::sample::{fill_normal_matrix, normal_matrix, StreamKey};
use crate::ir::expr::Operand;
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
    /// ([`super::cond`]): O(N·k) memory; the NTK's reverse pass draws its
    /// transposed products from the same history.
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

    /// Words of memory the sampler holds now (its history), for [`Footprint`].
    fn held_words(&self) -> usize {
        0
    }
}

/// Why a run could not be done (or gave a non-finite number), against the node
/// responsible when there is one.
#[derive(Clone, Debug)]
pub struct RunError {
    pub node: Option<NodeId>,
    pub message: String,
    /// The source span, when the error is about a node of another program than the
    /// front end's (the unrolled training program's nodes carry source spans too).
    pub span: Option<crate::ir::Span>,
    /// The diagnostic code, when the error is a diagnosed one (numbers, memory); `None`
    /// for an internal failure.
    pub code: Option<&'static str>,
    /// What to do about it.
    pub help: Option<String>,
}

/// The largest magnitude a finite-width value may reach: beyond it a square (every
/// moment, norm and Gram entry is a sum of products) overflows f64 (max ≈ 1.8e308),
/// so later numbers would be infinite, NaN, or — where a NaN is swallowed by a
/// comparison — silently wrong. With |v| ≤ 1e150, a sum of up to 1.8e8 squares is
/// still finite. A network whose values pass this has blown up (a learning rate too
/// large for the width, a law that grows with n): that is reported, not computed.
pub const MAX_VALUE: f64 = 1e150;

/// The first value of `it` that is not a number tpc can report: NaN, infinite, or
/// beyond [`MAX_VALUE`].
pub fn out_of_range(it: impl IntoIterator<Item = f64>) -> Option<f64> {
    it.into_iter().find(|v| v.is_nan() || v.abs() > MAX_VALUE)
}

/// The reason a value is out of range, for messages.
pub fn describe_value(v: f64) -> String {
    if !v.is_finite() {
        "a value is infinite or NaN".to_string()
    } else {
        format!("a value reaches {v:.3e}, beyond ±{MAX_VALUE:e} (its square would be infinite or NaN in f64)")
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RunError {}

pub(super) fn bug(node: Option<NodeId>, message: impl Into<String>) -> RunError {
    RunError::new(node, message)
}

impl RunError {
    /// The diagnostic, when the error has a place: the span it carries (nodes of an
    /// unrolled training program point back to the source this way), else its node's;
    /// a divergence in training (E0035) also points at the learning rate.
    pub fn diagnostic(&self, prog: &Program) -> Option<crate::diag::Diagnostic> {
        let span = self.span.or_else(|| self.node.map(|n| prog.node(n).span))?;
        let code = self.code.unwrap_or("E0024");
        let help = self.help.clone().unwrap_or_else(|| {
            "a smaller width, other laws or bounded functions keep values finite".into()
        });
        let mut d = crate::diag::Diagnostic::error(code, self.message.clone(), span, "this value")
            .with_help(help);
        if let (Some(t), "E0035") = (&prog.train, code) {
            d = d.with_secondary(t.lr_span, format!("learning rate {}", t.lr));
        }
        Some(d)
    }

    /// An error about `node` (if any) with no code or help yet.
    pub fn new(node: Option<NodeId>, message: impl Into<String>) -> RunError {
        RunError {
            node,
            message: message.into(),
            span: None,
            code: None,
            help: None,
        }
    }

    /// A value out of range (E0024), with the default help.
    pub fn overflow(node: Option<NodeId>, message: impl Into<String>) -> RunError {
        RunError {
            code: Some("E0024"),
            help: Some(
                "a smaller width, other laws or bounded functions keep values finite".into(),
            ),
            ..RunError::new(node, message)
        }
    }

    /// A run that does not fit (E0037).
    pub fn resources(message: impl Into<String>, help: impl Into<String>) -> RunError {
        RunError {
            code: Some("E0037"),
            help: Some(help.into()),
            ..RunError::new(None, message)
        }
    }

    /// Whether this is a value out of range (so training may call it a divergence).
    pub fn is_overflow(&self) -> bool {
        matches!(self.code, Some("E0024") | Some("E0035"))
    }

    /// This error happened while training: an overflow becomes a divergence (E0035)
    /// whose help names the learning rate; `what` says when.
    pub fn in_training(self, what: &str) -> RunError {
        let message = format!("{what}: {}", self.message);
        if self.is_overflow() {
            RunError {
                message,
                code: Some("E0035"),
                help: Some(
                    "the learning rate is too large for this width: lower `lr`, or use a \
                     parameterization whose updates stay bounded as n grows (`mup`); \
                     `tpc check` warns when training blows up with the width (W0103)"
                        .into(),
                ),
                ..self
            }
        } else {
            RunError { message, ..self }
        }
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
    /// Node's value depends on some parameter, so the reverse pass needs its
    /// cotangent (false for inputs and constants such as `h[0] = 0`).
    pub(super) grad: Vec<bool>,
    /// Per Nonlin that is a sum of products, the sum of its terms' magnitudes
    /// ([`magnitude`]), when the plan checks for cancellation.
    magnitudes: Vec<Option<Expr>>,
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
        let mut grad = vec![false; prog.len()];
        for id in prog.ids() {
            let ops = prog.operands(id);
            grad[id.index()] = match &prog.node(id).op {
                Op::Param(_) | Op::MatMul { .. } => true,
                Op::Input { .. } | Op::Output { .. } => false,
                Op::Nonlin(_) | Op::Moment(_) | Op::Scalar(_) => {
                    ops.iter().any(|a| grad[a.index()])
                }
            };
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
                Op::Nonlin(e) => {
                    // Arg(#operands) is the Nonlin's own value (backward passes it):
                    // a partial that contains the whole expression reads it.
                    let own = Expr::Arg(ops.len());
                    derivs[id.index()] =
                        (0..ops.len()).map(|i| e.diff(i).replace(e, &own)).collect();
                    !any_point
                }
                Op::Moment(e) | Op::Scalar(e) => {
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
            grad,
            magnitudes: Vec::new(),
        })
    }

    /// This plan also refuses a sum whose terms cancel below their rounding error
    /// ([`check_cancellation`]): for unrolled training programs, where a product
    /// W_t z is W_0 z minus rank-one corrections that grow with every step.
    pub(super) fn checking_cancellation(mut self) -> Self {
        self.magnitudes = self
            .prog
            .ids()
            .map(|id| match &self.prog.node(id).op {
                Op::Nonlin(e) if sums(e) > 0 => magnitude(e),
                _ => None,
            })
            .collect();
        self
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

    /// `id`'s value `bad` is out of range ([`out_of_range`]).
    pub(super) fn nonfinite(
        &self,
        id: NodeId,
        n: usize,
        draw: usize,
        what: &str,
        bad: f64,
    ) -> RunError {
        RunError {
            span: Some(self.prog.node(id).span),
            ..RunError::overflow(
                Some(id),
                format!(
                    "{} {what} at width {n} (draw {draw}): {}",
                    self.label(id),
                    describe_value(bad)
                ),
            )
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

/// The operand sources of a Nonlin/Moment at point `p`.
fn sources<'v>(vals: &'v [Val], ops: &[NodeId], p: usize) -> Option<Vec<Operand<'v>>> {
    ops.iter()
        .map(|a| match &vals[a.index()] {
            Val::Vector(m) => {
                let c = col(m, p);
                let n = m.nrows();
                Some(Operand::Column(&m.as_slice()[c * n..(c + 1) * n]))
            }
            Val::Scalar(s) => Some(Operand::Scalar(if s.len() == 1 { s[0] } else { s[p] })),
            Val::None => None,
        })
        .collect()
}

/// Coordinates per parallel task in the coordinatewise loops of a wide draw: fixed,
/// so that chunked sums come out the same whatever the thread count, and large
/// enough that a task outweighs rayon's dispatch.
pub(super) const COORD_CHUNK: usize = 1 << 15;

/// `e` at every coordinate of point `p`, into `out` (length N), in parallel over
/// fixed chunks of coordinates (each value is computed alone, so the result does not
/// depend on the split).
fn eval_column(e: &Expr, src: &[Operand<'_>], out: &mut [f64]) {
    // Functions of scalar operands (Netsor+: softmax weights, normalizers) once per
    // column, not per coordinate; bit for bit the same values.
    let folded;
    let e = if src.iter().any(|o| matches!(o, Operand::Scalar(_))) {
        folded = e.fold_scalars(&|i| match src.get(i) {
            Some(Operand::Scalar(s)) => Some(*s),
            _ => None,
        });
        &folded
    } else {
        e
    };
    let chunk = |start: usize, out: &mut [f64]| {
        for (b, o) in out.chunks_mut(EVAL_BLOCK).enumerate() {
            e.eval_run(src, start + b * EVAL_BLOCK, o);
        }
    };
    if out.len() <= COORD_CHUNK {
        chunk(0, out);
    } else {
        out.par_chunks_mut(COORD_CHUNK)
            .enumerate()
            .for_each(|(i, o)| chunk(i * COORD_CHUNK, o));
    }
}

/// Coordinates evaluated together by [`Expr::eval_run`]: a few temporaries of this
/// length stay in L1.
const EVAL_BLOCK: usize = 256;

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

/// The number of additions and subtractions in `e`.
fn sums(e: &Expr) -> usize {
    match e {
        Expr::Arg(_) | Expr::Const(_) => 0,
        Expr::Call(_, x) | Expr::Neg(x) | Expr::Powi(x, _) => sums(x),
        Expr::Add(a, b) | Expr::Sub(a, b) => 1 + sums(a) + sums(b),
        Expr::Mul(a, b) | Expr::Div(a, b) => sums(a) + sums(b),
    }
}

/// For a polynomial `e` (sums of products of operands and constants), the same
/// polynomial in the absolute values with every subtraction an addition: the sum of
/// the magnitudes of its terms, M. Rounding leaves |ê − e| ≤ k·ε·M with k the number of
/// operations (Higham, *Accuracy and Stability*, §3.1), so a value far below M·kε
/// carries no significant digit. `None` for expressions with functions or divisions.
fn magnitude(e: &Expr) -> Option<Expr> {
    let b = |x: Expr| Box::new(x);
    Some(match e {
        Expr::Arg(i) => Expr::Call(crate::ir::expr::Fun::Abs, b(Expr::Arg(*i))),
        Expr::Const(c) => Expr::Const(c.abs()),
        Expr::Neg(x) => magnitude(x)?,
        Expr::Add(x, y) | Expr::Sub(x, y) => Expr::Add(b(magnitude(x)?), b(magnitude(y)?)),
        Expr::Mul(x, y) => Expr::Mul(b(magnitude(x)?), b(magnitude(y)?)),
        Expr::Powi(x, k) if *k >= 0 => Expr::Powi(b(magnitude(x)?), *k),
        Expr::Powi(..) | Expr::Call(..) | Expr::Div(..) => return None,
    })
}

/// Significant bits a vector must keep: fewer (2^-20 of the rounding bound: about six
/// decimal digits) and it is refused as noise.
const KEPT_BITS: i32 = 20;

/// Refuses a sum whose value, per point, is below its rounding error by the norm-wise
/// bound ‖ê − e‖ ≤ k·ε·‖M‖ ([`magnitude`]) times 2^[`KEPT_BITS`]: every digit would
/// be rounding noise (a diverging unrolled training, whose noise a relu then turns
/// into an exact 0). Returns the first such column's ‖value‖ and ‖M‖.
fn cancelled(value: &DMatrix<f64>, mag: &DMatrix<f64>, ops: usize) -> Option<(f64, f64)> {
    // ‖x‖ = s·‖x/s‖ with s the largest |x_i|: values up to MAX_VALUE have squares
    // whose sum would overflow.
    let norm = |m: &DMatrix<f64>, j: usize| {
        let s = m.column(j).iter().fold(0.0f64, |a, v| a.max(v.abs()));
        if s == 0.0 || !s.is_finite() {
            return s;
        }
        s * m
            .column(j)
            .iter()
            .map(|v| (v / s) * (v / s))
            .sum::<f64>()
            .sqrt()
    };
    let bound = (ops + 1) as f64 * f64::EPSILON * 2f64.powi(KEPT_BITS);
    (0..value.ncols()).find_map(|j| {
        let (v, m) = (norm(value, j), norm(mag, j));
        (m > 0.0 && v <= bound * m).then_some((v, m))
    })
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

/// Samples parameter `i`'s trainable `w` for draw `draw` of seed `seed` at width `n`:
/// stream `StreamKey(seed, draw, i)`, entries N(0, var(n)), shaped by [`stored_shape`].
fn sample_param(
    prog: &Program,
    i: usize,
    n: usize,
    seed: u64,
    draw: usize,
) -> Result<DMatrix<f64>, RunError> {
    let prm = &prog.params[i];
    let (rows, cols) = stored_shape(prm.shape, n);
    let std = prm.law.var.at(n as f64).max(0.0).sqrt();
    normal_matrix(rows, cols, std, StreamKey::new(seed, draw as u64, i as u64))
        .map_err(|e| bug(Some(prm.node), format!("cannot sample {}: {e}", prm.name)))
}

/// Samples every parameter's trainable `w` for draw `draw` of seed `seed` at width `n`
/// (`sample_param`). Shapes: hidden N×N, input N×d, readout and vector N×1, scalar 1×1.
pub fn sample_params(
    prog: &Program,
    n: usize,
    seed: u64,
    draw: usize,
) -> Result<Vec<DMatrix<f64>>, RunError> {
    (0..prog.params.len())
        .map(|i| sample_param(prog, i, n, seed, draw))
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
                        if let Some(bad) = out_of_range(m.iter().copied()) {
                            return Err(plan.nonfinite(id, n, draw, "overflows", bad));
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
            Op::Nonlin(e) => {
                let block = eval_block(e, &vals, ops, n, c)
                    .ok_or_else(|| bug(Some(id), "a coordinatewise function of a non-vector"))?;
                if let Some(Some(me)) = plan.magnitudes.get(id.index()) {
                    let mag = eval_block(me, &vals, ops, n, c)
                        .ok_or_else(|| bug(Some(id), "a magnitude of a non-vector"))?;
                    if let Some((v, m)) = cancelled(&block, &mag, sums(e)) {
                        return Err(RunError {
                            span: Some(prog.node(id).span),
                            ..RunError::overflow(
                                Some(id),
                                format!(
                                    "{} loses every significant digit at width {n} (draw {draw}): terms of size {m:.3e} cancel to {v:.3e}, below their rounding error",
                                    plan.label(id)
                                ),
                            )
                        });
                    }
                }
                Val::Vector(block)
            }
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
        let bad = match &v {
            Val::Vector(m) => out_of_range(m.iter().copied()),
            Val::Scalar(s) => out_of_range(s.iter().copied()),
            Val::None => None,
        };
        if let Some(bad) = bad {
            return Err(plan.nonfinite(id, n, draw, "overflows", bad));
        }
        vals[id.index()] = v;
        release(&mut vals, ops, id);
    }

    Ok(vals)
}

/// A cotangent block (N×O·P), shared between operands that receive the same one.
pub(super) type Cot = Arc<DMatrix<f64>>;

/// d += φ' ⊙ δ coordinatewise, column k of δ against column (k mod P) of φ'.
fn add_scaled_columns(
    d: &mut DMatrix<f64>,
    dv: &DMatrix<f64>,
    dy: &DMatrix<f64>,
    p: usize,
    n: usize,
) {
    let (dvs, dys) = (dv.as_slice(), dy.as_slice());
    d.as_mut_slice()
        .par_chunks_mut(n)
        .enumerate()
        .for_each(|(k, dst)| {
            let c0 = col(dv, k % p) * n;
            let dc = &dvs[c0..c0 + n];
            let src = &dys[k * n..(k + 1) * n];
            for r in 0..n {
                dst[r] += dc[r] * src[r];
            }
        });
}

/// The reverse pass. On entry `delta` holds the cotangents seeded at the outputs'
/// read-out vectors, each an N×`cols` block whose column k belongs to point `k % P`
/// (`cols` = O·P for per-(output, point) gradients, P for the gradient of a loss). On
/// return it holds the cotangent of every vector node the seeds reach: for a product
/// node `y = W x` this is ∂/∂y, from which the gradient of `W` is assembled. With an
/// `engine`, hidden products come from it, as in [`forward_with`].
#[allow(clippy::too_many_arguments)] // the pass's state, each used once
pub(super) fn backward(
    plan: &Plan<'_>,
    n: usize,
    sampled: &[Sampled<'_>],
    vals: &[Val],
    delta: &mut [Option<Cot>],
    cols: usize,
    draw: usize,
    mut engine: Option<&mut dyn HiddenProducts>,
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
                let xi = ops[1].index();
                if !plan.grad[xi] {
                    // x depends on no parameter (h[0] = 0): its cotangent is unused.
                    delta[id.index()] = Some(dy);
                    continue;
                }
                if let (Some(e), Shape::Hidden) = (engine.as_deref_mut(), prog.params[pi].shape) {
                    // The transposed product from the same sampler that answered the
                    // forward ones (Netsor-transpose: conditioned on that history).
                    let back = e.product(pi, !*transpose, &dy).map_err(|e| RunError {
                        node: Some(id),
                        ..e
                    })?;
                    match &mut delta[xi] {
                        Some(d) => *Arc::make_mut(d) += back,
                        slot => *slot = Some(Arc::new(back)),
                    }
                    delta[id.index()] = Some(dy);
                    continue;
                }
                let s = &sampled[pi];
                // y = mult·W x  ⇒  ∂/∂x = mult·Wᵀ δ;  y = mult·Wᵀ x  ⇒  mult·W δ.
                let t = if *transpose { Trans::No } else { Trans::Yes };
                let (dx, beta) = match delta[xi].take() {
                    Some(d) => (Arc::unwrap_or_clone(d), 1.0),
                    None => (DMatrix::zeros(n, op_cols), 0.0),
                };
                let mut dx = dx;
                gemm(&mut dx, s.mult, s.w, t, &dy, Trans::No, beta)
                    .map_err(|e| bug(Some(id), format!("internal shape error: {e}")))?;
                delta[xi] = Some(Arc::new(dx));
                delta[id.index()] = Some(dy);
            }
            Op::Nonlin(_) => {
                let Some(dy) = delta[id.index()].take() else {
                    continue;
                };
                let c = if plan.shared[id.index()] { 1 } else { p };
                // The partials read the operands and the node's own value (Plan::new).
                let with_own: Vec<NodeId> = ops.iter().copied().chain([id]).collect();
                // The partials of a function of a sum (tanh(W h + U x + b)) are one
                // expression: evaluate it once.
                // The last partial evaluated, and its contribution φ' ⊙ δ once formed:
                // operands whose cotangent is still empty share that one matrix (W h
                // and U x in tanh(W h + U x + b) get equal cotangents, kept for the
                // NTK), which halves the cotangent memory of a wide run.
                let mut last: Option<(&Expr, DMatrix<f64>, Option<Cot>)> = None;
                for (slot, de) in plan.derivs[id.index()].iter().enumerate() {
                    let a = ops[slot].index();
                    if matches!(de, Expr::Const(z) if *z == 0.0) || !plan.grad[a] {
                        continue;
                    }
                    if last.as_ref().is_none_or(|(e, _, _)| *e != de) {
                        let dv = eval_block(de, vals, &with_own, n, c)
                            .ok_or_else(|| bug(Some(id), "a derivative of a non-vector"))?;
                        last = Some((de, dv, None));
                    }
                    let Some((_, dv, shared)) = &mut last else {
                        return Err(bug(Some(id), "a derivative not evaluated"));
                    };
                    match &vals[a] {
                        Val::Vector(_) => match (&mut delta[a], shared.as_ref()) {
                            (Some(d), None) => add_scaled_columns(Arc::make_mut(d), dv, &dy, p, n),
                            (Some(d), Some(sh)) => *Arc::make_mut(d) += &**sh,
                            (slot, Some(sh)) => *slot = Some(Arc::clone(sh)),
                            (slot, None) => {
                                let mut d = DMatrix::zeros(n, op_cols);
                                add_scaled_columns(&mut d, dv, &dy, p, n);
                                let d = Arc::new(d);
                                *shared = Some(Arc::clone(&d));
                                *slot = Some(d);
                            }
                        },
                        Val::Scalar(_) => {
                            let d = mdelta[a].get_or_insert_with(|| vec![0.0; op_cols]);
                            for (k, dk) in d.iter_mut().enumerate() {
                                let dc = dv.column(col(dv, k % p));
                                *dk += dc.dot(&dy.column(k));
                            }
                        }
                        Val::None => {}
                    }
                }
                // Only parameters and products need their cotangent after the pass
                // (for the NTK and training); dropping the others bounds the memory
                // of a wide run.
                if let Some(bad) = out_of_range(dy.iter().copied()) {
                    return Err(plan.nonfinite(id, n, draw, "has a gradient that overflows", bad));
                }
            }
            Op::Moment(_) => {
                let Some(dm) = mdelta[id.index()].take() else {
                    continue;
                };
                let c = if plan.shared[id.index()] { 1 } else { p };
                for (slot, de) in plan.derivs[id.index()].iter().enumerate() {
                    let a = ops[slot].index();
                    if matches!(de, Expr::Const(z) if *z == 0.0) || !plan.grad[a] {
                        continue;
                    }
                    let dv = eval_block(de, vals, ops, n, c)
                        .ok_or_else(|| bug(Some(id), "a derivative of a non-vector"))?;
                    match &vals[a] {
                        // θ = (1/N) Σ ψ  ⇒  ∂θ/∂x_a = ψ_i'(a) / N.
                        Val::Vector(_) => {
                            let d = Arc::make_mut(
                                delta[a]
                                    .get_or_insert_with(|| Arc::new(DMatrix::zeros(n, op_cols))),
                            );
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
            if let Some(bad) = out_of_range(d.iter().copied()) {
                return Err(plan.nonfinite(id, n, draw, "has a gradient that overflows", bad));
            }
        }
    }

    Ok(())
}

/// Runs one draw on given trainable values `ws` (as [`sample_params`] shapes them):
/// forward, backward, kernels. `draw` only labels error messages.
fn run_draw(plan: &Plan<'_>, n: usize, ws: &[DMatrix<f64>], draw: usize) -> Result<Draw, RunError> {
    let sampled = sampled_of(plan.prog, n, ws)?;
    run_draw_with(plan, n, &sampled, draw, None).map(|(d, _)| d)
}

/// [`run_draw`] on paired values, with hidden products from `engine` when given, in
/// the forward and the reverse pass alike: the reverse pass's Wᵀδ and Wδ are then
/// drawn given the forward products, which is their joint law (Netsor-transpose), so
/// the NTK is exact in law too. Its Gram needs no W: (δ·δ')(x·x') per pair of uses.
fn run_draw_with(
    plan: &Plan<'_>,
    n: usize,
    sampled: &[Sampled<'_>],
    draw: usize,
    engine: Option<&mut dyn HiddenProducts>,
) -> Result<(Draw, usize), RunError> {
    let prog = plan.prog;
    let (p, o) = (plan.p, plan.o);
    let op_cols = o * p;
    let nf = n as f64;
    let mut engine = engine;
    // Reborrowed (a shorter trait-object lifetime) so the backward pass can use it too.
    let fwd = engine.as_mut().map(|e| &mut **e as &mut dyn HiddenProducts);
    let vals = forward_with(plan, n, sampled, draw, fwd)?;

    // ---- outputs ------------------------------------------------------------------
    let f = outputs(plan, n, sampled, &vals, draw)?;
    // Per readout parameter: H (N×OP), column (o,p) = sum of coef·x over o's terms
    // read by it. Per scalar parameter: g (OP), sum of coefs.
    let mut readout_h: Vec<Option<DMatrix<f64>>> = vec![None; prog.params.len()];
    let mut scalar_g: Vec<Option<Vec<f64>>> = vec![None; prog.params.len()];
    // Cotangents: N×OP per vector node, OP per moment.
    let mut delta: Vec<Option<Cot>> = vec![None; prog.len()];
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
                    let d = Arc::make_mut(
                        delta[xid.index()]
                            .get_or_insert_with(|| Arc::new(DMatrix::zeros(n, op_cols))),
                    );
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

    let back = engine.as_mut().map(|e| &mut **e as &mut dyn HiddenProducts);
    backward(plan, n, sampled, &vals, &mut delta, op_cols, draw, back)?;
    // What the draw holds at its widest point, the end of the reverse pass (values,
    // the cotangents kept for the NTK — each shared one once — and the sampler's
    // history): the measured memory of [`Footprint`].
    let mut seen = std::collections::HashSet::new();
    let held = vals
        .iter()
        .map(|v| match v {
            Val::Vector(x) => x.len(),
            _ => 0,
        })
        .chain(
            delta
                .iter()
                .flatten()
                .filter(|d| seen.insert(Arc::as_ptr(d)))
                .map(|d| d.len()),
        )
        .chain(readout_h.iter().flatten().map(|h| h.len()))
        .sum::<usize>()
        + engine.as_ref().map_or(0, |e| e.held_words());

    // ---- kernels ------------------------------------------------------------------
    let mut nngp = DMatrix::zeros(op_cols, op_cols);
    let mut ntk = DMatrix::zeros(op_cols, op_cols);
    let gram_err = |e| bug(None, format!("internal shape error: {e}"));
    for (pi, prm) in prog.params.iter().enumerate() {
        let law = prm.law;
        let lr = law.lr.at(nf);
        let mult = sampled[pi].mult;
        match prm.shape {
            Shape::Readout => {
                if let Some(h) = &readout_h[pi] {
                    let g = gram_tn(h, h).map_err(gram_err)?;
                    // Cov(v·x, v·x' | x) = Var(v_a) x·x'; ∂f/∂w = mult·x.
                    nngp += &g * law.entry_var().at(nf);
                    ntk += &g * (lr * mult * mult);
                }
            }
            Shape::Scalar => {
                if let Some(g) = &scalar_g[pi] {
                    let gv = nalgebra::DVector::from_column_slice(g);
                    let outer = &gv * gv.transpose();
                    nngp += &outer * law.entry_var().at(nf);
                    ntk += &outer * (lr * mult * mult);
                }
            }
            Shape::Vector => {
                if let Some(d) = &delta[prm.node.index()] {
                    let g = gram_tn(d, d).map_err(gram_err)?;
                    ntk += &g * (lr * mult * mult);
                }
            }
            Shape::Hidden | Shape::Input(_) => {
                // Each use i contributes mult·(a_i ⊗ b_i) to ∂f/∂w for every (o,p)
                // column: (δ_y, x) for W x, (x, δ_y) for Wᵀ x, (δ_y, ξ) for U ξ.
                let mut a_side: Vec<Factor<'_>> = Vec::new();
                let mut b_side: Vec<Factor<'_>> = Vec::new();
                for u in prog.users(prm.node) {
                    let Op::MatMul { transpose } = prog.node(u).op else {
                        continue;
                    };
                    let Some(dy) = &delta[u.index()] else {
                        continue; // this use does not reach any output
                    };
                    let arg = plan.operands[u.index()][1];
                    let xe = if let Some(x) = plan.inputs.get(&arg) {
                        // d×P: column p is the point ξ_p.
                        Factor::points(std::borrow::Cow::Owned(x.transpose()))
                    } else if let Val::Vector(x) = &vals[arg.index()] {
                        Factor::points(std::borrow::Cow::Borrowed(x))
                    } else {
                        return Err(bug(Some(u), "a product of a non-vector"));
                    };
                    let dy = Factor::cotangent(dy);
                    if transpose {
                        a_side.push(xe);
                        b_side.push(dy);
                    } else {
                        a_side.push(dy);
                        b_side.push(xe);
                    }
                }
                let scale = lr * mult * mult;
                // Σ_ij (a_i·a_j)(b_i·b_j): the (j, i) term is the transpose of (i, j).
                for i in 0..a_side.len() {
                    for j in i..a_side.len() {
                        let ga = a_side[i].gram(&a_side[j], op_cols, p).map_err(gram_err)?;
                        let gb = b_side[i].gram(&b_side[j], op_cols, p).map_err(gram_err)?;
                        let term = ga.component_mul(&gb) * scale;
                        if i != j {
                            ntk += term.transpose();
                        }
                        ntk += term;
                    }
                }
            }
        }
    }
    for (what, k) in [("NNGP", &nngp), ("NTK", &ntk)] {
        if let Some(bad) = out_of_range(k.iter().copied()) {
            let first = prog.outputs.first().copied();
            return Err(RunError {
                span: first.map(|o| prog.node(o).span),
                ..RunError::overflow(
                    first,
                    format!(
                        "the {what} overflows at width {n} (draw {draw}): {}",
                        describe_value(bad)
                    ),
                )
            });
        }
    }

    let observe = prog
        .observes
        .iter()
        .map(|m| match &vals[m.index()] {
            Val::Scalar(s) => s.clone(),
            _ => Vec::new(),
        })
        .collect();
    Ok((
        Draw {
            f,
            nngp,
            ntk,
            observe,
        },
        held,
    ))
}

/// One side of the rank-one terms of a matrix gradient, as an (O·P)-column block
/// without copying: either a cotangent (N×O·P, column k is column k) or a forward
/// value (N×c, column k is the value at point k mod P, c = P or 1 when broadcast).
struct Factor<'v> {
    m: std::borrow::Cow<'v, DMatrix<f64>>,
    per_point: bool,
}

impl<'v> Factor<'v> {
    fn cotangent(m: &'v DMatrix<f64>) -> Self {
        Factor {
            m: std::borrow::Cow::Borrowed(m),
            per_point: false,
        }
    }

    fn points(m: std::borrow::Cow<'v, DMatrix<f64>>) -> Self {
        Factor { m, per_point: true }
    }

    fn column_of(&self, k: usize, p: usize) -> usize {
        if self.per_point {
            col(&self.m, k % p)
        } else {
            k
        }
    }

    /// The (O·P)×(O·P) matrix of dot products of the columns of `self` and `other`:
    /// one product of the stored blocks, then expanded, so a wide run never forms an
    /// N×(uses·O·P) copy.
    fn gram(
        &self,
        other: &Factor<'_>,
        cols: usize,
        p: usize,
    ) -> Result<DMatrix<f64>, super::linalg::ShapeError> {
        let g = gram_tn(&self.m, &other.m)?;
        Ok(DMatrix::from_fn(cols, cols, |k, l| {
            g[(self.column_of(k, p), other.column_of(l, p))]
        }))
    }
}

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

/// The points a run evaluates: a program without inputs runs at one empty point
/// (whatever was passed), every other at the given points.
fn run_points(prog: &Program, points: &[Vec<f64>]) -> Vec<Vec<f64>> {
    if prog.inputs.is_empty() {
        vec![vec![]]
    } else {
        points.to_vec()
    }
}

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

/// Every parameter but the hidden matrices (left 0×0: the conditional engine draws
/// their products), sampled exactly as [`sample_params`] samples them.
pub(super) fn sample_non_hidden(
    prog: &Program,
    n: usize,
    seed: u64,
    draw: usize,
) -> Result<Vec<DMatrix<f64>>, RunError> {
    (0..prog.params.len())
        .map(|i| match prog.params[i].shape {
            Shape::Hidden => Ok(DMatrix::zeros(0, 0)),
            _ => sample_param(prog, i, n, seed, draw),
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
            points: if prog.inputs.is_empty() {
                Vec::new()
            } else {
                points
            },
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

/// Numbers in one draw's trajectory f_t: (steps+1) × O·P.
fn traj_words(prog: &Program, p: usize) -> usize {
    prog.train.as_ref().map_or(0, |t| t.steps + 1) * prog.outputs.len() * p.max(1)
}

/// Numbers in one draw's result: outputs, both kernels, observes (one per point).
fn result_words(prog: &Program, p: usize) -> usize {
    let op = prog.outputs.len() * p.max(1);
    op + 2 * op * op + prog.observes.len() * p.max(1)
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
        if let Some(bad) = out_of_range(f.row(oi).iter().copied()) {
            return Err(plan.nonfinite(out, n, draw, "overflows", bad));
        }
    }
    Ok(f)
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

/// Bytes a block of [`Moments`] may buffer: with the means and spreads it is what the
/// statistics of a run hold, whatever K.
const MOMENTS_BUFFER_BYTES: usize = 64 << 20;

/// Means and standard errors over draws that arrive one at a time, in draw order: K
/// may be 10^8 without holding K results (issue 12).
///
/// Draws are buffered in blocks of a fixed size (set by the size of one result, never
/// by the machine, so output is the same everywhere). A run of at most one block is
/// the exact two-pass computation, mean Σv/K then Σ(v − mean)²; longer runs merge
/// block statistics by Chan, Golub and LeVeque's pairwise update, keeping each
/// entry's *population variance* M2/K (bounded by the largest squared deviation, so it
/// cannot overflow where M2 could).
///
/// Squares are formed after dividing by a power of two when a deviation exceeds
/// 2^500 (exact, so ordinary values give the same bits as unscaled sums): a finite mean
/// gets a finite standard error.
pub(super) struct Moments {
    block: usize,
    buf: Vec<DMatrix<f64>>,
    /// Draws merged from full blocks, with their mean and population variance.
    done: usize,
    mean: DMatrix<f64>,
    var: DMatrix<f64>,
}

impl Moments {
    pub(super) fn new(block: usize) -> Moments {
        Moments {
            block: block.max(2),
            buf: Vec::new(),
            done: 0,
            mean: DMatrix::zeros(0, 0),
            var: DMatrix::zeros(0, 0),
        }
    }

    /// The block size for results of `words` numbers each: as many as fit in
    /// [`MOMENTS_BUFFER_BYTES`], between 2 and 4096.
    pub(super) fn block_for(words: usize) -> usize {
        (MOMENTS_BUFFER_BYTES / (8 * words.max(1))).clamp(2, 4096)
    }

    pub(super) fn push(&mut self, v: DMatrix<f64>) {
        self.buf.push(v);
        if self.buf.len() == self.block {
            self.fold();
        }
    }

    /// Merges the buffered block into the running statistics.
    fn fold(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let kb = self.buf.len();
        let mean = block_mean(&self.buf);
        let (ss, scale) = spread(&self.buf, &mean);
        // Population variance of the block: s²·(ss/s²)/kb.
        let var = DMatrix::from_fn(mean.nrows(), mean.ncols(), |i, j| {
            let s = scale[(i, j)];
            ss[(i, j)] / kb as f64 * s * s
        });
        self.buf.clear();
        if self.done == 0 {
            (self.done, self.mean, self.var) = (kb, mean, var);
            return;
        }
        let (na, nb) = (self.done as f64, kb as f64);
        let n = na + nb;
        let (wa, wb) = (na / n, nb / n);
        for i in 0..self.mean.len() {
            let d = mean[i] - self.mean[i];
            self.mean[i] += d * wb;
            // (na·var_a + nb·var_b)/n + δ²·(na/n)(nb/n), with δ² formed as (δ·√(wa·wb))².
            let dd = d * (wa * wb).sqrt();
            self.var[i] = wa * self.var[i] + wb * var[i] + dd * dd;
        }
        self.done += kb;
    }

    pub(super) fn finish(mut self) -> Estimate {
        if self.done == 0 {
            // At most one block: the exact two-pass estimate.
            let k = self.buf.len();
            let mean = block_mean(&self.buf);
            if k < 2 {
                return Estimate { mean, se: None };
            }
            let (ss, scale) = spread(&self.buf, &mean);
            let se = DMatrix::from_fn(mean.nrows(), mean.ncols(), |i, j| {
                scale[(i, j)] * (ss[(i, j)] / (k as f64 - 1.0) / k as f64).sqrt()
            });
            return Estimate { mean, se: Some(se) };
        }
        self.fold();
        let k = self.done as f64;
        let se = self.var.map(|v| (v / (k - 1.0)).sqrt());
        Estimate {
            mean: self.mean,
            se: Some(se),
        }
    }
}

/// Σv/k over a block, summed in order.
fn block_mean(vals: &[DMatrix<f64>]) -> DMatrix<f64> {
    let Some(first) = vals.first() else {
        return DMatrix::zeros(0, 0);
    };
    let mut mean = DMatrix::zeros(first.nrows(), first.ncols());
    for v in vals {
        mean += v;
    }
    mean / vals.len() as f64
}

/// Per entry, Σ((v − mean)/s)² and the scale s: 1 when every deviation is at most
/// 2^500 (the plain sum, same bits), else the power of two at the top of the largest.
fn spread(vals: &[DMatrix<f64>], mean: &DMatrix<f64>) -> (DMatrix<f64>, DMatrix<f64>) {
    let big = 2f64.powi(500);
    let mut top = DMatrix::<f64>::zeros(mean.nrows(), mean.ncols());
    for v in vals {
        for i in 0..mean.len() {
            top[i] = top[i].max((v[i] - mean[i]).abs());
        }
    }
    let scale = top.map(|t| {
        if t > big && t.is_finite() {
            f64::from_bits(t.to_bits() & 0x7ff0_0000_0000_0000)
        } else {
            1.0
        }
    });
    let mut ss = DMatrix::zeros(mean.nrows(), mean.ncols());
    for v in vals {
        for i in 0..mean.len() {
            let d = (v[i] - mean[i]) / scale[i];
            ss[i] += d * d;
        }
    }
    (ss, scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::expr::Fun;

    fn one(v: f64) -> DMatrix<f64> {
        DMatrix::from_element(1, 1, v)
    }

    /// Up to one block, [`Moments`] is the two-pass estimate bit for bit; past it the
    /// merged blocks agree with the two-pass estimate to rounding.
    #[test]
    fn moments_match_the_two_pass_estimate() {
        let xs: Vec<f64> = (0..1000)
            .map(|i| ((i * 7919 % 1013) as f64).sin() * 3.0 + 1.0)
            .collect();
        let two_pass = |xs: &[f64]| {
            let k = xs.len() as f64;
            let mean = xs.iter().sum::<f64>() / k;
            let ss: f64 = xs.iter().map(|x| (x - mean) * (x - mean)).sum();
            (mean, (ss / (k - 1.0) / k).sqrt())
        };
        let mut m = Moments::new(4096);
        xs.iter().for_each(|&x| m.push(one(x)));
        let e = m.finish();
        let (mean, se) = two_pass(&xs);
        assert_eq!(e.mean[0], mean);
        assert_eq!(e.se.unwrap()[0], se);
        for block in [2, 3, 16, 333] {
            let mut m = Moments::new(block);
            xs.iter().for_each(|&x| m.push(one(x)));
            let e = m.finish();
            assert!(
                (e.mean[0] - mean).abs() <= 1e-13 * mean.abs(),
                "block {block}"
            );
            let got = e.se.unwrap()[0];
            assert!(
                (got - se).abs() <= 1e-12 * se,
                "block {block}: {got} vs {se}"
            );
        }
    }

    /// Issue 12: values near 1e150 had a finite mean and an infinite standard error
    /// (the squares overflowed). Scaled squares give the right one, merged or not.
    #[test]
    fn huge_values_get_a_finite_standard_error() {
        let xs = [1e150, -9e149, 5e149, -1e150, 2e149];
        let k = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / k;
        let ss: f64 = xs.iter().map(|x| ((x - mean) / 1e150).powi(2)).sum();
        let want = 1e150 * (ss / (k - 1.0) / k).sqrt();
        for block in [2, 4096] {
            let mut m = Moments::new(block);
            xs.iter().for_each(|&x| m.push(one(x)));
            let e = m.finish();
            let se = e.se.unwrap()[0];
            assert!(
                se.is_finite() && (se - want).abs() <= 1e-12 * want,
                "{se:e} vs {want:e}"
            );
        }
    }

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

    /// The column evaluator computes each coordinate exactly as `Expr::eval` does
    /// (same bits), for every function and operation, across block boundaries, with
    /// column and constant operands — and so does every derivative it is asked for.
    #[test]
    fn eval_column_equals_pointwise_eval() {
        let n = 3 * EVAL_BLOCK + 17;
        let c0: Vec<f64> = (0..n).map(|i| ((i as f64) * 0.37).sin() * 3.0).collect();
        let c1: Vec<f64> = (0..n).map(|i| ((i as f64) * 0.11).cos() + 0.5).collect();
        let src = [
            Operand::Column(&c0),
            Operand::Scalar(-0.7),
            Operand::Column(&c1),
        ];
        let (a, b, k) = (Expr::Arg(0), Expr::Arg(2), Expr::Arg(1));
        for f in Fun::ALL {
            let inner = Expr::add(Expr::mul(a.clone(), b.clone()), k.clone());
            let e = Expr::div(
                Expr::sub(Expr::call(f, inner), Expr::powi(b.clone(), 3)),
                Expr::add(Expr::neg(Expr::call(Fun::Abs, a.clone())), Expr::Const(4.0)),
            );
            for ex in [e.clone(), e.diff(0), e.diff(2)] {
                let mut out = vec![0.0; n];
                eval_column(&ex, &src, &mut out);
                for (i, o) in out.iter().enumerate() {
                    let want = ex.eval(&[c0[i], -0.7, c1[i]]);
                    assert_eq!(o.to_bits(), want.to_bits(), "{f:?} at {i}: {o} vs {want}");
                }
            }
        }
    }
}
