//! 1/√n attention logits in the limit: random Gaussian scalars, and the output a
//! Gaussian mixture (theory.md §1.1, §1.2).
//!
//! Why a module of its own: everything else in `limit` rests on the Netsor+ fact that a
//! moment `(1/n) Σ_a ψ(x_a)` converges to a deterministic number. A "standard" attention
//! logit does not. With `q = n^(1/2) Q u` (`examples/sp_attention.tp`) the coordinates of
//! `q` are Θ(n^(1/2)) and `a = mean(q * k) = n^(-1/2) Σ_a X_a Y_a` with `X = Q u` of
//! family Q and `Y = k` independent of it: a CLT sum. In the limit the logits are jointly
//! Gaussian random scalars `G` (Hron et al. 2020, "Infinite attention"), centered
//! (`E[X Y] = 0`), with
//!
//! `Cov(G_i(ξ), G_j(ξ')) = E[Z^{X_i}(ξ) Z^{X_j}(ξ')] · E[Z^{Y_i}(ξ) Z^{Y_j}(ξ')]`
//!
//! (`E[X X' Y Y'] = E[X X'] E[Y Y']` by independence), and independent of the
//! width-coordinate Z's of every vector (one coordinate carries `O(n^(-1/2))` of the sum).
//! Given `G` the program is a Netsor+ program whose logits are per-point constants, so
//! the *conditional* kernel is what [`super::netsor`] computes with the logits read from a
//! sample ([`PointScalar::Logit`](super::zform::PointScalar)). The NNGP of the output is
//! `E_G[K(· | G)]`, and the output is a Gaussian *mixture* over `G`, not a Gaussian
//! process. Neural Tangents' `GlobalSelfAttention(linear_scaling=False)` reaches a
//! Gaussian process only by also taking the number of heads to infinity; tpc does not.
//!
//! `E_G` is a `d = (#logits · P)`-dimensional Gaussian expectation of a smooth function
//! (the conditional kernel is a rational function of softmax weights): randomized Sobol'
//! QMC over the principal components of `Cov(G)` ([`super::qmc`]), with the error stated
//! as 3 standard errors over independent shifts (statistical, not a bound; the project's
//! convention for QMC, `qmc_3sigma`).
//!
//! The NTK and training. Under muP learning rates one step moves such a logit by
//! Θ(n^(1/2)) (the abc analysis, `crate::scaling`, warns W0106): the key's update is
//! correlated with the Θ(n^(1/2)) query, so the moment adds the changes coherently. The
//! tangent kernel through the logits grows like n^(1/2) and the training trajectory has
//! no finite limit; `tpc limit` prints the NNGP and says so instead of a number.

use nalgebra::{DMatrix, DVector};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::engine::Engine;
use super::zform::{Derivation, Gauss, GaussKind, LinForm, MomentLimit, PointScalar, ZForm};
use super::{input_values, LimitError, LimitResult};
use crate::ir::{Expr, Monomial, NodeId, Op, Program, Rational};

/// One 1/√n logit `a = mean(q * y)`: a Gaussian scalar in the limit.
#[derive(Clone, Debug)]
pub struct Logit {
    pub node: NodeId,
    /// The Z of `q/√n` times the constant factor of the moment: `c·Ẑ^{Q u}`.
    pub x: ZForm,
    /// The Z of the other factor (independent of `x`'s family).
    pub y: ZForm,
    /// The scale index of its [`PointScalar::Logit`].
    pub scale: usize,
}

impl Derivation {
    /// `q = W x` with `n·Var(W_ij) = c·n` (coordinates Θ(n^(1/2))) used only in moments:
    /// records the Z of `q/√n`, a Gaussian of W's family with variance `c·E[(Z^x)²]`,
    /// and gives `q` no Z of its own (true). Anything else is refused by the caller
    /// (false: the limit of `q` does not exist).
    pub(crate) fn clt_product(
        &mut self,
        prog: &Program,
        param: usize,
        transpose: bool,
        arg: NodeId,
        id: NodeId,
        s2: Monomial,
    ) -> bool {
        let users = prog.users(id);
        if transpose
            || s2.exp != Rational::ONE
            || !s2.coef.is_finite()
            || s2.coef <= 0.0
            || users.is_empty()
            || !users
                .iter()
                .all(|&u| matches!(prog.node(u).op, Op::Moment(_)))
            || self.z[arg.index()].is_none()
        {
            return false;
        }
        let prm = &prog.params[param];
        let g = self.push(
            GaussKind::Hat {
                param,
                transpose: false,
                arg,
                node: id,
                sigma2: s2.coef,
            },
            format!("{} {}", prm.name, prog.label(arg)),
        );
        self.clt[id.index()] = Some(ZForm {
            lin: LinForm::single(g),
            ..ZForm::default()
        });
        true
    }

