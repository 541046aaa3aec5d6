//! Infinite-width training trajectories (theory.md §5.2–5.4, §6; language.md, Training).
//!
//! `f_t` on the evaluation points, t = 0..steps, for the programs whose limit is exact
//! Gaussian algebra; an honest "not computed" for the rest, never a wrong number:
//!
//! * **Kernel regime** (and the trivial regime), from [`crate::scaling`]: features and
//!   the kernel do not move in the limit (TP4 Thm 3.8), so training is kernel gradient
//!   descent with the limit lr-weighted NTK Θ of [`super::limit`], computed over the
//!   union of the evaluation points and the training inputs:
//!   `f_{t+1}(ξ) = f_t(ξ) − η Σ_{o',i} Θ((o,ξ), (o',ξ_i)) χ_{t,o',i}`,
//!   `χ_{t,o,i} = L'(f_{t,o}(ξ_i), y_{i,o}) / B`. f_0 is the NNGP Gaussian process with
//!   mean the outputs' constants. For `mse` the recursion is affine in f_0, so the
//!   trajectory started from E f_0 is exactly E f_t, and `f_t = A^t f_0 + c_t` with
//!   `A = I − (η/B) Θ D` (D counts each training point) gives
//!   `Cov f_t = A^t K (A^t)ᵀ`, K the NNGP: reported as `f_t_var`. For `xent` the
//!   recursion is not affine: the trajectory from E f_0 is reported with a note.
//!   Momentum and minibatches (issue 15) are the heavy ball in function space: the
//!   linearized model moves by `−η Θ b_t`, `b_t = β b_{t−1} + χ_t` over step t's batch,
//!   and `Cov f_t = M_t K M_tᵀ` with `M_t = ∂f_t/∂f_0` by the same recursion.
//! * **Adam, AdamW**: the unrolled program with nonlinear outer products, by particles
//!   ([`super::outer`]), whatever the regime.
//! * **Linear one-hidden-layer networks** outside the kernel regime (muP, mean field):
//!   every neuron α carries a finite vector θ_α of its trainable coordinates, each
//!   rescaled to N(0, 1) at init: the d columns of every input matrix, every bias, every
//!   readout (and a constant 1 for constants in the features). One full-batch step is
//!   the same linear map for every neuron, `θ_α ← A_t θ_α`, with A_t fixed by the
//!   deterministic χ_t, and the outputs are second moments `E[θ θᵀ]`. So θ_t = M_t θ_0,
//!   `E[θ_t θ_tᵀ] = M_t M_tᵀ` (θ_0 has identity second moment), exactly: this is TP4's
//!   "infinite-width muP linear net = width-(d + d_o) linear net with identity-block
//!   initialization" (theory.md §6.2–6.3), the K columns of M_t being its K neurons;
//!   Cor 6.2's ABCD recursion is the case of one input and one output.
//! * **Deeper linear networks**: every W_0 and W_0ᵀ product of a new vector adds a new
//!   Gaussian (theory.md §2.1), so the exact representation grows with t; it is still
//!   finite, and [`super::linear`] computes it on the unrolled training program
//!   ([`crate::autodiff`]) with Ż as exact linear algebra.
//! * Everything else in the feature-learning regime (nonlinear networks): the unrolled
//!   training program's f_t are estimated by the particle engine ([`super::particle`]),
//!   with a Monte Carlo standard error `f_t_se`.
//! * Unstable programs: `f_t` is `None` with a note.

use nalgebra::{DMatrix, DVector};

use super::particle::ParticleConfig;
use super::{LimitError, LimitResult};
use crate::ir::{Loss, Monomial, NodeId, Op, OutTerm, Program, Rational, Shape, Train};
use crate::scaling::Regime;

/// The limit trajectory of a `train` block.
#[derive(Clone, Debug)]
pub struct LimitTrain {
    pub loss: Loss,
    pub lr: f64,
    pub steps: usize,
    /// (steps+1) × O·P, output-major (column o·P + p); `None` when not computed.
    pub f_t: Option<DMatrix<f64>>,
    /// Variance of f_t over f_0's randomness, same shape (kernel regime, mse).
    pub f_t_var: Option<DMatrix<f64>>,
    /// Monte Carlo standard error of f_t, same shape (the particle engine).
    pub f_t_se: Option<DMatrix<f64>>,
    /// How `f_t` was computed, or why it was not.
    pub method: String,
    /// Caveats (xent mean, what is not computed).
    pub note: Option<String>,
}

