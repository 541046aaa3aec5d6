//! The forward and reverse passes of one draw over the IR at width N: every vector
//! an N×c block (c = P points, or 1 when broadcast), every cotangent an N×(O·P)
//! block, hidden products from the sampled matrices or from an engine
//! (`HiddenProducts`).

use std::sync::Arc;

use nalgebra::DMatrix;
use rayon::prelude::*;

use super::linalg::{gemm, Trans};
use super::plan::{cancelled, col, eval_block, sums, Plan, Sampled, Val};
use super::types::{bug, out_of_range, Cot, HiddenProducts, RunError};
use crate::ir::{Expr, NodeId, Op, Shape};

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
            Op::Outer { .. } => {
                return Err(bug(
                    Some(id),
                    "a nonlinear outer product (Adam's unrolled limit program) is not run at \
                     finite width: dense training runs Adam",
                ))
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
