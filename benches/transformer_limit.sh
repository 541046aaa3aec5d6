#!/bin/sh
# NNGP + NTK of the transformer (examples/transformer.tp with L = 8, no train block) over
# 32 sequences, against the depth-10 relu MLP (benches/mlp10.tp) on 32 points as the
# baseline in the same run. Wall time and peak RSS from /usr/bin/time -v.
#   sh benches/transformer_limit.sh [path/to/tpc]
TPC=${1:-target/release/tpc}
D=$(dirname "$0")
uptime
for i in 1 2 3; do
  for case in "transformer_L8.tp transformer_L8_X32.csv" "mlp10.tp mlp10_X32.csv"; do
    set -- $case
    /usr/bin/time -v "$TPC" limit "$D/$1" --inputs "$D/$2" --format json > /dev/null 2> /tmp/tpc_bench_$$.err
    printf '%s: %s s, %s kB\n' "$1" \
      "$(grep 'Elapsed' /tmp/tpc_bench_$$.err | awk '{print $NF}')" \
      "$(grep 'Maximum resident' /tmp/tpc_bench_$$.err | awk '{print $NF}')"
  done
done
rm -f /tmp/tpc_bench_$$.err
uptime
