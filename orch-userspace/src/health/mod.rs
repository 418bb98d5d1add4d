//! Health: active probes, the verdicts drawn from them and from the data plane's signals,
//! and the learning circuit breaker.
//!
//! - [`probe`]: the kinds of probe behind one small trait ([`probe::Probe`]), and one tokio
//!   task per checked backend that runs its probe at adaptive intervals and reports;
//! - [`verdict`]: whether each backend may take new connections (rise/fall, the data
//!   plane's signals, ejection, panic), with the breaker's say;
//! - [`breaker`]: the learning circuit breaker, one per backend.

pub mod breaker;
pub mod probe;
pub mod verdict;

pub use probe::{Checker, Outcome, Report};
pub use verdict::{AfterProbe, AfterSignals, BackendEvents, BackendHealth, Verdicts};
