//! Momentum and minibatches in the kernel regime (issue 15): `tpc limit`'s NTK
//! recursion runs the heavy ball in function space. Checked against the same dynamics
//! written independently as a direct sum over past gradients, `f_{t+1} = f_t − η Θ
//! Σ_{s≤t} β^{t−s} g_s` with Θ from `limit` (to 1e-12), and against dense training at
//! N = 1024 within 4 standard errors at every step and point.

use nalgebra::{DMatrix, DVector};
use tpc::finite::exec::{run, RunConfig};
use tpc::limit::limit;

/// sgd_mlp.tp in the NTK parameterization with heavy-ball momentum and minibatches of 2.
const PROG: &str = "width n
input x : 2
parameterization ntk
param U : n x 2
param W : n x n
param v : 1 x n
h1 = relu(U @ x)
h2 = relu(W @ h1)
output f = v @ h2
train {
    loss      = mse
    lr        = 0.5
    steps     = 4
    optimizer = momentum(0.8)
    batch     = 2
    data      = [ ([1.0, 0.0], 1.0), ([0.0, 1.0], -1.0), ([0.7, 0.7], 0.5) ]
}
";

#[test]
fn momentum_minibatch_kernel_regime_is_heavy_ball_on_the_ntk() {
    let prog = tpc::compile(PROG).unwrap_or_else(|e| panic!("{e}"));
    let tr = prog.train.clone().unwrap();
    let pts: Vec<Vec<f64>> = tr.data.iter().map(|s| s.x.clone()).collect();
    let r = limit(&prog, &pts).unwrap();
    let lt = r.train.clone().unwrap();
    assert!(
        lt.method
            .starts_with("momentum(0.8), minibatches of 2: kernel regime"),
        "{}",
        lt.method
    );
    let f_t = lt.f_t.expect("computed");
    // Direct sum, from E f_0 = 0.
    let th = r.ntk.unwrap();
    let (beta, eta, d): (f64, f64, usize) = (0.8, tr.lr, pts.len());
    let mut f = DVector::zeros(d);
    let mut grads: Vec<DVector<f64>> = Vec::new();
    let mut want = DMatrix::zeros(tr.steps + 1, d);
    for t in 0..=tr.steps {
        want.set_row(t, &f.transpose());
        if t == tr.steps {
            break;
        }
        let mut g = DVector::zeros(d);
        for j in 0..2 {
            let i = (t * 2 + j) % d;
            g[i] += (f[i] - tr.data[i].y[0]) / 2.0;
        }
        grads.push(g);
        let mut step = DVector::zeros(d);
        for (s, g) in grads.iter().enumerate() {
            step += g * beta.powi((t - s) as i32);
        }
        f -= &th * step * eta;
    }
    let diff = (&f_t - &want).abs().max();
    assert!(diff < 1e-12, "{diff}\n{f_t}\n{want}");
    // Finite width: the mean trajectory within 4 SE of the limit.
    let cfg = RunConfig {
        width: 1024,
        seeds: 24,
        seed: 7,
    };
    let fr = run(&prog, &pts, &cfg, &|| {}).unwrap().train.unwrap().f_t;
    let se = fr.se.unwrap();
    for i in 0..f_t.len() {
        let z = (fr.mean[i] - f_t[i]).abs() / se[i];
        assert!(
            z < 4.0,
            "entry {i}: {} ± {} vs {} ({z:.2} SE)",
            fr.mean[i],
            se[i],
            f_t[i]
        );
    }
}
