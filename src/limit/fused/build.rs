//! The tape builder of [`super`]: walks the derivation exactly as the block engine
//! ([`super::super::engine`]) does — the same memo keys, the same splitting of sums and
//! independent factors, the same leading-order rule for exponents of n — building a DAG
//! of scalar [`Node`]s instead of P x P blocks. Why a module of its own: it is the half
//! of the fused path that mirrors the engine's mathematics (theory.md §2.1–2.3, §3.2),
//! and changes with it; the evaluator ([`super::eval`]) only runs what comes out.

use std::collections::HashMap;

use super::super::dual::arccos_terms;
use super::super::engine::{independent_groups, product, restrict, sum_terms_of};
use super::super::zform::{Atom, Derivation, GaussId, GaussKind, LinForm, ZForm};
use crate::ir::{Expr, Monomial, NodeId, Program, Rational, Shape};

/// One scalar quantity of the recursion at a pair of points `(p, q)`.
#[derive(Clone, Debug)]
pub(super) enum Node {
    Const(f64),
    /// `x_a(p) · x_b(q)` of two input nodes.
    Gram(NodeId, NodeId),
    /// `k + Σ c_i node_i`.
    Lin(Vec<(f64, usize)>, f64),
    /// `a * b`.
    Mul(usize, usize),
    /// `E[f(u_p) g(v_q)]` with `f = Σ tf_i A_i`, `g = Σ tg_j A_j` over `[1, u, step, relu]`,
    /// `Var u_p` the diagonal of node `du`, `Var v_q` of `dv`, `Cov(u_p, v_q)` node `cross`.
    Kern {
        tf: [f64; 4],
        tg: [f64; 4],
        du: usize,
        dv: usize,
        cross: usize,
    },
    /// `E[f(u)]` at the row point (`col` false) or the column point, `Var u` the diagonal
    /// of node `d`.
    Mean {
        tf: [f64; 4],
        d: usize,
        col: bool,
    },
}

/// The tape cannot express this program (the block engine runs instead).
pub(super) struct No;
type B<T> = Result<T, No>;

/// A tangent quantity: a node and its exponent of n; None is structurally zero.
type Tan = Option<(usize, Rational)>;

/// Method bookkeeping: the kernels and means used, with the diagonal nodes whose largest
/// value fixes their stated error (as `Engine::kernel` and `Engine::atom_mean` do).
pub(super) enum Note {
    Pair(Expr, Expr, usize, usize, f64),
    Mean(Expr, usize, f64),
}

/// Walks the derivation like the block engine, building nodes instead of blocks.
pub(super) struct Builder<'a> {
    pub(super) prog: &'a Program,
    pub(super) der: &'a Derivation,
    pub(super) nodes: Vec<Node>,
    pub(super) index: HashMap<Vec<u64>, usize>,
    pub(super) forms: Vec<LinForm>,
    pub(super) lcov: HashMap<(usize, usize), usize>,
    pub(super) vv: HashMap<(NodeId, NodeId), usize>,
    pub(super) tg: HashMap<(GaussId, GaussId), Tan>,
    pub(super) tv: HashMap<(NodeId, NodeId), Tan>,
    pub(super) notes: Vec<Note>,
    /// Weight of the expectations being built in the stated error: `Σ |c_i d_j|` of the
    /// sums they are split from (`Engine::sum_pair` adds errors with these weights).
    pub(super) weight: f64,
}

