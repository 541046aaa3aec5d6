//! Numerics of the limit over all input points at once.
//!
//! Every quantity is a P x P block over the points: the covariance of two base
//! Gaussians, of two linear forms, or `E[Z^x Z^y]` of two vectors; never P^2 separate
//! scalar programs. Blocks are memoized, and dropped as soon as the last quantity that
//! reads them is done (reference counts from a dry run), so a deep MLP holds a few
//! blocks at a time rather than one per layer.
//!
//! The NTK uses forward-mode tangent kernels under gradient independence (theory.md
//! §2.2–2.3): `T(g, g')` for base Gaussians and `T(x, y)` for vectors, each carrying an
//! exponent of n, since under muP individual contributions are Θ(n) and only the
//! readout brings them back to Θ(1). Summing the contributions layer by layer is the
//! backward formula of §2.3 read in the other order (Horner's rule), which needs only
//! the current layer's blocks.

use std::collections::{BTreeSet, HashMap};

use nalgebra::{DMatrix, DVector};

use super::dual::{MeanKernel, PairKernel};
use super::gauss;
use super::zform::{
    Atom, Derivation, GaussId, GaussKind, LinForm, MomentLimit, PointScalar, ZForm,
};
use crate::ir::{Expr, Monomial, NodeId, Op, Program, Rational};

mod groups;
mod point;
mod tangent;

pub(crate) use groups::independent_groups;
use groups::*;
pub(super) use groups::{factors, product, restrict, sum_terms_of};

/// A block with an exponent of n: the quantity is `m * n^exp` to leading order.
#[derive(Clone, Debug)]
pub struct Scaled {
    pub m: DMatrix<f64>,
    pub exp: Rational,
}

impl Scaled {
    fn zero(p: usize) -> Scaled {
        Scaled {
            m: DMatrix::zeros(p, p),
            exp: Rational::ZERO,
        }
    }
    /// Leading-order sum: the term with the larger exponent wins.
    fn add(self, o: Scaled) -> Scaled {
        if o.m.iter().all(|v| *v == 0.0) {
            return self;
        }
        if self.m.iter().all(|v| *v == 0.0) {
            return o;
        }
        match self.exp.cmp(&o.exp) {
            std::cmp::Ordering::Less => o,
            std::cmp::Ordering::Greater => self,
            std::cmp::Ordering::Equal => Scaled {
                m: self.m + o.m,
                exp: self.exp,
            },
        }
    }
    /// `self + o` to leading order.
    pub fn plus(self, o: Scaled) -> Scaled {
        self.add(o)
    }
    /// `self * c` for a monomial c.
    pub fn mul_mono(self, c: Monomial) -> Scaled {
        self.times(c)
    }
    fn times(mut self, c: Monomial) -> Scaled {
        self.m *= c.coef;
        self.exp = self.exp + c.exp;
        self
    }
}

