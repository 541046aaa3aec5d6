//! The tensor-program IR: one graph that both interpreters read.
//!
//! A [`Program`] is a `petgraph` DAG of instructions over width-n vectors (theory.md
//! §1.1, Netsor-transpose+): initial vectors and matrices (one node per `param`, however
//! often it is used), `MatMul` (optionally by the transpose), a fused coordinatewise
//! `Nonlin`, scalar `Moment`s, and finite `Output`s read out by `1 x n` parameters.
//!
//! The IR describes the computation for one generic input point; interpreters run it
//! on all points at once (N x P blocks in `finite`, P x P covariance blocks in `limit`).
//!
//! Invariants (checked by [`Program::validate`] in tests):
//! * node indices are a topological order: every operand edge goes from a smaller index
//!   to a larger one, so interpreters walk `0..len` once;
//! * an edge's weight is the operand slot; the slots of a node are exactly `0..k`;
//! * a parameter is exactly one `Param` node; each use is an edge out of it;
//! * the IR knows nothing of syntax (only byte spans, for diagnostics) and nothing of
//!   numerics (laws are monomials in n, not sampled values).

pub mod expr;
pub mod integrability;
pub mod law;

use std::collections::HashMap;

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

pub use expr::{Expr, Fun};
pub use law::{Abc, Law, Monomial, Preset, Rational, Role, Shape};

/// Index of a node; also its position in topological order.
pub type NodeId = NodeIndex<u32>;

/// A byte range of the source, for diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Span {
        Span { start, end }
    }
    pub fn range(self) -> std::ops::Range<usize> {
        self.start..self.end
    }
    pub fn join(self, o: Span) -> Span {
        Span {
            start: self.start.min(o.start),
            end: self.end.max(o.end),
        }
    }
}

/// One `input` declaration: a point in R^dim, or a sequence of `len` such points.
#[derive(Clone, Debug, PartialEq)]
pub struct InputDecl {
    pub name: String,
    pub dim: usize,
    pub len: Option<usize>,
    pub span: Span,
}

impl InputDecl {
    /// Numbers per point in an `--inputs` row: `dim`, or `len * dim` time-major.
    pub fn row_len(&self) -> usize {
        self.dim * self.len.unwrap_or(1)
    }
}

/// One `param`.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub name: String,
    pub shape: Shape,
    pub law: Law,
    /// Where the law came from: the explicit law's span, or the preset block / name.
    pub law_span: Span,
    /// `true` when the law came from a `parameterization` preset.
    pub preset: Option<Preset>,
    pub span: Span,
    pub node: NodeId,
}

impl Param {
    pub fn role(&self) -> Role {
        self.shape.role()
    }
    pub fn role_name(&self) -> &'static str {
        match self.shape.role() {
            Role::Input => "input",
            Role::Hidden => "hidden",
            Role::Output => "output",
            Role::Bias => "bias",
            Role::OutputBias => "output bias",
        }
    }
}

/// One term of an output `f = sum_k c_k v_k @ x_k + sum_j d_j b_j + c0`.
#[derive(Clone, Debug, PartialEq)]
pub enum OutTerm {
    /// `coef * (R @ x)`: `readout` and `vector` are operand slots.
    Readout {
        coef: f64,
        readout: usize,
        vector: usize,
    },
    /// `coef * b` for a scalar (`1`) parameter in operand slot `param`.
    Scalar { coef: f64, param: usize },
}

