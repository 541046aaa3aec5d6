//! The analysis proper: exponents at initialization, the gradient and the first-order change after one step (and a later step), read off the graph instruction by instruction.

use super::*;
use crate::ir::{Law, NodeId, Op, OutTerm, Program, Rational, Role, Ty};

// ---------------------------------------------------------------------------------
// The analysis
// ---------------------------------------------------------------------------------

/// Entry size of a parameter: `n^(p(mult) + p(var)/2)`, zero when it starts at zero.
pub fn entry(law: &Law) -> Ex {
    if law.var.coef == 0.0 || law.mult.coef == 0.0 {
        Ex::Zero
    } else {
        Ex::Pow(law.mult.exp + law.var.exp * Rational::HALF)
    }
}

/// The step size of a parameter, `lr * mult^2 = n^(-c - 2a)` (zero when it is not trained).
pub(super) fn kappa(law: &Law, base_lr: f64) -> Ex {
    if base_lr == 0.0 || law.lr.coef == 0.0 || law.mult.coef == 0.0 {
        Ex::Zero
    } else {
        Ex::Pow(law.lr.exp + law.mult.exp * Rational::int(2))
    }
}

/// One use of a matrix: `out = W @ arg` or `out = W.T @ arg`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Use {
    pub(super) out: NodeId,
    pub(super) arg: NodeId,
    pub(super) transpose: bool,
    /// the argument is a finite input point (an `n x d` matrix)
    pub(super) input: bool,
}

/// The one-step analysis of a program with `train`.
#[derive(Clone, Debug)]
pub struct Step {
    /// `χ_o = ∂L/∂f_o` at initialization, per output (in `prog.outputs` order).
    pub chi0: Vec<Ex>,
    /// `χ_o` after the step.
    pub chi1: Vec<Ex>,
    /// `∂L/∂node` at initialization, per node (per coordinate for vectors).
    pub grad: Vec<Ex>,
    /// Size of the entries of each parameter's update `ΔP` (readouts and vectors: per
    /// coordinate; matrices: the largest direct effect `ΔW y` at a use).
    pub update: Vec<Ex>,
    /// First-order change of every node after one step.
    pub delta: Vec<Ex>,
    /// The same with only parameter `p` updated: `by_param[p][node]`.
    pub by_param: Vec<Vec<Ex>>,
    /// The direct effect of each parameter's update at the nodes that use it
    /// (`ΔW y` at a MatMul, `Δb` at the parameter, `Δv . x` at an output).
    pub direct: Vec<Vec<(NodeId, Ex)>>,
    /// For each readout parameter, `v_0 . Δx` over its terms (Zero for others).
    pub readout_init_term: Vec<Ex>,
}

/// Exponents of every node at initialization, and of one training step.
#[derive(Clone, Debug)]
pub struct Exponents {
    /// Size at initialization, per node.
    pub init: Vec<Ex>,
    /// The first step.
    pub step: Option<Step>,
    /// With `steps >= 2`: a later step, from the sizes after the first one, where the
    /// gradient also flows through the updated readouts. Approximate: the low-rank
    /// first updates of matrices enter only through the vectors' sizes.
    pub later: Option<Step>,
}

pub(super) struct Ctx<'a> {
    pub(super) prog: &'a Program,
    pub(super) flats: Vec<Option<FlatExpr>>,
    pub(super) ops: Vec<Vec<NodeId>>,
    /// Entry size of each parameter as the step sees it (at initialization for the
    /// first step; readouts include their first update for later steps).
    entries: Vec<Ex>,
    /// Cross moments (attention logits), per node ([`moments`]).
    cross: Vec<Option<moments::Cross>>,
    /// How a vector cotangent sums into a scalar operand of a Nonlin: a CLT sum
    /// (`n^(1/2)`), or an LLN sum for a later step's correlated part
    /// ([`moments::later_reduction`]).
    reduce: Ex,
    /// The entrywise optimizer whose steps [`optim`] sizes (None: SGD's rules).
    pub(super) entrywise: Option<optim::Entrywise>,
}

