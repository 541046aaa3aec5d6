#!/usr/bin/env python3
"""Neural Tangents vs tpc: infinite-width NNGP + NTK of a depth-10 ReLU MLP.

Network (both sides): x in R^32 -> 10 x (Dense(W_std=sqrt(2), no bias, NTK
parameterization), ReLU) -> Dense(1, W_std=sqrt(2), no bias).  The tpc side is
benches/mlp10.tp (preset `ntk` with `{ std = s }` is exactly NT's
Dense(W_std=s, parameterization='ntk')).

Install (CPU only, float64; Python 3.11; the venv lives outside the repo):

    python3.11 -m venv /work/venv-nt
    /work/venv-nt/bin/pip install --upgrade pip
    /work/venv-nt/bin/pip install "jax==0.4.25" "jaxlib==0.4.25" "numpy<2" \
        "ml_dtypes<0.4" "tensorflow==2.16.2" "tf2jax==0.3.6" "neural-tangents==0.6.5"

    # resolved to: jax 0.4.25, jaxlib 0.4.25, numpy 1.26.4, ml-dtypes 0.3.2,
    # tensorflow 2.16.2, tf2jax 0.3.6, neural-tangents 0.6.5, scipy 1.17.1

Run from the repository root:

    /work/venv-nt/bin/python benches/nt_kernels.py [--points 500,1000,2000,4000]
        [--seed 0] [--tpc target/release/tpc] [--repeat 3] [--no-compare]

What it does:
  * writes benches/out/points_M.csv for every M: rows of
    numpy.random.default_rng(seed).standard_normal((M, 32)) (so each set is a
    prefix of the larger ones), full precision (repr), no header;
  * for every M, in a fresh subprocess (so peak RSS is per M): builds the NT
    kernel_fn, jits it (get=('nngp','ntk') static), reads the CSV, makes one
    warm-up call (compile + run, block_until_ready), then `--repeat` warm calls
    and keeps the best; records ru_maxrss of that subprocess (and its RSS just
    before the first call, which is mostly the jax/TF imports);
  * if the tpc binary exists, runs
        tpc bench limit benches/mlp10.tp --inputs benches/out/points_M.csv \
            --repeat 3 --format json
    which must print {"seconds": [...], "peak_rss_bytes": B, "points": M}
    (timing only the warm NNGP+NTK computation); best of the repeats is used;
  * for the smallest M, dumps NT's kernels to benches/out/nt_{nngp,ntk}_M.csv
    and, if tpc exists (and not --no-compare), runs `tpc limit ... --format json`
    on the same points and prints the max abs / rel difference;
  * prints a markdown table and also writes it to benches/out/nt_vs_tpc.md.

Timings are wall-clock on whatever machine runs this; XLA uses all cores.
The 1-min load average at the start of each NT run is recorded as a hint of
interference.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

D = 32
DEPTH = 10
W_STD = 2.0 ** 0.5  # 1.4142135623730951, the std in benches/mlp10.tp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benches", "out")
TP = os.path.join(ROOT, "benches", "mlp10.tp")

NT_CODE = f"""\
layers = []
for _ in range({DEPTH}):
    layers += [stax.Dense(512, W_std={W_STD!r}, b_std=None, parameterization='ntk'),
               stax.Relu()]
