//! The packet engine: one thread that owns the [`Node`], the TUN and the
//! UDP socket and waits for them in epoll(7). Packets never pass through
//! tokio: a wake-up for a packet is one `epoll_wait`, the reads, the core's
//! work and one batched send, with no scheduler, wakers or futures in
//! between (the reactor's bookkeeping cost more than the core itself, and
//! all of it sat on the path of every ping). The daemon's tokio side
//! (control socket, metrics, signals, ticks) reaches the engine through
//! [`EngineHandle`]: a channel and an eventfd in the same epoll set.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use meshtun_addr::NetworkId;
use meshtun_overlay::{offload, Node};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use crate::clock::WakeClock;
use crate::control::{self, Request};
use crate::events::{self, Hub};
use crate::requests::{DnsReply, Waiting};
use crate::state::StateDir;
use crate::udp::{self, EngineSocket};

/// Reads of the TUN or a UDP socket per wake-up before the other sources
/// get their turn (what they produce leaves every [`FLUSH_AT`] packets);
/// also the most datagrams one sendmmsg(2) carries.
const DRAIN_BATCH: usize = 64;
/// While it reads on, the engine flushes once the node holds this many
/// datagrams and TUN packets: what one read produced leaves before the
/// next is worked on (a 64 KB TUN read or UDP GRO read is about 45
/// packets), so the other end of the tunnel works in parallel instead of
/// waiting for a whole burst, and the buffers in flight stay few enough to
/// be reused warm from cache. Small packets still leave in batches.
const FLUSH_AT: usize = 32;
/// How long a send waits for room in a full socket or TUN queue before the
/// rest of the batch is dropped (as a router drops on a full queue).
const SEND_STALL: Duration = Duration::from_millis(100);
/// How long after a path MTU query that explained nothing the kernel is
/// asked again about the same destination.
const PATH_MTU_RETRY: Duration = Duration::from_secs(10);
/// Destinations remembered for PATH_MTU_RETRY at most.
const MAX_PATH_MTU_ASKED: usize = 1024;
/// How often a batch's first datagram goes alone, with DF, to find links
/// narrower than the path MTU the kernel knows (see `flush`).
const DF_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Lone datagrams larger than this (bytes of UDP payload) are checked
/// against the kernel's path MTU now and then (see `flush`): smaller ones
/// fit any path the mesh is likely to meet.
const LONE_DATAGRAM_CHECK_ABOVE: usize = 1200;
/// How long a stopping daemon waits for backbones to confirm deregistration.
const DEREGISTER_GRACE: Duration = Duration::from_secs(2);
/// Most sockets connected to single peers at once: each is a file
/// descriptor and a kernel socket, so only the peers in use get one.
const MAX_CONNECTED: usize = 64;
/// While follow-up reads find nothing, one in this many is still tried
/// (see [`FollowUp`]).
const FOLLOW_UP_PROBE: u8 = 8;
/// A connected socket unused (no send, no receive) this long is closed.
const CONNECTED_IDLE: Duration = Duration::from_secs(30);
/// How long after a failed connect(2) a destination is not tried again.
const CONNECT_RETRY: Duration = Duration::from_secs(60);

/// What reaches the engine other than packets and the core's timer.
pub enum Slow {
    Control(control::Pending),
    Metrics(crate::metrics::HttpRequest),
    /// Re-read the interface addresses.
    Refresh,
    /// SIGTERM or SIGINT.
    Stop(&'static str),
}

/// The tokio side's way in: a message, then a write to the eventfd the
/// engine's epoll set holds.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Slow>,
    wake: Arc<EventFd>,
}

impl EngineHandle {
    /// Whether the engine is still there to take it.
    pub fn send(&self, slow: Slow) -> bool {
        if self.tx.send(slow).is_err() {
            return false;
        }
        let _ = self.wake.write(1);
        true
    }
}

/// The receiving end of [`EngineHandle`], for [`Engine::run`].
pub struct Inbox {
    rx: mpsc::Receiver<Slow>,
    wake: Arc<EventFd>,
}

pub fn channel() -> anyhow::Result<(EngineHandle, Inbox)> {
    let wake = Arc::new(EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).context("cannot create an eventfd")?);
    let (tx, rx) = mpsc::channel();
    Ok((EngineHandle { tx, wake: wake.clone() }, Inbox { rx, wake }))
}

/// Prefetch hints for what a packet meets in the engine and the core after
/// a wake-up (see [`Node::prefetch_packet_path`]): the engine's fields, the
/// read buffers' heads (the kernel writes the packet there), the TUN's
/// offload state and the connected sockets.
#[inline(never)]
fn prefetch_wake_up(engine: &Engine, tun_io: &TunIo, scratch: &Scratch, conns: &ConnectedSockets) {
    use meshtun_overlay::prefetch;
    engine.node.prefetch_packet_path();
    prefetch::object_around(engine, &engine.node);
    prefetch::object(tun_io);
    prefetch::bytes(tun_io.single.as_ptr(), 128);
    prefetch::slice_head(&scratch.udp_read, 256);
    prefetch::slice_head(&scratch.tun_read, 256);
    prefetch::object(conns);
    prefetch::slice_head(&conns.slots, 512);
}

/// Everything the engine owns while the daemon runs.
pub struct Engine {
    pub node: Node,
    pub socket: EngineSocket,
    pub tun: tun::Device,
    /// TUN segmentation offload and coalescing in use.
    pub tun_offload: bool,
    pub udp_gro: bool,
    /// The node's socket was bound with `SO_REUSEPORT`: busy peers get
    /// sockets of their own (see [`ConnectedSockets`]).
    pub connect_peers: bool,
    /// The mesh DNS server's socket (non-blocking), if it is on.
    pub dns: Option<std::net::UdpSocket>,
    pub dns_domain: String,
    pub hub: Hub,
    pub network: NetworkId,
    pub interface: String,
    pub listen_port: u16,
    pub state: StateDir,
    pub wg_key: crate::state::WireguardKey,
    /// Automatic key rotation interval (zero: never) and when it is next due.
    pub rotation: Duration,
    pub next_rotation: Option<Instant>,
    pub aliases_file: PathBuf,
    pub saved_aliases: Vec<(meshtun_addr::MeshAddr, std::net::Ipv4Addr)>,
    pub cert_not_after: Option<u64>,
    pub started_unix: f64,
    /// Destinations whose path MTU the kernel was asked for without it
    /// explaining their refusal, and when (see `learn_path_mtu`).
    pub path_mtu_asked: std::collections::HashMap<std::net::SocketAddr, Instant>,
    /// When the next batch sends its first datagram alone (see `flush`).
    pub next_df_probe: Instant,
    /// When a large lone datagram is next checked against the kernel's
    /// path MTU (see `flush`).
    pub next_lone_datagram_check: Instant,
}

