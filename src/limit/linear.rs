//! Exact Gaussian algebra for programs that are linear in their Gaussians (theory.md
//! §2.1, §6.2 "Linear"): deep linear networks and their unrolled training, random-matrix
//! moments such as `semicircle.tp`.
//!
//! When every Nonlin is affine in its vector operands (with moments as coefficients),
//! every `Z^x` is a linear form in finitely many independent N(0, 1) variables: the
//! initial vectors, the columns of input matrices, and for every matrix W one fresh
//! Gaussian per new direction of its arguments (and, independently, of its transposed
//! arguments). So each vector is a coefficient vector `c_x` over the basis
//! `{1, g_1, g_2, …}` (orthonormal in L²: E[Z^x Z^y] = ⟨c_x, c_y⟩), and the Master
//! Theorem is linear algebra:
//!
//! * **Ẑ** (§2.1): the family `{Ẑ^{W x}}` has covariance `σ_W² ⟨c_x, c_x'⟩`. Keep an
//!   orthonormal basis `q_1, q_2, …` of the arguments' span, with one fresh Gaussian
//!   `e_i` per `q_i`; then `Ẑ^{W x} = σ_W Σ_i ⟨c_x, q_i⟩ e_i` (Gram–Schmidt adds a `q`
//!   and an `e` when `c_x` leaves the span). The transposed family has its own basis.
//! * **Ż** (§2.1): `Ż^{W x} = σ_W² Σ_y Z^y E[∂Z^x/∂Ẑ^{Wᵀ y}]`. The sum is invariant
//!   under a change of basis of the `y`'s, so take the transposed family's `q'_k`
//!   themselves: `Ẑ^{Wᵀ q'_k} = σ_W e'_k`, hence `∂/∂Ẑ^{Wᵀ q'_k} = σ_W⁻¹ ∂/∂e'_k` and
//!   `Ż^{W x} = σ_W Σ_k c_x[e'_k] · q'_k` — the coefficients are exact numbers.
//!
//! Moments of products of two linear forms are inner products; anything else non-linear
//! is refused (the particle engine handles it).

use std::collections::HashMap;

use crate::ir::{Expr, Fun, NodeId, Op, Program, Shape, Ty};

/// Relative size below which a new argument direction is taken to lie in the span.
const SPAN_TOL: f64 = 1e-12;

/// A value: a scalar, a linear form in the basis `{1, g_1, …}`, or (inside a Moment
/// only) a sum of products of two linear forms.
#[derive(Clone, Debug)]
enum V {
    S(f64),
    L(Vec<f64>),
    Q(Products, Vec<f64>),
}

/// `Σ c · x · y` over pairs of linear forms.
type Products = Vec<(f64, Vec<f64>, Vec<f64>)>;

