//! End-to-end test support: the control plane harness and process helpers.
//!
//! Tests get a real kube-apiserver and etcd through [`ControlPlane::shared`],
//! one per test binary; all e2e tests live in the one binary `tests/e2e.rs` so
//! they share it. The Go binaries (the control plane and helm) are built on
//! first use by `tests/build-tools.sh` into `<target>/e2e-tools/`.
//!
//! For the cluster scenarios: the real [`Operator`] and [`Sidecar`] binaries as child
//! processes (built with cargo on first use, see [`bins`]), a real [`Partner`] HTTP server on
//! loopback, a blocking [`net`] client, the Kubernetes [`objects`] they need, and
//! [`eventually`] to wait for a condition with a deadline.

pub mod bins;
mod controlplane;
pub mod net;
pub mod objects;
pub mod operator;
pub mod partner;
pub mod process;
pub mod sidecar;
pub mod tools;
pub mod wait;

pub use controlplane::ControlPlane;
pub use operator::{Operator, OperatorConfig};
pub use partner::Partner;
pub use sidecar::{Sidecar, SidecarConfig};
pub use tools::{controlplane_bin, helm_bin};
pub use wait::{eventually, eventually_every};
