//! End to end: HTTP through orch's VIP against the backends directly, nftables DNAT,
//! HAProxy (TCP mode) and nginx's stream proxy, with wrk, in the lab's namespaces.
//!
//! ```text
//! sudo target/release/e2e [--rounds R] [--seconds S] [--connections C] [--attach A]
//!                           [--only direct|orch|nftables|haproxy|nginx]
//! ```
//! Needs root, the `orch` binary (`ORCH_BIN`, default target/release/orch), and nginx (with
//! its stream module), HAProxy, wrk and nft on the PATH (`cargo xtask bench` installs them).
//!
//! Topology: the lab's default (client, load balancer, three backends as ports of a Linux
//! bridge, every device as the kernel makes it, TX checksum offload on; see
//! `orch_tests::lab`), with
//! nginx on port 80 in every backend answering `200` and the backend's name (one worker:
//! each backend is one small service). The client always runs the same wrk (one thread per
//! backend, C connections); only the path changes:
//! - `direct`: each wrk thread talks to one backend; packets are routed through the load
//!   balancer's namespace like every other path, with nothing on it but IP forwarding;
//! - `orch`: the daemon with one service on the VIP, attached to `ext` and `br0` as `--attach`
//!   says (default `auto`: TC on these virtual devices)
//!   (`--detach-on-exit`, so the other paths run without it);
//! - `nftables`: DNAT to a random backend (`numgen random`) in prerouting, the rule shape
//!   kube-proxy generates, with conntrack;
//! - `haproxy` and `nginx`: the VIP as a local address, a TCP proxy on it with one thread
//!   or worker per core, round-robin.
//!
//! With `--local` the client is a process on the load balancer host itself (wrk in its
//! namespace, as a service calling another on the same host): `direct` (wrk to the
//! backends), `orch` (socket-level balancing: wrk runs in the cgroup orch's `connect()`
//! program is attached to; no packet is translated) and `nftables` (the same DNAT in the
//! output hook, where kube-proxy handles local clients). The proxies are not measured there.
//!
//! Both proxies get a fair setup in the load balancer's namespace: `tcp_tw_reuse` and the
//! widest ephemeral port range. Each round runs every path (in a rotated order) with
//! keep-alive and with a new connection per request (`Connection: close`); the report
//! gives medians over rounds, and ratios as the median of the per-round ratios.

use clap::builder::RangedU64ValueParser;
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};
use orch_benches::{
    args,
    chart::{self, Bars},
    child::Child,
    load, report,
    stats::{median, thousands, verdict},
};
use orch_tests::{
    cgroup::Cgroup,
    lab::{self, Lab, Orch, VIP4},
};
use serde::Deserialize;

const PORT: u16 = 80;
const BACKENDS: usize = 3;

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Route {
    Direct,
    Orch,
    Nftables,
    Haproxy,
    Nginx,
}

impl Route {
    const ALL: [Route; 5] = [
        Route::Direct,
        Route::Orch,
        Route::Nftables,
        Route::Haproxy,
        Route::Nginx,
    ];

    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Orch => "orch",
            Route::Nftables => "nftables DNAT",
            Route::Haproxy => "HAProxy (tcp)",
            Route::Nginx => "nginx stream",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Conn {
    KeepAlive,
    New,
}

impl Conn {
    const ALL: [Conn; 2] = [Conn::KeepAlive, Conn::New];

    fn name(self) -> &'static str {
        match self {
            Conn::KeepAlive => "keep-alive",
            Conn::New => "new connection per request",
        }
    }
}

/// One load run's result (latencies in microseconds): what the wrk script's `done` prints,
/// or the same figures from [`load`].
#[derive(Deserialize, Debug, Clone, Copy)]
struct Wrk {
    requests: u64,
    duration_us: u64,
    errors: u64,
    p50_us: f64,
    p95_us: f64,
    p99_us: f64,
}

impl Wrk {
    fn rps(&self) -> f64 {
        self.requests as f64 / (self.duration_us as f64 / 1e6)
    }
}

