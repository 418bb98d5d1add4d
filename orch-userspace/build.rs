//! Builds the eBPF object (crate `orch-ebpf`) for the BPF target and leaves it in OUT_DIR,
//! where `dataplane` embeds it with `include_bytes_aligned!`.
//!
//! The object is built with the same toolchain as this crate (read from RUSTUP_TOOLCHAIN)
//! rather than a separate nightly: `-Z build-std=core` is enabled with RUSTC_BOOTSTRAP, and
//! bpf-linker, which must share rustc's LLVM major version, then matches by construction.
//! `cargo xtask` installs rust-src and bpf-linker when they are missing.

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=RUSTUP_TOOLCHAIN");
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".to_owned());
    // SAFETY: build scripts are single-threaded; the variable reaches the nested cargo.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let ebpf = Package {
        name: "orch-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../orch-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::Custom(&toolchain)).context(
        "building the eBPF object failed; `cargo xtask prereqs` installs rust-src and \
         bpf-linker, the usual missing pieces",
    )
}
