//! Network numbers and 48-bit node addresses.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::AddrError;

/// 16-bit network number. 0 = the public mesh. 65535 is reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetworkId(pub u16);

impl NetworkId {
    /// The public mesh.
    pub const PUBLIC: NetworkId = NetworkId(0);

    /// The reserved network number.
    const RESERVED: NetworkId = NetworkId(u16::MAX);

    /// True for the reserved network number 65535.
    pub fn is_reserved(self) -> bool {
        self == Self::RESERVED
    }
}

/// Decimal, e.g. `0`.
impl fmt::Display for NetworkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// 48-bit node address. 0 and 0xFFFF_FFFF_FFFF (broadcast) are reserved as unicast addresses.
///
/// Serialised as a plain integer; deserialising a value wider than 48 bits fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct NodeAddr(u64);

impl NodeAddr {
    /// Width of a node address in bits.
    pub const BITS: u32 = 48;
    /// Largest node address value.
    pub const MAX: u64 = 0xFFFF_FFFF_FFFF;
    /// All ones: every node.
    pub const BROADCAST: NodeAddr = NodeAddr(Self::MAX);
    /// All zeros: no particular node.
    pub const UNSPECIFIED: NodeAddr = NodeAddr(0);

    /// Node address from its numeric value; fails if `v` does not fit in 48 bits.
    pub fn new(v: u64) -> Result<NodeAddr, AddrError> {
        if v > Self::MAX {
            Err(AddrError::NodeOutOfRange { value: v })
        } else {
            Ok(NodeAddr(v))
        }
    }

    /// Node address from six big-endian bytes.
    pub fn from_bytes(b: [u8; 6]) -> NodeAddr {
        let [a, b1, c, d, e, f] = b;
        NodeAddr(u64::from_be_bytes([0, 0, a, b1, c, d, e, f]))
    }

    /// The six big-endian bytes of this address.
    pub fn to_bytes(self) -> [u8; 6] {
        let [_, _, a, b, c, d, e, f] = self.0.to_be_bytes();
        [a, b, c, d, e, f]
    }

    /// Numeric value, always `<= NodeAddr::MAX`.
    pub fn to_u64(self) -> u64 {
        self.0
    }

    /// True for [`NodeAddr::UNSPECIFIED`] and [`NodeAddr::BROADCAST`].
    pub fn is_reserved(self) -> bool {
        self == Self::UNSPECIFIED || self == Self::BROADCAST
    }

    /// Parses `XXXX.XXXX.XXXX`; `whole` is the full text being parsed, for error messages,
    /// and `in_mesh` selects which group-count error to report.
    pub(crate) fn parse_groups(
        node: &str,
        whole: &str,
        in_mesh: bool,
    ) -> Result<NodeAddr, AddrError> {
        let found = node.split('.').count();
        if found != 3 {
            return Err(if in_mesh {
                AddrError::MeshGroupCount {
                    input: whole.to_owned(),
                    found,
                }
            } else {
                AddrError::NodeGroupCount {
                    input: whole.to_owned(),
                    found,
                }
            });
        }
        let mut value = 0u64;
        for (i, group) in node.split('.').enumerate() {
            let invalid = || AddrError::InvalidHexGroup {
                index: i + 1,
                group: group.to_owned(),
            };
            // from_str_radix alone would accept a leading '+'.
            if group.len() != 4 || !group.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid());
            }
            let g = u16::from_str_radix(group, 16).map_err(|_| invalid())?;
            value = (value << 16) | u64::from(g);
        }
        Ok(NodeAddr(value))
    }
}

impl TryFrom<u64> for NodeAddr {
    type Error = AddrError;

    fn try_from(v: u64) -> Result<Self, Self::Error> {
        NodeAddr::new(v)
    }
}

impl From<NodeAddr> for u64 {
    fn from(a: NodeAddr) -> u64 {
        a.0
    }
}

/// Three groups of exactly four uppercase hex digits, e.g. `A91F.0000.7C2E`.
impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        write!(
            f,
            "{:04X}.{:04X}.{:04X}",
            (v >> 32) & 0xFFFF,
            (v >> 16) & 0xFFFF,
            v & 0xFFFF
        )
    }
}

