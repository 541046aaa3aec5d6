//! Closed-form Gaussian kernels ("dual activations") and a prepared pair evaluator.
//!
//! The NNGP/NTK recursions (theory.md §3.1) need, for every pair of inputs,
//! `E[f(u) g(v)]` with `(u, v) ~ N(0, [[S11, S12], [S12, S22]])`, typically for
//! `(f, g) = (phi, phi)` and `(phi', phi')`. Kinked `phi` (relu, step, abs) defeat
//! quadrature (theory.md §3.3: 1e-3 and 1e-2 errors at m = 60 and 200), and the
//! recursions are evaluated on 4000 x 4000 blocks, so closed forms are worth a lot.
//!
//! # Recognition
//! A one-argument [`Expr`] (in `Arg(0)`) is rewritten as a finite sum `sum_k c_k A_k(u)`
//! of *atoms*:
//! * the piecewise-linear family `1, u, step(u), relu(u)`. It is closed under the
//!   rewrites the IR produces: `relu(-a u) = a (relu(u) - u)`, `step(-u) = 1 - step(u)`
//!   (a.e.), `abs(a u) = |a| (2 relu(u) - u)`, `abs' = 2 step - 1`, leaky/AB-ReLU
//!   `a min(u,0) + b max(u,0) = a u + (b - a) relu(u)` (theory.md §3.2);
//! * `erf(a u)`;
//! * the Gaussian-exponential family `Re(c e^{b u - alpha u^2})`, `alpha >= 0`, complex
//!   `b, c`: it contains `exp(c0 + c1 u + c2 u^2)` (`c2 <= 0`), hence erf' =
//!   `(2/sqrt pi) e^{-u^2}`, and `sin`, `cos` of affine arguments, and it is closed
//!   under products.
//!
//! # Pair identities (each verified in the tests against quadrature or Monte Carlo)
//! With `rho = S12/sqrt(S11 S22)`, `theta = arccos rho`, `Phi`/`phi` the normal cdf/pdf:
//! * arc-cosine (theory.md §3.2): `E[relu relu] = sqrt(S11 S22)/(2pi) (sin theta +
//!   (pi - theta) cos theta)`, `E[step step] = (pi - theta)/(2pi)` — the *step* kernel,
//!   not GP4A's `VStep` which is the sign kernel `(2/pi) arcsin rho` (bug warning §3.2);
//!   `E[step(u) relu(v)] = sqrt(S22) (1 + rho)/(2 sqrt(2pi))` (Stein on the orthant);
//! * Stein's lemma `E[u g(v)] = S12 E[g'(v)]`: `E[u step(v)] = S12/sqrt(2pi S22)`,
//!   `E[u relu(v)] = S12/2`, `E[u erf(b v)] = S12 (2b/sqrt pi)/sqrt(1 + 2b^2 S22)`,
//!   `E[relu(u) erf(b v)] = S12 b / (sqrt pi sqrt(1 + 2 b^2 S22))`;
//! * Williams (theory.md §3.2, the NTK4A form): `E[erf(au) erf(bv)] = (2/pi)
//!   arcsin(2ab S12 / sqrt((1 + 2a^2 S11)(1 + 2b^2 S22)))`; erf' pairs come from the
//!   Gaussian family and give `(4/pi)((1+2S11)(1+2S22) - 4S12^2)^{-1/2}` — with `S11`,
//!   not GP4A's `sqrt(S11)` (bug warning §3.2);
//! * orthant probability: `E[step(u) erf(b v)] = arcsin(sqrt2 b S12 / sqrt(S11 (1 +
//!   2 b^2 S22))) / pi` (write `erf(y) = 2 P(W < sqrt2 y) - 1` with `W` independent);
//! * Gaussian integral: `E[e^{b.x - x'Dx/2}] = det(I + Sigma D)^{-1/2}
//!   exp(b' (Sigma^{-1} + D)^{-1} b / 2)`, analytic in complex `b`; e.g.
//!   `E[exp u exp v] = exp((S11 + S22)/2 + S12)`, `E[sin u sin v] =
//!   e^{-(S11+S22)/2} sinh S12`, `E[cos u cos v] = e^{-(S11+S22)/2} cosh S12`;
//! * exponential tilting: `E[h(u) e^{b v - alpha v^2}] = Z E[h(U)]` with
//!   `Z = (1 + 2 alpha S22)^{-1/2} exp(b^2 S22 / (2(1 + 2 alpha S22)))` and
//!   `U ~ N(b S12/(1 + 2 alpha S22), S11 - 2 alpha S12^2/(1 + 2 alpha S22))`, closed for
//!   `h` in {1, u, step, relu, erf} when `b` is real;
//! * parity: odd against even vanishes (`erf` against `cos`, `1`, `e^{-u^2}`).
//!
//! Pairs outside these (tanh, gelu, sigmoid, erf against sin, relu against cos, ...) use
//! 2-D Gauss–Hermite with the degree chosen for the tolerance at the largest variance
//! (theory.md §3.3), and say so, including whether the integrand is kinked. A constant
//! or linear partner reduces them to 1-D (`E[c g] = c E g`; Stein's lemma).
//!
//! # Blocks
//! [`PairKernel::block_in_place`] evaluates a whole covariance block in parallel over
//! columns (upper triangle only when symmetric). Closed forms cost one transcendental
//! per entry (relu·relu and step·step share one `acos` in
//! [`PairKernel::block_pair_in_place`]). Smooth quadrature kernels are evaluated on
//! blocks by Mehler's Hermite series (per-row coefficients, `O(K)` per entry, with a
//! rigorous truncation bound and the 2-D rule as fallback), which turns a 4000 x 4000
//! tanh kernel from hours of 2-D quadrature into seconds; see `smooth.rs`.

