#!/usr/bin/env bash
# Dense against conditional engine (issue 7): time and peak memory of one draw of
# rnn.tp (T = 4, 5 outputs, 3 sequences: examples/rnn_points.csv) at widths 10^3 … 10^7.
#
#   cargo build --release && benches/engines.sh [path/to/tpc] > table.md
#   PROG=examples/sgd_mlp.tp INPUTS= benches/engines.sh   # 3 training steps, no inputs
#
# Each cell is one `tpc run --seeds 1` process under /usr/bin/time -v: wall time and
# peak RSS (so it includes compiling the program, a few ms). The dense engine is run
# only where its N×N matrix fits and finishes in minutes (DENSE_MAX); wider cells say
# "skipped". A width the engine refuses (its memory estimate exceeds what is
# available) is reported as refused. The 1-minute load average is printed with every
# row: the machine is shared, and times move with it.
set -u
here="$(cd "$(dirname "$0")/.." && pwd)"
tpc="${1:-${CARGO_TARGET_DIR:-$here/target}/release/tpc}"
prog="${PROG:-$here/examples/rnn.tp}"
pts="${INPUTS-$here/examples/rnn_points.csv}"
widths="${WIDTHS:-1000 10000 30000 100000 1000000 10000000}"
dense_max="${DENSE_MAX:-30000}"

# One draw: prints "seconds|peak MiB" or "refused".
one() {
    local engine=$1 width=$2 log
    log=$(mktemp)
    local inputs=()
    [ -n "$pts" ] && inputs=(--inputs "$pts")
    if /usr/bin/time -v "$tpc" run "$prog" "${inputs[@]}" --engine "$engine" \
        --width "$width" --seeds 1 --format json >/dev/null 2>"$log"; then
        awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, t, ":"); s = 0;
                                               for (i = 1; i <= n; i++) s = s * 60 + t[i] }
                    /Maximum resident set size/ { m = $2 / 1024 }
                    END { printf "%.2f s|%.0f MiB", s, m }' "$log"
    else
        echo "refused: $(grep -m1 -o 'needs about [0-9.]* GiB' "$log")"
    fi
    rm -f "$log"
}

echo "| N | dense time | dense peak RSS | conditional time | conditional peak RSS | load (1 min) |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: |"
for n in $widths; do
    if [ "$n" -le "$dense_max" ]; then
        d=$(one dense "$n")
    else
        d="skipped|skipped"
    fi
    c=$(one conditional "$n")
    case "$d" in refused*) d="$d|–" ;; esac
    case "$c" in refused*) c="$c|–" ;; esac
    load=$(cut -d' ' -f1 /proc/loadavg)
    echo "| $n | ${d%%|*} | ${d##*|} | ${c%%|*} | ${c##*|} | $load |"
done
