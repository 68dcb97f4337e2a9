//! The meshtun packet engine core, sans-IO.
//!
//! [`Node`] owns everything a mesh node decides: its registration with the
//! backbones, lookups of unknown peers, one WireGuard session per peer,
//! cryptokey routing, and what to do with packets nobody can take. The
//! driver (the daemon in `src/`, or the in-memory simulator in tests) moves
//! bytes:
//!
//! * IP packets read from the TUN go to [`Node::handle_tun_packet`];
//! * UDP datagrams go to [`Node::handle_udp`];
//! * at [`Node::poll_timeout`] it calls [`Node::handle_timeout`];
//! * then it drains [`Node::poll_transmit`] (UDP out), [`Node::poll_tun`]
//!   (packets for the TUN) and [`Node::poll_event`].
//!
//! Time comes in as `now`; randomness from the seed in [`NodeConfig`]. The
//! one exception is inside boringtun's `Tunn`, which reads the monotonic
//! clock for its own WireGuard timers and draws handshake ephemerals from
//! the OS. That is contained in [`peer`]; nothing else depends on it.

mod backbone_client;
pub mod firewall;
pub mod grid;
pub mod ipv4;
pub mod offload;
pub mod packet;
pub mod path;
pub mod path_mtu;
pub mod peer;
mod peer_table;
pub mod prefetch;
mod token_bucket;
pub mod probe;
mod stats;

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Packet, Tunn};
use boringtun::x25519::{PublicKey, StaticSecret};
use meshtun_addr::{MeshAddr, NetworkId};
use meshtun_nat::{classify, DatagramKind};
use meshtun_proto::{Identity, Message, NodeRecord, Query, SignedRecord, VerifiedRecord};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;

pub use backbone_client::{BackboneState, BackboneStatus};
use backbone_client::BackboneClient;
use path::{Path, PathAgent, PathChange};
use peer::{HandshakeRetry, Peer, PeerId, PeerStatus};
use probe::{Probe, ProbeKind};
pub use stats::{DropReason, LatencyHistogram, PathKind, Stats, Traffic, LOOKUP_LATENCY_BOUNDS};
use stats::wireguard_drop;

/// Largest IP packet the engine carries.
pub const MAX_PACKET: usize = 65535;
/// WireGuard adds at most this much to a packet.
const WG_OVERHEAD: usize = 32;
/// A handshake initiation is 148 bytes, the floor for boringtun's buffers.
const MIN_WG_BUFFER: usize = 148;

/// How a node behaves. The defaults suit a real deployment; tests shorten
/// the intervals.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub network: NetworkId,
    pub hostname: Option<String>,
    pub capabilities: Vec<String>,
    pub groups: Vec<String>,
    pub backbones: Vec<SocketAddr>,
    /// Standalone relays (`meshtun relay`): registered with like backbones,
    /// never asked discovery lookups; a relayed path uses the first one
    /// registered, falling back to a backbone's relay without one.
    pub relays: Vec<SocketAddr>,
    /// Where this node's UDP socket can be reached directly (interface
    /// addresses with the listening port).
    pub local_endpoints: Vec<SocketAddr>,
    /// Re-registration interval; records on the backbone live a few of these.
    pub heartbeat_interval: Duration,
    /// How long to wait for a backbone's answer before retrying.
    pub request_timeout: Duration,
    /// Longest wait between retries to an unreachable backbone.
    pub max_backoff: Duration,
    /// How many times a lookup is sent before the destination is declared
    /// unreachable.
    pub lookup_attempts: u32,
    /// How long a failed lookup is remembered, so that a retrying
    /// application gets its ICMPv6 error at once instead of a lookup storm.
    pub negative_cache: Duration,
    /// The first record sequence number. The driver passes wall-clock
    /// milliseconds so a restarted node's records still win.
    pub initial_seq: u64,
    /// WireGuard persistent keepalive in seconds (keeps NAT mappings open).
    pub persistent_keepalive: Option<u16>,
    /// A peer with no data in either direction for this long (keepalives
    /// and probes do not count) has its WireGuard session parked: its ~11
    /// KB of boringtun state is dropped, and the next packet either way
    /// handshakes again. `None` keeps every session.
    pub park_idle_after: Option<Duration>,
    /// Packets held per destination while its lookup and handshake run.
    pub max_queued_per_destination: usize,
    /// Destinations with packets waiting at once.
    pub max_pending_destinations: usize,
    pub rng_seed: u64,
    /// Owner key of this node's private network (`None` on the public mesh).
    pub network_owner: Option<[u8; 32]>,
    /// This node's membership certificate (private networks).
    pub certificate: Option<meshtun_proto::cert::SignedCert>,
    pub firewall: firewall::FirewallConfig,
    /// Version and expiry of the current WireGuard key's certification.
    pub wg_key_version: u32,
    pub wg_key_expires_unix: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            network: NetworkId::PUBLIC,
            hostname: None,
            capabilities: vec![],
            groups: vec![],
            backbones: vec![],
            relays: vec![],
            local_endpoints: vec![],
            heartbeat_interval: Duration::from_secs(20),
            request_timeout: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            lookup_attempts: 4,
            negative_cache: Duration::from_secs(2),
            initial_seq: 1,
            persistent_keepalive: Some(25),
            park_idle_after: Some(DEFAULT_PARK_IDLE_AFTER),
            max_queued_per_destination: 64,
            max_pending_destinations: 1024,
            rng_seed: 0,
            network_owner: None,
            certificate: None,
            firewall: firewall::FirewallConfig::default(),
            wg_key_version: 1,
            wg_key_expires_unix: meshtun_proto::record::NO_EXPIRY,
        }
    }
}

/// A UDP datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// Things worth telling the operator about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    BackboneRegistered { backbone: SocketAddr, observed: SocketAddr },
    BackboneUnreachable { backbone: SocketAddr, error: String },
    RegistrationRejected { backbone: SocketAddr, code: String, detail: String },
    PeerAdded { peer: String, hostname: Option<String> },
    PeerUp { peer: String, path: String },
    PathChanged { peer: String, from: Option<String>, to: String, reason: String },
    LookupFailed { peer: String, reason: String },
    Deregistered { backbone: SocketAddr },
    /// A peer was dropped: its certificate or key is no longer valid.
    PeerRemoved { peer: String, reason: String },
    KeyRotated { version: u32 },
    RevocationsUpdated { seq: u64, revoked: usize },
}

/// A handle for an answer the driver asked for ([`Node::query`], [`Node::ping`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Token(pub u64);

/// One node a query found, best first.
#[derive(Clone, Debug, Serialize)]
pub struct Found {
    pub address: String,
    pub ipv6: Ipv6Addr,
    /// How this host shows the node over IPv4 (its alias here).
    pub ipv4: std::net::Ipv4Addr,
    pub hostname: Option<String>,
    pub capabilities: Vec<String>,
    pub groups: Vec<String>,
    /// Measured RTT of the current path, when we have a session.
    pub rtt_ms: Option<f64>,
    pub path: Option<String>,
    #[serde(skip)]
    pub mesh_addr: MeshAddr,
}

/// Answers the driver asked for.
#[derive(Clone, Debug)]
pub enum Answer {
    /// Nodes matching a query (empty: none; `error` says why if it failed).
    Query { token: Token, found: Vec<Found>, error: Option<String> },
    /// A mesh ping came back.
    Pong { token: Token, from: MeshAddr, hostname: Option<String>, rtt: Duration, path: String },
}

/// A snapshot for `meshtun status`.
#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    pub address: String,
    pub ipv6: Ipv6Addr,
    pub ipv4: std::net::Ipv4Addr,
    pub hostname: Option<String>,
    pub record_seq: u64,
    pub endpoints: Vec<SocketAddr>,
    pub backbones: Vec<BackboneStatus>,
    /// Standalone relays (a relayed peer's `endpoint` says which one it uses).
    pub relays: Vec<BackboneStatus>,
    pub peers: Vec<PeerStatus>,
    pub stats: Stats,
    pub capabilities: Vec<String>,
    pub groups: Vec<String>,
}

/// How a WireGuard datagram arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Direct(SocketAddr),
    Relay(SocketAddr),
}

struct PendingLookup {
    query: Query,
    request_id: u64,
    attempts: u32,
    next_retry: Instant,
    /// Packets for an address lookup, or the stashed handshake for a
    /// key lookup.
    packets: VecDeque<Vec<u8>>,
    handshake: Option<(Origin, Vec<u8>)>,
    waiters: Vec<Token>,
    /// When the lookup began (for the latency histogram).
    started: Instant,
    /// The backbones the current request went to, and those of them that
    /// have answered it (a record lookup only counts the empty answers).
    asked: Vec<SocketAddr>,
    answered: Vec<SocketAddr>,
    /// Set queries: the verified members collected so far, and when the
    /// collection window that opened with the first answer closes.
    members: Vec<NodeRecord>,
    collect_until: Option<Instant>,
}

impl PendingLookup {
    fn new(query: Query, now: Instant) -> PendingLookup {
        PendingLookup {
            query,
            request_id: 0,
            attempts: 0,
            next_retry: now,
            packets: VecDeque::new(),
            handshake: None,
            waiters: Vec::new(),
            started: now,
            asked: Vec::new(),
            answered: Vec::new(),
            members: Vec::new(),
            collect_until: None,
        }
    }
}

/// An address lookup sent to a standalone relay only for the pair
/// permission it grants (its answer is not used otherwise), until the relay
/// confirms by answering with the peer's record.
struct RelayGrant {
    relay: SocketAddr,
    request_id: u64,
    attempts: u32,
    next_retry: Instant,
}

struct PendingPing {
    token: Token,
    to: MeshAddr,
    sent: Instant,
}

/// Identifier of the ICMPv6 echo requests the engine sends itself (`meshtun
/// ping`); replies carrying it are answered to the driver, not the TUN.
const PING_IDENT: u16 = 0x4d54;
/// Keeps the peer map's hash seed apart from the node's other uses of its seed.
const BY_ADDR_HASH_SALT: u64 = 0x6279_5f61_6464_7221;
/// How long discovery answers are cached.
const QUERY_CACHE_TTL: Duration = Duration::from_secs(5);
const NEGATIVE_QUERY_CACHE_TTL: Duration = Duration::from_secs(2);
/// How long a capability or group query keeps collecting answers from the
/// other backbones after the first one (or the request timeout if shorter):
/// long enough for a backbone a few RTTs further away, short enough that a
/// dead one costs a user little.
const SET_COLLECT_WINDOW: Duration = Duration::from_millis(250);
/// Bound on the newest-record memory (cleared when full).
const MAX_REMEMBERED_RECORDS: usize = 100_000;
/// Group packets a node may send per second (each fanned out to every member).
const BROADCAST_RATE: f64 = 50.0;
const BROADCAST_BURST: f64 = 100.0;
/// "Too big" answers into the TUN per second: a sender's kernel learns from
/// one, so more only cover the packets already on their way.
const TOO_BIG_RATE: f64 = 10.0;
const TOO_BIG_BURST: f64 = 10.0;

