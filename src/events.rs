//! The event stream behind `meshtun events`: the core's events as they
//! happen, plus a few the driver derives from status snapshots (peer down,
//! key rotated, backbone lost/regained), as one JSON object per line.
//!
//! The main loop owns the [`Hub`]: it feeds it every core event in
//! `flush()` and a status snapshot once a second. Subscribers (control
//! socket connections) hold a `broadcast` receiver, so a slow reader never
//! blocks the daemon; it is told how many events it missed instead.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshtun_addr::MeshAddr;
use meshtun_overlay::path::Path;
use meshtun_overlay::peer::{PeerHealth, SessionState};
use meshtun_overlay::Event;
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// Events a subscriber may fall behind by before it is told it missed some.
const CAPACITY: usize = 1024;
/// WireGuard's REJECT_AFTER_TIME: a session this old carries nothing.
const SESSION_DEAD_AFTER: Duration = Duration::from_secs(180);
/// How long a punching attempt may take before it counts as failed (the
/// path agent's quick probe rounds end after 4 s).
const PUNCH_WINDOW: Duration = Duration::from_secs(10);

/// How often the engine hands the hub its peers' health (`Engine::watch`).
pub const TICK: Duration = Duration::from_secs(1);

/// Logs a core event, inside a `peer` span when it concerns one peer, so
/// one peer's story can be filtered out (`RUST_LOG='[peer{peer=...}]=debug'`
/// or, with `--log-format json`, on the `peer` field).
pub fn log(event: &Event) {
    let text = serde_json::to_string(event).unwrap_or_default();
    let peer = match event {
        Event::PeerAdded { peer, .. }
        | Event::PeerUp { peer, .. }
        | Event::PathChanged { peer, .. }
        | Event::LookupFailed { peer, .. } => Some(peer.as_str()),
        _ => None,
    };
    match peer {
        Some(peer) => {
            let span = tracing::info_span!("peer", peer = %peer);
            let _entered = span.enter();
            tracing::info!(event = %text, "event");
        }
        None => tracing::info!(event = %text, "event"),
    }
}

/// Counters over the events, for the metrics endpoint.
#[derive(Clone, Debug, Default)]
pub struct EventCounters {
    pub by_kind: BTreeMap<String, u64>,
    pub punch_attempts: u64,
    pub punch_direct: u64,
    pub punch_relayed: u64,
    /// This node's membership certificate expiry (Unix seconds), if it has one.
    pub certificate_not_after_unix: Option<u64>,
}

#[derive(Default)]
struct PeerWatch {
    up: bool,
    handshake_age: Option<Duration>,
    /// The last tick that saw the peer: one that did not is gone.
    seen_at_tick: u64,
}

pub struct Hub {
    tx: broadcast::Sender<Arc<str>>,
    counters: EventCounters,
    /// Open punching attempts: peer -> when probing started.
    punching: HashMap<MeshAddr, Instant>,
    peers: HashMap<MeshAddr, PeerWatch>,
    ticks: u64,
    /// Backbone -> registered?
    backbones: HashMap<String, bool>,
    /// The smallest warning step of [`CERT_WARNINGS`] already reported for
    /// this node's certificate (index), and whether its expiry was.
    cert_warned: Option<usize>,
    cert_expired_reported: bool,
}

/// How long before this node's membership certificate expires
/// `certificate_expiring` is reported: once as each of these is crossed
/// (a daemon started with less time left reports the smallest crossed
/// step once), so a reader that subscribes later still hears of it.
const CERT_WARNINGS: [u64; 7] = [30 * 86_400, 7 * 86_400, 86_400, 3_600, 600, 60, 10];

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

impl Hub {
    pub fn new() -> Hub {
        let (tx, _) = broadcast::channel(CAPACITY);
        Hub {
            tx,
            counters: EventCounters::default(),
            punching: HashMap::new(),
            peers: HashMap::new(),
            ticks: 0,
            backbones: HashMap::new(),
            cert_warned: None,
            cert_expired_reported: false,
        }
    }

    /// A handle subscribers can be created from (any task).
    pub fn sender(&self) -> broadcast::Sender<Arc<str>> {
        self.tx.clone()
    }

