//! End-to-end tests in network namespaces: a backbone and two nodes on one
//! bridge, real TUN devices, real TCP over the mesh.
//!
//! Needs root (namespaces, veth, TUN), `ip` (iproute2) and `ping`
//! (iputils-ping). Without root every test prints "skipping: needs root" and
//! passes. Run with:
//!
//!     cargo test --test netns_e2e -- --nocapture
//!
//! Topology (all in 198.18.0.0/15, namespaces `mt-{pid}-{test}-{role}`):
//!
//!     bb 198.18.0.1 ─┐
//!     a  198.18.0.2 ─┼─ sw (bridge br0; packet capture runs here)
//!     b  198.18.0.3 ─┘

mod harness;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use harness::meshtun::{bin, cli, cli_timeout, Backbone, Node, NodeOpts};
use harness::{poll_until, require_root, require_tool, wait_until, Capture, Checks, CmdOutput, Lab, Ns, Switch};
use serde_json::Value;

const MARKER: &[u8] = b"MESHTUN-PLAINTEXT-MARKER-";
const BB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const DECOY_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 9, 1);
const BB_PORT: u16 = 7400;
const RECORD_TTL: u64 = 6;
const HEARTBEAT: u64 = 2;
const TCP_BYTES: usize = 3 * 512 * 1024; // 1.5 MiB
const ONE_MIB: usize = 1024 * 1024;

/// The lab, the backbone and the nodes. The lab is declared last so it is
/// dropped last (it stops the processes and deletes the namespaces).
struct Mesh {
    sw: Switch,
    bb_ns: Ns,
    a_ns: Ns,
    b_ns: Option<Ns>,
    backbone: Backbone,
    a: Node,
    b: Option<Node>,
    lab: Lab,
}

fn setup_mesh(short: &str, with_b: bool) -> Mesh {
    require_tool("ping", "iputils-ping");
    let lab = Lab::new(short);
    let sw = lab.add_switch("sw", "br0");
    let bb_ns = lab.add_host("bb", &sw, "198.18.0.1/24");
    let a_ns = lab.add_host("a", &sw, "198.18.0.2/24");
    let b_ns = with_b.then(|| lab.add_host("b", &sw, "198.18.0.3/24"));

    // Another VPN's tunnel on alpha: its address must never become a
    // candidate (a path through it has a smaller MTU; see udp::local_endpoints).
    a_ns.exec_ok(&["ip", "tuntap", "add", "dev", "decoy0", "mode", "tun"]);
    a_ns.exec_ok(&["ip", "addr", "add", &format!("{DECOY_IP}/24"), "dev", "decoy0"]);
    a_ns.exec_ok(&["ip", "link", "set", "decoy0", "up"]);

    let bb_addr = SocketAddr::new(BB_IP.into(), BB_PORT);
    let t = Instant::now();
    let backbone = Backbone::start(&lab, &bb_ns, bb_addr, Some(RECORD_TTL));
    println!("[setup] backbone answering after {:.2?}", t.elapsed());

    let opts = |h| NodeOpts {
        heartbeat_secs: Some(HEARTBEAT),
        ..NodeOpts::new(h)
    };
    let a = Node::start(&lab, &a_ns, bb_addr, opts("alpha"));
    let b = b_ns.as_ref().map(|ns| Node::start(&lab, ns, bb_addr, opts("beta")));
    println!("[setup] alpha: {} {} key {}", a.id.address, a.id.ipv6, a.id.public_key);
    if let Some(b) = &b {
        println!("[setup] beta:  {} {} key {}", b.id.address, b.id.ipv6, b.id.public_key);
        assert_ne!(a.id.address, b.id.address, "two state dirs produced the same address");
    }
    let t = Instant::now();
    a.wait_registered(Duration::from_secs(15));
    if let Some(b) = &b {
        b.wait_registered(Duration::from_secs(15));
    }
    println!("[setup] nodes registered, interfaces configured after {:.2?}", t.elapsed());
    Mesh {
        sw,
        bb_ns,
        a_ns,
        b_ns,
        backbone,
        a,
        b,
        lab,
    }
}

