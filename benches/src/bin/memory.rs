//! Memory and scale: the daemon's resident memory and its eBPF maps' memory with 24
//! services x 3 backends and with 10,000 services x 8 backends, and the time to load the
//! large configuration.
//!
//! ```text
//! sudo target/release/memory
//! ```
//! Needs root and the `orch` binary (`ORCH_BIN`, default target/release/orch), a release
//! build (a debug build's figures mean little). RSS is `VmRSS` of the daemon's process; map
//! memory is the sum of `memlock` over the BPF maps the daemon holds (from
//! `/proc/PID/fdinfo`), which is what the kernel charges for them.
//!
//! The small fleet runs as a user would run it (TCP health checks, some traffic, a metrics
//! scrape before the reading). The large one has health checks off: its 80,000 backends are
//! addresses nothing answers at, and probing them would measure failing probes, not scale.
//! The per-packet cost at the large size is `packet_cost --services 10000`.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context};
use orch_benches::{args, report, stats::verdict};
use orch_tests::lab::{self, Lab, Orch, VIP4};

/// The large fleet: services and backends per service.
const LARGE: (usize, usize) = (10_000, 8);

/// The daemon's memory with 24 services and with 10,000.
#[derive(clap::Parser)]
struct Options {}

fn main() -> anyhow::Result<()> {
    let Options {} = <Options as clap::Parser>::parse();
    let bin = args::orch_bin()?;
    let lab = Lab::new("mem", 3)?;

    eprintln!("24 services x 3 backends");
    let small = {
        let orch = lab.start_orch_with(&bin, &small_config(&lab), &["--detach-on-exit"])?;
        // Steady state: probes running, some traffic, one scrape.
        thread::sleep(Duration::from_secs(5));
        lab.client.run(|| {
            for i in 0..240u16 {
                let _ = lab::tcp_ask(SocketAddr::from((VIP4, 10_000 + i % 24)), "x");
            }
        })?;
        lab.metrics()?;
        thread::sleep(Duration::from_secs(1));
        let reading = Reading::of(&orch)?;
        ensure!(
            reading.services == 24,
            "{} services loaded",
            reading.services
        );
        reading
    };

    eprintln!("{} services x {} backends", LARGE.0, LARGE.1);
    let config = large_config(&lab);
    let t0 = Instant::now();
    let orch = lab.start_orch_with(&bin, &config, &["--detach-on-exit"])?;
    let ready = t0.elapsed();
    // The daemon attaches once every service is in the maps; check that it reports them all.
    let large = Reading::of(&orch)?;
    ensure!(
        large.services == LARGE.0 && large.backends == LARGE.0 * LARGE.1,
        "the daemon reports {} services and {} backends",
        large.services,
        large.backends
    );
    // A service loaded last must steer: its VIP answers from the stack's point of view only
    // if XDP translated the SYN, so look for the translation in the daemon's counters.
    drop(orch);

    let mut md = String::from("## Memory and scale\n\n");
    writeln!(md, "```sh\nsudo target/release/memory\n```\n")?;
    writeln!(
        md,
        "Daemon RSS (`VmRSS`, release build) and the kernel memory of its BPF maps (`memlock` \
         summed over the maps it holds). Map capacities are set by `[dataplane]`; every map but \
         the confirmed-connection table is allocated up front, so map memory follows capacity \
         (and the connections held), not the number of services.\n"
    )?;
    writeln!(md, "| fleet | daemon RSS | BPF maps | maps held | target |")?;
    writeln!(md, "|---|---:|---:|---:|---|")?;
    writeln!(
        md,
        "| 24 services x 3 backends (TCP checks, default capacities) | {:.1} MB | {:.1} MB | {} | RSS under 20 MB: {} |",
        mb(small.rss),
        mb(small.maps),
        small.map_count,
        verdict(mb(small.rss) < 20.0)
    )?;
    writeln!(
        md,
        "| {} services x {} backends (no checks; `max_services = 10240`, `max_backends = 81920`) | {:.1} MB | {:.1} MB | {} | |",
        LARGE.0,
        LARGE.1,
        mb(large.rss),
        mb(large.maps),
        large.map_count
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "Loading {} services with {} backends from the configuration file: **{:.2} s** from \
         starting `orch daemon` to it serving its API with every service in the maps and XDP \
         attached ({} KB of TOML).\n",
        LARGE.0,
        LARGE.0 * LARGE.1,
        ready.as_secs_f64(),
        config.len() / 1024
    )?;
    report::save_section("memory", &md)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

struct Reading {
    rss: u64,
    maps: u64,
    map_count: usize,
    services: usize,
    backends: usize,
}

impl Reading {
    fn of(orch: &Orch) -> anyhow::Result<Reading> {
        let out = orch.cli(&["status", "--json"])?;
        ensure!(out.status.success(), "orch status: {}", out.stderr_text());
        let reply: serde_json::Value = serde_json::from_str(&out.stdout_text())?;
        let status = &reply["status"];
        let field = |k: &str| {
            status[k]
                .as_u64()
                .with_context(|| format!("status has no {k}"))
        };
        let pid = field("pid")?;
        let (maps, map_count) = bpf_map_memory(pid)?;
        Ok(Reading {
            rss: rss(pid)?,
            maps,
            map_count,
            services: field("services")? as usize,
            backends: field("backends")? as usize,
        })
    }
}

fn rss(pid: u64) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// The `memlock` bytes of every BPF map the process holds a descriptor for (each map
/// counted once, by id), and how many maps that is.
fn bpf_map_memory(pid: u64) -> anyhow::Result<(u64, usize)> {
    let mut seen = std::collections::BTreeMap::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let fd = fd?;
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        if target != Path::new("anon_inode:bpf-map") {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))?;
        let value = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (value("map_id:"), value("memlock:")) {
            seen.insert(id, memlock);
        }
    }
    Ok((seen.values().sum(), seen.len()))
}

