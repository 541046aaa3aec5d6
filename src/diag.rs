//! Diagnostics: errors, warnings and notes with a code, a labelled span and a help line,
//! rendered like rustc's by codespan-reporting.
//!
//! Every problem tpc finds in a user's program or data is a [`Diagnostic`]; nothing in
//! the front end panics or prints on its own. The codes are stable (scripts and the
//! README's table refer to them); [`CODES`] is the one list of them.

use codespan_reporting::diagnostic::{Diagnostic as CsDiagnostic, Label, Severity as CsSeverity};
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term::{self, termcolor};

use crate::ir::Span;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Note,
    Warning,
    Error,
}

/// One finding, attached to the source.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    /// The primary span and its label.
    pub span: Span,
    pub label: String,
    /// Further spans that explain the finding.
    pub secondary: Vec<(Span, String)>,
    pub help: Option<String>,
    pub notes: Vec<String>,
}

/// One line, `error[E0004]: undefined name `x``: the message without the source; render
/// with [`Renderer`] (or [`crate::Error`]) to show the span and help.
impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Note => "note",
        };
        write!(f, "{sev}[{}]: {}", self.code, self.message)
    }
}

impl std::error::Error for Diagnostic {}

impl Diagnostic {
    pub fn error(
        code: &'static str,
        message: impl Into<String>,
        span: Span,
        label: impl Into<String>,
    ) -> Self {
        Diagnostic {
            severity: Severity::Error,
            code,
            message: message.into(),
            span,
            label: label.into(),
            secondary: Vec::new(),
            help: None,
            notes: Vec::new(),
        }
    }
    pub fn warning(
        code: &'static str,
        message: impl Into<String>,
        span: Span,
        label: impl Into<String>,
    ) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(code, message, span, label)
        }
    }
    pub fn note_diag(
        code: &'static str,
        message: impl Into<String>,
        span: Span,
        label: impl Into<String>,
    ) -> Self {
        Diagnostic {
            severity: Severity::Note,
            ..Diagnostic::error(code, message, span, label)
        }
    }
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }
    pub fn with_secondary(mut self, span: Span, label: impl Into<String>) -> Self {
        self.secondary.push((span, label.into()));
        self
    }
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    fn to_codespan(&self) -> CsDiagnostic<()> {
        let sev = match self.severity {
            Severity::Error => CsSeverity::Error,
            Severity::Warning => CsSeverity::Warning,
            Severity::Note => CsSeverity::Note,
        };
        let mut labels = vec![Label::primary((), self.span.range()).with_message(&self.label)];
        for (s, l) in &self.secondary {
            labels.push(Label::secondary((), s.range()).with_message(l));
        }
        let mut notes: Vec<String> = self.help.iter().map(|h| format!("help: {h}")).collect();
        notes.extend(self.notes.iter().map(|n| format!("note: {n}")));
        CsDiagnostic::new(sev)
            .with_code(self.code)
            .with_message(&self.message)
            .with_labels(labels)
            .with_notes(notes)
    }
}

/// Longest source line quoted in a diagnostic.
const MAX_SHOWN_LINE: usize = 1000;

/// Renders diagnostics for one source file.
pub struct Renderer<'a> {
    file: SimpleFile<&'a str, std::borrow::Cow<'a, str>>,
}

impl<'a> Renderer<'a> {
    /// The source is shown through [`displayable`]: same bytes offsets, visible lines.
    pub fn new(name: &'a str, source: &'a str) -> Self {
        let shown = if source
            .chars()
            .any(|c| c != '\n' && c != '\t' && is_invisible(c))
        {
            std::borrow::Cow::Owned(displayable(source))
        } else {
            std::borrow::Cow::Borrowed(source)
        };
        Renderer {
            file: SimpleFile::new(name, shown),
        }
    }

    /// Plain text (no colour): what tests snapshot and what goes to a pipe.
    pub fn render(&self, diags: &[Diagnostic]) -> String {
        let mut buf = termcolor::NoColor::new(Vec::new());
        self.emit(&mut buf, diags);
        String::from_utf8_lossy(&buf.into_inner()).into_owned()
    }

    /// To a terminal or a pipe, in colour when `color` is set.
    pub fn emit(&self, w: &mut dyn termcolor::WriteColor, diags: &[Diagnostic]) {
        let config = term::Config::default();
        for d in diags {
            let mut d = d.clone();
            // codespan needs spans inside the file; clamp defensively.
            let src: &str = self.file.source();
            let len = src.len();
            d.span = Span::new(
                d.span.start.min(len),
                d.span.end.min(len).max(d.span.start.min(len)),
            );
            for (s, _) in &mut d.secondary {
                *s = Span::new(s.start.min(len), s.end.min(len).max(s.start.min(len)));
            }
            let mut cs = d.to_codespan();
            // Lines too long to show (generated or hostile input): give the position only.
            let line_start = src[..d.span.start].rfind('\n').map_or(0, |i| i + 1);
            let line_end = src[d.span.start..]
                .find('\n')
                .map_or(src.len(), |i| d.span.start + i);
            if line_end - line_start > MAX_SHOWN_LINE {
                let line = src[..d.span.start].matches('\n').count() + 1;
                let col = src[line_start..d.span.start].chars().count() + 1;
                cs.labels.clear();
                cs.notes.insert(
                    0,
                    format!(
                        "at {}:{line}:{col}: {} (line too long to show)",
                        self.file.name(),
                        d.label
                    ),
                );
            }
            let _ = term::emit_to_write_style(w, &config, &self.file, &cs);
        }
    }
}