/// Requests per second and latency through orch, its peers and no balancer at all.
#[derive(clap::Parser)]
struct Options {
    /// Rounds of every path, alternating; the table gives the medians.
    #[arg(long, default_value_t = 5, value_parser = RangedU64ValueParser::<usize>::new().range(1..=50))]
    rounds: usize,
    /// Seconds of load per path and round.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=120))]
    seconds: u64,
    /// wrk's open connections (at least one per backend).
    #[arg(long, default_value_t = 30, value_parser = RangedU64ValueParser::<usize>::new().range(BACKENDS as u64..=1000))]
    connections: usize,
    /// orch's `attach`: `auto` (TC on the lab's veths), `tc` or `xdp` (hardware NICs only).
    #[arg(long, default_value = "auto", value_parser = ["auto", "tc", "xdp"])]
    attach: String,
    /// Measure this path alone (for profiling it); no section is written.
    #[arg(long, value_enum)]
    only: Option<Route>,
    /// The client is a process on the load balancer host: direct, orch's socket-level
    /// balancing, nftables DNAT in the output hook.
    #[arg(long)]
    local: bool,
    /// The load generator: `wrk` (a thread's connections all go to one address, so
    /// `direct` pins each thread to one backend) or `spread` (this benchmark's own: every
    /// connection moves to the next backend when it reconnects, as through a balancer).
    #[arg(long, value_enum, default_value_t = Generator::Wrk)]
    generator: Generator,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Generator {
    Wrk,
    Spread,
}

fn main() -> anyhow::Result<()> {
    let o = <Options as clap::Parser>::parse();
    for tool in ["wrk", "nginx", "haproxy", "nft"] {
        ensure!(
            which(tool),
            "{tool} is not installed (`cargo xtask bench` installs the peers: apt-get install wrk nginx-light libnginx-mod-stream haproxy nftables)"
        );
    }
    let bin = args::orch_bin()?;

    let lab = Lab::new("e2e", BACKENDS)?;
    let bench = Bench::new(&lab, bin, o)?;
    let results = bench.run()?;
    if bench.o.only.is_some() {
        eprintln!("--only: one path measured, no ratios, no section written");
        return Ok(());
    }
    let markdown = bench.section(&results)?;
    report::save_section(if bench.o.local { "e2e_local" } else { "e2e" }, &markdown)
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `results[route][conn]`: one wrk run per round.
type Results = Vec<Vec<Vec<Wrk>>>;

struct Bench<'a> {
    lab: &'a Lab,
    bin: PathBuf,
    o: Options,
    /// Scratch directory for configs, scripts and logs (removed at the end).
    dir: PathBuf,
    /// `--local`: the cgroup socket-level balancing serves, which wrk joins for `orch`.
    cgroup: Option<Cgroup>,
    _backends: Vec<Child>,
}

impl<'a> Bench<'a> {
    fn new(lab: &'a Lab, bin: PathBuf, o: Options) -> anyhow::Result<Bench<'a>> {
        let dir = lab.scratch_path("e2e");
        std::fs::create_dir_all(&dir)?;
        // Many short connections: every ephemeral port, TIME_WAIT reuse. The proxies in the
        // load balancer's namespace need it most; the client gets the same.
        for ns in [&lab.client, &lab.lb] {
            ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
            ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        }
        // One client address per path: the backends keep TIME_WAIT state for a minute per
        // client address and port, and a SYN that a path translates onto such a 4-tuple
        // carries timestamps from another clock offset (Linux derives it from the
        // addresses), which the backend rejects until the client retries a second later.
        // Sharing an address would make each path pay for the one before it.
        for (ri, _) in Route::ALL.iter().enumerate() {
            lab.client.ip(&[
                "addr",
                "add",
                &format!("{}/24", client_addr(ri)),
                "dev",
                "eth0",
            ])?;
        }
        let mut backends = Vec::new();
        for (i, b) in lab.backends.iter().enumerate() {
            backends.push(start_nginx_backend(&dir, i + 1, b)?);
        }
        let cgroup = if o.local {
            Some(Cgroup::create("e2e").context("no cgroup v2 hierarchy to attach to")?)
        } else {
            None
        };
        let mut bench = Bench {
            lab,
            bin,
            o,
            dir,
            cgroup,
            _backends: backends,
        };
        bench.wait_backends()?;
        Ok(bench)
    }

    fn wait_backends(&mut self) -> anyhow::Result<()> {
        for i in 1..=BACKENDS {
            let addr = SocketAddr::from((lab::backend4(i), PORT));
            let ok = lab::wait_until(Duration::from_secs(10), || {
                self.lab
                    .client
                    .run(move || lab::http_get(addr))
                    .is_ok_and(|r| r.is_ok_and(|body| body == format!("backend-{i}")))
            });
            ensure!(
                ok.is_some(),
                "nginx on backend-{i} did not answer within 10 s"
            );
        }
        Ok(())
    }

    /// The paths measured: all of them, or with `--local` those a local client has.
    fn routes(&self) -> &'static [Route] {
        if self.o.local {
            &Route::ALL[..3]
        } else {
            &Route::ALL
        }
    }

