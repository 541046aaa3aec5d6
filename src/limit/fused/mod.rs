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
//!
//! Layout: `build.rs` walks the derivation into scalar nodes, `tape.rs` compiles them to
//! register operations, `eval.rs` runs the tape over tiles.

mod build;
mod eval;
mod tape;

use std::collections::HashMap;

use nalgebra::DMatrix;
use rayon::prelude::*;

use super::dual::{MeanKernel, PairKernel};
use super::engine::TOL;
use super::fastmath;
use super::gauss::TINY_VAR;
use super::zform::{Derivation, GaussKind};
use super::LimitResult;
use crate::ir::{NodeId, Program};
use build::{Builder, Node, Note};
use eval::{kern_scalar, mean_terms, tiles, Problem};
use tape::compile;

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
        points: prog.reported_points(points.to_vec()),
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
