//! Retry: only failures in `retryOn` (never a 4xx other than 429), exponential backoff with
//! full jitter, the partner's `Retry-After` honoured, a retry budget, and the call's total
//! deadline over everything.
//!
//! Every retry spends a token of the call's quotas, as the first attempt did in the rate-limit
//! layer, through the same [`rate_limit::charge`]. A retry that finds no token is not sent and
//! the app gets the partner's last answer: that is what the partner said, while a 429 would
//! blame the app for a quota its own call did not exceed. In queue mode the retry waits for a
//! token (up to `maxQueueWait`, within the total deadline) before giving up the same way.
//!
//! A non-idempotent method (POST, PATCH, ...) is retried only when it carries the idempotency
//! header; with `generate: true` the sidecar adds a fresh key to POST/PATCH before the first
//! attempt and sends the same key on every retry. A request body too large to buffer is sent
//! once and never retried.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Request};
use tokio::time::Instant;
use tower::layer::{LayerFn, layer_fn};
use tower::{Service, ServiceExt};

use super::{BoxFuture, Call, CallError, CallResult, rate_limit};
use crate::body::{ReqBody, RespBody};
use crate::client::TransportFailure;
use crate::engine::{backoff, retry_after};
use crate::telemetry::metrics::{Metrics, SkipLabels};
use crate::telemetry::spans::{AttemptSpan, CallSpan};
use tollgate_crds::policy::RetryPolicy;

pub(crate) fn layer<S>(metrics: Arc<Metrics>) -> LayerFn<impl Fn(S) -> Retry<S> + Clone> {
    layer_fn(move |inner| Retry {
        inner,
        metrics: metrics.clone(),
    })
}

#[derive(Clone, Debug)]
pub(crate) struct Retry<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// Methods that may be repeated without changing the outcome (RFC 9110 section 9.2.2).
pub(crate) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether the policy retries this result.
pub(crate) fn should_retry(policy: &RetryPolicy, result: &CallResult) -> bool {
    let on = &policy.retry_on;
    match result {
        Ok(resp) => on.status(resp.status().as_u16()),
        Err(CallError::Transport {
            kind: TransportFailure::Connect,
            ..
        }) => on.connect_error,
        Err(CallError::Transport {
            kind: TransportFailure::Reset,
            ..
        }) => on.reset,
        Err(CallError::AttemptTimeout) => on.timeout,
        Err(CallError::Answer(_)) => false,
    }
}

/// A fresh idempotency key (random, UUID-shaped).
pub(crate) fn new_idempotency_key() -> HeaderValue {
    let b: [u8; 16] = rand::random();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let key = format!(
        "{}-{}-4{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[16..20],
        &hex[20..32]
    );
    HeaderValue::from_str(&key).expect("hex and dashes form a header value")
}

impl<S> Service<Request<ReqBody>> for Retry<S>
where
    S: Service<Request<ReqBody>, Response = http::Response<RespBody>, Error = CallError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<CallResult>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let call = Call::from_request(&req);
        add_idempotency_key(&mut req, &call.route_policy().retries);
        call.route_state().budget.record_request(Instant::now());
        // The service polled ready goes with the call; a clone stays behind for the next
        // `poll_ready` (tower's `Service::call` docs).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(attempts(inner, req, call, self.metrics.clone()))
    }
}

/// With `generate: true`, a POST or PATCH without an idempotency key gets a fresh one, sent
/// on every attempt.
fn add_idempotency_key(req: &mut Request<ReqBody>, policy: &RetryPolicy) {
    if policy.generate_idempotency_key
        && matches!(*req.method(), Method::POST | Method::PATCH)
        && !req.headers().contains_key(&policy.idempotency_header)
    {
        req.headers_mut()
            .insert(policy.idempotency_header.clone(), new_idempotency_key());
    }
}

/// Sends the attempts of one call until one is not retried; returns the last one's result.
async fn attempts<S>(
    mut inner: S,
    mut req: Request<ReqBody>,
    call: Arc<Call>,
    metrics: Arc<Metrics>,
) -> CallResult
where
    S: Service<Request<ReqBody>, Response = http::Response<RespBody>, Error = CallError>,
{
    let policy = &call.route_policy().retries;
    let may_repeat =
        is_idempotent(req.method()) || req.headers().contains_key(&policy.idempotency_header);
    let mut n: u32 = 0;
    loop {
        n += 1;
        call.attempts.store(n, Ordering::Relaxed);
        // Keep a copy for the next attempt while one may follow.
        let spare = if n < policy.max_attempts && may_repeat {
            spare_copy(&req)
        } else {
            None
        };
        let result = send_attempt(&mut inner, req, n).await;
        let Some(next) = spare else { return result };
        if !should_retry(policy, &result) {
            return result;
        }
        let delay = match admit_retry(&call, &metrics, &result, next.headers(), n) {
            Ok(delay) => delay,
            Err(skipped) => {
                count_skipped(&metrics, &call, skipped);
                return result;
            }
        };
        call.metrics(&metrics).retry(&metrics);
        drop(result);
        tokio::time::sleep(delay).await;
        req = next;
    }
}

