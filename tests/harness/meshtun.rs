//! Helpers for driving the `meshtun` binary inside a [`Lab`](super::Lab).

use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::{wait_until, CmdOutput, Lab, Ns, Proc};

/// Mesh prefix fd4d:6573:6874::/48.
pub const MESH_PREFIX: [u16; 3] = [0xfd4d, 0x6573, 0x6874];
pub const DEFAULT_INTERFACE: &str = "meshtun0";
const CLI_TIMEOUT: Duration = Duration::from_secs(20);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_meshtun")
}

/// Env for daemons: keep the caller's RUST_LOG, default to debug logs.
fn daemon_env() -> Vec<(&'static str, String)> {
    vec![
        ("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into())),
        ("RUST_BACKTRACE", "1".into()),
        ("NO_COLOR", "1".into()),
    ]
}

/// Runs `meshtun ARGS` in `ns`.
pub fn cli(ns: &Ns, args: &[&str]) -> CmdOutput {
    cli_timeout(ns, args, CLI_TIMEOUT)
}

pub fn cli_timeout(ns: &Ns, args: &[&str], timeout: Duration) -> CmdOutput {
    let mut v = vec![bin()];
    v.extend_from_slice(args);
    ns.exec_timeout(&v, timeout)
}

/// Parses a `--json` reply: `Ok(data)` for `{"status":"ok","data":..}` with
/// exit 0; `Err(description)` otherwise (error replies, bad JSON, exit codes).
pub fn json_data(out: &CmdOutput) -> Result<Value, String> {
    let v: Value = serde_json::from_str(out.stdout.trim()).map_err(|e| {
        format!("stdout is not JSON ({e}): {}", out.describe())
    })?;
    match v.get("status").and_then(Value::as_str) {
        Some("ok") if out.success() => v
            .get("data")
            .cloned()
            .ok_or_else(|| format!("`status: ok` without `data`: {}", out.describe())),
        Some("ok") => Err(format!("`status: ok` but nonzero exit: {}", out.describe())),
        Some("error") => Err(format!(
            "error reply code={} message={} hint={} ({})",
            v.get("code").unwrap_or(&Value::Null),
            v.get("message").unwrap_or(&Value::Null),
            v.get("hint").unwrap_or(&Value::Null),
            out.code().map_or("no exit code".into(), |c| format!("exit {c}"))
        )),
        _ => Err(format!("reply has no valid `status`: {}", out.describe())),
    }
}

/// `meshtun status --socket PATH --json` data, or why not.
pub fn status(ns: &Ns, socket: &std::path::Path) -> Result<Value, String> {
    let sock = socket.to_str().expect("utf-8 path");
    json_data(&cli(ns, &["status", "--socket", sock, "--json"]))
}

#[derive(Clone, Debug)]
pub struct Identity {
    pub address: String,
    pub ipv6: Ipv6Addr,
    pub public_key: String,
}

pub fn is_mesh_ipv6(a: &Ipv6Addr) -> bool {
    a.segments()[..3] == MESH_PREFIX
}

/// `meshtun id --state-dir DIR --json` (creates the identity if missing).
pub fn identity(ns: &Ns, state_dir: &std::path::Path) -> Identity {
    let dir = state_dir.to_str().expect("utf-8 path");
    let out = cli(ns, &["id", "--state-dir", dir, "--json"]);
    let data = json_data(&out).unwrap_or_else(|e| panic!("`meshtun id` failed: {e}"));
    let s = |k: &str| {
        data.get(k)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("`meshtun id` data lacks string `{k}`: {data}"))
            .to_string()
    };
    let address = s("address");
    let ipv6: Ipv6Addr = s("ipv6")
        .parse()
        .unwrap_or_else(|e| panic!("`meshtun id` ipv6 {:?} does not parse: {e}", s("ipv6")));
    assert!(is_mesh_ipv6(&ipv6), "`meshtun id` ipv6 {ipv6} is outside fd4d:6573:6874::/48");
    assert!(
        address.starts_with("0:") && address.len() == "0:XXXX.XXXX.XXXX".len(),
        "`meshtun id` address {address:?} is not of the form 0:XXXX.XXXX.XXXX"
    );
    Identity {
        address,
        ipv6,
        public_key: s("public_key"),
    }
}

