//! Per-entry fusion for the general block engine (issue 13).
//!
//! Why: the block engine ([`super::engine`]) materializes every covariance block, kernel
//! block and tangent product as its own P x P pass, so a depth-10 ReLU network costs
//! dozens of passes over memory where the arithmetic per entry is a few flops and one
//! `acos` per layer. When every expectation a program needs has a closed form over the
//! piecewise-linear atoms `1, u, step(u), relu(u)` (relu, step, identity, abs, leaky
//! combinations: theory.md §3.2), the engine's recursion — covariances of linear forms
//! (§2.1), `E[f(u_p) g(v_q)]`, tangent kernels `T = Σ lr mult² ⟨·,·⟩ + σ² E[f' g'] T`
//! (§2.2–2.3), over layers, time steps, pooled sums and pairs of outputs — is the same
//! scalar program at every pair of points `(p, q)`. This module compiles it once, by
//! walking the derivation exactly as the engine does (the same memo keys, the same
//! leading-order rule for exponents of n), into a small tape of register operations; the
//! per-point variances `E[u_p²]` the kernels need are found first by running the tape on
//! the diagonal `(p, p)`, then every off-diagonal entry runs the whole tape in 32 x 32
//! tiles on all cores, with the vectorized `acos` of [`super::fastmath`], and is written
//! to both triangles of every output block once.
//!
//! Anything the tape does not express — quadrature or smooth kernels, point-dependent Ż
//! coefficients, transposes, moments (observes), atoms of several forms, exponents of n
//! that the engine resolves by looking at the numbers — makes [`limit_fused`] return
//! None, and the block engine runs as before. The methods and stated errors reported are
//! the engine's: the same [`PairKernel`] / [`MeanKernel`] constructors at the same
//! largest variances. `tests/it/fused.rs` compares the two entry by entry.

use std::collections::HashMap;

use nalgebra::DMatrix;
use rayon::prelude::*;

use super::dual::{arccos_terms, MeanKernel, PairKernel};
use super::engine::{independent_groups, product, restrict, sum_terms_of, TOL};
use super::fastmath;
use super::gauss::TINY_VAR;
use super::zform::{Atom, Derivation, GaussId, GaussKind, LinForm, ZForm};
use super::LimitResult;
use crate::ir::{Expr, Monomial, NodeId, Program, Rational, Shape};

/// `1/sqrt(2 pi)`
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
const INV_2PI: f64 = 1.0 / (2.0 * std::f64::consts::PI);

