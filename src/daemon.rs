//! `meshtun up`: the thin tokio driver around the overlay core. It moves
//! packets between the TUN, the UDP socket and [`meshtun_overlay::Node`],
//! serves the control socket, and leaves cleanly on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use meshtun_addr::{NetworkId, NETWORK_PREFIX_LEN};
use meshtun_overlay::{offload, Node, NodeConfig};
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
    /// TUN segmentation offload and coalescing, UDP GSO/GRO.
    pub offload: bool,
    pub heartbeat: Duration,
    pub capabilities: Vec<String>,
    pub groups: Vec<String>,
    /// The DNS domain answered on the mesh address (e.g. "mesh").
    pub dns_domain: String,
    /// UDP port of the DNS server on the mesh address; 0 turns it off.
    pub dns_port: u16,
    /// Hand the DNS domain to systemd-resolved for the interface (unless in
    /// a non-host network namespace); false with `--no-resolved`.
    pub resolved: bool,
    pub cert: Option<PathBuf>,
    pub firewall_rules: Vec<String>,
    pub firewall_default: Option<String>,
    /// Interval of automatic WireGuard key rotation (zero: never).
    pub key_rotation: Duration,
    /// Serve Prometheus metrics (and the mesh picture) here over HTTP.
    pub metrics_listen: Option<SocketAddr>,
}

/// How long a stopping daemon waits for backbones to confirm deregistration.
const DEREGISTER_GRACE: Duration = Duration::from_secs(2);
/// How often interface addresses are re-read (roaming, DHCP).
const ENDPOINT_REFRESH: Duration = Duration::from_secs(10);

