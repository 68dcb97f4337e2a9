//! NAT traversal core for meshtun, written sans-IO: no sockets, clocks,
//! threads or randomness. Callers hand in datagrams, transaction ids and
//! observed addresses, and get bytes or verdicts back.
//!
//! * [`classify`] demultiplexes datagrams arriving on a meshtun UDP port
//!   (STUN, WireGuard, backbone protocol).
//! * [`binding_request`], [`binding_response`] and
//!   [`parse_binding_response`] are the STUN Binding codec used both by the
//!   built-in reflector and by netcheck.
//! * [`infer_mapping`] and [`direct_path_possible`] speak the RFC 4787
//!   vocabulary shared by netcheck and the NAT simulator.

mod behavior;
mod classify;
mod stun;

pub use behavior::{
    direct_path_possible, infer_filtering, infer_mapping, ChangeProbe, FilteringBehavior,
    MappingBehavior,
};
pub use classify::{classify, DatagramKind, BACKBONE_MAGIC, PROBE_MAGIC, RELAY_MAGIC};
pub use stun::{
    binding_request, binding_request_with_change, binding_response, change_request,
    change_unavailable_response, parse_binding_response, Change, StunError, TransactionId,
    CHANGE_UNAVAILABLE, PADDED_REQUEST_LEN,
};
