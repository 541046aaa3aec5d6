//! Cross moments (attention logits) in the abc analysis (theory.md §1.1, §5.2–5.3).
//!
//! Why a module of its own: the parent analysis sizes a moment `mean(f(x, …))` at
//! coordinate level, `Θ(f)` — right when `E[f(Z)] ≠ 0`, an upper bound otherwise. For a
//! logit `a = mean(q * k)` that bound is wrong in both directions that matter:
//!
//! * **at initialization** `q = Q u` is a centered Gaussian independent of `k` (Q is
//!   not among k's ancestors), so `E[Z^q Z^k] = 0` and `a` is a CLT sum:
//!   `Θ(q) Θ(k) n^(-1/2)`, not `Θ(q) Θ(k)`. In muP (1/n logits of Θ(1) vectors) the
//!   logits start at `Θ(n^(-1/2))`, 0 in the limit; with `q` scaled up by `n^(1/2)` (a
//!   1/√n logit) they start at Θ(1), random;
//! * **after a step** the change `mean(Δq k) + mean(q Δk)` is an LLN sum only for the
//!   part of `Δq` that is correlated with `k`. The matrix's own update `ΔQ u` moves `q`
//!   along `∂L/∂q`, and `∂L/∂q ∝ k / n` through this very moment: correlated, so
//!   `Θ(ΔQ u) Θ(k)`. Every other change of `q` (`Q Δu`, a fresh direction of Q's
//!   Gaussian family) is independent of `k` to first order: a CLT sum,
//!   `Θ(Δq) Θ(k) n^(-1/2)`. (`W Wᵀ g`-type Ż terms, which also correlate, are not
//!   tracked: a lower bound there.)
//!
//! So with 1/√n logits of Θ(1)-coordinate vectors under muP learning rates, `ΔK u` is
//! Θ(1) and correlated with `q = Θ(n^(1/2))`: the logits move by `Θ(n^(1/2))` after one
//! step (W0106, with the 1/n fix), while a muP transformer's move by `Θ(n^(-1/2))` at
//! the first step (the logits' gradient is a CLT sum of readout-linear terms) and by
//! Θ(1) from the second on, once the readout has moved along the features (the later
//! step's gradient, [`later_reduction`]). `tpc coord-check` measures cross moments.

use std::collections::BTreeSet;

use super::{node_name, Ex, Exponents};
use crate::diag::Diagnostic;
use crate::ir::{Expr, NodeId, Op, Program, Ty};

/// A cross moment `c · mean(x * y)` of two vectors, one of them a centered Gaussian at
/// initialization independent of the other (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Cross {
    pub x: NodeId,
    pub y: NodeId,
}

/// `c * Arg(i) * Arg(j)` (constants and signs stripped): the operand slots.
fn bilinear(e: &Expr) -> Option<(usize, usize)> {
    fn factors(e: &Expr, out: &mut Vec<usize>) -> bool {
        match e {
            Expr::Arg(i) => {
                out.push(*i);
                true
            }
            Expr::Const(c) => *c != 0.0,
            Expr::Neg(x) => factors(x, out),
            Expr::Mul(a, b) => factors(a, out) && factors(b, out),
            Expr::Div(a, b) => matches!(**b, Expr::Const(c) if c != 0.0) && factors(a, out),
            _ => false,
        }
    }
    let mut f = Vec::new();
    (factors(e, &mut f) && f.len() == 2 && f[0] != f[1]).then(|| (f[0], f[1]))
}

/// The parameters each node depends on (through any operand, moments included).
fn ancestors(prog: &Program) -> Vec<BTreeSet<usize>> {
    let mut deps: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); prog.len()];
    for id in prog.ids() {
        let mut d = BTreeSet::new();
        if let Op::Param(p) = prog.node(id).op {
            d.insert(p);
        }
        for a in prog.operands(id) {
            d.extend(deps[a.index()].iter().copied());
        }
        deps[id.index()] = d;
    }
    deps
}

/// `x = M @ z` with M a matrix parameter that neither `z` nor `y` depends on: `Z^x` is a
/// centered Gaussian independent of `Z^y` (theory.md §2.1), so `E[Z^x Z^y] = 0`.
fn centered_against(prog: &Program, deps: &[BTreeSet<usize>], x: NodeId, y: NodeId) -> bool {
    if !matches!(prog.node(x).op, Op::MatMul { transpose: false }) {
        return false;
    }
    let ops = prog.operands(x);
    let Op::Param(m) = prog.node(ops[0]).op else {
        return false;
    };
    !deps[ops[1].index()].contains(&m) && !deps[y.index()].contains(&m)
}

/// Every node's cross moment, if it is one (module docs).
pub(super) fn cross_moments(prog: &Program) -> Vec<Option<Cross>> {
    let deps = ancestors(prog);
    prog.ids()
        .map(|id| {
            let Op::Moment(e) = &prog.node(id).op else {
                return None;
            };
            let ops = prog.operands(id);
            let (i, j) = bilinear(e)?;
            let (x, y) = (*ops.get(i)?, *ops.get(j)?);
            if prog.ty(x) != Ty::Vector || prog.ty(y) != Ty::Vector {
                return None;
            }
            (centered_against(prog, &deps, x, y) || centered_against(prog, &deps, y, x))
                .then_some(Cross { x, y })
        })
        .collect()
}

