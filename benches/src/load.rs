//! A closed-loop HTTP load generator for what wrk cannot express: each connection picks the
//! next of several targets every time it connects.
//!
//! wrk fixes one address per thread, so a `direct` run with wrk gives each thread one
//! backend for good, while a balancer spreads every thread's connections over all of them.
//! The two then differ in more than the balancer (which server process a client thread
//! keeps waking), and the comparison is unfair to the balancer. Here every path is driven
//! alike: `threads` threads, each a single-threaded tokio runtime with its share of
//! `connections`, each connection moving to the next target whenever it reconnects. With one
//! target (a VIP) that is simply wrk's behaviour.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Context;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::stats;

/// What to run.
#[derive(Clone, Debug)]
pub struct Spec {
    pub targets: Vec<SocketAddr>,
    pub threads: usize,
    pub connections: usize,
    pub duration: Duration,
    /// One request per connection (`Connection: close`) or as many as fit (keep-alive).
    pub keep_alive: bool,
    /// A request not answered within this counts as an error (wrk's `--timeout`).
    pub timeout: Duration,
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Latency of every completed request, in microseconds.
    pub latencies_us: Vec<f64>,
}

impl Outcome {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile_us(&self, p: f64) -> f64 {
        stats::percentile(&self.latencies_us, p)
    }
}

/// Runs `spec` from the calling thread's network namespace (and cgroup), which the
/// generator's threads inherit.
pub fn run(spec: &Spec) -> anyhow::Result<Outcome> {
    anyhow::ensure!(
        !spec.targets.is_empty() && spec.threads > 0 && spec.connections >= spec.threads,
        "a load needs targets, threads and at least one connection per thread"
    );
    let started = Instant::now();
    let deadline = started + spec.duration;
    let handles: Vec<_> = (0..spec.threads)
        .map(|t| {
            let spec = spec.clone();
            // Connections t, t + threads, t + 2 * threads, ... belong to thread t.
            let mine: Vec<usize> = (t..spec.connections).step_by(spec.threads).collect();
            std::thread::Builder::new()
                .name(format!("load-{t}"))
                .spawn(move || thread_main(&spec, &mine, deadline))
        })
        .collect::<Result<_, _>>()
        .context("starting the load threads")?;
    let mut total = Outcome::default();
    for h in handles {
        let part = h
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        total.requests += part.requests;
        total.errors += part.errors;
        total.latencies_us.extend(part.latencies_us);
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

fn thread_main(spec: &Spec, connections: &[usize], deadline: Instant) -> anyhow::Result<Outcome> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("a load thread's runtime")?;
    rt.block_on(async {
        let tasks: Vec<_> = connections
            .iter()
            .map(|&c| tokio::spawn(connection(spec.clone(), c, deadline)))
            .collect();
        let mut out = Outcome::default();
        for t in tasks {
            let part = t.await.context("a load task")?;
            out.requests += part.requests;
            out.errors += part.errors;
            out.latencies_us.extend(part.latencies_us);
        }
        Ok(out)
    })
}

/// One client connection's loop until `deadline`: connection `index` starts at target
/// `index` and moves on by one at every reconnect.
async fn connection(spec: Spec, index: usize, deadline: Instant) -> Outcome {
    let request = format!(
        "GET / HTTP/1.1\r\nHost: bench\r\n{}\r\n",
        if spec.keep_alive {
            ""
        } else {
            "Connection: close\r\n"
        }
    );
    let mut out = Outcome::default();
    let mut next = index;
    let mut buf = vec![0u8; 16 * 1024];
    'connections: while Instant::now() < deadline {
        let target = spec.targets[next % spec.targets.len()];
        next += 1;
        let started = Instant::now();
        let mut stream = match tokio::time::timeout(spec.timeout, TcpStream::connect(target)).await
        {
            Ok(Ok(s)) => s,
            _ => {
                out.errors += 1;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let mut began = started;
        loop {
            let answered =
                tokio::time::timeout(spec.timeout, exchange(&mut stream, &request, &mut buf)).await;
            match answered {
                Ok(Ok(())) => {
                    out.requests += 1;
                    out.latencies_us.push(began.elapsed().as_secs_f64() * 1e6);
                }
                _ => {
                    out.errors += 1;
                    continue 'connections;
                }
            }
            if !spec.keep_alive || Instant::now() >= deadline {
                continue 'connections;
            }
            began = Instant::now();
        }
    }
    out
}

/// Sends one request and reads its whole response (headers, then `Content-Length` bytes).
async fn exchange(stream: &mut TcpStream, request: &str, buf: &mut [u8]) -> std::io::Result<()> {
    stream.write_all(request.as_bytes()).await?;
    let mut have = 0;
    loop {
        let n = stream.read(&mut buf[have..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
        if let Some(end) = find(&buf[..have], b"\r\n\r\n") {
            let body = content_length(&buf[..end]).ok_or(std::io::ErrorKind::InvalidData)?;
            let mut left = (end + 4 + body).saturating_sub(have);
            while left > 0 {
                let n = stream.read(buf).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                left = left.saturating_sub(n);
            }
            return Ok(());
        }
        if have == buf.len() {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The `Content-Length` of a response's header block.
fn content_length(head: &[u8]) -> Option<usize> {
    std::str::from_utf8(head).ok()?.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_is_found_in_any_case_and_absent_when_missing() {
        let head = b"HTTP/1.1 200 OK\r\nServer: x\r\ncontent-LENGTH: 12\r\n";
        assert_eq!(content_length(head), Some(12));
        assert_eq!(content_length(b"HTTP/1.1 200 OK\r\nServer: x"), None);
        assert_eq!(find(b"ab\r\n\r\ncd", b"\r\n\r\n"), Some(2));
    }

    #[test]
    fn each_connection_visits_every_target_in_turn() {
        // Three servers on loopback that count their connections.
        use std::{
            io::{Read, Write},
            net::TcpListener,
            sync::{
                atomic::{AtomicU64, Ordering},
                Arc,
            },
        };
        let counts: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::default()).collect();
        let mut targets = Vec::new();
        for count in &counts {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            targets.push(l.local_addr().unwrap());
            let count = count.clone();
            std::thread::spawn(move || {
                for s in l.incoming() {
                    let Ok(mut s) = s else { return };
                    count.fetch_add(1, Ordering::Relaxed);
                    let mut req = [0u8; 512];
                    let _ = s.read(&mut req);
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                }
            });
        }
        let out = run(&Spec {
            targets,
            threads: 1,
            connections: 1,
            duration: Duration::from_millis(300),
            keep_alive: false,
            timeout: Duration::from_secs(2),
        })
        .unwrap();
        assert!(out.requests >= 3 && out.errors == 0, "{out:?}");
        let seen: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let (lo, hi) = (seen.iter().min().unwrap(), seen.iter().max().unwrap());
        assert!(
            hi - lo <= 1,
            "one connection's reconnects go round the targets: {seen:?}"
        );
    }
}