/// Parses `XXXX.XXXX.XXXX`, hex digits in either case. Reserved values are accepted.
impl FromStr for NodeAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeAddr::parse_groups(s, s, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_65535_is_the_only_reserved_network() {
        assert!(NetworkId(65535).is_reserved());
        assert!(!NetworkId::PUBLIC.is_reserved());
        assert!(!NetworkId(65534).is_reserved());
    }

    #[test]
    fn new_accepts_the_full_48_bit_range() {
        assert_eq!(NodeAddr::new(0).unwrap(), NodeAddr::UNSPECIFIED);
        assert_eq!(NodeAddr::new(NodeAddr::MAX).unwrap(), NodeAddr::BROADCAST);
        assert_eq!(NodeAddr::new(0x1234).unwrap().to_u64(), 0x1234);
    }

    #[test]
    fn new_rejects_values_wider_than_48_bits() {
        let err = NodeAddr::new(0x1_0000_0000_0000).unwrap_err();
        assert_eq!(
            err,
            AddrError::NodeOutOfRange {
                value: 0x1_0000_0000_0000
            }
        );
        assert_eq!(
            err.to_string(),
            "node address 0x1000000000000 does not fit in 48 bits"
        );
        assert!(NodeAddr::new(u64::MAX).is_err());
    }

    #[test]
    fn bytes_are_big_endian_and_round_trip() {
        let a = NodeAddr::from_bytes([0xA9, 0x1F, 0x00, 0x00, 0x7C, 0x2E]);
        assert_eq!(a.to_u64(), 0xA91F_0000_7C2E);
        assert_eq!(a.to_bytes(), [0xA9, 0x1F, 0x00, 0x00, 0x7C, 0x2E]);
    }

    #[test]
    fn only_zero_and_broadcast_nodes_are_reserved() {
        assert!(NodeAddr::UNSPECIFIED.is_reserved());
        assert!(NodeAddr::BROADCAST.is_reserved());
        assert!(!NodeAddr::new(1).unwrap().is_reserved());
        assert!(!NodeAddr::new(NodeAddr::MAX - 1).unwrap().is_reserved());
    }

    #[test]
    fn display_pads_to_three_uppercase_groups() {
        assert_eq!(
            NodeAddr::new(0xA91F_0000_7C2E).unwrap().to_string(),
            "A91F.0000.7C2E"
        );
        assert_eq!(NodeAddr::new(1).unwrap().to_string(), "0000.0000.0001");
    }

    #[test]
    fn parsing_accepts_lowercase_and_reserved_values() {
        assert_eq!(
            "a91f.0000.7c2e".parse::<NodeAddr>().unwrap().to_u64(),
            0xA91F_0000_7C2E
        );
        assert_eq!(
            "ffff.FFFF.ffff".parse::<NodeAddr>().unwrap(),
            NodeAddr::BROADCAST
        );
        assert_eq!(
            "0000.0000.0000".parse::<NodeAddr>().unwrap(),
            NodeAddr::UNSPECIFIED
        );
    }

    #[test]
    fn parsing_rejects_the_wrong_number_of_groups() {
        let err = "A91F.0000".parse::<NodeAddr>().unwrap_err();
        assert_eq!(
            err,
            AddrError::NodeGroupCount {
                input: "A91F.0000".into(),
                found: 2
            }
        );
        assert_eq!(
            err.to_string(),
            "node address \"A91F.0000\" has 2 hex groups; expected 3 (XXXX.XXXX.XXXX)"
        );
        assert!(matches!(
            "A91F.0000.7C2E.0000".parse::<NodeAddr>(),
            Err(AddrError::NodeGroupCount { found: 4, .. })
        ));
        assert!(matches!(
            "".parse::<NodeAddr>(),
            Err(AddrError::NodeGroupCount { found: 1, .. })
        ));
    }

    #[test]
    fn parsing_rejects_five_hex_digit_groups() {
        assert_eq!(
            "A91F0.0000.7C2E".parse::<NodeAddr>(),
            Err(AddrError::InvalidHexGroup {
                index: 1,
                group: "A91F0".into()
            })
        );
    }

    #[test]
    fn parsing_rejects_short_empty_signed_and_non_hex_groups() {
        for (text, index, group) in [
            ("A91F.000.7C2E", 2, "000"),
            ("A91F..7C2E", 2, ""),
            ("A91F.0000.+C2E", 3, "+C2E"),
            ("A91F.00G0.7C2E", 2, "00G0"),
            ("A91F.0000.7C2É", 3, "7C2É"),
        ] {
            assert_eq!(
                text.parse::<NodeAddr>(),
                Err(AddrError::InvalidHexGroup {
                    index,
                    group: group.into()
                }),
                "{text}"
            );
        }
    }

    #[test]
    fn parsing_rejects_surrounding_whitespace() {
        assert!(" A91F.0000.7C2E".parse::<NodeAddr>().is_err());
        assert!("A91F.0000.7C2E\n".parse::<NodeAddr>().is_err());
    }

    #[test]
    fn serde_uses_the_integer_and_rejects_values_wider_than_48_bits() {
        let a = NodeAddr::new(0xA91F_0000_7C2E).unwrap();
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, "185950609112110");
        assert_eq!(serde_json::from_str::<NodeAddr>(&json).unwrap(), a);
        assert!(serde_json::from_str::<NodeAddr>("281474976710656").is_err());
    }
}
