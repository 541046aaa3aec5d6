//! tpc: a compiler from a small neural-network language to Tensor Programs.
//!
//! A `.tp` file describes a network whose hidden width `n` goes to infinity. tpc
//! compiles it to one IR ([`ir::Program`]: MatMul and coordinatewise Nonlin over width-n
//! vectors) and gives it two meanings: run it at finite width, or derive its
//! infinite-width limit by the Master Theorem. See `ARCHITECTURE.md` for the map.
//!
//! # The public API
//!
//! Everything takes the program's source text and returns an [`Error`] (rendered
//! diagnostics with codes, like `tpc check`) when the program or the points are bad:
//!
//! | function | gives | command line |
//! | --- | --- | --- |
//! | [`compile`] | the IR, [`ir::Program`] | `tpc graph` |
//! | [`check_source`] | every diagnostic, warnings included | `tpc check` |
//! | [`derive()`] | the Z derivation as text (names from the source, stable under unrelated edits) | first part of `tpc limit` |
//! | [`derive_unrolled`] | the Z derivation of the unrolled training program, with Ż terms | `tpc limit --unrolled` |
//! | [`limit_of`] | NNGP, NTK, observes, training trajectory: [`LimitResult`] | `tpc limit --format json` |
//! | [`report_limit`] | the whole `tpc limit` text report ([`report::limit::text`]) | `tpc limit` |
//! | [`run`] | the same quantities at finite width N, ± standard errors | `tpc run` |
//!
//! Points are rows as in `--inputs` (cli.md): one `Vec<f64>` per point, all inputs
//! concatenated, sequences time-major. An empty slice means the default points of the
//! command line: the training inputs, or the one empty point of a program without
//! inputs; otherwise every point must have exactly the numbers the inputs need, all
//! finite (else error E0033). Matrices are [`nalgebra`]'s, re-exported as
//! [`tpc::nalgebra`](nalgebra) so that callers need not match its version.
//!
//! ```
//! let src = "width n\ninput x : 1\nparam U : n x 1\nparam v : 1 x n\nh = relu(U @ x)\noutput f = v @ h\n";
//! let prog = tpc::compile(src).expect("a valid program");
//! assert_eq!(prog.output_names(), ["f"]);
//! let r = tpc::limit_of(src, &[vec![1.0], vec![-1.0]])?;
//! let k: &tpc::nalgebra::DMatrix<f64> = r.nngp.as_ref().expect("a Gaussian limit");
//! assert!((k[(0, 1)] - 0.0).abs() < 1e-12); // E[relu(u) relu(-u)] = 0
//! # Ok::<(), tpc::Error>(())
//! ```

pub mod autodiff;
pub mod data;
pub mod diag;
pub mod emit;
pub mod finite;
pub mod ir;
pub mod limit;
pub mod lower;
pub mod machine;
pub mod predict;
pub mod report;
pub mod scaling;
pub mod syntax;
pub mod tiles;

pub use data::DataError;
pub use finite::exec::{RunConfig, RunError, RunResult};
pub use limit::{LimitError, LimitResult};
pub use nalgebra;

use diag::{Diagnostic, Renderer};
use ir::Program;

/// The README's Rust examples run as doctests (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// A program with errors: its diagnostics, renderable against the source.
#[derive(Debug, Clone)]
pub struct Error {
    pub diagnostics: Vec<Diagnostic>,
    source: String,
    name: String,
}