fn ping6(ns: &Ns, target: Ipv6Addr, count: u32, wait_s: u32) -> CmdOutput {
    ns.exec_timeout(
        &["ping", "-6", "-n", "-c", &count.to_string(), "-W", &wait_s.to_string(), &target.to_string()],
        Duration::from_secs(30),
    )
}

/// "3 packets transmitted, 3 received, ..." and the rtt line, for the log.
fn ping_summary(out: &CmdOutput) -> String {
    out.stdout
        .lines()
        .filter(|l| l.contains("transmitted") || l.starts_with("rtt"))
        .collect::<Vec<_>>()
        .join(" | ")
}

fn str_field<'v>(v: &'v Value, k: &str) -> Option<&'v str> {
    v.get(k).and_then(Value::as_str)
}

/// Sends `data` from namespace `from` to `[to_ip]:port` and reads the echo.
fn tcp_echo_roundtrip(from: &Ns, to_ip: Ipv6Addr, port: u16, data: &[u8]) -> Result<(Vec<u8>, Duration), String> {
    from.in_netns(|| {
        let addr = SocketAddr::new(to_ip.into(), port);
        let t = Instant::now();
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("connect to [{to_ip}]:{port}: {e}"))?;
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
            match read {
                Ok(_) => {}
                Err(e) => {
                    return Err(format!(
                        "read failed after {} of {} echoed bytes ({:.1?}): {e}; writer: {wres:?}",
                        echoed.len(),
                        data.len(),
                        t.elapsed()
                    ))
                }
            }
            wres?;
            Ok((echoed, t.elapsed()))
        })
    })
}

/// Starts a one-connection TCP echo server on `[ip]:port` inside `ns`;
/// returns once it listens. The handle yields the number of bytes echoed.
fn start_echo_server(ns: &Ns, ip: Ipv6Addr, port: u16) -> thread::JoinHandle<Result<usize, String>> {
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
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err("no connection accepted within 40 s".into());
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).map_err(|e| format!("server read after {total} bytes: {e}"))?;
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).map_err(|e| format!("server write after {total} bytes: {e}"))?;
            total += n;
        }
        s.shutdown(Shutdown::Write).map_err(|e| format!("server shutdown: {e}"))?;
        Ok(total)
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => h,
        Ok(Err(e)) => panic!("echo server in {}: {e}", ns.name()),
        Err(_) => panic!("echo server in {} did not start", ns.name()),
    }
}