/// Instructions.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A finite input point (`x`, or `x[t]` of a sequence). Not a width-n vector.
    Input { input: usize, time: Option<usize> },
    /// A parameter (index into [`Program::params`]): an A-var matrix, an initial
    /// vector (bias), a readout, or a scalar output bias.
    Param(usize),
    /// `W @ x` or `W.T @ x`. Operands: 0 = the matrix parameter, 1 = the argument
    /// (a width-n vector, or an `Input` for an `n x d` matrix).
    MatMul { transpose: bool },
    /// A coordinatewise function of width-n vectors and scalar moments (Nonlin+).
    Nonlin(Expr),
    /// `(1/n) sum_a psi(x_a, ...)`: a scalar.
    Moment(Expr),
    /// A finite scalar function of scalar operands (moments, finite scalars, scalar
    /// parameters): the outputs f_t and loss derivatives χ of an unrolled training
    /// program ([`crate::autodiff`]). Front-end programs never contain one.
    Scalar(Expr),
    /// A finite output.
    Output { terms: Vec<OutTerm>, constant: f64 },
    /// The nonlinear outer product of Tensor Programs IVb (theory.md §6; module docs of
    /// [`crate::limit::outer`]): the vector `y_α = (1/n) Σ_β ψ(ĝ^0_{αβ}, …) z_β` with
    /// `ĝ^s_{αβ} = Σ_{j ∈ group s} a_{j,α} b_{j,β}`. Operands: the k = Σ groups
    /// vectors `a_j` (read at α), the k vectors `b_j` (read at β, paired in order), then
    /// `z`; `expr`'s `Arg(s)` is ĝ^s. Written only by the unrolled training of an
    /// entrywise optimizer (Adam) in the limit's coefficients: ψ is its update.
    Outer { expr: Expr, groups: Vec<usize> },
}

impl Op {
    /// The op names of cli.md's graph JSON.
    pub fn kind(&self, prog: &Program) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param(p) => {
                if prog.params[*p].shape.is_matrix() {
                    "matrix"
                } else {
                    "vector"
                }
            }
            Op::MatMul { .. } => "matmul",
            Op::Nonlin(_) => "nonlin",
            Op::Moment(_) => "moment",
            Op::Scalar(_) => "scalar",
            Op::Output { .. } => "output",
            Op::Outer { .. } => "outer",
        }
    }
}

/// What a node's value is, for type checks and interpreters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    /// A finite input point in R^d.
    Point(usize),
    /// A parameter matrix.
    Matrix,
    /// A width-n vector.
    Vector,
    /// A deterministic-in-the-limit scalar (a moment).
    Moment,
    /// A finite random scalar (an output, or a scalar parameter).
    Finite,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    /// The program's name for this value, when it has one (`h[2]`, `f`, `W`).
    pub name: Option<String>,
    pub span: Span,
}

/// Loss functions of `train` (language.md, Training).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// (1/B) sum (1/2)(f - y)^2
    Mse,
    /// logistic loss, targets in {0, 1}
    Xent,
}

impl Loss {
    pub fn name(self) -> &'static str {
        match self {
            Loss::Mse => "mse",
            Loss::Xent => "xent",
        }
    }
}

/// One training example: an input row (as in `--inputs`) and one target per output.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub x: Vec<f64>,
    pub y: Vec<f64>,
}

/// The optimizer of a `train` block (README, "Training: optimizers"). Every one acts
/// on the trainable variable `w` of a parameter (the N(0, var) draw; the parameter is
/// `mult · w`) with the learning rate `lr · lr_mult(n)`, and follows the update of
/// `torch.optim` of the same name step for step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// `w ← w − lr·g` (torch.optim.SGD).
    Sgd,
    /// torch.optim.SGD(momentum = β, dampening = 0): `b_0 = g_0`,
    /// `b_t = β b_{t−1} + g_t`, `w ← w − lr·b_t`.
    Momentum { beta: f64 },
    /// torch.optim.Adam: `m = β1 m + (1−β1) g`, `v = β2 v + (1−β2) g²`,
    /// `w ← w − lr · (m/(1−β1^t)) / (sqrt(v/(1−β2^t)) + ε)`, t = 1, 2, …
    Adam {
        beta1: f64,
        beta2: f64,
        eps: Monomial,
    },
    /// torch.optim.AdamW: Adam after the decoupled decay `w ← w·(1 − lr·wd)`.
    AdamW {
        beta1: f64,
        beta2: f64,
        eps: Monomial,
        wd: Monomial,
    },
}

