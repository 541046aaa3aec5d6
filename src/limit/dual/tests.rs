use super::*;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

fn x() -> Expr {
    Expr::Arg(0)
}
fn call(f: Fun) -> Expr {
    Expr::call(f, x())
}
fn erf_prime() -> Expr {
    Fun::Erf.deriv(x())
}

/// Covariances: unequal variances, rho near ±1, zero correlation.
const COVS: [(f64, f64, f64); 5] = [
    (1.0, 0.3, 2.0),
    (1.5, -1.45, 1.5),
    (0.7, 0.699_9, 0.7),
    (2.0, 0.0, 0.5),
    (0.5, -0.3, 1.2),
];

/// Smooth closed forms against 2-D Gauss–Hermite at degree 256.
#[test]
fn smooth_closed_forms_match_quadrature() {
    let pairs: Vec<(Expr, Expr)> = vec![
        (call(Fun::Erf), call(Fun::Erf)),
        (
            Expr::call(Fun::Erf, Expr::mul(Expr::Const(0.7), x())),
            Expr::call(Fun::Erf, Expr::mul(Expr::Const(-1.3), x())),
        ),
        (erf_prime(), erf_prime()),
        (call(Fun::Exp), call(Fun::Exp)),
        (call(Fun::Sin), call(Fun::Sin)),
        (call(Fun::Cos), call(Fun::Cos)),
        (call(Fun::Sin), call(Fun::Cos)),
        (call(Fun::Exp), call(Fun::Sin)),
        (call(Fun::Exp), call(Fun::Cos)),
        (call(Fun::Exp), erf_prime()),
        (erf_prime(), call(Fun::Cos)),
        (x(), call(Fun::Erf)),
        (x(), call(Fun::Sin)),
        (x(), call(Fun::Exp)),
        (x(), erf_prime()),
        (x(), x()),
        (Expr::Const(2.5), call(Fun::Exp)),
        (Expr::Const(2.5), call(Fun::Erf)),
        (call(Fun::Erf), call(Fun::Exp)),
        (call(Fun::Erf), call(Fun::Cos)),
        (call(Fun::Erf), erf_prime()),
        // sin(2u + 1), exp(-u^2/2) * cos(u)  (products and affine arguments)
        (
            Expr::call(
                Fun::Sin,
                Expr::add(Expr::mul(Expr::Const(2.0), x()), Expr::Const(1.0)),
            ),
            Expr::mul(
                Expr::call(Fun::Exp, Expr::mul(Expr::Const(-0.5), Expr::powi(x(), 2))),
                call(Fun::Cos),
            ),
        ),
        (Expr::powi(call(Fun::Cos), 2), call(Fun::Sin)),
    ];
    for (f, g) in &pairs {
        let k = PairKernel::new(f, g, 2.0, 1e-12);
        let name = format!(
            "{} · {}",
            f.display(&|_| "x".into()),
            g.display(&|_| "x".into())
        );
        assert!(k.is_closed_form(), "{name}: {}", k.method());
        for &(a, b, c) in &COVS {
            let v = k.eval(a, b, c);
            let fe = |t: f64| f.eval(&[t]);
            let ge = |t: f64| g.eval(&[t]);
            let q = gauss::expect2(&fe, &ge, a, b, c, 256);
            assert!(
                (v - q).abs() <= 1e-10 * q.abs().max(1.0),
                "{name} at ({a},{b},{c}): closed {v} vs GH {q}"
            );
        }
    }
}

