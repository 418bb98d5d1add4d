//! Several hosts, one registry: how fast a service registered on one host is served by
//! another, and what the daemons and etcd hold in memory for a small and a large fleet.
//!
//! ```text
//! sudo target/release/cluster [--trials N] [--large N]
//! ```
//! Needs root, etcd and the `orch` binary (`ORCH_BIN`). The lab is the cluster tests' (three
//! hosts, each an orch daemon and an etcd member, in namespaces; see
//! `orch_tests::cluster`). Propagation: each trial registers a new service through host 1's
//! admin API and times, from just before the request, the first connection through host 3
//! that a backend answers (the client retries every millisecond, each attempt given 5 ms). The baseline is the same
//! through host 1, the host that made the change. Memory: `VmRSS` of each daemon and each
//! etcd member with 24 services x 3 backends (TCP checks on), then with `--large` services
//! x 8 backends (checks off: nothing answers at those addresses).

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context};
use clap::builder::RangedU64ValueParser;
use orch::{
    api::{client, BackendSpec, Request},
    model::{CheckKind, HealthCheck, Protocol},
};
use orch_benches::{args, report, stats::percentile};
use orch_tests::{
    cluster::{backend, client_via, ClusterLab, HOSTS},
    lab,
};

#[derive(clap::Parser)]
struct Options {
    /// Registrations timed (each through host 1 then host 3, alternately).
    #[arg(long, default_value_t = 60, value_parser = RangedU64ValueParser::<usize>::new().range(4..=1000))]
    trials: usize,
    /// Services (of 8 backends) of the large fleet.
    #[arg(long, default_value_t = 10_000, value_parser = RangedU64ValueParser::<usize>::new().range(100..=10_000))]
    large: usize,
}

