//! `meshtun backbone`: the tokio driver around the directory core.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshtun_backbone::{Directory, DirectoryConfig};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::control::{self, Request};
use crate::udp::MeshSocket;

pub struct BackboneOptions {
    /// One or more UDP addresses; extra ones let clients tell how their
    /// NAT maps (RFC 5780 style: same host, another port or address).
    pub listen: Vec<SocketAddr>,
    pub socket: PathBuf,
    pub record_ttl: Duration,
    /// Serve Prometheus metrics and the mesh picture here over HTTP.
    pub metrics_listen: Option<SocketAddr>,
    /// Private networks served, with their owner keys.
    pub network_owners: Vec<(meshtun_addr::NetworkId, [u8; 32])>,
    /// Revocation list files, re-read when they change.
    pub revocations: Vec<PathBuf>,
    /// Where records that must survive a restart (hostname holders) are
    /// kept; None keeps nothing.
    pub state_dir: Option<PathBuf>,
    /// `meshtun relay`: the directory's relay-only role.
    pub relay_only: bool,
}

/// Datagrams handled per wake-up (each reply is sent as soon as it is
/// made; this only bounds how long other events wait).
const BATCH: usize = 256;

/// A pair that relayed within this long is drawn (and counted) as relayed.
const RELAY_ACTIVE: Duration = Duration::from_secs(60);

