//! Netsor+ in the Z derivation (theory.md §1.1): coordinatewise functions of vectors
//! *and* moments.
//!
//! Why a module of its own: the Master Theorem for Netsor+ makes every moment
//! `m = (1/n) Σ_a ψ(x_a)` converge to a deterministic number `m̊(ξ) = E[ψ(Z(ξ))]` at each
//! point ξ, computed from the one-point law (for two tokens t, s of one sequence,
//! `E[Z^{q[t]}(ξ) Z^{k[s]}(ξ)]` is the diagonal of the P×P block of the pair). A Nonlin
//! `φ(x, …; m, …)` then has the limit `φ(Z^x, …; m̊(ξ), …)`: a function of Gaussians with
//! coefficients that depend on the point. This module writes such a Z in the canonical
//! form of [`zform`](super::zform) without new machinery in the engine:
//!
//! * a moment whose integrand's Z is affine in Gaussians (`mean(h)` for a linear
//!   `Z^h`) is the constant of that Z at every point (the linear part is centered);
//!   every other moment is a [`GaussKind::Point`] value whose scale is a
//!   [`PointScalar::Moment`];
//! * a maximal subexpression affine in Gaussians with point-dependent coefficients,
//!   `Σ_i c_i(m̊) L_i + c_0(m̊)`, becomes one linear form of [`GaussKind::Scaled`]
//!   Gaussians `c_i(m̊(ξ))·G` (a centered Gaussian of `G`'s family with
//!   `Cov = c(ξ_p) c(ξ_q) Cov(G)`), plus the point value `c_0`: layernorm's
//!   `(h − m̊)/√v̊` is `Z^h` rescaled per point (m̊ = 0 for a Gaussian `Z^h`), so relu's
//!   and erf's closed forms still apply; attention's `Σ_s w_{ts}(m̊) Z^{v[s]}` is a
//!   point-dependent linear combination;
//! * anything else keeps the point values as arguments of the atom (the engine reads
//!   their value at each point instead of integrating over them).
//!
//! The NTK through moments. A moment's gradient is a rank-one term: for `y = φ(h; m)`
//! with `m = (1/n) Σ_b ψ(h_b)`, `∂y_a/∂h_b = φ'_a δ_ab + ∂_m φ_a ψ'_b / n`. Every
//! coordinate moves by Θ(1) when all of `h` does, so the term is not negligible in a
//! training step (the particle engine and `autodiff` carry it). In the tangent kernel
//! at initialization it vanishes: with `K_bc(p, q) = Σ_θ ∂h_b(p)/∂θ ∂h_c(q)/∂θ` the
//! per-coordinate kernel of `h` (Θ(1) on the diagonal, O(n^(-1/2)) off it and not
//! aligned with ψ'), the moment's tangent contributes
//! `Σ_θ dm(p) dm(q) = n^(-2) Σ_bc ψ'_b(p) ψ'_c(q) K_bc(p, q) = O(1/n)` and the cross
//! terms `n^(-2) Σ_ab ∂_mφ_a K_ab ψ'_b` the same order, against the Θ(1) diagonal
//! term `(1/n) Σ_a φ'_a(p) φ'_a(q) K_aa(p, q)`. So the tangent kernel of a scaled
//! Gaussian `s(ξ) G` is `s(ξ_p) s(ξ_q) T_G(p, q)` and a point value has no tangent
//! ([`Engine::tgauss`](super::engine::Engine)); Neural Tangents' LayerNorm
//! (`ntk / √((v_p + ε)(v_q + ε))`) and linear-scaling attention (no term from the
//! query/key weights) are the same statement. The finite-width NTK (`tpc run`), which
//! includes the rank-one terms exactly, converges to it (`tests/it/netsor_limit.rs`).

use super::zform::{
    apply, Derivation, Gauss, GaussId, GaussKind, LinForm, MomentLimit, PointScalar, Scale, ZForm,
};
use crate::ir::{Expr, NodeId, Program, Ty};

impl Derivation {
    /// A new Netsor+ scale (a per-point scalar) introduced at node `id`.
    pub(crate) fn push_scale(&mut self, id: NodeId, ps: PointScalar) -> usize {
        self.scales.push(Scale {
            sigma2: 1.0,
            d: ZForm::default(),
            stein: Vec::new(),
            x: id,
            wrt: usize::MAX,
            netsor: Some(ps),
        });
        self.scales.len() - 1
    }

