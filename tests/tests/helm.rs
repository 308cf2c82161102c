//! The helm built from its Go module runs and reaches the control plane.

use tollgate_e2e::ControlPlane;

#[test]
fn helm_lists_releases_on_the_control_plane() -> anyhow::Result<()> {
    let cp = ControlPlane::shared();

    let version = cp.helm(["version", "--short"])?;
    assert!(version.starts_with("v3."), "helm version: {version}");

    // Other tests install releases into the shared control plane: any list will do.
    let releases = cp.helm(["list", "--all-namespaces", "--output", "json"])?;
    let releases: serde_json::Value = serde_json::from_str(&releases)?;
    assert!(releases.is_array(), "helm list: {releases}");
    Ok(())
}
