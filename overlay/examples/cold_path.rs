//! What one packet costs the node's core with cold caches, against bare
//! boringtun in the same run. A ping 10 ms apart wakes each tunnel end from
//! idle, with caches and TLBs taken by whatever ran in between; this times
//! the core's share of that: an echo request through `handle_tun_packet` +
//! `poll_transmit` at one node and `handle_udp` + `poll_tun` at the other,
//! each after evicting the caches, against `Tunn::encapsulate` /
//! `decapsulate` on the same packet.
//!
//!     cargo run --release -p meshtun-overlay --example cold_path [rounds] [--cold-only]
//!
//! meshtun's operations run twice a round: as they are, and with
//! `Node::prefetch_packet_path` before each (then a 2 us wait standing in
//! for the read's system call, as in the daemon), rows marked "pf".
//!
//! Prints the median and quartiles in microseconds, cold and warm. Not a
//! test: the figures are for comparing builds and designs on one machine.

#[path = "../tests/netsim/mod.rs"]
mod netsim;

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use meshtun_overlay::{Node, Transmit};
use netsim::{echo_request, Net};

/// Larger than this machine's last-level cache and its TLBs' reach.
const EVICT_BYTES: usize = 64 << 20;

struct Evictor {
    memory: Vec<u8>,
    round: u8,
}

impl Evictor {
    fn evict(&mut self) {
        self.round = self.round.wrapping_add(1);
        for line in self.memory.chunks_mut(64) {
            line[0] = self.round;
        }
        black_box(&self.memory);
    }
}

#[derive(Default)]
struct Samples(Vec<Duration>);

impl Samples {
    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.0.push(start.elapsed());
        out
    }

    fn summary(&mut self) -> (f64, f64, f64) {
        self.0.sort();
        let at = |q: f64| quantile(&self.0, q).as_secs_f64() * 1e6;
        (at(0.25), at(0.5), at(0.75))
    }
}

/// The `q` quantile of sorted, non-empty `values`.
fn quantile<T: Copy>(values: &[T], q: f64) -> T {
    values[((values.len() - 1) as f64 * q) as usize]
}

/// About what the system call that reads a datagram or a TUN packet
/// takes on this machine: the time a prefetch has before the packet.
const READ_SYSCALL: Duration = Duration::from_micros(2);

/// What a wake-up does before the core sees the packet: the caches are
/// cold (when evicting), the driver asks the node to prefetch (when told
/// to), and the read takes its time.
fn wake_up(evictor: Option<&mut Evictor>, prefetch: Option<&Node>) {
    if let Some(e) = evictor {
        e.evict();
    }
    if let Some(node) = prefetch {
        node.prefetch_packet_path();
        let start = Instant::now();
        while start.elapsed() < READ_SYSCALL {
            std::hint::spin_loop();
        }
    }
}

/// Two nodes of the simulator with a direct session between them.
fn meshtun_pair() -> Net {
    let mut net = Net::new(7);
    let a = net.add_host(0, None);
    let b = net.add_host(1, None);
    net.ping(a, b, Duration::from_secs(10)).expect("the simulated nodes reach each other");
    net.ping(b, a, Duration::from_secs(10)).expect("the simulated nodes reach each other");
    net.run_for(Duration::from_secs(3));
    net
}

/// Two bare boringtun tunnels with a session between them.
fn boringtun_pair() -> (Tunn, Tunn) {
    let (sa, sb) = (StaticSecret::from([1; 32]), StaticSecret::from([2; 32]));
    let (pa, pb) = (PublicKey::from(&sa), PublicKey::from(&sb));
    let mut a = Tunn::new(sa, pb, None, None, 1, None);
    let mut b = Tunn::new(sb, pa, None, None, 2, None);
    let (mut x, mut y) = (vec![0u8; 2048], vec![0u8; 2048]);
    let init = match a.format_handshake_initiation(&mut x, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no handshake initiation"),
    };
    let response = match b.decapsulate(None, &init, &mut y) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no handshake response"),
    };
    if let TunnResult::WriteToNetwork(p) = a.decapsulate(None, &response, &mut x) {
        let keepalive = p.to_vec();
        let _ = b.decapsulate(None, &keepalive, &mut y);
    }
    (a, b)
}

// One operation each, out of line so that a profiler can single them out
// (`valgrind --tool=callgrind --collect-atstart=no --toggle-collect='cold_path::op_*'
// --cache-sim=yes` counts the cache lines each touches).

#[inline(never)]
fn op_meshtun_send(node: &mut Node, packet: &[u8], now: Instant) -> Option<Transmit> {
    node.handle_tun_packet(packet, now);
    node.poll_transmit()
}

#[inline(never)]
fn op_meshtun_receive(node: &mut Node, from: SocketAddr, datagram: &[u8], now: Instant) -> Option<Vec<u8>> {
    node.handle_udp(from, datagram, now);
    node.poll_tun()
}

#[inline(never)]
fn op_boringtun_send(tunn: &mut Tunn, packet: &[u8], out: &mut [u8]) -> usize {
    match tunn.encapsulate(packet, out) {
        TunnResult::WriteToNetwork(p) => p.len(),
        _ => 0,
    }
}

#[inline(never)]
fn op_boringtun_receive(tunn: &mut Tunn, datagram: &[u8], out: &mut [u8]) -> usize {
    match tunn.decapsulate(None, datagram, out) {
        TunnResult::WriteToTunnelV6(p, _) => p.len(),
        _ => 0,
    }
}

