//! `cargo xtask bench`: installs the peers the benchmarks compare against (wrk, nginx with
//! its stream module, HAProxy, nftables), builds in release mode, runs every benchmark and
//! writes BENCHMARKS.md (and the charts in benches/charts/).

use std::path::Path;

use anyhow::bail;

use crate::{
    prereqs,
    util::{self, step},
};

/// The peers, as (program or file that proves it is there, Debian package).
const PEERS: [(&str, &str); 6] = [
    ("wrk", "wrk"),
    ("nginx", "nginx-light"),
    (
        "/usr/lib/nginx/modules/ngx_stream_module.so",
        "libnginx-mod-stream",
    ),
    ("haproxy", "haproxy"),
    ("nft", "nftables"),
    ("dnsmasq", "dnsmasq-base"),
];

pub fn bench(quick: bool) -> anyhow::Result<()> {
    prereqs::ensure()?;
    if !util::is_root() {
        bail!("the benchmarks load BPF programs and build network namespaces: run `sudo -E cargo xtask bench`");
    }
    step(
        "peers: wrk, nginx (stream), HAProxy, nftables, dnsmasq",
        || {
            let missing: Vec<&str> = PEERS
                .iter()
                .filter(|(what, _)| {
                    if what.starts_with('/') {
                        !Path::new(what).exists()
                    } else {
                        !util::have(what)
                    }
                })
                .map(|(_, package)| *package)
                .collect();
            prereqs::apt_install(&missing)
        },
    )?;
    step("release build (orch and the benchmarks)", || {
        util::run(util::cargo().args([
            "build",
            "--release",
            "-p",
            "orch-userspace",
            "-p",
            "orch-benches",
        ]))
    })?;
    let release = util::target_dir().join("release");
    let out = util::target_dir().join("bench");
    let _ = std::fs::remove_dir_all(&out);
    let runs: [(&str, &str, &[&str], &[&str]); 9] = [
        (
            "per-packet cost (BPF_PROG_TEST_RUN)",
            "packet_cost",
            &[],
            &["--repeat", "200000", "--rounds", "3"],
        ),
        (
            "per-packet cost with 10,000 services",
            "packet_cost",
            &["--services", "10000"],
            &["--services", "10000", "--repeat", "200000", "--rounds", "3"],
        ),
        (
            "end to end: orch, direct, nftables DNAT, HAProxy, nginx stream (about 5 minutes)",
            "e2e",
            &[],
            &["--rounds", "2", "--seconds", "3"],
        ),
        (
            "local clients: socket-level balancing, direct, nftables DNAT in output (about 6 minutes)",
            "e2e",
            &["--local", "--generator", "spread", "--rounds", "9", "--seconds", "4"],
            &["--local", "--generator", "spread", "--rounds", "2", "--seconds", "3"],
        ),
        (
            "control plane: start, register, kill, probes, restart (about 3 minutes)",
            "control_plane",
            &[],
            &["--trials", "8"],
        ),
        (
            "admin API under scrapes, connection table of 4 million entries (about a minute)",
            "api_latency",
            &[],
            &["--entries", "262144", "--requests", "100"],
        ),
        (
            "name lookups: orch's DNS server against dnsmasq (about 15 s)",
            "dns",
            &[],
            &["--queries", "5000", "--seconds", "1"],
        ),
        ("memory and scale", "memory", &[], &[]),
        (
            "several hosts: propagation through etcd, memory (about 3 minutes)",
            "cluster",
            &[],
            &["--trials", "10", "--large", "500"],
        ),
    ];
    for (title, bin, args, quick_args) in runs {
        step(title, || {
            util::run(
                std::process::Command::new(release.join(bin))
                    .args(if quick { quick_args } else { args })
                    .env("ORCH_BIN", release.join("orch"))
                    .env("ORCH_BENCH_OUT", &out),
            )
        })?;
    }
    step("writing BENCHMARKS.md", || {
        util::run(
            std::process::Command::new(release.join("bench_report"))
                .arg(if quick { "--quick" } else { "--full" })
                .env("ORCH_BENCH_OUT", &out),
        )
    })
}
