//! Packet tests: the real XDP program run by the kernel on crafted packets
//! (BPF_PROG_TEST_RUN), driven by a fixture table of input packet, expected verdict, expected
//! output packet and the counter that must move.
//!
//! Expected outputs are built from scratch with etherparse (checksums computed in full), so
//! a byte-for-byte match also proves the program's incremental checksum updates.
//!
//! Each test runs in a namespace of its own: the FIB lookups the program makes then see a
//! routing table the test wrote (two veths with fixed MACs and permanent neighbours), not
//! the host's. The test thread is pinned to CPU 0 so the per-CPU round-robin cursor, and
//! with it the backend of each new flow, is deterministic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use etherparse::PacketBuilder;
use orch::{
    dataplane::{
        codec::{addr_words, words_addr},
        default_settings, Capacity, Dataplane, DataplaneError, TestRunOutput, Verdict,
    },
    model::{Backend, Protocol, Scheduler, Service, ServiceAddr},
    reconcile::{maglev, Reconciler},
};
use orch_common::{
    csum::checksum_be,
    maps::{FlowKey, FlowValue, DIR_FORWARD, DIR_REPLY, SEEN_FIN, SEEN_RST, SEEN_SYNACK},
    Reason, MAGLEV_SIZE,
};
use orch_tests::{netns::Netns, privilege::require_root};

const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
/// The load balancer's MAC towards clients (`tc0`) and towards backends (`tp0`).
const LB_CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const LB_BACKEND_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
const BACKEND2_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
const BACKEND3_MAC: [u8; 6] = [2, 0, 0, 0, 1, 3];

fn v4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse::<Ipv4Addr>().unwrap())
}
fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
}

/// What to put on the wire.
#[derive(Clone, Copy, Debug)]
enum L4 {
    Syn,
    SynAck,
    Ack,
    /// An ACK acknowledging this number.
    AckOf(u32),
    FinAck,
    Rst,
    BareRst,
    Psh,
    Fin,
    Udp,
}

/// A payload beyond the test namespace's 1,500-byte MTU.
static BIG: [u8; 1600] = [0x5a; 1600];

/// A packet description that builds into bytes with correct checksums.
#[derive(Clone, Debug)]
struct Pkt {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    ttl: u8,
    l4: L4,
    payload: &'static [u8],
}

impl Pkt {
    fn new(l4: L4, src: SocketAddr, dst: SocketAddr) -> Pkt {
        Pkt {
            src_mac: CLIENT_MAC,
            dst_mac: LB_CLIENT_MAC,
            src,
            dst,
            ttl: 64,
            l4,
            payload: b"",
        }
    }

    fn payload(mut self, p: &'static [u8]) -> Pkt {
        self.payload = p;
        self
    }

    /// The same packet with its destination translated.
    fn dnat(mut self, to: SocketAddr) -> Pkt {
        self.dst = to;
        self
    }

    /// The same packet with its source translated.
    fn snat(mut self, to: SocketAddr) -> Pkt {
        self.src = to;
        self
    }

    /// The same packet after a router forwarded it: new MACs, TTL one less.
    fn routed(mut self, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Pkt {
        self.src_mac = src_mac;
        self.dst_mac = dst_mac;
        self.ttl -= 1;
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let ip = match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), self.ttl),
            (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), self.ttl),
            _ => panic!("mixed families"),
        };
        let (sp, dp) = (self.src.port(), self.dst.port());
        let mut out = Vec::new();
        match self.l4 {
            L4::Syn => ip
                .tcp(sp, dp, 1000, 64240)
                .syn()
                .write(&mut out, self.payload),
            L4::SynAck => ip
                .tcp(sp, dp, 5000, 64240)
                .syn()
                .ack(1001)
                .write(&mut out, self.payload),
            // Acknowledging the SYN-ACK above (its sequence number 5000, plus one).
            L4::Ack => ip
                .tcp(sp, dp, 1001, 64240)
                .ack(5001)
                .write(&mut out, self.payload),
            L4::AckOf(n) => ip
                .tcp(sp, dp, 1001, 64240)
                .ack(n)
                .write(&mut out, self.payload),
            L4::FinAck => ip
                .tcp(sp, dp, 1001, 64240)
                .fin()
                .ack(5001)
                .write(&mut out, self.payload),
            // As a stack resets a SYN: acknowledging it (RFC 9293 section 3.10.7.1).
            L4::Rst => ip
                .tcp(sp, dp, 0, 0)
                .rst()
                .ack(1001)
                .write(&mut out, self.payload),
            // A reset that answers nothing of ours: no ACK.
            L4::BareRst => ip.tcp(sp, dp, 1001, 0).rst().write(&mut out, self.payload),
            L4::Psh => ip
                .tcp(sp, dp, 1001, 64240)
                .psh()
                .write(&mut out, self.payload),
            L4::Fin => ip
                .tcp(sp, dp, 1001, 64240)
                .fin()
                .write(&mut out, self.payload),
            L4::Udp => ip.udp(sp, dp).write(&mut out, self.payload),
        }
        .expect("building a packet");
        out
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Recomputes the IPv4 header checksum after a test edited the header.
fn fix_ipv4_checksum(p: &mut [u8]) {
    let ihl = (p[14] & 0x0f) as usize * 4;
    p[24] = 0;
    p[25] = 0;
    let c = checksum_be(&p[14..14 + ihl]);
    p[24..26].copy_from_slice(&c.to_be_bytes());
}

/// Edits an IPv4 packet's header and fixes its checksum.
fn edit_v4(mut p: Vec<u8>, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    f(&mut p);
    fix_ipv4_checksum(&mut p);
    p
}

/// The services every test installs.
fn services() -> Vec<Service> {
    let svc = |name: &str, vip: IpAddr, port, protocol, backends: &[(&str, u32)]| Service {
        name: name.into(),
        check: Default::default(),
        scheduler: Default::default(),
        addr: ServiceAddr {
            vip,
            port,
            protocol,
        },
        backends: backends
            .iter()
            .map(|(a, w)| Backend::new(sa(a), *w))
            .collect(),
    };
    vec![
        svc(
            "web",
            v4("198.19.0.1"),
            80,
            Protocol::Tcp,
            &[("198.18.1.2:8080", 1), ("198.18.1.3:8080", 1)],
        ),
        svc(
            "dns",
            v4("198.19.0.1"),
            53,
            Protocol::Udp,
            &[("198.18.1.2:5353", 1)],
        ),
        svc(
            "web6",
            v6("2001:db8:ff::1"),
            80,
            Protocol::Tcp,
            &[("[2001:db8:1::2]:8080", 1)],
        ),
        // Its backend's neighbour is unknown: translated, then left to the stack.
        svc(
            "unresolved",
            v4("198.19.0.2"),
            80,
            Protocol::Tcp,
            &[("198.18.2.2:8080", 1)],
        ),
        // Its only backend has weight 0: no new connections.
        svc(
            "empty",
            v4("198.19.0.3"),
            80,
            Protocol::Tcp,
            &[("198.18.1.2:8080", 0)],
        ),
        svc(
            "weighted",
            v4("198.19.0.4"),
            80,
            Protocol::Tcp,
            &[("198.18.1.2:8080", 2), ("198.18.1.3:8080", 1)],
        ),
    ]
}

/// A namespace with the routes and neighbours the fixtures expect.
fn test_netns(tag: &str) -> Netns {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    orch_tests::netns::sweep_stale(orch_tests::lab::NS_PREFIX);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ns = Netns::create(&format!(
        "{}{}-{n}{tag}",
        orch_tests::lab::NS_PREFIX,
        std::process::id()
    ))
    .expect("creating a netns");
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let cmds: Vec<Vec<String>> = [
        "link add name tc0 type veth peer name tc0p".to_owned(),
        "link add name tp0 type veth peer name tp0p".to_owned(),
        format!("link set dev tc0 address {}", mac(LB_CLIENT_MAC)),
        format!("link set dev tp0 address {}", mac(LB_BACKEND_MAC)),
        "link set dev tc0 up".to_owned(),
        "link set dev tc0p up".to_owned(),
        "link set dev tp0 up".to_owned(),
        "link set dev tp0p up".to_owned(),
        "addr add 198.18.0.1/24 dev tc0".to_owned(),
        "-6 addr add 2001:db8::1/64 dev tc0 nodad".to_owned(),
        "addr add 198.18.1.1/24 dev tp0".to_owned(),
        "addr add 198.18.2.1/24 dev tp0".to_owned(),
        "-6 addr add 2001:db8:1::1/64 dev tp0 nodad".to_owned(),
        format!(
            "neigh add 198.18.0.2 lladdr {} dev tc0 nud permanent",
            mac(CLIENT_MAC)
        ),
        format!(
            "-6 neigh add 2001:db8::2 lladdr {} dev tc0 nud permanent",
            mac(CLIENT_MAC)
        ),
        format!(
            "neigh add 198.18.1.2 lladdr {} dev tp0 nud permanent",
            mac(BACKEND2_MAC)
        ),
        format!(
            "neigh add 198.18.1.3 lladdr {} dev tp0 nud permanent",
            mac(BACKEND3_MAC)
        ),
        format!(
            "-6 neigh add 2001:db8:1::2 lladdr {} dev tp0 nud permanent",
            mac(BACKEND2_MAC)
        ),
    ]
    .iter()
    .map(|c| c.split(' ').map(str::to_owned).collect())
    .collect();
    for c in cmds {
        let args: Vec<&str> = c.iter().map(String::as_str).collect();
        ns.ip(&args)
            .unwrap_or_else(|e| panic!("setting up the test netns: {e}"));
    }
    ns.sysctl("net.ipv4.conf.all.forwarding", "1").unwrap();
    ns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
    ns
}

/// Lets the XDP program redirect to the test namespace's interfaces, as the daemon does for
/// interfaces it attaches to natively.
fn allow_redirects(dp: &mut Dataplane) {
    for iface in ["tc0", "tp0"] {
        dp.allow_xdp_redirect(iface)
            .expect("allowing a redirect target");
    }
}

/// Loads the data plane with [`services`] installed; call on the test's namespace thread.
fn loaded() -> (Dataplane, Reconciler) {
    loaded_logging(orch::dataplane::KERNEL_LOG_OFF)
}

/// [`loaded`] with the program logging up to `kernel_log`.
fn loaded_logging(kernel_log: u8) -> (Dataplane, Reconciler) {
    loaded_redirecting_to(kernel_log, &["tc0", "tp0"])
}

/// [`loaded_logging`] with XDP allowed to redirect to `ifaces` only.
fn loaded_redirecting_to(kernel_log: u8, ifaces: &[&str]) -> (Dataplane, Reconciler) {
    // The per-CPU cursor starts at the CPU's number: pin to CPU 0 for a known order.
    orch_tests::lab::pin_current_thread(0).expect("pinning to CPU 0");
    let cap = Capacity::default();
    let mut dp = Dataplane::load_logging(cap, kernel_log).expect("loading the data plane");
    for iface in ifaces {
        dp.allow_xdp_redirect(iface)
            .expect("allowing a redirect target");
    }
    let mut rec = Reconciler::new(cap.max_services, cap.max_backends);
    rec.apply(&mut dp, &services())
        .expect("installing services");
    (dp, rec)
}

fn counts(dp: &Dataplane) -> Vec<(Reason, u64)> {
    dp.reader().reason_counts().expect("reading counters")
}

