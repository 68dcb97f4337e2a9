//! Mapping between mesh addresses and IPv6 addresses inside [`MESH_PREFIX`].

use std::net::Ipv6Addr;

use crate::{AddrError, MeshAddr, NetworkId, NodeAddr};

/// The ULA /48 that holds every meshtun network: fd4d:6573:6874::/48 ("Mesht" in ASCII as the 40-bit global ID).
pub const MESH_PREFIX: Ipv6Addr = Ipv6Addr::new(0xfd4d, 0x6573, 0x6874, 0, 0, 0, 0, 0);

/// Prefix length of [`MESH_PREFIX`].
pub const MESH_PREFIX_LEN: u8 = 48;

/// Each network is a /64: fd4d:6573:6874:NNNN::/64 where NNNN is the network number (16-bit subnet id).
pub const NETWORK_PREFIX_LEN: u8 = 64;

const PREFIX_SEGMENTS: [u16; 3] = [0xfd4d, 0x6573, 0x6874];

/// The /64 prefix of `network`: fd4d:6573:6874:NNNN::.
pub fn network_prefix(network: NetworkId) -> Ipv6Addr {
    let [a, b, c] = PREFIX_SEGMENTS;
    Ipv6Addr::new(a, b, c, network.0, 0, 0, 0, 0)
}

impl MeshAddr {
    /// The /128 fd4d:6573:6874:NNNN:0000:XXXX:XXXX:XXXX for this address.
    pub fn to_ipv6(&self) -> Ipv6Addr {
        let [a, b, c] = PREFIX_SEGMENTS;
        let [x0, x1, y0, y1, z0, z1] = self.node.to_bytes();
        let (x, y, z) = (
            u16::from_be_bytes([x0, x1]),
            u16::from_be_bytes([y0, y1]),
            u16::from_be_bytes([z0, z1]),
        );
        Ipv6Addr::new(a, b, c, self.network.0, 0, x, y, z)
    }