#[test]
fn two_hosts_talk_tcp_over_the_mesh_through_a_backbone() {
    if !require_root("two_hosts_talk_tcp_over_the_mesh_through_a_backbone") {
        return;
    }
    let m = setup_mesh("tcp", true);
    let (a, b) = (&m.a, m.b.as_ref().unwrap());
    let b_ns = m.b_ns.as_ref().unwrap();

    // (a) ICMPv6 over the mesh; the first probes may be lost during setup.
    let t = Instant::now();
    let first_ping = t;
    let mut attempts = 0;
    let ok = wait_until(Duration::from_secs(10), &format!("ping -6 from a to beta's {}", b.id.ipv6), || {
        attempts += 1;
        a.proc.check_running()?;
        b.proc.check_running()?;
        let out = ping6(&m.a_ns, b.id.ipv6, 3, 2);
        if out.success() {
            Ok(out)
        } else {
            Err(out.describe())
        }
    });
    println!(
        "(a) ping a -> {} ok after {:.1?} ({attempts} attempt(s)): {}",
        b.id.ipv6,
        t.elapsed(),
        ping_summary(&ok)
    );

    // (c, positive control) the capture sees a plaintext marker sent on the
    // underlay, so the "never saw the marker" check below can fail.
    let cap = Capture::start(m.sw.ns.name(), None);
    m.a_ns.in_netns(|| {
        let s = UdpSocket::bind((A_IP, 0)).expect("bind udp on a's underlay");
        s.send_to(&MARKER.repeat(4), (B_IP, 9)).expect("send control datagram");
    });
    thread::sleep(Duration::from_millis(300));
    let control = cap.stop();
    let control_hits = control.frames_containing(MARKER);
    println!(
        "(c) control capture: {} frames, {} with the marker, error {:?}",
        control.frames.len(),
        control_hits,
        control.error
    );
    assert!(
        control_hits >= 1,
        "capture self-check failed: a plaintext UDP datagram with the marker from a to b was not seen on the bridge ({} frames captured, error {:?})",
        control.frames.len(),
        control.error
    );

    // (b) TCP echo over the mesh while capturing on the bridge.
    let seed = std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64 ^ 0x6d65_7368;
    let data = harness::marked_random_bytes(TCP_BYTES, seed, MARKER, 256);
    let sent_hash = blake3::hash(&data);
    let server = start_echo_server(b_ns, b.id.ipv6, 8080);
    let cap = Capture::start(m.sw.ns.name(), None);
    let client = tcp_echo_roundtrip(&m.a_ns, b.id.ipv6, 8080, &data);
    let capture = cap.stop();
    let server_res = server.join().expect("echo server thread panicked");
    let (echoed, took) = client.unwrap_or_else(|e| {
        panic!("(b) TCP client a -> [{}]:8080 failed: {e}; server: {server_res:?}", b.id.ipv6)
    });
    let echoed_hash = blake3::hash(&echoed);
    println!(
        "(b) TCP echo: sent {} B (blake3 {}), got {} B (blake3 {}), server echoed {:?}, {:.2?}, {:.1} Mbit/s each way",
        data.len(),
        &sent_hash.to_hex()[..16],
        echoed.len(),
        &echoed_hash.to_hex()[..16],
        server_res,
        took,
        data.len() as f64 * 8.0 / took.as_secs_f64() / 1e6
    );
    assert_eq!(server_res, Ok(data.len()), "(b) server did not echo every byte");
    assert_eq!(echoed.len(), data.len(), "(b) echoed length differs");
    assert!(echoed_hash == sent_hash, "(b) echoed bytes differ from the sent bytes (blake3 mismatch)");
    // Bulk TCP went through the TUN offloads: the kernel handed the engines
    // TCP super-packets to split (and they arrived intact, checked above).
    let offload: Vec<Value> = [&a, &b].iter().map(|n| n.status().map(|st| st["offload"].clone()).unwrap_or_default()).collect();
    println!("(b) offloads: alpha {} / bravo {}", offload[0], offload[1]);
    let split: u64 = offload.iter().map(|o| o["counters"]["tun_super_packets_read"].as_u64().unwrap_or(0)).sum();
    assert!(split > 0, "(b) 1.5 MiB of TCP crossed the mesh without one TCP super-packet from the TUN: offload is off? {offload:?}");
    // The peers' data went on sockets connected to each other (what the
    // capture in (c) sees: a<->b flows on the nodes' one port either way).
    let connected: Vec<u64> = offload.iter().map(|o| o["connected_sockets"].as_u64().unwrap_or(0)).collect();
    assert!(connected.iter().all(|&n| n >= 1), "(b) neither engine kept a socket connected to its peer for the TCP echo: {connected:?}");

    // From here on the checks are independent: collect every failure.
    let mut checks = Checks::new();

    // (c) what crossed the bridge.
    let ab = capture.udp_between(A_IP, B_IP);
    let via_bb_a = capture.udp_between(A_IP, BB_IP);
    let via_bb_b = capture.udp_between(B_IP, BB_IP);
    let hits = capture.frames_containing(MARKER);
    println!(
        "(c) capture: {} frames / {} B total; UDP a<->b {} frames / {} B flows {:?}; UDP a<->bb {} B, b<->bb {} B; marker frames {}; kernel drops {}, truncated {}, error {:?}",
        capture.frames.len(),
        capture.total_bytes(),
        ab.frames,
        ab.bytes,
        ab.flows,
        via_bb_a.bytes,
        via_bb_b.bytes,
        hits,
        capture.kernel_drops,
        capture.truncated,
        capture.error
    );
    checks.check(capture.error.is_none(), || format!("(c) capture error: {:?}", capture.error));
    checks.check(ab.bytes > ONE_MIB, || {
        format!(
            "(c) expected > 1 MiB of UDP between a and b on the bridge (direct path), saw {} B (a<->bb {} B, b<->bb {} B)",
            ab.bytes, via_bb_a.bytes, via_bb_b.bytes
        )
    });
    checks.check(hits == 0, || {
        format!("(c) the plaintext marker crossed the bridge in {hits} frame(s): traffic is not encrypted")
    });

    // (d) status: the backbone knows both nodes; a knows b with an endpoint.
    if let Some(records) = checks.ok(m.backbone.records(), "(d) backbone status") {
        println!("(d) backbone records: {}", Value::Array(records.clone()));
        for (node, host) in [(a, "alpha"), (b, "beta")] {
            let r = records.iter().find(|r| str_field(r, "address") == Some(node.id.address.as_str()));
            if !checks.check(r.is_some(), || {
                format!("(d) backbone does not list {host} ({}): {records:?}", node.id.address)
            }) {
                continue;
            }
            let r = r.unwrap();
            checks.check(str_field(r, "hostname") == Some(host), || {
                format!("(d) backbone record of {} should have hostname {host:?}: {r}", node.id.address)
            });
            let v6: Option<Ipv6Addr> = str_field(r, "ipv6").and_then(|s| s.parse().ok());
            checks.check(v6 == Some(node.id.ipv6), || {
                format!("(d) backbone record of {host} should have ipv6 {}: {r}", node.id.ipv6)
            });
        }
    }
    if let Some(st) = checks.ok(a.status(), "(d) alpha's status") {
        let endpoints = st["endpoints"].to_string();
        checks.check(endpoints.contains(&A_IP.to_string()) && !endpoints.contains(&DECOY_IP.to_string()), || {
            format!("(d) alpha must advertise its underlay {A_IP} and not the tunnel address {DECOY_IP}: {endpoints}")
        });
    }
    match a.peer(&b.id.address) {
        Err(e) => {
            checks.check(false, || format!("(d) alpha's status: {e}"));
        }
        Ok(None) => {
            checks.check(false, || {
                format!("(d) alpha's status lists no peer {}: {:?}", b.id.address, a.status())
            });
        }
        Ok(Some(peer)) => {
            println!("(d) alpha's peer entry for beta: {peer}");
            checks.check(peer.get("endpoint").is_some_and(Value::is_string), || {
                format!("(d) alpha's peer beta has no endpoint: {peer}")
            });
            let tx = peer.get("tx_bytes").and_then(Value::as_u64);
            checks.check(tx.is_some_and(|t| t > 0), || {
                format!("(d) alpha's peer beta tx_bytes not > 0: {peer}")
            });
            let v6: Option<Ipv6Addr> = str_field(&peer, "ipv6").and_then(|s| s.parse().ok());
            checks.check(v6 == Some(b.id.ipv6), || format!("(d) alpha's peer entry ipv6 should be {}: {peer}", b.id.ipv6));
        }
    }

    // (f) A conversation in both directions proves the direct path at both
    // ends: no keepalive probes, only the echoes (and at most each end's
    // RTT refresh, a ping, its pong and a ping back) cross the bridge.
    // Past the quick probe rounds, which probe every path for 4 s.
    thread::sleep(Duration::from_secs(6).saturating_sub(first_ping.elapsed()));
    let echoes = 250;
    let cap = Capture::start(m.sw.ns.name(), None);
    let out = m.a_ns.exec_timeout(
        &["ping", "-6", "-n", "-q", "-i", "0.02", "-c", &echoes.to_string(), "-W", "1", &b.id.ipv6.to_string()],
        Duration::from_secs(30),
    );
    let talk = cap.stop().udp_between(A_IP, B_IP);
    let beyond = talk.frames.saturating_sub(2 * echoes);
    println!("(f) {echoes} echoes 20 ms apart: {}; {} UDP frames a<->b, {beyond} besides the echoes", ping_summary(&out), talk.frames);
    checks.check(out.success() && out.stdout.contains(&format!("{echoes} received")), || format!("(f) echoes lost: {}", ping_summary(&out)));
    // With a keepalive a second each way (each drawing a pong and a ping
    // back) this was 37.
    checks.check(beyond <= 12, || format!("(f) {beyond} datagrams besides the echoes crossed between a and b in 5 s of conversation"));

    // (e1) `meshtun down` for b.
    let sock_b = b.socket.to_str().unwrap().to_string();
    let t = Instant::now();
    let down = harness::meshtun::cli(b_ns, &["down", "--socket", &sock_b]);
    println!(
        "(e) `meshtun down` for beta: exit {:?} after {:.2?}; stdout {:?}; stderr {:?}",
        down.code(),
        down.elapsed,
        down.stdout.trim(),
        down.stderr.trim()
    );
    checks.check(down.success(), || format!("(e) `meshtun down` failed: {}", down.describe()));
    check_daemon_stopped(&mut checks, &m, b, "`meshtun down`", t);
    let t = Instant::now();
    let r = poll_until(
        Duration::from_secs(RECORD_TTL + 1),
        "the backbone to drop beta's record (alpha's must stay)",
        || {
            let recs = m.backbone.records()?;
            let has = |n: &Node| recs.iter().any(|r| str_field(r, "address") == Some(n.id.address.as_str()));
            if !has(a) {
                return Err(format!("alpha missing too (status not trustworthy): {recs:?}"));
            }
            if has(b) {
                return Err(format!("beta still listed: {recs:?}"));
            }
            Ok(())
        },
    );
    println!("(e) backbone dropped beta: {r:?} after {:.2?}", t.elapsed());
    checks.ok(r, "(e) after beta's `down`");

    // (e2) SIGTERM for a.
    let t = Instant::now();
    if checks.check(a.proc.signal(libc::SIGTERM), || {
        format!("(e) alpha's daemon had already exited before SIGTERM:\n{}", a.proc.log_tail(30))
    }) {
        check_daemon_stopped(&mut checks, &m, a, "SIGTERM", t);
        let t = Instant::now();
        let r = poll_until(Duration::from_secs(RECORD_TTL + 1), "the backbone to drop alpha's record", || {
            m.backbone.proc.check_running()?;
            let recs = m.backbone.records()?;
            if recs.iter().any(|r| str_field(r, "address") == Some(a.id.address.as_str())) {
                Err(format!("alpha still listed: {recs:?}"))
            } else {
                Ok(())
            }
        });
        println!("(e) backbone dropped alpha: {r:?} after {:.2?}", t.elapsed());
        checks.ok(r, "(e) after alpha's SIGTERM");
    }
    let _ = (&m.bb_ns, &m.lab);
    checks.finish();
}

