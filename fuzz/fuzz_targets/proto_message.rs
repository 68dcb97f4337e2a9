//! Backbone protocol messages: `Message::decode` on arbitrary datagrams,
//! then everything a receiver does with a decoded message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshtun_fuzz::{identity, largest_allocation, owner, MeteredAlloc, OWNER_NETWORK};
use meshtun_proto::{Message, SignedRecord, MAX_MESSAGE_LEN};

#[global_allocator]
static ALLOC: MeteredAlloc = MeteredAlloc;

/// The message module's bound on what decoding allocates at once: postcard
/// preallocates a sequence for as many elements as bytes remain, and the
/// largest element is a `SignedRecord`. (It once promised no more than the
/// datagram's length, which a 311-byte `LookupReply` claiming 126 records
/// disproved: corpus/proto_message/regression-lookup-reply-preallocation.)
fn allocation_bound(len: usize) -> usize {
    len * std::mem::size_of::<SignedRecord>() + SLACK
}

/// Slack for error messages.
const SLACK: usize = 256;

fuzz_target!(|data: &[u8]| {
    let (decoded, largest) = largest_allocation(|| Message::decode(data));
    assert!(
        largest <= allocation_bound(data.len()),
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
