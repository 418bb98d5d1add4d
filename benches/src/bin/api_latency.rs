//! The admin API's latency while `/metrics` is scraped without pause, with a full
//! connection table.
//!
//! ```text
//! sudo target/release/api_latency [--entries N] [--requests N]
//! ```
//! Needs root and the `orch` binary (`ORCH_BIN`, default target/release/orch). Before the
//! daemon starts, its pinned connection table is filled with `--entries` entries (two per
//! connection, every one established and live), which the daemon then adopts. Measured, in
//! one run: `status` requests and registry changes (`service add` then `service rm`) one
//! after another, first with nobody scraping (the baseline), then while a scraper fetches
//! `/metrics` back to back; and what a scrape and a `service list` take with that table
//! (both count the live connections).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Context};
use clap::builder::RangedU64ValueParser;
use orch::{
    api::{client, Reply, Request},
    dataplane::{codec::addr_words, Capacity, Dataplane},
    model::Protocol,
};
use orch_benches::{
    args, report,
    stats::{percentile, thousands},
};
use orch_common::maps::{FlowKey, FlowValue, DIR_FORWARD, DIR_REPLY};
use orch_tests::lab::{self, Lab};

/// The admin API's latency under back-to-back scrapes, with a full connection table.
#[derive(clap::Parser)]
struct Options {
    /// Connection-table entries (two per connection); the table's capacity is set to it.
    #[arg(long, default_value_t = 1 << 22, value_parser = RangedU64ValueParser::<u32>::new().range(1024..=1 << 24))]
    entries: u32,
    /// How long a scrape may take, seconds (Prometheus' default scrape timeout is 10).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    scrape_timeout: u64,
    /// Requests of each kind per phase.
    #[arg(long, default_value_t = 400, value_parser = RangedU64ValueParser::<usize>::new().range(20..=100_000))]
    requests: usize,
}

/// Latencies of one kind of request, milliseconds, and how many got no answer in time
/// (the CLI's 10 s).
struct Sample {
    name: &'static str,
    ms: Vec<f64>,
    failed: usize,
}

impl Sample {
    fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} |",
            self.name,
            self.ms.len(),
            self.failed,
            percentile(&self.ms, 50.0),
            percentile(&self.ms, 99.0),
            percentile(&self.ms, 100.0),
        )
    }

    /// Times `f`; a failure is counted, not fatal.
    fn time(&mut self, f: impl FnOnce() -> anyhow::Result<()>) {
        let t = Instant::now();
        match f() {
            Ok(()) => self.ms.push(t.elapsed().as_secs_f64() * 1e3),
            Err(e) => {
                eprintln!("{}: {e:#}", self.name);
                self.failed += 1;
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let o = <Options as clap::Parser>::parse();
    let bin = args::orch_bin()?;
    let lab = Lab::new("api", 3)?;

    eprintln!(
        "filling the connection table with {} entries",
        thousands(o.entries as f64)
    );
    let began = Instant::now();
    let capacity = Capacity {
        conntrack: o.entries,
        ..Capacity::default()
    };
    let pins = lab.pin_dir();
    let seeded = lab.lb.run(move || -> anyhow::Result<u64> {
        let mut dp = Dataplane::open(capacity, &pins, 0).context("loading the data plane")?;
        Ok(dp.seed_flows(connections(o.entries / 2).flatten())?)
    })??;
    ensure!(
        seeded == u64::from(o.entries),
        "only {seeded} entries went in"
    );
    eprintln!(
        "  {seeded} entries in {:.1} s",
        began.elapsed().as_secs_f64()
    );

    let config = lab::demo_config().replace(
        "[dataplane]",
        &format!("[dataplane]\nconntrack_capacity = {}", o.entries),
    );
    let orch = lab.start_orch(&bin, &config)?;
    let socket = orch.socket().to_owned();

    // The first scrape counts every connection: the daemon adopted the table.
    let metrics: SocketAddr = lab::METRICS_ADDR.parse().expect("valid");
    let limit = Duration::from_secs(o.scrape_timeout);
    let scrape_once = move || lab::http_request_within(metrics, "GET", "/metrics", limit);
    let began = Instant::now();
    let (code, text) = lab.lb.run(scrape_once)??;
    ensure!(code == 200, "/metrics answered {code}");
    let first_scrape = began.elapsed();
    let entries = orch_tests::prom::sum(
        &orch_tests::prom::parse(&text),
        "orch_conntrack_entries",
        &[],
    )
    .unwrap_or(0.0);
    ensure!(
        entries as u32 == o.entries,
        "the daemon counts {entries} entries, {} were seeded",
        o.entries
    );

    let baseline = measure(&socket, o.requests);
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(AtomicU64::new(0));
    let scrape_ms = Arc::new(std::sync::Mutex::new(Vec::new()));
    let scraper = {
        let (stop, scrapes, scrape_ms) = (stop.clone(), scrapes.clone(), scrape_ms.clone());
        lab.lb.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if let Ok((200, _)) = scrape_once() {
                    scrape_ms
                        .lock()
                        .unwrap()
                        .push(t.elapsed().as_secs_f64() * 1e3);
                    scrapes.fetch_add(1, Ordering::Relaxed);
                }
            }
        })?
    };
    // Let the scraper get going, so every request below meets scrapes in flight.
    while scrapes.load(Ordering::Relaxed) == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let loaded = measure(&socket, o.requests);
    let list = timed(&socket, "service list", 10, || Request::ServiceList);
    stop.store(true, Ordering::Relaxed);
    let _ = scraper.join();
    let scrape = Sample {
        name: "scrape (GET /metrics)",
        ms: scrape_ms.lock().unwrap().clone(),
        failed: 0,
    };

    let mut rows = vec![
        "| request | answered | failed | p50 ms | p99 ms | max ms |".to_owned(),
        "|---|---|---|---|---|---|".to_owned(),
    ];
    for (phase, samples) in [("no scrapes", &baseline), ("scraped back to back", &loaded)] {
        for s in samples {
            rows.push(s.row().replacen(s.name, &format!("{}, {phase}", s.name), 1));
        }
    }
    rows.push(list.row().replacen(
        list.name,
        "service list (counts live connections), scraped",
        1,
    ));
    rows.push(scrape.row());
    let p99 = |s: &[Sample], name: &str| {
        s.iter()
            .find(|x| x.name == name)
            .map_or(f64::NAN, |x| percentile(&x.ms, 99.0))
    };
    let section = format!(
        "## Admin API under scrapes, full connection table\n\n\
         ```sh\nsudo target/release/api_latency --entries {} --requests {}\n```\n\n\
         The daemon adopts a connection table of {} entries ({} live \
         connections), then answers `status` and registry changes one after another, \
         without scrapes and while a scraper fetches `/metrics` back to back ({} scrapes). \
         The first scrape after start took {:.0} ms.\n\n{}\n\n\
         p99 with scrapes / without: status {:.2}x, change {:.2}x.\n",
        o.entries,
        o.requests,
        thousands(o.entries as f64),
        thousands(f64::from(o.entries / 2)),
        scrapes.load(Ordering::Relaxed),
        first_scrape.as_secs_f64() * 1e3,
        rows.join("\n"),
        p99(&loaded, "status") / p99(&baseline, "status"),
        p99(&loaded, "service add + rm") / p99(&baseline, "service add + rm"),
    );
    report::save_section("api_latency", &section)
}

