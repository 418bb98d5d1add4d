//! `orch explain`: where a flow is (or would be) steered, and why.
//!
//! The answer is computed from the same maps the XDP program reads, with the program's own
//! rules restated here (see `orch-ebpf/src/balance.rs`): an entry in the connection table
//! wins; otherwise the service's active slot table and this CPU's cursor pick the slot
//! (`(cursor + cpu) % len`), skipping up to [`EJECTED_RETRIES`] slots whose backend the data
//! plane ejected. Cursors are per CPU, so a new connection's backend depends on the CPU that
//! receives its first packet: the answer lists every CPU's choice. An end-to-end test checks
//! the prediction against the backend a pinned client actually reaches.

use std::net::SocketAddr;

use orch_common::maps::SlotTable;
use serde::{Deserialize, Serialize};

use crate::{api::BackendInfo, model::Protocol};

/// How many further slots the program tries past an ejected backend (`EJECTED_RETRIES` in
/// the kernel program).
pub const EJECTED_RETRIES: u32 = 3;

/// The answer to an explain request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    pub protocol: Protocol,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    /// The service at `vip`, if there is one.
    pub service: Option<String>,
    pub path: Path,
    /// The state of every backend `path` names.
    pub backends: Vec<BackendInfo>,
}

/// What the data plane does with the flow's next packet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Path {
    /// No service has this address: the packet goes to the kernel stack untouched.
    NotAService,
    /// The connection table has the flow: its packets go to `backend`, whatever the
    /// rotation says now.
    Existing {
        backend: SocketAddr,
        /// Since the entry last recorded a packet (refreshed at most once a second).
        idle_ms: u64,
        /// The client sent FIN or RST: a new SYN from this port is balanced afresh.
        client_closed: bool,
        /// The backend sent FIN or RST.
        backend_closed: bool,
    },
    /// No entry (or a UDP entry idle past the timeout): the next packet is a new connection
    /// and takes the next round-robin slot of the CPU that receives it.
    New {
        /// The backend of a stale UDP entry that will be replaced.
        stale: Option<SocketAddr>,
        /// Slots in the active table.
        slots: u32,
        by_cpu: Vec<CpuChoice>,
    },
    /// The service has no backend in rotation: new connections are dropped.
    NoBackend,
}

/// One CPU's next choice for a new connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuChoice {
    pub cpu: u32,
    /// The slot the cursor points at.
    pub slot: u32,
    /// Where the connection goes (after skipping ejected backends).
    pub backend: SocketAddr,
    /// Ejected backends skipped on the way.
    pub skipped: Vec<SocketAddr>,
}

/// A CPU's next choice as slot and backend ids, with the ejected ids skipped: the kernel's
/// rule for new connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pick {
    pub cpu: u32,
    pub slot: u32,
    pub backend_id: u32,
    pub skipped: Vec<u32>,
}

/// Each CPU's next pick from `table`, given the per-CPU `cursors` and which backend ids are
/// ejected. Empty when the table is.
pub fn next_picks(cursors: &[u64], table: &SlotTable, ejected: impl Fn(u32) -> bool) -> Vec<Pick> {
    let len = u64::from(table.len).min(table.backend_ids.len() as u64);
    if len == 0 {
        return Vec::new();
    }
    let at = |ticket: u64| table.backend_ids[(ticket % len) as usize];
    cursors
        .iter()
        .enumerate()
        .map(|(cpu, cursor)| {
            let ticket = cursor.wrapping_add(cpu as u64);
            let first = at(ticket);
            let mut pick = Pick {
                cpu: cpu as u32,
                slot: (ticket % len) as u32,
                backend_id: first,
                skipped: Vec::new(),
            };
            if ejected(first) {
                // As the program: try the next slots; if all are ejected too, the first
                // choice stands.
                let mut skipped = vec![first];
                for i in 1..=u64::from(EJECTED_RETRIES) {
                    let candidate = at(ticket.wrapping_add(i));
                    if !ejected(candidate) {
                        pick.backend_id = candidate;
                        pick.skipped = skipped;
                        return pick;
                    }
                    skipped.push(candidate);
                }
            }
            pick
        })
        .collect()
}