/// A memo table whose entries are dropped at their last use.
///
/// Why: a depth-L network has O(L) blocks of P x P numbers, but each is read only by
/// the next layer. A dry run of the same computation at P = 0 (which costs nothing)
/// counts how often each block is looked up; the real run then hands the block out by
/// value at its last lookup and forgets it, so memory follows the live blocks only.
struct Memo<K, V> {
    map: HashMap<K, V>,
    /// Remaining lookups per key (None during the dry run: count instead).
    left: Option<HashMap<K, usize>>,
    counts: HashMap<K, usize>,
    /// Real-run lookups the dry run did not count: each one recomputes its block (and
    /// everything below it) without a memo, exponential in depth when it nests, so
    /// there must be none (`Engine::stray_lookups`).
    strays: usize,
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> Memo<K, V> {
    fn new() -> Self {
        Memo {
            map: HashMap::new(),
            left: None,
            counts: HashMap::new(),
            strays: 0,
        }
    }
    /// Looks a key up, counting (dry run) or consuming one use (real run).
    fn take(&mut self, k: &K) -> Option<V> {
        match &mut self.left {
            None => {
                *self.counts.entry(k.clone()).or_insert(0) += 1;
                self.map.get(k).cloned()
            }
            Some(left) => {
                let Some(n) = left.get_mut(k) else {
                    self.strays += 1;
                    return None;
                };
                *n = n.saturating_sub(1);
                if *n == 0 {
                    left.remove(k);
                    self.map.remove(k)
                } else {
                    self.map.get(k).cloned()
                }
            }
        }
    }
    /// Stores a freshly computed value that has just been used once.
    fn put(&mut self, k: K, v: &V) {
        match &mut self.left {
            None => {
                *self.counts.entry(k.clone()).or_insert(0) += 0;
                self.map.insert(k, v.clone());
            }
            Some(left) => {
                if left.get(&k).is_some_and(|n| *n > 0) {
                    self.map.insert(k, v.clone());
                }
            }
        }
    }
    /// Stores a value computed ahead of its uses (does not consume one).
    fn warm(&mut self, k: K, v: V) {
        if self
            .left
            .as_ref()
            .is_some_and(|l| l.get(&k).is_some_and(|n| *n > 0))
        {
            self.map.insert(k, v);
        }
    }
    fn has(&self, k: &K) -> bool {
        self.map.contains_key(k)
    }
    /// Keys looked up during the dry run.
    fn keys(&self) -> Vec<K> {
        match &self.left {
            None => self.counts.keys().cloned().collect(),
            Some(l) => l.keys().cloned().collect(),
        }
    }
    /// Ends the dry run: the counts become the uses left.
    fn arm(&mut self) {
        self.map.clear();
        self.left = Some(std::mem::take(&mut self.counts));
    }
}

/// Accuracy target of quadrature (absolute, relative to max(1, |value|)).
pub const TOL: f64 = 1e-11;

/// (f, g, interned form of u, interned form of v) of a memoized kernel block.
type BlockKey = (String, String, usize, usize);

/// Memory allowed for the memo of kernel blocks (`Engine::blocks`).
const BLOCK_MEMO_BYTES: usize = 64 << 20;

/// The numerical engine for one program on one set of points.
pub struct Engine<'a> {
    prog: &'a Program,
    der: &'a Derivation,
    pub p: usize,
    /// P x d values of each `Input` node.
    inputs: HashMap<NodeId, DMatrix<f64>>,
    /// Interned linear forms.
    forms: Vec<LinForm>,
    lcov: Memo<(usize, usize), DMatrix<f64>>,
    vv: Memo<(NodeId, NodeId), DMatrix<f64>>,
    tg: Memo<(GaussId, GaussId), Scaled>,
    tv: Memo<(NodeId, NodeId), Scaled>,
    kernels: HashMap<(String, String), (PairKernel, f64)>,
    /// Blocks of 2-D kernel expectations already computed in the real run, keyed by
    /// (f, g, form of u, form of v), with their stated error: the recursions ask for the
    /// same `E[f(u_p) g(v_q)]` block several times and in both orders (issue 13: 1180
    /// requests for 420 distinct blocks on a T = 20 RNN). Bounded by [`BLOCK_MEMO_BYTES`].
    blocks: HashMap<BlockKey, (DMatrix<f64>, f64)>,
    blocks_bytes: usize,
    /// How the numbers were computed, for the report.
    pub methods: BTreeSet<String>,
    /// Largest stated error of any expectation used (absolute).
    pub max_error: f64,
    /// QMC methods with their largest stated (3σ) error.
    qmc: std::collections::BTreeMap<String, f64>,
    seed: u64,
    /// The point-dependent Ż coefficients `s(ξ)` ([`zform::Scale`]) with their stated
    /// errors, computed once per run (cleared by [`Engine::arm`]).
    scales: HashMap<usize, (DVector<f64>, f64)>,
    /// The values of the 1/√n logits (random in the limit) at every point, for one
    /// sample of them ([`super::random_logits`]); None in programs without them.
    pub logit_values: Option<Vec<DVector<f64>>>,
}

/// An error in evaluating the limit (non-finite numbers).
#[derive(Debug, Clone)]
pub struct NumError(pub String);

impl std::fmt::Display for NumError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NumError {}

type R<T> = Result<T, NumError>;