impl<'a> Builder<'a> {
    /// A hash-consing key: the node's kind and operands, constants by their bits.
    fn key(n: &Node) -> Vec<u64> {
        let b = |x: f64| x.to_bits();
        match n {
            Node::Const(c) => vec![0, b(*c)],
            Node::Gram(a, c) => vec![1, a.index() as u64, c.index() as u64],
            Node::Lin(ts, k) => {
                let mut v = vec![2, b(*k)];
                for &(c, i) in ts {
                    v.extend([b(c), i as u64]);
                }
                v
            }
            Node::Mul(a, c) => vec![3, *a as u64, *c as u64],
            Node::Kern {
                tf,
                tg,
                du,
                dv,
                cross,
            } => {
                let mut v = vec![4, *du as u64, *dv as u64, *cross as u64];
                v.extend(tf.iter().chain(tg).map(|&x| b(x)));
                v
            }
            Node::Mean { tf, d, col } => {
                let mut v = vec![5, *d as u64, u64::from(*col)];
                v.extend(tf.iter().map(|&x| b(x)));
                v
            }
        }
    }
    fn push(&mut self, n: Node) -> usize {
        let key = Self::key(&n);
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        self.nodes.push(n);
        let i = self.nodes.len() - 1;
        self.index.insert(key, i);
        i
    }
    fn konst(&mut self, c: f64) -> usize {
        self.push(Node::Const(c))
    }
    fn as_const(&self, i: usize) -> Option<f64> {
        match self.nodes[i] {
            Node::Const(c) => Some(c),
            _ => None,
        }
    }
    /// `k + Σ c_i n_i`, constants folded, nested sums flattened, repeated nodes merged.
    fn lin(&mut self, terms: &[(f64, usize)], k: f64) -> usize {
        let mut k = k;
        let mut out: Vec<(f64, usize)> = Vec::new();
        let add = |c: f64, n: usize, out: &mut Vec<(f64, usize)>| {
            if let Some(t) = out.iter_mut().find(|t| t.1 == n) {
                t.0 += c;
            } else {
                out.push((c, n));
            }
        };
        for &(c, n) in terms {
            match &self.nodes[n] {
                Node::Const(v) => k += c * v,
                Node::Lin(ts, k0) => {
                    k += c * k0;
                    for &(c2, n2) in ts {
                        add(c * c2, n2, &mut out);
                    }
                }
                _ => add(c, n, &mut out),
            }
        }
        out.retain(|t| t.0 != 0.0);
        if out.is_empty() {
            return self.konst(k);
        }
        if k == 0.0 && out.len() == 1 && out[0].0 == 1.0 {
            return out[0].1;
        }
        out.sort_by_key(|t| t.1);
        self.push(Node::Lin(out, k))
    }
    fn scale(&mut self, n: usize, c: f64) -> usize {
        self.lin(&[(c, n)], 0.0)
    }
    fn mul(&mut self, a: usize, b: usize) -> usize {
        match (self.as_const(a), self.as_const(b)) {
            (Some(x), _) => self.scale(b, x),
            (_, Some(y)) => self.scale(a, y),
            _ => {
                let (a, b) = (a.min(b), a.max(b));
                self.push(Node::Mul(a, b))
            }
        }
    }
    fn intern(&mut self, l: &LinForm) -> usize {
        match self.forms.iter().position(|x| x == l) {
            Some(i) => i,
            None => {
                self.forms.push(l.clone());
                self.forms.len() - 1
            }
        }
    }

    // ---- covariances (Engine::gcov, lcov, vv, zz) ----------------------------------

    fn gcov(&mut self, j: GaussId, k: GaussId) -> B<Option<usize>> {
        let (gj, gk) = (&self.der.gauss[j], &self.der.gauss[k]);
        if gj.family() != gk.family() {
            return Ok(None);
        }
        Ok(match (gj.kind.clone(), gk.kind.clone()) {
            (GaussKind::Scaled { .. } | GaussKind::Point { .. }, _)
            | (_, GaussKind::Scaled { .. } | GaussKind::Point { .. }) => return Err(No),
            (GaussKind::Initial { var, .. }, _) => Some(self.konst(var)),
            (
                GaussKind::InputLayer { input: a, var, .. },
                GaussKind::InputLayer { input: b, .. },
            ) => {
                let g = self.push(Node::Gram(a, b));
                Some(self.scale(g, var))
            }
            (GaussKind::Hat { arg: a, sigma2, .. }, GaussKind::Hat { arg: b, .. }) => {
                let v = self.vv(a, b)?;
                Some(self.scale(v, sigma2))
            }
            _ => None,
        })
    }

    fn lcov(&mut self, l: &LinForm, m: &LinForm) -> B<usize> {
        let key = (self.intern(l), self.intern(m));
        if let Some(&n) = self.lcov.get(&key) {
            return Ok(n);
        }
        let mut terms = Vec::new();
        for &(j, cj) in &l.0 {
            for &(k, ck) in &m.0 {
                if let Some(c) = self.gcov(j, k)? {
                    terms.push((cj * ck, c));
                }
            }
        }
        let n = self.lin(&terms, 0.0);
        self.lcov.insert(key, n);
        Ok(n)
    }

