#!/usr/bin/env python3
"""tpc finite-width kernels vs numpy/OpenBLAS, measured in one run, one table.

Setup (once; numpy is not part of the project's toolchain):

    python3 -m venv /work/venv-np
    /work/venv-np/bin/pip install numpy threadpoolctl

Run from the repository root (CARGO_TARGET_DIR is honoured if set):

    /work/venv-np/bin/python benches/numpy_products.py                # N = 1024..8192
    /work/venv-np/bin/python benches/numpy_products.py --sizes 1024,2048 --passes 1

What it does: builds `benches/finite_kernels.rs` (`cargo bench --no-run`), then for
each pass and each N runs the Rust binary (`--json`) as a subprocess and times numpy
on the *same* eight product shapes of a depth-3 relu MLP's forward and backward
pass (d = 32, P = 64 points as columns, Fortran-ordered arrays so that the layouts
match nalgebra's column-major storage), alternating Rust and numpy so both see the
same machine. Medians over reps and passes are reported.

The machine is a shared VM: before each measurement the script waits (up to
--idle-wait seconds) for the CPUs to be idle, and it reports the CPU time other
processes took during each measurement ("other load", in cores). Rows with high
other load are not trustworthy.

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are removed from this process's environment
before numpy is imported (some machines set them for old OpenBLAS builds; they
slow a current one). That affects this benchmark process only.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

for _var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
    os.environ.pop(_var, None)

import numpy as np  # noqa: E402

D, P = 32, 64


def cpu_busy_jiffies():
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts[:8]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


HZ = os.sysconf("SC_CLK_TCK")


def wait_idle(max_wait, quiet=0.15, window=2.0):
    """Wait until other processes use < `quiet` cores over `window` s, or give up."""
    deadline = time.time() + max_wait
    while True:
        b0, _ = cpu_busy_jiffies()
        time.sleep(window)
        b1, _ = cpu_busy_jiffies()
        load = (b1 - b0) / HZ / window
        if load < quiet or time.time() > deadline:
            return load


class LoadMeter:
    """CPU time taken by *other* processes while a block runs, in cores."""

    def __init__(self, child):
        self.child = child

    def __enter__(self):
        self.t0 = time.time()
        self.b0, _ = cpu_busy_jiffies()
        t = os.times()
        self.own0 = (t.children_user + t.children_system) if self.child else (t.user + t.system)
        return self

    def __exit__(self, *exc):
        b1, _ = cpu_busy_jiffies()
        t = os.times()
        own1 = (t.children_user + t.children_system) if self.child else (t.user + t.system)
        wall = time.time() - self.t0
        self.other = max(0.0, ((b1 - self.b0) / HZ - (own1 - self.own0)) / wall)


def build_bench():
    """Build the Rust bench and return the path of its executable."""
    cmd = ["cargo", "bench", "--bench", "finite_kernels", "--no-run", "--message-format=json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    exe = None
    for line in out.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "finite_kernels":
            exe = msg.get("executable") or exe
    if not exe:
        sys.exit("could not find the finite_kernels executable in cargo's output")
    return exe


def run_rust(exe, args):
    with LoadMeter(child=True) as lm:
        out = subprocess.run([exe, "--json", *args], check=True, capture_output=True, text=True).stdout
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")], lm.other


def products(n):
    """The eight products of the pass: (name, transposed-lhs, m, k, n)."""
    return [
        ("W1·x", False, n, D, P),
        ("W2·g1", False, n, n, P),
        ("W3·g2", False, n, n, P),
        ("vᵀ·g3", True, 1, n, P),
        ("v·1ᵀ", False, n, 1, P),
        ("W3ᵀ·dh3", True, n, n, P),
        ("W2ᵀ·dh2", True, n, n, P),
        ("W1ᵀ·dh1", True, D, n, P),
    ]


def bench_numpy(n, reps):
    """Same network, same products, same buffers-reused style as the Rust bench."""
    rng = np.random.default_rng(7)
    f = lambda a: np.asfortranarray(a)  # noqa: E731
    x = f(rng.standard_normal((D, P)))
    w1 = f(rng.standard_normal((n, D)) / np.sqrt(D))
    w2 = f(rng.standard_normal((n, n)) / np.sqrt(n))
    w3 = f(rng.standard_normal((n, n)) / np.sqrt(n))
    v = f(rng.standard_normal((n, 1)) / np.sqrt(n))
    dout = np.ones((1, P), order="F")
    z = lambda: np.zeros((n, P), order="F")  # noqa: E731
    h1, h2, h3, g1, g2, g3, dg1, dg2, dg3 = (z() for _ in range(9))
    fo = np.zeros((1, P), order="F")
    dx = np.zeros((D, P), order="F")
    t_prod = [[] for _ in range(8)]
    t_sample = []
    buf_nn = np.empty((n, n))
    buf_nd = np.empty((n, D))
    buf_n1 = np.empty((n, 1))
    for rep in range(reps + 1):
        # numpy's own sampler (single-threaded ziggurat), same count as tpc.
        s = time.perf_counter()
        rng.standard_normal(out=buf_nd)
        rng.standard_normal(out=buf_nn)
        rng.standard_normal(out=buf_nn)
        rng.standard_normal(out=buf_n1)
        ts = time.perf_counter() - s
        tp = [0.0] * 8

        def timed(k, fn):
            s = time.perf_counter()
            fn()
            tp[k] += time.perf_counter() - s

        timed(0, lambda: np.matmul(w1, x, out=h1))
        np.maximum(h1, 0.0, out=g1)
        timed(1, lambda: np.matmul(w2, g1, out=h2))
        np.maximum(h2, 0.0, out=g2)
        timed(2, lambda: np.matmul(w3, g2, out=h3))
        np.maximum(h3, 0.0, out=g3)
        timed(3, lambda: np.matmul(v.T, g3, out=fo))
        timed(4, lambda: np.matmul(v, dout, out=dg3))
        dg3[h3 <= 0] = 0.0
        timed(5, lambda: np.matmul(w3.T, dg3, out=dg2))
        dg2[h2 <= 0] = 0.0
        timed(6, lambda: np.matmul(w2.T, dg2, out=dg1))
        dg1[h1 <= 0] = 0.0
        timed(7, lambda: np.matmul(w1.T, dg1, out=dx))
        if rep > 0:
            t_sample.append(ts)
            for k in range(8):
                t_prod[k].append(tp[k])
    return {
        "sample_s": statistics.median(t_sample),
        "products": [statistics.median(t) for t in t_prod],
    }


def flops_of(n):
    return [2.0 * m * k * nn for (_, _, m, k, nn) in products(n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024,2048,4096,8192")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--idle-wait", type=float, default=60.0, help="max seconds to wait for an idle machine")
    ap.add_argument("--bin", help="prebuilt finite_kernels executable (skips cargo)")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    exe = a.bin or build_bench()
    try:
        from threadpoolctl import threadpool_info

        blas = [f"{i['internal_api']} {i['version']} {i['architecture']} {i['num_threads']}t" for i in threadpool_info()]
    except ImportError:
        blas = ["(threadpoolctl not installed)"]

    # Sampler micro-benchmark, once.
    wait_idle(a.idle_wait)
    sampler, sampler_load = run_rust(exe, ["--no-mlp"])
    sampler = sampler[0]

    rust = {n: [] for n in sizes}
    npy = {n: [] for n in sizes}
    load_r = {n: [] for n in sizes}
    load_n = {n: [] for n in sizes}
    for _ in range(a.passes):
        for n in sizes:
            reps = 3 if n >= 8192 else 5
            wait_idle(a.idle_wait)
            res, other = run_rust(exe, ["--no-sampler", "--sizes", str(n), "--reps", str(reps)])
            rust[n].append(res[0])
            load_r[n].append(other)
            wait_idle(a.idle_wait)
            with LoadMeter(child=False) as lm:
                npy[n].append(bench_numpy(n, reps))
            load_n[n].append(lm.other)
            print(f"# N={n}: done (other load {other:.2f} / {lm.other:.2f} cores)", file=sys.stderr)

    threads = sampler["threads"]
    print(f"## tpc finite kernels vs numpy {np.__version__} ({', '.join(blas)}), same run\n")
    print(f"Machine: {os.cpu_count()} CPUs; `other load` = CPU used by other processes during the measurement (cores).\n")
    print("### Sampling N(0,1) f64 (4096×512 buffer, 15 interleaved rounds)\n")
    print("| sampler | ns/normal (median) | ns/normal (best) | normals/s (median) | per core |")
    print("|---|---|---|---|---|")
    for key, name, cores in [
        ("ns_1t", "tpc ziggurat, 1 thread", 1),
        ("ns_par", f"tpc ziggurat, {threads} threads", threads),
        ("ns_rand_distr_1t", "rand_distr StandardNormal, 1 thread", 1),
        ("ns_raw_u64_1t", "raw Xoshiro256++ u64, 1 thread", 1),
    ]:
        med, best = sampler[key]
        print(f"| {name} | {med:.2f} | {best:.2f} | {1e9 / med:.2e} | {1e9 / med / cores:.2e} |")
    print(f"\n(other load during the sampler run: {sampler_load:.2f} cores)\n")

    print(f"### Depth-3 relu MLP forward+backward, d={D}, P={P}: time split and products vs numpy\n")
    print("| N | tpc sample s | tpc normals/s | numpy sample s | tpc products s | tpc GFLOP/s | "
          "numpy products s | numpy GFLOP/s | tpc/numpy | other load (tpc / numpy) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    per_product = {}
    for n in sizes:
        fl = flops_of(n)
        r_prod = [statistics.median([r["products"][k]["seconds"] for r in rust[n]]) for k in range(8)]
        n_prod = [statistics.median([x["products"][k] for x in npy[n]]) for k in range(8)]
        per_product[n] = (r_prod, n_prod)
        rs = statistics.median([r["sample_s"] for r in rust[n]])
        ns = statistics.median([x["sample_s"] for x in npy[n]])
        normals = rust[n][0]["normals"]
        rp, npp = sum(r_prod), sum(n_prod)
        print(
            f"| {n} | {rs:.4f} | {normals / rs:.2e} | {ns:.4f} | {rp:.4f} | {sum(fl) / rp / 1e9:.1f} | "
            f"{npp:.4f} | {sum(fl) / npp / 1e9:.1f} | {npp / rp:.2f}× | "
            f"{max(load_r[n]):.2f} / {max(load_n[n]):.2f} |"
        )

    print("\n### Per product: GFLOP/s tpc / numpy (ratio)\n")
    names = [p[0] for p in products(sizes[0])]
    print("| N | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for n in sizes:
        fl = flops_of(n)
        r_prod, n_prod = per_product[n]
        cells = [f"{f / r / 1e9:.1f} / {f / q / 1e9:.1f} ({q / r:.2f})" for f, r, q in zip(fl, r_prod, n_prod)]
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
