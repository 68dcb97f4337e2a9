//! Signed node records: `SignedRecord::verify` on arbitrary body and
//! signature bytes (postcard decode, field validation, address derivation,
//! signature check). The first byte picks the mode: arbitrary signature,
//! or the body signed by a fixed identity so a body that names that
//! identity gets past the signature and is returned.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshtun_fuzz::{identity, sign_body};
use meshtun_proto::record::{MAX_ENDPOINTS, MAX_RECORD_BODY_LEN, MAX_TAGS};
use meshtun_proto::{RecordError, SignedRecord};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let signed = if mode & 0x80 == 0 {
        // Body, then the last 64 bytes (or fewer) are the signature.
        let split = rest.len().saturating_sub(64);
        SignedRecord { body: rest[..split].to_vec(), signature: rest[split..].to_vec() }
    } else {
        sign_body(identity(mode), rest.to_vec())
    };
    match signed.verify() {
        Ok(verified) => {
            let r = &verified.record;
            assert!(signed.body.len() <= MAX_RECORD_BODY_LEN);
            assert!(r.endpoints.len() <= MAX_ENDPOINTS);
            assert!(r.capabilities.len() <= MAX_TAGS && r.groups.len() <= MAX_TAGS);
            if let Some(name) = &r.hostname {
                assert!(meshtun_proto::record::validate_hostname(name).is_ok());
            }
            assert!(r.mesh_addr().is_unicast());
            assert_eq!(meshtun_addr::derive_node_addr(&r.identity_key, r.pow_nonce), Some(r.node));
            assert_eq!(verified.signed, signed);
        }
        Err(RecordError::Malformed(_) | RecordError::BadSignature | RecordError::AddressNotDerived { .. })
        | Err(RecordError::ReservedAddress(_)) => {}
        Err(RecordError::WrongIdentity) => panic!("verify never reports WrongIdentity"),
    }
});