/// One scalar quantity of the recursion at a pair of points `(p, q)`.
#[derive(Clone, Debug)]
enum Node {
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
struct No;
type B<T> = Result<T, No>;

/// A tangent quantity: a node and its exponent of n; None is structurally zero.
type Tan = Option<(usize, Rational)>;

/// Method bookkeeping: the kernels and means used, with the diagonal nodes whose largest
/// value fixes their stated error (as `Engine::kernel` and `Engine::atom_mean` do).
enum Note {
    Pair(Expr, Expr, usize, usize, f64),
    Mean(Expr, usize, f64),
}

/// Walks the derivation like the block engine, building nodes instead of blocks.
struct Builder<'a> {
    prog: &'a Program,
    der: &'a Derivation,
    nodes: Vec<Node>,
    index: HashMap<Vec<u64>, usize>,
    forms: Vec<LinForm>,
    lcov: HashMap<(usize, usize), usize>,
    vv: HashMap<(NodeId, NodeId), usize>,
    tg: HashMap<(GaussId, GaussId), Tan>,
    tv: HashMap<(NodeId, NodeId), Tan>,
    notes: Vec<Note>,
    /// Weight of the expectations being built in the stated error: `Σ |c_i d_j|` of the
    /// sums they are split from (`Engine::sum_pair` adds errors with these weights).
    weight: f64,
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
    fn output_pair(&mut self, oa: NodeId, ob: NodeId, gia: bool) -> B<(usize, Option<usize>)> {
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

// ---- the tape ----------------------------------------------------------------------

/// One operation on registers of a strip (up to [`TILE`] rows of one column).
#[derive(Clone, Debug)]
enum TOp {
    Const {
        dst: usize,
        c: f64,
    },
    Gram {
        dst: usize,
        a: usize,
        b: usize,
    },
    Lin {
        dst: usize,
        k: f64,
        terms: Vec<(f64, usize)>,
    },
    /// `c a b`.
    Mul {
        dst: usize,
        c: f64,
        a: usize,
        b: usize,
    },
    /// Several kernels on one covariance `cc * cross`.
    Kern {
        cc: f64,
        cross: usize,
        du: usize,
        dv: usize,
        outs: Vec<KOut>,
        acos: bool,
    },
    /// A per-point array read at the row point or the column point.
    Point {
        dst: usize,
        arr: usize,
        col: bool,
    },
}

/// One kernel of a [`TOp::Kern`]: its register, its atoms' coefficients, and the
/// nonzero products `tf_i tg_j` as `(i, j, tf_i tg_j)` (in the order `kern_scalar` sums).
#[derive(Clone, Debug)]
struct KOut {
    dst: usize,
    tf: [f64; 4],
    tg: [f64; 4],
    terms: Vec<(usize, usize, f64)>,
}

/// The compiled program: operations, register count, output registers per ordered
/// output pair `(a, b)` at index `a * o + b`.
struct Tape {
    ops: Vec<TOp>,
    nreg: usize,
    nngp: Vec<usize>,
    ntk: Vec<Option<usize>>,
}

/// Off-diagonal operations in node order for the nodes the outputs need; registers
/// reused after their last read. `diag_slot` maps a node whose diagonal a kernel reads
/// to its slot among the diagonal arrays; `mean_slot` maps a Mean node to its array.
fn compile(
    nodes: &[Node],
    outs: &[usize],
    diag_slot: &HashMap<usize, usize>,
    mean_slot: &HashMap<usize, usize>,
    inputs: &HashMap<NodeId, usize>,
    ntk_outs: &[Option<usize>],
) -> Tape {
    let n = nodes.len();
    let mut need = vec![false; n];
    let mut keep = vec![false; n];
    for &o in outs.iter().chain(ntk_outs.iter().flatten()) {
        need[o] = true;
        keep[o] = true;
    }
    // A product or kernel reading `c x` (a one-term sum) reads x and scales: the sum is
    // not a pass of its own.
    let mut alias: Vec<(f64, usize)> = (0..n).map(|i| (1.0, i)).collect();
    for i in 0..n {
        if let Node::Lin(ts, k) = &nodes[i] {
            if *k == 0.0 && ts.len() == 1 && !keep[i] {
                let (c, s) = ts[0];
                let (c2, s2) = alias[s];
                alias[i] = (c * c2, s2);
            }
        }
    }
    let alias = &alias;
    let reads = |nd: &Node| -> Vec<usize> {
        match nd {
            Node::Lin(ts, _) => ts.iter().map(|t| alias[t.1].1).collect(),
            Node::Mul(a, b) => vec![alias[*a].1, alias[*b].1],
            Node::Kern { cross, .. } => vec![alias[*cross].1],
            _ => Vec::new(),
        }
    };
    for i in (0..n).rev() {
        if need[i] {
            for r in reads(&nodes[i]) {
                need[r] = true;
            }
        }
    }
    debug_assert!((0..n).all(|i| !need[i] || alias[i].1 == i));
    // Group kernels by (du, dv, cross): one acos for relu·relu and step·step.
    let mut kgroup: HashMap<(usize, usize, usize), Vec<usize>> = HashMap::new();
    for (i, nd) in nodes.iter().enumerate() {
        if let (true, Node::Kern { du, dv, cross, .. }) = (need[i], nd) {
            kgroup.entry((*du, *dv, *cross)).or_default().push(i);
        }
    }
    // Last read of every node (in emission order = node order; a kernel group is
    // emitted at its first member).
    let mut emit_at: Vec<usize> = (0..n).collect();
    for g in kgroup.values() {
        for &m in g {
            emit_at[m] = g[0];
        }
    }
    let mut last = vec![0usize; n];
    for i in 0..n {
        if need[i] {
            for r in reads(&nodes[i]) {
                last[r] = last[r].max(emit_at[i]);
            }
        }
    }
    let mut reg = vec![usize::MAX; n];
    let mut free: Vec<usize> = Vec::new();
    let mut nreg = 0usize;
    let mut alloc = |free: &mut Vec<usize>| {
        free.pop().unwrap_or_else(|| {
            nreg += 1;
            nreg - 1
        })
    };
    let mut ops = Vec::new();
    // Registers whose last read is at emission step i, freed after the op.
    for i in 0..n {
        if !need[i] || emit_at[i] != i {
            continue;
        }
        let op = match &nodes[i] {
            Node::Const(c) => {
                let d = alloc(&mut free);
                reg[i] = d;
                TOp::Const { dst: d, c: *c }
            }
            Node::Gram(a, b) => {
                let d = alloc(&mut free);
                reg[i] = d;
                TOp::Gram {
                    dst: d,
                    a: inputs[a],
                    b: inputs[b],
                }
            }
            Node::Lin(ts, k) => {
                let d = alloc(&mut free);
                reg[i] = d;
                TOp::Lin {
                    dst: d,
                    k: *k,
                    terms: ts
                        .iter()
                        .map(|&(c, s)| (c * alias[s].0, reg[alias[s].1]))
                        .collect(),
                }
            }
            Node::Mul(a, b) => {
                let d = alloc(&mut free);
                reg[i] = d;
                let ((ca, a), (cb, b)) = (alias[*a], alias[*b]);
                TOp::Mul {
                    dst: d,
                    c: ca * cb,
                    a: reg[a],
                    b: reg[b],
                }
            }
            Node::Mean { col, .. } => {
                let d = alloc(&mut free);
                reg[i] = d;
                TOp::Point {
                    dst: d,
                    arr: mean_slot[&i],
                    col: *col,
                }
            }
            Node::Kern { du, dv, cross, .. } => {
                let members = &kgroup[&(*du, *dv, *cross)];
                let mut outs_k = Vec::new();
                let mut acos = false;
                for &m in members {
                    let Node::Kern { tf, tg, .. } = nodes[m] else {
                        continue;
                    };
                    let d = alloc(&mut free);
                    reg[m] = d;
                    acos |= (tf[2] != 0.0 || tf[3] != 0.0) && (tg[2] != 0.0 || tg[3] != 0.0);
                    let terms = (0..4)
                        .flat_map(|i| (0..4).map(move |j| (i, j, tf[i] * tg[j])))
                        .filter(|t| t.2 != 0.0)
                        .collect();
                    outs_k.push(KOut {
                        dst: d,
                        tf,
                        tg,
                        terms,
                    });
                }
                TOp::Kern {
                    cc: alias[*cross].0,
                    cross: reg[alias[*cross].1],
                    du: diag_slot[du],
                    dv: diag_slot[dv],
                    outs: outs_k,
                    acos,
                }
            }
        };
        ops.push(op);
        // free the operands read for the last time here
        let mut rd = reads(&nodes[i]);
        if let Some(g) = match &nodes[i] {
            Node::Kern { du, dv, cross, .. } => kgroup.get(&(*du, *dv, *cross)),
            _ => None,
        } {
            for &m in g {
                rd.extend(reads(&nodes[m]));
            }
        }
        rd.sort_unstable();
        rd.dedup();
        for r in rd {
            if last[r] == i && !keep[r] {
                free.push(reg[r]);
            }
        }
    }
    Tape {
        ops,
        nreg,
        nngp: outs.iter().map(|&o| reg[o]).collect(),
        ntk: ntk_outs.iter().map(|o| o.map(|o| reg[o])).collect(),
    }
}

/// `E[A_i(u) B_j(v)]` for the atoms `[1, u, step, relu]` (dual.rs `atom_pair`), given
/// `sd1 = sqrt(Var u)`, `sd2`, the clamped covariance `s12`, `rho` and the arc-cosine
/// pair `pt = π - θ`, `jv = sin θ + (π - θ) cos θ`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn basis(i: usize, j: usize, sd1: f64, sd2: f64, s12: f64, rho: f64, pt: f64, jv: f64) -> f64 {
    match (i, j) {
        (0, 0) => 1.0,
        (0, 1) | (1, 0) => 0.0,
        (0, 2) | (2, 0) => 0.5,
        (0, 3) => sd2 * INV_SQRT_2PI,
        (3, 0) => sd1 * INV_SQRT_2PI,
        (1, 1) => s12,
        (1, 2) => s12 / sd2 * INV_SQRT_2PI,
        (2, 1) => s12 / sd1 * INV_SQRT_2PI,
        (1, 3) | (3, 1) => 0.5 * s12,
        (2, 2) => pt * INV_2PI,
        (2, 3) => sd2 * (1.0 + rho) * 0.5 * INV_SQRT_2PI,
        (3, 2) => sd1 * (1.0 + rho) * 0.5 * INV_SQRT_2PI,
        _ => sd1 * sd2 * jv * INV_2PI,
    }
}

/// The per-row quantities [`basis`] reads, over the rows of one strip column.
struct Arcs<'a> {
    sd1: &'a [f64],
    sd2: f64,
    s12: &'a [f64],
    rho: &'a [f64],
    pt: &'a [f64],
    jv: &'a [f64],
}

