//! A particle engine for the infinite-width limit of one-point programs with
//! transposes (theory.md §2.1, §6.2–6.3): Monte Carlo over the Z's.
//!
//! The block engine ([`super::engine`]) integrates exactly, which needs every `Z` to be a
//! function of a few Gaussians; once `W` and `Wᵀ` meet through a nonlinearity (any
//! feature-learning training trajectory, theory.md §6.2) the Ż terms make `Z` a function
//! of a number of Gaussians that grows with every step. Here every vector node's `Z` is
//! instead an array of M samples ("particles") of its law, built in topological order:
//!
//! * an initial vector: iid `N(0, σ²)`, `σ² = lim entry_var`;
//! * an input-layer product `U ξ`: `Σ_i ξ_i Z^{U_i}`, the columns `Z^{U_i}` iid
//!   `N(0, σ_U²)` drawn once per particle;
//! * a hidden product `W x` (or `Wᵀ y`): `Z = Ẑ + Ż` (theory.md §2.1). Ẑ is the next
//!   member of the W-family (resp. Wᵀ-family), a Gaussian family with
//!   `Cov(Ẑ^{W x_j}, Ẑ^{W x_k}) = σ_W² E[Z^{x_j} Z^{x_k}]`, independent of the other
//!   family and of everything else: it is drawn conditionally on the earlier members
//!   (the Gram of moments is estimated from the particles). Ż is
//!   `σ_W² Σ_j Z^{y_j} E[∂Z^x/∂Ẑ^{Wᵀ y_j}]` over the earlier members of the other family
//!   that `Z^x` structurally depends on, by Stein's lemma (`stein` below);
//! * `Nonlin`: coordinatewise, moments and scalars broadcast; `Moment`: the particle
//!   mean; `Scalar`: a function of (deterministic) scalars.
//!
//! Every moment is a particle mean, so each answer carries Monte Carlo error. It is
//! measured, not guessed: the M particles are split into R independent replicas (own
//! seeds, own moment estimates, run in parallel), and each requested scalar is
//! reported as the mean over replicas with standard error `sd / √R`. Streams are the
//! counter-based ones of [`crate::finite::sample`], keyed by (seed, replica, node), so
//! a seed gives the same bytes whatever the thread count.

use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::time::Instant;

use nalgebra::{DMatrix, DVector};
use rayon::prelude::*;

use crate::finite::sample::{fill_normal_seq, StreamKey};
use crate::ir::expr::Operand;
use crate::ir::{Expr, Monomial, NodeId, Op, Program, Rational, Shape, Ty};

/// How many particles, in how many replicas, from which seed.
#[derive(Clone, Debug, PartialEq)]
pub struct ParticleConfig {
    /// Total particles M (split evenly over the replicas, rounded up).
    pub particles: usize,
    /// Independent replicas R (≥ 2: the standard error is their spread).
    pub replicas: usize,
    pub seed: u64,
    /// β-side particles S of a nonlinear outer product ([`super::outer`]): each
    /// particle averages over S others of its replica.
    pub outer_samples: usize,
}

impl Default for ParticleConfig {
    fn default() -> Self {
        ParticleConfig {
            particles: 1 << 20,
            replicas: 16,
            seed: 0,
            outer_samples: 256,
        }
    }
}

/// Means and standard errors of the requested scalar nodes.
#[derive(Clone, Debug, PartialEq)]
pub struct ParticleEstimate {
    /// Mean over replicas, one per requested node.
    pub mean: Vec<f64>,
    /// Standard error of the mean: the replicas' standard deviation over √R.
    pub se: Vec<f64>,
    /// Particles actually used (R times the particles per replica).
    pub particles: usize,
    pub replicas: usize,
    /// Wall time in seconds (never printed to stdout: reports are byte-deterministic).
    pub seconds: f64,
}

/// What the engine does at one node.
#[derive(Clone, Debug)]
enum Kind {
    /// A matrix parameter, or a node no requested value needs.
    Skip,
    /// A finite input point: read by input-layer products only.
    Input,
    /// A vector that is 0 in the limit (vanishing variance).
    Zero,
    /// A scalar parameter whose variance vanishes: the constant 0.
    ZeroScalar,
    Initial {
        std: f64,
    },
    InputLayer {
        param: usize,
        std: f64,
    },
    Hat {
        member: usize,
    },
    Nonlin(Expr),
    /// A nonlinear outer product ([`super::outer`]): its kernel (an index into
    /// [`Structure::kernels`]) applied to its last operand.
    Outer {
        kernel: usize,
    },
    Moment(Expr),
    Scalar(Expr),
    /// Not a particle quantity; the reason.
    Refused(String),
}

