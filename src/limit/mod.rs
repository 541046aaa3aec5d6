//! The infinite-width limit of a tensor program: the Master Theorem.
//!
//! * [`zform`]: the Z derivation (theory.md §1.2, §2.1): every vector's `Z^x` as a
//!   function of base Gaussians, Ż included for programs linear in the Gaussians;
//! * [`engine`]: the numbers over all points at once: P x P covariance blocks, NNGP, and
//!   the NTK by tangent kernels under gradient independence (theory.md §2.2–2.3);
//! * [`dual`]: closed-form kernels ("dual activations", theory.md §3.2) recognized from
//!   the IR's expressions, with Gauss–Hermite fallback, on whole covariance blocks;
//! * [`gauss`]: Gauss–Hermite rules and 1-, 2- and k-dimensional expectations with
//!   degree selection for a stated accuracy (theory.md §3.3), and [`gauss::Estimate`];
//! * [`qmc`]: randomized quasi-Monte Carlo for expectations of rank above 3;
//! * [`linear`]: exact Ẑ/Ż linear algebra for one-point programs linear in their
//!   Gaussians (deep linear networks' unrolled training, random-matrix moments);
//! * [`particle`]: Monte Carlo over the Z's (particles) for one-point programs with
//!   transposes, Ż by Stein's lemma (nonlinear networks' unrolled training);
//! * [`train`]: limit trajectories of `train` blocks.
//!
//! This module knows the IR, never the syntax.

pub mod backprop;
pub mod chain;
pub mod dual;
pub mod engine;
pub mod fastmath;
pub mod fused;
pub mod gauss;
pub mod linear;
pub mod nested;
pub mod netsor;
pub mod observe_particles;
pub mod outer;
pub mod particle;
pub mod qmc;
pub mod random_logits;
pub mod smooth;
pub mod train;
pub mod zform;

use rayon::prelude::*;
use std::collections::HashMap;

use nalgebra::DMatrix;

use crate::ir::{Monomial, NodeId, Op, OutTerm, Program, Rational, Shape, Span};
use engine::{Engine, Scaled};
use zform::{Derivation, GaussKind};

/// The limit quantities of a program on a set of points (cli.md's `limit` JSON).
#[derive(Clone, Debug)]
pub struct LimitResult {
    pub outputs: Vec<String>,
    pub points: Vec<Vec<f64>>,
    /// O*P x O*P, output-major; None with a note when the limit is not finite.
    pub nngp: Option<DMatrix<f64>>,
    pub nngp_note: Option<String>,
    pub ntk: Option<DMatrix<f64>>,
    pub ntk_note: Option<String>,
    /// Each observe: one value per point (one value when it does not depend on the point).
    pub observe: Vec<(String, Vec<f64>)>,
    /// How the numbers were computed.
    pub methods: Vec<String>,
    /// Largest stated absolute error of any expectation used.
    pub max_error: f64,
    /// Largest error of a randomized QMC estimate, 3 standard errors: a statistical
    /// estimate, not a bound (also included in `max_error`); None when no QMC was used.
    pub qmc_3sigma: Option<f64>,
    /// With `train`: TP4's regime from the scaling exponents (`crate::scaling`):
    /// "kernel", "feature-learning", "unstable" or "trivial".
    pub regime: Option<String>,
    /// With `train`: the limit trajectory f_t on the points ([`train`]).
    pub train: Option<train::LimitTrain>,
}

/// Why the limit could not be computed, and where: every refusal names the node (and
/// so the source span) responsible when there is one, with a diagnostic code.
#[derive(Clone, Debug)]
pub struct LimitError {
    pub node: Option<NodeId>,
    /// The source span: the node's, or an input declaration's for a bad point.
    pub span: Option<Span>,
    /// The diagnostic code (diag.rs `CODES`): E0030 a program the engines do not cover,
    /// E0031 an expectation that does not exist, E0032 a number that is not finite,
    /// E0033 a bad input point, E0034 a law constant that overflows f64.
    pub code: &'static str,
    pub message: String,
    /// Further explanation (the reason an expectation does not exist).
    pub note: Option<String>,
}

impl std::fmt::Display for LimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl LimitError {
    /// A refusal that no one node is responsible for (memory, the machine).
    pub fn general(code: &'static str, message: impl Into<String>) -> LimitError {
        LimitError {
            node: None,
            span: None,
            code,
            message: message.into(),
            note: None,
        }
    }

    /// A refusal at a node of the program (its span is the node's).
    pub fn at(
        prog: &Program,
        node: NodeId,
        code: &'static str,
        message: impl Into<String>,
    ) -> LimitError {
        LimitError {
            node: Some(node),
            span: Some(prog.node(node).span),
            ..LimitError::general(code, message)
        }
    }

