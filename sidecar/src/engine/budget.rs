//! Retry budget: retries may add at most `percent`% of recent traffic, with a floor.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tollgate_crds::policy::BudgetPolicy;

use super::window::Buckets;

/// The sliding window the budget looks at.
pub(crate) const WINDOW: Duration = Duration::from_secs(10);
const BUCKETS: usize = 10;

/// A retry budget over a sliding window of [`WINDOW`] (ten 1 s buckets).
///
/// Invariant: within the window, retries granted never exceed
/// `max(min_per_second * 10, requests * percent / 100)`, where `requests` counts original
/// requests only. Callers call [`RetryBudget::record_request`] once per original request (never
/// per retry, or retries would pay for themselves) and [`RetryBudget::try_retry`] before each
/// retry; a granted retry is withdrawn from the budget at once.
///
/// The floor lets a quiet route still retry a little (`min_per_second` a second on average,
/// spent as the window allows); the percentage keeps a failing partner from receiving a storm
/// of retries on top of normal traffic.
#[derive(Debug)]
pub struct RetryBudget {
    percent: u64,
    /// Retries always allowed per window.
    floor: u64,
    window: Mutex<Buckets<Tally, BUCKETS>>,
    exhausted: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    requests: u64,
    retries: u64,
}

impl RetryBudget {
    /// An empty budget (only the floor is available). Its window is measured from now (tokio
    /// time).
    pub(crate) fn new(policy: &BudgetPolicy) -> Self {
        Self {
            percent: u64::from(policy.percent),
            floor: u64::from(policy.min_per_second) * WINDOW.as_secs(),
            window: Mutex::new(Buckets::new(WINDOW, Instant::now())),
            exhausted: AtomicU64::new(0),
        }
    }

    /// Counts one original request.
    pub(crate) fn record_request(&self, now: Instant) {
        self.lock().current(now).requests += 1;
    }

    /// Withdraws one retry if the budget allows it.
    pub(crate) fn try_retry(&self, now: Instant) -> bool {
        let mut window = self.lock();
        let (requests, retries) = window
            .live(now)
            .fold((0, 0), |(q, r), t| (q + t.requests, r + t.retries));
        let next = retries + 1;
        if next <= self.floor || next * 100 <= requests * self.percent {
            window.current(now).retries += 1;
            true
        } else {
            drop(window);
            self.exhausted.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    #[cfg(test)]
    /// Retries refused since the budget was built.
    pub(crate) fn exhausted_total(&self) -> u64 {
        self.exhausted.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Buckets<Tally, BUCKETS>> {
        // Counters only: a poisoned lock holds usable numbers.
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn budget(percent: u32, min_per_second: u32) -> RetryBudget {
        RetryBudget::new(&BudgetPolicy {
            percent,
            min_per_second,
        })
    }

    fn retries_granted(b: &RetryBudget, cap: usize) -> usize {
        let now = Instant::now();
        (0..cap).take_while(|_| b.try_retry(now)).count()
    }

    fn requests(b: &RetryBudget, n: usize) {
        let now = Instant::now();
        for _ in 0..n {
            b.record_request(now);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn floor_allows_min_per_second_over_the_window() {
        let b = budget(20, 5);
        // No traffic at all: 5 a second over 10 s.
        assert_eq!(retries_granted(&b, 1000), 50);
        assert_eq!(b.exhausted_total(), 1);
        // Spent retries stay spent for the whole window, then are forgotten.
        advance(Duration::from_secs(9)).await;
        assert_eq!(retries_granted(&b, 1000), 0);
        advance(Duration::from_secs(1)).await;
        assert_eq!(retries_granted(&b, 1000), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn percent_of_recent_requests_above_the_floor() {
        let b = budget(20, 5);
        requests(&b, 1000);
        assert_eq!(retries_granted(&b, 10_000), 200);
        // 100 more requests buy 20 more retries.
        requests(&b, 100);
        assert_eq!(retries_granted(&b, 10_000), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn old_requests_stop_paying_for_retries() {
        let b = budget(20, 0);
        requests(&b, 100);
        advance(Duration::from_secs(5)).await;
        requests(&b, 100);
        assert_eq!(retries_granted(&b, 1000), 40);
        // The first 100 requests leave the window; the 40 retries are still in it.
        advance(Duration::from_secs(5)).await;
        assert_eq!(retries_granted(&b, 1000), 0);
        requests(&b, 150);
        // 250 requests in the window pay for 50 retries, 40 are taken.
        assert_eq!(retries_granted(&b, 1000), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_budget_never_retries() {
        let b = budget(0, 0);
        requests(&b, 1000);
        assert_eq!(retries_granted(&b, 10), 0);
        // Below one whole retry's worth of requests nothing is granted either.
        let b = budget(20, 0);
        requests(&b, 4);
        assert_eq!(retries_granted(&b, 10), 0);
        requests(&b, 1);
        assert_eq!(retries_granted(&b, 10), 1);
    }
}