/// One member of a hat family: the Ẑ of one hidden product.
#[derive(Clone, Debug)]
struct Member {
    /// Node of the matrix parameter.
    matrix: NodeId,
    transpose: bool,
    node: NodeId,
    arg: NodeId,
    sigma2: f64,
    /// Earlier members of the same family, in order.
    earlier: Vec<usize>,
    /// Members of the other family that `Z^arg` depends on: the structurally nonzero
    /// Ż terms `σ² Z^{arg_j} E[∂Z^arg/∂Ẑ_j]`.
    zdot: Vec<usize>,
}

/// The structure of the limit, without numbers: kinds, hat families, and which Ẑ's
/// each vector depends on (through Ż terms too). Shared by the engine and
/// [`derivation_text`].
struct Structure<'a> {
    prog: &'a Program,
    ops: Vec<Vec<NodeId>>,
    kind: Vec<Kind>,
    members: Vec<Member>,
    /// The distinct kernels of the outer products (shared by products that differ
    /// only in the vector they multiply).
    kernels: Vec<OuterKernel>,
}

/// `F[α, β] = ψ(ĝ_{αβ})` of [`super::outer::kernel`]: ψ, the groups and the 2k
/// operands `a_j`, `b_j`.
#[derive(Clone, Debug, PartialEq)]
struct OuterKernel {
    expr: Expr,
    groups: Vec<usize>,
    ops: Vec<NodeId>,
}

/// The n → ∞ limit of a variance, or why there is none.
fn limit_var(m: Monomial, what: &str) -> Result<f64, String> {
    match m.limit() {
        Some(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!(
            "{what} grows like n^({}) at initialization, so the limit does not exist",
            m.exp
        )),
    }
}

impl<'a> Structure<'a> {
    fn new(prog: &'a Program) -> Structure<'a> {
        let ops: Vec<Vec<NodeId>> = prog.ids().map(|id| prog.operands(id)).collect();
        let mut kind = Vec::with_capacity(prog.len());
        let mut members: Vec<Member> = Vec::new();
        let mut kernels: Vec<OuterKernel> = Vec::new();
        let mut deps: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); prog.len()];
        for id in prog.ids() {
            let o = &ops[id.index()];
            let k = match &prog.node(id).op {
                Op::Input { .. } => Kind::Input,
                Op::Param(p) => {
                    let prm = &prog.params[*p];
                    let var = limit_var(
                        prm.law.entry_var(),
                        &format!("the variance of `{}`", prm.name),
                    );
                    match (prm.shape, var) {
                        (Shape::Vector | Shape::Scalar, Err(e)) => Kind::Refused(e),
                        (Shape::Vector, Ok(0.0)) => Kind::Zero,
                        (Shape::Vector, Ok(v)) => Kind::Initial { std: v.sqrt() },
                        (Shape::Scalar, Ok(0.0)) => Kind::ZeroScalar,
                        (Shape::Scalar, Ok(_)) => Kind::Refused(format!(
                            "`{}` is a random output bias: a random output bias is not a particle quantity",
                            prm.name
                        )),
                        (Shape::Readout, _) => Kind::Refused(format!(
                            "`{}` is a 1 x n readout, read only by outputs (random in the limit)",
                            prm.name
                        )),
                        _ => Kind::Skip,
                    }
                }
                Op::MatMul { transpose } => {
                    Self::matmul(prog, id, o, *transpose, &mut members, &mut deps)
                }
                Op::Nonlin(e) => {
                    let bad = o
                        .iter()
                        .find(|&&a| !matches!(prog.ty(a), Ty::Vector | Ty::Moment | Ty::Finite));
                    match bad {
                        Some(&a) => Kind::Refused(format!(
                            "`{}` is not a vector or a scalar",
                            prog.label(a)
                        )),
                        None => {
                            let mut d = BTreeSet::new();
                            for a in o {
                                d.extend(deps[a.index()].iter().copied());
                            }
                            deps[id.index()] = d;
                            Kind::Nonlin(e.clone())
                        }
                    }
                }
                Op::Outer { expr, groups } => {
                    let k: usize = groups.iter().sum();
                    if o.len() != 2 * k + 1 || o.iter().any(|&a| prog.ty(a) != Ty::Vector) {
                        Kind::Refused("an outer product's operands are 2k + 1 vectors".into())
                    } else {
                        // A function of α's own Z's once the β-side is integrated out:
                        // its Ż dependencies are those of the α-side operands.
                        let mut d = BTreeSet::new();
                        for a in &o[..k] {
                            d.extend(deps[a.index()].iter().copied());
                        }
                        deps[id.index()] = d;
                        let key = OuterKernel {
                            expr: expr.clone(),
                            groups: groups.clone(),
                            ops: o[..2 * k].to_vec(),
                        };
                        let kernel = match kernels.iter().position(|x| *x == key) {
                            Some(j) => j,
                            None => {
                                kernels.push(key);
                                kernels.len() - 1
                            }
                        };
                        Kind::Outer { kernel }
                    }
                }
                Op::Moment(e) => Kind::Moment(e.clone()),
                Op::Scalar(e) => {
                    match o
                        .iter()
                        .find(|&&a| !matches!(prog.ty(a), Ty::Moment | Ty::Finite))
                    {
                        Some(&a) => {
                            Kind::Refused(format!("`{}` is not a scalar", prog.label(a)))
                        }
                        None => Kind::Scalar(e.clone()),
                    }
                }
                Op::Output { .. } => Kind::Refused(
                    "an output of a front-end program is random in the limit (a Gaussian process), \
                     not a particle quantity"
                        .to_string(),
                ),
            };
            kind.push(k);
        }
        Structure {
            prog,
            ops,
            kind,
            members,
            kernels,
        }
    }

    /// The kind of a product, registering its hat-family member and dependencies.
    fn matmul(
        prog: &Program,
        id: NodeId,
        o: &[NodeId],
        transpose: bool,
        members: &mut Vec<Member>,
        deps: &mut [BTreeSet<usize>],
    ) -> Kind {
        let (w, arg) = (o[0], o[1]);
        let Some(prm) = prog.param_of(w) else {
            return Kind::Refused("the matrix operand is not a parameter".into());
        };
        match prm.shape {
            Shape::Input(_) => {
                if transpose || !matches!(prog.node(arg).op, Op::Input { .. }) {
                    return Kind::Refused(format!(
                        "`{}` is an input-layer matrix: only `{} @ input` is a particle quantity",
                        prm.name, prm.name
                    ));
                }
                match limit_var(
                    prm.law.entry_var(),
                    &format!("the entry variance of `{}`", prm.name),
                ) {
                    Err(e) => Kind::Refused(e),
                    Ok(0.0) => Kind::Zero,
                    Ok(v) => Kind::InputLayer {
                        param: w.index(),
                        std: v.sqrt(),
                    },
                }
            }
            Shape::Hidden => {
                let s2 = Monomial::n_pow(Rational::ONE) * prm.law.entry_var();
                let sigma2 =
                    match limit_var(s2, &format!("n times the entry variance of `{}`", prm.name)) {
                        Err(e) => return Kind::Refused(e),
                        Ok(v) => v,
                    };
                if prog.ty(arg) != Ty::Vector {
                    return Kind::Refused(format!("`{}` is not a vector", prog.label(arg)));
                }
                if sigma2 == 0.0 {
                    return Kind::Zero;
                }
                let earlier: Vec<usize> = (0..members.len())
                    .filter(|&j| members[j].matrix == w && members[j].transpose == transpose)
                    .collect();
                let zdot: Vec<usize> = deps[arg.index()]
                    .iter()
                    .copied()
                    .filter(|&j| members[j].matrix == w && members[j].transpose != transpose)
                    .collect();
                let k = members.len();
                let mut d = BTreeSet::from([k]);
                for &j in &zdot {
                    d.extend(deps[members[j].arg.index()].iter().copied());
                }
                deps[id.index()] = d;
                members.push(Member {
                    matrix: w,
                    transpose,
                    node: id,
                    arg,
                    sigma2,
                    earlier,
                    zdot,
                });
                Kind::Hat { member: k }
            }
            _ => Kind::Refused(format!("`{}` cannot multiply a vector", prm.name)),
        }
    }
}

