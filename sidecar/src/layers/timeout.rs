//! Per-attempt timeout: `timeouts.request`, cut short by what is left of the total deadline.
//!
//! The total deadline bounds the response body too: a body still streaming when
//! `timeouts.total` passes is cut there ([`crate::body::BodyTimeout`]), and the layers above
//! record the call as a timeout when they see that.

use std::task::{Context, Poll};

use http::Request;
use tokio::time::Instant;
use tower::Service;
use tower::layer::{LayerFn, layer_fn};

use super::{BoxFuture, Call, CallError, CallResult};
use crate::body::{self, ReqBody, RespBody};

pub(crate) fn layer<S>() -> LayerFn<fn(S) -> Timeout<S>> {
    layer_fn(|inner| Timeout { inner })
}

#[derive(Clone, Debug)]
pub(crate) struct Timeout<S> {
    inner: S,
}

impl<S> Service<Request<ReqBody>> for Timeout<S>
where
    S: Service<Request<ReqBody>, Response = http::Response<RespBody>, Error = CallError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<CallResult>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let call = Call::from_request(&req);
        let attempt_deadline = Instant::now() + call.route_policy().timeouts.request;
        let deadline = attempt_deadline.min(call.deadline);
        let total = call.deadline;
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(r) => r.map(|resp| resp.map(|b| body::with_deadline(b, total))),
                Err(_) => Err(CallError::AttemptTimeout),
            }
        })
    }
}
