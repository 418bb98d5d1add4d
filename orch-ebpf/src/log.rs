//! Log lines for the operator, forwarded by the daemon into its own log (target
//! `orch::kernel`).
//!
//! Every line sits behind aya-log's `AYA_LOG_LEVEL` global, which the daemon sets at load
//! time from `[log] kernel` (`off` by default). The global lives in read-only data that is
//! frozen before the program is verified, so the verifier knows its value and removes the
//! disabled branches: a level that is off costs nothing per packet. The levels follow how
//! often a line can fire: rare events at info and above, per-packet lines at trace.

use aya_ebpf::EbpfContext;
use aya_log_ebpf::{debug, error, info, trace, warn};
use orch_common::Reason;

/// Logs what the program did with a packet, when that is worth a line at the chosen level.
#[inline(always)]
pub fn verdict(ctx: &impl EbpfContext, reason: Reason) {
    match reason {
        Reason::DropRefused => info!(
            ctx,
            "a backend refused a new connection (RST to SYN): ejected from selection, RST dropped, the client's retry is balanced again"
        ),
        Reason::DropConntrackFull => warn!(
            ctx,
            "the connection table refused an insert: new connection dropped"
        ),
        Reason::DropInternal => error!(
            ctx,
            "inconsistent slot table or backend entry: packet dropped"
        ),
        Reason::DropNoBackend => debug!(
            ctx,
            "new connection to a service with no backend in rotation: dropped"
        ),
        Reason::DropTcpNoFlow => debug!(
            ctx,
            "TCP segment without SYN matches no connection: dropped"
        ),
        Reason::DropReplyInterface => warn!(
            ctx,
            "packet from a backend's address on an interface the backend is not routed through: dropped"
        ),
        Reason::DropReplyCollision => warn!(
            ctx,
            "new connection's translated 4-tuple is in use by another service's connection: dropped"
        ),
        Reason::PassTruncated | Reason::PassMalformed => {
            debug!(ctx, "malformed or truncated header: passed to the stack")
        }
        Reason::FwdRedirect | Reason::FwdStack => {
            trace!(ctx, "client packet translated to its backend")
        }
        Reason::ReplyRedirect | Reason::ReplyStack => {
            trace!(ctx, "backend reply translated back to the VIP")
        }
        _ => {}
    }
}
