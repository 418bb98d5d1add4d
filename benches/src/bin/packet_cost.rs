//! Per-packet cost of the XDP program through BPF_PROG_TEST_RUN, as a ratio to the floor
//! program (one per-CPU counter increment, XDP_PASS) measured in the same run.
//!
//! ```text
//! sudo target/release/packet_cost [--repeat N] [--rounds R] [--services N] [--only TEXT]
//! ```
//! `--only TEXT` measures only the rows whose name contains TEXT, with as many rounds as
//! asked, and saves nothing: for comparing two builds on one path, where a full run's noise
//! between rows would hide a few nanoseconds.
//! `--services N` adds N services of 8 backends each (and as many connections in the
//! connection table) before measuring: the cost at that size, saved as the section
//! `packet_cost_at_scale`.
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

use clap::builder::RangedU64ValueParser;
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::{ensure, Context};
use etherparse::{IpHeaders, PacketBuilder, PacketBuilderStep};
use orch::{
    dataplane::{Capacity, Dataplane, Verdict},
    model::{Backend, HealthCheck, Protocol, Scheduler, Service, ServiceAddr},
    reconcile::Reconciler,
};
use orch_benches::{
    chart::{self, Bars},
    report,
    stats::{median, verdict},
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
    /// The backend's answer to [`Flags::Syn`] (sequence number 0, so the client's
    /// [`Flags::Ack`], which acknowledges 1, confirms the connection).
    SynAck,
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
        Flags::SynAck => (
            ip(src, dst)
                .tcp(src.port(), dst.port(), 0, 64240)
                .syn()
                .ack(1001),
            &[][..],
        ),
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
        scheduler: Default::default(),
        backends: vec![Backend::new(SocketAddr::new(vip, port), 1)],
    }
}

/// One measured case: a packet repeated `repeat` times.
struct Case {
    name: &'static str,
    packet: Vec<u8>,
    /// Packets to run once first (the handshake that creates the connection's entries).
    setup: Vec<Vec<u8>>,
    /// The verdict every repetition must end with (proves the path did not change).
    verdict: Verdict,
    /// The issue's target, as a ratio to the floor.
    target: Option<f64>,
}

/// One line of the result table.
struct Row {
    name: &'static str,
    ns: f64,
    floor: f64,
    ratio: f64,
    /// The issue's target for this path, as a ratio to the floor.
    target: Option<f64>,
}

/// The data plane's cost per packet, by path, against a trivial program on the same hook.
#[derive(Clone, clap::Parser)]
struct Options {
    /// Runs of each packet per measurement (BPF_PROG_TEST_RUN's repeat).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Measurements per path; the table gives their median.
    #[arg(long, default_value_t = 5, value_parser = RangedU64ValueParser::<usize>::new().range(1..=100))]
    rounds: usize,
    /// Extra services installed first, to measure at scale.
    #[arg(long, default_value_t = 0, value_parser = RangedU64ValueParser::<usize>::new().range(0..=100_000))]
    services: usize,
    /// Measures only the rows whose name contains this text, and saves no section.
    #[arg(long)]
    only: Option<String>,
}

impl Options {
    /// Whether the row `name` is to be measured.
    fn wants(&self, name: &str) -> bool {
        self.only.as_deref().is_none_or(|t| name.contains(t))
    }
}

fn main() -> anyhow::Result<()> {
    let o = <Options as clap::Parser>::parse();
    orch_tests::netns::sweep_stale(orch_tests::lab::NS_PREFIX);
    let ns = Netns::create(&format!(
        "{}{}-bench",
        orch_tests::lab::NS_PREFIX,
        std::process::id()
    ))?;
    let name = ns.name().to_owned();
    let (rows, o) = ns.run(move || run(&o, &name).map(|rows| (rows, o)))??;
    if o.only.is_some() {
        // A partial table is no section: printed above, saved nowhere.
        return Ok(());
    }
    section(&rows, &o)
}

