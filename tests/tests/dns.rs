//! Service discovery by name, end to end: the daemon's DNS server in the lab, asked from
//! the client's namespace over UDP and TCP, followed by connections through the VIP it
//! names; registrations visible at once; answers too large for UDP truncated and whole over
//! TCP, as a real stub resolver takes them; junk and malformed messages answered or dropped
//! without harm.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, RecordType},
    serialize::binary::BinDecodable,
};
use orch_tests::{
    lab::{self, Lab, Orch},
    privilege::require_root,
    prom,
};

/// Where the daemon answers: the load balancer's address on the client side.
const DNS: &str = "198.18.0.1:53";

fn query(id: u16, name: &str, t: RecordType) -> Message {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    m
}

/// One message over UDP; the answer's bytes, if one came within a second.
fn udp_raw(bytes: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.send_to(bytes, DNS)?;
    let mut buf = [0u8; 4096];
    match s.recv(&mut buf) {
        Ok(n) => Ok(Some(buf[..n].to_vec())),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// One message over UDP; the answer, if one came within a second.
fn udp(bytes: &[u8]) -> std::io::Result<Option<Message>> {
    udp_raw(bytes)?
        .map(|b| Message::from_bytes(&b).map_err(std::io::Error::other))
        .transpose()
}

/// One question over UDP, which must be answered.
fn ask(name: &str, t: RecordType) -> Message {
    let q = query(7, name, t).to_vec().unwrap();
    let answer = udp(&q)
        .unwrap()
        .unwrap_or_else(|| panic!("no answer to {name} {t}"));
    assert_eq!(answer.id(), 7);
    answer
}

/// One question over TCP (RFC 1035 4.2.2: a two-byte length before each message).
fn ask_tcp(name: &str, t: RecordType) -> Message {
    let mut s = TcpStream::connect(DNS).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let q = query(9, name, t).to_vec().unwrap();
    s.write_all(&(q.len() as u16).to_be_bytes()).unwrap();
    s.write_all(&q).unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).unwrap();
    Message::from_bytes(&buf).unwrap()
}

fn addresses(m: &Message) -> Vec<IpAddr> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn start() -> (Lab, Orch) {
    let lab = Lab::new("dns", 3).expect("building the lab");
    let config = format!(
        "{}\n[dns]\nenabled = true\nlisten = \"{DNS}\"\nttl_secs = 7\n",
        lab::demo_config()
    );
    let orch = lab
        .start_orch(&lab::orch_bin(), &config)
        .expect("starting orch");
    (lab, orch)
}

#[test]
fn services_are_found_by_name_and_reached_through_the_vip_it_gives() {
    if !require_root("services_are_found_by_name_and_reached_through_the_vip_it_gives") {
        return;
    }
    let (lab, orch) = start();
    let (web, web6, srv, tcp, nx, refused) = lab
        .client
        .run(|| {
            (
                ask("web.orch.internal.", RecordType::A),
                ask("WEB6.orch.internal.", RecordType::AAAA),
                ask("_dns._udp.orch.internal.", RecordType::SRV),
                ask_tcp("web.orch.internal.", RecordType::A),
                ask("nope.orch.internal.", RecordType::A),
                ask("example.com.", RecordType::A),
            )
        })
        .unwrap();
    assert_eq!(addresses(&web), [IpAddr::V4(lab::VIP4)], "{web:?}");
    assert!(web.authoritative() && !web.recursion_available());
    assert_eq!(web.answers()[0].ttl(), 7);
    assert_eq!(addresses(&web6), [IpAddr::V6(lab::VIP6)], "{web6:?}");
    let RData::SRV(s) = srv.answers()[0].data() else {
        panic!("{srv:?}")
    };
    assert_eq!(
        (s.port(), s.target().to_string().as_str()),
        (53, "dns.orch.internal.")
    );
    assert_eq!(
        addresses(&tcp),
        [IpAddr::V4(lab::VIP4)],
        "over TCP: {tcp:?}"
    );
    assert_eq!(nx.response_code(), ResponseCode::NXDomain);
    assert_eq!(refused.response_code(), ResponseCode::Refused);

    // By name to a backend: resolve, then connect to what it says; round-robin as ever.
    let names: BTreeSet<String> = lab
        .client
        .run(|| {
            (0..6)
                .map(|i| {
                    let vip = addresses(&ask("web.orch.internal.", RecordType::A))[0];
                    lab::tcp_ask(SocketAddr::new(vip, 80), &format!("by name {i}"))
                })
                .collect::<Result<_, _>>()
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("a connection by name failed: {e}\n{}", orch.log()));
    assert_eq!(names.len(), 3, "{names:?}");

    // Registered through the CLI: resolvable as soon as the command returns; removed: gone.
    let out = orch
        .cli(&[
            "service",
            "add",
            "api",
            "198.19.0.2:80",
            "-b",
            "198.18.1.2:8080",
        ])
        .unwrap();
    assert!(out.status.success(), "{}", out.stderr_text());
    let api = lab
        .client
        .run(|| ask("api.orch.internal.", RecordType::A))
        .unwrap();
    assert_eq!(addresses(&api), ["198.19.0.2".parse::<IpAddr>().unwrap()]);
    assert!(orch
        .cli(&["service", "rm", "api"])
        .unwrap()
        .status
        .success());
    let gone = lab
        .client
        .run(|| ask("api.orch.internal.", RecordType::A))
        .unwrap();
    assert_eq!(gone.response_code(), ResponseCode::NXDomain);

    let m = prom::parse(&lab.metrics().unwrap());
    let a_ok = prom::sum(
        &m,
        "orch_dns_queries_total",
        &[("type", "A"), ("rcode", "noerror")],
    )
    .unwrap();
    assert!(a_ok >= 9.0, "A queries answered: {a_ok}");
}

#[test]
fn malformed_and_hostile_messages_harm_nothing() {
    if !require_root("malformed_and_hostile_messages_harm_nothing") {
        return;
    }
    let (lab, orch) = start();
    let ((two, update, response), after) = lab
        .client
        .run(|| {
            // Two questions in one message, an UPDATE, and a response sent as a query.
            let mut two = query(2, "web.orch.internal.", RecordType::A);
            two.add_query(Query::query(
                Name::from_ascii("dns.orch.internal.").unwrap(),
                RecordType::A,
            ));
            let mut update = query(3, "web.orch.internal.", RecordType::A);
            update.set_op_code(OpCode::Update);
            let mut response = query(4, "web.orch.internal.", RecordType::A);
            response.set_message_type(MessageType::Response);
            let verdicts = (
                udp(&two.to_vec().unwrap()).unwrap(),
                udp(&update.to_vec().unwrap()).unwrap(),
                udp(&response.to_vec().unwrap()).unwrap(),
            );
            // Junk: random bytes of random lengths, and a valid query cut short or with a
            // byte flipped.
            let mut rng = 0x2545_f491_4f6c_dd1du64;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let valid = query(1, "web.orch.internal.", RecordType::A)
                .to_vec()
                .unwrap();
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            for i in 0..3_000 {
                let bytes: Vec<u8> = match i % 3 {
                    0 => (0..next() % 600).map(|_| next() as u8).collect(),
                    1 => valid[..(next() as usize % valid.len())].to_vec(),
                    _ => {
                        let mut v = valid.clone();
                        let at = next() as usize % v.len();
                        v[at] ^= next() as u8 | 1;
                        v
                    }
                };
                let _ = s.send_to(&bytes, DNS);
            }
            // Still serving once the junk is read (a few thousand datagrams queue up).
            std::thread::sleep(Duration::from_millis(500));
            (verdicts, ask("web.orch.internal.", RecordType::A))
        })
        .unwrap();
    assert_eq!(
        two.map(|m| m.response_code()),
        Some(ResponseCode::FormErr),
        "two questions"
    );
    assert_eq!(
        update.map(|m| m.response_code()),
        Some(ResponseCode::NotImp),
        "an update"
    );
    assert!(
        response.is_none_or(|m| m.response_code() != ResponseCode::NoError),
        "a response is never answered as a query"
    );
    assert_eq!(addresses(&after), [IpAddr::V4(lab::VIP4)], "{}", orch.log());
    // The daemon is whole: it still serves its API and balances.
    let out = orch.cli(&["status"]).unwrap();
    assert!(out.status.success(), "{}", orch.log());
    let name = lab
        .client
        .run(|| lab::tcp_ask(SocketAddr::new(IpAddr::V4(lab::VIP4), 80), "after"))
        .unwrap()
        .unwrap();
    assert!(name.starts_with("backend-"), "{name}");
}

/// A file removed when dropped, also when the test fails.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn answers_too_large_for_udp_are_truncated_and_whole_over_tcp() {
    if !require_root("answers_too_large_for_udp_are_truncated_and_whole_over_tcp") {
        return;
    }
    let (lab, orch) = start();
    // 100 backends: their A records take 1,600 bytes, more than UDP carries to any client.
    let backends: Vec<IpAddr> = (1..=100).map(|i| IpAddr::from([198, 18, 200, i])).collect();
    let mut args = vec!["service", "add", "big", "198.19.0.5:80", "--check", "none"];
    let flags: Vec<String> = backends.iter().map(|ip| format!("{ip}:80")).collect();
    for b in &flags {
        args.extend(["-b", b]);
    }
    let out = orch.cli(&args).unwrap();
    assert!(out.status.success(), "{}", out.stderr_text());
    let name = "backends.big.orch.internal.";

    let (plain, edns, small_edns, tcp) = lab
        .client
        .run(move || {
            let raw = |m: Message| {
                let bytes = udp_raw(&m.to_vec().unwrap()).unwrap().expect("an answer");
                (Message::from_bytes(&bytes).unwrap(), bytes.len())
            };
            let with_edns = |size: u16| {
                let mut m = query(11, name, RecordType::A);
                m.set_edns(Edns::new().set_max_payload(size).clone());
                raw(m)
            };
            (
                raw(query(10, name, RecordType::A)),
                with_edns(4096),
                with_edns(100),
                ask_tcp(name, RecordType::A),
            )
        })
        .unwrap();
    // Over UDP: the flag, no partial answer, within 512 bytes (no EDNS, or EDNS offering
    // less than 512) or orch's 1232 (whatever larger size the client offers).
    for ((m, len), limit, what) in [
        (&plain, 512, "no EDNS"),
        (&small_edns, 512, "EDNS offering 100 bytes"),
        (&edns, 1232, "EDNS offering 4096 bytes"),
    ] {
        assert!(m.truncated(), "{what}: {:?}", m.header());
        assert_eq!(m.answer_count(), 0, "{what}");
        assert!(*len <= limit, "{what}: {len} bytes");
        assert_eq!(m.response_code(), ResponseCode::NoError, "{what}");
    }
    // Over TCP: every backend.
    assert!(!tcp.truncated());
    assert_eq!(addresses(&tcp), backends, "over TCP");

    // A real stub resolver (glibc's, which sends no EDNS) falls back to TCP by itself: its
    // resolv.conf, bind-mounted in a private mount namespace, names only orch.
    let conf = Scratch(lab.scratch_path("resolv.conf"));
    std::fs::write(
        &conf.0,
        format!("nameserver {}\n", DNS.split(':').next().unwrap()),
    )
    .unwrap();
    let script = format!(
        "mount --bind {} /etc/resolv.conf && exec getent ahostsv4 {name}",
        conf.0.display()
    );
    let out = lab
        .client
        .exec("unshare", &["--mount", "sh", "-c", &script])
        .unwrap_or_else(|e| panic!("getent through orch's DNS: {e}\n{}", orch.log()));
    let resolved: BTreeSet<IpAddr> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(resolved, backends.iter().copied().collect(), "{out}");

    let m = prom::parse(&lab.metrics().unwrap());
    let truncated = prom::sum(&m, "orch_dns_truncated_total", &[]).unwrap();
    assert!(truncated >= 4.0, "answers truncated: {truncated}");
}