/// How the engine stopped.
pub struct Exit {
    /// The `meshtun down` to answer once the interface is gone.
    pub down: Option<control::Pending>,
    /// Dropping it removes the interface: the caller does, after undoing
    /// what refers to it.
    pub tun: tun::Device,
}

const TUN: u64 = 0;
const UDP: u64 = 1;
const DNS: u64 = 2;
const WAKE: u64 = 3;
const ALARM: u64 = 4;
/// Tokens from here on are connected sockets, by slot.
const CONNECTED: u64 = 16;

impl udp::Outgoing for meshtun_overlay::Transmit {
    fn dst(&self) -> SocketAddr {
        self.dst
    }
    fn bytes(&self) -> &[u8] {
        &self.payload
    }
}

/// Sockets connected to the peers WireGuard data goes to, on the node's
/// port (`SO_REUSEPORT`), as boringtun keeps one per peer: a send on one
/// skips the route lookup and cgroup hooks an addressed send pays, and the
/// kernel steers the peer's datagrams to it by early demux. Everything
/// else (backbones, relays, punching, peers beyond the cap) uses the node's
/// one unconnected socket.
struct ConnectedSockets {
    epoll: Epoll,
    /// Off when the node's socket could not be bound shareable.
    enabled: bool,
    gro: bool,
    slots: Vec<Option<Connected>>,
    /// Looked up for every run of datagrams sent: foldhash, not SipHash.
    by_dst: std::collections::HashMap<SocketAddr, usize, foldhash::fast::RandomState>,
    refused: std::collections::HashMap<SocketAddr, Instant>,
}

struct Connected {
    socket: EngineSocket,
    dst: SocketAddr,
    last_used: Instant,
    follow_up: FollowUp,
}

impl ConnectedSockets {
    fn in_use(&self) -> usize {
        self.by_dst.len()
    }

    /// The socket for a run of datagrams to `dst`, opening a connected one
    /// for WireGuard data when there is room.
    fn slot_for(&mut self, main: &EngineSocket, dst: SocketAddr, first: &[u8], now: Instant) -> Option<usize> {
        if let Some(&slot) = self.by_dst.get(&dst) {
            self.touch(Some(slot), now);
            return Some(slot);
        }
        if !self.enabled || !is_wireguard_data(first) {
            return None;
        }
        self.open(main, dst, now)
    }

    /// Opens a socket connected to `dst`, if there is room and it was not
    /// refused lately. Out of line: it runs once per peer, and the packet
    /// path stays compact (fewer cache lines and pages per wake-up).
    #[cold]
    #[inline(never)]
    fn open(&mut self, main: &EngineSocket, dst: SocketAddr, now: Instant) -> Option<usize> {
        if self.in_use() >= MAX_CONNECTED {
            return None;
        }
        if self.refused.get(&dst).is_some_and(|&until| until > now) {
            return None;
        }
        let socket = match main.connected_to(dst, self.gro) {
            Ok(socket) => socket,
            Err(e) => {
                tracing::debug!(%dst, error = %e, "cannot open a connected socket; this peer's traffic stays on the node's socket");
                self.refused.insert(dst, now + CONNECT_RETRY);
                return None;
            }
        };
        let slot = self.slots.iter().position(Option::is_none).unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        if let Err(e) = self.epoll.add(socket.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, CONNECTED + slot as u64)) {
            tracing::debug!(%dst, error = %e, "cannot watch a connected socket");
            self.refused.insert(dst, now + CONNECT_RETRY);
            return None;
        }
        tracing::debug!(%dst, "opened a socket connected to a peer");
        self.slots[slot] = Some(Connected { socket, dst, last_used: now, follow_up: FollowUp::default() });
        self.by_dst.insert(dst, slot);
        Some(slot)
    }

    /// A connected socket just received: it is in use.
    fn touch(&mut self, slot: Option<usize>, now: Instant) {
        if let Some(c) = slot.and_then(|s| self.slots.get_mut(s)).and_then(Option::as_mut) {
            c.last_used = now;
        }
    }

    /// The socket of `slot`, or the node's own (also for a slot since closed).
    fn socket<'a>(&'a self, main: &'a EngineSocket, slot: Option<usize>) -> &'a EngineSocket {
        slot.and_then(|s| self.slots.get(s)).and_then(Option::as_ref).map_or(main, |c| &c.socket)
    }

    /// The follow-up policy of `slot`'s socket, or of the node's own.
    fn follow_up<'a>(&'a mut self, main: &'a mut FollowUp, slot: Option<usize>) -> &'a mut FollowUp {
        match slot.and_then(|s| self.slots.get_mut(s)).and_then(Option::as_mut) {
            Some(c) => &mut c.follow_up,
            None => main,
        }
    }

    /// Closes the connected sockets unused for CONNECTED_IDLE (what they
    /// still held is lost, as on any socket closed with data queued).
    fn expire(&mut self, now: Instant) {
        for slot in self.slots.iter_mut() {
            if slot.as_ref().is_some_and(|c| now.saturating_duration_since(c.last_used) >= CONNECTED_IDLE) {
                if let Some(c) = slot.take() {
                    let _ = self.epoll.delete(c.socket.as_fd());
                    self.by_dst.remove(&c.dst);
                    tracing::debug!(dst = %c.dst, "closed an idle connected socket");
                }
            }
        }
        self.refused.retain(|_, until| *until > now);
    }
}

/// A WireGuard transport-data message (type 4, at least header and tag).
fn is_wireguard_data(datagram: &[u8]) -> bool {
    datagram.len() >= 32 && datagram[..4] == [4, 0, 0, 0]
}

/// Whether a follow-up read of a source is worth its system call. The
/// engine handles the first packet of a wake-up and flushes what it
/// produced; then it may read the source again or leave it to epoll, which
/// is level-triggered and reports a source that still holds data. In
/// request-response traffic (a ping, an RPC) the follow-up read finds
/// nothing every time: one wasted system call per packet. In bulk traffic
/// it nearly always finds more, and leaving it to epoll would cost an
/// `epoll_wait` per read instead. So it is tried while it pays and, while
/// it does not, once in FOLLOW_UP_PROBE times to notice traffic picking up.
#[derive(Clone, Copy, Debug, Default)]
struct FollowUp {
    paying: bool,
    skipped: u8,
}

