//! The sidecar injection webhook.
//!
//! - [`inject`]: which pods get the sidecar, and the JSON patch that adds it (pure).
//! - [`server`]: the HTTPS endpoint answering AdmissionReviews.
//! - [`certs`]: the webhook's own CA and serving certificate, and when to renew them (pure).

pub mod certs;
pub mod inject;
pub mod server;
