//! NAT topologies for the netns lab: an "internet" bridge with a backbone,
//! nftables routers of a chosen NAT kind, hosts behind them (also behind two
//! levels of NAT), plus the tools the NAT tests share: a status client that
//! talks to a daemon's control socket directly, a path watcher that samples
//! both ends of a peering every 100 ms, and a hashed TCP transfer.
//!
//! Addresses (all inside 198.18.0.0/15):
//!
//! ```text
//!   internet 198.18.0.0/24: backbone host 198.18.0.1 (+ 198.18.0.2),
//!                           router N's WAN 198.18.0.(10+N),
//!                           public host k  198.18.0.(100+k)
//!   router N's LAN 198.19.N.0/24: router 198.19.N.1, host k 198.19.N.(100+k),
//!                           a router behind it 198.19.N.(2+k)
//! ```
//!
//! Routers (namespace `r{N}`, interfaces `wan` and bridge `lan`) get
//!
//! ```text
//!   table ip nat   { prerouting: [full cone: iifname wan udp dport 51820 dnat to HOST]
//!                    postrouting: [full cone: snat HOST:51820 to WAN:51820]
//!                                 oifname "wan" masquerade [random] }
//!   table ip filter { input: policy drop; ct established,related, lo and lan accepted }
//! ```
//!
//! The input chain matters: without it a peer's early unsolicited packet
//! creates a confirmed conntrack entry on the router, masquerade then picks
//! another port and punching fails (see docs of the lab machine).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::meshtun::{bin, Backbone, Node, NodeOpts};
use super::{ip, require_tool, wait_until, CmdOutput, Lab, Ns, Switch};

/// The port every node listens on (`meshtun up` default).
pub const NODE_PORT: u16 = 51820;
pub const BB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const BB_IP2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const BB_PORT: u16 = 7400;

/// What sits between a host and the internet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NatKind {
    /// No NAT: the host sits on the internet segment itself.
    Public,
    /// Masquerade plus a static 1:1 mapping of UDP 51820 to the host.
    FullCone,
    /// `oifname "wan" masquerade`: endpoint-independent mapping,
    /// address-and-port-dependent filtering.
    PortRestricted,
    /// `masquerade random`: a new public port per destination.
    Symmetric,
}

impl NatKind {
    pub const ALL: [NatKind; 4] = [NatKind::Public, NatKind::FullCone, NatKind::PortRestricted, NatKind::Symmetric];

    /// Short tag used in namespace names and the grid.
    pub fn tag(self) -> &'static str {
        match self {
            NatKind::Public => "pub",
            NatKind::FullCone => "fc",
            NatKind::PortRestricted => "prc",
            NatKind::Symmetric => "sym",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            NatKind::Public => "public",
            NatKind::FullCone => "full-cone",
            NatKind::PortRestricted => "port-restricted",
            NatKind::Symmetric => "symmetric",
        }
    }
}

/// Can two hosts behind these NATs punch a direct path? (The lab's own
/// oracle, from the reference measurements: only a symmetric NAT facing a
/// symmetric or port-restricted one needs the relay.)
pub fn direct_expected(a: NatKind, b: NatKind) -> bool {
    use NatKind::*;
    !matches!(
        (a, b),
        (Symmetric, Symmetric) | (Symmetric, PortRestricted) | (PortRestricted, Symmetric)
    )
}

/// Fails (panics) naming the Debian package unless the tools the NAT lab
/// uses are installed.
pub fn require_nat_tools() {
    require_tool("nft", "nftables");
    require_tool("ping", "iputils-ping");
}

// ---------------------------------------------------------------------------
// topology
// ---------------------------------------------------------------------------

/// A NAT router namespace: `wan` towards its upstream, bridge `lan` for the
/// hosts behind it.
#[derive(Clone)]
pub struct Router {
    pub ns: Ns,
    pub kind: NatKind,
    pub index: u8,
    /// Address on the upstream segment (the internet, or the LAN of the
    /// router in front of it).
    pub wan_ip: Ipv4Addr,
    /// The address the internet sees for hosts behind this router (its own
    /// WAN address, or that of the outermost router).
    pub public_ip: Ipv4Addr,
    pub lan: Switch,
    hosts: Arc<Mutex<u8>>,
}