/// One mesh node.
pub struct Node {
    config: NodeConfig,
    identity: Identity,
    me: MeshAddr,
    my_ip: Ipv6Addr,
    my_ipv4: std::net::Ipv4Addr,
    aliases: ipv4::AliasTable,
    wg_secret: StaticSecret,
    wg_public: PublicKey,
    backbones: BackboneClient,
    peers: peer_table::PeerTable,
    free_peer_ids: Vec<PeerId>,
    /// Looked up for every packet: a fast keyed hash (foldhash) instead of
    /// SipHash, seeded from the node's seed (random in the daemon).
    by_addr: HashMap<MeshAddr, PeerId, foldhash::fast::FixedState>,
    by_wg_key: HashMap<[u8; 32], PeerId>,
    lookups: HashMap<Query, PendingLookup>,
    lookup_by_request: HashMap<u64, Query>,
    /// Relay permissions asked for and not yet confirmed, by peer.
    relay_grants: HashMap<MeshAddr, RelayGrant>,
    relay_grant_by_request: HashMap<u64, MeshAddr>,
    unreachable_until: HashMap<MeshAddr, Instant>,
    query_cache: HashMap<Query, (Vec<NodeRecord>, Instant)>,
    answers: VecDeque<Answer>,
    pings: HashMap<u16, PendingPing>,
    next_ping_seq: u16,
    broadcasts: token_bucket::TokenBucket,
    too_big_answers: token_bucket::TokenBucket,
    known_group_names: Vec<String>,
    unix_now: u64,
    revocations: Option<meshtun_proto::cert::Revocations>,
    firewall: firewall::Firewall,
    next_trust_check: Instant,
    /// MAC1 check and cookie challenge for handshake initiations, shared by
    /// the whole node: under a flood, initiators must prove their address.
    handshake_limiter: std::sync::Arc<boringtun::noise::rate_limiter::RateLimiter>,
    /// The newest record seen for each node, so a backbone serving an older
    /// one is caught.
    newest: HashMap<MeshAddr, NodeRecord>,
    transmits: VecDeque<Transmit>,
    tun_out: VecDeque<Vec<u8>>,
    /// Buffers the driver gave back ([`Node::recycle`]), reused for the
    /// next transmits and TUN packets so a packet costs no allocation.
    spare: Vec<Vec<u8>>,
    events: VecDeque<Event>,
    rng: ChaCha20Rng,
    buf: Vec<u8>,
    stats: Stats,
    shutting_down: bool,
    /// The peer whose data passed last: the likeliest for the next packet
    /// ([`Node::prefetch_packet_path`]).
    recent_peer: Option<PeerId>,
    /// Paths narrower than the mesh MTU, as the driver learnt them.
    path_mtus: path_mtu::PathMtus,
    /// The next deadline as [`Node::poll_timeout`] last worked it out.
    /// Every `&mut self` entry point clears it but those that only take
    /// from the node's queues or give a buffer back (`poll_transmit`,
    /// `poll_tun`, `poll_event`, `poll_answer`, `recycle`), which no timer
    /// depends on.
    kept_deadline: std::cell::Cell<Option<Option<Instant>>>,
}

/// Two minutes is WireGuard's REKEY_AFTER_TIME: a session idle that long
/// since its handshake would need a new one before its next data anyway.
pub const DEFAULT_PARK_IDLE_AFTER: Duration = Duration::from_secs(120);

/// First handshake retry; later ones back off linearly to 5x this.
const HANDSHAKE_RETRY: Duration = Duration::from_secs(1);
/// Handshake initiations per second before cookies are demanded.
const HANDSHAKES_PER_SECOND: u64 = 100;
/// WireGuard's REKEY_ATTEMPT_TIME.
const HANDSHAKE_GIVE_UP: Duration = Duration::from_secs(90);

impl Node {
    pub fn new(config: NodeConfig, identity: Identity, wg_secret: StaticSecret, now: Instant) -> Node {
        let me = identity.mesh_addr(config.network);
        let wg_public = PublicKey::from(&wg_secret);
        let mut rng = ChaCha20Rng::seed_from_u64(config.rng_seed);
        let backbones = BackboneClient::new(&config, identity.clone(), rng.next_u64(), now);
        let mut node = Node {
            me,
            my_ip: me.to_ipv6(),
            my_ipv4: meshtun_addr::canonical_ipv4(me),
            aliases: ipv4::AliasTable::default(),
            identity,
            wg_secret,
            wg_public,
            backbones,
            peers: peer_table::PeerTable::new(config.persistent_keepalive, now),
            free_peer_ids: Vec::new(),
            by_addr: HashMap::with_hasher(foldhash::fast::FixedState::with_seed(config.rng_seed ^ BY_ADDR_HASH_SALT)),
            by_wg_key: HashMap::new(),
            lookups: HashMap::new(),
            lookup_by_request: HashMap::new(),
            relay_grants: HashMap::new(),
            relay_grant_by_request: HashMap::new(),
            unreachable_until: HashMap::new(),
            query_cache: HashMap::new(),
            answers: VecDeque::new(),
            pings: HashMap::new(),
            next_ping_seq: 1,
            broadcasts: token_bucket::TokenBucket::new(BROADCAST_RATE, BROADCAST_BURST, now),
            too_big_answers: token_bucket::TokenBucket::new(TOO_BIG_RATE, TOO_BIG_BURST, now),
            known_group_names: Vec::new(),
            newest: HashMap::new(),
            unix_now: 0,
            revocations: None,
            firewall: firewall::Firewall::new(config.firewall.clone(), config.network != NetworkId::PUBLIC),
            next_trust_check: now,
            handshake_limiter: std::sync::Arc::new(boringtun::noise::rate_limiter::RateLimiter::new(&wg_public, HANDSHAKES_PER_SECOND)),
            transmits: VecDeque::new(),
            tun_out: VecDeque::new(),
            spare: Vec::new(),
            events: VecDeque::new(),
            rng,
            buf: vec![0; MAX_PACKET + WG_OVERHEAD],
            stats: Stats::default(),
            shutting_down: false,
            recent_peer: None,
            path_mtus: path_mtu::PathMtus::default(),
            kept_deadline: std::cell::Cell::new(None),
            config,
        };
        node.refresh_record();
        node
    }

    pub fn mesh_addr(&self) -> MeshAddr {
        self.me
    }

    pub fn mesh_ip(&self) -> Ipv6Addr {
        self.my_ip
    }

    /// This node's IPv4 address (its canonical one).
    pub fn mesh_ipv4(&self) -> std::net::Ipv4Addr {
        self.my_ipv4
    }

    /// The IPv4 address a node has on this host, if one was handed out.
    pub fn node_ipv4(&self, addr: MeshAddr) -> Option<std::net::Ipv4Addr> {
        if addr == self.me { Some(self.my_ipv4) } else { self.aliases.get(addr) }
    }

    /// The node an IPv4 address stands for on this host, if known.
    pub fn node_for_ipv4(&self, ip: std::net::Ipv4Addr) -> Option<MeshAddr> {
        self.aliases.node_for(ip)
    }

    /// Aliases to save so the IPv4 mapping survives a restart.
    pub fn ipv4_aliases(&self) -> Vec<(MeshAddr, std::net::Ipv4Addr)> {
        self.aliases.non_canonical()
    }

    pub fn restore_ipv4_aliases(&mut self, saved: &[(MeshAddr, std::net::Ipv4Addr)]) {
        self.aliases.restore(saved, self.my_ipv4);
    }

    pub fn wg_public_key(&self) -> [u8; 32] {
        self.wg_public.to_bytes()
    }

    /// The record this node currently publishes.
    pub fn record(&self) -> &NodeRecord {
        self.backbones.record()
    }

    /// Replaces the directly reachable endpoints (interfaces changed).
    pub fn set_local_endpoints(&mut self, endpoints: Vec<SocketAddr>, now: Instant) {
        self.kept_deadline.take();
        if endpoints != self.config.local_endpoints {
            self.config.local_endpoints = endpoints;
            self.refresh_record();
            self.backbones.register_now(now);
        }
    }

    /// Replaces the backbone list (addresses re-resolved by the driver).
    pub fn set_backbones(&mut self, backbones: Vec<SocketAddr>, now: Instant) {
        self.kept_deadline.take();
        self.backbones.set_backbones(backbones, now);
    }

    /// Wall-clock time (unix seconds) for certificate and key expiry; the
    /// driver sets it before handing in events.
    pub fn set_unix_time(&mut self, unix_secs: u64) {
        self.kept_deadline.take();
        self.unix_now = unix_secs;
    }

