//! `orch backend drain --wait`: the backend's live connections, polled until none is left.

use std::{net::SocketAddr, process::ExitCode};

use super::{exit, ClientOpts};
use crate::api::{client, Reply, Request};

/// After a successful `backend drain --wait`: polls the backend's live connections, printing
/// each change, until none is left or `timeout` passes.
pub fn wait_drained(
    opts: &ClientOpts,
    service: &str,
    address: SocketAddr,
    timeout: std::time::Duration,
) -> ExitCode {
    let start = std::time::Instant::now();
    let mut last = None;
    loop {
        let request = Request::BackendList {
            service: Some(service.to_owned()),
        };
        let left = match client::call(&opts.socket, &request) {
            Ok(Reply::Backends(rows)) => rows
                .iter()
                .find(|r| r.backend.address == address)
                .map(|r| r.backend.established),
            Ok(_) => None,
            Err(e) => {
                eprintln!("error: {}", crate::chain(&e));
                return ExitCode::from(exit::FAILURE);
            }
        };
        let Some(left) = left else {
            eprintln!("error: backend {address} of service {service:?} is gone");
            return ExitCode::from(exit::FAILURE);
        };
        if last != Some(left) {
            eprintln!(
                "{address}: {left} connection{} left ({}s)",
                if left == 1 { "" } else { "s" },
                start.elapsed().as_secs()
            );
            last = Some(left);
        }
        if left == 0 {
            println!("{address} of service {service:?} is drained");
            return ExitCode::from(exit::OK);
        }
        if start.elapsed() >= timeout {
            eprintln!(
                "error: {left} connections still on {address} after {}s; it stays draining",
                timeout.as_secs()
            );
            return ExitCode::from(exit::TIMED_OUT);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}
