//! The evaluator of [`super`]: runs the compiled [`Tape`] on every entry, in 32 x 32
//! tiles on all cores, a strip of [`NC`] tile columns per pass over the tape
//! (vectorized, `simd_fn!`, the fastmath `acos`), and writes each tile to both
//! triangles of every output block. Separate from the builder: this half is about the
//! machine (dispatch, vector loops, memory), not the mathematics.

use rayon::prelude::*;

use super::super::fastmath;
use super::super::gauss::TINY_VAR;
use super::tape::{TOp, Tape};

/// `1/sqrt(2 pi)`
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
const INV_2PI: f64 = 1.0 / (2.0 * std::f64::consts::PI);

/// `E[A_i(u) B_j(v)]` for the atoms `[1, u, step, relu]` (`dual/pairs.rs` `atom_pair`), given
/// `sd1 = sqrt(Var u)`, `sd2`, the clamped covariance `s12`, `rho` and the arc-cosine
/// pair `pt = π - θ`, `jv = sin θ + (π - θ) cos θ`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn basis(i: usize, j: usize, sd1: f64, sd2: f64, s12: f64, rho: f64, pt: f64, jv: f64) -> f64 {
    match (i, j) {
        (0, 0) => 1.0,
        (0, 1) | (1, 0) => 0.0,
        (0, 2) | (2, 0) => 0.5,
        (0, 3) => sd2 * INV_SQRT_2PI,
        (3, 0) => sd1 * INV_SQRT_2PI,
        (1, 1) => s12,
        (1, 2) => s12 / sd2 * INV_SQRT_2PI,
        (2, 1) => s12 / sd1 * INV_SQRT_2PI,
        (1, 3) | (3, 1) => 0.5 * s12,
        (2, 2) => pt * INV_2PI,
        (2, 3) => sd2 * (1.0 + rho) * 0.5 * INV_SQRT_2PI,
        (3, 2) => sd1 * (1.0 + rho) * 0.5 * INV_SQRT_2PI,
        _ => sd1 * sd2 * jv * INV_2PI,
    }
}

/// The per-row quantities [`basis`] reads, over the rows of one strip column.
struct Arcs<'a> {
    sd1: &'a [f64],
    sd2: f64,
    s12: &'a [f64],
    rho: &'a [f64],
    pt: &'a [f64],
    jv: &'a [f64],
}

/// `o[r] = k basis(i, j)` (`SET`) or `o[r] += k basis(i, j)` over the rows, with the
/// choice of `(i, j)` made once outside the loop (so that the loop vectorizes).
#[inline(always)]
fn basis_rows<const SET: bool>(o: &mut [f64], k: f64, i: usize, j: usize, a: &Arcs<'_>) {
    #[inline(always)]
    fn run<const SET: bool>(
        o: &mut [f64],
        k: f64,
        a: &Arcs<'_>,
        f: impl Fn(&Arcs<'_>, usize) -> f64,
    ) {
        let n = o.len();
        let (sd1, s12, rho, pt, jv) = (
            &a.sd1[..n],
            &a.s12[..n],
            &a.rho[..n],
            &a.pt[..n],
            &a.jv[..n],
        );
        let b = Arcs {
            sd1,
            sd2: a.sd2,
            s12,
            rho,
            pt,
            jv,
        };
        for (r, o) in o.iter_mut().enumerate() {
            let v = k * f(&b, r);
            if SET {
                *o = v;
            } else {
                *o += v;
            }
        }
    }
    macro_rules! arms {
        ($(($x:literal, $y:literal)),*) => {
            match (i, j) {
                $(($x, $y) => run::<SET>(o, k, a, |b, r| {
                    basis($x, $y, b.sd1[r], b.sd2, b.s12[r], b.rho[r], b.pt[r], b.jv[r])
                }),)*
                _ => unreachable!("atom index out of range"),
            }
        };
    }
    arms!(
        (0, 0),
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 0),
        (1, 1),
        (1, 2),
        (1, 3),
        (2, 0),
        (2, 1),
        (2, 2),
        (2, 3),
        (3, 0),
        (3, 1),
        (3, 2),
        (3, 3)
    );
}

/// `E[f(u)]` over the atoms at `sd = sqrt(Var u)` (`dual/pairs.rs` `atom_mean`).
#[inline(always)]
pub(super) fn mean_terms(t: &[f64; 4], sd: f64) -> f64 {
    t[0] + 0.5 * t[2] + t[3] * sd * INV_SQRT_2PI
}

