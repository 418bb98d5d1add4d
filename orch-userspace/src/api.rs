//! The admin API: how the CLI (or a script) talks to the daemon.
//!
//! Transport: a Unix stream socket (default [`DEFAULT_SOCKET`], mode 0660, group `orch` when
//! that group exists). Nothing listens on a network address for control; who may change the
//! load balancer is decided by file permissions. The socket appears at its path only with
//! those permissions (it is bound under a temporary name and renamed into place), and orch
//! never replaces anything at that path but a stale socket. A client has [`READ_TIMEOUT`]
//! to send its request and [`MAX_CONNECTIONS`] may be open at once. Every change is logged
//! with the requester's uid and pid (`SO_PEERCRED`).
//!
//! Protocol, version [`API_VERSION`]: one request per connection. The client writes one line
//! of JSON, `{"api": 1, "op": "...", ...arguments}`, and reads one line back:
//! `{"api": 1, "ok": RESULT}` or `{"api": 1, "error": {"kind": KIND, "message": TEXT}}`.
//! Operations and their arguments are the [`Request`] variants (snake_case `op`), results the
//! [`Reply`] variants. A request with another `api` version is refused with kind
//! `unsupported_version`; fields are only ever added within a version.
//!
//! Example:
//! ```text
//! -> {"api":1,"op":"backend_add","service":"web","address":"198.18.1.2:8080","weight":1}
//! <- {"api":1,"ok":{"done":"backend 198.18.1.2:8080 added to service \"web\""}}
//! ```

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::{mpsc, oneshot},
};
use tracing::{debug, info, warn};

use crate::model::{AdminState, HealthCheck, Protocol};

/// The protocol version this build speaks.
pub const API_VERSION: u32 = 1;
/// Where the daemon listens unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/orch/orch.sock";
/// Longest request line accepted: far above any real request, low enough to bound memory.
const MAX_REQUEST: u64 = 1 << 20;
/// How long a client may take to send its request line.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections open at once; one more is answered "busy" and closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long the CLI waits for the daemon.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A request, as the `op` field names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The daemon's state at a glance.
    Status,
    /// Every service, from the config file and the registry.
    ServiceList,
    /// One service with its backends.
    ServiceShow { name: String },
    /// Registers a service (and optionally its first backends).
    ServiceAdd {
        name: String,
        vip: IpAddr,
        port: u16,
        protocol: Protocol,
        #[serde(default)]
        backends: Vec<BackendSpec>,
        /// The health check; the protocol's default when absent.
        #[serde(default)]
        check: Option<HealthCheck>,
    },
    /// Removes a registered service and its backends.
    ServiceRm { name: String },
    /// Adds a backend to a registered service.
    BackendAdd {
        service: String,
        address: SocketAddr,
        #[serde(default = "default_weight")]
        weight: u32,
    },
    /// Removes a backend from a registered service.
    BackendRm {
        service: String,
        address: SocketAddr,
    },
    /// Sets a backend's admin state (`drain`, `enable`, `disable` in the CLI).
    BackendSetState {
        service: String,
        address: SocketAddr,
        state: AdminState,
    },
    /// The backends of one service, or of all.
    BackendList {
        #[serde(default)]
        service: Option<String>,
    },
    /// Where the data plane steers (or would steer) a flow, and why.
    Explain {
        protocol: Protocol,
        client: SocketAddr,
        vip: SocketAddr,
    },
}

impl Request {
    /// The operation's wire name (`op`).
    pub const fn op(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::ServiceList => "service_list",
            Request::ServiceShow { .. } => "service_show",
            Request::ServiceAdd { .. } => "service_add",
            Request::ServiceRm { .. } => "service_rm",
            Request::BackendAdd { .. } => "backend_add",
            Request::BackendRm { .. } => "backend_rm",
            Request::BackendSetState { .. } => "backend_set_state",
            Request::BackendList { .. } => "backend_list",
            Request::Explain { .. } => "explain",
        }
    }

    /// Whether it changes the load balancer (and so is logged with who asked).
    pub const fn changes(&self) -> bool {
        matches!(
            self,
            Request::ServiceAdd { .. }
                | Request::ServiceRm { .. }
                | Request::BackendAdd { .. }
                | Request::BackendRm { .. }
                | Request::BackendSetState { .. }
        )
    }
}

