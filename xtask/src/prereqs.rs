//! Installs what building and running orch needs, when it is missing, printing each step
//! and how long it took. What cannot be installed automatically gets an error that says
//! exactly what to run.
//!
//! - rust-src for the active toolchain (the eBPF crate builds `core` from source);
//! - bpf-linker built against the same LLVM major version as rustc (rustc emits LLVM
//!   bitcode for the BPF target and bpf-linker generates the code, so the two must agree);
//!   building it needs LLVM's development packages from apt;
//! - iproute2 for the demo lab and the tests, nftables for the tests that lose packets on
//!   purpose, systemd-analyze and useradd for the tests of `cargo xtask install`;
//! - protoc and protobuf's own .proto files (the etcd client generates its gRPC code at
//!   build time), etcd and etcdctl for the cluster tests.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context};

use crate::util::{self, step};

/// Ensures every prerequisite, installing what is missing.
pub fn ensure() -> anyhow::Result<()> {
    let llvm = step("checking rustc's LLVM version", rustc_llvm_major)?;
    eprintln!("    rustc uses LLVM {llvm}");
    step("rust-src for the active toolchain", ensure_rust_src)?;
    step(&format!("bpf-linker for LLVM {llvm}"), || {
        ensure_bpf_linker(llvm)
    })?;
    step(
        "iproute2, nftables, systemd-analyze, useradd (demo lab and tests)",
        || {
            let mut missing = Vec::new();
            for (tool, package) in [
                ("ip", "iproute2"),
                ("nft", "nftables"),
                ("systemd-analyze", "systemd"),
                ("useradd", "passwd"),
            ] {
                if !util::have(tool) {
                    missing.push(package);
                }
            }
            apt_install(&missing)
        },
    )?;
    step(
        "protoc and protobuf's .proto files (building the etcd client), etcd (cluster tests)",
        || {
            let mut missing = Vec::new();
            if !util::have("protoc") {
                missing.push("protobuf-compiler");
            }
            if !std::path::Path::new("/usr/include/google/protobuf/descriptor.proto").exists() {
                missing.push("libprotobuf-dev");
            }
            if !util::have("etcdctl") {
                missing.push("etcd-client");
            }
            let new_etcd = !util::have("etcd");
            if new_etcd {
                missing.push("etcd-server");
            }
            apt_install(&missing)?;
            if new_etcd {
                quiet_etcd_service();
            }
            Ok(())
        },
    )?;
    Ok(())
}

/// Debian's etcd-server starts a system etcd on 127.0.0.1:2379 when installed under
/// systemd; the tests start their own members inside their namespaces, so the one we just
/// installed is stopped and disabled again rather than left running on the machine.
fn quiet_etcd_service() {
    if !util::have("systemctl") || !std::path::Path::new("/run/systemd/system").exists() {
        return;
    }
    let stopped = Command::new("systemctl")
        .args(["disable", "--now", "etcd.service"])
        .output()
        .is_ok_and(|o| o.status.success());
    if stopped {
        eprintln!("    stopped and disabled the etcd.service the package started (the tests run their own)");
    }
}

