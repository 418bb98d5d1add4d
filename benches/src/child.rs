//! Programs the benchmarks start inside a lab namespace (nginx, HAProxy, wrk), stopped
//! when dropped, also when the benchmark fails half-way.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use orch_tests::netns::Netns;

/// A long-running program in a namespace, its output in a log file. Dropping it sends
/// SIGTERM, then SIGKILL after 3 s.
pub struct Child {
    name: String,
    child: std::process::Child,
    log: PathBuf,
}

impl Child {
    /// Starts `program args` in `ns` (`ip netns exec` replaces itself with the program, so
    /// the pid is the program's), output to `log`.
    pub fn spawn(ns: &Netns, program: &str, args: &[&str], log: &Path) -> anyhow::Result<Child> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {program} in {}", ns.name()))?;
        Ok(Child {
            name: program.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    /// Fails with the program's log if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited with {status}; its output:\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        Ok(())
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // SAFETY: signalling our own child, not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_file(&self.log);
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}
