//! Free functions over factors and forms: which Gaussian families a factor reads,
//! independent groups of factors (expectations factor over them), sums of terms,
//! joint covariances, and the finiteness check of a block.

use nalgebra::DMatrix;

use super::*;

/// The families a factor's forms draw on.
pub(super) fn families(der: &Derivation, e: &Expr, args: &[LinForm]) -> Families {
    let mut out = BTreeSet::new();
    e.visit_args(&mut |j| {
        for &(g, _) in &args[j].0 {
            // Odd and even Gaussians of one family are independent (zform::Gauss::odd).
            let (param, kind) = der.gauss[g].family();
            out.insert((param, kind + 16 * u8::from(der.gauss[g].odd)));
        }
    });
    out
}

/// Groups of factors (side, expression) of the atoms `a` (side 0) and `b` (side 1) with no family in common between groups,
/// and the product of the constant factors.
pub(crate) fn independent_groups(
    der: &Derivation,
    a: &Atom,
    b: Option<&Atom>,
) -> (f64, Vec<[Vec<Expr>; 2]>) {
    let mut konst = 1.0;
    let mut groups: Vec<(Families, [Vec<Expr>; 2])> = Vec::new();
    let sides = std::iter::once(a).chain(b).enumerate();
    for (side, atom) in sides {
        let mut fs = Vec::new();
        factors(&atom.f, &mut fs);
        for f in fs {
            if f.is_constant() {
                konst *= f.eval(&[]);
                continue;
            }
            let mut fam = families(der, &f, &atom.args);
            let mut item: [Vec<Expr>; 2] = [Vec::new(), Vec::new()];
            item[side].push(f);
            // Merge every group sharing a family with this factor.
            let mut k = 0;
            while k < groups.len() {
                if groups[k].0.is_disjoint(&fam) {
                    k += 1;
                } else {
                    let (gf, [ga, gb]) = groups.swap_remove(k);
                    fam.extend(gf);
                    item[0].extend(ga);
                    item[1].extend(gb);
                }
            }
            groups.push((fam, item));
        }
    }
    (konst, groups.into_iter().map(|g| g.1).collect())
}

/// The factors of a product: `f = Π_k f_k` through `*`, unary minus and `a / b`.
pub(in crate::limit) fn factors(e: &Expr, out: &mut Vec<Expr>) {
    match e {
        Expr::Mul(a, b) => {
            factors(a, out);
            factors(b, out);
        }
        Expr::Neg(x) => {
            out.push(Expr::Const(-1.0));
            factors(x, out);
        }
        Expr::Div(a, b) if !b.is_constant() => {
            factors(a, out);
            out.push(Expr::div(Expr::Const(1.0), (**b).clone()));
        }
        _ => out.push(e.clone()),
    }
}

/// `Π_k f_k` (1 for none).
pub(in crate::limit) fn product(fs: Vec<Expr>) -> Expr {
    fs.into_iter().fold(Expr::Const(1.0), Expr::mul)
}

/// The terms of a sum: `f = Σ_i c_i t_i` through `+`, `-` and constant multiples.
pub(super) fn sum_terms(e: &Expr, c: f64, out: &mut Vec<(f64, Expr)>) {
    match e {
        Expr::Add(a, b) => {
            sum_terms(a, c, out);
            sum_terms(b, c, out);
        }
        Expr::Sub(a, b) => {
            sum_terms(a, c, out);
            sum_terms(b, -c, out);
        }
        Expr::Neg(x) => sum_terms(x, -c, out),
        Expr::Mul(k, x) if k.is_constant() => sum_terms(x, c * k.eval(&[]), out),
        Expr::Mul(x, k) if k.is_constant() => sum_terms(x, c * k.eval(&[]), out),
        _ => out.push((c, e.clone())),
    }
}

/// The terms of an atom's function, each an atom over the forms it uses.
pub(in crate::limit) fn sum_terms_of(a: &Atom) -> Vec<(f64, Atom)> {
    let mut ts = Vec::new();
    sum_terms(&a.f, 1.0, &mut ts);
    ts.into_iter()
        .map(|(c, t)| (c, restrict(&t, &a.args)))
        .collect()
}

/// `e` over `args` as an atom over the forms it uses only, in their order.
pub(in crate::limit) fn restrict(e: &Expr, args: &[LinForm]) -> Atom {
    let mut used: Vec<usize> = Vec::new();
    e.visit_args(&mut |j| {
        if !used.contains(&j) {
            used.push(j);
        }
    });
    used.sort_unstable();
    let pos = |j: usize| used.iter().position(|&u| u == j).unwrap_or(0);
    Atom {
        f: e.substitute(&|j| Expr::Arg(pos(j))),
        args: used.iter().map(|&j| args[j].clone()).collect(),
    }
}

/// Is `f` of `m` operands a polynomial of degree at most 2 (every first partial affine)?
pub(super) fn quadratic(f: &Expr, m: usize) -> bool {
    (0..m).all(|i| f.diff(i).is_affine())
}

/// Covariance of `[L_1(xi_p) .. L_m(xi_p), M_1(xi_q) .. M_k(xi_q)]` from the blocks of
/// [`Engine::joint_blocks`] of `k` forms (the first `m` at point p, the rest at point q).
pub(super) fn joint_cov(
    blocks: &[DMatrix<f64>],
    m: usize,
    k: usize,
    p: usize,
    q: usize,
) -> DMatrix<f64> {
    let at = |i: usize| if i < m { p } else { q };
    let mut c = DMatrix::zeros(k, k);
    let mut idx = 0;
    for i in 0..k {
        for j in i..k {
            let v = blocks[idx][(at(i), at(j))];
            c[(i, j)] = v;
            c[(j, i)] = v;
            idx += 1;
        }
    }
    c
}

pub(super) fn check(m: &DMatrix<f64>, what: &str) -> R<()> {
    if m.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(NumError(format!(
            "{what} is not finite (overflow or NaN in the limit)"
        )))
    }
}
