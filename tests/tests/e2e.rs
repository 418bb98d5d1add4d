//! End-to-end: the real `orch` binary in a load-balancer namespace, real servers in backend
//! namespaces, real clients in a client namespace. Everything is created by the test and
//! removed when it ends, also when it fails (the lab and the daemon clean up on drop).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use orch_tests::{
    lab::{self, Lab, LineConn, Orch, VIP4, VIP6},
    privilege::require_root,
};

/// A lab with three backends and orch running the shipped example config.
fn lab_with_orch(tag: &str) -> (Lab, Orch) {
    let lab = Lab::new(tag, 3).expect("building the lab");
    let config = lab::demo_config();
    let orch = lab
        .start_orch(&lab::orch_bin(), &config)
        .expect("starting orch");
    (lab, orch)
}

fn tally(names: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for n in names {
        *t.entry(n).or_insert(0) += 1;
    }
    t
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Asserts `n` connections spread over the three backends as round-robin must: each gets
/// n/3 +/- the number of CPUs (each CPU keeps its own cursor).
fn assert_round_robin(t: &BTreeMap<String, usize>, n: usize, orch: &Orch) {
    assert_eq!(t.values().sum::<usize>(), n, "{t:?}");
    assert_eq!(
        t.len(),
        3,
        "every backend must be used: {t:?}\n{}",
        orch.log()
    );
    let cpus = cpus();
    for (name, &count) in t {
        assert!(
            count.abs_diff(n / 3) <= cpus,
            "{name} got {count} of {n} connections (want {} +/- {cpus}): {t:?}",
            n / 3
        );
    }
}

#[test]
fn tcp_connections_spread_round_robin() {
    if !require_root("tcp_connections_spread_round_robin") {
        return;
    }
    let (lab, orch) = lab_with_orch("rr");
    const N: usize = 300;
    let vip = SocketAddr::from((VIP4, 80));
    let names = lab
        .client
        .run(move || {
            (0..N)
                .map(|i| lab::tcp_ask(vip, &format!("hello {i}")))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("a connection to the VIP failed: {e}\n{}", orch.log()));
    let t = tally(names);
    eprintln!("300 TCP connections: {t:?}");
    assert_round_robin(&t, N, &orch);
}

#[test]
fn a_connection_stays_on_its_backend() {
    if !require_root("a_connection_stays_on_its_backend") {
        return;
    }
    let (lab, orch) = lab_with_orch("sticky");
    let vip = SocketAddr::from((VIP4, 80));
    // Several connections open at once, their requests interleaved: each must keep talking to
    // the backend its first packet chose, while new connections keep rotating.
    let per_conn = lab
        .client
        .run(move || -> std::io::Result<Vec<Vec<String>>> {
            let mut conns = (0..6)
                .map(|_| LineConn::connect(vip))
                .collect::<Result<Vec<_>, _>>()?;
            let mut answers = vec![Vec::new(); conns.len()];
            for round in 0..20 {
                for (i, c) in conns.iter_mut().enumerate() {
                    answers[i].push(c.ask(&format!("conn {i} round {round}"))?);
                }
            }
            Ok(answers)
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("exchange failed: {e}\n{}", orch.log()));
    for (i, answers) in per_conn.iter().enumerate() {
        assert!(
            answers.iter().all(|a| a == &answers[0]),
            "connection {i} moved between backends: {answers:?}"
        );
    }
    let firsts = tally(per_conn.iter().map(|a| a[0].clone()));
    assert_eq!(
        firsts.len(),
        3,
        "6 connections must use all 3 backends: {firsts:?}"
    );
}

#[test]
fn udp_request_response_through_the_vip() {
    if !require_root("udp_request_response_through_the_vip") {
        return;
    }
    let (lab, orch) = lab_with_orch("udp");
    let vip = SocketAddr::from((VIP4, 53));
    const SOCKETS: usize = 30;
    let results = lab
        .client
        .run(
            move || -> std::io::Result<Vec<(String, SocketAddr, Vec<String>)>> {
                let mut out = Vec::new();
                for i in 0..SOCKETS {
                    let sock = lab::udp_socket(vip.ip())?;
                    let (first, from) = lab::udp_ask(&sock, vip, &format!("query {i}"))?;
                    // More datagrams of the same flow: same backend.
                    let rest = (0..3)
                        .map(|j| lab::udp_ask(&sock, vip, &format!("query {i}.{j}")).map(|r| r.0))
                        .collect::<Result<Vec<_>, _>>()?;
                    out.push((first, from, rest));
                }
                Ok(out)
            },
        )
        .unwrap()
        .unwrap_or_else(|e| panic!("UDP through the VIP failed: {e}\n{}", orch.log()));
    for (first, from, rest) in &results {
        assert_eq!(
            *from, vip,
            "the answer must come from the VIP, not the backend"
        );
        assert!(
            rest.iter().all(|r| r == first),
            "a UDP flow moved: {first} then {rest:?}"
        );
    }
    let t = tally(results.into_iter().map(|r| r.0));
    assert_round_robin(&t, SOCKETS, &orch);
}

#[test]
fn ipv6_vip_balances_and_answers_from_the_vip() {
    if !require_root("ipv6_vip_balances_and_answers_from_the_vip") {
        return;
    }
    let (lab, orch) = lab_with_orch("v6");
    let vip = SocketAddr::from((VIP6, 80));
    const N: usize = 30;
    let results = lab
        .client
        .run(move || -> std::io::Result<Vec<(String, SocketAddr)>> {
            (0..N)
                .map(|i| {
                    let mut c = LineConn::connect(vip)?;
                    let name = c.ask(&format!("v6 {i}"))?;
                    Ok((name, c.peer_addr()?))
                })
                .collect()
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("IPv6 through the VIP failed: {e}\n{}", orch.log()));
    assert!(results.iter().all(|(_, peer)| *peer == vip));
    let t = tally(results.into_iter().map(|r| r.0));
    assert_round_robin(&t, N, &orch);
}

#[test]
fn traffic_not_for_a_vip_is_untouched() {
    if !require_root("traffic_not_for_a_vip_is_untouched") {
        return;
    }
    let (lab, orch) = lab_with_orch("pass");
    // Straight to each backend's own address, on the same port the VIP uses and on the UDP
    // port: routed by the load balancer's kernel, answered by the backend that was asked.
    for i in 1..=3 {
        for ip in [
            IpAddr::from(lab::backend4(i)),
            IpAddr::from(lab::backend6(i)),
        ] {
            let tcp = SocketAddr::new(ip, lab::TCP_PORT);
            let udp = SocketAddr::new(ip, lab::UDP_PORT);
            let (t, (u, from)) = lab
                .client
                .run(move || -> std::io::Result<_> {
                    let t = lab::tcp_ask(tcp, "direct")?;
                    let sock = lab::udp_socket(ip)?;
                    Ok((t, lab::udp_ask(&sock, udp, "direct")?))
                })
                .unwrap()
                .unwrap_or_else(|e| panic!("direct traffic to {ip} failed: {e}\n{}", orch.log()));
            assert_eq!(t, format!("backend-{i}"));
            assert_eq!(u, format!("backend-{i}"));
            assert_eq!(from, udp);
        }
    }
}

#[test]
fn detach_on_exit_leaves_nothing_behind() {
    if !require_root("detach_on_exit_leaves_nothing_behind") {
        return;
    }
    let lab = Lab::new("term", 3).expect("building the lab");
    let config = lab::demo_config();
    let mut orch = lab
        .start_orch_with(&lab::orch_bin(), &config, &["--detach-on-exit"])
        .expect("starting orch");
    assert!(orch.attachment().unwrap().iter().all(|(_, on)| *on));
    assert!(orch.pins_left());
    let status = orch.stop().expect("orch stops on SIGTERM");
    assert!(status.success(), "exit status {status}\n{}", orch.log());
    let still: Vec<_> = orch
        .attachment()
        .unwrap()
        .into_iter()
        .filter(|(_, on)| *on)
        .collect();
    assert!(still.is_empty(), "XDP still attached after exit: {still:?}");
    assert!(!orch.pins_left(), "pins left after --detach-on-exit");
    // With orch gone the VIP is no longer served, but plain routing still is.
    let direct = SocketAddr::from((lab::backend4(1), lab::TCP_PORT));
    let name = lab
        .client
        .run(move || lab::tcp_ask(direct, "after"))
        .unwrap()
        .unwrap();
    assert_eq!(name, "backend-1");
}
