//! Observe: the outermost layer. Runs the call inside its span, turns errors into the
//! sidecar's answers, and records every call's outcome in metrics and span attributes once
//! its response body has ended (the span stays open until then).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::Service;
use tower::layer::{LayerFn, layer_fn};

use super::{BoxFuture, Call, CallError};
use crate::answer::Reason;
use crate::body::{self, BodyEnd, ReqBody, RespBody};
use crate::telemetry::access_log;
use crate::telemetry::metrics::{CallResult, Metrics};
use crate::telemetry::spans::CallSpan;

/// Put on a response served from fallback, so the call is recorded as such.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServedFallback {
    pub(crate) kind: &'static str,
    /// What the fallback stood in for.
    pub(crate) reason: Option<Reason>,
}

pub(crate) fn layer<S>(metrics: Arc<Metrics>) -> LayerFn<impl Fn(S) -> Observe<S> + Clone> {
    layer_fn(move |inner| Observe {
        inner,
        metrics: metrics.clone(),
    })
}

#[derive(Clone, Debug)]
pub(crate) struct Observe<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> Service<Request<ReqBody>> for Observe<S>
where
    S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = CallError> + Send,
    S::Future: Send + 'static,
{
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<RespBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let call = Call::from_request(&req);
        let metrics = self.metrics.clone();
        let span = CallSpan::start(
            req.method(),
            call.metrics(&metrics).span_attributes(),
            req.headers(),
        );
        let access = call.integration.policy.access_log.then(|| {
            let trace_id = span.trace_id().or_else(|| {
                req.headers()
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .and_then(access_log::traceparent_trace_id)
            });
            access_log::Start::new(req.method(), req.uri(), trace_id)
        });
        if span.is_recorded() {
            // The attempts' parent.
            req.extensions_mut().insert(span.clone());
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let (resp, outcome, reason, fallback) = match result {
                Ok(resp) => {
                    let (outcome, reason) = match resp.extensions().get::<ServedFallback>() {
                        Some(f) => (fallback_outcome(f.kind), f.reason),
                        None if resp.status().as_u16() < 400 => ("success", None),
                        None => ("partner-error", None),
                    };
                    // Only the partner's own answers speak for its lifecycle (a stale
                    // fallback repeats an old one).
                    if resp.extensions().get::<ServedFallback>().is_none() {
                        call.integration.state.lifecycle.observe(
                            &metrics,
                            &call.integration.label,
                            call.route_name(),
                            resp.headers(),
                        );
                    }
                    let fallback = resp.extensions().get::<ServedFallback>().is_some();
                    if let Some(f) = resp.extensions().get::<ServedFallback>() {
                        span.set("tollgate.fallback", f.kind);
                    }
                    (resp, outcome, reason, fallback)
                }
                Err(e) => {
                    let answer = e.into_answer(&call);
                    let reason = answer.reason;
                    (answer.into_response(), reason.as_str(), Some(reason), false)
                }
            };
            // The call ends with its body: a body cut at the total deadline makes it a
            // timeout, one the partner broke off an unreachable partner.
            let status = resp.status().as_u16();
            let probe = super::contract::probe(resp.extensions());
            Ok(resp.map(move |b| {
                body::on_end(b, move |end| {
                    let (outcome, reason) = match end {
                        BodyEnd::Done => (outcome, reason),
                        BodyEnd::Timeout => {
                            tracing::warn!(
                                integration = %call.integration.label,
                                route = call.route_name(),
                                "response body cut at the total deadline"
                            );
                            (Reason::Timeout.as_str(), Some(Reason::Timeout))
                        }
                        BodyEnd::Failed => (
                            Reason::UpstreamUnreachable.as_str(),
                            Some(Reason::UpstreamUnreachable),
                        ),
                    };
                    // A 2xx that breaks the contract is the partner's failure.
                    let broken = end == BodyEnd::Done && probe.is_some_and(|p| p.broken());
                    let outcome = if broken && outcome == "success" {
                        "contract-violation"
                    } else {
                        outcome
                    };
                    let result = call_result(status, reason, fallback, broken);
                    record(
                        &metrics,
                        &call,
                        &span,
                        status,
                        (outcome, result, reason),
                        broken,
                    );
                    if let Some(a) = &access {
                        access_log::write(
                            &access_log::Line {
                                integration: &call.integration.label,
                                route: call.route_name(),
                                method: &a.method,
                                path: &a.path,
                                status,
                                attempts: call.attempts(),
                                duration_ms: (call.started.elapsed().as_secs_f64() * 1e6).round()
                                    / 1e3,
                                outcome,
                                trace_id: a.trace_id.as_deref(),
                            },
                            &metrics,
                        );
                    }
                })
            }))
        })
    }
}

/// What a finished call says about the partner: the sidecar's refusals (quota included) are
/// not its doing; its 5xx, timeouts, an unreachable partner and a 2xx that breaks the contract
/// are its failures; a fallback counts as what it stood in for (a stale answer without a
/// reason stands in for the partner's 5xx).
pub fn call_result(
    status: u16,
    reason: Option<Reason>,
    fallback: bool,
    broken: bool,
) -> CallResult {
    match reason {
        Some(r)
            if r == Reason::RateLimited || r == Reason::ConcurrencyLimited || r.is_refusal() =>
        {
            CallResult::Refused
        }
        Some(_) => CallResult::Failure,
        None if broken || fallback || status >= 500 => CallResult::Failure,
        None => CallResult::Ok,
    }
}

/// Records a finished call in its span, the metrics and the integration's traffic counters,
/// and ends the span.
fn record(
    metrics: &Metrics,
    call: &Call,
    span: &CallSpan,
    status: u16,
    (outcome, result, reason): (&'static str, CallResult, Option<Reason>),
    broken: bool,
) {
    if span.is_recorded() {
        span.set("http.response.status_code", i64::from(status));
        span.set("tollgate.attempts", i64::from(call.attempts()));
        if let Some(r) = reason {
            span.set("tollgate.reason", r.as_str());
        }
        if broken {
            span.set("tollgate.contract", "success-rule");
        }
        if status >= 500 || reason.is_some() || broken {
            span.error();
        }
        span.end();
    }
    let elapsed = call.started.elapsed();
    call.metrics(metrics)
        .record(metrics, outcome, result, status, elapsed.as_secs_f64());
    // The status counts as the metrics do: a fallback standing in for the partner's 5xx is
    // its failure.
    let hidden_failure = reason.is_none() && result == CallResult::Failure && status < 500;
    call.integration
        .state
        .record_call(status, reason, hidden_failure, elapsed);
}

/// The `outcome` label of a call served from fallback.
fn fallback_outcome(kind: &str) -> &'static str {
    match kind {
        "stale" => "fallback-stale",
        "static" => "fallback-static",
        _ => "fallback",
    }
}
