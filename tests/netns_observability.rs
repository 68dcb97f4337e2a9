//! Observability end to end: Prometheus metrics scraped during a transfer
//! and parsed with a real OpenMetrics parser (the official Prometheus Python
//! client's, Debian `python3-prometheus-client`), `meshtun events --json`,
//! `meshtun status --graph` rendered by Graphviz (`dot`, Debian `graphviz`),
//! JSON logs, and the backbone's picture of the mesh.
//!
//! The namespace test needs root; without it, it prints a skip line and
//! passes. The loopback test needs no root. As root, a missing `dot`,
//! `nft` or parser is a failure naming the Debian package.
//!
//!     cargo test --test netns_observability -- --nocapture
//!
//! Topology (198.18.0.0/15, namespaces `mt-{pid}-{test}-{role}`):
//!
//!     bb 198.18.0.1 ─┐
//!     a  198.18.0.2 ─┼─ sw (bridge br0)
//!     b  198.18.0.3 ─┘
//!
//! Metrics listen on each namespace's own 127.0.0.1 (`--metrics-listen`
//! without an address), and are scraped from a thread inside it.

mod harness;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use harness::meshtun::{bin, cli, identity, status, Backbone, Node, DEFAULT_INTERFACE};
use harness::{is_root, require_root, require_tool, wait_until, Checks, Lab, Ns};
use serde_json::Value;

const BB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const BB_PORT: u16 = 7400;
const NODE_METRICS: &str = "127.0.0.1:9474";
const BACKBONE_METRICS: &str = "127.0.0.1:9475";
const PYTHON: &str = "/usr/bin/python3";

/// Parses an OpenMetrics exposition with prometheus_client's strict parser
/// and prints its samples as JSON.
const PARSER: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"family": fam.name, "type": fam.type, "unit": fam.unit,
                    "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

// ---------------------------------------------------------------------------
// scraping and parsing
// ---------------------------------------------------------------------------

/// `GET path` over HTTP/1.1; returns (status code, headers, body).
fn http_get(addr: &str, path: &str) -> Result<(u16, String, String), String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/openmetrics-text; version=1.0.0, text/plain;q=0.5\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read from {addr}{path}: {e}"))?;
    let text = String::from_utf8(raw).map_err(|e| format!("response is not UTF-8: {e}"))?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("no header end in {text:?}"))?;
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| format!("bad status line: {head}"))?;
    Ok((code, head.to_string(), body.to_string()))
}

/// Is the parser installed? Fails (root) or says why not (otherwise).
fn parser_available() -> Result<(), String> {
    let ok = Command::new(PYTHON)
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{PYTHON} cannot import prometheus_client: install the `python3-prometheus-client` package \
             (apt-get install --no-install-recommends python3-prometheus-client)"
        ))
    }
}

#[derive(Clone, Debug)]
struct Sample {
    family: String,
    kind: String,
    unit: String,
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The scrape, parsed by the real parser.
#[derive(Clone, Debug)]
struct Scrape(Vec<Sample>);

impl Scrape {
    fn parse(text: &str) -> Result<Scrape, String> {
        let mut child = Command::new(PYTHON)
            .args(["-c", PARSER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("run {PYTHON}: {e}"))?;
        child.stdin.take().unwrap().write_all(text.as_bytes()).map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "the OpenMetrics parser rejected the exposition: {}\n--- exposition ---\n{text}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).map_err(|e| format!("parser output: {e}"))?;
        Ok(Scrape(
            rows.into_iter()
                .map(|r| Sample {
                    family: r["family"].as_str().unwrap_or("").into(),
                    kind: r["type"].as_str().unwrap_or("").into(),
                    unit: r["unit"].as_str().unwrap_or("").into(),
                    name: r["name"].as_str().unwrap_or("").into(),
                    labels: r["labels"]
                        .as_object()
                        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string())).collect())
                        .unwrap_or_default(),
                    value: r["value"].as_f64().unwrap_or(f64::NAN),
                })
                .collect(),
        ))
    }

    /// The value of sample `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64, String> {
        self.0
            .iter()
            .find(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .map(|s| s.value)
            .ok_or_else(|| format!("no sample {name}{labels:?} in the scrape"))
    }

    fn family(&self, family: &str) -> Option<&Sample> {
        self.0.iter().find(|s| s.family == family)
    }
}