impl FollowUp {
    fn worth_trying(&mut self) -> bool {
        if self.paying {
            return true;
        }
        self.skipped += 1;
        if self.skipped >= FOLLOW_UP_PROBE {
            self.skipped = 0;
            return true;
        }
        false
    }

    /// What the last follow-up read that was tried found.
    fn found(&mut self, anything: bool) {
        self.paying = anything;
    }

    /// Runs `read` (which returns how many packets it got) if it is worth
    /// trying, and learns from what it got; 0 when skipped.
    fn read_more(&mut self, read: impl FnOnce() -> anyhow::Result<usize>) -> anyhow::Result<usize> {
        if !self.worth_trying() {
            return Ok(0);
        }
        let got = read()?;
        self.found(got > 0);
        Ok(got)
    }
}

/// The engine's follow-up policies but those of connected sockets, which
/// keep their own.
#[derive(Default)]
struct FollowUps {
    /// More TUN reads after the first of a wake-up.
    tun: FollowUp,
    /// More receives on the node's own socket after the first.
    udp: FollowUp,
    /// A TUN read right after writing to the TUN, for the local stack's
    /// answer (an echo reply, a TCP ACK) before going back to epoll.
    answer: FollowUp,
}

/// Buffers reused for the whole run.
struct Scratch {
    tun_read: Vec<u8>,
    udp_read: Vec<u8>,
    dns_read: Vec<u8>,
    batch: Vec<meshtun_overlay::Transmit>,
}

