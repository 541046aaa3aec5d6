#!/usr/bin/env python3
"""Writes tests/data/nt_netsor.json: Neural Tangents references for Netsor+ programs
(layernorm and 1/n softmax attention), with the .tp programs and point CSVs beside it.

Same format as nt_extra.json: {"about": ..., "cases": {name: {program, inputs, nngp,
ntk, nt_code, about}}}; `program` and `inputs` are relative to this folder. Every
`nt_code` string is exec'd as-is to build the kernel_fn, so it is exactly the code that
produced the numbers (float64: jax_enable_x64).

Conventions read from neural_tangents/_src/stax/linear.py:
* LayerNorm(axis=-1, eps): nngp / sqrt((eps + cov_p)(eps + cov_q)), the NTK likewise,
  where cov is the channel second moment of the (centered Gaussian) input: tpc's
  `(h - mean(h)) * rsqrt(mean(h*h) - mean(h)^2 + eps)` with mean(h) -> 0.
* GlobalSelfAttention(linear_scaling=True): key and query weights tied, logits
  QK_std * <u_t, u_s> / n -> QK_std * E[Z^u_t Z^u_s] (QK_std = W_query_std * W_key_std),
  softmax over the key position s, values V u_s and output weights W_out in the NTK
  parameterization (OV_std = W_out_std * W_value_std), no residual, no positional
  embedding; NTK = attention-weighted input NTK + 2 * NNGP (the value and output
  weights; nothing from the tied key/query weights). In tpc: q[t] = Q @ u[t] with
  std(Q) = sqrt(QK_std), a[t, s] = mean(q[t] * q[s]),
  o[t] = O @ sum(s, softmax(s, a[t, s]) * (V @ u[s])).
* GlobalAvgPool() then Dense(1): the mean over positions, `v @ (sum(t, o[t]) / L)`.
Sequences are rows of L*d numbers, time-major (cli.md), NT's input shape (B, L, d).

Each case is recomputed by an independent numpy implementation of the same limit (a
direct recursion over per-point token covariance matrices with closed-form arc-cosine /
erf kernels, written from the math, not from NT), and the largest difference is noted
in the case's `about`.

    /work/venv-nt/bin/python tests/data/gen_nt_netsor.py
"""
import json
import math
import os
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402,F401
import numpy as np  # noqa: E402
from neural_tangents import stax  # noqa: E402,F401

HERE = os.path.dirname(os.path.abspath(__file__))
EPS = 1e-5

# ------------------------------------------------------------------ points
X3 = np.array([[1.0, 0.0, 0.0],
               [0.6, -0.8, 0.3],
               [-2.0, 0.5, 1.0],
               [0.3, -3.0, 0.7],
               [0.05, 0.02, -0.01]])
L = 3
D = 2
# 4 sequences of L = 3 tokens in R^2 (rows time-major).
XS = np.array([[1.0, 0.0, 0.0, 1.0, 0.5, 0.5],
               [0.0, 1.0, 1.0, 0.0, -0.5, 0.5],
               [2.0, -1.0, 0.3, 0.3, -1.0, -2.0],
               [0.1, 0.2, -1.5, 0.7, 1.2, -0.4]])


# ------------------------------------------------------------ programs
def ln(v):
    return f"({v} - mean({v})) * rsqrt(mean({v} * {v}) - mean({v})^2 + {EPS!r})"


def ln_mlp_tp(fn, depth, w, b):
    lines = [f"# LayerNorm MLP, {depth} hidden layers: Neural Tangents' Dense(512, W_std={w}, "
             f"b_std={b}, parameterization='ntk') -> LayerNorm(eps={EPS}) -> {fn}, "
             f"{depth} times, then Dense(1, W_std={w}, b_std={b}).",
             "width n", "input x : 3", "parameterization ntk", ""]
    for i in range(1, depth + 1):
        d = "3" if i == 1 else "n"
        lines.append(f"param W{i} : n x {d} {{ std = {w!r} }}")
        if b:
            lines.append(f"param b{i} : n     {{ std = {b!r} }}")
    lines.append(f"param v  : 1 x n {{ std = {w!r} }}")
    if b:
        lines.append(f"param bv : 1     {{ std = {b!r} }}")
    lines.append("")
    prev = "x"
    for i in range(1, depth + 1):
        bias = f" + b{i}" if b else ""
        lines.append(f"h{i} = W{i} @ {prev}{bias}")
        lines.append(f"z{i} = {fn}({ln(f'h{i}')})")
        prev = f"z{i}"
    lines.append(f"output f = v @ {prev}" + (" + bv" if b else ""))
    return "\n".join(lines) + "\n"