/// Scrapes `/metrics` at `addr` from inside `ns` and parses it.
fn scrape(ns: &Ns, addr: &str) -> Result<Scrape, String> {
    let addr = addr.to_string();
    let (code, head, body) = ns.in_netns(move || http_get(&addr, "/metrics"))?;
    if code != 200 {
        return Err(format!("HTTP {code}: {head}\n{body}"));
    }
    if !head.to_ascii_lowercase().contains("content-type: application/openmetrics-text") {
        return Err(format!("unexpected content type: {head}"));
    }
    Scrape::parse(&body)
}

// ---------------------------------------------------------------------------
// processes
// ---------------------------------------------------------------------------

fn env() -> Vec<(&'static str, String)> {
    vec![
        ("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into())),
        ("RUST_BACKTRACE", "1".into()),
        ("NO_COLOR", "1".into()),
    ]
}

fn spawn(ns: &Ns, label: &str, args: &[&str]) -> harness::Proc {
    let env = env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    ns.spawn_env(label, args, &env)
}

fn start_backbone(lab: &Lab, ns: &Ns) -> Backbone {
    let socket = lab.path("bb.sock");
    let listen = SocketAddr::new(BB_IP.into(), BB_PORT);
    let listen_s = listen.to_string();
    let proc = spawn(
        ns,
        "backbone",
        &[bin(), "backbone", "--listen", &listen_s, "--socket", socket.to_str().unwrap(), "--record-ttl", "6", "--metrics-listen"],
    );
    let bb = Backbone { ns: ns.clone(), proc, socket, listen };
    wait_until(Duration::from_secs(15), "the backbone's status to answer", || {
        bb.proc.check_running()?;
        bb.status().map(|_| ())
    });
    bb
}

fn start_node(lab: &Lab, ns: &Ns, hostname: &str, extra: &[&str]) -> Node {
    let role = ns.role().to_string();
    let state_dir = lab.path(&format!("state-{role}"));
    std::fs::create_dir_all(&state_dir).unwrap();
    let socket = lab.path(&format!("{role}.sock"));
    let id = identity(ns, &state_dir);
    let bb = SocketAddr::new(BB_IP.into(), BB_PORT).to_string();
    let mut args = vec![
        bin(), "up", "--backbone", &bb, "--hostname", hostname, "--state-dir", state_dir.to_str().unwrap(),
        "--socket", socket.to_str().unwrap(), "--heartbeat-secs", "2", "--dns-port", "0", "--metrics-listen",
    ];
    args.extend_from_slice(extra);
    let proc = spawn(ns, &format!("node-{role}"), &args);
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

/// The path kind ("direct", "relay", "none") of `peer` in `node`'s status.
fn path_to(node: &Node, peer: &str) -> Result<String, String> {
    let p = node.peer(peer)?.ok_or_else(|| format!("{peer} not among {}'s peers", node.hostname))?;
    Ok(p["path"].as_str().unwrap_or("?").to_string())
}

/// Sends paced TCP traffic from `from` to `[to]:port` for `secs`, while
/// the caller scrapes; returns the bytes sent.
fn paced_sender(from: &Ns, to: Ipv6Addr, port: u16, secs: f64) -> thread::JoinHandle<Result<usize, String>> {
    from.spawn_in_netns(move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::new(to.into(), port), Duration::from_secs(10))
            .map_err(|e| format!("connect [{to}]:{port}: {e}"))?;
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let chunk = vec![0x5au8; 32 * 1024];
        let (start, mut sent) = (Instant::now(), 0);
        while start.elapsed().as_secs_f64() < secs {
            s.write_all(&chunk).map_err(|e| format!("write after {sent} bytes: {e}"))?;
            sent += chunk.len();
            thread::sleep(Duration::from_millis(15));
        }
        s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        let _ = s.read(&mut [0u8; 1]);
        Ok(sent)
    })
}

