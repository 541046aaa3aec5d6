"""The emitted muP MLP trained in PyTorch against `tpc run` (issue 17).

For each width, emits examples/sgd_mlp.tp (parameterization mup, 3 SGD steps) with
`tpc emit --target torch`, draws K independent models with torch's own generator (the
laws are the module's, not tpc's draws), trains each with the module's train(), and
sets the mean f_t over draws against `tpc run --width N --seeds K --format json`
(tpc's own K draws): the difference of the means in units of the combined standard
error sqrt(se_torch^2 + se_tpc^2). Agreement in law means |z| < 3 nearly everywhere.

    python benches/emit_mup.py [--tpc target/release/tpc] [--widths 256,...,4096] [--seeds K]
"""

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tpc", default=os.path.join(ROOT, "target", "release", "tpc"))
    ap.add_argument("--file", default=os.path.join(ROOT, "examples", "sgd_mlp.tp"))
    ap.add_argument("--widths", default="256,512,1024,2048,4096")
    ap.add_argument("--seeds", type=int, default=100)
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp()
    module = os.path.join(tmp, "model.py")
    subprocess.run([a.tpc, "emit", a.file, "--target", "torch", "-o", module], check=True,
                   stderr=subprocess.DEVNULL)
    spec = importlib.util.spec_from_file_location("model", module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    worst = 0.0
    print(f"{'width':>6} {'t':>2} {'col':>3} {'torch mean':>12} {'± se':>9} {'tpc mean':>12} {'± se':>9} {'z':>6}")
    for n in [int(w) for w in a.widths.split(",")]:
        t0 = time.time()
        out = subprocess.run([a.tpc, "run", a.file, "--width", str(n), "--seeds", str(a.seeds),
                              "--format", "json"], check=True, capture_output=True, text=True).stdout
        ref = json.loads(out)["train"]
        t1 = time.time()
        gen = torch.Generator().manual_seed(1234 + n)
        trajs = torch.stack([mod.train(mod.Model(n, generator=gen)) for _ in range(a.seeds)])
        t2 = time.time()
        mean = trajs.mean(0)
        se = trajs.std(0, unbiased=True) / math.sqrt(a.seeds)
        for t in range(mean.shape[0]):
            for c in range(mean.shape[1]):
                m2, s2 = ref["f_t"][t][c], ref["f_t_se"][t][c]
                z = (mean[t, c].item() - m2) / math.sqrt(se[t, c].item() ** 2 + s2 ** 2)
                worst = max(worst, abs(z))
                print(f"{n:>6} {t:>2} {c:>3} {mean[t, c].item():>12.6f} {se[t, c].item():>9.6f} "
                      f"{m2:>12.6f} {s2:>9.6f} {z:>6.2f}")
        print(f"# width {n}: tpc run {t1 - t0:.1f} s, torch {t2 - t1:.1f} s ({a.seeds} draws)", flush=True)
    print(f"# worst |z| = {worst:.2f} over all widths, steps and points")
    sys.exit(0 if worst < 4.0 else 1)


if __name__ == "__main__":
    main()
