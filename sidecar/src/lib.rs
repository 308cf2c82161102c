//! The Tollgate sidecar: a per-pod proxy that enforces PartnerIntegration policy on outbound
//! partner traffic.
//!
//! `engine` holds the policy state machines (token buckets, breakers, backoff, budgets, the
//! stale cache), free of I/O; `layers` wraps each in a tower layer, in the order a request meets
//! them; `proxy` accepts the app's connections and runs requests through the stack; `config`
//! builds and swaps revisions of policy; `cluster` subscribes to the operator for them.
//! `transparent` accepts the connections that iptables rules redirect, rules that `setup` (the
//! `setup-iptables` sub-command) installs.

pub mod admin;
pub(crate) mod answer;
pub(crate) mod body;
pub mod client;
pub mod cluster;
pub mod config;
mod encoding;
pub mod engine;
pub mod intercept;
mod io;
pub mod layers;
pub mod lifecycle;
pub mod oauth;
pub(crate) mod pool;
pub mod proxy;
pub mod setup;
pub mod state;
pub mod telemetry;
pub mod transparent;
pub mod verify;
