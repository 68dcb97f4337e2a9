//! Discovery end to end, in network namespaces: two backbones and four
//! agent hosts on one bridge; names, capabilities and groups through the
//! daemon's DNS server (dig, the system resolver, curl), `meshtun ping /
//! find / set`, a backbone dying and coming back under live traffic, and
//! group broadcast over the mesh. Plus the fleet demo script, run for real.
//!
//! Needs root (namespaces, veth, TUN) and `ip`, `dig` (dnsutils), `getent`
//! (libc-bin), `curl`; the fleet demo also `python3` and `nft` (nftables).
//! Without root every test prints "skipping: needs root" and passes.
//!
//!     cargo test --test netns_discovery -- --nocapture
//!
//! Topology (namespaces `mt-{pid}-disc-{role}`):
//!
//!     bb1 198.18.0.1 ─┐ (backbone, --record-ttl 6)
//!     bb2 198.18.0.2 ─┤ (backbone, --record-ttl 6)
//!     coord  .0.3    ─┤ coordinator         group research
//!     papers .0.4    ─┼─ sw (bridge br0)    specialist-papers: citations, research
//!     fx     .0.5    ─┤                     specialist-fx: fx-rates, trading
//!     news   .0.6    ─┘                     specialist-news: summarise, research
//!
//! Every node registers with both backbones and heartbeats every 2 s.

mod harness;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV6, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use harness::meshtun::{cli, json_data, Backbone, Node, NodeOpts};
use harness::{poll_until, require_root, require_tool, Checks, CmdOutput, Lab, Ns};
use serde_json::Value;

const BB_PORT: u16 = 7400;
const RECORD_TTL: u64 = 6;
const HEARTBEAT: u64 = 2;
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 7007;
const GROUP_PORT: u16 = 5900;
const GROUP_CONTEXT: &str = "meshtun 2026 group address v1";
/// After `meshtun set` changes a node's capabilities, every node's `find`
/// must show it within about two heartbeats.
const FIND_FRESH_LIMIT: Duration = Duration::from_secs(2 * HEARTBEAT + 1);

fn bb_addr(i: u8) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::new(198, 18, 0, i).into(), BB_PORT)
}

/// `ff15:4d54:NNNN:0:` + the first 8 bytes of BLAKE3 derive_key(context,
/// name), computed independently of the binary.
fn group_address(network: u16, name: &str) -> Ipv6Addr {
    let h = blake3::derive_key(GROUP_CONTEXT, name.as_bytes());
    let mut o = [0u8; 16];
    o[..4].copy_from_slice(&[0xff, 0x15, 0x4d, 0x54]);
    o[4..6].copy_from_slice(&network.to_be_bytes());
    o[8..].copy_from_slice(&h[..8]);
    Ipv6Addr::from(o)
}

// ---------------------------------------------------------------------------
// dig
// ---------------------------------------------------------------------------

struct Dig {
    status: String,
    /// AAAA answers.
    aaaa: Vec<Ipv6Addr>,
    out: CmdOutput,
}

impl Dig {
    fn set(&self) -> BTreeSet<Ipv6Addr> {
        self.aaaa.iter().copied().collect()
    }
}

/// `dig @server name qtype` from inside `ns`: one try, 3 s timeout.
fn dig(ns: &Ns, server: Ipv6Addr, name: &str, qtype: &str) -> Dig {
    let at = format!("@{server}");
    let out = ns.exec_timeout(
        &["dig", at.as_str(), name, qtype, "+tries=1", "+time=3", "+noall", "+comments", "+answer"],
        Duration::from_secs(10),
    );
    let status = out
        .stdout
        .split("status: ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or("NO-REPLY")
        .to_string();
    let aaaa = out
        .stdout
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 5 && f[3] == "AAAA").then(|| f[4].parse().ok()).flatten()
        })
        .collect();
    Dig { status, aaaa, out }
}

fn names(set: &BTreeSet<Ipv6Addr>, nodes: &[&Node]) -> String {
    let v: Vec<String> = set
        .iter()
        .map(|ip| match nodes.iter().find(|n| n.id.ipv6 == *ip) {
            Some(n) => format!("{} ({ip})", n.hostname),
            None => format!("<unknown> {ip}"),
        })
        .collect();
    format!("[{}]", v.join(", "))
}

fn hostnames_of(found: &Value) -> Vec<String> {
    found
        .get("found")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|f| f.get("hostname").and_then(Value::as_str)).map(str::to_string).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// servers and clients inside namespaces
// ---------------------------------------------------------------------------

/// A minimal HTTP/1.1 server on `[ip]:port` in `ns` answering every request
/// with `body`; runs until `stop` is set. Returns once it listens.
fn start_http_server(ns: &Ns, ip: Ipv6Addr, port: u16, body: String, stop: Arc<AtomicBool>) -> thread::JoinHandle<usize> {
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    let h = ns.spawn_in_netns(move || {
        let l = match TcpListener::bind(SocketAddr::new(ip.into(), port)) {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(format!("bind [{ip}]:{port}: {e}")));
                return 0;
            }
        };
        let _ = tx.send(Ok(()));
        l.set_nonblocking(true).unwrap();
        let mut served = 0;
        while !stop.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut req = Vec::new();
                    let mut buf = [0u8; 2048];
                    while !harness::contains(&req, b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes());
                    let _ = s.shutdown(Shutdown::Write);
                    served += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(20)),
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
        served
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => h,
        Ok(Err(e)) => panic!("HTTP server in {}: {e}", ns.name()),
        Err(_) => panic!("HTTP server in {} did not start", ns.name()),
    }
}

