//! The path agent of one peer: which way its WireGuard datagrams go
//! (straight to an endpoint, or through a relay), found by probing every
//! candidate endpoint and kept honest by keepalive probes.
//!
//! * A new peer starts on the relay (ready at once) while probes go to all
//!   of its candidates on a quick schedule (0, 0.25, 0.5, 1, 2, 4 s, then
//!   every 15 s while relayed).
//! * A pong proves a path in both directions and measures its RTT. The
//!   first one moves traffic off the relay. Later ones switch between
//!   direct paths only with hysteresis: a path must be 25% faster, or come
//!   earlier in the peer's candidate list (local interfaces first, so two
//!   hosts on one LAN never hairpin through their router) and be no more
//!   than 25% slower.
//! * While traffic flows the current direct path is pinged every second;
//!   if nothing authenticated answers it for 3 s, traffic falls back
//!   to the relay and probing starts over. Idle peers are pinged every 25 s,
//!   which also keeps NAT mappings open.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::grid::{TimerGrid, TICK};
use crate::probe::TxId;

const QUICK_ROUNDS: [Duration; 6] = [
    Duration::ZERO,
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];
const RELAYED_REPROBE: Duration = Duration::from_secs(15);
const ACTIVE_KEEPALIVE: Duration = Duration::from_secs(1);
const IDLE_KEEPALIVE: Duration = Duration::from_secs(25);
/// A keepalive falls due but authenticated traffic came from the peer on
/// the path within this long: the path is proven as an answered keepalive
/// would prove it, so the keepalive waits a tick (see `on_timeout`).
const HEARD_LATELY: Duration = TICK;
/// Even on a path proven by traffic, a keepalive goes this often, to keep
/// the path's RTT (shown by `status`, used to compare paths) current.
const RTT_REFRESH: Duration = Duration::from_secs(10);
/// Traffic within this window makes a peer active.
const ACTIVE_WINDOW: Duration = Duration::from_secs(5);
/// How long keepalives on the current direct path may go unanswered.
const ACTIVE_DEAD_AFTER: Duration = Duration::from_secs(3);
const IDLE_DEAD_AFTER: Duration = Duration::from_secs(60);
/// Don't re-ping a candidate sooner than this after a triggered ping.
const MIN_PING_GAP: Duration = Duration::from_millis(200);
const MAX_PENDING_PER_CANDIDATE: usize = 8;
const MAX_CANDIDATES: usize = 24;

/// Where a peer's WireGuard datagrams go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Direct(SocketAddr),
    Relay(SocketAddr),
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Direct(a) => write!(f, "direct {a}"),
            Path::Relay(a) => write!(f, "relay {a}"),
        }
    }
}

#[derive(Clone, Debug)]
struct Candidate {
    addr: SocketAddr,
    /// Position in the peer's record (local interfaces come first);
    /// peer-reflexive candidates learned from pings rank last.
    rank: usize,
    rtt: Option<Duration>,
    last_pong: Option<Instant>,
    last_ping: Option<Instant>,
    pending: Vec<(TxId, Instant)>,
}

/// A path change, for events and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathChange {
    pub from: Option<Path>,
    pub to: Path,
    pub reason: &'static str,
}

/// One candidate as `meshtun status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct CandidateStatus {
    pub endpoint: SocketAddr,
    pub rtt_ms: Option<f64>,
    pub answered: bool,
}

pub struct PathAgent {
    candidates: Vec<Candidate>,
    current: Option<Path>,
    relay: Option<SocketAddr>,
    /// Last authenticated datagram on the current direct path.
    direct_last_rx: Option<Instant>,
    /// When the first keepalive since the last answer went out.
    unanswered_since: Option<Instant>,
    last_activity: Option<Instant>,
    started: Instant,
    round: usize,
    next_round: Instant,
    next_keepalive: Option<Instant>,
    relay_reason: Option<&'static str>,
    /// Keepalives and reprobes go on the node's timer grid.
    grid: TimerGrid,
}

