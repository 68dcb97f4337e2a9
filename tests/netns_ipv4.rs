//! IPv4 over the mesh, end to end in network namespaces: agents that only
//! speak IPv4 reach each other through the 100.64.0.0/10 addresses meshtun
//! puts on every TUN (docs/ARCHITECTURE.md, "IPv4 for agents that do not
//! speak IPv6").
//!
//! Needs root (namespaces, veth, TUN), `ip` (iproute2) and `getent`
//! (libc-bin). Without root the test prints "skipping: needs root" and
//! passes. Run with:
//!
//!     cargo test --test netns_ipv4 -- --nocapture
//!
//! Topology (namespaces `mt-{pid}-v4-{role}`, one bridge):
//!
//!     bb 198.18.0.1 ─┐
//!     a  198.18.0.2 ─┤  node "alpha"
//!     b  198.18.0.3 ─┼─ sw (bridge br0)
//!     c  198.18.0.4 ─┘  node "gamma"        (b: node "beta")
//!
//! Checks:
//! 1. TCP echo (1.5 MiB, blake3-compared) from a to a server on b bound to
//!    0.0.0.0:8080, once by b's IPv4 literal from `meshtun id --json` (the
//!    first packet is looked up at the backbone) and once by `beta.mesh`
//!    resolved to IPv4 by the system resolver (`getent ahostsv4` in a's
//!    namespace, /etc/netns/<a>/resolv.conf pointing at a's mesh DNS).
//! 2. UDP request/answer over IPv4 to a socket on b bound to 0.0.0.0:9999.
//! 3. `meshtun ping <b's IPv4> -c 1` and the IPv4 fields of `status --json`.
//! 4. Cryptokey routing for IPv4: c injects (raw socket, IP_HDRINCL) a UDP
//!    packet with a's mesh IPv4 as source into its own TUN, to b; it travels
//!    inside c's WireGuard session and b must drop it (listener never sees
//!    it; `stats.dropped.spoofed_source` grows), while c's legitimate
//!    datagrams arrive.

mod harness;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use harness::meshtun::{cli, json_data, Backbone, Node, NodeOpts};
use harness::{poll_until, require_root, require_tool, Checks, CmdOutput, Lab, Ns};
use serde_json::Value;

const BB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const BB_PORT: u16 = 7400;
const HEARTBEAT: u64 = 2;
const TCP_BYTES: usize = 3 * 512 * 1024; // 1.5 MiB
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 9999;
const SPOOF_PORT: u16 = 9998;
const SPOOF_MARKER: &[u8] = b"SPOOFED-FROM-GAMMA-AS-ALPHA";
const LEGIT_MARKER: &[u8] = b"LEGIT-FROM-GAMMA";
const BUDGET: Duration = Duration::from_secs(60);

fn sock(n: &Node) -> String {
    n.socket.to_str().expect("utf-8 path").to_string()
}

/// The node's mesh IPv4 from `meshtun id --json` (data.ipv4).
fn id_ipv4(n: &Node) -> Ipv4Addr {
    let out = cli(&n.ns, &["id", "--state-dir", n.state_dir.to_str().unwrap(), "--json"]);
    let data = json_data(&out).unwrap_or_else(|e| panic!("`meshtun id` of {}: {e}", n.hostname));
    let s = data["ipv4"]
        .as_str()
        .unwrap_or_else(|| panic!("`meshtun id --json` of {} lacks string data.ipv4: {data}", n.hostname));
    let ip: Ipv4Addr = s.parse().unwrap_or_else(|e| panic!("`meshtun id` ipv4 {s:?} of {}: {e}", n.hostname));
    assert!(
        ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64,
        "`meshtun id` ipv4 {ip} of {} is outside 100.64.0.0/10",
        n.hostname
    );
    ip
}

fn spoofed_drops(n: &Node) -> Result<u64, String> {
    let d = n.status()?;
    d.pointer("/stats/dropped/spoofed_source")
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("status of {} lacks stats.dropped.spoofed_source: {}", n.hostname, d.get("stats").unwrap_or(&Value::Null)))
}

fn backbone_ipv4_lookups(bb: &Backbone) -> Option<u64> {
    let d = bb.status().ok()?;
    // Wherever the backbone reports its per-kind lookup counters.
    fn find(v: &Value) -> Option<u64> {
        match v {
            Value::Object(m) => {
                if let Some(k) = m.get("lookups_by_kind") {
                    return k.get("ipv4").and_then(Value::as_u64);
                }
                m.values().find_map(find)
            }
            _ => None,
        }
    }
    find(&d)
}

