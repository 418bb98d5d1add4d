//! Tools of the hostile-client tests: crafted segments sent with raw sockets (any source
//! address, any flags), an ordinary client that keeps making requests meanwhile, and the
//! daemon's view read back (verdict counters, backends out of rotation).

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;

use crate::{
    lab::{self, Lab, Orch, VIP4},
    prom,
};

/// Segments that must not open a connection, by name.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Ack,
    Fin,
    Psh,
    Rst,
    RstAck,
    FinAck,
    SynAck,
    /// Opens a connection (the flood).
    Syn,
}

pub const KINDS: [Kind; 7] = [
    Kind::Ack,
    Kind::Fin,
    Kind::Psh,
    Kind::Rst,
    Kind::RstAck,
    Kind::FinAck,
    Kind::SynAck,
];

/// An IPv4 TCP segment (IP header and all: the socket sends it as it is).
pub fn segment(src: SocketAddrV4, dst: SocketAddrV4, kind: Kind, seq: u32) -> Vec<u8> {
    let ip = PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64);
    let tcp = ip.tcp(src.port(), dst.port(), seq, 64240);
    let tcp = match kind {
        Kind::Ack => tcp.ack(seq ^ 0x5a5a_5a5a),
        Kind::Fin => tcp.fin(),
        Kind::Psh => tcp.psh(),
        Kind::Rst => tcp.rst(),
        Kind::RstAck => tcp.rst().ack(seq.wrapping_add(1)),
        Kind::FinAck => tcp.fin().ack(seq ^ 0x1234),
        Kind::SynAck => tcp.syn().ack(seq.wrapping_add(1)),
        Kind::Syn => tcp.syn(),
    };
    let mut out = Vec::new();
    tcp.write(&mut out, b"hostile").expect("building a segment");
    out
}

/// A raw IPv4 socket that sends whole IP packets (`IP_HDRINCL`), any source address.
pub struct RawSender(std::os::fd::OwnedFd);

impl RawSender {
    pub fn open() -> RawSender {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        RawSender(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }

    pub fn send(&self, packet: &[u8], to: Ipv4Addr) {
        assert!(
            self.try_send(packet, to),
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Sends `packet`; false when the kernel refused it (a full queue under a flood).
    pub fn try_send(&self, packet: &[u8], to: Ipv4Addr) -> bool {
        use std::os::fd::AsRawFd;
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(to.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: valid buffers of the sizes passed.
        let rc = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        rc == packet.len() as isize
    }
}

/// A tiny deterministic generator (xorshift): reproducible junk without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn roll(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

pub fn counter(lab: &Lab, reason: &str) -> f64 {
    let text = lab.metrics().expect("scraping /metrics");
    prom::get(
        &prom::parse(&text),
        "orch_xdp_packets_total",
        &[("reason", reason)],
    )
}

pub fn all_verdicts(lab: &Lab) -> f64 {
    let text = lab.metrics().expect("scraping /metrics");
    prom::sum(&prom::parse(&text), "orch_xdp_packets_total", &[]).unwrap_or(0.0)
}

/// Every backend of `web` that is not in rotation, with its health.
pub fn out_of_rotation(orch: &Orch) -> Vec<String> {
    orch.backend_rows("web")
        .iter()
        .filter(|b| b["in_rotation"] != true)
        .map(|b| format!("{} ({})", b["address"], b["health"]))
        .collect()
}

/// The ordinary client: one request per new connection every 20 ms until told to stop
/// (and at most 60 s); returns (succeeded, failures with their errors).
pub fn ordinary_client(
    lab: &Lab,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<(usize, Vec<String>)> {
    let vip = SocketAddr::from((VIP4, 80));
    lab.client
        .spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match lab::tcp_ask(vip, "ordinary") {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
                thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        })
        .expect("starting the ordinary client")
}

/// The demo configuration with `settings` (`key = value` lines) in its `[dataplane]` section,
/// replacing the example's own lines for those keys.
pub fn demo_with(settings: &str) -> String {
    let keys: Vec<&str> = settings
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
        .collect();
    // The example sets some of these keys itself: its lines give way.
    let demo: String = lab::demo_config()
        .lines()
        .filter(|l| {
            !l.split_once('=')
                .is_some_and(|(k, _)| keys.contains(&k.trim()))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    demo.replacen("[dataplane]\n", &format!("[dataplane]\n{settings}\n"), 1)
}

pub fn metric(lab: &Lab, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = lab.metrics().expect("scraping /metrics");
    prom::get(&prom::parse(&text), name, labels)
}

/// A link's MAC address, from `ip -br link` in `ns`.
pub fn mac_of(ns: &crate::netns::Netns, iface: &str) -> [u8; 6] {
    let out = ns.ip(&["-br", "link", "show", iface]).expect("ip link");
    let text = out
        .split_whitespace()
        .nth(2)
        .expect("a MAC in `ip -br link`");
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(text.split(':')) {
        *b = u8::from_str_radix(part, 16).expect("hex");
    }
    mac
}

/// Sends Ethernet frames out of `iface` of the calling thread's namespace (AF_PACKET).
pub fn send_frames(iface: &str, frames: &[Vec<u8>]) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let ifindex = nix::net::if_::if_nametoindex(iface).expect("the interface exists");
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    for frame in frames {
        // SAFETY: zero is a valid sockaddr_ll; the fields that matter are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: valid buffers of the sizes passed.
        let rc = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            rc,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }
}