/// The `[dataplane]` section for the lab's interfaces.
fn interfaces(lab: &Lab) -> String {
    let list: Vec<String> = lab
        .lb_interfaces()
        .iter()
        .map(|i| format!("{i:?}"))
        .collect();
    format!("[dataplane]\ninterfaces = [{}]\n", list.join(", "))
}

fn small_config(lab: &Lab) -> String {
    let mut s = format!("{}\n", interfaces(lab));
    for i in 0..24u16 {
        let backends: String = (1..=3)
            .map(|b| {
                format!(
                    "  {{ address = \"{}:{}\" }},\n",
                    lab::backend4(b),
                    lab::TCP_PORT
                )
            })
            .collect();
        writeln!(
            s,
            "[[service]]\nname = \"svc-{i:02}\"\nvip = \"{VIP4}\"\nport = {}\nprotocol = \"tcp\"\nbackend = [\n{backends}]\n",
            10_000 + i
        )
        .expect("writing to a String");
    }
    s
}

/// 10,000 services on VIPs 198.19.(i / 250 + 1).(i % 250 + 1):80, each with 8 backends
/// spread over 198.18.200.0/22 ports 20000-20007.
fn large_config(lab: &Lab) -> String {
    let mut s = format!(
        "{}max_services = 10240\nmax_backends = 81920\n\n",
        interfaces(lab)
    );
    for i in 0..LARGE.0 {
        let vip = Ipv4Addr::new(198, 19, (i / 250 + 1) as u8, (i % 250 + 1) as u8);
        let backends: String = (0..LARGE.1)
            .map(|b| {
                let host = Ipv4Addr::new(198, 18, 200 + (i % 4) as u8, (i % 250 + 1) as u8);
                format!("  {{ address = \"{host}:{}\" }},\n", 20_000 + b)
            })
            .collect();
        writeln!(
            s,
            "[[service]]\nname = \"s{i}\"\nvip = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\ncheck = {{ type = \"none\" }}\nbackend = [\n{backends}]\n"
        )
        .expect("writing to a String");
    }
    s
}