pub const KERNEL_METHOD: &str = "kernel regime: NTK recursion, exact";
pub const TRIVIAL_METHOD: &str = "trivial regime: NTK recursion, exact";
pub const KERNEL_XENT_METHOD: &str =
    "kernel regime: NTK recursion from E f_0 (for xent not exactly E f_t)";
pub const LINEAR_METHOD: &str = "linear network: exact Gaussian algebra";
pub const DEEP_LINEAR_METHOD: &str =
    "linear network: exact Gaussian algebra on the unrolled program (Ẑ and Ż by linear algebra)";
pub const NOT_COMPUTED: &str = "not computed yet";

pub use crate::autodiff::{union, Union};

/// ∂(one sample's loss)/∂f (language.md, Training).
fn dloss(kind: Loss, f: f64, y: f64) -> f64 {
    match kind {
        Loss::Mse => f - y,
        Loss::Xent => {
            let s = if f >= 0.0 {
                1.0 / (1.0 + (-f).exp())
            } else {
                let e = f.exp();
                e / (1.0 + e)
            };
            s - y
        }
    }
}

/// Each output's constant term: E f_0 (readouts and biases have mean 0).
fn constants(prog: &Program) -> Vec<f64> {
    prog.outputs
        .iter()
        .map(|&o| match &prog.node(o).op {
            Op::Output { constant, .. } => *constant,
            _ => 0.0,
        })
        .collect()
}

/// Kernel gradient descent (module docs): the mean trajectory over the union's points
/// from E f_0, and for mse its variance. `ntk` and `nngp` are O·U × O·U over
/// `u.points`. Returns f_t and the variance over the evaluation points.
pub fn kernel_trajectory(
    prog: &Program,
    train: &Train,
    ntk: &DMatrix<f64>,
    nngp: Option<&DMatrix<f64>>,
    u: &Union,
) -> (DMatrix<f64>, Option<DMatrix<f64>>) {
    let o = prog.outputs.len();
    let nu = u.points.len();
    let p = u.eval.len();
    let q = o * nu;
    // Heavy ball in function space (momentum, issue 15): the linearized model moves by
    // −η Θ b_t with b_t = β b_{t−1} + g_t (torch's buffer, b_0 = g_0), g_t the loss
    // gradient over step t's minibatch (`Train::batch_at`, 1/B).
    let beta = train.optimizer.momentum();
    let batch_d = |t: usize| {
        let batch = train.batch_at(t);
        let b = batch.len() as f64;
        let mut d = DVector::zeros(q);
        for &j in &batch {
            for oi in 0..o {
                d[oi * nu + u.train[j]] += 1.0 / b;
            }
        }
        (batch, b, d)
    };
    let eta = train.lr;
    let c = constants(prog);
    let mut m = DVector::from_fn(q, |k, _| c[k / nu]);
    let mut buf = DVector::zeros(q);
    let mut f_t = DMatrix::zeros(train.steps + 1, o * p);
    let record = |f_t: &mut DMatrix<f64>, t: usize, m: &DVector<f64>| {
        for oi in 0..o {
            for (pi, &e) in u.eval.iter().enumerate() {
                f_t[(t, oi * p + pi)] = m[oi * nu + e];
            }
        }
    };
    for t in 0..=train.steps {
        record(&mut f_t, t, &m);
        if t == train.steps {
            break;
        }
        let (batch, b, _) = batch_d(t);
        let mut g = DVector::zeros(q);
        for &j in &batch {
            let (s, i) = (&train.data[j], u.train[j]);
            for (oi, &y) in s.y.iter().enumerate() {
                g[oi * nu + i] += dloss(train.loss, m[oi * nu + i], y) / b;
            }
        }
        buf = &buf * beta + g;
        m -= ntk * &buf * eta;
    }
    // Cov f_t = M_t K M_tᵀ with M_t = ∂f_t/∂f_0 (mse only: f_t is affine in f_0):
    // N_t = β N_{t−1} + D_t M_t, M_{t+1} = M_t − η Θ N_t (D_t: step t's batch, 1/B).
    let var = match (train.loss, nngp) {
        (Loss::Mse, Some(k)) if q <= 600 => {
            let mut mt = DMatrix::identity(q, q);
            let mut nt = DMatrix::zeros(q, q);
            let mut var = DMatrix::zeros(train.steps + 1, o * p);
            for t in 0..=train.steps {
                let cov = &mt * k * mt.transpose();
                let diag = DVector::from_fn(q, |i, _| cov[(i, i)].max(0.0));
                record(&mut var, t, &diag);
                if t == train.steps {
                    break;
                }
                let (_, _, d) = batch_d(t);
                nt = &nt * beta + DMatrix::from_diagonal(&d) * &mt;
                mt -= ntk * &nt * eta;
            }
            Some(var)
        }
        _ => None,
    };
    (f_t, var)
}