/// `o[r] = k basis(i, j)` (`SET`) or `o[r] += k basis(i, j)` over the rows, with the
/// choice of `(i, j)` made once outside the loop (so that the loop vectorizes).
#[inline(always)]
fn basis_rows<const SET: bool>(o: &mut [f64], k: f64, i: usize, j: usize, a: &Arcs<'_>) {
    #[inline(always)]
    fn run<const SET: bool>(
        o: &mut [f64],
        k: f64,
        a: &Arcs<'_>,
        f: impl Fn(&Arcs<'_>, usize) -> f64,
    ) {
        let n = o.len();
        let (sd1, s12, rho, pt, jv) = (
            &a.sd1[..n],
            &a.s12[..n],
            &a.rho[..n],
            &a.pt[..n],
            &a.jv[..n],
        );
        let b = Arcs {
            sd1,
            sd2: a.sd2,
            s12,
            rho,
            pt,
            jv,
        };
        for (r, o) in o.iter_mut().enumerate() {
            let v = k * f(&b, r);
            if SET {
                *o = v;
            } else {
                *o += v;
            }
        }
    }
    macro_rules! arms {
        ($(($x:literal, $y:literal)),*) => {
            match (i, j) {
                $(($x, $y) => run::<SET>(o, k, a, |b, r| {
                    basis($x, $y, b.sd1[r], b.sd2, b.s12[r], b.rho[r], b.pt[r], b.jv[r])
                }),)*
                _ => unreachable!("atom index out of range"),
            }
        };
    }
    arms!(
        (0, 0),
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 0),
        (1, 1),
        (1, 2),
        (1, 3),
        (2, 0),
        (2, 1),
        (2, 2),
        (2, 3),
        (3, 0),
        (3, 1),
        (3, 2),
        (3, 3)
    );
}