/// A TCP echo server for one connection on `[ip]:port` in `ns`.
fn start_echo_server(ns: &Ns, ip: Ipv6Addr, port: u16) -> thread::JoinHandle<Result<usize, String>> {
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    let h = ns.spawn_in_netns(move || {
        let l = TcpListener::bind(SocketAddr::new(ip.into(), port)).map_err(|e| {
            let m = format!("bind [{ip}]:{port}: {e}");
            let _ = tx.send(Err(m.clone()));
            m
        })?;
        let _ = tx.send(Ok(()));
        l.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut buf = [0u8; 4096];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).map_err(|e| format!("echo read after {total} B: {e}"))?;
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).map_err(|e| format!("echo write after {total} B: {e}"))?;
            total += n;
        }
        Ok(total)
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => h,
        Ok(Err(e)) => panic!("echo server in {}: {e}", ns.name()),
        Err(_) => panic!("echo server in {} did not start", ns.name()),
    }
}

/// Round trips on one TCP connection, every 100 ms until stopped.
#[derive(Default)]
struct EchoLog {
    /// (when, round trip) of each successful exchange.
    ok: Vec<(Instant, Duration)>,
    error: Option<(Instant, String)>,
}

fn start_echo_client(ns: &Ns, to: Ipv6Addr, port: u16, stop: Arc<AtomicBool>, log: Arc<Mutex<EchoLog>>) -> thread::JoinHandle<()> {
    ns.spawn_in_netns(move || {
        let fail = |log: &Mutex<EchoLog>, e: String| log.lock().unwrap().error = Some((Instant::now(), e));
        let mut s = match TcpStream::connect_timeout(&SocketAddr::new(to.into(), port), Duration::from_secs(10)) {
            Ok(s) => s,
            Err(e) => return fail(&log, format!("connect [{to}]:{port}: {e}")),
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut seq = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let msg = format!("echo {seq:020} over the mesh\n");
            let t = Instant::now();
            if let Err(e) = s.write_all(msg.as_bytes()) {
                return fail(&log, format!("write #{seq}: {e}"));
            }
            let mut back = vec![0u8; msg.len()];
            if let Err(e) = s.read_exact(&mut back) {
                return fail(&log, format!("read #{seq}: {e}"));
            }
            if back != msg.as_bytes() {
                return fail(&log, format!("#{seq} echoed {:?}", String::from_utf8_lossy(&back)));
            }
            log.lock().unwrap().ok.push((Instant::now(), t.elapsed()));
            seq += 1;
            thread::sleep(Duration::from_millis(100));
        }
        let _ = s.shutdown(Shutdown::Write);
    })
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C string; the lookup uses the calling thread's netns.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

/// A UDP socket on [::]:port in `ns` that joined `group` on `iface`;
/// collects every datagram until `stop`. Returns once it has joined.
fn start_group_listener(
    ns: &Ns,
    iface: String,
    group: Ipv6Addr,
    port: u16,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Result<Vec<(Vec<u8>, SocketAddr)>, String>> {
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    let who = ns.role().to_string();
    let h = ns.spawn_in_netns(move || {
        let setup = || -> Result<socket2::Socket, String> {
            use socket2::{Domain, Protocol, Socket, Type};
            let idx = ifindex(&iface);
            if idx == 0 {
                return Err(format!("no interface {iface}"));
            }
            let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).map_err(|e| e.to_string())?;
            s.set_reuse_address(true).map_err(|e| e.to_string())?;
            s.set_only_v6(true).map_err(|e| e.to_string())?;
            s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into()).map_err(|e| format!("bind [::]:{port}: {e}"))?;
            s.join_multicast_v6(&group, idx).map_err(|e| format!("IPV6_JOIN_GROUP {group} on {iface} ({idx}): {e}"))?;
            s.set_read_timeout(Some(Duration::from_millis(100))).map_err(|e| e.to_string())?;
            Ok(s)
        };
        let s = match setup() {
            Ok(s) => {
                let _ = tx.send(Ok(()));
                s
            }
            Err(e) => {
                let _ = tx.send(Err(e.clone()));
                return Err(e);
            }
        };
        let s: std::net::UdpSocket = s.into();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::SeqCst) {
            match s.recv_from(&mut buf) {
                Ok((n, from)) => got.push((buf[..n].to_vec(), from)),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(format!("recv: {e}")),
            }
        }
        Ok(got)
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => h,
        Ok(Err(e)) => panic!("group listener in {who}: {e}"),
        Err(_) => panic!("group listener in {who} did not start"),
    }
}