    pub fn counters(&self) -> EventCounters {
        self.counters.clone()
    }

    /// One event from the core.
    pub fn core_event(&mut self, event: &Event, now: Instant) {
        let Ok(value) = serde_json::to_value(event) else { return };
        let kind = value["event"].as_str().unwrap_or("unknown").to_string();
        let peer = value["peer"].as_str().and_then(|p| p.parse::<MeshAddr>().ok());
        let backbone = value["backbone"].as_str().map(str::to_string);
        match (kind.as_str(), &peer, &backbone) {
            ("peer_added", Some(peer), _) => self.start_punch(*peer, now),
            ("peer_up", Some(peer), _) => self.peers.entry(*peer).or_default().up = true,
            ("path_changed", Some(peer), _) => {
                let to = value["to"].as_str().unwrap_or("");
                if to.starts_with("direct") {
                    if self.punching.remove(peer).is_some() {
                        self.counters.punch_direct += 1;
                    }
                } else if to.starts_with("relay") {
                    // The direct path died: probing starts over.
                    self.start_punch(*peer, now);
                }
            }
            _ => {}
        }
        self.emit(value.clone());
        let registered = match kind.as_str() {
            "backbone_registered" => Some(true),
            "backbone_unreachable" | "registration_rejected" => Some(false),
            _ => None,
        };
        if let (Some(registered), Some(b)) = (registered, backbone) {
            match (self.backbones.insert(b.clone(), registered), registered) {
                (Some(false), true) => self.emit(json!({ "event": "backbone_regained", "backbone": b })),
                (Some(true), false) => {
                    let why = value["error"].as_str().or(value["detail"].as_str()).unwrap_or("").to_string();
                    self.emit(json!({ "event": "backbone_lost", "backbone": b, "reason": why }));
                }
                _ => {}
            }
        }
    }

    /// The peers' health, about once a second: derives peer down / up
    /// again, key rotation and punching failures. Linear in the peers and
    /// allocation-free unless something is reported: the engine thread runs
    /// it between packets, with thousands of peers.
    pub fn tick(&mut self, peers: impl IntoIterator<Item = PeerHealth>, now: Instant) {
        self.ticks += 1;
        let tick = self.ticks;
        let mut seen = 0;
        for p in peers {
            seen += 1;
            let watch = self.peers.entry(p.addr).or_default();
            watch.seen_at_tick = tick;
            // A parked peer is idle, not down: its next packet handshakes again.
            let alive = p.session == SessionState::Parked || p.handshake_age.is_some_and(|a| a < SESSION_DEAD_AFTER);
            let derived = if watch.up && !alive && p.established {
                watch.up = false;
                Some(json!({
                    "event": "peer_down", "peer": p.addr.to_string(),
                    "reason": format!("no WireGuard handshake for {} s", SESSION_DEAD_AFTER.as_secs()),
                }))
            } else if !watch.up && alive && p.established && watch.handshake_age.is_some() {
                watch.up = true;
                Some(json!({ "event": "peer_up", "peer": p.addr.to_string(), "path": path_text(p.path), "reason": "session established again" }))
            } else if let (true, Some(before), Some(age)) = (watch.up, watch.handshake_age, p.handshake_age) {
                (age + Duration::from_millis(500) < before)
                    .then(|| json!({ "event": "key_rotated", "peer": p.addr.to_string(), "reason": "new WireGuard handshake: fresh session keys" }))
            } else {
                None
            };
            watch.handshake_age = p.handshake_age;
            if let Some(started) = self.punching.get(&p.addr) {
                if now.saturating_duration_since(*started) >= PUNCH_WINDOW && !matches!(p.path, Some(Path::Direct(_))) {
                    self.punching.remove(&p.addr);
                    self.counters.punch_relayed += 1;
                }
            }
            if let Some(event) = derived {
                self.emit(event);
            }
        }
        if seen < self.peers.len() {
            self.forget_gone(tick);
        }
    }

