//! Autodiff on the IR: a `train` block becomes one unrolled tensor program.
//!
//! [`unroll`] differentiates the forward [`Program`] symbolically (reverse mode, on the
//! graph) and writes `steps` full-batch gradient-descent steps as a single straight-line
//! Netsor-transpose+ program (theory.md §6.1) in which every matrix appears only as its
//! *initial* value `W_0`: an update `W_t = W_0 − κ Σ_{s<t} Σ_b dy_{s,b} x_{s,b}ᵀ / n` is
//! never formed; each product becomes
//!
//! ```text
//! mult·W_t z  = mult·W_0 z  − κ Σ_{s<t,b} dy_{s,b} · E_n[x_{s,b} z]      (Nonlin + Moments)
//! mult·W_tᵀ z = mult·W_0ᵀ z − κ Σ_{s<t,b} x_{s,b} · E_n[dy_{s,b} z]
//! ```
//!
//! with `E_n[u v] = (1/n) Σ_a u_a v_a` a Moment. So the finite executor runs training
//! with O(t) extra vectors per matrix instead of N² numbers (and the conditional engine
//! can run it at all), and the limit engine reads the same program through the Master
//! Theorem (theory.md §2.1, §6.2).
//!
//! ## Normalization (why every coefficient is a monomial in n)
//!
//! The unrolled program is written in TP4's scaled variables, so that in a stable
//! feature-learning parameterization every vector has Θ(1) coordinates:
//!
//! * backward vectors are `dy = n · ∂L/∂y` (theory.md §6.1, "dx := n grad_x f"), with
//!   χ = ∂L/∂f (including the 1/B of the batch mean) folded in: the seed at an output
//!   `f_o = coef · mult_v · w_v · x` is `dx = Σ_o χ_o · coef · r_v`;
//! * a readout `v` (`1 x n`, `f = mult·w·x`) becomes the vector `r = n·mult·w`, so that
//!   `f = coef · E_n[r x]` is a Moment; in the unrolled program it is a parameter of
//!   shape `n` whose multiplier is `n·mult` (the same draw `w` as the readout);
//! * the learning-rate coefficient of each update is a monomial in n:
//!   hidden `W` (`y = mult·W x`): `κ = η·lr·mult²`; input `U` (`y = mult·U ξ`):
//!   `κ = η·lr·mult²/n`, times the constant `ξ_b·ξ`; vector parameter (value `mult·w`):
//!   `κ = η·lr·mult²/n`; readout: `r_{t+1} = r_t − η·lr·mult²·n Σ_b χ_{b,o} coef x_b`;
//!   scalar parameter: `η·lr·mult²`. (In muP every κ is η; language.md, Training.)
//!
//! These are identities at every finite n, so [`Width::Finite`] programs equal dense
//! training up to rounding (tests/it/unrolled.rs checks 1e-10). [`Width::Limit`] replaces
//! every coefficient by its limit as n → ∞ and refuses one that blows up.
//!
//! ## Momentum, weight decay, minibatches
//!
//! A linear optimizer (README, "Training: optimizers") moves a parameter by a fixed
//! linear combination of its past SGD updates and its initial value, so the same
//! rank-one corrections express it with other coefficients (theory.md §6.1 is the case
//! β = λ = 0). With `U_s` step s's SGD update of a parameter's variable (`−U_s` is the
//! plain SGD step, `κ Σ terms` in the scaled variables) and `λ = η·lr_p·wd` (a
//! monomial, taken at the builder's width like κ), torch's momentum with L2 decay is
//!
//! ```text
//! b_s = β b_{s−1} + U_s + λ w_s,   w_{s+1} = w_s − b_s,   b_{−1} = 0,
//! ```
//!
//! so `w_t = a_t w_0 + Σ_{s<t} c_{t,s} U_s` with numbers a, c computed once per step
//! (`coefs`): a product becomes `a_t·mult·W_0 z + κ Σ_s c_{t,s} Σ_b dy_{s,b} E_n[x_{s,b} z]`
//! (`c = −1`, `a = 1` for SGD, which rebuilds today's program exactly). Vectors, readouts
//! and scalars are rebuilt from their initial value the same way. A minibatch step
//! (`Train::batch_at`) runs the forward and backward passes of its samples only, with χ
//! divided by the batch size. Adam's update divides entry by entry by a running root
//! mean square: not a combination of low-rank terms, so [`unroll`] refuses it.
//!
//! ## Shape of the unrolled program
//!
//! The generic-point IR runs all points at once; training mixes points (an update sums
//! over the batch), so the unrolled program is evaluated at **one** point (P = 1): every
//! distinct point (evaluation points first, then training inputs not among them) has its
//! own copy of the program's `input` declarations (named `x@k`), and [`Unrolled::row`]
//! is the one `--inputs`-style row that holds them all. Vectors that depend on no input
//! are built once per step and shared by all points.
//!
//! Ops used: `Input`, `Param` (the initial values; readouts recast as vectors),
//! `MatMul` (only ever of an initial matrix), `Nonlin`, `Moment`, and `Scalar` for the
//! outputs `f_t` and the loss derivatives χ. No `Output` nodes.

use crate::ir::{NodeId, Program};

mod adam;

/// Which meaning the coefficients of the unrolled program are taken in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// At width n: the finite executor's program.
    Finite(usize),
    /// n → ∞: every monomial coefficient replaced by its limit.
    Limit,
}

