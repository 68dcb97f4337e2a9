//! TUN offloads, sans IO. A TUN opened with `IFF_VNET_HDR` and
//! `TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)` prefixes every
//! packet with a virtio-net header and lets the kernel hand over TCP
//! super-packets of up to 64 KB with the checksum left to us; in the other
//! direction it accepts such super-packets. One read or write then carries
//! dozens of segments, and the kernel's TCP stack handles one packet where
//! it would handle forty.
//!
//! [`split`] turns one read into ordinary IP packets with complete
//! checksums (what goes into WireGuard). [`Coalescer`] merges consecutive
//! in-order segments of one TCP flow, as they come out of WireGuard, into
//! one super-packet to write (the receive half of GRO).

use thiserror::Error;

/// Size of `struct virtio_net_hdr` (the legacy header, without `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;
/// The largest read a vnet-header TUN can return.
pub const MAX_READ: usize = VNET_HDR_LEN + 65535;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

const TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_CWR: u8 = 0x80;
/// Offset of the checksum in a TCP header (and in a UDP header: 6).
const TCP_CSUM_OFFSET: usize = 16;
const UDP_CSUM_OFFSET: usize = 6;

/// `struct virtio_net_hdr`, in the host's byte order (a TUN without
/// `TUNSETVNETLE`/`BE` uses native endianness).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(bytes: &[u8]) -> Option<VnetHdr> {
        let b = bytes.get(..VNET_HDR_LEN)?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    pub fn emit(&self, out: &mut [u8; VNET_HDR_LEN]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum OffloadError {
    #[error("read shorter than the virtio-net header")]
    Truncated,
    #[error("checksum start/offset outside the packet")]
    BadChecksumOffsets,
    #[error("unsupported GSO type {0:#x}")]
    UnsupportedGso(u8),
    #[error("malformed TCP super-packet")]
    MalformedSuperPacket,
}

/// What [`split`] made of one read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    /// IP packets handed to `each`.
    pub packets: usize,
    /// Whether TCP was cut smaller than it came, to fit a narrow path.
    pub cut: bool,
}

/// Splits one read from a vnet-header TUN into IP packets with complete
/// checksums and calls `each` with every one, in order; says how many.
/// `scratch` is reused between calls (no allocation once it has grown).
///
/// With `max_packet` (the destination's path is narrower than the mesh
/// MTU: see [`crate::path_mtu`]), TCP segments are cut to fit it instead of
/// the kernel's MSS, a full-size single segment included; other packets
/// pass whole and the UDP layer fragments them.
pub fn split(read: &mut [u8], max_packet: Option<usize>, scratch: &mut Vec<u8>, mut each: impl FnMut(&[u8])) -> Result<Split, OffloadError> {
    let hdr = VnetHdr::parse(read).ok_or(OffloadError::Truncated)?;
    let packet = &mut read[VNET_HDR_LEN..];
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE => {
            if hdr.flags & F_NEEDS_CSUM != 0 {
                complete_checksum(packet, usize::from(hdr.csum_start), usize::from(hdr.csum_offset))?;
            }
            if let Some(max) = max_packet.filter(|&max| packet.len() > max) {
                if let Some(kind) = cuttable_segment(packet) {
                    return split_tcp(packet, kind, usize::MAX, Some(max), scratch, each);
                }
            }
            each(packet);
            Ok(Split { packets: 1, cut: false })
        }
        kind @ (GSO_TCPV4 | GSO_TCPV6) => split_tcp(packet, kind, usize::from(hdr.gso_size), max_packet, scratch, each),
        other => Err(OffloadError::UnsupportedGso(other)),
    }
}

/// The GSO kind to cut a single TCP segment as, when it may be cut: a
/// whole IP packet (not a fragment, whose TCP header may not even be
/// there), without SYN, RST or URG (whose meaning belongs to one segment).
/// A signed one ([`signed`]) is left whole by `split_tcp`, as a signed
/// super-packet is.
fn cuttable_segment(packet: &[u8]) -> Option<u8> {
    let (ip_len, _) = tcp_headers(packet)?;
    let is_v4 = packet[0] >> 4 == 4;
    let fragment = is_v4 && u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0;
    let flags = packet[ip_len + 13];
    if fragment || flags & (TCP_SYN | TCP_RST | TCP_URG) != 0 {
        return None;
    }
    Some(if is_v4 { GSO_TCPV4 } else { GSO_TCPV6 })
}