    /// The namespace the client (wrk) runs in.
    fn client(&self) -> &orch_tests::netns::Netns {
        if self.o.local {
            &self.lab.lb
        } else {
            &self.lab.client
        }
    }

    fn run(&self) -> anyhow::Result<Results> {
        let routes = self.routes();
        let mut results: Results = vec![vec![Vec::new(); Conn::ALL.len()]; routes.len()];
        let started = Instant::now();
        for round in 0..self.o.rounds {
            for k in 0..routes.len() {
                let ri = (k + round) % routes.len();
                let route = routes[ri];
                if self.o.only.is_some_and(|only| only != route) {
                    continue;
                }
                let setup = self.set_up(ri)?;
                self.check_spread(route)?;
                // One second to warm caches (and the proxies' connection pools) first.
                self.load(route, Conn::KeepAlive, 1)?;
                for (ci, conn) in Conn::ALL.into_iter().enumerate() {
                    let r = self.load(route, conn, self.o.seconds)?;
                    eprintln!(
                        "[{:>4.0}s] round {}/{} {:<14} {:<27} {:>9} req/s  p50 {:>6.3} ms  p99 {:>6.3} ms  errors {}",
                        started.elapsed().as_secs_f64(),
                        round + 1,
                        self.o.rounds,
                        route.name(),
                        conn.name(),
                        thousands(r.rps()),
                        r.p50_us / 1e3,
                        r.p99_us / 1e3,
                        r.errors
                    );
                    results[ri][ci].push(r);
                }
                drop(setup);
            }
        }
        Ok(results)
    }

