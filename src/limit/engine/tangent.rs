//! Tangent kernels for the NTK (theory.md §2.2–2.3): `T(g, g')` of base Gaussians,
//! `T` of linear forms and of vectors, each a [`Scaled`] block carrying its exponent
//! of n.

use nalgebra::{DMatrix, DVector};

use super::*;

impl Engine<'_> {
    /// Tangent kernel of two base Gaussians: `sum_w lr_w <dG/dw, dG'/dw>` per coordinate.
    pub(super) fn tgauss(&mut self, j: GaussId, k: GaussId) -> R<Option<Scaled>> {
        let (gj, gk) = (self.der.gauss[j].clone(), self.der.gauss[k].clone());
        if gj.family() != gk.family() {
            return Ok(None);
        }
        // Netsor+ coefficients (limit::netsor): T(s G, s' G') = s(ξ_p) s'(ξ_q) T(G, G'),
        // and a point value has no tangent (a moment's rank-one gradient is O(1/n) in
        // the tangent kernel).
        let netsor = |s: usize| self.der.scales[s].netsor.is_some();
        if let GaussKind::Point { scale } = gj.kind {
            if netsor(scale) {
                return Ok(None);
            }
        }
        let split = |kind: &GaussKind| match kind {
            GaussKind::Scaled { base, scale, .. } if netsor(*scale) => Some((*base, *scale)),
            _ => None,
        };
        let (sj, sk) = (split(&gj.kind), split(&gk.kind));
        if sj.is_some() || sk.is_some() {
            let (bj, bk) = (sj.map_or(j, |x| x.0), sk.map_or(k, |x| x.0));
            let Some(mut t) = self.tgauss(bj, bk)? else {
                return Ok(None);
            };
            let one = (DVector::from_element(self.p, 1.0), 0.0);
            let (vj, ej) = match sj {
                Some((_, s)) => self.scale(s)?,
                None => one.clone(),
            };
            let (vk, ek) = match sk {
                Some((_, s)) => self.scale(s)?,
                None => one,
            };
            let err = (ej * vk.amax() + vj.amax() * ek + ej * ek) * t.m.amax();
            for q in 0..t.m.ncols() {
                for r in 0..t.m.nrows() {
                    t.m[(r, q)] *= vj[r] * vk[q];
                }
            }
            self.note_err(err);
            return Ok(Some(t));
        }
        if [&gj.kind, &gk.kind]
            .iter()
            .any(|k| matches!(k, GaussKind::Scaled { .. } | GaussKind::Point { .. }))
        {
            // Never reached: programs with Ż terms get no NTK (limit::compute).
            return Err(NumError(
                "the tangent kernel of a Ż term with a point-dependent coefficient is not derived"
                    .into(),
            ));
        }
        if let Some(s) = self.tg.take(&(j, k)) {
            return Ok(Some(s));
        }
        let p = self.p;
        let out = match (&gj.kind, &gk.kind) {
            (GaussKind::Initial { param, .. }, _) => {
                let law = self.prog.params[*param].law;
                Scaled {
                    m: DMatrix::from_element(p, p, 1.0),
                    exp: Rational::ZERO,
                }
                .times(law.lr * law.mult.powi(2))
            }
            (
                GaussKind::InputLayer {
                    param, input: a, ..
                },
                GaussKind::InputLayer { input: b, .. },
            ) => {
                let law = self.prog.params[*param].law;
                let m = &self.inputs[a] * self.inputs[b].transpose();
                Scaled {
                    m,
                    exp: Rational::ZERO,
                }
                .times(law.lr * law.mult.powi(2))
            }
            (
                GaussKind::Hat {
                    param,
                    arg: a,
                    sigma2,
                    ..
                },
                GaussKind::Hat { arg: b, .. },
            ) => {
                // d(W h)_a/dW: lr mult^2 (h . h') = lr mult^2 n E[Z^h Z^h'];
                // through h: sigma^2 times the tangent kernel of h.
                let law = self.prog.params[*param].law;
                let (a, b, s2) = (*a, *b, *sigma2);
                let own = Scaled {
                    m: self.vv(a, b)?,
                    exp: Rational::ZERO,
                }
                .times(law.lr * law.mult.powi(2) * Monomial::n_pow(Rational::ONE));
                let through = self.tvec(a, b)?.times(Monomial::constant(s2));
                own.add(through)
            }
            _ => return Ok(None),
        };
        self.tg.put((j, k), &out);
        Ok(Some(out))
    }

    /// Tangent kernel of two linear forms; None when structurally zero (no two of their
    /// Gaussians share a parameter).
    pub(super) fn tlin(&mut self, l: &LinForm, m: &LinForm) -> R<Option<Scaled>> {
        let mut out: Option<Scaled> = None;
        for &(j, cj) in &l.0 {
            for &(k, ck) in &m.0 {
                if let Some(t) = self.tgauss(j, k)? {
                    let t = t.times(Monomial::constant(cj * ck));
                    out = Some(match out {
                        None => t,
                        Some(o) => o.add(t),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Tangent kernel of two vector nodes from their Z forms, plus the gradient terms
    /// of vector parameters that start at 0 (`Derivation::zero_params`):
    /// `lr·mult²·E[∂φ/∂g(ξ_p) ∂φ'/∂g(ξ_q)]` for a parameter g both use.
    pub(super) fn tnode(&mut self, a: NodeId, b: NodeId) -> R<Scaled> {
        let (za, zb) = (self.zf(a)?, self.zf(b)?);
        let mut out = self.tz(&za, &zb, a == b)?;
        let (ea, eb) = (
            self.der.zero_params[a.index()].clone(),
            self.der.zero_params[b.index()].clone(),
        );
        for (pa, da) in &ea {
            for (pb, db) in &eb {
                if pa != pb {
                    continue;
                }
                let law = self.prog.params[*pa].law;
                let m = self.zz(da, db, a == b && da == db)?;
                out = out.add(
                    Scaled {
                        m,
                        exp: Rational::ZERO,
                    }
                    .times(law.lr * law.mult.powi(2)),
                );
            }
        }
        Ok(out)
    }

    /// Tangent kernel of two vectors (per coordinate, the diagonal of the n x n kernel).
    pub fn tvec(&mut self, x: NodeId, y: NodeId) -> R<Scaled> {
        let (a, b, flip) = if x <= y { (x, y, false) } else { (y, x, true) };
        let out = match self.tv.take(&(a, b)) {
            Some(s) => s,
            None => {
                let out = self.tnode(a, b)?;
                self.tv.put((a, b), &out);
                out
            }
        };
        Ok(if flip {
            Scaled {
                m: out.m.transpose(),
                exp: out.exp,
            }
        } else {
            out
        })
    }

    /// Tangent kernel of two Z forms: for atoms f(L), g(M) of one form each,
    /// `E[f'(L) g'(M)] * T(L, M)`; for several forms, the sum over pairs of partials.
    pub fn tz(&mut self, za: &ZForm, zb: &ZForm, symmetric: bool) -> R<Scaled> {
        let mut out = Scaled::zero(self.p);
        let (ta, tb) = (za.terms(), zb.terms());
        for (ca, a) in &ta {
            for (cb, b) in &tb {
                for i in 0..a.args.len() {
                    for j in 0..b.args.len() {
                        let Some(t) = self.tlin(&a.args[i], &b.args[j])? else {
                            continue;
                        };
                        let da = Atom {
                            f: a.f.diff(i),
                            args: a.args.clone(),
                        };
                        let db = Atom {
                            f: b.f.diff(j),
                            args: b.args.clone(),
                        };
                        let mut m = self.atom_pair(&da, &db, symmetric && ta == tb && i == j)?;
                        m.component_mul_assign(&t.m);
                        m *= ca * cb;
                        out = out.add(Scaled { m, exp: t.exp });
                    }
                }
            }
        }
        Ok(out)
    }
}
