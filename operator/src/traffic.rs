//! Aggregates sidecar reports into what a PartnerIntegration's status shows.
//!
//! Each sidecar reports deltas per integration every few seconds. Per (integration, pod) the
//! store keeps the samples of the last `window` (one minute by default), so rates are per
//! minute over what was actually covered, and the latest revision and breaker state each pod
//! reported.
//!
//! Reports come from outside and are bounded: a report with impossible values is refused
//! ([`ReportRefused`], naming the field), every sum saturates, and a pod that stopped
//! reporting is forgotten once its last report left the window.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tollgate_crds::distribution::{
    BreakerState, CONTRACT_VIOLATION_KINDS, ContractViolationCount, CredentialCheckResult,
    CredentialKeys, IntegrationReport, LATENCY_BUCKETS_MS, MAX_CHECK_MESSAGE_BYTES,
    MAX_CONTRACT_VIOLATION_ENTRIES, MAX_LIFECYCLE_ROUTES, MAX_LIFECYCLE_TEXT_BYTES, RouteLifecycle,
    bucket_quantile,
};
use tollgate_crds::v1alpha1::{SidecarSummary, TrafficSummary};

use crate::catalog::Key;

/// `namespace/pod-name`.
pub type PodKey = String;

/// Most calls per second one sidecar may claim for one integration.
pub const MAX_CALLS_PER_SECOND: u64 = 1_000_000;
/// Longest p95 a report may claim (a day); anything above is not a measurement.
pub const MAX_LATENCY_MILLIS: f64 = 86_400_000.0;
/// Longest config revision a report may name.
pub const MAX_REVISION_BYTES: usize = 128;
/// Most samples kept per (integration, pod): a pod reporting faster than it should only
/// shortens its own history.
const MAX_SAMPLES: usize = 256;

/// Why a report was not recorded; names the field as it is on the wire.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReportRefused {
    #[error(
        "{field}: {value} calls in {interval_millis}ms is more than {MAX_CALLS_PER_SECOND} per second"
    )]
    TooManyCalls {
        field: &'static str,
        value: u64,
        interval_millis: u64,
    },
    #[error("latencyP95Millis: {0} is not a duration in milliseconds up to a day")]
    Latency(f64),
    #[error("latencyBuckets: {0} calls by duration, more than the {1} calls reported")]
    Buckets(u64, u64),
    #[error("configRevision: longer than {MAX_REVISION_BYTES} bytes")]
    Revision,
    #[error(
        "lifecycle: more than {MAX_LIFECYCLE_ROUTES} routes, or a route or link longer than {MAX_LIFECYCLE_TEXT_BYTES} bytes"
    )]
    Lifecycle,
    #[error(
        "contractViolations: more than {MAX_CONTRACT_VIOLATION_ENTRIES} entries, a route longer than {MAX_LIFECYCLE_TEXT_BYTES} bytes, an unknown kind, or more violations than calls can carry"
    )]
    ContractViolations,
    #[error("credentialCheck: message longer than {MAX_CHECK_MESSAGE_BYTES} bytes")]
    CredentialCheck,
    #[error("adaptivePercent: {0} is not a percentage from 0 to 100")]
    AdaptivePercent(f64),
}

impl ReportRefused {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReportRefused::TooManyCalls { .. } => "calls",
            ReportRefused::Latency(_) => "latency",
            ReportRefused::Buckets(..) => "buckets",
            ReportRefused::Revision => "revision",
            ReportRefused::Lifecycle => "lifecycle",
            ReportRefused::ContractViolations => "contract_violations",
            ReportRefused::CredentialCheck => "credential_check",
            ReportRefused::AdaptivePercent(_) => "adaptive_percent",
        }
    }
}

/// Checks a report against what one sidecar can have seen in its interval.
pub fn check_report(r: &IntegrationReport) -> Result<(), ReportRefused> {
    // At least a second's worth, so short intervals are not refused for rounding.
    let most = MAX_CALLS_PER_SECOND.saturating_mul(r.interval_millis.max(1000)) / 1000;
    for (field, value) in [
        ("requests", r.requests),
        ("rateLimited", r.rate_limited),
        ("refused", r.refused),
    ] {
        if value > most {
            return Err(ReportRefused::TooManyCalls {
                field,
                value,
                interval_millis: r.interval_millis,
            });
        }
    }
    if let Some(v) = r.latency_p95_millis
        && !(v.is_finite() && (0.0..=MAX_LATENCY_MILLIS).contains(&v))
    {
        return Err(ReportRefused::Latency(v));
    }
    let bucketed = r
        .latency_buckets
        .iter()
        .fold(0u64, |a, b| a.saturating_add(*b));
    if bucketed > r.requests {
        return Err(ReportRefused::Buckets(bucketed, r.requests));
    }
    if r.config_revision.len() > MAX_REVISION_BYTES {
        return Err(ReportRefused::Revision);
    }
    if r.lifecycle.len() > MAX_LIFECYCLE_ROUTES
        || r.lifecycle.iter().any(|l| {
            l.route.len() > MAX_LIFECYCLE_TEXT_BYTES
                || l.link
                    .as_ref()
                    .is_some_and(|k| k.len() > MAX_LIFECYCLE_TEXT_BYTES)
        })
    {
        return Err(ReportRefused::Lifecycle);
    }
    // A body counts once per kind, and up to once per enum field (at most 16) for
    // `unknown-enum`.
    let most_violations = most.saturating_mul(16);
    if r.credential_check
        .as_ref()
        .is_some_and(|c| c.message.len() > MAX_CHECK_MESSAGE_BYTES)
    {
        return Err(ReportRefused::CredentialCheck);
    }
    if let Some(p) = r.adaptive_percent
        && !(p.is_finite() && (0.0..=100.0).contains(&p))
    {
        return Err(ReportRefused::AdaptivePercent(p));
    }
    if r.credential_refresh_failures > most {
        return Err(ReportRefused::TooManyCalls {
            field: "credentialRefreshFailures",
            value: r.credential_refresh_failures,
            interval_millis: r.interval_millis,
        });
    }
    if let Some(k) = &r.credential_keys
        && (k.primary > most || k.secondary > most)
    {
        return Err(ReportRefused::TooManyCalls {
            field: "credentialKeys",
            value: k.primary.max(k.secondary),
            interval_millis: r.interval_millis,
        });
    }
    if r.contract_violations.len() > MAX_CONTRACT_VIOLATION_ENTRIES
        || r.contract_violations.iter().any(|v| {
            v.route.len() > MAX_LIFECYCLE_TEXT_BYTES
                || !CONTRACT_VIOLATION_KINDS.contains(&v.kind.as_str())
                || v.count > most_violations
        })
    {
        return Err(ReportRefused::ContractViolations);
    }
    Ok(())
}