/// Every diagnostic code, with a one-line meaning (the README's table is made from this).
pub const CODES: &[(&str, &str)] = &[
    ("E0001", "syntax error"),
    ("E0002", "the file is not valid UTF-8 text"),
    ("E0003", "nesting too deep or expression too large"),
    ("E0004", "undefined name"),
    ("E0005", "duplicate definition"),
    ("E0006", "name used before it is defined"),
    ("E0007", "a definition refers to itself"),
    ("E0008", "shape mismatch in a matrix product"),
    (
        "E0009",
        "an output must be a finite readout `v @ x` (plus scalar biases)",
    ),
    ("E0010", "transpose of a matrix where it has no meaning"),
    ("E0011", "bad exponent in a law"),
    (
        "E0012",
        "bad law: negative variance, nonzero mean or unknown distribution",
    ),
    ("E0013", "unknown function"),
    ("E0014", "loop bound or index is not a defined integer"),
    ("E0015", "loop bound or index out of range"),
    ("E0016", "program would exceed the instruction limit"),
    ("E0017", "training data of the wrong dimension"),
    ("E0018", "missing or repeated `width`"),
    ("E0019", "unknown parameterization"),
    (
        "E0020",
        "type error: a value used where another kind is needed",
    ),
    ("E0021", "malformed `train` block"),
    ("E0022", "invalid shape"),
    ("E0023", "unknown key in a preset law"),
    ("E0024", "arithmetic overflow or invalid number"),
    ("E0025", "indexing mismatch"),
    ("E0026", "malformed `observe`"),
    ("E0027", "a statement that is not allowed here"),
    ("E0028", "bad input data (`--inputs`)"),
    (
        "E0030",
        "the limit engine cannot compute this program's limit",
    ),
    (
        "E0031",
        "a Gaussian expectation the limit needs does not exist (a pole where a Gaussian has density, or growth like exp(c z^2) or faster)",
    ),
    (
        "E0032",
        "a limit quantity is not finite (overflow or NaN)",
    ),
    ("E0033", "an input point is not finite or has the wrong length"),
    (
        "E0034",
        "a parameter law's variance overflows f64 in the limit",
    ),
    (
        "E0035",
        "training diverges at finite width: values overflow (the learning rate is too large for this width)",
    ),
    (
        "E0036",
        "a result cannot be reported: a mean, standard error or fitted size is infinite, NaN or beyond ±1e150",
    ),
    (
        "E0037",
        "the run does not fit in memory (points × width × draws); the message says what fits",
    ),
    (
        "E0041",
        "a moment of a scalar: `mean` of an expression with no width-n vector",
    ),
    ("E0042", "a reduction (`sum`, `softmax`) over an empty range"),
    ("E0043", "a scalar is used where a width-n vector is required"),
    ("E0044", "a width-n vector is used where a scalar is required"),
    (
        "E0051",
        "unknown optimizer, wrong number of arguments, or `weight_decay` with `adamw`",
    ),
    (
        "E0052",
        "an optimizer hyperparameter out of range: β outside [0, 1), ε ≤ 0, a negative weight decay, or not a monomial in the width",
    ),
    ("E0053", "`batch` is zero or larger than the training data"),
    ("W0001", "parameter is never used"),
    ("W0002", "value is computed but never used"),
    (
        "W0003",
        "`sqrt`, `log` or a fractional power of a scalar that can be negative (or zero)",
    ),
    ("W0101", "parameterization blows up at initialization"),
    ("W0102", "parameterization vanishes at initialization"),
    (
        "W0103",
        "training blows up (learning rate too large for the width)",
    ),
    ("W0104", "training is trivial in the limit (nothing moves)"),
    (
        "W0105",
        "training diverges at finite width (|f_t| grows a millionfold past f_0 and the targets)",
    ),
    (
        "W0106",
        "an attention logit (a moment `mean(q * k)` of two vectors) moves by more than Θ(1) after one training step (1/√n logits under muP)",
    ),
    ("N0101", "kernel regime: features do not move in the limit"),
    ("N0102", "feature learning"),
    (
        "W0107",
        "training blows up under an entrywise optimizer (Adam moves every entry by Θ(lr) whatever the gradient's size)",
    ),
    (
        "W0108",
        "muP's learning rate for SGD used with Adam (muP for Adam: hidden and readout lr Θ(1/n))",
    ),
    (
        "W0109",
        "Adam's ε is larger than the gradient entries it is added to and freezes a layer as n grows",
    ),
];

