//! Name lookups: orch's DNS server against dnsmasq serving the same names, on one host.
//!
//! ```text
//! sudo target/release/dns [--queries N] [--threads T]
//! ```
//! Needs root, the `orch` binary (`ORCH_BIN`) and dnsmasq. Both servers run in the lab's
//! load balancer namespace on loopback (orch on 127.0.0.153:53, dnsmasq on 127.0.0.154:53)
//! with the demo's names. Measured in one run, alternating the two servers: the latency of
//! `--queries` sequential `A` lookups (p50/p99), then queries per second with `--threads`
//! clients asking back to back. The baseline is dnsmasq; the seed's figure for Kubernetes'
//! cluster DNS is 127 ms per lookup.

use std::{
    net::{SocketAddr, UdpSocket},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Context};
use clap::builder::RangedU64ValueParser;
use hickory_proto::{
    op::{Message, Query},
    rr::{Name, RecordType},
    serialize::binary::BinDecodable,
};
use orch_benches::{
    args, report,
    stats::{percentile, thousands},
};
use orch_tests::lab::{self, Lab};

/// Lookup latency and rate: orch's DNS server against dnsmasq.
#[derive(clap::Parser)]
struct Options {
    /// Sequential lookups per server for the latency figures.
    #[arg(long, default_value_t = 20_000, value_parser = RangedU64ValueParser::<usize>::new().range(100..=1_000_000))]
    queries: usize,
    /// Clients asking back to back for the rate figure.
    #[arg(long, default_value_t = 4, value_parser = RangedU64ValueParser::<usize>::new().range(1..=64))]
    threads: usize,
    /// Seconds of the rate measurement per server.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    seconds: u64,
}

const ORCH_DNS: &str = "127.0.0.153:53";
const DNSMASQ: &str = "127.0.0.154:53";
/// The names asked, in turn: what the demo's services are called.
const NAMES: [&str; 2] = ["web.orch.internal.", "dns.orch.internal."];

struct Figures {
    p50_us: f64,
    p99_us: f64,
    qps: f64,
}

fn main() -> anyhow::Result<()> {
    let o = <Options as clap::Parser>::parse();
    ensure!(
        lab::have("dnsmasq"),
        "dnsmasq is not installed (apt install dnsmasq-base; cargo xtask bench does)"
    );
    let bin = args::orch_bin()?;
    let lab = Lab::new("dnsb", 3)?;
    // Rate-limited far above what this measures: the limit is not what is measured.
    let config = format!(
        "{}\n[dns]\nenabled = true\nlisten = \"{ORCH_DNS}\"\nmax_queries_per_sec = 1000000\n",
        lab::demo_config()
    );
    let _orch = lab.start_orch(&bin, &config)?;
    let hosts = lab.scratch_path("dnsmasq.hosts");
    std::fs::write(
        &hosts,
        "198.19.0.1 web.orch.internal\n198.19.0.1 dns.orch.internal\n",
    )?;
    let _dnsmasq = Dnsmasq::start(lab.lb.name(), &hosts)?;
    std::thread::sleep(Duration::from_millis(300));

    let mut rows = Vec::new();
    for (name, addr) in [("orch", ORCH_DNS), ("dnsmasq", DNSMASQ)] {
        let (queries, threads, seconds) = (o.queries, o.threads, o.seconds);
        let f = lab
            .lb
            .run(move || measure(addr, queries, threads, seconds))??;
        rows.push((name, f));
    }
    let dnsmasq = &rows[1].1;
    let mut table = vec![
        "| server | p50 µs | p99 µs | queries/s | p99 vs dnsmasq | queries/s vs dnsmasq |"
            .to_owned(),
        "|---|---:|---:|---:|---:|---:|".to_owned(),
    ];
    for (name, f) in &rows {
        table.push(format!(
            "| {name} | {:.0} | {:.0} | {} | {:.2}x | {:.2}x |",
            f.p50_us,
            f.p99_us,
            thousands(f.qps),
            f.p99_us / dnsmasq.p99_us,
            f.qps / dnsmasq.qps
        ));
    }
    let orch = &rows[0].1;
    let section = format!(
        "## Name lookups (DNS)\n\n```sh\nsudo target/release/dns --queries {} --threads {} --seconds {}\n```\n\n\
         orch's DNS server and dnsmasq answer the demo's names on loopback in the same \
         namespace; {} sequential `A` lookups each for the latency, then {} clients asking \
         back to back for {} s for the rate.\n\n{}\n\n\
         p99 {:.3} ms (target: under 1 ms; Kubernetes' cluster DNS in the seed: 127 ms per \
         lookup, {:.0}x longer).\n",
        o.queries,
        o.threads,
        o.seconds,
        thousands(o.queries as f64),
        o.threads,
        o.seconds,
        table.join("\n"),
        orch.p99_us / 1e3,
        127e3 / orch.p99_us,
    );
    report::save_section("dns", &section)
}

/// Latency of `queries` sequential lookups, then the rate of `threads` clients.
fn measure(server: &str, queries: usize, threads: usize, seconds: u64) -> anyhow::Result<Figures> {
    let server: SocketAddr = server.parse()?;
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.connect(server)?;
    let messages: Vec<Vec<u8>> = NAMES
        .iter()
        .map(|n| query(n))
        .collect::<anyhow::Result<_>>()?;
    let mut buf = [0u8; 512];
    // Warm up (and check the answers are real).
    for m in &messages {
        s.send(m)?;
        let n = s.recv(&mut buf).context("no answer")?;
        let answer = Message::from_bytes(&buf[..n])?;
        ensure!(answer.answers().len() == 1, "{server}: {answer:?}");
    }
    let mut us = Vec::with_capacity(queries);
    for i in 0..queries {
        let t = Instant::now();
        s.send(&messages[i % messages.len()])?;
        s.recv(&mut buf)
            .with_context(|| format!("{server}: lookup {i} lost"))?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let answered = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (answered, messages) = (answered.clone(), messages.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let s = UdpSocket::bind("127.0.0.1:0")?;
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
                s.connect(server)?;
                let mut buf = [0u8; 512];
                let mut i = 0;
                while Instant::now() < until {
                    s.send(&messages[i % messages.len()])?;
                    if s.recv(&mut buf).is_ok() {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a client thread panicked")?;
    }
    Ok(Figures {
        p50_us: percentile(&us, 50.0),
        p99_us: percentile(&us, 99.0),
        qps: answered.load(Ordering::Relaxed) as f64 / seconds as f64,
    })
}

fn query(name: &str) -> anyhow::Result<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(1)
        .add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    Ok(m.to_vec()?)
}

/// dnsmasq in a namespace, stopped (and its hosts file removed) when dropped.
struct Dnsmasq(Child, std::path::PathBuf);

impl Dnsmasq {
    fn start(ns: &str, hosts: &std::path::Path) -> anyhow::Result<Dnsmasq> {
        let (ip, port) = DNSMASQ.split_once(':').expect("addr:port");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "dnsmasq", "--keep-in-foreground"])
            .arg(format!("--listen-address={ip}"))
            .arg(format!("--port={port}"))
            .args([
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--cache-size=1000",
                "--local=/orch.internal/",
                "--user=root",
                "--pid-file=",
            ])
            .arg(format!("--addn-hosts={}", hosts.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dnsmasq")?;
        Ok(Dnsmasq(child, hosts.to_owned()))
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}