#[derive(Clone, Debug)]
struct Sample {
    at: Instant,
    interval: Duration,
    requests: u64,
    errors: u64,
    rate_limited: u64,
    refused: u64,
    p95_ms: Option<f64>,
    /// Calls by duration bucket; empty from a sidecar that does not send them.
    buckets: Vec<u64>,
    contract: Vec<ContractViolationCount>,
    /// Calls accepted with the primary and with the secondary key (rotation window).
    keys: (u64, u64),
    refresh_failures: u64,
}

#[derive(Clone, Debug, Default)]
struct PodTraffic {
    samples: VecDeque<Sample>,
    config_revision: String,
    breaker: BreakerState,
    /// The partner's lifecycle announcements, as the pod last reported them.
    lifecycle: Vec<RouteLifecycle>,
    /// When the secondary key last served a call, Unix seconds, as the pod last reported.
    secondary_last_used: Option<i64>,
    /// The start-up check's result, as the pod last reported it.
    credential_check: Option<CredentialCheckResult>,
    /// The rate its adaptive quotas leave in force, percent, as the pod last reported it.
    adaptive_percent: Option<f64>,
    last_report: Option<Instant>,
}

/// What the status shows for one integration.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Observed {
    pub sidecars: SidecarSummary,
    /// `None` until some sidecar reported.
    pub traffic: Option<TrafficSummary>,
    /// Worst breaker state among fresh reports of subscribed sidecars.
    pub circuit: BreakerState,
    /// Successful share of calls in the window, percent; `None` without calls.
    pub availability_percent: Option<f64>,
    pub latency_p95: Option<Duration>,
    /// What the partner announced about its routes (deprecation, sunset), merged over the
    /// fresh reports of subscribed sidecars, by route name.
    pub lifecycle: Vec<RouteLifecycle>,
    /// Contract violations in the window, summed over sidecars, by route and kind.
    pub contract_violations: Vec<ContractViolationCount>,
    /// Calls of the window by the key of a rotation window that served them, and the last
    /// time any sidecar reported the secondary key serving one.
    pub credential_keys: CredentialKeys,
    /// OAuth2 token fetches that failed in the window, summed over sidecars.
    pub credential_refresh_failures: u64,
    /// The start-up check: a failure reported by any fresh sidecar, else the latest pass.
    pub credential_check: Option<CredentialCheckResult>,
    /// The lowest rate fresh sidecars' adaptive quotas leave in force, percent of the
    /// configured rate.
    pub adaptive_percent: Option<f64>,
}

/// One replica's aggregate for one integration. Replicas exchange these (see
/// [`crate::peers`]); [`Partial::merge`] adds them up and [`Partial::finish`] turns the sum into
/// what the status shows.
///
/// Serialized compactly (zero fields left out) so a replica's Lease holds many of them.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Partial {
    /// Pods subscribed to the integration.
    #[serde(skip_serializing_if = "is_zero")]
    pub subscribers: u32,
    /// Global bands: what this replica's sidecars need, and the most they may be running, as
    /// fractions of the band (see `distribution::shares`).
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub quota_need: f64,
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub quota_held: f64,
    /// Subscribed pods with a fresh report, by the config revision they run.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub revisions: BTreeMap<String, u32>,
    #[serde(skip_serializing_if = "is_zero")]
    pub breaker_open: u32,
    #[serde(skip_serializing_if = "is_zero")]
    pub breaker_half_open: u32,
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub requests_per_second: f64,
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub rate_limited_per_second: f64,
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub refused_per_second: f64,
    /// Calls and failed partner calls in the window.
    #[serde(skip_serializing_if = "is_zero")]
    pub requests: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub errors: u64,
    /// Calls of the window the sidecar answered itself (rate limited, refused): they never
    /// reached the partner, so they count neither for nor against it.
    #[serde(skip_serializing_if = "is_zero")]
    pub rate_limited: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub refused: u64,
    /// Calls in the window by duration bucket (the protocol's `LATENCY_BUCKETS_MS`, then
    /// overflow), summed over pods: the p95 is read from these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency_buckets: Vec<u64>,
    /// For samples without buckets (sidecars that predate them): the sum of p95 × calls, and
    /// of calls (a call-weighted mean, used only when no sample has buckets).
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub p95_weighted_millis: f64,
    #[serde(skip_serializing_if = "is_zero")]
    pub p95_weight: u64,
    /// Some pod reported in the window.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reported: bool,
    /// Lifecycle announcements of fresh reports, merged by route.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lifecycle: Vec<RouteLifecycle>,
    /// Contract violations in the window, summed by route and kind.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contract_violations: Vec<ContractViolationCount>,
    /// Calls of the window accepted with the primary key of a rotation window.
    #[serde(skip_serializing_if = "is_zero")]
    pub primary_key: u64,
    /// Calls of the window accepted only with the secondary key.
    #[serde(skip_serializing_if = "is_zero")]
    pub secondary_key: u64,
    /// The latest time a pod reported the secondary key serving a call, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_last_used: Option<i64>,
    /// OAuth2 token fetches that failed in the window.
    #[serde(skip_serializing_if = "is_zero")]
    pub credential_refresh_failures: u64,
    /// The start-up check of fresh sidecars: a failure first, else the latest pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_check: Option<CredentialCheckResult>,
    /// The lowest rate fresh sidecars' adaptive quotas leave in force, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_percent: Option<f64>,
}

