//! The NTK of programs that multiply by a matrix and its transpose in the forward pass
//! (tied weights, `h2 = W.T @ tanh(W @ h1)`), from the backward pass written as a
//! tensor program (theory.md §2.1, §2.3).
//!
//! Why a module of its own: the general engine's NTK is a forward tangent kernel under
//! gradient independence (theory.md §2.2), which fails here: backpropagating through
//! `Wᵀ φ(W h)` multiplies cotangents by `W` and by `Wᵀ`, so the backward Z's have Ż
//! parts. Instead the backward pass is appended to the program as ordinary nodes and
//! the same Z derivation (Ẑ + Ż, [`super::zform`]) and the same P×P engine evaluate it.
//!
//! ## The backward program
//!
//! For each output `f = Σ_t c_t v_t·x_t + …` (readouts `v_t = mult·w`, entries of
//! variance `σ_v²/n`), scaled cotangents `dx = √n ∂f/∂x` (Θ(1) coordinates):
//!
//! ```text
//!   seed            dx_t  += c_t · v̂_t           v̂ = √n·v, a vector with Z^{v̂} ~ N(0, σ_v²)
//!   y = φ(x_1..x_k)  dx_i  += ∂_i φ(x) ⊙ dy
//!   y = W x          dx    += Wᵀ dy               (a product by Wᵀ)
//!   y = Wᵀ x         dx    += W dy                (a product by W)
//! ```
//!
//! The readout `v` is used only by outputs, so every cotangent is linear (odd) in the
//! seeds `Z^{v̂}` and every forward Z is even (free of them). Hence a Ż coefficient
//! `σ² E[∂Z^x/∂Ẑ^{W y}]` with `Z^x` and `Ẑ^{W y}` of opposite parity vanishes (it is the
//! mean of an odd function of the seeds), and odd and even Gaussians of one family are
//! independent. The Ż terms that remain in the backward pass are those of a cotangent
//! through a cotangent: in `dh1 = Wᵀ (tanh'(Z^{W h1}) ⊙ W dh2)`,
//!
//! ```text
//!   Z^{dh1} = Ẑ^{Wᵀ da} + s(ξ)·Z^{dh2},   s(ξ) = σ_W² E[tanh'(Z^{W h1}(ξ))]
//! ```
//!
//! (`Ẑ^{W dh2}` enters `Z^{da}` through `tanh'(Z^{W h1}) ·`), the transpose of the
//! forward `Z^{h2} = Ẑ^{Wᵀ tanh(W h1)} + s(ξ)·Z^{h1}`; the derivation prints them.
//!
//! ## The kernel (theory.md §2.3, W = mult·w, learning rate lr)
//!
//! `Θ(ξ, ξ') = Σ_θ lr_θ ⟨∂f(ξ)/∂w_θ, ∂f'(ξ')/∂w_θ⟩`. A hidden `W` used forward as
//! `y_i = W x_i` and transposed as `u_j = Wᵀ z_j` has
//! `∂f/∂W = Σ_i δy_i x_iᵀ + Σ_j z_j δu_jᵀ` (δ = ∂f/∂·), so with `δ·δ' → E[Z^d Z^d']`
//! and `x·x' → n E[Z^x Z^x']`:
//!
//! ```text
//!   Θ_W = lr mult² n [ Σ_{i,i'} E[Z^{dy_i} Z^{dy'_i'}] E[Z^{x_i} Z^{x'_i'}]
//!                    + Σ_{j,j'} E[Z^{z_j} Z^{z'_j'}] E[Z^{du_j} Z^{du'_j'}] ]
//! ```
//!
//! For a transposed use the roles of input and cotangent swap. The cross terms
//! `(δy_i·z'_j)(x_i·δu'_j)` are products of the mean of a cotangent times a forward
//! vector, odd in the seeds: zero. Input matrices `U` (`y = U ξ`) give
//! `lr mult² Σ E[Z^{dy} Z^{dy'}] ⟨ξ, ξ'⟩`, vector parameters `b` give
//! `lr mult² E[Z^{db} Z^{db'}]`, readouts `lr mult² c c' n E[Z^x Z^x']` and scalar
//! output biases `lr mult² c c'`. A seed variance `σ_v² = s·n^e` is `s` in the
//! derivation and `n^{e}` on every cotangent product (an exponent the kernel carries,
//! like the general engine's).

use std::collections::HashMap;

use nalgebra::DMatrix;

use super::engine::{Engine, NumError, Scaled};
use crate::ir::{Expr, Law, Monomial, NodeId, Op, OutTerm, Param, Program, Rational, Shape, Ty};

/// A program followed by one backward pass per output.
#[derive(Clone, Debug)]
pub struct Backward {
    /// The forward program with the backward nodes appended (forward node ids unchanged).
    pub prog: Program,
    /// Per node, whether its Z is odd in the seeds (the cotangents and the seeds).
    pub odd: Vec<bool>,
    /// Per output, the cotangent node of each forward vector that reaches it.
    pub cot: Vec<HashMap<NodeId, NodeId>>,
    /// Per output, the exponent e/2 of its seeds' scale `√(σ_v²) = √s · n^{e/2}`.
    pub seed_exp: Vec<Rational>,
    /// Number of forward nodes.
    pub forward: usize,
}

