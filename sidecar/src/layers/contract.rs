//! Contract: checks the partner's 2xx answers against the route's `contract`: its success
//! rule, its JSON Schema and its enum fields.
//!
//! The body streams to the app as it comes; a copy of its first `maxBodyBytes` is kept aside
//! and checked once the body has ended. A 2xx that breaks the rule or does not match the schema
//! is a failure for the breaker and the status (they ask [`Probe::broken`] when the body ends)
//! and is counted in `tollgate_contract_violations_total{kind="success-rule"}` or
//! `{kind="schema"}` (both when it breaks both); a body too long to check, or
//! compressed, is counted with `kind="unchecked"`. The app's answer is never changed.
//!
//! Sits between the circuit breaker and retry: it sees the final answer after retries.

use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tollgate_crds::policy::ContractPolicy;
use tower::Service;
use tower::layer::{LayerFn, layer_fn};

use super::{BoxFuture, Call, CallError, CallResult};
use crate::body::{BoxError, ReqBody, RespBody};
use crate::telemetry::metrics::Metrics;

pub(crate) fn layer<S>(metrics: Arc<Metrics>) -> LayerFn<impl Fn(S) -> ContractCheck<S> + Clone> {
    layer_fn(move |inner| ContractCheck {
        inner,
        metrics: metrics.clone(),
    })
}

#[derive(Clone, Debug)]
pub(crate) struct ContractCheck<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// What the check of one answer found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Kept,
    Broken,
    /// Too long, or compressed.
    Unchecked,
    /// The body did not end (the app stopped reading, or it broke): nothing to judge.
    Unfinished,
}

#[derive(Default)]
struct Seen {
    buf: Vec<u8>,
    /// More than the limit came, or the body is compressed: no copy is kept.
    skip: bool,
    complete: bool,
}

/// One answer under check; put on the response's extensions for the layers outside.
pub(crate) struct Probe {
    rule: ContractPolicy,
    seen: Mutex<Seen>,
    verdict: OnceLock<Verdict>,
    metrics: Arc<Metrics>,
    integration: String,
    route: String,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Probe")
    }
}

/// The response extension that carries a [`Probe`].
#[derive(Clone, Debug)]
pub(crate) struct ContractProbe(pub Arc<Probe>);

impl Probe {
    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, data: &[u8]) {
        let mut s = self.lock();
        if s.skip {
            return;
        }
        if s.buf.len() + data.len() > self.rule.max_body_bytes {
            s.skip = true;
            s.buf = Vec::new();
        } else {
            s.buf.extend_from_slice(data);
        }
    }

    fn complete(&self) {
        self.lock().complete = true;
    }

    /// The verdict, judged once, when first asked after the body ended (every byte passed
    /// through the copy before any layer outside sees the end).
    pub(crate) fn verdict(&self) -> Verdict {
        *self.verdict.get_or_init(|| {
            let mut s = self.lock();
            let mut unknown_enums = 0;
            let mut kinds: Vec<&'static str> = Vec::new();
            let v = if s.skip {
                Verdict::Unchecked
            } else if !s.complete {
                Verdict::Unfinished
            } else {
                let j = self.rule.judge(&s.buf);
                unknown_enums = j.unknown_enums;
                if !j.kept {
                    kinds.push("success-rule");
                }
                if !j.schema_kept {
                    kinds.push("schema");
                }
                if kinds.is_empty() {
                    Verdict::Kept
                } else {
                    Verdict::Broken
                }
            };
            s.buf = Vec::new();
            for _ in 0..unknown_enums {
                self.metrics
                    .contract_violation(&self.integration, &self.route, "unknown-enum");
            }
            if v == Verdict::Unchecked {
                kinds.push("unchecked");
            }
            for kind in kinds {
                self.metrics
                    .contract_violation(&self.integration, &self.route, kind);
            }
            v
        })
    }

    pub(crate) fn broken(&self) -> bool {
        self.verdict() == Verdict::Broken
    }
}

/// The probe of a checked answer, if it is checked.
pub(crate) fn probe(extensions: &http::Extensions) -> Option<Arc<Probe>> {
    extensions.get::<ContractProbe>().map(|p| p.0.clone())
}

impl<S> Service<Request<ReqBody>> for ContractCheck<S>
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
        let Some(rule) = call.route_policy().contract.clone() else {
            return futures::future::Either::Left(self.inner.call(req));
        };
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        futures::future::Either::Right(Box::pin(async move {
            let mut resp = fut.await?;
            if !resp.status().is_success()
                || (rule.sample_rate < 1.0 && rand::random::<f64>() >= rule.sample_rate)
            {
                return Ok(resp);
            }
            let compressed = resp
                .headers()
                .get(http::header::CONTENT_ENCODING)
                .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
            let too_long = resp
                .body()
                .size_hint()
                .exact()
                .is_some_and(|n| n > rule.max_body_bytes as u64);
            let probe = Arc::new(Probe {
                seen: Mutex::new(Seen {
                    skip: compressed || too_long,
                    ..Seen::default()
                }),
                rule,
                verdict: OnceLock::new(),
                metrics,
                integration: call.integration.label.to_string(),
                route: call.route_name().to_string(),
            });
            resp.extensions_mut().insert(ContractProbe(probe.clone()));
            Ok(resp.map(|b| {
                Tee {
                    inner: b,
                    probe: probe.clone(),
                }
                .boxed_unsync()
            }))
        }))
    }
}

/// Passes the body through, keeping a bounded copy for the probe.
struct Tee {
    inner: RespBody,
    probe: Arc<Probe>,
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.probe.take(data);
                }
                if self.inner.is_end_stream() {
                    self.probe.complete();
                }
            }
            Poll::Ready(None) => self.probe.complete(),
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.probe.complete();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