/// Kinked closed forms against seeded Monte Carlo (10^6 samples, 4 SE) and, as a
/// coarse second opinion, 2-D Gauss–Hermite of degree 512.
#[test]
fn kinked_closed_forms_match_monte_carlo() {
    let neg = |e: Expr| Expr::neg(e);
    let leaky = Expr::add(
        Expr::mul(
            Expr::Const(0.1),
            Expr::neg(Expr::call(Fun::Relu, Expr::neg(x()))),
        ),
        Expr::mul(Expr::Const(1.5), call(Fun::Relu)),
    ); // 0.1 min(x,0) + 1.5 max(x,0)
    let pairs: Vec<(Expr, Expr)> = vec![
        (call(Fun::Relu), call(Fun::Relu)),
        (call(Fun::Step), call(Fun::Step)),
        (call(Fun::Relu), call(Fun::Step)),
        (call(Fun::Step), call(Fun::Relu)),
        (call(Fun::Abs), call(Fun::Abs)),
        (call(Fun::Abs), call(Fun::Relu)),
        (call(Fun::Relu), x()),
        (call(Fun::Step), x()),
        (Fun::Abs.deriv(x()), Fun::Abs.deriv(x())),
        (leaky.clone(), leaky.clone()),
        (Expr::call(Fun::Relu, neg(x())), call(Fun::Step)),
        (Expr::call(Fun::Step, neg(x())), call(Fun::Relu)),
        (call(Fun::Step), call(Fun::Erf)),
        (call(Fun::Relu), call(Fun::Erf)),
        (
            call(Fun::Step),
            Expr::call(Fun::Erf, Expr::mul(Expr::Const(2.0), x())),
        ),
        (call(Fun::Relu), call(Fun::Exp)),
        (call(Fun::Step), call(Fun::Exp)),
        (call(Fun::Relu), erf_prime()),
        (call(Fun::Step), erf_prime()),
        (
            call(Fun::Abs),
            Expr::call(Fun::Exp, Expr::neg(Expr::mul(Expr::Const(0.3), x()))),
        ),
        (Expr::Const(3.0), call(Fun::Relu)),
    ];
    let n = 1_000_000;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(2024);
    let z: Vec<(f64, f64)> = (0..n)
        .map(|_| (rng.sample(StandardNormal), rng.sample(StandardNormal)))
        .collect();
    for (f, g) in &pairs {
        let name = format!(
            "{} · {}",
            f.display(&|_| "x".into()),
            g.display(&|_| "x".into())
        );
        let k = PairKernel::new(f, g, 2.0, 1e-10);
        assert!(k.is_closed_form(), "{name}: {}", k.method());
        for &(a, b, c) in &COVS {
            let v = k.eval(a, b, c);
            let l11 = a.sqrt();
            let l21 = b / l11;
            let l22 = (c - l21 * l21).max(0.0).sqrt();
            let (mut s, mut s2) = (0.0, 0.0);
            for &(z1, z2) in &z {
                let y = f.eval(&[l11 * z1]) * g.eval(&[l21 * z1 + l22 * z2]);
                s += y;
                s2 += y * y;
            }
            let mean = s / n as f64;
            let se = ((s2 / n as f64 - mean * mean) / n as f64).sqrt();
            assert!(
                (v - mean).abs() <= 4.0 * se + 1e-12,
                "{name} at ({a},{b},{c}): closed {v} vs MC {mean} ± {se}"
            );
            let fe = |t: f64| f.eval(&[t]);
            let ge = |t: f64| g.eval(&[t]);
            let q = gauss::expect2(&fe, &ge, a, b, c, 512);
            assert!((v - q).abs() < 2e-2, "{name}: closed {v} vs GH {q}");
        }
    }
}

/// theory.md §3.2: the correct erf' kernel at S = [[1,.3],[.3,2]] is 0.3328 (GP4A's
/// buggy VDerErf gives 0.3817).
#[test]
fn erf_prime_kernel_theory_number() {
    let k = PairKernel::new(&erf_prime(), &erf_prime(), 2.0, 1e-12);
    assert!(k.is_closed_form());
    let v = k.eval(1.0, 0.3, 2.0);
    let q = gauss::expect2(
        &|t| erf_prime().eval(&[t]),
        &|t| erf_prime().eval(&[t]),
        1.0,
        0.3,
        2.0,
        256,
    );
    assert!((v - q).abs() < 1e-13, "{v} vs {q}");
    assert!((v - 0.3328).abs() < 5e-5, "{v}");
    // The GP4A formula with sqrt(S11) in place of S11 is indeed different:
    let gp4a = 4.0 / PI / ((1.0 + 2.0) * (1.0 + 2.0 * 2f64.sqrt()) - 4.0 * 0.09f64).sqrt();
    assert!((gp4a - 0.3817).abs() < 5e-5 && (gp4a - v).abs() > 0.04);
    // and the step kernel is not the sign kernel (GP4A VStep bug)
    let s = PairKernel::new(&call(Fun::Step), &call(Fun::Step), 1.0, 1e-12);
    let rho: f64 = 0.4;
    assert!((s.eval(1.0, rho, 1.0) - (PI - rho.acos()) / (2.0 * PI)).abs() < 1e-15);
    assert!((s.eval(1.0, rho, 1.0) - 2.0 / PI * rho.asin()).abs() > 0.05);
}