/// After `how` (started at `t`): the daemon exits 0 within 10 s and its
/// interface is gone.
fn check_daemon_stopped(checks: &mut Checks, m: &Mesh, n: &Node, how: &str, t: Instant) {
    let who = &n.hostname;
    match n.proc.wait_timeout(Duration::from_secs(10)) {
        None => {
            checks.check(false, || format!("(e) {who}'s daemon still running 10 s after {how}"));
        }
        Some(st) => {
            println!("(e) {who}'s daemon {} {:.2?} after {how}", harness::describe_status(st), t.elapsed());
            checks.check(st.code() == Some(0), || {
                format!(
                    "(e) {who}'s daemon did not exit 0 after {how}: {}\n{}",
                    harness::describe_status(st),
                    n.proc.log_tail(30)
                )
            });
        }
    }
    let link = harness::ip(&["-n", n.ns.name(), "link", "show", &n.interface]);
    checks.check(!link.success(), || {
        format!("(e) {} still exists in {} after {how}: {}", n.interface, n.ns.role(), link.describe())
    });
    let _ = m;
}
#[test]
fn ping_to_an_unregistered_mesh_address_fails_fast_with_unreachable() {
    if !require_root("ping_to_an_unregistered_mesh_address_fails_fast_with_unreachable") {
        return;
    }
    let m = setup_mesh("unr", false);
    let a = &m.a;
    let target: Ipv6Addr = "fd4d:6573:6874:0:0:1234:5678:9abc".parse().unwrap();
    assert_ne!(target, a.id.ipv6);

    // The probe must actually enter the mesh interface, or a kernel
    // "network unreachable" would make this test pass vacuously.
    let route = harness::ip(&["-n", m.a_ns.name(), "-6", "route", "get", &target.to_string()]);
    println!("route to {target} in a: {}", route.stdout.trim());
    assert!(
        route.success() && route.stdout.contains(&format!("dev {}", a.interface)),
        "no route to {target} via {} in a: {}",
        a.interface,
        route.describe()
    );

    let out = ping6(&m.a_ns, target, 1, 8);
    let unreachable = out.stdout.to_lowercase().contains("unreachable") || out.stderr.to_lowercase().contains("unreachable");
    println!(
        "ping {target}: exit {:?} after {:.2?}; ICMPv6 unreachable reported: {unreachable}; {}\nstdout: {}\nstderr: {}",
        out.code(),
        out.elapsed,
        ping_summary(&out),
        out.stdout.trim(),
        out.stderr.trim()
    );
    assert!(!out.timed_out, "ping did not finish: {}", out.describe());
    assert!(!out.success(), "ping to an unregistered mesh address succeeded: {}", out.describe());
    assert!(out.elapsed < Duration::from_secs(10), "ping took {:.1?} to fail (limit 10 s)", out.elapsed);

    a.proc.assert_running("after pinging an unregistered address");
    let st = a.status().unwrap_or_else(|e| panic!("alpha's status after the failed ping: {e}"));
    assert_eq!(str_field(&st, "role"), Some("node"), "alpha's status: {st}");
    assert_eq!(
        a.backbone_state().unwrap_or_else(|e| panic!("{e}")),
        "registered",
        "alpha lost its backbone registration"
    );
    let _ = (&m.sw, &m.bb_ns, &m.b_ns, &m.b, &m.backbone, &m.lab);
}