/// A sink that reads until EOF; returns once it listens.
fn sink(ns: &Ns, ip: Ipv6Addr, port: u16) -> thread::JoinHandle<Result<usize, String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = ns.spawn_in_netns(move || {
        let l = TcpListener::bind(SocketAddr::new(ip.into(), port)).map_err(|e| format!("bind [{ip}]:{port}: {e}"));
        let _ = tx.send(l.as_ref().map(|_| ()).map_err(Clone::clone));
        let (mut s, _) = l?.accept().map_err(|e| format!("accept: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => total += n,
                Err(e) => return Err(format!("read after {total} bytes: {e}")),
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => h,
        other => panic!("sink in {}: {other:?}", ns.name()),
    }
}

/// Sends traffic for `secs` while scraping `ns`'s node metrics; returns the
/// scrapes taken while the transfer ran.
fn transfer_and_scrape(from: &Ns, to: &Node, port: u16, secs: f64) -> (usize, Vec<Scrape>) {
    let server = sink(&to.ns, to.id.ipv6, port);
    let sender = paced_sender(from, to.id.ipv6, port, secs);
    let mut scrapes = Vec::new();
    while !sender.is_finished() {
        thread::sleep(Duration::from_millis(300));
        if sender.is_finished() {
            break;
        }
        scrapes.push(scrape(from, NODE_METRICS).unwrap_or_else(|e| panic!("scrape during transfer: {e}")));
    }
    let sent = sender.join().unwrap().unwrap_or_else(|e| panic!("sender: {e}"));
    let received = server.join().unwrap().unwrap_or_else(|e| panic!("sink: {e}"));
    assert_eq!(sent, received, "the sink got {received} of {sent} bytes");
    (sent, scrapes)
}

/// With MESHTUN_TEST_ARTIFACTS=DIR, keeps what the test looked at (pages,
/// pictures, scrapes) for a person to look at too.
fn save_artifact(name: &str, content: &str) {
    if let Some(dir) = std::env::var_os("MESHTUN_TEST_ARTIFACTS") {
        let dir = std::path::PathBuf::from(dir);
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join(name), content);
    }
}

fn check_dot_renders(checks: &mut Checks, lab: &Lab, what: &str, dot: &str, names: &[&str]) {
    for name in names {
        checks.check(dot.contains(&format!("\"{name}\"")), || format!("{what}: the DOT does not name {name}:\n{dot}"));
    }
    let file = lab.path(&format!("{}.dot", what.replace(' ', "-")));
    std::fs::write(&file, dot).unwrap();
    let out = Command::new("dot").args(["-Tsvg", file.to_str().unwrap()]).output().expect("run dot");
    let svg = String::from_utf8_lossy(&out.stdout);
    save_artifact(&format!("{what}.dot"), dot);
    save_artifact(&format!("{what}.dot.svg"), &svg);
    checks.check(out.status.success() && svg.contains("<svg"), || {
        format!("{what}: `dot -Tsvg` failed: {}\n{dot}", String::from_utf8_lossy(&out.stderr))
    });
    for name in names {
        checks.check(svg.contains(name), || format!("{what}: the rendered SVG does not show {name}"));
    }
}

/// Event lines `meshtun events --json` printed so far.
fn events_of(proc: &harness::Proc) -> Vec<Value> {
    proc.log().lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|v| v.get("event").is_some()).collect()
}

fn find_event<'a>(events: &'a [Value], kind: &str, peer: &str, pred: impl Fn(&Value) -> bool) -> Option<&'a Value> {
    events.iter().find(|e| e["event"] == kind && e["peer"] == peer && pred(e))
}

