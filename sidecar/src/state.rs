//! Shared, mutable state behind a revision: buckets, breakers, retry budgets, the stale cache,
//! connection pools and traffic counters.
//!
//! A new revision carries each piece over from the previous one when the configuration that
//! shapes it is unchanged, so flipping a kill switch or editing one route does not refill every
//! bucket, close every breaker or drop every pooled connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::ClientConfig;
use tokio::time::Instant;
use tollgate_crds::policy::{
    AdaptivePolicy, BreakerPolicy, BreakerScope, BudgetPolicy, ConcurrencyPolicy, IntegrationId,
    IntegrationPolicy, RateLimitPolicy, RoutePolicy,
};

use crate::answer::Reason;
use crate::client::{self, ClientIdentity, HttpClient, PoolOptions};
use crate::config::routes_in_order;
use crate::engine::aimd::{Aimd, AimdParams};
use crate::engine::breaker::{Breaker, BreakerState};
use crate::engine::budget::RetryBudget;
use crate::engine::concurrency::InFlight;
use crate::engine::limiter::Limiter;
use crate::engine::stale_cache::StaleCache;
use crate::layers::send::Upstream;
use crate::lifecycle::Lifecycle;
use crate::telemetry::metrics::RouteMetrics;

/// What building state needs from the process.
#[derive(Clone)]
pub struct StateContext {
    pub tls: Arc<ClientConfig>,
    /// The roots `tls` trusts, which an integration's own `caBundle` adds to.
    pub roots: Arc<rustls::RootCertStore>,
    pub pool: PoolOptions,
    /// Distinct `partitionBy` values tracked per quota.
    pub max_partitions: usize,
    pub cache_max_entries: usize,
    pub cache_max_bytes: usize,
    /// Where background work (OAuth2 token fetches) counts what it does.
    pub metrics: Arc<crate::telemetry::metrics::Metrics>,
}

/// Share of each global quota this process may use, per integration (cluster mode: set by the
/// operator). Absent: the whole quota.
pub type QuotaShares = HashMap<IntegrationId, f64>;

impl StateContext {
    pub fn new(tls: Arc<ClientConfig>) -> Self {
        StateContext {
            tls,
            roots: Arc::new(client::roots(None).unwrap_or_else(|_| rustls::RootCertStore::empty())),
            pool: PoolOptions::default(),
            max_partitions: 10_000,
            cache_max_entries: 1_000,
            cache_max_bytes: 32 * 1024 * 1024,
            metrics: Arc::default(),
        }
    }

    /// The roots `tls` was made from (the system's and `--ca-bundle`).
    pub fn with_roots(mut self, roots: rustls::RootCertStore) -> Self {
        self.roots = Arc::new(roots);
        self
    }
}

/// A quota with the configuration it was built from.
#[derive(Clone)]
pub struct Quota {
    pub policy: RateLimitPolicy,
    pub limiter: Arc<Limiter>,
    /// `rateLimit.adaptive`: the partner's throttling scales the share in force.
    pub(crate) adaptive: Option<Arc<AdaptiveQuota>>,
    /// `rateLimit.overrides`: the limiter of each overridden value of the partition header.
    pub(crate) overrides: Arc<HashMap<Vec<u8>, Arc<Limiter>>>,
}

#[derive(Clone)]
struct KeyedBreaker {
    policy: BreakerPolicy,
    breaker: Arc<Breaker>,
}

/// One route's policy state, resolved when the revision is built. The layers read only their
/// own piece of it through [`crate::layers::Call::route_state`].
pub struct RouteState {
    /// The route's name; state is matched by name across revisions, not by position.
    pub name: String,
    /// The route's own quota (`spec.routes[].rateLimit`).
    pub quota: Option<Quota>,
    /// The route's own cap on calls in flight (`spec.routes[].concurrency`).
    pub(crate) concurrency: Option<Arc<InFlight>>,
    /// The breaker governing the route: its own, the integration's, or none.
    pub breaker: Option<Arc<Breaker>>,
    /// The route's own breaker (`circuitBreaker` scoped to the route), kept for carry-over.
    own_breaker: Option<KeyedBreaker>,
    /// The retry budget, and the policy it was built from.
    pub budget: Arc<RetryBudget>,
    budget_policy: BudgetPolicy,
    /// Its call metrics, resolved on the route's first call in this revision.
    pub metrics: OnceLock<RouteMetrics>,
}

