//! The UDP socket: dual-stack where the host has IPv6, with IPv4-mapped
//! addresses normalised so the cores only ever see plain IPv4 or IPv6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use crate::cli_error::CliError;

pub struct MeshSocket<S = UdpSocket> {
    socket: S,
    dual_stack: bool,
    /// Connected to this peer: sends and receives carry no address (the
    /// kernel keeps the route and skips the per-datagram lookups and hooks).
    peer: Option<SocketAddr>,
    /// Send runs of equal-sized datagrams to one destination as one
    /// `UDP_SEGMENT` message (switched off for good if the kernel refuses).
    gso: AtomicBool,
}

/// One receive: with GRO on, several datagrams from one sender, each
/// `segment` bytes except perhaps the last.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    pub len: usize,
    pub from: SocketAddr,
    pub segment: usize,
}

impl Received {
    /// The datagrams of this receive in `buf`.
    pub fn datagrams<'a>(&self, buf: &'a [u8]) -> std::slice::Chunks<'a, u8> {
        buf[..self.len].chunks(self.segment.max(1))
    }
}

/// The socket as the packet engine's thread owns it: non-blocking, outside
/// any reactor, waited on with epoll(7) by its owner.
pub type EngineSocket = MeshSocket<std::net::UdpSocket>;

/// What one `sendmmsg` is built in, kept per thread so a send allocates
/// nothing once the vectors have grown.
#[derive(Default)]
struct SendScratch {
    runs: Vec<std::ops::Range<usize>>,
    addrs: Vec<socket2::SockAddr>,
    iovs: Vec<libc::iovec>,
    controls: Vec<[u64; 4]>,
    msgs: Vec<libc::mmsghdr>,
}

thread_local! {
    static SEND_SCRATCH: std::cell::RefCell<SendScratch> = std::cell::RefCell::new(SendScratch::default());
}

/// What one [`MeshSocket::send_batch`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    /// Datagrams that went (or were refused and dropped).
    pub datagrams: usize,
    /// A destination that refused a run of datagrams as larger than its
    /// path MTU (they went fragmented), and their size: see [`path_mtu`].
    pub too_big: Option<(SocketAddr, usize)>,
}

