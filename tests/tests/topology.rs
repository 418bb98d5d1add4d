//! The topology matrix: the same checks on the networks users have, with every device as
//! the kernel makes it (TX checksum offload on, GRO off on veths; nothing prepared for
//! orch), `attach = "auto"`, IPv4 and IPv6:
//! - routed veths, one per backend;
//! - backends as ports of a Linux bridge that holds their gateways (Docker's default
//!   network);
//! - a client whose path narrows to 1,280 bytes at a router beyond the load balancer
//!   (path-MTU discovery through the VIP).
//!
//! A client side behind a VLAN sub-interface is built by `Topology::VlanClient` and checked
//! here where the kernel has 802.1Q (`CONFIG_VLAN_8021Q`); the CI kernel does not, and the
//! case then says so and checks nothing.
//!
//! In each: connections spread round-robin over the three backends; 10 MB downloads and
//! uploads through the VIP arrive byte for byte; UDP answers of 4,000 bytes (IP fragments)
//! arrive byte for byte; the kernel's counters agree with what the
//! client saw (translated both ways, nothing dropped); `orch status` says which hook runs
//! on each interface.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use orch_tests::{
    lab::{self, Lab, Topology, BULK_PORT, HTTP_PORT, UDP_PORT, VIP4, VIP6},
    privilege::require_root,
    prom,
};

/// 10 MB each way, the figure: far beyond a window, through GSO and GRO sizes.
const BULK: u64 = 10 * 1024 * 1024;
const BULK_TIMEOUT: Duration = Duration::from_secs(30);

fn config(lab: &Lab) -> String {
    let interfaces = lab
        .lb_interfaces()
        .iter()
        .map(|i| format!("{i:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut out = format!("[dataplane]\ninterfaces = [{interfaces}]\nattach = \"auto\"\n");
    for (name, vip, port, backend_port) in [
        ("web", IpAddr::from(VIP4), 80, HTTP_PORT),
        ("bulk", IpAddr::from(VIP4), 9000, BULK_PORT),
        ("web6", IpAddr::from(VIP6), 80, HTTP_PORT),
        ("bulk6", IpAddr::from(VIP6), 9000, BULK_PORT),
    ] {
        let backends = (1..=3)
            .map(|i| {
                let addr: IpAddr = if vip.is_ipv4() {
                    lab::backend4(i).into()
                } else {
                    lab::backend6(i).into()
                };
                format!(
                    "  {{ address = \"{}\" }},",
                    SocketAddr::new(addr, backend_port)
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        out.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = {port}\nprotocol = \"tcp\"\nbackend = [\n{backends}\n]\n"
        ));
    }
    for (name, vip) in [("dns", IpAddr::from(VIP4)), ("dns6", IpAddr::from(VIP6))] {
        let backends = (1..=3)
            .map(|i| {
                let addr: IpAddr = if vip.is_ipv4() {
                    lab::backend4(i).into()
                } else {
                    lab::backend6(i).into()
                };
                format!("  {{ address = \"{}\" }},", SocketAddr::new(addr, UDP_PORT))
            })
            .collect::<Vec<_>>()
            .join("\n");
        out.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 53\nprotocol = \"udp\"\nbackend = [\n{backends}\n]\n"
        ));
    }
    out
}

fn matrix_case(topology: Topology, tag: &str) {
    let lab = Lab::with_topology(tag, 3, topology).expect("building the lab");
    let orch = lab
        .start_orch(&lab::orch_bin(), &config(&lab))
        .expect("starting orch");

    // The hook auto chose, as the daemon reports it: TC on every virtual device here.
    let status = orch.cli(&["status", "--json"]).unwrap();
    let status: serde_json::Value = serde_json::from_str(&status.stdout_text()).unwrap();
    for iface in lab.lb_interfaces() {
        let want = format!("{iface} (tc)");
        assert!(
            status["status"]["interfaces"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i == &want),
            "{topology:?}: status lists {want}: {status}"
        );
    }

    for vip in [IpAddr::from(VIP4), IpAddr::from(VIP6)] {
        let (web, bulk) = (SocketAddr::new(vip, 80), SocketAddr::new(vip, 9000));
        let (names, got, put) = lab
            .client
            .run(move || {
                let names: Vec<_> = (0..6).map(|_| lab::http_get(web)).collect();
                let got = lab::bulk_get(bulk, BULK, BULK_TIMEOUT);
                let put = lab::bulk_put(bulk, BULK, BULK_TIMEOUT);
                (names, got, put)
            })
            .unwrap();
        let names: BTreeSet<String> = names
            .into_iter()
            .map(|n| {
                n.unwrap_or_else(|e| {
                    panic!("{topology:?} {vip}: a request failed: {e}\n{}", orch.log())
                })
            })
            .collect();
        assert_eq!(
            names.len(),
            3,
            "{topology:?} {vip}: all backends used: {names:?}"
        );
        let from = got
            .unwrap_or_else(|e| panic!("{topology:?} {vip}: 10 MB download: {e}\n{}", orch.log()));
        assert!(from.starts_with("backend-"), "{from:?}");
        put.unwrap_or_else(|e| panic!("{topology:?} {vip}: 10 MB upload: {e}\n{}", orch.log()));

        // UDP answers of 4,000 bytes: they leave the backend in IP fragments.
        let dns = SocketAddr::new(vip, 53);
        let answers = lab
            .client
            .run(move || {
                let sock = lab::udp_socket(dns.ip())?;
                (0..3)
                    .map(|_| lab::udp_big(&sock, dns, 4000))
                    .collect::<std::io::Result<Vec<_>>>()
            })
            .unwrap()
            .unwrap_or_else(|e| {
                panic!(
                    "{topology:?} {vip}: a 4,000-byte UDP answer: {e}\n{}",
                    orch.log()
                )
            });
        assert_eq!(answers.len(), 3);
    }

    // The counters tell what happened: both directions translated, nothing dropped.
    let samples = prom::parse(&lab.metrics().unwrap());
    let reason = |r: &str| prom::get(&samples, "orch_xdp_packets_total", &[("reason", r)]);
    let forwarded = reason("fwd_redirect") + reason("fwd_stack");
    let replied = reason("reply_redirect") + reason("reply_stack");
    eprintln!(
        "{topology:?}: forwarded {forwarded} (redirected {}), replied {replied} (redirected {})",
        reason("fwd_redirect"),
        reason("reply_redirect")
    );
    assert!(forwarded > 0.0 && replied > 0.0, "{topology:?}");
    if topology == Topology::NarrowClientPath {
        // The router's "fragmentation needed" / "packet too big" reached the backends.
        let icmp = reason("icmp_to_backend");
        eprintln!("{topology:?}: {icmp} ICMP errors translated to backends");
        assert!(
            icmp >= 2.0,
            "one per family at least: {icmp}\n{}",
            orch.log()
        );
    }
    for r in [
        "drop_no_backend",
        "drop_conntrack_full",
        "drop_internal",
        "drop_refused",
        "drop_tcp_no_flow",
        "drop_reply_interface",
        "drop_reply_collision",
    ] {
        assert_eq!(reason(r), 0.0, "{topology:?}: {r}\n{}", orch.log());
    }
}

