//! Metrics (Prometheus text on the admin listener) and traces (OTLP).

pub mod access_log;
pub mod metrics;
pub mod spans;
pub mod subscriber;
