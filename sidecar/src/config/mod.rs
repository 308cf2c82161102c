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
use tollgate_crds::policy::{HostMatch, IntegrationId, IntegrationPolicy, path_has_prefix};
use tollgate_crds::v1alpha1::SecretKeyRef;

use crate::client::ClientIdentity;
use crate::state::{IntegrationState, QuotaShares, StateContext};

/// One integration as the data plane runs it.
pub struct Integration {
    pub policy: IntegrationPolicy,
    /// The `namespace/name` label used in answers, metrics and spans.
    pub label: Arc<str>,
    /// The rendered credential header value (marked sensitive), if the integration has one and
    /// its secret is known.
    pub credential: Option<HeaderValue>,
    /// The rendered `credentials.secondaryRef` value, if set and known: sent once when the
    /// partner answers 401 to the primary.
    pub secondary_credential: Option<HeaderValue>,
    /// With `credentials.oauth2` and both client credentials known: the token manager, kept
    /// across revisions while the grant and the credentials are unchanged.
    pub token: Option<Arc<crate::oauth::TokenManager>>,
    pub state: IntegrationState,
}

impl std::fmt::Debug for Integration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Integration")
            .field("id", &self.label)
            .finish_non_exhaustive()
    }
}

/// An integration's routes as the data plane numbers them: the declared routes in order, then
/// the default route (index `routes.len()`). Route state ([`IntegrationState::route`]) and
/// [`Integration::route_index`] use this numbering.
pub fn routes_in_order(
    policy: &IntegrationPolicy,
) -> impl Iterator<Item = &tollgate_crds::policy::RoutePolicy> {
    policy.routes.iter().chain([&policy.default_route])
}

impl Integration {
    /// Index of the route a request takes (see [`routes_in_order`]).
    /// `path` is in normal form ([`tollgate_crds::policy::normalize_path`]).
    pub fn route_index(&self, method: &http::Method, path: &str) -> usize {
        self.policy
            .routes
            .iter()
            .position(|r| r.matches(method, path))
            .unwrap_or(self.policy.routes.len())
    }

    /// The policy of route `index` (see [`routes_in_order`]).
    pub fn route(&self, index: usize) -> &tollgate_crds::policy::RoutePolicy {
        self.policy
            .routes
            .get(index)
            .unwrap_or(&self.policy.default_route)
    }

    /// Every route's policy, in [`routes_in_order`].
    pub fn routes(&self) -> impl Iterator<Item = &tollgate_crds::policy::RoutePolicy> {
        routes_in_order(&self.policy)
    }

    /// Whether `path` (in normal form) falls under a denied prefix.
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
    /// Integrations this revision left out or kept at their previous version, and why.
    pub refused: Vec<Refused>,
    /// Lower-case host -> indexes into `integrations` (several when ports differ).
    by_host: HashMap<String, Vec<usize>>,
}

/// An integration a revision refused: its spec does not compile, or it claims a host another
/// integration holds. When a previous version of it was in force, that version stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub integration: IntegrationId,
    pub error: String,
    /// Whether the previous version stays in force.
    pub kept_previous: bool,
}

/// One integration offered to a revision: compiled, or refused by the compile step.
#[derive(Debug)]
pub enum Candidate {
    Compiled(Box<IntegrationPolicy>),
    Invalid { id: IntegrationId, error: String },
}

impl Candidate {
    fn id(&self) -> &IntegrationId {
        match self {
            Candidate::Compiled(p) => &p.id,
            Candidate::Invalid { id, .. } => id,
        }
    }
}

impl Revision {
    pub fn empty() -> Self {
        Revision {
            id: "none".to_string(),
            source: Source::Empty,
            loaded_at: SystemTime::now(),
            integrations: Vec::new(),
            refused: Vec::new(),
            by_host: HashMap::new(),
        }
    }

