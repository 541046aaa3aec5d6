//! The dense products a finite-width Tensor Program run needs, at hardware speed.
//!
//! A run keeps activations as N×P blocks (one column per input point) and applies
//! `W x`, `Wᵀ x` (backward passes, and `W.T @ x` in the language) and sums of such
//! products. nalgebra stays the matrix type at the API — it is what the rest of tpc
//! uses — but its own gemm (matrixmultiply) is single-threaded unless a cargo
//! feature is unified in, its matrix-vector product is a plain loop, and `W.T @ x`
//! through nalgebra materialises the transpose. So every product here wraps
//! nalgebra's storage in zero-copy faer views (a transpose is just swapped
//! strides; faer's packing reads either layout) and calls
//! `faer::linalg::matmul::matmul`, whose x86 kernels are picked at run time
//! (AVX-512 or AVX2+FMA, whichever the CPU has).
//!
//! All entry points accept nalgebra views as well as owned matrices, so the
//! executor can multiply into a block of a larger buffer, and the `*_into` forms
//! compute `C = α·op(A)·op(B) + β·C` in place so that `W x + U z` needs no
//! temporary: the second product is accumulated with `β = 1`.

use faer::linalg::matmul::matmul as faer_matmul;
use faer::{Accum, MatMut, MatRef, Par};
use nalgebra::{DMatrix, Dyn, Matrix, Storage, StorageMut};
use rayon::prelude::*;

/// Whether an operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    /// `A`
    No,
    /// `Aᵀ` (a strided view, never a copy)
    Yes,
}

impl Trans {
    /// The shape of `op(A)` for an `A` of shape `(rows, cols)`.
    fn apply(self, (rows, cols): (usize, usize)) -> (usize, usize) {
        match self {
            Trans::No => (rows, cols),
            Trans::Yes => (cols, rows),
        }
    }
}

/// Shapes that cannot be multiplied: a compiler bug upstream (the type checker
/// should have rejected the program), reported rather than panicking so the
/// executor can attach the program location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot compute a {dst_rows}×{dst_cols} result from {a_rows}×{a_cols} times {b_rows}×{b_cols} (shapes after transposition)")]
pub struct ShapeError {
    /// Rows of `op(A)`.
    pub a_rows: usize,
    /// Columns of `op(A)`.
    pub a_cols: usize,
    /// Rows of `op(B)`.
    pub b_rows: usize,
    /// Columns of `op(B)`.
    pub b_cols: usize,
    /// Rows of the destination.
    pub dst_rows: usize,
    /// Columns of the destination.
    pub dst_cols: usize,
}

/// Products with fewer multiply-adds than this run on the calling thread: below
/// it, waking rayon workers costs more than the second core gives back. faer's
/// own cut-off (32 768 MACs, i.e. 32³) is far too low for a 2-vCPU VM. Measured
/// with `cargo bench --bench finite_kernels -- --calibrate` while other jobs
/// used about one core: 2 threads were 3–25× *slower* than one from 32³ to 96³,
/// reached parity around 192³ and 384×384·64, and won (1.4×) at 512×512·64.
/// On an idle machine the crossover is lower. 4 M MACs (256×256·64, or 161³)
/// splits the difference: a wrong choice near it costs well under a millisecond.
pub const PAR_THRESHOLD_MACS: usize = 1 << 22;

/// The parallelism for an `m×k` by `k×n` product: all rayon threads for large
/// products, sequential for small ones (see [`PAR_THRESHOLD_MACS`]).
pub fn par_for(m: usize, n: usize, k: usize) -> Par {
    let macs = m.saturating_mul(n).saturating_mul(k);
    if macs >= PAR_THRESHOLD_MACS && rayon::current_num_threads() > 1 {
        Par::rayon(0)
    } else {
        Par::Seq
    }
}

