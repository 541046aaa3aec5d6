//! Issue 13, item 2: smooth kernels without a closed form (tanh, gelu, sigmoid,
//! compositions) are evaluated on blocks by a Hermite (Mehler) series with cached
//! per-variance coefficients and a conditional 1-D rule near |rho| = 1
//! (`src/limit/smooth.rs`). Every entry must be within the kernel's *stated* error of
//! an independent reference, and that error must be at most 1e-9.
//!
//! Reference: the conditional form `E[f(u) g(v)] = E_z[f(s1 z) E_eps g(c z + sigma eps)]`
//! with the trapezoid rule in both variables, steps `0.1 / scale` (the integrands are
//! analytic in strips of half-width `(pi/2) / scale`, so the rule's error is about
//! `exp(-2 pi (pi/2) / 0.1) ≈ 1e-43`), integrands as native closures, written here
//! independently of `tpc`. (A degree-1024 Gauss–Hermite rule is not accurate enough
//! for this: at variance 13 and rho = 0.995 it is off by 1.6e-11, where this reference
//! and the smooth path agree to 4e-14, and an independent numpy trapezoid too.)

use nalgebra::DMatrix;
use tpc::ir::expr::{Expr, Fun};
use tpc::limit::dual::PairKernel;
use tpc::limit::gauss::Method;

/// Trapezoid nodes `i h` on [-13, 13] with standard-normal weights.
fn grid(h: f64) -> Vec<(f64, f64)> {
    let n = (13.0 / h).ceil() as i64;
    let c = h / (2.0 * std::f64::consts::PI).sqrt();
    (-n..=n)
        .map(|i| {
            let z = i as f64 * h;
            (z, c * (-0.5 * z * z).exp())
        })
        .collect()
}

/// `E[f(u) g(v)]` by the conditional form (module doc).
fn reference(f: &dyn Fn(f64) -> f64, g: &dyn Fn(f64) -> f64, s11: f64, s12: f64, s22: f64) -> f64 {
    let s1 = s11.sqrt();
    let c = s12 / s1;
    let sigma = (s22 - s12 * s12 / s11).max(0.0).sqrt();
    let outer = grid(0.1 / s1.max(c.abs()).max(1.0));
    let inner = grid((0.1 / sigma).min(0.5));
    outer
        .iter()
        .map(|&(z, w)| {
            let gz = if sigma < 1e-12 {
                g(c * z)
            } else {
                inner.iter().map(|&(e, we)| we * g(c * z + sigma * e)).sum()
            };
            w * f(s1 * z) * gz
        })
        .sum()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}
fn gelu(x: f64) -> f64 {
    0.5 * x * libm::erfc(-x / std::f64::consts::SQRT_2)
}

fn x() -> Expr {
    Expr::Arg(0)
}
fn call(f: Fun) -> Expr {
    Expr::call(f, x())
}

type Native = fn(f64) -> f64;

/// Variances up to 13 (the issue-13 RNN on N(0, 1) inputs reaches 12.8), correlations
/// at 0, ±0.5, 0.95, 0.995, -0.9999, 0.999999 and exactly 1 on the diagonal.
fn block() -> (Vec<f64>, Vec<f64>, DMatrix<f64>) {
    let d1: Vec<f64> = vec![13.0, 12.0, 5.0, 0.1, 2.0];
    let d2: Vec<f64> = vec![12.5, 13.0, 4.0, 1.0, 2.0];
    let rho: [[f64; 5]; 5] = [
        [1.0, 0.995, -0.9999, 0.5, 0.0],
        [0.999_999, 1.0, 0.95, -0.5, 0.3],
        [-0.9999, 0.995, 1.0, 0.7, -0.95],
        [0.5, -0.3, 0.999, 1.0, 0.9],
        [0.2, 0.99, -0.6, 0.8, 1.0],
    ];
    let cross = DMatrix::from_fn(5, 5, |p, q| rho[p][q] * (d1[p] * d2[q]).sqrt());
    (d1, d2, cross)
}

#[test]
fn smooth_kernels_are_within_their_stated_error_of_an_independent_reference() {
    let dtanh = Fun::Tanh.deriv(x());
    let tanh_x = Expr::mul(call(Fun::Tanh), x());
    let tanh_plus_sigmoid = Expr::add(call(Fun::Tanh), call(Fun::Sigmoid));
    let cases: Vec<(&str, Expr, Expr, Native, Native)> = vec![
        (
            "tanh·tanh",
            call(Fun::Tanh),
            call(Fun::Tanh),
            f64::tanh,
            f64::tanh,
        ),
        (
            "tanh'·tanh'",
            dtanh.clone(),
            dtanh,
            |t| 1.0 - t.tanh().powi(2),
            |t| 1.0 - t.tanh().powi(2),
        ),
        ("gelu·gelu", call(Fun::Gelu), call(Fun::Gelu), gelu, gelu),
        (
            "sigmoid·tanh",
            call(Fun::Sigmoid),
            call(Fun::Tanh),
            sigmoid,
            f64::tanh,
        ),
        (
            "tanh(x)x·(tanh+sigmoid)",
            tanh_x,
            tanh_plus_sigmoid,
            |t| t.tanh() * t,
            |t| t.tanh() + sigmoid(t),
        ),
    ];
    let (d1, d2, cross) = block();
    for (name, f, g, fnat, gnat) in &cases {
        let k = PairKernel::new(f, g, 13.0, 1e-11);
        assert!(
            matches!(k.method(), Method::HermiteSeries { .. }),
            "{name}: {}",
            k.method()
        );
        let out = k.block(&d1, &d2, &cross, false);
        let stated = k.error_bound();
        assert!(stated <= 1e-9, "{name}: stated error {stated:e}");
        let mut worst = 0.0f64;
        for p in 0..d1.len() {
            for q in 0..d2.len() {
                let want = reference(fnat, gnat, d1[p], cross[(p, q)], d2[q]);
                let got = out[(p, q)];
                worst = worst.max((got - want).abs());
                assert!(
                    (got - want).abs() <= stated,
                    "{name} at ({}, {}, {}): {got} vs reference {want}, off by {:e} > stated {stated:e}",
                    d1[p],
                    cross[(p, q)],
                    d2[q],
                    (got - want).abs()
                );
                // single entries take the same path
                let one = k.eval(d1[p], cross[(p, q)], d2[q]);
                assert!((one - want).abs() <= stated, "{name}: eval {one} vs {want}");
            }
        }
        eprintln!("{name}: largest error {worst:.1e}, stated {stated:.1e}");
    }
}
