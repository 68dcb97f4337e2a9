//! Prometheus metrics and the mesh picture over HTTP (`--metrics-listen`).
//!
//! A tiny HTTP/1.1 responder on a tokio `TcpListener`: every request is
//! handed to the daemon's main loop over a channel (like the control
//! socket), which answers from a snapshot of the sans-IO core, so the packet
//! path takes no locks. Metrics are encoded with `prometheus-client` in the
//! OpenMetrics text format (what Prometheus asks for first); the names and
//! labels are documented in docs/OBSERVABILITY.md.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use meshtun_backbone::DirectoryStats;
use meshtun_overlay::NodeStatus;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::cli_error::CliError;
use crate::events::EventCounters;

/// Where `--metrics-listen` without an address listens: the node.
pub const DEFAULT_NODE_LISTEN: &str = "127.0.0.1:9474";
/// ... and the backbone (so both fit on one host).
pub const DEFAULT_BACKBONE_LISTEN: &str = "127.0.0.1:9475";

/// The OpenMetrics text format, which Prometheus negotiates first.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const MAX_REQUEST_HEAD: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub use crate::config::parse_listen;

/// An HTTP request waiting for the main loop's answer.
pub struct HttpRequest {
    /// The request path without the query string, e.g. `/metrics`.
    pub path: String,
    pub reply: oneshot::Sender<HttpResponse>,
}

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn ok(content_type: &'static str, body: impl Into<Vec<u8>>) -> HttpResponse {
        HttpResponse { status: 200, content_type, body: body.into() }
    }

    pub fn not_found(paths: &str) -> HttpResponse {
        HttpResponse {
            status: 404,
            content_type: "text/plain; charset=utf-8",
            body: format!("not found; try {paths}\n").into_bytes(),
        }
    }

    fn error(status: u16, message: &str) -> HttpResponse {
        HttpResponse { status, content_type: "text/plain; charset=utf-8", body: format!("{message}\n").into_bytes() }
    }
}

/// Binds the metrics listener (a busy port is a clear `port_busy` error).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::AddrInUse { "port_busy" } else { "io_error" };
        CliError::new(code, format!("cannot serve metrics on {addr}: {e}"))
            .hint("pick another address with --metrics-listen IP:PORT")
            .into()
    })
}

/// Accepts HTTP connections and forwards each GET to the main loop.
pub async fn serve(listener: TcpListener, to_main: mpsc::Sender<HttpRequest>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let to_main = to_main.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(IO_TIMEOUT * 2, handle(stream, to_main)).await;
        });
    }
}

async fn handle(mut stream: TcpStream, to_main: mpsc::Sender<HttpRequest>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = tokio::time::timeout(IO_TIMEOUT, stream.read(&mut buf)).await.map_err(|_| std::io::ErrorKind::TimedOut)??;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST_HEAD {
            return respond(&mut stream, &HttpResponse::error(431, "request header too large"), false).await;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut parts = text.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let response = if method != "GET" && method != "HEAD" {
        HttpResponse::error(405, "only GET and HEAD")
    } else {
        let path = target.split(['?', '#']).next().unwrap_or("/").to_string();
        let (reply, answer) = oneshot::channel();
        if to_main.send(HttpRequest { path, reply }).await.is_err() {
            HttpResponse::error(503, "shutting down")
        } else {
            match tokio::time::timeout(IO_TIMEOUT, answer).await {
                Ok(Ok(response)) => response,
                _ => HttpResponse::error(503, "no answer from the daemon"),
            }
        }
    };
    respond(&mut stream, &response, method == "HEAD").await
}

async fn respond(stream: &mut TcpStream, response: &HttpResponse, head_only: bool) -> std::io::Result<()> {
    let reason = match response.status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let header = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    if !head_only {
        stream.write_all(&response.body).await?;
    }
    stream.flush().await?;
    stream.shutdown().await
}

// ---------------------------------------------------------------------------
// encoding
// ---------------------------------------------------------------------------

type Labels<'a> = Vec<(&'a str, &'a str)>;

/// Writes metric families into an OpenMetrics exposition.
struct Exposition<'a> {
    encoder: DescriptorEncoder<'a>,
}

