//! The layer-chain fast path: the NNGP/NTK recursion of theory.md §3.1 run in place.
//!
//! Many programs are chains — every hidden vector is `phi(a Ẑ^{W x_prev} + biases)` and
//! one readout reads the last — and for those the block engine's generality costs
//! copies. Recognized from the derivation (not from syntax), a chain is evaluated with
//! two P x P matrices: per layer one fused pass computes `E[phi phi]` and
//! `E[phi' phi'] ⊙ Θ` from the same covariance entry (theory.md §3.1:
//! `Θ^{l+1} = Σ^{l+1} + Ṡ^{l+1} Θ^l` with the learning-rate multipliers of language.md),
//! and one elementwise pass applies the next matrix's law. The result is the same
//! quantity the general engine computes (tests compare them); any program that does not
//! match, or whose laws are not Θ(1), goes to the general engine.

use nalgebra::DMatrix;
use rayon::prelude::*;

use super::dual::{Combine, PairKernel};
use super::engine::TOL;
use super::fastmath;
use super::zform::{Derivation, GaussKind, LinForm};
use crate::ir::{Expr, Law, Monomial, NodeId, Op, OutTerm, Program, Rational};

/// One layer: `x = phi(L)`, `L = a * (main Gaussian) + sum_j b_j * bias_j`.
struct Layer {
    phi: Expr,
    /// Covariance and tangent of the main Gaussian come from the previous layer (hidden)
    /// or from the inputs (first layer).
    main: Main,
    a: f64,
    /// (coefficient, variance, tangent weight lr*mult^2) of each bias Gaussian.
    biases: Vec<(f64, f64, f64)>,
}

enum Main {
    /// Hidden `W @ x_prev`: sigma^2 and the tangent weight lr*mult^2*n.
    Hidden { sigma2: f64, tw: f64 },
    /// Input layer `U @ x`: entry variance, tangent weight lr*mult^2, and the input node.
    Input { var: f64, tw: f64, input: NodeId },
}

/// The chain's output: `f = c * v @ x_L + sum_j d_j * b_j`.
struct Readout {
    c: f64,
    sigma2: f64,
    tw: f64,
    biases: Vec<(f64, f64, f64)>,
}

/// A monomial's value when it is Θ(1) (exponent 0), else None (general engine).
fn order_one(m: Monomial) -> Option<f64> {
    m.exp.is_zero().then_some(m.coef)
}

fn tangent_weight(law: &Law, times_n: bool) -> Option<f64> {
    let n = if times_n {
        Monomial::n_pow(Rational::ONE)
    } else {
        Monomial::ONE
    };
    order_one(law.lr * law.mult.powi(2) * n)
}

/// Recognizes a chain; None when the program is anything else.
fn recognize(prog: &Program, der: &Derivation) -> Option<(Vec<Layer>, Readout)> {
    if prog.outputs.len() != 1 || !prog.observes.is_empty() || der.has_transpose {
        return None;
    }
    // Netsor+ moments (layernorm, attention) take the general engine.
    if prog
        .ids()
        .any(|id| matches!(prog.node(id).op, Op::Moment(_)))
    {
        return None;
    }
    let out = prog.outputs[0];
    let ops = prog.operands(out);
    let Op::Output { terms, constant } = &prog.node(out).op else {
        return None;
    };
    if *constant != 0.0 {
        return None;
    }
    let mut readout = None;
    let mut out_biases = Vec::new();
    for t in terms {
        match t {
            OutTerm::Readout {
                coef,
                readout: r,
                vector,
            } => {
                if readout.is_some() {
                    return None;
                }
                let law = prog.param_of(ops[*r])?.law;
                let sigma2 = order_one(Monomial::n_pow(Rational::ONE) * law.entry_var())?;
                readout = Some((*coef, sigma2, tangent_weight(&law, true)?, ops[*vector]));
            }
            OutTerm::Scalar { coef, param } => {
                let law = prog.param_of(ops[*param])?.law;
                out_biases.push((
                    *coef,
                    order_one(law.entry_var())?,
                    tangent_weight(&law, false)?,
                ));
            }
        }
    }
    let (c, sigma2, tw, mut x) = readout?;
    let mut layers = Vec::new();
    loop {
        let z = der.zform(x)?;
        if !z.lin.is_zero() || z.constant != 0.0 || z.atoms.len() != 1 || z.atoms[0].0 != 1.0 {
            return None;
        }
        let atom = &z.atoms[0].1;
        if atom.args.len() != 1 {
            return None;
        }
        let (main, a, biases, prev) = split(prog, der, &atom.args[0])?;
        layers.push(Layer {
            phi: atom.f.clone(),
            main,
            a,
            biases,
        });
        match prev {
            Some(p) => x = p,
            None => break,
        }
    }
    layers.reverse();
    Some((
        layers,
        Readout {
            c,
            sigma2,
            tw,
            biases: out_biases,
        },
    ))
}