impl Error {
    /// The diagnostics rendered like rustc's, without colour.
    pub fn render(&self) -> String {
        Renderer::new(&self.name, &self.source).render(&self.diagnostics)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

impl std::error::Error for Error {}

/// Stack for the front end: pest and the tree walks recurse, and the nesting guard
/// (`syntax::MAX_NESTING`) is sized for this.
const FRONT_END_STACK: usize = 512 << 20;

/// Checks a source text: the program when it has no error, and every diagnostic.
/// Runs on a thread with a large stack so that no input can overflow it.
pub fn check_source(src: &str) -> (Option<ir::Program>, Vec<Diagnostic>) {
    let owned = src.to_string();
    let run = move || match syntax::parse(&owned) {
        Err(d) => (None, vec![*d]),
        Ok(file) => {
            let (prog, mut diags) = lower::lower(&file, &owned);
            // Scaling warnings and notes (theory.md §5) once the program is valid.
            if let Some(p) = &prog {
                if !diags.iter().any(Diagnostic::is_error) {
                    diags.extend(scaling::diagnostics(p, &owned));
                    // Expectations that do not exist: the limit refuses them; at finite
                    // width the mean over seeds has nothing to converge to.
                    diags.extend(
                        ir::integrability::check(p)
                            .iter()
                            .map(|b| b.diagnostic(false)),
                    );
                }
            }
            (prog, diags)
        }
    };
    match std::thread::Builder::new()
        .stack_size(FRONT_END_STACK)
        .spawn(run)
    {
        Ok(h) => h.join().unwrap_or_else(|_| {
            (
                None,
                vec![Diagnostic::error(
                    "E0003",
                    "internal error while checking this file",
                    ir::Span::new(0, 0),
                    "here",
                )
                .with_help("please report this input")],
            )
        }),
        Err(_) => (
            None,
            vec![Diagnostic::error(
                "E0003",
                "could not start the checker thread",
                ir::Span::new(0, 0),
                "here",
            )
            .with_help("the machine is out of threads or memory")],
        ),
    }
}

/// Checks raw bytes (a file as read): invalid UTF-8 is diagnosed at its first bad byte.
/// A leading UTF-8 byte-order mark is dropped: the returned text, which every span refers
/// to, starts after it, as an editor's columns do.
pub fn check_bytes(bytes: &[u8]) -> (String, Option<ir::Program>, Vec<Diagnostic>) {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            let (p, d) = check_source(s);
            (s.to_string(), p, d)
        }
        Err(e) => {
            let at = e.valid_up_to();
            let shown = String::from_utf8_lossy(bytes).into_owned();
            // Offsets shift where replacement characters were inserted; point at the
            // start of the lossy text's first replacement character.
            let pos = shown.find('\u{FFFD}').unwrap_or(at.min(shown.len()));
            let d = Diagnostic::error(
                "E0002",
                format!("the file is not valid UTF-8 (byte {at})"),
                ir::Span::new(pos, pos + '\u{FFFD}'.len_utf8()),
                "invalid byte",
            )
            .with_help("tpc reads UTF-8 text; is this the right file?");
            (shown, None, vec![d])
        }
    }
}

/// Compiles a source text to the IR.
///
/// Warnings are dropped here; use [`check_source`] to see them.
pub fn compile(src: &str) -> Result<ir::Program, Error> {
    let (prog, diags) = check_source(src);
    prog.ok_or_else(|| Error {
        diagnostics: diags,
        source: src.to_string(),
        name: "<source>".to_string(),
    })
}

/// Builds an [`Error`] for a named file (used by the command line).
pub fn error_for(name: &str, source: &str, diagnostics: Vec<Diagnostic>) -> Error {
    Error {
        diagnostics,
        source: source.to_string(),
        name: name.to_string(),
    }
}

/// An [`Error`] for `src` with one diagnostic.
fn error_in(src: &str, d: Diagnostic) -> Error {
    Error {
        diagnostics: vec![d],
        source: src.to_string(),
        name: "<source>".to_string(),
    }
}

/// A refused limit as an [`Error`]: its diagnostic at the node (or input declaration)
/// responsible, with its code; one without a place in the source (memory) is given at
/// the start of the file and says so.
fn limit_error(src: &str, e: &LimitError) -> Error {
    let d = e.diagnostic().unwrap_or_else(|| {
        Diagnostic::error(
            e.code,
            format!("no limit: {}", e.message),
            ir::Span::new(0, 0),
            "this program",
        )
        .with_help("no single statement is responsible")
    });
    error_in(src, d)
}

