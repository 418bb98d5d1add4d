//! The cluster task: connect, (import,) list, announce, watch; writes on the side. All etcd
//! I/O of the daemon is here.

use std::{collections::BTreeMap, future::Future, time::Duration};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, WatchOptions,
};
use tokio::{
    sync::{mpsc, watch},
    time::{sleep_until, Instant},
};
use tracing::{info, warn};

use super::{
    record::{Key, Keys},
    unix_now, Delta, Event, FileClaim, NodeRecord, ServiceRecord, Settings, Write, WriteError,
};
use crate::{
    model::Service,
    registry::{self, Change, RegistryError},
};

/// How long a host's announcement outlives its last renewal.
const LEASE_TTL_SECS: i64 = 10;
/// How often the lease and the announcement are renewed.
const RENEW_EVERY: Duration = Duration::from_secs(3);
/// How often etcd is asked whether it still has a quorum, when nothing else happens.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Keys per page when listing (a page stays well under gRPC's 4 MiB message limit).
const PAGE: i64 = 500;
/// Attempts of one read-modify-write before giving up on a busy key.
const ATTEMPTS: usize = 8;

/// Why a session ended.
enum End {
    /// The daemon is gone.
    Stop,
    /// etcd failed us; reconnect.
    Broken(String),
}

impl From<etcd_client::Error> for End {
    fn from(e: etcd_client::Error) -> End {
        End::Broken(e.to_string())
    }
}

/// What the task carries from one session to the next.
struct State {
    settings: Settings,
    keys: Keys,
    started: u64,
    /// The last revision handed to the daemon; `None`: list before watching.
    revision: Option<i64>,
    import: Vec<Service>,
    /// The member the next connection tries first.
    endpoint: usize,
}

