//! The UDP socket: dual-stack where the host has IPv6, with IPv4-mapped
//! addresses normalised so the cores only ever see plain IPv4 or IPv6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use crate::cli_error::CliError;

pub struct MeshSocket {
    socket: UdpSocket,
    dual_stack: bool,
}

impl MeshSocket {
    /// Binds `ip:port`; for the unspecified address, `[::]` dual-stack first,
    /// falling back to `0.0.0.0` on hosts without IPv6.
    pub fn bind(ip: Option<IpAddr>, port: u16) -> anyhow::Result<MeshSocket> {
        let attempts: Vec<SocketAddr> = match ip {
            Some(ip) => vec![SocketAddr::new(ip, port)],
            None => vec![
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            ],
        };
        let mut last_error = None;
        for addr in attempts {
            match bind_one(addr) {
                Ok(socket) => {
                    let dual_stack = addr.is_ipv6() && ip.is_none();
                    return Ok(MeshSocket { socket: UdpSocket::from_std(socket.into())?, dual_stack });
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
        let dst = match (self.dual_stack, dst) {
            (true, SocketAddr::V4(v4)) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
            _ => dst,
        };
        self.socket.try_send_to(payload, dst)
    }

    /// Sends as many of `batch` as the socket takes in one `sendmmsg(2)`
    /// (without waiting) and returns how many went; `WouldBlock` when none
    /// did. Datagrams refused for other reasons count as sent (dropped), as
    /// a failed `send_to` of a connectionless socket would be.
    pub fn try_send_batch(&self, batch: &[(SocketAddr, &[u8])]) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        if batch.is_empty() {
            return Ok(0);
        }
        let addrs: Vec<socket2::SockAddr> = batch
            .iter()
            .map(|(dst, _)| match (self.dual_stack, dst) {
                (true, SocketAddr::V4(v4)) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
                _ => *dst,
            })
            .map(socket2::SockAddr::from)
            .collect();
        let mut iovs: Vec<libc::iovec> =
            batch.iter().map(|(_, p)| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() }).collect();
        let mut msgs: Vec<libc::mmsghdr> = addrs
            .iter()
            .zip(iovs.iter_mut())
            .map(|(addr, iov)| {
                // SAFETY: all-zero is a valid msghdr; the pointers below
                // outlive the sendmmsg call.
                let mut hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
                hdr.msg_hdr.msg_name = addr.as_ptr() as *mut libc::c_void;
                hdr.msg_hdr.msg_namelen = addr.len();
                hdr.msg_hdr.msg_iov = iov as *mut libc::iovec;
                hdr.msg_hdr.msg_iovlen = 1;
                hdr
            })
            .collect();
        let mut done = 0;
        while done < msgs.len() {
            // SAFETY: msgs[done..] are initialised mmsghdrs pointing at live buffers.
            let rc = unsafe {
                libc::sendmmsg(self.socket.as_raw_fd(), msgs[done..].as_mut_ptr(), (msgs.len() - done) as libc::c_uint, libc::MSG_DONTWAIT)
            };
            if rc > 0 {
                done += rc as usize;
                continue;
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => return if done > 0 { Ok(done) } else { Err(e) },
                std::io::ErrorKind::Interrupted => continue,
                _ => {
                    // The first datagram was refused (unreachable, too big):
                    // skip it like a failed send_to and go on.
                    tracing::trace!(dst = %batch[done].0, error = %e, "UDP send failed");
                    done += 1;
                }
            }
        }
        Ok(done)
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
}

fn bind_one(addr: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
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
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
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
/// up, not loopback, not link-local, not the mesh itself.
pub fn local_endpoints(port: u16, mesh_interface: &str) -> Vec<SocketAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return vec![] };
    let mut out = Vec::new();
    for ifa in addrs {
        if ifa.interface_name == mesh_interface
            || !ifa.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP)
            || ifa.flags.contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
        {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_addresses_are_normalised_to_ipv4() {
        let mapped: SocketAddr = "[::ffff:198.18.0.2]:51820".parse().unwrap();
        assert_eq!(normalise(mapped), "198.18.0.2:51820".parse::<SocketAddr>().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        assert_eq!(normalise(v6), v6);
    }
}
