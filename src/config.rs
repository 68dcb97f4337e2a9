//! Config files: `/etc/meshtun/meshtun.toml` for `meshtun up` and
//! `/etc/meshtun/backbone.toml` for `meshtun backbone`.
//!
//! Every key is optional and named after its command-line flag (`--mtu` is
//! `mtu`, `--heartbeat-secs` is `heartbeat_secs`); a repeatable flag is a
//! list named in the plural (`--backbone` is `backbones`, `--capability` is
//! `capabilities`, `--firewall` is `firewall_rules`, `--network-owner` is
//! `network_owners`), and giving the flag replaces the file's whole list.
//! Precedence: built-in default < config file < environment variable <
//! command-line flag.
//!
//! Unknown keys, wrong types and bad values are errors that name the file,
//! line and column and say what was expected. Values are checked while they
//! are read, by the field's type ([`Int`], [`Hostname`], ...), so adding a key
//! is one field with a doc comment in [`NodeFile`] or [`BackboneFile`], one
//! line in its `apply`, and its documented entry in `packaging/*.toml` (a test
//! fails if a key is missing there).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

// `apply` needs the CLI types of main.rs; the fuzz target
// (fuzz/fuzz_targets/config.rs) includes this file without them.
#[cfg(not(fuzzing))]
use clap::parser::ValueSource;
#[cfg(not(fuzzing))]
use clap::ArgMatches;
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::Deserialize;

use crate::cli_error::CliError;

pub const DEFAULT_NODE_FILE: &str = "/etc/meshtun/meshtun.toml";
pub const DEFAULT_BACKBONE_FILE: &str = "/etc/meshtun/backbone.toml";

/// Interface MTU (`--mtu`, `mtu`).
pub type Mtu = Int<1280, 9000>;
/// Seconds between heartbeats (`--heartbeat-secs`, `heartbeat_secs`).
pub type HeartbeatSecs = Int<1, 3600>;
/// Seconds a backbone record lives (`--record-ttl`, `record_ttl`).
pub type RecordTtl = Int<2, 86400>;
/// Mesh network number; 65535 is reserved.
pub type Network = Int<0, 65534>;
/// A UDP port; 0 picks a free one (or, for `dns_port`, turns DNS off).
pub type Port = Int<0, 65535>;
/// Days between WireGuard key rotations, 0 is never (`--key-rotation-days`,
/// `key_rotation_days`).
pub type KeyRotationDays = Int<0, 3650>;

/// The node's config file, read by `meshtun up`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// Backbones to register with, as "HOST:PORT" (`--backbone`, repeatable).
    pub backbones: Option<Backbones>,
    /// Standalone relays to relay through, as "HOST:PORT" (`--relay`, repeatable).
    pub relays: Option<Backbones>,
    /// Name other agents can look this node up by (`--hostname`).
    pub hostname: Option<Hostname>,
    /// Mesh network number, 0 is the public mesh (`--network`).
    pub network: Option<Network>,
    /// Name of the TUN interface (`--interface`).
    pub interface: Option<InterfaceName>,
    /// UDP port for WireGuard and backbone traffic (`--listen-port`).
    pub listen_port: Option<Port>,
    /// Interface MTU (`--mtu`).
    pub mtu: Option<Mtu>,
    /// Seconds between heartbeats to the backbones (`--heartbeat-secs`).
    pub heartbeat_secs: Option<HeartbeatSecs>,
    /// Capabilities this node offers, lowercase DNS labels (`--capability`, repeatable).
    pub capabilities: Option<Tags>,
    /// Groups this node belongs to, lowercase DNS labels (`--group`, repeatable).
    pub groups: Option<Tags>,
    /// DNS domain the daemon answers on its mesh address (`--dns-domain`).
    pub dns_domain: Option<DnsDomain>,
    /// UDP port of the mesh DNS server, 0 is off (`--dns-port`).
    pub dns_port: Option<Port>,
    /// Do not configure systemd-resolved for the mesh domain (`--no-resolved`).
    pub no_resolved: Option<bool>,
    /// Membership certificate for a private network (`--cert`).
    pub cert: Option<AbsolutePath>,
    /// Inbound firewall rules, first match wins (`--firewall`, repeatable).
    pub firewall_rules: Option<FirewallRules>,
    /// Inbound policy when no rule matches: allow or deny (`--firewall-default`).
    pub firewall_default: Option<FirewallDefault>,
    /// Days between WireGuard key rotations, 0 is never (`--key-rotation-days`).
    pub key_rotation_days: Option<KeyRotationDays>,
    /// Serve Prometheus metrics on this "IP:PORT" (`--metrics-listen`).
    pub metrics_listen: Option<MetricsListen>,
    /// Directory of the identity and keys (`--state-dir`).
    pub state_dir: Option<AbsolutePath>,
    /// The daemon's control socket (`--socket`).
    pub socket: Option<AbsolutePath>,
    /// Log level or filter (`--log-level`).
    pub log_level: Option<LogLevel>,
    /// Log format: text or json (`--log-format`).
    pub log_format: Option<LogFormat>,
}

/// The backbone's config file, read by `meshtun backbone`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneFile {
    /// UDP addresses to serve nodes on, each "IP:PORT" (`--listen`, repeatable).
    pub listen: Option<ListenAddrs>,
    /// Seconds a record lives without a heartbeat (`--record-ttl`).
    pub record_ttl: Option<RecordTtl>,
    /// The backbone's control socket (`--socket`).
    pub socket: Option<AbsolutePath>,
    /// Serve metrics and the mesh picture on this "IP:PORT" (`--metrics-listen`).
    pub metrics_listen: Option<MetricsListen>,
    /// Private networks served, each "NETWORK:OWNER-KEY-HEX" (`--network-owner`, repeatable).
    pub network_owners: Option<NetworkOwners>,
    /// Owner-signed revocation lists, absolute paths (`--revocations`, repeatable).
    pub revocations: Option<AbsolutePaths>,
    /// Where hostname bindings are kept across restarts (`--state-dir`).
    pub state_dir: Option<AbsolutePath>,
    /// Log level or filter (`--log-level`).
    pub log_level: Option<LogLevel>,
    /// Log format: text or json (`--log-format`).
    pub log_format: Option<LogFormat>,
}

/// Which kind of config file, for `meshtun config check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Node,
    Backbone,
}

impl Kind {
    pub fn default_file(self) -> &'static str {
        match self {
            Kind::Node => DEFAULT_NODE_FILE,
            Kind::Backbone => DEFAULT_BACKBONE_FILE,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Node => "node",
            Kind::Backbone => "backbone",
        }
    }

    /// Parses `text` as this kind of file; only the errors matter here.
    pub fn check(self, file: &Path, text: &str) -> Result<(), ConfigError> {
        match self {
            Kind::Node => parse::<NodeFile>(file, text).map(drop),
            Kind::Backbone => parse::<BackboneFile>(file, text).map(drop),
        }
    }
}

// ---------------------------------------------------------------------------
// errors
// ---------------------------------------------------------------------------

