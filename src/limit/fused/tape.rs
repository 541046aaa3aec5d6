//! The register tape of [`super`]: the DAG of [`super::build`] compiled, for the nodes
//! the outputs need, to operations on registers (one-term sums folded into their
//! readers, kernels on one covariance sharing one `acos`, registers reused after their
//! last read). Separate from the builder (which follows the engine's mathematics) and
//! from the evaluator (which follows the machine).

use std::collections::HashMap;

use super::build::Node;
use crate::ir::NodeId;

/// One operation on registers of a strip (up to [`TILE`] rows of one column).
#[derive(Clone, Debug)]
pub(super) enum TOp {
    Const {
        dst: usize,
        c: f64,
    },
    Gram {
        dst: usize,
        a: usize,
        b: usize,
    },
    Lin {
        dst: usize,
        k: f64,
        terms: Vec<(f64, usize)>,
    },
    /// `c a b`.
    Mul {
        dst: usize,
        c: f64,
        a: usize,
        b: usize,
    },
    /// Several kernels on one covariance `cc * cross`.
    Kern {
        cc: f64,
        cross: usize,
        du: usize,
        dv: usize,
        outs: Vec<KOut>,
        acos: bool,
        /// The outputs are exactly `k_r E[relu relu]` and `k_s E[step step]` (a ReLU
        /// layer and its tangent factor): `[(register, k_r), (register, k_s)]`, computed
        /// in the `acos` loop itself.
        relu_step: Option<[(usize, f64); 2]>,
    },
    /// A per-point array read at the row point or the column point.
    Point {
        dst: usize,
        arr: usize,
        col: bool,
    },
}

/// One kernel of a [`TOp::Kern`]: its register, its atoms' coefficients, and the
/// nonzero products `tf_i tg_j` as `(i, j, tf_i tg_j)` (in the order `kern_scalar` sums).
#[derive(Clone, Debug)]
pub(super) struct KOut {
    pub(super) dst: usize,
    pub(super) tf: [f64; 4],
    pub(super) tg: [f64; 4],
    pub(super) terms: Vec<(usize, usize, f64)>,
}

/// The compiled program: operations, register count, output registers per ordered
/// output pair `(a, b)` at index `a * o + b`.
pub(super) struct Tape {
    pub(super) ops: Vec<TOp>,
    pub(super) nreg: usize,
    pub(super) nngp: Vec<usize>,
    pub(super) ntk: Vec<Option<usize>>,
}