use std::f64::consts::{FRAC_1_SQRT_2, PI, SQRT_2};

use nalgebra::DMatrix;
use rayon::prelude::*;

use super::fastmath;
use super::gauss::{self, clamp_cov, Estimate, Families, Method, TINY_VAR};
use super::smooth::{Smooth, SmoothBlock};
use crate::ir::expr::{Expr, Fun};
use std::sync::Arc;

/// `1/sqrt(2 pi)`
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
/// `1/sqrt(pi)`
const INV_SQRT_PI: f64 = 0.564_189_583_547_756_3;

mod pairs;
mod terms;

pub(crate) use pairs::arccos_terms;
use pairs::*;
use terms::*;

// ----------------------------------------------------------------------------------
// The prepared pair kernel

/// How a [`PairKernel`] evaluates. Fast paths for the kernels the recursions use most.
#[derive(Clone, Debug)]
enum Plan {
    /// `c E[relu(u) relu(v)]`
    ReluRelu(f64),
    /// `c E[step(u) step(v)]`
    StepStep(f64),
    /// `c E[erf(a u) erf(b v)]`
    ErfErf { c: f64, a: f64, b: f64 },
    /// `c E[e^{-a1 u^2} e^{-a2 v^2}]` (erf' pairs)
    GaussGauss { c: f64, a1: f64, a2: f64 },
    /// Any recognized combination.
    Terms(Terms, Terms),
    /// `scale * (S12 or 1) * E[h(w)]`: a 1-D Gauss–Hermite integral, see [`OneDim`].
    OneDim {
        kind: OneDim,
        scale: f64,
        h: Expr,
        degree: usize,
    },
    /// 2-D Gauss–Hermite of the given degree (kinked integrands).
    Quad { degree: usize },
    /// Smooth integrands: Mehler series with cached per-variance coefficients and a
    /// conditional 1-D fallback (`smooth.rs`).
    Smooth(Arc<Smooth>),
}

/// Pairs without a closed form that still reduce to one dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OneDim {
    /// `f` constant: `E[f g(v)] = f(0) E[g(v)]`, `h = g` at `Var = S22`.
    ConstF,
    /// `g` constant: `g(0) E[f(u)]`, `h = f` at `Var = S11`.
    ConstG,
    /// `f(u) = a u`: Stein's lemma `E[a u g(v)] = a S12 E[g'(v)]`, `h = g'`.
    SteinF,
    /// `g(v) = b v`: `b S12 E[f'(u)]`, `h = f'`.
    SteinG,
}

/// `a` if `t` is `a u` (only `X` atoms).
fn linear_coef(t: &Terms) -> Option<f64> {
    t.iter()
        .try_fold(0.0, |acc, (c, a)| (*a == Atom::X).then_some(acc + c))
}

/// Stein's lemma needs the weak derivative of `h`; `Fun::deriv` writes step' = 0, which
/// misses the jump's delta, so expressions calling step are excluded.
fn has_jump(e: &Expr) -> bool {
    let mut j = false;
    e.visit_funs(&mut |f| j |= f == Fun::Step);
    j
}

/// The 1-D reduction of `(f, g)`, if any: `(kind, scale, h)`.
fn one_dim(f: &Expr, g: &Expr, f0: f64, g0: f64) -> Option<(OneDim, f64, Expr)> {
    if f.is_constant() {
        return Some((OneDim::ConstF, f0, g.clone()));
    }
    if g.is_constant() {
        return Some((OneDim::ConstG, g0, f.clone()));
    }
    if let Some(a) = recognize(f).as_ref().and_then(linear_coef) {
        if !has_jump(g) {
            return Some((OneDim::SteinF, a, g.diff(0)));
        }
    }
    if let Some(b) = recognize(g).as_ref().and_then(linear_coef) {
        if !has_jump(f) {
            return Some((OneDim::SteinG, b, f.diff(0)));
        }
    }
    None
}

