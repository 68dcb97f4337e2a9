//! A backbone outage loses nothing (issue 9, item 4), end to end in network
//! namespaces with the real binary:
//!
//! * a TCP transfer between two nodes runs while the backbone is killed
//!   (SIGKILL: a crash, not a clean stop) and restarted, and completes intact;
//! * the restarted backbone reloads the hostname bindings it persisted, so a
//!   third party cannot take a name in the restart window (tried while one
//!   owner is still cut off from the backbone, so the binding can only come
//!   from the state directory);
//! * every node is registered again, and found again by name, within one
//!   heartbeat interval of the backbone (or its path to it) coming back;
//! * a node restart keeps its address and hostname.
//!
//! Needs root; without it the test prints "skipping" and passes. Run with:
//!
//!     cargo test --test netns_backbone_restart -- --nocapture
//!
//! Topology (198.18.0.0/24 on one bridge): bb .1, alpha .2, beta .3, thief .4.

mod harness;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harness::meshtun::{bin, cli, json_data, Backbone, Node, NodeOpts};
use harness::{ip, poll_until, require_root, wait_until, Checks, Lab, Ns};
use meshtun_addr::NetworkId;
use meshtun_proto::{Identity, Message, NodeRecord, RejectCode, SignedRecord};

const BB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const BB_PORT: u16 = 7400;
/// Short, so the test is quick; the property is relative to it.
const HEARTBEAT: u64 = 3;
const RECORD_TTL: u64 = 9;
/// Scheduling slack on a loaded 2-core machine (delays are measured from
/// the backbone's own registration times, not from when a poll saw them).
const POLL_SLACK: Duration = Duration::from_millis(300);
/// A `meshtun resolve` round trip (a debug build, on a loaded machine).
const RESOLVE_SLACK: Duration = Duration::from_secs(1);
const TRANSFER_BYTES: usize = 24 * 1024 * 1024;
/// Paced so the transfer spans the whole outage.
const TRANSFER_BYTES_PER_SEC: usize = 2 * 1024 * 1024;
const TCP_PORT: u16 = 5001;

fn start_backbone(lab: &Lab, ns: &Ns, label: &str, state_dir: &std::path::Path) -> Backbone {
    let socket = lab.path(&format!("{label}.sock"));
    let listen = SocketAddr::new(BB_IP.into(), BB_PORT);
    let (listen_s, ttl) = (listen.to_string(), RECORD_TTL.to_string());
    let args = [
        bin(),
        "backbone",
        "--listen",
        &listen_s,
        "--socket",
        socket.to_str().unwrap(),
        "--record-ttl",
        &ttl,
        "--state-dir",
        state_dir.to_str().unwrap(),
    ];
    let proc = ns.spawn_env(label, &args, &[("RUST_LOG", "debug"), ("NO_COLOR", "1")]);
    let bb = Backbone { ns: ns.clone(), proc, socket, listen };
    wait_until(Duration::from_secs(15), "the backbone's status to answer", || {
        bb.proc.check_running()?;
        bb.status().map(|_| ())
    });
    bb
}

fn seq_of(bb: &Backbone, address: &str) -> Result<u64, String> {
    Ok(registration_of(bb, address)?.0)
}

/// The record's sequence number and when the backbone accepted it.
fn registration_of(bb: &Backbone, address: &str) -> Result<(u64, Instant), String> {
    let r = bb.record_of(address)?.ok_or_else(|| format!("no record for {address}"))?;
    let seq = r.get("seq").and_then(|s| s.as_u64()).ok_or_else(|| format!("record without seq: {r}"))?;
    let expires_in = r.get("expires_in_secs").and_then(|s| s.as_f64()).ok_or_else(|| format!("no expiry: {r}"))?;
    let ago = Duration::from_secs(RECORD_TTL).saturating_sub(Duration::from_secs_f64(expires_in.max(0.0)));
    Ok((seq, Instant::now() - ago))
}