    fn zf(&self, x: NodeId) -> B<ZForm> {
        self.der.zform(x).cloned().ok_or(No)
    }

    fn vv(&mut self, x: NodeId, y: NodeId) -> B<usize> {
        if let Some(&n) = self.vv.get(&(x, y)) {
            return Ok(n);
        }
        let (zx, zy) = (self.zf(x)?, self.zf(y)?);
        let n = self.zz(&zx, &zy)?;
        self.vv.insert((x, y), n);
        Ok(n)
    }

    fn zz(&mut self, za: &ZForm, zb: &ZForm) -> B<usize> {
        let (ta, tb) = (za.terms(), zb.terms());
        let mut terms = Vec::new();
        for (ca, a) in &ta {
            for (cb, b) in &tb {
                terms.push((ca * cb, self.atom_pair(a, b)?));
            }
        }
        Ok(self.lin(&terms, 0.0))
    }

    fn atom_mean(&mut self, a: &Atom, col: bool) -> B<usize> {
        match a.args.len() {
            0 => Ok(self.konst(a.f.eval(&[]))),
            1 => {
                let tf = arccos_terms(&a.f).ok_or(No)?;
                let d = self.lcov(&a.args[0], &a.args[0])?;
                self.notes.push(Note::Mean(a.f.clone(), d, self.weight));
                Ok(self.push(Node::Mean { tf, d, col }))
            }
            _ => {
                let ra = restrict(&a.f, &a.args);
                if ra.args.len() < a.args.len() {
                    return self.atom_mean(&ra, col);
                }
                self.split_mean(a, col)
            }
        }
    }

    /// `Engine::split_pair`: linearity, then independence; None where the engine would
    /// integrate several correlated forms numerically.
    fn split_pair(&mut self, a: &Atom, b: &Atom) -> B<usize> {
        let (sa, sb) = (sum_terms_of(a), sum_terms_of(b));
        if sa.len() > 1 || sb.len() > 1 {
            let mut terms = Vec::new();
            let w = self.weight;
            self.weight *= sa
                .iter()
                .flat_map(|(ci, _)| sb.iter().map(move |(cj, _)| (ci * cj).abs()))
                .sum::<f64>()
                .max(1.0);
            for (ci, ai) in &sa {
                for (cj, bj) in &sb {
                    let m = self.atom_pair(ai, bj);
                    terms.push((ci * cj, m.inspect_err(|_| self.weight = w)?));
                }
            }
            self.weight = w;
            return Ok(self.lin(&terms, 0.0));
        }
        let (konst, groups) = independent_groups(self.der, a, Some(b));
        if groups.len() < 2 {
            return Err(No);
        }
        let mut out = self.konst(konst);
        for [fa, fb] in groups {
            let ga = restrict(&product(fa), &a.args);
            let gb = restrict(&product(fb), &b.args);
            let m = self.atom_pair(&ga, &gb)?;
            out = self.mul(out, m);
        }
        Ok(out)
    }

    /// `Engine::split_mean`.
    fn split_mean(&mut self, a: &Atom, col: bool) -> B<usize> {
        let sa = sum_terms_of(a);
        if sa.len() > 1 {
            let mut terms = Vec::new();
            let w = self.weight;
            self.weight *= sa.iter().map(|(c, _)| c.abs()).sum::<f64>().max(1.0);
            for (c, ai) in &sa {
                let m = self.atom_mean(ai, col);
                terms.push((*c, m.inspect_err(|_| self.weight = w)?));
            }
            self.weight = w;
            return Ok(self.lin(&terms, 0.0));
        }
        let (konst, groups) = independent_groups(self.der, a, None);
        if groups.len() < 2 {
            return Err(No);
        }
        let mut out = self.konst(konst);
        for [fa, _] in groups {
            let ga = restrict(&product(fa), &a.args);
            let m = self.atom_mean(&ga, col)?;
            out = self.mul(out, m);
        }
        Ok(out)
    }

