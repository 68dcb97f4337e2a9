//! The meshtun backbone protocol, shared by nodes and backbones.
//!
//! * [`identity`]: a node's Ed25519 identity and the proof-of-work nonce that
//!   binds its permanent 48-bit address to that key.
//! * [`record`]: the node record (address, keys, endpoints, hostname, ...)
//!   signed by the identity key. Anyone can verify a record on its own: the
//!   backbone is never trusted for integrity.
//! * [`message`]: the UDP messages nodes and backbones exchange.
//!
//! Sans-IO: nothing here reads the clock, opens sockets or draws randomness.

pub mod cert;
pub mod identity;
pub mod message;
pub mod record;
pub mod relay;

pub use identity::{Identity, IdentityError};
pub use message::{Message, MessageError, Query, RejectCode, MAX_MESSAGE_LEN};
pub use record::{NodeRecord, RecordError, SignedRecord, VerifiedRecord};
