//! End-to-end tests of the control plane: the CLI and registry, config hot reload, restarts
//! and crashes of the daemon, all with real traffic through the lab.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use orch_tests::{
    lab::{self, Lab, LineConn, Orch, VIP4},
    privilege::require_root,
};

fn start(tag: &str, config: &str) -> (Lab, Orch) {
    let lab = Lab::new(tag, 3).expect("building the lab");
    let orch = lab
        .start_orch(&lab::orch_bin(), config)
        .expect("starting orch");
    (lab, orch)
}

fn cpus() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// `n` new TCP connections to `vip`, one request each: which backend answered, tallied.
fn spread(lab: &Lab, orch: &Orch, vip: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let names = lab
        .client
        .run(move || {
            (0..n)
                .map(|i| lab::tcp_ask(vip, &format!("req {i}")))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("a connection to {vip} failed: {e}\n{}", orch.log()));
    let mut t = BTreeMap::new();
    for n in names {
        *t.entry(n).or_insert(0) += 1;
    }
    t
}

/// Runs the CLI, expecting success; returns its stdout.
fn ok(orch: &Orch, args: &[&str]) -> String {
    let out = orch.cli(args).expect("running the orch CLI");
    assert!(
        out.status.success(),
        "orch {} failed ({:?}): {}\n{}",
        args.join(" "),
        out.code(),
        out.stderr_text(),
        orch.log()
    );
    out.stdout_text()
}

/// The daemon's `status` as JSON.
fn status(orch: &Orch) -> serde_json::Value {
    let text = ok(orch, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&text).expect("status is JSON");
    v["status"].clone()
}

#[test]
fn cli_changes_steer_traffic_and_bad_input_changes_nothing() {
    if !require_root("cli_changes_steer_traffic_and_bad_input_changes_nothing") {
        return;
    }
    // Room for exactly one service more than the file has.
    let config = lab::demo_config().replace("[dataplane]", "[dataplane]\nmax_services = 4");
    let (lab, orch) = start("cli", &config);
    let api = SocketAddr::from(([198, 19, 0, 2], 80));
    {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let meta = std::fs::metadata(orch.socket()).expect("the admin socket exists");
        assert!(meta.file_type().is_socket());
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o660,
            "admin socket mode"
        );
    }

    ok(
        &orch,
        &[
            "service",
            "add",
            "api",
            "198.19.0.2:80",
            "--backend",
            "198.18.1.2:8080",
            "--backend",
            "198.18.2.2:8080",
        ],
    );
    let t = spread(&lab, &orch, api, 30);
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        ["backend-1", "backend-2"],
        "{t:?}"
    );
    for &n in t.values() {
        assert!(n.abs_diff(15) <= cpus(), "{t:?}");
    }

    ok(&orch, &["backend", "add", "api", "198.18.3.2:8080"]);
    let t = spread(&lab, &orch, api, 30);
    assert_eq!(t.len(), 3, "the new backend takes connections: {t:?}");

    // Drain backend-1: no new connections reach it, an established one keeps working.
    let (mut held, held_on) = lab
        .client
        .run(move || -> std::io::Result<(LineConn, String)> {
            loop {
                let mut c = LineConn::connect(api)?;
                let name = c.ask("hold")?;
                if name == "backend-1" {
                    return Ok((c, name));
                }
            }
        })
        .unwrap()
        .expect("a connection to backend-1");
    ok(&orch, &["backend", "drain", "api", "198.18.1.2:8080"]);
    let t = spread(&lab, &orch, api, 30);
    assert!(
        !t.contains_key("backend-1"),
        "a drained backend got new connections: {t:?}"
    );
    assert_eq!(held.ask("still there").unwrap(), held_on);
    let shown = ok(&orch, &["backend", "list", "api"]);
    assert!(shown.contains("draining"), "{shown}");
    ok(&orch, &["backend", "enable", "api", "198.18.1.2:8080"]);
    let t = spread(&lab, &orch, api, 30);
    assert!(
        t.contains_key("backend-1"),
        "an enabled backend takes connections again: {t:?}"
    );

    // Every bad request is refused with exit code 2, a clear message, and no change.
    let before = ok(&orch, &["service", "list", "--json"]);
    let refused: &[(&[&str], &str)] = &[
        (&["service", "add", "bad", "198.19.0.3:0"], "port 0"),
        (
            &["service", "add", "web2", "198.19.0.1:80"],
            "already the address of service \"web\"",
        ),
        (
            &["service", "add", "api", "198.19.0.9:80"],
            "already exists",
        ),
        (
            &["service", "add", "bad name", "198.19.0.9:80"],
            "must be 1-63 characters",
        ),
        (&["service", "add", "more", "198.19.0.9:80"], "capacity"),
        (&["service", "add", "x", "198.19.0.9"], "invalid value"),
        (&["service", "rm", "nope"], "no service named \"nope\""),
        (
            &["backend", "add", "nope", "198.18.1.2:8080"],
            "no service named",
        ),
        (
            &["backend", "add", "web", "198.18.1.2:9999"],
            "defined in the config file",
        ),
        (
            &["backend", "add", "api", "198.18.1.2:8080"],
            "already has backend",
        ),
        (
            &["backend", "add", "api", "[2001:db8:1::2]:8080"],
            "same IP family",
        ),
        (
            &[
                "backend",
                "add",
                "api",
                "198.18.1.9:8080",
                "--weight",
                "10001",
            ],
            "maximum",
        ),
        (
            &["backend", "drain", "api", "198.18.9.9:1"],
            "has no backend",
        ),
    ];
    for (args, message) in refused {
        let out = orch.cli(args).unwrap();
        assert_eq!(
            out.code(),
            Some(2),
            "orch {}: {}",
            args.join(" "),
            out.stderr_text()
        );
        assert!(
            out.stderr_text().contains(message),
            "orch {}: want {message:?} in {:?}",
            args.join(" "),
            out.stderr_text()
        );
    }
    assert_eq!(ok(&orch, &["service", "list", "--json"]), before);

    ok(&orch, &["service", "rm", "api"]);
    let out = orch.cli(&["service", "show", "api"]).unwrap();
    assert_eq!(out.code(), Some(2));
    let list = ok(&orch, &["service", "list"]);
    assert!(!list.contains("api"), "{list}");
}

