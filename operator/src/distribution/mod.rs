//! Config distribution: the HTTPS endpoint every replica serves to sidecars.
//!
//! [`auth`] proves which pod is calling, [`hub`] decides what it gets and pushes revisions,
//! [`server`] is the transport. The wire types live in `tollgate_crds::distribution`.

pub mod auth;
pub mod hub;
pub mod server;
pub mod shares;

pub use auth::{AuthError, Authenticator};
pub use hub::{Hub, HubSettings, PodIdentity, View};
pub use server::{Distribution, ServerLimits, serve, tls_config, tls_config_from_files};
