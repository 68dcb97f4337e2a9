//! What the driver learnt about paths narrower than the mesh MTU, sans IO.
//!
//! The mesh MTU (1420) makes full-size packets leave as 1480-byte datagrams
//! over IPv4. On a path with a smaller link the kernel learns the path MTU
//! from ICMP and then fragments every such datagram: that works, but costs
//! two datagrams and a system call each (UDP GSO is refused), and some
//! middleboxes drop fragments. The driver reports the path MTU the kernel
//! learnt for a destination ([`PathMtus::learn`]) and asks, per TCP packet
//! read from the TUN, how large an inner packet fits that destination's path
//! ([`inner_limit`]): it then cuts TCP segments that size, which TCP
//! receivers take like any other, and nothing is fragmented.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long a learnt path MTU is believed: the kernel's own default
/// (`net.ipv4.route.mtu_expires`, 600 s). After that full-size datagrams go
/// again; if the path is still narrow, the kernel refuses them again and
/// the driver reports it again.
pub const PATH_MTU_TTL: Duration = Duration::from_secs(600);

/// Destinations remembered at most (only narrow paths are): a flood of
/// distinct destinations cannot grow the table without bound.
pub const MAX_REMEMBERED: usize = 4096;

/// Bytes a datagram carries besides the inner packet: WireGuard's data
/// header (16) and tag (16). boringtun does not pad.
const WIREGUARD: usize = 16 + 16;

/// The smallest path MTU believed: IPv4's minimum (RFC 791). A smaller
/// report is a bug or a forgery, and cutting packets to it would cost more
/// than fragmenting.
pub const MIN_PATH_MTU: usize = 576;

/// Path MTUs below the mesh MTU, by the UDP destination they were learnt for.
#[derive(Debug, Default)]
pub struct PathMtus {
    known: HashMap<SocketAddr, Learnt>,
}

#[derive(Clone, Copy, Debug)]
struct Learnt {
    mtu: u16,
    until: Instant,
}

impl PathMtus {
    /// Remembers that IP packets to `dst` may be at most `mtu` bytes.
    /// Reports below [`MIN_PATH_MTU`] are ignored.
    pub fn learn(&mut self, dst: SocketAddr, mtu: usize, now: Instant) {
        if mtu < MIN_PATH_MTU {
            return;
        }
        if self.known.len() >= MAX_REMEMBERED && !self.known.contains_key(&dst) {
            self.known.retain(|_, l| l.until > now);
            if self.known.len() >= MAX_REMEMBERED {
                return;
            }
        }
        let mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
        self.known.insert(dst, Learnt { mtu, until: now + PATH_MTU_TTL });
    }

    /// The path MTU toward `dst`, while it is believed.
    pub fn get(&self, dst: SocketAddr, now: Instant) -> Option<usize> {
        self.known.get(&dst).filter(|l| l.until > now).map(|l| usize::from(l.mtu))
    }

    /// Whether nothing is known: the common case, checked first per packet.
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// Forgets what expired.
    pub fn expire(&mut self, now: Instant) {
        self.known.retain(|_, l| l.until > now);
    }
}

/// The largest inner packet that fits, unfragmented, a path that carries IP
/// packets of `mtu` bytes to `dst`, with `framing` more bytes per datagram
/// (a relay's header).
pub fn inner_limit(mtu: usize, dst: SocketAddr, framing: usize) -> usize {
    mtu.saturating_sub(udp_ip_header_len(dst) + WIREGUARD + framing)
}

/// IP and UDP header bytes in front of a datagram to `dst` (an IPv4-mapped
/// IPv6 address goes as IPv4).
pub fn udp_ip_header_len(dst: SocketAddr) -> usize {
    match dst {
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_none() => 40 + 8,
        _ => 20 + 8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_learnt_mtu_holds_for_its_destination_until_it_expires() {
        let now = Instant::now();
        let mut mtus = PathMtus::default();
        mtus.learn(addr("198.18.0.2:51820"), 1280, now);
        assert_eq!(mtus.get(addr("198.18.0.2:51820"), now), Some(1280));
        assert_eq!(mtus.get(addr("198.18.0.2:51821"), now), None);
        assert_eq!(mtus.get(addr("198.18.0.2:51820"), now + PATH_MTU_TTL), None);
        mtus.expire(now + PATH_MTU_TTL);
        assert!(mtus.is_empty());
    }

    #[test]
    fn a_report_below_the_ipv4_minimum_is_ignored() {
        let now = Instant::now();
        let mut mtus = PathMtus::default();
        mtus.learn(addr("198.18.0.2:51820"), 68, now);
        assert!(mtus.is_empty());
    }

    #[test]
    fn the_table_stays_bounded_and_makes_room_from_expired_entries() {
        let now = Instant::now();
        let mut mtus = PathMtus::default();
        for i in 0..MAX_REMEMBERED + 10 {
            let dst = SocketAddr::new(std::net::Ipv4Addr::from(0xc612_0000 + i as u32).into(), 51820);
            mtus.learn(dst, 1280, now);
        }
        assert_eq!(mtus.known.len(), MAX_REMEMBERED);
        let later = now + PATH_MTU_TTL;
        mtus.learn(addr("203.0.113.9:1"), 1400, later);
        assert_eq!(mtus.get(addr("203.0.113.9:1"), later), Some(1400));
        assert_eq!(mtus.known.len(), 1);
    }

    #[test]
    fn the_inner_limit_leaves_room_for_ip_udp_wireguard_and_framing() {
        assert_eq!(inner_limit(1280, addr("198.18.0.2:1"), 0), 1280 - 20 - 8 - 32);
        assert_eq!(inner_limit(1280, addr("[::ffff:198.18.0.2]:1"), 0), 1280 - 20 - 8 - 32);
        assert_eq!(inner_limit(1280, addr("[2001:db8::2]:1"), 0), 1280 - 40 - 8 - 32);
        assert_eq!(inner_limit(1280, addr("198.18.0.2:1"), 11), 1280 - 20 - 8 - 32 - 11);
        assert_eq!(udp_ip_header_len(addr("[::ffff:127.0.0.1]:9")), 28);
        assert_eq!(udp_ip_header_len(addr("[::1]:9")), 48);
        // The mesh MTU fills a 1500-byte IPv6 path exactly.
        assert_eq!(inner_limit(1500, addr("[2001:db8::2]:1"), 0), 1420);
    }
}
