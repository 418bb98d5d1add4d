//! Control-plane timings in the lab, clocked at the backends: a SYN sniffer in every
//! backend's namespace records when client SYNs arrive, so "a backend received a
//! connection" is observed where it happens, not inferred from the client.
//!
//! ```text
//! sudo target/release/control_plane [--trials N]
//! ```
//! Needs root and the `orch` binary (`ORCH_BIN`, default target/release/orch).
//!
//! 1. Daemon start to first connection steered: a client starts a connection attempt to
//!    the VIP every 0.5 ms while `orch daemon` starts (a new process, BPF load and attach;
//!    build excluded); the figure is the first client SYN arriving at a backend.
//! 2. `orch service add` (the CLI process, from its start) to the backend receiving its
//!    first connection, with a client attempting every 0.1 ms.
//! 3. A backend killed under load (two clients connecting in a loop) to the last new
//!    connection reaching it: its process exiting (listener closed: SYNs get RST) and its
//!    host going dark (every packet dropped).
//! 4. Health probes per minute for 24 services x 3 backends, in steady state, without traffic
//!    and under traffic.
//! 5. A restart under load (new connections in a loop and 20 long-lived connections
//!    exchanging messages): failed requests and connections lost.

use clap::builder::RangedU64ValueParser;
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};
use orch_benches::{
    args,
    probe::{Acceptor, SynSniffer, SynSpray},
    report,
    stats::{max, median, percentile, thousands, verdict},
};
use orch_tests::{
    lab::{self, Lab, LineConn, Orch, VIP4},
    netns::Netns,
    prom,
};

/// The port of the services whose backends are [`Acceptor`]s.
const ACCEPT_PORT: u16 = 9000;
/// The 24 services of the probe count: VIP ports 10000.. onto the lab's line servers.
const FLEET: usize = 24;
const FLEET_PORT: u16 = 10_000;

/// Control-plane timings in the lab, clocked at the backends.
#[derive(clap::Parser)]
struct Options {
    /// Trials of each timing; the table gives percentiles over them.
    #[arg(long, default_value_t = 20, value_parser = RangedU64ValueParser::<usize>::new().range(3..=1000))]
    trials: usize,
}