/// Sends one datagram from `ns` to `[to]:port`, out of `iface` (for
/// multicast: IPV6_MULTICAST_IF).
fn send_datagram(ns: &Ns, iface: &str, to: Ipv6Addr, port: u16, payload: &[u8]) -> Result<(), String> {
    ns.in_netns(|| {
        use socket2::{Domain, Protocol, Socket, Type};
        let idx = ifindex(iface);
        let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).map_err(|e| e.to_string())?;
        if to.is_multicast() {
            s.set_multicast_if_v6(idx).map_err(|e| format!("IPV6_MULTICAST_IF {iface}: {e}"))?;
        }
        let dst = SocketAddrV6::new(to, port, 0, if to.is_multicast() { idx } else { 0 });
        s.send_to(payload, &SocketAddr::V6(dst).into()).map_err(|e| format!("send to [{to}]:{port}: {e}"))?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// the mesh
// ---------------------------------------------------------------------------

/// Declared so the lab drops last (it stops the processes, deletes the
/// namespaces and the /etc/netns files).
struct Fleet {
    bb_ns: [Ns; 2],
    bb: Vec<Backbone>,
    coord: Node,
    papers: Node,
    fx: Node,
    news: Node,
    /// Daemons that died at start and were started again (a binary bug).
    startup_failures: Vec<String>,
    lab: Lab,
}

fn start_fleet(short: &str) -> Fleet {
    require_tool("dig", "dnsutils");
    require_tool("getent", "libc-bin");
    require_tool("curl", "curl");
    let lab = Lab::new(short);
    let sw = lab.add_switch("sw", "br0");
    let bb1_ns = lab.add_host("bb1", &sw, "198.18.0.1/24");
    let bb2_ns = lab.add_host("bb2", &sw, "198.18.0.2/24");
    let roles = [
        ("coord", "198.18.0.3/24", "coordinator", vec!["--group", "research"]),
        ("papers", "198.18.0.4/24", "specialist-papers", vec!["--capability", "citations", "--group", "research"]),
        ("fx", "198.18.0.5/24", "specialist-fx", vec!["--capability", "fx-rates", "--group", "trading"]),
        ("news", "198.18.0.6/24", "specialist-news", vec!["--capability", "summarise", "--group", "research"]),
    ];
    let t = Instant::now();
    let bb = vec![
        Backbone::start(&lab, &bb1_ns, bb_addr(1), Some(RECORD_TTL)),
        Backbone::start(&lab, &bb2_ns, bb_addr(2), Some(RECORD_TTL)),
    ];
    println!("[setup] two backbones answering after {:.2?}", t.elapsed());
    let mut nodes = Vec::new();
    let mut startup_failures = Vec::new();
    let t = Instant::now();
    for (role, cidr, host, extra) in roles {
        let ns = lab.add_host(role, &sw, cidr);
        let mut attempt = 0;
        let node = loop {
            attempt += 1;
            let opts = NodeOpts {
                heartbeat_secs: Some(HEARTBEAT),
                extra_backbones: vec![bb_addr(2)],
                extra_args: extra.clone(),
                ..NodeOpts::new(host)
            };
            let n = Node::start(&lab, &ns, bb_addr(1), opts);
            // Ok(false): the daemon exited (stop polling at once).
            let r = poll_until(Duration::from_secs(20), &format!("{host} to register with both backbones"), || {
                if !n.proc.is_running() {
                    return Ok(false);
                }
                let states = n.backbone_states()?;
                if states.len() != 2 || states.iter().any(|(_, s)| s != "registered") {
                    return Err(format!("backbones {states:?}"));
                }
                n.interface_has_address().map(|()| true)
            });
            match r {
                Ok(true) => break n,
                // The daemon binds its DNS socket to the mesh address right
                // after adding it; while the kernel still holds the address
                // tentative (flags 0xc0 in /proc/net/if_inet6 for 1-8 ms even
                // with accept_dad=0) that fails with EADDRNOTAVAIL and `up`
                // exits. Record the failure and start it again, so one run
                // still reports every other check.
                Ok(false) if attempt < 4 && n.proc.log().contains("cannot serve DNS") => {
                    let msg = format!(
                        "[setup] `meshtun up` for {host} exited at start (attempt {attempt}): {}",
                        n.proc.log_tail(3).replace('\n', " | ")
                    );
                    println!("{msg}; starting it again");
                    startup_failures.push(msg);
                }
                Ok(false) => {
                    let _ = n.proc.check_running().map_err(|e| panic!("[setup] `meshtun up` for {host}: {e}"));
                }
                Err(e) => panic!("[setup] {e}"),
            }
        };
        println!("[setup] {:<18} {} {} registered with both backbones", node.hostname, node.id.address, node.id.ipv6);
        nodes.push(node);
    }
    println!("[setup] all nodes registered after {:.2?}", t.elapsed());
    let mut it = nodes.into_iter();
    let (coord, papers, fx, news) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    Fleet {
        bb_ns: [bb1_ns, bb2_ns],
        bb,
        coord,
        papers,
        fx,
        news,
        startup_failures,
        lab,
    }
}

/// Addresses a backbone lists, or why not.
fn backbone_addresses(bb: &Backbone) -> Result<BTreeSet<String>, String> {
    Ok(bb
        .records()?
        .iter()
        .filter_map(|r| r.get("address").and_then(Value::as_str).map(str::to_string))
        .collect())
}

// ---------------------------------------------------------------------------
// the tests
// ---------------------------------------------------------------------------

#[test]
fn discovery_by_name_capability_and_group_survives_a_backbone_and_broadcasts_to_members_only() {
    if !require_root("discovery_by_name_capability_and_group_survives_a_backbone_and_broadcasts_to_members_only") {
        return;
    }
    let t_all = Instant::now();
    let f = start_fleet("disc");
    let all: [&Node; 4] = [&f.coord, &f.papers, &f.fx, &f.news];
    let coord_ns = &f.coord.ns;
    let dns = f.coord.id.ipv6;
    let sock = |n: &Node| n.socket.to_str().unwrap().to_string();
    let mut checks = Checks::new();
    for m in &f.startup_failures {
        checks.check(false, || format!("{m} (EADDRNOTAVAIL: the DNS socket is bound while the mesh address is still tentative)"));
    }

    // (1) DNS on the coordinator's own mesh address.
    let d = dig(coord_ns, dns, "specialist-papers.mesh", "AAAA");
    println!("(1) dig @{dns} specialist-papers.mesh AAAA: {} {:?} in {:.0?} (papers' `meshtun id`: {})", d.status, d.aaaa, d.out.elapsed, f.papers.id.ipv6);
    checks.check(d.status == "NOERROR" && d.aaaa == vec![f.papers.id.ipv6], || {
        format!("(1) specialist-papers.mesh should be exactly {}: {}", f.papers.id.ipv6, d.out.describe())
    });

    let d = dig(coord_ns, dns, "citations.cap.mesh", "AAAA");
    println!("(1) citations.cap.mesh: {} {} in {:.0?}", d.status, names(&d.set(), &all), d.out.elapsed);
    checks.check(d.status == "NOERROR" && d.aaaa == vec![f.papers.id.ipv6], || {
        format!("(1) citations.cap.mesh should list papers only: {}", d.out.describe())
    });

    let d = dig(coord_ns, dns, "research.group.mesh", "AAAA");
    let want: BTreeSet<Ipv6Addr> = [f.coord.id.ipv6, f.papers.id.ipv6, f.news.id.ipv6].into();
    println!("(1) research.group.mesh: {} {} in {:.0?}", d.status, names(&d.set(), &all), d.out.elapsed);
    checks.check(d.status == "NOERROR" && d.set() == want && d.aaaa.len() == 3, || {
        format!("(1) research.group.mesh should be coordinator + papers + news {}: {}", names(&want, &all), d.out.describe())
    });

    let d = dig(coord_ns, dns, "ghost.mesh", "AAAA");
    println!("(1) ghost.mesh: {} in {:.0?}", d.status, d.out.elapsed);
    checks.check(d.status == "NXDOMAIN" && d.out.elapsed < Duration::from_secs(2), || {
        format!("(1) ghost.mesh should be NXDOMAIN within 2 s: {}", d.out.describe())
    });

    let d = dig(coord_ns, dns, "example.com", "A");
    println!("(1) example.com: {} in {:.0?}", d.status, d.out.elapsed);
    checks.check(d.status == "REFUSED", || format!("(1) example.com should be REFUSED: {}", d.out.describe()));

    // (2) meshtun ping by name.
    let out = cli(coord_ns, &["ping", "specialist-papers", "-c", "2", "--json", "--socket", &sock(&f.coord)]);
    let replies: Vec<Value> = out
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["status"] == "ok")
        .map(|v| v["data"].clone())
        .collect();
    for r in &replies {
        println!("(2) ping specialist-papers: {} {} · {:.2} ms · {}", r["address"], r["hostname"], r["rtt_ms"].as_f64().unwrap_or(-1.0), r["path"]);
    }
    checks.check(
        out.success()
            && replies.len() == 2
            && replies.iter().all(|r| {
                r["address"] == f.papers.id.address.as_str()
                    && r["path"].as_str().is_some_and(|p| p.starts_with("direct") || p.starts_with("relay"))
                    && r["rtt_ms"].as_f64().is_some_and(|x| x > 0.0)
            }),
        || format!("(2) `meshtun ping specialist-papers -c 2 --json` should give 2 replies from {} with a path: {}", f.papers.id.address, out.describe()),
    );

    // (3) A TCP connection coordinator -> papers that we keep exercising,
    // then backbone 1 dies (SIGKILL).
    let echo_server = start_echo_server(&f.papers.ns, f.papers.id.ipv6, ECHO_PORT);
    let echo_stop = Arc::new(AtomicBool::new(false));
    let echo_log = Arc::new(Mutex::new(EchoLog::default()));
    let echo_client = start_echo_client(coord_ns, f.papers.id.ipv6, ECHO_PORT, echo_stop.clone(), echo_log.clone());
    let ok_count = || echo_log.lock().unwrap().ok.len();
    let r = poll_until(Duration::from_secs(10), "5 echo round trips coordinator -> papers", || {
        if let Some((_, e)) = &echo_log.lock().unwrap().error {
            return Err(format!("echo failed: {e}"));
        }
        if ok_count() >= 5 { Ok(()) } else { Err(format!("{} round trips", ok_count())) }
    });
    println!("(3) TCP echo coordinator -> [{}]:{ECHO_PORT} running: {r:?}, {} round trips", f.papers.id.ipv6, ok_count());
    checks.ok(r, "(3) TCP echo before the backbone failure");

    let bb1 = &f.bb[0];
    let killed_at = Instant::now();
    let sent = bb1.proc.signal(libc::SIGKILL);
    let st = bb1.proc.wait_timeout(Duration::from_secs(5));
    println!("(3) SIGKILL backbone 1 (pid {}): sent {sent}, {:?}", bb1.proc.pid(), st.map(harness::describe_status));
    checks.check(sent && st.is_some(), || "(3) backbone 1 did not die on SIGKILL".into());

    // New lookup (a name nobody looked up yet) goes through backbone 2.
    let d = dig(coord_ns, dns, "specialist-fx.mesh", "AAAA");
    println!(
        "(3) with backbone 1 dead: dig specialist-fx.mesh: {} {:?} in {:.0?} ({:.2?} after the kill)",
        d.status,
        d.aaaa,
        d.out.elapsed,
        killed_at.elapsed()
    );
    checks.check(d.status == "NOERROR" && d.aaaa == vec![f.fx.id.ipv6], || {
        format!("(3) a new lookup with backbone 1 dead should still answer {}: {}", f.fx.id.ipv6, d.out.describe())
    });
    let out = cli(coord_ns, &["resolve", "specialist-news", "--json", "--socket", &sock(&f.coord)]);
    let res = json_data(&out);
    println!("(3) with backbone 1 dead: meshtun resolve specialist-news: {:?} in {:.0?}", res.as_ref().map(|d| d["ipv6"].clone()), out.elapsed);
    checks.check(res.as_ref().is_ok_and(|d| d["ipv6"] == f.news.id.ipv6.to_string()), || {
        format!("(3) `meshtun resolve specialist-news` with backbone 1 dead: {res:?}")
    });

    // The open connection keeps working without the backbone: wait for a
    // heartbeat to have failed (so the nodes notice), round trips continue.
    let before = ok_count();
    thread::sleep(Duration::from_millis(HEARTBEAT * 1000 + 500));
    let after = ok_count();
    let states = f.coord.backbone_states();
    println!(
        "(3) {:.1?} after the kill: {} more echo round trips (error {:?}); coordinator's backbones {states:?}",
        killed_at.elapsed(),
        after - before,
        echo_log.lock().unwrap().error.as_ref().map(|e| e.1.clone())
    );
    checks.check(after - before >= 10 && echo_log.lock().unwrap().error.is_none(), || {
        format!("(3) the open TCP connection stalled after backbone 1 died: {} round trips in 2.5 s", after - before)
    });

    // Backbone 1 comes back (same address, empty directory).
    let t = Instant::now();
    let bb1b = Backbone::start_as(&f.lab, &f.bb_ns[0], "bb1-restarted", bb_addr(1), Some(RECORD_TTL));
    let up_at = Instant::now();
    println!("(3) backbone 1 restarted after being dead {:.1?}; answering after {:.2?}", (up_at - killed_at), t.elapsed());
    let want: BTreeSet<String> = all.iter().map(|n| n.id.address.clone()).collect();
    let limit = Duration::from_secs(HEARTBEAT + 2);
    let r = poll_until(Duration::from_secs(30), "the restarted backbone 1 to list every node", || {
        bb1b.proc.check_running()?;
        let got = backbone_addresses(&bb1b)?;
        if got == want { Ok(()) } else { Err(format!("lists {got:?}")) }
    });
    let took = up_at.elapsed();
    let per_node: Vec<String> = all
        .iter()
        .map(|n| format!("{}: {:?}", n.hostname, n.backbone_states().unwrap_or_default()))
        .collect();
    println!("(3) restarted backbone 1 lists all 4 nodes: {} after {took:.2?} (limit {limit:?}); {per_node:?}", r.is_ok());
    checks.ok(r, "(3) restarted backbone 1");
    checks.check(took <= limit, || {
        format!("(3) the restarted backbone 1 listed every node only {took:.2?} after it came back (heartbeat {HEARTBEAT} s, limit {limit:?})")
    });

    echo_stop.store(true, Ordering::SeqCst);
    echo_client.join().unwrap();
    let log = std::mem::take(&mut *echo_log.lock().unwrap());
    let server = echo_server.join().unwrap();
    let max_gap = log.ok.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap_or_default();
    let max_rtt = log.ok.iter().map(|x| x.1).max().unwrap_or_default();
    let after_kill = log.ok.iter().filter(|x| x.0 > killed_at).count();
    println!(
        "(3) TCP echo total: {} round trips ({after_kill} after the kill), longest gap {max_gap:.0?}, slowest {max_rtt:.1?}, error {:?}; server echoed {server:?}",
        log.ok.len(),
        log.error
    );
    checks.check(log.error.is_none() && max_gap < Duration::from_secs(1) && server.is_ok(), || {
        format!("(3) the TCP connection did not run smoothly through the backbone failure: longest gap {max_gap:?}, error {:?}, server {server:?}", log.error)
    });

    // (4) The system resolver through /etc/netns/NS/resolv.conf.
    f.lab.set_resolv_conf(coord_ns, &[IpAddr::V6(dns)]);
    let out = coord_ns.exec(&["getent", "ahosts", "specialist-fx.mesh"]);
    let got: BTreeSet<IpAddr> = out.stdout.lines().filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect();
    let v6: BTreeSet<IpAddr> = got.iter().copied().filter(IpAddr::is_ipv6).collect();
    let v4: BTreeSet<IpAddr> = got.iter().copied().filter(IpAddr::is_ipv4).collect();
    let fx_v4 = harness::meshtun::json_data(&cli(&f.fx.ns, &["id", "--state-dir", f.fx.state_dir.to_str().unwrap(), "--json"]))
        .ok()
        .and_then(|d| d["ipv4"].as_str().and_then(|s| s.parse::<IpAddr>().ok()));
    println!("(4) getent ahosts specialist-fx.mesh: IPv6 {v6:?} IPv4 {v4:?} in {:.0?} (fx's `meshtun id`: {} / {fx_v4:?})", out.elapsed, f.fx.id.ipv6);
    checks.check(out.success() && v6 == BTreeSet::from([IpAddr::V6(f.fx.id.ipv6)]), || {
        format!("(4) getent ahosts specialist-fx.mesh should give {}: {}", f.fx.id.ipv6, out.describe())
    });
    // NAME.mesh answers A too: exactly fx's own mesh IPv4 (100.64.0.0/10).
    checks.check(fx_v4.is_some() && v4 == BTreeSet::from([fx_v4.unwrap()]), || {
        format!("(4) getent ahosts specialist-fx.mesh gave IPv4 {v4:?}, fx's `meshtun id` says {fx_v4:?}")
    });
    // CAP.cap.mesh and GROUP.group.mesh through the system resolver: the
    // holders' / members' AAAA and A records, nobody else's.
    let node_v4 = |n: &Node| {
        harness::meshtun::json_data(&cli(&n.ns, &["id", "--state-dir", n.state_dir.to_str().unwrap(), "--json"]))
            .ok()
            .and_then(|d| d["ipv4"].as_str().and_then(|s| s.parse::<IpAddr>().ok()))
    };
    for (name, members) in [("citations.cap.mesh", vec![&f.papers]), ("research.group.mesh", vec![&f.coord, &f.papers, &f.news])] {
        let out = coord_ns.exec(&["getent", "ahosts", name]);
        let got: BTreeSet<IpAddr> = out.stdout.lines().filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect();
        let v6: BTreeSet<IpAddr> = got.iter().copied().filter(IpAddr::is_ipv6).collect();
        let v4: BTreeSet<IpAddr> = got.iter().copied().filter(IpAddr::is_ipv4).collect();
        let want6: BTreeSet<IpAddr> = members.iter().map(|n| IpAddr::V6(n.id.ipv6)).collect();
        let want4: BTreeSet<IpAddr> = members.iter().filter_map(|n| node_v4(n)).collect();
        let v6_ips: BTreeSet<Ipv6Addr> = v6.iter().filter_map(|ip| match ip { IpAddr::V6(a) => Some(*a), _ => None }).collect();
        println!("(4) getent ahosts {name}: {} IPv4 {v4:?} in {:.0?}", names(&v6_ips, &all), out.elapsed);
        checks.check(out.success() && v6 == want6, || format!("(4) getent ahosts {name} should give {want6:?}: {}", out.describe()));
        checks.check(want4.len() == members.len() && v4 == want4, || format!("(4) getent ahosts {name} gave IPv4 {v4:?}, the members have {want4:?}"));
    }

    let http_stop = Arc::new(AtomicBool::new(false));
    let body = format!("specialist-news summary service at {}\n", f.news.id.ipv6);
    let http = start_http_server(&f.news.ns, f.news.id.ipv6, HTTP_PORT, body.clone(), http_stop.clone());
    let url = format!("http://specialist-news.mesh:{HTTP_PORT}/");
    let out = coord_ns.exec_timeout(&["curl", "-g", "-sS", "--max-time", "10", &url], Duration::from_secs(15));
    println!("(4) curl {url}: {:?} in {:.0?}", out.stdout.trim(), out.elapsed);
    checks.check(out.success() && out.stdout == body, || format!("(4) curl {url} should return {body:?}: {}", out.describe()));
    http_stop.store(true, Ordering::SeqCst);
    let served = http.join().unwrap();
    checks.check(served == 1, || format!("(4) the HTTP server on news served {served} requests, want 1"));

    // (5) find, and a capability change at run time.
    let find = |n: &Node| json_data(&cli(&n.ns, &["find", "--capability", "summarise", "--json", "--socket", &sock(n)]));
    let r = find(&f.coord);
    println!("(5) coordinator: find --capability summarise: {:?}", r.as_ref().map(hostnames_of));
    checks.check(r.as_ref().is_ok_and(|d| hostnames_of(d) == ["specialist-news"]), || {
        format!("(5) find --capability summarise should list specialist-news only: {r:?}")
    });
    let out = cli(&f.fx.ns, &["set", "--capability", "summarise", "--capability", "fx-rates", "--json", "--socket", &sock(&f.fx)]);
    let set_at = Instant::now();
    println!("(5) fx: meshtun set --capability summarise --capability fx-rates: {}", out.stdout.trim());
    checks.check(json_data(&out).is_ok(), || format!("(5) `meshtun set` on fx failed: {}", out.describe()));
    let both = |d: &Value| {
        let h = hostnames_of(d);
        h.len() == 2 && h.contains(&"specialist-fx".to_string()) && h.contains(&"specialist-news".to_string())
    };
    // A node that never asked about "summarise" (nothing cached) shows what
    // the backbones hold; the coordinator must catch up too.
    let r_fresh = poll_until(Duration::from_secs(20), "papers' find --capability summarise to list fx and news", || {
        let d = find(&f.papers)?;
        if both(&d) { Ok(set_at.elapsed()) } else { Err(format!("{:?}", hostnames_of(&d))) }
    });
    let r_coord = poll_until(Duration::from_secs(20), "the coordinator's find --capability summarise to list fx and news", || {
        let d = find(&f.coord)?;
        if both(&d) { Ok(set_at.elapsed()) } else { Err(format!("{:?}", hostnames_of(&d))) }
    });
    let limit = FIND_FRESH_LIMIT;
    println!("(5) after `set` on fx, find --capability summarise lists fx: from papers (no cache) after {r_fresh:?}, from the coordinator after {r_coord:?} (limit {limit:?})");
    for (who, r) in [("papers", &r_fresh), ("coordinator", &r_coord)] {
        checks.check(r.as_ref().is_ok_and(|t| *t <= limit), || {
            format!("(5) {who}'s find --capability summarise should list fx within {limit:?} of `set`: {r:?}")
        });
    }

    // (6) Group broadcast: coordinator -> research's multicast address.
    let group = group_address(0, "research");
    println!("(6) research's multicast address: {group}");
    let stop = Arc::new(AtomicBool::new(false));
    let listeners: Vec<(&Node, _)> = [&f.papers, &f.news, &f.fx]
        .into_iter()
        .map(|n| (n, start_group_listener(&n.ns, n.interface.clone(), group, GROUP_PORT, stop.clone())))
        .collect();
    let payload = format!("research broadcast from the coordinator {}", std::process::id());
    let sent_before = f.coord.status().map(|s| s["stats"]["broadcasts_sent"].clone());
    let r = send_datagram(coord_ns, &f.coord.interface, group, GROUP_PORT, payload.as_bytes());
    checks.ok(r, "(6) sending to the group");
    thread::sleep(Duration::from_millis(1500));
    // Control: fx's socket does receive mesh traffic (a unicast datagram to
    // its mesh address on the same port), so its silence above means
    // something.
    let control = b"unicast control datagram";
    let r = send_datagram(coord_ns, &f.coord.interface, f.fx.id.ipv6, GROUP_PORT, control);
    checks.ok(r, "(6) sending the unicast control datagram to fx");
    thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::SeqCst);
    let sent_after = f.coord.status().map(|s| s["stats"]["broadcasts_sent"].clone());
    println!("(6) coordinator broadcasts_sent {sent_before:?} -> {sent_after:?}");
    for (n, h) in listeners {
        let got = h.join().unwrap();
        let (group_hits, control_hits, other) = match &got {
            Ok(v) => (
                v.iter().filter(|(d, _)| d == payload.as_bytes()).count(),
                v.iter().filter(|(d, _)| d == control).count(),
                v.iter().filter(|(d, _)| d != payload.as_bytes() && d != control).count(),
            ),
            Err(_) => (0, 0, 0),
        };
        let senders: BTreeSet<String> = got.as_ref().map(|v| v.iter().map(|(_, a)| a.ip().to_string()).collect()).unwrap_or_default();
        println!(
            "(6) {:<18} got the group datagram {group_hits}x, the unicast control {control_hits}x, other {other}; from {senders:?}; {:?}",
            n.hostname,
            got.as_ref().err()
        );
        let is_fx = n.hostname == "specialist-fx";
        let want_group = if is_fx { 0 } else { 1 };
        checks.check(got.is_ok() && group_hits == want_group && other == 0, || {
            format!("(6) {} should receive the research broadcast exactly {want_group} time(s), got {group_hits} (+{other} other): {got:?}", n.hostname)
        });
        if is_fx {
            checks.check(control_hits == 1, || format!("(6) control: fx's listener did not get the unicast datagram ({control_hits}x): the fx check is vacuous"));
        }
        if group_hits > 0 {
            checks.check(senders.contains(&f.coord.id.ipv6.to_string()), || format!("(6) {} got the broadcast from {senders:?}, not the coordinator", n.hostname));
        }
    }

    for n in all {
        checks.check(n.proc.is_running(), || format!("{} daemon exited:\n{}", n.hostname, n.proc.log_tail(30)));
    }
    println!("whole test {:.1?}", t_all.elapsed());
    let _ = (&f.bb, &f.lab);
    checks.finish();
}

