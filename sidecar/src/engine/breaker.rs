//! Circuit breaker: closed → open on a failure rate or a run of failures, open → half-open after
//! `open_duration`, half-open → closed when every probe succeeds, → open again on any failure.
//!
//! # What is a failure
//!
//! The caller decides, and reports it with [`CallOutcome`]. The contract (api.md, section 1):
//! a 5xx response, a timeout, a connect error or a reset is a [`CallOutcome::Failure`]; every
//! other response, including any 4xx and 429 (the partner is up and answering; a 429 is the
//! rate limiter's business), is a [`CallOutcome::Success`]. A call that the caller abandons
//! (client gone, total deadline spent before an answer) is neither: drop its [`Permit`]. On top
//! of that, the breaker itself counts a call slower than `slow_call_duration` as a failure,
//! whatever its outcome.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tollgate_crds::policy::BreakerPolicy;

use super::window::Buckets;

/// Buckets in the rolling window: a call leaves the window between `window - window/10` and
/// `window` after it was recorded.
const BUCKETS: usize = 10;

/// What [`CircuitOpen::retry_after`] says while half-open with every probe slot taken: the
/// probes in flight decide within about a request's time, and `Retry-After` counts seconds.
pub(crate) const PROBES_BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The breaker's state: closed (calls flow; outcomes are counted), half-open (at most
/// `half_open_probes` probe calls flow; the rest are refused) or open (every call is refused
/// until `open_duration` has passed). One type for the metrics and the status report.
pub(crate) use tollgate_crds::distribution::BreakerState;

/// The value of the `tollgate_circuit_state` gauge: 0 closed, 1 half-open, 2 open.
pub(crate) fn gauge(state: BreakerState) -> i64 {
    match state {
        BreakerState::Closed => 0,
        BreakerState::HalfOpen => 1,
        BreakerState::Open => 2,
    }
}

/// How a call went, as the caller judges it (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallOutcome {
    Success,
    Failure,
}

/// The breaker refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit open; retry after {retry_after:?}")]
pub(crate) struct CircuitOpen {
    /// Time until the breaker goes half-open, or [`PROBES_BUSY_RETRY_AFTER`] when it is
    /// half-open already and every probe slot is taken.
    pub(crate) retry_after: Duration,
}

/// One circuit breaker, shared behind an `Arc` by every call it governs.
///
/// Invariants: `generation` changes on every state change, and a [`Permit`] counts only in the
/// generation it was issued in, so a call that started before a transition never sways the
/// state after it (a slow call from before the breaker opened is not a probe). While half-open,
/// `in_flight + succeeded <= half_open_probes`. The rolling window is empty when the breaker
/// closes.
#[derive(Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    inner: Mutex<Inner>,
    opened: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    state: State,
    generation: u64,
    window: Buckets<Tally, BUCKETS>,
    /// Failures since the last success, in the closed state.
    consecutive: u32,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, succeeded: u32 },
}

#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    calls: u32,
    failures: u32,
}

/// Leave to make one call. Record its outcome with [`Permit::record`]; dropping it unrecorded
/// (a cancelled call) counts as neither success nor failure, and frees its probe slot.
#[derive(Debug)]
#[must_use = "a permit records the call's outcome; dropping it discards the call"]
pub(crate) struct Permit {
    breaker: Arc<Breaker>,
    generation: u64,
    recorded: bool,
}

// === impl Breaker ===

impl Breaker {
    /// A closed breaker. Its window is measured from now (tokio time).
    pub(crate) fn new(policy: BreakerPolicy) -> Self {
        let window = Buckets::new(policy.window, Instant::now());
        Self {
            policy,
            inner: Mutex::new(Inner {
                state: State::Closed,
                generation: 0,
                window,
                consecutive: 0,
            }),
            opened: AtomicU64::new(0),
        }
    }

    /// Leave for one call, or the time to come back.
    pub(crate) fn try_acquire(self: &Arc<Self>, now: Instant) -> Result<Permit, CircuitOpen> {
        let mut inner = self.lock();
        inner.refresh(now);
        match &mut inner.state {
            State::Closed => {}
            State::Open { until } => {
                return Err(CircuitOpen {
                    retry_after: until.saturating_duration_since(now),
                });
            }
            State::HalfOpen {
                in_flight,
                succeeded,
            } => {
                if *in_flight + *succeeded >= self.policy.half_open_probes {
                    return Err(CircuitOpen {
                        retry_after: PROBES_BUSY_RETRY_AFTER,
                    });
                }
                *in_flight += 1;
            }
        }
        Ok(Permit {
            breaker: Arc::clone(self),
            generation: inner.generation,
            recorded: false,
        })
    }