/// Computes the limit kernels over other points.
pub type KernelsAt<'a> = dyn Fn(&[Vec<f64>]) -> Result<LimitResult, LimitError> + 'a;

/// The trajectory of `prog`'s `train` block for `r` (the limit on the evaluation
/// points); `kernels(points)` computes the limit over other points (the union with the
/// training inputs) when they differ.
pub fn trajectory(
    prog: &Program,
    train: &Train,
    r: &LimitResult,
    kernels: &KernelsAt<'_>,
    particles: &ParticleConfig,
) -> LimitTrain {
    let mut out = LimitTrain {
        loss: train.loss,
        lr: train.lr,
        steps: train.steps,
        f_t: None,
        f_t_var: None,
        f_t_se: None,
        method: NOT_COMPUTED.to_string(),
        note: None,
    };
    let eval: Vec<Vec<f64>> = if prog.inputs.is_empty() {
        vec![vec![]]
    } else {
        r.points.clone()
    };
    if !train.optimizer.is_linear() {
        // Adam, AdamW: the unrolled program with nonlinear outer products, by particles
        // (super::outer), whatever the regime.
        adam_trajectory(prog, train, &r.points, particles, &mut out);
        return out;
    }
    let regime = crate::scaling::regime(prog);
    // Momentum and minibatches: the unrolled program carries them in feature learning,
    // the kernel recursion (heavy ball in function space) in the kernel regime. L2
    // weight decay shrinks the initial weights too, which leaves the kernel regime's
    // linearization: computed in feature learning only.
    if train.weight_decay.coef != 0.0 && regime != Some(Regime::FeatureLearning) {
        out.note = Some(format!(
            "{} is computed in the feature-learning regime only (through the unrolled \
             program; weight decay also shrinks the initial weights, which the kernel \
             regime's linearized model does not); this program's regime is {}",
            train.describe(),
            regime.map_or("unknown", Regime::name)
        ));
        return out;
    }
    match regime {
        Some(Regime::Kernel) | Some(Regime::Trivial) => {
            out.method = if regime == Some(Regime::Kernel) {
                KERNEL_METHOD
            } else {
                TRIVIAL_METHOD
            }
            .to_string();
            let u = union(prog, &eval, train);
            let computed;
            let ru = if u.points.len() == eval.len() {
                r
            } else {
                match kernels(&u.points) {
                    Ok(x) => {
                        computed = x;
                        &computed
                    }
                    Err(e) => {
                        out.method = NOT_COMPUTED.to_string();
                        out.note = Some(format!(
                            "the limit kernels over the training inputs could not be computed: {e}"
                        ));
                        return out;
                    }
                }
            };
            let Some(ntk) = &ru.ntk else {
                out.method = NOT_COMPUTED.to_string();
                out.note = Some(format!(
                    "the kernel-regime trajectory needs the limit NTK, which is not available: {}",
                    ru.ntk_note.as_deref().unwrap_or("not derived")
                ));
                return out;
            };
            let (f, var) = kernel_trajectory(prog, train, ntk, ru.nngp.as_ref(), &u);
            out.f_t = Some(f);
            out.f_t_var = var;
            if train.loss == Loss::Xent {
                out.method = KERNEL_XENT_METHOD.to_string();
            }
            out.note = Some(match train.loss {
                Loss::Mse => {
                    "f_0 is a Gaussian process (the NNGP) and f_t is affine in f_0: f_t is the \
                              exact mean E[f_t]; f_t_var is its variance over f_0"
                        .to_string()
                }
                Loss::Xent => {
                    "xent: f_t is not affine in f_0, so this trajectory (started from f_0 = E f_0) \
                               is not exactly E[f_t]"
                        .to_string()
                }
            });
        }
        Some(Regime::Unstable) => {
            out.note = Some(
                "unstable parameterization: f_t has no finite limit as the width grows (theory.md §5.2)"
                    .to_string(),
            );
        }
        Some(Regime::FeatureLearning) => match if train.is_plain_sgd() {
            linear_trajectory(prog, train, &eval)
        } else {
            Err(format!(
                "the one-hidden-layer engine computes full-batch SGD only, not {}",
                train.describe()
            ))
        } {
            Ok(f) => {
                out.method = LINEAR_METHOD.to_string();
                out.f_t = Some(f);
                out.note = Some(
                    "f_t is deterministic in the limit: a width-K linear network with identity-block \
                     initialization (theory.md §6.3)"
                        .to_string(),
                );
            }
            Err(why) => match super::linear::trajectory(prog, &eval) {
                // Deep linear networks: exact Ẑ/Ż algebra on the unrolled program.
                Ok(f) => {
                    out.method = DEEP_LINEAR_METHOD.to_string();
                    out.f_t = Some(f);
                    out.note = Some(
                        "f_t is deterministic in the limit: every Z of the unrolled training program is a \
                         linear form in finitely many Gaussians (theory.md §2.1, §6.2)"
                            .to_string(),
                    );
                }
                // Nonlinear networks: particles.
                Err(why2) => match particle_trajectory(prog, &r.points, particles) {
                    Ok((f, se, method)) => {
                        out.method = method;
                        out.f_t = Some(f);
                        out.f_t_se = Some(se);
                        out.note = Some(
                            "f_t is deterministic in the limit; the training unrolled into one program in \
                             the initial weights (theory.md §6.1), its Z's sampled (theory.md §2.1, §6.2)"
                                .to_string(),
                        );
                    }
                    Err(e) => {
                        out.note = Some(format!(
                            "feature-learning limit: {why}; as an unrolled program: {why2}; the particle \
                             engine could not run it: {e}"
                        ));
                    }
                },
            },
        },
        None => {
            out.note = Some("no regime could be derived for this program".to_string());
        }
    }
    if !train.is_plain_sgd() && out.f_t.is_some() {
        // Say what was trained: the method names only the engine.
        out.method = format!("{}: {}", train.describe(), out.method);
    }
    out
}