/// A zero-copy faer view of a nalgebra matrix or view, transposed if asked.
fn view<S: Storage<f64, Dyn, Dyn>>(m: &Matrix<f64, Dyn, Dyn, S>, t: Trans) -> MatRef<'_, f64> {
    let (rows, cols) = m.shape();
    let (rs, cs) = m.strides();
    // nalgebra storage never exceeds isize::MAX bytes, so its strides fit in isize.
    let (rs, cs) = (rs as isize, cs as isize);
    // SAFETY: nalgebra guarantees that `as_ptr() + i*rs + j*cs` is a valid,
    // initialised f64 for every i < rows, j < cols, for as long as `m` is borrowed;
    // the returned view borrows `m` for that lifetime and only reads.
    let v = unsafe { MatRef::from_raw_parts(m.as_ptr(), rows, cols, rs, cs) };
    match t {
        Trans::No => v,
        Trans::Yes => v.transpose(),
    }
}

/// A zero-copy mutable faer view of a nalgebra matrix or mutable view.
fn view_mut<S: StorageMut<f64, Dyn, Dyn>>(m: &mut Matrix<f64, Dyn, Dyn, S>) -> MatMut<'_, f64> {
    let (rows, cols) = m.shape();
    let (rs, cs) = m.strides();
    let (rs, cs) = (rs as isize, cs as isize);
    // SAFETY: as in `view`; in addition `m` is borrowed mutably, so no other view
    // of these elements exists while the returned one lives, and nalgebra's safe
    // constructors never give a mutable storage with overlapping elements.
    unsafe { MatMut::from_raw_parts_mut(m.as_mut_ptr(), rows, cols, rs, cs) }
}

/// `C = α·op(A)·op(B) + β·C`, the general form every other function here calls.
///
/// As in BLAS, `β = 0` ignores the old contents of `C` (even NaN) and `β = 1`
/// accumulates without a scaling pass. Works on owned matrices and views alike.
pub fn gemm<SC, SA, SB>(
    c: &mut Matrix<f64, Dyn, Dyn, SC>,
    alpha: f64,
    a: &Matrix<f64, Dyn, Dyn, SA>,
    ta: Trans,
    b: &Matrix<f64, Dyn, Dyn, SB>,
    tb: Trans,
    beta: f64,
) -> Result<(), ShapeError>
where
    SC: StorageMut<f64, Dyn, Dyn>,
    SA: Storage<f64, Dyn, Dyn>,
    SB: Storage<f64, Dyn, Dyn>,
{
    let (a_rows, a_cols) = ta.apply(a.shape());
    let (b_rows, b_cols) = tb.apply(b.shape());
    let (dst_rows, dst_cols) = c.shape();
    if a_cols != b_rows || a_rows != dst_rows || b_cols != dst_cols {
        return Err(ShapeError {
            a_rows,
            a_cols,
            b_rows,
            b_cols,
            dst_rows,
            dst_cols,
        });
    }
    let (m, n, k) = (a_rows, b_cols, a_cols);
    if m == 0 || n == 0 {
        return Ok(());
    }
    let accum = if beta == 0.0 {
        Accum::Replace
    } else {
        if beta != 1.0 {
            c.scale_mut(beta);
        }
        Accum::Add
    };
    if k == 0 {
        // An empty sum: op(A)·op(B) = 0.
        if accum == Accum::Replace {
            c.fill(0.0);
        }
        return Ok(());
    }
    faer_matmul(
        view_mut(c),
        accum,
        view(a, ta),
        view(b, tb),
        alpha,
        par_for(m, n, k),
    );
    Ok(())
}

/// Rows per task of [`gram_tn`].
const GRAM_ROWS: usize = 1 << 15;

