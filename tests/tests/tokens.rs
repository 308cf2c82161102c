//! ServiceAccount tokens for the `tollgate` audience, as the sidecar receives
//! them, authenticate through the TokenReview API of the real control plane.

use serde_json::{Value, json};
use tollgate_e2e::ControlPlane;

/// Creates a ServiceAccount in a fresh namespace with `kubectl apply`.
fn service_account(cp: &ControlPlane, prefix: &str, name: &str) -> anyhow::Result<String> {
    let ns = cp.create_namespace(prefix)?;
    let manifest = json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": { "name": name, "namespace": ns },
    });
    cp.kubectl_with_stdin(["apply", "-f", "-"], &manifest.to_string())?;
    Ok(ns)
}

/// Requests a token for `ns/sa` with `audience` (TokenRequest API).
fn token(cp: &ControlPlane, ns: &str, sa: &str, audience: &str) -> anyhow::Result<String> {
    let out = cp.kubectl(["-n", ns, "create", "token", sa, "--audience", audience])?;
    Ok(out.trim().to_owned())
}

/// Reviews `token` for the `tollgate` audience and returns the review's status.
fn review(cp: &ControlPlane, token: &str) -> anyhow::Result<Value> {
    let request = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": { "token": token, "audiences": ["tollgate"] },
    });
    let out = cp.kubectl_with_stdin(["create", "-f", "-", "-o", "json"], &request.to_string())?;
    let response: Value = serde_json::from_str(&out)?;
    Ok(response["status"].clone())
}

#[test]
fn token_for_tollgate_audience_is_authenticated() -> anyhow::Result<()> {
    let cp = ControlPlane::shared();
    let ns = service_account(cp, "tokens", "caller")?;

    let status = review(cp, &token(cp, &ns, "caller", "tollgate")?)?;

    assert_eq!(status["authenticated"], true, "status: {status}");
    assert_eq!(
        status["user"]["username"],
        format!("system:serviceaccount:{ns}:caller"),
        "status: {status}"
    );
    assert_eq!(status["audiences"], json!(["tollgate"]), "status: {status}");
    Ok(())
}

#[test]
fn token_for_another_audience_is_rejected() -> anyhow::Result<()> {
    let cp = ControlPlane::shared();
    let ns = service_account(cp, "tokens", "caller")?;

    let status = review(cp, &token(cp, &ns, "caller", "someone-else")?)?;

    assert_ne!(status["authenticated"], true, "status: {status}");
    Ok(())
}
