//! The Z derivation of the Master Theorem (theory.md §1.2, §2.1): for every vector of the
//! program, its limit `Z^x` as a function of base Gaussians.
//!
//! Base Gaussians ("G-vars") are the Ẑ parts of matrix products and the initial vectors.
//! Every `Z^x` is put in a canonical form
//!
//! ```text
//!   Z^x = L(G) + sum_k c_k f_k(L_k1(G), ..., L_km(G)) + c_0
//! ```
//!
//! with centered linear forms `L` over base Gaussians. Most networks give atoms of one
//! linear form (`tanh(Ẑ^{W h} + Ẑ^{U x} + Z^b)` is `tanh` of one Gaussian), whose pair
//! expectations have closed forms or 2-D quadrature; programs whose Z are linear (random
//! matrix moments) are handled exactly, Ż included.

use std::collections::BTreeMap;

use crate::ir::{Expr, Monomial, NodeId, Op, Program, Rational, Shape};

/// Index of a base Gaussian.
pub type GaussId = usize;

/// What a base Gaussian is.
#[derive(Clone, Debug, PartialEq)]
pub enum GaussKind {
    /// An initial vector `param b : n`, the same at every point; variance `var`.
    Initial { param: usize, var: f64 },
    /// `U @ x` for an input-layer matrix: `sum_i x_i Z^{U_i}`, covariance `var * x.x'`.
    InputLayer {
        param: usize,
        input: NodeId,
        var: f64,
    },
    /// Ẑ of a hidden `W @ h` or `W.T @ h`: covariance `sigma2 * E[Z^h Z^h']` within the
    /// family (W, transpose), independent of everything else (theory.md §2.1).
    Hat {
        param: usize,
        transpose: bool,
        arg: NodeId,
        node: NodeId,
        sigma2: f64,
    },
    /// `s(ξ) · G_base(ξ)`: a base Gaussian times a coefficient that depends on the point,
    /// `s = scales[scale]` (a Ż term through a nonlinearity, theory.md §2.1). Still a
    /// centered Gaussian of its base's family: `Cov = s(ξ_p) s(ξ_q) Cov(G_base)`.
    Scaled {
        base: GaussId,
        scale: usize,
        family: (usize, u8),
    },
    /// Not a Gaussian: the coefficient `s(ξ)` itself, deterministic at each point. It
    /// appears only as a factor of an atom, `s(ξ) · f(L)` (a Ż term `s(ξ) Z^y` with a
    /// non-Gaussian `Z^y`), never added to a Gaussian in a linear form; the engine reads
    /// its value instead of integrating over it.
    Point { scale: usize },
}

/// A coefficient that depends on the point: `s(ξ) = sigma2 · E[D(ξ)]` with
/// `D = ∂Z^x/∂Ẑ^{W y}` (theory.md §2.1), the Ż coefficient of `Z^y` in `Wᵀ x` (or of
/// `W x` in a product by `Wᵀ`) when `Z^x` depends on `Ẑ^{W y}` through a nonlinearity.
#[derive(Clone, Debug)]
pub struct Scale {
    pub sigma2: f64,
    /// The derivative `∂Z^x/∂Ẑ^{W y}` as a Z form over the base Gaussians, for the
    /// atoms without a jump.
    pub d: ZForm,
    /// Atoms `c f(L)` of one form whose `f` jumps (`step`): the derivative has a Dirac
    /// delta that `Expr::diff` does not see, so their term is taken by Stein's lemma,
    /// `c a E[∂f(L)/∂L] = c a E[L f(L)] / Var(L)` with `a` the coefficient of Ẑ^{W y} in
    /// L (given here as `(c a, atom)`).
    pub stein: Vec<(f64, Atom)>,
    /// The product node `x` multiplies (`Wᵀ x`), and the Gaussian `Ẑ^{W y}`.
    pub x: NodeId,
    pub wrt: GaussId,
    /// A Netsor+ coefficient instead of a Ż one (then `sigma2`, `d` and `stein` are
    /// unused, `x` is the node that introduced it): see [`PointScalar`].
    pub netsor: Option<PointScalar>,
}

