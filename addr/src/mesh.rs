//! Full mesh addresses (`N:XXXX.XXXX.XXXX`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{AddrError, NetworkId, NodeAddr, Reservation};

/// Full mesh address: network + node. Text form `N:XXXX.XXXX.XXXX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MeshAddr {
    /// Network number.
    pub network: NetworkId,
    /// Node within the network.
    pub node: NodeAddr,
}

impl MeshAddr {
    /// Any combination of network and node, reserved values included.
    pub fn new(network: NetworkId, node: NodeAddr) -> MeshAddr {
        MeshAddr { network, node }
    }

    /// A unicast address: Err(AddrError::Reserved(..)) if network or node is reserved
    /// (the network is checked first).
    pub fn unicast(network: NetworkId, node: NodeAddr) -> Result<MeshAddr, AddrError> {
        let addr = MeshAddr::new(network, node);
        if network.is_reserved() {
            Err(AddrError::Reserved(Reservation::Network(network)))
        } else if node == NodeAddr::UNSPECIFIED {
            Err(AddrError::Reserved(Reservation::Unspecified(addr)))
        } else if node == NodeAddr::BROADCAST {
            Err(AddrError::Reserved(Reservation::Broadcast(addr)))
        } else {
            Ok(addr)
        }
    }

    /// True if neither network nor node is reserved.
    pub fn is_unicast(&self) -> bool {
        !self.network.is_reserved() && !self.node.is_reserved()
    }
}

/// Network in decimal, node as three groups of four uppercase hex digits: `0:A91F.0000.7C2E`.
impl fmt::Display for MeshAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.network, self.node)
    }
}

