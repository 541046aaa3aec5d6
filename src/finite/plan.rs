//! The per-program facts every draw needs, computed once (`Plan`): operands,
//! which values are broadcast (depend on no point), the partials of every Nonlin and
//! Moment; coordinatewise evaluation of expressions over width-N columns, with the
//! cancellation guard for unrolled programs; and sampling of parameters
//! (language.md, Declarations) from their streams ([`super::sample`]).

use std::collections::HashMap;

use nalgebra::DMatrix;
use rayon::prelude::*;

use super::sample::{fill_normal_matrix, normal_matrix, StreamKey};
use super::types::{bug, describe_value, RunError, COORD_CHUNK};
use crate::ir::expr::Operand;
use crate::ir::{Expr, NodeId, Op, Program, Shape};

/// The per-program facts every draw needs, computed once.
pub(super) struct Plan<'a> {
    pub(super) prog: &'a Program,
    /// Points (at least one; an empty one for a program without inputs).
    pub(super) p: usize,
    pub(super) o: usize,
    /// Node's value depends on no input point: stored as one column, broadcast.
    pub(super) shared: Vec<bool>,
    /// Partial derivatives of each Nonlin/Moment expression, by operand slot.
    pub(super) derivs: Vec<Vec<Expr>>,
    /// P×d values of every `Input` node.
    pub(super) inputs: HashMap<NodeId, DMatrix<f64>>,
    /// Operands of every node (read once from the graph).
    pub(super) operands: Vec<Vec<NodeId>>,
    /// Node's value depends on some parameter, so the reverse pass needs its
    /// cotangent (false for inputs and constants such as `h[0] = 0`).
    pub(super) grad: Vec<bool>,
    /// Per Nonlin that is a sum of products, the sum of its terms' magnitudes
    /// ([`magnitude`]), when the plan checks for cancellation.
    pub(super) magnitudes: Vec<Option<Expr>>,
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
                Op::Nonlin(_) | Op::Moment(_) | Op::Scalar(_) | Op::Outer { .. } => {
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
                // Not run at finite width (dense training runs Adam): `pass` refuses it.
                Op::Outer { .. } => !any_point,
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
pub(super) fn sources<'v>(vals: &'v [Val], ops: &[NodeId], p: usize) -> Option<Vec<Operand<'v>>> {
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

/// `e` at every coordinate of point `p`, into `out` (length N), in parallel over
/// fixed chunks of coordinates (each value is computed alone, so the result does not
/// depend on the split).
pub(super) fn eval_column(e: &Expr, src: &[Operand<'_>], out: &mut [f64]) {
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
pub(super) const EVAL_BLOCK: usize = 256;

/// The values of `e` over all points: N×c.
pub(super) fn eval_block(
    e: &Expr,
    vals: &[Val],
    ops: &[NodeId],
    n: usize,
    c: usize,
) -> Option<DMatrix<f64>> {
    let mut out = DMatrix::zeros(n, c);
    for p in 0..c {
        let src = sources(vals, ops, p)?;
        let slice = &mut out.as_mut_slice()[p * n..(p + 1) * n];
        eval_column(e, &src, slice);
    }
    Some(out)
}

/// The number of additions and subtractions in `e`.
pub(super) fn sums(e: &Expr) -> usize {
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
pub(super) fn magnitude(e: &Expr) -> Option<Expr> {
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
pub(super) fn cancelled(
    value: &DMatrix<f64>,
    mag: &DMatrix<f64>,
    ops: usize,
) -> Option<(f64, f64)> {
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
pub(super) fn sample_param(
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

/// The points a run evaluates: a program without inputs runs at one empty point
/// (whatever was passed), every other at the given points.
pub(super) fn run_points(prog: &Program, points: &[Vec<f64>]) -> Vec<Vec<f64>> {
    if prog.inputs.is_empty() {
        vec![vec![]]
    } else {
        points.to_vec()
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::expr::Fun;

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