fn first_line(out: &CmdOutput) -> String {
    out.stdout.lines().chain(out.stderr.lines()).map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" | ")
}

// ---------------------------------------------------------------------------
// servers on b
// ---------------------------------------------------------------------------

/// TCP echo server on 0.0.0.0:port inside `ns`, one thread per connection,
/// until `stop`. Yields (client address, bytes echoed or error) per connection.
fn start_tcp_echo(ns: &Ns, port: u16, stop: Arc<AtomicBool>) -> JoinHandle<Vec<(SocketAddr, Result<usize, String>)>> {
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    let h = ns.spawn_in_netns(move || {
        let l = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)) {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(format!("bind 0.0.0.0:{port}: {e}")));
                return Vec::new();
            }
        };
        l.set_nonblocking(true).unwrap();
        let mut conns: Vec<(SocketAddr, JoinHandle<Result<usize, String>>)> = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((mut s, from)) => {
                    let h = thread::spawn(move || {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut total = 0;
                        loop {
                            let n = s.read(&mut buf).map_err(|e| format!("server read after {total} B: {e}"))?;
                            if n == 0 {
                                break;
                            }
                            s.write_all(&buf[..n]).map_err(|e| format!("server write after {total} B: {e}"))?;
                            total += n;
                        }
                        s.shutdown(Shutdown::Write).map_err(|e| format!("server shutdown: {e}"))?;
                        Ok(total)
                    });
                    conns.push((from, h));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(10)),
                Err(e) => {
                    eprintln!("tcp echo accept: {e}");
                    break;
                }
            }
        }
        conns
            .into_iter()
            .map(|(from, h)| (from, h.join().unwrap_or_else(|_| Err("connection thread panicked".into()))))
            .collect()
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => h,
        Ok(Err(e)) => panic!("TCP echo server in {}: {e}", ns.name()),
        Err(_) => panic!("TCP echo server in {} did not start", ns.name()),
    }
}

/// UDP socket on 0.0.0.0:port inside `ns` that records (source, payload) of
/// every datagram and, if `answer`, replies "answer:" + payload. Until `stop`.
fn start_udp(ns: &Ns, port: u16, answer: bool, stop: Arc<AtomicBool>, log: Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>) -> JoinHandle<()> {
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    let h = ns.spawn_in_netns(move || {
        let s = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)) {
            Ok(s) => {
                let _ = tx.send(Ok(()));
                s
            }
            Err(e) => {
                let _ = tx.send(Err(format!("bind udp 0.0.0.0:{port}: {e}")));
                return;
            }
        };
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::SeqCst) {
            match s.recv_from(&mut buf) {
                Ok((n, from)) => {
                    log.lock().unwrap().push((from, buf[..n].to_vec()));
                    if answer {
                        let mut reply = b"answer:".to_vec();
                        reply.extend_from_slice(&buf[..n]);
                        let _ = s.send_to(&reply, from);
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => {
                    eprintln!("udp :{port} recv: {e}");
                    break;
                }
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => h,
        Ok(Err(e)) => panic!("UDP socket in {}: {e}", ns.name()),
        Err(_) => panic!("UDP socket in {} did not start", ns.name()),
    }
}

// ---------------------------------------------------------------------------
// clients
// ---------------------------------------------------------------------------

/// Sends `data` from `from` to `to` over TCP and reads the echo.
fn tcp_echo_roundtrip(from: &Ns, to: SocketAddr, data: &[u8]) -> Result<(Vec<u8>, Duration, Duration), String> {
    from.in_netns(|| {
        let t = Instant::now();
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(10)).map_err(|e| format!("connect to {to}: {e}"))?;
        let connected = t.elapsed();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        let mut r = s;
        thread::scope(|sc| {
            let writer = sc.spawn(move || -> Result<(), String> {
                for chunk in data.chunks(16 * 1024) {
                    w.write_all(chunk).map_err(|e| format!("write: {e}"))?;
                }
                w.shutdown(Shutdown::Write).map_err(|e| format!("shutdown: {e}"))
            });
            let mut echoed = Vec::with_capacity(data.len());
            let read = r.read_to_end(&mut echoed);
            let wres = writer.join().unwrap();
            if let Err(e) = read {
                return Err(format!(
                    "read failed after {} of {} echoed bytes ({:.1?}): {e}; writer: {wres:?}",
                    echoed.len(),
                    data.len(),
                    t.elapsed()
                ));
            }
            wres?;
            Ok((echoed, connected, t.elapsed()))
        })
    })
}

/// One UDP request from `from` to `to`, retried (the first datagram to a
/// literal waits for the backbone lookup). Returns (reply, its source, RTT
/// of the answered attempt, attempts).
fn udp_request(from: &Ns, to: SocketAddrV4, payload: &[u8], attempts: u32) -> Result<(Vec<u8>, SocketAddr, Duration, u32), String> {
    from.in_netns(|| {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| format!("bind: {e}"))?;
        s.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
        let mut buf = [0u8; 2048];
        let mut last = String::new();
        for i in 1..=attempts {
            let t = Instant::now();
            s.send_to(payload, to).map_err(|e| format!("send_to {to}: {e}"))?;
            match s.recv_from(&mut buf) {
                Ok((n, src)) => return Ok((buf[..n].to_vec(), src, t.elapsed(), i)),
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!("no answer from {to} after {attempts} attempts (last: {last})"))
    })
}

/// Sends one datagram from `from` (socket bound to 0.0.0.0) to `to`.
fn udp_send(from: &Ns, to: SocketAddrV4, payload: &[u8]) -> Result<(), String> {
    from.in_netns(|| {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| format!("bind: {e}"))?;
        s.send_to(payload, to).map(|_| ()).map_err(|e| format!("send_to {to}: {e}"))
    })
}

