//! The backbone core: a directory of signed node records, as a sans-IO
//! state machine.
//!
//! The driver feeds every UDP datagram to [`Directory::handle_datagram`],
//! calls [`Directory::handle_timeout`] when [`Directory::poll_timeout`] says,
//! and sends what [`Directory::poll_transmit`] hands back. One port carries
//! STUN (answered with the sender's reflexive address) and the backbone
//! protocol; anything else is dropped and counted.
//!
//! Registration rules:
//! * the record must verify (signature, address derived from the key);
//! * its sequence number must exceed the stored one for that address (a
//!   replayed or older record loses; an exact duplicate is acknowledged
//!   without refreshing the record, so a replay cannot keep a dead node
//!   alive);
//! * a hostname held by one live identity cannot be taken by another;
//! * a record lives for `record_ttl` after its last registration.
//!
//! Relay: the backbone forwards WireGuard datagrams (opaque to it) between
//! two registered nodes, but only for pairs where one side has looked the
//! other up here (so no node can aim relayed traffic at a node that never
//! asked to talk to it), only to the destination's registered endpoint,
//! never larger than what came in, and within a per-node byte rate.
//!
//! Push: when A looks up B, B is sent A's signed record at once
//! ([`Message::PeerIntent`]) over the path B registers on, so both start
//! probing each other at the same moment.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshtun_addr::{MeshAddr, NetworkId};
use meshtun_nat::{classify, DatagramKind};
use meshtun_proto::message::Deregistration;
use meshtun_proto::{relay, Message, Query, RecordError, RejectCode, SignedRecord, VerifiedRecord};

/// Tunables of a directory.
#[derive(Clone, Debug)]
pub struct DirectoryConfig {
    /// How long a record lives without a heartbeat.
    pub record_ttl: Duration,
    /// Most records returned by one lookup.
    pub max_lookup_results: usize,
    /// Relayed bytes per second allowed per source node (token bucket).
    pub relay_rate_bytes: u64,
    /// Token bucket depth for relaying.
    pub relay_burst_bytes: u64,
    /// How long a lookup permits relaying between the two nodes (refreshed
    /// by relayed traffic).
    pub relay_permission_ttl: Duration,
    /// Private networks this backbone serves, with their owner keys.
    /// Registrations for any other network but 0 are refused.
    pub network_owners: HashMap<NetworkId, [u8; 32]>,
    /// Registrations accepted per second from one source address (token
    /// bucket; heartbeats need far less).
    pub registrations_per_source: f64,
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        DirectoryConfig {
            record_ttl: Duration::from_secs(75),
            max_lookup_results: 20,
            relay_rate_bytes: 4 << 20,
            relay_burst_bytes: 1 << 20,
            relay_permission_ttl: Duration::from_secs(600),
            network_owners: HashMap::new(),
            registrations_per_source: 20.0,
        }
    }
}

/// A datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Which of the backbone's sockets to send from (see
    /// [`Directory::handle_datagram_on`]): a node behind a NAT only hears
    /// from the address it talks to.
    pub local: usize,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// One stored record.
#[derive(Clone, Debug)]
pub struct Entry {
    pub record: VerifiedRecord,
    /// Source address of the latest accepted registration.
    pub observed: SocketAddr,
    /// The backbone socket it arrived on.
    pub local: usize,
    pub registered_at: Instant,
    pub expires_at: Instant,
}

/// Counters, for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectoryStats {
    pub registrations: u64,
    pub registrations_rejected: u64,
    pub deregistrations: u64,
    pub expirations: u64,
    pub lookups: u64,
    pub lookups_rejected: u64,
    pub stun_requests: u64,
    pub dropped_malformed: u64,
    pub dropped_unknown: u64,
    pub intents_pushed: u64,
    pub relayed_packets: u64,
    pub relayed_bytes: u64,
    /// Relay datagrams refused: unregistered sender or destination, no
    /// permission for the pair, or over the rate limit.
    pub relay_refused: u64,
    pub relay_rate_limited: u64,
    /// Lookups answered, by what was asked.
    pub lookups_by_kind: LookupsByKind,
}

/// Answered lookups by query kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LookupsByKind {
    pub address: u64,
    pub hostname: u64,
    pub wg_key: u64,
    pub capability: u64,
    pub group: u64,
    pub ipv4: u64,
}

impl LookupsByKind {
    fn count(&mut self, query: &Query) {
        let c = match query {
            Query::Address(_) => &mut self.address,
            Query::Hostname { .. } => &mut self.hostname,
            Query::WgKey { .. } => &mut self.wg_key,
            Query::Capability { .. } => &mut self.capability,
            Query::Group { .. } => &mut self.group,
            Query::Ipv4 { .. } => &mut self.ipv4,
        };
        *c += 1;
    }
}

/// Relay traffic between one pair of nodes (both directions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayPair {
    pub packets: u64,
    pub bytes: u64,
    pub last: Instant,
}


/// The directory of live records.
pub struct Directory {
    config: DirectoryConfig,
    records: HashMap<MeshAddr, Entry>,
    hostnames: HashMap<(NetworkId, String), MeshAddr>,
    wg_keys: HashMap<(NetworkId, [u8; 32]), MeshAddr>,
    capabilities: HashMap<(NetworkId, String), HashSet<MeshAddr>>,
    groups: HashMap<(NetworkId, String), HashSet<MeshAddr>>,
    ipv4s: HashMap<(NetworkId, [u8; 4]), HashSet<MeshAddr>>,
    /// Expiry order; entries may be stale (checked against `records`).
    expiry: BTreeSet<(Instant, MeshAddr)>,
    /// Which registered node sends from which source address.
    by_observed: HashMap<SocketAddr, MeshAddr>,
    /// Pairs allowed to relay to each other, until when (both directions).
    relay_permissions: HashMap<(MeshAddr, MeshAddr), Instant>,
    /// Token bucket per relaying node: (tokens, last refill).
    relay_buckets: HashMap<MeshAddr, (f64, Instant)>,
    /// Relay traffic per pair (for the mesh picture).
    relay_traffic: HashMap<(MeshAddr, MeshAddr), RelayPair>,
    /// Socket of the datagram being handled.
    local: usize,
    /// Wall-clock time (unix seconds), for certificate and key expiry.
    unix_now: u64,
    revocations: HashMap<NetworkId, (meshtun_proto::cert::Revocations, meshtun_proto::cert::SignedRevocations)>,
    /// Registration token bucket per source IP: (tokens, last refill).
    register_buckets: HashMap<std::net::IpAddr, (f64, Instant)>,
    transmits: VecDeque<Transmit>,
    stats: DirectoryStats,
}