/// Whether `id` is a cross moment (an attention logit `mean(q * k)`): the moments
/// `tpc coord-check` measures.
pub fn is_cross_moment(prog: &Program, id: NodeId) -> bool {
    cross_moments(prog)
        .get(id.index())
        .is_some_and(|c| c.is_some())
}

/// The size at initialization: a CLT sum (module docs).
pub(super) fn init_size(c: Cross, init: &[Ex]) -> Ex {
    init[c.x.index()]
        .mul(init[c.y.index()])
        .mul(Ex::half().recip())
}

/// The first-order change after a step whose direct effects are `direct` and whose
/// changes are `d` (module docs): the correlated part `Θ(ΔM x) Θ(y)` from a directly
/// updated product, the rest a CLT sum.
pub(super) fn change(c: Cross, init: &[Ex], d: &[Ex], direct: &[(NodeId, Ex)]) -> Ex {
    let mut out = Ex::Zero;
    for (a, b) in [(c.x, c.y), (c.y, c.x)] {
        let own = direct
            .iter()
            .filter(|(n, _)| *n == a)
            .map(|x| x.1)
            .max()
            .unwrap_or(Ex::Zero);
        let ib = init[b.index()];
        out = out
            .max(own.mul(ib))
            .max(d[a.index()].mul(ib).mul(Ex::half().recip()));
    }
    out
}

/// How a later step's gradient reaches a scalar operand of a Nonlin from its vector
/// cotangent. At initialization the cotangent is linear in the readouts, independent
/// of the forward vectors: a CLT sum (`n^(1/2)`, the parent's backward). After the first
/// step the readouts have moved along the features (`Δv ∝ Σ χ x`), and the part of the
/// cotangent they carry is correlated with the forward vectors: an LLN sum. The later
/// step takes the larger of the two gradients (the parent's `exponents`).
pub(super) fn later_reduction() -> Ex {
    Ex::n()
}

/// Whether some Nonlin takes a scalar operand (Netsor+): only then does the later
/// step's correlated gradient differ from the parent's.
pub(super) fn has_scalar_operands(prog: &Program) -> bool {
    prog.ids().any(|id| {
        matches!(prog.node(id).op, Op::Nonlin(_))
            && prog
                .operands(id)
                .iter()
                .any(|&a| matches!(prog.ty(a), Ty::Moment | Ty::Finite))
    })
}

/// The note of W0106: which factor's own update, correlated with the other factor,
/// moves the logit (module docs).
fn why_it_moves(prog: &Program, ex: &Exponents, step: &super::Step, c: Cross, moved: Ex) -> String {
    // (correlated part, parameter, its direct change of `a`, a, b)
    let mut best: Option<(Ex, usize, Ex, NodeId, NodeId)> = None;
    for (a, b) in [(c.x, c.y), (c.y, c.x)] {
        for (p, dir) in step.direct.iter().enumerate() {
            for &(n, e) in dir {
                let corr = e.mul(ex.init[b.index()]);
                if n == a && best.is_none_or(|x| corr > x.0) {
                    best = Some((corr, p, e, a, b));
                }
            }
        }
    }
    match best {
        Some((corr, p, e, a, b)) if corr == moved => format!(
            "one step of `{}` moves `{}` by {} per coordinate along ∂L/∂({}) ∝ `{}` (this logit's \
             own gradient), so the moment adds those changes coherently: {} × {} = {}",
            prog.params[p].name,
            node_name(prog, a),
            e.theta(),
            node_name(prog, a),
            node_name(prog, b),
            e.theta(),
            ex.init[b.index()].theta(),
            moved.theta()
        ),
        _ => format!(
            "one step moves `{}` by {} and `{}` by {} per coordinate",
            node_name(prog, c.x),
            step.delta[c.x.index()].theta(),
            node_name(prog, c.y),
            step.delta[c.y.index()].theta()
        ),
    }
}

/// W0106: a cross moment (a logit) that one step moves by more than Θ(1), at its line,
/// with the figures and the 1/n fix. One warning per source span (a loop's logits share
/// one).
pub(super) fn logit_warnings(prog: &Program, ex: &Exponents) -> Vec<Diagnostic> {
    let Some(step) = &ex.step else {
        return Vec::new();
    };
    let names = prog.stable_names();
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, c) in cross_moments(prog).into_iter().enumerate() {
        let Some(c) = c else { continue };
        let id = NodeId::new(i);
        let (init, moved) = (ex.init[i], step.delta[i]);
        if !moved.blows_up() || !seen.insert((prog.node(id).span.start, prog.node(id).span.end)) {
            continue;
        }
        let (x, y) = (c.x.index(), c.y.index());
        let size = |e: Ex| e.theta();
        let d = Diagnostic::warning(
            "W0106",
            format!(
                "the logit `{}` moves by {} after one step (it is {} at initialization)",
                names[i],
                size(moved),
                size(init)
            ),
            prog.node(id).span,
            format!(
                "a moment of `{}` ({} per coordinate) and `{}` ({})",
                node_name(prog, c.x),
                size(ex.init[x]),
                node_name(prog, c.y),
                size(ex.init[y])
            ),
        )
        .with_note(why_it_moves(prog, ex, step, c, moved))
        .with_help(
            "use 1/n logits, as muP prescribes (theory.md §5.3): `mean(q * k)` of vectors with \
             Θ(1) coordinates (`q = Q @ u` with `Q` a muP hidden matrix, no n^(1/2) multiplier); \
             a 1/√n logit of Θ(1) vectors moves by Θ(n^(1/2)) once q and k align",
        );
        out.push(d);
    }
    out
}
