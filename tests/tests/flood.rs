//! A spoofed SYN flood at the highest rate the lab generates, for 30 s, against a service
//! with established connections and an ordinary client. In a test binary of its own: it
//! takes the machine's cores, and tests running beside it would measure that instead.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use orch_tests::{
    hostile::{ordinary_client, out_of_rotation, segment, Kind, RawSender},
    lab::{self, Lab, VIP4},
    privilege::require_root,
    prom,
};

/// A metric read while the flood keeps the cores busy: a scrape may miss the client's 3 s
/// timeout, so up to ten tries, a second apart, before giving up.
fn busy_metric(lab: &Lab, name: &str) -> f64 {
    for _ in 0..10 {
        if let Ok(text) = lab.metrics() {
            return prom::get(&prom::parse(&text), name, &[]);
        }
        thread::sleep(Duration::from_secs(1));
    }
    panic!("/metrics did not answer in ten tries during the flood");
}

#[test]
fn a_spoofed_syn_flood_costs_no_established_connection() {
    if !require_root("a_spoofed_syn_flood_costs_no_established_connection") {
        return;
    }
    let lab = Lab::new("flood", 3).expect("building the lab");
    let orch = lab
        .start_orch(&lab::orch_bin(), &lab::demo_config())
        .expect("starting orch");
    let vip = SocketAddr::from((VIP4, 80));
    thread::sleep(Duration::from_secs(1));

    // Established connections, held open through the flood.
    const HELD: usize = 12;
    let held = lab
        .client
        .run(move || {
            (0..HELD)
                .map(|i| {
                    let mut c = lab::LineConn::connect(vip)?;
                    let name = c.ask(&format!("held {i}"))?;
                    Ok((c, name))
                })
                .collect::<std::io::Result<Vec<_>>>()
        })
        .expect("client")
        .expect("opening the held connections");

    let stop = Arc::new(AtomicBool::new(false));
    let client = ordinary_client(&lab, stop.clone());
    // The flood: SYNs from random spoofed sources in 198.18.128.0/17, as fast as one thread
    // sends them, for 30 s (and at most 20 million).
    const FLOOD: Duration = Duration::from_secs(30);
    let flood = lab
        .client
        .spawn(move || {
            let raw = RawSender::open();
            // One segment, a new flow each time: the source address (198.18.128.0/17) and
            // port change per packet, the TCP checksum follows incrementally (RFC 1624), so
            // the backends answer every SYN as they would a real one.
            let mut seg = segment(
                SocketAddrV4::new(Ipv4Addr::new(198, 18, 128, 1), 1024),
                SocketAddrV4::new(VIP4, 80),
                Kind::Syn,
                12345,
            );
            let start = Instant::now();
            let mut sent = 0u64;
            let mut n = 0u32;
            while start.elapsed() < FLOOD && sent < 20_000_000 {
                for _ in 0..256 {
                    n = n.wrapping_add(1);
                    let host = (0x8000 | (n & 0x7fff)) as u16;
                    let port = 1024 + (n >> 15) as u16 % 60_000;
                    // Checksum words as raw loads (byte order does not matter to the sum).
                    let word = |seg: &[u8], at: usize| u16::from_ne_bytes([seg[at], seg[at + 1]]);
                    let (new_host, new_port) = (host.to_be_bytes(), port.to_be_bytes());
                    let check = orch_common::csum::Delta::new()
                        .replace_u16(word(&seg, 14), u16::from_ne_bytes(new_host))
                        .replace_u16(word(&seg, 20), u16::from_ne_bytes(new_port))
                        .apply(word(&seg, 36));
                    seg[14..16].copy_from_slice(&new_host);
                    seg[20..22].copy_from_slice(&new_port);
                    seg[36..38].copy_from_slice(&check.to_ne_bytes());
                    if raw.try_send(&seg, VIP4) {
                        sent += 1;
                    }
                }
            }
            (sent, start.elapsed())
        })
        .expect("flood thread");
    // Mid-flood: the flood is seen, and only in the unconfirmed table.
    thread::sleep(Duration::from_secs(15));
    let flood_gauge = busy_metric(&lab, "orch_conntrack_flood");
    let unconfirmed = busy_metric(&lab, "orch_conntrack_unconfirmed_entries");
    let (sent, took) = flood.join().expect("flood");
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = client.join().expect("ordinary client");
    let rate = sent as f64 / took.as_secs_f64();
    eprintln!(
        "SYN flood: {sent} spoofed SYNs in {took:.1?} ({rate:.0}/s); mid-flood {unconfirmed} \
         unconfirmed entries, flood gauge {flood_gauge}; ordinary client {ok} ok, {} failed: \
         {failed:?}",
        failed.len()
    );
    assert_eq!(flood_gauge, 1.0, "the flood state is exported");
    // The flood recycled the table: the kernel's evictions are counted, no more than the
    // entries the flood could have inserted (two per SYN).
    let evicted = busy_metric(&lab, "orch_conntrack_unconfirmed_evictions_total");
    eprintln!("evictions from the unconfirmed table: {evicted}");
    assert!(
        evicted > 0.0 && evicted <= 2.0 * sent as f64,
        "{evicted} evictions for {sent} SYNs"
    );

    // Every held connection is alive, on its backend.
    let answers = lab
        .client
        .run(move || {
            held.into_iter()
                .enumerate()
                .map(|(i, (mut c, name))| (name, c.ask(&format!("after {i}"))))
                .collect::<Vec<_>>()
        })
        .expect("client");
    for (i, (before, after)) in answers.into_iter().enumerate() {
        match after {
            Ok(after) => assert_eq!(after, before, "held connection {i} moved"),
            Err(e) => panic!(
                "held connection {i} broke in the flood: {e}\n{}",
                orch.log()
            ),
        }
    }
    // New connections kept being made. The bound, 20 % of the ordinary client's attempts:
    // at the rate one thread reaches here (180,000-270,000 SYNs a second) the unconfirmed
    // table (262,144 entries, two per SYN) turns over in 0.5-0.7 s, and with the flood
    // generator, the three backends answering every spoofed SYN, the load balancer and the
    // client sharing two cores, some real handshakes take longer than that: their entry is
    // recycled before the client's ACK, and the request times out (seen: 0-5 of 46-150,
    // up to 9.4 %). The held connections above are what the flood must never touch.
    assert!(ok >= 20, "the ordinary client made only {ok} requests");
    assert!(
        failed.len() * 5 <= ok + failed.len(),
        "{} of {} ordinary requests failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(out_of_rotation(&orch), Vec::<String>::new());
}
