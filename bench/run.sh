#!/usr/bin/env bash
# Tunnel throughput benchmark (issue 6): two namespaces on one veth pair;
# iperf3 TCP (1 and 4 streams, both directions), UDP and ping RTT over
#   raw  the veth itself (the physical limit)
#   bt   boringtun-cli -t 1
#   wg   wireguard-go (Debian)
#   mt   meshtun (release build; its backbone runs in namespace b)
# Runs are interleaved (run 1 of every tunnel, then run 2, ...) so machine
# drift hits all alike. Prints min/median/max, each tunnel's ratio to
# meshtun, CPU seconds per GB moved and peak RSS of each tunnel process.
#
#   sudo bench/run.sh                 3 runs x 10 s, every test (~15 min)
#   sudo bench/run.sh --quick         1 run x 3 s, TCP single stream + ping (CI);
#                                     exits 1 if meshtun TCP is NA or < 5% of raw
#   options: --runs N  --seconds S  --tests tcp1,tcp1r,tcp4,tcp4r,udp,udpr,ping
#            --tunnels raw,bt,wg,mt  --bin PATH (skip the cargo build)
#            --no-install (skip tunnels whose tools are missing)
#            --mt-args "ARGS" (extra `meshtun up` arguments, e.g. --no-offload
#            to measure what the offloads buy)  --keep (keep the logs)
#            --bin2 PATH [--mt2-args "ARGS"] (a second meshtun pair, tunnel m2,
#            measured in the same run: A/B two builds or two settings)
#
# Not part of `cargo test`. Needs root. Never build while it runs: iperf3
# and both tunnel ends share the machine's cores.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=3; SECS=10; QUICK=0; INSTALL=1; BIN=""; MT_ARGS=""; KEEP=0; BIN2=""; MT2_ARGS=""
TESTS="tcp1,tcp1r,tcp4,tcp4r,udp,udpr,ping"
TUNNELS="raw,bt,wg,mt"
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) RUNS=$2; shift 2 ;;
        --seconds) SECS=$2; shift 2 ;;
        --quick) QUICK=1; RUNS=1; SECS=3; TESTS="tcp1,ping"; shift ;;
        --tests) TESTS=$2; shift 2 ;;
        --tunnels) TUNNELS=$2; shift 2 ;;
        --bin) BIN=$2; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        --mt-args) MT_ARGS=$2; shift 2 ;;
        --bin2) BIN2=$2; shift 2 ;;
        --mt2-args) MT2_ARGS=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "bench/run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "bench/run.sh: needs root (namespaces, TUN): sudo $0" >&2; exit 1; }
has() { [[ ",$2," == *",$1,"* ]]; }
if { [ -n "$BIN2" ] || [ -n "$MT2_ARGS" ]; } && ! has m2 "$TUNNELS"; then TUNNELS="$TUNNELS,m2"; fi
NOTES=()

# ---- tools -----------------------------------------------------------------
apt_install() {
    [ "$INSTALL" = 1 ] || return 0
    command -v apt-get >/dev/null || return 0
    echo "== installing $* (Debian)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"; } >/dev/null 2>&1 || true
}
need=()
command -v iperf3 >/dev/null || need+=(iperf3)
command -v ping >/dev/null || need+=(iputils-ping)
command -v ip >/dev/null || need+=(iproute2)
if has wg "$TUNNELS" || has bt "$TUNNELS"; then command -v wg >/dev/null || need+=(wireguard-tools); fi
if has wg "$TUNNELS"; then command -v wireguard-go >/dev/null || need+=(wireguard-go); fi
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
command -v iperf3 >/dev/null || { echo "bench/run.sh: iperf3 is missing" >&2; exit 1; }
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
if has bt "$TUNNELS" && ! command -v boringtun-cli >/dev/null; then
    if [ "$INSTALL" = 1 ] && [ "$QUICK" = 0 ]; then
        echo "== cargo install --locked boringtun-cli"
        cargo install --quiet --locked boringtun-cli || true
    fi
fi
drop_tunnel() { TUNNELS=$(echo ",$TUNNELS," | sed "s/,$1,/,/; s/^,//; s/,$//"); NOTES+=("skipped $1: $2"); }
if has bt "$TUNNELS"; then
    command -v boringtun-cli >/dev/null || drop_tunnel bt "boringtun-cli not installed (run without --quick/--no-install to install it)"
    command -v wg >/dev/null || drop_tunnel bt "wg (wireguard-tools) not installed"
