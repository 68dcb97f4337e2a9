//! TUN offloads (`meshtun_overlay::offload`): `split` on any read never
//! panics and emits packets no longer than a read; cutting TCP to fit a
//! narrow path (any limit) fails exactly when not cutting does and carries
//! the same TCP bytes from the same sequence number; the `Coalescer`, fed
//! TCP segments the fuzzer shapes (flows, gaps, flags, sizes) mixed with
//! raw bytes, loses and reorders nothing: splitting its writes again gives
//! back every input packet's bytes after the headers, in order, with its
//! sequence number.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use meshtun_overlay::offload::{split, Coalescer, VNET_HDR_LEN};

#[derive(Arbitrary, Debug)]
enum Item {
    Segment { v6: bool, port: bool, seq_skip: u8, len: u16, psh: bool, fin: bool },
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    read: Vec<u8>,
    max_packet: u16,
    items: Vec<Item>,
}

fn tcp_payload_and_seq(p: &[u8]) -> Option<(&[u8], u32)> {
    let ip = match p.first()? >> 4 {
        4 if *p.get(9)? == 6 => usize::from(p[0] & 15) * 4,
        6 if *p.get(6)? == 6 => 40,
        _ => return None,
    };
    let tcp = usize::from(p.get(ip + 12)? >> 4) * 4;
    let seq = u32::from_be_bytes(p.get(ip + 4..ip + 8)?.try_into().ok()?);
    Some((p.get(ip + tcp..)?, seq))
}

fuzz_target!(|input: Input| {
    let mut whole = Vec::new();
    let plain = split(&mut input.read.clone(), None, &mut Vec::new(), |p| {
        assert!(p.len() <= 65535);
        whole.push(p.to_vec());
    });
    let mut cut = Vec::new();
    let fitted = split(&mut input.read.clone(), Some(usize::from(input.max_packet)), &mut Vec::new(), |p| {
        assert!(p.len() <= 65535);
        cut.push(p.to_vec());
    });
    assert_eq!(plain.is_ok(), fitted.is_ok(), "{plain:?} against {fitted:?}");
    if plain.is_ok() {
        let stream = |packets: &[Vec<u8>]| -> Option<(u32, Vec<u8>)> {
            let (_, first) = tcp_payload_and_seq(packets.first()?)?;
            Some((first, packets.iter().flat_map(|p| tcp_payload_and_seq(p).map_or(&p[..], |(payload, _)| payload).to_vec()).collect()))
        };
        assert!(cut.len() >= whole.len());
        assert_eq!(stream(&whole), stream(&cut), "cutting to fit changed the bytes carried");
    }

    let mut seq = 1000u32;
    let mut packets = Vec::new();
    for item in input.items.iter().take(200) {
        match item {
            Item::Segment { v6, port, seq_skip, len, psh, fin } => {
                let payload: Vec<u8> = (0..usize::from(*len % 1500)).map(|i| i as u8).collect();
                let builder = if *v6 {
                    etherparse::PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64)
                } else {
                    etherparse::PacketBuilder::ipv4([100, 64, 0, 1], [100, 64, 0, 2], 64)
                };
                seq = seq.wrapping_add(u32::from(*seq_skip % 2) * 7);
                let mut b = builder.tcp(if *port { 1 } else { 2 }, 80, seq, 100).ack(5);
                if *psh {
                    b = b.psh();
                }
                if *fin {
                    b = b.fin();
                }
                let mut p = Vec::new();
                b.write(&mut p, &payload).unwrap();
                seq = seq.wrapping_add(payload.len() as u32);
                packets.push(p);
            }
            Item::Raw(bytes) => packets.push(bytes.clone()),
        }
    }
    let mut writes = Vec::new();
    let mut coalescer = Coalescer::new();
    let mut write = |w: &[u8]| writes.push(w.to_vec());
    for p in &packets {
        coalescer.push(p, &mut write);
    }
    coalescer.finish(&mut write);
    let mut out = Vec::new();
    for w in &mut writes {
        assert!(w.len() >= VNET_HDR_LEN && w.len() - VNET_HDR_LEN <= 65535 + 40);
        let before = out.len();
        // A write the kernel would refuse to split would be lost: none may be.
        split(w, None, &mut Vec::new(), |p| out.push(p.to_vec())).expect("every write splits");
        assert!(out.len() > before);
    }
    assert_eq!(out.len(), packets.len(), "as many packets out as in");
    for (a, b) in packets.iter().zip(&out) {
        if a != b {
            let (pa, sa) = tcp_payload_and_seq(a).expect("only TCP segments are rewritten");
            let (pb, sb) = tcp_payload_and_seq(b).expect("rewritten segments stay TCP");
            assert_eq!((pa, sa), (pb, sb));
        }
    }
});