fn default_weight() -> u32 {
    1
}

/// A backend in a [`Request::ServiceAdd`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub address: SocketAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// A successful result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Status(StatusInfo),
    Services(Vec<ServiceInfo>),
    Service(ServiceInfo),
    Backends(Vec<BackendRow>),
    /// A change was made (or there was nothing to change); the text says what.
    Done(String),
    Explain(crate::explain::Explanation),
}

/// Where a service is defined; only its owner may change it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The config file: change it by editing the file.
    File,
    /// The registry: change it with the CLI or this API.
    Registry,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub version: String,
    pub api: u32,
    pub pid: u32,
    pub uptime_secs: u64,
    pub config: PathBuf,
    pub registry: PathBuf,
    pub pin_dir: PathBuf,
    pub interfaces: Vec<String>,
    /// Whether this daemon took over a data plane that was already running.
    pub adopted: bool,
    pub services: usize,
    pub backends: usize,
    pub config_reloads: u64,
    /// Health probes sent since the daemon started.
    pub probes_total: u64,
    pub config_reload_failures: u64,
    /// The last config reload problem, if the last reload failed.
    pub last_reload_error: Option<String>,
    /// Services in panic: too few healthy backends to trust the checks, so they balance
    /// over all their enabled backends.
    #[serde(default)]
    pub services_in_panic: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub source: Source,
    pub check: HealthCheck,
    pub backends: Vec<BackendInfo>,
    /// New connections the data plane steered to this service so far.
    pub connections: u64,
    /// In panic: too few healthy backends to trust the checks, so every enabled backend
    /// takes new connections.
    #[serde(default)]
    pub panic: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendInfo {
    pub address: SocketAddr,
    pub weight: u32,
    pub state: AdminState,
    /// What the health checks say: `healthy`, `unhealthy`, or `unchecked` (no check).
    pub health: String,
    /// The circuit breaker: `closed`, `open` or `half-open`.
    pub breaker: String,
    /// Whether new connections go to it now (active, weight > 0, healthy, breaker closed).
    pub in_rotation: bool,
    /// Live connections to it now, counted from the connection table.
    pub established: u64,
    /// New connections the data plane steered to this backend so far.
    pub connections: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendRow {
    pub service: String,
    #[serde(flatten)]
    pub backend: BackendInfo,
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

/// Classes of failure; all but `Internal` mean the request was refused and nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Malformed or invalid input (bad address, port 0, unknown field...).
    Invalid,
    /// The named service or backend does not exist.
    NotFound,
    /// Clashes with what exists (duplicate name or VIP, owned by the config file).
    Conflict,
    /// Would not fit the data plane's capacity.
    Capacity,
    /// The client speaks another protocol version.
    UnsupportedVersion,
    /// The daemon failed to do something it should have been able to do.
    Internal,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }
}

/// What travels on the wire, both ways: the version plus the body.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope<T> {
    api: u32,
    #[serde(flatten)]
    body: T,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    Ok(Reply),
    Error(ApiError),
}

/// A request on its way to the daemon's main loop, with where to send the answer.
pub type Call = (Request, oneshot::Sender<Result<Reply, ApiError>>);

/// Why the API could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("another orch daemon is already serving {0}")]
    InUse(PathBuf),
    #[error("preparing the admin socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the admin socket: creates its directory, replaces a stale socket file (one nobody
