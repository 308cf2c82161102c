//! The catalog: every integration this replica distributes, compiled and with its credential.
//!
//! The controller writes it (on every replica, leader or not); the distribution hub reads it
//! through a `tokio::sync::watch`, so a change reaches every connected stream at once. An
//! entry is only ever replaced by a newer valid one: an invalid spec leaves the last valid
//! entry in force, and a Secret that disappears leaves the last credential in force.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;
use tollgate_crds::PartnerIntegrationSpec;
use tollgate_crds::distribution::SecretValue;
use tollgate_crds::policy::IntegrationPolicy;
use tollgate_crds::v1alpha1::RateLimitScope;

/// `(namespace, name)`.
pub type Key = (String, String);

/// A credential value and the Secret version it was read from.
#[derive(Clone, Debug, PartialEq)]
pub struct Credential {
    pub value: SecretValue,
    /// `metadata.resourceVersion` of the Secret; enters the config revision, the value does not.
    pub secret_version: String,
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
}

impl Entry {
    pub fn new(
        generation: i64,
        spec: PartnerIntegrationSpec,
        policy: IntegrationPolicy,
        credential: Option<Credential>,
    ) -> Self {
        let config_revision = config_revision(generation, &spec, credential.as_ref());
        Self {
            namespace: policy.id.namespace.clone(),
            name: policy.id.name.clone(),
            generation,
            config_revision,
            spec,
            policy: Arc::new(policy),
            credential,
        }
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
) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    // Struct fields serialize in declaration order and maps are BTreeMaps: deterministic.
    ctx.update(&serde_json::to_vec(spec).unwrap_or_default());
    ctx.update(b"\0");
    if let Some(c) = credential {
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
        Self { tx: Arc::new(tx) }
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
                old.config_revision == entry.config_revision && old.credential == entry.credential
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
}