    /// The diagnostic, when the error has a place in the source.
    pub fn diagnostic(&self) -> Option<crate::diag::Diagnostic> {
        let span = self.span?;
        let (label, help) = match self.code {
            "E0031" => (
                "the limit takes an expectation of this",
                "keep denominators away from 0 (e.g. `1 / (1 + h * h)`) and growth at most exp(c|h|); \
                 `tpc run` still computes finite-width values, but their mean over seeds has no limit",
            ),
            "E0032" => (
                "this value",
                "the limit of this value overflows f64 or is undefined here: smaller variances or \
                 learning rates, other points or bounded functions keep it finite",
            ),
            "E0034" => (
                "this law",
                "a smaller constant in the law keeps the variance within f64 (about 1.8e308)",
            ),
            "E0033" => (
                "this input",
                "every coordinate of every point must be a finite number",
            ),
            _ => (
                "here",
                "see docs/theory.md for what the Master Theorem covers; `tpc run` still works at finite width",
            ),
        };
        let mut d = crate::diag::Diagnostic::error(
            self.code,
            format!("no limit: {}", self.message),
            span,
            label,
        )
        .with_help(help);
        if let Some(n) = &self.note {
            d = d.with_note(n.clone());
        }
        Some(d)
    }
}

impl std::error::Error for LimitError {}

/// The Z derivation of a program.
pub fn derivation(prog: &Program) -> Result<Derivation, LimitError> {
    let der = Derivation::new(prog).map_err(|u| match u.node {
        Some(n) => LimitError::at(prog, n, "E0030", u.reason),
        None => LimitError::general("E0030", u.reason),
    })?;
    // A base Gaussian's variance is a law constant (σ² · mult², times n^0 in the
    // limit); a finite law can still square past f64's range (N(0, 1) * 1e200).
    for g in &der.gauss {
        let (param, v) = match g.kind {
            GaussKind::Initial { param, var } | GaussKind::InputLayer { param, var, .. } => {
                (param, var)
            }
            GaussKind::Hat { param, sigma2, .. } => (param, sigma2),
            // s(ξ)·G: its base is checked on its own.
            GaussKind::Scaled { .. } | GaussKind::Point { .. } => continue,
        };
        if !v.is_finite() {
            let prm = &prog.params[param];
            return Err(LimitError {
                node: Some(prm.node),
                span: Some(prm.law_span),
                ..LimitError::general(
                    "E0034",
                    format!(
                        "the variance of the entries of `{}` in the limit, {}, overflows f64",
                        prm.name,
                        prm.law.entry_var()
                    ),
                )
            });
        }
    }
    Ok(der)
}

/// P x d values of every input node from rows of points (all inputs concatenated, each
/// sequence time-major, cli.md). A program without inputs has one (empty) point.
pub(crate) fn input_values(prog: &Program, points: &[Vec<f64>]) -> HashMap<NodeId, DMatrix<f64>> {
    let mut offsets = Vec::new();
    let mut off = 0;
    for d in &prog.inputs {
        offsets.push(off);
        off += d.row_len();
    }
    let mut out = HashMap::new();
    for id in prog.ids() {
        if let Op::Input { input, time } = prog.node(id).op {
            let d = prog.inputs[input].dim;
            let base = offsets[input] + (time.unwrap_or(1) - 1) * d;
            let m = DMatrix::from_fn(points.len(), d, |p, j| {
                points[p].get(base + j).copied().unwrap_or(0.0)
            });
            out.insert(id, m);
        }
    }
    out
}

/// Everything `tpc limit` reports: the kernels and moments on the points, and with a
/// `train` block the trajectory f_t there ([`train::trajectory`]).
pub fn limit(prog: &Program, points: &[Vec<f64>]) -> Result<LimitResult, LimitError> {
    limit_with(prog, points, &particle::ParticleConfig::default())
}

/// [`limit`] with the particle engine's configuration (feature-learning trajectories).
pub fn limit_with(
    prog: &Program,
    points: &[Vec<f64>],
    particles: &particle::ParticleConfig,
) -> Result<LimitResult, LimitError> {
    check_points(prog, points)?;
    // Refuse expectations that do not exist before computing any: quadrature would
    // return a finite number for them (theory.md §1.2 needs the expectation to exist).
    if let Some(bad) = crate::ir::integrability::check(prog).into_iter().next() {
        return Err(LimitError {
            note: Some(bad.reason),
            ..LimitError::at(
                prog,
                bad.node,
                crate::ir::integrability::CODE,
                format!("the Gaussian expectation of `{}` does not exist", bad.name),
            )
        });
    }
    let mut r = kernels(prog, points)?;
    if let (Some(tr), None) = (&prog.train, &r.train) {
        r.train = Some(train::trajectory(
            prog,
            tr,
            &r,
            &|pts| kernels(prog, pts),
            particles,
        ));
    }
    check_finite(prog, &r)?;
    Ok(r)
}

