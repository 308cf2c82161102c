//! Polling with a deadline: the end-to-end tests wait for a condition, never for a fixed time.

use std::time::{Duration, Instant};

/// How often [`eventually`] probes.
pub const POLL: Duration = Duration::from_millis(25);

/// Calls `probe` every [`POLL`] until it returns `Ok`, and returns that value. Panics after
/// `within` with `what` and the last error `probe` gave (say in it what was seen instead).
pub fn eventually<T>(what: &str, within: Duration, probe: impl FnMut() -> anyhow::Result<T>) -> T {
    eventually_every(what, within, POLL, probe)
}

/// [`eventually`] probing every `every`.
pub fn eventually_every<T>(
    what: &str,
    within: Duration,
    every: Duration,
    mut probe: impl FnMut() -> anyhow::Result<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("timed out after {within:?} waiting for {what}; last: {e:#}")
            }
            Err(_) => std::thread::sleep(every),
        }
    }
}