    /// A moment with an operand `q` of [`Derivation::clt_product`]: it must be linear in
    /// `q` (`mean(c · q * k)`), with the other factor independent of `q`'s family; its
    /// limit is a random Gaussian scalar ([`Logit`]).
    pub(crate) fn random_logit(
        &mut self,
        prog: &Program,
        id: NodeId,
        e: &Expr,
        ops: &[NodeId],
    ) -> Result<(), String> {
        let clt: Vec<usize> = (0..ops.len())
            .filter(|&i| self.clt[ops[i].index()].is_some())
            .collect();
        let name = |i: usize| prog.label(ops[i]);
        if clt.len() != 1 {
            return Err(format!(
                "`{}` is a moment of two vectors with Θ(n^(1/2)) coordinates (`{}`, `{}`): it grows like n^(1/2), \
                 so the limit does not exist",
                prog.label(id),
                name(clt[0]),
                name(clt[1])
            ));
        }
        let i = clt[0];
        if !linear_in(e, i, ops.len()) {
            return Err(format!(
                "`{}` has Θ(n^(1/2)) coordinates and `{}` is not linear in it: only a 1/√n logit \
                 `mean(q * k)` of it has a limit (a random one), so the limit does not exist",
                name(i),
                prog.label(id)
            ));
        }
        // The coefficient of q: the other factor (q enters linearly and vanishes at 0).
        let d = e.diff(i).substitute(&|j| {
            if j == i {
                Expr::Const(0.0)
            } else {
                Expr::Arg(j)
            }
        });
        let saved = self.z[ops[i].index()].replace(ZForm::default());
        let y = self.compose(prog, id, &d, ops);
        self.z[ops[i].index()] = saved;
        let y = y?;
        let x = self.clt[ops[i].index()].clone().ok_or("missing Z")?;
        let fam = x.lin.0.first().map(|&(g, _)| self.gauss[g].family().0);
        let mut gs: Vec<usize> = y.lin.0.iter().map(|&(g, _)| g).collect();
        for (_, a) in &y.atoms {
            for l in &a.args {
                gs.extend(l.0.iter().map(|&(g, _)| g));
            }
        }
        for g in gs {
            let (f, kind) = (self.gauss[g].family(), &self.gauss[g].kind);
            let point = matches!(kind, GaussKind::Point { .. });
            if !point && Some(f.0) == fam {
                return Err(format!(
                    "the 1/√n logit `{}` multiplies `{}` by a vector that depends on the same matrix: \
                     its mean grows like n^(1/2), so the limit does not exist",
                    prog.label(id),
                    name(i)
                ));
            }
            let s = match kind {
                GaussKind::Point { scale } | GaussKind::Scaled { scale, .. } => Some(*scale),
                _ => None,
            };
            if s.is_some_and(|s| self.scale_is_random(s)) {
                return Err(format!(
                    "the 1/√n logit `{}` has a factor that depends on an earlier 1/√n logit: its law \
                     given the earlier ones is not derived (one layer of random logits is)",
                    prog.label(id)
                ));
            }
        }
        let slot = self.logits.len();
        let k = self.push_scale(id, PointScalar::Logit { node: id, slot });
        self.gauss.push(Gauss {
            kind: GaussKind::Point { scale: k },
            name: prog.label(id),
            odd: false,
        });
        self.moments[id.index()] = Some((MomentLimit::Point(self.gauss.len() - 1), y.clone()));
        self.logits.push(Logit {
            node: id,
            x,
            y,
            scale: k,
        });
        Ok(())
    }

