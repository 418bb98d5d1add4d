//! Instruments for control-plane timings, all clocked with one `Instant` in one process:
//! - [`SynSniffer`] records when SYNs arrive at a backend host (an `AF_PACKET` socket in its
//!   namespace, so it sees them whether or not anything listens);
//! - [`Acceptor`] is a backend service that can be killed and revived at a known instant;
//! - [`SynSpray`] starts a non-blocking connection attempt every interval, so the first
//!   SYN a path lets through is sent within one interval of the path opening.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use orch_tests::netns::Netns;
use socket2::{Domain, Protocol, Socket, Type};

/// A SYN seen arriving at a backend host.
#[derive(Clone, Copy, Debug)]
pub struct Syn {
    pub at: Instant,
    pub dst_port: u16,
    /// Source port and initial sequence number: a retransmitted SYN repeats both.
    pub attempt: (u16, u32),
}

/// Records the connection-opening SYNs (SYN without ACK) arriving in a namespace from the
/// sources it is told to watch.
pub struct SynSniffer {
    seen: Arc<Mutex<Vec<Syn>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SynSniffer {
    pub fn start(
        ns: &Netns,
        watch: impl Fn(Ipv4Addr) -> bool + Send + 'static,
    ) -> anyhow::Result<SynSniffer> {
        let fd = ns.run(packet_socket)??;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            thread::Builder::new()
                .name("syn-sniffer".into())
                .spawn(move || sniff(&fd, &seen, &stop, watch))?
        };
        Ok(SynSniffer {
            seen,
            stop,
            thread: Some(thread),
        })
    }

    /// When new connections to `port` first reached the host, at or after `since`: one
    /// time per connection attempt (retransmissions of a SYN seen before are left out).
    pub fn syns(&self, port: u16, since: Instant) -> Vec<Instant> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut first = std::collections::HashMap::new();
        for s in seen.iter().filter(|s| s.dst_port == port) {
            first.entry(s.attempt).or_insert(s.at);
        }
        first.into_values().filter(|at| *at >= since).collect()
    }

    /// Forgets what was recorded (between trials, to keep lookups short).
    pub fn clear(&self) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl Drop for SynSniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An `AF_PACKET` datagram socket for IPv4 on every interface of the calling thread's
/// namespace, with a 20 ms receive timeout so its loop can notice `stop`.
fn packet_socket() -> io::Result<OwnedFd> {
    let proto = (libc::ETH_P_IP as u16).to_be() as i32;
    // SAFETY: plain socket creation; the fd is owned at once.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, proto) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    orch_tests::lab::set_recv_timeout(&fd, Duration::from_millis(20))?;
    Ok(fd)
}

fn sniff(
    fd: &OwnedFd,
    seen: &Mutex<Vec<Syn>>,
    stop: &AtomicBool,
    watch: impl Fn(Ipv4Addr) -> bool,
) {
    let mut buf = [0u8; 128];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut from: libc::sockaddr_ll = unsafe { zeroed() };
        let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: buffers of the sizes we pass; MSG_TRUNC only reports the full length.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        let at = Instant::now();
        if n < 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        let ip = &buf[..(n as usize).min(buf.len())];
        if let Some((_, dst_port, attempt)) = client_syn(ip).filter(|(src, ..)| watch(*src)) {
            seen.lock().unwrap_or_else(|e| e.into_inner()).push(Syn {
                at,
                dst_port,
                attempt,
            });
        }
    }
}

/// The source address, destination port and (source port, sequence number) if `ip` is an
/// IPv4 TCP segment with SYN set and ACK clear.
fn client_syn(ip: &[u8]) -> Option<(Ipv4Addr, u16, (u16, u32))> {
    let ihl = usize::from(*ip.first()? & 0x0f) * 4;
    if ip.get(9) != Some(&6) || ihl < 20 {
        return None;
    }
    let tcp = ip.get(ihl..ihl + 14)?;
    let flags = tcp[13];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let attempt = (
        u16::from_be_bytes([tcp[0], tcp[1]]),
        u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
    );
    (flags & 0x12 == 0x02).then(|| (src, u16::from_be_bytes([tcp[2], tcp[3]]), attempt))
}

