//! Scaling diagnostics: abc exponents read off the IR graph (theory.md §5).
//!
//! For every node the analysis derives the exponent `e` of its size `Θ(n^e)` (per
//! coordinate for width-n vectors, the value itself for scalars and outputs):
//!
//! * **at initialization**, propagating forward node by node: a parameter vector has
//!   entries `n^(p(mult) + p(var)/2)`; a hidden `W @ x` is a CLT sum of n independent
//!   terms, `n^(1/2) * entry(W) * x`; an input-layer `U @ xi` is a finite sum; a
//!   coordinatewise function follows its growth (homogeneous functions pass the
//!   exponent, saturating ones cap it at 0, sums take the max, products add); an output
//!   `v @ x` is a CLT sum;
//! * **the gradient** `∂L/∂x` at initialization, backward through the transposes (at
//!   initialization it is linear in the readouts, so its inner products with forward
//!   vectors are CLT sums);
//! * **the first-order change after one SGD step** (the tangent map of the update, what
//!   TP4's `r` measures): `ΔW y = -lr n^(-c) mult^2 sum_s dh_s (x_s . y)`, with the inner
//!   product of two forward vectors an LLN sum (`n^(1 + e + e')`), a finite sum for
//!   input points, a CLT sum for a forward vector against a gradient; the change is
//!   then pushed through the graph (`W_0 Δx` at the CLT rate, `v_0 . Δx` and
//!   `Δv . x` at the LLN rate since `Δx` and `Δv` are correlated with `v` and `x`).
//!
//! Nothing here knows what an MLP is: the rules are local to the graph's instructions,
//! and TP4's closed forms (r, r_l, Thm 3.3) come out for MLPs (see the tests). From the
//! exponents a training program is classified (TP4 §3, theory.md §5.2–5.3, §5.6):
//! unstable, trivial, kernel regime or feature learning, with the parameters updated
//! maximally and muP recognized; [`diagnostics`] turns that into warnings and notes
//! with a muP law (shifted by the abc symmetry to the parameter's own learning-rate
//! exponent) as help.
//!
//! Moments are treated at coordinate level (an upper bound: a mean of zero-mean
//! coordinates can be smaller), except cross moments `mean(q * k)` of independent
//! vectors, attention logits, which `scaling::moments` sizes as CLT sums at
//! initialization and splits into correlated and independent parts after a step.
//! Beyond Θ(1) the first-order change is a lower bound on the blow-up: nonlinear
//! effects of a blown-up step only make it larger.

use std::cmp::Ordering;
use std::fmt;

use crate::diag::Diagnostic;
use crate::ir::{Expr, Fun, Law, Monomial, NodeId, Op, OutTerm, Program, Rational, Role, Span, Ty};

mod moments;
pub use moments::is_cross_moment;

// ---------------------------------------------------------------------------------
// Exponents
// ---------------------------------------------------------------------------------

/// The size of a quantity as n grows: exactly zero, `Θ(n^p)`, or faster than any power.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ex {
    Zero,
    Pow(Rational),
    Inf,
}

impl Ex {
    /// Θ(1).
    pub const ONE: Ex = Ex::Pow(Rational::ZERO);

    pub fn pow(p: Rational) -> Ex {
        Ex::Pow(p)
    }
    fn half() -> Ex {
        Ex::Pow(Rational::HALF)
    }
    fn n() -> Ex {
        Ex::Pow(Rational::ONE)
    }
    fn inv_n() -> Ex {
        Ex::Pow(-Rational::ONE)
    }

    /// The exponent p of Θ(n^p), if the size is a power.
    pub fn exponent(self) -> Option<Rational> {
        match self {
            Ex::Pow(p) => Some(p),
            _ => None,
        }
    }

    /// The size of a product.
    #[allow(clippy::should_implement_trait)]
    pub fn mul(self, o: Ex) -> Ex {
        match (self, o) {
            (Ex::Zero, _) | (_, Ex::Zero) => Ex::Zero,
            (Ex::Inf, _) | (_, Ex::Inf) => Ex::Inf,
            (Ex::Pow(a), Ex::Pow(b)) => Ex::Pow(a + b),
        }
    }

    /// The size of a reciprocal.
    pub fn recip(self) -> Ex {
        match self {
            Ex::Zero => Ex::Inf,
            Ex::Inf => Ex::Zero,
            Ex::Pow(p) => Ex::Pow(-p),
        }
    }

    /// `self^k`.
    pub fn powi(self, k: i32) -> Ex {
        match (self, k.cmp(&0)) {
            (_, Ordering::Equal) => Ex::ONE,
            (Ex::Pow(p), _) => Ex::Pow(p * Rational::int(k as i64)),
            (e, Ordering::Greater) => e,
            (e, Ordering::Less) => e.recip(),
        }
    }

    /// Grows without bound.
    pub fn blows_up(self) -> bool {
        self > Ex::ONE
    }
    /// Goes to zero (or is zero).
    pub fn vanishes(self) -> bool {
        self < Ex::ONE
    }

