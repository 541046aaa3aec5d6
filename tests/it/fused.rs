//! Per-entry fusion of the general engine (src/limit/fused/) against the block engine
//! (`limit_unfused`), entry by entry, on programs that are not layer chains: a ReLU RNN
//! with shared weights and a pooled output, a skip connection, two outputs (their cross
//! blocks are not symmetric), and a mix of relu, step, identity and leaky combinations
//! with biases. Both evaluate the same closed forms (theory.md §3.2) in a different
//! order and with `acos` implementations a few ulps apart, so each entry agrees to
//! round-off: 1e-13 relative to the entry (with the block's largest entry as the scale
//! of entries that cancel to nearly zero, where relative round-off is meaningless).
//! Each program must actually be fused (`limit_fused` is Some), and the methods and the
//! stated error must be the engine's.

fn points(m: usize, d: usize) -> Vec<Vec<f64>> {
    let mut pts: Vec<Vec<f64>> = (0..m)
        .map(|i| {
            (0..d)
                .map(|k| ((i * 7 + k * 13) as f64 * 0.37).sin() + 0.1 * k as f64)
                .collect()
        })
        .collect();
    pts[3] = pts[1].clone();
    pts[4] = pts[2].iter().map(|v| -v).collect();
    pts
}

fn check(name: &str, src: &str, m: usize, d: usize) {
    check_at(name, src, points(m, d));
}

fn check_at(name: &str, src: &str, pts: Vec<Vec<f64>>) {
    let m = pts.len();
    let prog = tpc::compile(src).unwrap();
    let der = tpc::limit::derivation(&prog).unwrap();
    let fused = tpc::limit::fused::limit_fused(&prog, &der, &pts)
        .unwrap_or_else(|| panic!("{name}: not fused"));
    let slow = tpc::limit::limit_unfused(&prog, &der, pts.clone()).unwrap();
    let o = prog.outputs.len();
    for (what, a, b) in [
        ("NNGP", fused.nngp.unwrap(), slow.nngp.unwrap()),
        ("NTK", fused.ntk.unwrap(), slow.ntk.unwrap()),
    ] {
        assert_eq!(a.shape(), (o * m, o * m), "{name} {what}");
        let floor = 1e-3 * b.amax();
        let mut worst = 0.0f64;
        for (x, y) in a.iter().zip(b.iter()) {
            worst = worst.max((x - y).abs() / y.abs().max(floor));
        }
        assert!(
            worst <= 1e-13,
            "{name} {what}: fused vs block engine {worst:e}"
        );
        assert_eq!(a, a.transpose(), "{name} {what}: not exactly symmetric");
    }
    assert_eq!(fused.methods, slow.methods, "{name}: methods");
    // Round-off allowances (64 ulps of the largest variance, weighted through sums of
    // atoms): equal where no sum is split; through sums within a small factor (the
    // engine's bound depends on the order in which it met the variances).
    let ratio = fused.max_error / slow.max_error;
    eprintln!(
        "{name}: stated error fused {:e}, engine {:e}",
        fused.max_error, slow.max_error
    );
    assert!(
        (0.25..=4.0).contains(&ratio),
        "{name}: stated error ratio {ratio}"
    );
    assert_eq!(fused.outputs, slow.outputs);
}

#[test]
fn fused_general_engine_equals_the_block_engine() {
    let rnn = "width n\nconst T = 5\ninput x : 2 [T]\nparameterization ntk\n\
        param U : n x 2\nparam W : n x n { std = 1.3 }\nparam b : n { std = 0.3 }\n\
        param v : 1 x n\nh[0] = 0\nfor t in 1..=T {\n  h[t] = relu(W @ h[t-1] + U @ x[t] + b)\n}\n\
        output f = v @ ((h[1] + h[2] + h[3] + h[4] + h[5]) / 5)\n";
    check("relu RNN, pooled", rnn, 37, 10);
    let skip = "width n\ninput x : 3\nparameterization ntk\n\
        param W1 : n x 3 { std = 1.4 }\nparam W2 : n x n { std = 1.4 }\n\
        param W3 : n x n { std = 1.1 }\nparam v : 1 x n\n\
        x1 = relu(W1 @ x)\nx2 = relu(W2 @ x1) + x1\nx3 = relu(W3 @ x2) + x2\noutput f = v @ x3\n";
    check("skip connections", skip, 45, 3);
    let two = "width n\ninput x : 4\nparameterization ntk\n\
        param W1 : n x 4 { std = 1.4 }\nparam W2 : n x n { std = 1.4 }\n\
        param v : 1 x n\nparam u : 1 x n { std = 0.7 }\nparam c : 1 { std = 0.2 }\n\
        x1 = relu(W1 @ x)\nx2 = relu(W2 @ x1)\noutput f = v @ x2 + c\noutput g = u @ x1 + v @ x2\n";
    check("two outputs", two, 40, 4);
    let mixed = "width n\ninput x : 3\nparameterization ntk\n\
        param U : n x 3 { std = 1.2 }\nparam b1 : n { std = 0.2 }\n\
        param W2 : n x n { std = 1.1 }\nparam W3 : n x n { std = 0.9 }\n\
        param W4 : n x n { std = 1.3 }\nparam b4 : n { std = 0.4 }\nparam v : 1 x n\n\
        x1 = relu(U @ x + b1)\nx2 = step(W2 @ x1)\nx3 = id(W3 @ x2) + 0.5 * x1\n\
        x4 = relu(W4 @ x3 + b4) - 0.2 * relu(0 - W4 @ x3 - b4)\noutput f = v @ (x4 + x2)\n";
    check("mixed relu/step/identity/leaky", mixed, 35, 3);
    // Zero input points and no biases: those points have zero variance at every layer,
    // so their rows and columns take the kernels' zero-variance forms (in the fused
    // relu/step loop too); 70 points give full and partial strips of tile columns.
    let mlp = "width n\ninput x : 3\nparameterization ntk\n\
        param W1 : n x 3 { std = 1.4 }\nparam W2 : n x n { std = 1.4 }\nparam v : 1 x n\n\
        x1 = relu(W1 @ x)\nx2 = relu(W2 @ x1)\noutput f = v @ x2\n";
    let mut pts = points(70, 3);
    pts[5] = vec![0.0; 3];
    pts[40] = vec![0.0; 3];
    check_at("relu MLP with zero inputs", mlp, pts);
}
