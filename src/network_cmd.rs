//! `meshtun network`: create a private network's owner key, sign
//! membership certificates and revocation lists, offline, as files.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use meshtun_addr::{MeshAddr, NetworkId};
use meshtun_proto::cert::{NetworkOwner, SignedCert};
use rand::RngCore;

use crate::cli_error::CliError;
use crate::control;

#[derive(Subcommand, Debug)]
pub enum NetworkCommand {
    /// Create the owner key of a private network (keep the .owner file offline).
    Create {
        /// Network number, 1-65534.
        #[arg(long)]
        network: u16,
        /// Directory to write network-N.owner (0600) into.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Sign a membership certificate for one node.
    Sign(SignArgs),
    /// Sign a revocation list (certificate serials that no longer work).
    Revoke {
        #[arg(long, value_name = "FILE")]
        owner: PathBuf,
        /// Serial numbers to revoke (repeatable; list every revoked serial:
        /// a new list replaces the old one).
        #[arg(long = "serial", required = true)]
        serials: Vec<u64>,
        /// Sequence number of this list; must grow with each new list
        /// [default: now, in unix seconds].
        #[arg(long)]
        seq: Option<u64>,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct SignArgs {
    /// The owner file from `meshtun network create`.
    #[arg(long, value_name = "FILE")]
    owner: PathBuf,
    /// The member's mesh address in this network (its node address from
    /// `meshtun id`, with this network's number: N:XXXX.XXXX.XXXX).
    #[arg(long)]
    address: String,
    /// A group the member is certified for (repeatable); firewall rules can trust these.
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Expiry: a duration from now (30d, 12h, 90m) or unix seconds.
    #[arg(long, default_value = "90d")]
    expires: String,
    /// Serial number (for revocation) [default: now, in unix microseconds].
    #[arg(long)]
    serial: Option<u64>,
    /// Where to write the certificate.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

pub fn run(command: NetworkCommand, json: bool) -> anyhow::Result<()> {
    match command {
        NetworkCommand::Create { network, out } => {
            let id = NetworkId(network);
            if network == 0 || id.is_reserved() {
                return Err(CliError::new("invalid_argument", format!("network {network} cannot be private"))
                    .hint("choose 1 to 65534; 0 is the public mesh")
                    .into());
            }
            let mut secret = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut secret);
            let owner = NetworkOwner::generate(id, secret);
            let file = out.join(format!("network-{network}.owner"));
            write_new(&file, owner.to_file_string().as_bytes(), 0o600)?;
            let key = meshtun_proto::identity::hex(&owner.public_key());
            report(json, serde_json::json!({ "network": network, "owner_key": key, "owner_file": file }), &format!(
                "created network {network}\nowner key  {key}\nsecret     {} (keep it offline)\nbackbones: meshtun backbone --network-owner {network}:{key}",
                file.display()
            ));
            Ok(())
        }
        NetworkCommand::Sign(args) => {
            let owner = load_owner(&args.owner)?;
            let addr: MeshAddr = args.address.parse().map_err(|e| CliError::new("invalid_argument", format!("--address: {e}")))?;
            if addr.network != owner.network() {
                return Err(CliError::new("invalid_argument", format!("{addr} is not in network {}", owner.network().0))
                    .hint(format!("use {}:{} (the node's address from `meshtun id`, with this network's number)", owner.network().0, addr.node))
                    .into());
            }
            for g in &args.groups {
                meshtun_proto::record::validate_hostname(g).map_err(|e| CliError::new("invalid_argument", format!("--group: {}", e.replace("hostname ", ""))))?;
            }
            let expires = parse_expiry(&args.expires)?;
            let serial = args.serial.unwrap_or_else(|| now_unix_micros());
            let cert = owner.sign_membership(addr.node, args.groups.clone(), expires, serial);
            write_new(&args.out, cert.to_file_string(&owner.public_key()).as_bytes(), 0o644)?;
            report(json, serde_json::json!({ "address": addr.to_string(), "groups": args.groups, "expires_unix": expires, "serial": serial, "file": args.out }), &format!(
                "certificate for {addr}, groups [{}], expires at unix {expires}, serial {serial}: {}\nthe member runs: meshtun up --network {} --cert {}",
                args.groups.join(", "), args.out.display(), owner.network().0, args.out.display()
            ));
            Ok(())
        }
        NetworkCommand::Revoke { owner, serials, seq, out } => {
            let owner = load_owner(&owner)?;
            let seq = seq.unwrap_or_else(|| now_unix_micros() / 1_000_000);
            let list = owner.sign_revocations(seq, serials.clone());
            write_new(&out, list.to_file_string().as_bytes(), 0o644)?;
            report(json, serde_json::json!({ "network": owner.network().0, "seq": seq, "serials": serials, "file": out }), &format!(
                "revocation list {seq} for network {} ({} serials): {}\nbackbones load it with --revocations {}",
                owner.network().0, serials.len(), out.display(), out.display()
            ));
            Ok(())
        }
    }
}

/// A member's certificate file: (owner key, certificate).
pub fn load_cert(file: &Path) -> anyhow::Result<([u8; 32], SignedCert)> {
    let text = std::fs::read_to_string(file).map_err(|e| CliError::new("config_error", format!("cannot read certificate {}: {e}", file.display())))?;
    SignedCert::from_file_str(&text).map_err(|e| CliError::new("config_error", format!("{}: {e}", file.display())).into())
}

fn load_owner(file: &Path) -> anyhow::Result<NetworkOwner> {
    let text = std::fs::read_to_string(file).map_err(|e| CliError::new("config_error", format!("cannot read owner key {}: {e}", file.display())))?;
    NetworkOwner::from_file_str(&text).map_err(|e| CliError::new("config_error", format!("{}: {e}", file.display())).into())
}

fn write_new(file: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(file).map_err(|e| {
        {
            let hint = if e.kind() == std::io::ErrorKind::AlreadyExists {
                "an existing file is never overwritten: choose another name or move it away"
            } else {
                "check that the directory exists and is writable"
            };
            CliError::new("io_error", format!("cannot create {}: {e}", file.display())).hint(hint)
        }
    })?;
    f.write_all(contents)?;
    Ok(())
}

fn report(json: bool, data: serde_json::Value, text: &str) {
    if json {
        println!("{}", control::ok_envelope(data));
    } else {
        println!("{text}");
    }
}

fn now_unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// `30d`, `12h`, `90m`, `45s` from now, or absolute unix seconds.
pub fn parse_expiry(text: &str) -> anyhow::Result<u64> {
    let now = now_unix_micros() / 1_000_000;
    let bad = || CliError::new("invalid_argument", format!("--expires {text:?}: expected a duration like 30d, 12h, 90m or unix seconds"));
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" => return Ok(n),
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(bad().into()),
    };
    Ok(now + secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiries_are_durations_from_now_or_unix_seconds() {
        assert_eq!(parse_expiry("1700000000").unwrap(), 1_700_000_000);
        let in_a_day = parse_expiry("1d").unwrap();
        let now = now_unix_micros() / 1_000_000;
        assert!((now + 86_399..=now + 86_401).contains(&in_a_day));
        assert!(parse_expiry("soon").is_err());
        assert!(parse_expiry("3w").is_err());
    }
}