    /// Replaces the WireGuard static key. The mesh address stays (it
    /// belongs to the identity key); the new key is certified in a record
    /// with a higher version and sent to the backbones at once; sessions
    /// re-handshake with it on their next packet, and peers look the new
    /// key up when its first handshake reaches them.
    pub fn rotate_wg_key(&mut self, secret: StaticSecret, version: u32, expires_unix: u64, now: Instant) {
        self.kept_deadline.take();
        let public = PublicKey::from(&secret);
        self.wg_secret = secret;
        self.wg_public = public;
        self.handshake_limiter = std::sync::Arc::new(boringtun::noise::rate_limiter::RateLimiter::new(&public, HANDSHAKES_PER_SECOND));
        self.config.wg_key_version = version;
        self.config.wg_key_expires_unix = expires_unix;
        self.refresh_record();
        // The new record goes out first, so that when a peer looks up the
        // unknown key of our next handshake the backbones already have it.
        self.backbones.register_now(now);
        self.backbones.handle_timeout(now, &mut self.transmits, &mut self.events);
        // Parked peers too: one that only sends would otherwise handshake
        // with the old key, which nobody answers any more.
        let parked: Vec<PeerId> = self.peers.iter().flatten().filter(|p| p.is_parked()).map(|p| p.id).collect();
        for id in parked {
            self.unpark(id, false, now);
        }
        for peer in self.peers.iter_mut().flatten() {
            peer.probe_key = probe::probe_key(&self.wg_secret, &PublicKey::from(peer.record.wg_key));
            let Some(tunn) = peer.tunn.as_mut() else { continue };
            tunn.set_static_private(self.wg_secret.clone(), public, None);
            // The old sessions are gone on both sides' account: start the
            // new one now rather than when we next have data to send (a
            // node that only receives would otherwise stall).
            if let boringtun::noise::TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut self.buf, true) {
                send_wg(&mut self.transmits, &mut self.stats, &mut self.spare, peer, init);
            }
            peer.handshake = Some(HandshakeRetry { started: now, next: now + HANDSHAKE_RETRY, attempts: 1 });
        }
        tracing::info!(version, "WireGuard key rotated");
        self.events.push_back(Event::KeyRotated { version });
    }

    pub fn wg_key_version(&self) -> u32 {
        self.config.wg_key_version
    }

    pub fn firewall(&self) -> &firewall::Firewall {
        &self.firewall
    }

    /// Why `record` may not be a peer of this node, if it may not: another
    /// network, no valid certificate (private networks), an expired or
    /// superseded WireGuard key. Ok carries its certified groups.
    fn admit(&self, record: &NodeRecord) -> Result<Vec<String>, String> {
        self.check_network_and_key(record)?;
        if record.network == NetworkId::PUBLIC {
            return Ok(Vec::new());
        }
        let Some(owner) = &self.config.network_owner else {
            return Err("this node has no owner key for its private network".into());
        };
        let Some(cert) = &record.cert else {
            return Err("no membership certificate".into());
        };
        cert.verify(owner, record.network, record.node, self.unix_now, self.revocations.as_ref())
            .map(|m| m.groups)
            .map_err(|e| e.to_string())
    }

    /// The rules that do not involve a certificate: same network, a
    /// WireGuard key certification that has not expired and is not
    /// superseded by a newer version we have seen.
    fn check_network_and_key(&self, record: &NodeRecord) -> Result<(), String> {
        if record.network != self.me.network {
            return Err(format!("belongs to network {}", record.network.0));
        }
        if self.unix_now > 0 && record.wg_key_expires_unix < self.unix_now {
            return Err("its WireGuard key certification has expired".into());
        }
        if let Some(known) = self.newest.get(&record.mesh_addr()) {
            if known.wg_key_version > record.wg_key_version {
                return Err(format!("WireGuard key version {} is superseded by {}", record.wg_key_version, known.wg_key_version));
            }
        }
        Ok(())
    }

    /// [`Node::admit`] for a peer already admitted, without checking its
    /// certificate's signature again when it was checked before (the
    /// owner key and the record are the same): expiry and revocation are
    /// compared by number. Returns the certificate's expiry and serial
    /// when it had to be checked in full.
    fn recheck(&self, peer: &Peer) -> Result<Option<(u64, u64)>, String> {
        let record = &peer.record;
        let Some((not_after, serial)) = peer.cert_checked.filter(|_| record.network != NetworkId::PUBLIC) else {
            self.admit(record)?;
            let cert = match (&self.config.network_owner, &record.cert) {
                (Some(owner), Some(cert)) if record.network != NetworkId::PUBLIC => cert.verify_signature(owner).ok(),
                _ => None,
            };
            return Ok(cert.map(|m| (m.not_after_unix, m.serial)));
        };
        self.check_network_and_key(record)?;
        if self.unix_now > not_after {
            return Err(meshtun_proto::cert::CertError::Expired(not_after).to_string());
        }
        if self.revocations.as_ref().is_some_and(|r| r.network == record.network && r.serials.contains(&serial)) {
            return Err(meshtun_proto::cert::CertError::Revoked(serial).to_string());
        }
        Ok(None)
    }

    /// Re-checks every peer's certificate and key (expiry, revocation).
    fn check_trust(&mut self) {
        let mut checked = Vec::new();
        let revoked: Vec<(PeerId, String)> = self
            .peers
            .iter()
            .flatten()
            .filter_map(|p| match self.recheck(p) {
                Ok(Some(cert)) => {
                    checked.push((p.id, cert));
                    None
                }
                Ok(None) => None,
                Err(why) => Some((p.id, why)),
            })
            .collect();
        for (id, cert) in checked {
            if let Some(peer) = self.peers.get_mut_for_path(id.index()).and_then(Option::as_mut) {
                peer.cert_checked = Some(cert);
            }
        }
        for (id, reason) in revoked {
            if let Some(peer) = self.peers.get(id.index()).and_then(Option::as_ref) {
                tracing::warn!(peer = %peer.addr, %reason, "dropping peer");
                self.events.push_back(Event::PeerRemoved { peer: peer.addr.to_string(), reason });
            }
            self.remove_peer(id);
        }
    }

    /// Changes what this node declares about itself; the new record reaches
    /// the backbones at once (and in every heartbeat after).
    pub fn set_tags(&mut self, hostname: Option<String>, capabilities: Vec<String>, groups: Vec<String>, now: Instant) {
        self.kept_deadline.take();
        self.config.hostname = hostname;
        self.config.capabilities = capabilities;
        self.config.groups = groups;
        self.refresh_record();
        self.backbones.register_now(now);
    }

    /// Looks nodes up (by hostname, capability, group or address) for the
    /// driver; the answer comes from [`Node::poll_answer`]. Answers are
    /// cached briefly: the directory is eventually consistent anyway.
    pub fn query(&mut self, query: Query, now: Instant) -> Token {
        self.kept_deadline.take();
        self.query_with_cache(query, true, now)
    }

    /// Like [`Node::query`] but always asks the backbones (an operator's
    /// `meshtun find` wants the directory as it is now).
    pub fn query_fresh(&mut self, query: Query, now: Instant) -> Token {
        self.kept_deadline.take();
        self.query_with_cache(query, false, now)
    }

    fn query_with_cache(&mut self, query: Query, use_cache: bool, now: Instant) -> Token {
        let token = Token(self.rng.next_u64());
        if let Query::Hostname { name, .. } = &query {
            if self.config.hostname.as_deref() == Some(name.as_str()) {
                let found = vec![self.found(self.backbones.record().clone())];
                self.answers.push_back(Answer::Query { token, found, error: None });
                return token;
            }
        }
        if let Some((records, until)) = self.query_cache.get(&query).filter(|_| use_cache) {
            if *until > now {
                let found = records.clone().into_iter().map(|r| self.found(r)).collect();
                let found = self.rank(found);
                self.answers.push_back(Answer::Query { token, found, error: None });
                return token;
            }
        }
        self.start_lookup(query.clone(), now);
        match self.lookups.get_mut(&query) {
            Some(lookup) => lookup.waiters.push(token),
            None => self.answers.push_back(Answer::Query {
                token,
                found: vec![],
                error: Some("too many lookups in flight".into()),
            }),
        }
        token
    }

    /// Sends an ICMPv6 echo request to `to` through the mesh (looking it up
    /// and opening a session if needed); the reply comes back as
    /// [`Answer::Pong`]. Measures the mesh path itself.
    pub fn ping(&mut self, to: MeshAddr, now: Instant) -> Token {
        self.kept_deadline.take();
        let token = Token(self.rng.next_u64());
        let seq = self.next_ping_seq;
        self.next_ping_seq = self.next_ping_seq.wrapping_add(1).max(1);
        self.pings.retain(|_, p| now.saturating_duration_since(p.sent) < Duration::from_secs(60));
        self.pings.insert(seq, PendingPing { token, to, sent: now });
        let builder = etherparse::PacketBuilder::ipv6(self.my_ip.octets(), to.to_ipv6().octets(), 64)
            .icmpv6_echo_request(PING_IDENT, seq);
        let mut packet = Vec::with_capacity(builder.size(16));
        if builder.write(&mut packet, b"meshtun ping\0\0\0\0").is_ok() {
            self.handle_tun_packet(&packet, now);
        }
        token
    }

    /// Whether [`Node::poll_answer`] has anything.
    pub fn has_answers(&self) -> bool {
        !self.answers.is_empty()
    }

    pub fn poll_answer(&mut self) -> Option<Answer> {
        self.answers.pop_front()
    }

    /// Names a group this node may send to without being a member.
    pub fn learn_group_name(&mut self, name: String) {
        self.kept_deadline.take();
        if !self.known_group_names.contains(&name) {
            self.known_group_names.push(name);
        }
    }

    fn found(&mut self, record: NodeRecord) -> Found {
        let addr = record.mesh_addr();
        let ipv4 = if addr == self.me { self.my_ipv4 } else { self.aliases.alias_for(addr, self.my_ipv4) };
        let peer = self.by_addr.get(&addr).and_then(|id| self.peers.get(id.index())).and_then(Option::as_ref);
        Found {
            address: addr.to_string(),
            ipv6: addr.to_ipv6(),
            ipv4,
            hostname: record.hostname,
            capabilities: record.capabilities,
            groups: record.groups,
            rtt_ms: peer.and_then(|p| p.path.rtt()).map(|r| r.as_secs_f64() * 1000.0),
            path: peer.and_then(|p| p.path.current()).map(|p| p.to_string()),
            mesh_addr: addr,
        }
    }

    /// Best first: measured RTT ascending, then unmeasured, by address.
    fn rank(&self, mut found: Vec<Found>) -> Vec<Found> {
        found.sort_by(|a, b| {
            let key = |f: &Found| (f.rtt_ms.is_none(), f.rtt_ms.map(|r| (r * 1000.0) as u64).unwrap_or(0), f.mesh_addr);
            key(a).cmp(&key(b))
        });
        found
    }

    /// An IP packet read from the TUN.
    pub fn handle_tun_packet(&mut self, packet: &[u8], now: Instant) {
        self.kept_deadline.take();
        if packet::ip_version(packet) == Some(4) {
            self.handle_tun_ipv4(packet, now);
            return;
        }
        if ip_version_is_not_6(packet) {
            self.drop_packet(DropReason::NotIpv6);
            return;
        }
        let Some((_, dst)) = packet::ipv6_addresses(packet) else {
            self.drop_packet(DropReason::Malformed);
            return;
        };
        if meshtun_addr::group_network(dst) == Some(self.me.network) {
            self.broadcast(dst, packet, now);
            return;
        }
        let dest = match MeshAddr::from_ipv6(dst) {
            Ok(dest) if dest.network == self.me.network && dest.is_unicast() && dest != self.me => dest,
            // Multicast (router solicitations, MLD) and foreign prefixes are
            // not routable over the mesh.
            _ => {
                tracing::trace!(%dst, "no mesh route");
                self.drop_packet(DropReason::NoRoute);
                return;
            }
        };
        self.firewall.outbound(dest, packet, now);
        if let Some(&id) = self.by_addr.get(&dest) {
            self.encapsulate(id, packet, now);
            return;
        }
        if let Some(&until) = self.unreachable_until.get(&dest) {
            if until > now {
                self.answer_unreachable(packet);
                return;
            }
            self.unreachable_until.remove(&dest);
        }
        self.queue_for_lookup(Query::Address(dest), packet, now);
    }

    /// Asks the CPU to start loading what the next packet is likely to
    /// touch: the node's own fields, the queues and spare buffer it will
    /// use, and the slot, peer and session of the peer whose data passed
    /// last. A driver calls it as a wake-up begins, before the system call
    /// that reads the packet: after idle these lines are out of the caches,
    /// and loaded this way they arrive in parallel, much of it while the
    /// system call runs, rather than one stall at a time as the packet
    /// meets them. A
    /// hint only: it changes nothing, and a wrong guess costs a few loads.
    #[inline(never)]
    pub fn prefetch_packet_path(&self) {
        prefetch::object(self);
        if let Some(buffer) = self.spare.last() {
            prefetch::slice_head(buffer, 256);
        }
        prefetch::slice_head(&self.spare[self.spare.len().saturating_sub(1)..], 1);
        // Where the next entries go, empty as the queues usually are.
        prefetch::bytes(self.transmits.as_slices().0.as_ptr().cast(), 2 * std::mem::size_of::<Transmit>());
        prefetch::bytes(self.tun_out.as_slices().0.as_ptr().cast(), 1);
        if let Some(peer) = self.recent_peer.and_then(|id| self.peers.prefetch_slot(id.index())) {
            std::hint::black_box(self.by_addr.get(&peer.addr));
        }
    }

    /// A read from the TUN the driver could not make packets of (see
    /// [`offload::split`]): dropped and counted as malformed.
    pub fn handle_malformed_tun_read(&mut self) {
        self.kept_deadline.take();
        self.drop_packet(DropReason::Malformed);
    }

    /// A UDP datagram received on the node's socket.
    pub fn handle_udp(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        self.kept_deadline.take();
        match classify(datagram) {
            DatagramKind::Backbone => self.handle_backbone_datagram(from, datagram, now),
            DatagramKind::WireGuard => {
                self.stats.count_rx(PathKind::Direct, datagram.len());
                self.handle_wireguard(Origin::Direct(from), datagram, now)
            }
            DatagramKind::Relay => {
                if !self.backbones.is_backbone(from) {
                    self.drop_packet(DropReason::UnexpectedSource);
                    return;
                }
                match meshtun_proto::relay::unwrap(datagram) {
                    Some((_, inner)) => {
                        self.stats.count_rx(PathKind::Relay, datagram.len());
                        self.handle_wireguard(Origin::Relay(from), inner, now)
                    }
                    None => self.drop_packet(DropReason::Malformed),
                }
            }
            DatagramKind::Probe => self.handle_probe(from, datagram, now),
            DatagramKind::Stun | DatagramKind::Unknown => {
                tracing::trace!(%from, len = datagram.len(), "dropping unexpected datagram");
                self.drop_packet(DropReason::Malformed);
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.kept_deadline.take();
        self.backbones.handle_timeout(now, &mut self.transmits, &mut self.events);
        self.retry_lookups(now);
        self.retry_relay_grants(now);
        if self.next_trust_check <= now {
            self.handshake_limiter.reset_count();
            self.check_trust();
            self.path_mtus.expire(now);
            self.next_trust_check = self.peers.grid().next_period(self.next_trust_check, Duration::from_secs(1), now);
        }
        self.run_path_timers(now);
        if self.peers.next_wg_tick().is_some_and(|t| t <= now) {
            let (transmits, stats, spare) = (&mut self.transmits, &mut self.stats, &mut self.spare);
            self.peers.tick_wireguard(now, |peer, out| send_wg(transmits, stats, spare, peer, out));
        }
        self.unreachable_until.retain(|_, until| *until > now);
    }

    /// When [`Node::handle_timeout`] is next due. Kept from one call to the
    /// next until an entry point that can change a timer runs, so a driver
    /// can ask while the lines behind it are warm (before its send) and
    /// again, for one cold line, on its way to sleep.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if let Some(kept) = self.kept_deadline.get() {
            debug_assert_eq!(kept, self.next_deadline(), "an entry point changed a timer without clearing the kept deadline");
            return kept;
        }
        let next = self.next_deadline();
        self.kept_deadline.set(Some(next));
        next
    }

    fn next_deadline(&self) -> Option<Instant> {
        let lookups = self.lookups.values().map(|l| l.next_retry).min();
        let grants = self.relay_grants.values().map(|g| g.next_retry).min();
        let paths = self.peers.next_path_deadline();
        let trust = (!self.by_addr.is_empty()).then_some(self.next_trust_check);
        [self.backbones.poll_timeout(), lookups, grants, self.peers.next_wg_tick(), paths, trust]
            .into_iter()
            .flatten()
            .min()
    }

    /// The grid the node's timers fall on, for a driver that has periodic
    /// work of its own to put on it.
    pub fn timer_grid(&self) -> grid::TimerGrid {
        self.peers.grid()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Gives back a transmit's payload or a TUN packet once the driver is
    /// done with it: the node reuses the buffer (it keeps a bounded few).
    pub fn recycle(&mut self, buffer: Vec<u8>) {
        recycle_into(&mut self.spare, buffer);
    }

    pub fn poll_tun(&mut self) -> Option<Vec<u8>> {
        self.tun_out.pop_front()
    }

    /// How many datagrams ([`Node::poll_transmit`]) and TUN packets
    /// ([`Node::poll_tun`]) wait for the driver. A driver reading in batches
    /// flushes once this is a batch's worth, so packets leave while it
    /// reads on and the buffers they hold stay few (and warm in cache).
    pub fn backlog(&self) -> usize {
        self.transmits.len() + self.tun_out.len()
    }

    /// Whether [`Node::poll_event`] has anything.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Starts leaving the mesh: sends signed deregistrations to every
    /// backbone. The driver keeps polling until [`Node::is_deregistered`] or
    /// its own deadline.
    pub fn shutdown(&mut self, now: Instant) {
        self.kept_deadline.take();
        self.shutting_down = true;
        self.backbones.deregister(now, &mut self.transmits);
    }

    pub fn is_deregistered(&self) -> bool {
        self.shutting_down && self.backbones.all_deregistered()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn status(&self, now: Instant) -> NodeStatus {
        let mut stats = self.stats.clone();
        stats.sessions.parked = self.peers.iter().flatten().filter(|p| p.is_parked()).count() as u64;
        NodeStatus {
            address: self.me.to_string(),
            ipv6: self.my_ip,
            ipv4: self.my_ipv4,
            hostname: self.config.hostname.clone(),
            record_seq: self.backbones.record().seq,
            endpoints: self.backbones.record().endpoints.clone(),
            backbones: self.backbones.status(false, now),
            relays: self.backbones.status(true, now),
            peers: self
                .peers
                .iter()
                .flatten()
                .map(|p| {
                    let mut status = p.status(now);
                    status.ipv4 = self.aliases.get(p.addr);
                    status.inner_mtu = p.path.current().and_then(|path| self.inner_mtu(path, now));
                    status
                })
                .collect(),
            stats,
            capabilities: self.config.capabilities.clone(),
            groups: self.config.groups.clone(),
        }
    }

    /// Every peer's [`PeerHealth`]: the cheap snapshot the daemon takes
    /// once a second (a full [`Node::status`] formats and allocates per peer).
    pub fn peer_health(&self) -> impl Iterator<Item = peer::PeerHealth> + '_ {
        self.peers.iter().flatten().map(|p| p.health())
    }

    /// The kernel refused a datagram to `dst` as too large for the path:
    /// IP packets there may be at most `mtu` bytes (what it learnt from ICMP
    /// or has as the outgoing link's MTU). Until [`path_mtu::PATH_MTU_TTL`]
    /// passes, [`Node::max_packet_toward`] sizes packets for that path.
    pub fn handle_path_mtu(&mut self, dst: SocketAddr, mtu: usize, now: Instant) {
        self.kept_deadline.take();
        tracing::debug!(%dst, mtu, "path narrower than the mesh MTU");
        self.path_mtus.learn(dst, mtu, now);
    }

    /// The path MTU believed for `dst`, if one was reported (the driver
    /// asks the kernel again only when a refusal is not explained by it).
    pub fn path_mtu(&self, dst: SocketAddr, now: Instant) -> Option<usize> {
        self.path_mtus.get(dst, now)
    }

    /// A packet from the TUN larger than the narrow path to its peer
    /// carries whole (`limit`, from [`Node::max_packet_toward`]) that the
    /// driver could not cut to fit (anything but TCP it may cut: UDP, ICMP,
    /// signed TCP segments). IPv4 without DF is fragmented here, as a router
    /// would, into fragments that fit. Anything else still goes, fragmented
    /// by the UDP layer, and its sender is told the path's size as a router
    /// on the path would tell it (ICMPv6 "packet too big"; for IPv4 with DF,
    /// "fragmentation needed"), so its kernel fits what follows: IPv6
    /// fragmented at the source, a lower MSS, an error to an application
    /// that asked for DF. IPv6 cannot be told less than 1280 bytes: on a
    /// path narrower than that, the tunnel's datagrams stay fragmented.
    #[cold]
    #[inline(never)]
    pub fn handle_tun_packet_beyond_path(&mut self, packet: &[u8], limit: usize, now: Instant) {
        self.kept_deadline.take();
        let answer = match packet::ip_version(packet) {
            Some(4) => {
                let mut fragments = 0;
                if ipv4::fragment(packet, limit, |fragment| {
                    fragments += 1;
                    self.handle_tun_packet(fragment, now);
                }) {
                    self.stats.fragmented_for_path += 1;
                    tracing::trace!(limit, len = packet.len(), fragments, "IPv4 packet fragmented to fit the path");
                    return;
                }
                ipv4::icmp_fragmentation_needed(limit, packet)
            }
            Some(6) => packet::icmpv6_packet_too_big(limit, packet),
            _ => None,
        };
        if let Some(answer) = answer.filter(|_| self.too_big_answers.take(now)) {
            tracing::trace!(limit, len = packet.len(), "telling a sender the path is narrower than its packet");
            self.tun_out.push_back(answer);
            self.stats.too_big_signals += 1;
        }
        self.handle_tun_packet(packet, now);
    }

    /// The largest inner packet that reaches the destination of `packet`
    /// (an IP packet for the TUN's other side, or the headers of a TCP
    /// super-packet) without being fragmented on its way, when its peer's
    /// path is known to be narrower than the mesh MTU; `None` otherwise.
    /// The driver cuts TCP segments to fit.
    #[inline]
    pub fn max_packet_toward(&self, packet: &[u8], now: Instant) -> Option<usize> {
        if self.path_mtus.is_empty() {
            return None;
        }
        self.max_packet_toward_narrow(packet, now)
    }

    #[cold]
    #[inline(never)]
    fn max_packet_toward_narrow(&self, packet: &[u8], now: Instant) -> Option<usize> {
        let dest = match packet::ip_version(packet)? {
            4 => self.aliases.node_for(ipv4::addresses(packet)?.1)?,
            6 => MeshAddr::from_ipv6(packet::ipv6_addresses(packet)?.1).ok()?,
            _ => return None,
        };
        let id = *self.by_addr.get(&dest)?;
        let path = self.peers.get(id.index()).and_then(Option::as_ref)?.path.current()?;
        self.inner_mtu(path, now)
    }

    /// The largest inner packet `path` carries unfragmented, when narrower
    /// than the mesh MTU is known.
    fn inner_mtu(&self, path: Path, now: Instant) -> Option<usize> {
        let (dst, framing) = match path {
            Path::Direct(dst) => (dst, 0),
            Path::Relay(relay) => (relay, meshtun_proto::relay::RELAY_HEADER_LEN),
        };
        let mtu = self.path_mtus.get(dst, now)?;
        Some(path_mtu::inner_limit(mtu, dst, framing))
    }

    fn refresh_record(&mut self) {
        let record = NodeRecord {
            network: self.config.network,
            node: self.identity.node_addr(),
            identity_key: self.identity.public_key(),
            pow_nonce: self.identity.nonce(),
            wg_key: self.wg_public.to_bytes(),
            endpoints: Vec::new(),
            hostname: self.config.hostname.clone(),
            capabilities: self.config.capabilities.clone(),
            groups: self.config.groups.clone(),
            seq: 0,
            wg_key_version: self.config.wg_key_version,
            wg_key_expires_unix: self.config.wg_key_expires_unix,
            cert: self.config.certificate.clone(),
        };
        self.backbones.set_record_template(record, self.config.local_endpoints.clone());
    }

    fn handle_backbone_datagram(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        if !self.backbones.is_backbone(from) {
            self.drop_packet(DropReason::UnexpectedSource);
            return;
        }
        let message = match Message::decode(datagram) {
            Ok(m) => m,
            Err(error) => {
                tracing::debug!(%from, %error, "malformed backbone message");
                self.drop_packet(DropReason::Malformed);
                return;
            }
        };
        match message {
            Message::LookupReply { request_id, records } if self.relay_grant_by_request.contains_key(&request_id) => {
                self.handle_relay_grant_reply(from, request_id, &records)
            }
            Message::Reject { request_id, code, .. } if self.relay_grant_by_request.contains_key(&request_id) => {
                tracing::debug!(relay = %from, code = code.as_str(), "relay refused the permission lookup");
                if code == meshtun_proto::RejectCode::NotRegistered {
                    self.backbones.register_now(now);
                }
            }
            Message::LookupReply { request_id, records } => {
                self.handle_lookup_reply(from, request_id, records, now)
            }
            Message::Revocations { list } => {
                let Some(owner) = self.config.network_owner else { return };
                match list.verify(&owner, self.me.network) {
                    Ok(r) if self.revocations.as_ref().is_none_or(|cur| r.seq > cur.seq) => {
                        tracing::info!(seq = r.seq, revoked = r.serials.len(), "revocation list updated");
                        self.events.push_back(Event::RevocationsUpdated { seq: r.seq, revoked: r.serials.len() });
                        self.revocations = Some(r);
                        self.check_trust();
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "backbone sent a revocation list that does not verify");
                        self.stats.bad_records += 1;
                    }
                }
            }
            Message::PeerIntent { record } => match record.verify() {
                Ok(v) if v.record.network == self.me.network && v.record.mesh_addr() != self.me => {
                    tracing::debug!(peer = %v.record.mesh_addr(), "peer intends to connect; probing it");
                    let record = self.newest_of(v.record);
                    if let Some(id) = self.upsert_peer(record, Some(from), now) {
                        if let Some(peer) = self.peers.get_mut(id.index()).and_then(Option::as_mut) {
                            peer.path.restart_probing(now);
                        }
                    }
                }
                _ => self.stats.bad_records += 1,
            },
            Message::Reject { request_id, .. } if self.lookup_by_request.contains_key(&request_id) => {
                // The backbone does not know us (yet): re-register, and let
                // the lookup's retry go out after that.
                self.backbones.register_now(now);
            }
            other => {
                let record_changed = self.backbones.handle_message(from, other, now, &mut self.events);
                if record_changed {
                    self.backbones.register_now(now);
                }
            }
        }
    }

    /// An IPv4 packet from the TUN: its destination is a local alias of a
    /// node; inside the tunnel it travels with canonical addresses.
    fn handle_tun_ipv4(&mut self, packet: &[u8], now: Instant) {
        let Some((_, dst)) = ipv4::addresses(packet) else {
            self.drop_packet(DropReason::Malformed);
            return;
        };
        if !meshtun_addr::is_mesh_ipv4(dst) || dst == self.my_ipv4 {
            self.drop_packet(DropReason::NoRoute);
            return;
        }
        match self.aliases.node_for(dst) {
            Some(dest) => {
                let mut packet = packet.to_vec();
                let canonical = meshtun_addr::canonical_ipv4(dest);
                if canonical != dst && !ipv4::rewrite(&mut packet, None, Some(canonical)) {
                    self.drop_packet(DropReason::Malformed);
                    return;
                }
                self.firewall.outbound(dest, &packet, now);
                self.route_unicast(dest, &packet, now);
            }
            // An address nobody here has used yet: ask which node has it.
            None => {
                let query = Query::Ipv4 { network: self.me.network, addr: dst.octets() };
                self.queue_for_lookup(query, packet, now);
            }
        }
    }

    /// A packet to a group address: sent once to every member over its own
    /// session. The mesh is one link, so members never forward it again.
    #[inline(never)]
    fn broadcast(&mut self, group_ip: Ipv6Addr, packet: &[u8], now: Instant) {
        if packet.get(7).is_some_and(|hop_limit| *hop_limit == 0) {
            self.drop_packet(DropReason::NoRoute);
            return;
        }
        if !self.broadcasts.take(now) {
            self.drop_packet(DropReason::RateLimited);
            return;
        }
        // The address is a hash: only groups this node can name resolve.
        let Some(name) = self.group_name_for(group_ip) else {
            self.drop_packet(DropReason::NoRoute);
            return;
        };
        let query = Query::Group { network: self.me.network, name };
        match self.query_cache.get(&query) {
            Some((members, until)) if *until > now => {
                let members: Vec<MeshAddr> = members.iter().map(|r| r.mesh_addr()).filter(|a| *a != self.me).collect();
                self.stats.broadcasts_sent += 1;
                for member in members {
                    self.route_unicast(member, packet, now);
                }
            }
            _ => self.queue_for_lookup(query, packet, now),
        }
    }

    fn group_name_for(&self, group_ip: Ipv6Addr) -> Option<String> {
        let network = self.me.network;
        self.config
            .groups
            .iter()
            .chain(self.known_group_names.iter())
            .find(|name| meshtun_addr::group_multicast_addr(network, name) == group_ip)
            .cloned()
    }

    fn route_unicast(&mut self, dest: MeshAddr, packet: &[u8], now: Instant) {
        if let Some(&id) = self.by_addr.get(&dest) {
            self.encapsulate(id, packet, now);
        } else {
            self.queue_for_lookup(Query::Address(dest), packet, now);
        }
    }

    #[inline(never)]
    fn queue_for_lookup(&mut self, query: Query, packet: &[u8], now: Instant) {
        if !self.lookups.contains_key(&query) && self.lookups.len() >= self.config.max_pending_destinations {
            self.drop_packet(DropReason::QueueFull);
            return;
        }
        let max = self.config.max_queued_per_destination;
        let lookup = self.lookups.entry(query.clone()).or_insert_with(|| PendingLookup::new(query, now));
        if lookup.packets.len() >= max {
            self.stats.count_drop(DropReason::QueueFull);
            return;
        }
        lookup.packets.push_back(packet.to_vec());
        if lookup.attempts == 0 {
            self.retry_lookups(now);
        }
    }

    #[inline(never)]
    fn stash_handshake_for_lookup(&mut self, key: [u8; 32], from: Origin, datagram: &[u8], now: Instant) {
        let query = Query::WgKey { network: self.me.network, key };
        if !self.lookups.contains_key(&query) && self.lookups.len() >= self.config.max_pending_destinations {
            self.drop_packet(DropReason::QueueFull);
            return;
        }
        let lookup = self.lookups.entry(query.clone()).or_insert_with(|| PendingLookup::new(query, now));
        lookup.handshake = Some((from, datagram.to_vec()));
        if lookup.attempts == 0 {
            self.retry_lookups(now);
        }
    }

    fn retry_lookups(&mut self, now: Instant) {
        let due: Vec<Query> = self
            .lookups
            .values()
            .filter(|l| l.next_retry <= now)
            .map(|l| l.query.clone())
            .collect();
        for query in due {
            let Some(lookup) = self.lookups.get_mut(&query) else { continue };
            if lookup.collect_until.is_some() {
                // The collection window (or the retry deadline) is over.
                self.finish_set(query, now);
                continue;
            }
            if !lookup.answered.is_empty() {
                // Some backbones said "not found" and the rest stayed silent
                // for a whole retry interval: believe the ones that answered.
                self.fail_lookup(&query, "not registered with any backbone that answered", now);
                continue;
            }
            if lookup.attempts >= self.config.lookup_attempts {
                self.fail_lookup(&query, "no backbone answered", now);
                continue;
            }
            // Exponential backoff: 1, 2, 4, ... request timeouts.
            let backoff = self.config.request_timeout * (1u32 << lookup.attempts.min(5));
            let backbones = self.backbones.registered();
            if backbones.is_empty() {
                // Not registered anywhere yet: wait, but let the attempt count.
                lookup.attempts += 1;
                lookup.next_retry = now + backoff;
                continue;
            }
            self.lookup_by_request.remove(&lookup.request_id);
            lookup.request_id = self.rng.next_u64();
            lookup.attempts += 1;
            lookup.next_retry = now + backoff;
            lookup.asked = backbones.clone();
            self.lookup_by_request.insert(lookup.request_id, query.clone());
            // Ask every backbone at once: the first record found wins, so a
            // dead backbone costs nothing (and each one learns the intent),
            // but "not found" needs every backbone asked to agree.
            self.stats.lookups_sent += 1;
            let payload = Message::Lookup { request_id: lookup.request_id, from: self.me, query }.encode();
            tracing::debug!(backbones = backbones.len(), request_id = lookup.request_id, "lookup sent");
            for backbone in backbones {
                self.transmits.push_back(Transmit { dst: backbone, payload: payload.clone() });
            }
        }
    }

    fn fail_lookup(&mut self, query: &Query, reason: &str, now: Instant) {
        let Some(lookup) = self.lookups.remove(query) else { return };
        self.lookup_by_request.remove(&lookup.request_id);
        self.stats.lookups_failed += 1;
        for token in &lookup.waiters {
            self.answers.push_back(Answer::Query { token: *token, found: vec![], error: Some(reason.to_string()) });
        }
        if reason.starts_with("not registered") {
            self.query_cache.insert(query.clone(), (Vec::new(), now + NEGATIVE_QUERY_CACHE_TTL));
        }
        if let Query::Address(dest) = query {
            self.events.push_back(Event::LookupFailed { peer: dest.to_string(), reason: reason.into() });
            self.unreachable_until.insert(*dest, now + self.config.negative_cache);
            for packet in &lookup.packets {
                self.answer_unreachable(packet);
            }
        }
        for _ in &lookup.packets {
            self.stats.count_drop(DropReason::LookupFailed);
        }
    }

    fn handle_lookup_reply(&mut self, backbone: SocketAddr, request_id: u64, records: Vec<SignedRecord>, now: Instant) {
        let Some(query) = self.lookup_by_request.get(&request_id).cloned() else {
            // An answer to an earlier attempt, or to a lookup already done.
            tracing::trace!(%backbone, request_id, "answer to no pending lookup");
            return;
        };
        let Some(lookup) = self.lookups.get_mut(&query) else { return };
        if !lookup.asked.contains(&backbone) || lookup.answered.contains(&backbone) {
            tracing::trace!(%backbone, request_id, "duplicate or unasked answer");
            return;
        }
        if lookup.answered.is_empty() {
            self.stats.lookup_latency.observe(now.saturating_duration_since(lookup.started));
        }
        lookup.answered.push(backbone);
        if query.is_set() {
            self.handle_set_reply(query, records, now);
            return;
        }
        let found = records.iter().find_map(|signed| match signed.verify() {
            Ok(v) if record_answers(&v, &query) => Some(v),
            Ok(_) => {
                tracing::warn!("backbone answered a lookup with a record that does not match it");
                self.stats.bad_records += 1;
                None
            }
            Err(error) => {
                tracing::warn!(%error, "backbone sent a record that does not verify");
                self.stats.bad_records += 1;
                None
            }
        });
        let Some(mut verified) = found else {
            // One backbone not knowing the node proves little (it may have
            // just restarted empty); only every backbone asked agreeing does.
            if let Some(lookup) = self.lookups.get(&query) {
                if lookup.asked.iter().all(|b| lookup.answered.contains(b)) {
                    self.fail_lookup(&query, "not registered with the backbone", now);
                }
            }
            return;
        };
        verified.record = self.newest_of(verified.record);
        let Some(lookup) = self.lookups.remove(&query) else { return };
        self.lookup_by_request.remove(&lookup.request_id);
        self.query_cache.insert(query.clone(), (vec![verified.record.clone()], now + QUERY_CACHE_TTL));
        for token in &lookup.waiters {
            let found = vec![self.found(verified.record.clone())];
            self.answers.push_back(Answer::Query { token: *token, found, error: None });
        }
        if !matches!(query, Query::Address(_) | Query::WgKey { .. }) && lookup.packets.is_empty() {
            return; // name resolution only: no session until traffic flows
        }
        let Some(id) = self.upsert_peer(verified.record, Some(backbone), now) else {
            for _ in &lookup.packets {
                self.stats.count_drop(DropReason::Firewall);
            }
            return;
        };
        if let Some((from, datagram)) = lookup.handshake {
            self.handle_wireguard(from, &datagram, now);
        }
        for packet in lookup.packets {
            self.encapsulate(id, &packet, now);
        }
    }

    /// One backbone's answer to a capability or group query: every verified
    /// record that really carries the tag joins the members collected from
    /// the other backbones; a record older than one we already hold for
    /// that node is replaced by ours (a backbone cannot roll a node back).
    /// The query finishes when every backbone asked has answered, or
    /// [`SET_COLLECT_WINDOW`] after the first answer.
    fn handle_set_reply(&mut self, query: Query, records: Vec<SignedRecord>, now: Instant) {
        let mut members: Vec<NodeRecord> = Vec::new();
        for signed in records {
            match signed.verify() {
                Ok(v) if record_answers(&v, &query) => {
                    let record = self.newest_of(v.record);
                    if record_answers_plain(&record, &query) {
                        members.push(record);
                    }
                }
                _ => self.stats.bad_records += 1,
            }
        }
        let window = SET_COLLECT_WINDOW.min(self.config.request_timeout);
        let Some(lookup) = self.lookups.get_mut(&query) else { return };
        for record in members {
            match lookup.members.iter_mut().find(|m| m.mesh_addr() == record.mesh_addr()) {
                Some(m) if m.seq < record.seq => *m = record,
                Some(_) => {}
                None => lookup.members.push(record),
            }
        }
        let until = *lookup.collect_until.get_or_insert(now + window);
        lookup.next_retry = lookup.next_retry.min(until);
        if lookup.asked.iter().all(|b| lookup.answered.contains(b)) {
            self.finish_set(query, now);
        }
    }

    fn finish_set(&mut self, query: Query, now: Instant) {
        let Some(lookup) = self.lookups.remove(&query) else { return };
        self.lookup_by_request.remove(&lookup.request_id);
        let mut members = lookup.members;
        members.sort_by_key(|r| r.mesh_addr());
        members.dedup_by_key(|r| r.mesh_addr());
        let ttl = if members.is_empty() { NEGATIVE_QUERY_CACHE_TTL } else { QUERY_CACHE_TTL };
        self.query_cache.insert(query.clone(), (members.clone(), now + ttl));
        for token in &lookup.waiters {
            let found = members.iter().cloned().map(|r| self.found(r)).collect();
            let found = self.rank(found);
            self.answers.push_back(Answer::Query { token: *token, found, error: None });
        }
        if let Query::Ipv4 { addr, .. } = query {
            let literal = std::net::Ipv4Addr::from(addr);
            match members.as_slice() {
                [only] if self.aliases.node_for(literal).is_none() && literal != self.my_ipv4 => {
                    let dest = only.mesh_addr();
                    let alias = self.aliases.alias_for(dest, self.my_ipv4);
                    for packet in &lookup.packets {
                        let mut packet = packet.clone();
                        let canonical = meshtun_addr::canonical_ipv4(dest);
                        if alias == literal && (canonical == alias || ipv4::rewrite(&mut packet, None, Some(canonical))) {
                            self.firewall.outbound(dest, &packet, now);
                            self.route_unicast(dest, &packet, now);
                        }
                    }
                }
                [] => {
                    for _ in &lookup.packets {
                        self.stats.count_drop(DropReason::LookupFailed);
                    }
                }
                _ => {
                    tracing::warn!(%literal, nodes = members.len(), "IPv4 address is ambiguous here; use the node's name or IPv6 address");
                    for _ in &lookup.packets {
                        self.stats.count_drop(DropReason::LookupFailed);
                    }
                }
            }
            return;
        }
        // Group packets that waited for the member list go out now.
        if !lookup.packets.is_empty() {
            self.stats.broadcasts_sent += lookup.packets.len() as u64;
            let targets: Vec<MeshAddr> = members.iter().map(|r| r.mesh_addr()).filter(|a| *a != self.me).collect();
            for member in targets {
                for packet in &lookup.packets {
                    self.route_unicast(member, packet, now);
                }
            }
        }
    }

    /// `record`, or the newer one already seen for that node (counting the
    /// backbone's stale answer).
    fn newest_of(&mut self, record: NodeRecord) -> NodeRecord {
        let addr = record.mesh_addr();
        match self.newest.get(&addr) {
            // Older, or a rolled-back WireGuard key: keep what we know.
            Some(known) if known.seq > record.seq || known.wg_key_version > record.wg_key_version => {
                tracing::warn!(peer = %addr, seq = record.seq, newest = known.seq, "backbone answered with a stale record; keeping the newer one");
                self.stats.stale_records += 1;
                known.clone()
            }
            _ => {
                if self.newest.len() >= MAX_REMEMBERED_RECORDS {
                    self.newest.clear();
                }
                self.newest.insert(addr, record.clone());
                record
            }
        }
    }

    fn upsert_peer(&mut self, record: NodeRecord, relay: Option<SocketAddr>, now: Instant) -> Option<PeerId> {
        let id = self.upsert_peer_inner(record, self.backbones.first_registered_relay().or(relay), now)?;
        let (addr, relay) = match self.peers.get(id.index()).and_then(Option::as_ref) {
            Some(peer) => (peer.addr, peer.path.relay()),
            None => return Some(id),
        };
        if let Some(relay) = relay.filter(|r| self.backbones.is_relay(*r)) {
            self.want_relay_grant(addr, relay, now);
        }
        Some(id)
    }

    /// Asks a standalone relay for the pair permission with `peer` (unless
    /// already being asked), at once: the first packets for the peer may
    /// follow in the same batch.
    fn want_relay_grant(&mut self, peer: MeshAddr, relay: SocketAddr, now: Instant) {
        if self.relay_grants.get(&peer).is_some_and(|g| g.relay == relay) {
            return;
        }
        if let Some(old) = self.relay_grants.remove(&peer) {
            self.relay_grant_by_request.remove(&old.request_id);
        }
        if self.relay_grants.len() >= self.config.max_pending_destinations {
            return; // the periodic refresh asks again
        }
        self.relay_grants.insert(peer, RelayGrant { relay, request_id: 0, attempts: 0, next_retry: now });
        self.retry_relay_grants(now);
    }

    fn retry_relay_grants(&mut self, now: Instant) {
        let due: Vec<MeshAddr> = self.relay_grants.iter().filter(|(_, g)| g.next_retry <= now).map(|(a, _)| *a).collect();
        for peer in due {
            let Some(grant) = self.relay_grants.get_mut(&peer) else { continue };
            self.relay_grant_by_request.remove(&grant.request_id);
            if grant.attempts >= self.config.lookup_attempts {
                tracing::debug!(%peer, relay = %grant.relay, "relay did not grant the pair permission; trying again at the next refresh");
                self.relay_grants.remove(&peer);
                continue;
            }
            grant.attempts += 1;
            grant.next_retry = now + self.config.request_timeout * (1u32 << grant.attempts.min(5));
            if !self.backbones.is_registered(grant.relay) {
                continue;
            }
            grant.request_id = self.rng.next_u64();
            self.relay_grant_by_request.insert(grant.request_id, peer);
            let payload = Message::Lookup { request_id: grant.request_id, from: self.me, query: Query::Address(peer) }.encode();
            self.transmits.push_back(Transmit { dst: grant.relay, payload });
        }
    }

    /// The relay answered a permission lookup: with the peer's record it
    /// has granted the pair; empty, the peer has not registered there yet
    /// and the lookup is retried.
    fn handle_relay_grant_reply(&mut self, from: SocketAddr, request_id: u64, records: &[SignedRecord]) {
        let Some(&peer) = self.relay_grant_by_request.get(&request_id) else { return };
        if self.relay_grants.get(&peer).is_none_or(|g| g.relay != from) {
            return;
        }
        if records.iter().any(|r| r.verify().is_ok_and(|v| v.record.mesh_addr() == peer)) {
            self.relay_grant_by_request.remove(&request_id);
            self.relay_grants.remove(&peer);
            tracing::debug!(%peer, relay = %from, "relay permission granted");
        }
    }

    fn upsert_peer_inner(&mut self, record: NodeRecord, relay: Option<SocketAddr>, now: Instant) -> Option<PeerId> {
        let addr = record.mesh_addr();
        let certified_groups = match self.admit(&record) {
            Ok(groups) => groups,
            Err(reason) => {
                tracing::info!(peer = %addr, %reason, "not accepting this node as a peer");
                self.stats.untrusted_peers += 1;
                return None;
            }
        };
        let own = self.backbones.record().endpoints.clone();
        if let Some(&id) = self.by_addr.get(&addr) {
            if let Some(peer) = self.peers.get_mut(id.index()).and_then(Option::as_mut) {
                if record.wg_key == peer.record.wg_key {
                    if let (Some(relay), None) = (relay, peer.path.relay()) {
                        peer.path.set_relay(relay);
                    }
                    if record.seq > peer.record.seq {
                        peer.update_record(record, &own);
                        peer.certified_groups = certified_groups;
                    }
                    return Some(id);
                }
            }
            self.remove_peer(id);
        }
        let id = match self.free_peer_ids.pop() {
            Some(id) => id,
            None => {
                self.peers.push(now);
                PeerId((self.peers.len() - 1) as u32)
            }
        };
        let peer_public = PublicKey::from(record.wg_key);
        let probe_key = probe::probe_key(&self.wg_secret, &peer_public);
        let candidates: Vec<SocketAddr> = record.endpoints.iter().copied().filter(|e| !own.contains(e)).collect();
        let path = PathAgent::new(&candidates, relay, self.peers.grid(), now);
        let tunn = self.new_tunn(id, record.wg_key);
        self.events.push_back(Event::PeerAdded {
            peer: addr.to_string(),
            hostname: record.hostname.clone(),
        });
        tracing::info!(peer = %addr, hostname = ?record.hostname, "peer added");
        self.by_wg_key.insert(record.wg_key, id);
        self.by_addr.insert(addr, id);
        let mut peer = Peer::new(id, record, tunn, path, probe_key, now);
        peer.certified_groups = certified_groups;
        peer.on_data(now, self.config.park_idle_after);
        self.peers.insert(id.index(), peer, now);
        Some(id)
    }

    /// A WireGuard session for the peer in slot `id`: its index carries
    /// the slot in the upper 24 bits (how inbound datagrams find the peer).
    fn new_tunn(&self, id: PeerId, peer_key: [u8; 32]) -> Box<Tunn> {
        Box::new(Tunn::new(self.wg_secret.clone(), PublicKey::from(peer_key), None, self.config.persistent_keepalive, id.0, None))
    }

    /// Drops the session of an idle peer (see [`NodeConfig::park_idle_after`]).
    fn park(&mut self, id: PeerId) {
        let Some(tunn) = self.peers.park(id.index()) else { return };
        let (_, tx, rx, _, _) = tunn.stats();
        drop(tunn);
        if let Some(peer) = self.peers.get_mut_for_path(id.index()).and_then(Option::as_mut) {
            peer.parked_bytes.0 += tx as u64;
            peer.parked_bytes.1 += rx as u64;
            peer.park_at = None;
            peer.handshake = None;
            tracing::debug!(peer = %peer.addr, "idle session parked");
        }
        self.stats.sessions.parks += 1;
        // Traffic has stopped: the buffers kept for it are dead weight.
        self.spare = Vec::new();
    }

    /// Gives a parked peer a new session (with the current static key).
    fn unpark(&mut self, id: PeerId, inbound: bool, now: Instant) {
        let Some(key) = self.peers.get(id.index()).and_then(Option::as_ref).filter(|p| p.is_parked()).map(|p| p.record.wg_key) else {
            return;
        };
        let tunn = self.new_tunn(id, key);
        self.peers.unpark(id.index(), tunn, now);
        if let Some(peer) = self.peers.get_mut_for_path(id.index()).and_then(Option::as_mut) {
            peer.on_data(now, self.config.park_idle_after);
            tracing::debug!(peer = %peer.addr, inbound, "parked session woken");
        }
        if inbound {
            self.stats.sessions.unparks_inbound += 1;
        } else {
            self.stats.sessions.unparks_outbound += 1;
        }
    }

    fn remove_peer(&mut self, id: PeerId) {
        let Some(peer) = self.peers.take(id.index()) else { return };
        self.by_addr.remove(&peer.addr);
        if self.by_wg_key.get(&peer.record.wg_key) == Some(&id) {
            self.by_wg_key.remove(&peer.record.wg_key);
        }
        self.free_peer_ids.push(id);
    }

    fn encapsulate(&mut self, id: PeerId, packet: &[u8], now: Instant) {
        let need = (packet.len() + WG_OVERHEAD).max(MIN_WG_BUFFER);
        if need > self.buf.len() {
            self.stats.count_drop(DropReason::Malformed);
            return;
        }
        // A parked peer handshakes again; boringtun queues the packet
        // meanwhile (bounded), as for a new peer.
        if self.peers.get(id.index()).and_then(Option::as_ref).is_some_and(|p| p.is_parked()) {
            self.unpark(id, false, now);
        }
        let Some(peer) = self.peers.get_mut(id.index()).and_then(Option::as_mut) else { return };
        peer.on_data(now, self.config.park_idle_after);
        self.recent_peer = Some(id);
        let Some(tunn) = peer.tunn.as_mut() else { return };
        // Sealed straight into the buffer that leaves: no copy, and the
        // node's scratch buffer stays out of the packet path's cache lines.
        let mut out = spare_of_len(&mut self.spare, need);
        let sealed = match tunn.encapsulate(packet, &mut out) {
            boringtun::noise::TunnResult::WriteToNetwork(sealed) => Some(sealed.len()),
            boringtun::noise::TunnResult::Err(error) => {
                tracing::trace!(peer = %peer.addr, ?error, "encapsulate failed");
                self.stats.count_drop(DropReason::WireGuard);
                None
            }
            _ => None,
        };
        let Some(len) = sealed else {
            recycle_into(&mut self.spare, out);
            return;
        };
        out.truncate(len);
        peer.tx_packets += 1;
        self.stats.tx_packets += 1;
        self.stats.tx_bytes += packet.len() as u64;
        peer.path.on_activity(now);
        if out.first() == Some(&1) && peer.handshake.is_none() {
            peer.handshake = Some(HandshakeRetry { started: now, next: now + HANDSHAKE_RETRY, attempts: 1 });
        }
        send_wg_owned(&mut self.transmits, &mut self.stats, &mut self.spare, peer, out);
    }

    /// The handshake limiter's verdict on an initiation: under load it is
    /// answered with a cookie (or dropped) instead of with work. Whether to
    /// go on. Out of line, as the handshake paths below: data packets are
    /// the common case, and the packet path stays compact.
    #[cold]
    #[inline(never)]
    fn admit_initiation(&mut self, origin: Origin, from: SocketAddr, datagram: &[u8]) -> bool {
        match self.handshake_limiter.verify_packet(Some(from.ip()), datagram, &mut self.buf) {
            Ok(_) => {}
            Err(boringtun::noise::TunnResult::WriteToNetwork(cookie)) => {
                // Under load: answer with a cookie (smaller than the
                // initiation), not with work.
                self.stats.handshake_cookies_sent += 1;
                let payload = match origin {
                    Origin::Direct(_) => cookie.to_vec(),
                    Origin::Relay(_) => {
                        // The relay tells us who sent it only in its header,
                        // which the datagram no longer has: drop instead.
                        self.drop_packet(DropReason::RateLimited);
                        return false;
                    }
                };
                self.transmits.push_back(Transmit { dst: from, payload });
                return false;
            }
            Err(_) => {
                self.drop_packet(DropReason::WireGuard);
                return false;
            }
        }
        true
    }

    /// The peer an initiation comes from: a known key's peer, else the
    /// initiation waits for a lookup of the key (None, as for one not meant
    /// for this node).
    #[cold]
    #[inline(never)]
    fn initiator(&mut self, init: &boringtun::noise::HandshakeInit, origin: Origin, from: SocketAddr, datagram: &[u8], now: Instant) -> Option<PeerId> {
        match boringtun::noise::handshake::parse_handshake_anon(&self.wg_secret, &self.wg_public, init) {
            Ok(half) => match self.by_wg_key.get(&half.peer_static_public) {
                Some(&id) => Some(id),
                None => {
                    tracing::debug!(%from, "handshake from an unknown key; looking it up");
                    self.stash_handshake_for_lookup(half.peer_static_public, origin, datagram, now);
                    None
                }
            },
            Err(error) => {
                tracing::trace!(%from, ?error, "handshake not for us");
                self.stats.handshakes.rejected += 1;
                self.drop_packet(wireguard_drop(&error));
                None
            }
        }
    }

    fn handle_wireguard(&mut self, origin: Origin, datagram: &[u8], now: Instant) {
        let from = match origin {
            Origin::Direct(a) | Origin::Relay(a) => a,
        };
        if datagram.first() == Some(&1) && !self.admit_initiation(origin, from, datagram) {
            return;
        }
        let id = match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::HandshakeInit(init)) => match self.initiator(&init, origin, from, datagram, now) {
                Some(id) => id,
                None => return,
            },
            Ok(Packet::HandshakeResponse(p)) => PeerId(p.receiver_idx >> 8),
            Ok(Packet::PacketCookieReply(p)) => PeerId(p.receiver_idx >> 8),
            Ok(Packet::PacketData(p)) => PeerId(p.receiver_idx >> 8),
            Err(_) => {
                self.drop_packet(DropReason::Malformed);
                return;
            }
        };
        let message_type = datagram.first().copied();
        let was_parked = self.peers.get(id.index()).and_then(Option::as_ref).is_some_and(|p| p.is_parked());
        if was_parked {
            // An initiation gets a new session and its answer. Data for the
            // session we parked (the peer still has it) gets a new session
            // and our initiation, below. A keepalive (an empty data message:
            // header and tag only, 32 bytes) or a late answer to a handshake
            // of the parked session wakes nothing.
            let wakes = match message_type {
                Some(1) => true,
                Some(4) => datagram.len() > 32,
                _ => false,
            };
            if !wakes {
                self.stats.count_drop(DropReason::WireGuard);
                return;
            }
            self.unpark(id, true, now);
        }
        let Some(peer) = self.peers.get_mut(id.index()).and_then(Option::as_mut) else {
            self.drop_packet(DropReason::UnknownPeer);
            return;
        };
        if let Origin::Relay(via) = origin {
            if peer.path.relay().is_none() {
                peer.path.set_relay(via);
            }
        }
        if was_parked && message_type == Some(4) {
            // It cannot be read any more. Initiating at once moves the peer
            // to a new session within about a round trip: its data goes
            // there once our first packet on it (the keepalive boringtun
            // sends after the response) arrives.
            self.stats.count_drop(DropReason::WireGuard);
            let Some(tunn) = peer.tunn.as_mut() else { return };
            if let boringtun::noise::TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut self.buf, false) {
                send_wg(&mut self.transmits, &mut self.stats, &mut self.spare, peer, init);
                peer.handshake = Some(HandshakeRetry { started: now, next: now + HANDSHAKE_RETRY, attempts: 1 });
            }
            return;
        }
        let mut datagram = datagram;
        let mut first = true;
        // Data is opened straight into the buffer that goes to the TUN
        // (see `encapsulate`); handshakes use the scratch buffer.
        let mut opened = (message_type == Some(4)).then(|| spare_of_len(&mut self.spare, datagram.len()));
        let opened_at = opened.as_ref().map(|b| b.as_ptr());
        while let Some(tunn) = peer.tunn.as_mut() {
            let out = match opened.as_mut() {
                Some(buffer) if first => buffer.as_mut_slice(),
                _ => self.buf.as_mut_slice(),
            };
            let result = tunn.decapsulate(Some(from.ip()), datagram, out);
            datagram = &[];
            match result {
                boringtun::noise::TunnResult::Done => {
                    if first {
                        authenticated(peer, origin, now, &mut self.events);
                        if message_type == Some(2) {
                            self.stats.handshakes.completed += 1;
                        }
                    }
                    break;
                }
                boringtun::noise::TunnResult::Err(error) => {
                    tracing::trace!(peer = %peer.addr, %from, ?error, "decapsulate failed");
                    if first && matches!(message_type, Some(1) | Some(2)) {
                        self.stats.handshakes.rejected += 1;
                    }
                    self.stats.count_drop(wireguard_drop(&error));
                    break;
                }
                boringtun::noise::TunnResult::WriteToNetwork(out) => {
                    if first {
                        authenticated(peer, origin, now, &mut self.events);
                        if message_type == Some(2) {
                            self.stats.handshakes.completed += 1;
                        }
                    }
                    send_wg(&mut self.transmits, &mut self.stats, &mut self.spare, peer, out);
                }
                boringtun::noise::TunnResult::WriteToTunnelV6(packet, src) => {
                    authenticated(peer, origin, now, &mut self.events);
                    peer.on_data(now, self.config.park_idle_after);
                    self.recent_peer = Some(id);
                    let dst = packet::ipv6_addresses(packet).map(|(_, d)| d);
                    let for_my_group = dst.is_some_and(|d| {
                        meshtun_addr::group_network(d) == Some(self.me.network)
                            && self.config.groups.iter().any(|g| meshtun_addr::group_multicast_addr(self.me.network, g) == d)
                    });
                    if src != peer.ip {
                        // Cryptokey routing: a peer may only send from its own address.
                        tracing::trace!(peer = %peer.addr, %src, "dropping packet with a spoofed source");
                        self.stats.count_drop(DropReason::SpoofedSource);
                    } else if dst != Some(self.my_ip) && !for_my_group {
                        self.stats.count_drop(DropReason::NoRoute);
                    } else if let Some((seq, sent)) = our_ping_reply(packet, &self.pings) {
                        let rtt = now.saturating_duration_since(sent);
                        let path = peer.path.current().map(|p| p.to_string()).unwrap_or_else(|| "none".into());
                        if let Some(p) = self.pings.remove(&seq) {
                            self.answers.push_back(Answer::Pong {
                                token: p.token,
                                from: p.to,
                                hostname: peer.record.hostname.clone(),
                                rtt,
                                path,
                            });
                        }
                        peer.path.on_activity(now);
                    } else if !self.firewall.inbound(peer.addr, &peer.certified_groups, packet, now) {
                        tracing::trace!(peer = %peer.addr, "firewall denied an inbound packet");
                        self.stats.count_drop(DropReason::Firewall);
                    } else {
                        peer.rx_packets += 1;
                        peer.path.on_activity(now);
                        self.stats.rx_packets += 1;
                        self.stats.rx_bytes += packet.len() as u64;
                        let (len, in_place) = (packet.len(), opened_at == Some(packet.as_ptr()));
                        let delivered = if in_place { take_opened(&mut opened, len) } else { copy_into_spare(&mut self.spare, packet) };
                        self.tun_out.push_back(delivered);
                    }
                    break;
                }
                boringtun::noise::TunnResult::WriteToTunnelV4(packet, src) => {
                    authenticated(peer, origin, now, &mut self.events);
                    peer.on_data(now, self.config.park_idle_after);
                    let canonical = meshtun_addr::canonical_ipv4(peer.addr);
                    let dst = ipv4::addresses(packet).map(|(_, d)| d);
                    if src != canonical {
                        // Cryptokey routing for IPv4: only the peer's own address.
                        tracing::debug!(peer = %peer.addr, %src, "dropping IPv4 packet with a spoofed source");
                        self.stats.count_drop(DropReason::SpoofedSource);
                    } else if dst != Some(self.my_ipv4) {
                        self.stats.count_drop(DropReason::NoRoute);
                    } else if !self.firewall.inbound(peer.addr, &peer.certified_groups, packet, now) {
                        self.stats.count_drop(DropReason::Firewall);
                    } else {
                        let alias = self.aliases.alias_for(peer.addr, self.my_ipv4);
                        if alias == canonical || ipv4::rewrite(packet, Some(alias), None) {
                            peer.rx_packets += 1;
                            peer.path.on_activity(now);
                            self.stats.rx_packets += 1;
                            self.stats.rx_bytes += packet.len() as u64;
                            let (len, in_place) = (packet.len(), opened_at == Some(packet.as_ptr()));
                            let delivered = if in_place { take_opened(&mut opened, len) } else { copy_into_spare(&mut self.spare, packet) };
                            self.tun_out.push_back(delivered);
                        } else {
                            self.stats.count_drop(DropReason::Malformed);
                        }
                    }
                    break;
                }
            }
            first = false;
        }
        if let Some(buffer) = opened {
            recycle_into(&mut self.spare, buffer);
        }
    }

    fn run_path_timers(&mut self, now: Instant) {
        let mut refresh = Vec::new();
        let mut park = Vec::new();
        let mut grants = Vec::new();
        for index in self.peers.due_paths(now) {
            // A handshake retry touches the WireGuard session; the rest of
            // the path timers do not.
            let retry_due = self.peers.get(index).and_then(Option::as_ref).and_then(|p| p.handshake).is_some_and(|h| h.next <= now);
            let slot = if retry_due { self.peers.get_mut(index) } else { self.peers.get_mut_for_path(index) };
            let Some(peer) = slot.and_then(Option::as_mut) else { continue };
            if peer.poll_timeout() > now {
                continue;
            }
            if peer.park_at.is_some_and(|t| t <= now) {
                if peer.handshake.is_some() {
                    // Not while a handshake is still being retried.
                    peer.park_at = Some(now + HANDSHAKE_RETRY);
                } else {
                    park.push(peer.id);
                }
            }
            if let Some(mut h) = peer.handshake.filter(|h| h.next <= now) {
                if peer.has_session() || now.saturating_duration_since(h.started) > HANDSHAKE_GIVE_UP {
                    if !peer.has_session() {
                        self.stats.handshakes.timed_out += 1;
                    }
                    peer.handshake = None;
                } else {
                    if let Some(boringtun::noise::TunnResult::WriteToNetwork(out)) =
                        peer.tunn.as_mut().map(|t| t.format_handshake_initiation(&mut self.buf, true))
                    {
                        tracing::debug!(peer = %peer.addr, attempt = h.attempts + 1, "retrying handshake");
                        send_wg(&mut self.transmits, &mut self.stats, &mut self.spare, peer, out);
                    }
                    h.attempts += 1;
                    h.next = now + HANDSHAKE_RETRY * h.attempts.min(5);
                    peer.handshake = Some(h);
                }
            }
            // A configured relay, once registered, is preferred to a
            // backbone's; a lost one gives way to another relay or backbone.
            let preferred = self.backbones.first_registered_relay();
            match peer.path.relay() {
                Some(relay) if preferred.is_some() && Some(relay) != preferred && !self.backbones.is_relay(relay) => {
                    if let Some(to) = preferred {
                        tracing::info!(peer = %peer.addr, from = %relay, %to, "moving to the configured relay");
                        peer.path.replace_relay(to);
                        grants.push((peer.addr, to));
                    }
                }
                Some(relay) if !self.backbones.is_registered(relay) => {
                    if let Some(to) = preferred.or_else(|| self.backbones.registered().into_iter().next()) {
                        tracing::info!(peer = %peer.addr, from = %relay, %to, "relay lost; moving to another");
                        peer.path.replace_relay(to);
                        refresh.push(peer.addr);
                        if self.backbones.is_relay(to) {
                            grants.push((peer.addr, to));
                        }
                    }
                }
                _ => {}
            }
            match peer.path.current() {
                Some(Path::Relay(relay)) => match peer.next_relay_refresh {
                    Some(at) if at <= now => {
                        refresh.push(peer.addr);
                        if self.backbones.is_relay(relay) {
                            grants.push((peer.addr, relay));
                        }
                        peer.next_relay_refresh = Some(now + self.config.heartbeat_interval);
                    }
                    None => peer.next_relay_refresh = Some(now + self.config.heartbeat_interval),
                    Some(_) => {}
                },
                _ => peer.next_relay_refresh = None,
            }
            if peer.path.poll_timeout() > now {
                continue;
            }
            let rng = &mut self.rng;
            let (pings, change) = peer.path.on_timeout(now, || {
                let mut id = [0u8; 12];
                rng.fill_bytes(&mut id);
                id
            });
            for (dst, txid) in pings {
                let probe = Probe { kind: ProbeKind::Ping, sender: self.wg_public.to_bytes(), txid };
                self.transmits.push_back(Transmit { dst, payload: probe::encode(&probe, &peer.probe_key) });
            }
            if let Some(change) = change {
                path_changed(peer, change, &mut self.events);
            }
        }
        for id in park {
            self.park(id);
        }
        self.peers.end_pass();
        // Relayed peers: re-fetch the record now and then. It renews the
        // relay's permission for the pair (a restarted relay has forgotten
        // it), picks up new endpoints, and makes the backbone nudge the
        // peer to probe again.
        for addr in refresh {
            self.start_lookup(Query::Address(addr), now);
        }
        for (addr, relay) in grants {
            self.want_relay_grant(addr, relay, now);
        }
    }

    fn start_lookup(&mut self, query: Query, now: Instant) {
        if self.lookups.contains_key(&query) || self.lookups.len() >= self.config.max_pending_destinations {
            return;
        }
        self.lookups.insert(
            query.clone(),
            PendingLookup::new(query, now),
        );
        self.retry_lookups(now);
    }

    #[inline(never)]
    fn handle_probe(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        let Some(sender) = probe::peek_sender(datagram) else {
            self.drop_packet(DropReason::Malformed);
            return;
        };
        let Some(peer) = self
            .by_wg_key
            .get(&sender)
            .and_then(|id| self.peers.get_mut_for_path(id.index()))
            .and_then(Option::as_mut)
        else {
            tracing::trace!(%from, "probe from an unknown key");
            self.stats.count_drop(DropReason::UnknownPeer);
            return;
        };
        let Some(probe) = probe::decode(datagram, &peer.probe_key) else {
            tracing::debug!(peer = %peer.addr, %from, "probe failed authentication");
            self.stats.count_drop(DropReason::Malformed);
            return;
        };
        let me = self.wg_public.to_bytes();
        match probe.kind {
            ProbeKind::Ping => {
                let pong = Probe { kind: ProbeKind::Pong(from), sender: me, txid: probe.txid };
                self.transmits.push_back(Transmit { dst: from, payload: probe::encode(&pong, &peer.probe_key) });
                let rng = &mut self.rng;
                let triggered = peer.path.on_ping(from, now, || {
                    let mut id = [0u8; 12];
                    rng.fill_bytes(&mut id);
                    id
                });
                if let Some((dst, txid)) = triggered {
                    let ping = Probe { kind: ProbeKind::Ping, sender: me, txid };
                    self.transmits.push_back(Transmit { dst, payload: probe::encode(&ping, &peer.probe_key) });
                }
            }
            ProbeKind::Pong(_observed) => {
                if let Some(change) = peer.path.on_pong(from, probe.txid, now) {
                    path_changed(peer, change, &mut self.events);
                }
            }
        }
    }

    #[inline(never)]
    fn answer_unreachable(&mut self, packet: &[u8]) {
        if let Some(error) = packet::icmpv6_address_unreachable(self.my_ip, packet) {
            self.tun_out.push_back(error);
        }
    }

    fn drop_packet(&mut self, reason: DropReason) {
        self.stats.count_drop(reason);
    }
}