    fn is_point(&self, g: GaussId) -> bool {
        matches!(self.gauss[g].kind, GaussKind::Point { .. })
    }

    /// Is this form made of point values (true), of Gaussians (false)? Mixed forms are
    /// never built.
    fn point_form(&self, l: &LinForm) -> Result<bool, String> {
        let pts = l.0.iter().filter(|(g, _)| self.is_point(*g)).count();
        if pts > 0 && pts < l.0.len() {
            return Err("a per-point scalar is added to a Gaussian in one linear form".into());
        }
        Ok(pts > 0)
    }

    /// The Z of `e` applied to `ops` (vectors and moments), theory.md §1.1.
    pub(crate) fn compose(
        &mut self,
        prog: &Program,
        id: NodeId,
        e: &Expr,
        ops: &[NodeId],
    ) -> Result<ZForm, String> {
        let mut zs = Vec::with_capacity(ops.len());
        for &o in ops {
            match prog.ty(o) {
                Ty::Vector => zs.push(self.z[o.index()].clone().ok_or("operand without Z")?),
                Ty::Moment => match self.moments[o.index()].as_ref().map(|m| m.0) {
                    Some(MomentLimit::Const(c)) => zs.push(ZForm {
                        constant: c,
                        ..ZForm::default()
                    }),
                    Some(MomentLimit::Point(g)) => zs.push(ZForm {
                        lin: LinForm::single(g),
                        ..ZForm::default()
                    }),
                    Some(MomentLimit::Observed) | None => {
                        return Err(format!("moment `{}` without a limit", prog.label(o)))
                    }
                },
                _ => return Err("operand is not a vector or a moment".into()),
            }
        }
        if ops.iter().all(|&o| matches!(prog.ty(o), Ty::Vector)) {
            // No moment operand: point values can only come from Ż coefficients of tied
            // weights, which `Derivation::apply` keeps apart from the Gaussians.
            return Ok(self.apply(e, &zs));
        }
        let mut forms = Vec::new();
        let exprs: Vec<Expr> = zs.iter().map(|z| z.as_expr(&mut forms)).collect();
        let mut is_pt = Vec::with_capacity(forms.len());
        for l in &forms {
            is_pt.push(self.point_form(l)?);
        }
        if !is_pt.iter().any(|&p| p) {
            return Ok(apply(e, &zs));
        }
        let composed = e.substitute(&|i| exprs[i].clone());
        let mut out = Vec::new();
        let f = self.absorb(id, &composed, &forms, &is_pt, &mut out)?;
        let out_pt: Vec<bool> = out
            .iter()
            .map(|l| self.point_form(l))
            .collect::<Result<_, _>>()?;
        Ok(to_zform(&f, &out, &out_pt))
    }

