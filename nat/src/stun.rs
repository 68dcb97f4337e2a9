//! STUN Binding codec (RFC 8489, with RFC 3489 requests answered too).

use std::net::SocketAddr;

use stun_rs::attributes::stun::{
    ErrorCode, Fingerprint, MappedAddress, Software, XorMappedAddress,
};
use stun_rs::methods::BINDING;
use stun_rs::{
    MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunMessage, StunMessageBuilder,
};

/// The 96-bit STUN transaction id. Callers draw it from their own randomness
/// source; this crate never generates one.
pub type TransactionId = [u8; 12];

/// Size of the fixed STUN header; nothing shorter is ever answered.
pub(crate) const HEADER_LEN: usize = 20;
const MAGIC_COOKIE: [u8; 4] = 0x2112_A442u32.to_be_bytes();
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const BINDING_ERROR: u16 = 0x0111;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_CHANGE_REQUEST: u16 = 0x0003;
const ATTR_SOFTWARE: u16 = 0x8022;
const ATTR_FINGERPRINT: u16 = 0x8028;
const FINGERPRINT_XOR: u32 = 0x5354_554E;
const ATTR_HEADER_LEN: usize = 4;
const FINGERPRINT_ATTR_LEN: usize = 8;
const SOFTWARE: &str = "meshtun";
/// Every message this crate builds fits: the largest, an IPv6 Binding
/// success response, is 88 bytes.
const MAX_MESSAGE_LEN: usize = 128;

/// Why a datagram could not be used as the STUN message the caller wanted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    /// The datagram cannot even hold a STUN header.
    #[error("datagram of {len} bytes is shorter than the 20-byte STUN header")]
    TooShort {
        /// Length of the datagram that was offered.
        len: usize,
    },
    /// The header's length field disagrees with the datagram's size.
    #[error("STUN length field announces {declared} bytes of attributes but the datagram carries {actual}")]
    LengthMismatch {
        /// Attribute bytes announced by the header.
        declared: usize,
        /// Attribute bytes actually present after the header.
        actual: usize,
    },
    /// The header does not follow STUN framing at all.
    #[error("not a STUN message: {0}")]
    NotStun(&'static str),
    /// The header is fine but the attributes cannot be decoded.
    #[error("malformed STUN message: {0}")]
    Malformed(String),
    /// A FINGERPRINT attribute is present and its CRC-32 is wrong.
    #[error("STUN FINGERPRINT does not match the message contents")]
    BadFingerprint,
    /// A server was handed something other than a Binding request.
    #[error("expected a STUN Binding request, got message type {0:#06x}")]
    NotBindingRequest(u16),
    /// A client was handed something other than a Binding response.
    #[error("expected a STUN Binding success response, got message type {0:#06x}")]
    NotBindingSuccess(u16),
    /// The server answered our Binding request with an error response.
    #[error("STUN server answered with error {code}: {reason}")]
    ErrorResponse {
        /// STUN error code (for example 400 or 420); 0 if the response carried none.
        code: u16,
        /// Reason phrase sent by the server.
        reason: String,
    },
    /// The response belongs to some other transaction (stale or spoofed).
    #[error("STUN response transaction id does not match the request")]
    TransactionMismatch,
    /// A Binding success response without any address attribute.
    #[error("STUN Binding response carries neither XOR-MAPPED-ADDRESS nor MAPPED-ADDRESS")]
    NoMappedAddress,
    /// The STUN library refused to encode a message we built.
    #[error("could not encode STUN message: {0}")]
    Encode(String),
}

/// How a datagram that passed the STUN header checks is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// RFC 5389/8489 message carrying the magic cookie.
    Rfc8489,
    /// Cookie-less RFC 3489 Binding request with a 128-bit transaction id,
    /// as sent by classic clients such as Debian's `stun` (stund 0.97).
    Rfc3489Request,
}

/// Checks the STUN header: first two bits zero, length field equal to the
/// attribute bytes present and a multiple of 4, and either the magic cookie
/// or (RFC 3489) a Binding request type.
pub(crate) fn framing(datagram: &[u8]) -> Result<Framing, StunError> {
    let Some(header) = datagram.get(..HEADER_LEN) else {
        return Err(StunError::TooShort {
            len: datagram.len(),
        });
    };
    if header[0] & 0xC0 != 0 {
        return Err(StunError::NotStun("the first two bits are not zero"));
    }
    let declared = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let actual = datagram.len() - HEADER_LEN;
    if declared != actual {
        return Err(StunError::LengthMismatch { declared, actual });
    }
    if declared % 4 != 0 {
        return Err(StunError::NotStun("the length is not a multiple of 4"));
    }
    if header[4..8] == MAGIC_COOKIE {
        Ok(Framing::Rfc8489)
    } else if message_type(header) == BINDING_REQUEST {
        Ok(Framing::Rfc3489Request)
    } else {
        Err(StunError::NotStun("the magic cookie is missing"))
    }
}

