//! The hostile client: packets that real networks carry (scanners, clients whose state was
//! lost, spoofers, junk) sent at a health-checked service while an ordinary client keeps
//! making requests. Nothing they send may take a backend out of rotation, fail the ordinary
//! client's requests, or go uncounted.

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
use orch_tests::{
    lab::{self, Lab, Orch, CLIENT4, VIP4},
    privilege::require_root,
    prom,
};

/// Segments that must not open a connection, by name.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Ack,
    Fin,
    Psh,
    Rst,
    RstAck,
    FinAck,
    SynAck,
}

const KINDS: [Kind; 7] = [
    Kind::Ack,
    Kind::Fin,
    Kind::Psh,
    Kind::Rst,
    Kind::RstAck,
    Kind::FinAck,
    Kind::SynAck,
];

/// An IPv4 TCP segment (IP header and all: the socket sends it as it is).
fn segment(src: SocketAddrV4, dst: SocketAddrV4, kind: Kind, seq: u32) -> Vec<u8> {
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
    };
    let mut out = Vec::new();
    tcp.write(&mut out, b"hostile").expect("building a segment");
    out
}

/// A raw IPv4 socket that sends whole IP packets (`IP_HDRINCL`), any source address.
struct RawSender(std::os::fd::OwnedFd);