fn axpy(a: f64, x: &[f64], y: &mut Vec<f64>) {
    if y.len() < x.len() {
        y.resize(x.len(), 0.0);
    }
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn scale(a: f64, x: &[f64]) -> Vec<f64> {
    x.iter().map(|v| a * v).collect()
}

impl V {
    fn lin(self) -> Option<Vec<f64>> {
        match self {
            V::S(c) => Some(vec![c]),
            V::L(x) => Some(x),
            V::Q(..) => None,
        }
    }
    /// Returns (products, linear part) of any value.
    fn quad(self) -> (Products, Vec<f64>) {
        match self {
            V::S(c) => (Vec::new(), vec![c]),
            V::L(x) => (Vec::new(), x),
            V::Q(q, l) => (q, l),
        }
    }
    fn add(self, o: V, sign: f64) -> V {
        match (self, o) {
            (V::S(a), V::S(b)) => V::S(a + sign * b),
            (a @ (V::S(_) | V::L(_)), b @ (V::S(_) | V::L(_))) => {
                let mut x = a.lin().unwrap_or_default();
                axpy(sign, &b.lin().unwrap_or_default(), &mut x);
                V::L(x)
            }
            (a, b) => {
                let (mut qa, mut la) = a.quad();
                let (qb, lb) = b.quad();
                qa.extend(qb.into_iter().map(|(c, x, y)| (sign * c, x, y)));
                axpy(sign, &lb, &mut la);
                V::Q(qa, la)
            }
        }
    }
    fn mul(self, o: V) -> Result<V, String> {
        Ok(match (self, o) {
            (V::S(a), V::S(b)) => V::S(a * b),
            (V::S(a), V::L(x)) | (V::L(x), V::S(a)) => V::L(scale(a, &x)),
            (V::S(a), V::Q(q, l)) | (V::Q(q, l), V::S(a)) => V::Q(
                q.into_iter().map(|(c, x, y)| (a * c, x, y)).collect(),
                scale(a, &l),
            ),
            (V::L(x), V::L(y)) => V::Q(vec![(1.0, x, y)], Vec::new()),
            _ => return Err("a product of more than two Gaussian linear forms".into()),
        })
    }
}

/// Evaluates `e` on operand values.
fn eval(e: &Expr, args: &[V]) -> Result<V, String> {
    Ok(match e {
        Expr::Arg(i) => args[*i].clone(),
        Expr::Const(c) => V::S(*c),
        Expr::Neg(x) => V::S(0.0).add(eval(x, args)?, -1.0),
        Expr::Add(a, b) => eval(a, args)?.add(eval(b, args)?, 1.0),
        Expr::Sub(a, b) => eval(a, args)?.add(eval(b, args)?, -1.0),
        Expr::Mul(a, b) => eval(a, args)?.mul(eval(b, args)?)?,
        Expr::Div(a, b) => match eval(b, args)? {
            V::S(d) => eval(a, args)?.mul(V::S(1.0 / d))?,
            _ => return Err("a division by a Gaussian".into()),
        },
        Expr::Powi(a, k) => {
            let x = eval(a, args)?;
            match (x, k) {
                (V::S(c), k) => V::S(c.powi(*k)),
                (x, 1) => x,
                (x, 2) => x.clone().mul(x)?,
                _ => return Err("a power of a Gaussian".into()),
            }
        }
        Expr::Call(f, x) => match (f, eval(x, args)?) {
            (_, V::S(c)) => V::S(f.eval(c)),
            (Fun::Id, v) => v,
            (f, _) => return Err(format!("`{}` of a Gaussian is not linear", f.name())),
        },
    })
}

/// One Ẑ family (a matrix, or its transpose): an orthonormal basis of its arguments'
/// span and the Gaussian (basis index) of each direction.
#[derive(Default, Clone)]
struct Family {
    q: Vec<Vec<f64>>,
    e: Vec<usize>,
}

/// The exact limit of every Moment and Scalar of a P = 1 program whose Gaussians enter
/// linearly (module docs): values by node (`None` for vectors and matrices).
pub fn scalars(prog: &Program, row: &[f64]) -> Result<Vec<Option<f64>>, (Option<NodeId>, String)> {
    let mut dim = 1usize; // coordinate 0 is the constant 1
    fn fresh(dim: &mut usize) -> usize {
        *dim += 1;
        *dim - 1
    }
    let mut vals: Vec<Option<V>> = vec![None; prog.len()];
    let mut families: HashMap<(usize, bool), Family> = HashMap::new();
    let mut columns: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut offsets = Vec::new();
    let mut off = 0;
    for d in &prog.inputs {
        offsets.push(off);
        off += d.row_len();
    }
    let limit_of = |m: crate::ir::Monomial, what: &str, id: NodeId| {
        m.limit()
            .ok_or_else(|| (Some(id), format!("{what} grows like {m} as n → ∞")))
    };
    for id in prog.ids() {
        let ops = prog.operands(id);
        let get = |a: NodeId| {
            vals[a.index()]
                .clone()
                .ok_or_else(|| (Some(id), "an operand has no value".to_string()))
        };
        let v = match &prog.node(id).op {
            Op::Input { .. } => None,
            Op::Param(p) => {
                let prm = &prog.params[*p];
                match prm.shape {
                    Shape::Vector | Shape::Readout => {
                        let s2 = limit_of(prm.law.entry_var(), "the variance of a vector", id)?;
                        let g = fresh(&mut dim);
                        let mut c = vec![0.0; dim];
                        c[g] = s2.max(0.0).sqrt();
                        Some(V::L(c))
                    }
                    Shape::Scalar => {
                        let s2 = limit_of(prm.law.entry_var(), "a scalar's variance", id)?;
                        if s2 != 0.0 {
                            return Err((
                                Some(id),
                                "a random scalar parameter is not deterministic in the limit"
                                    .into(),
                            ));
                        }
                        Some(V::S(0.0))
                    }
                    _ => None,
                }
            }
            Op::MatMul { transpose } => {
                let Op::Param(w) = prog.node(ops[0]).op else {
                    return Err((Some(id), "a product whose matrix is not a parameter".into()));
                };
                let prm = &prog.params[w];
                if let Op::Input { input, time } = prog.node(ops[1]).op {
                    // mult·U ξ = Σ_i ξ_i Z^{U_i}, the columns iid N(0, σ_U²).
                    let s2 = limit_of(prm.law.entry_var(), "an input layer's variance", id)?;
                    let d = prog.inputs[input].dim;
                    let cols = columns
                        .entry(w)
                        .or_insert_with(|| (0..d).map(|_| fresh(&mut dim)).collect())
                        .clone();
                    let base = offsets[input] + (time.unwrap_or(1) - 1) * d;
                    let mut c = vec![0.0; dim];
                    for (i, &g) in cols.iter().enumerate() {
                        c[g] = s2.max(0.0).sqrt() * row.get(base + i).copied().unwrap_or(0.0);
                    }
                    Some(V::L(c))
                } else {
                    let x = get(ops[1])?
                        .lin()
                        .ok_or_else(|| (Some(id), "a product of a non-vector".to_string()))?;
                    let s2 = limit_of(
                        prm.law.entry_var() * crate::ir::Monomial::n_pow(crate::ir::Rational::ONE),
                        "a matrix's variance times n",
                        id,
                    )?;
                    let s = s2.max(0.0).sqrt();
                    // Ẑ: project on the family's basis, extend it by the residual.
                    let fam = families.entry((w, *transpose)).or_default();
                    let mut resid = x.clone();
                    let mut coords = Vec::with_capacity(fam.q.len() + 1);
                    for _ in 0..2 {
                        // twice: Gram–Schmidt with re-orthogonalization
                        for (k, q) in fam.q.iter().enumerate() {
                            let a = dot(&resid, q);
                            axpy(-a, q, &mut resid);
                            if coords.len() <= k {
                                coords.push(0.0);
                            }
                            coords[k] += a;
                        }
                    }
                    let norm = dot(&resid, &resid).sqrt();
                    let xnorm = dot(&x, &x).sqrt();
                    if norm > SPAN_TOL * xnorm.max(f64::MIN_POSITIVE) && norm > 0.0 {
                        fam.q.push(scale(1.0 / norm, &resid));
                        let g = fresh(&mut dim);
                        fam.e.push(g);
                        coords.push(norm);
                    }
                    let mut z = vec![0.0; dim];
                    for (k, &a) in coords.iter().enumerate() {
                        let g = fam.e[k];
                        if z.len() <= g {
                            z.resize(g + 1, 0.0);
                        }
                        z[g] += s * a;
                    }
                    // Ż = σ Σ_k c_x[e'_k] q'_k over the other family.
                    if let Some(other) = families.get(&(w, !*transpose)) {
                        for (q, &g) in other.q.iter().zip(&other.e) {
                            let cx = x.get(g).copied().unwrap_or(0.0);
                            if cx != 0.0 {
                                axpy(s * cx, q, &mut z);
                            }
                        }
                    }
                    Some(V::L(z))
                }
            }
            Op::Nonlin(e) => {
                let args: Vec<V> = ops.iter().map(|&a| get(a)).collect::<Result<_, _>>()?;
                match eval(e, &args).map_err(|m| (Some(id), m))? {
                    V::Q(..) => {
                        return Err((
                            Some(id),
                            "a product of two Gaussian vectors is not linear".into(),
                        ))
                    }
                    V::S(c) => Some(V::L(vec![c])),
                    v => Some(v),
                }
            }
            Op::Moment(e) => {
                let args: Vec<V> = ops.iter().map(|&a| get(a)).collect::<Result<_, _>>()?;
                let (q, l) = eval(e, &args).map_err(|m| (Some(id), m))?.quad();
                // E[1] = 1, E[g] = 0, E[Z^x Z^y] = ⟨c_x, c_y⟩.
                let m = q.iter().map(|(c, x, y)| c * dot(x, y)).sum::<f64>()
                    + l.first().copied().unwrap_or(0.0);
                Some(V::S(m))
            }
            Op::Scalar(e) => {
                let args: Vec<V> = ops.iter().map(|&a| get(a)).collect::<Result<_, _>>()?;
                match eval(e, &args).map_err(|m| (Some(id), m))? {
                    V::S(c) => Some(V::S(c)),
                    _ => return Err((Some(id), "a scalar function of a vector".into())),
                }
            }
            Op::Output { .. } => {
                return Err((
                    Some(id),
                    "an output read out by a random vector is a Gaussian process, not a number"
                        .into(),
                ))
            }
            Op::Outer { .. } => {
                return Err((
                    Some(id),
                    "a nonlinear outer product is not linear in the Gaussians".into(),
                ))
            }
        };
        if let Some(V::S(c)) = &v {
            if !c.is_finite() {
                return Err((Some(id), format!("{} is infinite or NaN", prog.label(id))));
            }
        }
        vals[id.index()] = v;
    }
    Ok(prog
        .ids()
        .map(|id| match (&vals[id.index()], prog.ty(id)) {
            (Some(V::S(c)), Ty::Moment | Ty::Finite) => Some(*c),
            _ => None,
        })
        .collect())
}

/// The exact limit trajectory f_t of a `train` block whose network is linear in its
/// Gaussians (deep linear networks included): the unrolled program
/// ([`crate::autodiff`], `Width::Limit`) read by [`scalars`]. (steps+1) × O·P,
/// output-major, at `eval` (none means the training inputs).
pub fn trajectory(prog: &Program, eval: &[Vec<f64>]) -> Result<nalgebra::DMatrix<f64>, String> {
    let u = crate::autodiff::unroll(prog, eval, crate::autodiff::Width::Limit)
        .map_err(|e| e.message)?;
    let vals = scalars(&u.prog, &u.row()).map_err(|(_, m)| m)?;
    let cols = u.f.first().map_or(0, Vec::len);
    let mut f = nalgebra::DMatrix::zeros(u.f.len(), cols);
    for (t, row) in u.f.iter().enumerate() {
        for (j, id) in row.iter().enumerate() {
            f[(t, j)] = vals[id.index()].ok_or("an output has no value")?;
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semicircle_moments_are_catalan_numbers_exactly() {
        let src = "width n\nparam W : n x n ~ N(0, 1/(2*n))\nparam v : n ~ N(0, 1)\n\
                   x[0] = v\nfor k in 1..=8 {\n  x[k] = W @ x[k-1] + W.T @ x[k-1]\n  \
                   observe m[k] = mean(x[0] * x[k])\n}\n";
        let prog = crate::compile(src).unwrap();
        let s = scalars(&prog, &[]).unwrap();
        let got: Vec<f64> = prog
            .observes
            .iter()
            .map(|o| s[o.index()].unwrap())
            .collect();
        let want = [0.0, 1.0, 0.0, 2.0, 0.0, 5.0, 0.0, 14.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
    }

    #[test]
    fn a_nonlinear_program_is_refused() {
        let src =
            "width n\nparam W : n x n\nparam v : n\nx = tanh(W @ v)\nobserve m = mean(x * v)\n";
        let prog = crate::compile(src).unwrap();
        let e = scalars(&prog, &[]).unwrap_err();
        assert!(e.1.contains("tanh"), "{}", e.1);
    }
}