/// The errors a user hits first (issue 2, item 7) come as one line with a
/// stable code and a hint, and leave nothing behind: no capability, an
/// interface name already taken, and a backbone nobody answers at (the
/// daemon keeps trying and says so in `status`).
#[test]
fn up_explains_what_is_wrong_when_it_cannot_work() {
    if !require_root("up_explains_what_is_wrong_when_it_cannot_work") {
        return;
    }
    require_tool("setpriv", "util-linux");
    let lab = Lab::new("uperr");
    let sw = lab.add_switch("sw", "br0");
    let ns = lab.add_host("a", &sw, "198.18.0.2/24");
    // Nothing listens here: the address is on the segment but unused.
    let silent = format!("{}:{BB_PORT}", Ipv4Addr::new(198, 18, 0, 9));
    let envelope = |out: &CmdOutput| -> Value {
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("not a JSON envelope ({e}): {}", out.describe()))
    };

    // (1) Not root: refused before anything is written to the state dir.
    let scratch = lab.path("nobody");
    std::fs::create_dir_all(&scratch).unwrap();
    ns.exec_ok(&["chown", "65534:65534", scratch.to_str().unwrap()]);
    let state = scratch.join("state");
    let sock = scratch.join("n.sock");
    let out = ns.exec(&[
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", bin(), "up", "--backbone", &silent,
        "--state-dir", state.to_str().unwrap(), "--socket", sock.to_str().unwrap(), "--json",
    ]);
    let v = envelope(&out);
    println!("(not root) {}", out.stdout.trim());
    assert!(!out.success(), "up as nobody succeeded: {}", out.describe());
    assert_eq!(v["code"], "not_root", "{v}");
    assert!(v["hint"].as_str().is_some_and(|h| h.contains("sudo") && h.contains("setcap")), "{v}");
    assert!(!state.exists(), "up as nobody created {}", state.display());

    // (2) The interface name is taken.
    ns.exec_ok(&["ip", "tuntap", "add", "dev", "mtbusy0", "mode", "tun"]);
    let st = lab.path("state-busy");
    let out = cli_timeout(
        &ns,
        &["up", "--backbone", &silent, "--interface", "mtbusy0", "--state-dir", st.to_str().unwrap(), "--socket", lab.path("busy.sock").to_str().unwrap(), "--json"],
        Duration::from_secs(20),
    );
    let v = envelope(&out);
    println!("(interface busy) {}", out.stdout.trim());
    assert!(!out.success() && !out.timed_out, "up on a taken interface: {}", out.describe());
    assert_eq!(v["code"], "interface_busy", "{v}");
    assert!(v["hint"].as_str().is_some_and(|h| h.contains("--interface")), "{v}");
    assert!(ns.exec(&["ip", "link", "show", "mtbusy0"]).success(), "the existing interface must be left alone");

    // (3) The backbone never answers: the daemon stays up, keeps trying
    // with backoff, and status says so.
    let node = Node::start(&lab, &ns, silent.parse().unwrap(), NodeOpts { heartbeat_secs: Some(HEARTBEAT), ..NodeOpts::new("alpha") });
    let seen = poll_until(Duration::from_secs(20), "status to report the backbone unreachable", || {
        node.proc.check_running()?;
        let st = node.status()?;
        let b = &st["backbones"][0];
        let state = b["state"].as_str().unwrap_or("");
        if state != "registered" && b["last_error"].is_string() {
            Ok(b.clone())
        } else {
            Err(format!("backbone entry: {b}"))
        }
    });
    let b = seen.unwrap_or_else(|e| panic!("{e}"));
    println!("(backbone unreachable) status: {b}");
    let text = cli(&ns, &["status", "--socket", node.socket.to_str().unwrap()]);
    println!("(backbone unreachable) text status:\n{}", text.stdout);
    assert!(text.stdout.contains(&silent), "text status should name the backbone: {}", text.describe());
    node.proc.assert_running("while its backbone is unreachable");
    let _ = (&sw, &lab);
}

