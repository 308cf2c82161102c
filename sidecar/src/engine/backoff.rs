//! Exponential backoff with full jitter.

use std::time::Duration;

use rand::Rng;
use tollgate_crds::policy::RetryPolicy;

/// Delays between attempts: retry `n` (1-based) waits a uniform random time in
/// `[0, min(max, base * 2^(n-1))]`.
///
/// Full jitter spreads the retries of many clients that failed together, so they do not come
/// back in step. The ceiling saturates at `max` for any `n`, without overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    pub(crate) fn from_policy(policy: &RetryPolicy) -> Self {
        Self::new(policy.backoff_base, policy.backoff_max)
    }

    /// The longest delay before retry `retry` (1-based; 0 is taken as 1):
    /// `min(max, base * 2^(retry-1))`.
    pub(crate) fn ceiling(&self, retry: u32) -> Duration {
        let shift = retry.saturating_sub(1);
        let grown = 1u128
            .checked_shl(shift)
            .and_then(|factor| self.base.as_nanos().checked_mul(factor));
        match grown {
            Some(nanos) if nanos < self.max.as_nanos() => from_nanos_u128(nanos),
            _ => self.max,
        }
    }

    /// A delay before retry `retry`, drawn uniformly from `[0, ceiling(retry)]` with `rng`
    /// (pass `rand::rng()` in production, a seeded RNG in tests).
    pub(crate) fn delay<R: Rng + ?Sized>(&self, retry: u32, rng: &mut R) -> Duration {
        let ceiling = self.ceiling(retry);
        // Ceilings past u64 nanoseconds (584 years) are clamped; no policy comes near it.
        let ceiling = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=ceiling))
    }
}

/// `nanos` as a Duration; `nanos` is below some Duration's nanoseconds, so it fits.
fn from_nanos_u128(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    Duration::new(
        u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX),
        (nanos % NANOS_PER_SEC) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceiling_doubles_from_base_and_caps_at_max() {
        let b = Backoff::new(100 * MS, 2000 * MS);
        let ceilings: Vec<_> = (1..=7).map(|n| b.ceiling(n)).collect();
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 2000, 2000].map(|ms| ms * MS)
        );
        assert_eq!(b.ceiling(0), 100 * MS);
    }

    #[test]
    fn ceiling_never_overflows() {
        let b = Backoff::new(100 * MS, 2000 * MS);
        for n in [63, 64, 65, 127, 128, 129, 1000, u32::MAX] {
            assert_eq!(b.ceiling(n), 2000 * MS, "retry {n}");
        }
        let huge = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(huge.ceiling(u32::MAX), Duration::MAX);
        let mut rng = StdRng::seed_from_u64(1);
        assert!(huge.delay(u32::MAX, &mut rng) <= Duration::MAX);
    }

    #[test]
    fn delays_are_full_jitter_within_the_ceiling() {
        let b = Backoff::new(100 * MS, 2000 * MS);
        let mut rng = StdRng::seed_from_u64(7);
        for n in 1..=8 {
            let ceiling = b.ceiling(n);
            let samples: Vec<_> = (0..2000).map(|_| b.delay(n, &mut rng)).collect();
            assert!(samples.iter().all(|d| *d <= ceiling), "retry {n}");
            // Full jitter: the draws cover the range from near zero to near the ceiling, with
            // a mean near the middle.
            let (min, max) = (samples.iter().min().unwrap(), samples.iter().max().unwrap());
            assert!(*min < ceiling / 20, "retry {n}: min {min:?}");
            assert!(*max > ceiling * 19 / 20, "retry {n}: max {max:?}");
            let mean = samples.iter().sum::<Duration>() / 2000;
            assert!(
                mean > ceiling * 2 / 5 && mean < ceiling * 3 / 5,
                "retry {n}"
            );
        }
    }

    #[test]
    fn same_seed_same_delays_and_zero_base_means_no_wait() {
        let b = Backoff::new(100 * MS, 2000 * MS);
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (1..=5).map(|n| b.delay(n, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        let none = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(none.delay(3, &mut StdRng::seed_from_u64(0)), Duration::ZERO);
    }
}