/// A deterministic per-point scalar of Netsor+ (theory.md §1.1): a moment's limit, or a
/// function of such values. The Master Theorem makes every moment
/// `(1/n) Σ_a ψ(x_a(ξ))` converge to `E[ψ(Z(ξ))]`, a number at each point ξ computed
/// from the one-point law; a coordinatewise function of vectors and such scalars is then
/// a function of Gaussians with point-dependent coefficients.
#[derive(Clone, Debug)]
pub enum PointScalar {
    /// The limit `E[Z(ξ)]` of the moment `node`, with `z` the Z form of its integrand.
    Moment { node: NodeId, z: ZForm },
    /// `f(s_1(ξ), …, s_k(ξ))` of other scales (indices into `Derivation::scales`).
    Func { f: Expr, args: Vec<usize> },
    /// A 1/√n attention logit ([`super::random_logits`]): not deterministic but a
    /// Gaussian scalar, entry `slot` of `Derivation::logits`; the engine reads its value
    /// from the sample it is given (the limit averages over the samples).
    Logit { node: NodeId, slot: usize },
}

/// The limit of a moment node: a constant (its integrand's Z has no nonlinear atom, so
/// its mean is the Z's constant at every point) or a per-point value, the `Point`
/// Gaussian id of [`GaussKind::Point`] whose scale is a [`PointScalar::Moment`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MomentLimit {
    Const(f64),
    Point(GaussId),
    /// Used by no other node (an `observe`): its mean is taken when it is reported,
    /// without a per-point value in the derivation.
    Observed,
}

/// A base Gaussian and the family it belongs to (only same-family Gaussians correlate).
#[derive(Clone, Debug)]
pub struct Gauss {
    pub kind: GaussKind,
    pub name: String,
    /// Odd in the readout seeds of a backward pass ([`super::backprop`]): a Ẑ of a
    /// product by a cotangent, a seed, or a Ż term with an odd coefficient. Odd and even
    /// Gaussians are uncorrelated (each covariance is the mean of an odd function), hence
    /// independent. Always false in a forward program.
    pub odd: bool,
}

impl Gauss {
    /// Two base Gaussians correlate only within one family.
    pub fn family(&self) -> (usize, u8) {
        match self.kind {
            GaussKind::Initial { param, .. } => (param, 0),
            GaussKind::InputLayer { param, .. } => (param, 1),
            GaussKind::Hat {
                param, transpose, ..
            } => (param, 2 + u8::from(transpose)),
            GaussKind::Scaled { family, .. } => family,
            GaussKind::Point { scale } => (scale, 9),
        }
    }
}

/// A centered linear form `sum_j a_j G_j`, sorted by Gaussian, no zero coefficients.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct LinForm(pub Vec<(GaussId, f64)>);

impl LinForm {
    pub fn single(g: GaussId) -> LinForm {
        LinForm(vec![(g, 1.0)])
    }
    pub fn is_zero(&self) -> bool {
        self.0.is_empty()
    }
    /// `self + c * other`.
    pub fn axpy(&mut self, c: f64, other: &LinForm) {
        if c == 0.0 {
            return;
        }
        let mut m: BTreeMap<GaussId, f64> = self.0.iter().copied().collect();
        for &(g, a) in &other.0 {
            *m.entry(g).or_insert(0.0) += c * a;
        }
        self.0 = m.into_iter().filter(|&(_, a)| a != 0.0).collect();
    }
    pub fn coef(&self, g: GaussId) -> f64 {
        self.0.iter().find(|x| x.0 == g).map_or(0.0, |x| x.1)
    }
}

/// A nonlinear term: `f` applied to linear forms (its `Arg(i)` is `args[i]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Atom {
    pub f: Expr,
    pub args: Vec<LinForm>,
}

/// `Z = lin + sum_k c_k atom_k + constant`.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ZForm {
    pub lin: LinForm,
    pub atoms: Vec<(f64, Atom)>,
    pub constant: f64,
}

impl ZForm {
    /// The terms of a Z: (coefficient, atom); the linear part is the atom `id(L)` and the
    /// constant is the atom `1` — the one list every engine sums over.
    pub fn terms(&self) -> Vec<(f64, Atom)> {
        let mut t = Vec::new();
        if !self.lin.is_zero() {
            t.push((
                1.0,
                Atom {
                    f: Expr::Arg(0),
                    args: vec![self.lin.clone()],
                },
            ));
        }
        t.extend(self.atoms.iter().cloned());
        if self.constant != 0.0 {
            t.push((
                self.constant,
                Atom {
                    f: Expr::Const(1.0),
                    args: vec![],
                },
            ));
        }
        t
    }

