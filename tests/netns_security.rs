//! Security end-to-end tests in network namespaces (issue 5): a private
//! network (number 7) with certified members and outsiders registered on the
//! same backbone, the inbound firewall, certificate expiry and revocation,
//! key rotation under a running transfer, and a host on the underlay that
//! injects forged and replayed WireGuard, relay and backbone datagrams at
//! the members and forged Register/Deregister/Lookup datagrams at the
//! backbone; the control socket refuses other users.
//!
//! Needs root (namespaces, veth, TUN), `ip`, `ping` (iputils-ping) and `dig`
//! (dnsutils). Without root every test prints "skipping: needs root" and
//! passes. Run with:
//!
//!     cargo test --test netns_security -- --nocapture
//!
//! Topology of each test (all in 198.18.0.0/15, namespaces
//! `mt-{pid}-{test}-{role}`), one bridge:
//!
//!     bb 198.18.0.1 (backbone, serves network 7)
//!     a  198.18.0.2, b 198.18.0.3 (members) ...
//!     out 198.18.0.4 (public outsider and attacker), rogue 198.18.0.5

mod harness;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harness::meshtun::{bin, cli, cli_timeout, json_data, Backbone, Identity, Node, DEFAULT_INTERFACE};
use harness::nat::{control_status, peer_entry, send_hashed, start_sink};
use harness::{poll_until, require_root, require_tool, wait_until, Capture, Checks, CmdOutput, Lab, Ns};
use serde_json::Value;

const NET: u16 = 7;
const BB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const OUT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
const BB_PORT: u16 = 7400;
const NODE_PORT: u16 = 51820;
const HEARTBEAT: u64 = 2;
const RECORD_TTL: u64 = 6;

// ---------------------------------------------------------------------------
// helpers: owners, certificates, daemons
// ---------------------------------------------------------------------------

fn bb_addr() -> SocketAddr {
    SocketAddr::new(BB_IP.into(), BB_PORT)
}

fn unix_now_f64() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn env() -> Vec<(&'static str, String)> {
    vec![
        ("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into())),
        ("RUST_BACKTRACE", "1".into()),
        ("NO_COLOR", "1".into()),
    ]
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `meshtun id --state-dir DIR --network N --json`.
fn mesh_id(ns: &Ns, dir: &Path, network: u16) -> Identity {
    std::fs::create_dir_all(dir).unwrap();
    let n = network.to_string();
    let out = cli(ns, &["id", "--state-dir", s(dir), "--network", &n, "--json"]);
    let d = json_data(&out).unwrap_or_else(|e| panic!("`meshtun id --network {n}`: {e}"));
    let f = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or_else(|| panic!("id lacks {k}: {d}")).to_string();
    let id = Identity {
        address: f("address"),
        ipv6: f("ipv6").parse().unwrap(),
        public_key: f("public_key"),
    };
    assert!(id.address.starts_with(&format!("{network}:")), "`meshtun id --network {network}` gave {}", id.address);
    assert_eq!(id.ipv6.segments()[3], network, "mesh IPv6 {} does not carry network {network}", id.ipv6);
    id
}

struct Owner {
    file: PathBuf,
    key: String,
}

/// `meshtun network create --network 7 --out DIR`.
fn create_owner(lab: &Lab, ns: &Ns, sub: &str) -> Owner {
    let dir = lab.path(sub);
    std::fs::create_dir_all(&dir).unwrap();
    let out = cli(ns, &["network", "create", "--network", &NET.to_string(), "--out", s(&dir), "--json"]);
    let d = json_data(&out).unwrap_or_else(|e| panic!("`meshtun network create`: {e}"));
    let key = d["owner_key"].as_str().unwrap_or_else(|| panic!("no owner_key: {d}")).to_string();
    let file = dir.join(format!("network-{NET}.owner"));
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    assert!(text.contains(&format!("owner = {key}")), "owner file does not carry the printed key {key}:\n{text}");
    Owner { file, key }
}

/// `meshtun network sign`; returns the JSON data (expires_unix, serial...).
fn sign(ns: &Ns, owner: &Owner, address: &str, groups: &[&str], expires: &str, serial: u64, out: &Path) -> Value {
    let serial = serial.to_string();
    let mut args = vec!["network", "sign", "--owner", s(&owner.file), "--address", address, "--expires", expires, "--serial", &serial, "--out", s(out), "--json"];
    for g in groups {
        args.extend_from_slice(&["--group", g]);
    }
    json_data(&cli(ns, &args)).unwrap_or_else(|e| panic!("`meshtun network sign` for {address}: {e}"))
}

/// `meshtun network revoke` into `file` (atomically replacing it).
fn write_revocations(ns: &Ns, owner: &Owner, serials: &[u64], seq: u64, file: &Path) -> Value {
    let tmp = file.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    let seq = seq.to_string();
    let serials: Vec<String> = serials.iter().map(u64::to_string).collect();
    let mut args = vec!["network", "revoke", "--owner", s(&owner.file), "--seq", &seq, "--out", s(&tmp), "--json"];
    for x in &serials {
        args.extend_from_slice(&["--serial", x]);
    }
    let d = json_data(&cli(ns, &args)).unwrap_or_else(|e| panic!("`meshtun network revoke`: {e}"));
    std::fs::rename(&tmp, file).unwrap();
    d
}

/// `meshtun backbone --network-owner 7:KEY [--revocations FILE]`.
fn start_backbone(lab: &Lab, ns: &Ns, owner: &Owner, revocations: Option<&Path>) -> Backbone {
    let socket = lab.path("bb.sock");
    let listen = bb_addr().to_string();
    let ttl = RECORD_TTL.to_string();
    let owner_arg = format!("{NET}:{}", owner.key);
    let mut args = vec![bin(), "backbone", "--listen", &listen, "--socket", s(&socket), "--record-ttl", &ttl, "--network-owner", &owner_arg];
    if let Some(f) = revocations {
        args.extend_from_slice(&["--revocations", s(f)]);
    }
    let env = env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let proc = ns.spawn_env("backbone", &args, &env);
    let bb = Backbone { ns: ns.clone(), proc, socket, listen: bb_addr() };
    wait_until(Duration::from_secs(15), "the backbone's status to answer", || {
        bb.proc.check_running()?;
        let d = control_status(&bb.socket)?;
        (d["role"] == "backbone").then_some(()).ok_or_else(|| format!("{d}"))
    });
    bb
}

/// `meshtun up --network N [--cert FILE]` in `ns` (state dir, socket and
/// log named after the namespace's role).
fn start_node(lab: &Lab, ns: &Ns, network: u16, cert: Option<&Path>, hostname: &str, extra: &[&str]) -> Node {
    let role = ns.role();
    let state_dir = lab.path(&format!("state-{role}"));
    let id = mesh_id(ns, &state_dir, network);
    let socket = lab.path(&format!("{role}.sock"));
    let bb = bb_addr().to_string();
    let net = network.to_string();
    let hb = HEARTBEAT.to_string();
    let mut args = vec![
        bin(), "up", "--backbone", &bb, "--network", &net, "--hostname", hostname, "--state-dir", s(&state_dir),
        "--socket", s(&socket), "--heartbeat-secs", &hb,
    ];
    if let Some(c) = cert {
        args.extend_from_slice(&["--cert", s(c)]);
    }
    args.extend_from_slice(extra);
    let env = env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let proc = ns.spawn_env(&format!("node-{role}"), &args, &env);
    Node {
        ns: ns.clone(),
        proc,
        socket,
        state_dir,
        hostname: hostname.to_string(),
        interface: DEFAULT_INTERFACE.to_string(),
        id,
    }
}

/// (address, hostname) of every record in a backbone's status.
fn record_keys(bb_status: &Value) -> Vec<(String, String)> {
    let recs = bb_status["records"].as_array().cloned().unwrap_or_default();
    recs.iter().map(|r| (r["address"].as_str().unwrap_or("").to_string(), r["hostname"].as_str().unwrap_or("").to_string())).collect()
}

/// A record for `identity` carrying the certificate in `cert_file`.
fn intent_record_for_backbone(identity: &meshtun_proto::Identity, cert_file: &Path) -> meshtun_proto::NodeRecord {
    let (_, cert) = meshtun_proto::cert::SignedCert::from_file_str(&std::fs::read_to_string(cert_file).unwrap()).expect("certificate");
    meshtun_proto::NodeRecord {
        network: meshtun_addr::NetworkId(NET),
        node: identity.node_addr(),
        identity_key: identity.public_key(),
        pow_nonce: identity.nonce(),
        wg_key: *boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from([7u8; 32])).as_bytes(),
        endpoints: vec![SocketAddr::new(Ipv4Addr::new(198, 18, 0, 5).into(), 40001)],
        hostname: None,
        capabilities: vec![],
        groups: vec![],
        seq: (unix_now_f64() * 1000.0) as u64,
        wg_key_version: 1,
        wg_key_expires_unix: meshtun_proto::record::NO_EXPIRY,
        cert: Some(cert),
    }
}

fn status(n: &Node) -> Result<Value, String> {
    control_status(&n.socket)
}

fn stat_u64(v: &Value, ptr: &str) -> u64 {
    v.pointer(ptr).and_then(Value::as_u64).unwrap_or(0)
}

/// `stats.dropped` of a node as a map.
fn dropped(v: &Value) -> BTreeMap<String, u64> {
    v.pointer("/stats/dropped")
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
        .unwrap_or_default()
}

/// "malformed +20, wireguard +20" for the counters that changed.
fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(*before.get(k).unwrap_or(&0))))
        .filter(|(_, d)| *d > 0)
        .collect()
}

