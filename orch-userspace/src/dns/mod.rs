//! Service discovery by name: an authoritative DNS server for one domain.
//!
//! `<service>.<domain>` resolves to the service's VIP (`A` or `AAAA`),
//! `_<service>._<tcp|udp>.<domain>` to its port (`SRV`), and `backends.<service>.<domain>`
//! to the addresses of its backends in rotation; other names in the domain are
//! NXDOMAIN, names outside it REFUSED (orch is not a recursive resolver). Answers come from
//! the [`Zone`] the daemon publishes with every change, so a service added through the CLI
//! resolves as soon as the command returns, and a removed one is gone as soon.
//!
//! The server is hickory's, on the daemon's runtime, over UDP and TCP. Limits: one question
//! per message (else FORMERR), queries only (else NOTIMP), a token bucket over all clients
//! (beyond it: REFUSED, counted), an idle timeout on TCP connections, and UDP answers no
//! larger than the client takes (512 bytes, or its EDNS size up to 1232): a larger one goes
//! out empty with the TC flag, and the client asks again over TCP.

mod zone;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Header, Message, MessageType, OpCode, ResponseCode},
    rr::{Name, RecordType},
    xfer::Protocol,
};
use hickory_server::{
    authority::MessageResponseBuilder,
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    ServerFuture,
};
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::watch,
};
use tracing::{debug, info};

pub use zone::{check_domain, is_label, Answer, Rcode, Zone};

use crate::metrics::Metrics;

/// Largest UDP answer offered to EDNS clients: the size that avoids IP fragmentation on
/// every common path (the 2020 DNS flag day's figure).
const EDNS_PAYLOAD: u16 = 1232;

/// How the server runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub listen: SocketAddr,
    pub domain: Name,
    /// Seconds clients may cache an answer.
    pub ttl: u32,
    /// Queries per second over all clients, and the burst allowed.
    pub max_queries_per_sec: u32,
    pub tcp_idle_timeout: Duration,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[error("listening for DNS on {addr}")]
pub struct ListenError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds UDP and TCP on `settings.listen` and serves the zones `zones` publishes until the
/// runtime ends.
pub async fn serve(
    settings: &Settings,
    zones: watch::Receiver<Arc<Zone>>,
    metrics: Arc<Metrics>,
) -> Result<ServerFuture<Handler>, ListenError> {
    let err = |source| ListenError {
        addr: settings.listen,
        source,
    };
    let udp = UdpSocket::bind(settings.listen).await.map_err(err)?;
    let tcp = TcpListener::bind(settings.listen).await.map_err(err)?;
    let mut server = ServerFuture::new(Handler {
        zones,
        metrics,
        bucket: Mutex::new(Bucket::new(settings.max_queries_per_sec)),
    });
    server.register_socket(udp);
    server.register_listener(tcp, settings.tcp_idle_timeout);
    info!(listen = %settings.listen, domain = %settings.domain, "DNS answering for the domain");
    Ok(server)
}