impl RouteState {
    /// `old`: the state of the route of the same name in the previous revision, if any; each
    /// piece whose policy is unchanged carries over.
    fn build(
        route: &RoutePolicy,
        old: Option<&RouteState>,
        integration_breaker: Option<&KeyedBreaker>,
        ctx: &StateContext,
        share: f64,
    ) -> Self {
        let quota = route
            .rate_limit
            .as_ref()
            .map(|p| build_quota(p, old.and_then(|o| o.quota.as_ref()), ctx, share));
        let own_breaker = match &route.breaker {
            BreakerScope::Route(p) => {
                Some(keyed_breaker(p, old.and_then(|o| o.own_breaker.as_ref())))
            }
            _ => None,
        };
        let breaker = match &route.breaker {
            BreakerScope::None => None,
            BreakerScope::Integration => integration_breaker.map(|k| k.breaker.clone()),
            BreakerScope::Route(_) => own_breaker.as_ref().map(|k| k.breaker.clone()),
        };
        let policy = &route.retries.budget;
        let budget = match old {
            Some(o) if &o.budget_policy == policy => o.budget.clone(),
            _ => Arc::new(RetryBudget::new(policy)),
        };
        RouteState {
            name: route.name.clone(),
            quota,
            concurrency: build_cap(
                route.concurrency.as_ref(),
                old.and_then(|o| o.concurrency.as_ref()),
            ),
            breaker,
            own_breaker,
            budget,
            budget_policy: policy.clone(),
            metrics: OnceLock::new(),
        }
    }
}

/// Per-integration state, with one [`RouteState`] per route.
pub struct IntegrationState {
    pub client: HttpClient,
    /// Where attempts go, parsed once.
    pub upstream: Upstream,
    /// What the pooled client was built from: connect deadline, `caBundle` and client
    /// certificate.
    client_key: (Duration, Option<String>, Option<Arc<ClientIdentity>>),
    /// The integration's account-wide quota.
    pub quota: Option<Quota>,
    /// The integration's cap on calls in flight (`spec.concurrency`).
    pub(crate) concurrency: Option<Arc<InFlight>>,
    breaker: Option<KeyedBreaker>,
    /// The declared routes in order, then the default route (see [`IntegrationState::route`]).
    routes: Vec<RouteState>,
    pub cache: Option<Arc<StaleCache>>,
    pub traffic: Arc<Traffic>,
    /// What the partner announced about its routes' lifecycle; kept across revisions.
    pub lifecycle: Arc<Lifecycle>,
    /// The credential's start-up check; kept across revisions.
    pub check: Arc<crate::verify::CheckState>,
}

impl IntegrationState {
    /// `identity`: the client certificate presented to the partner, if any. `share`: the
    /// fraction of each global quota this process may use (cluster mode; 1.0 otherwise).
    pub fn build(
        policy: &IntegrationPolicy,
        old: Option<&IntegrationState>,
        identity: Option<Arc<ClientIdentity>>,
        ctx: &StateContext,
        share: f64,
    ) -> Self {
        let connect_timeout = policy.upstream.connect_timeout;
        let client_key = (connect_timeout, policy.upstream.ca_bundle.clone(), identity);
        let client = match old {
            Some(o) if o.client_key == client_key => o.client.clone(),
            _ => client::build(
                client::integration_tls(
                    &ctx.tls,
                    &ctx.roots,
                    client_key.1.as_deref(),
                    client_key.2.as_deref(),
                ),
                connect_timeout,
                &ctx.pool,
            ),
        };
        let quota = policy
            .rate_limit
            .as_ref()
            .map(|p| build_quota(p, old.and_then(|o| o.quota.as_ref()), ctx, share));
        let breaker = policy
            .circuit_breaker
            .as_ref()
            .map(|p| keyed_breaker(p, old.and_then(|o| o.breaker.as_ref())));
        let routes: Vec<RouteState> = routes_in_order(policy)
            .map(|r| {
                let prev = old.and_then(|o| o.routes.iter().find(|s| s.name == r.name));
                RouteState::build(r, prev, breaker.as_ref(), ctx, share)
            })
            .collect();
        let wants_cache = routes_in_order(policy).any(|r| r.fallback.stale_if_error.is_some());
        let cache = wants_cache.then(|| {
            old.and_then(|o| o.cache.clone()).unwrap_or_else(|| {
                Arc::new(StaleCache::new(ctx.cache_max_entries, ctx.cache_max_bytes))
            })
        });
        IntegrationState {
            client,
            upstream: Upstream::new(&policy.upstream),
            client_key,
            quota,
            concurrency: build_cap(
                policy.concurrency.as_ref(),
                old.and_then(|o| o.concurrency.as_ref()),
            ),
            breaker,
            routes,
            cache,
            traffic: old.map(|o| o.traffic.clone()).unwrap_or_default(),
            lifecycle: old.map(|o| o.lifecycle.clone()).unwrap_or_default(),
            check: old.map(|o| o.check.clone()).unwrap_or_default(),
        }
    }

