//! `meshtun netcheck`: what the network allows, asked of the backbones'
//! STUN service from one local UDP socket, without a daemon.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use meshtun_nat::{infer_filtering, infer_mapping, Change, ChangeProbe, FilteringBehavior, MappingBehavior};
use rand::RngCore;
use serde::Serialize;

use crate::udp::MeshSocket;

#[derive(Serialize)]
struct ServerResult {
    server: SocketAddr,
    /// Our address and port as this server saw them.
    mapped: Option<SocketAddr>,
    rtt_ms: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    udp: bool,
    local_port: u16,
    /// Distinct public endpoints seen by the servers.
    reflexive: Vec<SocketAddr>,
    /// "none" (public address), "endpoint_independent", "address_dependent",
    /// "address_and_port_dependent", or null when it cannot be told.
    mapping: Option<&'static str>,
    /// "endpoint_independent", "address_dependent",
    /// "address_and_port_dependent", or null with `filtering_reason`: asked
    /// of the first backbone that answered, with RFC 5780 CHANGE-REQUEST
    /// (answers from its other --listen sockets).
    filtering: Option<&'static str>,
    filtering_reason: Option<String>,
    /// Whether hole punching can be expected to work from here.
    hint: String,
    servers: Vec<ServerResult>,
}

pub async fn run(specs: &[String], port: u16, timeout: Duration, json: bool) -> anyhow::Result<()> {
    let servers = crate::daemon::resolve_backbones(specs).await?;
    let socket = MeshSocket::bind(None, port)?;
    let local_port = socket.local_port();
    let mut results: Vec<ServerResult> =
        servers.iter().map(|s| ServerResult { server: *s, mapped: None, rtt_ms: None }).collect();
    let mut buf = vec![0u8; 2048];
    // The filtering tests come before anything is sent to the other
    // backbones: an answer from an address this socket already sent to
    // would pass any NAT and prove nothing.
    let split = results.len().min(1);
    let (first, rest) = results.split_at_mut(split);
    ask(&socket, first, timeout, &mut buf).await;
    let (filtering, filtering_reason) = match first.iter().find(|r| r.mapped.is_some()) {
        Some(first) => match infer_filtering_from(&socket, first.server, timeout.min(Duration::from_millis(1500)), &mut buf).await {
            Ok(f) => (Some(f), None),
            Err(reason) => (None, Some(reason)),
        },
        None => (None, Some("the first backbone did not answer".to_string())),
    };
    ask(&socket, rest, timeout, &mut buf).await;
    let observations: Vec<(SocketAddr, SocketAddr)> =
        results.iter().filter_map(|r| r.mapped.map(|m| (r.server, m))).collect();
    let mut reflexive: Vec<SocketAddr> = Vec::new();
    for (_, m) in &observations {
        if !reflexive.contains(m) {
            reflexive.push(*m);
        }
    }
    let local_ips: Vec<IpAddr> = crate::udp::local_endpoints(0, "").iter().map(|e| e.ip()).collect();
    let public = !reflexive.is_empty() && reflexive.iter().all(|r| local_ips.contains(&r.ip()) && r.port() == local_port);
    let mapping = if public {
        Some("none")
    } else {
        infer_mapping(&observations).map(|m| match m {
            MappingBehavior::EndpointIndependent => "endpoint_independent",
            MappingBehavior::AddressDependent => "address_dependent",
            MappingBehavior::AddressAndPortDependent => "address_and_port_dependent",
        })
    };
    let hint = match (observations.is_empty(), mapping) {
        (true, _) => "no STUN answer: UDP to the backbones is blocked or they are down; meshtun cannot work from here until UDP is allowed".to_string(),
        (false, Some("none")) => "public address: peers can reach this host directly".to_string(),
        (false, Some("endpoint_independent")) => "NAT maps endpoint-independently: hole punching works with most peers".to_string(),
        (false, Some(_)) => "NAT maps per destination (symmetric): direct paths only to public hosts and open NATs; other peers are relayed".to_string(),
        (false, None) => "give two backbones (or a backbone with two --listen ports) to learn how the NAT maps".to_string(),
    };
    let report = Report {
        udp: !observations.is_empty(),
        local_port,
        reflexive,
        mapping,
        filtering: filtering.map(|f| match f {
            FilteringBehavior::EndpointIndependent => "endpoint_independent",
            FilteringBehavior::AddressDependent => "address_dependent",
            FilteringBehavior::AddressAndPortDependent => "address_and_port_dependent",
        }),
        filtering_reason,
        hint,
        servers: results,
    };
    if json {
        println!("{}", crate::control::ok_envelope(serde_json::to_value(&report)?));
    } else {
        println!("UDP        {}", if report.udp { "works" } else { "BLOCKED" });
        println!("local port {}", report.local_port);
        for r in &report.reflexive {
            println!("public     {r}");
        }
        println!("mapping    {}", report.mapping.unwrap_or("unknown"));
        match (report.filtering, &report.filtering_reason) {
            (Some(f), _) => println!("filtering  {f}"),
            (None, reason) => println!("filtering  unknown ({})", reason.as_deref().unwrap_or("not tested")),
        }
        for s in &report.servers {
            match (s.mapped, s.rtt_ms) {
                (Some(m), Some(rtt)) => println!("backbone   {:<22} rtt {rtt:.1} ms, sees us as {m}", s.server),
                _ => println!("backbone   {:<22} no answer", s.server),
            }
        }
        println!("=> {}", report.hint);
    }
    if !report.udp {
        return Err(crate::cli_error::CliError::new("udp_blocked", "no backbone answered STUN")
            .hint("check that outbound UDP to the backbone port is allowed and the backbones are running")
            .into());
    }
    Ok(())
}

