//! Firewall rules (config file and command-line text) and the stateful
//! filter: `Rule::from_str` on every line before the first NUL byte (what
//! parses must print back to text that parses to the same rule), then the
//! bytes after it, as length-prefixed packets, through `Firewall::outbound`
//! and `Firewall::inbound` with those rules.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use meshtun_addr::MeshAddr;
use meshtun_overlay::firewall::{Firewall, FirewallConfig, Rule};

fuzz_target!(|data: &[u8]| {
    let (text, packets) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else { return };
    let mut rules = Vec::new();
    for line in text.lines() {
        if let Ok(rule) = line.parse::<Rule>() {
            let printed = rule.to_string();
            assert_eq!(printed.parse::<Rule>().as_ref(), Ok(&rule), "{line:?} printed as {printed:?}");
            rules.push(rule);
        }
    }
    let Some((&flags, mut rest)) = packets.split_first() else { return };
    let mut firewall = Firewall::new(FirewallConfig { default_inbound: None, rules }, flags & 1 == 1);
    let peers: [MeshAddr; 2] =
        ["7:A91F.0000.7C2E".parse().expect("literal"), "7:0000.0000.0001".parse().expect("literal")];
    let groups = ["ops".to_string(), "research".to_string()];
    let start = Instant::now();
    let mut i = 0usize;
    while let Some((&head, tail)) = rest.split_first() {
        let len = usize::from(head & 0x3f) * 4;
        let (packet, tail) = tail.split_at(len.min(tail.len()));
        let peer = peers[usize::from(head >> 7)];
        let now = start + Duration::from_secs(i as u64 * 7);
        if head & 0x40 == 0 {
            firewall.outbound(peer, packet, now);
        } else {
            let _ = firewall.inbound(peer, &groups[..usize::from(flags >> 1) % 3], packet, now);
        }
        rest = tail;
        i += 1;
    }
});
