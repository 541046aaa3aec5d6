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

    /// Runs `f` and returns, with its value, the largest error stated inside it (the
    /// engine's `max_error` keeps the overall maximum).
    fn scoped<T>(&mut self, f: impl FnOnce(&mut Self) -> R<T>) -> R<(T, f64)> {
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
    fn point_form(&self, l: &LinForm) -> R<bool> {
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

    fn has_point(&self, a: &Atom) -> R<bool> {
        for l in &a.args {
            if self.point_form(l)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The value of a point-value form at every point, with its stated error.
    fn point_values(&mut self, l: &LinForm) -> R<(DVector<f64>, f64)> {
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
    fn point_args(&mut self, a: &Atom) -> R<Vec<Option<Valued>>> {
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
    fn peel(&self, a: &Atom) -> R<Option<(Atom, Atom)>> {
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
    fn point_eval(&mut self, a: &Atom) -> R<(DVector<f64>, f64)> {
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
    fn point_mean(&mut self, a: &Atom) -> R<DVector<f64>> {
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
    fn point_pair(&mut self, a: &Atom, b: &Atom, symmetric: bool) -> R<DMatrix<f64>> {
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
    fn sum_pair(&mut self, a: &Atom, b: &Atom, symmetric: bool) -> R<Option<DMatrix<f64>>> {
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
    fn split_pair(&mut self, a: &Atom, b: &Atom, symmetric: bool) -> R<Option<DMatrix<f64>>> {
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
    fn sum_mean(&mut self, a: &Atom) -> R<Option<DVector<f64>>> {
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
    fn split_mean(&mut self, a: &Atom) -> R<Option<DVector<f64>>> {
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

    // ---- tangent kernels (NTK) -------------------------------------------------------

    /// Tangent kernel of two base Gaussians: `sum_w lr_w <dG/dw, dG'/dw>` per coordinate.
    fn tgauss(&mut self, j: GaussId, k: GaussId) -> R<Option<Scaled>> {
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
    fn tlin(&mut self, l: &LinForm, m: &LinForm) -> R<Option<Scaled>> {
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
    fn tnode(&mut self, a: NodeId, b: NodeId) -> R<Scaled> {
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

/// The families a factor's forms draw on.
fn families(der: &Derivation, e: &Expr, args: &[LinForm]) -> Families {
    let mut out = BTreeSet::new();
    e.visit_args(&mut |j| {
        for &(g, _) in &args[j].0 {
            // Odd and even Gaussians of one family are independent (zform::Gauss::odd).
            let (param, kind) = der.gauss[g].family();
            out.insert((param, kind + 16 * u8::from(der.gauss[g].odd)));
        }
    });
    out
}

/// Groups of factors (side, expression) of the atoms `a` (side 0) and `b` (side 1) with no family in common between groups,
/// and the product of the constant factors.
pub(crate) fn independent_groups(
    der: &Derivation,
    a: &Atom,
    b: Option<&Atom>,
) -> (f64, Vec<[Vec<Expr>; 2]>) {
    let mut konst = 1.0;
    let mut groups: Vec<(Families, [Vec<Expr>; 2])> = Vec::new();
    let sides = std::iter::once(a).chain(b).enumerate();
    for (side, atom) in sides {
        let mut fs = Vec::new();
        factors(&atom.f, &mut fs);
        for f in fs {
            if f.is_constant() {
                konst *= f.eval(&[]);
                continue;
            }
            let mut fam = families(der, &f, &atom.args);
            let mut item: [Vec<Expr>; 2] = [Vec::new(), Vec::new()];
            item[side].push(f);
            // Merge every group sharing a family with this factor.
            let mut k = 0;
            while k < groups.len() {
                if groups[k].0.is_disjoint(&fam) {
                    k += 1;
                } else {
                    let (gf, [ga, gb]) = groups.swap_remove(k);
                    fam.extend(gf);
                    item[0].extend(ga);
                    item[1].extend(gb);
                }
            }
            groups.push((fam, item));
        }
    }
    (konst, groups.into_iter().map(|g| g.1).collect())
}

/// The factors of a product: `f = Π_k f_k` through `*`, unary minus and `a / b`.
pub(super) fn factors(e: &Expr, out: &mut Vec<Expr>) {
    match e {
        Expr::Mul(a, b) => {
            factors(a, out);
            factors(b, out);
        }
        Expr::Neg(x) => {
            out.push(Expr::Const(-1.0));
            factors(x, out);
        }
        Expr::Div(a, b) if !b.is_constant() => {
            factors(a, out);
            out.push(Expr::div(Expr::Const(1.0), (**b).clone()));
        }
        _ => out.push(e.clone()),
    }
}

/// `Π_k f_k` (1 for none).
pub(super) fn product(fs: Vec<Expr>) -> Expr {
    fs.into_iter().fold(Expr::Const(1.0), Expr::mul)
}

/// The terms of a sum: `f = Σ_i c_i t_i` through `+`, `-` and constant multiples.
fn sum_terms(e: &Expr, c: f64, out: &mut Vec<(f64, Expr)>) {
    match e {
        Expr::Add(a, b) => {
            sum_terms(a, c, out);
            sum_terms(b, c, out);
        }
        Expr::Sub(a, b) => {
            sum_terms(a, c, out);
            sum_terms(b, -c, out);
        }
        Expr::Neg(x) => sum_terms(x, -c, out),
        Expr::Mul(k, x) if k.is_constant() => sum_terms(x, c * k.eval(&[]), out),
        Expr::Mul(x, k) if k.is_constant() => sum_terms(x, c * k.eval(&[]), out),
        _ => out.push((c, e.clone())),
    }
}

/// The terms of an atom's function, each an atom over the forms it uses.
pub(super) fn sum_terms_of(a: &Atom) -> Vec<(f64, Atom)> {
    let mut ts = Vec::new();
    sum_terms(&a.f, 1.0, &mut ts);
    ts.into_iter()
        .map(|(c, t)| (c, restrict(&t, &a.args)))
        .collect()
}

/// `e` over `args` as an atom over the forms it uses only, in their order.
pub(super) fn restrict(e: &Expr, args: &[LinForm]) -> Atom {
    let mut used: Vec<usize> = Vec::new();
    e.visit_args(&mut |j| {
        if !used.contains(&j) {
            used.push(j);
        }
    });
    used.sort_unstable();
    let pos = |j: usize| used.iter().position(|&u| u == j).unwrap_or(0);
    Atom {
        f: e.substitute(&|j| Expr::Arg(pos(j))),
        args: used.iter().map(|&j| args[j].clone()).collect(),
    }
}

/// Is `f` of `m` operands a polynomial of degree at most 2 (every first partial affine)?
fn quadratic(f: &Expr, m: usize) -> bool {
    (0..m).all(|i| f.diff(i).is_affine())
}

/// Covariance of `[L_1(xi_p) .. L_m(xi_p), M_1(xi_q) .. M_k(xi_q)]` from the blocks of
/// [`Engine::joint_blocks`] of `k` forms (the first `m` at point p, the rest at point q).
fn joint_cov(blocks: &[DMatrix<f64>], m: usize, k: usize, p: usize, q: usize) -> DMatrix<f64> {
    let at = |i: usize| if i < m { p } else { q };
    let mut c = DMatrix::zeros(k, k);
    let mut idx = 0;
    for i in 0..k {
        for j in i..k {
            let v = blocks[idx][(at(i), at(j))];
            c[(i, j)] = v;
            c[(j, i)] = v;
            idx += 1;
        }
    }
    c
}

fn check(m: &DMatrix<f64>, what: &str) -> R<()> {
    if m.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(NumError(format!(
            "{what} is not finite (overflow or NaN in the limit)"
        )))
    }
}

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
