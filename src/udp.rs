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

    pub fn try_send_to(&self, payload: &[u8], dst: SocketAddr) -> std::io::Result<usize> {
        let dst = match (self.dual_stack, dst) {
            (true, SocketAddr::V4(v4)) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
            _ => dst,
        };
        self.socket.try_send_to(payload, dst)
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
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
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
