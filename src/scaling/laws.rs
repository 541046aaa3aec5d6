//! muP laws by role (theory.md §5.3, §5.5) and their text, the help of every scaling warning.

use crate::ir::{Law, Monomial, Program, Rational, Role};

// ---------------------------------------------------------------------------------
// muP laws (theory.md §5.3, §5.5: TP4's SGD exponents by role)
// ---------------------------------------------------------------------------------

/// TP4's muP `(a, b)` for a role, at `c = 0`.
pub fn mup_ab(role: Role) -> (Rational, Rational) {
    let h = Rational::HALF;
    match role {
        Role::Input | Role::Bias => (-h, h),
        Role::Hidden => (Rational::ZERO, h),
        Role::Output => (h, h),
        Role::OutputBias => (Rational::ZERO, Rational::ZERO),
    }
}

/// Whether a law has muP's exponents up to the abc symmetry: `a + b` and `2a + c` as muP.
pub fn is_mup_law(role: Role, law: &Law) -> bool {
    let abc = law.abc();
    let (a, b) = mup_ab(role);
    abc.b.is_some_and(|lb| abc.a + lb == a + b)
        && abc.a * Rational::int(2) + abc.c == a * Rational::int(2)
}

/// The muP law with the given `c` (learning-rate exponent), keeping the law's constants:
/// `(var, mult)` as monomials.
pub(super) fn mup_law_at(role: Role, law: &Law, c: Rational) -> Law {
    let (am, bm) = mup_ab(role);
    // per-layer symmetry: (a, b, c) ~ (a + t, b - t, c - 2t)
    let a = am - c * Rational::HALF;
    let b = am + bm - a;
    let var_coef = if law.var.coef == 0.0 {
        1.0
    } else {
        law.var.coef
    };
    Law {
        var: Monomial::new(var_coef, -(b * Rational::int(2))),
        mult: Monomial::new(law.mult.coef, -a),
        lr: Monomial::new(law.lr.coef, -c),
    }
}

/// A law as the language writes it: `~ N(0, var) * mult lr rate`.
pub fn law_text(law: &Law) -> String {
    let mult = if law.mult.coef == 1.0 && law.mult.exp.is_zero() {
        String::new()
    } else {
        format!(" * {}", law.mult)
    };
    format!("~ N(0, {}){mult} lr {}", law.var, law.lr)
}

/// The muP law for a parameter: at its own learning-rate exponent, and the
/// multiplier-free form (the `mup` preset's) when that differs.
pub fn mup_laws(role: Role, law: &Law) -> (Law, Option<Law>) {
    let own = mup_law_at(role, law, law.abc().c);
    let (am, _) = mup_ab(role);
    let free_c = am * Rational::int(2);
    let mut free = mup_law_at(role, law, free_c);
    free.mult = Monomial::constant(law.mult.coef);
    (own, (own.mult.exp != Rational::ZERO).then_some(free))
}

pub(super) fn mup_help(prog: &Program, p: usize) -> String {
    let par = &prog.params[p];
    let (own, free) = mup_laws(par.role(), &par.law);
    let mut s = format!(
        "muP for the {} `{}` at its learning rate: `param {} : {} {}`",
        par.role_name(),
        par.name,
        par.name,
        par.shape,
        law_text(&own)
    );
    if let Some(f) = free {
        s.push_str(&format!(
            "; without a multiplier: `{}` (as `parameterization mup`)",
            law_text(&f)
        ));
    }
    s
}
