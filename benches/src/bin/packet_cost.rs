//! Per-packet cost of the XDP program through BPF_PROG_TEST_RUN, as a ratio to the floor
//! program (one per-CPU counter increment, XDP_PASS) measured in the same run.
//!
//! ```text
//! sudo target/release/packet_cost [--repeat N] [--rounds R]
//! ```
//! Needs root (loads BPF). Runs inside a network namespace it creates and removes, so the
//! program's FIB lookups see an empty routing table (no route: the translated packet is
//! handed to the stack; the lookup itself is paid).
//!
//! `BPF_PROG_TEST_RUN` with `repeat > 1` runs the program again on its own output, so a path
//! that rewrites the packet would be measured once and then as something else. The
//! established-flow and reply cases therefore use a service whose only backend is the VIP
//! itself: the program does every step (lookups, rewrite, incremental checksums, counters,
//! FIB lookup) and the rewrite leaves the same bytes, so every repetition takes the same
//! path. A new flow cannot repeat (its first run creates the entry): it runs once per
//! distinct source port, and so does the floor for its ratio. Rounds interleave the cases
//! with the floor; the figures are medians over rounds.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::{ensure, Context};
use etherparse::{IpHeaders, PacketBuilder, PacketBuilderStep};
use orch::{
    dataplane::{Capacity, Dataplane, Verdict},
    model::{Backend, HealthCheck, Protocol, Service, ServiceAddr},
    reconcile::Reconciler,
};
use orch_tests::netns::Netns;

const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const CLIENT_PORT: u16 = 40000;
const PAYLOAD: &[u8] = b"GET / HTTP/1.1\r\n\r\n";

/// TCP flags for [`tcp`].
#[derive(Clone, Copy)]
enum Flags {
    Syn,
    Ack,
}

/// Ethernet and IP headers from `src` to `dst` (one family), TTL 64.
fn ip(src: SocketAddr, dst: SocketAddr) -> PacketBuilderStep<IpHeaders> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B);
    let b = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => b.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => b.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!("one family per packet"),
    };
    b
}

fn tcp(src: SocketAddr, dst: SocketAddr, flags: Flags) -> Vec<u8> {
    let b = ip(src, dst).tcp(src.port(), dst.port(), 1000, 64240);
    let (b, payload) = match flags {
        Flags::Syn => (b.syn(), &[][..]),
        Flags::Ack => (b.ack(1).psh(), PAYLOAD),
    };
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("writing to a Vec");
    out
}

fn udp(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let b = ip(src, dst).udp(src.port(), dst.port());
    let mut out = Vec::with_capacity(b.size(PAYLOAD.len()));
    b.write(&mut out, PAYLOAD).expect("writing to a Vec");
    out
}

/// A service whose only backend is its own VIP: translation leaves the packet as it was.
fn mirror(name: &str, vip: IpAddr, port: u16, protocol: Protocol) -> Service {
    Service {
        name: name.to_owned(),
        addr: ServiceAddr {
            vip,
            port,
            protocol,
        },
        check: HealthCheck::default_for(protocol),
        backends: vec![Backend::new(SocketAddr::new(vip, port), 1)],
    }
}

/// One measured case: a packet repeated `repeat` times.
struct Case {
    name: &'static str,
    packet: Vec<u8>,
    /// A packet to run once first (the SYN that creates the connection's entries).
    setup: Option<Vec<u8>>,
    /// The verdict every repetition must end with (proves the path did not change).
    verdict: Verdict,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let mut repeat = 1_000_000u32;
    let mut rounds = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--repeat" => repeat = args.next().context("--repeat N")?.parse()?,
            "--rounds" => rounds = args.next().context("--rounds R")?.parse()?,
            other => anyhow::bail!("unknown argument {other:?} (--repeat N, --rounds R)"),
        }
    }
    ensure!(
        (1..=100).contains(&rounds) && repeat > 0,
        "--repeat must be positive and --rounds within 1..=100"
    );
    orch_tests::netns::sweep_stale(orch_tests::lab::NS_PREFIX);
    let ns = Netns::create(&format!(
        "{}{}-bench",
        orch_tests::lab::NS_PREFIX,
        std::process::id()
    ))?;
    ns.run(move || run(repeat, rounds))?
}