/// The LLVM major version rustc was built with (`rustc -vV`).
pub fn rustc_llvm_major() -> anyhow::Result<u32> {
    let out = util::output(Command::new("rustc").arg("-vV"))?;
    let version = out
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc -vV` printed no LLVM version")?;
    version
        .split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| format!("cannot read LLVM version {version:?}"))
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let sysroot = util::output(Command::new("rustc").args(["--print", "sysroot"]))?;
    let src = PathBuf::from(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if src.exists() {
        eprintln!("    present");
        return Ok(());
    }
    if !util::have("rustup") {
        bail!(
            "rust-src is missing and rustup is not installed: install the Rust standard library \
             sources for your toolchain (with rustup: `rustup component add rust-src`)"
        );
    }
    eprintln!("    installing: rustup component add rust-src");
    util::run(Command::new("rustup").args(["component", "add", "rust-src"]))
}

fn ensure_bpf_linker(llvm: u32) -> anyhow::Result<()> {
    if let Some(path) = util::which("bpf-linker") {
        match bpf_linker_llvm(&path) {
            Some(v) if v == llvm => {
                eprintln!("    present ({}, LLVM {v})", path.display());
                return Ok(());
            }
            Some(v) => eprintln!(
                "    {} was built for LLVM {v}; rebuilding for LLVM {llvm}",
                path.display()
            ),
            None => {
                eprintln!(
                    "    present ({}); its LLVM version is unknown, assuming it matches",
                    path.display()
                );
                return Ok(());
            }
        }
    }
    let llvm_bin = format!("/usr/lib/llvm-{llvm}/bin");
    let dev_packages = [
        format!("llvm-{llvm}-dev"),
        format!("libpolly-{llvm}-dev"),
        "libzstd-dev".to_owned(),
        "zlib1g-dev".to_owned(),
    ];
    let missing: Vec<&str> = dev_packages
        .iter()
        .map(String::as_str)
        .filter(|p| !deb_installed(p))
        .collect();
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    eprintln!("    building bpf-linker (about a minute)");
    // bpf-linker's build finds LLVM through llvm-config on PATH; without the versioned
    // directory first it looks in /usr and fails with "unable to find library -lLLVM".
    let path = std::env::var("PATH").unwrap_or_default();
    util::run(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{llvm}"))
            .env("PATH", format!("{llvm_bin}:{path}")),
    )
}

/// The LLVM major version an installed bpf-linker was built for: from cargo's install
/// record (its `llvm-N` feature), else from the libLLVM it links to.
fn bpf_linker_llvm(path: &std::path::Path) -> Option<u32> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    if let Ok(text) = std::fs::read_to_string(cargo_home.join(".crates2.json")) {
        if let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) {
            let installs = json.get("installs")?.as_object()?;
            for (key, info) in installs {
                if !key.starts_with("bpf-linker ") {
                    continue;
                }
                for f in info.get("features")?.as_array()? {
                    if let Some(v) = f.as_str().and_then(|f| f.strip_prefix("llvm-")) {
                        if let Ok(v) = v.parse() {
                            return Some(v);
                        }
                    }
                }
            }
        }
    }
    let ldd = util::output(Command::new("ldd").arg(path)).ok()?;
    ldd.split_whitespace()
        .find_map(|lib| lib.strip_prefix("libLLVM"))
        .and_then(|rest| {
            rest.trim_start_matches(['-', '.', 's', 'o'])
                .split(['.', '-'])
                .next()?
                .parse()
                .ok()
        })
}

/// Whether a Debian package is installed. Without dpkg, assume it is and let the build say
/// otherwise.
fn deb_installed(package: &str) -> bool {
    if !util::have("dpkg-query") {
        return true;
    }
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs Debian packages (as root, or through sudo); an error names the exact command.
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    if packages.is_empty() {
        eprintln!("    present");
        return Ok(());
    }
    let command = format!(
        "apt-get update && apt-get install -y {}",
        packages.join(" ")
    );
    if !util::have("apt-get") {
        bail!(
            "missing {}; this system has no apt-get: install them with your package manager",
            packages.join(", ")
        );
    }
    let sudo: &[&str] = if util::is_root() {
        &[]
    } else if util::have("sudo") {
        &["sudo"]
    } else {
        bail!("missing {}; run as root: {command}", packages.join(", "));
    };
    eprintln!("    installing {}", packages.join(" "));
    let apt = |args: &[&str]| {
        let mut full: Vec<&str> = sudo.to_vec();
        full.push("apt-get");
        full.extend_from_slice(args);
        let mut c = Command::new(full[0]);
        c.args(&full[1..]).env("DEBIAN_FRONTEND", "noninteractive");
        util::run(&mut c)
    };
    apt(&["update", "-qq"])
        .and_then(|()| {
            let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
            args.extend_from_slice(packages);
            apt(&args)
        })
        .with_context(|| format!("installing packages failed; run it yourself: {command}"))
}
