//! Metrics (Prometheus text on the admin listener) and traces (OTLP).

pub mod metrics;
pub mod tracing;
