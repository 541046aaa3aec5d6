//! `tpc emit`: the finite-width meaning of a program as Python source (issue 17).
//!
//! Why a module of its own: `finite` runs the program inside tpc; a practitioner who
//! wants to train it on GPUs, at sizes one machine cannot hold, needs it in the
//! framework they already use, with every initialization variance, multiplier and
//! per-parameter learning rate of the `.tp` laws built in (language.md, Declarations
//! and Training; theory.md §5.1 for the abc reading of the laws). This module walks the
//! IR once ([`walk`]: which nodes get a line, which are inlined into their one user,
//! the Python name of every value, each right-hand side as text) and hands the result
//! to a target ([`torch`], [`jax`]) that writes the module around it. It never sees
//! syntax: names come from the IR's source names ([`Program::stable_names`] for the
//! naming convention of unnamed values).
//!
//! The meaning is `finite`'s, operation for operation: a parameter is its trainable
//! `w ~ N(0, var(n))` times its multiplier `mult(n)` in the forward pass; `W @ h` is
//! `mult · (h @ W.t())` on a batch of points along the leading axis; a moment is the
//! mean over the width axis (kept as a length-1 axis so it broadcasts); an output is
//! `Σ coef · mult · (h @ v)`; the NTK is `Σ_w lr_mult(w) ⟨∂f/∂w, ∂f/∂w'⟩` over the
//! trainable `w` (language.md, Training), and training steps `w` with the rate
//! `lr · lr_mult(n)` — one optimizer parameter group per parameter.

pub mod jax;
pub mod npz;
pub mod torch;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use crate::ir::{Expr, Fun, Monomial, NodeId, Op, OutTerm, Program, Shape};

/// `tpc emit`'s arguments (the subcommand's flags live here, beside what they drive).
#[derive(clap::Args, Debug)]
pub struct EmitArgs {
    pub file: std::path::PathBuf,
    /// The framework to emit for
    #[arg(long, value_enum)]
    pub target: Target,
    /// The module's default width n (its constructor argument) [default: 64]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub width: Option<u64>,
    /// Write the module to this file instead of stdout
    #[arg(short = 'o', long = "output", value_name = "FILE.py")]
    pub output: Option<std::path::PathBuf>,
}

/// The framework a module is emitted for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Torch,
    Jax,
}

/// What differs between the targets inside an expression: function names, the
/// transpose, the mean over the width axis.
pub trait Dialect {
    /// `f(x)` coordinatewise.
    fn call(&self, f: Fun, x: &str) -> String;
    /// The product `W x` (or `Wᵀ x`) of the parameter read as `w` with the batch `x`,
    /// unparenthesized (it binds as `*`, left to right).
    fn matmul(&self, w: &str, x: &str, transpose: bool) -> String;
    /// The readout `v · h` of a `1 x n` parameter read as `w`.
    fn readout(&self, w: &str, h: &str) -> String;
    /// The mean over the width (last) axis, keeping it.
    fn mean(&self, e: &str) -> String;
    /// How the trainable value of a parameter is read inside the forward pass, given
    /// its Python identifier and its `.tp` name.
    fn param(&self, py: &str, tp: &str) -> String;
    /// How the multiplier of parameter `name` is read inside the forward pass.
    fn mult(&self, name: &str) -> String;
    /// A width-n vector of ones (a coordinatewise value of scalars only).
    fn ones(&self) -> String;
}

/// One line of the forward pass: `target = rhs`, with the IR node it computes.
#[derive(Clone, Debug)]
pub struct Line {
    pub node: NodeId,
    pub target: String,
    pub rhs: String,
    /// The source name (`h[2]`, `a[1, 2]`), for a comment when the Python name differs.
    pub source: Option<String>,
}

