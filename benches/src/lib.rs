//! orch's benchmarks live in this crate (the benchmark issue): per-packet cost through
//! BPF_PROG_TEST_RUN against a floor program in the same run, end-to-end throughput and
//! latency against the peers in the test lab's namespaces, control-plane latencies and memory.
//!
//! The pieces they build on already exist: `orch::dataplane::Dataplane::bench_run` runs a
//! packet N times through the balancer or through the `orch_floor` program (one per-CPU
//! counter increment, XDP_PASS), and `orch_tests::lab` builds the namespaces.
//!
//! Implemented so far: `packet_cost` (src/bin/packet_cost.rs): nanoseconds per packet for
//! each path of the program against the floor program, alternating in the same run (figures
//! in BENCHMARKS.md); and `failover` (src/bin/failover.rs): clients open a new connection per
//! request as fast as they can while one of three backends dies for 4 s; it prints requests
//! per second and failures per second. Run it as root after a release build:
//! `cargo build --release -p orch-userspace -p orch-benches && sudo target/release/failover`.