/// Second output of [`PairKernel::block_pair_in_place`]: overwrite it, or multiply it
/// entrywise (the NTK update `Theta <- Sdot ⊙ Theta` without a temporary matrix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combine {
    Overwrite,
    Multiply,
}

/// `E[f(u) g(v)]` for a fixed pair `(f, g)`, prepared once: the method (closed form or
/// Gauss–Hermite degree) is chosen at construction, so that evaluating millions of
/// covariances costs one formula each.
#[derive(Clone, Debug)]
pub struct PairKernel {
    f: Expr,
    g: Expr,
    /// `f(0)`, `g(0)`: exact values for zero variances.
    f0: f64,
    g0: f64,
    plan: Plan,
    method: Method,
    error: f64,
}

fn assert_one_argument(e: &Expr) {
    let mut ok = true;
    e.visit_args(&mut |i| ok &= i == 0);
    assert!(ok, "limit::dual expects a function of Arg(0) only");
}

/// Does `e` call relu, step or abs?
fn is_kinked(e: &Expr) -> bool {
    let mut k = false;
    e.visit_funs(&mut |f| k |= !f.is_smooth());
    k
}

/// A nominal covariance at which closedness is decided (closedness does not depend on
/// the covariance, only on the atoms).
const NOMINAL: (f64, f64, f64) = (1.0, 0.3, 2.0);

/// Largest 2-D degree for kinked integrands without a closed form: their error falls
/// only algebraically, and each entry costs `degree^2` evaluations.
pub const MAX_KINKED_DEGREE: usize = 256;

impl PairKernel {
    /// Prepares `E[f(u) g(v)]` for one-argument expressions `f`, `g` (in `Arg(0)`).
    ///
    /// Closed form when both are recognized and every atom pair has an identity (see the
    /// module doc); otherwise 2-D Gauss–Hermite with the degree chosen so that the
    /// estimated error is below `tol` (relative to `max(1, |value|)`) for variances up to
    /// `max_var` (larger variances need higher degrees for non-polynomial `f, g`). Kinked
    /// integrands without a closed form are capped at [`MAX_KINKED_DEGREE`] and report
    /// their (larger) estimated error honestly through [`Self::error_bound`].
    /// Constant or linear partners reduce to 1-D quadrature (`E[c g] = c E g`, and
    /// Stein's lemma `E[a u g(v)] = a S12 E[g'(v)]`).
    ///
    /// # Panics
    /// If `f` or `g` reads an operand other than `Arg(0)` (a caller bug: substitute the
    /// operand first).
    pub fn new(f: &Expr, g: &Expr, max_var: f64, tol: f64) -> PairKernel {
        assert_one_argument(f);
        assert_one_argument(g);
        let f0 = f.eval(&[0.0]);
        let g0 = g.eval(&[0.0]);
        let scale = max_var.abs().max(1.0);
        if let (Some(tf), Some(tg)) = (recognize(f), recognize(g)) {
            let (s11, s12, s22) = NOMINAL;
            if let Some((_, fam)) = terms_pair(&tf, &tg, s11, s12, s22) {
                let plan = fast_plan(&tf, &tg).unwrap_or(Plan::Terms(tf, tg));
                return PairKernel {
                    f: f.clone(),
                    g: g.clone(),
                    f0,
                    g0,
                    plan,
                    method: Method::ClosedForm(fam),
                    // Round-off allowance: a few ulps of the largest value.
                    error: 64.0 * f64::EPSILON * scale,
                };
            }
        }
        if let Some((kind, scale, h)) = one_dim(f, g, f0, g0) {
            let he = |x: f64| h.eval(&[x]);
            let c = gauss::choose_degree_1d(&he, max_var, tol);
            let stein = matches!(kind, OneDim::SteinF | OneDim::SteinG);
            // |S12| <= max_var multiplies the 1-D error in the Stein case.
            let error = c.error * scale.abs() * if stein { max_var.abs() } else { 1.0 };
            return PairKernel {
                f: f.clone(),
                g: g.clone(),
                f0,
                g0,
                method: Method::GaussHermite {
                    degree: c.degree,
                    dims: 1,
                    kinked: is_kinked(&h),
                },
                plan: Plan::OneDim {
                    kind,
                    scale,
                    h,
                    degree: c.degree,
                },
                error,
            };
        }
        let kinked = is_kinked(f) || is_kinked(g);
        if !kinked {
            let sm = Smooth::new(f, g, max_var, tol);
            return PairKernel {
                f: f.clone(),
                g: g.clone(),
                f0,
                g0,
                method: Method::HermiteSeries {
                    degree: sm.degree(),
                },
                error: sm.error(),
                plan: Plan::Smooth(Arc::new(sm)),
            };
        }
        let fe = |x: f64| f.eval(&[x]);
        let ge = |x: f64| g.eval(&[x]);
        let cap = if kinked {
            MAX_KINKED_DEGREE
        } else {
            gauss::MAX_DEGREE
        };
        let choice = gauss::choose_degree_2d(&fe, &ge, max_var, tol, cap);
        PairKernel {
            f: f.clone(),
            g: g.clone(),
            f0,
            g0,
            plan: Plan::Quad {
                degree: choice.degree,
            },
            method: Method::GaussHermite {
                degree: choice.degree,
                dims: 2,
                kinked,
            },
            error: choice.error,
        }
    }

