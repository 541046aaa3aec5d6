//! tpc: a compiler from a small neural-network language to Tensor Programs.
//!
//! See `ARCHITECTURE.md` for the map. The public API is small: [`compile`] a source
//! to an [`ir::Program`], then derive its infinite-width limit or run it at finite width.

pub mod finite;
pub mod ir;
