//! Quotas: several token-bucket bands per quota, optional partitions, FIFO queueing, and an
//! all-or-nothing [`acquire`] across quotas.
//!
//! Each band is a GCRA (generic cell rate algorithm, "virtual scheduling"): instead of a token
//! count it keeps a theoretical arrival time `tat`, the instant at which the bucket would be full
//! again. With emission interval `T = per / requests` and tolerance `tau = (burst - 1) * T`, a
//! request at `now` may go at `max(now, tat - tau)` and moves `tat` to `max(tat, now) + T`.
//! Two properties follow and are used below:
//!
//! - Queueing is exact and first come, first served: a queued request reserves its slot by
//!   moving `tat` forward, so the next request's slot is later still.
//! - A band with `tat <= now` is full, indistinguishable from a fresh one, which is what makes
//!   evicting idle partitions exact.
//!
//! Partition keys come from request headers, so from outside: a key is stored as a 128-bit
//! keyed hash of its bytes (SipHash under two random keys per limiter), whatever its length,
//! and the number of partitions is capped (see [`Limiter`]).
//!
//! A request that must wait for one band is charged in every band on arrival, not at the
//! instant it is sent. One number per band cannot hold a token for a future instant without
//! making the band look poorer now: charging at send time would push a band that had room
//! ahead by the whole wait, so a route queueing for 2 s would drain the account quota that
//! every other route shares. The price of charging on arrival: in a band that had room, the
//! queued request's token can come back before the request is sent, so around that instant the
//! band may let through one request beyond its burst per such queued request. The excess is
//! momentary and bounded by the queue, never a higher sustained rate.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tollgate_crds::policy::BandPolicy;

/// A request that no band would admit within the allowed wait. Nothing was consumed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rate limited by band {band:?}; retry after {retry_after:?}")]
pub(crate) struct Denied {
    /// Index, in the slice given to [`acquire`], of the quota whose band refused.
    pub(crate) quota: usize,
    /// The band that needed the longest wait.
    pub(crate) band: Arc<str>,
    /// How long until this request would have been admitted.
    pub(crate) retry_after: Duration,
}

/// `share` outside `(0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("quota share must be in (0, 1], got {0}")]
pub(crate) struct InvalidShare(pub f64);

#[cfg(test)]
/// Totals since the limiter was built, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct LimiterCounters {
    /// Requests admitted, at once or after a wait.
    pub(crate) admitted: u64,
    /// Admitted requests that had to wait.
    pub(crate) queued: u64,
    /// Requests refused because this quota would have made them wait too long.
    pub(crate) denied: u64,
    /// Admitted requests whose key was charged to the overflow partition.
    pub(crate) overflowed: u64,
}

/// A request admitted by [`admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Admitted {
    /// How long the caller must wait before sending (zero: at once).
    pub(crate) wait: Duration,
    /// Whether some quota charged the request to its overflow partition (its key found no
    /// partition of its own).
    pub(crate) overflow: bool,
}

/// One quota: every band must admit a request.
///
/// Invariants: each band's state is a theoretical arrival time (see the module docs); a
/// partition's state exists only while some band is below full, or until it is evicted; there
/// are at most `max_partitions` keyed partitions, each stored under a fixed-size hash of its key
/// (so memory is bounded by the cap, not by what clients send). Requests without a partition key (`None`)
/// share one partition that never counts against the cap. When the cap is reached and no
/// partition is idle, requests with a new key share one overflow partition: they are limited
/// together, so an attacker spraying keys cannot get more than one extra partition's quota.
/// A key served from overflow gets a partition of its own once one is idle and evicted.
///
/// `Send + Sync`; meant to be shared behind an `Arc` by every request of a route or integration.
#[derive(Debug)]
pub struct Limiter {
    bands: Box<[Band]>,
    max_partitions: usize,
    state: Mutex<State>,
    admitted: AtomicU64,
    queued: AtomicU64,
    denied: AtomicU64,
    overflowed: AtomicU64,
}

/// A band as configured, before the share is applied.
#[derive(Debug)]
struct Band {
    name: Arc<str>,
    requests: u64,
    per: Duration,
}

/// A band's GCRA parameters for the current share.
#[derive(Debug, Clone, Copy)]
struct Params {
    /// `T`: the time one request's token takes to come back.
    interval: Duration,
    /// `tau = (burst - 1) * T`: how far ahead of `now` a band's `tat` may be and still admit.
    tolerance: Duration,
    burst: u64,
}

