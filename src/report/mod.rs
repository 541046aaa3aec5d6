//! Everything tpc prints: listings, derivations, tables and JSON.
//!
//! Interpreters return numbers; this module decides how they look, so the text and
//! JSON outputs of cli.md stay in one place.

pub mod compare;
pub mod coord;
pub mod graph;
pub mod limit;
pub mod npy;
pub mod predict;
pub mod run;
pub mod stream;