    /// Inverse of [`MeshAddr::to_ipv6`]. Fails if `ip` is outside [`MESH_PREFIX`] or the upper
    /// 16 bits of its interface id are nonzero. Reserved values are accepted.
    pub fn from_ipv6(ip: Ipv6Addr) -> Result<MeshAddr, AddrError> {
        let [a, b, c, network, iid_top, x, y, z] = ip.segments();
        if [a, b, c] != PREFIX_SEGMENTS {
            return Err(AddrError::OutsideMeshPrefix { ip });
        }
        if iid_top != 0 {
            return Err(AddrError::UnmappedInterfaceId { ip });
        }
        let ([x0, x1], [y0, y1], [z0, z1]) = (x.to_be_bytes(), y.to_be_bytes(), z.to_be_bytes());
        let node = NodeAddr::from_bytes([x0, x1, y0, y1, z0, z1]);
        Ok(MeshAddr::new(NetworkId(network), node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_mesh_addr() -> impl Strategy<Value = MeshAddr> {
        (any::<u16>(), 0..=NodeAddr::MAX)
            .prop_map(|(n, v)| MeshAddr::new(NetworkId(n), NodeAddr::new(v).unwrap()))
    }

    #[test]
    fn mesh_prefix_spells_mesht_in_its_global_id() {
        assert_eq!(MESH_PREFIX.to_string(), "fd4d:6573:6874::");
        assert_eq!(&MESH_PREFIX.octets()[1..6], b"Mesht");
        assert_eq!(MESH_PREFIX.octets()[0], 0xfd);
    }

    #[test]
    fn network_prefix_puts_the_network_number_in_the_subnet_id() {
        assert_eq!(network_prefix(NetworkId::PUBLIC), MESH_PREFIX);
        assert_eq!(
            network_prefix(NetworkId(0x1234)).to_string(),
            "fd4d:6573:6874:1234::"
        );
    }

    #[test]
    fn to_ipv6_places_the_node_in_the_low_48_bits() {
        let a: MeshAddr = "0:A91F.0000.7C2E".parse().unwrap();
        assert_eq!(
            a.to_ipv6(),
            "fd4d:6573:6874:0:0:a91f:0:7c2e"
                .parse::<Ipv6Addr>()
                .unwrap()
        );
        assert_eq!(a.to_ipv6().to_string(), "fd4d:6573:6874::a91f:0:7c2e");
        let b: MeshAddr = "258:0001.0002.0003".parse().unwrap();
        assert_eq!(
            b.to_ipv6(),
            "fd4d:6573:6874:102::1:2:3".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn from_ipv6_rejects_addresses_outside_the_mesh_prefix() {
        let ip: Ipv6Addr = "fd00::1".parse().unwrap();
        let err = MeshAddr::from_ipv6(ip).unwrap_err();
        assert_eq!(err, AddrError::OutsideMeshPrefix { ip });
        assert_eq!(
            err.to_string(),
            "fd00::1 is not inside the mesh prefix fd4d:6573:6874::/48"
        );
        for text in [
            "::",
            "fd4d:6573:6875::1",
            "fc4d:6573:6874::1",
            "2001:db8::1",
        ] {
            let ip: Ipv6Addr = text.parse().unwrap();
            assert_eq!(
                MeshAddr::from_ipv6(ip),
                Err(AddrError::OutsideMeshPrefix { ip })
            );
        }
    }

    #[test]
    fn from_ipv6_rejects_nonzero_upper_interface_id_bits() {
        let ip: Ipv6Addr = "fd4d:6573:6874:0:1::1".parse().unwrap();
        let err = MeshAddr::from_ipv6(ip).unwrap_err();
        assert_eq!(err, AddrError::UnmappedInterfaceId { ip });
        assert_eq!(
            err.to_string(),
            "fd4d:6573:6874:0:1::1 interface id does not map to a mesh node (upper 16 bits must be zero)"
        );
        let ip: Ipv6Addr = "fd4d:6573:6874:7:8000::".parse().unwrap();
        assert_eq!(
            MeshAddr::from_ipv6(ip),
            Err(AddrError::UnmappedInterfaceId { ip })
        );
    }

    #[test]
    fn from_ipv6_accepts_reserved_values() {
        let ip: Ipv6Addr = "fd4d:6573:6874:ffff:0:ffff:ffff:ffff".parse().unwrap();
        let a = MeshAddr::from_ipv6(ip).unwrap();
        assert_eq!(a, MeshAddr::new(NetworkId(65535), NodeAddr::BROADCAST));
    }

    proptest! {
        #[test]
        fn from_ipv6_inverts_to_ipv6(a in any_mesh_addr()) {
            prop_assert_eq!(MeshAddr::from_ipv6(a.to_ipv6()), Ok(a));
        }

        #[test]
        fn to_ipv6_stays_inside_the_network_prefix(a in any_mesh_addr()) {
            let ip = u128::from(a.to_ipv6());
            let net = u128::from(network_prefix(a.network));
            prop_assert_eq!(ip >> (128 - u32::from(NETWORK_PREFIX_LEN)), net >> 64);
            prop_assert_eq!(ip >> (128 - u32::from(MESH_PREFIX_LEN)), u128::from(MESH_PREFIX) >> 80);
        }

        #[test]
        fn from_ipv6_accepts_exactly_the_addresses_with_prefix_and_zero_iid_top(bits in any::<u128>()) {
            let ip = Ipv6Addr::from(bits);
            let in_prefix = bits >> 80 == u128::from(MESH_PREFIX) >> 80;
            let top_zero = (bits >> 48) & 0xFFFF == 0;
            let result = MeshAddr::from_ipv6(ip);
            prop_assert_eq!(result.is_ok(), in_prefix && top_zero);
            if let Ok(a) = result {
                prop_assert_eq!(a.to_ipv6(), ip);
            }
        }
    }
}