fn hex(p: &[u8]) -> String {
    p.chunks(16)
        .map(|c| {
            c.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One row of the table.
struct Case {
    desc: &'static str,
    input: Vec<u8>,
    verdict: Verdict,
    /// `None`: the packet must come out unchanged.
    output: Option<Vec<u8>>,
    reason: Reason,
}

/// Runs `packet` through the program as received where its source lives: on `tp0` when it
/// comes from the backends' subnets, on `tc0` otherwise (the reverse-path check looks).
fn test_run(dp: &mut Dataplane, packet: &[u8]) -> Result<TestRunOutput, DataplaneError> {
    let ingress = if from_backend_side(packet) {
        "tp0"
    } else {
        "tc0"
    };
    test_run_on(dp, packet, ingress)
}

/// Runs `packet` as received on interface `iface` of the test's namespace.
fn test_run_on(
    dp: &mut Dataplane,
    packet: &[u8],
    iface: &str,
) -> Result<TestRunOutput, DataplaneError> {
    let ifindex = nix::net::if_::if_nametoindex(iface).expect("the test netns has its veths");
    dp.test_run_on(packet, ifindex)
}

/// Whether a frame's source address is in one of the backend subnets of [`test_netns`].
fn from_backend_side(packet: &[u8]) -> bool {
    match packet.get(12..14) {
        Some([0x08, 0x00]) => matches!(packet.get(26..29), Some([198, 18, 1 | 2])),
        Some([0x86, 0xdd]) => packet.get(22..30) == Some(&[0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0]),
        _ => false,
    }
}

fn run_case(dp: &mut Dataplane, case: &Case) {
    let before = counts(dp);
    let out =
        test_run(dp, &case.input).unwrap_or_else(|e| panic!("{}: test run failed: {e}", case.desc));
    assert_eq!(out.verdict, case.verdict, "{}: verdict", case.desc);
    let expected = case.output.as_ref().unwrap_or(&case.input);
    assert!(
        out.packet == *expected,
        "{}: output differs\n got:\n{}\nwant:\n{}",
        case.desc,
        hex(&out.packet),
        hex(expected)
    );
    let after = counts(dp);
    for ((reason, b), (_, a)) in before.iter().zip(&after) {
        let want = u64::from(*reason == case.reason);
        assert_eq!(
            a - b,
            want,
            "{}: counter {} moved by {}",
            case.desc,
            reason.name(),
            a - b
        );
    }
}

fn fixture_table() -> Vec<Case> {
    let client = sa("198.18.0.2:40000");
    let client2 = sa("198.18.0.2:40001");
    let vip = sa("198.19.0.1:80");
    let be2 = sa("198.18.1.2:8080");
    let be3 = sa("198.18.1.3:8080");
    let syn = Pkt::new(L4::Syn, client, vip);
    let data = Pkt::new(L4::Ack, client, vip).payload(b"GET / HTTP/1.0\r\n\r\n");
    let to_be = |p: &Pkt, be, mac| p.clone().dnat(be).routed(LB_BACKEND_MAC, mac).bytes();

    let client6 = sa("[2001:db8::2]:40000");
    let vip6 = sa("[2001:db8:ff::1]:80");
    let be6 = sa("[2001:db8:1::2]:8080");
    let syn6 = Pkt::new(L4::Syn, client6, vip6);

    let dns_vip = sa("198.19.0.1:53");
    let dns_be = sa("198.18.1.2:5353");
    let query = Pkt::new(L4::Udp, sa("198.18.0.2:50000"), dns_vip).payload(b"query");
    let mut query_nocsum = query.clone().bytes();
    query_nocsum[40] = 0;
    query_nocsum[41] = 0;
    let mut query_nocsum_out = query
        .clone()
        .dnat(dns_be)
        .routed(LB_BACKEND_MAC, BACKEND2_MAC)
        .bytes();
    query_nocsum_out[40] = 0;
    query_nocsum_out[41] = 0;

    // A backend's reply, as the backend sends it (to the load balancer's MAC).
    let reply = |l4, from: SocketAddr, to: SocketAddr| {
        let mut p = Pkt::new(l4, from, to);
        p.src_mac = BACKEND2_MAC;
        p.dst_mac = LB_BACKEND_MAC;
        p
    };
    let synack = reply(L4::Ack, be2, client).payload(b"HTTP/1.0 200 OK\r\n");
    let synack6 = reply(L4::Ack, be6, client6);
    let answer = reply(L4::Udp, dns_be, sa("198.18.0.2:50000")).payload(b"answer");

    let unresolved = Pkt::new(L4::Syn, sa("198.18.0.2:40002"), sa("198.19.0.2:80"));
    // A first fragment of a datagram on no connection (a new flow's first datagram is never
    // balanced in fragments).
    let frag = edit_v4(
        Pkt::new(L4::Udp, sa("198.18.0.2:50009"), dns_vip)
            .payload(b"query")
            .bytes(),
        |p| p[20] |= 0x20,
    );
    let mut v6_frag = Pkt::new(L4::Udp, client6, sa("[2001:db8:ff::1]:53")).bytes();
    // Insert a fragment header (first fragment, more to come) before the UDP header.
    v6_frag[20] = 44;
    let plen = u16::from_be_bytes([v6_frag[18], v6_frag[19]]) + 8;
    v6_frag[18..20].copy_from_slice(&plen.to_be_bytes());
    v6_frag.splice(54..54, [17u8, 0, 0, 1, 0, 0, 0, 42]);
    let mut v6_hbh = Pkt::new(L4::Syn, client6, vip6).bytes();
    v6_hbh[20] = 0; // hop-by-hop options
    let options = edit_v4(syn.bytes(), |p| {
        p.splice(34..34, [1u8, 1, 1, 1]); // four NOP options
        p[14] = 0x46;
        let len = u16::from_be_bytes([p[16], p[17]]) + 4;
        p[16..18].copy_from_slice(&len.to_be_bytes());
    });
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);

    vec![
        Case {
            desc: "new TCP flow: SYN to the VIP goes to the first backend, redirected",
            input: syn.bytes(),
            verdict: Verdict::Redirect,
            output: Some(to_be(&syn, be2, BACKEND2_MAC)),
            reason: Reason::FwdRedirect,
        },
        Case {
            desc: "established flow: data of the same connection keeps its backend",
            input: data.bytes(),
            verdict: Verdict::Redirect,
            output: Some(to_be(&data, be2, BACKEND2_MAC)),
            reason: Reason::FwdRedirect,
        },
        Case {
            desc: "a second connection takes the next backend",
            input: Pkt::new(L4::Syn, client2, vip).bytes(),
            verdict: Verdict::Redirect,
            output: Some(to_be(&Pkt::new(L4::Syn, client2, vip), be3, BACKEND3_MAC)),
            reason: Reason::FwdRedirect,
        },
        Case {
            desc: "reply: the backend's source is rewritten to the VIP, routed to the client",
            input: synack.bytes(),
            verdict: Verdict::Redirect,
            output: Some(
                synack
                    .clone()
                    .snat(vip)
                    .routed(LB_CLIENT_MAC, CLIENT_MAC)
                    .bytes(),
            ),
            reason: Reason::ReplyRedirect,
        },
        Case {
            desc: "UDP: a datagram to the VIP is translated",
            input: query.bytes(),
            verdict: Verdict::Redirect,
            output: Some(
                query
                    .clone()
                    .dnat(dns_be)
                    .routed(LB_BACKEND_MAC, BACKEND2_MAC)
                    .bytes(),
            ),
            reason: Reason::FwdRedirect,
        },
        Case {
            desc: "UDP without checksum (IPv4): stays without checksum",
            input: query_nocsum,
            verdict: Verdict::Redirect,
            output: Some(query_nocsum_out),
            reason: Reason::FwdRedirect,
        },
        Case {
            desc: "UDP reply comes back from the VIP",
            input: answer.bytes(),
            verdict: Verdict::Redirect,
            output: Some(
                answer
                    .clone()
                    .snat(dns_vip)
                    .routed(LB_CLIENT_MAC, CLIENT_MAC)
                    .bytes(),
            ),
            reason: Reason::ReplyRedirect,
        },
        Case {
            desc: "IPv6: SYN to a v6 VIP is translated, hop limit decremented",
            input: syn6.bytes(),
            verdict: Verdict::Redirect,
            output: Some(
                syn6.clone()
                    .dnat(be6)
                    .routed(LB_BACKEND_MAC, BACKEND2_MAC)
                    .bytes(),
            ),
            reason: Reason::FwdRedirect,
        },
        Case {
            desc: "IPv6 reply comes back from the v6 VIP",
            input: synack6.bytes(),
            verdict: Verdict::Redirect,
            output: Some(
                synack6
                    .clone()
                    .snat(vip6)
                    .routed(LB_CLIENT_MAC, CLIENT_MAC)
                    .bytes(),
            ),
            reason: Reason::ReplyRedirect,
        },
        Case {
            desc: "neighbour unknown: translated, then passed for the stack to resolve and route",
            input: unresolved.bytes(),
            verdict: Verdict::Pass,
            output: Some(unresolved.clone().dnat(sa("198.18.2.2:8080")).bytes()),
            reason: Reason::FwdStack,
        },
        Case {
            desc: "TTL 1: passed as it came, so the stack's time-exceeded quotes the VIP",
            input: {
                let mut p = syn.clone();
                p.ttl = 1;
                p.src = sa("198.18.0.2:40003");
                p.bytes()
            },
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassTtlExpired,
        },
        Case {
            desc: "a reply with TTL 1: passed as it came, time-exceeded goes to the backend",
            input: {
                let mut p = synack.clone();
                p.ttl = 1;
                p.bytes()
            },
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassTtlExpired,
        },
        Case {
            desc: "data beyond the next hop's MTU (DF): passed as it came, for the stack's \
                   fragmentation-needed to quote what the client sent",
            input: Pkt::new(L4::Ack, client, vip).payload(&BIG).bytes(),
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassTooBig,
        },
        Case {
            desc: "IPv6: a reply beyond the next hop's MTU: passed as it came (packet too big \
                   goes to the backend)",
            input: synack6.clone().payload(&BIG).bytes(),
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassTooBig,
        },
        Case {
            desc: "service without a weighted backend: new connection dropped",
            input: Pkt::new(L4::Syn, client, sa("198.19.0.3:80")).bytes(),
            verdict: Verdict::Drop,
            output: None,
            reason: Reason::DropNoBackend,
        },
        Case {
            desc: "non-VIP traffic on a port no service uses passes untouched",
            input: Pkt::new(L4::Syn, client, sa("198.18.1.2:22")).bytes(),
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassNotService,
        },
        Case {
            desc: "non-VIP traffic on a VIP port passes untouched",
            input: Pkt::new(L4::Syn, client, sa("198.18.1.2:80")).bytes(),
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassNotService,
        },
        Case {
            desc: "a backend's packet that is not a reply to a balanced flow passes",
            input: reply(L4::Syn, be2, sa("198.18.0.9:1234")).bytes(),
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassNotService,
        },
        Case {
            desc: "IPv4 fragment of a datagram on no connection passes untouched",
            input: frag,
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassFragment,
        },
        Case {
            desc: "IPv6 fragment header passes untouched",
            input: v6_frag,
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassFragment,
        },
        Case {
            desc: "IPv4 options pass untouched",
            input: options,
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassIpOptions,
        },
        Case {
            desc: "IPv6 extension header passes untouched",
            input: v6_hbh,
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassIpOptions,
        },
        Case {
            desc: "truncated IPv4 header",
            input: syn.bytes()[..24].to_vec(),
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassTruncated,
        },
        Case {
            desc: "truncated IPv6 header",
            input: syn6.bytes()[..40].to_vec(),
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassTruncated,
        },
        Case {
            desc: "truncated TCP header",
            input: syn.bytes()[..44].to_vec(),
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassTruncated,
        },
        Case {
            desc: "IPv4 total length beyond the frame",
            input: edit_v4(syn.bytes(), |p| {
                p[16..18].copy_from_slice(&1000u16.to_be_bytes())
            }),
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassTruncated,
        },
        Case {
            desc: "bad IHL (4 words)",
            input: edit_v4(syn.bytes(), |p| p[14] = 0x44),
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassMalformed,
        },
        Case {
            desc: "IP version does not match the ethertype",
            input: {
                let mut p = syn.bytes();
                p[14] = 0x65;
                p
            },
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassMalformed,
        },
        Case {
            desc: "TCP data offset below 5",
            input: {
                let mut p = syn.bytes();
                p[46] = 0x40;
                p
            },
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassMalformed,
        },
        Case {
            desc: "IPv4 total length shorter than the headers",
            input: edit_v4(syn.bytes(), |p| {
                p[16..18].copy_from_slice(&30u16.to_be_bytes())
            }),
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassMalformed,
        },
        Case {
            desc: "unknown protocol (ICMP) to the VIP passes untouched",
            input: edit_v4(syn.bytes(), |p| p[23] = 1),
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassOtherProtocol,
        },
        Case {
            desc: "ARP passes untouched",
            input: arp,
            verdict: Verdict::Pass,
            output: None,
            reason: Reason::PassNotIp,
        },
        Case {
            desc: "a bare ACK that matches no connection is dropped, creating nothing",
            input: Pkt::new(L4::Ack, sa("198.18.0.2:40050"), vip).bytes(),
            verdict: Verdict::Drop,
            output: None,
            reason: Reason::DropTcpNoFlow,
        },
        Case {
            desc: "a RST that matches no connection is dropped",
            input: Pkt::new(L4::BareRst, sa("198.18.0.2:40051"), vip).bytes(),
            verdict: Verdict::Drop,
            output: None,
            reason: Reason::DropTcpNoFlow,
        },
        Case {
            desc: "a SYN-ACK to the VIP opens nothing",
            input: Pkt::new(L4::SynAck, sa("203.0.113.7:40052"), vip).bytes(),
            verdict: Verdict::Drop,
            output: None,
            reason: Reason::DropTcpNoFlow,
        },
        Case {
            desc: "IPv6: a FIN that matches no connection is dropped",
            input: Pkt::new(L4::Fin, sa("[2001:db8::2]:40053"), vip6).bytes(),
            verdict: Verdict::Drop,
            output: None,
            reason: Reason::DropTcpNoFlow,
        },
        Case {
            desc: "data of a connection whose entries are gone (flushed, evicted) is dropped",
            input: Pkt::new(L4::Ack, sa("198.18.0.2:40054"), vip)
                .payload(b"GET / HTTP/1.0\r\n\r\n")
                .bytes(),
            verdict: Verdict::Drop,
            output: None,
            reason: Reason::DropTcpNoFlow,
        },
    ]
}

#[test]
fn fixture_table_verdicts_outputs_and_counters() {
    if !require_root("fixture_table_verdicts_outputs_and_counters") {
        return;
    }
    let ns = test_netns("pkt");
    ns.run(|| {
        let (mut dp, rec) = loaded();
        let cases = fixture_table();
        for case in &cases {
            run_case(&mut dp, case);
        }

        // Per-service and per-backend counters saw exactly the table's traffic.
        let web = services()[0].addr;
        let web_id = rec.service_id(&web).unwrap();
        let c = dp.reader().service_counters(web_id).unwrap();
        assert_eq!(c.new_conns, 3, "web: SYN, second SYN, TTL-1 SYN: {c:?}");
        assert_eq!(c.fwd_packets, 3, "the TTL-1 SYN is not translated: {c:?}");
        assert_eq!(c.reply_packets, 1, "{c:?}");
        assert_eq!(c.fwd_bytes, 40 + 58 + 40, "L3 bytes: {c:?}");
        let be2 = rec.backend_id(&web, sa("198.18.1.2:8080")).unwrap();
        let be3 = rec.backend_id(&web, sa("198.18.1.3:8080")).unwrap();
        let (c2, c3) = (
            dp.reader().backend_counters(be2).unwrap(),
            dp.reader().backend_counters(be3).unwrap(),
        );
        assert_eq!(
            (c2.new_conns, c2.fwd_packets, c2.reply_packets),
            (2, 2, 1),
            "the TTL-1 SYN was balanced to backend 2, not translated: {c2:?}"
        );
        assert_eq!(
            (c3.new_conns, c3.fwd_packets, c3.reply_packets),
            (1, 1, 0),
            "{c3:?}"
        );
        let empty = dp
            .reader()
            .service_counters(rec.service_id(&services()[4].addr).unwrap())
            .unwrap();
        assert_eq!(empty.no_backend, 1, "{empty:?}");
    })
    .expect("the fixture table");
}

/// The TC program is the same balancer on skbs: every case of the table, with the same
/// output bytes (the kernel's checksum helpers update the test skb's full checksums as the
/// XDP path does by hand) and the same counters. A redirect is TC_ACT_REDIRECT, a pass
/// TC_ACT_OK, a drop TC_ACT_SHOT.
#[test]
fn the_tc_program_gives_the_fixture_tables_verdicts_and_bytes() {
    if !require_root("the_tc_program_gives_the_fixture_tables_verdicts_and_bytes") {
        return;
    }
    let ns = test_netns("pkttc");
    ns.run(|| {
        let (mut dp, _) = loaded();
        for case in &fixture_table() {
            let iface = if from_backend_side(&case.input) {
                "tp0"
            } else {
                "tc0"
            };
            let ifindex = nix::net::if_::if_nametoindex(iface).unwrap();
            let before = counts(&dp);
            let (action, out) = match dp.test_run_tc(&case.input, ifindex) {
                Ok(r) => r,
                // The kernel builds no test skb from some truncated frames (EINVAL); the
                // XDP table covers them.
                Err(_) if case.desc.contains("truncated") => continue,
                Err(e) => panic!("{}: {e:?}", case.desc),
            };
            let want = match case.verdict {
                Verdict::Redirect => 7,
                Verdict::Pass => 0,
                Verdict::Drop => 2,
                other => panic!("{}: no TC equivalent of {other:?}", case.desc),
            };
            assert_eq!(action, want, "{}: action", case.desc);
            let expected = case.output.as_ref().unwrap_or(&case.input);
            assert!(
                out == *expected,
                "{}: output differs\n got:\n{}\nwant:\n{}",
                case.desc,
                hex(&out),
                hex(expected)
            );
            let moved = moved(&before, &counts(&dp));
            assert_eq!(moved, vec![(case.reason, 1)], "{}: counters", case.desc);
        }
    })
    .expect("the fixture table on TC");
}

/// XDP redirects only to the interfaces the daemon attached natively: a route through any
/// other device leaves the packet, translated but otherwise as it came, to the stack, and
/// it is counted as such, never as a redirect that a device without XDP support would drop.
#[test]
fn xdp_leaves_a_route_through_a_device_it_cannot_send_to_to_the_stack() {
    if !require_root("xdp_leaves_a_route_through_a_device_it_cannot_send_to_to_the_stack") {
        return;
    }
    let ns = test_netns("pktdev");
    ns.run(|| {
        orch_tests::lab::pin_current_thread(0).unwrap();
        let cap = Capacity::default();
        // No allowed redirect target.
        let mut dp = Dataplane::load(cap).unwrap();
        let mut rec = Reconciler::new(cap.max_services, cap.max_backends);
        rec.apply(&mut dp, &services()).unwrap();
        let (client, vip) = (sa("198.18.0.2:40000"), sa("198.19.0.1:80"));
        let syn = Pkt::new(L4::Syn, client, vip);
        let before = counts(&dp);
        let out = test_run(&mut dp, &syn.bytes()).unwrap();
        assert_eq!(out.verdict, Verdict::Pass);
        assert_eq!(moved(&before, &counts(&dp)), vec![(Reason::FwdStack, 1)]);
        // Translated (the stack routes it to the backend), MACs and TTL untouched.
        let (f, _) = tcp_entries(&dp, client, vip);
        let backend = SocketAddr::new(words_addr(&f.nat_addr), u16::from_be(f.nat_port_be));
        assert_eq!(out.packet, syn.dnat(backend).bytes());
    })
    .expect("no redirect target");
}

#[test]
fn detaching_native_xdp_from_a_device_stops_redirects_into_it() {
    use orch::dataplane::Hook;
    if !require_root("detaching_native_xdp_from_a_device_stops_redirects_into_it") {
        return;
    }
    let ns = test_netns("detach");
    ns.run(|| {
        orch_tests::lab::pin_current_thread(0).unwrap();
        let cap = Capacity::default();
        // The backend side attached natively: the only redirect target.
        let mut dp = Dataplane::load(cap).unwrap();
        dp.set_settings(&default_settings()).unwrap();
        dp.attach("tp0", Hook::Xdp).expect("native XDP on a veth");
        let mut rec = Reconciler::new(cap.max_services, cap.max_backends);
        rec.apply(&mut dp, &services()).unwrap();
        let (client, vip) = (sa("198.18.0.2:44000"), sa("198.19.0.1:80"));
        let syn = test_run(&mut dp, &Pkt::new(L4::Syn, client, vip).bytes()).unwrap();
        assert_eq!(syn.verdict, Verdict::Redirect);
        let (f, _) = tcp_entries(&dp, client, vip);
        let backend = SocketAddr::new(words_addr(&f.nat_addr), u16::from_be(f.nat_port_be));
        let data = Pkt::new(L4::Ack, client, vip).payload(b"get");
        let out = test_run(&mut dp, &data.bytes()).unwrap();
        assert_eq!(
            out.verdict,
            Verdict::Redirect,
            "redirected, its next hop cached"
        );

        // Detached: not a target any more, cached or not. The packet goes to the stack
        // translated, with its MACs and TTL as they came (no redirect was prepared).
        dp.detach("tp0").unwrap();
        let before = counts(&dp);
        let out = test_run(&mut dp, &data.bytes()).unwrap();
        assert_eq!(out.verdict, Verdict::Pass);
        assert_eq!(out.packet, data.clone().dnat(backend).bytes());
        assert_eq!(moved(&before, &counts(&dp)), vec![(Reason::FwdStack, 1)]);
    })
    .expect("detach");
}

/// An ICMP error frame: `outer` addresses, `ttl`, the error `kind`, quoting `quoted` (an IP
/// header and the 8 bytes after it). Checksums computed from scratch.
fn icmp_error(
    macs: ([u8; 6], [u8; 6]),
    outer: (IpAddr, IpAddr),
    ttl: u8,
    kind: IcmpKind,
    quoted: &[u8],
) -> Vec<u8> {
    use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type, Icmpv6Type};
    let eth = PacketBuilder::ethernet2(macs.0, macs.1);
    let mut out = Vec::new();
    match (outer, kind) {
        ((IpAddr::V4(s), IpAddr::V4(d)), IcmpKind::FragNeeded(mtu)) => eth
            .ipv4(s.octets(), d.octets(), ttl)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
            ))
            .write(&mut out, quoted),
        ((IpAddr::V4(s), IpAddr::V4(d)), IcmpKind::PortUnreachable) => eth
            .ipv4(s.octets(), d.octets(), ttl)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::Port,
            ))
            .write(&mut out, quoted),
        ((IpAddr::V6(s), IpAddr::V6(d)), IcmpKind::FragNeeded(mtu)) => eth
            .ipv6(s.octets(), d.octets(), ttl)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu: mtu.into() })
            .write(&mut out, quoted),
        _ => panic!("not built here"),
    }
    .unwrap();
    out
}