    /// The state of route `index`, numbered as in [`routes_in_order`].
    pub fn route(&self, index: usize) -> &RouteState {
        self.routes
            .get(index)
            .or(self.routes.last())
            .expect("every integration has a default route")
    }

    /// The client certificate this integration presents to its partner, if any.
    pub fn client_identity(&self) -> Option<&Arc<ClientIdentity>> {
        self.client_key.2.as_ref()
    }

    /// `(route label, state)` for every breaker; the integration-wide breaker is labelled `*`.
    pub fn breaker_states(&self, now: Instant) -> Vec<(String, BreakerState)> {
        let mut out = Vec::new();
        if let Some(k) = &self.breaker {
            out.push(("*".to_string(), k.breaker.state(now)));
        }
        for r in &self.routes {
            if let Some(k) = &r.own_breaker {
                out.push((r.name.clone(), k.breaker.state(now)));
            }
        }
        out
    }

    /// The lowest factor of the integration's and its routes' adaptive quotas, percent; `None`
    /// without one.
    pub fn adaptive_percent(&self, now: Instant) -> Option<f64> {
        std::iter::once(self.quota.as_ref())
            .chain(self.routes.iter().map(|r| r.quota.as_ref()))
            .flatten()
            .filter_map(|q| q.adaptive_factor(now))
            .min_by(f64::total_cmp)
            .map(|f| (f * 100.0).clamp(0.0, 100.0))
    }

    /// `(route label, quota kind, live partitions)` for every partitioned quota, evicting idle
    /// partitions first; the integration's quota is labelled `*`.
    pub fn partition_counts(&self, now: Instant) -> Vec<(String, &'static str, usize)> {
        let partitioned =
            |q: &&Quota| q.policy.partition_by.is_some() || q.policy.partition_by_client_address;
        let mut out = Vec::new();
        if let Some(q) = self.quota.as_ref().filter(partitioned) {
            out.push((
                "*".to_string(),
                "integration",
                q.limiter.live_partitions(now),
            ));
        }
        for r in &self.routes {
            if let Some(q) = r.quota.as_ref().filter(partitioned) {
                let count = q.limiter.live_partitions(now);
                out.push((r.name.clone(), "route", count));
            }
        }
        out
    }

    /// Counts a finished call for status reports.
    pub fn record_call(
        &self,
        status: u16,
        reason: Option<Reason>,
        broken_contract: bool,
        elapsed: Duration,
    ) {
        self.traffic
            .record(status, reason, broken_contract, elapsed);
    }
}

/// A cap carries over (with the calls holding its places) while its policy is unchanged; a
/// changed cap starts empty.
fn build_cap(
    policy: Option<&ConcurrencyPolicy>,
    old: Option<&Arc<InFlight>>,
) -> Option<Arc<InFlight>> {
    let policy = policy?;
    Some(match old {
        Some(o) if &o.policy == policy => o.clone(),
        _ => Arc::new(InFlight::new(policy)),
    })
}

/// Throttle signals within this long of a decrease are the same episode.
const ADAPTIVE_COOLDOWN: Duration = Duration::from_secs(1);

/// An adaptive quota's factor ([`Aimd`], kept across revisions while its policy and bands are
/// unchanged) and this revision's share, which the factor scales.
pub(crate) struct AdaptiveQuota {
    aimd: Arc<Aimd>,
    policy: AdaptivePolicy,
    share: f64,
    /// The factor last given to the limiter.
    applied: std::sync::Mutex<f64>,
}

impl Quota {
    /// The partner throttled: lowers the rate in force. The new factor if it changed.
    pub(crate) fn throttled(&self, now: Instant) -> Option<f64> {
        let a = self.adaptive.as_ref()?;
        let f = a.aimd.throttled(now)?;
        self.apply(a, f, now);
        Some(f)
    }

