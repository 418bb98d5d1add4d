//! Live connections per backend, counted off the event loop, fresh for whoever asks.
//!
//! Counting means walking the connection table ([`Reader::census`]): milliseconds for a few
//! thousand connections, about a second per million entries. So it never runs on the
//! daemon's loop, and it runs only when asked:
//! - a list, explain or `drain --wait` request waits for a census that *started after it
//!   asked* ([`Censuses::fresh`]): what it reports is never older than the question (a
//!   client that just closed its connections sees them gone);
//! - a scrape takes the census running when it arrives, or starts one
//!   ([`Censuses::current`]): its counts are at most one walk old, and back-to-back
//!   scrapes of a huge table wait one walk, not two.
//!
//! However many ask at once, at most one walk runs and one more is queued.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex,
};

use tokio::sync::watch;
use tracing::warn;

use crate::dataplane::{Census, Reader};

/// One finished census.
#[derive(Clone, Debug, Default)]
struct Done {
    /// Which run it was (0: none yet).
    run: u64,
    /// The counts; empty when the walk failed (said in the log).
    census: Arc<Census>,
}

#[derive(Debug, Default)]
struct Runs {
    /// The last run started.
    started: u64,
    /// A run is going.
    running: bool,
    /// Someone asked while it went: run again when it ends.
    again: bool,
}

/// Schedules censuses and hands out their results.
pub struct Censuses {
    reader: Arc<Reader>,
    /// The UDP idle timeout, which decides whether a UDP flow is live (a reload changes it).
    udp_idle_ns: AtomicU64,
    runs: Mutex<Runs>,
    done: watch::Sender<Done>,
}

impl Censuses {
    pub fn new(reader: Arc<Reader>, udp_idle_ns: u64) -> Arc<Censuses> {
        Arc::new(Censuses {
            reader,
            udp_idle_ns: AtomicU64::new(udp_idle_ns),
            runs: Mutex::new(Runs::default()),
            done: watch::channel(Done::default()).0,
        })
    }

    pub fn set_udp_idle(&self, ns: u64) {
        self.udp_idle_ns.store(ns, Ordering::Relaxed);
    }

    /// A census that started after this call. Runs one on a blocking thread unless one is
    /// already going, in which case the one after it serves.
    pub async fn fresh(self: &Arc<Self>) -> Arc<Census> {
        self.wait(true).await
    }

    /// The census running now, or a new one if none is.
    pub async fn current(self: &Arc<Self>) -> Arc<Census> {
        self.wait(false).await
    }

    async fn wait(self: &Arc<Self>, after_now: bool) -> Arc<Census> {
        let mut done = self.done.subscribe();
        let wanted = {
            let mut runs = self.runs.lock().expect("census lock");
            if runs.running && !after_now {
                runs.started
            } else if runs.running {
                runs.again = true;
                runs.started + 1
            } else {
                runs.running = true;
                runs.started += 1;
                let me = self.clone();
                tokio::task::spawn_blocking(move || me.run());
                runs.started
            }
        };
        // The sender lives as long as `self`: the wait ends with a census.
        let census = match done.wait_for(|d| d.run >= wanted).await {
            Ok(d) => d.census.clone(),
            Err(_) => Arc::default(),
        };
        census
    }

    /// Walks the table until nobody is waiting for another walk.
    fn run(&self) {
        loop {
            let run = self.runs.lock().expect("census lock").started;
            let census = self
                .reader
                .census(self.udp_idle_ns.load(Ordering::Relaxed))
                .unwrap_or_else(|e| {
                    warn!(error = %crate::chain(&e), "counting live connections failed");
                    Census::default()
                });
            self.done.send_replace(Done {
                run,
                census: Arc::new(census),
            });
            let mut runs = self.runs.lock().expect("census lock");
            if std::mem::take(&mut runs.again) {
                runs.started += 1;
            } else {
                runs.running = false;
                return;
            }
        }
    }
}