#[test]
fn restart_and_reload_drop_nothing() {
    if !require_root("restart_and_reload_drop_nothing") {
        return;
    }
    let (lab, mut orch) = start("restart", &lab::demo_config());
    let vip = SocketAddr::from((VIP4, 80));

    // Long-lived connections talk without pause through everything below. Every answer must
    // come from the connection's first backend and echo exactly what was sent.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let talker = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        lab.client
            .spawn(move || -> Result<Vec<String>, String> {
                let mut conns = (0..6)
                    .map(|_| LineConn::connect(vip))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("connect: {e}"))?;
                let firsts = conns
                    .iter_mut()
                    .map(|c| c.ask("first"))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("first request: {e}"))?;
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut round = 0usize;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    for (i, c) in conns.iter_mut().enumerate() {
                        let name = c
                            .ask(&format!("round {round} conn {i}"))
                            .map_err(|e| format!("round {round} conn {i}: {e}"))?;
                        if name != firsts[i] {
                            return Err(format!("conn {i} moved from {} to {name}", firsts[i]));
                        }
                    }
                    round += 1;
                    rounds.store(round, Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(2));
                }
                Ok(firsts)
            })
            .unwrap()
    };
    let progress = |from: usize| {
        lab::wait_until(Duration::from_secs(10), || {
            rounds.load(Ordering::Relaxed) >= from + 20
        })
        .unwrap_or_else(|| panic!("the long-lived connections stalled\n{}", orch_log_hint()))
    };
    fn orch_log_hint() -> &'static str {
        "(see the daemon log above)"
    }
    progress(0);

    // 1. The daemon stops: the data plane stays, connections keep flowing, new ones too.
    let exit = orch.stop().expect("stopping orch");
    assert!(exit.success(), "{exit}\n{}", orch.log());
    assert!(
        orch.attachment().unwrap().iter().all(|(_, on)| *on),
        "the data plane must stay attached while the daemon is down"
    );
    progress(rounds.load(Ordering::Relaxed));
    let t = spread(&lab, &orch, vip, 30);
    assert_eq!(
        t.len(),
        3,
        "new connections while down reach every backend: {t:?}"
    );

    // 2. A new daemon takes over the running data plane without rewriting it, and swaps
    //    its own program into the links (what an upgrade does).
    let programs_before = balancer_program_ids(&lab);
    orch.start().expect("restarting orch");
    let programs_after = balancer_program_ids(&lab);
    assert!(
        programs_before
            .iter()
            .zip(&programs_after)
            .all(|(a, b)| a != b),
        "the new daemon's program replaces the old one on every interface: \
         {programs_before:?} -> {programs_after:?}"
    );
    let st = status(&orch);
    assert_eq!(st["adopted"], true, "{st}");
    let log = orch.log();
    let second_start = &log[log.rfind("registry opened").expect("two starts")..];
    assert!(
        second_start.contains("unchanged=3") && second_start.contains("updated=0"),
        "a restart with the same config must write no service: {second_start}"
    );
    progress(rounds.load(Ordering::Relaxed));

    // 3. A config reload adds a service while the connections continue.
    let extra = "\n[[service]]\nname = \"extra\"\nvip = \"198.19.0.3\"\nport = 80\nprotocol = \"tcp\"\nbackend = [{ address = \"198.18.1.2:8080\" }]\n";
    orch.write_config(&format!("{}{extra}", lab::demo_config()))
        .unwrap();
    lab::wait_until(Duration::from_secs(5), || {
        status(&orch)["config_reloads"] == 1
    })
    .unwrap_or_else(|| panic!("the reload did not happen\n{}", orch.log()));
    progress(rounds.load(Ordering::Relaxed));

    stop.store(true, Ordering::Relaxed);
    let firsts = talker
        .join()
        .expect("talker thread")
        .unwrap_or_else(|e| panic!("a long-lived connection broke: {e}\n{}", orch.log()));
    let total = rounds.load(Ordering::Relaxed);
    eprintln!(
        "{} long-lived connections ({firsts:?}) exchanged {total} rounds through a stop, a \
         restart and a reload without an error",
        firsts.len()
    );
    assert_eq!(
        firsts.iter().collect::<BTreeSet<_>>().len(),
        3,
        "6 connections use all backends: {firsts:?}"
    );
}