pub async fn run(options: UpOptions, json: bool) -> anyhow::Result<()> {
    // Before anything is created on disk: without the capability the TUN
    // cannot be made, and a half-started daemon would only confuse.
    if !has_net_admin() {
        return Err(CliError::new("not_root", "meshtun up needs CAP_NET_ADMIN to create its TUN interface and set its address and routes")
            .hint("run it as root (sudo meshtun up ...), or give the binary the capability: sudo setcap cap_net_admin+ep \"$(command -v meshtun)\"")
            .into());
    }
    if let Some(name) = &options.hostname {
        meshtun_proto::record::validate_hostname(name).map_err(|e| {
            CliError::new("invalid_argument", format!("--hostname: {e}"))
                .hint("use one lowercase DNS label, e.g. specialist-papers")
        })?;
    }
    for (flag, tags) in [("--capability", &options.capabilities), ("--group", &options.groups)] {
        for tag in tags {
            meshtun_proto::record::validate_hostname(tag).map_err(|e| {
                CliError::new("invalid_argument", format!("{flag} {tag:?}: {}", e.replace("hostname ", "")))
                    .hint("tags are lowercase DNS labels: a-z, 0-9 and '-'")
            })?;
        }
    }
    let state = StateDir::open(&options.state_dir)?;
    let (identity, created) = state.load_or_create_identity()?;
    if created {
        tracing::info!(address = %identity.mesh_addr(options.network), "created a new identity");
    }
    let mut wg_key = state.load_or_create_wireguard_key()?;
    let (network_owner, certificate) = match (&options.cert, options.network) {
        (Some(file), network) => {
            let (owner, cert) = crate::network_cmd::load_cert(file)?;
            let membership = cert.verify_signature(&owner).map_err(|e| CliError::new("config_error", format!("{}: {e}", file.display())))?;
            if membership.network != network || membership.member != identity.node_addr() {
                return Err(CliError::new(
                    "config_error",
                    format!("{} is for {}:{}, but this node is {}", file.display(), membership.network.0, membership.member, identity.mesh_addr(network)),
                )
                .hint("ask the network owner for a certificate for this node's address (`meshtun id --network N`)")
                .into());
            }
            (Some(owner), Some((cert, membership.not_after_unix)))
        }
        (None, network) if network != NetworkId::PUBLIC => {
            return Err(CliError::new("config_error", format!("network {} is private: a membership certificate is required", network.0))
                .hint("pass --cert FILE (from the owner's `meshtun network sign`)")
                .into());
        }
        (None, _) => (None, None),
    };
    let cert_not_after = certificate.as_ref().map(|(_, not_after)| *not_after);
    let certificate = certificate.map(|(cert, _)| cert);
    let mut firewall = meshtun_overlay::firewall::FirewallConfig::default();
    for rule in &options.firewall_rules {
        firewall.rules.push(rule.parse().map_err(|e: meshtun_overlay::firewall::RuleError| {
            CliError::new("invalid_argument", format!("--firewall: {e}")).hint("e.g. \"allow tcp/22 from group:ops\", \"deny udp/53\", \"allow icmp\"")
        })?);
    }
    firewall.default_inbound = options.firewall_default.as_deref().map(|d| {
        if d == "deny" { meshtun_overlay::firewall::Action::Deny } else { meshtun_overlay::firewall::Action::Allow }
    });
    let rotation = options.key_rotation;
    let key_expiry = |issued: u64| if rotation.is_zero() { meshtun_proto::record::NO_EXPIRY } else { issued + 2 * rotation.as_secs() };
    let me = identity.mesh_addr(options.network);

    let backbones = resolve_backbones(&options.backbones).await?;
    let socket = MeshSocket::bind(None, options.listen_port)?;
    let port = socket.local_port();
    let listener = control::bind(&options.socket).await?;
    let metrics_listener = match options.metrics_listen {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    let crate::tun_device::MeshTun { device: mut tun, offload } =
        crate::tun_device::create(&options.interface, options.mtu, me.to_ipv6(), NETWORK_PREFIX_LEN, meshtun_addr::canonical_ipv4(me), options.offload)?;
    let udp_gro = offload && socket.enable_offloads();
    tracing::debug!(tun_offload = offload, udp_gro, "offloads");
    let mut tun_io = TunIo::new(offload);

    let now = Instant::now();
    let config = NodeConfig {
        network: options.network,
        hostname: options.hostname.clone(),
        capabilities: options.capabilities.clone(),
        groups: options.groups.clone(),
        backbones: backbones.clone(),
        network_owner,
        certificate,
        firewall,
        wg_key_version: wg_key.version,
        wg_key_expires_unix: key_expiry(wg_key.issued_unix),
        local_endpoints: udp::local_endpoints(port, &options.interface),
        heartbeat_interval: options.heartbeat,
        initial_seq: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(1),
        rng_seed: rand::random(),
        ..NodeConfig::default()
    };
    let mut node = Node::new(config, identity, wg_key.secret.clone(), now);
    node.set_unix_time(unix_now());
    let mut next_rotation = (!rotation.is_zero()).then(|| {
        let due = wg_key.issued_unix + rotation.as_secs();
        Instant::now() + Duration::from_secs(due.saturating_sub(unix_now()))
    });
    let aliases_file = options.state_dir.join(crate::state::IPV4_ALIASES_FILE);
    node.restore_ipv4_aliases(&crate::state::load_ipv4_aliases(&aliases_file));
    let mut saved_aliases = node.ipv4_aliases();
    let dns_socket = match options.dns_port {
        0 => None,
        port => Some(bind_dns(me.to_ipv6(), port)?),
    };
    let resolved = dns_socket.as_ref().and_then(|_| resolved_link::configure(&options.interface, me.to_ipv6(), options.dns_port, &options.dns_domain, !options.resolved));
    let mut waiting = crate::requests::Waiting::default();
    let mut dns_buf = vec![0u8; 4096];
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
    let mut hub = crate::events::Hub::new();
    let source = control::EventSource { events: hub.sender(), node: me.to_string() };
    let control_task = tokio::spawn(control::serve_with_events(listener, control_tx, Some(source)));
    let (metrics_tx, mut metrics_rx) = mpsc::channel::<crate::metrics::HttpRequest>(8);
    let started_unix = crate::metrics::unix_now();
    let metrics_task = metrics_listener.map(|l| {
        tracing::info!(listen = %options.metrics_listen.map(|a| a.to_string()).unwrap_or_default(), "serving metrics");
        tokio::spawn(crate::metrics::serve(l, metrics_tx))
    });
    let mut watch = tokio::time::interval(crate::events::TICK);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut refresh = tokio::time::interval(ENDPOINT_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut tun_buf = vec![0u8; offload::MAX_READ];
    let mut udp_buf = vec![0u8; 1 << 16];
    let mut down_requested: Option<control::Pending> = None;
    loop {
        flush(&mut node, &socket, &tun, &mut tun_io, &mut hub).await;
        while let Some(answer) = node.poll_answer() {
            if let Some(reply) = waiting.answer(&mut node, answer, Instant::now()) {
                send_dns(&dns_socket, reply).await;
            }
        }
        for reply in waiting.expire(Instant::now()) {
            send_dns(&dns_socket, reply).await;
        }
        node.set_unix_time(unix_now());
        if next_rotation.is_some_and(|at| at <= Instant::now()) {
            if let Err(e) = rotate(&state, &mut wg_key, &mut node, key_expiry) {
                tracing::error!(error = %format!("{e:#}"), "scheduled key rotation failed; retrying in an hour");
            }
            next_rotation = Some(Instant::now() + if wg_key.issued_unix + 60 >= unix_now() { rotation } else { Duration::from_secs(3600) });
        }
        // Answers may have queued packets (pings): send them before sleeping.
        flush(&mut node, &socket, &tun, &mut tun_io, &mut hub).await;
        let deadline = [node.poll_timeout(), waiting.next_expiry()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            Some(Ok((n, from))) = recv_dns(&dns_socket, &mut dns_buf) => {
                if let Some(reply) = waiting.dns(&mut node, options.network, from, &dns_buf[..n], &options.dns_domain, Instant::now()) {
                    send_dns(&dns_socket, reply).await;
                }
            }
            read = tun.recv(&mut tun_buf) => match read {
                Ok(n) => {
                    tun_io.handle_read(&mut node, &mut tun_buf[..n], Instant::now());
                    // Drain what else is queued before paying for another
                    // trip round the loop (timers, select!, poll_timeout).
                    for _ in 1..DRAIN_BATCH {
                        match tun_try_recv(&mut tun, &mut tun_buf) {
                            Ok(n) => tun_io.handle_read(&mut node, &mut tun_buf[..n], Instant::now()),
                            Err(_) => break,
                        }
                    }
                }
                Err(e) => return Err(e).context("reading from the TUN interface failed"),
            },
            received = socket.recv_segments(&mut udp_buf) => match received {
                Ok(r) => {
                    let now = Instant::now();
                    tun_io.stats.count_udp(&r);
                    r.datagrams(&udp_buf).for_each(|d| node.handle_udp(r.from, d, now));
                    for _ in 1..DRAIN_BATCH {
                        match socket.try_recv_segments(&mut udp_buf) {
                            Ok(r) => {
                                tun_io.stats.count_udp(&r);
                                r.datagrams(&udp_buf).for_each(|d| node.handle_udp(r.from, d, now))
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) => tracing::trace!(error = %e, "UDP receive error"),
                        }
                    }
                }
                // ICMP port unreachable surfaces as ECONNREFUSED on the next
                // read; it is not fatal for a connectionless socket.
                Err(e) => tracing::trace!(error = %e, "UDP receive error"),
            },
            _ = tokio::time::sleep_until(deadline.into()) => node.handle_timeout(Instant::now()),
            Some(pending) = control_rx.recv() => match pending.request {
                Request::Status => {
                    let mut data = serde_json::to_value(node.status(Instant::now()))?;
                    data["role"] = "node".into();
                    data["interface"] = options.interface.clone().into();
                    data["listen_port"] = port.into();
                    data["offload"] = serde_json::json!({
                        "tun": offload,
                        "udp_gro": udp_gro,
                        "counters": tun_io.stats,
                    });
                    let _ = pending.reply.send(control::ok_envelope(data));
                }
                Request::Down => {
                    down_requested = Some(pending);
                    break;
                }
                Request::RotateKeys => {
                    let reply = match rotate(&state, &mut wg_key, &mut node, key_expiry) {
                        Ok(()) => control::ok_envelope(serde_json::json!({ "version": wg_key.version })),
                        Err(e) => control::error_envelope("io_error", &format!("{e:#}"), None),
                    };
                    if let Some(at) = next_rotation.as_mut() {
                        *at = Instant::now() + rotation;
                    }
                    let _ = pending.reply.send(reply);
                }
                Request::Set { hostname, capabilities, groups } => {
                    let status = node.status(Instant::now());
                    let hostname = hostname.or(status.hostname);
                    let capabilities = capabilities.unwrap_or(status.capabilities);
                    let groups = groups.unwrap_or(status.groups);
                    let invalid = hostname.iter().chain(capabilities.iter()).chain(groups.iter())
                        .find_map(|t| meshtun_proto::record::validate_hostname(t).err());
                    let reply = match invalid {
                        Some(e) => control::error_envelope("invalid_argument", &e, Some("names and tags are lowercase DNS labels: a-z, 0-9 and '-'")),
                        None => {
                            node.set_tags(hostname.clone(), capabilities.clone(), groups.clone(), Instant::now());
                            control::ok_envelope(serde_json::json!({ "hostname": hostname, "capabilities": capabilities, "groups": groups }))
                        }
                    };
                    let _ = pending.reply.send(reply);
                }
                _ => {
                    if let Some(unhandled) = waiting.control(&mut node, options.network, pending, Instant::now()) {
                        let _ = unhandled.reply.send(control::error_envelope("bad_request", "not a node request", None));
                    }
                }
            },
            Some(request) = metrics_rx.recv() => {
                let now = Instant::now();
                let response = crate::metrics::node_response(&request.path, node.status(now), hub.counters(), started_unix);
                let _ = request.reply.send(response);
            }
            _ = watch.tick() => {
                let now = Instant::now();
                hub.tick(&node.status(now), now);
                if let Some(not_after) = cert_not_after {
                    hub.certificate(not_after, unix_now());
                }
            }
            _ = refresh.tick() => {
                node.set_local_endpoints(udp::local_endpoints(port, &options.interface), Instant::now());
                let aliases = node.ipv4_aliases();
                if aliases != saved_aliases {
                    crate::state::save_ipv4_aliases(&aliases_file, &aliases);
                    saved_aliases = aliases;
                }
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: leaving the mesh"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: leaving the mesh"); break; }
        }
    }

    // Leave: deregister (bounded wait), then drop the TUN, which removes the interface.
    node.shutdown(Instant::now());
    let give_up = Instant::now() + DEREGISTER_GRACE;
    while !node.is_deregistered() && Instant::now() < give_up {
        flush(&mut node, &socket, &tun, &mut tun_io, &mut hub).await;
        if let Ok(Ok(r)) = tokio::time::timeout_at(give_up.into(), socket.recv_segments(&mut udp_buf)).await {
            r.datagrams(&udp_buf).for_each(|d| node.handle_udp(r.from, d, Instant::now()));
        }
    }
    if !node.is_deregistered() {
        tracing::warn!("not every backbone confirmed deregistration; it forgets this node when the record expires");
    }
    control_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    let aliases = node.ipv4_aliases();
    if aliases != saved_aliases {
        crate::state::save_ipv4_aliases(&aliases_file, &aliases);
    }
    if let Some(link) = resolved {
        link.revert();
    }
    drop(tun);
    let _ = std::fs::remove_file(&options.socket);
    if let Some(pending) = down_requested {
        pending.answer_and_flush(control::ok_envelope(serde_json::json!({ "stopped": me.to_string() }))).await;
    }
    tracing::info!("meshtun is down");
    Ok(())
}

/// Packets read from the TUN or the UDP socket per wake-up before the loop
/// goes back to `select!` (and flushes what they produced).
const DRAIN_BATCH: usize = 64;

/// A non-blocking read of one packet from the TUN: `WouldBlock` when it is
/// empty. It goes through tokio's readiness so an empty read clears it, and
/// the next `recv().await` sleeps instead of trying (and failing) again.
fn tun_try_recv(tun: &mut tun::AsyncDevice, buf: &mut [u8]) -> std::io::Result<usize> {
    use tokio::io::AsyncRead;
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut read = tokio::io::ReadBuf::new(buf);
    match std::pin::Pin::new(tun).poll_read(&mut cx, &mut read) {
        std::task::Poll::Ready(Ok(())) => Ok(read.filled().len()),
        std::task::Poll::Ready(Err(e)) => Err(e),
        std::task::Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
    }
}

/// What the offloads did, for `meshtun status` (and the tests that check
/// they are in use).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
struct OffloadStats {
    tun_super_packets_read: u64,
    tun_segments_split: u64,
    tun_super_packets_written: u64,
    udp_gro_receives: u64,
    udp_gro_datagrams: u64,
    /// Writes the TUN refused (each may hold many segments).
    tun_write_errors: u64,
}

impl OffloadStats {
    fn count_udp(&mut self, r: &udp::Received) {
        if r.len > r.segment {
            self.udp_gro_receives += 1;
            self.udp_gro_datagrams += r.len.div_ceil(r.segment.max(1)) as u64;
        }
    }
}

/// The TUN side of the driver: every read and write carries a virtio-net
/// header; with offload on, reads may be TCP super-packets to split and
/// writes coalesce segments of one flow. Buffers are reused.
struct TunIo {
    offload: bool,
    stats: OffloadStats,
    coalescer: offload::Coalescer,
    split_scratch: Vec<u8>,
    single: Vec<u8>,
    blocked: Vec<Vec<u8>>,
}

impl TunIo {
    fn new(offload: bool) -> TunIo {
        TunIo {
            offload,
            stats: OffloadStats::default(),
            coalescer: offload::Coalescer::new(),
            split_scratch: Vec::with_capacity(meshtun_overlay::MAX_PACKET),
            single: Vec::with_capacity(offload::MAX_READ),
            blocked: Vec::new(),
        }
    }

    fn handle_read(&mut self, node: &mut Node, read: &mut [u8], now: Instant) {
        match offload::split(read, &mut self.split_scratch, |packet| node.handle_tun_packet(packet, now)) {
            Ok(1) => {}
            Ok(segments) => {
                self.stats.tun_super_packets_read += 1;
                self.stats.tun_segments_split += segments as u64;
            }
            Err(e) => {
                tracing::trace!(error = %e, len = read.len(), "dropping a TUN read");
                node.handle_malformed_tun_read();
            }
        }
    }

    /// Writes what the node has for the TUN; what the device will not take
    /// now is written with the awaiting path.
    async fn write_all(&mut self, node: &mut Node, tun: &tun::AsyncDevice) {
        let device: &tun::Device = tun;
        let blocked = &mut self.blocked;
        let stats = &mut self.stats;
        let mut write = |buf: &[u8]| match device.send(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => blocked.push(buf.to_vec()),
            Err(e) => {
                stats.tun_write_errors += 1;
                tracing::trace!(error = %e, len = buf.len(), "TUN write failed");
            }
            Ok(_) => {
                if offload::VnetHdr::parse(buf).is_some_and(|h| h.gso_size != 0) {
                    stats.tun_super_packets_written += 1;
                }
            }
        };
        while let Some(packet) = node.poll_tun() {
            if self.offload {
                self.coalescer.push(&packet, &mut write);
            } else {
                self.single.clear();
                self.single.extend_from_slice(&[0; offload::VNET_HDR_LEN]);
                self.single.extend_from_slice(&packet);
                write(&self.single);
            }
        }
        self.coalescer.finish(&mut write);
        for buf in self.blocked.drain(..) {
            if let Err(e) = tun.send(&buf).await {
                tracing::trace!(error = %e, "TUN write failed");
            }
        }
    }
}

async fn flush(node: &mut Node, socket: &MeshSocket, tun: &tun::AsyncDevice, tun_io: &mut TunIo, hub: &mut crate::events::Hub) {
    // Datagrams go out DRAIN_BATCH at a time in one sendmmsg(2); what the
    // socket will not take now is sent with the awaiting path.
    let mut batch: Vec<meshtun_overlay::Transmit> = Vec::new();
    loop {
        batch.clear();
        while batch.len() < DRAIN_BATCH {
            match node.poll_transmit() {
                Some(t) => batch.push(t),
                None => break,
            }
        }
        if batch.is_empty() {
            break;
        }
        let views: Vec<(SocketAddr, &[u8])> = batch.iter().map(|t| (t.dst, t.payload.as_slice())).collect();
        let sent = socket.try_send_batch(&views).unwrap_or(0);
        for transmit in &batch[sent..] {
            if let Err(e) = socket.send_to(&transmit.payload, transmit.dst).await {
                tracing::trace!(dst = %transmit.dst, error = %e, "UDP send failed");
            }
        }
    }
    tun_io.write_all(node, tun).await;
    while let Some(event) = node.poll_event() {
        crate::events::log(&event);
        hub.core_event(&event, Instant::now());
    }
}

/// Whether this process holds CAP_NET_ADMIN in its effective set (what a
/// root process has, or a binary given it with setcap).
fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status").ok().as_deref().and_then(effective_caps).is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// The `CapEff:` mask of a /proc/PID/status text.
fn effective_caps(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A new WireGuard key: saved first (so a crash never loses it), then used.
fn rotate(state: &StateDir, key: &mut crate::state::WireguardKey, node: &mut Node, expiry: impl Fn(u64) -> u64) -> anyhow::Result<()> {
    let next = state.rotate_wireguard_key(key)?;
    node.rotate_wg_key(next.secret.clone(), next.version, expiry(next.issued_unix), Instant::now());
    *key = next;
    Ok(())
}

fn bind_dns(ip: std::net::Ipv6Addr, port: u16) -> anyhow::Result<tokio::net::UdpSocket> {
    let addr = SocketAddr::new(ip.into(), port);
    let busy = |e: std::io::Error| {
        CliError::new("port_busy", format!("cannot serve DNS on [{ip}]:{port}: {e}"))
            .hint("choose another --dns-port, or --dns-port 0 to turn the mesh DNS off")
    };
    let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, Some(socket2::Protocol::UDP)).map_err(busy)?;
    // The mesh address may still be tentative for a moment after it was
    // added; freebind lets the server bind to it anyway.
    socket.set_freebind_v6(true).map_err(busy)?;
    socket.set_only_v6(true).map_err(busy)?;
    socket.set_nonblocking(true).map_err(busy)?;
    socket.bind(&addr.into()).map_err(busy)?;
    Ok(tokio::net::UdpSocket::from_std(socket.into())?)
}

async fn recv_dns(socket: &Option<tokio::net::UdpSocket>, buf: &mut [u8]) -> Option<std::io::Result<(usize, SocketAddr)>> {
    match socket {
        Some(s) => Some(s.recv_from(buf).await),
        None => std::future::pending().await,
    }
}

async fn send_dns(socket: &Option<tokio::net::UdpSocket>, reply: crate::requests::DnsReply) {
    if let Some(s) = socket {
        if let Err(e) = s.send_to(&reply.bytes, reply.to).await {
            tracing::debug!(to = %reply.to, error = %e, "DNS reply failed");
        }
    }
}

/// Per-link DNS with systemd-resolved: queries for the mesh domain go to
/// our server on the mesh interface; undone on exit.
mod resolved_link {
    use std::process::Command;

    pub struct Link {
        interface: String,
    }

    /// Whether `meshtun up` may hand the mesh domain to systemd-resolved.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Decision {
        Configure,
        /// `--no-resolved` / `no_resolved = true`.
        OptedOut,
        /// We are in a network namespace other than the host's, where
        /// resolved (which runs in the host's) would read our ifindex as
        /// one of its own links.
        OtherNamespace,
    }

    /// The initial network namespace's inode number, fixed since Linux 6.18
    /// (`PROC_NET_INIT_INO`); earlier kernels numbered it like any other.
    const NET_INIT_INO: &str = "net:[4026531833]";

    /// Decides from the `readlink`s of `/proc/self/ns/net` and
    /// `/proc/1/ns/net` (the latter needs ptrace access to PID 1, which a
    /// daemon with only CAP_NET_ADMIN lacks) and the kernel's release.
    /// When it cannot tell, it configures, as before namespaces were checked.
    pub fn decide(opted_out: bool, own: Option<&str>, init: Option<&str>, kernel: Option<(u32, u32)>) -> Decision {
        if opted_out {
            return Decision::OptedOut;
        }
        match (own, init) {
            (Some(own), Some(init)) if own != init => Decision::OtherNamespace,
            (Some(own), None) if own != NET_INIT_INO && kernel.is_some_and(|k| k >= (6, 18)) => Decision::OtherNamespace,
            _ => Decision::Configure,
        }
    }

    fn kernel_release() -> Option<(u32, u32)> {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
        let mut parts = release.trim().split(['.', '-']);
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    }

    fn netns(path: &str) -> Option<String> {
        std::fs::read_link(path).ok().map(|l| l.to_string_lossy().into_owned())
    }

    pub fn configure(interface: &str, ip: std::net::Ipv6Addr, port: u16, domain: &str, opted_out: bool) -> Option<Link> {
        let (own, init) = (netns("/proc/self/ns/net"), netns("/proc/1/ns/net"));
        match decide(opted_out, own.as_deref(), init.as_deref(), kernel_release()) {
            Decision::Configure => {}
            Decision::OptedOut => {
                tracing::info!("not configuring systemd-resolved (--no-resolved): point your resolver at [{ip}]:{port} for *.{domain}");
                return None;
            }
            Decision::OtherNamespace => {
                tracing::info!(
                    own = own.as_deref().unwrap_or("?"),
                    "not configuring systemd-resolved: this is not the host's network namespace, where resolved would take {interface}'s ifindex for another link; point this namespace's resolver at [{ip}]:{port} for *.{domain}"
                );
                return None;
            }
        }
        if !std::path::Path::new("/run/systemd/resolve/io.systemd.Resolve").exists() {
            tracing::info!("systemd-resolved not running: point your resolver at [{ip}]:{port} for *.{domain} (see README)");
            return None;
        }
        let server = if port == 53 { format!("{ip}") } else { format!("[{ip}]:{port}") };
        let ok = Command::new("resolvectl").args(["dns", interface, &server]).status().is_ok_and(|s| s.success())
            && Command::new("resolvectl").args(["domain", interface, &format!("~{domain}")]).status().is_ok_and(|s| s.success());
        if ok {
            tracing::info!(%interface, %server, %domain, "systemd-resolved sends *.{domain} to the mesh DNS");
            Some(Link { interface: interface.to_string() })
        } else {
            tracing::warn!("could not configure systemd-resolved for the mesh domain; use the mesh DNS server directly");
            None
        }
    }

    impl Link {
        pub fn revert(self) {
            let _ = Command::new("resolvectl").args(["revert", &self.interface]).status();
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn resolved_is_configured_in_the_host_namespace_and_skipped_in_another_or_when_opted_out() {
            let host = Some("net:[4026531833]");
            let other = Some("net:[4026532301]");
            assert_eq!(decide(false, host, host, Some((6, 18))), Decision::Configure);
            assert_eq!(decide(false, other, other, Some((5, 15))), Decision::Configure, "same namespace as PID 1 on an old kernel");
            assert_eq!(decide(false, other, host, Some((6, 18))), Decision::OtherNamespace);
            assert_eq!(decide(false, other, Some("net:[4026531992]"), Some((5, 15))), Decision::OtherNamespace);
            assert_eq!(decide(true, host, host, Some((6, 18))), Decision::OptedOut);
            assert_eq!(decide(true, other, host, Some((6, 18))), Decision::OptedOut);
        }

        #[test]
        fn without_access_to_pid_1_the_fixed_initial_inode_decides_on_new_kernels_only() {
            let host = Some("net:[4026531833]");
            let other = Some("net:[4026532301]");
            assert_eq!(decide(false, host, None, Some((6, 18))), Decision::Configure);
            assert_eq!(decide(false, other, None, Some((6, 18))), Decision::OtherNamespace);
            assert_eq!(decide(false, other, None, Some((7, 0))), Decision::OtherNamespace);
            // Before 6.18 any inode can be the host's: configure as before.
            assert_eq!(decide(false, other, None, Some((6, 17))), Decision::Configure);
            assert_eq!(decide(false, other, None, None), Decision::Configure);
            assert_eq!(decide(false, None, None, Some((6, 18))), Decision::Configure);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_effective_capability_mask_is_read_from_proc_status() {
        let root = "Name:\tmeshtun\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(effective_caps(root), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_caps("CapEff:\t0000000000001000\n").map(|c| c & (1 << 12) != 0), Some(true));
        assert_eq!(effective_caps("CapEff:\t0000000000000000\n").map(|c| c & (1 << 12) != 0), Some(false));
        assert_eq!(effective_caps("Name: x\n"), None);
        assert_eq!(effective_caps("CapEff:\tnot-hex\n"), None);
    }
}