/// `text` as a diagnostic shows it, with every byte offset unchanged: a CR not followed by
/// LF (old Mac line ending) becomes LF, since codespan splits lines at LF only; every
/// other invisible character (byte-order mark, zero-width space, control character;
/// not tab, LF or the CR of CRLF) becomes one visible character of the same UTF-8
/// length (`?`, `·`, `�`, `🗵`), so the snippet never quotes it raw and the caret
/// stays under it.
pub fn displayable(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    for (i, c) in text.char_indices() {
        match c {
            '\r' if b.get(i + 1) == Some(&b'\n') => out.push(c),
            '\r' => out.push('\n'),
            '\n' | '\t' => out.push(c),
            c if is_invisible(c) => out.push(match c.len_utf8() {
                1 => '?',
                2 => '\u{00B7}',
                3 => '\u{FFFD}',
                _ => '\u{1F5F5}',
            }),
            c => out.push(c),
        }
    }
    out
}

/// Whether `c` prints as nothing, or as a blank other than the ASCII space: control
/// characters, Unicode format characters (byte-order mark, zero-width spaces and joiners,
/// bidirectional controls), variation selectors, and non-ASCII spaces. A diagnostic that
/// quoted one raw would show an empty or misleading quote.
pub fn is_invisible(c: char) -> bool {
    c.is_control()
        || (c.is_whitespace() && c != ' ')
        || matches!(c,
            '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}'
            | '\u{17B5}' | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}' | '\u{FFF0}'..='\u{FFFB}'
            | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E0FFF}')
}

/// User text for a diagnostic message: quoted in backticks, with every invisible
/// character written as its code point (`U+FEFF`); a text that is one invisible character
/// is named as such.
pub fn quote(text: &str) -> String {
    let mut chars = text.chars();
    if let (Some(c), None) = (chars.next(), chars.next()) {
        if is_invisible(c) {
            return format!("the invisible character U+{:04X}", c as u32);
        }
    }
    let mut s = String::with_capacity(text.len() + 2);
    s.push('`');
    for c in text.chars() {
        if is_invisible(c) {
            s.push_str(&format!("<U+{:04X}>", c as u32));
        } else {
            s.push(c);
        }
    }
    s.push('`');
    s
}

/// The closest name to `name` among `candidates`, if reasonably close (for "did you mean").
pub fn nearest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = osa_distance(name, c);
        let (la, lb) = (name.chars().count(), c.chars().count());
        if d <= (la.max(lb) / 3).max(1) && d < la.min(lb) && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Edit distance counting a swap of neighbours as one edit (`tahn` -> `tanh`).
fn osa_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_suggests_close_names_only() {
        assert_eq!(nearest("tahn", ["tanh", "relu", "erf"]), Some("tanh"));
        assert_eq!(nearest("rleu", ["tanh", "relu", "erf"]), Some("relu"));
        assert_eq!(nearest("softplus", ["tanh", "relu", "erf"]), None);
        assert_eq!(nearest("mpu", ["sp", "ntk", "mup"]), Some("mup"));
        assert_eq!(nearest("T", ["x", "W"]), None);
    }

    #[test]
    fn quotes_show_invisible_characters_by_code_point() {
        assert_eq!(quote("relu"), "`relu`");
        assert_eq!(quote("\u{FEFF}"), "the invisible character U+FEFF");
        assert_eq!(quote("\u{200B}"), "the invisible character U+200B");
        assert_eq!(quote("\r"), "the invisible character U+000D");
        assert_eq!(quote("1.0\u{00A0}"), "`1.0<U+00A0>`");
        assert_eq!(quote("é"), "`é`");
        assert!(!is_invisible('x') && !is_invisible(' ') && !is_invisible('∞'));
    }

    #[test]
    fn the_shown_source_keeps_every_offset() {
        let src = "a\rb\r\nc\u{FEFF}d\u{200B}\u{00A0}\u{0007}\te\u{E0041}\n";
        let shown = displayable(src);
        assert_eq!(shown, "a\nb\r\nc\u{FFFD}d\u{FFFD}\u{00B7}?\te\u{1F5F5}\n");
        assert_eq!(shown.len(), src.len());
        let offsets = |s: &str| s.char_indices().map(|(i, _)| i).collect::<Vec<_>>();
        assert_eq!(offsets(&shown), offsets(src));
    }

    #[test]
    fn codes_are_unique() {
        let mut c: Vec<&str> = CODES.iter().map(|c| c.0).collect();
        c.sort();
        c.dedup();
        assert_eq!(c.len(), CODES.len());
    }
}
