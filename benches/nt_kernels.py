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

    /work/venv-nt/bin/python benches/nt_kernels.py [--points 500,1000,2000,4000,8000]
        [--seed 0] [--tpc target/release/tpc] [--repeat 3] [--no-compare]
        [--fast-repeat 7] [--general-max 2000] [--e2e 2000]

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
  * builds benches/floor.c (gcc, OpenMP) and times it on the same points: the same
    fused recursion in plain C, the floor tpc is measured against (and checks that its
    kernels equal tpc's at the smallest M);
  * times `tpc bench limit --general` (the general block engine on the same program)
    up to --general-max;
  * end to end at --e2e: a fresh `tpc limit --out DIR` process vs a fresh python
    process (imports, jit, one call, np.save), wall time and peak RSS from
    /usr/bin/time -v;
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


def nt_e2e(m, out_dir):
    """End to end in a fresh process: imports, build, jit, one call, kernels saved."""
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
    k = jax.block_until_ready(kernel_fn(x, None, ("nngp", "ntk")))
    os.makedirs(out_dir, exist_ok=True)
    np.save(os.path.join(out_dir, "nngp.npy"), np.asarray(k[0]))
    np.save(os.path.join(out_dir, "ntk.npy"), np.asarray(k[1]))


# ----------------------------------------------------------------------- main
def time_v(cmd, cwd=ROOT):
    """Wall seconds and peak RSS (bytes) of a fresh process, from /usr/bin/time -v."""
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        return {"error": f"exit {r.returncode}: {r.stderr.strip()[-300:]}"}
    wall = rss = None
    for line in r.stderr.splitlines():
        line = line.strip()
        if line.startswith("Elapsed (wall clock) time"):
            t = line.rsplit(" ", 1)[1].split(":")
            wall = sum(float(v) * 60 ** i for i, v in enumerate(reversed(t)))
        elif line.startswith("Maximum resident set size"):
            rss = int(line.rsplit(" ", 1)[1]) * 1024
    return {"wall": wall, "rss": rss}


FLOOR_SRC = os.path.join(ROOT, "benches", "floor.c")
FLOOR_BIN = os.path.join(OUT, "floor")
FLOOR_CC = ["gcc", "-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno",
            "-fopenmp", "-o", FLOOR_BIN, FLOOR_SRC, "-lm"]


def run_floor(m, repeat, dump=None):
    cmd = [FLOOR_BIN, points_path(m), str(repeat)] + ([dump] if dump else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": f"exit {r.returncode}: {r.stderr.strip()[-300:]}"}
    return json.loads(r.stdout)


def compare_floor(tpc, m):
    import numpy as np

    prefix = os.path.join(OUT, f"floor_{m}")
    f = run_floor(m, 1, dump=prefix)
    if "error" in f:
        return f"floor failed: {f['error']}"
    cmd = [tpc, "limit", os.path.relpath(TP, ROOT), "--inputs",
           os.path.relpath(points_path(m), ROOT), "--format", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    out = json.loads(r.stdout)
    lines = []
    for name in ("nngp", "ntk"):
        fl = np.loadtxt(f"{prefix}_{name}.csv", delimiter=",")
        tp = np.asarray(out[name], dtype=np.float64)
        d = np.abs(tp - fl)
        lines.append(f"{name}: max |tpc - floor| / max|floor| = {d.max() / np.abs(fl).max():.2e}")
    return f"Kernel check at M={m}, tpc vs the floor: " + "; ".join(lines) + "."


def run_nt(m, repeat, dump):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(m),
           "--repeat", str(repeat)] + (["--dump"] if dump else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"NT worker for M={m} failed (exit {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_tpc(tpc, m, repeat, general=False):
    cmd = [tpc, "bench", "limit", os.path.relpath(TP, ROOT), "--inputs",
           os.path.relpath(points_path(m), ROOT), "--repeat", str(repeat),
           "--format", "json"] + (["--general"] if general else [])
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
    ap.add_argument("--points", default="500,1000,2000,4000,8000")
    ap.add_argument("--fast-repeat", type=int, default=7,
                    help="repeats for tpc, the floor and the general engine (cheap, and "
                         "best-of-few is noisy on a loaded machine)")
    ap.add_argument("--general-max", type=int, default=2000,
                    help="time tpc's general block engine (--general) up to this M")
    ap.add_argument("--e2e", type=int, default=2000,
                    help="M of the end-to-end comparison (fresh processes; 0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tpc", default=os.path.join(ROOT, "target", "release", "tpc"))
    ap.add_argument("--no-compare", action="store_true",
                    help="skip the tpc-vs-NT kernel check at the smallest M")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dump", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--e2e-worker", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker is not None:
        nt_worker(a.worker, a.repeat, a.dump)
        return
    if a.e2e_worker is not None:
        nt_e2e(a.e2e_worker, os.path.join(OUT, f"e2e_nt_{a.e2e_worker}"))
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
    tp, gen = {}, {}
    if have_tpc:
        for m in ms:
            tp[m] = run_tpc(tpc, m, a.fast_repeat)
            print(f"tpc M={m}: {tp[m]}", file=sys.stderr, flush=True)
            if m <= a.general_max:
                gen[m] = run_tpc(tpc, m, a.fast_repeat, general=True)
                print(f"tpc --general M={m}: {gen[m]}", file=sys.stderr, flush=True)

    fl = {}
    cc = subprocess.run(FLOOR_CC, capture_output=True, text=True)
    if cc.returncode != 0:
        print(f"floor: gcc failed: {cc.stderr[-500:]}", file=sys.stderr)
    else:
        for m in ms:
            fl[m] = run_floor(m, a.fast_repeat)
            print(f"floor M={m}: {fl[m]}", file=sys.stderr, flush=True)

    e2e = None
    if a.e2e and have_tpc:
        m = a.e2e
        if m not in ms:
            write_points(m, a.seed)
        t = time_v([tpc, "limit", os.path.relpath(TP, ROOT), "--inputs",
                    os.path.relpath(points_path(m), ROOT), "--out",
                    os.path.relpath(os.path.join(OUT, f"e2e_tpc_{m}"), ROOT)])
        n = time_v([sys.executable, os.path.abspath(__file__), "--e2e-worker", str(m)])
        e2e = (m, t, n)
        print(f"end to end M={m}: tpc {t}, NT {n}", file=sys.stderr, flush=True)

    def best(r):
        return min(r["seconds"]) if r and "error" not in r else None

    def fmt_s(v):
        return "n/a" if v is None else f"{v:.3f}"

    def ratio(x, y):
        return "n/a" if x is None or y is None or y <= 0 else f"{x / y:.2f}"

    out = []
    out.append(f"Depth-10 ReLU MLP, d = {D}, NNGP+NTK over M points (M x M), float64, "
               f"seed {a.seed}, best of {a.repeat} warm runs for NT, of {a.fast_repeat} for tpc, "
               f"the floor and the general engine. "
               f"NT 0.6.5 / jax 0.4.25 on CPU ({os.cpu_count()} cores).")
    out.append("")
    if not have_tpc:
        out.append(f"tpc binary not found at {tpc}: NT figures only.")
        out.append("")
    out.append("| M | NT warm s | tpc s | floor s | tpc / floor | NT / tpc | tpc general engine s | "
               "general / floor | NT peak RSS | tpc peak RSS | tpc peak / (M^2 f64) | floor peak RSS | load (1 min) |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in ms:
        r = nt[m]
        nb, tb, fb, gb = best(r), best(tp.get(m)), best(fl.get(m)), best(gen.get(m))
        mat = 8 * m * m
        t_rss = units = f_rss = "n/a"
        if tb is not None:
            t_rss = fmt_bytes(tp[m]["peak_rss_bytes"])
            units = f"{tp[m]['peak_rss_bytes'] / mat:.2f}"
        if fb is not None:
            f_rss = fmt_bytes(fl[m]["peak_rss_bytes"])
        out.append(f"| {m} | {fmt_s(nb)} | {fmt_s(tb)} | {fmt_s(fb)} | {ratio(tb, fb)} | "
                   f"{ratio(nb, tb)} | {fmt_s(gb)} | {ratio(gb, fb)} | "
                   f"{fmt_bytes(r['peak_rss_bytes'])} | {t_rss} | {units} | {f_rss} | "
                   f"{r['loadavg_1min']:.2f} |")
    out.append("")
    out.append("NT peak RSS is ru_maxrss of a fresh process per M (jax + TensorFlow imports "
               "included). 'floor' is benches/floor.c (gcc -O3 -march=native, OpenMP on all "
               "cores, the same fused recursion vectorized with a branch-free acos). "
               "'load' is the 1-minute load average when the NT run started.")
    if e2e:
        m, t, n = e2e
        if "error" in t or "error" in n:
            out.append("")
            out.append(f"End to end at M={m}: tpc {t}, NT {n}")
        else:
            out.append("")
            out.append(f"End to end at M={m} (fresh processes, /usr/bin/time -v): "
                       f"`tpc limit --out` {t['wall']:.2f} s, peak RSS {fmt_bytes(t['rss'])} "
                       f"({t['rss'] / (8 * m * m):.2f} M x M matrices); NT (python, imports, "
                       f"jit, one call, np.save) {n['wall']:.2f} s, peak RSS {fmt_bytes(n['rss'])}; "
                       f"NT / tpc = {n['wall'] / t['wall']:.1f}x.")
    errs = [f"tpc M={m}: {tp[m]['error']}" for m in tp if "error" in tp[m]]
    errs += [f"tpc --general M={m}: {gen[m]['error']}" for m in gen if "error" in gen[m]]
    errs += [f"floor M={m}: {fl[m]['error']}" for m in fl if "error" in fl[m]]
    if errs:
        out.append("")
        out += errs
    if have_tpc and not a.no_compare:
        out.append("")
        out.append(compare_smallest(tpc, min(ms)))
        if fl:
            out.append("")
            out.append(compare_floor(tpc, min(ms)))
    text = "\n".join(out)
    print(text)
    with open(os.path.join(OUT, "nt_vs_tpc.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
