#!/usr/bin/env bash
# The research fleet on this one machine: a backbone, a coordinator and three
# specialist agents, each host in its own network namespace; one specialist
# sits behind a NAT router. Every specialist runs a small HTTP agent on its
# mesh address. The coordinator finds each specialist BY CAPABILITY through
# the mesh DNS (citations.cap.mesh, ...), sends it a task over plain HTTP and
# prints what went where:
#
#   capability -> hostname -> mesh address -> path (direct/relay) -> RTT -> answer
#
#   sudo ./scripts/fleet-demo.sh          run the demo, then tear everything down
#   sudo ./scripts/fleet-demo.sh --keep   leave the fleet running until Ctrl-C, to explore:
#       sudo ip netns exec mtfleet-coordinator bash      # a shell on the coordinator
#       dig +short citations.cap.mesh AAAA               # (in that shell) resolver is set up
#       curl -6 http://specialist-news.mesh:8080/
#
# Environment: MESHTUN_BIN=path skips the build and uses that binary;
# FLEET_PREFIX=name changes the namespace prefix (default mtfleet).
# Exits nonzero unless every task was answered.
#
#   internet 198.18.0.0/24 (bridge):  backbone 198.18.0.1, coordinator .2,
#                                     specialist-papers .3, specialist-news .4,
#                                     fx's NAT router (WAN) .10
#   behind the router 198.19.1.0/24:  specialist-fx 198.19.1.100
#     (nftables masquerade: port-restricted cone; input policy drop)
set -euo pipefail
cd "$(dirname "$0")/.."

KEEP=0
for arg in "$@"; do
    case "$arg" in
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "fleet-demo.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "fleet-demo.sh: needs root for namespaces and TUN devices: sudo $0" >&2; exit 1; }

# Tools: iproute2 (ip), dnsutils (dig), curl, python3 (the agents), nftables (the NAT router).
needed=()
command -v ip >/dev/null || needed+=(iproute2)
command -v dig >/dev/null || needed+=(dnsutils)
command -v curl >/dev/null || needed+=(curl)
command -v python3 >/dev/null || needed+=(python3)
command -v nft >/dev/null || needed+=(nftables)
if [ "${#needed[@]}" -gt 0 ]; then
    echo "== installing ${needed[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${needed[@]}"
fi

if [ -n "${MESHTUN_BIN:-}" ]; then
    BIN="$MESHTUN_BIN"
else
    echo "== building meshtun"
    cargo build --quiet --locked
    BIN="$PWD/target/debug/meshtun"
fi
P="${FLEET_PREFIX:-mtfleet}"
NAMESPACES=(inet backbone coordinator papers news fxrouter fx)
RUN=$(mktemp -d /tmp/mtfleet.XXXXXX)
PIDS=()

cleanup() {
    trap - INT TERM
    # Newest first, so agents stop and nodes deregister while the backbone runs.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[$i]}
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done 2>/dev/null
    for n in "${NAMESPACES[@]}"; do ip netns del "$P-$n" 2>/dev/null || true; done
    rm -rf "/etc/netns/$P-coordinator"
    # /etc/netns goes too if this demo (or meshtun's test lab) created it
    # and nothing else is left in it.
    if [ "$(ls -A /etc/netns 2>/dev/null)" = ".created-by-meshtun" ]; then
        rm -f /etc/netns/.created-by-meshtun
        rmdir /etc/netns 2>/dev/null || true
    fi
    rm -rf "$RUN"
}
trap cleanup EXIT
trap 'echo; echo "== interrupted; tearing down"; exit 130' INT TERM

# Leftovers of an earlier run that was killed.
for n in "${NAMESPACES[@]}"; do ip netns del "$P-$n" 2>/dev/null || true; done
rm -rf "/etc/netns/$P-coordinator"

json() { # json EXPR < document: print a field of a JSON document (python expression on `d`)
    python3 -c "import json,sys; d=json.load(sys.stdin); v=$1; print('' if v is None else v)"
}

