//! Config reloads, all or nothing.
//!
//! A reload is planned before anything is touched: the file is read and validated, checked
//! against the registry, its services checked against the maps' capacity, and every
//! interface it adds checked for the hook it would get. Only a plan that passes all of it
//! is applied, in steps (the data plane's settings, the services, then each interface to
//! attach and to detach). If a step fails, the steps done are undone in reverse order, so
//! the running state is what it was; if an undo fails too, the error names exactly what is
//! applied and what is not. What the running daemon cannot change (see
//! [`crate::config::Fixed`]) keeps its running value, with a warning.

use orch_common::maps::Settings;
use tracing::{error, info, warn};

use super::state::{desired, release_freed_memory, Daemon};
use crate::{
    config::{Config, ConfigError},
    dataplane::{Dataplane, DataplaneError, Hook},
    model::Service,
    reconcile::{ReconcileError, Summary},
};

/// Why a reload was refused or undone.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the file's services do not fit the data plane")]
    Capacity(#[source] ReconcileError),
    #[error("interface {iface} cannot be attached")]
    Interface {
        iface: String,
        #[source]
        source: Box<DataplaneError>,
    },
    #[error(
        "{step} failed; what was applied before it was undone, the running state is unchanged"
    )]
    RolledBack {
        step: String,
        #[source]
        source: StepError,
    },
    #[error(
        "{step} failed, and undoing {undo} failed too ({undo_error}): applied and still in \
         place: {applied}; not applied: {step} and what follows it"
    )]
    Partial {
        step: String,
        undo: String,
        undo_error: String,
        applied: String,
        #[source]
        source: StepError,
    },
}

/// A step's failure, whatever its kind.
pub type StepError = Box<dyn std::error::Error + Send + Sync>;

/// What a reload changes, worked out before anything is.
pub(super) struct Plan {
    settings: Settings,
    desired: Vec<Service>,
    attach: Vec<(String, Hook)>,
    detach: Vec<(String, Hook)>,
}

/// The state a plan is applied to: the data plane, or a test's fake whose steps fail on
/// demand.
pub(super) trait Target {
    fn set_settings(&mut self, s: &Settings) -> Result<(), StepError>;
    fn set_services(&mut self, desired: &[Service]) -> Result<Summary, StepError>;
    fn attach(&mut self, iface: &str, hook: Hook) -> Result<(), StepError>;
    fn detach(&mut self, iface: &str) -> Result<(), StepError>;
}

/// One step of a plan, with what undoes it.
enum Step<'a> {
    Settings,
    Services,
    Attach(&'a str, Hook),
    Detach(&'a str, Hook),
}

impl Step<'_> {
    fn name(&self) -> String {
        match self {
            Step::Settings => "writing the data plane's settings".into(),
            Step::Services => "installing the services".into(),
            Step::Attach(i, h) => format!("attaching to {i} ({})", h.name()),
            Step::Detach(i, h) => format!("detaching from {i} ({})", h.name()),
        }
    }
}

impl Plan {
    /// Applies the plan to `t`, whose state before it is (`settings`, `desired`); on a
    /// failed step, undoes the steps done.
    pub(super) fn apply<T: Target>(
        &self,
        t: &mut T,
        settings: &Settings,
        desired: &[Service],
    ) -> Result<Summary, ReloadError> {
        let mut steps = vec![Step::Settings, Step::Services];
        steps.extend(self.attach.iter().map(|(i, h)| Step::Attach(i, *h)));
        steps.extend(self.detach.iter().map(|(i, h)| Step::Detach(i, *h)));
        let mut summary = Summary::default();
        for (n, step) in steps.iter().enumerate() {
            let done = match step {
                Step::Settings => t.set_settings(&self.settings),
                Step::Services => t.set_services(&self.desired).map(|s| summary = s),
                Step::Attach(i, h) => t.attach(i, *h),
                Step::Detach(i, _) => t.detach(i),
            };
            let Err(source) = done else { continue };
            // Undo what was done, last first.
            for (k, undo) in steps[..n].iter().enumerate().rev() {
                let undone = match undo {
                    Step::Settings => t.set_settings(settings),
                    Step::Services => t.set_services(desired).map(|_| ()),
                    Step::Attach(i, _) => t.detach(i),
                    Step::Detach(i, h) => t.attach(i, *h),
                };
                if let Err(e) = undone {
                    let names: Vec<String> = steps[..=k].iter().map(Step::name).collect();
                    return Err(ReloadError::Partial {
                        step: step.name(),
                        undo: undo.name(),
                        undo_error: e.to_string(),
                        applied: names.join(", "),
                        source,
                    });
                }
            }
            return Err(ReloadError::RolledBack {
                step: step.name(),
                source,
            });
        }
        Ok(summary)
    }
}