/// `Aᵀ·B` for tall, thin A and B (N×a, N×b with N ≫ a, b: the Gram matrices of the
/// NTK): fixed blocks of rows in parallel, each a sequential product, and the block
/// results summed in order. The same bits whatever the thread count, and no spinning
/// barrier inside faer (a thin product split over k synchronises every few
/// microseconds, which costs more than it gains on a loaded machine).
pub fn gram_tn(a: &DMatrix<f64>, b: &DMatrix<f64>) -> Result<DMatrix<f64>, ShapeError> {
    if a.nrows() != b.nrows() {
        return Err(ShapeError {
            a_rows: a.ncols(),
            a_cols: a.nrows(),
            b_rows: b.nrows(),
            b_cols: b.ncols(),
            dst_rows: a.ncols(),
            dst_cols: b.ncols(),
        });
    }
    let (n, ca, cb) = (a.nrows(), a.ncols(), b.ncols());
    let block = |r0: usize| {
        let len = GRAM_ROWS.min(n - r0);
        let mut c = DMatrix::zeros(ca, cb);
        if ca > 0 && cb > 0 {
            faer_matmul(
                view_mut(&mut c),
                Accum::Replace,
                view(&a.rows(r0, len), Trans::Yes),
                view(&b.rows(r0, len), Trans::No),
                1.0,
                Par::Seq,
            );
        }
        c
    };
    let starts: Vec<usize> = (0..n).step_by(GRAM_ROWS).collect();
    let parts: Vec<DMatrix<f64>> = if starts.len() > 1 {
        starts.par_iter().map(|&r0| block(r0)).collect()
    } else {
        starts.iter().map(|&r0| block(r0)).collect()
    };
    let mut out = DMatrix::zeros(ca, cb);
    for p in &parts {
        out += p;
    }
    Ok(out)
}

/// `A·B` into a new matrix (the `W @ x` case).
pub fn matmul(a: &DMatrix<f64>, b: &DMatrix<f64>) -> Result<DMatrix<f64>, ShapeError> {
    product(a, Trans::No, b, Trans::No)
}

/// `Aᵀ·B` into a new matrix (the `W.T @ x` case) without materialising `Aᵀ`.
pub fn matmul_tn(a: &DMatrix<f64>, b: &DMatrix<f64>) -> Result<DMatrix<f64>, ShapeError> {
    product(a, Trans::Yes, b, Trans::No)
}

/// `A·Bᵀ` into a new matrix (e.g. an outer-product sum `δ xᵀ` over points).
pub fn matmul_nt(a: &DMatrix<f64>, b: &DMatrix<f64>) -> Result<DMatrix<f64>, ShapeError> {
    product(a, Trans::No, b, Trans::Yes)
}

/// `C = α·A·B + β·C`.
pub fn matmul_into<SC, SA, SB>(
    c: &mut Matrix<f64, Dyn, Dyn, SC>,
    alpha: f64,
    a: &Matrix<f64, Dyn, Dyn, SA>,
    b: &Matrix<f64, Dyn, Dyn, SB>,
    beta: f64,
) -> Result<(), ShapeError>
where
    SC: StorageMut<f64, Dyn, Dyn>,
    SA: Storage<f64, Dyn, Dyn>,
    SB: Storage<f64, Dyn, Dyn>,
{
    gemm(c, alpha, a, Trans::No, b, Trans::No, beta)
}

/// `C = α·Aᵀ·B + β·C`, without materialising `Aᵀ`.
pub fn matmul_tn_into<SC, SA, SB>(
    c: &mut Matrix<f64, Dyn, Dyn, SC>,
    alpha: f64,
    a: &Matrix<f64, Dyn, Dyn, SA>,
    b: &Matrix<f64, Dyn, Dyn, SB>,
    beta: f64,
) -> Result<(), ShapeError>
where
    SC: StorageMut<f64, Dyn, Dyn>,
    SA: Storage<f64, Dyn, Dyn>,
    SB: Storage<f64, Dyn, Dyn>,
{
    gemm(c, alpha, a, Trans::Yes, b, Trans::No, beta)
}

