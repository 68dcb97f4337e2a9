//! Helpers shared by the fuzz targets: fixed identities (the proof-of-work
//! nonce is precomputed, finding one takes seconds), structure-aware input
//! builders that sign what the fuzzer chose so it reaches the code behind
//! signature checks, and an allocation meter.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use meshtun_addr::{NetworkId, NodeAddr};
use meshtun_proto::cert::{NetworkOwner, SignedCert};
use meshtun_proto::{Identity, NodeRecord, SignedRecord};

/// (secret, proof-of-work nonce) pairs, found once with `Identity::generate`.
/// Ten of them, so a directory can hold more records for one query than fit
/// in one reply datagram.
pub const IDENTITY_PARTS: [([u8; 32], u64); 10] = [
    ([0x11; 32], 40015),
    ([0x12; 32], 1315079),
    ([0x13; 32], 68053),
    ([0x14; 32], 742261),
    ([0x15; 32], 3781837),
    ([0x16; 32], 1960299),
    ([0x17; 32], 1744633),
    ([0x18; 32], 596783),
    ([0x19; 32], 4143330),
    ([0x1a; 32], 2464633),
];

/// The record signing context of `meshtun_proto::record` (part of the wire
/// protocol). [`identities`] checks it still matches `SignedRecord::sign`.
const RECORD_SIGNING_CONTEXT: &[u8] = b"meshtun record v1\0";

/// The fixed identities, built once per process.
pub fn identities() -> &'static [Identity] {
    static IDS: OnceLock<Vec<Identity>> = OnceLock::new();
    IDS.get_or_init(|| {
        let ids: Vec<Identity> = IDENTITY_PARTS
            .iter()
            .map(|(secret, nonce)| Identity::from_parts(*secret, *nonce).expect("precomputed nonce"))
            .collect();
        // Hand signing (used to get invalid fields past the signer) must
        // stay byte-identical to the real signer.
        let record = plain_record(&ids[0], 1);
        let real = SignedRecord::sign(&ids[0], &record).expect("valid record");
        assert_eq!(sign_unchecked(&ids[0], &record), real, "RECORD_SIGNING_CONTEXT drifted");
        ids
    })
}

pub fn identity(index: u8) -> &'static Identity {
    let ids = identities();
    &ids[usize::from(index) % ids.len()]
}

/// The WireGuard secret of fixed peer `index` (peer `index` uses identity `index`).
pub fn wg_secret(index: u8) -> [u8; 32] {
    [0x40 + index % IDENTITY_PARTS.len() as u8; 32]
}

pub fn wg_public(index: u8) -> [u8; 32] {
    boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(wg_secret(index))).to_bytes()
}

/// A valid record for `identity`.
pub fn plain_record(identity: &Identity, seq: u64) -> NodeRecord {
    NodeRecord {
        network: NetworkId::PUBLIC,
        node: identity.node_addr(),
        identity_key: identity.public_key(),
        pow_nonce: identity.nonce(),
        wg_key: [9; 32],
        endpoints: vec!["198.18.0.2:51820".parse().expect("literal")],
        hostname: Some("alpha".into()),
        capabilities: vec!["gpu".into()],
        groups: vec!["ops".into()],
        seq,
        wg_key_version: 1,
        wg_key_expires_unix: meshtun_proto::record::NO_EXPIRY,
        cert: None,
    }
}

/// Signs `record` with `identity` without `SignedRecord::sign`'s field
/// checks, so receivers see records with bad fields but good signatures.
pub fn sign_unchecked(identity: &Identity, record: &NodeRecord) -> SignedRecord {
    let body = meshtun_proto::record::encode_body(record);
    sign_body(identity, body)
}

/// Signs arbitrary body bytes as a record body.
pub fn sign_body(identity: &Identity, body: Vec<u8>) -> SignedRecord {
    let input = [RECORD_SIGNING_CONTEXT, &body].concat();
    SignedRecord { body, signature: identity.sign(&input).to_vec() }
}

/// A small pool of addresses, so the fuzzer hits the same ones repeatedly.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    Pool(u8),
    V4([u8; 4], u16),
    V6([u8; 16], u16),
}

impl Addr {
    pub fn get(self) -> SocketAddr {
        match self {
            Addr::Pool(i) => pool_addr(i),
            Addr::V4(ip, port) => SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port),
            Addr::V6(ip, port) => SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port),
        }
    }
}

/// Address `i` of the pool: 198.18.0.{1..11}:51820 and one IPv6.
pub fn pool_addr(i: u8) -> SocketAddr {
    match i % 12 {
        11 => "[2001:db8::4]:51820".parse().expect("literal"),
        n => SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, n + 1)), 51820),
    }
}

