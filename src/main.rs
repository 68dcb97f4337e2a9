//! The `meshtun` command: CLI, node daemon and backbone.

mod backbone_server;
mod assets;
mod cli_error;
mod cli_mesh;
mod clock;
mod config;
mod control;
mod daemon;
mod engine;
mod events;
mod graph;
mod metrics;
mod dns;
mod requests;
mod netcheck;
mod network_cmd;
mod state;
mod tun_device;
mod udp;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use meshtun_addr::NetworkId;

use cli_error::CliError;

const DEFAULT_STATE_DIR: &str = "/var/lib/meshtun";
pub const DEFAULT_SOCKET: &str = "/run/meshtun/meshtun.sock";
const DEFAULT_BACKBONE_SOCKET: &str = "/run/meshtun/backbone.sock";
const DEFAULT_RELAY_SOCKET: &str = "/run/meshtun/relay.sock";

/// meshtun: an overlay network for fleets of agents.
///
/// Every host gets a permanent mesh address (N:XXXX.XXXX.XXXX, mapped into
/// IPv6 fd4d:6573:6874::/48) on a TUN interface. Packets go straight to
/// the peer, encrypted end to end with WireGuard; a backbone only helps
/// peers find each other and never sees plaintext.
///
/// Quick start on one host:  sudo meshtun up --backbone 198.18.0.1:7400 --hostname my-agent
#[derive(Parser, Debug)]
#[command(name = "meshtun", version, propagate_version = true)]
struct Cli {
    /// Print machine-readable JSON: {"status":"ok","data":{...}} or
    /// {"status":"error","code":"...","message":"...","hint":"..."}.
    #[arg(long, global = true)]
    json: bool,

    /// Log level (error, warn, info, debug, trace). RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info", env = "MESHTUN_LOG_LEVEL")]
    log_level: String,

    /// Log format on stderr: text (for people) or json (one object per line).
    #[arg(long, global = true, value_enum, default_value = "text", env = "MESHTUN_LOG_FORMAT")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Join the mesh: create the TUN interface, register with the backbone(s)
    /// and carry traffic, in the foreground until SIGINT/SIGTERM or `meshtun down`.
    Up(UpArgs),
    /// Stop the running daemon: it deregisters and removes its interface.
    Down(SocketArgs),
    /// Show this node (address, backbones, peers) or, given a backbone's
    /// socket, the backbone's records.
    Status(StatusArgs),
    /// Stream what happens as it happens (peer up/down, path changes, key
    /// rotation, backbone lost/regained): one JSON object per line with
    /// --json, until interrupted or the daemon stops.
    Events(SocketArgs),
    /// Print this node's mesh address, IPv6 and IPv4 addresses and public
    /// key, creating the identity if there is none yet.
    Id(IdArgs),
    /// Run a backbone: a directory of signed node records that answers
    /// lookups and STUN and relays for nodes that cannot reach each other
    /// directly. It never sees plaintext and cannot forge records.
    Backbone(BackboneArgs),
    /// Run a standalone relay, apart from the directory.
    ///
    /// For operators who want relays near their nodes (or many of them)
    /// without running more backbones. Nodes started with `meshtun up
    /// --relay HOST:PORT` register and heartbeat here (that is how the relay
    /// authenticates them and learns their endpoints) and relay their
    /// end-to-end encrypted WireGuard datagrams through it when no direct
    /// path exists (both sides behind symmetric NATs, say). It also answers
    /// STUN. It relays only between registered nodes that asked for each
    /// other, within a per-node byte rate, and answers only address lookups
    /// (they grant that permission); hostname, capability, group, IPv4 and
    /// key lookups are refused with `relay_only`: those belong to the
    /// backbones. It keeps nothing across restarts (nodes re-register
    /// within one heartbeat).
    Relay(RelayArgs),
    /// Check the network without a running daemon: is UDP open, what is our
    /// public endpoint, how does our NAT map, how far are the backbones.
    Netcheck(NetcheckArgs),
    /// Ping a node through the mesh itself (hostname, mesh address or mesh
    /// IPv6) and show the path and RTT.
    Ping(cli_mesh::PingArgs),
    /// Find nodes by capability and/or group, best first.
    Find(cli_mesh::FindArgs),
    /// Resolve a hostname to its mesh address.
    Resolve(cli_mesh::ResolveArgs),
    /// Change this node's hostname, capabilities or groups at run time.
    Set(cli_mesh::SetArgs),
    /// Private networks: owner key, membership certificates, revocations.
    #[command(subcommand)]
    Network(network_cmd::NetworkCommand),
    /// Rotate this node's WireGuard key now (the mesh address stays).
    RotateKeys(SocketArgs),
    /// Work with config files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Write the man pages and shell completions (for packaging).
    #[command(hide = true)]
    GenerateAssets(GenerateAssetsArgs),
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate a config file without running anything (no root needed).
    ///
    /// Prints `FILE: OK`, or the problem as `FILE:LINE:COLUMN: message` and
    /// exits with status 78.
    Check(ConfigCheckArgs),
}