fn product(
    a: &DMatrix<f64>,
    ta: Trans,
    b: &DMatrix<f64>,
    tb: Trans,
) -> Result<DMatrix<f64>, ShapeError> {
    let (m, _) = ta.apply(a.shape());
    let (_, n) = tb.apply(b.shape());
    // Zeroed allocation is free for large sizes (fresh pages), and β = 0 makes
    // faer overwrite without reading, so no uninitialised memory is needed.
    let mut c = DMatrix::from_vec(m, n, vec![0.0; m * n]);
    gemm(&mut c, 1.0, a, ta, b, tb, 0.0)?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finite::sample::{normal_matrix, StreamKey};

    fn rand(rows: usize, cols: usize, tensor: u64) -> DMatrix<f64> {
        normal_matrix(rows, cols, 1.0, StreamKey::new(5, 0, tensor)).unwrap()
    }

    fn op(m: &DMatrix<f64>, t: Trans) -> DMatrix<f64> {
        match t {
            Trans::No => m.clone(),
            Trans::Yes => m.transpose(),
        }
    }

    /// The reference: a naive triple loop on explicitly transposed copies.
    fn naive(a: &DMatrix<f64>, b: &DMatrix<f64>) -> DMatrix<f64> {
        let (m, k) = a.shape();
        let n = b.ncols();
        let mut c = DMatrix::zeros(m, n);
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for l in 0..k {
                    s += a[(i, l)] * b[(l, j)];
                }
                c[(i, j)] = s;
            }
        }
        c
    }

    fn assert_close(got: &DMatrix<f64>, want: &DMatrix<f64>, k: usize) {
        assert_eq!(got.shape(), want.shape());
        // Entries are sums of k products of O(1) normals: error ~ k·ε·O(√k).
        let tol = 1e-13 * (k.max(1) as f64).powf(1.5) + 1e-14;
        for (g, w) in got.iter().zip(want.iter()) {
            assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (1, 7, 1),
        (1, 1, 9),
        (9, 1, 1),
        (1, 13, 17),
        (13, 1, 17),
        (13, 17, 1),
        (5, 3, 8),
        (33, 65, 17),
        (64, 64, 64),
        (100, 3, 257),
        (257, 64, 130),
    ];

    #[test]
    fn all_transposes_match_naive() {
        for &(m, n, k) in SHAPES {
            for ta in [Trans::No, Trans::Yes] {
                for tb in [Trans::No, Trans::Yes] {
                    // Stored shapes such that op(A) is m×k and op(B) is k×n.
                    let (ar, ac) = ta.apply((m, k));
                    let (br, bc) = tb.apply((k, n));
                    let a = rand(ar, ac, 1);
                    let b = rand(br, bc, 2);
                    let want = naive(&op(&a, ta), &op(&b, tb));
                    let got = product(&a, ta, &b, tb).unwrap();
                    assert_close(&got, &want, k);
                    // α, β: C = 0.5·AB − 2·C0.
                    let c0 = rand(m, n, 3);
                    let mut c = c0.clone();
                    gemm(&mut c, 0.5, &a, ta, &b, tb, -2.0).unwrap();
                    assert_close(&c, &(want.clone() * 0.5 - &c0 * 2.0), k);
                    // β = 1 accumulates.
                    let mut c = c0.clone();
                    gemm(&mut c, 1.0, &a, ta, &b, tb, 1.0).unwrap();
                    assert_close(&c, &(&want + &c0), k);
                }
            }
        }
    }

    #[test]
    fn named_wrappers() {
        let a = rand(31, 20, 1);
        let b = rand(20, 9, 2);
        let x = rand(31, 9, 4);
        assert_close(&matmul(&a, &b).unwrap(), &naive(&a, &b), 20);
        assert_close(&matmul_tn(&a, &x).unwrap(), &naive(&a.transpose(), &x), 31);
        let bt = b.transpose();
        assert_close(&matmul_nt(&a, &bt).unwrap(), &naive(&a, &b), 20);
        // The fused W x + U z pattern.
        let u = rand(31, 5, 5);
        let z = rand(5, 9, 6);
        let mut h = DMatrix::zeros(31, 9);
        matmul_into(&mut h, 1.0, &a, &b, 0.0).unwrap();
        matmul_into(&mut h, 1.0, &u, &z, 1.0).unwrap();
        assert_close(&h, &(naive(&a, &b) + naive(&u, &z)), 20);
        let mut g = DMatrix::from_element(20, 9, 7.0);
        matmul_tn_into(&mut g, 2.0, &a, &x, 0.0).unwrap();
        assert_close(&g, &(naive(&a.transpose(), &x) * 2.0), 31);
    }

    #[test]
    fn beta_zero_ignores_nan_and_k_zero() {
        let a = rand(4, 3, 1);
        let b = rand(3, 2, 2);
        let mut c = DMatrix::from_element(4, 2, f64::NAN);
        matmul_into(&mut c, 1.0, &a, &b, 0.0).unwrap();
        assert_close(&c, &naive(&a, &b), 3);
        // k = 0: the product is zero, β still applies.
        let a0 = DMatrix::<f64>::zeros(4, 0);
        let b0 = DMatrix::<f64>::zeros(0, 2);
        let mut c = DMatrix::from_element(4, 2, 3.0);
        matmul_into(&mut c, 1.0, &a0, &b0, 0.5).unwrap();
        assert!(c.iter().all(|&v| v == 1.5));
        matmul_into(&mut c, 1.0, &a0, &b0, 0.0).unwrap();
        assert!(c.iter().all(|&v| v == 0.0));
        assert_eq!(matmul(&DMatrix::zeros(0, 3), &b).unwrap().shape(), (0, 2));
    }

    #[test]
    fn views_and_strides() {
        // Multiply sub-blocks of larger matrices into a sub-block of another.
        let big_a = rand(40, 30, 1);
        let big_b = rand(35, 25, 2);
        let a = big_a.view((3, 4), (20, 11));
        let b = big_b.view((5, 2), (11, 7));
        let mut big_c = rand(30, 30, 3);
        let before = big_c.clone();
        {
            let mut c = big_c.view_mut((1, 2), (20, 7));
            matmul_into(&mut c, 1.0, &a, &b, 1.0).unwrap();
        }
        let want = naive(&a.clone_owned(), &b.clone_owned());
        for i in 0..30 {
            for j in 0..30 {
                let inside = (1..21).contains(&i) && (2..9).contains(&j);
                let w = if inside {
                    before[(i, j)] + want[(i - 1, j - 2)]
                } else {
                    before[(i, j)]
                };
                assert!((big_c[(i, j)] - w).abs() < 1e-12, "({i},{j})");
            }
        }
        // Transposed view operand: (rows of a)ᵀ.
        let at = big_a.view((0, 0), (11, 20));
        let mut c = DMatrix::zeros(20, 7);
        gemm(&mut c, 1.0, &at, Trans::Yes, &b, Trans::No, 0.0).unwrap();
        assert_close(&c, &naive(&at.transpose(), &b.clone_owned()), 11);
    }

    #[test]
    fn shape_errors() {
        let a = rand(4, 3, 1);
        let b = rand(4, 2, 2);
        let e = matmul(&a, &b).unwrap_err();
        assert_eq!((e.a_cols, e.b_rows), (3, 4));
        assert!(matmul_tn(&a, &b).is_ok());
        let mut c = DMatrix::zeros(3, 3);
        assert!(matmul_tn_into(&mut c, 1.0, &a, &b, 0.0).is_err());
        assert!(e.to_string().contains("4×3 times 4×2"));
    }

    #[test]
    fn large_parallel_product_matches_sequential() {
        // Above the threshold faer runs on rayon; its blocking differs from the
        // sequential path, so compare with a tolerance.
        let a = rand(300, 200, 1);
        let b = rand(300, 64, 2);
        let got = matmul_tn(&a, &b).unwrap();
        let want = naive(&a.transpose(), &b);
        assert_close(&got, &want, 300);
    }
}
