//! The nonlinear outer product of Tensor Programs IVb, for the infinite-width limit of
//! entrywise optimizers (Adam, AdamW) in the particle engine (theory.md §6; issue 15).
//!
//! Why a module of its own: SGD and momentum move a hidden matrix by a sum of rank-one
//! terms, which the unrolled program writes with Moments ([`crate::autodiff`]); Adam's
//! update `Q_t(ĝ_0..ĝ_t) = m̂_t/(√v̂_t + ε)` is taken entry by entry and is not low rank,
//! so its limit needs one more instruction, [`crate::ir::Op::Outer`], and an evaluator
//! that averages over pairs of particles.
//!
//! ## The mathematics
//!
//! For a hidden matrix `y = mult·W x` the gradient entries in scaled variables are
//! `ĝ^s_{αβ} = Σ_b dy^s_{b,α} x^s_{b,β}` (`dy = n ∂L/∂y`, both Θ(1) per coordinate;
//! the true gradient is `(mult/n)·ĝ`). Adam is invariant to the gradient's scale
//! except through ε, so `Q_t(g; ε) = Q_t(ĝ; ε·n/mult)`, and a step
//! `ΔW = −η·lr·Q_t` acts on a vector z as
//!
//! ```text
//! Δ(mult·W z)_α = −(η·lr·mult·n) · (1/n) Σ_β Q_t({Σ_b dy^s_{b,α} x^s_{b,β}}_s) z_β
//!               → −κ · E_β[ Q_t({Σ_b Z^{dy^s_b}_α Z^{x^s_b}_β}_s) · Z^z_β ]
//! ```
//!
//! (κ = lim η·lr·mult·n; α's values held fixed, β an independent copy of the
//! β-side Z's). A transposed product swaps the roles of dy and x. The input layer, the
//! biases and the readout have one finite or one width-n index: their update is an
//! ordinary Nonlin of the α-side Z's (`autodiff`, "Adam"). With a width-dependent
//! `ε' = ε/scale`: `ε'` → a constant is kept, → 0 is dropped (the update tends to
//! `m̂/√v̂`), → ∞ freezes the parameter (its update is O(1/ε') → 0): the limit
//! reports that rather than failing.
//!
//! ## Evaluation and its cost
//!
//! At particle α the expectation over β is the mean over an independent subsample of
//! S particles of the same replica (the first S, which are iid; β = α is left out).
//! The error of that mean is Monte Carlo error like every moment's: it is inside the
//! replicas' spread, so `f_t_se` (their standard deviation over √R) includes it. One
//! product costs M·S evaluations of its integrand per replica (M particles): O(M·S)
//! instead of the O(M²) of all pairs. The integrand is `ψ(ĝ)·z_β` and ψ does not
//! depend on z, so the kernel `F[α, β] = ψ(ĝ_{αβ})` is computed once per (matrix,
//! step, direction) and every product that shares it (one per point and sample) is a
//! matrix-vector product. README ("Adam in the limit") gives the measured times and
//! standard errors.

use crate::ir::expr::Operand;
use crate::ir::Expr;

/// The kernel `F[α, β] = ψ(ĝ^0_{αβ}, …)` for α < m and the β-side subsample β < S
/// (row-major, m × S; `F[α, α] = 0`, left out of the mean), with
/// `ĝ^s_{αβ} = Σ_{j ∈ group s} a_{j,α} b_{j,β}` ([`crate::ir::Op::Outer`]).
pub fn kernel(
    expr: &Expr,
    groups: &[usize],
    a: &[&[f64]],
    b: &[&[f64]],
    m: usize,
    samples: usize,
) -> Vec<f64> {
    let s = samples.min(m).max(2);
    let mut f = vec![0.0; m * s];
    let mut g = vec![vec![0.0; s]; groups.len()];
    for (alpha, row) in f.chunks_mut(s).enumerate() {
        let mut j = 0;
        for (gs, &k) in g.iter_mut().zip(groups) {
            gs.fill(0.0);
            for _ in 0..k {
                let x = a[j][alpha];
                if x != 0.0 {
                    for (o, y) in gs.iter_mut().zip(&b[j][..s]) {
                        *o += x * y;
                    }
                }
                j += 1;
            }
        }
        let args: Vec<Operand<'_>> = g.iter().map(|v| Operand::Column(v)).collect();
        expr.eval_run(&args, 0, row);
        if alpha < s {
            row[alpha] = 0.0;
        }
    }
    f
}

/// `y_α = mean_{β < S, β ≠ α} F[α, β] z_β` (module docs).
pub fn apply(f: &[f64], z: &[f64], m: usize, samples: usize) -> Vec<f64> {
    let s = samples.min(m).max(2);
    f.chunks(s)
        .take(m)
        .enumerate()
        .map(|(alpha, row)| {
            let sum: f64 = row.iter().zip(&z[..s]).map(|(x, y)| x * y).sum();
            sum / if alpha < s { s - 1 } else { s } as f64
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_linear_update_factors_into_moments() {
        // ψ(ĝ) = ĝ: y_α = a_α · mean_{β≠α} b_β z_β (SGD's rank-one correction).
        let a = vec![1.0, 2.0, 3.0, 4.0];
        let b = vec![1.0, 1.0, 2.0, 4.0];
        let z = vec![0.5, 1.0, -1.0, 2.0];
        let f = kernel(&Expr::Arg(0), &[1], &[&a], &[&b], 4, 4);
        let y = apply(&f, &z, 4, 4);
        let total: f64 = b.iter().zip(&z).map(|(x, y)| x * y).sum();
        for i in 0..4 {
            let want = a[i] * (total - b[i] * z[i]) / 3.0;
            assert!((y[i] - want).abs() < 1e-15);
        }
    }
}