/// Answers each query from the latest zone.
pub struct Handler {
    zones: watch::Receiver<Arc<Zone>>,
    metrics: Arc<Metrics>,
    bucket: Mutex<Bucket>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let mut builder = MessageResponseBuilder::from_message_request(request);
        let refuse = |code: ResponseCode| {
            let mut header = Header::response_from_request(request.header());
            header.set_response_code(code);
            header
        };
        let (header, answer, qtype) =
            if request.op_code() != OpCode::Query || request.message_type() != MessageType::Query {
                (refuse(ResponseCode::NotImp), None, None)
            } else if !self
                .bucket
                .lock()
                .expect("bucket lock")
                .take(Instant::now())
            {
                self.metrics.dns_rate_limited();
                (refuse(ResponseCode::Refused), None, None)
            } else {
                match request.request_info() {
                    // Not exactly one question.
                    Err(_) => (refuse(ResponseCode::FormErr), None, None),
                    Ok(info) => {
                        let qtype = info.query.query_type();
                        let zone = self.zones.borrow().clone();
                        let answer = zone.answer(&Name::from(info.query.name().clone()), qtype);
                        let mut header = Header::response_from_request(request.header());
                        header.set_authoritative(answer.rcode != Rcode::Refused);
                        header.set_recursion_available(false);
                        header.set_response_code(match answer.rcode {
                            Rcode::NoError => ResponseCode::NoError,
                            Rcode::NxDomain => ResponseCode::NXDomain,
                            Rcode::Refused => ResponseCode::Refused,
                        });
                        (header, Some(answer), Some(qtype))
                    }
                }
            };
        self.metrics
            .dns_query(qtype.map_or("none", type_label), header.response_code());
        let edns = request.edns().map(|_| {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            edns
        });
        if let Some(edns) = &edns {
            builder.edns(edns.clone());
        }
        let mut header = header;
        let mut answer = answer.unwrap_or_else(Answer::nothing);
        let too_large = udp_limit(request)
            .is_some_and(|limit| encoded_len(request, &header, &answer, edns.as_ref()) > limit);
        if too_large {
            // RFC 2181, 9: the client sees the flag and asks again over TCP, where the whole
            // answer fits. Part of an answer would be worse than none: a client could take a
            // few backends for all of them. (hickory alone would send a client without EDNS
            // up to 4096 bytes, where RFC 1035 allows 512.)
            header.set_truncated(true);
            answer = Answer::nothing();
            self.metrics.dns_truncated();
        }
        let empty = Vec::new();
        let message = builder.build(
            header,
            answer.answers.iter(),
            empty.iter(),
            answer.authority.iter(),
            answer.additionals.iter(),
        );
        match response.send_response(message).await {
            Ok(info) => info,
            Err(e) => {
                debug!(error = %e, "sending a DNS answer failed");
                ResponseInfo::from(header)
            }
        }
    }
}

/// The largest answer `request`'s client takes over UDP: 512 bytes (RFC 1035), or the size
/// its EDNS option offers, up to [`EDNS_PAYLOAD`]. `None` over TCP, where any answer fits
/// (and is not encoded twice to find out).
fn udp_limit(request: &Request) -> Option<usize> {
    (request.protocol() == Protocol::Udp).then(|| {
        usize::from(
            request
                .edns()
                .map_or(512, |e| e.max_payload().clamp(512, EDNS_PAYLOAD)),
        )
    })
}

/// The size of the answer once encoded, as hickory will encode it (names compressed alike).
fn encoded_len(request: &Request, header: &Header, answer: &Answer, edns: Option<&Edns>) -> usize {
    let mut m = Message::new();
    m.set_header(*header)
        .add_queries(request.queries().iter().map(|q| q.original().clone()))
        .add_answers(answer.answers.iter().cloned())
        .add_name_servers(answer.authority.iter().cloned())
        .add_additionals(answer.additionals.iter().cloned());
    if let Some(edns) = edns {
        m.set_edns(edns.clone());
    }
    m.to_vec().map_or(usize::MAX, |bytes| bytes.len())
}

/// The metrics label of a query type: the types orch answers by name, the rest as `other`
/// (the label's values stay few whatever clients send).
fn type_label(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::SRV => "SRV",
        RecordType::SOA => "SOA",
        RecordType::ANY => "ANY",
        _ => "other",
    }
}

/// A token bucket: `rate` tokens a second, at most `rate` saved.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        Bucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: None,
        }
    }

    /// Takes a token at `now`, if there is one.
    fn take(&mut self, now: Instant) -> bool {
        if let Some(at) = self.at {
            let earned = now.saturating_duration_since(at).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + earned).min(self.rate);
        }
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_its_rate_and_its_burst_and_no_more() {
        let mut b = Bucket::new(10);
        let t0 = Instant::now();
        assert_eq!(
            (0..15).filter(|_| b.take(t0)).count(),
            10,
            "a burst of the rate"
        );
        let half = t0 + Duration::from_millis(500);
        assert_eq!(
            (0..15).filter(|_| b.take(half)).count(),
            5,
            "half a second earns 5"
        );
        let later = half + Duration::from_secs(60);
        assert_eq!(
            (0..15).filter(|_| b.take(later)).count(),
            10,
            "savings are capped"
        );
    }
}
