//! Branch-free `acos` that vectorizes, and CPU-feature dispatch for the loops that use it.
//!
//! The arc-cosine kernels of theory.md §3.2 (relu·relu, step·step) cost one `acos` per
//! entry and layer; libm's is a scalar function call with branches, so a loop over a
//! covariance column cannot be vectorized around it. [`acos`] is fdlibm's algorithm
//! (the same rational approximation `R(z)` of `(asin s - s)/s`, error below 2^-58 on
//! `z <= 1/4`) with the three ranges selected instead of branched on, so LLVM turns a loop
//! over it into SIMD code: one division and one square root per entry. It drops fdlibm's
//! last-bit corrections (the hi/lo split of π/2 and of `sqrt z`), so it is within a few
//! ulps of the correctly rounded value, not one: a relative error below 1e-15 on [-1, 1],
//! tested below against `std` on a dense grid and near ±1.
//!
//! `simd` runs a closure in a function compiled for AVX-512F or AVX2+FMA when the CPU
//! has them (runtime detection), else as is. There is no fused multiply-add contraction
//! in Rust, so every version rounds identically: results do not depend on the machine.

const PIO2: f64 = std::f64::consts::FRAC_PI_2;
const PI: f64 = std::f64::consts::PI;

// fdlibm e_acos.c's coefficients as printed there (they round to the intended doubles).
#[allow(clippy::excessive_precision)]
const PS0: f64 = 1.666_666_666_666_666_574_15e-1;
#[allow(clippy::excessive_precision)]
const PS1: f64 = -3.255_658_186_224_009_154_05e-1;
#[allow(clippy::excessive_precision)]
const PS2: f64 = 2.012_125_321_348_629_258_81e-1;
#[allow(clippy::excessive_precision)]
const PS3: f64 = -4.005_553_450_067_941_140_27e-2;
#[allow(clippy::excessive_precision)]
const PS4: f64 = 7.915_349_942_898_145_321_76e-4;
#[allow(clippy::excessive_precision)]
const PS5: f64 = 3.479_331_075_960_211_675_70e-5;
#[allow(clippy::excessive_precision)]
const QS1: f64 = -2.403_394_911_734_414_218_78;
#[allow(clippy::excessive_precision)]
const QS2: f64 = 2.020_945_760_233_505_694_71;
#[allow(clippy::excessive_precision)]
const QS3: f64 = -6.882_839_716_054_532_930_30e-1;
#[allow(clippy::excessive_precision)]
const QS4: f64 = 7.703_815_055_590_193_527_91e-2;

/// `acos x` for `x` in [-1, 1] (NaN outside or for NaN), without branches.
///
/// `|x| <= 1/2`: `π/2 - asin x`; `x > 1/2`: `2 asin sqrt((1-x)/2)`; `x < -1/2`:
/// `π - 2 asin sqrt((1+x)/2)`; each `asin s = s + s R(s²)` with fdlibm's `R`. Near
/// `x = 1` the result is `~ sqrt(2(1-x))`, and `(1-x)/2` is exact (Sterbenz), so the
/// relative error stays at a few ulps there too.
#[inline(always)]
pub fn acos(x: f64) -> f64 {
    let a = x.abs();
    let small = a <= 0.5;
    let zb = (1.0 - a) * 0.5;
    let z = if small { x * x } else { zb };
    let sb = zb.sqrt();
    let s = if small { x } else { sb };
    let p = z * (PS0 + z * (PS1 + z * (PS2 + z * (PS3 + z * (PS4 + z * PS5)))));
    let q = 1.0 + z * (QS1 + z * (QS2 + z * (QS3 + z * QS4)));
    let t = s + s * (p / q);
    let big = if x > 0.0 { 2.0 * t } else { PI - 2.0 * t };
    let r = if small { PIO2 - t } else { big };
    // acos(NaN) and |x| > 1 are NaN, as in libm (sqrt of a negative is NaN already for
    // x > 1 and x < -1; keep the NaN input explicit).
    if x.is_nan() {
        f64::NAN
    } else {
        r
    }
}