/// A `train` block unrolled into one program (module docs).
#[derive(Clone, Debug)]
pub struct Unrolled {
    /// The program, evaluated at one point ([`Unrolled::row`]).
    pub prog: Program,
    /// The distinct points: the evaluation points first, then the training inputs not
    /// among them. A program without inputs has one empty point.
    pub points: Vec<Vec<f64>>,
    /// Index in `points` of each evaluation point.
    pub eval: Vec<usize>,
    /// Index in `points` of each training sample.
    pub train: Vec<usize>,
    /// `f[t][o·P + p]`: the `Scalar` node of output o at evaluation point p after t
    /// steps, t = 0..=steps (output-major, as everywhere).
    pub f: Vec<Vec<NodeId>>,
    /// `chi[t][j·O + o]`: ∂L/∂f_o at the j-th sample of step t's minibatch
    /// ([`Train::batch_at`]; every training sample in order for the full batch) after t
    /// steps (with the 1/B of the batch mean), t = 0..steps.
    pub chi: Vec<Vec<NodeId>>,
    pub width: Width,
    /// Parameters Adam does not move in the limit: ε/(gradient scale) → ∞ with the
    /// step κ/ε' → 0 (a width-independent ε under muP freezes hidden layers).
    pub frozen: Vec<String>,
}

impl Unrolled {
    /// The single `--inputs`-style row of the unrolled program: every point's row, in
    /// order.
    pub fn row(&self) -> Vec<f64> {
        self.points.iter().flatten().copied().collect()
    }
}

use std::collections::HashMap;

use crate::ir::{
    Expr, Fun, InputDecl, Law, Loss, Monomial, Op, OutTerm, Param, Rational, Shape, Span, Train, Ty,
};

/// Why a program could not be unrolled.
#[derive(Clone, Debug, PartialEq)]
pub struct UnrollError {
    /// The node (of the front-end program) responsible, when there is one.
    pub node: Option<NodeId>,
    pub message: String,
}

impl std::fmt::Display for UnrollError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UnrollError {}

fn err(node: Option<NodeId>, message: impl Into<String>) -> UnrollError {
    UnrollError {
        node,
        message: message.into(),
    }
}

/// The largest unrolled program built (nodes): beyond it the rank-t corrections
/// (O(t² B²) moments per matrix) cost more than the dense updates they replace.
pub const MAX_UNROLLED_NODES: usize = 2_000_000;

/// Unrolls `prog`'s `train` block (module docs) with f_t reported at `eval` (rows as in
/// `--inputs`; none means the training inputs).
pub fn unroll(prog: &Program, eval: &[Vec<f64>], width: Width) -> Result<Unrolled, UnrollError> {
    let train = prog
        .train
        .as_ref()
        .ok_or_else(|| err(None, "this program has no `train` block"))?;
    if train.data.is_empty() {
        return Err(err(None, "the training data is empty"));
    }
    for s in &train.data {
        if s.y.len() != prog.outputs.len() {
            return Err(err(None, "a training target needs one number per output"));
        }
    }
    if !train.optimizer.is_linear() && train.weight_decay.coef != 0.0 {
        return Err(err(
            None,
            format!(
                "`{}` with `weight_decay` (L2: λ·w inside the entrywise update) has no unrolled \
                 program: the initial weights' entries would enter Adam's division; use \
                 `adamw(…, wd)` (decoupled decay)",
                train.optimizer.name()
            ),
        ));
    }
    if !train.optimizer.is_linear() && matches!(width, Width::Finite(_)) {
        return Err(err(
            None,
            format!(
                "`{}` is not a linear optimizer: its update divides by the running root mean \
                 square of the gradient entry by entry, which is not a sum of low-rank terms in \
                 the initial weights, so it has no unrolled program at finite width (the dense \
                 engine trains it; the limit's program uses nonlinear outer products)",
                train.optimizer.name()
            ),
        ));
    }
    let mut b = Builder::new(prog, train, eval, width)?;
    b.run()?;
    Ok(b.finish())
}

/// The evaluation points and the training inputs as one list of distinct points.
#[derive(Clone, Debug, PartialEq)]
pub struct Union {
    pub points: Vec<Vec<f64>>,
    /// Index in `points` of each evaluation point.
    pub eval: Vec<usize>,
    /// Index in `points` of each training sample.
    pub train: Vec<usize>,
}

/// The union of `eval` (the evaluation points, in order, first) and the training
/// inputs. A program without inputs has one (empty) point.
pub fn union(prog: &Program, eval: &[Vec<f64>], train: &Train) -> Union {
    if prog.inputs.is_empty() {
        return Union {
            points: vec![vec![]],
            eval: vec![0],
            train: vec![0; train.data.len()],
        };
    }
    let mut points = eval.to_vec();
    let mut train_idx = Vec::new();
    for s in &train.data {
        match points.iter().position(|p| *p == s.x) {
            Some(i) => train_idx.push(i),
            None => {
                points.push(s.x.clone());
                train_idx.push(points.len() - 1);
            }
        }
    }
    Union {
        points,
        eval: (0..eval.len()).collect(),
        train: train_idx,
    }
}

/// A term `c · Π args` of a [`Builder::combination`].
type Term = (f64, Vec<NodeId>);

/// One rank-one term of a matrix update, `W_t = W_0 − (κ/n) Σ left · rightᵀ` in the
/// scaled variables (so `mult·W_t z = mult·W_0 z − κ Σ left · E_n[right z]`).
#[derive(Clone, Copy)]
struct Rank1 {
    left: NodeId,
    right: NodeId,
}

/// One term of an input-matrix update: `mult·U_t ξ = mult·U_0 ξ − κ Σ (ξ_b·ξ) dy`.
#[derive(Clone)]
struct InputRank1 {
    dy: NodeId,
    xi: Vec<f64>,
}

/// The gradients of one training step, applied after every sample's backward pass.
#[derive(Clone, Default)]
struct Pending {
    rank1: Vec<Vec<Rank1>>,
    input: Vec<Vec<InputRank1>>,
    /// Vector parameters: the scaled cotangents `n ∂L/∂value`, one per sample.
    vector: Vec<Vec<NodeId>>,
    /// Readouts: `(χ_{b,o}·coef, x_b)` pairs, as (scalar node, coef, vector node).
    readout: Vec<Vec<(NodeId, f64, NodeId)>>,
    /// Scalar parameters: `(χ node, coef)`.
    scalar: Vec<Vec<(NodeId, f64)>>,
}