fn hostname_holder(bb: &Backbone, name: &str) -> Result<Option<String>, String> {
    Ok(bb
        .records()?
        .into_iter()
        .find(|r| r.get("hostname").and_then(|h| h.as_str()) == Some(name))
        .and_then(|r| r.get("address").and_then(|a| a.as_str()).map(str::to_string)))
}

/// `meshtun resolve NAME` through `node`: the IPv6 it answers.
fn resolve(node: &Node, name: &str) -> Result<Ipv6Addr, String> {
    let out = cli(&node.ns, &["resolve", name, "--json", "--socket", node.socket.to_str().unwrap()]);
    let data = json_data(&out)?;
    data.get("ipv6").and_then(|v| v.as_str()).and_then(|s| s.parse().ok()).ok_or_else(|| format!("no ipv6 in {data}"))
}

/// Receives one connection on `[ip]:port` in `ns`; yields (bytes, BLAKE3).
fn start_sink(ns: &Ns, ip: Ipv6Addr) -> thread::JoinHandle<Result<(usize, [u8; 32]), String>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let h = ns.spawn_in_netns(move || {
        let l = TcpListener::bind(SocketAddr::new(ip.into(), TCP_PORT)).map_err(|e| format!("bind: {e}"))?;
        let _ = ready_tx.send(());
        let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    hasher.update(&buf[..n]);
                    total += n;
                }
                Err(e) => return Err(format!("read after {total} bytes: {e}")),
            }
        }
        Ok((total, *hasher.finalize().as_bytes()))
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("the sink listens");
    h
}