/// If `packet` is an echo reply to one of the engine's own pings:
/// (sequence, when sent).
fn our_ping_reply(packet: &[u8], pings: &HashMap<u16, PendingPing>) -> Option<(u16, Instant)> {
    // Most packets are not: no parse unless a ping of ours is out and the
    // next header is ICMPv6 or an extension header that may lead to it.
    if pings.is_empty() || !matches!(packet.get(6), Some(58 | 0 | 43 | 44 | 60)) {
        return None;
    }
    let sliced = etherparse::SlicedPacket::from_ip(packet).ok()?;
    let Some(etherparse::TransportSlice::Icmpv6(icmp)) = sliced.transport else { return None };
    match icmp.icmp_type() {
        etherparse::Icmpv6Type::EchoReply(echo) if echo.id == PING_IDENT => {
            pings.get(&echo.seq).map(|p| (echo.seq, p.sent))
        }
        _ => None,
    }
}

/// Sends a WireGuard datagram along the peer's current path.
fn send_wg(transmits: &mut VecDeque<Transmit>, stats: &mut Stats, spare: &mut Vec<Vec<u8>>, peer: &Peer, datagram: &[u8]) {
    match peer.path.current() {
        Some(Path::Direct(dst)) => {
            stats.count_tx(PathKind::Direct, datagram.len(), datagram);
            transmits.push_back(Transmit { dst, payload: copy_into_spare(spare, datagram) })
        }
        Some(Path::Relay(relay)) => {
            stats.relayed_tx_packets += 1;
            let payload = meshtun_proto::relay::wrap(peer.addr, datagram);
            stats.count_tx(PathKind::Relay, payload.len(), datagram);
            transmits.push_back(Transmit { dst: relay, payload })
        }
        // No relay and nothing confirmed yet: try every candidate.
        None => {
            for c in peer.path.candidates() {
                stats.count_tx(PathKind::Direct, datagram.len(), datagram);
                transmits.push_back(Transmit { dst: c.endpoint, payload: datagram.to_vec() });
            }
        }
    }
}

