//! A small run of the load generator (issue 9): 20,000 simulated nodes
//! against the real `meshtun backbone` on loopback for a few seconds. Proves
//! the load generator works and that the backbone answers correctly under
//! load: every node registers, heartbeats are acknowledged, and every
//! lookup answer (by address, hostname and capability) is checked against
//! the record the load generator registered, its signature verified.
//!
//! No timing is asserted (a shared 2-core CI machine); the figures are
//! printed. The 20,000 nodes use 1,000 identities: node `k` is identity
//! `k % 1000` in network `k / 1000` (0 public, 1..19 private networks with
//! certificates), because proof of work makes identities the expensive part
//! (about 20 ms of CPU each; cached in target/loadgen-identities-1.bin, so
//! only the first run pays). `cargo test --test loadgen_small -- --nocapture`.

use std::path::PathBuf;
use std::time::Duration;

use meshtun_loadgen::identities::default_cache;
use meshtun_loadgen::run::{run, Backbones, Options};

#[test]
fn twenty_thousand_simulated_nodes_get_correct_answers_under_load() {
    let opts = Options {
        nodes: 20_000,
        identities: Some(1_000),
        cache: Some(default_cache(1)),
        threads: 2,
        heartbeat: Duration::from_secs(10),
        duration: Duration::from_secs(5),
        lookup_rate: 1_000.0,
        verify_every: 1,
        sockets: 256,
        window: 2048,
        backbones: Backbones::Spawn {
            bin: PathBuf::from(env!("CARGO_BIN_EXE_meshtun")),
            count: 1,
            ttl_secs: 75,
            state_dir: None,
            extra_args: vec![],
        },
        ..Options::default()
    };
    let r = run(&opts).expect("the load run");
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
    let b = &r.backbones[0];
    println!(
        "registrations {:.0}/s, heartbeats {:.0}/s, lookups {:.0}/s; lookup p50 {} us p99 {} us; backbone cpu {:?} cores, rss {:?} B per record",
        r.registrations_per_sec,
        r.heartbeats_per_sec,
        r.lookups_per_sec,
        r.lookup_latency.p50_us,
        r.lookup_latency.p99_us,
        b.cpu_cores_steady,
        b.rss_per_record_bytes.map(|x| x as u64)
    );
    assert_eq!(r.registrations_lost, 0, "every node registers (after retries)");
    assert_eq!(r.registrations_rejected, 0, "no registration is refused");
    assert_eq!(b.records, 20_000);
    assert!(r.heartbeats_sent >= 9_000, "heartbeats went out: {}", r.heartbeats_sent);
    assert!(
        r.heartbeats_acked * 100 >= r.heartbeats_sent * 95,
        "heartbeats acknowledged: {} of {}",
        r.heartbeats_acked,
        r.heartbeats_sent
    );
    assert!(r.lookups_sent >= 4_000, "lookups went out: {}", r.lookups_sent);
    assert_eq!(r.lookups_wrong, 0, "wrong answers");
    assert_eq!(r.signatures_bad, 0, "answers whose signature does not verify");
    assert_eq!(r.lookups_rejected, 0, "lookups refused");
    assert_eq!(r.signatures_checked, r.lookups_answered, "every answer's signature was checked");
    assert!(
        r.lookups_correct * 100 >= r.lookups_sent * 95,
        "lookups answered correctly: {} of {}",
        r.lookups_correct,
        r.lookups_sent
    );
    for (kind, l) in ["address", "hostname", "capability"].iter().zip(&r.lookup_latency_by_kind) {
        assert!(l.count > 0, "no {kind} lookup was answered");
    }
}
