//! The hostile client: packets that real networks carry (scanners, clients whose state was
//! lost, spoofers, junk) sent at a health-checked service while an ordinary client keeps
//! making requests. Nothing they send may take a backend out of rotation, fail the ordinary
//! client's requests, or go uncounted. And the floor under ejection: health that fails a
//! whole service never leaves it dark.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use orch_tests::{
    hostile::{
        all_verdicts, counter, demo_with, mac_of, metric, ordinary_client, out_of_rotation,
        segment, send_frames, Kind, RawSender, Rng, KINDS,
    },
    lab::{self, Lab, Orch, CLIENT4, VIP4},
    privilege::require_root,
};

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
            let raw = RawSender::open();
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let mut sent = 0u64;
            // 20 rounds, paced: 20 x 4 sources x 7 kinds x 10 ports = 5,600 segments in ~2 s.
            for _round in 0..20 {
                for src in &sources {
                    for kind in KINDS {
                        for _ in 0..10 {
                            let port = 1024 + (rng.roll() % 30_000) as u16;
                            let seg = segment(
                                SocketAddrV4::new(*src, port),
                                SocketAddrV4::new(VIP4, 80),
                                kind,
                                rng.roll() as u32,
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
            let raw = RawSender::open();
            let mut rng = Rng(0x2545_f491_4f6c_dd1d);
            let mut sent = 0u64;
            for _ in 0..20 {
                for _ in 0..200 {
                    let port = 1024 + (rng.roll() % 30_000) as u16;
                    let mut p = segment(
                        SocketAddrV4::new(CLIENT4, port),
                        SocketAddrV4::new(VIP4, 80),
                        Kind::Ack,
                        rng.roll() as u32,
                    );
                    // Flip one to three bytes past the ports (the kernel rewrites the IP
                    // header's length and checksum; the ports keep it aimed at the VIP).
                    for _ in 0..1 + rng.roll() % 3 {
                        let at = 24 + (rng.roll() as usize % (p.len() - 24));
                        p[at] ^= 1 << (rng.roll() % 8);
                    }
                    if rng.roll().is_multiple_of(4) {
                        p.truncate(20 + (rng.roll() as usize % 20));
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

#[test]
fn an_idle_keepalive_connection_survives_any_churn_and_closed_ones_leave() {
    if !require_root("an_idle_keepalive_connection_survives_any_churn_and_closed_ones_leave") {
        return;
    }
    let lab = Lab::new("churn", 3).expect("building the lab");
    // The smallest tables orch accepts, so that the churn is several times their size, and
    // a 1 s close timeout so that the test need not wait long for closed connections.
    let config = demo_with(
        "conntrack_capacity = 1024\nconntrack_new_capacity = 1024\ntcp_close_timeout_secs = 1",
    );
    let orch = lab
        .start_orch(&lab::orch_bin(), &config)
        .expect("starting orch");
    let vip = SocketAddr::from((VIP4, 80));
    const CHURN: usize = 4000;
    let (first, again, failed) = lab
        .client
        .run(move || {
            let mut idle = lab::LineConn::connect(vip).expect("the keep-alive connection");
            let first = idle.ask("before").expect("first request");
            // Short connections, four times the tables' capacity, while it waits.
            let failed = (0..CHURN)
                .filter(|i| lab::tcp_ask(vip, &format!("churn {i}")).is_err())
                .count();
            let again = idle.ask("after");
            (first, again, failed)
        })
        .expect("client");
    let again = again.unwrap_or_else(|e| {
        panic!(
            "the idle connection broke after the churn: {e}\n{}",
            orch.log()
        )
    });
    eprintln!("{CHURN} short connections, {failed} failed; the idle connection answered by {first}, then {again}");
    assert_eq!(again, first, "the idle connection moved to another backend");
    assert_eq!(failed, 0, "short connections failed");
    // Closed connections leave the table: within the close timeout plus a sweep (1 s each),
    // only the keep-alive connection's two entries remain.
    let settled = lab::wait_until(Duration::from_secs(10), || {
        metric(&lab, "orch_conntrack_entries", &[]) <= 2.0
    });
    assert!(
        settled.is_some(),
        "closed connections stay in the table: {} entries",
        metric(&lab, "orch_conntrack_entries", &[])
    );
    assert!(
        metric(
            &lab,
            "orch_conntrack_expired_total",
            &[("reason", "closed")]
        ) > 0.0
    );
}

#[test]
fn packets_claiming_a_backend_address_from_the_client_side_change_nothing() {
    if !require_root("packets_claiming_a_backend_address_from_the_client_side_change_nothing") {
        return;
    }
    let lab = Lab::new("spoof", 3).expect("building the lab");
    let orch = lab
        .start_orch(&lab::orch_bin(), &lab::demo_config())
        .expect("starting orch");
    let vip = SocketAddr::from((VIP4, 80));
    thread::sleep(Duration::from_secs(1));
    let (conn, name) = lab
        .client
        .run(move || {
            let mut c = lab::LineConn::connect(vip)?;
            let name = c.ask("hello")?;
            Ok::<_, std::io::Error>((c, name))
        })
        .expect("client")
        .expect("a connection");
    let client = conn.local_addr().unwrap();
    let SocketAddr::V4(client) = client else {
        panic!("IPv4 lab")
    };
    // The backend that answered, as its name says ("backend-2" is 198.18.2.2).
    let index: usize = name
        .trim_start_matches("backend-")
        .parse()
        .expect("backend-N");
    let backend = SocketAddrV4::new(lab::backend4(index), lab::TCP_PORT);

    // A host on the client side sends, as that backend, segments of the client's
    // connection (data, a reset, a SYN-ACK) and of new ones, to the load balancer's MAC.
    let (src_mac, dst_mac) = (mac_of(&lab.client, "eth0"), mac_of(&lab.lb, "ext"));
    let mut frames = Vec::new();
    for (i, kind) in [Kind::Psh, Kind::Rst, Kind::RstAck, Kind::SynAck, Kind::Ack]
        .iter()
        .cycle()
        .take(50)
        .enumerate()
    {
        let mut f = Vec::new();
        f.extend_from_slice(&dst_mac);
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend(segment(backend, client, *kind, 7000 + i as u32));
        frames.push(f);
    }
    let before = counter(&lab, "drop_reply_interface");
    let sent = frames.len();
    lab.client
        .run(move || send_frames("eth0", &frames))
        .expect("sending");
    let want = before + sent as f64;
    lab::wait_until(Duration::from_secs(5), || {
        counter(&lab, "drop_reply_interface") >= want
    });
    assert_eq!(counter(&lab, "drop_reply_interface"), want);

    // The connection is untouched: the next answer comes from the same backend, and the
    // client's stack saw nothing of the forgeries (a translated RST would have closed it).
    let mut conn = conn;
    let again = lab
        .client
        .run(move || conn.ask("still there"))
        .expect("client")
        .unwrap_or_else(|e| panic!("the connection broke: {e}\n{}", orch.log()));
    assert_eq!(again, name);
    assert_eq!(out_of_rotation(&orch), Vec::<String>::new());
    assert_eq!(counter(&lab, "drop_refused"), 0.0);
}

/// A TCP connection to `to` from the fixed local address `from` (bound before connecting,
/// with SO_REUSEADDR so that a second connection to another destination may share it).
fn connect_from(from: SocketAddr, to: SocketAddr) -> std::io::Result<lab::LineConn> {
    use std::os::fd::FromRawFd;
    let sockaddr = |a: SocketAddr| {
        let SocketAddr::V4(a) = a else {
            panic!("IPv4 lab")
        };
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            },
            sin_zero: [0; 8],
        }
    };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on an fd owned at once by the TcpStream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
        let local = sockaddr(from);
        if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sockaddr(to);
        if libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lab::LineConn::from_stream(stream)
    }
}

#[test]
fn two_services_sharing_backends_keep_one_clients_connections_apart() {
    if !require_root("two_services_sharing_backends_keep_one_clients_connections_apart") {
        return;
    }
    let lab = Lab::new("shared", 3).expect("building the lab");
    // A second service on the same VIP, another port, the same three backends.
    let config = format!(
        "{}\n[[service]]\nname = \"web2\"\nvip = \"198.19.0.1\"\nport = 81\nprotocol = \"tcp\"\n\
         backend = [\n  {{ address = \"198.18.1.2:8080\" }},\n  {{ address = \"198.18.2.2:8080\" }},\n  \
         {{ address = \"198.18.3.2:8080\" }},\n]\n",
        lab::demo_config()
    );
    let orch = lab
        .start_orch(&lab::orch_bin(), &config)
        .expect("starting orch");
    let (web, web2) = (SocketAddr::from((VIP4, 80)), SocketAddr::from((VIP4, 81)));
    // Several rounds: one local port, two connections, one to each service. Round-robin
    // sends some pairs to the same backend first, where both reply 4-tuples would clash.
    let results = lab
        .client
        .run(move || {
            // One CPU: both services' per-CPU cursors then walk the same order in step, so
            // every round's second connection meets the first one's backend.
            lab::pin_current_thread(0).expect("pinning to CPU 0");
            (0..6u16)
                .map(|i| {
                    let from = SocketAddr::from((CLIENT4, 45_000 + i));
                    let mut a = connect_from(from, web)?;
                    let mut b = connect_from(from, web2)?;
                    let (x, y) = (a.ask("to web")?, b.ask("to web2")?);
                    // Both again, interleaved: each connection keeps its own replies.
                    Ok::<_, std::io::Error>((
                        x.clone(),
                        y.clone(),
                        a.ask("web again")?,
                        b.ask("web2 again")?,
                    ))
                })
                .collect::<Vec<_>>()
        })
        .expect("client");
    for (i, r) in results.into_iter().enumerate() {
        let (x, y, x2, y2) = r.unwrap_or_else(|e| panic!("round {i}: {e}\n{}", orch.log()));
        assert_eq!(
            (x.as_str(), y.as_str()),
            (x2.as_str(), y2.as_str()),
            "round {i}"
        );
        assert_ne!(
            x, y,
            "round {i}: both connections on one backend from one port"
        );
    }
    let collisions = metric(&lab, "orch_conntrack_reply_collisions_total", &[]);
    eprintln!("reply-key collisions met and avoided: {collisions}");
    assert!(collisions >= 1.0, "the test never met a collision");
    assert_eq!(
        counter(&lab, "drop_reply_collision"),
        0.0,
        "another backend was free each time"
    );
}

/// orch's VIP routes in the load balancer's namespace, as `ip route` prints them.
fn vip_routes(lab: &Lab) -> String {
    let v4 = lab.lb.ip(&["route", "show", "proto", "79"]).unwrap();
    let v6 = lab.lb.ip(&["-6", "route", "show", "proto", "79"]).unwrap();
    format!("{v4}{v6}")
}

/// The load balancer namespace's count of ICMP destination-unreachable messages sent.
fn icmp_unreachables_sent(lab: &Lab) -> u64 {
    let snmp = lab.lb.exec("cat", &["/proc/net/snmp"]).unwrap();
    let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp:"));
    let (names, values) = (icmp.next().unwrap(), icmp.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "OutDestUnreachs")
        .and_then(|(_, v)| v.parse().ok())
        .expect("OutDestUnreachs in /proc/net/snmp")
}

#[test]
fn vip_traffic_that_orch_does_not_steer_is_answered_never_looped() {
    if !require_root("vip_traffic_that_orch_does_not_steer_is_answered_never_looped") {
        return;
    }
    let lab = Lab::new("loop", 3).expect("building the lab");
    // A topology where a loop is possible, as behind a real upstream router: the load
    // balancer's default route leads back to the client side, and the client side forwards
    // VIP traffic to the load balancer.
    lab.lb
        .ip(&["route", "add", "default", "via", "198.18.0.2"])
        .unwrap();
    lab.client
        .sysctl("net.ipv4.conf.all.forwarding", "1")
        .unwrap();
    let orch = lab
        .start_orch(&lab::orch_bin(), &lab::demo_config())
        .expect("starting orch");
    lab::wait_until(Duration::from_secs(5), || {
        let r = vip_routes(&lab);
        r.contains("unreachable 198.19.0.1") && r.contains("unreachable 2001:db8:ff::1")
    })
    .unwrap_or_else(|| panic!("no VIP routes: {:?}\n{}", vip_routes(&lab), orch.log()));

    // A port no service listens on: answered at once (ICMP host unreachable), not
    // forwarded round the loop until its TTL runs out (the client would wait for its
    // timeout).
    let before = icmp_unreachables_sent(&lab);
    let no_service = SocketAddr::from((VIP4, 9999));
    let (outcome, took) = lab
        .client
        .run(move || {
            let start = std::time::Instant::now();
            let r = std::net::TcpStream::connect_timeout(&no_service, Duration::from_secs(5));
            (r.map(drop), start.elapsed())
        })
        .expect("client");
    let err = outcome.expect_err("nothing listens on the VIP's port 9999");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EHOSTUNREACH),
        "{err} after {took:?}"
    );
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    assert!(
        icmp_unreachables_sent(&lab) > before,
        "the answer is counted"
    );
    // The service port still works.
    let web = SocketAddr::from((VIP4, 80));
    lab.client
        .run(move || lab::tcp_ask(web, "hello"))
        .expect("client")
        .expect("the service answers");

    // Routes follow the services: one added through the CLI gets its route, and loses it
    // when removed.
    let out = orch
        .cli(&[
            "service",
            "add",
            "api",
            "198.19.0.9:80",
            "--backend",
            "198.18.1.2:8080",
        ])
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr_text());
    lab::wait_until(Duration::from_secs(5), || {
        vip_routes(&lab).contains("198.19.0.9")
    })
    .expect("the new VIP's route");
    let out = orch.cli(&["service", "rm", "api"]).unwrap();
    assert!(out.status.success(), "{}", out.stderr_text());
    lab::wait_until(Duration::from_secs(5), || {
        !vip_routes(&lab).contains("198.19.0.9")
    })
    .expect("the removed VIP's route gone");
}

#[test]
fn a_service_whose_backends_all_fail_their_checks_panics_instead_of_going_dark() {
    if !require_root("a_service_whose_backends_all_fail_their_checks_panics_instead_of_going_dark")
    {
        return;
    }
    let lab = Lab::new("floor", 3).expect("building the lab");
    let orch = lab
        .start_orch(&lab::orch_bin(), &lab::demo_config())
        .expect("starting orch");
    let addr = |i: usize| format!("{}:{}", lab::backend4(i), lab::TCP_PORT);
    thread::sleep(Duration::from_secs(2));
    let status = |orch: &Orch| orch.cli(&["status"]).unwrap().stdout_text();
    // Whether `orch status` lists `web` in its "panic:" line (web6, on the same backends,
    // has a line of its own to be in).
    let web_panics = |orch: &Orch| {
        status(orch).lines().any(|l| {
            l.strip_prefix("panic:").is_some_and(|rest| {
                let names = rest.split(" (").next().unwrap_or("");
                names.split(',').any(|n| n.trim() == "web")
            })
        })
    };
    assert!(!web_panics(&orch), "{}", status(&orch));

    // Every backend fails its checks: the service keeps all three in rotation, and says so.
    for b in &lab.backends {
        b.set_up(false);
    }
    lab::wait_until(Duration::from_secs(15), || {
        orch.backend_rows("web")
            .iter()
            .all(|b| b["health"] == "unhealthy")
    })
    .unwrap_or_else(|| panic!("the backends were not judged unhealthy\n{}", orch.log()));
    for i in 1..=3 {
        assert!(
            orch.backend_row("web", &addr(i))["in_rotation"] == true,
            "backend-{i} left rotation"
        );
    }
    assert!(web_panics(&orch), "{}", status(&orch));
    let show = orch.cli(&["service", "show", "web"]).unwrap().stdout_text();
    assert!(show.contains("PANIC"), "{show}");
    let metrics = lab.metrics().unwrap();
    let samples = orch_tests::prom::parse(&metrics);
    assert_eq!(
        orch_tests::prom::get(&samples, "orch_service_panic", &[("service", "web")]),
        1.0
    );
    let logged = |what: &str| {
        orch.log()
            .lines()
            .any(|l| l.contains(what) && l.split_whitespace().any(|w| w == "service=web"))
    };
    assert!(logged("panic, balancing over every enabled backend"));

    // One back is still below half: panic holds. Two back: health is trusted again, and the
    // one still down leaves the rotation.
    lab.backends[0].set_up(true);
    lab::wait_until(Duration::from_secs(15), || {
        orch.backend_row("web", &addr(1))["health"] == "healthy"
    })
    .expect("backend-1 healthy again");
    assert!(web_panics(&orch), "{}", status(&orch));
    lab.backends[1].set_up(true);
    lab::wait_until(Duration::from_secs(15), || {
        orch.backend_row("web", &addr(3))["in_rotation"] == false
    })
    .unwrap_or_else(|| panic!("panic did not end\n{}", orch.log()));
    assert!(!web_panics(&orch), "{}", status(&orch));
    assert!(logged("panic over"), "{}", orch.log());
}