/// [`send_wg`] for a datagram already in a buffer of its own.
fn send_wg_owned(transmits: &mut VecDeque<Transmit>, stats: &mut Stats, spare: &mut Vec<Vec<u8>>, peer: &Peer, datagram: Vec<u8>) {
    match peer.path.current() {
        Some(Path::Direct(dst)) => {
            stats.count_tx(PathKind::Direct, datagram.len(), &datagram);
            transmits.push_back(Transmit { dst, payload: datagram })
        }
        _ => {
            send_wg(transmits, stats, spare, peer, &datagram);
            recycle_into(spare, datagram);
        }
    }
}

/// Most buffers [`Node::recycle`] keeps, and the largest it keeps.
const SPARE_BUFFERS: usize = 128;
const SPARE_MAX_CAPACITY: usize = 4096;

/// `bytes` in a recycled buffer if there is one, else a new one.
fn copy_into_spare(spare: &mut Vec<Vec<u8>>, bytes: &[u8]) -> Vec<u8> {
    match spare.pop() {
        Some(mut buffer) => {
            buffer.clear();
            buffer.extend_from_slice(bytes);
            buffer
        }
        None => bytes.to_vec(),
    }
}

/// A recycled buffer (or a new one) `len` bytes long, to be written over.
/// Recycled buffers keep their length, so one of about the same size as
/// last time needs no zeroing.
fn spare_of_len(spare: &mut Vec<Vec<u8>>, len: usize) -> Vec<u8> {
    let mut buffer = spare.pop().unwrap_or_default();
    buffer.resize(len, 0);
    buffer
}