/// The shared walk of the IR: every parameter's Python name and every forward line.
pub struct Walk {
    /// Python name of each parameter, by parameter index.
    pub params: Vec<String>,
    /// Python name of each input's argument, by input index.
    pub inputs: Vec<String>,
    pub lines: Vec<Line>,
    /// (source name, Python expression) of every output, in cli.md order.
    pub outputs: Vec<(String, String)>,
    /// (source name, Python expression) of every observe.
    pub observes: Vec<(String, String)>,
}

/// Python keywords and names the emitted code uses itself.
const RESERVED: &[&str] = &[
    "False",
    "None",
    "True",
    "and",
    "as",
    "assert",
    "async",
    "await",
    "break",
    "class",
    "continue",
    "def",
    "del",
    "elif",
    "else",
    "except",
    "finally",
    "for",
    "from",
    "global",
    "if",
    "import",
    "in",
    "is",
    "lambda",
    "nonlocal",
    "not",
    "or",
    "pass",
    "raise",
    "return",
    "try",
    "while",
    "with",
    "yield",
    "self",
    "torch",
    "jax",
    "jnp",
    "np",
    "nn",
    "math",
    "params",
    "mult",
    "lr_mult",
    "n",
    "print",
    "len",
    "range",
    "sum",
    "max",
    "min",
    "abs",
    "float",
    "int",
    "list",
    "dict",
    "type",
    "id",
    "object",
    "super",
    "outputs",
    "observes",
    "forward",
    "train",
    "eval",
    "training",
    "parameters",
    "state_dict",
    "to",
    "double",
    "float64",
    "apply",
    "modules",
    "children",
    "cpu",
    "cuda",
    "zero_grad",
];

/// A Python identifier for a source name: `h[2]` → `h_2`, `a[1, 2]` → `a_1_2`,
/// unique among `taken`.
pub fn py_name(source: &str, taken: &mut HashSet<String>) -> String {
    let mut s = String::new();
    for c in source.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            s.push(c);
        } else if (c == '[' || c == ',' || c == '#') && !s.ends_with('_') {
            s.push('_');
        }
    }
    let s = s.trim_end_matches('_').to_string();
    let mut s = if s.is_empty() { "v".to_string() } else { s };
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    if RESERVED.contains(&s.as_str()) {
        s.push('_');
    }
    let mut name = s.clone();
    let mut k = 2;
    while taken.contains(&name) {
        name = format!("{s}_{k}");
        k += 1;
    }
    taken.insert(name.clone());
    name
}

/// A monomial `c · n^p` as a Python expression in `n`, exactly as [`Monomial::at`]
/// evaluates it (`c * n ** p`, `p` a float).
pub fn py_monomial(m: Monomial) -> String {
    if m.coef == 0.0 || m.exp.is_zero() {
        return py_float(m.coef);
    }
    let p = m.exp;
    let pow = if p.den() == 1 {
        format!("n ** {}", py_float(p.num() as f64))
    } else {
        format!(
            "n ** ({} / {})",
            py_float(p.num() as f64),
            py_float(p.den() as f64)
        )
    };
    if m.coef == 1.0 {
        pow
    } else {
        format!("{} * {pow}", py_float(m.coef))
    }
}

/// A float literal Python reads back to the same f64 (shortest round trip).
pub fn py_float(c: f64) -> String {
    if c.is_nan() {
        "math.nan".to_string()
    } else if c.is_infinite() {
        if c > 0.0 { "math.inf" } else { "-math.inf" }.to_string()
    } else {
        let s = format!("{c:?}");
        if s.contains('.') || s.contains('e') || s.contains("inf") {
            s
        } else {
            format!("{s}.0")
        }
    }
}

/// Precedence of a printed expression, for parentheses.
const ADD: u8 = 1;
const MUL: u8 = 2;
const NEG: u8 = 3;
const POW: u8 = 4;
const ATOM: u8 = 5;

/// An operand in parentheses when its precedence is below `need`.
fn wrap((s, p): (String, u8), need: u8) -> String {
    if p < need {
        format!("({s})")
    } else {
        s
    }
}