const TCP_OPTION_END: u8 = 0;
const TCP_OPTION_NOP: u8 = 1;
/// TCP MD5 signature (RFC 2385) and TCP-AO (RFC 5925): the receiver checks
/// the signature over the segment as sent, so a cut segment is dropped.
const TCP_OPTION_MD5: u8 = 19;
const TCP_OPTION_AO: u8 = 29;

/// Whether TCP `options` carry a signature over the segment; malformed
/// options count as signed (left alone).
fn signed(options: &[u8]) -> bool {
    let mut i = 0;
    while let Some(&kind) = options.get(i) {
        match kind {
            TCP_OPTION_END => return false,
            TCP_OPTION_NOP => i += 1,
            TCP_OPTION_MD5 | TCP_OPTION_AO => return true,
            _ => match options.get(i + 1) {
                Some(&len) if len >= 2 => i += usize::from(len),
                _ => return true,
            },
        }
    }
    false
}

/// The least payload a segment is cut to: below it, fragments cost less
/// than headers.
const MIN_CUT_PAYLOAD: usize = 256;

/// Finishes a partial checksum: the field holds the folded pseudo-header
/// sum, and the checksum covers everything from `start` to the end.
fn complete_checksum(packet: &mut [u8], start: usize, offset: usize) -> Result<(), OffloadError> {
    let field = start.checked_add(offset).filter(|f| f + 2 <= packet.len()).ok_or(OffloadError::BadChecksumOffsets)?;
    let mut sum = !fold(sum_words(&packet[start..], 0));
    // UDP sends "no checksum" as zero, so a computed zero goes out as all ones.
    if sum == 0 && offset == UDP_CSUM_OFFSET {
        sum = 0xffff;
    }
    packet[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// Where the headers of a TCP packet end: (IP header length, TCP header length).
fn tcp_headers(packet: &[u8]) -> Option<(usize, usize)> {
    let ip_len = match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            (ihl >= 20 && *packet.get(9)? == TCP).then_some(ihl)?
        }
        6 => (*packet.get(6)? == TCP).then_some(40)?,
        _ => return None,
    };
    let tcp_len = usize::from(packet.get(ip_len + 12)? >> 4) * 4;
    (tcp_len >= 20 && ip_len + tcp_len <= packet.len()).then_some((ip_len, tcp_len))
}

