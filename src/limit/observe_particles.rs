//! Observed moments in the limit by particles, for `tpc compare` on programs whose
//! kernel limit is not computed (theory.md §1.1, §2; issue 14.4).
//!
//! Why a module of its own: `tpc compare` compares every limit quantity against finite
//! width, and for Netsor+ programs (a moment inside a vector expression: layernorm,
//! attention) the P×P kernel engine may refuse (E0030). The observes are moments of one
//! point, which the particle engine ([`super::particle`]) estimates from the same IR
//! — every moment a particle mean, every Nonlin with scalar operands evaluated at those
//! means — with a Monte Carlo standard error. This builds a [`LimitResult`] with the
//! observes only (NNGP and NTK left out with the reason), so `compare` shows the
//! observes' N^(-1/2) convergence. Its stated error is 3 standard errors (as
//! [`super::qmc`] states its own).

use super::particle::{particles, ParticleConfig};
use super::LimitResult;
use crate::ir::Program;

/// The observes' limits at `points` by particles, each with its largest standard error;
/// `why` says why the kernels are left out. Err when the program has no observe or the
/// particle engine refuses it.
pub fn observe_limit(
    prog: &Program,
    points: &[Vec<f64>],
    cfg: &ParticleConfig,
    why: &str,
) -> Result<LimitResult, String> {
    if prog.observes.is_empty() {
        return Err("the program observes nothing".into());
    }
    let rows: Vec<Vec<f64>> = if prog.inputs.is_empty() {
        vec![vec![]]
    } else {
        points.to_vec()
    };
    let mut vals = vec![Vec::with_capacity(rows.len()); prog.observes.len()];
    let mut se_max: f64 = 0.0;
    let mut used = (0, 0);
    for row in &rows {
        let est = particles(prog, row, &prog.observes, cfg)?;
        for (k, (m, s)) in est.mean.iter().zip(&est.se).enumerate() {
            vals[k].push(*m);
            se_max = se_max.max(*s);
        }
        used = (est.particles, est.replicas);
    }
    let observe = prog
        .observes
        .iter()
        .zip(vals)
        .map(|(&m, v)| (prog.label(m), v))
        .collect();
    let left_out = format!("not computed: {why}");
    Ok(LimitResult {
        outputs: prog.output_names(),
        points: prog.reported_points(points.to_vec()),
        nngp: None,
        nngp_note: Some(left_out.clone()),
        ntk: None,
        ntk_note: Some(left_out),
        observe,
        methods: vec![format!(
            "observes by the particle engine: {} particles in {} replicas per point, largest \
             Monte Carlo standard error {:.2e} (stated error 3 SE)",
            used.0, used.1, se_max
        )],
        max_error: 3.0 * se_max,
        // A Monte Carlo estimate, not a bound: reported as 3σ like QMC's.
        qmc_3sigma: Some(3.0 * se_max),
        regime: None,
        train: None,
    })
}
