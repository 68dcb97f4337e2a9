//! Creating the mesh TUN interface and giving it the node's IPv6 address.
//!
//! The tun crate cannot set IPv6 addresses on Linux (it configures through
//! an AF_INET socket), so the address goes on with the AF_INET6
//! `SIOCSIFADDR` ioctl. Duplicate address detection is switched off first:
//! the address is ours by construction, and a tentative address would
//! refuse traffic for a second.

use std::net::Ipv6Addr;
use std::path::Path;

use anyhow::Context;

use crate::cli_error::CliError;

/// `struct in6_ifreq` from `<linux/ipv6.h>`.
#[repr(C)]
struct In6Ifreq {
    addr: libc::in6_addr,
    prefixlen: u32,
    ifindex: libc::c_int,
}

nix::ioctl_write_ptr_bad!(set_ipv6_address, libc::SIOCSIFADDR, In6Ifreq);

/// `struct in6_rtmsg` from `<linux/ipv6_route.h>` (libc's has private fields).
#[repr(C)]
struct In6Rtmsg {
    dst: libc::in6_addr,
    src: libc::in6_addr,
    gateway: libc::in6_addr,
    rtmsg_type: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

nix::ioctl_write_ptr_bad!(add_ipv6_route, libc::SIOCADDRT, In6Rtmsg);

nix::ioctl_write_int!(tun_set_offload, b'T', 208);
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;

/// The mesh TUN. Every read and write carries a virtio-net header
/// (`IFF_VNET_HDR`, see [`meshtun_overlay::offload`]); with `offload` the
/// kernel may also hand over TCP super-packets to split.
pub struct MeshTun {
    /// Non-blocking; the packet engine waits on it with epoll(7).
    pub device: tun::Device,
    pub offload: bool,
}

/// Creates the TUN interface `name`, up, with `address/prefix_len`; with
/// `offload`, asks the kernel for checksum and TCP segmentation offload.
pub fn create(name: &str, mtu: u16, address: Ipv6Addr, prefix_len: u8, ipv4: std::net::Ipv4Addr, offload: bool) -> anyhow::Result<MeshTun> {
    if !Path::new("/dev/net/tun").exists() {
        return Err(CliError::new("no_tun", "/dev/net/tun does not exist: this kernel or container has no TUN device")
            .hint("load the module (modprobe tun) or, in a container, pass the device through (docker run --device /dev/net/tun --cap-add NET_ADMIN)")
            .into());
    }
    if nix::net::if_::if_nametoindex(name).is_ok() {
        return Err(CliError::new("interface_busy", format!("network interface {name} already exists"))
            .hint(format!("is another meshtun running? Stop it (meshtun down) or choose another name with --interface; `ip link show {name}` shows who has it"))
            .into());
    }
    let mut config = tun::Configuration::default();
    // The tun crate brings the link up and sets the MTU (AF_INET ioctls
    // that work for any interface); the IPv6 address is ours to add.
    // The IPv4 address goes on the same way: 100.64.0.0/10 routes to the mesh.
    let netmask = std::net::Ipv4Addr::from(u32::MAX << (32 - u32::from(meshtun_addr::IPV4_PREFIX_LEN)));
    config.tun_name(name).mtu(mtu).address(ipv4).netmask(netmask).up();
    config.platform_config(|c| {
        c.vnet_hdr(true);
    });
    let device = tun::create(&config).map_err(|e| tun_error(e, name))?;
    device.set_nonblock().with_context(|| format!("cannot make {name} non-blocking"))?;
    let offload = offload && {
        use std::os::fd::AsRawFd;
        let raw: &tun::Device = &device;
        // SAFETY: a TUN fd and a flags argument passed by value.
        match unsafe { tun_set_offload(raw.as_raw_fd(), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) } {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "this kernel refused TUN segmentation offload; moving one packet per system call");
                false
            }
        }
    };

    let sysctl = |key: &str, value: &str| {
        let path = format!("/proc/sys/net/ipv6/conf/{name}/{key}");
        std::fs::write(&path, value).with_context(|| format!("cannot write {path}"))
    };
    sysctl("disable_ipv6", "0")?;
    sysctl("accept_dad", "0")?;
    // The engine drops router solicitations anyway; do not send them.
    let _ = sysctl("router_solicitations", "0");

    let ifindex = nix::net::if_::if_nametoindex(name)
        .with_context(|| format!("interface {name} vanished right after creation"))?;
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet6,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("cannot open an IPv6 socket to configure the interface (is IPv6 disabled on this host?)")?;
    let request = In6Ifreq {
        addr: libc::in6_addr { s6_addr: address.octets() },
        prefixlen: u32::from(prefix_len),
        ifindex: ifindex as libc::c_int,
    };
    use std::os::fd::AsRawFd;
    // SAFETY: the request is a valid in6_ifreq that outlives the call.
    unsafe { set_ipv6_address(socket.as_raw_fd(), &request) }
        .with_context(|| format!("cannot add {address}/{prefix_len} to {name}"))?;
    // Group multicast (ff15:4d54::/32) goes to the mesh, where the engine
    // fans it out to the group's members.
    let zero = libc::in6_addr { s6_addr: [0; 16] };
    let route = In6Rtmsg {
        dst: libc::in6_addr { s6_addr: meshtun_addr::GROUP_PREFIX.octets() },
        src: zero,
        gateway: zero,
        rtmsg_type: 0,
        dst_len: u16::from(meshtun_addr::GROUP_PREFIX_LEN),
        src_len: 0,
        metric: 256,
        info: 0,
        flags: libc::RTF_UP as u32,
        ifindex: ifindex as libc::c_int,
    };
    // SAFETY: a valid in6_rtmsg that outlives the call.
    unsafe { add_ipv6_route(socket.as_raw_fd(), &route) }
        .with_context(|| format!("cannot route group multicast {}/{} to {name}", meshtun_addr::GROUP_PREFIX, meshtun_addr::GROUP_PREFIX_LEN))?;
    Ok(MeshTun { device, offload })
}

fn tun_error(e: tun::Error, name: &str) -> anyhow::Error {
    let text = e.to_string();
    let denied = matches!(&e, tun::Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied)
        || text.contains("Operation not permitted")
        || text.contains("Permission denied");
    if denied {
        CliError::new("not_root", format!("not allowed to create the TUN interface {name}: {text}"))
            .hint("run as root (sudo meshtun up ...) or grant the binary CAP_NET_ADMIN (setcap cap_net_admin+ep $(command -v meshtun))")
            .into()
    } else if text.contains("busy") || text.contains("exists") {
        CliError::new("interface_busy", format!("cannot create {name}: {text}"))
            .hint("choose another name with --interface")
            .into()
    } else {
        CliError::new("no_tun", format!("cannot create the TUN interface {name}: {text}"))
            .hint("check that /dev/net/tun is usable and the name is a valid interface name (at most 15 characters)")
            .into()
    }
}