/// Splits a linear form into its main Gaussian and biases.
#[allow(clippy::type_complexity)]
fn split(
    prog: &Program,
    der: &Derivation,
    l: &LinForm,
) -> Option<(Main, f64, Vec<(f64, f64, f64)>, Option<NodeId>)> {
    let mut main = None;
    let mut biases = Vec::new();
    for &(g, coef) in &l.0 {
        match &der.gauss[g].kind {
            GaussKind::Initial { param, var } => {
                biases.push((coef, *var, tangent_weight(&prog.params[*param].law, false)?));
            }
            GaussKind::Hat {
                param,
                arg,
                sigma2,
                transpose: false,
                ..
            } => {
                if main.is_some() {
                    return None;
                }
                let tw = tangent_weight(&prog.params[*param].law, true)?;
                main = Some((
                    Main::Hidden {
                        sigma2: *sigma2,
                        tw,
                    },
                    coef,
                    Some(*arg),
                ));
            }
            GaussKind::InputLayer { param, input, var } => {
                if main.is_some() {
                    return None;
                }
                let tw = tangent_weight(&prog.params[*param].law, false)?;
                main = Some((
                    Main::Input {
                        var: *var,
                        tw,
                        input: *input,
                    },
                    coef,
                    None,
                ));
            }
            _ => return None,
        }
    }
    let (m, a, prev) = main?;
    // The previous vector must itself be a layer; the input layer ends the chain.
    Some((m, a, biases, prev))
}

/// `cov <- alpha*cov + beta`, `tan <- gamma*cov_old + delta*tan + eps`, in one pass.
fn combine(cov: &mut DMatrix<f64>, tan: &mut DMatrix<f64>, k: [f64; 5]) {
    let [alpha, beta, gamma, delta, eps] = k;
    let p = cov.nrows();
    cov.as_mut_slice()
        .par_chunks_mut(p.max(1))
        .zip(tan.as_mut_slice().par_chunks_mut(p.max(1)))
        .for_each(|(c, t)| {
            for (ci, ti) in c.iter_mut().zip(t.iter_mut()) {
                let old = *ci;
                *ti = gamma * old + delta * *ti + eps;
                *ci = alpha * old + beta;
            }
        });
}

/// The chain's NNGP and NTK (P x P), with the methods used and the largest stated error;
/// None when the program is not a chain.
#[allow(clippy::type_complexity)]
pub fn chain_kernels(
    prog: &Program,
    der: &Derivation,
    inputs: &std::collections::HashMap<NodeId, DMatrix<f64>>,
) -> Option<(DMatrix<f64>, DMatrix<f64>, Vec<String>, f64)> {
    let (layers, out) = recognize(prog, der)?;
    if let Some(r) = relu_chain(&layers, &out, inputs) {
        return r;
    }
    let mut methods = Vec::new();
    let mut max_err = 0.0f64;
    let mut cov = DMatrix::zeros(0, 0);
    let mut tan = DMatrix::zeros(0, 0);
    for (i, layer) in layers.iter().enumerate() {
        let bv: f64 = layer.biases.iter().map(|(b, v, _)| b * b * v).sum();
        let bt: f64 = layer.biases.iter().map(|(b, _, w)| b * b * w).sum();
        let a2 = layer.a * layer.a;
        match &layer.main {
            Main::Input { var, tw, input } => {
                if i != 0 {
                    return None;
                }
                let x = inputs.get(input)?;
                // Two P x P matrices in all: the Gram matrix becomes the covariance.
                cov = x * x.transpose();
                tan = cov.clone();
                cov *= a2 * var;
                tan *= a2 * tw;
                cov.add_scalar_mut(bv);
                tan.add_scalar_mut(bt);
            }
            Main::Hidden { sigma2, tw } => {
                if i == 0 {
                    return None;
                }
                // cov holds E[phi phi] of the previous layer, tan its tangent kernel.
                combine(
                    &mut cov,
                    &mut tan,
                    [a2 * sigma2, bv, a2 * tw, a2 * sigma2, bt],
                );
            }
        }
        // x = phi(L): one pass for E[phi phi] and E[phi' phi'] ⊙ Θ.
        let d: Vec<f64> = cov.diagonal().iter().copied().collect();
        let vmax = d.iter().fold(1e-3f64, |m, &v| m.max(v));
        let dphi = layer.phi.diff(0);
        let k = PairKernel::new(&layer.phi, &layer.phi, vmax, TOL);
        let k2 = PairKernel::new(&dphi, &dphi, vmax, TOL);
        for kk in [&k, &k2] {
            methods.push(kk.method().to_string());
            max_err = max_err.max(kk.error_bound());
        }
        k.block_pair_in_place(&k2, &d, &d, &mut cov, &mut tan, Combine::Multiply, true);
    }
    let bv: f64 = out.biases.iter().map(|(b, v, _)| b * b * v).sum();
    let bt: f64 = out.biases.iter().map(|(b, _, w)| b * b * w).sum();
    let c2 = out.c * out.c;
    combine(
        &mut cov,
        &mut tan,
        [c2 * out.sigma2, bv, c2 * out.tw, c2 * out.sigma2, bt],
    );
    if cov.iter().chain(tan.iter()).any(|v| !v.is_finite()) {
        return None;
    }
    methods.sort();
    methods.dedup();
    Some((cov, tan, methods, max_err))
}