#[derive(Args, Debug)]
struct ConfigCheckArgs {
    /// The file to check [default: /etc/meshtun/meshtun.toml, or
    /// /etc/meshtun/backbone.toml with --backbone].
    file: Option<PathBuf>,
    /// Check it as a backbone config (`meshtun backbone --config`).
    #[arg(long)]
    backbone: bool,
}

#[derive(Args, Debug)]
struct GenerateAssetsArgs {
    /// Directory to write man/*.1 and completions/ into.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct NetcheckArgs {
    /// Backbone (STUN server) to ask, as HOST:PORT; give two or more (or a
    /// backbone listening on two ports or addresses) to learn how the NAT maps.
    #[arg(long = "backbone", value_name = "HOST:PORT", required = true)]
    backbones: Vec<String>,
    /// Local UDP port to test from (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Seconds to wait for answers.
    #[arg(long, default_value_t = 2.0)]
    timeout: f64,
}

#[derive(Args, Debug)]
struct StateArgs {
    /// Where the identity and keys live (created 0700; files 0600).
    #[arg(long, default_value = DEFAULT_STATE_DIR, env = "MESHTUN_STATE_DIR")]
    state_dir: PathBuf,
}

#[derive(Args, Debug)]
struct SocketArgs {
    /// The daemon's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET, env = "MESHTUN_SOCKET")]
    socket: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// Write the mesh as this node (or backbone) sees it as Graphviz DOT
    /// (render with `dot -Tsvg`).
    #[arg(long)]
    graph: bool,
    #[command(flatten)]
    socket: SocketArgs,
}

