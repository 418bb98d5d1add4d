//! Failover under load: one of three backends dies for 4 s while clients open a new
//! connection per request as fast as they can; counts the requests that fail.
//!
//! ```text
//! sudo target/release/failover [--threads N] [--seconds S]
//! ```
//! Needs root and the `orch` binary (`ORCH_BIN`, default target/release/orch). Traffic stays
//! in the lab's namespaces. The backend "dies" by closing its listening socket, so new
//! connections are refused (as when its process has exited) while requests already accepted
//! finish.

use clap::builder::RangedU64ValueParser;
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use orch_tests::lab::{self, Lab, VIP4};

/// Failover under load: one of three backends dies for 4 s while clients connect.
#[derive(clap::Parser)]
struct Options {
    /// Client threads, each opening a new connection per request.
    #[arg(long, default_value_t = 8, value_parser = RangedU64ValueParser::<usize>::new().range(1..=256))]
    threads: usize,
    /// Seconds of load; the backend dies a third of the way in.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(3..=600))]
    seconds: u64,
}

fn main() -> anyhow::Result<()> {
    let Options { threads, seconds } = <Options as clap::Parser>::parse();
    let bin = std::env::var_os("ORCH_BIN")
        .map(Into::into)
        .unwrap_or_else(|| std::path::PathBuf::from("target/release/orch"));
    let lab = Lab::new("failover", 3)?;
    // A new connection per request at thousands a second: give the client every ephemeral
    // port and let it reuse TIME_WAIT ones, or it measures its own port search.
    lab.client
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    lab.client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    let config = std::fs::read_to_string(lab::example_config_path())?;
    let orch = lab.start_orch(&bin, &config)?;
    thread::sleep(Duration::from_secs(2));

    let vip = SocketAddr::from((VIP4, 80));
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for i in 0..threads {
        let (stop, ok, failed, errors) = (stop.clone(), ok.clone(), failed.clone(), errors.clone());
        workers.push(lab.client.spawn(move || {
            let _ = lab::pin_current_thread(i % 2);
            while !stop.load(Ordering::Relaxed) {
                let started = t0.elapsed();
                match lab::tcp_ask(vip, "x") {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut v) = errors.lock() {
                            v.push(format!(
                                "request started at {:.3}s failed at {:.3}s: {e}",
                                started.as_secs_f64(),
                                t0.elapsed().as_secs_f64()
                            ));
                        }
                    }
                };
            }
        })?);
    }
    let start = t0;
    let kill_at = Duration::from_secs(seconds / 3);
    let revive_at = kill_at + Duration::from_secs(4);
    let (mut killed, mut revived) = (false, false);
    let mut last = (0, 0);
    while start.elapsed() < Duration::from_secs(seconds) {
        thread::sleep(Duration::from_secs(1));
        if !killed && start.elapsed() >= kill_at {
            lab.backends[1].set_up(false);
            killed = true;
            println!("{:>5.1}s  backend-2 killed", start.elapsed().as_secs_f64());
        }
        if killed && !revived && start.elapsed() >= revive_at {
            lab.backends[1].set_up(true);
            revived = true;
            println!("{:>5.1}s  backend-2 revived", start.elapsed().as_secs_f64());
        }
        let now = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
        println!(
            "{:>5.1}s  {:>6} requests/s  {:>4} failed",
            start.elapsed().as_secs_f64(),
            now.0 - last.0,
            now.1 - last.1
        );
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "total: {} requests in {elapsed:.1} s ({:.0}/s), {failed} failed",
        ok + failed,
        (ok + failed) as f64 / elapsed
    );
    if let Ok(v) = errors.lock() {
        for e in v.iter().take(20) {
            println!("  {e}");
        }
    }
    drop(orch);
    Ok(())
}
