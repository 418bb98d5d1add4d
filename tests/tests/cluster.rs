//! Several hosts sharing one registry through etcd: three orch hosts, three etcd members
//! (real processes), backends every host reaches, a client that picks the host (see
//! [`orch_tests::cluster`]).

use std::{collections::BTreeSet, net::SocketAddr, thread, time::Duration};

use orch_tests::{
    cluster::{backend, client_via, connect_from_port, ClusterLab, HOSTS},
    lab::{self, orch_bin, wait_until},
    privilege::require_root,
    prom,
};

/// Root, and etcd installed (`cargo xtask prereqs` installs it); under CI both are required.
fn ready(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    if !lab::have("etcd") || !lab::have("etcdctl") {
        let why = "etcd is not installed: `cargo xtask prereqs` installs it";
        assert!(std::env::var_os("CI").is_none(), "{test}: {why}");
        eprintln!("SKIP {test}: {why}");
        return false;
    }
    true
}

fn backends_arg() -> Vec<String> {
    (1..=3)
        .flat_map(|i| ["--backend".to_owned(), format!("{}:8080", backend(i))])
        .collect()
}

/// `orch` on host `k`, which must succeed; its stdout.
fn cli_ok(lab: &ClusterLab, k: usize, args: &[&str]) -> String {
    let out = lab.host(k).orch.cli(args).expect("running orch");
    assert!(
        out.status.success(),
        "host {k}: orch {args:?}: {}\n{}",
        out.stderr_text(),
        lab.logs()
    );
    out.stdout_text()
}