/// Pings the node should send: (destination, transaction id).
pub type Pings = Vec<(SocketAddr, TxId)>;

impl PathAgent {
    /// Prefetch hints for the candidates a packet's path checks reach.
    pub(crate) fn prefetch(&self) {
        crate::prefetch::slice_head(&self.candidates, 128);
    }

    pub fn new(candidates: &[SocketAddr], relay: Option<SocketAddr>, grid: TimerGrid, now: Instant) -> PathAgent {
        let mut agent = PathAgent {
            candidates: Vec::new(),
            current: relay.map(Path::Relay),
            relay,
            direct_last_rx: None,
            unanswered_since: None,
            last_activity: None,
            started: now,
            round: 0,
            next_round: now,
            next_keepalive: None,
            relay_reason: relay.map(|_| "no probe answered yet"),
            grid,
        };
        agent.set_candidates(candidates);
        agent
    }

    pub fn current(&self) -> Option<Path> {
        self.current
    }

    pub fn relay(&self) -> Option<SocketAddr> {
        self.relay
    }

    pub fn relay_reason(&self) -> Option<&'static str> {
        match self.current {
            Some(Path::Relay(_)) => self.relay_reason,
            _ => None,
        }
    }

    pub fn rtt(&self) -> Option<Duration> {
        match self.current {
            Some(Path::Direct(addr)) => self.candidates.iter().find(|c| c.addr == addr)?.rtt,
            _ => None,
        }
    }

    pub fn candidates(&self) -> Vec<CandidateStatus> {
        self.candidates
            .iter()
            .map(|c| CandidateStatus {
                endpoint: c.addr,
                rtt_ms: c.rtt.map(|r| r.as_secs_f64() * 1000.0),
                answered: c.last_pong.is_some(),
            })
            .collect()
    }

    /// Replaces the candidates from a newer record, keeping what was learned.
    pub fn set_candidates(&mut self, endpoints: &[SocketAddr]) {
        let old = std::mem::take(&mut self.candidates);
        for (rank, addr) in endpoints.iter().enumerate().take(MAX_CANDIDATES) {
            let mut candidate = old.iter().find(|c| c.addr == *addr).cloned().unwrap_or(Candidate {
                addr: *addr,
                rank,
                rtt: None,
                last_pong: None,
                last_ping: None,
                pending: Vec::new(),
            });
            candidate.rank = rank;
            self.candidates.push(candidate);
        }
        // Keep peer-reflexive candidates that have proven themselves.
        for c in old {
            if c.last_pong.is_some() && !self.candidates.iter().any(|n| n.addr == c.addr) && self.candidates.len() < MAX_CANDIDATES {
                self.candidates.push(Candidate { rank: usize::MAX, ..c });
            }
        }
    }

    /// Sets the relay to use (the backbone that introduced us).
    pub fn set_relay(&mut self, relay: SocketAddr) {
        self.relay = Some(relay);
        if self.current.is_none() || matches!(self.current, Some(Path::Relay(_))) {
            self.current = Some(Path::Relay(relay));
            self.relay_reason.get_or_insert("no probe answered yet");
        }
    }

    /// Uses another relay (the old one's backbone is gone).
    pub fn replace_relay(&mut self, relay: SocketAddr) {
        self.relay = Some(relay);
        if matches!(self.current, Some(Path::Relay(_))) {
            self.current = Some(Path::Relay(relay));
        }
    }

    /// Probe again from the start (e.g. the peer roamed).
    pub fn restart_probing(&mut self, now: Instant) {
        self.started = now;
        self.round = 0;
        self.next_round = now;
    }

    /// Data went to or came from this peer.
    pub fn on_activity(&mut self, now: Instant) {
        let was_idle = !self.is_active(now);
        self.last_activity = Some(now);
        if was_idle && matches!(self.current, Some(Path::Direct(_))) {
            // Check the path promptly once traffic resumes after a pause.
            self.next_keepalive = Some(now);
        }
    }

    /// An authenticated WireGuard datagram arrived straight from `from`.
    pub fn on_direct_rx(&mut self, from: SocketAddr, now: Instant) {
        if self.current == Some(Path::Direct(from)) {
            self.heard_on_current(now);
        }
    }

    fn heard_on_current(&mut self, now: Instant) {
        self.direct_last_rx = Some(now);
        self.unanswered_since = None;
    }

    pub fn poll_timeout(&self) -> Instant {
        let mut next = self.next_round;
        if let Some(k) = self.next_keepalive {
            next = next.min(k);
        }
        next
    }

    /// Timers: probe rounds, keepalives, and declaring a silent path dead.
    pub fn on_timeout(&mut self, now: Instant, mut txid: impl FnMut() -> TxId) -> (Pings, Option<PathChange>) {
        let mut pings = Vec::new();
        let mut change = None;
        if let (Some(Path::Direct(addr)), Some(since)) = (self.current, self.unanswered_since) {
            let limit = if self.is_active(now) { ACTIVE_DEAD_AFTER } else { IDLE_DEAD_AFTER };
            // At least, not over: the keepalives keep their phase on the
            // grid, so the one `limit` after the first unanswered one
            // gives the path up rather than the one a period later.
            if now.saturating_duration_since(since) >= limit {
                if let Some(c) = self.candidates.iter_mut().find(|c| c.addr == addr) {
                    c.rtt = None;
                    c.last_pong = None;
                }
                let to = match self.relay {
                    Some(relay) => Path::Relay(relay),
                    None => Path::Direct(addr),
                };
                change = Some(PathChange { from: self.current, to, reason: "direct path stopped answering" });
                self.current = Some(to);
                self.relay_reason = Some("direct path stopped answering");
                self.direct_last_rx = None;
                self.unanswered_since = None;
                self.next_keepalive = None;
                self.restart_probing(now);
            }
        }
        if self.next_round <= now {
            for c in &mut self.candidates {
                if let Some(id) = ping(c, now, &mut txid, true) {
                    pings.push((c.addr, id));
                }
            }
            self.round += 1;
            let relayed = !matches!(self.current, Some(Path::Direct(_)));
            self.next_round = match QUICK_ROUNDS.get(self.round) {
                Some(offset) => self.started + *offset,
                None if relayed => self.grid.at_or_after(now + RELAYED_REPROBE),
                None => self.grid.at_or_after(now + IDLE_KEEPALIVE * 4),
            }
            .max(now + Duration::from_millis(1));
        }
        if let (Some(Path::Direct(addr)), Some(at)) = (self.current, self.next_keepalive) {
            if at <= now {
                let heard_lately = self.direct_last_rx.is_some_and(|rx| now.saturating_duration_since(rx) < HEARD_LATELY);
                let interval = if self.is_active(now) { ACTIVE_KEEPALIVE } else { IDLE_KEEPALIVE };
                let mut next = self.grid.next_period(at, interval, now);
                if let Some(c) = self.candidates.iter_mut().find(|c| c.addr == addr) {
                    let rtt_fresh = c.last_ping.is_some_and(|t| now.saturating_duration_since(t) < RTT_REFRESH);
                    if heard_lately && rtt_fresh {
                        // Traffic both ways keeps the path proven without
                        // probes (two to four datagrams a second, each a
                        // wake-up at the other end). The first tick the
                        // peer is silent, it goes.
                        next = self.grid.after(now);
                    } else if let Some(id) = ping(c, now, &mut txid, true) {
                        pings.push((addr, id));
                        // From when it was due, so that the wake-up's own
                        // lateness (which varies) cannot put the keepalive
                        // `limit` later just short of it; from a tick ago at
                        // most (after a suspended host's long sleep).
                        let due = now.checked_sub(TICK).map_or(at, |floor| at.max(floor));
                        self.unanswered_since.get_or_insert(due);
                    }
                }
                self.next_keepalive = Some(next);
            }
        }
        (pings, change)
    }

    /// A verified ping arrived from `from`. Returns a triggered ping back
    /// (so this side learns the path too) if one is due.
    pub fn on_ping(&mut self, from: SocketAddr, now: Instant, mut txid: impl FnMut() -> TxId) -> Option<(SocketAddr, TxId)> {
        let index = match self.candidates.iter().position(|c| c.addr == from) {
            Some(i) => i,
            None if self.candidates.len() < MAX_CANDIDATES => {
                // Peer-reflexive: the peer's NAT chose a port we did not know.
                self.candidates.push(Candidate {
                    addr: from,
                    rank: usize::MAX,
                    rtt: None,
                    last_pong: None,
                    last_ping: None,
                    pending: Vec::new(),
                });
                self.candidates.len() - 1
            }
            None => return None,
        };
        // A ping proves only the way from the peer, and a peer that gave
        // this path up (it stopped hearing us) still sends its probe rounds
        // on it: only answers to our keepalives, and the peer's data, prove
        // the path both ways.
        let c = self.candidates.get_mut(index)?;
        ping(c, now, &mut txid, false).map(|id| (from, id))
    }

    /// A verified pong for one of our pings arrived from `from`.
    pub fn on_pong(&mut self, from: SocketAddr, id: TxId, now: Instant) -> Option<PathChange> {
        let c = self.candidates.iter_mut().find(|c| c.addr == from)?;
        let sent = c.pending.iter().position(|(t, _)| *t == id).map(|i| c.pending.swap_remove(i).1)?;
        let sample = now.saturating_duration_since(sent);
        c.rtt = Some(match c.rtt {
            Some(old) => (old * 7 + sample) / 8,
            None => sample,
        });
        c.last_pong = Some(now);
        let (rank, rtt) = (c.rank, c.rtt.unwrap_or(sample));
        if self.current == Some(Path::Direct(from)) {
            self.heard_on_current(now);
            return None;
        }
        let better = match self.current {
            Some(Path::Direct(cur)) => match self.candidates.iter().find(|c| c.addr == cur) {
                Some(cur) => {
                    // A current path without an RTT (it failed, and no relay
                    // took over) loses to any answer: saturate, never overflow.
                    let cur_rtt = cur.rtt.unwrap_or(Duration::MAX);
                    let rtt4 = rtt.saturating_mul(4);
                    rtt4 < cur_rtt.saturating_mul(3) || (rank < cur.rank && rtt4 <= cur_rtt.saturating_mul(5))
                }
                None => true,
            },
            _ => true,
        };
        if !better {
            return None;
        }
        let reason = match self.current {
            Some(Path::Direct(_)) => "a better direct path answered",
            _ => "probe answered",
        };
        let change = PathChange { from: self.current, to: Path::Direct(from), reason };
        self.current = Some(Path::Direct(from));
        self.heard_on_current(now);
        self.next_keepalive = Some(self.grid.at_or_after(now + ACTIVE_KEEPALIVE));
        Some(change)
    }

    fn is_active(&self, now: Instant) -> bool {
        self.last_activity.is_some_and(|t| now.saturating_duration_since(t) < ACTIVE_WINDOW)
    }
}

