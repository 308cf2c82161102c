//! The shape of the policies that decide before the call: kill switch, version gate and rate
//! limit. Each is a [`Gate`]: it reads the call, may change the request, and lets it
//! through now, lets it through after a wait, or answers in the partner's place. [`GateLayer`]
//! turns a gate into a tower layer; readiness is the inner service's, handled here once.

use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::Either;
use http::{Request, Response};
use tower::{Layer, Service};

use super::{BoxFuture, Call, CallError, CallResult};
use crate::body::{ReqBody, RespBody};

/// What a gate decided for a request it lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    Now,
    /// Sent once this wait is over (a queued rate-limit slot).
    After(Duration),
}

/// A policy that decides before the call.
pub(crate) trait Gate {
    /// `Err`: the call ends here with this error (the inner service is never called).
    fn check(&self, req: &mut Request<ReqBody>, call: &Call) -> Result<Admit, CallError>;
}

/// The layer of a [`Gate`].
#[derive(Clone, Debug)]
pub(crate) struct GateLayer<G> {
    gate: G,
}

impl<G> GateLayer<G> {
    pub(crate) fn new(gate: G) -> Self {
        GateLayer { gate }
    }
}

impl<G: Clone, S> Layer<S> for GateLayer<G> {
    type Service = Gated<G, S>;
    fn layer(&self, inner: S) -> Gated<G, S> {
        Gated {
            gate: self.gate.clone(),
            inner,
        }
    }
}

/// A service behind a [`Gate`].
#[derive(Clone, Debug)]
pub(crate) struct Gated<G, S> {
    gate: G,
    inner: S,
}

type Refused = std::future::Ready<CallResult>;

impl<G, S> Service<Request<ReqBody>> for Gated<G, S>
where
    G: Gate,
    S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = CallError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<RespBody>;
    type Error = CallError;
    type Future = Either<S::Future, Either<Refused, BoxFuture<CallResult>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let call = Call::from_request(&req);
        match self.gate.check(&mut req, &call) {
            Ok(Admit::Now) => Either::Left(self.inner.call(req)),
            Ok(Admit::After(wait)) => {
                // The service polled ready goes with the request; a clone stays behind for the
                // next `poll_ready` (tower's `Service::call` docs).
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                Either::Right(Either::Right(Box::pin(async move {
                    tokio::time::sleep(wait).await;
                    ready.call(req).await
                })))
            }
            Err(e) => Either::Right(Either::Left(std::future::ready(Err(e)))),
        }
    }
}