    fn atom_pair(&mut self, a: &Atom, b: &Atom) -> B<usize> {
        let konst = |x: &Atom| {
            (x.f.is_constant() && !x.args.is_empty()).then(|| Atom {
                f: x.f.clone(),
                args: vec![],
            })
        };
        if let Some(a) = konst(a) {
            return self.atom_pair(&a, b);
        }
        if let Some(b) = konst(b) {
            return self.atom_pair(a, &b);
        }
        match (a.args.len(), b.args.len()) {
            (0, _) => {
                let m = self.atom_mean(b, true)?;
                Ok(self.scale(m, a.f.eval(&[])))
            }
            (_, 0) => {
                let m = self.atom_mean(a, false)?;
                Ok(self.scale(m, b.f.eval(&[])))
            }
            (1, 1) => {
                let cross = self.lcov(&a.args[0], &b.args[0])?;
                if a.f == Expr::Arg(0) && b.f == Expr::Arg(0) {
                    return Ok(cross);
                }
                let (tf, tg) = (arccos_terms(&a.f).ok_or(No)?, arccos_terms(&b.f).ok_or(No)?);
                let du = self.lcov(&a.args[0], &a.args[0])?;
                let dv = self.lcov(&b.args[0], &b.args[0])?;
                let w = self.weight;
                self.notes
                    .push(Note::Pair(a.f.clone(), b.f.clone(), du, dv, w));
                Ok(self.push(Node::Kern {
                    tf,
                    tg,
                    du,
                    dv,
                    cross,
                }))
            }
            _ => {
                let (ra, rb) = (restrict(&a.f, &a.args), restrict(&b.f, &b.args));
                if ra.args.len() < a.args.len() || rb.args.len() < b.args.len() {
                    return self.atom_pair(&ra, &rb);
                }
                self.split_pair(a, b)
            }
        }
    }

    // ---- tangent kernels (Engine::tgauss, tlin, tvec, tz) ----------------------------

    /// `Scaled::add`: a zero term drops out; equal exponents add; otherwise the engine
    /// keeps the larger unless its block is zero, which only the numbers tell: refused.
    fn tadd(&mut self, a: Tan, b: Tan) -> B<Tan> {
        let zero = |s: &Self, t: &Tan| t.is_none_or(|(n, _)| s.as_const(n) == Some(0.0));
        if zero(self, &b) {
            return Ok(a);
        }
        if zero(self, &a) {
            return Ok(b);
        }
        let ((na, ea), (nb, eb)) = (a.ok_or(No)?, b.ok_or(No)?);
        if ea != eb {
            return Err(No);
        }
        Ok(Some((self.lin(&[(1.0, na), (1.0, nb)], 0.0), ea)))
    }

    fn ttimes(&mut self, t: Tan, c: Monomial) -> Tan {
        let (n, e) = t?;
        if c.coef == 0.0 {
            return None;
        }
        Some((self.scale(n, c.coef), e + c.exp))
    }

    fn tgauss(&mut self, j: GaussId, k: GaussId) -> B<Tan> {
        let (gj, gk) = (self.der.gauss[j].clone(), self.der.gauss[k].clone());
        if gj.family() != gk.family() {
            return Ok(None);
        }
        if let Some(t) = self.tg.get(&(j, k)) {
            return Ok(*t);
        }
        let one = Some((self.konst(1.0), Rational::ZERO));
        let out = match (&gj.kind, &gk.kind) {
            (GaussKind::Scaled { .. } | GaussKind::Point { .. }, _)
            | (_, GaussKind::Scaled { .. } | GaussKind::Point { .. }) => return Err(No),
            (GaussKind::Initial { param, .. }, _) => {
                let law = self.prog.params[*param].law;
                self.ttimes(one, law.lr * law.mult.powi(2))
            }
            (
                GaussKind::InputLayer {
                    param, input: a, ..
                },
                GaussKind::InputLayer { input: b, .. },
            ) => {
                let law = self.prog.params[*param].law;
                let g = self.push(Node::Gram(*a, *b));
                self.ttimes(Some((g, Rational::ZERO)), law.lr * law.mult.powi(2))
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
                let law = self.prog.params[*param].law;
                let (a, b, s2) = (*a, *b, *sigma2);
                let v = self.vv(a, b)?;
                let own = self.ttimes(
                    Some((v, Rational::ZERO)),
                    law.lr * law.mult.powi(2) * Monomial::n_pow(Rational::ONE),
                );
                let t = self.tvec(a, b)?;
                let through = self.ttimes(t, Monomial::constant(s2));
                self.tadd(own, through)?
            }
            _ => None,
        };
        self.tg.insert((j, k), out);
        Ok(out)
    }