/// The buffer a packet was opened into, cut to the packet. (`opened_at`
/// in `handle_wireguard` says the packet is there; it is set only with
/// `opened`.)
fn take_opened(opened: &mut Option<Vec<u8>>, len: usize) -> Vec<u8> {
    let mut buffer = opened.take().unwrap_or_default();
    buffer.truncate(len);
    buffer
}

fn recycle_into(spare: &mut Vec<Vec<u8>>, buffer: Vec<u8>) {
    if spare.len() < SPARE_BUFFERS && buffer.capacity() <= SPARE_MAX_CAPACITY {
        spare.push(buffer);
    }
}

/// Authenticated WireGuard traffic arrived from the peer.
fn authenticated(peer: &mut Peer, origin: Origin, now: Instant, events: &mut VecDeque<Event>) {
    if let Origin::Direct(from) = origin {
        peer.path.on_direct_rx(from, now);
    }
    if peer.up_since.is_none() {
        peer.up_since = Some(now);
        let path = peer.path.current().map(|p| p.to_string()).unwrap_or_else(|| "none".into());
        tracing::info!(peer = %peer.addr, %path, "peer up");
        events.push_back(Event::PeerUp { peer: peer.addr.to_string(), path });
    }
}

fn path_changed(peer: &Peer, change: PathChange, events: &mut VecDeque<Event>) {
    tracing::info!(peer = %peer.addr, from = ?change.from.map(|p| p.to_string()), to = %change.to, reason = change.reason, "path changed");
    events.push_back(Event::PathChanged {
        peer: peer.addr.to_string(),
        from: change.from.map(|p| p.to_string()),
        to: change.to.to_string(),
        reason: change.reason.to_string(),
    });
}

fn ip_version_is_not_6(packet: &[u8]) -> bool {
    packet::ip_version(packet).is_some_and(|v| v != 6)
}

/// Whether a verified record is an answer to the query that asked for it
/// (a lying backbone could otherwise hand over a valid record of someone else).
fn record_answers(verified: &VerifiedRecord, query: &Query) -> bool {
    record_answers_plain(&verified.record, query)
}

fn record_answers_plain(record: &NodeRecord, query: &Query) -> bool {
    match query {
        Query::Address(addr) => record.mesh_addr() == *addr,
        Query::Hostname { network, name } => {
            record.network == *network && record.hostname.as_deref() == Some(name.as_str())
        }
        Query::WgKey { network, key } => record.network == *network && record.wg_key == *key,
        Query::Capability { network, name } => record.network == *network && record.capabilities.contains(name),
        Query::Group { network, name } => record.network == *network && record.groups.contains(name),
        Query::Ipv4 { network, addr } => {
            record.network == *network && meshtun_addr::canonical_ipv4(record.mesh_addr()).octets() == *addr
        }
    }
}