impl<'a> Engine<'a> {
    pub fn new(
        prog: &'a Program,
        der: &'a Derivation,
        p: usize,
        inputs: HashMap<NodeId, DMatrix<f64>>,
    ) -> Engine<'a> {
        Engine {
            prog,
            der,
            p,
            inputs,
            forms: Vec::new(),
            lcov: Memo::new(),
            vv: Memo::new(),
            tg: Memo::new(),
            tv: Memo::new(),
            kernels: HashMap::new(),
            blocks: HashMap::new(),
            blocks_bytes: 0,
            methods: BTreeSet::new(),
            max_error: 0.0,
            qmc: std::collections::BTreeMap::new(),
            seed: 0x7bc_2024,
            scales: HashMap::new(),
            logit_values: None,
        }
    }

    /// Switches from the dry run (P = 0, counting lookups) to the real run on `p` points.
    pub fn arm(&mut self, p: usize, inputs: HashMap<NodeId, DMatrix<f64>>) {
        self.p = p;
        self.inputs = inputs;
        self.scales.clear();
        self.blocks.clear();
        self.blocks_bytes = 0;
        self.lcov.arm();
        self.vv.arm();
        self.tg.arm();
        self.tv.arm();
    }

    /// Computes the vector blocks of the real run in topological order: for each node,
    /// its `E[Z Z']` blocks, then its tangent blocks. Each layer then reads only the
    /// previous layer's blocks, which are freed as soon as it is done.
    /// A block that cannot be computed names the vector it belongs to (the later of the
    /// pair), which the caller reports at that node's span.
    pub fn warm_up(&mut self) -> Result<(), (NodeId, NumError)> {
        let mut keys: Vec<(NodeId, u8, NodeId, NodeId)> = self
            .vv
            .keys()
            .into_iter()
            .map(|(a, b)| (b.max(a), 0, a, b))
            .collect();
        keys.extend(self.tv.keys().into_iter().map(|(a, b)| (b.max(a), 1, a, b)));
        keys.sort();
        for (_, kind, a, b) in keys {
            let at = |e: NumError| (a.max(b), e);
            if kind == 0 {
                if !self.vv.has(&(a, b)) {
                    let (za, zb) = (self.zf(a).map_err(at)?, self.zf(b).map_err(at)?);
                    let m = self.zz(&za, &zb, a == b).map_err(at)?;
                    self.vv.warm((a, b), m);
                }
            } else if !self.tv.has(&(a, b)) {
                let t = self.tnode(a, b).map_err(at)?;
                self.tv.warm((a, b), t);
            }
        }
        Ok(())
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

    /// Lookups of the real run that the dry run did not count (see `Memo`); zero
    /// whenever every lookup is made independently of the number of points.
    pub fn stray_lookups(&self) -> usize {
        self.lcov.strays + self.vv.strays + self.tg.strays + self.tv.strays
    }

    // ---- covariances ------------------------------------------------------------

    /// The Ż coefficient `s(ξ_p) = σ² E[∂Z^x/∂Ẑ^{W y}(ξ_p)]` at every point (theory.md
    /// §2.1), with its stated absolute error.
    fn scale(&mut self, k: usize) -> R<(DVector<f64>, f64)> {
        if let Some(s) = self.scales.get(&k) {
            return Ok(s.clone());
        }
        let sc = &self.der.scales[k];
        if let Some(ps) = sc.netsor.clone() {
            let out = self.point_scalar(&ps)?;
            self.scales.insert(k, out.clone());
            return Ok(out);
        }
        let (d, s2, stein) = (sc.d.clone(), sc.sigma2, sc.stein.clone());
        let (mut m, mut e) = self.scoped(|s| s.zmean(&d))?;
        // Stein's lemma for atoms with a jump: E[f'(L)] = E[L f(L)] / Var(L).
        for (c, at) in &stein {
            let lf = Atom {
                f: Expr::mul(Expr::Arg(0), at.f.clone()),
                args: at.args.clone(),
            };
            let (num, en) = self.scoped(|s| s.atom_mean(&lf))?;
            let var = self.lcov(&at.args[0], &at.args[0])?.diagonal();
            for i in 0..self.p {
                if var[i] <= 0.0 {
                    return Err(NumError(
                        "a Ż coefficient E[∂step(L)/∂Ẑ] has a Gaussian L of variance 0 at a point: \
                         the Dirac delta of the jump has no finite expectation"
                            .into(),
                    ));
                }
                m[i] += c * num[i] / var[i];
                e += c.abs() * en / var[i];
            }
        }
        let out = (m * s2, e * s2.abs());
        if out.0.iter().any(|v| !v.is_finite()) {
            return Err(NumError(
                "a Ż coefficient E[∂Z/∂Ẑ] is not finite (overflow or NaN in the limit)".into(),
            ));
        }
        self.scales.insert(k, out.clone());
        Ok(out)
    }

    /// A Netsor+ per-point scalar (theory.md §1.1, `limit::netsor`): a moment's limit
    /// `E[Z(ξ_p)]` from the one-point law, or a function of such values, with its stated
    /// absolute error (for a function, the largest change when every argument moves by
    /// its own error).
    fn point_scalar(&mut self, ps: &PointScalar) -> R<(DVector<f64>, f64)> {
        let out = match ps {
            PointScalar::Moment { z, .. } => self.scoped(|s| s.zmean(z))?,
            PointScalar::Logit { slot, .. } => match &self.logit_values {
                Some(v) if self.p == 0 => (DVector::zeros(0), 0.0 * v.len() as f64),
                Some(v) => (
                    v.get(*slot)
                        .cloned()
                        .ok_or_else(|| NumError("a random logit without a value".into()))?,
                    0.0,
                ),
                None => {
                    return Err(NumError(
                        "a 1/√n logit is random in the limit; its value is given per sample                          (limit::random_logits)"
                            .into(),
                    ))
                }
            },
            PointScalar::Func { f, args } => {
                let mut vals = Vec::with_capacity(args.len());
                for &a in args {
                    vals.push(self.scale(a)?);
                }
                let mut out = DVector::zeros(self.p);
                let mut err: f64 = 0.0;
                for i in 0..self.p {
                    let x: Vec<f64> = vals.iter().map(|v| v.0[i]).collect();
                    let y = f.eval(&x);
                    for sign in [-1.0, 1.0] {
                        let xe: Vec<f64> = vals.iter().map(|v| v.0[i] + sign * v.1).collect();
                        err = err.max((f.eval(&xe) - y).abs());
                    }
                    out[i] = y;
                }
                (out, err)
            }
        };
        if let Some(i) = out.0.iter().position(|v| !v.is_finite()) {
            return Err(NumError(format!(
                "a per-point scalar (the limit of a moment, or a function of such limits) is not \
                 finite at point {} ({}: overflow, NaN, or a function outside its domain such as \
                 sqrt of a negative number)",
                i + 1,
                out.0[i]
            )));
        }
        if !out.1.is_finite() {
            return Err(NumError(
                "the stated error of a per-point scalar (the limit of a moment) is not finite"
                    .into(),
            ));
        }
        Ok(out)
    }

    /// The limit of a moment node at every point (its stated error joins `max_error`).
    pub fn moment_values(&mut self, m: NodeId) -> R<DVector<f64>> {
        match self.der.moments.get(m.index()).and_then(|x| x.as_ref()) {
            Some((MomentLimit::Const(c), _)) => Ok(DVector::from_element(self.p, *c)),
            Some((MomentLimit::Observed, z)) => {
                let z = z.clone();
                self.zmean(&z)
            }
            Some((MomentLimit::Point(g), _)) => {
                let GaussKind::Point { scale } = self.der.gauss[*g].kind else {
                    return Err(NumError("a moment's limit is not a point value".into()));
                };
                let (v, e) = self.scale(scale)?;
                self.note_err(e);
                Ok(v)
            }
            None => Err(NumError(format!(
                "`{}` is not a moment with a limit",
                self.prog.label(m)
            ))),
        }
    }

    /// `Cov(G_j(xi_p), G_k(xi_q))`, or None when independent.
    fn gcov(&mut self, j: GaussId, k: GaussId) -> R<Option<DMatrix<f64>>> {
        let (gj, gk) = (&self.der.gauss[j], &self.der.gauss[k]);
        // Odd and even Gaussians of a backward pass are independent (zform::Gauss::odd).
        if gj.family() != gk.family() || gj.odd != gk.odd {
            return Ok(None);
        }
        // A Gaussian times a point-dependent coefficient (a Ż term through a
        // nonlinearity): Cov(s G, s' G') = s(ξ_p) s'(ξ_q) Cov(G, G'); the coefficients'
        // stated errors propagate as |Δ(s s' c)| ≤ (|Δs||s'| + |s||Δs'| + |Δs||Δs'|)|c|.
        let split = |kind: &GaussKind, g: GaussId| match kind {
            GaussKind::Scaled { base, scale, .. } => (*base, Some(*scale)),
            _ => (g, None),
        };
        let ((bj, sj), (bk, sk)) = (split(&gj.kind, j), split(&gk.kind, k));
        if sj.is_some() || sk.is_some() {
            let Some(mut c) = self.gcov(bj, bk)? else {
                return Ok(None);
            };
            let p = self.p;
            let one = (DVector::from_element(p, 1.0), 0.0);
            let (vj, ej) = match sj {
                Some(s) => self.scale(s)?,
                None => one.clone(),
            };
            let (vk, ek) = match sk {
                Some(s) => self.scale(s)?,
                None => one,
            };
            let err = (ej * vk.amax() + vj.amax() * ek + ej * ek) * c.amax();
            for q in 0..c.ncols() {
                for r in 0..c.nrows() {
                    c[(r, q)] *= vj[r] * vk[q];
                }
            }
            self.note_err(err);
            return Ok(Some(c));
        }
        let p = self.p;
        Ok(Some(match (&gj.kind, &gk.kind) {
            (GaussKind::Initial { var, .. }, _) => DMatrix::from_element(p, p, *var),
            (
                GaussKind::InputLayer { input: a, var, .. },
                GaussKind::InputLayer { input: b, .. },
            ) => {
                let (xa, xb) = (&self.inputs[a], &self.inputs[b]);
                (xa * xb.transpose()) * *var
            }
            (GaussKind::Hat { arg: a, sigma2, .. }, GaussKind::Hat { arg: b, .. }) => {
                let s2 = *sigma2;
                self.vv(*a, *b)? * s2
            }
            _ => return Ok(None),
        }))
    }

    /// `Cov(L(xi_p), M(xi_q))` of two linear forms.
    fn lcov(&mut self, l: &LinForm, m: &LinForm) -> R<DMatrix<f64>> {
        let (a, b) = (self.intern(l), self.intern(m));
        let key = if a <= b { (a, b) } else { (b, a) };
        let out = match self.lcov.take(&key) {
            Some(c) => c,
            None => {
                let mut out: Option<DMatrix<f64>> = None;
                for &(j, cj) in &l.0 {
                    for &(k, ck) in &m.0 {
                        if let Some(c) = self.gcov(j, k)? {
                            let c = c * (cj * ck);
                            out = Some(match out {
                                None => c,
                                Some(o) => o + c,
                            });
                        }
                    }
                }
                let out = out.unwrap_or_else(|| DMatrix::zeros(self.p, self.p));
                check(&out, "a covariance")?;
                let out = if a <= b { out } else { out.transpose() };
                self.lcov.put(key, &out);
                out
            }
        };
        Ok(if a <= b { out } else { out.transpose() })
    }

    // ---- expectations -------------------------------------------------------------

    /// `E[Z^x(xi_p) Z^y(xi_q)]` for two vector nodes.
    pub fn vv(&mut self, x: NodeId, y: NodeId) -> R<DMatrix<f64>> {
        let (a, b, flip) = if x <= y { (x, y, false) } else { (y, x, true) };
        let m = match self.vv.take(&(a, b)) {
            Some(m) => m,
            None => {
                let (za, zb) = (self.zf(a)?, self.zf(b)?);
                let m = self.zz(&za, &zb, a == b)?;
                self.vv.put((a, b), &m);
                m
            }
        };
        Ok(if flip { m.transpose() } else { m })
    }

    fn zf(&self, x: NodeId) -> R<ZForm> {
        self.der
            .zform(x)
            .cloned()
            .ok_or_else(|| NumError(format!("`{}` has no Z", self.prog.label(x))))
    }

    /// `E[Z_a(xi_p) Z_b(xi_q)]` for two Z forms.
    pub fn zz(&mut self, za: &ZForm, zb: &ZForm, symmetric: bool) -> R<DMatrix<f64>> {
        let mut out: Option<DMatrix<f64>> = None;
        let (ta, tb) = (za.terms(), zb.terms());
        for (ca, a) in &ta {
            for (cb, b) in &tb {
                let blk = self.atom_pair(a, b, symmetric && ta == tb)? * (ca * cb);
                out = Some(match out {
                    None => blk,
                    Some(o) => o + blk,
                });
            }
        }
        let out = out.unwrap_or_else(|| DMatrix::zeros(self.p, self.p));
        check(&out, "an expectation")?;
        Ok(out)
    }

    /// Per-point mean `E[Z(xi_p)]`.
    pub fn zmean(&mut self, z: &ZForm) -> R<DVector<f64>> {
        let mut out = DVector::from_element(self.p, 0.0);
        for (c, a) in z.terms() {
            out += self.atom_mean(&a)? * c;
        }
        Ok(out)
    }

    fn atom_mean(&mut self, a: &Atom) -> R<DVector<f64>> {
        let p = self.p;
        if self.has_point(a)? {
            return self.point_mean(a);
        }
        match a.args.len() {
            0 => Ok(DVector::from_element(p, a.f.eval(&[]))),
            1 => {
                let d = self.lcov(&a.args[0], &a.args[0])?.diagonal();
                let k = MeanKernel::new(&a.f, d.max().max(1e-3), TOL);
                self.note(k.method().to_string(), k.error_bound());
                Ok(DVector::from_iterator(p, d.iter().map(|&s| k.eval(s))))
            }
            m if quadratic(&a.f, m) => {
                // E[f(L)] = f(0) + ½ Σ_ij ∂_i∂_j f · Cov(L_i, L_j) for a polynomial f of
                // degree ≤ 2 in centered Gaussians: exact, where a quadrature rule
                // would see `Cov(L_i, L_j)` only through an eigendecomposition whose
                // rounding is relative to the largest variance (random-matrix moments
                // such as `mean(x[0] * x[60])` span 30 orders of magnitude).
                let zero = vec![0.0; m];
                let mut out = DVector::from_element(p, a.f.eval(&zero));
                // Rounding of the sum, stated like the 1-d closed forms (dual::MeanKernel).
                let mut size = out.amax();
                for i in 0..m {
                    let di = a.f.diff(i);
                    for j in i..m {
                        let h = di.diff(j).eval(&zero);
                        if h == 0.0 {
                            continue;
                        }
                        let c = self.lcov(&a.args[i], &a.args[j])?.diagonal();
                        // The pair (i, j) and (j, i) for i ≠ j; ½ for i = j.
                        let term = c * if i == j { 0.5 * h } else { h };
                        size += term.amax();
                        out += term;
                    }
                }
                self.note(
                    gauss::Method::ClosedForm(gauss::Families::LINEAR).to_string(),
                    64.0 * f64::EPSILON * size.max(1.0),
                );
                Ok(out)
            }
            _ => {
                let ra = restrict(&a.f, &a.args);
                if ra.args.len() < a.args.len() {
                    return self.atom_mean(&ra);
                }
                if let Some(m) = self.split_mean(a)? {
                    return Ok(m);
                }
                let mut out = DVector::zeros(p);
                let blocks = self.joint_blocks(&a.args, &[])?;
                for i in 0..p {
                    let cov = joint_cov(&blocks, a.args.len(), a.args.len(), i, i);
                    let est = self.expect(&a.f, &cov);
                    self.note(est.method.to_string(), est.error);
                    out[i] = est.value;
                }
                Ok(out)
            }
        }
    }

    /// The P x P covariance blocks of every pair among `[L_1 .. L_m, M_1 .. M_k]`
    /// (upper triangle, row-major), for [`joint_cov`] to read point pairs from.
    ///
    /// Why blocks, once, rather than per point pair: the memo tables learn their use
    /// counts from a dry run at P = 0 ([`Memo`]), so every lookup must happen the same
    /// number of times whatever P is. A lookup made once per point pair is never made in
    /// the dry run; in the real run its block (and, recursively, every block it reads)
    /// was already freed and is recomputed without a memo — exponential in the depth of
    /// a program with W and W.T (issue 12: `semicircle.tp` to k = 16).
    fn joint_blocks(&mut self, la: &[LinForm], lb: &[LinForm]) -> R<Vec<DMatrix<f64>>> {
        let all: Vec<&LinForm> = la.iter().chain(lb).collect();
        let k = all.len();
        let mut out = Vec::with_capacity(k * (k + 1) / 2);
        for i in 0..k {
            for j in i..k {
                out.push(self.lcov(all[i], all[j])?);
            }
        }
        Ok(out)
    }

    fn atom_pair(&mut self, a: &Atom, b: &Atom, symmetric: bool) -> R<DMatrix<f64>> {
        let p = self.p;
        // A constant function of its forms is a constant atom.
        let konst = |x: &Atom| {
            if x.f.is_constant() && !x.args.is_empty() {
                Some(Atom {
                    f: x.f.clone(),
                    args: vec![],
                })
            } else {
                None
            }
        };
        if let Some(a) = konst(a) {
            return self.atom_pair(&a, b, false);
        }
        if let Some(b) = konst(b) {
            return self.atom_pair(a, &b, false);
        }
        if self.has_point(a)? || self.has_point(b)? {
            return self.point_pair(a, b, symmetric);
        }
        match (a.args.len(), b.args.len()) {
            (0, _) => {
                let mb = self.atom_mean(b)?;
                let c = a.f.eval(&[]);
                Ok(DMatrix::from_fn(p, p, |_, q| c * mb[q]))
            }
            (_, 0) => {
                let ma = self.atom_mean(a)?;
                let c = b.f.eval(&[]);
                Ok(DMatrix::from_fn(p, p, |i, _| c * ma[i]))
            }
            (1, 1) => {
                let memo_key = if p > 0 {
                    let (ia, ib) = (self.intern(&a.args[0]), self.intern(&b.args[0]));
                    let (fa, fb) = (format!("{:?}", a.f), format!("{:?}", b.f));
                    let hit = self
                        .blocks
                        .get(&(fa.clone(), fb.clone(), ia, ib))
                        .map(|(m, e)| (m.clone(), *e))
                        .or_else(|| {
                            self.blocks
                                .get(&(fb.clone(), fa.clone(), ib, ia))
                                .map(|(m, e)| (m.transpose(), *e))
                        });
                    if let Some((m, e)) = hit {
                        self.note_err(e);
                        return Ok(m);
                    }
                    Some((fa, fb, ia, ib))
                } else {
                    None
                };
                let cross = self.lcov(&a.args[0], &b.args[0])?;
                if a.f == Expr::Arg(0) && b.f == Expr::Arg(0) {
                    return Ok(cross);
                }
                let d1: Vec<f64> = self
                    .lcov(&a.args[0], &a.args[0])?
                    .diagonal()
                    .iter()
                    .copied()
                    .collect();
                let d2: Vec<f64> = self
                    .lcov(&b.args[0], &b.args[0])?
                    .diagonal()
                    .iter()
                    .copied()
                    .collect();
                let vmax = d1.iter().chain(&d2).fold(0.0f64, |x, &v| x.max(v));
                let key = self.kernel(&a.f, &b.f, vmax);
                let sym = symmetric && a.args[0] == b.args[0] && a.f == b.f;
                let out = self.kernels[&key].0.block(&d1, &d2, &cross, sym);
                // Stated at every use, so that a scoped error ([`Engine::scoped`]) sees it;
                // read after the block, whose entries may have raised it (smooth.rs).
                let err = self.kernels[&key].0.error_bound();
                self.note_err(err);
                let bytes = 8 * out.len();
                if let Some(k) = memo_key {
                    if self.blocks_bytes + bytes <= BLOCK_MEMO_BYTES {
                        self.blocks_bytes += bytes;
                        self.blocks.insert(k, (out.clone(), err));
                    }
                }
                Ok(out)
            }
            _ => {
                // Forms the functions do not read (a derivative of a sum of atoms of
                // several forms, e.g. through a skip connection) leave the expectation:
                // without them it may be one-dimensional and closed.
                let (ra, rb) = (restrict(&a.f, &a.args), restrict(&b.f, &b.args));
                if ra.args.len() < a.args.len() || rb.args.len() < b.args.len() {
                    return self.atom_pair(&ra, &rb, symmetric);
                }
                if let Some(m) = self.split_pair(a, b, symmetric)? {
                    return Ok(m);
                }
                let mut out = DMatrix::zeros(p, p);
                let m = a.args.len();
                let blocks = self.joint_blocks(&a.args, &b.args)?;
                let fab = Expr::mul(a.f.clone(), b.f.substitute(&|j| Expr::Arg(j + m)));
                for i in 0..p {
                    for j in 0..p {
                        if symmetric && j < i {
                            out[(i, j)] = out[(j, i)];
                            continue;
                        }
                        let cov = joint_cov(&blocks, m, m + b.args.len(), i, j);
                        let est = self.expect(&fab, &cov);
                        self.note(est.method.to_string(), est.error);
                        out[(i, j)] = est.value;
                    }
                }
                Ok(out)
            }
        }
    }

    /// `E[f(x)]`, `x ~ N(0, cov)`, by a multidimensional rule: nested over independent
    /// Gaussian families when the covariance has several blocks (`nested.rs`), else
    /// tensor Gauss–Hermite or, past three dimensions, QMC (`gauss::expect_multi`).
    fn expect(&self, f: &Expr, cov: &DMatrix<f64>) -> gauss::Estimate {
        if let Some(e) = super::nested::expect(f, cov, TOL) {
            return e;
        }
        let g = f.clone();
        gauss::expect_multi(&move |x: &[f64]| g.eval(x), cov, TOL, self.seed)
    }

    /// Prepares (once) the pair kernel of two functions; returns its cache key.
    /// Prepares the pair kernel of two functions for variances up to `vmax` (once per
    /// pair, again only if larger variances appear); returns its cache key.
    fn kernel(&mut self, f: &Expr, g: &Expr, vmax: f64) -> (String, String) {
        let key = (format!("{f:?}"), format!("{g:?}"));
        let fresh = self.kernels.get(&key).is_none_or(|k| k.1 < vmax);
        if fresh {
            let v = vmax.max(1e-3);
            let mut k = PairKernel::new(f, g, v, TOL);
            if let Some((old, _)) = self.kernels.get(&key) {
                k.adopt(old);
            }
            self.note(k.method().to_string(), k.error_bound());
            self.kernels.insert(key.clone(), (k, v));
        }
        key
    }

    fn note(&mut self, method: String, err: f64) {
        if method.starts_with("QMC") {
            // A QMC error is a multiple of a standard error, not a bound: the method says
            // so with its largest value (qmc::gaussian_mean_tol).
            let e = self.qmc.entry(method).or_insert(0.0);
            *e = e.max(err);
        } else {
            self.methods.insert(method);
        }
        self.note_err(err);
    }

    fn note_err(&mut self, err: f64) {
        if err.is_finite() {
            self.max_error = self.max_error.max(err);
        } else {
            self.max_error = f64::INFINITY;
        }
    }

    /// The largest QMC error (3σ, a statistical estimate), if QMC was used.
    pub fn qmc_3sigma(&self) -> Option<f64> {
        self.qmc.values().copied().reduce(f64::max)
    }

    /// The methods used, for the report; QMC with its largest stated 3σ error.
    pub fn method_list(&self) -> Vec<String> {
        let mut out: BTreeSet<String> = self.methods.clone();
        for (m, e) in &self.qmc {
            out.insert(format!(
                "{m}, 3σ ≈ {e:.1e} (a statistical error, not a bound)"
            ));
        }
        out.into_iter().collect()
    }

    /// The inputs of the engine, for reports.
    pub fn input_node_values(&self) -> &HashMap<NodeId, DMatrix<f64>> {
        &self.inputs
    }

    /// Whether a node is a vector the engine knows.
    pub fn is_vector(&self, x: NodeId) -> bool {
        !matches!(
            self.prog.node(x).op,
            Op::Input { .. } | Op::Output { .. } | Op::Moment(_)
        )
    }
}

