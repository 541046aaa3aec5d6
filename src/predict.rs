//! Infinite-width prediction from the limit kernels: the NNGP posterior and the NTK
//! gradient-descent ensemble on test points (`tpc predict`).
//!
//! Below the kernels, above nothing: this module sees two P×P matrices over the
//! training and test points (any engine could have made them) and the targets, never
//! syntax. The formulas are those of Neural Tangents' `predict.gradient_descent_mse_ensemble`
//! (Lee et al. 2019, "Wide neural networks of any depth evolve as linear models under
//! gradient descent", eqs. 15–16), written with the eigendecomposition of the
//! regularized train–train kernel `K̃ = K_dd + εI = V Λ Vᵀ` (theory.md §2.3, NTK):
//!
//! * mean, after time t:   `μ_t(x) = μ(x) + Θ_xd · g_t(Θ̃) · (Y − μ_d)`, where
//!   `g_t(λ) = (1 − e^{−λ t / |Y|}) / λ` (continuous time, NT's normalization: the loss
//!   is `(1/(2|Y|)) ‖f − Y‖²`, |Y| the number of target entries) or
//!   `g_k(λ) = (1 − (1 − η λ / B)^k) / λ` (k discrete steps of the `train` block's
//!   gradient descent, language.md: loss `(1/B) Σ ½ ‖f − y‖²` over B points, rate η);
//!   at t = ∞, `g = 1/λ` and the product is a Cholesky solve.
//! * NNGP covariance (training the readout only, the Bayesian posterior at t = ∞):
//!   `K_tt − K_td · g_{2t}(K̃) · K_dt`;
//! * NTK covariance (all layers): with `B_t = Θ_td · g_t(Θ̃)`,
//!   `K_tt + B_t K_dd B_tᵀ − (B_t K_dt + K_td B_tᵀ)`.
//!
//! `μ` is the ensemble mean of the initial outputs (the outputs' constants: readouts are
//! zero-mean). Negative eigenvalues from rounding are clipped at 0 as NT clips them;
//! `g` at λ = 0 is its limit (t/|Y| or kη/B), so a singular kernel is no error for
//! finite times. Several outputs O: kernels are O·P × O·P, output-major (cli.md), and
//! targets have O columns; a single output with C target columns predicts each column
//! with the same kernel (Θ ⊗ I_C, NT's `trace_axes`).

use faer::linalg::solvers::Solve;
use faer::{Mat, Side};
use nalgebra::DMatrix;

/// When the training has run: `t` in continuous time (NT's `t` with learning rate 1),
/// `k` discrete steps of rate `lr`, or to convergence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Time {
    /// Continuous time t ≥ 0 of gradient flow on `(1/(2|Y|)) ‖f − Y‖²`.
    Flow(f64),
    /// `steps` steps of gradient descent with rate `lr` on `(1/B) Σ ½ ‖f − y‖²`.
    Steps { steps: usize, lr: f64 },
    /// t = ∞.
    Infinity,
}

impl std::fmt::Display for Time {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Time::Flow(t) => write!(f, "t = {t}"),
            Time::Steps { steps, lr } => write!(f, "{steps} steps of lr {lr}"),
            Time::Infinity => f.write_str("t = inf"),
        }
    }
}

/// A Gaussian prediction on the test points: mean T×C, covariance over test points
/// (T·O × T·O, output-major; one matrix shared by every target column when O = 1).
#[derive(Clone, Debug)]
pub struct Gaussian {
    pub mean: DMatrix<f64>,
    pub cov: DMatrix<f64>,
}

/// Both predictors at one time.
#[derive(Clone, Debug)]
pub struct Prediction {
    pub time: Time,
    /// The NNGP predictor (readout trained; at t = ∞ the GP posterior).
    pub nngp: Gaussian,
    /// The NTK predictor (every layer trained, linearized dynamics).
    pub ntk: Gaussian,
}

