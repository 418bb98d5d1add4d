//! Where benchmark results go. Each benchmark writes its section of BENCHMARKS.md as a
//! markdown fragment in the results directory (and prints it); `bench_report` assembles the
//! fragments with a description of the machine. Charts go beside BENCHMARKS.md, in
//! `benches/charts/`, so the file can link them.

use std::path::PathBuf;

use anyhow::Context;

/// The repository root (the benchmarks are built from it).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ has a parent")
        .to_owned()
}

/// The results directory: `$ORCH_BENCH_OUT`, or `target/bench` in the repository.
pub fn results_dir() -> PathBuf {
    std::env::var_os("ORCH_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/bench"))
}

/// Where charts are written (linked from BENCHMARKS.md).
pub fn charts_dir() -> PathBuf {
    repo_root().join("benches/charts")
}

/// The order of the sections in BENCHMARKS.md, by fragment name.
pub const SECTIONS: [&str; 9] = [
    "packet_cost",
    "packet_cost_at_scale",
    "e2e",
    "e2e_local",
    "control_plane",
    "api_latency",
    "dns",
    "memory",
    "cluster",
];

/// Prints a benchmark's section and saves it as `<results>/<name>.md`.
pub fn save_section(name: &str, markdown: &str) -> anyhow::Result<()> {
    println!("\n{markdown}");
    let dir = results_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{name}.md"));
    std::fs::write(&path, markdown).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("saved {}", path.display());
    Ok(())
}

/// One line describing the machine: CPU model and count, memory, kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU")
        .to_owned();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} x {model}, {mem_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}
