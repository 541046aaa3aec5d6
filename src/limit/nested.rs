//! Expectations over independent Gaussian families whose integrand does not factor
//! (issue 18): iterated one-dimensional rules, family by family, split at the kinks.
//!
//! Why: a Ż term through a nonlinearity nests one family inside another, e.g.
//! `Z = relu(Ẑ^{Wᵀ x} + s(ξ)·relu(Ẑ^{U x}))` (theory.md §2.1). At a pair of points the
//! expectation `E[Z(ξ_p) Z(ξ_q)]` is over two 2-D Gaussians — `(Ẑ^{Wᵀ x}(ξ_p), Ẑ^{Wᵀ
//! x}(ξ_q))` and `(Ẑ^{U x}(ξ_p), Ẑ^{U x}(ξ_q))` — that are independent (different
//! matrices, theory.md §2.1), but the integrand is not a product over them, so
//! [`super::engine`]'s factorization does not apply and a 4-D rule (QMC) was the only
//! one left. Here the covariance's independent blocks are integrated one after the
//! other: `E[F] = E_B[ E_A[ F | x_B ] ]`, each block written through its Cholesky
//! factor as conditional 1-D Gaussians, `x = L z` with `z` standard.
//!
//! Each 1-D integral `∫ h(z_i) φ(z_i) dz_i` (outer `z` fixed) is a Gauss–Legendre rule
//! on panels of `[-T, T]` split at every kink of the integrand in `z_i` (a zero of the
//! argument of a relu, step or abs): on each panel the integrand is analytic, so the
//! rule converges geometrically, where Gauss–Hermite on a kinked integrand converges
//! only algebraically (theory.md §3.3). A kink is located exactly when its argument is
//! linear in the variable of the level where it is last touched; the variables are
//! ordered (blocks permuted) so that this holds for every kink, and then integrating
//! that variable leaves a function smooth in the outer ones (the kink's location moves
//! smoothly with them). No such order: `None`, and the engine keeps its general rule.
//!
//! Stated error: the rule at two degrees, `2·|Q_n − Q_m|` (m < n; geometric convergence
//! makes this an overstatement of `|Q_n − E|`), plus the Gaussian tail beyond `T`
//! (estimated from the integrand at the outermost nodes) and rounding. Degrees grow
//! until that meets the tolerance or the work cap; the estimate is a deterministic
//! statement, not a statistical one.

use std::sync::OnceLock;

use nalgebra::DMatrix;

use super::gauss::{Estimate, Method};
use crate::ir::expr::{Expr, Fun};

/// Most standard Gaussians integrated one inside the other.
pub const MAX_DIMS: usize = 4;

/// Truncation of every standard variable: `2·Φ(−T) ≈ 1.2·10⁻¹⁵`.
const T: f64 = 8.0;

/// Longest panel (in standard deviations) of one Gauss–Legendre rule.
const PANEL: f64 = 4.0;

/// Degrees tried, in order (equal steps: the stated error reads a contraction per step).
const DEGREES: [usize; 5] = [8, 12, 16, 20, 24];

/// Most integrand evaluations spent on one expectation (all degrees together).
const WORK_CAP: f64 = 4e8;

/// Relative variance below which a conditional variable is a function of earlier ones.
const RANK_TOL: f64 = 1e-12;

/// `n`-point Gauss–Legendre nodes and weights on [-1, 1] (Newton on `P_n`).
fn legendre(n: usize) -> &'static (Vec<f64>, Vec<f64>) {
    const MAX: usize = 64;
    static RULES: [OnceLock<(Vec<f64>, Vec<f64>)>; MAX + 1] = [const { OnceLock::new() }; MAX + 1];
    let n = n.clamp(1, MAX);
    RULES[n].get_or_init(|| {
        let mut x = vec![0.0; n];
        let mut w = vec![0.0; n];
        for i in 0..n {
            let mut t = (std::f64::consts::PI * (i as f64 + 0.75) / (n as f64 + 0.5)).cos();
            let mut dp = 1.0;
            for _ in 0..100 {
                let (mut p0, mut p1) = (1.0, t);
                for k in 2..=n {
                    let p2 = ((2 * k - 1) as f64 * t * p1 - (k - 1) as f64 * p0) / k as f64;
                    p0 = p1;
                    p1 = p2;
                }
                dp = n as f64 * (t * p1 - p0) / (t * t - 1.0);
                let dt = p1 / dp;
                t -= dt;
                if dt.abs() < 1e-16 {
                    break;
                }
            }
            x[i] = t;
            w[i] = 2.0 / ((1.0 - t * t) * dp * dp);
        }
        (x, w)
    })
}

