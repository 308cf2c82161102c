//! Rate limit: the route's own quota and the integration's account quota must both admit a
//! request. Over the limit: 429 at once (`reject`), or a first-come-first-served wait of up to
//! `maxQueueWait` and never past the call's total deadline (`queue`).
//!
//! This layer charges a call's first attempt. Every further attempt is charged by the retry
//! loop through [`charge`], the same code against the same quotas and keys, because the
//! partner's quota counts every call it receives.
//!
//! Each quota is partitioned by its own `partitionBy` header: a route that sets one is keyed by
//! it, whatever the integration's says.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Request};
use tokio::time::Instant;

use super::gate::{Admit, Gate, GateLayer};
use super::{Call, CallError};
use crate::answer::Reason;
use crate::body::ReqBody;
use crate::engine::limiter::{self, Denied, Limiter};
use crate::state::Quota;
use crate::telemetry::metrics::{BandLabels, Metrics, QuotaBandLabels, RouteLabels};
use tollgate_crds::policy::RateLimitPolicy;
use tollgate_crds::v1alpha1::OnLimit;

pub(crate) fn layer(metrics: Arc<Metrics>) -> GateLayer<RateLimit> {
    GateLayer::new(RateLimit { metrics })
}

#[derive(Clone, Debug)]
pub(crate) struct RateLimit {
    metrics: Arc<Metrics>,
}

/// Which of a call's quotas: the route's own (`spec.routes[].rateLimit`) or the integration's
/// account quota (`spec.rateLimit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QuotaKind {
    Route,
    Integration,
}

impl QuotaKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            QuotaKind::Route => "route",
            QuotaKind::Integration => "integration",
        }
    }
}

/// An attempt the quotas refused, with what the app is told about it.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) denied: Denied,
    /// The refusing quota's spec path and partition header, for the answer's message.
    pub(crate) which: String,
}

/// The quotas `call` is under, route first, each with its policy and kind.
fn quotas(call: &Call) -> impl Iterator<Item = (&Quota, QuotaKind)> {
    let route = call.route_state().quota.as_ref();
    let account = call.integration.state.quota.as_ref();
    route
        .map(|q| (q, QuotaKind::Route))
        .into_iter()
        .chain(account.map(|q| (q, QuotaKind::Integration)))
}

/// The policy that decides how an attempt of `call` waits: the route's when it has a quota of
/// its own, else the integration's. `None`: no quota applies.
fn wait_policy(call: &Call) -> Option<&RateLimitPolicy> {
    quotas(call).next().map(|(q, _)| &q.policy)
}

/// Sets `tollgate_rate_limit_effective_rate` of `q`'s bands to what they allow now.
pub(crate) fn report_effective_rate(metrics: &Metrics, call: &Call, q: &Quota, kind: QuotaKind) {
    let (factor, share) = q.factor_and_share();
    for band in &q.policy.bands {
        let per = band.per.as_secs_f64().max(1e-9);
        metrics
            .adaptive
            .effective_rate
            .get_or_create(&QuotaBandLabels {
                integration: call.integration.label.to_string(),
                route: call.route_name().to_string(),
                quota: kind.as_str().to_string(),
                band: band.name.clone(),
            })
            .set(band.requests as f64 / per * share * factor);
    }
}