/// A config problem, shown as `FILE:LINE:COLUMN: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column (in characters), when the problem has a place.
    pub location: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some((line, column)) => write!(f, "{}:{line}:{column}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> CliError {
        CliError::new("config_error", e.to_string())
    }
}

impl ConfigError {
    /// The JSON form `meshtun config check --json` prints.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "file": self.file,
            "line": self.location.map(|l| l.0),
            "column": self.location.map(|l| l.1),
            "message": self.message,
        })
    }
}

/// Reads and parses `file`.
pub fn load<T: DeserializeOwned>(file: &Path) -> Result<T, ConfigError> {
    let text = read(file)?;
    parse(file, &text)
}

/// Reads `file` as text; errors are [`ConfigError`]s without a location.
pub fn read(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file).map_err(|e| ConfigError {
        file: file.to_path_buf(),
        location: None,
        message: match e.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_string(),
            std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
            std::io::ErrorKind::InvalidData => "not UTF-8 text".to_string(),
            _ => format!("cannot read: {e}"),
        },
    })
}

/// Parses `text` (the contents of `file`) into `T`, turning TOML and serde
/// errors into friendly messages with a line and column.
pub fn parse<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    let error = |span: Option<std::ops::Range<usize>>, message: String| ConfigError {
        file: file.to_path_buf(),
        location: span.map(|s| line_column(text, s.start)),
        message,
    };
    let deserializer =
        toml::Deserializer::parse(text).map_err(|e| error(e.span(), syntax_message(e.message(), text, e.span())))?;
    serde_path_to_error::deserialize::<_, T>(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        error(inner.span(), friendly(inner.message(), &key, field_names::<T>()))
    })
}

fn syntax_message(message: &str, text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let message = message.trim_end().replace('\n', "; ");
    // The rest of the line where the error is, without a comment.
    let rest = span
        .clone()
        .and_then(|s| text.get(s.start..))
        .map(|r| r.lines().next().unwrap_or("").split('#').next().unwrap_or("").trim())
        .unwrap_or("");
    if message.starts_with("string values must be quoted") {
        if rest.is_empty() {
            return "invalid TOML: missing value after `=`".to_string();
        }
        return format!("invalid TOML: cannot read the value `{rest}`; write strings in quotes (hostname = \"agent-1\"), numbers without");
    }
    if message == "duplicate key" {
        let key = span.and_then(|s| text.get(s)).unwrap_or("").trim();
        return format!("invalid TOML: duplicate key `{key}`");
    }
    format!("invalid TOML: {message}")
}

/// Rewords serde's messages: unknown fields become unknown keys with the
/// list of known ones, type errors name the key, and value errors raised by
/// the field types get the key in front.
fn friendly(message: &str, key: &str, known: &[&str]) -> String {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let unknown = rest.split('`').next().unwrap_or(rest);
        return format!("unknown key `{unknown}`; expected one of {}", known.join(", "));
    }
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        if let Some(at) = rest.rfind(", expected ") {
            let (found, expected) = (&rest[..at], &rest[at + ", expected ".len()..]);
            let expected = match expected {
                "a sequence" => "an array",
                "a boolean" => "true or false",
                other => other,
            };
            let found = match found {
                "sequence" => "an array".to_string(),
                "map" => "a table".to_string(),
                other => other.replacen("floating point", "float", 1),
            };
            return format!("invalid type for `{key}`: expected {expected}, found {found}");
        }
    }
    if message.starts_with("duplicate key") {
        return message.to_string();
    }
    format!("invalid value for `{key}`: {message}")
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// The field names of a `#[derive(Deserialize)]` struct, in order.
pub fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("probed"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

// ---------------------------------------------------------------------------
// value types: each checks its value while it is read
// ---------------------------------------------------------------------------

/// An integer in `LO..=HI`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Int<const LO: i64, const HI: i64>(i64);

impl<const LO: i64, const HI: i64> Int<LO, HI> {
    /// The accepted range, shared with the clap value parsers.
    pub const RANGE: RangeInclusive<i64> = LO..=HI;
    /// The same for `u64` value parsers (only for ranges with `LO >= 0`).
    pub const RANGE_U64: RangeInclusive<u64> = (LO as u64)..=(HI as u64);

    /// The value as `T`, which the range guarantees it fits.
    pub fn get<T: TryFrom<i64>>(self) -> T {
        T::try_from(self.0).unwrap_or_else(|_| unreachable!("{} is range-checked to {LO}..={HI}", self.0))
    }
}

impl<'de, const LO: i64, const HI: i64> Deserialize<'de> for Int<LO, HI> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<const LO: i64, const HI: i64>;
        impl<const LO: i64, const HI: i64> Visitor<'_> for V<LO, HI> {
            type Value = i64;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an integer in {LO}..={HI}")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
                if (LO..=HI).contains(&v) {
                    Ok(v)
                } else {
                    Err(E::custom(format!("{v} is not in {LO}..={HI}")))
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
                match i64::try_from(v) {
                    Ok(v) => self.visit_i64(v),
                    Err(_) => Err(E::custom(format!("{v} is not in {LO}..={HI}"))),
                }
            }
        }
        deserializer.deserialize_i64(V::<LO, HI>).map(Int)
    }
}

/// At least one backbone, each "HOST:PORT".
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Vec<HostPort>")]
pub struct Backbones(pub Vec<String>);

impl TryFrom<Vec<HostPort>> for Backbones {
    type Error = String;
    fn try_from(list: Vec<HostPort>) -> Result<Self, String> {
        if list.is_empty() {
            return Err("the list is empty; give at least one \"HOST:PORT\", or leave the key out".into());
        }
        Ok(Backbones(list.into_iter().map(|h| h.0).collect()))
    }
}

/// "HOST:PORT" or "[IPv6]:PORT", with a port in 1..=65535. Names are
/// resolved when the daemon starts, not when the file is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort(pub String);

impl TryFrom<String> for HostPort {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let bad = || format!("{text:?} is not HOST:PORT (e.g. \"198.18.0.1:7400\" or \"backbone.example:7400\")");
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let host_ok = if let Some(inner) = host.strip_prefix('[') {
            inner.strip_suffix(']').is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
        } else {
            !host.is_empty() && !host.contains(':') && !host.chars().any(char::is_whitespace)
        };
        if !host_ok || !port.parse::<u16>().is_ok_and(|p| p != 0) {
            return Err(bad());
        }
        Ok(HostPort(text))
    }
}

/// One lowercase DNS label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hostname(pub String);

impl TryFrom<String> for Hostname {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        meshtun_proto::record::validate_hostname(&name)?;
        Ok(Hostname(name))
    }
}

/// A Linux interface name: 1 to 15 bytes, no '/', ':' or whitespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceName(pub String);

impl TryFrom<String> for InterfaceName {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        let ok = (1..=15).contains(&name.len())
            && name != "."
            && name != ".."
            && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
        if !ok {
            return Err(format!("{name:?} is not an interface name (1 to 15 characters, no '/', ':' or spaces)"));
        }
        Ok(InterfaceName(name))
    }
}

