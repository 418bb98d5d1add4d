//! The CLI's side of the admin API: one blocking request and its answer.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{ApiError, Envelope, Outcome, Reply, Request, API_VERSION};

/// How long the CLI waits for the daemon: long enough for a cluster write that rides out an
/// etcd leader election (up to four request timeouts, then 2 s for this host to apply it).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

/// Why the CLI could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the orch daemon at {path} (is it running? is --socket right? are you \
         root or in group orch?)"
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
