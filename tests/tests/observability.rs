//! Observability end to end: `/metrics` of a live daemon counts exactly the traffic a client
//! sent through the VIPs, removed services take their series with them, the shipped Grafana
//! dashboard only uses metrics the daemon serves, and `orch explain` tells where a flow goes.
//! Everything runs in the lab's namespaces (the daemon's metrics listener is on loopback in
//! the lb namespace) and is removed when the test ends.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use orch_tests::{
    lab::{self, Lab, LineConn, Orch, VIP4},
    privilege::require_root,
    prom::{self, Sample},
};

/// A UDP service with no backend at all: every datagram to it is a counted drop.
const VOID_SERVICE: &str = r#"
[[service]]
name = "void"
vip = "198.19.0.1"
port = 54
protocol = "udp"
"#;

fn lab_with_orch(tag: &str, extra: &str) -> (Lab, Orch) {
    let lab = Lab::new(tag, 3).expect("building the lab");
    let config = lab::demo_config() + extra;
    let orch = lab
        .start_orch(&lab::orch_bin(), &config)
        .expect("starting orch");
    (lab, orch)
}

fn scrape(lab: &Lab, orch: &Orch) -> Vec<Sample> {
    let text = lab
        .metrics()
        .unwrap_or_else(|e| panic!("scraping /metrics: {e}\n{}", orch.log()));
    prom::parse(&text)
}

/// Backend `backend-<i>`'s address for `port`.
fn backend_addr(name: &str, port: u16) -> String {
    let i: usize = name
        .strip_prefix("backend-")
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("unexpected backend name {name:?}"));
    SocketAddr::from((lab::backend4(i), port)).to_string()
}

/// IPv4 + UDP header bytes: the counters count IP lengths.
const UDP4_HEADERS: u64 = 20 + 8;

