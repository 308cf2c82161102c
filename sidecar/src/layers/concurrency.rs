//! Concurrency caps: at most `maxInFlight` calls to the partner at once from this pod, for the
//! route's own cap (`spec.routes[].concurrency`) and the integration's (`spec.concurrency`),
//! both when both are set. A call takes its places route first and holds them from admission
//! until its answer's body ends (retries included); without a place it gets 429
//! `concurrency-limited` at once (`reject`), or waits in line first (`queue`).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::Either;
use http::{Request, Response};
use tower::{Layer, Service};

use super::{BoxFuture, Call, CallError, CallResult};
use crate::answer::Reason;
use crate::body::{self, ReqBody, RespBody};
use crate::engine::concurrency::{InFlight, Place, Refusal};
use crate::telemetry::metrics::{CapLabels, CapRefusedLabels, Metrics};
use tollgate_crds::policy::Priority;

/// `Retry-After` of a refusal: places free as calls end, so soon.
const RETRY_AFTER: Duration = Duration::from_secs(1);

pub(crate) fn layer(metrics: Arc<Metrics>) -> ConcurrencyLayer {
    ConcurrencyLayer { metrics }
}

#[derive(Clone)]
pub(crate) struct ConcurrencyLayer {
    metrics: Arc<Metrics>,
}

impl<S> Layer<S> for ConcurrencyLayer {
    type Service = ConcurrencyCap<S>;
    fn layer(&self, inner: S) -> ConcurrencyCap<S> {
        ConcurrencyCap {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct ConcurrencyCap<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// The caps `call` is under, route first, each with its scope label.
fn caps(call: &Call) -> Vec<(Arc<InFlight>, &'static str)> {
    let route = call.route_state().concurrency.clone().map(|c| (c, "route"));
    let integration = call
        .integration
        .state
        .concurrency
        .clone()
        .map(|c| (c, "integration"));
    route.into_iter().chain(integration).collect()
}

fn labels(call: &Call, scope: &str) -> CapLabels {
    CapLabels {
        integration: call.integration.label.to_string(),
        route: call.route_name().to_string(),
        scope: scope.to_string(),
    }
}

/// Sets the gauges of one cap to what it holds now.
fn report(metrics: &Metrics, call: &Call, cap: &InFlight, scope: &str) {
    let l = labels(call, scope);
    let m = &metrics.caps;
    m.in_flight
        .get_or_create(&l)
        .set(i64::from(cap.in_flight()));
    m.waiting.get_or_create(&l).set(i64::from(cap.waiting()));
    m.limit
        .get_or_create(&l)
        .set(i64::from(cap.policy.max_in_flight));
    let capacity = match cap.policy.on_limit {
        tollgate_crds::v1alpha1::OnLimit::Queue => cap.policy.max_queue_depth,
        tollgate_crds::v1alpha1::OnLimit::Reject => 0,
    };
    m.queue_capacity.get_or_create(&l).set(i64::from(capacity));
}

/// Takes a place under every cap, in order; a refusal gives back the places already taken.
async fn enter(
    call: &Call,
    headers: &http::HeaderMap,
    caps: &[(Arc<InFlight>, &'static str)],
    metrics: &Metrics,
) -> Result<Vec<Place>, CallError> {
    let mut places = Vec::with_capacity(caps.len());
    for (cap, scope) in caps {
        let entered = {
            let priority = Priority::from_header(
                cap.policy
                    .priority_header
                    .as_ref()
                    .and_then(|h| headers.get(h))
                    .map(|v| v.as_bytes()),
            );
            let waiting = cap.enter(priority, call.deadline);
            tokio::pin!(waiting);
            // The line's gauge moves when this call joins it, not only when it leaves.
            match futures::poll!(waiting.as_mut()) {
                Poll::Ready(r) => r,
                Poll::Pending => {
                    report(metrics, call, cap, scope);
                    waiting.await
                }
            }
        };
        report(metrics, call, cap, scope);
        match entered {
            Ok((place, waited)) => {
                if !waited.is_zero() {
                    metrics
                        .caps
                        .queue_wait
                        .get_or_create(&labels(call, scope))
                        .observe(waited.as_secs_f64());
                }
                places.push(place);
            }
            Err(refusal) => {
                metrics
                    .caps
                    .refused
                    .get_or_create(&CapRefusedLabels {
                        integration: call.integration.label.to_string(),
                        route: call.route_name().to_string(),
                        scope: scope.to_string(),
                        cause: refusal.as_str().to_string(),
                    })
                    .inc();
                let which = match *scope {
                    "route" => format!("spec.routes[{}].concurrency", call.route_name()),
                    _ => "spec.concurrency".to_string(),
                };
                let max = cap.policy.max_in_flight;
                let msg = match refusal {
                    Refusal::Full => format!("all {max} places of {which} are taken"),
                    Refusal::QueueFull => format!(
                        "all {max} places of {which} are taken and {} calls wait already (maxQueueDepth)",
                        cap.policy.max_queue_depth
                    ),
                    Refusal::QueueTimeout => {
                        format!("no place of {which} ({max}) freed within the wait allowed")
                    }
                };
                return Err(call
                    .answer(Reason::ConcurrencyLimited, msg)
                    .retry_after(RETRY_AFTER)
                    .into());
            }
        }
    }
    Ok(places)
}

impl<S> Service<Request<ReqBody>> for ConcurrencyCap<S>
where
    S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = CallError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<RespBody>;
    type Error = CallError;
    type Future = Either<S::Future, BoxFuture<CallResult>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let call = Call::from_request(&req);
        let caps = caps(&call);
        if caps.is_empty() {
            return Either::Left(self.inner.call(req));
        }
        // The service polled ready goes with the request (tower's `Service::call` docs).
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let metrics = self.metrics.clone();
        Either::Right(Box::pin(async move {
            let places = enter(&call, req.headers(), &caps, &metrics).await?;
            let result = ready.call(req).await;
            let leave = move || {
                drop(places);
                for (cap, scope) in &caps {
                    report(&metrics, &call, cap, scope);
                }
            };
            match result {
                Ok(resp) => Ok(resp.map(move |b| body::on_end(b, move |_| leave()))),
                Err(e) => {
                    leave();
                    Err(e)
                }
            }
        }))
    }
}
