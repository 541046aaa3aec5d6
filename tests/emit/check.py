"""Runs emitted tpc modules on saved parameters (tests/it/emit.rs).

Reads a JSON manifest: a list of cases {"module", "npz", "rows", "width", "train"}.
For each, loads the module, its parameters from the .npz, and writes the outputs
(O x P), the NTK Gram over (output, point) pairs in output-major order by autograd
(sum over parameters of lr_mult * <df/dw, df/dw'>), the observes and, with a train
block, the trajectory f_t of train(). Prints one JSON list.
"""

import importlib.util
import json
import sys

import torch


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ntk(mod, model, inputs):
    f = model(*inputs)  # (P, O)
    flat = f.t().reshape(-1)  # output-major
    params = model.tp_params()
    rows = []
    for k in range(flat.shape[0]):
        grads = torch.autograd.grad(flat[k], list(params.values()), retain_graph=True, allow_unused=True)
        rows.append(grads)
    m = flat.shape[0]
    theta = torch.zeros(m, m, dtype=torch.float64)
    for i, name in enumerate(params):
        g = torch.stack([
            (r[i] if r[i] is not None else torch.zeros_like(params[name])).reshape(-1) for r in rows
        ])
        theta += model.lr_mult[name] * (g @ g.t())
    return theta


def main():
    cases = json.load(open(sys.argv[1]))
    out = []
    for i, c in enumerate(cases):
        mod = load(c["module"], f"emitted_{i}")
        model = mod.Model(c["width"]).load_npz(c["npz"])
        inputs = mod.split_inputs(c["rows"]) if mod.INPUTS else ()
        f, obs = model.run(*inputs)
        res = {
            "f": f.t().tolist(),
            "observe": {k: v.tolist() for k, v in obs.items()},
        }
        if mod.OUTPUTS:
            res["ntk"] = ntk(mod, model, inputs).tolist()
        if c["train"]:
            res["f_t"] = mod.train(model, eval_rows=c["rows"]).tolist()
        out.append(res)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