impl Optimizer {
    pub fn name(self) -> &'static str {
        match self {
            Optimizer::Sgd => "sgd",
            Optimizer::Momentum { .. } => "momentum",
            Optimizer::Adam { .. } => "adam",
            Optimizer::AdamW { .. } => "adamw",
        }
    }

    /// The update is a fixed linear combination of past gradients (and, with weight
    /// decay, of the initial value): SGD and momentum. Adam's is not.
    pub fn is_linear(self) -> bool {
        matches!(self, Optimizer::Sgd | Optimizer::Momentum { .. })
    }

    /// The momentum coefficient β of a linear optimizer (0 for SGD).
    pub fn momentum(self) -> f64 {
        match self {
            Optimizer::Momentum { beta } => beta,
            _ => 0.0,
        }
    }
}

/// The `train` block, recorded for autodiff.
#[derive(Clone, Debug, PartialEq)]
pub struct Train {
    pub loss: Loss,
    pub lr: f64,
    pub steps: usize,
    pub data: Vec<Sample>,
    pub span: Span,
    pub lr_span: Span,
    /// `optimizer = …` (default SGD).
    pub optimizer: Optimizer,
    /// Where the optimizer was set (the block when it was not).
    pub optimizer_span: Span,
    /// `weight_decay = …`: an L2 term `wd · w` added to every gradient, as torch's
    /// `weight_decay` for SGD, momentum and Adam (0 by default).
    pub weight_decay: Monomial,
    /// `batch = B` (default: the whole data, B = D): step t's minibatch is the samples
    /// `(t·B + j) mod D`, j = 0..B, and its loss the mean over them ([`Train::batch_at`]).
    pub batch: usize,
}

impl Train {
    /// Indices into `data` of step t's minibatch: `(t·B + j) mod D` for j = 0..B —
    /// consecutive samples in order, wrapping around the end of the data (B ≤ D, so no
    /// sample appears twice in one batch). With B = D every step is the full batch in
    /// data order.
    pub fn batch_at(&self, t: usize) -> Vec<usize> {
        let d = self.data.len().max(1);
        let b = self.batch.min(d);
        (0..b).map(|j| (t * b + j) % d).collect()
    }

    /// Full-batch SGD without weight decay: the training every engine computes.
    pub fn is_plain_sgd(&self) -> bool {
        self.optimizer == Optimizer::Sgd && self.weight_decay.coef == 0.0 && self.is_full_batch()
    }

    /// How the training steps, in words: `full-batch gradient descent` for plain SGD,
    /// otherwise the optimizer with its arguments, the weight decay and the minibatch.
    pub fn describe(&self) -> String {
        if self.is_plain_sgd() {
            return "full-batch gradient descent".to_string();
        }
        let mut s = match self.optimizer {
            Optimizer::Sgd => "sgd".to_string(),
            Optimizer::Momentum { beta } => format!("momentum({beta})"),
            Optimizer::Adam { beta1, beta2, eps } => format!("adam({beta1}, {beta2}, {eps})"),
            Optimizer::AdamW {
                beta1,
                beta2,
                eps,
                wd,
            } => format!("adamw({beta1}, {beta2}, {eps}, {wd})"),
        };
        if self.weight_decay.coef != 0.0 {
            s.push_str(&format!(", weight decay {}", self.weight_decay));
        }
        if self.is_full_batch() {
            s.push_str(", full batch");
        } else {
            s.push_str(&format!(", minibatches of {}", self.batch));
        }
        s
    }

    /// Every step uses every sample.
    pub fn is_full_batch(&self) -> bool {
        self.batch >= self.data.len()
    }
}

/// A compiled tensor program.
#[derive(Clone, Debug)]
pub struct Program {
    pub graph: DiGraph<Node, usize>,
    /// Name of the infinite dimension (`width n`).
    pub width: String,
    pub inputs: Vec<InputDecl>,
    pub params: Vec<Param>,
    /// Output nodes in cli.md's order (declaration order of each family, indices ascending).
    pub outputs: Vec<NodeId>,
    /// Moment nodes of `observe` statements, in the same order convention.
    pub observes: Vec<NodeId>,
    pub train: Option<Train>,
    pub preset: Preset,
}

