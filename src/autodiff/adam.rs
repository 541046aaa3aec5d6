//! Adam and AdamW in the unrolled program, in the limit's coefficients only
//! (issue 15; the mathematics in [`crate::limit::outer`]).
//!
//! Why apart from the linear optimizers: their updates are sums of rank-one terms in
//! the past gradients (Moments), while Adam's `Q_u(ĝ^0..ĝ^u) = m̂_u/(√v̂_u + ε')` is
//! taken entry by entry. After t steps a parameter is
//!
//! ```text
//! w_t = a_t·w_0 − κ Σ_{u<t} d_{t,u} Q_u,    a_t = (1−λ)^t,  d_{t,u} = (1−λ)^{t−1−u}
//! ```
//!
//! (AdamW's decoupled decay λ = η·lr·wd, 0 for Adam), with, in scaled variables
//! (`ĝ` Θ(1), the true gradient `c·ĝ`, so `ε' = ε/c`):
//!
//! | parameter | ĝ^s | c | κ (its used value moves by) |
//! | --- | --- | --- | --- |
//! | hidden `y = mult·W x` | `Σ_b dy^s_{b,α} x^s_{b,β}` | mult/n | η·lr·mult·n, through [`crate::ir::Op::Outer`] |
//! | input `y = mult·U ξ` | `Σ_b dy^s_{b,α} ξ^s_{b,j}` | mult/n | η·lr·mult, times `ξ_j`, summed over j |
//! | vector (value mult·w) | `Σ_b dv^s_{b,α}` | mult/n | η·lr·mult |
//! | readout (`r = n·mult·w`) | `Σ_b χ^s_b coef x^s_{b,β}` | mult | η·lr·mult·n |
//! | scalar | `Σ_b χ^s_b coef` | mult | η·lr·mult |
//!
//! In muP's Adam column (TP5 Table 3) every κ is η and every ε' is the constant ε·n.
//! A κ that blows up is refused (SP + Adam); an ε' that blows up freezes the
//! parameter when κ/ε' → 0 (its update vanishes: the limit is the untrained value,
//! and [`super::Unrolled::frozen`] names it).

use crate::ir::{Expr, Fun, Monomial, Optimizer, Rational, Shape, Train};

/// Adam's constants for one parameter in the limit.
#[derive(Clone, Copy, Debug)]
pub(super) enum AdamParam {
    /// Updated: κ and ε'.
    Moves { kappa: f64, eps: f64 },
    /// ε' → ∞ with κ/ε' → 0: the update vanishes.
    Frozen,
}

/// Adam's hyperparameters, when `train` uses Adam or AdamW.
#[derive(Clone, Copy, Debug)]
pub(super) struct Adam {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: Monomial,
    /// AdamW's decoupled decay (0 for Adam).
    pub wd: Monomial,
}

impl Adam {
    pub fn of(train: &Train) -> Option<Adam> {
        match train.optimizer {
            Optimizer::Adam { beta1, beta2, eps } => Some(Adam {
                beta1,
                beta2,
                eps,
                wd: Monomial::constant(0.0),
            }),
            Optimizer::AdamW {
                beta1,
                beta2,
                eps,
                wd,
            } => Some(Adam {
                beta1,
                beta2,
                eps,
                wd,
            }),
            _ => None,
        }
    }

    /// κ and ε' of a parameter (module docs), or why the limit does not exist.
    pub fn param(
        &self,
        eta: Monomial,
        lr: Monomial,
        mult: Monomial,
        shape: Shape,
        name: &str,
    ) -> Result<AdamParam, String> {
        let n1 = Monomial::n_pow(Rational::ONE);
        let base = eta * lr * mult;
        let (kappa, c) = match shape {
            Shape::Hidden => (base * n1, mult * n1.recip()),
            Shape::Input(_) | Shape::Vector => (base, mult * n1.recip()),
            Shape::Readout => (base * n1, mult),
            Shape::Scalar => (base, mult),
        };
        let eps = self.eps * c.recip();
        match eps.limit() {
            Some(e) => match kappa.limit() {
                Some(k) => Ok(AdamParam::Moves { kappa: k, eps: e }),
                None => Err(format!(
                    "an Adam step of `{name}` moves its used value by Θ({kappa}) (κ = η·lr·mult{}), \
                     which grows without bound as n → ∞: this parameterization has no limit \
                     (muP's Adam column: hidden and readout lr Θ(1/n))",
                    if matches!(shape, Shape::Hidden | Shape::Readout) {
                        "·n"
                    } else {
                        ""
                    }
                )),
            },
            None => match (kappa * eps.recip()).limit() {
                Some(0.0) => Ok(AdamParam::Frozen),
                _ => Err(format!(
                    "Adam's ε for `{name}` is {eps} times its gradient's scale and the step \
                     κ = {kappa} does not vanish against it: the update tends to a linear \
                     (momentum-like) one, which this version does not compute"
                )),
            },
        }
    }