/// The harness itself (no meshtun binary involved).
#[test]
fn lab_namespaces_reach_each_other_and_are_removed_afterwards() {
    if !require_root("lab_namespaces_reach_each_other_and_are_removed_afterwards") {
        return;
    }
    require_tool("ping", "iputils-ping");
    let lab = Lab::new("lab");
    let sw = lab.add_switch("sw", "br0");
    let h1 = lab.add_host("h1", &sw, "198.18.0.1/24");
    let h2 = lab.add_host("h2", &sw, "198.18.0.2/24");
    let names = lab.namespace_names();
    let dir = lab.dir().to_path_buf();
    assert_eq!(names.len(), 3);
    for n in &names {
        assert!(n.starts_with(&format!("mt-{}-lab-", std::process::id())), "{n}");
        assert!(harness::netns_path(n).exists(), "{n} not in /run/netns");
    }

    // Underlay ping (ARP may need a moment).
    let out = wait_until(Duration::from_secs(5), "h1 to ping h2 on the underlay", || {
        let o = h1.exec(&["ping", "-n", "-c", "1", "-W", "1", "198.18.0.2"]);
        if o.success() { Ok(o) } else { Err(o.describe()) }
    });
    println!("underlay ping: {}", ping_summary(&out));
    // An address that is nobody's must not answer (the ping check can fail).
    let dead = h1.exec(&["ping", "-n", "-c", "1", "-W", "1", "198.18.0.99"]);
    assert!(!dead.success(), "ping to an unused address succeeded: {}", dead.describe());

    // in_netns: 198.18.0.2 exists only in h2, so binding it proves the thread
    // is inside h2; the client connects from h1.
    let unbound = TcpListener::bind((Ipv4Addr::new(198, 18, 0, 2), 0));
    assert!(unbound.is_err(), "198.18.0.2 is bindable in the test's own namespace: test would be vacuous");
    let listener = h2.in_netns(|| TcpListener::bind((Ipv4Addr::new(198, 18, 0, 2), 0)).expect("bind in h2"));
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v).unwrap();
        (peer, v)
    });

    let cap = Capture::start(sw.ns.name(), None);
    h1.in_netns(|| {
        let mut c = TcpStream::connect_timeout(&SocketAddr::from(([198, 18, 0, 2], port)), Duration::from_secs(5))
            .expect("connect from h1");
        c.write_all(MARKER).unwrap();
    });
    let (peer, got) = server.join().unwrap();
    thread::sleep(Duration::from_millis(200));
    let res = cap.stop();
    assert_eq!(peer.ip(), Ipv4Addr::new(198, 18, 0, 1), "client was not in h1");
    assert_eq!(got, MARKER);
    let hits = res.frames_containing(MARKER);
    println!("capture: {} frames, {} B, marker frames {hits}, drops {}", res.frames.len(), res.total_bytes(), res.kernel_drops);
    // Counted once per frame (outgoing copies skipped): exactly one data segment.
    assert_eq!(hits, 1, "capture saw the marker in {hits} frames (want exactly 1)");
    assert_eq!(res.frames_containing(b"NOT-SENT-ANYWHERE-7f3a"), 0);

    // UDP accounting.
    let cap = Capture::start(sw.ns.name(), None);
    h1.in_netns(|| {
        let s = UdpSocket::bind((Ipv4Addr::new(198, 18, 0, 1), 40000)).unwrap();
        for _ in 0..5 {
            s.send_to(&[0u8; 1000], (Ipv4Addr::new(198, 18, 0, 2), 40001)).unwrap();
        }
    });
    thread::sleep(Duration::from_millis(200));
    let res = cap.stop();
    let st = res.udp_between(Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 1));
    println!("udp: {st:?}");
    assert_eq!(st.frames, 5);
    assert_eq!(st.bytes, 5 * (14 + 20 + 8 + 1000));
    assert!(st.flows.contains(&("198.18.0.1:40000".to_string(), "198.18.0.2:40001".to_string())));

    // spawn: runs inside the namespace, is the program itself, and is stopped.
    let p = h1.spawn("sleeper", &["sleep", "300"]);
    let pid = p.pid();
    wait_until(Duration::from_secs(5), "the spawned process to exec `sleep`", || {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).map_err(|e| e.to_string())?;
        if comm.trim() == "sleep" { Ok(()) } else { Err(format!("comm {comm:?}")) }
    });
    let ns_ino = std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino();
    assert_eq!(ns_ino, h1.inode(), "spawned process is not in h1's namespace");
    assert!(harness::pid_exists(pid));

    drop(lab);
    assert!(!harness::pid_exists(pid), "pid {pid} still exists after the lab was dropped");
    let list = harness::ip(&["netns", "list"]).ok().stdout;
    for n in &names {
        assert!(!harness::netns_path(n).exists(), "{n} still in /run/netns after drop");
        assert!(!list.lines().any(|l| l.split_whitespace().next() == Some(n)), "{n} still in `ip netns list`");
    }
    assert!(!dir.exists(), "lab dir {} left behind", dir.display());
}