/// `E[f(u)]` over the atoms at `sd = sqrt(Var u)` (dual.rs `atom_mean`).
#[inline(always)]
fn mean_terms(t: &[f64; 4], sd: f64) -> f64 {
    t[0] + 0.5 * t[2] + t[3] * sd * INV_SQRT_2PI
}

/// `rho`, `π - θ`, `J` from a covariance and `n = sd1 sd2` (snapped as in dual.rs).
#[inline(always)]
fn arc(s12: f64, n: f64) -> (f64, f64, f64, f64) {
    let s12c = s12.max(-n).min(n);
    let r = s12 / n;
    let r = if r >= 1.0 - super::dual::SNAP { 1.0 } else { r };
    let rho = if r <= -1.0 + super::dual::SNAP {
        -1.0
    } else {
        r
    };
    let (jv, pt) = fastmath::arccos_pair(rho);
    (s12c, rho, pt, jv)
}

/// One kernel entry, scalar (the diagonal pass).
#[allow(clippy::needless_range_loop)]
fn kern_scalar(tf: &[f64; 4], tg: &[f64; 4], d1: f64, d2: f64, s12: f64) -> f64 {
    let (sd1, sd2) = (d1.max(0.0).sqrt(), d2.max(0.0).sqrt());
    if d1.is_nan() || d2.is_nan() {
        return f64::NAN;
    }
    let (z1, z2) = (d1 <= TINY_VAR, d2 <= TINY_VAR);
    if z1 || z2 {
        return zero_var(tf, tg, z1, z2, sd1, sd2);
    }
    let (s12c, rho, pt, jv) = arc(s12, sd1 * sd2);
    let mut v = 0.0;
    for i in 0..4 {
        for j in 0..4 {
            let c = tf[i] * tg[j];
            if c != 0.0 {
                v += c * basis(i, j, sd1, sd2, s12c, rho, pt, jv);
            }
        }
    }
    v
}

/// A kernel entry with a zero variance (dual.rs `Plan::Terms`): `f(0) E[g]`, `E[f] g(0)`
/// or `f(0) g(0)` (every atom but `1` vanishes at 0).
#[inline(always)]
fn zero_var(tf: &[f64; 4], tg: &[f64; 4], z1: bool, z2: bool, sd1: f64, sd2: f64) -> f64 {
    match (z1, z2) {
        (true, true) => tf[0] * tg[0],
        (true, false) => tf[0] * mean_terms(tg, sd2),
        _ => tg[0] * mean_terms(tf, sd1),
    }
}

/// What every tile reads.
struct Problem<'a> {
    tape: &'a Tape,
    p: usize,
    /// Inputs, each `P x d` column-major, with `d`.
    inputs: &'a [(&'a [f64], usize)],
    /// Per diagonal slot: `Var` at every point and its square root.
    dval: &'a [Vec<f64>],
    dsq: &'a [Vec<f64>],
    /// Per diagonal slot: is some variance zero (`<= TINY_VAR`)?
    dzero: &'a [bool],
    /// Per Mean node: its value at every point.
    means: &'a [Vec<f64>],
}

/// Side of a tile.
const TILE: usize = 32;

/// Columns of a tile per strip: every tape operation runs over `NC` columns at once, so
/// that its dispatch (the match, operand slices, loop set-up) is paid once per
/// `NC * TILE` entries instead of per column — with a dozen operations per layer and a
/// few flops each, that overhead was a third of the evaluator's time. A register is
/// `NC * TILE` long, column `c` at offset `c * TILE`.
const NC: usize = 4;

/// The entries a strip covers: rows `i0..`, columns `j0..j0 + nc`, and the rows of each
/// column (`ni`, or on a diagonal tile those on or above the diagonal).
#[derive(Clone, Copy)]
struct Span {
    i0: usize,
    j0: usize,
    nc: usize,
    rows: [usize; NC],
    /// Every column has `TILE` rows: elementwise operations run over whole registers.
    full: bool,
}