    /// `Θ(n^(1/2))`, `Θ(1)`, `0`.
    pub fn theta(self) -> String {
        match self {
            Ex::Zero => "0".to_string(),
            Ex::Inf => "more than any power of n".to_string(),
            Ex::Pow(p) => format!("Θ({})", n_pow(p)),
        }
    }
}

/// `1`, `n`, `n^2`, `n^(1/2)`, `n^(-1)`.
fn n_pow(p: Rational) -> String {
    if p.is_zero() {
        "1".to_string()
    } else if p == Rational::ONE {
        "n".to_string()
    } else if p.den() == 1 && p.num() > 0 {
        format!("n^{}", p.num())
    } else {
        format!("n^({p})")
    }
}

impl PartialOrd for Ex {
    fn partial_cmp(&self, o: &Ex) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ex {
    fn cmp(&self, o: &Ex) -> Ordering {
        let rank = |e: &Ex| match e {
            Ex::Zero => 0,
            Ex::Pow(_) => 1,
            Ex::Inf => 2,
        };
        match (self, o) {
            (Ex::Pow(a), Ex::Pow(b)) => a.cmp(b),
            _ => rank(self).cmp(&rank(o)),
        }
    }
}

/// The exponent as a table cell: `1/2`, `0`, `-inf` (exactly zero), `inf`.
impl fmt::Display for Ex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ex::Zero => f.write_str("-inf"),
            Ex::Inf => f.write_str("inf"),
            Ex::Pow(p) => write!(f, "{p}"),
        }
    }
}

// ---------------------------------------------------------------------------------
// Coordinatewise expressions: value and partial-derivative sizes
// ---------------------------------------------------------------------------------

/// phi(x)'s size from x's: homogeneous functions pass it, saturating ones cap it at 1.
fn fun_value(f: Fun, x: Ex) -> Ex {
    match f {
        Fun::Relu | Fun::Id | Fun::Abs | Fun::Gelu => x,
        // functions of scalars: Θ(1) scalars stay Θ(1) (an upper bound when not)
        Fun::Sqrt | Fun::Log => {
            if x.blows_up() {
                Ex::Inf
            } else {
                Ex::ONE
            }
        }
        // odd, linear at 0, bounded
        Fun::Tanh | Fun::Erf | Fun::Sin => x.min(Ex::ONE),
        // phi(0) != 0, bounded
        Fun::Sigmoid | Fun::Cos => Ex::ONE,
        Fun::Step => {
            if x == Ex::Zero {
                Ex::Zero
            } else {
                Ex::ONE
            }
        }
        Fun::Exp => {
            if x.blows_up() {
                Ex::Inf
            } else {
                Ex::ONE
            }
        }
    }
}

/// phi'(x)'s size from x's (bounded derivatives count as Θ(1): an upper bound).
fn fun_deriv(f: Fun, x: Ex) -> Ex {
    match f {
        Fun::Relu => {
            // relu'(0) = 0, as the executor takes it
            if x == Ex::Zero {
                Ex::Zero
            } else {
                Ex::ONE
            }
        }
        Fun::Id | Fun::Abs | Fun::Gelu | Fun::Tanh | Fun::Erf | Fun::Sigmoid | Fun::Sin => Ex::ONE,
        Fun::Cos => x.min(Ex::ONE),
        Fun::Step => Ex::Zero,
        Fun::Exp | Fun::Sqrt | Fun::Log => fun_value(f, x),
    }
}

#[derive(Clone, Debug)]
enum Flat {
    Arg(usize),
    Const(f64),
    Call(Fun, usize),
    Neg(usize),
    Add(usize, usize),
    Mul(usize, usize),
    Div(usize, usize),
    Powi(usize, i32),
}

/// An expression flattened in post-order (children before parents).
#[derive(Clone, Debug)]
struct FlatExpr(Vec<Flat>);

impl FlatExpr {
    fn new(e: &Expr) -> FlatExpr {
        fn go(e: &Expr, out: &mut Vec<Flat>) -> usize {
            let node = match e {
                Expr::Arg(i) => Flat::Arg(*i),
                Expr::Const(c) => Flat::Const(*c),
                Expr::Call(f, x) => Flat::Call(*f, go(x, out)),
                Expr::Neg(x) => Flat::Neg(go(x, out)),
                Expr::Add(a, b) | Expr::Sub(a, b) => {
                    let a = go(a, out);
                    Flat::Add(a, go(b, out))
                }
                Expr::Mul(a, b) => {
                    let a = go(a, out);
                    Flat::Mul(a, go(b, out))
                }
                Expr::Div(a, b) => {
                    let a = go(a, out);
                    Flat::Div(a, go(b, out))
                }
                Expr::Powi(a, k) => Flat::Powi(go(a, out), *k),
            };
            out.push(node);
            out.len() - 1
        }
        let mut v = Vec::new();
        go(e, &mut v);
        FlatExpr(v)
    }