#[derive(Args, Debug)]
struct UpArgs {
    /// Config file; flags given here override its settings [default:
    /// /etc/meshtun/meshtun.toml if it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Backbone to register with, as HOST:PORT (repeatable; needed here or
    /// as `backbones` in the config file).
    #[arg(long = "backbone", value_name = "HOST:PORT")]
    backbones: Vec<String>,
    /// Standalone relay (`meshtun relay`) to register with and relay
    /// through instead of a backbone, as HOST:PORT (repeatable; the first
    /// one registered is used). Discovery still goes to the backbones.
    #[arg(long = "relay", value_name = "HOST:PORT")]
    relays: Vec<String>,
    /// Name other agents can look this node up by (one lowercase DNS label).
    #[arg(long)]
    hostname: Option<String>,
    /// Mesh network number (0 is the public mesh).
    #[arg(long, default_value_t = 0)]
    network: u16,
    /// Name of the TUN interface.
    #[arg(long, default_value = "meshtun0")]
    interface: String,
    /// UDP port for WireGuard and backbone traffic (0 picks a free one).
    #[arg(long, default_value_t = 51820)]
    listen_port: u16,
    /// Interface MTU. 1420 fits WireGuard over IPv6 in a 1500-byte underlay. A
    /// smaller underlay still works: TCP is cut to fit the path once its MTU is
    /// known, and senders of other full-size packets are told its size (below
    /// IPv6's 1280-byte minimum they go fragmented; its MTU minus 80 avoids that).
    #[arg(long, default_value_t = 1420, value_parser = clap::value_parser!(u16).range(config::Mtu::RANGE))]
    mtu: u16,
    /// Turn off segmentation offloads (TUN TSO and coalescing, UDP GSO/GRO)
    /// and move one packet per system call: for debugging, or to measure
    /// what they buy.
    #[arg(long)]
    no_offload: bool,
    /// Seconds between heartbeats to the backbone.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(config::HeartbeatSecs::RANGE_U64))]
    heartbeat_secs: u64,
    /// A capability this node offers, e.g. citations (repeatable).
    #[arg(long = "capability", value_name = "CAP")]
    capabilities: Vec<String>,
    /// A group this node belongs to (repeatable).
    #[arg(long = "group", value_name = "GROUP")]
    groups: Vec<String>,
    /// DNS domain the daemon answers on its mesh address.
    #[arg(long, default_value = "mesh", value_parser = parse_dns_domain)]
    dns_domain: String,
    /// UDP port of the mesh DNS server (0: off).
    #[arg(long, default_value_t = 53)]
    dns_port: u16,
    /// Do not point systemd-resolved at the mesh DNS for the mesh domain
    /// (also skipped, with a log line, inside a network namespace).
    #[arg(long)]
    no_resolved: bool,
    /// Membership certificate for a private network (from `meshtun network sign`).
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Inbound firewall rule (repeatable, first match wins), e.g.
    /// "allow tcp/22 from group:ops", "deny udp/53", "allow icmp".
    #[arg(long = "firewall", value_name = "RULE")]
    firewall_rules: Vec<String>,
    /// Inbound policy when no rule matches [default: allow on the public
    /// mesh, deny in a private network].
    #[arg(long, value_parser = ["allow", "deny"])]
    firewall_default: Option<String>,
    /// Days between automatic WireGuard key rotations (0: never).
    #[arg(long, default_value_t = 14, value_parser = clap::value_parser!(u64).range(config::KeyRotationDays::RANGE_U64))]
    key_rotation_days: u64,
    /// Serve Prometheus metrics on http://IP:PORT/metrics (off unless
    /// given; alone it means 127.0.0.1:9474).
    #[arg(long, value_name = "IP:PORT", num_args = 0..=1, default_missing_value = metrics::DEFAULT_NODE_LISTEN, value_parser = metrics::parse_listen)]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    state: StateArgs,
    #[command(flatten)]
    socket: SocketArgs,
}

#[derive(Args, Debug)]
struct IdArgs {
    /// Mesh network number the address is shown in.
    #[arg(long, default_value_t = 0)]
    network: u16,
    #[command(flatten)]
    state: StateArgs,
}

