//! A cap on calls in flight: `max_in_flight` places, taken first come first served, and a line
//! of at most `max_queue_depth` waiting for one (`onLimit: queue`).
//!
//! A place is a [`Place`]: held from admission until dropped (the layer drops it when the
//! answer's body ends). The line is tokio's fair semaphore; its depth is counted here so a full
//! line refuses at once instead of growing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use tollgate_crds::policy::ConcurrencyPolicy;
use tollgate_crds::v1alpha1::OnLimit;

/// Why a call got no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Every place is taken (`reject`).
    Full,
    /// Every place is taken and the line is at `max_queue_depth`.
    QueueFull,
    /// No place freed within the wait allowed.
    QueueTimeout,
}

impl Refusal {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refusal::Full => "full",
            Refusal::QueueFull => "queue-full",
            Refusal::QueueTimeout => "queue-timeout",
        }
    }
}

/// One cap's places and line.
#[derive(Debug)]
pub(crate) struct InFlight {
    pub(crate) policy: ConcurrencyPolicy,
    places: Arc<Semaphore>,
    waiting: AtomicU32,
}

/// A place held; given back on drop.
#[derive(Debug)]
pub(crate) struct Place(#[allow(dead_code)] OwnedSemaphorePermit);

/// Counts one waiter until dropped (also when the wait is cancelled).
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl InFlight {
    pub(crate) fn new(policy: &ConcurrencyPolicy) -> Self {
        InFlight {
            policy: policy.clone(),
            places: Arc::new(Semaphore::new(policy.max_in_flight as usize)),
            waiting: AtomicU32::new(0),
        }
    }

    /// Calls holding a place now.
    pub(crate) fn in_flight(&self) -> u32 {
        let free = u32::try_from(self.places.available_permits()).unwrap_or(u32::MAX);
        self.policy.max_in_flight.saturating_sub(free)
    }

    /// Calls waiting in line now.
    pub(crate) fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Acquire)
    }

    /// A place now, or (in queue mode) once one frees, waiting at most `maxQueueWait` and never
    /// past `deadline`. The returned duration is how long the call waited.
    pub(crate) async fn enter(&self, deadline: Instant) -> Result<(Place, Duration), Refusal> {
        if let Ok(p) = self.places.clone().try_acquire_owned() {
            return Ok((Place(p), Duration::ZERO));
        }
        if self.policy.on_limit == OnLimit::Reject {
            return Err(Refusal::Full);
        }
        // Join the line only if it has room; the check and the increment are one step.
        let depth = self.policy.max_queue_depth;
        if self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w < depth).then_some(w + 1)
            })
            .is_err()
        {
            return Err(Refusal::QueueFull);
        }
        let _waiting = Waiting(&self.waiting);
        let started = Instant::now();
        let until = deadline.min(started + self.policy.max_queue_wait);
        match tokio::time::timeout_at(until, self.places.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok((Place(p), started.elapsed())),
            // The semaphore is never closed; a timeout is the only other way out.
            _ => Err(Refusal::QueueTimeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: u32, on_limit: OnLimit, depth: u32, wait_ms: u64) -> ConcurrencyPolicy {
        ConcurrencyPolicy {
            max_in_flight: max,
            on_limit,
            max_queue_wait: Duration::from_millis(wait_ms),
            max_queue_depth: depth,
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[tokio::test(start_paused = true)]
    async fn reject_mode_refuses_the_call_past_the_cap_and_frees_on_drop() {
        let cap = InFlight::new(&policy(2, OnLimit::Reject, 2, 1000));
        let a = cap.enter(far()).await.unwrap();
        let _b = cap.enter(far()).await.unwrap();
        assert_eq!(cap.in_flight(), 2);
        assert_eq!(cap.enter(far()).await.unwrap_err(), Refusal::Full);
        drop(a);
        assert_eq!(cap.in_flight(), 1);
        assert!(cap.enter(far()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn queue_mode_waits_in_order_and_refuses_when_the_line_is_full() {
        let cap = Arc::new(InFlight::new(&policy(1, OnLimit::Queue, 2, 10_000)));
        let (held, _) = cap.enter(far()).await.unwrap();
        let mut waiters = Vec::new();
        for i in 0..2 {
            let cap = cap.clone();
            waiters.push(tokio::spawn(async move {
                let (place, waited) = cap.enter(far()).await.unwrap();
                (i, place, waited)
            }));
            tokio::task::yield_now().await;
        }
        assert_eq!(cap.waiting(), 2);
        assert_eq!(cap.enter(far()).await.unwrap_err(), Refusal::QueueFull);

        tokio::time::advance(Duration::from_millis(300)).await;
        drop(held);
        let (first, place, waited) = waiters.remove(0).await.unwrap();
        assert_eq!(first, 0, "first come, first served");
        assert_eq!(waited, Duration::from_millis(300));
        assert_eq!(cap.waiting(), 1);
        drop(place);
        let (second, _place, _) = waiters.remove(0).await.unwrap();
        assert_eq!(second, 1);
        assert_eq!(cap.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_call_gives_up_at_max_queue_wait_or_its_deadline_whichever_is_first() {
        let cap = InFlight::new(&policy(1, OnLimit::Queue, 5, 500));
        let _held = cap.enter(far()).await.unwrap();
        let start = Instant::now();
        assert_eq!(cap.enter(far()).await.unwrap_err(), Refusal::QueueTimeout);
        assert_eq!(start.elapsed(), Duration::from_millis(500));
        let start = Instant::now();
        let deadline = start + Duration::from_millis(120);
        assert_eq!(
            cap.enter(deadline).await.unwrap_err(),
            Refusal::QueueTimeout
        );
        assert_eq!(start.elapsed(), Duration::from_millis(120));
        assert_eq!(cap.waiting(), 0, "a waiter that gave up leaves the line");
    }
}