    /// Puts `route` in place; dropping the result takes it away again.
    fn set_up(&self, ri: usize) -> anyhow::Result<Setup<'_>> {
        let route = self.routes()[ri];
        if !self.o.local {
            self.lab.client.ip(&[
                "route",
                "replace",
                "default",
                "via",
                "198.18.0.1",
                "src",
                &client_addr(ri).to_string(),
            ])?;
        }
        Ok(match route {
            Route::Direct => Setup::Nothing,
            Route::Orch if self.o.local => {
                let cgroup = self.cgroup.as_ref().expect("--local has a cgroup");
                let config = format!(
                    "{}\n[socket_lb]\nenabled = true\ncgroup = {:?}\n",
                    orch_config(&self.lab.lb_interfaces(), &self.o.attach),
                    cgroup.dir()
                );
                let orch = self
                    .lab
                    .start_orch_with(&self.bin, &config, &["--detach-on-exit"])
                    .context("starting orch")?;
                // This process and its children (wrk) connect from inside the cgroup.
                cgroup.enter()?;
                Setup::Local {
                    _daemon: Box::new(orch),
                    _member: CgroupMember(cgroup),
                }
            }
            Route::Orch => {
                let orch = self
                    .lab
                    .start_orch_with(
                        &self.bin,
                        &orch_config(&self.lab.lb_interfaces(), &self.o.attach),
                        &["--detach-on-exit"],
                    )
                    .context("starting orch")?;
                Setup::Orch {
                    _daemon: Box::new(orch),
                }
            }
            Route::Nftables => {
                let rules = self.dir.join("dnat.nft");
                std::fs::write(&rules, nft_rules(self.o.local))?;
                self.lab
                    .lb
                    .exec("nft", &["-f", &rules.to_string_lossy()])
                    .context("loading the DNAT rules")?;
                if self.o.local {
                    // A local socket needs a route to the VIP before the output hook can
                    // translate its packets (they are routed again after the DNAT).
                    self.lab
                        .lb
                        .ip(&["route", "replace", &format!("{VIP4}/32"), "dev", "br0"])?;
                }
                Setup::Nft {
                    _table: NftTable { lab: self.lab },
                }
            }
            Route::Haproxy | Route::Nginx => {
                let vip = LocalVip::add(self.lab)?;
                let mut proxy = if route == Route::Haproxy {
                    let conf = self.dir.join("haproxy.cfg");
                    std::fs::write(&conf, haproxy_config(&self.dir))?;
                    Child::spawn(
                        &self.lab.lb,
                        "haproxy",
                        &["-db", "-f", &conf.to_string_lossy()],
                        &self.dir.join("haproxy.log"),
                    )?
                } else {
                    let conf = self.dir.join("nginx-stream.conf");
                    std::fs::write(&conf, nginx_stream_config(&self.dir))?;
                    nginx(&self.lab.lb, &self.dir, &conf, "nginx-stream")?
                };
                // Give it a moment to bind before the spread check's first connection.
                thread::sleep(Duration::from_millis(300));
                proxy.check_alive()?;
                Setup::Proxy {
                    _proxy: proxy,
                    _vip: vip,
                }
            }
        })
    }

