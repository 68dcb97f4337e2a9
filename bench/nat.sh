#!/usr/bin/env bash
# NAT traversal figures (issue 3's targets): runs the netns NAT-lab matrix
# (tests/netns_nat_lab.rs, every ordered pair of public / full cone /
# port-restricted cone / symmetric NAT) with NAT_LAB_FAILOVER=1, then
# tabulates its NAT_FIGURES lines per pair:
#   first packet   TCP connect to the new peer (SYN out, SYN-ACK back), ms,
#                  and how many connect attempts it took (the harness
#                  retries every 100 ms after a refusal or unreachable)
#   bound          backbone RTT + peer RTT (relay path) + handshake, ms
#   direct         time until both sides use the direct path, and that
#                  time counted from the first packet (target: <= 1000 ms)
#   failover       direct pairs: UDP between the two public addresses cut,
#                  until both sides are on the relay (target: <= 5000 ms)
#
#   sudo bench/nat.sh                    the whole matrix (~3-5 min)
#   sudo bench/nat.sh --pairs prc>prc,pub>sym --jobs 2
#   options: --pairs LIST (NAT_LAB_PAIRS tags: pub fc prc sym)
#            --jobs N (pairs at once; default 2, the machine's cores)
#            --log FILE (keep the test's whole output there)
#
# Not part of `cargo test` (a benchmark prints figures; the matrix test
# itself asserts paths, not times). Needs root and the NAT lab's tools
# (iproute2, nftables, iputils-ping). Builds only the test binary (debug).
set -euo pipefail
cd "$(dirname "$0")/.."

PAIRS=""; JOBS=2; LOG=""
while [ $# -gt 0 ]; do
    case "$1" in
        --pairs) PAIRS=$2; shift 2 ;;
        --jobs) JOBS=$2; shift 2 ;;
        --log) LOG=$2; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "nat.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ "$(id -u)" -ne 0 ]; then
    echo "nat.sh: needs root (network namespaces, nftables, TUN)" >&2
    exit 1
fi
keep_log=1
if [ -z "$LOG" ]; then
    LOG=$(mktemp /tmp/meshtun-nat-bench.XXXXXX)
    keep_log=0
fi
cleanup() { [ "$keep_log" = 1 ] || rm -f "$LOG"; }
trap cleanup EXIT

echo "nat.sh: load $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores; jobs $JOBS${PAIRS:+; pairs $PAIRS}"
status=0
env NAT_LAB_FAILOVER=1 NAT_LAB_JOBS="$JOBS" ${PAIRS:+NAT_LAB_PAIRS="$PAIRS"} \
    cargo test --locked --test netns_nat_lab nat_matrix_every_pair -- --nocapture --test-threads=1 >"$LOG" 2>&1 || status=$?
if ! grep -q '^NAT_FIGURES ' "$LOG"; then
    echo "nat.sh: the matrix printed no figures (exit $status); its output:" >&2
    tail -50 "$LOG" >&2
    exit 1
fi

grep '^NAT_FIGURES ' "$LOG" | awk '
function v(key,    i, kv) {
    for (i = 2; i <= NF; i++) { split($i, kv, "="); if (kv[1] == key) return kv[2] }
    return "-"
}
function num(x) { return x != "-" }
BEGIN {
    printf "%-9s %-6s %13s %5s %9s %10s %10s %16s %12s  %s\n", "pair", "expect", "first pkt ms", "tries", "bound ms", "bb rtt ms", "direct ms", "direct-first ms", "failover ms", "result"
}
{
    bb = v("bb_rtt_a_ms") "/" v("bb_rtt_b_ms")
    printf "%-9s %-6s %13s %5s %9s %10s %10s %16s %12s  %s\n", v("pair"), v("expect"), v("first_packet_ms"), v("connect_attempts"), v("bound_ms"), bb, v("direct_ms"), v("direct_after_first_ms"), v("failover_ms"), v("result")
    n++
    if (num(v("first_packet_ms")) && num(v("bound_ms")) && v("first_packet_ms") + 0 <= v("bound_ms") + 0) within++
    if (num(v("first_packet_ms"))) { fp[n] = v("first_packet_ms") + 0; if (fp[n] > fpmax) fpmax = fp[n] }
    if (v("expect") == "direct") {
        nd++
        if (num(v("direct_after_first_ms")) && v("direct_after_first_ms") + 0 <= 1000) d1s++
        if (num(v("direct_after_first_ms")) && v("direct_after_first_ms") + 0 > dmax) dmax = v("direct_after_first_ms") + 0
        if (num(v("failover_ms"))) { nf++; if (v("failover_ms") + 0 <= 5000) f5s++; if (v("failover_ms") + 0 > fmax) fmax = v("failover_ms") + 0 }
    }
}
END {
    printf "\n%d pairs. First packet within the bound: %d of %d (slowest %.1f ms).\n", n, within, n, fpmax
    printf "Direct within 1 s of the first packet: %d of %d direct pairs (slowest %.1f ms).\n", d1s, nd, dmax
    printf "Failover to the relay within 5 s: %d of %d measured (slowest %.1f ms).\n", f5s, nf, fmax
}'
echo "bb rtt = ping RTT from A / from B to the backbone; bound = A's + 2 x (A's + B's)."
if [ "$status" -ne 0 ]; then
    echo "nat.sh: the matrix test itself failed (exit $status): see its checks in ${LOG}" >&2
    keep_log=1
    exit "$status"
fi