/// Parses `N:XXXX.XXXX.XXXX`; hex digits in either case, no surrounding whitespace.
/// Reserved values are accepted; use [`MeshAddr::is_unicast`] to reject them.
impl FromStr for MeshAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (net, node) = s.split_once(':').ok_or_else(|| AddrError::MissingColon {
            input: s.to_owned(),
        })?;
        let invalid_net = || AddrError::InvalidNetwork {
            text: net.to_owned(),
        };
        // u16::from_str alone would accept a leading '+'.
        if net.is_empty() || !net.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid_net());
        }
        let network = NetworkId(net.parse().map_err(|_| invalid_net())?);
        let node = NodeAddr::parse_groups(node, s, true)?;
        Ok(MeshAddr { network, node })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(v: u64) -> NodeAddr {
        NodeAddr::new(v).unwrap()
    }

    fn any_mesh_addr() -> impl Strategy<Value = MeshAddr> {
        (any::<u16>(), 0..=NodeAddr::MAX).prop_map(|(n, v)| MeshAddr::new(NetworkId(n), node(v)))
    }

    #[test]
    fn display_is_decimal_network_and_uppercase_hex_groups() {
        let a = MeshAddr::new(NetworkId::PUBLIC, node(0xA91F_0000_7C2E));
        assert_eq!(a.to_string(), "0:A91F.0000.7C2E");
        let b = MeshAddr::new(NetworkId(65535), node(0xab));
        assert_eq!(b.to_string(), "65535:0000.0000.00AB");
    }

    #[test]
    fn parsing_accepts_the_canonical_form() {
        let a: MeshAddr = "0:A91F.0000.7C2E".parse().unwrap();
        assert_eq!(a, MeshAddr::new(NetworkId(0), node(0xA91F_0000_7C2E)));
        let b: MeshAddr = "42:0000.0000.0001".parse().unwrap();
        assert_eq!(b, MeshAddr::new(NetworkId(42), node(1)));
    }

    #[test]
    fn parsing_accepts_lowercase_and_displays_uppercase() {
        let a: MeshAddr = "7:a91f.beef.7c2e".parse().unwrap();
        assert_eq!(a.to_string(), "7:A91F.BEEF.7C2E");
    }

    #[test]
    fn parsing_accepts_reserved_values() {
        for text in [
            "0:0000.0000.0000",
            "0:FFFF.FFFF.FFFF",
            "65535:0000.0000.0001",
        ] {
            let a: MeshAddr = text.parse().unwrap();
            assert!(!a.is_unicast(), "{text}");
        }
    }

    #[test]
    fn parsing_rejects_a_missing_colon() {
        let err = "0A91F.0000.7C2E".parse::<MeshAddr>().unwrap_err();
        assert_eq!(
            err,
            AddrError::MissingColon {
                input: "0A91F.0000.7C2E".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "missing ':' between network number and node address in \"0A91F.0000.7C2E\""
        );
        assert!(matches!(
            "".parse::<MeshAddr>(),
            Err(AddrError::MissingColon { .. })
        ));
    }

    #[test]
    fn parsing_rejects_network_numbers_outside_u16() {
        let err = "70000:A91F.0000.7C2E".parse::<MeshAddr>().unwrap_err();
        assert_eq!(
            err,
            AddrError::InvalidNetwork {
                text: "70000".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "network number \"70000\" is not a number from 0 to 65535"
        );
    }

    #[test]
    fn parsing_rejects_empty_signed_negative_and_hex_network_numbers() {
        for net in ["", "+1", "-1", "0x1", "1 ", " 1", "٣"] {
            let text = format!("{net}:A91F.0000.7C2E");
            assert_eq!(
                text.parse::<MeshAddr>(),
                Err(AddrError::InvalidNetwork { text: net.into() }),
                "{text:?}"
            );
        }
    }

    #[test]
    fn parsing_rejects_too_few_or_too_many_groups() {
        let err = "0:A91F.0000".parse::<MeshAddr>().unwrap_err();
        assert_eq!(
            err,
            AddrError::MeshGroupCount {
                input: "0:A91F.0000".into(),
                found: 2
            }
        );
        assert_eq!(
            err.to_string(),
            "mesh address \"0:A91F.0000\" has 2 hex groups after the colon; expected 3 (N:XXXX.XXXX.XXXX)"
        );
        assert!(matches!(
            "0:A91F.0000.7C2E.0001".parse::<MeshAddr>(),
            Err(AddrError::MeshGroupCount { found: 4, .. })
        ));
    }

    #[test]
    fn parsing_rejects_a_non_hex_group() {
        let err = "0:A91F.00G0.7C2E".parse::<MeshAddr>().unwrap_err();
        assert_eq!(
            err,
            AddrError::InvalidHexGroup {
                index: 2,
                group: "00G0".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "hex group 2 \"00G0\" must be exactly four hex digits"
        );
    }

    #[test]
    fn parsing_rejects_five_hex_digit_groups() {
        assert!(matches!(
            "0:A91F.00000.7C2E".parse::<MeshAddr>(),
            Err(AddrError::InvalidHexGroup { index: 2, .. })
        ));
    }

    #[test]
    fn parsing_rejects_leading_and_trailing_whitespace() {
        assert_eq!(
            " 0:A91F.0000.7C2E".parse::<MeshAddr>(),
            Err(AddrError::InvalidNetwork { text: " 0".into() })
        );
        assert_eq!(
            "0:A91F.0000.7C2E ".parse::<MeshAddr>(),
            Err(AddrError::InvalidHexGroup {
                index: 3,
                group: "7C2E ".into()
            })
        );
        assert!("0:A91F.0000.7C2E\n".parse::<MeshAddr>().is_err());
        assert!("0: A91F.0000.7C2E".parse::<MeshAddr>().is_err());
    }

    #[test]
    fn parsing_rejects_a_second_colon() {
        assert!("0:1:A91F.0000.7C2E".parse::<MeshAddr>().is_err());
    }

    #[test]
    fn unicast_accepts_ordinary_addresses() {
        let a = MeshAddr::unicast(NetworkId(3), node(0x1234)).unwrap();
        assert!(a.is_unicast());
        assert_eq!(a, MeshAddr::new(NetworkId(3), node(0x1234)));
        assert!(MeshAddr::unicast(NetworkId(65534), node(NodeAddr::MAX - 1)).is_ok());
    }

    #[test]
    fn unicast_rejects_the_unspecified_node() {
        let err = MeshAddr::unicast(NetworkId::PUBLIC, NodeAddr::UNSPECIFIED).unwrap_err();
        let addr = MeshAddr::new(NetworkId::PUBLIC, NodeAddr::UNSPECIFIED);
        assert_eq!(err, AddrError::Reserved(Reservation::Unspecified(addr)));
        assert_eq!(
            err.to_string(),
            "0:0000.0000.0000 is reserved (unspecified node)"
        );
    }

    #[test]
    fn unicast_rejects_the_broadcast_node() {
        let err = MeshAddr::unicast(NetworkId(9), NodeAddr::BROADCAST).unwrap_err();
        let addr = MeshAddr::new(NetworkId(9), NodeAddr::BROADCAST);
        assert_eq!(err, AddrError::Reserved(Reservation::Broadcast(addr)));
        assert_eq!(err.to_string(), "9:FFFF.FFFF.FFFF is reserved (broadcast)");
    }

    #[test]
    fn unicast_rejects_the_reserved_network_before_checking_the_node() {
        let err = MeshAddr::unicast(NetworkId(65535), NodeAddr::UNSPECIFIED).unwrap_err();
        assert_eq!(
            err,
            AddrError::Reserved(Reservation::Network(NetworkId(65535)))
        );
        assert_eq!(err.to_string(), "network 65535 is reserved");
    }

    #[test]
    fn is_unicast_is_false_for_each_reserved_part() {
        assert!(!MeshAddr::new(NetworkId(65535), node(5)).is_unicast());
        assert!(!MeshAddr::new(NetworkId(5), NodeAddr::UNSPECIFIED).is_unicast());
        assert!(!MeshAddr::new(NetworkId(5), NodeAddr::BROADCAST).is_unicast());
    }

    #[test]
    fn serde_round_trips_through_json() {
        let a = MeshAddr::new(NetworkId(3), node(0xA91F_0000_7C2E));
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<MeshAddr>(&json).unwrap(), a);
    }

    proptest! {
        #[test]
        fn parsing_the_display_form_gives_back_the_same_address(a in any_mesh_addr()) {
            prop_assert_eq!(a.to_string().parse::<MeshAddr>(), Ok(a));
        }

        #[test]
        fn parsing_the_lowercased_display_form_gives_back_the_same_address(a in any_mesh_addr()) {
            prop_assert_eq!(a.to_string().to_lowercase().parse::<MeshAddr>(), Ok(a));
        }

        #[test]
        fn unicast_agrees_with_is_unicast(a in any_mesh_addr()) {
            prop_assert_eq!(MeshAddr::unicast(a.network, a.node).is_ok(), a.is_unicast());
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(s in "\\PC{0,24}") {
            let _ = s.parse::<MeshAddr>();
            let _ = s.parse::<NodeAddr>();
        }
    }
}
