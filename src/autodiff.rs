//! Autodiff on the IR: a `train` block becomes one unrolled tensor program.
//!
//! [`unroll`] differentiates the forward [`Program`] symbolically (reverse mode, on the
//! graph) and writes `steps` full-batch gradient-descent steps as a single straight-line
//! Netsor-transpose+ program (theory.md §6.1) in which every matrix appears only as its
//! *initial* value `W_0`: an update `W_t = W_0 − κ Σ_{s<t} Σ_b dy_{s,b} x_{s,b}ᵀ / n` is
//! never formed; each product becomes
//!
//! ```text
//! mult·W_t z  = mult·W_0 z  − κ Σ_{s<t,b} dy_{s,b} · E_n[x_{s,b} z]      (Nonlin + Moments)
//! mult·W_tᵀ z = mult·W_0ᵀ z − κ Σ_{s<t,b} x_{s,b} · E_n[dy_{s,b} z]
//! ```
//!
//! with `E_n[u v] = (1/n) Σ_a u_a v_a` a Moment. So the finite executor runs training
//! with O(t) extra vectors per matrix instead of N² numbers (and the conditional engine
//! can run it at all), and the limit engine reads the same program through the Master
//! Theorem (theory.md §2.1, §6.2).
//!
//! ## Normalization (why every coefficient is a monomial in n)
//!
//! The unrolled program is written in TP4's scaled variables, so that in a stable
//! feature-learning parameterization every vector has Θ(1) coordinates:
//!
//! * backward vectors are `dy = n · ∂L/∂y` (theory.md §6.1, "dx := n grad_x f"), with
//!   χ = ∂L/∂f (including the 1/B of the batch mean) folded in: the seed at an output
//!   `f_o = coef · mult_v · w_v · x` is `dx = Σ_o χ_o · coef · r_v`;
//! * a readout `v` (`1 x n`, `f = mult·w·x`) becomes the vector `r = n·mult·w`, so that
//!   `f = coef · E_n[r x]` is a Moment; in the unrolled program it is a parameter of
//!   shape `n` whose multiplier is `n·mult` (the same draw `w` as the readout);
//! * the learning-rate coefficient of each update is a monomial in n:
//!   hidden `W` (`y = mult·W x`): `κ = η·lr·mult²`; input `U` (`y = mult·U ξ`):
//!   `κ = η·lr·mult²/n`, times the constant `ξ_b·ξ`; vector parameter (value `mult·w`):
//!   `κ = η·lr·mult²/n`; readout: `r_{t+1} = r_t − η·lr·mult²·n Σ_b χ_{b,o} coef x_b`;
//!   scalar parameter: `η·lr·mult²`. (In muP every κ is η; language.md, Training.)
//!
//! These are identities at every finite n, so [`Width::Finite`] programs equal dense
//! training up to rounding (tests/unrolled.rs checks 1e-10). [`Width::Limit`] replaces
//! every coefficient by its limit as n → ∞ and refuses one that blows up.
//!
//! ## Shape of the unrolled program
//!
//! The generic-point IR runs all points at once; training mixes points (an update sums
//! over the batch), so the unrolled program is evaluated at **one** point (P = 1): every
//! distinct point (evaluation points first, then training inputs not among them) has its
//! own copy of the program's `input` declarations (named `x@k`), and [`Unrolled::row`]
//! is the one `--inputs`-style row that holds them all. Vectors that depend on no input
//! are built once per step and shared by all points.
//!
//! Ops used: `Input`, `Param` (the initial values; readouts recast as vectors),
//! `MatMul` (only ever of an initial matrix), `Nonlin`, `Moment`, and `Scalar` for the
//! outputs `f_t` and the loss derivatives χ. No `Output` nodes.

use crate::ir::{NodeId, Program};

/// Which meaning the coefficients of the unrolled program are taken in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// At width n: the finite executor's program.
    Finite(usize),
    /// n → ∞: every monomial coefficient replaced by its limit.
    Limit,
}

/// A `train` block unrolled into one program (module docs).
#[derive(Clone, Debug)]
pub struct Unrolled {
    /// The program, evaluated at one point ([`Unrolled::row`]).
    pub prog: Program,
    /// The distinct points: the evaluation points first, then the training inputs not
    /// among them. A program without inputs has one empty point.
    pub points: Vec<Vec<f64>>,
    /// Index in `points` of each evaluation point.
    pub eval: Vec<usize>,
    /// Index in `points` of each training sample.
    pub train: Vec<usize>,
    /// `f[t][o·P + p]`: the `Scalar` node of output o at evaluation point p after t
    /// steps, t = 0..=steps (output-major, as everywhere).
    pub f: Vec<Vec<NodeId>>,
    /// `chi[t][b·O + o]`: ∂L/∂f_o at training sample b after t steps (with the 1/B of
    /// the batch mean), t = 0..steps.
    pub chi: Vec<Vec<NodeId>>,
    pub width: Width,
}

impl Unrolled {
    /// The single `--inputs`-style row of the unrolled program: every point's row, in
    /// order.
    pub fn row(&self) -> Vec<f64> {
        self.points.iter().flatten().copied().collect()
    }
}