impl<'a> Ctx<'a> {
    pub(super) fn new(prog: &'a Program) -> Ctx<'a> {
        let mut flats = Vec::with_capacity(prog.len());
        let mut ops = Vec::with_capacity(prog.len());
        for id in prog.ids() {
            flats.push(match &prog.node(id).op {
                Op::Nonlin(e) | Op::Moment(e) => Some(FlatExpr::new(e)),
                _ => None,
            });
            ops.push(prog.operands(id));
        }
        let entries = prog.params.iter().map(|p| entry(&p.law)).collect();
        Ctx {
            prog,
            flats,
            ops,
            entries,
            cross: moments::cross_moments(prog),
            reduce: Ex::half(),
            entrywise: optim::Entrywise::of(prog),
        }
    }

    pub(super) fn entry_of(&self, id: NodeId) -> Ex {
        match self.prog.node(id).op {
            Op::Param(p) => self.entries[p],
            _ => Ex::Zero,
        }
    }

    pub(super) fn is_scalar(&self, id: NodeId) -> bool {
        matches!(self.prog.ty(id), Ty::Moment | Ty::Finite)
    }

    pub(super) fn args(&self, id: NodeId, sizes: &[Ex]) -> Vec<Ex> {
        self.ops[id.index()]
            .iter()
            .map(|a| sizes[a.index()])
            .collect()
    }

    pub(super) fn init(&self) -> Vec<Ex> {
        let prog = self.prog;
        let mut e = vec![Ex::Zero; prog.len()];
        for id in prog.ids() {
            let ops = &self.ops[id.index()];
            e[id.index()] = match &prog.node(id).op {
                Op::Input { .. } => Ex::ONE,
                Op::Param(p) => entry(&prog.params[*p].law),
                Op::MatMul { .. } => {
                    let w = self.entry_of(ops[0]);
                    if matches!(prog.ty(ops[1]), Ty::Point(_)) {
                        w
                    } else {
                        Ex::half().mul(w).mul(e[ops[1].index()])
                    }
                }
                Op::Moment(_) if self.cross[id.index()].is_some() => {
                    self.cross[id.index()].map_or(Ex::Zero, |c| moments::init_size(c, &e))
                }
                Op::Nonlin(_) | Op::Moment(_) => self.flats[id.index()]
                    .as_ref()
                    .map_or(Ex::Zero, |f| f.value(&self.args(id, &e))),
                Op::Output { terms, constant } => {
                    let mut s = if *constant != 0.0 { Ex::ONE } else { Ex::Zero };
                    for t in terms {
                        s = s.max(match *t {
                            OutTerm::Readout {
                                coef,
                                readout,
                                vector,
                            } => {
                                let v = self.entry_of(ops[readout]);
                                nz(coef, Ex::half().mul(v).mul(e[ops[vector].index()]))
                            }
                            OutTerm::Scalar { coef, param } => nz(coef, e[ops[param].index()]),
                        });
                    }
                    s
                }
                // Only unrolled training programs hold scalar functions; the
                // exponent analysis reads front-end programs.
                Op::Scalar(_) | Op::Outer { .. } => Ex::Zero,
            };
        }
        e
    }

    /// `∂L/∂node` at initialization, seeded by `χ` at the outputs.
    pub(super) fn backward(&self, init: &[Ex], chi: &[Ex]) -> Vec<Ex> {
        let prog = self.prog;
        let mut g = vec![Ex::Zero; prog.len()];
        for (o, &out) in prog.outputs.iter().enumerate() {
            g[out.index()] = g[out.index()].max(chi[o]);
        }
        for id in prog.ids().collect::<Vec<_>>().into_iter().rev() {
            let gy = g[id.index()];
            if gy == Ex::Zero {
                continue;
            }
            let ops = &self.ops[id.index()];
            match &prog.node(id).op {
                Op::MatMul { .. } => {
                    if !matches!(prog.ty(ops[1]), Ty::Point(_)) {
                        let w = self.entry_of(ops[0]);
                        let a = ops[1].index();
                        g[a] = g[a].max(Ex::half().mul(w).mul(gy));
                    }
                }
                Op::Nonlin(_) | Op::Moment(_) => {
                    let moment = matches!(prog.node(id).op, Op::Moment(_));
                    let Some(f) = &self.flats[id.index()] else {
                        continue;
                    };
                    let (_, d) = f.partials(&self.args(id, init));
                    for (slot, &a) in ops.iter().enumerate() {
                        // a scalar argument of a Nonlin sums n coordinates (CLT: the
                        // gradient is linear in the readouts); a vector argument of a
                        // moment gets 1/n of it
                        let scale = match (moment, self.is_scalar(a)) {
                            (false, true) => self.reduce,
                            (true, false) => Ex::inv_n(),
                            _ => Ex::ONE,
                        };
                        let ga = d[slot].mul(scale).mul(gy);
                        g[a.index()] = g[a.index()].max(ga);
                    }
                }
                Op::Output { terms, .. } => {
                    for t in terms {
                        match *t {
                            OutTerm::Readout {
                                coef,
                                readout,
                                vector,
                            } => {
                                let v = self.entry_of(ops[readout]);
                                let x = ops[vector].index();
                                g[x] = g[x].max(nz(coef, v.mul(gy)));
                            }
                            OutTerm::Scalar { coef, param } => {
                                let b = ops[param].index();
                                g[b] = g[b].max(nz(coef, gy));
                            }
                        }
                    }
                }
                Op::Input { .. } | Op::Param(_) | Op::Scalar(_) | Op::Outer { .. } => {}
            }
        }
        g
    }

    pub(super) fn uses(&self, param: NodeId) -> Vec<Use> {
        self.prog
            .users(param)
            .into_iter()
            .filter_map(|u| match self.prog.node(u).op {
                Op::MatMul { transpose } => {
                    let arg = self.ops[u.index()][1];
                    Some(Use {
                        out: u,
                        arg,
                        transpose,
                        input: matches!(self.prog.ty(arg), Ty::Point(_)),
                    })
                }
                _ => None,
            })
            .collect()
    }

    /// Readout terms `(output index, output node, coef, readout slot param node, vector)`.
    pub(super) fn readout_terms(&self) -> Vec<(usize, NodeId, NodeId, NodeId)> {
        let mut out = Vec::new();
        for (o, &f) in self.prog.outputs.iter().enumerate() {
            if let Op::Output { terms, .. } = &self.prog.node(f).op {
                let ops = &self.ops[f.index()];
                for t in terms {
                    if let OutTerm::Readout {
                        coef,
                        readout,
                        vector,
                    } = *t
                    {
                        if coef != 0.0 {
                            out.push((o, f, ops[readout], ops[vector]));
                        }
                    }
                }
            }
        }
        out
    }

    /// The direct effect of updating parameter `p` at the nodes that use it.
    pub(super) fn direct(
        &self,
        p: usize,
        init: &[Ex],
        grad: &[Ex],
        chi: &[Ex],
        lr: f64,
    ) -> Vec<(NodeId, Ex)> {
        if let Some(o) = self.entrywise {
            return optim::direct(self, o, p, init, grad, chi, lr);
        }
        let prog = self.prog;
        let param = &prog.params[p];
        let k = kappa(&param.law, lr);
        let node = param.node;
        let mut out = Vec::new();
        match param.role() {
            Role::Hidden | Role::Input => {
                let uses = self.uses(node);
                for v in &uses {
                    let mut s = Ex::Zero;
                    for u in &uses {
                        let t = if v.input || u.input {
                            // (xi_s . xi) is a finite sum
                            grad[u.out.index()]
                        } else {
                            // same orientation: dh_u (x_u . y), two forward vectors (LLN);
                            // opposite: x_u (dh_u . y), a gradient against a forward
                            // vector (CLT)
                            let ip = if u.transpose == v.transpose {
                                Ex::n()
                            } else {
                                Ex::half()
                            };
                            ip.mul(grad[u.out.index()])
                                .mul(init[u.arg.index()])
                                .mul(init[v.arg.index()])
                        };
                        s = s.max(t);
                    }
                    out.push((v.out, k.mul(s)));
                }
            }
            Role::Bias | Role::OutputBias => out.push((node, k.mul(grad[node.index()]))),
            Role::Output => {
                let terms = self.readout_terms();
                // Δv = -κ sum_u χ_u x_u ; Δv . x' is an LLN sum of forward vectors
                let mut dv = Ex::Zero;
                for &(o, _, v, x) in &terms {
                    if v == node {
                        dv = dv.max(chi[o].mul(init[x.index()]));
                    }
                }
                for &(_, f, v, x) in &terms {
                    if v == node {
                        out.push((f, k.mul(dv).mul(Ex::n()).mul(init[x.index()])));
                    }
                }
            }
        }
        out
    }

    /// Pushes direct effects through the graph to first order.
    pub(super) fn propagate(&self, init: &[Ex], direct: &[(NodeId, Ex)]) -> Vec<Ex> {
        let prog = self.prog;
        let mut d = vec![Ex::Zero; prog.len()];
        for &(n, e) in direct {
            d[n.index()] = d[n.index()].max(e);
        }
        for id in prog.ids() {
            let i = id.index();
            let ops = &self.ops[i];
            let prop = match &prog.node(id).op {
                Op::Input { .. } | Op::Param(_) => Ex::Zero,
                Op::MatMul { .. } => {
                    if matches!(prog.ty(ops[1]), Ty::Point(_)) {
                        Ex::Zero
                    } else {
                        // W_0 Δy: a CLT sum
                        let w = self.entry_of(ops[0]);
                        Ex::half().mul(w).mul(d[ops[1].index()])
                    }
                }
                Op::Moment(_) if self.cross[i].is_some() => {
                    self.cross[i].map_or(Ex::Zero, |c| moments::change(c, init, &d, direct))
                }
                Op::Nonlin(_) | Op::Moment(_) => {
                    let Some(f) = &self.flats[i] else { continue };
                    let a0 = self.args(id, init);
                    if ops.iter().all(|a| d[a.index()] == Ex::Zero) {
                        Ex::Zero
                    } else {
                        let (_, der) = f.partials(&a0);
                        let mut first = Ex::Zero;
                        for (slot, a) in ops.iter().enumerate() {
                            first = first.max(der[slot].mul(d[a.index()]));
                        }
                        // a saturating function cannot move by more than its range
                        let a1: Vec<Ex> = ops
                            .iter()
                            .map(|a| init[a.index()].max(d[a.index()]))
                            .collect();
                        first.min(init[i].max(f.value(&a1)))
                    }
                }
                Op::Output { terms, .. } => {
                    let mut s = Ex::Zero;
                    for t in terms {
                        s = s.max(match *t {
                            // v_0 . Δx: Δx is correlated with v (LLN)
                            OutTerm::Readout {
                                coef,
                                readout,
                                vector,
                            } => {
                                let v = self.entry_of(ops[readout]);
                                nz(coef, Ex::n().mul(v).mul(d[ops[vector].index()]))
                            }
                            OutTerm::Scalar { coef, param } => nz(coef, d[ops[param].index()]),
                        });
                    }
                    s
                }
                Op::Scalar(_) | Op::Outer { .. } => Ex::Zero,
            };
            d[i] = d[i].max(prop);
        }
        d
    }

    pub(super) fn chi(&self, f: &[Ex]) -> Vec<Ex> {
        let Some(train) = &self.prog.train else {
            return Vec::new();
        };
        (0..self.prog.outputs.len())
            .map(|o| {
                let fo = f[self.prog.outputs[o].index()];
                match train.loss {
                    crate::ir::Loss::Xent => Ex::ONE,
                    crate::ir::Loss::Mse => {
                        if train
                            .data
                            .iter()
                            .all(|s| s.y.get(o).is_none_or(|&y| y == 0.0))
                        {
                            fo
                        } else {
                            fo.max(Ex::ONE)
                        }
                    }
                }
            })
            .collect()
    }
}

pub(super) fn nz(coef: f64, e: Ex) -> Ex {
    if coef == 0.0 {
        Ex::Zero
    } else {
        e
    }
}

/// One step from sizes `base` (vectors at the step's start) with loss derivatives `chi`;
/// `also` computes a second gradient (a later step's correlated part), the larger taken.
pub(super) fn one_step(cx: &Ctx, base: &[Ex], chi: Vec<Ex>, lr: f64, also: Option<&Ctx>) -> Step {
    let prog = cx.prog;
    let mut grad = cx.backward(base, &chi);
    if let Some(c) = also {
        for (g, h) in grad.iter_mut().zip(c.backward(base, &chi)) {
            *g = (*g).max(h);
        }
    }
    let mut delta = vec![Ex::Zero; prog.len()];
    let mut by_param = Vec::new();
    let mut direct = Vec::new();
    let mut update = Vec::new();
    let terms = cx.readout_terms();
    for p in 0..prog.params.len() {
        let dir = cx.direct(p, base, &grad, &chi, lr);
        let d = cx.propagate(base, &dir);
        for (t, x) in delta.iter_mut().zip(&d) {
            *t = (*t).max(*x);
        }
        update.push(match (prog.params[p].role(), cx.entrywise) {
            // an entrywise optimizer: the readout's entries move by Θ(lr · mult)
            (Role::Output, Some(o)) => optim::update_entry(cx, o, p, base, &grad, &chi, lr),
            (Role::Output, None) => {
                let k = kappa(&prog.params[p].law, lr);
                let mut dv = Ex::Zero;
                for &(o, _, v, x) in &terms {
                    if v == prog.params[p].node {
                        dv = dv.max(chi[o].mul(base[x.index()]));
                    }
                }
                k.mul(dv)
            }
            _ => dir.iter().map(|x| x.1).max().unwrap_or(Ex::Zero),
        });
        by_param.push(d);
        direct.push(dir);
    }
    if cx.entrywise.is_some() {
        optim::joint_outputs(cx, base, &mut delta, &by_param);
    }
    let mut readout_init_term = vec![Ex::Zero; prog.params.len()];
    for &(_, _, v, x) in &terms {
        if let Op::Param(p) = prog.node(v).op {
            let e = Ex::n().mul(cx.entries[p]).mul(delta[x.index()]);
            readout_init_term[p] = readout_init_term[p].max(e);
        }
    }
    let after: Vec<Ex> = base.iter().zip(&delta).map(|(a, b)| (*a).max(*b)).collect();
    let chi1 = cx.chi(&after);
    Step {
        chi0: chi,
        chi1,
        grad,
        update,
        delta,
        by_param,
        direct,
        readout_init_term,
    }
}

/// The exponents of every node at initialization and, with `train`, after one step.
pub fn exponents(prog: &Program) -> Exponents {
    exponents_with(prog, optim::Entrywise::of(prog))
}

/// [`exponents`] with the entrywise optimizer's ε read as given (W0109 compares ε
/// strictly asymptotic and ε → 0).
pub(super) fn exponents_with(prog: &Program, entrywise: Option<optim::Entrywise>) -> Exponents {
    let new = |prog| {
        let mut c = Ctx::new(prog);
        c.entrywise = entrywise;
        c
    };
    let cx = new(prog);
    let init = cx.init();
    let mut later = None;
    let step = prog.train.as_ref().map(|train| {
        let first = one_step(&cx, &init, cx.chi(&init), train.lr, None);
        if train.steps >= 2 {
            // From the second update on, the gradient reaching the features also flows
            // through the updated readouts (theory.md §5.2, "First step vs later steps":
            // TP4's min(a+b, 2a+c)), and the loss derivative is chi_1.
            let mut cx2 = new(prog);
            for (p, par) in prog.params.iter().enumerate() {
                if par.role() == Role::Output {
                    cx2.entries[p] = cx2.entries[p].max(first.update[p]);
                }
            }
            let base: Vec<Ex> = init
                .iter()
                .zip(&first.delta)
                .map(|(a, b)| (*a).max(*b))
                .collect();
            // Netsor+: the part of the cotangent the moved readouts carry is correlated
            // with the features, so it sums into scalar operands at the LLN rate
            // ([`moments::later_reduction`]).
            let corr = moments::has_scalar_operands(prog).then(|| {
                let mut c = new(prog);
                for (p, par) in prog.params.iter().enumerate() {
                    if par.role() == Role::Output {
                        c.entries[p] = first.update[p];
                    }
                }
                c.reduce = moments::later_reduction();
                c
            });
            later = Some(one_step(
                &cx2,
                &base,
                first.chi1.clone(),
                train.lr,
                corr.as_ref(),
            ));
        }
        first
    });
    Exponents { init, step, later }
}