fn main() -> anyhow::Result<()> {
    let Options { trials } = <Options as clap::Parser>::parse();
    let bin = args::orch_bin()?;

    let lab = Lab::new("cp", 3)?;
    lab.client
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    lab.client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    let acceptors = lab
        .backends
        .iter()
        .map(|b| Acceptor::start(&b.ns, ACCEPT_PORT))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let sniffers = lab
        .backends
        .iter()
        // Client SYNs only: the daemon's health probes to the same port come from the load
        // balancer's addresses.
        .map(|b| SynSniffer::start(&b.ns, |src: Ipv4Addr| src.octets()[..3] == [198, 18, 0]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cp = ControlPlane {
        lab: &lab,
        bin,
        acceptors,
        sniffers,
    };

    let mut md = String::from("## Control plane\n\n");
    writeln!(
        md,
        "```sh\nsudo target/release/control_plane --trials {trials}\n```\n\n\
         Timed at the backends: an `AF_PACKET` socket in each backend's namespace records when \
         client SYNs arrive, on the same clock as the actions. The daemon runs with {} \
         services ({FLEET} of them the probe fleet) and 3 backends each.\n",
        FLEET + 1
    )?;

    let starts = (trials / 4).max(3);
    eprintln!("daemon start to first connection steered ({starts} starts)");
    let start = cp.start_to_first_steered(starts)?;
    let mut orch = lab.start_orch(&cp.bin, &config(&lab))?;
    eprintln!("orch service add to first connection ({trials} registrations)");
    let register = cp.register_to_first_connection(&orch, trials)?;
    let kills = (trials / 4).max(3);
    eprintln!("backend killed under load ({kills} kills of each kind)");
    let exit = cp.kill_under_load(&orch, kills, Kill::Exit)?;
    let dark = cp.kill_under_load(&orch, kills, Kill::Dark)?;
    eprintln!("health probes in steady state without traffic (30 s)");
    let idle = cp.probes_per_minute(Duration::from_secs(30), false)?;
    eprintln!("health probes in steady state under traffic (30 s)");
    let probes = cp.probes_per_minute(Duration::from_secs(30), true)?;
    eprintln!("restart under load");
    let restart = cp.restart_under_load(&mut orch)?;

    writeln!(
        md,
        "| measurement | runs | p50 | p99 | max | target (judged on) |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---|")?;
    let row = |md: &mut String,
               name: &str,
               v: &[f64],
               target: f64,
               (on, by): (&str, fn(&[f64]) -> f64)| {
        writeln!(
            md,
            "| {name} | {} | {:.1} ms | {:.1} ms | {:.1} ms | under {target:.0} ms ({}): {} |",
            v.len(),
            median(v),
            percentile(v, 99.0),
            max(v),
            on,
            verdict(by(v) < target)
        )
    };
    row(
        &mut md,
        "daemon start to first connection steered",
        &start,
        200.0,
        ("p50", median),
    )?;
    row(
        &mut md,
        "`orch service add` to the backend's first connection",
        &register,
        10.0,
        ("p99", |v| percentile(v, 99.0)),
    )?;
    row(
        &mut md,
        "backend process killed to its last new connection",
        &exit.latency_ms,
        1000.0,
        ("max", max),
    )?;
    row(
        &mut md,
        "backend host gone dark to its last new connection",
        &dark.latency_ms,
        1000.0,
        ("max", max),
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "Under the kills, clients made {} connections; {} failed while a process was dead \
         (the data plane drops the refusal and the client's retransmitted SYN is balanced \
         elsewhere) and {} while a host was dark (attempts already sent to it time out).\n",
        thousands((exit.ok + exit.failed + dark.ok + dark.failed) as f64),
        exit.failed,
        dark.failed
    )?;
    writeln!(
        md,
        "Health probes for {FLEET} services x 3 backends in steady state: **{:.0} probes per \
         minute without traffic** ({}) and **{:.0} under traffic** ({} requests/s across them; \
         {}), target under 300 ({:.1} and {:.1} per backend per minute; Kubernetes' default \
         liveness and readiness probes, every 10 s each, would be 864, and the team of the \
         reference figure measured 2,400 for the same fleet).\n",
        idle.per_minute,
        verdict(idle.per_minute < 300.0),
        probes.per_minute,
        thousands(probes.request_rate),
        verdict(probes.per_minute < 300.0),
        idle.per_minute / (FLEET * 3) as f64,
        probes.per_minute / (FLEET * 3) as f64
    )?;
    writeln!(
        md,
        "Restart under load (SIGTERM, then a new daemon that takes over the pinned maps and \
         program; {:.0} ms from the signal to the new daemon serving): {} requests on new \
         connections during the {:.1} s window, **{} failed**; {}/{} long-lived connections \
         still answered afterwards, {} of their {} exchanges failed.\n",
        restart.gap_ms,
        thousands(restart.requests as f64),
        restart.window_s,
        restart.failed,
        restart.held_alive,
        restart.held,
        restart.held_failed,
        thousands(restart.held_exchanges as f64)
    )?;
    drop(orch);
    report::save_section("control_plane", &md)
}

/// The daemon's config: the acceptor service and the probe fleet.
fn config(lab: &Lab) -> String {
    let backends = |port: u16| -> String {
        (1..=3)
            .map(|i| format!("  {{ address = \"{}:{port}\" }},\n", lab::backend4(i)))
            .collect()
    };
    let list: Vec<String> = lab
        .lb_interfaces()
        .iter()
        .map(|i| format!("{i:?}"))
        .collect();
    let mut s = format!("[dataplane]\ninterfaces = [{}]\n\n", list.join(", "));
    writeln!(
        s,
        "[[service]]\nname = \"accept\"\nvip = \"{VIP4}\"\nport = {ACCEPT_PORT}\nprotocol = \"tcp\"\nbackend = [\n{}]\n",
        backends(ACCEPT_PORT)
    )
    .unwrap();
    for i in 0..FLEET {
        writeln!(
            s,
            "[[service]]\nname = \"svc-{i:02}\"\nvip = \"{VIP4}\"\nport = {}\nprotocol = \"tcp\"\nbackend = [\n{}]\n",
            FLEET_PORT + i as u16,
            backends(lab::TCP_PORT)
        )
        .unwrap();
    }
    s
}

/// Two client threads repeating one attempt as fast as they can, counting successes and
/// failures; stopped by [`Load::finish`] or when dropped.
struct Load {
    stop: Arc<AtomicBool>,
    counts: Arc<[AtomicU64; 2]>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(
        ns: &Netns,
        attempt: impl Fn() -> bool + Clone + Send + 'static,
    ) -> anyhow::Result<Load> {
        let mut load = Load {
            stop: Arc::new(AtomicBool::new(false)),
            counts: Arc::new([AtomicU64::new(0), AtomicU64::new(0)]),
            threads: Vec::new(),
        };
        for _ in 0..2 {
            let (stop, counts, attempt) = (load.stop.clone(), load.counts.clone(), attempt.clone());
            load.threads.push(ns.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let i = if attempt() { 0 } else { 1 };
                    counts[i].fetch_add(1, Ordering::Relaxed);
                }
            })?);
        }
        Ok(load)
    }

    /// Successes and failures so far.
    fn counts(&self) -> (u64, u64) {
        (
            self.counts[0].load(Ordering::Relaxed),
            self.counts[1].load(Ordering::Relaxed),
        )
    }

    /// Stops the threads; the final counts.
    fn finish(mut self) -> (u64, u64) {
        self.stop_threads();
        self.counts()
    }

    fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kill {
    /// The backend's process exits: its listener closes and SYNs are answered with RST.
    Exit,
    /// The backend's host stops answering anything (an nftables drop-all in its namespace).
    Dark,
}

