//! End-to-end test support: the control plane harness and process helpers.
//!
//! Tests get a real kube-apiserver and etcd through [`ControlPlane::shared`],
//! one per test binary; all e2e tests live in the one binary `tests/e2e.rs` so
//! they share it. The Go binaries (the control plane and helm) are built on
//! first use by `tests/build-tools.sh` into `<target>/e2e-tools/`.
//!
//! For the cluster scenarios: the real [`Operator`] and [`Sidecar`] binaries as child
//! processes (built with cargo on first use, see [`bins`]) and the Kubernetes [`objects`] they
//! need. From the shared test kit (`tollgate-testkit`): a real [`Partner`] HTTP server on
//! loopback, a blocking [`net`] client, and [`eventually`] to wait for a condition with a
//! deadline.

pub mod bins;
mod controlplane;
pub mod node;
pub mod objects;
pub mod operator;
pub mod process;
pub mod sidecar;
pub mod tools;

pub use controlplane::ControlPlane;
pub use operator::{Operator, OperatorConfig};
pub use sidecar::{Sidecar, SidecarConfig};
pub use tollgate_testkit::{Partner, eventually, eventually_every};
pub use tools::{controlplane_bin, helm_bin};

/// The shared test kit's blocking HTTP client and metric reader.
pub mod net {
    pub use tollgate_testkit::blocking::{DEFAULT_TIMEOUT, get, request, request_within, runtime};
    pub use tollgate_testkit::{Resp, metric};
}