    /// Before measuring a route: 30 requests through it must all succeed and reach every
    /// backend (a misconfigured path would otherwise be measured as a fast one).
    fn check_spread(&self, route: Route) -> anyhow::Result<()> {
        let targets = self.targets(route);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let targets = targets.clone();
            let seen = self
                .client()
                .run(move || -> std::io::Result<BTreeSet<String>> {
                    let mut seen = BTreeSet::new();
                    for i in 0..30 {
                        seen.insert(lab::http_get(targets[i % targets.len()])?);
                    }
                    Ok(seen)
                })?;
            match seen {
                Ok(seen) if seen.len() == BACKENDS => return Ok(()),
                Ok(seen) if Instant::now() > deadline => {
                    bail!("{}: 30 requests reached only {seen:?}", route.name())
                }
                Err(e) if Instant::now() > deadline => bail!("{}: {e}", route.name()),
                _ => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn targets(&self, route: Route) -> Vec<SocketAddr> {
        match route {
            Route::Direct => (1..=BACKENDS)
                .map(|i| SocketAddr::from((lab::backend4(i), PORT)))
                .collect(),
            _ => vec![SocketAddr::from((VIP4, PORT))],
        }
    }

    /// One run of the load generator from the client namespace.
    fn load(&self, route: Route, conn: Conn, seconds: u64) -> anyhow::Result<Wrk> {
        match self.o.generator {
            Generator::Wrk => self.wrk(route, conn, seconds),
            Generator::Spread => self.spread(route, conn, seconds),
        }
    }

    /// One wrk run from the client namespace.
    fn wrk(&self, route: Route, conn: Conn, seconds: u64) -> anyhow::Result<Wrk> {
        let script = self.dir.join("bench.lua");
        let targets = self.targets(route);
        std::fs::write(&script, wrk_script(&targets, conn))?;
        let out = Command::new("ip")
            .args(["netns", "exec", self.client().name(), "wrk"])
            .args(["-t", &BACKENDS.to_string()])
            .args(["-c", &self.o.connections.to_string()])
            .args(["-d", &format!("{seconds}s"), "--timeout", "2s"])
            .arg("-s")
            .arg(&script)
            // wrk first checks that the URL's address answers: the first target.
            .arg(format!("http://{}/", targets[0]))
            .output()
            .context("running wrk")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("ORCHBENCH "))
            .with_context(|| {
                format!(
                    "wrk printed no result ({}): {stdout}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        let r: Wrk = serde_json::from_str(line).with_context(|| format!("parsing {line:?}"))?;
        ensure!(
            r.requests > 0,
            "{}: wrk completed no request: {stdout}",
            route.name()
        );
        Ok(r)
    }

    /// One run of [`load`] from the client namespace (and, for orch's local route, the
    /// cgroup this process joined), with wrk's threads, connections and timeout.
    fn spread(&self, route: Route, conn: Conn, seconds: u64) -> anyhow::Result<Wrk> {
        let spec = load::Spec {
            targets: self.targets(route),
            threads: BACKENDS,
            connections: self.o.connections,
            duration: Duration::from_secs(seconds),
            keep_alive: conn == Conn::KeepAlive,
            timeout: Duration::from_secs(2),
        };
        let out = self.client().run(move || load::run(&spec))??;
        ensure!(
            out.requests > 0,
            "{}: the load completed no request",
            route.name()
        );
        Ok(Wrk {
            requests: out.requests,
            duration_us: out.elapsed.as_micros() as u64,
            errors: out.errors,
            p50_us: out.percentile_us(50.0),
            p95_us: out.percentile_us(95.0),
            p99_us: out.percentile_us(99.0),
        })
    }

    fn section(&self, results: &Results) -> anyhow::Result<String> {
        let direct = &results[0];
        let mut md = String::new();
        if self.o.local {
            return self.local_section(results);
        }
        writeln!(md, "## End to end (wrk through each path)\n")?;
        writeln!(md, "```sh\nsudo target/release/e2e --rounds {} --seconds {} --connections {} --attach {}\n```\n", self.o.rounds, self.o.seconds, self.o.connections, self.o.attach)?;
        writeln!(
            md,
            "wrk with {BACKENDS} threads and {} connections from the client namespace; nginx \
             (one worker) on each of {BACKENDS} backends; {} rounds of {} s per path and \
             connection mode, paths interleaved. Figures are medians over rounds; each ratio is \
             the median of the per-round ratios to `direct` (same round).\n",
            self.o.connections, self.o.rounds, self.o.seconds
        )?;
        self.path_tables(&mut md, results, "")?;

        let orch = &results[1];
        let rps = |ri: usize, ci: usize| ratio(orch[ci].as_slice(), &results[ri][ci], Wrk::rps);
        let (ka, new) = (0, 1);
        let vs_direct = |ci: usize| ratio(&orch[ci], &direct[ci], Wrk::rps);
        let p99 = |ci: usize| ratio(&orch[ci], &direct[ci], |w| w.p99_us);
        writeln!(md, "| target | measured | |\n|---|---:|---|")?;
        let mut target = |name: &str, value: f64, met: bool| {
            writeln!(md, "| {name} | {value:.3}x | {} |", verdict(met))
        };
        target(
            "orch / direct, keep-alive >= 0.97",
            vs_direct(ka),
            vs_direct(ka) >= 0.97,
        )?;
        target(
            "orch / direct, new connections >= 0.9",
            vs_direct(new),
            vs_direct(new) >= 0.9,
        )?;
        target(
            "orch / nftables DNAT, keep-alive > 1",
            rps(2, ka),
            rps(2, ka) > 1.0,
        )?;
        target(
            "orch / nftables DNAT, new connections > 1",
            rps(2, new),
            rps(2, new) > 1.0,
        )?;
        target(
            "orch / HAProxy, new connections >= 1.5",
            rps(3, new),
            rps(3, new) >= 1.5,
        )?;
        target(
            "orch / nginx stream, new connections >= 1.5",
            rps(4, new),
            rps(4, new) >= 1.5,
        )?;
        target(
            "orch p99 / direct p99, keep-alive <= 1.1",
            p99(ka),
            p99(ka) <= 1.1,
        )?;
        target(
            "orch p99 / direct p99, new connections <= 1.1",
            p99(new),
            p99(new) <= 1.1,
        )?;
        writeln!(md)?;

        let svg = report::charts_dir().join("e2e.svg");
        chart::draw(
            &svg,
            &Bars {
                title: "Requests per second, as a ratio to the backends directly",
                y_label: "ratio to direct (median of rounds)",
                groups: Route::ALL.iter().map(|r| r.name().to_owned()).collect(),
                series: Conn::ALL
                    .into_iter()
                    .enumerate()
                    .map(|(ci, c)| {
                        let v = (0..Route::ALL.len())
                            .map(|ri| ratio(&results[ri][ci], &direct[ci], Wrk::rps))
                            .collect();
                        (c.name().to_owned(), v)
                    })
                    .collect(),
                reference: Some((1.0, "direct".to_owned())),
            },
        )?;
        writeln!(
            md,
            "![requests per second by path](benches/charts/e2e.svg)\n"
        )?;
        Ok(md)
    }
}

impl Bench<'_> {
    /// One table per connection mode: each path's rate and latency, and their ratios to
    /// `direct` (the first path) in the same rounds.
    fn path_tables(&self, md: &mut String, results: &Results, suffix: &str) -> std::fmt::Result {
        let direct = &results[0];
        for (ci, conn) in Conn::ALL.into_iter().enumerate() {
            writeln!(md, "### {}{suffix}\n", conn.name())?;
            writeln!(md, "| path | requests/s | ratio to direct | p50 ms | p95 ms | p99 ms | p99 / direct | errors |")?;
            writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
            for (ri, route) in self.routes().iter().enumerate() {
                let runs = &results[ri][ci];
                let col = |f: fn(&Wrk) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
                writeln!(
                    md,
                    "| {} | {} | {:.2}x | {:.3} | {:.3} | {:.3} | {:.2}x | {} |",
                    route.name(),
                    thousands(col(Wrk::rps)),
                    ratio(runs, &direct[ci], Wrk::rps),
                    col(|w| w.p50_us) / 1e3,
                    col(|w| w.p95_us) / 1e3,
                    col(|w| w.p99_us) / 1e3,
                    ratio(runs, &direct[ci], |w| w.p99_us),
                    runs.iter().map(|w| w.errors).sum::<u64>()
                )?;
            }
            writeln!(md)?;
        }
        Ok(())
    }

    /// The `--local` section: a client on the load balancer host.
    fn local_section(&self, results: &Results) -> anyhow::Result<String> {
        let direct = &results[0];
        let mut md = String::new();
        let generator = match self.o.generator {
            Generator::Wrk => "wrk",
            Generator::Spread => "spread",
        };
        writeln!(
            md,
            "## Local clients (a client on the load balancer host)\n"
        )?;
        writeln!(
            md,
            "```sh\nsudo target/release/e2e --local --generator {generator} --rounds {} --seconds {} --connections {}\n```\n",
            self.o.rounds, self.o.seconds, self.o.connections
        )?;
        let how = match self.o.generator {
            Generator::Wrk => {
                "wrk, whose threads each keep one address: `direct` pins each \
                               thread to one backend"
            }
            Generator::Spread => {
                "the benchmark's own generator (`benches/src/load.rs`), \
                                  whose connections each move to the next backend when they \
                                  reconnect: `direct` spreads every thread's connections \
                                  over the backends, as a balancer does"
            }
        };
        writeln!(
            md,
            "{BACKENDS} client threads and {} connections in the load balancer's namespace, \
             as a service calling another on the same host, driven by {how}; nginx (one \
             worker) on each backend; {} rounds of {} s, paths interleaved. `orch` is \
             socket-level balancing (the client in the cgroup its `connect()` program \
             serves: no packet translated); `nftables` is the same DNAT in the output hook, \
             where kube-proxy handles local clients.\n",
            self.o.connections, self.o.rounds, self.o.seconds
        )?;
        self.path_tables(&mut md, results, ", local")?;
        let orch = &results[1];
        writeln!(md, "| target | measured | |\n|---|---:|---|")?;
        for (ci, conn) in Conn::ALL.into_iter().enumerate() {
            let d = ratio(&orch[ci], &direct[ci], Wrk::rps);
            writeln!(
                md,
                "| orch / direct, {} >= 0.98 | {d:.3}x | {} |",
                conn.name(),
                verdict(d >= 0.98)
            )?;
            let n = ratio(&orch[ci], &results[2][ci], Wrk::rps);
            writeln!(
                md,
                "| orch / nftables DNAT (output), {} > 1 | {n:.3}x | {} |",
                conn.name(),
                verdict(n > 1.0)
            )?;
        }
        writeln!(md)?;
        Ok(md)
    }
}

/// Membership of this process in the bench's cgroup, left when dropped.
struct CgroupMember<'a>(&'a Cgroup);

impl Drop for CgroupMember<'_> {
    fn drop(&mut self) {
        let _ = self.0.leave();
    }
}

impl Drop for Bench<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The median over rounds of `f(a) / f(b)`, pairing runs of the same round.
fn ratio(a: &[Wrk], b: &[Wrk], f: fn(&Wrk) -> f64) -> f64 {
    median(
        &a.iter()
            .zip(b)
            .map(|(x, y)| f(x) / f(y))
            .collect::<Vec<_>>(),
    )
}

/// What a route left in place; dropping it removes it (the fields are held for that).
enum Setup<'a> {
    Nothing,
    Orch {
        _daemon: Box<Orch>,
    },
    Nft {
        _table: NftTable<'a>,
    },
    Proxy {
        _proxy: Child,
        _vip: LocalVip<'a>,
    },
    /// Leaves the cgroup before the daemon stops (fields drop in order).
    Local {
        _member: CgroupMember<'a>,
        _daemon: Box<Orch>,
    },
}