    fn tlin(&mut self, l: &LinForm, m: &LinForm) -> B<Tan> {
        let mut out = None;
        for &(j, cj) in &l.0 {
            for &(k, ck) in &m.0 {
                let t = self.tgauss(j, k)?;
                let t = self.ttimes(t, Monomial::constant(cj * ck));
                out = self.tadd(out, t)?;
            }
        }
        Ok(out)
    }

    fn tvec(&mut self, x: NodeId, y: NodeId) -> B<Tan> {
        if let Some(t) = self.tv.get(&(x, y)) {
            return Ok(*t);
        }
        let (zx, zy) = (self.zf(x)?, self.zf(y)?);
        let t = self.tz(&zx, &zy)?;
        self.tv.insert((x, y), t);
        Ok(t)
    }

    fn tz(&mut self, za: &ZForm, zb: &ZForm) -> B<Tan> {
        let (ta, tb) = (za.terms(), zb.terms());
        let mut out = None;
        for (ca, a) in &ta {
            for (cb, b) in &tb {
                for i in 0..a.args.len() {
                    for j in 0..b.args.len() {
                        let Some((t, e)) = self.tlin(&a.args[i], &b.args[j])? else {
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
                        let m = self.atom_pair(&da, &db)?;
                        let m = self.mul(m, t);
                        let m = self.scale(m, ca * cb);
                        out = self.tadd(out, Some((m, e)))?;
                    }
                }
            }
        }
        Ok(out)
    }

    // ---- outputs (limit::output_pair) ----------------------------------------------

    /// NNGP and (with `gia`) NTK node of the output pair, both at exponent 0.
    pub(super) fn output_pair(
        &mut self,
        oa: NodeId,
        ob: NodeId,
        gia: bool,
    ) -> B<(usize, Option<usize>)> {
        let prog = self.prog;
        let terms = |o: NodeId| prog.output_terms(o);
        let (ta, tb) = (terms(oa), terms(ob));
        let (mut k, mut t): (Tan, Tan) = (None, None);
        let n = Monomial::n_pow(Rational::ONE);
        for &(ca, ra, xa) in &ta {
            for &(cb, rb, xb) in &tb {
                if ra != rb {
                    continue;
                }
                let Some(prm) = prog.param_of(ra) else {
                    continue;
                };
                let law = prm.law;
                let c = Monomial::constant(ca * cb);
                match (xa, xb, prm.shape) {
                    (Some(xa), Some(xb), Shape::Readout) => {
                        let e = self.vv(xa, xb)?;
                        let s2 = n * law.entry_var() * c;
                        let ke = self.ttimes(Some((e, Rational::ZERO)), s2);
                        k = self.tadd(k, ke)?;
                        if gia {
                            let own = self.ttimes(
                                Some((e, Rational::ZERO)),
                                law.lr * law.mult.powi(2) * n * c,
                            );
                            let tv = self.tvec(xa, xb)?;
                            let through = self.ttimes(tv, s2);
                            t = self.tadd(t, own)?;
                            t = self.tadd(t, through)?;
                        }
                    }
                    (None, None, _) => {
                        let one = Some((self.konst(1.0), Rational::ZERO));
                        let ke = self.ttimes(one, law.entry_var() * c);
                        k = self.tadd(k, ke)?;
                        let te = self.ttimes(one, law.lr * law.mult.powi(2) * c);
                        t = self.tadd(t, te)?;
                    }
                    _ => {}
                }
            }
        }
        // Only limits at exponent 0 are fused (the engine decides the others by the numbers).
        let fin = |s: &mut Self, x: Tan| -> B<usize> {
            match x {
                None => Ok(s.konst(0.0)),
                Some((n, e)) if e.is_zero() => Ok(n),
                Some((n, _)) if s.as_const(n) == Some(0.0) => Ok(n),
                _ => Err(No),
            }
        };
        let kn = fin(self, k)?;
        let tn = if gia { Some(fin(self, t)?) } else { None };
        Ok((kn, tn))
    }
}
