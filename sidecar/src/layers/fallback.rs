//! Fallback: when the partner fails or the kill switch is on, a GET may be answered from the
//! last good response (`staleIfError`, `x-tollgate-fallback: stale`), else from the configured
//! static response (`x-tollgate-fallback: static`).
//!
//! "Fails" means the sidecar would otherwise answer `kill-switch`, `circuit-open`, `timeout` or
//! `upstream-unreachable`; for stale-if-error, a partner 5xx too (RFC 5861). Rate limiting, bad
//! requests and denied versions are never hidden behind a fallback: they are the app's to see.

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::observe::ServedFallback;
use super::{BoxFuture, Call, CallError, CallResult};
use crate::answer::{FALLBACK_HEADER, Reason};
use crate::body::{self, ReqBody, RespBody};
use crate::engine::stale_cache::CachedResponse;

/// Responses larger than this are not stored for stale-if-error.
pub const MAX_CACHED_BODY: u64 = 1024 * 1024;

pub fn layer() -> FallbackLayer {
    FallbackLayer
}

#[derive(Clone, Copy, Debug)]
pub struct FallbackLayer;

impl<S> Layer<S> for FallbackLayer {
    type Service = Fallback<S>;
    fn layer(&self, inner: S) -> Fallback<S> {
        Fallback { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Fallback<S> {
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

fn cache_key(req: &Request<ReqBody>) -> String {
    req.uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string()
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
                Some((cache.clone(), max_age, cache_key(&req)))
            }
            _ => None,
        };
        let fut = self.inner.call(req);
        futures::future::Either::Right(Box::pin(async move {
            let result = fut.await;
            let policy = &call.route_policy().fallback;
            match result {
                Ok(resp) if resp.status().is_success() => match stale {
                    Some((cache, _, key)) => Ok(store(cache.as_ref(), key, resp).await),
                    None => Ok(resp),
                },
                Ok(resp) if resp.status().is_server_error() => {
                    if let Some((cache, max_age, key)) = &stale
                        && let Some(s) = cache.get(key, *max_age, Instant::now())
                    {
                        return Ok(from_cache(&s.response, s.age, None));
                    }
                    Ok(resp)
                }
                Ok(resp) => Ok(resp),
                Err(e) => {
                    let Some(reason) = replaceable(&e) else {
                        return Err(e);
                    };
                    if let Some((cache, max_age, key)) = &stale
                        && let Some(s) = cache.get(key, *max_age, Instant::now())
                    {
                        return Ok(from_cache(&s.response, s.age, Some(reason)));
                    }
                    match &policy.response {
                        Some(r) => {
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
                            Ok(resp)
                        }
                        None => Err(e),
                    }
                }
            }
        }))
    }
}

/// Buffers a small successful GET response into the cache and returns it unchanged; a large or
/// unsized one passes through uncached.
async fn store(
    cache: &crate::engine::stale_cache::StaleCache,
    key: String,
    resp: Response<RespBody>,
) -> Response<RespBody> {
    let small = http_body::Body::size_hint(resp.body())
        .upper()
        .is_some_and(|u| u <= MAX_CACHED_BODY);
    if !small {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let bytes: Bytes = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            let failed = http_body_util::StreamBody::new(futures::stream::once(async move {
                Err::<http_body::Frame<Bytes>, _>(e)
            }));
            return Response::from_parts(parts, failed.boxed_unsync());
        }
    };
    cache.insert(
        &key,
        CachedResponse {
            status: parts.status,
            headers: parts.headers.clone(),
            body: bytes.clone(),
            stored_at: Instant::now(),
        },
    );
    Response::from_parts(parts, body::full(bytes))
}