pub(super) async fn run(
    settings: Settings,
    events: mpsc::Sender<Event>,
    mut writes: mpsc::Receiver<Write>,
    mut claims: watch::Receiver<Vec<FileClaim>>,
    import: Vec<Service>,
) {
    let mut st = State {
        keys: Keys::new(&settings.prefix),
        settings,
        started: unix_now(),
        revision: None,
        import,
        endpoint: 0,
    };
    let mut backoff = Duration::from_millis(200);
    let mut reachable = None;
    let mut failing_since: Option<Instant> = None;
    loop {
        let end = session(
            &mut st,
            &events,
            &mut writes,
            &mut claims,
            &mut reachable,
            &mut failing_since,
        )
        .await;
        let error = match end {
            End::Stop => return,
            End::Broken(e) => e,
        };
        // The member this session used may be the one that went away, or an election is
        // under way (about a second): every member is tried again shortly, writes wait, and
        // etcd counts as unreachable only when none has answered for the request timeout.
        if reachable == Some(true) {
            // An outage starts over from the shortest wait.
            backoff = Duration::from_millis(200);
        }
        let since = *failing_since.get_or_insert_with(Instant::now);
        if reachable == Some(true) && since.elapsed() < st.settings.timeout {
            info!(error = %error, "the etcd connection broke; trying every member");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        if reachable != Some(false) {
            warn!(error = %error, endpoints = ?st.settings.endpoints, "etcd is unreachable; serving the last known state, refusing changes");
            reachable = Some(false);
            if events
                .send(Event::Reachable {
                    error: Some(error.clone()),
                })
                .await
                .is_err()
            {
                return;
            }
        } else {
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        // Until the next attempt, writes are refused at once rather than left waiting.
        let until = Instant::now() + backoff;
        loop {
            tokio::select! {
                _ = sleep_until(until) => break,
                w = writes.recv() => match w {
                    Some(w) => {
                        let _ = w.reply.send(Err(WriteError::Unreachable(error.clone())));
                    }
                    None => return,
                },
            }
        }
    }
}

/// One connection's life: returns when it breaks.
async fn session(
    st: &mut State,
    events: &mpsc::Sender<Event>,
    writes: &mut mpsc::Receiver<Write>,
    claims: &mut watch::Receiver<Vec<FileClaim>>,
    reachable: &mut Option<bool>,
    failing_since: &mut Option<Instant>,
) -> End {
    let timeout = st.settings.timeout;
    let mut client = match connect(&st.settings, &st.keys, &mut st.endpoint).await {
        Ok(c) => c,
        Err(e) => return End::Broken(e),
    };
    while let Some(svc) = st.import.first().cloned() {
        match write(
            &mut client,
            &st.keys,
            &Change::AddService(svc.clone()),
            timeout,
        )
        .await
        {
            Ok(rev) => {
                info!(service = %svc.name, revision = rev, "registered service imported into the cluster")
            }
            Err(WriteError::Refused(e)) => {
                warn!(service = %svc.name, error = %e, "registered service not imported into the cluster: the cluster's one stays")
            }
            Err(e) => return End::Broken(e.to_string()),
        }
        st.import.remove(0);
    }
    let revision = match st.revision {
        Some(r) => r,
        None => {
            let reset = match list(&mut client, &st.keys, timeout).await {
                Ok(r) => r,
                Err(e) => return e,
            };
            let Event::Reset { revision, .. } = &reset else {
                unreachable!("list makes a reset")
            };
            let revision = *revision;
            if events.send(reset).await.is_err() {
                return End::Stop;
            }
            st.revision = Some(revision);
            revision
        }
    };
    let node_key = st.keys.node(&st.settings.node);
    let lease = match within(timeout, client.lease_grant(LEASE_TTL_SECS, None)).await {
        Ok(l) => l.id(),
        Err(e) => return e,
    };
    let announce = |client: &mut Client| {
        let record = NodeRecord {
            address: st.settings.address,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started: st.started,
            seen: unix_now(),
        };
        let value = serde_json::to_vec(&record).expect("a record always serialises");
        let mut client = client.clone();
        let key = node_key.clone();
        async move {
            within(
                timeout,
                client.put(key, value, Some(PutOptions::new().with_lease(lease))),
            )
            .await
            .map(|_| ())
        }
    };
    if let Err(e) = announce(&mut client).await {
        return e;
    }
    let (mut keeper, mut kept) = match within(timeout, client.lease_keep_alive(lease)).await {
        Ok(k) => k,
        Err(e) => return e,
    };
    let files_key = st.keys.files(&st.settings.node);
    let publish = |client: &mut Client, claims: &[FileClaim]| {
        let value = serde_json::to_vec(claims).expect("claims always serialise");
        let mut client = client.clone();
        let key = files_key.clone();
        async move {
            within(timeout, client.put(key, value, None))
                .await
                .map(|_| ())
        }
    };
    let current = claims.borrow_and_update().clone();
    if let Err(e) = publish(&mut client, &current).await {
        return e;
    }
    let mut stream = match within(
        timeout,
        client.watch(
            st.keys.root(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1)
                    .with_progress_notify(),
            ),
        ),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => return e,
    };
    if *reachable != Some(true) {
        info!(endpoint = %st.settings.endpoints[st.endpoint], revision, node = %st.settings.node, "etcd reachable; watching the cluster's services");
        *reachable = Some(true);
        if events.send(Event::Reachable { error: None }).await.is_err() {
            return End::Stop;
        }
    }
    let mut probe = tokio::time::interval(PROBE_EVERY);
    let mut renew = tokio::time::interval(RENEW_EVERY);
    *failing_since = None;
    loop {
        tokio::select! {
            message = stream.message() => {
                let response = match message {
                    Ok(Some(r)) => r,
                    Ok(None) => return End::Broken("etcd closed the watch".into()),
                    Err(e) => return e.into(),
                };
                if response.canceled() {
                    if response.compact_revision() > 0 {
                        // The history since our revision is gone: list afresh.
                        info!(revision = st.revision, compacted = response.compact_revision(), "the watch's revision was compacted; listing again");
                        st.revision = None;
                        return End::Broken("the watch's revision was compacted".into());
                    }
                    return End::Broken(format!("etcd cancelled the watch: {}", response.cancel_reason()));
                }
                let (deltas, upto) = deltas(&st.keys, response.events());
                if deltas.is_empty() {
                    continue;
                }
                st.revision = Some(upto);
                if events.send(Event::Changes { revision: upto, deltas }).await.is_err() {
                    return End::Stop;
                }
            }
            w = writes.recv() => {
                let Some(w) = w else { return End::Stop };
                let (mut client, keys) = (client.clone(), st.keys.clone());
                tokio::spawn(async move {
                    // Retries included, a write ends within a few requests' time.
                    let limit = timeout * 4;
                    let result = tokio::time::timeout(limit, write(&mut client, &keys, &w.change, timeout))
                        .await
                        .unwrap_or(Err(WriteError::Unconfirmed(limit)));
                    let _ = w.reply.send(result);
                });
            }
            changed = claims.changed() => {
                if changed.is_err() {
                    return End::Stop;
                }
                let current = claims.borrow_and_update().clone();
                if let Err(e) = publish(&mut client, &current).await {
                    return e;
                }
            }
            _ = probe.tick() => {
                // A linearizable read: answered only by a quorum, as writes are.
                if let Err(e) = within(timeout, client.get(
                    st.keys.root(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )).await {
                    return e;
                }
            }
            _ = renew.tick() => {
                if let Err(e) = within(timeout, keeper.keep_alive()).await {
                    return e;
                }
                if let Err(e) = announce(&mut client).await {
                    return e;
                }
            }
            kept = kept.message() => match kept {
                Ok(Some(r)) if r.ttl() <= 0 => return End::Broken("this host's lease expired".into()),
                Ok(Some(_)) => {}
                Ok(None) => return End::Broken("etcd closed the lease stream".into()),
                Err(e) => return e.into(),
            },
        }
    }
}

/// A client of one member that is part of a quorum: the members are tried in turn from
/// `next` (which is left at the one that answered), each given the timeout. One member at
/// a time, rather than a channel balanced over all: a request balanced onto a member that
/// died fails, and would make the whole cluster look unreachable.
async fn connect(settings: &Settings, keys: &Keys, next: &mut usize) -> Result<Client, String> {
    let mut errors = Vec::new();
    for _ in 0..settings.endpoints.len() {
        *next %= settings.endpoints.len();
        let endpoint = &settings.endpoints[*next];
        match connect_one(settings, endpoint).await {
            Ok(mut client) => {
                match within(
                    settings.timeout,
                    client.get(
                        keys.root(),
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    ),
                )
                .await
                {
                    Ok(_) => return Ok(client),
                    Err(End::Broken(e)) => errors.push(format!("{endpoint}: {e}")),
                    Err(End::Stop) => {}
                }
            }
            Err(e) => errors.push(format!("{endpoint}: {e}")),
        }
        *next += 1;
    }
    Err(errors.join("; "))
}

/// A client of `endpoint`.
async fn connect_one(settings: &Settings, endpoint: &str) -> Result<Client, String> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(settings.timeout)
        .with_keep_alive(Duration::from_secs(2), settings.timeout)
        // A member cut off from the others refuses instead of serving a stale view.
        .with_require_leader(true);
    if let Some(tls) = &settings.tls {
        options = options.with_tls(tls_options(tls)?);
    }
    match tokio::time::timeout(settings.timeout, Client::connect([endpoint], Some(options))).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no endpoint answered within {:?}",
            settings.timeout
        )),
    }
}

