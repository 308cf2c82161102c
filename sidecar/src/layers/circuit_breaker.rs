//! Circuit breaker: while open, calls fail fast with 503 `circuit-open` and `Retry-After` set
//! to the time until half-open. The breaker sees each call's final outcome (after retries).
//!
//! Failures are the partner's 5xx, connect errors, resets and timeouts; 4xx (429 included)
//! are the request's or the quota's fault and count as successes.
//!
//! A response counts when its body ends, not when its head arrives: a body cut at the total
//! deadline is a timeout, and one the partner breaks off is a reset, both failures. A 2xx
//! whose body breaks the route's `contract` is a failure too (see [`super::contract`]).

use std::task::{Context, Poll};

use http::Request;
use tokio::time::Instant;
use tower::Service;
use tower::layer::{LayerFn, layer_fn};

use super::{BoxFuture, Call, CallError, CallResult};
use crate::answer::Reason;
use crate::body::{self, BodyEnd, ReqBody, RespBody};
use crate::engine::breaker::CallOutcome;

pub(crate) fn layer<S>() -> LayerFn<fn(S) -> CircuitBreaker<S>> {
    layer_fn(|inner| CircuitBreaker { inner })
}

#[derive(Clone, Debug)]
pub(crate) struct CircuitBreaker<S> {
    inner: S,
}

/// The breaker's view of a call's result; `None`: neither (the sidecar's own decision).
pub(crate) fn outcome(result: &CallResult) -> Option<CallOutcome> {
    match result {
        Ok(resp) if resp.status().is_server_error() => Some(CallOutcome::Failure),
        Ok(_) => Some(CallOutcome::Success),
        Err(e) if e.is_partner_failure() => Some(CallOutcome::Failure),
        Err(_) => None,
    }
}

impl<S> Service<Request<ReqBody>> for CircuitBreaker<S>
where
    S: Service<Request<ReqBody>, Response = http::Response<RespBody>, Error = CallError>,
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
        let Some(breaker) = call.route_state().breaker.clone() else {
            return futures::future::Either::Left(self.inner.call(req));
        };
        let started = Instant::now();
        match breaker.try_acquire(started) {
            Err(open) => {
                let msg = "circuit breaker is open: the partner has been failing".to_string();
                let answer = call
                    .answer(Reason::CircuitOpen, msg)
                    .retry_after(open.retry_after);
                futures::future::Either::Right(Box::pin(std::future::ready(Err(answer.into()))))
            }
            Ok(permit) => {
                let fut = self.inner.call(req);
                futures::future::Either::Right(Box::pin(async move {
                    let result = fut.await;
                    match (outcome(&result), result) {
                        (Some(o), Ok(resp)) => {
                            let probe = super::contract::probe(resp.extensions());
                            Ok(resp.map(move |b| {
                                body::on_end(b, move |end| {
                                    let o = match end {
                                        BodyEnd::Done if probe.is_some_and(|p| p.broken()) => {
                                            CallOutcome::Failure
                                        }
                                        BodyEnd::Done => o,
                                        BodyEnd::Timeout | BodyEnd::Failed => CallOutcome::Failure,
                                    };
                                    let now = Instant::now();
                                    permit.record(o, now - started, now);
                                })
                            }))
                        }
                        (Some(o), Err(e)) => {
                            let now = Instant::now();
                            permit.record(o, now - started, now);
                            Err(e)
                        }
                        (None, result) => result,
                    }
                }))
            }
        }
    }
}