#[derive(Clone, Copy)]
enum IcmpKind {
    /// IPv4 fragmentation needed / IPv6 packet too big, with the next hop's MTU.
    FragNeeded(u16),
    PortUnreachable,
}

/// The IP header and the first 8 bytes of L4 of a frame: what an ICMP error quotes.
fn quote(frame: &[u8]) -> Vec<u8> {
    let ip = if frame[12..14] == [0x86, 0xdd] {
        40
    } else {
        20
    };
    frame[14..14 + ip + 8].to_vec()
}

/// ICMP errors about balanced connections reach the other side translated, on both hooks:
/// path-MTU discovery from the clients' side reaches the backend that sent the large
/// reply; an error from a backend about a client's packet reaches the client as the VIP's.
/// Every checksum is checked (the expected frames are built from scratch).
#[test]
fn icmp_errors_about_balanced_connections_are_translated_both_ways() {
    if !require_root("icmp_errors_about_balanced_connections_are_translated_both_ways") {
        return;
    }
    let ns = test_netns("pkticmp");
    ns.run(|| {
        for tc in [false, true] {
            let (mut dp, _) = loaded();
            let run = |dp: &mut Dataplane, frame: &[u8]| -> (i32, Vec<u8>, Reason) {
                let before = counts(dp);
                let (action, out) = if tc {
                    let iface = if from_backend_side(frame) {
                        "tp0"
                    } else {
                        "tc0"
                    };
                    let ifindex = nix::net::if_::if_nametoindex(iface).unwrap();
                    dp.test_run_tc(frame, ifindex).unwrap()
                } else {
                    let out = test_run(dp, frame).unwrap();
                    (
                        if out.verdict == Verdict::Redirect {
                            7
                        } else {
                            0
                        },
                        out.packet,
                    )
                };
                let moved = moved(&before, &counts(dp));
                assert_eq!(moved.len(), 1, "{moved:?}");
                (action, out, moved[0].0)
            };
            let client = sa("198.18.0.2:40000");
            let vip = sa("198.19.0.1:80");
            let be2 = sa("198.18.1.2:8080");
            let router = IpAddr::from([198, 18, 0, 254]);
            // An established connection, client -> VIP -> backend 2.
            let syn = Pkt::new(L4::Syn, client, vip);
            assert_eq!(run(&mut dp, &syn.bytes()).2, Reason::FwdRedirect);
            let mut reply = Pkt::new(L4::SynAck, be2, client);
            (reply.src_mac, reply.dst_mac) = (BACKEND2_MAC, LB_BACKEND_MAC);
            assert_eq!(run(&mut dp, &reply.bytes()).2, Reason::ReplyRedirect);

            // A router on the client's path cannot take the reply: fragmentation needed,
            // quoting the reply as the client side saw it (from the VIP).
            let seen_by_client = reply.clone().snat(vip).routed(LB_CLIENT_MAC, CLIENT_MAC);
            let frag = icmp_error(
                (CLIENT_MAC, LB_CLIENT_MAC),
                (router, vip.ip()),
                64,
                IcmpKind::FragNeeded(1280),
                &quote(&seen_by_client.bytes()),
            );
            let (action, out, reason) = run(&mut dp, &frag);
            assert_eq!((action, reason), (7, Reason::IcmpToBackend), "tc {tc}");
            let sent_by_backend = reply.clone().routed(LB_CLIENT_MAC, CLIENT_MAC);
            let want = icmp_error(
                (LB_BACKEND_MAC, BACKEND2_MAC),
                (router, be2.ip()),
                63,
                IcmpKind::FragNeeded(1280),
                &quote(&sent_by_backend.bytes()),
            );
            assert!(
                out == want,
                "tc {tc}\n got:\n{}\nwant:\n{}",
                hex(&out),
                hex(&want)
            );

            // The backend's host refuses a client's datagram: port unreachable, quoting it
            // as the backend received it; the client gets it from the VIP.
            let q = Pkt::new(L4::Udp, sa("198.18.0.2:50000"), sa("198.19.0.1:53")).payload(b"q");
            assert_eq!(run(&mut dp, &q.bytes()).2, Reason::FwdRedirect);
            let dns_be = sa("198.18.1.2:5353");
            let at_backend = q.clone().dnat(dns_be).routed(LB_BACKEND_MAC, BACKEND2_MAC);
            let unreach = icmp_error(
                (BACKEND2_MAC, LB_BACKEND_MAC),
                (dns_be.ip(), client.ip()),
                64,
                IcmpKind::PortUnreachable,
                &quote(&at_backend.bytes()),
            );
            let (action, out, reason) = run(&mut dp, &unreach);
            assert_eq!((action, reason), (7, Reason::IcmpToClient), "tc {tc}");
            let as_sent = q.clone().routed(LB_BACKEND_MAC, BACKEND2_MAC);
            let want = icmp_error(
                (LB_CLIENT_MAC, CLIENT_MAC),
                (vip.ip(), client.ip()),
                63,
                IcmpKind::PortUnreachable,
                &quote(&as_sent.bytes()),
            );
            assert!(
                out == want,
                "tc {tc}\n got:\n{}\nwant:\n{}",
                hex(&out),
                hex(&want)
            );

            // IPv6: packet too big from the client's side, about a reply.
            let (client6, vip6) = (sa("[2001:db8::2]:40000"), sa("[2001:db8:ff::1]:80"));
            let be6 = sa("[2001:db8:1::2]:8080");
            assert_eq!(
                run(&mut dp, &Pkt::new(L4::Syn, client6, vip6).bytes()).2,
                Reason::FwdRedirect
            );
            let mut reply6 = Pkt::new(L4::SynAck, be6, client6);
            (reply6.src_mac, reply6.dst_mac) = (BACKEND2_MAC, LB_BACKEND_MAC);
            assert_eq!(run(&mut dp, &reply6.bytes()).2, Reason::ReplyRedirect);
            let router6: IpAddr = "2001:db8::fe".parse().unwrap();
            let seen = reply6.clone().snat(vip6).routed(LB_CLIENT_MAC, CLIENT_MAC);
            let too_big = icmp_error(
                (CLIENT_MAC, LB_CLIENT_MAC),
                (router6, vip6.ip()),
                64,
                IcmpKind::FragNeeded(1280),
                &quote(&seen.bytes()),
            );
            let (action, out, reason) = run(&mut dp, &too_big);
            assert_eq!((action, reason), (7, Reason::IcmpToBackend), "tc {tc}");
            let sent = reply6.clone().routed(LB_CLIENT_MAC, CLIENT_MAC);
            let want = icmp_error(
                (LB_BACKEND_MAC, BACKEND2_MAC),
                (router6, be6.ip()),
                63,
                IcmpKind::FragNeeded(1280),
                &quote(&sent.bytes()),
            );
            assert!(
                out == want,
                "tc {tc}\n got:\n{}\nwant:\n{}",
                hex(&out),
                hex(&want)
            );

            // An error about a connection orch does not know passes as it came.
            let stranger = Pkt::new(L4::SynAck, vip, sa("198.18.0.2:1"));
            let other = icmp_error(
                (CLIENT_MAC, LB_CLIENT_MAC),
                (router, vip.ip()),
                64,
                IcmpKind::FragNeeded(1280),
                &quote(&stranger.bytes()),
            );
            let (action, out, reason) = run(&mut dp, &other);
            assert_eq!((action, reason), (0, Reason::PassOtherProtocol), "tc {tc}");
            assert_eq!(out, other);
        }
    })
    .expect("ICMP errors");
}

