//! Revisions of policy and where they come from.
//!
//! A [`Revision`] is immutable: every integration compiled, every credential rendered, every
//! piece of shared state (buckets, breakers, pools) attached. The [`Store`] swaps a whole
//! revision atomically, so a request sees one revision from start to end, and the hot path reads
//! it without locks.

pub mod file;
pub mod operator;
pub mod secrets;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::HeaderValue;
use tollgate_crds::policy::{IntegrationPolicy, path_has_prefix};
use tollgate_crds::v1alpha1::SecretKeyRef;

use crate::state::{IntegrationState, StateContext};

/// One integration as the data plane runs it.
pub struct Integration {
    pub policy: IntegrationPolicy,
    /// The `namespace/name` label used in answers, metrics and spans.
    pub label: Arc<str>,
    /// The rendered credential header value (marked sensitive), if the integration has one and
    /// its secret is known.
    pub credential: Option<HeaderValue>,
    pub state: IntegrationState,
}

impl std::fmt::Debug for Integration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Integration")
            .field("id", &self.label)
            .finish_non_exhaustive()
    }
}

impl Integration {
    /// Index of the route a request takes: a declared route, or `routes.len()` for the default.
    pub fn route_index(&self, method: &http::Method, path: &str) -> usize {
        self.policy
            .routes
            .iter()
            .position(|r| r.matches(method, path))
            .unwrap_or(self.policy.routes.len())
    }

    pub fn route(&self, index: usize) -> &tollgate_crds::policy::RoutePolicy {
        self.policy
            .routes
            .get(index)
            .unwrap_or(&self.policy.default_route)
    }

    /// Whether `path` falls under a denied prefix.
    pub fn denied_prefix(&self, path: &str) -> Option<&str> {
        self.policy
            .versioning
            .denied_path_prefixes
            .iter()
            .find(|p| path_has_prefix(path, p))
            .map(String::as_str)
    }
}

/// Where a revision came from, for `/config` and `tollgate_config_revision_info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Empty,
    File(String),
    Operator(String),
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Empty => "none",
            Source::File(_) => "file",
            Source::Operator(_) => "operator",
        }
    }
}

/// An immutable set of integrations in force.
pub struct Revision {
    pub id: String,
    pub source: Source,
    pub loaded_at: SystemTime,
    pub integrations: Vec<Arc<Integration>>,
    /// Lower-case host -> indexes into `integrations` (several when ports differ).
    by_host: HashMap<String, Vec<usize>>,
}

impl Revision {
    pub fn empty() -> Self {
        Revision {
            id: "none".to_string(),
            source: Source::Empty,
            loaded_at: SystemTime::now(),
            integrations: Vec::new(),
            by_host: HashMap::new(),
        }
    }

    /// The integration that owns `host` (and `port`, when hosts name one).
    pub fn find(&self, host: &str, port: Option<u16>) -> Option<&Arc<Integration>> {
        let candidates = match self.by_host.get(host) {
            Some(c) => c,
            None => self.by_host.get(&host.to_ascii_lowercase())?,
        };
        candidates
            .iter()
            .map(|&i| &self.integrations[i])
            .find(|i| i.policy.matches_host(host, port))
    }
}

/// A secret's value by reference, from files or from the operator.
pub trait SecretSource {
    fn get(&self, namespace: &str, secret: &SecretKeyRef) -> Option<String>;
}

/// Why a set of policies cannot form a revision.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RevisionError(pub String);

/// Builds a revision, carrying over shared state whose configuration is unchanged from
/// `previous` (a kill-switch flip must not refill every bucket).
pub fn build_revision(
    id: String,
    source: Source,
    policies: Vec<IntegrationPolicy>,
    secrets: &dyn SecretSource,
    previous: &Revision,
    ctx: &StateContext,
) -> Result<Revision, RevisionError> {
    let mut by_host: HashMap<String, Vec<usize>> = HashMap::new();
    let mut integrations = Vec::with_capacity(policies.len());
    for (i, policy) in policies.into_iter().enumerate() {
        for h in &policy.hosts {
            let entry = by_host.entry(h.host.clone()).or_default();
            for &j in entry.iter() {
                let other: &Arc<Integration> = &integrations[j];
                let clash = other.policy.hosts.iter().any(|o| {
                    o.host == h.host && (o.port.is_none() || h.port.is_none() || o.port == h.port)
                });
                if clash {
                    return Err(RevisionError(format!(
                        "{}: spec.upstream.hosts: {} is already claimed by {}",
                        policy.id,
                        match h.port {
                            Some(p) => format!("{}:{p}", h.host),
                            None => h.host.clone(),
                        },
                        other.policy.id
                    )));
                }
            }
            entry.push(i);
        }
        let credential = policy.credentials.as_ref().and_then(|c| {
            let value = secrets.get(&policy.id.namespace, &c.secret_ref)?;
            match c.render(value.trim_end_matches(['\n', '\r'])) {
                Some(v) => Some(v),
                None => {
                    tracing::error!(integration = %policy.id, secret = %c.secret_ref.name, "credential is not a valid header value; not injected");
                    None
                }
            }
        });
        if let Some(c) = &policy.credentials
            && credential.is_none()
        {
            tracing::warn!(integration = %policy.id, secret = %c.secret_ref.name, key = %c.secret_ref.key, "credential secret not found; requests go without it");
        }
        let old = previous
            .integrations
            .iter()
            .find(|o| o.policy.id == policy.id);
        let state = IntegrationState::build(&policy, old.map(|o| &o.state), ctx);
        integrations.push(Arc::new(Integration {
            label: Arc::from(policy.id.to_string()),
            policy,
            credential,
            state,
        }));
    }
    Ok(Revision {
        id,
        source,
        loaded_at: SystemTime::now(),
        integrations,
        by_host,
    })
}

/// The revision in force, swapped whole.
pub struct Store {
    current: ArcSwap<Revision>,
    changed: tokio::sync::watch::Sender<String>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            current: ArcSwap::from_pointee(Revision::empty()),
            changed: tokio::sync::watch::Sender::new("none".to_string()),
        }
    }
}

impl Store {
    pub fn load(&self) -> arc_swap::Guard<Arc<Revision>> {
        self.current.load()
    }

    pub fn load_full(&self) -> Arc<Revision> {
        self.current.load_full()
    }

    pub fn publish(&self, revision: Revision) {
        let id = revision.id.clone();
        self.current.store(Arc::new(revision));
        self.changed.send_replace(id);
    }

    /// Notified with each new revision id.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<String> {
        self.changed.subscribe()
    }
}

/// A short, stable fingerprint of some bytes (FNV-1a, 64 bit): a revision id, not a security
/// measure.
pub fn fingerprint(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}
