//! The node's peers by slot, and the bookkeeping that keeps their timers
//! cheap with thousands of peers.
//!
//! Two kinds of per-peer timers exist. The node's own (path probes and
//! keepalives, handshake retries, relay refreshes: [`Peer::poll_timeout`])
//! are filed in a deadline set, so the next deadline is one lookup and a
//! timer wake-up visits only the peers that are due. boringtun's WireGuard
//! timers are opaque and driven by calling `update_timers` (its own device
//! does so every 250 ms for every peer). Here a session is ticked at that
//! rate only while it is active; once it has been quiet long enough that
//! none of boringtun's short timers (keepalive 10 s, handshake after
//! unanswered data 15 s, handshake retry 5 s) can fire, it sleeps until the
//! next of its long timers can be due (persistent keepalive, rekey and
//! expiry counted from the session's handshake), on the same 250 ms grid.
//!
//! A parked session (no `Tunn`: see [`PeerTable::park`]) has no WireGuard
//! timers at all until [`PeerTable::unpark`] gives it a new one.
//!
//! Any mutable access to a peer marks it dirty (its deadline is re-filed at
//! the next timer pass) and wakes a sleeping session first with an
//! `update_timers` call, so boringtun stamps the packet that follows with a
//! fresh clock, exactly as with a 250 ms tick.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::grid::{TimerGrid, TICK};
use crate::peer::Peer;

/// A session untouched this long (and not handshaking) has no short
/// WireGuard timer left: the longest is REKEY_TIMEOUT + KEEPALIVE_TIMEOUT
/// (15 s) after the last packet.
const WG_QUIET_AFTER: Duration = Duration::from_secs(16);
/// boringtun's timers counted from the current session's handshake:
/// REKEY_AFTER_TIME, REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT,
/// REJECT_AFTER_TIME, 3 * REJECT_AFTER_TIME.
const SESSION_TIMERS: [Duration; 4] =
    [Duration::from_secs(120), Duration::from_secs(165), Duration::from_secs(180), Duration::from_secs(540)];
/// Room for what `update_timers` writes: a handshake initiation (148
/// bytes) or a keepalive (32).
const TICK_BUF: usize = 512;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Wg {
    /// Ticked every `TICK`.
    Awake,
    /// Ticked at this time (None: only when touched).
    Asleep(Option<Instant>),
}

#[derive(Clone, Copy, Debug)]
struct Meta {
    wg: Wg,
    /// In the `awake` list (entries are dropped lazily).
    listed: bool,
    /// The session was touched since the last pass.
    touched: bool,
    /// When boringtun last sent this session's persistent keepalive, if
    /// known (reset by any touch).
    keepalive_sent: Option<Instant>,
    /// Last time the peer was touched or sent a handshake initiation (at
    /// the timer pass that saw it).
    active: Instant,
}

pub struct PeerTable {
    peers: Vec<Option<Box<Peer>>>,
    meta: Vec<Meta>,
    /// The peers' own deadlines; re-filed lazily, also from `&self`
    /// (the driver asks for the next deadline after every batch).
    paths: RefCell<PathIndex>,
    /// Sessions touched since the last pass.
    touched: Vec<u32>,
    awake: Vec<u32>,
    /// Slots whose session is awake (the list may hold stale entries).
    awake_count: usize,
    sleepers: BTreeSet<(Instant, u32)>,
    /// The grid every WireGuard tick falls on.
    grid: TimerGrid,
    /// When the last timer pass ran.
    last_pass: Instant,
    /// The grid point after the last WireGuard tick: asked for on every
    /// turn of the engine's loop, so kept rather than worked out each time.
    next_grid: Instant,
    persistent_keepalive: Option<Duration>,
    /// What waking a session on access had to send (rare: a timer that
    /// fell due exactly then); the next timer pass sends it.
    woken_output: Vec<(u32, Vec<u8>)>,
    buf: Vec<u8>,
}

