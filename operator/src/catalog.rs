//! The catalog: every integration this replica distributes, compiled and with its credential.
//!
//! The controller writes it (on every replica, leader or not); the distribution hub reads it
//! through a `tokio::sync::watch`, so a change reaches every connected stream at once. An
//! entry is only ever replaced by a newer valid one: an invalid spec leaves the last valid
//! entry in force, and a Secret that disappears leaves the last credential in force.
//!
//! A replica that just started holds nothing yet: the catalog is *synced* once every
//! PartnerIntegration of the initial list has been reconciled, and only then may sidecars be
//! served (an empty or partial catalog would make them drop kill switches and credentials).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::time::Instant;
use tollgate_crds::PartnerIntegrationSpec;
use tollgate_crds::distribution::SecretValue;
use tollgate_crds::policy::IntegrationPolicy;
use tollgate_crds::v1alpha1::{RateLimitScope, SecretKeyRef};

/// `(namespace, name)`.
pub type Key = (String, String);

/// A credential value and the Secret version it was read from.
#[derive(Clone, Debug, PartialEq)]
pub struct Credential {
    pub value: SecretValue,
    /// `metadata.resourceVersion` of the Secret; enters the config revision, the value does not.
    pub secret_version: String,
    /// The Secret's name: a kept credential is only ever reused for the same reference.
    pub secret_name: String,
    /// The upstream hosts the Secret allows it to be sent to (its
    /// `tollgate.dev/credential-hosts` annotation); `None`: any.
    pub allowed_hosts: Option<Vec<String>>,
    /// For a client certificate: `tls.crt` (public); `value` is then `tls.key`.
    pub certificate: Option<String>,
}

impl Credential {
    /// Whether the Secret allows sending this value to `host` (lower case).
    pub fn allows(&self, host: &str) -> bool {
        self.allowed_hosts
            .as_ref()
            .is_none_or(|list| list.iter().any(|h| h == host))
    }
}

/// One valid integration, ready to distribute.
#[derive(Clone, Debug)]
pub struct Entry {
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    /// What `status.configRevision` shows and sidecars report: `<generation>-<hash>`.
    pub config_revision: String,
    pub spec: PartnerIntegrationSpec,
    pub policy: Arc<IntegrationPolicy>,
    pub credential: Option<Credential>,
    /// The spec has credentials but this replica could not read them (it started while the
    /// Secret was unavailable): sidecars keep the value they already hold.
    pub credential_held: bool,
    /// The Secret of `spec.upstream.clientCertificate` (`certificate` holds `tls.crt`).
    pub client_certificate: Option<Credential>,
    /// As `credential_held`, for the client certificate.
    pub client_certificate_held: bool,
    /// The other Secret keys the credentials name (`secondaryRef`, OAuth2 client id and
    /// secret), those that could be read.
    pub more_credentials: Vec<(SecretKeyRef, Credential)>,
    /// As `credential_held`, for some of `more_credentials`.
    pub more_credentials_held: bool,
}

impl Entry {
    pub fn new(
        generation: i64,
        spec: PartnerIntegrationSpec,
        policy: IntegrationPolicy,
        credential: Option<Credential>,
    ) -> Self {
        let config_revision = config_revision(generation, &spec, credential.as_ref(), None);
        Self {
            namespace: policy.id.namespace.clone(),
            name: policy.id.name.clone(),
            generation,
            config_revision,
            spec,
            policy: Arc::new(policy),
            credential,
            credential_held: false,
            client_certificate: None,
            client_certificate_held: false,
            more_credentials: Vec::new(),
            more_credentials_held: false,
        }
    }

    /// As [`Entry::with_held_credential`], for the credentials' other keys.
    pub fn with_held_more_credentials(mut self) -> Self {
        self.more_credentials_held = true;
        if !self.config_revision.ends_with("-held") {
            self.config_revision = format!("{}-held", self.config_revision);
        }
        self
    }

    /// The values of the credentials' other Secret keys; their Secret versions enter the
    /// config revision. Call before the `with_held_*` methods.
    pub fn with_more_credentials(mut self, more: Vec<(SecretKeyRef, Credential)>) -> Self {
        if !more.is_empty() {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(self.config_revision.as_bytes());
            for (r, c) in &more {
                ctx.update(format!("\0{}/{}:", r.name, r.key).as_bytes());
                ctx.update(c.secret_version.as_bytes());
            }
            self.config_revision =
                format!("{}-{}", self.generation, &hex(ctx.finish().as_ref())[..10]);
        }
        self.more_credentials = more;
        self
    }

    /// The client certificate to present to the partner; its Secret version enters the config
    /// revision. Call before the `with_held_*` methods.
    pub fn with_client_certificate(mut self, certificate: Option<Credential>) -> Self {
        self.config_revision = config_revision(
            self.generation,
            &self.spec,
            self.credential.as_ref(),
            certificate.as_ref(),
        );
        self.client_certificate = certificate;
        self
    }