impl Exposition<'_> {
    fn counter(&mut self, name: &str, help: &str, unit: Option<Unit>, samples: &[(Labels, u64)]) -> std::fmt::Result {
        let mut metric = self.encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
        for (labels, value) in samples {
            ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn counter1(&mut self, name: &str, help: &str, unit: Option<Unit>, value: u64) -> std::fmt::Result {
        let metric = self.encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
        ConstCounter::new(value).encode(metric)
    }

    fn gauge<N: EncodeGaugeValue + Copy + std::fmt::Debug + Send + Sync + 'static>(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        samples: &[(Labels, N)],
    ) -> std::fmt::Result {
        let mut metric = self.encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
        for (labels, value) in samples {
            ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn gauge1<N: EncodeGaugeValue + Copy + std::fmt::Debug + Send + Sync + 'static>(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        value: N,
    ) -> std::fmt::Result {
        let metric = self.encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
        ConstGauge::new(value).encode(metric)
    }

    /// `buckets`: (upper bound, count in that bucket alone), the last +Inf.
    fn histogram(&mut self, name: &str, help: &str, unit: Unit, sum: f64, count: u64, buckets: &[(f64, u64)]) -> std::fmt::Result {
        let mut metric = self.encoder.encode_descriptor(name, help, Some(&unit), MetricType::Histogram)?;
        metric.encode_histogram::<NoLabelSet>(sum, count, buckets, None)
    }
}

/// Encodes with a fresh registry whose one collector writes `f`'s metrics,
/// then the `# EOF` line.
fn expose(f: impl Fn(&mut Exposition) -> std::fmt::Result + Send + Sync + 'static) -> String {
    struct Collect<F>(F);
    impl<F> std::fmt::Debug for Collect<F> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("meshtun collector")
        }
    }
    impl<F: Fn(&mut Exposition) -> std::fmt::Result + Send + Sync + 'static> prometheus_client::collector::Collector for Collect<F> {
        fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
            (self.0)(&mut Exposition { encoder })
        }
    }
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Collect(f)));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    out
}

fn ratio() -> Unit {
    Unit::Other("ratio".into())
}

/// What the node's main loop hands over for one scrape.
pub struct NodeSnapshot {
    pub status: NodeStatus,
    pub events: EventCounters,
    pub start_time_unix: f64,
}

/// The node's metrics (OpenMetrics text).
pub fn encode_node(snapshot: NodeSnapshot) -> String {
    expose(move |m| node_metrics(m, &snapshot))
}