    pub fn is_linear(&self) -> bool {
        self.atoms.is_empty()
    }
    pub(crate) fn scaled_add(&mut self, c: f64, o: &ZForm) {
        self.lin.axpy(c, &o.lin);
        for (k, a) in &o.atoms {
            if let Some(slot) = self.atoms.iter_mut().find(|x| x.1 == *a) {
                slot.0 += c * k;
            } else {
                self.atoms.push((c * k, a.clone()));
            }
        }
        self.atoms.retain(|x| x.0 != 0.0);
        self.constant += c * o.constant;
    }
    /// The form as an expression over a list of linear forms (extended as needed).
    pub(crate) fn as_expr(&self, forms: &mut Vec<LinForm>) -> Expr {
        let mut idx = |l: &LinForm| match forms.iter().position(|x| x == l) {
            Some(i) => i,
            None => {
                forms.push(l.clone());
                forms.len() - 1
            }
        };
        let mut e = Expr::Const(self.constant);
        if !self.lin.is_zero() {
            e = Expr::add(Expr::Arg(idx(&self.lin)), e);
        }
        for (c, a) in &self.atoms {
            let map: Vec<usize> = a.args.iter().map(&mut idx).collect();
            let t = a.f.substitute(&|i| Expr::Arg(map[i]));
            e = Expr::add(e, Expr::mul(Expr::Const(*c), t));
        }
        e
    }
}

/// Why the limit engine cannot handle a program (yet).
#[derive(Clone, Debug, PartialEq)]
pub struct Unsupported {
    pub node: Option<NodeId>,
    pub reason: String,
}

/// The derivation of a whole program.
#[derive(Clone, Debug)]
pub struct Derivation {
    pub gauss: Vec<Gauss>,
    /// Z of every vector node (None for non-vectors).
    pub z: Vec<Option<ZForm>>,
    /// Ż contributions added to each MatMul node: (Gaussian of the transposed family,
    /// coefficient, vector whose Z is added).
    pub zdot: Vec<Vec<(GaussId, f64, NodeId)>>,
    /// Ż contributions with a coefficient that depends on the point: (Gaussian of the
    /// transposed family, scale index into `scales`, vector whose Z is added).
    pub zdot_point: Vec<Vec<(GaussId, usize, NodeId)>>,
    /// The point-dependent coefficients of Ż terms ([`Scale`]).
    pub scales: Vec<Scale>,
    /// The program multiplies by some W and its transpose (Ż may be nonzero).
    pub has_transpose: bool,
    /// The base Gaussian each MatMul or initial vector introduced (its Ẑ).
    pub own: Vec<Option<GaussId>>,
    /// Nodes whose Z is odd in the readout seeds (cotangents of a backward pass built
    /// by [`super::backprop`]); empty for a forward program.
    pub odd: Vec<bool>,
    /// For each Moment node: its limit and the Z form of its integrand.
    pub moments: Vec<Option<(MomentLimit, ZForm)>>,
    /// For each Nonlin node with an operand that is a vector parameter starting at 0
    /// (`std = 0`, a layernorm gain): (parameter, Z of ∂φ/∂g at g = 0). The parameter
    /// has no Gaussian (its Z is 0) but its gradient adds
    /// `lr·mult²·E[∂φ/∂g(p) ∂φ/∂g(q)]` to the node's tangent kernel.
    pub zero_params: Vec<Vec<(usize, ZForm)>>,
    /// A node with such a term is fused into another coordinatewise function, whose
    /// tangent kernel would miss it: the NTK is then not derived (its first such node).
    pub zero_param_fused: Option<NodeId>,
    /// Products `q = W x` whose coordinates are Θ(n^(1/2)) (`n·Var(W_ij) = c·n`), used
    /// only in 1/√n logits: the Z of `q/√n` ([`super::random_logits`]).
    pub clt: Vec<Option<ZForm>>,
    /// The 1/√n logits, random Gaussian scalars in the limit ([`super::random_logits`]).
    pub logits: Vec<super::random_logits::Logit>,
}

