//! Version gate: denied (deprecated) path prefixes answer 410 and never reach the partner;
//! pinned version headers are set on every request, over whatever the app sent.

use std::task::{Context, Poll};

use futures::future::Either;
use http::Request;
use tower::{Layer, Service};

use super::{Call, CallError, CallResult};
use crate::answer::Reason;
use crate::body::{ReqBody, RespBody};

pub fn layer() -> VersionGateLayer {
    VersionGateLayer
}

#[derive(Clone, Copy, Debug)]
pub struct VersionGateLayer;

impl<S> Layer<S> for VersionGateLayer {
    type Service = VersionGate<S>;
    fn layer(&self, inner: S) -> VersionGate<S> {
        VersionGate { inner }
    }
}

#[derive(Clone, Debug)]
pub struct VersionGate<S> {
    inner: S,
}

impl<S> Service<Request<ReqBody>> for VersionGate<S>
where
    S: Service<Request<ReqBody>, Response = http::Response<RespBody>, Error = CallError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, std::future::Ready<CallResult>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let call = Call::from_request(&req);
        let versioning = &call.integration.policy.versioning;
        if let Some(prefix) = versioning.denied(req.uri().path()) {
            let msg =
                format!("path prefix {prefix} is denied (spec.versioning.deniedPathPrefixes)");
            return Either::Right(std::future::ready(Err(call
                .answer(Reason::DeprecatedVersion, msg)
                .into())));
        }
        for (name, value) in &versioning.pin_headers {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        Either::Left(self.inner.call(req))
    }
}