/// When each stored array can be dropped: the memory plan of one run (as
/// `engine::Memo` frees covariance blocks at their last use).
struct Schedule {
    needed: Vec<bool>,
    /// After node i: vector values, hat arrays and input-layer columns to drop.
    free_vec: Vec<Vec<NodeId>>,
    free_hat: Vec<Vec<usize>>,
    free_cols: Vec<Vec<usize>>,
    /// After node i: outer-product kernels to drop.
    free_kernels: Vec<Vec<usize>>,
    /// The most outer-product kernels (M × S each) alive at once.
    peak_kernels: usize,
    /// The most particle arrays alive at once in one replica.
    peak_arrays: usize,
}

impl Schedule {
    fn new(st: &Structure<'_>, want: &[NodeId]) -> Schedule {
        let n = st.prog.len();
        let mut needed = vec![false; n];
        for &w in want {
            needed[w.index()] = true;
        }
        for i in (0..n).rev() {
            if needed[i] {
                for a in &st.ops[i] {
                    needed[a.index()] = true;
                }
            }
        }
        // Hat families need their members' arguments and Ẑ's until the matrix's last
        // product (conditional sampling, Stein coefficients of the other family).
        let mut last_mm: HashMap<usize, usize> = HashMap::new();
        for (i, k) in st.kind.iter().enumerate() {
            if needed[i] && matches!(k, Kind::Hat { .. } | Kind::InputLayer { .. }) {
                last_mm.insert(st.ops[i][0].index(), i);
            }
        }
        let mut last: Vec<usize> = (0..n).collect();
        for i in 0..n {
            if !needed[i] {
                continue;
            }
            for a in &st.ops[i] {
                last[a.index()] = last[a.index()].max(i);
            }
            if let Kind::Hat { .. } = st.kind[i] {
                let a = st.ops[i][1].index();
                last[a] = last[a].max(last_mm[&st.ops[i][0].index()]);
            }
        }
        let mut free_vec = vec![Vec::new(); n];
        let mut free_hat = vec![Vec::new(); n];
        let mut free_cols = vec![Vec::new(); n];
        for i in 0..n {
            if needed[i] {
                free_vec[last[i]].push(NodeId::new(i));
                match st.kind[i] {
                    Kind::Hat { member } => {
                        free_hat[last_mm[&st.ops[i][0].index()]].push(member);
                    }
                    Kind::InputLayer { param, .. } if last_mm.get(&param) == Some(&i) => {
                        free_cols[i].push(param);
                    }
                    _ => {}
                }
            }
        }
        // Peak number of live particle arrays, for the memory check: each array is
        // allocated at its node and dropped after its last use (a hat shared with its
        // node's Z lives until the later of the two).
        let mut delta = vec![0i64; n + 1];
        for i in (0..n).filter(|&i| needed[i]) {
            let mut arrays = |k: i64, until: usize| {
                delta[i] += k;
                delta[until + 1] -= k;
            };
            match &st.kind[i] {
                Kind::Zero | Kind::Initial { .. } | Kind::Nonlin(_) | Kind::Outer { .. } => {
                    arrays(1, last[i])
                }
                Kind::InputLayer { param, .. } => {
                    arrays(1, last[i]);
                    let d = match st.prog.param_of(st.ops[i][0]).map(|p| p.shape) {
                        Some(Shape::Input(d)) => d as i64,
                        _ => 0,
                    };
                    if st.ops[..i].iter().zip(&st.kind).all(|(o, k)| {
                        !matches!(k, Kind::InputLayer { .. }) || o[0].index() != *param
                    }) {
                        arrays(d, last_mm[param]);
                    }
                }
                Kind::Hat { member } => {
                    let until = last_mm[&st.ops[i][0].index()];
                    if st.members[*member].zdot.is_empty() {
                        arrays(1, until.max(last[i]));
                    } else {
                        arrays(1, last[i]);
                        arrays(1, until);
                    }
                }
                _ => {}
            }
        }
        let mut live = 0i64;
        let mut peak = 0i64;
        for d in &delta {
            live += d;
            peak = peak.max(live);
        }
        // Outer kernels: from their first needed use to their last.
        let mut span: Vec<Option<(usize, usize)>> = vec![None; st.kernels.len()];
        for i in (0..n).filter(|&i| needed[i]) {
            if let Kind::Outer { kernel } = st.kind[i] {
                let e = span[kernel].get_or_insert((i, i));
                e.1 = i;
            }
        }
        let mut free_kernels = vec![Vec::new(); n];
        let mut kd = vec![0i64; n + 1];
        for (k, s) in span.iter().enumerate() {
            if let Some((a, b)) = *s {
                free_kernels[b].push(k);
                kd[a] += 1;
                kd[b + 1] -= 1;
            }
        }
        let (mut live_k, mut peak_k) = (0i64, 0i64);
        for d in &kd {
            live_k += d;
            peak_k = peak_k.max(live_k);
        }
        Schedule {
            needed,
            free_vec,
            free_hat,
            free_cols,
            free_kernels,
            peak_kernels: peak_k.max(0) as usize,
            peak_arrays: peak.max(0) as usize,
        }
    }
}

