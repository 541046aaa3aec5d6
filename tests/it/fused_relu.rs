//! The fused ReLU chain path (src/limit/chain.rs, `relu_chain`: every entry through every
//! layer in 32 x 32 tiles, vectorized `acos` of src/limit/fastmath.rs) against the
//! general block engine, on points chosen to hit its edges: more points than a tile and
//! not a multiple of it (partial tiles), a zero point (zero variance without biases),
//! repeated and collinear points (rho snapped to 1) and antipodal ones (rho = -1).
//! Both compute the same recursion (theory.md §3.1–3.2) with acos implementations that
//! differ by a few ulps, so they agree to round-off: 1e-12 relative to the largest
//! entry, far below the 1e-10 of the Neural Tangents references.

fn points(m: usize, d: usize) -> Vec<Vec<f64>> {
    let mut pts: Vec<Vec<f64>> = (0..m)
        .map(|i| {
            (0..d)
                .map(|k| ((i * 7 + k * 13) as f64 * 0.37).sin() + 0.1 * k as f64)
                .collect()
        })
        .collect();
    pts[3] = vec![0.0; d];
    pts[10] = pts[5].clone();
    pts[11] = pts[5].iter().map(|v| 2.5 * v).collect();
    pts[12] = pts[5].iter().map(|v| -v).collect();
    pts
}

fn check(src: &str, m: usize, d: usize) {
    let prog = tpc::compile(src).unwrap();
    let pts = points(m, d);
    let der = tpc::limit::derivation(&prog).unwrap();
    let fast = tpc::limit::limit(&prog, &pts).unwrap();
    let slow = tpc::limit::limit_general(&prog, &der, pts.clone()).unwrap();
    for (a, b) in [
        (fast.nngp.unwrap(), slow.nngp.unwrap()),
        (fast.ntk.unwrap(), slow.ntk.unwrap()),
    ] {
        assert_eq!(a.shape(), (m, m));
        let scale = b.amax().max(1e-300);
        let err = (&a - &b).amax() / scale;
        assert!(err <= 1e-12, "fused vs general: {err:e}");
        assert_eq!(a, a.transpose(), "fused kernel is not exactly symmetric");
    }
}

#[test]
fn fused_relu_chain_equals_the_general_engine() {
    // No biases: the zero point has zero variance in every layer.
    let plain = "width n\ninput x : 3\nparameterization ntk\n\
        param W1 : n x 3 { std = 1.4142135623730951 }\n\
        param W2 : n x n { std = 1.4142135623730951 }\n\
        param W3 : n x n { std = 1.4142135623730951 }\n\
        param v : 1 x n { std = 1.4142135623730951 }\n\
        x1 = relu(W1 @ x)\nx2 = relu(W2 @ x1)\nx3 = relu(W3 @ x2)\noutput f = v @ x3\n";
    check(plain, 70, 3);
    // Biases and different laws per layer (every combine constant differs).
    let biased = "width n\ninput x : 4\nparameterization ntk\n\
        param W1 : n x 4 { std = 1.5 }\nparam b1 : n { std = 0.1 }\n\
        param W2 : n x n { std = 1.2 }\nparam b2 : n { std = 0.3 }\n\
        param v : 1 x n { std = 0.9 }\nparam bv : 1 { std = 0.2 }\n\
        x1 = relu(W1 @ x + b1)\nx2 = relu(W2 @ x1 + b2)\noutput f = v @ x2 + bv\n";
    check(biased, 45, 4);
}