/// Points given through the library must be rows of the right length of finite
/// numbers (the command line's `--inputs` parser checks the same, data.rs); a bad one is
/// reported at the input declaration it belongs to.
fn check_points(prog: &Program, points: &[Vec<f64>]) -> Result<(), LimitError> {
    if prog.inputs.is_empty() {
        return Ok(());
    }
    let row: usize = prog.inputs.iter().map(|d| d.row_len()).sum();
    let bad = |input: usize, message: String| LimitError {
        span: Some(prog.inputs[input].span),
        ..LimitError::general("E0033", message)
    };
    for (i, pt) in points.iter().enumerate() {
        if pt.len() != row {
            return Err(bad(
                0,
                format!(
                    "point {} has {} numbers; the inputs need {row} per point",
                    i + 1,
                    pt.len()
                ),
            ));
        }
        if let Some(j) = pt.iter().position(|v| !v.is_finite()) {
            // The input declaration that coordinate j belongs to.
            let mut k = 0;
            let mut off = 0;
            while k + 1 < prog.inputs.len() && j >= off + prog.inputs[k].row_len() {
                off += prog.inputs[k].row_len();
                k += 1;
            }
            return Err(bad(
                k,
                format!(
                    "point {} has a non-finite coordinate {} of `{}`: {}",
                    i + 1,
                    j - off + 1,
                    prog.inputs[k].name,
                    pt[j]
                ),
            ));
        }
    }
    Ok(())
}

/// The final guard: no limit quantity is reported when it is not finite. The first
/// non-finite entry is blamed on its output (or observe), at its span.
fn check_finite(prog: &Program, r: &LimitResult) -> Result<(), LimitError> {
    let p = r.points.len().max(1);
    let output = |col: usize| prog.outputs.get(col / p).copied();
    let refuse = |node: Option<NodeId>, what: String| match node {
        Some(n) => LimitError::at(prog, n, "E0032", what),
        None => LimitError::general("E0032", what),
    };
    let first_bad = |m: &DMatrix<f64>| {
        // The common case in one contiguous (parallel) scan; the row-major search that
        // names the first bad entry only when there is one.
        if m.as_slice()
            .par_chunks(1 << 16)
            .all(|c| c.iter().all(|v| v.is_finite()))
        {
            return None;
        }
        (0..m.nrows())
            .flat_map(|i| (0..m.ncols()).map(move |j| (i, j)))
            .find(|&(i, j)| !m[(i, j)].is_finite())
    };
    for (kernel, m) in [("NNGP", &r.nngp), ("NTK", &r.ntk)] {
        if let Some((i, j)) = m.as_ref().and_then(first_bad) {
            let node = output(i);
            return Err(refuse(
                node,
                format!(
                    "the {kernel} entry of `{}` at points {} and {} is not finite (overflow or NaN in the limit)",
                    node.map_or("?".into(), |n| prog.label(n)),
                    i % p + 1,
                    j % p + 1
                ),
            ));
        }
    }
    for (k, (name, vals)) in r.observe.iter().enumerate() {
        if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
            return Err(refuse(
                prog.observes.get(k).copied(),
                format!(
                    "the observe `{name}` is not finite at point {} ({}) (overflow or NaN in the limit)",
                    i + 1,
                    vals[i]
                ),
            ));
        }
    }
    if let Some(t) = &r.train {
        for (what, m) in [
            ("f_t", &t.f_t),
            ("f_t_var", &t.f_t_var),
            ("f_t_se", &t.f_t_se),
        ] {
            if let Some((step, col)) = m.as_ref().and_then(first_bad) {
                let node = output(col);
                return Err(refuse(
                    node,
                    format!(
                        "the training trajectory's {what} of `{}` at point {} is not finite at step {step} \
                         (overflow or NaN in the limit)",
                        node.map_or("?".into(), |n| prog.label(n)),
                        col % p + 1
                    ),
                ));
            }
        }
    }
    if !r.max_error.is_finite() {
        return Err(refuse(
            None,
            format!(
                "the stated error of the expectations is not finite ({}): the numbers cannot be trusted",
                r.max_error
            ),
        ));
    }
    Ok(())
}

/// The kernels and moments on the points (everything but the trajectory).
fn kernels(prog: &Program, points: &[Vec<f64>]) -> Result<LimitResult, LimitError> {
    let der = derivation(prog)?;
    let points: Vec<Vec<f64>> = if prog.inputs.is_empty() {
        vec![vec![]]
    } else {
        points.to_vec()
    };
    // P x P blocks: refuse before allocating when even a few of them cannot fit.
    let words = (points.len() as u128).pow(2) * 6 * (prog.outputs.len().max(1) as u128).pow(2);
    if let Some(avail) = crate::machine::mem_available() {
        if 8 * words > avail {
            let fit = ((avail / 48) as f64).sqrt() as usize / prog.outputs.len().max(1);
            return Err(LimitError::general(
                "E0030",
                format!(
                    "{} points need about {:.1} GB for the kernel blocks; this machine has {:.1} GB available \
                     (at most about {fit} points fit)",
                    points.len(),
                    8.0 * words as f64 / 1e9,
                    avail as f64 / 1e9
                ),
            ));
        }
    }
    if !der.logits.is_empty() {
        return random_logits::limit_mixture(prog, &der, points);
    }
    if let Some((nngp, ntk, methods, max_error)) =
        chain::chain_kernels(prog, &der, &input_values(prog, &points))
    {
        return Ok(LimitResult {
            outputs: prog.output_names(),
            points: prog.reported_points(points),
            nngp: Some(nngp),
            nngp_note: None,
            ntk: Some(ntk),
            ntk_note: None,
            observe: Vec::new(),
            methods,
            max_error,
            qmc_3sigma: None,
            regime: crate::scaling::regime(prog).map(|r| r.name().to_string()),
            train: None,
        });
    }
    limit_general(prog, &der, points)
}