    fn values(&self, args: &[Ex]) -> Vec<Ex> {
        let mut v: Vec<Ex> = Vec::with_capacity(self.0.len());
        for n in &self.0 {
            let x = match *n {
                Flat::Arg(i) => args.get(i).copied().unwrap_or(Ex::ONE),
                Flat::Const(c) => {
                    if c == 0.0 {
                        Ex::Zero
                    } else {
                        Ex::ONE
                    }
                }
                Flat::Call(f, a) => fun_value(f, v[a]),
                Flat::Neg(a) => v[a],
                Flat::Add(a, b) => v[a].max(v[b]),
                Flat::Mul(a, b) => v[a].mul(v[b]),
                Flat::Div(a, b) => {
                    if v[a] == Ex::Zero {
                        Ex::Zero
                    } else {
                        v[a].mul(v[b].recip())
                    }
                }
                Flat::Powi(a, k) => v[a].powi(k),
            };
            v.push(x);
        }
        v
    }

    /// The size of the value.
    fn value(&self, args: &[Ex]) -> Ex {
        self.values(args).last().copied().unwrap_or(Ex::Zero)
    }

    /// The sizes of the value and of the partial derivative in every argument
    /// (reverse mode on sizes: one pass whatever the number of arguments).
    fn partials(&self, args: &[Ex]) -> (Ex, Vec<Ex>) {
        let v = self.values(args);
        let mut adj = vec![Ex::Zero; v.len()];
        let mut d = vec![Ex::Zero; args.len()];
        if let Some(last) = adj.last_mut() {
            *last = Ex::ONE;
        }
        for k in (0..self.0.len()).rev() {
            let g = adj[k];
            if g == Ex::Zero {
                continue;
            }
            let mut bump = |i: usize, e: Ex| adj[i] = adj[i].max(e);
            match self.0[k] {
                Flat::Arg(i) => {
                    if i < d.len() {
                        d[i] = d[i].max(g);
                    }
                }
                Flat::Const(_) => {}
                Flat::Call(f, a) => bump(a, g.mul(fun_deriv(f, v[a]))),
                Flat::Neg(a) => bump(a, g),
                Flat::Add(a, b) => {
                    bump(a, g);
                    bump(b, g);
                }
                Flat::Mul(a, b) => {
                    bump(a, g.mul(v[b]));
                    bump(b, g.mul(v[a]));
                }
                Flat::Div(a, b) => {
                    let inv = v[b].recip();
                    bump(a, g.mul(inv));
                    bump(b, g.mul(v[a]).mul(inv).mul(inv));
                }
                Flat::Powi(a, k) => bump(a, g.mul(v[a].powi(k - 1))),
            }
        }
        (v.last().copied().unwrap_or(Ex::Zero), d)
    }
}

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
fn kappa(law: &Law, base_lr: f64) -> Ex {
    if base_lr == 0.0 || law.lr.coef == 0.0 || law.mult.coef == 0.0 {
        Ex::Zero
    } else {
        Ex::Pow(law.lr.exp + law.mult.exp * Rational::int(2))
    }
}

/// One use of a matrix: `out = W @ arg` or `out = W.T @ arg`.
#[derive(Clone, Copy, Debug)]
struct Use {
    out: NodeId,
    arg: NodeId,
    transpose: bool,
    /// the argument is a finite input point (an `n x d` matrix)
    input: bool,
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

struct Ctx<'a> {
    prog: &'a Program,
    flats: Vec<Option<FlatExpr>>,
    ops: Vec<Vec<NodeId>>,
    /// Entry size of each parameter as the step sees it (at initialization for the
    /// first step; readouts include their first update for later steps).
    entries: Vec<Ex>,
    /// Cross moments (attention logits), per node ([`moments`]).
    cross: Vec<Option<moments::Cross>>,
    /// How a vector cotangent sums into a scalar operand of a Nonlin: a CLT sum
    /// (`n^(1/2)`), or an LLN sum for a later step's correlated part
    /// ([`moments::later_reduction`]).
    reduce: Ex,
}

impl<'a> Ctx<'a> {
    fn new(prog: &'a Program) -> Ctx<'a> {
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
        }
    }

    fn entry_of(&self, id: NodeId) -> Ex {
        match self.prog.node(id).op {
            Op::Param(p) => self.entries[p],
            _ => Ex::Zero,
        }
    }

    fn is_scalar(&self, id: NodeId) -> bool {
        matches!(self.prog.ty(id), Ty::Moment | Ty::Finite)
    }

    fn args(&self, id: NodeId, sizes: &[Ex]) -> Vec<Ex> {
        self.ops[id.index()]
            .iter()
            .map(|a| sizes[a.index()])
            .collect()
    }