/// Values at every point with their stated error.
type Valued = (DVector<f64>, f64);

/// A set of Gaussian families (zform::Gauss::family).
type Families = BTreeSet<(usize, u8)>;

#[cfg(test)]
mod tests {
    use super::super::{compute, input_values};
    use super::*;

    /// The dry run and the real run of [`super::super::limit_general`], returning the
    /// real run's lookups that the dry run did not count.
    fn strays(src: &str, points: &[Vec<f64>]) -> usize {
        let prog = crate::compile(src).unwrap();
        let der = Derivation::new(&prog).unwrap();
        let mut eng = Engine::new(&prog, &der, 0, input_values(&prog, &[]));
        compute(&prog, &der, &mut eng, 0, None).unwrap();
        eng.arm(points.len(), input_values(&prog, points));
        eng.warm_up().unwrap();
        compute(&prog, &der, &mut eng, points.len(), None).unwrap();
        eng.stray_lookups()
    }

    /// Issue 12: a moment of two forms (`mean(x[0] * x[k])`) was integrated per point, so
    /// its covariance lookups were never counted, every block under it was recomputed
    /// without a memo, and `semicircle.tp` took 2^k steps. (It is now a closed form;
    /// the next test keeps the quadrature path honest.)
    #[test]
    fn moments_of_several_forms_are_counted_by_the_dry_run() {
        let src = "width n\nparam W : n x n ~ N(0, 1/(2*n))\nparam v : n ~ N(0, 1)\n\
                   x[0] = v\nfor k in 1..=12 {\n  x[k] = W @ x[k-1] + W.T @ x[k-1]\n  \
                   observe m[k] = mean(x[0] * x[k])\n}\n";
        assert_eq!(strays(src, &[vec![]]), 0);
    }