def ln_mlp_nt(layer, depth, w, b):
    bs = "None" if not b else repr(b)
    return f"""layers = []
for _ in range({depth}):
    layers += [stax.Dense(512, W_std={w!r}, b_std={bs}, parameterization='ntk'),
               stax.LayerNorm(axis=-1, eps={EPS!r}), {layer}]
layers += [stax.Dense(1, W_std={w!r}, b_std={bs}, parameterization='ntk')]
init_fn, apply_fn, kernel_fn = stax.serial(*layers)
"""


def attn_tp(we, qk, wv, wo, wr, two):
    q = math.sqrt(qk)
    head = f"""# Linear-scaling softmax attention over L = {L} tokens: Neural Tangents'
# Dense(512, W_std={we}) per token, GlobalSelfAttention(linear_scaling=True, W_query_std={qk},
# W_key_std=1, W_value_std={wv}, W_out_std={wo}) (tied key/query, 1/n logits{", then LayerNorm, relu, Dense(512, W_std=" + str(we) + ") and a second attention layer" if two else ""}),
# GlobalAvgPool, Dense(1, W_std={wr}).
width n
const L = {L}
input x : {D} [L]
parameterization ntk

param E : n x {D} {{ std = {we!r} }}
param Q : n x n {{ std = {q!r} }}
param V : n x n {{ std = {wv!r} }}
param O : n x n {{ std = {wo!r} }}
"""
    if two:
        head += f"""param D2 : n x n {{ std = {we!r} }}
param Q2 : n x n {{ std = {q!r} }}
param V2 : n x n {{ std = {wv!r} }}
param O2 : n x n {{ std = {wo!r} }}
"""
    head += f"""param v : 1 x n {{ std = {wr!r} }}

for t in 1..=L {{
    u[t] = E @ x[t]
    q[t] = Q @ u[t]
    w[t] = V @ u[t]
}}
for t in 1..=L {{
    for s in 1..=L {{
        a[t, s] = mean(q[t] * q[s])
    }}
    o[t] = O @ sum(s in 1..=L, softmax(s in 1..=L, a[t, s]) * w[s])
}}
"""
    last = "o"
    if two:
        head += f"""for t in 1..=L {{
    u2[t] = D2 @ relu({ln('o[t]')})
    q2[t] = Q2 @ u2[t]
    w2[t] = V2 @ u2[t]
}}
for t in 1..=L {{
    for s in 1..=L {{
        a2[t, s] = mean(q2[t] * q2[s])
    }}
    o2[t] = O2 @ sum(s in 1..=L, softmax(s in 1..=L, a2[t, s]) * w2[s])
}}
"""
        last = "o2"
    head += f"output f = v @ (sum(t in 1..=L, {last}[t]) / L)\n"
    return head


def attn_nt(we, qk, wv, wo, wr, two):
    gsa = (f"stax.GlobalSelfAttention(n_chan_out=512, n_chan_key=512, n_chan_val=512, "
           f"n_heads=1, linear_scaling=True, W_key_std=1.0, W_value_std={wv!r}, "
           f"W_query_std={qk!r}, W_out_std={wo!r}, b_std=None)")
    mid = ""
    if two:
        mid = (f"stax.LayerNorm(axis=-1, eps={EPS!r}), stax.Relu(),\n"
               f"    stax.Dense(512, W_std={we!r}, b_std=None, parameterization='ntk'),\n"
               f"    {gsa},\n    ")
    return f"""layers = [
    stax.Dense(512, W_std={we!r}, b_std=None, parameterization='ntk'),
    {gsa},
    {mid}stax.GlobalAvgPool(),
    stax.Dense(1, W_std={wr!r}, b_std=None, parameterization='ntk'),
]
init_fn, apply_fn, kernel_fn = stax.serial(*layers)
"""


