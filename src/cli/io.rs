//! The binary's plumbing shared by every subcommand: loading and compiling a file,
//! reading inputs, rendering diagnostics (text, or one JSON object on stdout under
//! `--format json`, cli.md "Errors as JSON"), printing reports, SVGs and saved results,
//! progress bars. Nothing here computes: the library does.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use codespan_reporting::term::termcolor::{ColorChoice, StandardStream};

use tpc::diag::{Diagnostic, Renderer, Severity};
use tpc::ir::Program;

use crate::{Cli, Format, Reported};

/// The distinct widths of `--widths`, sorted; a slope needs two (a usage error, exit 2).
pub(crate) fn slope_widths(widths: &[u64]) -> Result<Vec<usize>, Reported> {
    let mut distinct = widths.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() < 2 {
        use clap::CommandFactory;
        print_json_error(
            None,
            "--widths needs at least two distinct widths to fit a slope",
            &[],
            None,
        );
        Cli::command()
            .error(
                clap::error::ErrorKind::ValueValidation,
                "--widths needs at least two distinct widths to fit a slope",
            )
            .exit();
    }
    distinct
        .iter()
        .map(|&w| usize::try_from(w))
        .collect::<Result<_, _>>()
        .map_err(|_| fail("a width is too large for this machine"))
}

/// The file's name without its directories, for captions.
pub(crate) fn file_name(file: &Path) -> String {
    file.file_name().map_or_else(
        || file.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Prints a `compare` / `coord-check` report as JSON or as text with the plot's path.
pub(crate) fn print_report(
    format: Format,
    shown: Option<&str>,
    json: impl FnOnce() -> serde_json::Value,
    text: impl FnOnce() -> String,
) -> Result<(), Reported> {
    let out = if format == Format::Json {
        serde_json::to_string_pretty(&json())
            .map_err(|e| fail(&format!("cannot write JSON: {e}")))?
            + "\n"
    } else {
        with_plot_line(text(), shown)
    };
    print_out(&out)
}

/// Writes the SVG of `compare` / `coord-check` (unless `--no-svg`) to `--svg` or to
/// `<stem>_<suffix>.svg`; returns the path written.
pub(crate) fn write_svg(
    file: &Path,
    svg: Option<PathBuf>,
    no_svg: bool,
    suffix: &str,
    doc: impl FnOnce() -> Result<String, String>,
) -> Result<Option<String>, Reported> {
    if no_svg {
        return Ok(None);
    }
    let path = svg.unwrap_or_else(|| {
        let stem = file
            .file_stem()
            .map_or_else(|| "tpc".to_string(), |s| s.to_string_lossy().into_owned());
        PathBuf::from(format!("{stem}_{suffix}.svg"))
    });
    let doc = doc().map_err(|e| fail(&e))?;
    std::fs::write(&path, doc)
        .map_err(|e| fail(&format!("cannot write `{}`: {e}", path.display())))?;
    Ok(Some(path.display().to_string()))
}

/// A text report with the plot's path appended.
pub(crate) fn with_plot_line(mut text: String, shown: Option<&str>) -> String {
    if let Some(p) = shown {
        text.push_str(&format!("\n# plot: {p}\n"));
    }
    text
}

/// Reads `--inputs`, or the default points (training data, or none needed).
pub(crate) fn load_points(
    prog: &Program,
    inputs: Option<&Path>,
) -> Result<Vec<Vec<f64>>, Reported> {
    match inputs {
        Some(path) => {
            let name = path.display().to_string();
            let bytes = read_limited(path, tpc::data::MAX_BYTES)?;
            // A leading byte-order mark is dropped before parsing, so that the rendered
            // file and the spans agree (an editor does not count it as a column).
            let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
            let text = match std::str::from_utf8(bytes) {
                Ok(t) => t,
                Err(e) => {
                    let at = e.valid_up_to();
                    let shown = String::from_utf8_lossy(bytes).into_owned();
                    let pos = shown.find('\u{FFFD}').unwrap_or(at.min(shown.len()));
                    let d = Diagnostic::error(
                        "E0028",
                        format!("`{name}` is not valid UTF-8 text (byte {at})"),
                        tpc::ir::Span::new(pos, pos + '\u{FFFD}'.len_utf8()),
                        "invalid byte",
                    )
                    .with_help("--inputs is a CSV text file: numbers separated by commas, one point per row");
                    emit(&name, &shown, &[d]);
                    return Err(Reported);
                }
            };
            tpc::data::parse_points(prog, &name, text).map_err(|e| {
                emit(&name, text, &[e.diagnostic()]);
                Reported
            })
        }
        None => tpc::data::default_points(prog).ok_or_else(|| {
            fail("this program has inputs: pass points with `--inputs FILE` (CSV, one point per row)")
        }),
    }
}

/// A limit that cannot be computed, reported against the node responsible (or the
/// input declaration of a bad point), with its code.
pub(crate) fn limit_fail(file: &Path, e: &tpc::limit::LimitError) -> Reported {
    let name = file.display().to_string();
    match (e.diagnostic(), read_source(file)) {
        (Some(d), Some(src)) => emit(&name, &src, &[d]),
        _ => {
            eprintln!("error[{}]: no limit: {}", e.code, e.message);
            print_json_error(Some(e.code), &e.message, &[], e.note.as_deref());
        }
    }
    Reported
}

/// Runs `f` with a progress bar on stderr that appears only when stderr is a terminal
/// and the run has taken more than a second (quick runs and pipes stay silent).
pub(crate) fn with_progress<T>(draws: usize, f: impl FnOnce(&(dyn Fn() + Sync)) -> T) -> T {
    with_progress_of(draws, "draws", f)
}

/// [`with_progress`] counting `unit` (e.g. "band pairs").
pub(crate) fn with_progress_of<T>(
    draws: usize,
    unit: &str,
    f: impl FnOnce(&(dyn Fn() + Sync)) -> T,
) -> T {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let tty = std::io::stderr().is_terminal();
    let bar = ProgressBar::with_draw_target(Some(draws as u64), ProgressDrawTarget::hidden());
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{{elapsed_precise}} [{{bar:40}}] {{pos}}/{{len}} {unit}, eta {{eta}}"
    )) {
        bar.set_style(style.progress_chars("=> "));
    }
    let start = std::time::Instant::now();
    let shown = AtomicBool::new(false);
    let tick = || {
        bar.inc(1);
        if tty && !shown.load(Ordering::Relaxed) && start.elapsed().as_secs_f64() > 1.0 {
            shown.store(true, Ordering::Relaxed);
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
    };
    let out = f(&tick);
    bar.finish_and_clear();
    out
}

/// A run that failed (memory, overflow), reported against the node responsible (or
/// the source span the error carries, for nodes of the unrolled training program);
/// a divergence in training also points at the learning rate.
pub(crate) fn run_fail(file: &Path, prog: &Program, e: &tpc::finite::exec::RunError) -> Reported {
    let name = file.display().to_string();
    match (e.diagnostic(prog), read_source(file), e.code) {
        (Some(d), Some(src), _) => emit(&name, &src, &[d]),
        (_, _, Some(code)) => {
            eprintln!("error[{code}]: {}", e.message);
            if let Some(h) = &e.help {
                eprintln!("  = help: {h}");
            }
            print_json_error(Some(code), &e.message, &[], e.help.as_deref());
        }
        _ => {
            eprintln!("error: {}", e.message);
            print_json_error(None, &e.message, &[], e.help.as_deref());
        }
    }
    Reported
}

/// The contents of `path`, reading at most `limit` + 1 bytes (`Read::take`): a file
/// over the limit is refused after that many bytes, so `/dev/zero` fails at once and
/// `/dev/urandom` cannot hang the reader.
pub(crate) fn read_limited(path: &Path, limit: usize) -> Result<Vec<u8>, Reported> {
    use std::io::Read;
    let name = path.display();
    let f = std::fs::File::open(path).map_err(|e| fail(&format!("cannot read `{name}`: {e}")))?;
    let mut bytes = Vec::new();
    f.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(&format!("cannot read `{name}`: {e}")))?;
    if bytes.len() > limit {
        return Err(fail(&format!(
            "`{name}` is larger than {} MiB; tpc reads at most {limit} bytes",
            limit >> 20
        )));
    }
    Ok(bytes)
}