pub async fn run(options: BackboneOptions, json: bool) -> anyhow::Result<()> {
    let mut sockets = Vec::new();
    for addr in &options.listen {
        sockets.push(Arc::new(MeshSocket::bind(Some(addr.ip()), addr.port())?));
    }
    let listener = control::bind(&options.socket).await?;
    let metrics_listener = match options.metrics_listen {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    // Readers hand over batches: whatever is queued on the socket after a
    // wake-up, up to BATCH datagrams, in one message.
    let (datagram_tx, mut datagram_rx) = mpsc::channel::<Vec<(usize, SocketAddr, Vec<u8>)>>(64);
    let mut readers = Vec::new();
    for (local, socket) in sockets.iter().enumerate() {
        let (socket, tx) = (socket.clone(), datagram_tx.clone());
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            loop {
                let mut batch = Vec::new();
                match socket.recv_from(&mut buf).await {
                    Ok((n, from)) => batch.push((local, from, buf[..n].to_vec())),
                    Err(e) => tracing::trace!(error = %e, "receive error"),
                }
                while batch.len() < BATCH {
                    match socket.try_recv_from(&mut buf) {
                        Ok((n, from)) => batch.push((local, from, buf[..n].to_vec())),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => tracing::trace!(error = %e, "receive error"),
                    }
                }
                if !batch.is_empty() && tx.send(batch).await.is_err() {
                    return;
                }
            }
        }));
    }
    let mut config = DirectoryConfig { record_ttl: options.record_ttl, relay_only: options.relay_only, ..DirectoryConfig::default() };
    let role = if options.relay_only { "relay" } else { "backbone" };
    config.network_owners.extend(options.network_owners.iter().copied());
    let mut directory = Directory::new(config);
    directory.set_listen_addrs(options.listen.iter().zip(&sockets).map(|(a, s)| SocketAddr::new(a.ip(), s.local_port())).collect());
    directory.set_unix_time(unix_now());
    let mut revocation_files = RevocationFiles::new(options.revocations.clone());
    revocation_files.reload(&mut directory, &options.network_owners)?;
    let mut revocation_check = tokio::time::interval(Duration::from_secs(5));
    let store_writer = match &options.state_dir {
        Some(dir) => Some(open_store(dir, &mut directory)?),
        None => {
            tracing::info!("no state directory: hostname bindings will not survive a restart");
            None
        }
    };
    let listen_text: Vec<String> = options.listen.iter().map(|a| a.to_string()).collect();
    tracing::info!(listen = %listen_text.join(","), ttl_secs = options.record_ttl.as_secs(), "{role} is up");
    if json {
        println!("{}", control::ok_envelope(serde_json::json!({ "role": role, "listen": options.listen })));
    } else {
        println!("meshtun {role}: listening on UDP {}", listen_text.join(", "));
    }
    let (control_tx, mut control_rx) = mpsc::channel(16);
    let control_task = tokio::spawn(control::serve(listener, control_tx));
    let (metrics_tx, mut metrics_rx) = mpsc::channel::<crate::metrics::HttpRequest>(8);
    let started_unix = crate::metrics::unix_now();
    let metrics_task = metrics_listener.map(|l| {
        tracing::info!(listen = %options.metrics_listen.map(|a| a.to_string()).unwrap_or_default(), "serving metrics and the mesh picture");
        tokio::spawn(crate::metrics::serve(l, metrics_tx))
    });
    let mut backlog = std::collections::VecDeque::new();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    loop {
        directory.set_unix_time(unix_now());
        // Replies a full socket buffer held back, then anything new.
        while let Some(t) = backlog.pop_front().or_else(|| directory.poll_transmit()) {
            let Some(socket) = sockets.get(t.local) else { continue };
            if let Err(e) = socket.send_to(&t.payload, t.dst).await {
                tracing::trace!(dst = %t.dst, error = %e, "send failed");
            }
        }
        if let Some((tx, _)) = &store_writer {
            let ops: Vec<_> = std::iter::from_fn(|| directory.poll_persist()).collect();
            if !ops.is_empty() && tx.send(ops).is_err() {
                tracing::error!("the state writer stopped; records are no longer persisted");
            }
        }
        let deadline = directory.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
        tokio::select! {
            Some(batch) = datagram_rx.recv() => {
                // Each answered at once (a reply does not wait for the batch).
                for (local, from, datagram) in batch {
                    directory.handle_datagram_on(local, from, &datagram, Instant::now());
                    send_now(&mut directory, &sockets, &mut backlog);
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => directory.handle_timeout(Instant::now()),
            Some(pending) = control_rx.recv() => match pending.request {
                Request::Status => { let _ = pending.reply.send(control::ok_envelope(status(&directory, &options.listen, role))); }
                Request::Down => {
                    pending.answer_and_flush(control::ok_envelope(serde_json::json!({"stopped": role}))).await;
                    break;
                }
                _ => {
                    let _ = pending.reply.send(control::error_envelope("bad_request", "a backbone answers only status and down", Some("ask a node's socket instead")));
                }
            },
            Some(request) = metrics_rx.recv() => {
                let now = Instant::now();
                let snapshot = crate::metrics::BackboneSnapshot {
                    stats: directory.stats().clone(),
                    records: directory.len(),
                    active_relay_pairs: directory.relay_pairs().filter(|(_, t)| now.saturating_duration_since(t.last) < RELAY_ACTIVE).count(),
                    start_time_unix: started_unix,
                };
                let response = crate::metrics::backbone_response(&request.path, snapshot, || status(&directory, &options.listen, role));
                let _ = request.reply.send(response);
            }
            _ = revocation_check.tick() => {
                if let Err(e) = revocation_files.reload(&mut directory, &options.network_owners) {
                    tracing::warn!(error = %format!("{e:#}"), "revocation list not applied");
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    control_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    for reader in readers {
        reader.abort();
    }
    if let Some((tx, writer)) = store_writer {
        let ops: Vec<_> = std::iter::from_fn(|| directory.poll_persist()).collect();
        let _ = tx.send(ops);
        drop(tx);
        let _ = writer.join();
    }
    let _ = std::fs::remove_file(&options.socket);
    tracing::info!("{role} stopped");
    Ok(())
}

/// Sends what the directory has to send without waiting; what a full
/// socket buffer refuses waits in `backlog` (in order) for the main loop.
fn send_now(
    directory: &mut Directory,
    sockets: &[Arc<MeshSocket>],
    backlog: &mut std::collections::VecDeque<meshtun_backbone::Transmit>,
) {
    while let Some(t) = directory.poll_transmit() {
        if !backlog.is_empty() {
            backlog.push_back(t);
            continue;
        }
        let Some(socket) = sockets.get(t.local) else { continue };
        match socket.try_send_to(&t.payload, t.dst) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => backlog.push_back(t),
            Err(e) => tracing::trace!(dst = %t.dst, error = %e, "send failed"),
            Ok(_) => {}
        }
    }
}

/// Opens the state directory, restores what it holds into `directory` and
/// starts the thread that writes changes (batched: one fdatasync per batch,
/// off the packet loop).
fn open_store(
    dir: &std::path::Path,
    directory: &mut Directory,
) -> anyhow::Result<(std::sync::mpsc::Sender<Vec<meshtun_backbone::PersistOp>>, std::thread::JoinHandle<()>)> {
    let (mut store, records, report) = meshtun_backbone::store::Store::open(dir).map_err(|e| {
        crate::cli_error::CliError::new("state_dir", format!("cannot open the state directory {}: {e}", dir.display()))
            .hint("pass --state-dir with a directory this user may write, or leave it out to keep nothing across restarts")
    })?;
    let restored = directory.restore(records, Instant::now());
    tracing::info!(dir = %dir.display(), restored, kept = report.records, torn_bytes = report.torn_bytes, "state loaded");
    directory.enable_persistence();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<meshtun_backbone::PersistOp>>();
    let writer = std::thread::Builder::new().name("backbone-state".into()).spawn(move || {
        while let Ok(mut ops) = rx.recv() {
            while let Ok(more) = rx.try_recv() {
                ops.extend(more);
            }
            if let Err(e) = store.apply(&ops) {
                tracing::error!(error = %e, "cannot write the state directory");
            }
        }
    })?;
    Ok((tx, writer))
}

fn status(directory: &Directory, listen: &[SocketAddr], role: &str) -> serde_json::Value {
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
    // Pairs this backbone introduced or relays for (the mesh picture).
    let relayed: std::collections::HashMap<_, _> = directory.relay_pairs().collect();
    let mut pairs: Vec<serde_json::Value> = directory
        .introduced_pairs(now)
        .chain(relayed.keys().copied())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|(a, b)| {
            let traffic = relayed.get(&(a, b));
            let active = traffic.is_some_and(|t| now.saturating_duration_since(t.last) < RELAY_ACTIVE);
            serde_json::json!({
                "a": a.to_string(),
                "b": b.to_string(),
                "path": if active { "relay" } else { "introduced" },
                "relayed_bytes": traffic.map_or(0, |t| t.bytes),
                "relayed_packets": traffic.map_or(0, |t| t.packets),
                "last_relayed_secs_ago": traffic.map(|t| now.saturating_duration_since(t.last).as_secs_f64()),
            })
        })
        .collect();
    pairs.sort_by(|x, y| (x["a"].as_str(), x["b"].as_str()).cmp(&(y["a"].as_str(), y["b"].as_str())));
    let s = directory.stats();
    serde_json::json!({
        "role": role,
        "listen": listen,
        "record_ttl_secs": directory.config().record_ttl.as_secs(),
        "records": records,
        "pairs": pairs,
        "stats": {
            "registrations": s.registrations,
            "registrations_rejected": s.registrations_rejected,
            "deregistrations": s.deregistrations,
            "expirations": s.expirations,
            "lookups": s.lookups,
            "lookups_by_kind": {
                "address": s.lookups_by_kind.address,
                "hostname": s.lookups_by_kind.hostname,
                "wg_key": s.lookups_by_kind.wg_key,
                "capability": s.lookups_by_kind.capability,
                "group": s.lookups_by_kind.group,
                "ipv4": s.lookups_by_kind.ipv4,
            },
            "lookups_rejected": s.lookups_rejected,
            "stun_requests": s.stun_requests,
            "stun_refused": s.stun_refused,
            "dropped_malformed": s.dropped_malformed,
            "dropped_unknown": s.dropped_unknown,
            "intents_pushed": s.intents_pushed,
            "relayed_packets": s.relayed_packets,
            "relayed_bytes": s.relayed_bytes,
            "relay_refused": s.relay_refused,
            "relay_rate_limited": s.relay_rate_limited,
        },
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Revocation list files and when each was last applied.
struct RevocationFiles {
    files: Vec<(PathBuf, Option<std::time::SystemTime>)>,
}

impl RevocationFiles {
    fn new(files: Vec<PathBuf>) -> RevocationFiles {
        RevocationFiles { files: files.into_iter().map(|f| (f, None)).collect() }
    }

    /// Applies every file that changed since it was last read. At start-up a
    /// bad file is an error; later it is logged and the old list stays.
    fn reload(&mut self, directory: &mut Directory, owners: &[(meshtun_addr::NetworkId, [u8; 32])]) -> anyhow::Result<()> {
        for (file, seen) in &mut self.files {
            let modified = std::fs::metadata(&*file).and_then(|m| m.modified()).ok();
            if modified.is_some() && modified == *seen {
                continue;
            }
            let text = std::fs::read_to_string(&*file).map_err(|e| {
                crate::cli_error::CliError::new("config_error", format!("cannot read revocation list {}: {e}", file.display()))
            })?;
            let list = meshtun_proto::cert::SignedRevocations::from_file_str(&text)
                .map_err(|e| crate::cli_error::CliError::new("config_error", format!("{}: {e}", file.display())))?;
            let network = owners
                .iter()
                .find(|(n, key)| list.verify(key, *n).is_ok())
                .map(|(n, _)| *n)
                .ok_or_else(|| {
                    crate::cli_error::CliError::new("config_error", format!("{} is not signed by the owner of any network served here", file.display()))
                        .hint("pass the network's --network-owner N:KEY too")
                })?;
            match directory.set_revocations(network, list) {
                Ok(dropped) => tracing::info!(file = %file.display(), network = network.0, dropped, "revocation list applied"),
                Err(e) => tracing::debug!(file = %file.display(), reason = %e, "revocation list not newer"),
            }
            *seen = modified;
        }
        Ok(())
    }
}