    #[cold]
    fn forget_gone(&mut self, tick: u64) {
        let gone: Vec<MeshAddr> = self.peers.iter().filter(|(_, w)| w.seen_at_tick != tick).map(|(a, _)| *a).collect();
        for peer in gone {
            if self.peers.remove(&peer).is_some_and(|w| w.up) {
                self.emit(json!({ "event": "peer_down", "peer": peer.to_string(), "reason": "peer removed" }));
            }
            self.punching.remove(&peer);
        }
    }

    /// This node's own membership certificate, checked once a second:
    /// `certificate_expiring` as it nears its expiry (see [`CERT_WARNINGS`]),
    /// `certificate_expired` once it has passed (the mesh then refuses the
    /// node within a heartbeat).
    pub fn certificate(&mut self, not_after_unix: u64, unix_now: u64) {
        self.counters.certificate_not_after_unix = Some(not_after_unix);
        if unix_now > not_after_unix {
            if !self.cert_expired_reported {
                self.cert_expired_reported = true;
                self.emit(json!({
                    "event": "certificate_expired", "not_after": not_after_unix,
                    "reason": "the membership certificate has expired: backbones and peers refuse this node; ask the network owner for a new one (`meshtun network sign`) and restart with --cert",
                }));
            }
            return;
        }
        let left = not_after_unix - unix_now;
        let Some(step) = CERT_WARNINGS.iter().rposition(|&w| left <= w) else { return };
        if self.cert_warned.is_some_and(|done| done >= step) {
            return;
        }
        self.cert_warned = Some(step);
        self.emit(json!({
            "event": "certificate_expiring", "not_after": not_after_unix, "seconds_left": left,
            "reason": format!("the membership certificate expires in {}; ask the network owner for a new one", human_duration(left)),
        }));
    }

    fn start_punch(&mut self, peer: MeshAddr, now: Instant) {
        if let std::collections::hash_map::Entry::Vacant(entry) = self.punching.entry(peer) {
            entry.insert(now);
            self.counters.punch_attempts += 1;
        }
    }

    fn emit(&mut self, mut value: Value) {
        let kind = value["event"].as_str().unwrap_or("unknown").to_string();
        *self.counters.by_kind.entry(kind).or_default() += 1;
        if self.tx.receiver_count() == 0 {
            return;
        }
        if let Value::Object(map) = &mut value {
            map.insert("time".into(), rfc3339_now().into());
        }
        let _ = self.tx.send(Arc::from(value.to_string()));
    }
}

fn path_text(path: Option<Path>) -> String {
    path.map_or_else(|| "none".to_string(), |p| p.to_string())
}

/// The first line a subscriber gets.
fn human_duration(secs: u64) -> String {
    match secs {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 2 * 3_600 => format!("{} hours", s / 3_600),
        s if s >= 120 => format!("{} minutes", s / 60),
        s => format!("{s} s"),
    }
}

pub fn subscribed(address: &str) -> Value {
    json!({ "time": rfc3339_now(), "event": "subscribed", "node": address })
}

/// A subscriber fell behind and `missed` events were dropped for it.
pub fn lagged(missed: u64) -> Value {
    json!({ "time": rfc3339_now(), "event": "lagged", "missed": missed })
}

/// UTC now as `2025-01-31T12:34:56.789Z`.
pub fn rfc3339_now() -> String {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    rfc3339(since.as_secs() as i64, since.subsec_millis())
}