/// The lower of two percentages, either possibly unknown (a peer's number: out of range is
/// ignored).
fn min_percent(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    let b = b.filter(|p| p.is_finite() && (0.0..=100.0).contains(p));
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Partial {
    pub fn merge(&mut self, o: &Partial) {
        self.subscribers = self.subscribers.saturating_add(o.subscribers);
        self.quota_need += finite(o.quota_need);
        self.quota_held += finite(o.quota_held);
        for (r, n) in &o.revisions {
            let c = self.revisions.entry(r.clone()).or_default();
            *c = c.saturating_add(*n);
        }
        self.breaker_open = self.breaker_open.saturating_add(o.breaker_open);
        self.breaker_half_open = self.breaker_half_open.saturating_add(o.breaker_half_open);
        self.requests_per_second += finite(o.requests_per_second);
        self.rate_limited_per_second += finite(o.rate_limited_per_second);
        self.refused_per_second += finite(o.refused_per_second);
        self.requests = self.requests.saturating_add(o.requests);
        self.errors = self.errors.saturating_add(o.errors);
        self.rate_limited = self.rate_limited.saturating_add(o.rate_limited);
        self.refused = self.refused.saturating_add(o.refused);
        add_buckets(&mut self.latency_buckets, &o.latency_buckets);
        self.p95_weighted_millis += finite(o.p95_weighted_millis);
        self.p95_weight = self.p95_weight.saturating_add(o.p95_weight);
        self.reported |= o.reported;
        merge_lifecycle(&mut self.lifecycle, &o.lifecycle);
        add_contract_violations(&mut self.contract_violations, &o.contract_violations);
        self.primary_key = self.primary_key.saturating_add(o.primary_key);
        self.secondary_key = self.secondary_key.saturating_add(o.secondary_key);
        self.secondary_last_used = self.secondary_last_used.max(o.secondary_last_used);
        self.credential_refresh_failures = self
            .credential_refresh_failures
            .saturating_add(o.credential_refresh_failures);
        merge_check(&mut self.credential_check, o.credential_check.as_ref());
        self.adaptive_percent = min_percent(self.adaptive_percent, o.adaptive_percent);
    }

    /// What the status shows, against the revision in force.
    pub fn finish(&self, current_revision: &str) -> Observed {
        let latency_p95 = match bucket_quantile(&self.latency_buckets, 0.95) {
            Some(ms) => Some(Duration::from_secs_f64(ms / 1000.0)),
            None => (self.p95_weight > 0).then(|| {
                Duration::from_secs_f64(self.p95_weighted_millis / self.p95_weight as f64 / 1000.0)
            }),
        };
        // The partner's error rate is over the calls that reached (or failed to reach) it: the
        // sidecar's own answers (kill switch, circuit open, rate limited, ...) are not its doing.
        let partner_calls = self
            .requests
            .saturating_sub(self.rate_limited.saturating_add(self.refused));
        let error_rate = if partner_calls > 0 {
            self.errors.min(partner_calls) as f64 * 100.0 / partner_calls as f64
        } else {
            0.0
        };
        let circuit = if self.breaker_open > 0 {
            BreakerState::Open
        } else if self.breaker_half_open > 0 {
            BreakerState::HalfOpen
        } else {
            BreakerState::Closed
        };
        let count = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        Observed {
            sidecars: SidecarSummary {
                desired: count(self.subscribers),
                up_to_date: count(self.revisions.get(current_revision).copied().unwrap_or(0)),
                breaker_open: count(self.breaker_open),
            },
            traffic: self.reported.then(|| TrafficSummary {
                requests_per_minute: (self.requests_per_second * 60.0).round() as i64,
                error_rate_percent: (error_rate * 100.0).round() / 100.0,
                latency_p95: latency_p95.map(format_latency),
                rate_limited_per_minute: (self.rate_limited_per_second * 60.0).round() as i64,
                refused_per_minute: (self.refused_per_second * 60.0).round() as i64,
            }),
            circuit,
            availability_percent: (partner_calls > 0).then_some(100.0 - error_rate),
            latency_p95,
            lifecycle: self.lifecycle.clone(),
            contract_violations: self.contract_violations.clone(),
            credential_keys: CredentialKeys {
                primary: self.primary_key,
                secondary: self.secondary_key,
                secondary_last_used: self.secondary_last_used,
            },
            credential_refresh_failures: self.credential_refresh_failures,
            credential_check: self.credential_check.clone(),
            adaptive_percent: self.adaptive_percent,
        }
    }
}

/// Reports of every sidecar this replica serves.
#[derive(Debug)]
pub struct TrafficStore {
    window: Duration,
    /// A pod's latest report older than this no longer counts for revision or breaker state.
    stale_after: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_key: HashMap<Key, HashMap<PodKey, PodTraffic>>,
    pruned: Option<Instant>,
}

impl TrafficStore {
    pub fn new(window: Duration, stale_after: Duration) -> Self {
        Self {
            window,
            stale_after,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a pod's report, or refuses it without a trace when a value is impossible.
    pub fn record(
        &self,
        pod: &str,
        r: &IntegrationReport,
        now: Instant,
    ) -> Result<(), ReportRefused> {
        check_report(r)?;
        let key = (r.namespace.clone(), r.name.clone());
        let mut inner = self.lock();
        // Pods that stopped reporting are swept a few times per window, not on every report.
        let sweep_every = self.window / 4;
        if inner
            .pruned
            .is_none_or(|at| now.saturating_duration_since(at) >= sweep_every)
        {
            self.prune(&mut inner, now);
        }
        let t = inner
            .by_key
            .entry(key)
            .or_default()
            .entry(pod.to_string())
            .or_default();
        t.samples.push_back(Sample {
            at: now,
            interval: Duration::from_millis(r.interval_millis).min(self.window),
            requests: r.requests,
            errors: r.errors.min(r.requests),
            rate_limited: r.rate_limited.min(r.requests),
            refused: r.refused.min(r.requests),
            p95_ms: r.latency_p95_millis,
            // Another bucket layout cannot be added up with ours: ignored.
            buckets: if r.latency_buckets.len() == LATENCY_BUCKETS_MS.len() + 1 {
                r.latency_buckets.clone()
            } else {
                Vec::new()
            },
            contract: r.contract_violations.clone(),
            keys: r
                .credential_keys
                .as_ref()
                .map_or((0, 0), |k| (k.primary, k.secondary)),
            refresh_failures: r.credential_refresh_failures,
        });
        if r.credential_check.is_some() {
            t.credential_check = r.credential_check.clone();
        }
        t.adaptive_percent = r.adaptive_percent;
        if let Some(at) = r
            .credential_keys
            .as_ref()
            .and_then(|k| k.secondary_last_used)
        {
            t.secondary_last_used = Some(at);
        }
        t.config_revision = r.config_revision.clone();
        t.breaker = r.breaker;
        t.lifecycle = r.lifecycle.clone();
        t.last_report = Some(now);
        let cutoff = now.checked_sub(self.window);
        while let (Some(front), Some(cutoff)) = (t.samples.front(), cutoff) {
            if front.at >= cutoff {
                break;
            }
            t.samples.pop_front();
        }
        while t.samples.len() > MAX_SAMPLES {
            t.samples.pop_front();
        }
        Ok(())
    }

    /// Drops every pod whose last report is older than both the window and the staleness
    /// bound: nothing of it shows any more.
    fn prune(&self, inner: &mut Inner, now: Instant) {
        inner.pruned = Some(now);
        let Some(cutoff) = now.checked_sub(self.window.max(self.stale_after)) else {
            return;
        };
        inner.by_key.retain(|_, pods| {
            pods.retain(|_, t| t.last_report.is_some_and(|at| at >= cutoff));
            !pods.is_empty()
        });
    }

    /// Forgets an integration (deleted).
    pub fn forget(&self, key: &Key) {
        self.lock().by_key.remove(key);
    }

    /// Summarises `key` for the pods currently subscribed to it, against the revision in force.
    pub fn observe(
        &self,
        key: &Key,
        subscribed: &[PodKey],
        current_revision: &str,
        now: Instant,
    ) -> Observed {
        self.partial(key, subscribed, now).finish(current_revision)
    }

    /// This replica's share of what the status of `key` shows, mergeable with other replicas'.
    pub fn partial(&self, key: &Key, subscribed: &[PodKey], now: Instant) -> Partial {
        let inner = self.lock();
        let empty = HashMap::new();
        let pods = inner.by_key.get(key).unwrap_or(&empty);
        let cutoff = now.checked_sub(self.window);
        let stale_cutoff = now.checked_sub(self.stale_after);
        let mut p = Partial {
            subscribers: u32::try_from(subscribed.len()).unwrap_or(u32::MAX),
            ..Partial::default()
        };

        for pod in subscribed {
            let Some(t) = pods.get(pod) else { continue };
            let fresh = match (t.last_report, stale_cutoff) {
                (Some(at), Some(c)) => at >= c,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if !fresh {
                continue;
            }
            let c = p.revisions.entry(t.config_revision.clone()).or_default();
            *c = c.saturating_add(1);
            match t.breaker {
                BreakerState::Open => p.breaker_open = p.breaker_open.saturating_add(1),
                BreakerState::HalfOpen => {
                    p.breaker_half_open = p.breaker_half_open.saturating_add(1)
                }
                BreakerState::Closed => {}
            }
            merge_lifecycle(&mut p.lifecycle, &t.lifecycle);
            merge_check(&mut p.credential_check, t.credential_check.as_ref());
            p.adaptive_percent = min_percent(p.adaptive_percent, t.adaptive_percent);
        }

        // Traffic counts every pod that reported in the window, subscribed now or not: the
        // calls happened.
        for t in pods.values() {
            let in_window: Vec<&Sample> = t
                .samples
                .iter()
                .filter(|s| cutoff.is_none_or(|c| s.at >= c))
                .collect();
            if in_window.is_empty() {
                continue;
            }
            p.reported = true;
            let covered: f64 = in_window
                .iter()
                .map(|s| s.interval.as_secs_f64())
                .sum::<f64>()
                .min(self.window.as_secs_f64());
            let sum =
                |f: fn(&Sample) -> u64| in_window.iter().fold(0u64, |a, s| a.saturating_add(f(s)));
            let req = sum(|s| s.requests);
            let lim = sum(|s| s.rate_limited);
            let refused = sum(|s| s.refused);
            // Reports whose intervals overlap cannot claim more than one sidecar can do.
            let most = MAX_CALLS_PER_SECOND as f64;
            if covered > 0.0 {
                p.requests_per_second += (req as f64 / covered).min(most);
                p.rate_limited_per_second += (lim as f64 / covered).min(most);
                p.refused_per_second += (refused as f64 / covered).min(most);
            }
            p.requests = p.requests.saturating_add(req);
            p.errors = p.errors.saturating_add(sum(|s| s.errors));
            p.rate_limited = p.rate_limited.saturating_add(lim);
            p.refused = p.refused.saturating_add(refused);
            p.primary_key = p.primary_key.saturating_add(sum(|s| s.keys.0));
            p.secondary_key = p.secondary_key.saturating_add(sum(|s| s.keys.1));
            p.secondary_last_used = p.secondary_last_used.max(t.secondary_last_used);
            p.credential_refresh_failures = p
                .credential_refresh_failures
                .saturating_add(sum(|s| s.refresh_failures));
            for s in &in_window {
                add_contract_violations(&mut p.contract_violations, &s.contract);
                if !s.buckets.is_empty() {
                    add_buckets(&mut p.latency_buckets, &s.buckets);
                } else if let Some(v) = s.p95_ms
                    && s.requests > 0
                {
                    p.p95_weighted_millis += v * s.requests as f64;
                    p.p95_weight = p.p95_weight.saturating_add(s.requests);
                }
            }
        }
        p
    }

    /// (integration, pod) pairs held.
    pub fn pod_count(&self) -> usize {
        self.lock().by_key.values().map(HashMap::len).sum()
    }

    /// Calls per second that reached `pod`'s quota for `key` (all calls but those the
    /// sidecar refused before it: kill switch, open circuit, ...) over its reports of the last
    /// `within`; `None` without such a report. Admitted and rate limited alike: the demand,
    /// not what the pod's share let through.
    pub fn demand(&self, key: &Key, pod: &str, now: Instant, within: Duration) -> Option<f64> {
        let inner = self.lock();
        let t = inner.by_key.get(key)?.get(pod)?;
        let cutoff = now.checked_sub(within);
        let (mut calls, mut span) = (0u64, Duration::ZERO);
        for s in t.samples.iter().rev() {
            if cutoff.is_some_and(|c| s.at < c) {
                break;
            }
            calls = calls.saturating_add(s.requests.saturating_sub(s.refused));
            span += s.interval;
        }
        (span >= Duration::from_millis(100)).then(|| calls as f64 / span.as_secs_f64())
    }

    /// Every integration with reports, for tests and debugging.
    pub fn keys(&self) -> Vec<Key> {
        let inner = self.lock();
        let mut keys: Vec<Key> = inner.by_key.keys().cloned().collect();
        keys.sort();
        keys
    }
}

/// Keeps the result the status should show: a failure over a pass, then the later one.
pub fn merge_check(sum: &mut Option<CredentialCheckResult>, more: Option<&CredentialCheckResult>) {
    let Some(more) = more else { return };
    let replace = match sum {
        None => true,
        Some(s) => (!more.ok && s.ok) || (more.ok == s.ok && more.at > s.at),
    };
    if replace {
        *sum = Some(more.clone());
    }
}

/// Adds `more` into `sum` by (route, kind), saturating. Entries beyond
/// [`MAX_CONTRACT_VIOLATION_ENTRIES`], of an unknown kind or oversized (from a peer) are dropped.
pub fn add_contract_violations(
    sum: &mut Vec<ContractViolationCount>,
    more: &[ContractViolationCount],
) {
    for m in more {
        if m.count == 0
            || m.route.len() > MAX_LIFECYCLE_TEXT_BYTES
            || !CONTRACT_VIOLATION_KINDS.contains(&m.kind.as_str())
        {
            continue;
        }
        match sum
            .iter()
            .position(|s| s.route == m.route && s.kind == m.kind)
        {
            Some(k) => sum[k].count = sum[k].count.saturating_add(m.count),
            None if sum.len() < MAX_CONTRACT_VIOLATION_ENTRIES => sum.push(m.clone()),
            None => {}
        }
    }
    sum.sort_by(|a, b| (&a.route, &a.kind).cmp(&(&b.route, &b.kind)));
}

/// Merges `more` into `sum` by route: deprecated when any says so, the earliest dates, the
/// first link. Entries beyond [`MAX_LIFECYCLE_ROUTES`] (or oversized, from a peer) are dropped.
pub fn merge_lifecycle(sum: &mut Vec<RouteLifecycle>, more: &[RouteLifecycle]) {
    let earliest = |a: Option<i64>, b: Option<i64>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    for m in more {
        if m.is_empty()
            || m.route.len() > MAX_LIFECYCLE_TEXT_BYTES
            || m.link
                .as_ref()
                .is_some_and(|k| k.len() > MAX_LIFECYCLE_TEXT_BYTES)
        {
            continue;
        }
        match sum.iter().position(|s| s.route == m.route) {
            Some(k) => {
                let s = &mut sum[k];
                s.deprecated |= m.deprecated;
                s.deprecation_timestamp =
                    earliest(s.deprecation_timestamp, m.deprecation_timestamp);
                s.sunset_timestamp = earliest(s.sunset_timestamp, m.sunset_timestamp);
                if s.link.is_none() {
                    s.link.clone_from(&m.link);
                }
            }
            None if sum.len() < MAX_LIFECYCLE_ROUTES => sum.push(m.clone()),
            None => {}
        }
    }
    sum.sort_by(|a, b| a.route.cmp(&b.route));
}

/// Adds `more` into `sum` bucket by bucket.
fn add_buckets(sum: &mut Vec<u64>, more: &[u64]) {
    // Our layout has this many; longer (from a peer's annotation) is cut.
    let more = &more[..more.len().min(LATENCY_BUCKETS_MS.len() + 1)];
    if sum.len() < more.len() {
        sum.resize(more.len(), 0);
    }
    for (s, m) in sum.iter_mut().zip(more) {
        *s = s.saturating_add(*m);
    }
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

/// A peer's number as a number: not NaN, not infinite, not negative.
fn finite(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 { v } else { 0.0 }
}

/// `120ms`, `1.5s`: milliseconds below ten seconds, else seconds with one decimal.
pub fn format_latency(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10_000.0 {
        format!("{}ms", ms.round() as u64)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(requests: u64, errors: u64, p95: f64, breaker: BreakerState) -> IntegrationReport {
        IntegrationReport {
            namespace: "ns".into(),
            name: "a".into(),
            config_revision: "1-x".into(),
            interval_millis: 5_000,
            requests,
            errors,
            rate_limited: 1,
            refused: 0,
            latency_p95_millis: Some(p95),
            latency_buckets: Vec::new(),
            breaker,
            lifecycle: Vec::new(),
            contract_violations: Vec::new(),
            credential_keys: None,
            credential_refresh_failures: 0,
            credential_check: None,
            adaptive_percent: None,
        }
    }

    /// `requests` calls, `fast` of them within 5 ms and the rest between 800 ms and 1 s.
    fn bucketed(requests: u64, fast: u64) -> IntegrationReport {
        let mut buckets = vec![0; LATENCY_BUCKETS_MS.len() + 1];
        buckets[2] = fast;
        buckets[11] = requests - fast;
        let mut r = report(requests, 0, 0.0, BreakerState::Closed);
        r.latency_p95_millis = bucket_quantile(&buckets, 0.95);
        r.latency_buckets = buckets;
        r
    }

    /// A p95 over every call of every pod, not an average of the pods' p95s: one slow pod
    /// among fast ones shows, as it does to the app's users.
    #[tokio::test(start_paused = true)]
    async fn p95_is_read_from_the_buckets_of_every_pod_together() {
        let store = TrafficStore::new(Duration::from_secs(60), Duration::from_secs(15));
        let key = ("ns".to_string(), "a".to_string());
        let now = Instant::now();
        // p1: 100 calls within 5 ms (its own p95: 5 ms). p2: 10 calls, all near 1 s.
        store.record("ns/p1", &bucketed(100, 100), now).unwrap();
        store.record("ns/p2", &bucketed(10, 0), now).unwrap();
        let pods = vec!["ns/p1".to_string(), "ns/p2".to_string()];
        let o = store.observe(&key, &pods, "1-x", now);
        // 110 calls: the 105th slowest is one of p2's. (Weighted, the p95s would say 95 ms.)
        assert_eq!(o.latency_p95, Some(Duration::from_secs(1)));
        assert_eq!(o.traffic.unwrap().latency_p95.as_deref(), Some("1000ms"));

        // The same through the replicas' exchange: each replica holds one pod.
        let first = TrafficStore::new(Duration::from_secs(60), Duration::from_secs(15));
        first.record("ns/p1", &bucketed(100, 100), now).unwrap();
        let second = TrafficStore::new(Duration::from_secs(60), Duration::from_secs(15));
        second.record("ns/p2", &bucketed(10, 0), now).unwrap();
        let mut merged = first.partial(&key, &pods[..1], now);
        let sent = serde_json::to_string(&second.partial(&key, &pods[1..], now)).unwrap();
        merged.merge(&serde_json::from_str::<Partial>(&sent).unwrap());
        assert_eq!(
            merged.finish("1-x").latency_p95,
            Some(Duration::from_secs(1))
        );

        // A sidecar without buckets still counts, by the old average, when nobody sends them.
        let old = TrafficStore::new(Duration::from_secs(60), Duration::from_secs(15));
        old.record("ns/p1", &report(10, 0, 40.0, BreakerState::Closed), now)
            .unwrap();
        assert_eq!(
            old.observe(&key, &pods[..1], "1-x", now).latency_p95,
            Some(Duration::from_millis(40))
        );
    }

    /// A pod that stopped reporting (deleted, rescheduled, renamed) is forgotten once its
    /// reports left the window: the store holds what the window covers, not every pod ever.
    #[tokio::test(start_paused = true)]
    async fn pods_that_stopped_reporting_are_forgotten() {
        let store = TrafficStore::new(Duration::from_secs(60), Duration::from_secs(15));
        let t0 = Instant::now();
        for i in 0..1000 {
            let _ = store.record(
                &format!("ns/old-{i}"),
                &report(1, 0, 10.0, BreakerState::Closed),
                t0,
            );
        }
        assert_eq!(store.pod_count(), 1000);
        let later = t0 + Duration::from_secs(121);
        let _ = store.record("ns/new", &report(1, 0, 10.0, BreakerState::Closed), later);
        assert_eq!(store.pod_count(), 1);
        // A deleted integration's pods go with it.
        store.forget(&("ns".to_string(), "a".to_string()));
        assert_eq!(store.pod_count(), 0);
    }

    /// A pod cannot poison its integration's status: a report with impossible values is
    /// refused, naming the field, and the status shows what the honest pods report.
    #[tokio::test(start_paused = true)]
    async fn absurd_reports_are_refused_and_do_not_poison_status() {
        let store = TrafficStore::new(Duration::from_secs(60), Duration::from_secs(15));
        let key = ("ns".to_string(), "a".to_string());
        let now = Instant::now();
        let _ = store.record(
            "ns/honest",
            &report(50, 5, 100.0, BreakerState::Closed),
            now,
        );
        let mut absurd = Vec::new();
        let mut r = report(u64::MAX, u64::MAX, 100.0, BreakerState::Closed);
        r.rate_limited = u64::MAX;
        absurd.push(("requests", r));
        absurd.push((
            "latencyP95Millis",
            report(1, 0, 1e300, BreakerState::Closed),
        ));
        let mut r = report(1, 0, 10.0, BreakerState::Closed);
        r.latency_buckets = vec![u64::MAX; LATENCY_BUCKETS_MS.len() + 1];
        absurd.push(("latencyBuckets", r));
        let mut r = report(1, 0, 10.0, BreakerState::Closed);
        r.refused = u64::MAX;
        absurd.push(("refused", r));
        let mut r = report(1, 0, 10.0, BreakerState::Closed);
        r.config_revision = "x".repeat(10_000);
        absurd.push(("configRevision", r));
        for (field, r) in &absurd {
            let refused = format!(
                "{:?}",
                store.record("ns/liar", r, now).map_err(|e| e.to_string())
            );
            assert!(refused.contains(field), "{field}: {refused}");
        }
        let pods = vec!["ns/honest".to_string(), "ns/liar".to_string()];
        let o = store.observe(&key, &pods, "1-x", now);
        let t = o.traffic.unwrap();
        assert_eq!(t.requests_per_minute, 600);
        // 5 failures among the 49 calls that reached the partner (one was rate limited).
        assert_eq!(t.error_rate_percent, 10.2);
        assert_eq!(t.latency_p95.as_deref(), Some("100ms"));
        assert_eq!(o.sidecars.up_to_date, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn sums_rates_over_pods_and_window() {
        let store = TrafficStore::new(Duration::from_secs(60), Duration::from_secs(15));
        let key = ("ns".to_string(), "a".to_string());
        let t0 = Instant::now();
        // Two pods, each 50 requests per 5 s = 600/min each.
        for i in 0..3u32 {
            let at = t0 + Duration::from_secs(5 * u64::from(i));
            store
                .record("ns/p1", &report(50, 5, 100.0, BreakerState::Closed), at)
                .unwrap();
            store
                .record("ns/p2", &report(50, 0, 300.0, BreakerState::Open), at)
                .unwrap();
        }
        let now = t0 + Duration::from_secs(10);
        let pods = vec!["ns/p1".to_string(), "ns/p2".to_string()];
        let o = store.observe(&key, &pods, "1-x", now);
        let traffic = o.traffic.unwrap();
        assert_eq!(traffic.requests_per_minute, 1200);
        assert_eq!(traffic.rate_limited_per_minute, 24);
        // 15 failures among the 294 calls that reached the partner (6 were rate limited).
        assert_eq!(traffic.error_rate_percent, 5.1);
        assert_eq!(traffic.latency_p95.as_deref(), Some("200ms"));
        assert_eq!(o.sidecars.desired, 2);
        assert_eq!(o.sidecars.up_to_date, 2);
        assert_eq!(o.sidecars.breaker_open, 1);
        assert_eq!(o.circuit, BreakerState::Open);
        let availability = o.availability_percent.unwrap();
        assert!((availability - (100.0 - 1500.0 / 294.0)).abs() < 1e-9);

        // A revision nobody runs yet; then reports go stale.
        let o = store.observe(&key, &pods, "2-y", now);
        assert_eq!(o.sidecars.up_to_date, 0);
        let o = store.observe(&key, &pods, "1-x", now + Duration::from_secs(30));
        assert_eq!(o.sidecars.breaker_open, 0);
        let o = store.observe(&key, &pods, "1-x", now + Duration::from_secs(120));
        assert_eq!(o.traffic, None);
    }

    /// A kill switch drill is not the partner failing: the sidecar's refusals show apart, the
    /// partner's error rate and availability are over the calls that reached it, and with
    /// every call refused there is nothing to judge the partner by.
    #[tokio::test(start_paused = true)]
    async fn refusals_show_apart_and_do_not_count_against_the_partner() {
        let store = TrafficStore::new(Duration::from_secs(60), Duration::from_secs(15));
        let key = ("ns".to_string(), "a".to_string());
        let pods = ["ns/p1".to_string(), "ns/p2".to_string()];
        let now = Instant::now();
        // p1: 100 calls in 5 s, 90 refused (kill switch), 2 of the 10 sent failed.
        let mut r = report(100, 2, 10.0, BreakerState::Closed);
        r.rate_limited = 0;
        r.refused = 90;
        store.record("ns/p1", &r, now).unwrap();
        // p2, through another replica: 100 calls, all refused.
        let other = TrafficStore::new(Duration::from_secs(60), Duration::from_secs(15));
        let mut r = report(100, 0, 10.0, BreakerState::Closed);
        r.rate_limited = 0;
        r.refused = 100;
        other.record("ns/p2", &r, now).unwrap();

        let mut p = store.partial(&key, &pods[..1], now);
        let sent = serde_json::to_string(&other.partial(&key, &pods[1..], now)).unwrap();
        p.merge(&serde_json::from_str::<Partial>(&sent).unwrap());
        let o = p.finish("1-x");
        let t = o.traffic.unwrap();
        assert_eq!(t.requests_per_minute, 2400);
        assert_eq!(t.refused_per_minute, 2280);
        assert_eq!(t.error_rate_percent, 20.0);
        assert_eq!(o.availability_percent, Some(80.0));

        // Every call refused: no partner error, and no availability to hold against a target.
        let o = other.observe(&key, &pods[1..], "1-x", now);
        let t = o.traffic.unwrap();
        assert_eq!(t.error_rate_percent, 0.0);
        assert_eq!(t.refused_per_minute, 1200);
        assert_eq!(o.availability_percent, None);

        // A sidecar that predates `refused` sends none; its report still reads.
        let old: IntegrationReport = serde_json::from_value(serde_json::json!({
            "namespace": "ns", "name": "a", "configRevision": "1-x", "intervalMillis": 5000,
            "requests": 10, "errors": 1, "rateLimited": 0, "breaker": "closed"
        }))
        .unwrap();
        assert_eq!(old.refused, 0);
    }

    #[test]
    fn lifecycle_merges_over_pods_and_oversized_reports_are_refused() {
        let store = TrafficStore::new(Duration::from_secs(60), Duration::from_secs(30));
        let key = ("ns".to_string(), "a".to_string());
        let now = Instant::now();
        let route = |deprecated, sunset: Option<i64>, link: Option<&str>| RouteLifecycle {
            route: "tracking".into(),
            deprecated,
            deprecation_timestamp: None,
            sunset_timestamp: sunset,
            link: link.map(str::to_string),
        };
        let mut a = report(1, 0, 5.0, BreakerState::Closed);
        a.lifecycle = vec![route(true, Some(2_000), None)];
        let mut b = report(1, 0, 5.0, BreakerState::Closed);
        b.lifecycle = vec![route(false, Some(1_000), Some("https://e.com/s"))];
        store.record("ns/p1", &a, now).unwrap();
        store.record("ns/p2", &b, now).unwrap();
        let pods = vec!["ns/p1".to_string(), "ns/p2".to_string()];
        let o = store.observe(&key, &pods, "1-x", now);
        assert_eq!(
            o.lifecycle,
            vec![route(true, Some(1_000), Some("https://e.com/s"))]
        );
        // Only subscribed pods count.
        let o = store.observe(&key, &pods[..1], "1-x", now);
        assert_eq!(o.lifecycle, vec![route(true, Some(2_000), None)]);

        let mut big = report(1, 0, 5.0, BreakerState::Closed);
        big.lifecycle = vec![route(true, None, Some(&"x".repeat(600)))];
        assert_eq!(check_report(&big), Err(ReportRefused::Lifecycle));
        big.lifecycle = (0..65)
            .map(|i| RouteLifecycle {
                route: format!("r{i}"),
                deprecated: true,
                ..RouteLifecycle::default()
            })
            .collect();
        assert_eq!(check_report(&big), Err(ReportRefused::Lifecycle));
    }

    fn violations(route: &str, kind: &str, count: u64) -> ContractViolationCount {
        ContractViolationCount {
            route: route.into(),
            kind: kind.into(),
            count,
        }
    }

    /// Contract violations add up over the window's reports and pods (and over replicas), by
    /// route and kind; a report claiming an unknown kind, too many entries or more violations
    /// than calls can carry is refused.
    #[test]
    fn contract_violations_add_up_and_impossible_ones_are_refused() {
        let store = TrafficStore::new(Duration::from_secs(60), Duration::from_secs(30));
        let key = ("ns".to_string(), "a".to_string());
        let now = Instant::now();
        let mut a = report(10, 2, 5.0, BreakerState::Closed);
        a.contract_violations = vec![
            violations("charges", "success-rule", 2),
            violations("charges", "unknown-enum", 3),
        ];
        let mut b = report(10, 1, 5.0, BreakerState::Closed);
        b.contract_violations = vec![violations("charges", "success-rule", 1)];
        store.record("ns/p1", &a, now).unwrap();
        store
            .record("ns/p1", &b, now + Duration::from_secs(5))
            .unwrap();
        store
            .record("ns/p2", &b, now + Duration::from_secs(5))
            .unwrap();
        let pods = vec!["ns/p1".to_string(), "ns/p2".to_string()];
        let later = now + Duration::from_secs(6);
        let o = store.observe(&key, &pods, "1-x", later);
        assert_eq!(
            o.contract_violations,
            vec![
                violations("charges", "success-rule", 4),
                violations("charges", "unknown-enum", 3),
            ]
        );
        // Replicas' partials add up too.
        let mut p = store.partial(&key, &pods, later);
        p.merge(&store.partial(&key, &pods, later));
        assert_eq!(p.finish("1-x").contract_violations[0].count, 8);
        // Out of the window: gone.
        let o = store.observe(&key, &pods, "1-x", now + Duration::from_secs(70));
        assert!(o.contract_violations.is_empty(), "{o:?}");

        let mut bad = report(10, 0, 5.0, BreakerState::Closed);
        bad.contract_violations = vec![violations("charges", "made-up", 1)];
        assert_eq!(check_report(&bad), Err(ReportRefused::ContractViolations));
        bad.contract_violations = vec![violations("charges", "schema", u64::MAX)];
        assert_eq!(check_report(&bad), Err(ReportRefused::ContractViolations));
        bad.contract_violations = (0..65)
            .map(|i| violations(&format!("r{i}"), "schema", 1))
            .collect();
        assert_eq!(check_report(&bad), Err(ReportRefused::ContractViolations));
        bad.contract_violations = vec![violations(&"r".repeat(600), "schema", 1)];
        assert_eq!(check_report(&bad), Err(ReportRefused::ContractViolations));
    }
}