/// Reads the 14-bit message type; `header` must be at least 2 bytes.
fn message_type(header: &[u8]) -> u16 {
    match header {
        [hi, lo, ..] => u16::from_be_bytes([*hi, *lo]) & 0x3FFF,
        _ => 0,
    }
}

/// Encodes a STUN Binding request with transaction id `tid`, carrying
/// SOFTWARE "meshtun" (padded, see [`PADDED_REQUEST_LEN`]) and a
/// FINGERPRINT.
pub fn binding_request(tid: TransactionId) -> Vec<u8> {
    build_request(tid, Change::default())
}

/// A Binding request asking the server to answer from another address
/// and/or port (RFC 5780 CHANGE-REQUEST), padded like [`binding_request`].
/// A server that cannot do it answers with error 420
/// ([`CHANGE_UNAVAILABLE`]) from the socket the request came to.
pub fn binding_request_with_change(tid: TransactionId, change: Change) -> Vec<u8> {
    build_request(tid, change)
}

/// Every request this crate builds is this long, at least the size of any
/// answer [`binding_response`] or [`change_unavailable_response`] can give
/// (88 bytes at most), so a server that refuses to amplify (answers never
/// larger than the request) still answers us.
pub const PADDED_REQUEST_LEN: usize = 96;

/// The error code a server sends when it cannot honour a CHANGE-REQUEST.
pub const CHANGE_UNAVAILABLE: u16 = 420;

/// RFC 5780 CHANGE-REQUEST flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Change {
    /// Answer from another IP address.
    pub ip: bool,
    /// Answer from another port.
    pub port: bool,
}

impl Change {
    /// Whether any change is asked for.
    pub fn any(self) -> bool {
        self.ip || self.port
    }
}

fn build_request(tid: TransactionId, change: Change) -> Vec<u8> {
    let mut out = bare_header(BINDING_REQUEST, &tid);
    let change_len = if change.any() { ATTR_HEADER_LEN + 4 } else { 0 };
    // The padding rides in SOFTWARE (comprehension-optional) rather than
    // PADDING, which a plain RFC 8489 server would answer with 420.
    let software_len = PADDED_REQUEST_LEN - HEADER_LEN - change_len - FINGERPRINT_ATTR_LEN - ATTR_HEADER_LEN;
    let mut software = SOFTWARE.as_bytes().to_vec();
    software.resize(software_len, b' ');
    push_attribute(&mut out, ATTR_SOFTWARE, &software);
    if change.any() {
        let flags = u32::from(change.ip) << 2 | u32::from(change.port) << 1;
        push_attribute(&mut out, ATTR_CHANGE_REQUEST, &flags.to_be_bytes());
    }
    let with_fingerprint = out.len() - HEADER_LEN + FINGERPRINT_ATTR_LEN;
    out[2..4].copy_from_slice(&u16::try_from(with_fingerprint).unwrap_or(u16::MAX).to_be_bytes());
    let crc = crc32(&out) ^ FINGERPRINT_XOR;
    push_attribute(&mut out, ATTR_FINGERPRINT, &crc.to_be_bytes());
    out
}

/// Appends one attribute (value padded to 4 bytes) without touching the
/// header's length field.
fn push_attribute(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(value);
    out.resize(out.len().div_ceil(4) * 4, 0);
}

/// CRC-32 (IEEE 802.3, as FINGERPRINT uses).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// The CHANGE-REQUEST flags of a datagram that [`binding_response`]
/// accepted (either framing); none when the attribute is absent.
pub fn change_request(request: &[u8]) -> Change {
    let mut attrs = request.get(HEADER_LEN..).unwrap_or_default();
    while let Some((header, rest)) = attrs.split_at_checked(ATTR_HEADER_LEN) {
        let kind = u16::from_be_bytes([header[0], header[1]]);
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        if kind == ATTR_CHANGE_REQUEST {
            if let Some(&[.., flags]) = rest.get(..len) {
                return Change { ip: flags & 0x04 != 0, port: flags & 0x02 != 0 };
            }
            break;
        }
        let Some(rest) = rest.get(len.div_ceil(4) * 4..) else { break };
        attrs = rest;
    }
    Change::default()
}