/// The path MTU the kernel holds for `dst`: what ICMP taught it, else the
/// outgoing link's MTU. Asked through a socket connected to `dst`
/// (`IP_MTU`/`IPV6_MTU`); nothing is sent.
pub fn path_mtu(dst: SocketAddr) -> std::io::Result<usize> {
    let dst = normalise(dst);
    let socket = socket2::Socket::new(socket2::Domain::for_address(dst), socket2::Type::DGRAM, None)?;
    socket.connect(&dst.into())?;
    let (level, option) = if dst.is_ipv4() { (libc::IPPROTO_IP, libc::IP_MTU) } else { (libc::IPPROTO_IPV6, libc::IPV6_MTU) };
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket and a c_int-sized buffer with its length.
    let rc = unsafe { libc::getsockopt(socket.as_raw_fd(), level, option, (&mut mtu as *mut libc::c_int).cast(), &mut len) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    usize::try_from(mtu).map_err(|_| std::io::Error::other(format!("negative path MTU {mtu}")))
}

/// Whether `datagram` is larger than the path to its destination carries
/// whole, by the kernel's path MTU for it.
fn exceeds_path_mtu<D: Outgoing>(datagram: &D) -> bool {
    let dst = datagram.dst();
    path_mtu(dst).is_ok_and(|mtu| meshtun_overlay::path_mtu::udp_ip_header_len(dst) + datagram.bytes().len() > mtu)
}

/// A datagram to send: where to and its bytes.
pub trait Outgoing {
    fn dst(&self) -> SocketAddr;
    fn bytes(&self) -> &[u8];
}

impl Outgoing for (SocketAddr, &[u8]) {
    fn dst(&self) -> SocketAddr {
        self.0
    }
    fn bytes(&self) -> &[u8] {
        self.1
    }
}

/// Most segments the kernel takes in one `UDP_SEGMENT` send (UDP_MAX_SEGMENTS).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes in one `UDP_SEGMENT` send: one IP datagram's worth.
const GSO_MAX_BYTES: usize = 65000;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

impl MeshSocket<UdpSocket> {
    /// Binds `ip:port`; for the unspecified address, `[::]` dual-stack first,
    /// falling back to `0.0.0.0` on hosts without IPv6.
    pub fn bind(ip: Option<IpAddr>, port: u16) -> anyhow::Result<MeshSocket> {
        Self::bind_with(ip, port, false)
    }

    /// [`MeshSocket::bind`] with `SO_REUSEPORT`, so the engine can open
    /// sockets connected to busy peers on the same port. A plain bind
    /// first proves nothing else holds the port: with `SO_REUSEPORT` alone
    /// a second daemon of the same user would share it without a word.
    /// Says whether it got `SO_REUSEPORT` (else it is a plain bind).
    pub fn bind_shared(port: u16) -> anyhow::Result<(MeshSocket, bool)> {
        let probe = Self::bind(None, port)?;
        let port = probe.local_port();
        drop(probe);
        match Self::bind_with(None, port, true) {
            Ok(socket) => Ok((socket, true)),
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "no SO_REUSEPORT; every peer shares the node's socket");
                Ok((Self::bind(None, port)?, false))
            }
        }
    }

    fn bind_with(ip: Option<IpAddr>, port: u16, reuse_port: bool) -> anyhow::Result<MeshSocket> {
        let attempts: Vec<SocketAddr> = match ip {
            Some(ip) => vec![SocketAddr::new(ip, port)],
            None => vec![
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            ],
        };
        let mut last_error = None;
        for addr in attempts {
            match bind_one(addr, reuse_port) {
                Ok(socket) => {
                    let dual_stack = addr.is_ipv6() && ip.is_none();
                    return Ok(MeshSocket { socket: UdpSocket::from_std(socket.into())?, dual_stack, peer: None, gso: AtomicBool::new(false) });
                }
                // Taken is taken in either family: say so, rather than
                // what the IPv4 fallback then reports.
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    last_error = Some((addr, e));
                    break;
                }
                Err(e) => last_error = Some((addr, e)),
            }
        }
        let (addr, e) = last_error.ok_or_else(|| anyhow::anyhow!("no address to bind"))?;
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            "another process uses this UDP port: stop it or choose another with --listen-port"
        } else {
            "check the address belongs to this host"
        };
        Err(CliError::new("port_busy", format!("cannot bind UDP {addr}: {e}")).hint(hint).into())
    }

    pub fn local_port(&self) -> u16 {
        self.socket.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub async fn recv_from(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        let (n, from) = self.socket.recv_from(buf).await?;
        Ok((n, normalise(from)))
    }

    /// A non-blocking receive: `WouldBlock` when nothing is queued.
    pub fn try_recv_from(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        let (n, from) = self.socket.try_recv_from(buf)?;
        Ok((n, normalise(from)))
    }

    pub fn try_send_to(&self, payload: &[u8], dst: SocketAddr) -> std::io::Result<usize> {
        self.socket.try_send_to(payload, self.outbound(dst))
    }

    pub async fn send_to(&self, payload: &[u8], dst: SocketAddr) -> std::io::Result<usize> {
        loop {
            self.socket.writable().await?;
            match self.try_send_to(payload, dst) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    /// Hands the socket to the packet engine's thread: out of tokio's
    /// reactor, so its readiness wakes nobody but the engine.
    pub fn into_engine(self) -> std::io::Result<EngineSocket> {
        Ok(MeshSocket { socket: self.socket.into_std()?, dual_stack: self.dual_stack, peer: None, gso: AtomicBool::new(self.gso.into_inner()) })
    }
}

impl<S: AsRawFd> MeshSocket<S> {
    /// Where a datagram for `dst` is addressed on this socket (IPv4-mapped
    /// on a dual-stack one).
    fn outbound(&self, dst: SocketAddr) -> SocketAddr {
        match (self.dual_stack, dst) {
            (true, SocketAddr::V4(v4)) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
            _ => dst,
        }
    }

    /// Turns on UDP GRO for receiving and GSO for sending. Returns whether
    /// the kernel took GRO; receivers then read with [`EngineSocket::recv_now`].
    pub fn enable_offloads(&self) -> bool {
        self.gso.store(true, Ordering::Relaxed);
        setsockopt_int(&self.socket, libc::SOL_UDP, UDP_GRO, 1).is_ok()
    }

}

impl AsFd for EngineSocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl EngineSocket {
    /// A socket on this one's port connected to `dst`: the kernel hands it
    /// what `dst` sends (a connected socket outranks the unconnected one in
    /// the `SO_REUSEPORT` group) and it sends to `dst` without a route
    /// lookup per datagram. Needs `self` from [`MeshSocket::bind_shared`].
    pub fn connected_to(&self, dst: SocketAddr, gro: bool) -> std::io::Result<EngineSocket> {
        let local = self.socket.local_addr()?;
        // An IPv4 peer gets an IPv4 socket even beside a dual-stack one:
        // the IPv6 layer's wrapping of IPv4 is one more cost per datagram.
        let (local, dual_stack) = match (local, dst) {
            (SocketAddr::V6(_), SocketAddr::V4(_)) => (SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), local.port()), false),
            _ => (local, self.dual_stack),
        };
        let socket = bind_one(local, true)?;
        let connected: EngineSocket = MeshSocket { socket: socket.into(), dual_stack, peer: Some(normalise(dst)), gso: AtomicBool::new(self.gso.load(Ordering::Relaxed)) };
        connected.socket.connect(connected.outbound(dst))?;
        if gro {
            setsockopt_int(&connected.socket, libc::SOL_UDP, UDP_GRO, 1)?;
        }
        Ok(connected)
    }

    /// One receive without waiting: `WouldBlock` when nothing is queued.
    pub fn recv_now(&self, buf: &mut [u8]) -> std::io::Result<Received> {
        // SAFETY: all-zero is a valid sockaddr_storage and msghdr.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut control = [0u64; 8];
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        if self.peer.is_none() {
            msg.msg_name = (&mut storage as *mut libc::sockaddr_storage).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        }
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: msg points at live buffers for the duration of the call.
        let rc = unsafe { libc::recvmsg(self.socket.as_raw_fd(), &mut msg, 0) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let len = rc as usize;
        let mut segment = len;
        // SAFETY: the kernel filled msg_control; CMSG_* walk it within msg_controllen.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                    let size = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                    if size > 0 {
                        segment = size as usize;
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        let from = match self.peer {
            Some(peer) => peer,
            None => normalise(socket_addr(&storage).ok_or_else(|| std::io::Error::other("datagram from a non-IP address"))?),
        };
        Ok(Received { len, from, segment })
    }

    /// Sends as many of `batch` as the socket takes in one `sendmmsg(2)`
    /// (without waiting) and says how many went; `WouldBlock` when none
    /// did. Datagrams refused for other reasons count as sent (dropped), as
    /// a failed `send_to` of a connectionless socket would be.
    pub fn send_batch<D: Outgoing>(&self, batch: &[D]) -> std::io::Result<Sent> {
        match batch {
            [] => return Ok(Sent { datagrams: 0, too_big: None }),
            // The common case of request-response traffic: one send(2) or
            // sendto(2), without building a message vector.
            [one] => return self.send_one(one).map(|datagrams| Sent { datagrams, too_big: None }),
            _ => {}
        }
        SEND_SCRATCH.with_borrow_mut(|scratch| self.send_batch_with(batch, scratch))
    }

    fn send_one<D: Outgoing>(&self, datagram: &D) -> std::io::Result<usize> {
        let bytes = datagram.bytes();
        loop {
            let rc = match self.peer {
                // SAFETY: bytes is valid for reads for the call.
                Some(_) => unsafe { libc::send(self.socket.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT) },
                None => {
                    let addr = socket2::SockAddr::from(self.outbound(datagram.dst()));
                    // SAFETY: bytes and addr are valid for reads for the call.
                    unsafe { libc::sendto(self.socket.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT, addr.as_ptr().cast(), addr.len()) }
                }
            };
            if rc >= 0 {
                return Ok(1);
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => return Err(e),
                std::io::ErrorKind::Interrupted => continue,
                _ => {
                    // Refused (unreachable, too big): dropped, as sendmmsg's
                    // path skips a refused datagram.
                    tracing::trace!(dst = %datagram.dst(), error = %e, "UDP send failed");
                    return Ok(1);
                }
            }
        }
    }

    // Out of line: a lone datagram (request-response traffic) never comes
    // here, and the functions on its path stay smaller.
    #[inline(never)]
    fn send_batch_with<D: Outgoing>(&self, batch: &[D], scratch: &mut SendScratch) -> std::io::Result<Sent> {
        let SendScratch { runs, addrs, iovs, controls, msgs } = scratch;
        let gso = self.gso.load(Ordering::Relaxed);
        // Runs of datagrams to one destination, all of the first one's size
        // except perhaps a shorter last: each run goes as one message.
        runs.clear();
        let mut i = 0;
        while i < batch.len() {
            let (dst, first) = (batch[i].dst(), batch[i].bytes());
            let mut end = i + 1;
            let mut bytes = first.len();
            while gso
                && end < batch.len()
                && end - i < GSO_MAX_SEGMENTS
                && batch[end].dst() == dst
                && batch[end].bytes().len() <= first.len()
                && batch[end - 1].bytes().len() == first.len()
                && bytes + batch[end].bytes().len() <= GSO_MAX_BYTES
            {
                bytes += batch[end].bytes().len();
                end += 1;
            }
            runs.push(i..end);
            i = end;
        }
        // A connected socket sends without addresses.
        addrs.clear();
        if self.peer.is_none() {
            addrs.extend(runs.iter().map(|run| socket2::SockAddr::from(self.outbound(batch[run.start].dst()))));
        }
        iovs.clear();
        iovs.extend(batch.iter().map(|d| libc::iovec { iov_base: d.bytes().as_ptr() as *mut libc::c_void, iov_len: d.bytes().len() }));
        // One cmsg (UDP_SEGMENT, u16) per run; u64s keep it aligned.
        controls.clear();
        controls.resize(runs.len(), [0; 4]);
        msgs.clear();
        for (k, (run, control)) in runs.iter().zip(controls.iter_mut()).enumerate() {
            // SAFETY: all-zero is a valid mmsghdr; the pointers below
            // outlive the sendmmsg call.
            let mut hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
            if let Some(addr) = addrs.get(k) {
                hdr.msg_hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
                hdr.msg_hdr.msg_namelen = addr.len();
            }
            hdr.msg_hdr.msg_iov = iovs[run.start..].as_mut_ptr();
            hdr.msg_hdr.msg_iovlen = run.len();
            if run.len() > 1 {
                let segment = batch[run.start].bytes().len() as u16;
                // SAFETY: control has room for CMSG_SPACE(2) bytes (24 <= 32).
                unsafe {
                    hdr.msg_hdr.msg_control = control.as_mut_ptr().cast();
                    hdr.msg_hdr.msg_controllen = libc::CMSG_SPACE(2) as usize;
                    let cmsg = libc::CMSG_FIRSTHDR(&hdr.msg_hdr);
                    (*cmsg).cmsg_level = libc::SOL_UDP;
                    (*cmsg).cmsg_type = UDP_SEGMENT;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(2) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
                }
            }
            msgs.push(hdr);
        }
        let mut done = 0;
        let mut sent_datagrams = 0;
        let mut too_big = None;
        while done < msgs.len() {
            // SAFETY: msgs[done..] are initialised mmsghdrs pointing at live buffers.
            let rc = unsafe {
                libc::sendmmsg(self.socket.as_raw_fd(), msgs[done..].as_mut_ptr(), (msgs.len() - done) as libc::c_uint, libc::MSG_DONTWAIT)
            };
            if rc > 0 {
                for run in &runs[done..done + rc as usize] {
                    sent_datagrams += run.len();
                }
                done += rc as usize;
                continue;
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => return if sent_datagrams > 0 { Ok(Sent { datagrams: sent_datagrams, too_big }) } else { Err(e) },
                std::io::ErrorKind::Interrupted => continue,
                // Older kernels say EINVAL where newer ones say EMSGSIZE
                // (and EINVAL for other refusals): the path MTU tells.
                _ if runs[done].len() > 1
                    && (e.raw_os_error() == Some(libc::EMSGSIZE)
                        || (e.raw_os_error() == Some(libc::EINVAL) && exceeds_path_mtu(&batch[runs[done].start]))) =>
                {
                    // The run's segments exceed the path MTU the kernel
                    // knows for its destination (a smaller link on the
                    // way, learnt from ICMP): it will not segment them,
                    // but it fragments single datagrams. So the run becomes
                    // one message per datagram, sent by the same loop;
                    // other destinations keep their GSO. The caller hears
                    // of it, to size packets for that path from now on.
                    let first = &batch[runs[done].start];
                    too_big = Some((first.dst(), first.bytes().len()));
                    let run = runs[done].clone();
                    let mut single = msgs[done];
                    single.msg_hdr.msg_control = std::ptr::null_mut();
                    single.msg_hdr.msg_controllen = 0;
                    single.msg_hdr.msg_iovlen = 1;
                    let singles = run.clone().map(|i| libc::mmsghdr { msg_hdr: libc::msghdr { msg_iov: iovs[i..].as_mut_ptr(), ..single.msg_hdr }, ..single });
                    msgs.splice(done..=done, singles);
                    runs.splice(done..=done, run.map(|i| i..i + 1));
                }
                _ if runs[done].len() > 1
                    && matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOPROTOOPT)) =>
                {
                    // The kernel or device will not segment for us: send
                    // one by one from now on (the caller sends the rest).
                    tracing::debug!(error = %e, "UDP segmentation offload refused; sending datagrams one by one");
                    self.gso.store(false, Ordering::Relaxed);
                    return Ok(Sent { datagrams: sent_datagrams, too_big });
                }
                _ => {
                    // The first datagram was refused (unreachable, too big):
                    // skip it like a failed send_to and go on.
                    tracing::trace!(dst = %batch[runs[done].start].dst(), error = %e, "UDP send failed");
                    sent_datagrams += runs[done].len();
                    done += 1;
                }
            }
        }
        Ok(Sent { datagrams: sent_datagrams, too_big })
    }

    /// Waits up to `timeout` for room in the send buffer; whether there is.
    pub fn wait_writable(&self, timeout: std::time::Duration) -> bool {
        wait_writable(self.socket.as_raw_fd(), timeout)
    }
}

