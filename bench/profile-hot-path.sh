#!/usr/bin/env bash
# Profiles the engine of node a during a ping run under callgrind and
# rewrites bench/hot-path.functions (the packet path, hottest first), then
# refreshes bench/hot-path.order for this build. See bench/README.md,
# "Link order". Needs root and valgrind; builds the release binary first.
#
#   sudo bench/profile-hot-path.sh [--seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=10
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECS=$2; shift 2 ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "profile-hot-path.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "profile-hot-path.sh: needs root (namespaces, TUN): sudo $0" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "profile-hot-path.sh: valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
cargo build --quiet --release --locked --bin meshtun
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Node a runs under callgrind, counting only inside the engine's loop (not
# start-up, not the tokio thread); everything else runs as it is.
cat >"$work/meshtun" <<WRAPPER
#!/bin/sh
if [ "\$1" = up ] && ip netns identify \$\$ | grep -q -- '-a\$'; then
    exec valgrind --tool=callgrind --callgrind-out-file="$work/engine.cg" --collect-atstart=no \
        --toggle-collect='meshtun::engine::Engine::run' "$PWD/target/release/meshtun" "\$@"
fi
exec "$PWD/target/release/meshtun" "\$@"
WRAPPER
chmod +x "$work/meshtun"
bash bench/run.sh --tests ping --tunnels mt --runs 1 --seconds "$SECS" --bin "$work/meshtun" --no-install >"$work/bench.log" 2>&1 &
bench=$!
# Once node a reports its session (the bench prints its status) the count
# starts afresh: the handshake's key exchange runs the field arithmetic
# thousands of times, but it is not the packet path.
for _ in $(seq 600); do
    grep -q '^== meshtun .*a:' "$work/bench.log" && break
    kill -0 "$bench" 2>/dev/null || break
    sleep 0.1
done
pid=$(pgrep -f -- "--callgrind-out-file=$work/engine.cg" | head -1 || true)
if [ -z "$pid" ] || ! callgrind_control -z "$pid" >/dev/null; then
    cat "$work/bench.log" >&2
    echo "profile-hot-path.sh: could not reset node a's profile once its session was up" >&2
    kill "$bench" 2>/dev/null || true
    exit 1
fi
wait "$bench"
cat "$work/bench.log"
[ -s "$work/engine.cg" ] || { echo "profile-hot-path.sh: callgrind wrote no profile" >&2; exit 1; }
python3 scripts/hot_order.py profile "$work/engine.cg" >"$work/functions"
if ! grep -qx 'meshtun::engine::Engine::run' "$work/functions"; then
    echo "profile-hot-path.sh: the profile did not see the engine loop (is meshtun::engine::Engine::run still a function of its own?); bench/hot-path.functions is left as it was" >&2
    exit 1
fi
mv "$work/functions" bench/hot-path.functions
echo "bench/hot-path.functions: $(wc -l <bench/hot-path.functions) functions"
python3 scripts/hot_order.py refresh target/release/meshtun
echo "now build again: the release link uses the new order"
