//! Writes the seed corpus: a few real, valid inputs per byte-level target,
//! encoded the way the real senders encode them, with each target's mode
//! byte where it has one. `cargo run --example make_seeds` from fuzz/
//! rewrites fuzz/corpus/<target>/seed-*; the fuzzers' own finds live
//! beside them and are not touched. (The two state-machine targets take
//! `arbitrary`-structured input; their committed seeds, `min-*`, are a
//! minimised corpus from a fuzzing run. overlay_firewall's two seeds are
//! hand-written rule text.)

use std::net::SocketAddr;
use std::path::Path;

use meshtun_addr::{MeshAddr, NetworkId};
use meshtun_fuzz::{identity, owner, plain_record, OWNER_NETWORK};
use meshtun_proto::message::Deregistration;
use meshtun_proto::{relay, Message, Query, RejectCode, SignedRecord};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
}

fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
    [&[mode][..], bytes].concat()
}

fn main() {
    let id = identity(0);
    let other = identity(1);
    let addr = id.mesh_addr(NetworkId::PUBLIC);
    let mut record = plain_record(id, 7);
    record.endpoints.push("[2001:db8::2]:51820".parse().expect("literal"));
    let signed = SignedRecord::sign(id, &record).expect("valid record");
    let signed_other = SignedRecord::sign(other, &plain_record(other, 3)).expect("valid record");
    let observed: SocketAddr = "198.18.0.2:51820".parse().expect("literal");
    let owner = owner();

    // Backbone messages: one of each kind.
    let net = NetworkId::PUBLIC;
    let messages = [
        ("register", Message::Register { request_id: 1, record: signed.clone() }),
        ("register-ack", Message::RegisterAck { request_id: 1, observed, ttl_secs: 75 }),
        (
            "register-ack-v6",
            Message::RegisterAck { request_id: 1, observed: "[2001:db8::2]:9".parse().expect("literal"), ttl_secs: 75 },
        ),
        ("deregister", Message::Deregister { request_id: 2, deregistration: Deregistration::sign(id, addr, 8) }),
        ("deregister-ack", Message::DeregisterAck { request_id: 2 }),
        ("lookup-address", Message::Lookup { request_id: 3, from: addr, query: Query::Address(other.mesh_addr(net)) }),
        ("lookup-hostname", Message::Lookup { request_id: 3, from: addr, query: Query::Hostname { network: net, name: "alpha".into() } }),
        ("lookup-wgkey", Message::Lookup { request_id: 3, from: addr, query: Query::WgKey { network: net, key: [9; 32] } }),
        ("lookup-capability", Message::Lookup { request_id: 3, from: addr, query: Query::Capability { network: net, name: "gpu".into() } }),
        ("lookup-group", Message::Lookup { request_id: 3, from: addr, query: Query::Group { network: net, name: "ops".into() } }),
        ("lookup-ipv4", Message::Lookup { request_id: 3, from: addr, query: Query::Ipv4 { network: net, addr: [100, 64, 1, 2] } }),
        ("lookup-reply", Message::LookupReply { request_id: 3, records: vec![signed.clone(), signed_other.clone()] }),
        ("reject", Message::Reject { request_id: 4, code: RejectCode::HostnameTaken, detail: "held".into() }),
        ("peer-intent", Message::PeerIntent { record: signed_other.clone() }),
        ("revocations", Message::Revocations { list: owner.sign_revocations(2, vec![3, 4]) }),
    ];
    for (name, message) in &messages {
        write("proto_message", name, &message.encode());
    }

    // Records: as sent (mode bit 7 clear: body, then signature), and a body
    // the harness signs (bit 7 set, low bits pick identity 0).
    write("proto_record", "signed", &with_mode(0, &[&signed.body[..], &signed.signature[..]].concat()));
    write("proto_record", "harness-signed", &with_mode(0x80, &signed.body));

    // Identity files.
    write("proto_identity_file", "identity", id.to_file_string().as_bytes());
    write("proto_identity_file", "identity-crlf", id.to_file_string().replace('\n', "\r\n").as_bytes());

    // Relay frames.
    let wg_keepalive = [&[4u8, 0, 0, 0][..], &[0x5A; 28][..]].concat();
    write("proto_relay", "frame", &relay::wrap(other.mesh_addr(net), &wg_keepalive));
    write("proto_relay", "empty", &relay::wrap(MeshAddr::new(NetworkId(7), other.node_addr()), &[]));

    // Certificates: files (modes 0, 1, 2), bodies signed by the owner (3, 5).
    let cert = owner.sign_membership(id.node_addr(), vec!["research".into(), "ops".into()], 4_000_000_000, 1);
    let list = owner.sign_revocations(2, vec![1, 9]);
    write("proto_cert", "cert-file", &with_mode(0, cert.to_file_string(&owner.public_key()).as_bytes()));
    write("proto_cert", "owner-file", &with_mode(1, owner.to_file_string().as_bytes()));
    write("proto_cert", "revocation-file", &with_mode(2, list.to_file_string().as_bytes()));
    write("proto_cert", "cert-body", &with_mode(3, &cert.body));
    write("proto_cert", "cert-signed", &with_mode(4, &[&cert.body[..], &cert.signature[..]].concat()));
    write("proto_cert", "revocation-body", &with_mode(5, &list.body));
    assert_eq!(owner.network(), OWNER_NETWORK);

    // STUN and the other kinds sharing the port.
    let tid = [0x5A, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
    let request = meshtun_nat::binding_request(tid);
    write("nat_stun", "binding-request", &request);
    write("nat_stun", "binding-response-v4", &meshtun_nat::binding_response(&request, observed).expect("answer"));
    write(
        "nat_stun",
        "binding-response-v6",
        &meshtun_nat::binding_response(&request, "[2001:db8::2]:9".parse().expect("literal")).expect("answer"),
    );
    let rfc3489 = [&[0, 1, 0, 0][..], &[0x33; 16][..]].concat();
    write("nat_stun", "rfc3489-request", &rfc3489);
    write("nat_stun", "wireguard-transport", &wg_keepalive);
    write("nat_stun", "backbone", &Message::DeregisterAck { request_id: 2 }.encode());

    // Probes: as sent with the fixed key (mode 0) and re-MACed (mode 1).
    use meshtun_overlay::probe::{encode, Probe, ProbeKind};
    let key = [7; 32];
    let ping = Probe { kind: ProbeKind::Ping, sender: [1; 32], txid: tid };
    let pong4 = Probe { kind: ProbeKind::Pong(observed), ..ping };
    let pong6 = Probe { kind: ProbeKind::Pong("[2001:db8::2]:9".parse().expect("literal")), ..ping };
    write("overlay_probe", "ping", &with_mode(0, &encode(&ping, &key)));
    write("overlay_probe", "pong-v4", &with_mode(0, &encode(&pong4, &key)));
    write("overlay_probe", "pong-v6", &with_mode(1, &encode(&pong6, &key)));

    // IP packets: 9-byte head (mode: bit 0 new source, bit 1 new
    // destination; then the two IPv4 addresses), then the packet.
    let head = [3, 100, 64, 9, 9, 100, 127, 1, 2];
    let (src6, dst6) = (addr.to_ipv6().octets(), other.mesh_addr(net).to_ipv6().octets());
    let ip = |b: etherparse::PacketBuilderStep<etherparse::UdpHeader>| {
        let mut out = Vec::new();
        b.write(&mut out, b"hello mesh").expect("packet");
        out
    };
    write("overlay_packet", "ipv6-udp", &[&head[..], &ip(etherparse::PacketBuilder::ipv6(src6, dst6, 64).udp(1, 2))].concat());
    write(
        "overlay_packet",
        "ipv4-udp",
        &[&head[..], &ip(etherparse::PacketBuilder::ipv4([100, 64, 0, 1], [100, 64, 0, 2], 64).udp(1, 2))].concat(),
    );
    let mut tcp = Vec::new();
    etherparse::PacketBuilder::ipv4([100, 64, 0, 1], [100, 64, 0, 2], 64)
        .tcp(1000, 22, 1, 65535)
        .write(&mut tcp, b"SSH-2.0")
        .expect("packet");
    write("overlay_packet", "ipv4-tcp", &[&head[..], &tcp[..]].concat());

    // Address text and IPv6 addresses.
    write("addr_text", "mesh", b"0:A91F.0000.7C2E");
    write("addr_text", "mesh-lower", b"65534:a91f.beef.7c2e");
    write("addr_text", "node", b"A91F.0000.7C2E");
    write("addr_text", "ipv6-mesh", &addr.to_ipv6().octets());
    write("addr_text", "ipv6-group", &meshtun_addr::group_multicast_addr(NetworkId(7), "ops").octets());
}
