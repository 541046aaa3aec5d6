//! abcd exponents of an entrywise optimizer (Adam, AdamW): why a separate module.
//! (theory.md §5.2 for the SGD step this replaces, §5.5 for muP's Adam column.)
//!
//! The rest of the analysis reads an SGD step, `ΔP = -lr · mult² · ∂L/∂P`, whose size
//! is the gradient's times the learning rate (TP4; momentum and weight decay keep its
//! exponents). An entrywise optimizer normalizes the gradient entry by entry (Tensor
//! Programs IVb, Yang & Littwin 2023; the muP paper's Table 3 / Table 8): Adam's first
//! step is `Δw = -lr · g / (|g| + ε)`, so as long as the gradient entry `g` of the
//! trainable variable is not below `ε` the step moves **every entry by Θ(lr)**
//! whatever the gradient's size, and once `ε` dominates it is `-lr · g / ε`: SGD with
//! the learning rate divided by ε. Later steps (bias-corrected moments `m̂ / √v̂`) keep
//! the Θ(1) size of the normalized update. Here, per parameter `P = mult · w`:
//!
//! * `g_w = mult · ∂L/∂P`, entrywise: `∂L/∂W_{αβ} = Σ_s δ^s_α x^s_β` (a finite sum over
//!   samples: `grad(W x) · size(x)`), `∂L/∂b = grad(b)`, `∂L/∂v_β = Σ χ x_β`;
//! * the update's entries `u = lr · mult · min(1, g_w / ε)` (ε as a monomial in n,
//!   `1e-8` is Θ(1));
//! * its effect at a use: `ΔW y` sums n entries of the update, each correlated with
//!   `y` through the gradient's `x_β` when `y` is a forward vector of the same
//!   orientation (LLN: `n · u · y`), independent of it otherwise (CLT: `n^(1/2) u y`);
//!   on an input point a finite sum (`u`); a bias moves by `u`; a readout's `Δv · x`
//!   is an LLN sum, `n · u · x`. In the ε-dominated case these are the SGD rules of
//!   [`super::analysis`] divided by ε.
//! * AdamW's decoupled decay `w ← w (1 − lr·wd)` moves `W y` by `lr · wd · (W y)`.
//!
//! So the hidden features move by `lr·n` (hidden lr must be Θ(1/n), not SGD-muP's
//! Θ(1)), and ε must be no larger than the smallest gradient entry it is added to.
//! [`adam_mup_law`] is the muP paper's Adam column, [`diagnostics`] turns the
//! classification into W0107 (blow-up), W0108 (SGD's muP learning rates under Adam)
//! and W0109 (a too-large ε that freezes a layer), each with the fix.

use super::*;
use crate::diag::Diagnostic;
use crate::ir::{Law, Monomial, NodeId, Op, Optimizer, Program, Rational, Role, Span, Train, Ty};

/// The `ε` (and AdamW's decoupled `wd`) of an entrywise optimizer; None for SGD and
/// momentum, whose steps the SGD rules size.
#[derive(Clone, Copy, Debug)]
pub(super) struct Entrywise {
    pub eps: Monomial,
    pub wd: Option<Monomial>,
    /// ε counts wherever it wins as n → ∞; otherwise only where it wins by
    /// [`PRACTICAL_WIDTH`] (see [`normalized`]).
    pub strict: bool,
}

/// The width up to which the exponents describe what finite widths show: ε takes over
/// a gradient entry `Θ(n^g)` (constant taken as 1) at `n* = ε_coef^(-1/(e_ε − g))`, and
/// past 10^6 (`1e-8` against `Θ(n^(-1))` gradients: n* = 10^8) no network `tpc run`,
/// `coord-check` or a practitioner trains sees it. W0109 reports the takeover itself.
pub(super) const PRACTICAL_WIDTH: f64 = 1e6;

impl Entrywise {
    pub fn of(prog: &Program) -> Option<Entrywise> {
        let (eps, wd) = match prog.train.as_ref()?.optimizer {
            Optimizer::Adam { eps, .. } => (eps, None),
            Optimizer::AdamW { eps, wd, .. } => (eps, Some(wd)),
            Optimizer::Sgd | Optimizer::Momentum { .. } => return None,
        };
        Some(Entrywise {
            eps,
            wd,
            strict: false,
        })
    }
}

