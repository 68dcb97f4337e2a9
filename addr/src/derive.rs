//! Proof-of-work derivation of node addresses from identity keys.
//!
//! # Scheme
//!
//! ```text
//! digest = BLAKE3-derive_key("meshtun 2026 node address v1",
//!                            identity_public (32 bytes) || nonce (u64, 8 bytes little-endian))
//! valid  iff the first POW_DIFFICULTY_BITS (20) bits of digest are zero
//! node   = digest[3..9] as a big-endian 48-bit number, and must not be reserved
//! ```
//!
//! Bits 20..24 of the digest are unused, so the address bits never overlap the work bits.
//!
//! # Why
//!
//! A node address is self-certifying: anyone holding `(identity_public, nonce)` checks the
//! binding to the address with **one hash** ([`derive_node_addr`]), with no registry or
//! authority involved. Creating an address costs about **2^20 hashes** ([`find_nonce`]), a
//! fraction of a second to a few seconds, paid once per identity.
//!
//! The work exists because 48 bits alone are far too few: without it, hijacking one chosen
//! address (generating a key whose address equals a victim's) would cost only 2^48 hashes. With
//! it, each `(key, nonce)` attempt hits a specific address with probability
//! 2^-20 · 2^-48, so an attacker **targeting one chosen address needs on average
//! 2^(48+20) = 2^68 hash evaluations**, above the 2^64 the design requires. A single key's 2^64
//! nonces only reach about 2^44 distinct valid addresses, so the attacker must also grind keys;
//! that does not lower the cost. Targeting any one of `k` addresses divides the cost by `k`.
//!
//! Accidental collisions between honest nodes are a separate, birthday-bound matter (around
//! 2^24 nodes in one network) that the work does not change; the domain-separated context string
//! makes digests from other BLAKE3 uses in the project useless here.

use crate::NodeAddr;

/// Leading zero bits a derivation digest must have.
pub const POW_DIFFICULTY_BITS: u32 = 20;

/// BLAKE3 `derive_key` context string; changing it changes every address.
const CONTEXT: &str = "meshtun 2026 node address v1";

/// The node address that `identity_public` earns with `nonce`, or `None` if the nonce is not a
/// valid proof of work or the digest lands on a reserved address. Costs one hash.
///
/// digest = BLAKE3 derive_key context "meshtun 2026 node address v1" over
/// (identity_public 32 bytes || nonce as 8 bytes little-endian). Valid iff the first
/// [`POW_DIFFICULTY_BITS`] bits of the digest are zero; the node address is digest bytes
/// `[3..9]` (big-endian, 48 bits).
pub fn derive_node_addr(identity_public: &[u8; 32], nonce: u64) -> Option<NodeAddr> {
    let mut hasher = blake3::Hasher::new_derive_key(CONTEXT);
    hasher.update(identity_public);
    hasher.update(&nonce.to_le_bytes());
    let d = hasher.finalize();
    let d = d.as_bytes();
    let head = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    if head.leading_zeros() < POW_DIFFICULTY_BITS {
        return None;
    }
    let node = NodeAddr::from_bytes([d[3], d[4], d[5], d[6], d[7], d[8]]);
    (!node.is_reserved()).then_some(node)
}

/// Tries nonces `start, start+1, ...` (wrapping) until [`derive_node_addr`] returns `Some`;
/// returns `(nonce, addr)`. Expected 2^20 hashes; callers wanting a different address for the
/// same key continue from `nonce + 1`.
pub fn find_nonce(identity_public: &[u8; 32], start: u64) -> (u64, NodeAddr) {
    let mut nonce = start;
    loop {
        if let Some(addr) = derive_node_addr(identity_public, nonce) {
            return (nonce, addr);
        }
        nonce = nonce.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE_KEY: [u8; 32] = [7u8; 32];
    // Computed once from the scheme; any change to context, encoding or bit layout breaks this.
    const FIXTURE_NONCE: u64 = 864_513;
    const FIXTURE_ADDR: [u8; 6] = [0xC1, 0xBB, 0x3F, 0xF4, 0x59, 0xE7];

    #[test]
    fn fixture_key_derives_the_pinned_nonce_and_address() {
        let (nonce, addr) = find_nonce(&FIXTURE_KEY, 0);
        assert_eq!(nonce, FIXTURE_NONCE);
        assert_eq!(addr.to_bytes(), FIXTURE_ADDR);
        assert_eq!(addr.to_string(), "C1BB.3FF4.59E7");
    }

    #[test]
    fn pinned_fixture_verifies_with_one_hash() {
        let addr = derive_node_addr(&FIXTURE_KEY, FIXTURE_NONCE);
        assert_eq!(addr, Some(NodeAddr::from_bytes(FIXTURE_ADDR)));
    }

    #[test]
    fn fixture_digest_matches_the_documented_layout() {
        let mut input = FIXTURE_KEY.to_vec();
        input.extend_from_slice(&FIXTURE_NONCE.to_le_bytes());
        let d = blake3::derive_key("meshtun 2026 node address v1", &input);
        assert_eq!(&d[..2], &[0, 0]);
        assert_eq!(d[2] >> 4, 0);
        assert_eq!(&d[3..9], &FIXTURE_ADDR);
    }

    #[test]
    fn every_nonce_before_the_found_one_fails() {
        let (nonce, _) = find_nonce(&FIXTURE_KEY, 0);
        assert!((0..nonce).all(|n| derive_node_addr(&FIXTURE_KEY, n).is_none()));
    }

    #[test]
    fn neighbouring_nonces_fail() {
        assert_eq!(derive_node_addr(&FIXTURE_KEY, FIXTURE_NONCE - 1), None);
        assert_eq!(derive_node_addr(&FIXTURE_KEY, FIXTURE_NONCE + 1), None);
    }

    #[test]
    fn a_different_key_fails_with_the_fixture_nonce() {
        assert_eq!(derive_node_addr(&[8u8; 32], FIXTURE_NONCE), None);
        let mut flipped = FIXTURE_KEY;
        flipped[31] ^= 1;
        assert_eq!(derive_node_addr(&flipped, FIXTURE_NONCE), None);
    }

    #[test]
    fn find_nonce_result_verifies_and_continuing_gives_another_address() {
        let key = [0x42u8; 32];
        let (n1, a1) = find_nonce(&key, 0);
        assert_eq!(derive_node_addr(&key, n1), Some(a1));
        assert!(!a1.is_reserved());
        let (n2, a2) = find_nonce(&key, n1 + 1);
        assert!(n2 > n1);
        assert_eq!(derive_node_addr(&key, n2), Some(a2));
        assert_ne!(a1, a2);
    }

    #[test]
    fn find_nonce_wraps_past_u64_max() {
        let (nonce, addr) = find_nonce(&FIXTURE_KEY, u64::MAX - 1);
        assert_eq!(derive_node_addr(&FIXTURE_KEY, nonce), Some(addr));
    }
}