/// The general block engine, for every program the derivation covers (the layer-chain
/// fast path of [`chain`] must agree with it). Programs whose kernels all have
/// piecewise-linear closed forms run fused per entry ([`fused`]), the others block by
/// block ([`limit_unfused`]).
pub fn limit_general(
    prog: &Program,
    der: &Derivation,
    points: Vec<Vec<f64>>,
) -> Result<LimitResult, LimitError> {
    let points: Vec<Vec<f64>> = if prog.inputs.is_empty() {
        vec![vec![]]
    } else {
        points
    };
    if let Some(r) = fused::limit_fused(prog, der, &points) {
        return Ok(r);
    }
    limit_unfused(prog, der, points)
}

/// The general block engine without per-entry fusion: every block a P x P pass
/// ([`engine`]); the reference [`fused`] is tested against.
pub fn limit_unfused(
    prog: &Program,
    der: &Derivation,
    points: Vec<Vec<f64>>,
) -> Result<LimitResult, LimitError> {
    let points: Vec<Vec<f64>> = if prog.inputs.is_empty() {
        vec![vec![]]
    } else {
        points
    };
    let der = der.clone();
    let p = points.len();
    // A program with W and Wᵀ: the engine runs on it followed by its backward pass
    // (backprop.rs), whose Z's (with their Ż terms) give the NTK.
    let tied = tied_backward(prog, &der);
    let (eprog, eder, bw) = match &tied {
        Some(Ok((bw, bder))) => (&bw.prog, bder, Some(bw)),
        _ => (prog, &der, None),
    };
    // Dry run on no points: counts block uses so the real run can free each block at
    // its last use (engine::Memo).
    let mut eng = Engine::new(eprog, eder, 0, input_values(eprog, &[]));
    compute(prog, eder, &mut eng, 0, bw)?;
    eng.arm(p, input_values(eprog, &points));
    eng.warm_up()
        .map_err(|(node, e)| LimitError::at(prog, node.min(last_node(prog)), "E0032", e.0))?;
    let (nngp, nngp_note, ntk, mut ntk_note, observe) = compute(prog, eder, &mut eng, p, bw)?;
    if let Some(Err(reason)) = &tied {
        ntk_note = Some(backprop::unsupported_note(reason));
    }
    Ok(LimitResult {
        outputs: prog.output_names(),
        points: prog.reported_points(points),
        nngp,
        nngp_note,
        ntk,
        ntk_note,
        observe,
        methods: eng.method_list(),
        max_error: eng.max_error,
        qmc_3sigma: eng.qmc_3sigma(),
        regime: crate::scaling::regime(prog).map(|r| r.name().to_string()),
        train: None,
    })
}

/// The backward pass of a program with transposes and outputs, with its derivation, or
/// why it cannot be derived; None for other programs (gradient independence holds).
fn tied_backward(
    prog: &Program,
    der: &Derivation,
) -> Option<Result<(backprop::Backward, Derivation), String>> {
    if !der.has_transpose || prog.outputs.is_empty() {
        return None;
    }
    Some(backprop::Backward::build(prog).and_then(|bw| {
        let bder = Derivation::with_parity(&bw.prog, bw.odd.clone()).map_err(|u| {
            let names = bw.prog.stable_names();
            match u.node {
                Some(n) => format!(
                    "is not derived at {}: {}",
                    Program::z_name(&names, n),
                    u.reason
                ),
                None => format!("is not derived: {}", u.reason),
            }
        })?;
        Ok((bw, bder))
    }))
}

/// The last node of the forward program (errors in backward nodes are reported there).
fn last_node(prog: &Program) -> NodeId {
    NodeId::new(prog.len().saturating_sub(1))
}

type Computed = (
    Option<DMatrix<f64>>,
    Option<String>,
    Option<DMatrix<f64>>,
    Option<String>,
    Vec<(String, Vec<f64>)>,
);