/// The n -> infinity limit of a variance monomial, or why it has none.
fn limit_var(m: Monomial, what: &str) -> Result<f64, String> {
    match m.limit() {
        Some(v) => Ok(v),
        None => Err(format!(
            "{what} grows like n^{} at initialization, so the limit does not exist",
            m.exp
        )),
    }
}

impl Derivation {
    pub fn new(prog: &Program) -> Result<Derivation, Unsupported> {
        Derivation::with_parity(prog, Vec::new())
    }

    /// The derivation of a program whose nodes `odd[i]` are odd in independent centered
    /// seeds (a forward pass followed by its backward pass, [`super::backprop`]): a Ż
    /// coefficient `E[∂Z^x/∂Ẑ]` with `Z^x` and `Ẑ` of opposite parity is the mean of an
    /// odd function of the seeds, exactly zero, and is not written.
    pub fn with_parity(prog: &Program, odd: Vec<bool>) -> Result<Derivation, Unsupported> {
        let mut d = Derivation {
            odd,
            gauss: Vec::new(),
            z: vec![None; prog.len()],
            zdot: vec![Vec::new(); prog.len()],
            zdot_point: vec![Vec::new(); prog.len()],
            scales: Vec::new(),
            has_transpose: false,
            own: vec![None; prog.len()],
            moments: vec![None; prog.len()],
            zero_params: vec![Vec::new(); prog.len()],
            zero_param_fused: None,
            clt: vec![None; prog.len()],
            logits: Vec::new(),
        };
        for id in prog.ids() {
            let z = d.node(prog, id).map_err(|reason| Unsupported {
                node: Some(id),
                reason,
            })?;
            d.z[id.index()] = z;
        }
        Ok(d)
    }

    pub(crate) fn push(&mut self, kind: GaussKind, name: String) -> GaussId {
        let node = match kind {
            GaussKind::Hat { node, .. } => Some(node),
            _ => None,
        };
        let odd = match kind {
            GaussKind::Hat { arg, .. } => self.odd_node(arg),
            _ => false,
        };
        self.gauss.push(Gauss { kind, name, odd });
        let g = self.gauss.len() - 1;
        if let Some(n) = node {
            self.own[n.index()] = Some(g);
        }
        g
    }

    /// [`apply_split`] with this derivation's point values kept apart from Gaussians.
    pub fn apply(&self, e: &Expr, zs: &[ZForm]) -> ZForm {
        apply_split(e, zs, &|g| {
            matches!(
                self.gauss.get(g).map(|x| &x.kind),
                Some(GaussKind::Point { .. })
            )
        })
    }

    /// Is `Z^x` odd in the readout seeds?
    pub fn odd_node(&self, x: NodeId) -> bool {
        self.odd.get(x.index()).copied().unwrap_or(false)
    }

    pub fn zform(&self, id: NodeId) -> Option<&ZForm> {
        self.z[id.index()].as_ref()
    }