/// Spends one token of every quota `call` is under for one attempt carrying `headers`, all or
/// nothing (a refusal by one quota costs the others nothing). Each quota is keyed by the value
/// of its own `partitionBy` header.
///
/// `at_least` is a wait the attempt has anyway (a retry's backoff): a token that frees within it
/// is taken in either mode. In queue mode the attempt may also wait up to `maxQueueWait`. No wait
/// reaches past the call's deadline.
///
/// Returns how long to wait before sending (`None`: no quota applies), and counts the decision
/// in `tollgate_rate_limit_decisions_total` and `tollgate_rate_limit_partition_overflow_total`.
pub(crate) fn charge(
    call: &Call,
    headers: &HeaderMap,
    metrics: &Metrics,
    now: Instant,
    at_least: Duration,
) -> Option<Result<Duration, Refused>> {
    let policy = wait_policy(call)?;
    let max_wait = match policy.on_limit {
        OnLimit::Reject => at_least,
        OnLimit::Queue => at_least.max(policy.max_queue_wait),
    }
    .min(call.deadline.saturating_duration_since(now));
    // An adaptive quota climbs back as time passes; bring it up to date first.
    for (q, kind) in quotas(call) {
        if q.refresh(now).is_some() {
            report_effective_rate(metrics, call, q, kind);
        }
    }
    // At most two quotas (the route's, the account's), held on the stack. An overridden value
    // of the partition header has a limiter of its own.
    let mut all = quotas(call);
    let first = all.next()?;
    let second = all.next();
    let (mut key_a, mut key_b) = (Vec::new(), Vec::new());
    let (pair, one);
    let (entries, kinds): (&[_], &[_]) = match second {
        Some(second) => {
            pair = (
                [
                    entry(first.0, headers, call.client, &mut key_a),
                    entry(second.0, headers, call.client, &mut key_b),
                ],
                [first, second],
            );
            (&pair.0, &pair.1)
        }
        None => {
            one = ([entry(first.0, headers, call.client, &mut key_a)], [first]);
            (&one.0, &one.1)
        }
    };
    let route_metrics = call.metrics(metrics);
    let decision = |kind: QuotaKind, decision: &'static str| {
        route_metrics.decision(metrics, kind.as_str(), decision);
    };
    match limiter::admit(entries, now, max_wait) {
        Ok(admitted) => {
            let outcome = if admitted.wait.is_zero() {
                "admitted"
            } else {
                "queued"
            };
            for (_, kind) in kinds {
                decision(*kind, outcome);
            }
            if admitted.overflow {
                metrics
                    .partition_overflow
                    .get_or_create(&RouteLabels {
                        integration: call.integration.label.to_string(),
                        route: call.route_name().to_string(),
                    })
                    .inc();
            }
            Some(Ok(admitted.wait))
        }
        Err(denied) => {
            let (quota, kind) = kinds[denied.quota];
            decision(kind, "denied");
            let mut which = match kind {
                QuotaKind::Route => format!("spec.routes[{}].rateLimit", call.route_name()),
                QuotaKind::Integration => "spec.rateLimit".to_string(),
            };
            if let Some(h) = &quota.policy.partition_by {
                // The header's value is the app's and may be anything (a token, a user id):
                // name the header, never echo the value.
                let state = if headers.contains_key(h) {
                    "this value of"
                } else {
                    "requests without"
                };
                which.push_str(&format!(", partition: {state} header {h}"));
                for h in &quota.policy.partition_also_by {
                    which.push_str(&format!(" and {h}"));
                }
                if quota.policy.partition_by_client_address {
                    which.push_str(" and the client address");
                }
            } else if quota.policy.partition_by_client_address {
                which.push_str(", partition: this client address");
            }
            Some(Err(Refused { denied, which }))
        }
    }
}

/// The limiter and partition key of `q` for a request with `headers` from `client`. With
/// `partitionAlsoBy` or `partitionByClientAddress` the key is built in `scratch`: each part
/// length-prefixed (a missing header is a value of its own), so no two combinations make the
/// same bytes.
fn entry<'a, 'h>(
    q: &'a Quota,
    headers: &'h HeaderMap,
    client: Option<std::net::IpAddr>,
    scratch: &'h mut Vec<u8>,
) -> (&'a Limiter, limiter::Key<'h>) {
    let value = |h: &http::HeaderName| headers.get(h).map(|v| v.as_bytes());
    let first = q.policy.partition_by.as_ref().and_then(value);
    if q.policy.partition_also_by.is_empty() && !q.policy.partition_by_client_address {
        return q.limiter_for(first, first, None);
    }
    push_part(scratch, first);
    let split = scratch.len();
    for h in &q.policy.partition_also_by {
        push_part(scratch, value(h));
    }
    if q.policy.partition_by_client_address {
        match client {
            Some(std::net::IpAddr::V4(ip)) => push_part(scratch, Some(&ip.octets())),
            Some(std::net::IpAddr::V6(ip)) => push_part(scratch, Some(&ip.octets())),
            None => push_part(scratch, None),
        }
    }
    let key: &'h [u8] = scratch;
    q.limiter_for(first, Some(key), Some(&key[split..]))
}

/// One part of a composite partition key: absent, or present with its length (values are
/// bounded by the header block's limit).
fn push_part(out: &mut Vec<u8>, part: Option<&[u8]>) {
    match part {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&u32::try_from(v.len()).unwrap_or(u32::MAX).to_le_bytes());
            out.extend_from_slice(v);
        }
    }
}

impl Gate for RateLimit {
    fn check(&self, req: &mut Request<ReqBody>, call: &Call) -> Result<Admit, CallError> {
        let charged = charge(
            call,
            req.headers(),
            &self.metrics,
            Instant::now(),
            Duration::ZERO,
        );
        match charged {
            None => Ok(Admit::Now),
            Some(Ok(wait)) if wait.is_zero() => Ok(Admit::Now),
            Some(Ok(wait)) => Ok(Admit::After(wait)),
            Some(Err(Refused { denied, which })) => {
                self.metrics
                    .rate_limited
                    .get_or_create(&BandLabels {
                        integration: call.integration.label.to_string(),
                        route: call.route_name().to_string(),
                        band: denied.band.to_string(),
                    })
                    .inc();
                let msg = format!("quota band {:?} ({which}) is exhausted", denied.band);
                let answer = call
                    .answer(Reason::RateLimited, msg)
                    .retry_after(denied.retry_after);
                Err(answer.into())
            }
        }
    }
}