impl RawSender {
    fn new() -> RawSender {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        RawSender(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }

    fn send(&self, packet: &[u8], to: Ipv4Addr) {
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
        assert!(
            rc == packet.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A tiny deterministic generator (xorshift): reproducible junk without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn counter(lab: &Lab, reason: &str) -> f64 {
    let text = lab.metrics().expect("scraping /metrics");
    prom::get(
        &prom::parse(&text),
        "orch_xdp_packets_total",
        &[("reason", reason)],
    )
}

fn all_verdicts(lab: &Lab) -> f64 {
    let text = lab.metrics().expect("scraping /metrics");
    prom::sum(&prom::parse(&text), "orch_xdp_packets_total", &[]).unwrap_or(0.0)
}

/// Every backend of `web` that is not in rotation, with its health.
fn out_of_rotation(orch: &Orch) -> Vec<String> {
    let out = orch
        .cli(&["backend", "list", "web", "--json"])
        .expect("running the CLI");
    assert!(
        out.status.success(),
        "the daemon must keep answering: {}",
        out.stderr_text()
    );
    let v: serde_json::Value = serde_json::from_str(&out.stdout_text()).unwrap();
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["in_rotation"] != true)
        .map(|b| format!("{} ({})", b["address"], b["health"]))
        .collect()
}

/// The ordinary client: one request per new connection every 20 ms until told to stop
/// (and at most 60 s); returns (succeeded, failures with their errors).
fn ordinary_client(lab: &Lab, stop: Arc<AtomicBool>) -> thread::JoinHandle<(usize, Vec<String>)> {
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

#[test]
fn stray_spoofed_and_mutated_segments_change_nothing() {
    if !require_root("stray_spoofed_and_mutated_segments_change_nothing") {
        return;
    }
    let lab = Lab::new("hostile", 3).expect("building the lab");
    let orch = lab
        .start_orch(&lab::orch_bin(), &lab::demo_config())
        .expect("starting orch");
    // Checks settled, every backend in rotation, before the attack.
    thread::sleep(Duration::from_secs(2));
    assert_eq!(out_of_rotation(&orch), Vec::<String>::new());

    let stop = Arc::new(AtomicBool::new(false));
    let client = ordinary_client(&lab, stop.clone());

    // 1. Stray segments of every kind, from the client's own address and from spoofed
    //    ones, on ports the ordinary client never uses (its ephemeral range starts at 32768),
    //    so that every one of them matches no connection.
    let stray_before = counter(&lab, "drop_tcp_no_flow");
    let sources: Vec<Ipv4Addr> = vec![
        CLIENT4,
        Ipv4Addr::new(198, 18, 0, 77),
        Ipv4Addr::new(198, 18, 200, 9),
        // A backend's own address, as a spoofer would pick.
        lab::backend4(1),
    ];
    let sent = lab
        .client
        .run(move || {
            let raw = RawSender::new();
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let mut sent = 0u64;
            // 20 rounds, paced: 20 x 4 sources x 7 kinds x 10 ports = 5,600 segments in ~2 s.
            for _round in 0..20 {
                for src in &sources {
                    for kind in KINDS {
                        for _ in 0..10 {
                            let port = 1024 + (rng.next() % 30_000) as u16;
                            let seg = segment(
                                SocketAddrV4::new(*src, port),
                                SocketAddrV4::new(VIP4, 80),
                                kind,
                                rng.next() as u32,
                            );
                            raw.send(&seg, VIP4);
                            sent += 1;
                        }
                    }
                }
                thread::sleep(Duration::from_millis(100));
            }
            sent
        })
        .expect("sending stray segments");
    // Counters are per CPU and summed at scrape: wait for the last packets to be counted.
    let want = stray_before + sent as f64;
    lab::wait_until(Duration::from_secs(5), || {
        counter(&lab, "drop_tcp_no_flow") >= want
    });
    assert_eq!(
        counter(&lab, "drop_tcp_no_flow"),
        want,
        "every stray segment is dropped and counted once"
    );
    assert_eq!(
        out_of_rotation(&orch),
        Vec::<String>::new(),
        "stray segments took backends out\n{}",
        orch.log()
    );

    // 2. Mutations of a valid segment: random bytes of the TCP header flipped, random
    //    truncations. Whatever each becomes, it is counted under exactly one verdict.
    let before = all_verdicts(&lab);
    let mutated = lab
        .client
        .run(|| {
            let raw = RawSender::new();
            let mut rng = Rng(0x2545_f491_4f6c_dd1d);
            let mut sent = 0u64;
            for _ in 0..20 {
                for _ in 0..200 {
                    let port = 1024 + (rng.next() % 30_000) as u16;
                    let mut p = segment(
                        SocketAddrV4::new(CLIENT4, port),
                        SocketAddrV4::new(VIP4, 80),
                        Kind::Ack,
                        rng.next() as u32,
                    );
                    // Flip one to three bytes past the ports (the kernel rewrites the IP
                    // header's length and checksum; the ports keep it aimed at the VIP).
                    for _ in 0..1 + rng.next() % 3 {
                        let at = 24 + (rng.next() as usize % (p.len() - 24));
                        p[at] ^= 1 << (rng.next() % 8);
                    }
                    if rng.next().is_multiple_of(4) {
                        p.truncate(20 + (rng.next() as usize % 20));
                    }
                    raw.send(&p, VIP4);
                    sent += 1;
                }
                thread::sleep(Duration::from_millis(50));
            }
            sent
        })
        .expect("sending mutated segments");
    lab::wait_until(Duration::from_secs(5), || {
        all_verdicts(&lab) >= before + mutated as f64
    })
    .unwrap_or_else(|| panic!("not every mutated frame was counted"));

    // Let the ordinary client run on past the attack, then judge.
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = client.join().expect("ordinary client");
    eprintln!(
        "{sent} stray and {mutated} mutated segments; the ordinary client made {ok} requests, \
         {} failed",
        failed.len()
    );
    // The bound is zero: nothing hostile creates state or ejects, and the lab's links are
    // not saturated by ~8,000 small frames over ~4 s, so no request has a reason to fail.
    assert!(failed.is_empty(), "ordinary requests failed: {failed:?}");
    assert!(ok > 50, "the ordinary client made only {ok} requests");
    assert_eq!(
        out_of_rotation(&orch),
        Vec::<String>::new(),
        "hostile segments took backends out\n{}",
        orch.log()
    );
    assert!(
        !orch.log().contains("out of rotation"),
        "the daemon ejected a backend:\n{}",
        orch.log()
    );
    assert_eq!(counter(&lab, "drop_refused"), 0.0, "no refusal was forged");
}