struct KillResult {
    latency_ms: Vec<f64>,
    ok: u64,
    failed: u64,
}

struct Probes {
    per_minute: f64,
    request_rate: f64,
}

struct Restart {
    gap_ms: f64,
    window_s: f64,
    requests: u64,
    failed: u64,
    held: usize,
    held_alive: usize,
    held_exchanges: u64,
    held_failed: u64,
}

struct ControlPlane<'a> {
    lab: &'a Lab,
    bin: PathBuf,
    acceptors: Vec<Acceptor>,
    sniffers: Vec<SynSniffer>,
}

impl ControlPlane<'_> {
    /// The first client SYN to the acceptor port at any backend since `since`.
    fn first_syn(&self, since: Instant, limit: Duration) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            let first = self
                .sniffers
                .iter()
                .filter_map(|s| s.syns(ACCEPT_PORT, since).into_iter().min())
                .min();
            if first.is_some() || Instant::now() > deadline {
                return first;
            }
            thread::sleep(Duration::from_micros(200));
        }
    }

    fn clear(&self) {
        for s in &self.sniffers {
            s.clear();
        }
    }

    fn start_to_first_steered(&self, trials: usize) -> anyhow::Result<Vec<f64>> {
        let vip = SocketAddr::from((VIP4, ACCEPT_PORT));
        let mut ms = Vec::new();
        for t in 0..trials {
            self.clear();
            let spray = SynSpray::start(
                &self.lab.client,
                vip,
                Duration::from_micros(500),
                Duration::from_secs(10),
            )?;
            let t0 = Instant::now();
            let orch =
                self.lab
                    .start_orch_with(&self.bin, &config(self.lab), &["--detach-on-exit"])?;
            let first = self
                .first_syn(t0, Duration::from_secs(5))
                .context("no connection reached a backend within 5 s of the start")?;
            let v = (first - t0).as_secs_f64() * 1e3;
            eprintln!(
                "  start {}: first connection steered after {v:.1} ms",
                t + 1
            );
            ms.push(v);
            drop(spray);
            drop(orch);
        }
        Ok(ms)
    }

    fn register_to_first_connection(&self, orch: &Orch, trials: usize) -> anyhow::Result<Vec<f64>> {
        let backend = format!("{}:{ACCEPT_PORT}", lab::backend4(1));
        let mut ms = Vec::new();
        for t in 0..trials {
            let port = 9100 + t as u16;
            let vip = SocketAddr::from((VIP4, port));
            let name = format!("reg-{t}");
            self.clear();
            let spray = SynSpray::start(
                &self.lab.client,
                vip,
                Duration::from_micros(100),
                Duration::from_secs(3),
            )?;
            thread::sleep(Duration::from_millis(20));
            let t0 = Instant::now();
            let out = orch.cli(&["service", "add", &name, &vip.to_string(), "-b", &backend])?;
            ensure!(out.status.success(), "service add: {}", out.stderr_text());
            let first = self.sniffers[0]
                .syns(ACCEPT_PORT, t0)
                .into_iter()
                .min()
                .or_else(|| self.first_syn(t0, Duration::from_secs(2)))
                .context("the registered backend received no connection within 2 s")?;
            ms.push((first - t0).as_secs_f64() * 1e3);
            drop(spray);
            let out = orch.cli(&["service", "rm", &name])?;
            ensure!(out.status.success(), "service rm: {}", out.stderr_text());
        }
        eprintln!("  p50 {:.2} ms, max {:.2} ms", median(&ms), max(&ms));
        Ok(ms)
    }

    fn kill_under_load(
        &self,
        orch: &Orch,
        trials: usize,
        kill: Kill,
    ) -> anyhow::Result<KillResult> {
        let vip = SocketAddr::from((VIP4, ACCEPT_PORT));
        let load = Load::start(&self.lab.client, move || {
            std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(2)).is_ok()
        })?;
        let victim = 1; // backend-2
        let mut latency_ms = Vec::new();
        let result = (|| -> anyhow::Result<()> {
            for t in 0..trials {
                self.wait_in_rotation(orch, victim)?;
                thread::sleep(Duration::from_millis(500));
                let t_kill = match kill {
                    Kill::Exit => self.acceptors[victim].kill(),
                    Kill::Dark => {
                        self.lab.backends[victim].ns.exec(
                            "nft",
                            &["add table inet dark; add chain inet dark in { type filter hook input priority 0; policy drop; }"],
                        )?;
                        Instant::now()
                    }
                };
                // Long enough for the slowest mechanism (probe timeouts) several times over.
                thread::sleep(Duration::from_secs(6));
                let last = self.sniffers[victim]
                    .syns(ACCEPT_PORT, t_kill)
                    .into_iter()
                    .max()
                    .unwrap_or(t_kill);
                let v = (last - t_kill).as_secs_f64() * 1e3;
                eprintln!(
                    "  {} {}: last new connection reached it {v:.1} ms after the kill",
                    if kill == Kill::Exit { "exit" } else { "dark" },
                    t + 1
                );
                latency_ms.push(v);
                match kill {
                    Kill::Exit => self.acceptors[victim].revive(),
                    Kill::Dark => {
                        self.lab.backends[victim]
                            .ns
                            .exec("nft", &["delete table inet dark"])?;
                    }
                }
            }
            Ok(())
        })();
        let (ok, failed) = load.finish();
        result?;
        Ok(KillResult {
            latency_ms,
            ok,
            failed,
        })
    }

    /// Waits until the daemon has backend `i` of the acceptor service in rotation again.
    fn wait_in_rotation(&self, orch: &Orch, i: usize) -> anyhow::Result<()> {
        let backend = format!("{}:{ACCEPT_PORT}", lab::backend4(i + 1));
        // A breaker that opened several times in a row backs off up to 30 s (+/- 20 %).
        let ok = lab::wait_until(Duration::from_secs(60), || {
            self.lab.metrics().is_ok_and(|m| {
                let samples = prom::parse(&m);
                prom::sum(
                    &samples,
                    "orch_backend_in_rotation",
                    &[("service", "accept"), ("backend", &backend)],
                ) == Some(1.0)
                    && prom::sum(
                        &samples,
                        "orch_backend_ejected",
                        &[("service", "accept"), ("backend", &backend)],
                    ) == Some(0.0)
            })
        });
        if ok.is_none() {
            let log = orch.log();
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(&backend)).collect();
            bail!(
                "{backend} did not return to rotation within 60 s; the daemon's last lines about it:\n{}",
                lines[lines.len().saturating_sub(12)..].join("\n")
            );
        }
        Ok(())
    }

    /// Probes per minute over `window`, with a client making requests across the fleet
    /// (`traffic`) or none.
    fn probes_per_minute(&self, window: Duration, traffic: bool) -> anyhow::Result<Probes> {
        let stop = Arc::new(AtomicBool::new(!traffic));
        let requests = Arc::new(AtomicU64::new(0));
        let traffic = {
            let (stop, requests) = (stop.clone(), requests.clone());
            self.lab.client.spawn(move || {
                let mut i = 0u16;
                while !stop.load(Ordering::Relaxed) {
                    let vip = SocketAddr::from((VIP4, FLEET_PORT + i % FLEET as u16));
                    if lab::tcp_ask(vip, "x").is_ok() {
                        requests.fetch_add(1, Ordering::Relaxed);
                    }
                    i = i.wrapping_add(1);
                    thread::sleep(Duration::from_millis(2));
                }
            })?
        };
        let count = || -> anyhow::Result<f64> {
            let samples = prom::parse(&self.lab.metrics()?);
            Ok(samples
                .iter()
                .filter(|s| {
                    s.name == "orch_health_checks_total"
                        && s.labels
                            .iter()
                            .any(|(k, v)| k == "service" && v.starts_with("svc-"))
                })
                .map(|s| s.value)
                .sum())
        };
        // Let the stability scores settle first.
        thread::sleep(Duration::from_secs(10));
        let (before, r0, t0) = (count()?, requests.load(Ordering::Relaxed), Instant::now());
        thread::sleep(window);
        let (after, r1, elapsed) = (count()?, requests.load(Ordering::Relaxed), t0.elapsed());
        stop.store(true, Ordering::Relaxed);
        let _ = traffic.join();
        Ok(Probes {
            per_minute: (after - before) * 60.0 / elapsed.as_secs_f64(),
            request_rate: (r1 - r0) as f64 / elapsed.as_secs_f64(),
        })
    }

    fn restart_under_load(&self, orch: &mut Orch) -> anyhow::Result<Restart> {
        let vip = SocketAddr::from((VIP4, FLEET_PORT));
        let load = Load::start(&self.lab.client, move || lab::tcp_ask(vip, "x").is_ok())?;
        let stop = Arc::new(AtomicBool::new(false));
        const HELD: usize = 20;
        let held = {
            let stop = stop.clone();
            self.lab.client.spawn(move || -> (usize, u64, u64) {
                let mut conns: Vec<Option<LineConn>> =
                    (0..HELD).map(|_| LineConn::connect(vip).ok()).collect();
                let (mut exchanges, mut failures) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    for c in conns.iter_mut() {
                        let Some(conn) = c else { continue };
                        exchanges += 1;
                        if conn.ask("held").is_err() {
                            failures += 1;
                            *c = None;
                        }
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                let alive = conns
                    .iter_mut()
                    .flatten()
                    .map(|c| c.ask("last").is_ok())
                    .filter(|ok| *ok)
                    .count();
                (alive, exchanges, failures)
            })?
        };
        thread::sleep(Duration::from_secs(2));
        let ((r0, f0), t0) = (load.counts(), Instant::now());
        let status = orch.stop()?;
        ensure!(
            status.success(),
            "the daemon exited with {status} on SIGTERM"
        );
        orch.start()?;
        let gap = t0.elapsed();
        thread::sleep(Duration::from_secs(2));
        let window = t0.elapsed();
        let (r1, f1) = load.finish();
        stop.store(true, Ordering::Relaxed);
        let (held_alive, held_exchanges, held_failed) = held
            .join()
            .map_err(|_| anyhow::anyhow!("the long-lived connections' thread panicked"))?;
        Ok(Restart {
            gap_ms: gap.as_secs_f64() * 1e3,
            window_s: window.as_secs_f64(),
            requests: r1 - r0,
            failed: f1 - f0,
            held: HELD,
            held_alive,
            held_exchanges,
            held_failed,
        })
    }
}