/// The registered services host `k` serves, by name.
fn services_on(lab: &ClusterLab, k: usize) -> BTreeSet<String> {
    let out = cli_ok(lab, k, &["service", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    list["services"]
        .as_array()
        .unwrap_or_else(|| panic!("no service list in {out}"))
        .iter()
        .filter(|s| s["source"] == "registry")
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until every host serves exactly `names` from the registry.
fn converge(lab: &ClusterLab, names: &[&str]) {
    let want: BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
    for k in 1..=HOSTS {
        let got = wait_until(Duration::from_secs(10), || services_on(lab, k) == want);
        assert!(
            got.is_some(),
            "host {k} serves {:?}, not {want:?}\n{}",
            services_on(lab, k),
            lab.logs()
        );
    }
}

/// Waits until every host lists `n` backends of `service`.
fn converge_backends(lab: &ClusterLab, service: &str, n: usize) {
    let done = wait_until(Duration::from_secs(10), || {
        (1..=HOSTS).all(|k| {
            cli_ok(lab, k, &["backend", "list", service, "--json"])
                .matches("\"address\"")
                .count()
                == n
        })
    });
    assert!(
        done.is_some(),
        "{service}: not {n} backends on every host\n{}",
        lab.logs()
    );
}

/// Six connections to `vip` through host `k`: which backends answered.
fn spread_via(lab: &ClusterLab, k: usize, vip: SocketAddr) -> BTreeSet<String> {
    (0..6)
        .map(|i| {
            lab.ask_via(k, vip, &format!("via {k} #{i}"))
                .unwrap_or_else(|e| panic!("through host {k} to {vip}: {e}\n{}", lab.logs()))
        })
        .collect()
}

/// Host `k`'s metrics.
fn metrics(lab: &ClusterLab, k: usize) -> Vec<prom::Sample> {
    let (status, body) = lab
        .host(k)
        .ns
        .run(|| lab::http_request(lab::METRICS_ADDR.parse().unwrap(), "GET", "/metrics"))
        .unwrap()
        .unwrap();
    assert_eq!(status, 200, "{body}");
    prom::parse(&body)
}

fn all_backends() -> BTreeSet<String> {
    (1..=3).map(|i| format!("backend-{i}")).collect()
}

/// Host 2's config file serves `local`; no host may register its name or address.
const HOST2_FILE: &str = "[[service]]\nname = \"local\"\nvip = \"198.19.9.9\"\nport = 80\n\
                          protocol = \"tcp\"\nbackend = [{ address = \"198.18.70.1:8080\" }]\n";

#[test]
fn a_service_registered_on_one_host_is_served_by_every_host() {
    if !ready("a_service_registered_on_one_host_is_served_by_every_host") {
        return;
    }
    let lab = ClusterLab::new("reg", &orch_bin(), |k| {
        if k == 2 {
            HOST2_FILE.to_owned()
        } else {
            String::new()
        }
    })
    .expect("building the cluster lab");

    // Every host announces itself.
    let nodes = wait_until(Duration::from_secs(10), || {
        cli_ok(&lab, 1, &["node", "list", "--json"])
            .matches("\"name\"")
            .count()
            == 3
    });
    assert!(nodes.is_some(), "{}", cli_ok(&lab, 1, &["node", "list"]));
    let status = cli_ok(&lab, 3, &["status"]);
    assert!(status.contains("cluster:     reachable"), "{status}");

    // Registered on host 1: live through every host, spread over the three backends.
    let vip: SocketAddr = "198.19.0.1:80".parse().unwrap();
    let mut args = vec!["service", "add", "web", "198.19.0.1:80"];
    let b = backends_arg();
    args.extend(b.iter().map(String::as_str));
    cli_ok(&lab, 1, &args);
    converge(&lab, &["web"]);
    for k in [3, 2, 1] {
        assert_eq!(spread_via(&lab, k, vip), all_backends(), "through host {k}");
    }

    // Removed on host 2: gone on all, and the VIP answers nowhere.
    cli_ok(&lab, 2, &["service", "rm", "web"]);
    converge(&lab, &[]);
    for k in 1..=HOSTS {
        assert!(
            lab.ask_via(k, vip, "gone?").is_err(),
            "host {k} still serves web"
        );
    }

    // Two hosts register the same name at once: one wins, the other is told.
    let racers: Vec<_> = [(1, "198.19.0.2:80", 1), (3, "198.19.0.3:80", 2)]
        .into_iter()
        .map(|(k, at, i)| {
            let cli = lab.host(k).orch.cli_command();
            let backend = format!("{}:8080", backend(i));
            thread::spawn(move || {
                let out = cli(&["service", "add", "api", at, "--backend", &backend]);
                (k, at, out)
            })
        })
        .collect();
    let results: Vec<_> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    let won: Vec<_> = results
        .iter()
        .filter(|(_, _, o)| o.status.success())
        .collect();
    let lost: Vec<_> = results
        .iter()
        .filter(|(_, _, o)| !o.status.success())
        .collect();
    assert_eq!(won.len(), 1, "exactly one registration wins: {results:?}");
    assert_eq!(lost[0].2.code(), Some(2), "the other is refused");
    assert!(
        lost[0].2.stderr_text().contains("already exists"),
        "{}",
        lost[0].2.stderr_text()
    );
    converge(&lab, &["api"]);
    let winner_vip = won[0].1;
    for k in 1..=HOSTS {
        let shown = cli_ok(&lab, k, &["service", "show", "api", "--json"]);
        let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
        let vip_of = &shown["service"];
        assert_eq!(
            format!("{}:{}", vip_of["vip"].as_str().unwrap(), vip_of["port"]),
            winner_vip,
            "host {k} has the winner's api"
        );
    }

    // Two hosts add different backends to one service at once: both are kept (each write
    // is applied again on the other's result), none lost.
    let winner_backend = if won[0].0 == 1 { 1 } else { 2 };
    let others: Vec<usize> = (1..=3).filter(|i| *i != winner_backend).collect();
    let adders: Vec<_> = [(1, others[0]), (2, others[1])]
        .into_iter()
        .map(|(k, i)| {
            let cli = lab.host(k).orch.cli_command();
            let backend = format!("{}:8080", backend(i));
            thread::spawn(move || cli(&["backend", "add", "api", &backend]))
        })
        .collect();
    for a in adders {
        let out = a.join().unwrap();
        assert!(out.status.success(), "{}", out.stderr_text());
    }
    converge_backends(&lab, "api", 3);

    // The one-owner rule across hosts: host 2's file owns `local` and its address.
    for (k, args) in [
        (1, vec!["service", "add", "local", "198.19.0.9:80"]),
        (3, vec!["service", "add", "other", "198.19.9.9:80"]),
    ] {
        let out = lab.host(k).orch.cli(&args).unwrap();
        assert_eq!(out.code(), Some(2), "host {k}: {args:?} must be refused");
        assert!(
            out.stderr_text().contains("config file of host \"host-2\""),
            "{}",
            out.stderr_text()
        );
    }
    // Host 2 still serves its own file service.
    assert_eq!(
        lab.ask_via(2, "198.19.9.9:80".parse().unwrap(), "mine")
            .unwrap(),
        "backend-1"
    );
}

/// A Maglev service: a connection that moves to another host (as an ECMP change does)
/// keeps its backend, though the new host never saw it: every host builds the same table.
#[test]
fn a_maglev_connection_keeps_its_backend_when_it_moves_to_another_host() {
    if !ready("a_maglev_connection_keeps_its_backend_when_it_moves_to_another_host") {
        return;
    }
    let lab = ClusterLab::new("mag", &orch_bin(), |_| String::new()).expect("building the lab");
    let vip: SocketAddr = "198.19.0.5:80".parse().unwrap();
    let mut args = vec![
        "service",
        "add",
        "hashed",
        "198.19.0.5:80",
        "--scheduler",
        "maglev",
    ];
    let b = backends_arg();
    args.extend(b.iter().map(String::as_str));
    cli_ok(&lab, 2, &args);
    converge(&lab, &["hashed"]);
    let mut seen = BTreeSet::new();
    for n in 0..12 {
        let mut conn = lab.connect_via(1, vip).expect("connecting through host 1");
        let before = conn.ask("before").expect("asking through host 1");
        lab.route_client(1, 3).unwrap();
        let after = conn.ask(&format!("after {n}"));
        lab.route_client(1, 1).unwrap();
        let after = after.unwrap_or_else(|e| {
            panic!(
                "connection {n} broke when it moved to host 3: {e}\n{}",
                lab.logs()
            )
        });
        assert_eq!(
            after, before,
            "connection {n} changed backend when it moved"
        );
        seen.insert(before);
    }
    assert!(seen.len() >= 2, "12 connections all on {seen:?}");

    // The same flows (client address and port) through each host: the same backends.
    let flows: Vec<u16> = (41_000..41_060).collect();
    let backends_of = |via: usize| -> Vec<String> {
        lab.route_client(1, via).unwrap();
        let vip_ = vip;
        let ports = flows.clone();
        let got = lab
            .client
            .run(move || -> Result<Vec<String>, String> {
                ports
                    .iter()
                    .map(|p| {
                        connect_from_port(client_via(1), *p, vip_)
                            .and_then(|mut c| c.ask("which"))
                            .map_err(|e| format!("flow from port {p}: {e}"))
                    })
                    .collect()
            })
            .unwrap();
        lab.route_client(1, 1).unwrap();
        got.unwrap_or_else(|e| panic!("through host {via}: {e}\n{}", lab.logs()))
    };
    let first = backends_of(1);
    for via in [2, 3] {
        assert_eq!(backends_of(via), first, "the same flows through host {via}");
    }
    // One of three backends leaves: its flows move, and (nearly) only they do.
    cli_ok(
        &lab,
        2,
        &["backend", "rm", "hashed", &format!("{}:8080", backend(3))],
    );
    converge_backends(&lab, "hashed", 2);
    let after = backends_of(3);
    let on_leaver = first.iter().filter(|b| *b == "backend-3").count();
    let moved = first.iter().zip(&after).filter(|(a, b)| a != b).count();
    let stayed_wrongly = first
        .iter()
        .zip(&after)
        .filter(|(a, b)| *a != "backend-3" && a != b)
        .count();
    eprintln!(
        "{} flows: {on_leaver} were on the backend that left; {moved} moved",
        flows.len()
    );
    assert!(after.iter().all(|b| b != "backend-3"));
    assert!(
        (10..=30).contains(&on_leaver),
        "{on_leaver} of 60 flows on one of 3 backends"
    );
    // The documented bound: at most 1.25/N + 1 % of the table moves; here that is the
    // leaver's share plus at most one flow of the 60.
    assert!(
        stayed_wrongly <= 1,
        "{stayed_wrongly} flows moved off backends that stayed"
    );
    // Host 3 carried the moved segments (forwarded, not dropped as strays) and opened no
    // connection of its own: it kept no state.
    let host3 = metrics(&lab, 3);
    let forwarded = prom::get(
        &host3,
        "orch_xdp_packets_total",
        &[("reason", "fwd_redirect")],
    ) + prom::get(&host3, "orch_xdp_packets_total", &[("reason", "fwd_stack")]);
    assert!(forwarded >= 12.0, "host 3 forwarded {forwarded} packets");
    assert_eq!(
        prom::get(
            &host3,
            "orch_xdp_packets_total",
            &[("reason", "drop_tcp_no_flow")]
        ),
        0.0
    );
}

/// etcd loses a member, then this host, then everything: hosts keep serving what they
/// know, refuse changes with a clear message, survive a restart meanwhile, and converge
/// when etcd returns; nothing acknowledged is lost.
#[test]
fn hosts_serve_through_etcd_outages_and_converge() {
    if !ready("hosts_serve_through_etcd_outages_and_converge") {
        return;
    }
    let mut lab = ClusterLab::new("out", &orch_bin(), |_| String::new()).expect("building the lab");
    let b = backends_arg();
    let add = |lab: &ClusterLab, k: usize, name: &str, at: &str| {
        let mut args = vec!["service", "add", name, at];
        args.extend(b.iter().map(String::as_str));
        cli_ok(lab, k, &args);
    };
    add(&lab, 1, "web", "198.19.0.1:80");
    converge(&lab, &["web"]);

    // One member down: a quorum remains, changes go on.
    lab.kill_etcd(3);
    add(&lab, 2, "api", "198.19.0.2:80");
    converge(&lab, &["api", "web"]);

    // Host 3 cut off from etcd's network: it keeps serving, refuses changes, says so.
    lab.host(3)
        .ns
        .ip(&["link", "set", "dev", "ctl", "down"])
        .unwrap();
    let cut = wait_until(Duration::from_secs(10), || {
        cli_ok(&lab, 3, &["status"]).contains("cluster:     unreachable")
    });
    assert!(cut.is_some(), "{}", cli_ok(&lab, 3, &["status"]));
    let refused = lab.host(3).orch.cli(&["service", "rm", "web"]).unwrap();
    assert_eq!(refused.code(), Some(2), "{}", refused.stderr_text());
    assert!(
        refused.stderr_text().contains("etcd) is unreachable"),
        "{}",
        refused.stderr_text()
    );
    add(&lab, 1, "late", "198.19.0.3:80");
    assert_eq!(
        spread_via(&lab, 3, "198.19.0.1:80".parse().unwrap()),
        all_backends()
    );
    assert!(!services_on(&lab, 3).contains("late"));
    // Meanwhile etcd compacts its history past the revision host 3 last saw.
    lab.compact().unwrap();
    // Back on the network: its watch cannot resume from there, so it lists again.
    lab.host(3)
        .ns
        .ip(&["link", "set", "dev", "ctl", "up"])
        .unwrap();
    converge(&lab, &["api", "late", "web"]);
    assert!(
        lab.host(3).orch.log().contains("compacted; listing again"),
        "{}",
        lab.host(3).orch.log()
    );

    // Every member down: every host serves on, refuses changes, and reports it.
    lab.kill_etcd(1);
    lab.kill_etcd(2);
    for k in 1..=HOSTS {
        let down = wait_until(Duration::from_secs(10), || {
            cli_ok(&lab, k, &["status"]).contains("cluster:     unreachable")
        });
        assert!(down.is_some(), "host {k}: {}", cli_ok(&lab, k, &["status"]));
        let out = lab
            .host(k)
            .orch
            .cli(&["service", "add", "never", "198.19.0.4:80"])
            .unwrap();
        assert_eq!(out.code(), Some(2), "host {k}: {}", out.stderr_text());
        assert_eq!(
            prom::sum(&metrics(&lab, k), "orch_cluster_reachable", &[]),
            Some(0.0),
            "host {k}"
        );
        for vip in ["198.19.0.1:80", "198.19.0.2:80", "198.19.0.3:80"] {
            assert_eq!(
                spread_via(&lab, k, vip.parse().unwrap()),
                all_backends(),
                "host {k}, {vip}, etcd down"
            );
        }
    }
    // A daemon restarted meanwhile comes back with its last known state.
    lab.host_mut(2).orch.stop().unwrap();
    lab.host_mut(2).orch.start().unwrap();
    assert_eq!(
        services_on(&lab, 2),
        ["api", "late", "web"].map(String::from).into(),
        "host 2 after its restart, etcd down\n{}",
        lab.logs()
    );
    assert_eq!(
        spread_via(&lab, 2, "198.19.0.3:80".parse().unwrap()),
        all_backends()
    );

    // etcd back: every host reachable again, changes flow, nothing acknowledged was lost.
    for k in 1..=HOSTS {
        lab.start_etcd(k).unwrap();
    }
    lab.wait_for_quorum(Duration::from_secs(30)).unwrap();
    for k in 1..=HOSTS {
        let back = wait_until(Duration::from_secs(15), || {
            cli_ok(&lab, k, &["status"]).contains("cluster:     reachable")
        });
        assert!(back.is_some(), "host {k}: {}", cli_ok(&lab, k, &["status"]));
    }
    add(&lab, 3, "after", "198.19.0.6:80");
    converge(&lab, &["after", "api", "late", "web"]);
}

/// etcd's client port on TLS with client certificates: orch connects with `[cluster.tls]`,
/// and a registration on one host is served by another.
#[test]
fn hosts_share_the_registry_over_tls() {
    if !ready("hosts_share_the_registry_over_tls") {
        return;
    }
    if !lab::have("openssl") {
        let why = "openssl is not installed (the test makes its certificates with it)";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("SKIP hosts_share_the_registry_over_tls: {why}");
        return;
    }
    let lab =
        ClusterLab::with_tls("tls", &orch_bin(), |_| String::new()).expect("building the lab");
    let status = cli_ok(&lab, 2, &["status"]);
    assert!(status.contains("https://198.18.50.1:2379"), "{status}");
    let mut args = vec!["service", "add", "web", "198.19.0.1:80"];
    let b = backends_arg();
    args.extend(b.iter().map(String::as_str));
    cli_ok(&lab, 1, &args);
    converge(&lab, &["web"]);
    assert_eq!(
        spread_via(&lab, 2, "198.19.0.1:80".parse().unwrap()),
        all_backends()
    );
}
