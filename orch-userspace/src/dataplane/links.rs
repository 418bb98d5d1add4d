//! Interfaces come and go: containers restart, their veths are deleted and created again.
//!
//! A task listens to the kernel's link notifications (rtnetlink, `RTMGRP_LINK`) and tells
//! the daemon that something changed; the daemon then compares what it attached with the
//! interfaces the kernel has now ([`crate::daemon`]'s interface sync): an interface that
//! went away is forgotten (the kernel detached it already), one that came back, under the
//! same name with a new index, is attached again. The notification only says "look":
//! the comparison is the truth, so a lost or merged notification costs nothing but a
//! delay until the next one or the periodic check.

use futures_util::StreamExt;
use rtnetlink::sys::{AsyncSocket, SocketAddr};
use tokio::sync::mpsc;
use tracing::warn;

/// `RTMGRP_LINK` (linux/rtnetlink.h): link notifications.
const RTMGRP_LINK: u32 = 1;

/// Starts the listener on the current tokio runtime: a unit arrives on the returned channel
/// after link changes (several changes may arrive as one). Without a netlink socket the
/// channel stays silent and the daemon's periodic check does the work alone.
pub fn watch() -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    match rtnetlink::new_connection() {
        Ok((mut conn, _handle, mut messages)) => {
            let bound = conn
                .socket_mut()
                .socket_mut()
                .bind(&SocketAddr::new(0, RTMGRP_LINK));
            if let Err(e) = bound {
                warn!(error = %e, "cannot listen to link changes; interfaces are checked every few seconds");
                return rx;
            }
            tokio::spawn(conn);
            tokio::spawn(async move {
                while messages.next().await.is_some() {
                    // Full: a notification is pending already, which covers this one.
                    let _ = tx.try_send(());
                }
            });
        }
        Err(e) => {
            warn!(error = %e, "no netlink socket; interfaces are checked every few seconds")
        }
    }
    rx
}