    /// Does the per-point scalar `k` depend on a random logit?
    pub(crate) fn scale_is_random(&self, k: usize) -> bool {
        match &self.scales[k].netsor {
            Some(PointScalar::Logit { .. }) => true,
            Some(PointScalar::Func { args, .. }) => args.iter().any(|&a| self.scale_is_random(a)),
            Some(PointScalar::Moment { z, .. }) => {
                let mut r = false;
                let mut see = |l: &LinForm| {
                    for &(g, _) in &l.0 {
                        if let GaussKind::Point { scale } | GaussKind::Scaled { scale, .. } =
                            self.gauss[g].kind
                        {
                            r |= self.scale_is_random(scale);
                        }
                    }
                };
                see(&z.lin);
                for (_, a) in &z.atoms {
                    a.args.iter().for_each(&mut see);
                }
                r
            }
            None => false,
        }
    }
}

/// Is `e` linear in operand `i` and zero when it is (checked at a few fixed points)?
fn linear_in(e: &Expr, i: usize, n: usize) -> bool {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(0x5eed);
    (0..4).all(|_| {
        let mut v: Vec<f64> = (0..n)
            .map(|_| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 3.0 - 1.5)
            .collect();
        let mut at = |t: f64| {
            v[i] = t;
            e.eval(&v)
        };
        let (f0, f1, f2) = (at(0.0), at(1.0), at(-2.0));
        let tol = 1e-12 * (1.0 + f1.abs() + f2.abs());
        f0.abs() <= tol && (f2 + 2.0 * f1).abs() <= tol
    })
}

/// The derivation line of a product of [`Derivation::clt_product`], if `id` is one.
pub(crate) fn clt_line(
    prog: &Program,
    der: &Derivation,
    names: &[String],
    id: NodeId,
) -> Option<String> {
    let z = der.clt[id.index()].as_ref()?;
    let (g, _) = *z.lin.0.first()?;
    let GaussKind::Hat { sigma2, arg, .. } = der.gauss[g].kind else {
        return None;
    };
    let ops = prog.operands(id);
    let w = &names[ops[0].index()];
    let a = crate::ir::product_arg(names, arg);
    Some(format!(
        "{} has Θ(n^(1/2)) coordinates (no Z); n^(-1/2)·{} → Ẑ^{{{w} {a}}},  Cov = {}·E[Z^a Z^b] \
         within family {w} (used only in 1/√n logits)",
        names[id.index()],
        names[id.index()],
        super::fmt(sigma2)
    ))
}

/// The derivation line of a random logit, if `id` is one.
pub(crate) fn logit_line(
    prog: &Program,
    der: &Derivation,
    names: &[String],
    id: NodeId,
) -> Option<String> {
    let l = der.logits.iter().find(|l| l.node == id)?;
    let (g, _) = *l.x.lin.0.first()?;
    let x = &der.gauss[g].name;
    let ops = prog.operands(id);
    let others: Vec<&NodeId> = ops
        .iter()
        .filter(|o| der.clt[o.index()].is_none())
        .collect();
    let y = match others.as_slice() {
        [o] if prog.ty(**o) == crate::ir::Ty::Vector => format!("Z^{}", names[o.index()]),
        _ => "Z^y".to_string(),
    };
    let a = &names[id.index()];
    Some(format!(
        "{a} → G_{{{a}}}(ξ), a centered Gaussian scalar, random (1/√n logit: n^(-1/2) Σ_α Ẑ^{{{x}}}_α·{y}_α, \
         a CLT sum), Cov(G_{{{a}}}(p), G_b(q)) = E[Ẑ^{{{x}}}(p) Ẑ^{{x_b}}(q)]·E[{y}(p) Z^{{y_b}}(q)] \
         over the logits b = mean(x_b * y_b), independent of every Z (Hron et al. 2020)"
    ))
}

/// The output line when the program has random logits: a Gaussian mixture.
pub(crate) fn mixture_line(der: &Derivation, f: &str) -> Option<String> {
    (!der.logits.is_empty()).then(|| {
        format!(
            "    given the {} random logits G, {f} | G is a Gaussian process (the Netsor+ kernel above, \
             logits fixed); {f} itself is a Gaussian MIXTURE over G, not a Gaussian process: \
             NNGP = E_G[Cov({f}(p), {f}(q) | G)]",
            der.logits.len()
        )
    })
}

/// A conditional (or averaged) result: NNGP, observes per point, stated engine error.
type Rep = (DMatrix<f64>, Vec<Vec<f64>>, f64);