fn main() -> anyhow::Result<()> {
    let o = <Options as clap::Parser>::parse();
    ensure!(
        lab::have("etcd") && lab::have("etcdctl"),
        "etcd is not installed (apt install etcd-server etcd-client; cargo xtask prereqs does)"
    );
    let bin = args::orch_bin()?;
    let lab = ClusterLab::with_dataplane(
        "clb",
        &bin,
        "max_services = 10240\nmax_backends = 81920",
        |_| String::new(),
    )?;
    let socket = |k: usize| lab.host(k).orch.socket().to_owned();

    // Propagation, alternating the host that serves the first connection.
    eprintln!("propagation: {} registrations", o.trials);
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    for i in 0..o.trials {
        let via = if i % 2 == 0 { 3 } else { 1 };
        let vip = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 19, 1, 1 + i as u8)), 80);
        let request = on_the_lab_backends(&format!("p{i}"), vip.ip());
        let t0 = Instant::now();
        client::call(&socket(1), &request).with_context(|| format!("registering p{i}"))?;
        let took = lab
            .client
            .run(move || first_answer(client_via(via), vip, t0))??;
        let ms = took.as_secs_f64() * 1e3;
        if via == 1 { &mut local } else { &mut remote }.push(ms);
        client::call(
            &socket(2),
            &Request::ServiceRm {
                name: format!("p{i}"),
            },
        )?;
    }
    wait_services(&lab, 0)?;

    // The small fleet, as users run it.
    eprintln!("24 services x 3 backends");
    for i in 0..24u16 {
        let vip = IpAddr::V4(Ipv4Addr::new(198, 19, 2, 1 + i as u8));
        client::call(
            &socket(1 + usize::from(i) % HOSTS),
            &on_the_lab_backends(&format!("svc{i}"), vip),
        )?;
    }
    wait_services(&lab, 24)?;
    thread::sleep(Duration::from_secs(3));
    let small = Memory::of(&lab)?;

    // The large fleet: registered through every host at once, 4 writers per host.
    eprintln!("{} services x 8 backends", o.large);
    let t0 = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..HOSTS * 4)
        .map(|w| {
            let (socket, next, large) = (socket(1 + w % HOSTS), next.clone(), o.large);
            thread::spawn(move || -> anyhow::Result<()> {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= large {
                        return Ok(());
                    }
                    client::call(&socket, &large_service(i))
                        .with_context(|| format!("registering big{i}"))?;
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer thread")?;
    }
    let registered = t0.elapsed();
    wait_services(&lab, 24 + o.large)?;
    let converged = t0.elapsed();
    thread::sleep(Duration::from_secs(2));
    let large = Memory::of(&lab)?;

    let (p50r, p99r) = (percentile(&remote, 50.0), percentile(&remote, 99.0));
    let (p50l, p99l) = (percentile(&local, 50.0), percentile(&local, 99.0));
    let mut md = String::from("## Several hosts (etcd)\n\n");
    writeln!(md, "```sh\nsudo target/release/cluster\n```\n")?;
    writeln!(
        md,
        "Three orch hosts and a three-member etcd cluster (etcd {}) in namespaces on this \
         machine, sharing its 2 cores. Propagation: a service registered through host 1's \
         API, timed from the request to the first connection a backend answers through \
         another host (host 3), against the same through host 1 itself; {} trials.\n",
        etcd_version(),
        o.trials
    )?;
    writeln!(
        md,
        "| first connection after registering | p50 | p99 | target |"
    )?;
    writeln!(md, "|---|---:|---:|---|")?;
    writeln!(
        md,
        "| through the registering host (baseline) | {p50l:.1} ms | {p99l:.1} ms | |"
    )?;
    writeln!(
        md,
        "| through another host | {p50r:.1} ms | {p99r:.1} ms | p99 under 50 ms: {} |",
        orch_benches::stats::verdict(p99r < 50.0)
    )?;
    writeln!(
        md,
        "| ratio, another host / registering host | {:.2}x | {:.2}x | |\n",
        p50r / p50l,
        p99r / p99l
    )?;
    writeln!(md, "| fleet | orch RSS per host | etcd RSS per member |")?;
    writeln!(md, "|---|---:|---:|")?;
    for (what, m) in [
        ("24 services x 3 backends".to_owned(), &small),
        (format!("{} services x 8 backends", o.large), &large),
    ] {
        writeln!(
            md,
            "| {what} | {:.1} MB (max {:.1}) | {:.1} MB (max {:.1}) |",
            m.orch_mean, m.orch_max, m.etcd_mean, m.etcd_max
        )?;
    }
    writeln!(
        md,
        "\nRegistering the {} services through the three hosts' APIs (12 writers): {:.1} s; \
         every host serving all of them: {:.1} s.\n",
        o.large,
        registered.as_secs_f64(),
        converged.as_secs_f64()
    )?;
    report::save_section("cluster", &md)
}

/// A TCP service at `vip`:80 over the lab's three backends, with the default check.
fn on_the_lab_backends(name: &str, vip: IpAddr) -> Request {
    Request::ServiceAdd {
        name: name.to_owned(),
        vip,
        port: 80,
        protocol: Protocol::Tcp,
        backends: (1..=3)
            .map(|b| BackendSpec {
                address: SocketAddr::new(IpAddr::V4(backend(b)), lab::TCP_PORT),
                weight: 1,
            })
            .collect(),
        check: None,
        scheduler: Default::default(),
    }
}

/// Polls `vip` from `from` until a backend answers; the time since `t0`. Each attempt gets
/// 5 ms to connect: a host that has no route yet answers a SYN with ICMP unreachable, but
/// rate-limits those answers (about one a second after a burst), and a SYN that met the
/// limit would otherwise wait a second for the client's retransmission.
fn first_answer(from: Ipv4Addr, vip: SocketAddr, t0: Instant) -> anyhow::Result<Duration> {
    use std::io::{BufRead, BufReader, Write};
    loop {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_linger(Some(Duration::ZERO))?;
        socket.bind(&SocketAddr::new(IpAddr::V4(from), 0).into())?;
        if socket
            .connect_timeout(&vip.into(), Duration::from_millis(5))
            .is_ok()
        {
            let mut stream: std::net::TcpStream = socket.into();
            stream.set_read_timeout(Some(Duration::from_secs(1)))?;
            writeln!(stream, "first")?;
            let mut answer = String::new();
            BufReader::new(&stream).read_line(&mut answer)?;
            ensure!(answer.starts_with("backend-"), "answer {answer:?}");
            return Ok(t0.elapsed());
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(10),
            "{vip} not served through {from} after 10 s"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Service `i` of the large fleet: 8 backends nothing answers at, no checks.
fn large_service(i: usize) -> Request {
    let vip = Ipv4Addr::new(198, 19, 10 + (i / 250) as u8, 1 + (i % 250) as u8);
    Request::ServiceAdd {
        name: format!("big{i}"),
        vip: IpAddr::V4(vip),
        port: 80,
        protocol: Protocol::Tcp,
        backends: (0..8u8)
            .map(|b| BackendSpec {
                address: SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(198, 18, 200 + b, 1 + (i % 250) as u8)),
                    8000 + (i / 250) as u16,
                ),
                weight: 1,
            })
            .collect(),
        check: Some(HealthCheck {
            kind: CheckKind::None,
            ..HealthCheck::default()
        }),
        scheduler: Default::default(),
    }
}

/// Waits until every host serves `n` services.
fn wait_services(lab: &ClusterLab, n: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    for k in 1..=HOSTS {
        loop {
            let reply = client::call(lab.host(k).orch.socket(), &Request::Status)?;
            let orch::api::Reply::Status(s) = reply else {
                anyhow::bail!("status answered {reply:?}");
            };
            if s.services == n {
                break;
            }
            ensure!(
                start.elapsed() < Duration::from_secs(300),
                "host {k} serves {} services, not {n}",
                s.services
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

struct Memory {
    orch_mean: f64,
    orch_max: f64,
    etcd_mean: f64,
    etcd_max: f64,
}

impl Memory {
    fn of(lab: &ClusterLab) -> anyhow::Result<Memory> {
        let mut orch = Vec::new();
        let mut etcd = Vec::new();
        for k in 1..=HOSTS {
            orch.push(rss_mb(
                lab.host(k).orch.pid().context("orch is not running")?,
            )?);
            etcd.push(rss_mb(lab.etcd_pid(k).context("etcd is not running")?)?);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        Ok(Memory {
            orch_mean: mean(&orch),
            orch_max: max(&orch),
            etcd_mean: mean(&etcd),
            etcd_max: max(&etcd),
        })
    }
}

/// `VmRSS` of process `pid`, in MB.
fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024.0 / 1e6)
}

fn etcd_version() -> String {
    std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("etcd Version: "))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into())
}
