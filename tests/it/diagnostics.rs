//! Malformed programs: each must get an error diagnostic (code, span, help) and exit 1,
//! quickly, without a panic. The rendered diagnostics are snapshot-tested: a snapshot is
//! an assertion, so each was read when accepted.

use std::process::Command;
use std::time::{Duration, Instant};

const HEADER: &str = "width n\ninput x : 2\nparam U : n x 2\nparam W : n x n\nparam v : 1 x n\n";

/// (name, source) of each malformed program.
fn cases() -> Vec<(&'static str, Vec<u8>)> {
    let h = |body: &str| format!("{HEADER}{body}").into_bytes();
    let mut nested = b"width n\nparam U : n x 1\ninput x : 1\nh = ".to_vec();
    nested.extend(std::iter::repeat_n(b'(', 200_000));
    nested.extend(b"U @ x");
    nested.extend(std::iter::repeat_n(b')', 200_000));
    let mut matmuls = b"width n\nparam W : n x n\nparam b : n\nh = ".to_vec();
    for _ in 0..100_000 {
        matmuls.extend(b"W @ ");
    }
    matmuls.extend(b"b\n");
    let long_sum = format!(
        "{HEADER}h1 = relu(U @ x)\nh = {}\n",
        vec!["h1"; 50_000].join(" + ")
    )
    .into_bytes();
    // Deterministic pseudo-random bytes (xorshift), not valid UTF-8.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    vec![
        ("syntax_unclosed_paren", h("h1 = relu(U @ x\noutput f = v @ h1\n")),
        ("syntax_missing_equals", h("h1 relu(U @ x)\n")),
        ("syntax_garbage_token", h("h1 = relu(U @ x) $ 2\n")),
        ("undefined_name", h("h1 = relu(Q @ x)\n")),
        ("undefined_name_suggestion", h("hidden = relu(U @ x)\noutput f = v @ hiden\n")),
        ("duplicate_definition", h("h1 = relu(U @ x)\nh1 = tanh(U @ x)\n")),
        ("use_before_definition", h("h2 = relu(W @ h1)\nh1 = relu(U @ x)\n")),
        ("self_reference", h("h = tanh(W @ h)\n")),
        ("self_reference_indexed", h("h[0] = 0\nfor t in 1..=3 { h[t] = tanh(W @ h[t]) }\n")),
        ("shape_hidden_on_input", h("h1 = relu(W @ x)\n")),
        ("shape_input_dim_mismatch", "width n\ninput x : 2\nparam U : n x 3\nh = relu(U @ x)\n".as_bytes().to_vec()),
        ("shape_input_layer_on_vector", h("h1 = relu(U @ x)\nh2 = relu(U @ h1)\n")),
        ("output_not_finite", h("h1 = relu(U @ x)\noutput f = W @ h1\n")),
        ("output_not_readout", h("h1 = relu(U @ x)\noutput f = relu(v @ h1)\n")),
        ("readout_inside_expression", h("h1 = relu(U @ x)\nh2 = v @ h1\n")),
        ("transpose_input_layer", h("h1 = relu(U @ x)\nh2 = U.T @ h1\n")),
        ("transpose_readout", h("h1 = relu(U @ x)\nh2 = v.T @ h1\n")),
        ("bad_exponent_zero_denominator", "width n\nparam W : n x n ~ N(0, n^(1/0))\n".as_bytes().to_vec()),
        ("bad_exponent_irrational", "width n\nparam W : n x n ~ N(0, n^0.1234567)\n".as_bytes().to_vec()),
        ("bad_exponent_preset", "width n\nparam W : n x n { std = n^(1/2) }\n".as_bytes().to_vec()),
        ("negative_variance", "width n\nparam W : n x n ~ N(0, -1/n)\n".as_bytes().to_vec()),
        ("nonzero_mean", "width n\nparam b : n ~ N(1, 1)\n".as_bytes().to_vec()),
        ("unknown_distribution", "width n\nparam b : n ~ U(0, 1)\n".as_bytes().to_vec()),
        ("unknown_function", h("h1 = tahn(U @ x)\n")),
        ("unknown_function_no_suggestion", h("h1 = softplus(U @ x)\n")),
        // Netsor+ scalars (README "Scalars and reductions").
        ("scalar_where_vector_required", h("h1 = relu(U @ x)\nh2 = mean(h1)\nh3 = W @ h2\n")),
        ("scalar_read_out", h("h1 = relu(U @ x)\nm = mean(h1 * h1)\noutput f = v @ m\n")),
        ("moment_of_a_scalar", h("h1 = relu(U @ x)\nm = mean(h1)\ns = mean(m * 2)\n")),
        ("vector_where_scalar_required", h("h1 = relu(U @ x)\nh2 = h1 * sqrt(h1)\n")),
        ("fractional_power_of_a_vector", h("h1 = relu(U @ x)\nh2 = h1^(1/2)\n")),
        ("reduction_over_empty_range", h("h1 = U @ x\nh = sum(s in 1..=0, h1)\n")),
        ("scalar_index_out_of_range", h("h1 = U @ x\nfor t in 1..=3 {\n    a[t] = mean(h1 * h1) * t\n}\nh2 = h1 * a[4]\n")),
        ("unknown_reduction", h("h1 = U @ x\nh = prod(s in 1..=2, h1)\n")),
        ("softmax_position_unbound", h("h1 = U @ x\nw = softmax(s in 1..=2, mean(h1 * h1))\n")),
        ("softmax_position_out_of_range", h("h1 = U @ x\nfor s in 1..=3 {\n    g[s] = h1 * softmax(s in 1..=2, mean(h1 * h1))\n}\n")),
        ("softmax_of_vectors", h("h1 = U @ x\nfor s in 1..=2 {\n    g[s] = softmax(s in 1..=2, h1)\n}\n")),
        ("observe_not_mean", h("h1 = relu(U @ x)\nobserve m = h1 * 2\n")),
        ("loop_bound_undefined", h("h[0] = 0\nfor t in 1..=T { h[t] = tanh(W @ h[t-1]) }\n")),
        ("loop_bound_not_integer", h("h[0] = 0\nfor t in 1..=2.5 { h[t] = tanh(W @ h[t-1]) }\n")),
        ("index_out_of_range", "width n\nconst T = 4\ninput x : 1 [T]\nparam U : n x 1\nh = U @ x[5]\n".as_bytes().to_vec()),
        ("index_zero_sequence", "width n\ninput x : 1 [3]\nparam U : n x 1\nh = U @ x[0]\n".as_bytes().to_vec()),
        ("huge_loop", h("h[0] = 0\nfor t in 1..=4000000000 { h[t] = tanh(W @ h[t-1]) }\n")),
        ("nested_loops_past_limit", h("h[0, 0] = 0\nfor i in 1..=1000 { for j in 1..=1000 { h[i, j] = tanh(W @ h[0, 0]) } }\n")),
        ("train_data_wrong_dimension", h("h1 = relu(U @ x)\noutput f = v @ h1\ntrain { loss = mse lr = 0.1 steps = 1 data = [ ([1.0, 2.0, 3.0], 1.0) ] }\n")),
        ("train_targets_wrong_count", h("h1 = relu(U @ x)\noutput f = v @ h1\ntrain { loss = mse lr = 0.1 steps = 1 data = [ ([1.0, 2.0], [1.0, 2.0]) ] }\n")),
        ("train_unknown_key", h("h1 = relu(U @ x)\noutput f = v @ h1\ntrain { loss = mse lr = 0.1 stpes = 1 data = [ ([1.0, 2.0], 1.0) ] }\n")),
        ("train_bad_loss", h("h1 = relu(U @ x)\noutput f = v @ h1\ntrain { loss = hinge lr = 0.1 steps = 1 data = [ ([1.0, 2.0], 1.0) ] }\n")),
        ("optimizer_unknown", h("h1 = relu(U @ x)\noutput f = v @ h1\ntrain { loss = mse lr = 0.1 steps = 1 optimizer = adma(0.9, 0.999, 1e-8) data = [ ([1.0, 2.0], 1.0), ([2.0, 1.0], 0.0) ] }\n")),
        ("optimizer_wrong_arity", h("h1 = relu(U @ x)\noutput f = v @ h1\ntrain { loss = mse lr = 0.1 steps = 1 optimizer = adam(0.9, 0.999) data = [ ([1.0, 2.0], 1.0), ([2.0, 1.0], 0.0) ] }\n")),
        ("optimizer_bare_momentum", h("h1 = relu(U @ x)\noutput f = v @ h1\ntrain { loss = mse lr = 0.1 steps = 1 optimizer = momentum data = [ ([1.0, 2.0], 1.0), ([2.0, 1.0], 0.0) ] }\n")),
        ("optimizer_beta_out_of_range", h("h1 = relu(U @ x)\noutput f = v @ h1\ntrain { loss = mse lr = 0.1 steps = 1 optimizer = momentum(1.0) data = [ ([1.0, 2.0], 1.0), ([2.0, 1.0], 0.0) ] }\n")),
        ("optimizer_eps_not_positive", h("h1 = relu(U @ x)\noutput f = v @ h1\ntrain { loss = mse lr = 0.1 steps = 1 optimizer = adam(0.9, 0.999, 0) data = [ ([1.0, 2.0], 1.0), ([2.0, 1.0], 0.0) ] }\n")),
        ("optimizer_eps_not_a_monomial", h("h1 = relu(U @ x)\noutput f = v @ h1\ntrain { loss = mse lr = 0.1 steps = 1 optimizer = adam(0.9, 0.999, 1e-8 + n) data = [ ([1.0, 2.0], 1.0), ([2.0, 1.0], 0.0) ] }\n")),
        ("optimizer_weight_decay_with_adamw", h("h1 = relu(U @ x)\noutput f = v @ h1\ntrain { loss = mse lr = 0.1 steps = 1 optimizer = adamw(0.9, 0.999, 1e-8, 0.01) weight_decay = 0.1 data = [ ([1.0, 2.0], 1.0), ([2.0, 1.0], 0.0) ] }\n")),
        ("train_batch_zero", h("h1 = relu(U @ x)\noutput f = v @ h1\ntrain { loss = mse lr = 0.1 steps = 1 batch = 0 data = [ ([1.0, 2.0], 1.0), ([2.0, 1.0], 0.0) ] }\n")),
        ("train_batch_larger_than_data", h("h1 = relu(U @ x)\noutput f = v @ h1\ntrain { loss = mse lr = 0.1 steps = 1 batch = 3 data = [ ([1.0, 2.0], 1.0), ([2.0, 1.0], 0.0) ] }\n")),
        ("two_widths", "width n\nwidth m\nparam b : n\n".as_bytes().to_vec()),
        ("missing_width", "input x : 2\nparam b : n\n".as_bytes().to_vec()),
        ("unknown_parameterization", "width n\nparameterization mpu\nparam W : n x n\n".as_bytes().to_vec()),
        ("preset_unknown_key", "width n\nparam W : n x n { sdt = 1.5 }\n".as_bytes().to_vec()),
        ("invalid_shape_rows", "width n\nparam R : 3 x n\n".as_bytes().to_vec()),
        ("invalid_shape_three_dims", "width n\nparam T : n x n x n\n".as_bytes().to_vec()),
        ("index_arity_mismatch", h("h[1] = relu(U @ x)\nh = relu(U @ x)\n")),
        ("sequence_without_index", "width n\ninput x : 1 [3]\nparam U : n x 1\nh = U @ x\n".as_bytes().to_vec()),
        ("loop_variable_shadows", h("for U in 1..=2 { }\n")),
        ("input_used_as_vector", h("h1 = relu(x)\n")),
        ("output_used_in_expression", h("h1 = relu(U @ x)\noutput f = v @ h1\nh2 = h1 * f\n")),
        ("matrix_used_as_vector", h("h1 = relu(W)\n")),
        ("division_by_zero", h("h1 = relu(U @ x) / 0\n")),
        ("integer_overflow", "width n\nconst K = 9223372036854775807 * 2\n".as_bytes().to_vec()),
        ("number_out_of_range", h("h1 = relu(U @ x) * 1e999\n")),
        ("invalid_utf8", b"width n\nparam b : n\nh = b * \xff\xfe\n".to_vec()),
        ("random_bytes", random),
        ("nesting_200000_parens", nested),
        ("matmul_chain_100000", matmuls),
        ("sum_of_50000_terms", long_sum),
        ("empty_file", Vec::new()),
    ]
}

