//! Network namespaces: created with iproute2, entered per thread with `setns`, deleted on drop.

use std::{
    fs::File,
    io,
    process::{Command, Output},
    thread,
};

use nix::sched::{setns, CloneFlags};

/// A named network namespace (`/run/netns/NAME`), deleted with everything in it when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace and brings its loopback up.
    pub fn create(name: &str) -> io::Result<Netns> {
        run("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "dev", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a program inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> io::Result<String> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        // /proc/sys/net reflects the namespace of the thread that opens it.
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_owned();
        self.run(move || std::fs::write(&path, value))?
            .map_err(|e| io::Error::new(e.kind(), format!("sysctl {key}: {e}")))
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it creates belong to the
    /// namespace for their whole life, whichever thread uses them later.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        let handle = self.spawn(f)?;
        handle
            .join()
            .map_err(|_| io::Error::other(format!("a thread in netns {} panicked", self.name)))
    }

    /// Like [`Netns::run`], without waiting.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<thread::JoinHandle<T>> {
        let file = File::open(format!("/run/netns/{}", self.name))?;
        let name = self.name.clone();
        thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || {
                // Only this thread changes namespace; the rest of the process stays put.
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("entering netns {name}: {e}"));
                f()
            })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its links (and their veth peers elsewhere).
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("warning: removing netns {}: {e}", self.name);
        }
    }
}

/// Runs `f` on a thread inside the existing namespace `name` (one this process does not own).
pub fn run_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let file = File::open(format!("/run/netns/{name}"))?;
    let owned = name.to_owned();
    thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("entering netns {owned}: {e}"));
        f()
    })
    .join()
    .map_err(|_| io::Error::other(format!("a thread in netns {name} panicked")))
}

/// Runs a command; a non-zero exit becomes an error carrying the command and its stderr.
pub fn run(program: &str, args: &[&str]) -> io::Result<String> {
    let out: Output = Command::new(program).args(args).output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("running {program} (is it installed?): {e}"),
        )
    })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes namespaces left by test processes that were killed before their cleanup ran:
/// names `{prefix}{pid}-...` whose pid is no longer alive.
pub fn sweep_stale(prefix: &str) {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}
