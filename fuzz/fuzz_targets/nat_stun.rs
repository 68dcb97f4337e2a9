//! The shared UDP port's demultiplexer and the STUN codec, all on the same
//! datagram: `classify`, `binding_response` (the reflector, for IPv4 and
//! IPv6 observers) and `parse_binding_response` (the client, with the
//! datagram's own transaction id so the id check passes, and a fixed one);
//! and the backbone's STUN policy: to a source that is no registered node,
//! a reply is never larger than the request (from any of its sockets, with
//! or without CHANGE-REQUEST).
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use meshtun_backbone::{Directory, DirectoryConfig};
use meshtun_nat::{binding_response, classify, parse_binding_response, DatagramKind, TransactionId};

fuzz_target!(|data: &[u8]| {
    let kind = classify(data);
    let observers: [SocketAddr; 3] = [
        "198.18.0.9:4242".parse().expect("literal"),
        "[2001:db8::9]:4242".parse().expect("literal"),
        "[::ffff:198.18.0.9]:4242".parse().expect("literal"),
    ];
    for observed in observers {
        if let Ok(response) = binding_response(data, observed) {
            assert_eq!(kind, DatagramKind::Stun, "answered a datagram classify calls {kind:?}");
            // Fixed size documented on binding_response.
            assert!(response.len() <= 88, "{}-byte response", response.len());
            // An RFC 8489 request's answer is STUN to our own demultiplexer
            // and parses as the answer to that request. (Cookie-less RFC 3489
            // requests get a cookie-less RFC 3489 answer, which neither the
            // demultiplexer nor the RFC 8489 client takes.)
            if data.get(4..8) == Some(&[0x21, 0x12, 0xA4, 0x42][..]) {
                assert_eq!(classify(&response), DatagramKind::Stun);
                let tid = TransactionId::try_from(&data[8..20]).expect("20-byte header");
                let parsed = parse_binding_response(&response, &tid).expect("own response parses");
                assert_eq!(parsed, SocketAddr::new(observed.ip().to_canonical(), observed.port()));
            }
        }
    }
    let mut dir = Directory::new(DirectoryConfig::default());
    dir.set_listen_addrs(vec!["198.18.0.1:3478".parse().expect("literal"), "198.18.0.1:3479".parse().expect("literal")]);
    let now = std::time::Instant::now();
    for (local, observed) in observers.into_iter().enumerate() {
        dir.handle_datagram_on(local % 2, observed, data, now);
        while let Some(reply) = dir.poll_transmit() {
            assert!(reply.payload.len() <= data.len(), "{}-byte request from an unregistered source drew {} bytes", data.len(), reply.payload.len());
        }
    }
    let own_tid = data.get(8..20).and_then(|t| TransactionId::try_from(t).ok()).unwrap_or_default();
    for tid in [own_tid, [0x5A; 12]] {
        if parse_binding_response(data, &tid).is_ok() {
            assert_eq!(kind, DatagramKind::Stun, "parsed a datagram classify calls {kind:?}");
        }
    }
});
