//! `meshtun ping`, `find`, `resolve` and `set`: questions for the running
//! daemon, over its control socket.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::cli_error::CliError;
use crate::control::{self, QueryKind, Request};

#[derive(Args, Debug)]
pub struct PingArgs {
    /// A hostname, a mesh address (0:A91F.0000.7C2E), or the node's mesh
    /// IPv6 or IPv4 (100.64.0.0/10) address.
    pub target: String,
    /// How many pings (one a second).
    #[arg(long, short = 'c', default_value_t = 4)]
    pub count: u32,
    #[arg(long, default_value = crate::DEFAULT_SOCKET, env = "MESHTUN_SOCKET")]
    pub socket: PathBuf,
}

#[derive(Args, Debug)]
pub struct FindArgs {
    /// Nodes declaring this capability.
    #[arg(long)]
    pub capability: Option<String>,
    /// Members of this group (with --capability: members that also have it).
    #[arg(long)]
    pub group: Option<String>,
    #[arg(long, default_value = crate::DEFAULT_SOCKET, env = "MESHTUN_SOCKET")]
    pub socket: PathBuf,
}

#[derive(Args, Debug)]
pub struct ResolveArgs {
    /// A hostname, with or without the .mesh suffix.
    pub name: String,
    #[arg(long, default_value = crate::DEFAULT_SOCKET, env = "MESHTUN_SOCKET")]
    pub socket: PathBuf,
}

#[derive(Args, Debug)]
pub struct SetArgs {
    /// New hostname.
    #[arg(long)]
    pub hostname: Option<String>,
    /// Capabilities to declare (replaces the current list; repeatable).
    #[arg(long = "capability", value_name = "CAP")]
    pub capabilities: Vec<String>,
    /// Declare no capabilities at all.
    #[arg(long, conflicts_with = "capabilities")]
    pub no_capabilities: bool,
    /// Groups to join (replaces the current list; repeatable).
    #[arg(long = "group", value_name = "GROUP")]
    pub groups: Vec<String>,
    /// Leave every group.
    #[arg(long, conflicts_with = "groups")]
    pub no_groups: bool,
    #[arg(long, default_value = crate::DEFAULT_SOCKET, env = "MESHTUN_SOCKET")]
    pub socket: PathBuf,
}

pub async fn ping(args: PingArgs, json: bool) -> anyhow::Result<()> {
    let mut received = 0;
    let mut rtts = Vec::new();
    for i in 0..args.count.max(1) {
        if i > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        match control::call(&args.socket, &Request::Ping { target: args.target.clone() }).await {
            Ok(data) => {
                received += 1;
                let rtt = data["rtt_ms"].as_f64().unwrap_or(0.0);
                rtts.push(rtt);
                if json {
                    println!("{}", control::ok_envelope(data));
                } else {
                    let name = data["hostname"].as_str().map(|h| format!(" ({h})")).unwrap_or_default();
                    println!(
                        "reply from {}{name} · {rtt:.2} ms · {}",
                        data["address"].as_str().unwrap_or("?"),
                        data["path"].as_str().unwrap_or("?")
                    );
                }
            }
            Err(e) => {
                let cli = crate::cli_error::classify(&e);
                if cli.code == "daemon_not_running" || cli.code == "permission_denied" {
                    return Err(e);
                }
                if json {
                    println!("{}", control::error_envelope(cli.code, &cli.message, cli.hint.as_deref()));
                } else {
                    println!("no reply from {}: {}", args.target, cli.message);
                }
            }
        }
    }
    if !json && !rtts.is_empty() {
        let min = rtts.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = rtts.iter().cloned().fold(0.0, f64::max);
        let avg = rtts.iter().sum::<f64>() / rtts.len() as f64;
        println!("{} sent, {received} received, rtt min/avg/max {min:.2}/{avg:.2}/{max:.2} ms", args.count.max(1));
    }
    if received == 0 {
        return Err(CliError::new("unreachable", format!("no reply from {}", args.target)).into());
    }
    Ok(())
}

pub async fn find(args: FindArgs, json: bool) -> anyhow::Result<()> {
    let (kind, name) = match (&args.capability, &args.group) {
        (Some(cap), _) => (QueryKind::Capability, cap.clone()),
        (None, Some(group)) => (QueryKind::Group, group.clone()),
        (None, None) => {
            return Err(CliError::new("invalid_argument", "say what to find")
                .hint("meshtun find --capability CAP [--group GROUP], or --group GROUP")
                .into())
        }
    };
    let data = control::call(&args.socket, &Request::Query { kind, name }).await?;
    let mut found = data["found"].as_array().cloned().unwrap_or_default();
    if let (Some(_), Some(group)) = (&args.capability, &args.group) {
        found.retain(|f| f["groups"].as_array().is_some_and(|g| g.iter().any(|g| g == group.as_str())));
    }
    if json {
        println!("{}", control::ok_envelope(serde_json::json!({ "found": found })));
        return Ok(());
    }
    if found.is_empty() {
        println!("no node found");
    }
    for f in &found {
        let rtt = f["rtt_ms"].as_f64().map(|r| format!("{r:.2} ms")).unwrap_or_else(|| "-".into());
        println!(
            "{:<18} {:<22} {:<9} {}",
            f["address"].as_str().unwrap_or("?"),
            f["hostname"].as_str().unwrap_or("-"),
            rtt,
            f["ipv6"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

pub async fn resolve(args: ResolveArgs, json: bool) -> anyhow::Result<()> {
    let name = args.name.trim_end_matches('.').trim_end_matches(".mesh").to_ascii_lowercase();
    let data = control::call(&args.socket, &Request::Query { kind: QueryKind::Hostname, name: name.clone() }).await?;
    let found = data["found"].as_array().cloned().unwrap_or_default();
    let Some(first) = found.first() else {
        return Err(CliError::new("not_found", format!("no node named {name:?}"))
            .hint("names are registered with `meshtun up --hostname NAME`")
            .into());
    };
    if json {
        println!("{}", control::ok_envelope(first.clone()));
    } else {
        println!("{} {}", first["ipv6"].as_str().unwrap_or("?"), first["address"].as_str().unwrap_or("?"));
    }
    Ok(())
}

pub async fn set(args: SetArgs, json: bool) -> anyhow::Result<()> {
    let capabilities = if args.no_capabilities { Some(vec![]) } else { (!args.capabilities.is_empty()).then_some(args.capabilities) };
    let groups = if args.no_groups { Some(vec![]) } else { (!args.groups.is_empty()).then_some(args.groups) };
    let data = control::call(&args.socket, &Request::Set { hostname: args.hostname, capabilities, groups }).await?;
    if json {
        println!("{}", control::ok_envelope(data));
    } else {
        println!(
            "hostname {}  capabilities [{}]  groups [{}]",
            data["hostname"].as_str().unwrap_or("-"),
            join(&data["capabilities"]),
            join(&data["groups"])
        );
    }
    Ok(())
}

fn join(v: &serde_json::Value) -> String {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str()).collect::<Vec<_>>().join(", ")).unwrap_or_default()
}
