//! `meshtun-loadgen`: simulated nodes against meshtun backbones on loopback.
//! See docs/SCALING.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use meshtun_loadgen::run::{Backbones, Options, Report};

#[derive(Parser, Debug)]
#[command(name = "meshtun-loadgen", about = "Simulated meshtun nodes against backbones on loopback: registrations, heartbeats and lookups, with latency, CPU and RSS figures")]
struct Args {
    /// Simulated nodes (each with its own identity and signed record).
    #[arg(long, default_value_t = 20_000)]
    nodes: usize,
    /// Distinct identities [default: one per node]. Fewer: the nodes beyond
    /// them reuse identities in private networks 1, 2, ... (certificates
    /// from owner keys the loadgen makes) -- proof of work is the costly
    /// part of a million records.
    #[arg(long)]
    identities: Option<usize>,
    /// Seconds between a node's heartbeats (a fresh record with a higher sequence).
    #[arg(long, default_value_t = 25.0)]
    heartbeat: f64,
    /// Seconds of steady load after everyone registered.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Lookups per second (asker and target random; kinds by --mix).
    #[arg(long, default_value_t = 10_000.0)]
    lookup_rate: f64,
    /// Weights of lookups by address, hostname and capability.
    #[arg(long, default_value = "1:1:1")]
    mix: String,
    /// UDP sockets (each on its own 127.10.x.y source address); nodes share them round-robin.
    #[arg(long, default_value_t = 1024)]
    sockets: usize,
    /// Registrations in flight during the initial registration burst.
    #[arg(long, default_value_t = 4096)]
    window: usize,
    /// Verify the signature of one lookup answer in this many (1: every answer).
    #[arg(long, default_value_t = 100)]
    verify_every: u64,
    /// Register everyone, then hold without traffic for --duration (RSS per record).
    #[arg(long)]
    hold: bool,
    /// Use a running backbone at this address instead of starting one (repeatable).
    #[arg(long = "backbone")]
    backbone: Vec<SocketAddr>,
    /// Pid of that backbone, for its CPU and RSS figures (repeatable, same order).
    #[arg(long = "backbone-pid")]
    backbone_pid: Vec<u32>,
    /// The `meshtun` binary to start backbones from [default: next to this binary].
    #[arg(long)]
    meshtun: Option<PathBuf>,
    /// How many backbones to start (sharded by rendezvous hashing of address, hostname and capability).
    #[arg(long, default_value_t = 1)]
    backbones: usize,
    /// Copies of each key across backbones (with --backbones > 1).
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// With several backbones: SIGKILL backbone 0 this many seconds into the steady phase.
    #[arg(long)]
    kill_at: Option<f64>,
    /// Record TTL passed to started backbones.
    #[arg(long, default_value_t = 75)]
    record_ttl: u64,
    /// State directory for started backbones (one subdirectory each).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Extra arguments for started backbones.
    #[arg(long = "backbone-arg", allow_hyphen_values = true)]
    backbone_arg: Vec<String>,
    /// Seed of the simulated identities (and everything else random).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Identity cache [default: target/loadgen-identities-SEED.bin]; "none" disables it.
    #[arg(long)]
    identity_cache: Option<String>,
    /// Threads for generating identities [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Only make sure N identities are cached, then exit.
    #[arg(long)]
    only_identities: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
    /// Nice value for the backbones and the load generator [default: -10
    /// as root, so builds and tests sharing the machine do not starve the
    /// measurement; unchanged otherwise].
    #[arg(long, allow_hyphen_values = true)]
    priority: Option<i32>,
    /// Pin started backbones to the first CPUs and the load generator to
    /// the last one (on a small machine they otherwise compete for cores).
    #[arg(long)]
    pin: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let cache = match a.identity_cache.as_deref() {
        Some("none") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => Some(meshtun_loadgen::identities::default_cache(a.seed)),
    };
    let threads = a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    if a.only_identities {
        eprintln!("proof of work: {}", meshtun_loadgen::pow::implementation());
        meshtun_loadgen::identities::load_or_generate(a.nodes, a.seed, cache.as_deref(), threads)?;
        return Ok(());
    }
    let mix: Vec<u32> = a.mix.split(':').map(|s| s.parse()).collect::<Result<_, _>>()?;
    anyhow::ensure!(mix.len() == 3, "--mix is ADDRESS:HOSTNAME:CAPABILITY weights");
    let backbones = if a.backbone.is_empty() {
        let bin = a.meshtun.clone().unwrap_or_else(|| {
            std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("meshtun"))).unwrap_or_else(|| "meshtun".into())
        });
        Backbones::Spawn { bin, count: a.backbones.max(1), ttl_secs: a.record_ttl, state_dir: a.state_dir.clone(), extra_args: a.backbone_arg.clone() }
    } else {
        Backbones::External { addrs: a.backbone.clone(), pids: a.backbone_pid.clone() }
    };
    let opts = Options {
        nodes: a.nodes,
        identities: a.identities,
        seed: a.seed,
        cache,
        threads,
        heartbeat: Duration::from_secs_f64(a.heartbeat),
        duration: Duration::from_secs_f64(a.duration),
        lookup_rate: a.lookup_rate,
        mix: [mix[0], mix[1], mix[2]],
        sockets: a.sockets,
        window: a.window,
        verify_every: a.verify_every,
        hold: a.hold,
        backbones,
        replicas: a.replicas,
        kill_at: a.kill_at.map(Duration::from_secs_f64),
        failover_after: Duration::from_secs(1),
        progress: !a.quiet,
        // SAFETY: geteuid has no preconditions.
        priority: a.priority.or_else(|| (unsafe { libc::geteuid() } == 0).then_some(-10)),
        pin: a.pin,
    };
    let report = meshtun_loadgen::run::run(&opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    anyhow::ensure!(report.errors() == 0, "{} wrong or refused answers", report.errors());
    Ok(())
}