    fn node(&mut self, prog: &Program, id: NodeId) -> Result<Option<ZForm>, String> {
        let ops = prog.operands(id);
        Ok(match &prog.node(id).op {
            Op::Input { .. } | Op::Output { .. } | Op::Scalar(_) => None,
            Op::Moment(e) if ops.iter().any(|o| self.clt[o.index()].is_some()) => {
                self.random_logit(prog, id, e, &ops)?;
                None
            }
            Op::Outer { .. } => {
                return Err("a nonlinear outer product is read by the particle engine only".into())
            }
            Op::Moment(e) => {
                let z = self.compose(prog, id, e, &ops)?;
                let lim = if z.atoms.is_empty() {
                    // lin is centered: the mean is the constant, at every point.
                    MomentLimit::Const(z.constant)
                } else if prog.users(id).is_empty() {
                    MomentLimit::Observed
                } else {
                    let k = self.push_scale(
                        id,
                        PointScalar::Moment {
                            node: id,
                            z: z.clone(),
                        },
                    );
                    self.gauss.push(Gauss {
                        kind: GaussKind::Point { scale: k },
                        name: prog.label(id),
                        // A moment of the forward program: even in the readouts.
                        odd: false,
                    });
                    MomentLimit::Point(self.gauss.len() - 1)
                };
                self.moments[id.index()] = Some((lim, z));
                None
            }
            Op::Param(p) => {
                let prm = &prog.params[*p];
                if prm.shape != Shape::Vector {
                    return Ok(None);
                }
                let var = limit_var(
                    prm.law.entry_var(),
                    &format!("the variance of `{}`", prm.name),
                )?;
                if var == 0.0 {
                    return Ok(Some(ZForm::default()));
                }
                let g = self.push(GaussKind::Initial { param: *p, var }, prm.name.clone());
                self.gauss[g].odd = self.odd_node(id);
                self.own[id.index()] = Some(g);
                Some(ZForm {
                    lin: LinForm::single(g),
                    ..ZForm::default()
                })
            }
            Op::MatMul { transpose } => {
                let p = match prog.node(ops[0]).op {
                    Op::Param(p) => p,
                    _ => return Err("matrix operand is not a parameter".into()),
                };
                let prm = &prog.params[p];
                let arg = ops[1];
                match prm.shape {
                    Shape::Input(_) => {
                        let var = limit_var(
                            prm.law.entry_var(),
                            &format!("the entry variance of `{}`", prm.name),
                        )?;
                        if var == 0.0 {
                            return Ok(Some(ZForm::default()));
                        }
                        let g = self.push(
                            GaussKind::InputLayer {
                                param: p,
                                input: arg,
                                var,
                            },
                            format!("{} {}", prm.name, prog.label(arg)),
                        );
                        self.own[id.index()] = Some(g);
                        Some(ZForm {
                            lin: LinForm::single(g),
                            ..ZForm::default()
                        })
                    }
                    Shape::Hidden => {
                        // sigma^2 = n * Var(entry): Z^{Wh} has variance sigma^2 E[(Z^h)^2].
                        let s2 = Monomial::n_pow(Rational::ONE) * prm.law.entry_var();
                        if self.clt_product(prog, p, *transpose, arg, id, s2) {
                            return Ok(None);
                        }
                        let sigma2 = limit_var(
                            s2,
                            &format!("n times the entry variance of `{}`", prm.name),
                        )?;
                        if *transpose {
                            self.has_transpose = true;
                        }
                        let mut z = ZForm::default();
                        if sigma2 != 0.0 {
                            let name = if *transpose {
                                format!("{}.T {}", prm.name, prog.label(arg))
                            } else {
                                format!("{} {}", prm.name, prog.label(arg))
                            };
                            let g = self.push(
                                GaussKind::Hat {
                                    param: p,
                                    transpose: *transpose,
                                    arg,
                                    node: id,
                                    sigma2,
                                },
                                name,
                            );
                            z.lin = LinForm::single(g);
                            self.add_zdot(prog, p, *transpose, arg, id, sigma2, &mut z)?;
                        }
                        Some(z)
                    }
                    _ => return Err(format!("`{}` cannot multiply a vector", prm.name)),
                }
            }
            Op::Nonlin(e) => {
                for (slot, &o) in ops.iter().enumerate() {
                    if !self.zero_params[o.index()].is_empty() && self.zero_param_fused.is_none() {
                        self.zero_param_fused = Some(o);
                    }
                    if let Op::Param(p) = prog.node(o).op {
                        let prm = &prog.params[p];
                        if prm.shape == Shape::Vector && prm.law.entry_var().limit() == Some(0.0) {
                            let d = self.compose(prog, id, &e.diff(slot), &ops)?;
                            self.zero_params[id.index()].push((p, d));
                        }
                    }
                }
                Some(self.compose(prog, id, e, &ops)?)
            }
        })
    }

