//! The `train` block: loss, learning rate and per-parameter multipliers, data and
//! steps (language.md, Training), checked and recorded on the program for autodiff
//! to unroll.

use std::collections::HashMap;

use super::{input_help, Lowerer, MAX_STEPS};
use crate::diag::{nearest, Diagnostic};
use crate::ir::{InputDecl, Loss, Sample, Span, Train};
use crate::syntax::{self, TrainValue};

impl<'a> Lowerer<'a> {
    pub(super) fn train(&mut self, t: &syntax::TrainBlock) {
        let mut loss = None;
        let mut lr = None;
        let mut steps = None;
        let mut data = None;
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for e in &t.entries {
            let key = e.key.name.as_str();
            if let Some(prev) = seen.insert(key, e.key.span) {
                self.err(
                    Diagnostic::error(
                        "E0005",
                        format!("`{key}` is set twice in `train`"),
                        e.key.span,
                        "set again here",
                    )
                    .with_secondary(prev, "first set here")
                    .with_help("keep one value"),
                );
                continue;
            }
            match (key, &e.value) {
                ("loss", TrainValue::Expr(ex)) => match &ex.kind {
                    syntax::ExprKind::Name { name, index } if index.is_empty() => {
                        match name.name.as_str() {
                            "mse" => loss = Some(Loss::Mse),
                            "xent" => loss = Some(Loss::Xent),
                            other => self.err(
                                Diagnostic::error(
                                    "E0021",
                                    format!("unknown loss `{other}`"),
                                    name.span,
                                    "not a loss",
                                )
                                .with_help("losses are `mse` and `xent`"),
                            ),
                        }
                    }
                    _ => self.err(
                        Diagnostic::error(
                            "E0021",
                            "`loss` must be `mse` or `xent`",
                            ex.span,
                            "not a loss name",
                        )
                        .with_help("write `loss = mse`"),
                    ),
                },
                ("lr", TrainValue::Expr(ex)) => {
                    if let Some(v) = self.eval_num(ex) {
                        if v > 0.0 && v.is_finite() {
                            lr = Some((v, ex.span));
                        } else {
                            self.err(
                                Diagnostic::error(
                                    "E0021",
                                    format!("the learning rate must be a positive finite number, found {v}"),
                                    ex.span,
                                    "not positive",
                                )
                                .with_help("write e.g. `lr = 0.1`"),
                            );
                        }
                    }
                }
                ("steps", TrainValue::Expr(ex)) => {
                    if let Some(v) = self.eval_int(ex) {
                        if (0..=MAX_STEPS as i64).contains(&v) {
                            steps = Some(v as usize);
                        } else {
                            self.err(
                                Diagnostic::error(
                                    "E0015",
                                    format!("`steps` must be between 0 and {MAX_STEPS}, found {v}"),
                                    ex.span,
                                    "out of range",
                                )
                                .with_help("training is unrolled into the program; keep it short"),
                            );
                        }
                    }
                }
                ("data", TrainValue::Data(samples, span)) => data = Some((samples, *span)),
                ("loss" | "lr" | "steps" | "data", _) => self.err(
                    Diagnostic::error(
                        "E0021",
                        format!("`{key}` has the wrong kind of value"),
                        e.span,
                        "here",
                    )
                    .with_help(
                        "`loss = mse`, `lr = 0.5`, `steps = 3`, `data = [ ([1.0, 0.0], 1.0), .. ]`",
                    ),
                ),
                (other, _) => {
                    let s = nearest(other, ["loss", "lr", "steps", "data"]);
                    self.err(
                        Diagnostic::error(
                            "E0021",
                            format!("unknown key `{other}` in `train`"),
                            e.key.span,
                            "unknown key",
                        )
                        .with_help(match s {
                            Some(s) => {
                                format!("did you mean `{s}`? keys are loss, lr, steps and data")
                            }
                            None => "keys are loss, lr, steps and data".to_string(),
                        }),
                    );
                }
            }
        }
        let unknown_key = t
            .entries
            .iter()
            .any(|e| !matches!(e.key.name.as_str(), "loss" | "lr" | "steps" | "data"));
        let mut missing = Vec::new();
        if loss.is_none() && !seen.contains_key("loss") {
            missing.push("loss");
        }
        if lr.is_none() && !seen.contains_key("lr") {
            missing.push("lr");
        }
        if steps.is_none() && !seen.contains_key("steps") {
            missing.push("steps");
        }
        if data.is_none() && !seen.contains_key("data") {
            missing.push("data");
        }
        // A misspelt key is already reported; do not also call the key missing.
        if !missing.is_empty() && !unknown_key {
            self.err(
                Diagnostic::error(
                    "E0021",
                    format!("`train` is missing {}", missing.join(", ")),
                    t.span,
                    "incomplete",
                )
                .with_help("a train block sets loss, lr, steps and data"),
            );
        }
        let row: usize = self.prog.inputs.iter().map(InputDecl::row_len).sum();
        let outs = self.outputs.len();
        if outs == 0 {
            self.err(
                Diagnostic::error(
                    "E0021",
                    "`train` needs an `output` to fit",
                    t.span,
                    "nothing to train",
                )
                .with_help("declare `output f = v @ x`"),
            );
            return;
        }
        let (Some(loss), Some((lr, lr_span)), Some(steps), Some((samples, dspan))) =
            (loss, lr, steps, data)
        else {
            return;
        };
        if samples.is_empty() {
            self.err(
                Diagnostic::error("E0021", "the training data is empty", dspan, "no samples")
                    .with_help("give at least one `([x..], y)`"),
            );
            return;
        }
        let mut ok = true;
        for s in samples.iter() {
            if s.x.len() != row {
                ok = false;
                self.err(
                    Diagnostic::error(
                        "E0017",
                        format!(
                            "a training input has {} numbers, the program's inputs need {row}",
                            s.x.len()
                        ),
                        s.x_span,
                        format!("expected {row} numbers"),
                    )
                    .with_help(input_help(&self.prog.inputs)),
                );
            }
            if s.y.len() != outs {
                ok = false;
                self.err(
                    Diagnostic::error(
                        "E0017",
                        format!(
                            "a training target has {} numbers, the program has {outs} output(s)",
                            s.y.len()
                        ),
                        s.y_span,
                        format!("expected {outs} target(s)"),
                    )
                    .with_help("give one target per output, in output order"),
                );
            }
            if loss == Loss::Xent && s.y.iter().any(|&y| y != 0.0 && y != 1.0) {
                ok = false;
                self.err(
                    Diagnostic::error(
                        "E0017",
                        "`xent` targets must be 0 or 1",
                        s.y_span,
                        "not 0 or 1",
                    )
                    .with_help("use `loss = mse` for real-valued targets"),
                );
            }
        }
        if ok {
            self.prog.train = Some(Train {
                loss,
                lr,
                steps,
                data: samples
                    .iter()
                    .map(|s| Sample {
                        x: s.x.clone(),
                        y: s.y.clone(),
                    })
                    .collect(),
                span: t.span,
                lr_span,
            });
        }
    }
}
