//! The operator's CA where injected sidecars can mount it.
//!
//! A pod can only mount objects of its own namespace, so the leader keeps a ConfigMap (default
//! `tollgate-operator-ca`, key `ca.crt`) with the CA that signs the distribution endpoint in
//! every namespace that is not excluded, written by server-side apply. The injected projected
//! volume reads it; the kubelet refreshes the file when the ConfigMap changes, and the sidecar
//! re-reads it on every connect, so a rotated CA reaches running pods.
//!
//! Applied once per namespace and CA content. The copies are watched (by name, across
//! namespaces): one that is edited (its `ca.crt` no longer the CA) or deleted, e.g. by a
//! namespace editor, is applied again at once. Every `refresh` all are applied again anyway. A
//! failure is logged, counted and retried after a minute.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;
use tokio::time::Instant;

use super::inject::CA_KEY;
use crate::controller::FIELD_MANAGER;
use crate::leader::Leadership;
use crate::metrics::Metrics;

const RETRY_AFTER: Duration = Duration::from_secs(60);

/// What to publish where.
#[derive(Clone, Debug)]
pub struct CaPublisher {
    pub configmap: String,
    /// PEM file of the CA (re-read on every pass).
    pub ca_file: PathBuf,
    pub excluded: BTreeSet<String>,
    pub check_every: Duration,
    pub refresh: Duration,
}

/// The ConfigMap applied into `namespace`.
pub fn configmap(name: &str, namespace: &str, ca: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "tollgate-operator",
                "app.kubernetes.io/component": "sidecar-ca",
            },
        },
        "data": { CA_KEY: ca },
    })
}

/// Publishes until the task is dropped.
pub async fn run(
    client: kube::Client,
    p: CaPublisher,
    mut leadership: Leadership,
    metrics: std::sync::Arc<Metrics>,
) {
    let (store, writer) = reflector::store::<Namespace>();
    let mut events = reflector(
        writer,
        watcher(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .boxed();
    // Our copies, by name in every namespace: RBAC allows a list/watch by that name only.
    let mut copies = watcher(
        Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={}", p.configmap)),
    )
    .default_backoff()
    .boxed();
    let mut tick = tokio::time::interval(p.check_every);
    let mut leadership_final = false;
    // Namespace → None once applied, Some(when to retry) after a failure.
    let mut applied: HashMap<String, Option<Instant>> = HashMap::new();
    let mut ca: Option<String> = None;
    let mut ca_error_reported = false;
    let mut last_full = Instant::now();
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching namespaces");
                    metrics.webhook_error("watch");
                }
                None => return,
            },
            ev = copies.next() => match ev {
                Some(Ok(event)) => forget_tampered(&mut applied, event, ca.as_deref()),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching the sidecar CA ConfigMaps");
                    metrics.webhook_error("watch");
                }
                None => return,
            },
            changed = leadership.changed(), if !leadership_final => {
                leadership_final = changed.is_none();
            }
            _ = tick.tick() => {}
        }
        match read_ca(&p.ca_file) {
            Ok(pem) => {
                ca_error_reported = false;
                if ca.as_deref() != Some(pem.as_str()) {
                    ca = Some(pem);
                    applied.clear();
                }
            }
            Err(e) => {
                if !ca_error_reported {
                    ca_error_reported = true;
                    tracing::error!(error = %e, "cannot read the sidecars' CA; not publishing it");
                    metrics.webhook_error("sidecar-ca");
                }
            }
        }
        if !leadership.is_leader() {
            applied.clear();
            continue;
        }
        if last_full.elapsed() >= p.refresh {
            last_full = Instant::now();
            applied.clear();
        }
        let Some(pem) = &ca else { continue };
        let api = |ns: &str| Api::<ConfigMap>::namespaced(client.clone(), ns);
        for ns in store.state() {
            let Some(name) = ns.metadata.name.as_deref() else {
                continue;
            };
            let terminating = ns.metadata.deletion_timestamp.is_some()
                || ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
            if terminating || p.excluded.contains(name) {
                continue;
            }
            match applied.get(name) {
                Some(None) => continue,
                Some(Some(retry)) if Instant::now() < *retry => continue,
                _ => {}
            }
            let cm = configmap(&p.configmap, name, pem);
            match api(name)
                .patch(
                    &p.configmap,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&cm),
                )
                .await
            {
                Ok(_) => {
                    tracing::debug!(namespace = %name, configmap = %p.configmap, "sidecar CA published");
                    applied.insert(name.to_string(), None);
                }
                Err(e) => {
                    tracing::warn!(namespace = %name, configmap = %p.configmap, error = %e, "cannot publish the sidecar CA");
                    metrics.webhook_error("ca-configmap");
                    applied.insert(name.to_string(), Some(Instant::now() + RETRY_AFTER));
                }
            }
        }
    }
}

/// Forgets that a copy was applied when `event` shows it deleted or no longer holding `ca`,
/// so the next pass applies it again.
fn forget_tampered(
    applied: &mut HashMap<String, Option<Instant>>,
    event: watcher::Event<ConfigMap>,
    ca: Option<&str>,
) {
    let (cm, deleted) = match event {
        watcher::Event::Apply(cm) | watcher::Event::InitApply(cm) => (cm, false),
        watcher::Event::Delete(cm) => (cm, true),
        watcher::Event::Init | watcher::Event::InitDone => return,
    };
    let Some(ns) = cm.metadata.namespace.as_deref() else {
        return;
    };
    let holds = cm
        .data
        .as_ref()
        .and_then(|d| d.get(CA_KEY))
        .is_some_and(|v| Some(v.as_str()) == ca);
    if (deleted || !holds) && applied.get(ns) == Some(&None) {
        tracing::info!(namespace = %ns, configmap = ?cm.metadata.name, deleted, "sidecar CA ConfigMap changed by someone else; repairing");
        applied.remove(ns);
    }
}

fn read_ca(path: &std::path::Path) -> Result<String, String> {
    let pem = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(pem.as_bytes()))
        .filter(Result::is_ok)
        .count();
    if certs == 0 {
        return Err(format!("{}: no certificate in PEM", path.display()));
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(ns: &str, ca: &str) -> ConfigMap {
        serde_json::from_value(configmap("tollgate-operator-ca", ns, ca)).unwrap()
    }

    #[test]
    fn only_a_copy_edited_or_deleted_by_someone_else_is_applied_again() {
        let mut applied: HashMap<String, Option<Instant>> = ["a", "b", "c"]
            .into_iter()
            .map(|n| (n.to_string(), None))
            .collect();
        let ours = Some("CA");
        // Our own apply, seen through the watch: nothing to do.
        forget_tampered(&mut applied, watcher::Event::Apply(cm("a", "CA")), ours);
        forget_tampered(&mut applied, watcher::Event::Apply(cm("b", "FORGED")), ours);
        forget_tampered(&mut applied, watcher::Event::Delete(cm("c", "CA")), ours);
        let mut left: Vec<&String> = applied.keys().collect();
        left.sort();
        assert_eq!(left, ["a"]);
    }
}