    /// Ż (theory.md §2.1): `Ż^{W x} = sigma^2 sum_y Z^y E[∂Z^x / ∂Ẑ^{Wᵀ y}]`, and
    /// symmetrically for `Wᵀ`. The derivative is taken of `Z^x` written in the base
    /// Gaussians (earlier Ż terms expanded), and only at the same point: `Z^{x(ξ)}`
    /// does not depend on `Ẑ^{Wᵀ y(ξ')}` for another point ξ'.
    ///
    /// * `Z^x` linear in `Ẑ^{Wᵀ y}` (coefficient `a`): the term is `sigma^2 a Z^y`, exact;
    /// * through a nonlinearity (`x = φ(Wᵀ y)`, `W φ(Wᵀ y)` or `Wᵀ tanh(W h)`): the
    ///   coefficient `s(ξ) = sigma^2 E[∂Z^x/∂Ẑ](ξ)` depends on the point ([`Scale`], computed by
    ///   the engine as a mean). When `Z^y` is linear in its Gaussians (`h = U x`,
    ///   `h = W h0`, sums of them), `s(ξ) Z^y` is again a centered Gaussian per family
    ///   ([`GaussKind::Scaled`]) and every downstream expectation keeps its closed form
    ///   or quadrature; a non-Gaussian `Z^y` times `s(ξ)` is refused.
    #[allow(clippy::too_many_arguments)]
    fn add_zdot(
        &mut self,
        prog: &Program,
        param: usize,
        transpose: bool,
        arg: NodeId,
        node: NodeId,
        sigma2: f64,
        z: &mut ZForm,
    ) -> Result<(), String> {
        let Some(zx) = self.z[arg.index()].clone() else {
            return Ok(());
        };
        let partner_family = (param, 2 + u8::from(!transpose));
        let is_partner = |d: &Derivation, g: GaussId| d.gauss[g].family() == partner_family;
        // Every Gaussian of the partner family that Z^x uses, in order of first use.
        let mut used: Vec<GaussId> = Vec::new();
        let mut note = |g: GaussId| {
            if is_partner(self, g) && !used.contains(&g) {
                used.push(g);
            }
        };
        for (g, _) in &zx.lin.0 {
            note(*g);
        }
        for (_, at) in &zx.atoms {
            for l in &at.args {
                for (g, _) in &l.0 {
                    note(*g);
                }
            }
        }
        used.sort_unstable();
        let name = |d: &Derivation, g: GaussId| d.gauss[g].name.clone();
        let odd_x = self.odd_node(arg);
        // Opposite parities: E[∂Z^x/∂Ẑ] is the mean of an odd function of the seeds, 0.
        used.retain(|&g| self.gauss[g].odd == odd_x);
        for g in used {
            let y = match self.gauss[g].kind {
                GaussKind::Hat { arg: y, .. } => y,
                _ => {
                    return Err(format!(
                        "`{}` depends on `{}` through a Ż term with a coefficient that depends on the \
                         point; the derivative of such a term (a second Ż through {}) is not derived yet",
                        prog.label(arg),
                        name(self, g),
                        prog.params[param].name
                    ))
                }
            };
            let a = zx.lin.coef(g);
            let through_atoms = zx
                .atoms
                .iter()
                .any(|(_, at)| at.args.iter().any(|l| l.coef(g) != 0.0));
            let zy = self.z[y.index()].clone().ok_or("missing Z")?;
            if !through_atoms {
                z.scaled_add(sigma2 * a, &zy);
                self.zdot[node.index()].push((g, sigma2 * a, y));
                continue;
            }
            // D = ∂Z^x/∂G = a + Σ_k c_k Σ_i coef(L_ki, G) ∂_i f_k(L_k1, ..).
            let mut d = ZForm {
                constant: a,
                ..ZForm::default()
            };
            let mut stein = Vec::new();
            for (c, at) in &zx.atoms {
                // A jump matters only where Ẑ enters the argument of a `step`.
                let jump = at
                    .args
                    .iter()
                    .enumerate()
                    .any(|(i, l)| l.coef(g) != 0.0 && inside_step(&at.f, i));
                if jump {
                    let names = prog.stable_names();
                    match at.args.as_slice() {
                        [l] => stein.push((c * l.coef(g), at.clone())),
                        _ => {
                            return Err(format!(
                                "{} depends on {} through `step` of several Gaussians: the Ż \
                                 coefficient E[∂/∂Ẑ] has a Dirac delta (a jump) that tpc takes by \
                                 Stein's lemma only for a function of one Gaussian",
                                Program::z_name(&names, arg),
                                name(self, g)
                            ))
                        }
                    }
                    continue;
                }
                let forms: Vec<ZForm> = at
                    .args
                    .iter()
                    .map(|l| ZForm {
                        lin: l.clone(),
                        ..ZForm::default()
                    })
                    .collect();
                for (i, l) in at.args.iter().enumerate() {
                    let ci = l.coef(g);
                    if ci != 0.0 {
                        d.scaled_add(c * ci, &self.apply(&at.f.diff(i), &forms));
                    }
                }
            }
            if stein.is_empty() && d.is_linear() && d.lin.is_zero() {
                // A constant derivative (a polynomial of degree 2 in other families).
                z.scaled_add(sigma2 * d.constant, &zy);
                self.zdot[node.index()].push((g, sigma2 * d.constant, y));
                continue;
            }
            let k = self.scales.len();
            self.scales.push(Scale {
                sigma2,
                d,
                stein,
                x: arg,
                wrt: g,
                netsor: None,
            });
            for &(b, cb) in &zy.lin.0 {
                let family = self.gauss[b].family();
                let gname = format!("s{} {}", k + 1, self.gauss[b].name);
                // The scale s(ξ) is even (parities of Z^x and Ẑ agree).
                let odd = self.gauss[b].odd;
                self.gauss.push(Gauss {
                    kind: GaussKind::Scaled {
                        base: b,
                        scale: k,
                        family,
                    },
                    name: gname,
                    odd,
                });
                let sg = self.gauss.len() - 1;
                z.lin.axpy(cb, &LinForm::single(sg));
            }
            if !zy.atoms.is_empty() || zy.constant != 0.0 {
                // s(ξ) · c f(L): the atom times the deterministic value s(ξ); a constant
                // c0 of Z^y gives the atom c0 · s(ξ), a value at each point.
                self.gauss.push(Gauss {
                    kind: GaussKind::Point { scale: k },
                    name: format!("s{}", k + 1),
                    odd: false,
                });
                let pt = LinForm::single(self.gauss.len() - 1);
                let mut add = ZForm::default();
                if zy.constant != 0.0 {
                    add.atoms.push((
                        zy.constant,
                        Atom {
                            f: Expr::Arg(0),
                            args: vec![pt.clone()],
                        },
                    ));
                }
                for (c, at) in &zy.atoms {
                    let m = at.args.len();
                    let mut args = at.args.clone();
                    args.push(pt.clone());
                    add.atoms.push((
                        *c,
                        Atom {
                            f: Expr::mul(Expr::Arg(m), at.f.clone()),
                            args,
                        },
                    ));
                }
                z.scaled_add(1.0, &add);
            }
            self.zdot_point[node.index()].push((g, k, y));
        }
        Ok(())
    }
}

