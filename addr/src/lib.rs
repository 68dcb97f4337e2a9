//! meshtun mesh addresses.
//!
//! A mesh address is a 16-bit [`NetworkId`] plus a 48-bit [`NodeAddr`], written
//! `N:XXXX.XXXX.XXXX` (network in decimal, node as three groups of four hex digits), e.g.
//! `0:A91F.0000.7C2E`. Node addresses are derived from identity keys by proof of work
//! (see [`derive_node_addr`] and [`find_nonce`]).
//!
//! # IPv6 mapping
//!
//! Every mesh address maps one-to-one onto an IPv6 address inside a ULA prefix whose 40-bit
//! global ID is "Mesht" in ASCII:
//!
//! | Scope        | IPv6                                        | Length | Meaning                                   |
//! |--------------|---------------------------------------------|--------|-------------------------------------------|
//! | whole mesh   | `fd4d:6573:6874::/48`                       | /48    | [`MESH_PREFIX`] / [`MESH_PREFIX_LEN`]     |
//! | one network  | `fd4d:6573:6874:NNNN::/64`                  | /64    | NNNN = network number as the subnet id ([`network_prefix`], [`NETWORK_PREFIX_LEN`]) |
//! | one node     | `fd4d:6573:6874:NNNN:0000:XXXX:XXXX:XXXX`   | /128   | interface id = 16 zero bits + 48-bit node |
//!
//! For example `0:A91F.0000.7C2E` ⇄ `fd4d:6573:6874:0:0:a91f:0:7c2e`
//! (`fd4d:6573:6874::a91f:0:7c2e` compressed). IPv6 addresses whose
//! interface id has any of its upper 16 bits set do not map to a node
//! ([`MeshAddr::from_ipv6`] rejects them), which keeps the mapping one-to-one.
//!
//! Reserved values: network 65535; node `0000.0000.0000` (unspecified) and `FFFF.FFFF.FFFF`
//! (broadcast). Parsing and the IPv6 mapping accept them; [`MeshAddr::unicast`] and
//! [`MeshAddr::is_unicast`] do not.
//!
//! ```
//! use meshtun_addr::MeshAddr;
//!
//! let a: MeshAddr = "0:a91f.0000.7c2e".parse()?;
//! assert_eq!(a.to_string(), "0:A91F.0000.7C2E");
//! assert_eq!(a.to_ipv6().to_string(), "fd4d:6573:6874::a91f:0:7c2e");
//! assert_eq!(MeshAddr::from_ipv6(a.to_ipv6())?, a);
//! # Ok::<(), meshtun_addr::AddrError>(())
//! ```
//!
//! This crate is sans-IO: no clock, sockets, filesystem or randomness.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

mod derive;
mod error;
mod group;
mod ipv4;
mod ipv6;
mod mesh;
mod node;

pub use derive::{derive_node_addr, find_nonce, POW_DIFFICULTY_BITS};
pub use error::{AddrError, Reservation};
pub use ipv4::{canonical_ipv4, is_mesh_ipv4, next_mesh_ipv4, IPV4_PREFIX, IPV4_PREFIX_LEN};
pub use group::{group_multicast_addr, group_network, GROUP_PREFIX, GROUP_PREFIX_LEN};
pub use ipv6::{network_prefix, MESH_PREFIX, MESH_PREFIX_LEN, NETWORK_PREFIX_LEN};
pub use mesh::MeshAddr;
pub use node::{NetworkId, NodeAddr};