/// listens on), and sets its mode and group.
pub fn bind(path: &Path) -> Result<UnixListener, ApiServerError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |source| ApiServerError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // Not `exists()`, which follows a symlink: what is at the path itself.
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "something that is not a socket is there; orch replaces only its own socket",
            )))
        }
        Ok(_) if UnixStream::connect(path).is_ok() => {
            return Err(ApiServerError::InUse(path.to_owned()))
        }
        _ => {}
    }
    // Bound under a temporary name beside it, given its permissions, then renamed over the
    // path (atomically replacing a stale socket): nobody can connect before the permissions
    // hold.
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let temp = path.with_file_name(format!(
        ".{}.{}.new",
        name.unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&temp);
    let listener = UnixListener::bind(&temp).map_err(err)?;
    let placed = (|| -> std::io::Result<()> {
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o660))?;
        if let Ok(Some(group)) = nix::unistd::Group::from_name("orch") {
            nix::unistd::chown(&temp, None, Some(group.gid))?;
        }
        std::fs::rename(&temp, path)
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&temp);
        return Err(err(e));
    }
    info!(socket = %path.display(), "admin API listening");
    Ok(listener)
}

/// Accepts connections forever, handing each request to the main loop through `calls`.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<Call>) {
    serve_with(listener, calls, READ_TIMEOUT, MAX_CONNECTIONS).await
}

/// [`serve`] with its limits given: how long a request may take to arrive, and how many
/// connections may be open at once.
pub async fn serve_with(
    listener: UnixListener,
    calls: mpsc::Sender<Call>,
    read_timeout: Duration,
    max_connections: usize,
) {
    let open = std::sync::Arc::new(tokio::sync::Semaphore::new(max_connections));
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                let Ok(permit) = open.clone().try_acquire_owned() else {
                    // Answered at once, never queued: a full house must not grow.
                    let busy = ApiError::new(
                        ErrorKind::Internal,
                        format!("too many admin connections open ({max_connections}); try again"),
                    );
                    tokio::spawn(async move {
                        let _ = reply(&mut stream, Err(busy)).await;
                    });
                    continue;
                };
                let calls = calls.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, calls, read_timeout).await {
                        debug!(error = %e, "admin connection ended with an error");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(error = %e, "accepting an admin connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(
    mut stream: tokio::net::UnixStream,
    calls: mpsc::Sender<Call>,
    read_timeout: Duration,
) -> std::io::Result<()> {
    let peer = stream.peer_cred().ok();
    let mut line = String::new();
    let read = {
        let mut reader =
            tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(&mut stream, MAX_REQUEST));
        tokio::time::timeout(read_timeout, reader.read_line(&mut line)).await
    };
    let outcome = match read {
        Err(_) => Err(ApiError::new(
            ErrorKind::Invalid,
            format!("no request line within {read_timeout:?}"),
        )),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) => match decode(&line) {
            Ok(request) => {
                if request.changes() {
                    info!(
                        uid = peer.as_ref().map(|p| p.uid()),
                        pid = peer.as_ref().and_then(|p| p.pid()),
                        request = request.op(),
                        "admin change requested"
                    );
                }
                let (tx, rx) = oneshot::channel();
                if calls.send((request, tx)).await.is_err() {
                    Err(ApiError::new(
                        ErrorKind::Internal,
                        "the daemon is shutting down",
                    ))
                } else {
                    rx.await.unwrap_or_else(|_| {
                        Err(ApiError::new(
                            ErrorKind::Internal,
                            "the daemon dropped the request",
                        ))
                    })
                }
            }
            Err(e) => Err(e),
        },
    };
    reply(&mut stream, outcome).await
}