#[derive(Args, Debug)]
struct BackboneArgs {
    /// Config file; flags given here override its settings [default:
    /// /etc/meshtun/backbone.toml if it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// UDP address to serve nodes on. Repeat it (another port or address
    /// of this host) so `meshtun netcheck` can tell how clients' NATs map
    /// and, from STUN CHANGE-REQUEST answers sent by the others, filter.
    #[arg(long, default_value = "0.0.0.0:7400")]
    listen: Vec<SocketAddr>,
    /// Seconds a record lives without a heartbeat.
    #[arg(long, default_value_t = 75, value_parser = clap::value_parser!(u64).range(config::RecordTtl::RANGE_U64))]
    record_ttl: u64,
    /// The backbone's control socket.
    #[arg(long, default_value = DEFAULT_BACKBONE_SOCKET)]
    socket: PathBuf,
    /// Serve Prometheus metrics (/metrics) and a picture of the mesh (/)
    /// over HTTP (off unless given; alone it means 127.0.0.1:9475).
    #[arg(long, value_name = "IP:PORT", num_args = 0..=1, default_missing_value = metrics::DEFAULT_BACKBONE_LISTEN, value_parser = metrics::parse_listen)]
    metrics_listen: Option<SocketAddr>,
    /// A private network this backbone serves, as NETWORK:OWNER-KEY-HEX
    /// (repeatable; printed by `meshtun network create`).
    #[arg(long = "network-owner", value_name = "N:KEY")]
    network_owners: Vec<String>,
    /// An owner-signed revocation list to enforce and hand to members
    /// (repeatable; re-read when the file changes).
    #[arg(long = "revocations", value_name = "FILE")]
    revocations: Vec<PathBuf>,
    /// Keep hostname bindings here across restarts (crash-safe log; the
    /// packaged service uses /var/lib/meshtun-backbone). Without it a
    /// restart forgets every record until nodes re-register.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct RelayArgs {
    /// UDP address to relay on (repeatable).
    #[arg(long, default_value = "0.0.0.0:7400")]
    listen: Vec<SocketAddr>,
    /// Seconds a node's registration lives without a heartbeat.
    #[arg(long, default_value_t = 75, value_parser = clap::value_parser!(u64).range(config::RecordTtl::RANGE_U64))]
    record_ttl: u64,
    /// The relay's control socket (`meshtun status --socket` shows its
    /// counters).
    #[arg(long, default_value = DEFAULT_RELAY_SOCKET)]
    socket: PathBuf,
    /// Serve Prometheus metrics (/metrics) over HTTP (off unless given;
    /// alone it means 127.0.0.1:9475).
    #[arg(long, value_name = "IP:PORT", num_args = 0..=1, default_missing_value = metrics::DEFAULT_BACKBONE_LISTEN, value_parser = metrics::parse_listen)]
    metrics_listen: Option<SocketAddr>,
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let json = cli.json;
    match &cli.command {
        Command::Config(ConfigCommand::Check(args)) => return config_check(args, json),
        Command::GenerateAssets(args) => {
            return match assets::generate(Cli::command(), &args.out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report(json, &e),
            }
        }
        _ => {}
    }
    if let Err(e) = config::apply(&mut cli, &matches) {
        return report(json, &e.into());
    }
    init_logging(&cli.log_level, cli.log_format);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return report(json, &anyhow::anyhow!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(json, &e),
    }
}

fn report(json: bool, error: &anyhow::Error) -> ExitCode {
    let cli = cli_error::classify(error);
    if json {
        println!("{}", control::error_envelope(cli.code, &cli.message, cli.hint.as_deref()));
    } else {
        eprintln!("meshtun: error: {}", cli.message);
        if let Some(hint) = &cli.hint {
            eprintln!("  hint: {hint}");
        }
    }
    exit_code(cli.code)
}

/// 78 (EX_CONFIG) for config errors, so systemd does not restart a daemon
/// that cannot start until its config is fixed; 1 for everything else.
fn exit_code(code: &str) -> ExitCode {
    if code == "config_error" {
        ExitCode::from(78)
    } else {
        ExitCode::FAILURE
    }
}

