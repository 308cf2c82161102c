//! Logs to stderr and, when an OTLP endpoint is configured through the standard `OTEL_*`
//! variables, spans to an OpenTelemetry collector.
//!
//! Honoured: `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (no endpoint:
//! no export), `OTEL_EXPORTER_OTLP_PROTOCOL` / `..._TRACES_PROTOCOL` (`http/protobuf`, the
//! default, or `grpc`), `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`,
//! `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` /
//! `OTEL_TRACES_SAMPLER_ARG`, `OTEL_SDK_DISABLED` and `OTEL_TRACES_EXPORTER=none`.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Keeps the exporter alive; flushes spans on drop.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    pub fn shutdown(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Installs the global subscriber (logs) and, if configured, the OTLP span exporter. Must run
/// inside the tokio runtime.
pub fn init(format: LogFormat, default_filter: &str) -> anyhow::Result<Telemetry> {
    let provider = tracer_provider()?;
    use tracing_subscriber::Layer as _;
    // No `Option` layers here: an absent layer counts as interested in everything, and the
    // registry would then build every span whoever wants it.
    let log = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_filter(log_filter(default_filter))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(log_filter(default_filter))
            .boxed(),
    };
    let exporting = provider.is_some();
    // Only Tollgate's own call and attempt spans are exported, whatever the log filter, and
    // only when there is an exporter.
    let otel = provider
        .as_ref()
        .map(|p| {
            // The attributes api.md names, and no more: the layer's defaults add source
            // location, thread, target and busy/idle time to every span, which cost a clock
            // read on every poll and a third of each span's encoding, and say nothing here
            // (every span comes from the same two places in the code).
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer("tollgate-sidecar"))
                .with_location(false)
                .with_threads(false)
                .with_target(false)
                .with_tracked_inactivity(false)
        })
        .with_filter(tracing_subscriber::filter::filter_fn(move |m| {
            exporting && m.target().starts_with(crate::telemetry::spans::TARGET)
        }));
    tracing_subscriber::registry()
        .with(otel)
        .with(log)
        .try_init()
        .map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))?;
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    Ok(Telemetry { provider })
}

/// `RUST_LOG` (else `default_filter`) for the log lines, with Tollgate's call and attempt spans
/// left out: they exist for export, and formatting their fields for the log layer cost about a
/// quarter of the sidecar's instructions per call.
fn log_filter(default_filter: &str) -> EnvFilter {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    match format!("{}=off", crate::telemetry::spans::TARGET).parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    }
}

fn tracer_provider() -> anyhow::Result<Option<SdkTracerProvider>> {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return Ok(None);
    }
    if env("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
        && env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
    {
        return Ok(None);
    }
    let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "http/protobuf".to_string());
    let exporter = match protocol.as_str() {
        "grpc" => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_protocol(opentelemetry_otlp::Protocol::Grpc)
            .build()?,
        "http/protobuf" => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()?,
        other => anyhow::bail!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other:?} is not supported (use http/protobuf or grpc)"
        ),
    };
    let resource = Resource::builder()
        .with_service_name(env("OTEL_SERVICE_NAME").unwrap_or_else(|| "tollgate-sidecar".into()))
        .build();
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    Ok(Some(provider))
}
