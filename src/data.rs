//! Input points: the `--inputs` CSV of cli.md (one point per row, no header; for a
//! sequence input `x : d [T]` a row has T*d numbers, time-major).

use crate::diag::{quote, Diagnostic};
use crate::ir::{Program, Span};

/// A problem with the points file: what is wrong, where (`file:line:col`, 1-based, in
/// characters), and the byte span of the offending text, for an E0028 diagnostic
/// rendered against the file.
#[derive(Clone, Debug, PartialEq)]
pub struct DataError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub what: String,
    pub span: Span,
    pub label: String,
    pub help: String,
}

impl std::fmt::Display for DataError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.what)
        } else {
            write!(f, "{}:{}:{}: {}", self.file, self.line, self.col, self.what)
        }
    }
}

impl DataError {
    /// The E0028 diagnostic; its span is in the CSV text given to [`parse_points`], and
    /// the rendering shows the place, so the message does not repeat it.
    pub fn diagnostic(&self) -> Diagnostic {
        Diagnostic::error("E0028", self.what.clone(), self.span, self.label.clone())
            .with_help(self.help.clone())
    }
}

impl std::error::Error for DataError {}

/// The most points tpc takes in one call.
pub const MAX_POINTS: usize = 100_000;

/// What a point of `prog` consists of, in words: `x (2 numbers), s (3 x 1 numbers,
/// time-major)`, or that the program has no inputs.
pub fn needs(prog: &Program) -> String {
    if prog.inputs.is_empty() {
        return "empty: the program has no `input`".to_string();
    }
    let what: Vec<String> = prog
        .inputs
        .iter()
        .map(|d| match d.len {
            None => format!("{} ({} numbers)", d.name, d.dim),
            Some(t) => format!("{} ({t} x {} numbers, time-major)", d.name, d.dim),
        })
        .collect();
    what.join(", ")
}

/// The largest `--inputs` file read, in bytes: 64 MiB holds the 10^5 points
/// [`parse_points`] accepts at ~30 numbers a row, or 10^4 points of a 28×28 image.
/// The reader stops one byte past it, so a device (`/dev/zero`, `/dev/urandom`) is
/// refused after 64 MiB instead of being read to exhaustion.
pub const MAX_BYTES: usize = 64 << 20;

/// Numbers per row that the program's inputs need.
pub fn row_len(prog: &Program) -> usize {
    prog.inputs.iter().map(|i| i.row_len()).sum()
}

/// The lines of `text` with their byte offsets, split at LF, CRLF or a lone CR (old Mac
/// files), without their line ending; a leading UTF-8 byte-order mark is skipped.
fn lines_with_offsets(text: &str) -> Vec<(usize, &str)> {
    let start = if text.starts_with('\u{FEFF}') { 3 } else { 0 };
    let b = text.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut line_start) = (start, start);
    while i < b.len() {
        match b[i] {
            b'\n' => {
                out.push((line_start, &text[line_start..i]));
                line_start = i + 1;
            }
            b'\r' => {
                out.push((line_start, &text[line_start..i]));
                if b.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                line_start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if line_start < b.len() {
        out.push((line_start, &text[line_start..]));
    }
    out
}

/// The numbers of one CSV line (`raw`, starting at byte `at` of `text`, line `i` from
/// 0), each finite; errors point at the field.
fn parse_row(
    name: &str,
    text: &str,
    i: usize,
    at: usize,
    raw: &str,
) -> Result<Vec<f64>, Box<DataError>> {
    let mut row = Vec::new();
    let mut off = at;
    for field in raw.split(',') {
        let f = field.trim();
        let lead = field.len() - field.trim_start().len();
        let span = Span::new(off + lead, off + lead + f.len());
        let err = |what: &str, label: &str, help: &str| DataError {
            file: name.to_string(),
            line: i + 1,
            col: text[at..span.start].chars().count() + 1,
            what: format!("{} {what}", quote(f)),
            span,
            label: label.into(),
            help: help.into(),
        };
        match f.parse::<f64>() {
            Ok(v) if v.is_finite() => row.push(v),
            Ok(_) => {
                return Err(Box::new(err(
                    "is not a finite number",
                    "not finite",
                    "input points are finite numbers; NaN and infinities have no limit or run",
                )))
            }
            Err(_) => {
                return Err(Box::new(err(
                    "is not a number",
                    "not a number",
                    "a row is numbers separated by commas, one point per row, no header",
                )))
            }
        }
        off += field.len() + 1;
    }
    Ok(row)
}

/// Parses a CSV of targets (`tpc predict --targets`): `rows` rows (one per training
/// point) of equally many finite numbers. Spans are byte offsets into `text`.
pub fn parse_targets(name: &str, text: &str, rows: usize) -> Result<Vec<Vec<f64>>, Box<DataError>> {
    let mut out: Vec<Vec<f64>> = Vec::new();
    let mut last = (0, Span::new(0, 0));
    for (i, (at, raw)) in lines_with_offsets(text).into_iter().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let row = parse_row(name, text, i, at, raw)?;
        let lead = raw.len() - raw.trim_start().len();
        let span = Span::new(at + lead, at + lead + line.len());
        if let Some(first) = out.first() {
            if row.len() != first.len() {
                return Err(Box::new(DataError {
                    file: name.to_string(),
                    line: i + 1,
                    col: raw[..lead].chars().count() + 1,
                    what: format!(
                        "the row has {} numbers; the first row has {}",
                        row.len(),
                        first.len()
                    ),
                    span,
                    label: format!("{} numbers", row.len()),
                    help: "every row holds the targets of one training point: one number per \
                           output (or per class)"
                        .into(),
                }));
            }
        }
        last = (i + 1, span);
        out.push(row);
    }
    if out.len() != rows {
        return Err(Box::new(DataError {
            file: name.to_string(),
            line: last.0,
            col: if last.0 == 0 { 0 } else { 1 },
            what: format!("{} rows of targets for {rows} training points", out.len()),
            span: last.1,
            label: "last row".into(),
            help: "give one row of targets per training point, in the same order".into(),
        }));
    }
    Ok(out)
}

/// Parses CSV text into rows of `row_len(prog)` finite numbers. Spans in a
/// [`DataError`] are byte offsets into `text`.
pub fn parse_points(
    prog: &Program,
    name: &str,
    text: &str,
) -> Result<Vec<Vec<f64>>, Box<DataError>> {
    let want = row_len(prog);
    let mut rows = Vec::new();
    let whole = Span::new(0, 0);
    for (i, (at, raw)) in lines_with_offsets(text).into_iter().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let row = parse_row(name, text, i, at, raw)?;
        if row.len() != want {
            let what = needs(prog);
            let lead = raw.len() - raw.trim_start().len();
            let numbers = |k: usize| format!("{k} number{}", if k == 1 { "" } else { "s" });
            return Err(Box::new(DataError {
                file: name.to_string(),
                line: i + 1,
                col: raw[..lead].chars().count() + 1,
                what: if want == 0 {
                    format!(
                        "the row has {}, but the program has no `input`",
                        numbers(row.len())
                    )
                } else {
                    format!(
                        "the row has {}; the program's inputs need {want}: {}",
                        numbers(row.len()),
                        what
                    )
                },
                span: Span::new(at + lead, at + lead + line.len()),
                label: numbers(row.len()),
                help: if want == 0 {
                    "omit --inputs: the program has no `input`".into()
                } else {
                    format!("each row holds {}: {}", numbers(want), what)
                },
            }));
        }
        rows.push(row);
    }
    if rows.is_empty() && want > 0 {
        return Err(Box::new(DataError {
            file: name.to_string(),
            line: 0,
            col: 0,
            what: "no points".into(),
            span: whole,
            label: "no rows".into(),
            help: "write one point per row, numbers separated by commas".into(),
        }));
    }
    if rows.len() > MAX_POINTS {
        return Err(Box::new(DataError {
            file: name.to_string(),
            line: 0,
            col: 0,
            what: format!("{} points; tpc takes at most {MAX_POINTS}", rows.len()),
            span: whole,
            label: "too many rows".into(),
            help: "use fewer points".into(),
        }));
    }
    Ok(rows)
}