/// The error response (420, [`CHANGE_UNAVAILABLE`]) for an RFC 8489
/// Binding request whose CHANGE-REQUEST the server cannot honour (it has
/// no socket on another address or port). Cookie-less RFC 3489 requests
/// get none (an error, so the caller drops them).
pub fn change_unavailable_response(request: &[u8]) -> Result<Vec<u8>, StunError> {
    if framing(request)? != Framing::Rfc8489 {
        return Err(StunError::NotStun("the magic cookie is missing"));
    }
    let tid = transaction_id(request)?;
    let code = stun_rs::ErrorCode::new(CHANGE_UNAVAILABLE, "no alternate").map_err(|e| StunError::Encode(e.to_string()))?;
    let msg = StunMessageBuilder::new(BINDING, MessageClass::ErrorResponse)
        .with_transaction_id(tid.into())
        .with_attribute(ErrorCode::new(code))
        .with_attribute(software()?)
        .with_attribute(Fingerprint::default())
        .build();
    encode(&msg)
}

/// Server side of a Binding transaction.
///
/// If `request` is a well-formed STUN Binding request, returns the Binding
/// success response for the same transaction, carrying `observed` (the
/// source address the request came from) as XOR-MAPPED-ADDRESS and as
/// MAPPED-ADDRESS (for RFC 3489-era clients), plus SOFTWARE and FINGERPRINT.
/// IPv4 and IPv6 observed addresses both work; an IPv4-mapped IPv6 address
/// (as seen on a dual-stack socket) is reported as plain IPv4.
///
/// Cookie-less RFC 3489 requests (Debian's `stun` client sends these) get
/// an RFC 3489 response: the 128-bit transaction id echoed and MAPPED-ADDRESS
/// only, because such clients reject any unknown comprehension-required
/// attribute, XOR-MAPPED-ADDRESS included.
///
/// A CHANGE-REQUEST attribute (RFC 3489 / RFC 5780) is not acted on here:
/// the caller reads it with [`change_request`] and sends this answer from
/// another socket, or sends [`change_unavailable_response`] instead.
/// RESPONSE-ADDRESS and other unknown attributes are ignored; the answer
/// always goes back to the caller's source. MESSAGE-INTEGRITY is not
/// checked (the reflector has no credentials), a FINGERPRINT, if present, is.
///
/// Amplification: nothing from the request except its transaction id is
/// reflected, so the response has a fixed size of at most 88 bytes (64 for
/// IPv4), which can be larger than a small request. A server facing the
/// open network should send it only when it is no larger than the request
/// (or the requester is known); requests built here are padded to
/// [`PADDED_REQUEST_LEN`] so they always qualify.
///
/// Returns an error for anything else: not STUN, not a Binding request,
/// malformed attributes or a wrong FINGERPRINT.
pub fn binding_response(request: &[u8], observed: SocketAddr) -> Result<Vec<u8>, StunError> {
    let observed = SocketAddr::new(observed.ip().to_canonical(), observed.port());
    let kind = message_type(request);
    match framing(request)? {
        Framing::Rfc3489Request => rfc3489_response(request, observed),
        Framing::Rfc8489 if kind != BINDING_REQUEST => Err(StunError::NotBindingRequest(kind)),
        Framing::Rfc8489 => {
            decode_checked(request)?;
            let tid = transaction_id(request)?;
            let msg = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
                .with_transaction_id(tid.into())
                .with_attribute(XorMappedAddress::from(observed))
                .with_attribute(MappedAddress::from(observed))
                .with_attribute(software()?)
                .with_attribute(Fingerprint::default())
                .build();
            encode(&msg)
        }
    }
}