/// Splits a TCP/UDP frame into two IP fragments, the first carrying `k` bytes of the L4
/// datagram (a multiple of 8), with identification `id`. IPv4 header checksums recomputed.
fn fragments(frame: &[u8], k: usize, id: u32) -> [Vec<u8>; 2] {
    if frame[12..14] == [0x86, 0xdd] {
        let (eth, ip, l4) = (&frame[..14], &frame[14..54], &frame[54..]);
        let piece = |data: &[u8], offset: usize, more: bool| {
            let mut out = eth.to_vec();
            let mut h = ip.to_vec();
            h[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
            h[6] = 44;
            out.extend(h);
            let off = ((offset / 8) << 3) as u16 | u16::from(more);
            out.extend([ip[6], 0]);
            out.extend(off.to_be_bytes());
            out.extend(id.to_be_bytes());
            out.extend(data);
            out
        };
        [piece(&l4[..k], 0, true), piece(&l4[k..], k, false)]
    } else {
        let (eth, ip, l4) = (&frame[..14], &frame[14..34], &frame[34..]);
        let piece = |data: &[u8], offset: usize, more: bool| {
            let mut h = ip.to_vec();
            h[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
            h[4..6].copy_from_slice(&(id as u16).to_be_bytes());
            let flags = if more { 0x2000 } else { 0 };
            h[6..8].copy_from_slice(&(flags | (offset / 8) as u16).to_be_bytes());
            h[10..12].copy_from_slice(&[0, 0]);
            let sum = orch_common::csum::sum_be(&h, 0);
            h[10..12].copy_from_slice(&(!orch_common::csum::fold(sum)).to_be_bytes());
            let mut out = eth.to_vec();
            out.extend(h);
            out.extend(data);
            out
        };
        [piece(&l4[..k], 0, true), piece(&l4[k..], k, false)]
    }
}

/// A datagram of a balanced connection that arrives in fragments (a UDP answer larger
/// than the MTU) is translated fragment by fragment, IPv4 and IPv6, on both hooks: the
/// first by its ports, the others by what the first left in the fragment table. A
/// fragment that comes before its first passes as it came.
#[test]
fn fragments_of_a_balanced_datagram_are_translated() {
    if !require_root("fragments_of_a_balanced_datagram_are_translated") {
        return;
    }
    static ANSWER: [u8; 100] = [0x42; 100];
    let ns = test_netns("pktfrag");
    ns.run(|| {
        for tc in [false, true] {
            let (mut dp, _) = loaded();
            let run = |dp: &mut Dataplane, frame: &[u8]| -> (Vec<u8>, Vec<(Reason, u64)>) {
                let before = counts(dp);
                let out = if tc {
                    let iface = if from_backend_side(frame) {
                        "tp0"
                    } else {
                        "tc0"
                    };
                    let ifindex = nix::net::if_::if_nametoindex(iface).unwrap();
                    dp.test_run_tc(frame, ifindex).unwrap().1
                } else {
                    test_run(dp, frame).unwrap().packet
                };
                (out, moved(&before, &counts(dp)))
            };
            // UDP over IPv4; TCP over IPv6 (the test's services have no UDP VIP there, and
            // fragments are fragments whatever they carry).
            for (client, vip, backend, ask, answer) in [
                (
                    sa("198.18.0.2:50000"),
                    sa("198.19.0.1:53"),
                    sa("198.18.1.2:5353"),
                    L4::Udp,
                    L4::Udp,
                ),
                (
                    sa("[2001:db8::2]:50000"),
                    sa("[2001:db8:ff::1]:80"),
                    sa("[2001:db8:1::2]:8080"),
                    L4::Syn,
                    L4::Ack,
                ),
            ] {
                let query = Pkt::new(ask, client, vip).payload(b"q");
                let (_, m) = run(&mut dp, &query.bytes());
                assert_eq!(m, vec![(Reason::FwdRedirect, 1)], "tc {tc} {vip}");
                let mut answer = Pkt::new(answer, backend, client).payload(&ANSWER);
                (answer.src_mac, answer.dst_mac) = (BACKEND2_MAC, LB_BACKEND_MAC);
                let sent = fragments(&answer.bytes(), 48, 0x1234);
                let want = fragments(
                    &answer
                        .clone()
                        .snat(vip)
                        .routed(LB_CLIENT_MAC, CLIENT_MAC)
                        .bytes(),
                    48,
                    0x1234,
                );
                for (i, (frame, want)) in sent.iter().zip(&want).enumerate() {
                    let (out, m) = run(&mut dp, frame);
                    assert_eq!(m, vec![(Reason::ReplyRedirect, 1)], "tc {tc} {vip} #{i}");
                    assert!(
                        out == *want,
                        "tc {tc} {vip} fragment {i}\n got:\n{}\nwant:\n{}",
                        hex(&out),
                        hex(want)
                    );
                }
                // Another datagram whose later fragment comes first: not translatable.
                let early = &fragments(&answer.bytes(), 48, 0x777)[1];
                let (out, m) = run(&mut dp, early);
                assert_eq!(m, vec![(Reason::PassFragment, 1)], "tc {tc} {vip}");
                assert_eq!(&out, early);
            }
        }
    })
    .expect("fragments");
}

/// Every kernel log level is a different program for the verifier (disabled levels are
/// pruned): each must load, and none may change a verdict or an output byte.
#[test]
fn every_kernel_log_level_verifies_and_changes_no_verdict() {
    if !require_root("every_kernel_log_level_verifies_and_changes_no_verdict") {
        return;
    }
    let ns = test_netns("pktlog");
    ns.run(|| {
        for level in 1..=5u8 {
            let (mut dp, _) = loaded_logging(level);
            for case in &fixture_table() {
                run_case(&mut dp, case);
            }
        }
    })
    .expect("the fixture table at every log level");
}

#[test]
fn weighted_round_robin_order_in_the_kernel() {
    if !require_root("weighted_round_robin_order_in_the_kernel") {
        return;
    }
    let ns = test_netns("wrr");
    ns.run(|| {
        let (mut dp, _) = loaded();
        let vip = sa("198.19.0.4:80");
        let chosen: Vec<String> = (0..9u16)
            .map(|i| {
                let p = Pkt::new(L4::Syn, SocketAddr::new(v4("198.18.0.2"), 41000 + i), vip);
                let out = test_run(&mut dp, &p.bytes()).unwrap();
                assert_eq!(out.verdict, Verdict::Redirect);
                let dst = Ipv4Addr::new(
                    out.packet[30],
                    out.packet[31],
                    out.packet[32],
                    out.packet[33],
                );
                dst.to_string()
            })
            .collect();
        // Weights 2:1, smoothly interleaved: a b a, three times.
        let (a, b) = ("198.18.1.2", "198.18.1.3");
        assert_eq!(chosen, [a, b, a, a, b, a, a, b, a]);
    })
    .expect("weighted order");
}

#[test]
fn maglev_sends_a_flow_to_the_same_backend_through_every_host() {
    if !require_root("maglev_sends_a_flow_to_the_same_backend_through_every_host") {
        return;
    }
    let ns = test_netns("maglev");
    ns.run(|| {
        let vip = sa("198.19.0.5:80");
        let hashed = |backends: &[&str]| Service {
            name: "hashed".into(),
            check: Default::default(),
            scheduler: Scheduler::Maglev,
            addr: ServiceAddr {
                vip: vip.ip(),
                port: vip.port(),
                protocol: Protocol::Tcp,
            },
            backends: backends.iter().map(|a| Backend::new(sa(a), 1)).collect(),
        };
        let client = |i: u16| SocketAddr::new(v4("198.18.0.2"), 20_000 + i * 7);
        // One host: its own data plane, its own ids.
        let load = |others: Vec<Service>, backends: &[&str]| -> Dataplane {
            let cap = Capacity::default();
            let mut dp = Dataplane::load_logging(cap, orch::dataplane::KERNEL_LOG_OFF)
                .expect("loading the data plane");
            allow_redirects(&mut dp);
            let mut rec = Reconciler::new(cap.max_services, cap.max_backends);
            let mut all = others;
            all.push(hashed(backends));
            rec.apply(&mut dp, &all).expect("installing services");
            dp
        };
        // Where 300 new flows go through a host.
        let host = |others: Vec<Service>, backends: &[&str]| -> Vec<IpAddr> {
            let mut dp = load(others, backends);
            (0..300u16)
                .map(|i| {
                    let p = Pkt::new(L4::Syn, client(i), vip);
                    let out = test_run(&mut dp, &p.bytes()).unwrap();
                    assert_eq!(out.verdict, Verdict::Redirect, "flow {i}");
                    IpAddr::V4(Ipv4Addr::new(
                        out.packet[30],
                        out.packet[31],
                        out.packet[32],
                        out.packet[33],
                    ))
                })
                .collect()
        };
        let (b2, b3) = ("198.18.1.2:8080", "198.18.1.3:8080");
        // Host A has only this service; host B installed others first (so its backend ids
        // differ) and lists the backends the other way round, on another CPU.
        orch_tests::lab::pin_current_thread(0).unwrap();
        let a = host(Vec::new(), &[b2, b3]);
        if possible_cpus() > 1 {
            orch_tests::lab::pin_current_thread(1).unwrap();
        }
        let b = host(services(), &[b3, b2]);
        assert_eq!(a, b, "the same flows, the same backends, on both hosts");
        // Both backends take flows, and each flow goes where the table says.
        let named: Vec<(String, u32)> = [b2, b3].iter().map(|b| (b.to_string(), 1)).collect();
        let table = maglev::table(&named);
        let on_b2 = a.iter().filter(|ip| **ip == sa(b2).ip()).count();
        assert!(
            (100..=200).contains(&on_b2),
            "{on_b2} of 300 flows on one of two backends"
        );
        for (i, got) in a.iter().enumerate() {
            let slot = tcp_key(client(i as u16), vip).hash() % MAGLEV_SIZE;
            let want = sa(&named[table[slot as usize] as usize].0).ip();
            assert_eq!(*got, want, "flow {i}");
        }

        // A host that never saw these connections (an ECMP change moved them here, or it
        // lost its table): their segments go where the table says, their backends'
        // answers go back from the VIP, and nothing is recorded. (Its other services share
        // no backend with this one: a stray answer from a shared backend is not translated,
        // as its VIP would be a guess.)
        let others: Vec<Service> = services()
            .into_iter()
            .filter(|s| s.name == "dns" || s.name == "unresolved")
            .collect();
        let mut dp = load(others, &[b3, b2]);
        let before = counts(&dp);
        for i in 0..20u16 {
            let ack = Pkt::new(L4::Ack, client(i), vip).payload(b"more");
            let out = test_run(&mut dp, &ack.bytes()).unwrap();
            assert_eq!(out.verdict, Verdict::Redirect, "mid-stream segment {i}");
            let backend = SocketAddr::new(a[i as usize], 8080);
            assert_eq!(
                hex(&out.packet[30..34]),
                hex(&addr_octets(backend.ip())),
                "flow {i}"
            );
            assert!(dp
                .reader()
                .flow(&tcp_key(client(i), vip))
                .unwrap()
                .is_none());
            let answer = Pkt {
                src_mac: BACKEND2_MAC,
                dst_mac: LB_BACKEND_MAC,
                ..Pkt::new(L4::Ack, backend, client(i)).payload(b"data")
            };
            let out = test_run(&mut dp, &answer.bytes()).unwrap();
            assert_eq!(out.verdict, Verdict::Redirect, "answer {i}");
            assert_eq!(
                hex(&out.packet[26..30]),
                hex(&addr_octets(vip.ip())),
                "answer {i}"
            );
            assert_eq!(
                u16::from_be_bytes([out.packet[34], out.packet[35]]),
                vip.port()
            );
            // The same answer arriving from the clients' side claims a backend's address
            // it does not come from: not translated.
            let out = test_run_on(&mut dp, &answer.bytes(), "tc0").unwrap();
            assert_eq!(out.verdict, Verdict::Pass, "spoofed answer {i}");
        }
        let moved = moved(&before, &counts(&dp));
        assert!(
            moved.contains(&(Reason::FwdRedirect, 20))
                && moved.contains(&(Reason::ReplyRedirect, 20)),
            "{moved:?}"
        );
        // A round-robin service's stray segment is still dropped.
        let stray = Pkt::new(L4::Ack, client(0), sa("198.19.0.2:80"));
        assert_eq!(
            test_run(&mut dp, &stray.bytes()).unwrap().verdict,
            Verdict::Drop
        );
    })
    .expect("maglev");
}

fn addr_octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The forward key of a client's TCP connection to a VIP.
fn tcp_key(client: SocketAddr, vip: SocketAddr) -> FlowKey {
    FlowKey {
        src: addr_words(client.ip()),
        dst: addr_words(vip.ip()),
        src_port_be: client.port().to_be(),
        dst_port_be: vip.port().to_be(),
        proto: 6,
        dir: DIR_FORWARD,
        _pad: 0,
    }
}

/// The connection-table entries of a client's TCP connection to a VIP: (forward, reply).
fn tcp_entries(dp: &Dataplane, client: SocketAddr, vip: SocketAddr) -> (FlowValue, FlowValue) {
    let forward = dp
        .reader()
        .flow(&tcp_key(client, vip))
        .unwrap()
        .expect("a forward entry");
    let reply = dp
        .reader()
        .flow(&FlowKey {
            src: forward.nat_addr,
            dst: addr_words(client.ip()),
            src_port_be: forward.nat_port_be,
            dst_port_be: client.port().to_be(),
            proto: 6,
            dir: DIR_REPLY,
            _pad: 0,
        })
        .unwrap()
        .expect("a reply entry");
    (forward, reply)
}

#[test]
fn tcp_fin_and_rst_are_recorded_so_closed_connections_can_be_told() {
    if !require_root("tcp_fin_and_rst_are_recorded_so_closed_connections_can_be_told") {
        return;
    }
    let ns = test_netns("fin");
    ns.run(|| {
        let (mut dp, mut rec) = loaded();
        rec.apply(&mut dp, &services()).unwrap();
        let vip = sa("198.19.0.1:80");
        let run = |dp: &mut Dataplane, p: Pkt| test_run(dp, &p.bytes()).unwrap().verdict;

        // Both sides close with FIN: closed only once both have.
        let client = sa("198.18.0.2:40001");
        run(&mut dp, Pkt::new(L4::Syn, client, vip));
        let (f, r) = tcp_entries(&dp, client, vip);
        assert_eq!((f.seen(), r.seen()), (0, 0));
        run(&mut dp, Pkt::new(L4::Ack, client, vip));
        assert_eq!(
            tcp_entries(&dp, client, vip).0.seen(),
            0,
            "plain ACKs write nothing"
        );
        run(&mut dp, Pkt::new(L4::FinAck, client, vip));
        let (f, r) = tcp_entries(&dp, client, vip);
        assert_eq!(f.seen(), SEEN_FIN);
        assert!(
            !FlowValue::closed(f.seen(), r.seen()),
            "half-closed is still open"
        );
        let backend = SocketAddr::new(words_addr(&f.nat_addr), u16::from_be(f.nat_port_be));
        let verdict = run(&mut dp, Pkt::new(L4::FinAck, backend, client));
        assert_eq!(
            verdict,
            Verdict::Redirect,
            "the backend's FIN is translated as usual"
        );
        let (f, r) = tcp_entries(&dp, client, vip);
        assert_eq!(r.seen(), SEEN_FIN);
        assert!(FlowValue::closed(f.seen(), r.seen()));
        // The same port opens a new connection: balanced afresh (the next backend), with a
        // clean entry.
        let first_backend = f.nat_addr;
        run(&mut dp, Pkt::new(L4::Syn, client, vip));
        let (f, r) = tcp_entries(&dp, client, vip);
        assert_ne!(
            f.nat_addr, first_backend,
            "a reused port is a new connection"
        );
        assert_eq!((f.seen(), r.seen()), (0, 0));

        // A RST from either side of an established connection closes it at once.
        let client = sa("198.18.0.2:40002");
        run(&mut dp, Pkt::new(L4::Syn, client, vip));
        let (f, _) = tcp_entries(&dp, client, vip);
        let backend = SocketAddr::new(words_addr(&f.nat_addr), u16::from_be(f.nat_port_be));
        run(&mut dp, Pkt::new(L4::SynAck, backend, client));
        run(&mut dp, Pkt::new(L4::Rst, backend, client));
        let (f, r) = tcp_entries(&dp, client, vip);
        assert_eq!(r.seen(), SEEN_SYNACK | SEEN_RST);
        assert_eq!(
            f.seen(),
            SEEN_RST,
            "the backend's reset marks the client's side too"
        );
        assert!(FlowValue::closed(f.seen(), r.seen()));
        // So a SYN reusing the port is balanced afresh, not sent to the resetting backend.
        let resetting = f.nat_addr;
        run(&mut dp, Pkt::new(L4::Syn, client, vip));
        let (f, _) = tcp_entries(&dp, client, vip);
        assert_ne!(f.nat_addr, resetting);
        assert_eq!(f.seen(), 0);
    })
    .expect("FIN/RST bookkeeping");
}

#[test]
fn a_refused_syn_ejects_the_backend_and_the_retry_goes_elsewhere() {
    if !require_root("a_refused_syn_ejects_the_backend_and_the_retry_goes_elsewhere") {
        return;
    }
    let ns = test_netns("refuse");
    ns.run(|| {
        let (mut dp, mut rec) = loaded();
        let svcs = services();
        rec.apply(&mut dp, &svcs).unwrap();
        let web = &svcs[0];
        let vip = sa("198.19.0.1:80");
        let client = sa("198.18.0.2:41000");
        let syn = Pkt::new(L4::Syn, client, vip);

        // A handshake that succeeds is measured.
        let ok_client = sa("198.18.0.2:41001");
        test_run(&mut dp, &Pkt::new(L4::Syn, ok_client, vip).bytes()).unwrap();
        let (f, _) = tcp_entries(&dp, ok_client, vip);
        let ok_backend = SocketAddr::new(words_addr(&f.nat_addr), u16::from_be(f.nat_port_be));
        test_run(
            &mut dp,
            &Pkt::new(L4::SynAck, ok_backend, ok_client).bytes(),
        )
        .unwrap();
        let ok_id = rec.backend_id(&web.addr, ok_backend).unwrap();
        let sig = dp.reader().backend_signals(ok_id).unwrap();
        assert_eq!((sig.handshakes, sig.refused), (1, 0));
        assert_eq!(sig.handshake_hist.iter().sum::<u64>(), 1);

        // The next SYN's backend answers RST.
        let out = test_run(&mut dp, &syn.bytes()).unwrap();
        assert_eq!(out.verdict, Verdict::Redirect);
        let (f, _) = tcp_entries(&dp, client, vip);
        let refusing = SocketAddr::new(words_addr(&f.nat_addr), u16::from_be(f.nat_port_be));
        let refusing_id = rec.backend_id(&web.addr, refusing).unwrap();
        let before = counts(&dp);
        let out = test_run(&mut dp, &Pkt::new(L4::Rst, refusing, client).bytes()).unwrap();
        assert_eq!(
            out.verdict,
            Verdict::Drop,
            "the client never sees the refusal"
        );
        let after = counts(&dp);
        let moved: Vec<_> = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| b.1 != a.1)
            .map(|(_, a)| a.0)
            .collect();
        assert_eq!(moved, [Reason::DropRefused]);
        assert!(dp.reader().ejected(refusing_id).unwrap());
        assert_eq!(dp.reader().backend_signals(refusing_id).unwrap().refused, 1);
        let forward = tcp_key(client, vip);
        assert_eq!(
            dp.reader().flow(&forward).unwrap(),
            None,
            "the refused flow is forgotten"
        );

        // The client's SYN retransmission is balanced again, never to the ejected backend,
        // and neither is any other new connection until the daemon clears the mark.
        for port in 0..12u16 {
            let c = SocketAddr::new(client.ip(), 42000 + port);
            let c = if port == 0 { client } else { c };
            test_run(&mut dp, &Pkt::new(L4::Syn, c, vip).bytes()).unwrap();
            let (f, _) = tcp_entries(&dp, c, vip);
            let chosen = SocketAddr::new(words_addr(&f.nat_addr), u16::from_be(f.nat_port_be));
            assert_ne!(
                chosen, refusing,
                "connection from {c} went to the ejected backend"
            );
        }
        dp.clear_ejection(refusing_id).unwrap();
        let reached = (0..12u16).any(|port| {
            let c = SocketAddr::new(client.ip(), 43000 + port);
            test_run(&mut dp, &Pkt::new(L4::Syn, c, vip).bytes()).unwrap();
            let (f, _) = tcp_entries(&dp, c, vip);
            SocketAddr::new(words_addr(&f.nat_addr), u16::from_be(f.nat_port_be)) == refusing
        });
        assert!(reached, "a cleared backend takes connections again");
    })
    .expect("refusal handling");
}

#[test]
fn udp_flow_is_rebalanced_only_after_its_idle_timeout() {
    if !require_root("udp_flow_is_rebalanced_only_after_its_idle_timeout") {
        return;
    }
    let ns = test_netns("udp");
    ns.run(|| {
        let (mut dp, mut rec) = loaded();
        // A UDP service with two backends.
        let mut svcs = services();
        svcs[1]
            .backends
            .push(Backend::new(sa("198.18.1.3:5353"), 1));
        rec.apply(&mut dp, &svcs).unwrap();
        let q = Pkt::new(L4::Udp, sa("198.18.0.2:50000"), sa("198.19.0.1:53"))
            .payload(b"q")
            .bytes();
        let backend_of = |dp: &mut Dataplane| {
            let out = test_run(dp, &q).unwrap();
            assert_eq!(out.verdict, Verdict::Redirect);
            out.packet[33]
        };
        let first = backend_of(&mut dp);
        for _ in 0..3 {
            assert_eq!(
                backend_of(&mut dp),
                first,
                "within the timeout the flow stays"
            );
        }
        // An idle timeout of 1 ns: every packet finds its entry expired and is balanced anew.
        // Idle time is read from the coarse clock (updated at each timer tick, every 1 to
        // 10 ms): 20 ms is past the next tick whatever the kernel's HZ.
        let mut s = default_settings();
        s.udp_idle_ns = 1;
        dp.set_settings(&s).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let second = backend_of(&mut dp);
        assert_ne!(
            second, first,
            "an idle flow is balanced again (to the next backend)"
        );
    })
    .expect("UDP idle timeout");
}

/// The verdict counters that moved between two readings.
fn moved(before: &[(Reason, u64)], after: &[(Reason, u64)]) -> Vec<(Reason, u64)> {
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| a.1 != b.1)
        .map(|(b, a)| (a.0, a.1 - b.1))
        .collect()
}