impl Engine {
    /// Runs until a signal or `meshtun down`, then deregisters (bounded
    /// wait) and hands the TUN back. Errors only when the TUN fails.
    // Never inlined: the loop is one function that the link order and
    // bench/profile-hot-path.sh (callgrind --toggle-collect) name.
    #[inline(never)]
    pub fn run(mut self, inbox: Inbox) -> anyhow::Result<Exit> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("cannot create an epoll instance")?;
        // SAFETY: the TUN fd stays open for as long as `self.tun` lives,
        // which is longer than the epoll set it is registered with.
        let tun_fd = unsafe { BorrowedFd::borrow_raw(self.tun.as_raw_fd()) };
        epoll.add(tun_fd, EpollEvent::new(EpollFlags::EPOLLIN, TUN)).context("cannot watch the TUN")?;
        epoll.add(self.socket.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, UDP)).context("cannot watch the UDP socket")?;
        if let Some(dns) = &self.dns {
            epoll.add(dns.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, DNS)).context("cannot watch the DNS socket")?;
        }
        epoll.add(inbox.wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE)).context("cannot watch the eventfd")?;
        let mut alarm = Alarm::new().context("cannot create the engine's timer (timerfd)")?;
        epoll.add(alarm.fd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, ALARM)).context("cannot watch the timerfd")?;

        let mut tun_io = TunIo::new(self.tun_offload);
        let mut waiting = Waiting::default();
        let mut scratch = Scratch {
            tun_read: vec![0u8; offload::MAX_READ],
            udp_read: vec![0u8; 1 << 16],
            dns_read: vec![0u8; 4096],
            batch: Vec::with_capacity(DRAIN_BATCH),
        };
        let mut conns = ConnectedSockets {
            epoll,
            enabled: self.connect_peers,
            gro: self.udp_gro,
            slots: Vec::new(),
            by_dst: Default::default(),
            refused: Default::default(),
        };
        let mut events = [EpollEvent::empty(); 16];
        let mut follow = FollowUps::default();
        let mut clock = WakeClock::new();
        // The daemon set the core's wall clock just before.
        let mut unix_set = clock.now();
        // One clock read per wake-up (from the TSC where the kernel keeps
        // time with it: see clock.rs): its packets and the turn of the loop
        // after them share its instant (they take microseconds).
        let mut now = unix_set;
        // The once-a-second watch runs on the core's timer grid, in the
        // wake-ups that tick its sessions and its own checks.
        let grid = self.node.timer_grid();
        let mut next_watch = grid.at_or_after(now + events::TICK);
        let down = 'run: loop {
            self.flush(&mut tun_io, &mut scratch.batch, &mut conns, now);
            let answered = self.node.has_answers();
            if answered {
                self.answer_requests(&mut waiting, now);
            }
            if waiting.next_expiry().is_some_and(|at| at <= now) {
                self.expire_requests(&mut waiting, now);
            }
            // The core's wall clock is in seconds: once a second will do.
            if now.saturating_duration_since(unix_set) >= Duration::from_secs(1) {
                self.node.set_unix_time(unix_now());
                unix_set = now;
            }
            if self.next_rotation.is_some_and(|at| at <= now) {
                self.scheduled_rotation();
            }
            if next_watch <= now {
                self.watch(&mut conns, now);
                next_watch = grid.next_period(next_watch, events::TICK, now);
            }
            if answered {
                // Answers may have queued packets (pings): send them before sleeping.
                self.flush(&mut tun_io, &mut scratch.batch, &mut conns, now);
            }
            let deadline = [self.node.poll_timeout(), waiting.next_expiry(), self.next_rotation]
                .into_iter()
                .flatten()
                .fold(next_watch, Instant::min);
            if deadline <= now {
                self.node.handle_timeout(now);
                now = clock.now();
                continue;
            }
            alarm.arm(deadline, now)?;
            let n = match conns.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => return Err(e).context("epoll_wait failed"),
            };
            // After idle, what the packet will touch is out of the caches:
            // start loading it now, in parallel and while the read runs.
            prefetch_wake_up(&self, &tun_io, &scratch, &conns);
            now = clock.now();
            alarm.wake_ups += 1;
            if n == 0 {
                continue;
            }
            let ready = |token: u64| events[..n].iter().any(|e| e.data() == token);
            if ready(ALARM) {
                // The top of the loop runs what is due.
                alarm.rang();
            }
            let (tun_ready, udp_ready, dns_ready, woken) = (ready(TUN), ready(UDP), ready(DNS), ready(WAKE));
            // The first packet from each source leaves before the source is
            // read again (if it is: see FollowUp), so a read that finds the
            // source empty is never on the packet's path.
            if tun_ready && self.drain_tun(&mut tun_io, &mut scratch.tun_read, 1, now)? > 0 {
                self.flush(&mut tun_io, &mut scratch.batch, &mut conns, now);
                follow.tun.read_more(|| {
                    self.read_flushing(&mut tun_io, &mut scratch, &mut conns, DRAIN_BATCH - 1, now, |engine, tun_io, scratch, _, limit| {
                        engine.drain_tun(tun_io, &mut scratch.tun_read, limit, now)
                    })
                })?;
            }
            if udp_ready {
                self.serve_udp(None, &mut tun_io, &mut scratch, &mut conns, &mut follow, now)?;
            }
            for event in &events[..n] {
                if let Some(slot) = event.data().checked_sub(CONNECTED) {
                    self.serve_udp(Some(slot as usize), &mut tun_io, &mut scratch, &mut conns, &mut follow, now)?;
                }
            }
            if dns_ready {
                self.drain_dns(&mut waiting, &mut scratch.dns_read);
            }
            if woken {
                let _ = inbox.wake.read();
                while let Ok(slow) = inbox.rx.try_recv() {
                    match self.handle_slow(slow, &mut waiting, &tun_io, &mut conns, &alarm, &clock) {
                        Some(stop) => break 'run stop,
                        None => continue,
                    }
                }
            }
            if dns_ready || woken {
                // These wake-ups can take long (a status, a key rotation's
                // fsync) and hand the node fresh instants of their own: the
                // next turn of the loop reads the clock again.
                now = clock.now();
            }
        };
        // Closing the timerfd takes it out of the epoll set: once it had
        // rung, leave()'s waits would otherwise return at once and spin.
        drop(alarm);
        self.leave(&mut tun_io, &mut scratch, &mut conns);
        Ok(Exit { down, tun: self.tun })
    }

    /// Once a second: connected sockets unused for long are closed, and
    /// the events derived from the peers' health and the certificate's
    /// expiry go out.
    #[inline(never)]
    fn watch(&mut self, conns: &mut ConnectedSockets, now: Instant) {
        conns.expire(now);
        self.hub.tick(self.node.peer_health(), now);
        if let Some(not_after) = self.cert_not_after {
            self.hub.certificate(not_after, unix_now());
        }
    }

    /// Hands the core's answers to the DNS and control requests waiting for
    /// them. This and the other request and
    /// rotation work below stay out of line: rare next to packets, and the
    /// loop's code stays compact (fewer cache lines and pages per wake-up).
    #[inline(never)]
    fn answer_requests(&mut self, waiting: &mut Waiting, now: Instant) {
        while let Some(answer) = self.node.poll_answer() {
            if let Some(reply) = waiting.answer(&mut self.node, answer, now) {
                self.send_dns(reply);
            }
        }
    }

    #[inline(never)]
    fn expire_requests(&mut self, waiting: &mut Waiting, now: Instant) {
        for reply in waiting.expire(now) {
            self.send_dns(reply);
        }
    }

    #[cold]
    #[inline(never)]
    fn scheduled_rotation(&mut self) {
        if let Err(e) = self.rotate() {
            tracing::error!(error = %format!("{e:#}"), "scheduled key rotation failed; retrying in an hour");
        }
        let fresh = self.wg_key.issued_unix + 60 >= unix_now();
        self.next_rotation = Some(Instant::now() + if fresh { self.rotation } else { Duration::from_secs(3600) });
    }

    /// `Some` to stop, with the `meshtun down` to answer if that was why.
    fn handle_slow(
        &mut self,
        slow: Slow,
        waiting: &mut Waiting,
        tun_io: &TunIo,
        conns: &mut ConnectedSockets,
        alarm: &Alarm,
        clock: &WakeClock,
    ) -> Option<Option<control::Pending>> {
        let now = Instant::now();
        match slow {
            Slow::Stop(signal) => {
                tracing::info!("{signal}: leaving the mesh");
                return Some(None);
            }
            Slow::Refresh => {
                self.node.set_local_endpoints(udp::local_endpoints(self.listen_port, &self.interface), now);
                let aliases = self.node.ipv4_aliases();
                if aliases != self.saved_aliases {
                    crate::state::save_ipv4_aliases(&self.aliases_file, &aliases);
                    self.saved_aliases = aliases;
                }
            }
            Slow::Metrics(request) => {
                let response = crate::metrics::node_response(&request.path, self.node.status(now), self.hub.counters(), self.started_unix);
                let _ = request.reply.send(response);
            }
            Slow::Control(pending) => match pending.request {
                Request::Status => {
                    let reply = match serde_json::to_value(self.node.status(now)) {
                        Ok(mut data) => {
                            data["role"] = "node".into();
                            data["interface"] = self.interface.clone().into();
                            data["listen_port"] = self.listen_port.into();
                            data["offload"] = serde_json::json!({
                                "tun": self.tun_offload,
                                "udp_gro": self.udp_gro,
                                "connected_sockets": conns.in_use(),
                                "counters": tun_io.stats,
                            });
                            data["engine"] = serde_json::json!({
                                "wake_ups": alarm.wake_ups,
                                "timer_sets": alarm.sets,
                                "timer_rings": alarm.rings,
                                "clock": clock.describe(),
                            });
                            control::ok_envelope(data)
                        }
                        Err(e) => control::error_envelope("internal", &format!("cannot encode the status: {e}"), None),
                    };
                    let _ = pending.reply.send(reply);
                }
                Request::Down => return Some(Some(pending)),
                Request::RotateKeys => {
                    let reply = match self.rotate() {
                        Ok(()) => control::ok_envelope(serde_json::json!({ "version": self.wg_key.version })),
                        Err(e) => control::error_envelope("io_error", &format!("{e:#}"), None),
                    };
                    if let Some(at) = self.next_rotation.as_mut() {
                        *at = Instant::now() + self.rotation;
                    }
                    let _ = pending.reply.send(reply);
                }
                Request::Set { hostname, capabilities, groups } => {
                    let status = self.node.status(now);
                    let hostname = hostname.or(status.hostname);
                    let capabilities = capabilities.unwrap_or(status.capabilities);
                    let groups = groups.unwrap_or(status.groups);
                    let invalid = hostname
                        .iter()
                        .chain(capabilities.iter())
                        .chain(groups.iter())
                        .find_map(|t| meshtun_proto::record::validate_hostname(t).err());
                    let reply = match invalid {
                        Some(e) => control::error_envelope("invalid_argument", &e, Some("names and tags are lowercase DNS labels: a-z, 0-9 and '-'")),
                        None => {
                            self.node.set_tags(hostname.clone(), capabilities.clone(), groups.clone(), now);
                            control::ok_envelope(serde_json::json!({ "hostname": hostname, "capabilities": capabilities, "groups": groups }))
                        }
                    };
                    let _ = pending.reply.send(reply);
                }
                _ => {
                    if let Some(unhandled) = waiting.control(&mut self.node, self.network, pending, now) {
                        let _ = unhandled.reply.send(control::error_envelope("bad_request", "not a node request", None));
                    }
                }
            },
        }
        None
    }

    /// A new WireGuard key: saved first (so a crash never loses it), then used.
    fn rotate(&mut self) -> anyhow::Result<()> {
        let next = self.state.rotate_wireguard_key(&self.wg_key)?;
        let expires = key_expiry(self.rotation, next.issued_unix);
        self.node.rotate_wg_key(next.secret.clone(), next.version, expires, Instant::now());
        self.wg_key = next;
        Ok(())
    }

    /// Flushes what a received datagram produced; when that wrote to the
    /// TUN, the local stack has often answered by the time the write
    /// returns (a ping, a TCP ACK), so one read of the TUN sends the answer
    /// on without a trip through epoll. Where the answers do not come (this
    /// end sent the request), the read is mostly skipped (see FollowUp).
    fn flush_and_answer(&mut self, tun_io: &mut TunIo, scratch: &mut Scratch, conns: &mut ConnectedSockets, answer: &mut FollowUp, now: Instant) -> anyhow::Result<()> {
        if self.flush(tun_io, &mut scratch.batch, conns, now) && answer.read_more(|| self.drain_tun(tun_io, &mut scratch.tun_read, 1, now))? > 0 {
            self.flush(tun_io, &mut scratch.batch, conns, now);
        }
        Ok(())
    }

    /// A readable UDP socket: the node's own (`slot` None) or a connected
    /// one. The first receive is flushed (and answered) before the rest.
    fn serve_udp(
        &mut self,
        slot: Option<usize>,
        tun_io: &mut TunIo,
        scratch: &mut Scratch,
        conns: &mut ConnectedSockets,
        follow: &mut FollowUps,
        now: Instant,
    ) -> anyhow::Result<()> {
        if drain_socket(&mut self.node, conns.socket(&self.socket, slot), tun_io, &mut scratch.udp_read, 1, now) == 0 {
            return Ok(());
        }
        conns.touch(slot, now);
        self.flush_and_answer(tun_io, scratch, conns, &mut follow.answer, now)?;
        // The socket's policy is copied out and back: reading borrows `conns`.
        let mut policy = *conns.follow_up(&mut follow.udp, slot);
        policy.read_more(|| {
            self.read_flushing(tun_io, scratch, conns, DRAIN_BATCH - 1, now, |engine, tun_io, scratch, conns, limit| {
                Ok(drain_socket(&mut engine.node, conns.socket(&engine.socket, slot), tun_io, &mut scratch.udp_read, limit, now))
            })
        })?;
        *conns.follow_up(&mut follow.udp, slot) = policy;
        Ok(())
    }

    /// Follow-up reads of one source, up to `limit`: `read` reads (at most
    /// the count it is given) until the source is empty or [`FLUSH_AT`]
    /// packets wait, and those are flushed before it reads on. How many
    /// reads found something.
    fn read_flushing(
        &mut self,
        tun_io: &mut TunIo,
        scratch: &mut Scratch,
        conns: &mut ConnectedSockets,
        limit: usize,
        now: Instant,
        mut read: impl FnMut(&mut Self, &mut TunIo, &mut Scratch, &ConnectedSockets, usize) -> anyhow::Result<usize>,
    ) -> anyhow::Result<usize> {
        let mut done = 0;
        while done < limit {
            let got = read(self, tun_io, scratch, conns, limit - done)?;
            done += got;
            if got == 0 || self.node.backlog() < FLUSH_AT {
                break;
            }
            self.flush(tun_io, &mut scratch.batch, conns, now);
        }
        Ok(done)
    }

    /// Reads what the TUN holds, up to `limit` reads, stopping early once
    /// [`FLUSH_AT`] packets wait to be flushed; how many reads it made.
    fn drain_tun(&mut self, tun_io: &mut TunIo, buf: &mut [u8], limit: usize, now: Instant) -> anyhow::Result<usize> {
        let mut read = 0;
        for _ in 0..limit {
            match tun_read(self.tun.as_raw_fd(), buf) {
                Ok(n) => {
                    read += 1;
                    tun_io.handle_read(&mut self.node, &mut buf[..n], now);
                    if self.node.backlog() >= FLUSH_AT {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("reading from the TUN interface failed"),
            }
        }
        Ok(read)
    }

    #[inline(never)]
    fn drain_dns(&mut self, waiting: &mut Waiting, buf: &mut [u8]) {
        let Some(dns) = &self.dns else { return };
        for _ in 0..DRAIN_BATCH {
            match dns.recv_from(buf) {
                Ok((n, from)) => {
                    if let Some(reply) = waiting.dns(&mut self.node, self.network, from, &buf[..n], &self.dns_domain, Instant::now()) {
                        self.send_dns(reply);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => tracing::debug!(error = %e, "DNS receive error"),
            }
        }
    }

    fn send_dns(&self, reply: DnsReply) {
        if let Some(dns) = &self.dns {
            // A full socket drops the reply; the resolver asks again.
            if let Err(e) = dns.send_to(&reply.bytes, reply.to) {
                tracing::debug!(to = %reply.to, error = %e, "DNS reply failed");
            }
        }
    }

    /// Sends what the core produced: datagrams DRAIN_BATCH at a time in one
    /// sendmmsg(2), then the TUN's packets, then the events. Whether it
    /// wrote to the TUN.
    fn flush(&mut self, tun_io: &mut TunIo, batch: &mut Vec<meshtun_overlay::Transmit>, conns: &mut ConnectedSockets, now: Instant) -> bool {
        // The loop's own flush, on the way to sleep after a packet, mostly
        // finds nothing: even so, the queues below are cold lines to touch.
        if self.node.backlog() == 0 && !self.node.has_events() && tun_io.blocked.is_empty() {
            return false;
        }
        // The core's next deadline, worked out now while the lines behind it
        // are warm: the send below runs the receiving end's network stack
        // (and often the woken end) on this CPU, after which the loop would
        // find them cold on its way to sleep. The core keeps it until a
        // packet or timer changes something (bench/README.md, eighth round).
        self.node.poll_timeout();
        loop {
            batch.clear();
            while batch.len() < DRAIN_BATCH {
                match self.node.poll_transmit() {
                    Some(t) => batch.push(t),
                    None => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            let mut start = 0;
            // Runs to one destination leave together, on its connected
            // socket when it has one.
            while start < batch.len() {
                let dst = batch[start].dst;
                let end = batch[start..].iter().position(|t| t.dst != dst).map_or(batch.len(), |n| start + n);
                let slot = conns.slot_for(&self.socket, dst, &batch[start].payload, now);
                let socket = conns.socket(&self.socket, slot);
                let mut run = &batch[start..end];
                // The kernel sends a UDP GSO batch without DF, so a narrow
                // link beyond the first hop fragments it silently and the
                // path MTU is never learnt. Now and then the first datagram
                // of a batch, when none is larger (a full-size one, not an
                // ACK before the data), goes alone, with DF: if it does not fit, the
                // link answers with ICMP, the kernel learns the MTU and
                // refuses the next batch, and TCP is cut to fit.
                if run.len() > 1 && now >= self.next_df_probe && run.iter().all(|t| t.payload.len() <= run[0].payload.len()) {
                    self.next_df_probe = now + DF_PROBE_INTERVAL;
                    send_all(socket, &run[..1]);
                    run = &run[1..];
                }
                if let Some(refused) = send_all(socket, run) {
                    self.learn_path_mtu(dst, refused, now);
                }
                // A lone datagram goes with DF: one that did not fit taught
                // the kernel the path MTU, and it fragments the next ones
                // silently, never refusing them as it refuses a batch.
                if let [lone] = run {
                    if lone.payload.len() > LONE_DATAGRAM_CHECK_ABOVE && now >= self.next_lone_datagram_check {
                        self.check_lone_datagram_path(dst, lone.payload.len(), now);
                    }
                }
                start = end;
            }
            for sent in batch.drain(..) {
                self.node.recycle(sent.payload);
            }
        }
        let wrote = tun_io.write_all(&mut self.node, &self.tun);
        if self.node.has_events() {
            self.publish_events(now);
        }
        wrote
    }

    /// `dst` refused datagrams of `refused` bytes as larger than its path
    /// MTU (they went fragmented): the kernel's path MTU for it goes to the
    /// node, which then sizes TCP segments toward it to fit (see
    /// `max_packet_toward`). The kernel is asked only when the MTU the node
    /// believes does not explain the refusal (nothing known yet, or the path
    /// narrowed again), and at most every PATH_MTU_RETRY per destination
    /// when its answer did not explain it either.
    #[cold]
    #[inline(never)]
    fn learn_path_mtu(&mut self, dst: std::net::SocketAddr, refused: usize, now: Instant) {
        if self.path_mtu_asked.get(&dst).is_some_and(|&at| now < at + PATH_MTU_RETRY) {
            return;
        }
        match self.path_mtu_explains(dst, refused, now) {
            // Full-size packets that are not cut (UDP, ICMP) are expected
            // toward a path already known.
            Ok(true) => {
                self.path_mtu_asked.remove(&dst);
                return;
            }
            Ok(false) => tracing::debug!(%dst, refused, "datagrams refused, but not for the path MTU"),
            Err(e) => tracing::debug!(%dst, error = %e, "could not read the path MTU; datagrams to it stay fragmented"),
        }
        if self.path_mtu_asked.len() >= MAX_PATH_MTU_ASKED {
            self.path_mtu_asked.retain(|_, at| now < *at + PATH_MTU_RETRY);
        }
        if self.path_mtu_asked.len() < MAX_PATH_MTU_ASKED {
            self.path_mtu_asked.insert(dst, now);
        }
    }

    /// A lone datagram of `len` bytes went to `dst`: if the kernel's path
    /// MTU for it (learnt from ICMP, or its own link's) says it was
    /// fragmented, the node learns the path, as from a refused batch. At
    /// most once per DF_PROBE_INTERVAL.
    #[cold]
    #[inline(never)]
    fn check_lone_datagram_path(&mut self, dst: std::net::SocketAddr, len: usize, now: Instant) {
        self.next_lone_datagram_check = now + DF_PROBE_INTERVAL;
        if let Err(e) = self.path_mtu_explains(dst, len, now) {
            tracing::debug!(%dst, error = %e, "could not read the path MTU");
        }
    }

    /// Whether the path MTU explains a datagram of `len` bytes to `dst` not
    /// fitting: the one the node already believes, else the kernel's, which
    /// the node then learns.
    fn path_mtu_explains(&mut self, dst: std::net::SocketAddr, len: usize, now: Instant) -> std::io::Result<bool> {
        let needs = meshtun_overlay::path_mtu::udp_ip_header_len(dst) + len;
        if self.node.path_mtu(dst, now).is_some_and(|known| needs > known) {
            return Ok(true);
        }
        let mtu = udp::path_mtu(dst)?;
        if mtu < needs {
            self.node.handle_path_mtu(dst, mtu, now);
        }
        Ok(mtu < needs)
    }

    /// Out of line: events are rare next to packets, and the packet path
    /// stays shorter (and warmer in the instruction cache) without them.
    #[inline(never)]
    fn publish_events(&mut self, now: Instant) {
        while let Some(event) = self.node.poll_event() {
            crate::events::log(&event);
            self.hub.core_event(&event, now);
        }
    }

    /// Deregisters from the backbones, waiting at most DEREGISTER_GRACE for
    /// their confirmation, and saves what must outlive the process.
    #[cold]
    #[inline(never)]
    fn leave(&mut self, tun_io: &mut TunIo, scratch: &mut Scratch, conns: &mut ConnectedSockets) {
        self.node.shutdown(Instant::now());
        let give_up = Instant::now() + DEREGISTER_GRACE;
        let mut events = [EpollEvent::empty(); 8];
        while !self.node.is_deregistered() && Instant::now() < give_up {
            self.flush(tun_io, &mut scratch.batch, conns, Instant::now());
            let _ = conns.epoll.wait(&mut events, epoll_timeout(give_up.saturating_duration_since(Instant::now())));
            let now = Instant::now();
            drain_socket(&mut self.node, &self.socket, tun_io, &mut scratch.udp_read, DRAIN_BATCH, now);
            for c in conns.slots.iter().flatten() {
                drain_socket(&mut self.node, &c.socket, tun_io, &mut scratch.udp_read, DRAIN_BATCH, now);
            }
            let _ = self.drain_tun(tun_io, &mut scratch.tun_read, DRAIN_BATCH, now);
        }
        if !self.node.is_deregistered() {
            tracing::warn!("not every backbone confirmed deregistration; it forgets this node when the record expires");
        }
        let aliases = self.node.ipv4_aliases();
        if aliases != self.saved_aliases {
            crate::state::save_ipv4_aliases(&self.aliases_file, &aliases);
        }
    }
}

/// Receives what `socket` holds, up to `limit` receives, stopping early once
/// [`FLUSH_AT`] packets wait to be flushed; how many came.
fn drain_socket(node: &mut Node, socket: &EngineSocket, tun_io: &mut TunIo, buf: &mut [u8], limit: usize, now: Instant) -> usize {
    let mut received = 0;
    for _ in 0..limit {
        match socket.recv_now(buf) {
            Ok(r) => {
                received += 1;
                tun_io.stats.count_udp(&r);
                r.datagrams(buf).for_each(|d| node.handle_udp(r.from, d, now));
                if node.backlog() >= FLUSH_AT {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            // ICMP port unreachable surfaces as ECONNREFUSED on the next
            // read; it is not fatal for a connectionless socket.
            Err(e) => tracing::trace!(error = %e, "UDP receive error"),
        }
    }
    received
}

/// One run out, waiting (bounded) for room when the socket is full.
/// The size of datagrams the destination refused as larger than its path
/// MTU, if it did.
fn send_all(socket: &EngineSocket, run: &[meshtun_overlay::Transmit]) -> Option<usize> {
    let mut rest = run;
    let mut too_big = None;
    while !rest.is_empty() {
        match socket.send_batch(rest) {
            Ok(sent) => {
                rest = &rest[sent.datagrams..];
                too_big = too_big.or(sent.too_big.map(|(_, size)| size));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !socket.wait_writable(SEND_STALL) {
                    tracing::debug!(dropped = rest.len(), "UDP socket stayed full; dropping the rest of a batch");
                    return too_big;
                }
            }
            Err(e) => {
                tracing::trace!(error = %e, "UDP send failed");
                return too_big;
            }
        }
    }
    too_big
}

/// One read of the TUN (a packet, with offload a super-packet, behind its
/// virtio-net header). Straight on the descriptor: the `tun` crate's
/// `recv`/`send` zero a 1.5 KB stack buffer on every call, also for the
/// read that finds nothing, which cost more than the read on the path of a
/// ping.
fn tun_read(fd: std::os::fd::RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes for the call.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// One write to the TUN: see [`tun_read`].
fn tun_write(fd: std::os::fd::RawFd, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: buf is valid for reads of buf.len() bytes for the call.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// When a key issued at `issued` expires: two rotations later, or never.
pub fn key_expiry(rotation: Duration, issued: u64) -> u64 {
    if rotation.is_zero() { meshtun_proto::record::NO_EXPIRY } else { issued + 2 * rotation.as_secs() }
}

/// The engine's timer: a timerfd in the epoll set, so `epoll_wait` sleeps
/// without a timeout. A timeout arms and cancels a kernel timer on every
/// sleep (half of the wake-ups in request-response traffic), and that put
/// 1.5-2 us on every sleep of this VM; the timerfd is set again only
/// when a deadline comes earlier than the one it holds. A later deadline
/// leaves it: it rings early, the loop finds nothing due and sets it anew.
struct Alarm {
    fd: TimerFd,
    /// When it rings, if it is set.
    set_for: Option<Instant>,
    /// For `status` (`engine`): epoll_wait returns, how often the timer
    /// was set and how often it rang.
    wake_ups: u64,
    sets: u64,
    rings: u64,
}

impl Alarm {
    fn new() -> nix::Result<Alarm> {
        let fd = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC)?;
        Ok(Alarm { fd, set_for: None, wake_ups: 0, sets: 0, rings: 0 })
    }

    /// Makes sure it rings by `deadline` (a moment after it, never before).
    fn arm(&mut self, deadline: Instant, now: Instant) -> anyhow::Result<()> {
        if self.set_for.is_some_and(|at| at <= deadline) {
            return Ok(());
        }
        // At least 1 us: a zero timer would disarm the timerfd.
        let wait = deadline.saturating_duration_since(now).max(Duration::from_micros(1));
        self.fd
            .set(Expiration::OneShot(TimeSpec::from_duration(wait)), TimerSetTimeFlags::empty())
            .context("cannot set the engine's timer (timerfd_settime)")?;
        self.set_for = Some(deadline);
        self.sets += 1;
        Ok(())
    }

    /// It rang: takes the expiry off the timerfd (level-triggered, it would
    /// wake every epoll_wait) and forgets the deadline.
    fn rang(&mut self) {
        let mut count = [0u8; 8];
        let _ = nix::unistd::read(&self.fd, &mut count);
        self.set_for = None;
        self.rings += 1;
    }
}

/// epoll's timeout is in milliseconds: round up, so a timer is never woken
/// for early and spun on.
fn epoll_timeout(wait: Duration) -> EpollTimeout {
    let ms = wait.as_nanos().div_ceil(1_000_000).min(60_000) as u16;
    EpollTimeout::from(ms)
}

/// Seconds since the Unix epoch (0 for a clock set before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// What the offloads did, for `meshtun status` (and the tests that check
/// they are in use).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct OffloadStats {
    tun_super_packets_read: u64,
    tun_segments_split: u64,
    /// TUN reads toward a peer whose path is narrower than the mesh MTU;
    /// those whose TCP was cut to fit it, and the packets they became.
    narrow_path_reads: u64,
    narrow_path_cut_reads: u64,
    narrow_path_cut_packets: u64,
    tun_super_packets_written: u64,
    udp_gro_receives: u64,
    udp_gro_datagrams: u64,
    /// Writes the TUN refused (each may hold many segments).
    tun_write_errors: u64,
}

impl OffloadStats {
    fn count_udp(&mut self, r: &udp::Received) {
        if r.len > r.segment {
            self.udp_gro_receives += 1;
            self.udp_gro_datagrams += r.len.div_ceil(r.segment.max(1)) as u64;
        }
    }
}

/// The TUN side of the engine: every read and write carries a virtio-net
/// header; with offload on, reads may be TCP super-packets to split and
/// writes coalesce segments of one flow. Buffers are reused.
struct TunIo {
    offload: bool,
    stats: OffloadStats,
    coalescer: offload::Coalescer,
    split_scratch: Vec<u8>,
    single: Vec<u8>,
    blocked: Vec<Vec<u8>>,
}

impl TunIo {
    fn new(offload: bool) -> TunIo {
        TunIo {
            offload,
            stats: OffloadStats::default(),
            coalescer: offload::Coalescer::new(),
            split_scratch: Vec::with_capacity(meshtun_overlay::MAX_PACKET),
            single: Vec::with_capacity(offload::MAX_READ),
            blocked: Vec::new(),
        }
    }

    fn handle_read(&mut self, node: &mut Node, read: &mut [u8], now: Instant) {
        let max_packet = read.get(offload::VNET_HDR_LEN..).and_then(|packet| node.max_packet_toward(packet, now));
        if max_packet.is_some() {
            self.stats.narrow_path_reads += 1;
        }
        // What is still larger than the path after the split was not TCP
        // the split may cut: its sender is told the path's size.
        let limit = max_packet.unwrap_or(usize::MAX);
        let each = |packet: &[u8]| {
            if packet.len() > limit {
                node.handle_tun_packet_beyond_path(packet, limit, now);
            } else {
                node.handle_tun_packet(packet, now);
            }
        };
        match offload::split(read, max_packet, &mut self.split_scratch, each) {
            Ok(offload::Split { packets: 1, .. }) => {}
            Ok(split) => {
                self.stats.tun_super_packets_read += 1;
                self.stats.tun_segments_split += split.packets as u64;
                if split.cut {
                    self.stats.narrow_path_cut_reads += 1;
                    self.stats.narrow_path_cut_packets += split.packets as u64;
                }
            }
            Err(e) => {
                tracing::trace!(error = %e, len = read.len(), "dropping a TUN read");
                node.handle_malformed_tun_read();
            }
        }
    }

    /// Writes what the node has for the TUN; what the device will not take
    /// now is written once it has room (bounded wait). Whether any went.
    fn write_all(&mut self, node: &mut Node, device: &tun::Device) -> bool {
        let blocked = &mut self.blocked;
        let stats = &mut self.stats;
        let mut wrote = false;
        let fd = device.as_raw_fd();
        let mut write = |buf: &[u8]| match tun_write(fd, buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => blocked.push(buf.to_vec()),
            Err(e) => {
                stats.tun_write_errors += 1;
                tracing::trace!(error = %e, len = buf.len(), "TUN write failed");
            }
            Ok(_) => {
                wrote = true;
                if offload::VnetHdr::parse(buf).is_some_and(|h| h.gso_size != 0) {
                    stats.tun_super_packets_written += 1;
                }
            }
        };
        while let Some(packet) = node.poll_tun() {
            if self.offload {
                self.coalescer.push(&packet, &mut write);
            } else {
                self.single.clear();
                self.single.extend_from_slice(&[0; offload::VNET_HDR_LEN]);
                self.single.extend_from_slice(&packet);
                write(&self.single);
            }
            node.recycle(packet);
        }
        self.coalescer.finish(&mut write);
        if !self.blocked.is_empty() {
            wrote |= self.retry_blocked(fd);
        }
        wrote
    }

    /// Writes what the TUN refused while full, waiting (bounded) for room.
    /// Whether any went.
    #[cold]
    #[inline(never)]
    fn retry_blocked(&mut self, fd: std::os::fd::RawFd) -> bool {
        let mut wrote = false;
        for buf in self.blocked.drain(..) {
            loop {
                match tun_write(fd, &buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if udp::wait_writable(fd, SEND_STALL) {
                            continue;
                        }
                        tracing::debug!("TUN stayed full; dropping a packet");
                    }
                    Err(e) => {
                        self.stats.tun_write_errors += 1;
                        tracing::trace!(error = %e, "TUN write failed");
                    }
                    Ok(_) => wrote = true,
                }
                break;
            }
        }
        wrote
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoll_timeouts_round_up_to_whole_milliseconds_and_are_capped() {
        assert_eq!(epoll_timeout(Duration::from_micros(1)), EpollTimeout::from(1u16));
        assert_eq!(epoll_timeout(Duration::from_micros(1000)), EpollTimeout::from(1u16));
        assert_eq!(epoll_timeout(Duration::from_micros(1001)), EpollTimeout::from(2u16));
        assert_eq!(epoll_timeout(Duration::from_secs(3600)), EpollTimeout::from(60_000u16));
    }

    #[test]
    fn the_alarm_is_set_again_only_for_a_deadline_earlier_than_the_one_it_holds() {
        let mut alarm = Alarm::new().unwrap();
        let now = Instant::now();
        alarm.arm(now + Duration::from_secs(10), now).unwrap();
        alarm.arm(now + Duration::from_secs(20), now).unwrap();
        alarm.arm(now + Duration::from_secs(10), now).unwrap();
        assert_eq!(alarm.sets, 1, "a later or equal deadline leaves it");
        alarm.arm(now + Duration::from_secs(5), now).unwrap();
        assert_eq!((alarm.sets, alarm.set_for), (2, Some(now + Duration::from_secs(5))));
    }

    #[test]
    fn a_ringing_alarm_makes_epoll_ready_until_it_is_taken_off() {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
        let mut alarm = Alarm::new().unwrap();
        epoll.add(alarm.fd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, ALARM)).unwrap();
        let mut events = [EpollEvent::empty(); 2];
        let now = Instant::now();
        alarm.arm(now + Duration::from_millis(1), now).unwrap();
        // Generous: only that it rings at all is checked, not when.
        assert_eq!(epoll.wait(&mut events, EpollTimeout::from(10_000u16)).unwrap(), 1);
        assert_eq!(events[0].data(), ALARM);
        assert!(Instant::now() >= now + Duration::from_millis(1), "never before its deadline");
        alarm.rang();
        assert_eq!((alarm.set_for, alarm.rings), (None, 1));
        assert_eq!(epoll.wait(&mut events, EpollTimeout::ZERO).unwrap(), 0, "taken off, it no longer wakes epoll");
        // Once rung, any deadline sets it again.
        alarm.arm(now + Duration::from_secs(60), Instant::now()).unwrap();
        assert_eq!(alarm.sets, 2);
    }

    #[test]
    fn a_follow_up_read_that_finds_nothing_is_then_tried_once_in_eight_times() {
        let mut follow = FollowUp::default();
        let tried = (0..64).filter(|_| follow.worth_trying()).count();
        assert_eq!(tried, 64 / FOLLOW_UP_PROBE as usize);
        // The probe finds traffic picking up: from then on, every time.
        while !follow.worth_trying() {}
        follow.found(true);
        assert!((0..10).all(|_| follow.worth_trying()));
        // Until one finds nothing again.
        follow.found(false);
        assert!(!follow.worth_trying());
    }

    #[test]
    fn every_queued_message_wakes_the_engine_and_waits_in_order() {
        let (handle, inbox) = channel().unwrap();
        assert!(handle.send(Slow::Refresh));
        assert!(handle.send(Slow::Stop("SIGTERM")));
        assert_eq!(inbox.wake.read().unwrap(), 2, "one wake-up per queued message");
        let queued: Vec<_> = inbox.rx.try_iter().collect();
        assert!(matches!(queued.as_slice(), [Slow::Refresh, Slow::Stop("SIGTERM")]));
    }

    #[test]
    fn a_handle_reports_an_engine_that_is_gone() {
        let (handle, inbox) = channel().unwrap();
        drop(inbox);
        assert!(!handle.send(Slow::Refresh));
    }
}
