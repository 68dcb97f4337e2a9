//! `meshtun backbone`: the tokio driver around the directory core.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use meshtun_backbone::{Directory, DirectoryConfig};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::control::{self, Request};
use crate::udp::MeshSocket;

pub struct BackboneOptions {
    pub listen: SocketAddr,
    pub socket: PathBuf,
    pub record_ttl: Duration,
}

pub async fn run(options: BackboneOptions, json: bool) -> anyhow::Result<()> {
    let socket = MeshSocket::bind(Some(options.listen.ip()), options.listen.port())?;
    let listener = control::bind(&options.socket).await?;
    let mut directory = Directory::new(DirectoryConfig { record_ttl: options.record_ttl, ..DirectoryConfig::default() });
    tracing::info!(listen = %options.listen, ttl_secs = options.record_ttl.as_secs(), "backbone is up");
    if json {
        println!("{}", control::ok_envelope(serde_json::json!({ "listen": options.listen })));
    } else {
        println!("meshtun backbone: listening on UDP {}", options.listen);
    }
    let (control_tx, mut control_rx) = mpsc::channel(16);
    let control_task = tokio::spawn(control::serve(listener, control_tx));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut buf = vec![0u8; 65535];
    loop {
        while let Some(t) = directory.poll_transmit() {
            if let Err(e) = socket.send_to(&t.payload, t.dst).await {
                tracing::debug!(dst = %t.dst, error = %e, "send failed");
            }
        }
        let deadline = directory.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
        tokio::select! {
            received = socket.recv_from(&mut buf) => match received {
                Ok((n, from)) => directory.handle_datagram(from, &buf[..n], Instant::now()),
                Err(e) => tracing::debug!(error = %e, "receive error"),
            },
            _ = tokio::time::sleep_until(deadline.into()) => directory.handle_timeout(Instant::now()),
            Some(pending) = control_rx.recv() => match pending.request {
                Request::Status => { let _ = pending.reply.send(control::ok_envelope(status(&directory, options.listen))); }
                Request::Down => { let _ = pending.reply.send(control::ok_envelope(serde_json::json!({"stopped": "backbone"}))); break; }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    control_task.abort();
    let _ = std::fs::remove_file(&options.socket);
    tracing::info!("backbone stopped");
    Ok(())
}

fn status(directory: &Directory, listen: SocketAddr) -> serde_json::Value {
    let now = Instant::now();
    let mut records: Vec<serde_json::Value> = directory
        .records()
        .map(|entry| {
            let r = &entry.record.record;
            serde_json::json!({
                "address": r.mesh_addr().to_string(),
                "ipv6": r.mesh_addr().to_ipv6(),
                "hostname": r.hostname,
                "endpoints": r.endpoints,
                "observed": entry.observed,
                "seq": r.seq,
                "expires_in_secs": entry.expires_at.saturating_duration_since(now).as_secs_f64(),
            })
        })
        .collect();
    records.sort_by(|a, b| a["address"].as_str().cmp(&b["address"].as_str()));
    let s = directory.stats();
    serde_json::json!({
        "role": "backbone",
        "listen": listen,
        "record_ttl_secs": directory.config().record_ttl.as_secs(),
        "records": records,
        "stats": {
            "registrations": s.registrations,
            "registrations_rejected": s.registrations_rejected,
            "deregistrations": s.deregistrations,
            "expirations": s.expirations,
            "lookups": s.lookups,
            "lookups_rejected": s.lookups_rejected,
            "stun_requests": s.stun_requests,
            "dropped_malformed": s.dropped_malformed,
            "dropped_unknown": s.dropped_unknown,
        },
    })
}
