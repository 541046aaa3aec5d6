//! Infinite-width training trajectories (`tpc::limit::train`, `tpc limit` on `train`):
//!
//! * kernel regime (NTK parameterization of `sgd_mlp.tp`, one and two outputs, eval
//!   points other than the training inputs): `f_t` equals kernel gradient descent with
//!   the limit NTK computed independently here by `limit` over the union of points and
//!   iterated here, to 1e-10; and it is within 4 standard errors of the finite-width
//!   mean trajectory at every step;
//! * linear one-hidden-layer muP: `f_t` equals TP4 Cor 6.2's ABCD recursion to 1e-12
//!   (TP4's own laws, d = 2, a batch of 3), and agrees with finite width within 4 SE
//!   (the `mup` preset, with a bias and two outputs);
//! * nonlinear feature learning (`sgd_mlp.tp`) and deep linear muP go to the particle
//!   engine (f_t with a standard error), checked against the exact linear engine on
//!   linear muP; unstable SP says "not computed" with `f_t = null`, never a number;
//! * `tpc limit` prints the trajectory and the method (text) and `train.f_t` (JSON).

use crate::common;

use nalgebra::{DMatrix, DVector};
use tpc::finite::exec::{run, RunConfig};
use tpc::ir::Program;
use tpc::limit::limit;
use tpc::limit::limit_with;
use tpc::limit::particle::ParticleConfig;
use tpc::limit::train::{
    linear_trajectory, particle_trajectory, KERNEL_METHOD, KERNEL_XENT_METHOD, LINEAR_METHOD,
};

fn compile(src: &str) -> Program {
    tpc::compile(src).unwrap_or_else(|e| panic!("{e}"))
}