// ---------------------------------------------------------------------------
// tests
// ---------------------------------------------------------------------------

#[test]
fn metrics_events_and_mesh_picture_follow_a_transfer_from_direct_to_relay() {
    if !require_root("metrics_events_and_mesh_picture_follow_a_transfer_from_direct_to_relay") {
        return;
    }
    require_tool("ping", "iputils-ping");
    require_tool("nft", "nftables");
    require_tool("dot", "graphviz");
    parser_available().unwrap_or_else(|e| panic!("{e}"));
    let t0 = Instant::now();
    let lab = Lab::new("obs");
    let sw = lab.add_switch("sw", "br0");
    let bb_ns = lab.add_host("bb", &sw, "198.18.0.1/24");
    let a_ns = lab.add_host("a", &sw, "198.18.0.2/24");
    let b_ns = lab.add_host("b", &sw, "198.18.0.3/24");
    let backbone = start_backbone(&lab, &bb_ns);
    let a = start_node(&lab, &a_ns, "alpha", &[]);
    let b = start_node(&lab, &b_ns, "beta", &["--log-format", "json"]);
    a.wait_registered(Duration::from_secs(15));
    b.wait_registered(Duration::from_secs(15));
    let (alpha, beta) = (a.id.address.clone(), b.id.address.clone());
    println!("[setup] alpha {alpha}, beta {beta}, registered after {:.1?}", t0.elapsed());
    let mut checks = Checks::new();

    // The event stream, subscribed before anything happens between a and b.
    let events = spawn(&a_ns, "events-a", &[bin(), "events", "--json", "--socket", a.socket.to_str().unwrap()]);
    wait_until(Duration::from_secs(10), "`meshtun events` to subscribe", || {
        events.check_running()?;
        events_of(&events).iter().any(|e| e["event"] == "subscribed").then_some(()).ok_or_else(|| events.log())
    });

    // Before any traffic: every family is there, nothing moved.
    let before = scrape(&a_ns, NODE_METRICS).unwrap_or_else(|e| panic!("first scrape of alpha: {e}"));
    for family in [
        "meshtun_peers",
        "meshtun_path_packets",
        "meshtun_path_bytes",
        "meshtun_relay_traffic_ratio",
        "meshtun_handshakes_initiated",
        "meshtun_handshake_failures",
        "meshtun_punch_attempts",
        "meshtun_punch_results",
        "meshtun_packets_dropped",
        "meshtun_lookup_duration_seconds",
    ] {
        checks.check(before.family(family).is_some(), || format!("alpha's scrape lacks the {family} family"));
    }
    for reason in ["no_route", "firewall", "malformed", "replay", "rate_limited"] {
        checks.ok(before.get("meshtun_packets_dropped_total", &[("reason", reason)]), "drop reasons");
    }
    if let Some(s) = before.family("meshtun_path_bytes") {
        checks.check(s.kind == "counter" && s.unit == "bytes", || format!("meshtun_path_bytes is {s:?}"));
    }
    checks.check(before.get("meshtun_peers", &[("path", "direct")]) == Ok(0.0), || "alpha has direct peers before any traffic".into());

    // First contact: lookup, handshake, probing: the pair goes direct.
    let out = a_ns.exec(&["ping", "-6", "-n", "-c", "3", "-i", "0.2", "-W", "2", &b.id.ipv6.to_string()]);
    assert!(out.success(), "ping alpha -> beta: {}", out.describe());
    wait_until(Duration::from_secs(10), "alpha to reach beta directly", || match path_to(&a, &beta)? {
        p if p == "direct" => Ok(()),
        p => Err(format!("path {p}")),
    });

    // A paced transfer, scraped while it runs: the direct counters grow.
    let (sent, during) = transfer_and_scrape(&a_ns, &b, 5001, 1.5);
    println!("[direct] sent {sent} bytes, {} scrapes during the transfer", during.len());
    assert!(during.len() >= 2, "expected at least two scrapes during the transfer, got {}", during.len());
    let out_bytes = |s: &Scrape, path| s.get("meshtun_path_bytes_total", &[("path", path), ("direction", "out")]);
    let (first, last) = (&during[0], &during[during.len() - 1]);
    let (d0, d1) = (out_bytes(first, "direct").unwrap(), out_bytes(last, "direct").unwrap());
    checks.check(d1 - d0 >= 256.0 * 1024.0, || format!("direct out bytes grew only {d0} -> {d1} during the transfer"));
    let after_direct = scrape(&a_ns, NODE_METRICS).unwrap();
    checks.check(out_bytes(&after_direct, "direct").unwrap() >= sent as f64, || "direct out bytes below the bytes sent".into());
    checks.check(after_direct.get("meshtun_peers", &[("path", "direct")]) == Ok(1.0), || "alpha: meshtun_peers{path=direct} != 1".into());
    checks.check(after_direct.get("meshtun_handshakes_completed_total", &[]).unwrap_or(0.0) >= 1.0, || "no handshake counted".into());
    checks.check(after_direct.get("meshtun_punch_results_total", &[("result", "direct")]).unwrap_or(0.0) >= 1.0, || {
        "no successful punch counted".into()
    });
    checks.check(after_direct.get("meshtun_lookup_duration_seconds_count", &[]).unwrap_or(0.0) >= 1.0, || {
        "the lookup latency histogram is empty".into()
    });
    let b_scrape = scrape(&b_ns, NODE_METRICS).unwrap();
    checks.check(
        b_scrape.get("meshtun_path_bytes_total", &[("path", "direct"), ("direction", "in")]).unwrap_or(0.0) >= sent as f64,
        || "beta's direct in bytes below the bytes sent".into(),
    );

    // Cut the direct path (UDP between a and b only): with traffic flowing,
    // a falls back to the backbone's relay within a few seconds.
    let rules = format!(
        "table inet mtobs {{ chain out {{ type filter hook output priority 0; ip daddr {B_IP} ip protocol udp drop; }}; \
         chain in {{ type filter hook input priority 0; ip saddr {B_IP} ip protocol udp drop; }}; }}"
    );
    a_ns.exec_ok(&["nft", &rules]);
    let pinger = spawn(&a_ns, "ping-a", &["ping", "-6", "-n", "-i", "0.2", "-c", "100", &b.id.ipv6.to_string()]);
    let t = Instant::now();
    wait_until(Duration::from_secs(20), "alpha to fall back to the relay", || match path_to(&a, &beta)? {
        p if p == "relay" => Ok(()),
        p => Err(format!("path {p}")),
    });
    println!("[relay] fell back after {:.1?}", t.elapsed());
    let (sent, during) = transfer_and_scrape(&a_ns, &b, 5002, 1.5);
    pinger.terminate(Duration::from_secs(1));
    println!("[relay] sent {sent} bytes, {} scrapes during the transfer", during.len());
    let (first, last) = (&during[0], &during[during.len() - 1]);
    let (r0, r1) = (out_bytes(first, "relay").unwrap(), out_bytes(last, "relay").unwrap());
    checks.check(r1 - r0 >= 256.0 * 1024.0, || format!("relay out bytes grew only {r0} -> {r1} during the relayed transfer"));
    let after_relay = scrape(&a_ns, NODE_METRICS).unwrap();
    if let Ok((_, _, text)) = a_ns.in_netns(|| http_get(NODE_METRICS, "/metrics")) {
        save_artifact("alpha-metrics.txt", &text);
    }
    checks.check(after_relay.get("meshtun_peers", &[("path", "relay")]) == Ok(1.0), || "alpha: meshtun_peers{path=relay} != 1".into());
    checks.check(after_relay.get("meshtun_peers", &[("path", "direct")]) == Ok(0.0), || "alpha: still counts a direct peer".into());
    let ratio = after_relay.get("meshtun_relay_traffic_ratio", &[]).unwrap_or(0.0);
    checks.check(ratio > 0.15 && ratio < 1.0, || format!("relay share {ratio} (expected between 0.15 and 1 after a relayed transfer)"));
    checks.check(after_relay.get("meshtun_punch_attempts_total", &[]).unwrap_or(0.0) >= 2.0, || {
        "the fallback did not start a new punching attempt".into()
    });

    let bb = scrape(&bb_ns, BACKBONE_METRICS).unwrap_or_else(|e| panic!("backbone scrape: {e}"));
    if let Ok((_, _, text)) = bb_ns.in_netns(|| http_get(BACKBONE_METRICS, "/metrics")) {
        save_artifact("backbone-metrics.txt", &text);
    }
    checks.check(bb.get("meshtun_relay_bytes_total", &[]).unwrap_or(0.0) >= sent as f64, || "backbone relay bytes below the bytes sent".into());
    checks.check(bb.get("meshtun_relay_active_pairs", &[]) == Ok(1.0), || "backbone does not count one relaying pair".into());
    checks.check(bb.get("meshtun_backbone_records", &[]) == Ok(2.0), || "backbone records != 2".into());
    checks.check(bb.get("meshtun_backbone_registrations_total", &[("result", "accepted")]).unwrap_or(0.0) >= 2.0, || {
        "backbone counted fewer than 2 registrations".into()
    });
    checks.check(bb.get("meshtun_backbone_lookups_total", &[("kind", "address")]).unwrap_or(0.0) >= 1.0, || {
        "backbone counted no address lookup".into()
    });

    // What `meshtun events --json` saw.
    let seen = events_of(&events);
    save_artifact("alpha-events.ndjson", &events.log());
    checks.check(find_event(&seen, "peer_added", &beta, |_| true).is_some(), || format!("no peer_added for beta in {seen:?}"));
    checks.check(find_event(&seen, "peer_up", &beta, |_| true).is_some(), || format!("no peer_up for beta in {seen:?}"));
    checks.check(
        find_event(&seen, "path_changed", &beta, |e| e["to"].as_str().is_some_and(|t| t.starts_with("direct"))).is_some(),
        || format!("no path_changed to direct for beta in {seen:?}"),
    );
    checks.check(
        find_event(&seen, "path_changed", &beta, |e| {
            e["to"].as_str().is_some_and(|t| t.starts_with("relay")) && e["reason"].as_str().is_some_and(|r| !r.is_empty())
        })
        .is_some(),
        || format!("no path_changed to relay (with a reason) for beta in {seen:?}"),
    );
    checks.check(seen.iter().all(|e| e["time"].as_str().is_some_and(|t| t.ends_with('Z'))), || "an event without a time".into());

    // Pictures: the node's DOT (every peer named, renders with Graphviz).
    let out = cli(&a_ns, &["status", "--graph", "--socket", a.socket.to_str().unwrap()]);
    checks.check(out.success(), || format!("status --graph: {}", out.describe()));
    checks.check(out.stdout.contains("relay via"), || format!("alpha's DOT does not show the relayed path:\n{}", out.stdout));
    check_dot_renders(&mut checks, &lab, "alpha", &out.stdout, &[&alpha, &beta]);
    let out = cli(&bb_ns, &["status", "--graph", "--socket", backbone.socket.to_str().unwrap()]);
    check_dot_renders(&mut checks, &lab, "backbone", &out.stdout, &[&alpha, &beta]);
    // The backbone's page and SVG on its metrics port.
    for path in ["/", "/mesh.svg"] {
        match bb_ns.in_netns(move || http_get(BACKBONE_METRICS, path)) {
            Ok((200, _, body)) => {
                save_artifact(if path == "/" { "backbone.html" } else { "backbone-mesh.svg" }, &body);
                checks.check(body.contains("<svg") && body.contains(&alpha) && body.contains(&beta), || {
                    format!("backbone {path} does not draw both nodes:\n{body}")
                });
                checks.check(body.contains("relay "), || format!("backbone {path} does not show the relayed pair"));
            }
            other => {
                checks.check(false, || format!("backbone GET {path}: {other:?}"));
            }
        }
    }

    // JSON logs: beta's stderr lines are JSON objects, peer events in a
    // `peer` span keyed by the mesh address.
    let log = b.proc.log();
    let json_lines: Vec<Value> = log.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect();
    checks.check(json_lines.len() >= 5, || format!("beta (--log-format json) wrote few JSON lines:\n{log}"));
    checks.check(json_lines.iter().any(|l| l["span"]["name"] == "peer" && l["span"]["peer"] == alpha.as_str()), || {
        format!("no log line of beta in a peer span for {alpha}")
    });

    // Status still answers and the daemons survived.
    checks.ok(status(&a_ns, &a.socket).map(|_| ()), "alpha status");
    for p in [&a.proc, &b.proc, &backbone.proc] {
        checks.ok(p.check_running(), "daemon alive");
    }
    println!("[done] after {:.1?}", t0.elapsed());
    checks.finish();
    drop(sw);
}

