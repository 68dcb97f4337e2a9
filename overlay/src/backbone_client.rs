//! Registration with the backbones: the signed record, heartbeats, backoff
//! when a backbone is unreachable, and deregistration on shutdown.
//!
//! Standalone relays (`meshtun relay`) are registered with the same way (the
//! signed registration is how a relay authenticates a node and learns its
//! endpoint), but they are kept apart: never asked discovery lookups.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshtun_proto::message::Deregistration;
use meshtun_proto::{Identity, Message, NodeRecord, SignedRecord};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;

use crate::{Event, NodeConfig, Transmit};

/// Where a node stands with one backbone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackboneState {
    /// First registration not yet answered.
    Connecting,
    Registered,
    /// Several registrations unanswered; retrying with backoff.
    Unreachable,
    /// The backbone refused the registration (see `last_error`).
    Rejected,
    Deregistered,
}

/// One backbone as `meshtun status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct BackboneStatus {
    pub address: SocketAddr,
    pub state: BackboneState,
    /// Our address as this backbone sees it (server-reflexive endpoint).
    pub observed: Option<SocketAddr>,
    pub last_ack_secs_ago: Option<f64>,
    pub next_attempt_in_secs: f64,
    pub last_error: Option<String>,
}

struct Backbone {
    addr: SocketAddr,
    /// A standalone relay rather than a directory.
    relay: bool,
    state: BackboneState,
    observed: Option<SocketAddr>,
    last_ack: Option<Instant>,
    /// The outstanding request (id, when sent) if any.
    pending: Option<(u64, Instant)>,
    next_attempt: Instant,
    backoff: Duration,
    failures: u32,
    last_error: Option<String>,
}

impl Backbone {
    fn new(addr: SocketAddr, relay: bool, now: Instant, base: Duration) -> Backbone {
        Backbone {
            addr,
            relay,
            state: BackboneState::Connecting,
            observed: None,
            last_ack: None,
            pending: None,
            next_attempt: now,
            backoff: base,
            failures: 0,
            last_error: None,
        }
    }
}

pub(crate) struct BackboneClient {
    backbones: Vec<Backbone>,
    identity: Identity,
    template: NodeRecord,
    local_endpoints: Vec<SocketAddr>,
    seq: u64,
    heartbeat: Duration,
    request_timeout: Duration,
    max_backoff: Duration,
    rng: ChaCha20Rng,
}

/// Consecutive unanswered registrations before a backbone is called unreachable.
const UNREACHABLE_AFTER: u32 = 3;

