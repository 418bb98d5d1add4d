//! What the service manager is told: systemd's notification protocol (`sd_notify(3)`).
//!
//! Under a unit with `Type=notify` (or `notify-reload`), systemd passes a datagram socket in
//! `NOTIFY_SOCKET` and waits for `READY=1` before it counts the service as started: orch
//! sends it when it logs "orch is ready", after the data plane is in place and the admin
//! socket listens, so units ordered after orch find it serving. A reload is announced
//! (`RELOADING=1` with the monotonic time, then `READY=1`), and so is the shutdown. Without
//! `NOTIFY_SOCKET` (not under systemd) nothing is sent. Failures are logged, never fatal:
//! the load balancer matters more than its manager's bookkeeping.

use sd_notify::NotifyState;
use tracing::{debug, warn};

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    match sd_notify::notify(states) {
        Ok(()) => debug!(?states, "told the service manager"),
        Err(e) => warn!(error = %e, "telling the service manager failed"),
    }
}

/// The daemon serves.
pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// A reload starts (the reload ends with [`ready`]).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => warn!(error = %e, "reading the monotonic clock for the service manager failed"),
    }
}

/// The daemon is shutting down.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;

    /// A fake service manager: readiness, reload and stop arrive on `NOTIFY_SOCKET` in
    /// that order, as systemd reads them.
    #[test]
    fn the_service_manager_hears_ready_reloading_and_stopping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let manager = UnixDatagram::bind(&path).unwrap();
        manager
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        // SAFETY: this test is the only one in this binary that touches NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        let mut buf = [0u8; 256];
        let mut next = || {
            let n = manager.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        ready();
        assert_eq!(next(), "READY=1\nSTATUS=serving\n");
        reloading();
        let reload = next();
        let usec: u64 = reload
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|r| r.strip_suffix('\n'))
            .and_then(|u| u.parse().ok())
            .unwrap_or_else(|| panic!("{reload:?}"));
        assert!(usec > 0);
        stopping();
        assert_eq!(next(), "STOPPING=1\n");
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
    }
}
