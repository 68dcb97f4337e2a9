//! Backbone protocol messages: `Message::decode` on arbitrary datagrams,
//! then everything a receiver does with a decoded message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshtun_fuzz::{identity, largest_allocation, owner, MeteredAlloc, OWNER_NETWORK};
use meshtun_proto::{Message, MAX_MESSAGE_LEN};

#[global_allocator]
static ALLOC: MeteredAlloc = MeteredAlloc;

/// Largest single allocation decoding may make. The message module promises
/// decoding "never allocates more than the datagram's length"; serde's
/// preallocation for a sequence is capped at 1 MiB whatever its claimed
/// length, so this is the real bound today (see fuzz/README.md).
const DECODE_ALLOCATION_LIMIT: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let (decoded, largest) = largest_allocation(|| Message::decode(data));
    assert!(
        largest <= DECODE_ALLOCATION_LIMIT.max(data.len()),
        "decoding {} bytes allocated {largest} bytes at once",
        data.len()
    );
    let Ok(message) = decoded else { return };
    assert!(data.len() <= MAX_MESSAGE_LEN);
    let wire = message.encode();
    assert_eq!(Message::decode(&wire).as_ref(), Ok(&message), "re-encoded message must decode to itself");
    let _ = message.request_id();
    match &message {
        Message::Register { record, .. } | Message::PeerIntent { record } => {
            let _ = record.verify();
        }
        Message::LookupReply { records, .. } => {
            for record in records {
                let _ = record.verify();
            }
        }
        Message::Deregister { deregistration, .. } => {
            let _ = deregistration.verify(&identity(0).public_key());
        }
        Message::Lookup { query, .. } => {
            let _ = query.is_set();
        }
        Message::Reject { code, .. } => {
            let _ = code.as_str();
        }
        Message::Revocations { list } => {
            let _ = list.verify(&owner().public_key(), OWNER_NETWORK);
        }
        // Acks and anything added later: decoding and re-encoding is all.
        _ => {}
    }
});