fn mib(b: Option<u64>) -> String {
    b.map_or("?".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
}

fn print_report(r: &Report) {
    let lat = |l: &meshtun_loadgen::run::Latency| format!("p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms", l.p50_us as f64 / 1e3, l.p99_us as f64 / 1e3, l.p999_us as f64 / 1e3, l.max_us as f64 / 1e3);
    println!("nodes {} on {} sockets, {} backbone(s); identities ready in {:.1} s", r.nodes, r.sockets, r.backbones.len(), r.identities_secs);
    println!(
        "registration burst: {:.0} registrations/s ({:.1} s); {}; rejected {}, retried {}, never registered {}",
        r.registrations_per_sec, r.registration_secs, lat(&r.registration_latency), r.registrations_rejected, r.registrations_retried, r.registrations_lost
    );
    if r.steady_secs > 0.0 {
        println!(
            "steady {:.1} s: heartbeats {:.0}/s acked ({} of {}); {}",
            r.steady_secs, r.heartbeats_per_sec, r.heartbeats_acked, r.heartbeats_sent, lat(&r.heartbeat_latency)
        );
        println!(
            "lookups {:.0}/s answered ({} of {} sent; correct {}, wrong {}, rejected {}, lost {}); {}",
            r.lookups_per_sec, r.lookups_answered, r.lookups_sent, r.lookups_correct, r.lookups_wrong, r.lookups_rejected, r.lookups_lost, lat(&r.lookup_latency)
        );
        for (name, l) in ["address", "hostname", "capability"].iter().zip(&r.lookup_latency_by_kind) {
            println!("  by {name:10}: {}", lat(l));
        }
        println!("signatures checked {} (bad {}), intents pushed to nodes {}", r.signatures_checked, r.signatures_bad, r.intents_received);
    }
    for b in &r.backbones {
        println!(
            "backbone {} pid {:?}: cpu {} (burst) / {} (steady) of one core; rss {} -> max {} ({} records, {} per record)",
            b.addr,
            b.pid,
            b.cpu_cores_registration.map_or("?".into(), |c| format!("{:.2}", c)),
            b.cpu_cores_steady.map_or("?".into(), |c| format!("{:.2}", c)),
            mib(b.rss_baseline_bytes),
            mib(b.rss_max_bytes),
            b.records,
            b.rss_per_record_bytes.map_or("?".into(), |x| format!("{x:.0} B"))
        );
    }
    if let Some(lost) = r.lookups_lost_after_kill {
        println!("after the kill: {lost} lookups sent to the dead backbone before failover; {} answered after failover", r.lookups_answered_after_failover.unwrap_or(0));
        println!(
            "re-homing: {} of {} registrations at new homes done, the last {:.1} s after failover",
            r.rehomed.unwrap_or(0),
            r.rehome_needed.unwrap_or(0),
            r.rehome_secs.unwrap_or(0.0)
        );
    }
    println!("loadgen cpu {:.2} cores; reject codes {:?}", r.loadgen_cpu_cores, r.reject_codes);
}
