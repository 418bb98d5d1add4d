//! `orch explain`'s answer as text for people.

use crate::api::{CpuChoice, ExplainPath as Path, Explanation};

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
            hashed,
            by_cpu,
        } => {
            if let Some(b) = stale {
                out.push_str(&format!(
                    "  the UDP flow to {b} has been idle past the timeout: the next datagram \
                     is balanced again\n"
                ));
            }
            if *hashed {
                if let Some(c) = by_cpu.first() {
                    out.push_str(&format!(
                        "  new connection: Maglev, slot {} of {slots} by the flow's hash (the \
                         same on every CPU, and on every orch host with these backends) -> {}{}\n",
                        c.slot,
                        c.backend,
                        skips(c)
                    ));
                    out.push_str(
                        "  a TCP segment of it that this host has no entry for goes to the \
                         slot's backend itself, without state\n",
                    );
                }
            } else {
                out.push_str(&format!(
                    "  new connection: next round-robin slot of {slots}; each CPU keeps its own \
                     cursor, so it depends on the CPU that receives the first packet:\n"
                ));
                for c in by_cpu {
                    out.push_str(&format!(
                        "    cpu {:<3} slot {:<4} -> {}{}\n",
                        c.cpu,
                        c.slot,
                        c.backend,
                        skips(c)
                    ));
                }
            }
        }
        Path::NoBackend => out
            .push_str("  no backend in rotation: new connections are dropped (drop_no_backend)\n"),
    }
    if let (Some(cgroup), Some(_)) = (&e.socket_lb, &e.service) {
        out.push_str(&format!(
            "  from a process on this host in cgroup {} (or below): balanced at connect() \
             (UDP: at each sendmsg()) by the same table and cursors, straight to the backend; \
             no packet of it is translated\n",
            cgroup.display()
        ));
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

/// `" (skips ejected A, B)"` when the choice passed over ejected backends, else nothing.
fn skips(c: &CpuChoice) -> String {
    if c.skipped.is_empty() {
        return String::new();
    }
    let skipped: Vec<String> = c.skipped.iter().map(|s| s.to_string()).collect();
    format!(" (skips ejected {})", skipped.join(", "))
}
