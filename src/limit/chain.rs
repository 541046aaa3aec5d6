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