#[test]
fn recognition() {
    let kind = |f: &Expr, g: &Expr| PairKernel::new(f, g, 1.0, 1e-8).method();
    // relu' = step, erf' and abs' as produced by Fun::deriv
    let relu_d = Fun::Relu.deriv(x());
    assert_eq!(recognize(&relu_d), Some(vec![(1.0, Atom::Step)]));
    assert!(
        matches!(kind(&erf_prime(), &erf_prime()), Method::ClosedForm(f) if f == Families::GAUSSIAN)
    );
    assert!(
        matches!(kind(&call(Fun::Relu), &call(Fun::Relu)), Method::ClosedForm(f) if f == Families::ARC_COSINE)
    );
    assert_eq!(
        kind(&call(Fun::Relu), &call(Fun::Relu)).to_string(),
        "closed form (arc-cosine)"
    );
    // tanh has no closed form: the smooth path (Hermite series, smooth.rs)
    let m = kind(&call(Fun::Tanh), &call(Fun::Tanh));
    assert!(matches!(m, Method::HermiteSeries { .. }), "{m}");
    // relu against cos: no closed form (complex tilt) -> kinked quadrature
    let m = kind(&call(Fun::Relu), &call(Fun::Cos));
    assert!(
        matches!(m, Method::GaussHermite { kinked: true, .. }),
        "{m}"
    );
    assert!(m.to_string().contains("kinked"));
    // relu(x) + tanh(x): kinked, quadrature
    let f = Expr::add(call(Fun::Relu), call(Fun::Tanh));
    assert!(matches!(
        kind(&f, &f),
        Method::GaussHermite { kinked: true, .. }
    ));
    // exp(x^2) diverges: not recognized
    assert!(recognize(&Expr::call(Fun::Exp, Expr::powi(x(), 2))).is_none());
    // relu(x + 1) has no elementary closed form
    assert!(recognize(&Expr::call(Fun::Relu, Expr::add(x(), Expr::Const(1.0)))).is_none());
    // a second operand is not a one-argument function
    assert!(recognize(&Expr::Arg(1)).is_none());
}

/// Constant or linear partner without a closed form: 1-D quadrature (Stein's lemma
/// for the linear one), checked against 2-D quadrature.
#[test]
fn one_dimensional_reductions() {
    let tanh = call(Fun::Tanh);
    let gelu = call(Fun::Gelu);
    let two_x = Expr::mul(Expr::Const(2.0), x());
    let cases = [
        (Expr::Const(1.5), tanh.clone()),
        (gelu.clone(), Expr::Const(-0.5)),
        (two_x.clone(), tanh.clone()),
        (gelu.clone(), x()),
        (x(), Expr::add(call(Fun::Relu), call(Fun::Sigmoid))),
    ];
    for (f, g) in &cases {
        let k = PairKernel::new(f, g, 2.0, 1e-11);
        assert!(
            matches!(k.method(), Method::GaussHermite { dims: 1, .. }),
            "{}",
            k.method()
        );
        for &(a, b, c) in &COVS {
            let q = gauss::expect2(&|t| f.eval(&[t]), &|t| g.eval(&[t]), a, b, c, 512);
            let v = k.eval(a, b, c);
            // relu + sigmoid is kinked: 2-D GH itself is only good to ~1e-4 there
            let tol = if is_kinked(g) { 1e-4 } else { 1e-10 };
            assert!(
                (v - q).abs() < tol,
                "{} at ({a},{b},{c}): {v} vs {q}",
                k.method()
            );
        }
    }
    // x against step + tanh: Stein would need the delta of step, so 2-D quadrature
    let k = PairKernel::new(
        &x(),
        &Expr::add(call(Fun::Step), call(Fun::Tanh)),
        2.0,
        1e-8,
    );
    assert!(matches!(k.method(), Method::GaussHermite { dims: 2, .. }));
}

#[test]
fn estimate_display() {
    let e = pair_expectation(&call(Fun::Relu), &call(Fun::Relu), 1.0, 0.5, 1.0, 1e-10);
    let th = 0.5f64.acos();
    let exact = (th.sin() + (PI - th) * 0.5) / (2.0 * PI);
    assert!((e.value - exact).abs() < 1e-15);
    assert!(e.to_string().ends_with("(closed form (arc-cosine))"), "{e}");
    let e = pair_expectation(&call(Fun::Tanh), &call(Fun::Tanh), 1.0, 0.5, 1.0, 1e-10);
    assert!(e.to_string().contains("Hermite (Mehler) series"), "{e}");
    assert!(e.error <= 1e-10);
}