    pub fn method(&self) -> Method {
        self.method
    }

    /// Reuses what `old` (the same functions, prepared for smaller variances) has
    /// already computed and is still valid here: the smooth path's per-variance rows
    /// when both chose the same grid.
    pub fn adopt(&mut self, old: &PairKernel) {
        if let (Plan::Smooth(new), Plan::Smooth(prev)) = (&mut self.plan, &old.plan) {
            if let Some(new) = Arc::get_mut(new) {
                new.adopt_cache(prev);
            }
        }
    }

    /// Estimated absolute error of [`Self::eval`] for variances up to the `max_var`
    /// given at construction.
    pub fn error_bound(&self) -> f64 {
        match &self.plan {
            // may have grown with the entries evaluated so far (smooth.rs)
            Plan::Smooth(s) => s.error(),
            _ => self.error,
        }
    }

    /// `(c1, c2)` when `self` is `c1' E[relu relu]` and `second` is `c2' E[step step]`:
    /// the arc-cosine pair of a ReLU layer, `c1 = c1'/(2π)`, `c2 = c2'/(2π)`, so that
    /// `E = (c1 n J(rho), c2 (π - θ))` with [`fastmath::arccos_pair`].
    pub fn relu_step_consts(&self, second: &PairKernel) -> Option<(f64, f64)> {
        match (&self.plan, &second.plan) {
            (Plan::ReluRelu(c1), Plan::StepStep(c2)) => Some((*c1 / (2.0 * PI), *c2 / (2.0 * PI))),
            _ => None,
        }
    }

    pub fn is_closed_form(&self) -> bool {
        matches!(self.method, Method::ClosedForm(_))
    }

    /// `E[f(u) g(v)]` with `Var u = s11`, `Cov = s12`, `Var v = s22`. Slightly non-PSD
    /// input (round-off) is clamped; non-finite input gives NaN.
    pub fn eval(&self, s11: f64, s12: f64, s22: f64) -> f64 {
        let Some((s11, s12, s22)) = clamp_cov(s11, s12, s22) else {
            return f64::NAN;
        };
        match &self.plan {
            Plan::ReluRelu(c) => c * relu_relu(s11.sqrt() * s22.sqrt(), s12),
            Plan::StepStep(c) => c * step_step(s11.sqrt() * s22.sqrt(), s12),
            Plan::ErfErf { c, a, b } => {
                let r1 = 1.0 / (1.0 + 2.0 * a * a * s11).sqrt();
                let r2 = 1.0 / (1.0 + 2.0 * b * b * s22).sqrt();
                c * erf_erf(2.0 * a * b * r1 * r2, s12)
            }
            Plan::GaussGauss { c, a1, a2 } => {
                let t1 = 1.0 + 2.0 * a1 * s11;
                let t2 = 1.0 + 2.0 * a2 * s22;
                c * gauss_gauss(t1 * t2, 4.0 * a1 * a2, s12)
            }
            Plan::Terms(tf, tg) => {
                let z1 = s11 <= TINY_VAR;
                let z2 = s22 <= TINY_VAR;
                match (z1, z2) {
                    (true, true) => self.f0 * self.g0,
                    (true, false) => self.f0 * terms_mean(tg, s22),
                    (false, true) => self.g0 * terms_mean(tf, s11),
                    (false, false) => terms_pair(tf, tg, s11, s12, s22).map_or(f64::NAN, |r| r.0),
                }
            }
            Plan::OneDim {
                kind,
                scale,
                h,
                degree,
            } => {
                let e = |var: f64| gauss::expect1(&|x| h.eval(&[x]), var, *degree);
                match kind {
                    OneDim::ConstF => scale * e(s22),
                    OneDim::ConstG => scale * e(s11),
                    OneDim::SteinF => scale * s12 * e(s22),
                    OneDim::SteinG => scale * s12 * e(s11),
                }
            }
            Plan::Smooth(sm) => sm.eval(s11, s12, s22),
            Plan::Quad { degree } => {
                let fe = |x: f64| self.f.eval(&[x]);
                let ge = |x: f64| self.g.eval(&[x]);
                gauss::expect2(&fe, &ge, s11, s12, s22, *degree)
            }
        }
    }

    /// [`Self::eval`] with its error bound and method.
    pub fn estimate(&self, s11: f64, s12: f64, s22: f64) -> Estimate {
        Estimate {
            value: self.eval(s11, s12, s22),
            error: self.error,
            method: self.method,
        }
    }

