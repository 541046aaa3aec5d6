//! Scaling diagnostics: abc exponents read off the IR graph (theory.md §5).
//!
//! For every node the analysis derives the exponent `e` of its size `Θ(n^e)` (per
//! coordinate for width-n vectors, the value itself for scalars and outputs):
//!
//! * **at initialization**, propagating forward node by node: a parameter vector has
//!   entries `n^(p(mult) + p(var)/2)`; a hidden `W @ x` is a CLT sum of n independent
//!   terms, `n^(1/2) * entry(W) * x`; an input-layer `U @ xi` is a finite sum; a
//!   coordinatewise function follows its growth (homogeneous functions pass the
//!   exponent, saturating ones cap it at 0, sums take the max, products add); an output
//!   `v @ x` is a CLT sum;
//! * **the gradient** `∂L/∂x` at initialization, backward through the transposes (at
//!   initialization it is linear in the readouts, so its inner products with forward
//!   vectors are CLT sums);
//! * **the first-order change after one SGD step** (the tangent map of the update, what
//!   TP4's `r` measures): `ΔW y = -lr n^(-c) mult^2 sum_s dh_s (x_s . y)`, with the inner
//!   product of two forward vectors an LLN sum (`n^(1 + e + e')`), a finite sum for
//!   input points, a CLT sum for a forward vector against a gradient; the change is
//!   then pushed through the graph (`W_0 Δx` at the CLT rate, `v_0 . Δx` and
//!   `Δv . x` at the LLN rate since `Δx` and `Δv` are correlated with `v` and `x`).
//!
//! Nothing here knows what an MLP is: the rules are local to the graph's instructions,
//! and TP4's closed forms (r, r_l, Thm 3.3) come out for MLPs (see the tests). From the
//! exponents a training program is classified (TP4 §3, theory.md §5.2–5.3, §5.6):
//! unstable, trivial, kernel regime or feature learning, with the parameters updated
//! maximally and muP recognized; [`diagnostics`] turns that into warnings and notes
//! with a muP law (shifted by the abc symmetry to the parameter's own learning-rate
//! exponent) as help.
//!
//! Moments are treated at coordinate level (an upper bound: a mean of zero-mean
//! coordinates can be smaller), except cross moments `mean(q * k)` of independent
//! vectors, attention logits, which `scaling::moments` sizes as CLT sums at
//! initialization and splits into correlated and independent parts after a step.
//! Beyond Θ(1) the first-order change is a lower bound on the blow-up: nonlinear
//! effects of a blown-up step only make it larger.

mod analysis;
mod classify;
mod diagnostics;
mod ex;
mod flat;
mod laws;
mod moments;
mod optim;
mod table;

pub use analysis::*;
pub use classify::*;
pub use diagnostics::*;
pub use ex::*;
use flat::*;
pub use laws::*;
pub use moments::is_cross_moment;
pub use optim::{adam_mup_law, is_adam_mup_law};
pub use table::*;