/// `scripts/fleet-demo.sh` runs end to end without a terminal and answers
/// every task; it leaves no namespace or /etc/netns entry behind.
#[test]
fn fleet_demo_runs_non_interactively_and_answers_every_task() {
    if !require_root("fleet_demo_runs_non_interactively_and_answers_every_task") {
        return;
    }
    for (tool, pkg) in [("dig", "dnsutils"), ("curl", "curl"), ("python3", "python3"), ("nft", "nftables")] {
        require_tool(tool, pkg);
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fleet-demo.sh");
    let prefix = format!("mtfleet{}", std::process::id() % 100_000);
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(&script)
        .env("MESHTUN_BIN", harness::meshtun::bin())
        .env("FLEET_PREFIX", &prefix)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    let out = harness::run_cmd(&mut cmd, Duration::from_secs(150));
    println!("{}", out.stdout);
    eprintln!("{}", out.stderr);
    println!("fleet-demo.sh {} after {:.1?}", out.status.map(harness::describe_status).unwrap_or_else(|| "timed out".into()), out.elapsed);
    let ns_left: Vec<String> = harness::ip(&["netns", "list"])
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_string)
        .collect();
    let etc_left: Vec<String> = std::fs::read_dir(harness::ETC_NETNS)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&format!("{prefix}-"))).collect())
        .unwrap_or_default();
    let mut checks = Checks::new();
    checks.check(out.success(), || format!("fleet-demo.sh failed: {}", out.describe()));
    checks.check(out.stdout.lines().any(|l| l.trim() == "fleet demo: 3/3 tasks answered"), || {
        "fleet-demo.sh did not print `fleet demo: 3/3 tasks answered`".into()
    });
    for (cap, host) in [("citations", "specialist-papers"), ("fx-rates", "specialist-fx"), ("summarise", "specialist-news")] {
        // "   citations -> specialist-papers -> 0:XXXX.XXXX.XXXX (fd4d:...) -> direct 198.18.0.3:51820 -> 0.12 ms"
        let line = out.stdout.lines().find(|l| l.trim_start().starts_with(&format!("{cap} -> {host} -> 0:")));
        checks.check(
            line.is_some_and(|l| l.contains(" -> direct ") || l.contains(" -> relay ")) && line.is_some_and(|l| l.trim_end().ends_with(" ms")),
            || format!("fleet-demo.sh should print `{cap} -> {host} -> ADDRESS (IPV6) -> direct|relay ENDPOINT -> RTT ms`, got {line:?}"),
        );
    }
    checks.check(ns_left.is_empty(), || format!("fleet-demo.sh left namespaces behind: {ns_left:?}"));
    checks.check(etc_left.is_empty(), || format!("fleet-demo.sh left /etc/netns entries behind: {etc_left:?}"));
    checks.finish();
}

