//! The `/metrics` endpoint: HTTP/1.1, `GET` and `HEAD` only.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use http_body_util::Full;
use hyper::{body::Bytes, header, Method, Request, Response, StatusCode};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};
use tracing::{debug, info, warn};

/// A scrape on its way to whoever renders it, with where to send the text.
pub type Scrape = oneshot::Sender<String>;

/// Why `/metrics` could not be started.
#[derive(Debug, thiserror::Error)]
#[error("listening for metrics on {addr}")]
pub struct ListenError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError { addr, source })?;
    info!(%addr, "metrics at http://{addr}/metrics");
    Ok(listener)
}

/// Serves `GET /metrics` forever: each scrape asks for the text through `scrapes` (the
/// daemon answers it off its loop). Anything else is refused: the endpoint is read-only.
pub async fn serve(listener: TcpListener, scrapes: mpsc::Sender<Scrape>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, scrapes.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    scrapes: mpsc::Sender<Scrape>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET: the metrics endpoint is read-only\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    match req.uri().path() {
        "/metrics" => {
            let (tx, rx) = oneshot::channel();
            let text = match scrapes.send(tx).await {
                Ok(()) => rx.await.ok(),
                Err(_) => None,
            };
            Ok(match text {
                Some(text) => {
                    let mut r = reply(StatusCode::OK, text);
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    r
                }
                None => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the daemon is shutting down\n".into(),
                ),
            })
        }
        "/" => Ok(reply(StatusCode::OK, "orch: metrics at /metrics\n".into())),
        other => Ok(reply(
            StatusCode::NOT_FOUND,
            format!("no {other} here: metrics are at /metrics\n"),
        )),
    }
}