fn ping6(ns: &Ns, target: Ipv6Addr, count: u32, wait_s: u32) -> CmdOutput {
    ns.exec_timeout(
        &["ping", "-6", "-n", "-c", &count.to_string(), "-W", &wait_s.to_string(), &target.to_string()],
        Duration::from_secs(30),
    )
}

fn ping_summary(out: &CmdOutput) -> String {
    out.stdout
        .lines()
        .filter(|l| l.contains("transmitted") || l.starts_with("rtt"))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Pings until one ping of three succeeds (the first probes may be lost
/// while a peer is looked up and the handshake runs).
fn wait_ping(from: &Ns, to: Ipv6Addr, timeout: Duration, what: &str) -> Result<Duration, String> {
    let t = Instant::now();
    poll_until(timeout, what, || {
        let o = ping6(from, to, 3, 1);
        if o.success() {
            Ok(t.elapsed())
        } else {
            Err(ping_summary(&o))
        }
    })
}

fn tcp_connect(ns: &Ns, ip: Ipv6Addr, port: u16, timeout: Duration) -> Result<Duration, String> {
    ns.in_netns(|| {
        let t = Instant::now();
        TcpStream::connect_timeout(&SocketAddr::new(ip.into(), port), timeout)
            .map(|_| t.elapsed())
            .map_err(|e| format!("{e} after {:.1?}", t.elapsed()))
    })
}

/// TCP listeners on `[ip]:port` for every port in `ns` that accept and
/// close connections until `stop`; the handle yields the accepts per port.
fn start_listeners(ns: &Ns, ip: Ipv6Addr, ports: &[u16], stop: Arc<AtomicBool>) -> thread::JoinHandle<BTreeMap<u16, usize>> {
    let ports = ports.to_vec();
    let (tx, rx) = mpsc::channel();
    let h = ns.spawn_in_netns(move || {
        let ls: Vec<(u16, TcpListener)> = ports
            .iter()
            .map(|p| {
                let l = TcpListener::bind(SocketAddr::new(ip.into(), *p)).unwrap_or_else(|e| panic!("bind [{ip}]:{p}: {e}"));
                l.set_nonblocking(true).unwrap();
                (*p, l)
            })
            .collect();
        let _ = tx.send(());
        let mut accepted = BTreeMap::new();
        while !stop.load(Ordering::SeqCst) {
            for (p, l) in &ls {
                if let Ok((c, _)) = l.accept() {
                    *accepted.entry(*p).or_insert(0) += 1;
                    drop(c);
                }
            }
            thread::sleep(Duration::from_millis(10));
        }
        accepted
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("listeners did not start");
    h
}

/// Small deterministic PRNG for packet contents (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// `min + (random below span)` random bytes.
    fn some(&mut self, min: usize, span: u64) -> Vec<u8> {
        let n = min + self.below(span) as usize;
        self.bytes(n)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------------------
// helpers: raw packets
// ---------------------------------------------------------------------------

/// The UDP payload of an Ethernet/IPv4/UDP frame with its addresses.
fn udp_payload(frame: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4, &[u8])> {
    let (src, dst, sport, dport) = harness::parse_ipv4_udp(frame)?;
    let ip = frame.get(14..)?;
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let payload = ip.get(ihl + 8..total.min(ip.len()))?;
    Some((SocketAddrV4::new(src, sport?), SocketAddrV4::new(dst, dport?), payload))
}

/// Sends one UDP datagram with a forged IPv4 source from the calling
/// thread's namespace (raw socket, IP_HDRINCL; UDP checksum 0 = none).
fn send_spoofed(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Result<(), String> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    let mut sum: u32 = 0;
    for c in p.chunks(2) {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let ck = !(sum as u16);
    p[10] = (ck >> 8) as u8;
    p[11] = ck as u8;
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    // SAFETY: plain socket/sendto/close on a fd we own, with a valid
    // sockaddr_in and buffer.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        if fd < 0 {
            return Err(format!("raw socket: {}", std::io::Error::last_os_error()));
        }
        let mut sin: libc::sockaddr_in = std::mem::zeroed();
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_addr.s_addr = u32::from_ne_bytes(dst.ip().octets());
        let rc = libc::sendto(
            fd,
            p.as_ptr() as *const libc::c_void,
            p.len(),
            0,
            &sin as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(format!("sendto: {err}"));
        }
    }
    Ok(())
}

/// The node's current WireGuard public key, from its state directory.
fn wg_public_key(state_dir: &Path) -> boringtun::x25519::PublicKey {
    let text = std::fs::read_to_string(state_dir.join("wireguard.key")).expect("read wireguard.key");
    let hex = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("secret"))
        .map(|r| r.trim_start_matches([' ', '=']).trim().to_string())
        .unwrap_or_else(|| text.trim().to_string());
    let bytes = meshtun_proto::identity::unhex32(&hex).expect("wireguard.key secret is 32 hex bytes");
    boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(bytes))
}

fn wg_key_file(state_dir: &Path) -> String {
    std::fs::read_to_string(state_dir.join("wireguard.key")).unwrap_or_default()
}

/// A valid WireGuard handshake initiation from a fresh key to `responder`.
fn handshake_initiation(responder: boringtun::x25519::PublicKey, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    let mut secret = [0u8; 32];
    secret.copy_from_slice(&r.bytes(32));
    let mut tunn = boringtun::noise::Tunn::new(boringtun::x25519::StaticSecret::from(secret), responder, None, None, 7 << 8, None);
    let mut buf = vec![0u8; 256];
    match tunn.format_handshake_initiation(&mut buf, false) {
        boringtun::noise::TunnResult::WriteToNetwork(b) => b.to_vec(),
        _ => panic!("boringtun produced no handshake initiation"),
    }
}

// ---------------------------------------------------------------------------
// 1. outsiders, firewall, forged packets
// ---------------------------------------------------------------------------

#[test]
fn private_network_hides_members_enforces_the_firewall_and_ignores_forged_packets() {
    let name = "private_network_hides_members_enforces_the_firewall_and_ignores_forged_packets";
    if !require_root(name) {
        return;
    }
    require_tool("ping", "iputils-ping");
    require_tool("dig", "dnsutils");
    let t0 = Instant::now();
    let lab = Lab::new("secp");
    let sw = lab.add_switch("sw", "br0");
    let bb_ns = lab.add_host("bb", &sw, "198.18.0.1/24");
    let a_ns = lab.add_host("a", &sw, "198.18.0.2/24");
    let b_ns = lab.add_host("b", &sw, "198.18.0.3/24");
    let out_ns = lab.add_host("out", &sw, "198.18.0.4/24");
    let rogue_ns = lab.add_host("rogue", &sw, "198.18.0.5/24");
    let mut checks = Checks::new();

    // --- (1) setup: owner, certificates, backbone, members, outsider.
    let owner = create_owner(&lab, &bb_ns, "owner");
    let other = create_owner(&lab, &bb_ns, "other");
    println!("(1) network {NET} owner key {} (a second, foreign owner {})", owner.key, other.key);
    let bb = start_backbone(&lab, &bb_ns, &owner, None);
    let a_id = mesh_id(&a_ns, &lab.path("state-a"), NET);
    let b_id = mesh_id(&b_ns, &lab.path("state-b"), NET);
    let a_cert = lab.path("a.cert");
    let b_cert = lab.path("b.cert");
    sign(&bb_ns, &owner, &a_id.address, &["ops"], "1h", 1001, &a_cert);
    sign(&bb_ns, &owner, &b_id.address, &["ops"], "1h", 1002, &b_cert);
    let a = start_node(&lab, &a_ns, NET, Some(&a_cert), "alpha", &[
        "--capability", "secret-cap", "--group", "g1", "--firewall", "allow icmp", "--firewall", "allow tcp/8080",
    ]);
    let b = start_node(&lab, &b_ns, NET, Some(&b_cert), "beta", &[
        "--firewall", "allow icmp", "--firewall", "allow tcp/8080", "--firewall", "deny tcp/9090",
    ]);
    let o = start_node(&lab, &out_ns, 0, None, "outsider", &[]);
    for n in [&a, &b, &o] {
        n.wait_registered(Duration::from_secs(15));
    }
    println!(
        "(1) registered after {:.1?}: alpha {} {}, beta {} {}, outsider {} {}",
        t0.elapsed(),
        a.id.address,
        a.id.ipv6,
        b.id.address,
        b.id.ipv6,
        o.id.address,
        o.id.ipv6
    );

    // (1b) `up --network 7` without a certificate: refused at start.
    let rogue_dir = lab.path("state-rogue");
    let rogue_id = mesh_id(&rogue_ns, &rogue_dir, NET);
    let bbs = bb_addr().to_string();
    let sock_nc = lab.path("rogue-nocert.sock");
    let nocert = cli_timeout(
        &rogue_ns,
        &["up", "--json", "--network", "7", "--backbone", &bbs, "--hostname", "rogue", "--state-dir", s(&rogue_dir), "--socket", s(&sock_nc)],
        Duration::from_secs(15),
    );
    let reply: Option<Value> = serde_json::from_str(nocert.stdout.trim()).ok();
    println!(
        "(1b) up --network 7 without --cert: exit {:?} after {:.2?}; stdout {}; stderr {}",
        nocert.code(),
        nocert.elapsed,
        nocert.stdout.trim(),
        nocert.stderr.trim().lines().last().unwrap_or("")
    );
    checks.check(!nocert.timed_out && nocert.code() == Some(78), || format!("(1b) uncertified `up --network 7` should exit 78 at once: {}", nocert.describe()));
    checks.check(
        reply.as_ref().is_some_and(|r| r["code"] == "config_error" && r["message"].as_str().is_some_and(|m| m.contains("certificate"))),
        || format!("(1b) uncertified `up --network 7` should report a config_error about the certificate: {}", nocert.describe()),
    );
    checks.check(!rogue_ns.link_exists(DEFAULT_INTERFACE), || "(1b) the refused daemon left meshtun0 behind".into());

    // (1c) a certificate signed by a foreign owner: the backbone refuses.
    let rogue_cert = lab.path("rogue.cert");
    sign(&bb_ns, &other, &rogue_id.address, &["ops"], "1h", 1003, &rogue_cert);
    let rogue = start_node(&lab, &rogue_ns, NET, Some(&rogue_cert), "rogue", &["--firewall-default", "allow"]);
    let t = Instant::now();
    let r = poll_until(Duration::from_secs(15), "the foreign-owner member's backbone state to become `rejected`", || {
        rogue.proc.check_running()?;
        let st = rogue.backbone_state()?;
        (st == "rejected").then_some(()).ok_or(st)
    });
    let bbst = control_status(&bb.socket).unwrap_or_default();
    println!(
        "(1c) foreign-owner certificate: backbone state `rejected` {:?} after {:.2?}; backbone registrations_rejected {}",
        r.as_ref().map(|_| "yes"),
        t.elapsed(),
        stat_u64(&bbst, "/stats/registrations_rejected")
    );
    checks.ok(r, "(1c)");
    let listed = |addr: &str| bb.record_of(addr).map(|r| r.is_some());
    checks.check(listed(&rogue.id.address) == Ok(false), || format!("(1c) the backbone lists the foreign-owner node: {:?}", bb.records()));

    // --- (3) members reach each other (capture the first exchange: the
    // attacker replays it below).
    let cap = Capture::start(sw.ns.name(), None);
    let r = wait_ping(&a_ns, b.id.ipv6, Duration::from_secs(15), "alpha to ping beta");
    println!("(3) ping alpha -> beta ok after {r:.2?}");
    let r2 = wait_ping(&b_ns, a.id.ipv6, Duration::from_secs(10), "beta to ping alpha");
    println!("(3) ping beta -> alpha ok after {r2:.2?}");
    let captured = cap.stop();
    let (r, r2) = (checks.ok(r, "(3) alpha -> beta"), checks.ok(r2, "(3) beta -> alpha"));
    if r.is_none() || r2.is_none() {
        checks.finish();
        return;
    }
    let sink = start_sink(&b_ns, b.id.ipv6, 8080, Duration::from_secs(20));
    let data = harness::nat::payload(1 << 20, 0x5ec);
    let sent = send_hashed(&a_ns, b.id.ipv6, 8080, &data, None, Duration::from_secs(10), || {});
    let got = sink.join().unwrap();
    println!("(3) TCP alpha -> beta:8080: {sent:?}; sink {:?}", got.as_ref().map(|g| g.bytes));
    checks.check(sent.as_ref().is_ok_and(|s| s.hash_ok && s.bytes == data.len()), || format!("(3) 1 MiB TCP transfer alpha -> beta:8080 failed: {sent:?} / {got:?}"));
    let a_peer_b = a.peer(&b.id.address).ok().flatten().unwrap_or_default();
    println!("(3) alpha's entry for beta: {}", harness::nat::describe_peer(&a_peer_b));
    let b_endpoint = a_peer_b["endpoint"].as_str().unwrap_or("").to_string();
    checks.check(b_endpoint == format!("{B_IP}:{NODE_PORT}"), || format!("(3) alpha reaches beta at {b_endpoint:?}, expected {B_IP}:{NODE_PORT} (direct)"));

    // --- (4) the firewall on beta: 8080 allowed, 9090 denied, 9191 unlisted.
    let stop = Arc::new(AtomicBool::new(false));
    let listeners = start_listeners(&b_ns, b.id.ipv6, &[8080, 9090, 9191], stop.clone());
    let fw_before = status(&b).map(|s| stat_u64(&s, "/stats/dropped/firewall")).unwrap_or(0);
    let local = tcp_connect(&b_ns, b.id.ipv6, 9090, Duration::from_secs(2));
    checks.check(local.is_ok(), || format!("(4) control: beta cannot connect to its own 9090 listener: {local:?}"));
    let fw: BTreeMap<u16, Result<Duration, String>> = thread::scope(|sc| {
        let hs: Vec<_> = [8080u16, 9090, 9191]
            .into_iter()
            .map(|port| {
                let (ns, ip) = (&a_ns, b.id.ipv6);
                (port, sc.spawn(move || tcp_connect(ns, ip, port, Duration::from_secs(3))))
            })
            .collect();
        hs.into_iter().map(|(p, h)| (p, h.join().unwrap())).collect()
    });
    for (port, r) in &fw {
        println!("(4) alpha -> [beta]:{port}: {r:?}");
    }
    let fw_after = status(&b).map(|s| stat_u64(&s, "/stats/dropped/firewall")).unwrap_or(0);
    stop.store(true, Ordering::SeqCst);
    let accepted = listeners.join().unwrap();
    println!("(4) beta accepted {accepted:?}; beta stats.dropped.firewall {fw_before} -> {fw_after}");
    checks.check(fw[&8080].is_ok(), || format!("(4) allowed tcp/8080 failed: {:?}", fw[&8080]));
    checks.check(fw[&9090].is_err(), || "(4) denied tcp/9090 connected".into());
    checks.check(fw[&9191].is_err(), || "(4) unlisted tcp/9191 connected (default policy of a private network is deny)".into());
    checks.check(accepted.get(&9090).copied().unwrap_or(0) <= 1 && !accepted.contains_key(&9191), || format!("(4) beta accepted firewalled connections: {accepted:?}"));
    checks.check(fw_after > fw_before, || format!("(4) beta's stats.dropped.firewall did not grow ({fw_before} -> {fw_after})"));
    // (4b) the text form of `meshtun status` names the firewall drops too.
    let text = cli(&b_ns, &["status", "--socket", s(&b.socket)]);
    let drop_line = text.stdout.lines().find(|l| l.starts_with("dropped: ")).unwrap_or("").to_string();
    println!("(4b) beta's text status: {drop_line:?}");
    let fw_text: Option<u64> = drop_line.split(", ").find_map(|c| c.trim_start_matches("dropped: ").strip_prefix("firewall ")).and_then(|n| n.parse().ok());
    checks.check(text.success() && fw_text.is_some_and(|n| n > fw_before), || format!("(4b) text status should show `firewall N` with N > {fw_before}: {drop_line:?} ({})", text.describe()));

    // (4c) the control socket is 0600, and another user is refused with
    // `permission_denied` (not a daemon_not_running that hides the cause).
    {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let meta = std::fs::metadata(&b.socket);
        let mode = meta.as_ref().map(|m| (m.file_type().is_socket(), m.permissions().mode() & 0o777));
        println!("(4c) beta's control socket {}: {mode:?}", b.socket.display());
        checks.check(matches!(mode, Ok((true, 0o600))), || format!("(4c) control socket should be a socket with mode 0600: {mode:?}"));
        let nobody = b_ns.exec(&["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", bin(), "status", "--socket", s(&b.socket), "--json"]);
        let reply: Value = serde_json::from_str(nobody.stdout.trim()).unwrap_or_default();
        println!("(4c) uid 65534: meshtun status --json -> {reply}");
        checks.check(!nobody.success() && reply["code"] == "permission_denied", || format!("(4c) uid 65534 should get code permission_denied: {}", nobody.describe()));
    }

    // --- (2) the outsider can neither look members up nor reach them.
    let osock = s(&o.socket).to_string();
    let mesh_ping = {
        let (ns, addr, sock) = (out_ns.clone(), a.id.address.clone(), osock.clone());
        thread::spawn(move || cli_timeout(&ns, &["ping", "-c", "1", &addr, "--json", "--socket", &sock], Duration::from_secs(20)))
    };
    let res = cli(&out_ns, &["resolve", "alpha", "--json", "--socket", &osock]);
    let res_d = json_data(&res);
    println!("(2) outsider: resolve alpha -> {res_d:?}");
    checks.check(res_d.as_ref().map_or(true, |d| !d.to_string().contains(&a.id.ipv6.to_string())), || format!("(2) outsider resolved alpha: {res_d:?}"));
    for (flag, val) in [("--capability", "secret-cap"), ("--group", "g1"), ("--group", "ops")] {
        let f = json_data(&cli(&out_ns, &["find", flag, val, "--json", "--socket", &osock]));
        println!("(2) outsider: find {flag} {val} -> {f:?}");
        checks.check(f.as_ref().map_or(true, |d| !d.to_string().contains(&a.id.address[2..])), || format!("(2) outsider found alpha with find {flag} {val}: {f:?}"));
    }
    // Positive control: a member does find alpha by the same names.
    let bsock = s(&b.socket).to_string();
    let ctl = json_data(&cli(&b_ns, &["resolve", "alpha", "--json", "--socket", &bsock]));
    checks.check(ctl.as_ref().is_ok_and(|d| d.to_string().contains(&a.id.ipv6.to_string())), || format!("(2) control: member beta cannot resolve alpha: {ctl:?}"));
    let ctl = json_data(&cli(&b_ns, &["find", "--capability", "secret-cap", "--json", "--socket", &bsock]));
    checks.check(ctl.as_ref().is_ok_and(|d| d.to_string().contains("alpha")), || format!("(2) control: member beta cannot find secret-cap: {ctl:?}"));
    let dig = |ns: &Ns, server: Ipv6Addr, qname: &str| {
        let at = format!("@{server}");
        let o = ns.exec_timeout(&["dig", &at, qname, "AAAA", "+tries=1", "+time=3", "+noall", "+comments", "+answer"], Duration::from_secs(10));
        let st = o.stdout.split("status: ").nth(1).and_then(|r| r.split(',').next()).unwrap_or("NO-REPLY").to_string();
        (st, o.stdout)
    };
    let (st, txt) = dig(&b_ns, b.id.ipv6, "alpha.mesh");
    println!("(2) control: dig @beta alpha.mesh: {st}");
    checks.check(st == "NOERROR" && txt.contains(&a.id.ipv6.to_string()), || format!("(2) control: beta's DNS does not answer alpha.mesh: {txt}"));
    for q in ["alpha.mesh", "beta.mesh", "secret-cap.cap.mesh", "g1.group.mesh"] {
        let (st, txt) = dig(&out_ns, o.id.ipv6, q);
        println!("(2) outsider: dig @{} {q}: {st}", o.id.ipv6);
        checks.check(!txt.contains(&a.id.ipv6.to_string()) && !txt.contains(&b.id.ipv6.to_string()), || format!("(2) outsider's DNS answered {q} with a member: {txt}"));
        if q == "alpha.mesh" || q == "beta.mesh" {
            checks.check(st == "NXDOMAIN", || format!("(2) dig @outsider {q}: expected NXDOMAIN, got {st}: {txt}"));
        }
    }
    // It learns alpha's mesh IPv6 anyway and routes the whole mesh prefix
    // into its engine, so the probes do enter it.
    harness::ip(&["-n", out_ns.name(), "-6", "route", "add", "fd4d:6573:6874::/48", "dev", DEFAULT_INTERFACE]).ok();
    let o_before = status(&o).map(|s| dropped(&s)).unwrap_or_default();
    let (p, tcp) = thread::scope(|sc| {
        let tcp = sc.spawn(|| tcp_connect(&out_ns, a.id.ipv6, 8080, Duration::from_secs(3)));
        (ping6(&out_ns, a.id.ipv6, 2, 1), tcp.join().unwrap())
    });
    let o_after = status(&o).map(|s| dropped(&s)).unwrap_or_default();
    println!(
        "(2) outsider -> alpha's {}: ping exit {:?} ({}), tcp/8080 {tcp:?}; outsider drops {:?}",
        a.id.ipv6,
        p.code(),
        ping_summary(&p),
        delta(&o_before, &o_after)
    );
    checks.check(!p.success(), || format!("(2) outsider pinged alpha: {}", p.describe()));
    checks.check(tcp.is_err(), || "(2) outsider connected to alpha tcp/8080".into());
    checks.check(delta(&o_before, &o_after).get("no_route").copied().unwrap_or(0) > 0, || format!("(2) outsider's engine should drop mesh-7 packets as no_route: {:?}", delta(&o_before, &o_after)));
    let rp = ping6(&rogue_ns, a.id.ipv6, 2, 1);
    println!("(2) foreign-owner node -> alpha: ping exit {:?} ({})", rp.code(), ping_summary(&rp));
    checks.check(!rp.success(), || format!("(2) the foreign-owner node pinged alpha: {}", rp.describe()));
    let mp = mesh_ping.join().unwrap();
    println!("(2) outsider: meshtun ping -c 1 {} -> {} after {:.1?}: {}", a.id.address, mp.code().map_or("killed (timeout)".into(), |c| format!("exit {c}")), mp.elapsed, mp.stdout.trim());
    checks.check(!mp.success(), || format!("(2) outsider's `meshtun ping` reached alpha: {}", mp.describe()));

    // --- (5) a host on the underlay injects forged and replayed datagrams.
    let frames: Vec<(SocketAddrV4, SocketAddrV4, Vec<u8>)> = captured
        .frames
        .iter()
        .filter_map(|f| udp_payload(&f.data).map(|(s, d, p)| (s, d, p.to_vec())))
        .collect();
    let a_ep = SocketAddrV4::new(A_IP, NODE_PORT);
    let b_ep = SocketAddrV4::new(B_IP, NODE_PORT);
    let bb_ep = SocketAddrV4::new(BB_IP, BB_PORT);
    let b_to_a: Vec<Vec<u8>> = frames.iter().filter(|(s, d, p)| *s == b_ep && *d == a_ep && p.first() == Some(&4)).map(|f| f.2.clone()).take(10).collect();
    // Handshake initiations between the members, whichever side started,
    // sent directly or (the first one usually is) through the backbone's
    // relay: (destination, initiation, the relay frame it came in).
    let inits: Vec<(SocketAddrV4, Vec<u8>, Option<Vec<u8>>)> = frames
        .iter()
        .filter_map(|(s, d, p)| {
            let member = |x: &SocketAddrV4| *x == a_ep || *x == b_ep;
            if member(s) && member(d) && p.first() == Some(&1) {
                Some((*d, p.clone(), None))
            } else if *s == bb_ep && member(d) && p.starts_with(b"MR\x01") && p.get(11) == Some(&1) {
                Some((*d, p[11..].to_vec(), Some(p.clone())))
            } else {
                None
            }
        })
        .take(2)
        .collect();
    println!(
        "(5) captured the first exchange: {} UDP datagrams; beta->alpha WireGuard to replay {} (types {:?}); initiations to replay {:?}",
        frames.len(),
        b_to_a.len(),
        b_to_a.iter().map(|p| p[0]).collect::<Vec<_>>(),
        inits.iter().map(|(d, _, r)| format!("to {d}{}", if r.is_some() { " via the relay" } else { "" })).collect::<Vec<_>>()
    );
    checks.check(!b_to_a.is_empty() && !inits.is_empty(), || "(5) the capture holds no beta->alpha WireGuard datagrams or member initiation to replay".into());
    let a_before = status(&a).unwrap_or_default();
    let b_before = status(&b).unwrap_or_default();
    let a_pub = wg_public_key(&a.state_dir);

    // Forged messages from the "backbone" and a forged peer intent.
    use meshtun_proto::{Message, RejectCode};
    let rogue_identity = meshtun_proto::Identity::from_file_str(&std::fs::read_to_string(rogue_dir.join("identity")).unwrap()).expect("rogue identity");
    let (_, rogue_signed_cert) = meshtun_proto::cert::SignedCert::from_file_str(&std::fs::read_to_string(&rogue_cert).unwrap()).expect("rogue cert");
    let intent_record = meshtun_proto::NodeRecord {
        network: meshtun_addr::NetworkId(NET),
        node: rogue_identity.node_addr(),
        identity_key: rogue_identity.public_key(),
        pow_nonce: rogue_identity.nonce(),
        wg_key: *boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from([9u8; 32])).as_bytes(),
        endpoints: vec![SocketAddr::new(OUT_IP.into(), 40000)],
        hostname: Some("alpha".into()),
        capabilities: vec!["secret-cap".into()],
        groups: vec!["ops".into()],
        seq: (unix_now_f64() * 1000.0) as u64,
        wg_key_version: 1,
        wg_key_expires_unix: meshtun_proto::record::NO_EXPIRY,
        cert: Some(rogue_signed_cert),
    };
    let intent = meshtun_proto::SignedRecord::sign(&rogue_identity, &intent_record).expect("sign the forged record");
    let forged_crl_file = lab.path("forged.crl");
    write_revocations(&bb_ns, &other, &[1002], 99, &forged_crl_file);
    let forged_crl = meshtun_proto::cert::SignedRevocations::from_file_str(&std::fs::read_to_string(&forged_crl_file).unwrap()).expect("forged CRL");
    let out_ep = SocketAddrV4::new(OUT_IP, 40000);
    let forged_bb: Vec<Vec<u8>> = vec![
        Message::RegisterAck { request_id: 0x1234_5678_9abc, observed: SocketAddr::V4(out_ep), ttl_secs: 60 }.encode(),
        Message::Reject { request_id: 0x1234_5678_9abd, code: RejectCode::Unauthorized, detail: "forged".into() }.encode(),
        Message::LookupReply { request_id: 0x1234_5678_9abe, records: vec![intent.clone()] }.encode(),
        Message::Revocations { list: forged_crl }.encode(),
        Message::PeerIntent { record: intent }.encode(),
    ];

    let mut rng = Rng(0x5eed_0001);
    let fresh_init = handshake_initiation(a_pub, 0xfeed);
    let (sent_counts, replies) = out_ns.in_netns(|| {
        let sock = UdpSocket::bind(out_ep).expect("bind the attacker's socket");
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut n: BTreeMap<&str, usize> = BTreeMap::new();
        let mut send = |what: &'static str, to: SocketAddrV4, p: &[u8]| {
            if sock.send_to(p, to).is_ok() {
                *n.entry(what).or_insert(0) += 1;
            }
        };
        for _ in 0..20 {
            // Garbage: first byte outside WireGuard (1-4), relay/backbone 'M'.
            let mut g = rng.some(1, 300);
            g[0] = 5 + (rng.below(60) as u8);
            send("garbage", a_ep, &g);
        }
        for _ in 0..20 {
            let mut h = rng.bytes(148);
            h[..4].copy_from_slice(&[1, 0, 0, 0]);
            send("random-initiation", a_ep, &h);
        }
        for _ in 0..20 {
            let mut d = rng.some(32, 160);
            d[..4].copy_from_slice(&[4, 0, 0, 0]);
            send("random-data", a_ep, &d);
        }
        for (t, len) in [(2u8, 92usize), (3, 64)] {
            for _ in 0..5 {
                let mut d = rng.bytes(len);
                d[..4].copy_from_slice(&[t, 0, 0, 0]);
                send("random-response-cookie", a_ep, &d);
            }
        }
        for _ in 0..10 {
            let mut r = b"MR\x01".to_vec();
            r.extend_from_slice(&rng.bytes(8));
            r.extend_from_slice(&rng.some(40, 100));
            send("relay-from-attacker", a_ep, &r);
        }
        for _ in 0..10 {
            let mut m = b"MT\x01".to_vec();
            m.extend_from_slice(&rng.some(1, 100));
            send("backbone-junk-from-attacker", a_ep, &m);
        }
        for m in &forged_bb {
            send("backbone-forged-from-attacker", a_ep, m);
        }
        send("valid-initiation-unknown-key", a_ep, &fresh_init);
        for p in &b_to_a {
            send("replay-beta-to-alpha", a_ep, p);
        }
        for (to, p, _) in &inits {
            send("replay-initiation", *to, p);
        }
        // Spoofed: from the backbone's address and port.
        let mut spoof_to = |what: &'static str, to: SocketAddrV4, p: &[u8]| match send_spoofed(bb_ep, to, p) {
            Ok(()) => *n.entry(what).or_insert(0) += 1,
            Err(e) => panic!("spoofed send: {e}"),
        };
        for _ in 0..10 {
            let mut m = b"MT\x01".to_vec();
            m.extend_from_slice(&rng.some(1, 100));
            spoof_to("spoofed-backbone-junk", a_ep, &m);
        }
        for m in &forged_bb {
            spoof_to("spoofed-backbone-forged", a_ep, m);
        }
        for _ in 0..5 {
            let mut r = b"MR\x01".to_vec();
            r.extend_from_slice(&NET.to_be_bytes());
            r.extend_from_slice(&rng.bytes(6));
            let mut h = rng.bytes(148);
            h[..4].copy_from_slice(&[1, 0, 0, 0]);
            r.extend_from_slice(&h);
            spoof_to("spoofed-relay-random-initiation", a_ep, &r);
        }
        for p in &b_to_a {
            let mut r = b"MR\x01".to_vec();
            r.extend_from_slice(&NET.to_be_bytes());
            r.extend_from_slice(&rng.bytes(6));
            r.extend_from_slice(p);
            spoof_to("spoofed-relay-replay", a_ep, &r);
        }
        for (to, _, relayed) in &inits {
            if let Some(frame) = relayed {
                spoof_to("spoofed-relay-replay-initiation", *to, frame);
            }
        }
        let mut fresh_relay = b"MR\x01".to_vec();
        fresh_relay.extend_from_slice(&NET.to_be_bytes());
        fresh_relay.extend_from_slice(&rng.bytes(6));
        fresh_relay.extend_from_slice(&fresh_init);
        spoof_to("spoofed-relay-valid-initiation", a_ep, &fresh_relay);
        // Whatever the victims answer to the attacker's own address.
        let mut replies = Vec::new();
        let until = Instant::now() + Duration::from_secs(3);
        let mut buf = [0u8; 2048];
        while Instant::now() < until {
            if let Ok((len, from)) = sock.recv_from(&mut buf) {
                replies.push((from, buf[..len].to_vec()));
            }
        }
        (n, replies)
    });
    let a_after = status(&a).unwrap_or_default();
    let b_after = status(&b).unwrap_or_default();
    let da = delta(&dropped(&a_before), &dropped(&a_after));
    let db = delta(&dropped(&b_before), &dropped(&b_after));
    println!("(5) injected: {sent_counts:?}");
    println!("(5) alpha's stats.dropped grew by {da:?}");
    println!("(5) beta's stats.dropped grew by {db:?}");
    let grew = |p: &str| stat_u64(&a_after, p).saturating_sub(stat_u64(&a_before, p));
    println!(
        "(5) alpha: bad_records +{}, untrusted_peers +{}, handshakes.rejected +{}, handshakes.completed +{}, cookies sent +{}, lookups_sent +{}",
        grew("/stats/bad_records"),
        grew("/stats/untrusted_peers"),
        grew("/stats/handshakes/rejected"),
        grew("/stats/handshakes/completed"),
        grew("/stats/handshake_cookies_sent"),
        grew("/stats/lookups_sent")
    );
    let reply_types: Vec<String> = replies.iter().map(|(f, p)| format!("{f} type {} len {}", p.first().copied().unwrap_or(0), p.len())).collect();
    println!("(5) datagrams the attacker's socket got back: {reply_types:?}");
    let g = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    checks.check(g(&da, "malformed") >= 20, || format!("(5) alpha's dropped.malformed should grow by >= 20 (garbage): {da:?}"));
    checks.check(g(&da, "wireguard") >= 20, || format!("(5) alpha's dropped.wireguard should grow by >= 20 (random initiations): {da:?}"));
    checks.check(g(&da, "unexpected_source") >= 20, || format!("(5) alpha's dropped.unexpected_source should grow by >= 20 (relay/backbone frames from a non-backbone): {da:?}"));
    let replays = g(&da, "replay") + g(&db, "replay");
    let want = 2 * b_to_a.len() as u64 + inits.iter().map(|(_, _, r)| if r.is_some() { 2 } else { 1 }).sum::<u64>();
    checks.check(replays >= want, || format!("(5) the members should count every replayed datagram ({} beta->alpha direct + relayed, {} initiations) as replay: alpha {da:?}, beta {db:?}", 2 * b_to_a.len(), inits.len()));
    checks.check(grew("/stats/bad_records") >= 1, || "(5) alpha's stats.bad_records did not count the foreign-owner revocation list".into());
    checks.check(grew("/stats/untrusted_peers") >= 1, || "(5) alpha's stats.untrusted_peers did not count the forged peer intent".into());
    checks.check(!replies.iter().any(|(_, p)| p.first() == Some(&2) || p.first() == Some(&4)), || format!("(5) a member answered the attacker with a WireGuard response/data: {reply_types:?}"));
    checks.check(grew("/stats/handshakes/completed") == 0, || "(5) alpha completed a handshake during the injection".into());

    // Nothing changed: alpha stays healthy, registered, still reaches
    // beta directly at beta's endpoint, took no forged peer, endpoint or list.
    let a_now = status(&a);
    checks.check(a_now.is_ok(), || format!("(5) alpha's status fails after the injection: {a_now:?}"));
    a.proc.assert_running("after the injection");
    b.proc.assert_running("after the injection");
    checks.check(a.backbone_state().as_deref() == Ok("registered"), || format!("(5) alpha's backbone state after the injection: {:?}", a.backbone_state()));
    let a_now = a_now.unwrap_or_default();
    let peers: Vec<String> = a_now["peers"].as_array().map(|v| v.iter().map(|p| p["address"].as_str().unwrap_or("").to_string()).collect()).unwrap_or_default();
    checks.check(!peers.contains(&rogue.id.address), || format!("(5) alpha took the forged peer intent's node {} as a peer: {peers:?}", rogue.id.address));
    let endpoints = a_now["endpoints"].to_string();
    checks.check(!endpoints.contains(&OUT_IP.to_string()), || format!("(5) alpha adopted the forged `observed` endpoint: {endpoints}"));
    let r = wait_ping(&a_ns, b.id.ipv6, Duration::from_secs(5), "alpha to ping beta after the injection");
    println!("(5) alpha -> beta ping after the injection: {r:?}");
    checks.ok(r, "(5) after the injection");
    let pb = peer_entry(&a_now, &b.id.address).unwrap_or_default();
    println!("(5) alpha's entry for beta after the injection: {}", harness::nat::describe_peer(&pb));
    checks.check(pb["endpoint"].as_str() == Some(&format!("{B_IP}:{NODE_PORT}")) && pb["path"] == "direct", || format!("(5) alpha's path to beta moved: {}", harness::nat::describe_peer(&pb)));
    let recs = bb.records().unwrap_or_default();
    let has = |addr: &str| recs.iter().any(|r| r["address"].as_str() == Some(addr));
    checks.check(has(&a.id.address) && has(&b.id.address) && has(&o.id.address) && !has(&rogue.id.address), || format!("(5) backbone records after the injection: {recs:?}"));

    // --- (6) the rogue host attacks the backbone itself: a Register with a
    // broken signature claiming alpha's hostname, Deregisters for alpha and
    // beta signed by the wrong key, Lookups in the name of alpha from the
    // wrong address, and junk.
    let bb_before = bb.status().unwrap_or_default();
    let recs_before: Vec<(String, String)> = record_keys(&bb_before);
    let a_mesh: meshtun_addr::MeshAddr = a.id.address.parse().expect("alpha's mesh address");
    let b_mesh: meshtun_addr::MeshAddr = b.id.address.parse().expect("beta's mesh address");
    let mut hijack = intent_record_for_backbone(&rogue_identity, &rogue_cert);
    hijack.hostname = Some("alpha".into());
    let mut bad_sig = meshtun_proto::SignedRecord::sign(&rogue_identity, &hijack).expect("sign");
    bad_sig.signature[0] ^= 0x80;
    let rogue_ep = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 5), 40001);
    let mut attack: Vec<(&str, Vec<u8>)> = vec![
        ("register-bad-signature", Message::Register { request_id: 0x5151, record: bad_sig }.encode()),
        ("deregister-alpha-wrong-key", Message::Deregister { request_id: 0x5152, deregistration: meshtun_proto::message::Deregistration::sign(&rogue_identity, a_mesh, u64::MAX / 2) }.encode()),
        ("deregister-beta-wrong-key", Message::Deregister { request_id: 0x5153, deregistration: meshtun_proto::message::Deregistration::sign(&rogue_identity, b_mesh, u64::MAX / 2) }.encode()),
        ("lookup-as-alpha", Message::Lookup { request_id: 0x5154, from: a_mesh, query: meshtun_proto::Query::Hostname { network: meshtun_addr::NetworkId(NET), name: "beta".into() } }.encode()),
        ("lookup-group-as-beta", Message::Lookup { request_id: 0x5155, from: b_mesh, query: meshtun_proto::Query::Group { network: meshtun_addr::NetworkId(NET), name: "ops".into() } }.encode()),
    ];
    for i in 0..10 {
        let mut m = b"MT\x01".to_vec();
        m.extend_from_slice(&rng.some(1, 100));
        m[3] = 0xF0 | i;
        attack.push(("junk", m));
    }
    let bb_replies: Vec<Message> = rogue_ns.in_netns(|| {
        let sock = UdpSocket::bind(rogue_ep).expect("bind the rogue's socket");
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        for (_, m) in &attack {
            sock.send_to(m, bb_ep).expect("send to the backbone");
        }
        let mut replies = Vec::new();
        let until = Instant::now() + Duration::from_secs(2);
        let mut buf = [0u8; 65536];
        while Instant::now() < until {
            if let Ok((len, _)) = sock.recv_from(&mut buf) {
                if let Ok(m) = Message::decode(&buf[..len]) {
                    replies.push(m);
                }
            }
        }
        replies
    });
    let bb_after = bb.status().unwrap_or_default();
    let recs_after = record_keys(&bb_after);
    let bgrew = |p: &str| stat_u64(&bb_after, p).saturating_sub(stat_u64(&bb_before, p));
    println!("(6) sent {:?}", attack.iter().map(|(w, _)| *w).collect::<Vec<_>>());
    println!("(6) the backbone answered {:?}", bb_replies.iter().map(|m| format!("{m:?}").chars().take(120).collect::<String>()).collect::<Vec<_>>());
    println!(
        "(6) backbone: registrations_rejected +{}, lookups_rejected +{}, dropped_malformed +{}, deregistrations +{}, registrations +{}",
        bgrew("/stats/registrations_rejected"),
        bgrew("/stats/lookups_rejected"),
        bgrew("/stats/dropped_malformed"),
        bgrew("/stats/deregistrations"),
        bgrew("/stats/registrations"),
    );
    checks.check(recs_after == recs_before, || format!("(6) the backbone's records changed: {recs_before:?} -> {recs_after:?}"));
    checks.check(bgrew("/stats/registrations_rejected") >= 1, || "(6) the backbone's registrations_rejected did not count the bad signature".into());
    checks.check(bgrew("/stats/lookups_rejected") >= 2, || "(6) the backbone's lookups_rejected did not count the lookups from the wrong address".into());
    checks.check(bgrew("/stats/dropped_malformed") >= 10, || "(6) the backbone's dropped_malformed did not count the junk".into());
    checks.check(bgrew("/stats/deregistrations") == 0, || "(6) the backbone accepted a forged deregistration".into());
    let rejected = |id: u64| bb_replies.iter().any(|m| matches!(m, Message::Reject { request_id, .. } if *request_id == id));
    checks.check((0x5151..=0x5155).all(rejected), || format!("(6) every forged request should get a Reject: {bb_replies:?}"));
    checks.check(!bb_replies.iter().any(|m| matches!(m, Message::LookupReply { .. } | Message::RegisterAck { .. } | Message::DeregisterAck { .. })), || format!("(6) the backbone answered the rogue with data or an ack: {bb_replies:?}"));
    let res = json_data(&cli(&a_ns, &["resolve", "beta", "--json", "--socket", s(&a.socket)]));
    println!("(6) alpha resolves beta after the attack: {res:?}");
    checks.check(res.as_ref().is_ok_and(|d| d.to_string().contains(&b.id.address)), || format!("(6) alpha cannot resolve beta after the backbone attack: {res:?}"));
    checks.check(a.backbone_state().as_deref() == Ok("registered") && b.backbone_state().as_deref() == Ok("registered"), || "(6) a member lost its registration".into());
    println!("[done] {name} in {:.1?}", t0.elapsed());
    checks.finish();
}