#[test]
fn metrics_count_exactly_what_the_client_sent() {
    if !require_root("metrics_count_exactly_what_the_client_sent") {
        return;
    }
    let (lab, orch) = lab_with_orch("metrics", VOID_SERVICE);
    const FLOWS: usize = 12;
    const ROUNDS: usize = 5;
    const CONNS: usize = 9;
    const HELD: usize = 2;
    const VOID_SENDS: usize = 7;
    let dns = SocketAddr::from((VIP4, 53));
    let web = SocketAddr::from((VIP4, 80));
    let void = SocketAddr::from((VIP4, 54));

    struct Sent {
        /// Per UDP flow: the backend that answered, and (request, reply) payload lengths.
        udp: Vec<(String, Vec<(usize, usize)>)>,
        tcp: Vec<String>,
        held: Vec<LineConn>,
    }
    let sent = lab
        .client
        .run(move || -> std::io::Result<Sent> {
            let mut udp = Vec::new();
            for flow in 0..FLOWS {
                let sock = lab::udp_socket(dns.ip())?;
                let mut backend = None;
                let mut sizes = Vec::new();
                for round in 0..ROUNDS {
                    let q = format!("flow {flow} round {round}");
                    let (name, _) = lab::udp_ask(&sock, dns, &q)?;
                    assert!(
                        backend.get_or_insert(name.clone()) == &name,
                        "UDP flow {flow} moved between backends"
                    );
                    sizes.push((q.len(), name.len() + 1 + q.len()));
                }
                udp.push((backend.expect("ROUNDS > 0"), sizes));
            }
            let tcp = (0..CONNS)
                .map(|i| lab::tcp_ask(web, &format!("hello {i}")))
                .collect::<Result<Vec<_>, _>>()?;
            let mut held = Vec::new();
            for i in 0..HELD {
                let mut c = LineConn::connect(web)?;
                c.ask(&format!("held {i}"))?;
                held.push(c);
            }
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            for i in 0..VOID_SENDS {
                sock.send_to(format!("nobody {i}").as_bytes(), void)?;
            }
            Ok(Sent { udp, tcp, held })
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("client traffic failed: {e}\n{}", orch.log()));

    // The XDP program counts as packets arrive; the last datagrams to `void` and the FINs
    // of closed connections may still be in flight when the client returns.
    let settled = lab::wait_until(Duration::from_secs(5), || {
        let m = scrape(&lab, &orch);
        prom::sum(
            &m,
            "orch_service_no_backend_drops_total",
            &[("service", "void")],
        ) == Some(VOID_SENDS as f64)
            && prom::sum(&m, "orch_backend_active_connections", &[("service", "web")])
                == Some(HELD as f64)
    });
    let m = scrape(&lab, &orch);
    assert!(
        settled.is_some(),
        "counters did not settle: void drops {:?}, web active {:?}",
        prom::sum(
            &m,
            "orch_service_no_backend_drops_total",
            &[("service", "void")]
        ),
        prom::sum(&m, "orch_backend_active_connections", &[("service", "web")]),
    );
    let get = |name: &str, with: &[(&str, &str)]| prom::get(&m, name, with);

    // UDP: one connection per flow, every datagram counted once each way, bytes exact.
    let packets = (FLOWS * ROUNDS) as f64;
    let dns_l = [("service", "dns")];
    assert_eq!(get("orch_service_connections_total", &dns_l), FLOWS as f64);
    for (dir, want) in [("to_backend", packets), ("to_client", packets)] {
        assert_eq!(
            get(
                "orch_service_packets_total",
                &[("service", "dns"), ("direction", dir)]
            ),
            want,
            "dns {dir} packets"
        );
    }
    let mut per_backend: BTreeMap<String, (u64, u64, u64, u64)> = BTreeMap::new();
    for (name, sizes) in &sent.udp {
        let e = per_backend.entry(name.clone()).or_default();
        e.0 += 1;
        e.1 += sizes.len() as u64;
        e.2 += sizes
            .iter()
            .map(|&(q, _)| q as u64 + UDP4_HEADERS)
            .sum::<u64>();
        e.3 += sizes
            .iter()
            .map(|&(_, r)| r as u64 + UDP4_HEADERS)
            .sum::<u64>();
    }
    let (mut bytes_fwd, mut bytes_reply) = (0, 0);
    for (name, (flows, datagrams, fwd, reply)) in &per_backend {
        let addr = backend_addr(name, lab::UDP_PORT);
        let b = [("service", "dns"), ("backend", addr.as_str())];
        let with_dir = |dir| [b[0], b[1], ("direction", dir)];
        assert_eq!(
            get("orch_backend_connections_total", &b),
            *flows as f64,
            "{name}"
        );
        assert_eq!(
            get("orch_backend_packets_total", &with_dir("to_backend")),
            *datagrams as f64,
            "{name}"
        );
        assert_eq!(
            get("orch_backend_bytes_total", &with_dir("to_backend")),
            *fwd as f64
        );
        assert_eq!(
            get("orch_backend_bytes_total", &with_dir("to_client")),
            *reply as f64
        );
        assert_eq!(get("orch_backend_active_connections", &b), *flows as f64);
        bytes_fwd += fwd;
        bytes_reply += reply;
    }
    assert_eq!(
        get(
            "orch_service_bytes_total",
            &[("service", "dns"), ("direction", "to_backend")]
        ),
        bytes_fwd as f64
    );
    assert_eq!(
        get(
            "orch_service_bytes_total",
            &[("service", "dns"), ("direction", "to_client")]
        ),
        bytes_reply as f64
    );

    // TCP: every connection counted once, on the backend that answered it; the data plane
    // saw each backend's SYN-ACK (handshake histogram count) for each of its connections.
    let mut tcp_per_backend: BTreeMap<String, u64> = BTreeMap::new();
    for name in &sent.tcp {
        *tcp_per_backend.entry(name.clone()).or_default() += 1;
    }
    let web_l = [("service", "web")];
    assert_eq!(
        get("orch_service_connections_total", &web_l),
        (CONNS + HELD) as f64
    );
    let mut handshakes = 0.0;
    for (name, conns) in &tcp_per_backend {
        let addr = backend_addr(name, lab::TCP_PORT);
        let b = [("service", "web"), ("backend", addr.as_str())];
        let counted = get("orch_backend_connections_total", &b);
        // Held connections are not in `tcp_per_backend`, so a backend may count up to HELD more.
        assert!(
            counted >= *conns as f64 && counted <= (*conns + HELD as u64) as f64,
            "{name}: {counted} connections counted, {conns} answered (+ up to {HELD} held)"
        );
        handshakes += get("orch_backend_handshake_duration_seconds_count", &b);
    }
    assert_eq!(
        prom::get(&m, "orch_backend_handshake_duration_seconds_count", &web_l),
        (CONNS + HELD) as f64,
        "one measured handshake per connection"
    );
    assert!(handshakes >= CONNS as f64);
    assert_eq!(
        get("orch_backend_active_connections", &web_l),
        HELD as f64,
        "closed connections are not active, held ones are"
    );
    assert_eq!(get("orch_backend_refused_total", &web_l), 0.0);

    // Drops for want of a backend: per service and in the program's verdicts.
    assert_eq!(
        get(
            "orch_service_no_backend_drops_total",
            &[("service", "void")]
        ),
        VOID_SENDS as f64
    );
    assert_eq!(
        get("orch_xdp_packets_total", &[("reason", "drop_no_backend")]),
        VOID_SENDS as f64
    );
    // The verdict counters agree with the per-service ones.
    let verdicts = |prefix: &str| {
        m.iter()
            .filter(|s| s.name == "orch_xdp_packets_total")
            .filter(|s| {
                s.labels
                    .iter()
                    .any(|(k, v)| k == "reason" && v.starts_with(prefix))
            })
            .map(|s| s.value)
            .sum::<f64>()
    };
    assert_eq!(
        verdicts("fwd_"),
        get("orch_service_packets_total", &[("direction", "to_backend")])
    );
    assert_eq!(
        verdicts("reply_"),
        get("orch_service_packets_total", &[("direction", "to_client")])
    );
    // Two entries per connection or flow, none evicted.
    assert_eq!(
        get("orch_conntrack_entries", &[]),
        (2 * (FLOWS + CONNS + HELD)) as f64
    );
    assert!(get("orch_conntrack_capacity", &[]) >= 1024.0);

    // Daemon series.
    assert_eq!(get("orch_build_info", &[]), 1.0);
    assert!(get("process_resident_memory_bytes", &[]) > 0.0);
    assert_eq!(get("orch_services", &[]), 4.0);
    assert_eq!(get("orch_backends", &[]), 9.0);
    assert!(
        lab::wait_until(Duration::from_secs(10), || {
            prom::sum(
                &scrape(&lab, &orch),
                "orch_health_checks_total",
                &[("service", "web"), ("result", "up")],
            )
            .is_some_and(|n| n >= 3.0)
        })
        .is_some(),
        "web's backends are probed and counted"
    );
    drop(sent.held);
}

#[test]
fn removed_services_lose_their_series_and_the_endpoint_is_read_only() {
    if !require_root("removed_services_lose_their_series_and_the_endpoint_is_read_only") {
        return;
    }
    let (lab, orch) = lab_with_orch("series", "");
    let ops = |m: &[Sample], op: &str, result: &str| {
        prom::get(
            m,
            "orch_registry_operations_total",
            &[("operation", op), ("result", result)],
        )
    };
    let m = scrape(&lab, &orch);
    assert_eq!(ops(&m, "service_add", "ok"), 0.0);

    let add = [
        "service",
        "add",
        "tmp",
        "198.19.0.9:80",
        "--backend",
        "198.18.1.2:8080",
    ];
    let out = orch.cli(&add).unwrap();
    assert!(out.status.success(), "{}", out.stderr_text());
    let again = orch.cli(&add).unwrap();
    assert!(
        !again.status.success(),
        "a duplicate service must be refused"
    );

    let m = scrape(&lab, &orch);
    assert_eq!(ops(&m, "service_add", "ok"), 1.0);
    assert_eq!(ops(&m, "service_add", "refused"), 1.0);
    for name in [
        "orch_service_connections_total",
        "orch_backend_connections_total",
        "orch_breaker_state",
        "orch_health_checks_total",
    ] {
        assert!(
            prom::sum(&m, name, &[("service", "tmp")]).is_some(),
            "{name} has a series for the new service"
        );
    }

    let out = orch.cli(&["service", "rm", "tmp"]).unwrap();
    assert!(out.status.success(), "{}", out.stderr_text());
    let text = lab.metrics().unwrap();
    assert!(
        !text.contains(r#"service="tmp""#),
        "a removed service's series must disappear:\n{}",
        text.lines()
            .filter(|l| l.contains(r#"service="tmp""#))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(ops(&prom::parse(&text), "service_rm", "ok"), 1.0);

    // Read-only: anything but GET/HEAD is refused, unknown paths are not found.
    let (status, _) = lab.lb_http("POST", "/metrics").unwrap();
    assert_eq!(status, 405);
    let (status, _) = lab.lb_http("DELETE", "/metrics").unwrap();
    assert_eq!(status, 405);
    let (status, _) = lab.lb_http("GET", "/admin").unwrap();
    assert_eq!(status, 404);
    // A malformed request line gets an HTTP error, and the daemon keeps serving.
    let raw = lab
        .lb
        .run(|| -> std::io::Result<String> {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(lab::METRICS_ADDR)?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(b"NONSENSE\r\n\r\n")?;
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            Ok(out)
        })
        .unwrap()
        .unwrap();
    assert!(!raw.starts_with("HTTP/1.1 200"), "{raw:?}");
    assert!(lab.metrics().is_ok(), "the endpoint survives bad requests");
}

/// Every identifier in `expr` that names an orch or process metric.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut word = String::new();
    for c in expr.chars().chain([' ']) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if word.starts_with("orch_") || word.starts_with("process_") {
                names.insert(std::mem::take(&mut word));
            }
            word.clear();
        }
    }
    names
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(o) => {
            for (k, v) in o {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    ("query", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_uses_only_metrics_a_live_daemon_serves() {
    if !require_root("the_dashboard_uses_only_metrics_a_live_daemon_serves") {
        return;
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/orch.json");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).expect("reading dashboards/orch.json"),
    )
    .expect("the dashboard is valid JSON");
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    let used: BTreeSet<String> = all.iter().flat_map(|e| metric_names(e)).collect();
    assert!(
        used.len() >= 20,
        "the dashboard shows the main series: {used:?}"
    );

    let (lab, orch) = lab_with_orch("dashboard", "");
    // One connection, so that every per-service and per-backend series exists.
    lab.client
        .run(|| lab::tcp_ask(SocketAddr::from((VIP4, 80)), "hi"))
        .unwrap()
        .unwrap();
    let served: BTreeSet<String> = scrape(&lab, &orch).into_iter().map(|s| s.name).collect();
    let missing: Vec<&String> = used.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "the dashboard uses metrics the daemon does not serve: {missing:?}"
    );
}

/// `orch explain ... --json`, parsed.
fn explain(orch: &Orch, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["explain"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = orch.cli(&all).unwrap();
    assert!(out.status.success(), "orch {all:?}: {}", out.stderr_text());
    let v: serde_json::Value = serde_json::from_str(&out.stdout_text()).unwrap();
    v["explain"].clone()
}

#[test]
fn explain_predicts_new_flows_and_names_existing_ones() {
    if !require_root("explain_predicts_new_flows_and_names_existing_ones") {
        return;
    }
    let (lab, orch) = lab_with_orch("explain", VOID_SERVICE);
    let dns = SocketAddr::from((VIP4, 53));
    let name_to_addr = |name: &str, port| backend_addr(name, port);

    let e = explain(&orch, &["tcp", "198.18.0.2:40000", "198.19.0.1:81"]);
    assert_eq!(e["path"]["kind"], "not_a_service", "{e}");
    let e = explain(&orch, &["udp", "198.18.0.2:40000", "198.19.0.1:54"]);
    assert_eq!(e["path"]["kind"], "no_backend", "{e}");
    assert_eq!(e["service"], "void");

    // New flows: the prediction for CPU 0 is where a client on CPU 0 lands, flow after flow
    // (each one moves the cursor on).
    for i in 0..6u16 {
        let port = 41000 + i;
        let client = SocketAddr::from((lab::CLIENT4, port)).to_string();
        let e = explain(&orch, &["udp", &client, "198.19.0.1:53"]);
        assert_eq!(e["path"]["kind"], "new", "{e}");
        let by_cpu = e["path"]["by_cpu"].as_array().unwrap();
        assert_eq!(by_cpu.len(), lab_cpus(), "one choice per CPU: {e}");
        let predicted = by_cpu[0]["backend"].as_str().unwrap().to_owned();
        assert!(
            e["backends"]
                .as_array()
                .unwrap()
                .iter()
                .any(|b| b["address"] == predicted.as_str() && b["health"].is_string()),
            "the predicted backend's state is shown: {e}"
        );
        let answered = lab
            .client
            .run(move || -> std::io::Result<String> {
                lab::pin_current_thread(0)?;
                let sock = UdpSocket::bind(SocketAddr::from((lab::CLIENT4, port)))?;
                Ok(lab::udp_ask(&sock, dns, "which")?.0)
            })
            .unwrap()
            .unwrap();
        assert_eq!(
            name_to_addr(&answered, lab::UDP_PORT),
            predicted,
            "flow {i}: explain predicted {predicted}, {answered} answered"
        );
        // Now the flow exists: explain names its entry.
        let e = explain(&orch, &["udp", &client, "198.19.0.1:53"]);
        assert_eq!(e["path"]["kind"], "existing", "{e}");
        assert_eq!(e["path"]["backend"], predicted.as_str());
    }

    // An established TCP connection, then the same after the client closed it.
    let (conn, local, name) = lab
        .client
        .run(|| -> std::io::Result<(LineConn, SocketAddr, String)> {
            let mut c = LineConn::connect(SocketAddr::from((VIP4, 80)))?;
            let name = c.ask("hi")?;
            let local = c.local_addr()?;
            Ok((c, local, name))
        })
        .unwrap()
        .unwrap();
    let client = local.to_string();
    let e = explain(&orch, &["tcp", &client, "198.19.0.1:80"]);
    assert_eq!(e["path"]["kind"], "existing", "{e}");
    assert_eq!(
        e["path"]["backend"],
        name_to_addr(&name, lab::TCP_PORT).as_str()
    );
    assert_eq!(e["path"]["client_closed"], false);
    assert_eq!(e["backends"][0]["established"], 1, "{e}");
    let text = orch
        .cli(&["explain", "tcp", &client, "198.19.0.1:80"])
        .unwrap()
        .stdout_text();
    assert!(
        text.contains("existing connection") && text.contains("in rotation"),
        "{text}"
    );
    drop(conn);
    let closed = lab::wait_until(Duration::from_secs(3), || {
        explain(&orch, &["tcp", &client, "198.19.0.1:80"])["path"]["client_closed"] == true
    });
    assert!(closed.is_some(), "the client's FIN is recorded");

    // Bad input: a clear error, exit 2.
    for (args, want) in [
        (
            &["tcp", "198.18.0.2:1", "[2001:db8:ff::1]:80"][..],
            "address family",
        ),
        (&["tcp", "198.18.0.2:0", "198.19.0.1:80"][..], "ports"),
        (&["sctp", "198.18.0.2:1", "198.19.0.1:80"][..], "sctp"),
        (&["tcp", "nonsense", "198.19.0.1:80"][..], "nonsense"),
    ] {
        let mut all = vec!["explain"];
        all.extend_from_slice(args);
        let out = orch.cli(&all).unwrap();
        assert_eq!(out.code(), Some(2), "{all:?}: {}", out.stderr_text());
        assert!(
            out.stderr_text().contains(want),
            "{all:?}: {}",
            out.stderr_text()
        );
    }
}

#[test]
fn explain_predicts_a_maglev_service_by_the_flow_alone() {
    if !require_root("explain_predicts_a_maglev_service_by_the_flow_alone") {
        return;
    }
    let (lab, orch) = lab_with_orch("maglev", "");
    let vip = "198.19.0.7:53";
    let mut add = vec![
        "service",
        "add",
        "hashed",
        vip,
        "--protocol",
        "udp",
        "--scheduler",
        "maglev",
    ];
    let backends: Vec<String> = (1..=3)
        .map(|i| SocketAddr::from((lab::backend4(i), lab::UDP_PORT)).to_string())
        .collect();
    for b in &backends {
        add.extend(["-b", b]);
    }
    let out = orch.cli(&add).unwrap();
    assert!(out.status.success(), "{}", out.stderr_text());
    let shown = orch
        .cli(&["service", "show", "hashed"])
        .unwrap()
        .stdout_text();
    assert!(shown.contains("maglev"), "{shown}");

    // Each flow's backend is known before its first datagram, whatever CPU takes it, and it
    // is where the datagram goes.
    let mut used = BTreeSet::new();
    for i in 0..12u16 {
        let port = 42000 + i;
        let client = SocketAddr::from((lab::CLIENT4, port)).to_string();
        let e = explain(&orch, &["udp", &client, vip]);
        assert_eq!(e["path"]["kind"], "new", "{e}");
        assert_eq!(e["path"]["hashed"], true, "{e}");
        let by_cpu = e["path"]["by_cpu"].as_array().unwrap();
        let predicted = by_cpu[0]["backend"].as_str().unwrap().to_owned();
        assert!(
            by_cpu.iter().all(|c| c["backend"] == predicted.as_str()),
            "the same on every CPU: {e}"
        );
        let to: SocketAddr = vip.parse().unwrap();
        let answered = lab
            .client
            .run(move || -> std::io::Result<String> {
                let sock = UdpSocket::bind(SocketAddr::from((lab::CLIENT4, port)))?;
                Ok(lab::udp_ask(&sock, to, "which")?.0)
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("flow {i}: {e}\n{}", orch.log()));
        let got = backend_addr(&answered, lab::UDP_PORT);
        assert_eq!(got, predicted, "flow {i}");
        used.insert(got);
    }
    assert!(
        used.len() >= 2,
        "12 flows over 3 backends used only {used:?}"
    );
    let text = orch
        .cli(&["explain", "udp", "198.18.0.2:43000", vip])
        .unwrap()
        .stdout_text();
    assert!(
        text.contains("Maglev") && text.contains("by the flow's hash"),
        "{text}"
    );
}

fn lab_cpus() -> usize {
    // The per-CPU cursor map has one value per possible CPU.
    let possible = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    possible
        .trim()
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

/// Kills backend `i` (1-based) and opens connections until one of them met its refusal
/// (the data plane counts it as `drop_refused`).
fn provoke_refusal(lab: &Lab, orch: &Orch, i: usize) {
    lab.backends[i - 1].set_up(false);
    let before = refused(lab, orch);
    let seen = lab::wait_until(Duration::from_secs(10), || {
        let _ = lab
            .client
            .run(|| lab::tcp_ask(SocketAddr::from((VIP4, 80)), "anyone"));
        refused(lab, orch) > before
    });
    assert!(
        seen.is_some(),
        "no refusal from backend-{i}\n{}",
        orch.log()
    );
}

fn refused(lab: &Lab, orch: &Orch) -> f64 {
    prom::get(
        &scrape(lab, orch),
        "orch_xdp_packets_total",
        &[("reason", "drop_refused")],
    )
}

#[test]
fn kernel_log_lines_join_the_json_log_at_the_chosen_level() {
    if !require_root("kernel_log_lines_join_the_json_log_at_the_chosen_level") {
        return;
    }
    let lab = Lab::new("klog", 3).expect("building the lab");
    let mut orch = lab
        .start_orch_with(
            &lab::orch_bin(),
            &lab::demo_config(),
            &["--log-format", "json"],
        )
        .expect("starting orch");
    let kernel_lines = |orch: &Orch| -> Vec<serde_json::Value> {
        orch.log()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {l:?}"))
            })
            .filter(|v| v["target"] == "orch::kernel")
            .collect()
    };

    // Off by default: a refusal happens, and the kernel says nothing.
    provoke_refusal(&lab, &orch, 1);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        kernel_lines(&orch).is_empty(),
        "kernel logging must be off by default"
    );

    // Asked for at info: the next refusal is told, in the same JSON stream.
    orch.stop().unwrap();
    orch.write_config(&(lab::demo_config() + "\n[log]\nkernel = \"info\"\n"))
        .unwrap();
    orch.start().unwrap();
    provoke_refusal(&lab, &orch, 2);
    let told = lab::wait_until(Duration::from_secs(5), || {
        kernel_lines(&orch).iter().any(|v| {
            v["level"] == "INFO"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("refused a new connection"))
        })
    });
    assert!(
        told.is_some(),
        "no kernel line for the refusal:\n{}",
        orch.log()
    );
    // Per-packet lines are at trace: not at info.
    assert!(
        !kernel_lines(&orch).iter().any(|v| v["level"] == "TRACE"),
        "trace lines at level info"
    );
}
