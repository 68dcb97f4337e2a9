//! A standalone relay (`meshtun relay`, issue 3 item 4) in the netns lab:
//! two hosts behind symmetric NATs, a backbone and a separate relay on the
//! "internet" segment, both nodes started with `--relay`. The relayed TCP
//! transfer must go through the relay, not the backbone.
//!
//! Needs root and iproute2, nftables, iputils-ping; without root it prints
//! a skip line and passes. Run with:
//!
//!     cargo test --test netns_relay -- --nocapture

mod harness;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use harness::meshtun::bin;
use harness::nat::{
    control_status, payload, relayed_packets, require_nat_tools, send_hashed, start_node_with_args, start_sink, NatKind,
    NatLab, PathWatch, Side, BB_IP, BB_PORT,
};
use harness::{require_root, wait_until, Checks};
use serde_json::Value;

const RELAY_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 5);
const SINK_PORT: u16 = 9000;
const TRANSFER: usize = 3 * 1024 * 1024 / 2;

fn relayed_bytes(status: &Value) -> Option<u64> {
    status.pointer("/stats/relayed_bytes").and_then(Value::as_u64)
}

#[test]
fn two_symmetric_nat_hosts_relay_a_tcp_transfer_through_the_standalone_relay_not_the_backbone() {
    if !require_root("two_symmetric_nat_hosts_relay_a_tcp_transfer_through_the_standalone_relay_not_the_backbone") {
        return;
    }
    require_nat_tools();
    let lab = NatLab::new("rly");
    let ha = lab.host(NatKind::Symmetric, "a");
    let hb = lab.host(NatKind::Symmetric, "b");
    let bb = lab.start_backbone(&[SocketAddr::new(BB_IP.into(), BB_PORT)]);

    // The relay: its own host on the internet segment.
    let relay_ns = lab.lab.add_host("relay", &lab.inet, &format!("{RELAY_IP}/24"));
    let relay_addr = SocketAddr::new(RELAY_IP.into(), 7400);
    let relay_socket = lab.lab.path("relay.sock");
    let relay_listen = relay_addr.to_string();
    let relay = relay_ns.spawn_env(
        "relay",
        &[bin(), "relay", "--listen", &relay_listen, "--socket", relay_socket.to_str().unwrap()],
        &[("RUST_LOG", "debug"), ("NO_COLOR", "1")],
    );
    wait_until(Duration::from_secs(20), "the relay's status to answer", || {
        relay.check_running()?;
        let d = control_status(&relay_socket)?;
        match d.get("role").and_then(Value::as_str) {
            Some("relay") => Ok(()),
            other => Err(format!("role is {other:?}: {d}")),
        }
    });

    let relay_args = vec!["--relay".to_string(), relay_listen.clone()];
    let na = start_node_with_args(&lab.lab, &ha.ns, bb.listen, "alpha", &relay_args);
    let nb = start_node_with_args(&lab.lab, &hb.ns, bb.listen, "beta", &relay_args);
    for node in [&na, &nb] {
        wait_until(Duration::from_secs(30), &format!("{} to register with the backbone and the relay", node.hostname), || {
            node.proc.check_running()?;
            let d = control_status(&node.socket)?;
            let state = |list: &str| d.pointer(&format!("/{list}/0/state")).and_then(Value::as_str).map(str::to_string);
            match (state("backbones").as_deref(), state("relays").as_deref()) {
                (Some("registered"), Some("registered")) => node.interface_has_address(),
                other => Err(format!("states {other:?}: {d}")),
            }
        });
    }
    let mut checks = Checks::new();
    let relay_before = control_status(&relay_socket).ok().as_ref().and_then(relayed_bytes).unwrap_or(0);

    let data = payload(TRANSFER, 0x7265_6c61_7900);
    let sink = start_sink(&hb.ns, nb.id.ipv6, SINK_PORT, Duration::from_secs(40));
    let t0 = Instant::now();
    let mut watch = PathWatch::start(t0, vec![Side::of("A->B", &na, &nb), Side::of("B->A", &nb, &na)]);
    let sent = send_hashed(&ha.ns, nb.id.ipv6, SINK_PORT, &data, None, Duration::from_secs(20), || {});
    let received = sink.join().expect("sink thread panicked");
    match &sent {
        Ok(s) => {
            checks.check(s.hash_ok && s.bytes == TRANSFER, || format!("transfer corrupted: {s:?}; sink {received:?}"));
            println!(
                "relayed transfer of {TRANSFER} B: first byte after {:.2?}, transfer {:.2?} ({:.1} Mbit/s)",
                s.connect_after,
                s.transfer,
                TRANSFER as f64 * 8.0 / s.transfer.as_secs_f64() / 1e6
            );
        }
        Err(e) => {
            checks.check(false, || format!("TCP transfer failed: {e}; sink {received:?}"));
        }
    }
    checks.check(received.as_ref().is_ok_and(|r| r.bytes == TRANSFER), || format!("sink received {received:?}"));

    // Both sides relayed, via the relay's address.
    watch.wait_for(Duration::from_secs(5), |w| w.endpoint(0).is_some() && w.endpoint(1).is_some());
    for i in 0..2 {
        checks.check(watch.path(i).as_deref() == Some("relay"), || format!("side {i} path: {}", watch.last_entry(i)));
        checks.check(watch.endpoint(i).as_deref() == Some(relay_listen.as_str()), || {
            format!("side {i} is not relayed via {relay_listen}: {}", watch.last_entry(i))
        });
        checks.check(!watch.ever(i, "direct"), || format!("side {i} went direct between symmetric NATs: {}", watch.timeline(i)));
    }
    watch.stop();

    // `meshtun status` names the relay, and the relay each peer goes via.
    let text = na.ns.exec(&[bin(), "status", "--socket", na.socket.to_str().unwrap()]);
    checks.check(text.success() && text.stdout.contains(&format!("relay    {relay_listen}  registered")), || {
        format!("alpha's status does not list the relay: {}", text.describe())
    });
    let peer_line = text.stdout.lines().find(|l| l.contains(&nb.id.address)).unwrap_or_default().to_string();
    checks.check(peer_line.contains(&format!("via {relay_listen}")), || format!("alpha's line for beta: {peer_line:?}"));
    let relay_text = relay_ns.exec(&[bin(), "status", "--socket", relay_socket.to_str().unwrap()]);
    checks.check(relay_text.success() && relay_text.stdout.starts_with("relay on ") && relay_text.stdout.contains(&relay_listen), || {
        format!("the relay's status: {}", relay_text.describe())
    });

    let relay_status = control_status(&relay_socket);
    let relay_after = relay_status.as_ref().ok().and_then(relayed_bytes).unwrap_or(0);
    println!("relay relayed {} B during the test; relay status stats: {:?}", relay_after - relay_before, relay_status.as_ref().map(|d| d["stats"].clone()));
    checks.check(relay_after - relay_before >= TRANSFER as u64, || {
        format!("the relay's relayed-bytes counter grew by only {} B: {relay_status:?}", relay_after - relay_before)
    });
    let bb_relayed = relayed_packets(&bb);
    checks.check(bb_relayed == Ok(0), || format!("the backbone relayed {bb_relayed:?} packets; it should not have relayed any"));
    // The relay refused no discovery query: none was sent to it.
    let rejected = relay_status.as_ref().ok().and_then(|d| d.pointer("/stats/lookups_rejected").and_then(Value::as_u64));
    checks.check(rejected == Some(0), || format!("the relay rejected {rejected:?} lookups"));

    if !checks.failures().is_empty() {
        for n in [&na, &nb] {
            println!("--- {} log tail ---\n{}", n.hostname, n.proc.log_tail(30));
        }
        println!("--- relay log tail ---\n{}", relay.log_tail(30));
    }
    drop(watch);
    let _ = (&na, &nb, &bb, &relay);
    checks.finish();
}