echo "== creating namespaces: the internet, a backbone, a coordinator, three specialists, a NAT router"
for n in "${NAMESPACES[@]}"; do ip netns add "$P-$n"; ip -n "$P-$n" link set lo up; done
ip netns exec "$P-inet" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
ip -n "$P-inet" link add br0 type bridge stp_state 0 forward_delay 0
ip -n "$P-inet" link set br0 up
plug() { # plug NAMESPACE IFNAME PORT-NAME SWITCH-NAMESPACE BRIDGE CIDR
    ip link add "$2" netns "$P-$1" type veth peer name "$3" netns "$P-$4"
    ip -n "$P-$4" link set "$3" master "$5" up
    ip -n "$P-$1" addr add "$6" dev "$2"
    ip -n "$P-$1" link set "$2" up
}
plug backbone eth0 pbb inet br0 198.18.0.1/24
plug coordinator eth0 pco inet br0 198.18.0.2/24
plug papers eth0 ppa inet br0 198.18.0.3/24
plug news eth0 pne inet br0 198.18.0.4/24
plug fxrouter wan pfxr inet br0 198.18.0.10/24
# The NAT router: LAN bridge, forwarding, masquerade out of "wan", and an
# input chain that drops what nobody asked for (as home routers do).
ip netns exec "$P-fxrouter" sysctl -qw net.ipv4.ip_forward=1
ip -n "$P-fxrouter" link add lan type bridge stp_state 0 forward_delay 0
ip -n "$P-fxrouter" addr add 198.19.1.1/24 dev lan
ip -n "$P-fxrouter" link set lan up
plug fx eth0 pfx fxrouter lan 198.19.1.100/24
ip -n "$P-fx" route add default via 198.19.1.1
ip netns exec "$P-fxrouter" nft -f - <<'EOF'
table ip nat {
    chain postrouting { type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade
    }
}
table ip filter {
    chain input { type filter hook input priority filter; policy drop;
        ct state established,related accept
        iifname "lo" accept
        iifname "lan" accept
    }
}
EOF

echo "== starting the backbone"
NO_COLOR=1 ip netns exec "$P-backbone" "$BIN" backbone --listen 198.18.0.1:7400 --socket "$RUN/backbone.sock" >"$RUN/backbone.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do [ -S "$RUN/backbone.sock" ] && break; sleep 0.1; done

# start_node NAMESPACE HOSTNAME ARGS...: starts `meshtun up` and waits until it
# is registered with the backbone.
start_node() {
    local ns=$1 host=$2; shift 2
    NO_COLOR=1 ip netns exec "$P-$ns" "$BIN" up --backbone 198.18.0.1:7400 --hostname "$host" --group fleet "$@" \
        --state-dir "$RUN/$host" --socket "$RUN/$host.sock" >"$RUN/$host.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        if "$BIN" status --socket "$RUN/$host.sock" --json 2>/dev/null | grep -q '"state":"registered"'; then
            return 0
        fi
        sleep 0.1
    done
    echo "fleet-demo.sh: meshtun up for $host did not come up (registered with the backbone) within 10 s; its log:" >&2
    tail -n 20 "$RUN/$host.log" >&2
    return 1
}

echo "== starting the nodes (identity, TUN interface, registration, mesh DNS)"
start_node coordinator coordinator
start_node papers specialist-papers --capability citations
start_node fx specialist-fx --capability fx-rates
start_node news specialist-news --capability summarise
declare -A IP6 ADDR
for h in coordinator specialist-papers specialist-fx specialist-news; do
    IP6[$h]=$("$BIN" id --state-dir "$RUN/$h" --json | json 'd["data"]["ipv6"]')
    ADDR[$h]=$("$BIN" id --state-dir "$RUN/$h" --json | json 'd["data"]["address"]')
    printf '   %-18s %s  %s\n' "$h" "${ADDR[$h]}" "${IP6[$h]}"
done
COORD_IP=${IP6[coordinator]}
# The coordinator's system resolver asks its own mesh DNS: `ip netns exec`
# bind-mounts this file over /etc/resolv.conf.
[ -d /etc/netns ] || { mkdir /etc/netns && touch /etc/netns/.created-by-meshtun; }
mkdir -p "/etc/netns/$P-coordinator"
printf 'nameserver %s\noptions timeout:2 attempts:2\n' "$COORD_IP" >"/etc/netns/$P-coordinator/resolv.conf"

echo "== starting an HTTP agent on each specialist's mesh address, port 8080"
cat >"$RUN/agent.py" <<'EOF'
"""A specialist agent: answers tasks for one capability over plain HTTP."""
import re, socket, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

host, capability, ip, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
RATES = {("EUR", "USD"): 1.0842, ("USD", "EUR"): 0.9223, ("GBP", "USD"): 1.2671, ("USD", "JPY"): 151.37}

def answer(task):
    if capability == "citations":
        topic = task.split(":", 1)[-1].strip()
        return (f"3 citations on '{topic}': Saltzer, Reed & Clark 1984 (end-to-end arguments); "
                "Ford, Srisuresh & Kegel 2005 (UDP hole punching); Donenfeld 2017 (WireGuard)")
    if capability == "fx-rates":
        m = re.search(r"([\d.]+)\s*([A-Z]{3})\s+(?:to|in)\s+([A-Z]{3})", task)
        if not m or (m[2], m[3]) not in RATES:
            return "I convert EUR->USD, USD->EUR, GBP->USD and USD->JPY (e.g. 'convert 250 EUR to USD')"
        rate = RATES[(m[2], m[3])]
        return f"{float(m[1]):.2f} {m[2]} = {float(m[1]) * rate:.2f} {m[3]} (demo rate {rate})"
    if capability == "summarise":
        text = task.split(":", 1)[-1].strip()
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
        return f"{sentences[0] if sentences else text} ({len(sentences)} sentences, {len(text.split())} words)"
    return f"unknown capability {capability}"