#[test]
#[should_panic(expected = "Arg(0) only")]
fn second_operand_is_rejected() {
    PairKernel::new(&Expr::Arg(1), &x(), 1.0, 1e-8);
}

#[test]
fn zero_variances_use_true_values_at_zero() {
    // step(-x) at u = 0 is step(0) = 0, not 1 - step(0).
    let f = Expr::call(Fun::Step, Expr::neg(x()));
    let k = PairKernel::new(&f, &call(Fun::Relu), 1.0, 1e-10);
    assert_eq!(k.eval(0.0, 0.0, 1.0), 0.0);
    let k = PairKernel::new(&call(Fun::Cos), &call(Fun::Step), 1.0, 1e-10);
    assert!((k.eval(0.0, 0.0, 1.0) - 0.5).abs() < 1e-15);
    assert!((k.eval(1.0, 0.0, -1e-18) - 0.0).abs() < 1e-15);
    let k = PairKernel::new(&call(Fun::Relu), &call(Fun::Relu), 1.0, 1e-10);
    assert_eq!(k.eval(0.0, 0.0, 1.0), 0.0);
    assert!(k.eval(f64::NAN, 0.0, 1.0).is_nan());
    // slightly non-PSD: |S12| > sqrt(S11 S22) by round-off
    let v = k.eval(1.0, 1.0 + 1e-14, 1.0);
    assert!((v - 0.5).abs() < 1e-12, "{v}");
    let m = MeanKernel::new(&f, 1.0, 1e-10);
    assert_eq!(m.eval(0.0), 0.0);
    assert!((m.eval(1.0) - 0.5).abs() < 1e-15);
}

#[test]
fn means_and_diagonals() {
    let s: f64 = 1.7;
    let relu = MeanKernel::new(&call(Fun::Relu), 2.0, 1e-12);
    assert!((relu.eval(s) - (s / (2.0 * PI)).sqrt()).abs() < 1e-15);
    let ep = MeanKernel::new(&erf_prime(), 2.0, 1e-12);
    assert!((ep.eval(s) - 2.0 / PI.sqrt() / (1.0 + 2.0 * s).sqrt()).abs() < 1e-15);
    let st = MeanKernel::new(&call(Fun::Step), 2.0, 1e-12);
    assert_eq!(st.eval(s), 0.5);
    let th = MeanKernel::new(&Expr::powi(call(Fun::Tanh), 2), 2.0, 1e-12);
    assert!(matches!(th.method(), Method::GaussHermite { dims: 1, .. }));
    let q = gauss::expect1(&|t: f64| t.tanh().powi(2), s, 512);
    assert!((th.eval(s) - q).abs() < 1e-12);
    // E[relu(u)^2] = S/2 on the diagonal
    let k = PairKernel::new(&call(Fun::Relu), &call(Fun::Relu), 2.0, 1e-12);
    assert!((k.eval(s, s, s) - s / 2.0).abs() < 1e-15);
    // E[erf(u)^2] = (2/pi) asin(2S/(1+2S))
    let k = PairKernel::new(&call(Fun::Erf), &call(Fun::Erf), 2.0, 1e-12);
    assert!((k.eval(s, s, s) - 2.0 / PI * (2.0 * s / (1.0 + 2.0 * s)).asin()).abs() < 1e-15);
}

#[test]
fn tanh_kernel_meets_tolerance() {
    let t = call(Fun::Tanh);
    let k = PairKernel::new(&t, &t, 2.0, 1e-10);
    assert!(k.error_bound() <= 1e-10);
    let hi = |a, b, c| gauss::expect2(&|v: f64| v.tanh(), &|v: f64| v.tanh(), a, b, c, 512);
    for &(a, b, c) in &COVS {
        assert!((k.eval(a, b, c) - hi(a, b, c)).abs() <= 1e-10);
    }
    let d = Fun::Tanh.deriv(x());
    let k = PairKernel::new(&d, &d, 2.0, 1e-10);
    for &(a, b, c) in &COVS {
        let q = gauss::expect2(&|v| d.eval(&[v]), &|v| d.eval(&[v]), a, b, c, 512);
        assert!((k.eval(a, b, c) - q).abs() <= 1e-10);
    }
}