/// The kernels and moments, in an order both runs (dry and real) share.
fn compute(
    prog: &Program,
    der: &Derivation,
    eng: &mut Engine<'_>,
    p: usize,
    tied: Option<&backprop::Backward>,
) -> Result<Computed, LimitError> {
    // A non-finite block is blamed on the output or observe being computed.
    let at = |node: NodeId| move |e: engine::NumError| LimitError::at(prog, node, "E0032", e.0);
    let o = prog.outputs.len();
    let mut nngp = DMatrix::zeros(o * p, o * p);
    let mut ntk = DMatrix::zeros(o * p, o * p);
    let mut nngp_note = None;
    let mut ntk_note = None;
    let mut ntk_exp = Rational::ZERO;
    let mut nngp_ok = true;
    let gia = !der.has_transpose;
    if !gia && tied.is_none() {
        ntk_note = Some(tied_ntk_note(prog, der));
    }
    for (a, &oa) in prog.outputs.iter().enumerate() {
        for (b, &ob) in prog.outputs.iter().enumerate().skip(a) {
            let (k, t) =
                output_pair(prog, eng, oa, ob, gia).map_err(at(if a == b { oa } else { ob }))?;
            let t = match tied {
                Some(bw) if !gia => {
                    Some(
                        bw.ntk_pair(eng, a, b)
                            .map_err(at(if a == b { oa } else { ob }))?,
                    )
                }
                _ => t,
            };
            match k.limit_of() {
                Some(m) => set_block(&mut nngp, a, b, p, &m),
                None => {
                    nngp_ok = false;
                    nngp_note = Some(format!(
                        "the outputs grow like n^({}) at initialization: the NNGP has no finite limit",
                        k.exp * Rational::HALF
                    ));
                }
            }
            if let Some(t) = t {
                if t.exp > ntk_exp {
                    ntk_exp = t.exp;
                }
                if let Some(m) = t.limit_of() {
                    set_block(&mut ntk, a, b, p, &m);
                }
            }
        }
    }
    if let (Some(x), true) = (der.zero_param_fused, gia) {
        ntk_note = Some(format!(
            "not derived: `{}` depends on a vector parameter that starts at 0 (std = 0) and is \
             used inside another coordinatewise function, so the gradient of that parameter \
             (whose Z is 0) is not followed into the NTK; name the value in a matrix product or \
             a readout, or give the parameter a nonzero std",
            prog.label(x)
        ));
    }
    let ntk = if (!gia && tied.is_none()) || der.zero_param_fused.is_some() {
        None
    } else if ntk_exp > Rational::ZERO {
        ntk_note = Some(format!(
            "the NTK grows like n^({ntk_exp}): with these learning rates one step moves the output by a \
             diverging amount (the kernel divided by n^({ntk_exp}) has a limit)"
        ));
        None
    } else {
        Some(ntk)
    };

    let mut observe = Vec::new();
    for &m in &prog.observes {
        let v = match &prog.node(m).op {
            Op::Moment(_) => eng.moment_values(m).map_err(at(m))?,
            // A function of moments, observed per point (Netsor+).
            Op::Scalar(e) => {
                let ops = prog.operands(m);
                let mut vals = Vec::with_capacity(ops.len());
                for &o in &ops {
                    vals.push(eng.moment_values(o).map_err(at(o))?);
                }
                nalgebra::DVector::from_fn(p, |i, _| {
                    let x: Vec<f64> = vals.iter().map(|v| v[i]).collect();
                    e.eval(&x)
                })
            }
            _ => continue,
        };
        let vals: Vec<f64> = v.iter().copied().collect();
        let constant = vals
            .iter()
            .all(|x| (x - vals[0]).abs() <= 1e-14 * (1.0 + x.abs()));
        observe.push((
            prog.label(m),
            if constant && !vals.is_empty() {
                vec![vals[0]]
            } else {
                vals
            },
        ));
    }
    Ok((nngp_ok.then_some(nngp), nngp_note, ntk, ntk_note, observe))
}

/// Why a program with transposes gets no NTK. tpc's NTK is the forward tangent kernel
/// under gradient independence (theory.md §2.2–2.3): the backward pass's `Wᵀ δ` is
/// taken as a fresh Gaussian independent of the forward `W h`. When the forward program
/// itself multiplies by W and Wᵀ, the backward pass multiplies by both too and its Ż
/// terms (theory.md §2.1) couple gradients to the forward vectors; tpc does not derive
/// them, so it prints no number rather than one computed under a false assumption.
fn tied_ntk_note(prog: &Program, der: &Derivation) -> String {
    let mut fams: Vec<(usize, bool)> = der
        .gauss
        .iter()
        .filter_map(|g| match g.kind {
            GaussKind::Hat {
                param, transpose, ..
            } => Some((param, transpose)),
            _ => None,
        })
        .collect();
    fams.sort_unstable();
    fams.dedup();
    let tied: Vec<String> = fams
        .windows(2)
        .filter(|w| w[0].0 == w[1].0)
        .map(|w| format!("`{}`", prog.params[w[0].0].name))
        .collect();
    let which = if tied.is_empty() {
        "a matrix".to_string()
    } else {
        tied.join(", ")
    };
    let nonlinear = if der.scales.is_empty() {
        ""
    } else {
        " (here through a nonlinearity: the Ż coefficients s(ξ) above)"
    };
    format!(
        "not derived: the forward program multiplies by {which} and its transpose, so the gradient \
         independence assumption behind tpc's NTK (theory.md §2.2) does not hold: the backward pass \
         multiplies by both as well, and its Ż terms{nonlinear} are not derived; the NNGP and the \
         observes above are exact limits"
    )
}

fn set_block(dst: &mut DMatrix<f64>, a: usize, b: usize, p: usize, m: &DMatrix<f64>) {
    dst.view_mut((a * p, b * p), (p, p)).copy_from(m);
    if a != b {
        dst.view_mut((b * p, a * p), (p, p))
            .copy_from(&m.transpose());
    }
}

impl Scaled {
    /// The n -> infinity limit: the block when the exponent is 0, zero when negative,
    /// None when it diverges.
    pub fn limit_of(&self) -> Option<DMatrix<f64>> {
        if self.exp.is_zero() || self.m.iter().all(|v| *v == 0.0) {
            Some(self.m.clone())
        } else if self.exp < Rational::ZERO {
            Some(DMatrix::zeros(self.m.nrows(), self.m.ncols()))
        } else {
            None
        }
    }
}