/// Per layer of a ReLU chain: the arc-cosine constants `(c1, c2)` of the layer's
/// `E[phi phi]`, `E[phi' phi']`, and the combine `[alpha, beta, gamma, delta, eps]` of the
/// law that follows (next layer or readout).
struct ReluStep {
    c1: f64,
    c2: f64,
    k: [f64; 5],
}

/// One entry through one ReLU layer and the next law, the same arithmetic as the
/// layer-by-layer path (`block_pair_in_place` in multiply mode, then [`combine`]):
/// `x` is the covariance entry, `t` the tangent kernel, `n = sqrt(S_pp S_qq)`.
#[inline(always)]
fn relu_step(x: f64, t: f64, n: f64, l: &ReluStep) -> (f64, f64) {
    let rho = dual_snap(x / n);
    let (j, pt) = fastmath::arccos_pair(rho);
    let ok = n > 0.0;
    // zero variance: relu(0) = step(0) = 0
    let cv = if ok { l.c1 * (n * j) } else { 0.0 };
    let tv = t * if ok { l.c2 * pt } else { 0.0 };
    let [alpha, beta, gamma, delta, eps] = l.k;
    (alpha * cv + beta, gamma * cv + delta * tv + eps)
}

/// [`super::dual::snap_rho`] as selects, so that the loop around it vectorizes.
#[inline(always)]
fn dual_snap(r: f64) -> f64 {
    const SNAP: f64 = 1e-14;
    let r = if r >= 1.0 - SNAP { 1.0 } else { r };
    if r <= -1.0 + SNAP {
        -1.0
    } else {
        r
    }
}