pub(crate) fn print_out(s: &str) -> Result<(), Reported> {
    let mut out = std::io::stdout().lock();
    // A closed pipe (`tpc graph f | head`) is not an error worth a message.
    let _ = out.write_all(s.as_bytes());
    let _ = out.flush();
    Ok(())
}

pub(crate) fn fail(msg: &str) -> Reported {
    eprintln!("error: {msg}");
    print_json_error(None, msg, &[], None);
    Reported
}

/// Streams a JSON report to stdout ([`tpc::report::stream::Node::write_pretty`]): no
/// more memory than a row beyond the matrices themselves.
pub(crate) fn print_stream(tree: &tpc::report::stream::Node<'_>) -> Result<(), Reported> {
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    // A closed pipe is not an error worth a message (as in `print_out`).
    let _ = tree.write_pretty(&mut out);
    let _ = out.flush();
    Ok(())
}

/// After `--out DIR`: the metadata as JSON, or a short list of the files as text.
pub(crate) fn print_saved(
    format: Format,
    dir: &Path,
    meta: &serde_json::Value,
) -> Result<(), Reported> {
    if format == Format::Json {
        let text = serde_json::to_string_pretty(meta)
            .map_err(|e| fail(&format!("cannot write JSON: {e}")))?;
        return print_out(&(text + "\n"));
    }
    let mut s = format!(
        "# wrote into {}: meta.json and NumPy .npy files (float64, row-major; {})\n",
        dir.display(),
        tpc::report::limit::KERNEL_ORDER
    );
    if let Some(files) = meta.get("files").and_then(|f| f.as_object()) {
        for (name, f) in files {
            let shape = f["shape"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join("×")
                })
                .unwrap_or_default();
            s.push_str(&format!(
                "  {name}: {} ({shape})\n",
                f["file"].as_str().unwrap_or("")
            ));
        }
    }
    print_out(&s)
}

