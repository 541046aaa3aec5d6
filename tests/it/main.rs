//! The integration tests, one binary (one link in CI instead of one per file).
//! Run one file's tests with e.g. `cargo test --release --test it limit::`.

mod adversarial;
mod api;
mod common;
mod compare;
mod contract;
mod coord_check;
mod diagnostics;
mod examples;
mod factor;
mod finite;
mod finite_cond;
mod finite_refusals;
mod finite_train;
mod frontend_input;
mod fused_relu;
mod fuzz_frontend;
mod limit;
mod limit_linear;
mod limit_refusals;
mod limit_train;
mod netsor;
mod netsor_limit;
mod outputs;
mod particle;
mod quadrature;
mod readme_codes;
mod scaling;
mod semicircle_scaling;
mod tied;
mod unrolled;