fn phi(z: f64) -> f64 {
    (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// A kinked function's argument, located at the level of its last variable.
struct Kink {
    arg: Expr,
    /// `∂arg/∂z_level` (constant: the argument is linear in that variable).
    slope: f64,
}

/// The integrand as factors, each evaluated at the level of its last variable.
struct Plan {
    /// `x_j = Σ (m, c) c·z_m`.
    rows: Vec<Vec<(usize, f64)>>,
    d: usize,
    /// Per level: factors and kinks that level completes.
    factors: Vec<Vec<Expr>>,
    kinks: Vec<Vec<Kink>>,
    /// Product of the factors that use no Gaussian.
    konst: f64,
    /// The degree of the innermost level's integrand in its variable when it is a
    /// piecewise polynomial (affine forms, relu, abs and step of them, products): that
    /// level is then integrated exactly, piece by piece, by Gaussian moments.
    poly_last: Option<usize>,
}

/// Most degree of a piecewise polynomial integrated exactly at the innermost level.
const MAX_POLY: usize = 4;

/// The degree in `z` of `e`, a piecewise polynomial whose pieces end at zeros of
/// its kinks' arguments, given which operands depend on `z`; None otherwise.
fn poly_degree(e: &Expr, dep: &dyn Fn(usize) -> bool) -> Option<usize> {
    Some(match e {
        Expr::Arg(j) => usize::from(dep(*j)),
        Expr::Const(_) => 0,
        Expr::Call(f, x) => match (poly_degree(x, dep)?, f) {
            (0, _) => 0,
            (1, Fun::Relu | Fun::Abs | Fun::Id) => 1,
            (1, Fun::Step) => 0,
            (d, Fun::Id) => d,
            _ => return None,
        },
        Expr::Neg(x) => poly_degree(x, dep)?,
        Expr::Add(a, b) | Expr::Sub(a, b) => poly_degree(a, dep)?.max(poly_degree(b, dep)?),
        Expr::Mul(a, b) => poly_degree(a, dep)? + poly_degree(b, dep)?,
        Expr::Div(a, b) => match poly_degree(b, dep)? {
            0 => poly_degree(a, dep)?,
            _ => return None,
        },
        Expr::Powi(a, k) if *k >= 0 => poly_degree(a, dep)? * *k as usize,
        Expr::Powi(a, _) => match poly_degree(a, dep)? {
            0 => 0,
            _ => return None,
        },
    })
}

/// `E[f(x)]`, `x ~ N(0, cov)`, when `cov` splits into at least two independent blocks
/// (Gaussian families) and the integrand does not factor over them; `None` when the
/// covariance has one block, more than [`MAX_DIMS`] independent directions, or no
/// order of its blocks in which every kink is located exactly (see the module doc).
pub fn expect(f: &Expr, cov: &DMatrix<f64>, tol: f64) -> Option<Estimate> {
    let k = cov.nrows();
    if k == 0 || cov.ncols() != k || cov.iter().any(|v| !v.is_finite()) {
        return None;
    }
    // Blocks: connected components of the nonzero off-diagonal pattern, over the
    // variables of nonzero variance (the others are the constant 0).
    let live: Vec<usize> = (0..k).filter(|&j| cov[(j, j)] > 0.0).collect();
    let mut comp: Vec<usize> = (0..k).collect();
    fn root(c: &mut [usize], mut i: usize) -> usize {
        while c[i] != i {
            c[i] = c[c[i]];
            i = c[i];
        }
        i
    }
    for &i in &live {
        for &j in &live {
            if i < j && cov[(i, j)] != 0.0 {
                let (a, b) = (root(&mut comp, i), root(&mut comp, j));
                comp[a.max(b)] = a.min(b);
            }
        }
    }
    let mut blocks: Vec<Vec<usize>> = Vec::new();
    for &j in &live {
        let r = root(&mut comp, j);
        match blocks.iter_mut().find(|b| root(&mut comp, b[0]) == r) {
            Some(b) => b.push(j),
            None => blocks.push(vec![j]),
        }
    }
    if blocks.len() < 2 {
        return None;
    }
    // Cholesky per block, in the variables' order, dropping dependent directions:
    // rows[j] over the block's own standard variables (numbered within the block).
    let mut local: Vec<Vec<(usize, f64)>> = vec![Vec::new(); k];
    let mut dims = Vec::with_capacity(blocks.len());
    for b in &blocks {
        let mut cols: Vec<usize> = Vec::new(); // variable that opened each direction
        for &j in b {
            let dot = |r1: &[(usize, f64)], r2: &[(usize, f64)]| -> f64 {
                r1.iter()
                    .map(|&(m, c)| c * r2.iter().find(|e| e.0 == m).map_or(0.0, |e| e.1))
                    .sum()
            };
            let mut row: Vec<(usize, f64)> = Vec::new();
            for (m, &i) in cols.iter().enumerate() {
                let lii = local[i].iter().find(|e| e.0 == m).map_or(0.0, |e| e.1);
                let c = (cov[(j, i)] - dot(&row, &local[i])) / lii;
                row.push((m, c));
            }
            let rest = cov[(j, j)] - row.iter().map(|e| e.1 * e.1).sum::<f64>();
            if rest > RANK_TOL * cov[(j, j)] {
                row.push((cols.len(), rest.sqrt()));
                cols.push(j);
            }
            row.retain(|e| e.1 != 0.0);
            local[j] = row;
        }
        dims.push(cols.len());
    }
    // Linearity, then independence: every term of the expanded integrand is a product
    // of factors; factors that share no block are integrated apart (theory.md §1.2).
    let block_of: Vec<Option<usize>> = (0..k)
        .map(|j| blocks.iter().position(|b| b.contains(&j)))
        .collect();
    let mut total = 0.0;
    let mut err = 0.0;
    let (mut deg, mut dmax) = (0, 0);
    for (c, fs) in expand(f)? {
        let (mut val, mut e) = (c, 0.0);
        for (sel, group) in group_by_blocks(&fs, &block_of, blocks.len()) {
            let g = integrate_group(&sel, &group, &blocks, &dims, &local, k, tol)?;
            if let Method::Nested { degree, dims } = g.method {
                deg = deg.max(degree);
                dmax = dmax.max(dims);
            }
            e = val.abs() * g.error + g.value.abs() * e + e * g.error;
            val *= g.value;
        }
        total += val;
        err += e;
    }
    Some(Estimate {
        value: total,
        error: err,
        method: Method::Nested {
            degree: deg,
            dims: dmax,
        },
    })
}

/// Most terms a product of sums is expanded into.
const MAX_TERMS: usize = 64;

/// `f = Σ_t c_t Π_k f_{t,k}` through `+`, `−`, `*` and constant factors; None past
/// [`MAX_TERMS`] terms.
fn expand(e: &Expr) -> Option<Vec<(f64, Vec<Expr>)>> {
    let scale = |v: Vec<(f64, Vec<Expr>)>, s: f64| v.into_iter().map(|(c, f)| (c * s, f)).collect();
    let out: Vec<(f64, Vec<Expr>)> = match e {
        Expr::Const(c) => vec![(*c, Vec::new())],
        Expr::Add(a, b) => {
            let mut v = expand(a)?;
            v.extend(expand(b)?);
            v
        }
        Expr::Sub(a, b) => {
            let mut v = expand(a)?;
            v.extend(scale(expand(b)?, -1.0));
            v
        }
        Expr::Neg(x) => scale(expand(x)?, -1.0),
        Expr::Div(a, b) if b.is_constant() => scale(expand(a)?, 1.0 / b.eval(&[])),
        Expr::Mul(a, b) => {
            let (va, vb) = (expand(a)?, expand(b)?);
            if va.len() * vb.len() > MAX_TERMS {
                return None;
            }
            let mut v = Vec::with_capacity(va.len() * vb.len());
            for (ca, fa) in &va {
                for (cb, fb) in &vb {
                    v.push((ca * cb, fa.iter().chain(fb).cloned().collect()));
                }
            }
            v
        }
        _ => vec![(1.0, vec![e.clone()])],
    };
    (out.len() <= MAX_TERMS).then_some(out)
}

/// The factors grouped so that no two groups share a block: (blocks, factors) per
/// group; factors of no Gaussian form a group of no block (their product is a number).
fn group_by_blocks(
    fs: &[Expr],
    block_of: &[Option<usize>],
    nblocks: usize,
) -> Vec<(Vec<usize>, Vec<Expr>)> {
    let mut groups: Vec<(Vec<usize>, Vec<Expr>)> = Vec::new();
    for f in fs {
        let mut mine: Vec<usize> = Vec::new();
        f.visit_args(&mut |j| {
            if let Some(b) = block_of[j] {
                if !mine.contains(&b) {
                    mine.push(b);
                }
            }
        });
        let mut item = (mine, vec![f.clone()]);
        let mut g = 0;
        while g < groups.len() {
            let shares = groups[g].0.iter().any(|b| item.0.contains(b))
                || (groups[g].0.is_empty() && item.0.is_empty());
            if shares {
                let (bs, fs) = groups.swap_remove(g);
                for b in bs {
                    if !item.0.contains(&b) {
                        item.0.push(b);
                    }
                }
                item.1.extend(fs);
            } else {
                g += 1;
            }
        }
        groups.push(item);
    }
    debug_assert!(groups.iter().all(|g| g.0.iter().all(|&b| b < nblocks)));
    for g in &mut groups {
        g.0.sort_unstable();
    }
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    groups
}

/// `E[Π group]` over the blocks `sel`; None past [`MAX_DIMS`] directions or when no
/// order of the blocks locates every kink.
fn integrate_group(
    sel: &[usize],
    fs: &[Expr],
    blocks: &[Vec<usize>],
    dims: &[usize],
    local: &[Vec<(usize, f64)>],
    k: usize,
    tol: f64,
) -> Option<Estimate> {
    if sel.is_empty() {
        let zero = vec![0.0; k];
        let v: f64 = fs.iter().map(|f| f.eval(&zero)).product();
        return Some(Estimate {
            value: v,
            error: 0.0,
            method: Method::Nested { degree: 0, dims: 0 },
        });
    }
    let d: usize = sel.iter().map(|&b| dims[b]).sum();
    if d > MAX_DIMS {
        return None;
    }
    let mut kinks = Vec::new();
    for f in fs {
        collect_kinks(f, &mut kinks);
    }
    let plan = permutations(sel.len()).into_iter().find_map(|perm| {
        let order: Vec<usize> = perm.iter().map(|&i| sel[i]).collect();
        plan(blocks, dims, &order, local, k, fs, &kinks)
    })?;
    Some(integrate(&plan, k, tol))
}

/// Every argument of a relu, step or abs in `f` (nested ones too).
fn collect_kinks(f: &Expr, out: &mut Vec<Expr>) {
    match f {
        Expr::Arg(_) | Expr::Const(_) => {}
        Expr::Call(fun, x) => {
            if matches!(fun, Fun::Relu | Fun::Step | Fun::Abs) && !x.is_constant() {
                out.push((**x).clone());
            }
            collect_kinks(x, out);
        }
        Expr::Neg(x) | Expr::Powi(x, _) => collect_kinks(x, out),
        Expr::Add(a, b) | Expr::Sub(a, b) | Expr::Mul(a, b) | Expr::Div(a, b) => {
            collect_kinks(a, out);
            collect_kinks(b, out);
        }
    }
}

/// All orders of `n` blocks (n ≤ MAX_DIMS), the given order first.
fn permutations(n: usize) -> Vec<Vec<usize>> {
    fn go(rest: &mut Vec<usize>, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if rest.is_empty() {
            out.push(cur.clone());
            return;
        }
        for i in 0..rest.len() {
            let x = rest.remove(i);
            cur.push(x);
            go(rest, cur, out);
            cur.pop();
            rest.insert(i, x);
        }
    }
    let mut out = Vec::new();
    go(&mut (0..n).collect(), &mut Vec::new(), &mut out);
    out
}

/// The plan for one order `perm` of the blocks it integrates, or None when a kink's argument is not linear
/// in the variable of its level.
fn plan(
    blocks: &[Vec<usize>],
    dims: &[usize],
    perm: &[usize],
    local: &[Vec<(usize, f64)>],
    k: usize,
    fs: &[Expr],
    kinks: &[Expr],
) -> Option<Plan> {
    let mut offset = vec![usize::MAX; blocks.len()];
    let mut next = 0;
    for &b in perm {
        offset[b] = next;
        next += dims[b];
    }
    let d = next;
    let mut rows: Vec<Vec<(usize, f64)>> = vec![Vec::new(); k];
    for &b in perm {
        for &j in &blocks[b] {
            rows[j] = local[j].iter().map(|&(m, c)| (offset[b] + m, c)).collect();
        }
    }
    // The last standard variable an expression depends on.
    let level = |e: &Expr| -> Option<usize> {
        let mut top = None;
        e.visit_args(&mut |j| {
            for &(m, _) in &rows[j] {
                top = Some(top.map_or(m, |t: usize| t.max(m)));
            }
        });
        top
    };
    let mut plan = Plan {
        rows: rows.clone(),
        d,
        factors: vec![Vec::new(); d],
        kinks: (0..d).map(|_| Vec::new()).collect(),
        konst: 1.0,
        poly_last: None,
    };
    for u in kinks {
        let Some(i) = level(u) else { continue };
        // ∂u/∂z_i = Σ_j ∂u/∂x_j · L_ji over the operands that involve z_i, each of
        // which u must use linearly (a constant partial).
        let mut seen: Vec<usize> = Vec::new();
        u.visit_args(&mut |j| {
            if !seen.contains(&j) {
                seen.push(j);
            }
        });
        let mut slope = 0.0;
        for &j in &seen {
            if let Some(&(_, c)) = rows[j].iter().find(|e| e.0 == i) {
                let dj = u.diff(j);
                if !dj.is_constant() {
                    return None;
                }
                slope += dj.eval(&[]) * c;
            }
        }
        if slope == 0.0 || !slope.is_finite() {
            return None;
        }
        plan.kinks[i].push(Kink {
            arg: u.clone(),
            slope,
        });
    }
    for f in fs {
        match level(f) {
            Some(i) => plan.factors[i].push(f.clone()),
            None => plan.konst *= f.eval(&vec![0.0; k]),
        }
    }
    if d > 0 {
        let dep = |j: usize| rows[j].iter().any(|e| e.0 == d - 1);
        let mut total = Some(0);
        for f in &plan.factors[d - 1] {
            total = total.and_then(|t| Some(t + poly_degree(f, &dep)?));
        }
        plan.poly_last = total.filter(|&t| t <= MAX_POLY);
    }
    Some(plan)
}

/// One pass of the rule at degree `n`.
struct Pass {
    value: f64,
    /// Σ |weight · value|, for rounding.
    abs: f64,
    tail: f64,
    /// Integrand evaluations, for the work cap.
    evals: f64,
}

/// Runs the rule at increasing degrees. With `d_k = |Q_k − Q_{k−1}|` for consecutive
/// degrees (equal steps of 4 nodes per panel) and the observed contraction
/// `r = d_k / d_{k−1}` (clamped to [0.05, 0.9]), the error of `Q_k` is stated as
/// `2·d_k·r/(1 − r)`: a geometric tail, as `gauss::select_degree` states for
/// Gauss–Hermite, trusted only once two differences have been seen. Plus the tail
/// beyond ±T and rounding.
fn integrate(plan: &Plan, k: usize, tol: f64) -> Estimate {
    let run = |n: usize| -> Pass {
        let (v, a, t, evals) = if plan.d >= 3 {
            parallel_top(plan, n, k)
        } else {
            let mut z = vec![0.0; plan.d];
            let mut x = vec![0.0; k];
            let mut evals = 0.0;
            let (v, a, t) = level(plan, 0, n, &mut z, &mut x, &mut evals);
            (v, a, t, evals)
        };
        Pass {
            value: plan.konst * v,
            abs: plan.konst.abs() * a,
            tail: plan.konst.abs() * t,
            evals,
        }
    };
    let method = |n: usize| Method::Nested {
        degree: n,
        dims: plan.d,
    };
    let mut passes = vec![run(DEGREES[0]), run(DEGREES[1])];
    let mut spent: f64 = passes.iter().map(|p| p.evals).sum();
    let mut best = Estimate {
        value: passes[1].value,
        error: f64::INFINITY,
        method: method(DEGREES[1]),
    };
    for w in DEGREES.windows(2).skip(1) {
        let (m, n) = (w[0], w[1]);
        let last = &passes[passes.len() - 1];
        let ratio = (n as f64 / m as f64).powi(plan.d as i32);
        if best.error.is_finite() && spent + last.evals * ratio > WORK_CAP {
            break;
        }
        let cur = run(n);
        spent += cur.evals;
        let q = |i: usize| passes[passes.len() - i].value;
        let (d_prev, d) = ((q(1) - q(2)).abs(), (cur.value - q(1)).abs());
        let r = if d_prev > 0.0 {
            (d / d_prev).clamp(0.05, 0.9)
        } else if d == 0.0 {
            0.05
        } else {
            0.9
        };
        let error =
            2.0 * d * r / (1.0 - r) + cur.tail + 64.0 * f64::EPSILON * cur.abs.max(cur.value.abs());
        best = Estimate {
            value: cur.value,
            error,
            method: method(n),
        };
        passes.push(cur);
        if error <= tol * best.value.abs().max(1.0) {
            break;
        }
    }
    best
}

/// [`level`] 0 with its nodes on all cores (sums in node order: the same bytes
/// whatever the thread count).
fn parallel_top(plan: &Plan, n: usize, k: usize) -> (f64, f64, f64, f64) {
    use rayon::prelude::*;
    let mut z = vec![0.0; plan.d];
    let mut x = vec![0.0; k];
    let pts = nodes(plan, 0, n, &mut z, &mut x);
    let per: Vec<(f64, f64, f64, f64)> = pts
        .par_iter()
        .map(|&(zi, wt)| {
            let mut z = vec![0.0; plan.d];
            let mut x = vec![0.0; k];
            let mut evals = 1.0;
            z[0] = zi;
            fill_x(plan, &z, &mut x);
            let mut fv = 1.0;
            for f in &plan.factors[0] {
                fv *= f.eval(&x);
            }
            if fv == 0.0 {
                return (0.0, 0.0, 0.0, evals);
            }
            let (v, a, t) = level(plan, 1, n, &mut z, &mut x, &mut evals);
            (wt * fv * v, wt * (fv * a).abs(), wt * (fv * t).abs(), evals)
        })
        .collect();
    let (mut sum, mut abs, mut tail, mut evals) = (0.0, 0.0, 0.0, 0.0);
    for (v, a, t, e) in &per {
        sum += v;
        abs += a;
        tail += t;
        evals += e;
    }
    let edge = |i: usize| (per[i].0 / pts[i].1).abs();
    if !per.is_empty() {
        tail += 10.0 * (edge(0) + edge(per.len() - 1)) * phi(T) / T;
    }
    (sum, abs, tail, evals)
}

fn fill_x(plan: &Plan, z: &[f64], x: &mut [f64]) {
    for (xj, row) in x.iter_mut().zip(&plan.rows) {
        *xj = row.iter().map(|&(m, c)| c * z[m]).sum();
    }
}

/// Degree on a panel: `n` where the Gaussian weight matters most (|z| < 3), two thirds
/// of it (at least 8) in the tails, whose weight is below φ(3) ≈ 4·10⁻³.
fn panel_degree(n: usize, lo: f64, hi: f64) -> usize {
    if lo < 3.0 && hi > -3.0 {
        n
    } else {
        (2 * n / 3).max(8)
    }
}

/// Gauss–Legendre nodes and weights (φ included) of level `i`, panels split at the
/// kinks located there.
fn nodes(plan: &Plan, i: usize, n: usize, z: &mut [f64], x: &mut [f64]) -> Vec<(f64, f64)> {
    let mut cuts = vec![-T, T];
    z[i] = 0.0;
    fill_x(plan, z, x);
    for kink in &plan.kinks[i] {
        let t = -kink.arg.eval(x) / kink.slope;
        if t.is_finite() && t.abs() < T {
            cuts.push(t);
        }
    }
    cuts.sort_by(f64::total_cmp);
    cuts.dedup();
    let mut out = Vec::with_capacity(cuts.len() * n * 2);
    for c in cuts.windows(2) {
        let len = c[1] - c[0];
        if len <= 0.0 {
            continue;
        }
        let parts = (len / PANEL).ceil().max(1.0) as usize;
        let h = len / parts as f64;
        for p in 0..parts {
            let (lo, hi) = (c[0] + h * p as f64, c[0] + h * (p + 1) as f64);
            let (mid, half) = (0.5 * (lo + hi), 0.5 * (hi - lo));
            let (ts, ws) = legendre(panel_degree(n, lo, hi));
            for (t, w) in ts.iter().zip(ws) {
                let zi = mid + half * t;
                out.push((zi, half * w * phi(zi)));
            }
        }
    }
    out
}

/// `∫ Π_{factors at i} · (inner levels) φ(z_i) dz_i` with `z_0 .. z_{i-1}` fixed:
/// (value, Σ|w·h|, tail estimate).
fn level(
    plan: &Plan,
    i: usize,
    n: usize,
    z: &mut [f64],
    x: &mut [f64],
    evals: &mut f64,
) -> (f64, f64, f64) {
    if i == plan.d {
        return (1.0, 1.0, 0.0);
    }
    if i + 1 == plan.d {
        if let Some(deg) = plan.poly_last {
            return exact_last(plan, i, deg, z, x, evals);
        }
    }
    let pts = nodes(plan, i, n, z, x);
    let (mut sum, mut abs, mut tail) = (0.0, 0.0, 0.0);
    let at = |zi: f64, z: &mut [f64], x: &mut [f64], evals: &mut f64| -> (f64, f64, f64) {
        z[i] = zi;
        fill_x(plan, z, x);
        *evals += 1.0;
        let mut fv = 1.0;
        for f in &plan.factors[i] {
            fv *= f.eval(x);
            if fv == 0.0 {
                return (0.0, 0.0, 0.0);
            }
        }
        let (v, a, t) = level(plan, i + 1, n, z, x, evals);
        (fv * v, fv.abs() * a, fv.abs() * t)
    };
    let (mut first, mut last) = (0.0, 0.0);
    for (k, &(zi, wt)) in pts.iter().enumerate() {
        let (hv, ha, ht) = at(zi, z, x, evals);
        sum += wt * hv;
        abs += wt * ha;
        tail += wt * ht;
        if k == 0 {
            first = hv.abs();
        }
        last = hv.abs();
    }
    // Mass beyond ±T (Mills: ∫_T^∞ φ ≤ φ(T)/T), with the integrand at the outermost
    // nodes standing for its size there, and a factor 10 for its growth.
    tail += 10.0 * (first + last) * phi(T) / T;
    (sum, abs, tail)
}

/// `Φ(r) − Φ(l)`, accurate in either tail.
fn mass(l: f64, r: f64) -> f64 {
    let q = |x: f64| 0.5 * libm::erfc(x / std::f64::consts::SQRT_2);
    if l >= 0.0 {
        q(l) - q(r)
    } else if r <= 0.0 {
        q(-r) - q(-l)
    } else {
        1.0 - q(r) - q(-l)
    }
}

/// The innermost level when its integrand is a polynomial of degree `deg` between its
/// kinks: on each piece (unbounded at both ends) the polynomial is read off `deg + 1`
/// values and integrated against φ by the moments `I_k = ∫_l^r z^k φ`
/// (`I_0 = Φ(r) − Φ(l)`, `I_1 = φ(l) − φ(r)`, `I_k = l^{k−1}φ(l) − r^{k−1}φ(r) + (k−1) I_{k−2}`):
/// exact up to rounding, no truncation.
fn exact_last(
    plan: &Plan,
    i: usize,
    deg: usize,
    z: &mut [f64],
    x: &mut [f64],
    evals: &mut f64,
) -> (f64, f64, f64) {
    z[i] = 0.0;
    fill_x(plan, z, x);
    let mut cuts: Vec<f64> = plan.kinks[i]
        .iter()
        .map(|k| -k.arg.eval(x) / k.slope)
        .filter(|t| t.is_finite())
        .collect();
    cuts.sort_by(f64::total_cmp);
    cuts.dedup();
    let mut ends = vec![f64::NEG_INFINITY];
    ends.extend(cuts);
    ends.push(f64::INFINITY);
    let (mut sum, mut abs) = (0.0, 0.0);
    for w in ends.windows(2) {
        let (l, r) = (w[0], w[1]);
        if r.partial_cmp(&l) != Some(std::cmp::Ordering::Greater) {
            continue;
        }
        // deg + 1 distinct points inside the piece, around a centre c.
        let (c, h) = match (l.is_finite(), r.is_finite()) {
            (true, true) => (0.5 * (l + r), 0.5 * (r - l) / (deg as f64 + 1.0)),
            (true, false) => (l + 1.0 + deg as f64 * 0.5, 0.5),
            (false, true) => (r - 1.0 - deg as f64 * 0.5, 0.5),
            (false, false) => (0.0, 0.5),
        };
        // Values at c + h·t_j, t_j = j − deg/2; coefficients in powers of (z − c)/h by
        // solving the (deg+1)² Vandermonde system (deg ≤ 4).
        let m = deg + 1;
        let ts: Vec<f64> = (0..m).map(|j| j as f64 - deg as f64 / 2.0).collect();
        let mut a = DMatrix::zeros(m, m);
        let mut y = nalgebra::DVector::zeros(m);
        for (j, &t) in ts.iter().enumerate() {
            z[i] = c + h * t;
            fill_x(plan, z, x);
            *evals += 1.0;
            y[j] = plan.factors[i].iter().map(|f| f.eval(x)).product::<f64>();
            for p in 0..m {
                a[(j, p)] = t.powi(p as i32);
            }
        }
        let Some(coef) = a.lu().solve(&y) else {
            return (f64::NAN, f64::INFINITY, f64::INFINITY);
        };
        // K_k = ∫_l^r (z − c)^k φ(z) dz; from φ' = −zφ and z = (z − c) + c:
        // K_{k+1} = (l−c)^k φ(l) − (r−c)^k φ(r) + k K_{k−1} − c K_k.
        let pe = |v: f64, k: usize| -> f64 {
            if v.is_finite() {
                (v - c).powi(k as i32) * phi(v)
            } else {
                0.0
            }
        };
        let mut kk = vec![0.0; m];
        kk[0] = mass(l, r);
        for k in 0..m - 1 {
            let prev = if k > 0 { k as f64 * kk[k - 1] } else { 0.0 };
            kk[k + 1] = pe(l, k) - pe(r, k) + prev - c * kk[k];
        }
        let mut piece = 0.0;
        let mut size = 0.0;
        for p in 0..m {
            let t = coef[p] * kk[p] / h.powi(p as i32);
            piece += t;
            size += t.abs();
        }
        sum += piece;
        abs += size;
    }
    (sum, abs, 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relu(x: Expr) -> Expr {
        Expr::call(Fun::Relu, x)
    }

    #[test]
    fn legendre_rules_integrate_polynomials() {
        for n in [8, 10, 12, 13, 16, 20, 24] {
            let (x, w) = legendre(n);
            let s: f64 = w.iter().sum();
            assert!((s - 2.0).abs() < 1e-14, "{n}: {s}");
            let m: f64 = x
                .iter()
                .zip(w)
                .map(|(x, w)| w * x.powi(2 * n as i32 - 2))
                .sum();
            assert!((m - 2.0 / (2 * n - 1) as f64).abs() < 1e-13, "{n}: {m}");
        }
    }

    /// `E[relu(a + relu(b))]` for independent a, b ~ N(0, 1): one family is nested in
    /// the other. By parts: `E_b[ g(relu(b)) ]` with `g(c) = c Φ(c) + φ(c)`:
    /// `½ g(0) + ∫_0^∞ g(c) φ(c) dc`, the last by a fine Simpson rule (error ~h⁴).
    #[test]
    fn a_nested_relu_matches_a_one_dimensional_reference() {
        let f = relu(Expr::add(Expr::Arg(0), relu(Expr::Arg(1))));
        let cov = DMatrix::identity(2, 2);
        let e = expect(&f, &cov, 1e-12).unwrap();
        let big_phi = |c: f64| 0.5 * libm::erfc(-c / std::f64::consts::SQRT_2);
        let g = |c: f64| c * big_phi(c) + phi(c);
        let h = 1e-4;
        let mut tr = 0.0;
        for i in 0..=120_000 {
            let c = i as f64 * h;
            let wgt = if i == 0 || i == 120_000 {
                1.0
            } else if i % 2 == 1 {
                4.0
            } else {
                2.0
            };
            tr += wgt * g(c) * phi(c) * h / 3.0;
        }
        let want = 0.5 * g(0.0) + tr;
        assert!(
            (e.value - want).abs() <= e.error + 1e-10,
            "{e}, want {want}"
        );
        assert!(e.error < 1e-10, "{e}");
    }

    /// One block only: not this rule's business.
    #[test]
    fn a_single_family_is_left_alone() {
        let f = relu(Expr::add(Expr::Arg(0), Expr::Arg(1)));
        let cov = DMatrix::from_row_slice(2, 2, &[1.0, 0.5, 0.5, 1.0]);
        assert!(expect(&f, &cov, 1e-12).is_none());
    }
}