impl Span {
    fn new(i0: usize, j0: usize, nc: usize, ni: usize, diag_from: Option<usize>) -> Span {
        let mut rows = [0usize; NC];
        for (c, r) in rows.iter_mut().enumerate().take(nc) {
            *r = match diag_from {
                Some(jj) => (jj + c + 1).min(ni),
                None => ni,
            };
        }
        let full = nc == NC && rows.iter().all(|&r| r == TILE);
        Span {
            i0,
            j0,
            nc,
            rows,
            full,
        }
    }
}

/// `o = f(x...)` elementwise over the entries of a span: whole registers when every
/// column is full (one loop over `NC * TILE`), else column by column.
macro_rules! elementwise {
    ($sp:expr, $regs:expr, |$o:ident $(, $x:ident = [$rx:expr])*| $body:expr, $dst:expr) => {{
        let base = $regs.as_mut_ptr();
        let run = |off: usize, len: usize| {
            // SAFETY: registers are disjoint `NC * TILE`-long ranges of `regs`, `off + len`
            // stays inside one, and `dst` is never among the registers read (compile
            // allocates it before freeing the operands).
            let $o = unsafe {
                std::slice::from_raw_parts_mut(base.add($dst * NC * TILE + off), len)
            };
            $(let $x = unsafe {
                std::slice::from_raw_parts(base.add($rx * NC * TILE + off), len) as &[f64]
            };)*
            $body
        };
        if $sp.full {
            run(0, NC * TILE);
        } else {
            for c in 0..$sp.nc {
                run(c * TILE, $sp.rows[c]);
            }
        }
    }};
}