/// NNGP and NTK blocks between two outputs (theory.md §1.2 GP corollary, §2.3).
fn output_pair(
    prog: &Program,
    eng: &mut Engine<'_>,
    oa: NodeId,
    ob: NodeId,
    gia: bool,
) -> Result<(Scaled, Option<Scaled>), engine::NumError> {
    let p = eng.p;
    let terms = |o: NodeId| prog.output_terms(o);
    let (ta, tb) = (terms(oa), terms(ob));
    let mut k = Scaled {
        m: DMatrix::zeros(p, p),
        exp: Rational::ZERO,
    };
    let mut t = Scaled {
        m: DMatrix::zeros(p, p),
        exp: Rational::ZERO,
    };
    let n = Monomial::n_pow(Rational::ONE);
    for &(ca, ra, xa) in &ta {
        for &(cb, rb, xb) in &tb {
            if ra != rb {
                continue; // independent readouts (or biases) do not covary
            }
            let Some(prm) = prog.param_of(ra) else {
                continue;
            };
            let law = prm.law;
            let c = Monomial::constant(ca * cb);
            match (xa, xb, prm.shape) {
                (Some(xa), Some(xb), Shape::Readout) => {
                    // f = v . x: Cov = n Var(v_a) E[Z^x Z^x'] = sigma_v^2 E[Z^x Z^x'].
                    let e = eng.vv(xa, xb)?;
                    let s2 = n * law.entry_var() * c;
                    k = add_scaled(
                        k,
                        Scaled {
                            m: e.clone(),
                            exp: Rational::ZERO,
                        }
                        .mul_mono(s2),
                    );
                    if gia {
                        // d f/d v: lr mult^2 (x . x') = lr mult^2 n E[Z^x Z^x'];
                        // through x: Var(v_a) sum_a T(x_a, x'_a) = sigma_v^2 T(x, x').
                        let own = Scaled {
                            m: e,
                            exp: Rational::ZERO,
                        }
                        .mul_mono(law.lr * law.mult.powi(2) * n * c);
                        let through = eng.tvec(xa, xb)?.mul_mono(s2);
                        t = add_scaled(add_scaled(t, own), through);
                    }
                }
                (None, None, _) => {
                    let ones = DMatrix::from_element(p, p, 1.0);
                    k = add_scaled(
                        k,
                        Scaled {
                            m: ones.clone(),
                            exp: Rational::ZERO,
                        }
                        .mul_mono(law.entry_var() * c),
                    );
                    t = add_scaled(
                        t,
                        Scaled {
                            m: ones,
                            exp: Rational::ZERO,
                        }
                        .mul_mono(law.lr * law.mult.powi(2) * c),
                    );
                }
                _ => {}
            }
        }
    }
    Ok((k, gia.then_some(t)))
}

fn add_scaled(a: Scaled, b: Scaled) -> Scaled {
    a.plus(b)
}

/// The Z derivation as text, one line per vector (what `tpc limit` prints first).
///
/// Every vector is named from the source ([`Program::stable_names`]): `Z^h` for a named
/// vector, `Z^{W h[0]}` for an unnamed product, so the text does not change when
/// unrelated parts of the program do. `p` and `q` stand for two input points. Each
/// hidden matrix's products form one family of jointly Gaussian Ẑ (theory.md §2.1); the
/// family's covariance rule is spelled out at its first member.
///
/// A program with W and Wᵀ and outputs is followed by its backward pass
/// ([`backprop`]): the cotangents' Z with the Ż terms that survive, which give the NTK.
pub fn derivation_text(prog: &Program, der: &Derivation) -> String {
    let mut out = derivation_lines(prog, der, 0);
    if let Some(Ok((bw, bder))) = tied_backward(prog, der) {
        let back = derivation_lines(&bw.prog, &bder, bw.forward);
        out.push_str(
            "# backward pass for the NTK (theory.md §2.1, §2.3): dx = √n·∂f/∂x, seeded by the \
             readouts; Ż terms whose coefficient is odd in the readouts vanish\n",
        );
        out.push_str(&back);
    }
    out
}

