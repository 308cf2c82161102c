//! Metrics (Prometheus text on the admin listener) and traces (OTLP).

pub(crate) mod access_log;
pub mod metrics;
pub(crate) mod spans;
pub mod subscriber;
