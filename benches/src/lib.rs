//! orch's benchmarks (see BENCHMARKS.md for the figures and `cargo xtask bench` to produce
//! them). Every figure is a ratio to a baseline measured in the same run, so it holds on a
//! noisy shared machine.
//!
//! Binaries (run as root after `cargo build --release -p orch-userspace -p orch-benches`):
//! - `packet_cost`: nanoseconds per packet for each path of the XDP program through
//!   BPF_PROG_TEST_RUN, against a floor program alternating in the same run;
//! - `e2e`: HTTP requests per second and latency percentiles through orch, the backends
//!   directly, nftables DNAT, HAProxy and nginx stream, with wrk in the lab's namespaces;
//! - `control_plane`: register-to-first-connection, kill-to-no-new-connections, probe rate,
//!   start-to-first-steered and a restart under load;
//! - `memory`: daemon RSS and map memory at 24 x 3 and 10,000 x 8, load time at that size;
//! - `failover`: requests that fail while a backend dies under load (a stress check);
//! - `bench_report`: assembles the sections into BENCHMARKS.md.
//!
//! The library holds what they share: child processes in namespaces ([`child`]), statistics
//! over rounds ([`stats`]), SVG charts ([`chart`]) and where results go ([`report`]).

pub mod args;
pub mod chart;
pub mod child;
pub mod load;
pub mod probe;
pub mod report;
pub mod stats;
