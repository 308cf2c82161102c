//! The operator's CA where injected sidecars can mount it.
//!
//! A pod can only mount objects of its own namespace, so the leader keeps a ConfigMap (default
//! `tollgate-operator-ca`, key `ca.crt`) with the CA that signs the distribution endpoint in
//! every namespace that is not excluded, written by server-side apply. The injected projected
//! volume reads it; the kubelet refreshes the file when the ConfigMap changes, and the sidecar
//! re-reads it on every connect, so a rotated CA reaches running pods.
//!
//! Applied once per namespace and CA content; every `refresh` all are applied again (repairing
//! a deleted copy). A failure is logged, counted and retried after a minute.

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