/// `a op b` with each side parenthesized below its precedence (`left`, `right`);
/// the result has precedence `prec`.
#[allow(clippy::too_many_arguments)]
fn binary(
    d: &dyn Dialect,
    a: &Expr,
    op: &str,
    b: &Expr,
    args: &[(String, u8)],
    left: u8,
    right: u8,
    prec: u8,
) -> (String, u8) {
    let l = wrap(py_expr(d, a, args), left);
    let r = wrap(py_expr(d, b, args), right);
    (format!("{l} {op} {r}"), prec)
}

/// `e` as Python over operand strings (each with its precedence).
fn py_expr(d: &dyn Dialect, e: &Expr, args: &[(String, u8)]) -> (String, u8) {
    match e {
        Expr::Arg(i) => args[*i].clone(),
        Expr::Const(c) => {
            let s = py_float(*c);
            let p = if *c < 0.0 { NEG } else { ATOM };
            (s, p)
        }
        Expr::Call(f, x) => {
            let (s, _) = py_expr(d, x, args);
            if *f == Fun::Id {
                return py_expr(d, x, args);
            }
            (d.call(*f, &s), ATOM)
        }
        Expr::Neg(x) => (format!("-{}", wrap(py_expr(d, x, args), NEG)), NEG),
        Expr::Add(a, b) => binary(d, a, "+", b, args, ADD, MUL, ADD),
        Expr::Sub(a, b) => binary(d, a, "-", b, args, ADD, MUL, ADD),
        Expr::Mul(a, b) => binary(d, a, "*", b, args, MUL, NEG, MUL),
        Expr::Div(a, b) => binary(d, a, "/", b, args, MUL, NEG, MUL),
        Expr::Powi(a, k) => {
            let base = wrap(py_expr(d, a, args), ATOM);
            if *k < 0 {
                (format!("{base} ** ({k})"), POW)
            } else {
                (format!("{base} ** {k}"), POW)
            }
        }
    }
}

/// Whether the multiplier is exactly 1 at every width (then it is not written).
fn unit(m: Monomial) -> bool {
    m.coef == 1.0 && m.exp.is_zero()
}

