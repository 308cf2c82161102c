//! Kubernetes objects the cluster scenarios need, made with `kubectl` on the real API server:
//! ServiceAccounts, Pods (which stay Pending: no kubelet runs, but they exist with their
//! labels and uid), Secrets, ServiceAccount tokens from the TokenRequest API, and
//! PartnerIntegrations.

use anyhow::Context;
use serde_json::{Value, json};

use crate::ControlPlane;

/// The audience sidecar tokens are issued for.
pub const AUDIENCE: &str = "tollgate";

/// Creates (or updates) whatever `manifest` (JSON or YAML) describes.
pub fn apply(cp: &ControlPlane, manifest: &str) -> anyhow::Result<()> {
    cp.kubectl_with_stdin(["apply", "-f", "-"], manifest)?;
    Ok(())
}

pub fn service_account(cp: &ControlPlane, ns: &str, name: &str) -> anyhow::Result<()> {
    apply(
        cp,
        &json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": ns},
        })
        .to_string(),
    )
}

/// Creates a Pod running as `service_account` with `labels` and returns its uid.
pub fn pod(
    cp: &ControlPlane,
    ns: &str,
    name: &str,
    service_account: &str,
    labels: &[(&str, &str)],
) -> anyhow::Result<String> {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(*v)))
        .collect();
    let manifest = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "serviceAccountName": service_account,
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
        },
    });
    let uid = cp.kubectl_with_stdin(
        ["create", "-f", "-", "-o", "jsonpath={.metadata.uid}"],
        &manifest.to_string(),
    )?;
    Ok(uid.trim().to_string())
}

/// A token for `ns/service_account` from the TokenRequest API, for `audience`, bound to the
/// pod `(name, uid)` when given (what a projected token volume holds).
pub fn token(
    cp: &ControlPlane,
    ns: &str,
    service_account: &str,
    audience: &str,
    bound_pod: Option<(&str, &str)>,
) -> anyhow::Result<String> {
    let mut args: Vec<String> = [
        "-n",
        ns,
        "create",
        "token",
        service_account,
        "--audience",
        audience,
        "--duration",
        "1h",
    ]
    .map(String::from)
    .to_vec();
    if let Some((name, uid)) = bound_pod {
        args.extend(
            [
                "--bound-object-kind",
                "Pod",
                "--bound-object-name",
                name,
                "--bound-object-uid",
                uid,
            ]
            .map(String::from),
        );
    }
    let out = cp.kubectl(&args)?;
    Ok(out.trim().to_string())
}

/// A token as the pod's projected volume would hold it: audience `tollgate`, bound to the pod.
pub fn pod_token(
    cp: &ControlPlane,
    ns: &str,
    service_account: &str,
    pod: &str,
    uid: &str,
) -> anyhow::Result<String> {
    token(cp, ns, service_account, AUDIENCE, Some((pod, uid)))
}

/// Creates or replaces an Opaque Secret with one key, opted in as a Tollgate credential
/// (label `tollgate.dev/credential: "true"`).
pub fn secret(
    cp: &ControlPlane,
    ns: &str,
    name: &str,
    key: &str,
    value: &str,
) -> anyhow::Result<()> {
    apply(
        cp,
        &json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {"tollgate.dev/credential": "true"},
            },
            "type": "Opaque",
            "stringData": {key: value},
        })
        .to_string(),
    )
}

/// A PartnerIntegration manifest (JSON) with `spec`.
pub fn partner_integration(ns: &str, name: &str, spec: Value) -> String {
    json!({
        "apiVersion": "tollgate.dev/v1alpha1",
        "kind": "PartnerIntegration",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
    .to_string()
}

/// `kubectl patch pi NAME --type merge -p PATCH`.
pub fn patch_pi(cp: &ControlPlane, ns: &str, name: &str, patch: &Value) -> anyhow::Result<()> {
    cp.kubectl([
        "-n",
        ns,
        "patch",
        "pi",
        name,
        "--type",
        "merge",
        "-p",
        &patch.to_string(),
    ])
    .with_context(|| format!("patching pi {ns}/{name}"))?;
    Ok(())
}

/// The object as JSON (`kubectl get -o json`).
pub fn get_json(cp: &ControlPlane, ns: &str, resource: &str, name: &str) -> anyhow::Result<Value> {
    let out = cp.kubectl(["-n", ns, "get", resource, name, "-o", "json"])?;
    serde_json::from_str(&out).with_context(|| format!("{resource} {ns}/{name} as JSON"))
}