/// The data plane as a reload's target.
struct Live<'a> {
    d: &'a mut Daemon,
}

impl Target for Live<'_> {
    fn set_settings(&mut self, s: &Settings) -> Result<(), StepError> {
        Ok(self.d.dp.set_settings(s)?)
    }
    fn set_services(&mut self, desired: &[Service]) -> Result<Summary, StepError> {
        Ok(self.d.apply(desired)?)
    }
    fn attach(&mut self, iface: &str, hook: Hook) -> Result<(), StepError> {
        Ok(self.d.dp.attach(iface, hook)?)
    }
    fn detach(&mut self, iface: &str) -> Result<(), StepError> {
        Ok(self.d.dp.detach(iface)?)
    }
}

impl Daemon {
    /// Re-reads the config file and applies it as a diff, all or nothing.
    pub fn reload(&mut self, why: &str) {
        match self.try_reload() {
            Ok(summary) => {
                self.reloads += 1;
                self.metrics.config_reload(true);
                self.last_reload_error = None;
                info!(
                    trigger = why,
                    added = summary.added,
                    updated = summary.updated,
                    removed = summary.removed,
                    unchanged = summary.unchanged,
                    "config reloaded"
                );
                self.note_panic();
            }
            Err(e) => {
                self.reload_failures += 1;
                self.metrics.config_reload(false);
                let text = crate::chain(&e);
                error!(trigger = why, "config reload failed:\n{text}");
                self.last_reload_error = Some(text);
            }
        }
        self.view_stale = true;
        self.publish();
        release_freed_memory();
    }

    fn try_reload(&mut self) -> Result<Summary, ReloadError> {
        let mut next = Config::load(self.config_path())?;
        let registered = self.registered();
        next.check_against(&registered)?;
        for (what, old, new) in self.config.fixed.differences(&next.fixed) {
            warn!(
                setting = what,
                running = old,
                file = new,
                "this setting takes effect at the next restart; keeping the running value"
            );
        }
        next.fixed = self.config.fixed.clone();
        let plan = self.plan(&next, &registered)?;
        let (settings, before) = (self.config.settings(), self.desired());
        let summary = plan.apply(&mut Live { d: self }, &settings, &before)?;
        self.censuses.set_udp_idle(next.timeouts.udp_idle_ns);
        self.config = next;
        self.missing.retain(|m| self.config.interfaces.contains(m));
        self.checker.sync(&self.services());
        self.forget_removed();
        self.publish_claims();
        Ok(summary)
    }