impl Backward {
    /// Appends the backward passes (module docs), or says why they cannot be written.
    pub fn build(prog: &Program) -> Result<Backward, String> {
        let mut bp = prog.clone();
        let forward = prog.len();
        let names = prog.stable_names();
        let mut seeds: HashMap<usize, NodeId> = HashMap::new();
        let mut cots = Vec::new();
        let mut seed_exp = Vec::new();
        let mut backward_nodes: Vec<NodeId> = Vec::new();
        for &o in &prog.outputs {
            let fname = names[o.index()].clone();
            let ops = prog.operands(o);
            let Op::Output { terms, .. } = &prog.node(o).op else {
                continue;
            };
            let mut contrib: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
            let mut exp: Option<Rational> = None;
            for t in terms {
                let OutTerm::Readout {
                    coef,
                    readout,
                    vector,
                } = t
                else {
                    continue;
                };
                let r = ops[*readout];
                let Op::Param(pi) = prog.node(r).op else {
                    return Err("a readout that is not a parameter".into());
                };
                let prm = &prog.params[pi];
                let s2 = Monomial::n_pow(Rational::ONE) * prm.law.entry_var();
                let e = s2.exp * Rational::HALF;
                match exp {
                    Some(x) if x != e && s2.coef != 0.0 => {
                        return Err(format!(
                            "the readouts of `{fname}` have variances of different orders in n"
                        ))
                    }
                    _ if s2.coef != 0.0 => exp = Some(e),
                    _ => {}
                }
                let seed = *seeds.entry(pi).or_insert_with(|| {
                    let idx = bp.params.len();
                    let span = prm.span;
                    let node = bp.push(Op::Param(idx), &[], Some(format!("√n·{}", prm.name)), span);
                    bp.params.push(Param {
                        name: format!("√n·{}", prm.name),
                        shape: Shape::Vector,
                        law: Law {
                            var: Monomial::constant(s2.coef),
                            mult: Monomial::constant(1.0),
                            lr: Monomial::constant(0.0),
                        },
                        law_span: prm.law_span,
                        preset: None,
                        span,
                        node,
                    });
                    backward_nodes.push(node);
                    node
                });
                let x = ops[*vector];
                let c = if *coef == 1.0 {
                    seed
                } else {
                    let n = bp.push(
                        Op::Nonlin(Expr::mul(Expr::Const(*coef), Expr::Arg(0))),
                        &[seed],
                        None,
                        prog.node(o).span,
                    );
                    backward_nodes.push(n);
                    n
                };
                contrib.entry(x).or_default().push(c);
            }
            let mut cot: HashMap<NodeId, NodeId> = HashMap::new();
            for i in (0..forward).rev() {
                let x = NodeId::new(i);
                let Some(cs) = contrib.remove(&x) else {
                    continue;
                };
                let span = prog.node(x).span;
                let name = Some(format!("d{fname}/d{}", names[i]));
                let dx = if cs.len() == 1 && bp.node(cs[0]).name.is_none() {
                    // Name the single contribution itself.
                    bp.graph[cs[0]].name = name;
                    cs[0]
                } else {
                    let sum = (1..cs.len()).fold(Expr::Arg(0), |e, k| Expr::add(e, Expr::Arg(k)));
                    let n = bp.push(Op::Nonlin(sum), &cs, name, span);
                    backward_nodes.push(n);
                    n
                };
                cot.insert(x, dx);
                let xops = prog.operands(x);
                match &prog.node(x).op {
                    Op::MatMul { transpose } => {
                        let w = xops[0];
                        let shape = prog.param_of(w).map(|p| p.shape);
                        if shape == Some(Shape::Hidden) && prog.ty(xops[1]) == Ty::Vector {
                            let n = bp.push(
                                Op::MatMul {
                                    transpose: !transpose,
                                },
                                &[w, dx],
                                None,
                                span,
                            );
                            backward_nodes.push(n);
                            contrib.entry(xops[1]).or_default().push(n);
                        }
                    }
                    Op::Nonlin(e) => {
                        let k = xops.len();
                        for (j, &a) in xops.iter().enumerate() {
                            match prog.ty(a) {
                                Ty::Vector => {}
                                Ty::Moment => {
                                    return Err(format!(
                                        "`{}` uses a moment inside a vector expression",
                                        names[i]
                                    ))
                                }
                                _ => continue,
                            }
                            let d = e.diff(j);
                            if d.is_constant() && d.eval(&[]) == 0.0 {
                                continue;
                            }
                            let (f, args) = if d.is_constant() {
                                (Expr::mul(Expr::Const(d.eval(&[])), Expr::Arg(0)), vec![dx])
                            } else {
                                let mut args = xops.clone();
                                args.push(dx);
                                (Expr::mul(d, Expr::Arg(k)), args)
                            };
                            let n = bp.push(Op::Nonlin(f), &args, None, span);
                            backward_nodes.push(n);
                            contrib.entry(a).or_default().push(n);
                        }
                    }
                    _ => {}
                }
            }
            cots.push(cot);
            seed_exp.push(exp.unwrap_or(Rational::ZERO));
        }
        let mut odd = vec![false; bp.len()];
        for n in backward_nodes {
            odd[n.index()] = true;
        }
        Ok(Backward {
            prog: bp,
            odd,
            cot: cots,
            seed_exp,
            forward,
        })
    }

