//! The state directory: the identity key (whose address never changes) and
//! the WireGuard key. Files are created 0600 and written atomically; a file
//! that exists but cannot be read is an error, never silently replaced.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use boringtun::x25519::StaticSecret;
use meshtun_proto::Identity;
use rand::RngCore;

use crate::cli_error::CliError;
use meshtun_proto::identity::unhex32;

pub const IDENTITY_FILE: &str = "identity";
pub const WIREGUARD_KEY_FILE: &str = "wireguard.key";
/// IPv4 aliases this host gave peers whose canonical address collided.
pub const IPV4_ALIASES_FILE: &str = "ipv4-aliases";

/// Reads saved IPv4 aliases (`MESH-ADDRESS IPV4` per line); a missing or
/// unreadable file means none (aliases are then handed out afresh).
pub fn load_ipv4_aliases(file: &Path) -> Vec<(meshtun_addr::MeshAddr, std::net::Ipv4Addr)> {
    let Ok(text) = fs::read_to_string(file) else { return vec![] };
    text.lines()
        .filter_map(|line| {
            let (addr, ip) = line.split_once(' ')?;
            Some((addr.parse().ok()?, ip.trim().parse().ok()?))
        })
        .collect()
}

pub fn save_ipv4_aliases(file: &Path, aliases: &[(meshtun_addr::MeshAddr, std::net::Ipv4Addr)]) {
    let text: String = aliases.iter().map(|(a, ip)| format!("{a} {ip}\n")).collect();
    let tmp = file.with_extension("tmp");
    if fs::write(&tmp, text).and_then(|_| fs::rename(&tmp, file)).is_err() {
        tracing::warn!(file = %file.display(), "cannot save IPv4 aliases");
    }
}

pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    pub fn open(path: &Path) -> anyhow::Result<StateDir> {
        if !path.exists() {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(|e| {
                io_error(e, &format!("cannot create the state directory {}", path.display()))
            })?;
        }
        Ok(StateDir { path: path.to_path_buf() })
    }

    /// Loads the identity, creating it on first use.
    pub fn load_or_create_identity(&self) -> anyhow::Result<(Identity, bool)> {
        let file = self.path.join(IDENTITY_FILE);
        match fs::read_to_string(&file) {
            Ok(text) => {
                let identity = Identity::from_file_str(&text).map_err(|e| {
                    CliError::new(
                        "identity_corrupt",
                        format!("the identity file {} is unreadable: {e}", file.display()),
                    )
                    .hint(
                        "restore it from a backup: the mesh address is derived from this key. \
                         Only if the address may change, move the file away and a new identity is created.",
                    )
                })?;
                check_private(&file)?;
                Ok((identity, false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut secret = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut secret);
                let identity = Identity::generate(secret);
                write_private(&file, identity.to_file_string().as_bytes())?;
                Ok((identity, true))
            }
            Err(e) => Err(io_error(e, &format!("cannot read {}", file.display())).into()),
        }
    }

    /// Loads the WireGuard static key, creating it on first use.
    pub fn load_or_create_wireguard_key(&self) -> anyhow::Result<WireguardKey> {
        let file = self.path.join(WIREGUARD_KEY_FILE);
        match fs::read_to_string(&file) {
            Ok(text) => WireguardKey::parse(&text).ok_or_else(|| {
                CliError::new("identity_corrupt", format!("{} is not a WireGuard key file", file.display()))
                    .hint("delete it to create a new WireGuard key (the mesh address does not change)")
                    .into()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = WireguardKey::new(1);
                write_private(&file, key.to_file_string().as_bytes())?;
                Ok(key)
            }
            Err(e) => Err(io_error(e, &format!("cannot read {}", file.display())).into()),
        }
    }

    /// Makes and saves the next WireGuard key (atomically replacing the file).
    pub fn rotate_wireguard_key(&self, current: &WireguardKey) -> anyhow::Result<WireguardKey> {
        let next = WireguardKey::new(current.version + 1);
        let file = self.path.join(WIREGUARD_KEY_FILE);
        let tmp = file.with_extension("next");
        let _ = fs::remove_file(&tmp);
        write_private(&tmp, next.to_file_string().as_bytes())?;
        fs::rename(&tmp, &file).with_context(|| format!("cannot replace {}", file.display()))?;
        Ok(next)
    }
}

/// The WireGuard static key with its version and issue time.
#[derive(Clone)]
pub struct WireguardKey {
    pub secret: StaticSecret,
    pub version: u32,
    pub issued_unix: u64,
}

impl WireguardKey {
    fn new(version: u32) -> WireguardKey {
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let issued_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        WireguardKey { secret: StaticSecret::from(secret), version, issued_unix }
    }

    fn to_file_string(&self) -> String {
        let hex: String = self.secret.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
        format!("# meshtun WireGuard key (rotated automatically)\nversion = {}\nissued = {}\nsecret = {hex}\n", self.version, self.issued_unix)
    }

    /// The current format, or a bare hex key (version 1, issued now).
    fn parse(text: &str) -> Option<WireguardKey> {
        if let Some(bytes) = unhex32(text.trim()) {
            let mut key = WireguardKey::new(1);
            key.secret = StaticSecret::from(bytes);
            return Some(key);
        }
        let mut version = None;
        let mut issued = None;
        let mut secret = None;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (k, v) = line.split_once('=')?;
            match k.trim() {
                "version" => version = v.trim().parse().ok(),
                "issued" => issued = v.trim().parse().ok(),
                "secret" => secret = unhex32(v.trim()),
                _ => return None,
            }
        }
        Some(WireguardKey { secret: StaticSecret::from(secret?), version: version?, issued_unix: issued? })
    }
}