    /// Like `zform::absorb`, keeping point values apart from Gaussians: a maximal
    /// subexpression affine in the Gaussian forms (with coefficients that are functions
    /// of point values) becomes one Gaussian form of scaled Gaussians plus its point
    /// constant.
    fn absorb(
        &mut self,
        id: NodeId,
        e: &Expr,
        forms: &[LinForm],
        is_pt: &[bool],
        out: &mut Vec<LinForm>,
    ) -> Result<Expr, String> {
        if e.is_constant() {
            return Ok(Expr::Const(e.eval(&[])));
        }
        let mut gs = Vec::new();
        e.visit_args(&mut |i| {
            if !is_pt[i] && !gs.contains(&i) {
                gs.push(i)
            }
        });
        if gs.is_empty() {
            return Ok(remap(e, forms, out));
        }
        if affine(e, is_pt) {
            let zero_g = |i: usize| {
                if is_pt[i] {
                    Expr::Arg(i)
                } else {
                    Expr::Const(0.0)
                }
            };
            let c0 = e.substitute(&zero_g);
            let mut l = LinForm::default();
            for &i in &gs {
                let c = coef(e, i, is_pt).substitute(&zero_g);
                if c.is_constant() {
                    l.axpy(c.eval(&[]), &forms[i]);
                    continue;
                }
                let k = self.func_scale(id, &c, forms)?;
                for &(g, a) in &forms[i].0 {
                    let sg = self.scaled(id, g, k);
                    l.axpy(a, &LinForm::single(sg));
                }
            }
            let c0 = if c0.is_constant() {
                Expr::Const(c0.eval(&[]))
            } else {
                remap(&c0, forms, out)
            };
            if l.is_zero() {
                return Ok(c0);
            }
            let k = intern(out, &l);
            return Ok(Expr::add(Expr::Arg(k), c0));
        }
        let mut rec = |x: &Expr, out: &mut Vec<LinForm>| self.absorb(id, x, forms, is_pt, out);
        Ok(match e {
            Expr::Call(f, x) => Expr::call(*f, rec(x, out)?),
            Expr::Neg(x) => Expr::neg(rec(x, out)?),
            Expr::Powi(x, k) => Expr::powi(rec(x, out)?, *k),
            Expr::Add(a, b) => {
                let a = rec(a, out)?;
                Expr::add(a, rec(b, out)?)
            }
            Expr::Sub(a, b) => {
                let a = rec(a, out)?;
                Expr::sub(a, rec(b, out)?)
            }
            Expr::Mul(a, b) => {
                let a = rec(a, out)?;
                Expr::mul(a, rec(b, out)?)
            }
            Expr::Div(a, b) => {
                let a = rec(a, out)?;
                Expr::div(a, rec(b, out)?)
            }
            Expr::Arg(_) | Expr::Const(_) => e.clone(),
        })
    }

    /// A scale `c(s_1(ξ), …)` for an expression `c` over point forms.
    fn func_scale(&mut self, id: NodeId, c: &Expr, forms: &[LinForm]) -> Result<usize, String> {
        let mut args: Vec<usize> = Vec::new();
        let mut subs: Vec<Option<Expr>> = vec![None; forms.len()];
        let mut used = Vec::new();
        c.visit_args(&mut |i| used.push(i));
        for i in used {
            if subs[i].is_some() {
                continue;
            }
            let mut s = Expr::Const(0.0);
            for &(g, a) in &forms[i].0 {
                let GaussKind::Point { scale } = self.gauss[g].kind else {
                    return Err("a coefficient depends on a Gaussian".into());
                };
                let j = match args.iter().position(|&x| x == scale) {
                    Some(j) => j,
                    None => {
                        args.push(scale);
                        args.len() - 1
                    }
                };
                s = Expr::add(s, Expr::mul(Expr::Const(a), Expr::Arg(j)));
            }
            subs[i] = Some(s);
        }
        let f = c.substitute(&|i| subs[i].clone().unwrap_or(Expr::Const(0.0)));
        Ok(self.push_scale(id, PointScalar::Func { f, args }))
    }

    /// `s_k(ξ) · G` as a base Gaussian (of the root base's family, one level deep).
    fn scaled(&mut self, id: NodeId, g: GaussId, k: usize) -> GaussId {
        let (base, k) = match self.gauss[g].kind {
            GaussKind::Scaled { base, scale, .. } => {
                let f = Expr::mul(Expr::Arg(0), Expr::Arg(1));
                (
                    base,
                    self.push_scale(
                        id,
                        PointScalar::Func {
                            f,
                            args: vec![k, scale],
                        },
                    ),
                )
            }
            _ => (g, k),
        };
        let family = self.gauss[base].family();
        let name = format!("s{} {}", k + 1, self.gauss[base].name);
        let odd = self.gauss[base].odd;
        self.gauss.push(Gauss {
            kind: GaussKind::Scaled {
                base,
                scale: k,
                family,
            },
            name,
            odd,
        });
        self.gauss.len() - 1
    }
}

fn intern(out: &mut Vec<LinForm>, l: &LinForm) -> usize {
    match out.iter().position(|x| x == l) {
        Some(k) => k,
        None => {
            out.push(l.clone());
            out.len() - 1
        }
    }
}

/// `e` over `forms` rewritten over `out` (its forms interned there).
fn remap(e: &Expr, forms: &[LinForm], out: &mut Vec<LinForm>) -> Expr {
    let mut map = vec![usize::MAX; forms.len()];
    let mut used = Vec::new();
    e.visit_args(&mut |i| used.push(i));
    for i in used {
        if map[i] == usize::MAX {
            map[i] = intern(out, &forms[i]);
        }
    }
    e.substitute(&|i| Expr::Arg(map[i]))
}