/// The fields of a record the fuzzer chooses; identity fields come from a
/// fixed identity unless overridden.
#[derive(Arbitrary, Debug, Clone)]
pub struct RecordSpec {
    pub identity: u8,
    pub network: u8,
    pub wrong_node: Option<[u8; 6]>,
    pub wrong_nonce: Option<u64>,
    /// `None`: the peer's real WireGuard key.
    pub wg_key: Option<[u8; 32]>,
    pub endpoints: Vec<Addr>,
    pub hostname: Option<Label>,
    pub capabilities: Vec<Label>,
    pub groups: Vec<Label>,
    pub seq: u64,
    pub wg_key_version: u32,
    /// `None`: never expires.
    pub wg_key_expires_unix: Option<u64>,
    pub cert: Option<CertSpec>,
}

/// Network `i` of a small pool: public, the private [`OWNER_NETWORK`], a
/// private network nobody has the owner key of, and the reserved one.
pub fn network(i: u8) -> NetworkId {
    NetworkId([0, OWNER_NETWORK.0, 1, 65535][usize::from(i % 4)])
}

/// The owner of private network [`OWNER_NETWORK`] in the fuzz targets.
pub const OWNER_SECRET: [u8; 32] = [5; 32];
pub const OWNER_NETWORK: NetworkId = NetworkId(7);

/// A membership certificate inside a record.
#[derive(Arbitrary, Debug, Clone)]
pub enum CertSpec {
    /// Signed by the fixed owner for the record's own node.
    Owner { groups: Vec<Label>, not_after_unix: u64, serial: u64 },
    Raw { body: Vec<u8>, signature: Vec<u8> },
}

pub fn owner() -> NetworkOwner {
    NetworkOwner::generate(OWNER_NETWORK, OWNER_SECRET)
}

impl CertSpec {
    pub fn cert(&self, member: NodeAddr) -> SignedCert {
        match self {
            CertSpec::Owner { groups, not_after_unix, serial } => {
                owner().sign_membership(member, groups.iter().take(40).map(Label::get).collect(), *not_after_unix, *serial)
            }
            CertSpec::Raw { body, signature } => SignedCert { body: body.clone(), signature: signature.clone() },
        }
    }
}

/// A label: mostly from a small valid set, sometimes arbitrary text, or
/// one of the longest valid labels (so records reach their size limits
/// from little input).
#[derive(Arbitrary, Debug, Clone)]
pub enum Label {
    Known(u8),
    Text(String),
    Long(u8),
}

impl Label {
    pub fn get(&self) -> String {
        const KNOWN: [&str; 6] = ["alpha", "beta", "gpu", "ops", "research", "a-1"];
        match self {
            Label::Known(i) => KNOWN[usize::from(*i) % KNOWN.len()].to_string(),
            Label::Text(s) => s.clone(),
            Label::Long(i) => char::from(b'a' + i % 26).to_string().repeat(meshtun_proto::record::MAX_TAG_LEN),
        }
    }
}

impl RecordSpec {
    pub fn record(&self) -> NodeRecord {
        let id = identity(self.identity);
        let wg_key = self.wg_key.unwrap_or_else(|| wg_public(self.identity));
        NodeRecord {
            network: network(self.network),
            node: self.wrong_node.map(NodeAddr::from_bytes).unwrap_or(id.node_addr()),
            identity_key: id.public_key(),
            pow_nonce: self.wrong_nonce.unwrap_or(id.nonce()),
            wg_key,
            endpoints: self.endpoints.iter().take(20).map(|a| a.get()).collect(),
            hostname: self.hostname.as_ref().map(Label::get),
            capabilities: self.capabilities.iter().take(40).map(Label::get).collect(),
            groups: self.groups.iter().take(40).map(Label::get).collect(),
            seq: self.seq,
            wg_key_version: self.wg_key_version,
            wg_key_expires_unix: self.wg_key_expires_unix.unwrap_or(meshtun_proto::record::NO_EXPIRY),
            cert: self.cert.as_ref().map(|c| c.cert(id.node_addr())),
        }
    }

    pub fn signed(&self) -> SignedRecord {
        sign_unchecked(identity(self.identity), &self.record())
    }
}

/// A global allocator that records the largest single allocation, so a
/// target can check that decoding a datagram allocates in proportion to
/// its size. Install with `#[global_allocator]` in the target.
pub struct MeteredAlloc;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for MeteredAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` and returns its result with the largest single allocation made
/// meanwhile (only meaningful with [`MeteredAlloc`] installed).
pub fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.store(0, Ordering::Relaxed);
    let out = f();
    (out, LARGEST.load(Ordering::Relaxed))
}