/// The problem, over P = M + T points (training points first, then test points).
#[derive(Clone, Debug)]
pub struct Problem<'a> {
    /// NNGP and NTK, O·P × O·P, output-major.
    pub nngp: &'a DMatrix<f64>,
    pub ntk: &'a DMatrix<f64>,
    /// Outputs O.
    pub outputs: usize,
    /// Training points M (the first M of the P).
    pub train: usize,
    /// Targets, M×C: C = O, or any C when O = 1.
    pub targets: &'a DMatrix<f64>,
    /// Ensemble mean of each initial output (its constant).
    pub prior_mean: &'a [f64],
    /// Diagonal regularization ε.
    pub diag_reg: f64,
    /// `false`: ε is relative, ε·trace(K_dd)/(O·M) as NT's default; `true`: absolute.
    pub diag_reg_absolute: bool,
}

/// Why a prediction cannot be made.
#[derive(Clone, Debug, PartialEq)]
pub struct PredictError(pub String);

impl std::fmt::Display for PredictError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PredictError {}

/// The eigendecomposition of a regularized train–train kernel, computed once per
/// kernel and reused for every time.
struct Eigen {
    vecs: Mat<f64>,
    vals: Vec<f64>,
}

/// Rows/columns of the O·P kernel that belong to the training points (output-major).
fn train_index(o: usize, p: usize, m: usize) -> Vec<usize> {
    (0..o)
        .flat_map(|oi| (0..m).map(move |i| oi * p + i))
        .collect()
}

fn test_index(o: usize, p: usize, m: usize) -> Vec<usize> {
    (0..o)
        .flat_map(|oi| (m..p).map(move |i| oi * p + i))
        .collect()
}

fn sub(k: &DMatrix<f64>, rows: &[usize], cols: &[usize]) -> Mat<f64> {
    Mat::from_fn(rows.len(), cols.len(), |i, j| k[(rows[i], cols[j])])
}