/// `rho`, `π - θ`, `J` from a covariance and `n = sd1 sd2` (snapped as in `dual/mod.rs`).
#[inline(always)]
fn arc(s12: f64, n: f64) -> (f64, f64, f64, f64) {
    let s12c = s12.max(-n).min(n);
    let r = s12 / n;
    let r = if r >= 1.0 - super::super::dual::SNAP {
        1.0
    } else {
        r
    };
    let rho = if r <= -1.0 + super::super::dual::SNAP {
        -1.0
    } else {
        r
    };
    let (jv, pt) = fastmath::arccos_pair(rho);
    (s12c, rho, pt, jv)
}

/// One kernel entry, scalar (the diagonal pass).
#[allow(clippy::needless_range_loop)]
pub(super) fn kern_scalar(tf: &[f64; 4], tg: &[f64; 4], d1: f64, d2: f64, s12: f64) -> f64 {
    let (sd1, sd2) = (d1.max(0.0).sqrt(), d2.max(0.0).sqrt());
    if d1.is_nan() || d2.is_nan() {
        return f64::NAN;
    }
    let (z1, z2) = (d1 <= TINY_VAR, d2 <= TINY_VAR);
    if z1 || z2 {
        return zero_var(tf, tg, z1, z2, sd1, sd2);
    }
    let (s12c, rho, pt, jv) = arc(s12, sd1 * sd2);
    let mut v = 0.0;
    for i in 0..4 {
        for j in 0..4 {
            let c = tf[i] * tg[j];
            if c != 0.0 {
                v += c * basis(i, j, sd1, sd2, s12c, rho, pt, jv);
            }
        }
    }
    v
}

/// A kernel entry with a zero variance (`dual/mod.rs` `Plan::Terms`): `f(0) E[g]`, `E[f] g(0)`
/// or `f(0) g(0)` (every atom but `1` vanishes at 0).
#[inline(always)]
fn zero_var(tf: &[f64; 4], tg: &[f64; 4], z1: bool, z2: bool, sd1: f64, sd2: f64) -> f64 {
    match (z1, z2) {
        (true, true) => tf[0] * tg[0],
        (true, false) => tf[0] * mean_terms(tg, sd2),
        _ => tg[0] * mean_terms(tf, sd1),
    }
}

/// What every tile reads.
pub(super) struct Problem<'a> {
    pub(super) tape: &'a Tape,
    pub(super) p: usize,
    /// Inputs, each `P x d` column-major, with `d`.
    pub(super) inputs: &'a [(&'a [f64], usize)],
    /// Per diagonal slot: `Var` at every point and its square root.
    pub(super) dval: &'a [Vec<f64>],
    pub(super) dsq: &'a [Vec<f64>],
    /// Per diagonal slot: is some variance zero (`<= TINY_VAR`)?
    pub(super) dzero: &'a [bool],
    /// Per Mean node: its value at every point.
    pub(super) means: &'a [Vec<f64>],
}

/// Side of a tile.
const TILE: usize = 32;

/// Columns of a tile per strip: every tape operation runs over `NC` columns at once, so
/// that its dispatch (the match, operand slices, loop set-up) is paid once per
/// `NC * TILE` entries instead of per column — with a dozen operations per layer and a
/// few flops each, that overhead was a third of the evaluator's time. A register is
/// `NC * TILE` long, column `c` at offset `c * TILE`.
const NC: usize = 4;

/// The entries a strip covers: rows `i0..`, columns `j0..j0 + nc`, and the rows of each
/// column (`ni`, or on a diagonal tile those on or above the diagonal).
#[derive(Clone, Copy)]
struct Span {
    i0: usize,
    j0: usize,
    nc: usize,
    rows: [usize; NC],
    /// Every column has `TILE` rows: elementwise operations run over whole registers.
    full: bool,
}

impl Span {
    fn new(i0: usize, j0: usize, nc: usize, ni: usize, diag_from: Option<usize>) -> Span {
        let mut rows = [0usize; NC];
        for (c, r) in rows.iter_mut().enumerate().take(nc) {
            *r = match diag_from {
                Some(jj) => (jj + c + 1).min(ni),
                None => ni,
            };
        }
        let full = nc == NC && rows.iter().all(|&r| r == TILE);
        Span {
            i0,
            j0,
            nc,
            rows,
            full,
        }
    }
}

