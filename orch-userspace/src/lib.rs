//! The orch daemon and CLI, as a library (the `orch` binary is a thin `main.rs` over it).
//!
//! Layout, one module per concern, each using only those listed after it:
//! - [`daemon`]: the event loop that wires the rest together (changes, reloads, probe
//!   reports, ticks, signals) and the readers served off it;
//! - [`cli`]: the command line (clap) and how its results are printed;
//! - [`config`]: the TOML file, validated with positions, as a plain [`config::Config`];
//! - [`dns`]: service discovery by name: an authoritative DNS server for one domain;
//! - [`explain`]: `orch explain`: where a flow goes and why, by the program's own rules;
//! - [`metrics`]: Prometheus metrics: daemon events, the snapshot rendered at scrape, the
//!   `/metrics` listener;
//! - [`reconcile`]: the only writer of the service maps: diffs desired against installed
//!   state and writes the minimum, with atomic flips; ids; weighted round-robin;
//! - [`health`]: probes, the verdicts drawn from them and from the data plane's signals,
//!   the learning circuit breaker;
//! - [`cluster`]: the registry shared by several hosts through etcd: list, watch, writes
//!   by compare-and-set, this host's lease;
//! - [`registry`]: services registered through the API, in SQLite with an in-memory index
//!   (in a cluster, the mirror of its services);
//! - [`api`]: the admin API: wire types, server, client;
//! - [`dataplane`]: the only module that talks to aya: load, attach, map access, a
//!   read-only [`dataplane::Reader`] for other threads, test runs, link and VIP-route
//!   watching;
//! - [`model`]: the desired state in plain types, and the rules it must follow.
//!
//! Kernel/user shared types live in the `orch-common` crate.

pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod dns;
pub mod explain;
pub mod health;
pub mod metrics;
pub mod model;
pub mod reconcile;
pub mod registry;

/// An error and its causes, `: `-separated: how logs and the CLI print errors. (Error types
/// here name their own context and leave the cause to `source()`, so that nothing is said
/// twice.)
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