/// Theoretical arrival times, one per band (in band order).
type Tats = Box<[Instant]>;

/// A partition key as stored: a 128-bit keyed hash of its bytes.
type KeyHash = u128;

/// A request's partition key in one quota: `None` when the quota is not partitioned or the
/// request lacks the header. Any bytes; arbitrary length.
pub(crate) type Key<'a> = Option<&'a [u8]>;

#[derive(Debug)]
struct State {
    params: Box<[Params]>,
    /// Requests without a partition key. `None`: full (never used yet).
    unkeyed: Option<Tats>,
    /// Keys that arrived while the map was full of busy partitions. `None`: full.
    overflow: Option<Tats>,
    partitions: HashMap<KeyHash, Tats>,
    /// Hashes partition keys; random per limiter, so clients cannot aim keys at one partition.
    hasher: (RandomState, RandomState),
    /// No partition in `partitions` is idle before this instant, so a sweep before it would find
    /// nothing. `None`: unknown, a sweep may find an idle one.
    sweep_after: Option<Instant>,
}

#[cfg(test)]
/// Admits a request against every quota in `quotas`, all or nothing.
///
/// Each entry is a limiter and the request's partition key in it (`None` when the limiter is
/// not partitioned or the request lacks the key). The request is admitted only if, in every
/// band of every quota, its slot comes within `max_wait`; then it consumes one token in each
/// band and `Ok(wait)` says how long the caller must wait before sending (zero if tokens are
/// there now). The slot is reserved: later requests queue behind it, first come first served.
/// A cancelled waiter's reservation is not returned. `max_wait = 0` is reject mode.
///
/// Otherwise `Err(Denied)` names the quota and band needing the longest wait, and nothing is
/// consumed anywhere. List each limiter at most once: a repeated limiter is locked once and
/// charged per entry, but its wait is computed as if for one token.
pub(crate) fn acquire(
    quotas: &[(&Limiter, Key<'_>)],
    now: Instant,
    max_wait: Duration,
) -> Result<Duration, Denied> {
    admit(quotas, now, max_wait).map(|a| a.wait)
}

/// [`acquire`], also telling whether the request was charged to an overflow partition.
pub(crate) fn admit<'l>(
    quotas: &[(&'l Limiter, Key<'_>)],
    now: Instant,
    max_wait: Duration,
) -> Result<Admitted, Denied> {
    // Guards live on the stack for the usual one or two quotas (route and account).
    const INLINE: usize = 4;
    if quotas.len() <= INLINE {
        let mut guards: [Option<MutexGuard<'l, State>>; INLINE] = [const { None }; INLINE];
        acquire_locked(quotas, &mut guards[..quotas.len()], now, max_wait)
    } else {
        let mut guards = Vec::with_capacity(quotas.len());
        guards.resize_with(quotas.len(), || None);
        acquire_locked(quotas, &mut guards, now, max_wait)
    }
}

fn acquire_locked<'l>(
    quotas: &[(&'l Limiter, Key<'_>)],
    guards: &mut [Option<MutexGuard<'l, State>>],
    now: Instant,
    max_wait: Duration,
) -> Result<Admitted, Denied> {
    lock_in_address_order(quotas, guards);

    // Phase 1: the longest wait any band imposes. Nothing changes except idle evictions,
    // which are invisible (an idle partition equals a fresh one).
    let mut wait = Duration::ZERO;
    let mut binding = None;
    for (i, (limiter, key)) in quotas.iter().enumerate() {
        let state = guard_for(quotas, guards, i);
        let (w, b) = state.wait(*key, limiter.max_partitions, now);
        if w > wait {
            wait = w;
            binding = Some((i, b));
        }
    }
    if wait > max_wait
        && let Some((i, b)) = binding
    {
        let limiter = quotas[i].0;
        limiter.denied.fetch_add(1, Ordering::Relaxed);
        return Err(Denied {
            quota: i,
            band: limiter.bands[b].name.clone(),
            retry_after: wait,
        });
    }

    // Phase 2: every band takes its token (see the module docs on why on arrival).
    let mut overflow = false;
    for (i, (limiter, key)) in quotas.iter().enumerate() {
        let state = guard_for(quotas, guards, i);
        if state.commit(*key, limiter.max_partitions, now) {
            overflow = true;
            limiter.overflowed.fetch_add(1, Ordering::Relaxed);
        }
        limiter.admitted.fetch_add(1, Ordering::Relaxed);
        if !wait.is_zero() {
            limiter.queued.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(Admitted { wait, overflow })
}

/// Locks each distinct limiter once, lowest address first, so that two concurrent `acquire`s
/// over the same limiters in different orders cannot deadlock. The guard of a limiter is stored
/// at the index of its first entry.
fn lock_in_address_order<'l>(
    quotas: &[(&'l Limiter, Key<'_>)],
    guards: &mut [Option<MutexGuard<'l, State>>],
) {
    let addr = |l: &Limiter| std::ptr::from_ref(l) as usize;
    let mut last = None;
    loop {
        let next = quotas
            .iter()
            .enumerate()
            .filter(|(_, (l, _))| last.is_none_or(|last| addr(l) > last))
            .min_by_key(|(_, (l, _))| addr(l));
        let Some((i, (limiter, _))) = next else {
            break;
        };
        guards[i] = Some(limiter.lock());
        last = Some(addr(limiter));
    }
}

/// The locked state of entry `i`'s limiter.
fn guard_for<'g>(
    quotas: &[(&Limiter, Key<'_>)],
    guards: &'g mut [Option<MutexGuard<'_, State>>],
    i: usize,
) -> &'g mut State {
    let owner = quotas
        .iter()
        .position(|(l, _)| std::ptr::eq(*l, quotas[i].0))
        .unwrap_or(i);
    guards[owner]
        .as_deref_mut()
        .expect("every limiter is locked by lock_in_address_order")
}

// === impl Limiter ===

impl Limiter {
    /// A quota of `bands`, at full share, with at most `max_partitions` keyed partitions.
    pub(crate) fn new(bands: &[BandPolicy], max_partitions: usize) -> Self {
        let bands: Box<[Band]> = bands
            .iter()
            .map(|b| Band {
                name: Arc::from(b.name.as_str()),
                requests: b.requests,
                per: b.per,
            })
            .collect();
        let params = bands.iter().map(|b| b.params(1.0)).collect();
        Self {
            bands,
            max_partitions,
            state: Mutex::new(State {
                params,
                unkeyed: None,
                overflow: None,
                partitions: HashMap::new(),
                hasher: (RandomState::new(), RandomState::new()),
                sweep_after: None,
            }),
            admitted: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            overflowed: AtomicU64::new(0),
        }
    }

    #[cfg(test)]
    /// [`acquire`] against this quota alone.
    pub(crate) fn acquire(
        &self,
        key: Key<'_>,
        now: Instant,
        max_wait: Duration,
    ) -> Result<Duration, Denied> {
        acquire(&[(self, key)], now, max_wait)
    }

    /// Limits this process to `share` of the quota, as [`Limiter::set_share_at`] at the
    /// current (tokio) time.
    pub(crate) fn set_share(&self, share: f64) -> Result<(), InvalidShare> {
        self.set_share_at(share, Instant::now())
    }

    /// Limits this process to `share` of the quota: each band gets `share` of its rate and
    /// `floor(share * requests)` of its burst, at least 1 (so N sidecars never burst past the
    /// global burst together, unless it is below N).
    ///
    /// Every bucket keeps the tokens it holds (capped at the new burst); a deficit refills at
    /// the new rate. So a change never hands out a burst of free tokens, and reservations of
    /// queued requests stay reserved.
    pub(crate) fn set_share_at(&self, share: f64, now: Instant) -> Result<(), InvalidShare> {
        if !(share > 0.0 && share <= 1.0) {
            return Err(InvalidShare(share));
        }
        let new: Box<[Params]> = self.bands.iter().map(|b| b.params(share)).collect();
        let mut state = self.lock();
        let State {
            params,
            unkeyed,
            overflow,
            partitions,
            sweep_after,
            hasher: _,
        } = &mut *state;
        let all = unkeyed
            .iter_mut()
            .chain(overflow.iter_mut())
            .chain(partitions.values_mut());
        for tats in all {
            for ((tat, old), new) in tats.iter_mut().zip(params.iter()).zip(new.iter()) {
                *tat = rescale(*tat, old, new, now);
            }
        }
        *params = new;
        // Rescaling can bring idle times forward.
        *sweep_after = None;
        Ok(())
    }

    #[cfg(test)]
    /// Admission totals since this limiter was built.
    pub(crate) fn counters(&self) -> LimiterCounters {
        LimiterCounters {
            admitted: self.admitted.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            denied: self.denied.load(Ordering::Relaxed),
            overflowed: self.overflowed.load(Ordering::Relaxed),
        }
    }

    #[cfg(test)]
    /// How many keyed partitions hold state (idle ones included until evicted).
    pub(crate) fn partition_count(&self) -> usize {
        self.lock().partitions.len()
    }

    /// Evicts the partitions idle at `now` (cheaply: only when one can be) and returns how
    /// many remain.
    pub(crate) fn live_partitions(&self, now: Instant) -> usize {
        let mut state = self.lock();
        if state.sweep_after.is_none_or(|t| now >= t) {
            state.sweep(now);
        }
        state.partitions.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain numbers, consistent after every statement: a panic elsewhere while
        // holding the lock leaves nothing half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Moves `tat` so the bucket holds as many tokens under `new` as under `old`, capped at the
/// new burst. Tokens held may be negative (reserved by queued requests).
fn rescale(tat: Instant, old: &Params, new: &Params, now: Instant) -> Instant {
    let debt = tat.saturating_duration_since(now);
    if debt.is_zero() || old.interval.is_zero() {
        // Full, under either parameters.
        return tat;
    }
    let held = old.burst as f64 - debt.as_secs_f64() / old.interval.as_secs_f64();
    let held = held.min(new.burst as f64);
    let new_debt = (new.burst as f64 - held) * new.interval.as_secs_f64();
    now + Duration::try_from_secs_f64(new_debt).unwrap_or(Duration::MAX / 2)
}

// === impl Band ===

impl Band {
    fn params(&self, share: f64) -> Params {
        let rate = self.requests as f64 * share;
        // The epsilon keeps 300 * (1/3) from flooring to 99.
        let burst = ((rate + 1e-9).floor() as u64).max(1);
        let interval = if rate > 0.0 {
            Duration::from_nanos((self.per.as_nanos() as f64 / rate).round() as u64)
        } else {
            Duration::ZERO
        };
        let tolerance = interval.as_nanos() * u128::from(burst - 1);
        Params {
            interval,
            tolerance: Duration::from_nanos(u64::try_from(tolerance).unwrap_or(u64::MAX)),
            burst,
        }
    }
}

// === impl State ===

impl State {
    /// The longest wait among the bands `key` maps to, with that band's index.
    fn wait(&mut self, key: Key<'_>, max_partitions: usize, now: Instant) -> (Duration, usize) {
        let tats = match key {
            // A quota without bands admits everything; keep no partitions for it.
            Some(key) if !self.params.is_empty() => {
                let key = self.hash(key);
                if let Some(tats) = self.partitions.get(&key) {
                    return longest_wait(tats, &self.params, now);
                }
                if self.has_room(max_partitions, now) {
                    // A new partition is full.
                    return (Duration::ZERO, 0);
                }
                self.overflow.as_deref()
            }
            _ => self.unkeyed.as_deref(),
        };
        tats.map_or((Duration::ZERO, 0), |t| longest_wait(t, &self.params, now))
    }

    /// Takes one token from every band `key` maps to, and says whether that was the overflow
    /// partition. Resolves `key` exactly as the [`State::wait`] before it did, the lock having
    /// been held in between.
    fn commit(&mut self, key: Key<'_>, max_partitions: usize, now: Instant) -> bool {
        let (tats, overflow) = match key {
            Some(key) if !self.params.is_empty() => {
                let key = self.hash(key);
                if let Some(tats) = self.partitions.get_mut(&key) {
                    take(tats, &self.params, now);
                    return false;
                }
                if self.has_room(max_partitions, now) {
                    let tats = fresh(&self.params, now);
                    if let Some(next) = &mut self.sweep_after {
                        *next = (*next).min(idle_at(&tats));
                    }
                    self.partitions.insert(key, tats);
                    return false;
                }
                (&mut self.overflow, true)
            }
            _ => (&mut self.unkeyed, false),
        };
        match tats {
            Some(tats) => take(tats, &self.params, now),
            None => *tats = Some(fresh(&self.params, now)),
        }
        overflow
    }

    fn hash(&self, key: &[u8]) -> KeyHash {
        let (a, b) = &self.hasher;
        (u128::from(a.hash_one(key)) << 64) | u128::from(b.hash_one(key))
    }

    /// Whether a new key can have a partition of its own, evicting idle ones if needed.
    fn has_room(&mut self, max_partitions: usize, now: Instant) -> bool {
        if self.partitions.len() >= max_partitions && self.sweep_after.is_none_or(|t| now >= t) {
            self.sweep(now);
        }
        self.partitions.len() < max_partitions
    }

    /// Drops every idle partition and records when the next one can become idle, so a full map
    /// of busy partitions costs one scan per idle time, not one per request.
    fn sweep(&mut self, now: Instant) {
        let mut next = None::<Instant>;
        self.partitions.retain(|_, tats| {
            let idle_at = idle_at(tats);
            if idle_at <= now {
                return false;
            }
            next = Some(next.map_or(idle_at, |n| n.min(idle_at)));
            true
        });
        // A burst of keys that has gone idle gives its table back.
        if self.partitions.capacity() > 4 * self.partitions.len().max(64) {
            self.partitions.shrink_to_fit();
        }
        self.sweep_after = next;
    }
}

/// The longest wait among `tats`, with its band index (0 when none waits).
fn longest_wait(tats: &[Instant], params: &[Params], now: Instant) -> (Duration, usize) {
    let mut longest = (Duration::ZERO, 0);
    for (b, (tat, p)) in tats.iter().zip(params).enumerate() {
        let w = tat
            .saturating_duration_since(now)
            .saturating_sub(p.tolerance);
        if w > longest.0 {
            longest = (w, b);
        }
    }
    longest
}

/// A full partition after giving one token at `now`.
fn fresh(params: &[Params], now: Instant) -> Tats {
    params.iter().map(|p| now + p.interval).collect()
}

fn take(tats: &mut [Instant], params: &[Params], now: Instant) {
    for (tat, p) in tats.iter_mut().zip(params) {
        *tat = (*tat).max(now) + p.interval;
    }
}

/// When every band of a partition is full again. Partitions always have at least one band.
fn idle_at(tats: &[Instant]) -> Instant {
    tats.iter()
        .copied()
        .max()
        .expect("partitions are kept only for quotas with bands")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const MS: Duration = Duration::from_millis(1);

    fn band(name: &str, requests: u64, per: Duration) -> BandPolicy {
        BandPolicy {
            name: name.to_string(),
            requests,
            per,
        }
    }

    fn per_second(requests: u64) -> Limiter {
        Limiter::new(&[band("burst", requests, Duration::from_secs(1))], 16)
    }

    /// Admits as many requests as the limiter takes at once (reject mode), up to `cap`.
    fn drain(l: &Limiter, key: Option<&str>, cap: usize) -> usize {
        let now = Instant::now();
        (0..cap)
            .take_while(|_| {
                l.acquire(key.map(str::as_bytes), now, Duration::ZERO)
                    .is_ok()
            })
            .count()
    }

    fn denied(l: &Limiter, key: Option<&str>) -> Denied {
        l.acquire(key.map(str::as_bytes), Instant::now(), Duration::ZERO)
            .expect_err("should be denied")
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_sustained_refill_exactly() {
        let l = per_second(20);
        let now = Instant::now();
        for _ in 0..20 {
            assert_eq!(l.acquire(None, now, Duration::ZERO), Ok(Duration::ZERO));
        }
        let d = denied(&l, None);
        assert_eq!(&*d.band, "burst");
        assert_eq!(d.quota, 0);
        assert_eq!(d.retry_after, 50 * MS);

        // One token every 50 ms, not a nanosecond earlier.
        advance(49 * MS).await;
        assert_eq!(denied(&l, None).retry_after, MS);
        advance(MS).await;
        assert_eq!(drain(&l, None, 100), 1);
        advance(500 * MS).await;
        assert_eq!(drain(&l, None, 100), 10);

        // Idle for a second: the whole burst is back, and no more.
        advance(Duration::from_secs(5)).await;
        assert_eq!(drain(&l, None, 100), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn every_band_must_admit_burst_and_sustained() {
        let l = Limiter::new(
            &[
                band("sustained", 300, Duration::from_secs(60)),
                band("burst", 20, Duration::from_secs(1)),
            ],
            16,
        );
        // Each second the burst band allows 20 while the sustained band refills only 5, so the
        // sustained bucket (300) runs dry after 19 full seconds: 300 + 19 s * 5/s = 395.
        for _ in 0..19 {
            assert_eq!(drain(&l, None, 100), 20);
            let d = denied(&l, None);
            assert_eq!((&*d.band, d.retry_after), ("burst", 50 * MS));
            advance(Duration::from_secs(1)).await;
        }
        assert_eq!(drain(&l, None, 100), 15);
        let d = denied(&l, None);
        assert_eq!((&*d.band, d.retry_after), ("sustained", 200 * MS));

        // From here the sustained rate rules: one request per 200 ms though the burst band has
        // room.
        advance(200 * MS).await;
        assert_eq!(drain(&l, None, 100), 1);
        assert_eq!(&*denied(&l, None).band, "sustained");
        assert_eq!(l.counters().admitted, 19 * 20 + 15 + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn all_or_nothing_across_two_limiters() {
        let route = per_second(2);
        let account = per_second(5);
        let now = Instant::now();
        let both = [(&route, None), (&account, None)];
        assert!(acquire(&both, now, Duration::ZERO).is_ok());
        assert!(acquire(&both, now, Duration::ZERO).is_ok());

        // The route refuses: the account must not have paid for it.
        let d = acquire(&both, now, Duration::ZERO).unwrap_err();
        assert_eq!(d.quota, 0);
        assert_eq!(drain(&account, None, 100), 3);

        // The other way round: the account refuses, the route keeps its tokens.
        advance(Duration::from_secs(1)).await;
        let now = Instant::now();
        assert_eq!(drain(&account, None, 100), 5);
        let d = acquire(&both, now, Duration::ZERO).unwrap_err();
        assert_eq!((d.quota, d.retry_after), (1, 200 * MS));
        assert_eq!(drain(&route, None, 100), 2);
        // Each limiter counts only the refusals it caused (here: the joint ones plus the
        // refusals that end each `drain`).
        assert_eq!(route.counters().denied, 1 + 1);
        assert_eq!(account.counters().denied, 1 + 2);
    }

    #[tokio::test(start_paused = true)]
    async fn queueing_on_one_quota_costs_the_other_one_token_not_the_wait() {
        let route = per_second(10); // 100 ms interval
        let account = per_second(1000); // 1 ms interval, burst 1000
        let both = [(&route, None), (&account, None)];
        assert_eq!(drain(&route, None, 100), 10);
        let wait = acquire(&both, Instant::now(), Duration::from_secs(1)).unwrap();
        assert_eq!(wait, 100 * MS);
        // The account lost exactly one token: other routes are not held back by this queue.
        assert_eq!(drain(&account, None, 2000), 999);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_waits_are_fifo_and_bounded_by_max_wait() {
        let l = per_second(10); // 100 ms interval
        let max_wait = Duration::from_secs(1);
        assert_eq!(drain(&l, None, 100), 10);
        let now = Instant::now();
        // Each waiter is served 100 ms after the previous one, in arrival order.
        for n in 1..=10 {
            assert_eq!(l.acquire(None, now, max_wait), Ok(n * 100 * MS));
        }
        let d = l.acquire(None, now, max_wait).unwrap_err();
        assert_eq!(d.retry_after, 1100 * MS);
        // A refused waiter reserved nothing: the next one is told the same.
        assert_eq!(
            l.acquire(None, now, max_wait).unwrap_err().retry_after,
            1100 * MS
        );

        // Reservations hold as time passes: a newcomer still queues behind all ten.
        advance(100 * MS).await;
        assert_eq!(l.acquire(None, Instant::now(), max_wait), Ok(max_wait));
        assert_eq!(l.counters().queued, 11);
    }

    #[tokio::test(start_paused = true)]
    async fn partitions_are_independent() {
        let l = per_second(3);
        assert_eq!(drain(&l, Some("eu"), 100), 3);
        assert!(denied(&l, Some("eu")).retry_after > Duration::ZERO);
        assert_eq!(drain(&l, Some("us"), 100), 3);
        // Requests without the key have a partition of their own.
        assert_eq!(drain(&l, None, 100), 3);
        assert_eq!(l.partition_count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn partition_cap_overflow_and_idle_eviction() {
        let l = Limiter::new(&[band("b", 1, Duration::from_secs(1))], 2);
        assert_eq!(drain(&l, Some("a"), 10), 1);
        assert_eq!(drain(&l, Some("b"), 10), 1);
        // Full of busy partitions: new keys share the overflow partition.
        assert_eq!(drain(&l, Some("c"), 10), 1);
        assert_eq!(denied(&l, Some("d")).retry_after, Duration::from_secs(1));
        assert_eq!(l.partition_count(), 2);

        // A second later a and b are full again, so they are evicted for new keys.
        advance(Duration::from_secs(1)).await;
        assert_eq!(drain(&l, Some("e"), 10), 1);
        assert_eq!(drain(&l, Some("f"), 10), 1);
        assert_eq!(l.partition_count(), 2);
        // e and f are busy: g goes to overflow (idle again), h shares it.
        assert_eq!(drain(&l, Some("g"), 10), 1);
        assert_eq!(drain(&l, Some("h"), 10), 0);
        // An evicted key starts fresh, but here only via overflow, which h's attempt left as g
        // left it: busy.
        assert_eq!(drain(&l, Some("a"), 10), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn partially_refilled_partition_is_not_evicted() {
        // 2 per second: 500 ms interval, burst 2.
        let l = Limiter::new(&[band("b", 2, Duration::from_secs(1))], 1);
        assert_eq!(drain(&l, Some("a"), 10), 2);
        advance(500 * MS).await;
        // "a" holds one token, not two: it is not evictable, "b" overflows.
        assert_eq!(drain(&l, Some("b"), 10), 2);
        assert_eq!(l.partition_count(), 1);
        // "a" kept its state: one token, then empty.
        assert_eq!(drain(&l, Some("a"), 10), 1);
        advance(Duration::from_secs(1)).await;
        // Now "a" is full again: "b" takes its place with a fresh partition of its own.
        assert_eq!(drain(&l, Some("b"), 10), 2);
        assert_eq!(l.partition_count(), 1);
        // "a" was evicted and finds the map full of busy "b": overflow, which refilled.
        assert_eq!(drain(&l, Some("a"), 10), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn set_share_halves_rate_and_burst() {
        let l = per_second(20);
        l.set_share(0.5).unwrap();
        assert_eq!(drain(&l, None, 100), 10);
        assert_eq!(denied(&l, None).retry_after, 100 * MS);
        advance(Duration::from_secs(1)).await;
        assert_eq!(drain(&l, None, 100), 10);

        // A tiny share still allows one request per refill.
        l.set_share(0.01).unwrap();
        advance(Duration::from_secs(10)).await;
        assert_eq!(drain(&l, None, 100), 1);
        assert_eq!(denied(&l, None).retry_after, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn set_share_hands_out_no_free_tokens() {
        let l = per_second(20);
        l.set_share(0.5).unwrap();
        assert_eq!(drain(&l, Some("k"), 100), 10);
        // A larger share enlarges the bucket but does not fill it: the deficit refills at the
        // new rate (50 ms a token).
        l.set_share(1.0).unwrap();
        assert_eq!(denied(&l, Some("k")).retry_after, 50 * MS);
        advance(250 * MS).await;
        assert_eq!(drain(&l, Some("k"), 100), 5);

        // A smaller share caps what is held at the new burst.
        advance(Duration::from_secs(5)).await;
        l.set_share(0.25).unwrap();
        assert_eq!(drain(&l, Some("k"), 100), 5);
        assert_eq!(denied(&l, Some("k")).retry_after, 200 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn set_share_keeps_queued_reservations() {
        let l = per_second(10);
        assert_eq!(drain(&l, None, 100), 10);
        assert_eq!(
            l.acquire(None, Instant::now(), Duration::from_secs(1)),
            Ok(100 * MS)
        );
        // One token reserved beyond an empty bucket. At half share (burst 5, 200 ms a token)
        // it is still reserved: a newcomer waits for it and for its own token, 2 x 200 ms.
        l.set_share(0.5).unwrap();
        assert_eq!(denied(&l, None).retry_after, 400 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn invalid_share_is_refused() {
        let l = per_second(20);
        for bad in [0.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
            assert!(l.set_share(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(drain(&l, None, 100), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn quota_without_bands_admits_everything() {
        let l = Limiter::new(&[], 0);
        assert_eq!(drain(&l, Some("k"), 1000), 1000);
        assert_eq!(l.partition_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_limiter_listed_twice_is_locked_once_and_charged_per_entry() {
        let l = per_second(4);
        let twice = [(&l, Some(&b"a"[..])), (&l, None)];
        assert!(acquire(&twice, Instant::now(), Duration::ZERO).is_ok());
        assert_eq!(drain(&l, Some("a"), 100), 3);
        assert_eq!(drain(&l, None, 100), 3);
        assert_eq!(l.counters().admitted, 2 + 6);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_acquires_in_opposite_orders_neither_deadlock_nor_overspend() {
        let a = Arc::new(per_second(100));
        let b = Arc::new(per_second(100));
        let now = Instant::now();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (a, b) = (Arc::clone(&a), Arc::clone(&b));
                std::thread::spawn(move || {
                    let mut ok = 0;
                    for _ in 0..100 {
                        let quotas = if t % 2 == 0 {
                            [(&*a, None), (&*b, None)]
                        } else {
                            [(&*b, None), (&*a, None)]
                        };
                        ok += usize::from(acquire(&quotas, now, Duration::ZERO).is_ok());
                    }
                    ok
                })
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(admitted, 100);
        assert_eq!(a.counters().admitted, 100);
        assert_eq!(b.counters().admitted, 100);
        assert_eq!(a.counters().denied + b.counters().denied, 300);
    }

    #[tokio::test(start_paused = true)]
    async fn long_keys_are_told_apart_by_every_byte() {
        let l = per_second(1);
        let a = "x".repeat(16 * 1024);
        let b = format!("{}y", &a[1..]);
        let c = format!("{a}z");
        for key in [&a, &b, &c] {
            assert_eq!(drain(&l, Some(key), 10), 1, "{} bytes", key.len());
        }
        assert_eq!(l.partition_count(), 3);
        // Any bytes are a key, not only UTF-8.
        let raw: &[u8] = &[0xff, 0x00, 0xfe];
        assert!(l.acquire(Some(raw), Instant::now(), Duration::ZERO).is_ok());
        assert!(
            l.acquire(Some(raw), Instant::now(), Duration::ZERO)
                .is_err()
        );
        assert_eq!(l.partition_count(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_partitions_are_evicted_when_counted() {
        // 2 per second: an emptied partition is full again, idle, a second later.
        let l = Limiter::new(&[band("b", 2, Duration::from_secs(1))], 100);
        for k in 0..50 {
            assert_eq!(drain(&l, Some(&format!("k{k}")), 10), 2);
        }
        advance(500 * MS).await;
        assert_eq!(drain(&l, Some("late"), 10), 2);
        assert_eq!(l.live_partitions(Instant::now()), 51);
        advance(500 * MS).await;
        // The first fifty are full again; "late" still owes half a second.
        assert_eq!(l.live_partitions(Instant::now()), 1);
        advance(500 * MS).await;
        assert_eq!(l.live_partitions(Instant::now()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn overflow_is_reported_and_counted() {
        let l = Limiter::new(&[band("b", 5, Duration::from_secs(1))], 1);
        let now = Instant::now();
        let a = admit(&[(&l, Some(&b"a"[..]))], now, Duration::ZERO).unwrap();
        assert!(!a.overflow);
        let b = admit(&[(&l, Some(&b"b"[..]))], now, Duration::ZERO).unwrap();
        assert!(b.overflow, "the cap is one partition and a is busy");
        let none = admit(&[(&l, None)], now, Duration::ZERO).unwrap();
        assert!(!none.overflow, "requests without a key are not overflow");
        assert_eq!(l.counters().overflowed, 1);
    }

    mod bounds {
        use super::*;
        use proptest::prelude::*;

        /// One request: which client (an index), how long its key is, and how long after the
        /// previous request it arrives.
        fn requests() -> impl Strategy<Value = Vec<(u16, usize, u64)>> {
            proptest::collection::vec((0u16..200, 0usize..20_000, 0u64..1_500), 1..300)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// Whatever keys arrive, and however long, the limiter holds at most its cap of
            /// partitions; a key with a partition of its own never gets more than its burst at
            /// once, and everything beyond the cap shares one overflow partition.
            #[test]
            fn partitions_stay_within_the_cap(reqs in requests()) {
                const CAP: usize = 8;
                // 3 per second: burst 3, a token every 333 ms.
                let l = Limiter::new(&[band("b", 3, Duration::from_secs(1))], CAP);
                let mut now = Instant::now();
                let mut admitted_at_once = std::collections::HashMap::<Vec<u8>, (Instant, u32)>::new();
                let mut overflow_at_once = (now, 0u32);
                for (client, len, gap) in reqs {
                    now += Duration::from_millis(gap);
                    let mut key = format!("client-{client}-").into_bytes();
                    key.resize(key.len() + len, b'v');
                    if let Ok(a) = admit(&[(&l, Some(&key[..]))], now, Duration::ZERO) {
                        let (at, n) = if a.overflow {
                            &mut overflow_at_once
                        } else {
                            admitted_at_once.entry(key).or_insert((now, 0))
                        };
                        if *at != now {
                            (*at, *n) = (now, 0);
                        }
                        *n += 1;
                        prop_assert!(*n <= 3, "more than the burst at one instant");
                    }
                    prop_assert!(l.partition_count() <= CAP);
                }
                prop_assert!(l.live_partitions(now) <= CAP);
            }
        }
    }
}