    /// Checks everything `next` needs, changing nothing.
    fn plan(&self, next: &Config, registered: &[Service]) -> Result<Plan, ReloadError> {
        let desired = desired(next, registered, &self.verdicts);
        self.reconciler
            .check(&desired)
            .map_err(ReloadError::Capacity)?;
        let mut attach = Vec::new();
        for iface in &next.interfaces {
            if self.dp.attached().any(|(a, _)| a == iface) {
                continue;
            }
            let hook = Dataplane::choose_hook(iface, next.attach).map_err(|source| {
                ReloadError::Interface {
                    iface: iface.clone(),
                    source: Box::new(source),
                }
            })?;
            attach.push((iface.clone(), hook));
        }
        let detach = self
            .dp
            .attached()
            .filter(|(a, _)| !next.interfaces.iter().any(|i| i == a))
            .map(|(a, h)| (a.to_owned(), h))
            .collect();
        Ok(Plan {
            settings: next.settings(),
            desired,
            attach,
            detach,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, HealthCheck, Protocol, ServiceAddr};

    /// A target that records its state and fails the chosen calls.
    #[derive(Default)]
    struct Fake {
        settings: Settings,
        services: Vec<Service>,
        attached: Vec<String>,
        calls: usize,
        /// Calls (counting from 0) that fail.
        fail: Vec<usize>,
    }

    impl Fake {
        fn call(&mut self) -> Result<(), StepError> {
            let n = self.calls;
            self.calls += 1;
            if self.fail.contains(&n) {
                return Err(format!("call {n} fails").into());
            }
            Ok(())
        }
        fn state(&self) -> (Settings, Vec<Service>, Vec<String>) {
            let mut attached = self.attached.clone();
            attached.sort();
            (self.settings, self.services.clone(), attached)
        }
    }

    impl Target for Fake {
        fn set_settings(&mut self, s: &Settings) -> Result<(), StepError> {
            self.call()?;
            self.settings = *s;
            Ok(())
        }
        fn set_services(&mut self, desired: &[Service]) -> Result<Summary, StepError> {
            self.call()?;
            self.services = desired.to_vec();
            Ok(Summary::default())
        }
        fn attach(&mut self, iface: &str, _: Hook) -> Result<(), StepError> {
            self.call()?;
            self.attached.push(iface.to_owned());
            Ok(())
        }
        fn detach(&mut self, iface: &str) -> Result<(), StepError> {
            self.call()?;
            self.attached.retain(|a| a != iface);
            Ok(())
        }
    }

    fn service(name: &str, port: u16) -> Service {
        Service {
            name: name.into(),
            addr: ServiceAddr {
                vip: [198, 19, 0, 1].into(),
                port,
                protocol: Protocol::Tcp,
            },
            check: HealthCheck::default_for(Protocol::Tcp),
            scheduler: Default::default(),
            backends: vec![Backend::new(([198, 18, 1, 2], 8080).into(), 1)],
        }
    }

    /// Before: settings A, service "web", attached to ext and old. The plan: settings B,
    /// services "web" and "api", attach new1 and new2, detach old.
    fn setup() -> (Fake, Settings, Vec<Service>, Plan) {
        let before_settings = crate::dataplane::default_settings();
        let before = vec![service("web", 80)];
        let fake = Fake {
            settings: before_settings,
            services: before.clone(),
            attached: vec!["ext".into(), "old".into()],
            ..Default::default()
        };
        let mut settings = before_settings;
        settings.udp_idle_ns = 5_000_000_000;
        let plan = Plan {
            settings,
            desired: vec![service("web", 80), service("api", 443)],
            attach: vec![("new1".into(), Hook::Tc), ("new2".into(), Hook::Tc)],
            detach: vec![("old".into(), Hook::Tc)],
        };
        (fake, before_settings, before, plan)
    }

    #[test]
    fn a_plan_applies_every_step() {
        let (mut fake, settings, before, plan) = setup();
        plan.apply(&mut fake, &settings, &before).unwrap();
        let (s, services, attached) = fake.state();
        assert_eq!(s.udp_idle_ns, 5_000_000_000);
        assert_eq!(services.len(), 2);
        assert_eq!(attached, ["ext", "new1", "new2"]);
    }

    #[test]
    fn a_step_failing_anywhere_is_rolled_back_to_the_state_before() {
        let steps = 5; // settings, services, attach new1, attach new2, detach old
        for failing in 0..steps {
            let (mut fake, settings, before, plan) = setup();
            let start = fake.state();
            fake.fail = vec![failing];
            let e = plan.apply(&mut fake, &settings, &before).unwrap_err();
            assert!(
                matches!(e, ReloadError::RolledBack { .. }),
                "step {failing}: {e}"
            );
            assert!(e.to_string().contains("running state is unchanged"), "{e}");
            assert_eq!(fake.state(), start, "step {failing} failed: state restored");
        }
    }

    #[test]
    fn a_failed_undo_says_exactly_what_is_applied() {
        let (mut fake, settings, before, plan) = setup();
        // The second attach fails (call 3); undoing the first attach (call 4) fails too.
        fake.fail = vec![3, 4];
        let e = plan.apply(&mut fake, &settings, &before).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, ReloadError::Partial { .. }), "{text}");
        assert!(
            text.contains("attaching to new2 (tc) failed")
                && text.contains("undoing attaching to new1 (tc) failed")
                && text.contains(
                    "still in place: writing the data plane's settings, installing the \
                     services, attaching to new1 (tc)"
                ),
            "{text}"
        );
        let (s, services, attached) = fake.state();
        assert_eq!(
            (s.udp_idle_ns, services.len(), attached),
            (
                5_000_000_000,
                2,
                vec!["ext".into(), "new1".into(), "old".into()]
            ),
            "the report matches the state"
        );
    }
}