    /// `Q_u` for u = `ghat.len() − 1` (0-based: torch's step u + 1) from the gradient
    /// entries ĝ^0..ĝ^u: bias-corrected moments, `m̂/(√v̂ + ε')`.
    pub fn q(&self, ghat: &[Expr], eps: f64) -> Expr {
        let u = ghat.len() as i32 - 1;
        let bc1 = 1.0 - self.beta1.powi(u + 1);
        let bc2 = 1.0 - self.beta2.powi(u + 1);
        let mut m = Expr::Const(0.0);
        let mut v = Expr::Const(0.0);
        for (s, g) in ghat.iter().enumerate() {
            let k = u - s as i32;
            let a = (1.0 - self.beta1) * self.beta1.powi(k) / bc1;
            let b = (1.0 - self.beta2) * self.beta2.powi(k) / bc2;
            m = Expr::add(m, Expr::mul(Expr::Const(a), g.clone()));
            v = Expr::add(v, Expr::mul(Expr::Const(b), Expr::powi(g.clone(), 2)));
        }
        let den = Expr::call(Fun::Sqrt, v);
        let den = if eps == 0.0 {
            den
        } else {
            Expr::add(den, Expr::Const(eps))
        };
        Expr::div(m, den)
    }

    /// `Σ_{u<t} d_{t,u} Q_u` (module docs) from every step's ĝ, with λ the decay per step.
    pub fn update(&self, ghat: &[Expr], eps: f64, lambda: f64) -> Expr {
        let t = ghat.len();
        let mut e = Expr::Const(0.0);
        for u in 0..t {
            let d = (1.0 - lambda).powi((t - 1 - u) as i32);
            e = Expr::add(e, Expr::mul(Expr::Const(d), self.q(&ghat[..=u], eps)));
        }
        e
    }
}

use super::{err, Builder, Pending, UnrollError};
use crate::ir::{NodeId, Op, Span};

/// Operands of one Nonlin or Outer being built: each node once, in order.
#[derive(Default)]
struct Args {
    nodes: Vec<NodeId>,
}

impl Args {
    fn arg(&mut self, n: NodeId) -> Expr {
        let i = match self.nodes.iter().position(|&m| m == n) {
            Some(i) => i,
            None => {
                self.nodes.push(n);
                self.nodes.len() - 1
            }
        };
        Expr::Arg(i)
    }
}

