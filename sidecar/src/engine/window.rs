//! A rolling window of time buckets, shared by the circuit breaker and the retry budget.

use std::time::Duration;

use tokio::time::Instant;

/// `N` equal buckets covering `window`, addressed by epoch (`(now - origin) / width`).
///
/// Invariant: a bucket's tally belongs to the epoch stored beside it; only buckets of the last
/// `N` epochs are live. So an event is forgotten between `window - width` and `window` after it
/// happened, where `width = window / N`. Epochs never go backwards: a `now` older than one seen
/// before (callers take `now` before they take the lock) counts in the newest bucket.
#[derive(Debug, Clone)]
pub(crate) struct Buckets<T, const N: usize> {
    origin: Instant,
    /// Bucket width in nanoseconds, at least 1.
    width: u128,
    /// The newest epoch seen.
    latest: u64,
    slots: [(u64, T); N],
}

// === impl Buckets ===

impl<T: Default + Copy, const N: usize> Buckets<T, N> {
    pub(crate) fn new(window: Duration, origin: Instant) -> Self {
        let width = (window.as_nanos() / N as u128).max(1);
        Self {
            origin,
            width,
            latest: 0,
            slots: [(0, T::default()); N],
        }
    }

    fn epoch(&mut self, now: Instant) -> u64 {
        let e = now.saturating_duration_since(self.origin).as_nanos() / self.width;
        let e = u64::try_from(e).unwrap_or(u64::MAX);
        self.latest = self.latest.max(e);
        self.latest
    }

    /// The tally of the bucket `now` falls in, emptied first if it last held an older epoch.
    pub(crate) fn current(&mut self, now: Instant) -> &mut T {
        let e = self.epoch(now);
        let slot = &mut self.slots[(e % N as u64) as usize];
        if slot.0 != e {
            *slot = (e, T::default());
        }
        &mut slot.1
    }

    /// The tallies of the live buckets at `now`.
    pub(crate) fn live(&mut self, now: Instant) -> impl Iterator<Item = &T> {
        let e = self.epoch(now);
        self.slots
            .iter()
            // Slots never hold a future epoch (epochs only grow), so `e - s` cannot wrap.
            .filter(move |(s, _)| e - *s < N as u64)
            .map(|(_, t)| t)
    }

    /// Forgets everything.
    pub(crate) fn clear(&mut self) {
        for slot in &mut self.slots {
            slot.1 = T::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &mut Buckets<u32, 4>, now: Instant) -> u32 {
        b.live(now).sum()
    }

    #[tokio::test(start_paused = true)]
    async fn events_expire_bucket_by_bucket() {
        let t0 = Instant::now();
        // 4 buckets of 1 s.
        let mut b = Buckets::<u32, 4>::new(Duration::from_secs(4), t0);
        *b.current(t0) += 1;
        *b.current(t0 + Duration::from_millis(1500)) += 10;
        assert_eq!(sum(&mut b, t0 + Duration::from_millis(3999)), 11);
        // The first bucket (epoch 0) leaves the window when epoch 4 starts.
        assert_eq!(sum(&mut b, t0 + Duration::from_secs(4)), 10);
        assert_eq!(sum(&mut b, t0 + Duration::from_secs(5)), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn reused_slot_is_emptied_and_late_now_counts_in_newest_bucket() {
        let t0 = Instant::now();
        let mut b = Buckets::<u32, 4>::new(Duration::from_secs(4), t0);
        *b.current(t0) += 1;
        // Epoch 4 reuses slot 0: the old tally must not leak into it.
        *b.current(t0 + Duration::from_secs(4)) += 2;
        assert_eq!(sum(&mut b, t0 + Duration::from_secs(4)), 2);
        // A `now` from before the newest epoch lands in the newest bucket, not a recycled one.
        *b.current(t0 + Duration::from_secs(1)) += 3;
        assert_eq!(sum(&mut b, t0 + Duration::from_secs(4)), 5);
        b.clear();
        assert_eq!(sum(&mut b, t0 + Duration::from_secs(4)), 0);
    }
}
