//! Empty library target: it lets `orch-userspace` list this crate as a build dependency so
//! cargo rebuilds the eBPF object when it changes. The program is the `orch` binary target.
#![no_std]
