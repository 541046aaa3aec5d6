"""Runs emitted tpc JAX modules on saved parameters (tests/it/emit.rs): the same
manifest and output as check.py, with the NTK by jax.jacrev."""

import importlib.util
import json
import sys
import time

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    cases = json.load(open(sys.argv[1]))
    out = []
    for i, c in enumerate(cases):
        t0 = time.time()
        mod = load(c["module"], f"emitted_jax_{i}")
        params = mod.load_npz(c["npz"])
        inputs = mod.split_inputs(c["rows"]) if mod.INPUTS else ()
        f, obs = mod.run(params, *inputs)
        res = {"f": f.T.tolist(), "observe": {k: v.tolist() for k, v in obs.items()}}
        if mod.OUTPUTS:
            jac = jax.jacrev(lambda p: mod.apply(p, *inputs).T.reshape(-1))(params)
            lr = mod.lr_multipliers(mod.width(params))
            theta = sum(lr[k] * (j.reshape(j.shape[0], -1) @ j.reshape(j.shape[0], -1).T) for k, j in jac.items())
            res["ntk"] = jnp.asarray(theta).tolist()
        if c["train"]:
            res["f_t"] = mod.train(params, eval_rows=c["rows"])[0].tolist()
        out.append(res)
        print(f"{c['module']}: {time.time() - t0:.1f} s", file=sys.stderr)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
