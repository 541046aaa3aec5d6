"""The general block engine, fused per entry or not, against the floor (issue 13), one command:

    nice -n 5 python3 benches/general_fused.py [--points 500,1000,2000,4000,8000]
        [--unfused-max 4000] [--rnn-points 100,1000,2000] [--repeat 3] [--tpc target/release/tpc]

* mlp10 (benches/mlp10.tp: depth-10 relu, d = 32, NNGP+NTK) on M seeded N(0, 1) points
  (benches/points.py): benches/floor.c (gcc -O3 -march=native, OpenMP; the fused
  recursion in plain C), `tpc bench limit --general` (the general engine, fused per entry,
  src/limit/fused/) and `tpc bench limit --general --unfused` (the block engine, one
  P x P pass per block: the baseline) up to --unfused-max;
* the relu RNN benches/rnn20_relu.tp (T = 20, shared weights, mean-pooled output) on
  benches/seq100_T20.csv (M = 100) and on M seeded N(0, 1) sequences for larger M:
  fused against unfused.

Best of --repeat warm runs in one process each; peak RSS of that process; the 1-minute
load average when each row was measured. Prints a Markdown table (the README's).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(tempfile.gettempdir(), "tpc_general_fused")
FLOOR_BIN = os.path.join(OUT, "floor")
FLOOR_CC = ["gcc", "-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno",
            "-fopenmp", "-o", FLOOR_BIN, os.path.join(ROOT, "benches", "floor.c"), "-lm"]


def points(m, d):
    path = os.path.join(OUT, f"points_{m}_{d}.csv")
    if not os.path.exists(path):
        with open(path, "w") as f:
            subprocess.run([sys.executable, os.path.join(ROOT, "benches", "points.py"),
                            str(m), str(d)], stdout=f, check=True)
    return path


def tpc_bench(tpc, tp, pts, repeat, unfused):
    cmd = [tpc, "bench", "limit", tp, "--inputs", pts, "--repeat", str(repeat),
           "--format", "json", "--general"] + (["--unfused"] if unfused else [])
    load = os.getloadavg()[0]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-300:], "load": load}
    out = json.loads(r.stdout)
    return {"s": min(out["seconds"]), "rss": out["peak_rss_bytes"], "load": load}


def floor(pts, repeat):
    load = os.getloadavg()[0]
    r = subprocess.run([FLOOR_BIN, pts, str(repeat)], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-300:], "load": load}
    out = json.loads(r.stdout)
    return {"s": min(out["seconds"]), "rss": out["peak_rss_bytes"], "load": load}


def cell(x, key="s"):
    return "—" if x is None or "error" in x else f"{x[key]:.3f}"


def mib(x):
    return "—" if x is None or "error" in x else f"{x['rss'] / 2**20:.0f} MiB"


def ratio(a, b):
    if a is None or b is None or "error" in a or "error" in b:
        return "—"
    return f"{a['s'] / b['s']:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default="500,1000,2000,4000,8000")
    ap.add_argument("--unfused-max", type=int, default=4000)
    ap.add_argument("--rnn-points", default="100,1000,2000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tpc", default=os.path.join(ROOT, "target", "release", "tpc"))
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    tpc = os.path.abspath(a.tpc)
    cc = subprocess.run(FLOOR_CC, capture_output=True, text=True)
    if cc.returncode != 0:
        raise SystemExit(f"gcc failed: {cc.stderr[-500:]}")
    out = ["| program | M | floor s | fused s | fused / floor | unfused s | unfused / floor | "
           "unfused / fused | peak RSS fused | peak RSS unfused | load (1 min) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in [int(v) for v in a.points.split(",") if v]:
        pts = points(m, 32)
        fl = floor(pts, a.repeat)
        fu = tpc_bench(tpc, "benches/mlp10.tp", pts, a.repeat, False)
        un = tpc_bench(tpc, "benches/mlp10.tp", pts, a.repeat, True) if m <= a.unfused_max else None
        loads = " / ".join(f"{x['load']:.1f}" for x in (fl, fu, un) if x is not None)
        print(f"mlp10 M={m}: floor {fl} fused {fu} unfused {un}", file=sys.stderr, flush=True)
        out.append(f"| mlp10 | {m} | {cell(fl)} | {cell(fu)} | {ratio(fu, fl)} | {cell(un)} | "
                   f"{ratio(un, fl)} | {ratio(un, fu)} | {mib(fu)} | {mib(un)} | {loads} |")
    for m in [int(v) for v in a.rnn_points.split(",") if v]:
        pts = (os.path.join(ROOT, "benches", "seq100_T20.csv") if m == 100 else points(m, 20))
        fu = tpc_bench(tpc, "benches/rnn20_relu.tp", pts, a.repeat, False)
        un = tpc_bench(tpc, "benches/rnn20_relu.tp", pts, a.repeat, True)
        loads = " / ".join(f"{x['load']:.1f}" for x in (fu, un))
        print(f"rnn20_relu M={m}: fused {fu} unfused {un}", file=sys.stderr, flush=True)
        out.append(f"| rnn20_relu | {m} | — | {cell(fu)} | — | {cell(un)} | — | {ratio(un, fu)} | "
                   f"{mib(fu)} | {mib(un)} | {loads} |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
