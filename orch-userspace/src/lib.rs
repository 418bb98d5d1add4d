//! The orch daemon and CLI, as a library (the `orch` binary is a thin `main.rs` over it).
//!
//! Layout, one module per concern:
//! - [`cli`]: the command line (clap);
//! - [`config`]: the TOML file: parsing, validation with positions, desired services;
//! - [`model`]: the desired state in plain types (services, backends, protocols);
//! - [`wrr`]: smooth weighted round-robin, laid out as slot tables;
//! - [`reconcile`]: the only writer of service maps: diffs desired against installed state
//!   and writes the minimum, with atomic flips;
//! - [`dataplane`]: the only module that talks to aya: load, attach, map access, counters,
//!   test runs;
//! - [`daemon`]: wires them together and handles signals.
//!
//! Kernel/user shared types live in the `orch-common` crate.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod model;
pub mod reconcile;
pub mod wrr;
