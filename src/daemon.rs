//! `meshtun up`: sets the node up (identity, keys, TUN, sockets), starts
//! the packet engine's thread ([`crate::engine`]), which moves packets
//! between the TUN, the UDP socket and [`meshtun_overlay::Node`], and on
//! this tokio runtime serves the control socket and metrics and forwards
//! ticks and SIGINT/SIGTERM to it; then it leaves cleanly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use meshtun_addr::{NetworkId, NETWORK_PREFIX_LEN};
use meshtun_overlay::{Node, NodeConfig};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::cli_error::CliError;
use crate::control;
use crate::state::StateDir;
use crate::engine::{unix_now, Engine, EngineHandle, Slow};
use crate::udp::{self, MeshSocket};

pub struct UpOptions {
    pub backbones: Vec<String>,
    /// Standalone relays (`meshtun relay`), HOST:PORT; may be empty.
    pub relays: Vec<String>,
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
    let wg_key = state.load_or_create_wireguard_key()?;
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
    let me = identity.mesh_addr(options.network);

    let backbones = resolve_backbones(&options.backbones).await?;
    let relays = match options.relays.is_empty() {
        true => Vec::new(),
        false => resolve_backbones(&options.relays).await?,
    };
    let (socket, connect_peers) = MeshSocket::bind_shared(options.listen_port)?;
    let port = socket.local_port();
    let listener = control::bind(&options.socket).await?;
    let metrics_listener = match options.metrics_listen {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    let crate::tun_device::MeshTun { device: tun, offload } =
        crate::tun_device::create(&options.interface, options.mtu, me.to_ipv6(), NETWORK_PREFIX_LEN, meshtun_addr::canonical_ipv4(me), options.offload)?;
    let udp_gro = offload && socket.enable_offloads();
    tracing::debug!(tun_offload = offload, udp_gro, "offloads");

    let now = Instant::now();
    let config = NodeConfig {
        network: options.network,
        hostname: options.hostname.clone(),
        capabilities: options.capabilities.clone(),
        groups: options.groups.clone(),
        backbones: backbones.clone(),
        relays: relays.clone(),
        network_owner,
        certificate,
        firewall,
        wg_key_version: wg_key.version,
        wg_key_expires_unix: crate::engine::key_expiry(rotation, wg_key.issued_unix),
        local_endpoints: udp::local_endpoints(port, &options.interface),
        heartbeat_interval: options.heartbeat,
        initial_seq: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(1),
        rng_seed: rand::random(),
        ..NodeConfig::default()
    };
    let mut node = Node::new(config, identity, wg_key.secret.clone(), now);
    node.set_unix_time(unix_now());
    let next_rotation = (!rotation.is_zero()).then(|| {
        let due = wg_key.issued_unix + rotation.as_secs();
        Instant::now() + Duration::from_secs(due.saturating_sub(unix_now()))
    });
    let aliases_file = options.state_dir.join(crate::state::IPV4_ALIASES_FILE);
    node.restore_ipv4_aliases(&crate::state::load_ipv4_aliases(&aliases_file));
    let saved_aliases = node.ipv4_aliases();
    let dns_socket = match options.dns_port {
        0 => None,
        port => Some(bind_dns(me.to_ipv6(), port)?),
    };
    let resolved = dns_socket.as_ref().and_then(|_| resolved_link::configure(&options.interface, me.to_ipv6(), options.dns_port, &options.dns_domain, !options.resolved));
    tracing::info!(address = %me, ipv6 = %me.to_ipv6(), interface = %options.interface, port, "meshtun is up");
    let ready = serde_json::json!({
        "address": me.to_string(),
        "ipv6": me.to_ipv6(),
        "interface": options.interface,
        "listen_port": port,
        "backbones": backbones,
        "relays": relays,
    });
    if json {
        println!("{}", control::ok_envelope(ready));
    } else {
        println!("meshtun up: {me} ({}) on {}, UDP port {port}", me.to_ipv6(), options.interface);
    }

    let hub = crate::events::Hub::new();
    let source = control::EventSource { events: hub.sender(), node: me.to_string() };
    // Packets are the engine thread's alone; this runtime serves the control
    // socket, metrics, signals and ticks and hands the engine what it needs.
    let (engine, inbox) = crate::engine::channel()?;
    let (control_tx, control_rx) = mpsc::channel(16);
    let mut tasks = vec![
        tokio::spawn(control::serve_with_events(listener, control_tx, Some(source))),
        forward(control_rx, engine.clone(), Slow::Control),
        tokio::spawn(refresh_endpoints(engine.clone())),
        tokio::spawn(stop_on_signal(signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?, engine.clone())),
    ];
    if let Some(listener) = metrics_listener {
        tracing::info!(listen = %options.metrics_listen.map(|a| a.to_string()).unwrap_or_default(), "serving metrics");
        let (metrics_tx, metrics_rx) = mpsc::channel::<crate::metrics::HttpRequest>(8);
        tasks.push(tokio::spawn(crate::metrics::serve(listener, metrics_tx)));
        tasks.push(forward(metrics_rx, engine.clone(), Slow::Metrics));
    }
    let parts = Engine {
        node,
        socket: socket.into_engine().context("cannot hand the UDP socket to the packet engine")?,
        tun,
        tun_offload: offload,
        udp_gro,
        connect_peers,
        dns: dns_socket,
        dns_domain: options.dns_domain.clone(),
        hub,
        network: options.network,
        interface: options.interface.clone(),
        listen_port: port,
        state,
        wg_key,
        rotation,
        next_rotation,
        aliases_file,
        saved_aliases,
        cert_not_after,
        started_unix: crate::metrics::unix_now(),
        path_mtu_asked: std::collections::HashMap::new(),
        next_df_probe: std::time::Instant::now(),
        next_lone_datagram_check: std::time::Instant::now(),
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("meshtun-engine".into())
        .spawn(move || {
            let _ = done_tx.send(parts.run(inbox));
        })
        .context("cannot start the packet engine thread")?;
    let exit = done_rx.await.map_err(|_| anyhow::anyhow!("the packet engine thread panicked"));
    let _ = thread.join();
    for task in tasks {
        task.abort();
    }
    let exit = exit.and_then(|r| r);
    if let Some(link) = resolved {
        link.revert();
    }
    let _ = std::fs::remove_file(&options.socket);
    let exit = exit?;
    // Dropping the TUN removes the interface.
    drop(exit.tun);
    if let Some(pending) = exit.down {
        pending.answer_and_flush(control::ok_envelope(serde_json::json!({ "stopped": me.to_string() }))).await;
    }
    tracing::info!("meshtun is down");
    Ok(())
}

fn forward<T: Send + 'static>(mut from: mpsc::Receiver<T>, to: EngineHandle, wrap: fn(T) -> Slow) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(item) = from.recv().await {
            if !to.send(wrap(item)) {
                break;
            }
        }
    })
}

async fn refresh_endpoints(to: EngineHandle) {
    let mut refresh = tokio::time::interval(ENDPOINT_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        refresh.tick().await;
        if !to.send(Slow::Refresh) {
            return;
        }
    }
}

async fn stop_on_signal(mut sigterm: tokio::signal::unix::Signal, mut sigint: tokio::signal::unix::Signal, to: EngineHandle) {
    let name = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    to.send(Slow::Stop(name));
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

fn bind_dns(ip: std::net::Ipv6Addr, port: u16) -> anyhow::Result<std::net::UdpSocket> {
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
    Ok(socket.into())
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
