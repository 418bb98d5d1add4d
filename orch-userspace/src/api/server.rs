//! The daemon's side of the admin API: the socket, its limits, and the hand-over of each
//! request to the daemon's loop.

use std::{
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::{mpsc, oneshot},
};
use tracing::{debug, info, warn};

use super::{decode, ApiError, Envelope, ErrorKind, Outcome, Reply, Request, API_VERSION};

/// Longest request line accepted: far above any real request, low enough to bound memory.
const MAX_REQUEST: u64 = 1 << 20;
/// How long a client may take to send its request line.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections open at once; one more is answered "busy" and closed at once.
pub const MAX_CONNECTIONS: usize = 64;

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
}