/// `wait_until` names what it waited for and the last observed state.
#[test]
fn wait_until_panics_naming_what_and_last_state() {
    let r = std::panic::catch_unwind(|| {
        let mut n = 0;
        wait_until(Duration::from_millis(300), "the frobnicator", || -> Result<(), String> {
            n += 1;
            Err(format!("state {n}"))
        })
    });
    let msg = r.expect_err("must time out");
    let msg = msg
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(msg.contains("the frobnicator") && msg.contains("last observed state: state "), "{msg}");
    let v = wait_until(Duration::from_secs(1), "x", || Ok::<_, String>(7));
    assert_eq!(v, 7);
}

/// A panicking test still leaves no namespace or process behind.
#[test]
fn lab_cleans_up_when_the_test_panics() {
    if !require_root("lab_cleans_up_when_the_test_panics") {
        return;
    }
    let seen = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = Lab::new("pan");
        let sw = lab.add_switch("sw", "br0");
        let h = lab.add_host("h", &sw, "198.18.0.1/24");
        // A process that ignores SIGTERM exercises the SIGKILL fallback.
        // Its child `sleep` (pid echoed to the log) must go too.
        let p = h.spawn("stubborn", &["sh", "-c", "trap '' TERM; sleep 300 & echo $!; wait"]);
        let child: u32 = wait_until(Duration::from_secs(5), "the stubborn shell to log its child's pid", || {
            p.log().trim().parse::<u32>().map_err(|e| format!("log {:?}: {e}", p.log()))
        });
        *seen.lock().unwrap() = Some((lab.namespace_names(), [p.pid(), child], lab.dir().to_path_buf()));
        panic!("deliberate failure inside a lab");
    }));
    assert!(r.is_err());
    let (names, pids, dir) = seen.into_inner().unwrap().expect("lab was built");
    for n in &names {
        assert!(!harness::netns_path(n).exists(), "{n} left behind after a panic");
    }
    for pid in pids {
        // The orphaned grandchild is reaped by init, asynchronously.
        wait_until(Duration::from_secs(3), &format!("pid {pid} to disappear"), || {
            if harness::pid_exists(pid) { Err("still exists".into()) } else { Ok(()) }
        });
    }
    assert!(dir.exists(), "lab dir should be kept after a failure");
    let _ = std::fs::remove_dir_all(&dir);
}
