//! Tollgate's API: the `PartnerIntegration` resource, its generated CRD, and the compile step
//! from spec to runtime policy that the operator and the sidecar share.

pub mod distribution;
pub mod duration;
pub mod manifest;
pub mod policy;
pub mod v1alpha1;

pub use policy::{CompileError, FieldError, IntegrationPolicy, compile, compile_enforceable};
pub use v1alpha1::{PartnerIntegration, PartnerIntegrationSpec, PartnerIntegrationStatus};

use kube::CustomResourceExt;

/// The CRD as YAML, exactly as committed in `crds/partnerintegrations.tollgate.dev.yaml`.
pub fn crd_yaml() -> String {
    let crd = PartnerIntegration::crd();
    let body = serde_yaml::to_string(&crd).expect("a CRD always serializes");
    format!(
        "# Generated from crds/src/v1alpha1.rs by `cargo run -p tollgate-crds --bin crdgen`. Do not edit.\n{body}"
    )
}

/// Where the generated CRD lives, relative to the workspace root.
pub const CRD_PATH: &str = "crds/partnerintegrations.tollgate.dev.yaml";

/// The Helm chart's copy of the CRD, relative to the workspace root: byte for byte the same
/// file as [`CRD_PATH`], written by `crdgen` and never edited by hand.
pub const CHART_CRD_PATH: &str = "charts/tollgate/crds/partnerintegrations.tollgate.dev.yaml";