fn ping(c: &mut Candidate, now: Instant, txid: &mut impl FnMut() -> TxId, scheduled: bool) -> Option<TxId> {
    if !scheduled && c.last_ping.is_some_and(|t| now.saturating_duration_since(t) < MIN_PING_GAP) {
        return None;
    }
    let id = txid();
    if c.pending.len() >= MAX_PENDING_PER_CANDIDATE {
        c.pending.remove(0);
    }
    c.pending.push((id, now));
    c.last_ping = Some(now);
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn counter() -> impl FnMut() -> TxId {
        let mut n = 0u8;
        move || {
            n += 1;
            [n; 12]
        }
    }

    #[test]
    fn a_new_peer_starts_on_the_relay_and_probes_every_candidate() {
        let now = Instant::now();
        let mut agent = PathAgent::new(&[addr("10.0.0.2:1"), addr("198.18.0.2:1")], Some(addr("198.18.0.1:7400")), TimerGrid::new(now), now);
        assert_eq!(agent.current(), Some(Path::Relay(addr("198.18.0.1:7400"))));
        let (pings, change) = agent.on_timeout(now, counter());
        assert_eq!(pings.len(), 2);
        assert!(change.is_none());
    }

    #[test]
    fn the_first_pong_moves_traffic_off_the_relay() {
        let now = Instant::now();
        let mut agent = PathAgent::new(&[addr("198.18.0.2:1")], Some(addr("198.18.0.1:7400")), TimerGrid::new(now), now);
        let (pings, _) = agent.on_timeout(now, counter());
        let change = agent.on_pong(pings[0].0, pings[0].1, now + Duration::from_millis(20)).unwrap();
        assert_eq!(change.to, Path::Direct(addr("198.18.0.2:1")));
        assert_eq!(agent.rtt(), Some(Duration::from_millis(20)));
    }

    #[test]
    fn a_pong_with_an_unknown_transaction_id_changes_nothing() {
        let now = Instant::now();
        let mut agent = PathAgent::new(&[addr("198.18.0.2:1")], Some(addr("198.18.0.1:7400")), TimerGrid::new(now), now);
        agent.on_timeout(now, counter());
        assert!(agent.on_pong(addr("198.18.0.2:1"), [99; 12], now).is_none());
        assert!(agent.on_pong(addr("203.0.113.1:1"), [1; 12], now).is_none());
        assert_eq!(agent.current(), Some(Path::Relay(addr("198.18.0.1:7400"))));
    }

    #[test]
    fn the_local_path_wins_over_a_slightly_faster_hairpin_but_not_a_much_faster_one() {
        let now = Instant::now();
        let (local, public) = (addr("10.0.0.2:1"), addr("198.18.0.2:1"));
        let mut agent = PathAgent::new(&[local, public], Some(addr("198.18.0.1:7400")), TimerGrid::new(now), now);
        let mut ids = counter();
        let (pings, _) = agent.on_timeout(now, &mut ids);
        // The hairpin answers first, then the local path slightly slower.
        agent.on_pong(public, pings[1].1, now + Duration::from_millis(10));
        let change = agent.on_pong(local, pings[0].1, now + Duration::from_millis(12));
        assert_eq!(change.map(|c| c.to), Some(Path::Direct(local)));
    }

    /// An agent without a relay, probing candidates a and b, on a since a
    /// answered after `a_rtt`; b's probe is still unanswered.
    fn on_a_of_two(now: Instant, a_rtt: Duration) -> (PathAgent, impl FnMut() -> TxId, SocketAddr, SocketAddr, TxId) {
        let (a, b) = (addr("198.18.0.2:1"), addr("198.18.0.3:1"));
        let mut agent = PathAgent::new(&[a, b], None, TimerGrid::new(now), now);
        let mut ids = counter();
        let (pings, _) = agent.on_timeout(now, &mut ids);
        agent.on_pong(a, pings[0].1, now + a_rtt);
        assert_eq!(pings[1].0, b);
        (agent, ids, a, b, pings[1].1)
    }

    #[test]
    fn direct_paths_switch_only_with_hysteresis() {
        let now = Instant::now();
        let (mut agent, _, a, b, b_ping) = on_a_of_two(now, Duration::from_millis(10));
        // b is 10% faster: not enough to switch (and it ranks later).
        assert!(agent.on_pong(b, b_ping, now + Duration::from_millis(9)).is_none());
        assert_eq!(agent.current(), Some(Path::Direct(a)));
    }

    #[test]
    fn a_silent_direct_path_falls_back_to_the_relay_while_traffic_flows() {
        let now = Instant::now();
        let relay = addr("198.18.0.1:7400");
        let mut agent = PathAgent::new(&[addr("198.18.0.2:1")], Some(relay), TimerGrid::new(now), now);
        let mut ids = counter();
        let (pings, _) = agent.on_timeout(now, &mut ids);
        agent.on_pong(pings[0].0, pings[0].1, now);
        let (at, change) = silence_with_traffic(&mut agent, &mut ids, now).expect("fell back");
        assert_eq!(change.to, Path::Relay(relay));
        let after = at - now;
        assert!(after <= Duration::from_secs(5), "{after:?}");
    }

    /// Traffic flows from `start` (activity at least every 100 ms) and no
    /// answer comes: the first path change and when, within 10 s.
    fn silence_with_traffic(agent: &mut PathAgent, ids: &mut impl FnMut() -> TxId, start: Instant) -> Option<(Instant, PathChange)> {
        let mut t = start;
        while t < start + Duration::from_secs(10) {
            agent.on_activity(t);
            t = agent.poll_timeout().min(t + Duration::from_millis(100));
            if let (_, Some(change)) = agent.on_timeout(t, &mut *ids) {
                return Some((t, change));
            }
        }
        None
    }

    #[test]
    fn a_silent_active_path_is_given_up_three_seconds_after_its_first_unanswered_keepalive_even_when_woken_late() {
        let now = Instant::now();
        let relay = addr("198.18.0.1:7400");
        let direct = addr("198.18.0.2:1");
        let mut agent = PathAgent::new(&[direct], Some(relay), TimerGrid::new(now), now);
        let mut ids = counter();
        let (pings, _) = agent.on_timeout(now, &mut ids);
        agent.on_pong(direct, pings[0].1, now + Duration::from_millis(5));
        // Wake-ups come late by a varying amount: the first unanswered
        // keepalive's more than the later ones'.
        let (first_late, later_late) = (Duration::from_micros(300), Duration::from_micros(20));
        let mut t = now;
        let mut first_unanswered = None;
        let gave_up = loop {
            // Traffic every 100 ms; the agent's timers run only when due,
            // as the node's timer pass runs them.
            let late = if first_unanswered.is_none() { first_late } else { later_late };
            let due = agent.poll_timeout() + late;
            while t + Duration::from_millis(100) < due {
                t += Duration::from_millis(100);
                agent.on_activity(t);
            }
            t = due;
            agent.on_activity(t);
            let (pings, change) = agent.on_timeout(t, &mut ids);
            if let Some(change) = change {
                assert_eq!(change.to, Path::Relay(relay));
                break t;
            }
            if first_unanswered.is_none() && agent.unanswered_since.is_some() {
                assert!(pings.iter().any(|&(to, _)| to == direct), "a keepalive went out");
                first_unanswered = Some(t);
            }
            assert!(t < now + Duration::from_secs(10), "never gave up");
        };
        let silent = gave_up - first_unanswered.expect("a keepalive went out");
        assert!(silent <= ACTIVE_DEAD_AFTER + TICK, "{silent:?}");
        assert!(silent + first_late >= ACTIVE_DEAD_AFTER, "{silent:?}");
    }

    /// Runs the agent's timers when due from `from` to `until`, the peer's
    /// traffic arriving on `direct` every 10 ms while `peer_talks(t)`.
    /// Returns the keepalives sent to `direct` and the first path change.
    fn run_with_peer_traffic(
        agent: &mut PathAgent,
        ids: &mut impl FnMut() -> TxId,
        direct: SocketAddr,
        from: Instant,
        until: Instant,
        peer_talks: impl Fn(Instant) -> bool,
    ) -> (Vec<Instant>, Option<(Instant, PathChange)>) {
        let mut keepalives = Vec::new();
        let mut t = from;
        while t < until {
            t += Duration::from_millis(10);
            agent.on_activity(t);
            if peer_talks(t) {
                agent.on_direct_rx(direct, t);
            }
            if agent.poll_timeout() <= t {
                let (pings, change) = agent.on_timeout(t, &mut *ids);
                keepalives.extend(pings.iter().filter(|&&(to, _)| to == direct).map(|_| t));
                if let Some(change) = change {
                    return (keepalives, Some((t, change)));
                }
            }
        }
        (keepalives, None)
    }

    #[test]
    fn a_path_carrying_the_peers_traffic_sends_only_the_rtt_refresh_keepalives() {
        let now = Instant::now();
        let direct = addr("198.18.0.2:1");
        let mut agent = PathAgent::new(&[direct], Some(addr("198.18.0.1:7400")), TimerGrid::new(now), now);
        let mut ids = counter();
        let (pings, _) = agent.on_timeout(now, &mut ids);
        agent.on_pong(direct, pings[0].1, now + Duration::from_millis(5));
        // The quick probe rounds (to 4 s) ping every candidate, this one too.
        let settled = now + Duration::from_secs(5);
        run_with_peer_traffic(&mut agent, &mut ids, direct, now, settled, |_| true);
        let (keepalives, change) =
            run_with_peer_traffic(&mut agent, &mut ids, direct, settled, settled + Duration::from_secs(30), |_| true);
        assert!(change.is_none());
        // 30 s of traffic: one keepalive each RTT_REFRESH, not one a second.
        assert_eq!(keepalives.len(), 3, "{keepalives:?}");
    }

    #[test]
    fn once_the_peer_falls_silent_a_keepalive_goes_within_a_tick_or_two_and_the_path_is_given_up_three_seconds_later() {
        let now = Instant::now();
        let (direct, relay) = (addr("198.18.0.2:1"), addr("198.18.0.1:7400"));
        let mut agent = PathAgent::new(&[direct], Some(relay), TimerGrid::new(now), now);
        let mut ids = counter();
        let (pings, _) = agent.on_timeout(now, &mut ids);
        agent.on_pong(direct, pings[0].1, now + Duration::from_millis(5));
        let silent_from = now + Duration::from_millis(4_130);
        let (keepalives, change) =
            run_with_peer_traffic(&mut agent, &mut ids, direct, now, now + Duration::from_secs(10), |t| t < silent_from);
        let first = *keepalives.iter().find(|&&t| t >= silent_from).expect("a keepalive after the silence began");
        assert!(first <= silent_from + 2 * TICK, "first keepalive {:?} after the silence", first - silent_from);
        let (gave_up, change) = change.expect("the path was given up");
        assert_eq!(change.to, Path::Relay(relay));
        assert!(gave_up - first >= ACTIVE_DEAD_AFTER && gave_up - first <= ACTIVE_DEAD_AFTER + TICK, "{:?}", gave_up - first);
    }

    #[test]
    fn an_answer_after_a_failed_path_without_a_relay_wins_without_overflowing() {
        let now = Instant::now();
        let (mut agent, mut ids, a, b, b_ping) = on_a_of_two(now, Duration::from_millis(5));
        // a goes silent while traffic flows: with no relay the agent stays
        // on a, which has lost its RTT.
        let (failed, _) = silence_with_traffic(&mut agent, &mut ids, now).expect("never gave up");
        assert_eq!(agent.current(), Some(Path::Direct(a)));
        // b answers (late): it is better than a path with no RTT.
        let change = agent.on_pong(b, b_ping, failed + Duration::from_millis(1));
        assert_eq!(change.map(|c| c.to), Some(Path::Direct(b)));
    }

    #[test]
    fn a_ping_from_an_unknown_address_becomes_a_candidate_and_is_pinged_back() {
        let now = Instant::now();
        let mut agent = PathAgent::new(&[addr("198.18.0.2:1")], None, TimerGrid::new(now), now);
        let back = agent.on_ping(addr("198.18.0.2:5555"), now, counter());
        assert_eq!(back.map(|(a, _)| a), Some(addr("198.18.0.2:5555")));
        assert_eq!(agent.candidates().len(), 2);
    }
}
