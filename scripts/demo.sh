#!/usr/bin/env bash
# A working mesh on this one machine: a backbone and two agent hosts, each
# in its own network namespace on a shared segment (198.18.0.0/24). The
# hosts find each other through the backbone and talk over meshtun with
# ordinary tools (ping, an HTTP server and client), encrypted end to end.
#
#   sudo ./scripts/demo.sh          run the demo, then tear everything down
#   sudo ./scripts/demo.sh --keep   leave it running until Ctrl-C, to explore:
#       sudo ip netns exec mtdemo-alpha bash     # a shell on host "alpha"
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=0; [ "${1:-}" = "--keep" ] && KEEP=1
[ "$(id -u)" -eq 0 ] || { echo "demo.sh: needs root for namespaces and TUN devices: sudo $0" >&2; exit 1; }
command -v ip >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends iproute2 iputils-ping; }

echo "== building meshtun"
cargo build --quiet --locked
BIN="$PWD/target/debug/meshtun"
P=mtdemo
RUN=$(mktemp -d /tmp/mtdemo.XXXXXX)
PIDS=()

cleanup() {
    # Newest first, so nodes deregister while the backbone is still there.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[$i]}
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done 2>/dev/null
    for n in sw backbone alpha beta; do ip netns del "$P-$n" 2>/dev/null || true; done
    rm -rf "$RUN"
}
trap cleanup EXIT

echo "== creating namespaces: backbone 198.18.0.1, alpha 198.18.0.2, beta 198.18.0.3"
for n in sw backbone alpha beta; do ip netns del "$P-$n" 2>/dev/null || true; ip netns add "$P-$n"; ip -n "$P-$n" link set lo up; done
ip -n "$P-sw" link add br0 type bridge && ip -n "$P-sw" link set br0 up
i=1
for n in backbone alpha beta; do
    ip link add eth0 netns "$P-$n" type veth peer name "p$n" netns "$P-sw"
    ip -n "$P-sw" link set "p$n" master br0 up
    ip -n "$P-$n" addr add "198.18.0.$i/24" dev eth0
    ip -n "$P-$n" link set eth0 up
    i=$((i + 1))
done

echo "== starting the backbone and two nodes"
ip netns exec "$P-backbone" "$BIN" backbone --listen 198.18.0.1:7400 --socket "$RUN/backbone.sock" 2>"$RUN/backbone.log" >/dev/null &
PIDS+=($!)
sleep 0.3
for n in alpha beta; do
    ip netns exec "$P-$n" "$BIN" up --backbone 198.18.0.1:7400 --hostname "$n" \
        --state-dir "$RUN/$n" --socket "$RUN/$n.sock" 2>"$RUN/$n.log" >/dev/null &
    PIDS+=($!)
done
for n in alpha beta; do
    for _ in $(seq 50); do [ -S "$RUN/$n.sock" ] && break; sleep 0.1; done
done
sleep 0.5
BETA_IP=$("$BIN" id --state-dir "$RUN/beta" --json | sed -E 's/.*"ipv6":"([^"]+)".*/\1/')
BETA_ADDR=$("$BIN" id --state-dir "$RUN/beta" | awk '/^address/ {print $2}')
echo "   beta is $BETA_ADDR = $BETA_IP"

echo "== alpha pings beta by mesh address"
ip netns exec "$P-alpha" ping -6 -c 3 -i 0.3 "$BETA_IP"

echo "== beta serves HTTP on its mesh address; alpha fetches it with a plain client"
mkdir -p "$RUN/www" && echo "hello from beta over meshtun" > "$RUN/www/index.txt"
ip netns exec "$P-beta" python3 -m http.server 8080 --bind "$BETA_IP" --directory "$RUN/www" >/dev/null 2>&1 &
PIDS+=($!)
sleep 1
ip netns exec "$P-alpha" python3 -c "import urllib.request; print(urllib.request.urlopen('http://[$BETA_IP]:8080/index.txt', timeout=5).read().decode().strip())"

echo "== status"
"$BIN" status --socket "$RUN/alpha.sock"
echo
"$BIN" status --socket "$RUN/backbone.sock"

if [ "$KEEP" = 1 ]; then
    echo
    echo "The mesh is running. Try: sudo ip netns exec $P-alpha ping -6 $BETA_IP"
    echo "Press Ctrl-C to tear it down."
    wait
fi
echo "== done; tearing down"
