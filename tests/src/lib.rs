//! End-to-end test support: the control plane harness and process helpers.
//!
//! Tests get a real kube-apiserver and etcd through [`ControlPlane::shared`],
//! one per test binary; all e2e tests live in the one binary `tests/e2e.rs` so
//! they share it. The Go binaries (the control plane and helm) are built on
//! first use by `tests/build-tools.sh` into `<target>/e2e-tools/`.

mod controlplane;
pub mod tools;

pub use controlplane::ControlPlane;
pub use tools::{controlplane_bin, helm_bin};
