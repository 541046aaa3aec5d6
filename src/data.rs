//! Input points: the `--inputs` CSV of cli.md (one point per row, no header; for a
//! sequence input `x : d [T]` a row has T*d numbers, time-major).

use crate::ir::Program;

/// A problem with the points file, naming the place.
#[derive(Clone, Debug, PartialEq)]
pub struct DataError(pub String);

impl std::fmt::Display for DataError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
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

/// Parses CSV text into rows of `row_len(prog)` finite numbers.
pub fn parse_points(prog: &Program, name: &str, text: &str) -> Result<Vec<Vec<f64>>, DataError> {
    let want = row_len(prog);
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut row = Vec::with_capacity(want);
        let mut col = 1;
        for field in line.split(',') {
            let f = field.trim();
            match f.parse::<f64>() {
                Ok(v) if v.is_finite() => row.push(v),
                Ok(_) => {
                    return Err(DataError(format!(
                        "{name}:{}:{col}: `{f}` is not a finite number",
                        i + 1
                    )))
                }
                Err(_) => {
                    return Err(DataError(format!(
                        "{name}:{}:{col}: `{f}` is not a number",
                        i + 1
                    )))
                }
            }
            col += field.len() + 1;
        }
        if row.len() != want {
            let what: Vec<String> = prog
                .inputs
                .iter()
                .map(|d| match d.len {
                    None => format!("{} ({} numbers)", d.name, d.dim),
                    Some(t) => format!("{} ({t} x {} numbers, time-major)", d.name, d.dim),
                })
                .collect();
            return Err(DataError(format!(
                "{name}:{}:1: the row has {} numbers; the program's inputs need {want}: {}",
                i + 1,
                row.len(),
                what.join(", ")
            )));
        }
        rows.push(row);
    }
    if rows.is_empty() && want > 0 {
        return Err(DataError(format!("{name}: no points")));
    }
    if rows.len() > 100_000 {
        return Err(DataError(format!(
            "{name}: {} points; tpc takes at most 100000",
            rows.len()
        )));
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