fn mono(m: Monomial) -> Ex {
    if m.coef == 0.0 {
        Ex::Zero
    } else {
        Ex::Pow(m.exp)
    }
}

/// `lr · mult`: the size of an Adam step of `P = mult · w` per unit normalized update.
fn step_size(law: &Law, base_lr: f64) -> Ex {
    if base_lr == 0.0 || law.lr.coef == 0.0 || law.mult.coef == 0.0 {
        Ex::Zero
    } else {
        Ex::Pow(law.lr.exp + law.mult.exp)
    }
}

/// Entry size of the gradient of the trainable variable `w` of parameter `p`
/// (`mult · ∂L/∂P`).
pub(super) fn grad_entry(cx: &Ctx, p: usize, init: &[Ex], grad: &[Ex], chi: &[Ex]) -> Ex {
    let par = &cx.prog.params[p];
    let dp = match par.role() {
        Role::Hidden | Role::Input => cx
            .uses(par.node)
            .iter()
            .map(|u| {
                let x = if u.input {
                    Ex::ONE
                } else {
                    init[u.arg.index()]
                };
                grad[u.out.index()].mul(x)
            })
            .max()
            .unwrap_or(Ex::Zero),
        Role::Bias | Role::OutputBias => grad[par.node.index()],
        Role::Output => cx
            .readout_terms()
            .iter()
            .filter(|t| t.2 == par.node)
            .map(|&(o, _, _, x)| chi[o].mul(init[x.index()]))
            .max()
            .unwrap_or(Ex::Zero),
    };
    mono(par.law.mult).mul(dp)
}

/// The normalized update's entry size `min(1, g_w / ε)`; unless `strict`, ε counts
/// only when it takes over before [`PRACTICAL_WIDTH`].
fn normalized(g: Ex, o: Entrywise) -> Ex {
    let e = mono(o.eps);
    if g == Ex::Zero {
        Ex::Zero
    } else if e == Ex::Zero || g >= e || (!o.strict && !takes_over(g, o.eps)) {
        Ex::ONE
    } else {
        g.mul(e.recip())
    }
}

/// The width `n*` where ε overtakes gradient entries `Θ(n^g)` (constant 1), when ε
/// grows relative to them.
fn takeover_width(g: Ex, eps: Monomial) -> Option<f64> {
    let (Some(ge), Ex::Pow(ee)) = (g.exponent(), mono(eps)) else {
        return None;
    };
    let d = (ee - ge).to_f64();
    (d > 0.0).then(|| eps.coef.abs().powf(-1.0 / d))
}

fn takes_over(g: Ex, eps: Monomial) -> bool {
    takeover_width(g, eps).is_some_and(|n| n <= PRACTICAL_WIDTH)
}

/// Entry size of parameter `p`'s update `ΔP` under the entrywise optimizer.
pub(super) fn update_entry(
    cx: &Ctx,
    o: Entrywise,
    p: usize,
    init: &[Ex],
    grad: &[Ex],
    chi: &[Ex],
    lr: f64,
) -> Ex {
    let law = &cx.prog.params[p].law;
    step_size(law, lr).mul(normalized(grad_entry(cx, p, init, grad, chi), o))
}