    /// `out[(p, q)] = E[f(u_p) g(v_q)]` with `Var u_p = d1[p]`, `Var v_q = d2[q]`,
    /// `Cov(u_p, v_q) = cross[(p, q)]`. With `symmetric` (`d1 == d2`, `cross` symmetric)
    /// only the upper triangle is computed and then mirrored; the flag is ignored when
    /// `f != g`, since then `out` is not symmetric even if `cross` is.
    pub fn block(
        &self,
        d1: &[f64],
        d2: &[f64],
        cross: &DMatrix<f64>,
        symmetric: bool,
    ) -> DMatrix<f64> {
        let mut out = cross.clone();
        self.block_in_place(d1, d2, &mut out, symmetric);
        out
    }

    /// [`Self::block`] overwriting `cross`, so a kernel recursion on M points needs no
    /// second M x M matrix. Parallel over columns (rayon).
    pub fn block_in_place(
        &self,
        d1: &[f64],
        d2: &[f64],
        cross: &mut DMatrix<f64>,
        symmetric: bool,
    ) {
        check_shapes(d1, d2, cross, symmetric);
        let symmetric = symmetric && self.f == self.g;
        // The arc-cosine kernels: vectorized columns (one `acos` per entry).
        let arccos = match self.plan {
            Plan::ReluRelu(c) => Some((c / (2.0 * PI), true)),
            Plan::StepStep(c) => Some((c / (2.0 * PI), false)),
            _ => None,
        };
        if let Some((c, relu)) = arccos {
            let (s1, s2) = (sqrt_clamped(d1), sqrt_clamped(d2));
            let n = cross.nrows();
            if n > 0 {
                cross
                    .as_mut_slice()
                    .par_chunks_mut(n)
                    .enumerate()
                    .for_each(|(q, col)| {
                        let end = if symmetric { (q + 1).min(n) } else { n };
                        let mut scratch = [0.0f64; ARCCOS_CHUNK];
                        for (k, a) in col[..end].chunks_mut(ARCCOS_CHUNK).enumerate() {
                            let s1 = &s1[k * ARCCOS_CHUNK..k * ARCCOS_CHUNK + a.len()];
                            let b = &mut scratch[..a.len()];
                            if relu {
                                arccos_column(a, b, s1, s2[q], [c, 0.0], false);
                            } else {
                                // the covariances are read from the first slice
                                b.copy_from_slice(a);
                                arccos_column(b, a, s1, s2[q], [0.0, c], false);
                            }
                        }
                    });
                if symmetric {
                    fastmath::mirror_upper_par(cross.as_mut_slice(), n);
                }
            }
            return;
        }
        let prep = Prepared::new(self, d1, d2);
        drive(cross, symmetric, |p, q, x| prep.at(p, q, x));
    }

    /// Two kernels on the same covariances in one pass: `cross` is overwritten by this
    /// kernel and `second_out` receives `second` (overwritten or multiplied into,
    /// per `mode`). When `self` is relu·relu and `second` is step·step (the NNGP and
    /// `Sdot` of a ReLU layer, theory.md §3.1) both come from one `acos` per entry.
    /// With `symmetric`, only upper triangles are computed and mirrored, so in
    /// [`Combine::Multiply`] mode `second_out` must be symmetric on entry (as an NTK is).
    #[allow(clippy::too_many_arguments)]
    pub fn block_pair_in_place(
        &self,
        second: &PairKernel,
        d1: &[f64],
        d2: &[f64],
        cross: &mut DMatrix<f64>,
        second_out: &mut DMatrix<f64>,
        mode: Combine,
        symmetric: bool,
    ) {
        check_shapes(d1, d2, cross, symmetric);
        assert_eq!(cross.shape(), second_out.shape(), "second output shape");
        let symmetric = symmetric && self.f == self.g && second.f == second.g;
        let multiply = mode == Combine::Multiply;
        if let (Plan::ReluRelu(c1), Plan::StepStep(c2)) = (&self.plan, &second.plan) {
            let (c1, c2) = (*c1 / (2.0 * PI), *c2 / (2.0 * PI));
            let s1 = sqrt_clamped(d1);
            let s2 = sqrt_clamped(d2);
            let n = cross.nrows();
            if n == 0 {
                return;
            }
            cross
                .as_mut_slice()
                .par_chunks_mut(n)
                .zip(second_out.as_mut_slice().par_chunks_mut(n))
                .enumerate()
                .for_each(|(q, (ca, cb))| {
                    let end = if symmetric { (q + 1).min(n) } else { n };
                    arccos_column(
                        &mut ca[..end],
                        &mut cb[..end],
                        &s1[..end],
                        s2[q],
                        [c1, c2],
                        multiply,
                    );
                });
            if symmetric {
                fastmath::mirror_upper_par(cross.as_mut_slice(), n);
                fastmath::mirror_upper_par(second_out.as_mut_slice(), n);
            }
            return;
        }
        let p1 = Prepared::new(self, d1, d2);
        let p2 = Prepared::new(second, d1, d2);
        drive2(cross, second_out, multiply, symmetric, |p, q, x| {
            (p1.at(p, q, x), p2.at(p, q, x))
        });
    }
}