fn run(o: &Options, ns_name: &str) -> anyhow::Result<Vec<Row>> {
    let (repeat, rounds) = (o.repeat, o.rounds);
    orch_tests::lab::pin_current_thread(0)?;
    let extra = o.services;
    let cap = Capacity {
        max_services: (extra as u32 + 16).max(Capacity::default().max_services),
        max_backends: (extra as u32 * 8 + 64).max(Capacity::default().max_backends),
        ..Capacity::default()
    };
    let mut dp = Dataplane::load(cap).context("loading the data plane (root needed)")?;
    let mut rec = Reconciler::new(cap.max_services, cap.max_backends);
    let mut services = vec![
        Service {
            scheduler: Scheduler::Maglev,
            ..mirror("hashed", VIP4.into(), 81, Protocol::Tcp)
        },
        mirror("web", VIP4.into(), 80, Protocol::Tcp),
        mirror("dns", VIP4.into(), 53, Protocol::Udp),
        mirror("web6", VIP6.into(), 80, Protocol::Tcp),
    ];
    services.extend((0..extra).map(scale_service));
    rec.apply(&mut dp, &services)?;
    // As many open connections as services, spread over them, so lookups run in a table
    // of that size too.
    for i in 0..extra {
        let svc = &services[4 + i];
        let client = SocketAddr::from((
            Ipv4Addr::new(198, 18, 100 + (i / 60_000) as u8, 2),
            1024 + (i % 60_000) as u16,
        ));
        let vip = SocketAddr::new(svc.addr.vip, svc.addr.port);
        dp.test_run(&tcp(client, vip, Flags::Syn))?;
    }

    let web = SocketAddr::from((VIP4, 80));
    let hashed = SocketAddr::from((VIP4, 81));
    let client = SocketAddr::from((CLIENT4, CLIENT_PORT));
    let pass = Verdict::Pass;
    let mut cases = vec![Case {
        name: "non-VIP pass",
        packet: tcp(client, SocketAddr::from(([198, 18, 9, 9], 443)), Flags::Ack),
        setup: vec![],
        verdict: pass,
        target: Some(1.5),
    }];
    cases.extend(established_cases(
        CLIENT_PORT,
        pass,
        [Some(5.0), None, None, None],
    ));
    for c in &cases {
        for setup in &c.setup {
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

    for c in &cases {
        // The TC hook too: the same bytes out (TC_ACT_OK: no route, to the stack).
        let (action, out) = dp.test_run_tc(&c.packet, 0)?;
        ensure!(
            action == 0 && out == c.packet,
            "TC {}: the path is not repeatable (action {action})",
            c.name
        );
    }

    let mut rows = Vec::new();
    for c in cases.iter().filter(|c| o.wants(c.name)) {
        let (ns, floor, ratio) = alternate(&mut dp, &c.packet, repeat, rounds)?;
        eprintln!(
            "{:<32} {ns:>8.1} ns  floor {floor:>6.1} ns  {ratio:>6.2}x",
            c.name
        );
        rows.push(Row {
            name: c.name,
            ns,
            floor,
            ratio,
            target: c.target,
        });
    }

    // The same balancer at TC, on skbs, against the TC floor (one counter increment,
    // TC_ACT_OK): the hook `auto` picks for veths, bridges and VLANs.
    for c in &cases {
        let name: &'static str = match c.name {
            "non-VIP pass" => "TC: non-VIP pass",
            "established TCP" => "TC: established TCP",
            "reply translation" => "TC: reply translation",
            "UDP" => "TC: UDP",
            _ => "TC: IPv6 established TCP",
        };
        if !o.wants(name) {
            continue;
        }
        let (ns, floor, ratio) = alternate_tc(&mut dp, &c.packet, repeat, rounds)?;
        eprintln!("{name:<32} {ns:>8.1} ns  floor {floor:>6.1} ns  {ratio:>6.2}x");
        rows.push(Row {
            name,
            ns,
            floor,
            ratio,
            target: None,
        });
    }

    // What the FIB lookup costs: the established case again with redirect off (the
    // translated packet goes to the stack without a lookup), in the same run.
    let name = "established TCP, no FIB lookup";
    if o.wants(name) {
        let mut no_fib = orch::dataplane::default_settings();
        no_fib.flags &= !orch_common::maps::SETTING_REDIRECT;
        dp.set_settings(&no_fib)?;
        let (ns, floor, ratio) = alternate(&mut dp, &cases[1].packet, repeat, rounds)?;
        dp.set_settings(&orch::dataplane::default_settings())?;
        rows.push(Row {
            name,
            ns,
            floor,
            ratio,
            target: None,
        });
    }

    // New flows: one run per new connection (repeat 1), the floor likewise. Each round uses
    // its own client address, and all rounds together stay below the table's capacity, so
    // every SYN is new and no insert has to evict.
    // The same for a Maglev service (its own clients): the hash and the table lookup in
    // place of the round-robin cursor. Both cases' flows (two entries each) fit the
    // unconfirmed table together, so neither pays for evictions.
    let fit = orch_common::CONNTRACK_NEW_CAPACITY / (2 * 2 * rounds as u32);
    // At most 2,000 per round: each run is a test-run call, and the kernel swaps its XDP
    // dispatcher around every call, waiting for an RCU grace period (milliseconds).
    let flows = (repeat / 50).clamp(1_000, 2_000).min(fit);
    for (name, vip, first_client, target) in [
        ("new TCP flow", web, 10, Some(10.0)),
        ("new TCP flow, Maglev", hashed, 60, None),
    ]
    .into_iter()
    .filter(|(name, ..)| o.wants(name))
    {
        let (mut ns, mut floor, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            let (mut t_sum, mut f_sum) = (0.0, 0.0);
            for i in 0..flows {
                let client = Ipv4Addr::new(198, 18, 0, first_client + round as u8);
                let syn = tcp(SocketAddr::from((client, 1024 + i as u16)), vip, Flags::Syn);
                f_sum += per_packet(dp.bench_run(true, &syn, 1)?.duration);
                let out = dp.bench_run(false, &syn, 1)?;
                t_sum += per_packet(out.duration);
            }
            let (t, f) = (t_sum / flows as f64, f_sum / flows as f64);
            ns.push(t);
            floor.push(f);
            ratio.push(t / f);
        }
        let (ns, floor, ratio) = (median(&ns), median(&floor), median(&ratio));
        eprintln!("{name:<32} {ns:>8.1} ns  floor {floor:>6.1} ns  {ratio:>6.2}x");
        rows.push(Row {
            name,
            ns,
            floor,
            ratio,
            target,
        });
    }
    // A new flow with warm caches. Each `repeat = 1` run above follows a test-run call that
    // swapped the kernel's XDP dispatcher and slept through an RCU grace period, so the
    // program runs from cold caches. Here one SYN repeats: each repetition finds the entry
    // of the one before, still unanswered, forgets it (two removals, as for a client's
    // retransmitted SYN) and balances it afresh (two inserts). An upper bound on a warm new
    // flow, by the removals.
    let syn = tcp(
        SocketAddr::from((CLIENT4, CLIENT_PORT + 2)),
        web,
        Flags::Syn,
    );
    let once = dp.test_run(&syn)?;
    ensure!(
        once.verdict == pass && once.packet == syn,
        "a repeated SYN is not repeatable ({:?})",
        once.verdict
    );
    let name = "new TCP flow, warm (SYN retried)";
    if o.wants(name) {
        let (ns, floor, ratio) = alternate(&mut dp, &syn, repeat, rounds)?;
        eprintln!("{name:<32} {ns:>8.1} ns  floor {floor:>6.1} ns  {ratio:>6.2}x");
        rows.push(Row {
            name,
            ns,
            floor,
            ratio,
            target: Some(10.0),
        });
    }
    rows.extend(routed(&mut dp, ns_name, o)?);
    Ok(rows)
}

/// The established paths, from the client's `port`: a confirmed TCP connection's next
/// segment, its backend's reply, a confirmed UDP flow's next datagram, and the IPv6 TCP
/// segment; each must end with `verdict`, with the targets in that order.
fn established_cases(port: u16, verdict: Verdict, targets: [Option<f64>; 4]) -> [Case; 4] {
    let client = SocketAddr::from((CLIENT4, port));
    let client6 = SocketAddr::from((CLIENT6, port));
    let (web, dns) = (SocketAddr::from((VIP4, 80)), SocketAddr::from((VIP4, 53)));
    let web6 = SocketAddr::from((VIP6, 80));
    [
        Case {
            name: "established TCP",
            packet: tcp(client, web, Flags::Ack),
            // A handshake: the first measured-path run (the output check) is the client's
            // ACK that confirms it, so the runs measure a confirmed connection.
            setup: vec![
                tcp(client, web, Flags::Syn),
                tcp(web, client, Flags::SynAck),
            ],
            verdict,
            target: targets[0],
        },
        Case {
            name: "reply translation",
            packet: tcp(web, client, Flags::Ack),
            setup: vec![], // the entries of "established TCP"
            verdict,
            target: targets[1],
        },
        Case {
            name: "UDP",
            packet: udp(client, dns),
            // A datagram and its answer: a confirmed flow.
            setup: vec![udp(client, dns), udp(dns, client)],
            verdict,
            target: targets[2],
        },
        Case {
            name: "IPv6 established TCP",
            packet: tcp(client6, web6, Flags::Ack),
            setup: vec![
                tcp(client6, web6, Flags::Syn),
                tcp(web6, client6, Flags::SynAck),
            ],
            verdict,
            target: targets[3],
        },
    ]
}

/// The routed cases' interface, its MAC and the next hops' (the client and the VIP's
/// router), all in the benchmark's own namespace.
const ROUTED_IF: &str = "orchb0";
const ROUTER_MAC: &str = "02:00:00:00:00:03";
/// Per BPF_PROG_TEST_RUN call on a routed path: each run decrements the TTL (255 to start)
/// of the packet the next one sees, which must stay above 1.
const ROUTED_BATCH: u32 = 250;

/// The established paths again with the FIB finding a route and a neighbour, as on a real
/// balancer: the packet is redirected (XDP_REDIRECT, TC_ACT_REDIRECT; BPF_PROG_TEST_RUN
/// does not transmit it), and the MAC rewrite and TTL decrement are paid. Measured last, as
/// the routes it adds would change the cases above. New connections (their own client
/// port), so that their entries record the routed interface.
fn routed(dp: &mut Dataplane, ns: &str, o: &Options) -> anyhow::Result<Vec<Row>> {
    let (repeat, rounds) = (o.repeat, o.rounds);
    let ip = |args: &[&str]| -> anyhow::Result<()> {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        orch_tests::netns::run("ip", &all)?;
        Ok(())
    };
    // A router forwards (the lookup refuses otherwise); a veth can take XDP redirects.
    for key in [
        "net.ipv4.conf.all.forwarding",
        "net.ipv6.conf.all.forwarding",
    ] {
        orch_tests::netns::run(
            "ip",
            &["netns", "exec", ns, "sysctl", "-qw", &format!("{key}=1")],
        )?;
    }
    ip(&[
        "link", "add", ROUTED_IF, "type", "veth", "peer", "name", "orchb1",
    ])?;
    ip(&["link", "set", ROUTED_IF, "up"])?;
    ip(&["link", "set", "orchb1", "up"])?;
    ip(&["addr", "add", "198.18.0.1/24", "dev", ROUTED_IF])?;
    ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8::1/64",
        "dev",
        ROUTED_IF,
        "nodad",
    ])?;
    for (addr, mac) in [
        ("198.18.0.2", "02:00:00:00:00:02"),
        ("198.18.0.3", ROUTER_MAC),
        ("2001:db8::2", "02:00:00:00:00:02"),
        ("2001:db8::3", ROUTER_MAC),
    ] {
        ip(&[
            "neigh",
            "replace",
            addr,
            "lladdr",
            mac,
            "dev",
            ROUTED_IF,
            "nud",
            "permanent",
        ])?;
    }
    ip(&[
        "route",
        "add",
        "198.19.0.1/32",
        "via",
        "198.18.0.3",
        "dev",
        ROUTED_IF,
    ])?;
    ip(&[
        "-6",
        "route",
        "add",
        "2001:db8:ff::1/128",
        "via",
        "2001:db8::3",
        "dev",
        ROUTED_IF,
    ])?;
    dp.allow_xdp_redirect(ROUTED_IF)?;
    let ifindex = nix::net::if_::if_nametoindex(ROUTED_IF)?;

    let cases = established_cases(CLIENT_PORT + 1, Verdict::Redirect, [Some(5.0); 4]);
    let mut rows = Vec::new();
    // At most 40 calls (10,000 runs) per measurement: the kernel swaps its XDP dispatcher
    // around each test-run call, which waits for an RCU grace period (milliseconds), so a
    // call costs far more time than its 250 runs; the kernel times the runs alone.
    let batches = (repeat / ROUTED_BATCH).clamp(1, 40);
    for Case {
        name,
        packet,
        setup,
        verdict,
        target,
    } in &cases
    {
        let packet = ttl_255(packet);
        for p in setup {
            dp.test_run_on(&ttl_255(p), ifindex)?;
        }
        // The path must be the redirect, on every run of a batch (the last run's verdict
        // tells: the TTL only goes down).
        let once = dp.bench_run_on(false, &packet, ROUTED_BATCH, ifindex)?;
        ensure!(
            once.verdict == *verdict,
            "routed {name}: not redirected ({:?})",
            once.verdict
        );
        let (tc_action, _) = dp.bench_run_tc_on(false, &packet, ROUTED_BATCH, ifindex)?;
        ensure!(
            tc_action == TC_ACT_REDIRECT,
            "routed TC {name}: not redirected (action {tc_action})"
        );
        let (xdp_name, tc_name): (&'static str, &'static str) = match *name {
            "established TCP" => (
                "redirected: established TCP",
                "TC redirected: established TCP",
            ),
            "reply translation" => (
                "redirected: reply translation",
                "TC redirected: reply translation",
            ),
            "UDP" => ("redirected: UDP", "TC redirected: UDP"),
            _ => (
                "redirected: IPv6 established TCP",
                "TC redirected: IPv6 established TCP",
            ),
        };
        if o.wants(xdp_name) {
            let (ns, floor, ratio) = alternate_with(rounds, |floor| {
                let mut sum = Duration::ZERO;
                for _ in 0..batches {
                    sum += dp
                        .bench_run_on(floor, &packet, ROUTED_BATCH, ifindex)?
                        .duration;
                }
                Ok(sum / batches)
            })?;
            eprintln!("{xdp_name:<32} {ns:>8.1} ns  floor {floor:>6.1} ns  {ratio:>6.2}x");
            rows.push(Row {
                name: xdp_name,
                ns,
                floor,
                ratio,
                target: *target,
            });
        }
        if o.wants(tc_name) {
            let (ns, floor, ratio) = alternate_with(rounds, |floor| {
                let mut sum = Duration::ZERO;
                for _ in 0..batches {
                    sum += dp.bench_run_tc_on(floor, &packet, ROUTED_BATCH, ifindex)?.1;
                }
                Ok(sum / batches)
            })?;
            eprintln!("{tc_name:<32} {ns:>8.1} ns  floor {floor:>6.1} ns  {ratio:>6.2}x");
            rows.push(Row {
                name: tc_name,
                ns,
                floor,
                ratio,
                target: *target,
            });
        }
    }
    Ok(rows)
}

