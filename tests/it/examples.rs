//! Every contract example is accepted exactly as written; its listing is snapshot-tested.

use crate::common;

use std::process::Command;

use tpc::ir::{Op, Role};

#[test]
fn every_contract_example_checks_clean() {
    for (name, src) in common::examples() {
        let (prog, diags) = tpc::check_source(&src);
        let errors: Vec<_> = diags.iter().filter(|d| d.is_error()).collect();
        assert!(errors.is_empty(), "{name}: {errors:?}");
        let prog = prog.expect("program");
        prog.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn tpc_check_exits_0_on_every_example() {
    for (name, _) in common::examples() {
        let path = common::examples_dir().join(format!("{name}.tp"));
        let out = Command::new(env!("CARGO_BIN_EXE_tpc"))
            .arg("check")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn listings_of_the_examples() {
    for (name, src) in common::examples() {
        let prog = tpc::compile(&src).unwrap();
        insta::assert_snapshot!(
            format!("listing_{name}"),
            tpc::report::graph::listing(&prog)
        );
    }
}

#[test]
fn rnn_shares_one_w_node_across_its_four_uses() {
    let path = common::example_path("rnn");
    let out = Command::new(env!("CARGO_BIN_EXE_tpc"))
        .args(["graph", "--format", "json"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    let w: Vec<&serde_json::Value> = nodes
        .iter()
        .filter(|n| n["op"] == "matrix" && n["name"] == "W")
        .collect();
    assert_eq!(w.len(), 1, "exactly one matrix node named W");
    let wid = w[0]["id"].as_u64().unwrap();
    let uses: Vec<u64> = v["edges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e[0].as_u64() == Some(wid))
        .map(|e| e[1].as_u64().unwrap())
        .collect();
    assert_eq!(uses.len(), 4);
    for u in uses {
        let node = nodes.iter().find(|n| n["id"].as_u64() == Some(u)).unwrap();
        assert_eq!(node["op"], "matmul");
        assert_eq!(node["transpose"], false);
    }
}

#[test]
fn semicircle_uses_w_and_its_transpose() {
    let prog = tpc::compile(&common::example("semicircle")).unwrap();
    let w = prog.params.iter().find(|p| p.name == "W").unwrap().node;
    let users = prog.users(w);
    let t = users
        .iter()
        .filter(|&&u| prog.node(u).op == Op::MatMul { transpose: true })
        .count();
    assert_eq!((users.len(), t), (16, 8));
    assert_eq!(prog.observes.len(), 8);
    assert_eq!(prog.label(prog.observes[7]), "m[8]");
}

#[test]
fn output_order_follows_cli_md() {
    let prog = tpc::compile(&common::example("rnn")).unwrap();
    assert_eq!(prog.output_names(), ["y[1]", "y[2]", "y[3]", "y[4]", "f"]);
}

#[test]
fn presets_print_back_their_exact_laws() {
    // erf_deep: Dense(W_std=1.5, b_std=0.1, parameterization='ntk').
    let prog = tpc::compile(&common::example("erf_deep")).unwrap();
    let w1 = prog.params.iter().find(|p| p.name == "W1").unwrap();
    assert_eq!(w1.role(), Role::Input);
    assert!((w1.law.mult.coef - 1.5 / 3f64.sqrt()).abs() < 1e-15);
    let w2 = prog.params.iter().find(|p| p.name == "W2").unwrap();
    assert_eq!(
        tpc::report::graph::law_text(&w2.law),
        "~ N(0, 1) * 1.5 * n^(-1/2) lr 1"
    );
    // sgd_mlp: muP table.
    let prog = tpc::compile(&common::example("sgd_mlp")).unwrap();
    let v = prog.params.iter().find(|p| p.name == "v").unwrap();
    assert_eq!(
        tpc::report::graph::law_text(&v.law),
        "~ N(0, n^(-2)) lr n^(-1)"
    );
    let t = prog.train.as_ref().unwrap();
    assert_eq!((t.steps, t.data.len(), t.lr), (3, 3, 0.5));
}

#[test]
fn dot_output_is_a_digraph() {
    let prog = tpc::compile(&common::example("mlp3")).unwrap();
    let d = tpc::report::graph::dot(&prog);
    assert!(d.starts_with("digraph") && d.trim_end().ends_with('}'));
    assert_eq!(d.matches("->").count(), prog.graph.edge_count());
}
