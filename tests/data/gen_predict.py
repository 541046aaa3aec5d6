"""Data and an independent reference for `tpc predict` (issue 16).

Run once from the repository root with a Python that has numpy and scikit-learn
(e.g. /work/venv-nt/bin/python tests/data/gen_predict.py) after `cargo build --release`:

1. exports scikit-learn's 8x8 digits (1797 images, pixel values / 16) into
   tests/data/digits/: the first 1000 images for training, the other 797 for testing,
   targets one-hot (10 columns);
2. computes, on a small subset (40 training + 12 test digits) and from tpc's own limit
   kernels (`tpc limit --out`), the NNGP and NTK predictions at several times with
   numpy's eigh/solve, written as tests/data/predict_ref.json, following Neural
   Tangents' `predict.gradient_descent_mse_ensemble` (its formulas, re-derived here
   from scratch, not imported). tests/it/predict.rs compares `tpc predict` to it.
"""
import json, os, subprocess, tempfile
import numpy as np
from sklearn.datasets import load_digits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
D = os.path.join(ROOT, "tests", "data", "digits")
TPC = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "tpc")


def write_csv(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(",".join(repr(float(v)) if float(v) != int(v) else str(int(v)) for v in r) + "\n")


def export():
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    Y = np.eye(10)[y]
    os.makedirs(D, exist_ok=True)
    write_csv(os.path.join(D, "train_x.csv"), X[:1000])
    write_csv(os.path.join(D, "train_y.csv"), Y[:1000])
    write_csv(os.path.join(D, "test_x.csv"), X[1000:])
    write_csv(os.path.join(D, "test_y.csv"), Y[1000:])
    return X, Y


def predict(K, T, m, Y, t, reg):
    """NT's ensemble on the first m points (train) and the rest (test). t: float or inf."""
    Kdd, Ktd, Ktt = K[:m, :m], K[m:, :m], K[m:, m:]
    Tdd, Ttd = T[:m, :m], T[m:, :m]
    ysize = Y.size

    def regd(A):
        return A + reg * np.trace(A) / A.shape[0] * np.eye(A.shape[0])

    out = {}
    if np.isinf(t):
        Kr, Tr = regd(Kdd), regd(Tdd)
        out["nngp"] = (Ktd @ np.linalg.solve(Kr, Y), Ktt - Ktd @ np.linalg.solve(Kr, Ktd.T))
        B = np.linalg.solve(Tr, Ttd.T).T
    else:
        def g(A, tt):
            lam, V = np.linalg.eigh(regd(A))
            lam = np.maximum(lam, 0.0)
            c = tt / ysize
            with np.errstate(divide="ignore", invalid="ignore"):
                gl = np.where(lam * c < 1e-300, c, -np.expm1(-lam * c) / lam)
            return V @ np.diag(gl) @ V.T
        out["nngp"] = (Ktd @ g(Kdd, t) @ Y, Ktt - Ktd @ g(Kdd, 2 * t) @ Ktd.T)
        B = Ttd @ g(Tdd, t)
    mean = B @ Y
    cov = Ktt + B @ Kdd @ B.T - (B @ Ktd.T + Ktd @ B.T)
    out["ntk"] = (mean, cov)
    return out


def reference(X, Y):
    m, t = 40, 12
    idx = list(range(m)) + list(range(1000, 1000 + t))
    prog = os.path.join(ROOT, "tests", "data", "programs", "digits_mlp3.tp")
    with tempfile.TemporaryDirectory() as tmp:
        pts = os.path.join(tmp, "pts.csv")
        write_csv(pts, X[idx])
        subprocess.run([TPC, "limit", prog, "--inputs", pts, "--out", tmp], check=True,
                       stdout=subprocess.DEVNULL)
        K = np.load(os.path.join(tmp, "nngp.npy"))
        T = np.load(os.path.join(tmp, "ntk.npy"))
    cases = []
    for reg in [0.0, 1e-3]:
        for tt in [0.5, 20.0, float("inf")]:
            if reg == 0.0 and np.isinf(tt):
                continue  # the unregularized t = inf solve is ill-conditioned here
            p = predict(K, T, m, Y[:m], tt, reg)
            cases.append({
                "t": "inf" if np.isinf(tt) else tt,
                "diag_reg": reg,
                "nngp_mean": p["nngp"][0].tolist(), "nngp_var": np.diag(p["nngp"][1]).tolist(),
                "ntk_mean": p["ntk"][0].tolist(), "ntk_var": np.diag(p["ntk"][1]).tolist(),
            })
    ref = {"program": "tests/data/programs/digits_mlp3.tp", "train_rows": list(range(m)),
           "test_rows": list(range(t)), "cases": cases}
    with open(os.path.join(ROOT, "tests", "data", "predict_ref.json"), "w") as f:
        json.dump(ref, f, indent=1)


if __name__ == "__main__":
    X, Y = export()
    reference(X, Y)
