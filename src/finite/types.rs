//! The engine-neutral types of a finite run, below every engine: what to run
//! ([`RunConfig`], [`Engine`]), why it failed ([`RunError`], with the value guard
//! [`out_of_range`]), what one draw and a whole run give ([`Draw`], [`Estimate`],
//! [`RunResult`]), and the one interface an engine implements (`HiddenProducts`).
//!
//! The dense pass (`pass`), the conditional sampler ([`super::cond`]), training
//! ([`super::train`]) and the unrolled program ([`super::unrolled`]) all depend on this
//! module and on `plan`, never on each other's internals nor on the driver
//! ([`super::exec`]), which sits on top.

use std::sync::Arc;

use nalgebra::DMatrix;

use crate::ir::{NodeId, Program};

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct RunConfig {
    /// The width N.
    pub width: usize,
    /// The number of independent draws K.
    pub seeds: usize,
    /// The run's seed S.
    pub seed: u64,
}

/// How hidden-matrix products are computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Engine {
    /// Sample every N×N hidden matrix and multiply (exact NTK).
    #[default]
    Dense,
    /// Draw each hidden product from its law conditioned on the products drawn so far
    /// ([`super::cond`]): O(N·k) memory; the NTK's reverse pass draws its
    /// transposed products from the same history.
    Conditional,
}

/// The products of hidden matrices, as the forward pass asks for them: `mult·W x` (or
/// `mult·Wᵀ x`) for hidden parameter `pi` on the N×c block `x`.
pub(super) trait HiddenProducts {
    fn product(
        &mut self,
        pi: usize,
        transpose: bool,
        x: &DMatrix<f64>,
    ) -> Result<DMatrix<f64>, RunError>;

    /// Words of memory the sampler holds now (its history), for [`Footprint`].
    fn held_words(&self) -> usize {
        0
    }
}

/// Why a run could not be done (or gave a non-finite number), against the node
/// responsible when there is one.
#[derive(Clone, Debug)]
pub struct RunError {
    pub node: Option<NodeId>,
    pub message: String,
    /// The source span, when the error is about a node of another program than the
    /// front end's (the unrolled training program's nodes carry source spans too).
    pub span: Option<crate::ir::Span>,
    /// The diagnostic code, when the error is a diagnosed one (numbers, memory); `None`
    /// for an internal failure.
    pub code: Option<&'static str>,
    /// What to do about it.
    pub help: Option<String>,
}

/// The largest magnitude a finite-width value may reach: beyond it a square (every
/// moment, norm and Gram entry is a sum of products) overflows f64 (max ≈ 1.8e308),
/// so later numbers would be infinite, NaN, or — where a NaN is swallowed by a
/// comparison — silently wrong. With |v| ≤ 1e150, a sum of up to 1.8e8 squares is
/// still finite. A network whose values pass this has blown up (a learning rate too
/// large for the width, a law that grows with n): that is reported, not computed.
pub const MAX_VALUE: f64 = 1e150;

/// The first value of `it` that is not a number tpc can report: NaN, infinite, or
/// beyond [`MAX_VALUE`].
pub fn out_of_range(it: impl IntoIterator<Item = f64>) -> Option<f64> {
    it.into_iter().find(|v| v.is_nan() || v.abs() > MAX_VALUE)
}