/// Whether any backend of [`services`] is ejected or has a refusal counted.
fn anyone_ejected(dp: &Dataplane, rec: &Reconciler) -> Vec<String> {
    let mut out = Vec::new();
    for svc in services() {
        for b in &svc.backends {
            let id = rec.backend_id(&svc.addr, b.addr).expect("installed");
            if dp.reader().ejected(id).unwrap()
                || dp.reader().backend_signals(id).unwrap().refused > 0
            {
                out.push(format!("{} {}", svc.name, b.addr));
            }
        }
    }
    out
}

#[test]
fn stray_tcp_segments_create_no_state_and_eject_nobody() {
    if !require_root("stray_tcp_segments_create_no_state_and_eject_nobody") {
        return;
    }
    let ns = test_netns("stray");
    ns.run(|| {
        let (mut dp, rec) = loaded();
        let vip = sa("198.19.0.1:80");
        // From the client's own address and from spoofed ones, every kind of segment that
        // does not open a connection.
        let sources = [
            "198.18.0.2:46000",
            "203.0.113.9:46001",
            "198.18.1.2:46002",
            "[2001:db8::2]:46003",
        ];
        let kinds = [
            L4::Ack,
            L4::Fin,
            L4::FinAck,
            L4::Psh,
            L4::Rst,
            L4::BareRst,
            L4::SynAck,
        ];
        for src in sources {
            let src = sa(src);
            let dst = if src.is_ipv4() {
                vip
            } else {
                sa("[2001:db8:ff::1]:80")
            };
            for kind in kinds {
                let p = Pkt::new(kind, src, dst).payload(b"junk");
                let before = counts(&dp);
                // On the client side: where stray segments come from.
                let out = test_run_on(&mut dp, &p.bytes(), "tc0").unwrap();
                assert_eq!(out.verdict, Verdict::Drop, "{kind:?} from {src}");
                assert_eq!(
                    moved(&before, &counts(&dp)),
                    [(Reason::DropTcpNoFlow, 1)],
                    "{kind:?} from {src}"
                );
                let forward = tcp_key(src, dst);
                assert_eq!(
                    dp.reader().flow(&forward).unwrap(),
                    None,
                    "{kind:?} created state"
                );
            }
        }
        assert_eq!(anyone_ejected(&dp, &rec), Vec::<String>::new());

        // A real connection: a RST from its backend that does not answer the SYN (no ACK,
        // or acknowledging something else) is no refusal: passed on, nobody ejected.
        let client = sa("198.18.0.2:46100");
        test_run(&mut dp, &Pkt::new(L4::Syn, client, vip).bytes()).unwrap();
        let (f, _) = tcp_entries(&dp, client, vip);
        let backend = SocketAddr::new(words_addr(&f.nat_addr), u16::from_be(f.nat_port_be));
        let before = counts(&dp);
        let out = test_run(&mut dp, &Pkt::new(L4::BareRst, backend, client).bytes()).unwrap();
        assert_eq!(out.verdict, Verdict::Redirect, "translated like any packet");
        assert_eq!(moved(&before, &counts(&dp)), [(Reason::ReplyRedirect, 1)]);
        assert_eq!(anyone_ejected(&dp, &rec), Vec::<String>::new());

        // A packet claiming the backend's address from the client side is not the backend:
        // a forged refusal there is dropped, the entry stays, nobody is ejected.
        let client = sa("198.18.0.2:46101");
        test_run(&mut dp, &Pkt::new(L4::Syn, client, vip).bytes()).unwrap();
        let (f, _) = tcp_entries(&dp, client, vip);
        let backend = SocketAddr::new(words_addr(&f.nat_addr), u16::from_be(f.nat_port_be));
        for kind in [L4::Rst, L4::SynAck, L4::Ack] {
            let before = counts(&dp);
            let forged = Pkt::new(kind, backend, client).bytes();
            let out = test_run_on(&mut dp, &forged, "tc0").unwrap();
            assert_eq!(out.verdict, Verdict::Drop, "forged {kind:?}");
            assert_eq!(
                moved(&before, &counts(&dp)),
                [(Reason::DropReplyInterface, 1)]
            );
        }
        let (f2, r2) = tcp_entries(&dp, client, vip);
        assert_eq!(
            (f2.seen(), r2.seen()),
            (0, 0),
            "the forgeries changed nothing"
        );
        assert_eq!(anyone_ejected(&dp, &rec), Vec::<String>::new());
        // The real refusal, from the backend's side, still counts.
        let out = test_run(&mut dp, &Pkt::new(L4::Rst, backend, client).bytes()).unwrap();
        assert_eq!(out.verdict, Verdict::Drop);
        assert_eq!(anyone_ejected(&dp, &rec), [format!("web {backend}")]);
    })
    .expect("stray segments");
}

