//! The Tollgate sidecar: a per-pod proxy that enforces PartnerIntegration policy on outbound
//! partner traffic.
//!
//! `engine` holds the policy state machines (token buckets, breakers, backoff, budgets, the
//! stale cache), free of I/O; `layers` wraps each in a tower layer; `proxy` accepts the app's
//! connections and runs requests through the stack.

pub mod cluster;
pub mod engine;
