//! The sidecar injection webhook.
//!
//! - [`inject`]: which pods get the sidecar, and the JSON patch that adds it (pure).

pub mod inject;