fn payload() -> Vec<u8> {
    let mut out = Vec::with_capacity(TRANSFER_BYTES);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    while out.len() < TRANSFER_BYTES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Sends `data` to `[ip]:port` from `ns` at a steady pace.
fn start_source(ns: &Ns, ip: Ipv6Addr, data: Vec<u8>) -> thread::JoinHandle<Result<Duration, String>> {
    ns.spawn_in_netns(move || {
        let t = Instant::now();
        let mut s = TcpStream::connect_timeout(&SocketAddr::new(ip.into(), TCP_PORT), Duration::from_secs(10))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        for (i, chunk) in data.chunks(64 * 1024).enumerate() {
            s.write_all(chunk).map_err(|e| format!("write after {} bytes: {e}", i * 64 * 1024))?;
            let due = Duration::from_secs_f64(((i + 1) * 64 * 1024) as f64 / TRANSFER_BYTES_PER_SEC as f64);
            if let Some(wait) = due.checked_sub(t.elapsed()) {
                thread::sleep(wait);
            }
        }
        s.shutdown(std::net::Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
        Ok(t.elapsed())
    })
}

/// A registration for a fresh identity claiming `hostname`, sent straight
/// to the backbone from `ns`; returns the answer.
fn try_to_take(ns: &Ns, hostname: &str) -> Result<Message, String> {
    let id = Identity::generate(*blake3::hash(b"netns_backbone_restart thief").as_bytes());
    let record = NodeRecord {
        network: NetworkId::PUBLIC,
        node: id.node_addr(),
        identity_key: id.public_key(),
        pow_nonce: id.nonce(),
        wg_key: [7; 32],
        endpoints: vec![],
        hostname: Some(hostname.to_string()),
        capabilities: vec![],
        groups: vec![],
        seq: SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64,
        wg_key_version: 1,
        wg_key_expires_unix: meshtun_proto::record::NO_EXPIRY,
        cert: None,
    };
    let signed = SignedRecord::sign(&id, &record).map_err(|e| e.to_string())?;
    let wire = Message::Register { request_id: 99, record: signed }.encode();
    ns.in_netns(move || {
        let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut buf = [0u8; 2048];
        for _ in 0..10 {
            s.send_to(&wire, (BB_IP, BB_PORT)).map_err(|e| e.to_string())?;
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                return Message::decode(&buf[..n]).map_err(|e| e.to_string());
            }
        }
        Err("no answer".into())
    })
}

#[test]
fn a_backbone_restart_loses_nothing() {
    if !require_root("a_backbone_restart_loses_nothing") {
        return;
    }
    let lab = Lab::new("bbr");
    let sw = lab.add_switch("sw", "br0");
    let bb_ns = lab.add_host("bb", &sw, "198.18.0.1/24");
    let a_ns = lab.add_host("a", &sw, "198.18.0.2/24");
    let b_ns = lab.add_host("b", &sw, "198.18.0.3/24");
    let t_ns = lab.add_host("t", &sw, "198.18.0.4/24");
    let state = lab.path("backbone-state");
    let bb_addr = SocketAddr::new(BB_IP.into(), BB_PORT);
    let mut checks = Checks::new();

    let bb1 = start_backbone(&lab, &bb_ns, "backbone-1", &state);
    let opts = |h| NodeOpts { heartbeat_secs: Some(HEARTBEAT), ..NodeOpts::new(h) };
    let a = Node::start(&lab, &a_ns, bb_addr, opts("alpha"));
    let b = Node::start(&lab, &b_ns, bb_addr, opts("beta"));
    a.wait_registered(Duration::from_secs(15));
    b.wait_registered(Duration::from_secs(15));
    println!("[setup] alpha {} {}, beta {} {}", a.id.address, a.id.ipv6, b.id.address, b.id.ipv6);
    wait_until(Duration::from_secs(10), "alpha to resolve beta", || resolve(&a, "beta"));

    // (1) A paced transfer alpha -> beta that spans the outage.
    let data = payload();
    let want = *blake3::hash(&data).as_bytes();
    let sink = start_sink(&b_ns, b.id.ipv6);
    let source = start_source(&a_ns, b.id.ipv6, data);
    thread::sleep(Duration::from_secs(2));

    // (2) Crash the backbone; cut alpha off from it (only from it: the
    // transfer goes node to node) so alpha cannot re-register early.
    let seq_a = seq_of(&bb1, &a.id.address).unwrap_or(0);
    let seq_b = seq_of(&bb1, &b.id.address).unwrap_or(0);
    let killed = bb1.proc.signal(libc::SIGKILL) && bb1.proc.wait_timeout(Duration::from_secs(5)).is_some();
    checks.check(killed, || "the backbone did not die on SIGKILL".into());
    let cut = ip(&["-n", a_ns.name(), "route", "add", "blackhole", "198.18.0.1/32"]);
    checks.check(cut.success(), || format!("blackhole route: {}", cut.describe()));
    println!("[outage] backbone killed; alpha's path to it cut");
    thread::sleep(Duration::from_secs(HEARTBEAT + 1));

    // (3) Restart on the same state directory.
    let restarted = Instant::now();
    let bb2 = start_backbone(&lab, &bb_ns, "backbone-2", &state);
    println!("[restart] backbone answering {:.2?} after start", restarted.elapsed());
    let holder = hostname_holder(&bb2, "alpha");
    println!("[restart] `alpha` held by {holder:?} before alpha could re-register");
    checks.check(holder.as_ref().ok().and_then(|h| h.as_deref()) == Some(a.id.address.as_str()), || {
        format!("restored backbone should hold `alpha` for {}: {holder:?}", a.id.address)
    });
    let theft = try_to_take(&t_ns, "alpha");
    println!("[restart] a new identity claiming `alpha`: {theft:?}");
    checks.check(matches!(theft, Ok(Message::Reject { code: RejectCode::HostnameTaken, .. })), || {
        format!("claiming `alpha` during the restart window must fail with hostname_taken: {theft:?}")
    });
    checks.check(seq_of(&bb2, &a.id.address) == Ok(seq_a), || "alpha re-registered although cut off".into());

    // (4) Beta re-registers by itself within one heartbeat of the restart.
    let b_back = poll_until(Duration::from_secs(HEARTBEAT * 3), "beta to re-register", || {
        let (s, at) = registration_of(&bb2, &b.id.address)?;
        if s > seq_b { Ok(at.saturating_duration_since(restarted)) } else { Err(format!("seq {s}")) }
    });
    println!("[restart] beta re-registered {b_back:.2?} after the restart began");
    checks.check(b_back.as_ref().is_ok_and(|t| *t <= Duration::from_secs(HEARTBEAT) + POLL_SLACK), || {
        format!("beta should re-register within one heartbeat ({HEARTBEAT} s): {b_back:?}")
    });

    // Beta finds alpha by name at once: the restored binding answers.
    let found = poll_until(Duration::from_secs(HEARTBEAT * 2), "beta to resolve alpha", || {
        let y = resolve(&b, "alpha")?;
        if y == a.id.ipv6 { Ok(restarted.elapsed()) } else { Err(format!("{y}")) }
    });
    println!("[restart] beta finds alpha (still cut off) {found:.2?} after the restart began");
    checks.check(found.as_ref().is_ok_and(|t| *t <= Duration::from_secs(HEARTBEAT) + RESOLVE_SLACK), || {
        format!("beta should find alpha within one heartbeat of the restart: {found:?}")
    });

    // (5) Alpha's path comes back: it re-registers within one heartbeat.
    let uncut = ip(&["-n", a_ns.name(), "route", "del", "blackhole", "198.18.0.1/32"]);
    checks.check(uncut.success(), || format!("removing the blackhole: {}", uncut.describe()));
    let reconnected = Instant::now();
    let a_back = poll_until(Duration::from_secs(HEARTBEAT * 3), "alpha to re-register", || {
        let (s, at) = registration_of(&bb2, &a.id.address)?;
        if s > seq_a { Ok(at.saturating_duration_since(reconnected)) } else { Err(format!("seq {s}")) }
    });
    println!("[restart] alpha re-registered {a_back:.2?} after its path came back");
    checks.check(a_back.as_ref().is_ok_and(|t| *t <= Duration::from_secs(HEARTBEAT) + POLL_SLACK), || {
        format!("alpha should re-register within one heartbeat ({HEARTBEAT} s): {a_back:?}")
    });

    // (6) Alpha finds beta by name again.
    let found = poll_until(Duration::from_secs(HEARTBEAT * 2), "alpha to resolve beta", || {
        let x = resolve(&a, "beta")?;
        if x == b.id.ipv6 { Ok(reconnected.elapsed()) } else { Err(format!("{x}")) }
    });
    println!("[restart] alpha finds beta {found:.2?} after its path came back");
    checks.check(found.as_ref().is_ok_and(|t| *t <= Duration::from_secs(HEARTBEAT) + RESOLVE_SLACK), || {
        format!("alpha should find beta within one heartbeat: {found:?}")
    });

    // (7) The transfer never noticed.
    let sent = source.join().expect("source thread");
    let received = sink.join().expect("sink thread");
    println!("[transfer] sent {sent:?}; received {:?}", received.as_ref().map(|(n, _)| *n));
    checks.check(sent.is_ok(), || format!("the sender failed: {sent:?}"));
    checks.check(received.as_ref().is_ok_and(|(n, h)| *n == TRANSFER_BYTES && *h == want), || {
        format!("the transfer must arrive whole and intact: {:?}", received.as_ref().map(|(n, _)| *n))
    });

    // (8) A node restart keeps its address and hostname.
    let (_, needed_sigkill) = b.proc.terminate(Duration::from_secs(10));
    checks.check(!needed_sigkill, || "beta did not stop on SIGTERM".into());
    let b2 = Node::start(&lab, &b_ns, bb_addr, opts("beta"));
    b2.wait_registered(Duration::from_secs(15));
    let holder = hostname_holder(&bb2, "beta");
    println!("[node restart] beta is {} again; `beta` held by {holder:?}", b2.id.address);
    checks.check(b2.id.address == b.id.address, || format!("address changed: {} -> {}", b.id.address, b2.id.address));
    checks.check(holder.as_ref().ok().and_then(|h| h.as_deref()) == Some(b.id.address.as_str()), || format!("`beta` not held by beta: {holder:?}"));
    for bb in [&bb2] {
        checks.check(bb.proc.is_running(), || format!("backbone died: {}", bb.proc.log_tail(20)));
    }
    checks.finish();
}
