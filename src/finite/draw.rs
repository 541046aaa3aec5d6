//! One draw: the passes ([`super::pass`]) and the kernels they give. The NNGP is
//! conditioned on the last features; the NTK's Gram entries factor over a matrix's
//! uses into products of small Gram matrices (theory.md §2.3), so no N×N gradient is
//! ever formed.

use std::sync::Arc;

use nalgebra::DMatrix;

use super::linalg::gram_tn;
use super::pass::{backward, forward_with};
use super::plan::{col, sampled_of, Plan, Sampled, Val};
use super::types::{bug, describe_value, out_of_range, Cot, Draw, HiddenProducts, RunError};
use crate::ir::{Op, OutTerm, Shape};

/// Runs one draw on given trainable values `ws` (as [`sample_params`] shapes them):
/// forward, backward, kernels. `draw` only labels error messages.
pub(super) fn run_draw(
    plan: &Plan<'_>,
    n: usize,
    ws: &[DMatrix<f64>],
    draw: usize,
) -> Result<Draw, RunError> {
    let sampled = sampled_of(plan.prog, n, ws)?;
    run_draw_with(plan, n, &sampled, draw, None).map(|(d, _)| d)
}

/// [`run_draw`] on paired values, with hidden products from `engine` when given, in
/// the forward and the reverse pass alike: the reverse pass's Wᵀδ and Wδ are then
/// drawn given the forward products, which is their joint law (Netsor-transpose), so
/// the NTK is exact in law too. Its Gram needs no W: (δ·δ')(x·x') per pair of uses.
pub(super) fn run_draw_with(
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