impl Router {
    /// 198.19.N.1
    pub fn lan_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, self.index, 1)
    }

    /// `nft ARGS` in the router, panicking on failure.
    pub fn nft(&self, args: &[&str]) -> CmdOutput {
        let mut v = vec!["nft"];
        v.extend_from_slice(args);
        self.ns.exec(&v).ok()
    }

    /// Drops every UDP datagram between this router and `peer` (in both
    /// directions, before NAT, whatever the ports): traffic to and from any
    /// other address, such as the backbone, is untouched.
    pub fn block_udp_with(&self, peer: Ipv4Addr) {
        block_udp(&self.ns, peer);
    }

    /// `nft list ruleset` and (if conntrack is installed) the UDP conntrack
    /// table, for failure reports.
    pub fn diagnostics(&self) -> String {
        let rules = self.ns.exec(&["nft", "list", "ruleset"]);
        let ct = if on_path("conntrack") {
            let o = self.ns.exec(&["conntrack", "-L", "-p", "udp"]);
            o.stdout
        } else {
            "(conntrack not installed)".into()
        };
        format!(
            "--- router {} ({}, wan {}) ruleset ---\n{}\n--- udp conntrack ---\n{}",
            self.ns.role(),
            self.kind.label(),
            self.wan_ip,
            rules.stdout.trim_end(),
            ct.trim_end()
        )
    }
}

/// A host namespace (with `eth0`), public or behind a router.
#[derive(Clone)]
pub struct Host {
    pub ns: Ns,
    pub ip: Ipv4Addr,
    /// The NAT directly in front of it (`Public` for none).
    pub kind: NatKind,
    pub router: Option<Router>,
    /// The address the backbone will see it as.
    pub public_ip: Ipv4Addr,
}

/// The lab: an internet segment with a backbone host, routers and hosts.
/// Everything is torn down when it drops (the inner [`Lab`] is the last
/// field, so it goes last).
pub struct NatLab {
    pub name: String,
    pub inet: Switch,
    /// Holds 198.18.0.1/24 and 198.18.0.2/24.
    pub bb_ns: Ns,
    next_router: Mutex<u8>,
    next_public: Mutex<u8>,
    pub lab: Lab,
}

impl NatLab {
    /// `name` becomes part of every namespace name (`mt-{pid}-{name}-{role}`):
    /// keep it short and unique among labs that run at the same time.
    pub fn new(name: &str) -> NatLab {
        let lab = Lab::new(name);
        let inet = lab.add_switch("inet", "br0");
        let bb_ns = lab.add_host("bb", &inet, "198.18.0.1/24");
        ip(&["-n", bb_ns.name(), "addr", "add", "198.18.0.2/24", "dev", "eth0"]).ok();
        NatLab {
            name: name.to_string(),
            inet,
            bb_ns,
            next_router: Mutex::new(0),
            next_public: Mutex::new(0),
            lab,
        }
    }

    /// A router of `kind` on the internet (WAN 198.18.0.(10+N)).
    pub fn router(&self, kind: NatKind) -> Router {
        self.router_on(None, kind)
    }

    /// A router whose WAN sits on `upstream`'s LAN (carrier-grade NAT in
    /// front of a home router).
    pub fn router_behind(&self, upstream: &Router, kind: NatKind) -> Router {
        self.router_on(Some(upstream), kind)
    }

