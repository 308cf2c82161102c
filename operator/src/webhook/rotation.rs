//! The webhook's own certificate in the cluster.
//!
//! Every replica watches the Secret (in the operator's namespace) and serves the pair it holds,
//! swapping it in when it changes. Only the leader writes: it creates the Secret when missing,
//! renews what [`certs::plan`] says is due (checked on every change and every `check_every`),
//! and keeps `caBundle` of every webhook in the MutatingWebhookConfiguration equal to the
//! Secret's `ca.crt` (a JSON patch that first tests each webhook's name, so a reordered list is
//! never written blindly). A failed write is logged, counted and retried on the next check.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};

use super::certs::{self, Bundle, CertPolicy, Plan};
use super::server::CertSlot;
use crate::leader::Leadership;
use crate::metrics::Metrics;

/// Where the certificate lives and what it must be.
#[derive(Clone, Debug)]
pub struct ManagedCerts {
    /// The operator's namespace.
    pub namespace: String,
    pub secret: String,
    /// The MutatingWebhookConfiguration whose `caBundle`s the leader keeps (None: left alone).
    pub configuration: Option<String>,
    pub policy: CertPolicy,
    pub check_every: Duration,
}

impl Bundle {
    /// What a Secret holds; missing or non-UTF-8 keys read as empty (and then get replaced).
    pub fn from_secret(s: &Secret) -> Bundle {
        let get = |k: &str| {
            s.data
                .as_ref()
                .and_then(|d| d.get(k))
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
                .unwrap_or_default()
        };
        Bundle {
            ca_bundle: get(certs::CA_BUNDLE_KEY),
            ca_key: get(certs::CA_KEY_KEY),
            cert: get(certs::CERT_KEY),
            key: get(certs::KEY_KEY),
        }
    }

    fn data(&self) -> std::collections::BTreeMap<String, ByteString> {
        [
            (certs::CA_BUNDLE_KEY, &self.ca_bundle),
            (certs::CA_KEY_KEY, &self.ca_key),
            (certs::CERT_KEY, &self.cert),
            (certs::KEY_KEY, &self.key),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect()
    }
}

/// The JSON patch that sets every webhook's `caBundle` to `bundle`, or None when all match.
pub fn ca_bundle_patch(cfg: &MutatingWebhookConfiguration, bundle: &[u8]) -> Option<Value> {
    let mut ops = Vec::new();
    for (i, hook) in cfg.webhooks.iter().flatten().enumerate() {
        if hook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.as_slice())
            == Some(bundle)
        {
            continue;
        }
        ops.push(json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": hook.name}));
        ops.push(json!({
            "op": "add",
            "path": format!("/webhooks/{i}/clientConfig/caBundle"),
            "value": ByteString(bundle.to_vec()),
        }));
    }
    (!ops.is_empty()).then_some(Value::Array(ops))
}

type Events<K> = BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// Serves and (as leader) maintains the certificate until the task is dropped.
pub async fn run(
    client: kube::Client,
    m: ManagedCerts,
    mut leadership: Leadership,
    slot: Arc<CertSlot>,
    metrics: Arc<Metrics>,
) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &m.namespace);
    let (secret_store, writer) = reflector::store::<Secret>();
    let by_name = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut secret_events: Events<Secret> =
        reflector(writer, watcher(secrets.clone(), by_name(&m.secret)))
            .default_backoff()
            .boxed();
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client);
    let (config_store, writer) = reflector::store::<MutatingWebhookConfiguration>();
    let mut config_events: Events<MutatingWebhookConfiguration> = match &m.configuration {
        Some(name) => reflector(writer, watcher(configs.clone(), by_name(name)))
            .default_backoff()
            .boxed(),
        None => futures::stream::pending().boxed(),
    };
    let mut state = State::default();
    let mut tick = tokio::time::interval(m.check_every);
    let mut leadership_final = false;
    loop {
        tokio::select! {
            ev = secret_events.next() => match ev {
                Some(Ok(watcher::Event::InitDone)) => state.secret_synced = true,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, secret = %m.secret, "watching the webhook Secret");
                    metrics.webhook_error("watch");
                }
                None => return,
            },
            ev = config_events.next() => match ev {
                Some(Ok(watcher::Event::InitDone)) => state.config_synced = true,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching the webhook configuration");
                    metrics.webhook_error("watch");
                }
                None => return,
            },
            changed = leadership.changed(), if !leadership_final => {
                leadership_final = changed.is_none();
            }
            _ = tick.tick() => {}
        }
        state
            .step(
                &m,
                &secrets,
                &secret_store,
                &configs,
                &config_store,
                &leadership,
                &slot,
                &metrics,
            )
            .await;
    }
}

#[derive(Default)]
struct State {
    secret_synced: bool,
    config_synced: bool,
    /// The certificate PEM last handed to the slot (or found unusable).
    served: Option<String>,
    config_missing_reported: bool,
}