    /// As [`Entry::with_held_credential`], for the client certificate.
    pub fn with_held_client_certificate(mut self) -> Self {
        self.client_certificate_held = true;
        if !self.config_revision.ends_with("-held") {
            self.config_revision = format!("{}-held", self.config_revision);
        }
        self
    }

    /// An entry whose credential this replica cannot read now and never read before:
    /// sidecars keep the one they hold.
    pub fn with_held_credential(mut self) -> Self {
        self.credential_held = true;
        if !self.config_revision.ends_with("-held") {
            self.config_revision = format!("{}-held", self.config_revision);
        }
        self
    }

    pub fn key(&self) -> Key {
        (self.namespace.clone(), self.name.clone())
    }

    /// Whether any band (integration or route) is `scope: global`, i.e. divided among sidecars.
    pub fn has_global_quota(&self) -> bool {
        let global = |r: &Option<tollgate_crds::policy::RateLimitPolicy>| {
            r.as_ref()
                .is_some_and(|r| r.scope == RateLimitScope::Global)
        };
        global(&self.policy.rate_limit) || self.policy.routes.iter().any(|r| global(&r.rate_limit))
    }

    /// The tightest sustained rate (requests per second) of the global bands, integration
    /// and routes: the yardstick of demand when they are divided.
    pub fn global_band_rate(&self) -> Option<f64> {
        let global = |r: &Option<tollgate_crds::policy::RateLimitPolicy>| {
            r.as_ref()
                .filter(|r| r.scope == RateLimitScope::Global)
                .map(|r| r.bands.clone())
                .unwrap_or_default()
        };
        let mut bands = global(&self.policy.rate_limit);
        for r in &self.policy.routes {
            bands.extend(global(&r.rate_limit));
        }
        crate::distribution::shares::band_rate(&bands)
    }

    /// Whether the integration's kill switch (not a route's) is on.
    pub fn kill_switch(&self) -> bool {
        self.policy.default_route.kill_switch.enabled
    }
}

/// `<generation>-<10 hex of sha256(spec, secret version)>`: equal exactly when a sidecar would
/// enforce the same thing.
pub fn config_revision(
    generation: i64,
    spec: &PartnerIntegrationSpec,
    credential: Option<&Credential>,
    client_certificate: Option<&Credential>,
) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    // Struct fields serialize in declaration order and maps are BTreeMaps: deterministic.
    ctx.update(&serde_json::to_vec(spec).unwrap_or_default());
    ctx.update(b"\0");
    if let Some(c) = credential {
        ctx.update(c.secret_version.as_bytes());
    }
    if let Some(c) = client_certificate {
        ctx.update(b"\0tls:");
        ctx.update(c.secret_version.as_bytes());
    }
    format!("{generation}-{}", &hex(ctx.finish().as_ref())[..10])
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An immutable view of every distributed integration.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub entries: BTreeMap<Key, Arc<Entry>>,
}

/// What the watch channel carries: the catalog and when it last changed (the start of the
/// push-latency measurement).
#[derive(Clone, Debug)]
pub struct Published {
    pub catalog: Arc<Catalog>,
    pub changed_at: Instant,
}

/// The writer side, shared by the controller's reconciles.
#[derive(Clone)]
pub struct CatalogHandle {
    tx: Arc<watch::Sender<Published>>,
    sync: Arc<SyncGate>,
}

/// Tracks the initial sync: which objects have been reconciled since the replica started.
struct SyncGate {
    synced: watch::Sender<bool>,
    /// Reconciled keys; emptied (and no longer filled) once synced.
    seen: Mutex<BTreeSet<Key>>,
}