    /// Brings the rate in force up to date with the recovery; the new factor if it changed
    /// by at least 1% of the configured rate (or reached it).
    pub(crate) fn refresh(&self, now: Instant) -> Option<f64> {
        let a = self.adaptive.as_ref()?;
        let f = a.aimd.factor(now);
        let applied = *a.applied.lock().unwrap_or_else(|e| e.into_inner());
        if (f - applied).abs() < 0.01 && !(f >= 1.0 && applied < 1.0) {
            return None;
        }
        self.apply(a, f, now);
        Some(f)
    }

    /// With `adaptive`: the factor the partner's throttling leaves in force now.
    pub(crate) fn adaptive_factor(&self, now: Instant) -> Option<f64> {
        self.adaptive.as_ref().map(|a| a.aimd.factor(now))
    }

    /// The factor in force (1 without `adaptive`) and the share it scales.
    pub(crate) fn factor_and_share(&self) -> (f64, f64) {
        self.adaptive.as_ref().map_or((1.0, 1.0), |a| {
            (
                *a.applied.lock().unwrap_or_else(|e| e.into_inner()),
                a.share,
            )
        })
    }

    fn apply(&self, a: &AdaptiveQuota, factor: f64, now: Instant) {
        *a.applied.lock().unwrap_or_else(|e| e.into_inner()) = factor;
        let share = (a.share * factor).clamp(f64::MIN_POSITIVE, 1.0);
        for limiter in std::iter::once(&self.limiter).chain(self.overrides.values()) {
            if let Err(e) = limiter.set_share_at(share, now) {
                tracing::warn!(error = %e, "ignoring an invalid adaptive share");
            }
        }
    }

    /// The limiter for a request whose `partitionBy` header is `first` and whose whole
    /// partition key is `key` (`rest`: its part after `first`, with `partitionAlsoBy`): an
    /// override's, keyed by the rest (the value has it to itself), or the quota's own, keyed
    /// by the whole key.
    pub(crate) fn limiter_for<'k>(
        &self,
        first: Option<&[u8]>,
        key: Option<&'k [u8]>,
        rest: Option<&'k [u8]>,
    ) -> (&Limiter, Option<&'k [u8]>) {
        match first.and_then(|k| self.overrides.get(k)) {
            Some(l) => (l, rest),
            None => (&self.limiter, key),
        }
    }
}

fn build_quota(
    policy: &RateLimitPolicy,
    old: Option<&Quota>,
    ctx: &StateContext,
    share: f64,
) -> Quota {
    let limiter = match old {
        Some(q)
            if q.policy.bands == policy.bands
                && q.policy.partition_by.is_some() == policy.partition_by.is_some()
                && q.policy.partition_also_by == policy.partition_also_by
                && q.policy.partition_by_client_address == policy.partition_by_client_address =>
        {
            q.limiter.clone()
        }
        _ => Arc::new(Limiter::new(&policy.bands, ctx.max_partitions)),
    };
    let scoped = if policy.scope == tollgate_crds::v1alpha1::RateLimitScope::Global {
        share
    } else {
        1.0
    };
    let now = Instant::now();
    let adaptive = policy.adaptive.as_ref().map(|p| {
        let kept = old
            .and_then(|q| q.adaptive.as_ref())
            .filter(|a| &a.policy == p && old.is_some_and(|q| Arc::ptr_eq(&q.limiter, &limiter)));
        let aimd = kept.map(|a| a.aimd.clone()).unwrap_or_else(|| {
            Arc::new(Aimd::new(
                AimdParams {
                    min: f64::from(p.min_percent) / 100.0,
                    recovery: p.recovery,
                    cooldown: ADAPTIVE_COOLDOWN,
                },
                now,
            ))
        });
        let factor = aimd.factor(now);
        Arc::new(AdaptiveQuota {
            aimd,
            policy: p.clone(),
            share: scoped,
            applied: std::sync::Mutex::new(factor),
        })
    });
    let in_force = (scoped * adaptive.as_ref().map_or(1.0, |a| a.aimd.factor(now)))
        .clamp(f64::MIN_POSITIVE, 1.0);
    if let Err(e) = limiter.set_share(in_force) {
        tracing::warn!(integration = ?policy.bands, error = %e, "ignoring an invalid quota share");
    }
    // Each overridden value keeps its buckets while its bands are unchanged.
    let mut overrides = HashMap::new();
    for o in &policy.overrides {
        for value in &o.values {
            let kept = old
                .and_then(|q| q.overrides.get(value.as_bytes()))
                .filter(|_| {
                    old.is_some_and(|q| {
                        q.policy.partition_also_by == policy.partition_also_by
                            && q.policy.partition_by_client_address
                                == policy.partition_by_client_address
                            && q.policy
                                .overrides
                                .iter()
                                .any(|p| p.bands == o.bands && p.values.contains(value))
                    })
                });
            // With `partitionAlsoBy` the other headers still divide an overridden value.
            let partitions =
                if policy.partition_also_by.is_empty() && !policy.partition_by_client_address {
                    1
                } else {
                    ctx.max_partitions
                };
            let l = kept
                .cloned()
                .unwrap_or_else(|| Arc::new(Limiter::new(&o.bands, partitions)));
            if let Err(e) = l.set_share(in_force) {
                tracing::warn!(error = %e, "ignoring an invalid quota share");
            }
            overrides.insert(value.as_bytes().to_vec(), l);
        }
    }
    Quota {
        policy: policy.clone(),
        limiter,
        adaptive,
        overrides: Arc::new(overrides),
    }
}