/// Adam's and AdamW's trajectory ([`super::outer`]): the unrolled program in the
/// limit's coefficients through the particle engine; why not, in the note.
fn adam_trajectory(
    prog: &Program,
    train: &Train,
    eval: &[Vec<f64>],
    cfg: &ParticleConfig,
    out: &mut LimitTrain,
) {
    match particle_trajectory(prog, eval, cfg) {
        Ok((f, se, method)) => {
            out.method = format!(
                "{}: {method}; each hidden matrix's update a nonlinear outer product over {} \
                 β-particles",
                train.describe(),
                cfg.outer_samples
            );
            out.f_t = Some(f);
            out.f_t_se = Some(se);
            let eval0: &[Vec<f64>] = if prog.inputs.is_empty() { &[] } else { eval };
            let frozen = crate::autodiff::unroll(prog, eval0, crate::autodiff::Width::Limit)
                .map(|u| u.frozen)
                .unwrap_or_default();
            let mut note =
                "f_t is deterministic in the limit; Adam's entrywise update of a hidden \
                            matrix acts as E_β[Q(ĝ(α, β))·Z_β] over an independent copy of the \
                            β-side Z's (Tensor Programs IVb), sampled with the rest"
                    .to_string();
            if !frozen.is_empty() {
                note.push_str(&format!(
                    "; frozen in the limit (ε outgrows the gradient: the update vanishes): {}",
                    frozen
                        .iter()
                        .map(|s| format!("`{s}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            out.note = Some(note);
        }
        Err(e) => {
            out.note = Some(format!(
                "{}: the particle engine could not compute the limit: {e}",
                train.describe()
            ));
        }
    }
}

/// The feature-learning trajectory by particles (module docs): the `train` block
/// unrolled in the limit's coefficients ([`crate::autodiff::unroll`]), f_t's `Scalar`
/// nodes estimated by [`super::particle`]. Returns f_t, its standard error and the
/// method string.
pub fn particle_trajectory(
    prog: &Program,
    eval: &[Vec<f64>],
    cfg: &ParticleConfig,
) -> Result<(DMatrix<f64>, DMatrix<f64>, String), String> {
    let eval: &[Vec<f64>] = if prog.inputs.is_empty() { &[] } else { eval };
    let u = crate::autodiff::unroll(prog, eval, crate::autodiff::Width::Limit)
        .map_err(|e| format!("cannot unroll the training: {e}"))?;
    let cols = u.f.first().map_or(0, |r| r.len());
    let nodes: Vec<NodeId> = u.f.iter().flatten().copied().collect();
    let est = super::particle::particles(&u.prog, &u.row(), &nodes, cfg)?;
    let f = DMatrix::from_fn(u.f.len(), cols, |t, c| est.mean[t * cols + c]);
    let se = DMatrix::from_fn(u.f.len(), cols, |t, c| est.se[t * cols + c]);
    let method = format!(
        "particle engine: {} particles in {} replicas, Ż by Stein's lemma; Monte Carlo standard error in f_t_se",
        est.particles, est.replicas
    );
    Ok((f, se, method))
}

/// One per-neuron coordinate of a one-hidden-layer network (module docs).
#[derive(Clone, Copy, Debug)]
struct Atom {
    /// A feature coordinate (input-matrix column, bias) or the constant 1; `false` for
    /// a readout.
    feature: bool,
    trainable: bool,
    /// Standard deviation, multiplier and learning rate of the trainable variable.
    std: Monomial,
    mult: Monomial,
    lr: Monomial,
}

/// The limit of a monomial coefficient, or why there is none.
fn finite(m: Monomial, what: &str) -> Result<f64, String> {
    m.limit()
        .ok_or_else(|| format!("{what} grows like n^({}) (no finite limit)", m.exp))
}

/// One readout term of an output, in limit units.
struct Term {
    output: usize,
    coef: f64,
    readout: usize,
    vector: NodeId,
}

/// The one-hidden-layer linear network's per-neuron model: the atoms, and for every
/// vector node a linear form (P × K over the atoms) at given points.
struct Linear<'a> {
    prog: &'a Program,
    atoms: Vec<Atom>,
    /// First atom of each parameter (its columns follow).
    first: Vec<usize>,
    one: usize,
    terms: Vec<Term>,
}

impl<'a> Linear<'a> {
    fn new(prog: &'a Program) -> Result<Linear<'a>, String> {
        for id in prog.ids() {
            if let Op::Nonlin(e) = &prog.node(id).op {
                if !e.is_affine() {
                    let mut names = Vec::new();
                    e.visit_funs(&mut |f| names.push(f.name()));
                    names.retain(|n| *n != "id");
                    names.dedup();
                    return Err(format!(
                        "the network is nonlinear (`{}` applies {})",
                        prog.label(id),
                        if names.is_empty() {
                            "a product of features".to_string()
                        } else {
                            names.join(", ")
                        }
                    ));
                }
            }
        }
        let mut atoms = Vec::new();
        let mut first = Vec::new();
        for p in &prog.params {
            first.push(atoms.len());
            let law = p.law;
            let std = law.var.sqrt();
            if law.var.coef == 0.0 {
                return Err(format!(
                    "`{}` is initialized to zero (not covered by the linear engine)",
                    p.name
                ));
            }
            let atom = |feature| Atom {
                feature,
                trainable: true,
                std,
                mult: law.mult,
                lr: law.lr,
            };
            match p.shape {
                Shape::Hidden => {
                    return Err(format!(
                        "`{}` is an n x n matrix: only one-hidden-layer linear networks are computed exactly",
                        p.name
                    ))
                }
                Shape::Scalar => {
                    return Err(format!(
                        "`{}` is a scalar output bias (not covered by the linear engine)",
                        p.name
                    ))
                }
                Shape::Input(d) => atoms.extend((0..d).map(|_| atom(true))),
                Shape::Vector => atoms.push(atom(true)),
                Shape::Readout => atoms.push(atom(false)),
            }
            if p.shape != Shape::Readout {
                // A feature coordinate is Θ(1) at init: mult · std = Θ(1).
                let s = law.mult * std;
                if !s.exp.is_zero() {
                    return Err(format!(
                        "`{}` gives features of size n^({}) at initialization",
                        p.name, s.exp
                    ));
                }
            }
        }
        let one = atoms.len();
        atoms.push(Atom {
            feature: true,
            trainable: false,
            std: Monomial::ONE,
            mult: Monomial::ONE,
            lr: Monomial::constant(0.0),
        });
        let mut terms = Vec::new();
        for (oi, &o) in prog.outputs.iter().enumerate() {
            let Op::Output { terms: ts, .. } = &prog.node(o).op else {
                return Err("an output that is not an Output".into());
            };
            let ops = prog.operands(o);
            for t in ts {
                match *t {
                    OutTerm::Readout {
                        coef,
                        readout,
                        vector,
                    } => {
                        let Op::Param(pi) = prog.node(ops[readout]).op else {
                            return Err("a readout that is not a parameter".into());
                        };
                        terms.push(Term {
                            output: oi,
                            coef,
                            readout: first[pi],
                            vector: ops[vector],
                        });
                    }
                    OutTerm::Scalar { .. } => {
                        return Err("a scalar output bias (not covered by the linear engine)".into())
                    }
                }
            }
        }
        let lin = Linear {
            prog,
            atoms,
            first,
            one,
            terms,
        };
        // Check the structure once (forms on no points).
        lin.forms(&[])?;
        Ok(lin)
    }

    /// The linear form of every vector node over the atoms at `points`: P × K, the
    /// feature's value at neuron α being `Σ_k form[p, k] θ_{α,k}`.
    fn forms(&self, points: &[Vec<f64>]) -> Result<Vec<Option<DMatrix<f64>>>, String> {
        let prog = self.prog;
        let inputs = super::input_values(prog, points);
        let np = points.len();
        let k = self.atoms.len();
        let mut forms: Vec<Option<DMatrix<f64>>> = vec![None; prog.len()];
        for id in prog.ids() {
            let ops = prog.operands(id);
            let label = prog.label(id);
            match &prog.node(id).op {
                Op::Param(pi) if prog.params[*pi].shape == Shape::Vector => {
                    let a = self.first[*pi];
                    let s = (self.atoms[a].mult * self.atoms[a].std).coef;
                    let mut m = DMatrix::zeros(np, k);
                    m.column_mut(a).fill(s);
                    forms[id.index()] = Some(m);
                }
                Op::MatMul { transpose } => {
                    let Op::Param(pi) = prog.node(ops[0]).op else {
                        return Err(format!("`{label}` multiplies by a non-parameter"));
                    };
                    let Shape::Input(d) = prog.params[pi].shape else {
                        return Err(format!("`{label}` is not an input-layer product"));
                    };
                    if *transpose {
                        return Err(format!("`{label}` multiplies by a transpose"));
                    }
                    let Some(x) = inputs.get(&ops[1]) else {
                        return Err(format!("`{label}` is not applied to an input"));
                    };
                    let a = self.first[pi];
                    let s = (self.atoms[a].mult * self.atoms[a].std).coef;
                    let mut m = DMatrix::zeros(np, k);
                    for p in 0..np {
                        for j in 0..d {
                            m[(p, a + j)] = s * x[(p, j)];
                        }
                    }
                    forms[id.index()] = Some(m);
                }
                Op::Nonlin(e) => {
                    if !e.is_affine() {
                        return Err(format!("the network is nonlinear (`{label}`)"));
                    }
                    let zeros = vec![0.0; ops.len()];
                    let mut m = DMatrix::zeros(np, k);
                    m.column_mut(self.one).fill(e.eval(&zeros));
                    for (i, &a) in ops.iter().enumerate() {
                        let c = e.diff(i).eval(&zeros);
                        if c == 0.0 {
                            continue;
                        }
                        let Some(f) = &forms[a.index()] else {
                            return Err(format!(
                                "`{label}` uses `{}`, which is not a feature vector",
                                prog.label(a)
                            ));
                        };
                        m += f * c;
                    }
                    forms[id.index()] = Some(m);
                }
                _ => {}
            }
        }
        for t in &self.terms {
            if forms[t.vector.index()].is_none() {
                return Err(format!(
                    "an output reads out `{}`, which is not a feature vector",
                    prog.label(t.vector)
                ));
            }
        }
        Ok(forms)
    }
}

/// The linear one-hidden-layer trajectory (module docs) on `eval`, or why the program
/// is not such a network.
pub fn linear_trajectory(
    prog: &Program,
    train: &Train,
    eval: &[Vec<f64>],
) -> Result<DMatrix<f64>, String> {
    let lin = Linear::new(prog)?;
    let tpoints: Vec<Vec<f64>> = if prog.inputs.is_empty() {
        vec![vec![]; train.data.len()]
    } else {
        train.data.iter().map(|s| s.x.clone()).collect()
    };
    let ftr = lin.forms(&tpoints)?;
    let fev = lin.forms(eval)?;
    let k = lin.atoms.len();
    let n = Monomial::n_pow(Rational::ONE);
    // Limit coefficients (module docs): output scale c = n·m_v·σ_v, readout update
    // β = l_v·m_v/σ_v, feature update γ_k = l_k·m_v·σ_v/σ_k².
    let mut c = Vec::new();
    let mut beta = Vec::new();
    let mut gamma = Vec::new();
    for t in &lin.terms {
        let v = lin.atoms[t.readout];
        c.push(finite(n * v.mult * v.std, "an output")?);
        beta.push(finite(v.lr * v.mult * v.std.recip(), "a readout's update")?);
        let mut g = vec![0.0; k];
        for (j, a) in lin.atoms.iter().enumerate() {
            if a.feature && a.trainable {
                g[j] = finite(
                    a.lr * v.mult * v.std * a.std.powi(2).recip(),
                    "a feature's update",
                )?;
            }
        }
        gamma.push(g);
    }
    let consts = constants(prog);
    let o = prog.outputs.len();
    let b = train.data.len();
    let pe = eval.len();
    // f at points with forms `fs` from the second moments S.
    let outputs = |fs: &[Option<DMatrix<f64>>], np: usize, s: &DMatrix<f64>| {
        let mut f = DMatrix::from_fn(o, np, |oi, _| consts[oi]);
        for (r, t) in lin.terms.iter().enumerate() {
            let form = fs[t.vector.index()].as_ref().expect("checked");
            let sv = s.row(t.readout);
            for p in 0..np {
                f[(t.output, p)] += t.coef * c[r] * form.row(p).dot(&sv);
            }
        }
        f
    };
    let mut mt = DMatrix::<f64>::identity(k, k);
    let mut f_t = DMatrix::zeros(train.steps + 1, o * pe);
    for step in 0..=train.steps {
        let s = &mt * mt.transpose();
        let fe = outputs(&fev, pe, &s);
        for oi in 0..o {
            for p in 0..pe {
                f_t[(step, oi * pe + p)] = fe[(oi, p)];
            }
        }
        if step == train.steps {
            break;
        }
        let ft = outputs(&ftr, b, &s);
        if ft.iter().any(|v| !v.is_finite()) {
            return Err(format!("the trajectory overflows at step {step}"));
        }
        // θ ← (I − η G) θ.
        let mut g = DMatrix::<f64>::zeros(k, k);
        for (r, t) in lin.terms.iter().enumerate() {
            let form = ftr[t.vector.index()].as_ref().expect("checked");
            for (bi, smp) in train.data.iter().enumerate() {
                let w = dloss(train.loss, ft[(t.output, bi)], smp.y[t.output]) / b as f64 * t.coef;
                if w == 0.0 {
                    continue;
                }
                for j in 0..k {
                    let phi = form[(bi, j)];
                    if phi == 0.0 {
                        continue;
                    }
                    g[(t.readout, j)] += w * beta[r] * phi;
                    g[(j, t.readout)] += w * gamma[r][j] * phi;
                }
            }
        }
        let upd = g * &mt * train.lr;
        mt -= upd;
    }
    Ok(f_t)
}
