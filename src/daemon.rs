//! `meshtun up`: the thin tokio driver around the overlay core. It moves
//! packets between the TUN, the UDP socket and [`meshtun_overlay::Node`],
//! serves the control socket, and leaves cleanly on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use meshtun_addr::{NetworkId, NETWORK_PREFIX_LEN};
use meshtun_overlay::{Node, NodeConfig};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::cli_error::CliError;
use crate::control::{self, Request};
use crate::state::StateDir;
use crate::udp::{self, MeshSocket};

pub struct UpOptions {
    pub backbones: Vec<String>,
    pub hostname: Option<String>,
    pub network: NetworkId,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub interface: String,
    pub listen_port: u16,
    pub mtu: u16,
    pub heartbeat: Duration,
}

/// How long a stopping daemon waits for backbones to confirm deregistration.
const DEREGISTER_GRACE: Duration = Duration::from_secs(2);
/// How often interface addresses are re-read (roaming, DHCP).
const ENDPOINT_REFRESH: Duration = Duration::from_secs(10);

pub async fn run(options: UpOptions, json: bool) -> anyhow::Result<()> {
    if let Some(name) = &options.hostname {
        meshtun_proto::record::validate_hostname(name).map_err(|e| {
            CliError::new("invalid_argument", format!("--hostname: {e}"))
                .hint("use one lowercase DNS label, e.g. specialist-papers")
        })?;
    }
    let state = StateDir::open(&options.state_dir)?;
    let (identity, created) = state.load_or_create_identity()?;
    if created {
        tracing::info!(address = %identity.mesh_addr(options.network), "created a new identity");
    }
    let wg_secret = state.load_or_create_wireguard_key()?;
    let me = identity.mesh_addr(options.network);

    let backbones = resolve_backbones(&options.backbones).await?;
    let socket = MeshSocket::bind(None, options.listen_port)?;
    let port = socket.local_port();
    let listener = control::bind(&options.socket).await?;
    let tun = crate::tun_device::create(&options.interface, options.mtu, me.to_ipv6(), NETWORK_PREFIX_LEN)?;

    let now = Instant::now();
    let config = NodeConfig {
        network: options.network,
        hostname: options.hostname.clone(),
        backbones: backbones.clone(),
        local_endpoints: udp::local_endpoints(port, &options.interface),
        heartbeat_interval: options.heartbeat,
        initial_seq: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(1),
        rng_seed: rand::random(),
        ..NodeConfig::default()
    };
    let mut node = Node::new(config, identity, wg_secret, now);
    tracing::info!(address = %me, ipv6 = %me.to_ipv6(), interface = %options.interface, port, "meshtun is up");
    let ready = serde_json::json!({
        "address": me.to_string(),
        "ipv6": me.to_ipv6(),
        "interface": options.interface,
        "listen_port": port,
        "backbones": backbones,
    });
    if json {
        println!("{}", control::ok_envelope(ready));
    } else {
        println!("meshtun up: {me} ({}) on {}, UDP port {port}", me.to_ipv6(), options.interface);
    }

    let (control_tx, mut control_rx) = mpsc::channel(16);
    let control_task = tokio::spawn(control::serve(listener, control_tx));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut refresh = tokio::time::interval(ENDPOINT_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut tun_buf = vec![0u8; meshtun_overlay::MAX_PACKET];
    let mut udp_buf = vec![0u8; meshtun_overlay::MAX_PACKET];
    let mut down_requested: Option<control::Pending> = None;
    loop {
        flush(&mut node, &socket, &tun).await;
        let deadline = node.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            read = tun.recv(&mut tun_buf) => match read {
                Ok(n) => node.handle_tun_packet(&tun_buf[..n], Instant::now()),
                Err(e) => return Err(e).context("reading from the TUN interface failed"),
            },
            received = socket.recv_from(&mut udp_buf) => match received {
                Ok((n, from)) => node.handle_udp(from, &udp_buf[..n], Instant::now()),
                // ICMP port unreachable surfaces as ECONNREFUSED on the next
                // read; it is not fatal for a connectionless socket.
                Err(e) => tracing::debug!(error = %e, "UDP receive error"),
            },
            _ = tokio::time::sleep_until(deadline.into()) => node.handle_timeout(Instant::now()),
            Some(pending) = control_rx.recv() => match pending.request {
                Request::Status => {
                    let mut data = serde_json::to_value(node.status(Instant::now()))?;
                    data["role"] = "node".into();
                    data["interface"] = options.interface.clone().into();
                    data["listen_port"] = port.into();
                    let _ = pending.reply.send(control::ok_envelope(data));
                }
                Request::Down => {
                    down_requested = Some(pending);
                    break;
                }
            },
            _ = refresh.tick() => node.set_local_endpoints(udp::local_endpoints(port, &options.interface), Instant::now()),
            _ = sigterm.recv() => { tracing::info!("SIGTERM: leaving the mesh"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: leaving the mesh"); break; }
        }
    }

    // Leave: deregister (bounded wait), then drop the TUN, which removes the interface.
    node.shutdown(Instant::now());
    let give_up = Instant::now() + DEREGISTER_GRACE;
    while !node.is_deregistered() && Instant::now() < give_up {
        flush(&mut node, &socket, &tun).await;
        if let Ok(Ok((n, from))) = tokio::time::timeout_at(give_up.into(), socket.recv_from(&mut udp_buf)).await {
            node.handle_udp(from, &udp_buf[..n], Instant::now());
        }
    }
    if !node.is_deregistered() {
        tracing::warn!("not every backbone confirmed deregistration; it forgets this node when the record expires");
    }
    control_task.abort();
    drop(tun);
    let _ = std::fs::remove_file(&options.socket);
    if let Some(pending) = down_requested {
        pending.answer_and_flush(control::ok_envelope(serde_json::json!({ "stopped": me.to_string() }))).await;
    }
    tracing::info!("meshtun is down");
    Ok(())
}

async fn flush(node: &mut Node, socket: &MeshSocket, tun: &tun::AsyncDevice) {
    while let Some(transmit) = node.poll_transmit() {
        if let Err(e) = socket.send_to(&transmit.payload, transmit.dst).await {
            tracing::debug!(dst = %transmit.dst, error = %e, "UDP send failed");
        }
    }
    while let Some(packet) = node.poll_tun() {
        if let Err(e) = tun.send(&packet).await {
            tracing::debug!(error = %e, "TUN write failed");
        }
    }
    while let Some(event) = node.poll_event() {
        tracing::info!(event = %serde_json::to_string(&event).unwrap_or_default(), "event");
    }
}

pub async fn resolve_backbones(specs: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    if specs.is_empty() {
        return Err(CliError::new("invalid_argument", "no backbone given")
            .hint("pass --backbone HOST:PORT (the address of a `meshtun backbone`)")
            .into());
    }
    let mut out = Vec::new();
    for spec in specs {
        let resolved = tokio::net::lookup_host(spec.as_str()).await.map_err(|e| {
            CliError::new("backbone_unresolvable", format!("cannot resolve backbone {spec:?}: {e}"))
                .hint("give it as HOST:PORT or IP:PORT, e.g. --backbone 198.18.0.1:7400")
        })?;
        for addr in resolved {
            let addr = udp::normalise(addr);
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    Ok(out)
}