impl Builder<'_> {
    fn adam(&self) -> Result<Adam, UnrollError> {
        self.adam
            .ok_or_else(|| err(None, "internal: Adam's update without Adam"))
    }

    /// `(a_t, κ, ε')` of parameter p after the steps so far, `None` for κ when it
    /// does not move (frozen, or lr 0).
    fn adam_coefs(&self, p: usize) -> (f64, Option<(f64, f64)>) {
        let t = self.hist.len();
        let a = (1.0 - self.lambda[p]).powi(t as i32);
        let moves = match self.adam_p[p] {
            AdamParam::Moves { kappa, eps } if kappa != 0.0 && t > 0 => Some((kappa, eps)),
            _ => None,
        };
        (a, moves)
    }

    /// `a·base − κ·e` as one node (`base` is operand 0 of `args`), or `base` when
    /// nothing moves.
    fn adam_value(
        &mut self,
        base: NodeId,
        a: f64,
        update: Option<(f64, Expr, Args)>,
        scalar: bool,
        name: Option<String>,
        span: Span,
    ) -> Result<NodeId, UnrollError> {
        let (e, nodes) = match update {
            Some((kappa, e, mut args)) => {
                let b = args.arg(base);
                (
                    Expr::sub(
                        Expr::mul(Expr::Const(a), b),
                        Expr::mul(Expr::Const(kappa), e),
                    ),
                    args.nodes,
                )
            }
            None if a == 1.0 => return Ok(base),
            None => (Expr::mul(Expr::Const(a), Expr::Arg(0)), vec![base]),
        };
        let op = if scalar { Op::Scalar(e) } else { Op::Nonlin(e) };
        self.push(op, &nodes, name, span)
    }

    /// `mult·W_t z` (or `mult·W_tᵀ z`) under Adam: `a_t·mult·W_0 z − κ·Outer(…)`
    /// ([`crate::limit::outer`]).
    pub(super) fn adam_product(
        &mut self,
        w: usize,
        transpose: bool,
        z: NodeId,
        base: NodeId,
        name: Option<String>,
        span: Span,
    ) -> Result<NodeId, UnrollError> {
        let adam = self.adam()?;
        let (a, moves) = self.adam_coefs(w);
        let update = match moves {
            None => None,
            Some((kappa, eps)) => {
                // α-side operands first, then the β-side ones and z.
                let mut pairs: Vec<Vec<(NodeId, NodeId)>> = Vec::new();
                for h in &self.hist {
                    pairs.push(
                        h.rank1[w]
                            .iter()
                            .map(|r| {
                                if transpose {
                                    (r.right, r.left)
                                } else {
                                    (r.left, r.right)
                                }
                            })
                            .collect(),
                    );
                }
                // a_j (α-side), then b_j (β-side) paired in order, then z; ĝ^s is
                // Arg(s) of ψ.
                let groups: Vec<usize> = pairs.iter().map(Vec::len).collect();
                let mut ops: Vec<NodeId> = pairs.iter().flatten().map(|p| p.0).collect();
                ops.extend(pairs.iter().flatten().map(|p| p.1));
                ops.push(z);
                let gh: Vec<Expr> = (0..groups.len()).map(Expr::Arg).collect();
                let q = adam.update(&gh, eps, self.lambda[w]);
                let outer = self.push(Op::Outer { expr: q, groups }, &ops, None, span)?;
                let mut args = Args::default();
                Some((kappa, args.arg(outer), args))
            }
        };
        self.adam_value(base, a, update, false, name, span)
    }

    /// `mult·U_t ξ` under Adam: `a_t·mult·U_0 ξ − κ Σ_j ξ_j·(update of column j)`.
    pub(super) fn adam_input_product(
        &mut self,
        w: usize,
        xi: &[f64],
        base: NodeId,
        name: Option<String>,
        span: Span,
    ) -> Result<NodeId, UnrollError> {
        let adam = self.adam()?;
        let (a, moves) = self.adam_coefs(w);
        let update = match moves {
            None => None,
            Some((kappa, eps)) => {
                let mut args = Args::default();
                let mut e = Expr::Const(0.0);
                for (j, &x) in xi.iter().enumerate() {
                    if x == 0.0 {
                        continue;
                    }
                    let gh: Vec<Expr> = self
                        .hist
                        .iter()
                        .map(|h| {
                            h.input[w].iter().fold(Expr::Const(0.0), |e, r| {
                                let c = r.xi.get(j).copied().unwrap_or(0.0);
                                if c == 0.0 {
                                    e
                                } else {
                                    Expr::add(e, Expr::mul(Expr::Const(c), args.arg(r.dy)))
                                }
                            })
                        })
                        .collect();
                    let uj = adam.update(&gh, eps, self.lambda[w]);
                    e = Expr::add(e, Expr::mul(Expr::Const(x), uj));
                }
                Some((kappa, e, args))
            }
        };
        self.adam_value(base, a, update, false, name, span)
    }

    /// One Adam step: the step's gradients join the history; vectors, readouts and
    /// scalars are rebuilt from their initial values (module docs).
    pub(super) fn adam_apply(&mut self, t: usize, pending: Pending) -> Result<(), UnrollError> {
        let adam = self.adam()?;
        self.hist.push(pending);
        let g = self.g;
        for (p, prm) in g.params.iter().enumerate() {
            if prm.shape.is_matrix() && prm.shape != Shape::Readout {
                continue;
            }
            let (a, moves) = self.adam_coefs(p);
            let mut args = Args::default();
            let base = self.uparam[p];
            args.arg(base);
            let update = match moves {
                None => None,
                Some((kappa, eps)) => {
                    let gh: Vec<Expr> = self
                        .hist
                        .iter()
                        .map(|h| match prm.shape {
                            Shape::Vector => h.vector[p]
                                .iter()
                                .fold(Expr::Const(0.0), |e, &d| Expr::add(e, args.arg(d))),
                            Shape::Readout => {
                                h.readout[p]
                                    .iter()
                                    .fold(Expr::Const(0.0), |e, &(chi, coef, x)| {
                                        let c = Expr::mul(Expr::Const(coef), args.arg(chi));
                                        Expr::add(e, Expr::mul(c, args.arg(x)))
                                    })
                            }
                            _ => h.scalar[p]
                                .iter()
                                .fold(Expr::Const(0.0), |e, &(chi, coef)| {
                                    Expr::add(e, Expr::mul(Expr::Const(coef), args.arg(chi)))
                                }),
                        })
                        .collect();
                    Some((kappa, adam.update(&gh, eps, self.lambda[p]), args))
                }
            };
            let name = Some(format!("{}_{t}", prm.name));
            let scalar = prm.shape == Shape::Scalar;
            self.cur[p] = Some(self.adam_value(base, a, update, scalar, name, prm.span)?);
        }
        Ok(())
    }
}