/// `--format json` was asked for: failures are also printed as one JSON object on
/// stdout (docs/cli.md, "Errors as JSON").
pub(crate) static JSON_ERRORS: AtomicBool = AtomicBool::new(false);
/// At most one JSON error object per run.
pub(crate) static JSON_ERROR_PRINTED: AtomicBool = AtomicBool::new(false);

/// 1-based line and column (in characters) of byte `at` of `src`.
pub(crate) fn line_column(src: &str, at: usize) -> Option<(usize, usize)> {
    let before = src.get(..at)?;
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Some((line, col))
}

/// One diagnostic as JSON: code, severity, message, file, line, column, span, label,
/// help, notes.
pub(crate) fn diagnostic_json(
    file: Option<&str>,
    src: Option<&str>,
    d: &Diagnostic,
) -> serde_json::Value {
    let (line, column) = src
        .and_then(|s| line_column(s, d.span.start))
        .map_or((None, None), |(l, c)| (Some(l), Some(c)));
    let severity = match d.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
        Severity::Note => "note",
    };
    serde_json::json!({
        "code": d.code,
        "severity": severity,
        "message": d.message,
        "file": file,
        "line": line,
        "column": column,
        "span": [d.span.start, d.span.end],
        "label": d.label,
        "help": d.help,
        "notes": d.notes,
    })
}

/// Under `--format json`, prints `{"error": {...}, "diagnostics": [...]}` on stdout
/// (once per run): the first error diagnostic, else `code` and `message`.
pub(crate) fn print_json_error(
    code: Option<&str>,
    message: &str,
    diags: &[serde_json::Value],
    help: Option<&str>,
) {
    if !JSON_ERRORS.load(Ordering::Relaxed) || JSON_ERROR_PRINTED.swap(true, Ordering::Relaxed) {
        return;
    }
    let error = diags
        .iter()
        .find(|d| d["severity"] == "error")
        .cloned()
        .unwrap_or_else(|| {
            serde_json::json!({"code": code, "severity": "error", "message": message, "help": help})
        });
    let v = serde_json::json!({"error": error, "diagnostics": diags});
    let text = serde_json::to_string_pretty(&v).unwrap_or_default();
    let _ = print_out(&(text + "\n"));
}

/// A program's text as `load` checked it (a leading byte-order mark dropped), so that
/// spans from the program render at the right place.
pub(crate) fn read_source(file: &Path) -> Option<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .ok()?
        .take(tpc::syntax::MAX_SOURCE as u64 + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    let s = String::from_utf8(bytes).ok()?;
    Some(s.strip_prefix('\u{FEFF}').map(str::to_string).unwrap_or(s))
}

/// Reads and checks a file: its display name, text, program (if no error) and diagnostics.
pub(crate) fn load(
    path: &Path,
) -> Result<(String, String, Option<Program>, Vec<Diagnostic>), Reported> {
    let name = path.display().to_string();
    let bytes = read_limited(path, tpc::syntax::MAX_SOURCE)?;
    let (src, prog, diags) = tpc::check_bytes(&bytes);
    Ok((name, src, prog, diags))
}

/// Reads, checks and reports; the program when there was no error.
pub(crate) fn compile_file(path: &Path) -> Result<Program, Reported> {
    let (name, src, prog, diags) = load(path)?;
    emit(&name, &src, &diags);
    prog.ok_or(Reported)
}

/// [`compile_file`] for commands that compute the limit: an expectation that does not
/// exist is then the limit's error (E0031 at the same span), not also a warning.
pub(crate) fn compile_file_for_limit(path: &Path) -> Result<Program, Reported> {
    let (name, src, prog, mut diags) = load(path)?;
    diags.retain(|d| d.is_error() || d.code != tpc::ir::integrability::CODE);
    emit(&name, &src, &diags);
    prog.ok_or(Reported)
}

pub(crate) fn emit(name: &str, src: &str, diags: &[Diagnostic]) {
    if diags.is_empty() {
        return;
    }
    if diags.iter().any(Diagnostic::is_error) {
        let all: Vec<_> = diags
            .iter()
            .map(|d| diagnostic_json(Some(name), Some(src), d))
            .collect();
        print_json_error(None, "", &all, None);
    }
    let choice = if std::io::stderr().is_terminal() {
        ColorChoice::Auto
    } else {
        ColorChoice::Never
    };
    let mut err = StandardStream::stderr(choice);
    Renderer::new(name, src).emit(&mut err, diags);
}