/// Entries per chunk when [`arccos_column`] needs a scratch column.
const ARCCOS_CHUNK: usize = 256;

fastmath::simd_fn! {
    /// One column of the arc-cosine pair (theory.md §3.2): with `n = s1[p] * s2q`,
    /// `a[p] <- c[0] E[relu relu] = c[0] n J(rho)` and `b[p] <- c[1] (π - θ)` (times the
    /// old `b[p]` when `multiply`), `rho = a[p] / n` snapped ([`snap_rho`]); zero
    /// variances give 0 (relu(0) = step(0) = 0) and NaN input NaN. Branch-free, so it
    /// vectorizes with [`fastmath::acos`].
    fn arccos_column(a: &mut [f64], b: &mut [f64], s1: &[f64], s2q: f64, c: [f64; 2], multiply: bool) {
        let [c1, c2] = c;
        for ((x, y), &sp) in a.iter_mut().zip(b.iter_mut()).zip(s1) {
            let n = sp * s2q;
            let xv = *x;
            let bad = n.is_nan() || xv.is_nan();
            let r = xv / n;
            let r = if r >= 1.0 - SNAP { 1.0 } else { r };
            let rho = if r <= -1.0 + SNAP { -1.0 } else { r };
            let (j, pt) = fastmath::arccos_pair(rho);
            let ok = n > 0.0;
            let u = if ok { c1 * (n * j) } else { 0.0 };
            let v = if ok { c2 * pt } else { 0.0 };
            *x = if bad { f64::NAN } else { u };
            let v = if bad { f64::NAN } else { v };
            *y = if multiply { *y * v } else { v };
        }
    }
}

/// Chooses a fast path when each side is a single atom of a matching kind.
fn fast_plan(tf: &Terms, tg: &Terms) -> Option<Plan> {
    match (tf.as_slice(), tg.as_slice()) {
        ([(c1, Atom::Relu)], [(c2, Atom::Relu)]) => Some(Plan::ReluRelu(c1 * c2)),
        ([(c1, Atom::Step)], [(c2, Atom::Step)]) => Some(Plan::StepStep(c1 * c2)),
        ([(c1, Atom::Erf(a))], [(c2, Atom::Erf(b))]) => Some(Plan::ErfErf {
            c: c1 * c2,
            a: *a,
            b: *b,
        }),
        (
            [(
                k1,
                Atom::Wave {
                    c: w1,
                    alpha: a1,
                    b: b1,
                },
            )],
            [(
                k2,
                Atom::Wave {
                    c: w2,
                    alpha: a2,
                    b: b2,
                },
            )],
        ) if *b1 == C64::ZERO && *b2 == C64::ZERO && w1.is_real() && w2.is_real() => {
            Some(Plan::GaussGauss {
                c: k1 * k2 * w1.re * w2.re,
                a1: *a1,
                a2: *a2,
            })
        }
        _ => None,
    }
}

/// `E[relu(u) relu(v)]` given `n = sqrt(S11 S22)` (theory.md §3.2).
#[inline]
fn relu_relu(n: f64, s12: f64) -> f64 {
    if n.is_nan() || s12.is_nan() {
        return f64::NAN;
    }
    if n <= 0.0 {
        return 0.0;
    }
    let rho = snap_rho(s12 / n);
    n * arccos1(rho) / (2.0 * PI)
}

/// `E[step(u) step(v)] = (pi - theta)/(2 pi)`; 0 if a variance is 0 (step(0) = 0).
#[inline]
fn step_step(n: f64, s12: f64) -> f64 {
    if n.is_nan() || s12.is_nan() {
        return f64::NAN;
    }
    if n <= 0.0 {
        return 0.0;
    }
    let rho = snap_rho(s12 / n);
    (PI - libm::acos(rho)) / (2.0 * PI)
}

/// Williams: `(2/pi) asin(k S12)` with `k = 2ab / sqrt((1+2a^2 S11)(1+2b^2 S22))`.
#[inline]
fn erf_erf(k: f64, s12: f64) -> f64 {
    2.0 / PI * (k * s12).clamp(-1.0, 1.0).asin()
}

/// `E[e^{-a1 u^2} e^{-a2 v^2}] = (t1 t2 - 4 a1 a2 S12^2)^{-1/2}`, `t = 1 + 2 a S`.
#[inline]
fn gauss_gauss(t1t2: f64, four_a1a2: f64, s12: f64) -> f64 {
    // det >= t1 + t2 - 1 >= 1 for PSD input; the max guards against round-off only.
    1.0 / (t1t2 - four_a1a2 * s12 * s12).max(1.0).sqrt()
}

