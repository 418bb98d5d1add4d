//! `cargo xtask run`: build orch and start it, in the demo lab or on this host.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context};
use nix::sys::signal::{SigSet, Signal};
use orch_tests::lab::{self, Lab, CLIENT4, VIP4, VIP6};

use crate::{
    prereqs,
    util::{self, step},
};

pub fn run(config: Option<PathBuf>, once: bool, release: bool) -> anyhow::Result<()> {
    prereqs::ensure()?;
    let bin = step("building orch (eBPF object and daemon)", || build(release))?;
    if !util::is_root() {
        return rerun_as_root(&bin, config.as_deref(), once);
    }
    // Ctrl-C goes to the whole foreground process group: orch handles its own, and this
    // process waits for it and then cleans up, instead of dying with the lab still up.
    let signals = block_signals()?;
    match config {
        Some(config) => on_host(&bin, &config),
        None => demo(&bin, once, &signals),
    }
}

/// Builds the `orch` binary and returns its path.
pub fn build(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = util::cargo();
    cmd.args(["build", "--package", "orch-userspace", "--bin", "orch"]);
    if release {
        cmd.arg("--release");
    }
    util::run(&mut cmd)?;
    Ok(util::target_dir()
        .join(if release { "release" } else { "debug" })
        .join("orch"))
}

/// The daemon and the lab need root (BPF, namespaces): run the rest of this command under
/// sudo, with the binary already built by the user.
fn rerun_as_root(bin: &Path, config: Option<&Path>, once: bool) -> anyhow::Result<()> {
    if !util::have("sudo") {
        bail!("orch needs root (CAP_BPF, CAP_NET_ADMIN): run this command as root");
    }
    eprintln!("==> orch needs root (BPF, network namespaces): continuing with sudo");
    let mut cmd = Command::new("sudo");
    cmd.arg("--preserve-env=PATH,RUST_LOG,CARGO_HOME,RUSTUP_HOME")
        .arg(std::env::current_exe()?)
        .arg("run");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    if once {
        cmd.arg("--once");
    }
    if bin
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|d| d == "release")
    {
        cmd.arg("--release");
    }
    util::run(&mut cmd)
}

fn block_signals() -> anyhow::Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("blocking SIGINT/SIGTERM")?;
    Ok(set)
}

fn on_host(bin: &Path, config: &Path) -> anyhow::Result<()> {
    eprintln!(
        "==> starting orch with {} (Ctrl-C stops it and detaches)",
        config.display()
    );
    util::run(
        Command::new(bin)
            .arg("daemon")
            .arg("--config")
            .arg(config)
            .arg("--detach-on-exit"),
    )
}

fn demo(bin: &Path, once: bool, signals: &SigSet) -> anyhow::Result<()> {
    let config_path = lab::example_config_path();
    let config = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let lab = step("building the demo lab: a client, a load balancer and 3 backends, each in its own network namespace", || {
        Ok(Lab::new("demo", 3)?)
    })?;
    let orch = step(
        "starting orch in the load balancer's namespace with examples/demo.toml",
        || Ok(lab.start_orch_with(bin, &config, &["--detach-on-exit"])?),
    )?;
    eprintln!("    attached to {}", lab.lb_interfaces().join(", "));

    let result = traffic(&lab)
        .and_then(|()| registry_demo(&lab, &orch))
        .and_then(|()| metrics_demo(&lab));
    if let Err(e) = &result {
        eprintln!("demo traffic failed: {e:#}\norch's log:\n{}", orch.log());
    }
    result?;

    if once {
        eprintln!("\n==> done (--once): stopping orch and removing the lab");
        return Ok(());
    }
    println!(
        "\norch keeps running. Try it from the client namespace, for example:\n  \
         ip netns exec {} bash -c 'exec 3<>/dev/tcp/{VIP4}/80; echo hello >&3; head -1 <&3'\n\
         and the CLI against this daemon:\n  \
         sudo ORCH_SOCKET={} {} service list\n  \
         sudo ORCH_SOCKET={} {} explain tcp {CLIENT4}:40000 {VIP4}:80\n\
         and its metrics (the daemon listens on loopback in its namespace):\n  \
         ip netns exec {} curl -s {}/metrics\n\
         Press Ctrl-C to stop orch and remove the lab.",
        lab.client.name(),
        orch.socket().display(),
        bin.display(),
        orch.socket().display(),
        bin.display(),
        lab.lb.name(),
        lab::METRICS_ADDR,
    );
    let sig = signals.wait().context("waiting for Ctrl-C")?;
    eprintln!("\n==> {sig:?}: stopping orch and removing the lab");
    drop(orch);
    drop(lab);
    Ok(())
}

