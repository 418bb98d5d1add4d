//! Answers as text for people: borderless tables, as `ip` and `kubectl` print.

use std::net::SocketAddr;

use comfy_table::{presets::NOTHING, Table};

use crate::api::{BackendInfo, Reply, ServiceInfo};

/// A reply as text for people.
pub fn render(reply: &Reply) -> String {
    match reply {
        Reply::Done(text) => format!("{text}\n"),
        Reply::Explain(e) => crate::explain::render(e),
        Reply::Status(s) => {
            let mut out = format!(
                "orch {} (pid {}), up {}s, API v{}\n\
                 config:      {}\n\
                 registry:    {}\n\
                 pins:        {}{}\n\
                 interfaces:  {}\n\
                 services:    {} ({} backends)\n\
                 reloads:     {} ok, {} rejected\n\
                 probes:      {} sent\n",
                s.version,
                s.pid,
                s.uptime_secs,
                s.api,
                s.config.display(),
                s.registry.display(),
                s.pin_dir.display(),
                if s.adopted {
                    " (took over a running data plane)"
                } else {
                    ""
                },
                s.interfaces.join(", "),
                s.services,
                s.backends,
                s.config_reloads,
                s.config_reload_failures,
                s.probes_total,
            );
            if !s.services_in_panic.is_empty() {
                out.push_str(&format!(
                    "panic:       {} (too few healthy backends: balancing over all)\n",
                    s.services_in_panic.join(", ")
                ));
            }
            if let Some(c) = &s.cluster {
                out.push_str(&format!(
                    "cluster:     {} for {}s, node {}, revision {}, {} nodes ({} under {})\n",
                    c.state,
                    c.for_secs,
                    c.node,
                    c.revision,
                    c.nodes,
                    c.endpoints.join(","),
                    c.prefix,
                ));
                if let Some(e) = &c.error {
                    out.push_str(&format!(
                        "             {e}: serving the last known state, refusing changes\n"
                    ));
                }
            }
            if let Some(e) = &s.last_reload_error {
                out.push_str(&format!("last reload rejected:\n{e}\n"));
            }
            out
        }
        Reply::Nodes(list) => {
            let mut t = table(&["NODE", "ADDRESS", "VERSION", "UP", "LAST SEEN"]);
            let now = crate::cluster::unix_now();
            for n in list {
                t.add_row(vec![
                    if n.this_host {
                        format!("{} (this host)", n.name)
                    } else {
                        n.name.clone()
                    },
                    n.address.map_or_else(|| "-".to_owned(), |a| a.to_string()),
                    n.version.clone(),
                    format!("{}s", now.saturating_sub(n.started)),
                    format!("{}s ago", n.seen_secs_ago),
                ]);
            }
            format!("{t}\n")
        }
        Reply::Services(list) => {
            let mut t = table(&[
                "NAME", "ADDRESS", "PROTO", "SOURCE", "BACKENDS", "ACTIVE", "CONNS",
            ]);
            for s in list {
                let active = s.backends.iter().filter(|b| b.in_rotation).count();
                t.add_row(vec![
                    s.name.clone(),
                    SocketAddr::new(s.vip, s.port).to_string(),
                    s.protocol.to_string(),
                    source(s),
                    s.backends.len().to_string(),
                    active.to_string(),
                    s.connections.to_string(),
                ]);
            }
            format!("{t}\n")
        }
        Reply::Service(s) => {
            let mut out = format!(
                "{} {}/{} (from {}), {}, {} connections\n",
                s.name,
                SocketAddr::new(s.vip, s.port),
                s.protocol,
                source(s),
                s.scheduler.name(),
                s.connections
            );
            if s.panic {
                out.push_str(
                    "PANIC: too few healthy backends to trust the checks; new connections go \
                     to every enabled backend ([health] panic_threshold)\n",
                );
            }
            let mut t = table(&[
                "BACKEND", "WEIGHT", "STATE", "HEALTH", "BREAKER", "ROTATION", "LIVE", "CONNS",
            ]);
            for b in &s.backends {
                t.add_row(backend_cells(b));
            }
            out.push_str(&format!("{t}\n"));
            out
        }
        Reply::Backends(rows) => {
            let mut t = table(&[
                "SERVICE", "BACKEND", "WEIGHT", "STATE", "HEALTH", "BREAKER", "ROTATION", "LIVE",
                "CONNS",
            ]);
            for r in rows {
                let mut cells = vec![r.service.clone()];
                cells.extend(backend_cells(&r.backend));
                t.add_row(cells);
            }
            format!("{t}\n")
        }
    }
}

fn source(s: &ServiceInfo) -> String {
    match s.source {
        crate::api::Source::File => "file",
        crate::api::Source::Registry => "registry",
    }
    .to_owned()
}

fn backend_cells(b: &BackendInfo) -> Vec<String> {
    vec![
        b.address.to_string(),
        b.weight.to_string(),
        b.state.to_string(),
        b.health.name().to_owned(),
        b.breaker.name().to_owned(),
        if b.in_rotation { "yes" } else { "no" }.to_owned(),
        b.established.to_string(),
        b.connections.to_string(),
    ]
}

/// A borderless table, like `ip` and `kubectl` print.
fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING).set_header(header.to_vec());
    t
}
