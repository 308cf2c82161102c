//! Rate limit: the route's own quota and the integration's account quota must both admit a
//! request. Over the limit: 429 at once (`reject`), or a first-come-first-served wait of up to
//! `maxQueueWait` and never past the call's total deadline (`queue`).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::{BoxFuture, Call, CallError, CallResult};
use crate::answer::Reason;
use crate::body::{ReqBody, RespBody};
use crate::engine::limiter::{self, Limiter};
use crate::telemetry::metrics::{BandLabels, Metrics};
use tollgate_crds::v1alpha1::OnLimit;

pub fn layer(metrics: Arc<Metrics>) -> RateLimitLayer {
    RateLimitLayer { metrics }
}

#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    metrics: Arc<Metrics>,
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<ReqBody>, Response = http::Response<RespBody>, Error = CallError>
        + Clone
        + Send
        + 'static,
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
        let state = &call.integration.state;
        let route_quota = state.route_quotas.get(call.route).and_then(Option::as_ref);
        let account = state.quota.as_ref();
        if route_quota.is_none() && account.is_none() {
            return futures::future::Either::Left(self.inner.call(req));
        }
        // The route's settings decide how to wait when it has its own quota.
        let policy = route_quota
            .or(account)
            .map(|q| &q.policy)
            .expect("one quota is set");
        let now = Instant::now();
        let max_wait = match policy.on_limit {
            OnLimit::Reject => Duration::ZERO,
            OnLimit::Queue => policy
                .max_queue_wait
                .min(call.deadline.saturating_duration_since(now)),
        };
        let partition = call.partition.as_deref();
        let mut quotas: Vec<(&Limiter, Option<&str>)> = Vec::with_capacity(2);
        for q in [route_quota, account].into_iter().flatten() {
            quotas.push((&q.limiter, q.policy.partition_by.as_ref().and(partition)));
        }
        match limiter::acquire(&quotas, now, max_wait) {
            Ok(wait) if wait.is_zero() => futures::future::Either::Left(self.inner.call(req)),
            Ok(wait) => {
                let mut inner = self.inner.clone();
                futures::future::Either::Right(Box::pin(async move {
                    tokio::time::sleep(wait).await;
                    inner.call(req).await
                }))
            }
            Err(denied) => {
                self.metrics
                    .rate_limited
                    .get_or_create(&BandLabels {
                        integration: call.integration.label.to_string(),
                        route: call.route_name().to_string(),
                        band: denied.band.to_string(),
                    })
                    .inc();
                let which = if route_quota
                    .is_some_and(|q| q.policy.bands.iter().any(|b| *b.name == *denied.band))
                {
                    format!("spec.routes[{}].rateLimit", call.route_name())
                } else {
                    "spec.rateLimit".to_string()
                };
                let mut msg = format!("quota band {:?} ({which}) is exhausted", denied.band);
                if let Some(p) = partition {
                    msg.push_str(&format!(" for partition {p:?}"));
                }
                let answer = call
                    .answer(Reason::RateLimited, msg)
                    .retry_after(denied.retry_after);
                futures::future::Either::Right(Box::pin(std::future::ready(Err(answer.into()))))
            }
        }
    }
}