fn split_tcp(packet: &[u8], kind: u8, mss: usize, max_packet: Option<usize>, scratch: &mut Vec<u8>, mut each: impl FnMut(&[u8])) -> Result<Split, OffloadError> {
    let (ip_len, tcp_len) = tcp_headers(packet).ok_or(OffloadError::MalformedSuperPacket)?;
    let version_matches = (packet[0] >> 4 == 4) == (kind == GSO_TCPV4);
    if !version_matches || mss == 0 {
        return Err(OffloadError::MalformedSuperPacket);
    }
    let headers = ip_len + tcp_len;
    let payload = &packet[headers..];
    let kernel_mss = mss;
    let mss = match max_packet.and_then(|max| max.checked_sub(headers)) {
        Some(fits) if fits >= MIN_CUT_PAYLOAD && fits < payload.len().min(mss) && !signed(&packet[ip_len + 20..headers]) => fits,
        _ => mss,
    };
    let seq = u32::from_be_bytes([packet[ip_len + 4], packet[ip_len + 5], packet[ip_len + 6], packet[ip_len + 7]]);
    let id = u16::from_be_bytes([packet[4], packet[5]]);
    let flags = packet[ip_len + 13];
    let count = payload.len().div_ceil(mss).max(1);
    for i in 0..count {
        let chunk = payload.get(i * mss..((i + 1) * mss).min(payload.len())).unwrap_or(&[]);
        scratch.clear();
        scratch.extend_from_slice(&packet[..headers]);
        scratch.extend_from_slice(chunk);
        let total = scratch.len();
        if kind == GSO_TCPV4 {
            scratch[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            scratch[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
            ipv4_header_checksum(&mut scratch[..ip_len]);
        } else {
            scratch[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        }
        scratch[ip_len + 4..ip_len + 8].copy_from_slice(&seq.wrapping_add((i * mss) as u32).to_be_bytes());
        let mut f = flags;
        if i + 1 < count {
            f &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            f &= !TCP_CWR;
        }
        scratch[ip_len + 13] = f;
        tcp_checksum(scratch, ip_len);
        each(scratch);
    }
    Ok(Split { packets: count, cut: mss < kernel_mss })
}

/// Ones' complement sum of `bytes` as big-endian 16-bit words (an odd last
/// byte padded with zero), added to `initial`; not folded.
///
/// The words are summed as they lie in memory (little-endian), which
/// vectorises, and the folded sum is byte-swapped once: swapping the bytes
/// of every word swaps the bytes of their ones' complement sum (RFC 1071,
/// section 2(B)). This sum runs over every byte of every TCP segment the
/// engine splits.
fn sum_words(bytes: &[u8], initial: u64) -> u64 {
    let mut words = bytes.chunks_exact(4);
    let sum: u64 = (&mut words).map(|w| u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]]))).sum();
    let rest = words.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    let sum = sum + u64::from(u32::from_le_bytes(tail));
    initial + u64::from(fold(sum).swap_bytes())
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Writes the header checksum of an IPv4 `header` (the whole header,
/// options included) into its field.
pub(crate) fn ipv4_header_checksum(header: &mut [u8]) {
    header[10] = 0;
    header[11] = 0;
    let sum = !fold(sum_words(header, 0));
    header[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// The pseudo-header sum of a TCP segment of `tcp_length` bytes.
fn pseudo_header_sum(packet: &[u8], tcp_length: usize) -> u64 {
    let addresses = if packet[0] >> 4 == 4 { &packet[12..20] } else { &packet[8..40] };
    sum_words(addresses, u64::from(TCP) + tcp_length as u64)
}

/// Writes the complete TCP checksum of the segment after `ip_len`.
fn tcp_checksum(packet: &mut [u8], ip_len: usize) {
    let field = ip_len + TCP_CSUM_OFFSET;
    packet[field] = 0;
    packet[field + 1] = 0;
    let sum = pseudo_header_sum(packet, packet.len() - ip_len);
    let sum = !fold(sum_words(&packet[ip_len..], sum));
    packet[field..field + 2].copy_from_slice(&sum.to_be_bytes());
}

/// Merges consecutive in-order segments of one TCP flow into super-packets
/// for a vnet-header TUN; everything else passes through alone. Feed it
/// packets in arrival order with [`Coalescer::push`], then
/// [`Coalescer::finish`]; `write` gets each buffer (virtio-net header and
/// packet) ready for one write(2).
///
/// A segment joins the flow being built only if its headers equal the
/// first segment's except for lengths, IPv4 id, checksums, sequence number
/// and PSH, its sequence number follows on, and every earlier segment was
/// full-sized; PSH or a short segment ends the super-packet. The segments'
/// own checksums are not checked: WireGuard has authenticated the bytes,
/// and the kernel is told the checksum still has to be completed.
pub struct Coalescer {
    buf: Vec<u8>,
    flow: Option<Flow>,
}

struct Flow {
    ip_len: usize,
    tcp_len: usize,
    mss: usize,
    next_seq: u32,
    segments: usize,
    closed: bool,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer::new()
    }
}

impl Coalescer {
    pub fn new() -> Coalescer {
        Coalescer { buf: Vec::with_capacity(MAX_READ), flow: None }
    }

    pub fn push(&mut self, packet: &[u8], write: &mut impl FnMut(&[u8])) {
        if self.try_append(packet) {
            return;
        }
        self.finish(write);
        self.buf.clear();
        self.buf.extend_from_slice(&[0; VNET_HDR_LEN]);
        self.buf.extend_from_slice(packet);
        match coalescable(packet) {
            Some((ip_len, tcp_len, seq, flags)) => {
                let mss = packet.len() - ip_len - tcp_len;
                self.flow = Some(Flow {
                    ip_len,
                    tcp_len,
                    mss,
                    next_seq: seq.wrapping_add(mss as u32),
                    segments: 1,
                    closed: flags & TCP_PSH != 0,
                });
            }
            None => {
                write(&self.buf);
                self.buf.clear();
            }
        }
    }

    /// Writes the super-packet being built, if any.
    pub fn finish(&mut self, write: &mut impl FnMut(&[u8])) {
        let Some(flow) = self.flow.take() else { return };
        if flow.segments > 1 {
            let packet = &mut self.buf[VNET_HDR_LEN..];
            let total = packet.len();
            if packet[0] >> 4 == 4 {
                packet[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                ipv4_header_checksum(&mut packet[..flow.ip_len]);
            } else {
                packet[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            }
            let partial = fold(pseudo_header_sum(packet, total - flow.ip_len));
            let field = flow.ip_len + TCP_CSUM_OFFSET;
            packet[field..field + 2].copy_from_slice(&partial.to_be_bytes());
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: if packet[0] >> 4 == 4 { GSO_TCPV4 } else { GSO_TCPV6 },
                hdr_len: (flow.ip_len + flow.tcp_len) as u16,
                gso_size: flow.mss as u16,
                csum_start: flow.ip_len as u16,
                csum_offset: TCP_CSUM_OFFSET as u16,
            };
            let mut bytes = [0u8; VNET_HDR_LEN];
            hdr.emit(&mut bytes);
            self.buf[..VNET_HDR_LEN].copy_from_slice(&bytes);
        }
        write(&self.buf);
        self.buf.clear();
    }

    fn try_append(&mut self, packet: &[u8]) -> bool {
        let Some(flow) = self.flow.as_mut() else { return false };
        if flow.closed {
            return false;
        }
        let head = &self.buf[VNET_HDR_LEN..];
        let Some((ip_len, tcp_len, seq, flags)) = coalescable(packet) else { return false };
        let headers = ip_len + tcp_len;
        let payload = packet.len() - headers;
        if ip_len != flow.ip_len
            || tcp_len != flow.tcp_len
            || seq != flow.next_seq
            || payload > flow.mss
            || head.len() + payload > 65535 + if ip_len == 40 { 40 } else { 0 }
            || !same_flow_headers(head, packet, ip_len, tcp_len)
        {
            return false;
        }
        self.buf.extend_from_slice(&packet[headers..]);
        flow.next_seq = seq.wrapping_add(payload as u32);
        flow.segments += 1;
        if flags & TCP_PSH != 0 {
            self.buf[VNET_HDR_LEN + ip_len + 13] |= TCP_PSH;
            flow.closed = true;
        }
        if payload < flow.mss {
            flow.closed = true;
        }
        true
    }
}

/// A TCP segment that may start or join a super-packet: data-carrying,
/// only ACK (and PSH) set, not an IPv4 fragment, lengths consistent.
/// Returns (IP header length, TCP header length, sequence number, flags).
fn coalescable(packet: &[u8]) -> Option<(usize, usize, u32, u8)> {
    let (ip_len, tcp_len) = tcp_headers(packet)?;
    let declared = if ip_len == 40 {
        40 + usize::from(u16::from_be_bytes([packet[4], packet[5]]))
    } else {
        let fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff;
        if fragment != 0 {
            return None;
        }
        usize::from(u16::from_be_bytes([packet[2], packet[3]]))
    };
    let flags = packet[ip_len + 13];
    let data = packet.len() > ip_len + tcp_len;
    let plain = flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG | TCP_CWR) == 0 && flags & TCP_ACK != 0;
    if declared != packet.len() || !data || !plain {
        return None;
    }
    let seq = u32::from_be_bytes([packet[ip_len + 4], packet[ip_len + 5], packet[ip_len + 6], packet[ip_len + 7]]);
    Some((ip_len, tcp_len, seq, flags))
}

/// Headers equal apart from what differs between segments of one stream.
fn same_flow_headers(head: &[u8], packet: &[u8], ip_len: usize, tcp_len: usize) -> bool {
    let ip_same = if ip_len == 40 {
        head[..4] == packet[..4] && head[6..40] == packet[6..40]
    } else {
        head[..2] == packet[..2] && head[6..10] == packet[6..10] && head[12..ip_len] == packet[12..ip_len]
    };
    let (h, p) = (&head[ip_len..ip_len + tcp_len], &packet[ip_len..ip_len + tcp_len]);
    ip_same && h[..4] == p[..4] && h[8..13] == p[8..13] && h[13] & !TCP_PSH == p[13] & !TCP_PSH && h[14..16] == p[14..16] && h[18..] == p[18..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    const A4: [u8; 4] = [100, 64, 0, 1];
    const B4: [u8; 4] = [100, 64, 0, 2];
    const A6: [u8; 16] = [0xfd, 0x4d, 0x65, 0x73, 0x68, 0x74, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const B6: [u8; 16] = [0xfd, 0x4d, 0x65, 0x73, 0x68, 0x74, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    fn tcp(v6: bool, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let builder = if v6 { PacketBuilder::ipv6(A6, B6, 64) } else { PacketBuilder::ipv4(A4, B4, 64) };
        let mut b = builder.tcp(40000, 5201, seq, 512).ack(777);
        if flags & TCP_PSH != 0 {
            b = b.psh();
        }
        if flags & TCP_FIN != 0 {
            b = b.fin();
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        if !v6 {
            out[6] |= 0x40; // DF, as TCP sends it
            out[4..6].copy_from_slice(&((seq / 1000) as u16).to_be_bytes());
            ipv4_header_checksum(&mut out[..20]);
        }
        out
    }

    /// Checksums verified independently, by etherparse.
    fn checksums_valid(packet: &[u8]) -> bool {
        let sliced = SlicedPacket::from_ip(packet).unwrap();
        let TransportSlice::Tcp(t) = sliced.transport.unwrap() else { panic!("not tcp") };
        let expected = match sliced.net.unwrap() {
            etherparse::NetSlice::Ipv4(ip) => {
                let h = ip.header();
                if h.to_header().calc_header_checksum() != h.header_checksum() {
                    return false;
                }
                t.calc_checksum_ipv4(h.source(), h.destination()).unwrap()
            }
            etherparse::NetSlice::Ipv6(ip) => t.calc_checksum_ipv6(ip.header().source(), ip.header().destination()).unwrap(),
            _ => unreachable!(),
        };
        expected == t.checksum()
    }

    /// A super-packet as the kernel hands it over: one header set, all the
    /// payload, the TCP checksum field holding the pseudo-header sum.
    fn kernel_super_packet(v6: bool, seq: u32, payload: &[u8], mss: u16, flags: u8) -> Vec<u8> {
        let mut p = tcp(v6, seq, flags, payload);
        let ip_len = if v6 { 40 } else { 20 };
        let partial = fold(pseudo_header_sum(&p, p.len() - ip_len));
        p[ip_len + 16..ip_len + 18].copy_from_slice(&partial.to_be_bytes());
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: (ip_len + 20) as u16,
            gso_size: mss,
            csum_start: ip_len as u16,
            csum_offset: 16,
        };
        let mut read = vec![0u8; VNET_HDR_LEN];
        hdr.emit((&mut read[..VNET_HDR_LEN]).try_into().unwrap());
        read.extend_from_slice(&p);
        read
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    /// The sum the RFC defines, word by word, for comparison.
    fn reference_sum(bytes: &[u8]) -> u16 {
        let mut sum = 0u64;
        for pair in bytes.chunks(2) {
            sum += u64::from(u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]));
        }
        fold(sum)
    }

    #[test]
    fn the_word_sum_equals_the_rfc_1071_sum_for_every_length_and_alignment() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut byte = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        };
        let data: Vec<u8> = (0..3000).map(|_| byte()).collect();
        for start in 0..8 {
            for len in (0..200).chain([1399, 1400, 1401, 2992]) {
                let bytes = &data[start..start + len];
                assert_eq!(fold(sum_words(bytes, 0)), reference_sum(bytes), "start {start} len {len}");
            }
        }
        assert_eq!(fold(sum_words(&[0xff; 64], 0)), 0xffff);
        assert_eq!(fold(sum_words(&[0; 64], 0)), 0);
        assert_eq!(fold(sum_words(&[0x12, 0x34], 0x0001)), 0x1235, "the initial sum is added as it is");
    }

    #[test]
    fn tso_super_packets_split_into_mss_segments_with_valid_checksums() {
        for v6 in [false, true] {
            let data = payload(10_000);
            let mut read = kernel_super_packet(v6, 1000, &data, 1388, TCP_PSH | TCP_FIN);
            let mut segments = Vec::new();
            let n = split(&mut read, None, &mut Vec::new(), |p| segments.push(p.to_vec())).unwrap();
            assert_eq!(n, Split { packets: 8, cut: false });
            let mut joined = Vec::new();
            for (i, s) in segments.iter().enumerate() {
                assert!(checksums_valid(s), "segment {i} (v6: {v6}) has a bad checksum");
                let sliced = SlicedPacket::from_ip(s).unwrap();
                let TransportSlice::Tcp(t) = sliced.transport.unwrap() else { panic!() };
                assert_eq!(t.sequence_number(), 1000 + (i * 1388) as u32);
                let last = i == segments.len() - 1;
                assert_eq!(t.psh(), last, "PSH only on the last segment");
                assert_eq!(t.fin(), last, "FIN only on the last segment");
                assert!(t.payload().len() == 1388 || last);
                joined.extend_from_slice(t.payload());
            }
            assert_eq!(joined, data);
        }
    }

    #[test]
    fn ipv4_segments_get_consecutive_ids_and_exact_lengths() {
        let mut read = kernel_super_packet(false, 5, &payload(3000), 1400, 0);
        let mut segments = Vec::new();
        split(&mut read, None, &mut Vec::new(), |p| segments.push(p.to_vec())).unwrap();
        let first_id = u16::from_be_bytes([segments[0][4], segments[0][5]]);
        for (i, s) in segments.iter().enumerate() {
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), first_id.wrapping_add(i as u16));
            assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
        }
        assert_eq!(segments.iter().map(Vec::len).collect::<Vec<_>>(), vec![1440, 1440, 240]);
    }

    /// Each segment's (sequence number, payload), checked for checksums and
    /// for fitting `max`; and the payloads joined.
    fn segments_within(segments: &[Vec<u8>], max: usize) -> (Vec<(u32, usize)>, Vec<u8>) {
        let mut joined = Vec::new();
        let mut shape = Vec::new();
        for (i, s) in segments.iter().enumerate() {
            assert!(s.len() <= max, "segment {i} is {} bytes, over {max}", s.len());
            assert!(checksums_valid(s), "segment {i} has a bad checksum");
            let sliced = SlicedPacket::from_ip(s).unwrap();
            let TransportSlice::Tcp(t) = sliced.transport.unwrap() else { panic!() };
            shape.push((t.sequence_number(), t.payload().len()));
            joined.extend_from_slice(t.payload());
        }
        (shape, joined)
    }

    #[test]
    fn super_packets_toward_a_narrow_path_are_cut_to_fit_it() {
        for v6 in [false, true] {
            let data = payload(10_000);
            let mut read = kernel_super_packet(v6, 1000, &data, 1368, TCP_PSH);
            let mut segments = Vec::new();
            let split = split(&mut read, Some(1220), &mut Vec::new(), |p| segments.push(p.to_vec())).unwrap();
            let headers = if v6 { 60 } else { 40 };
            let mss = 1220 - headers;
            let n = data.len().div_ceil(mss);
            assert_eq!(split, Split { packets: n, cut: true });
            let (shape, joined) = segments_within(&segments, 1220);
            assert_eq!(joined, data);
            for (i, (seq, len)) in shape.iter().enumerate() {
                assert_eq!(*seq, 1000 + (i * mss) as u32);
                assert!(*len == mss || i == n - 1);
            }
        }
    }

    #[test]
    fn a_full_size_single_segment_toward_a_narrow_path_becomes_two() {
        for v6 in [false, true] {
            let data = payload(1360);
            let mut read = kernel_super_packet(v6, 77, &data, 0, TCP_PSH);
            read[1] = GSO_NONE;
            let mut segments = Vec::new();
            assert_eq!(split(&mut read, Some(1220), &mut Vec::new(), |p| segments.push(p.to_vec())).unwrap(), Split { packets: 2, cut: true });
            let (shape, joined) = segments_within(&segments, 1220);
            assert_eq!(joined, data);
            assert_eq!(shape[1].0, 77 + shape[0].1 as u32);
            let psh: Vec<bool> = segments.iter().map(|s| s[if v6 { 40 } else { 20 } + 13] & TCP_PSH != 0).collect();
            assert_eq!(psh, vec![false, true], "PSH stays on the last segment only");
        }
    }

    #[test]
    fn segments_that_fit_and_packets_that_must_stay_whole_are_not_cut() {
        // Fits already: passes as it came.
        let small = tcp(false, 1, TCP_PSH, &payload(500));
        let mut read = vec![0u8; VNET_HDR_LEN];
        read.extend_from_slice(&small);
        let mut out = Vec::new();
        split(&mut read, Some(1220), &mut Vec::new(), |p| out.push(p.to_vec())).unwrap();
        assert_eq!(out, vec![small]);
        // A SYN carrying data, and a datagram that is not TCP: whole (the
        // UDP layer fragments them).
        let mut syn = tcp(true, 1, 0, &payload(1360));
        syn[40 + 13] |= TCP_SYN;
        let udp = {
            let mut out = Vec::new();
            PacketBuilder::ipv6(A6, B6, 64).udp(1, 2).write(&mut out, &payload(1360)).unwrap();
            out
        };
        for packet in [syn, udp] {
            let mut read = vec![0u8; VNET_HDR_LEN];
            read.extend_from_slice(&packet);
            let mut out = Vec::new();
            assert_eq!(split(&mut read, Some(1220), &mut Vec::new(), |p| out.push(p.to_vec())).unwrap(), Split { packets: 1, cut: false });
            assert_eq!(out, vec![packet]);
        }
        // A path too narrow to be worth cutting for: the kernel's MSS stays.
        let mut read = kernel_super_packet(false, 1, &payload(4000), 1380, 0);
        let mut segments = Vec::new();
        assert!(!split(&mut read, Some(200), &mut Vec::new(), |p| segments.push(p.to_vec())).unwrap().cut);
        assert_eq!(segments.iter().map(Vec::len).collect::<Vec<_>>(), vec![1420, 1420, 1280]);
    }

    #[test]
    fn ipv4_fragments_and_signed_segments_are_never_cut() {
        // A later fragment of a forwarded packet: what follows its IP
        // header is data, not a TCP header. And a first fragment (MF).
        for (flags_and_offset, label) in [(185u16, "a later fragment"), (0x2000, "a first fragment")] {
            let mut packet = tcp(false, 1, 0, &payload(1360));
            packet[6..8].copy_from_slice(&flags_and_offset.to_be_bytes());
            ipv4_header_checksum(&mut packet[..20]);
            let mut read = vec![0u8; VNET_HDR_LEN];
            read.extend_from_slice(&packet);
            let mut out = Vec::new();
            assert_eq!(split(&mut read, Some(1220), &mut Vec::new(), |p| out.push(p.to_vec())).unwrap().packets, 1, "{label}");
            assert_eq!(out, vec![packet], "{label} passes untouched");
        }
        // TCP-MD5 (kind 19, 18 bytes) and TCP-AO (kind 29) sign the segment.
        for option in [[19u8, 18], [29, 18]] {
            let mut packet = tcp(true, 1, 0, &payload(1360));
            let mut options = vec![TCP_OPTION_NOP, TCP_OPTION_NOP];
            options.extend_from_slice(&option);
            options.extend_from_slice(&[0xab; 16]);
            // Options go between the 20-byte header and the payload.
            let data = packet.split_off(40 + 20);
            packet.extend_from_slice(&options);
            packet.extend_from_slice(&data);
            packet[40 + 12] = (((20 + options.len()) / 4) as u8) << 4;
            let payload_len = (packet.len() - 40) as u16;
            packet[4..6].copy_from_slice(&payload_len.to_be_bytes());
            let mut read = vec![0u8; VNET_HDR_LEN];
            read.extend_from_slice(&packet);
            assert_eq!(split(&mut read, Some(1220), &mut Vec::new(), |_| {}).unwrap(), Split { packets: 1, cut: false }, "kind {}", option[0]);
        }
        // Ordinary options (timestamps) do not stop the cut.
        assert!(!signed(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]));
        assert!(signed(&[1, 1, 8]), "truncated options are left alone");
    }

    #[test]
    fn partial_checksums_of_single_packets_are_completed() {
        let mut read = kernel_super_packet(true, 9, &payload(333), 1400, TCP_PSH);
        read[1] = GSO_NONE;
        let mut out = Vec::new();
        split(&mut read, None, &mut Vec::new(), |p| out.push(p.to_vec())).unwrap();
        assert_eq!(out.len(), 1);
        assert!(checksums_valid(&out[0]));
    }

    #[test]
    fn packets_without_offload_flags_pass_through_untouched() {
        let packet = tcp(false, 1, TCP_PSH, b"hello");
        let mut read = vec![0u8; VNET_HDR_LEN];
        read.extend_from_slice(&packet);
        let mut out = Vec::new();
        split(&mut read, None, &mut Vec::new(), |p| out.push(p.to_vec())).unwrap();
        assert_eq!(out, vec![packet]);
    }

    #[test]
    fn malformed_reads_are_errors_not_panics() {
        assert_eq!(split(&mut [0u8; 4], None, &mut Vec::new(), |_| {}), Err(OffloadError::Truncated));
        let mut bad_offsets = kernel_super_packet(false, 1, b"x", 1400, 0);
        bad_offsets[1] = GSO_NONE;
        bad_offsets[8] = 0xff;
        assert_eq!(split(&mut bad_offsets, None, &mut Vec::new(), |_| {}), Err(OffloadError::BadChecksumOffsets));
        let mut udp_gso = kernel_super_packet(false, 1, b"x", 1400, 0);
        udp_gso[1] = 5;
        assert_eq!(split(&mut udp_gso, None, &mut Vec::new(), |_| {}), Err(OffloadError::UnsupportedGso(5)));
        let mut zero_mss = kernel_super_packet(false, 1, &payload(3000), 0, 0);
        assert_eq!(split(&mut zero_mss, None, &mut Vec::new(), |_| {}), Err(OffloadError::MalformedSuperPacket));
        let mut wrong_version = kernel_super_packet(false, 1, &payload(3000), 1000, 0);
        wrong_version[1] = GSO_TCPV6;
        assert_eq!(split(&mut wrong_version, None, &mut Vec::new(), |_| {}), Err(OffloadError::MalformedSuperPacket));
        for len in 0..60 {
            let mut truncated = kernel_super_packet(true, 1, &payload(3000), 1000, 0);
            truncated.truncate(VNET_HDR_LEN + len);
            let _ = split(&mut truncated, None, &mut Vec::new(), |_| {});
        }
    }

    fn coalesce(packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut c = Coalescer::new();
        let mut out = Vec::new();
        let mut write = |b: &[u8]| out.push(b.to_vec());
        for p in packets {
            c.push(p, &mut write);
        }
        c.finish(&mut write);
        out
    }

    /// What the kernel does with a super-packet we write: split it again.
    fn resegment(write: &[u8]) -> Vec<Vec<u8>> {
        let mut read = write.to_vec();
        let mut out = Vec::new();
        split(&mut read, None, &mut Vec::new(), |p| out.push(p.to_vec())).unwrap();
        out
    }

    #[test]
    fn in_order_full_segments_of_one_flow_become_one_super_packet() {
        for v6 in [false, true] {
            let segments: Vec<Vec<u8>> = (0..5u32).map(|i| tcp(v6, 100 + i * 1000, if i == 4 { TCP_PSH } else { 0 }, &payload(1000))).collect();
            let writes = coalesce(&segments);
            assert_eq!(writes.len(), 1);
            let hdr = VnetHdr::parse(&writes[0]).unwrap();
            assert_eq!((hdr.gso_size, hdr.flags), (1000, F_NEEDS_CSUM));
            assert_eq!(resegment(&writes[0]), segments, "the kernel's view equals the original segments");
        }
    }

    #[test]
    fn gaps_other_flows_and_control_segments_are_not_merged() {
        let a = tcp(false, 0, 0, &payload(1000));
        let gap = tcp(false, 5000, 0, &payload(1000));
        let mut other_flow = tcp(false, 6000, 0, &payload(1000));
        other_flow[20] ^= 1; // another source port
        let fin = tcp(false, 7000, TCP_FIN, &payload(10));
        let writes = coalesce(&[a.clone(), gap, other_flow, fin]);
        assert_eq!(writes.len(), 4);
        for w in &writes {
            assert_eq!(VnetHdr::parse(w).unwrap(), VnetHdr::default(), "single packets go out with an empty header");
        }
        assert_eq!(&writes[0][VNET_HDR_LEN..], &a[..]);
    }

    #[test]
    fn a_short_or_pushed_segment_ends_the_super_packet() {
        let s = |seq: u32, len: usize, flags: u8| tcp(true, seq, flags, &payload(len));
        let writes = coalesce(&[s(0, 1000, 0), s(1000, 500, 0), s(1500, 1000, 0), s(2500, 1000, TCP_PSH), s(3500, 1000, 0)]);
        assert_eq!(writes.len(), 3);
        assert_eq!(resegment(&writes[0]).len(), 2);
        assert_eq!(resegment(&writes[1]).len(), 2);
        assert_eq!(resegment(&writes[2]).len(), 1);
    }

    #[test]
    fn super_packets_stay_within_64_kib() {
        let segments: Vec<Vec<u8>> = (0..60u32).map(|i| tcp(false, i * 1400, 0, &payload(1400))).collect();
        let writes = coalesce(&segments);
        assert!(writes.iter().all(|w| w.len() - VNET_HDR_LEN <= 65535));
        assert_eq!(writes.iter().map(|w| resegment(w).len()).sum::<usize>(), 60);
    }

    #[test]
    fn a_segment_with_longer_headers_does_not_join_a_flow() {
        let head = tcp(true, 0, 0, &payload(1000));
        let v4 = tcp(false, 1000, 0, &payload(10));
        let writes = coalesce(&[head, v4.clone()]);
        assert_eq!(writes.len(), 2);
        assert_eq!(&writes[1][VNET_HDR_LEN..], &v4[..]);
    }

    #[test]
    fn non_tcp_and_malformed_packets_pass_through_alone() {
        let mut udp = Vec::new();
        PacketBuilder::ipv6(A6, B6, 64).udp(1, 2).write(&mut udp, b"dns").unwrap();
        let mut lying_length = tcp(false, 0, 0, &payload(100));
        lying_length[3] = 0xff;
        let writes = coalesce(&[udp.clone(), lying_length.clone(), vec![0x45], vec![]]);
        assert_eq!(writes.len(), 4);
        assert_eq!(&writes[0][VNET_HDR_LEN..], &udp[..]);
        assert_eq!(&writes[1][VNET_HDR_LEN..], &lying_length[..]);
    }
}
