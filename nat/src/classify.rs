//! Demultiplexing of datagrams sharing one meshtun UDP port.

use crate::stun::framing;

/// First three bytes of every backbone-protocol datagram (`"MT"`, version 1).
pub const BACKBONE_MAGIC: [u8; 3] = *b"MT\x01";
/// First three bytes of a relayed WireGuard datagram (`"MR"`, version 1).
pub const RELAY_MAGIC: [u8; 3] = *b"MR\x01";
/// First three bytes of a path probe between two nodes (`"MP"`, version 1).
pub const PROBE_MAGIC: [u8; 3] = *b"MP\x01";

/// What a UDP datagram arriving on a meshtun port is.
///
/// See [`classify`] for the exact rules and the order they are tried in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramKind {
    /// A STUN message (Binding request or response).
    Stun,
    /// A WireGuard handshake, cookie or transport message.
    WireGuard,
    /// A meshtun backbone-protocol datagram.
    Backbone,
    /// A WireGuard datagram wrapped for a relay.
    Relay,
    /// An authenticated path probe (ping or pong) between two nodes.
    Probe,
    /// Anything else; callers should drop it.
    Unknown,
}

const WG_HANDSHAKE_INITIATION_LEN: usize = 148;
const WG_HANDSHAKE_RESPONSE_LEN: usize = 92;
const WG_COOKIE_REPLY_LEN: usize = 64;
/// 16-byte transport header plus the 16-byte tag of an empty keepalive.
const WG_TRANSPORT_MIN_LEN: usize = 32;

/// Classifies a datagram arriving on a meshtun port. Rules are tried in order:
///
/// 1. **STUN** (RFC 8489): at least 20 bytes, first two bits `00`, length
///    field equal to the bytes after the header and a multiple of 4, magic
///    cookie `0x2112A442` at bytes 4..8. As the one exception, a cookie-less
///    RFC 3489 Binding request (type `0x0001`, otherwise the same checks) is
///    STUN too, so classic clients such as Debian's `stun` get answered.
/// 2. **WireGuard**: first byte 1..=4 followed by three zero bytes, with
///    exactly 148 / 92 / 64 bytes for types 1 / 2 / 3 and at least 32 bytes
///    for type 4 (transport data).
/// 3. **Backbone**, **Relay**, **Probe**: start with [`BACKBONE_MAGIC`],
///    [`RELAY_MAGIC`], [`PROBE_MAGIC`].
/// 4. Otherwise **Unknown**.
///
/// The kinds cannot collide: WireGuard's first byte 1..=4 does pass STUN's
/// leading-bits check, but its zero bytes 2..4 would announce an empty STUN
/// body, which needs a 20-byte datagram that no WireGuard message has; and
/// `b'M'` (0x4D) fails both of the others.
pub fn classify(datagram: &[u8]) -> DatagramKind {
    if framing(datagram).is_ok() {
        DatagramKind::Stun
    } else if is_wireguard(datagram) {
        DatagramKind::WireGuard
    } else if datagram.starts_with(&BACKBONE_MAGIC) {
        DatagramKind::Backbone
    } else if datagram.starts_with(&RELAY_MAGIC) {
        DatagramKind::Relay
    } else if datagram.starts_with(&PROBE_MAGIC) {
        DatagramKind::Probe
    } else {
        DatagramKind::Unknown
    }
}