/// Does operand `i` appear inside the argument of a `step` in `e`?
fn inside_step(e: &Expr, i: usize) -> bool {
    match e {
        Expr::Call(f, x) => (*f == crate::ir::Fun::Step && x.uses(i)) || inside_step(x, i),
        Expr::Neg(x) | Expr::Powi(x, _) => inside_step(x, i),
        Expr::Add(a, b) | Expr::Sub(a, b) | Expr::Mul(a, b) | Expr::Div(a, b) => {
            inside_step(a, i) || inside_step(b, i)
        }
        Expr::Arg(_) | Expr::Const(_) => false,
    }
}

/// Z of a coordinatewise expression of operands with known Z (theory.md §1.2: `Z^h = phi(Z^g...)`).
/// For forms without point values ([`GaussKind::Point`]); [`Derivation::apply`] keeps
/// them apart.
pub fn apply(e: &Expr, zs: &[ZForm]) -> ZForm {
    apply_split(e, zs, &|_| false)
}

/// [`apply`] where `is_point(g)` says which ids are point values `s(ξ)`: an affine
/// combination of Gaussians and point values becomes two arguments (`L_gauss + L_point`),
/// never one form mixing both, so the engine integrates over the first and reads the
/// second (a constant `c` next to Gaussians in a Ż term `s(ξ)·(L + c)` is `c·s(ξ)`).
pub fn apply_split(e: &Expr, zs: &[ZForm], is_point: &dyn Fn(GaussId) -> bool) -> ZForm {
    if e.is_affine() {
        let zero = vec![0.0; zs.len()];
        let mut out = ZForm {
            constant: e.eval(&zero),
            ..ZForm::default()
        };
        for (i, z) in zs.iter().enumerate() {
            let c = e.diff(i).eval(&zero);
            out.scaled_add(c, z);
        }
        return out;
    }
    let mut forms = Vec::new();
    let exprs: Vec<Expr> = zs.iter().map(|z| z.as_expr(&mut forms)).collect();
    let composed = e.substitute(&|i| exprs[i].clone());
    let (f, args) = absorb_affine(&composed, &forms, is_point);
    if f.is_constant() {
        return ZForm {
            constant: f.eval(&[]),
            ..ZForm::default()
        };
    }
    ZForm {
        atoms: vec![(1.0, Atom { f, args })],
        ..ZForm::default()
    }
}