fn node_metrics(m: &mut Exposition, snap: &NodeSnapshot) -> std::fmt::Result {
    let st = &snap.status;
    let s = &st.stats;
    let hostname = st.hostname.clone().unwrap_or_default();
    m.gauge(
        "meshtun_node_info",
        "This node (always 1); labels carry its mesh address, hostname and version.",
        None,
        &[(vec![("address", st.address.as_str()), ("hostname", hostname.as_str()), ("version", env!("CARGO_PKG_VERSION"))], 1i64)],
    )?;
    m.gauge1("meshtun_start_time_seconds", "When the daemon started (Unix time).", None, snap.start_time_unix)?;
    if let Some(not_after) = snap.events.certificate_not_after_unix {
        m.gauge1(
            "meshtun_certificate_expiry_timestamp_seconds",
            "When this node's membership certificate expires (Unix time; private networks only).",
            None,
            not_after as i64,
        )?;
    }

    let mut by_path = [("direct", 0i64), ("relay", 0), ("none", 0)];
    for p in &st.peers {
        if let Some(slot) = by_path.iter_mut().find(|(k, _)| *k == p.path) {
            slot.1 += 1;
        }
    }
    let peers: Vec<(Labels, i64)> = by_path.iter().map(|(k, v)| (vec![("path", *k)], *v)).collect();
    m.gauge("meshtun_peers", "Known peers by the path their traffic takes now (none: no path confirmed yet).", None, &peers)?;
    let up = st.peers.iter().filter(|p| p.up_for_secs.is_some()).count();
    m.gauge1("meshtun_peers_up", "Peers that have sent authenticated WireGuard traffic.", None, up as i64)?;

    let w = &s.wire;
    let wire = |f: fn(&meshtun_overlay::Traffic) -> u64| -> Vec<(Labels, u64)> {
        vec![
            (vec![("path", "direct"), ("direction", "out")], f(&w.direct_tx)),
            (vec![("path", "direct"), ("direction", "in")], f(&w.direct_rx)),
            (vec![("path", "relay"), ("direction", "out")], f(&w.relay_tx)),
            (vec![("path", "relay"), ("direction", "in")], f(&w.relay_rx)),
        ]
    };
    m.counter("meshtun_path_packets", "WireGuard datagrams sent (out) and received (in), by path kind.", None, &wire(|t| t.packets))?;
    m.counter(
        "meshtun_path",
        "UDP payload bytes of WireGuard datagrams sent (out) and received (in), by path kind (relay framing included).",
        Some(Unit::Bytes),
        &wire(|t| t.bytes),
    )?;
    let relay_bytes = (w.relay_tx.bytes + w.relay_rx.bytes) as f64;
    let all_bytes = relay_bytes + (w.direct_tx.bytes + w.direct_rx.bytes) as f64;
    m.gauge1(
        "meshtun_relay_traffic",
        "Share of WireGuard bytes (both directions, since start) that went through a relay; alert above 0.15.",
        Some(ratio()),
        if all_bytes > 0.0 { relay_bytes / all_bytes } else { 0.0 },
    )?;
    m.counter(
        "meshtun_tunnel_packets",
        "IP packets carried through the tunnel: read from the TUN and sent (out), received and written to the TUN (in).",
        None,
        &[(vec![("direction", "out")], s.tx_packets), (vec![("direction", "in")], s.rx_packets)],
    )?;
    m.counter(
        "meshtun_tunnel",
        "IP packet bytes carried through the tunnel (before WireGuard).",
        Some(Unit::Bytes),
        &[(vec![("direction", "out")], s.tx_bytes), (vec![("direction", "in")], s.rx_bytes)],
    )?;

    let h = &s.handshakes;
    m.counter1("meshtun_handshakes_initiated", "WireGuard handshake initiations sent (first tries, retries, rekeys).", None, h.initiated)?;
    m.counter1("meshtun_handshakes_completed", "WireGuard handshakes completed (as initiator or responder).", None, h.completed)?;
    m.counter(
        "meshtun_handshake_failures",
        "WireGuard handshakes that failed: refused by WireGuard (rejected) or given up after 90 s (timeout).",
        None,
        &[(vec![("reason", "rejected")], h.rejected), (vec![("reason", "timeout")], h.timed_out)],
    )?;

    let p = &s.sessions;
    m.gauge1("meshtun_peers_parked", "Peers whose idle WireGuard session is parked (no session state held; the next packet handshakes again).", None, p.parked as i64)?;
    m.counter1("meshtun_sessions_parked", "Idle WireGuard sessions parked.", None, p.parks)?;
    m.counter(
        "meshtun_sessions_unparked",
        "Parked WireGuard sessions recreated, by what woke them: a packet to send (outbound) or a datagram from the peer (inbound).",
        None,
        &[(vec![("by", "outbound")], p.unparks_outbound), (vec![("by", "inbound")], p.unparks_inbound)],
    )?;

    let e = &snap.events;
    m.counter1(
        "meshtun_punch_attempts",
        "Hole-punching attempts: a new peer, or one whose direct path died, starts probing its endpoints.",
        None,
        e.punch_attempts,
    )?;
    m.counter(
        "meshtun_punch_results",
        "Finished punching attempts: a direct path answered (direct) or the peer was still relayed 10 s later (relayed).",
        None,
        &[(vec![("result", "direct")], e.punch_direct), (vec![("result", "relayed")], e.punch_relayed)],
    )?;
    let events: Vec<(Labels, u64)> = e.by_kind.iter().map(|(k, v)| (vec![("event", k.as_str())], *v)).collect();
    m.counter("meshtun_events", "Events reported (what `meshtun events` streams), by kind.", None, &events)?;

    // Every drop reason the core knows, zeros included, so alerts can be
    // written before the first drop.
    let dropped: Vec<(String, u64)> = match serde_json::to_value(&s.dropped) {
        Ok(serde_json::Value::Object(map)) => map.into_iter().map(|(k, v)| (k, v.as_u64().unwrap_or(0))).collect(),
        _ => Vec::new(),
    };
    let dropped: Vec<(Labels, u64)> = dropped.iter().map(|(k, v)| (vec![("reason", k.as_str())], *v)).collect();
    m.counter("meshtun_packets_dropped", "Packets and datagrams the node did not deliver, by reason.", None, &dropped)?;

    m.counter1("meshtun_lookups_sent", "Lookup requests sent to backbones (retries included).", None, s.lookups_sent)?;
    m.counter1("meshtun_lookups_failed", "Lookups that found nothing or got no answer.", None, s.lookups_failed)?;
    let hist = &s.lookup_latency;
    let bounds = meshtun_overlay::LOOKUP_LATENCY_BOUNDS.iter().copied().chain([f64::INFINITY]);
    let buckets: Vec<(f64, u64)> = bounds.zip(hist.buckets.iter().copied()).collect();
    m.histogram(
        "meshtun_lookup_duration",
        "Time from the start of a lookup to the backbone's answer.",
        Unit::Seconds,
        hist.sum_secs,
        hist.count,
        &buckets,
    )?;
    m.counter1("meshtun_bad_records", "Records from a backbone that failed verification or did not answer the query.", None, s.bad_records)?;

    let mut states: Vec<(String, i64)> =
        ["connecting", "registered", "unreachable", "rejected", "deregistered"].iter().map(|s| (s.to_string(), 0)).collect();
    for b in &st.backbones {
        let state = serde_json::to_value(b.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        match states.iter_mut().find(|(k, _)| *k == state) {
            Some(slot) => slot.1 += 1,
            None => states.push((state, 1)),
        }
    }
    let states: Vec<(Labels, i64)> = states.iter().map(|(k, v)| (vec![("state", k.as_str())], *v)).collect();
    m.gauge("meshtun_backbones", "Configured backbones by registration state.", None, &states)?;
    Ok(())
}

/// What the backbone's main loop hands over for one scrape.
pub struct BackboneSnapshot {
    pub stats: DirectoryStats,
    pub records: usize,
    /// Pairs that relayed within the last minute.
    pub active_relay_pairs: usize,
    pub start_time_unix: f64,
}

/// The backbone's (and relay's) metrics (OpenMetrics text).
pub fn encode_backbone(snapshot: BackboneSnapshot) -> String {
    expose(move |m| backbone_metrics(m, &snapshot))
}

fn backbone_metrics(m: &mut Exposition, snap: &BackboneSnapshot) -> std::fmt::Result {
    let s = &snap.stats;
    m.gauge(
        "meshtun_backbone_info",
        "This backbone (always 1); the version label carries its version.",
        None,
        &[(vec![("version", env!("CARGO_PKG_VERSION"))], 1i64)],
    )?;
    m.gauge1("meshtun_start_time_seconds", "When the backbone started (Unix time).", None, snap.start_time_unix)?;
    m.gauge1("meshtun_backbone_records", "Live (registered, unexpired) node records.", None, snap.records as i64)?;
    m.counter(
        "meshtun_backbone_registrations",
        "Registrations (heartbeats included): accepted and stored, or rejected.",
        None,
        &[(vec![("result", "accepted")], s.registrations), (vec![("result", "rejected")], s.registrations_rejected)],
    )?;
    m.counter1("meshtun_backbone_deregistrations", "Signed deregistrations accepted.", None, s.deregistrations)?;
    m.counter1("meshtun_backbone_expirations", "Records that expired without a heartbeat.", None, s.expirations)?;
    let k = &s.lookups_by_kind;
    m.counter(
        "meshtun_backbone_lookups",
        "Lookups answered, by what was asked.",
        None,
        &[
            (vec![("kind", "address")], k.address),
            (vec![("kind", "hostname")], k.hostname),
            (vec![("kind", "wg_key")], k.wg_key),
            (vec![("kind", "capability")], k.capability),
            (vec![("kind", "group")], k.group),
            (vec![("kind", "ipv4")], k.ipv4),
        ],
    )?;
    m.counter1("meshtun_backbone_lookups_rejected", "Lookups refused because the asker is not registered from that address.", None, s.lookups_rejected)?;
    m.counter1("meshtun_backbone_stun_requests", "STUN binding requests answered.", None, s.stun_requests)?;
    m.counter1("meshtun_backbone_stun_refused", "STUN binding requests not answered: the answer would be larger than the request and the source is no registered node's IP.", None, s.stun_refused)?;
    m.counter1("meshtun_backbone_intents_pushed", "Peer intents pushed (a node was told who is about to connect).", None, s.intents_pushed)?;
    m.counter(
        "meshtun_backbone_dropped",
        "Datagrams the backbone ignored: undecodable (malformed) or of a kind it does not serve (unknown).",
        None,
        &[(vec![("reason", "malformed")], s.dropped_malformed), (vec![("reason", "unknown")], s.dropped_unknown)],
    )?;
    m.counter1("meshtun_relay_packets", "WireGuard datagrams relayed between nodes.", None, s.relayed_packets)?;
    m.counter1("meshtun_relay", "WireGuard bytes relayed between nodes.", Some(Unit::Bytes), s.relayed_bytes)?;
    m.counter(
        "meshtun_relay_dropped",
        "Relay datagrams refused: sender or destination not registered or the pair never introduced (refused), or over the per-node rate limit (rate_limit).",
        None,
        &[(vec![("reason", "refused")], s.relay_refused), (vec![("reason", "rate_limit")], s.relay_rate_limited)],
    )?;
    m.gauge1("meshtun_relay_active_pairs", "Node pairs that relayed through this backbone in the last minute.", None, snap.active_relay_pairs as i64)?;
    Ok(())
}

const NODE_PATHS: &str = "/metrics, /mesh.dot, /mesh.svg";

/// The node's answer to `GET path`.
pub fn node_response(path: &str, status: NodeStatus, events: EventCounters, start_time_unix: f64) -> HttpResponse {
    match path {
        "/metrics" => HttpResponse::ok(OPENMETRICS, encode_node(NodeSnapshot { status, events, start_time_unix })),
        "/mesh.dot" | "/mesh.svg" | "/" => {
            let graph = crate::graph::from_node_status(&serde_json::to_value(&status).unwrap_or_default());
            match path {
                "/mesh.dot" => HttpResponse::ok("text/vnd.graphviz; charset=utf-8", crate::graph::to_dot(&graph)),
                "/mesh.svg" => HttpResponse::ok("image/svg+xml", crate::graph::to_svg(&graph)),
                _ => HttpResponse::ok(
                    "text/html; charset=utf-8",
                    index_page("node", &[("/metrics", "Prometheus metrics"), ("/mesh.svg", "the mesh as this node sees it"), ("/mesh.dot", "the same as Graphviz DOT")]),
                ),
            }
        }
        _ => HttpResponse::not_found(NODE_PATHS),
    }
}

const BACKBONE_PATHS: &str = "/, /metrics, /mesh.svg, /mesh.dot";

/// The backbone's answer to `GET path`; `status` is its status data (only
/// built for the picture).
pub fn backbone_response(path: &str, snapshot: BackboneSnapshot, status: impl FnOnce() -> serde_json::Value) -> HttpResponse {
    match path {
        "/metrics" => HttpResponse::ok(OPENMETRICS, encode_backbone(snapshot)),
        "/" | "/index.html" => HttpResponse::ok("text/html; charset=utf-8", crate::graph::backbone_html(&status())),
        "/mesh.svg" => HttpResponse::ok("image/svg+xml", crate::graph::to_svg(&crate::graph::from_backbone_status(&status()))),
        "/mesh.dot" => HttpResponse::ok("text/vnd.graphviz; charset=utf-8", crate::graph::to_dot(&crate::graph::from_backbone_status(&status()))),
        _ => HttpResponse::not_found(BACKBONE_PATHS),
    }
}

/// Unix time now, as float seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// A short index page for a metrics port.
pub fn index_page(role: &str, links: &[(&str, &str)]) -> String {
    let mut html = format!("<!doctype html><meta charset=utf-8><title>meshtun {role}</title><h1>meshtun {role}</h1><ul>");
    for (href, what) in links {
        let _ = write!(html, "<li><a href=\"{href}\">{href}</a> {what}</li>");
    }
    html.push_str("</ul>");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(parse_listen("0.0.0.0:9000").unwrap(), "0.0.0.0:9000".parse().unwrap());
        assert_eq!(parse_listen("[::1]:9000").unwrap(), "[::1]:9000".parse().unwrap());
        assert_eq!(parse_listen("9000").unwrap(), "127.0.0.1:9000".parse().unwrap());
        assert_eq!(parse_listen(":9000").unwrap(), "127.0.0.1:9000".parse().unwrap());
        assert_eq!(parse_listen("localhost:9000").unwrap(), "127.0.0.1:9000".parse().unwrap());
        assert!(parse_listen("nope").is_err());
    }

    #[test]
    fn backbone_exposition_is_openmetrics_with_units_and_eof() {
        let stats = DirectoryStats {
            relayed_bytes: 1234,
            lookups_by_kind: meshtun_backbone::LookupsByKind { hostname: 2, ..Default::default() },
            ..Default::default()
        };
        let text = encode_backbone(BackboneSnapshot { stats, records: 3, active_relay_pairs: 1, start_time_unix: 1.0 });
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# TYPE meshtun_relay_bytes counter\n# UNIT meshtun_relay_bytes bytes\n"), "{text}");
        assert!(text.contains("meshtun_relay_bytes_total 1234\n"), "{text}");
        assert!(text.contains("meshtun_backbone_lookups_total{kind=\"hostname\"} 2\n"), "{text}");
        assert!(text.contains("meshtun_backbone_records 3\n"), "{text}");
    }
}