#[test]
fn routed_veths_with_kernel_defaults() {
    if !require_root("routed_veths_with_kernel_defaults") {
        return;
    }
    matrix_case(Topology::Routed, "mroute");
}

#[test]
fn backends_behind_a_linux_bridge() {
    if !require_root("backends_behind_a_linux_bridge") {
        return;
    }
    matrix_case(Topology::Bridge, "mbridge");
}

/// Path-MTU discovery through the VIP: the client's path narrows to 1,280 bytes at a router
/// beyond the load balancer, so the backends' full-size replies meet a "fragmentation
/// needed" (IPv4) or "packet too big" (IPv6) addressed to the VIP. orch translates it to the
/// backend that sent them, which lowers its path MTU, and the 10 MB arrive.
#[test]
fn path_mtu_discovery_through_the_vip() {
    if !require_root("path_mtu_discovery_through_the_vip") {
        return;
    }
    matrix_case(Topology::NarrowClientPath, "mpmtu");
}

#[test]
fn the_client_behind_a_vlan() {
    if !require_root("the_client_behind_a_vlan") {
        return;
    }
    if !lab::kernel_has_vlans() {
        eprintln!("skipped: this kernel cannot create VLAN devices (no 802.1Q support)");
        return;
    }
    matrix_case(Topology::VlanClient, "mvlan");
}

/// A container restart, in the routed topology: the backend's veth is deleted (orch's end
/// with it) and created again under the same name. orch forgets the dead attachment at once,
/// `orch status` says the interface is missing, and when it returns the balancer is on it
/// again and traffic reaches that backend through the VIP.
#[test]
fn an_interface_deleted_and_created_again_is_attached_again() {
    if !require_root("an_interface_deleted_and_created_again_is_attached_again") {
        return;
    }
    let lab = Lab::with_topology("relink", 3, Topology::Routed).expect("building the lab");
    let orch = lab
        .start_orch(&lab::orch_bin(), &config(&lab))
        .expect("starting orch");
    let interfaces = |orch: &lab::Orch| -> Vec<String> {
        let out = orch.cli(&["status", "--json"]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out.stdout_text()).unwrap();
        v["status"]["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_str().unwrap().to_owned())
            .collect()
    };
    assert!(interfaces(&orch).contains(&"be2 (tc)".to_owned()));

    lab.unplug_backend(2).unwrap();
    let said = lab::wait_until(Duration::from_secs(10), || {
        interfaces(&orch).contains(&"be2 (missing)".to_owned())
    });
    assert!(
        said.is_some(),
        "status: {:?}\n{}",
        interfaces(&orch),
        orch.log()
    );

    lab.replug_backend(2).unwrap();
    let back = lab::wait_until(Duration::from_secs(10), || {
        lab::balancer_attached(lab.lb.name(), "be2").unwrap_or(false)
    });
    let back = back.unwrap_or_else(|| panic!("be2 not attached again\n{}", orch.log()));
    eprintln!("be2 attached again {back:?} after it returned");
    assert!(interfaces(&orch).contains(&"be2 (tc)".to_owned()));
    // Health took backend-2 out while it was gone; its probes bring it back.
    let backend2 = SocketAddr::new(lab::backend4(2).into(), HTTP_PORT).to_string();
    let healthy = lab::wait_until(Duration::from_secs(20), || {
        orch.in_rotation("web", &backend2)
    });
    assert!(
        healthy.is_some(),
        "{backend2} not back in rotation\n{}",
        orch.log()
    );
    // backend-2 answers through the VIP again: six requests reach all three backends.
    let web = SocketAddr::new(IpAddr::from(VIP4), 80);
    let names: BTreeSet<String> = lab
        .client
        .run(move || {
            (0..6)
                .map(|_| lab::http_get(web))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("a request failed: {e}\n{}", orch.log()))
        .into_iter()
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
}
