//! Spans: one per call and one per attempt, W3C `traceparent` continued from the app and passed
//! on to the partner; one per tunnel. Spans carry no header values, so no credential can reach
//! them.
//!
//! They are built directly with the OpenTelemetry SDK's tracer, installed once at start when an
//! exporter is configured: no `tracing` span, no registry slot, no field visitor, no enter and
//! exit on every poll. Without an exporter every span here is `None` and costs a load and a
//! branch.

use std::sync::OnceLock;

use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracer;

/// The tracer of the exporting sidecar; unset when spans are not exported.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Installs the tracer every span is made with (once; later calls are ignored).
pub(crate) fn install(tracer: SdkTracer) {
    let _ = TRACER.set(tracer);
}

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
        // The W3C propagator's two names, without parsing them; the value's bytes are taken,
        // not copied.
        let name = match key {
            "traceparent" => http::HeaderName::from_static("traceparent"),
            "tracestate" => http::HeaderName::from_static("tracestate"),
            other => match http::HeaderName::from_bytes(other.as_bytes()) {
                Ok(name) => name,
                Err(_) => return,
            },
        };
        if let Ok(value) = http::HeaderValue::try_from(value) {
            self.0.insert(name, value);
        }
    }
}

/// The method as a static string for the common ones (no allocation per span).
fn method_value(method: &http::Method) -> opentelemetry::Value {
    let known = match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => return method.as_str().to_string().into(),
    };
    known.into()
}

/// A span in its context (the parent of the spans made under it); `None` when spans are not
/// exported, and then every method does nothing.
#[derive(Clone, Default)]
pub(crate) struct Traced(Option<Context>);

impl Traced {
    fn start(
        name: &'static str,
        attributes: Vec<KeyValue>,
        parent: impl FnOnce() -> Context,
    ) -> Self {
        let Some(tracer) = TRACER.get() else {
            return Traced(None);
        };
        let parent = parent();
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(tracer, &parent);
        Traced(Some(parent.with_span(span)))
    }

    /// Whether the span is exported.
    pub(crate) fn is_recorded(&self) -> bool {
        self.0.is_some()
    }

    pub(crate) fn set(&self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        if let Some(cx) = &self.0 {
            cx.span().set_attribute(KeyValue::new(key, value));
        }
    }

    /// Marks the span failed (status `ERROR`).
    pub(crate) fn error(&self) {
        if let Some(cx) = &self.0 {
            cx.span().set_status(Status::error(""));
        }
    }

    /// Ends the span now (else it ends when the last clone is dropped).
    pub(crate) fn end(&self) {
        if let Some(cx) = &self.0 {
            cx.span().end();
        }
    }
}

/// The span of one call (`tollgate.call`), child of the app's `traceparent` when it sent one.
/// Clones share the span; it ends with [`CallSpan::end`] (or when the last clone is dropped).
#[derive(Clone, Default)]
pub(crate) struct CallSpan(Traced);

impl CallSpan {
    /// `route` holds the route's `tollgate.integration` and `tollgate.route` attributes, made
    /// once per revision.
    pub(crate) fn start(method: &http::Method, route: &[KeyValue], headers: &HeaderMap) -> Self {
        if TRACER.get().is_none() {
            return CallSpan::default();
        }
        let mut attributes = Vec::with_capacity(route.len() + 4);
        attributes.extend_from_slice(route);
        attributes.push(KeyValue::new("http.request.method", method_value(method)));
        CallSpan(Traced::start("tollgate.call", attributes, || {
            propagator().extract_with_context(&Context::new(), &HeaderExtractor(headers))
        }))
    }

    /// The span's trace id, in hex; `None` when spans are not exported.
    pub(crate) fn trace_id(&self) -> Option<String> {
        let cx = self.0.0.as_ref()?;
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| sc.trace_id().to_string())
    }

    /// The span of attempt `n` (`tollgate.attempt`), child of this one.
    pub(crate) fn attempt(&self, n: u32) -> AttemptSpan {
        let Some(cx) = &self.0.0 else {
            return AttemptSpan::default();
        };
        AttemptSpan(Traced::start(
            "tollgate.attempt",
            vec![KeyValue::new("tollgate.attempt", i64::from(n))],
            || cx.clone(),
        ))
    }
}

/// The span of one attempt; it ends when the last clone is dropped (or at
/// [`AttemptSpan::end`]).
#[derive(Clone, Default)]
pub(crate) struct AttemptSpan(Traced);

impl AttemptSpan {
    /// Adds event `name` with a `reason` attribute (never a credential).
    pub(crate) fn event(&self, name: &'static str, reason: &str) {
        if let Some(cx) = &self.0.0 {
            cx.span()
                .add_event(name, vec![KeyValue::new("reason", reason.to_string())]);
        }
    }

    /// Writes this attempt's context as `traceparent` (and `tracestate`) into its outbound
    /// headers. Not exported: nothing is written, and the app's own header, if any, passes
    /// through unchanged.
    pub(crate) fn inject(&self, headers: &mut HeaderMap) {
        if let Some(cx) = &self.0.0 {
            propagator().inject_context(cx, &mut HeaderInjector(headers));
        }
    }
}

/// A tunnel's span (`tollgate.tunnel`), a root; it ends when dropped.
#[derive(Default)]
pub(crate) struct TunnelSpan(Traced);

impl TunnelSpan {
    /// `attributes` is called only when spans are exported.
    pub(crate) fn start(attributes: impl FnOnce() -> Vec<KeyValue>) -> Self {
        if TRACER.get().is_none() {
            return TunnelSpan::default();
        }
        TunnelSpan(Traced::start("tollgate.tunnel", attributes(), Context::new))
    }
}

impl Drop for TunnelSpan {
    fn drop(&mut self) {
        self.0.end();
    }
}

macro_rules! traced {
    ($($span:ty),*) => {$(
        impl std::ops::Deref for $span {
            type Target = Traced;
            fn deref(&self) -> &Traced {
                &self.0
            }
        }
    )*};
}
traced!(CallSpan, AttemptSpan, TunnelSpan);