impl Directory {
    pub fn new(config: DirectoryConfig) -> Directory {
        Directory {
            config,
            records: HashMap::new(),
            hostnames: HashMap::new(),
            wg_keys: HashMap::new(),
            capabilities: HashMap::new(),
            groups: HashMap::new(),
            ipv4s: HashMap::new(),
            expiry: BTreeSet::new(),
            by_observed: HashMap::new(),
            relay_permissions: HashMap::new(),
            relay_buckets: HashMap::new(),
            relay_traffic: HashMap::new(),
            local: 0,
            unix_now: 0,
            revocations: HashMap::new(),
            register_buckets: HashMap::new(),
            transmits: VecDeque::new(),
            stats: DirectoryStats::default(),
        }
    }

    pub fn handle_datagram(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        self.handle_datagram_on(0, from, datagram, now);
    }

    /// A datagram that arrived on the backbone's socket number `local` (a
    /// backbone may listen on several addresses or ports, RFC 5780 style,
    /// so clients can tell how their NAT maps).
    pub fn handle_datagram_on(&mut self, local: usize, from: SocketAddr, datagram: &[u8], now: Instant) {
        self.local = local;
        self.expire(now);
        match classify(datagram) {
            DatagramKind::Stun => match meshtun_nat::binding_response(datagram, from) {
                Ok(payload) => {
                    self.stats.stun_requests += 1;
                    self.transmits.push_back(Transmit { local, dst: from, payload });
                }
                Err(_) => self.stats.dropped_malformed += 1,
            },
            DatagramKind::Backbone => match Message::decode(datagram) {
                Ok(message) => self.handle_message(from, message, now),
                Err(error) => {
                    tracing::trace!(%from, %error, "dropping malformed backbone datagram");
                    self.stats.dropped_malformed += 1;
                }
            },
            DatagramKind::Relay => self.handle_relay(from, datagram, now),
            DatagramKind::WireGuard | DatagramKind::Probe | DatagramKind::Unknown => {
                self.stats.dropped_unknown += 1
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.expire(now);
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When the next record expires.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.expiry.iter().next().map(|(at, _)| *at)
    }

    pub fn records(&self) -> impl Iterator<Item = &Entry> {
        self.records.values()
    }

    pub fn get(&self, addr: &MeshAddr) -> Option<&Entry> {
        self.records.get(addr)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn stats(&self) -> &DirectoryStats {
        &self.stats
    }

    /// Pairs this backbone introduced (one looked the other up) whose
    /// relay permission is still valid at `now`.
    pub fn introduced_pairs(&self, now: Instant) -> impl Iterator<Item = (MeshAddr, MeshAddr)> + '_ {
        self.relay_permissions.iter().filter(move |(_, until)| **until > now).map(|(pair, _)| *pair)
    }

    /// Pairs that have relayed traffic through this backbone.
    pub fn relay_pairs(&self) -> impl Iterator<Item = ((MeshAddr, MeshAddr), RelayPair)> + '_ {
        self.relay_traffic.iter().map(|(pair, t)| (*pair, *t))
    }

    pub fn config(&self) -> &DirectoryConfig {
        &self.config
    }

    fn handle_message(&mut self, from: SocketAddr, message: Message, now: Instant) {
        match message {
            Message::Register { request_id, record } => {
                let reply = match self.register(from, &record, now) {
                    Ok(()) => Message::RegisterAck {
                        request_id,
                        observed: from,
                        ttl_secs: self.config.record_ttl.as_secs().min(u32::MAX as u64) as u32,
                    },
                    Err((code, detail)) => {
                        self.stats.registrations_rejected += 1;
                        tracing::debug!(%from, code = code.as_str(), %detail, "registration refused");
                        Message::Reject { request_id, code, detail }
                    }
                };
                let accepted = matches!(reply, Message::RegisterAck { .. });
                self.send(from, &reply);
                if accepted {
                    if let Some(network) = record.verify().ok().map(|v| v.record.network) {
                        if let Some((_, list)) = self.revocations.get(&network) {
                            let list = list.clone();
                            self.send(from, &Message::Revocations { list });
                        }
                    }
                }
            }
            Message::Deregister { request_id, deregistration } => {
                let reply = match self.deregister(&deregistration) {
                    Ok(()) => Message::DeregisterAck { request_id },
                    Err((code, detail)) => Message::Reject { request_id, code, detail },
                };
                self.send(from, &reply);
            }
            Message::Lookup { request_id, from: asker, query } => {
                // A node may only ask about its own network: members of a
                // private network are invisible to everyone else.
                let same_network = query_network(&query) == asker.network;
                let reply = match self.records.get(&asker) {
                    Some(entry) if entry.observed == from && same_network => {
                        self.stats.lookups += 1;
                        self.stats.lookups_by_kind.count(&query);
                        let asker_record = entry.record.signed.clone();
                let found: Vec<SignedRecord> = self
                            .lookup(&query)
                            .into_iter()
                            .filter(|r| r.verify().is_ok_and(|v| self.authorize(&v.record).is_ok()))
                            .collect();
                        self.after_lookup(asker, asker_record, &query, &found, now);
                        Message::LookupReply { request_id, records: found }
                    }
                    _ => {
                        self.stats.lookups_rejected += 1;
                        Message::Reject {
                            request_id,
                            code: RejectCode::NotRegistered,
                            detail: String::new(),
                        }
                    }
                };
                self.send(from, &reply);
            }
            // Replies are for nodes; a backbone ignores them.
            Message::RegisterAck { .. }
            | Message::DeregisterAck { .. }
            | Message::LookupReply { .. }
            | Message::Reject { .. }
            | Message::PeerIntent { .. }
            | Message::Revocations { .. } => self.stats.dropped_unknown += 1,
        }
    }

    /// Wall-clock time, for certificate and key expiry (the driver sets it).
    pub fn set_unix_time(&mut self, unix_secs: u64) {
        self.unix_now = unix_secs;
    }

    /// Installs an owner-signed revocation list for a private network this
    /// backbone serves; members it revokes are dropped at once and the list
    /// goes to every member with its next registration answer.
    pub fn set_revocations(&mut self, network: NetworkId, list: meshtun_proto::cert::SignedRevocations) -> Result<usize, String> {
        let owner = self.config.network_owners.get(&network).ok_or_else(|| format!("network {} is not served here", network.0))?;
        let revocations = list.verify(owner, network).map_err(|e| e.to_string())?;
        if let Some((current, _)) = self.revocations.get(&network) {
            if current.seq >= revocations.seq {
                return Err(format!("revocation list {} is not newer than {}", revocations.seq, current.seq));
            }
        }
        self.revocations.insert(network, (revocations, list));
        let unauthorized: Vec<MeshAddr> = self
            .records
            .values()
            .filter(|e| e.record.record.network == network)
            .filter(|e| self.authorize(&e.record.record).is_err())
            .map(|e| e.record.record.mesh_addr())
            .collect();
        for addr in &unauthorized {
            self.remove(addr);
        }
        Ok(unauthorized.len())
    }

    /// Private-network and key-expiry rules for a verified record.
    fn authorize(&self, record: &meshtun_proto::NodeRecord) -> Result<(), (RejectCode, String)> {
        if self.unix_now > 0 && record.wg_key_expires_unix < self.unix_now {
            return Err((RejectCode::KeyExpired, "the WireGuard key's certification has expired".into()));
        }
        if record.network == NetworkId::PUBLIC {
            return Ok(());
        }
        let Some(owner) = self.config.network_owners.get(&record.network) else {
            return Err((RejectCode::Unauthorized, format!("network {} is not served by this backbone", record.network.0)));
        };
        let Some(cert) = &record.cert else {
            return Err((RejectCode::Unauthorized, "private network: a membership certificate is required".into()));
        };
        let revoked = self.revocations.get(&record.network).map(|(r, _)| r);
        cert.verify(owner, record.network, record.node, self.unix_now, revoked)
            .map(|_| ())
            .map_err(|e| (RejectCode::Unauthorized, e.to_string()))
    }

    fn rate_limit_registration(&mut self, from: SocketAddr, now: Instant) -> bool {
        let rate = self.config.registrations_per_source;
        let bucket = self.register_buckets.entry(from.ip()).or_insert((rate * 2.0, now));
        bucket.0 = (bucket.0 + now.saturating_duration_since(bucket.1).as_secs_f64() * rate).min(rate * 2.0);
        bucket.1 = now;
        if bucket.0 < 1.0 {
            return false;
        }
        bucket.0 -= 1.0;
        if self.register_buckets.len() > 100_000 {
            self.register_buckets.retain(|_, b| now.saturating_duration_since(b.1) < Duration::from_secs(10));
        }
        true
    }

    fn register(
        &mut self,
        from: SocketAddr,
        signed: &SignedRecord,
        now: Instant,
    ) -> Result<(), (RejectCode, String)> {
        if !self.rate_limit_registration(from, now) {
            return Err((RejectCode::RateLimited, "too many registrations from this address".into()));
        }
        let verified = signed.verify().map_err(|e| {
            let code = match e {
                RecordError::BadSignature | RecordError::WrongIdentity => RejectCode::BadSignature,
                RecordError::AddressNotDerived { .. } | RecordError::ReservedAddress(_) => {
                    RejectCode::AddressNotDerived
                }
                RecordError::Malformed(_) => RejectCode::Malformed,
            };
            (code, e.to_string())
        })?;
        let record = &verified.record;
        let addr = record.mesh_addr();
        if let Err(refusal) = self.authorize(record) {
            // Signed by the node itself: it is no longer allowed in, so its
            // current record goes too.
            if self.records.get(&addr).is_some_and(|e| e.record.record.identity_key == record.identity_key) {
                self.remove(&addr);
            }
            return Err(refusal);
        }
        if let Some(existing) = self.records.get(&addr) {
            if existing.record.signed == *signed {
                return Ok(()); // a retransmission: acknowledge, refresh nothing
            }
            if record.seq <= existing.record.record.seq {
                return Err((
                    RejectCode::StaleSequence,
                    format!(
                        "sequence {} is not newer than the stored {}",
                        record.seq, existing.record.record.seq
                    ),
                ));
            }
        }
        if let Some(name) = &record.hostname {
            if let Some(holder) = self.hostnames.get(&(record.network, name.clone())) {
                if *holder != addr {
                    return Err((
                        RejectCode::HostnameTaken,
                        format!("hostname {name:?} is held by {holder}"),
                    ));
                }
            }
        }
        self.remove(&addr);
        if let Some(name) = &record.hostname {
            self.hostnames.insert((record.network, name.clone()), addr);
        }
        self.by_observed.insert(from, addr);
        self.wg_keys.insert((record.network, record.wg_key), addr);
        for cap in &record.capabilities {
            self.capabilities.entry((record.network, cap.clone())).or_default().insert(addr);
        }
        for group in &record.groups {
            self.groups.entry((record.network, group.clone())).or_default().insert(addr);
        }
        self.ipv4s.entry((record.network, meshtun_addr::canonical_ipv4(addr).octets())).or_default().insert(addr);
        let expires_at = now + self.config.record_ttl;
        self.expiry.insert((expires_at, addr));
        self.records.insert(
            addr,
            Entry { record: verified, observed: from, local: self.local, registered_at: now, expires_at },
        );
        self.stats.registrations += 1;
        Ok(())
    }

    fn deregister(&mut self, d: &Deregistration) -> Result<(), (RejectCode, String)> {
        let Some(entry) = self.records.get(&d.addr) else {
            return Err((RejectCode::UnknownNode, format!("{} is not registered", d.addr)));
        };
        if !d.verify(&entry.record.record.identity_key) {
            return Err((RejectCode::BadSignature, "deregistration signature invalid".into()));
        }
        if d.seq <= entry.record.record.seq {
            return Err((RejectCode::StaleSequence, "deregistration is older than the record".into()));
        }
        self.remove(&d.addr);
        self.stats.deregistrations += 1;
        Ok(())
    }

    fn lookup(&self, query: &Query) -> Vec<SignedRecord> {
        let set = match query {
            Query::Capability { network, name } => self.capabilities.get(&(*network, name.clone())),
            Query::Group { network, name } => self.groups.get(&(*network, name.clone())),
            Query::Ipv4 { network, addr } => self.ipv4s.get(&(*network, *addr)),
            _ => None,
        };
        if query.is_set() {
            let mut addrs: Vec<&MeshAddr> = set.map(|s| s.iter().collect()).unwrap_or_default();
            addrs.sort();
            return addrs
                .into_iter()
                .filter_map(|a| self.records.get(a))
                .map(|e| e.record.signed.clone())
                .take(self.config.max_lookup_results)
                .collect();
        }
        let found = match query {
            Query::Address(addr) => Some(*addr),
            Query::Hostname { network, name } => {
                self.hostnames.get(&(*network, name.clone())).copied()
            }
            Query::WgKey { network, key } => self.wg_keys.get(&(*network, *key)).copied(),
            Query::Capability { .. } | Query::Group { .. } | Query::Ipv4 { .. } => None,
        };
        found
            .and_then(|addr| self.records.get(&addr))
            .map(|entry| entry.record.signed.clone())
            .into_iter()
            .take(self.config.max_lookup_results)
            .collect()
    }

    fn remove(&mut self, addr: &MeshAddr) {
        let Some(entry) = self.records.remove(addr) else { return };
        let record = &entry.record.record;
        self.expiry.remove(&(entry.expires_at, *addr));
        if let Some(name) = &record.hostname {
            let key = (record.network, name.clone());
            if self.hostnames.get(&key) == Some(addr) {
                self.hostnames.remove(&key);
            }
        }
        let key = (record.network, record.wg_key);
        if self.wg_keys.get(&key) == Some(addr) {
            self.wg_keys.remove(&key);
        }
        for (index, tags) in [(&mut self.capabilities, &record.capabilities), (&mut self.groups, &record.groups)] {
            for tag in tags {
                let key = (record.network, tag.clone());
                if let Some(set) = index.get_mut(&key) {
                    set.remove(addr);
                    if set.is_empty() {
                        index.remove(&key);
                    }
                }
            }
        }
        let v4 = (record.network, meshtun_addr::canonical_ipv4(*addr).octets());
        if let Some(set) = self.ipv4s.get_mut(&v4) {
            set.remove(addr);
            if set.is_empty() {
                self.ipv4s.remove(&v4);
            }
        }
        if self.by_observed.get(&entry.observed) == Some(addr) {
            self.by_observed.remove(&entry.observed);
        }
        self.relay_buckets.remove(addr);
    }

    /// A successful lookup permits relaying between the two nodes and
    /// tells the node that was found who is coming.
    fn after_lookup(&mut self, asker: MeshAddr, asker_record: SignedRecord, query: &Query, found: &[SignedRecord], now: Instant) {
        if query.is_set() {
            return; // discovery, not an intent to connect
        }
        let Some(target) = found.first().and_then(|r| r.verify().ok()) else { return };
        let target_addr = target.record.mesh_addr();
        if target_addr == asker {
            return;
        }
        let until = now + self.config.relay_permission_ttl;
        self.relay_permissions.insert(ordered(asker, target_addr), until);
        // Key lookups come from the side that was already contacted; no push.
        if matches!(query, Query::WgKey { .. }) {
            return;
        }
        if let Some(entry) = self.records.get(&target_addr) {
            let (dst, local) = (entry.observed, entry.local);
            self.stats.intents_pushed += 1;
            let payload = Message::PeerIntent { record: asker_record }.encode();
            self.transmits.push_back(Transmit { local, dst, payload });
        }
    }

    fn handle_relay(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) {
        let Some((dst, payload)) = relay::unwrap(datagram) else {
            self.stats.dropped_malformed += 1;
            return;
        };
        let Some(&src) = self.by_observed.get(&from) else {
            tracing::trace!(%from, "relay from an unregistered source");
            self.stats.relay_refused += 1;
            return;
        };
        let permitted = self.relay_permissions.get(&ordered(src, dst)).is_some_and(|until| *until > now);
        let Some(dst_entry) = self.records.get(&dst) else {
            self.stats.relay_refused += 1;
            return;
        };
        if !permitted {
            tracing::trace!(%src, %dst, "relay between nodes that never looked each other up");
            self.stats.relay_refused += 1;
            return;
        }
        let (dst_endpoint, dst_local) = (dst_entry.observed, dst_entry.local);
        let (rate, burst) = (self.config.relay_rate_bytes as f64, self.config.relay_burst_bytes as f64);
        let bucket = self.relay_buckets.entry(src).or_insert((burst, now));
        bucket.0 = (bucket.0 + now.saturating_duration_since(bucket.1).as_secs_f64() * rate).min(burst);
        bucket.1 = now;
        let cost = datagram.len() as f64;
        if bucket.0 < cost {
            self.stats.relay_rate_limited += 1;
            return;
        }
        bucket.0 -= cost;
        self.relay_permissions.insert(ordered(src, dst), now + self.config.relay_permission_ttl);
        self.stats.relayed_packets += 1;
        self.stats.relayed_bytes += payload.len() as u64;
        let pair = self.relay_traffic.entry(ordered(src, dst)).or_insert(RelayPair { packets: 0, bytes: 0, last: now });
        pair.packets += 1;
        pair.bytes += payload.len() as u64;
        pair.last = now;
        self.transmits.push_back(Transmit { local: dst_local, dst: dst_endpoint, payload: relay::wrap(src, payload) });
    }

    fn expire(&mut self, now: Instant) {
        if self.relay_permissions.len() > 4 * self.records.len() + 1024 {
            self.relay_permissions.retain(|_, until| *until > now);
        }
        if self.relay_traffic.len() > 4 * self.records.len() + 1024 {
            let records = &self.records;
            self.relay_traffic.retain(|(a, b), _| records.contains_key(a) && records.contains_key(b));
        }
        while let Some(&(at, addr)) = self.expiry.iter().next() {
            if at > now {
                break;
            }
            self.expiry.remove(&(at, addr));
            if self.records.get(&addr).is_some_and(|e| e.expires_at == at) {
                tracing::debug!(%addr, "record expired");
                self.remove(&addr);
                self.stats.expirations += 1;
            }
        }
    }

    /// A reply, from the socket the request came in on.
    fn send(&mut self, dst: SocketAddr, message: &Message) {
        self.transmits.push_back(Transmit { local: self.local, dst, payload: message.encode() });
    }
}

fn query_network(query: &Query) -> NetworkId {
    match query {
        Query::Address(addr) => addr.network,
        Query::Hostname { network, .. }
        | Query::WgKey { network, .. }
        | Query::Capability { network, .. }
        | Query::Group { network, .. }
        | Query::Ipv4 { network, .. } => *network,
    }
}

fn ordered(a: MeshAddr, b: MeshAddr) -> (MeshAddr, MeshAddr) {
    if a <= b { (a, b) } else { (b, a) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshtun_proto::{Identity, NodeRecord};

    const NODE_A: &str = "198.18.0.2:51820";
    const NODE_B: &str = "198.18.0.3:51820";

    fn sock(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn record(id: &Identity, seq: u64, hostname: Option<&str>) -> SignedRecord {
        let record = NodeRecord {
            network: NetworkId::PUBLIC,
            node: id.node_addr(),
            identity_key: id.public_key(),
            pow_nonce: id.nonce(),
            wg_key: [seq as u8; 32],
            endpoints: vec![],
            hostname: hostname.map(str::to_string),
            capabilities: vec![],
            groups: vec![],
            seq,
            wg_key_version: 1,
            wg_key_expires_unix: meshtun_proto::record::NO_EXPIRY,
            cert: None,
        };
        SignedRecord::sign(id, &record).unwrap()
    }

    /// Sends `message` and returns the reply to the sender; anything sent
    /// elsewhere (pushes) is discarded.
    fn exchange(dir: &mut Directory, from: &str, message: Message, now: Instant) -> Message {
        dir.handle_datagram(sock(from), &message.encode(), now);
        let mut reply = None;
        while let Some(t) = dir.poll_transmit() {
            if t.dst == sock(from) {
                assert!(reply.is_none(), "one reply only");
                reply = Some(Message::decode(&t.payload).unwrap());
            }
        }
        reply.expect("a reply")
    }

    fn register(dir: &mut Directory, from: &str, signed: SignedRecord, now: Instant) -> Message {
        exchange(dir, from, Message::Register { request_id: 1, record: signed }, now)
    }

    fn identities() -> (Identity, Identity) {
        (Identity::generate([1; 32]), Identity::generate([2; 32]))
    }

    #[test]
    fn valid_registration_is_acknowledged_with_the_observed_endpoint() {
        let (a, _) = identities();
        let mut dir = Directory::new(DirectoryConfig::default());
        let now = Instant::now();
        let reply = register(&mut dir, NODE_A, record(&a, 1, Some("alpha")), now);
        assert_eq!(reply, Message::RegisterAck { request_id: 1, observed: sock(NODE_A), ttl_secs: 75 });
        assert_eq!(dir.len(), 1);
    }

    #[test]
    fn registration_with_a_bad_signature_is_rejected() {
        let (a, _) = identities();
        let mut dir = Directory::new(DirectoryConfig::default());
        let mut signed = record(&a, 1, None);
        signed.signature[0] ^= 1;
        let reply = register(&mut dir, NODE_A, signed, Instant::now());
        assert!(matches!(reply, Message::Reject { code: RejectCode::BadSignature, .. }));
        assert!(dir.is_empty());
    }

    #[test]
    fn registration_for_an_address_not_derived_from_the_key_is_rejected() {
        let (a, b) = identities();
        // B's record body with A's node address, signed by B.
        let mut body: NodeRecord = postcard_body(&record(&b, 1, None));
        body.node = a.node_addr();
        let forged = SignedRecord {
            body: postcard_encode(&body),
            signature: b.sign(&[b"meshtun record v1\0".as_slice(), &postcard_encode(&body)].concat()).to_vec(),
        };
        let mut dir = Directory::new(DirectoryConfig::default());
        let reply = register(&mut dir, NODE_B, forged, Instant::now());
        assert!(matches!(reply, Message::Reject { code: RejectCode::AddressNotDerived, .. }));
    }

    #[test]
    fn replayed_or_older_sequence_loses_and_does_not_refresh() {
        let (a, _) = identities();
        let mut dir = Directory::new(DirectoryConfig::default());
        let t0 = Instant::now();
        let old = record(&a, 5, None);
        register(&mut dir, NODE_A, old.clone(), t0);
        let newer = record(&a, 6, None);
        register(&mut dir, NODE_A, newer.clone(), t0 + Duration::from_secs(1));
        let reply = register(&mut dir, NODE_A, old, t0 + Duration::from_secs(2));
        assert!(matches!(reply, Message::Reject { code: RejectCode::StaleSequence, .. }));
        // An exact replay of the current record is acknowledged but does not extend its life.
        let expiry = dir.get(&a.mesh_addr(NetworkId::PUBLIC)).unwrap().expires_at;
        let reply = register(&mut dir, NODE_A, newer, t0 + Duration::from_secs(30));
        assert!(matches!(reply, Message::RegisterAck { .. }));
        assert_eq!(dir.get(&a.mesh_addr(NetworkId::PUBLIC)).unwrap().expires_at, expiry);
    }

    #[test]
    fn a_live_hostname_cannot_be_taken_by_another_identity() {
        let (a, b) = identities();
        let mut dir = Directory::new(DirectoryConfig::default());
        let t0 = Instant::now();
        register(&mut dir, NODE_A, record(&a, 1, Some("papers")), t0);
        let reply = register(&mut dir, NODE_B, record(&b, 1, Some("papers")), t0);
        assert!(matches!(reply, Message::Reject { code: RejectCode::HostnameTaken, .. }));
        // Once A's record expires, the name is free.
        let later = t0 + DirectoryConfig::default().record_ttl + Duration::from_secs(1);
        dir.handle_timeout(later);
        assert!(dir.is_empty());
        let reply = register(&mut dir, NODE_B, record(&b, 2, Some("papers")), later);
        assert!(matches!(reply, Message::RegisterAck { .. }));
    }

    #[test]
    fn lookups_find_records_by_address_hostname_and_wireguard_key() {
        let (a, b) = identities();
        let mut dir = Directory::new(DirectoryConfig::default());
        let now = Instant::now();
        register(&mut dir, NODE_A, record(&a, 1, Some("alpha")), now);
        let b_record = record(&b, 3, Some("beta"));
        register(&mut dir, NODE_B, b_record.clone(), now);
        let from = a.mesh_addr(NetworkId::PUBLIC);
        for query in [
            Query::Address(b.mesh_addr(NetworkId::PUBLIC)),
            Query::Hostname { network: NetworkId::PUBLIC, name: "beta".into() },
            Query::WgKey { network: NetworkId::PUBLIC, key: [3; 32] },
        ] {
            let reply = exchange(&mut dir, NODE_A, Message::Lookup { request_id: 4, from, query }, now);
            assert_eq!(reply, Message::LookupReply { request_id: 4, records: vec![b_record.clone()] });
        }
        let reply = exchange(
            &mut dir,
            NODE_A,
            Message::Lookup {
                request_id: 5,
                from,
                query: Query::Hostname { network: NetworkId::PUBLIC, name: "nobody".into() },
            },
            now,
        );
        assert_eq!(reply, Message::LookupReply { request_id: 5, records: vec![] });
    }

    #[test]
    fn lookups_from_unregistered_sources_are_refused_to_prevent_reflection() {
        let (a, b) = identities();
        let mut dir = Directory::new(DirectoryConfig::default());
        let now = Instant::now();
        register(&mut dir, NODE_A, record(&a, 1, None), now);
        let lookup = Message::Lookup {
            request_id: 1,
            from: a.mesh_addr(NetworkId::PUBLIC),
            query: Query::Address(b.mesh_addr(NetworkId::PUBLIC)),
        };
        // Same claimed asker, but from a spoofed source address.
        let reply = exchange(&mut dir, "203.0.113.9:999", lookup.clone(), now);
        assert!(matches!(reply, Message::Reject { code: RejectCode::NotRegistered, .. }));
        assert!(lookup.encode().len() >= Message::Reject {
            request_id: 1,
            code: RejectCode::NotRegistered,
            detail: String::new()
        }
        .encode()
        .len());
    }

    #[test]
    fn signed_deregistration_forgets_the_node_and_frees_its_hostname() {
        let (a, b) = identities();
        let mut dir = Directory::new(DirectoryConfig::default());
        let now = Instant::now();
        register(&mut dir, NODE_A, record(&a, 1, Some("alpha")), now);
        let addr = a.mesh_addr(NetworkId::PUBLIC);
        // A forged deregistration (signed by B) is refused.
        let forged = Deregistration::sign(&b, addr, 2);
        let reply = exchange(&mut dir, NODE_B, Message::Deregister { request_id: 1, deregistration: forged }, now);
        assert!(matches!(reply, Message::Reject { code: RejectCode::BadSignature, .. }));
        let real = Deregistration::sign(&a, addr, 2);
        let reply = exchange(&mut dir, NODE_A, Message::Deregister { request_id: 2, deregistration: real }, now);
        assert_eq!(reply, Message::DeregisterAck { request_id: 2 });
        assert!(dir.is_empty());
        let reply = register(&mut dir, NODE_B, record(&b, 1, Some("alpha")), now);
        assert!(matches!(reply, Message::RegisterAck { .. }));
    }

    #[test]
    fn stun_binding_requests_are_answered_with_the_reflexive_address() {
        let mut dir = Directory::new(DirectoryConfig::default());
        let request = meshtun_nat::binding_request([5; 12]);
        dir.handle_datagram(sock(NODE_A), &request, Instant::now());
        let reply = dir.poll_transmit().unwrap();
        assert_eq!(meshtun_nat::parse_binding_response(&reply.payload, &[5; 12]).unwrap(), sock(NODE_A));
    }

    #[test]
    fn garbage_is_dropped_and_counted() {
        let mut dir = Directory::new(DirectoryConfig::default());
        let now = Instant::now();
        for datagram in [&b""[..], b"MT\x01", b"MT\x01\xff\xff\xff", b"\x01\x00\x00\x00", b"hello"] {
            dir.handle_datagram(sock(NODE_A), datagram, now);
        }
        assert!(dir.poll_transmit().is_none());
        let stats = dir.stats();
        assert_eq!(stats.dropped_malformed + stats.dropped_unknown, 5);
    }

    fn relay_to(dir: &mut Directory, from: &str, to: MeshAddr, payload: &[u8], now: Instant) -> Vec<Transmit> {
        dir.handle_datagram(sock(from), &relay::wrap(to, payload), now);
        std::iter::from_fn(|| dir.poll_transmit()).collect()
    }

    fn record_with_tags(id: &Identity, seq: u64, caps: &[&str], groups: &[&str]) -> SignedRecord {
        let mut r = record(id, seq, None).verify().unwrap().record;
        r.capabilities = caps.iter().map(|s| s.to_string()).collect();
        r.groups = groups.iter().map(|s| s.to_string()).collect();
        SignedRecord::sign(id, &r).unwrap()
    }

    #[test]
    fn capability_and_group_queries_return_every_live_holder_and_forget_changed_tags() {
        let (a, b) = identities();
        let mut dir = Directory::new(DirectoryConfig::default());
        let now = Instant::now();
        register(&mut dir, NODE_A, record_with_tags(&a, 1, &["citations"], &["research"]), now);
        let b1 = record_with_tags(&b, 1, &["citations", "fx"], &["research"]);
        register(&mut dir, NODE_B, b1, now);
        let from = a.mesh_addr(NetworkId::PUBLIC);
        let ask = |dir: &mut Directory, query: Query| match exchange(dir, NODE_A, Message::Lookup { request_id: 1, from, query }, now) {
            Message::LookupReply { records, .. } => {
                let mut addrs: Vec<_> = records.iter().map(|r| r.verify().unwrap().record.mesh_addr()).collect();
                addrs.sort();
                addrs
            }
            other => panic!("{other:?}"),
        };
        let mut both = vec![from, b.mesh_addr(NetworkId::PUBLIC)];
        both.sort();
        assert_eq!(ask(&mut dir, Query::Capability { network: NetworkId::PUBLIC, name: "citations".into() }), both);
        assert_eq!(ask(&mut dir, Query::Group { network: NetworkId::PUBLIC, name: "research".into() }), both);
        assert_eq!(ask(&mut dir, Query::Capability { network: NetworkId::PUBLIC, name: "fx".into() }), vec![b.mesh_addr(NetworkId::PUBLIC)]);
        // B drops the fx capability: the index follows at once.
        register(&mut dir, NODE_B, record_with_tags(&b, 2, &["citations"], &[]), now);
        assert!(ask(&mut dir, Query::Capability { network: NetworkId::PUBLIC, name: "fx".into() }).is_empty());
        assert_eq!(ask(&mut dir, Query::Group { network: NetworkId::PUBLIC, name: "research".into() }), vec![from]);
    }

    #[test]
    fn a_lookup_pushes_the_askers_record_to_the_node_it_found() {
        let (a, b) = identities();
        let mut dir = Directory::new(DirectoryConfig::default());
        let now = Instant::now();
        let a_record = record(&a, 1, None);
        register(&mut dir, NODE_A, a_record.clone(), now);
        register(&mut dir, NODE_B, record(&b, 1, None), now);
        let lookup = Message::Lookup {
            request_id: 1,
            from: a.mesh_addr(NetworkId::PUBLIC),
            query: Query::Address(b.mesh_addr(NetworkId::PUBLIC)),
        };
        dir.handle_datagram(sock(NODE_A), &lookup.encode(), now);
        let sent: Vec<_> = std::iter::from_fn(|| dir.poll_transmit()).collect();
        let push = sent.iter().find(|t| t.dst == sock(NODE_B)).expect("B is told");
        assert_eq!(Message::decode(&push.payload).unwrap(), Message::PeerIntent { record: a_record });
    }

    #[test]
    fn relay_forwards_only_between_nodes_that_looked_each_other_up() {
        let (a, b) = identities();
        let mut dir = Directory::new(DirectoryConfig::default());
        let now = Instant::now();
        register(&mut dir, NODE_A, record(&a, 1, None), now);
        register(&mut dir, NODE_B, record(&b, 1, None), now);
        let (a_addr, b_addr) = (a.mesh_addr(NetworkId::PUBLIC), b.mesh_addr(NetworkId::PUBLIC));
        assert!(relay_to(&mut dir, NODE_A, b_addr, b"wg", now).is_empty(), "no lookup, no relay");
        assert_eq!(dir.stats().relay_refused, 1);
        exchange(&mut dir, NODE_A, Message::Lookup { request_id: 1, from: a_addr, query: Query::Address(b_addr) }, now);
        let out = relay_to(&mut dir, NODE_A, b_addr, b"wg-datagram", now);
        assert_eq!(out, vec![Transmit { local: 0, dst: sock(NODE_B), payload: relay::wrap(a_addr, b"wg-datagram") }]);
        // The reply direction is allowed too, and never bigger than what came in.
        let back = relay_to(&mut dir, NODE_B, a_addr, b"reply", now);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].payload.len(), relay::wrap(b_addr, b"reply").len());
        // An unregistered source cannot use the relay at all.
        assert!(relay_to(&mut dir, "203.0.113.7:1", b_addr, b"x", now).is_empty());
    }

    #[test]
    fn relay_enforces_the_per_node_rate_limit() {
        let (a, b) = identities();
        let config = DirectoryConfig { relay_rate_bytes: 1000, relay_burst_bytes: 3000, ..DirectoryConfig::default() };
        let mut dir = Directory::new(config);
        let now = Instant::now();
        register(&mut dir, NODE_A, record(&a, 1, None), now);
        register(&mut dir, NODE_B, record(&b, 1, None), now);
        let (a_addr, b_addr) = (a.mesh_addr(NetworkId::PUBLIC), b.mesh_addr(NetworkId::PUBLIC));
        exchange(&mut dir, NODE_A, Message::Lookup { request_id: 1, from: a_addr, query: Query::Address(b_addr) }, now);
        let payload = [0u8; 989]; // 1000 bytes with the relay header
        let forwarded = (0..5).filter(|_| !relay_to(&mut dir, NODE_A, b_addr, &payload, now).is_empty()).count();
        assert_eq!(forwarded, 3, "burst of 3000 bytes");
        assert_eq!(dir.stats().relay_rate_limited, 2);
        // One second later, one more datagram's worth of tokens.
        let later = now + Duration::from_secs(1);
        assert_eq!(relay_to(&mut dir, NODE_A, b_addr, &payload, later).len(), 1);
        assert!(relay_to(&mut dir, NODE_A, b_addr, &payload, later).is_empty());
    }

    fn private_record(id: &Identity, seq: u64, cert: Option<meshtun_proto::cert::SignedCert>) -> SignedRecord {
        let mut r = record(id, seq, None).verify().unwrap().record;
        r.network = NetworkId(7);
        r.cert = cert;
        SignedRecord::sign(id, &r).unwrap()
    }

    fn private_directory() -> (Directory, meshtun_proto::cert::NetworkOwner) {
        let owner = meshtun_proto::cert::NetworkOwner::generate(NetworkId(7), [9; 32]);
        let mut config = DirectoryConfig::default();
        config.network_owners.insert(NetworkId(7), owner.public_key());
        let mut dir = Directory::new(config);
        dir.set_unix_time(1_000);
        (dir, owner)
    }

    #[test]
    fn private_networks_admit_only_certified_members() {
        let (a, b) = identities();
        let (mut dir, owner) = private_directory();
        let now = Instant::now();
        let reply = register(&mut dir, NODE_A, private_record(&a, 1, None), now);
        assert!(matches!(reply, Message::Reject { code: RejectCode::Unauthorized, .. }), "{reply:?}");
        let stranger = meshtun_proto::cert::NetworkOwner::generate(NetworkId(7), [8; 32]);
        let forged = stranger.sign_membership(a.node_addr(), vec![], 2_000, 1);
        let reply = register(&mut dir, NODE_A, private_record(&a, 2, Some(forged)), now);
        assert!(matches!(reply, Message::Reject { code: RejectCode::Unauthorized, .. }));
        // B's certificate presented by A does not work either.
        let bs = owner.sign_membership(b.node_addr(), vec![], 2_000, 2);
        let reply = register(&mut dir, NODE_A, private_record(&a, 3, Some(bs)), now);
        assert!(matches!(reply, Message::Reject { code: RejectCode::Unauthorized, .. }));
        let good = owner.sign_membership(a.node_addr(), vec!["research".into()], 2_000, 1);
        let reply = register(&mut dir, NODE_A, private_record(&a, 4, Some(good)), now);
        assert!(matches!(reply, Message::RegisterAck { .. }), "{reply:?}");
    }

    #[test]
    fn outsiders_cannot_look_up_members_of_a_private_network() {
        let (a, b) = identities();
        let (mut dir, owner) = private_directory();
        let now = Instant::now();
        let cert = owner.sign_membership(a.node_addr(), vec![], 2_000, 1);
        register(&mut dir, NODE_A, private_record(&a, 1, Some(cert)), now);
        register(&mut dir, NODE_B, record(&b, 1, None), now); // B is on the public mesh
        let member = MeshAddr::new(NetworkId(7), a.node_addr());
        let reply = exchange(&mut dir, NODE_B, Message::Lookup { request_id: 1, from: b.mesh_addr(NetworkId::PUBLIC), query: Query::Address(member) }, now);
        assert!(matches!(reply, Message::Reject { code: RejectCode::NotRegistered, .. }), "{reply:?}");
    }

    #[test]
    fn an_expired_certificate_is_refused_at_the_next_heartbeat_and_the_record_dropped() {
        let (a, _) = identities();
        let (mut dir, owner) = private_directory();
        let now = Instant::now();
        let cert = owner.sign_membership(a.node_addr(), vec![], 1_500, 1);
        register(&mut dir, NODE_A, private_record(&a, 1, Some(cert.clone())), now);
        assert_eq!(dir.len(), 1);
        dir.set_unix_time(1_501);
        let reply = register(&mut dir, NODE_A, private_record(&a, 2, Some(cert)), now);
        assert!(matches!(reply, Message::Reject { code: RejectCode::Unauthorized, .. }));
        assert!(dir.is_empty());
    }

    #[test]
    fn a_revocation_list_drops_the_member_and_travels_with_registration_answers() {
        let (a, b) = identities();
        let (mut dir, owner) = private_directory();
        let now = Instant::now();
        register(&mut dir, NODE_A, private_record(&a, 1, Some(owner.sign_membership(a.node_addr(), vec![], 2_000, 11))), now);
        register(&mut dir, NODE_B, private_record(&b, 1, Some(owner.sign_membership(b.node_addr(), vec![], 2_000, 12))), now);
        assert_eq!(dir.set_revocations(NetworkId(7), owner.sign_revocations(1, vec![11])), Ok(1));
        assert_eq!(dir.len(), 1);
        // An older list cannot roll the newer one back.
        assert!(dir.set_revocations(NetworkId(7), owner.sign_revocations(1, vec![])).is_err());
        dir.handle_datagram(sock(NODE_B), &Message::Register { request_id: 5, record: private_record(&b, 2, Some(owner.sign_membership(b.node_addr(), vec![], 2_000, 12))) }.encode(), now);
        let sent: Vec<Message> = std::iter::from_fn(|| dir.poll_transmit()).map(|t| Message::decode(&t.payload).unwrap()).collect();
        assert!(matches!(sent[0], Message::RegisterAck { .. }));
        assert!(matches!(sent[1], Message::Revocations { .. }));
    }

    #[test]
    fn registration_floods_from_one_source_are_rate_limited() {
        let (a, _) = identities();
        let mut dir = Directory::new(DirectoryConfig { registrations_per_source: 5.0, ..DirectoryConfig::default() });
        let now = Instant::now();
        let refused = (1..=30)
            .filter(|seq| matches!(register(&mut dir, NODE_A, record(&a, *seq, None), now), Message::Reject { code: RejectCode::RateLimited, .. }))
            .count();
        assert_eq!(refused, 20, "burst of 10 allowed");
    }

    fn postcard_body(signed: &SignedRecord) -> NodeRecord {
        signed.verify().unwrap().record
    }

    fn postcard_encode(record: &NodeRecord) -> Vec<u8> {
        // Records are postcard-encoded; re-encode through the public signing
        // path's format by signing with a throwaway check skipped.
        meshtun_proto::record::encode_body(record)
    }
}