    fn router_on(&self, upstream: Option<&Router>, kind: NatKind) -> Router {
        assert_ne!(kind, NatKind::Public, "a public host needs no router: use NatLab::public_host");
        let index = {
            let mut n = self.next_router.lock().unwrap();
            *n += 1;
            *n
        };
        assert!(index <= 80, "too many routers");
        let role = format!("r{index}");
        let ns = self.lab.add_ns(&role);
        let sys = |k: &str| ns.exec(&["sysctl", "-qw", k]).ok();
        sys("net.ipv4.ip_forward=1");
        sys("net.ipv6.conf.all.disable_ipv6=1");
        sys("net.ipv6.conf.default.disable_ipv6=1");
        let (wan_ip, public_ip) = match upstream {
            None => {
                let wan = Ipv4Addr::new(198, 18, 0, 10 + index);
                self.lab.connect(&ns, "wan", &self.inet, Some(&format!("{wan}/24")));
                (wan, wan)
            }
            Some(up) => {
                let k = {
                    let mut h = up.hosts.lock().unwrap();
                    *h += 1;
                    *h
                };
                let wan = Ipv4Addr::new(198, 19, up.index, 1 + k);
                self.lab.connect(&ns, "wan", &up.lan, Some(&format!("{wan}/24")));
                ip(&["-n", ns.name(), "route", "add", "default", "via", &up.lan_gateway().to_string()]).ok();
                (wan, up.public_ip)
            }
        };
        ip(&["-n", ns.name(), "link", "add", "lan", "type", "bridge", "stp_state", "0", "forward_delay", "0"]).ok();
        ip(&["-n", ns.name(), "addr", "add", &format!("198.19.{index}.1/24"), "dev", "lan"]).ok();
        ip(&["-n", ns.name(), "link", "set", "lan", "up"]).ok();
        let masq = if kind == NatKind::Symmetric { "masquerade random" } else { "masquerade" };
        let ruleset = format!(
            "table ip nat {{\n\
             \tchain prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
             \tchain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n\
             \t\toifname \"wan\" {masq}\n\
             \t}}\n\
             }}\n\
             table ip filter {{\n\
             \tchain input {{ type filter hook input priority filter; policy drop;\n\
             \t\tct state established,related accept\n\
             \t\tiifname \"lo\" accept\n\
             \t\tiifname \"lan\" accept\n\
             \t}}\n\
             }}\n"
        );
        let file = self.lab.path(&format!("{role}.nft"));
        std::fs::write(&file, &ruleset).unwrap();
        ns.exec(&["nft", "-f", file.to_str().unwrap()]).ok();
        Router {
            lan: Switch {
                ns: ns.clone(),
                bridge: "lan".into(),
            },
            ns,
            kind,
            index,
            wan_ip,
            public_ip,
            hosts: Arc::new(Mutex::new(0)),
        }
    }

    /// A host on `router`'s LAN (198.19.N.(100+k)), default route via the
    /// router. Behind a full cone, the first host gets the static mapping
    /// of UDP 51820.
    pub fn host_behind(&self, router: &Router, role: &str) -> Host {
        let k = {
            let mut h = router.hosts.lock().unwrap();
            *h += 1;
            *h
        };
        let ipaddr = Ipv4Addr::new(198, 19, router.index, 100 + k);
        let ns = self.lab.add_ns(role);
        self.lab.connect(&ns, "eth0", &router.lan, Some(&format!("{ipaddr}/24")));
        ip(&["-n", ns.name(), "route", "add", "default", "via", &router.lan_gateway().to_string()]).ok();
        if router.kind == NatKind::FullCone && k == 1 {
            let h = ipaddr.to_string();
            let port = NODE_PORT.to_string();
            router.nft(&[
                "add", "rule", "ip", "nat", "prerouting", "iifname", "wan", "ip", "daddr", &router.wan_ip.to_string(),
                "udp", "dport", &port, "dnat", "to", &format!("{h}:{port}"),
            ]);
            // Static both ways: the host's port keeps its public port for
            // every destination.
            router.nft(&[
                "insert", "rule", "ip", "nat", "postrouting", "oifname", "wan", "ip", "saddr", &h, "udp", "sport", &port,
                "snat", "to", &format!("{}:{port}", router.wan_ip),
            ]);
        }
        Host {
            ns,
            ip: ipaddr,
            kind: router.kind,
            router: Some(router.clone()),
            public_ip: router.public_ip,
        }
    }

