//! Errors for parsing, constructing and mapping mesh addresses.

use std::fmt;
use std::net::Ipv6Addr;

use crate::{MeshAddr, NetworkId};

/// Everything that can be wrong with a mesh address, network number or node address.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AddrError {
    /// Text form of a mesh address has no `:` separator.
    #[error("missing ':' between network number and node address in {input:?}")]
    MissingColon {
        /// The whole text that was being parsed.
        input: String,
    },

    /// The part before the `:` is not a decimal number in `0..=65535`.
    #[error("network number {text:?} is not a number from 0 to 65535")]
    InvalidNetwork {
        /// The offending network-number text.
        text: String,
    },

    /// Mesh address text has the wrong number of `.`-separated hex groups after the colon.
    #[error("mesh address {input:?} has {found} hex groups after the colon; expected 3 (N:XXXX.XXXX.XXXX)")]
    MeshGroupCount {
        /// The whole text that was being parsed.
        input: String,
        /// How many groups were found.
        found: usize,
    },

    /// Node address text has the wrong number of `.`-separated hex groups.
    #[error("node address {input:?} has {found} hex groups; expected 3 (XXXX.XXXX.XXXX)")]
    NodeGroupCount {
        /// The whole text that was being parsed.
        input: String,
        /// How many groups were found.
        found: usize,
    },

    /// One hex group is not exactly four hex digits.
    #[error("hex group {index} {group:?} must be exactly four hex digits")]
    InvalidHexGroup {
        /// 1-based position of the group.
        index: usize,
        /// The offending group text.
        group: String,
    },

    /// A numeric node address has bits set above bit 47.
    #[error("node address 0x{value:X} does not fit in 48 bits")]
    NodeOutOfRange {
        /// The rejected value.
        value: u64,
    },

    /// The network or node part is reserved, so the address cannot be a unicast address.
    #[error("{0}")]
    Reserved(Reservation),

    /// The IPv6 address is not inside [`crate::MESH_PREFIX`].
    #[error("{ip} is not inside the mesh prefix fd4d:6573:6874::/48")]
    OutsideMeshPrefix {
        /// The rejected address.
        ip: Ipv6Addr,
    },

    /// The IPv6 address is in the mesh prefix but its interface id has a nonzero upper 16 bits.
    #[error("{ip} interface id does not map to a mesh node (upper 16 bits must be zero)")]
    UnmappedInterfaceId {
        /// The rejected address.
        ip: Ipv6Addr,
    },
}

/// Which reserved value made an address unusable as unicast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// The network number is reserved (65535).
    Network(NetworkId),
    /// The node part is all zeros.
    Unspecified(MeshAddr),
    /// The node part is all ones.
    Broadcast(MeshAddr),
}

impl fmt::Display for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reservation::Network(n) => write!(f, "network {n} is reserved"),
            Reservation::Unspecified(a) => write!(f, "{a} is reserved (unspecified node)"),
            Reservation::Broadcast(a) => write!(f, "{a} is reserved (broadcast)"),
        }
    }
}