/// Shows what Prometheus would scrape: the demo's connections, counted by the kernel.
fn metrics_demo(lab: &Lab) -> anyhow::Result<()> {
    let text = lab.metrics().context("scraping /metrics")?;
    println!(
        "\n$ curl {}/metrics   # {} series in all; the connections counted per backend:",
        lab::METRICS_ADDR,
        text.lines().filter(|l| !l.starts_with('#')).count()
    );
    for line in text.lines().filter(|l| {
        l.starts_with("orch_backend_connections_total") || l.starts_with("orch_xdp_packets_total")
    }) {
        if !line.ends_with(" 0") {
            println!("{line}");
        }
    }
    Ok(())
}

/// Registers a service through the CLI while orch runs, and shows traffic following.
fn registry_demo(lab: &Lab, orch: &lab::Orch) -> anyhow::Result<()> {
    let cli = |args: &[&str]| -> anyhow::Result<String> {
        println!("\n$ orch {}", args.join(" "));
        let out = orch.cli(args)?;
        anyhow::ensure!(
            out.status.success(),
            "orch {} failed: {}",
            args.join(" "),
            out.stderr_text()
        );
        Ok(out.stdout_text())
    };
    print!(
        "{}",
        cli(&[
            "service",
            "add",
            "api",
            "198.19.0.2:80",
            "--backend",
            "198.18.1.2:8080",
            "--backend",
            "198.18.2.2:8080@2",
        ])?
    );
    let vip = SocketAddr::from(([198, 19, 0, 2], 80));
    let answers = lab.client.run(move || {
        lab::pin_current_thread(0)?;
        (1..=6)
            .map(|i| lab::tcp_ask(vip, &format!("hello {i}")))
            .collect::<std::io::Result<Vec<_>>>()
    })??;
    println!(
        "6 TCP connections to {vip} (weights 1:2): {}",
        answers.join(" ")
    );
    print!("{}", cli(&["service", "list"])?);
    Ok(())
}

/// Sends demo traffic from the client namespace and prints where each connection went.
fn traffic(lab: &Lab) -> anyhow::Result<()> {
    let show = |title: &str, answers: Vec<(String, String)>| {
        println!("\n{title}");
        let mut tally = BTreeMap::new();
        for (i, (name, note)) in answers.iter().enumerate() {
            println!("  #{:<2} -> {name}{note}", i + 1);
            *tally.entry(name.clone()).or_insert(0) += 1;
        }
        let summary: Vec<String> = tally.iter().map(|(n, c)| format!("{n}: {c}")).collect();
        println!("  spread: {}", summary.join(", "));
    };

    println!(
        "\nThe demo client runs on one CPU. orch keeps a round-robin cursor per CPU (no shared\n\
         counter to contend for), so traffic handled by several CPUs interleaves their rotations."
    );
    let vip = SocketAddr::from((VIP4, 80));
    let answers = lab.client.run(move || {
        lab::pin_current_thread(0)?;
        (1..=9)
            .map(|i| Ok((lab::tcp_ask(vip, &format!("hello {i}"))?, String::new())))
            .collect::<std::io::Result<Vec<_>>>()
    })??;
    show(
        &format!("9 TCP connections to {vip}, one request each:"),
        answers,
    );

    let dns = SocketAddr::from((VIP4, 53));
    let answers = lab.client.run(move || -> std::io::Result<Vec<_>> {
        lab::pin_current_thread(0)?;
        (1..=6)
            .map(|i| {
                let sock = lab::udp_socket(dns.ip())?;
                let (name, from) = lab::udp_ask(&sock, dns, &format!("query {i}"))?;
                Ok((name, format!(" (answer from {from})")))
            })
            .collect()
    })??;
    show(
        &format!("6 UDP queries to {dns}, each from a new socket:"),
        answers,
    );

    let vip6 = SocketAddr::from((VIP6, 80));
    let answers = lab.client.run(move || {
        lab::pin_current_thread(0)?;
        (1..=6)
            .map(|i| Ok((lab::tcp_ask(vip6, &format!("hello {i}"))?, String::new())))
            .collect::<std::io::Result<Vec<_>>>()
    })??;
    show(&format!("6 TCP connections to {vip6}:"), answers);

    // Give the reader a moment before the (optional) wait message.
    std::thread::sleep(Duration::from_millis(100));
    Ok(())
}