class Agent(BaseHTTPRequestHandler):
    def do_POST(self):
        task = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode(errors="replace")
        self.reply(answer(task))

    def do_GET(self):
        self.reply(f"{host} offers {capability}: POST a task to /task")

    def reply(self, text):
        body = (text + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write(f"{host}: {self.client_address[0]} {fmt % args}\n")

class Server(HTTPServer):
    address_family = socket.AF_INET6

print(f"{host}: serving {capability} on [{ip}]:{port}", flush=True)
Server((ip, port), Agent).serve_forever()
EOF
for spec in "papers specialist-papers citations" "fx specialist-fx fx-rates" "news specialist-news summarise"; do
    read -r ns host cap <<<"$spec"
    ip netns exec "$P-$ns" python3 "$RUN/agent.py" "$host" "$cap" "${IP6[$host]}" 8080 >"$RUN/agent-$host.log" 2>&1 &
    PIDS+=($!)
done
for host in specialist-papers specialist-fx specialist-news; do
    for _ in $(seq 50); do grep -q serving "$RUN/agent-$host.log" && break; sleep 0.1; done
done

echo "== the coordinator finds each specialist by capability and sends it a task"
declare -A TASK=(
    [citations]="find citations on: overlay networks without a hub in the data path"
    [fx-rates]="convert 250 EUR to USD"
    [summarise]="summarise: meshtun gives every agent a permanent address. Packets go straight to the peer, encrypted end to end. A backbone only helps peers find each other."
)
in_coord() { ip netns exec "$P-coordinator" "$@"; }
answered=0
total=0
for cap in citations fx-rates summarise; do
    total=$((total + 1))
    echo
    echo "-- task for $cap: ${TASK[$cap]}"
    ip6=$(in_coord dig +short +tries=2 +time=2 "@$COORD_IP" "$cap.cap.mesh" AAAA | head -n 1 || true)
    if [ -z "$ip6" ]; then
        echo "   FAILED: $cap.cap.mesh has no AAAA record at the coordinator's mesh DNS"
        continue
    fi
    echo "   dig @$COORD_IP $cap.cap.mesh AAAA  ->  $ip6"
    # Plain HTTP to the capability's name, through the system resolver.
    if ! reply=$(in_coord curl -6 -g -sS --fail --max-time 20 -X POST --data-binary "${TASK[$cap]}" "http://$cap.cap.mesh:8080/task" 2>&1); then
        echo "   FAILED: curl http://$cap.cap.mesh:8080/task: $reply"
        continue
    fi
    ping=$("$BIN" ping "$ip6" -c 1 --json --socket "$RUN/coordinator.sock" 2>/dev/null | head -n 1 || true)
    host=$(json 'd.get("data", {}).get("hostname")' <<<"$ping" 2>/dev/null || true)
    addr=$(json 'd.get("data", {}).get("address")' <<<"$ping" 2>/dev/null || true)
    path=$(json 'd.get("data", {}).get("path")' <<<"$ping" 2>/dev/null || true)
    rtt=$(json '"%.2f ms" % d["data"]["rtt_ms"] if "data" in d else None' <<<"$ping" 2>/dev/null || true)
    printf '   %s -> %s -> %s (%s) -> %s -> %s\n' "$cap" "${host:-?}" "${addr:-?}" "$ip6" "${path:-?}" "${rtt:-?}"
    printf '   answer: %s\n' "$reply"
    answered=$((answered + 1))
done

echo
echo "== the coordinator's view of the mesh"
"$BIN" status --socket "$RUN/coordinator.sock"
echo
echo "== the backbone's records"
"$BIN" status --socket "$RUN/backbone.sock"

if [ "$answered" -ne "$total" ]; then
    echo
    for h in coordinator specialist-papers specialist-fx specialist-news; do
        echo "--- last lines of $h's log"; tail -n 8 "$RUN/$h.log"
    done
fi
echo
echo "fleet demo: $answered/$total tasks answered"
if [ "$KEEP" = 1 ]; then
    echo
    echo "The fleet is running. Try:"
    echo "  sudo ip netns exec $P-coordinator dig +short citations.cap.mesh AAAA"
    echo "  sudo ip netns exec $P-coordinator curl -6 http://specialist-news.mesh:8080/"
    echo "  sudo $BIN status --socket $RUN/coordinator.sock"
    echo "Press Ctrl-C to tear it down."
    wait || true
fi
[ "$answered" -eq "$total" ]
