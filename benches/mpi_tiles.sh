#!/bin/sh
# Issue 16: `mpirun -n 2 tpc limit … --tile auto` writes the same bytes as one process.
#
#   sh benches/mpi_tiles.sh [M]        (default M = 10000; needs ~2·8·M² bytes of disk, x2)
#
# Installs Debian's openmpi-bin when mpirun is missing (root, apt), builds tpc, computes the
# depth-3 relu kernels of M points once in one process and once as two MPI ranks (each rank
# reads its rank and size from OMPI_COMM_WORLD_RANK/SIZE and writes its bands into the same
# files), and compares the .npy files byte for byte. Not in CI: it installs packages and
# writes 2 × 800 MB at M = 10^4.
set -eu
M=${1:-10000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
command -v mpirun >/dev/null || apt-get install -y -q openmpi-bin
cargo build --release --manifest-path "$ROOT/Cargo.toml" -q
TPC=${CARGO_TARGET_DIR:-$ROOT/target}/release/tpc
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
python3 "$ROOT/benches/points.py" "$M" 32 > "$T/p.csv"
# Bands of ~1000 points, so that both ranks get several.
"$TPC" limit "$ROOT/benches/relu3.tp" --inputs "$T/p.csv" --out "$T/one" --memory 256M > /dev/null
mpirun --allow-run-as-root --oversubscribe -n 2 \
  "$TPC" limit "$ROOT/benches/relu3.tp" --inputs "$T/p.csv" --out "$T/mpi" --memory 256M --tile auto > /dev/null
for k in nngp ntk; do
  cmp "$T/one/$k.npy" "$T/mpi/$k.npy"
  echo "$k.npy: identical ($(stat -c %s "$T/one/$k.npy") bytes)"
done