/// Writes the reply line and closes the writing side.
async fn reply(
    stream: &mut tokio::net::UnixStream,
    outcome: Result<Reply, ApiError>,
) -> std::io::Result<()> {
    let body = match outcome {
        Ok(r) => Outcome::Ok(r),
        Err(e) => Outcome::Error(e),
    };
    let mut out = serde_json::to_vec(&Envelope {
        api: API_VERSION,
        body,
    })
    .map_err(std::io::Error::other)?;
    out.push(b'\n');
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// Parses one request line, checking the version before anything else.
fn decode(line: &str) -> Result<Request, ApiError> {
    let value: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| ApiError::new(ErrorKind::Invalid, format!("request is not JSON: {e}")))?;
    match value.get("api").and_then(|v| v.as_u64()) {
        Some(v) if v == API_VERSION as u64 => {}
        Some(v) => {
            return Err(ApiError::new(
                ErrorKind::UnsupportedVersion,
                format!("this daemon speaks API version {API_VERSION}, the request {v}"),
            ))
        }
        None => {
            return Err(ApiError::new(
                ErrorKind::Invalid,
                format!("the request has no \"api\" version field (expected {API_VERSION})"),
            ))
        }
    }
    let mut object = value;
    if let Some(map) = object.as_object_mut() {
        map.remove("api");
    }
    serde_json::from_value(object)
        .map_err(|e| ApiError::new(ErrorKind::Invalid, format!("invalid request: {e}")))
}

/// Why the CLI could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the orch daemon at {path}: {source} (is it running? is --socket right? \
         are you root or in group orch?)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the orch daemon at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon's answer is not understood: {0}")]
    Protocol(String),
    #[error(transparent)]
    Refused(#[from] ApiError),
}