    /// The state at `now` (an open breaker whose time is up is half-open).
    pub(crate) fn state(&self, now: Instant) -> BreakerState {
        let mut inner = self.lock();
        inner.refresh(now);
        match inner.state {
            State::Closed => BreakerState::Closed,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
            State::Open { .. } => BreakerState::Open,
        }
    }

    #[cfg(test)]
    /// How many times the breaker has opened (from closed or from half-open).
    pub(crate) fn opened_total(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    fn record(&self, generation: u64, outcome: CallOutcome, elapsed: Duration, now: Instant) {
        let slow = self.policy.slow_call_duration.is_some_and(|d| elapsed > d);
        let failed = outcome == CallOutcome::Failure || slow;
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.refresh(now);
        if inner.generation != generation {
            return;
        }
        let policy = &self.policy;
        match inner.state {
            State::Closed => {
                let tally = inner.window.current(now);
                tally.calls += 1;
                if failed {
                    tally.failures += 1;
                    inner.consecutive += 1;
                } else {
                    inner.consecutive = 0;
                }
                let (calls, failures) = inner.window.live(now).fold((0u64, 0u64), |(c, f), t| {
                    (c + u64::from(t.calls), f + u64::from(t.failures))
                });
                // The rate counts only once the window holds enough calls to mean something;
                // checked on every call, since a success can bring the window to the minimum.
                let rate_tripped = calls >= u64::from(policy.minimum_requests)
                    && failures * 100 >= u64::from(policy.failure_rate_percent) * calls;
                if rate_tripped || inner.consecutive >= policy.consecutive_failures {
                    self.trip(inner, now);
                }
            }
            State::HalfOpen {
                in_flight,
                succeeded,
            } => {
                if failed {
                    self.trip(inner, now);
                } else if succeeded + 1 >= policy.half_open_probes {
                    inner.close();
                } else {
                    inner.state = State::HalfOpen {
                        in_flight: in_flight - 1,
                        succeeded: succeeded + 1,
                    };
                }
            }
            // A permit is issued only while closed or half-open, and opening changes the
            // generation.
            State::Open { .. } => {}
        }
    }

    /// A permit dropped unrecorded: frees its probe slot if it was a probe.
    fn release(&self, generation: u64) {
        let mut inner = self.lock();
        if inner.generation != generation {
            return;
        }
        if let State::HalfOpen { in_flight, .. } = &mut inner.state {
            *in_flight -= 1;
        }
    }

    fn trip(&self, inner: &mut Inner, now: Instant) {
        inner.state = State::Open {
            until: now + self.policy.open_duration,
        };
        inner.generation += 1;
        inner.consecutive = 0;
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every transition is a few plain assignments; a poisoned lock holds a usable state.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl Inner ===

impl Inner {
    /// Open → half-open once the open time is up; the breaker moves lazily, on the next look.
    fn refresh(&mut self, now: Instant) {
        if let State::Open { until } = self.state
            && now >= until
        {
            self.state = State::HalfOpen {
                in_flight: 0,
                succeeded: 0,
            };
            self.generation += 1;
        }
    }

    fn close(&mut self) {
        self.state = State::Closed;
        self.generation += 1;
        self.consecutive = 0;
        // Failures from before the outage must not reopen a breaker the probes just closed.
        self.window.clear();
    }
}

// === impl Permit ===

impl Permit {
    /// Reports how the call went. `elapsed` is the call's duration (for `slow_call_duration`);
    /// `now` is when it ended.
    pub(crate) fn record(mut self, outcome: CallOutcome, elapsed: Duration, now: Instant) {
        self.recorded = true;
        self.breaker.record(self.generation, outcome, elapsed, now);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.recorded {
            self.breaker.release(self.generation);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    use CallOutcome::{Failure, Success};

    const MS: Duration = Duration::from_millis(1);
    const FAST: Duration = Duration::from_millis(10);

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            window: Duration::from_secs(30),
            minimum_requests: 10,
            failure_rate_percent: 50,
            // Out of the way unless a test is about it.
            consecutive_failures: 1000,
            slow_call_duration: None,
            open_duration: Duration::from_secs(15),
            half_open_probes: 3,
        }
    }

    fn breaker(policy: BreakerPolicy) -> Arc<Breaker> {
        Arc::new(Breaker::new(policy))
    }

    /// Makes one call with the given outcome at the current (paused) time.
    fn call(b: &Arc<Breaker>, outcome: CallOutcome) {
        call_taking(b, outcome, FAST);
    }

    fn call_taking(b: &Arc<Breaker>, outcome: CallOutcome, elapsed: Duration) {
        let now = Instant::now();
        b.try_acquire(now)
            .expect("breaker should let the call through")
            .record(outcome, elapsed, now);
    }

    fn state(b: &Breaker) -> BreakerState {
        b.state(Instant::now())
    }

    fn refused(b: &Arc<Breaker>) -> Duration {
        b.try_acquire(Instant::now())
            .expect_err("breaker should refuse")
            .retry_after
    }

    /// Opens `b` with consecutive failures (policy must have a small `consecutive_failures`).
    fn open(b: &Arc<Breaker>) {
        while state(b) == BreakerState::Closed {
            call(b, Failure);
        }
        assert_eq!(state(b), BreakerState::Open);
    }

    fn quick_to_open() -> BreakerPolicy {
        BreakerPolicy {
            consecutive_failures: 2,
            ..policy()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_counts_only_from_minimum_requests() {
        let b = breaker(policy());
        // 9 calls, 7 failures (78 %): under the minimum of 10, so still closed.
        for _ in 0..7 {
            call(&b, Failure);
        }
        call(&b, Success);
        call(&b, Success);
        assert_eq!(state(&b), BreakerState::Closed);
        // The 10th call, a success, brings the window to the minimum at 70 %.
        call(&b, Success);
        assert_eq!(state(&b), BreakerState::Open);
        assert_eq!(b.opened_total(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_below_threshold_stays_closed_and_at_threshold_opens() {
        let b = breaker(policy());
        for _ in 0..6 {
            call(&b, Success);
        }
        for _ in 0..4 {
            call(&b, Failure);
        }
        // 4 of 10: 40 %.
        assert_eq!(state(&b), BreakerState::Closed);
        call(&b, Failure);
        call(&b, Failure);
        // 6 of 12: exactly 50 %.
        assert_eq!(state(&b), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_leave_the_rolling_window() {
        let b = breaker(policy());
        for _ in 0..9 {
            call(&b, Failure);
        }
        // 30 s later those nine are out of the window: one more failure is 1 of 1, under the
        // minimum.
        advance(Duration::from_secs(30)).await;
        call(&b, Failure);
        assert_eq!(state(&b), BreakerState::Closed);
        // While 9 failures 27 s old still count (buckets of 3 s).
        let b = breaker(policy());
        for _ in 0..9 {
            call(&b, Failure);
        }
        advance(Duration::from_secs(26)).await;
        call(&b, Failure);
        assert_eq!(state(&b), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_open_and_a_success_resets_the_run() {
        let b = breaker(BreakerPolicy {
            consecutive_failures: 3,
            minimum_requests: 1000,
            ..policy()
        });
        call(&b, Failure);
        call(&b, Failure);
        call(&b, Success);
        call(&b, Failure);
        call(&b, Failure);
        assert_eq!(state(&b), BreakerState::Closed);
        call(&b, Failure);
        assert_eq!(state(&b), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_successes_count_as_failures() {
        let b = breaker(BreakerPolicy {
            slow_call_duration: Some(Duration::from_secs(2)),
            ..quick_to_open()
        });
        // Exactly the limit is not slower than it.
        call_taking(&b, Success, Duration::from_secs(2));
        call_taking(&b, Success, Duration::from_secs(2) + MS);
        assert_eq!(state(&b), BreakerState::Closed);
        call_taking(&b, Success, Duration::from_secs(3));
        assert_eq!(state(&b), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn open_turns_half_open_after_exactly_open_duration() {
        let b = breaker(quick_to_open());
        open(&b);
        assert_eq!(refused(&b), Duration::from_secs(15));
        advance(Duration::from_secs(15) - MS).await;
        assert_eq!(state(&b), BreakerState::Open);
        assert_eq!(refused(&b), MS);
        advance(MS).await;
        assert_eq!(state(&b), BreakerState::HalfOpen);
        assert_eq!(gauge(state(&b)), 1);
        assert!(b.try_acquire(Instant::now()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_at_most_the_probe_count() {
        let b = breaker(quick_to_open());
        open(&b);
        advance(Duration::from_secs(15)).await;
        let now = Instant::now();
        let probes: Vec<Permit> = (0..3).map(|_| b.try_acquire(now).unwrap()).collect();
        assert_eq!(refused(&b), PROBES_BUSY_RETRY_AFTER);
        // Success of two probes does not open slots: the third must succeed too.
        let mut probes = probes.into_iter();
        for p in probes.by_ref().take(2) {
            p.record(Success, FAST, now);
        }
        assert_eq!(state(&b), BreakerState::HalfOpen);
        assert_eq!(refused(&b), PROBES_BUSY_RETRY_AFTER);
        drop(probes);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_a_fresh_open_duration() {
        let b = breaker(quick_to_open());
        open(&b);
        advance(Duration::from_secs(15)).await;
        let now = Instant::now();
        let first = b.try_acquire(now).unwrap();
        let second = b.try_acquire(now).unwrap();
        advance(Duration::from_secs(1)).await;
        first.record(Failure, Duration::from_secs(1), Instant::now());
        assert_eq!(state(&b), BreakerState::Open);
        assert_eq!(refused(&b), Duration::from_secs(15));
        // The other probe, answering late, belongs to the half-open period that is over.
        second.record(Success, FAST, Instant::now());
        assert_eq!(state(&b), BreakerState::Open);
        assert_eq!(b.opened_total(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn all_probes_succeeding_close_with_an_empty_window() {
        let b = breaker(BreakerPolicy {
            minimum_requests: 4,
            window: Duration::from_secs(60),
            ..policy()
        });
        for _ in 0..4 {
            call(&b, Failure);
        }
        assert_eq!(state(&b), BreakerState::Open);
        advance(Duration::from_secs(15)).await;
        for _ in 0..3 {
            call(&b, Success);
        }
        assert_eq!(state(&b), BreakerState::Closed);
        assert_eq!(gauge(state(&b)), 0);
        // The four old failures are 15 s old, inside the 60 s window; had the window been
        // kept, 5 failures of 8 calls would reopen now. It was reset: 1 of 1, under minimum.
        call(&b, Failure);
        assert_eq!(state(&b), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_frees_its_slot_and_counts_for_nothing() {
        let b = breaker(quick_to_open());
        open(&b);
        advance(Duration::from_secs(15)).await;
        let now = Instant::now();
        let a = b.try_acquire(now).unwrap();
        let c = b.try_acquire(now).unwrap();
        let cancelled = b.try_acquire(now).unwrap();
        assert!(b.try_acquire(now).is_err());
        drop(cancelled);
        assert_eq!(state(&b), BreakerState::HalfOpen);
        let d = b.try_acquire(now).unwrap();
        for p in [a, c] {
            p.record(Success, FAST, now);
        }
        // Two successes and a cancellation are not three successes.
        assert_eq!(state(&b), BreakerState::HalfOpen);
        d.record(Success, FAST, now);
        assert_eq!(state(&b), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_started_before_a_transition_do_not_count_after_it() {
        let b = breaker(quick_to_open());
        let now = Instant::now();
        let before = b.try_acquire(now).unwrap();
        let dropped_before = b.try_acquire(now).unwrap();
        open(&b);
        advance(Duration::from_secs(15)).await;
        let probe = b.try_acquire(Instant::now()).unwrap();
        // A failure from the closed period is no probe: it neither reopens nor frees a slot.
        before.record(Failure, FAST, Instant::now());
        drop(dropped_before);
        assert_eq!(state(&b), BreakerState::HalfOpen);
        let _p2 = b.try_acquire(Instant::now()).unwrap();
        let _p3 = b.try_acquire(Instant::now()).unwrap();
        assert!(b.try_acquire(Instant::now()).is_err());
        drop(probe);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_call_in_closed_state_counts_for_nothing() {
        let b = breaker(quick_to_open());
        call(&b, Failure);
        drop(b.try_acquire(Instant::now()).unwrap());
        assert_eq!(state(&b), BreakerState::Closed);
        call(&b, Failure);
        assert_eq!(state(&b), BreakerState::Open);
        assert_eq!(gauge(state(&b)), 2);
    }
}
