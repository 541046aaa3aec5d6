//! Issue 12, item 3: programs with W and Wᵀ derive in time polynomial in their length.
//!
//! `semicircle.tp` with its loop to k = 60: the moments `m[k] = E[Z^x0 Z^xk]` of
//! `A = W + Wᵀ` are the Catalan numbers `C_{k/2}` for even k and 0 for odd k
//! (theory.md §2.1, Ẑ + Ż). Before the fix, each level doubled the work (k = 16 took
//! over two minutes), so these tests finishing at all is the polynomial-time check; the
//! sizes below (Gaussians, derivation text) are checked to grow like k and k².

use crate::common;

/// `semicircle.tp` with its loop to `k`.
fn semicircle(k: usize) -> String {
    let src = common::example("semicircle");
    assert!(src.contains("1..=8"), "the example's loop bound moved");
    src.replace("1..=8", &format!("1..={k}"))
}

/// C_0 ..= C_n, exactly (integers; C_30 < 2^53, so exact in f64 too).
fn catalan(n: usize) -> Vec<u128> {
    let mut c = vec![1u128];
    for i in 0..n as u128 {
        let next = c[i as usize] * 2 * (2 * i + 1) / (i + 2);
        c.push(next);
    }
    c
}

/// Checks m[1..=k] against the Catalan numbers: even k to 1e-12 relative; odd k to
/// 1e-12 of the scale `sqrt(E[(Z^x0)²] E[(Z^xk)²]) = sqrt(C_k)` (Cauchy–Schwarz bound of
/// the moment, as E[(Z^xk)²] = m[2k] = C_k).
fn check_catalan(what: &str, m: &[(String, f64)], k: usize) {
    let c = catalan(k);
    assert_eq!(m.len(), k, "{what}: one moment per level");
    for (j, (name, v)) in m.iter().enumerate() {
        let j = j + 1;
        assert_eq!(name, &format!("m[{j}]"), "{what}");
        if j % 2 == 0 {
            let want = c[j / 2] as f64;
            let rel = (v - want).abs() / want;
            assert!(
                rel <= 1e-12,
                "{what}: {name} = {v}, want {want} (relative {rel:e})"
            );
        } else {
            let scale = (c[j] as f64).sqrt();
            assert!(
                v.abs() <= 1e-12 * scale,
                "{what}: {name} = {v}, want 0 (scale {scale:e})"
            );
        }
    }
}

#[test]
fn catalan_numbers_to_k_60_through_the_library() {
    let prog = tpc::compile(&semicircle(60)).unwrap();
    let r = tpc::limit::limit(&prog, &[]).unwrap();
    let m: Vec<(String, f64)> = r.observe.iter().map(|(n, v)| (n.clone(), v[0])).collect();
    check_catalan("limit", &m, 60);
}

#[test]
fn catalan_numbers_to_k_60_through_the_exact_linear_engine() {
    let prog = tpc::compile(&semicircle(60)).unwrap();
    let s = tpc::limit::linear::scalars(&prog, &[]).unwrap();
    let m: Vec<(String, f64)> = prog
        .observes
        .iter()
        .map(|&o| (prog.label(o), s[o.index()].unwrap()))
        .collect();
    check_catalan("linear", &m, 60);
}

#[test]
fn catalan_numbers_to_k_60_through_the_cli() {
    let dir = std::env::temp_dir().join(format!("tpc-semicircle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("semicircle60.tp");
    std::fs::write(&file, semicircle(60)).unwrap();
    let path = file.to_str().unwrap();
    let out = common::tpc_ok(&["limit", path, "--format", "json"], None);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let obs = v["observe"].as_object().expect("an observe object");
    let m: Vec<(String, f64)> = (1..=60)
        .map(|j| {
            let name = format!("m[{j}]");
            let x = &obs[&name];
            let x = x.as_f64().or_else(|| x[0].as_f64()).expect("a number");
            (name, x)
        })
        .collect();
    check_catalan("cli", &m, 60);
    // The text report prints the derivation by reference to earlier Z's: it grows like
    // k² (each Ż term names one earlier vector), not like 2^k.
    let text = String::from_utf8(common::tpc_ok(&["limit", path], None)).unwrap();
    assert!(text.contains("m[60] = 3814986502092304"), "{text}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The derivation's size: one Gaussian per product plus `v` (linear in k), and text that
/// grows at most quadratically from k = 30 to k = 60 (ratio ≤ 4 plus the constant part).
#[test]
fn the_derivation_grows_polynomially() {
    let text = |k: usize| {
        let prog = tpc::compile(&semicircle(k)).unwrap();
        let der = tpc::limit::derivation(&prog).unwrap();
        assert_eq!(
            der.gauss.len(),
            2 * k + 1,
            "k = {k}: Ẑ per product, plus Z^v"
        );
        let z = der.z.iter().flatten().map(|z| z.lin.0.len()).max().unwrap();
        assert!(z <= 2 * k + 1, "k = {k}: a Z over {z} Gaussians");
        (
            tpc::limit::derivation_text(&prog, &der).len(),
            tpc::limit::particle::derivation_text(&prog).len(),
        )
    };
    let (a30, b30) = text(30);
    let (a60, b60) = text(60);
    assert!(
        a60 <= 4 * a30 + 4096,
        "limit derivation: {a30} -> {a60} bytes"
    );
    assert!(
        b60 <= 4 * b30 + 4096,
        "particle derivation: {b30} -> {b60} bytes"
    );
}

/// Moments of polynomials of degree ≤ 2 in several Gaussian forms are closed forms
/// `f(0) + ½ Σ ∂_i∂_j f Cov(L_i, L_j)`: here `E[(v + x)(v − x)] + 3 = Var v − Var x + 3`
/// with `Var x = σ_W² Var v = 0.5`, exact rather than a quadrature's 1e-11.
#[test]
fn quadratic_moments_of_several_forms_are_exact() {
    let src = "width n\nparam W : n x n ~ N(0, 1/(2*n))\nparam v : n ~ N(0, 1)\n\
               x = W @ v\nobserve m = mean((v + x) * (v - x) + 3)\n";
    let prog = tpc::compile(src).unwrap();
    let r = tpc::limit::limit(&prog, &[]).unwrap();
    assert_eq!(r.observe[0].1, vec![3.5]);
    assert_eq!(r.methods, vec!["closed form (linear)".to_string()]);
}