/// Particles per chunk of coordinatewise evaluation.
const CHUNK: usize = 1024;

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Moore–Penrose pseudo-inverse of a symmetric positive semi-definite matrix
/// (eigen-decomposition; eigenvalues below 1e-10 of the largest count as 0), so
/// that repeated or linearly dependent arguments give a singular Gram, not garbage.
fn pinv_sym(g: &DMatrix<f64>) -> DMatrix<f64> {
    let k = g.nrows();
    if k == 0 {
        return DMatrix::zeros(0, 0);
    }
    let sym = (g + g.transpose()) * 0.5;
    let eig = sym.symmetric_eigen();
    let top = eig.eigenvalues.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let tol = 1e-10 * top;
    let mut out = DMatrix::zeros(k, k);
    for (i, &l) in eig.eigenvalues.iter().enumerate() {
        if l > tol {
            let v = eig.eigenvectors.column(i);
            out += v * v.transpose() / l;
        }
    }
    out
}

/// Stein's lemma (Gaussian integration by parts): for a centered Gaussian vector Ẑ_S
/// independent of the other randomness of `g`, `E[Ẑ_S g] = Cov(Ẑ_S) E[∇_S g]`, so
/// `E[∂g/∂Ẑ_S] = Cov(Ẑ_S)⁻¹ E[Ẑ_S g]` (pseudo-inverse when singular).
///
/// Why not forward-mode derivatives through the Nonlin DAG (theory.md §6.3's proposal):
/// a relu network's backward pass multiplies by `step(h)`, whose derivative is a Dirac
/// delta at 0. Coordinatewise (a.e.) derivatives drop that delta and are biased; Stein's
/// identity holds in the distributional sense and needs no derivative at all.
///
/// `Cov(Ẑ_S)` is taken as the particles' own second moments `E_M[Ẑ_S Ẑ_Sᵀ]` (the
/// least-squares form of the same identity): it tends to the model covariance as M
/// grows, and removes the sampling noise of the part of `g` linear in Ẑ_S exactly
/// (semicircle-type programs get their Ż coefficients with no Monte Carlo error).
/// Measured against the model covariance `σ² E[Z^{y_j} Z^{y_k}]` at equal particles:
/// the same f_t SE on sgd_mlp.tp, 0.0024 against 0.0029 on the step test of
/// tests/it/particle.rs, 0.0042 against 0.0080 on `E[Z^k Z^v]` of its W / W.T / tanh test.
fn stein(hats: &[&[f64]], g: &[f64]) -> DVector<f64> {
    let k = hats.len();
    let m = g.len() as f64;
    let c = DMatrix::from_fn(k, k, |i, j| dot(hats[i], hats[j]) / m);
    let b = DVector::from_fn(k, |i, _| dot(hats[i], g) / m);
    pinv_sym(&c) * b
}