/// The points to evaluate `prog` on (module docs, "Points"): `points` checked against
/// the program's inputs, or the command line's default points when `points` is empty.
/// Every problem is an E0033 at the first `input` declaration.
pub fn check_points(
    src: &str,
    prog: &Program,
    points: &[Vec<f64>],
) -> Result<Vec<Vec<f64>>, Error> {
    let span = prog.inputs.first().map(|d| d.span).unwrap_or_default();
    let want = data::row_len(prog);
    let needs = data::needs(prog);
    let bad = |msg: String, help: String| {
        error_in(
            src,
            Diagnostic::error("E0033", msg, span, "the points are for these inputs")
                .with_help(help),
        )
    };
    if points.is_empty() {
        return data::default_points(prog).ok_or_else(|| {
            bad(
                "no points: this program has inputs and no `train` data to default to".into(),
                format!("pass at least one point of {want} number(s): {needs}"),
            )
        });
    }
    if points.len() > data::MAX_POINTS {
        return Err(bad(
            format!(
                "{} points; tpc takes at most {}",
                points.len(),
                data::MAX_POINTS
            ),
            "split the points into several calls".into(),
        ));
    }
    for (k, x) in points.iter().enumerate() {
        if x.len() != want && want == 0 {
            return Err(bad(
                format!(
                    "point {} has {} number(s), but the program has no `input`",
                    k + 1,
                    x.len()
                ),
                "pass no points (or one empty point)".into(),
            ));
        }
        if x.len() != want {
            return Err(bad(
                format!(
                    "point {} has {} number(s); the program's inputs need {want}",
                    k + 1,
                    x.len()
                ),
                format!("a point is {needs}"),
            ));
        }
        if let Some(j) = x.iter().position(|v| !v.is_finite()) {
            return Err(bad(
                format!(
                    "point {}, number {}, is {}: not a finite number",
                    k + 1,
                    j + 1,
                    x[j]
                ),
                "every coordinate of a point must be finite".into(),
            ));
        }
    }
    Ok(points.to_vec())
}

/// The Z derivation of a program (theory.md §1–2), one line per vector: what
/// `tpc limit` prints first, and what users snapshot-test. Vectors are named from the
/// source (`Z^h`, `Z^x[3]`; an unnamed product `Z^{W h[0]}`), so the text does not change
/// when an unrelated parameter or statement is added ([`ir::Program::stable_names`]).
///
/// ```
/// let src = "width n\ninput x : 1\nparam U : n x 1\nparam v : 1 x n\nh = relu(U @ x)\noutput f = v @ h\n";
/// let text = tpc::derive(src)?;
/// assert!(text.contains("Z^h = relu(Z^{U x})"));
/// # Ok::<(), tpc::Error>(())
/// ```
pub fn derive(src: &str) -> Result<String, Error> {
    let prog = compile(src)?;
    let d = limit::derivation(&prog).map_err(|e| limit_error(src, &e))?;
    Ok(limit::derivation_text(&prog, &d))
}

/// The Z derivation of the program's `train` block unrolled into one program in the
/// initial weights (theory.md §6.1), with its Ż terms (§2.1): what `tpc limit --unrolled`
/// adds. `points` are where f_t is evaluated (empty: the training inputs).
///
/// ```
/// let src = "width n\ninput x : 1\nparameterization mup\nparam U : n x 1\nparam v : 1 x n\n\
///            h = U @ x\noutput f = v @ h\n\
///            train { loss = mse  lr = 0.5  steps = 1  data = [ ([1.0], 1.0) ] }\n";
/// let text = tpc::derive_unrolled(src, &[])?;
/// assert!(text.contains("f_1(ξ1)"));
/// # Ok::<(), tpc::Error>(())
/// ```
pub fn derive_unrolled(src: &str, points: &[Vec<f64>]) -> Result<String, Error> {
    let prog = compile(src)?;
    let eval: Vec<Vec<f64>> = if points.is_empty() || prog.inputs.is_empty() {
        Vec::new()
    } else {
        check_points(src, &prog, points)?
    };
    let u = autodiff::unroll(&prog, &eval, autodiff::Width::Limit).map_err(|e| {
        let span = e.node.map(|n| prog.node(n).span).unwrap_or_default();
        error_in(
            src,
            Diagnostic::error(
                "E0030",
                format!("cannot unroll training: {}", e.message),
                span,
                "here",
            )
            .with_help("`tpc run` still trains at finite width"),
        )
    })?;
    Ok(limit::particle::derivation_text(&u.prog))
}

