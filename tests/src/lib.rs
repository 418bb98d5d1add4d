//! The test lab shared by orch's end-to-end tests, `cargo xtask run`'s demo and the
//! benchmarks.
//!
//! - [`cgroup`]: a cgroup v2 of a test's own, for socket-level balancing;
//! - [`cluster`]: three orch hosts sharing a three-member etcd cluster, backends reachable
//!   from every host, a client that picks the host;
//! - [`netns`]: network namespaces that delete themselves, and running code inside them;
//! - [`lab`]: the topology (client, load balancer, backends), backend servers that answer
//!   with their own name, clients, and the `orch` daemon process;
//! - [`prom`]: reading the daemon's `/metrics` text;
//! - [`oldmaps`]: maps pinned in an earlier release's layout, for the upgrade tests;
//! - [`hostile`]: crafted segments from raw sockets, and the checks of the hostile-client
//!   tests;
//! - [`privilege`]: the rule for tests that need root: run under CI, skip (saying why)
//!   elsewhere.
//!
//! Addresses come from the benchmarking ranges (198.18.0.0/15, RFC 2544) and the
//! documentation prefix (2001:db8::/32, RFC 3849), and every link lives inside namespaces the
//! lab creates, so nothing touches the host's own interfaces.

pub mod cgroup;
pub mod cluster;
pub mod hostile;
pub mod lab;
pub mod netns;
pub mod oldmaps;
pub mod privilege;
pub mod prom;