fn run(repeat: u32, rounds: usize) -> anyhow::Result<()> {
    orch_tests::lab::pin_current_thread(0)?;
    let cap = Capacity::default();
    let mut dp = Dataplane::load(cap).context("loading the data plane (root needed)")?;
    let mut rec = Reconciler::new(cap.max_services, cap.max_backends);
    let services = [
        mirror("web", VIP4.into(), 80, Protocol::Tcp),
        mirror("dns", VIP4.into(), 53, Protocol::Udp),
        mirror("web6", VIP6.into(), 80, Protocol::Tcp),
    ];
    rec.apply(&mut dp, &services)?;

    let web = SocketAddr::from((VIP4, 80));
    let dns = SocketAddr::from((VIP4, 53));
    let web6 = SocketAddr::from((VIP6, 80));
    let client = SocketAddr::from((CLIENT4, CLIENT_PORT));
    let client6 = SocketAddr::from((CLIENT6, CLIENT_PORT));
    let pass = Verdict::Pass;
    let cases = [
        Case {
            name: "non-VIP pass",
            packet: tcp(client, SocketAddr::from(([198, 18, 9, 9], 443)), Flags::Ack),
            setup: None,
            verdict: pass,
        },
        Case {
            name: "established TCP",
            packet: tcp(client, web, Flags::Ack),
            setup: Some(tcp(client, web, Flags::Syn)),
            verdict: pass,
        },
        Case {
            name: "reply translation",
            packet: tcp(web, client, Flags::Ack),
            setup: None, // the entries of "established TCP"
            verdict: pass,
        },
        Case {
            name: "UDP",
            packet: udp(client, dns),
            setup: Some(udp(client, dns)),
            verdict: pass,
        },
        Case {
            name: "IPv6 established TCP",
            packet: tcp(client6, web6, Flags::Ack),
            setup: Some(tcp(client6, web6, Flags::Syn)),
            verdict: pass,
        },
    ];
    for c in &cases {
        if let Some(setup) = &c.setup {
            dp.test_run(setup)?;
        }
        // Once with the output checked: the translation must leave the bytes unchanged, or
        // the repetitions would measure another path.
        let once = dp.test_run(&c.packet)?;
        ensure!(
            once.verdict == c.verdict && once.packet == c.packet,
            "{}: the path is not repeatable (verdict {:?})",
            c.name,
            once.verdict
        );
    }

    println!(
        "per-packet cost, BPF_PROG_TEST_RUN, repeat {repeat}, {rounds} rounds (medians; ratio = case / floor in the same round)"
    );
    println!(
        "{:<24} {:>10} {:>10} {:>8}",
        "case", "ns/pkt", "floor ns", "ratio"
    );
    for c in &cases {
        let (mut ns, mut floor, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let f = per_packet(dp.bench_run(true, &c.packet, repeat)?.duration);
            let t = per_packet(dp.bench_run(false, &c.packet, repeat)?.duration);
            ns.push(t);
            floor.push(f);
            ratio.push(t / f);
        }
        println!(
            "{:<24} {:>10.1} {:>10.1} {:>7.2}x",
            c.name,
            median(&mut ns),
            median(&mut floor),
            median(&mut ratio)
        );
    }

    // New flows: one run per new connection (repeat 1), the floor likewise. Each round uses
    // its own client address, and all rounds together stay below the table's capacity, so
    // every SYN is new and no insert has to evict.
    let flows = (repeat / 50).clamp(1_000, 20_000);
    let (mut ns, mut floor, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (mut t_sum, mut f_sum) = (0.0, 0.0);
        for i in 0..flows {
            let client = Ipv4Addr::new(198, 18, 0, 10 + round as u8);
            let syn = tcp(SocketAddr::from((client, 1024 + i as u16)), web, Flags::Syn);
            f_sum += per_packet(dp.bench_run(true, &syn, 1)?.duration);
            let out = dp.bench_run(false, &syn, 1)?;
            t_sum += per_packet(out.duration);
        }
        let (t, f) = (t_sum / flows as f64, f_sum / flows as f64);
        ns.push(t);
        floor.push(f);
        ratio.push(t / f);
    }
    println!(
        "{:<24} {:>10.1} {:>10.1} {:>7.2}x   ({flows} new flows per round, repeat 1 each)",
        "new TCP flow",
        median(&mut ns),
        median(&mut floor),
        median(&mut ratio)
    );
    Ok(())
}

fn per_packet(d: Duration) -> f64 {
    d.as_nanos() as f64
}