/// `TC_ACT_REDIRECT` (linux/pkt_cls.h).
const TC_ACT_REDIRECT: i32 = 7;

/// `packet` with TTL (hop limit) 255 and, for IPv4, its header checksum redone.
fn ttl_255(packet: &[u8]) -> Vec<u8> {
    let mut p = packet.to_vec();
    match u16::from_be_bytes([p[12], p[13]]) {
        0x0800 => {
            p[14 + 8] = 255;
            p[14 + 10..14 + 12].fill(0);
            let ihl = usize::from(p[14] & 0x0f) * 4;
            let sum = p[14..14 + ihl]
                .chunks(2)
                .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
                .sum::<u32>();
            let folded = (sum & 0xffff) + (sum >> 16);
            let folded = (folded & 0xffff) + (folded >> 16);
            p[14 + 10..14 + 12].copy_from_slice(&(!(folded as u16)).to_be_bytes());
        }
        0x86dd => p[14 + 7] = 255,
        _ => {}
    }
    p
}

/// Service `i` of the scale run: its own VIP in 198.19.0.0/16 (from 198.19.100.0 on),
/// port 80, 8 backends.
fn scale_service(i: usize) -> Service {
    let vip = Ipv4Addr::new(198, 19, 100 + (i / 250) as u8 % 150, (i % 250 + 1) as u8);
    let port = 80 + (i / 37_500) as u16;
    Service {
        name: format!("s{i}"),
        addr: ServiceAddr {
            vip: vip.into(),
            port,
            protocol: Protocol::Tcp,
        },
        check: HealthCheck::default_for(Protocol::Tcp),
        scheduler: Default::default(),
        backends: (0..8)
            .map(|b| {
                let host = Ipv4Addr::new(198, 18, 200 + (i % 4) as u8, (i % 250 + 1) as u8);
                Backend::new(SocketAddr::from((host, 20_000 + b)), 1)
            })
            .collect(),
    }
}