fn keyed_breaker(policy: &BreakerPolicy, old: Option<&KeyedBreaker>) -> KeyedBreaker {
    match old {
        Some(k) if &k.policy == policy => k.clone(),
        _ => KeyedBreaker {
            policy: policy.clone(),
            breaker: Arc::new(Breaker::new(policy.clone())),
        },
    }
}

/// Traffic counters of one integration since the sidecar started, for status reports.
#[derive(Debug, Default)]
pub struct Traffic {
    pub requests: AtomicU64,
    /// Calls that reached (or failed to reach) the partner and failed: its 5xx, timeouts,
    /// an unreachable partner.
    pub errors: AtomicU64,
    pub rate_limited: AtomicU64,
    /// Calls the sidecar answered itself without calling the partner, rate limiting aside
    /// ([`Reason::is_refusal`]).
    pub refused: AtomicU64,
    /// Latency histogram, buckets of [`LATENCY_BUCKETS_MS`] plus one overflow bucket.
    pub latency: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    /// With a rotation window (`credentials.secondaryRef`): partner answers to the primary key
    /// other than 401.
    pub primary_served: AtomicU64,
    /// Partner answers other than 401 to the secondary key, after the primary got a 401.
    pub secondary_served: AtomicU64,
    /// Unix seconds of the last call the secondary key served; 0: never.
    pub secondary_last_used: std::sync::atomic::AtomicI64,
}

/// Upper bounds (milliseconds) of the latency buckets, as the operator reads them.
pub use tollgate_crds::distribution::LATENCY_BUCKETS_MS;

impl Traffic {
    /// `broken_contract`: a 2xx whose body breaks the route's `contract`, a partner failure.
    pub fn record(
        &self,
        status: u16,
        reason: Option<Reason>,
        broken_contract: bool,
        elapsed: Duration,
    ) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match reason {
            Some(Reason::RateLimited) => {
                self.rate_limited.fetch_add(1, Ordering::Relaxed);
            }
            Some(r) if r.is_refusal() => {
                self.refused.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
            None if status >= 500 || broken_contract => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
            None => {}
        }
        let ms = elapsed.as_millis() as u64;
        let bucket = LATENCY_BUCKETS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sidecar's own answers are refusals, not the partner's errors; timeouts and an
    /// unreachable partner are.
    #[test]
    fn refusals_are_counted_apart_from_partner_errors() {
        let t = Traffic::default();
        let ms = Duration::from_millis(3);
        for r in [
            Reason::KillSwitch,
            Reason::CircuitOpen,
            Reason::DeprecatedVersion,
        ] {
            t.record(r.status().as_u16(), Some(r), false, ms);
        }
        t.record(429, Some(Reason::RateLimited), false, ms);
        t.record(504, Some(Reason::Timeout), false, ms);
        t.record(502, Some(Reason::UpstreamUnreachable), false, ms);
        t.record(500, None, false, ms);
        t.record(404, None, false, ms);
        t.record(200, None, false, ms);
        t.record(200, None, true, ms);
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(n(&t.requests), 10);
        assert_eq!(n(&t.refused), 3);
        assert_eq!(n(&t.rate_limited), 1);
        assert_eq!(n(&t.errors), 4);
    }
}