/// One replica's state: values of the live nodes.
struct Replica<'s, 'a> {
    st: &'s Structure<'a>,
    m: usize,
    seed: u64,
    replica: u64,
    /// β-side particles of an outer product.
    outer: usize,
    vecs: Vec<Option<Rc<Vec<f64>>>>,
    scalars: Vec<f64>,
    hats: Vec<Option<Rc<Vec<f64>>>>,
    cols: HashMap<usize, Rc<Vec<f64>>>,
    /// Outer-product kernels computed and still needed.
    kernels: HashMap<usize, Rc<Vec<f64>>>,
    /// Per family (matrix node, transpose): the model covariance of its members.
    gram: HashMap<(usize, bool), DMatrix<f64>>,
    inputs: HashMap<NodeId, Vec<f64>>,
}

impl Replica<'_, '_> {
    fn normals(&self, tensor: usize, len: usize, std: f64) -> Result<Vec<f64>, String> {
        let mut v = vec![0.0; len];
        fill_normal_seq(
            &mut v,
            self.m,
            std,
            StreamKey::new(self.seed, self.replica, tensor as u64),
        )
        .map_err(|e| format!("cannot sample: {e}"))?;
        Ok(v)
    }

    fn vec(&self, id: NodeId) -> Result<&[f64], String> {
        self.vecs[id.index()]
            .as_deref()
            .map(|v| v.as_slice())
            .ok_or_else(|| format!("internal: `{}` is not live", self.st.prog.label(id)))
    }

    fn live(&self, id: NodeId) -> Result<Rc<Vec<f64>>, String> {
        self.vecs[id.index()]
            .clone()
            .ok_or_else(|| format!("internal: `{}` is not live", self.st.prog.label(id)))
    }

    fn hat(&self, k: usize) -> Result<&[f64], String> {
        self.hats[k]
            .as_deref()
            .map(|v| v.as_slice())
            .ok_or_else(|| "internal: a hat member is not live".to_string())
    }