impl PeerTable {
    pub fn new(persistent_keepalive: Option<u16>, now: Instant) -> PeerTable {
        PeerTable {
            peers: Vec::new(),
            meta: Vec::new(),
            paths: RefCell::new(PathIndex::default()),
            touched: Vec::new(),
            awake: Vec::new(),
            awake_count: 0,
            sleepers: BTreeSet::new(),
            grid: TimerGrid::new(now),
            last_pass: now,
            next_grid: now + TICK,
            persistent_keepalive: persistent_keepalive.filter(|&s| s > 0).map(|s| Duration::from_secs(s.into())),
            woken_output: Vec::new(),
            buf: vec![0; TICK_BUF],
        }
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// A new empty slot at the end.
    pub fn push(&mut self, now: Instant) {
        self.peers.push(None);
        self.meta.push(Meta { wg: Wg::Asleep(None), listed: false, touched: false, keepalive_sent: None, active: now });
    }

    /// Prefetch hints for what a packet of the peer in `index` touches
    /// here (see `Node::prefetch_packet_path`); the peer, if any.
    pub fn prefetch_slot(&self, index: usize) -> Option<&Peer> {
        use crate::prefetch;
        let (slot, meta) = (self.peers.get(index)?, self.meta.get(index)?);
        prefetch::object(slot);
        prefetch::object(meta);
        prefetch::vec_end(&self.touched);
        if let Ok(paths) = self.paths.try_borrow() {
            if let (Some(filed), Some(dirty)) = (paths.filed.get(index), paths.is_dirty.get(index)) {
                prefetch::object(filed);
                prefetch::object(dirty);
            }
            prefetch::vec_end(&paths.dirty);
        }
        let peer = slot.as_deref()?;
        prefetch::object(peer);
        peer.path.prefetch();
        if let Some(tunn) = &peer.tunn {
            // All of it: which of its session slots is current is boringtun's
            // own, and 11 KB load in parallel well within a system call.
            prefetch::object(&**tunn);
        }
        Some(peer)
    }

    pub fn get(&self, index: usize) -> Option<&Option<Box<Peer>>> {
        self.peers.get(index)
    }

    /// Mutable access: the peer's timers are re-filed at the next pass, and
    /// a sleeping WireGuard session is brought up to date first.
    pub fn get_mut(&mut self, index: usize) -> Option<&mut Option<Box<Peer>>> {
        if index < self.peers.len() {
            self.mark_dirty(index);
            self.wake(index);
        }
        self.peers.get_mut(index)
    }

    /// Mutable access for changes that leave the WireGuard session alone
    /// (path timers, probes): only re-files the peer's deadline.
    pub fn get_mut_for_path(&mut self, index: usize) -> Option<&mut Option<Box<Peer>>> {
        if index < self.peers.len() {
            self.mark_dirty(index);
        }
        self.peers.get_mut(index)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Option<Box<Peer>>> {
        self.peers.iter()
    }

    /// Touches every peer (for changes to all of them, like a key rotation).
    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, Option<Box<Peer>>> {
        for index in 0..self.peers.len() {
            self.mark_dirty(index);
            self.wake(index);
        }
        self.peers.iter_mut()
    }

    /// Puts a new peer in slot `index` (an empty one), with an active session.
    pub fn insert(&mut self, index: usize, peer: Peer, now: Instant) {
        let Some(slot) = self.peers.get_mut(index) else { return };
        *slot = Some(Box::new(peer));
        self.set_awake(index, now);
        self.mark_dirty(index);
    }

    /// Removes the peer in slot `index` with its timers.
    pub fn take(&mut self, index: usize) -> Option<Box<Peer>> {
        let peer = self.peers.get_mut(index)?.take()?;
        self.paths.get_mut().forget(index);
        self.stop_wireguard_timers(index);
        Some(peer)
    }

    /// Drops the WireGuard session of the peer in slot `index` (it keeps
    /// its record, path agent and keys) and its WireGuard timers. Returns
    /// the session, or None if there was none.
    pub fn park(&mut self, index: usize) -> Option<Box<boringtun::noise::Tunn>> {
        let tunn = self.peers.get_mut(index)?.as_mut()?.tunn.take()?;
        self.stop_wireguard_timers(index);
        self.mark_dirty(index);
        Some(tunn)
    }

    /// Gives the parked peer in slot `index` a new session, awake.
    pub fn unpark(&mut self, index: usize, tunn: Box<boringtun::noise::Tunn>, now: Instant) {
        let Some(peer) = self.peers.get_mut(index).and_then(Option::as_mut) else { return };
        peer.tunn = Some(tunn);
        self.set_awake(index, now);
        self.mark_dirty(index);
    }

    fn stop_wireguard_timers(&mut self, index: usize) {
        let meta = &mut self.meta[index];
        match meta.wg {
            Wg::Asleep(Some(at)) => {
                self.sleepers.remove(&(at, index as u32));
            }
            Wg::Asleep(None) => {}
            Wg::Awake => self.awake_count -= 1,
        }
        meta.wg = Wg::Asleep(None);
        meta.keepalive_sent = None;
        self.woken_output.retain(|(i, _)| *i as usize != index);
    }

    fn mark_dirty(&mut self, index: usize) {
        self.paths.get_mut().mark(index);
    }

    fn set_awake(&mut self, index: usize, now: Instant) {
        let meta = &mut self.meta[index];
        if meta.wg != Wg::Awake {
            self.awake_count += 1;
        }
        meta.wg = Wg::Awake;
        meta.active = meta.active.max(now);
        if !meta.listed {
            meta.listed = true;
            self.awake.push(index as u32);
        }
    }

    /// Marks WireGuard activity; a sleeping session is ticked first so the
    /// packet that follows is stamped with a fresh clock.
    fn wake(&mut self, index: usize) {
        let now = self.last_pass;
        self.meta[index].keepalive_sent = None;
        if !self.meta[index].touched {
            self.meta[index].touched = true;
            self.touched.push(index as u32);
        }
        match self.meta[index].wg {
            Wg::Awake => {}
            Wg::Asleep(at) => {
                // Parked: no timers until a new session is made.
                let Some(tunn) = self.peers[index].as_mut().and_then(|p| p.tunn.as_mut()) else { return };
                if let Some(at) = at {
                    self.sleepers.remove(&(at, index as u32));
                }
                if let boringtun::noise::TunnResult::WriteToNetwork(out) = tunn.update_timers(&mut self.buf) {
                    self.woken_output.push((index as u32, out.to_vec()));
                }
                self.set_awake(index, now);
            }
        }
    }

    /// The earliest of the peers' own deadlines (path agent, handshake
    /// retry, relay refresh).
    pub fn next_path_deadline(&self) -> Option<Instant> {
        let mut paths = self.paths.borrow_mut();
        paths.refile(&self.peers);
        paths.set.first().map(|&(at, _)| at)
    }

    /// When boringtun's timers next need driving.
    pub fn next_wg_tick(&self) -> Option<Instant> {
        if !self.woken_output.is_empty() {
            return Some(self.last_pass);
        }
        let grid = (self.awake_count > 0).then_some(self.next_grid);
        grid.into_iter().chain(self.sleepers.first().map(|&(at, _)| at)).min()
    }

    /// Starts a timer pass at `now`: the peers whose own timers are due, in
    /// slot order (the order a scan of every peer would visit them in).
    pub fn due_paths(&mut self, now: Instant) -> Vec<usize> {
        self.last_pass = now;
        // Cleared in place: the list keeps its capacity, so the next
        // packet's touch does not allocate.
        for &index in &self.touched {
            let meta = &mut self.meta[index as usize];
            meta.touched = false;
            // Touched since the last pass: the quiet time counts from now
            // (no earlier than the touch itself).
            meta.active = meta.active.max(now);
        }
        self.touched.clear();
        let paths = self.paths.get_mut();
        paths.refile(&self.peers);
        let mut due = Vec::new();
        while let Some(&(at, index)) = paths.set.first() {
            if at > now {
                break;
            }
            paths.set.pop_first();
            paths.filed[index as usize] = None;
            // Re-filed at the end of the pass, whatever the visit changes.
            paths.mark(index as usize);
            due.push(index as usize);
        }
        due.sort_unstable();
        due
    }

    /// Ends a timer pass: files the deadlines the pass changed.
    pub fn end_pass(&mut self) {
        self.paths.get_mut().refile(&self.peers);
    }

    /// Drives boringtun's timers of the sessions that are awake or whose
    /// sleep is over; `send` gets every datagram they produce.
    pub fn tick_wireguard(&mut self, now: Instant, mut send: impl FnMut(&mut Peer, &[u8])) {
        for (index, out) in std::mem::take(&mut self.woken_output) {
            if let Some(peer) = self.peers[index as usize].as_mut() {
                send(peer, &out);
            }
        }
        while let Some(&(at, index)) = self.sleepers.first() {
            if at > now {
                break;
            }
            self.sleepers.pop_first();
            let meta = &mut self.meta[index as usize];
            meta.wg = Wg::Awake;
            self.awake_count += 1;
            if !meta.listed {
                meta.listed = true;
                self.awake.push(index);
            }
        }
        self.next_grid = self.grid.after(now);
        let awake = std::mem::take(&mut self.awake);
        let mut keep = Vec::with_capacity(awake.len());
        for index in awake {
            let i = index as usize;
            if self.meta[i].wg != Wg::Awake {
                self.meta[i].listed = false;
                continue;
            }
            let Some(peer) = self.peers[i].as_mut() else {
                self.meta[i].listed = false;
                continue;
            };
            let Some(tunn) = peer.tunn.as_mut() else {
                // Parked (its timers were stopped then; this is a stale entry).
                self.meta[i].listed = false;
                continue;
            };
            let mut keepalive = false;
            let mut expired = false;
            match tunn.update_timers(&mut self.buf) {
                boringtun::noise::TunnResult::WriteToNetwork(out) => {
                    if out.first() == Some(&1) {
                        self.meta[i].active = now;
                    } else {
                        keepalive = true;
                    }
                    send(peer, out);
                }
                boringtun::noise::TunnResult::Err(boringtun::noise::errors::WireGuardError::ConnectionExpired) => {
                    expired = true;
                }
                boringtun::noise::TunnResult::Err(error) => {
                    tracing::trace!(peer = %peer.addr, ?error, "wireguard timer");
                }
                _ => {}
            }
            let meta = &mut self.meta[i];
            let quiet = !meta.touched && now.saturating_duration_since(meta.active) >= WG_QUIET_AFTER;
            if keepalive || expired {
                // A keepalive sent while quiet can only be the persistent
                // one (a passive keepalive follows received data within
                // 10 s): boringtun counts the next one from now. Otherwise
                // which one it was is unknown.
                meta.keepalive_sent = (keepalive && quiet).then_some(now);
            }
            let wake = if quiet { sleep_until(peer, now, meta.keepalive_sent, expired, self.persistent_keepalive, self.grid) } else { None };
            match wake {
                None => keep.push(index),
                Some(at) => {
                    meta.wg = Wg::Asleep(at);
                    self.awake_count -= 1;
                    meta.listed = false;
                    if let Some(at) = at {
                        self.sleepers.insert((at, index));
                    }
                }
            }
        }
        self.awake = keep;
    }

    /// The node's timer grid, which the WireGuard ticks fall on.
    pub fn grid(&self) -> TimerGrid {
        self.grid
    }
}

/// The peers' own deadlines, one entry per peer, and the peers whose
/// deadline may have changed since it was filed.
#[derive(Default)]
struct PathIndex {
    set: BTreeSet<(Instant, u32)>,
    filed: Vec<Option<Instant>>,
    dirty: Vec<u32>,
    is_dirty: Vec<bool>,
}

impl PathIndex {
    fn mark(&mut self, index: usize) {
        if self.is_dirty.len() <= index {
            self.is_dirty.resize(index + 1, false);
            self.filed.resize(index + 1, None);
        }
        if !self.is_dirty[index] {
            self.is_dirty[index] = true;
            self.dirty.push(index as u32);
        }
    }

    fn forget(&mut self, index: usize) {
        if let Some(at) = self.filed.get_mut(index).and_then(Option::take) {
            self.set.remove(&(at, index as u32));
        }
    }

    /// Files the dirty peers' deadlines. Lazily: a deadline that moved
    /// later (every packet pushes the keepalive on) keeps its earlier entry,
    /// which then wakes a pass that finds nothing due and files the real
    /// one; so a busy peer is filed about once per keepalive interval, not
    /// once per wake-up.
    fn refile(&mut self, peers: &[Option<Box<Peer>>]) {
        // Taken and given back drained: the list keeps its capacity, so
        // marking the next packet's peer does not allocate.
        let mut dirty = std::mem::take(&mut self.dirty);
        for index in dirty.drain(..) {
            let i = index as usize;
            self.is_dirty[i] = false;
            let Some(peer) = peers.get(i).and_then(Option::as_ref) else {
                self.forget(i);
                continue;
            };
            let at = peer.poll_timeout();
            if self.filed[i].is_some_and(|filed| filed <= at) {
                continue;
            }
            self.forget(i);
            self.filed[i] = Some(at);
            self.set.insert((at, index));
        }
        self.dirty = dirty;
    }
}

/// Whether a quiet session may sleep after a tick at `now`, and until when
/// (`Some(None)`: until it is touched). Only boringtun's long timers are
/// left: the persistent keepalive, predictable once one was seen sent
/// (boringtun counts from the last one; until then the session stays
/// awake), and rekey and expiry counted from the session's handshake. A
/// handshake in progress is not quiet (boringtun retries every 5 s).
fn sleep_until(
    peer: &Peer,
    now: Instant,
    keepalive_sent: Option<Instant>,
    expired: bool,
    persistent_keepalive: Option<Duration>,
    grid: TimerGrid,
) -> Option<Option<Instant>> {
    if expired {
        // Nothing runs until a packet starts a new handshake.
        return Some(None);
    }
    let keepalive_due = match (persistent_keepalive, keepalive_sent) {
        (None, _) => None,
        (Some(every), Some(sent)) if sent + every > now => Some(sent + every),
        (Some(_), _) => return None,
    };
    let session_due = peer.tunn.as_ref().and_then(|t| t.stats().0).and_then(|age| {
        let established = now.checked_sub(age).unwrap_or(now);
        SESSION_TIMERS.iter().map(|&t| established + t).find(|&t| t > now)
    });
    Some(keepalive_due.into_iter().chain(session_due).min().map(|at| grid.at_or_after(at)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::PathAgent;
    use crate::peer::{HandshakeRetry, PeerId};
    use boringtun::noise::Tunn;
    use boringtun::x25519::{PublicKey, StaticSecret};
    use meshtun_addr::{NetworkId, NodeAddr};
    use meshtun_proto::NodeRecord;

    fn peer(i: u32, now: Instant) -> Peer {
        let secret = StaticSecret::from([i as u8 + 1; 32]);
        let theirs = PublicKey::from(&StaticSecret::from([200 - i as u8; 32]));
        let record = NodeRecord {
            network: NetworkId::PUBLIC,
            node: NodeAddr::from_bytes([0x10, 0, 0, 0, 0, i as u8 + 1]),
            identity_key: [i as u8; 32],
            pow_nonce: 0,
            wg_key: theirs.to_bytes(),
            endpoints: vec![],
            hostname: None,
            capabilities: vec![],
            groups: vec![],
            seq: 1,
            wg_key_version: 1,
            wg_key_expires_unix: meshtun_proto::record::NO_EXPIRY,
            cert: None,
        };
        let tunn = Box::new(Tunn::new(secret, theirs, None, Some(25), i, None));
        Peer::new(PeerId(i), record, tunn, PathAgent::new(&[], None, TimerGrid::new(now), now), [0; 32], now)
    }

    fn table(n: u32, now: Instant) -> PeerTable {
        let mut t = PeerTable::new(Some(25), now);
        for i in 0..n {
            t.push(now);
            t.insert(i as usize, peer(i, now), now);
        }
        t
    }

    #[test]
    fn the_next_deadline_is_the_earliest_of_every_peers_own_timers() {
        let now = Instant::now();
        let mut t = table(50, now);
        let scan = t.iter().flatten().map(|p| p.poll_timeout()).min();
        assert_eq!(t.next_path_deadline(), scan);
        // A change through mutable access is seen at once, without a pass.
        let soon = now + Duration::from_millis(3);
        if let Some(p) = t.get_mut(17).and_then(Option::as_mut) {
            p.handshake = Some(HandshakeRetry { started: now, next: soon, attempts: 1 });
        }
        assert_eq!(t.next_path_deadline(), Some(soon.min(scan.unwrap())));
    }

    #[test]
    fn a_timer_pass_visits_only_due_peers_in_slot_order() {
        let now = Instant::now();
        let mut t = table(50, now);
        let far = now + Duration::from_secs(3600);
        for i in 0..50 {
            if let Some(p) = t.get_mut(i).and_then(Option::as_mut) {
                let next = if i % 10 == 3 { now + Duration::from_millis(i as u64) } else { far };
                p.handshake = Some(HandshakeRetry { started: now, next, attempts: 1 });
                p.path = PathAgent::new(&[], None, TimerGrid::new(far), far);
            }
        }
        let pass = now + Duration::from_millis(40);
        let due = t.due_paths(pass);
        assert_eq!(due, vec![3, 13, 23, 33], "due peers only, in slot order");
        t.end_pass();
        // A removed peer's timers go with it.
        t.take(43);
        assert_eq!(t.due_paths(now + Duration::from_millis(50)), vec![3, 13, 23, 33]);
    }

    #[test]
    fn removed_peers_leave_no_wireguard_ticks_behind() {
        let now = Instant::now();
        let mut t = table(3, now);
        assert!(t.next_wg_tick().is_some(), "new sessions are ticked");
        for i in 0..3 {
            t.take(i);
        }
        let mut ticked = 0;
        t.tick_wireguard(now + TICK, |_, _| ticked += 1);
        assert_eq!(t.next_wg_tick(), None);
        assert_eq!(ticked, 0);
    }

    #[test]
    fn a_parked_session_has_no_wireguard_ticks_until_it_is_unparked() {
        let now = Instant::now();
        let mut t = table(2, now);
        let tunn = t.park(1).expect("had a session");
        assert!(t.park(1).is_none(), "already parked");
        assert!(t.get(1).and_then(Option::as_ref).is_some_and(|p| p.is_parked()), "the peer stays");
        // Touching a parked peer does not wake timers it no longer has.
        t.get_mut(1);
        let mut ticked = Vec::new();
        t.tick_wireguard(now + TICK, |p, _| ticked.push(p.id));
        t.take(0);
        t.tick_wireguard(now + TICK * 2, |p, _| ticked.push(p.id));
        assert_eq!(t.next_wg_tick(), None, "nothing left to tick: {ticked:?}");
        t.unpark(1, tunn, now + TICK * 2);
        assert!(t.next_wg_tick().is_some(), "a new session is ticked again");
    }

    #[test]
    fn the_lists_a_packet_marks_its_peer_in_keep_their_room_across_passes() {
        // Marking the peer of every packet must not allocate: the lists are
        // emptied in place by deadline lookups and passes, not replaced.
        let now = Instant::now();
        let mut t = table(4, now);
        t.get_mut(2);
        t.next_path_deadline();
        t.due_paths(now);
        t.end_pass();
        let dirty_room = t.paths.get_mut().dirty.capacity();
        let touched_room = t.touched.capacity();
        assert!(dirty_room > 0 && touched_room > 0, "the lists were used");
        for round in 1..=3u64 {
            t.get_mut(round as usize % 4);
            assert_eq!(t.paths.get_mut().dirty.len(), 1);
            t.next_path_deadline();
            t.due_paths(now + Duration::from_millis(round));
            t.end_pass();
            assert!(t.paths.get_mut().dirty.is_empty() && t.touched.is_empty());
            assert_eq!(t.paths.get_mut().dirty.capacity(), dirty_room, "round {round}");
            assert_eq!(t.touched.capacity(), touched_room, "round {round}");
        }
    }
}