struct NftTable<'a> {
    lab: &'a Lab,
}

impl Drop for NftTable<'_> {
    fn drop(&mut self) {
        let _ = self
            .lab
            .lb
            .exec("nft", &["delete", "table", "ip", "orch_bench"]);
        // The local case's route to the VIP, if there is one.
        let _ = self
            .lab
            .lb
            .ip(&["route", "del", &format!("{VIP4}/32"), "dev", "br0"]);
    }
}

/// The VIP as a local address of the load balancer, for the proxies to listen on.
struct LocalVip<'a> {
    lab: &'a Lab,
}

impl<'a> LocalVip<'a> {
    fn add(lab: &'a Lab) -> anyhow::Result<LocalVip<'a>> {
        lab.lb
            .ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
        Ok(LocalVip { lab })
    }
}

impl Drop for LocalVip<'_> {
    fn drop(&mut self) {
        let _ = self
            .lab
            .lb
            .ip(&["addr", "del", &format!("{VIP4}/32"), "dev", "lo"]);
    }
}

/// The client's source address while it measures route `ri`.
fn client_addr(ri: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + ri as u8)
}

fn backends() -> impl Iterator<Item = Ipv4Addr> {
    (1..=BACKENDS).map(lab::backend4)
}

fn orch_config(interfaces: &[String], attach: &str) -> String {
    let list: Vec<String> = backends()
        .map(|b| format!("  {{ address = \"{b}:{PORT}\" }},"))
        .collect();
    let ifaces: Vec<String> = interfaces.iter().map(|i| format!("\"{i}\"")).collect();
    format!(
        "[dataplane]\ninterfaces = [{}]\nattach = \"{}\"\n\n[[service]]\nname = \"web\"\nvip = \"{VIP4}\"\nport = {PORT}\nprotocol = \"tcp\"\nbackend = [\n{}\n]\n",
        ifaces.join(", "),
        attach,
        list.join("\n")
    )
}

