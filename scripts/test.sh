#!/usr/bin/env bash
# Runs the whole meshtun test suite: unit and property tests, the
# deterministic network simulator, and the netns end-to-end tests on real
# TUN devices (those need root; run with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "test.sh: cargo not found: install Rust first (https://rustup.rs), then re-run" >&2
    exit 1
fi

# Tools the netns tests drive. Installed only when missing and we are root.
needed=()
command -v ip >/dev/null || needed+=(iproute2)
command -v ping >/dev/null || needed+=(iputils-ping)
command -v nft >/dev/null || needed+=(nftables)
command -v stun >/dev/null || needed+=(stun-client)
command -v turnutils_stunclient >/dev/null || needed+=(coturn)
command -v dig >/dev/null || needed+=(dnsutils)
command -v curl >/dev/null || needed+=(curl)
command -v dot >/dev/null || needed+=(graphviz)
command -v python3 >/dev/null || needed+=(python3)
/usr/bin/python3 -c 'import prometheus_client.openmetrics.parser' 2>/dev/null || needed+=(python3-prometheus-client)
if [ "${#needed[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        echo "test.sh: installing ${needed[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${needed[@]}"
    else
        echo "test.sh: missing ${needed[*]}; the netns tests need them (run as root to install)" >&2
    fi
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: not root: the netns end-to-end tests will be skipped (run with sudo to include them)" >&2
fi

cargo test --workspace --all-targets --locked --no-fail-fast "$@"
