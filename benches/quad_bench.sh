#!/bin/sh
# Issue 13 item 2: smooth-kernel quadrature on RNNs, before/after in one run.
#   sh benches/quad_bench.sh BASE_TPC NEW_TPC
# BASE_TPC is a tpc built before the change (its times are for P points and are
# extrapolated to 100 by P^2, the number of kernel entries; it takes minutes at P = 100),
# NEW_TPC the current one (best of 3 on all 100 points). Inputs: python3 benches/rnn20.py.
set -e
BASE=$1
NEW=$2
cd "$(dirname "$0")"
P=${P:-10}
head -n "$P" seq100_T20.csv > /tmp/quad_bench_T20.csv
head -n "$P" seq100_T4.csv > /tmp/quad_bench_T4.csv
uptime
for case in "rnn20_pooled.tp seq100_T20.csv /tmp/quad_bench_T20.csv" \
            "rnn20.tp seq100_T20.csv /tmp/quad_bench_T20.csv" \
            "../examples/rnn.tp seq100_T4.csv /tmp/quad_bench_T4.csv"; do
    set -- $case
    echo "== $1"
    printf 'before (P = %s): ' "$P"; nice -n 5 "$BASE" bench limit "$1" --inputs "$3" --repeat 1
    printf 'after  (P = 100): '; nice -n 5 "$NEW" bench limit "$1" --inputs "$2" --repeat 3
    "$NEW" limit "$1" --inputs "$2" | grep "largest stated error"
done
uptime
