//! Private-network certificates: the three file parsers of
//! `meshtun_proto::cert` (certificate, owner key, revocation list) with
//! round trips, and certificate / revocation bodies checked against a
//! fixed owner key, either with an arbitrary signature or signed by the
//! owner so the postcard decoding behind the signature check is reached.
//! The first byte picks the mode.
#![no_main]

use std::sync::OnceLock;

use ed25519_dalek::{Signer, SigningKey};
use libfuzzer_sys::fuzz_target;
use meshtun_addr::{NetworkId, NodeAddr};
use meshtun_fuzz::{OWNER_NETWORK, OWNER_SECRET};
use meshtun_proto::cert::{CertError, NetworkOwner, SignedCert, SignedRevocations};

const NET: NetworkId = OWNER_NETWORK;
/// Signing contexts of `meshtun_proto::cert` (wire protocol constants).
const CERT_CONTEXT: &[u8] = b"meshtun membership v1\0";
const REVOCATION_CONTEXT: &[u8] = b"meshtun revocations v1\0";

/// Signs as the owner. `NetworkOwner` only signs well-formed contents, so
/// sign arbitrary bodies with its key directly (checked against
/// `NetworkOwner` on first use).
fn owner_sign(context: &[u8], body: &[u8]) -> Vec<u8> {
    owner_key().sign(&[context, body].concat()).to_bytes().to_vec()
}

fn owner_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let key = SigningKey::from_bytes(&OWNER_SECRET);
        let owner = NetworkOwner::generate(NET, OWNER_SECRET);
        assert_eq!(owner.public_key(), key.verifying_key().to_bytes());
        let real = owner.sign_membership(NodeAddr::from_bytes([1; 6]), vec!["ops".into()], 9, 1);
        let ours = key.sign(&[CERT_CONTEXT, &real.body].concat()).to_bytes().to_vec();
        assert_eq!(ours, real.signature, "CERT_CONTEXT drifted");
        let real = owner.sign_revocations(1, vec![2]);
        let ours = key.sign(&[REVOCATION_CONTEXT, &real.body].concat()).to_bytes().to_vec();
        assert_eq!(ours, real.signature, "REVOCATION_CONTEXT drifted");
        key
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let owner = NetworkOwner::generate(NET, OWNER_SECRET).public_key();
    match mode % 6 {
        0 => {
            let Ok(text) = std::str::from_utf8(rest) else { return };
            if let Ok((key, cert)) = SignedCert::from_file_str(text) {
                let _ = cert.verify_signature(&key);
                let back = SignedCert::from_file_str(&cert.to_file_string(&key)).expect("written cert parses");
                assert_eq!(back, (key, cert));
            }
        }
        1 => {
            let Ok(text) = std::str::from_utf8(rest) else { return };
            if let Ok(o) = NetworkOwner::from_file_str(text) {
                let back = NetworkOwner::from_file_str(&o.to_file_string()).expect("written owner parses");
                assert_eq!((back.network(), back.public_key()), (o.network(), o.public_key()));
            }
        }
        2 => {
            let Ok(text) = std::str::from_utf8(rest) else { return };
            if let Ok(list) = SignedRevocations::from_file_str(text) {
                let _ = list.verify(&owner, NET);
                let back = SignedRevocations::from_file_str(&list.to_file_string()).expect("written list parses");
                assert_eq!(back, list);
            }
        }
        3 | 4 => {
            let cert = if mode % 6 == 3 {
                SignedCert { body: rest.to_vec(), signature: owner_sign(CERT_CONTEXT, rest) }
            } else {
                let split = rest.len().saturating_sub(64);
                SignedCert { body: rest[..split].to_vec(), signature: rest[split..].to_vec() }
            };
            match cert.verify_signature(&owner) {
                Ok(m) => {
                    let member = m.member;
                    match cert.verify(&owner, m.network, member, m.not_after_unix, None) {
                        Ok(again) => assert_eq!(again, m),
                        Err(e) => panic!("verify refused what verify_signature accepted: {e}"),
                    }
                    if let Some(later) = m.not_after_unix.checked_add(1) {
                        let expired = cert.verify(&owner, m.network, member, later, None);
                        assert_eq!(expired, Err(CertError::Expired(m.not_after_unix)));
                    }
                }
                Err(CertError::Malformed(_) | CertError::BadSignature) => {}
                Err(e) => panic!("verify_signature returned {e:?}"),
            }
        }
        _ => {
            let list = SignedRevocations { body: rest.to_vec(), signature: owner_sign(REVOCATION_CONTEXT, rest) };
            if let Ok(r) = list.verify(&owner, NET) {
                assert_eq!(r.network, NET);
            }
        }
    }
});