/// `n` established TCP connections from 198.18.0.0/16 clients to the demo's VIP, spread
/// over its three backends (ids 0-2, as the daemon gives them): each as its forward and
/// reply entries.
fn connections(n: u32) -> impl Iterator<Item = [(FlowKey, FlowValue); 2]> {
    let vip = addr_words(IpAddr::V4(lab::VIP4));
    let now = orch::dataplane::monotonic_ns();
    (0..n).map(move |i| {
        // 60,000 ports per client address, 198.18.128.0 up: every connection its own.
        let host = i / 60_000;
        let client = Ipv4Addr::new(198, 18, 128 + (host >> 8) as u8, host as u8);
        let port = 1024 + (i % 60_000) as u16;
        let backend = i % 3;
        let backend_addr = addr_words(IpAddr::V4(lab::backend4(backend as usize + 1)));
        let forward = FlowKey {
            src: addr_words(IpAddr::V4(client)),
            dst: vip,
            src_port_be: port.to_be(),
            dst_port_be: 80u16.to_be(),
            proto: Protocol::Tcp.number(),
            dir: DIR_FORWARD,
            _pad: 0,
        };
        let value = |nat_addr, nat_port: u16| FlowValue {
            nat_addr,
            nat_port_be: nat_port.to_be(),
            backend_id: backend,
            synack: 1,
            created_ns: now,
            last_seen_ns: now,
            ..FlowValue::default()
        };
        let reply = forward.reply(backend_addr, lab::TCP_PORT.to_be());
        debug_assert_eq!(reply.dir, DIR_REPLY);
        [
            (forward, value(backend_addr, lab::TCP_PORT)),
            (reply, value(vip, 80)),
        ]
    })
}

/// `requests` each of `status` and of a registry change (`service add` + `service rm`).
fn measure(socket: &std::path::Path, requests: usize) -> Vec<Sample> {
    let status = timed(socket, "status", requests, || Request::Status);
    let mut change = Sample {
        name: "service add + rm",
        ms: Vec::new(),
        failed: 0,
    };
    for i in 0..requests / 2 {
        let name = format!("bench{i}");
        change.time(|| {
            call(
                socket,
                &Request::ServiceAdd {
                    name: name.clone(),
                    vip: IpAddr::V4(Ipv4Addr::new(198, 19, 1, 1)),
                    port: 9000,
                    protocol: Protocol::Tcp,
                    backends: Vec::new(),
                    check: None,
                    scheduler: Default::default(),
                },
            )?;
            call(socket, &Request::ServiceRm { name })?;
            Ok(())
        });
    }
    vec![status, change]
}

fn timed(
    socket: &std::path::Path,
    name: &'static str,
    n: usize,
    request: impl Fn() -> Request,
) -> Sample {
    let mut sample = Sample {
        name,
        ms: Vec::with_capacity(n),
        failed: 0,
    };
    for _ in 0..n {
        sample.time(|| call(socket, &request()).map(drop));
    }
    sample
}

fn call(socket: &std::path::Path, request: &Request) -> anyhow::Result<Reply> {
    client::call(socket, request).with_context(|| format!("{} failed", request.op()))
}
