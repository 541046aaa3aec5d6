//! The `train` block: loss, learning rate and per-parameter multipliers, data and
//! steps (language.md, Training), and the optimizer, weight decay and minibatch size
//! (README, "Training: optimizers"), checked and recorded on the program for autodiff
//! to unroll.

use std::collections::HashMap;

use super::{input_help, Lowerer, MAX_STEPS};
use crate::diag::{nearest, Diagnostic};
use crate::ir::{InputDecl, Loss, Monomial, Optimizer, Rational, Sample, Span, Train};
use crate::syntax::{self, TrainValue};

impl<'a> Lowerer<'a> {
    pub(super) fn train(&mut self, t: &syntax::TrainBlock) {
        let mut loss = None;
        let mut lr = None;
        let mut lr_exp = Rational::ZERO;
        let mut steps = None;
        let mut data = None;
        let mut optimizer = None;
        let mut weight_decay = None;
        let mut batch = None;
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
                // a number, or a monomial in the width (`0.1 * n^(-1)`, README "Training:
                // optimizers"): the power of n joins every parameter's lr multiplier
                ("lr", TrainValue::Expr(ex)) => {
                    if let Some(m) = self.mono_of(ex) {
                        let v = m.coef;
                        if v > 0.0 && v.is_finite() {
                            lr = Some((v, ex.span));
                            lr_exp = m.exp;
                        } else {
                            self.err(
                                Diagnostic::error(
                                    "E0021",
                                    format!("the learning rate must be a positive finite number, found {v}"),
                                    ex.span,
                                    "not positive",
                                )
                                .with_help("write e.g. `lr = 0.1` or `lr = 0.1 * n^(-1)`"),
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
                ("optimizer", TrainValue::Expr(ex)) => {
                    optimizer = self.optimizer(ex).map(|o| (o, ex.span));
                }
                ("weight_decay", TrainValue::Expr(ex)) => {
                    weight_decay = self
                        .hyper_mono(ex, "weight_decay", false)
                        .map(|m| (m, e.key.span));
                }
                ("batch", TrainValue::Expr(ex)) => {
                    if let Some(v) = self.eval_int(ex) {
                        batch = Some((v, ex.span));
                    }
                }
                ("loss" | "lr" | "steps" | "data" | "optimizer" | "weight_decay" | "batch", _) => self.err(
                    Diagnostic::error(
                        "E0021",
                        format!("`{key}` has the wrong kind of value"),
                        e.span,
                        "here",
                    )
                    .with_help(
                        "`loss = mse`, `lr = 0.5`, `steps = 3`, `data = [ ([1.0, 0.0], 1.0), .. ]`, \
                         `optimizer = adam(0.9, 0.999, 1e-8)`, `weight_decay = 0.01`, `batch = 2`",
                    ),
                ),
                (other, _) => {
                    let s = nearest(other, KEYS);
                    self.err(
                        Diagnostic::error(
                            "E0021",
                            format!("unknown key `{other}` in `train`"),
                            e.key.span,
                            "unknown key",
                        )
                        .with_help(match s {
                            Some(s) => {
                                format!("did you mean `{s}`? {KEYS_HELP}")
                            }
                            None => KEYS_HELP.to_string(),
                        }),
                    );
                }
            }
        }
        let unknown_key = t
            .entries
            .iter()
            .any(|e| !KEYS.contains(&e.key.name.as_str()));
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
        let d = samples.len();
        let batch = match batch {
            None => d,
            Some((b, span)) => {
                if b < 1 || b as usize > d {
                    ok = false;
                    self.err(
                        Diagnostic::error(
                            "E0053",
                            if b < 1 {
                                format!(
                                    "a minibatch needs at least one sample, found `batch = {b}`"
                                )
                            } else {
                                format!("`batch = {b}` is larger than the {d} training sample(s)")
                            },
                            span,
                            format!("must be between 1 and {d}"),
                        )
                        .with_help(format!(
                            "step t trains on samples (t·B + j) mod {d}, j = 0..B; `batch = {d}` \
                             (or no `batch`) is the full batch"
                        )),
                    );
                }
                b.clamp(1, d as i64) as usize
            }
        };
        let (optimizer, optimizer_span) = optimizer.unwrap_or((Optimizer::Sgd, t.span));
        let weight_decay = match (weight_decay, optimizer) {
            (Some((_, span)), Optimizer::AdamW { .. }) => {
                ok = false;
                self.err(
                    Diagnostic::error(
                        "E0051",
                        "`weight_decay` with `adamw`: AdamW's decay is its fourth argument",
                        span,
                        "an L2 term on top of AdamW's decoupled decay",
                    )
                    .with_secondary(optimizer_span, "AdamW set here")
                    .with_help(
                        "write `optimizer = adamw(0.9, 0.999, 1e-8, 0.01)` without `weight_decay`, \
                         or `adam(…)` with `weight_decay` for the L2 form",
                    ),
                );
                Monomial::constant(0.0)
            }
            (Some((m, _)), _) => m,
            (None, _) => Monomial::constant(0.0),
        };
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
            // `lr = c * n^p`: the base rate is c, and n^p multiplies every parameter's
            // own lr (the update is lr_base · lr_mult(w) · …, language.md "Training")
            if !lr_exp.is_zero() {
                for p in &mut self.prog.params {
                    p.law.lr.exp = p.law.lr.exp + lr_exp;
                }
            }
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
                optimizer,
                optimizer_span,
                weight_decay,
                batch,
            });
        }
    }
}