/// The explanation as text for people.
pub fn render(e: &Explanation) -> String {
    let mut out = format!("{} {} -> {}", e.protocol, e.client, e.vip);
    match &e.service {
        Some(s) => out.push_str(&format!(": service {s:?}\n")),
        None => out.push('\n'),
    }
    match &e.path {
        Path::NotAService => out.push_str(
            "  no service at this address: the data plane passes the packet to the kernel \
             stack untouched (counted as pass_not_service)\n",
        ),
        Path::Existing {
            backend,
            idle_ms,
            client_closed,
            backend_closed,
        } => {
            out.push_str(&format!(
                "  existing connection: the connection table sends it to {backend} \
                 (last packet {:.1} s ago)\n",
                *idle_ms as f64 / 1000.0
            ));
            if *client_closed || *backend_closed {
                out.push_str(&format!(
                    "  closing: {} sent FIN or RST{}\n",
                    match (client_closed, backend_closed) {
                        (true, true) => "both sides",
                        (true, false) => "the client",
                        _ => "the backend",
                    },
                    if *client_closed {
                        "; a new SYN from this port is balanced afresh"
                    } else {
                        ""
                    }
                ));
            }
        }
        Path::New {
            stale,
            slots,
            by_cpu,
        } => {
            if let Some(b) = stale {
                out.push_str(&format!(
                    "  the UDP flow to {b} has been idle past the timeout: the next datagram \
                     is balanced again\n"
                ));
            }
            out.push_str(&format!(
                "  new connection: next round-robin slot of {slots}; each CPU keeps its own \
                 cursor, so it depends on the CPU that receives the first packet:\n"
            ));
            for c in by_cpu {
                out.push_str(&format!(
                    "    cpu {:<3} slot {:<4} -> {}",
                    c.cpu, c.slot, c.backend
                ));
                if !c.skipped.is_empty() {
                    let skipped: Vec<String> = c.skipped.iter().map(|s| s.to_string()).collect();
                    out.push_str(&format!(" (skips ejected {})", skipped.join(", ")));
                }
                out.push('\n');
            }
        }
        Path::NoBackend => out
            .push_str("  no backend in rotation: new connections are dropped (drop_no_backend)\n"),
    }
    for b in &e.backends {
        out.push_str(&format!(
            "  backend {}: {}, {}, breaker {}, {}, {} live connection{}\n",
            b.address,
            match b.state {
                crate::model::AdminState::Active => "active",
                crate::model::AdminState::Draining => "draining",
                crate::model::AdminState::Disabled => "disabled",
            },
            b.health,
            b.breaker,
            if b.in_rotation {
                "in rotation"
            } else {
                "out of rotation"
            },
            b.established,
            if b.established == 1 { "" } else { "s" }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(ids: &[u32]) -> SlotTable {
        let mut t = SlotTable {
            len: ids.len() as u32,
            ..Default::default()
        };
        t.backend_ids[..ids.len()].copy_from_slice(ids);
        t
    }

    #[test]
    fn each_cpu_starts_at_its_cursor_plus_its_number() {
        let picks = next_picks(&[0, 0, 5], &table(&[10, 11, 12]), |_| false);
        let got: Vec<(u32, u32)> = picks.iter().map(|p| (p.slot, p.backend_id)).collect();
        assert_eq!(got, [(0, 10), (1, 11), (1, 11)]); // cpu 2: (5 + 2) % 3 = 1
    }

    #[test]
    fn ejected_backends_are_skipped_up_to_the_retry_limit() {
        let t = table(&[10, 11, 12, 13, 14]);
        let p = next_picks(&[0], &t, |id| id == 10 || id == 11);
        assert_eq!((p[0].backend_id, p[0].skipped.clone()), (12, vec![10, 11]));
        // Everything within reach ejected: the first choice stands, as in the program.
        let p = next_picks(&[0], &t, |id| id != 14);
        assert_eq!((p[0].backend_id, p[0].skipped.clone()), (10, vec![]));
    }

    #[test]
    fn an_empty_table_picks_nothing() {
        assert!(next_picks(&[0, 1], &table(&[]), |_| false).is_empty());
    }
}