#[test]
fn group_addresses_match_the_documented_derivation() {
    let a = group_address(0, "research");
    assert_eq!(a.segments()[..4], [0xff15, 0x4d54, 0, 0]);
    assert_ne!(a, group_address(0, "trading"));
    assert_eq!(group_address(7, "research").segments()[2], 7);
}

/// The harness: `Lab::set_resolv_conf` makes `ip netns exec` see the file as
/// /etc/resolv.conf, and the lab removes what it wrote.
#[test]
fn lab_resolv_conf_is_seen_inside_the_namespace_and_removed_afterwards() {
    if !require_root("lab_resolv_conf_is_seen_inside_the_namespace_and_removed_afterwards") {
        return;
    }
    let existed = std::path::Path::new(harness::ETC_NETNS).exists();
    let lab = Lab::new("rc");
    let ns = lab.add_ns("h");
    let server: IpAddr = "fd4d:6573:6874::1234".parse().unwrap();
    lab.set_resolv_conf(&ns, &[server]);
    let dir = std::path::Path::new(harness::ETC_NETNS).join(ns.name());
    let seen = ns.exec(&["cat", "/etc/resolv.conf"]).ok().stdout;
    println!("/etc/resolv.conf inside {}: {seen:?}", ns.name());
    assert!(seen.contains(&format!("nameserver {server}")), "{seen:?}");
    assert!(dir.join("resolv.conf").exists());
    drop(lab);
    assert!(!dir.exists(), "{} left behind", dir.display());
    if !existed {
        // Only when no other lab of this process is using /etc/netns.
        let others = std::fs::read_dir(harness::ETC_NETNS).map(|d| d.count()).unwrap_or(0);
        assert!(others > 0 || !std::path::Path::new(harness::ETC_NETNS).exists(), "{} left behind", harness::ETC_NETNS);
    }
}