// ---------------------------------------------------------------------------
// 2. expiry and revocation
// ---------------------------------------------------------------------------

/// Background `ping -D` from `ns` to `to` until `deadline_s`; yields the unix
/// times of the replies.
fn ping_timeline(ns: &Ns, to: Ipv6Addr, deadline_s: u64) -> thread::JoinHandle<(Vec<f64>, CmdOutput)> {
    let ns = ns.clone();
    thread::spawn(move || {
        let out = ns.exec_timeout(
            &["ping", "-6", "-n", "-D", "-i", "0.2", "-W", "1", "-w", &deadline_s.to_string(), &to.to_string()],
            Duration::from_secs(deadline_s + 10),
        );
        let times = out
            .stdout
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse::<f64>().ok())
            .collect();
        (times, out)
    })
}

#[test]
fn expired_and_revoked_members_are_cut_off() {
    let name = "expired_and_revoked_members_are_cut_off";
    if !require_root(name) {
        return;
    }
    require_tool("ping", "iputils-ping");
    let t0 = Instant::now();
    let lab = Lab::new("secx");
    let sw = lab.add_switch("sw", "br0");
    let bb_ns = lab.add_host("bb", &sw, "198.18.0.1/24");
    let a_ns = lab.add_host("a", &sw, "198.18.0.2/24");
    let c_ns = lab.add_host("c", &sw, "198.18.0.3/24");
    let d_ns = lab.add_host("d", &sw, "198.18.0.4/24");
    let mut checks = Checks::new();

    let owner = create_owner(&lab, &bb_ns, "owner");
    let crl = lab.path("network-7.crl");
    write_revocations(&bb_ns, &owner, &[1], 1, &crl);
    let bb = start_backbone(&lab, &bb_ns, &owner, Some(&crl));
    let fw: &[&str] = &["--firewall", "allow icmp"];
    let a_id = mesh_id(&a_ns, &lab.path("state-a"), NET);
    let d_id = mesh_id(&d_ns, &lab.path("state-d"), NET);
    let c_id = mesh_id(&c_ns, &lab.path("state-c"), NET);
    sign(&bb_ns, &owner, &a_id.address, &[], "1h", 2001, &lab.path("a.cert"));
    sign(&bb_ns, &owner, &d_id.address, &[], "1h", 2004, &lab.path("d.cert"));
    let a = start_node(&lab, &a_ns, NET, Some(&lab.path("a.cert")), "alpha", fw);
    let d = start_node(&lab, &d_ns, NET, Some(&lab.path("d.cert")), "delta", fw);
    // Signed last, right before it starts: it expires 20 s from now.
    let c_cert = sign(&bb_ns, &owner, &c_id.address, &[], "20s", 2003, &lab.path("c.cert"));
    let c = start_node(&lab, &c_ns, NET, Some(&lab.path("c.cert")), "charlie", fw);
    let c_expires = c_cert["expires_unix"].as_u64().expect("expires_unix") as f64;
    for n in [&a, &c, &d] {
        n.wait_registered(Duration::from_secs(15));
    }
    let c_events = c_ns.spawn("events-c", &[bin(), "events", "--json", "--socket", c.socket.to_str().expect("utf-8 path")]);
    println!("[setup] registered after {:.1?}; charlie's certificate expires in {:.1} s", t0.elapsed(), c_expires - unix_now_f64());

    let rc = wait_ping(&a_ns, c.id.ipv6, Duration::from_secs(10), "alpha to ping charlie (certificate still valid)");
    let rd = wait_ping(&a_ns, d.id.ipv6, Duration::from_secs(10), "alpha to ping delta");
    println!("(expiry) alpha -> charlie works at first: {rc:?}, {:.1} s before expiry", c_expires - unix_now_f64());
    println!("(revoke) alpha -> delta works at first: {rd:?}");
    if checks.ok(rc, "(expiry) first ping").is_none() | checks.ok(rd, "(revoke) first ping").is_none() {
        checks.finish();
        return;
    }
    let c_left = (c_expires - unix_now_f64()).max(0.0) as u64;
    let c_ping = ping_timeline(&a_ns, c.id.ipv6, c_left + HEARTBEAT + 4);
    let d_ping = ping_timeline(&a_ns, d.id.ipv6, 14);
    thread::sleep(Duration::from_secs(1));

    // Revoke delta's serial in the file the backbone watches.
    let revoked_at = unix_now_f64();
    let list = write_revocations(&bb_ns, &owner, &[1, 2004], 2, &crl);
    println!("(revoke) wrote revocation list {list} at unix {revoked_at:.2}");
    let r = poll_until(Duration::from_secs(5 + HEARTBEAT + 4), "the backbone to drop delta and alpha to forget it", || {
        let listed = bb.record_of(&d.id.address)?.is_some();
        let peer = a.peer(&d.id.address)?.is_some();
        if listed || peer {
            Err(format!("backbone lists delta: {listed}; alpha has delta as a peer: {peer}"))
        } else {
            Ok(unix_now_f64() - revoked_at)
        }
    });
    println!("(revoke) backbone and alpha dropped delta {:.2?} s after the list was written", r);
    checks.ok(r, "(revoke)");
    let (d_times, d_out) = d_ping.join().unwrap();
    let d_last = d_times.iter().copied().fold(f64::NAN, f64::max);
    println!(
        "(revoke) alpha's last ping reply from delta {:.2} s after the list was written ({} replies; {})",
        d_last - revoked_at,
        d_times.len(),
        ping_summary(&d_out)
    );
    checks.check(!d_times.is_empty() && d_last - revoked_at <= (5 + HEARTBEAT + 1) as f64, || {
        format!("(revoke) alpha still reached delta {:.2} s after revocation (limit {} s)", d_last - revoked_at, 5 + HEARTBEAT + 1)
    });
    checks.check(d.backbone_state().as_deref() == Ok("rejected"), || format!("(revoke) delta's backbone state: {:?}", d.backbone_state()));

    // Charlie's certificate expires.
    let r = poll_until(Duration::from_secs(c_left + RECORD_TTL + HEARTBEAT + 5), "the backbone to stop listing charlie and alpha to forget it", || {
        let listed = bb.record_of(&c.id.address)?.is_some();
        let peer = a.peer(&c.id.address)?.is_some();
        if listed || peer {
            Err(format!("backbone lists charlie: {listed}; alpha has charlie as a peer: {peer}"))
        } else {
            Ok(unix_now_f64() - c_expires)
        }
    });
    let gone_after = r.clone();
    checks.ok(r, "(expiry)");
    let (c_times, c_out) = c_ping.join().unwrap();
    let c_last = c_times.iter().copied().fold(f64::NAN, f64::max);
    let c_first = c_times.iter().copied().fold(f64::NAN, f64::min);
    println!(
        "(expiry) replies from charlie: first {:.2} s before expiry, last {:+.2} s after expiry ({} replies; {}); backbone and alpha dropped charlie {:+.2?} s after expiry",
        c_expires - c_first,
        c_last - c_expires,
        c_times.len(),
        ping_summary(&c_out),
        gone_after
    );
    checks.check(!c_times.is_empty() && c_last - c_expires <= (HEARTBEAT + 1) as f64, || {
        format!("(expiry) alpha still reached charlie {:+.2} s after expiry (limit {} s)", c_last - c_expires, HEARTBEAT + 1)
    });
    let c_state = c.backbone_state();
    println!("(expiry) charlie's own backbone state now {c_state:?}; alpha's untrusted_peers {}", status(&a).map(|s| stat_u64(&s, "/stats/untrusted_peers")).unwrap_or(0));
    checks.check(gone_after.as_ref().is_ok_and(|g| *g <= (HEARTBEAT + 2) as f64), || {
        format!("(expiry) the backbone should stop listing charlie within one heartbeat of expiry: {gone_after:?} s (limit {} s)", HEARTBEAT + 2)
    });
    // Charlie was told, on its event stream, before and at expiry.
    let seen: Vec<Value> = c_events.log().lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect();
    let at = |kind: &str| seen.iter().position(|e| e["event"] == kind);
    let warned = seen.iter().find(|e| e["event"] == "certificate_expiring").map(|e| e["seconds_left"].clone());
    println!("(expiry) charlie's events: certificate_expiring seconds_left {warned:?}; certificate_expired at line {:?}", at("certificate_expired"));
    checks.check(warned.as_ref().and_then(Value::as_u64).is_some_and(|left| left <= 20) && at("certificate_expiring") < at("certificate_expired"), || {
        format!("(expiry) charlie's `meshtun events` should report certificate_expiring, then certificate_expired: {}", c_events.log_tail(20))
    });
    // alpha itself is unaffected.
    checks.check(a.backbone_state().as_deref() == Ok("registered"), || format!("alpha's backbone state: {:?}", a.backbone_state()));
    println!("[done] {name} in {:.1?}", t0.elapsed());
    checks.finish();
}