/// The direct effect of parameter `p`'s entrywise update at the nodes that use it
/// (the entrywise counterpart of `Ctx::direct`).
pub(super) fn direct(
    cx: &Ctx,
    o: Entrywise,
    p: usize,
    init: &[Ex],
    grad: &[Ex],
    chi: &[Ex],
    lr: f64,
) -> Vec<(NodeId, Ex)> {
    let prog = cx.prog;
    let par = &prog.params[p];
    let u = update_entry(cx, o, p, init, grad, chi, lr);
    // AdamW: w ← w (1 − lr wd) moves each use by lr · wd times its own size
    let decay = match o.wd {
        Some(wd) if wd.coef != 0.0 && lr != 0.0 && par.law.lr.coef != 0.0 => {
            mono(wd).mul(Ex::Pow(par.law.lr.exp))
        }
        _ => Ex::Zero,
    };
    let mut out = Vec::new();
    match par.role() {
        Role::Hidden | Role::Input => {
            let uses = cx.uses(par.node);
            for v in &uses {
                let e = if v.input {
                    u
                } else {
                    let same = uses.iter().any(|w| !w.input && w.transpose == v.transpose);
                    let ip = if same { Ex::n() } else { Ex::half() };
                    ip.mul(u).mul(init[v.arg.index()])
                };
                out.push((v.out, e.max(decay.mul(init[v.out.index()]))));
            }
        }
        Role::Bias | Role::OutputBias => {
            out.push((par.node, u.max(decay.mul(init[par.node.index()]))))
        }
        Role::Output => {
            for &(_, f, v, x) in &cx.readout_terms() {
                if v == par.node {
                    let dv = Ex::n().mul(u).mul(init[x.index()]);
                    let dd = decay
                        .mul(Ex::half())
                        .mul(entry(&par.law))
                        .mul(init[x.index()]);
                    out.push((f, dv.max(dd)));
                }
            }
        }
    }
    out
}

/// Whether the vector `x` is a bounded function whose argument other steps blew up: it
/// saturates at a value set by that change (`tanh(z + Δz) ≈ sign(Δz)`), which no
/// longer remembers `x_0`.
fn saturated(cx: &Ctx, x: NodeId, base: &[Ex], delta: &[Ex]) -> bool {
    let prog = cx.prog;
    let Op::Nonlin(_) = prog.node(x).op else {
        return false;
    };
    let Some(f) = &cx.flats[x.index()] else {
        return false;
    };
    let ops = &cx.ops[x.index()];
    let big: Vec<Ex> = ops.iter().map(|_| Ex::n()).collect();
    !f.value(&big).blows_up()
        && ops
            .iter()
            .any(|a| delta[a.index()].blows_up() && delta[a.index()] > base[a.index()])
}

/// The joint first step at the outputs when a readout meets a saturated feature. A
/// readout's entrywise step `Δv` is built from `x_0`, so alone it moves `f` by the LLN
/// sum `Δv · x_0`; but when the other parameters' steps blow up the argument of a
/// bounded `x`, `x_1 ≈ sign(Δz)` is set by the gradient through `v_0`, independent of
/// `x_0`, and `Δv · x_1` is a CLT sum, `n^(-1/2)` of it (sp_adam.tp: `f_1` grows like
/// `n^(1/2)`, not `n`; coord-check measures 0.56 ± 0.06 at N = 512..4096).
/// `by_param` keeps each step alone; only the joint `delta` of the outputs changes.
pub(super) fn joint_outputs(cx: &Ctx, base: &[Ex], delta: &mut [Ex], by_param: &[Vec<Ex>]) {
    let prog = cx.prog;
    let terms = cx.readout_terms();
    for &f in &prog.outputs {
        let mut joint = Ex::Zero;
        for (p, par) in prog.params.iter().enumerate() {
            let mine: Vec<NodeId> = terms
                .iter()
                .filter(|t| t.1 == f && t.2 == par.node)
                .map(|t| t.3)
                .collect();
            let e = by_param[p][f.index()];
            let all_sat = par.role() == Role::Output
                && !mine.is_empty()
                && mine.iter().all(|&x| saturated(cx, x, base, delta));
            joint = joint.max(if all_sat {
                e.mul(Ex::half().recip())
            } else {
                e
            });
        }
        delta[f.index()] = joint;
    }
}

// ---------------------------------------------------------------------------------
// muP for Adam (the muP paper's Table 3, Adam column; Table 8)
// ---------------------------------------------------------------------------------

