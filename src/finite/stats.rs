//! Means and standard errors over draws that arrive one at a time (`Moments`).

use nalgebra::DMatrix;

use super::types::Estimate;

/// Bytes a block of [`Moments`] may buffer: with the means and spreads it is what the
/// statistics of a run hold, whatever K.
const MOMENTS_BUFFER_BYTES: usize = 64 << 20;

/// Means and standard errors over draws that arrive one at a time, in draw order: K
/// may be 10^8 without holding K results (issue 12).
///
/// Draws are buffered in blocks of a fixed size (set by the size of one result, never
/// by the machine, so output is the same everywhere). A run of at most one block is
/// the exact two-pass computation, mean Σv/K then Σ(v − mean)²; longer runs merge
/// block statistics by Chan, Golub and LeVeque's pairwise update, keeping each
/// entry's *population variance* M2/K (bounded by the largest squared deviation, so it
/// cannot overflow where M2 could).
///
/// Squares are formed after dividing by a power of two when a deviation exceeds
/// 2^500 (exact, so ordinary values give the same bits as unscaled sums): a finite mean
/// gets a finite standard error.
pub(super) struct Moments {
    block: usize,
    buf: Vec<DMatrix<f64>>,
    /// Draws merged from full blocks, with their mean and population variance.
    done: usize,
    mean: DMatrix<f64>,
    var: DMatrix<f64>,
}

impl Moments {
    pub(super) fn new(block: usize) -> Moments {
        Moments {
            block: block.max(2),
            buf: Vec::new(),
            done: 0,
            mean: DMatrix::zeros(0, 0),
            var: DMatrix::zeros(0, 0),
        }
    }

    /// The block size for results of `words` numbers each: as many as fit in
    /// [`MOMENTS_BUFFER_BYTES`], between 2 and 4096.
    pub(super) fn block_for(words: usize) -> usize {
        (MOMENTS_BUFFER_BYTES / (8 * words.max(1))).clamp(2, 4096)
    }

    pub(super) fn push(&mut self, v: DMatrix<f64>) {
        self.buf.push(v);
        if self.buf.len() == self.block {
            self.fold();
        }
    }

    /// Merges the buffered block into the running statistics.
    fn fold(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let kb = self.buf.len();
        let mean = block_mean(&self.buf);
        let (ss, scale) = spread(&self.buf, &mean);
        // Population variance of the block: s²·(ss/s²)/kb.
        let var = DMatrix::from_fn(mean.nrows(), mean.ncols(), |i, j| {
            let s = scale[(i, j)];
            ss[(i, j)] / kb as f64 * s * s
        });
        self.buf.clear();
        if self.done == 0 {
            (self.done, self.mean, self.var) = (kb, mean, var);
            return;
        }
        let (na, nb) = (self.done as f64, kb as f64);
        let n = na + nb;
        let (wa, wb) = (na / n, nb / n);
        for i in 0..self.mean.len() {
            let d = mean[i] - self.mean[i];
            self.mean[i] += d * wb;
            // (na·var_a + nb·var_b)/n + δ²·(na/n)(nb/n), with δ² formed as (δ·√(wa·wb))².
            let dd = d * (wa * wb).sqrt();
            self.var[i] = wa * self.var[i] + wb * var[i] + dd * dd;
        }
        self.done += kb;
    }

    pub(super) fn finish(mut self) -> Estimate {
        if self.done == 0 {
            // At most one block: the exact two-pass estimate.
            let k = self.buf.len();
            let mean = block_mean(&self.buf);
            if k < 2 {
                return Estimate { mean, se: None };
            }
            let (ss, scale) = spread(&self.buf, &mean);
            let se = DMatrix::from_fn(mean.nrows(), mean.ncols(), |i, j| {
                scale[(i, j)] * (ss[(i, j)] / (k as f64 - 1.0) / k as f64).sqrt()
            });
            return Estimate { mean, se: Some(se) };
        }
        self.fold();
        let k = self.done as f64;
        let se = self.var.map(|v| (v / (k - 1.0)).sqrt());
        Estimate {
            mean: self.mean,
            se: Some(se),
        }
    }
}

