//! Path probes: `probe::peek_sender` and `probe::decode` on arbitrary
//! datagrams. The first byte picks the mode: as received, or with a correct
//! MAC recomputed over the body so decoding reaches the field parsing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshtun_overlay::probe::{self, ProbeKind, PROBE_LEN};

const KEY: [u8; 32] = [7; 32];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut datagram = rest.to_vec();
    if mode & 1 == 1 && datagram.len() == PROBE_LEN {
        let mac = blake3::keyed_hash(&KEY, &datagram[..PROBE_LEN - 16]);
        datagram[PROBE_LEN - 16..].copy_from_slice(&mac.as_bytes()[..16]);
    }
    let sender = probe::peek_sender(&datagram);
    if let Some(decoded) = probe::decode(&datagram, &KEY) {
        assert_eq!(sender, Some(decoded.sender));
        // What decodes re-encodes to the same bytes (unless an IPv4 pong's
        // address was not IPv4-mapped, which decodes to 0.0.0.0).
        let again = probe::encode(&decoded, &KEY);
        assert_eq!(again.len(), PROBE_LEN);
        assert_eq!(probe::decode(&again, &KEY), Some(decoded));
        if !matches!(decoded.kind, ProbeKind::Pong(a) if a.ip().is_unspecified()) && decoded.kind != ProbeKind::Ping {
            assert_eq!(again, datagram);
        }
    }
});
