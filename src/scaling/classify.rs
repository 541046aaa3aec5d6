//! TP4's classification of a training program from its exponents (theory.md §5.2–5.3): unstable, trivial, kernel regime, feature learning; maximal updates and muP.

use std::fmt;

use super::*;
use crate::ir::{NodeId, Op, Program, Role, Ty};

// ---------------------------------------------------------------------------------
// Classification
// ---------------------------------------------------------------------------------

/// TP4's classification of a training program (theory.md §5.2–5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Regime {
    Unstable,
    Trivial,
    Kernel,
    FeatureLearning,
}

impl Regime {
    /// The name in `tpc limit --format json`.
    pub fn name(self) -> &'static str {
        match self {
            Regime::Unstable => "unstable",
            Regime::Trivial => "trivial",
            Regime::Kernel => "kernel",
            Regime::FeatureLearning => "feature-learning",
        }
    }
}

impl fmt::Display for Regime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one parameter does.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamScaling {
    /// The parameter's own factor at initialization: the size of its use relative to
    /// its argument (`n^(1/2)` entry for hidden matrices and readouts, the entry for
    /// input matrices and vectors). Θ(1) is right, except that readouts may be smaller.
    pub init_factor: Ex,
    /// Largest change of a feature (MatMul or Nonlin vector) caused by updating it:
    /// `n^(-r_l)` in TP4's notation.
    pub feature: Ex,
    /// Largest change of an output caused by updating it.
    pub output: Ex,
    /// Updated maximally (TP4 Def 5.1: `r_l = 0`; a readout: `Δv . x = Θ(1)`).
    pub maximal: bool,
    /// For a readout: initialized maximally (`v_0 . Δx = Θ(1)`).
    pub init_maximal: Option<bool>,
}

/// The classification of a program with `train`.
#[derive(Clone, Debug, PartialEq)]
pub struct Classification {
    pub regime: Regime,
    /// Largest feature change after one step: `n^(-r)`.
    pub feature: Ex,
    /// Largest output change after one step.
    pub output: Ex,
    /// Largest vector or output at initialization.
    pub init: Ex,
    pub params: Vec<ParamScaling>,
    /// Every width-dependent parameter updated (and every readout initialized) maximally
    /// in a feature-learning program: muP up to the abc symmetry.
    pub mup: bool,
    /// The step the classification comes from: 1 (the first) or 2 (a later one).
    pub step: usize,
}

pub(super) fn is_feature(prog: &Program, id: NodeId) -> bool {
    matches!(prog.node(id).op, Op::MatMul { .. } | Op::Nonlin(_))
}

pub(super) fn init_factor(prog: &Program, p: usize) -> Ex {
    let par = &prog.params[p];
    let e = entry(&par.law);
    match par.role() {
        Role::Hidden | Role::Output => Ex::half().mul(e),
        _ => e,
    }
}

/// The classification, from the exponents (None without `train`): from the first step,
/// unless a later step changes the regime (a zero or small readout passes gradient to
/// the features only once it has been updated; a blow-up at a later step).
pub fn classify(prog: &Program, ex: &Exponents) -> Option<Classification> {
    let first = classify_step(prog, &ex.init, ex.step.as_ref()?, 1);
    match &ex.later {
        Some(later) if first.regime != Regime::Unstable => {
            let later = classify_step(prog, &ex.init, later, 2);
            Some(if later.regime == first.regime {
                first
            } else {
                later
            })
        }
        _ => Some(first),
    }
}

pub(super) fn classify_step(
    prog: &Program,
    init: &[Ex],
    step: &Step,
    index: usize,
) -> Classification {
    let vectors: Vec<NodeId> = prog.ids().filter(|&id| prog.ty(id) == Ty::Vector).collect();
    let max_over = |v: &[Ex], ids: &mut dyn Iterator<Item = NodeId>| {
        ids.map(|i| v[i.index()]).max().unwrap_or(Ex::Zero)
    };
    let init = max_over(
        init,
        &mut vectors.iter().copied().chain(prog.outputs.iter().copied()),
    );
    let feature = max_over(
        &step.delta,
        &mut vectors.iter().copied().filter(|&i| is_feature(prog, i)),
    );
    // vectors and moments (a logit that blows up saturates its softmax)
    let moved = max_over(
        &step.delta,
        &mut prog
            .ids()
            .filter(|&id| matches!(prog.ty(id), Ty::Vector | Ty::Moment)),
    );
    let output = max_over(&step.delta, &mut prog.outputs.iter().copied());
    let mut params = Vec::new();
    for (p, par) in prog.params.iter().enumerate() {
        let d = &step.by_param[p];
        let feat = max_over(
            d,
            &mut vectors.iter().copied().filter(|&i| is_feature(prog, i)),
        );
        let out = max_over(d, &mut prog.outputs.iter().copied());
        let (maximal, init_maximal) = match par.role() {
            Role::Output => (out == Ex::ONE, Some(step.readout_init_term[p] == Ex::ONE)),
            _ => (feat == Ex::ONE, None),
        };
        params.push(ParamScaling {
            init_factor: init_factor(prog, p),
            feature: feat,
            output: out,
            maximal,
            init_maximal,
        });
    }
    // Nontrivial: some width-dependent parameter moves an output by Θ(1) (a trained
    // scalar output bias alone moves f trivially).
    let nontrivial = params
        .iter()
        .zip(&prog.params)
        .any(|(s, p)| p.role() != Role::OutputBias && s.output == Ex::ONE);
    let regime = if init.blows_up() || moved.blows_up() || output.blows_up() {
        Regime::Unstable
    } else if !nontrivial {
        Regime::Trivial
    } else if feature == Ex::ONE {
        Regime::FeatureLearning
    } else {
        Regime::Kernel
    };
    let mup = regime == Regime::FeatureLearning
        && params.iter().zip(&prog.params).all(|(s, p)| {
            p.role() == Role::OutputBias
                || kappa(&p.law, 1.0) == Ex::Zero
                || (s.maximal && s.init_maximal != Some(false))
        });
    Classification {
        regime,
        feature,
        output,
        init,
        params,
        mup,
        step: index,
    }
}

/// The regime of a training program, for `tpc limit --format json`.
pub fn regime(prog: &Program) -> Option<Regime> {
    classify(prog, &exponents(prog)).map(|c| c.regime)
}
