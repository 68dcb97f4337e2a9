#!/bin/sh
# Builds the backbone and the load generator (release) and runs the load
# generator with the given arguments; see docs/SCALING.md. Examples:
#   scripts/loadgen.sh --nodes 163000 --lookup-rate 10000 --duration 60
#   scripts/loadgen.sh --nodes 1000000 --identities 163000 --hold --record-ttl 3600
#   scripts/loadgen.sh --nodes 20000 --backbones 4 --heartbeat 10 --kill-at 10
set -eu
cd "$(dirname "$0")/.."
cargo build --release --quiet -p meshtun --bin meshtun -p meshtun-loadgen
exec target/release/meshtun-loadgen "$@"
