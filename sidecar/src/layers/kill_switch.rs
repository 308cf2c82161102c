//! Kill switch: while on (for the integration or the route), nothing reaches the partner.

use std::task::{Context, Poll};

use http::Request;
use tower::{Layer, Service};

use super::{Call, CallResult};
use crate::answer::Reason;
use crate::body::ReqBody;

pub fn layer() -> KillSwitchLayer {
    KillSwitchLayer
}

#[derive(Clone, Copy, Debug)]
pub struct KillSwitchLayer;

impl<S> Layer<S> for KillSwitchLayer {
    type Service = KillSwitch<S>;
    fn layer(&self, inner: S) -> KillSwitch<S> {
        KillSwitch { inner }
    }
}

#[derive(Clone, Debug)]
pub struct KillSwitch<S> {
    inner: S,
}

impl<S> Service<Request<ReqBody>> for KillSwitch<S>
where
    S: Service<
            Request<ReqBody>,
            Response = http::Response<crate::body::RespBody>,
            Error = super::CallError,
        >,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<S::Future, std::future::Ready<CallResult>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let call = Call::from_request(&req);
        let ks = &call.route_policy().kill_switch;
        if ks.enabled {
            let message = match ks.reason.as_deref().filter(|r| !r.is_empty()) {
                Some(r) => format!("kill switch is on: {r}"),
                None => "kill switch is on".to_string(),
            };
            return futures::future::Either::Right(std::future::ready(Err(call
                .answer(Reason::KillSwitch, message)
                .into())));
        }
        futures::future::Either::Left(self.inner.call(req))
    }
}