# ------------------------------------------------- independent recursion
def relu_pair(k11, k12, k22):
    """E[relu(u) relu(v)], E[step(u) step(v)] for (u, v) centered Gaussian."""
    ab = math.sqrt(k11 * k22)
    rho = min(1.0, max(-1.0, k12 / ab))
    th = math.acos(rho)
    return (ab / (2 * math.pi) * (math.sqrt(1 - rho * rho) + (math.pi - th) * rho),
            (math.pi - th) / (2 * math.pi))


def erf_pair(k11, k12, k22):
    """E[erf(u) erf(v)] and E[erf'(u) erf'(v)] (Williams 1997)."""
    s = (1 + 2 * k11) * (1 + 2 * k22)
    return (2 / math.pi * math.asin(2 * k12 / math.sqrt(s)),
            4 / math.pi / math.sqrt(s - 4 * k12 * k12))


PAIR = {"relu": relu_pair, "erf": erf_pair}


def indep_mlp(x, fn, depth, w, b):
    """NNGP/NTK of the LayerNorm MLP from the recursion, points x (P x d)."""
    P, d = x.shape
    k = w * w * (x @ x.T) / d + b * b
    t = k.copy()
    for layer in range(depth):
        v = np.diag(k) + EPS
        s = 1 / np.sqrt(v)
        k = k * np.outer(s, s)
        t = t * np.outer(s, s)
        kn = np.zeros_like(k)
        kd = np.zeros_like(k)
        for i in range(P):
            for j in range(P):
                kn[i, j], kd[i, j] = PAIR[fn](k[i, i], k[i, j], k[j, j])
        k = w * w * kn + b * b
        t = k + w * w * kd * t
    return k, t


def indep_attn(x, we, qk, wv, wo, wr, two):
    """Per-sequence token covariances K[p, q] (L x L blocks) through the layers."""
    P = x.shape[0]
    toks = x.reshape(P, L, D)
    K = np.einsum("pid,qjd->piqj", toks, toks) * we * we / D  # (P, L, P, L)
    T = K.copy()

    def attend(K, T):
        diag = np.stack([K[p, :, p, :] for p in range(P)])  # (P, L, L)
        lg = qk * diag
        lg = lg - lg.max(axis=2, keepdims=True)
        G = np.exp(lg)
        G /= G.sum(axis=2, keepdims=True)  # G[p, t, s]
        Kv = np.einsum("pts,psqr,qur->ptqu", G, K, G) * wv * wv * wo * wo
        Tv = np.einsum("pts,psqr,qur->ptqu", G, T, G) * wv * wv * wo * wo + 2 * Kv
        return Kv, Tv

    K, T = attend(K, T)
    if two:
        v = np.stack([np.diag(K[p, :, p, :]) for p in range(P)]) + EPS  # (P, L)
        s = 1 / np.sqrt(v)
        K = K * s[:, :, None, None] * s[None, None, :, :]
        T = T * s[:, :, None, None] * s[None, None, :, :]
        Kn = np.zeros_like(K)
        Kd = np.zeros_like(K)
        for p in range(P):
            for i in range(L):
                for q in range(P):
                    for j in range(L):
                        Kn[p, i, q, j], Kd[p, i, q, j] = relu_pair(K[p, i, p, i], K[p, i, q, j],
                                                                   K[q, j, q, j])
        K = we * we * Kn
        T = K + we * we * Kd * T
        K, T = attend(K, T)
    nngp = wr * wr * K.mean(axis=(1, 3))
    ntk = nngp + wr * wr * T.mean(axis=(1, 3))
    return nngp, ntk