/// The reason a value is out of range, for messages.
pub fn describe_value(v: f64) -> String {
    if !v.is_finite() {
        "a value is infinite or NaN".to_string()
    } else {
        format!("a value reaches {v:.3e}, beyond ±{MAX_VALUE:e} (its square would be infinite or NaN in f64)")
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RunError {}

pub(super) fn bug(node: Option<NodeId>, message: impl Into<String>) -> RunError {
    RunError::new(node, message)
}

impl RunError {
    /// The diagnostic, when the error has a place: the span it carries (nodes of an
    /// unrolled training program point back to the source this way), else its node's;
    /// a divergence in training (E0035) also points at the learning rate.
    pub fn diagnostic(&self, prog: &Program) -> Option<crate::diag::Diagnostic> {
        let span = self.span.or_else(|| self.node.map(|n| prog.node(n).span))?;
        let code = self.code.unwrap_or("E0024");
        let help = self.help.clone().unwrap_or_else(|| {
            "a smaller width, other laws or bounded functions keep values finite".into()
        });
        let mut d = crate::diag::Diagnostic::error(code, self.message.clone(), span, "this value")
            .with_help(help);
        if let (Some(t), "E0035") = (&prog.train, code) {
            d = d.with_secondary(t.lr_span, format!("learning rate {}", t.lr));
        }
        Some(d)
    }

    /// An error about `node` (if any) with no code or help yet.
    pub fn new(node: Option<NodeId>, message: impl Into<String>) -> RunError {
        RunError {
            node,
            message: message.into(),
            span: None,
            code: None,
            help: None,
        }
    }

    /// A value out of range (E0024), with the default help.
    pub fn overflow(node: Option<NodeId>, message: impl Into<String>) -> RunError {
        RunError {
            code: Some("E0024"),
            help: Some(
                "a smaller width, other laws or bounded functions keep values finite".into(),
            ),
            ..RunError::new(node, message)
        }
    }

    /// A run that does not fit (E0037).
    pub fn resources(message: impl Into<String>, help: impl Into<String>) -> RunError {
        RunError {
            code: Some("E0037"),
            help: Some(help.into()),
            ..RunError::new(None, message)
        }
    }

    /// Whether this is a value out of range (so training may call it a divergence).
    pub fn is_overflow(&self) -> bool {
        matches!(self.code, Some("E0024") | Some("E0035"))
    }

    /// This error happened while training: an overflow becomes a divergence (E0035)
    /// whose help names the learning rate; `what` says when.
    pub fn in_training(self, what: &str) -> RunError {
        let message = format!("{what}: {}", self.message);
        if self.is_overflow() {
            RunError {
                message,
                code: Some("E0035"),
                help: Some(
                    "the learning rate is too large for this width: lower `lr`, or use a \
                     parameterization whose updates stay bounded as n grows (`mup`); \
                     `tpc check` warns when training blows up with the width (W0103)"
                        .into(),
                ),
                ..self
            }
        } else {
            RunError { message, ..self }
        }
    }
}

/// The numbers of one draw.
#[derive(Clone, Debug)]
pub struct Draw {
    /// Outputs, O×P.
    pub f: DMatrix<f64>,
    /// Conditional NNGP, O·P × O·P, output-major.
    pub nngp: DMatrix<f64>,
    /// Empirical NTK, O·P × O·P, output-major, lr-weighted (language.md, Training).
    pub ntk: DMatrix<f64>,
    /// Each observe: one value per point, or one value when it depends on no input.
    pub observe: Vec<Vec<f64>>,
}

/// A mean over draws and its standard error (`None` with a single draw).
#[derive(Clone, Debug)]
pub struct Estimate {
    pub mean: DMatrix<f64>,
    pub se: Option<DMatrix<f64>>,
}

/// Everything `tpc run` reports (cli.md's `run` JSON).
#[derive(Clone, Debug)]
pub struct RunResult {
    pub outputs: Vec<String>,
    /// The points as read; empty for a program without inputs.
    pub points: Vec<Vec<f64>>,
    pub width: usize,
    pub seeds: usize,
    pub seed: u64,
    /// Outputs, O×P.
    pub f: Estimate,
    pub nngp: Estimate,
    pub ntk: Estimate,
    /// Each observe by name: a 1×c estimate (c = P, or 1 when it depends on no input).
    pub observe: Vec<(String, Estimate)>,
    /// With a `train` block: the trajectory f_t on the points ([`super::train`]).
    pub train: Option<super::train::TrainResult>,
}

/// Coordinates per parallel task in the coordinatewise loops of a wide draw: fixed,
/// so that chunked sums come out the same whatever the thread count, and large
/// enough that a task outweighs rayon's dispatch.
pub(super) const COORD_CHUNK: usize = 1 << 15;

/// A cotangent block (N×O·P), shared between operands that receive the same one.
pub(super) type Cot = Arc<DMatrix<f64>>;