/// DNAT the way kube-proxy programs a ClusterIP: match the VIP in prerouting (for a local
/// client: in output), jump to the service chain, pick an endpoint at random, DNAT to it;
/// conntrack translates the rest.
fn nft_rules(local: bool) -> String {
    let mut s = String::from("table ip orch_bench {\n");
    for (i, b) in backends().enumerate() {
        writeln!(
            s,
            "  chain endpoint-{} {{\n    meta l4proto tcp dnat to {b}:{PORT}\n  }}",
            i + 1
        )
        .unwrap();
    }
    let map: Vec<String> = (0..BACKENDS)
        .map(|i| format!("{i} : jump endpoint-{}", i + 1))
        .collect();
    writeln!(
        s,
        "  chain service-web {{\n    numgen random mod {BACKENDS} vmap {{ {} }}\n  }}",
        map.join(", ")
    )
    .unwrap();
    let hook = if local { "output" } else { "prerouting" };
    writeln!(
        s,
        "  chain {hook} {{\n    type nat hook {hook} priority -100; policy accept;\n    ip daddr {VIP4} tcp dport {PORT} jump service-web\n  }}\n}}"
    )
    .unwrap();
    s
}

fn haproxy_config(dir: &Path) -> String {
    let servers: String = backends()
        .enumerate()
        .map(|(i, b)| format!("    server backend-{} {b}:{PORT}\n", i + 1))
        .collect();
    format!(
        "global\n    maxconn 8000\n    nbthread {cores}\n    pidfile {pid}\n\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\n\
         frontend vip\n    bind {VIP4}:{PORT}\n    default_backend web\n\n\
         backend web\n    balance roundrobin\n{servers}",
        cores = cores(),
        pid = dir.join("haproxy.pid").display()
    )
}