/// A case's name as the chart's axis has room for.
fn short(name: &str) -> &str {
    match name {
        "non-VIP pass" => "non-VIP",
        "established TCP" => "established",
        "reply translation" => "reply",
        "IPv6 established TCP" => "IPv6 est.",
        "established TCP, no FIB lookup" => "est., no FIB",
        "new TCP flow" => "new flow",
        "new TCP flow, Maglev" => "new flow (Maglev)",
        "new TCP flow, warm (SYN retried)" => "new flow, warm",
        "TC: non-VIP pass" => "TC non-VIP",
        "TC: established TCP" => "TC est.",
        "TC: reply translation" => "TC reply",
        "TC: UDP" => "TC UDP",
        "TC: IPv6 established TCP" => "TC IPv6",
        "redirected: established TCP" => "routed est.",
        "redirected: reply translation" => "routed reply",
        "redirected: UDP" => "routed UDP",
        "redirected: IPv6 established TCP" => "routed IPv6",
        "TC redirected: established TCP" => "TC routed est.",
        "TC redirected: reply translation" => "TC routed reply",
        "TC redirected: UDP" => "TC routed UDP",
        "TC redirected: IPv6 established TCP" => "TC routed IPv6",
        other => other,
    }
}

fn section(rows: &[Row], o: &Options) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let scale = o.services > 0;
    let (name, title) = if scale {
        (
            "packet_cost_at_scale",
            format!(
                "## Per-packet cost with {} services of 8 backends\n",
                o.services
            ),
        )
    } else {
        (
            "packet_cost",
            "## Per-packet cost (BPF_PROG_TEST_RUN)\n".to_owned(),
        )
    };
    let mut md = format!("{title}\n");
    let extra = if scale {
        format!(" --services {}", o.services)
    } else {
        String::new()
    };
    writeln!(
        md,
        "```sh\nsudo target/release/packet_cost --repeat {} --rounds {}{extra}\n```\n",
        o.repeat, o.rounds
    )?;
    if scale {
        writeln!(
            md,
            "The same cases with {} more services in the maps ({} backends) and {} open \
             connections in the connection table, to compare with the table above.\n",
            o.services,
            o.services * 8,
            o.services
        )?;
    } else {
        writeln!(
            md,
            "The balancer against the floor program (one per-CPU counter increment, `XDP_PASS`), \
             run alternately on the same packet in each of {} rounds; medians over rounds. The \
             program runs in a network namespace with no routes, so FIB lookups are paid but find \
             nothing and translated packets go to the stack; established-flow cases use a service \
             whose backend is the VIP itself, so the rewrite leaves identical bytes and every \
             repetition takes the same path (checked before measuring). New flows cannot repeat: \
             one `repeat = 1` run per new connection, and the floor likewise; the warm row \
             repeats one SYN, each repetition forgetting the unanswered attempt before it and \
             balancing afresh. The `redirected:` rows come last, after the benchmark gives its \
             namespace a route and a permanent neighbour for each destination: the packets are \
             redirected, and the MAC rewrite and TTL decrement are paid; they run in calls of \
             250 repetitions (TTL 255, one less per run), their floor likewise.\n",
            o.rounds
        )?;
    }
    writeln!(md, "| case | ns/packet | floor ns | ratio | target |")?;
    writeln!(md, "|---|---:|---:|---:|---|")?;
    for r in rows {
        let target = match r.target {
            Some(t) => format!("within {t}x: {}", verdict(r.ratio <= t)),
            None => String::new(),
        };
        writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.2}x | {target} |",
            r.name, r.ns, r.floor, r.ratio
        )?;
    }
    writeln!(md)?;
    if !scale {
        let svg = report::charts_dir().join("packet_cost.svg");
        chart::draw(
            &svg,
            &Bars {
                title: "Nanoseconds per packet (BPF_PROG_TEST_RUN)",
                y_label: "ns per packet (median of rounds)",
                groups: rows.iter().map(|r| short(r.name).to_owned()).collect(),
                series: vec![
                    ("orch".to_owned(), rows.iter().map(|r| r.ns).collect()),
                    (
                        "floor program".to_owned(),
                        rows.iter().map(|r| r.floor).collect(),
                    ),
                ],
                reference: None,
            },
        )?;
        writeln!(
            md,
            "![nanoseconds per packet by path](benches/charts/packet_cost.svg)\n"
        )?;
    }
    report::save_section(name, &md)
}