    /// A host directly on the internet segment (198.18.0.(100+k)).
    pub fn public_host(&self, role: &str) -> Host {
        let k = {
            let mut n = self.next_public.lock().unwrap();
            *n += 1;
            *n
        };
        let ipaddr = Ipv4Addr::new(198, 18, 0, 100 + k);
        let ns = self.lab.add_host(role, &self.inet, &format!("{ipaddr}/24"));
        Host {
            ns,
            ip: ipaddr,
            kind: NatKind::Public,
            router: None,
            public_ip: ipaddr,
        }
    }

    /// A host behind a fresh router of `kind` (or public).
    pub fn host(&self, kind: NatKind, role: &str) -> Host {
        match kind {
            NatKind::Public => self.public_host(role),
            k => {
                let r = self.router(k);
                self.host_behind(&r, role)
            }
        }
    }

    /// `meshtun backbone --listen A [--listen B ...]` in the backbone host;
    /// waits until its status answers.
    pub fn start_backbone(&self, listen: &[SocketAddr]) -> Backbone {
        let socket = self.lab.path("backbone.sock");
        let listens: Vec<String> = listen.iter().map(|l| l.to_string()).collect();
        let mut args = vec![bin(), "backbone", "--socket", socket.to_str().unwrap()];
        for l in &listens {
            args.extend_from_slice(&["--listen", l]);
        }
        let env = daemon_env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let proc = self.bb_ns.spawn_env("backbone", &args, &env);
        let bb = Backbone {
            ns: self.bb_ns.clone(),
            proc,
            socket,
            listen: listen[0],
        };
        wait_until(Duration::from_secs(20), "the backbone's status to answer", || {
            bb.proc.check_running()?;
            let d = control_status(&bb.socket)?;
            match d.get("role").and_then(Value::as_str) {
                Some("backbone") => Ok(()),
                other => Err(format!("role is {other:?}: {d}")),
            }
        });
        bb
    }

