//! Tollgate's control plane: reconciles PartnerIntegrations into revisions, pushes them to
//! sidecars, and writes what the sidecars report back into each resource's status.
//!
//! - [`controller`]: watches PartnerIntegrations and their Secrets, compiles, writes status
//!   and events (leader only), keeps the [`catalog`] current (every replica).
//! - [`distribution`]: the HTTPS stream sidecars subscribe to, and their reports.
//! - [`traffic`]: reports aggregated into `status.sidecars` and `status.traffic`.
//! - [`leader`]: the coordination.k8s.io Lease that picks the one replica that writes.
//! - [`metrics`]: Prometheus metrics and the admin listener.
//! - [`webhook`]: the sidecar injection webhook, its certificate and the sidecars' CA.

pub mod catalog;
pub mod controller;
pub mod distribution;
pub mod error;
#[cfg(test)]
mod fixtures;
pub mod leader;
pub mod metrics;
pub mod peers;
pub mod status;
pub mod traffic;
pub mod webhook;

pub use error::{Error, Result};