impl State {
    #[allow(clippy::too_many_arguments)]
    async fn step(
        &mut self,
        m: &ManagedCerts,
        secrets: &Api<Secret>,
        secret_store: &Store<Secret>,
        configs: &Api<MutatingWebhookConfiguration>,
        config_store: &Store<MutatingWebhookConfiguration>,
        leadership: &Leadership,
        slot: &CertSlot,
        metrics: &Metrics,
    ) {
        let current = secret_store.get(&ObjectRef::new(&m.secret).within(&m.namespace));
        let bundle = current.as_deref().map(Bundle::from_secret);

        // Every replica serves what the Secret holds.
        if let Some(b) = &bundle
            && !b.cert.is_empty()
            && self.served.as_deref() != Some(b.cert.as_str())
        {
            self.served = Some(b.cert.clone());
            match certs::certified_key(&b.cert, &b.key) {
                Ok(key) => {
                    slot.set(key);
                    let expiry = certs::not_after(&b.cert).unwrap_or_default();
                    metrics.webhook_cert_expiry.set(expiry);
                    tracing::info!(secret = %m.secret, not_after = expiry, "webhook certificate loaded");
                }
                Err(e) => {
                    tracing::warn!(secret = %m.secret, error = %e, "webhook certificate in the Secret unusable; keeping the one served");
                    metrics.webhook_error("certificate");
                }
            }
        }

        if !leadership.is_leader() || !self.secret_synced {
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        match certs::plan(bundle.as_ref(), &m.policy, now) {
            Ok(Plan::Keep) => {}
            Ok(Plan::Write {
                bundle: next,
                reasons,
            }) => match write_secret(secrets, m, current.as_deref(), &next).await {
                Ok(()) => {
                    tracing::info!(secret = %m.secret, ?reasons, "webhook certificate written")
                }
                Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => {
                    tracing::debug!(secret = %m.secret, "webhook Secret changed meanwhile; re-reading")
                }
                Err(e) => {
                    tracing::warn!(secret = %m.secret, error = %e, "cannot write the webhook Secret");
                    metrics.webhook_error("secret-write");
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot make the webhook certificate");
                metrics.webhook_error("certificate");
            }
        }

        // The caBundle follows the Secret as stored (a fresh write arrives through the watch).
        let (Some(name), Some(b)) = (&m.configuration, &bundle) else {
            return;
        };
        if !self.config_synced || b.ca_bundle.is_empty() {
            return;
        }
        let Some(cfg) = config_store.get(&ObjectRef::new(name)) else {
            if !self.config_missing_reported {
                self.config_missing_reported = true;
                tracing::warn!(configuration = %name, "MutatingWebhookConfiguration not found; its caBundle will be set once it exists");
                metrics.webhook_error("configuration-missing");
            }
            return;
        };
        self.config_missing_reported = false;
        let Some(patch) = ca_bundle_patch(&cfg, b.ca_bundle.as_bytes()) else {
            return;
        };
        let patch: json_patch::Patch = match serde_json::from_value(patch) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "building the caBundle patch");
                metrics.webhook_error("ca-bundle");
                return;
            }
        };
        match configs
            .patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
        {
            Ok(_) => tracing::info!(configuration = %name, "webhook caBundle updated"),
            Err(e) => {
                tracing::warn!(configuration = %name, error = %e, "cannot update the webhook caBundle");
                metrics.webhook_error("ca-bundle");
            }
        }
    }
}

async fn write_secret(
    api: &Api<Secret>,
    m: &ManagedCerts,
    existing: Option<&Secret>,
    b: &Bundle,
) -> Result<(), kube::Error> {
    match existing {
        // `replace` carries the resourceVersion read: a concurrent writer makes it fail.
        Some(s) => {
            let mut s = s.clone();
            s.data = Some(b.data());
            s.string_data = None;
            api.replace(&m.secret, &PostParams::default(), &s).await?;
        }
        None => {
            let s = Secret {
                metadata: ObjectMeta {
                    name: Some(m.secret.clone()),
                    namespace: Some(m.namespace.clone()),
                    labels: Some(
                        [
                            ("app.kubernetes.io/managed-by", "tollgate-operator"),
                            ("app.kubernetes.io/component", "webhook-certificate"),
                        ]
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/tls".to_string()),
                data: Some(b.data()),
                ..Default::default()
            };
            api.create(&PostParams::default(), &s).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(bundles: &[Option<&str>]) -> MutatingWebhookConfiguration {
        let hooks: Vec<Value> = bundles
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut cc = json!({"url": format!("https://127.0.0.1:9443/{i}")});
                if let Some(b) = b {
                    cc["caBundle"] =
                        serde_json::to_value(ByteString(b.as_bytes().to_vec())).unwrap();
                }
                json!({"name": format!("w{i}.tollgate.dev"), "clientConfig": cc,
                       "admissionReviewVersions": ["v1"], "sideEffects": "None"})
            })
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "injector"},
            "webhooks": hooks
        }))
        .unwrap()
    }

    #[test]
    fn the_ca_bundle_patch_touches_only_webhooks_that_differ_and_tests_their_names() {
        let cfg = config(&[Some("CA"), None, Some("OLD")]);
        let patch = ca_bundle_patch(&cfg, b"CA").unwrap();
        let b64 = serde_json::to_value(ByteString(b"CA".to_vec())).unwrap();
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/webhooks/1/name", "value": "w1.tollgate.dev"},
                {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": b64},
                {"op": "test", "path": "/webhooks/2/name", "value": "w2.tollgate.dev"},
                {"op": "add", "path": "/webhooks/2/clientConfig/caBundle", "value": b64},
            ])
        );
        // Applied, it makes every webhook trust the bundle, and then there is nothing to do.
        let mut doc = serde_json::to_value(&cfg).unwrap();
        let patch: json_patch::Patch = serde_json::from_value(patch).unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        let after: MutatingWebhookConfiguration = serde_json::from_value(doc).unwrap();
        assert!(ca_bundle_patch(&after, b"CA").is_none());
        assert!(ca_bundle_patch(&config(&[Some("CA")]), b"CA").is_none());
    }

    #[test]
    fn a_bundle_round_trips_through_a_secret() {
        let b = Bundle {
            ca_bundle: "ca".into(),
            ca_key: "cak".into(),
            cert: "crt".into(),
            key: "k".into(),
        };
        let s = Secret {
            data: Some(b.data()),
            ..Default::default()
        };
        assert_eq!(Bundle::from_secret(&s), b);
        assert_eq!(Bundle::from_secret(&Secret::default()).cert, "");
    }
}
