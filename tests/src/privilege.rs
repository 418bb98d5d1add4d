//! Privileged tests (BPF, namespaces) run for real in CI and may skip only outside it.

/// True when the process can load BPF programs and create namespaces (it is root).
///
/// Outside CI a test that needs root and does not have it prints why it skips and returns
/// early; under `CI=true` the missing privilege fails the test instead, so CI can never
/// pass by skipping.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !in_ci,
        "{test}: needs root (BPF and network namespaces) and CI=true forbids skipping"
    );
    eprintln!("SKIP {test}: needs root for BPF and network namespaces (run `cargo xtask test`)");
    false
}