/// Walks the IR in node order: one line per named node, per node used more than once,
/// and per observe; every other node is inlined into its one user.
pub fn walk(prog: &Program, d: &dyn Dialect) -> Walk {
    let n = prog.len();
    let mut taken: HashSet<String> = HashSet::new();
    let params: Vec<String> = prog
        .params
        .iter()
        .map(|p| py_name(&p.name, &mut taken))
        .collect();
    let inputs: Vec<String> = prog
        .inputs
        .iter()
        .map(|i| py_name(&i.name, &mut taken))
        .collect();
    let mut uses = vec![0usize; n];
    let mut consumers: Vec<Vec<NodeId>> = vec![Vec::new(); n];
    for id in prog.ids() {
        for a in prog.operands(id) {
            uses[a.index()] += 1;
            consumers[a.index()].push(id);
        }
    }
    // Unnamed values that need a line are named after the first named value computed
    // from them, `h[2]#1`, as `Program::stable_names` abbreviates.
    let mut owner: Vec<Option<NodeId>> = vec![None; n];
    for i in (0..n).rev() {
        if let Some(&c) = consumers[i].iter().min() {
            owner[i] = if prog.node(c).name.is_some() {
                Some(c)
            } else {
                owner[c.index()]
            };
        }
    }
    let mut counts: HashMap<NodeId, usize> = HashMap::new();
    let observes: HashSet<NodeId> = prog.observes.iter().copied().collect();
    let outputs: HashSet<NodeId> = prog.outputs.iter().copied().collect();
    let mut val: Vec<(String, u8)> = vec![(String::new(), ATOM); n];
    let mut lines = Vec::new();
    for id in prog.ids() {
        let node = prog.node(id);
        let ops = prog.operands(id);
        let arg = |k: usize| val[ops[k].index()].clone();
        let (rhs, prec) = match &node.op {
            Op::Input { input, time } => match time {
                None => {
                    val[id.index()] = (inputs[*input].clone(), ATOM);
                    continue;
                }
                Some(t) => (format!("{}[:, {}]", inputs[*input], t - 1), ATOM),
            },
            Op::Param(p) => {
                let prm = &prog.params[*p];
                let w = d.param(&params[*p], &prm.name);
                val[id.index()] = if unit(prm.law.mult) || prm.shape.is_matrix() {
                    (w, ATOM)
                } else {
                    (format!("{} * {w}", d.mult(&prm.name)), MUL)
                };
                continue;
            }
            Op::MatMul { transpose } => {
                let Some(p) = prog.param_of(ops[0]) else {
                    continue;
                };
                let pi = match prog.node(ops[0]).op {
                    Op::Param(pi) => pi,
                    _ => continue,
                };
                let (x, xp) = arg(1);
                let x = if xp < ATOM { format!("({x})") } else { x };
                let prod = d.matmul(&d.param(&params[pi], &p.name), &x, *transpose);
                if unit(p.law.mult) {
                    (prod, MUL)
                } else {
                    (format!("{} * ({prod})", d.mult(&p.name)), MUL)
                }
            }
            Op::Nonlin(e) => {
                let args: Vec<(String, u8)> = (0..ops.len()).map(arg).collect();
                let (s, p) = py_expr(d, e, &args);
                // A coordinatewise value of scalars only is still a width-n vector.
                let vector_operand = ops.iter().any(|a| {
                    matches!(
                        prog.ty(*a),
                        crate::ir::Ty::Vector | crate::ir::Ty::Matrix | crate::ir::Ty::Point(_)
                    )
                });
                if vector_operand {
                    (s, p)
                } else {
                    (
                        format!(
                            "{} * {}",
                            if p < MUL { format!("({s})") } else { s },
                            d.ones()
                        ),
                        MUL,
                    )
                }
            }
            Op::Moment(e) | Op::Scalar(e) => {
                let args: Vec<(String, u8)> = (0..ops.len()).map(arg).collect();
                let (s, p) = py_expr(d, e, &args);
                if matches!(node.op, Op::Moment(_)) {
                    (d.mean(&s), ATOM)
                } else {
                    (s, p)
                }
            }
            // Only the limit's unrolled Adam program holds one (never emitted: `emit`
            // reads front-end programs).
            Op::Outer { .. } => continue,
            Op::Output { terms, constant } => {
                let mut parts: Vec<String> = Vec::new();
                for t in terms {
                    let (coef, p, s) = match t {
                        OutTerm::Readout {
                            coef,
                            readout,
                            vector,
                        } => {
                            let (h, hp) = arg(*vector);
                            let h = if hp < ATOM { format!("({h})") } else { h };
                            let pi = match prog.node(ops[*readout]).op {
                                Op::Param(pi) => pi,
                                _ => continue,
                            };
                            let prod = d.readout(&d.param(&params[pi], &prog.params[pi].name), &h);
                            (*coef, pi, prod)
                        }
                        OutTerm::Scalar { coef, param } => {
                            let pi = match prog.node(ops[*param]).op {
                                Op::Param(pi) => pi,
                                _ => continue,
                            };
                            (*coef, pi, d.param(&params[pi], &prog.params[pi].name))
                        }
                    };
                    let mut term = String::new();
                    if coef != 1.0 {
                        term.push_str(&py_float(coef));
                        term.push_str(" * ");
                    }
                    if !unit(prog.params[p].law.mult) {
                        term.push_str(&d.mult(&prog.params[p].name));
                        term.push_str(" * ");
                    }
                    if term.is_empty() {
                        term.push_str(&s);
                    } else {
                        term.push_str(&format!("({s})"));
                    }
                    parts.push(term);
                }
                if *constant != 0.0 || parts.is_empty() {
                    parts.push(py_float(*constant));
                }
                (parts.join(" + "), ADD)
            }
        };
        let needs_line = node.name.is_some()
            || uses[id.index()] > 1
            || observes.contains(&id)
            || outputs.contains(&id);
        if needs_line {
            let source = match &node.name {
                Some(s) => s.clone(),
                None => match owner[id.index()] {
                    Some(o) => {
                        let k = counts.entry(o).or_insert(0);
                        *k += 1;
                        format!("{}#{k}", prog.node(o).name.clone().unwrap_or_default())
                    }
                    None => "tmp".to_string(),
                },
            };
            let target = py_name(&source, &mut taken);
            lines.push(Line {
                node: id,
                target: target.clone(),
                rhs,
                source: Some(source.clone()),
            });
            val[id.index()] = (target, ATOM);
        } else {
            val[id.index()] = (rhs, prec);
        }
    }
    let by_node = |list: &[NodeId]| -> Vec<(String, String)> {
        list.iter()
            .map(|&o| {
                let name = prog.label(o);
                (name, val[o.index()].0.clone())
            })
            .collect()
    };
    Walk {
        params,
        inputs,
        outputs: by_node(&prog.outputs),
        observes: by_node(&prog.observes),
        lines,
    }
}