/// RFC 1071 checksum.
fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 { u16::from_be_bytes([c[0], c[1]]) } else { u16::from_be_bytes([c[0], 0]) };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv4 + UDP (checksum 0) packet with an arbitrary source.
fn ipv4_udp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, id: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&[0x40, 0]); // DF, offset 0
    p.extend_from_slice(&[64, 17]); // TTL, UDP
    p.extend_from_slice(&[0, 0]); // header checksum, below
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let ck = inet_checksum(&p[..20]);
    p[10..12].copy_from_slice(&ck.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]); // no UDP checksum
    p.extend_from_slice(payload);
    p
}

/// Writes `packet` (a full IPv4 packet) through a raw IPPROTO_RAW socket in
/// `ns`: the kernel routes it by its destination (here: into meshtun0).
fn raw_send(ns: &Ns, packet: &[u8], dst: Ipv4Addr) -> Result<usize, String> {
    ns.in_netns(|| {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))
            .map_err(|e| format!("raw socket: {e}"))?;
        s.send_to(packet, &SockAddr::from(SocketAddrV4::new(dst, 0))).map_err(|e| format!("raw send_to {dst}: {e}"))
    })
}

// ---------------------------------------------------------------------------
// the test
// ---------------------------------------------------------------------------

#[test]
fn ipv4_only_agents_reach_each_other_by_literal_and_name_and_spoofed_sources_are_dropped() {
    if !require_root("ipv4_only_agents_reach_each_other_by_literal_and_name_and_spoofed_sources_are_dropped") {
        return;
    }
    require_tool("getent", "libc-bin");
    let started = Instant::now();
    let lab = Lab::new("v4");
    let sw = lab.add_switch("sw", "br0");
    let bb_ns = lab.add_host("bb", &sw, "198.18.0.1/24");
    let a_ns = lab.add_host("a", &sw, "198.18.0.2/24");
    let b_ns = lab.add_host("b", &sw, "198.18.0.3/24");
    let c_ns = lab.add_host("c", &sw, "198.18.0.4/24");
    let bb_addr = SocketAddr::new(BB_IP.into(), BB_PORT);
    let backbone = Backbone::start(&lab, &bb_ns, bb_addr, None);
    let opts = |h| NodeOpts {
        heartbeat_secs: Some(HEARTBEAT),
        ..NodeOpts::new(h)
    };
    let a = Node::start(&lab, &a_ns, bb_addr, opts("alpha"));
    let b = Node::start(&lab, &b_ns, bb_addr, opts("beta"));
    let c = Node::start(&lab, &c_ns, bb_addr, opts("gamma"));
    for n in [&a, &b, &c] {
        n.wait_registered(Duration::from_secs(15));
    }
    let (a4, b4, c4) = (id_ipv4(&a), id_ipv4(&b), id_ipv4(&c));
    println!("[setup] registered after {:.2?}", started.elapsed());
    for (n, v4) in [(&a, a4), (&b, b4), (&c, c4)] {
        println!("[setup] {:<5} {} {} ipv4 {v4}", n.hostname, n.id.address, n.id.ipv6);
    }
    assert!(a4 != b4 && b4 != c4 && a4 != c4, "two nodes share a canonical IPv4: {a4} {b4} {c4}");

    let mut checks = Checks::new();

    // (0) each TUN carries the node's IPv4 (so 0.0.0.0 servers are reachable).
    for (n, v4) in [(&a, a4), (&b, b4), (&c, c4)] {
        let out = harness::ip(&["-n", n.ns.name(), "-4", "addr", "show", "dev", &n.interface]);
        let line = out.stdout.lines().find(|l| l.contains("inet ")).unwrap_or("").trim().to_string();
        println!("(0) {} {}: {line}", n.hostname, n.interface);
        checks.check(out.stdout.contains(&format!("inet {v4}/10")), || {
            format!("(0) {} on {} should carry {v4}/10: {}", n.interface, n.hostname, out.describe())
        });
    }

    // (1) TCP echo to 0.0.0.0:8080 on b, by literal and by name.
    let tcp_stop = Arc::new(AtomicBool::new(false));
    let tcp_server = start_tcp_echo(&b_ns, TCP_PORT, tcp_stop.clone());
    let seed = u64::from(std::process::id()) ^ 0x7634_6d65_7368;
    let data = harness::marked_random_bytes(TCP_BYTES, seed, b"MESHTUN-V4-", 4096);
    let sent_hash = blake3::hash(&data);

    let lookups_before = backbone_ipv4_lookups(&backbone);
    let tcp_round = |checks: &mut Checks, label: &str, target: Ipv4Addr| {
        let to = SocketAddr::new(IpAddr::V4(target), TCP_PORT);
        match tcp_echo_roundtrip(&a_ns, to, &data) {
            Ok((echoed, connected, took)) => {
                let h = blake3::hash(&echoed);
                println!(
                    "(1) TCP {label} a -> {to}: connected in {connected:.1?}, sent {} B (blake3 {}), echoed {} B (blake3 {}), {took:.2?}, {:.1} Mbit/s each way",
                    data.len(),
                    &sent_hash.to_hex()[..16],
                    echoed.len(),
                    &h.to_hex()[..16],
                    data.len() as f64 * 8.0 / took.as_secs_f64() / 1e6
                );
                checks.check(echoed.len() == data.len() && h == sent_hash, || {
                    format!("(1) TCP {label} to {to}: echoed {} B with blake3 {}, sent {} B with {}", echoed.len(), h.to_hex(), data.len(), sent_hash.to_hex())
                });
            }
            Err(e) => {
                checks.check(false, || format!("(1) TCP {label} a -> {to}: {e}"));
            }
        }
    };
    // The literal first: nothing on a has used b's IPv4 yet, so the first
    // SYN waits for the backbone lookup by canonical address.
    tcp_round(&mut checks, "by literal", b4);
    let lookups_after = backbone_ipv4_lookups(&backbone);
    println!("(1) backbone IPv4 lookups: {lookups_before:?} -> {lookups_after:?}");

    lab.set_resolv_conf(&a_ns, &[IpAddr::V6(a.id.ipv6)]);
    let out = a_ns.exec(&["getent", "ahostsv4", "beta.mesh"]);
    let resolved: Vec<Ipv4Addr> = out.stdout.lines().filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect();
    let mut uniq = resolved.clone();
    uniq.sort();
    uniq.dedup();
    println!("(1) getent ahostsv4 beta.mesh in a (nameserver {}): {uniq:?} in {:.0?}", a.id.ipv6, out.elapsed);
    checks.check(out.success() && uniq == vec![b4], || {
        format!("(1) getent ahostsv4 beta.mesh should give exactly beta's {b4}: {}", out.describe())
    });
    match uniq.first() {
        Some(&ip) => tcp_round(&mut checks, "by name (beta.mesh)", ip),
        None => {
            checks.check(false, || "(1) TCP by name: beta.mesh did not resolve to IPv4, skipped".into());
        }
    }
    tcp_stop.store(true, Ordering::SeqCst);
    let served = tcp_server.join().expect("TCP echo server thread panicked");
    println!("(1) server on b 0.0.0.0:{TCP_PORT} served: {served:?}");
    checks.check(served.len() == 2 && served.iter().all(|(_, r)| r.as_ref() == Ok(&TCP_BYTES)), || {
        format!("(1) the server should have echoed {TCP_BYTES} B on 2 connections: {served:?}")
    });
    checks.check(served.iter().all(|(from, _)| from.ip() == IpAddr::V4(a4)), || {
        format!("(1) connections should come from alpha's mesh IPv4 {a4}: {served:?}")
    });

    // (2) UDP over IPv4.
    let udp_stop = Arc::new(AtomicBool::new(false));
    let udp_log = Arc::new(Mutex::new(Vec::new()));
    let udp_server = start_udp(&b_ns, UDP_PORT, true, udp_stop.clone(), udp_log.clone());
    let req = b"hello-beta-over-ipv4";
    match udp_request(&a_ns, SocketAddrV4::new(b4, UDP_PORT), req, 10) {
        Ok((reply, src, rtt, tries)) => {
            println!("(2) UDP a -> {b4}:{UDP_PORT}: answer {:?} from {src}, RTT {rtt:.1?}, attempt {tries}", String::from_utf8_lossy(&reply));
            let mut want = b"answer:".to_vec();
            want.extend_from_slice(req);
            checks.check(reply == want && src == SocketAddr::new(b4.into(), UDP_PORT), || {
                format!("(2) UDP answer {:?} from {src}, want {:?} from {b4}:{UDP_PORT}", String::from_utf8_lossy(&reply), String::from_utf8_lossy(&want))
            });
        }
        Err(e) => {
            checks.check(false, || format!("(2) UDP a -> {b4}:{UDP_PORT}: {e}"));
        }
    }
    udp_stop.store(true, Ordering::SeqCst);
    udp_server.join().expect("UDP server thread panicked");
    let seen: Vec<SocketAddr> = udp_log.lock().unwrap().iter().map(|(f, _)| *f).collect();
    println!("(2) UDP server on b saw sources {seen:?}");
    checks.check(!seen.is_empty() && seen.iter().all(|f| f.ip() == IpAddr::V4(a4)), || {
        format!("(2) the UDP server should see alpha's {a4} as source: {seen:?}")
    });

    // (3) meshtun ping by IPv4, and status.
    let b4s = b4.to_string();
    let out = cli(&a_ns, &["ping", &b4s, "-c", "1", "--socket", &sock(&a)]);
    println!("(3) meshtun ping {b4s} -c 1: {} in {:.0?}: {}", out.code().map_or("no exit".into(), |c| format!("exit {c}")), out.elapsed, first_line(&out));
    checks.check(out.success(), || format!("(3) meshtun ping {b4s} -c 1 failed: {}", out.describe()));
    let out = cli(&a_ns, &["ping", &b4s, "-c", "1", "--json", "--socket", &sock(&a)]);
    match json_data(&out) {
        Ok(d) => println!("(3) meshtun ping --json: {d}"),
        Err(e) => {
            checks.check(false, || format!("(3) meshtun ping {b4s} -c 1 --json: {e}"));
        }
    }
    if let Some(d) = checks.ok(a.status(), "(3) status of a") {
        let own = d["ipv4"].as_str().map(str::to_string);
        let peers = d["peers"].as_array().cloned().unwrap_or_default();
        let listed: Vec<(String, String)> = peers
            .iter()
            .map(|p| (p["address"].as_str().unwrap_or("?").into(), p["ipv4"].as_str().unwrap_or("<none>").into()))
            .collect();
        println!("(3) status of a: ipv4 {own:?}; peers (address, ipv4) {listed:?}");
        checks.check(own.as_deref() == Some(a4.to_string().as_str()), || format!("(3) status data.ipv4 of a is {own:?}, want {a4}"));
        checks.check(listed.iter().any(|(addr, v4)| *addr == b.id.address && *v4 == b4s), || {
            format!("(3) status of a should list beta {} with ipv4 {b4}: {listed:?}", b.id.address)
        });
    }

    // (4) spoofed source from c, inside c's own WireGuard session to b.
    let sp_stop = Arc::new(AtomicBool::new(false));
    let sp_log = Arc::new(Mutex::new(Vec::<(SocketAddr, Vec<u8>)>::new()));
    let sp_server = start_udp(&b_ns, SPOOF_PORT, false, sp_stop.clone(), sp_log.clone());
    let spoof_before = checks.ok(spoofed_drops(&b), "(4) b's spoofed_source before");
    let to_b = SocketAddrV4::new(b4, SPOOF_PORT);
    let has = |log: &Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>, m: &[u8]| log.lock().unwrap().iter().any(|(_, p)| p == m);
    let legit1 = [LEGIT_MARKER, b"-1"].concat();
    let t = Instant::now();
    let mut sent = 0;
    let legit_ok = poll_until(Duration::from_secs(10), "c's first legit datagram to reach b", || {
        if sent == 0 || t.elapsed().as_millis() / 500 >= sent {
            udp_send(&c_ns, to_b, &legit1)?;
            sent += 1;
        }
        if has(&sp_log, &legit1) { Ok(()) } else { Err(format!("{sent} sent, b saw {:?}", sp_log.lock().unwrap())) }
    });
    println!("(4) legit c -> {to_b}: arrived after {:.1?} ({sent} sent)", t.elapsed());
    checks.ok(legit_ok, "(4) legit session c -> b");

    let pkt = ipv4_udp_packet(a4, b4, 4444, SPOOF_PORT, 0x5151, SPOOF_MARKER);
    let mut spoofs_sent = 0;
    for _ in 0..3 {
        match raw_send(&c_ns, &pkt, b4) {
            Ok(_) => spoofs_sent += 1,
            Err(e) => {
                checks.check(false, || format!("(4) raw send in c: {e}"));
            }
        }
    }
    // A legit datagram after the spoofed ones: once it is in, anything the
    // spoofed packets could have done is done too.
    let legit2 = [LEGIT_MARKER, b"-2"].concat();
    let _ = udp_send(&c_ns, to_b, &legit2);
    let sentinel = poll_until(Duration::from_secs(5), "c's second legit datagram to reach b", || {
        if has(&sp_log, &legit2) { Ok(()) } else { Err(format!("b saw {:?}", sp_log.lock().unwrap())) }
    });
    checks.ok(sentinel, "(4) legit datagram after the spoofed ones");
    let spoof_after = match spoof_before {
        Some(before) => poll_until(Duration::from_secs(5), "b's spoofed_source counter to grow", || {
            let now = spoofed_drops(&b)?;
            if now > before { Ok(now) } else { Err(format!("still {now}")) }
        }),
        None => Err("no baseline".into()),
    };
    thread::sleep(Duration::from_millis(300));
    sp_stop.store(true, Ordering::SeqCst);
    sp_server.join().expect("spoof listener thread panicked");
    let log = sp_log.lock().unwrap().clone();
    let seen: Vec<(SocketAddr, String)> = log.iter().map(|(f, p)| (*f, String::from_utf8_lossy(p).into_owned())).collect();
    let c_peer_b = c.peer(&b.id.address).ok().flatten();
    println!(
        "(4) sent {spoofs_sent} spoofed packets ({} B, src {a4} -> dst {b4}:{SPOOF_PORT}) from c; b's listener saw {seen:?}; b's spoofed_source {spoof_before:?} -> {spoof_after:?}; c's peer entry for b: {}",
        pkt.len(),
        c_peer_b.map(|p| p.to_string()).unwrap_or_else(|| "<none>".into())
    );
    checks.check(!log.iter().any(|(f, p)| p == SPOOF_MARKER || f.ip() == IpAddr::V4(a4)), || {
        format!("(4) b's listener received the spoofed packet: {seen:?}")
    });
    checks.check(log.iter().all(|(f, _)| f.ip() == IpAddr::V4(c4)), || format!("(4) every datagram on :{SPOOF_PORT} should come from gamma's {c4}: {seen:?}"));
    checks.ok(spoof_after, "(4) b's stats.dropped.spoofed_source");

    for n in [&a, &b, &c] {
        n.proc.assert_running("after the checks");
    }
    let took = started.elapsed();
    println!("total run time {took:.2?} (budget {BUDGET:?})");
    checks.check(took < BUDGET, || format!("the test took {took:.1?}, budget {BUDGET:?}"));
    checks.finish();
}