fn rfc3339(secs: i64, millis: u32) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// One line of `meshtun events` without `--json`.
pub fn human_line(v: &Value) -> String {
    let time = v["time"].as_str().unwrap_or("");
    let kind = v["event"].as_str().unwrap_or("?");
    let mut out = format!("{time} {kind:<20}");
    if let Value::Object(map) = v {
        for (k, val) in map {
            if k == "time" || k == "event" || val.is_null() {
                continue;
            }
            let text = match val {
                Value::String(s) if s.contains(' ') => format!("{s:?}"),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push_str(&format!(" {k}={text}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(1_700_000_000, 123), "2023-11-14T22:13:20.123Z");
    }

    fn drain(rx: &mut broadcast::Receiver<Arc<str>>) -> Vec<Value> {
        std::iter::from_fn(|| rx.try_recv().ok()).map(|line| serde_json::from_str(&line).unwrap()).collect()
    }

    #[test]
    fn a_nearing_certificate_expiry_is_reported_once_per_step_and_then_as_expired() {
        let mut hub = Hub::new();
        let mut rx = hub.sender().subscribe();
        let not_after = 2_000_000_000;
        // Far from expiry: nothing.
        hub.certificate(not_after, not_after - 40 * 86_400);
        assert!(drain(&mut rx).is_empty());
        // Started with 5 days left: one warning, not one per step passed.
        hub.certificate(not_after, not_after - 5 * 86_400);
        hub.certificate(not_after, not_after - 5 * 86_400 + 1);
        let got = drain(&mut rx);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["event"], "certificate_expiring");
        assert_eq!(got[0]["seconds_left"], 5 * 86_400);
        assert!(got[0]["reason"].as_str().unwrap().contains("5 days"), "{got:?}");
        // The next step (one day) warns again, once.
        hub.certificate(not_after, not_after - 86_000);
        hub.certificate(not_after, not_after - 85_000);
        assert_eq!(drain(&mut rx).len(), 1);
        // Past it: expired, once.
        hub.certificate(not_after, not_after + 1);
        hub.certificate(not_after, not_after + 2);
        let got = drain(&mut rx);
        assert_eq!(got.iter().map(|v| v["event"].as_str().unwrap()).collect::<Vec<_>>(), ["certificate_expired"]);
        assert_eq!(hub.counters().certificate_not_after_unix, Some(not_after));
    }

    #[test]
    fn punching_counts_attempts_and_direct_results_and_backbone_loss() {
        let mut hub = Hub::new();
        let mut rx = hub.sender().subscribe();
        let now = Instant::now();
        hub.core_event(&Event::PeerAdded { peer: "0:AAAA.0000.0001".into(), hostname: None }, now);
        hub.core_event(
            &Event::PathChanged { peer: "0:AAAA.0000.0001".into(), from: None, to: "direct 10.0.0.1:1".into(), reason: "probe answered".into() },
            now,
        );
        let backbone: std::net::SocketAddr = "198.18.0.1:7400".parse().unwrap();
        hub.core_event(&Event::BackboneRegistered { backbone, observed: backbone }, now);
        hub.core_event(&Event::BackboneUnreachable { backbone, error: "no answer".into() }, now);
        hub.core_event(&Event::BackboneRegistered { backbone, observed: backbone }, now);
        let c = hub.counters();
        assert_eq!((c.punch_attempts, c.punch_direct, c.punch_relayed), (1, 1, 0));
        let mut kinds = Vec::new();
        while let Ok(line) = rx.try_recv() {
            let v: Value = serde_json::from_str(&line).unwrap();
            assert!(v["time"].as_str().unwrap().ends_with('Z'));
            kinds.push(v["event"].as_str().unwrap().to_string());
        }
        assert_eq!(
            kinds,
            ["peer_added", "path_changed", "backbone_registered", "backbone_unreachable", "backbone_lost", "backbone_registered", "backbone_regained"]
        );
    }

    fn health(n: u32, session: SessionState, handshake_age_secs: Option<u64>) -> PeerHealth {
        PeerHealth {
            addr: format!("0:AAAA.{:04X}.{:04X}", n >> 16, n & 0xffff).parse().unwrap(),
            session,
            handshake_age: handshake_age_secs.map(Duration::from_secs),
            established: true,
            path: Some(Path::Direct("198.18.0.2:51820".parse().unwrap())),
        }
    }

    fn kinds(got: &[Value]) -> Vec<(&str, &str)> {
        got.iter().map(|v| (v["event"].as_str().unwrap(), v["peer"].as_str().unwrap_or(""))).collect()
    }

    /// `peer` with its last handshake `secs` ago.
    fn aged(peer: PeerHealth, secs: u64) -> PeerHealth {
        PeerHealth { handshake_age: Some(Duration::from_secs(secs)), ..peer }
    }

    /// A hub that was told `peer` came up and has seen it in one tick.
    fn hub_with_peer_up(peer: PeerHealth, now: Instant) -> (Hub, broadcast::Receiver<Arc<str>>) {
        let mut hub = Hub::new();
        let mut rx = hub.sender().subscribe();
        hub.core_event(&Event::PeerUp { peer: peer.addr.to_string(), path: "direct 198.18.0.2:51820".into() }, now);
        hub.tick([peer], now);
        drain(&mut rx);
        (hub, rx)
    }

    #[test]
    fn ticks_report_a_peer_down_when_its_session_dies_and_up_again_when_it_returns() {
        let now = Instant::now();
        let peer = health(1, SessionState::Up, Some(5));
        let (mut hub, mut rx) = hub_with_peer_up(peer, now);
        hub.tick([aged(peer, 100)], now);
        assert!(drain(&mut rx).is_empty(), "an ageing session is not news");
        hub.tick([aged(peer, 181)], now);
        hub.tick([aged(peer, 182)], now);
        let got = drain(&mut rx);
        assert_eq!(kinds(&got), [("peer_down", "0:AAAA.0000.0001")]);
        assert!(got[0]["reason"].as_str().unwrap().contains("180 s"), "{got:?}");
        hub.tick([aged(peer, 1)], now);
        let got = drain(&mut rx);
        assert_eq!(kinds(&got), [("peer_up", "0:AAAA.0000.0001")]);
        assert_eq!(got[0]["path"], "direct 198.18.0.2:51820");
    }

    #[test]
    fn ticks_report_key_rotation_and_treat_a_parked_peer_as_idle_not_down() {
        let now = Instant::now();
        let peer = health(2, SessionState::Up, Some(119));
        let (mut hub, mut rx) = hub_with_peer_up(peer, now);
        hub.tick([aged(peer, 1)], now);
        assert_eq!(kinds(&drain(&mut rx)), [("key_rotated", "0:AAAA.0000.0002")]);
        hub.tick([PeerHealth { session: SessionState::Parked, handshake_age: None, ..peer }], now);
        assert!(drain(&mut rx).is_empty());
    }

    #[test]
    fn a_tick_over_ten_thousand_peers_reports_only_the_one_that_left() {
        let mut hub = Hub::new();
        let now = Instant::now();
        let peers: Vec<PeerHealth> = (0..10_000).map(|n| health(n, SessionState::Up, Some(3))).collect();
        for p in &peers {
            hub.core_event(&Event::PeerUp { peer: p.addr.to_string(), path: "direct 198.18.0.2:51820".into() }, now);
        }
        hub.tick(peers.iter().copied(), now);
        // Subscribed after the 10,000 peer_up events (more than a subscriber may lag by).
        let mut rx = hub.sender().subscribe();
        hub.tick(peers.iter().copied().filter(|p| p.addr != peers[4_321].addr), now);
        let got = drain(&mut rx);
        assert_eq!(kinds(&got), [("peer_down", peers[4_321].addr.to_string().as_str())]);
        assert_eq!(got[0]["reason"], "peer removed");
        hub.tick(peers.iter().copied().filter(|p| p.addr != peers[4_321].addr), now);
        assert!(drain(&mut rx).is_empty(), "reported once");
    }

    #[test]
    fn punching_that_has_not_gone_direct_within_its_window_counts_as_relayed() {
        let mut hub = Hub::new();
        let now = Instant::now();
        let peer = PeerHealth { path: Some(Path::Relay("198.18.0.1:7400".parse().unwrap())), ..health(3, SessionState::Up, Some(1)) };
        hub.core_event(&Event::PeerAdded { peer: peer.addr.to_string(), hostname: None }, now);
        hub.tick([peer], now + Duration::from_secs(1));
        assert_eq!(hub.counters().punch_relayed, 0);
        hub.tick([peer], now + PUNCH_WINDOW);
        hub.tick([peer], now + PUNCH_WINDOW + Duration::from_secs(1));
        let c = hub.counters();
        assert_eq!((c.punch_attempts, c.punch_direct, c.punch_relayed), (1, 0, 1));
    }
}
