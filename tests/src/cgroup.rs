//! A cgroup (v2) of a test's own, for socket-level balancing: created, entered and left,
//! and removed with its mount when dropped.
//!
//! The unified hierarchy is mounted once more outside `/sys` for it: `ip netns exec` gives
//! the daemon a fresh `/sys` without the host's cgroup mounts, and the same path must work
//! there. Processes join with [`Cgroup::enter`] (this whole process) or by writing their pid
//! to [`Cgroup::procs`] (a child, e.g. `sh -c 'echo $$ > PROCS; exec CMD'`).

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::lab::NS_PREFIX;

pub struct Cgroup {
    mount: PathBuf,
    dir: PathBuf,
}

impl Cgroup {
    /// `None` when the kernel has no cgroup v2 (or this is not root).
    pub fn create(tag: &str) -> Option<Cgroup> {
        let mount =
            std::env::temp_dir().join(format!("{NS_PREFIX}{}-{tag}-cgroup2", std::process::id()));
        std::fs::create_dir_all(&mount).ok()?;
        let mounted = nix::mount::mount(
            Some("cgroup2"),
            &mount,
            Some("cgroup2"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
        if mounted.is_err() {
            let _ = std::fs::remove_dir(&mount);
            return None;
        }
        let dir = mount.join(format!("{NS_PREFIX}{}-{tag}", std::process::id()));
        let made = std::fs::create_dir(&dir);
        let cgroup = Cgroup { mount, dir };
        made.ok().map(|()| cgroup)
    }

    /// The cgroup's directory (what `[socket_lb] cgroup` names).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file a process joins by writing its pid.
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Moves this whole process (every thread) into the cgroup.
    pub fn enter(&self) -> io::Result<()> {
        std::fs::write(self.procs(), std::process::id().to_string())
    }

    /// Moves this process back to the root of the hierarchy.
    pub fn leave(&self) -> io::Result<()> {
        std::fs::write(
            self.mount.join("cgroup.procs"),
            std::process::id().to_string(),
        )
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = self.leave();
        // Its processes have exited; an empty cgroup is removed with rmdir.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = nix::mount::umount2(&self.mount, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.mount);
    }
}