layers += [stax.Dense(1, W_std={W_STD!r}, b_std=None, parameterization='ntk')]
init_fn, apply_fn, kernel_fn = stax.serial(*layers)
"""


def points_path(m):
    return os.path.join(OUT, f"points_{m}.csv")


def write_points(m, seed):
    import numpy as np

    x = np.random.default_rng(seed).standard_normal((m, D))
    with open(points_path(m), "w") as f:
        for row in x:
            f.write(",".join(repr(float(v)) for v in row) + "\n")


def read_points(path):
    import numpy as np

    return np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)


def vmrss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def write_matrix_csv(path, a):
    with open(path, "w") as f:
        for row in a:
            f.write(",".join(repr(float(v)) for v in row) + "\n")


# --------------------------------------------------------------------- worker
def nt_worker(m, repeat, dump):
    """Runs in a fresh process: time NT's kernel_fn on points_m.csv."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import warnings

    warnings.filterwarnings("ignore")
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from neural_tangents import stax

    scope = {"stax": stax}
    exec(NT_CODE, scope)
    kernel_fn = jax.jit(scope["kernel_fn"], static_argnames="get")

    x = jnp.asarray(read_points(points_path(m)))
    assert x.shape == (m, D) and x.dtype == jnp.float64, (x.shape, x.dtype)
    rss_before = vmrss_bytes()
    load = os.getloadavg()[0]

    t0 = time.perf_counter()
    k = jax.block_until_ready(kernel_fn(x, None, ("nngp", "ntk")))
    warmup = time.perf_counter() - t0

    warm = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        k = jax.block_until_ready(kernel_fn(x, None, ("nngp", "ntk")))
        warm.append(time.perf_counter() - t0)

    nngp, ntk = np.asarray(k[0]), np.asarray(k[1])
    assert nngp.shape == (m, m) and ntk.shape == (m, m)
    assert nngp.dtype == np.float64
    if dump:
        write_matrix_csv(os.path.join(OUT, f"nt_nngp_{m}.csv"), nngp)
        write_matrix_csv(os.path.join(OUT, f"nt_ntk_{m}.csv"), ntk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({
        "points": m,
        "warmup_seconds": warmup,
        "seconds": warm,
        "peak_rss_bytes": peak,
        "rss_before_first_call_bytes": rss_before,
        "loadavg_1min": load,
        "nngp_00": float(nngp[0, 0]),
        "ntk_00": float(ntk[0, 0]),
        "finite": bool(np.isfinite(nngp).all() and np.isfinite(ntk).all()),
    }))