    fn init(&self) -> Vec<Ex> {
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
                // Only unrolled limit programs hold one (never analyzed here).
                Op::Outer { .. } => Ex::Zero,
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
                Op::Scalar(_) => Ex::Zero,
            };
        }
        e
    }

    /// `∂L/∂node` at initialization, seeded by `χ` at the outputs.
    fn backward(&self, init: &[Ex], chi: &[Ex]) -> Vec<Ex> {
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

    fn uses(&self, param: NodeId) -> Vec<Use> {
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
    fn readout_terms(&self) -> Vec<(usize, NodeId, NodeId, NodeId)> {
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
    fn direct(&self, p: usize, init: &[Ex], grad: &[Ex], chi: &[Ex], lr: f64) -> Vec<(NodeId, Ex)> {
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
    fn propagate(&self, init: &[Ex], direct: &[(NodeId, Ex)]) -> Vec<Ex> {
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

    fn chi(&self, f: &[Ex]) -> Vec<Ex> {
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

fn nz(coef: f64, e: Ex) -> Ex {
    if coef == 0.0 {
        Ex::Zero
    } else {
        e
    }
}

/// One step from sizes `base` (vectors at the step's start) with loss derivatives `chi`;
/// `also` computes a second gradient (a later step's correlated part), the larger taken.
fn one_step(cx: &Ctx, base: &[Ex], chi: Vec<Ex>, lr: f64, also: Option<&Ctx>) -> Step {
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
        update.push(match prog.params[p].role() {
            Role::Output => {
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
    let cx = Ctx::new(prog);
    let init = cx.init();
    let mut later = None;
    let step = prog.train.as_ref().map(|train| {
        let first = one_step(&cx, &init, cx.chi(&init), train.lr, None);
        if train.steps >= 2 {
            // From the second update on, the gradient reaching the features also flows
            // through the updated readouts (theory.md §5.2, "First step vs later steps":
            // TP4's min(a+b, 2a+c)), and the loss derivative is chi_1.
            let mut cx2 = Ctx::new(prog);
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
                let mut c = Ctx::new(prog);
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

// ---------------------------------------------------------------------------------
// Classification
// ---------------------------------------------------------------------------------

/// TP4's classification of a training program (theory.md §5.2–5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Regime {
    Unstable,
    Trivial,
    Kernel,
    FeatureLearning,
}

impl Regime {
    /// The name in `tpc limit --format json`.
    pub fn name(self) -> &'static str {
        match self {
            Regime::Unstable => "unstable",
            Regime::Trivial => "trivial",
            Regime::Kernel => "kernel",
            Regime::FeatureLearning => "feature-learning",
        }
    }
}

impl fmt::Display for Regime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one parameter does.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamScaling {
    /// The parameter's own factor at initialization: the size of its use relative to
    /// its argument (`n^(1/2)` entry for hidden matrices and readouts, the entry for
    /// input matrices and vectors). Θ(1) is right, except that readouts may be smaller.
    pub init_factor: Ex,
    /// Largest change of a feature (MatMul or Nonlin vector) caused by updating it:
    /// `n^(-r_l)` in TP4's notation.
    pub feature: Ex,
    /// Largest change of an output caused by updating it.
    pub output: Ex,
    /// Updated maximally (TP4 Def 5.1: `r_l = 0`; a readout: `Δv . x = Θ(1)`).
    pub maximal: bool,
    /// For a readout: initialized maximally (`v_0 . Δx = Θ(1)`).
    pub init_maximal: Option<bool>,
}

/// The classification of a program with `train`.
#[derive(Clone, Debug, PartialEq)]
pub struct Classification {
    pub regime: Regime,
    /// Largest feature change after one step: `n^(-r)`.
    pub feature: Ex,
    /// Largest output change after one step.
    pub output: Ex,
    /// Largest vector or output at initialization.
    pub init: Ex,
    pub params: Vec<ParamScaling>,
    /// Every width-dependent parameter updated (and every readout initialized) maximally
    /// in a feature-learning program: muP up to the abc symmetry.
    pub mup: bool,
    /// The step the classification comes from: 1 (the first) or 2 (a later one).
    pub step: usize,
}

fn is_feature(prog: &Program, id: NodeId) -> bool {
    matches!(prog.node(id).op, Op::MatMul { .. } | Op::Nonlin(_))
}

fn init_factor(prog: &Program, p: usize) -> Ex {
    let par = &prog.params[p];
    let e = entry(&par.law);
    match par.role() {
        Role::Hidden | Role::Output => Ex::half().mul(e),
        _ => e,
    }
}

/// The classification, from the exponents (None without `train`): from the first step,
/// unless a later step changes the regime (a zero or small readout passes gradient to
/// the features only once it has been updated; a blow-up at a later step).
pub fn classify(prog: &Program, ex: &Exponents) -> Option<Classification> {
    let first = classify_step(prog, &ex.init, ex.step.as_ref()?, 1);
    match &ex.later {
        Some(later) if first.regime != Regime::Unstable => {
            let later = classify_step(prog, &ex.init, later, 2);
            Some(if later.regime == first.regime {
                first
            } else {
                later
            })
        }
        _ => Some(first),
    }
}

fn classify_step(prog: &Program, init: &[Ex], step: &Step, index: usize) -> Classification {
    let vectors: Vec<NodeId> = prog.ids().filter(|&id| prog.ty(id) == Ty::Vector).collect();
    let max_over = |v: &[Ex], ids: &mut dyn Iterator<Item = NodeId>| {
        ids.map(|i| v[i.index()]).max().unwrap_or(Ex::Zero)
    };
    let init = max_over(
        init,
        &mut vectors.iter().copied().chain(prog.outputs.iter().copied()),
    );
    let feature = max_over(
        &step.delta,
        &mut vectors.iter().copied().filter(|&i| is_feature(prog, i)),
    );
    // vectors and moments (a logit that blows up saturates its softmax)
    let moved = max_over(
        &step.delta,
        &mut prog
            .ids()
            .filter(|&id| matches!(prog.ty(id), Ty::Vector | Ty::Moment)),
    );
    let output = max_over(&step.delta, &mut prog.outputs.iter().copied());
    let mut params = Vec::new();
    for (p, par) in prog.params.iter().enumerate() {
        let d = &step.by_param[p];
        let feat = max_over(
            d,
            &mut vectors.iter().copied().filter(|&i| is_feature(prog, i)),
        );
        let out = max_over(d, &mut prog.outputs.iter().copied());
        let (maximal, init_maximal) = match par.role() {
            Role::Output => (out == Ex::ONE, Some(step.readout_init_term[p] == Ex::ONE)),
            _ => (feat == Ex::ONE, None),
        };
        params.push(ParamScaling {
            init_factor: init_factor(prog, p),
            feature: feat,
            output: out,
            maximal,
            init_maximal,
        });
    }
    // Nontrivial: some width-dependent parameter moves an output by Θ(1) (a trained
    // scalar output bias alone moves f trivially).
    let nontrivial = params
        .iter()
        .zip(&prog.params)
        .any(|(s, p)| p.role() != Role::OutputBias && s.output == Ex::ONE);
    let regime = if init.blows_up() || moved.blows_up() || output.blows_up() {
        Regime::Unstable
    } else if !nontrivial {
        Regime::Trivial
    } else if feature == Ex::ONE {
        Regime::FeatureLearning
    } else {
        Regime::Kernel
    };
    let mup = regime == Regime::FeatureLearning
        && params.iter().zip(&prog.params).all(|(s, p)| {
            p.role() == Role::OutputBias
                || kappa(&p.law, 1.0) == Ex::Zero
                || (s.maximal && s.init_maximal != Some(false))
        });
    Classification {
        regime,
        feature,
        output,
        init,
        params,
        mup,
        step: index,
    }
}

/// The regime of a training program, for `tpc limit --format json`.
pub fn regime(prog: &Program) -> Option<Regime> {
    classify(prog, &exponents(prog)).map(|c| c.regime)
}

// ---------------------------------------------------------------------------------
// muP laws (theory.md §5.3, §5.5: TP4's SGD exponents by role)
// ---------------------------------------------------------------------------------

/// TP4's muP `(a, b)` for a role, at `c = 0`.
pub fn mup_ab(role: Role) -> (Rational, Rational) {
    let h = Rational::HALF;
    match role {
        Role::Input | Role::Bias => (-h, h),
        Role::Hidden => (Rational::ZERO, h),
        Role::Output => (h, h),
        Role::OutputBias => (Rational::ZERO, Rational::ZERO),
    }
}

/// Whether a law has muP's exponents up to the abc symmetry: `a + b` and `2a + c` as muP.
pub fn is_mup_law(role: Role, law: &Law) -> bool {
    let abc = law.abc();
    let (a, b) = mup_ab(role);
    abc.b.is_some_and(|lb| abc.a + lb == a + b)
        && abc.a * Rational::int(2) + abc.c == a * Rational::int(2)
}

/// The muP law with the given `c` (learning-rate exponent), keeping the law's constants:
/// `(var, mult)` as monomials.
fn mup_law_at(role: Role, law: &Law, c: Rational) -> Law {
    let (am, bm) = mup_ab(role);
    // per-layer symmetry: (a, b, c) ~ (a + t, b - t, c - 2t)
    let a = am - c * Rational::HALF;
    let b = am + bm - a;
    let var_coef = if law.var.coef == 0.0 {
        1.0
    } else {
        law.var.coef
    };
    Law {
        var: Monomial::new(var_coef, -(b * Rational::int(2))),
        mult: Monomial::new(law.mult.coef, -a),
        lr: Monomial::new(law.lr.coef, -c),
    }
}

/// A law as the language writes it: `~ N(0, var) * mult lr rate`.
pub fn law_text(law: &Law) -> String {
    let mult = if law.mult.coef == 1.0 && law.mult.exp.is_zero() {
        String::new()
    } else {
        format!(" * {}", law.mult)
    };
    format!("~ N(0, {}){mult} lr {}", law.var, law.lr)
}

/// The muP law for a parameter: at its own learning-rate exponent, and the
/// multiplier-free form (the `mup` preset's) when that differs.
pub fn mup_laws(role: Role, law: &Law) -> (Law, Option<Law>) {
    let own = mup_law_at(role, law, law.abc().c);
    let (am, _) = mup_ab(role);
    let free_c = am * Rational::int(2);
    let mut free = mup_law_at(role, law, free_c);
    free.mult = Monomial::constant(law.mult.coef);
    (own, (own.mult.exp != Rational::ZERO).then_some(free))
}

fn mup_help(prog: &Program, p: usize) -> String {
    let par = &prog.params[p];
    let (own, free) = mup_laws(par.role(), &par.law);
    let mut s = format!(
        "muP for the {} `{}` at its learning rate: `param {} : {} {}`",
        par.role_name(),
        par.name,
        par.name,
        par.shape,
        law_text(&own)
    );
    if let Some(f) = free {
        s.push_str(&format!(
            "; without a multiplier: `{}` (as `parameterization mup`)",
            law_text(&f)
        ));
    }
    s
}

// ---------------------------------------------------------------------------------
// Diagnostics
// ---------------------------------------------------------------------------------

/// A display name for a node: its name, or `W @ x` for an unnamed MatMul.
pub fn node_name(prog: &Program, id: NodeId) -> String {
    if let Some(n) = &prog.node(id).name {
        return n.clone();
    }
    if let Op::MatMul { transpose } = prog.node(id).op {
        let ops = prog.operands(id);
        let w = prog.label(ops[0]);
        let t = if transpose { ".T" } else { "" };
        return format!("{w}{t} @ {}", prog.label(ops[1]));
    }
    prog.label(id)
}

/// The span of `lr ...` inside a parameter's law, when the source writes one.
fn lr_span(src: &str, law: Span) -> Option<Span> {
    let text = src.get(law.range())?;
    let bytes = text.as_bytes();
    let mut found = None;
    let mut i = 0;
    while let Some(k) = text[i..].find("lr") {
        let at = i + k;
        let before = at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        let after = bytes
            .get(at + 2)
            .is_none_or(|b| !(b.is_ascii_alphanumeric() || *b == b'_'));
        if before && after {
            found = Some(at);
        }
        i = at + 2;
    }
    let at = found?;
    let end = text[at..]
        .find([',', '}'])
        .map_or(text.len(), |e| at + e)
        .min(text.len());
    let end = at + text[at..end].trim_end().len();
    Some(Span::new(law.start + at, law.start + end))
}

/// `a`, `a and b`, `a, b and c`.
fn and_list(items: &[String]) -> String {
    match items.len() {
        0 => String::new(),
        1 => items[0].clone(),
        k => format!("{} and {}", items[..k - 1].join(", "), items[k - 1]),
    }
}

/// Parameters used by the nodes reachable from `from` (inclusive), in order.
fn downstream_params(prog: &Program, from: &[NodeId]) -> Vec<usize> {
    let mut seen = vec![false; prog.len()];
    for &f in from {
        seen[f.index()] = true;
    }
    let mut out = Vec::new();
    for id in prog.ids() {
        if !seen[id.index()] {
            continue;
        }
        for u in prog.users(id) {
            seen[u.index()] = true;
        }
        for a in prog.operands(id) {
            if let Op::Param(p) = prog.node(a).op {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
        }
    }
    out.sort_unstable();
    out
}

/// Scaling warnings and notes for a checked program (`src` locates the `lr` of laws).
pub fn diagnostics(prog: &Program, src: &str) -> Vec<Diagnostic> {
    let ex = exponents(prog);
    let mut out = Vec::new();
    let mut init_blowup = false;
    // -- initialization: each parameter's own factor
    for (p, par) in prog.params.iter().enumerate() {
        let f = init_factor(prog, p);
        let uses: Vec<NodeId> = match par.role() {
            Role::Hidden | Role::Input => prog
                .users(par.node)
                .into_iter()
                .filter(|&u| matches!(prog.node(u).op, Op::MatMul { .. }))
                .collect(),
            Role::Output => prog.users(par.node),
            Role::Bias | Role::OutputBias => vec![par.node],
        };
        let Some(&first) = uses.iter().max_by_key(|u| ex.init[u.index()]) else {
            continue;
        };
        let size = ex.init[first.index()];
        let what = node_name(prog, first);
        let need = match par.role() {
            Role::Hidden => "a hidden matrix needs entries Θ(n^(-1/2))",
            Role::Output => "a readout needs entries O(n^(-1/2))",
            _ => "it needs entries Θ(1)",
        };
        let entries = format!("entries are {}; {need}", entry(&par.law).theta());
        if f.blows_up() {
            init_blowup = true;
            let per = if prog.ty(first) == Ty::Vector {
                " per coordinate"
            } else {
                ""
            };
            out.push(
                Diagnostic::warning(
                    "W0101",
                    format!("`{what}` blows up at initialization: {}{per}", size.theta()),
                    par.law_span,
                    entries,
                )
                .with_help(mup_help(prog, p)),
            );
        } else if f.vanishes()
            && f != Ex::Zero
            && par.role() != Role::Output
            && par.role() != Role::OutputBias
        {
            out.push(
                Diagnostic::warning(
                    "W0102",
                    format!(
                        "`{what}` vanishes at initialization: {} per coordinate",
                        size.theta()
                    ),
                    par.law_span,
                    entries,
                )
                .with_help(mup_help(prog, p)),
            );
        }
    }
    // -- attention logits: a cross moment that one step blows up (W0106)
    out.extend(moments::logit_warnings(prog, &ex));
    let (Some(cls), Some(train)) = (classify(prog, &ex), &prog.train) else {
        return out;
    };
    let Some(step) = (if cls.step == 1 { &ex.step } else { &ex.later }) else {
        return out;
    };
    let one_step = if cls.step == 1 {
        "one SGD step"
    } else {
        "a later SGD step"
    };
    if init_blowup {
        return out;
    }
    let lr_label = |p: usize| -> Span {
        let par = &prog.params[p];
        lr_span(src, par.law_span).unwrap_or(par.law_span)
    };
    match cls.regime {
        Regime::Unstable => {
            for (p, par) in prog.params.iter().enumerate() {
                let s = &cls.params[p];
                let d = &step.by_param[p];
                let mut moved: Vec<String> = Vec::new();
                for &(n, e) in &step.direct[p] {
                    if e.blows_up() && prog.ty(n) == Ty::Vector {
                        moved.push(format!(
                            "`{}` by {} per coordinate",
                            node_name(prog, n),
                            e.theta()
                        ));
                    }
                }
                if moved.is_empty() && s.feature.blows_up() {
                    if let Some(n) = prog
                        .ids()
                        .filter(|&i| is_feature(prog, i))
                        .max_by_key(|i| d[i.index()])
                    {
                        moved.push(format!(
                            "`{}` by {} per coordinate",
                            node_name(prog, n),
                            d[n.index()].theta()
                        ));
                    }
                }
                for &o in &prog.outputs {
                    if d[o.index()].blows_up() {
                        moved.push(format!(
                            "`{}` by {}",
                            node_name(prog, o),
                            d[o.index()].theta()
                        ));
                    }
                }
                if moved.is_empty() {
                    continue;
                }
                let text = and_list(&moved);
                let span = lr_label(p);
                let label = if lr_span(src, par.law_span).is_none() {
                    format!("`{}` trains at the base rate (lr n^0)", par.name)
                } else if is_mup_law(par.role(), &par.law) {
                    "too large for the gradient this parameter receives".to_string()
                } else {
                    "this learning rate is too large for the width".to_string()
                };
                let mut d = Diagnostic::warning(
                    "W0103",
                    format!(
                        "training blows up: one SGD step of `{}` moves {text}",
                        par.name
                    ),
                    span,
                    label,
                );
                if is_mup_law(par.role(), &par.law) {
                    // its own law is muP: the gradient reaching it is too large, set by
                    // parameters downstream initialized larger than muP
                    let from: Vec<NodeId> = step.direct[p].iter().map(|x| x.0).collect();
                    let culprits: Vec<usize> = downstream_params(prog, &from)
                        .into_iter()
                        .filter(|&q| {
                            q != p && !is_mup_law(prog.params[q].role(), &prog.params[q].law)
                        })
                        .collect();
                    let grads: Vec<String> = step.direct[p]
                        .iter()
                        .filter(|x| prog.ty(x.0) == Ty::Vector)
                        .map(|x| {
                            format!(
                                "∂L/∂({}) is {}",
                                node_name(prog, x.0),
                                step.grad[x.0.index()].theta()
                            )
                        })
                        .collect();
                    for &q in &culprits {
                        let qp = &prog.params[q];
                        d = d.with_secondary(
                            qp.law_span,
                            format!(
                                "`{}` is not muP: entries {}",
                                qp.name,
                                entry(&qp.law).theta()
                            ),
                        );
                    }
                    let mut h = format!(
                        "`{}` already has muP exponents; its step is large because {}",
                        par.name,
                        and_list(&grads)
                    );
                    if let Some(&q) = culprits.first() {
                        h.push_str(&format!(
                            ", set by `{}`: {}",
                            prog.params[q].name,
                            mup_help(prog, q)
                        ));
                    }
                    d = d.with_help(h);
                } else {
                    d = d.with_help(mup_help(prog, p));
                }
                out.push(d);
            }
        }
        Regime::Trivial => {
            let best = (0..prog.params.len())
                .filter(|&p| prog.params[p].role() != Role::OutputBias)
                .max_by_key(|&p| {
                    (
                        cls.params[p].output,
                        prog.params[p].role() == Role::Output,
                        std::cmp::Reverse(p),
                    )
                });
            let span = best.map_or(train.lr_span, lr_label);
            let mut d = Diagnostic::warning(
                "W0104",
                format!(
                    "training is trivial in the limit: {one_step} moves the outputs by {}",
                    cls.output.theta()
                ),
                span,
                "this learning rate is too small for the width",
            );
            for (p, par) in prog.params.iter().enumerate() {
                if Some(p) != best && par.role() != Role::OutputBias {
                    d = d.with_secondary(
                        lr_label(p),
                        format!(
                            "`{}` moves the outputs by {}",
                            par.name,
                            cls.params[p].output.theta()
                        ),
                    );
                }
            }
            if let Some(p) = best {
                d = d.with_help(mup_help(prog, p));
            }
            if let Some(e) = cls.output.exponent() {
                // every update is linear in its learning rate (to first order)
                d = d.with_note(format!(
                    "multiplying every learning rate by {} would move the outputs by Θ(1)",
                    n_pow(-e)
                ));
            }
            out.push(d);
        }
        Regime::Kernel => {
            let r = cls.feature.exponent().map(|e| -e);
            let contributing: Vec<String> = prog
                .params
                .iter()
                .zip(&cls.params)
                .filter(|(_, s)| s.output == Ex::ONE)
                .map(|(p, _)| format!("`{}`", p.name))
                .collect();
            let dropped: Vec<String> = prog
                .params
                .iter()
                .zip(&cls.params)
                .filter(|(p, s)| s.output.vanishes() && kappa(&p.law, train.lr) != Ex::Zero)
                .map(|(p, s)| format!("`{}` ({})", p.name, s.output.theta()))
                .collect();
            let mut d = Diagnostic::note_diag(
                "N0101",
                format!(
                    "kernel regime: {one_step} moves the outputs by Θ(1) but the features only by {} per coordinate{}",
                    cls.feature.theta(),
                    r.map_or(String::new(), |r| format!(" (r = {r})"))
                ),
                train.lr_span,
                "features do not move in the limit at these learning rates",
            )
            .with_note(format!(
                "the limiting kernel gets Θ(1) contributions from {}",
                and_list(&contributing)
            ));
            if !dropped.is_empty() {
                d = d.with_note(format!(
                    "updates that drop out of the limit: {}",
                    and_list(&dropped)
                ));
            }
            out.push(d.with_help(
                "for feature learning use muP (`parameterization mup`, docs/theory.md §5.3)",
            ));
        }
        Regime::FeatureLearning => {
            let maximal: Vec<String> = prog
                .params
                .iter()
                .zip(&cls.params)
                .filter(|(p, s)| s.maximal && p.role() != Role::OutputBias)
                .map(|(p, _)| format!("`{}`", p.name))
                .collect();
            let mut d = Diagnostic::note_diag(
                "N0102",
                format!("feature learning: {one_step} moves the features by Θ(1) per coordinate (r = 0) and the outputs by Θ(1)"),
                train.lr_span,
                "trained here",
            );
            if !maximal.is_empty() {
                d = d.with_note(format!("updated maximally: {}", and_list(&maximal)));
            }
            if cls.mup {
                d = d.with_note(
                    "every parameter is updated maximally: this is muP (up to the abc symmetry)",
                );
            }
            out.push(d);
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// A text table of the exponents
// ---------------------------------------------------------------------------------

/// Every node's exponents, and the classification: `node  init  grad  delta`.
pub fn table(prog: &Program) -> String {
    let ex = exponents(prog);
    let mut rows: Vec<[String; 4]> =
        vec![["node".into(), "init".into(), "dL/d".into(), "step".into()]];
    for id in prog.ids() {
        if matches!(prog.node(id).op, Op::Input { .. }) || matches!(prog.ty(id), Ty::Matrix) {
            continue;
        }
        let (g, d) = match &ex.step {
            Some(s) => (
                s.grad[id.index()].to_string(),
                s.delta[id.index()].to_string(),
            ),
            None => ("".into(), "".into()),
        };
        rows.push([node_name(prog, id), ex.init[id.index()].to_string(), g, d]);
    }
    let w: Vec<usize> = (0..4)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut s =
        String::from("# exponents e of Θ(n^e): per coordinate for vectors; -inf = exactly 0\n");
    for r in &rows {
        let line: Vec<String> = (0..4).map(|c| format!("{:w$}", r[c], w = w[c])).collect();
        s.push_str(line.join("  ").trim_end());
        s.push('\n');
    }
    if let (Some(step), Some(cls)) = (&ex.step, classify(prog, &ex)) {
        for (o, &f) in prog.outputs.iter().enumerate() {
            s.push_str(&format!(
                "chi({}): {} at step 0, {} at step 1\n",
                node_name(prog, f),
                step.chi0[o],
                step.chi1[o]
            ));
        }
        s.push_str("param  update  features  outputs  maximal\n");
        for (p, par) in prog.params.iter().enumerate() {
            let c = &cls.params[p];
            s.push_str(&format!(
                "{}  {}  {}  {}  {}{}\n",
                par.name,
                step.update[p],
                c.feature,
                c.output,
                c.maximal,
                match c.init_maximal {
                    Some(b) => format!(" (init maximal: {b})"),
                    None => String::new(),
                }
            ));
        }
        s.push_str(&format!(
            "regime: {}{}{}\n",
            cls.regime,
            if cls.mup { " (muP)" } else { "" },
            if cls.step == 2 {
                " (from a later step)"
            } else {
                ""
            }
        ));
    }
    s
}