/// Both tunnels, ready to carry the echo request.
struct Pairs {
    net: Net,
    now: Instant,
    a_addr: SocketAddr,
    packet: Vec<u8>,
    bt_a: Tunn,
    bt_b: Tunn,
    out: Vec<u8>,
    inner: Vec<u8>,
}

impl Pairs {
    /// The operations once, each timed into `samples` (after evicting the
    /// caches when given an evictor): meshtun's, meshtun's again with the
    /// node's prefetch before each, then boringtun's.
    fn pass(&mut self, samples: &mut [Samples; ROWS], mut evictor: Option<&mut Evictor>) {
        for (prefetch, rows) in [(false, 0), (true, 4)] {
            self.now += Duration::from_millis(10);
            let (now, packet, a_addr) = (self.now, &self.packet, self.a_addr);
            let (ha, hb) = self.net.hosts.split_at_mut(1);
            let (na, nb) = (&mut ha[0].node, &mut hb[0].node);

            wake_up(evictor.as_deref_mut(), prefetch.then_some(&*na));
            let datagram = samples[rows].time(|| op_meshtun_send(na, packet, now));
            let datagram = datagram.expect("the node sends the echo request");
            wake_up(evictor.as_deref_mut(), prefetch.then_some(&*nb));
            let delivered = samples[rows + 1].time(|| op_meshtun_receive(nb, a_addr, &datagram.payload, now));
            assert_eq!(delivered.as_deref(), Some(&packet[..]), "the peer delivers the echo request");
            na.recycle(datagram.payload);
            nb.recycle(delivered.unwrap_or_default());
            while na.poll_transmit().is_some() || nb.poll_transmit().is_some() {}
        }

        let (bt_a, bt_b, out, inner) = (&mut self.bt_a, &mut self.bt_b, &mut self.out, &mut self.inner);
        wake_up(evictor.as_deref_mut(), None);
        let sent = samples[2].time(|| op_boringtun_send(bt_a, &self.packet, out));
        assert!(sent > 0, "boringtun encapsulates");
        wake_up(evictor, None);
        let got = samples[3].time(|| op_boringtun_receive(bt_b, &out[..sent], inner));
        assert_eq!(got, self.packet.len(), "boringtun decapsulates");
    }
}

/// Rows of samples: meshtun send and receive, boringtun's, and meshtun's
/// with the prefetch.
const ROWS: usize = 6;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(500).max(1);
    // For a profiler counting cache misses: no warm rounds to dilute them.
    let cold_only = args.iter().any(|a| a == "--cold-only");
    let mut evictor = Evictor { memory: vec![0; EVICT_BYTES], round: 0 };

    let net = meshtun_pair();
    let packet = echo_request(net.mesh_ip(0), net.mesh_ip(1), 1, &[0x5a; 56]);
    let (bt_a, bt_b) = boringtun_pair();
    let mut pairs =
        Pairs { now: net.now, a_addr: net.hosts[0].internal, net, packet, bt_a, bt_b, out: vec![0; 2048], inner: vec![0; 2048] };

    let names = ["meshtun send", "meshtun receive", "boringtun send", "boringtun receive", "meshtun send, pf", "meshtun receive, pf"];
    let mut cold: [Samples; ROWS] = Default::default();
    let mut warm: [Samples; ROWS] = Default::default();
    let mut untimed: [Samples; ROWS] = Default::default();
    // Cold: caches evicted before each operation. Warm: the operation again
    // right after itself.
    for _ in 0..rounds {
        pairs.pass(&mut cold, Some(&mut evictor));
        if !cold_only {
            pairs.pass(&mut untimed, None);
            pairs.pass(&mut warm, None);
        }
    }

    // Paired by round: both tunnels' operations of one round met the same
    // machine, so their ratio is steadier than either figure alone.
    let paired_ratios = |x: usize, y: usize| {
        let mut ratios: Vec<f64> = (0..rounds)
            .map(|r| {
                let sum = |a: usize, b: usize| (cold[a].0[r] + cold[b].0[r]).as_secs_f64();
                sum(x, x + 1) / sum(y, y + 1)
            })
            .collect();
        ratios.sort_by(f64::total_cmp);
        ratios
    };
    // Before the summaries below sort each row's samples.
    let paired = [
        ("meshtun over boringtun, send + receive with cold caches", paired_ratios(0, 2)),
        ("meshtun with prefetch over without", paired_ratios(4, 0)),
    ];
    println!("one {}-byte echo request, {rounds} rounds (us: quartile / median / quartile)", pairs.packet.len());
    println!("{:<20} {:>24} {:>24}", "", "cold caches", "warm");
    for (i, name) in names.iter().enumerate() {
        let (c1, c2, c3) = cold[i].summary();
        let (w1, w2, w3) = if cold_only { (0.0, 0.0, 0.0) } else { warm[i].summary() };
        println!("{name:<20} {c1:>7.2} / {c2:>6.2} / {c3:>6.2} {w1:>7.2} / {w2:>6.2} / {w3:>6.2}");
    }
    for (label, ratios) in paired {
        println!(
            "{label}, paired by round: median {:.3} (quartiles {:.3}-{:.3})",
            quantile(&ratios, 0.5),
            quantile(&ratios, 0.25),
            quantile(&ratios, 0.75)
        );
    }
}