    /// The NTK block of outputs `a` and `b` (module docs), with its exponent of n.
    pub fn ntk_pair(&self, eng: &mut Engine<'_>, a: usize, b: usize) -> Result<Scaled, NumError> {
        let prog = &self.prog;
        let p = eng.p;
        let n = Monomial::n_pow(Rational::ONE);
        let (ca, cb) = (&self.cot[a], &self.cot[b]);
        let seeds = Monomial::n_pow(self.seed_exp[a] + self.seed_exp[b]);
        let mut t = Scaled {
            m: DMatrix::zeros(p, p),
            exp: Rational::ZERO,
        };
        let add = |t: Scaled, m: DMatrix<f64>, c: Monomial| {
            t.plus(
                Scaled {
                    m,
                    exp: Rational::ZERO,
                }
                .mul_mono(c),
            )
        };
        // Uses of each parameter by forward products, in node order.
        let mut uses: Vec<Vec<NodeId>> = vec![Vec::new(); prog.params.len()];
        for i in 0..self.forward {
            let x = NodeId::new(i);
            if let Op::MatMul { .. } = prog.node(x).op {
                if let Op::Param(pi) = prog.node(prog.operands(x)[0]).op {
                    uses[pi].push(x);
                }
            }
        }
        for (pi, prm) in prog.params.iter().enumerate() {
            let law = prm.law;
            let k = law.lr * law.mult.powi(2);
            match prm.shape {
                Shape::Hidden => {
                    for &y in &uses[pi] {
                        let Some(&dy) = ca.get(&y) else { continue };
                        for &y2 in &uses[pi] {
                            let Some(&dy2) = cb.get(&y2) else { continue };
                            let (Op::MatMul { transpose: t1 }, Op::MatMul { transpose: t2 }) =
                                (&prog.node(y).op, &prog.node(y2).op)
                            else {
                                continue;
                            };
                            if t1 != t2 {
                                continue; // odd in the seeds: zero (module docs)
                            }
                            let (x, x2) = (prog.operands(y)[1], prog.operands(y2)[1]);
                            let mut m = eng.vv(dy, dy2)?;
                            m.component_mul_assign(&eng.vv(x, x2)?);
                            t = add(t, m, k * n * seeds);
                        }
                    }
                }
                Shape::Input(_) => {
                    for &y in &uses[pi] {
                        let Some(&dy) = ca.get(&y) else { continue };
                        for &y2 in &uses[pi] {
                            let Some(&dy2) = cb.get(&y2) else { continue };
                            let (x, x2) = (prog.operands(y)[1], prog.operands(y2)[1]);
                            let mut m = eng.vv(dy, dy2)?;
                            let vals = eng.input_node_values();
                            let g = &vals[&x] * vals[&x2].transpose();
                            m.component_mul_assign(&g);
                            t = add(t, m, k * seeds);
                        }
                    }
                }
                Shape::Vector if prm.node.index() < self.forward => {
                    if let (Some(&d1), Some(&d2)) = (ca.get(&prm.node), cb.get(&prm.node)) {
                        let m = eng.vv(d1, d2)?;
                        t = add(t, m, k * seeds);
                    }
                }
                _ => {}
            }
        }
        // Readouts and scalar output biases (as in the general engine's output_pair).
        let terms = |o: NodeId| prog.output_terms(o);
        let (ta, tb) = (terms(prog.outputs[a]), terms(prog.outputs[b]));
        for &(c1, r1, x1) in &ta {
            for &(c2, r2, x2) in &tb {
                if r1 != r2 {
                    continue;
                }
                let Some(prm) = prog.param_of(r1) else {
                    continue;
                };
                let k = prm.law.lr * prm.law.mult.powi(2) * Monomial::constant(c1 * c2);
                match (x1, x2) {
                    (Some(x1), Some(x2)) => {
                        let m = eng.vv(x1, x2)?;
                        t = add(t, m, k * n);
                    }
                    (None, None) => t = add(t, DMatrix::from_element(p, p, 1.0), k),
                    _ => {}
                }
            }
        }
        Ok(t)
    }
}

/// Where the backward pass of a program cannot be written or derived, the reason.
pub fn unsupported_note(reason: &str) -> String {
    format!(
        "not derived: the backward pass of this program (which multiplies by a matrix and its \
         transpose, so its cotangents have Ż terms, theory.md §2.1): {reason}; the NNGP and the \
         observes above are exact limits"
    )
}
