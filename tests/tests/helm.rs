//! The helm built from its Go module runs and reaches the control plane.

use tollgate_e2e::ControlPlane;

#[test]
fn helm_lists_releases_on_the_control_plane() -> anyhow::Result<()> {
    let cp = ControlPlane::shared();

    let version = cp.helm(["version", "--short"])?;
    assert!(version.starts_with("v3."), "helm version: {version}");

    let releases = cp.helm(["list", "--all-namespaces", "--output", "json"])?;
    assert_eq!(releases.trim(), "[]");
    Ok(())
}