/// The points to use when `--inputs` is omitted: the training points, or one empty point
/// for programs without inputs.
pub fn default_points(prog: &Program) -> Option<Vec<Vec<f64>>> {
    if prog.inputs.is_empty() {
        return Some(vec![vec![]]);
    }
    prog.train
        .as_ref()
        .map(|t| t.data.iter().map(|s| s.x.clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_input(dim: usize) -> Program {
        let src = format!(
            "width n\ninput x : {dim}\nparam U : n x {dim}\nparam v : 1 x n\noutput f = v @ relu(U @ x)\n"
        );
        crate::compile(&src).unwrap()
    }

    #[test]
    fn every_line_ending_and_a_byte_order_mark_are_read() {
        let p = one_input(2);
        let want = vec![vec![1.0, 2.0], vec![3.0, -4.5]];
        for text in [
            "1,2\n3,-4.5\n",
            "1,2\r\n3,-4.5\r\n",
            "1,2\r3,-4.5\r",
            "1,2\r3,-4.5",
            "\u{FEFF}1,2\n3,-4.5",
            "\u{FEFF}1, 2\r3 ,-4.5\r\n",
        ] {
            assert_eq!(parse_points(&p, "X", text).unwrap(), want, "{text:?}");
        }
    }

    #[test]
    fn errors_point_at_the_field_and_show_invisible_characters() {
        let p = one_input(2);
        let text = "1,2\r3, nan\n";
        let e = parse_points(&p, "X", text).unwrap_err();
        assert_eq!(&text[e.span.range()], "nan");
        assert_eq!(e.to_string(), "X:2:4: `nan` is not a finite number");
        let text = "1,2\n3,4\u{200B}\n";
        let e = parse_points(&p, "X", text).unwrap_err();
        assert_eq!(&text[e.span.range()], "4\u{200B}");
        assert_eq!(e.to_string(), "X:2:3: `4<U+200B>` is not a number");
        let text = "1,2\n\u{FEFF}3,4\n";
        let e = parse_points(&p, "X", text).unwrap_err();
        assert_eq!(e.to_string(), "X:2:1: `<U+FEFF>3` is not a number");
        let text = "1,2\n  3,4,5\n";
        let e = parse_points(&p, "X", text).unwrap_err();
        assert_eq!(&text[e.span.range()], "3,4,5");
        assert_eq!(e.to_string().split(": the").next(), Some("X:2:3"));
        assert_eq!(e.diagnostic().code, "E0028");
    }
}
