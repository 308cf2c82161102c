//! A cap on calls in flight: `max_in_flight` places, and a line of at most `max_queue_depth`
//! calls waiting for one (`onLimit: queue`), served by priority class (`high`, then `normal`,
//! then `low`) and first come first served within a class.
//!
//! A place is a [`Place`]: held from admission until dropped (the layer drops it when the
//! answer's body ends), when it goes straight to the next in line or back to the free count.
//! A waiter that gives up (its wait ran out, or the call was dropped) leaves the line; a place
//! handed to it at that very moment comes back through the same drop.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use tollgate_crds::policy::{ConcurrencyPolicy, Priority};
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

#[derive(Debug)]
struct Line {
    free: u32,
    /// One queue per priority class, highest first; each waiter's ticket and channel.
    waiters: [VecDeque<(u64, oneshot::Sender<Place>)>; 3],
    next_ticket: u64,
}

/// One cap's places and line.
#[derive(Debug)]
pub(crate) struct InFlight {
    pub(crate) policy: ConcurrencyPolicy,
    line: Mutex<Line>,
}

/// A place held; given back (to the next in line, or to the free count) on drop.
#[derive(Debug)]
pub(crate) struct Place(Option<Arc<InFlight>>);

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(cap) = self.0.take() {
            cap.release();
        }
    }
}

fn class(p: Priority) -> usize {
    match p {
        Priority::High => 0,
        Priority::Normal => 1,
        Priority::Low => 2,
    }
}

