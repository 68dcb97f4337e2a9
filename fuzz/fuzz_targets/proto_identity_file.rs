//! Identity files: `Identity::from_file_str` on arbitrary text; whatever it
//! accepts must survive `to_file_string` and parse back to the same key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshtun_proto::Identity;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(id) = Identity::from_file_str(text) else { return };
    let again = Identity::from_file_str(&id.to_file_string()).expect("written identity file parses");
    assert_eq!(again.public_key(), id.public_key());
    assert_eq!(again.nonce(), id.nonce());
    assert_eq!(again.node_addr(), id.node_addr());
});