/// `meshtun config check [FILE] [--backbone]`.
fn config_check(args: &ConfigCheckArgs, json: bool) -> ExitCode {
    let kind = if args.backbone { config::Kind::Backbone } else { config::Kind::Node };
    let file = args.file.clone().unwrap_or_else(|| PathBuf::from(kind.default_file()));
    match config::read(&file).and_then(|text| kind.check(&file, &text)) {
        Ok(()) => {
            if json {
                print_ok(serde_json::json!({ "file": file, "kind": kind.name(), "valid": true }));
            } else {
                println!("{}: OK", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if json {
                let mut envelope = control::error_envelope("config_error", &e.to_string(), None);
                envelope["errors"] = serde_json::json!([e.to_json()]);
                println!("{envelope}");
            } else {
                eprintln!("meshtun: error: {e}");
            }
            exit_code("config_error")
        }
    }
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        // One JSON object per line; `span` holds the innermost span's
        // fields (e.g. {"name":"peer","peer":"0:..."}).
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    match cli.command {
        Command::Up(args) => {
            let network = network_id(args.network)?;
            daemon::run(
                daemon::UpOptions {
                    backbones: args.backbones,
                    relays: args.relays,
                    hostname: args.hostname,
                    network,
                    state_dir: args.state.state_dir,
                    socket: args.socket.socket,
                    interface: args.interface,
                    listen_port: args.listen_port,
                    mtu: args.mtu,
                    offload: !args.no_offload,
                    heartbeat: Duration::from_secs(args.heartbeat_secs),
                    capabilities: args.capabilities,
                    groups: args.groups,
                    dns_domain: args.dns_domain,
                    dns_port: args.dns_port,
                    resolved: !args.no_resolved,
                    metrics_listen: args.metrics_listen,
                    cert: args.cert,
                    firewall_rules: args.firewall_rules,
                    firewall_default: args.firewall_default,
                    key_rotation: Duration::from_secs(args.key_rotation_days * 86_400),
                },
                json,
            )
            .await
        }
        Command::Backbone(args) => {
            backbone_server::run(
                backbone_server::BackboneOptions {
                    listen: args.listen,
                    socket: args.socket,
                    record_ttl: Duration::from_secs(args.record_ttl),
                    metrics_listen: args.metrics_listen,
                    network_owners: parse_network_owners(&args.network_owners)?,
                    revocations: args.revocations,
                    state_dir: args.state_dir,
                    relay_only: false,
                },
                json,
            )
            .await
        }
        Command::Relay(args) => {
            backbone_server::run(
                backbone_server::BackboneOptions {
                    listen: args.listen,
                    socket: args.socket,
                    record_ttl: Duration::from_secs(args.record_ttl),
                    metrics_listen: args.metrics_listen,
                    network_owners: Vec::new(),
                    revocations: Vec::new(),
                    state_dir: None,
                    relay_only: true,
                },
                json,
            )
            .await
        }
        Command::Id(args) => {
            let network = network_id(args.network)?;
            let state = state::StateDir::open(&args.state.state_dir)?;
            let (identity, _) = state.load_or_create_identity()?;
            let addr = identity.mesh_addr(network);
            let public_key: String = identity.public_key().iter().map(|b| format!("{b:02x}")).collect();
            if json {
                print_ok(serde_json::json!({
                    "address": addr.to_string(),
                    "ipv6": addr.to_ipv6(),
                    "ipv4": meshtun_addr::canonical_ipv4(addr),
                    "public_key": public_key,
                    "pow_nonce": identity.nonce(),
                }));
            } else {
                println!(
                    "address     {addr}\nipv6        {}\nipv4        {}\npublic key  {public_key}",
                    addr.to_ipv6(),
                    meshtun_addr::canonical_ipv4(addr)
                );
            }
            Ok(())
        }
        Command::Config(_) | Command::GenerateAssets(_) => unreachable!("handled before the runtime starts"),
        Command::Netcheck(args) => netcheck::run(&args.backbones, args.port, Duration::from_secs_f64(args.timeout.clamp(0.1, 60.0)), json).await,
        Command::Status(args) if args.graph => {
            let data = control::call(&args.socket.socket, &control::Request::Status).await?;
            let graph = match data["role"].as_str() {
                Some("backbone" | "relay") => graph::from_backbone_status(&data),
                _ => graph::from_node_status(&data),
            };
            let dot = graph::to_dot(&graph);
            if json {
                print_ok(serde_json::json!({ "format": "dot", "dot": dot }));
            } else {
                print!("{dot}");
            }
            Ok(())
        }
        Command::Events(args) => {
            control::stream(&args.socket, &control::Request::Events, |event| {
                if json {
                    println!("{event}");
                } else {
                    println!("{}", events::human_line(&event));
                }
            })
            .await
        }
        Command::Ping(args) => cli_mesh::ping(args, json).await,
        Command::Find(args) => cli_mesh::find(args, json).await,
        Command::Resolve(args) => cli_mesh::resolve(args, json).await,
        Command::Set(args) => cli_mesh::set(args, json).await,
        Command::Network(command) => network_cmd::run(command, json),
        Command::RotateKeys(args) => {
            let data = control::call(&args.socket, &control::Request::RotateKeys).await?;
            if json {
                print_ok(data);
            } else {
                println!("WireGuard key rotated: version {}", data["version"]);
            }
            Ok(())
        }
        Command::Status(args) => {
            let data = control::call(&args.socket.socket, &control::Request::Status).await?;
            if json {
                print_ok(data);
            } else {
                print_status(&data);
            }
            Ok(())
        }
        Command::Down(args) => {
            let data = control::call(&args.socket, &control::Request::Down).await?;
            if json {
                print_ok(data);
            } else {
                println!("meshtun: stopped {}", data["stopped"].as_str().unwrap_or("daemon"));
            }
            Ok(())
        }
    }
}

fn parse_dns_domain(text: &str) -> Result<String, String> {
    let domain = text.trim_end_matches('.').to_ascii_lowercase();
    if domain.is_empty() {
        return Err("the DNS domain must not be empty".into());
    }
    for label in domain.split('.') {
        meshtun_proto::record::validate_hostname(label).map_err(|e| e.replace("hostname ", "label "))?;
    }
    Ok(domain)
}

fn parse_network_owners(specs: &[String]) -> anyhow::Result<Vec<(NetworkId, [u8; 32])>> {
    specs
        .iter()
        .map(|spec| {
            let bad = || {
                CliError::new("invalid_argument", format!("--network-owner {spec:?}: expected NETWORK:OWNER-KEY (64 hex digits)"))
                    .hint("copy it from the output of `meshtun network create`")
            };
            let (n, key) = spec.split_once(':').ok_or_else(bad)?;
            let n: u16 = n.parse().map_err(|_| bad())?;
            let key = meshtun_proto::identity::unhex32(key).ok_or_else(bad)?;
            Ok((network_id(n)?, key))
        })
        .collect()
}

fn network_id(n: u16) -> anyhow::Result<NetworkId> {
    let id = NetworkId(n);
    if id.is_reserved() {
        return Err(CliError::new("invalid_argument", format!("network {n} is reserved")).hint("use 0 for the public mesh").into());
    }
    Ok(id)
}

fn print_ok(data: serde_json::Value) {
    println!("{}", control::ok_envelope(data));
}

/// `dropped: firewall 3, malformed 1, no_route 0, ...` from status's
/// `stats.dropped`: the counters that moved first (largest first), so the
/// reason is visible without `--json`.
fn dropped_line(dropped: &serde_json::Value) -> Option<String> {
    let mut counters: Vec<(&str, u64)> = dropped.as_object()?.iter().map(|(k, v)| (k.as_str(), v.as_u64().unwrap_or(0))).collect();
    counters.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    let list: Vec<String> = counters.iter().map(|(k, n)| format!("{k} {n}")).collect();
    Some(format!("dropped: {}", list.join(", ")))
}

/// What the narrow paths made the node do, once it did anything: senders
/// told a path's size, IPv4 packets fragmented to fit one.
fn narrow_paths_line(stats: &serde_json::Value) -> Option<String> {
    let told = stats["too_big_signals"].as_u64().unwrap_or(0);
    let fragmented = stats["fragmented_for_path"].as_u64().unwrap_or(0);
    (told + fragmented > 0)
        .then(|| format!("narrow paths: {told} sender(s) told a path's size, {fragmented} IPv4 packet(s) fragmented to fit"))
}

fn print_status(data: &serde_json::Value) {
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if data["role"] == "backbone" || data["role"] == "relay" {
        println!("{} on {}  (record ttl {} s)", s(&data["role"]), s(&data["listen"]), s(&data["record_ttl_secs"]));
        let st = &data["stats"];
        println!(
            "relayed {} packets / {} bytes, refused {}, rate-limited {}",
            s(&st["relayed_packets"]), s(&st["relayed_bytes"]), s(&st["relay_refused"]), s(&st["relay_rate_limited"])
        );
        let records = data["records"].as_array().cloned().unwrap_or_default();
        println!("{} record(s)", records.len());
        for r in records {
            println!(
                "  {:<18} {:<16} observed {:<22} expires in {:.0} s",
                s(&r["address"]),
                s(&r["hostname"]),
                s(&r["observed"]),
                r["expires_in_secs"].as_f64().unwrap_or(0.0)
            );
        }
        return;
    }
    println!("node {}  {}  {}  hostname {}", s(&data["address"]), s(&data["ipv6"]), s(&data["ipv4"]), s(&data["hostname"]));
    println!("interface {}  UDP port {}", s(&data["interface"]), s(&data["listen_port"]));
    for b in data["backbones"].as_array().cloned().unwrap_or_default() {
        let extra = match &b["last_error"] {
            serde_json::Value::String(e) => format!("  ({e}; next try in {:.0} s)", b["next_attempt_in_secs"].as_f64().unwrap_or(0.0)),
            _ => String::new(),
        };
        println!("backbone {}  {}  seen as {}{extra}", s(&b["address"]), s(&b["state"]), s(&b["observed"]));
    }
    for b in data["relays"].as_array().cloned().unwrap_or_default() {
        let extra = match &b["last_error"] {
            serde_json::Value::String(e) => format!("  ({e}; next try in {:.0} s)", b["next_attempt_in_secs"].as_f64().unwrap_or(0.0)),
            _ => String::new(),
        };
        println!("relay    {}  {}  seen as {}{extra}", s(&b["address"]), s(&b["state"]), s(&b["observed"]));
    }
    if let Some(line) = dropped_line(&data["stats"]["dropped"]) {
        println!("{line}");
    }
    if let Some(line) = narrow_paths_line(&data["stats"]) {
        println!("{line}");
    }
    let peers = data["peers"].as_array().cloned().unwrap_or_default();
    println!("{} peer(s)", peers.len());
    for p in peers {
        let path = match (&p["path"], &p["rtt_ms"]) {
            (serde_json::Value::String(kind), serde_json::Value::Number(rtt)) => format!("{kind} {:.1} ms", rtt.as_f64().unwrap_or(0.0)),
            (serde_json::Value::String(kind), _) => match &p["relay_reason"] {
                serde_json::Value::String(why) => format!("{kind} ({why})"),
                _ => kind.clone(),
            },
            _ => "-".into(),
        };
        println!(
            "  {:<18} {:<16} {path:<28} via {:<22} {}  tx {} B  rx {} B",
            s(&p["address"]),
            s(&p["hostname"]),
            s(&p["endpoint"]),
            match (p["session"].as_str(), p["handshake_age_secs"].as_f64()) {
                (Some("parked"), _) => "session parked (idle)".into(),
                (_, Some(a)) => format!("handshake {a:.0} s ago"),
                _ => "handshake never".into(),
            },
            s(&p["tx_bytes"]),
            s(&p["rx_bytes"])
        );
        if let Some(mtu) = p["inner_mtu"].as_u64() {
            println!("  {:<18} narrow path: packets up to {mtu} B pass unfragmented; TCP is cut to fit, other senders are told the size", "");
        }
    }
}

#[cfg(test)]
mod status_text_tests {
    use super::{dropped_line, narrow_paths_line};

    #[test]
    fn the_dropped_line_lists_counters_that_moved_first_and_the_rest_after() {
        let dropped = serde_json::json!({"malformed": 0, "firewall": 3, "no_route": 0, "replay": 7});
        assert_eq!(dropped_line(&dropped).as_deref(), Some("dropped: replay 7, firewall 3, malformed 0, no_route 0"));
        assert_eq!(dropped_line(&serde_json::json!({"firewall": 0})).as_deref(), Some("dropped: firewall 0"));
        assert_eq!(dropped_line(&serde_json::Value::Null), None, "an old daemon without stats prints no line");
    }

    #[test]
    fn the_narrow_paths_line_appears_once_a_sender_was_told_or_a_packet_fragmented() {
        assert_eq!(narrow_paths_line(&serde_json::json!({"too_big_signals": 0, "fragmented_for_path": 0})), None);
        assert_eq!(narrow_paths_line(&serde_json::Value::Null), None, "an old daemon prints no line");
        assert_eq!(
            narrow_paths_line(&serde_json::json!({"too_big_signals": 2, "fragmented_for_path": 0})).as_deref(),
            Some("narrow paths: 2 sender(s) told a path's size, 0 IPv4 packet(s) fragmented to fit")
        );
    }
}