/// `packet` through the balancer and through the floor program, alternating, `rounds`
/// times: the medians of nanoseconds per packet, of the floor's, and of the per-round ratio.
fn alternate(
    dp: &mut Dataplane,
    packet: &[u8],
    repeat: u32,
    rounds: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    alternate_with(rounds, |floor| {
        Ok(dp.bench_run(floor, packet, repeat)?.duration)
    })
}

/// [`alternate`] on the TC hook: the balancer and the TC floor, alternately.
fn alternate_tc(
    dp: &mut Dataplane,
    packet: &[u8],
    repeat: u32,
    rounds: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    alternate_with(rounds, |floor| {
        Ok(dp.bench_run_tc(floor, packet, repeat)?.1)
    })
}

/// Runs the floor (`run(true)`) and the balancer (`run(false)`) alternately `rounds` times.
fn alternate_with(
    rounds: usize,
    mut run: impl FnMut(bool) -> anyhow::Result<Duration>,
) -> anyhow::Result<(f64, f64, f64)> {
    let (mut ns, mut floor, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let f = per_packet(run(true)?);
        let t = per_packet(run(false)?);
        ns.push(t);
        floor.push(f);
        ratio.push(t / f);
    }
    Ok((median(&ns), median(&floor), median(&ratio)))
}

fn per_packet(d: Duration) -> f64 {
    d.as_nanos() as f64
}