impl BackboneClient {
    pub fn new(config: &NodeConfig, identity: Identity, seed: u64, now: Instant) -> BackboneClient {
        BackboneClient {
            identity,
            backbones: config
                .backbones
                .iter()
                .map(|&addr| Backbone::new(addr, false, now, config.request_timeout))
                .chain(
                    config
                        .relays
                        .iter()
                        .filter(|addr| !config.backbones.contains(addr))
                        .map(|&addr| Backbone::new(addr, true, now, config.request_timeout)),
                )
                .collect(),
            template: NodeRecord {
                network: config.network,
                node: meshtun_addr::NodeAddr::UNSPECIFIED,
                identity_key: [0; 32],
                pow_nonce: 0,
                wg_key: [0; 32],
                endpoints: vec![],
                hostname: None,
                capabilities: vec![],
                groups: vec![],
                seq: 0,
                wg_key_version: 1,
                wg_key_expires_unix: meshtun_proto::record::NO_EXPIRY,
                cert: None,
            },
            local_endpoints: config.local_endpoints.clone(),
            seq: config.initial_seq.saturating_sub(1),
            heartbeat: config.heartbeat_interval,
            request_timeout: config.request_timeout,
            max_backoff: config.max_backoff,
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }

    pub fn set_record_template(&mut self, template: NodeRecord, local_endpoints: Vec<SocketAddr>) {
        self.template = template;
        self.local_endpoints = local_endpoints;
        self.template.endpoints = self.endpoints();
    }

    pub fn record(&self) -> &NodeRecord {
        &self.template
    }

    /// A backbone or a relay of ours (a server whose datagrams we accept).
    pub fn is_backbone(&self, addr: SocketAddr) -> bool {
        self.backbones.iter().any(|b| b.addr == addr)
    }

    pub fn is_relay(&self, addr: SocketAddr) -> bool {
        self.backbones.iter().any(|b| b.addr == addr && b.relay)
    }

    pub fn set_backbones(&mut self, addrs: Vec<SocketAddr>, now: Instant) {
        self.backbones.retain(|b| b.relay || addrs.contains(&b.addr));
        for addr in addrs {
            if !self.is_backbone(addr) {
                self.backbones.push(Backbone::new(addr, false, now, self.request_timeout));
            }
        }
    }

    /// Every backbone we are registered with (relays excluded: they are
    /// never asked discovery lookups).
    pub fn registered(&self) -> Vec<SocketAddr> {
        self.backbones.iter().filter(|b| !b.relay && b.state == BackboneState::Registered).map(|b| b.addr).collect()
    }

    /// The first configured relay we are registered with.
    pub fn first_registered_relay(&self) -> Option<SocketAddr> {
        self.backbones.iter().find(|b| b.relay && b.state == BackboneState::Registered).map(|b| b.addr)
    }

    pub fn is_registered(&self, addr: SocketAddr) -> bool {
        self.backbones.iter().any(|b| b.addr == addr && b.state == BackboneState::Registered)
    }

    /// Registers with every backbone at the next opportunity.
    pub fn register_now(&mut self, now: Instant) {
        for b in &mut self.backbones {
            if b.state != BackboneState::Deregistered {
                b.next_attempt = now;
                b.pending = None;
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.backbones
            .iter()
            .filter(|b| b.state != BackboneState::Deregistered)
            .map(|b| b.next_attempt)
            .min()
    }

    pub fn handle_timeout(&mut self, now: Instant, transmits: &mut VecDeque<Transmit>, events: &mut VecDeque<Event>) {
        for i in 0..self.backbones.len() {
            let due = self.backbones.get(i).is_some_and(|b| {
                b.state != BackboneState::Deregistered && b.next_attempt <= now
            });
            if !due {
                continue;
            }
            // An unanswered request counts as a failure.
            if let Some(b) = self.backbones.get_mut(i) {
                if b.pending.take().is_some() {
                    b.failures += 1;
                    if b.failures >= UNREACHABLE_AFTER && b.state != BackboneState::Unreachable && b.state != BackboneState::Rejected {
                        b.state = BackboneState::Unreachable;
                        b.last_error = Some(format!("no answer to {} registrations", b.failures));
                        tracing::warn!(backbone = %b.addr, "backbone unreachable; retrying with backoff");
                        events.push_back(Event::BackboneUnreachable {
                            backbone: b.addr,
                            error: "no answer to registration".into(),
                        });
                    }
                }
            }
            let Some(record) = self.sign_next() else { continue };
            let request_id = self.rng.next_u64();
            let max_backoff = self.max_backoff;
            let request_timeout = self.request_timeout;
            let heartbeat = self.heartbeat;
            let Some(b) = self.backbones.get_mut(i) else { continue };
            b.pending = Some((request_id, now));
            let wait = if b.failures == 0 && b.state == BackboneState::Registered {
                // Healthy heartbeat: retry a lost answer soon, but no faster
                // than the heartbeat itself.
                request_timeout.min(heartbeat)
            } else {
                let wait = b.backoff;
                // Never slower than the heartbeat: a backbone that comes
                // back has every node re-registered within one interval.
                b.backoff = (b.backoff * 2).min(max_backoff).min(heartbeat.max(request_timeout));
                wait
            };
            b.next_attempt = now + wait;
            transmits.push_back(Transmit { dst: b.addr, payload: Message::Register { request_id, record }.encode() });
        }
    }

    /// Handles a reply. Returns true when the record must be re-signed and
    /// re-sent (our observed endpoint changed).
    pub fn handle_message(
        &mut self,
        from: SocketAddr,
        message: Message,
        now: Instant,
        events: &mut VecDeque<Event>,
    ) -> bool {
        let heartbeat = self.heartbeat;
        let base = self.request_timeout;
        let Some(b) = self.backbones.iter_mut().find(|b| b.addr == from) else { return false };
        let matches = |b: &Backbone, id: u64| b.pending.is_some_and(|(p, _)| p == id);
        match message {
            Message::RegisterAck { request_id, observed, .. } if matches(b, request_id) => {
                let first = b.state != BackboneState::Registered;
                let moved = b.observed.is_some_and(|o| o != observed);
                b.state = BackboneState::Registered;
                b.pending = None;
                b.failures = 0;
                b.backoff = base;
                b.last_ack = Some(now);
                b.last_error = None;
                b.observed = Some(observed);
                b.next_attempt = now + heartbeat;
                if first {
                    tracing::info!(backbone = %from, %observed, "registered with backbone");
                    events.push_back(Event::BackboneRegistered { backbone: from, observed });
                }
                let endpoints = self.endpoints();
                if endpoints != self.template.endpoints {
                    self.template.endpoints = endpoints;
                    return true;
                }
                moved
            }
            Message::DeregisterAck { request_id } if matches(b, request_id) => {
                b.pending = None;
                b.state = BackboneState::Deregistered;
                events.push_back(Event::Deregistered { backbone: from });
                false
            }
            Message::Reject { request_id, code, detail } if matches(b, request_id) => {
                b.pending = None;
                if b.state == BackboneState::Deregistered {
                    return false;
                }
                tracing::warn!(backbone = %from, code = code.as_str(), %detail, "backbone refused registration");
                b.state = BackboneState::Rejected;
                b.last_error = Some(format!("{}: {detail}", code.as_str()));
                b.next_attempt = now + b.backoff;
                b.backoff = (b.backoff * 2).min(self.max_backoff);
                events.push_back(Event::RegistrationRejected {
                    backbone: from,
                    code: code.as_str().into(),
                    detail,
                });
                false
            }
            _ => false,
        }
    }

    pub fn deregister(&mut self, now: Instant, transmits: &mut VecDeque<Transmit>) {
        self.seq += 1;
        let seq = self.seq;
        let addr = self.template.mesh_addr();
        for b in &mut self.backbones {
            if b.state == BackboneState::Registered {
                let request_id = self.rng.next_u64();
                b.pending = Some((request_id, now));
                let deregistration = Deregistration::sign(&self.identity, addr, seq);
                transmits.push_back(Transmit {
                    dst: b.addr,
                    payload: Message::Deregister { request_id, deregistration }.encode(),
                });
            }
            b.state = BackboneState::Deregistered;
        }
    }

    pub fn all_deregistered(&self) -> bool {
        self.backbones.iter().all(|b| b.state == BackboneState::Deregistered && b.pending.is_none())
    }

    /// The backbones (`relays: false`) or the relays (`true`).
    pub fn status(&self, relays: bool, now: Instant) -> Vec<BackboneStatus> {
        self.backbones
            .iter()
            .filter(|b| b.relay == relays)
            .map(|b| BackboneStatus {
                address: b.addr,
                state: b.state,
                observed: b.observed,
                last_ack_secs_ago: b.last_ack.map(|t| now.saturating_duration_since(t).as_secs_f64()),
                next_attempt_in_secs: b.next_attempt.saturating_duration_since(now).as_secs_f64(),
                last_error: b.last_error.clone(),
            })
            .collect()
    }

    /// Local endpoints first (they win on a shared LAN), then every distinct
    /// reflexive endpoint the backbones observed.
    fn endpoints(&self) -> Vec<SocketAddr> {
        let mut endpoints = self.local_endpoints.clone();
        for observed in self.backbones.iter().filter_map(|b| b.observed) {
            if !endpoints.contains(&observed) {
                endpoints.push(observed);
            }
        }
        endpoints.truncate(meshtun_proto::record::MAX_ENDPOINTS);
        endpoints
    }

    /// Every registration carries a freshly signed record with the next
    /// sequence number.
    fn sign_next(&mut self) -> Option<SignedRecord> {
        self.seq += 1;
        self.template.seq = self.seq;
        match SignedRecord::sign(&self.identity, &self.template) {
            Ok(signed) => Some(signed),
            Err(error) => {
                tracing::error!(%error, "cannot sign our own record");
                None
            }
        }
    }
}
