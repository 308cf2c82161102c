//! End-to-end tests against a real control plane (kube-apiserver + etcd).
//!
//! This is the only e2e test binary (`autotests = false` in Cargo.toml): each
//! area is a module beside this file, and all of them share the control plane
//! of `ControlPlane::shared()`. Run with `cargo test -p tollgate-e2e`.

mod chart;
mod cluster;
mod crd;
mod failstatic;
mod helm;
mod hostile;
mod monitoring;
mod pods;
mod tokens;
mod webhook;