fn check_private(file: &Path) -> anyhow::Result<()> {
    let mode = fs::metadata(file)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(file = %file.display(), mode = format!("{:o}", mode & 0o777), "identity file is readable by others; fixing to 0600");
        fs::set_permissions(file, fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Writes `contents` to `file` with mode 0600, atomically (temp + rename),
/// refusing to replace an existing file.
fn write_private(file: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = file.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io_error(e, &format!("cannot write {}", tmp.display())))?;
    out.write_all(contents)?;
    out.sync_all()?;
    fs::hard_link(&tmp, file)
        .with_context(|| format!("{} appeared while it was being created", file.display()))?;
    fs::remove_file(&tmp)?;
    Ok(())
}

fn io_error(e: std::io::Error, what: &str) -> CliError {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        CliError::new("permission_denied", format!("{what}: permission denied"))
            .hint("run as root (sudo), or choose a directory you own with --state-dir")
    } else {
        CliError::new("io_error", format!("{what}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("meshtun-state-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn identity_is_created_once_with_mode_0600_and_then_reused() {
        let dir = temp_dir("create");
        let state = StateDir::open(&dir).unwrap();
        let (first, created) = state.load_or_create_identity().unwrap();
        assert!(created);
        let mode = fs::metadata(dir.join(IDENTITY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (second, created) = state.load_or_create_identity().unwrap();
        assert!(!created);
        assert_eq!(first.node_addr(), second.node_addr());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn corrupt_identity_is_an_error_and_the_file_is_left_alone() {
        let dir = temp_dir("corrupt");
        let state = StateDir::open(&dir).unwrap();
        fs::write(dir.join(IDENTITY_FILE), "version = 1\nsecret = nope\n").unwrap();
        let err = state.load_or_create_identity().unwrap_err();
        let cli = crate::cli_error::classify(&err);
        assert_eq!(cli.code, "identity_corrupt");
        assert!(cli.message.contains("line 2"), "{}", cli.message);
        assert_eq!(fs::read_to_string(dir.join(IDENTITY_FILE)).unwrap(), "version = 1\nsecret = nope\n");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn wireguard_key_is_created_once_and_reused() {
        let dir = temp_dir("wg");
        let state = StateDir::open(&dir).unwrap();
        let a = state.load_or_create_wireguard_key().unwrap();
        let b = state.load_or_create_wireguard_key().unwrap();
        assert_eq!(a.secret.to_bytes(), b.secret.to_bytes());
        let next = state.rotate_wireguard_key(&b).unwrap();
        assert_eq!(next.version, 2);
        let reloaded = state.load_or_create_wireguard_key().unwrap();
        assert_eq!((reloaded.version, reloaded.secret.to_bytes()), (2, next.secret.to_bytes()));
        assert_ne!(reloaded.secret.to_bytes(), a.secret.to_bytes());
        fs::remove_dir_all(dir).unwrap();
    }
}