/// Replaces every maximal affine subexpression that involves the linear forms by one
/// new linear form, so `tanh(a0 + a1 + 0.5)` over three forms becomes `tanh(b0 + 0.5)`
/// over their sum: one Gaussian, not three.
fn absorb_affine(
    e: &Expr,
    forms: &[LinForm],
    is_point: &dyn Fn(GaussId) -> bool,
) -> (Expr, Vec<LinForm>) {
    let mut out: Vec<LinForm> = Vec::new();
    let f = absorb(e, forms, &mut out, is_point);
    (f, out)
}

fn absorb(
    e: &Expr,
    forms: &[LinForm],
    out: &mut Vec<LinForm>,
    is_point: &dyn Fn(GaussId) -> bool,
) -> Expr {
    if e.is_constant() {
        return Expr::Const(e.eval(&[]));
    }
    if e.is_affine() {
        let zero = vec![0.0; forms.len()];
        let c0 = e.eval(&zero);
        let mut l = LinForm::default();
        for (i, f) in forms.iter().enumerate() {
            if e.uses(i) {
                l.axpy(e.diff(i).eval(&zero), f);
            }
        }
        if l.is_zero() {
            return Expr::Const(c0);
        }
        let (pts, gs): (Vec<_>, Vec<_>) = l.0.iter().partition(|(g, _)| is_point(*g));
        let mut e = Expr::Const(c0);
        for part in [gs, pts] {
            if part.is_empty() {
                continue;
            }
            let l = LinForm(part);
            let k = match out.iter().position(|x| *x == l) {
                Some(k) => k,
                None => {
                    out.push(l);
                    out.len() - 1
                }
            };
            e = Expr::add(Expr::Arg(k), e);
        }
        return e;
    }
    let rec = |x: &Expr, out: &mut Vec<LinForm>| absorb(x, forms, out, is_point);
    match e {
        Expr::Call(f, x) => Expr::call(*f, rec(x, out)),
        Expr::Neg(x) => Expr::neg(rec(x, out)),
        Expr::Powi(x, k) => Expr::powi(rec(x, out), *k),
        Expr::Add(a, b) => {
            let a = rec(a, out);
            Expr::add(a, rec(b, out))
        }
        Expr::Sub(a, b) => {
            let a = rec(a, out);
            Expr::sub(a, rec(b, out))
        }
        Expr::Mul(a, b) => {
            let a = rec(a, out);
            Expr::mul(a, rec(b, out))
        }
        Expr::Div(a, b) => {
            let a = rec(a, out);
            Expr::div(a, rec(b, out))
        }
        Expr::Arg(_) | Expr::Const(_) => e.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Fun;

    #[test]
    fn fused_preactivation_is_one_gaussian() {
        let z = |g| ZForm {
            lin: LinForm::single(g),
            ..ZForm::default()
        };
        let e = Expr::call(
            Fun::Tanh,
            Expr::add(Expr::add(Expr::Arg(0), Expr::Arg(1)), Expr::Arg(2)),
        );
        let out = apply(&e, &[z(0), z(1), z(2)]);
        assert_eq!(out.atoms.len(), 1);
        let a = &out.atoms[0].1;
        assert_eq!(a.args.len(), 1);
        assert_eq!(a.args[0].0, vec![(0, 1.0), (1, 1.0), (2, 1.0)]);
    }

    #[test]
    fn linear_combinations_stay_linear() {
        let z = |g| ZForm {
            lin: LinForm::single(g),
            ..ZForm::default()
        };
        let e = Expr::div(Expr::add(Expr::Arg(0), Expr::Arg(1)), Expr::Const(4.0));
        let out = apply(&e, &[z(0), z(1)]);
        assert!(out.is_linear());
        assert_eq!(out.lin.0, vec![(0, 0.25), (1, 0.25)]);
    }
}