/// The muP paper's Adam exponents `(a + b, a + c)` for a role (theory.md §5.5, TP5
/// Table 3): input weights and biases `var 1/fan_in, lr Θ(1)`; hidden `var 1/n, lr 1/n`;
/// readout `var 1/n², lr 1/n` (multiplier 1). Invariant under Adam's symmetry
/// `(a, b, c) ~ (a + t, b − t, c − t)` (an Adam step is `lr · mult`, not `lr · mult²`;
/// §5.5's conversion rule "Adam LR by sqrt(k)"), so Tables 8 and 9 give the same sums.
fn adam_mup_sums(role: Role) -> (Rational, Rational) {
    match role {
        Role::Input | Role::Bias | Role::OutputBias => (Rational::ZERO, Rational::ZERO),
        Role::Hidden => (Rational::HALF, Rational::ONE),
        Role::Output => (Rational::ONE, Rational::ONE),
    }
}

/// Whether a law has muP's Adam exponents up to Adam's abc symmetry.
pub fn is_adam_mup_law(role: Role, law: &Law) -> bool {
    let abc = law.abc();
    let (ab, ac) = adam_mup_sums(role);
    abc.b.is_none_or(|b| abc.a + b == ab) && abc.a + abc.c == ac
}

/// The muP-for-Adam law of a parameter, keeping its multiplier (and the constants of
/// its variance and learning rate): only the exponents of `var` and `lr` change.
pub fn adam_mup_law(role: Role, law: &Law) -> Law {
    let a = -law.mult.exp;
    let (ab, ac) = adam_mup_sums(role);
    let var_coef = if law.var.coef == 0.0 {
        1.0
    } else {
        law.var.coef
    };
    Law {
        var: Monomial::new(var_coef, -((ab - a) * Rational::int(2))),
        mult: law.mult,
        lr: Monomial::new(law.lr.coef, -(ac - a)),
    }
}

fn adam_help(prog: &Program, p: usize) -> String {
    let par = &prog.params[p];
    format!(
        "muP for Adam (hidden and readout lr Θ(1/n), input and biases Θ(1)): `param {} : {} {}`",
        par.name,
        par.shape,
        law_text(&adam_mup_law(par.role(), &par.law))
    )
}

/// The span of the `eps` argument inside `optimizer = adam(β1, β2, eps…)`, when found.
fn eps_span(src: &str, train: &Train) -> Span {
    let sp = train.optimizer_span;
    let Some(text) = src.get(sp.range()) else {
        return sp;
    };
    let (Some(open), Some(close)) = (text.find('('), text.rfind(')')) else {
        return sp;
    };
    let mut depth = 0usize;
    let mut commas = Vec::new();
    for (i, c) in text[open + 1..close].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => commas.push(open + 1 + i),
            _ => {}
        }
    }
    let Some(&start) = commas.get(1) else {
        return sp;
    };
    let end = commas.get(2).copied().unwrap_or(close);
    let arg = &text[start + 1..end];
    let lead = arg.len() - arg.trim_start().len();
    Span::new(
        sp.start + start + 1 + lead,
        sp.start + start + 1 + lead + arg.trim().len(),
    )
}

/// Whether a parameter's size depends on the width (a finite-fan-in bias or input
/// matrix still does: its gradient comes from the width-n layers above).
fn trained(par: &crate::ir::Param, lr: f64) -> bool {
    lr != 0.0 && par.law.lr.coef != 0.0 && par.law.mult.coef != 0.0
}