struct Builder<'a> {
    g: &'a Program,
    train: &'a Train,
    width: Width,
    u: Program,
    points: Vec<Vec<f64>>,
    eval_idx: Vec<usize>,
    train_idx: Vec<usize>,
    /// Operands of every front-end node.
    gops: Vec<Vec<NodeId>>,
    /// Front-end node depends on no input point.
    shared: Vec<bool>,
    /// The unrolled program's node of every parameter (its initial value).
    uparam: Vec<NodeId>,
    /// The current (step-t) value of every vector, readout and scalar parameter.
    cur: Vec<Option<NodeId>>,
    /// The update terms of every hidden matrix, and of every input matrix, so far,
    /// each with the step s whose gradient it belongs to.
    rank1: Vec<Vec<(usize, Rank1)>>,
    input_rank1: Vec<Vec<(usize, InputRank1)>>,
    /// Linear optimizers (module docs, "Momentum, weight decay, minibatches"): every
    /// parameter's current value as `coefs[p][0]` times its initial value plus
    /// `coefs[p][s+1]` times step s's SGD update `U_s` (in the scaled variables,
    /// `κ Σ terms`); plain SGD keeps `[1, −1, −1, …]`.
    coefs: Vec<Vec<f64>>,
    /// The momentum buffer in the same basis.
    bufs: Vec<Vec<f64>>,
    /// The momentum coefficient β (0 for SGD).
    beta: f64,
    /// `λ_p = η · lr_p · wd`, the L2 weight decay per step of every parameter.
    lambda: Vec<f64>,
    /// β = 0 and no decay: vectors, readouts and scalars are updated in place
    /// (`cur_{t+1} = cur_t − κ Σ terms`), as for plain SGD.
    simple: bool,
    /// Every step's update terms (coefficient, operands) of every vector, readout and
    /// scalar parameter, when not `simple`.
    step_terms: Vec<Vec<Vec<Term>>>,
    /// The coefficient κ of every parameter's update (module docs), at this width.
    kappa: Vec<f64>,
    /// Input nodes by (point, input declaration, time).
    inputs: HashMap<(usize, usize, Option<usize>), NodeId>,
    /// Offsets of each input declaration in a point's row.
    offsets: Vec<usize>,
    /// Products of initial matrices already built, by (matrix, transpose, operand):
    /// `U_0 ξ` is the same vector at every step.
    products: HashMap<(usize, bool, NodeId), NodeId>,
    f: Vec<Vec<NodeId>>,
    chi: Vec<Vec<NodeId>>,
    /// Adam or AdamW ([`adam`]): its constants, every parameter's κ and ε', and
    /// every step's gradient terms so far.
    adam: Option<adam::Adam>,
    adam_p: Vec<adam::AdamParam>,
    hist: Vec<Pending>,
    frozen: Vec<String>,
}

impl<'a> Builder<'a> {
    fn new(
        g: &'a Program,
        train: &'a Train,
        eval: &[Vec<f64>],
        width: Width,
    ) -> Result<Builder<'a>, UnrollError> {
        let u = union(g, eval, train);
        let (points, train_idx) = (u.points, u.train);
        // No evaluation points: report f_t at the training inputs.
        let eval_idx = if eval.is_empty() && !g.inputs.is_empty() {
            train_idx.clone()
        } else {
            u.eval
        };
        let row_len: usize = g.inputs.iter().map(InputDecl::row_len).sum();
        if let Some(p) = points.iter().find(|p| p.len() != row_len) {
            return Err(err(
                None,
                format!(
                    "a point has {} numbers, the program's inputs need {row_len}",
                    p.len()
                ),
            ));
        }
        let mut offsets = Vec::new();
        let mut off = 0;
        for d in &g.inputs {
            offsets.push(off);
            off += d.row_len();
        }

