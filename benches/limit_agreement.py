"""How often does an exact finite-width sampler "disagree" with the limit by chance?

The acceptance test of issue 7 reads: the kernels of
`tpc run rnn.tp --engine conditional --width 1000000 --seeds 8` agree with `tpc limit`
within 4 standard errors. Taken entry by entry, each ratio |mean - limit| / se is a
Student t with K - 1 = 7 degrees of freedom (the se is itself estimated from 8 draws),
and the maximum is over 225 correlated entries. This script measures the law of that
maximum for the conditional engine itself:

1. R single draws (`--seeds 1 --seed S`, independent streams) at width N and the limit;
2. bias: Hotelling T^2 of the mean deviation on the linearly independent entries
   (the f rows are averages of the y rows), and max |z| over entries;
3. P(max over entries |t| > 4) for batches of K = 8 draws, by subsampling the R draws
   without replacement and by Gaussian draws with their covariance;
4. per-entry two-sided t_7 tails of given ratios, and their normal-equivalent sigma.

    /work/venv-np/bin/python benches/limit_agreement.py [path/to/tpc] [N] [R]

(numpy only; defaults: $CARGO_TARGET_DIR/release/tpc, N = 100000, R = 240, about 4 min;
PROG=file.tp INPUTS=points.csv for another program, INPUTS= for none.)
Measured 2026-11-29 (default arguments): no bias (Hotelling p = 0.96 NNGP, 0.51 NTK);
P(max |t| > 4) at K = 8 is 0.25 per kernel and 0.41-0.42 for either kernel; at K = 32,
0.02 and 0.04. See README, "Finite width: the conditional engine".
"""

import json
import math
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPC = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(HERE, "target")), "release", "tpc")
N = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
R = int(sys.argv[3]) if len(sys.argv) > 3 else 240
PROG = os.environ.get("PROG", os.path.join(HERE, "..", "shared", "spec", "examples", "rnn.tp"))
PTS = os.environ.get("INPUTS", os.path.join(HERE, "examples", "rnn_points.csv"))
KERNELS = ("nngp", "ntk")


def tpc(*args):
    inputs = ["--inputs", PTS] if PTS else []
    out = subprocess.run([TPC, *args, PROG, *inputs, "--format", "json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def betacf(a, b, x):
    """Continued fraction of the incomplete beta (Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for aa in (m * (b - m) * x / ((qam + 2 * m) * (a + 2 * m)),
                   -(a + m) * (qab + m) * x / ((a + 2 * m) * (qap + 2 * m))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def betai(a, b, x):
    """The regularized incomplete beta I_x(a, b)."""
    if x <= 0.0 or x >= 1.0:
        return float(x >= 1.0)
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(lbt) * betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * betacf(b, a, 1.0 - x) / b


def t_tail(t, nu):
    """Two-sided P(|T_nu| >= |t|)."""
    return betai(nu / 2.0, 0.5, nu / (nu + t * t))


def sigma_of(p):
    """The normal |z| with two-sided tail p (bisection)."""
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if math.erfc(mid / math.sqrt(2)) > p else (lo, mid)
    return lo


def max_t(batch):
    """(B, K, E) -> (B,): max over entries of |mean| / (sd / sqrt K)."""
    k = batch.shape[1]
    return np.abs(batch.mean(1) / (batch.std(1, ddof=1) / np.sqrt(k))).max(1)


def main():
    rng = np.random.default_rng(20261129)
    lim = tpc("limit")
    draws = [tpc("run", "--engine", "conditional", "--width", str(N), "--seeds", "1",
                 "--seed", str(10_000 + s)) for s in range(R)]
    iu = np.triu_indices(len(lim["nngp"]))
    dev = {k: np.array([np.array(d[k]) - np.array(lim[k]) for d in draws])[:, iu[0], iu[1]]
           for k in KERNELS}
    e = len(iu[0])
    print(f"{R} draws of {os.path.basename(PROG)} at N = {N} against the limit "
          f"({e} distinct entries per kernel)")
    for k in KERNELS:
        x = dev[k]
        z = x.mean(0) / (x.std(0, ddof=1) / np.sqrt(R))
        cov = np.cov(x, rowvar=False)
        w, v = np.linalg.eigh(cov)
        keep = w > 1e-10 * w.max()
        r = int(keep.sum())
        comp = v[:, keep].T @ x.mean(0)
        t2 = R * float(np.sum(comp * comp / w[keep]))
        f = (R - r) / (r * (R - 1)) * t2
        p = betai((R - r) / 2, r / 2, (R - r) / (R - r + r * f))
        hot = f"Hotelling T^2 on rank {r}: p = {p:.3f}" if R > 2 * r else "(too few draws for T^2)"
        print(f"  {k}: max |z| of the mean deviation {np.abs(z).max():.2f}; {hot}")
    both = np.hstack([dev[k] for k in KERNELS])
    for kk in (k for k in (8, 32) if R >= 4 * k):
        b = 20_000
        idx = np.argsort(rng.random((b, R)), axis=1)[:, :kk]
        sub = both[idx]
        w, v = np.linalg.eigh(np.cov(both, rowvar=False))
        a = v * np.sqrt(np.clip(w, 0.0, None))
        gau = (rng.standard_normal((b * kk, both.shape[1])) @ a.T).reshape(b, kk, -1)
        for name, batch in (("subsampled", sub), ("Gaussian", gau)):
            mn, mt = max_t(batch[:, :, :e]), max_t(batch[:, :, e:])
            print(f"  K = {kk:2} {name:10}: P(max |t| > 4) NNGP {np.mean(mn > 4):.3f}, "
                  f"NTK {np.mean(mt > 4):.3f}, either {np.mean(np.maximum(mn, mt) > 4):.3f}; "
                  f"95% of maxima below {np.quantile(np.maximum(mn, mt), 0.95):.2f}")
    for t in (4.0, 4.14, 4.72):
        p = t_tail(t, 7)
        print(f"  one entry, |t_7| >= {t}: two-sided p = {p:.2e} ({sigma_of(p):.2f} sigma)")


if __name__ == "__main__":
    main()