/// An absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbsolutePath(pub PathBuf);

impl TryFrom<String> for AbsolutePath {
    type Error = String;
    fn try_from(path: String) -> Result<Self, String> {
        if !path.starts_with('/') {
            return Err(format!("{path:?} is not an absolute path"));
        }
        Ok(AbsolutePath(PathBuf::from(path)))
    }
}

/// A log level or a tracing filter such as "info,meshtun=debug".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLevel(pub String);

impl TryFrom<String> for LogLevel {
    type Error = String;
    fn try_from(level: String) -> Result<Self, String> {
        // EnvFilter takes any word as a target name, so a typo like "inof"
        // would silently log nothing: every directive must be a level or
        // TARGET=LEVEL.
        const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
        let directive_ok = |d: &str| LEVELS.contains(&d.trim().to_ascii_lowercase().as_str()) || d.contains('=');
        if level.trim().is_empty()
            || !level.split(',').all(directive_ok)
            || tracing_subscriber::EnvFilter::try_new(&level).is_err()
        {
            return Err(format!(
                "{level:?} is not a log level; expected error, warn, info, debug, trace or a filter such as \"info,meshtun=debug\""
            ));
        }
        Ok(LogLevel(level))
    }
}

/// At least one "IP:PORT" to listen on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Vec<ListenAddr>")]
pub struct ListenAddrs(pub Vec<SocketAddr>);

impl TryFrom<Vec<ListenAddr>> for ListenAddrs {
    type Error = String;
    fn try_from(list: Vec<ListenAddr>) -> Result<Self, String> {
        if list.is_empty() {
            return Err("the list is empty; give at least one \"IP:PORT\", or leave the key out".into());
        }
        Ok(ListenAddrs(list.into_iter().map(|a| a.0).collect()))
    }
}

/// A `--log-format` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFormat(pub super::LogFormat);

impl TryFrom<String> for LogFormat {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        use clap::ValueEnum;
        super::LogFormat::from_str(&name, false).map(LogFormat).map_err(|_| {
            let names: Vec<String> = super::LogFormat::value_variants()
                .iter()
                .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
                .collect();
            format!("{name:?} is not a log format; expected {}", names.join(" or "))
        })
    }
}

/// "IP:PORT" to listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl TryFrom<String> for ListenAddr {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
            .map(ListenAddr)
            .map_err(|_| format!("{text:?} is not IP:PORT (e.g. \"0.0.0.0:7400\" or \"[::]:7400\")"))
    }
}

/// Capability or group tags: lowercase DNS labels, at most
/// [`meshtun_proto::record::MAX_TAGS`] (more would make the node's record
/// invalid). An empty list means none.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Vec<Tag>")]
pub struct Tags(pub Vec<String>);

impl TryFrom<Vec<Tag>> for Tags {
    type Error = String;
    fn try_from(list: Vec<Tag>) -> Result<Self, String> {
        use meshtun_proto::record::MAX_TAGS;
        if list.len() > MAX_TAGS {
            return Err(format!("{} tags; at most {MAX_TAGS}", list.len()));
        }
        Ok(Tags(list.into_iter().map(|t| t.0).collect()))
    }
}

/// One capability or group: a lowercase DNS label, like a hostname.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag(pub String);

impl TryFrom<String> for Tag {
    type Error = String;
    fn try_from(tag: String) -> Result<Self, String> {
        meshtun_proto::record::validate_hostname(&tag).map_err(|e| e.replacen("hostname ", "", 1))?;
        Ok(Tag(tag))
    }
}

/// A DNS domain such as "mesh" or "mesh.example": lowercase labels
/// separated by dots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsDomain(pub String);

impl TryFrom<String> for DnsDomain {
    type Error = String;
    fn try_from(domain: String) -> Result<Self, String> {
        let ok = domain.len() <= 253
            && domain.split('.').all(|label| meshtun_proto::record::validate_hostname(label).is_ok());
        if !ok {
            return Err(format!(
                "{domain:?} is not a DNS domain (labels of a-z, 0-9 and '-' separated by dots, e.g. \"mesh\")"
            ));
        }
        Ok(DnsDomain(domain))
    }
}

/// Firewall rules, each checked by the firewall's own parser. An empty list
/// means no rules (only the default policy).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "Vec<FirewallRule>")]
pub struct FirewallRules(pub Vec<String>);

impl From<Vec<FirewallRule>> for FirewallRules {
    fn from(list: Vec<FirewallRule>) -> Self {
        FirewallRules(list.into_iter().map(|r| r.0).collect())
    }
}

/// One firewall rule such as "allow tcp/22 from group:ops".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallRule(pub String);

impl TryFrom<String> for FirewallRule {
    type Error = String;
    fn try_from(rule: String) -> Result<Self, String> {
        rule.parse::<meshtun_overlay::firewall::Rule>().map_err(|e| e.to_string())?;
        Ok(FirewallRule(rule))
    }
}

/// The inbound policy when no firewall rule matches: "allow" or "deny".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallDefault(pub String);

impl TryFrom<String> for FirewallDefault {
    type Error = String;
    fn try_from(policy: String) -> Result<Self, String> {
        if policy != "allow" && policy != "deny" {
            return Err(format!("{policy:?} is not a firewall policy; expected allow or deny"));
        }
        Ok(FirewallDefault(policy))
    }
}

/// Where to serve metrics: what `--metrics-listen` takes ("IP:PORT").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsListen(pub SocketAddr);

impl TryFrom<String> for MetricsListen {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        parse_listen(&text).map(MetricsListen)
    }
}

/// Private networks a backbone serves. An empty list means none.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "Vec<NetworkOwner>")]
pub struct NetworkOwners(pub Vec<String>);

impl From<Vec<NetworkOwner>> for NetworkOwners {
    fn from(list: Vec<NetworkOwner>) -> Self {
        NetworkOwners(list.into_iter().map(|o| o.0).collect())
    }
}

/// "NETWORK:OWNER-KEY-HEX": a network number in 0..=65534 and the owner's
/// public key as 64 hex digits, as `meshtun network create` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkOwner(pub String);

impl TryFrom<String> for NetworkOwner {
    type Error = String;
    fn try_from(spec: String) -> Result<Self, String> {
        let ok = spec.split_once(':').is_some_and(|(n, key)| {
            n.parse::<u16>().is_ok_and(|n| Network::RANGE.contains(&i64::from(n)))
                && meshtun_proto::identity::unhex32(key).is_some()
        });
        if !ok {
            return Err(format!(
                "{spec:?} is not NETWORK:OWNER-KEY (a network number in {}..={} and 64 hex digits, \
                 as printed by `meshtun network create`)",
                Network::RANGE.start(),
                Network::RANGE.end()
            ));
        }
        Ok(NetworkOwner(spec))
    }
}

/// Absolute paths. An empty list means none.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "Vec<AbsolutePath>")]
pub struct AbsolutePaths(pub Vec<PathBuf>);

