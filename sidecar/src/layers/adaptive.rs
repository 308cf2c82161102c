//! Adaptive quotas (`rateLimit.adaptive`): the partner's own throttling lowers the rate this
//! sidecar allows itself (see [`crate::engine::aimd`]). This layer reads each call's final
//! answer: a 429, or a rate-limit header that says nothing remains (`RateLimit-Remaining: 0`,
//! `X-RateLimit-Remaining: 0`, or the IETF draft's `RateLimit: …remaining=0` / `…;r=0`), is a
//! throttle signal for every adaptive quota the call is under.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, Request, Response, StatusCode};
use tokio::time::Instant;
use tower::{Layer, Service};

use super::rate_limit::{QuotaKind, report_effective_rate};
use super::{BoxFuture, Call, CallError, CallResult};
use crate::body::{ReqBody, RespBody};
use crate::telemetry::metrics::{Metrics, QuotaLabels};

/// Longest header value read; a longer one is not a signal.
const MAX_VALUE: usize = 256;

pub(crate) fn layer(metrics: Arc<Metrics>) -> AdaptiveLayer {
    AdaptiveLayer { metrics }
}

#[derive(Clone)]
pub(crate) struct AdaptiveLayer {
    metrics: Arc<Metrics>,
}

impl<S> Layer<S> for AdaptiveLayer {
    type Service = Adaptive<S>;
    fn layer(&self, inner: S) -> Adaptive<S> {
        Adaptive {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Adaptive<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// Whether the partner said to slow down.
pub(crate) fn is_throttle(status: StatusCode, headers: &HeaderMap) -> bool {
    if status == StatusCode::TOO_MANY_REQUESTS {
        return true;
    }
    let zero = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= MAX_VALUE)
            .is_some_and(|v| v.trim() == "0")
    };
    if zero("ratelimit-remaining") || zero("x-ratelimit-remaining") {
        return true;
    }
    headers
        .get_all("ratelimit")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|v| v.len() <= MAX_VALUE)
        .any(draft_remaining_zero)
}

/// `limit=100, remaining=0, reset=30` (draft 7 and earlier) or `"default";r=0;t=30` (later
/// drafts): a `remaining` or `r` parameter equal to 0.
fn draft_remaining_zero(value: &str) -> bool {
    value
        .split([',', ';'])
        .filter_map(|part| part.split_once('='))
        .any(|(k, v)| matches!(k.trim(), "remaining" | "r") && v.trim() == "0")
}

impl<S> Service<Request<ReqBody>> for Adaptive<S>
where
    S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = CallError>,
    S::Future: Send + 'static,
{
    type Response = Response<RespBody>;
    type Error = CallError;
    type Future = futures::future::Either<S::Future, BoxFuture<CallResult>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let call = Call::from_request(&req);
        let adaptive = |q: Option<&crate::state::Quota>| q.is_some_and(|q| q.adaptive.is_some());
        if !adaptive(call.route_state().quota.as_ref())
            && !adaptive(call.integration.state.quota.as_ref())
        {
            return futures::future::Either::Left(self.inner.call(req));
        }
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        futures::future::Either::Right(Box::pin(async move {
            let result = fut.await;
            if let Ok(resp) = &result
                && is_throttle(resp.status(), resp.headers())
            {
                let now = Instant::now();
                let quotas = [
                    (call.route_state().quota.as_ref(), QuotaKind::Route),
                    (
                        call.integration.state.quota.as_ref(),
                        QuotaKind::Integration,
                    ),
                ];
                for (q, kind) in quotas {
                    let Some(q) = q.filter(|q| q.adaptive.is_some()) else {
                        continue;
                    };
                    metrics
                        .adaptive
                        .throttle_signals
                        .get_or_create(&QuotaLabels {
                            integration: call.integration.label.to_string(),
                            route: call.route_name().to_string(),
                            quota: kind.as_str().to_string(),
                        })
                        .inc();
                    if q.throttled(now).is_some() {
                        report_effective_rate(&metrics, &call, q, kind);
                    }
                }
            }
            result
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn the_partners_throttle_signals() {
        let ok = StatusCode::OK;
        assert!(is_throttle(
            StatusCode::TOO_MANY_REQUESTS,
            &HeaderMap::new()
        ));
        assert!(is_throttle(ok, &headers(&[("X-RateLimit-Remaining", "0")])));
        assert!(is_throttle(ok, &headers(&[("RateLimit-Remaining", " 0 ")])));
        assert!(is_throttle(
            ok,
            &headers(&[("RateLimit", "limit=100, remaining=0, reset=30")])
        ));
        assert!(is_throttle(
            ok,
            &headers(&[("RateLimit", "\"default\";r=0;t=30")])
        ));
        assert!(!is_throttle(
            ok,
            &headers(&[("X-RateLimit-Remaining", "12")])
        ));
        assert!(!is_throttle(
            ok,
            &headers(&[("RateLimit", "limit=100, remaining=5, reset=30")])
        ));
        assert!(!is_throttle(
            ok,
            &headers(&[("RateLimit", "\"default\";r=50;t=30")])
        ));
        assert!(!is_throttle(
            StatusCode::SERVICE_UNAVAILABLE,
            &HeaderMap::new()
        ));
        let long = format!("{}remaining=0", "x".repeat(MAX_VALUE));
        assert!(
            !is_throttle(ok, &headers(&[("RateLimit", &long)])),
            "over-long values are ignored"
        );
    }

    proptest! {
        #[test]
        fn any_header_value_is_read_without_panicking(v in "\\PC{0,400}") {
            if let Ok(value) = http::HeaderValue::from_str(&v) {
                let mut h = HeaderMap::new();
                h.insert("ratelimit", value.clone());
                h.insert("x-ratelimit-remaining", value);
                let _ = is_throttle(StatusCode::OK, &h);
            }
        }
    }
}