CASES = [
    dict(name="ln_relu_2hidden_X5", tp="ln_relu_2hidden.tp",
         tp_text=ln_mlp_tp("relu", 2, 1.5, 0.0), csv="ln_X5.csv", x=X3,
         nt_code=ln_mlp_nt("stax.Relu()", 2, 1.5, 0.0),
         indep=lambda x: indep_mlp(x, "relu", 2, 1.5, 0.0),
         note="relu after LayerNorm, no biases; the point (0.05, 0.02, -0.01) has a variance "
              "comparable to eps."),
    dict(name="ln_erf_3hidden_bias_X5", tp="ln_erf_3hidden.tp",
         tp_text=ln_mlp_tp("erf", 3, 1.3, 0.2), csv="ln_X5.csv", x=X3,
         nt_code=ln_mlp_nt("stax.Erf()", 3, 1.3, 0.2),
         indep=lambda x: indep_mlp(x, "erf", 3, 1.3, 0.2),
         note="erf after LayerNorm, biases (the channel mean of a biased Gaussian vector "
              "still vanishes in the limit)."),
    dict(name="attn_linear_L3_X4", tp="attn_linear.tp",
         tp_text=attn_tp(1.0, 1.5, 1.2, 0.9, 1.1, False), csv="seq_L3_X4.csv", x=XS,
         nt_code=attn_nt(1.0, 1.5, 1.2, 0.9, 1.1, False),
         indep=lambda x: indep_attn(x, 1.0, 1.5, 1.2, 0.9, 1.1, False),
         note="one linear-scaling softmax attention layer on token embeddings."),
    dict(name="attn_ln_attn_L3_X4", tp="attn_ln_attn.tp",
         tp_text=attn_tp(1.3, 2.0, 1.1, 1.0, 1.0, True), csv="seq_L3_X4.csv", x=XS,
         nt_code=attn_nt(1.3, 2.0, 1.1, 1.0, 1.0, True),
         indep=lambda x: indep_attn(x, 1.3, 2.0, 1.1, 1.0, 1.0, True),
         note="attention, LayerNorm per token, relu, Dense, attention: logits of the second "
              "layer from a non-Gaussian (relu) input's token covariance."),
]


def nt_kernels(code, x, seq):
    scope = {"stax": stax, "jnp": jnp}
    exec(code, scope)
    xi = x.reshape(x.shape[0], L, D) if seq else x
    k = scope["kernel_fn"](xi, xi, ("nngp", "ntk"))
    return np.asarray(k.nngp, dtype=np.float64), np.asarray(k.ntk, dtype=np.float64)


def write_csv(path, x):
    with open(path, "w") as f:
        for row in x:
            f.write(",".join(repr(float(v)) for v in row) + "\n")


def main():
    os.makedirs(os.path.join(HERE, "programs"), exist_ok=True)
    out = {
        "about": "Infinite-width NNGP and NTK of the scalar output f over the points, from "
                 f"Neural Tangents (jax {jax.__version__}, float64, CPU), for LayerNorm MLPs and "
                 "linear-scaling (1/n, tied key/query) softmax attention. Matrices are points x "
                 "points in the order of the CSV. Paths are relative to this file. Made by "
                 "tests/data/gen_nt_netsor.py, which also recomputes every case with an "
                 "independent numpy recursion and notes the largest difference in 'about'.",
        "cases": {},
    }
    for c in CASES:
        with open(os.path.join(HERE, "programs", c["tp"]), "w") as f:
            f.write(c["tp_text"])
        x = c["x"]
        write_csv(os.path.join(HERE, c["csv"]), x)
        xr = np.loadtxt(os.path.join(HERE, c["csv"]), delimiter=",", ndmin=2)
        assert np.array_equal(xr, x)
        seq = c["name"].startswith("attn")
        nngp, ntk = nt_kernels(c["nt_code"], xr, seq)
        s, t = c["indep"](xr)
        dn, dt = np.abs(nngp - s).max(), np.abs(ntk - t).max()
        rn, rt = dn / np.abs(s).max(), dt / np.abs(t).max()
        about = (f"{c['note']} Independent numpy recursion (closed-form kernels): max |NT - indep| "
                 f"= {dn:.1e} (NNGP), {dt:.1e} (NTK); relative to the largest entry {rn:.1e}, "
                 f"{rt:.1e}.")
        print(f"{c['name']}: |NT-indep| nngp {dn:.2e} (rel {rn:.1e}), ntk {dt:.2e} (rel {rt:.1e})")
        out["cases"][c["name"]] = {
            "program": f"programs/{c['tp']}",
            "inputs": c["csv"],
            "nngp": nngp.tolist(),
            "ntk": ntk.tolist(),
            "nt_code": c["nt_code"],
            "about": about,
        }
    with open(os.path.join(HERE, "nt_netsor.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
