//! What moves the health verdicts: probe reports, and at each tick what the data plane saw
//! of each backend and the breakers' cool-downs (the tick also steps the expiry). The rules
//! themselves are in [`crate::health::verdict`]; this applies what they ask.

use tokio::time::Instant;
use tracing::warn;

use super::state::{Daemon, SignalTarget};
use crate::{
    dataplane,
    health::{AfterSignals, Outcome, Report},
    model::CheckKind,
};

/// Backends whose kernel signals a tick reads at most (two map lookups each). A fleet up to
/// this size is read every tick (100 ms); a larger one in turns: 10,000 services x 8
/// backends in 16 s. The data plane ejects a refusing backend by itself at once; what waits
/// for the sweep is the daemon's follow-up (a probe, the breaker), not the protection.
const SIGNALS_PER_TICK: usize = 512;

impl Daemon {
    /// Takes one probe result: counts it against the thresholds, feeds the breaker, and
    /// re-balances when the backend enters or leaves rotation.
    pub fn on_report(&mut self, report: Report) {
        self.probes += 1;
        let Some(check) = self
            .sourced()
            .find(|(s, _)| s.name == report.service)
            .map(|(s, _)| s.check.clone())
        else {
            return; // the service went away while the probe ran
        };
        if let Outcome::Up { latency } = &report.outcome {
            self.metrics.probe_latency(&report.service, *latency);
        }
        let after = self.verdicts.on_probe(
            &report.service,
            report.backend,
            &check,
            &report.outcome,
            report.at,
        );
        self.view_stale = true;
        if after.rebalance {
            self.rebalance();
        }
        if after.probe_now {
            self.checker.nudge(&report.service, report.backend);
        }
    }

    /// Reads the data plane's passive signals, takes a step of the expiry, moves open
    /// breakers whose time has come to half-open (probing them at once), and publishes the
    /// view if anything changed.
    pub fn tick(&mut self, now: Instant) {
        self.read_signals(now);
        if now >= self.next_expiry {
            self.next_expiry = now + super::state::EXPIRY_INTERVAL;
            self.expire();
        }
        if now >= self.next_link_check {
            self.sync_interfaces();
        }
        for (service, backend) in self.verdicts.poll(now) {
            self.checker.nudge(&service, backend);
            self.view_stale = true;
        }
        self.publish();
    }

    /// What the kernel saw since the last tick, per backend, judged by
    /// [`crate::health::Verdicts::on_signals`].
    ///
    /// A tick reads at most [`SIGNALS_PER_TICK`] backends, resuming where the last one
    /// stopped, so its cost is bounded whatever the fleet's size.
    fn read_signals(&mut self, now: Instant) {
        let targets = match self.signal_targets.take() {
            Some(t) => t,
            None => self.signal_targets_now(),
        };
        let n = targets.len().min(SIGNALS_PER_TICK);
        let start = if targets.is_empty() {
            0
        } else {
            self.signal_cursor % targets.len()
        };
        self.signal_cursor = start + n;
        let mut changed = false;
        let reader = self.dp.reader().clone();
        for t in targets.iter().cycle().skip(start).take(n) {
            let (Ok(signals), Ok(ejected)) = (reader.backend_signals(t.id), reader.ejected(t.id))
            else {
                continue;
            };
            let after = self.verdicts.on_signals(
                &t.service,
                t.backend,
                signals,
                ejected,
                t.check != CheckKind::None,
                t.timeout_ms,
                dataplane::monotonic_ns(),
                now,
            );
            match after {
                AfterSignals::Nothing => {}
                AfterSignals::Failed { rebalance } => {
                    changed |= rebalance;
                    self.view_stale = true;
                    self.checker.nudge(&t.service, t.backend);
                }
                AfterSignals::ClearEjection => match self.dp.clear_ejection(t.id) {
                    Ok(()) => {
                        if let Some(h) = self.verdicts.get_mut(&t.service, t.backend) {
                            h.ejection_cleared();
                        }
                    }
                    Err(e) => warn!(error = %crate::chain(&e), "clearing an ejection failed"),
                },
                AfterSignals::QuickProbe(limit) => {
                    self.checker.nudge_quick(&t.service, t.backend, limit)
                }
                AfterSignals::ProbeNow => self.checker.nudge(&t.service, t.backend),
                AfterSignals::Vouch => self.checker.vouch(&t.service, t.backend),
            }
        }
        // Put back unless a sync in this tick made them stale.
        if self.signal_targets.is_none() {
            self.signal_targets = Some(targets);
        }
        if changed {
            self.rebalance();
        }
    }

    /// Every backend the kernel keeps signals for, with its id.
    fn signal_targets_now(&self) -> Vec<SignalTarget> {
        let mut targets = Vec::new();
        for svc in self.services() {
            for b in &svc.backends {
                if let Some(id) = self.reconciler.backend_id(&svc.addr, b.addr) {
                    targets.push(SignalTarget {
                        service: svc.name.clone(),
                        check: svc.check.kind,
                        timeout_ms: svc.check.timeout_ms,
                        backend: b.addr,
                        id,
                    });
                }
            }
        }
        targets
    }
}
