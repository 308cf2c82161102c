//! Polling with a deadline: tests wait for a condition, never for a fixed time.

use std::time::{Duration, Instant};

/// How often [`eventually`] and [`eventually_async`] probe.
pub const POLL: Duration = Duration::from_millis(25);

/// Calls `probe` every [`POLL`] until it returns `Ok`, and returns that value. Panics after
/// `within` with `what` and the last error `probe` gave (say in it what was seen instead).
/// Blocks the thread: for tests without a runtime of their own.
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

/// [`eventually`] for async tests: awaits `probe` every [`POLL`] (on the tokio clock) until it
/// returns `Ok`; panics after `within` with `what` and the last error.
pub async fn eventually_async<T>(
    what: &str,
    within: Duration,
    mut probe: impl AsyncFnMut() -> anyhow::Result<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!("timed out after {within:?} waiting for {what}; last: {e:#}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// Awaits until `cond` holds, checking every [`POLL`] (on the tokio clock); panics after
/// `within` naming `what`.
pub async fn until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    eventually_async(what, within, async || {
        anyhow::ensure!(cond(), "not yet");
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_success() {
        let mut n = 0;
        let got = eventually("the third try", Duration::from_secs(5), || {
            n += 1;
            anyhow::ensure!(n == 3, "try {n}");
            Ok(n)
        });
        assert_eq!(got, 3);
    }

    #[test]
    #[should_panic(expected = "waiting for never; last: still no")]
    fn panics_with_the_last_error_after_the_deadline() {
        eventually(
            "never",
            Duration::from_millis(50),
            || -> anyhow::Result<()> { anyhow::bail!("still no") },
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_async_form_gives_up_on_the_tokio_clock() {
        let mut n = 0;
        let got = eventually_async("the fifth try", Duration::from_secs(5), async || {
            n += 1;
            anyhow::ensure!(n == 5, "try {n}");
            Ok(n)
        })
        .await;
        assert_eq!(got, 5);
        let gave_up = tokio::spawn(eventually_async(
            "never",
            Duration::from_secs(1),
            async || -> anyhow::Result<()> { anyhow::bail!("still no") },
        ))
        .await
        .unwrap_err();
        assert!(gave_up.is_panic());
    }
}