/// Client side of a Binding transaction.
///
/// Parses a Binding success response, checks that it answers the request
/// sent with `expected_tid` and returns the server-reflexive address from
/// XOR-MAPPED-ADDRESS, falling back to MAPPED-ADDRESS for servers that only
/// send the latter. A FINGERPRINT, if present, must be correct.
pub fn parse_binding_response(
    response: &[u8],
    expected_tid: &TransactionId,
) -> Result<SocketAddr, StunError> {
    if framing(response)? != Framing::Rfc8489 {
        return Err(StunError::NotStun("the magic cookie is missing"));
    }
    let kind = message_type(response);
    if kind != BINDING_SUCCESS && kind != BINDING_ERROR {
        return Err(StunError::NotBindingSuccess(kind));
    }
    if transaction_id(response)? != *expected_tid {
        return Err(StunError::TransactionMismatch);
    }
    let msg = decode_checked(response)?;
    if kind == BINDING_ERROR {
        let (code, reason) = msg
            .get::<ErrorCode>()
            .and_then(|attr| attr.as_error_code().ok())
            .map(|attr| {
                (
                    attr.error_code().error_code(),
                    attr.error_code().reason().to_owned(),
                )
            })
            .unwrap_or_default();
        return Err(StunError::ErrorResponse { code, reason });
    }
    if let Some(addr) = msg
        .get::<XorMappedAddress>()
        .and_then(|attr| attr.as_xor_mapped_address().ok())
    {
        return Ok(*addr.socket_address());
    }
    msg.get::<MappedAddress>()
        .and_then(|attr| attr.as_mapped_address().ok())
        .map(|addr| *addr.socket_address())
        .ok_or(StunError::NoMappedAddress)
}

fn software() -> Result<Software, StunError> {
    Software::new(SOFTWARE).map_err(|e| StunError::Encode(e.to_string()))
}

fn transaction_id(msg: &[u8]) -> Result<TransactionId, StunError> {
    msg.get(8..HEADER_LEN)
        .and_then(|tid| tid.try_into().ok())
        .ok_or(StunError::TooShort { len: msg.len() })
}

fn encode(msg: &StunMessage) -> Result<Vec<u8>, StunError> {
    let mut buf = [0u8; MAX_MESSAGE_LEN];
    let encoder = MessageEncoderBuilder::default().build();
    let len = encoder
        .encode(&mut buf, msg)
        .map_err(|e| StunError::Encode(e.to_string()))?;
    buf.get(..len)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| StunError::Encode(format!("encoder reported {len} bytes")))
}

fn bare_header(kind: u16, tid: &TransactionId) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&MAGIC_COOKIE);
    out.extend_from_slice(tid);
    out
}

/// Decodes an RFC 8489 message and verifies its FINGERPRINT if it has one.
fn decode_checked(buf: &[u8]) -> Result<StunMessage, StunError> {
    let decoder = MessageDecoderBuilder::default().build();
    let (msg, _) = decoder
        .decode(buf)
        .map_err(|e| StunError::Malformed(e.to_string()))?;
    if let Some(attr) = msg.get::<Fingerprint>() {
        let fingerprint = attr
            .as_fingerprint()
            .map_err(|e| StunError::Malformed(e.to_string()))?;
        let covered = stun_rs::get_input_text::<Fingerprint>(buf)
            .ok_or_else(|| StunError::Malformed("FINGERPRINT cannot be located".into()))?;
        // The decoder silently drops attributes after FINGERPRINT; RFC 8489
        // requires it to be last, so anything behind it is malformed.
        if covered.len() + FINGERPRINT_ATTR_LEN != buf.len() {
            return Err(StunError::Malformed(
                "FINGERPRINT is not the last attribute".into(),
            ));
        }
        if !fingerprint.validate(&covered) {
            return Err(StunError::BadFingerprint);
        }
    }
    Ok(msg)
}