/// No root needed: a backbone on loopback serves the exposition, the page
/// and the DOT; `meshtun events` against a backbone is a clear error.
#[test]
fn backbone_serves_openmetrics_and_a_page_on_loopback() {
    if let Err(e) = parser_available() {
        assert!(!is_root(), "{e}");
        println!("skipping the OpenMetrics parse: {e}");
    }
    let parser = parser_available().is_ok();
    let dir = std::env::temp_dir().join(format!("mt-{}-obs-loop", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let free = |proto_udp: bool| -> u16 {
        if proto_udp {
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
        } else {
            TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
        }
    };
    let (udp, http) = (free(true), free(false));
    let socket = dir.join("bb.sock");
    let metrics = format!("127.0.0.1:{http}");
    let child = Command::new(bin())
        .args(["backbone", "--listen", &format!("127.0.0.1:{udp}"), "--socket", socket.to_str().unwrap(), "--metrics-listen", &metrics])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start meshtun backbone");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut guard = Kill(child);
    let body = wait_until(Duration::from_secs(10), "the backbone's metrics endpoint", || {
        if let Ok(Some(status)) = guard.0.try_wait() {
            panic!("meshtun backbone exited: {status}");
        }
        match http_get(&metrics, "/metrics")? {
            (200, _, body) => Ok(body),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(body.ends_with("# EOF\n"), "no # EOF terminator:\n{body}");
    for needle in ["meshtun_backbone_records 0", "meshtun_relay_bytes_total 0", "# UNIT meshtun_relay_bytes bytes", "meshtun_backbone_lookups_total{kind=\"address\"} 0"] {
        assert!(body.contains(needle), "missing {needle:?}:\n{body}");
    }
    if parser {
        let scrape = Scrape::parse(&body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(scrape.get("meshtun_backbone_records", &[]), Ok(0.0));
        assert_eq!(scrape.family("meshtun_backbone_registrations").map(|s| s.kind.as_str()), Some("counter"));
    }
    let (code, head, page) = http_get(&metrics, "/").unwrap();
    assert_eq!(code, 200, "{head}");
    assert!(head.to_ascii_lowercase().contains("text/html") && page.contains("<svg") && page.contains("</html>"), "{page}");
    assert_eq!(http_get(&metrics, "/nope").unwrap().0, 404);
    let dot = http_get(&metrics, "/mesh.dot").unwrap().2;
    assert!(dot.starts_with("graph meshtun {"), "{dot}");

    // `meshtun events` needs a node, and says so.
    let out = Command::new(bin()).args(["events", "--json", "--socket", socket.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("\"status\":\"error\""), "events on a backbone: {text}");
    drop(guard);
    let _ = std::fs::remove_dir_all(&dir);
}