/// poll(2) for POLLOUT on `fd`, at most `timeout`: the engine's one
/// blocking wait besides epoll, for a full socket or TUN queue.
pub fn wait_writable(fd: std::os::fd::RawFd, timeout: std::time::Duration) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    rc > 0 && pfd.revents & libc::POLLOUT != 0
}

fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::new(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn bind_one(addr: SocketAddr, reuse_port: bool) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    // Bursts of tunnel traffic overflow the default 208 KiB buffers.
    // As root, go past net.core.{r,w}mem_max (often 208 KiB) with the
    // *FORCE options; otherwise take what the limits allow.
    force_buffer(&socket, libc::SO_RCVBUFFORCE, 4 << 20).or_else(|_| socket.set_recv_buffer_size(4 << 20)).ok();
    force_buffer(&socket, libc::SO_SNDBUFFORCE, 4 << 20).or_else(|_| socket.set_send_buffer_size(4 << 20)).ok();
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn force_buffer(socket: &Socket, option: libc::c_int, bytes: libc::c_int) -> std::io::Result<()> {
    setsockopt_int(socket, libc::SOL_SOCKET, option, bytes)
}

fn setsockopt_int(socket: &impl AsRawFd, level: libc::c_int, option: libc::c_int, bytes: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

pub fn normalise(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Addresses of this host's interfaces where peers might reach us directly:
/// up, not loopback, not link-local, not the mesh itself, and not on a
/// point-to-point interface. The last rule keeps meshtun from running over
/// another VPN (a WireGuard or TUN device, including a second meshtun): such
/// a path often answers probes faster than the real network but has a
/// smaller MTU, so full-size packets vanish in it. A public address on a
/// PPP link is still learned through STUN as the reflexive endpoint.
pub fn local_endpoints(port: u16, mesh_interface: &str) -> Vec<SocketAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return vec![] };
    let mut out = Vec::new();
    for ifa in addrs {
        if ifa.interface_name == mesh_interface || !advertisable_interface(ifa.flags) {
            continue;
        }
        let Some(address) = ifa.address else { continue };
        let ip = if let Some(v4) = address.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = address.as_sockaddr_in6() {
            let ip = v6.ip();
            let link_local = (ip.segments()[0] & 0xffc0) == 0xfe80;
            let mesh = meshtun_addr::MeshAddr::from_ipv6(ip).is_ok();
            if link_local || mesh {
                continue;
            }
            IpAddr::V6(ip)
        } else {
            continue;
        };
        let endpoint = SocketAddr::new(ip, port);
        if !out.contains(&endpoint) {
            out.push(endpoint);
        }
    }
    // IPv4 first: most underlays and NATs are IPv4.
    out.sort_by_key(|a| a.is_ipv6());
    out
}

fn advertisable_interface(flags: nix::net::if_::InterfaceFlags) -> bool {
    use nix::net::if_::InterfaceFlags as F;
    flags.contains(F::IFF_UP) && !flags.intersects(F::IFF_LOOPBACK | F::IFF_POINTOPOINT)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two engine sockets on `ip` with offloads on: (sender, its address,
    /// receiver, its address).
    fn socket_pair(ip: IpAddr) -> (EngineSocket, SocketAddr, EngineSocket, SocketAddr) {
        let sender = MeshSocket::bind(Some(ip), 0).unwrap();
        let receiver = MeshSocket::bind(Some(ip), 0).unwrap();
        sender.enable_offloads();
        receiver.enable_offloads();
        let (from, to) = (SocketAddr::new(ip, sender.local_port()), SocketAddr::new(ip, receiver.local_port()));
        (sender.into_engine().unwrap(), from, receiver.into_engine().unwrap(), to)
    }

    /// Receives until `count` datagrams came, all from `from`.
    fn receive(receiver: &EngineSocket, from: SocketAddr, count: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while got.len() < count {
            let r = wait_for(receiver, &mut buf);
            assert_eq!(r.from.port(), from.port());
            got.extend(r.datagrams(&buf).map(<[u8]>::to_vec));
        }
        got
    }

    #[tokio::test]
    async fn batches_sent_with_segmentation_arrive_as_the_same_datagrams_in_order() {
        let (sender, elsewhere, receiver, to) = socket_pair(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let datagrams: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; if i == 39 { 300 } else { 1452 }]).collect();
        let mut batch: Vec<(SocketAddr, &[u8])> = datagrams.iter().map(|d| (to, d.as_slice())).collect();
        batch.insert(10, (elsewhere, b"to someone else"));
        assert_eq!(sender.send_batch(&batch).unwrap(), Sent { datagrams: batch.len(), too_big: None });
        assert_eq!(receive(&receiver, elsewhere, datagrams.len()), datagrams);
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_path_mtu_goes_one_by_one_and_arrives_whole() {
        let (sender, from, receiver, to) = socket_pair(IpAddr::V6(Ipv6Addr::LOCALHOST));
        // IPV6_MTU caps the socket's path MTU: as if ICMP had reported a
        // 1280-byte link on the way. A GSO send of larger segments is then
        // refused (EMSGSIZE) while single datagrams are fragmented.
        setsockopt_int(&sender.socket, libc::IPPROTO_IPV6, libc::IPV6_MTU, 1280).unwrap();
        let datagrams: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 1452]).collect();
        let batch: Vec<(SocketAddr, &[u8])> = datagrams.iter().map(|d| (to, d.as_slice())).collect();
        let mut sent = 0;
        let mut refused = None;
        while sent < batch.len() {
            let went = sender.send_batch(&batch[sent..]).unwrap();
            sent += went.datagrams;
            refused = refused.or(went.too_big);
        }
        assert_eq!(receive(&receiver, from, datagrams.len()), datagrams);
        assert_eq!(refused, Some((to, 1452)), "the caller hears which path was too narrow for what");
        // Segmentation stays on for the paths that can take it.
        assert!(sender.gso.load(Ordering::Relaxed));
    }

    #[test]
    fn the_path_mtu_is_the_outgoing_links_until_icmp_says_less() {
        // Loopback's MTU is 65536; an IPv4-mapped address is asked as IPv4.
        let lo = path_mtu("127.0.0.1:9".parse().unwrap()).unwrap();
        assert!(lo >= 1500, "loopback path MTU {lo}");
        assert_eq!(path_mtu("[::ffff:127.0.0.1]:9".parse().unwrap()).unwrap(), lo);
        assert!(path_mtu("[::1]:9".parse().unwrap()).unwrap() >= 1280);
    }

    #[test]
    fn a_datagram_exceeds_the_path_mtu_only_with_its_headers_past_it() {
        let dst: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let lo = path_mtu(dst).unwrap();
        let fits = vec![0u8; lo - 28];
        let too_big = vec![0u8; lo - 27];
        assert!(!exceeds_path_mtu(&(dst, &fits[..])));
        assert!(exceeds_path_mtu(&(dst, &too_big[..])));
    }

    #[tokio::test]
    async fn a_socket_connected_to_a_peer_shares_the_port_and_takes_that_peers_datagrams() {
        let (node, shared) = MeshSocket::bind_shared(0).unwrap();
        assert!(shared);
        let node_port = node.local_port();
        let node = node.into_engine().unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let connected = node.connected_to(peer.local_addr().unwrap(), false).unwrap();

        let to_node = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), node_port);
        peer.send_to(b"from the peer", to_node).unwrap();
        stranger.send_to(b"from someone else", to_node).unwrap();
        let mut buf = [0u8; 64];
        let got = wait_for(&connected, &mut buf);
        assert_eq!((&buf[..got.len], got.from), (&b"from the peer"[..], peer.local_addr().unwrap()));
        let got = wait_for(&node, &mut buf);
        assert_eq!((&buf[..got.len], got.from), (&b"from someone else"[..], stranger.local_addr().unwrap()));

        // Sent without an address, from the node's port.
        let dst = peer.local_addr().unwrap();
        assert_eq!(connected.send_batch(&[(dst, &b"to the peer"[..])]).unwrap().datagrams, 1);
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from.port()), (&b"to the peer"[..], node_port));
        // And a lone datagram from the node's own socket, addressed.
        assert_eq!(node.send_batch(&[(dst, &b"from the node's socket"[..])]).unwrap().datagrams, 1);
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from.port()), (&b"from the node's socket"[..], node_port));
    }

    fn wait_for(socket: &EngineSocket, buf: &mut [u8]) -> Received {
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match socket.recv_now(buf) {
                Ok(r) => return r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < give_up => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("receive failed: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn a_shared_bind_still_refuses_a_port_another_socket_holds() {
        let (first, _) = MeshSocket::bind_shared(0).unwrap();
        let err = MeshSocket::bind_shared(first.local_port()).err().expect("the second bind must fail");
        assert!(format!("{err:#}").contains("in use"), "{err:#}");
    }

    #[test]
    fn tunnels_and_loopback_are_not_advertised_but_ethernet_is() {
        use nix::net::if_::InterfaceFlags as F;
        assert!(advertisable_interface(F::IFF_UP | F::IFF_BROADCAST | F::IFF_RUNNING | F::IFF_MULTICAST));
        assert!(!advertisable_interface(F::IFF_BROADCAST | F::IFF_MULTICAST), "down");
        assert!(!advertisable_interface(F::IFF_UP | F::IFF_LOOPBACK | F::IFF_RUNNING));
        // What a TUN or WireGuard device reports.
        assert!(!advertisable_interface(F::IFF_UP | F::IFF_POINTOPOINT | F::IFF_NOARP | F::IFF_RUNNING | F::IFF_MULTICAST));
    }

    #[test]
    fn ipv4_mapped_addresses_are_normalised_to_ipv4() {
        let mapped: SocketAddr = "[::ffff:198.18.0.2]:51820".parse().unwrap();
        assert_eq!(normalise(mapped), "198.18.0.2:51820".parse::<SocketAddr>().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        assert_eq!(normalise(v6), v6);
    }
}