impl From<Vec<AbsolutePath>> for AbsolutePaths {
    fn from(list: Vec<AbsolutePath>) -> Self {
        AbsolutePaths(list.into_iter().map(|p| p.0).collect())
    }
}

/// Implements `Deserialize` for a string newtype through its
/// `TryFrom<String>`, failing inside the TOML value so the error points at
/// that value (also inside an array). `#[serde(try_from)]` would fail after
/// the value is read, and the error would point at the enclosing array.
macro_rules! from_toml_string {
    ($($ty:ident),*) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a string")
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        $ty::try_from(v.to_string()).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(V)
            }
        }
    )*};
}

from_toml_string!(
    HostPort, Hostname, InterfaceName, AbsolutePath, LogLevel, LogFormat, ListenAddr, Tag, DnsDomain, FirewallRule,
    FirewallDefault, MetricsListen, NetworkOwner
);

// ---------------------------------------------------------------------------
// merging into the command line
// ---------------------------------------------------------------------------

/// Puts `file`'s value into `slot` unless the user gave `id` on the command
/// line or in the environment.
#[cfg(not(fuzzing))]
fn set<T>(slot: &mut T, matches: &ArgMatches, id: &str, file: Option<T>) {
    let from_user = matches!(matches.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable));
    if let (false, Some(value)) = (from_user, file) {
        *slot = value;
    }
}

/// The file `--config` names, or the default one if it exists; `None` when
/// there is no file to read.
#[cfg(not(fuzzing))]
fn chosen_file(explicit: Option<&Path>, default: &str) -> Option<PathBuf> {
    match explicit {
        Some(path) => Some(path.to_path_buf()),
        None => Path::new(default).exists().then(|| PathBuf::from(default)),
    }
}

/// Reads the config file of `meshtun up` or `meshtun backbone` (if any) and
/// fills in every setting the command line left at its default.
#[cfg(not(fuzzing))]
pub fn apply(cli: &mut super::Cli, matches: &ArgMatches) -> Result<(), CliError> {
    let (mut log_level, mut log_format) = (None, None);
    match &mut cli.command {
        super::Command::Up(args) => {
            let sub = matches.subcommand_matches("up").expect("clap parsed `up`");
            let file = chosen_file(args.config.as_deref(), DEFAULT_NODE_FILE);
            if let Some(path) = &file {
                let f: NodeFile = load(path)?;
                set(&mut args.backbones, sub, "backbones", f.backbones.map(|b| b.0));
                set(&mut args.relays, sub, "relays", f.relays.map(|b| b.0));
                set(&mut args.hostname, sub, "hostname", f.hostname.map(|h| Some(h.0)));
                set(&mut args.network, sub, "network", f.network.map(Int::get));
                set(&mut args.interface, sub, "interface", f.interface.map(|i| i.0));
                set(&mut args.listen_port, sub, "listen_port", f.listen_port.map(Int::get));
                set(&mut args.mtu, sub, "mtu", f.mtu.map(Int::get));
                set(&mut args.heartbeat_secs, sub, "heartbeat_secs", f.heartbeat_secs.map(Int::get));
                set(&mut args.capabilities, sub, "capabilities", f.capabilities.map(|t| t.0));
                set(&mut args.groups, sub, "groups", f.groups.map(|t| t.0));
                set(&mut args.dns_domain, sub, "dns_domain", f.dns_domain.map(|d| d.0));
                set(&mut args.dns_port, sub, "dns_port", f.dns_port.map(Int::get));
                set(&mut args.no_resolved, sub, "no_resolved", f.no_resolved);
                set(&mut args.cert, sub, "cert", f.cert.map(|p| Some(p.0)));
                set(&mut args.firewall_rules, sub, "firewall_rules", f.firewall_rules.map(|r| r.0));
                set(&mut args.firewall_default, sub, "firewall_default", f.firewall_default.map(|d| Some(d.0)));
                set(&mut args.key_rotation_days, sub, "key_rotation_days", f.key_rotation_days.map(Int::get));
                set(&mut args.metrics_listen, sub, "metrics_listen", f.metrics_listen.map(|m| Some(m.0)));
                set(&mut args.state.state_dir, sub, "state_dir", f.state_dir.map(|p| p.0));
                set(&mut args.socket.socket, sub, "socket", f.socket.map(|p| p.0));
                log_level = f.log_level.map(|l| l.0);
                log_format = f.log_format.map(|l| l.0);
            }
            if args.backbones.is_empty() {
                let where_ = file.as_deref().map_or(DEFAULT_NODE_FILE.into(), |p| p.display().to_string());
                return Err(CliError::new("config_error", "no backbone configured").hint(format!(
                    "pass --backbone HOST:PORT, or set backbones = [\"HOST:PORT\"] in {where_}"
                )));
            }
        }
        super::Command::Backbone(args) => {
            if let Some(path) = chosen_file(args.config.as_deref(), DEFAULT_BACKBONE_FILE) {
                let sub = matches.subcommand_matches("backbone").expect("clap parsed `backbone`");
                let f: BackboneFile = load(&path)?;
                set(&mut args.listen, sub, "listen", f.listen.map(|l| l.0));
                set(&mut args.record_ttl, sub, "record_ttl", f.record_ttl.map(Int::get));
                set(&mut args.socket, sub, "socket", f.socket.map(|p| p.0));
                set(&mut args.metrics_listen, sub, "metrics_listen", f.metrics_listen.map(|m| Some(m.0)));
                set(&mut args.network_owners, sub, "network_owners", f.network_owners.map(|o| o.0));
                set(&mut args.revocations, sub, "revocations", f.revocations.map(|p| p.0));
                set(&mut args.state_dir, sub, "state_dir", f.state_dir.map(|p| Some(p.0)));
                log_level = f.log_level.map(|l| l.0);
                log_format = f.log_format.map(|l| l.0);
            }
        }
        _ => {}
    }
    set(&mut cli.log_level, matches, "log_level", log_level);
    set(&mut cli.log_format, matches, "log_format", log_format);
    Ok(())
}

#[cfg(all(test, not(fuzzing)))]
mod tests {
    use super::*;

    const FILE: &str = "/etc/meshtun/meshtun.toml";