fn tls_options(tls: &super::Tls) -> Result<etcd_client::TlsOptions, String> {
    let read =
        |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let mut options = etcd_client::TlsOptions::new();
    if let Some(ca) = &tls.ca {
        options = options.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
    }
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        options = options.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(options)
}

/// `call` within `limit`, its failure as a broken session.
async fn within<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, End> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(End::Broken(format!("etcd did not answer within {limit:?}"))),
    }
}

fn unreachable_write(e: End) -> WriteError {
    match e {
        End::Broken(e) => WriteError::Unreachable(e),
        End::Stop => WriteError::Unreachable("the cluster task stopped".into()),
    }
}

/// Everything under the prefix, page by page at one revision.
async fn list(client: &mut Client, keys: &Keys, timeout: Duration) -> Result<Event, End> {
    let end = prefix_end(keys.root());
    let mut from = keys.root().as_bytes().to_vec();
    let mut revision = 0;
    let (mut services, mut nodes, mut files) = (Vec::new(), BTreeMap::new(), BTreeMap::new());
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let page = within(timeout, client.get(from.clone(), Some(options))).await?;
        if revision == 0 {
            revision = page.header().map_or(0, |h| h.revision());
        }
        for kv in page.kvs() {
            match parse(keys, kv) {
                Some(Delta::Service(_, Some(s))) => services.push(s),
                Some(Delta::Node(n, Some(r))) => {
                    nodes.insert(n, r);
                }
                Some(Delta::Files(n, Some(c))) => {
                    files.insert(n, c);
                }
                _ => {}
            }
        }
        match page.kvs().last() {
            Some(last) if page.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    Ok(Event::Reset {
        revision,
        services,
        nodes,
        files,
    })
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// What a stored key-value says; `None` for keys left alone and records that do not
/// decode (logged: someone wrote them by hand, or a newer orch changed the layout).
fn parse(keys: &Keys, kv: &KeyValue) -> Option<Delta> {
    let undecodable = |what: &str, e: &dyn std::fmt::Display| {
        warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "ignoring an undecodable {what} record");
    };
    match keys.parse(kv.key())? {
        Key::Service(name) => match ServiceRecord::decode(&name, kv.value()) {
            Ok(s) => Some(Delta::Service(name, Some(s))),
            Err(e) => {
                undecodable("service", &e);
                None
            }
        },
        Key::Node(name) => match serde_json::from_slice(kv.value()) {
            Ok(r) => Some(Delta::Node(name, Some(r))),
            Err(e) => {
                undecodable("node", &e);
                None
            }
        },
        Key::Files(name) => match serde_json::from_slice(kv.value()) {
            Ok(c) => Some(Delta::Files(name, Some(c))),
            Err(e) => {
                undecodable("file claims", &e);
                None
            }
        },
        Key::Address => None,
    }
}

/// A watch response's events as deltas, and the revision they reach.
fn deltas(keys: &Keys, events: &[etcd_client::Event]) -> (Vec<Delta>, i64) {
    let mut out = Vec::new();
    let mut upto = 0;
    for event in events {
        let Some(kv) = event.kv() else { continue };
        upto = upto.max(kv.mod_revision());
        match event.event_type() {
            EventType::Put => out.extend(parse(keys, kv)),
            EventType::Delete => match keys.parse(kv.key()) {
                Some(Key::Service(n)) => out.push(Delta::Service(n, None)),
                Some(Key::Node(n)) => out.push(Delta::Node(n, None)),
                Some(Key::Files(n)) => out.push(Delta::Files(n, None)),
                Some(Key::Address) | None => {}
            },
        }
    }
    (out, upto)
}

/// Commits `change`: read, apply, compare-and-set; again on a lost race, and on transient
/// errors (a leader election fails requests for about a second) until `timeout` twice over.
/// A transaction whose outcome is unknown (sent, then an error) is recognised on the next
/// read: if the key already holds what it wrote, it was applied.
async fn write(
    client: &mut Client,
    keys: &Keys,
    change: &Change,
    timeout: Duration,
) -> Result<i64, WriteError> {
    let name = change.service().to_owned();
    let key = keys.service(&name);
    let deadline = Instant::now() + timeout * 2;
    // What an unconfirmed transaction would have left under the key (`None`: nothing).
    let mut unconfirmed: Option<Option<Service>> = None;
    let mut raced = 0;
    let mut error = String::new();
    loop {
        if Instant::now() >= deadline {
            return Err(match unconfirmed {
                Some(_) => WriteError::Unconfirmed(timeout * 2),
                None => WriteError::Unreachable(error),
            });
        }
        if !error.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let got = match within(timeout, client.get(key.clone(), None)).await {
            Ok(g) => g,
            Err(e) => {
                error = unreachable_write(e).to_string();
                continue;
            }
        };
        let current = match got.kvs().first() {
            Some(kv) => Some((
                ServiceRecord::decode(&name, kv.value()).map_err(|e| {
                    RegistryError::Corrupt(format!("the cluster's record of {name:?}: {e}"))
                })?,
                kv.mod_revision(),
            )),
            None => None,
        };
        if let Some(wrote) = &unconfirmed {
            if current.as_ref().map(|(s, _)| s) == wrote.as_ref() {
                return Ok(got.header().map_or(0, |h| h.revision()));
            }
        }
        let mut index = BTreeMap::new();
        if let Some((svc, _)) = &current {
            index.insert(name.clone(), svc.clone());
        }
        registry::apply(&mut index, change)?;
        let txn = match (change, &current, index.get(&name)) {
            (Change::AddService(svc), _, _) => {
                let address = keys.address(&svc.addr);
                Txn::new()
                    .when([
                        Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                        Compare::create_revision(address.clone(), CompareOp::Equal, 0),
                    ])
                    .and_then([
                        TxnOp::put(key.clone(), ServiceRecord::encode(svc), None),
                        TxnOp::put(address, name.clone(), None),
                    ])
            }
            (Change::RemoveService { .. }, Some((old, rev)), None) => Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, *rev)])
                .and_then([
                    TxnOp::delete(key.clone(), None),
                    TxnOp::delete(keys.address(&old.addr), None),
                ]),
            (_, Some((_, rev)), Some(next)) => Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, *rev)])
                .and_then([TxnOp::put(key.clone(), ServiceRecord::encode(next), None)]),
            _ => return Err(RegistryError::UnknownService(name).into()),
        };
        let done = match within(timeout, client.txn(txn)).await {
            Ok(r) => r,
            Err(e) => {
                unconfirmed = Some(index.get(&name).cloned());
                error = unreachable_write(e).to_string();
                continue;
            }
        };
        if done.succeeded() {
            return Ok(done.header().map_or(0, |h| h.revision()));
        }
        error.clear();
        raced += 1;
        if raced >= ATTEMPTS {
            return Err(WriteError::Contended(name));
        }
        if let Change::AddService(svc) = change {
            // Lost a race for the name (the next read refuses it) or for the address.
            let owner = within(timeout, client.get(keys.address(&svc.addr), None)).await;
            if let Some(kv) = owner.as_ref().ok().and_then(|o| o.kvs().first()) {
                return Err(RegistryError::Conflict(format!(
                    "{} is already the address of service {:?}",
                    svc.addr,
                    String::from_utf8_lossy(kv.value())
                ))
                .into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_past_the_prefix() {
        assert_eq!(prefix_end("/orch/v1/"), b"/orch/v10".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