/// `o = f(x...)` elementwise over the entries of a span: whole registers when every
/// column is full (one loop over `NC * TILE`), else column by column.
macro_rules! elementwise {
    ($sp:expr, $regs:expr, |$o:ident $(, $x:ident = [$rx:expr])*| $body:expr, $dst:expr) => {{
        let base = $regs.as_mut_ptr();
        let run = |off: usize, len: usize| {
            // SAFETY: registers are disjoint `NC * TILE`-long ranges of `regs`, `off + len`
            // stays inside one, and `dst` is never among the registers read (compile
            // allocates it before freeing the operands).
            let $o = unsafe {
                std::slice::from_raw_parts_mut(base.add($dst * NC * TILE + off), len)
            };
            $(let $x = unsafe {
                std::slice::from_raw_parts(base.add($rx * NC * TILE + off), len) as &[f64]
            };)*
            $body
        };
        if $sp.full {
            run(0, NC * TILE);
        } else {
            for c in 0..$sp.nc {
                run(c * TILE, $sp.rows[c]);
            }
        }
    }};
}

fastmath::simd_fn! {
    /// Runs the tape on the entries of `sp`: registers `regs[r * NC * TILE ..]`.
    #[allow(clippy::needless_range_loop)]
    fn strip(regs: &mut [f64], sp: Span, pb: &Problem<'_>) {
        let p = pb.p;
        let i0 = sp.i0;
        for op in &pb.tape.ops {
            match op {
                TOp::Const { dst, c } => elementwise!(sp, regs, |o| o.fill(*c), *dst),
                TOp::Gram { dst, a, b } => {
                    let (xa, d) = pb.inputs[*a];
                    let xb = pb.inputs[*b].0;
                    for c in 0..sp.nc {
                        let (rows, j) = (sp.rows[c], sp.j0 + c);
                        let o = &mut regs[(dst * NC + c) * TILE..][..rows];
                        o.fill(0.0);
                        for k in 0..d {
                            let xj = xb[k * p + j];
                            for (o, &xi) in o.iter_mut().zip(&xa[k * p + i0..k * p + i0 + rows]) {
                                *o += xi * xj;
                            }
                        }
                    }
                }
                TOp::Lin { dst, k, terms } => match terms.as_slice() {
                    [(c0, r0)] => elementwise!(
                        sp,
                        regs,
                        |o, x = [*r0]| for (o, &a) in o.iter_mut().zip(x) {
                            *o = k + c0 * a;
                        },
                        *dst
                    ),
                    [(c0, r0), (c1, r1)] => elementwise!(
                        sp,
                        regs,
                        |o, x = [*r0], y = [*r1]| for ((o, &a), &b) in o.iter_mut().zip(x).zip(y) {
                            *o = k + c0 * a + c1 * b;
                        },
                        *dst
                    ),
                    _ => {
                        let base = regs.as_mut_ptr();
                        let run = |off: usize, len: usize| {
                            // SAFETY: as in `elementwise!`.
                            let o = unsafe {
                                std::slice::from_raw_parts_mut(base.add(dst * NC * TILE + off), len)
                            };
                            o.fill(*k);
                            for &(c, r) in terms.iter() {
                                // SAFETY: as in `elementwise!`.
                                let x = unsafe {
                                    std::slice::from_raw_parts(base.add(r * NC * TILE + off), len)
                                };
                                for (o, &a) in o.iter_mut().zip(x) {
                                    *o += c * a;
                                }
                            }
                        };
                        if sp.full {
                            run(0, NC * TILE);
                        } else {
                            for c in 0..sp.nc {
                                run(c * TILE, sp.rows[c]);
                            }
                        }
                    }
                },
                TOp::Mul { dst, c, a, b } => elementwise!(
                    sp,
                    regs,
                    |o, x = [*a], y = [*b]| for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                        *o = c * x * y;
                    },
                    *dst
                ),
                TOp::Point { dst, arr, col } => {
                    let a = &pb.means[*arr];
                    for c in 0..sp.nc {
                        let rows = sp.rows[c];
                        let o = &mut regs[(dst * NC + c) * TILE..][..rows];
                        if *col {
                            o.fill(a[sp.j0 + c]);
                        } else {
                            o.copy_from_slice(&a[i0..i0 + rows]);
                        }
                    }
                }
                TOp::Kern { cc, cross, du, dv, outs, acos, relu_step } => {
                    if let Some([(rd, kr), (sd, ks)]) = *relu_step {
                        // One loop: covariance, acos, both outputs (the same arithmetic
                        // as the general branch below, without its intermediate arrays).
                        for c in 0..sp.nc {
                            let (rows, j) = (sp.rows[c], sp.j0 + c);
                            let base = regs.as_mut_ptr();
                            // SAFETY: `rd`, `sd` and `cross` are distinct registers (compile
                            // allocates the outputs before freeing the operands), each
                            // `NC * TILE` long; column c's `rows <= TILE` entries are in it.
                            let (x, o1, o2) = unsafe {
                                (
                                    std::slice::from_raw_parts(base.add((cross * NC + c) * TILE), rows)
                                        as &[f64],
                                    std::slice::from_raw_parts_mut(base.add((rd * NC + c) * TILE), rows),
                                    std::slice::from_raw_parts_mut(base.add((sd * NC + c) * TILE), rows),
                                )
                            };
                            let sd1 = &pb.dsq[*du][i0..i0 + rows];
                            let sd2 = pb.dsq[*dv][j];
                            for r in 0..rows {
                                let (cl, ro, a, b) = arc(cc * x[r], sd1[r] * sd2);
                                o1[r] = kr * basis(3, 3, sd1[r], sd2, cl, ro, a, b);
                                o2[r] = ks * basis(2, 2, sd1[r], sd2, cl, ro, a, b);
                            }
                            let d1 = &pb.dval[*du][i0..i0 + rows];
                            let z2 = pb.dval[*dv][j] <= TINY_VAR;
                            if z2 || pb.dzero[*du] {
                                for out in outs {
                                    let o = if out.dst == rd { &mut *o1 } else { &mut *o2 };
                                    for r in 0..rows {
                                        let z1 = d1[r] <= TINY_VAR;
                                        if z1 || z2 {
                                            o[r] = zero_var(&out.tf, &out.tg, z1, z2, sd1[r], sd2);
                                        }
                                    }
                                }
                            }
                        }
                        continue;
                    }
                    for c in 0..sp.nc {
                        let (rows, j) = (sp.rows[c], sp.j0 + c);
                        let mut s12 = [0.0f64; TILE];
                        let mut rho = [0.0f64; TILE];
                        let mut pt = [0.0f64; TILE];
                        let mut jv = [0.0f64; TILE];
                        let s12 = &mut s12[..rows];
                        let (rho, pt, jv) = (&mut rho[..rows], &mut pt[..rows], &mut jv[..rows]);
                        for (s, &x) in s12.iter_mut().zip(&regs[(cross * NC + c) * TILE..][..rows]) {
                            *s = cc * x;
                        }
                        let sd1 = &pb.dsq[*du][i0..i0 + rows];
                        let d1 = &pb.dval[*du][i0..i0 + rows];
                        let sd2 = pb.dsq[*dv][j];
                        let d2 = pb.dval[*dv][j];
                        let z2 = d2 <= TINY_VAR;
                        if *acos {
                            for r in 0..rows {
                                let (cl, ro, a, b) = arc(s12[r], sd1[r] * sd2);
                                s12[r] = cl;
                                rho[r] = ro;
                                pt[r] = a;
                                jv[r] = b;
                            }
                        } else {
                            for r in 0..rows {
                                let n = sd1[r] * sd2;
                                let cl = s12[r].max(-n).min(n);
                                rho[r] = s12[r] / n;
                                s12[r] = cl;
                            }
                        }
                        for out in outs {
                            let o = &mut regs[(out.dst * NC + c) * TILE..][..rows];
                            let a = Arcs { sd1, sd2, s12, rho, pt, jv };
                            match out.terms.as_slice() {
                                &[(i, jj, k)] => basis_rows::<true>(o, k, i, jj, &a),
                                terms => {
                                    o.fill(0.0);
                                    for &(i, jj, k) in terms {
                                        basis_rows::<false>(o, k, i, jj, &a);
                                    }
                                }
                            }
                            if z2 || pb.dzero[*du] {
                                for r in 0..rows {
                                    let z1 = d1[r] <= TINY_VAR;
                                    if z1 || z2 {
                                        o[r] = zero_var(&out.tf, &out.tg, z1, z2, sd1[r], sd2);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Every value finite (not short-circuiting, so that it vectorizes).
fn finite(x: &[f64]) -> bool {
    x.iter().fold(true, |acc, v| acc & v.is_finite())
}

/// A raw pointer the tile tasks share; see [`tiles`] for why their writes are disjoint.
struct Shared(*mut f64);
// SAFETY: only used as described in `tiles`, where no two tasks touch one entry.
unsafe impl Sync for Shared {}

/// Every tile `(I, J)`, `I <= J`, in parallel: the tape on each column strip, then the
/// results of every ordered output pair `(a, b)` written to rows `a P + i`, columns
/// `b P + j` and transposed to rows `b P + j`, columns `a P + i`. False if a value is
/// not finite.
pub(super) fn tiles(nngp: &mut [f64], ntk: Option<&mut [f64]>, o: usize, pb: &Problem<'_>) -> bool {
    let p = pb.p;
    let big = o * p;
    assert_eq!(nngp.len(), big * big);
    let nb = p.div_ceil(TILE);
    let list: Vec<(usize, usize)> = (0..nb).flat_map(|j| (0..=j).map(move |i| (i, j))).collect();
    let kp = Shared(nngp.as_mut_ptr());
    let tp = ntk.map(|t| {
        assert_eq!(t.len(), big * big);
        Shared(t.as_mut_ptr())
    });
    let (kp, tp) = (&kp, &tp);
    let pairs = o * o;
    // Tile (I, J) writes, within every output block pair, point blocks (I, J) and
    // (J, I) only; distinct tiles have distinct block pairs, so writes never overlap.
    // Scratch (registers, the tile's results) allocated once per rayon job, not per tile.
    let init = || {
        (
            vec![0.0f64; pb.tape.nreg.max(1) * NC * TILE],
            vec![0.0f64; pairs * TILE * TILE],
            vec![0.0f64; if tp.is_some() { pairs * TILE * TILE } else { 0 }],
        )
    };
    list.par_iter()
        .map_init(init, |(regs, kb, tb), &(bi, bj)| {
            let (i0, j0) = (bi * TILE, bj * TILE);
            let (ni, nj) = ((p - i0).min(TILE), (p - j0).min(TILE));
            let diag = bi == bj;
            let mut ok = true;
            for jc in (0..nj).step_by(NC) {
                let sp = Span::new(i0, j0 + jc, NC.min(nj - jc), ni, diag.then_some(jc));
                strip(regs, sp, pb);
                for c in 0..sp.nc {
                    let (jj, rows) = (jc + c, sp.rows[c]);
                    for k in 0..pairs {
                        let src = &regs[(pb.tape.nngp[k] * NC + c) * TILE..][..rows];
                        ok &= finite(src);
                        kb[k * TILE * TILE + jj * TILE..][..rows].copy_from_slice(src);
                        if let Some(r) = pb.tape.ntk[k] {
                            if tp.is_some() {
                                let src = &regs[(r * NC + c) * TILE..][..rows];
                                ok &= finite(src);
                                tb[k * TILE * TILE + jj * TILE..][..rows].copy_from_slice(src);
                            }
                        }
                    }
                }
            }
            if !ok {
                return false;
            }
            for (buf, ptr) in [(&*kb, Some(kp)), (&*tb, tp.as_ref())] {
                let Some(ptr) = ptr else { continue };
                for a in 0..o {
                    for b in 0..o {
                        let blk = &buf[(a * o + b) * TILE * TILE..][..TILE * TILE];
                        let (ro, co) = (a * p, b * p);
                        for jj in 0..nj {
                            let rows = if diag { jj + 1 } else { ni };
                            // SAFETY: rows ro+i0.., column co+j0+jj: inside the matrix, in
                            // this tile's block (see above).
                            unsafe {
                                std::slice::from_raw_parts_mut(
                                    ptr.0.add(ro + i0 + (co + j0 + jj) * big),
                                    rows,
                                )
                                .copy_from_slice(&blk[jj * TILE..jj * TILE + rows]);
                            }
                        }
                        // transpose: entry (i, j) also at (co + j, ro + i), along column ro + i
                        for ii in 0..ni {
                            let from = if diag { ii } else { 0 };
                            if from >= nj {
                                continue;
                            }
                            // SAFETY: column ro+i0+ii, rows co+j0+from..co+j0+nj: in block (J, I).
                            let c = unsafe {
                                std::slice::from_raw_parts_mut(
                                    ptr.0.add(co + j0 + from + (ro + i0 + ii) * big),
                                    nj - from,
                                )
                            };
                            for (k, jj) in (from..nj).enumerate() {
                                c[k] = blk[ii + jj * TILE];
                            }
                        }
                    }
                }
            }
            true
        })
        .all(|ok| ok)
}