/// A copy of `req` for another attempt; `None` when its body cannot be replayed (too large to
/// buffer).
pub(crate) fn spare_copy(req: &Request<ReqBody>) -> Option<Request<ReqBody>> {
    req.body().try_clone().map(|body| {
        let mut r = Request::new(body);
        *r.method_mut() = req.method().clone();
        *r.uri_mut() = req.uri().clone();
        *r.version_mut() = req.version();
        *r.headers_mut() = req.headers().clone();
        *r.extensions_mut() = req.extensions().clone();
        r
    })
}

/// Attempt `n`, in its own span (a child of the call's, when spans are exported), once the
/// inner service is ready.
async fn send_attempt<S>(inner: &mut S, mut req: Request<ReqBody>, n: u32) -> CallResult
where
    S: Service<Request<ReqBody>, Response = http::Response<RespBody>, Error = CallError>,
{
    let svc = inner.ready().await?;
    let span = match req.extensions().get::<CallSpan>() {
        Some(call) => call.attempt(n),
        None => AttemptSpan::default(),
    };
    if span.is_recorded() {
        // Its context goes to the partner (`layers::send`).
        req.extensions_mut().insert(span.clone());
    }
    let result = svc.call(req).await;
    if span.is_recorded() {
        match &result {
            Ok(r) => {
                span.set("http.response.status_code", i64::from(r.status().as_u16()));
                if r.status().is_server_error() {
                    span.error();
                }
            }
            Err(e) => {
                span.set("error.type", error_type(e));
                span.error();
            }
        }
        span.end();
    }
    result
}

/// How long to wait before retry `n + 1`: exponential backoff with full jitter, or the
/// partner's `Retry-After` when it asks for longer.
fn backoff(policy: &RetryPolicy, n: u32, result: &CallResult) -> Duration {
    let mut delay = backoff::Backoff::from_policy(policy).delay(n, &mut rand::rng());
    if policy.respect_retry_after
        && let Ok(resp) = result
        && let Some(asked) = retry_after::from_headers(resp.headers(), SystemTime::now())
    {
        delay = delay.max(asked);
    }
    delay
}

/// Whether the retry after attempt `n` may go, and after how long: it must end its wait before
/// the deadline, find room in the retry budget and a token in the call's quotas. `Err`: why it
/// is skipped (the `reason` of `tollgate_retries_skipped_total`).
fn admit_retry(
    call: &Call,
    metrics: &Metrics,
    result: &CallResult,
    headers: &http::HeaderMap,
    n: u32,
) -> Result<Duration, &'static str> {
    let policy = &call.route_policy().retries;
    let now = Instant::now();
    let delay = backoff(policy, n, result);
    if now + delay + Duration::from_millis(1) >= call.deadline {
        return Err("deadline");
    }
    if !call.route_state().budget.try_retry(now) {
        tracing::debug!(integration = %call.integration.label, "retry budget exhausted");
        return Err("budget");
    }
    // The partner counts this attempt against its quota: so does the sidecar.
    match rate_limit::charge(call, headers, metrics, now, delay) {
        None => Ok(delay),
        Some(Ok(wait)) => Ok(delay.max(wait)),
        Some(Err(refused)) => {
            tracing::debug!(
                integration = %call.integration.label,
                band = %refused.denied.band,
                "no quota token for a retry"
            );
            Err("rate-limited")
        }
    }
}

fn count_skipped(metrics: &Metrics, call: &Call, reason: &str) {
    metrics
        .retries_skipped
        .get_or_create(&SkipLabels {
            integration: call.integration.label.to_string(),
            route: call.route_name().to_string(),
            reason: reason.to_string(),
        })
        .inc();
}

fn error_type(e: &CallError) -> &'static str {
    match e {
        CallError::Answer(a) => a.reason.as_str(),
        CallError::Transport {
            kind: TransportFailure::Connect,
            ..
        } => "connect-error",
        CallError::Transport {
            kind: TransportFailure::Reset,
            ..
        } => "reset",
        CallError::AttemptTimeout => "timeout",
    }
}