    /// The same for atoms of several forms inside a vector (pair blocks integrated per
    /// pair of points) and in an observe, on three points.
    #[test]
    fn atoms_of_several_forms_are_counted_by_the_dry_run() {
        let src = "width n\ninput xi : 1\nparam U : n x 1 ~ N(0, 1)\n\
                   param V : n x 1 ~ N(0, 1)\nparam W : n x n ~ N(0, 1/n)\n\
                   param v : 1 x n ~ N(0, 1/n)\n\
                   h1 = U @ xi\nh2 = V @ xi\ny = tanh(h1) * relu(h2)\nh3 = W @ y\n\
                   observe m = mean(tanh(h3) * sin(h1))\noutput f = v @ relu(h3)\n";
        let points = vec![vec![0.5], vec![-1.0], vec![2.0]];
        assert_eq!(strays(src, &points), 0);
    }

    /// Tied weights (issue 18): the Ż coefficients s(ξ) are means computed inside a
    /// covariance; their lookups must be counted like every other.
    #[test]
    fn zdot_coefficients_are_counted_by_the_dry_run() {
        let head = "width n\ninput xi : 2\nparam U : n x 2 ~ N(0, 1/2)\n\
                    param W : n x n ~ N(0, 1/n)\nparam v : 1 x n ~ N(0, 1/n)\n";
        let points = vec![vec![0.5, 1.0], vec![-1.0, 0.3], vec![2.0, -0.4]];
        for body in [
            "h1 = U @ xi\nh2 = W.T @ tanh(W @ h1)\nobserve m = mean(h2 * h2)\noutput f = v @ relu(h2)\n",
            "h1 = relu(U @ xi)\nh2 = W.T @ tanh(W @ h1)\nobserve m = mean(h2 * h1)\noutput f = v @ h2\n",
        ] {
            assert_eq!(strays(&format!("{head}{body}"), &points), 0, "{body}");
        }
    }

    #[test]
    fn quadratic_polynomials_are_recognized() {
        let (x, y) = (Expr::Arg(0), Expr::Arg(1));
        let xy = Expr::mul(x.clone(), y.clone());
        assert!(quadratic(&xy, 2));
        assert!(quadratic(&Expr::powi(x.clone(), 2), 1));
        assert!(quadratic(
            &Expr::add(Expr::mul(Expr::Const(2.0), xy.clone()), Expr::Const(3.0)),
            2
        ));
        assert!(!quadratic(&Expr::mul(xy.clone(), x.clone()), 2));
        let tanh_y = Expr::mul(Expr::call(crate::ir::Fun::Tanh, x.clone()), y.clone());
        assert!(!quadratic(&tanh_y, 2));
        assert!(!quadratic(&Expr::div(x, y), 2));
    }
}
