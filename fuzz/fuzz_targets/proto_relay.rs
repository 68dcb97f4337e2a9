//! Relay framing: `relay::unwrap` on arbitrary datagrams; what it accepts
//! must be exactly `wrap` of what it returned.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshtun_proto::relay;

fuzz_target!(|data: &[u8]| {
    if let Some((peer, payload)) = relay::unwrap(data) {
        assert_eq!(relay::wrap(peer, payload), data);
        assert_eq!(payload.len() + relay::RELAY_HEADER_LEN, data.len());
    }
});