/// Off-diagonal operations in node order for the nodes the outputs need; registers
/// reused after their last read. `diag_slot` maps a node whose diagonal a kernel reads
/// to its slot among the diagonal arrays; `mean_slot` maps a Mean node to its array.
pub(super) fn compile(
    nodes: &[Node],
    outs: &[usize],
    diag_slot: &HashMap<usize, usize>,
    mean_slot: &HashMap<usize, usize>,
    inputs: &HashMap<NodeId, usize>,
    ntk_outs: &[Option<usize>],
) -> Tape {
    let n = nodes.len();
    let mut need = vec![false; n];
    let mut keep = vec![false; n];
    for &o in outs.iter().chain(ntk_outs.iter().flatten()) {
        need[o] = true;
        keep[o] = true;
    }
    // A product or kernel reading `c x` (a one-term sum) reads x and scales: the sum is
    // not a pass of its own.
    let mut alias: Vec<(f64, usize)> = (0..n).map(|i| (1.0, i)).collect();
    for i in 0..n {
        if let Node::Lin(ts, k) = &nodes[i] {
            if *k == 0.0 && ts.len() == 1 && !keep[i] {
                let (c, s) = ts[0];
                let (c2, s2) = alias[s];
                alias[i] = (c * c2, s2);
            }
        }
    }
    let alias = &alias;
    let reads = |nd: &Node| -> Vec<usize> {
        match nd {
            Node::Lin(ts, _) => ts.iter().map(|t| alias[t.1].1).collect(),
            Node::Mul(a, b) => vec![alias[*a].1, alias[*b].1],
            Node::Kern { cross, .. } => vec![alias[*cross].1],
            _ => Vec::new(),
        }
    };
    for i in (0..n).rev() {
        if need[i] {
            for r in reads(&nodes[i]) {
                need[r] = true;
            }
        }
    }
    debug_assert!((0..n).all(|i| !need[i] || alias[i].1 == i));
    // Group kernels by (du, dv, cross): one acos for relu·relu and step·step.
    let mut kgroup: HashMap<(usize, usize, usize), Vec<usize>> = HashMap::new();
    for (i, nd) in nodes.iter().enumerate() {
        if let (true, Node::Kern { du, dv, cross, .. }) = (need[i], nd) {
            kgroup.entry((*du, *dv, *cross)).or_default().push(i);
        }
    }
    // Last read of every node (in emission order = node order; a kernel group is
    // emitted at its first member).
    let mut emit_at: Vec<usize> = (0..n).collect();
    for g in kgroup.values() {
        for &m in g {
            emit_at[m] = g[0];
        }
    }
    let mut last = vec![0usize; n];
    for i in 0..n {
        if need[i] {
            for r in reads(&nodes[i]) {
                last[r] = last[r].max(emit_at[i]);
            }
        }
    }
    let mut reg = vec![usize::MAX; n];
    let mut free: Vec<usize> = Vec::new();
    let mut nreg = 0usize;
    let mut alloc = |free: &mut Vec<usize>| {
        free.pop().unwrap_or_else(|| {
            nreg += 1;
            nreg - 1
        })
    };
    let mut ops = Vec::new();
    // Registers whose last read is at emission step i, freed after the op.
    for i in 0..n {
        if !need[i] || emit_at[i] != i {
            continue;
        }
        let op = match &nodes[i] {
            Node::Const(c) => {
                let d = alloc(&mut free);
                reg[i] = d;
                TOp::Const { dst: d, c: *c }
            }
            Node::Gram(a, b) => {
                let d = alloc(&mut free);
                reg[i] = d;
                TOp::Gram {
                    dst: d,
                    a: inputs[a],
                    b: inputs[b],
                }
            }
            Node::Lin(ts, k) => {
                let d = alloc(&mut free);
                reg[i] = d;
                TOp::Lin {
                    dst: d,
                    k: *k,
                    terms: ts
                        .iter()
                        .map(|&(c, s)| (c * alias[s].0, reg[alias[s].1]))
                        .collect(),
                }
            }
            Node::Mul(a, b) => {
                let d = alloc(&mut free);
                reg[i] = d;
                let ((ca, a), (cb, b)) = (alias[*a], alias[*b]);
                TOp::Mul {
                    dst: d,
                    c: ca * cb,
                    a: reg[a],
                    b: reg[b],
                }
            }
            Node::Mean { col, .. } => {
                let d = alloc(&mut free);
                reg[i] = d;
                TOp::Point {
                    dst: d,
                    arr: mean_slot[&i],
                    col: *col,
                }
            }
            Node::Kern { du, dv, cross, .. } => {
                let members = &kgroup[&(*du, *dv, *cross)];
                let mut outs_k = Vec::new();
                let mut acos = false;
                for &m in members {
                    let Node::Kern { tf, tg, .. } = nodes[m] else {
                        continue;
                    };
                    let d = alloc(&mut free);
                    reg[m] = d;
                    acos |= (tf[2] != 0.0 || tf[3] != 0.0) && (tg[2] != 0.0 || tg[3] != 0.0);
                    let terms = (0..4)
                        .flat_map(|i| (0..4).map(move |j| (i, j, tf[i] * tg[j])))
                        .filter(|t| t.2 != 0.0)
                        .collect();
                    outs_k.push(KOut {
                        dst: d,
                        tf,
                        tg,
                        terms,
                    });
                }
                let one = |o: &KOut, t: (usize, usize)| match o.terms.as_slice() {
                    &[(i, j, k)] if (i, j) == t => Some((o.dst, k)),
                    _ => None,
                };
                let relu_step = match outs_k.as_slice() {
                    [x, y] if acos => match (one(x, (3, 3)), one(y, (2, 2))) {
                        (Some(r), Some(s)) => Some([r, s]),
                        _ => one(y, (3, 3)).zip(one(x, (2, 2))).map(|(r, s)| [r, s]),
                    },
                    _ => None,
                };
                TOp::Kern {
                    relu_step,
                    cc: alias[*cross].0,
                    cross: reg[alias[*cross].1],
                    du: diag_slot[du],
                    dv: diag_slot[dv],
                    outs: outs_k,
                    acos,
                }
            }
        };
        ops.push(op);
        // free the operands read for the last time here
        let mut rd = reads(&nodes[i]);
        if let Some(g) = match &nodes[i] {
            Node::Kern { du, dv, cross, .. } => kgroup.get(&(*du, *dv, *cross)),
            _ => None,
        } {
            for &m in g {
                rd.extend(reads(&nodes[m]));
            }
        }
        rd.sort_unstable();
        rd.dedup();
        for r in rd {
            if last[r] == i && !keep[r] {
                free.push(reg[r]);
            }
        }
    }
    Tape {
        ops,
        nreg,
        nngp: outs.iter().map(|&o| reg[o]).collect(),
        ntk: ntk_outs.iter().map(|o| o.map(|o| reg[o])).collect(),
    }
}