/// Defines a function compiled three times — for AVX-512F, for AVX2+FMA and for the
/// baseline — and picks the version at run time (`is_x86_feature_detected!`, cached).
/// The body should be a loop over slices calling `#[inline(always)]` functions such as
/// [`acos`], so that LLVM vectorizes it with the wider registers. Rust never contracts
/// `a * b + c` into a fused multiply-add, so all versions round identically.
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident : $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) {
            #[inline(always)]
            fn inner($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v512($($a: $t),*) {
                    inner($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v256($($a: $t),*) {
                    inner($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { v512($($a),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    return unsafe { v256($($a),*) };
                }
            }
            inner($($a),*)
        }
    };
}
pub(crate) use simd_fn;

/// `E[relu(u) relu(v)] * 2π / n` and `E[step(u) step(v)] * 2π`, i.e. the arc-cosine
/// pair `(sin θ + (π - θ) cos θ, π - θ)` at `cos θ = rho` (theory.md §3.2), with
/// `π - θ = acos(-rho)` computed directly (no cancellation as `rho -> -1`) and `sin θ`
/// from `(1 - rho)(1 + rho)`.
#[inline(always)]
pub fn arccos_pair(rho: f64) -> (f64, f64) {
    let pt = acos(-rho);
    (((1.0 - rho) * (1.0 + rho)).sqrt() + pt * rho, pt)
}

/// `len` zeros in fresh memory marked for transparent huge pages (Linux `madvise`), for
/// the M x M kernel matrices: their first touch then costs one fault per 2 MiB instead
/// of per 4 KiB, and the transposed writes of a tiled pass miss the TLB far less.
/// (At M = 4000 this halves the fused ReLU chain's time on a 2-core VM.) Elsewhere, or
/// when the advice is refused, plain zeros: the contents are the same.
pub fn huge_zeros(len: usize) -> Vec<f64> {
    // Large zeroed allocations come from fresh, untouched mappings (calloc/mmap), so the
    // advice reaches pages before their first touch.
    let v = vec![0.0f64; len];
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let bytes = len * std::mem::size_of::<f64>();
        let start = v.as_ptr() as usize;
        let aligned = start.div_ceil(PAGE) * PAGE;
        if bytes >= 4 << 20 && aligned < start + bytes {
            // SAFETY: madvise only gives the kernel advice about pages of this live
            // allocation (page-aligned start, length inside it); it changes no contents.
            unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    start + bytes - aligned,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    v
}

/// A parallel tiled copy of the upper triangle onto the lower one of a square
/// column-major `n x n` matrix.
pub fn mirror_upper_par(s: &mut [f64], n: usize) {
    use rayon::prelude::*;
    const T: usize = 64;
    assert_eq!(s.len(), n * n, "mirror_upper_par needs a square matrix");
    struct Ptr(*mut f64);
    // SAFETY: shared across threads only as below, where writes are disjoint.
    unsafe impl Sync for Ptr {}
    let ptr = Ptr(s.as_mut_ptr());
    let ptr = &ptr;
    let blocks = n.div_ceil(T);
    // Destination column blocks: block jb writes the lower entries (i, j), i > j, of
    // columns j in [jb*T, jb*T + T) and reads the upper entries (j, i), i > j; no upper
    // entry is ever written and no lower entry read, and the column blocks are disjoint,
    // so no write races with any access.
    (0..blocks).into_par_iter().for_each(|b| {
        let jb = b * T;
        for ib in (jb..n).step_by(T) {
            for j in jb..(jb + T).min(n) {
                for i in ib.max(j + 1)..(ib + T).min(n) {
                    // SAFETY: i, j < n, so both offsets are inside the n*n slice; see
                    // the disjointness argument above.
                    unsafe {
                        let v = *ptr.0.add(j + i * n);
                        *ptr.0.add(i + j * n) = v;
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: f64, b: f64) -> f64 {
        if a == b {
            0.0
        } else {
            (a - b).abs() / b.abs()
        }
    }

    #[test]
    fn acos_matches_std_to_1e_15() {
        let mut worst = 0.0f64;
        let mut check = |x: f64| {
            let (a, b) = (acos(x), x.acos());
            assert!(a.is_finite(), "acos({x}) = {a}");
            worst = worst.max(rel(a, b));
        };
        let n = 2_000_000;
        for i in 0..=n {
            check(-1.0 + 2.0 * i as f64 / n as f64);
        }
        // Near ±1, where acos(1 - e) ~ sqrt(2e), and across the 1/2 switch.
        for k in 0..1100 {
            let e = 2f64.powf(-(k as f64) / 20.0);
            for x in [1.0 - e, -1.0 + e, 0.5 + e * 0.5, 0.5 - e * 0.5] {
                if (-1.0..=1.0).contains(&x) {
                    check(x);
                    check(-x);
                }
            }
        }
        for x in [
            1.0,
            -1.0,
            0.0,
            -0.0,
            0.5,
            -0.5,
            f64::EPSILON,
            1.0 - f64::EPSILON / 2.0,
            -1.0 + f64::EPSILON / 2.0,
        ] {
            check(x);
        }
        assert!(worst <= 1e-15, "worst relative error {worst:e}");
        assert_eq!(acos(1.0), 0.0);
        assert_eq!(acos(-1.0), PI);
        assert!(acos(f64::NAN).is_nan() && acos(1.5).is_nan() && acos(-1.5).is_nan());
    }

    #[test]
    fn vectorized_and_scalar_agree_bitwise_and_kernel_is_accurate() {
        let xs: Vec<f64> = (0..10_001)
            .map(|i| -1.0 + 2.0 * i as f64 / 10_000.0)
            .collect();
        let mut v = vec![0.0; xs.len()];
        simd_fn! {
            fn pairs(xs: &[f64], v: &mut [f64]) {
                for (o, &x) in v.iter_mut().zip(xs) {
                    *o = arccos_pair(x).0;
                }
            }
        }
        pairs(&xs, &mut v);
        for (&o, &x) in v.iter().zip(&xs) {
            assert_eq!(o.to_bits(), arccos_pair(x).0.to_bits());
            // J(rho) = sin θ + (π - θ) ρ with std's acos
            let th = x.acos();
            let want = ((1.0 - x) * (1.0 + x)).sqrt() + (PI - th) * x;
            // absolute error against the kernel's scale (J(1) = π): cancellation makes
            // the relative error of J itself grow as rho -> -1 for either acos.
            assert!((o - want).abs() <= 1e-14, "J({x}) = {o} vs {want}");
        }
    }

    #[test]
    fn parallel_mirror_copies_the_upper_triangle() {
        for n in [0, 1, 5, 64, 65, 130] {
            let mut s: Vec<f64> = (0..n * n).map(|k| k as f64).collect();
            mirror_upper_par(&mut s, n);
            for j in 0..n {
                for i in 0..n {
                    let want = if i <= j {
                        (i + j * n) as f64
                    } else {
                        (j + i * n) as f64
                    };
                    assert_eq!(s[i + j * n], want);
                }
            }
        }
    }
}
