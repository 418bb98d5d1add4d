//! `orch explain`: where a flow is (or would be) steered, and why.
//!
//! The answer is computed from the same maps the XDP program reads, with the program's own
//! rules restated here (see `orch-ebpf/src/balance.rs`): an entry in the connection table
//! wins; otherwise the service's active slot table and this CPU's cursor pick the slot
//! (`(cursor + cpu) % len`), or for a Maglev service the flow's hash picks it in the Maglev
//! table (`hash % len`, the same on every CPU), skipping up to [`EJECTED_RETRIES`] slots whose backend the data
//! plane ejected. Cursors are per CPU, so a new connection's backend depends on the CPU that
//! receives its first packet: the answer lists every CPU's choice. An end-to-end test checks
//! the prediction against the backend a pinned client actually reaches.

use orch_common::EJECTED_RETRIES;

mod query;
mod render;

pub use query::query;
pub use render::render;

/// A CPU's next choice as slot and backend ids, with the ejected ids skipped: the kernel's
/// rule for new connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pick {
    pub cpu: u32,
    pub slot: u32,
    pub backend_id: u32,
    pub skipped: Vec<u32>,
}

/// Each CPU's next pick from a round-robin table (`ids`, its used slots), given the per-CPU
/// `cursors` and which backend ids are ejected. Empty when the table is.
pub fn next_picks(cursors: &[u64], ids: &[u32], ejected: impl Fn(u32) -> bool) -> Vec<Pick> {
    if ids.is_empty() {
        return Vec::new();
    }
    cursors
        .iter()
        .enumerate()
        .map(|(cpu, cursor)| pick_at(cpu as u32, ids, cursor.wrapping_add(cpu as u64), &ejected))
        .collect()
}

/// Each of `cpus` CPUs' pick from a Maglev table (`ids`) for a flow of hash `hash`: the same
/// on every CPU, and on every host with the same backends.
pub fn hashed_picks(
    cpus: usize,
    ids: &[u32],
    hash: u32,
    ejected: impl Fn(u32) -> bool,
) -> Vec<Pick> {
    if ids.is_empty() {
        return Vec::new();
    }
    (0..cpus as u32)
        .map(|cpu| pick_at(cpu, ids, u64::from(hash), &ejected))
        .collect()
}

/// The program's choice for `ticket`: its slot's backend, or, when that one is ejected,
/// the next slots' up to [`EJECTED_RETRIES`]; if all are ejected too, the first choice
/// stands.
fn pick_at(cpu: u32, ids: &[u32], ticket: u64, ejected: &impl Fn(u32) -> bool) -> Pick {
    let len = ids.len() as u64;
    let at = |ticket: u64| ids[(ticket % len) as usize];
    let first = at(ticket);
    let mut pick = Pick {
        cpu,
        slot: (ticket % len) as u32,
        backend_id: first,
        skipped: Vec::new(),
    };
    if ejected(first) {
        let mut skipped = vec![first];
        for i in 1..=EJECTED_RETRIES {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(ids: &[u32]) -> Vec<u32> {
        ids.to_vec()
    }

    #[test]
    fn a_hashed_pick_is_the_same_on_every_cpu() {
        let p = hashed_picks(3, &[10, 11, 12], 7, |id| id == 11);
        let got: Vec<(u32, u32, u32)> = p.iter().map(|p| (p.cpu, p.slot, p.backend_id)).collect();
        // 7 % 3 = 1: backend 11, ejected, so the next slot's.
        assert_eq!(got, [(0, 1, 12), (1, 1, 12), (2, 1, 12)]);
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