fi
if has wg "$TUNNELS"; then
    command -v wireguard-go >/dev/null && command -v wg >/dev/null || drop_tunnel wg "wireguard-go or wg not installed"
fi
if { has mt "$TUNNELS" || { has m2 "$TUNNELS" && [ -z "$BIN2" ]; }; } && [ -z "$BIN" ]; then
    echo "== cargo build --release"
    cargo build --quiet --release --locked --bin meshtun
    BIN="$PWD/target/release/meshtun"
fi

[ -n "$BIN2" ] || BIN2=$BIN

# ---- lab -------------------------------------------------------------------
ID=$$
P="mtbench-$ID"
A="$P-a"; B="$P-b"; C="$P-c"; D="$P-d"   # c and d: the second meshtun pair (m2)
RUN=$(mktemp -d /tmp/mtbench.XXXXXX)
PIDS=()
declare -A PROC_A PROC_B         # tunnel -> pid of its process in a / b
cleanup() {
    set +e
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[$i]}
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
    done
    for ns in "$A" "$B" "$C" "$D"; do ip netns del "$ns" 2>/dev/null; done
    rm -f /var/run/wireguard/bt"$ID"?.sock /var/run/wireguard/wg"$ID"?.sock
    if [ "$KEEP" = 1 ]; then echo "logs kept in $RUN"; else rm -rf "$RUN"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