/// Σv/k over a block, summed in order.
fn block_mean(vals: &[DMatrix<f64>]) -> DMatrix<f64> {
    let Some(first) = vals.first() else {
        return DMatrix::zeros(0, 0);
    };
    let mut mean = DMatrix::zeros(first.nrows(), first.ncols());
    for v in vals {
        mean += v;
    }
    mean / vals.len() as f64
}

/// Per entry, Σ((v − mean)/s)² and the scale s: 1 when every deviation is at most
/// 2^500 (the plain sum, same bits), else the power of two at the top of the largest.
fn spread(vals: &[DMatrix<f64>], mean: &DMatrix<f64>) -> (DMatrix<f64>, DMatrix<f64>) {
    let big = 2f64.powi(500);
    let mut top = DMatrix::<f64>::zeros(mean.nrows(), mean.ncols());
    for v in vals {
        for i in 0..mean.len() {
            top[i] = top[i].max((v[i] - mean[i]).abs());
        }
    }
    let scale = top.map(|t| {
        if t > big && t.is_finite() {
            f64::from_bits(t.to_bits() & 0x7ff0_0000_0000_0000)
        } else {
            1.0
        }
    });
    let mut ss = DMatrix::zeros(mean.nrows(), mean.ncols());
    for v in vals {
        for i in 0..mean.len() {
            let d = (v[i] - mean[i]) / scale[i];
            ss[i] += d * d;
        }
    }
    (ss, scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(v: f64) -> DMatrix<f64> {
        DMatrix::from_element(1, 1, v)
    }

    /// Up to one block, [`Moments`] is the two-pass estimate bit for bit; past it the
    /// merged blocks agree with the two-pass estimate to rounding.
    #[test]
    fn moments_match_the_two_pass_estimate() {
        let xs: Vec<f64> = (0..1000)
            .map(|i| ((i * 7919 % 1013) as f64).sin() * 3.0 + 1.0)
            .collect();
        let two_pass = |xs: &[f64]| {
            let k = xs.len() as f64;
            let mean = xs.iter().sum::<f64>() / k;
            let ss: f64 = xs.iter().map(|x| (x - mean) * (x - mean)).sum();
            (mean, (ss / (k - 1.0) / k).sqrt())
        };
        let mut m = Moments::new(4096);
        xs.iter().for_each(|&x| m.push(one(x)));
        let e = m.finish();
        let (mean, se) = two_pass(&xs);
        assert_eq!(e.mean[0], mean);
        assert_eq!(e.se.unwrap()[0], se);
        for block in [2, 3, 16, 333] {
            let mut m = Moments::new(block);
            xs.iter().for_each(|&x| m.push(one(x)));
            let e = m.finish();
            assert!(
                (e.mean[0] - mean).abs() <= 1e-13 * mean.abs(),
                "block {block}"
            );
            let got = e.se.unwrap()[0];
            assert!(
                (got - se).abs() <= 1e-12 * se,
                "block {block}: {got} vs {se}"
            );
        }
    }

    /// Issue 12: values near 1e150 had a finite mean and an infinite standard error
    /// (the squares overflowed). Scaled squares give the right one, merged or not.
    #[test]
    fn huge_values_get_a_finite_standard_error() {
        let xs = [1e150, -9e149, 5e149, -1e150, 2e149];
        let k = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / k;
        let ss: f64 = xs.iter().map(|x| ((x - mean) / 1e150).powi(2)).sum();
        let want = 1e150 * (ss / (k - 1.0) / k).sqrt();
        for block in [2, 4096] {
            let mut m = Moments::new(block);
            xs.iter().for_each(|&x| m.push(one(x)));
            let e = m.finish();
            let se = e.se.unwrap()[0];
            assert!(
                se.is_finite() && (se - want).abs() <= 1e-12 * want,
                "{se:e} vs {want:e}"
            );
        }
    }
}
