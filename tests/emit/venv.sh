#!/usr/bin/env bash
# Makes (or reuses) the Python environment of the `tpc emit` tests: a venv with CPU
# PyTorch, JAX, NumPy and ruff under $TPC_EMIT_VENV (default: ~/.cache/tpc/emit-venv, outside
# the clone, so CI on the same machine installs it once and reuses it). Prints the venv's python on
# the last line of stdout; when the packages cannot be installed it says so on stderr
# (SKIP) and prints nothing, and the tests skip with that message.
set -uo pipefail
cd "$(dirname "$0")/../.."
venv="${TPC_EMIT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tpc/emit-venv}"
mkdir -p "$(dirname "$venv")"
venv="$(cd "$(dirname "$venv")" && pwd)/$(basename "$venv")"
stamp="$venv/.tpc-emit-ready"
if [ ! -f "$stamp" ]; then
    rm -rf "$venv"
    start=$(date +%s)
    if python3 -m venv "$venv" >&2 \
        && "$venv/bin/pip" install --quiet --disable-pip-version-check torch jax numpy ruff >&2 \
        && "$venv/bin/python" -c "import torch, jax, numpy; torch.zeros(1, dtype=torch.float64)" >&2; then
        touch "$stamp"
        echo "emit venv: installed torch, jax, numpy, ruff into $venv in $(( $(date +%s) - start )) s" >&2
    else
        echo "SKIP: tpc emit tests: cannot install torch/numpy/ruff into $venv (no python3 venv or no package index)" >&2
        exit 0
    fi
else
    echo "emit venv: reusing $venv" >&2
fi
echo "$venv/bin/python"