/// A TCP service in a backend's namespace that accepts and closes connections, and can be
/// killed (its listening socket closed: SYNs are then answered with RST, as when the process
/// has exited) and revived.
pub struct Acceptor {
    up: Arc<AtomicBool>,
    /// Nanoseconds after `epoch` at which the listener was last closed.
    closed_at: Arc<AtomicU64>,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    pub fn start(ns: &Netns, port: u16) -> anyhow::Result<Acceptor> {
        let up = Arc::new(AtomicBool::new(true));
        let closed_at = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let epoch = Instant::now();
        let bind = move || -> io::Result<TcpListener> {
            let l = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let first = ns.run(bind)??;
        let thread = {
            let (up, closed_at, stop) = (up.clone(), closed_at.clone(), stop.clone());
            // Inside the namespace: a revived listener must bind there again.
            ns.spawn(move || {
                let mut listener = Some(first);
                while !stop.load(Ordering::Relaxed) {
                    match (up.load(Ordering::Relaxed), listener.as_ref()) {
                        (false, Some(_)) => {
                            listener = None;
                            closed_at.store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        }
                        (true, None) => listener = bind().ok(),
                        (true, Some(l)) => match l.accept() {
                            Ok(_) => continue,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(_) => {}
                        },
                        (false, None) => {}
                    }
                    thread::sleep(Duration::from_micros(200));
                }
            })?
        };
        Ok(Acceptor {
            up,
            closed_at,
            epoch,
            stop,
            thread: Some(thread),
        })
    }

    /// Closes the listener and returns the instant it was closed.
    pub fn kill(&self) -> Instant {
        let before = self.closed_at.load(Ordering::Relaxed);
        self.up.store(false, Ordering::Relaxed);
        loop {
            let now = self.closed_at.load(Ordering::Relaxed);
            if now != before {
                return self.epoch + Duration::from_nanos(now);
            }
            thread::sleep(Duration::from_micros(100));
        }
    }

    pub fn revive(&self) {
        self.up.store(true, Ordering::Relaxed);
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts a non-blocking connect to `target` every `every` from a thread in `ns`, until
/// stopped or `limit` passes; the sockets stay open until then (at most 20,000).
pub struct SynSpray {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SynSpray {
    pub fn start(
        ns: &Netns,
        target: SocketAddr,
        every: Duration,
        limit: Duration,
    ) -> anyhow::Result<SynSpray> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            ns.spawn(move || {
                let start = Instant::now();
                let mut open = Vec::new();
                while !stop.load(Ordering::Relaxed)
                    && start.elapsed() < limit
                    && open.len() < 20_000
                {
                    if let Ok(s) = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)) {
                        if s.set_nonblocking(true).is_ok() {
                            let _ = s.connect(&target.into());
                            open.push(s);
                        }
                    }
                    thread::sleep(every);
                }
            })?
        };
        Ok(SynSpray {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for SynSpray {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::client_syn;

    fn segment(flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&[198, 18, 0, 2]);
        p[22..24].copy_from_slice(&9000u16.to_be_bytes());
        p[33] = flags;
        p
    }

    #[test]
    fn only_client_syns_count() {
        assert_eq!(
            client_syn(&segment(0x02)),
            Some((Ipv4Addr::new(198, 18, 0, 2), 9000, (0, 0)))
        );
        assert_eq!(client_syn(&segment(0x12)), None, "SYN-ACK");
        assert_eq!(client_syn(&segment(0x10)), None, "ACK");
        let mut udp = segment(0x02);
        udp[9] = 17;
        assert_eq!(client_syn(&udp), None);
        assert_eq!(client_syn(&segment(0x02)[..30]), None, "truncated");
    }
}