/// Shifts of the randomized QMC over G (replicates for the standard error).
const SHIFTS: usize = 16;
/// Sobol' points per shift.
const POINTS: usize = 256;

/// The limit of a program with random logits: NNGP and observes as `E_G` of the
/// conditional Netsor+ engine by randomized QMC; no NTK and no trajectory (they have no
/// finite limit, see the module doc).
pub(crate) fn limit_mixture(
    prog: &Program,
    der: &Derivation,
    points: Vec<Vec<f64>>,
) -> Result<LimitResult, LimitError> {
    let first = der.logits[0].node;
    if der.has_transpose {
        return Err(LimitError::at(
            prog,
            first,
            "E0030",
            "1/√n logits in a program that multiplies by a matrix and its transpose are not derived",
        ));
    }
    let p = points.len();
    let cov =
        logit_cov(prog, der, &points).map_err(|e| LimitError::at(prog, first, "E0032", e.0))?;
    let d = cov.nrows();
    let eig = nalgebra::SymmetricEigen::new(cov);
    let lmax = eig.eigenvalues.iter().cloned().fold(0.0, f64::max);
    let mut order: Vec<usize> = (0..d)
        .filter(|&j| eig.eigenvalues[j] > 1e-13 * lmax)
        .collect();
    order.sort_by(|&a, &b| {
        eig.eigenvalues[b]
            .total_cmp(&eig.eigenvalues[a])
            .then(a.cmp(&b))
    });
    let r = order.len();
    // G = A z, z ~ N(0, I_r): principal components first (the Sobol' dimensions).
    let a = DMatrix::from_fn(d, r, |i, j| {
        eig.eigenvectors[(i, order[j])] * eig.eigenvalues[order[j]].sqrt()
    });
    let qdim = r.min(super::qmc::SOBOL_MAX_DIM);
    let sobol = super::qmc::sobol_points(qdim, POINTS);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(0x0001_0617);
    let plans: Vec<(Vec<u64>, u64)> = (0..SHIFTS)
        .map(|_| ((0..qdim).map(|_| rng.next_u64()).collect(), rng.next_u64()))
        .collect();
    let to_bits = |u: f64| (u * 18_446_744_073_709_551_616.0) as u64;
    let nl = der.logits.len();
    let reps: Vec<Result<Rep, LimitError>> = plans
        .par_iter()
        .map(|(shift, pad_seed)| {
            let mut pad = Xoshiro256PlusPlus::seed_from_u64(*pad_seed);
            let mut acc: Option<Rep> = None;
            let mut z = vec![0.0; r];
            for pt in &sobol {
                for j in 0..qdim {
                    let b = to_bits(pt[j]) ^ shift[j];
                    let u = ((b >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                    z[j] = super::qmc::inv_norm_cdf(u);
                }
                for zj in z.iter_mut().skip(qdim) {
                    let u = ((pad.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                    *zj = super::qmc::inv_norm_cdf(u);
                }
                let g = &a * DVector::from_column_slice(&z);
                let vals: Vec<DVector<f64>> = (0..nl)
                    .map(|l| DVector::from_fn(p, |i, _| g[l * p + i]))
                    .collect();
                let (k, obs, err) = conditional(prog, der, &points, vals)?;
                acc = Some(match acc {
                    None => (k, obs, err),
                    Some((k0, o0, e0)) => (
                        k0 + k,
                        o0.iter()
                            .zip(&obs)
                            .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x + y).collect())
                            .collect(),
                        e0.max(err),
                    ),
                });
            }
            let (k, obs, err) = acc.ok_or_else(|| LimitError::general("E0030", "no QMC points"))?;
            let m = sobol.len() as f64;
            Ok((
                k / m,
                obs.into_iter()
                    .map(|v| v.into_iter().map(|x| x / m).collect())
                    .collect(),
                err,
            ))
        })
        .collect();
    let reps: Vec<Rep> = reps.into_iter().collect::<Result<_, _>>()?;
    let rr = reps.len() as f64;
    let mean = reps.iter().fold(
        DMatrix::zeros(reps[0].0.nrows(), reps[0].0.ncols()),
        |s, x| s + &x.0,
    ) / rr;
    let se_of = |vals: &[f64], m: f64| {
        (vals.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (rr - 1.0) / rr).sqrt()
    };
    let mut se_max: f64 = 0.0;
    for (i, m) in mean.iter().enumerate() {
        let v: Vec<f64> = reps.iter().map(|x| x.0.as_slice()[i]).collect();
        se_max = se_max.max(se_of(&v, *m));
    }
    let mut observe = Vec::new();
    for (k, &m) in prog.observes.iter().enumerate() {
        let len = reps[0].1.get(k).map_or(0, |v| v.len());
        let vals: Vec<f64> = (0..len)
            .map(|i| {
                let v: Vec<f64> = reps.iter().map(|x| x.1[k][i]).collect();
                let mu = v.iter().sum::<f64>() / rr;
                se_max = se_max.max(se_of(&v, mu));
                mu
            })
            .collect();
        observe.push((prog.label(m), vals));
    }
    let engine_err = reps.iter().map(|x| x.2).fold(0.0, f64::max);
    let q3 = super::qmc::STATED_SIGMAS * se_max;
    let note = no_ntk_note(prog, der);
    let train = prog.train.as_ref().map(|tr| super::train::LimitTrain {
        loss: tr.loss,
        lr: tr.lr,
        steps: tr.steps,
        f_t: None,
        f_t_var: None,
        f_t_se: None,
        method: format!("none: {note}"),
        note: None,
    });
    Ok(LimitResult {
        outputs: prog.output_names(),
        points: prog.reported_points(points),
        nngp: Some(mean),
        nngp_note: None,
        ntk: None,
        ntk_note: Some(note),
        observe,
        methods: vec![
            format!(
                "random 1/√n logits: E_G over {d} jointly Gaussian logit values (rank {r}) by randomized \
                 Sobol' QMC, {POINTS} points × {SHIFTS} shifts, error 3σ (statistical, not a bound)"
            ),
            "conditional kernel given G: the Netsor+ engine with the logits fixed".into(),
        ],
        max_error: engine_err.max(q3),
        qmc_3sigma: Some(q3),
        regime: crate::scaling::regime(prog).map(|r| r.name().to_string()),
        train,
    })
}

/// Why there is no NTK: the abc exponent of the logits' change after one step.
fn no_ntk_note(prog: &Program, der: &Derivation) -> String {
    let ex = crate::scaling::exponents(prog);
    let grow = der.logits.iter().find_map(|l| {
        let e = ex.step.as_ref()?.delta.get(l.node.index())?.exponent()?;
        (e > Rational::ZERO).then_some((l.node, e))
    });
    match grow {
        Some((node, e)) => format!(
            "no finite limit: with these learning rates one step moves the 1/√n logit `{}` by Θ(n^({e})) \
             (W0106), so the tangent kernel through the logits grows like n^({e}) and the training \
             trajectory has no limit; use 1/n logits (muP) for a feature-learning limit",
            prog.label(node)
        ),
        None => format!(
            "not derived: the logits (`{}`, …) are random in the limit (1/√n), and the tangent kernel \
             through random logits is not derived",
            prog.label(der.logits[0].node)
        ),
    }
}

/// The covariance of all logits at all points, `(logit, point)`-major.
fn logit_cov(
    prog: &Program,
    der: &Derivation,
    points: &[Vec<f64>],
) -> Result<DMatrix<f64>, super::engine::NumError> {
    let p = points.len();
    let nl = der.logits.len();
    let mut eng = Engine::new(prog, der, 0, input_values(prog, &[]));
    let run = |eng: &mut Engine<'_>| -> Result<DMatrix<f64>, super::engine::NumError> {
        let mut c = DMatrix::zeros(nl * eng.p, nl * eng.p);
        for i in 0..nl {
            for j in i..nl {
                let (li, lj) = (&der.logits[i], &der.logits[j]);
                let x = eng.zz(&li.x, &lj.x, i == j)?;
                let y = eng.zz(&li.y, &lj.y, i == j)?;
                let b = x.component_mul(&y);
                let pp = eng.p;
                c.view_mut((i * pp, j * pp), (pp, pp)).copy_from(&b);
                c.view_mut((j * pp, i * pp), (pp, pp))
                    .copy_from(&b.transpose());
            }
        }
        Ok(c)
    };
    run(&mut eng)?;
    eng.arm(p, input_values(prog, points));
    eng.logit_values = Some(vec![DVector::zeros(p); nl]);
    run(&mut eng)
}

/// The conditional NNGP and observes given logit values (per logit, per point), with the
/// engine's stated error.
fn conditional(
    prog: &Program,
    der: &Derivation,
    points: &[Vec<f64>],
    vals: Vec<DVector<f64>>,
) -> Result<Rep, LimitError> {
    let p = points.len();
    let mut eng = Engine::new(prog, der, 0, input_values(prog, &[]));
    eng.logit_values = Some(vec![DVector::zeros(0); vals.len()]);
    super::compute(prog, der, &mut eng, 0, None)?;
    eng.arm(p, input_values(prog, points));
    eng.logit_values = Some(vals);
    let last = NodeId::new(prog.len().saturating_sub(1));
    eng.warm_up()
        .map_err(|(node, e)| LimitError::at(prog, node.min(last), "E0032", e.0))?;
    let (nngp, nngp_note, _, _, observe) = super::compute(prog, der, &mut eng, p, None)?;
    let nngp = nngp.ok_or_else(|| {
        LimitError::general(
            "E0030",
            nngp_note.unwrap_or_else(|| "the conditional NNGP has no limit".into()),
        )
    })?;
    // Observes that do not depend on the point come back as one value.
    let observe = observe
        .into_iter()
        .map(|(_, v)| {
            if v.len() == 1 && p > 1 {
                vec![v[0]; p]
            } else {
                v
            }
        })
        .collect();
    Ok((nngp, observe, eng.max_error))
}

/// `tpc compare` on a program with random logits. A draw at width N has its own logits
/// `G_N` (Θ(1), random), and what converges at rate N^(-1/2) is the draw's kernel to the
/// limit *given those logits*, `K(· | G_N)`, not to the mixture average `E_G K`. The
/// conditioner runs the program with its logits appended to the observes (so every
/// draw reports them) and replaces each draw's value `v` by `v − K(· | G_N) + E_G K`:
/// the per-draw deviation is the conditional one, and the mean over draws still
/// estimates `E_G K` (the conditional limit acts as a control variate).
pub struct Conditioner {
    der: Derivation,
    /// The program with the logits observed after its own observes.
    pub run: Program,
    own: usize,
}

impl Conditioner {
    /// None for a program without random logits.
    pub fn new(prog: &Program) -> Option<Conditioner> {
        let der = Derivation::new(prog).ok()?;
        if der.logits.is_empty() {
            return None;
        }
        let mut run = prog.clone();
        let own = run.observes.len();
        run.observes.extend(der.logits.iter().map(|l| l.node));
        Some(Conditioner { der, run, own })
    }

    /// The draw's NNGP and observes (per point) shifted from its own logits' conditional
    /// limit to the mixture limit `lim`.
    pub fn shift(
        &self,
        prog: &Program,
        points: &[Vec<f64>],
        d: &crate::finite::exec::Draw,
        lim: &LimitResult,
    ) -> Result<crate::finite::exec::Draw, LimitError> {
        let p = points.len().max(1);
        let vals: Vec<DVector<f64>> = (0..self.der.logits.len())
            .map(|l| {
                let v = d
                    .observe
                    .get(self.own + l)
                    .map(Vec::as_slice)
                    .unwrap_or(&[]);
                DVector::from_fn(p, |i, _| match v.len() {
                    1 => v[0],
                    _ => v.get(i).copied().unwrap_or(f64::NAN),
                })
            })
            .collect();
        let (k, obs, _) = conditional(prog, &self.der, points, vals)?;
        let mut out = d.clone();
        if let Some(m) = &lim.nngp {
            out.nngp = &d.nngp - &k + m;
        }
        out.observe.truncate(self.own);
        for (i, (_, l)) in lim.observe.iter().enumerate() {
            let f = d.observe.get(i).map(Vec::as_slice).unwrap_or(&[]);
            let c = obs.get(i).map(Vec::as_slice).unwrap_or(&[]);
            out.observe[i] = (0..l.len())
                .map(|j| {
                    let at = |v: &[f64]| {
                        if v.len() == 1 {
                            v[0]
                        } else {
                            v.get(j).copied().unwrap_or(f64::NAN)
                        }
                    };
                    at(f) - at(c) + l[j]
                })
                .collect();
        }
        Ok(out)
    }
}