        let mut u = Program::new(g.width.clone(), g.preset);
        for k in 0..points.len() {
            for d in &g.inputs {
                u.inputs.push(InputDecl {
                    name: format!("{}@{}", d.name, k + 1),
                    ..d.clone()
                });
            }
        }
        // The parameters, in the same order (so the finite executor draws the same
        // values): a readout becomes the vector r = n·mult·w.
        let mut uparam = Vec::new();
        let mut kappa = Vec::new();
        let adam = adam::Adam::of(train);
        let mut adam_p = Vec::new();
        let mut frozen = Vec::new();
        let mut lambda = Vec::new();
        let n1 = Monomial::n_pow(Rational::ONE);
        let eta = Monomial::constant(train.lr);
        for (i, prm) in g.params.iter().enumerate() {
            let (shape, law) = match prm.shape {
                Shape::Readout => (
                    Shape::Vector,
                    Law {
                        mult: prm.law.mult * n1,
                        ..prm.law
                    },
                ),
                s => (s, prm.law),
            };
            let m2 = prm.law.mult.powi(2);
            let k = eta * prm.law.lr * m2;
            let k = match prm.shape {
                Shape::Hidden | Shape::Scalar => k,
                Shape::Input(_) | Shape::Vector => k * n1.recip(),
                Shape::Readout => k * n1,
            };
            let what = format!("the learning rate of `{}`", prm.name);
            if let Some(ad) = adam {
                // Adam's own step sizes (module `adam`); AdamW's decay is λ = η·lr·wd.
                let a = ad
                    .param(eta, prm.law.lr, prm.law.mult, prm.shape, &prm.name)
                    .map_err(|m| err(Some(prm.node), m))?;
                if matches!(a, adam::AdamParam::Frozen) {
                    frozen.push(prm.name.clone());
                }
                adam_p.push(a);
                kappa.push(0.0);
                let what = format!("AdamW's decay per step of `{}`", prm.name);
                lambda.push(coefficient(
                    width,
                    eta * prm.law.lr * ad.wd,
                    &what,
                    prm.node,
                )?);
            } else {
                kappa.push(coefficient(width, k, &what, prm.node)?);
            }
            if adam.is_none() {
                let what = format!("the weight decay per step of `{}`", prm.name);
                let l = eta * prm.law.lr * train.weight_decay;
                lambda.push(if train.weight_decay.coef == 0.0 {
                    0.0
                } else {
                    coefficient(width, l, &what, prm.node)?
                });
            }
            let node = u.push(Op::Param(i), &[], Some(prm.name.clone()), prm.span);
            u.params.push(Param {
                shape,
                law,
                node,
                ..prm.clone()
            });
            uparam.push(node);
        }
        let cur = g
            .params
            .iter()
            .zip(&uparam)
            .map(|(p, &n)| (!p.shape.is_matrix() || p.shape == Shape::Readout).then_some(n))
            .collect();
        let gops: Vec<Vec<NodeId>> = g.ids().map(|id| g.operands(id)).collect();
        let mut shared = vec![true; g.len()];
        for id in g.ids() {
            shared[id.index()] = !matches!(g.node(id).op, Op::Input { .. })
                && gops[id.index()].iter().all(|a| shared[a.index()]);
        }
        let np = g.params.len();
        let beta = train.optimizer.momentum();
        let simple = beta == 0.0 && lambda.iter().all(|&l| l == 0.0);
        Ok(Builder {
            g,
            train,
            width,
            u,
            points,
            eval_idx,
            train_idx,
            gops,
            shared,
            uparam,
            cur,
            rank1: vec![Vec::new(); np],
            input_rank1: vec![Vec::new(); np],
            coefs: vec![vec![1.0]; np],
            bufs: vec![vec![0.0]; np],
            beta,
            lambda,
            simple,
            step_terms: vec![Vec::new(); np],
            kappa,
            inputs: HashMap::new(),
            offsets,
            products: HashMap::new(),
            f: Vec::new(),
            chi: Vec::new(),
            adam,
            adam_p,
            hist: Vec::new(),
            frozen,
        })
    }

    fn finish(self) -> Unrolled {
        Unrolled {
            prog: self.u,
            points: self.points,
            eval: self.eval_idx,
            train: self.train_idx,
            f: self.f,
            chi: self.chi,
            width: self.width,
            frozen: self.frozen,
        }
    }

    fn push(
        &mut self,
        op: Op,
        ops: &[NodeId],
        name: Option<String>,
        span: Span,
    ) -> Result<NodeId, UnrollError> {
        if self.u.len() >= MAX_UNROLLED_NODES {
            return Err(err(
                None,
                format!(
                    "the unrolled training program would exceed {MAX_UNROLLED_NODES} instructions; \
                     use fewer steps or training points"
                ),
            ));
        }
        Ok(self.u.push(op, ops, name, span))
    }

    /// `Σ_i c_i · Π_j args` as one Nonlin: `terms` are (coefficient, operand slots).
    fn combination(
        &mut self,
        base: Option<NodeId>,
        terms: &[(f64, Vec<NodeId>)],
        scalar: bool,
        name: Option<String>,
        span: Span,
    ) -> Result<Option<NodeId>, UnrollError> {
        let mut ops: Vec<NodeId> = Vec::new();
        let mut e = match base {
            Some(b) => {
                ops.push(b);
                Expr::Arg(0)
            }
            None => Expr::Const(0.0),
        };
        let mut any = false;
        for (c, args) in terms {
            if *c == 0.0 {
                continue;
            }
            let mut t = Expr::Const(*c);
            for &a in args {
                t = Expr::mul(t, Expr::Arg(ops.len()));
                ops.push(a);
            }
            e = Expr::add(e, t);
            any = true;
        }
        if !any {
            return Ok(base);
        }
        let op = if scalar { Op::Scalar(e) } else { Op::Nonlin(e) };
        Ok(Some(self.push(op, &ops, name, span)?))
    }

    /// The values of one input declaration at one point (and time).
    fn input_values(&self, k: usize, input: usize, time: Option<usize>) -> Vec<f64> {
        let d = self.g.inputs[input].dim;
        let base = self.offsets[input] + (time.unwrap_or(1) - 1) * d;
        self.points[k][base..base + d].to_vec()
    }

    fn input_node(&mut self, k: usize, input: usize, time: Option<usize>, span: Span) -> NodeId {
        let ni = self.g.inputs.len();
        let name = match time {
            Some(t) => format!("{}[{t}](ξ{})", self.g.inputs[input].name, k + 1),
            None => format!("{}(ξ{})", self.g.inputs[input].name, k + 1),
        };
        *self.inputs.entry((k, input, time)).or_insert_with(|| {
            self.u.push(
                Op::Input {
                    input: k * ni + input,
                    time,
                },
                &[],
                Some(name),
                span,
            )
        })
    }
}

/// A monomial coefficient at the builder's width: its value at n, or its limit.
fn coefficient(width: Width, m: Monomial, what: &str, node: NodeId) -> Result<f64, UnrollError> {
    match width {
        Width::Finite(n) => Ok(m.at(n as f64)),
        Width::Limit => m.limit().ok_or_else(|| {
            err(
                Some(node),
                format!(
                    "{what} scales like {m}, which grows without bound as n → ∞ (theory.md §5.2)"
                ),
            )
        }),
    }
}