#[test]
fn two_services_sharing_a_backend_never_take_each_others_replies() {
    if !require_root("two_services_sharing_a_backend_never_take_each_others_replies") {
        return;
    }
    let ns = test_netns("share");
    ns.run(|| {
        let (mut dp, mut rec) = loaded();
        let mut svcs = services();
        // A third service on 198.18.1.2:8080, with no other backend to fall back on.
        svcs.push(Service {
            name: "solo".into(),
            check: Default::default(),
            scheduler: Default::default(),
            addr: ServiceAddr {
                vip: v4("198.19.0.5"),
                port: 80,
                protocol: Protocol::Tcp,
            },
            backends: vec![Backend::new(sa("198.18.1.2:8080"), 1)],
        });
        rec.apply(&mut dp, &svcs).unwrap();
        let (web, weighted, solo) = (
            sa("198.19.0.1:80"),
            sa("198.19.0.4:80"),
            sa("198.19.0.5:80"),
        );
        // One client port to three VIPs (a stack picks ports per destination, so this is
        // ordinary). "web" takes 198.18.1.2 (the first slot on CPU 0).
        let client = sa("198.18.0.2:47000");
        test_run(&mut dp, &Pkt::new(L4::Syn, client, web).bytes()).unwrap();
        let (f, _) = tcp_entries(&dp, client, web);
        let shared = sa("198.18.1.2:8080");
        assert_eq!(words_addr(&f.nat_addr), shared.ip());
        // "weighted" would also start with 198.18.1.2: it takes the other backend instead.
        test_run(&mut dp, &Pkt::new(L4::Syn, client, weighted).bytes()).unwrap();
        let (f, _) = tcp_entries(&dp, client, weighted);
        assert_eq!(words_addr(&f.nat_addr), v4("198.18.1.3"));
        // "solo" has nowhere else to go: refused and counted, never hijacking.
        let before = counts(&dp);
        let out = test_run(&mut dp, &Pkt::new(L4::Syn, client, solo).bytes()).unwrap();
        assert_eq!(out.verdict, Verdict::Drop);
        assert_eq!(
            moved(&before, &counts(&dp)),
            [(Reason::DropReplyCollision, 1)]
        );
        // Every reply still goes back as its own VIP.
        let synack = Pkt::new(L4::SynAck, shared, client).bytes();
        let out = test_run(&mut dp, &synack).unwrap();
        assert_eq!(out.verdict, Verdict::Redirect);
        assert_eq!(out.packet[26..30], [198, 19, 0, 1], "the reply is web's");
        // Once web's connection is over, solo may have the 4-tuple.
        test_run(&mut dp, &Pkt::new(L4::FinAck, client, web).bytes()).unwrap();
        test_run(&mut dp, &Pkt::new(L4::FinAck, shared, client).bytes()).unwrap();
        let out = test_run(&mut dp, &Pkt::new(L4::Syn, client, solo).bytes()).unwrap();
        assert_eq!(out.verdict, Verdict::Redirect);
        let out = test_run(&mut dp, &synack).unwrap();
        assert_eq!(
            out.packet[26..30],
            [198, 19, 0, 5],
            "now the reply is solo's"
        );
    })
    .expect("shared backends");
}

/// A bpffs mounted for one test, unmounted (unpinning everything in it) when dropped.
struct Bpffs(std::path::PathBuf);