fn random_psd(m: usize, seed: u64) -> DMatrix<f64> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let a = DMatrix::<f64>::from_fn(m, 3, |_, _| rng.sample::<f64, _>(StandardNormal));
    let mut k = &a * a.transpose() / 3.0;
    // one zero-variance point
    for j in 0..m {
        k[(0, j)] = 0.0;
        k[(j, 0)] = 0.0;
    }
    k
}

#[test]
fn blocks_match_entrywise() {
    let m = 37;
    let k = random_psd(m, 5);
    let d: Vec<f64> = (0..m).map(|i| k[(i, i)]).collect();
    let kernels = [
        PairKernel::new(&call(Fun::Relu), &call(Fun::Relu), 4.0, 1e-10),
        PairKernel::new(&call(Fun::Step), &call(Fun::Step), 4.0, 1e-10),
        PairKernel::new(&call(Fun::Erf), &call(Fun::Erf), 4.0, 1e-10),
        PairKernel::new(&erf_prime(), &erf_prime(), 4.0, 1e-10),
        PairKernel::new(&call(Fun::Abs), &call(Fun::Relu), 4.0, 1e-10),
        PairKernel::new(&call(Fun::Tanh), &call(Fun::Tanh), 4.0, 1e-6),
        PairKernel::new(&call(Fun::Tanh), &call(Fun::Tanh), 4.0, 1e-10),
        PairKernel::new(&call(Fun::Gelu), &call(Fun::Sigmoid), 4.0, 1e-9),
    ];
    for kern in &kernels {
        let sym = kern.block(&d, &d, &k, true);
        let full = kern.block(&d, &d, &k, false);
        for p in 0..m {
            for q in 0..m {
                let e = kern.eval(d[p], k[(p, q)], d[q]);
                // Blocks of smooth quadrature kernels use the Hermite series (and
                // the 2-D rule is not exactly symmetric under swapping u and v):
                // both agree with the entrywise value to the error bound.
                let tol = if kern.is_closed_form() {
                    1e-14 * e.abs().max(1.0)
                } else {
                    2.0 * kern.error_bound()
                };
                let name = kern.method();
                assert!(
                    (full[(p, q)] - e).abs() <= tol,
                    "{name} ({p},{q}) {} vs {e}",
                    full[(p, q)]
                );
                assert!((sym[(p, q)] - full[(p, q)]).abs() <= tol, "{name}");
            }
        }
        let mut inplace = k.clone();
        kern.block_in_place(&d, &d, &mut inplace, true);
        assert_eq!(inplace, sym);
    }
    // rectangular block
    let d2: Vec<f64> = d[..20].to_vec();
    let cross = k.columns(0, 20).into_owned();
    let out = kernels[0].block(&d, &d2, &cross, false);
    assert_eq!(out[(5, 7)], kernels[0].eval(d[5], k[(5, 7)], d[7]));
}

/// The Hermite series is used (not just its fallback) and is accurate.
#[test]
fn mehler_series_matches_quadrature() {
    let t = call(Fun::Tanh);
    let g = call(Fun::Gelu);
    for (f, gg, v) in [(&t, &t, 2.0), (&g, &t, 4.0)] {
        let k = PairKernel::new(f, gg, v, 1e-10);
        let d = [v, 0.5 * v, 0.1];
        let Plan::Smooth(sm) = &k.plan else {
            panic!("not the smooth plan: {}", k.method());
        };
        let s = sm.block(&d, &d);
        for p in 0..3 {
            for q in 0..3 {
                for rho in [-0.95, -0.6, 0.0, 0.3, 0.8, 0.95] {
                    let x = rho * (d[p] * d[q]).sqrt();
                    let val = s.at(p, q, x);
                    let q2 =
                        gauss::expect2(&|y| f.eval(&[y]), &|y| gg.eval(&[y]), d[p], x, d[q], 512);
                    assert!((val - q2).abs() <= 1e-10, "rho={rho}: {val} vs {q2}");
                }
            }
        }
    }
}