impl Builder<'_> {
    /// Steps t = 0..=steps: the forward pass at every needed point, f_t, and (before the
    /// last) χ_t, the backward pass of every training sample and the update.
    fn run(&mut self) -> Result<(), UnrollError> {
        let g = self.g;
        let steps = self.train.steps;
        let o = g.outputs.len();
        for t in 0..=steps {
            let batch = self.train.batch_at(t);
            let nb = batch.len();
            let mut needed: Vec<usize> = self.eval_idx.clone();
            if t < steps {
                needed.extend(batch.iter().map(|&b| self.train_idx[b]));
            }
            needed.sort_unstable();
            needed.dedup();
            let mut cache = vec![None; g.len()];
            let mut fws: HashMap<usize, Vec<Option<NodeId>>> = HashMap::new();
            for &k in &needed {
                let fw = self.forward(t, k, &mut cache)?;
                fws.insert(k, fw);
            }
            let out_of = |fw: &[Option<NodeId>], oi: usize| {
                fw[g.outputs[oi].index()]
                    .ok_or_else(|| err(Some(g.outputs[oi]), "an output was not built"))
            };
            let mut ft = Vec::with_capacity(o * self.eval_idx.len());
            for oi in 0..o {
                for &k in &self.eval_idx {
                    ft.push(out_of(&fws[&k], oi)?);
                }
            }
            self.f.push(ft);
            if t == steps {
                break;
            }
            // χ_{t,b,o} = L'(f_{t,o}(ξ_b), y_{b,o}) / B over step t's minibatch.
            let mut chis = Vec::with_capacity(nb * o);
            for &b in &batch {
                let s = &self.train.data[b];
                let fw = &fws[&self.train_idx[b]];
                for (oi, &y) in s.y.iter().enumerate() {
                    let f = out_of(fw, oi)?;
                    let z = Expr::Arg(0);
                    let d = match self.train.loss {
                        Loss::Mse => Expr::sub(z, Expr::Const(y)),
                        Loss::Xent => Expr::sub(Expr::call(Fun::Sigmoid, z), Expr::Const(y)),
                    };
                    let e = Expr::div(d, Expr::Const(nb as f64));
                    let name = if o == 1 {
                        format!("χ_{t}(ξ{})", b + 1)
                    } else {
                        format!("χ{}_{t}(ξ{})", oi + 1, b + 1)
                    };
                    chis.push(self.push(Op::Scalar(e), &[f], Some(name), self.train.span)?);
                }
            }
            let np = g.params.len();
            let mut pending = Pending {
                rank1: vec![Vec::new(); np],
                input: vec![Vec::new(); np],
                vector: vec![Vec::new(); np],
                readout: vec![Vec::new(); np],
                scalar: vec![Vec::new(); np],
            };
            for (j, &b) in batch.iter().enumerate() {
                let fw = fws[&self.train_idx[b]].clone();
                self.backward(t, b, &fw, &chis[j * o..(j + 1) * o], &mut pending)?;
            }
            self.chi.push(chis);
            self.apply(t + 1, pending)?;
        }
        Ok(())
    }

    fn label(&self, id: NodeId, t: usize, k: Option<usize>) -> Option<String> {
        let name = self.g.node(id).name.clone()?;
        Some(match k {
            Some(k) => format!("{name}_{t}(ξ{})", k + 1),
            None => format!("{name}_{t}"),
        })
    }

    /// The forward pass at step t and point k: the unrolled node of every front-end
    /// node (`None` for matrices). Nodes that depend on no input are built once per
    /// step (`cache`).
    fn forward(
        &mut self,
        t: usize,
        k: usize,
        cache: &mut [Option<NodeId>],
    ) -> Result<Vec<Option<NodeId>>, UnrollError> {
        let g = self.g;
        let mut fw: Vec<Option<NodeId>> = vec![None; g.len()];
        for id in g.ids() {
            let i = id.index();
            if self.shared[i] {
                if let Some(v) = cache[i] {
                    fw[i] = Some(v);
                    continue;
                }
            }
            let node = g.node(id);
            let span = node.span;
            let ops = self.gops[i].clone();
            let pt = (!self.shared[i]).then_some(k);
            let name = self.label(id, t, pt);
            let arg = |j: usize| -> Result<NodeId, UnrollError> {
                fw[ops[j].index()].ok_or_else(|| err(Some(id), "an operand has no value"))
            };
            let v = match &node.op {
                Op::Input { input, time } => Some(self.input_node(k, *input, *time, span)),
                Op::Param(p) => self.cur[*p],
                Op::MatMul { transpose } => {
                    let Op::Param(w) = g.node(ops[0]).op else {
                        return Err(err(Some(id), "a product whose matrix is not a parameter"));
                    };
                    if let Op::Input { input, time } = g.node(ops[1]).op {
                        Some(self.input_product(w, k, input, time, name, span)?)
                    } else {
                        let z = arg(1)?;
                        Some(self.product(w, *transpose, z, name, span)?)
                    }
                }
                Op::Nonlin(e) => {
                    let a: Vec<NodeId> = (0..ops.len()).map(arg).collect::<Result<_, _>>()?;
                    Some(self.push(Op::Nonlin(e.clone()), &a, name, span)?)
                }
                Op::Moment(e) => {
                    let a: Vec<NodeId> = (0..ops.len()).map(arg).collect::<Result<_, _>>()?;
                    Some(self.push(Op::Moment(e.clone()), &a, name, span)?)
                }
                Op::Output { terms, constant } => {
                    // f = c + Σ coef·E_n[r x] + Σ coef·b  (r = n·mult·w, module docs).
                    let mut a = Vec::new();
                    let mut e = Expr::Const(*constant);
                    for term in terms {
                        match *term {
                            OutTerm::Readout {
                                coef,
                                readout,
                                vector,
                            } => {
                                let r = arg(readout)?;
                                let x = arg(vector)?;
                                let m = self.push(
                                    Op::Moment(Expr::mul(Expr::Arg(0), Expr::Arg(1))),
                                    &[r, x],
                                    None,
                                    span,
                                )?;
                                e = Expr::add(e, Expr::mul(Expr::Const(coef), Expr::Arg(a.len())));
                                a.push(m);
                            }
                            OutTerm::Scalar { coef, param } => {
                                e = Expr::add(e, Expr::mul(Expr::Const(coef), Expr::Arg(a.len())));
                                a.push(arg(param)?);
                            }
                        }
                    }
                    Some(self.push(Op::Scalar(e), &a, name, span)?)
                }
                Op::Scalar(_) | Op::Outer { .. } => {
                    return Err(err(
                        Some(id),
                        "a front-end program holds no scalar functions or outer products",
                    ))
                }
            };
            fw[i] = v;
            if self.shared[i] {
                cache[i] = v;
            }
        }
        Ok(fw)
    }

    /// `mult·W_0 z` (or `mult·W_0ᵀ z`), built once per operand.
    fn initial_product(
        &mut self,
        w: usize,
        transpose: bool,
        z: NodeId,
        name: Option<String>,
        span: Span,
    ) -> Result<NodeId, UnrollError> {
        if let Some(&id) = self.products.get(&(w, transpose, z)) {
            return Ok(id);
        }
        let id = self.push(Op::MatMul { transpose }, &[self.uparam[w], z], name, span)?;
        self.products.insert((w, transpose, z), id);
        Ok(id)
    }

    /// `mult·W_t z` (or `mult·W_tᵀ z`): the initial product minus the rank-one terms.
    fn product(
        &mut self,
        w: usize,
        transpose: bool,
        z: NodeId,
        name: Option<String>,
        span: Span,
    ) -> Result<NodeId, UnrollError> {
        // The name goes to the corrected value when there is a correction.
        let corrected = !self.rank1[w].is_empty() || !self.hist.is_empty();
        let base_name = if corrected { None } else { name.clone() };
        let base = self.initial_product(w, transpose, z, base_name, span)?;
        if self.adam.is_some() {
            return self.adam_product(w, transpose, z, base, name, span);
        }
        let kappa = self.kappa[w];
        let mut terms = self.initial_scale(w, base);
        for (s, r) in self.rank1[w].clone() {
            let c = self.coefs[w][s + 1];
            if c == 0.0 {
                continue;
            }
            let (vec, other) = if transpose {
                (r.right, r.left)
            } else {
                (r.left, r.right)
            };
            let m = self.push(
                Op::Moment(Expr::mul(Expr::Arg(0), Expr::Arg(1))),
                &[other, z],
                None,
                span,
            )?;
            terms.push((kappa * c, vec![vec, m]));
        }
        // (`combination` returns `base` itself when every coefficient is 0.)
        Ok(self
            .combination(Some(base), &terms, false, name, span)?
            .unwrap_or(base))
    }

    /// The term that scales an initial value (or product) `base` by the decay
    /// `coefs[w][0]`: `(a − 1)·base`, none when a = 1.
    fn initial_scale(&self, w: usize, base: NodeId) -> Vec<(f64, Vec<NodeId>)> {
        let a = self.coefs[w][0];
        if a == 1.0 {
            Vec::new()
        } else {
            vec![(a - 1.0, vec![base])]
        }
    }

    /// `mult·U_t ξ` for an input matrix: `mult·U_0 ξ − κ Σ (ξ_b·ξ) dy_b`.
    fn input_product(
        &mut self,
        w: usize,
        k: usize,
        input: usize,
        time: Option<usize>,
        name: Option<String>,
        span: Span,
    ) -> Result<NodeId, UnrollError> {
        let x = self.input_node(k, input, time, span);
        let corrected = !self.input_rank1[w].is_empty() || !self.hist.is_empty();
        let base_name = if corrected { None } else { name.clone() };
        let base = self.initial_product(w, false, x, base_name, span)?;
        let xi = self.input_values(k, input, time);
        if self.adam.is_some() {
            return self.adam_input_product(w, &xi, base, name, span);
        }
        let kappa = self.kappa[w];
        let mut terms = self.initial_scale(w, base);
        terms.extend(self.input_rank1[w].iter().map(|(s, r)| {
            let dot: f64 = r.xi.iter().zip(&xi).map(|(a, b)| a * b).sum();
            (kappa * self.coefs[w][s + 1] * dot, vec![r.dy])
        }));
        Ok(self
            .combination(Some(base), &terms, false, name, span)?
            .unwrap_or(base))
    }

    /// The backward pass of training sample b at step t: scaled cotangents
    /// `n ∂L_b/∂y` of vectors and `∂L_b/∂m` of moments, and the gradient terms of
    /// every parameter into `pending`.
    fn backward(
        &mut self,
        t: usize,
        b: usize,
        fw: &[Option<NodeId>],
        chi: &[NodeId],
        pending: &mut Pending,
    ) -> Result<(), UnrollError> {
        let g = self.g;
        let k = self.train_idx[b];
        let mut dv: Vec<Vec<NodeId>> = vec![Vec::new(); g.len()];
        let val = |id: NodeId| fw[id.index()].ok_or_else(|| err(Some(id), "a value was not built"));
        // Seeds at the outputs: n ∂L/∂x = Σ_o χ_o coef r.
        for (oi, &out) in g.outputs.iter().enumerate() {
            let Op::Output { terms, .. } = &g.node(out).op else {
                return Err(err(Some(out), "an output that is not an Output"));
            };
            let ops = self.gops[out.index()].clone();
            for term in terms {
                match *term {
                    OutTerm::Readout {
                        coef,
                        readout,
                        vector,
                    } => {
                        let Op::Param(r) = g.node(ops[readout]).op else {
                            return Err(err(Some(out), "a readout that is not a parameter"));
                        };
                        let rv = self.cur[r]
                            .ok_or_else(|| err(Some(out), "a readout without a value"))?;
                        let x = ops[vector];
                        let e = Expr::mul(Expr::Const(coef), Expr::mul(Expr::Arg(0), Expr::Arg(1)));
                        let d = self.push(Op::Nonlin(e), &[chi[oi], rv], None, g.node(out).span)?;
                        dv[x.index()].push(d);
                        pending.readout[r].push((chi[oi], coef, val(x)?));
                    }
                    OutTerm::Scalar { coef, param } => {
                        let Op::Param(p) = g.node(ops[param]).op else {
                            return Err(err(Some(out), "a scalar term that is not a parameter"));
                        };
                        pending.scalar[p].push((chi[oi], coef));
                    }
                }
            }
        }
        for id in g.ids().collect::<Vec<_>>().into_iter().rev() {
            let i = id.index();
            if dv[i].is_empty() {
                continue;
            }
            let scalar = g.ty(id) != Ty::Vector;
            let span = g.node(id).span;
            let name = g.node(id).name.as_ref().map(|s| {
                if self.shared[i] {
                    format!("d{s}_{t}[ξ{}]", b + 1)
                } else {
                    format!("d{s}_{t}(ξ{})", b + 1)
                }
            });
            let parts = std::mem::take(&mut dv[i]);
            let total = if parts.len() == 1 {
                parts[0]
            } else {
                let e = (1..parts.len()).fold(Expr::Arg(0), |e, j| Expr::add(e, Expr::Arg(j)));
                let op = if scalar { Op::Scalar(e) } else { Op::Nonlin(e) };
                self.push(op, &parts, None, span)?
            };
            if let Some(nm) = name {
                if self.u.graph[total].name.is_none() {
                    self.u.graph[total].name = Some(nm);
                }
            }
            let ops = self.gops[i].clone();
            match &g.node(id).op {
                Op::Param(p) => {
                    if g.params[*p].shape == Shape::Vector {
                        pending.vector[*p].push(total);
                    }
                }
                Op::MatMul { transpose } => {
                    let Op::Param(w) = g.node(ops[0]).op else {
                        return Err(err(Some(id), "a product whose matrix is not a parameter"));
                    };
                    if let Op::Input { input, time } = g.node(ops[1]).op {
                        let xi = self.input_values(k, input, time);
                        pending.input[w].push(InputRank1 { dy: total, xi });
                    } else {
                        let x = val(ops[1])?;
                        // y = mult·W x: ∂L/∂W ∝ dy xᵀ and ∂/∂x = mult·W_tᵀ dy; for
                        // y = mult·Wᵀ x the roles swap.
                        pending.rank1[w].push(if *transpose {
                            Rank1 {
                                left: x,
                                right: total,
                            }
                        } else {
                            Rank1 {
                                left: total,
                                right: x,
                            }
                        });
                        let dx = self.product(w, !*transpose, total, None, span)?;
                        dv[ops[1].index()].push(dx);
                    }
                }
                Op::Nonlin(e) | Op::Moment(e) => {
                    let moment = matches!(g.node(id).op, Op::Moment(_));
                    let args: Vec<NodeId> =
                        ops.iter().map(|&a| val(a)).collect::<Result<_, _>>()?;
                    for (slot, &a) in ops.iter().enumerate() {
                        let de = e.diff(slot);
                        if matches!(de, Expr::Const(z) if z == 0.0) {
                            continue;
                        }
                        let vector_arg = g.ty(a) == Ty::Vector;
                        let with = Expr::mul(de.clone(), Expr::Arg(args.len()));
                        let mut a2 = args.clone();
                        a2.push(total);
                        let d = match (moment, vector_arg) {
                            // y = e(.., x, ..): n∂L/∂x = e'·dy;  ∂L/∂m = E_n[dy e'].
                            (false, true) => self.push(Op::Nonlin(with), &a2, None, span)?,
                            (false, false) => self.push(Op::Moment(with), &a2, None, span)?,
                            // m = E_n[ψ(.., x, ..)]: n∂L/∂x = ∂L/∂m · ψ';
                            // ∂L/∂m' = ∂L/∂m · E_n[ψ'].
                            (true, true) => self.push(Op::Nonlin(with), &a2, None, span)?,
                            (true, false) => {
                                let mean = self.push(Op::Moment(de), &args, None, span)?;
                                self.push(
                                    Op::Scalar(Expr::mul(Expr::Arg(0), Expr::Arg(1))),
                                    &[total, mean],
                                    None,
                                    span,
                                )?
                            }
                        };
                        dv[a.index()].push(d);
                    }
                }
                Op::Input { .. } | Op::Output { .. } | Op::Scalar(_) | Op::Outer { .. } => {}
            }
        }
        Ok(())
    }

    /// One step of the linear optimizer on parameter p's coefficients (module docs):
    /// `b ← β b + e_s + λ w`, `w ← w − b`, with e_s step s's update `U_s`.
    fn step_coefficients(&mut self, p: usize, s: usize) {
        let (beta, lambda) = (self.beta, self.lambda[p]);
        let w = &mut self.coefs[p];
        let b = &mut self.bufs[p];
        w.resize(s + 2, 0.0);
        b.resize(s + 2, 0.0);
        let last = s + 1;
        for (i, bi) in b.iter_mut().enumerate() {
            let e = if i == last { 1.0 } else { 0.0 };
            *bi = beta * *bi + e + lambda * w[i];
        }
        for (wi, bi) in w.iter_mut().zip(b.iter()) {
            *wi -= bi;
        }
    }

    /// Applies one step's gradients: rank-one terms for matrices, new values for
    /// vectors, readouts and scalars (named with the new step `t`).
    fn apply(&mut self, t: usize, pending: Pending) -> Result<(), UnrollError> {
        if self.adam.is_some() {
            return self.adam_apply(t, pending);
        }
        let g = self.g;
        let s = t - 1;
        for (p, prm) in g.params.iter().enumerate() {
            let kappa = self.kappa[p];
            if kappa == 0.0 {
                continue;
            }
            let touched = !(pending.rank1[p].is_empty()
                && pending.input[p].is_empty()
                && pending.vector[p].is_empty()
                && pending.readout[p].is_empty()
                && pending.scalar[p].is_empty());
            if !touched {
                // The loss does not depend on it: left alone, as the dense engine does.
                continue;
            }
            self.step_coefficients(p, s);
            let name = Some(format!("{}_{t}", prm.name));
            if !self.simple && (!prm.shape.is_matrix() || prm.shape == Shape::Readout) {
                let terms: Vec<(f64, Vec<NodeId>)> = match prm.shape {
                    Shape::Vector => pending.vector[p].iter().map(|&d| (1.0, vec![d])).collect(),
                    Shape::Readout => pending.readout[p]
                        .iter()
                        .map(|&(chi, coef, x)| (coef, vec![chi, x]))
                        .collect(),
                    _ => pending.scalar[p]
                        .iter()
                        .map(|&(chi, coef)| (coef, vec![chi]))
                        .collect(),
                };
                self.step_terms[p].resize(s, Vec::new());
                self.step_terms[p].push(terms);
                let base = self.uparam[p];
                let mut all = self.initial_scale(p, base);
                for (s, ts) in self.step_terms[p].iter().enumerate() {
                    let c = kappa * self.coefs[p][s + 1];
                    all.extend(ts.iter().map(|(k, a)| (c * k, a.clone())));
                }
                let scalar = prm.shape == Shape::Scalar;
                self.cur[p] = self.combination(Some(base), &all, scalar, name, prm.span)?;
                continue;
            }
            match prm.shape {
                Shape::Hidden => self.rank1[p].extend(pending.rank1[p].iter().map(|&r| (s, r))),
                Shape::Input(_) => {
                    self.input_rank1[p].extend(pending.input[p].iter().map(|r| (s, r.clone())))
                }
                Shape::Vector => {
                    let terms: Vec<_> = pending.vector[p]
                        .iter()
                        .map(|&d| (-kappa, vec![d]))
                        .collect();
                    self.cur[p] = self.combination(self.cur[p], &terms, false, name, prm.span)?;
                }
                Shape::Readout => {
                    let terms: Vec<_> = pending.readout[p]
                        .iter()
                        .map(|&(chi, coef, x)| (-kappa * coef, vec![chi, x]))
                        .collect();
                    self.cur[p] = self.combination(self.cur[p], &terms, false, name, prm.span)?;
                }
                Shape::Scalar => {
                    let terms: Vec<_> = pending.scalar[p]
                        .iter()
                        .map(|&(chi, coef)| (-kappa * coef, vec![chi]))
                        .collect();
                    self.cur[p] = self.combination(self.cur[p], &terms, true, name, prm.span)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prog(src: &str) -> Program {
        crate::compile(src).unwrap_or_else(|e| panic!("{e}"))
    }

    const MUP: &str = "width n\ninput x : 2\nparameterization mup\nparam U : n x 2\n\
        param W : n x n\nparam v : 1 x n\nh = relu(W @ relu(U @ x))\noutput f = v @ h\n\
        train { loss = mse lr = 0.5 steps = 1 data = [ ([1.0, 0.0], 1.0), ([0.0, 1.0], -1.0) ] }\n";

    #[test]
    fn mup_coefficients_are_the_learning_rate_at_every_width() {
        // muP: every κ is η (module docs), at a finite width and in the limit.
        let p = prog(MUP);
        for w in [Width::Finite(7), Width::Finite(1000), Width::Limit] {
            let t = p.train.as_ref().unwrap();
            let b = Builder::new(&p, t, &[], w).unwrap();
            for k in &b.kappa {
                assert!((k - 0.5).abs() < 1e-12, "{w:?}: {:?}", b.kappa);
            }
        }
    }

    #[test]
    fn sp_readout_update_blows_up_in_the_limit_only() {
        let sp = MUP.replace("parameterization mup", "parameterization sp");
        let p = prog(&sp);
        assert!(unroll(&p, &[], Width::Finite(64)).is_ok());
        let e = unroll(&p, &[], Width::Limit).unwrap_err();
        assert!(e.message.contains("`v`"), "{}", e.message);
    }

    #[test]
    fn evaluation_points_come_first_and_training_inputs_are_shared() {
        let p = prog(MUP);
        let u = unroll(&p, &[vec![0.0, 1.0], vec![0.5, 0.5]], Width::Limit).unwrap();
        assert_eq!(
            u.points,
            vec![vec![0.0, 1.0], vec![0.5, 0.5], vec![1.0, 0.0]]
        );
        assert_eq!(u.eval, vec![0, 1]);
        assert_eq!(u.train, vec![2, 0]);
        assert_eq!(u.row(), vec![0.0, 1.0, 0.5, 0.5, 1.0, 0.0]);
        // Two steps of f (t = 0, 1) at the two evaluation points; one χ per sample.
        assert_eq!(u.f.len(), 2);
        assert_eq!(u.f[0].len(), 2);
        assert_eq!(u.chi, vec![u.chi[0].clone()]);
        assert_eq!(u.chi[0].len(), 2);
    }

    #[test]
    fn a_program_without_train_is_refused() {
        let p = prog("width n\nparam v : n\nobserve m = mean(v * v)\n");
        assert!(unroll(&p, &[], Width::Limit).is_err());
    }
}
