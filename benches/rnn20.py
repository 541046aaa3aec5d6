"""Issue 13 quadrature benchmark inputs, written deterministically:

    python3 benches/rnn20.py

writes benches/rnn20.tp (examples/rnn.tp with T = 20: the 20 step outputs y[t] and the
mean-pooled f, 21 outputs), benches/rnn20_pooled.tp (the pooled output f only), and
benches/seq100_T20.csv / benches/seq100_T4.csv: 100 sequences of N(0, 1) inputs (seeded),
the T = 4 file being the first 4 columns of the T = 20 one.
"""
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
T = 20


def program(all_outputs):
    pooled = " + ".join(f"h[{t}]" for t in range(1, T + 1))
    lines = [
        f"# examples/rnn.tp with T = {T} (issue 13 quadrature benchmark; written by",
        "# benches/rnn20.py). h[t] = tanh(W h[t-1] + U x[t] + b).",
        "width n",
        f"const T = {T}",
        "input x : 1 [T]",
        "parameterization ntk",
        "",
        "param U : n x 1",
        "param W : n x n { std = 1.2 }",
        "param b : n     { std = 0.3 }",
        "param v : 1 x n",
        "",
        "h[0] = 0",
        "for t in 1..=T {",
        "    h[t] = tanh(W @ h[t-1] + U @ x[t] + b)",
    ]
    if all_outputs:
        lines.append("    output y[t] = v @ h[t]")
    lines += ["}", f"output f = v @ (({pooled}) / {T})", ""]
    return "\n".join(lines)


def main():
    with open(os.path.join(HERE, "rnn20.tp"), "w") as f:
        f.write(program(True))
    with open(os.path.join(HERE, "rnn20_pooled.tp"), "w") as f:
        f.write(program(False))
    rng = random.Random(13)
    rows = [[rng.gauss(0, 1) for _ in range(T)] for _ in range(100)]
    with open(os.path.join(HERE, "seq100_T20.csv"), "w") as f:
        for r in rows:
            f.write(",".join(repr(v) for v in r) + "\n")
    with open(os.path.join(HERE, "seq100_T4.csv"), "w") as f:
        for r in rows:
            f.write(",".join(repr(v) for v in r[:4]) + "\n")


main()
