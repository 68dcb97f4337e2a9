//! Many UDP sockets on distinct loopback addresses, one epoll loop reading
//! them in batches (recvmmsg).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// The `i`th simulated source address: 127.10.0.1, 127.10.0.2, ... (every
/// 127/8 address is local on Linux). Distinct source IPs keep the
/// backbone's per-source registration rate limit per simulated "host".
pub fn source_ip(i: usize) -> Ipv4Addr {
    let i = i as u32 + 1;
    Ipv4Addr::new(127, 10 + (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

pub fn bind_sockets(count: usize) -> anyhow::Result<Vec<UdpSocket>> {
    raise_nofile(count as u64 + 256);
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let s = UdpSocket::bind(SocketAddrV4::new(source_ip(i), 0))
            .map_err(|e| anyhow::anyhow!("bind {}: {e}", source_ip(i)))?;
        s.set_nonblocking(true)?;
        set_buffers(&s, 4 << 20);
        out.push(s);
    }
    Ok(out)
}

fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn set_buffers(s: &UdpSocket, bytes: i32) {
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: setsockopt with a valid int.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &bytes as *const i32 as *const libc::c_void,
                std::mem::size_of::<i32>() as u32,
            );
        }
    }
}

/// Sends, waiting briefly while the socket buffer is full. Returns false
/// if the datagram could not be sent.
pub fn send(s: &UdpSocket, payload: &[u8], dst: SocketAddr) -> bool {
    for _ in 0..1000 {
        match s.send_to(payload, dst) {
            Ok(_) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_micros(50)),
            Err(_) => return false,
        }
    }
    false
}

pub struct Receiver {
    epfd: i32,
    fds: Vec<i32>,
    bufs: Vec<[u8; 9000]>,
    events: Vec<libc::epoll_event>,
}

const BATCH: usize = 64;

impl Receiver {
    pub fn new(sockets: &[UdpSocket]) -> anyhow::Result<Receiver> {
        // SAFETY: plain syscalls.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        anyhow::ensure!(epfd >= 0, "epoll_create1 failed");
        let mut fds = Vec::new();
        for (i, s) in sockets.iter().enumerate() {
            let fd = s.as_raw_fd();
            let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: i as u64 };
            // SAFETY: valid fds and event.
            let r = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
            anyhow::ensure!(r == 0, "epoll_ctl failed");
            fds.push(fd);
        }
        Ok(Receiver {
            epfd,
            fds,
            bufs: vec![[0u8; 9000]; BATCH],
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 256],
        })
    }

    /// Waits up to `timeout_ms` and hands every datagram that arrived to
    /// `f(socket index, payload)`.
    pub fn poll(&mut self, timeout_ms: i32, mut f: impl FnMut(usize, &[u8])) {
        // SAFETY: the events buffer is valid for its length.
        let n = unsafe { libc::epoll_wait(self.epfd, self.events.as_mut_ptr(), self.events.len() as i32, timeout_ms) };
        if n <= 0 {
            return;
        }
        let ready: Vec<usize> = self.events[..n as usize].iter().map(|e| e.u64 as usize).collect();
        for idx in ready {
            let fd = self.fds[idx];
            loop {
                let mut lens = [0usize; BATCH];
                let got = self.recv_batch(fd, &mut lens);
                for (b, len) in lens[..got].iter().enumerate() {
                    f(idx, &self.bufs[b][..*len]);
                }
                if got < BATCH {
                    break;
                }
            }
        }
    }

    fn recv_batch(&mut self, fd: i32, lens: &mut [usize; BATCH]) -> usize {
        let mut iovs: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec { iov_base: b.as_mut_ptr() as *mut libc::c_void, iov_len: b.len() })
            .collect();
        // SAFETY: zeroed mmsghdr is valid; pointers set below stay alive for the call.
        let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_iov = iov as *mut libc::iovec;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: msgs and the buffers they point to are valid for BATCH entries.
        let n = unsafe {
            libc::recvmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, libc::MSG_DONTWAIT, std::ptr::null_mut())
        };
        if n <= 0 {
            return 0;
        }
        for (i, m) in msgs[..n as usize].iter().enumerate() {
            lens[i] = m.msg_len as usize;
        }
        n as usize
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // SAFETY: our own epoll fd.
        unsafe { libc::close(self.epfd) };
    }
}