pub struct Backbone {
    pub ns: Ns,
    pub proc: Proc,
    pub socket: PathBuf,
    pub listen: SocketAddr,
}

impl Backbone {
    /// Starts `meshtun backbone` in `ns` and waits until its status answers.
    pub fn start(lab: &Lab, ns: &Ns, listen: SocketAddr, record_ttl: Option<u64>) -> Backbone {
        Self::start_as(lab, ns, ns.role(), listen, record_ttl)
    }

    /// Like [`Backbone::start`], with `name` choosing the control socket
    /// (`{name}.sock`) and log (`backbone-{name}.log`): a backbone restarted
    /// in the same namespace under a new name keeps the old log.
    pub fn start_as(lab: &Lab, ns: &Ns, name: &str, listen: SocketAddr, record_ttl: Option<u64>) -> Backbone {
        let socket = lab.path(&format!("{name}.sock"));
        let listen_s = listen.to_string();
        let ttl_s = record_ttl.map(|t| t.to_string());
        let mut args = vec![bin(), "backbone", "--listen", &listen_s, "--socket", socket.to_str().unwrap()];
        if let Some(t) = &ttl_s {
            args.extend_from_slice(&["--record-ttl", t]);
        }
        let env = daemon_env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let proc = ns.spawn_env(&format!("backbone-{name}"), &args, &env);
        let bb = Backbone {
            ns: ns.clone(),
            proc,
            socket,
            listen,
        };
        wait_until(Duration::from_secs(15), "the backbone's status to answer", || {
            bb.proc.check_running()?;
            let d = bb.status()?;
            match d.get("role").and_then(Value::as_str) {
                Some("backbone") => Ok(()),
                other => Err(format!("role is {other:?}: {d}")),
            }
        });
        bb
    }

    pub fn status(&self) -> Result<Value, String> {
        status(&self.ns, &self.socket)
    }

    /// The `records` array of the status.
    pub fn records(&self) -> Result<Vec<Value>, String> {
        let d = self.status()?;
        d.get("records")
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| format!("backbone status lacks `records` array: {d}"))
    }

    pub fn record_of(&self, address: &str) -> Result<Option<Value>, String> {
        Ok(self
            .records()?
            .into_iter()
            .find(|r| r.get("address").and_then(Value::as_str) == Some(address)))
    }
}

pub struct NodeOpts<'a> {
    pub hostname: &'a str,
    pub heartbeat_secs: Option<u64>,
    pub interface: Option<&'a str>,
    pub listen_port: Option<u16>,
    /// More `--backbone`s after the one given to [`Node::start`].
    pub extra_backbones: Vec<SocketAddr>,
    /// More arguments for `meshtun up` (`--capability X`, `--group G`, ...).
    pub extra_args: Vec<&'a str>,
}

impl<'a> NodeOpts<'a> {
    pub fn new(hostname: &'a str) -> Self {
        NodeOpts {
            hostname,
            heartbeat_secs: None,
            interface: None,
            listen_port: None,
            extra_backbones: Vec::new(),
            extra_args: Vec::new(),
        }
    }
}

pub struct Node {
    pub ns: Ns,
    pub proc: Proc,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub hostname: String,
    pub interface: String,
    pub id: Identity,
}

