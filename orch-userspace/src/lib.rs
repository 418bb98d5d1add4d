//! The orch daemon and CLI, as a library (the `orch` binary is a thin `main.rs` over it).
//!
//! Layout, one module per concern:
//! - [`cli`]: the command line (clap) and how its results are printed;
//! - [`api`]: the admin API over a Unix socket: protocol types, server, client;
//! - [`config`]: the TOML file: parsing, validation with positions, desired services;
//! - [`registry`]: services registered through the API, in SQLite with an in-memory index;
//! - [`model`]: the desired state in plain types, and the rules it must follow;
//! - [`health`]: active health checks, one task per backend, adaptive intervals;
//! - [`breaker`]: the learning circuit breaker, one per backend;
//! - [`wrr`]: smooth weighted round-robin, laid out as slot tables;
//! - [`reconcile`]: the only writer of service maps: diffs desired against installed state
//!   and writes the minimum, with atomic flips;
//! - [`dataplane`]: the only module that talks to aya: load, attach, map access, counters,
//!   test runs;
//! - [`metrics`]: Prometheus metrics: daemon events, kernel counters read at scrape, the
//!   `/metrics` listener;
//! - [`explain`]: `orch explain`: where a flow goes and why, by the program's own rules;
//! - [`vips`]: unreachable routes for the VIPs, so traffic the data plane does not steer
//!   never loops;
//! - [`daemon`]: the event loop that wires them together: API requests, config reloads,
//!   signals.
//!
//! Kernel/user shared types live in the `orch-common` crate.

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
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