fn is_wireguard(datagram: &[u8]) -> bool {
    let len = datagram.len();
    match datagram {
        [1, 0, 0, 0, ..] => len == WG_HANDSHAKE_INITIATION_LEN,
        [2, 0, 0, 0, ..] => len == WG_HANDSHAKE_RESPONSE_LEN,
        [3, 0, 0, 0, ..] => len == WG_COOKIE_REPLY_LEN,
        [4, 0, 0, 0, ..] => len >= WG_TRANSPORT_MIN_LEN,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::binding_request;

    fn wireguard(kind: u8, len: usize) -> Vec<u8> {
        let mut datagram = vec![0xA5; len];
        datagram[..4].copy_from_slice(&[kind, 0, 0, 0]);
        datagram
    }

    fn stun_header(kind: u16, body_len: u16, cookie: [u8; 4]) -> Vec<u8> {
        let mut datagram = Vec::new();
        datagram.extend_from_slice(&kind.to_be_bytes());
        datagram.extend_from_slice(&body_len.to_be_bytes());
        datagram.extend_from_slice(&cookie);
        datagram.extend_from_slice(&[7; 12]);
        datagram.resize(20 + usize::from(body_len), 0);
        datagram
    }

    #[test]
    fn a_binding_request_we_built_is_stun() {
        assert_eq!(classify(&binding_request([1; 12])), DatagramKind::Stun);
    }

    #[test]
    fn a_bare_stun_header_with_the_magic_cookie_is_stun() {
        assert_eq!(
            classify(&stun_header(0x0101, 0, [0x21, 0x12, 0xA4, 0x42])),
            DatagramKind::Stun
        );
    }

    #[test]
    fn a_classic_cookieless_binding_request_is_stun() {
        // Captured from Debian's `stun` 0.97 client: Binding request, CHANGE-REQUEST 0.
        let request = [
            0x00, 0x01, 0x00, 0x08, 0x01, 0x03, 0xc3, 0x49, 0xcb, 0xc6, 0x30, 0x77, 0x54, 0xf8,
            0xaf, 0x00, 0x19, 0xd0, 0x1e, 0x64, 0x00, 0x03, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00,
        ];
        assert_eq!(classify(&request), DatagramKind::Stun);
    }

    #[test]
    fn a_cookieless_message_that_is_not_a_binding_request_is_not_stun() {
        assert_eq!(
            classify(&stun_header(0x0101, 8, [1, 2, 3, 4])),
            DatagramKind::Unknown
        );
    }

    #[test]
    fn a_stun_looking_datagram_with_a_wrong_length_field_is_not_stun() {
        let mut datagram = binding_request([1; 12]);
        datagram[3] = datagram[3].wrapping_add(4);
        assert_ne!(classify(&datagram), DatagramKind::Stun);
        let mut datagram = binding_request([1; 12]);
        datagram.extend_from_slice(&[0; 4]);
        assert_ne!(classify(&datagram), DatagramKind::Stun);
    }

    #[test]
    fn a_stun_length_that_is_not_a_multiple_of_four_is_not_stun() {
        let datagram = stun_header(0x0001, 6, [0x21, 0x12, 0xA4, 0x42]);
        assert_eq!(classify(&datagram), DatagramKind::Unknown);
    }

    #[test]
    fn a_stun_header_with_the_top_bits_set_is_not_stun() {
        let datagram = stun_header(0x8001, 0, [0x21, 0x12, 0xA4, 0x42]);
        assert_eq!(classify(&datagram), DatagramKind::Unknown);
    }

    #[test]
    fn a_stun_message_truncated_below_the_header_is_unknown() {
        let request = binding_request([1; 12]);
        assert_eq!(classify(&request[..19]), DatagramKind::Unknown);
    }

    #[test]
    fn wireguard_messages_of_the_exact_sizes_are_wireguard() {
        for (kind, len) in [(1, 148), (2, 92), (3, 64), (4, 32), (4, 1420)] {
            assert_eq!(
                classify(&wireguard(kind, len)),
                DatagramKind::WireGuard,
                "type {kind} len {len}"
            );
        }
    }

    #[test]
    fn wireguard_shaped_messages_of_the_wrong_size_are_unknown() {
        for (kind, len) in [(1, 147), (1, 149), (2, 93), (3, 63), (4, 31), (4, 4)] {
            assert_eq!(
                classify(&wireguard(kind, len)),
                DatagramKind::Unknown,
                "type {kind} len {len}"
            );
        }
    }

    #[test]
    fn wireguard_types_outside_one_to_four_or_with_nonzero_reserved_bytes_are_unknown() {
        assert_eq!(classify(&wireguard(0, 148)), DatagramKind::Unknown);
        assert_eq!(classify(&wireguard(5, 148)), DatagramKind::Unknown);
        let mut datagram = wireguard(1, 148);
        datagram[2] = 1;
        assert_eq!(classify(&datagram), DatagramKind::Unknown);
    }

    #[test]
    fn datagrams_starting_with_the_backbone_magic_are_backbone() {
        assert_eq!(classify(b"MT\x01"), DatagramKind::Backbone);
        assert_eq!(
            classify(b"MT\x01 some backbone frame"),
            DatagramKind::Backbone
        );
    }

    #[test]
    fn other_backbone_versions_and_prefixes_are_unknown() {
        assert_eq!(classify(b"MT\x02hello"), DatagramKind::Unknown);
        assert_eq!(classify(b"MT"), DatagramKind::Unknown);
    }

    #[test]
    fn empty_and_garbage_datagrams_are_unknown() {
        assert_eq!(classify(&[]), DatagramKind::Unknown);
        assert_eq!(classify(&[0]), DatagramKind::Unknown);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n\r\n"), DatagramKind::Unknown);
        assert_eq!(classify(&[0xFF; 200]), DatagramKind::Unknown);
    }
}

#[cfg(test)]
mod meshtun_magic_tests {
    use super::*;

    #[test]
    fn relay_and_probe_datagrams_are_told_apart_from_backbone_traffic() {
        assert_eq!(classify(b"MR\x01\x00\x00rest"), DatagramKind::Relay);
        assert_eq!(classify(b"MP\x01\x01rest"), DatagramKind::Probe);
        assert_eq!(classify(b"MT\x01\x00"), DatagramKind::Backbone);
        assert_eq!(classify(b"MX\x01\x00"), DatagramKind::Unknown);
    }
}