impl Problem<'_> {
    fn check(&self) -> Result<(usize, usize), PredictError> {
        let o = self.outputs.max(1);
        let n = self.nngp.nrows();
        if !n.is_multiple_of(o) || self.nngp.shape() != (n, n) || self.ntk.shape() != (n, n) {
            return Err(PredictError("kernels are not square O·P matrices".into()));
        }
        let p = n / o;
        let m = self.train;
        if m == 0 || m >= p {
            return Err(PredictError(format!(
                "{m} training points of {p}: prediction needs at least one training and one test point"
            )));
        }
        if self.targets.nrows() != m {
            return Err(PredictError(format!(
                "{} target rows for {m} training points",
                self.targets.nrows()
            )));
        }
        if o > 1 && self.targets.ncols() != o {
            return Err(PredictError(format!(
                "the program has {o} outputs, the targets {} columns: give one column per output",
                self.targets.ncols()
            )));
        }
        if self.prior_mean.len() != o {
            return Err(PredictError("one prior mean per output is needed".into()));
        }
        if !(self.diag_reg >= 0.0 && self.diag_reg.is_finite()) {
            return Err(PredictError(format!(
                "the diagonal regularization must be a finite number ≥ 0, not {}",
                self.diag_reg
            )));
        }
        Ok((o, p))
    }

    /// The training targets minus the prior mean as an (O·M)×R right-hand side (R = 1
    /// when O > 1, else the C target columns), output-major like the kernels.
    fn residual(&self, o: usize) -> Mat<f64> {
        let m = self.train;
        if o > 1 {
            Mat::from_fn(o * m, 1, |r, _| {
                self.targets[(r % m, r / m)] - self.prior_mean[r / m]
            })
        } else {
            Mat::from_fn(m, self.targets.ncols(), |i, c| {
                self.targets[(i, c)] - self.prior_mean[0]
            })
        }
    }

    /// `K_dd + ε I` with NT's relative or absolute ε.
    fn regularized(&self, k: &DMatrix<f64>, d: &[usize]) -> Mat<f64> {
        let mut a = sub(k, d, d);
        let eps = if self.diag_reg_absolute {
            self.diag_reg
        } else {
            self.diag_reg * (0..d.len()).map(|i| a[(i, i)]).sum::<f64>() / d.len() as f64
        };
        for i in 0..d.len() {
            a[(i, i)] += eps;
        }
        a
    }

    fn eigen(&self, k: &DMatrix<f64>, d: &[usize], what: &str) -> Result<Eigen, PredictError> {
        let a = self.regularized(k, d);
        let e = a
            .self_adjoint_eigen(Side::Lower)
            .map_err(|e| PredictError(format!("the {what} eigendecomposition failed: {e:?}")))?;
        let vals = (0..d.len()).map(|i| e.S()[i]).collect();
        Ok(Eigen {
            vecs: e.U().to_owned(),
            vals,
        })
    }

    /// `g(K̃) · R` for a spectral function g (of the clipped eigenvalues), or, at
    /// t = ∞, `K̃⁻¹ R` by Cholesky (refused when K̃ is not positive definite).
    fn apply(
        &self,
        k: &DMatrix<f64>,
        d: &[usize],
        eig: Option<&Eigen>,
        g: Option<&dyn Fn(f64) -> f64>,
        r: &Mat<f64>,
        what: &str,
    ) -> Result<Mat<f64>, PredictError> {
        match g {
            Some(g) => {
                let eig =
                    eig.ok_or_else(|| PredictError("internal: no eigendecomposition".into()))?;
                let coef: Vec<f64> = eig.vals.iter().map(|&l| g(l.max(0.0))).collect();
                let mut vtr = eig.vecs.transpose() * r;
                for i in 0..vtr.nrows() {
                    for j in 0..vtr.ncols() {
                        vtr[(i, j)] *= coef[i];
                    }
                }
                Ok(&eig.vecs * &vtr)
            }
            None => {
                let a = self.regularized(k, d);
                let llt = a.llt(Side::Lower).map_err(|_| {
                    PredictError(format!(
                        "the training {what} kernel is singular or not positive definite, so its \
                         t = inf predictor does not exist: pass --diag-reg (e.g. 1e-4) or a finite --t"
                    ))
                })?;
                Ok(llt.solve(r))
            }
        }
    }

    /// Both predictors at each time.
    pub fn predict(&self, times: &[Time]) -> Result<Vec<Prediction>, PredictError> {
        let (o, p) = self.check()?;
        let m = self.train;
        let (d, t) = (train_index(o, p, m), test_index(o, p, m));
        let resid = self.residual(o);
        let y_size = (m * self.targets.ncols()) as f64;
        let finite = times.iter().any(|t| *t != Time::Infinity);
        let (eig_k, eig_th) = if finite {
            (
                Some(self.eigen(self.nngp, &d, "NNGP")?),
                Some(self.eigen(self.ntk, &d, "NTK")?),
            )
        } else {
            (None, None)
        };
        let (k_td, th_td) = (sub(self.nngp, &t, &d), sub(self.ntk, &t, &d));
        let (k_dd, k_tt) = (sub(self.nngp, &d, &d), sub(self.nngp, &t, &t));
        let k_dt = k_td.transpose().to_owned();
        let mut out = Vec::with_capacity(times.len());
        for &time in times {
            let g = |scale: f64| -> Option<Box<dyn Fn(f64) -> f64>> {
                match time {
                    Time::Infinity => None,
                    Time::Flow(tt) => {
                        let c = scale * tt / y_size;
                        Some(Box::new(move |l: f64| {
                            if l * c < 1e-300 {
                                c
                            } else {
                                -(-l * c).exp_m1() / l
                            }
                        }))
                    }
                    Time::Steps { steps, lr } => {
                        // (1 − (1 − ηλ/B)^k)/λ; k doubled for the NNGP covariance.
                        let k = (scale as usize) * steps;
                        let c = lr / m as f64;
                        Some(Box::new(move |l: f64| {
                            let q = c * l;
                            if q == 0.0 {
                                k as f64 * c
                            } else {
                                (1.0 - (1.0 - q).powi(k.min(i32::MAX as usize) as i32)) / l
                            }
                        }))
                    }
                }
            };
            let (ek, et) = (eig_k.as_ref(), eig_th.as_ref());
            let g1 = g(1.0);
            let g2 = g(2.0);
            // NNGP: mean and covariance.
            let wk = self.apply(self.nngp, &d, ek, g1.as_deref(), &resid, "NNGP")?;
            let mean_k = &k_td * &wk;
            let sk = self.apply(self.nngp, &d, ek, g2.as_deref(), &k_dt, "NNGP")?;
            let cov_k = &k_tt - &k_td * &sk;
            // NTK: B_t = Θ_td g_t(Θ̃), via g_t(Θ̃) Θ_dt (symmetric g).
            let th_dt = th_td.transpose().to_owned();
            let wt = self.apply(self.ntk, &d, et, g1.as_deref(), &resid, "NTK")?;
            let mean_t = &th_td * &wt;
            let bt_t = self.apply(self.ntk, &d, et, g1.as_deref(), &th_dt, "NTK")?;
            let bt = bt_t.transpose().to_owned();
            let cross = &bt * &k_dt;
            let cov_t = &k_tt + &bt * &k_dd * &bt_t - &cross - cross.transpose();
            out.push(Prediction {
                time,
                nngp: self.gaussian(o, p - m, &mean_k, &cov_k)?,
                ntk: self.gaussian(o, p - m, &mean_t, &cov_t)?,
            });
        }
        Ok(out)
    }

    /// Back to T×C means (prior mean added) and a symmetric covariance; refuses a
    /// number that is not finite.
    fn gaussian(
        &self,
        o: usize,
        nt: usize,
        mean: &Mat<f64>,
        cov: &Mat<f64>,
    ) -> Result<Gaussian, PredictError> {
        let c = self.targets.ncols();
        let mean = if o > 1 {
            DMatrix::from_fn(nt, o, |i, oi| mean[(oi * nt + i, 0)] + self.prior_mean[oi])
        } else {
            DMatrix::from_fn(nt, c, |i, ci| mean[(i, ci)] + self.prior_mean[0])
        };
        let n = cov.nrows();
        let cov = DMatrix::from_fn(n, n, |i, j| 0.5 * (cov[(i, j)] + cov[(j, i)]));
        if mean.iter().chain(cov.iter()).any(|v| !v.is_finite()) {
            return Err(PredictError(
                "the prediction is not finite (an ill-conditioned kernel): pass --diag-reg".into(),
            ));
        }
        Ok(Gaussian { mean, cov })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel from random features, with a known prior mean.
    fn kernel(p: usize, seed: u64) -> DMatrix<f64> {
        let f = DMatrix::from_fn(p, p + 3, |i, j| {
            (((i * i * 13 + i * j * 7 + j * j * 3) as f64 + seed as f64) * 0.37).sin()
        });
        &f * f.transpose() / (p as f64)
    }

    /// At t = ∞ the mean interpolates the training targets (no regularization), and
    /// the eigen route at a huge finite time equals the Cholesky route.
    #[test]
    fn infinite_time_interpolates_and_matches_the_spectral_limit() {
        let (m, t) = (5, 3);
        let (k, th) = (kernel(m + t, 1), kernel(m + t, 2));
        let y = DMatrix::from_fn(m, 2, |i, c| (i as f64 - c as f64 * 0.5).cos());
        let prob = Problem {
            nngp: &k,
            ntk: &th,
            outputs: 1,
            train: m,
            targets: &y,
            prior_mean: &[0.25],
            diag_reg: 0.0,
            diag_reg_absolute: false,
        };
        let r = prob
            .predict(&[Time::Infinity, Time::Flow(1e9)])
            .expect("prediction");
        for (a, b) in r[0].ntk.mean.iter().zip(r[1].ntk.mean.iter()) {
            assert!((a - b).abs() < 1e-6 * (1.0 + a.abs()), "{a} vs {b}");
        }
        // The training points as test points: the NTK mean reproduces the targets.
        let all = Problem {
            train: m,
            ..prob.clone()
        };
        let k2 = {
            let idx: Vec<usize> = (0..m).chain(0..m).collect();
            DMatrix::from_fn(2 * m, 2 * m, |i, j| k[(idx[i], idx[j])])
        };
        let th2 = {
            let idx: Vec<usize> = (0..m).chain(0..m).collect();
            DMatrix::from_fn(2 * m, 2 * m, |i, j| th[(idx[i], idx[j])])
        };
        let all = Problem {
            nngp: &k2,
            ntk: &th2,
            ..all
        };
        let r = all.predict(&[Time::Infinity]).expect("prediction");
        for i in 0..m {
            for c in 0..2 {
                assert!((r[0].ntk.mean[(i, c)] - y[(i, c)]).abs() < 1e-9);
                assert!((r[0].nngp.mean[(i, c)] - y[(i, c)]).abs() < 1e-9);
            }
            assert!(r[0].nngp.cov[(i, i)].abs() < 1e-9);
        }
    }

    /// At t = 0 nothing has moved: the mean is the prior mean and both covariances
    /// are the prior K_tt.
    #[test]
    fn time_zero_is_the_prior() {
        let (m, t) = (4, 2);
        let (k, th) = (kernel(m + t, 3), kernel(m + t, 4));
        let y = DMatrix::from_fn(m, 1, |i, _| i as f64);
        let prob = Problem {
            nngp: &k,
            ntk: &th,
            outputs: 1,
            train: m,
            targets: &y,
            prior_mean: &[0.5],
            diag_reg: 0.0,
            diag_reg_absolute: false,
        };
        for time in [Time::Flow(0.0), Time::Steps { steps: 0, lr: 1.0 }] {
            let r = prob.predict(&[time]).expect("prediction");
            for g in [&r[0].nngp, &r[0].ntk] {
                assert!(g.mean.iter().all(|v| (v - 0.5).abs() < 1e-15));
                for i in 0..t {
                    for j in 0..t {
                        assert!((g.cov[(i, j)] - k[(m + i, m + j)]).abs() < 1e-14);
                    }
                }
            }
        }
    }

    /// k discrete steps equal the recursion f ← f − η/B Θ(f − y) run by hand.
    #[test]
    fn discrete_steps_equal_the_recursion() {
        let (m, t) = (4, 3);
        let (k, th) = (kernel(m + t, 5), kernel(m + t, 6));
        let y = DMatrix::from_fn(m, 1, |i, _| (i as f64).sin());
        let (lr, steps) = (0.7, 5);
        let prob = Problem {
            nngp: &k,
            ntk: &th,
            outputs: 1,
            train: m,
            targets: &y,
            prior_mean: &[0.0],
            diag_reg: 0.0,
            diag_reg_absolute: false,
        };
        let r = prob
            .predict(&[Time::Steps { steps, lr }])
            .expect("prediction");
        let mut f = DMatrix::<f64>::zeros(m + t, 1);
        for _ in 0..steps {
            let resid = DMatrix::from_fn(m, 1, |i, _| f[(i, 0)] - y[(i, 0)]);
            let th_all_d = th.columns(0, m).into_owned();
            f -= (lr / m as f64) * &th_all_d * resid;
        }
        for i in 0..t {
            let got = r[0].ntk.mean[(i, 0)];
            assert!(
                (got - f[(m + i, 0)]).abs() < 1e-13,
                "{got} vs {}",
                f[(m + i, 0)]
            );
        }
    }
}