/// Splits `f` over `forms` into `lin + Σ c_k atom_k + constant`: terms `c·Arg(k)` of a
/// Gaussian form join the linear part, constants the constant, the rest are atoms over
/// the forms they use.
fn to_zform(f: &Expr, forms: &[LinForm], is_pt: &[bool]) -> ZForm {
    let mut terms = Vec::new();
    split(f, 1.0, &mut terms);
    let mut z = ZForm::default();
    for (c, t) in terms {
        match t {
            Expr::Const(v) => z.constant += c * v,
            Expr::Arg(k) if !is_pt[k] => z.lin.axpy(c, &forms[k]),
            t => {
                let mut args = Vec::new();
                let t = remap(&t, forms, &mut args);
                z.scaled_add(
                    c,
                    &ZForm {
                        atoms: vec![(1.0, super::zform::Atom { f: t, args })],
                        ..ZForm::default()
                    },
                );
            }
        }
    }
    z
}

/// `e = Σ c_i t_i` over top-level sums, differences, negations and constant factors.
fn split(e: &Expr, c: f64, out: &mut Vec<(f64, Expr)>) {
    match e {
        Expr::Add(a, b) => {
            split(a, c, out);
            split(b, c, out);
        }
        Expr::Sub(a, b) => {
            split(a, c, out);
            split(b, -c, out);
        }
        Expr::Neg(a) => split(a, -c, out),
        Expr::Mul(a, b) if a.is_constant() => split(b, c * a.eval(&[]), out),
        Expr::Mul(a, b) if b.is_constant() => split(a, c * b.eval(&[]), out),
        _ => out.push((c, e.clone())),
    }
}

/// Does `e` use no Gaussian form (only point values and constants)?
fn free(e: &Expr, is_pt: &[bool]) -> bool {
    let mut ok = true;
    e.visit_args(&mut |i| ok &= is_pt[i]);
    ok
}

/// Is `e` affine in its Gaussian forms, with coefficients that are functions of point
/// values? Structural (a symbolic derivative leaves unfolded `0 / x` terms behind).
fn affine(e: &Expr, is_pt: &[bool]) -> bool {
    let af = |x: &Expr| affine(x, is_pt);
    let fr = |x: &Expr| free(x, is_pt);
    match e {
        Expr::Arg(_) | Expr::Const(_) => true,
        Expr::Neg(x) => af(x),
        Expr::Add(a, b) | Expr::Sub(a, b) => af(a) && af(b),
        Expr::Mul(a, b) => (fr(a) && af(b)) || (fr(b) && af(a)),
        Expr::Div(a, b) => af(a) && fr(b),
        Expr::Call(crate::ir::Fun::Id, x) => af(x),
        Expr::Powi(x, 1) => af(x),
        Expr::Call(_, x) | Expr::Powi(x, _) => fr(x),
    }
}

/// The coefficient of form `i` in an expression [`affine`] in its Gaussian forms.
fn coef(e: &Expr, i: usize, is_pt: &[bool]) -> Expr {
    let c = |x: &Expr| coef(x, i, is_pt);
    match e {
        Expr::Arg(j) => Expr::Const(if *j == i { 1.0 } else { 0.0 }),
        Expr::Const(_) => Expr::Const(0.0),
        Expr::Neg(x) => Expr::neg(c(x)),
        Expr::Add(a, b) => Expr::add(c(a), c(b)),
        Expr::Sub(a, b) => Expr::sub(c(a), c(b)),
        Expr::Mul(a, b) => {
            if free(a, is_pt) {
                Expr::mul((**a).clone(), c(b))
            } else {
                Expr::mul(c(a), (**b).clone())
            }
        }
        Expr::Div(a, b) => match c(a) {
            Expr::Const(0.0) => Expr::Const(0.0),
            ca => Expr::div(ca, (**b).clone()),
        },
        Expr::Call(crate::ir::Fun::Id, x) | Expr::Powi(x, 1) => c(x),
        Expr::Call(..) | Expr::Powi(..) => Expr::Const(0.0),
    }
}