/// The keys of a `train` block.
const KEYS: [&str; 7] = [
    "loss",
    "lr",
    "steps",
    "data",
    "optimizer",
    "weight_decay",
    "batch",
];
const KEYS_HELP: &str = "keys are loss, lr, steps, data, optimizer, weight_decay and batch";

/// The optimizers and their arguments, for help texts.
const OPTIMIZERS_HELP: &str = "optimizers are `sgd`, `momentum(beta)`, `adam(beta1, beta2, eps)` \
     and `adamw(beta1, beta2, eps, wd)`";

impl Lowerer<'_> {
    /// `optimizer = sgd | momentum(β) | adam(β1, β2, ε) | adamw(β1, β2, ε, wd)`.
    fn optimizer(&mut self, ex: &syntax::Expr) -> Option<Optimizer> {
        let (fun, args): (&syntax::Ident, &[syntax::Expr]) = match &ex.kind {
            syntax::ExprKind::Name { name, index } if index.is_empty() => (name, &[]),
            syntax::ExprKind::Call { fun, args } => (fun, args),
            _ => {
                self.err(
                    Diagnostic::error(
                        "E0051",
                        "`optimizer` must name an optimizer",
                        ex.span,
                        "not an optimizer",
                    )
                    .with_help(OPTIMIZERS_HELP),
                );
                return None;
            }
        };
        let params: &[&str] = match fun.name.as_str() {
            "sgd" => &[],
            "momentum" => &["beta"],
            "adam" => &["beta1", "beta2", "eps"],
            "adamw" => &["beta1", "beta2", "eps", "wd"],
            other => {
                let s = nearest(other, ["sgd", "momentum", "adam", "adamw"]);
                self.err(
                    Diagnostic::error(
                        "E0051",
                        format!("unknown optimizer `{other}`"),
                        fun.span,
                        "not an optimizer",
                    )
                    .with_help(match s {
                        Some(s) => format!("did you mean `{s}`? {OPTIMIZERS_HELP}"),
                        None => OPTIMIZERS_HELP.to_string(),
                    }),
                );
                return None;
            }
        };
        if args.len() != params.len() {
            let call = if params.is_empty() {
                fun.name.clone()
            } else {
                format!("{}({})", fun.name, params.join(", "))
            };
            self.err(
                Diagnostic::error(
                    "E0051",
                    format!(
                        "`{}` takes {} argument(s), found {}",
                        fun.name,
                        params.len(),
                        args.len()
                    ),
                    ex.span,
                    format!("expected `{call}`"),
                )
                .with_help(OPTIMIZERS_HELP),
            );
            return None;
        }
        let mut betas = Vec::new();
        let mut ok = true;
        for (a, p) in args
            .iter()
            .zip(params)
            .filter(|(_, p)| p.starts_with("beta"))
        {
            match self.eval_num(a) {
                Some(b) if (0.0..1.0).contains(&b) => betas.push(b),
                Some(b) => {
                    ok = false;
                    self.err(
                        Diagnostic::error(
                            "E0052",
                            format!("`{p}` must be in [0, 1), found {b}"),
                            a.span,
                            "out of range",
                        )
                        .with_help(
                            "a moment's decay β keeps a fraction β of the past; torch's defaults \
                             are 0.9 (momentum, Adam's β1) and 0.999 (Adam's β2)",
                        ),
                    );
                }
                None => ok = false,
            }
        }
        let eps = match args.get(2) {
            Some(a) => self.hyper_mono(a, "eps", true),
            None => Some(Monomial::ONE),
        };
        let wd = match args.get(3) {
            Some(a) => self.hyper_mono(a, "wd", false),
            None => Some(Monomial::constant(0.0)),
        };
        let (Some(eps), Some(wd)) = (eps, wd) else {
            return None;
        };
        if !ok {
            return None;
        }
        Some(match fun.name.as_str() {
            "sgd" => Optimizer::Sgd,
            "momentum" => Optimizer::Momentum { beta: betas[0] },
            "adam" => Optimizer::Adam {
                beta1: betas[0],
                beta2: betas[1],
                eps,
            },
            _ => Optimizer::AdamW {
                beta1: betas[0],
                beta2: betas[1],
                eps,
                wd,
            },
        })
    }

    /// A hyperparameter that may scale with the width: a monomial `c · n^p` written
    /// with numbers, `const`s, the width, `*`, `/`, `^` and `sqrt` (`1e-8 * n^(-1)`).
    /// `positive`: c > 0 (Adam's ε); otherwise c ≥ 0 (a weight decay).
    fn hyper_mono(&mut self, e: &syntax::Expr, what: &str, positive: bool) -> Option<Monomial> {
        let m = self.mono_of(e)?;
        let bad = !m.coef.is_finite() || m.coef < 0.0 || (positive && m.coef == 0.0);
        if bad {
            let (rule, hint) = if positive {
                ("positive", "Adam's ε keeps the step finite where v̂ = 0: e.g. `1e-8`, or `1e-8 * n^(-1)` to shrink with the gradients")
            } else {
                (
                    "zero or positive",
                    "a weight decay shrinks the weights toward 0: e.g. `0.01`",
                )
            };
            self.err(
                Diagnostic::error(
                    "E0052",
                    format!("`{what}` must be {rule}, found {m}"),
                    e.span,
                    format!("not {rule}"),
                )
                .with_help(hint),
            );
            return None;
        }
        Some(m)
    }

    /// `e` as a monomial in the width (see [`Lowerer::hyper_mono`]).
    fn mono_of(&mut self, e: &syntax::Expr) -> Option<Monomial> {
        use syntax::{BinOp, ExprKind};
        let not_mono = |l: &mut Self, span: Span| {
            l.err(
                Diagnostic::error(
                    "E0052",
                    "a training hyperparameter must be a number times a power of the width",
                    span,
                    "not a monomial in the width",
                )
                .with_help("write e.g. `1e-8`, `1e-8 * n^(-1)` or `0.1 / sqrt(n)`"),
            );
            None
        };
        match &e.kind {
            ExprKind::Name { name, index } if index.is_empty() && name.name == self.prog.width => {
                Some(Monomial::n_pow(Rational::ONE))
            }
            ExprKind::Num(_) | ExprKind::Name { .. } => self.eval_num(e).map(Monomial::constant),
            ExprKind::Neg(a) => {
                let m = self.mono_of(a)?;
                Some(Monomial::new(-m.coef, m.exp))
            }
            ExprKind::Bin(op, a, b) => {
                let (x, y) = (self.mono_of(a)?, self.mono_of(b)?);
                match op {
                    BinOp::Mul => Some(x * y),
                    BinOp::Div => Some(x * y.recip()),
                    BinOp::Add | BinOp::Sub if x.exp.is_zero() && y.exp.is_zero() => {
                        let s = if *op == BinOp::Add { 1.0 } else { -1.0 };
                        Some(Monomial::constant(x.coef + s * y.coef))
                    }
                    _ => not_mono(self, e.span),
                }
            }
            ExprKind::Pow(a, p) => {
                let m = self.mono_of(a)?;
                match Rational::approximate(*p, 1000) {
                    Some(r) if m.exp.is_zero() || r.den() == 1 || m.coef > 0.0 => {
                        Some(Monomial::new(m.coef.powf(*p), m.exp * r))
                    }
                    _ => not_mono(self, e.span),
                }
            }
            ExprKind::Call { fun, args } if fun.name == "sqrt" && args.len() == 1 => {
                let m = self.mono_of(&args[0])?;
                Some(m.sqrt())
            }
            _ => not_mono(self, e.span),
        }
    }
}