/// The derivation's lines for the nodes from `from` on (earlier nodes only mark which
/// families were already described).
fn derivation_lines(prog: &Program, der: &Derivation, from: usize) -> String {
    let names = prog.stable_names();
    let mut out = String::new();
    let z = |id: NodeId| Program::z_name(&names, id);
    // Operands: a vector's Z, a moment's per-point limit.
    let zm = |id: NodeId| {
        if matches!(prog.node(id).op, Op::Moment(_)) {
            format!("{}(ξ)", names[id.index()])
        } else {
            z(id)
        }
    };
    let mut seen = std::collections::HashSet::new();
    for id in prog.ids() {
        let ops = prog.operands(id);
        let special = random_logits::clt_line(prog, der, &names, id)
            .or_else(|| random_logits::logit_line(prog, der, &names, id));
        let line = match &prog.node(id).op {
            _ if special.is_some() => special.unwrap_or_default(),
            Op::Param(pi) if prog.params[*pi].shape == Shape::Vector => match der.own[id.index()] {
                Some(g) => match der.gauss[g].kind {
                    GaussKind::Initial { var, .. } => format!("{} ~ N(0, {})", z(id), fmt(var)),
                    _ => continue,
                },
                _ => format!("{} = 0", z(id)),
            },
            Op::MatMul { transpose } => {
                let w = &names[ops[0].index()];
                let t = if *transpose { "ᵀ" } else { "" };
                let arg = crate::ir::product_arg(&names, ops[1]);
                match der.own[id.index()].map(|g| der.gauss[g].kind.clone()) {
                    Some(GaussKind::InputLayer { var, .. }) => {
                        format!(
                            "{} = Ẑ^{{{w} {arg}}},  Cov(Ẑ(p), Ẑ(q)) = {}·⟨{arg}(p), {arg}(q)⟩",
                            z(id),
                            fmt(var)
                        )
                    }
                    Some(GaussKind::Hat { sigma2, .. }) => {
                        let mut s = format!("{} = Ẑ^{{{w}{t} {arg}}}", z(id));
                        for (_g, c, y) in &der.zdot[id.index()] {
                            s.push_str(&format!(" + {}·{}", fmt(*c), z(*y)));
                        }
                        for (_g, k, y) in &der.zdot_point[id.index()] {
                            s.push_str(&format!(" + s{}(ξ)·{}", k + 1, z(*y)));
                        }
                        let size = der
                            .gauss
                            .iter()
                            .filter(|g| matches!(&g.kind, GaussKind::Hat { param, transpose: tt, .. } if prog.params[*param].node == ops[0] && tt == transpose))
                            .count();
                        if seen.insert((ops[0], *transpose, false)) {
                            let members = if size == 1 {
                                format!("the Ẑ of its one product {w}{t} a is Gaussian")
                            } else {
                                format!(
                                    "the Ẑ of its {size} products {w}{t} a are jointly Gaussian"
                                )
                            };
                            s.push_str(&format!(
                                "\n    family {w}{t}: {members},\n    \
                                 Cov(Ẑ^{{{w}{t} a}}, Ẑ^{{{w}{t} b}}) = {}·E[Z^a Z^b], \
                                 independent of other families",
                                fmt(sigma2)
                            ));
                        }
                        let has_zdot = !der.zdot[id.index()].is_empty()
                            || !der.zdot_point[id.index()].is_empty();
                        if has_zdot && seen.insert((ops[0], *transpose, true)) {
                            let other = if *transpose {
                                w.to_string()
                            } else {
                                format!("{w}ᵀ")
                            };
                            s.push_str(&format!(
                                "\n    the terms after Ẑ^{{{w}{t} ·}} are Ż: the program also multiplies by \
                                 {other} (theory.md §2.1)"
                            ));
                        }
                        for (g, k, _y) in &der.zdot_point[id.index()] {
                            let sc = &der.scales[*k];
                            s.push_str(&format!(
                                "\n    Ż: s{}(ξ) = {}·E[∂{}/∂{}] = {}·{} at each point ξ, \
                                 {} enters {} through a nonlinearity",
                                k + 1,
                                fmt(sc.sigma2),
                                z(sc.x),
                                gauss_name(prog, der, &names, *g),
                                fmt(sc.sigma2),
                                scale_text(prog, der, &names, sc),
                                gauss_name(prog, der, &names, *g),
                                z(sc.x),
                            ));
                        }
                        s
                    }
                    _ => format!("{} = 0  (the variance vanishes as n grows)", z(id)),
                }
            }
            Op::Nonlin(e) => {
                let zs: Vec<String> = ops.iter().map(|&o| zm(o)).collect();
                format!("{} = {}", z(id), e.display(&|i| zs[i].clone()))
            }
            Op::Moment(e) if !prog.users(id).is_empty() => {
                // A Netsor+ scalar (theory.md §1.1): its limit at each point.
                let zs: Vec<String> = ops.iter().map(|&o| zm(o)).collect();
                let body = e.display(&|i| zs[i].clone()).to_string();
                match der.moments[id.index()].as_ref().map(|m| m.0) {
                    Some(zform::MomentLimit::Const(c)) => format!(
                        "{} → E[{body}] = {} at every point (the mean of a centered Gaussian part is 0)",
                        names[id.index()],
                        fmt(c)
                    ),
                    _ => format!(
                        "{}(ξ) = E[{body}] at each point ξ (a deterministic limit, Netsor+)",
                        names[id.index()]
                    ),
                }
            }
            Op::Moment(e) => {
                let zs: Vec<String> = ops.iter().map(|&o| zm(o)).collect();
                format!(
                    "{} -> E[{}]",
                    names[id.index()],
                    e.display(&|i| zs[i].clone())
                )
            }
            Op::Scalar(e) => {
                // An observed function of moments (Netsor+): its value at each point.
                let zs: Vec<String> = ops.iter().map(|&o| zm(o)).collect();
                format!(
                    "{}(ξ) = {} at each point ξ",
                    names[id.index()],
                    e.display(&|i| zs[i].clone())
                )
            }
            Op::Output { terms, .. } => {
                let f = &names[id.index()];
                let parts: Vec<String> = terms
                    .iter()
                    .map(|t| match t {
                        OutTerm::Readout {
                            readout, vector, ..
                        } => {
                            let prm = prog.param_of(ops[*readout]);
                            let s2 =
                                prm.map(|p| Monomial::n_pow(Rational::ONE) * p.law.entry_var());
                            let zx = z(ops[*vector]);
                            format!(
                                "{}·E[{zx}(p) {zx}(q)]",
                                s2.map_or("?".into(), |m| m.to_string()),
                            )
                        }
                        OutTerm::Scalar { param, .. } => {
                            format!("Var({})", names[ops[*param].index()])
                        }
                    })
                    .collect();
                let mut s = format!(
                    "{f} ~ Gaussian process over points, Cov({f}(p), {f}(q)) = {}",
                    parts.join(" + ")
                );
                if let Some(m) = random_logits::mixture_line(der, f) {
                    s = format!(
                        "{f} | G ~ Gaussian process over points, Cov({f}(p), {f}(q) | G) = {}\n{m}",
                        parts.join(" + ")
                    );
                }
                s
            }
            _ => continue,
        };
        if id.index() < from {
            continue;
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// A base Gaussian's name in the derivation (stable names, like the vectors').
fn gauss_name(prog: &Program, der: &Derivation, names: &[String], g: zform::GaussId) -> String {
    let pname = |param: usize| names[prog.params[param].node.index()].clone();
    match &der.gauss[g].kind {
        GaussKind::Initial { param, .. } => Program::z_name(names, prog.params[*param].node),
        GaussKind::InputLayer { param, input, .. } => format!(
            "Ẑ^{{{} {}}}",
            pname(*param),
            crate::ir::product_arg(names, *input)
        ),
        GaussKind::Hat {
            param,
            transpose,
            arg,
            ..
        } => format!(
            "Ẑ^{{{}{} {}}}",
            pname(*param),
            if *transpose { "ᵀ" } else { "" },
            crate::ir::product_arg(names, *arg)
        ),
        GaussKind::Point { scale } => format!("s{}(ξ)", scale + 1),
        GaussKind::Scaled { base, scale, .. } => {
            format!("s{}(ξ)·{}", scale + 1, gauss_name(prog, der, names, *base))
        }
    }
}

/// `E[D]` of a Ż coefficient, with its Stein terms for functions with a jump.
fn scale_text(prog: &Program, der: &Derivation, names: &[String], sc: &zform::Scale) -> String {
    let mut parts = Vec::new();
    if !(sc.d.is_linear() && sc.d.lin.is_zero() && sc.d.constant == 0.0) || sc.stein.is_empty() {
        parts.push(format!("E[{}]", zform_text(prog, der, names, &sc.d)));
    }
    for (c, at) in &sc.stein {
        let z = zform::ZForm {
            atoms: vec![(1.0, at.clone())],
            ..zform::ZForm::default()
        };
        let l = zform_text(
            prog,
            der,
            names,
            &zform::ZForm {
                lin: at.args[0].clone(),
                ..zform::ZForm::default()
            },
        );
        parts.push(format!(
            "{}·E[({l})·{}]/Var({l}) (Stein's lemma: the jump's delta)",
            fmt(*c),
            zform_text(prog, der, names, &z)
        ));
    }
    if parts.len() == 1 {
        parts.remove(0)
    } else {
        format!("({})", parts.join(" + "))
    }
}

/// A Z form over base Gaussians as text: `1 - tanh(Ẑ^{W h})^2`.
fn zform_text(prog: &Program, der: &Derivation, names: &[String], z: &zform::ZForm) -> String {
    let lin = |l: &zform::LinForm| -> String {
        let parts: Vec<String> =
            l.0.iter()
                .map(|&(g, c)| {
                    let n = gauss_name(prog, der, names, g);
                    if c == 1.0 {
                        n
                    } else {
                        format!("{}·{n}", fmt(c))
                    }
                })
                .collect();
        parts.join(" + ")
    };
    let mut parts = Vec::new();
    if !z.lin.is_zero() {
        parts.push(lin(&z.lin));
    }
    for (c, a) in &z.atoms {
        let args: Vec<String> = a
            .args
            .iter()
            .map(|l| {
                if l.0.len() == 1 && l.0[0].1 == 1.0 {
                    lin(l)
                } else {
                    format!("({})", lin(l))
                }
            })
            .collect();
        let body = a.f.display(&|i| args[i].clone()).to_string();
        parts.push(if *c == 1.0 {
            body
        } else {
            format!("{}·({body})", fmt(*c))
        });
    }
    if z.constant != 0.0 || parts.is_empty() {
        parts.push(fmt(z.constant));
    }
    parts.join(" + ")
}

/// A law constant for the derivation, rounded to 12 decimals where that is exact
/// enough; large values are printed as they are (`v * 1e12` would overflow to `inf`
/// for finite variances above 1.8e296).
fn fmt(v: f64) -> String {
    let r = (v * 1e12).round() / 1e12;
    crate::ir::expr::fmt_num(if r.is_finite() { r } else { v })
}
