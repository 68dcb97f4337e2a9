//! The backbone core alone (no sockets): CPU per heartbeat and per lookup,
//! and bytes per record. `cargo run --release -p meshtun-loadgen --example
//! directory_bench -- N` (N cached identities; see docs/SCALING.md).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshtun_addr::NetworkId;
use meshtun_backbone::{Directory, DirectoryConfig};
use meshtun_loadgen::procstat;
use meshtun_loadgen::run::{capability, hostname, Mesh};
use meshtun_proto::{Message, Query, SignedRecord};

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let ids = meshtun_loadgen::identities::load_or_generate(n, 1, Some(&meshtun_loadgen::identities::default_cache(1)), 2).unwrap();
    let mesh = Mesh::new(ids, vec!["127.0.0.1:7400".parse().unwrap()], 1, 1);
    let src = |i: usize| -> SocketAddr { SocketAddr::new(meshtun_loadgen::net::source_ip(i % 1024).into(), 40000 + (i / 1024) as u16) };
    let sign = |i: usize, seq: u64| SignedRecord::sign(&mesh.ids[i], &mesh.record(i, src(i), seq)).unwrap();
    let regs: Vec<Vec<u8>> = (0..n).map(|i| Message::Register { request_id: i as u64, record: sign(i, 1) }.encode()).collect();
    let beats: Vec<Vec<u8>> = (0..n).map(|i| Message::Register { request_id: i as u64, record: sign(i, 2) }.encode()).collect();
    let lookups: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let t = (i * 7919) % n;
            let query = match i % 3 {
                0 => Query::Address(mesh.addrs[t]),
                1 => Query::Hostname { network: NetworkId::PUBLIC, name: hostname(t) },
                _ => Query::Capability { network: NetworkId::PUBLIC, name: capability(t % mesh.caps) },
            };
            Message::Lookup { request_id: i as u64, from: mesh.addrs[i], query }.encode()
        })
        .collect();
    let config = DirectoryConfig { registrations_per_source: 1e9, record_ttl: Duration::from_secs(3600), ..DirectoryConfig::default() };
    let rss0 = procstat::rss_bytes(std::process::id()).unwrap_or(0);
    let mut dir = Directory::new(config);
    let now = Instant::now();
    let time = |dir: &mut Directory, msgs: &[Vec<u8>], what: &str| {
        let c = procstat::self_cpu_secs();
        let mut out = 0usize;
        for (i, m) in msgs.iter().enumerate() {
            dir.handle_datagram(src(i), m, now);
            while let Some(t) = dir.poll_transmit() {
                out += t.payload.len();
            }
        }
        let us = (procstat::self_cpu_secs() - c) * 1e6 / msgs.len() as f64;
        println!("{what:>22}: {us:6.1} us cpu each ({} replies bytes avg {})", msgs.len(), out / msgs.len());
        us
    };
    time(&mut dir, &regs, "first registration");
    let rss1 = procstat::rss_bytes(std::process::id()).unwrap_or(0);
    time(&mut dir, &beats, "heartbeat");
    time(&mut dir, &lookups, "lookup (1/3 each kind)");
    let rss2 = procstat::rss_bytes(std::process::id()).unwrap_or(0);
    println!(
        "records {}; rss +{:.1} MiB after registering ({:.0} B/record), +{:.1} MiB after heartbeats and lookups",
        dir.len(),
        (rss1 - rss0) as f64 / 1048576.0,
        (rss1 - rss0) as f64 / n as f64,
        (rss2 - rss0) as f64 / 1048576.0
    );
    // Verification alone, for comparison.
    let signed = sign(0, 3);
    let c = procstat::self_cpu_secs();
    for _ in 0..2000 {
        signed.verify().unwrap();
    }
    println!("{:>22}: {:6.1} us cpu each", "SignedRecord::verify", (procstat::self_cpu_secs() - c) * 1e6 / 2000.0);
}
