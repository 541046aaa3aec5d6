//! Point-dependent atoms (Netsor+ moments, Ż coefficients s(ξ), attention weights):
//! expectations whose integrand reads per-point scalars are evaluated point by point
//! or peeled into a point value times an ordinary atom; sums and products split by
//! linearity first (`sum_pair`, `split_pair`), so closed forms survive.

use nalgebra::{DMatrix, DVector};

use super::*;

impl Engine<'_> {
    /// Runs `f` and returns, with its value, the largest error stated inside it (the
    /// engine's `max_error` keeps the overall maximum).
    pub(super) fn scoped<T>(&mut self, f: impl FnOnce(&mut Self) -> R<T>) -> R<(T, f64)> {
        let outer = std::mem::replace(&mut self.max_error, 0.0);
        let r = f(self);
        let inner = self.max_error;
        self.max_error = outer.max(inner);
        Ok((r?, inner))
    }

    // ---- point-dependent Ż coefficients (theory.md §2.1) ------------------------------
    //
    // A Ż term `s(ξ) Z^y` with a non-Gaussian `Z^y` puts the deterministic value s(ξ)
    // (`GaussKind::Point`) into atoms as an argument. Expectations read its value at the
    // point instead of integrating: a factor of the atom that depends only on such values
    // comes out of the expectation, and otherwise the Gaussian arguments are integrated
    // point by point with the values substituted.

    /// Is this form made of point values only (Some), of Gaussians only (None)? A form
    /// mixing both is refused (the derivation never builds one).
    pub(super) fn point_form(&self, l: &LinForm) -> R<bool> {
        let pts =
            l.0.iter()
                .filter(|(g, _)| matches!(self.der.gauss[*g].kind, GaussKind::Point { .. }))
                .count();
        if pts > 0 && pts < l.0.len() {
            return Err(NumError(
                "a Ż coefficient that depends on the point is added to a Gaussian; the limit engine \
                 does not represent that sum"
                    .into(),
            ));
        }
        Ok(pts > 0)
    }

    pub(super) fn has_point(&self, a: &Atom) -> R<bool> {
        for l in &a.args {
            if self.point_form(l)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The value of a point-value form at every point, with its stated error.
    pub(super) fn point_values(&mut self, l: &LinForm) -> R<(DVector<f64>, f64)> {
        let mut v = DVector::zeros(self.p);
        let mut err = 0.0;
        for &(g, c) in &l.0 {
            if let GaussKind::Point { scale } = self.der.gauss[g].kind {
                let (s, e) = self.scale(scale)?;
                v += s * c;
                err += c.abs() * e;
            }
        }
        Ok((v, err))
    }

    /// Per argument of an atom: Some(values at every point, error) for point values.
    pub(super) fn point_args(&mut self, a: &Atom) -> R<Vec<Option<Valued>>> {
        let mut out = Vec::with_capacity(a.args.len());
        for l in &a.args {
            out.push(if self.point_form(l)? {
                Some(self.point_values(l)?)
            } else {
                None
            });
        }
        Ok(out)
    }

    /// `f = P · R` with P a product of factors of point values only and R free of
    /// them; None when a factor mixes the two.
    pub(super) fn peel(&self, a: &Atom) -> R<Option<(Atom, Atom)>> {
        let mut fs = Vec::new();
        factors(&a.f, &mut fs);
        let (mut pf, mut rf) = (Vec::new(), Vec::new());
        for f in fs {
            let (mut pt, mut gs) = (false, false);
            let mut bad = None;
            f.visit_args(&mut |j| match self.point_form(&a.args[j]) {
                Ok(true) => pt = true,
                Ok(false) => gs = true,
                Err(e) => bad = Some(e),
            });
            if let Some(e) = bad {
                return Err(e);
            }
            match (pt, gs) {
                (true, true) => return Ok(None),
                (true, false) => pf.push(f),
                _ => rf.push(f),
            }
        }
        Ok(Some((
            restrict(&product(pf), &a.args),
            restrict(&product(rf), &a.args),
        )))
    }

    /// The value at every point of an atom of point values only, with a stated error
    /// (the largest change when every value moves by its own error).
    pub(super) fn point_eval(&mut self, a: &Atom) -> R<(DVector<f64>, f64)> {
        let vals = self.point_args(a)?;
        let p = self.p;
        let mut out = DVector::zeros(p);
        let mut err: f64 = 0.0;
        for i in 0..p {
            let x: Vec<f64> = vals
                .iter()
                .map(|v| v.as_ref().map_or(0.0, |v| v.0[i]))
                .collect();
            let y = a.f.eval(&x);
            for sign in [-1.0, 1.0] {
                let xe: Vec<f64> = vals
                    .iter()
                    .map(|v| v.as_ref().map_or(0.0, |v| v.0[i] + sign * v.1))
                    .collect();
                err = err.max((a.f.eval(&xe) - y).abs());
            }
            out[i] = y;
        }
        Ok((out, err))
    }

    /// `E[f(L(ξ_p), s(ξ_p))]` for an atom with point values among its arguments.
    pub(super) fn point_mean(&mut self, a: &Atom) -> R<DVector<f64>> {
        let p = self.p;
        if let Some(out) = self.sum_mean(a)? {
            return Ok(out);
        }
        if let Some((pa, ra)) = self.peel(a)? {
            let (v, ev) = self.point_eval(&pa)?;
            let (m, em) = self.scoped(|s| s.atom_mean(&ra))?;
            self.note_err(v.amax() * em + m.amax() * ev + ev * em);
            return Ok(v.component_mul(&m));
        }
        let vals = self.point_args(a)?;
        let gi: Vec<usize> = (0..a.args.len()).filter(|&j| vals[j].is_none()).collect();
        let forms: Vec<LinForm> = gi.iter().map(|&j| a.args[j].clone()).collect();
        let blocks = self.joint_blocks(&forms, &[])?;
        let mut out = DVector::zeros(p);
        for i in 0..p {
            let cov = joint_cov(&blocks, gi.len(), gi.len(), i, i);
            let fixed: Vec<f64> = vals
                .iter()
                .map(|v| v.as_ref().map_or(0.0, |v| v.0[i]))
                .collect();
            let g = a.f.substitute(&|j| match gi.iter().position(|&k| k == j) {
                Some(k) => Expr::Arg(k),
                None => Expr::Const(fixed[j]),
            });
            let est = self.expect(&g, &cov);
            self.note(est.method.to_string(), est.error);
            out[i] = est.value;
        }
        Ok(out)
    }

    /// `E[f(L(ξ_p), s(ξ_p)) g(M(ξ_q), s(ξ_q))]` for atoms with point values.
    pub(super) fn point_pair(&mut self, a: &Atom, b: &Atom, symmetric: bool) -> R<DMatrix<f64>> {
        let p = self.p;
        if let Some(out) = self.sum_pair(a, b, symmetric)? {
            return Ok(out);
        }
        if let (Some((pa, ra)), Some((pb, rb))) = (self.peel(a)?, self.peel(b)?) {
            let (va, ea) = self.point_eval(&pa)?;
            let (vb, eb) = self.point_eval(&pb)?;
            let sym = symmetric && ra == rb;
            let (mut m, em) = self.scoped(|s| s.atom_pair(&ra, &rb, sym))?;
            let (na, nb, nm) = (va.amax(), vb.amax(), m.amax());
            for q in 0..p {
                for r in 0..p {
                    m[(r, q)] *= va[r] * vb[q];
                }
            }
            let ev = ea * nb + na * eb + ea * eb;
            self.note_err(na * nb * em + nm * ev + ev * em);
            return Ok(m);
        }
        let (va, vb) = (self.point_args(a)?, self.point_args(b)?);
        let ga: Vec<usize> = (0..a.args.len()).filter(|&j| va[j].is_none()).collect();
        let gb: Vec<usize> = (0..b.args.len()).filter(|&j| vb[j].is_none()).collect();
        let fa: Vec<LinForm> = ga.iter().map(|&j| a.args[j].clone()).collect();
        let fb: Vec<LinForm> = gb.iter().map(|&j| b.args[j].clone()).collect();
        let blocks = self.joint_blocks(&fa, &fb)?;
        let (ma, mb) = (ga.len(), gb.len());
        let mut out = DMatrix::zeros(p, p);
        for i in 0..p {
            for j in 0..p {
                if symmetric && j < i {
                    out[(i, j)] = out[(j, i)];
                    continue;
                }
                let cov = joint_cov(&blocks, ma, ma + mb, i, j);
                let xa: Vec<f64> = va
                    .iter()
                    .map(|v| v.as_ref().map_or(0.0, |v| v.0[i]))
                    .collect();
                let xb: Vec<f64> = vb
                    .iter()
                    .map(|v| v.as_ref().map_or(0.0, |v| v.0[j]))
                    .collect();
                let fa =
                    a.f.substitute(&|jj| match ga.iter().position(|&k| k == jj) {
                        Some(k) => Expr::Arg(k),
                        None => Expr::Const(xa[jj]),
                    });
                let fb =
                    b.f.substitute(&|jj| match gb.iter().position(|&k| k == jj) {
                        Some(k) => Expr::Arg(ma + k),
                        None => Expr::Const(xb[jj]),
                    });
                let est = self.expect(&Expr::mul(fa, fb), &cov);
                self.note(est.method.to_string(), est.error);
                out[(i, j)] = est.value;
            }
        }
        Ok(out)
    }

    // ---- factorization (theory.md §1.2) -------------------------------------------
    //
    // Gaussians of different families are independent at every pair of points
    // (theory.md §2.1: Ẑ^{W h} depends on W alone), so an expectation of a product
    // factors over groups of factors whose Gaussians share no family:
    //
    //   E[Π_k f_k(L_k(ξ_p)) Π_l g_l(M_l(ξ_q))] = Π_groups E[Π_{k∈G} f_k Π_{l∈G} g_l],
    //
    // and each group is usually one Gaussian at two points: a 2-D expectation with a
    // closed form or Gauss–Hermite (`dual/`), never a multidimensional rule. Sums are
    // split first (linearity of E). Stated errors propagate as
    // |Δ(ab)| ≤ |a||Δb| + |b||Δa| + |Δa||Δb| and |Δ(Σ c_i a_i)| ≤ Σ |c_i||Δa_i|.

    /// `E[(Σ c_i f_i)(Σ d_j g_j)] = Σ c_i d_j E[f_i g_j]` when either atom is a sum of
    /// terms (errors added with the same weights), or None when neither is.
    pub(super) fn sum_pair(
        &mut self,
        a: &Atom,
        b: &Atom,
        symmetric: bool,
    ) -> R<Option<DMatrix<f64>>> {
        let (sa, sb) = (sum_terms_of(a), sum_terms_of(b));
        if sa.len() <= 1 && sb.len() <= 1 {
            return Ok(None);
        }
        let mut out = DMatrix::zeros(self.p, self.p);
        let mut err = 0.0;
        for (ci, ai) in &sa {
            for (cj, bj) in &sb {
                let sym = symmetric && ai == bj;
                let (m, e) = self.scoped(|s| s.atom_pair(ai, bj, sym))?;
                out += m * (ci * cj);
                err += (ci * cj).abs() * e;
            }
        }
        self.note_err(err);
        Ok(Some(out))
    }

    /// `E[f(L(ξ_p)) g(M(ξ_q))]` by linearity and independence, or None when the
    /// integrand is one product over one group of correlated Gaussians.
    pub(super) fn split_pair(
        &mut self,
        a: &Atom,
        b: &Atom,
        symmetric: bool,
    ) -> R<Option<DMatrix<f64>>> {
        let p = self.p;
        if let Some(out) = self.sum_pair(a, b, symmetric)? {
            return Ok(Some(out));
        }
        let (konst, groups) = independent_groups(self.der, a, Some(b));
        if groups.len() < 2 {
            return Ok(None);
        }
        let mut out = DMatrix::from_element(p, p, konst);
        let mut err = 0.0;
        for [fa, fb] in groups {
            let ga = restrict(&product(fa), &a.args);
            let gb = restrict(&product(fb), &b.args);
            let sym = symmetric && ga == gb;
            let (m, e) = self.scoped(|s| s.atom_pair(&ga, &gb, sym))?;
            err = out.amax() * e + m.amax() * err + e * err;
            out.component_mul_assign(&m);
        }
        self.note_err(err);
        Ok(Some(out))
    }

    /// `E[Σ c_i f_i] = Σ c_i E[f_i]` when the atom is a sum of terms (errors added with
    /// the same weights), or None when it is not.
    pub(super) fn sum_mean(&mut self, a: &Atom) -> R<Option<DVector<f64>>> {
        let sa = sum_terms_of(a);
        if sa.len() <= 1 {
            return Ok(None);
        }
        let mut out = DVector::zeros(self.p);
        let mut err = 0.0;
        for (c, ai) in &sa {
            let (m, e) = self.scoped(|s| s.atom_mean(ai))?;
            out += m * *c;
            err += c.abs() * e;
        }
        self.note_err(err);
        Ok(Some(out))
    }

    /// `E[f(L(ξ_p))]` by linearity and independence, or None (see [`Self::split_pair`]).
    pub(super) fn split_mean(&mut self, a: &Atom) -> R<Option<DVector<f64>>> {
        let p = self.p;
        if let Some(out) = self.sum_mean(a)? {
            return Ok(Some(out));
        }
        let (konst, groups) = independent_groups(self.der, a, None);
        if groups.len() < 2 {
            return Ok(None);
        }
        let mut out = DVector::from_element(p, konst);
        let mut err = 0.0;
        for [fa, _] in groups {
            let ga = restrict(&product(fa), &a.args);
            let (m, e) = self.scoped(|s| s.atom_mean(&ga))?;
            err = out.amax() * e + m.amax() * err + e * err;
            out.component_mul_assign(&m);
        }
        self.note_err(err);
        Ok(Some(out))
    }
}