    fn arg(&self, a: NodeId) -> Result<Operand<'_>, String> {
        Ok(match self.st.prog.ty(a) {
            Ty::Vector => Operand::Column(self.vec(a)?),
            _ => Operand::Scalar(self.scalars[a.index()]),
        })
    }

    fn run(&mut self, sch: &Schedule) -> Result<(), String> {
        let st = self.st;
        let prog = st.prog;
        let m = self.m;
        for id in prog.ids() {
            let i = id.index();
            if !sch.needed[i] {
                continue;
            }
            let label = || prog.label(id);
            let o = &st.ops[i];
            match &st.kind[i] {
                Kind::Skip | Kind::Input => {}
                Kind::Refused(why) => return Err(format!("`{}`: {why}", label())),
                Kind::Zero => self.vecs[i] = Some(Rc::new(vec![0.0; m])),
                Kind::ZeroScalar => self.scalars[i] = 0.0,
                Kind::Initial { std } => self.vecs[i] = Some(Rc::new(self.normals(i, m, *std)?)),
                Kind::InputLayer { param, std } => {
                    if !self.cols.contains_key(param) {
                        let d = match prog.param_of(o[0]).map(|p| p.shape) {
                            Some(Shape::Input(d)) => d,
                            _ => 0,
                        };
                        let c = self.normals(*param, m * d, *std)?;
                        self.cols.insert(*param, Rc::new(c));
                    }
                    let cols = &self.cols[param];
                    let xi = self.inputs.get(&o[1]).cloned().unwrap_or_default();
                    let mut z = vec![0.0; m];
                    for (j, &x) in xi.iter().enumerate() {
                        if x != 0.0 {
                            for (zz, c) in z.iter_mut().zip(&cols[j * m..(j + 1) * m]) {
                                *zz += x * c;
                            }
                        }
                    }
                    self.vecs[i] = Some(Rc::new(z));
                }
                Kind::Hat { member } => self.hat_product(*member, &sch.needed)?,
                Kind::Nonlin(e) => {
                    let args: Vec<Operand<'_>> =
                        o.iter().map(|&a| self.arg(a)).collect::<Result<_, _>>()?;
                    let mut z = vec![0.0; m];
                    for (c, out) in z.chunks_mut(CHUNK).enumerate() {
                        e.eval_run(&args, c * CHUNK, out);
                    }
                    if z.iter().any(|v| !v.is_finite()) {
                        return Err(format!(
                            "`{}` is not finite at some particle (overflow or a division by zero)",
                            label()
                        ));
                    }
                    self.vecs[i] = Some(Rc::new(z));
                }
                Kind::Outer { kernel } => {
                    if !self.kernels.contains_key(kernel) {
                        let k = &st.kernels[*kernel];
                        let nk = k.ops.len() / 2;
                        let a: Vec<&[f64]> = k.ops[..nk]
                            .iter()
                            .map(|&x| self.vec(x))
                            .collect::<Result<_, _>>()?;
                        let b: Vec<&[f64]> = k.ops[nk..]
                            .iter()
                            .map(|&x| self.vec(x))
                            .collect::<Result<_, _>>()?;
                        let f = super::outer::kernel(&k.expr, &k.groups, &a, &b, m, self.outer);
                        self.kernels.insert(*kernel, Rc::new(f));
                    }
                    let f = self.kernels[kernel].clone();
                    let zv = self.vec(o[o.len() - 1])?;
                    let z = super::outer::apply(&f, zv, m, self.outer);
                    if z.iter().any(|v| !v.is_finite()) {
                        return Err(format!(
                            "the outer product `{}` is not finite at some particle (a division \
                             by zero in the optimizer's update)",
                            label()
                        ));
                    }
                    self.vecs[i] = Some(Rc::new(z));
                }
                Kind::Moment(e) => {
                    let args: Vec<Operand<'_>> =
                        o.iter().map(|&a| self.arg(a)).collect::<Result<_, _>>()?;
                    let mut buf = vec![0.0; CHUNK.min(m)];
                    let mut sum = 0.0;
                    let mut lo = 0;
                    while lo < m {
                        let len = CHUNK.min(m - lo);
                        e.eval_run(&args, lo, &mut buf[..len]);
                        sum += buf[..len].iter().sum::<f64>();
                        lo += len;
                    }
                    let v = sum / m as f64;
                    if !v.is_finite() {
                        return Err(format!("the moment `{}` is not finite", label()));
                    }
                    self.scalars[i] = v;
                }
                Kind::Scalar(e) => {
                    let x: Vec<f64> = o.iter().map(|a| self.scalars[a.index()]).collect();
                    let v = e.eval(&x);
                    if !v.is_finite() {
                        return Err(format!("the scalar `{}` is not finite", label()));
                    }
                    self.scalars[i] = v;
                }
            }
            for a in &sch.free_vec[i] {
                self.vecs[a.index()] = None;
            }
            for &k in &sch.free_hat[i] {
                self.hats[k] = None;
            }
            for p in &sch.free_cols[i] {
                self.cols.remove(p);
            }
            for k in &sch.free_kernels[i] {
                self.kernels.remove(k);
            }
        }
        Ok(())
    }

    /// `Z^{W x} = Ẑ + Ż` (module docs): Ẑ conditionally on the earlier members of its
    /// family, Ż by Stein's lemma over the other family.
    fn hat_product(&mut self, k: usize, needed: &[bool]) -> Result<(), String> {
        let st = self.st;
        let mem = &st.members[k];
        // The family's members in this run (a member no requested value needs is never
        // drawn; every member `Z^x` depends on is needed).
        let earlier: Vec<usize> = mem
            .earlier
            .iter()
            .copied()
            .filter(|&j| needed[st.members[j].node.index()])
            .collect();
        let m = self.m;
        let mf = m as f64;
        let xr = self.live(mem.arg)?;
        let x: &[f64] = &xr;
        let s2 = mem.sigma2;
        let c = DVector::from_iterator(
            earlier.len(),
            earlier
                .iter()
                .map(|&j| Ok(s2 * dot(x, self.vec(st.members[j].arg)?) / mf))
                .collect::<Result<Vec<f64>, String>>()?,
        );
        let v = s2 * dot(x, x) / mf;
        let fam = (mem.matrix.index(), mem.transpose);
        let g = self
            .gram
            .get(&fam)
            .cloned()
            .unwrap_or_else(|| DMatrix::zeros(0, 0));
        if g.nrows() != earlier.len() {
            return Err("internal: a hat family's Gram does not match its members".into());
        }
        let a = pinv_sym(&g) * &c;
        let cond = (v - c.dot(&a)).max(0.0);
        let mut hat = self.normals(mem.node.index(), m, cond.sqrt())?;
        for (&j, &aj) in earlier.iter().zip(a.iter()) {
            if aj != 0.0 {
                for (h, e) in hat.iter_mut().zip(self.hat(j)?) {
                    *h += aj * e;
                }
            }
        }
        let kf = g.nrows();
        let mut g2 = g.resize(kf + 1, kf + 1, 0.0);
        for r in 0..kf {
            g2[(r, kf)] = c[r];
            g2[(kf, r)] = c[r];
        }
        g2[(kf, kf)] = v;
        self.gram.insert(fam, g2);
        let hat = Rc::new(hat);
        let z = if mem.zdot.is_empty() {
            hat.clone()
        } else {
            let hs: Vec<&[f64]> = mem
                .zdot
                .iter()
                .map(|&j| self.hat(j))
                .collect::<Result<_, _>>()?;
            let coef = stein(&hs, x);
            let mut z = (*hat).clone();
            for (&j, &cj) in mem.zdot.iter().zip(coef.iter()) {
                let y = self.vec(st.members[j].arg)?;
                for (zz, yy) in z.iter_mut().zip(y) {
                    *zz += s2 * cj * yy;
                }
            }
            Rc::new(z)
        };
        self.hats[k] = Some(hat);
        self.vecs[mem.node.index()] = Some(z);
        Ok(())
    }
}