/// RFC 5780 tests II (answer from another IP and port) and III (another
/// port) against `server`, which has just answered a plain request from
/// this socket. Requests are resent every 300 ms until both tests have an
/// answer or `wait` is over; silence then means the NAT filtered it.
async fn infer_filtering_from(socket: &MeshSocket, server: SocketAddr, wait: Duration, buf: &mut [u8]) -> Result<FilteringBehavior, String> {
    let tests = [Change { ip: true, port: true }, Change { ip: false, port: true }];
    let mut tids = [[0u8; 12]; 2];
    for tid in &mut tids {
        rand::rngs::OsRng.fill_bytes(tid);
    }
    let mut outcome: [Option<ChangeProbe>; 2] = [None, None];
    let deadline = Instant::now() + wait;
    let mut next_send = Instant::now();
    while Instant::now() < deadline && outcome.iter().any(Option::is_none) {
        if Instant::now() >= next_send {
            for ((change, tid), done) in tests.iter().zip(&tids).zip(&outcome) {
                if done.is_none() {
                    let _ = socket.send_to(&meshtun_nat::binding_request_with_change(*tid, *change), server).await;
                }
            }
            next_send = Instant::now() + Duration::from_millis(300);
        }
        let Ok(Ok((n, from))) = tokio::time::timeout_at(next_send.min(deadline).into(), socket.recv_from(buf)).await else {
            continue;
        };
        for (tid, done) in tids.iter().zip(&mut outcome) {
            match meshtun_nat::parse_binding_response(&buf[..n], tid) {
                // An answer from the very address asked comes from a server
                // that ignores CHANGE-REQUEST: the test is not available.
                Ok(_) if from == server => *done = Some(ChangeProbe::Unavailable),
                Ok(_) => *done = Some(ChangeProbe::Answered),
                Err(meshtun_nat::StunError::ErrorResponse { code: meshtun_nat::CHANGE_UNAVAILABLE, .. }) => *done = Some(ChangeProbe::Unavailable),
                _ => {}
            }
        }
    }
    let [ii, iii] = outcome.map(|o| o.unwrap_or(ChangeProbe::NoAnswer));
    tracing::debug!(?ii, ?iii, %server, "filtering tests");
    infer_filtering(ii, iii).map_err(str::to_string)
}

/// Plain Binding requests to every server in `results` (resent every
/// 400 ms) until each has answered or `timeout` is over.
async fn ask(socket: &MeshSocket, results: &mut [ServerResult], timeout: Duration, buf: &mut [u8]) {
    let mut pending: Vec<([u8; 12], SocketAddr, Instant)> = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut next_send = Instant::now();
    while Instant::now() < deadline && results.iter().any(|r| r.mapped.is_none()) {
        if Instant::now() >= next_send {
            for r in results.iter().filter(|r| r.mapped.is_none()) {
                let mut tid = [0u8; 12];
                rand::rngs::OsRng.fill_bytes(&mut tid);
                let request = meshtun_nat::binding_request(tid);
                let _ = socket.send_to(&request, r.server).await;
                pending.push((tid, r.server, Instant::now()));
            }
            next_send = Instant::now() + Duration::from_millis(400);
        }
        let wait = next_send.min(deadline);
        let Ok(Ok((n, from))) = tokio::time::timeout_at(wait.into(), socket.recv_from(buf)).await else {
            continue;
        };
        for (tid, server, sent) in &pending {
            if *server != from {
                continue;
            }
            if let Ok(mapped) = meshtun_nat::parse_binding_response(&buf[..n], tid) {
                if let Some(r) = results.iter_mut().find(|r| r.server == from && r.mapped.is_none()) {
                    r.mapped = Some(mapped);
                    r.rtt_ms = Some(sent.elapsed().as_secs_f64() * 1000.0);
                }
                break;
            }
        }
    }
}