    fn node_error(text: &str) -> String {
        match parse::<NodeFile>(Path::new(FILE), text) {
            Ok(parsed) => panic!("expected an error for {text:?}, got {parsed:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn backbone_error(text: &str) -> String {
        match parse::<BackboneFile>(Path::new("/etc/meshtun/backbone.toml"), text) {
            Ok(parsed) => panic!("expected an error for {text:?}, got {parsed:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// Each bad config with the exact message the user sees after
    /// `meshtun: error: ` (or in `"message"` with `--json`).
    #[test]
    fn bad_node_configs_are_reported_with_file_line_and_what_was_expected() {
        let table: &[(&str, &str)] = &[
            (
                "backbones = [\"198.18.0.1:7400\"]\n\n# typo\nhostnme = \"a\"\n",
                "/etc/meshtun/meshtun.toml:4:1: unknown key `hostnme`; expected one of backbones, relays, hostname, network, \
                 interface, listen_port, mtu, heartbeat_secs, capabilities, groups, dns_domain, dns_port, no_resolved, cert, \
                 firewall_rules, firewall_default, key_rotation_days, metrics_listen, state_dir, socket, log_level, \
                 log_format",
            ),
            ("mtu = 70000\n", "/etc/meshtun/meshtun.toml:1:7: invalid value for `mtu`: 70000 is not in 1280..=9000"),
            ("mtu = 576\n", "/etc/meshtun/meshtun.toml:1:7: invalid value for `mtu`: 576 is not in 1280..=9000"),
            (
                "mtu = \"1500\"\n",
                "/etc/meshtun/meshtun.toml:1:7: invalid type for `mtu`: expected an integer in 1280..=9000, found string \"1500\"",
            ),
            (
                "heartbeat_secs = 0\n",
                "/etc/meshtun/meshtun.toml:1:18: invalid value for `heartbeat_secs`: 0 is not in 1..=3600",
            ),
            (
                "listen_port = -1\n",
                "/etc/meshtun/meshtun.toml:1:15: invalid value for `listen_port`: -1 is not in 0..=65535",
            ),
            (
                "network = 65535\n",
                "/etc/meshtun/meshtun.toml:1:11: invalid value for `network`: 65535 is not in 0..=65534",
            ),
            (
                "backbones = \"198.18.0.1:7400\"\n",
                "/etc/meshtun/meshtun.toml:1:13: invalid type for `backbones`: expected an array, found string \"198.18.0.1:7400\"",
            ),
            (
                "backbones = []\n",
                "/etc/meshtun/meshtun.toml:1:13: invalid value for `backbones`: the list is empty; give at least one \
                 \"HOST:PORT\", or leave the key out",
            ),
            (
                "backbones = [\"198.18.0.1:7400\", \"198.18.0.2\"]\n",
                "/etc/meshtun/meshtun.toml:1:33: invalid value for `backbones[1]`: \"198.18.0.2\" is not HOST:PORT \
                 (e.g. \"198.18.0.1:7400\" or \"backbone.example:7400\")",
            ),
            (
                "relays = [\"198.18.0.5\"]\n",
                "/etc/meshtun/meshtun.toml:1:11: invalid value for `relays[0]`: \"198.18.0.5\" is not HOST:PORT \
                 (e.g. \"198.18.0.1:7400\" or \"backbone.example:7400\")",
            ),
            (
                "relays = []\n",
                "/etc/meshtun/meshtun.toml:1:10: invalid value for `relays`: the list is empty; give at least one \
                 \"HOST:PORT\", or leave the key out",
            ),
            (
                "backbones = [7400]\n",
                "/etc/meshtun/meshtun.toml:1:14: invalid type for `backbones[0]`: expected a string, found integer `7400`",
            ),
            (
                "hostname = \"My_Agent\"\n",
                "/etc/meshtun/meshtun.toml:1:12: invalid value for `hostname`: hostname \"My_Agent\" may contain only a-z, 0-9 and '-'",
            ),
            (
                "interface = \"meshtun-interface-0\"\n",
                "/etc/meshtun/meshtun.toml:1:13: invalid value for `interface`: \"meshtun-interface-0\" is not an \
                 interface name (1 to 15 characters, no '/', ':' or spaces)",
            ),
            (
                "state_dir = \"var/lib/meshtun\"\n",
                "/etc/meshtun/meshtun.toml:1:13: invalid value for `state_dir`: \"var/lib/meshtun\" is not an absolute path",
            ),
            (
                "log_level = \"loud\"\n",
                "/etc/meshtun/meshtun.toml:1:13: invalid value for `log_level`: \"loud\" is not a log level; expected \
                 error, warn, info, debug, trace or a filter such as \"info,meshtun=debug\"",
            ),
            (
                "log_format = \"xml\"\n",
                "/etc/meshtun/meshtun.toml:1:14: invalid value for `log_format`: \"xml\" is not a log format; expected text or json",
            ),
            (
                "mtu = 1420\nmtu = 1500\n",
                "/etc/meshtun/meshtun.toml:2:1: invalid TOML: duplicate key `mtu`",
            ),
            ("mtu = \n", "/etc/meshtun/meshtun.toml:1:7: invalid TOML: missing value after `=`"),
            (
                "hostname = agent-1 # mine\n",
                "/etc/meshtun/meshtun.toml:1:12: invalid TOML: cannot read the value `agent-1`; write strings in quotes \
                 (hostname = \"agent-1\"), numbers without",
            ),
            (
                "mtu = 1420 1500\n",
                "/etc/meshtun/meshtun.toml:1:7: invalid TOML: cannot read the value `1420 1500`; write strings in quotes \
                 (hostname = \"agent-1\"), numbers without",
            ),
            ("mtu 1420\n", "/etc/meshtun/meshtun.toml:1:5: invalid TOML: key with no value, expected `=`"),
            (
                "backbones = [\"198.18.0.1:7400\"\n",
                "/etc/meshtun/meshtun.toml:1:31: invalid TOML: unclosed array, expected `]`",
            ),
            (
                "mtu = 1500.0\n",
                "/etc/meshtun/meshtun.toml:1:7: invalid type for `mtu`: expected an integer in 1280..=9000, found float `1500.0`",
            ),
            (
                "[mtu]\n",
                "/etc/meshtun/meshtun.toml:1:1: invalid type for `mtu`: expected an integer in 1280..=9000, found a table",
            ),
            (
                "capabilities = \"citations\"\n",
                "/etc/meshtun/meshtun.toml:1:16: invalid type for `capabilities`: expected an array, found string \"citations\"",
            ),
            (
                "capabilities = [\"citations\", \"Web_Search\"]\n",
                "/etc/meshtun/meshtun.toml:1:30: invalid value for `capabilities[1]`: \"Web_Search\" may contain only a-z, 0-9 and '-'",
            ),
            (
                "capabilities = [\"-gpu\"]\n",
                "/etc/meshtun/meshtun.toml:1:17: invalid value for `capabilities[0]`: \"-gpu\" must not start or end with '-'",
            ),
            (
                "groups = [\"\"]\n",
                "/etc/meshtun/meshtun.toml:1:11: invalid value for `groups[0]`: \"\" must be 1 to 63 characters",
            ),
            (
                "groups = [1]\n",
                "/etc/meshtun/meshtun.toml:1:11: invalid type for `groups[0]`: expected a string, found integer `1`",
            ),
            (
                "dns_domain = \"Mesh\"\n",
                "/etc/meshtun/meshtun.toml:1:14: invalid value for `dns_domain`: \"Mesh\" is not a DNS domain (labels of \
                 a-z, 0-9 and '-' separated by dots, e.g. \"mesh\")",
            ),
            (
                "dns_domain = \"mesh.\"\n",
                "/etc/meshtun/meshtun.toml:1:14: invalid value for `dns_domain`: \"mesh.\" is not a DNS domain (labels of \
                 a-z, 0-9 and '-' separated by dots, e.g. \"mesh\")",
            ),
            (
                "dns_port = 65536\n",
                "/etc/meshtun/meshtun.toml:1:12: invalid value for `dns_port`: 65536 is not in 0..=65535",
            ),
            (
                "dns_port = false\n",
                "/etc/meshtun/meshtun.toml:1:12: invalid type for `dns_port`: expected an integer in 0..=65535, found boolean `false`",
            ),
            (
                "cert = \"node.cert\"\n",
                "/etc/meshtun/meshtun.toml:1:8: invalid value for `cert`: \"node.cert\" is not an absolute path",
            ),
            (
                "firewall_rules = \"allow icmp\"\n",
                "/etc/meshtun/meshtun.toml:1:18: invalid type for `firewall_rules`: expected an array, found string \"allow icmp\"",
            ),
            (
                "firewall_rules = [\"allow icmp\", \"permit tcp/22\"]\n",
                "/etc/meshtun/meshtun.toml:1:33: invalid value for `firewall_rules[1]`: firewall rule \"permit tcp/22\": must \
                 start with `allow` or `deny`",
            ),
            (
                "firewall_rules = [\n  \"allow tcp/22 from group:ops\",\n  \"allow tcp/99999\",\n]\n",
                "/etc/meshtun/meshtun.toml:3:3: invalid value for `firewall_rules[1]`: firewall rule \"allow tcp/99999\": port \
                 must be a number 0-65535",
            ),
            (
                "firewall_rules = [\"allow icmp/8\"]\n",
                "/etc/meshtun/meshtun.toml:1:19: invalid value for `firewall_rules[0]`: firewall rule \"allow icmp/8\": ports \
                 only go with tcp or udp",
            ),
            (
                "firewall_default = \"block\"\n",
                "/etc/meshtun/meshtun.toml:1:20: invalid value for `firewall_default`: \"block\" is not a firewall policy; \
                 expected allow or deny",
            ),
            (
                "firewall_default = \"Deny\"\n",
                "/etc/meshtun/meshtun.toml:1:20: invalid value for `firewall_default`: \"Deny\" is not a firewall policy; \
                 expected allow or deny",
            ),
            (
                "key_rotation_days = -1\n",
                "/etc/meshtun/meshtun.toml:1:21: invalid value for `key_rotation_days`: -1 is not in 0..=3650",
            ),
            (
                "key_rotation_days = 36500\n",
                "/etc/meshtun/meshtun.toml:1:21: invalid value for `key_rotation_days`: 36500 is not in 0..=3650",
            ),
            (
                "metrics_listen = \"127.0.0.1\"\n",
                "/etc/meshtun/meshtun.toml:1:18: invalid value for `metrics_listen`: \"127.0.0.1\" is not IP:PORT \
                 (e.g. 127.0.0.1:9474 or [::1]:9474) or a port",
            ),
            (
                "metrics_listen = true\n",
                "/etc/meshtun/meshtun.toml:1:18: invalid type for `metrics_listen`: expected a string, found boolean `true`",
            ),
            (
                "[backbone]\nlisten = \"0.0.0.0:7400\"\n",
                "/etc/meshtun/meshtun.toml:1:2: unknown key `backbone`; expected one of backbones, relays, hostname, network, \
                 interface, listen_port, mtu, heartbeat_secs, capabilities, groups, dns_domain, dns_port, no_resolved, cert, \
                 firewall_rules, firewall_default, key_rotation_days, metrics_listen, state_dir, socket, log_level, \
                 log_format",
            ),
        ];
        let mut failures = Vec::new();
        for (text, expected) in table {
            let got = node_error(text);
            if got != *expected {
                failures.push(format!("config {text:?}\n  expected {expected}\n  got      {got}"));
            }
        }
        assert!(failures.is_empty(), "{} mismatch(es):\n{}", failures.len(), failures.join("\n"));
    }

    #[test]
    fn bad_backbone_configs_are_reported_with_file_line_and_what_was_expected() {
        let table: &[(&str, &str)] = &[
            (
                "listen = [\"0.0.0.0\"]\n",
                "/etc/meshtun/backbone.toml:1:11: invalid value for `listen[0]`: \"0.0.0.0\" is not IP:PORT \
                 (e.g. \"0.0.0.0:7400\" or \"[::]:7400\")",
            ),
            (
                "listen = \"0.0.0.0:7400\"\n",
                "/etc/meshtun/backbone.toml:1:10: invalid type for `listen`: expected an array, found string \"0.0.0.0:7400\"",
            ),
            (
                "record_ttl = 1\n",
                "/etc/meshtun/backbone.toml:1:14: invalid value for `record_ttl`: 1 is not in 2..=86400",
            ),
            (
                "hostname = \"b\"\n",
                "/etc/meshtun/backbone.toml:1:1: unknown key `hostname`; expected one of listen, record_ttl, socket, \
                 metrics_listen, network_owners, revocations, state_dir, log_level, log_format",
            ),
            (
                "metrics_listen = \"[::1]\"\n",
                "/etc/meshtun/backbone.toml:1:18: invalid value for `metrics_listen`: \"[::1]\" is not IP:PORT \
                 (e.g. 127.0.0.1:9474 or [::1]:9474) or a port",
            ),
            (
                "network_owners = \"7:00\"\n",
                "/etc/meshtun/backbone.toml:1:18: invalid type for `network_owners`: expected an array, found string \"7:00\"",
            ),
            (
                "network_owners = [\"7\"]\n",
                "/etc/meshtun/backbone.toml:1:19: invalid value for `network_owners[0]`: \"7\" is not NETWORK:OWNER-KEY \
                 (a network number in 0..=65534 and 64 hex digits, as printed by `meshtun network create`)",
            ),
            (
                "network_owners = [\"65535:0000000000000000000000000000000000000000000000000000000000000000\"]\n",
                "/etc/meshtun/backbone.toml:1:19: invalid value for `network_owners[0]`: \
                 \"65535:0000000000000000000000000000000000000000000000000000000000000000\" is not NETWORK:OWNER-KEY \
                 (a network number in 0..=65534 and 64 hex digits, as printed by `meshtun network create`)",
            ),
            (
                "network_owners = [\"7:abcd\"]\n",
                "/etc/meshtun/backbone.toml:1:19: invalid value for `network_owners[0]`: \"7:abcd\" is not NETWORK:OWNER-KEY \
                 (a network number in 0..=65534 and 64 hex digits, as printed by `meshtun network create`)",
            ),
            (
                "revocations = [\"/etc/meshtun/net7.revocations\", \"net8.revocations\"]\n",
                "/etc/meshtun/backbone.toml:1:49: invalid value for `revocations[1]`: \"net8.revocations\" is not an absolute path",
            ),
            (
                "revocations = \"/etc/meshtun/net7.revocations\"\n",
                "/etc/meshtun/backbone.toml:1:15: invalid type for `revocations`: expected an array, found string \
                 \"/etc/meshtun/net7.revocations\"",
            ),
        ];
        for (text, expected) in table {
            assert_eq!(backbone_error(text), *expected, "config {text:?}");
        }
    }

    #[test]
    fn a_missing_file_names_the_file() {
        let e = load::<NodeFile>(Path::new("/nonexistent/meshtun.toml")).unwrap_err();
        assert_eq!(e.to_string(), "/nonexistent/meshtun.toml: no such file");
        assert_eq!(CliError::from(e).code, "config_error");
    }

    #[test]
    fn an_empty_file_is_valid_and_sets_nothing() {
        let f: NodeFile = parse(Path::new(FILE), "# nothing\n").unwrap();
        assert!(f.backbones.is_none() && f.mtu.is_none() && f.log_level.is_none());
    }

    #[test]
    fn a_full_file_is_read() {
        let text = r#"
            backbones = ["198.18.0.1:7400", "[2001:db8::1]:7400", "backbone.example:7400"]
            hostname = "agent-7"
            network = 3
            interface = "mesh0"
            listen_port = 0
            mtu = 1280
            heartbeat_secs = 30
            state_dir = "/srv/meshtun"
            socket = "/run/meshtun/other.sock"
            log_level = "info,meshtun=debug"
        "#;
        let f: NodeFile = parse(Path::new(FILE), text).unwrap();
        assert_eq!(f.backbones.unwrap().0.len(), 3);
        assert_eq!(f.hostname.unwrap().0, "agent-7");
        assert_eq!(f.network.unwrap().get::<u16>(), 3);
        assert_eq!(f.mtu.unwrap().get::<u16>(), 1280);
        assert_eq!(f.heartbeat_secs.unwrap().get::<u64>(), 30);
        assert_eq!(f.state_dir.unwrap().0, PathBuf::from("/srv/meshtun"));
    }

    /// Parses `argv` (with `{FILE}` replaced by a temp file holding `text`)
    /// and applies the config file the way `main` does.
    fn applied(name: &str, argv: &[&str], text: &str) -> Result<super::super::Cli, CliError> {
        use clap::{CommandFactory, FromArgMatches};
        let path = std::env::temp_dir().join(format!("meshtun-config-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let path_text = path.display().to_string();
        let argv: Vec<&str> =
            std::iter::once("meshtun").chain(argv.iter().map(|a| if *a == "{FILE}" { path_text.as_str() } else { a })).collect();
        let matches = super::super::Cli::command().try_get_matches_from(argv).unwrap();
        let mut cli = super::super::Cli::from_arg_matches(&matches).unwrap();
        let result = apply(&mut cli, &matches);
        let _ = std::fs::remove_file(&path);
        result.map(|()| cli)
    }

    fn up(cli: &super::super::Cli) -> &super::super::UpArgs {
        match &cli.command {
            super::super::Command::Up(args) => args,
            other => panic!("not up: {other:?}"),
        }
    }

    #[test]
    fn relays_come_from_the_file_unless_relay_flags_replace_them() {
        let text = "backbones = [\"198.18.0.1:7400\"]\nrelays = [\"198.18.0.5:7400\", \"relay.example:7400\"]\n";
        let cli = applied("relays", &["up", "--config", "{FILE}"], text).unwrap();
        assert_eq!(up(&cli).relays, ["198.18.0.5:7400", "relay.example:7400"]);
        let cli = applied("relays-flag", &["up", "--config", "{FILE}", "--relay", "198.18.0.6:7400"], text).unwrap();
        assert_eq!(up(&cli).relays, ["198.18.0.6:7400"]);
        let cli = applied("relays-none", &["up", "--config", "{FILE}"], "backbones = [\"198.18.0.1:7400\"]\n").unwrap();
        assert!(up(&cli).relays.is_empty(), "no relay unless asked for");
    }

    #[test]
    fn the_file_overrides_defaults_and_flags_override_the_file() {
        let text = "backbones = [\"198.18.0.1:7400\", \"198.18.0.2:7400\"]\nmtu = 1400\nhostname = \"from-file\"\nlog_level = \"debug\"\n";
        let cli = applied("file", &["up", "--config", "{FILE}"], text).unwrap();
        let args = up(&cli);
        assert_eq!(args.backbones, ["198.18.0.1:7400", "198.18.0.2:7400"]);
        assert_eq!(args.mtu, 1400);
        assert_eq!(args.hostname.as_deref(), Some("from-file"));
        assert_eq!(args.listen_port, 51820, "keys the file leaves out keep the built-in default");
        assert_eq!(cli.log_level, "debug");

        let argv = ["up", "--config", "{FILE}", "--mtu", "1300", "--backbone", "198.18.0.9:7400", "--log-level", "warn"];
        let cli = applied("flags", &argv, text).unwrap();
        let args = up(&cli);
        assert_eq!(args.backbones, ["198.18.0.9:7400"], "--backbone replaces the file's list");
        assert_eq!(args.mtu, 1300);
        assert_eq!(args.hostname.as_deref(), Some("from-file"));
        assert_eq!(cli.log_level, "warn");
    }

    #[test]
    fn tags_dns_firewall_keys_and_metrics_reach_the_command_line() {
        let text = "backbones = [\"198.18.0.1:7400\"]\n\
                    capabilities = [\"citations\", \"web-search\"]\n\
                    groups = [\"ops\"]\n\
                    dns_domain = \"mesh.example\"\n\
                    dns_port = 0\n\
                    cert = \"/etc/meshtun/network.cert\"\n\
                    firewall_rules = [\"allow tcp/22 from group:ops\", \"deny udp/53\"]\n\
                    firewall_default = \"deny\"\n\
                    key_rotation_days = 0\n\
                    metrics_listen = \"[::1]:9474\"\n";
        let cli = applied("tags-file", &["up", "--config", "{FILE}"], text).unwrap();
        let args = up(&cli);
        assert_eq!(args.capabilities, ["citations", "web-search"]);
        assert_eq!(args.groups, ["ops"]);
        assert_eq!(args.dns_domain, "mesh.example");
        assert_eq!(args.dns_port, 0);
        assert_eq!(args.cert.as_deref(), Some(Path::new("/etc/meshtun/network.cert")));
        assert_eq!(args.firewall_rules, ["allow tcp/22 from group:ops", "deny udp/53"]);
        assert_eq!(args.firewall_default.as_deref(), Some("deny"));
        assert_eq!(args.key_rotation_days, 0);
        assert_eq!(args.metrics_listen, Some("[::1]:9474".parse().unwrap()));

        let argv = [
            "up", "--config", "{FILE}", "--capability", "gpu", "--group", "dev", "--group", "lab", "--dns-domain", "m",
            "--dns-port", "5353", "--cert", "/tmp/other.cert", "--firewall", "allow icmp", "--firewall-default", "allow",
            "--key-rotation-days", "7", "--metrics-listen",
        ];
        let cli = applied("tags-flags", &argv, text).unwrap();
        let args = up(&cli);
        assert_eq!(args.capabilities, ["gpu"], "--capability replaces the file's list");
        assert_eq!(args.groups, ["dev", "lab"]);
        assert_eq!(args.dns_domain, "m");
        assert_eq!(args.dns_port, 5353);
        assert_eq!(args.cert.as_deref(), Some(Path::new("/tmp/other.cert")));
        assert_eq!(args.firewall_rules, ["allow icmp"], "--firewall replaces the file's list");
        assert_eq!(args.firewall_default.as_deref(), Some("allow"));
        assert_eq!(args.key_rotation_days, 7);
        assert_eq!(args.metrics_listen, Some(crate::metrics::DEFAULT_NODE_LISTEN.parse().unwrap()), "a bare flag wins too");

        let cli = applied("tags-none", &["up", "--config", "{FILE}"], "backbones = [\"198.18.0.1:7400\"]\n").unwrap();
        let args = up(&cli);
        assert!(args.capabilities.is_empty() && args.firewall_rules.is_empty() && args.cert.is_none());
        assert_eq!((args.dns_domain.as_str(), args.dns_port, args.key_rotation_days), ("mesh", 53, 14));
        assert_eq!((args.firewall_default.as_deref(), args.metrics_listen), (None, None));
    }

    #[test]
    fn no_resolved_comes_from_the_file_or_the_flag_and_defaults_to_false() {
        let base = "backbones = [\"198.18.0.1:7400\"]\n";
        assert!(!up(&applied("resolved-default", &["up", "--config", "{FILE}"], base).unwrap()).no_resolved);
        let text = format!("{base}no_resolved = true\n");
        assert!(up(&applied("resolved-file", &["up", "--config", "{FILE}"], &text).unwrap()).no_resolved);
        assert!(up(&applied("resolved-flag", &["up", "--config", "{FILE}", "--no-resolved"], base).unwrap()).no_resolved);
        assert_eq!(
            node_error("no_resolved = \"yes\"\n"),
            "/etc/meshtun/meshtun.toml:1:15: invalid type for `no_resolved`: expected true or false, found string \"yes\""
        );
    }

    #[test]
    fn the_backbone_reads_network_owners_revocations_and_metrics_from_its_file() {
        let owner = format!("7:{}", "ab".repeat(32));
        let text = format!(
            "network_owners = [\"{owner}\"]\nrevocations = [\"/etc/meshtun/a.revocations\", \"/etc/meshtun/b.revocations\"]\n\
             metrics_listen = \"0.0.0.0:9475\"\n"
        );
        let cli = applied("owners-file", &["backbone", "--config", "{FILE}"], &text).unwrap();
        let super::super::Command::Backbone(args) = &cli.command else { panic!("not backbone") };
        assert_eq!(args.network_owners, [owner.clone()]);
        assert_eq!(args.revocations, [PathBuf::from("/etc/meshtun/a.revocations"), PathBuf::from("/etc/meshtun/b.revocations")]);
        assert_eq!(args.metrics_listen, Some("0.0.0.0:9475".parse().unwrap()));

        let other = format!("8:{}", "cd".repeat(32));
        let argv = ["backbone", "--config", "{FILE}", "--network-owner", &other, "--revocations", "/srv/c.revocations"];
        let cli = applied("owners-flags", &argv, &text).unwrap();
        let super::super::Command::Backbone(args) = &cli.command else { panic!("not backbone") };
        assert_eq!(args.network_owners, [other], "--network-owner replaces the file's list");
        assert_eq!(args.revocations, [PathBuf::from("/srv/c.revocations")], "--revocations replaces the file's list");
        assert_eq!(args.metrics_listen, Some("0.0.0.0:9475".parse().unwrap()));
    }

    #[test]
    fn the_backbone_reads_its_own_file() {
        let text = "listen = [\"127.0.0.1:7401\", \"127.0.0.1:7402\"]\nrecord_ttl = 30\nlog_format = \"json\"\n";
        let cli = applied("backbone", &["backbone", "--config", "{FILE}", "--record-ttl", "40"], text).unwrap();
        let super::super::Command::Backbone(args) = &cli.command else { panic!("not backbone") };
        assert_eq!(args.listen, ["127.0.0.1:7401".parse().unwrap(), "127.0.0.1:7402".parse().unwrap()]);
        assert_eq!(args.record_ttl, 40);
        assert_eq!(cli.log_format, super::super::LogFormat::Json);
    }

    #[test]
    fn up_without_any_backbone_or_with_a_bad_file_is_a_config_error() {
        let e = applied("none", &["up", "--config", "{FILE}"], "mtu = 1400\n").unwrap_err();
        assert_eq!((e.code, e.message.as_str()), ("config_error", "no backbone configured"));
        assert!(e.hint.unwrap().contains("--backbone HOST:PORT"));

        let e = applied("bad", &["up", "--config", "{FILE}", "--backbone", "198.18.0.1:7400"], "mtu = 1\n").unwrap_err();
        assert_eq!(e.code, "config_error");
        assert!(e.message.ends_with(".toml:1:7: invalid value for `mtu`: 1 is not in 1280..=9000"), "{}", e.message);

        let e = applied("missing", &["up", "--config", "/nonexistent/meshtun.toml"], "").unwrap_err();
        assert_eq!((e.code, e.message.as_str()), ("config_error", "/nonexistent/meshtun.toml: no such file"));
    }

    /// Strips `# ` from every commented-out `# key = value` line, so the
    /// documented example values are checked too.
    fn uncomment_examples(text: &str) -> String {
        text.lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if rest.split_once(" = ").is_some_and(|(k, _)| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')) => rest,
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn check_shipped_example<T: DeserializeOwned>(file: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        parse::<T>(&path, &text).unwrap_or_else(|e| panic!("the shipped file does not parse: {e}"));
        let uncommented = uncomment_examples(&text);
        parse::<T>(&path, &uncommented).unwrap_or_else(|e| panic!("the documented example values do not parse: {e}"));
        for key in field_names::<T>() {
            let documented = uncommented.lines().any(|l| l.split_once(" = ").is_some_and(|(k, _)| k == *key));
            assert!(documented, "{file} does not document `{key}` (as a `# {key} = ...` line)");
        }
    }

    #[test]
    fn the_shipped_node_config_is_valid_and_documents_every_key() {
        check_shipped_example::<NodeFile>("packaging/meshtun.toml");
    }

    #[test]
    fn the_shipped_backbone_config_is_valid_and_documents_every_key() {
        check_shipped_example::<BackboneFile>("packaging/backbone.toml");
    }
}

/// `IP:PORT`, `[IPv6]:PORT`, `localhost:PORT`, `:PORT` or just `PORT`
/// (the last three on 127.0.0.1).
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let port_text = text.strip_prefix("localhost:").or_else(|| text.strip_prefix(':')).unwrap_or(text);
    match port_text.parse::<u16>() {
        Ok(port) => Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)),
        Err(_) => Err(format!("{text:?} is not IP:PORT (e.g. 127.0.0.1:9474 or [::1]:9474) or a port")),
    }
}