impl Program {
    pub fn new(width: String, preset: Preset) -> Program {
        Program {
            graph: DiGraph::default(),
            width,
            inputs: Vec::new(),
            params: Vec::new(),
            outputs: Vec::new(),
            observes: Vec::new(),
            train: None,
            preset,
        }
    }

    /// The terms of output `o`: (coefficient, the readout or scalar parameter's node,
    /// the vector read out — `None` for a scalar parameter term); empty for a node that
    /// is not an output.
    pub fn output_terms(&self, o: NodeId) -> Vec<(f64, NodeId, Option<NodeId>)> {
        let ops = self.operands(o);
        match &self.node(o).op {
            Op::Output { terms, .. } => terms
                .iter()
                .map(|t| match t {
                    OutTerm::Readout {
                        coef,
                        readout,
                        vector,
                    } => (*coef, ops[*readout], Some(ops[*vector])),
                    OutTerm::Scalar { coef, param } => (*coef, ops[*param], None),
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Appends a node with its operands (each must already exist): the only way nodes
    /// are made, which keeps node order topological.
    pub fn push(
        &mut self,
        op: Op,
        operands: &[NodeId],
        name: Option<String>,
        span: Span,
    ) -> NodeId {
        let id = self.graph.add_node(Node { op, name, span });
        for (slot, &a) in operands.iter().enumerate() {
            debug_assert!(a < id, "operands precede their users");
            self.graph.add_edge(a, id, slot);
        }
        id
    }

    pub fn len(&self) -> usize {
        self.graph.node_count()
    }
    pub fn is_empty(&self) -> bool {
        self.graph.node_count() == 0
    }
    pub fn node(&self, id: NodeId) -> &Node {
        &self.graph[id]
    }
    /// All node ids in topological order.
    pub fn ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.graph.node_indices()
    }

    /// Operands of a node, by slot.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut e: Vec<(usize, NodeId)> = self
            .graph
            .edges_directed(id, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        e.sort_unstable();
        e.into_iter().map(|(_, s)| s).collect()
    }

    /// Nodes that use `id`, in topological order (with repeats if used twice).
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut u: Vec<NodeId> = self
            .graph
            .edges_directed(id, Direction::Outgoing)
            .map(|e| e.target())
            .collect();
        u.sort_unstable();
        u
    }

    /// The parameter behind a `Param` node.
    pub fn param_of(&self, id: NodeId) -> Option<&Param> {
        match self.node(id).op {
            Op::Param(p) => Some(&self.params[p]),
            _ => None,
        }
    }

    /// The type of a node's value.
    pub fn ty(&self, id: NodeId) -> Ty {
        match &self.node(id).op {
            Op::Input { input, .. } => Ty::Point(self.inputs[*input].dim),
            Op::Param(p) => match self.params[*p].shape {
                Shape::Vector => Ty::Vector,
                Shape::Scalar => Ty::Finite,
                _ => Ty::Matrix,
            },
            Op::MatMul { .. } | Op::Nonlin(_) | Op::Outer { .. } => Ty::Vector,
            Op::Moment(_) => Ty::Moment,
            Op::Scalar(_) | Op::Output { .. } => Ty::Finite,
        }
    }

    /// A display name for a node: its own name, else `%id`.
    pub fn label(&self, id: NodeId) -> String {
        match &self.node(id).name {
            Some(n) => n.clone(),
            None => format!("%{}", id.index()),
        }
    }

    /// A name for every node that users can snapshot: it comes from the source and does
    /// not depend on how unrelated nodes are numbered (adding an unused `param` or an
    /// unrelated statement leaves every name unchanged).
    ///
    /// * a node the program names keeps its name (`h`, `x[3]`, `f`);
    /// * an unnamed product is named by its structure, `{W h[0]}` or `{Wᵀ x[2]}`;
    /// * an unnamed coordinatewise function by its expression over its operands' names,
    ///   `{relu(U x) * 2}`, and an unnamed moment or scalar likewise, unbraced: `E[v * h]`;
    /// * an unnamed node whose structural name would pass [`MAX_STRUCTURAL_NAME`]
    ///   characters is named after the first named node computed from it, `h[2]#1` (the
    ///   first such intermediate of `h[2]`, counting in program order).
    ///
    /// Only a node from which no named node is computed (none in a compiled program) falls
    /// back to its number, `%7`. Structural names are braced so that [`Self::z_name`]
    /// can write `Z^{W h[0]}`.
    pub fn stable_names(&self) -> Vec<String> {
        let n = self.len();
        // The named node each node is (first) computed into: the consumer of smallest
        // index, its own name if it has one, else its owner. Depends only on source names.
        let mut owner: Vec<Option<NodeId>> = vec![None; n];
        let mut consumers: Vec<Vec<NodeId>> = vec![Vec::new(); n];
        for id in self.ids() {
            for a in self.operands(id) {
                consumers[a.index()].push(id);
            }
        }
        for i in (0..n).rev() {
            if let Some(&c) = consumers[i].iter().min() {
                owner[i] = if self.node(c).name.is_some() {
                    Some(c)
                } else {
                    owner[c.index()]
                };
            }
        }
        let mut names: Vec<String> = Vec::with_capacity(n);
        let mut counts: HashMap<NodeId, usize> = HashMap::new();
        for id in self.ids() {
            let node = self.node(id);
            if let Some(nm) = &node.name {
                names.push(nm.clone());
                continue;
            }
            let ops = self.operands(id);
            let inner = |o: NodeId| unbrace(&names[o.index()]).to_string();
            let grouped = |o: NodeId| {
                let s = inner(o);
                if is_atomic(&s) || matches!(self.node(o).op, Op::MatMul { .. }) {
                    s
                } else {
                    format!("({s})")
                }
            };
            let structural = match &node.op {
                Op::MatMul { transpose } => {
                    let t = if *transpose { "ᵀ" } else { "" };
                    Some(format!(
                        "{}{t} {}",
                        inner(ops[0]),
                        product_arg(&names, ops[1])
                    ))
                }
                Op::Nonlin(e) | Op::Scalar(e) => Some(e.display(&|k| grouped(ops[k])).to_string()),
                Op::Moment(e) => Some(format!("E[{}]", e.display(&|k| grouped(ops[k])))),
                _ => None,
            };
            // Vectors' structural names are braced (`Z^{W h}`); scalars' read as they are.
            let vector = matches!(node.op, Op::MatMul { .. } | Op::Nonlin(_));
            let name = match structural {
                Some(s) if s.chars().count() <= MAX_STRUCTURAL_NAME && vector => format!("{{{s}}}"),
                Some(s) if s.chars().count() <= MAX_STRUCTURAL_NAME => s,
                _ => match owner[id.index()] {
                    Some(o) => {
                        let k = counts.entry(o).or_insert(0);
                        *k += 1;
                        format!("{}#{k}", names_of(self, o))
                    }
                    None => format!("%{}", id.index()),
                },
            };
            names.push(name);
        }
        names
    }

    /// `Z^h` for a named node, `Z^{W h[0]}` for a structural name from
    /// [`Self::stable_names`], `Z^{h[2]#1}` for an abbreviated one.
    pub fn z_name(names: &[String], id: NodeId) -> String {
        let s = &names[id.index()];
        if s.starts_with('{') || s.contains('#') {
            format!("Z^{}", brace(s))
        } else {
            format!("Z^{s}")
        }
    }

    /// The points as reports list them (cli.md): none for a program without inputs,
    /// whose single "point" is the empty one.
    pub fn reported_points(&self, points: Vec<Vec<f64>>) -> Vec<Vec<f64>> {
        if self.inputs.is_empty() {
            Vec::new()
        } else {
            points
        }
    }

    pub fn output_names(&self) -> Vec<String> {
        self.outputs.iter().map(|&o| self.label(o)).collect()
    }

    /// Checks the structural invariants listed in the module docs.
    pub fn validate(&self) -> Result<(), String> {
        for id in self.ids() {
            let ops = self.operands(id);
            for (slot, e) in self
                .graph
                .edges_directed(id, Direction::Incoming)
                .enumerate()
            {
                if e.source() >= id {
                    return Err(format!(
                        "edge {:?} -> {:?} is not topological",
                        e.source(),
                        id
                    ));
                }
                let _ = slot;
            }
            let want = match &self.node(id).op {
                Op::Input { .. } | Op::Param(_) => Some(0),
                Op::MatMul { .. } => Some(2),
                _ => None,
            };
            if let Some(k) = want {
                if ops.len() != k {
                    return Err(format!(
                        "node {} has {} operands, expected {k}",
                        id.index(),
                        ops.len()
                    ));
                }
            }
            if let Op::MatMul { .. } = self.node(id).op {
                if self.param_of(ops[0]).is_none() {
                    return Err(format!(
                        "matmul {} does not multiply a parameter",
                        id.index()
                    ));
                }
            }
        }
        for (i, p) in self.params.iter().enumerate() {
            if self.node(p.node).op != Op::Param(i) {
                return Err(format!("param {} is not its node", p.name));
            }
        }
        Ok(())
    }
}

/// Longest structural name [`Program::stable_names`] spells out, in characters.
pub const MAX_STRUCTURAL_NAME: usize = 40;

fn names_of(prog: &Program, id: NodeId) -> String {
    prog.node(id).name.clone().unwrap_or_default()
}

/// A name from [`Program::stable_names`] as the argument of a product: unbraced, in
/// parentheses unless it reads as one term (`W h`, `Wᵀ (a + b)`).
pub fn product_arg(names: &[String], id: NodeId) -> String {
    let s = unbrace(&names[id.index()]);
    if is_atomic(s) {
        s.to_string()
    } else {
        format!("({s})")
    }
}

/// `{s}` without its braces.
fn unbrace(s: &str) -> &str {
    s.strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or(s)
}

/// `s` braced once.
fn brace(s: &str) -> String {
    if s.starts_with('{') {
        s.to_string()
    } else {
        format!("{{{s}}}")
    }
}

/// Whether `s` reads as one term: no space outside brackets.
fn is_atomic(s: &str) -> bool {
    let mut depth = 0i32;
    for c in s.chars() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ' ' if depth == 0 => return false,
            _ => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(src: &str) -> Vec<String> {
        let prog = crate::compile(src).expect("a valid program");
        prog.stable_names()
    }

    /// Unnamed products and functions are named by their structure, operands by their
    /// own names; an argument that is not one term is parenthesized.
    #[test]
    fn structural_names() {
        let n = names(
            "width n\ninput x : 1\nparam U : n x 1\nparam W : n x n\nparam v : 1 x n\n\
             h = tanh(W @ (relu(U @ x) + 1))\noutput f = v @ h\n",
        );
        for want in ["{U x}", "{relu(U x) + 1}", "{W (relu(U x) + 1)}", "h", "f"] {
            assert!(n.contains(&want.to_string()), "{want} not in {n:?}");
        }
        assert!(n.iter().all(|s| !s.starts_with('%')), "{n:?}");
    }

    /// A structural name longer than MAX_STRUCTURAL_NAME is abbreviated after the
    /// named vector computed from it, counting in program order.
    #[test]
    fn long_names_are_abbreviated_after_their_named_consumer() {
        let n = names(
            "width n\ninput x : 1\nparam U : n x 1\nparam W : n x n\nparam v : 1 x n\n\
             h = tanh(W @ (relu(U @ x) + sin(U @ x) + cos(U @ x) + erf(U @ x)))\n\
             output f = v @ h\n",
        );
        assert!(n.contains(&"h#1".to_string()), "{n:?}");
        assert!(n.contains(&"{W h#1}".to_string()), "{n:?}");
        let z = Program::z_name(
            &n,
            NodeIndex::new(n.iter().position(|s| s == "h#1").unwrap()),
        );
        assert_eq!(z, "Z^{h#1}");
        assert!(
            n.iter()
                .all(|s| s.chars().count() <= MAX_STRUCTURAL_NAME + 2),
            "{n:?}"
        );
    }
}