    /// Starts `meshtun up` on `host` against `backbone`, waits until it is
    /// registered, its interface is configured, and the backbone holds a
    /// record that carries the endpoint the backbone observed (so a peer's
    /// lookup returns the reflexive candidate).
    ///
    /// `NAT_LAB_NODE_ARGS` (split on whitespace) is appended to every
    /// `meshtun up` command line, e.g. `--dns-port 0`.
    pub fn start_node(&self, host: &Host, hostname: &str, backbone: &Backbone) -> Node {
        let extra: Vec<String> = std::env::var("NAT_LAB_NODE_ARGS")
            .map(|a| a.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let node = if extra.is_empty() {
            Node::start(&self.lab, &host.ns, backbone.listen, NodeOpts::new(hostname))
        } else {
            start_node_with_args(&self.lab, &host.ns, backbone.listen, hostname, &extra)
        };
        // A daemon that exited fails at once, not after the timeout.
        wait_until(Duration::from_secs(30), &format!("node `{hostname}` to register and configure its interface"), || {
            if let Some(st) = node.proc.try_status() {
                panic!(
                    "`meshtun up` for `{hostname}` in {} {} during startup; last log lines:\n{}",
                    host.ns.name(),
                    super::describe_status(st),
                    node.proc.log_tail(20)
                );
            }
            let st = node.backbone_state()?;
            if st != "registered" {
                return Err(format!("backbone state {st:?}"));
            }
            node.interface_has_address()
        });
        wait_until(
            Duration::from_secs(20),
            &format!("the backbone's record of `{hostname}` to carry its observed endpoint"),
            || {
                node.proc.check_running()?;
                let d = control_status(&backbone.socket)?;
                let recs = d.get("records").and_then(Value::as_array).cloned().unwrap_or_default();
                let r = recs
                    .iter()
                    .find(|r| r.get("address").and_then(Value::as_str) == Some(node.id.address.as_str()))
                    .ok_or_else(|| format!("no record yet: {d}"))?;
                let observed = r.get("observed").and_then(Value::as_str).ok_or_else(|| format!("no observed: {r}"))?;
                let eps = r.get("endpoints").and_then(Value::as_array).cloned().unwrap_or_default();
                if eps.iter().any(|e| e.as_str() == Some(observed)) {
                    Ok(())
                } else {
                    Err(format!("record lacks observed {observed}: {r}"))
                }
            },
        );
        node
    }
}

/// Is `tool` on PATH?
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// [`Node::start`] with extra `meshtun up` arguments.
pub fn start_node_with_args(lab: &Lab, ns: &Ns, backbone: SocketAddr, hostname: &str, extra: &[String]) -> Node {
    let role = ns.role();
    let state_dir = lab.path(&format!("state-{role}"));
    std::fs::create_dir_all(&state_dir).unwrap();
    let socket = lab.path(&format!("{role}.sock"));
    let id = super::meshtun::identity(ns, &state_dir);
    let bb = backbone.to_string();
    let mut args = vec![
        bin(),
        "up",
        "--backbone",
        &bb,
        "--hostname",
        hostname,
        "--state-dir",
        state_dir.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
    ];
    args.extend(extra.iter().map(String::as_str));
    let env = daemon_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let proc = ns.spawn_env(&format!("node-{role}"), &args, &env);
    Node {
        ns: ns.clone(),
        proc,
        socket,
        state_dir,
        hostname: hostname.to_string(),
        interface: super::meshtun::DEFAULT_INTERFACE.to_string(),
        id,
    }
}

fn daemon_env() -> Vec<(&'static str, String)> {
    vec![
        ("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into())),
        ("RUST_BACKTRACE", "1".into()),
        ("NO_COLOR", "1".into()),
    ]
}

// ---------------------------------------------------------------------------
// control socket
// ---------------------------------------------------------------------------

/// `status` over a daemon's (or backbone's) control socket, without
/// spawning `meshtun status` (Unix sockets are reachable from any network
/// namespace). Returns the `data` of an ok envelope.
pub fn control_status(socket: &Path) -> Result<Value, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.write_all(b"{\"cmd\":\"status\"}\n").map_err(|e| format!("write {}: {e}", socket.display()))?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("read {}: {e}", socket.display()))?;
    let v: Value = serde_json::from_str(line.trim()).map_err(|e| format!("bad JSON from {} ({e}): {line:?}", socket.display()))?;
    match v.get("status").and_then(Value::as_str) {
        Some("ok") => v.get("data").cloned().ok_or_else(|| format!("ok without data: {v}")),
        _ => Err(format!("error reply: {v}")),
    }
}

/// The status entry of peer `address` in a node's status data.
pub fn peer_entry(status: &Value, address: &str) -> Option<Value> {
    status
        .get("peers")?
        .as_array()?
        .iter()
        .find(|p| p.get("address").and_then(Value::as_str) == Some(address))
        .cloned()
}

/// A compact "path endpoint rtt reason" summary of a peer entry.
pub fn describe_peer(p: &Value) -> String {
    format!(
        "path={} endpoint={} rtt_ms={} relay_reason={} candidates={}",
        p.get("path").unwrap_or(&Value::Null),
        p.get("endpoint").unwrap_or(&Value::Null),
        p.get("rtt_ms").and_then(Value::as_f64).map_or("-".into(), |r| format!("{r:.2}")),
        p.get("relay_reason").unwrap_or(&Value::Null),
        p.get("candidates").unwrap_or(&Value::Null)
    )
}

/// `stats.relayed_packets` of a backbone.
pub fn relayed_packets(bb: &Backbone) -> Result<u64, String> {
    let d = control_status(&bb.socket)?;
    d.pointer("/stats/relayed_packets")
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("backbone status lacks stats.relayed_packets: {d}"))
}

// ---------------------------------------------------------------------------
// path watcher
// ---------------------------------------------------------------------------

/// One side of a peering to watch: this node's view of `peer_address`.
pub struct Side {
    pub label: String,
    pub socket: std::path::PathBuf,
    pub peer_address: String,
}

