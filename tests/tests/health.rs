//! End-to-end tests of health checking: a backend that dies leaves the rotation and comes
//! back when it recovers, with real traffic through the lab.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use orch_tests::{
    lab::{self, Lab, VIP4},
    privilege::require_root,
};

#[test]
fn a_dead_backend_leaves_the_rotation_and_returns_when_it_recovers() {
    if !require_root("a_dead_backend_leaves_the_rotation_and_returns_when_it_recovers") {
        return;
    }
    let lab = Lab::new("dead", 3).expect("building the lab");
    let config = lab::demo_config();
    let orch = lab
        .start_orch(&lab::orch_bin(), &config)
        .expect("starting orch");
    let vip = SocketAddr::from((VIP4, 80));
    let dead = "198.18.2.2:8080";
    // Let the checks settle into their stable (slow) interval before the failure.
    thread::sleep(Duration::from_secs(3));
    assert!(orch.in_rotation("web", dead));

    // Kill backend-2 while a client keeps opening connections (on its own thread: the
    // detection time is measured apart from the client's pace).
    lab.backends[1].set_up(false);
    let killed = Instant::now();
    // The lab closes the listener within 100 ms.
    thread::sleep(Duration::from_millis(150));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        lab.client
            .spawn(move || {
                let (mut ok, mut failed, mut to_dead) = (0usize, 0usize, 0usize);
                let deadline = Instant::now() + Duration::from_secs(20);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline
                {
                    match lab::tcp_ask(vip, "are you there") {
                        Ok(name) if name == "backend-2" => to_dead += 1,
                        Ok(_) => ok += 1,
                        Err(_) => failed += 1,
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                (ok, failed, to_dead)
            })
            .unwrap()
    };
    lab::wait_until(Duration::from_secs(15), || !orch.in_rotation("web", dead)).unwrap_or_else(
        || {
            panic!(
                "backend-2 still in rotation 15 s after it died\n{}",
                orch.log()
            )
        },
    );
    // Counted from the kill (the listener closes within its first 100 ms).
    let detected = killed.elapsed();
    // Keep the client going a little longer: nothing may fail after detection either.
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed, to_dead) = client.join().expect("client thread");
    eprintln!(
        "dead backend out of rotation {detected:?} after it died; the client meanwhile made \
         {ok} successful connections and {failed} failed attempts"
    );
    // The data plane drops the dead backend's RST to a SYN and ejects it: the client's SYN
    // retransmission lands on a live backend, so no attempt fails (it takes a second longer).
    assert_eq!(
        failed, 0,
        "connection attempts failed while the backend was dying"
    );
    assert_eq!(
        to_dead, 0,
        "nothing answers as backend-2 once its server is closed"
    );
    assert!(ok > 0);
    let row = orch
        .backend_rows("web")
        .into_iter()
        .find(|b| b["address"] == dead)
        .unwrap();
    assert_eq!(row["health"], "unhealthy", "{row}");

    // From now on every new connection succeeds, on the two live backends.
    let names = lab
        .client
        .run(move || {
            (0..60)
                .map(|i| lab::tcp_ask(vip, &format!("after {i}")))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("a connection failed after detection: {e}\n{}", orch.log()));
    assert!(names.iter().all(|n| n != "backend-2"), "{names:?}");
    for live in ["backend-1", "backend-3"] {
        assert!(names.iter().any(|n| n == live), "{live} missing: {names:?}");
    }

    // Revive it: it returns to the rotation (after `rise` good probes) and takes
    // connections again.
    lab.backends[1].set_up(true);
    let back = lab::wait_until(Duration::from_secs(15), || orch.in_rotation("web", dead))
        .unwrap_or_else(|| panic!("backend-2 did not come back\n{}", orch.log()));
    eprintln!("revived backend back in rotation after {back:?}");
    let names = lab
        .client
        .run(move || {
            (0..30)
                .map(|i| lab::tcp_ask(vip, &format!("back {i}")))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap()
        .unwrap();
    assert!(names.iter().any(|n| n == "backend-2"), "{names:?}");
}

#[test]
fn a_slow_backend_trips_its_breaker_and_recovery_closes_it() {
    if !require_root("a_slow_backend_trips_its_breaker_and_recovery_closes_it") {
        return;
    }
    let lab = Lab::new("slow", 3).expect("building the lab");
    let config = lab::demo_config();
    let orch = lab
        .start_orch(&lab::orch_bin(), &config)
        .expect("starting orch");
    let http = |i: usize| format!("{}:{}", lab::backend4(i), lab::HTTP_PORT);
    let add = orch
        .cli(&[
            "service",
            "add",
            "slowweb",
            "198.19.0.4:80",
            "--check",
            "http:/",
            "--backend",
            &http(1),
            "--backend",
            &http(2),
        ])
        .unwrap();
    assert!(add.status.success(), "{}", add.stderr_text());
    let vip = SocketAddr::from(([198, 19, 0, 4], 80));
    let slow = http(2);

    // Let the breaker learn the normal latency (probes every 0.5 s while new).
    thread::sleep(Duration::from_secs(2));
    assert_eq!(orch.backend_row("slowweb", &slow)["breaker"], "closed");

    // backend-2 keeps accepting but answers in 300 ms: far above twice what was learned,
    // well within the probe timeout (1 s), so the health check alone still says healthy.
    lab.backends[1].set_delay(Duration::from_millis(300));
    let tripped = lab::wait_until(Duration::from_secs(20), || {
        orch.backend_row("slowweb", &slow)["breaker"] == "open"
    })
    .unwrap_or_else(|| panic!("the breaker did not open\n{}", orch.log()));
    let row = orch.backend_row("slowweb", &slow);
    eprintln!("slow backend's breaker open after {tripped:?}: {row}");
    assert_eq!(row["health"], "healthy", "slow, not failing: {row}");
    assert_eq!(row["in_rotation"], false);
    let names = lab
        .client
        .run(move || {
            (0..10)
                .map(|_| lab::http_get(vip))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("HTTP through the VIP failed: {e}\n{}", orch.log()));
    assert!(names.iter().all(|n| n == "backend-1"), "{names:?}");

    // It recovers: half-open after the backoff, three good trials, closed, back in rotation.
    lab.backends[1].set_delay(Duration::ZERO);
    let closed = lab::wait_until(Duration::from_secs(20), || {
        orch.backend_row("slowweb", &slow)["breaker"] == "closed"
    })
    .unwrap_or_else(|| panic!("the breaker did not close again\n{}", orch.log()));
    eprintln!("recovered backend's breaker closed after {closed:?}");
    assert!(orch.in_rotation("slowweb", &slow));
    let log = orch.log().replace('"', "");
    for step in [
        "from=closed to=open",
        "from=open to=half-open",
        "from=half-open to=closed",
    ] {
        assert!(log.contains(step), "missing {step:?} in the log");
    }
    let names = lab
        .client
        .run(move || {
            (0..10)
                .map(|_| lab::http_get(vip))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap()
        .unwrap();
    assert!(names.iter().any(|n| n == "backend-2"), "{names:?}");
}

#[test]
fn probe_rate_for_24_services_of_3_backends() {
    if !require_root("probe_rate_for_24_services_of_3_backends") {
        return;
    }
    let lab = Lab::new("probes", 3).expect("building the lab");
    let interfaces: Vec<String> = lab
        .lb_interfaces()
        .iter()
        .map(|i| format!("{i:?}"))
        .collect();
    let config = format!("[dataplane]\ninterfaces = [{}]\n", interfaces.join(", "));
    let orch = lab
        .start_orch(&lab::orch_bin(), &config)
        .expect("starting orch");
    for i in 1..=24 {
        let vip = format!("198.19.3.{i}:80");
        let name = format!("svc{i}");
        let mut args = vec!["service", "add", &name, &vip];
        let backends: Vec<String> = (1..=3)
            .map(|b| format!("{}:{}", lab::backend4(b), lab::TCP_PORT))
            .collect();
        for b in &backends {
            args.extend(["--backend", b.as_str()]);
        }
        let out = orch.cli(&args).unwrap();
        assert!(out.status.success(), "{}", out.stderr_text());
    }
    let probes = || -> u64 {
        let out = orch.cli(&["status", "--json"]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out.stdout_text()).unwrap();
        v["status"]["probes_total"].as_u64().unwrap()
    };
    // New backends are probed every 0.5 s until they prove stable; then every ~20 s.
    thread::sleep(Duration::from_secs(15));
    let (p0, t0) = (probes(), Instant::now());
    thread::sleep(Duration::from_secs(20));
    let (p1, t1) = (probes(), Instant::now());
    let per_minute = (p1 - p0) as f64 * 60.0 / (t1 - t0).as_secs_f64();
    eprintln!(
        "24 services x 3 healthy backends, steady state, no traffic: {per_minute:.0} probes per \
         minute ({} in {:?})",
        p1 - p0,
        t1 - t0
    );
    // 72 backends at one probe per 20 s +/- 10 % is 216 a minute once every check is stable
    // (the window above still sees some settle); the target is under 300, and a Kubernetes
    // fleet of this size was measured at 2,400. Fewer than 150 would mean checks stopped.
    assert!(
        (150.0..300.0).contains(&per_minute),
        "{per_minute:.0} probes per minute"
    );
}

/// What a client saw of one connection attempt while a backend went dark.
struct Attempt {
    started: Instant,
    took: Duration,
    answered: Result<String, String>,
}

/// Opens connections to `vip` one after another (10 ms apart) until `stop` or 20 s.
fn attempts_until(
    lab: &Lab,
    vip: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> thread::JoinHandle<Vec<Attempt>> {
    lab.client
        .spawn(move || {
            let mut seen = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let started = Instant::now();
                let answered = lab::tcp_ask(vip, "are you there").map_err(|e| e.to_string());
                seen.push(Attempt {
                    started,
                    took: started.elapsed(),
                    answered,
                });
                thread::sleep(Duration::from_millis(10));
            }
            seen
        })
        .unwrap()
}

/// A backend's host goes dark (its link down: no RST, no answer at all) while clients
/// open connections: the data plane sees a SYN go unanswered far longer than the usual
/// handshake, a quick probe confirms, and the backend is out of rotation in under a second.
/// A client whose SYN went to the dark host is rebalanced by its retransmission (a second
/// later, the client's own timer), so no connection opened after the host went dark fails.
#[test]
fn a_host_gone_dark_leaves_the_rotation_within_a_second() {
    if !require_root("a_host_gone_dark_leaves_the_rotation_within_a_second") {
        return;
    }
    let lab = Lab::new("dark", 3).expect("building the lab");
    let orch = lab
        .start_orch(&lab::orch_bin(), &lab::demo_config())
        .expect("starting orch");
    let vip = SocketAddr::from((VIP4, 80));
    let dark = "198.18.2.2:8080";
    thread::sleep(Duration::from_secs(2));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Three clients, as a service has: one whose connection was open on the host when it went
    // dark waits out its timeout, and the others keep opening connections meanwhile.
    let clients: Vec<_> = (0..3)
        .map(|_| attempts_until(&lab, vip, stop.clone()))
        .collect();
    // Traffic first: the data plane learns the usual handshake.
    thread::sleep(Duration::from_millis(800));
    assert!(orch.in_rotation("web", dark));
    lab.backends[1]
        .ns
        .ip(&["link", "set", "dev", "eth0", "down"])
        .unwrap();
    let went_dark = Instant::now();
    let out = lab::wait_until(Duration::from_secs(10), || !orch.in_rotation("web", dark));
    let detected = went_dark.elapsed();
    thread::sleep(Duration::from_millis(2500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let attempts: Vec<Attempt> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client thread"))
        .collect();
    assert!(
        out.is_some(),
        "still in rotation 10 s after it went dark\n{}",
        orch.log()
    );
    // Attempts whose first SYN met the dark host: they took the client's retransmission.
    let delayed: Vec<Duration> = attempts
        .iter()
        .filter(|a| a.started >= went_dark && a.took > Duration::from_millis(700))
        .map(|a| a.started - went_dark)
        .collect();
    // A connection already open on the host when it went dark dies with it: no balancer can
    // move it. Every connection opened afterwards must succeed.
    let failed: Vec<&String> = attempts
        .iter()
        .filter(|a| a.started >= went_dark)
        .filter_map(|a| a.answered.as_ref().err())
        .collect();
    eprintln!(
        "dark host out of rotation {detected:?} after it went dark; {} attempts, {} delayed by \
         a retransmission (started {delayed:?} after), {} opened afterwards failed",
        attempts.len(),
        delayed.len(),
        failed.len()
    );
    assert!(
        detected < Duration::from_secs(1),
        "out after {detected:?}\n{}",
        orch.log()
    );
    assert!(
        failed.is_empty(),
        "failed attempts: {failed:?}\n{}",
        orch.log()
    );
    // The last attempt that still met the dark host started within the detection time.
    assert!(
        delayed.iter().all(|d| *d < Duration::from_secs(1)),
        "attempts still sent to the dark host: {delayed:?}"
    );
}

/// One client SYN lost on the way to a healthy backend (dropped once by a netfilter rule in
/// its namespace) makes it suspect for a moment: the quick probe answers, and it stays in
/// rotation. The client's retransmission completes its connection.
#[test]
fn a_single_lost_syn_ejects_nobody() {
    if !require_root("a_single_lost_syn_ejects_nobody") {
        return;
    }
    if !lab::have("nft") {
        let why = "nft (nftables) is not installed: `cargo xtask prereqs` installs it";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new("lostsyn", 3).expect("building the lab");
    let orch = lab
        .start_orch(&lab::orch_bin(), &lab::demo_config())
        .expect("starting orch");
    let vip = SocketAddr::from((VIP4, 80));
    let lossy = "198.18.3.2:8080";
    // Handshakes first, so the data plane knows the usual one.
    lab.client
        .run(move || {
            for i in 0..12 {
                lab::tcp_ask(vip, &format!("warm {i}")).unwrap();
            }
        })
        .unwrap();
    // The client's next SYN to backend-3 is dropped, once: `quota until` matches the first
    // 100 bytes' worth of packets: one SYN (60 bytes), not two.
    let rule = "add table inet lossy
add chain inet lossy input { type filter hook input priority 0; }
add rule inet lossy input ip saddr 198.18.0.2 tcp flags syn quota until 100 bytes drop
";
    let script = lab.scratch_path("lossy.nft");
    std::fs::write(&script, rule).unwrap();
    let loaded = lab.backends[2]
        .ns
        .exec("nft", &["-f", script.to_str().unwrap()]);
    let _ = std::fs::remove_file(&script);
    loaded.expect("loading the rule");
    let names = lab
        .client
        .run(move || {
            (0..9)
                .map(|i| {
                    let t = Instant::now();
                    lab::tcp_ask(vip, &format!("after {i}")).map(|n| (n, t.elapsed()))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("a connection failed: {e}\n{}", orch.log()));
    let retried = names
        .iter()
        .filter(|(_, t)| *t > Duration::from_millis(700))
        .count();
    assert_eq!(retried, 1, "exactly one SYN was dropped: {names:?}");
    // Suspect, probed, cleared: in rotation the whole time, and still after a second.
    let ejected = lab::wait_until(Duration::from_secs(2), || !orch.in_rotation("web", lossy));
    assert!(
        ejected.is_none(),
        "a lost SYN ejected backend-3\n{}",
        orch.log()
    );
}