/// `tpc check`'s training diagnostics for an entrywise optimizer, in place of the SGD
/// ones (W0103, W0104, N0101, N0102): W0107 blow-up, W0108 SGD's muP learning rates
/// under Adam, W0109 an ε that freezes layers, and the regime note.
pub(super) fn diagnostics(
    prog: &Program,
    src: &str,
    ex: &Exponents,
    cls: &Classification,
    o: Entrywise,
) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let Some(train) = &prog.train else {
        return out;
    };
    let Some(step) = (if cls.step == 1 { &ex.step } else { &ex.later }) else {
        return out;
    };
    let name = match train.optimizer {
        Optimizer::AdamW { .. } => "AdamW",
        _ => "Adam",
    };
    let one_step = if cls.step == 1 {
        format!("one {name} step")
    } else {
        format!("a later {name} step")
    };
    let lr_label = |p: usize| -> Span {
        let par = &prog.params[p];
        lr_span(src, par.law_span).unwrap_or(par.law_span)
    };
    let moves = |p: usize| -> Vec<String> {
        let d = &step.by_param[p];
        let mut moved: Vec<String> = Vec::new();
        for &(n, e) in &step.direct[p] {
            if prog.ty(n) == Ty::Vector {
                moved.push(format!(
                    "`{}` by {} per coordinate",
                    node_name(prog, n),
                    e.theta()
                ));
            }
        }
        for &f in &prog.outputs {
            if d[f.index()] != Ex::Zero {
                moved.push(format!(
                    "`{}` by {}",
                    node_name(prog, f),
                    d[f.index()].theta()
                ));
            }
        }
        moved
    };
    // -- SGD's muP learning rates under Adam (W0108: every trained parameter has muP's
    // SGD law, so the user meant muP), otherwise a blow-up (W0107: SP and the rest)
    let width_trained =
        |par: &crate::ir::Param| trained(par, train.lr) && par.role() != Role::OutputBias;
    let sgd_mup = prog
        .params
        .iter()
        .filter(|par| width_trained(par))
        .all(|par| is_mup_law(par.role(), &par.law))
        && prog
            .params
            .iter()
            .any(|par| width_trained(par) && !is_adam_mup_law(par.role(), &par.law));
    for (p, par) in prog.params.iter().enumerate() {
        if !trained(par, train.lr) || par.role() == Role::OutputBias {
            continue;
        }
        let blows = step.by_param[p].iter().any(|e| e.blows_up());
        // a parameter with muP's Adam law whose step blows up is moved by the larger
        // parameters downstream; the warnings are theirs
        let own_fault = !is_adam_mup_law(par.role(), &par.law);
        if sgd_mup && own_fault {
            let fix = adam_mup_law(par.role(), &par.law);
            out.push(
                Diagnostic::warning(
                    "W0108",
                    format!(
                        "`{}` has muP's learning rate for SGD (lr {}), but trains with {name}: {one_step} of it moves {}",
                        par.name,
                        par.law.lr,
                        and_list(&moves(p))
                    ),
                    lr_label(p),
                    format!("muP for SGD; {name} needs lr {}", fix.lr),
                )
                .with_note(
                    "an Adam step moves every entry by Θ(lr) whatever the gradient's size, so \
                     muP's learning rates for SGD do not carry over (muP paper, Table 3)",
                )
                .with_help(adam_help(prog, p)),
            );
        } else if blows && own_fault {
            // the joint step can differ at the outputs ([`joint_outputs`])
            let joint: Vec<String> = prog
                .outputs
                .iter()
                .filter(|f| step.delta[f.index()] < step.by_param[p][f.index()])
                .map(|&f| {
                    format!(
                        "`{}` by {}",
                        node_name(prog, f),
                        step.delta[f.index()].theta()
                    )
                })
                .collect();
            let mut d = Diagnostic::warning(
                "W0107",
                format!(
                    "training blows up under {name}: {one_step} of `{}` moves {}",
                    par.name,
                    and_list(&moves(p))
                ),
                lr_label(p),
                format!(
                    "an {name} step moves every entry of `{}` by Θ(lr){}: too large for the width",
                    par.name,
                    if lr_span(src, par.law_span).is_none() {
                        " (lr n^0 here)"
                    } else {
                        ""
                    }
                ),
            )
            .with_help(adam_help(prog, p));
            if !joint.is_empty() {
                d = d.with_note(format!(
                    "with the other steps, which saturate the features `{}` reads, the whole step \
                     moves {}: the saturated features no longer remember their initial values",
                    par.name,
                    and_list(&joint)
                ));
            }
            out.push(d);
        }
    }
    // -- ε that freezes a layer (W0109): ε read strictly as n → ∞ against ε → 0
    if mono(o.eps) != Ex::Zero {
        let strict = exponents_with(prog, Some(Entrywise { strict: true, ..o }));
        let ideal = exponents_with(
            prog,
            Some(Entrywise {
                eps: Monomial::constant(0.0),
                ..o
            }),
        );
        let pick = |e: &Exponents| {
            if cls.step == 1 {
                e.step.clone()
            } else {
                e.later.clone()
            }
        };
        if let (Some(sstep), Some(istep)) = (pick(&strict), pick(&ideal)) {
            let cx = Ctx::new(prog);
            let mut frozen = Vec::new();
            let mut need: Option<Rational> = None;
            for (p, par) in prog.params.iter().enumerate() {
                if !trained(par, train.lr) {
                    continue;
                }
                let g = grad_entry(&cx, p, &strict.init, &sstep.grad, &sstep.chi0);
                let Some(ge) = g.exponent() else { continue };
                need = Some(need.map_or(ge, |n: Rational| if ge < n { ge } else { n }));
                let feat = |st: &Step| {
                    prog.ids()
                        .filter(|&i| prog.ty(i) == Ty::Vector && is_feature(prog, i))
                        .map(|i| st.by_param[p][i.index()])
                        .max()
                        .unwrap_or(Ex::Zero)
                };
                let (with, without) = (feat(&sstep), feat(&istep));
                if with < without && with < Ex::ONE {
                    frozen.push((p, g, with, without, takeover_width(g, o.eps)));
                }
            }
            if let (false, Some(need)) = (frozen.is_empty(), need) {
                let list: Vec<String> = frozen
                    .iter()
                    .map(|&(p, g, ..)| {
                        format!("`{}` (gradient entries {})", prog.params[p].name, g.theta())
                    })
                    .collect();
                let fixed = Monomial::new(o.eps.coef, need);
                let mut d = Diagnostic::warning(
                    "W0109",
                    format!(
                        "{name}'s ε = {} freezes {} as n grows: ε outgrows the gradient entries it is added to",
                        o.eps,
                        and_list(&list)
                    ),
                    eps_span(src, train),
                    format!("ε is {} here", mono(o.eps).theta()),
                );
                for &(p, _, with, without, at) in &frozen {
                    let when = at.map_or(String::new(), |n| format!(" once n ≳ {n:.0e}"));
                    d = d.with_secondary(
                        lr_label(p),
                        format!(
                            "`{}` moves the features by {} instead of {}{when}",
                            prog.params[p].name,
                            with.theta(),
                            without.theta()
                        ),
                    );
                }
                out.push(
                    d.with_note(
                        "where ε dominates, Adam's step is lr · g / ε: SGD at a learning rate \
                         divided by ε, and those layers stop learning features",
                    )
                    .with_help(format!(
                        "ε must shrink like the gradients it is added to: Θ({}) or smaller, e.g. `{}`",
                        Monomial::n_pow(need),
                        fixed
                    )),
                );
            }
        }
    }
    if out.iter().any(|d| d.code == "W0107" || d.code == "W0108") {
        return out;
    }
    // -- the regime
    match cls.regime {
        Regime::FeatureLearning => {
            out.push(feature_learning_note(
                prog,
                cls,
                train.lr_span,
                &one_step,
                &format!(
                    "every parameter is updated maximally: this is muP for {name} (up to its abc symmetry)"
                ),
            ));
        }
        Regime::Kernel => {
            out.push(
                Diagnostic::note_diag(
                    "N0101",
                    format!(
                        "kernel regime: {one_step} moves the outputs by Θ(1) but the features only by {} per coordinate",
                        cls.feature.theta()
                    ),
                    train.lr_span,
                    "features do not move in the limit at these learning rates",
                )
                .with_help(format!(
                    "for feature learning under {name}: hidden and readout lr Θ(1/n), input and biases Θ(1) (muP paper, Table 3)"
                )),
            );
        }
        Regime::Trivial => {
            let best = (0..prog.params.len())
                .filter(|&p| prog.params[p].role() != Role::OutputBias)
                .max_by_key(|&p| (cls.params[p].output, std::cmp::Reverse(p)));
            let mut d = Diagnostic::warning(
                "W0104",
                format!(
                    "training is trivial in the limit: {one_step} moves the outputs by {}",
                    cls.output.theta()
                ),
                best.map_or(train.lr_span, lr_label),
                "this learning rate is too small for the width",
            );
            if let Some(p) = best {
                d = d.with_help(adam_help(prog, p));
            }
            out.push(d);
        }
        Regime::Unstable => {}
    }
    out
}
