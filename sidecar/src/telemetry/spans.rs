//! Spans: one per call and one per attempt, W3C `traceparent` continued from the app and passed
//! on to the partner. Spans carry no header values, so no credential can reach them.

use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of Tollgate's exported spans (the exporter takes only these).
pub(crate) const TARGET: &str = "tollgate::trace";

/// W3C trace context, the one propagation format the contract names. Made here (it is a unit
/// struct) rather than looked up in OpenTelemetry's global registry, whose lock and dynamic
/// dispatch showed in the profile on every call.
fn propagator() -> TraceContextPropagator {
    TraceContextPropagator::new()
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The span of one call, child of the app's `traceparent` when it sent one.
pub(crate) fn call_span(
    method: &http::Method,
    integration: &str,
    route: &str,
    headers: &HeaderMap,
) -> Span {
    let span = tracing::info_span!(
        target: TARGET,
        "tollgate.call",
        otel.kind = "client",
        otel.status_code = Empty,
        tollgate.integration = integration,
        tollgate.route = route,
        http.request.method = method.as_str(),
        http.response.status_code = Empty,
        tollgate.attempts = Empty,
        tollgate.reason = Empty,
        tollgate.fallback = Empty,
        tollgate.contract = Empty,
    );
    if !span.is_disabled() {
        let parent = propagator().extract(&HeaderExtractor(headers));
        let _ = span.set_parent(parent);
    }
    span
}

/// The trace id of an exported span, in hex; `None` when spans are not exported.
pub(crate) fn trace_id(span: &Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The span of one attempt, child of the current (call) span.
pub(crate) fn attempt_span(attempt: u32) -> Span {
    tracing::info_span!(
        target: TARGET,
        "tollgate.attempt",
        otel.kind = "client",
        otel.status_code = Empty,
        tollgate.attempt = attempt,
        http.response.status_code = Empty,
        error.type = Empty,
    )
}

/// Writes the current span's context as `traceparent` (and `tracestate`) into outbound
/// headers. Without an exporter the propagator does nothing and the app's own header, if any,
/// passes through unchanged.
pub(crate) fn inject_context(headers: &mut HeaderMap) {
    let span = Span::current();
    if span.is_disabled() {
        return;
    }
    let cx = span.context();
    propagator().inject_context(&cx, &mut HeaderInjector(headers));
}