// ---------------------------------------------------------------------------
// 3. key rotation under a running transfer
// ---------------------------------------------------------------------------

struct Timed {
    bytes: usize,
    hash: [u8; 32],
    /// (offset from the first byte, length of the gap) of the longest gap.
    max_gap: (Duration, Duration),
    /// Every gap over 300 ms, the same way.
    gaps: Vec<(Duration, Duration)>,
    duration: Duration,
}

/// A one-connection TCP sink that hashes what it reads and records the
/// longest gap between reads.
fn start_timed_sink(ns: &Ns, ip: Ipv6Addr, port: u16) -> thread::JoinHandle<Result<Timed, String>> {
    let (tx, rx) = mpsc::channel();
    let h = ns.spawn_in_netns(move || {
        let l = TcpListener::bind(SocketAddr::new(ip.into(), port)).map_err(|e| format!("bind: {e}"))?;
        let _ = tx.send(());
        l.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 64 * 1024];
        let (mut total, mut first, mut last, mut max_gap) = (0usize, None::<Instant>, None::<Instant>, (Duration::ZERO, Duration::ZERO));
        let mut gaps = Vec::new();
        loop {
            let n = s.read(&mut buf).map_err(|e| format!("read after {total} bytes: {e}"))?;
            if n == 0 {
                break;
            }
            let now = Instant::now();
            let f = *first.get_or_insert(now);
            if let Some(prev) = last {
                if now - prev > max_gap.1 {
                    max_gap = (prev - f, now - prev);
                }
                if now - prev > Duration::from_millis(300) {
                    gaps.push((prev - f, now - prev));
                }
            }
            last = Some(now);
            hasher.update(&buf[..n]);
            total += n;
        }
        let hash = *hasher.finalize().as_bytes();
        s.write_all(&hash).map_err(|e| format!("write hash: {e}"))?;
        let _ = s.shutdown(Shutdown::Write);
        let duration = last.zip(first).map(|(l, f)| l - f).unwrap_or_default();
        Ok(Timed { bytes: total, hash, max_gap, gaps, duration })
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("sink did not start");
    h
}

#[test]
fn key_rotation_mid_transfer_keeps_the_tcp_stream_intact() {
    let name = "key_rotation_mid_transfer_keeps_the_tcp_stream_intact";
    if !require_root(name) {
        return;
    }
    require_tool("ping", "iputils-ping");
    let t0 = Instant::now();
    let lab = Lab::new("secr");
    let sw = lab.add_switch("sw", "br0");
    let bb_ns = lab.add_host("bb", &sw, "198.18.0.1/24");
    let a_ns = lab.add_host("a", &sw, "198.18.0.2/24");
    let b_ns = lab.add_host("b", &sw, "198.18.0.3/24");
    let mut checks = Checks::new();
    let owner = create_owner(&lab, &bb_ns, "owner");
    let _bb = start_backbone(&lab, &bb_ns, &owner, None);
    let a_id = mesh_id(&a_ns, &lab.path("state-a"), NET);
    let b_id = mesh_id(&b_ns, &lab.path("state-b"), NET);
    sign(&bb_ns, &owner, &a_id.address, &[], "1h", 3001, &lab.path("a.cert"));
    sign(&bb_ns, &owner, &b_id.address, &[], "1h", 3002, &lab.path("b.cert"));
    let a = start_node(&lab, &a_ns, NET, Some(&lab.path("a.cert")), "alpha", &["--firewall", "allow icmp"]);
    let b = start_node(&lab, &b_ns, NET, Some(&lab.path("b.cert")), "beta", &["--firewall", "allow icmp", "--firewall", "allow tcp/8080"]);
    a.wait_registered(Duration::from_secs(15));
    b.wait_registered(Duration::from_secs(15));
    let r = wait_ping(&a_ns, b.id.ipv6, Duration::from_secs(15), "alpha to ping beta");
    println!("[setup] ready after {:.1?}; first ping {r:?}", t0.elapsed());
    if checks.ok(r, "[setup] ping").is_none() {
        checks.finish();
        return;
    }
    let a_key0 = wg_key_file(&a.state_dir);
    let b_key0 = wg_key_file(&b.state_dir);
    let hs0 = status(&a).map(|s| stat_u64(&s, "/stats/handshakes/completed") + stat_u64(&s, "/stats/handshakes/initiated")).unwrap_or(0);

    // 6 MiB at 512 KiB/s: about 12 s. beta (the receiver) rotates at 2 s,
    // alpha (the sender) at 10 s: each rotation's stall shows on its own.
    const LEN: usize = 6 << 20;
    const PACE: usize = 512 << 10;
    let data = harness::nat::payload(LEN, 0x0707);
    let sink = start_timed_sink(&b_ns, b.id.ipv6, 8080);
    let (go_tx, go_rx) = mpsc::channel::<Instant>();
    let rot = {
        let (a_ns, b_ns) = (a_ns.clone(), b_ns.clone());
        let (a_sock, b_sock) = (s(&a.socket).to_string(), s(&b.socket).to_string());
        thread::spawn(move || {
            let start = go_rx.recv_timeout(Duration::from_secs(20)).ok()?;
            let mut out = Vec::new();
            for (at, who, ns, sock) in [(2.0, "beta", &b_ns, &b_sock), (10.0, "alpha", &a_ns, &a_sock)] {
                let due = start + Duration::from_secs_f64(at);
                if let Some(w) = due.checked_duration_since(Instant::now()) {
                    thread::sleep(w);
                }
                let when = start.elapsed();
                let o = cli(ns, &["rotate-keys", "--socket", sock, "--json"]);
                out.push((who, when, o.elapsed, json_data(&o)));
            }
            Some(out)
        })
    };
    let sent = send_hashed(&a_ns, b.id.ipv6, 8080, &data, Some(PACE), Duration::from_secs(10), move || {
        let _ = go_tx.send(Instant::now());
    });
    let got = sink.join().unwrap();
    let rotations = rot.join().unwrap().unwrap_or_default();
    for (who, when, took, r) in &rotations {
        println!("(rotate) {who}: rotate-keys at {:.2} s into the transfer ({took:.0?}): {r:?}", when.as_secs_f64());
        checks.check(r.as_ref().is_ok_and(|d| d["version"].as_u64() == Some(2)), || format!("(rotate) {who}'s rotate-keys should report version 2: {r:?}"));
    }
    checks.check(rotations.len() == 2, || format!("(rotate) only {} rotations ran", rotations.len()));
    match (&sent, &got) {
        (Ok(sent), Ok(got)) => {
            println!(
                "(rotate) transfer: {} B in {:.2?} (sink saw data for {:.2?}), hash ok {}, longest stall {:.0?} at {:.2} s",
                got.bytes,
                sent.transfer,
                got.duration,
                sent.hash_ok && got.hash == *blake3::hash(&data).as_bytes(),
                got.max_gap.1,
                got.max_gap.0.as_secs_f64()
            );
            let gaps: Vec<String> = got.gaps.iter().map(|(at, len)| format!("{:.2} s long at {:.2} s", len.as_secs_f64(), at.as_secs_f64())).collect();
            println!("(rotate) gaps over 300 ms in the received stream: {gaps:?}");
            checks.check(sent.hash_ok && got.bytes == LEN && got.hash == *blake3::hash(&data).as_bytes(), || "(rotate) the transfer arrived corrupted or short".into());
            checks.check(sent.transfer > Duration::from_secs(6), || format!("(rotate) transfer took only {:.1?} (must span the rotations)", sent.transfer));
            checks.check(got.max_gap.1 < Duration::from_secs(3), || format!("(rotate) the stream stalled for {:.1?} at {:.2} s (limit 3 s): a rotation should cost a handshake and a key lookup, not seconds", got.max_gap.1, got.max_gap.0.as_secs_f64()));
        }
        _ => {
            checks.check(false, || format!("(rotate) transfer failed: sender {sent:?}; sink {:?}", got.as_ref().map(|g| g.bytes)));
        }
    }
    let b_id_after = mesh_id(&b_ns, &b.state_dir, NET);
    println!("(rotate) beta's address before {} after {}", b.id.address, b_id_after.address);
    checks.check(b_id_after.address == b.id.address && b_id_after.ipv6 == b.id.ipv6, || format!("(rotate) beta's address changed: {} -> {}", b.id.address, b_id_after.address));
    checks.check(wg_key_file(&b.state_dir) != b_key0 && wg_key_file(&a.state_dir) != a_key0, || "(rotate) a WireGuard key file did not change".into());
    let hs1 = status(&a).map(|s| stat_u64(&s, "/stats/handshakes/completed") + stat_u64(&s, "/stats/handshakes/initiated")).unwrap_or(0);
    println!("(rotate) alpha's handshakes (initiated + completed) {hs0} -> {hs1}");
    checks.check(hs1 > hs0, || "(rotate) no new handshake after the rotations: the new keys were never used".into());
    let r = wait_ping(&a_ns, b.id.ipv6, Duration::from_secs(5), "alpha to ping beta after the rotations");
    checks.ok(r, "(rotate) ping afterwards");
    println!("[done] {name} in {:.1?}", t0.elapsed());
    checks.finish();
}