#[test]
fn every_malformed_program_gets_a_coded_error_with_help() {
    for (name, src) in cases() {
        let (_, prog, diags) = tpc::check_bytes(&src);
        assert!(
            prog.is_none() || diags.iter().any(|d| d.is_error()) || name == "empty_file",
            "{name}: accepted"
        );
        if name == "empty_file" {
            continue;
        }
        let errors: Vec<_> = diags.iter().filter(|d| d.is_error()).collect();
        assert!(!errors.is_empty(), "{name}: no error diagnostic");
        for d in errors {
            assert!(
                d.code.starts_with('E') && d.code.len() == 5,
                "{name}: code {}",
                d.code
            );
            assert!(d.help.is_some(), "{name}: {} has no help line", d.code);
            assert!(
                d.span.start <= d.span.end && d.span.end <= src.len().max(1) + 3,
                "{name}: span {:?}",
                d.span
            );
        }
    }
}

#[test]
fn diagnostics_snapshots() {
    for (name, src) in cases() {
        if src.len() > 10_000 {
            // Huge inputs: snapshot only the codes and messages, not the rendered source.
            let (_, _, diags) = tpc::check_bytes(&src);
            let summary: Vec<String> = diags
                .iter()
                .map(|d| {
                    format!(
                        "{}: {} [{}..{}]",
                        d.code, d.message, d.span.start, d.span.end
                    )
                })
                .collect();
            insta::assert_snapshot!(name, summary.join("\n"));
            continue;
        }
        let (text, _, diags) = tpc::check_bytes(&src);
        let rendered = tpc::error_for("case.tp", &text, diags).render();
        insta::assert_snapshot!(name, rendered);
    }
}

#[test]
fn the_binary_exits_1_promptly_on_each() {
    let dir = std::env::temp_dir().join(format!("tpc-diag-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, src) in cases() {
        if name == "empty_file" {
            continue;
        }
        let path = dir.join(format!("{name}.tp"));
        std::fs::write(&path, &src).unwrap();
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_tpc"))
            .arg("check")
            .arg(&path)
            .output()
            .unwrap();
        let took = t.elapsed();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name}: exit {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("error[E0"), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        // A guard against hangs and super-linear blow-ups in the front end (each case
        // takes ≈ 0.3 s alone at most), not a benchmark: CI runs tests in parallel on
        // two cores, so the bound leaves room for the load.
        assert!(took < Duration::from_secs(10), "{name}: took {took:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn empty_file_is_missing_width() {
    let (_, prog, diags) = tpc::check_bytes(b"");
    assert!(prog.is_none());
    assert_eq!(diags[0].code, "E0018");
}