/// Answers a cookie-less RFC 3489 Binding request with MAPPED-ADDRESS only.
fn rfc3489_response(request: &[u8], observed: SocketAddr) -> Result<Vec<u8>, StunError> {
    check_attribute_layout(request.get(HEADER_LEN..).unwrap_or_default())?;
    let tid = request
        .get(4..HEADER_LEN)
        .ok_or(StunError::TooShort { len: request.len() })?;
    let mapped = mapped_address_value(observed);
    let attr_len = ATTR_HEADER_LEN + mapped.len();
    let mut out = Vec::with_capacity(HEADER_LEN + attr_len);
    out.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out.extend_from_slice(&u16::try_from(attr_len).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(tid);
    out.extend_from_slice(&ATTR_MAPPED_ADDRESS.to_be_bytes());
    out.extend_from_slice(
        &u16::try_from(mapped.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(&mapped);
    Ok(out)
}

/// Walks type-length-value attributes and checks they tile `attrs` exactly
/// (each value padded to a multiple of 4).
fn check_attribute_layout(mut attrs: &[u8]) -> Result<(), StunError> {
    while !attrs.is_empty() {
        let Some((header, rest)) = attrs.split_at_checked(ATTR_HEADER_LEN) else {
            return Err(StunError::Malformed("truncated attribute header".into()));
        };
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let padded = len.div_ceil(4) * 4;
        let Some(rest) = rest.get(padded..) else {
            return Err(StunError::Malformed(
                "attribute value runs past the message end".into(),
            ));
        };
        attrs = rest;
    }
    Ok(())
}

/// MAPPED-ADDRESS value: reserved byte, family, port, address (RFC 8489 14.1).
fn mapped_address_value(addr: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    out.push(0);
    match addr {
        SocketAddr::V4(v4) => {
            out.push(0x01);
            out.extend_from_slice(&v4.port().to_be_bytes());
            out.extend_from_slice(&v4.ip().octets());
        }
        SocketAddr::V6(v6) => {
            out.push(0x02);
            out.extend_from_slice(&v6.port().to_be_bytes());
            out.extend_from_slice(&v6.ip().octets());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TID: TransactionId = [0x5A, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
    const COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Builds an RFC 8489 header around `attrs` (no FINGERPRINT).
    fn message(kind: u16, tid: &TransactionId, attrs: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&u16::try_from(attrs.len()).unwrap().to_be_bytes());
        out.extend_from_slice(&COOKIE);
        out.extend_from_slice(tid);
        out.extend_from_slice(attrs);
        out
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn a_binding_request_carries_the_tid_software_and_a_valid_fingerprint() {
        let request = binding_request(TID);
        assert_eq!(&request[..2], &[0x00, 0x01]);
        assert_eq!(&request[4..8], &COOKIE);
        assert_eq!(&request[8..20], &TID);
        let msg = decode_checked(&request).unwrap();
        let software = msg.get::<Software>().unwrap().as_software().unwrap();
        assert_eq!(software.as_str().trim_end(), "meshtun");
        assert!(msg.get::<Fingerprint>().is_some());
    }

    #[test]
    fn an_ipv4_binding_round_trips_to_the_observed_address() {
        let observed = addr("198.18.0.2:4242");
        let response = binding_response(&binding_request(TID), observed).unwrap();
        assert_eq!(parse_binding_response(&response, &TID).unwrap(), observed);
    }

    #[test]
    fn an_ipv6_binding_round_trips_to_the_observed_address() {
        let observed = addr("[2001:db8:1234:5678:11:2233:4455:6677]:51820");
        let response = binding_response(&binding_request(TID), observed).unwrap();
        assert_eq!(parse_binding_response(&response, &TID).unwrap(), observed);
    }

    #[test]
    fn the_response_carries_the_xor_encoded_and_the_plain_mapped_address() {
        let response = binding_response(&binding_request(TID), addr("198.18.0.2:4242")).unwrap();
        // 4242 = 0x1092 ^ 0x2112 = 0x3180; 198.18.0.2 ^ 0x2112A442 = E7 00 A4 40.
        let xor_mapped = [
            0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0x31, 0x80, 0xE7, 0x00, 0xA4, 0x40,
        ];
        let mapped = [
            0x00, 0x01, 0x00, 0x08, 0x00, 0x01, 0x10, 0x92, 198, 18, 0, 2,
        ];
        assert!(contains(&response, &xor_mapped), "{response:02x?}");
        assert!(contains(&response, &mapped), "{response:02x?}");
    }

    #[test]
    fn the_response_is_a_binding_success_for_the_same_transaction_with_software_and_fingerprint() {
        let response = binding_response(&binding_request(TID), addr("198.18.0.2:4242")).unwrap();
        assert_eq!(&response[..2], &[0x01, 0x01]);
        assert_eq!(&response[8..20], &TID);
        let msg = decode_checked(&response).unwrap();
        assert_eq!(
            msg.get::<Software>()
                .unwrap()
                .as_software()
                .unwrap()
                .as_str(),
            "meshtun"
        );
        assert!(msg.get::<Fingerprint>().is_some());
    }

    #[test]
    fn responses_have_a_small_fixed_size() {
        let v4 = binding_response(&binding_request(TID), addr("198.18.0.2:4242")).unwrap();
        let v6 = binding_response(&binding_request(TID), addr("[2001:db8::2]:4242")).unwrap();
        assert_eq!(v4.len(), 64);
        assert_eq!(v6.len(), 88);
        // Padding the request does not grow the answer.
        let padded = message(
            0x0001,
            &TID,
            &[0x80, 0x50, 0x01, 0x00]
                .into_iter()
                .chain([0; 256])
                .collect::<Vec<_>>(),
        );
        assert_eq!(
            binding_response(&padded, addr("198.18.0.2:4242"))
                .unwrap()
                .len(),
            64
        );
    }

    #[test]
    fn an_ipv4_mapped_ipv6_observed_address_is_reported_as_ipv4() {
        let response =
            binding_response(&binding_request(TID), addr("[::ffff:198.18.0.2]:4242")).unwrap();
        assert_eq!(
            parse_binding_response(&response, &TID).unwrap(),
            addr("198.18.0.2:4242")
        );
    }

    #[test]
    fn a_bare_binding_request_header_is_answered() {
        let request = message(0x0001, &TID, &[]);
        let response = binding_response(&request, addr("198.18.0.2:4242")).unwrap();
        assert_eq!(
            parse_binding_response(&response, &TID).unwrap(),
            addr("198.18.0.2:4242")
        );
    }

    #[test]
    fn a_change_request_is_read_from_either_framing_and_does_not_alter_the_answer() {
        // CHANGE-REQUEST asking for both a new IP and a new port.
        let request = message(
            0x0001,
            &TID,
            &[0x00, 0x03, 0x00, 0x04, 0x00, 0x00, 0x00, 0x06],
        );
        assert_eq!(change_request(&request), Change { ip: true, port: true });
        let response = binding_response(&request, addr("198.18.0.2:4242")).unwrap();
        assert_eq!(
            parse_binding_response(&response, &TID).unwrap(),
            addr("198.18.0.2:4242")
        );
        let mut classic = vec![0x00, 0x01, 0x00, 0x08];
        classic.extend_from_slice(&[7; 16]);
        classic.extend_from_slice(&[0x00, 0x03, 0x00, 0x04, 0x00, 0x00, 0x00, 0x02]);
        assert_eq!(change_request(&classic), Change { ip: false, port: true });
        assert_eq!(change_request(&binding_request(TID)), Change::default());
    }

    #[test]
    fn requests_built_here_carry_the_change_flags_and_a_valid_fingerprint() {
        for change in [
            Change { ip: true, port: false },
            Change { ip: false, port: true },
            Change { ip: true, port: true },
        ] {
            let request = binding_request_with_change(TID, change);
            assert_eq!(request.len(), PADDED_REQUEST_LEN);
            assert!(decode_checked(&request).unwrap().get::<Fingerprint>().is_some());
            assert_eq!(change_request(&request), change);
            assert!(binding_response(&request, addr("198.18.0.2:4242")).is_ok());
        }
    }

    #[test]
    fn padded_requests_are_at_least_as_large_as_any_answer() {
        for observed in [addr("198.18.0.2:4242"), addr("[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:65535")] {
            for request in [
                binding_request(TID),
                binding_request_with_change(TID, Change { ip: true, port: true }),
            ] {
                let answer = binding_response(&request, observed).unwrap();
                assert!(answer.len() <= request.len(), "{} > {}", answer.len(), request.len());
                let refusal = change_unavailable_response(&request).unwrap();
                assert!(refusal.len() <= request.len(), "{} > {}", refusal.len(), request.len());
            }
        }
    }

    #[test]
    fn an_unavailable_change_is_reported_as_error_420() {
        let request = binding_request_with_change(TID, Change { ip: false, port: true });
        let refusal = change_unavailable_response(&request).unwrap();
        assert!(matches!(
            parse_binding_response(&refusal, &TID),
            Err(StunError::ErrorResponse { code: CHANGE_UNAVAILABLE, .. })
        ));
        let mut classic = vec![0x00, 0x01, 0x00, 0x00];
        classic.extend_from_slice(&[7; 16]);
        assert!(change_unavailable_response(&classic).is_err());
    }

    #[test]
    fn a_classic_rfc3489_request_gets_a_classic_response_with_mapped_address_only() {
        // Captured from Debian's `stun` 0.97 client: no magic cookie, 128-bit tid, CHANGE-REQUEST 0.
        let request = [
            0x00, 0x01, 0x00, 0x08, 0x01, 0x03, 0xc3, 0x49, 0xcb, 0xc6, 0x30, 0x77, 0x54, 0xf8,
            0xaf, 0x00, 0x19, 0xd0, 0x1e, 0x64, 0x00, 0x03, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00,
        ];
        let response = binding_response(&request, addr("198.18.0.2:4242")).unwrap();
        let mut expected = vec![0x01, 0x01, 0x00, 0x0C];
        expected.extend_from_slice(&request[4..20]);
        expected.extend_from_slice(&[
            0x00, 0x01, 0x00, 0x08, 0x00, 0x01, 0x10, 0x92, 198, 18, 0, 2,
        ]);
        assert_eq!(response, expected);
    }

    #[test]
    fn a_classic_request_with_a_broken_attribute_is_rejected() {
        let mut request = vec![0x00, 0x01, 0x00, 0x08];
        request.extend_from_slice(&[9; 16]);
        request.extend_from_slice(&[0x00, 0x03, 0x00, 0x40, 0, 0, 0, 0]);
        assert!(matches!(
            binding_response(&request, addr("198.18.0.2:4242")),
            Err(StunError::Malformed(_))
        ));
    }

    #[test]
    fn binding_response_rejects_messages_that_are_not_binding_requests() {
        let observed = addr("198.18.0.2:4242");
        let success = binding_response(&binding_request(TID), observed).unwrap();
        assert_eq!(
            binding_response(&success, observed),
            Err(StunError::NotBindingRequest(0x0101))
        );
        let indication = message(0x0011, &TID, &[]);
        assert_eq!(
            binding_response(&indication, observed),
            Err(StunError::NotBindingRequest(0x0011))
        );
        let allocate = message(0x0003, &TID, &[]);
        assert_eq!(
            binding_response(&allocate, observed),
            Err(StunError::NotBindingRequest(0x0003))
        );
    }

    #[test]
    fn binding_response_rejects_garbage_and_truncated_input() {
        let observed = addr("198.18.0.2:4242");
        let request = binding_request(TID);
        assert_eq!(
            binding_response(&[], observed),
            Err(StunError::TooShort { len: 0 })
        );
        assert_eq!(
            binding_response(&request[..19], observed),
            Err(StunError::TooShort { len: 19 })
        );
        assert!(matches!(
            binding_response(&request[..request.len() - 4], observed),
            Err(StunError::LengthMismatch { .. })
        ));
        assert!(binding_response(b"MT\x01 not stun at all, just backbone", observed).is_err());
        assert!(binding_response(&[0xFF; 64], observed).is_err());
    }

    #[test]
    fn binding_response_rejects_a_request_with_a_wrong_fingerprint() {
        let mut request = binding_request(TID);
        let last = request.len() - 1;
        request[last] ^= 0x01;
        assert_eq!(
            binding_response(&request, addr("198.18.0.2:4242")),
            Err(StunError::BadFingerprint)
        );
    }

    #[test]
    fn binding_response_rejects_attributes_after_the_fingerprint() {
        let request = binding_request(TID);
        let mut attrs = request[20..].to_vec();
        attrs.extend_from_slice(&[0x80, 0x22, 0x00, 0x04, b'e', b'v', b'i', b'l']);
        let request = message(0x0001, &TID, &attrs);
        assert!(matches!(
            binding_response(&request, addr("198.18.0.2:4242")),
            Err(StunError::Malformed(_))
        ));
    }

    #[test]
    fn binding_response_rejects_an_attribute_running_past_the_end() {
        let request = message(
            0x0001,
            &TID,
            &[0x80, 0x22, 0x00, 0x10, b'a', b'b', b'c', b'd'],
        );
        assert!(matches!(
            binding_response(&request, addr("198.18.0.2:4242")),
            Err(StunError::Malformed(_))
        ));
    }

    #[test]
    fn parse_rejects_a_response_for_another_transaction() {
        let response = binding_response(&binding_request(TID), addr("198.18.0.2:4242")).unwrap();
        let other = [0xEE; 12];
        assert_eq!(
            parse_binding_response(&response, &other),
            Err(StunError::TransactionMismatch)
        );
    }

    #[test]
    fn parse_rejects_garbage_and_truncated_input() {
        let response = binding_response(&binding_request(TID), addr("198.18.0.2:4242")).unwrap();
        assert_eq!(
            parse_binding_response(&[], &TID),
            Err(StunError::TooShort { len: 0 })
        );
        assert_eq!(
            parse_binding_response(&response[..10], &TID),
            Err(StunError::TooShort { len: 10 })
        );
        assert!(matches!(
            parse_binding_response(&response[..response.len() - 8], &TID),
            Err(StunError::LengthMismatch { .. })
        ));
        assert!(parse_binding_response(&[0xFF; 64], &TID).is_err());
        assert!(parse_binding_response(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &TID).is_err());
    }

    #[test]
    fn parse_rejects_a_request_offered_as_a_response() {
        assert_eq!(
            parse_binding_response(&binding_request(TID), &TID),
            Err(StunError::NotBindingSuccess(0x0001))
        );
    }

    #[test]
    fn parse_rejects_a_response_with_a_wrong_fingerprint() {
        let mut response =
            binding_response(&binding_request(TID), addr("198.18.0.2:4242")).unwrap();
        let last = response.len() - 1;
        response[last] ^= 0x80;
        assert_eq!(
            parse_binding_response(&response, &TID),
            Err(StunError::BadFingerprint)
        );
    }

    #[test]
    fn parse_reports_an_error_response_with_its_code() {
        let msg = StunMessageBuilder::new(BINDING, MessageClass::ErrorResponse)
            .with_transaction_id(TID.into())
            .with_attribute(ErrorCode::new(
                stun_rs::ErrorCode::new(400, "Bad Request").unwrap(),
            ))
            .build();
        let response = encode(&msg).unwrap();
        assert_eq!(
            parse_binding_response(&response, &TID),
            Err(StunError::ErrorResponse {
                code: 400,
                reason: "Bad Request".into()
            })
        );
    }

    #[test]
    fn parse_falls_back_to_mapped_address() {
        let msg = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
            .with_transaction_id(TID.into())
            .with_attribute(MappedAddress::from(addr("203.0.113.9:999")))
            .build();
        let response = encode(&msg).unwrap();
        assert_eq!(
            parse_binding_response(&response, &TID).unwrap(),
            addr("203.0.113.9:999")
        );
    }

    #[test]
    fn parse_rejects_a_success_response_without_any_address() {
        let response = message(0x0101, &TID, &[]);
        assert_eq!(
            parse_binding_response(&response, &TID),
            Err(StunError::NoMappedAddress)
        );
    }

    #[test]
    fn parse_reads_the_rfc5769_ipv4_test_vector() {
        // RFC 5769 section 2.2, with MESSAGE-INTEGRITY that we do not check.
        let response = [
            0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34,
            0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74,
            0x20, 0x76, 0x65, 0x63, 0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01,
            0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43, 0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99,
            0xfd, 0x9e, 0x90, 0xc3, 0x8c, 0x74, 0x89, 0xf9, 0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b,
            0xe7, 0xd7, 0x80, 0x28, 0x00, 0x04, 0xc0, 0x7d, 0x4c, 0x96,
        ];
        let tid = [
            0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
        ];
        assert_eq!(
            parse_binding_response(&response, &tid).unwrap(),
            addr("192.0.2.1:32853")
        );
    }

    /// A header that passes STUN framing followed by arbitrary attribute bytes,
    /// so the fuzzing reaches the attribute decoder.
    fn framed() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::sample::select(vec![0x0001u16, 0x0101, 0x0111, 0x0011]),
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        0x0001u16, 0x0003, 0x0006, 0x0008, 0x0009, 0x000A, 0x0014, 0x0015, 0x001C,
                        0x001D, 0x0020, 0x8022, 0x8023, 0x8028, 0x8002, 0x7FFF,
                    ]),
                    prop::collection::vec(any::<u8>(), 0..24),
                ),
                0..5,
            ),
            any::<bool>(),
        )
            .prop_map(|(kind, tid_and_more, attrs, cookie)| {
                let mut body = Vec::new();
                for (attr_type, value) in attrs {
                    body.extend_from_slice(&attr_type.to_be_bytes());
                    body.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
                    body.extend_from_slice(&value);
                    body.resize(body.len().div_ceil(4) * 4, 0);
                }
                let mut tid = [0u8; 16];
                for (slot, byte) in tid.iter_mut().zip(tid_and_more) {
                    *slot = byte;
                }
                if cookie {
                    tid[..4].copy_from_slice(&COOKIE);
                }
                let mut out = Vec::new();
                out.extend_from_slice(&kind.to_be_bytes());
                out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
                out.extend_from_slice(&tid);
                out.extend_from_slice(&body);
                out
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = crate::classify(&bytes);
            let _ = binding_response(&bytes, addr("198.18.0.2:4242"));
            let _ = parse_binding_response(&bytes, &TID);
        }

        #[test]
        fn arbitrary_attributes_behind_a_valid_header_never_panic(bytes in framed()) {
            let _ = crate::classify(&bytes);
            let _ = binding_response(&bytes, addr("[2001:db8::2]:4242"));
            let tid: TransactionId = bytes[8..20].try_into().unwrap();
            let _ = parse_binding_response(&bytes, &tid);
        }

        #[test]
        fn every_transaction_id_and_address_round_trips(
            tid in any::<[u8; 12]>(),
            ip in any::<std::net::IpAddr>(),
            port in any::<u16>(),
        ) {
            let observed = SocketAddr::new(ip.to_canonical(), port);
            let response = binding_response(&binding_request(tid), observed).unwrap();
            prop_assert_eq!(parse_binding_response(&response, &tid).unwrap(), observed);
        }
    }
}