/// The fused path for chains whose every layer is `relu` with closed-form kernels
/// (theory.md §3.1–3.2): the diagonal recursion first (it fixes `n = sqrt(S_pp S_qq)` of
/// every layer), then each off-diagonal entry runs its whole depth on its own —
/// `S^{l+1}_pq = alpha E[relu relu] + beta`, `Θ^{l+1}_pq = gamma E[relu relu] + delta
/// E[step step] Θ^l_pq + eps` — in vectorized chunks of a column, columns in parallel,
/// upper triangles only, mirrored once at the end. Memory: the two output matrices and
/// `L x P` square roots. None when some layer is not such a ReLU layer (or a variance
/// is not finite: the layer-by-layer path then reports it).
#[allow(clippy::type_complexity)]
fn relu_chain(
    layers: &[Layer],
    out: &Readout,
    inputs: &std::collections::HashMap<NodeId, DMatrix<f64>>,
) -> Option<Option<(DMatrix<f64>, DMatrix<f64>, Vec<String>, f64)>> {
    let sums = |b: &[(f64, f64, f64)]| -> (f64, f64) {
        (
            b.iter().map(|(b, v, _)| b * b * v).sum(),
            b.iter().map(|(b, _, w)| b * b * w).sum(),
        )
    };
    let first = layers.first()?;
    let Main::Input { var, tw, input } = &first.main else {
        return None;
    };
    let x = inputs.get(input)?;
    // The input law: cov = a^2 var G + bv, tan = a^2 tw G + bt.
    let (bv0, bt0) = sums(&first.biases);
    let a2 = first.a * first.a;
    let (s0, t0) = (a2 * var, a2 * tw);
    let mut steps = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let dphi = layer.phi.diff(0);
        let k = PairKernel::new(&layer.phi, &layer.phi, 1.0, TOL);
        let k2 = PairKernel::new(&dphi, &dphi, 1.0, TOL);
        let (c1, c2) = k.relu_step_consts(&k2)?;
        let k = match layers.get(i + 1) {
            Some(next) => {
                let Main::Hidden { sigma2, tw } = next.main else {
                    return None;
                };
                let (bv, bt) = sums(&next.biases);
                let a2 = next.a * next.a;
                [a2 * sigma2, bv, a2 * tw, a2 * sigma2, bt]
            }
            None => {
                let (bv, bt) = sums(&out.biases);
                let c2o = out.c * out.c;
                [c2o * out.sigma2, bv, c2o * out.tw, c2o * out.sigma2, bt]
            }
        };
        steps.push(ReluStep { c1, c2, k });
    }
    let p = x.nrows();
    let d = x.ncols();
    let nl = steps.len();
    // The inputs transposed (d x P), so that a tile computes its Gram entries
    // vectorized over rows; the Gram matrix itself is never stored.
    let xt: Vec<f64> = x.as_slice().to_vec();
    // Both outputs in fresh memory; every entry is written by the tile pass.
    let mut cov = DMatrix::from_vec(p, p, fastmath::huge_zeros(p * p));
    let mut tan = DMatrix::from_vec(p, p, fastmath::huge_zeros(p * p));
    // Diagonal recursion: sq[l*p + i] = sqrt(S^l_ii), with the very arithmetic the
    // column pass applies to entry (i, i).
    let mut sq = vec![0.0; nl * p];
    let mut vmax = vec![1e-3f64; nl];
    for i in 0..p {
        let g = gram(&xt, p, i, i);
        let (mut c, mut t) = (g * s0 + bv0, g * t0 + bt0);
        for (l, st) in steps.iter().enumerate() {
            if !c.is_finite() || !t.is_finite() {
                return None;
            }
            vmax[l] = vmax[l].max(c);
            let s = c.max(0.0).sqrt();
            sq[l * p + i] = s;
            (c, t) = relu_step(c, t, s * s, st);
        }
    }
    let tp = TileProblem {
        xt: &xt,
        d,
        p,
        sq: &sq,
        steps: &steps,
        init: [s0, t0, bv0, bt0],
    };
    if !relu_tiles(cov.as_mut_slice(), tan.as_mut_slice(), &tp) {
        return Some(None);
    }
    let mut methods = Vec::new();
    let mut max_err = 0.0f64;
    for (layer, &vm) in layers.iter().zip(&vmax) {
        let dphi = layer.phi.diff(0);
        for kk in [
            PairKernel::new(&layer.phi, &layer.phi, vm, TOL),
            PairKernel::new(&dphi, &dphi, vm, TOL),
        ] {
            methods.push(kk.method().to_string());
            max_err = max_err.max(kk.error_bound());
        }
    }
    methods.sort();
    methods.dedup();
    Some(Some((cov, tan, methods, max_err)))
}

/// Tile side of the fused pass: a tile's two buffers (16 KiB) stay in L1, and its
/// results go out in runs of `TILE` contiguous entries to both triangles.
const TILE: usize = 32;

/// A raw pointer the tile tasks share; see [`relu_tiles`] for why their accesses are
/// disjoint.
struct Shared(*mut f64);
// SAFETY: only used as described in `relu_tiles`, where no two tasks touch one entry.
unsafe impl Sync for Shared {}