impl Node {
    /// Learns the identity with `meshtun id`, then starts `meshtun up` in `ns`
    /// (does not wait for registration: see [`Node::wait_registered`]).
    pub fn start(lab: &Lab, ns: &Ns, backbone: SocketAddr, opts: NodeOpts) -> Node {
        let role = ns.role();
        let state_dir = lab.path(&format!("state-{role}"));
        std::fs::create_dir_all(&state_dir).unwrap();
        let socket = lab.path(&format!("{role}.sock"));
        let id = identity(ns, &state_dir);
        let bb = backbone.to_string();
        let hb = opts.heartbeat_secs.map(|h| h.to_string());
        let lp = opts.listen_port.map(|p| p.to_string());
        let extra_bb: Vec<String> = opts.extra_backbones.iter().map(|b| b.to_string()).collect();
        let mut args = vec![
            bin(),
            "up",
            "--backbone",
            &bb,
            "--hostname",
            opts.hostname,
            "--state-dir",
            state_dir.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
        ];
        if let Some(i) = opts.interface {
            args.extend_from_slice(&["--interface", i]);
        }
        if let Some(p) = &lp {
            args.extend_from_slice(&["--listen-port", p]);
        }
        if let Some(h) = &hb {
            args.extend_from_slice(&["--heartbeat-secs", h]);
        }
        for b in &extra_bb {
            args.extend_from_slice(&["--backbone", b]);
        }
        args.extend_from_slice(&opts.extra_args);
        let env = daemon_env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let proc = ns.spawn_env(&format!("node-{role}"), &args, &env);
        Node {
            ns: ns.clone(),
            proc,
            socket,
            state_dir,
            hostname: opts.hostname.to_string(),
            interface: opts.interface.unwrap_or(DEFAULT_INTERFACE).to_string(),
            id,
        }
    }

    pub fn status(&self) -> Result<Value, String> {
        status(&self.ns, &self.socket)
    }

    /// `(address, state)` of every backbone in the node's status.
    pub fn backbone_states(&self) -> Result<Vec<(String, String)>, String> {
        let d = self.status()?;
        let list = d
            .get("backbones")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("node status lacks `backbones` array: {d}"))?;
        Ok(list
            .iter()
            .map(|b| {
                let f = |k: &str| b.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                (f("address"), f("state"))
            })
            .collect())
    }

    /// Waits until every backbone in the node's status is `registered` and
    /// the interface carries the mesh address.
    pub fn wait_registered_all(&self, timeout: Duration) {
        wait_until(
            timeout,
            &format!("node `{}` to register with every backbone and configure {}", self.hostname, self.interface),
            || {
                self.proc.check_running()?;
                let states = self.backbone_states()?;
                if states.is_empty() || states.iter().any(|(_, s)| s != "registered") {
                    return Err(format!("backbones {states:?}"));
                }
                self.interface_has_address()
            },
        );
    }

    /// State of the first backbone in the node's status.
    pub fn backbone_state(&self) -> Result<String, String> {
        let d = self.status()?;
        d.get("backbones")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(|b| b.get("state"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("node status has no backbones[0].state: {d}"))
    }

    pub fn peer(&self, address: &str) -> Result<Option<Value>, String> {
        let d = self.status()?;
        let peers = d
            .get("peers")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("node status lacks `peers` array: {d}"))?;
        Ok(peers
            .iter()
            .find(|p| p.get("address").and_then(Value::as_str) == Some(address))
            .cloned())
    }

    /// Is the mesh address configured on the node's interface?
    pub fn interface_has_address(&self) -> Result<(), String> {
        let out = super::ip(&["-n", self.ns.name(), "-6", "addr", "show", "dev", &self.interface]);
        if !out.success() {
            return Err(format!("interface {} missing: {}", self.interface, out.stderr.trim()));
        }
        let want = self.id.ipv6.to_string();
        if out.stdout.contains(&format!("inet6 {want}/")) {
            Ok(())
        } else {
            Err(format!("{} lacks {want}: {}", self.interface, out.stdout.trim()))
        }
    }

    /// Waits until the daemon is registered with its backbone and its
    /// interface carries its mesh address.
    pub fn wait_registered(&self, timeout: Duration) {
        wait_until(
            timeout,
            &format!("node `{}` to register and configure {}", self.hostname, self.interface),
            || {
                self.proc.check_running()?;
                let st = self.backbone_state()?;
                if st != "registered" {
                    return Err(format!("backbone state {st:?}"));
                }
                self.interface_has_address()
            },
        );
    }
}