fastmath::simd_fn! {
    /// Runs the tape on the entries of `sp`: registers `regs[r * NC * TILE ..]`.
    #[allow(clippy::needless_range_loop)]
    fn strip(regs: &mut [f64], sp: Span, pb: &Problem<'_>) {
        let p = pb.p;
        let i0 = sp.i0;
        for op in &pb.tape.ops {
            match op {
                TOp::Const { dst, c } => elementwise!(sp, regs, |o| o.fill(*c), *dst),
                TOp::Gram { dst, a, b } => {
                    let (xa, d) = pb.inputs[*a];
                    let xb = pb.inputs[*b].0;
                    for c in 0..sp.nc {
                        let (rows, j) = (sp.rows[c], sp.j0 + c);
                        let o = &mut regs[(dst * NC + c) * TILE..][..rows];
                        o.fill(0.0);
                        for k in 0..d {
                            let xj = xb[k * p + j];
                            for (o, &xi) in o.iter_mut().zip(&xa[k * p + i0..k * p + i0 + rows]) {
                                *o += xi * xj;
                            }
                        }
                    }
                }
                TOp::Lin { dst, k, terms } => match terms.as_slice() {
                    [(c0, r0)] => elementwise!(
                        sp,
                        regs,
                        |o, x = [*r0]| for (o, &a) in o.iter_mut().zip(x) {
                            *o = k + c0 * a;
                        },
                        *dst
                    ),
                    [(c0, r0), (c1, r1)] => elementwise!(
                        sp,
                        regs,
                        |o, x = [*r0], y = [*r1]| for ((o, &a), &b) in o.iter_mut().zip(x).zip(y) {
                            *o = k + c0 * a + c1 * b;
                        },
                        *dst
                    ),
                    _ => {
                        let base = regs.as_mut_ptr();
                        let run = |off: usize, len: usize| {
                            // SAFETY: as in `elementwise!`.
                            let o = unsafe {
                                std::slice::from_raw_parts_mut(base.add(dst * NC * TILE + off), len)
                            };
                            o.fill(*k);
                            for &(c, r) in terms.iter() {
                                // SAFETY: as in `elementwise!`.
                                let x = unsafe {
                                    std::slice::from_raw_parts(base.add(r * NC * TILE + off), len)
                                };
                                for (o, &a) in o.iter_mut().zip(x) {
                                    *o += c * a;
                                }
                            }
                        };
                        if sp.full {
                            run(0, NC * TILE);
                        } else {
                            for c in 0..sp.nc {
                                run(c * TILE, sp.rows[c]);
                            }
                        }
                    }
                },
                TOp::Mul { dst, c, a, b } => elementwise!(
                    sp,
                    regs,
                    |o, x = [*a], y = [*b]| for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                        *o = c * x * y;
                    },
                    *dst
                ),
                TOp::Point { dst, arr, col } => {
                    let a = &pb.means[*arr];
                    for c in 0..sp.nc {
                        let rows = sp.rows[c];
                        let o = &mut regs[(dst * NC + c) * TILE..][..rows];
                        if *col {
                            o.fill(a[sp.j0 + c]);
                        } else {
                            o.copy_from_slice(&a[i0..i0 + rows]);
                        }
                    }
                }
                TOp::Kern { cc, cross, du, dv, outs, acos } => {
                    for c in 0..sp.nc {
                        let (rows, j) = (sp.rows[c], sp.j0 + c);
                        let mut s12 = [0.0f64; TILE];
                        let mut rho = [0.0f64; TILE];
                        let mut pt = [0.0f64; TILE];
                        let mut jv = [0.0f64; TILE];
                        let s12 = &mut s12[..rows];
                        let (rho, pt, jv) = (&mut rho[..rows], &mut pt[..rows], &mut jv[..rows]);
                        for (s, &x) in s12.iter_mut().zip(&regs[(cross * NC + c) * TILE..][..rows]) {
                            *s = cc * x;
                        }
                        let sd1 = &pb.dsq[*du][i0..i0 + rows];
                        let d1 = &pb.dval[*du][i0..i0 + rows];
                        let sd2 = pb.dsq[*dv][j];
                        let d2 = pb.dval[*dv][j];
                        let z2 = d2 <= TINY_VAR;
                        if *acos {
                            for r in 0..rows {
                                let (cl, ro, a, b) = arc(s12[r], sd1[r] * sd2);
                                s12[r] = cl;
                                rho[r] = ro;
                                pt[r] = a;
                                jv[r] = b;
                            }
                        } else {
                            for r in 0..rows {
                                let n = sd1[r] * sd2;
                                let cl = s12[r].max(-n).min(n);
                                rho[r] = s12[r] / n;
                                s12[r] = cl;
                            }
                        }
                        for out in outs {
                            let o = &mut regs[(out.dst * NC + c) * TILE..][..rows];
                            let a = Arcs { sd1, sd2, s12, rho, pt, jv };
                            match out.terms.as_slice() {
                                &[(i, jj, k)] => basis_rows::<true>(o, k, i, jj, &a),
                                terms => {
                                    o.fill(0.0);
                                    for &(i, jj, k) in terms {
                                        basis_rows::<false>(o, k, i, jj, &a);
                                    }
                                }
                            }
                            if z2 || pb.dzero[*du] {
                                for r in 0..rows {
                                    let z1 = d1[r] <= TINY_VAR;
                                    if z1 || z2 {
                                        o[r] = zero_var(&out.tf, &out.tg, z1, z2, sd1[r], sd2);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A raw pointer the tile tasks share; see [`tiles`] for why their writes are disjoint.
struct Shared(*mut f64);
// SAFETY: only used as described in `tiles`, where no two tasks touch one entry.
unsafe impl Sync for Shared {}

/// Every tile `(I, J)`, `I <= J`, in parallel: the tape on each column strip, then the
/// results of every ordered output pair `(a, b)` written to rows `a P + i`, columns
/// `b P + j` and transposed to rows `b P + j`, columns `a P + i`. False if a value is
/// not finite.
fn tiles(nngp: &mut [f64], ntk: Option<&mut [f64]>, o: usize, pb: &Problem<'_>) -> bool {
    let p = pb.p;
    let big = o * p;
    assert_eq!(nngp.len(), big * big);
    let nb = p.div_ceil(TILE);
    let list: Vec<(usize, usize)> = (0..nb).flat_map(|j| (0..=j).map(move |i| (i, j))).collect();
    let kp = Shared(nngp.as_mut_ptr());
    let tp = ntk.map(|t| {
        assert_eq!(t.len(), big * big);
        Shared(t.as_mut_ptr())
    });
    let (kp, tp) = (&kp, &tp);
    let pairs = o * o;
    // Tile (I, J) writes, within every output block pair, point blocks (I, J) and
    // (J, I) only; distinct tiles have distinct block pairs, so writes never overlap.
    // Scratch (registers, the tile's results) allocated once per rayon job, not per tile.
    let init = || {
        (
            vec![0.0f64; pb.tape.nreg.max(1) * NC * TILE],
            vec![0.0f64; pairs * TILE * TILE],
            vec![0.0f64; if tp.is_some() { pairs * TILE * TILE } else { 0 }],
        )
    };
    list.par_iter()
        .map_init(init, |(regs, kb, tb), &(bi, bj)| {
            let (i0, j0) = (bi * TILE, bj * TILE);
            let (ni, nj) = ((p - i0).min(TILE), (p - j0).min(TILE));
            let diag = bi == bj;
            let mut ok = true;
            for jc in (0..nj).step_by(NC) {
                let sp = Span::new(i0, j0 + jc, NC.min(nj - jc), ni, diag.then_some(jc));
                strip(regs, sp, pb);
                for c in 0..sp.nc {
                    let (jj, rows) = (jc + c, sp.rows[c]);
                    for k in 0..pairs {
                        let src = &regs[(pb.tape.nngp[k] * NC + c) * TILE..][..rows];
                        ok &= src.iter().all(|v| v.is_finite());
                        kb[k * TILE * TILE + jj * TILE..][..rows].copy_from_slice(src);
                        if let Some(r) = pb.tape.ntk[k] {
                            if tp.is_some() {
                                let src = &regs[(r * NC + c) * TILE..][..rows];
                                ok &= src.iter().all(|v| v.is_finite());
                                tb[k * TILE * TILE + jj * TILE..][..rows].copy_from_slice(src);
                            }
                        }
                    }
                }
            }
            if !ok {
                return false;
            }
            for (buf, ptr) in [(&*kb, Some(kp)), (&*tb, tp.as_ref())] {
                let Some(ptr) = ptr else { continue };
                for a in 0..o {
                    for b in 0..o {
                        let blk = &buf[(a * o + b) * TILE * TILE..][..TILE * TILE];
                        let (ro, co) = (a * p, b * p);
                        for jj in 0..nj {
                            let rows = if diag { jj + 1 } else { ni };
                            // SAFETY: rows ro+i0.., column co+j0+jj: inside the matrix, in
                            // this tile's block (see above).
                            unsafe {
                                std::slice::from_raw_parts_mut(
                                    ptr.0.add(ro + i0 + (co + j0 + jj) * big),
                                    rows,
                                )
                                .copy_from_slice(&blk[jj * TILE..jj * TILE + rows]);
                            }
                        }
                        // transpose: entry (i, j) also at (co + j, ro + i), along column ro + i
                        for ii in 0..ni {
                            let from = if diag { ii } else { 0 };
                            if from >= nj {
                                continue;
                            }
                            // SAFETY: column ro+i0+ii, rows co+j0+from..co+j0+nj: in block (J, I).
                            let c = unsafe {
                                std::slice::from_raw_parts_mut(
                                    ptr.0.add(co + j0 + from + (ro + i0 + ii) * big),
                                    nj - from,
                                )
                            };
                            for (k, jj) in (from..nj).enumerate() {
                                c[k] = blk[ii + jj * TILE];
                            }
                        }
                    }
                }
            }
            true
        })
        .all(|ok| ok)
}

/// The general engine's kernels by the fused tape, or None when the program needs
/// something the tape does not express (the caller then runs the block engine). The
/// numbers agree with the block engine's to rounding; methods and the stated error are
/// the engine's.
pub fn limit_fused(prog: &Program, der: &Derivation, points: &[Vec<f64>]) -> Option<LimitResult> {
    if !prog.observes.is_empty() || der.has_transpose || prog.outputs.is_empty() {
        return None;
    }
    if der
        .gauss
        .iter()
        .any(|g| matches!(g.kind, GaussKind::Scaled { .. } | GaussKind::Point { .. }))
    {
        return None;
    }
    let mut b = Builder {
        prog,
        der,
        nodes: Vec::new(),
        index: HashMap::new(),
        forms: Vec::new(),
        lcov: HashMap::new(),
        vv: HashMap::new(),
        tg: HashMap::new(),
        tv: HashMap::new(),
        notes: Vec::new(),
        weight: 1.0,
    };
    let o = prog.outputs.len();
    let mut kout = Vec::with_capacity(o * o);
    let mut tout = Vec::with_capacity(o * o);
    for &oa in &prog.outputs {
        for &ob in &prog.outputs {
            let (k, t) = b.output_pair(oa, ob, true).ok()?;
            kout.push(k);
            tout.push(t);
        }
    }
    let nodes = b.nodes;
    let p = points.len();
    let ivals = super::input_values(prog, points);
    // Diagonal slots and mean arrays.
    let mut diag_slot: HashMap<usize, usize> = HashMap::new();
    let mut mean_slot: HashMap<usize, usize> = HashMap::new();
    let mut diag_nodes = Vec::new();
    let mut mean_nodes = Vec::new();
    for (i, nd) in nodes.iter().enumerate() {
        match nd {
            Node::Kern { du, dv, .. } => {
                for d in [*du, *dv] {
                    diag_slot.entry(d).or_insert_with(|| {
                        diag_nodes.push(d);
                        diag_nodes.len() - 1
                    });
                }
            }
            Node::Mean { d, .. } => {
                mean_slot.insert(i, mean_nodes.len());
                mean_nodes.push(i);
                diag_slot.entry(*d).or_insert_with(|| {
                    diag_nodes.push(*d);
                    diag_nodes.len() - 1
                });
            }
            _ => {}
        }
    }
    // The diagonal pass: at (p, p), the nodes the variances and means depend on (not the
    // tangent kernels), in parallel over points.
    let mut dneed = vec![false; nodes.len()];
    for &d in diag_nodes.iter().chain(&mean_nodes) {
        dneed[d] = true;
    }
    for i in (0..nodes.len()).rev() {
        if dneed[i] {
            match &nodes[i] {
                Node::Lin(ts, _) => ts.iter().for_each(|t| dneed[t.1] = true),
                Node::Mul(a, c) => {
                    dneed[*a] = true;
                    dneed[*c] = true;
                }
                Node::Kern { du, dv, cross, .. } => {
                    for k in [*du, *dv, *cross] {
                        dneed[k] = true;
                    }
                }
                Node::Mean { d, .. } => dneed[*d] = true,
                _ => {}
            }
        }
    }
    let dlist: Vec<usize> = (0..nodes.len()).filter(|&i| dneed[i]).collect();
    let diag_vals: Vec<(Vec<f64>, Vec<f64>)> = (0..p)
        .into_par_iter()
        .map(|pt| {
            let mut v = vec![0.0f64; nodes.len()];
            for &i in &dlist {
                let nd = &nodes[i];
                v[i] = match nd {
                    Node::Const(c) => *c,
                    Node::Gram(a, b) => {
                        let (xa, xb) = (&ivals[a], &ivals[b]);
                        let mut g = 0.0;
                        for k in 0..xa.ncols() {
                            g += xa[(pt, k)] * xb[(pt, k)];
                        }
                        g
                    }
                    Node::Lin(ts, k) => ts.iter().fold(*k, |acc, &(c, s)| acc + c * v[s]),
                    Node::Mul(a, b) => v[*a] * v[*b],
                    Node::Kern {
                        tf,
                        tg,
                        du,
                        dv,
                        cross,
                    } => kern_scalar(tf, tg, v[*du], v[*dv], v[*cross]),
                    Node::Mean { tf, d, .. } => {
                        let s = v[*d];
                        if !s.is_finite() {
                            f64::NAN
                        } else if s <= TINY_VAR {
                            tf[0]
                        } else {
                            mean_terms(tf, s.sqrt())
                        }
                    }
                };
            }
            (
                diag_nodes.iter().map(|&d| v[d]).collect(),
                mean_nodes.iter().map(|&m| v[m]).collect(),
            )
        })
        .collect();
    let mut dval = vec![vec![0.0; p]; diag_nodes.len()];
    let mut means = vec![vec![0.0; p]; mean_nodes.len()];
    for (pt, (d, m)) in diag_vals.iter().enumerate() {
        for (s, &x) in d.iter().enumerate() {
            dval[s][pt] = x;
        }
        for (s, &x) in m.iter().enumerate() {
            means[s][pt] = x;
        }
    }
    drop(diag_vals);
    if dval.iter().chain(&means).flatten().any(|x| !x.is_finite()) {
        return None;
    }
    let dsq: Vec<Vec<f64>> = dval
        .iter()
        .map(|d| d.iter().map(|&v| v.max(0.0).sqrt()).collect())
        .collect();
    let dzero: Vec<bool> = dval
        .iter()
        .map(|d| d.iter().any(|&v| v <= TINY_VAR))
        .collect();
    // Methods and stated errors, as the engine states them.
    let vmax_of = |d: usize| dval[diag_slot[&d]].iter().fold(0.0f64, |m, &x| m.max(x));
    let mut methods = std::collections::BTreeSet::new();
    let mut max_error = 0.0f64;
    for nt in &b.notes {
        let (method, err) = match nt {
            Note::Pair(f, g, du, dv, w) => {
                let k = PairKernel::new(f, g, vmax_of(*du).max(vmax_of(*dv)).max(1e-3), TOL);
                (k.method(), w * k.error_bound())
            }
            Note::Mean(f, d, w) => {
                let k = MeanKernel::new(f, vmax_of(*d).max(1e-3), TOL);
                (k.method(), w * k.error_bound())
            }
        };
        methods.insert(method.to_string());
        max_error = max_error.max(err);
    }
    let inputs_slot: HashMap<NodeId, usize> =
        ivals.keys().enumerate().map(|(i, &k)| (k, i)).collect();
    let mut in_list: Vec<(&[f64], usize)> = vec![(&[], 0); inputs_slot.len()];
    for (k, &i) in &inputs_slot {
        in_list[i] = (ivals[k].as_slice(), ivals[k].ncols());
    }
    let tape = compile(&nodes, &kout, &diag_slot, &mean_slot, &inputs_slot, &tout);
    let pb = Problem {
        tape: &tape,
        p,
        inputs: &in_list,
        dval: &dval,
        dsq: &dsq,
        dzero: &dzero,
        means: &means,
    };
    let big = o * p;
    let mut nngp = DMatrix::from_vec(big, big, fastmath::huge_zeros(big * big));
    let mut ntk = DMatrix::from_vec(big, big, fastmath::huge_zeros(big * big));
    if !tiles(nngp.as_mut_slice(), Some(ntk.as_mut_slice()), o, &pb) {
        return None;
    }
    Some(LimitResult {
        outputs: prog.output_names(),
        points: if prog.inputs.is_empty() {
            Vec::new()
        } else {
            points.to_vec()
        },
        nngp: Some(nngp),
        nngp_note: None,
        ntk: Some(ntk),
        ntk_note: None,
        observe: Vec::new(),
        methods: methods.into_iter().collect(),
        max_error,
        qmc_3sigma: None,
        regime: crate::scaling::regime(prog).map(|r| r.name().to_string()),
        train: None,
    })
}