/// The id of the balancer program on each lab interface of the load balancer.
fn balancer_program_ids(lab: &Lab) -> Vec<u32> {
    lab.lb_interfaces()
        .iter()
        .map(|i| {
            let ids = orch_tests::lab::programs_on(lab.lb.name(), i).unwrap();
            assert_eq!(ids.len(), 1, "one balancer program on {i}: {ids:?}");
            ids[0]
        })
        .collect()
}

#[test]
fn acknowledged_registrations_survive_kill_9() {
    if !require_root("acknowledged_registrations_survive_kill_9") {
        return;
    }
    let (lab, mut orch) = start("kill9", &lab::demo_config());
    let socket = orch.socket().to_owned();
    let bin = lab::orch_bin();
    let acked = Arc::new(AtomicUsize::new(0));
    const MAX: usize = 400;

    // A stream of registrations; the daemon is killed in the middle of it.
    let writer = {
        let acked = acked.clone();
        thread::spawn(move || {
            let mut done = Vec::new();
            for i in 0..MAX {
                let name = format!("s{i}");
                let vip = format!("198.19.{}.{}:80", 1 + i / 250, 1 + i % 250);
                let out = Command::new(&bin)
                    .args([
                        "service",
                        "add",
                        &name,
                        &vip,
                        "--backend",
                        "198.18.1.2:8080",
                    ])
                    .env("ORCH_SOCKET", &socket)
                    .output()
                    .expect("running the CLI");
                match out.status.code() {
                    Some(0) => {
                        done.push(name);
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    // The daemon is gone: stop writing.
                    Some(1) => break,
                    other => panic!(
                        "unexpected exit {other:?}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ),
                }
            }
            done
        })
    };
    lab::wait_until(Duration::from_secs(30), || {
        acked.load(Ordering::Relaxed) >= 25
    })
    .unwrap_or_else(|| panic!("registrations are too slow\n{}", orch.log()));
    orch.kill9().expect("killing orch");
    let done = writer.join().expect("writer thread");
    assert!(done.len() < MAX, "the kill must land inside the stream");

    orch.start().expect("restarting orch after kill -9");
    let list: serde_json::Value =
        serde_json::from_str(&ok(&orch, &["service", "list", "--json"])).unwrap();
    let names: BTreeSet<String> = list["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    let lost: Vec<&String> = done.iter().filter(|n| !names.contains(*n)).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    eprintln!(
        "{} registrations acknowledged before kill -9, all {} present after restart",
        done.len(),
        done.len()
    );
    // And the data plane serves the last acknowledged one.
    let last = done.len() - 1;
    let vip = SocketAddr::from((
        [198, 19, 1 + (last / 250) as u8, 1 + (last % 250) as u8],
        80,
    ));
    let t = spread(&lab, &orch, vip, 3);
    assert_eq!(t.get("backend-1"), Some(&3), "{t:?}");
}

#[test]
fn config_edits_apply_live_and_bad_edits_change_nothing() {
    if !require_root("config_edits_apply_live_and_bad_edits_change_nothing") {
        return;
    }
    let (lab, orch) = start("reload", &lab::demo_config());
    let extra_vip = SocketAddr::from(([198, 19, 0, 3], 80));
    let extra = "\n[[service]]\nname = \"extra\"\nvip = \"198.19.0.3\"\nport = 80\nprotocol = \"tcp\"\nbackend = [{ address = \"198.18.2.2:8080\" }]\n";
    let with_extra = format!("{}{extra}", lab::demo_config());

    // A valid edit: applied without a restart, and the new service answers.
    orch.write_config(&with_extra).unwrap();
    let took = lab::wait_until(Duration::from_secs(5), || {
        status(&orch)["config_reloads"] == 1
    })
    .unwrap_or_else(|| panic!("the edit was not applied\n{}", orch.log()));
    eprintln!("a config edit was applied {took:?} after the file was written");
    assert_eq!(
        lab.client
            .run(move || lab::tcp_ask(extra_vip, "new?"))
            .unwrap()
            .unwrap_or_else(|e| panic!("the new service does not answer: {e}\n{}", orch.log())),
        "backend-2"
    );

    // An invalid edit: rejected with file, line and reason; everything keeps working.
    let bad = with_extra.replace(
        "port = 80\nprotocol = \"tcp\"\nbackend = [{ address = \"198.18.2.2",
        "port = 0\nprotocol = \"tcp\"\nbackend = [{ address = \"198.18.2.2",
    );
    assert_ne!(bad, with_extra);
    orch.write_config(&bad).unwrap();
    lab::wait_until(Duration::from_secs(5), || {
        status(&orch)["config_reload_failures"] == 1
    })
    .unwrap_or_else(|| panic!("the bad edit was not noticed\n{}", orch.log()));
    let st = status(&orch);
    let why = st["last_reload_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let path = orch.config_path().display().to_string();
    assert!(
        why.contains(&format!("{path}:")) && why.contains("port 0"),
        "the rejection names file, line and reason: {why}"
    );
    let line: usize = why[why.find(&format!("{path}:")).unwrap() + path.len() + 1..]
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("a line number after the path");
    let text = std::fs::read_to_string(orch.config_path()).unwrap();
    assert_eq!(
        text.lines().nth(line - 1).map(str::trim),
        Some("port = 0"),
        "the line points at the problem: {why}"
    );
    assert_eq!(
        lab.client
            .run(move || lab::tcp_ask(extra_vip, "still?"))
            .unwrap()
            .unwrap(),
        "backend-2"
    );
    let services = ok(&orch, &["service", "list"]);
    assert!(services.contains("extra"), "{services}");

    // SIGHUP reloads too: the file without the extra service removes it.
    orch.write_config(&lab::demo_config()).unwrap();
    lab::wait_until(Duration::from_secs(5), || {
        status(&orch)["config_reloads"] == 2
    })
    .unwrap_or_else(|| panic!("the fixed file was not applied\n{}", orch.log()));
    orch.signal(libc::SIGHUP).unwrap();
    lab::wait_until(Duration::from_secs(5), || {
        status(&orch)["config_reloads"] == 3
    })
    .unwrap_or_else(|| panic!("SIGHUP did not reload\n{}", orch.log()));
    let services = ok(&orch, &["service", "list"]);
    assert!(!services.contains("extra"), "{services}");
}

#[test]
fn drain_wait_reports_live_connections_until_none_is_left() {
    if !require_root("drain_wait_reports_live_connections_until_none_is_left") {
        return;
    }
    let (lab, orch) = start("drain", &lab::demo_config());
    ok(
        &orch,
        &[
            "service",
            "add",
            "api",
            "198.19.0.2:80",
            "--backend",
            "198.18.1.2:8080",
            "--backend",
            "198.18.2.2:8080",
        ],
    );
    let api = SocketAddr::from(([198, 19, 0, 2], 80));
    // Two connections held on backend-1, one on backend-2.
    let mut held = lab
        .client
        .run(
            move || -> std::io::Result<BTreeMap<String, Vec<LineConn>>> {
                let mut by_backend: BTreeMap<String, Vec<LineConn>> = BTreeMap::new();
                for _ in 0..20 {
                    let mut c = LineConn::connect(api)?;
                    let name = c.ask("hold")?;
                    by_backend.entry(name).or_default().push(c);
                }
                Ok(by_backend)
            },
        )
        .unwrap()
        .expect("holding connections");
    let mut on_1 = held.remove("backend-1").expect("connections on backend-1");
    on_1.truncate(2);
    let mut on_2 = held.remove("backend-2").expect("connections on backend-2");
    on_2.truncate(1);
    drop(held);

    let drain = |addr: &str, timeout: &str| {
        Command::new(lab::orch_bin())
            .args([
                "backend",
                "drain",
                "api",
                addr,
                "--wait",
                "--timeout",
                timeout,
            ])
            .env("ORCH_SOCKET", orch.socket())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running orch backend drain")
    };

    // A drain that times out: exit code 3, the backend stays draining.
    let out = drain("198.18.2.2:8080", "1").wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 connection left"));
    let rows = ok(&orch, &["backend", "list", "api"]);
    assert!(rows.contains("draining"), "{rows}");
    ok(&orch, &["backend", "enable", "api", "198.18.2.2:8080"]);

    // A drain that completes once the held connections close.
    let mut waiting = drain("198.18.1.2:8080", "20");
    thread::sleep(Duration::from_secs(1));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "returned with connections left"
    );
    for c in &mut on_1 {
        assert_eq!(c.ask("still served").unwrap(), "backend-1");
    }
    let t = spread(&lab, &orch, api, 20);
    assert!(
        !t.contains_key("backend-1"),
        "a drained backend got new connections: {t:?}"
    );
    on_1.pop(); // the client closes: FIN both ways
    thread::sleep(Duration::from_secs(1));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "returned with one connection left"
    );
    on_1.pop();
    let done = lab::wait_until(Duration::from_secs(5), || {
        waiting.try_wait().unwrap().is_some()
    });
    assert!(
        done.is_some(),
        "drain --wait did not return after the last connection closed"
    );
    let out = waiting.wait_with_output().unwrap();
    let progress = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{progress}");
    for line in [
        "2 connections left",
        "1 connection left",
        "0 connections left",
    ] {
        assert!(progress.contains(line), "missing {line:?} in {progress}");
    }
    drop(on_2);
}

/// 10,000 services of 8 backends each beside the demo's: the daemon loads them, keeps
/// answering its API while its periodic work runs (reading 80,000 backends' kernel signals
/// every tick once starved the API for good), and still steers the demo service.
#[test]
fn a_large_fleet_loads_and_the_daemon_keeps_answering() {
    if !require_root("a_large_fleet_loads_and_the_daemon_keeps_answering") {
        return;
    }
    const SERVICES: usize = 10_000;
    let mut config = lab::demo_config().replace(
        "[dataplane]",
        "[dataplane]\nmax_services = 10240\nmax_backends = 81920",
    );
    for i in 0..SERVICES {
        let vip = format!("198.19.{}.{}", i / 250 + 1, i % 250 + 1);
        let backends: Vec<String> = (0..8)
            .map(|b| {
                format!(
                    "{{ address = \"198.18.200.{}:{}\" }}",
                    i % 250 + 1,
                    20_000 + b
                )
            })
            .collect();
        config.push_str(&format!(
            "\n[[service]]\nname = \"s{i}\"\nvip = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\n\
             check = {{ type = \"none\" }}\nbackend = [{}]\n",
            backends.join(", ")
        ));
    }
    let (lab, orch) = start("large", &config);
    let s = status(&orch);
    assert_eq!(s["services"], SERVICES + 3, "{s}");
    assert_eq!(s["backends"], SERVICES * 8 + 9, "{s}");
    // Many ticks' worth of API calls, every one answered (the CLI gives up after 10 s).
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(2) || calls < 5 {
        status(&orch);
        calls += 1;
    }
    // The last service loaded is in the maps the program reads: a new flow to it would go
    // to one of its backends.
    let explained = ok(
        &orch,
        &["explain", "tcp", "198.18.0.2:40000", "198.19.40.250:80"],
    );
    assert!(
        explained.contains("198.18.200.250:200"),
        "no backend of s9999 in:\n{explained}"
    );
    let t = spread(&lab, &orch, SocketAddr::from((VIP4, 80)), 6);
    assert_eq!(t.len(), 3, "the demo service stopped round-robin: {t:?}");
}

/// What a systemd service manager hears on `NOTIFY_SOCKET`, one message at a time.
struct FakeServiceManager {
    socket: std::os::unix::net::UnixDatagram,
    path: std::path::PathBuf,
}

impl FakeServiceManager {
    fn new(lab: &Lab) -> FakeServiceManager {
        let path = lab.scratch_path("notify.sock");
        let _ = std::fs::remove_file(&path);
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // The daemon runs as another user: it must be able to send here.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        FakeServiceManager { socket, path }
    }

    fn next(&self, orch: &Orch) -> String {
        let mut buf = [0u8; 512];
        let n = self
            .socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification within 10 s: {e}\n{}", orch.log()));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for FakeServiceManager {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// As the systemd unit runs it: user nobody with CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and
/// CAP_NET_BIND_SERVICE only, the DNS server on port 53. The daemon balances, answers by
/// name, and tells the service manager when it is ready (only once it serves), when it
/// reloads and when it stops.
#[test]
fn unprivileged_with_the_units_capabilities_it_balances_and_notifies_the_service_manager() {
    if !require_root("unprivileged_..._notifies_the_service_manager") {
        return;
    }
    if !lab::have("setpriv") {
        let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!in_ci, "CI=true but setpriv (util-linux) is missing");
        eprintln!("SKIP: setpriv (util-linux) is not installed");
        return;
    }
    let lab = Lab::new("unpriv", 3).expect("building the lab");
    let manager = FakeServiceManager::new(&lab);
    let caps = ["bpf", "net_admin", "perfmon", "net_bind_service"];
    let nobody = lab::Unprivileged {
        uid: 65534,
        gid: 65534,
        caps: caps.iter().map(|c| c.to_string()).collect(),
    };
    let config = format!(
        "{}\n[dns]\nenabled = true\nlisten = \"198.18.0.1:53\"\n",
        lab::demo_config()
    );
    let notify = manager.path.to_string_lossy().into_owned();
    let orch = lab
        .start_orch_unprivileged(
            &lab::orch_bin(),
            &config,
            nobody,
            &[("NOTIFY_SOCKET", notify.as_str())],
        )
        .expect("starting orch as nobody");
    // Ready came, and only after the daemon answered (start_orch waits for that).
    assert_eq!(manager.next(&orch), "READY=1\nSTATUS=serving\n");
    let pid = orch.pid().unwrap();
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        proc_status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
            .unwrap()
    };
    assert_eq!(field("Uid:"), "65534", "{proc_status}");
    // CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39) and
    // nothing else.
    let want: u64 = (1 << 10) | (1 << 12) | (1 << 38) | (1 << 39);
    let eff = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
    assert_eq!(eff, want, "effective capabilities {eff:#x}");

    // It balances: six new connections reach all three backends.
    let web = SocketAddr::from((VIP4, 80));
    let t = spread(&lab, &orch, web, 6);
    assert_eq!(t.len(), 3, "{t:?}\n{}", orch.log());
    // It answers by name on port 53.
    let answer = lab
        .client
        .run(|| -> std::io::Result<Vec<u8>> {
            use hickory_proto::{
                op::{Message, Query},
                rr::{Name, RecordType},
            };
            let mut q = Message::new();
            q.add_query(Query::query(
                Name::from_ascii("web.orch.internal.").unwrap(),
                RecordType::A,
            ));
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.send_to(&q.to_vec().map_err(std::io::Error::other)?, "198.18.0.1:53")?;
            let mut buf = vec![0u8; 512];
            let n = s.recv(&mut buf)?;
            buf.truncate(n);
            Ok(buf)
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("no DNS answer on port 53: {e}\n{}", orch.log()));
    let answer =
        <hickory_proto::op::Message as hickory_proto::serialize::binary::BinDecodable>::from_bytes(
            &answer,
        )
        .unwrap();
    assert_eq!(answer.answers().len(), 1, "{answer:?}");
    // And registers through its socket, in a registry it owns.
    ok(
        &orch,
        &[
            "service",
            "add",
            "api",
            "198.19.0.9:80",
            "-b",
            "198.18.1.2:8080",
        ],
    );

    orch.signal(libc::SIGHUP).unwrap();
    let reload = manager.next(&orch);
    assert!(
        reload.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reload:?}"
    );
    assert_eq!(manager.next(&orch), "READY=1\nSTATUS=serving\n");
    let mut orch = orch;
    let status = orch.stop().unwrap();
    assert!(status.success(), "{status}\n{}", orch.log());
    assert_eq!(manager.next(&orch), "STOPPING=1\n");
}
