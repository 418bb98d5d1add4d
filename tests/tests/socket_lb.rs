//! Socket-level balancing, end to end: processes in a cgroup of the test's own (one in the
//! client's network namespace, one in the load balancer's) connect to the VIP; the
//! `connect()` itself goes to a backend, round-robin, skipping a drained one; `getpeername()`
//! shows the VIP; the packet path translates nothing for them.
//!
//! The clients are this test binary again (the ignored `client_helper` below), started in
//! the cgroup: membership is per process.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    path::Path,
    process::Command,
    time::Duration,
};

use orch_tests::{
    cgroup::Cgroup,
    lab::{self, Lab, Orch, VIP4},
    privilege::require_root,
    prom,
};

/// The env var that makes `client_helper` a client: `tcp|udp ADDR:PORT COUNT`.
const CLIENT: &str = "ORCH_SOCKLB_CLIENT";

/// Runs `client_helper` in network namespace `ns`, inside `cgroup`: `count` connections
/// (`proto` tcp or udp) to `to`. Returns, per connection, (backend name, peer address).
fn clients_in(
    ns: &str,
    cgroup: &Path,
    proto: &str,
    to: impl std::fmt::Display,
    count: usize,
) -> Vec<(String, String)> {
    let me = std::env::current_exe().unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c"])
        .arg(r#"echo $$ > "$1/cgroup.procs" && shift && exec "$@""#)
        .arg("sh")
        .arg(cgroup)
        .arg(&me)
        .args([
            "--exact",
            "client_helper",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CLIENT, format!("{proto} {to} {count}"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the client failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        // libtest may print its "test client_helper ... " before the first line.
        .filter_map(|l| l.split_once("ANSWER ").map(|(_, a)| a))
        .map(|l| {
            let (name, peer) = l.split_once(' ').unwrap();
            (name.to_owned(), peer.to_owned())
        })
        .collect()
}

fn tally(answers: &[(String, String)]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for (name, _) in answers {
        *t.entry(name.clone()).or_insert(0) += 1;
    }
    t
}

fn counter(lab: &Lab, name: &str, with: &[(&str, &str)]) -> f64 {
    prom::sum(&prom::parse(&lab.metrics().unwrap()), name, with).unwrap_or(0.0)
}

/// Packets the XDP/TC program translated (any `fwd_*` or `reply_*` verdict).
fn translated(lab: &Lab) -> f64 {
    prom::parse(&lab.metrics().unwrap())
        .iter()
        .filter(|s| s.name == "orch_xdp_packets_total")
        .filter(|s| {
            s.labels
                .iter()
                .any(|(k, v)| k == "reason" && (v.starts_with("fwd_") || v.starts_with("reply_")))
        })
        .map(|s| s.value)
        .sum()
}

#[test]
fn local_clients_are_balanced_at_connect_with_no_packet_translated() {
    if !require_root("local_clients_are_balanced_at_connect_with_no_packet_translated") {
        return;
    }
    let Some(cgroup) = Cgroup::create("socklb") else {
        let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(
            !in_ci,
            "CI=true but there is no cgroup v2 hierarchy to attach to"
        );
        eprintln!("SKIP: no cgroup v2 hierarchy (socket-level balancing needs one)");
        return;
    };
    let lab = Lab::new("socklb", 3).expect("building the lab");
    let config = format!(
        "{}\n[socket_lb]\nenabled = true\ncgroup = {:?}\n\n[dns]\nenabled = true\nlisten = \"{DNS}\"\n",
        lab::demo_config(),
        cgroup.dir()
    );
    let orch: Orch = lab
        .start_orch(&lab::orch_bin(), &config)
        .expect("starting orch");
    let web = SocketAddr::from((VIP4, 80));
    let dns = SocketAddr::from((VIP4, 53));

    for ns in [lab.client.name(), lab.lb.name()] {
        let before = translated(&lab);
        let connects = counter(&lab, "orch_socket_lb_total", &[("event", "connect")]);
        let tcp = clients_in(ns, cgroup.dir(), "tcp", web, 6);
        let udp = clients_in(ns, cgroup.dir(), "udp", dns, 6);
        // By name: the client asks orch's DNS, then connects to what it says.
        let by_name = clients_in(ns, cgroup.dir(), "tcp", "web.orch.internal.:80", 6);
        let udp_by_name = clients_in(ns, cgroup.dir(), "udp", "dns.orch.internal.:53", 6);
        assert_eq!(tally(&by_name).len(), 3, "{ns}: TCP by name: {by_name:?}");
        assert_eq!(
            tally(&udp_by_name).len(),
            3,
            "{ns}: UDP by name: {udp_by_name:?}"
        );
        // IPv6: the same with the other address field.
        let web6 = SocketAddr::from((lab::VIP6, 80));
        let v6 = clients_in(ns, cgroup.dir(), "tcp", web6, 6);
        assert_eq!(tally(&v6).len(), 3, "{ns}: IPv6: {v6:?}");
        assert!(
            v6.iter().all(|(_, peer)| peer == &web6.to_string()),
            "{ns}: IPv6 getpeername shows the VIP: {v6:?}"
        );
        let sendmsgs = counter(&lab, "orch_socket_lb_total", &[("event", "sendmsg")]);
        let sendto = clients_in(ns, cgroup.dir(), "sendto", dns, 6);
        assert_eq!(
            tally(&sendto).len(),
            3,
            "{ns}: unconnected UDP over all three backends: {sendto:?}"
        );
        assert_eq!(
            counter(&lab, "orch_socket_lb_total", &[("event", "sendmsg")]) - sendmsgs,
            12.0,
            "{ns}: every datagram balanced at sendmsg"
        );
        assert_eq!(
            tally(&tcp).len(),
            3,
            "{ns}: TCP over all three backends: {tcp:?}"
        );
        assert_eq!(tcp.len(), 6, "{ns}: every connection answered: {tcp:?}");
        // Six picks over per-CPU cursors: some CPU made three in a row, so all three
        // backends answer (with fewer, a CPU change could repeat one).
        // Round-robin per CPU: each CPU walks the table from its own cursor, so over a
        // client that moves between CPUs no backend is off by more than one per CPU.
        assert!(
            tally(&tcp).values().all(|&n| (1..=3).contains(&n)),
            "{ns}: round-robin: {tcp:?}"
        );
        assert_eq!(
            tally(&udp).len(),
            3,
            "{ns}: UDP over all three backends: {udp:?}"
        );
        for (_, peer) in tcp.iter().chain(&udp).chain(&sendto) {
            assert!(
                peer == &web.to_string() || peer == &dns.to_string(),
                "{ns}: getpeername and recvfrom show the VIP, not {peer}"
            );
        }
        assert_eq!(
            counter(&lab, "orch_socket_lb_total", &[("event", "connect")]) - connects,
            (6 * 5) as f64,
            "{ns}: every connect balanced by the socket program"
        );
        assert_eq!(
            translated(&lab),
            before,
            "{ns}: no packet of these connections was translated\n{}",
            orch.log()
        );
    }

    // `orch explain` says which path a local connection takes.
    let out = orch
        .cli(&[
            "explain",
            "tcp",
            "198.18.0.2:40000",
            "198.19.0.1:80",
            "--json",
        ])
        .unwrap();
    let e: serde_json::Value = serde_json::from_str(&out.stdout_text()).unwrap();
    assert_eq!(
        e["explain"]["socket_lb"].as_str(),
        Some(cgroup.dir().to_str().unwrap()),
        "{e}"
    );
    let text = orch
        .cli(&["explain", "tcp", "198.18.0.2:40000", "198.19.0.1:80"])
        .unwrap()
        .stdout_text();
    assert!(
        text.contains("balanced at connect()") && text.contains("no packet of it is translated"),
        "{text}"
    );

    // The same rotation: a backend drained is skipped by new connects.
    let out = orch
        .cli(&["backend", "disable", "web", "198.18.1.2:8080"])
        .unwrap();
    assert!(
        !out.status.success(),
        "web belongs to the config file: the CLI refuses (checked to keep this test honest)"
    );
    let out = orch
        .cli(&[
            "service",
            "add",
            "api",
            "198.19.0.2:80",
            "-b",
            "198.18.1.2:8080",
            "-b",
            "198.18.2.2:8080",
            "-b",
            "198.18.3.2:8080",
        ])
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr_text());
    let api = SocketAddr::from(([198, 19, 0, 2], 80));
    assert_eq!(
        tally(&clients_in(lab.lb.name(), cgroup.dir(), "tcp", api, 6)).len(),
        3
    );
    let out = orch
        .cli(&["backend", "drain", "api", "198.18.1.2:8080"])
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr_text());
    let after = tally(&clients_in(lab.lb.name(), cgroup.dir(), "tcp", api, 6));
    assert_eq!(
        after.len(),
        2,
        "the drained backend takes no new connection: {after:?}"
    );
    assert!(!after.contains_key("backend-1"), "{after:?}");

    // The daemon stopped: its pinned links keep balancing. Started again: its program is
    // swapped into them (BPF_LINK_UPDATE), and balancing goes on.
    let mut orch = orch;
    assert!(orch.stop().unwrap().success(), "{}", orch.log());
    let stopped = clients_in(lab.client.name(), cgroup.dir(), "tcp", web, 6);
    assert_eq!(tally(&stopped).len(), 3, "with no daemon: {stopped:?}");
    orch.start().expect("starting orch again");
    assert!(
        orch.log().contains("socket-level balancing attached"),
        "{}",
        orch.log()
    );
    let again = clients_in(lab.client.name(), cgroup.dir(), "tcp", web, 6);
    assert_eq!(tally(&again).len(), 3, "after the restart: {again:?}");

    // A process outside the cgroup still reaches the VIP, through the packet path.
    let before = translated(&lab);
    let name = lab
        .client
        .run(move || lab::tcp_ask(web, "outside"))
        .unwrap()
        .unwrap();
    assert!(name.starts_with("backend-"), "{name}");
    assert!(
        translated(&lab) > before,
        "outside the cgroup the packet path balances"
    );
    drop(orch);
}

/// The A record of `name`, asked of the daemon's DNS server ([`DNS`]).
fn resolve(name: &str) -> IpAddr {
    use hickory_proto::{
        op::{Message, Query},
        rr::{Name, RData, RecordType},
        serialize::binary::BinDecodable,
    };
    let mut q = Message::new();
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.send_to(&q.to_vec().unwrap(), DNS).unwrap();
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf).unwrap();
    let answer = Message::from_bytes(&buf[..n]).unwrap();
    match answer.answers().first().map(|r| r.data()) {
        Some(RData::A(a)) => IpAddr::V4(a.0),
        other => panic!("{name}: no A record: {other:?}"),
    }
}

/// Where the daemon answers DNS in this test: its address on the client side.
const DNS: &str = "198.18.0.1:53";

/// Not a test: the client `local_clients_are_balanced_...` starts in its cgroup (see
/// [`clients_in`]). Does nothing unless `ORCH_SOCKLB_CLIENT` says what to do.
#[test]
#[ignore = "a helper process of socket_lb tests, run by them"]
fn client_helper() {
    let Ok(what) = std::env::var(CLIENT) else {
        return;
    };
    let mut parts = what.split_whitespace();
    let (proto, to, count) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap().parse::<usize>().unwrap(),
    );
    // `NAME:PORT` is looked up with orch's DNS server first, as a client that uses names.
    let to: SocketAddr = to.parse().unwrap_or_else(|_| {
        let (name, port) = to.rsplit_once(':').unwrap();
        SocketAddr::new(resolve(name), port.parse().unwrap())
    });
    for i in 0..count {
        let (name, peer) = match proto {
            "tcp" => {
                let s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).unwrap();
                let peer = s.peer_addr().unwrap();
                let mut conn = lab::LineConn::from_stream(s).unwrap();
                (conn.ask(&format!("socket {i}")).unwrap(), peer)
            }
            "sendto" => {
                // Unconnected: each datagram is balanced at sendmsg() (a new socket, a new
                // flow); a second datagram on the same socket keeps its backend, and the
                // answers come from the VIP.
                let s = UdpSocket::bind((IpAddr::from([0, 0, 0, 0]), 0)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut names = Vec::new();
                let mut from = None;
                for round in 0..2 {
                    s.send_to(format!("sendto {i} {round}").as_bytes(), to)
                        .unwrap();
                    let mut buf = [0u8; 256];
                    let (n, f) = s.recv_from(&mut buf).unwrap();
                    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
                    names.push(answer.split(' ').next().unwrap_or("").to_owned());
                    from = Some(f);
                }
                assert_eq!(names[0], names[1], "one socket's flow keeps its backend");
                (names.remove(0), from.unwrap())
            }
            _ => {
                let s = UdpSocket::bind((IpAddr::from([0, 0, 0, 0]), 0)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                // Connected: the socket program chooses the backend at connect().
                s.connect(to).unwrap();
                let peer = s.peer_addr().unwrap();
                s.send(format!("socket {i}").as_bytes()).unwrap();
                let mut buf = [0u8; 256];
                let n = s.recv(&mut buf).unwrap();
                // "<name> <the line echoed>"
                let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
                (answer.split(' ').next().unwrap_or("").to_owned(), peer)
            }
        };
        println!("ANSWER {name} {peer}");
    }
}
