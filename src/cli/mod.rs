//! The `tpc` binary's modules beside `main.rs` (which holds the clap definitions and the
//! dispatch of each subcommand): `io` (loading, diagnostics, printing), `predict`
//! (`tpc predict`), `tiles` (`tpc limit --out --memory`). The library never imports them.

pub(crate) mod io;
pub(crate) mod predict;
pub(crate) mod tiles;