impl InFlight {
    pub(crate) fn new(policy: &ConcurrencyPolicy) -> Self {
        InFlight {
            policy: policy.clone(),
            line: Mutex::new(Line {
                free: policy.max_in_flight,
                waiters: Default::default(),
                next_ticket: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Line> {
        self.line.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls holding a place now.
    pub(crate) fn in_flight(&self) -> u32 {
        self.policy.max_in_flight.saturating_sub(self.lock().free)
    }

    /// Calls waiting in line now.
    pub(crate) fn waiting(&self) -> u32 {
        let line = self.lock();
        u32::try_from(line.waiters.iter().map(VecDeque::len).sum::<usize>()).unwrap_or(u32::MAX)
    }

    /// A place now, or (in queue mode) once one is handed to this call, waiting at most
    /// `maxQueueWait` and never past `deadline`. The returned duration is how long it waited.
    pub(crate) async fn enter(
        self: &Arc<Self>,
        priority: Priority,
        deadline: Instant,
    ) -> Result<(Place, Duration), Refusal> {
        let (ticket, rx) = {
            let mut line = self.lock();
            if line.free > 0 {
                line.free -= 1;
                return Ok((Place(Some(self.clone())), Duration::ZERO));
            }
            if self.policy.on_limit == OnLimit::Reject {
                return Err(Refusal::Full);
            }
            let waiting: usize = line.waiters.iter().map(VecDeque::len).sum();
            if waiting >= self.policy.max_queue_depth as usize {
                return Err(Refusal::QueueFull);
            }
            let (tx, rx) = oneshot::channel();
            let ticket = line.next_ticket;
            line.next_ticket = line.next_ticket.wrapping_add(1);
            line.waiters[class(priority)].push_back((ticket, tx));
            (ticket, rx)
        };
        let started = Instant::now();
        let until = deadline.min(started + self.policy.max_queue_wait);
        let leave = LeaveLine {
            cap: self,
            class: class(priority),
            ticket,
        };
        let result = tokio::time::timeout_at(until, rx).await;
        drop(leave);
        match result {
            Ok(Ok(place)) => Ok((place, started.elapsed())),
            // The sender is only dropped by leaving the line, which is this call's own doing.
            _ => Err(Refusal::QueueTimeout),
        }
    }

    /// A place was given back: to the first waiter of the highest class still waiting, or to
    /// the free count.
    fn release(self: Arc<Self>) {
        let mut place = Place(Some(self.clone()));
        let mut line = self.lock();
        for queue in line.waiters.iter_mut() {
            while let Some((_, tx)) = queue.pop_front() {
                match tx.send(place) {
                    Ok(()) => return,
                    // That waiter gave up: try the next one with the same place.
                    Err(back) => place = back,
                }
            }
        }
        line.free = (line.free + 1).min(self.policy.max_in_flight);
        // The place is now counted as free: its drop must not release it again.
        place.0 = None;
    }
}

/// Takes a waiter out of the line when its wait ends, whatever ended it.
struct LeaveLine<'a> {
    cap: &'a InFlight,
    class: usize,
    ticket: u64,
}

impl Drop for LeaveLine<'_> {
    fn drop(&mut self) {
        let mut line = self.cap.lock();
        line.waiters[self.class].retain(|(t, _)| *t != self.ticket);
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
            priority_header: None,
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[tokio::test(start_paused = true)]
    async fn reject_mode_refuses_the_call_past_the_cap_and_frees_on_drop() {
        let cap = Arc::new(InFlight::new(&policy(2, OnLimit::Reject, 2, 1000)));
        let a = cap.enter(Priority::Normal, far()).await.unwrap();
        let _b = cap.enter(Priority::Normal, far()).await.unwrap();
        assert_eq!(cap.in_flight(), 2);
        assert_eq!(
            cap.enter(Priority::High, far()).await.unwrap_err(),
            Refusal::Full
        );
        drop(a);
        assert_eq!(cap.in_flight(), 1);
        assert!(cap.enter(Priority::Normal, far()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn queue_mode_waits_in_order_and_refuses_when_the_line_is_full() {
        let cap = Arc::new(InFlight::new(&policy(1, OnLimit::Queue, 2, 10_000)));
        let (held, _) = cap.enter(Priority::Normal, far()).await.unwrap();
        let mut waiters = Vec::new();
        for i in 0..2 {
            let cap = cap.clone();
            waiters.push(tokio::spawn(async move {
                let (place, waited) = cap.enter(Priority::Normal, far()).await.unwrap();
                (i, place, waited)
            }));
            tokio::task::yield_now().await;
        }
        assert_eq!(cap.waiting(), 2);
        assert_eq!(
            cap.enter(Priority::Normal, far()).await.unwrap_err(),
            Refusal::QueueFull
        );

        tokio::time::advance(Duration::from_millis(300)).await;
        drop(held);
        let (first, place, waited) = waiters.remove(0).await.unwrap();
        assert_eq!(first, 0, "first come, first served");
        assert_eq!(waited, Duration::from_millis(300));
        assert_eq!(cap.waiting(), 1);
        assert_eq!(
            cap.in_flight(),
            1,
            "the place went straight to the next in line"
        );
        drop(place);
        let (second, place, _) = waiters.remove(0).await.unwrap();
        assert_eq!(second, 1);
        assert_eq!(cap.waiting(), 0);
        drop(place);
        assert_eq!(cap.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_higher_class_goes_first_whatever_its_arrival() {
        let cap = Arc::new(InFlight::new(&policy(1, OnLimit::Queue, 10, 10_000)));
        let (held, _) = cap.enter(Priority::Normal, far()).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, p) in [
            ("low", Priority::Low),
            ("normal", Priority::Normal),
            ("high", Priority::High),
            ("high-2", Priority::High),
        ] {
            let (cap, order) = (cap.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let (place, _) = cap.enter(p, far()).await.unwrap();
                order.lock().unwrap().push(name);
                tokio::task::yield_now().await;
                drop(place);
            }));
            tokio::task::yield_now().await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["high", "high-2", "normal", "low"]);
        assert_eq!(cap.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_call_gives_up_at_max_queue_wait_or_its_deadline_whichever_is_first() {
        let cap = Arc::new(InFlight::new(&policy(1, OnLimit::Queue, 5, 500)));
        let _held = cap.enter(Priority::Normal, far()).await.unwrap();
        let start = Instant::now();
        assert_eq!(
            cap.enter(Priority::Normal, far()).await.unwrap_err(),
            Refusal::QueueTimeout
        );
        assert_eq!(start.elapsed(), Duration::from_millis(500));
        let start = Instant::now();
        let deadline = start + Duration::from_millis(120);
        assert_eq!(
            cap.enter(Priority::Normal, deadline).await.unwrap_err(),
            Refusal::QueueTimeout
        );
        assert_eq!(start.elapsed(), Duration::from_millis(120));
        assert_eq!(cap.waiting(), 0, "a waiter that gave up leaves the line");
    }

    #[tokio::test(start_paused = true)]
    async fn a_place_handed_to_a_waiter_that_gave_up_is_not_lost() {
        let cap = Arc::new(InFlight::new(&policy(1, OnLimit::Queue, 5, 10_000)));
        let (held, _) = cap.enter(Priority::Normal, far()).await.unwrap();
        let waiter = {
            let cap = cap.clone();
            tokio::spawn(async move { cap.enter(Priority::Normal, far()).await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        waiter.abort();
        let _ = waiter.await;
        drop(held);
        assert_eq!(cap.in_flight(), 0, "the place is free again");
        assert!(cap.enter(Priority::Normal, far()).await.is_ok());
    }
}