impl Default for CatalogHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl CatalogHandle {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Published {
            catalog: Arc::default(),
            changed_at: Instant::now(),
        });
        Self {
            tx: Arc::new(tx),
            sync: Arc::new(SyncGate {
                synced: watch::channel(false).0,
                seen: Mutex::default(),
            }),
        }
    }

    /// Records that `key` has been reconciled (whatever the outcome).
    pub fn seen(&self, key: &Key) {
        if !self.is_synced() {
            self.seen_keys().insert(key.clone());
        }
    }

    fn seen_keys(&self) -> std::sync::MutexGuard<'_, BTreeSet<Key>> {
        self.sync.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the catalog synced when every key of `live` (the objects of the initial list,
    /// still present) has been reconciled. Returns whether it is synced.
    pub fn sync_if_seen<'a>(&self, live: impl IntoIterator<Item = &'a Key>) -> bool {
        if self.is_synced() {
            return true;
        }
        let mut seen = self.seen_keys();
        if live.into_iter().all(|k| seen.contains(k)) {
            seen.clear();
            self.sync.synced.send_replace(true);
            return true;
        }
        false
    }

    pub fn is_synced(&self) -> bool {
        *self.sync.synced.borrow()
    }

    /// Resolves once the initial sync is done.
    pub async fn wait_synced(&self) {
        let mut rx = self.sync.synced.subscribe();
        // The sender lives as long as `self`: `wait_for` cannot fail while we hold it.
        let _ = rx.wait_for(|s| *s).await;
    }

    pub fn subscribe(&self) -> watch::Receiver<Published> {
        self.tx.subscribe()
    }

    pub fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        self.tx.borrow().catalog.entries.get(key).cloned()
    }

    pub fn snapshot(&self) -> Arc<Catalog> {
        self.tx.borrow().catalog.clone()
    }

    /// Puts `entry` in force. Returns whether anything a sidecar sees changed.
    pub fn upsert(&self, entry: Entry) -> bool {
        let key = entry.key();
        self.tx.send_if_modified(|p| {
            let same = p.catalog.entries.get(&key).is_some_and(|old| {
                old.config_revision == entry.config_revision
                    && old.credential == entry.credential
                    && old.credential_held == entry.credential_held
                    && old.client_certificate == entry.client_certificate
                    && old.client_certificate_held == entry.client_certificate_held
            });
            if same {
                return false;
            }
            let mut next = (*p.catalog).clone();
            next.entries.insert(key, Arc::new(entry));
            p.catalog = Arc::new(next);
            p.changed_at = Instant::now();
            true
        })
    }

    /// Stops distributing `key`. Returns whether it was distributed.
    pub fn remove(&self, key: &Key) -> bool {
        self.tx.send_if_modified(|p| {
            if !p.catalog.entries.contains_key(key) {
                return false;
            }
            let mut next = (*p.catalog).clone();
            next.entries.remove(key);
            p.catalog = Arc::new(next);
            p.changed_at = Instant::now();
            true
        })
    }

    /// Drops every entry `keep` refuses (objects that vanished without a cleanup, e.g. a
    /// finalizer removed by hand).
    pub fn retain(&self, keep: impl Fn(&Key) -> bool) -> usize {
        let mut dropped = 0;
        self.tx.send_if_modified(|p| {
            let mut next = (*p.catalog).clone();
            next.entries.retain(|k, _| keep(k));
            dropped = p.catalog.entries.len() - next.entries.len();
            if dropped == 0 {
                return false;
            }
            p.catalog = Arc::new(next);
            p.changed_at = Instant::now();
            true
        });
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str) -> PartnerIntegrationSpec {
        let mut s = PartnerIntegrationSpec::default();
        s.upstream.url = url.into();
        s
    }

    fn entry(url: &str, cred: Option<&str>) -> Entry {
        let s = spec(url);
        let p = tollgate_crds::compile("ns", "a", &s).unwrap();
        Entry::new(
            1,
            s,
            p,
            cred.map(|v| Credential {
                value: SecretValue::new(v),
                secret_version: "7".into(),
                secret_name: "s".into(),
                allowed_hosts: None,
                certificate: None,
            }),
        )
    }

    #[test]
    fn revision_follows_spec_and_secret_version_not_value() {
        let a = entry("https://a.example", Some("x"));
        let b = entry("https://a.example", Some("y"));
        let c = entry("https://b.example", Some("x"));
        assert_eq!(a.config_revision, b.config_revision);
        assert_ne!(a.config_revision, c.config_revision);
        assert!(a.config_revision.starts_with("1-"));
    }

    #[test]
    fn upsert_publishes_only_changes() {
        let h = CatalogHandle::new();
        let mut rx = h.subscribe();
        assert!(h.upsert(entry("https://a.example", Some("x"))));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert!(!h.upsert(entry("https://a.example", Some("x"))));
        assert!(!rx.has_changed().unwrap());
        // Same secret version but a new value (rotation seen by a re-read): still a change.
        assert!(h.upsert(entry("https://a.example", Some("y"))));
        assert!(h.remove(&("ns".into(), "a".into())));
        assert!(!h.remove(&("ns".into(), "a".into())));
    }

    #[tokio::test]
    async fn synced_only_once_every_listed_object_was_reconciled() {
        let h = CatalogHandle::new();
        let a: Key = ("ns".into(), "a".into());
        let b: Key = ("ns".into(), "b".into());
        assert!(!h.is_synced());
        h.seen(&a);
        assert!(!h.sync_if_seen([&a, &b]));
        // Reconciled before the check, or gone from the list meanwhile: both count.
        h.seen(&b);
        assert!(h.sync_if_seen([&a, &b]));
        h.wait_synced().await;
        assert!(h.is_synced());
        // Nothing to reconcile: synced at once.
        let empty = CatalogHandle::new();
        assert!(empty.sync_if_seen(std::iter::empty::<&Key>()));
    }

    #[test]
    fn a_held_credential_is_a_revision_of_its_own() {
        let plain = entry("https://a.example", None);
        let held = entry("https://a.example", None).with_held_credential();
        assert_ne!(plain.config_revision, held.config_revision);
        let h = CatalogHandle::new();
        assert!(h.upsert(held));
        assert!(h.upsert(plain), "held -> read is a change sidecars see");
    }
}