impl Bpffs {
    fn mount(tag: &str) -> Bpffs {
        let dir = std::env::temp_dir().join(format!("orcht-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        nix::mount::mount(
            Some("bpf"),
            &dir,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mounting a bpffs");
        Bpffs(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn possible_cpus() -> usize {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    s.trim()
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

#[test]
fn an_upgrade_carries_connections_and_counters_from_the_previous_layout() {
    use orch_common::maps::v1;
    use orch_tests::oldmaps::{bytes_of, OldMap, BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY};
    if !require_root("an_upgrade_carries_connections_and_counters_from_the_previous_layout") {
        return;
    }
    let fs = Bpffs::mount("upgrade");
    let pin_dir = fs.0.join("orch");
    let maps = pin_dir.join("maps");
    std::fs::create_dir_all(&maps).unwrap();

    // What the previous release left: an established connection (client -> web, on
    // 198.18.1.3) in its connection table, and some verdict counts.
    let client = sa("198.18.0.2:48000");
    let vip = sa("198.19.0.1:80");
    let backend = sa("198.18.1.3:8080");
    let forward = tcp_key(client, vip);
    let reply = forward.reply(addr_words(backend.ip()), backend.port().to_be());
    let old_forward = v1::FlowValue {
        nat_addr: addr_words(backend.ip()),
        nat_port_be: backend.port().to_be(),
        backend_id: 1,
        service_id: 0,
        last_seen_ns: orch::dataplane::monotonic_ns(),
        ..Default::default()
    };
    let old_reply = v1::FlowValue {
        nat_addr: addr_words(vip.ip()),
        nat_port_be: vip.port().to_be(),
        seen: SEEN_SYNACK,
        ..old_forward
    };
    let ct = OldMap::create(
        &maps.join(orch_common::maps::CONNTRACK_MAP_V1),
        BPF_MAP_TYPE_LRU_HASH,
        40,
        40,
        1024,
    )
    .unwrap();
    ct.update(&bytes_of(&forward), &bytes_of(&old_forward))
        .unwrap();
    ct.update(&bytes_of(&reply), &bytes_of(&old_reply)).unwrap();
    let stats = OldMap::create(
        &maps.join(orch_common::maps::STATS_MAPS_BEFORE[0]),
        BPF_MAP_TYPE_PERCPU_ARRAY,
        4,
        8,
        15,
    )
    .unwrap();
    let cpus = possible_cpus();
    let per_cpu = |v: u64| -> Vec<u8> { (0..cpus).flat_map(|_| v.to_ne_bytes()).collect() };
    assert_eq!(stats.value_size(), 8);
    stats
        .update(&(Reason::FwdRedirect as u32).to_ne_bytes(), &per_cpu(1000))
        .unwrap();
    // Its passive signals (layout 1: without the SYN times): backend 1 refused 7 SYNs.
    let signals = OldMap::create(
        &maps.join(orch_common::maps::BACKEND_SIGNALS_MAP_V1),
        BPF_MAP_TYPE_PERCPU_ARRAY,
        4,
        96,
        Capacity::default().max_backends,
    )
    .unwrap();
    let old_signals = v1::BackendSignals {
        refused: 7,
        ..Default::default()
    };
    let per_cpu_signals: Vec<u8> = (0..cpus).flat_map(|_| bytes_of(&old_signals)).collect();
    signals
        .update(&1u32.to_ne_bytes(), &per_cpu_signals)
        .unwrap();
    drop((ct, stats, signals));

    let ns = test_netns("upgrade");
    let dir = pin_dir.clone();
    ns.run(move || {
        orch_tests::lab::pin_current_thread(0).unwrap();
        let cap = Capacity::default();
        let mut dp = Dataplane::open(cap, &dir, 0).expect("opening with the old pins");
        allow_redirects(&mut dp);
        dp.set_settings(&default_settings()).unwrap();
        let mut rec = Reconciler::new(cap.max_services, cap.max_backends);
        rec.apply(&mut dp, &services()).unwrap();
        // Before the swap the connection is in the new table already, converted.
        let f = dp
            .reader()
            .flow(&forward)
            .unwrap()
            .expect("the forward entry migrated");
        assert_eq!(f, old_forward.upgrade().upgrade());
        let r = dp
            .reader()
            .flow(&reply)
            .unwrap()
            .expect("the reply entry migrated");
        assert_eq!(r.synack, 1);
        // Its next segments keep their backend: not stray, not re-balanced.
        let data = Pkt::new(L4::Ack, client, vip).payload(b"more");
        let out = test_run(&mut dp, &data.bytes()).unwrap();
        assert_eq!(out.verdict, Verdict::Redirect);
        assert_eq!(
            out.packet,
            data.clone()
                .dnat(backend)
                .routed(LB_BACKEND_MAC, BACKEND3_MAC)
                .bytes()
        );
        let answer = Pkt::new(L4::Ack, backend, client).payload(b"answer");
        let out = test_run(&mut dp, &answer.bytes()).unwrap();
        assert_eq!(out.verdict, Verdict::Redirect, "replies too");
        // After the swap: counters added up, old pins gone.
        let done = dp.migrate(true).unwrap();
        assert!(done.counters);
        assert_eq!(done.retired, 3);
        assert_eq!(
            dp.reader().backend_signals(1).unwrap().refused,
            7 * cpus as u64
        );
        let fwd = counts(&dp)
            .into_iter()
            .find(|(r, _)| *r == Reason::FwdRedirect)
            .unwrap()
            .1;
        assert_eq!(
            fwd,
            1000 * cpus as u64 + 1,
            "old counts plus the new packet"
        );
    })
    .expect("upgrade");
    assert!(!maps.join(orch_common::maps::CONNTRACK_MAP_V1).exists());
    assert!(!maps.join(orch_common::maps::STATS_MAPS_BEFORE[0]).exists());
    assert!(!maps
        .join(orch_common::maps::BACKEND_SIGNALS_MAP_V1)
        .exists());
}

#[test]
fn an_upgrade_from_layout_2_carries_confirmed_and_unconfirmed_connections() {
    use orch_common::maps::{v2, CONNTRACK_MAPS_V2};
    use orch_tests::oldmaps::{bytes_of, OldMap, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH};
    if !require_root("an_upgrade_from_layout_2_carries_confirmed_and_unconfirmed_connections") {
        return;
    }
    let fs = Bpffs::mount("upgrade2");
    let pin_dir = fs.0.join("orch");
    let maps = pin_dir.join("maps");
    std::fs::create_dir_all(&maps).unwrap();

    // The previous release's tables: an established connection (confirmed) and one whose
    // handshake was under way (unconfirmed: the backend answered, the client's ACK is due).
    let vip = sa("198.19.0.1:80");
    let backend = sa("198.18.1.3:8080");
    let now = orch::dataplane::monotonic_ns();
    let entries = move |client: SocketAddr| {
        let forward = tcp_key(client, vip);
        let reply = forward.reply(addr_words(backend.ip()), backend.port().to_be());
        let fwd = v2::FlowValue {
            nat_addr: addr_words(backend.ip()),
            nat_port_be: backend.port().to_be(),
            backend_id: 1,
            service_id: 0,
            syn_next: 1,
            peer_next: 1,
            created_ns: now,
            last_seen_ns: now,
            ..Default::default()
        };
        let rep = v2::FlowValue {
            nat_addr: addr_words(vip.ip()),
            nat_port_be: vip.port().to_be(),
            synack: 1,
            ifindex: nix::net::if_::if_nametoindex("tp0").unwrap_or(0),
            peer_next: 0,
            ..fwd
        };
        [(forward, fwd), (reply, rep)]
    };
    let established = sa("198.18.0.2:48100");
    let opening = sa("198.18.0.2:48101");
    let ns = test_netns("upgrade2");
    let dir = pin_dir.clone();
    ns.run(move || {
        // Made inside the namespace: the reply entries record its backend interface.
        for (name, kind, client) in [
            (CONNTRACK_MAPS_V2[0], BPF_MAP_TYPE_HASH, established),
            (CONNTRACK_MAPS_V2[1], BPF_MAP_TYPE_LRU_HASH, opening),
        ] {
            let map = OldMap::create(&maps.join(name), kind, 40, 64, 1024).unwrap();
            for (k, v) in entries(client) {
                map.update(&bytes_of(&k), &bytes_of(&v)).unwrap();
            }
        }
        orch_tests::lab::pin_current_thread(0).unwrap();
        let cap = Capacity::default();
        let mut dp = Dataplane::open(cap, &dir, 0).expect("opening with the layout-2 pins");
        allow_redirects(&mut dp);
        dp.set_settings(&default_settings()).unwrap();
        let mut rec = Reconciler::new(cap.max_services, cap.max_backends);
        rec.apply(&mut dp, &services()).unwrap();
        for (client, confirmed) in [(established, true), (opening, false)] {
            let [(fk, fv), (rk, rv)] = entries(client);
            let reader = dp.reader();
            for (key, value) in [(fk, fv), (rk, rv)] {
                assert_eq!(
                    reader.flow(&key).unwrap(),
                    Some(value.upgrade()),
                    "{client}"
                );
                assert_eq!(
                    reader.confirmed(&key).unwrap(),
                    confirmed,
                    "{client}: into its own table"
                );
            }
        }
        // Both keep their backend: the established one's data, and the opening one's ACK,
        // which acknowledges the backend's SYN-ACK and confirms it.
        for client in [established, opening] {
            let data = Pkt::new(L4::AckOf(1), client, vip).payload(b"more");
            let out = test_run(&mut dp, &data.bytes()).unwrap();
            assert_eq!(out.verdict, Verdict::Redirect, "{client}");
            assert_eq!(
                out.packet,
                data.clone()
                    .dnat(backend)
                    .routed(LB_BACKEND_MAC, BACKEND3_MAC)
                    .bytes()
            );
        }
        let [(fk, _), _] = entries(opening);
        assert!(dp.reader().confirmed(&fk).unwrap(), "confirmed by its ACK");
        let done = dp.migrate(true).unwrap();
        assert_eq!(done.retired, 2, "both old tables retired");
    })
    .expect("upgrade from layout 2");
    for name in CONNTRACK_MAPS_V2 {
        assert!(!pin_dir.join("maps").join(name).exists());
    }
}

#[test]
fn a_removed_services_connections_stop_and_a_re_added_one_takes_them_back() {
    if !require_root("a_removed_services_connections_stop_and_a_re_added_one_takes_them_back") {
        return;
    }
    let ns = test_netns("removed");
    ns.run(|| {
        let (mut dp, mut rec) = loaded();
        let vip = sa("198.19.0.1:80");
        let client = sa("198.18.0.2:42000");
        let syn = test_run(&mut dp, &Pkt::new(L4::Syn, client, vip).bytes()).unwrap();
        assert_eq!(syn.verdict, Verdict::Redirect);
        let backend = sa("198.18.1.2:8080");
        assert_eq!(&syn.packet[30..34], &[198, 18, 1, 2]);
        let synack = Pkt::new(L4::SynAck, backend, client).bytes();
        assert_eq!(
            test_run(&mut dp, &synack).unwrap().verdict,
            Verdict::Redirect
        );
        let data = Pkt::new(L4::AckOf(1), client, vip).payload(b"get");
        let forwarded = data
            .clone()
            .dnat(backend)
            .routed(LB_BACKEND_MAC, BACKEND2_MAC)
            .bytes();
        let out = test_run(&mut dp, &data.bytes()).unwrap();
        assert_eq!((out.verdict, &out.packet), (Verdict::Redirect, &forwarded));
        let (fwd, _) = tcp_entries(&dp, client, vip);
        assert_ne!(
            fwd.service_gen, 0,
            "the connection records its service's incarnation"
        );

        // The service goes: its connection's packets are not forwarded any more, as if the
        // connection table were not consulted first.
        // A second connection, its SYN not yet answered.
        let waiting = sa("198.18.0.2:42001");
        let syn2 = Pkt::new(L4::Syn, waiting, vip).bytes();
        assert_eq!(test_run(&mut dp, &syn2).unwrap().verdict, Verdict::Redirect);
        let (pending, _) = tcp_entries(&dp, waiting, vip);
        let retrans = |dp: &Dataplane| {
            dp.reader()
                .backend_signals(pending.backend_id)
                .unwrap()
                .syn_retrans
        };
        let retrans_before = retrans(&dp);
        let without: Vec<Service> = services().into_iter().filter(|s| s.name != "web").collect();
        rec.apply(&mut dp, &without).unwrap();
        let before = counts(&dp);
        let out = test_run(&mut dp, &data.bytes()).unwrap();
        assert_eq!((out.verdict, &out.packet), (Verdict::Pass, &data.bytes()));
        // The retransmitted SYN of the other one: passed, and its entry left alone, so no
        // backend's signals move (its id may be another backend's by now).
        let out = test_run(&mut dp, &syn2).unwrap();
        assert_eq!((out.verdict, &out.packet), (Verdict::Pass, &syn2));
        assert_eq!(
            moved(&before, &counts(&dp)),
            vec![(Reason::PassNotService, 2)]
        );
        assert_eq!(
            retrans(&dp),
            retrans_before,
            "no signal from a removed service"
        );

        // Back under another id and incarnation: the connection, still in the table, goes
        // to its backend again (found through the service table).
        rec.apply(&mut dp, &services()).unwrap();
        let out = test_run(&mut dp, &data.bytes()).unwrap();
        assert_eq!((out.verdict, &out.packet), (Verdict::Redirect, &forwarded));
    })
    .expect("removed service");
}

#[test]
fn a_service_incarnation_is_never_given_twice_across_restarts() {
    if !require_root("a_service_incarnation_is_never_given_twice_across_restarts") {
        return;
    }
    let fs = Bpffs::mount("incarnation");
    let pin_dir = fs.0.join("orch");
    let ns = test_netns("incarnation");
    ns.run(move || {
        orch_tests::lab::pin_current_thread(0).unwrap();
        let cap = Capacity::default();
        let vip = sa("198.19.0.1:80");
        let client = sa("198.18.0.2:43000");
        let data = Pkt::new(L4::AckOf(1), client, vip).payload(b"get");
        {
            let mut dp = Dataplane::open(cap, &pin_dir, 0).unwrap();
            allow_redirects(&mut dp);
            dp.set_settings(&default_settings()).unwrap();
            let mut rec = Reconciler::new(cap.max_services, cap.max_backends);
            rec.apply(&mut dp, &services()).unwrap();
            assert_eq!(rec.service_id(&services()[0].addr), Some(0), "web's id");
            let syn = Pkt::new(L4::Syn, client, vip).bytes();
            assert_eq!(test_run(&mut dp, &syn).unwrap().verdict, Verdict::Redirect);
            let synack = Pkt::new(L4::SynAck, sa("198.18.1.2:8080"), client).bytes();
            assert_eq!(
                test_run(&mut dp, &synack).unwrap().verdict,
                Verdict::Redirect
            );
            assert_eq!(
                test_run(&mut dp, &data.bytes()).unwrap().verdict,
                Verdict::Redirect
            );
            // Every service goes; the connection stays in the table.
            rec.apply(&mut dp, &[]).unwrap();
        }
        let web_id = 0;
        // The next daemon installs another service, which may well get the freed id: it
        // must not get the old incarnation with it, or the old connection would be
        // forwarded without its service.
        let mut dp = Dataplane::open(cap, &pin_dir, 0).unwrap();
        allow_redirects(&mut dp);
        dp.set_settings(&default_settings()).unwrap();
        let mut rec = Reconciler::new(cap.max_services, cap.max_backends);
        let other: Vec<Service> = services()
            .into_iter()
            .filter(|s| s.name == "weighted")
            .collect();
        rec.apply(&mut dp, &other).unwrap();
        assert_eq!(
            rec.service_id(&other[0].addr),
            Some(web_id),
            "the premise: the new service has the old one's id"
        );
        let out = test_run(&mut dp, &data.bytes()).unwrap();
        assert_eq!((out.verdict, &out.packet), (Verdict::Pass, &data.bytes()));
        dp.remove_pins();
    })
    .expect("incarnations across restarts");
}

/// The MAC of `mac` as `ip` writes it.
fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Runs `ip -n ns args` (`args` split at spaces), panicking with the command if it fails.
fn ip_in(ns: &str, args: &str) {
    let mut all = vec!["-n", ns];
    all.extend(args.split(' '));
    orch_tests::netns::run("ip", &all).unwrap_or_else(|e| panic!("ip {args}: {e}"));
}

/// Settings under which only the route generation refreshes cached next hops: a touch
/// interval of ten minutes, longer than any test.
fn generation_only(dp: &mut Dataplane) {
    let mut s = default_settings();
    s.touch_interval_ns = 600_000_000_000;
    dp.set_settings(&s).unwrap();
}

#[test]
fn a_cached_next_hop_follows_neighbour_and_route_changes() {
    if !require_root("a_cached_next_hop_follows_neighbour_and_route_changes") {
        return;
    }
    let ns = test_netns("hop");
    let name = ns.name().to_owned();
    ns.run(move || {
        let ip = |args: &str| ip_in(&name, args);
        let (mut dp, _rec) = loaded();
        generation_only(&mut dp);
        let vip = sa("198.19.0.1:80");
        let client = sa("198.18.0.2:41000");
        let syn = test_run(&mut dp, &Pkt::new(L4::Syn, client, vip).bytes()).unwrap();
        assert_eq!(syn.verdict, Verdict::Redirect);
        let backend = sa("198.18.1.2:8080");
        assert_eq!(&syn.packet[30..34], &[198, 18, 1, 2], "the first backend");
        let synack = Pkt::new(L4::SynAck, backend, client);
        assert_eq!(
            test_run(&mut dp, &synack.bytes()).unwrap().verdict,
            Verdict::Redirect
        );
        let data = Pkt::new(L4::AckOf(1), client, vip).payload(b"get");
        let to = |dp: &mut Dataplane| {
            let out = test_run(dp, &data.bytes()).unwrap();
            assert_eq!(out.verdict, Verdict::Redirect);
            <[u8; 6]>::try_from(&out.packet[0..6]).unwrap()
        };
        assert_eq!(to(&mut dp), BACKEND2_MAC, "the neighbour's MAC, now cached");

        // The backend's MAC changes (its container came back with a new one). Nothing has
        // moved the generation yet: the cached hop is what the program uses.
        let moved_mac = [2, 0, 0, 0, 1, 0x22];
        ip(&format!(
            "neigh replace 198.18.1.2 lladdr {} dev tp0 nud permanent",
            mac_text(moved_mac)
        ));
        assert_eq!(
            to(&mut dp),
            BACKEND2_MAC,
            "cached until the generation moves"
        );

        // The watcher moves it on routing notifications.
        let generation = dp.route_generation();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        {
            let _in_runtime = rt.enter();
            orch::dataplane::routes::watch(generation.clone());
        }
        let wait_for_move = |before: u32| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
            while generation.current().unwrap() == before {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the generation did not move"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        // The watcher subscribes asynchronously: repeat the change until it is seen.
        let again = [2, 0, 0, 0, 1, 0x23];
        let before = generation.current().unwrap();
        ip(&format!(
            "neigh replace 198.18.1.2 lladdr {} dev tp0 nud permanent",
            mac_text(again)
        ));
        wait_for_move(before);
        assert_eq!(
            to(&mut dp),
            again,
            "a new neighbour address is used at once"
        );

        // A route change: the backend is now reached through another next hop.
        let before = generation.current().unwrap();
        ip("route add 198.18.1.2/32 via 198.18.1.3 dev tp0");
        wait_for_move(before);
        assert_eq!(to(&mut dp), BACKEND3_MAC, "a new route is used at once");
        drop(rt);

        // With no one moving the generation, the program's own bound: each timestamp
        // refresh looks both directions up again. (The coarse clock moves at each tick,
        // every 1 to 10 ms: 20 ms is past the next one.)
        let mut s = default_settings();
        s.touch_interval_ns = 1;
        dp.set_settings(&s).unwrap();
        ip("route del 198.18.1.2/32");
        ip(&format!(
            "neigh replace 198.18.0.2 lladdr {} dev tc0 nud permanent",
            mac_text([2, 0, 0, 0, 0, 0x22])
        ));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(to(&mut dp), again, "the route removed, the neighbour again");
        let answer = Pkt::new(L4::Ack, backend, client).payload(b"answer");
        let out = test_run(&mut dp, &answer.bytes()).unwrap();
        assert_eq!(out.verdict, Verdict::Redirect);
        assert_eq!(
            &out.packet[0..6],
            &[2, 0, 0, 0, 0, 0x22],
            "the reply direction too: the client's new MAC"
        );
    })
    .expect("next hop cache");
}

/// A connection whose packets the FIB cannot forward (here an unreachable route; in
/// practice a backend on the host itself) is sent to the stack without a lookup per packet,
/// and redirected again as soon as the route generation moves.
#[test]
fn a_connection_left_to_the_stack_is_remembered_until_the_routes_change() {
    if !require_root("a_connection_left_to_the_stack_is_remembered_until_the_routes_change") {
        return;
    }
    let ns = test_netns("stackhop");
    let name = ns.name().to_owned();
    ns.run(move || {
        let ip = |args: &str| ip_in(&name, args);
        let (mut dp, _rec) = loaded();
        generation_only(&mut dp);
        let (vip, client) = (sa("198.19.0.1:80"), sa("198.18.0.2:41000"));
        let backend = sa("198.18.1.2:8080");
        ip("route add unreachable 198.18.1.2/32");
        let syn = test_run(&mut dp, &Pkt::new(L4::Syn, client, vip).bytes()).unwrap();
        assert_eq!(&syn.packet[30..34], &[198, 18, 1, 2], "the first backend");
        assert_eq!(syn.verdict, Verdict::Pass, "no route: to the stack");
        let synack = Pkt::new(L4::SynAck, backend, client);
        test_run(&mut dp, &synack.bytes()).unwrap();
        let data = Pkt::new(L4::AckOf(1), client, vip).payload(b"get");
        let send = |dp: &mut Dataplane| {
            let before = counts(dp);
            let out = test_run(dp, &data.bytes()).unwrap();
            assert_eq!(
                &out.packet[30..34],
                &[198, 18, 1, 2],
                "translated either way"
            );
            (out.verdict, moved(&before, &counts(dp)))
        };
        assert_eq!(
            send(&mut dp),
            (Verdict::Pass, vec![(Reason::FwdStack, 1)]),
            "the established packet goes to the stack, counted so"
        );

        // The route comes back, and nothing moves the generation: the stack decision is
        // what the program uses, so it made no lookup (one would find the route).
        ip("route del unreachable 198.18.1.2/32");
        assert_eq!(
            send(&mut dp),
            (Verdict::Pass, vec![(Reason::FwdStack, 1)]),
            "remembered"
        );

        // The generation moves (the watcher does this on the route notification).
        dp.route_generation().bump().unwrap();
        assert_eq!(
            send(&mut dp),
            (Verdict::Redirect, vec![(Reason::FwdRedirect, 1)]),
            "redirected once the routes changed"
        );
    })
    .expect("stack decision cache");
}

/// A stack decision XDP makes because it cannot send to the egress device holds only up to
/// the length the FIB checked, and TC, which can send there and checks sizes itself, does
/// not take it: the same connection's next packet on TC is redirected.
#[test]
fn tc_does_not_take_a_stack_decision_made_for_xdp_alone() {
    if !require_root("tc_does_not_take_a_stack_decision_made_for_xdp_alone") {
        return;
    }
    let ns = test_netns("xdponly");
    ns.run(move || {
        // The client side only: XDP may not send to the backends' interface.
        let (mut dp, _rec) = loaded_redirecting_to(orch::dataplane::KERNEL_LOG_OFF, &["tc0"]);
        generation_only(&mut dp);
        let (vip, client) = (sa("198.19.0.1:80"), sa("198.18.0.2:41000"));
        test_run(&mut dp, &Pkt::new(L4::Syn, client, vip).bytes()).unwrap();
        let synack = Pkt::new(L4::SynAck, sa("198.18.1.2:8080"), client);
        test_run(&mut dp, &synack.bytes()).unwrap();
        let data = Pkt::new(L4::AckOf(1), client, vip).payload(b"get");
        for _ in 0..2 {
            let before = counts(&dp);
            let out = test_run(&mut dp, &data.bytes()).unwrap();
            assert_eq!(out.verdict, Verdict::Pass, "XDP cannot send to tp0");
            assert_eq!(moved(&before, &counts(&dp)), vec![(Reason::FwdStack, 1)]);
        }
        let ifindex = nix::net::if_::if_nametoindex("tc0").unwrap();
        let (action, out) = dp.test_run_tc(&data.bytes(), ifindex).unwrap();
        assert_eq!(action, 7, "TC redirects (TC_ACT_REDIRECT)");
        assert_eq!(&out[30..34], &[198, 18, 1, 2], "to the backend");
    })
    .expect("hook-specific stack decision");
}

/// A spoofed SYN from the `i`th address of a flood.
fn flood_syn(i: u32, vip: SocketAddr) -> Vec<u8> {
    let src = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(
            198,
            18,
            128 + (i / 250) as u8,
            1 + (i % 250) as u8,
        )),
        1024 + i as u16,
    );
    Pkt::new(L4::Syn, src, vip).bytes()
}

#[test]
fn evictions_are_counted_exactly_in_a_table_adopted_from_a_release_that_did_not_count() {
    let name = "evictions_are_counted_exactly_in_a_table_adopted_from_a_release_that_did_not_count";
    if !require_root(name) {
        return;
    }
    let fs = Bpffs::mount("adopt");
    let pin_dir = fs.0.join("orch");
    let ns = test_netns("adopt");
    ns.run(move || {
        orch_tests::lab::pin_current_thread(0).unwrap();
        let cap = Capacity {
            conntrack_new: 1024,
            ..Capacity::default()
        };
        let vip = sa("198.19.0.1:80");
        // The previous release: 300 handshakes in flight in its unconfirmed table, and no
        // counters for it (its daemon had no such map).
        let mut dp = Dataplane::open(cap, &pin_dir, 0).unwrap();
        allow_redirects(&mut dp);
        dp.set_settings(&default_settings()).unwrap();
        let mut rec = Reconciler::new(cap.max_services, cap.max_backends);
        rec.apply(&mut dp, &services()).unwrap();
        for i in 0..300 {
            test_run(&mut dp, &flood_syn(i, vip)).unwrap();
        }
        drop(dp);
        std::fs::remove_file(pin_dir.join("maps").join(orch_common::maps::CT_NEW_OPS_MAP)).unwrap();

        let mut dp = Dataplane::open(cap, &pin_dir, 0).unwrap();
        allow_redirects(&mut dp);
        dp.set_settings(&default_settings()).unwrap();
        let mut rec = Reconciler::new(cap.max_services, cap.max_backends);
        rec.apply(&mut dp, &services()).unwrap();
        dp.migrate(true).unwrap();
        assert_eq!(dp.reader().unconfirmed_len().unwrap(), Some(600));
        assert_eq!(dp.reader().ct_events().unwrap().evicted, Some(0));
        for i in 300..4396 {
            test_run(&mut dp, &flood_syn(i, vip)).unwrap();
        }
        let present = dp.reader().unconfirmed_keys().unwrap();
        assert_eq!(
            dp.reader().ct_events().unwrap().evicted,
            Some(600 + 2 * 4096 - present),
            "the adopted entries count as entries, their evictions as evictions"
        );
        dp.remove_pins();
    })
    .expect("adopted table");
}

#[test]
fn the_clients_ack_confirms_and_a_syn_flood_cannot_evict_a_confirmed_connection() {
    if !require_root("the_clients_ack_confirms_and_a_syn_flood_cannot_evict_a_confirmed_connection")
    {
        return;
    }
    let ns = test_netns("flood");
    ns.run(|| {
        orch_tests::lab::pin_current_thread(0).unwrap();
        // The smallest unconfirmed table: a flood of four times its size recycles it.
        let cap = Capacity {
            conntrack_new: 1024,
            ..Capacity::default()
        };
        let mut dp = Dataplane::load(cap).expect("loading the data plane");
        allow_redirects(&mut dp);
        let mut rec = Reconciler::new(cap.max_services, cap.max_backends);
        rec.apply(&mut dp, &services()).unwrap();
        let vip = sa("198.19.0.1:80");
        let client = sa("198.18.0.2:49000");
        let fwd = tcp_key(client, vip);
        test_run(&mut dp, &Pkt::new(L4::Syn, client, vip).bytes()).unwrap();
        let (f, _) = tcp_entries(&dp, client, vip);
        let backend = SocketAddr::new(words_addr(&f.nat_addr), u16::from_be(f.nat_port_be));
        let reply = fwd.reply(f.nat_addr, f.nat_port_be);
        assert!(
            !dp.reader().confirmed(&fwd).unwrap(),
            "a SYN alone is unconfirmed"
        );
        test_run(&mut dp, &Pkt::new(L4::SynAck, backend, client).bytes()).unwrap();
        assert_eq!(tcp_entries(&dp, client, vip).0.peer_next, 5001);
        // An ACK that does not acknowledge the SYN-ACK (a blind guess) confirms nothing.
        test_run(&mut dp, &Pkt::new(L4::AckOf(7777), client, vip).bytes()).unwrap();
        assert!(!dp.reader().confirmed(&fwd).unwrap());
        // The client's real ACK does, both entries.
        test_run(&mut dp, &Pkt::new(L4::Ack, client, vip).bytes()).unwrap();
        assert!(dp.reader().confirmed(&fwd).unwrap() && dp.reader().confirmed(&reply).unwrap());
        assert_eq!(dp.reader().ct_events().unwrap().confirmed, 1);
        assert_eq!(dp.reader().ct_events().unwrap().evicted, Some(0));
        let before = dp
            .reader()
            .unconfirmed_len()
            .unwrap()
            .expect("kernel element count");

        // A spoofed SYN flood, four times the unconfirmed table.
        for i in 0..4096u32 {
            let out = test_run(&mut dp, &flood_syn(i, vip)).unwrap();
            assert_eq!(out.verdict, Verdict::Redirect);
        }
        // The size the kernel counts is the size a walk of the keys finds.
        let counted = dp
            .reader()
            .unconfirmed_len()
            .unwrap()
            .expect("kernel element count");
        let keys = dp.reader().unconfirmed_keys().unwrap();
        let census = dp.reader().census(30_000_000_000).unwrap();
        assert!(census.unconfirmed <= 1024, "{}", census.unconfirmed);
        assert_eq!((counted, census.unconfirmed), (keys, keys));
        // Every entry the flood inserted (two per SYN) is in the table or was evicted,
        // and each eviction is counted once: nothing else removed any.
        let evicted = dp
            .reader()
            .ct_events()
            .unwrap()
            .evicted
            .expect("evictions counted");
        assert_eq!(evicted, before + 2 * 4096 - keys, "{before} entries before");
        // The expiry's removals are not evictions.
        let gone = dp
            .expire(
                &orch::dataplane::Timeouts {
                    tcp_idle_ns: u64::MAX,
                    tcp_close_ns: u64::MAX,
                    unconfirmed_ns: 0,
                    udp_idle_ns: u64::MAX,
                },
                100_000,
            )
            .unwrap();
        assert!(gone.removed.iter().sum::<u64>() > 0, "{gone:?}");
        assert_eq!(dp.reader().unconfirmed_len().unwrap(), Some(0));
        assert_eq!(dp.reader().ct_events().unwrap().evicted, Some(evicted));
        // The established connection is where it was, and still translated both ways.
        assert!(dp.reader().confirmed(&fwd).unwrap() && dp.reader().confirmed(&reply).unwrap());
        let data = Pkt::new(L4::Ack, client, vip).payload(b"after the flood");
        let out = test_run(&mut dp, &data.bytes()).unwrap();
        let mac = if backend.ip() == v4("198.18.1.2") {
            BACKEND2_MAC
        } else {
            BACKEND3_MAC
        };
        assert_eq!(
            out.packet,
            data.dnat(backend).routed(LB_BACKEND_MAC, mac).bytes()
        );
        let answer = Pkt::new(L4::Ack, backend, client).payload(b"still here");
        let out = test_run(&mut dp, &answer.bytes()).unwrap();
        assert_eq!(out.verdict, Verdict::Redirect);
        assert_eq!(out.packet[26..30], [198, 19, 0, 1]);

        // UDP: confirmed when the backend answers.
        let q = Pkt::new(L4::Udp, sa("198.18.0.2:50001"), sa("198.19.0.1:53")).payload(b"q");
        test_run(&mut dp, &q.bytes()).unwrap();
        let udp_fwd = FlowKey {
            proto: 17,
            src_port_be: 50001u16.to_be(),
            dst_port_be: 53u16.to_be(),
            ..fwd
        };
        assert!(!dp.reader().confirmed(&udp_fwd).unwrap());
        let a = Pkt::new(L4::Udp, sa("198.18.1.2:5353"), sa("198.18.0.2:50001")).payload(b"a");
        test_run(&mut dp, &a.bytes()).unwrap();
        assert!(dp.reader().confirmed(&udp_fwd).unwrap());
    })
    .expect("confirmation and flood");
}

#[test]
fn expiry_removes_each_kind_of_connection_at_its_own_timeout() {
    use orch::dataplane::{Expiry, Timeouts};
    if !require_root("expiry_removes_each_kind_of_connection_at_its_own_timeout") {
        return;
    }
    let ns = test_netns("expire");
    ns.run(|| {
        let (mut dp, _) = loaded();
        let vip = sa("198.19.0.1:80");
        // A closed connection, an established one, a handshake never completed, a UDP flow.
        let closed = sa("198.18.0.2:49100");
        let established = sa("198.18.0.2:49101");
        let half_open = sa("198.18.0.2:49102");
        for c in [closed, established, half_open] {
            test_run(&mut dp, &Pkt::new(L4::Syn, c, vip).bytes()).unwrap();
        }
        for c in [closed, established] {
            let (f, _) = tcp_entries(&dp, c, vip);
            let b = SocketAddr::new(words_addr(&f.nat_addr), u16::from_be(f.nat_port_be));
            test_run(&mut dp, &Pkt::new(L4::SynAck, b, c).bytes()).unwrap();
            test_run(&mut dp, &Pkt::new(L4::Ack, c, vip).bytes()).unwrap();
        }
        let (f, _) = tcp_entries(&dp, closed, vip);
        let b = SocketAddr::new(words_addr(&f.nat_addr), u16::from_be(f.nat_port_be));
        test_run(&mut dp, &Pkt::new(L4::FinAck, closed, vip).bytes()).unwrap();
        test_run(&mut dp, &Pkt::new(L4::FinAck, b, closed).bytes()).unwrap();
        let q = Pkt::new(L4::Udp, sa("198.18.0.2:50002"), sa("198.19.0.1:53")).payload(b"q");
        test_run(&mut dp, &q.bytes()).unwrap();
        let entries = |dp: &Dataplane| {
            let c = dp.reader().census(u64::MAX).unwrap();
            c.entries + c.unconfirmed
        };
        assert_eq!(entries(&dp), 8);

        let hour = 3_600_000_000_000;
        let mut t = Timeouts {
            tcp_idle_ns: hour,
            tcp_close_ns: hour,
            unconfirmed_ns: hour,
            udp_idle_ns: hour,
        };
        // One step at a time, a single entry per step: the sweep resumes where it stopped
        // and judges every entry within a few passes.
        let sweep = |dp: &mut Dataplane, t: &Timeouts| {
            let mut removed = [0u64; 4];
            for _ in 0..40 {
                let done = dp.expire(t, 1).unwrap();
                for (r, d) in removed.iter_mut().zip(done.removed) {
                    *r += d;
                }
            }
            removed
        };
        assert_eq!(sweep(&mut dp, &t), [0; 4], "nothing is due");
        assert_eq!(entries(&dp), 8);
        std::thread::sleep(std::time::Duration::from_millis(2));

        t.tcp_close_ns = 1_000_000;
        let removed = sweep(&mut dp, &t);
        assert_eq!(removed[Expiry::Closed as usize], 1, "{removed:?}");
        assert_eq!(entries(&dp), 6);
        assert!(dp
            .reader()
            .flow(&tcp_key(established, vip))
            .unwrap()
            .is_some());

        t.unconfirmed_ns = 1_000_000;
        let removed = sweep(&mut dp, &t);
        assert_eq!(removed[Expiry::Unconfirmed as usize], 1, "{removed:?}");
        assert!(dp
            .reader()
            .flow(&tcp_key(half_open, vip))
            .unwrap()
            .is_none());
        assert!(dp
            .reader()
            .flow(&tcp_key(established, vip))
            .unwrap()
            .is_some());

        t.udp_idle_ns = 1_000_000;
        let removed = sweep(&mut dp, &t);
        assert_eq!(removed[Expiry::Idle as usize], 1, "{removed:?}");
        assert_eq!(entries(&dp), 2, "only the established connection is left");

        t.tcp_idle_ns = 1_000_000;
        let removed = sweep(&mut dp, &t);
        assert_eq!(removed[Expiry::Idle as usize], 1, "{removed:?}");
        assert_eq!(entries(&dp), 0);
    })
    .expect("expiry");
}
