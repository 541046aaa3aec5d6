//! tpc: a compiler from a small neural-network language to Tensor Programs.
//!
//! A `.tp` file describes a network whose hidden width `n` goes to infinity. tpc
//! compiles it to one IR ([`ir::Program`]: MatMul and coordinatewise Nonlin over width-n
//! vectors) and gives it two meanings: run it at finite width, or derive its
//! infinite-width limit by the Master Theorem. See `ARCHITECTURE.md` for the map.
//!
//! The public API: [`compile`] (source to [`ir::Program`], or an [`Error`] with rendered
//! diagnostics), [`check_source`] (every diagnostic, warnings included), [`derive()`] (the Z
//! derivation as text, for snapshot tests), [`limit_of`] / [`limit::limit`] (NNGP, NTK,
//! observes, training trajectories), and [`finite::exec::run`] (the same at finite width).
//!
//! ```
//! let src = "width n\ninput x : 1\nparam U : n x 1\nparam v : 1 x n\nh = relu(U @ x)\noutput f = v @ h\n";
//! let prog = tpc::compile(src).expect("a valid program");
//! assert_eq!(prog.output_names(), ["f"]);
//! ```

pub mod autodiff;
pub mod data;
pub mod diag;
pub mod finite;
pub mod ir;
pub mod limit;
pub mod lower;
pub mod machine;
pub mod report;
pub mod scaling;
pub mod syntax;

use diag::{Diagnostic, Renderer};

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

/// The Z derivation of a program (theory.md §1–2), one line per vector: what
/// `tpc limit` prints first, and what users snapshot-test.
///
/// ```
/// let src = "width n\ninput x : 1\nparam U : n x 1\nparam v : 1 x n\nh = relu(U @ x)\noutput f = v @ h\n";
/// let text = tpc::derive(src)?;
/// assert!(text.contains("Z^h = relu("));
/// # Ok::<(), tpc::Error>(())
/// ```
pub fn derive(src: &str) -> Result<String, Error> {
    let prog = compile(src)?;
    match limit::derivation(&prog) {
        Ok(d) => Ok(limit::derivation_text(&prog, &d)),
        Err(e) => Err(limit_error(src, &e)),
    }
}

/// The infinite-width limit of a program on points (rows as in `--inputs`).
///
/// ```
/// let src = "width n\ninput x : 1\nparam U : n x 1\nparam v : 1 x n\nh = relu(U @ x)\noutput f = v @ h\n";
/// let r = tpc::limit_of(src, &[vec![1.0], vec![2.0]])?;
/// let k = r.nngp.unwrap();
/// assert!((k[(0, 0)] - 0.5).abs() < 1e-12); // E[relu(u)^2] = Var(u)/2
/// # Ok::<(), tpc::Error>(())
/// ```
pub fn limit_of(src: &str, points: &[Vec<f64>]) -> Result<limit::LimitResult, Error> {
    let prog = compile(src)?;
    limit::limit(&prog, points).map_err(|e| limit_error(src, &e))
}

/// A refused limit as an [`Error`]: its diagnostic at the node (or input declaration)
/// responsible, with its code; one without a place in the source (memory) is given at
/// the start of the file and says so.
fn limit_error(src: &str, e: &limit::LimitError) -> Error {
    let d = e.diagnostic().unwrap_or_else(|| {
        Diagnostic::error(
            e.code,
            format!("no limit: {}", e.message),
            ir::Span::new(0, 0),
            "this program",
        )
        .with_help("no single statement is responsible")
    });
    Error {
        diagnostics: vec![d],
        source: src.to_string(),
        name: "<source>".to_string(),
    }
}