#[test]
fn pair_block_relu_step() {
    let m = 41;
    let k = random_psd(m, 9);
    let d: Vec<f64> = (0..m).map(|i| k[(i, i)]).collect();
    let relu = PairKernel::new(&call(Fun::Relu), &call(Fun::Relu), 4.0, 1e-10);
    let step = PairKernel::new(&Fun::Relu.deriv(x()), &Fun::Relu.deriv(x()), 4.0, 1e-10);
    let r = relu.block(&d, &d, &k, true);
    let s = step.block(&d, &d, &k, true);
    let theta = DMatrix::from_fn(m, m, |i, j| 1.0 + (i + j) as f64);
    for symmetric in [true, false] {
        let mut a = k.clone();
        let mut b = theta.clone();
        relu.block_pair_in_place(&step, &d, &d, &mut a, &mut b, Combine::Multiply, symmetric);
        let expect_b = s.component_mul(&theta);
        assert!((&a - &r).amax() < 1e-14);
        assert!((&b - &expect_b).amax() < 1e-13);
        let mut a = k.clone();
        let mut b = DMatrix::zeros(m, m);
        relu.block_pair_in_place(&step, &d, &d, &mut a, &mut b, Combine::Overwrite, symmetric);
        assert!((&b - &s).amax() < 1e-15);
        // generic (non-fused) path gives the same
        let erf = PairKernel::new(&call(Fun::Erf), &call(Fun::Erf), 4.0, 1e-10);
        let mut a = k.clone();
        let mut b = DMatrix::zeros(m, m);
        erf.block_pair_in_place(&step, &d, &d, &mut a, &mut b, Combine::Overwrite, symmetric);
        assert!((&b - &s).amax() < 1e-15);
        assert!((&a - &erf.block(&d, &d, &k, true)).amax() < 1e-15);
    }
}

/// Timing of the relu hot path on a 4000 x 4000 block. Run with
/// `cargo test --release --lib bench_relu_block -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_relu_block() {
    use std::time::Instant;
    let m = 4000;
    // 4000 random inputs in 16 dims: distinct points, correlations spread in (-1, 1)
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
    let x = DMatrix::<f64>::from_fn(m, 16, |_, _| rng.sample::<f64, _>(StandardNormal));
    let k = &x * x.transpose() / 16.0;
    let d: Vec<f64> = (0..m).map(|i| k[(i, i)]).collect();
    let relu = PairKernel::new(&call(Fun::Relu), &call(Fun::Relu), 4.0, 1e-10);
    let step = PairKernel::new(&call(Fun::Step), &call(Fun::Step), 4.0, 1e-10);
    let erf = PairKernel::new(&call(Fun::Erf), &call(Fun::Erf), 4.0, 1e-10);
    let per = |t: f64| t / (m * m) as f64 * 1e9;
    // best of 3, after a warm-up that starts the rayon pool and faults the pages in
    let time = |f: &mut dyn FnMut(&mut DMatrix<f64>, &mut DMatrix<f64>)| {
        let mut best = f64::INFINITY;
        for _ in 0..4 {
            let mut a = k.clone();
            let mut b = k.clone();
            let t = Instant::now();
            f(&mut a, &mut b);
            best = best.min(t.elapsed().as_secs_f64());
        }
        best
    };
    for symmetric in [true, false] {
        let e = time(&mut |a, _| relu.block_in_place(&d, &d, a, symmetric));
        println!(
            "relu block symmetric={symmetric}: {e:.3} s, {:.2} ns/entry",
            per(e)
        );
        let e = time(&mut |a, b| {
            relu.block_pair_in_place(&step, &d, &d, a, b, Combine::Multiply, symmetric)
        });
        println!(
            "relu+step fused symmetric={symmetric}: {e:.3} s, {:.2} ns/entry",
            per(e)
        );
        let e = time(&mut |a, _| erf.block_in_place(&d, &d, a, symmetric));
        println!(
            "erf block symmetric={symmetric}: {e:.3} s, {:.2} ns/entry",
            per(e)
        );
    }
    let e = time(&mut |a, _| {
        let n = a.nrows();
        fastmath::mirror_upper_par(a.as_mut_slice(), n)
    });
    println!("mirror alone: {e:.3} s");
    let tanh = PairKernel::new(&call(Fun::Tanh), &call(Fun::Tanh), 4.0, 1e-10);
    let t = Instant::now();
    let mut a = k.clone();
    tanh.block_in_place(&d, &d, &mut a, true);
    let e = t.elapsed().as_secs_f64();
    println!(
        "tanh block ({}, Hermite series) symmetric: {e:.3} s, {:.2} ns/entry",
        tanh.method(),
        per(e)
    );
    println!("threads: {}", rayon::current_num_threads());
}