fn nginx_stream_config(dir: &Path) -> String {
    let servers: String = backends()
        .map(|b| format!("        server {b}:{PORT};\n"))
        .collect();
    format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n{}\
         stream {{\n    upstream web {{\n{servers}    }}\n    server {{\n        listen {VIP4}:{PORT} reuseport;\n        proxy_pass web;\n    }}\n}}\n",
        nginx_main(dir, "nginx-stream", cores())
    )
}

fn nginx_main(dir: &Path, name: &str, workers: usize) -> String {
    format!(
        "daemon off;\nworker_processes {workers};\nworker_rlimit_nofile 16000;\npid {pid};\n\
         error_log {err} warn;\nevents {{ worker_connections 8000; }}\n",
        pid = dir.join(format!("{name}.pid")).display(),
        err = dir.join(format!("{name}.err")).display(),
    )
}

fn nginx(
    ns: &orch_tests::netns::Netns,
    dir: &Path,
    conf: &Path,
    name: &str,
) -> anyhow::Result<Child> {
    let err = dir.join(format!("{name}.err"));
    Child::spawn(
        ns,
        "nginx",
        &[
            "-p",
            &dir.to_string_lossy(),
            "-e",
            &err.to_string_lossy(),
            "-c",
            &conf.to_string_lossy(),
        ],
        &dir.join(format!("{name}.log")),
    )
}

fn start_nginx_backend(dir: &Path, i: usize, b: &lab::Backend) -> anyhow::Result<Child> {
    let name = format!("backend-{i}");
    let conf = dir.join(format!("{name}.conf"));
    std::fs::write(
        &conf,
        format!(
            "{}http {{\n    access_log off;\n    keepalive_requests 10000000;\n    \
             server {{\n        listen {PORT} reuseport backlog=4096;\n        \
             location / {{ return 200 \"{name}\"; }}\n    }}\n}}\n",
            nginx_main(dir, &name, 1)
        ),
    )?;
    nginx(&b.ns, dir, &conf, &name)
}

fn cores() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// The wrk script: threads spread over `targets` (one address: every thread uses it),
/// `Connection: close` for a new connection per request, and a one-line JSON result.
fn wrk_script(targets: &[SocketAddr], conn: Conn) -> String {
    let list: Vec<String> = targets.iter().map(|t| format!("\"{}\"", t.ip())).collect();
    let close = if conn == Conn::New {
        "wrk.headers[\"Connection\"] = \"close\"\n"
    } else {
        ""
    };
    format!(
        r#"-- written by orch's e2e benchmark
local targets = {{ {} }}
local next_target = 0
{close}
function setup(thread)
  next_target = next_target % #targets + 1
  thread.addr = wrk.lookup(targets[next_target], "{PORT}")[1]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'ORCHBENCH {{"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%f,"p95_us":%f,"p99_us":%f}}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"#,
        list.join(", ")
    )
}
