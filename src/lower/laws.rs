//! Evaluating parameter laws: explicit `~ N(0, var) * mult lr rate` and preset blocks.

use super::{Binding, Lowerer};
use crate::diag::{nearest, Diagnostic};
use crate::ir::{Law, Monomial, Preset, Rational, Shape, Span};
use crate::syntax::{self, LawSyntax, Mono};

impl Lowerer<'_> {
    /// The law of a parameter, the preset it came from (if any) and the span to blame.
    /// Every coefficient is a finite f64: `{ std = 1e300 }` has variance 1e600, which is
    /// refused here rather than carried as infinity into both interpreters.
    pub(crate) fn law(
        &mut self,
        p: &syntax::ParamDecl,
        shape: Shape,
    ) -> Option<(Law, Option<Preset>, Span)> {
        let (law, preset, span) = self.law_unchecked(p, shape)?;
        for (what, m) in [
            ("variance", law.var),
            ("multiplier", law.mult),
            ("learning rate", law.lr),
        ] {
            if !m.coef.is_finite() {
                self.err(
                    Diagnostic::error(
                        "E0024",
                        format!("the {what} of `{}` overflows: its coefficient is not a finite number", p.name.name),
                        span,
                        "too large",
                    )
                    .with_help("coefficients of a law must fit in a 64-bit float (a `std` up to about 1e154, whose square is the variance)"),
                );
                return None;
            }
        }
        Some((law, preset, span))
    }

    fn law_unchecked(
        &mut self,
        p: &syntax::ParamDecl,
        shape: Shape,
    ) -> Option<(Law, Option<Preset>, Span)> {
        let preset = self.prog.preset;
        match &p.law {
            None => Some((
                preset.law_for(shape, 1.0, 1.0, self.entrywise_optimizer),
                Some(preset),
                p.span,
            )),
            Some(LawSyntax::Preset { entries, span }) => {
                let (mut std, mut lr) = (1.0, 1.0);
                let mut ok = true;
                for (k, v) in entries {
                    let Some(m) = self.mono(v) else {
                        ok = false;
                        continue;
                    };
                    if !m.exp.is_zero() {
                        self.err(
                            Diagnostic::error("E0011", format!("`{}` in a preset block is a constant, found a power of n", k.name), v.span(), "depends on the width")
                                .with_help("preset constants follow Neural Tangents' conventions; write an explicit law `~ N(0, var) * mult lr rate` for width-dependent laws"),
                        );
                        ok = false;
                        continue;
                    }
                    match k.name.as_str() {
                        "std" if m.coef >= 0.0 => std = m.coef,
                        "lr" if m.coef >= 0.0 => lr = m.coef,
                        "std" | "lr" => {
                            self.err(
                                Diagnostic::error("E0012", format!("`{}` must not be negative, found {}", k.name, m.coef), v.span(), "negative")
                                    .with_help("a standard deviation and a learning-rate factor are nonnegative"),
                            );
                            ok = false;
                        }
                        other => {
                            let help = match nearest(other, ["std", "lr"]) {
                                Some(s) => {
                                    format!("did you mean `{s}`? preset blocks take `std` and `lr`")
                                }
                                None => "preset blocks take `std` and `lr`".to_string(),
                            };
                            self.err(
                                Diagnostic::error(
                                    "E0023",
                                    format!("unknown key `{other}` in a preset law"),
                                    k.span,
                                    "unknown key",
                                )
                                .with_help(help),
                            );
                            ok = false;
                        }
                    }
                }
                ok.then(|| {
                    let law = preset.law_for(shape, std, lr, self.entrywise_optimizer);
                    (law, Some(preset), *span)
                })
            }
            Some(LawSyntax::Explicit {
                dist,
                mean,
                var,
                mult,
                lr,
                span,
            }) => {
                if dist.name != "N" {
                    self.err(
                        Diagnostic::error(
                            "E0012",
                            format!("unknown distribution `{}`", dist.name),
                            dist.span,
                            "not `N`",
                        )
                        .with_help("laws are Gaussian: `~ N(0, var)`"),
                    );
                    return None;
                }
                let (m, v) = (self.mono(mean), self.mono(var));
                let mult_m = match mult {
                    Some(x) => Some(self.mono(x)?),
                    None => None,
                };
                let lr_m = match lr {
                    Some(x) => Some(self.mono(x)?),
                    None => None,
                };
                let (m, v) = (m?, v?);
                if m.coef != 0.0 {
                    self.err(
                        Diagnostic::error("E0012", "tpc supports centered laws only", mean.span(), "nonzero mean")
                            .with_help("write `N(0, var)`; add a constant in the program if you need an offset"),
                    );
                    return None;
                }
                if v.coef < 0.0 {
                    self.err(
                        Diagnostic::error("E0012", format!("negative variance {v}"), var.span(), "a variance is nonnegative")
                            .with_help("write the variance, e.g. `N(0, 1/n)`; for a negative multiplier use `* -1`"),
                    );
                    return None;
                }
                if let Some(mm) = mult_m {
                    if mm.coef == 0.0 {
                        if let Some(x) = mult {
                            self.err(
                                Diagnostic::error(
                                    "E0012",
                                    "a zero multiplier makes the parameter identically zero",
                                    x.span(),
                                    "zero",
                                )
                                .with_help(
                                    "to start a parameter at zero but train it, use `N(0, 0)`",
                                ),
                            );
                        }
                        return None;
                    }
                }
                if let (Some(l), Some(x)) = (lr_m, lr) {
                    if l.coef < 0.0 {
                        self.err(
                            Diagnostic::error("E0012", "negative learning rate", x.span(), "negative")
                                .with_help("a learning-rate multiplier is nonnegative; `lr 0` freezes the parameter"),
                        );
                        return None;
                    }
                }
                let law = Law {
                    var: v,
                    mult: mult_m.unwrap_or(Monomial::ONE),
                    lr: lr_m.unwrap_or(Monomial::ONE),
                };
                Some((law, None, *span))
            }
        }
    }

    /// A monomial `c * n^p`.
    fn mono(&mut self, m: &Mono) -> Option<Monomial> {
        match m {
            Mono::Num(c, _) => Some(Monomial::constant(*c)),
            Mono::Name(id) if id.name == self.prog.width => Some(Monomial::n_pow(Rational::ONE)),
            Mono::Name(id) => match self.lookup(id, &[], id.span)? {
                Binding::Const(v) => Some(Monomial::constant(v as f64)),
                _ => {
                    self.err(
                        Diagnostic::error(
                            "E0020",
                            format!("`{}` is not a constant", id.name),
                            id.span,
                            "in a law",
                        )
                        .with_help(format!(
                            "laws are monomials in `{}` with numeric or `const` coefficients",
                            self.prog.width
                        )),
                    );
                    None
                }
            },
            Mono::Call(f, a, span) => {
                let a = self.mono(a)?;
                match f.name.as_str() {
                    "sqrt" if a.coef >= 0.0 => Some(a.sqrt()),
                    "sqrt" => {
                        self.err(
                            Diagnostic::error(
                                "E0024",
                                "square root of a negative number",
                                *span,
                                "negative",
                            )
                            .with_help("check the law"),
                        );
                        None
                    }
                    other => {
                        self.err(
                            Diagnostic::error(
                                "E0013",
                                format!("unknown function `{other}` in a law"),
                                f.span,
                                "not allowed here",
                            )
                            .with_help("laws use numbers, the width, `const`s, `* / ^` and `sqrt`"),
                        );
                        None
                    }
                }
            }
            Mono::Pow(base, e, span) => {
                let b = self.mono(base)?;
                let q = self.exponent(e)?;
                if b.coef < 0.0 && q.den() != 1 {
                    self.err(
                        Diagnostic::error(
                            "E0011",
                            "fractional power of a negative number",
                            *span,
                            "undefined",
                        )
                        .with_help("only positive bases take fractional exponents"),
                    );
                    return None;
                }
                if b.coef == 0.0 && q < Rational::ZERO {
                    self.err(
                        Diagnostic::error(
                            "E0024",
                            "negative power of zero",
                            *span,
                            "division by zero",
                        )
                        .with_help("check the law"),
                    );
                    return None;
                }
                let coef = b.coef.powf(q.to_f64());
                if !coef.is_finite() {
                    self.err(
                        Diagnostic::error("E0024", "the coefficient overflows", *span, "too large")
                            .with_help("use smaller numbers"),
                    );
                    return None;
                }
                Some(Monomial::new(coef, b.exp * q))
            }
            Mono::Mul(a, b, _) => Some(self.mono(a)? * self.mono(b)?),
            Mono::Div(a, b, span) => {
                let (a, b) = (self.mono(a)?, self.mono(b)?);
                if b.coef == 0.0 {
                    self.err(
                        Diagnostic::error(
                            "E0024",
                            "division by zero in a law",
                            *span,
                            "zero divisor",
                        )
                        .with_help("check the law"),
                    );
                    return None;
                }
                Some(a * b.recip())
            }
            Mono::Neg(a, _) => {
                let a = self.mono(a)?;
                Some(Monomial::new(-a.coef, a.exp))
            }
        }
    }

    fn exponent(&mut self, e: &syntax::Exponent) -> Option<Rational> {
        let bad = |l: &mut Self, msg: String| {
            l.err(
                Diagnostic::error("E0011", msg, e.span, "bad exponent")
                    .with_help("exponents are rationals with small denominators, e.g. `n^(-1/2)`, `n^2`, `n^0.5`"),
            );
            None
        };
        let num = match Rational::approximate(e.num, 1000) {
            Some(r) => r,
            None => {
                return bad(
                    self,
                    format!("`{}` is not a rational exponent tpc can keep exact", e.num),
                )
            }
        };
        match e.den {
            None => Some(num),
            Some(0.0) => bad(self, "exponent with a zero denominator".to_string()),
            Some(d) => match Rational::approximate(d, 1000) {
                Some(dr) if num.den() == 1 && dr.den() == 1 => {
                    match Rational::new(num.num(), dr.num()) {
                        Some(r) => Some(r),
                        None => bad(self, "exponent too large".to_string()),
                    }
                }
                _ => bad(
                    self,
                    "write the exponent as a ratio of integers".to_string(),
                ),
            },
        }
    }
}