/// The header comment of an emitted module: what it was generated from and the laws.
pub fn law_table(prog: &Program, names: &[String]) -> String {
    let mut s = String::new();
    for (p, name) in prog.params.iter().zip(names) {
        let _ = writeln!(
            s,
            "#   {name:<6} {:<6} w ~ N(0, {}), multiplier {}, lr multiplier {}",
            p.shape.to_string(),
            p.law.var,
            p.law.mult,
            p.law.lr
        );
    }
    s
}

/// The stored shape of a parameter in the emitted module and in `--save-params`
/// files, as the `.tp` file declares it: `n x n` → (n, n), `n x d` → (n, d),
/// `1 x n` → (1, n), `n` → (n,), `1` → (1,).
pub fn declared_shape(shape: Shape, n: usize) -> Vec<usize> {
    match shape {
        Shape::Hidden => vec![n, n],
        Shape::Input(d) => vec![n, d],
        Shape::Readout => vec![1, n],
        Shape::Vector => vec![n],
        Shape::Scalar => vec![1],
    }
}

/// Emits `prog` for `target`; `file` names the source in the header, `width` is the
/// default width of the module (`--width`, else 64).
pub fn emit(prog: &Program, target: Target, file: &str, width: Option<usize>) -> String {
    match target {
        Target::Torch => torch::module(prog, file, width.unwrap_or(DEFAULT_WIDTH)),
        Target::Jax => jax::module(prog, file, width.unwrap_or(DEFAULT_WIDTH)),
    }
}

/// The width an emitted module defaults to without `--width`.
pub const DEFAULT_WIDTH: usize = 64;

/// The training data as Python lists: rows (as `--inputs` rows) and targets.
pub fn py_rows(rows: &[Vec<f64>]) -> String {
    let inner: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "[{}]",
                r.iter()
                    .map(|v| py_float(*v))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
        .collect();
    format!("[{}]", inner.join(", "))
}

/// A Python string literal.
pub fn py_str(s: &str) -> String {
    format!("{s:?}")
}

/// Which parameters the outputs depend on (the ones training moves: torch skips a
/// parameter without a gradient, and so does `finite::train`).
pub fn reaches_outputs(prog: &Program) -> Vec<bool> {
    let mut live = vec![false; prog.len()];
    for &o in &prog.outputs {
        live[o.index()] = true;
    }
    for id in prog.ids().collect::<Vec<_>>().into_iter().rev() {
        if live[id.index()] {
            for a in prog.operands(id) {
                live[a.index()] = true;
            }
        }
    }
    prog.params.iter().map(|p| live[p.node.index()]).collect()
}
