//! Fallback: when the partner fails or the kill switch is on, a GET may be answered from the
//! last good response (`staleIfError`, `x-tollgate-fallback: stale`), else from the configured
//! static response (`x-tollgate-fallback: static`).
//!
//! "Fails" means the sidecar would otherwise answer `kill-switch`, `circuit-open`, `timeout` or
//! `upstream-unreachable`; for stale-if-error, a partner 5xx too (RFC 5861). Rate limiting, bad
//! requests and denied versions are never hidden behind a fallback: they are the app's to see.
//!
//! A small successful response is read whole before the app sees its head, so a body the
//! partner stalls past `timeouts.total` (or breaks off) is replaced too. What the stale cache
//! stores, and for whom, is in [`crate::engine::stale_cache`].

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::Service;
use tower::layer::{LayerFn, layer_fn};

use super::observe::ServedFallback;
use super::{BoxFuture, Call, CallError, CallResult};
use crate::answer::{FALLBACK_HEADER, Reason};
use crate::body::{self, ReqBody, RespBody};
use crate::client::TransportFailure;
use crate::engine::stale_cache::{CachedResponse, StaleCache};

/// Responses larger than this are not stored for stale-if-error.
pub(crate) const MAX_CACHED_BODY: u64 = 1024 * 1024;

pub(crate) fn layer<S>() -> LayerFn<fn(S) -> Fallback<S>> {
    layer_fn(|inner| Fallback { inner })
}

#[derive(Clone, Debug)]
pub(crate) struct Fallback<S> {
    inner: S,
}

/// The sidecar reason a failed call stands for, if a fallback may replace it.
fn replaceable(e: &CallError) -> Option<Reason> {
    match e {
        CallError::Answer(a) => match a.reason {
            Reason::KillSwitch
            | Reason::CircuitOpen
            | Reason::Timeout
            | Reason::UpstreamUnreachable => Some(a.reason),
            _ => None,
        },
        CallError::Transport { .. } => Some(Reason::UpstreamUnreachable),
        CallError::AttemptTimeout => Some(Reason::Timeout),
    }
}

fn from_cache(
    c: &CachedResponse,
    age: std::time::Duration,
    reason: Option<Reason>,
) -> Response<RespBody> {
    let mut resp = Response::new(body::full(c.body.clone()));
    *resp.status_mut() = c.status;
    *resp.headers_mut() = c.headers.clone();
    resp.headers_mut()
        .insert(FALLBACK_HEADER, HeaderValue::from_static("stale"));
    resp.headers_mut()
        .insert(http::header::AGE, HeaderValue::from(age.as_secs()));
    resp.extensions_mut().insert(ServedFallback {
        kind: "stale",
        reason,
    });
    resp
}

fn from_static(
    r: &tollgate_crds::policy::StaticResponsePolicy,
    reason: Reason,
) -> Response<RespBody> {
    let mut resp = Response::new(body::full(r.body.clone()));
    *resp.status_mut() = r.status;
    for (k, v) in &r.headers {
        resp.headers_mut().insert(k.clone(), v.clone());
    }
    resp.headers_mut()
        .insert(FALLBACK_HEADER, HeaderValue::from_static("static"));
    resp.headers_mut().insert(
        crate::answer::REASON_HEADER,
        HeaderValue::from_static(reason.as_str()),
    );
    resp.extensions_mut().insert(ServedFallback {
        kind: "static",
        reason: Some(reason),
    });
    resp
}

/// Where a GET's good response is stored and its stale copy looked up.
struct StaleSlot {
    cache: Arc<StaleCache>,
    max_age: std::time::Duration,
    key: String,
    /// The app's request headers: who asked, and the values a `Vary` may select on.
    request: HeaderMap,
}

impl StaleSlot {
    fn lookup(&self, reason: Option<Reason>) -> Option<Response<RespBody>> {
        let s = self
            .cache
            .lookup(&self.key, &self.request, self.max_age, Instant::now())?;
        Some(from_cache(&s.response, s.age, reason))
    }
}

impl<S> Service<Request<ReqBody>> for Fallback<S>
where
    S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = CallError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<S::Future, BoxFuture<CallResult>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let call = Call::from_request(&req);
        let policy = &call.route_policy().fallback;
        if policy.stale_if_error.is_none() && policy.response.is_none() {
            return futures::future::Either::Left(self.inner.call(req));
        }
        let stale = match (&call.integration.state.cache, policy.stale_if_error) {
            (Some(cache), Some(max_age)) if req.method() == Method::GET => {
                let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
                Some(StaleSlot {
                    key: cache.key(pq, req.headers()),
                    cache: cache.clone(),
                    max_age,
                    request: req.headers().clone(),
                })
            }
            _ => None,
        };
        let fut = self.inner.call(req);
        futures::future::Either::Right(Box::pin(async move {
            let result = fut.await;
            let policy = &call.route_policy().fallback;
            let failure = match result {
                // Buffered (when small) so that a body the partner stalls or breaks off can
                // still be replaced by the fallback within the deadline.
                Ok(resp) if resp.status().is_success() => {
                    match buffer(stale.as_ref(), resp).await {
                        Ok(resp) => return Ok(resp),
                        Err(e) => e,
                    }
                }
                Ok(resp) if resp.status().is_server_error() => {
                    if let Some(r) = stale.as_ref().and_then(|s| s.lookup(None)) {
                        return Ok(r);
                    }
                    return Ok(resp);
                }
                Ok(resp) => return Ok(resp),
                Err(e) => e,
            };
            let Some(reason) = replaceable(&failure) else {
                return Err(failure);
            };
            if let Some(r) = stale.as_ref().and_then(|s| s.lookup(Some(reason))) {
                return Ok(r);
            }
            match &policy.response {
                Some(r) => Ok(from_static(r, reason)),
                None => Err(failure),
            }
        }))
    }
}

/// Reads a small successful response whole and, for a GET with `staleIfError`, stores it when
/// HTTP caching allows; returns it unchanged. A large or unsized one passes through as it
/// streams. A body cut at the total deadline or broken off by the partner is the call's failure.
async fn buffer(
    stale: Option<&StaleSlot>,
    resp: Response<RespBody>,
) -> Result<Response<RespBody>, CallError> {
    let small = http_body::Body::size_hint(resp.body())
        .upper()
        .is_some_and(|u| u <= MAX_CACHED_BODY);
    if !small {
        return Ok(resp);
    }
    let (parts, body) = resp.into_parts();
    let bytes: Bytes = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if body::is_body_timeout(&e) => return Err(CallError::AttemptTimeout),
        Err(e) => {
            return Err(CallError::Transport {
                kind: TransportFailure::Reset,
                message: format!("the partner broke off the response body: {e}"),
            });
        }
    };
    if let Some(s) = stale
        && let Err(why) = s.cache.store(
            &s.key,
            &s.request,
            parts.status,
            &parts.headers,
            bytes.clone(),
            Instant::now(),
        )
    {
        tracing::debug!(?why, "response not stored for stale-if-error");
    }
    Ok(Response::from_parts(parts, body::full(bytes)))
}