/// The fused pass over `TILE x TILE` tiles `(I, J)`, `I <= J`, in parallel: each reads
/// its block of the Gram matrix from `cov` (upper triangle), runs every entry through
/// every layer in L1 buffers, and writes the block to `(I, J)` and its transpose to
/// `(J, I)` of both outputs — no separate mirror pass. False if an entry is not finite.
fn relu_tiles(cov: &mut [f64], tan: &mut [f64], tp: &TileProblem<'_>) -> bool {
    let p = tp.p;
    assert!(cov.len() == p * p && tan.len() == p * p);
    let nb = p.div_ceil(TILE);
    let tiles: Vec<(usize, usize)> = (0..nb).flat_map(|j| (0..=j).map(move |i| (i, j))).collect();
    let (cp, np) = (Shared(cov.as_mut_ptr()), Shared(tan.as_mut_ptr()));
    let (cp, np) = (&cp, &np);
    // Tile (I, J), I <= J, writes blocks (I, J) and (J, I) of cov and tan and reads
    // neither matrix. Distinct tiles have distinct block pairs, so the accesses of
    // different tasks never overlap.
    tiles.par_iter().all(|&(bi, bj)| {
        let (i0, j0) = (bi * TILE, bj * TILE);
        let (ni, nj) = ((p - i0).min(TILE), (p - j0).min(TILE));
        let mut cb = [0.0f64; TILE * TILE];
        let mut tb = [0.0f64; TILE * TILE];
        let diag = bi == bj;
        relu_tile(&mut cb, &mut tb, [i0, j0, ni, nj], diag, tp);
        let mut ok = true;
        for jj in 0..nj {
            let rows = if diag { jj + 1 } else { ni };
            let (c, t) = (
                &cb[jj * TILE..jj * TILE + rows],
                &tb[jj * TILE..jj * TILE + rows],
            );
            ok &= c.iter().chain(t).all(|v| v.is_finite());
            // SAFETY: as above; column j0+jj, rows i0..i0+rows.
            unsafe {
                std::slice::from_raw_parts_mut(cp.0.add(i0 + (j0 + jj) * p), rows)
                    .copy_from_slice(c);
                std::slice::from_raw_parts_mut(np.0.add(i0 + (j0 + jj) * p), rows)
                    .copy_from_slice(t);
            }
        }
        // The transpose: entry (i0+ii, j0+jj) also goes to (j0+jj, i0+ii), written
        // along columns i0+ii (contiguous in jj); on a diagonal tile only below it.
        for ii in 0..ni {
            let from = if diag { ii + 1 } else { 0 };
            if from >= nj {
                continue;
            }
            // SAFETY: column i0+ii, rows j0+from..j0+nj: inside the matrix, in block (J, I).
            let (c, t) = unsafe {
                (
                    std::slice::from_raw_parts_mut(cp.0.add(j0 + from + (i0 + ii) * p), nj - from),
                    std::slice::from_raw_parts_mut(np.0.add(j0 + from + (i0 + ii) * p), nj - from),
                )
            };
            for (k, jj) in (from..nj).enumerate() {
                c[k] = cb[ii + jj * TILE];
                t[k] = tb[ii + jj * TILE];
            }
        }
        ok
    })
}

/// What every tile reads: the inputs transposed (`xt`, d x P), the diagonal square
/// roots `sq[l * p + i] = sqrt(S^l_ii)`, the layers, and the input law
/// `init = [s0, t0, bv0, bt0]` (`S^1 = s0 G + bv0`, `Θ^1 = t0 G + bt0`).
struct TileProblem<'a> {
    xt: &'a [f64],
    d: usize,
    p: usize,
    sq: &'a [f64],
    steps: &'a [ReluStep],
    init: [f64; 4],
}

/// The Gram entry `x_i . x_j`, summed in coordinate order (as the tile pass does).
fn gram(xt: &[f64], p: usize, i: usize, j: usize) -> f64 {
    let mut g = 0.0;
    for k in 0..xt.len() / p.max(1) {
        g += xt[k * p + i] * xt[k * p + j];
    }
    g
}

fastmath::simd_fn! {
    /// Every entry of one tile through every layer, `at = [i0, j0, ni, nj]` its rows
    /// and columns: `cb` receives the NNGP block (column-major, leading dimension
    /// `TILE`) and `tb` the NTK block; on a diagonal tile only entries on or above the
    /// diagonal.
    fn relu_tile(
        cb: &mut [f64; TILE * TILE],
        tb: &mut [f64; TILE * TILE],
        at: [usize; 4],
        diag: bool,
        tp: &TileProblem<'_>,
    ) {
        let [i0, j0, ni, nj] = at;
        let [s0, t0, bv0, bt0] = tp.init;
        let p = tp.p;
        for jj in 0..nj {
            let rows = if diag { jj + 1 } else { ni };
            let c = &mut cb[jj * TILE..jj * TILE + rows];
            let t = &mut tb[jj * TILE..jj * TILE + rows];
            // Gram entries, vectorized over rows, summed in coordinate order.
            c.fill(0.0);
            for k in 0..tp.d {
                let xj = tp.xt[k * p + j0 + jj];
                for (c, &xi) in c.iter_mut().zip(&tp.xt[k * p + i0..k * p + i0 + rows]) {
                    *c += xi * xj;
                }
            }
            for (c, t) in c.iter_mut().zip(t.iter_mut()) {
                let g = *c;
                *c = g * s0 + bv0;
                *t = g * t0 + bt0;
            }
            for (l, st) in tp.steps.iter().enumerate() {
                let row = &tp.sq[l * p + i0..l * p + i0 + rows];
                let sqq = tp.sq[l * p + j0 + jj];
                for ((c, t), &sp) in c.iter_mut().zip(t.iter_mut()).zip(row) {
                    (*c, *t) = relu_step(*c, *t, sp * sqq, st);
                }
            }
        }
    }
}