/// `sgd_mlp.tp` with `parameterization ntk` (and its comment dropped).
fn sgd_mlp_ntk() -> String {
    common::example("sgd_mlp")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            if l.starts_with("parameterization") {
                "parameterization ntk"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Two outputs sharing the features, NTK parameterization, with a bias and a constant.
const TWO_OUT_NTK: &str = "\
width n
input x : 2
parameterization ntk
param U : n x 2
param b : n { std = 0.5 }
param W : n x n
param v : 1 x n
param u : 1 x n
h1 = tanh(U @ x + b)
h2 = relu(W @ h1)
output f = v @ h2
output g = u @ h1 + 0.5 * v @ h2 + 0.25
train {
    loss  = mse
    lr    = 0.4
    steps = 4
    data  = [ ([1.0, 0.0], [1.0, -0.5]), ([0.0, 1.0], [-1.0, 0.3]), ([0.7, 0.7], [0.5, 0.0]) ]
}
";

/// Kernel gradient descent, independently: Θ from `limit` over `union` (training
/// inputs somewhere in it), iterated from E f_0 = the constants.
fn kgd(prog: &Program, union: &[Vec<f64>], eval: &[usize], consts: &[f64]) -> DMatrix<f64> {
    let tr = prog.train.as_ref().unwrap();
    let r = limit(prog, union).unwrap();
    let th = r.ntk.unwrap();
    let u = union.len();
    let o = prog.outputs.len();
    let idx: Vec<usize> = tr
        .data
        .iter()
        .map(|s| union.iter().position(|p| *p == s.x).unwrap())
        .collect();
    let mut f = DVector::from_fn(o * u, |k, _| consts[k / u]);
    let mut out = DMatrix::zeros(tr.steps + 1, o * eval.len());
    for t in 0..=tr.steps {
        for oi in 0..o {
            for (j, &e) in eval.iter().enumerate() {
                out[(t, oi * eval.len() + j)] = f[oi * u + e];
            }
        }
        let mut chi = DVector::zeros(o * u);
        for (s, &i) in tr.data.iter().zip(&idx) {
            for oi in 0..o {
                chi[oi * u + i] += (f[oi * u + i] - s.y[oi]) / tr.data.len() as f64;
            }
        }
        f = &f - &th * chi * tr.lr;
    }
    out
}

fn max_abs_diff(a: &DMatrix<f64>, b: &DMatrix<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Finite-width mean trajectory within `z` combined standard errors of the limit.
fn assert_finite_agrees(
    prog: &Program,
    points: &[Vec<f64>],
    lim: &DMatrix<f64>,
    width: usize,
    seeds: usize,
    z: f64,
) {
    let cfg = RunConfig {
        width,
        seeds,
        seed: 7,
    };
    let r = run(prog, points, &cfg, &|| {}).unwrap();
    let t = r.train.unwrap().f_t;
    let se = t.se.unwrap();
    let mut worst = 0.0f64;
    for i in 0..lim.nrows() {
        for j in 0..lim.ncols() {
            let dev = (t.mean[(i, j)] - lim[(i, j)]).abs() / se[(i, j)].max(1e-12);
            worst = worst.max(dev);
            assert!(
                dev < z,
                "step {i}, column {j}: finite {} ± {} vs limit {} ({dev:.2} SE)\nfinite {}\nlimit {}",
                t.mean[(i, j)],
                se[(i, j)],
                lim[(i, j)],
                t.mean,
                lim
            );
        }
    }
    eprintln!("width {width}, {seeds} seeds: worst deviation {worst:.2} SE");
}

#[test]
fn kernel_regime_is_ntk_gradient_descent() {
    let prog = compile(&sgd_mlp_ntk());
    // Evaluation points: one training input and two others.
    let eval = vec![vec![0.3, -0.5], vec![1.0, 0.0], vec![-0.4, 0.9]];
    let r = limit(&prog, &eval).unwrap();
    assert_eq!(r.regime.as_deref(), Some("kernel"));
    let t = r.train.as_ref().unwrap();
    assert_eq!(t.method, KERNEL_METHOD);
    let f = t.f_t.as_ref().unwrap();
    assert_eq!(f.shape(), (4, 3));
    assert!(f.row(0).iter().all(|v| *v == 0.0), "E f_0 = 0");
    // The union the independent check uses: eval points then the new training inputs.
    let union = vec![
        vec![0.3, -0.5],
        vec![1.0, 0.0],
        vec![-0.4, 0.9],
        vec![0.0, 1.0],
        vec![0.7, 0.7],
    ];
    let want = kgd(&prog, &union, &[0, 1, 2], &[0.0]);
    let d = max_abs_diff(f, &want);
    assert!(d < 1e-10, "{d:e}\n{f}\n{want}");
    // It trains: the training input [1, 0] (target 1) moves toward its target.
    assert!((f[(3, 1)] - 1.0).abs() < (f[(0, 1)] - 1.0).abs());
    // The variance over f_0 starts at the NNGP diagonal and shrinks at the training input.
    let var = t.f_t_var.as_ref().unwrap();
    let k = r.nngp.as_ref().unwrap();
    for p in 0..3 {
        assert!((var[(0, p)] - k[(p, p)]).abs() < 1e-12);
    }
    assert!(var[(3, 1)] < var[(0, 1)]);

    // Default points (the training inputs): the same numbers at the shared point.
    let tr = common::train_inputs(&prog);
    let r2 = limit(&prog, &tr).unwrap();
    let f2 = r2.train.unwrap().f_t.unwrap();
    for s in 0..4 {
        assert!((f2[(s, 0)] - f[(s, 1)]).abs() < 1e-10);
    }
}

#[test]
fn kernel_regime_xent_says_the_mean_is_not_exact() {
    let src = sgd_mlp_ntk()
        .replace("mse", "xent")
        .replace("-1.0", "0.0")
        .replace("0.5) ]", "1.0) ]");
    let prog = compile(&src);
    let pts = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![0.7, 0.7]];
    let r = limit(&prog, &pts).unwrap();
    let t = r.train.unwrap();
    assert_eq!(t.method, KERNEL_XENT_METHOD);
    assert!(t.note.unwrap().contains("not exactly E[f_t]"));
    assert!(t.f_t_var.is_none());
    let f = t.f_t.unwrap();
    // Targets (1, 0, 1) from f_0 = 0: f_1 = −η Θ χ with χ = (σ(0) − y)/B.
    let th = r.ntk.unwrap();
    let chi = DVector::from_vec(vec![-0.5 / 3.0, 0.5 / 3.0, -0.5 / 3.0]);
    let f1 = -(&th * chi) * 0.5;
    for p in 0..3 {
        assert!((f[(1, p)] - f1[p]).abs() < 1e-12, "{f}");
    }
}

#[test]
fn kernel_regime_two_outputs() {
    let prog = compile(TWO_OUT_NTK);
    let eval = vec![vec![0.5, 0.5], vec![0.0, 1.0]];
    let r = limit(&prog, &eval).unwrap();
    assert_eq!(r.regime.as_deref(), Some("kernel"));
    let t = r.train.as_ref().unwrap();
    assert_eq!(t.method, KERNEL_METHOD);
    let f = t.f_t.as_ref().unwrap();
    assert_eq!(f.shape(), (5, 4));
    assert_eq!(f[(0, 0)], 0.0);
    assert_eq!(f[(0, 2)], 0.25, "E g_0 is g's constant");
    let union = vec![
        vec![0.5, 0.5],
        vec![0.0, 1.0],
        vec![1.0, 0.0],
        vec![0.7, 0.7],
    ];
    let want = kgd(&prog, &union, &[0, 1], &[0.0, 0.25]);
    let d = max_abs_diff(f, &want);
    assert!(d < 1e-10, "{d:e}\n{f}\n{want}");
    // The cross-output NTK blocks matter: f's target pulls on g.
    assert!(r.ntk.as_ref().unwrap()[(0, 2)].abs() > 1e-3);
}

#[test]
fn kernel_regime_matches_finite_width() {
    let prog = compile(&sgd_mlp_ntk());
    let eval = vec![vec![1.0, 0.0], vec![0.7, 0.7], vec![-0.4, 0.9]];
    let r = limit(&prog, &eval).unwrap();
    let f = r.train.unwrap().f_t.unwrap();
    assert_finite_agrees(&prog, &eval, &f, 512, 48, 4.0);

    let prog = compile(TWO_OUT_NTK);
    let eval = vec![vec![0.5, 0.5], vec![0.0, 1.0]];
    let f = limit(&prog, &eval).unwrap().train.unwrap().f_t.unwrap();
    assert_finite_agrees(&prog, &eval, &f, 512, 48, 4.0);
}

/// TP4's 1-hidden-layer linear muP in its own units (theory.md §6.2): U = sqrt(n) u,
/// V = v / sqrt(n), u, v ~ N(0, 1/n), constant learning rate.
const TP4_LINEAR: &str = "\
width n
input x : 2
param U : n x 2 ~ N(0, 1/n) * n^(1/2) lr 1
param v : 1 x n ~ N(0, 1/n) * n^(-1/2) lr 1
h = U @ x
output f = v @ h
train {
    loss  = mse
    lr    = 0.7
    steps = 6
    data  = [ ([1.0, 0.0], 1.0), ([0.0, 1.0], -1.0), ([0.7, 0.7], 0.5) ]
}
";

/// Cor 6.2: Z^{nV_t} = A Z^{nV_0} + B·Z^{U_0}, Z^{U_t} = C Z^{nV_0} + D Z^{U_0}
/// (Z^{U_0} ∈ R^d), f_t(ξ) = (A Cᵀ + B Dᵀ) ξ; a full batch sums the per-sample updates.
fn abcd(prog: &Program, eval: &[Vec<f64>]) -> DMatrix<f64> {
    let tr = prog.train.as_ref().unwrap();
    let d = 2;
    let mut a = 1.0;
    let mut b = DVector::<f64>::zeros(d);
    let mut c = DVector::<f64>::zeros(d);
    let mut dd = DMatrix::<f64>::identity(d, d);
    let f = |a: f64, b: &DVector<f64>, c: &DVector<f64>, dd: &DMatrix<f64>, x: &[f64]| {
        let x = DVector::from_column_slice(x);
        (c * a + dd * b).dot(&x)
    };
    let mut out = DMatrix::zeros(tr.steps + 1, eval.len());
    for t in 0..=tr.steps {
        for (j, x) in eval.iter().enumerate() {
            out[(t, j)] = f(a, &b, &c, &dd, x);
        }
        let (mut da, mut db) = (0.0, DVector::zeros(d));
        let (mut dc, mut ddd) = (DVector::zeros(d), DMatrix::zeros(d, d));
        for s in &tr.data {
            let chi = (f(a, &b, &c, &dd, &s.x) - s.y[0]) / tr.data.len() as f64;
            let xi = DVector::from_column_slice(&s.x);
            // Z^{nV} -= η χ ξᵀ Z^U;  Z^U -= η χ ξ Z^{nV}.
            da -= tr.lr * chi * xi.dot(&c);
            db -= dd.transpose() * &xi * (tr.lr * chi);
            dc -= &xi * (tr.lr * chi * a);
            ddd -= &xi * b.transpose() * (tr.lr * chi);
        }
        a += da;
        b += db;
        c += dc;
        dd += ddd;
    }
    out
}

#[test]
fn linear_mup_is_the_abcd_recursion() {
    let prog = compile(TP4_LINEAR);
    let eval = vec![vec![1.0, 0.0], vec![0.3, -0.8], vec![0.7, 0.7]];
    let r = limit(&prog, &eval).unwrap();
    assert_eq!(r.regime.as_deref(), Some("feature-learning"));
    let t = r.train.unwrap();
    assert_eq!(t.method, LINEAR_METHOD);
    let f = t.f_t.unwrap();
    let want = abcd(&prog, &eval);
    let d = max_abs_diff(&f, &want);
    assert!(d < 1e-12, "{d:e}\n{f}\n{want}");
    assert!(f.row(0).iter().all(|v| *v == 0.0));
    assert!(f.row(6).iter().any(|v| v.abs() > 0.1), "it learns: {f}");
    assert_finite_agrees(&prog, &eval, &f, 1024, 24, 4.0);
}

#[test]
fn linear_mup_preset_matches_finite_width() {
    let prog = compile(common::MUP_LINEAR);
    let eval = vec![vec![1.0, 0.0], vec![0.7, 0.7], vec![-0.5, 0.2]];
    let r = limit(&prog, &eval).unwrap();
    assert_eq!(r.regime.as_deref(), Some("feature-learning"));
    let t = r.train.unwrap();
    assert_eq!(t.method, LINEAR_METHOD);
    let f = t.f_t.unwrap();
    assert_eq!(f.shape(), (6, 6));
    assert_eq!(f[(0, 3)], 0.1);
    assert!(
        (f[(5, 0)] - 1.0).abs() < 0.9,
        "f moves toward 1 at [1, 0]: {f}"
    );
    assert_finite_agrees(&prog, &eval, &f, 1024, 24, 4.0);
}

/// A small particle run for tests (the CLI's default is larger).
fn small() -> ParticleConfig {
    ParticleConfig {
        particles: 1 << 16,
        replicas: 16,
        seed: 3,
        ..Default::default()
    }
}

#[test]
fn nonlinear_and_deep_feature_learning_use_the_particle_engine() {
    let prog = compile(&common::example("sgd_mlp"));
    let pts = vec![vec![1.0, 0.0]];
    let r = limit_with(&prog, &pts, &small()).unwrap();
    assert_eq!(r.regime.as_deref(), Some("feature-learning"));
    let t = r.train.as_ref().unwrap();
    assert!(
        t.method
            .starts_with("particle engine: 65536 particles in 16 replicas"),
        "{}",
        t.method
    );
    let (f, se) = (t.f_t.as_ref().unwrap(), t.f_t_se.as_ref().unwrap());
    assert_eq!((f.shape(), se.shape()), ((4, 1), (4, 1)));
    assert!(f[(3, 0)] > 0.1, "it learns toward 1 at [1, 0]: {f}");
    assert!(se.iter().all(|s| *s > 0.0 && *s < 0.01), "{se}");
    let j = tpc::report::limit::json(&r);
    assert_eq!(j["train"]["f_t_se"].as_array().unwrap().len(), 4);

    let deep = common::MUP_LINEAR
        .replace("param u : 1 x n", "param u : 1 x n\nparam W : n x n")
        .replace("k = 2 * h", "k = 2 * (W @ h)");
    // A deep linear network is exact Gaussian algebra on the unrolled program, and
    // the particle engine agrees with it (Ż of W and W.T through training steps).
    let deep = compile(&deep);
    let r = limit(&deep, &pts).unwrap();
    let t = r.train.unwrap();
    assert_eq!(t.method, tpc::limit::train::DEEP_LINEAR_METHOD);
    let exact = t.f_t.unwrap();
    let (f, se, _) = particle_trajectory(&deep, &pts, &small()).unwrap();
    assert_within_4_se(&f, &se, &exact, "deep linear");

    let r = limit(&compile(&common::example("sp_blowup")), &pts).unwrap();
    assert_eq!(r.regime.as_deref(), Some("unstable"));
    let t = r.train.unwrap();
    assert!(t.f_t.is_none());
    assert!(t.note.unwrap().contains("unstable"));
}

/// A particle trajectory `f ± se` within 4 of its standard errors of an exact one.
fn assert_within_4_se(f: &DMatrix<f64>, se: &DMatrix<f64>, exact: &DMatrix<f64>, what: &str) {
    assert_eq!(f.shape(), exact.shape());
    for i in 0..f.nrows() {
        for j in 0..f.ncols() {
            let (a, s, b) = (f[(i, j)], se[(i, j)], exact[(i, j)]);
            assert!(
                (a - b).abs() <= 4.0 * s + 1e-12,
                "{what}, step {i}, column {j}: {a} ± {s} vs exact {b}"
            );
        }
    }
}

/// The particle engine on the unrolled training of linear muP networks, against the
/// exact linear engine: within 4 standard errors at every step.
#[test]
fn particles_agree_with_the_exact_linear_trajectory() {
    for (src, eval) in [
        (TP4_LINEAR, vec![vec![1.0, 0.0], vec![0.3, -0.8]]),
        (common::MUP_LINEAR, vec![vec![1.0, 0.0], vec![-0.5, 0.2]]),
    ] {
        let prog = compile(src);
        let exact = linear_trajectory(&prog, prog.train.as_ref().unwrap(), &eval).unwrap();
        let (f, se, _) = particle_trajectory(&prog, &eval, &small()).unwrap();
        assert_within_4_se(&f, &se, &exact, "one hidden layer");
        assert!(se.iter().all(|s| *s < 0.02), "{se}");
    }
}

/// The acceptance check in small: sgd_mlp.tp's particle trajectory against dense
/// training at width 1024 (24 seeds), within 4 combined standard errors at every step.
/// (At width 8192 with 32 seeds and 2^20 particles the worst deviation is 1.6 SE.)
#[test]
fn sgd_mlp_particles_match_finite_width() {
    let prog = compile(&common::example("sgd_mlp"));
    let pts = common::train_inputs(&prog);
    let cfg = ParticleConfig {
        particles: 1 << 18,
        ..small()
    };
    let t = limit_with(&prog, &pts, &cfg).unwrap().train.unwrap();
    let (lim, lse) = (t.f_t.unwrap(), t.f_t_se.unwrap());
    let r = run(
        &prog,
        &pts,
        &RunConfig {
            width: 1024,
            seeds: 24,
            seed: 7,
        },
        &|| {},
    )
    .unwrap();
    let ft = r.train.unwrap().f_t;
    let fse = ft.se.unwrap();
    for i in 0..lim.nrows() {
        for j in 0..lim.ncols() {
            let se = (lse[(i, j)].powi(2) + fse[(i, j)].powi(2)).sqrt();
            let dev = (ft.mean[(i, j)] - lim[(i, j)]).abs() / se;
            assert!(
                dev < 4.0,
                "step {i}, point {j}: finite {} vs particles {} ({dev:.2} SE)",
                ft.mean[(i, j)],
                lim[(i, j)]
            );
        }
    }
    assert!(lim[(3, 0)] > 0.2, "it learns: {lim}");
}

#[test]
fn cli_prints_the_trajectory() {
    let dir = std::env::temp_dir().join(format!("tpc_ltrain_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ntk.tp");
    std::fs::write(&file, sgd_mlp_ntk()).unwrap();
    let file = file.to_str().unwrap();
    let out = common::tpc_ok(&["limit", file, "--format", "json"], None);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["regime"], "kernel");
    assert_eq!(v["train"]["method"], KERNEL_METHOD);
    let rows = v["train"]["f_t"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r.as_array().unwrap().len() == 3));

    let out = common::tpc_ok(&["limit", file], None);
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("# training trajectory f_t (mse, lr 0.5, 3 step(s)): kernel regime: NTK recursion, exact"), "{text}");

    let sgd = common::example_path("sgd_mlp");
    let out = common::tpc_ok(
        &["limit", sgd.to_str().unwrap(), "--particles", "65536"],
        None,
    );
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("particle engine: 65536 particles"), "{text}");
    assert!(text.contains(" ± "), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