/// The infinite-width limit of a program on points (rows as in `--inputs`; see the
/// module docs for the default points and the checks): the numbers of
/// `tpc limit --format json`.
///
/// ```
/// let src = "width n\ninput x : 1\nparam U : n x 1\nparam v : 1 x n\nh = relu(U @ x)\noutput f = v @ h\n";
/// let r = tpc::limit_of(src, &[vec![1.0], vec![2.0]])?;
/// let k = r.nngp.unwrap();
/// assert!((k[(0, 0)] - 0.5).abs() < 1e-12); // E[relu(u)^2] = Var(u)/2
/// // A point with the wrong number of coordinates is an error, not padded:
/// let e = tpc::limit_of(src, &[vec![1.0, 2.0]]).unwrap_err();
/// assert!(e.render().contains("point 1 has 2 number(s); the program's inputs need 1"));
/// # Ok::<(), tpc::Error>(())
/// ```
pub fn limit_of(src: &str, points: &[Vec<f64>]) -> Result<LimitResult, Error> {
    let prog = compile(src)?;
    let points = check_points(src, &prog, points)?;
    limit::limit(&prog, &points).map_err(|e| limit_error(src, &e))
}

/// The whole text report of `tpc limit` (without `--unrolled`): the derivation of
/// [`derive()`], the points, the NNGP and NTK with labelled rows and columns, observes, the
/// training trajectory and the methods ([`report::limit::text`]).
///
/// ```
/// let src = "width n\ninput x : 1\nparam U : n x 1\nparam v : 1 x n\nh = relu(U @ x)\noutput f = v @ h\n";
/// let text = tpc::report_limit(src, &[vec![1.0], vec![2.0]])?;
/// assert!(text.contains("# NNGP"));
/// assert!(text.contains("p2 = (2)"));
/// # Ok::<(), tpc::Error>(())
/// ```
pub fn report_limit(src: &str, points: &[Vec<f64>]) -> Result<String, Error> {
    let prog = compile(src)?;
    let points = check_points(src, &prog, points)?;
    let der = limit::derivation(&prog).map_err(|e| limit_error(src, &e))?;
    let r = limit::limit(&prog, &points).map_err(|e| limit_error(src, &e))?;
    Ok(report::limit::text(
        &limit::derivation_text(&prog, &der),
        &r,
    ))
}

/// The program at finite width `cfg.width`, over `cfg.seeds` seeded draws (the dense
/// engine of `tpc run`): means and standard errors of the same quantities as
/// [`limit_of`]. Points as for [`limit_of`].
///
/// ```
/// let src = "width n\ninput x : 1\nparam U : n x 1\nparam v : 1 x n\nh = relu(U @ x)\noutput f = v @ h\n";
/// let cfg = tpc::RunConfig { width: 256, seeds: 4, seed: 0 };
/// let r = tpc::run(src, &[vec![1.0]], &cfg)?;
/// assert_eq!(r.width, 256);
/// # Ok::<(), tpc::Error>(())
/// ```
pub fn run(src: &str, points: &[Vec<f64>], cfg: &RunConfig) -> Result<RunResult, Error> {
    let prog = compile(src)?;
    let points = check_points(src, &prog, points)?;
    finite::exec::run(&prog, &points, cfg, &|| {}).map_err(|e| {
        let d = e.diagnostic(&prog).unwrap_or_else(|| {
            Diagnostic::error(
                e.code.unwrap_or("E0024"),
                e.message.clone(),
                ir::Span::new(0, 0),
                "this program",
            )
            .with_help(
                e.help
                    .clone()
                    .unwrap_or_else(|| "no single statement is responsible".into()),
            )
        });
        error_in(src, d)
    })
}
