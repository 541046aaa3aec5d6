//! Numerics of the infinite-width limit: Gaussian expectations.
//!
//! The Master Theorem reduces every limit quantity to expectations of coordinatewise
//! functions of centered Gaussian vectors (theory.md §1.2). This module computes them:
//!
//! * [`dual`]: closed-form kernels ("dual activations", theory.md §3.2) recognized from
//!   the IR's [`crate::ir::expr::Expr`], with Gauss–Hermite fallback, evaluated on whole
//!   covariance blocks (the hot path of the NNGP/NTK recursions of theory.md §3.1);
//! * [`gauss`]: Gauss–Hermite rules and 1-, 2- and k-dimensional expectations with
//!   degree selection for a stated accuracy (theory.md §3.3), and the [`gauss::Estimate`]
//!   type (value, error, method) that is reported to users;
//! * [`qmc`]: randomized quasi-Monte Carlo for expectations of rank above 3.

pub mod dual;
pub mod gauss;
pub mod qmc;