    /// The integration that owns `host` (and `port`, when hosts name one). `host` matches in
    /// any case and with or without a trailing dot.
    pub fn find(&self, host: &str, port: Option<u16>) -> Option<&Arc<Integration>> {
        let candidates = match self.by_host.get(host) {
            Some(c) => c,
            None => self
                .by_host
                .get(&tollgate_crds::policy::normalize_host(host)?)?,
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

    /// A `kubernetes.io/tls` Secret's `tls.crt` and `tls.key`.
    fn tls(&self, namespace: &str, secret_name: &str) -> Option<(String, String)> {
        let key = |key: &str| SecretKeyRef {
            name: secret_name.to_string(),
            key: key.to_string(),
        };
        Some((
            self.get(namespace, &key("tls.crt"))?,
            self.get(namespace, &key("tls.key"))?,
        ))
    }
}

/// The secrets an integration's spec reads: its credential, and its client certificate's
/// `tls.crt` and `tls.key`.
pub fn secret_refs(spec: &tollgate_crds::PartnerIntegrationSpec) -> Vec<SecretKeyRef> {
    let mut refs: Vec<SecretKeyRef> = Vec::new();
    if let Some(c) = &spec.credentials {
        refs.extend(c.secret_refs().into_iter().cloned());
    }
    if let Some(c) = &spec.upstream.client_certificate {
        for key in ["tls.crt", "tls.key"] {
            refs.push(SecretKeyRef {
                name: c.secret_name.clone(),
                key: key.to_string(),
            });
        }
    }
    refs
}

/// Builds a revision, carrying over shared state whose configuration is unchanged from
/// `previous` (a kill-switch flip must not refill every bucket).
///
/// Each integration stands alone: one that does not compile, or that claims a host another
/// integration already holds, is refused (listed in [`Revision::refused`]) and the others
/// apply. A refused integration keeps its previous version when one was in force. When two
/// claim a host, the one already in force keeps it; between two new ones, the earlier in
/// `candidates` (file order, or namespace/name order in a snapshot).
pub fn build_revision(
    id: String,
    source: Source,
    candidates: Vec<Candidate>,
    secrets: &dyn SecretSource,
    previous: &Revision,
    ctx: &StateContext,
    shares: &QuotaShares,
) -> Revision {
    let in_force = |id: &IntegrationId| previous.integrations.iter().find(|o| &o.policy.id == id);
    // Integrations in force first: they keep the hosts they hold.
    let mut order: Vec<Candidate> = Vec::with_capacity(candidates.len());
    let (old, new): (Vec<_>, Vec<_>) = candidates
        .into_iter()
        .partition(|c| in_force(c.id()).is_some());
    order.extend(old);
    order.extend(new);

    let mut claimed: Vec<(HostMatch, IntegrationId)> = Vec::new();
    // Hosts held in force by integrations not yet visited stay theirs.
    let mut reserved: Vec<(HostMatch, IntegrationId)> = order
        .iter()
        .filter_map(|c| in_force(c.id()))
        .flat_map(|o| {
            o.policy
                .hosts
                .iter()
                .map(|h| (h.clone(), o.policy.id.clone()))
        })
        .collect();
    let clash = |claimed: &[(HostMatch, IntegrationId)],
                 reserved: &[(HostMatch, IntegrationId)],
                 p: &IntegrationPolicy| {
        p.hosts.iter().find_map(|h| {
            claimed
                .iter()
                .chain(reserved)
                .find(|(c, owner)| owner != &p.id && c.overlaps(h))
                .map(|(_, owner)| format!("spec.upstream.hosts: {h} is already claimed by {owner}"))
        })
    };
    type Kept = (
        (Option<HeaderValue>, Option<HeaderValue>),
        Option<Arc<ClientIdentity>>,
        Option<Arc<crate::oauth::TokenManager>>,
    );
    let mut chosen: Vec<(IntegrationPolicy, Option<Kept>)> = Vec::new();
    let mut refused = Vec::new();
    let mut seen_ids: Vec<IntegrationId> = Vec::new();
    for c in order {
        let cid = c.id().clone();
        if seen_ids.contains(&cid) {
            refused.push(Refused {
                integration: cid,
                error: "appears twice; the first one applies".to_string(),
                kept_previous: false,
            });
            continue;
        }
        seen_ids.push(cid.clone());
        reserved.retain(|(_, owner)| owner != &cid);
        let error = match c {
            Candidate::Compiled(p) => match clash(&claimed, &reserved, &p) {
                None => {
                    claimed.extend(p.hosts.iter().map(|h| (h.clone(), p.id.clone())));
                    chosen.push((*p, None));
                    continue;
                }
                Some(e) => e,
            },
            Candidate::Invalid { error, .. } => error,
        };
        let old = in_force(&cid).filter(|o| clash(&claimed, &reserved, &o.policy).is_none());
        if let Some(o) = old {
            claimed.extend(o.policy.hosts.iter().map(|h| (h.clone(), cid.clone())));
            let identity = o.state.client_identity().cloned();
            let credentials = (o.credential.clone(), o.secondary_credential.clone());
            chosen.push((
                o.policy.clone(),
                Some((credentials, identity, o.token.clone())),
            ));
        }
        tracing::warn!(integration = %cid, %error, kept_previous = old.is_some(), "integration refused; the others apply");
        refused.push(Refused {
            integration: cid,
            error,
            kept_previous: old.is_some(),
        });
    }

    let mut by_host: HashMap<String, Vec<usize>> = HashMap::new();
    let mut integrations = Vec::with_capacity(chosen.len());
    for (i, (policy, kept)) in chosen.into_iter().enumerate() {
        for h in &policy.hosts {
            let entry = by_host.entry(h.host.clone()).or_default();
            if !entry.contains(&i) {
                entry.push(i);
            }
        }
        let old = in_force(&policy.id);
        let ((credential, secondary_credential), identity, token) = match kept {
            Some(kept) => kept,
            None => (
                (
                    resolve_credential(&policy, secrets),
                    resolve_secondary(&policy, secrets),
                ),
                resolve_identity(&policy, secrets),
                resolve_token_manager(&policy, secrets, old.and_then(|o| o.token.as_ref()), ctx),
            ),
        };
        let share = shares.get(&policy.id).copied().unwrap_or(1.0);
        let state = IntegrationState::build(&policy, old.map(|o| &o.state), identity, ctx, share);
        integrations.push(Arc::new(Integration {
            label: Arc::from(policy.id.to_string()),
            policy,
            credential,
            secondary_credential,
            token,
            state,
        }));
    }
    Revision {
        id,
        source,
        loaded_at: SystemTime::now(),
        integrations,
        refused,
        by_host,
    }
}

fn resolve_credential(
    policy: &IntegrationPolicy,
    secrets: &dyn SecretSource,
) -> Option<HeaderValue> {
    let c = policy.credentials.as_ref().filter(|c| c.oauth2.is_none())?;
    let Some(value) = secrets.get(&policy.id.namespace, &c.secret_ref) else {
        tracing::warn!(integration = %policy.id, secret = %c.secret_ref.name, key = %c.secret_ref.key, "credential secret not found; requests go without it");
        return None;
    };
    let rendered = c.render(value.trim_end_matches(['\n', '\r']));
    if rendered.is_none() {
        tracing::error!(integration = %policy.id, secret = %c.secret_ref.name, "credential is not a valid header value; not injected");
    }
    rendered
}

/// The token manager of `credentials.oauth2`: the one in force when the grant and client
/// credentials are unchanged (its cached token stays), else a new one. `None` (logged by Secret
/// name) when a client credential is missing: calls are then answered `credential-unavailable`.
fn resolve_token_manager(
    policy: &IntegrationPolicy,
    secrets: &dyn SecretSource,
    old: Option<&Arc<crate::oauth::TokenManager>>,
    ctx: &StateContext,
) -> Option<Arc<crate::oauth::TokenManager>> {
    let c = policy.credentials.as_ref()?;
    let o = c.oauth2.as_ref()?;
    let read = |r: &SecretKeyRef, what: &str| {
        let v = secrets.get(&policy.id.namespace, r);
        if v.is_none() {
            tracing::warn!(integration = %policy.id, secret = %r.name, key = %r.key, "OAuth2 {what} not found; calls are answered credential-unavailable");
        }
        v.map(|v| v.trim_end_matches(['\n', '\r']).to_string())
    };
    let id = read(&o.client_id_ref, "client id")?;
    let secret = read(&o.client_secret_ref, "client secret")?;
    let key = crate::oauth::TokenManager::key(c, &id, &secret)?;
    if let Some(old) = old.filter(|m| m.is_for(&key)) {
        return Some(old.clone());
    }
    let tls = crate::client::integration_tls(
        &ctx.tls,
        &ctx.roots,
        policy.upstream.ca_bundle.as_deref(),
        None,
    );
    let client = crate::client::build(tls, policy.upstream.connect_timeout, &ctx.pool);
    Some(Arc::new(crate::oauth::TokenManager::new(
        key,
        Arc::from(policy.id.to_string()),
        client,
        ctx.metrics.clone(),
    )))
}

/// The rendered `credentials.secondaryRef`; a missing Secret is logged by name.
fn resolve_secondary(
    policy: &IntegrationPolicy,
    secrets: &dyn SecretSource,
) -> Option<HeaderValue> {
    let c = policy.credentials.as_ref()?;
    let r = c.secondary_ref.as_ref()?;
    let Some(value) = secrets.get(&policy.id.namespace, r) else {
        tracing::warn!(integration = %policy.id, secret = %r.name, key = %r.key, "secondary credential secret not found; a 401 is not resent");
        return None;
    };
    let rendered = c.render(value.trim_end_matches(['\n', '\r']));
    if rendered.is_none() {
        tracing::error!(integration = %policy.id, secret = %r.name, "secondary credential is not a valid header value; not used");
    }
    rendered
}

/// The client certificate of `upstream.clientCertificate`, parsed. A missing or unreadable
/// Secret is logged (by name, never its content) and the partner is called without one.
fn resolve_identity(
    policy: &IntegrationPolicy,
    secrets: &dyn SecretSource,
) -> Option<Arc<ClientIdentity>> {
    let name = policy.upstream.client_certificate.as_deref()?;
    let Some((cert, key)) = secrets.tls(&policy.id.namespace, name) else {
        tracing::warn!(integration = %policy.id, secret = %name, "client certificate secret not found (tls.crt and tls.key); the partner is called without one");
        return None;
    };
    match ClientIdentity::from_pem(&cert, &key) {
        Ok(id) => Some(Arc::new(id)),
        Err(why) => {
            tracing::error!(integration = %policy.id, secret = %name, %why, "client certificate unusable; the partner is called without one");
            None
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct NoSecrets;
    impl SecretSource for NoSecrets {
        fn get(&self, _: &str, _: &SecretKeyRef) -> Option<String> {
            Some("k".into())
        }
    }

    fn candidates(specs: &[(u8, Vec<String>, bool)]) -> Vec<Candidate> {
        specs
            .iter()
            .map(|(name, hosts, broken)| {
                let yaml = format!(
                    "upstream: {{url: 'http://127.0.0.1:1', hosts: [{}]}}\nkillSwitch: {{enabled: {broken}}}{}",
                    hosts.join(", "),
                    if *broken { "\ntimeouts: {total: x}" } else { "" }
                );
                let spec: tollgate_crds::PartnerIntegrationSpec =
                    serde_yaml::from_str(&yaml).unwrap();
                let name = format!("i{name}");
                match tollgate_crds::compile("ns", &name, &spec) {
                    Ok(p) => Candidate::Compiled(Box::new(p)),
                    Err(e) => Candidate::Invalid {
                        id: IntegrationId {
                            namespace: "ns".into(),
                            name,
                        },
                        error: e.to_string(),
                    },
                }
            })
            .collect()
    }

    fn host() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("api.x"),
            Just("API.x."),
            Just("'api.x:8443'"),
            Just("'api.x:443'"),
            Just("b.y"),
            Just("'b.y:1'"),
            Just("c"),
        ]
        .prop_map(String::from)
    }

    fn specs() -> impl Strategy<Value = Vec<(u8, Vec<String>, bool)>> {
        prop::collection::vec(
            (0u8..6, prop::collection::vec(host(), 0..4), any::<bool>()),
            0..6,
        )
    }

    fn check(rev: &Revision, offered: usize) -> Result<(), TestCaseError> {
        let live: Vec<_> = rev.integrations.iter().map(|i| &i.policy).collect();
        for (i, a) in live.iter().enumerate() {
            for b in &live[..i] {
                prop_assert!(a.id != b.id);
                for h in &a.hosts {
                    prop_assert!(!b.hosts.iter().any(|o| o.overlaps(h)), "{h} twice");
                }
            }
            for h in &a.hosts {
                let found = rev.find(&h.host, h.port.or(Some(1)));
                prop_assert_eq!(found.map(|f| &f.policy.id), Some(&a.id));
            }
        }
        let kept = rev.refused.iter().filter(|r| r.kept_previous).count();
        prop_assert_eq!(live.len() + rev.refused.len() - kept, offered);
        Ok(())
    }

    proptest! {
        /// Whatever two successive sets of integrations hold, building never panics, no host
        /// has two owners, and every integration is either in force or refused.
        #[test]
        fn revision_build_never_panics_and_hosts_have_one_owner(first in specs(), second in specs()) {
            let ctx = StateContext::new(crate::client::tls_config(None).unwrap());
            let r1 = build_revision("1".into(), Source::Empty, candidates(&first), &NoSecrets, &Revision::empty(), &ctx, &QuotaShares::new());
            check(&r1, first.len())?;
            let r2 = build_revision("2".into(), Source::Empty, candidates(&second), &NoSecrets, &r1, &ctx, &QuotaShares::new());
            check(&r2, second.len())?;
            // What was in force keeps its hosts when it is offered again unchanged.
            for i in &r1.integrations {
                if let Some(again) = r2.integrations.iter().find(|j| j.policy.id == i.policy.id)
                    && again.policy == i.policy
                {
                    for h in &i.policy.hosts {
                        let owner = r2.find(&h.host, h.port.or(Some(1))).map(|f| f.policy.id.clone());
                        prop_assert_eq!(owner, Some(i.policy.id.clone()));
                    }
                }
            }
        }
    }
}