/// Sends one request to the daemon at `socket` and waits for its answer.
pub fn call(socket: &Path, request: &Request) -> Result<Reply, ClientError> {
    let io = |source| ClientError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_vec(&Envelope {
        api: API_VERSION,
        body: request,
    })
    .map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    let envelope: Envelope<Outcome> = serde_json::from_str(&answer)
        .map_err(|e| ClientError::Protocol(format!("{e}: {answer:?}")))?;
    match envelope.body {
        Outcome::Ok(reply) => Ok(reply),
        Outcome::Error(e) => Err(ClientError::Refused(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `line` (if any) on a new connection to `path` and reads the reply line.
    async fn ask(path: &Path, line: Option<&str>) -> String {
        let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
        if let Some(line) = line {
            s.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        }
        let mut answer = String::new();
        tokio::io::BufReader::new(s)
            .read_line(&mut answer)
            .await
            .unwrap();
        answer
    }

    #[tokio::test]
    async fn the_socket_appears_with_its_permissions_and_replaces_only_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orch.sock");
        // A regular file or a symlink at the path is left alone, and said.
        std::fs::write(&path, "precious").unwrap();
        let e = bind(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &path).unwrap();
        assert!(bind(&path).is_err());
        assert!(std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        std::fs::remove_file(&path).unwrap();
        // A stale socket (nobody listening) is replaced; the new one has mode 0660.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // No temporary name is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("orch.sock")]);
        // And one that is in use is not taken over.
        assert!(matches!(bind(&path), Err(ApiServerError::InUse(_))));
        drop(listener);
    }

    #[tokio::test]
    async fn a_silent_client_is_cut_off_and_a_full_house_answers_busy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orch.sock");
        let listener = bind(&path).unwrap();
        let (calls, mut rx) = mpsc::channel::<Call>(4);
        tokio::spawn(serve_with(listener, calls, Duration::from_millis(300), 2));
        tokio::spawn(async move {
            while let Some((_, reply)) = rx.recv().await {
                let _ = reply.send(Ok(Reply::Done("ok".into())));
            }
        });
        // A client that sends nothing gets an error after the read timeout.
        let started = std::time::Instant::now();
        let answer = ask(&path, None).await;
        assert!(answer.contains("no request line within"), "{answer}");
        assert!(started.elapsed() >= Duration::from_millis(300));
        // Two silent connections fill the house; a third is answered busy at once.
        let _a = tokio::net::UnixStream::connect(&path).await.unwrap();
        let _b = tokio::net::UnixStream::connect(&path).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        let answer = ask(&path, Some(r#"{"api":1,"op":"status"}"#)).await;
        assert!(answer.contains("too many admin connections"), "{answer}");
        assert!(started.elapsed() < Duration::from_millis(250));
        // Once they are gone (cut off by the timeout), requests are served again.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let answer = ask(&path, Some(r#"{"api":1,"op":"status"}"#)).await;
        assert!(answer.contains(r#""ok""#), "{answer}");
    }

    /// A log sink for one test.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_change_is_logged_with_who_asked_and_a_read_is_not() {
        let log = Captured::default();
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orch.sock");
        let listener = bind(&path).unwrap();
        let (calls, mut rx) = mpsc::channel::<Call>(4);
        tokio::spawn(serve(listener, calls));
        tokio::spawn(async move {
            while let Some((_, reply)) = rx.recv().await {
                let _ = reply.send(Ok(Reply::Done("ok".into())));
            }
        });
        ask(&path, Some(r#"{"api":1,"op":"status"}"#)).await;
        ask(&path, Some(r#"{"api":1,"op":"service_rm","name":"web"}"#)).await;
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        let changes: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("admin change requested"))
            .collect();
        assert_eq!(changes.len(), 1, "{text}");
        let uid = nix::unistd::getuid().as_raw();
        assert!(changes[0].contains(&format!("uid={uid}")), "{}", changes[0]);
        assert!(
            changes[0].contains(&format!("pid={}", std::process::id())),
            "{}",
            changes[0]
        );
        assert!(changes[0].contains("service_rm"), "{}", changes[0]);
    }

    #[test]
    fn every_op_name_is_the_wire_name_and_only_changes_are_changes() {
        let reqs = [
            Request::Status,
            Request::ServiceList,
            Request::ServiceShow { name: "w".into() },
            Request::ServiceRm { name: "w".into() },
            Request::BackendRm {
                service: "w".into(),
                address: "198.18.1.2:80".parse().unwrap(),
            },
            Request::BackendList { service: None },
        ];
        for r in &reqs {
            let v = serde_json::to_value(r).unwrap();
            assert_eq!(v["op"], r.op());
        }
        assert!(!Request::Status.changes() && Request::ServiceRm { name: "w".into() }.changes());
    }

    #[test]
    fn requests_round_trip_with_the_documented_shape() {
        let line = r#"{"api":1,"op":"backend_add","service":"web","address":"198.18.1.2:8080","weight":2}"#;
        let req = decode(line).unwrap();
        assert_eq!(
            req,
            Request::BackendAdd {
                service: "web".into(),
                address: "198.18.1.2:8080".parse().unwrap(),
                weight: 2
            }
        );
        let back = serde_json::to_string(&Envelope {
            api: API_VERSION,
            body: &req,
        })
        .unwrap();
        assert_eq!(back, line);
    }

    #[test]
    fn bad_requests_are_named() {
        let cases = [
            ("not json", ErrorKind::Invalid, "not JSON"),
            (r#"{"op":"status"}"#, ErrorKind::Invalid, "no \"api\""),
            (
                r#"{"api":2,"op":"status"}"#,
                ErrorKind::UnsupportedVersion,
                "version 1",
            ),
            (r#"{"api":1,"op":"explode"}"#, ErrorKind::Invalid, "explode"),
            (
                r#"{"api":1,"op":"backend_add","service":"web","address":"198.18.1.2"}"#,
                ErrorKind::Invalid,
                "socket address",
            ),
            (
                r#"{"api":1,"op":"service_show","name":"web","extra":1}"#,
                ErrorKind::Invalid,
                "extra",
            ),
        ];
        for (line, kind, text) in cases {
            let e = decode(line).unwrap_err();
            assert_eq!(e.kind, kind, "{line}: {e}");
            assert!(e.message.contains(text), "{line}: {e}");
        }
    }
}