# ----------------------------------------------------------------------- main
def run_nt(m, repeat, dump):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(m),
           "--repeat", str(repeat)] + (["--dump"] if dump else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"NT worker for M={m} failed (exit {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_tpc(tpc, m, repeat):
    cmd = [tpc, "bench", "limit", os.path.relpath(TP, ROOT), "--inputs",
           os.path.relpath(points_path(m), ROOT), "--repeat", str(repeat),
           "--format", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        return {"error": f"exit {r.returncode}: {r.stderr.strip()[-300:]}"}
    try:
        out = json.loads(r.stdout)
    except json.JSONDecodeError as e:
        return {"error": f"bad JSON from tpc: {e}"}
    if out.get("points") != m:
        return {"error": f"tpc reports points={out.get('points')}, expected {m}"}
    return out


def compare_smallest(tpc, m):
    import numpy as np

    cmd = [tpc, "limit", os.path.relpath(TP, ROOT), "--inputs",
           os.path.relpath(points_path(m), ROOT), "--format", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        return f"`tpc limit` failed (exit {r.returncode}): {r.stderr.strip()[-300:]}"
    out = json.loads(r.stdout)
    lines = []
    for name in ("nngp", "ntk"):
        nt = np.loadtxt(os.path.join(OUT, f"nt_{name}_{m}.csv"), delimiter=",")
        tp = np.asarray(out[name], dtype=np.float64)
        if tp.shape != nt.shape:
            lines.append(f"{name}: shape {tp.shape} vs NT {nt.shape}")
            continue
        d = np.abs(tp - nt)
        rel = d.max() / np.abs(nt).max()
        lines.append(f"{name}: max |tpc - NT| = {d.max():.3e}, relative to max|NT| = {rel:.3e}")
    return (f"Kernel check at M={m}: " + "; ".join(lines) + ". (NT's own NTK diagonal carries "
            "~1e-9 relative rounding error at this depth: arctan2(sqrt(prod - nngp^2), nngp) "
            "at equal points; see tests/data/nt_extra.json, case relu_depth10_X6.)")


def fmt_bytes(b):
    return f"{b / 2**20:.0f} MiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default="500,1000,2000,4000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tpc", default=os.path.join(ROOT, "target", "release", "tpc"))
    ap.add_argument("--no-compare", action="store_true",
                    help="skip the tpc-vs-NT kernel check at the smallest M")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dump", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker is not None:
        nt_worker(a.worker, a.repeat, a.dump)
        return

    ms = [int(s) for s in a.points.split(",") if s.strip()]
    os.makedirs(OUT, exist_ok=True)
    for m in ms:
        write_points(m, a.seed)

    nt = {}
    for m in ms:
        nt[m] = run_nt(m, a.repeat, dump=(m == min(ms)))
        r = nt[m]
        print(f"NT  M={m}: warm-up {r['warmup_seconds']:.3f}s, warm {['%.3f' % t for t in r['seconds']]}, "
              f"peak RSS {fmt_bytes(r['peak_rss_bytes'])} (before first call "
              f"{fmt_bytes(r['rss_before_first_call_bytes'])}), load {r['loadavg_1min']:.2f}",
              file=sys.stderr, flush=True)

    tpc = os.path.abspath(a.tpc)
    have_tpc = os.path.isfile(tpc) and os.access(tpc, os.X_OK)
    tp = {}
    if have_tpc:
        for m in ms:
            tp[m] = run_tpc(tpc, m, a.repeat)
            print(f"tpc M={m}: {tp[m]}", file=sys.stderr, flush=True)

    out = []
    out.append(f"Depth-10 ReLU MLP, d = {D}, NNGP+NTK over M points (M x M), float64, "
               f"seed {a.seed}, best of {a.repeat} warm runs. "
               f"NT 0.6.5 / jax 0.4.25 on CPU ({os.cpu_count()} cores).")
    out.append("")
    if not have_tpc:
        out.append(f"tpc binary not found at {tpc}: NT figures only.")
        out.append("")
    out.append("| M | NT warm s | NT warm-up s (jit) | tpc best s | speed-up NT/tpc | "
               "NT peak RSS | NT peak - RSS before call | tpc peak RSS | tpc peak / (M^2 f64) | load (1 min) |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in ms:
        r = nt[m]
        best = min(r["seconds"])
        mat = 8 * m * m
        t_best = t_rss = ratio = units = "n/a"
        if m in tp:
            t = tp[m]
            if "error" in t:
                t_best = "error"
            else:
                tb = min(t["seconds"])
                t_best = f"{tb:.3f}"
                ratio = f"{best / tb:.3g}x" if tb > 0 else "inf"
                t_rss = fmt_bytes(t["peak_rss_bytes"])
                units = f"{t['peak_rss_bytes'] / mat:.2f}"
        out.append(f"| {m} | {best:.3f} | {r['warmup_seconds']:.3f} | {t_best} | {ratio} | "
                   f"{fmt_bytes(r['peak_rss_bytes'])} | "
                   f"{fmt_bytes(r['peak_rss_bytes'] - r['rss_before_first_call_bytes'])} | "
                   f"{t_rss} | {units} | {r['loadavg_1min']:.2f} |")
    out.append("")
    base = sum(nt[m]["rss_before_first_call_bytes"] for m in ms) / len(ms)
    out.append("NT peak RSS is ru_maxrss of a fresh process per M; the RSS just before the first "
               f"kernel call (about {fmt_bytes(base)} here) is mostly the jax + TensorFlow imports that "
               "`import neural_tangents` pulls in, so the 'peak - before' column is the "
               "kernel computation's own share (jit included). 'load' is the 1-minute load average "
               "when the NT run started: other work on the machine slows every timing.")
    errs = [f"tpc M={m}: {tp[m]['error']}" for m in tp if "error" in tp[m]]
    if errs:
        out.append("")
        out += errs
    if have_tpc and not a.no_compare:
        out.append("")
        out.append(compare_smallest(tpc, min(ms)))
    text = "\n".join(out)
    print(text)
    with open(os.path.join(OUT, "nt_vs_tpc.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