fn sqrt_clamped(d: &[f64]) -> Vec<f64> {
    d.iter()
        .map(|&v| {
            if v.is_nan() {
                f64::NAN
            } else {
                v.max(0.0).sqrt()
            }
        })
        .collect()
}

fn check_shapes(d1: &[f64], d2: &[f64], cross: &DMatrix<f64>, symmetric: bool) {
    assert_eq!(cross.nrows(), d1.len(), "rows of cross vs d1");
    assert_eq!(cross.ncols(), d2.len(), "columns of cross vs d2");
    if symmetric {
        assert_eq!(d1.len(), d2.len(), "symmetric block must be square");
    }
}

/// Per-block precomputation (square roots, erf normalizers), so that an entry costs one
/// transcendental function on the fast paths.
enum Prepared<'a> {
    Relu {
        c: f64,
        s1: Vec<f64>,
        s2: Vec<f64>,
    },
    Step {
        c: f64,
        s1: Vec<f64>,
        s2: Vec<f64>,
    },
    Erf {
        c: f64,
        r1: Vec<f64>,
        r2: Vec<f64>,
    },
    Gauss {
        c: f64,
        t1: Vec<f64>,
        t2: Vec<f64>,
        k: f64,
    },
    Smooth(SmoothBlock<'a>),
    General {
        k: &'a PairKernel,
        d1: &'a [f64],
        d2: &'a [f64],
    },
}

impl<'a> Prepared<'a> {
    fn new(k: &'a PairKernel, d1: &'a [f64], d2: &'a [f64]) -> Prepared<'a> {
        let pos = |v: f64| if v.is_nan() { f64::NAN } else { v.max(0.0) };
        match k.plan {
            Plan::ReluRelu(c) => Prepared::Relu {
                c,
                s1: sqrt_clamped(d1),
                s2: sqrt_clamped(d2),
            },
            Plan::StepStep(c) => Prepared::Step {
                c,
                s1: sqrt_clamped(d1),
                s2: sqrt_clamped(d2),
            },
            Plan::ErfErf { c, a, b } => Prepared::Erf {
                c,
                // fold 2ab into the row factor
                r1: d1
                    .iter()
                    .map(|&s| 2.0 * a * b / (1.0 + 2.0 * a * a * pos(s)).sqrt())
                    .collect(),
                r2: d2
                    .iter()
                    .map(|&s| 1.0 / (1.0 + 2.0 * b * b * pos(s)).sqrt())
                    .collect(),
            },
            Plan::GaussGauss { c, a1, a2 } => Prepared::Gauss {
                c,
                t1: d1.iter().map(|&s| 1.0 + 2.0 * a1 * pos(s)).collect(),
                t2: d2.iter().map(|&s| 1.0 + 2.0 * a2 * pos(s)).collect(),
                k: 4.0 * a1 * a2,
            },
            Plan::Smooth(ref sm) => Prepared::Smooth(sm.block(d1, d2)),
            _ => Prepared::General { k, d1, d2 },
        }
    }

    #[inline]
    fn at(&self, p: usize, q: usize, x: f64) -> f64 {
        match self {
            Prepared::Relu { c, s1, s2 } => c * relu_relu(s1[p] * s2[q], x),
            Prepared::Step { c, s1, s2 } => c * step_step(s1[p] * s2[q], x),
            Prepared::Erf { c, r1, r2 } => c * erf_erf(r1[p] * r2[q], x),
            Prepared::Gauss { c, t1, t2, k } => c * gauss_gauss(t1[p] * t2[q], *k, x),
            Prepared::Smooth(s) => s.at(p, q, x),
            Prepared::General { k, d1, d2 } => k.eval(d1[p], x, d2[q]),
        }
    }
}

/// Applies `entry(p, q, cross[(p, q)])` to every entry (upper triangle only when
/// `symmetric`, then mirrored), columns in parallel.
fn drive<F>(m: &mut DMatrix<f64>, symmetric: bool, entry: F)
where
    F: Fn(usize, usize, f64) -> f64 + Sync,
{
    let n = m.nrows();
    if n == 0 || m.ncols() == 0 {
        return;
    }
    m.as_mut_slice()
        .par_chunks_mut(n)
        .enumerate()
        .for_each(|(q, col)| {
            let end = if symmetric { (q + 1).min(n) } else { n };
            for (p, x) in col[..end].iter_mut().enumerate() {
                *x = entry(p, q, *x);
            }
        });
    if symmetric {
        fastmath::mirror_upper_par(m.as_mut_slice(), n);
    }
}

/// Two outputs from one pass; see [`PairKernel::block_pair_in_place`].
fn drive2<F>(a: &mut DMatrix<f64>, b: &mut DMatrix<f64>, multiply: bool, symmetric: bool, entry: F)
where
    F: Fn(usize, usize, f64) -> (f64, f64) + Sync,
{
    let n = a.nrows();
    if n == 0 || a.ncols() == 0 {
        return;
    }
    a.as_mut_slice()
        .par_chunks_mut(n)
        .zip(b.as_mut_slice().par_chunks_mut(n))
        .enumerate()
        .for_each(|(q, (ca, cb))| {
            let end = if symmetric { (q + 1).min(n) } else { n };
            for (p, (x, y)) in ca[..end].iter_mut().zip(&mut cb[..end]).enumerate() {
                let (u, v) = entry(p, q, *x);
                *x = u;
                *y = if multiply { *y * v } else { v };
            }
        });
    if symmetric {
        fastmath::mirror_upper_par(a.as_mut_slice(), n);
        fastmath::mirror_upper_par(b.as_mut_slice(), n);
    }
}

// ----------------------------------------------------------------------------------
// One-dimensional expectations

/// `E[f(u)]`, `u ~ N(0, s)`, prepared once: closed form when `f` is recognized (every
/// atom has a closed mean), else 1-D Gauss–Hermite with the degree chosen for `tol`
/// at `max_var`. (For `E[f(u)^2]` use `PairKernel::new(f, f, ..).eval(s, s, s)`, which
/// collapses to the 1-D rule on the diagonal.)
#[derive(Clone, Debug)]
pub struct MeanKernel {
    f: Expr,
    f0: f64,
    terms: Option<Terms>,
    degree: usize,
    method: Method,
    error: f64,
}

impl MeanKernel {
    /// # Panics
    /// If `f` reads an operand other than `Arg(0)`.
    pub fn new(f: &Expr, max_var: f64, tol: f64) -> MeanKernel {
        assert_one_argument(f);
        let f0 = f.eval(&[0.0]);
        if let Some(t) = recognize(f) {
            let mut fam = Families::default();
            for &(_, a) in &t {
                fam = fam.union(match a {
                    Atom::One | Atom::X => Families::LINEAR,
                    Atom::Step | Atom::Relu => Families::ARC_COSINE,
                    Atom::Erf(_) => Families::PARITY,
                    Atom::Wave { .. } => Families::GAUSSIAN,
                });
            }
            return MeanKernel {
                f: f.clone(),
                f0,
                terms: Some(t),
                degree: 0,
                method: Method::ClosedForm(fam),
                error: 64.0 * f64::EPSILON * max_var.abs().max(1.0),
            };
        }
        let kinked = is_kinked(f);
        let fe = |x: f64| f.eval(&[x]);
        let c = gauss::choose_degree_1d(&fe, max_var, tol);
        MeanKernel {
            f: f.clone(),
            f0,
            terms: None,
            degree: c.degree,
            method: Method::GaussHermite {
                degree: c.degree,
                dims: 1,
                kinked,
            },
            error: c.error,
        }
    }