impl Side {
    pub fn of(label: &str, node: &Node, peer: &Node) -> Side {
        Side {
            label: label.to_string(),
            socket: node.socket.clone(),
            peer_address: peer.id.address.clone(),
        }
    }
}

/// A path change seen by the watcher.
#[derive(Clone, Debug)]
pub struct Change {
    pub at: Duration,
    pub path: String,
    pub endpoint: Option<String>,
}

#[derive(Default)]
struct WatchState {
    /// Per side: the changes (path or endpoint) in order.
    changes: Vec<Vec<Change>>,
    /// Per side: the last peer entry (or the last error).
    last: Vec<Result<Option<Value>, String>>,
    samples: usize,
}

/// Samples `status` of every side every 100 ms in the background and keeps
/// the timeline of path changes, measured from `t0`.
pub struct PathWatch {
    t0: Instant,
    sides: Vec<String>,
    state: Arc<Mutex<WatchState>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl PathWatch {
    pub fn start(t0: Instant, sides: Vec<Side>) -> PathWatch {
        let n = sides.len();
        let state = Arc::new(Mutex::new(WatchState {
            changes: vec![Vec::new(); n],
            last: vec![Ok(None); n],
            samples: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let labels = sides.iter().map(|s| s.label.clone()).collect();
        let (st, sp) = (state.clone(), stop.clone());
        let handle = thread::spawn(move || {
            while !sp.load(Ordering::SeqCst) {
                let tick = Instant::now();
                for (i, side) in sides.iter().enumerate() {
                    let r = control_status(&side.socket).map(|d| peer_entry(&d, &side.peer_address));
                    let at = t0.elapsed();
                    let mut g = st.lock().unwrap();
                    if let Ok(Some(p)) = &r {
                        let path = p.get("path").and_then(Value::as_str).unwrap_or("?").to_string();
                        let endpoint = p.get("endpoint").and_then(Value::as_str).map(str::to_string);
                        let changed = g.changes[i]
                            .last()
                            .is_none_or(|c| c.path != path || c.endpoint != endpoint);
                        if changed {
                            g.changes[i].push(Change { at, path, endpoint });
                        }
                    }
                    g.last[i] = r;
                }
                st.lock().unwrap().samples += 1;
                let spent = tick.elapsed();
                if spent < Duration::from_millis(100) {
                    thread::sleep(Duration::from_millis(100) - spent);
                }
            }
        });
        PathWatch {
            t0,
            sides: labels,
            state,
            stop,
            handle: Some(handle),
        }
    }

    pub fn t0(&self) -> Instant {
        self.t0
    }

    /// The current path of side `i` ("direct", "relay", "none"), if seen.
    pub fn path(&self, i: usize) -> Option<String> {
        self.state.lock().unwrap().changes[i].last().map(|c| c.path.clone())
    }

    pub fn endpoint(&self, i: usize) -> Option<String> {
        self.state.lock().unwrap().changes[i].last().and_then(|c| c.endpoint.clone())
    }

    /// The last status entry of side `i` (for failure messages).
    pub fn last_entry(&self, i: usize) -> String {
        match &self.state.lock().unwrap().last[i] {
            Ok(Some(p)) => describe_peer(p),
            Ok(None) => "peer not in status".into(),
            Err(e) => format!("status failed: {e}"),
        }
    }

    pub fn last_json(&self, i: usize) -> Option<Value> {
        match &self.state.lock().unwrap().last[i] {
            Ok(Some(p)) => Some(p.clone()),
            _ => None,
        }
    }

    /// First time (since t0) side `i` was on `path` at or after `after`.
    pub fn first_at(&self, i: usize, path: &str, after: Duration) -> Option<Duration> {
        let g = self.state.lock().unwrap();
        let ch = &g.changes[i];
        // On `path` already when `after` began?
        let mut on = None;
        for c in ch {
            if c.at <= after {
                on = Some(c);
            }
        }
        if on.is_some_and(|c| c.path == path) {
            return Some(after);
        }
        ch.iter().find(|c| c.at > after && c.path == path).map(|c| c.at)
    }

    /// Did side `i` ever show `path`?
    pub fn ever(&self, i: usize, path: &str) -> bool {
        self.state.lock().unwrap().changes[i].iter().any(|c| c.path == path)
    }

    /// "0.31s relay 198.18.0.1:7400 -> 0.82s direct 198.18.0.12:51820"
    pub fn timeline(&self, i: usize) -> String {
        let g = self.state.lock().unwrap();
        let v: Vec<String> = g.changes[i]
            .iter()
            .map(|c| format!("{:.2}s {} {}", c.at.as_secs_f64(), c.path, c.endpoint.as_deref().unwrap_or("-")))
            .collect();
        format!("{}: {}", self.sides[i], if v.is_empty() { "(no entry seen)".into() } else { v.join(" -> ") })
    }

    pub fn samples(&self) -> usize {
        self.state.lock().unwrap().samples
    }

    /// Polls (100 ms) until `cond` holds for the watcher's state, or
    /// `timeout`; returns the time since t0 when it did.
    pub fn wait_for(&self, timeout: Duration, cond: impl Fn(&PathWatch) -> bool) -> Option<Duration> {
        let start = Instant::now();
        loop {
            if cond(self) {
                return Some(self.t0.elapsed());
            }
            if start.elapsed() > timeout {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for PathWatch {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// hashed TCP transfer
// ---------------------------------------------------------------------------

/// What the receiving end got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub bytes: usize,
    pub hash: [u8; 32],
}

/// A one-connection TCP sink on `[ip]:port` inside `ns`: reads to EOF,
/// answers with the blake3 hash of what it read and closes. Returns once it
/// listens; `accept_within` bounds the wait for the client.
pub fn start_sink(ns: &Ns, ip: Ipv6Addr, port: u16, accept_within: Duration) -> JoinHandle<Result<Received, String>> {
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    let h = ns.spawn_in_netns(move || {
        let l = match TcpListener::bind(SocketAddr::new(ip.into(), port)) {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let msg = format!("bind [{ip}]:{port}: {e}");
                let _ = tx.send(Err(msg.clone()));
                return Err(msg);
            }
        };
        l.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + accept_within;
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(format!("no connection accepted within {accept_within:?}"));
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).map_err(|e| format!("sink read after {total} bytes: {e}"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n;
        }
        let hash = *hasher.finalize().as_bytes();
        s.write_all(&hash).map_err(|e| format!("sink write hash: {e}"))?;
        let _ = s.shutdown(Shutdown::Write);
        Ok(Received { bytes: total, hash })
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => h,
        Ok(Err(e)) => panic!("sink in {}: {e}", ns.name()),
        Err(_) => panic!("sink in {} did not start", ns.name()),
    }
}

/// How a transfer went.
#[derive(Debug, Clone)]
pub struct Sent {
    /// From the first connect attempt to the established connection.
    pub connect_after: Duration,
    pub connect_attempts: u32,
    /// From connected to the sink's hash.
    pub transfer: Duration,
    pub bytes: usize,
    /// The sink's hash equals the hash of what was sent.
    pub hash_ok: bool,
}

/// Connects (retrying for `connect_within`) from `ns` to `[dst]:port`,
/// sends `data` (at most `pace` bytes/s if given), half-closes, and checks
/// the sink's hash. `on_connected` runs once the connection is up.
pub fn send_hashed(
    ns: &Ns,
    dst: Ipv6Addr,
    port: u16,
    data: &[u8],
    pace: Option<usize>,
    connect_within: Duration,
    on_connected: impl FnOnce() + Send,
) -> Result<Sent, String> {
    ns.in_netns(|| {
        let addr = SocketAddr::new(dst.into(), port);
        let start = Instant::now();
        let mut attempts = 0;
        let s = loop {
            attempts += 1;
            match TcpStream::connect_timeout(&addr, Duration::from_secs(4)) {
                Ok(s) => break s,
                Err(e) => {
                    if start.elapsed() > connect_within {
                        return Err(format!("connect to [{dst}]:{port}: {attempts} attempts in {:.1?}, last: {e}", start.elapsed()));
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            }
        };
        let connect_after = start.elapsed();
        on_connected();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut s = s;
        let t = Instant::now();
        let chunk = 16 * 1024;
        let mut sent = 0;
        for c in data.chunks(chunk) {
            if let Some(rate) = pace {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                let el = t.elapsed();
                if due > el {
                    thread::sleep(due - el);
                }
            }
            s.write_all(c)
                .map_err(|e| format!("write after {sent} of {} bytes ({:.1?}): {e}", data.len(), t.elapsed()))?;
            sent += c.len();
        }
        s.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
        let mut hash = [0u8; 32];
        s.read_exact(&mut hash)
            .map_err(|e| format!("reading the sink's hash after sending {sent} bytes ({:.1?}): {e}", t.elapsed()))?;
        Ok(Sent {
            connect_after,
            connect_attempts: attempts,
            transfer: t.elapsed(),
            bytes: sent,
            hash_ok: hash == *blake3::hash(data).as_bytes(),
        })
    })
}

/// Deterministic test payload.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    super::marked_random_bytes(len, seed, b"NATLAB", 4096)
}

/// `ping -6 -i 0.2` for `dur` from `ns` to `dst` in the background: keeps
/// traffic (and therefore the peers "active") flowing both ways.
pub fn keep_traffic(ns: &Ns, dst: Ipv6Addr, dur: Duration) -> JoinHandle<CmdOutput> {
    let ns = ns.clone();
    let secs = dur.as_secs().max(1).to_string();
    thread::spawn(move || {
        ns.exec_timeout(
            &["ping", "-6", "-n", "-q", "-i", "0.2", "-W", "1", "-w", &secs, &dst.to_string()],
            dur + Duration::from_secs(10),
        )
    })
}

/// Drops every UDP datagram between namespace `ns` and `peer` (both
/// directions, before NAT, whatever the ports).
pub fn block_udp(ns: &Ns, peer: Ipv4Addr) {
    let p = peer.to_string();
    let nft = |args: &[&str]| {
        ns.exec(&[&["nft"][..], args].concat()).ok();
    };
    nft(&["add", "table", "ip", "cut"]);
    nft(&["add chain ip cut pre { type filter hook prerouting priority -300; policy accept; }"]);
    nft(&["add chain ip cut post { type filter hook postrouting priority 300; policy accept; }"]);
    nft(&["add", "rule", "ip", "cut", "pre", "ip", "saddr", &p, "meta", "l4proto", "udp", "counter", "drop"]);
    nft(&["add", "rule", "ip", "cut", "post", "ip", "daddr", &p, "meta", "l4proto", "udp", "counter", "drop"]);
}

/// Kills the direct path between two hosts of the lab: UDP between their
/// public addresses is dropped at `a`'s router (or `b`'s, or in `a` itself
/// when both are public); the backbone stays reachable for both.
pub fn block_udp_between(a: &Host, b: &Host) {
    match (&a.router, &b.router) {
        (Some(r), _) => r.block_udp_with(b.public_ip),
        (None, Some(r)) => r.block_udp_with(a.public_ip),
        (None, None) => block_udp(&a.ns, b.public_ip),
    }
}

/// Average round-trip time in ms from `ns` to `ip` over `count` ICMP
/// echoes (ping's own summary), or None if nothing came back.
pub fn ping_rtt_ms(ns: &Ns, ip: Ipv4Addr, count: u32) -> Option<f64> {
    let out = ns.exec_timeout(&["ping", "-n", "-q", "-c", &count.to_string(), "-i", "0.2", "-W", "1", &ip.to_string()], Duration::from_secs(10));
    // "rtt min/avg/max/mdev = 0.041/0.052/0.066/0.010 ms"
    let line = out.stdout.lines().find(|l| l.contains("min/avg/max"))?;
    line.split('=').nth(1)?.trim().split('/').nth(1)?.parse().ok()
}