make_pair() {  # ns-a ns-b: two namespaces on one veth pair, 10.99.0.1 and .2
    ip netns add "$1"; ip netns add "$2"
    ip -n "$1" link set lo up; ip -n "$2" link set lo up
    ip link add eth0 netns "$1" type veth peer name eth0 netns "$2"
    ip -n "$1" addr add 10.99.0.1/24 dev eth0; ip -n "$2" addr add 10.99.0.2/24 dev eth0
    ip -n "$1" link set eth0 up; ip -n "$2" link set eth0 up
}
make_pair "$A" "$B"
# A second meshtun pair cannot share a and b with the first: both would
# route the mesh prefix to their own TUN. It gets a veth pair of its own.
if has m2 "$TUNNELS"; then make_pair "$C" "$D"; fi
declare -A PEER            # tunnel -> address of b through it
declare -A NSA NSB         # tunnel -> the namespaces of its two ends
for t in ${TUNNELS//,/ }; do NSA[$t]=$A; NSB[$t]=$B; done
if has m2 "$TUNNELS"; then NSA[m2]=$C; NSB[m2]=$D; fi
PEER[raw]=10.99.0.2

wait_ping() {  # ns addr: until it answers (tunnel handshakes), max ~15 s
    for _ in $(seq 30); do ip netns exec "$1" ping -c 1 -W 0.5 "$2" >/dev/null 2>&1 && return 0; done
    return 1
}

# WireGuard-compatible userspace daemons, configured with `wg set`.
# /var/run/wireguard/*.sock is not per namespace: names carry our pid.
start_wg_pair() {  # tag prefix6 port command...
    local tag=$1 net=$2 port=$3; shift 3
    local ka="$RUN/$tag-a.key" kb="$RUN/$tag-b.key"
    (umask 077; wg genkey >"$ka"; wg genkey >"$kb")
    local side ns if addr peer_pub peer_ep
    for side in a b; do
        if [ $side = a ]; then ns=$A; addr=$net::1; peer_pub=$(wg pubkey <"$kb"); peer_ep=10.99.0.2:$port; peer_ip=$net::2
        else ns=$B; addr=$net::2; peer_pub=$(wg pubkey <"$ka"); peer_ep=10.99.0.1:$port; peer_ip=$net::1; fi
        if="$tag$ID$side"
        ip netns exec "$ns" env WG_PROCESS_FOREGROUND=1 "$@" "$if" >"$RUN/$tag-$side.log" 2>&1 &
        PIDS+=($!)
        if [ $side = a ]; then PROC_A[$tag]=$!; else PROC_B[$tag]=$!; fi
        for _ in $(seq 50); do [ -S /var/run/wireguard/$if.sock ] && break; sleep 0.1; done
        ip netns exec "$ns" wg set "$if" private-key "$RUN/$tag-$side.key" listen-port "$port" \
            peer "$peer_pub" allowed-ips "$peer_ip/128" endpoint "$peer_ep"
        ip -n "$ns" addr add "$addr/64" dev "$if" nodad
        ip -n "$ns" link set "$if" mtu 1420 up
    done
    PEER[$tag]=$net::2
}

if has bt "$TUNNELS"; then
    echo "== starting boringtun-cli -t 1 ($(boringtun-cli --version 2>/dev/null | head -1))"
    start_wg_pair bt fd01 51821 boringtun-cli -f --disable-drop-privileges -t 1
fi
if has wg "$TUNNELS"; then
    echo "== starting wireguard-go ($(dpkg-query -W -f '${Version}' wireguard-go 2>/dev/null || echo '?'))"
    start_wg_pair wg fd02 51822 wireguard-go -f
fi
declare -A IDLE_RSS
start_meshtun() {  # tag binary port "extra up args": a backbone and node b in $B, node a in $A
    local tag=$1 bin=$2 port=$3 args=$4 side ns A=${NSA[$1]} B=${NSB[$1]}
    echo "== starting meshtun $tag ($bin${args:+ $args}): backbone and node b in $B, node a in $A"
    ip netns exec "$B" "$bin" backbone --config /dev/null --listen 10.99.0.2:$((port + 1000)) --socket "$RUN/$tag-bb.sock" >"$RUN/$tag-bb.log" 2>&1 &
    PIDS+=($!)
    for side in a b; do
        ns=$A; [ $side = b ] && ns=$B
        # shellcheck disable=SC2086
        ip netns exec "$ns" "$bin" up --config /dev/null --backbone 10.99.0.2:$((port + 1000)) --dns-port 0 --listen-port "$port" \
            --interface "$tag$ID$side" --state-dir "$RUN/$tag-$side" --socket "$RUN/$tag-$side.sock" $args >"$RUN/$tag-$side.log" 2>&1 &
        PIDS+=($!)
        if [ $side = a ]; then PROC_A[$tag]=$!; else PROC_B[$tag]=$!; fi
    done
    for side in a b; do
        for _ in $(seq 100); do [ -S "$RUN/$tag-$side.sock" ] && break; sleep 0.1; done
        [ -S "$RUN/$tag-$side.sock" ] || { echo "meshtun $tag $side did not start:"; cat "$RUN/$tag-$side.log"; exit 1; }
    done
    PEER[$tag]=$("$bin" id --state-dir "$RUN/$tag-b" --json | sed -E 's/.*"ipv6":"([^"]+)".*/\1/')
    sleep 1
    IDLE_RSS[$tag]=$(awk '/^VmRSS/ {print $2}' /proc/"${PROC_A[$tag]}"/status)
}
if has mt "$TUNNELS"; then start_meshtun mt "$BIN" 51820 "$MT_ARGS"; fi
if has m2 "$TUNNELS"; then start_meshtun m2 "$BIN2" 51830 "$MT2_ARGS"; fi
for t in ${TUNNELS//,/ }; do
    wait_ping "${NSA[$t]}" "${PEER[$t]}" || { echo "tunnel $t: ${PEER[$t]} does not answer"; tail -5 "$RUN"/$t-*.log 2>/dev/null; exit 1; }
done

for t in mt m2; do
    has $t "$TUNNELS" || continue
    # Which path meshtun's traffic takes (a relayed path would add a hop).
    bin=$BIN; [ "$t" = m2 ] && bin=$BIN2
    { ip netns exec "${NSA[$t]}" "$bin" status --socket "$RUN/$t-a.sock" 2>/dev/null || true; } | { grep -iE '^ *peer|path|direct|relay' || true; } |
        head -3 | sed "s/^/== meshtun $t a: /"
done
for ns in "$B" ${NSB[m2]:+"$D"}; do
    ip netns exec "$ns" iperf3 -s >>"$RUN/iperf3-server.log" 2>&1 &
    PIDS+=($!)
done
for ns in "$A" ${NSA[m2]:+"$C"}; do
    for _ in $(seq 50); do ip netns exec "$ns" bash -c 'exec 3<>/dev/tcp/10.99.0.2/5201' 2>/dev/null && break; sleep 0.1; done
done
sleep 0.3

# ---- measure ---------------------------------------------------------------
HZ=$(getconf CLK_TCK)
declare -A CPU BYTES
cpu_ticks() {  # utime+stime of the tunnel's two processes
    local t=$1 sum=0 pid
    for pid in "${PROC_A[$t]:-}" "${PROC_B[$t]:-}"; do
        [ -n "$pid" ] && [ -r /proc/$pid/stat ] || continue
        sum=$((sum + $(sed 's/.*) //' /proc/$pid/stat | awk '{print $12 + $13}')))
    done
    echo $sum
}
iperf() {  # tunnel test -> Mbit/s received
    local t=$1 test=$2 args=(-c "${PEER[$t]}" -t "$SECS" -f m)
    case $test in
        tcp1) ;; tcp1r) args+=(-R) ;; tcp4) args+=(-P 4) ;; tcp4r) args+=(-P 4 -R) ;;
        udp) args+=(-u -b 0 -l 1200) ;; udpr) args+=(-u -b 0 -l 1200 -R) ;;
    esac
    { ip netns exec "${NSA[$t]}" timeout $((SECS + 20)) iperf3 "${args[@]}" 2>&1 || true; } | tee -a "$RUN/iperf3-client.log" |
        awk '/receiver/ {for (i = 2; i <= NF; i++) if ($i == "Mbits/sec") v = $(i-1)} END {print (v == "" ? "NA" : v)}'
}
# Pings 10 ms apart: below 10 ms iputils ping busy-waits between sends and
# takes a whole core (96% CPU measured) of the two the tunnels need, so the
# test measured wake-ups against a spinner, not a tunnel's own latency.
PING_SLICE=50
pingrtt() {  # tunnel [count] -> average RTT in ms
    # A ping that got no answer exits non-zero: the figure is NA, not the end of the run.
    { ip netns exec "${NSA[$1]}" ping -q -c "${2:-$PING_SLICE}" -i 0.01 -W 1 "${PEER[$1]}" 2>&1 || true; } |
        awk -F/ '/^rtt|^round-trip/ {v = $5} END {print (v == "" ? "NA" : v)}'
}
# One run of the ping test: slices of 50 pings (0.5 s), the tunnels taking
# turns slice by slice, so drift within the run hits every tunnel alike; a
# tunnel's figure is the mean of its slices. 2 slices per second of --seconds.
# The order rotates from slice to slice.
cpu_ns() {  # nanoseconds of CPU the tunnel's two processes have used (every thread)
    local t=$1 pid
    for pid in "${PROC_A[$t]:-}" "${PROC_B[$t]:-}"; do
        if [ -n "$pid" ]; then cat /proc/"$pid"/task/*/schedstat 2>/dev/null || true; fi
    done | awk '{s += $1} END {printf "%.0f", s}'
}
ping_run() {  # run -> appends each tunnel's figure to RESULTS
    local slices=$((SECS * 2)) slice t v before after
    declare -A sum=() bad=()
    local -a order
    read -r -a order <<<"${TUNNELS//,/ }"
    for slice in $(seq "$slices"); do
        # Each slice starts one tunnel further on: no tunnel always follows
        # the same one (wireguard-go's runtime keeps threads spinning for a
        # while after its traffic stops, which the next tunnel would pay).
        local k=$(( (slice - 1) % ${#order[@]} ))
        for t in "${order[@]:k}" "${order[@]:0:k}"; do
            before=$(cpu_ns "$t")
            v=$(pingrtt "$t")
            after=$(cpu_ns "$t")
            # A thread that ended during the slice takes its time with it:
            # never count less than nothing.
            PING_CPU_NS[$t]=$(( ${PING_CPU_NS[$t]:-0} + (after > before ? after - before : 0) ))
            PINGS[$t]=$(( ${PINGS[$t]:-0} + PING_SLICE ))
            if [ "$v" = NA ]; then bad[$t]=1; else sum[$t]=$(awk -v a="${sum[$t]:-0}" -v b="$v" 'BEGIN {print a + b}'); fi
            printf '%s\t%s\t%s\t%s\n' pingslice "$t" "$1.$slice" "$v" >>"$RESULTS"
        done
    done
    for t in ${TUNNELS//,/ }; do
        if [ -n "${bad[$t]:-}" ]; then v=NA; else v=$(awk -v a="${sum[$t]}" -v n="$slices" 'BEGIN {printf "%.4f", a / n}'); fi
        printf '%s\t%s\t%s\n' ping "$t" "$v" >>"$RESULTS"
        printf '   run %d  %-6s %-4s %s\n' "$1" ping "$t" "$v"
    done
}
declare -A PING_CPU_NS PINGS

RESULTS="$RUN/results.tsv"
: >"$RESULTS"
echo "== measuring: $RUNS run(s) x ${SECS} s; tests $TESTS; tunnels $TUNNELS; load: $(uptime | sed 's/.*load/load/')"
for r in $(seq "$RUNS"); do
    for test in ${TESTS//,/ }; do
        if [ "$test" = ping ]; then ping_run "$r"; continue; fi
        for t in ${TUNNELS//,/ }; do
            before=$(cpu_ticks "$t")
            v=$(iperf "$t" "$test")
            after=$(cpu_ticks "$t")
            if [ "$v" != NA ]; then
                CPU[$t]=$(( ${CPU[$t]:-0} + after - before ))
                BYTES[$t]=$(awk -v a="${BYTES[$t]:-0}" -v m="$v" -v s="$SECS" 'BEGIN {printf "%.0f", a + m * 1e6 / 8 * s}')
            fi
            printf '%s\t%s\t%s\n' "$test" "$t" "$v" >>"$RESULTS"
            printf '   run %d  %-6s %-4s %s\n' "$r" "$test" "$t" "$v"
        done
    done
done
declare -A PEAK
for t in ${TUNNELS//,/ }; do
    [ "$t" = raw ] && continue
    PEAK[$t]=$(cat /proc/"${PROC_A[$t]}"/status /proc/"${PROC_B[$t]}"/status 2>/dev/null | awk '/^VmHWM/ {if ($2 > m) m = $2} END {print m + 0}')
done

# ---- report ----------------------------------------------------------------
name() { case $1 in raw) echo "raw veth" ;; bt) echo "boringtun-cli -t 1" ;; wg) echo "wireguard-go" ;; mt) echo "meshtun${MT_ARGS:+ $MT_ARGS}" ;; m2) echo "meshtun (2)${MT2_ARGS:+ $MT2_ARGS}" ;; esac; }
stats() {  # test tunnel -> "min med max" (or NA)
    awk -F'\t' -v te="$1" -v tu="$2" '$1 == te && $2 == tu && $3 != "NA" {print $3}' "$RESULTS" | sort -g |
        awk '{v[NR] = $1} END {if (NR == 0) {print "NA NA NA"; exit}
             m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print v[1], m, v[NR]}'
}
# Paired ping: a tunnel's slice over meshtun's slice of the same round ->
# "rounds median q1 q3 meshtun-faster ci-low ci-high". The 95% confidence
# interval of the median is distribution-free: the order statistics
# n/2 -+ 0.98 sqrt(n) (sign test); NA below 8 rounds.
paired() {
    awk -F'\t' -v tu="$1" '$1 == "pingslice" && $4 != "NA" {v[$2 "/" $3] = $4; round[$3] = 1}
        END {for (r in round) if ((tu "/" r) in v && ("mt/" r) in v && v["mt/" r] > 0) print v[tu "/" r] / v["mt/" r]}' "$RESULTS" |
        sort -g | awk '{r[NR] = $1; if ($1 > 1) w++}
            END {if (NR == 0) {print 0; exit}
                 m = (NR % 2) ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2
                 q1 = r[int((NR + 3) / 4)]; q3 = r[int((3 * NR + 3) / 4)]
                 k = int(NR / 2 - 0.98 * sqrt(NR))
                 if (k >= 1) {lo = r[k]; hi = r[NR - k + 1]} else {lo = "NA"; hi = "NA"}
                 print NR, m, q1, q3, w + 0, lo, hi}'
}
echo
echo "== results: $RUNS run(s) x ${SECS} s, $(nproc) CPUs, $(uname -r); load now: $(uptime | sed 's/.*load average: //')"
printf '%-6s %-20s %28s %10s\n' test tunnel "min / median / max" "vs meshtun"
for test in ${TESTS//,/ }; do
    unit="Mbit/s"; [ "$test" = ping ] && unit="ms RTT"
    read -r _ mtmed _ <<<"$(has mt "$TUNNELS" && stats "$test" mt || echo NA NA NA)"
    for t in ${TUNNELS//,/ }; do
        read -r lo med hi <<<"$(stats "$test" "$t")"
        ratio=$(awk -v a="$med" -v b="$mtmed" 'BEGIN {print (a == "NA" || b == "NA" || b == 0) ? "-" : sprintf("%.2f", a / b)}')
        if [ "$test" = ping ]; then fmt='%.3f'; else fmt='%.0f'; fi
        printf "%-6s %-20s %28s %10s\n" "$test" "$(name "$t")" \
            "$(awk -v f="$fmt" -v a="$lo" -v b="$med" -v c="$hi" 'BEGIN {if (a == "NA") print "NA"; else printf f " / " f " / " f " '"$unit"'", a, b, c}')" "$ratio"
    done
done
echo
echo "(vs meshtun: the tunnel's median over meshtun's; for throughput above 1 means faster than meshtun, for RTT above 1 means slower)"
if has ping "$TESTS" && has mt "$TUNNELS"; then
    # Paired: each slice of pings against meshtun's slice of the same
    # round, seconds apart, so drift between rounds cancels out.
    echo
    echo "ping, paired by round (a tunnel's slice over meshtun's slice of the same round; above 1: meshtun faster):"
    for t in ${TUNNELS//,/ }; do
        [ "$t" = mt ] && continue
        read -r n m q1 q3 w lo hi <<<"$(paired "$t")"
        [ "$n" = 0 ] && continue
        printf "  %-22s median %.3f (95%% CI %s), quartiles %.3f-%.3f, %d rounds, meshtun faster in %d\n" "$(name "$t")" "$m" \
            "$( [ "$lo" = NA ] && echo "needs 8 rounds" || printf '%.3f-%.3f' "$lo" "$hi")" "$q1" "$q3" "$n" "$w"
    done
fi
echo
printf '%-20s %14s %14s %14s %14s\n' tunnel "CPU s per GB" "CPU us/ping" "peak RSS MiB" "idle RSS MiB"
for t in ${TUNNELS//,/ }; do
    [ "$t" = raw ] && continue
    cpu=$(awk -v c="${CPU[$t]:-0}" -v b="${BYTES[$t]:-0}" -v hz="$HZ" 'BEGIN {print (b > 0) ? sprintf("%.2f", c / hz / (b / 1e9)) : "-"}')
    pcpu=$(awk -v c="${PING_CPU_NS[$t]:-0}" -v n="${PINGS[$t]:-0}" 'BEGIN {print (n > 0) ? sprintf("%.1f", c / n / 1000) : "-"}')
    printf '%-20s %14s %14s %14s %14s\n' "$(name "$t")" "$cpu" "$pcpu" "$(awk -v k="${PEAK[$t]:-0}" 'BEGIN {printf "%.1f", k / 1024}')" \
        "$( [ -n "${IDLE_RSS[$t]:-}" ] && awk -v k="${IDLE_RSS[$t]}" 'BEGIN {printf "%.1f", k / 1024}' || echo -)"
done
echo "(CPU: both ends' processes, per GB over the throughput tests and per ping (both ends, each way) over the ping test; RSS: the larger of the two ends' processes)"
for n in "${NOTES[@]}"; do echo "note: $n"; done

# ---- the issue's targets, judged on this run's own figures ------------------
if has mt "$TUNNELS"; then
    echo
    echo "targets (this run's figures; the per-peer memory target is loadgen's: see bench/README.md):"
    read -r _ mt_tcp _ <<<"$(stats tcp1 mt)"
    verdict() { awk -v x="$1" -v min="$2" 'BEGIN {print (x >= min) ? "met" : "NOT met"}'; }
    if has tcp1 "$TESTS" && [ "$mt_tcp" != NA ]; then
        for pair in "bt 3" "wg 4"; do
            read -r t at_least <<<"$pair"
            has "$t" "$TUNNELS" || continue
            read -r _ other _ <<<"$(stats tcp1 "$t")"
            [ "$other" = NA ] && continue
            x=$(awk -v a="$mt_tcp" -v b="$other" 'BEGIN {printf "%.2f", a / b}')
            echo "  single-stream TCP >= ${at_least}x $(name "$t"): ${x}x, $(verdict "$x" "$at_least")"
        done
        if has raw "$TUNNELS"; then
            read -r _ raw_tcp _ <<<"$(stats tcp1 raw)"
            if [ "$raw_tcp" != NA ]; then
                x=$(awk -v a="$mt_tcp" -v b="$raw_tcp" 'BEGIN {printf "%.3f", a / b}')
                echo "  single-stream TCP >= 25% of the raw veth (stretch): $(awk -v x="$x" 'BEGIN {printf "%.1f%%", 100 * x}'), $(verdict "$x" 0.25)"
            fi
        fi
    fi
    if has ping "$TESTS" && has bt "$TUNNELS"; then
        read -r n m _ _ _ lo hi <<<"$(paired bt)"
        if [ "$n" != 0 ]; then
            # The paired median is boringtun-cli's RTT over meshtun's: at or
            # above 1, meshtun adds no more. The interval says whether the
            # run can tell the two apart at all.
            if [ "$lo" = NA ]; then
                noise="too few rounds for an interval"
            else
                ci=$(printf '95%% CI %.3f-%.3f' "$lo" "$hi")
                if awk -v l="$lo" -v h="$hi" 'BEGIN {exit !(l <= 1 && h >= 1)}'; then noise="$ci: within this run's noise"
                elif awk -v h="$hi" 'BEGIN {exit !(h < 1)}'; then noise="$ci: meshtun slower beyond the noise"
                else noise="$ci: meshtun faster beyond the noise"; fi
            fi
            echo "  ping RTT no worse than boringtun-cli's: paired median $(printf '%.3f' "$m"), $(verdict "$m" 1) ($noise)"
        fi
    fi
    if [ -n "${IDLE_RSS[mt]:-}" ]; then
        mib=$(awk -v k="${IDLE_RSS[mt]}" 'BEGIN {printf "%.1f", k / 1024}')
        echo "  idle daemon RSS < 15 MB: $mib MiB, $(awk -v k="${IDLE_RSS[mt]}" 'BEGIN {print (k * 1024 < 15e6) ? "met" : "NOT met"}')"
    fi
fi

# ---- --quick is a check, not only a report -----------------------------------
# CI runs --quick: a meshtun that moves nothing (NA) or a tiny fraction of
# what the veth carries must fail the job instead of printing a bad number.
if [ "$QUICK" = 1 ] && has mt "$TUNNELS" && has tcp1 "$TESTS"; then
    read -r _ mt_tcp _ <<<"$(stats tcp1 mt)"
    read -r _ raw_tcp _ <<<"$(has raw "$TUNNELS" && stats tcp1 raw || echo NA NA NA)"
    if [ "$mt_tcp" = NA ]; then
        echo "bench/run.sh: FAIL: meshtun's TCP throughput is NA (iperf3 over the mesh measured nothing; see $RUN/iperf3-client.log with --keep)" >&2
        exit 1
    fi
    if has raw "$TUNNELS"; then
        if [ "$raw_tcp" = NA ]; then
            echo "bench/run.sh: FAIL: the raw veth TCP figure is NA, so meshtun's $mt_tcp Mbit/s cannot be judged" >&2
            exit 1
        fi
        if awk -v m="$mt_tcp" -v r="$raw_tcp" 'BEGIN {exit !(m < 0.05 * r)}'; then
            echo "bench/run.sh: FAIL: meshtun's TCP throughput $mt_tcp Mbit/s is below 5% of the raw veth's $raw_tcp Mbit/s" >&2
            exit 1
        fi
        echo "quick check: meshtun TCP $mt_tcp Mbit/s is $(awk -v m="$mt_tcp" -v r="$raw_tcp" 'BEGIN {printf "%.1f", 100 * m / r}')% of the raw veth's $raw_tcp Mbit/s (must be >= 5%)"
    fi
fi