/// The limits of the scalar nodes `nodes` (Moments or Scalars) of a one-point program
/// (`row` holds its inputs as in `--inputs`), by particles (module docs).
pub fn particles(
    prog: &Program,
    row: &[f64],
    nodes: &[NodeId],
    cfg: &ParticleConfig,
) -> Result<ParticleEstimate, String> {
    let start = Instant::now();
    if cfg.replicas < 2 {
        return Err("the particle engine needs at least 2 replicas for a standard error".into());
    }
    let m = cfg.particles.div_ceil(cfg.replicas).max(2);
    for &n in nodes {
        if n.index() >= prog.len() || !matches!(prog.ty(n), Ty::Moment | Ty::Finite) {
            return Err(format!(
                "`{}` is not a scalar node",
                if n.index() < prog.len() {
                    prog.label(n)
                } else {
                    format!("%{}", n.index())
                }
            ));
        }
    }
    let st = Structure::new(prog);
    let sch = Schedule::new(&st, nodes);
    // Replicas run a few at a time (one per thread): refuse before allocating when
    // their live arrays (plus a few temporaries) cannot fit.
    let s = cfg.outer_samples.min(m).max(2);
    let per_kernel = if sch.peak_kernels > 0 { s } else { 0 };
    let bytes = (sch.peak_arrays as u128 + 4 + (sch.peak_kernels * per_kernel) as u128)
        * m as u128
        * 8
        * rayon::current_num_threads().min(cfg.replicas) as u128;
    if let Some(avail) = crate::machine::mem_available() {
        if bytes > avail {
            return Err(format!(
                "{} particles need about {:.1} GB ({} arrays of {m} particles live per replica); \
                 this machine has {:.1} GB available: use fewer particles",
                m * cfg.replicas,
                bytes as f64 / 1e9,
                sch.peak_arrays,
                avail as f64 / 1e9
            ));
        }
    }
    let inputs: HashMap<NodeId, Vec<f64>> = super::input_values(prog, &[row.to_vec()])
        .into_iter()
        .map(|(k, v)| (k, v.iter().copied().collect()))
        .collect();
    let per: Vec<Result<Vec<f64>, String>> = (0..cfg.replicas)
        .into_par_iter()
        .map(|r| {
            let mut rep = Replica {
                st: &st,
                m,
                seed: cfg.seed,
                replica: r as u64,
                outer: cfg.outer_samples,
                vecs: vec![None; prog.len()],
                scalars: vec![0.0; prog.len()],
                hats: vec![None; st.members.len()],
                cols: HashMap::new(),
                kernels: HashMap::new(),
                gram: HashMap::new(),
                inputs: inputs.clone(),
            };
            rep.run(&sch)?;
            Ok(nodes.iter().map(|n| rep.scalars[n.index()]).collect())
        })
        .collect();
    let per: Vec<Vec<f64>> = per.into_iter().collect::<Result<_, _>>()?;
    let rf = cfg.replicas as f64;
    let mut mean = Vec::with_capacity(nodes.len());
    let mut se = Vec::with_capacity(nodes.len());
    for q in 0..nodes.len() {
        let mu = per.iter().map(|v| v[q]).sum::<f64>() / rf;
        let var = per.iter().map(|v| (v[q] - mu).powi(2)).sum::<f64>() / (rf - 1.0);
        mean.push(mu);
        se.push((var / rf).sqrt());
    }
    Ok(ParticleEstimate {
        mean,
        se,
        particles: m * cfg.replicas,
        replicas: cfg.replicas,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn fmt(v: f64) -> String {
    crate::ir::expr::fmt_num((v * 1e12).round() / 1e12)
}

/// The Z derivation of a one-point program with transposes, one line per node, with
/// every structurally nonzero Ż term (theory.md §2.1): what the particle engine samples.
pub fn derivation_text(prog: &Program) -> String {
    let st = Structure::new(prog);
    let names = prog.stable_names();
    let z = |id: NodeId| Program::z_name(&names, id);
    let label = |id: NodeId| names[id.index()].clone();
    let arg = |id: NodeId| crate::ir::product_arg(&names, id);
    let fam = |mem: &Member| {
        format!(
            "{}{}",
            label(mem.matrix),
            if mem.transpose { "ᵀ" } else { "" }
        )
    };
    let mut out = String::new();
    let mut seen: BTreeSet<(usize, bool)> = BTreeSet::new();
    for id in prog.ids() {
        let o = &st.ops[id.index()];
        let names: Vec<String> = o
            .iter()
            .map(|&a| match prog.ty(a) {
                Ty::Vector => z(a),
                _ => label(a),
            })
            .collect();
        let line = match &st.kind[id.index()] {
            Kind::Skip | Kind::Input => continue,
            Kind::Refused(why) => {
                if matches!(prog.node(id).op, Op::Param(_)) && prog.users(id).is_empty() {
                    continue;
                }
                format!("{}: not a particle quantity ({why})", label(id))
            }
            Kind::Zero => format!("{} = 0  (the variance vanishes as n grows)", z(id)),
            Kind::ZeroScalar => {
                format!("{} = 0  (the variance vanishes as n grows)", label(id))
            }
            Kind::Initial { std } => format!("{} ~ N(0, {})", z(id), fmt(std * std)),
            Kind::InputLayer { std, .. } => {
                let u = label(o[0]);
                let x = arg(o[1]);
                format!(
                    "{} = Σ_i {x}_i Z^{{{u}_i}},  Z^{{{u}_i}} iid N(0, {})",
                    z(id),
                    fmt(std * std)
                )
            }
            Kind::Hat { member } => {
                let mem = &st.members[*member];
                let f = fam(mem);
                let mut s = format!("{} = Ẑ^{{{f} {}}}", z(id), arg(mem.arg));
                for &j in &mem.zdot {
                    let other = &st.members[j];
                    s.push_str(&format!(
                        " + {}{}·E[∂{}/∂Ẑ^{{{} {}}}]",
                        if mem.sigma2 == 1.0 {
                            String::new()
                        } else {
                            format!("{}·", fmt(mem.sigma2))
                        },
                        z(other.arg),
                        z(mem.arg),
                        fam(other),
                        arg(other.arg)
                    ));
                }
                if seen.insert((mem.matrix.index(), mem.transpose)) {
                    s.push_str(&format!(
                        "  (family {f}: Cov(Ẑ^{{{f} a}}, Ẑ^{{{f} b}}) = {}·E[Z^a Z^b])",
                        fmt(mem.sigma2)
                    ));
                }
                s
            }
            Kind::Nonlin(e) => format!("{} = {}", z(id), e.display(&|i| names[i].clone())),
            Kind::Outer { kernel } => {
                let k = &st.kernels[*kernel];
                let nk = k.ops.len() / 2;
                let mut j = 0;
                let gs: Vec<String> = k
                    .groups
                    .iter()
                    .enumerate()
                    .map(|(s, &c)| {
                        let terms: Vec<String> = (j..j + c)
                            .map(|i| format!("{}(α)·{}(β)", z(k.ops[i]), z(k.ops[nk + i])))
                            .collect();
                        j += c;
                        format!("ĝ{s} = {}", terms.join(" + "))
                    })
                    .collect();
                format!(
                    "{} = E_β[({})·{}(β)],  {}",
                    z(id),
                    k.expr.display(&|s| format!("ĝ{s}")),
                    z(o[o.len() - 1]),
                    gs.join(", ")
                )
            }
            Kind::Moment(e) => format!("{} = E[{}]", label(id), e.display(&|i| names[i].clone())),
            Kind::Scalar(e) => format!("{} = {}", label(id), e.display(&|i| names[i].clone())),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}
