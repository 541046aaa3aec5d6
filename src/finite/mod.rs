//! Finite-width execution: sample every parameter at a concrete width N and run the
//! program ([`exec`], `tpc run`), on top of the sampling and product kernels.
//!
//! A finite-width run of a Tensor Program spends its time in two places: drawing
//! every Gaussian parameter (N×N, N×d matrices, N-vectors) and multiplying those
//! matrices by N×P blocks of activations for all P input points at once. When P is
//! small, sampling dominates; when P is large, the products do. These two modules
//! make both run at hardware speed while keeping `nalgebra` types at the API.
//!
//! - [`sample`]: a counter-based seeding scheme (reproducible whatever the thread
//!   count or the number of draws run) and a fast, exact ziggurat N(0,1) sampler.
//! - [`linalg`]: `C = αAB + βC` products (with either operand transposed, without
//!   materialising the transpose) on nalgebra storage, computed by faer.
//! - [`types`] and `plan`: what every engine shares (configuration, errors,
//!   results; per-program facts, coordinatewise evaluation, parameter sampling).
//! - `pass` and `draw`: forward and reverse passes over the IR on N×P blocks;
//!   one draw's exact empirical NTK and conditional NNGP.
//! - [`cond`]: the conditional engine (hidden products drawn given their history).
//! - [`footprint`] and `stats`: memory per draw; means and standard errors.
//! - [`exec`]: the driver: K draws of a program (`tpc run`).
//! - [`unrolled`]: training by running the unrolled program of [`crate::autodiff`]
//!   (either engine).
//! - [`train`]: dense full-batch gradient descent at width N for a `train` block (the
//!   reference trajectory f_t), and per-step coordinate sizes for coordinate checks.

pub mod cond;
mod draw;
pub mod exec;
pub mod footprint;
pub mod linalg;
mod pass;
mod plan;
pub mod sample;
mod stats;
pub mod train;
pub mod types;
pub mod unrolled;