    pub fn method(&self) -> Method {
        self.method
    }

    pub fn error_bound(&self) -> f64 {
        self.error
    }

    /// `E[f(u)]`, `Var u = s` (clamped at 0; NaN for non-finite `s`).
    pub fn eval(&self, s: f64) -> f64 {
        if !s.is_finite() {
            return f64::NAN;
        }
        if s <= TINY_VAR {
            return self.f0;
        }
        match &self.terms {
            Some(t) => terms_mean(t, s),
            None => gauss::expect1(&|x| self.f.eval(&[x]), s, self.degree),
        }
    }
}

/// One-off `E[f(u) g(v)]` with its error and method (builds a [`PairKernel`] for the
/// larger of the two variances).
pub fn pair_expectation(f: &Expr, g: &Expr, s11: f64, s12: f64, s22: f64, tol: f64) -> Estimate {
    PairKernel::new(f, g, s11.max(s22), tol).estimate(s11, s12, s22)
}

/// Correlations within this of ±1 are read as ±1 ([`snap_rho`]).
pub const SNAP: f64 = 1e-14;

/// A correlation clamped to [-1, 1], with values within 1e-14 of ±1 taken as exactly ±1.
///
/// Why: `acos` is not Lipschitz at ±1 (θ ≈ sqrt(2(1-ρ))), so the few ulps of round-off
/// that every covariance recursion leaves on collinear inputs (ρ exactly 1 in exact
/// arithmetic) would become errors of 1e-8 in θ. Snapping reads such inputs as what they
/// are; a genuine 1 - ρ below 1e-14 is below the accuracy ρ is known to anyway.
#[inline]
pub fn snap_rho(r: f64) -> f64 {
    if r >= 1.0 - SNAP {
        1.0
    } else if r <= -1.0 + SNAP {
        -1.0
    } else {
        r
    }
}

#[cfg(test)]
mod tests;
