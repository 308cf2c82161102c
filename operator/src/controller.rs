//! The PartnerIntegration controller.
//!
//! Every replica reconciles every PartnerIntegration into its [`catalog`](crate::catalog)
//! (compile with the shared step, resolve the Secret), because every replica serves sidecars.
//!
//! Least authority over Secrets: a Secret is a credential only when it opted in with the label
//! [`CREDENTIAL_LABEL`]`: "true"` (and, optionally, the annotation [`CREDENTIAL_HOSTS`] listing
//! the upstream hosts it may be sent to). The operator lists and watches only labelled Secrets
//! and reads credentials from that cache; it never reads a Secret that did not opt in.
//!
//! Host conflicts: two integrations of one namespace claiming one host (case, trailing dot and
//! port normalised): the older (by creation, then name) keeps it; the newer is `Invalid`,
//! naming the older, and is not distributed.
//! Only the leader writes: the finalizer, the status (server-side apply under
//! [`FIELD_MANAGER`]) and events. Reconciles requeue every `status_interval` so the status
//! follows what sidecars report.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::time::Instant;
use tollgate_crds::distribution::SecretValue;
use tollgate_crds::policy::{HostMatch, IntegrationPolicy};
use tollgate_crds::v1alpha1::{Contract, PartnerIntegrationSpec, SecretKeyRef, reason};
use tollgate_crds::{CRD_PATH, PartnerIntegration};
use tracing::{Span, field, info, instrument, warn};

use crate::catalog::{CatalogHandle, Credential, Entry, Key};
use crate::distribution::Hub;
use crate::error::{Error, Result};
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::status::{self, Findings, Invalid};

/// The label a Secret carries (value `"true"`) to be usable as a credential.
pub const CREDENTIAL_LABEL: &str = "tollgate.dev/credential";
/// Optional annotation on a credential Secret: the upstream hosts (comma-separated) its value
/// may be sent to. Absent: any upstream.
pub const CREDENTIAL_HOSTS: &str = "tollgate.dev/credential-hosts";
/// The label selector of the Secret watch.
pub const CREDENTIAL_SELECTOR: &str = "tollgate.dev/credential=true";

/// The label a ConfigMap carries (value `"true"`) for its keys to be usable as contract
/// schemas (`contract.schema.configMapName`).
pub const SCHEMA_LABEL: &str = "tollgate.dev/contract-schema";
/// The label selector of the ConfigMap watch.
pub const SCHEMA_SELECTOR: &str = "tollgate.dev/contract-schema=true";

/// How long a reconcile waits for the Secret cache's initial list before it fails (and is
/// retried): reading a credential from a cache that is still filling would report it missing.
const SECRET_CACHE_WAIT: Duration = Duration::from_secs(10);

/// The one field manager for everything this operator writes.
pub const FIELD_MANAGER: &str = "tollgate-operator";
/// Held while the operator still has to tell sidecars an integration is gone.
pub const FINALIZER: &str = "tollgate.dev/cleanup";

/// How often a follower re-reads an object that did not change.
pub const FOLLOWER_RESYNC: Duration = Duration::from_secs(300);

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub catalog: CatalogHandle,
    pub hub: Arc<Hub>,
    pub recorder: Recorder,
    pub leader: Leadership,
    pub metrics: Arc<Metrics>,
    /// How often a healthy object is reconciled again to refresh its status.
    pub status_interval: Duration,
    /// Consecutive failures per object, for the error policy's backoff.
    failures: Mutex<HashMap<Key, u32>>,
    /// The labelled Secrets, one cache per watched scope (filled by [`run`]).
    secrets: RwLock<Vec<Store<Secret>>>,
    /// The PartnerIntegrations, one cache per watched scope (filled by [`run`]).
    integrations: RwLock<Vec<Store<PartnerIntegration>>>,
    /// The labelled schema ConfigMaps, one cache per watched scope (filled by [`run`]).
    schemas: RwLock<Vec<Store<ConfigMap>>>,
    /// Integrations refused for a host conflict: reconciled again when any integration of
    /// their namespace changes.
    conflicted: Mutex<BTreeSet<Key>>,
}

impl Context {
    pub fn new(
        client: Client,
        catalog: CatalogHandle,
        hub: Arc<Hub>,
        leader: Leadership,
        metrics: Arc<Metrics>,
        reporter: Reporter,
        status_interval: Duration,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            catalog,
            hub,
            leader,
            metrics,
            status_interval,
            failures: Mutex::default(),
            secrets: RwLock::default(),
            integrations: RwLock::default(),
            schemas: RwLock::default(),
            conflicted: Mutex::default(),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<Key, u32>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn conflicted(&self) -> std::sync::MutexGuard<'_, BTreeSet<Key>> {
        self.conflicted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds the caches a reconcile reads (one per watched scope).
    pub fn add_caches(&self, secrets: Store<Secret>, integrations: Store<PartnerIntegration>) {
        self.secrets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(secrets);
        self.integrations
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(integrations);
    }

    /// Adds a cache of labelled schema ConfigMaps (one per watched scope).
    pub fn add_schema_cache(&self, schemas: Store<ConfigMap>) {
        self.schemas
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(schemas);
    }

    /// The labelled ConfigMap `ns/name`, once every schema cache has its initial list.
    async fn labelled_config_map(&self, ns: &str, name: &str) -> Result<Option<Arc<ConfigMap>>> {
        let stores = self
            .schemas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for s in &stores {
            tokio::time::timeout(SECRET_CACHE_WAIT, s.wait_until_ready())
                .await
                .map_err(|_| Error::CacheNotReady("labelled ConfigMaps"))?
                .map_err(|_| Error::CacheNotReady("labelled ConfigMaps"))?;
        }
        let r = ObjectRef::new(name).within(ns);
        Ok(stores.iter().find_map(|s| s.get(&r)))
    }

    fn secret_stores(&self) -> Vec<Store<Secret>> {
        self.secrets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every PartnerIntegration of `ns` in the caches.
    fn integrations_in(&self, ns: &str) -> Vec<Arc<PartnerIntegration>> {
        self.integrations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flat_map(|s| s.state())
            .filter(|pi| pi.metadata.namespace.as_deref() == Some(ns))
            .collect()
    }

    /// The labelled Secret `ns/name`, once every Secret cache has its initial list.
    async fn labelled_secret(&self, ns: &str, name: &str) -> Result<Option<Arc<Secret>>> {
        let stores = self.secret_stores();
        for s in &stores {
            tokio::time::timeout(SECRET_CACHE_WAIT, s.wait_until_ready())
                .await
                .map_err(|_| Error::CacheNotReady("labelled Secrets"))?
                .map_err(|_| Error::CacheNotReady("labelled Secrets"))?;
        }
        let r = ObjectRef::new(name).within(ns);
        Ok(stores.iter().find_map(|s| s.get(&r)))
    }
}

fn key_of(pi: &PartnerIntegration) -> Result<Key> {
    let ns = pi
        .metadata
        .namespace
        .clone()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let name = pi
        .metadata
        .name
        .clone()
        .ok_or(Error::MissingMetadata("name"))?;
    Ok((ns, name))
}

/// Reconciles one PartnerIntegration.
#[instrument(skip(pi, ctx), fields(namespace, name, generation = field::Empty, leader))]
pub async fn reconcile(pi: Arc<PartnerIntegration>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let key = key_of(&pi)?;
    let span = Span::current();
    span.record("namespace", key.0.as_str());
    span.record("name", key.1.as_str());
    span.record("generation", pi.metadata.generation.unwrap_or(0));
    let leader = ctx.leader.is_leader();
    span.record("leader", leader);

    let result = if leader {
        let api: Api<PartnerIntegration> = Api::namespaced(ctx.client.clone(), &key.0);
        finalizer(&api, FINALIZER, pi, |event| async {
            match event {
                Finalizer::Apply(pi) => apply(&pi, &ctx, true).await,
                Finalizer::Cleanup(pi) => cleanup(&pi, &ctx).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    } else if pi.metadata.deletion_timestamp.is_some() {
        cleanup(&pi, &ctx).await
    } else {
        apply(&pi, &ctx, false).await
    };
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.failures().remove(&key);
    }
    result
}

/// Requeues a failed object with exponential backoff (2s doubling to 5 minutes, jittered).
pub fn error_policy(pi: Arc<PartnerIntegration>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error.metric_label());
    let n = match key_of(&pi) {
        Ok(key) => {
            let mut failures = ctx.failures();
            let n = failures.entry(key).or_insert(0);
            *n = n.saturating_add(1);
            *n
        }
        Err(_) => 1,
    };
    let delay = backoff(n);
    warn!(
        name = %pi.name_any(),
        namespace = pi.namespace().as_deref().unwrap_or(""),
        reason = error.metric_label(),
        %error,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// Delay before retry number `n` (1-based).
pub fn backoff(n: u32) -> Duration {
    let base = Duration::from_secs(2).saturating_mul(1u32 << n.saturating_sub(1).min(8));
    let capped = base.min(Duration::from_secs(300));
    // Up to 20% jitter so a burst of failures does not retry in lockstep.
    let jitter = capped.mul_f64(rand::random::<f64>() * 0.2);
    capped + jitter
}

/// The credential as read now from the labelled Secrets.
#[derive(Debug)]
enum SecretRead {
    Found(Credential),
    /// No Secret of that name carries the opt-in label.
    NotOptedIn,
    /// The Secret opted in but has no usable value (message names what is wrong).
    Unusable(String),
}

/// A Secret a spec reads: the credential it injects, or the client certificate it presents.
#[derive(Clone, Copy, Debug)]
enum SecretUse<'a> {
    Credential(&'a SecretKeyRef),
    /// Another key the credentials read, and the field that names it.
    Key(&'a SecretKeyRef, &'static str),
    ClientCertificate(&'a str),
}

impl SecretUse<'_> {
    fn name(&self) -> &str {
        match self {
            SecretUse::Credential(r) | SecretUse::Key(r, _) => &r.name,
            SecretUse::ClientCertificate(name) => name,
        }
    }

    /// The spec field that names the Secret.
    fn field(&self) -> &'static str {
        match self {
            SecretUse::Credential(_) => "spec.credentials.secretRef",
            SecretUse::Key(_, field) => field,
            SecretUse::ClientCertificate(_) => "spec.upstream.clientCertificate.secretName",
        }
    }

    fn read(&self, ns: &str, secret: Option<&Secret>) -> SecretRead {
        match self {
            SecretUse::Credential(r) => read_secret(ns, r, "spec.credentials.secretRef", secret),
            SecretUse::Key(r, field) => read_secret(ns, r, field, secret),
            SecretUse::ClientCertificate(name) => read_tls_secret(ns, name, secret),
        }
    }
}

fn read_secret(ns: &str, r: &SecretKeyRef, field: &str, secret: Option<&Secret>) -> SecretRead {
    let Some(secret) = secret else {
        return SecretRead::NotOptedIn;
    };
    let value = secret.data.as_ref().and_then(|d| d.get(&r.key));
    let Some(bytes) = value else {
        return SecretRead::Unusable(format!(
            "Secret {ns}/{} has no key {:?} ({field}.key)",
            r.name, r.key
        ));
    };
    let Ok(text) = std::str::from_utf8(&bytes.0) else {
        return SecretRead::Unusable(format!(
            "Secret {ns}/{} key {:?} is not UTF-8 text",
            r.name, r.key
        ));
    };
    // Files made with `echo` end in a newline that no API key contains.
    let text = text.trim_end_matches(['\n', '\r']);
    SecretRead::Found(Credential {
        value: SecretValue::new(text),
        secret_version: secret.metadata.resource_version.clone().unwrap_or_default(),
        secret_name: r.name.clone(),
        allowed_hosts: allowed_hosts(secret),
        certificate: None,
    })
}

/// A `kubernetes.io/tls` Secret: `tls.crt` and `tls.key`, checked to parse as a certificate
/// chain and a private key. Messages never echo the content.
fn read_tls_secret(ns: &str, name: &str, secret: Option<&Secret>) -> SecretRead {
    let Some(secret) = secret else {
        return SecretRead::NotOptedIn;
    };
    let text = |key: &str| -> Result<&str, String> {
        let bytes = secret.data.as_ref().and_then(|d| d.get(key)).ok_or_else(|| {
            format!(
                "Secret {ns}/{name} has no key {key:?} (spec.upstream.clientCertificate.secretName \
                 names a kubernetes.io/tls Secret: tls.crt and tls.key)"
            )
        })?;
        std::str::from_utf8(&bytes.0)
            .map_err(|_| format!("Secret {ns}/{name} key {key:?} is not PEM text"))
    };
    let (cert, key) = match (text("tls.crt"), text("tls.key")) {
        (Ok(c), Ok(k)) => (c, k),
        (Err(why), _) | (_, Err(why)) => return SecretRead::Unusable(why),
    };
    if let Err(why) = tollgate_crds::policy::client_identity(cert, key) {
        return SecretRead::Unusable(format!("Secret {ns}/{name}: {why}"));
    }
    SecretRead::Found(Credential {
        value: SecretValue::new(key),
        secret_version: secret.metadata.resource_version.clone().unwrap_or_default(),
        secret_name: name.to_string(),
        allowed_hosts: allowed_hosts(secret),
        certificate: Some(cert.to_string()),
    })
}

/// The hosts a Secret's `tollgate.dev/credential-hosts` annotation allows; `None`: any.
fn allowed_hosts(secret: &Secret) -> Option<Vec<String>> {
    secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CREDENTIAL_HOSTS))
        .map(|list| {
            list.split([',', ' ', '\n'])
                .map(normalise_host)
                .filter(|h| !h.is_empty())
                .collect()
        })
}

/// How to opt a Secret in, for messages.
fn opt_in_hint(ns: &str, use_: SecretUse<'_>) -> String {
    let name = use_.name();
    format!(
        "{}: Secret {ns}/{name} is not a Tollgate credential (no Secret \
         of that name labelled {CREDENTIAL_SELECTOR} exists); Tollgate reads only Secrets that \
         opt in: `kubectl label secret -n {ns} {name} {CREDENTIAL_SELECTOR}` (optionally \
         annotate it {CREDENTIAL_HOSTS}=<upstream hosts it may be sent to>)",
        use_.field()
    )
}

/// Lower case, without a trailing dot.
fn normalise_host(h: &str) -> String {
    h.trim().trim_end_matches('.').to_ascii_lowercase()
}

fn hosts_clash(a: &HostMatch, b: &HostMatch) -> bool {
    normalise_host(&a.host) == normalise_host(&b.host)
        && (a.port.is_none() || b.port.is_none() || a.port == b.port)
}

fn host_label(h: &HostMatch) -> String {
    match h.port {
        Some(p) => format!("{}:{p}", normalise_host(&h.host)),
        None => normalise_host(&h.host),
    }
}

/// Which of two integrations came first: creation time, then name (both replicas and every
/// reconcile order agree).
fn age(pi: &PartnerIntegration) -> (Option<Timestamp>, String) {
    (
        pi.metadata.creation_timestamp.as_ref().map(|t| t.0),
        pi.name_any(),
    )
}

fn older(a: &PartnerIntegration, b: &PartnerIntegration) -> bool {
    let (ta, na) = age(a);
    let (tb, nb) = age(b);
    match (ta, tb) {
        (Some(x), Some(y)) if x != y => x < y,
        // A timestamp-less object (never from the API server) counts as the newest.
        (Some(_), None) => true,
        (None, Some(_)) => false,
        _ => na < nb,
    }
}

/// The hosts `other` claims now: its spec's, or, while its spec is invalid, those of the
/// revision sidecars keep for it.
fn claimed_hosts(ctx: &Context, other: &PartnerIntegration) -> Vec<HostMatch> {
    let ns = other.namespace().unwrap_or_default();
    match tollgate_crds::compile(&ns, &other.name_any(), &other.spec) {
        Ok(p) => p.hosts,
        Err(_) => ctx
            .catalog
            .get(&(ns, other.name_any()))
            .map(|e| e.policy.hosts.clone())
            .unwrap_or_default(),
    }
}

/// The older integration of the namespace that claims one of `policy`'s hosts, if any.
fn host_conflict(
    ctx: &Context,
    pi: &PartnerIntegration,
    policy: &IntegrationPolicy,
) -> Option<Invalid> {
    let ns = pi.namespace().unwrap_or_default();
    let mut others = ctx.integrations_in(&ns);
    others.retain(|o| o.name_any() != pi.name_any() && o.metadata.deletion_timestamp.is_none());
    others.sort_by_key(|o| age(o));
    for other in others.iter().filter(|o| older(o, pi)) {
        let theirs = claimed_hosts(ctx, other);
        for (i, mine) in policy.hosts.iter().enumerate() {
            if theirs.iter().any(|t| hosts_clash(mine, t)) {
                return Some(Invalid {
                    reason: reason::HOST_CONFLICT,
                    message: format!(
                        "spec.upstream.hosts[{i}]: {} is already claimed by PartnerIntegration \
                         {ns}/{} (created earlier), which keeps it; remove the host from one \
                         of them",
                        host_label(mine),
                        other.name_any()
                    ),
                });
            }
        }
    }
    None
}

/// The integrations to reconcile again when `changed` changes: those of its namespace that
/// claim one of its hosts, and those refused for a conflict (its old hosts may have freed
/// theirs).
fn affected_by(ctx: &Context, changed: &PartnerIntegration) -> Vec<ObjectRef<PartnerIntegration>> {
    let Some(ns) = changed.namespace() else {
        return Vec::new();
    };
    let mine = claimed_hosts(ctx, changed);
    let conflicted = ctx.conflicted().clone();
    ctx.integrations_in(&ns)
        .into_iter()
        .filter(|o| o.name_any() != changed.name_any())
        .filter(|o| {
            conflicted.contains(&(ns.clone(), o.name_any()))
                || claimed_hosts(ctx, o)
                    .iter()
                    .any(|h| mine.iter().any(|m| hosts_clash(h, m)))
        })
        .map(|o| ObjectRef::from_obj(&*o))
        .collect()
}

/// What resolving one Secret of a spec decided.
enum Resolved {
    /// Distribute this value (`None`: none is known).
    Value(Option<Credential>),
    /// Never read by this replica: sidecars keep what they hold. The status says why.
    Held(Invalid),
    /// Refuse the spec; the previous revision stays.
    Refuse(Invalid),
}

/// Reads one Secret a valid spec names. `previous`: the value of the same use in the entry in
/// force. A Secret that becomes unreadable leaves the previous value in force (and says why in
/// `secret_problem`); another Secret than the one in force must be readable.
async fn resolve_secret(
    ctx: &Context,
    ns: &str,
    use_: SecretUse<'_>,
    previous: Option<&Credential>,
    upstream: &str,
    secret_problem: &mut Option<String>,
) -> Result<Resolved> {
    let name = use_.name();
    // The value this replica holds for the same Secret, if the Secret allows the upstream.
    let kept = previous
        .filter(|c| c.secret_name == name)
        .filter(|c| c.allows(upstream))
        .cloned();
    let secret = ctx.labelled_secret(ns, name).await?;
    Ok(match use_.read(ns, secret.as_deref()) {
        SecretRead::Found(found) if !found.allows(upstream) => {
            let message = format!(
                "spec.upstream.url: Secret {ns}/{name} may be sent only to {} (annotation \
                 {CREDENTIAL_HOSTS}), not to {upstream}",
                found
                    .allowed_hosts
                    .as_deref()
                    .unwrap_or_default()
                    .join(", ")
            );
            info!(why = %message, "credential not allowed for this upstream; the previous revision stays in force");
            Resolved::Refuse(Invalid {
                reason: reason::CREDENTIAL_HOST_NOT_ALLOWED,
                message,
            })
        }
        SecretRead::Found(found) => Resolved::Value(Some(found)),
        SecretRead::Unusable(why) => {
            info!(%why, "credential unavailable; the previous one stays in force");
            *secret_problem = Some(why);
            Resolved::Value(kept)
        }
        SecretRead::NotOptedIn => {
            let message = opt_in_hint(ns, use_);
            if kept.is_some() {
                info!(why = %message, "credential Secret gone; the previous credential stays in force");
                *secret_problem = Some(message);
                Resolved::Value(kept)
            } else if previous.is_some() {
                // Another Secret than the one in force: refuse the change.
                info!(why = %message, "credential Secret not opted in; the previous revision stays in force");
                Resolved::Refuse(Invalid {
                    reason: reason::SECRET_NOT_OPTED_IN,
                    message,
                })
            } else {
                // Never read by this replica (it may have started while the Secret was
                // unavailable): sidecars keep what they hold for this reference.
                info!(why = %message, "credential Secret not opted in; sidecars keep what they hold");
                Resolved::Held(Invalid {
                    reason: reason::SECRET_NOT_OPTED_IN,
                    message,
                })
            }
        }
    })
}

/// The spec with the text of every contract schema taken from a ConfigMap put in
/// (`contract.schema.inline`), as sidecars receive it; or why it cannot be (the ConfigMap is
/// missing, not labelled [`SCHEMA_LABEL`], or lacks the key), naming the field.
async fn resolve_schemas(
    ctx: &Context,
    ns: &str,
    spec: &PartnerIntegrationSpec,
) -> Result<std::result::Result<PartnerIntegrationSpec, Invalid>> {
    let mut out = spec.clone();
    let mut contracts: Vec<(String, &mut Contract)> = Vec::new();
    if let Some(c) = out.contract.as_mut() {
        contracts.push(("spec.contract".into(), c));
    }
    for (i, r) in out.routes.iter_mut().enumerate() {
        if let Some(c) = r.contract.as_mut() {
            contracts.push((format!("spec.routes[{i}].contract"), c));
        }
    }
    for (base, contract) in contracts {
        let Some(schema) = contract.schema.as_mut() else {
            continue;
        };
        let (Some(name), Some(key)) = (&schema.config_map_name, &schema.key) else {
            // Inline, or incomplete: the compile step says what is wrong.
            continue;
        };
        let unavailable = |message: String| {
            info!(why = %message, "contract schema unavailable; the previous revision stays in force");
            Ok(Err(Invalid {
                reason: reason::SCHEMA_UNAVAILABLE,
                message,
            }))
        };
        let Some(map) = ctx.labelled_config_map(ns, name).await? else {
            return unavailable(format!(
                "{base}.schema.configMapName: ConfigMap {ns}/{name} does not exist or is not \
                 labelled {SCHEMA_LABEL}=true; label it: kubectl label configmap -n {ns} {name} \
                 {SCHEMA_LABEL}=true"
            ));
        };
        let Some(text) = map.data.as_ref().and_then(|d| d.get(key)) else {
            return unavailable(format!(
                "{base}.schema.key: ConfigMap {ns}/{name} has no key {key:?} in data"
            ));
        };
        schema.inline = Some(text.clone());
    }
    Ok(Ok(out))
}

/// Resolves the credential and client certificate of a valid, unconflicted spec and puts it
/// in force. Returns why the spec is refused, if it is (then the previous revision stays).
async fn resolve_and_upsert(
    ctx: &Context,
    pi: &PartnerIntegration,
    spec: &PartnerIntegrationSpec,
    policy: IntegrationPolicy,
    previous: Option<&Entry>,
    secret_problem: &mut Option<String>,
) -> Result<Option<Invalid>> {
    let ns = policy.id.namespace.clone();
    let generation = pi.metadata.generation.unwrap_or(0);
    let upstream = normalise_host(&policy.upstream.host);
    let mut invalid = None;
    let mut resolve =
        async |use_: Option<SecretUse<'_>>,
               previous: Option<&Credential>|
               -> Result<std::result::Result<(Option<Credential>, bool), Invalid>> {
            let Some(use_) = use_ else {
                return Ok(Ok((None, false)));
            };
            Ok(
                match resolve_secret(ctx, &ns, use_, previous, &upstream, secret_problem).await? {
                    Resolved::Value(v) => Ok((v, false)),
                    Resolved::Refuse(why) => Err(why),
                    Resolved::Held(why) => {
                        invalid.get_or_insert(why);
                        Ok((None, true))
                    }
                },
            )
        };
    let credential = resolve(
        policy
            .credentials
            .as_ref()
            .filter(|c| c.oauth2.is_none())
            .map(|c| SecretUse::Credential(&c.secret_ref)),
        previous.and_then(|p| p.credential.as_ref()),
    )
    .await?;
    let (credential, credential_held) = match credential {
        Ok(v) => v,
        Err(refused) => return Ok(Some(refused)),
    };
    let mut more = Vec::new();
    let mut more_held = false;
    for (field, r) in policy
        .credentials
        .as_ref()
        .map(|c| c.more_refs())
        .unwrap_or_default()
    {
        let previous = previous
            .and_then(|p| p.more_credentials.iter().find(|(k, _)| k == r))
            .map(|(_, c)| c);
        match resolve(Some(SecretUse::Key(r, field)), previous).await? {
            Ok((Some(value), _)) => more.push((r.clone(), value)),
            // Never read by this replica: the status says why, sidecars keep what they hold.
            Ok((None, held)) => more_held |= held,
            Err(refused) => return Ok(Some(refused)),
        }
    }
    let certificate = resolve(
        policy
            .upstream
            .client_certificate
            .as_deref()
            .map(SecretUse::ClientCertificate),
        previous.and_then(|p| p.client_certificate.as_ref()),
    )
    .await?;
    let (certificate, certificate_held) = match certificate {
        Ok(v) => v,
        Err(refused) => return Ok(Some(refused)),
    };
    let mut entry = Entry::new(generation, spec.clone(), policy, credential)
        .with_client_certificate(certificate)
        .with_more_credentials(more);
    if credential_held {
        entry = entry.with_held_credential();
    }
    if certificate_held {
        entry = entry.with_held_client_certificate();
    }
    if more_held {
        entry = entry.with_held_more_credentials();
    }
    let revision = entry.config_revision.clone();
    if ctx.catalog.upsert(entry) {
        info!(%revision, "revision in force");
    }
    Ok(invalid)
}

/// Compiles, resolves the credential, updates the catalog; as leader also writes status and
/// events.
async fn apply(pi: &PartnerIntegration, ctx: &Context, leader: bool) -> Result<Action> {
    let key = key_of(pi)?;
    let (ns, name) = (&key.0, &key.1);
    let generation = pi.metadata.generation.unwrap_or(0);
    let previous = ctx.catalog.get(&key);

    let mut secret_problem = None;
    let spec = resolve_schemas(ctx, ns, &pi.spec).await?;
    let invalid = match spec
        .as_ref()
        .map(|spec| (spec, tollgate_crds::compile(ns, name, spec)))
    {
        Err(why) => Some(why.clone()),
        Ok((_, Err(e))) => {
            info!(error = %e, "spec invalid; the previous revision stays in force");
            Some(Invalid {
                reason: reason::INVALID_SPEC,
                message: e.to_string(),
            })
        }
        Ok((spec, Ok(policy))) => match host_conflict(ctx, pi, &policy) {
            Some(conflict) => {
                info!(why = %conflict.message, "host conflict; not distributed");
                ctx.conflicted().insert(key.clone());
                if ctx.catalog.remove(&key) {
                    info!("integration withdrawn from sidecars");
                }
                Some(conflict)
            }
            None => {
                ctx.conflicted().remove(&key);
                resolve_and_upsert(
                    ctx,
                    pi,
                    spec,
                    policy,
                    previous.as_deref(),
                    &mut secret_problem,
                )
                .await?
            }
        },
    };
    ctx.catalog.seen(&key);

    if !leader {
        ctx.metrics.forget_integration(&format!("{ns}/{name}"));
        // Changes to the object or its Secret trigger a reconcile anyway; a follower has no
        // status to refresh, so its periodic pass is only a safety net.
        return Ok(Action::requeue(FOLLOWER_RESYNC));
    }

    let in_force = ctx.catalog.get(&key);
    let observed = in_force
        .as_ref()
        .map(|e| ctx.hub.observe(&key, &e.config_revision));
    ctx.metrics.integration_status(
        &format!("{ns}/{name}"),
        in_force
            .as_ref()
            .and_then(|e| e.policy.sla.as_ref())
            .and_then(|s| s.availability_percent),
        observed
            .as_ref()
            .map(|o| (o.sidecars.desired, o.sidecars.up_to_date)),
    );
    let findings = Findings {
        generation,
        invalid: invalid.as_ref(),
        secret_problem: secret_problem.as_deref(),
        in_force: in_force.as_deref(),
        observed: observed.as_ref(),
    };
    let new = status::build(&findings, pi.status.as_ref(), Timestamp::now());
    if pi.status.as_ref() != Some(&new) {
        let patch = serde_json::json!({
            "apiVersion": "tollgate.dev/v1alpha1",
            "kind": "PartnerIntegration",
            "status": new,
        });
        let api: Api<PartnerIntegration> = Api::namespaced(ctx.client.clone(), ns);
        api.patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    for n in status::notices(pi.status.as_ref(), &new) {
        publish(ctx, pi, n).await;
    }
    Ok(Action::requeue(ctx.status_interval))
}

async fn publish(ctx: &Context, pi: &PartnerIntegration, n: status::Notice) {
    let event = KubeEvent {
        type_: if n.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: n.reason.to_string(),
        note: Some(truncate(&n.note, 1000)),
        action: n.action.to_string(),
        secondary: None,
    };
    // A lost event must not fail the reconcile: the status already says it.
    if let Err(e) = ctx.recorder.publish(&event, &pi.object_ref(&())).await {
        warn!(error = %e, reason = n.reason, "could not publish event");
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The object is going away: sidecars stop receiving it.
async fn cleanup(pi: &PartnerIntegration, ctx: &Context) -> Result<Action> {
    let key = key_of(pi)?;
    if ctx.catalog.remove(&key) {
        info!("integration withdrawn from sidecars");
    }
    ctx.conflicted().remove(&key);
    ctx.catalog.seen(&key);
    ctx.hub.forget(&key);
    ctx.metrics
        .forget_integration(&format!("{}/{}", key.0, key.1));
    Ok(Action::await_change())
}

/// Says how to install the CRD when it is missing. `namespaces` empty: cluster-wide.
pub async fn check_crd(client: &Client, namespaces: &[String]) -> anyhow::Result<()> {
    let api: Api<PartnerIntegration> = match namespaces.first() {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => anyhow::bail!(
            "the PartnerIntegration CRD (partnerintegrations.tollgate.dev) is not installed; \
             install it with `kubectl apply -f {CRD_PATH}` or the Helm chart charts/tollgate"
        ),
        Err(e) => Err(anyhow::Error::new(e).context(
            "cannot list PartnerIntegrations: check the operator's RBAC and the API server",
        )),
    }
}

/// The PartnerIntegrations in `store` that reference `secret`.
fn referencing(
    store: &Store<PartnerIntegration>,
    secret: &Secret,
) -> Vec<ObjectRef<PartnerIntegration>> {
    let (Some(ns), Some(name)) = (
        secret.metadata.namespace.as_deref(),
        secret.metadata.name.as_deref(),
    ) else {
        return Vec::new();
    };
    store
        .state()
        .into_iter()
        .filter(|pi| {
            pi.metadata.namespace.as_deref() == Some(ns)
                && pi
                    .spec
                    .credentials
                    .as_ref()
                    .is_some_and(|c| c.secret_refs().iter().any(|r| r.name == name))
        })
        .map(|pi| ObjectRef::from_obj(&*pi))
        .collect()
}

/// The PartnerIntegrations in `store` whose contract schema (the integration's or a route's)
/// names `map`.
fn referencing_schema(
    store: &Store<PartnerIntegration>,
    map: &ConfigMap,
) -> Vec<ObjectRef<PartnerIntegration>> {
    let (Some(ns), Some(name)) = (
        map.metadata.namespace.as_deref(),
        map.metadata.name.as_deref(),
    ) else {
        return Vec::new();
    };
    let names = |c: &Option<Contract>| {
        c.as_ref()
            .and_then(|c| c.schema.as_ref())
            .is_some_and(|s| s.config_map_name.as_deref() == Some(name))
    };
    store
        .state()
        .into_iter()
        .filter(|pi| {
            pi.metadata.namespace.as_deref() == Some(ns)
                && (names(&pi.spec.contract) || pi.spec.routes.iter().any(|r| names(&r.contract)))
        })
        .map(|pi| ObjectRef::from_obj(&*pi))
        .collect()
}

/// Runs the controllers (one per namespace given, or one for the whole cluster) until they
/// stop on a signal. Marks the catalog synced once the initial lists are reconciled, and drops
/// catalog entries of objects that vanished without a cleanup.
pub async fn run(ctx: Arc<Context>, namespaces: Vec<String>) {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let mut stores = Vec::new();
    let mut secret_stores = Vec::new();
    let mut runs = Vec::new();
    for scope in scopes {
        let (pis, others, secrets, maps): (
            Api<PartnerIntegration>,
            Api<PartnerIntegration>,
            Api<Secret>,
            Api<ConfigMap>,
        ) = match &scope {
            Some(ns) => (
                Api::namespaced(ctx.client.clone(), ns),
                Api::namespaced(ctx.client.clone(), ns),
                Api::namespaced(ctx.client.clone(), ns),
                Api::namespaced(ctx.client.clone(), ns),
            ),
            None => (
                Api::all(ctx.client.clone()),
                Api::all(ctx.client.clone()),
                Api::all(ctx.client.clone()),
                Api::all(ctx.client.clone()),
            ),
        };
        let controller = Controller::new(pis, watcher::Config::default().any_semantic());
        let store = controller.store();
        // Only Secrets that opted in are listed and watched; one watch feeds the cache the
        // reconciles read and the triggers, so a reconcile never sees an older cache than
        // the change that triggered it.
        let (secret_store, writer) = reflector::store();
        let secret_events = reflector::reflector(
            writer,
            watcher(
                secrets,
                watcher::Config::default().labels(CREDENTIAL_SELECTOR),
            )
            .default_backoff(),
        )
        .touched_objects();
        // Likewise only ConfigMaps that opted in as contract schemas.
        let (schema_store, writer) = reflector::store();
        let schema_events = reflector::reflector(
            writer,
            watcher(maps, watcher::Config::default().labels(SCHEMA_SELECTOR)).default_backoff(),
        )
        .touched_objects();
        ctx.add_schema_cache(schema_store.clone());
        ctx.add_caches(secret_store.clone(), store.clone());
        stores.push(store.clone());
        secret_stores.push(secret_store);
        // Becoming leader: write every status now rather than at the next requeue.
        let promoted = futures::stream::unfold(ctx.leader.clone(), |mut l| async move {
            loop {
                if l.changed().await? {
                    return Some(((), l));
                }
            }
        });
        let by_secret = store.clone();
        let by_schema = store.clone();
        let by_host = ctx.clone();
        let run = controller
            .watches_stream(secret_events, move |s| referencing(&by_secret, &s))
            .watches_stream(schema_events, move |m| referencing_schema(&by_schema, &m))
            // An integration that changes or goes away may free or take a host another one
            // of its namespace claims.
            .watches(others, watcher::Config::default(), move |pi| {
                affected_by(&by_host, &pi)
            })
            .reconcile_all_on(promoted)
            .shutdown_on_signal()
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|res| async move {
                match res {
                    Ok((obj, action)) => {
                        tracing::debug!(object = %obj, ?action, "reconciled")
                    }
                    Err(e) => warn!(error = %e, "reconcile error"),
                }
            });
        runs.push(run);
    }
    let live = |stores: &[Store<PartnerIntegration>]| -> std::collections::BTreeSet<Key> {
        stores
            .iter()
            .flat_map(|s| s.state())
            .filter_map(|pi| key_of(&pi).ok())
            .collect()
    };
    let sync = {
        let catalog = ctx.catalog.clone();
        let stores = stores.clone();
        async move {
            for s in &stores {
                if s.wait_until_ready().await.is_err() {
                    return;
                }
            }
            for s in &secret_stores {
                if s.wait_until_ready().await.is_err() {
                    return;
                }
            }
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                // Objects deleted since the list count as done: they have nothing to serve.
                if catalog.sync_if_seen(&live(&stores)) {
                    info!(
                        integrations = catalog.snapshot().entries.len(),
                        "initial sync done"
                    );
                    return;
                }
            }
        }
    };
    let prune = {
        let catalog = ctx.catalog.clone();
        async move {
            catalog.wait_synced().await;
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tick.tick().await;
                let live = live(&stores);
                let dropped = catalog.retain(|k| live.contains(k));
                if dropped > 0 {
                    info!(dropped, "withdrew integrations whose objects are gone");
                }
            }
        }
    };
    tokio::select! {
        _ = futures::future::join_all(runs) => {}
        _ = async { sync.await; prune.await } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{
        NAME, NS, cache, context, context_with, integration, previous_entry, secret, spec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::json;
    use tollgate_crds::v1alpha1::{condition, reason};

    fn key() -> Key {
        (NS.to_string(), NAME.to_string())
    }

    fn cond<'a>(
        s: &'a tollgate_crds::PartnerIntegrationStatus,
        t: &str,
    ) -> &'a tollgate_crds::v1alpha1::Condition {
        status::find(Some(s), t).unwrap_or_else(|| panic!("condition {t} missing in {s:?}"))
    }

    #[tokio::test]
    async fn valid_spec_is_distributed_and_reported_ready() {
        let (ctx, mut api, catalog) = context(true);
        let pi = integration(spec(false), 1);
        let server = tokio::spawn(async move {
            let status = api.status_apply(&integration(spec(false), 1)).await;
            api.done().await;
            status
        });
        let action = reconcile(Arc::new(pi), ctx.clone()).await.unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(10)));
        let status = server.await.unwrap();

        let entry = catalog.get(&key()).expect("in the catalog");
        assert_eq!(entry.generation, 1);
        assert_eq!(
            entry.credential.as_ref().map(|c| c.value.expose()),
            Some("sk_live_1")
        );
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!(
            status.config_revision.as_deref(),
            Some(entry.config_revision.as_str())
        );
        let ready = cond(&status, condition::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("True", Some(reason::COMPILED))
        );
        assert_eq!(cond(&status, condition::INVALID).status, "False");
        assert_eq!(cond(&status, condition::KILL_SWITCH_ACTIVE).status, "False");
        assert_eq!(cond(&status, condition::CIRCUIT_OPEN).status, "False");
        assert_eq!(status.circuit.as_deref(), Some("closed"));
        assert_eq!(status.sidecars.as_ref().map(|s| s.desired), Some(0));
    }

    #[tokio::test]
    async fn unchanged_status_is_not_rewritten() {
        let (ctx, mut api, _) = context(true);
        let pi = integration(spec(false), 1);
        let status_written = tokio::spawn(async move {
            let status = api.status_apply(&integration(spec(false), 1)).await;
            (api, status)
        });
        reconcile(Arc::new(pi.clone()), ctx.clone()).await.unwrap();
        let (api, status) = status_written.await.unwrap();

        // The next reconcile sees the status it wrote: it writes nothing.
        let mut again = pi;
        again.status = Some(status);
        let server = tokio::spawn(async move {
            api.done().await;
        });
        reconcile(Arc::new(again), ctx).await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn invalid_spec_keeps_previous_revision_and_names_the_field() {
        let (ctx, mut api, catalog) = context(true);
        catalog.upsert(previous_entry(spec(false), 1, "sk_live_1"));
        let previous = catalog.get(&key()).unwrap().config_revision.clone();
        let mut bad = spec(false);
        bad["timeouts"] = json!({"request": "10s", "total": "5s"});
        let pi = integration(bad.clone(), 2);
        let server = tokio::spawn(async move {
            let status = api.status_apply(&integration(bad, 2)).await;
            let event = api.event_create().await;
            api.done().await;
            (status, event)
        });
        reconcile(Arc::new(pi), ctx).await.unwrap();
        let (status, (kind, why, note)) = server.await.unwrap();

        let entry = catalog.get(&key()).unwrap();
        assert_eq!(
            entry.generation, 1,
            "the last valid revision stays in force"
        );
        assert_eq!(status.config_revision.as_deref(), Some(previous.as_str()));
        assert_eq!(status.observed_generation, Some(2));
        let invalid = cond(&status, condition::INVALID);
        assert_eq!(invalid.status, "True");
        assert_eq!(invalid.reason.as_deref(), Some(reason::INVALID_SPEC));
        let message = invalid.message.as_deref().unwrap();
        assert!(message.contains("spec.timeouts.request"), "{message}");
        let ready = cond(&status, condition::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("False", Some(reason::INVALID_SPEC))
        );
        assert!(ready.message.as_deref().unwrap().contains(&previous));
        assert_eq!(
            (kind.as_str(), why.as_str()),
            ("Warning", reason::INVALID_SPEC)
        );
        assert!(note.contains("spec.timeouts.request"), "{note}");
    }

    #[tokio::test]
    async fn kill_switch_on_then_off_flips_condition_and_emits_events() {
        // On.
        let (ctx, mut api, catalog) = context(true);
        let mut before = integration(spec(false), 1);
        before.status = Some(status::build(
            &status::Findings {
                generation: 1,
                invalid: None,
                secret_problem: None,
                in_force: Some(&previous_entry(spec(false), 1, "sk_live_1")),
                observed: None,
            },
            None,
            Timestamp::now(),
        ));
        let mut on = integration(spec(true), 2);
        on.status = before.status.clone();
        let echo = on.clone();
        let server = tokio::spawn(async move {
            let status = api.status_apply(&echo).await;
            let event = api.event_create().await;
            api.done().await;
            (status, event)
        });
        reconcile(Arc::new(on), ctx).await.unwrap();
        let (status_on, (kind, why, note)) = server.await.unwrap();
        let ks = cond(&status_on, condition::KILL_SWITCH_ACTIVE);
        assert_eq!(
            (ks.status.as_str(), ks.reason.as_deref()),
            ("True", Some(reason::KILL_SWITCH_ENABLED))
        );
        assert_eq!(
            ks.message.as_deref(),
            Some("INC-123 vendor double-charging")
        );
        assert_eq!(
            (kind.as_str(), why.as_str()),
            ("Warning", reason::KILL_SWITCH_ENABLED)
        );
        assert!(note.contains("INC-123"), "{note}");
        assert!(catalog.get(&key()).unwrap().kill_switch());

        // Off again.
        let (ctx, mut api, catalog) = context(true);
        let mut off = integration(spec(false), 3);
        off.status = Some(status_on);
        let echo = off.clone();
        let server = tokio::spawn(async move {
            let status = api.status_apply(&echo).await;
            let event = api.event_create().await;
            api.done().await;
            (status, event)
        });
        reconcile(Arc::new(off), ctx).await.unwrap();
        let (status_off, (kind, why, _)) = server.await.unwrap();
        let ks = cond(&status_off, condition::KILL_SWITCH_ACTIVE);
        assert_eq!(
            (ks.status.as_str(), ks.reason.as_deref()),
            ("False", Some(reason::KILL_SWITCH_DISABLED))
        );
        assert_eq!(
            (kind.as_str(), why.as_str()),
            ("Normal", reason::KILL_SWITCH_DISABLED)
        );
        assert!(!catalog.get(&key()).unwrap().kill_switch());
    }

    #[tokio::test]
    async fn missing_secret_is_named_and_the_previous_credential_stays() {
        let (ctx, mut api, catalog) = context_with(true, Vec::new(), Vec::new());
        catalog.upsert(previous_entry(spec(false), 1, "sk_live_old"));
        let mut changed = spec(false);
        changed["upstream"]["connectTimeout"] = json!("1s");
        let pi = integration(changed.clone(), 2);
        let server = tokio::spawn(async move {
            let status = api.status_apply(&integration(changed, 2)).await;
            let event = api.event_create().await;
            api.done().await;
            (status, event)
        });
        reconcile(Arc::new(pi), ctx).await.unwrap();
        let (status, (kind, why, note)) = server.await.unwrap();

        let entry = catalog.get(&key()).unwrap();
        assert_eq!(entry.generation, 2, "the new spec is in force");
        assert_eq!(
            entry.credential.as_ref().map(|c| c.value.expose()),
            Some("sk_live_old"),
            "with the previous credential"
        );
        let ready = cond(&status, condition::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_deref()),
            ("False", Some(reason::SECRET_MISSING))
        );
        let message = ready.message.as_deref().unwrap();
        assert!(message.contains("Secret payments/stripe-api"), "{message}");
        assert!(message.contains("previous credential"), "{message}");
        assert_eq!(cond(&status, condition::INVALID).status, "False");
        assert_eq!(
            (kind.as_str(), why.as_str()),
            ("Warning", reason::SECRET_MISSING)
        );
        assert!(note.contains("stripe-api"), "{note}");
    }

    #[tokio::test]
    async fn missing_key_is_named_too() {
        let mut s = secret("x");
        s.data = Some(Default::default());
        let (ctx, mut api, catalog) = context_with(true, vec![s], Vec::new());
        let pi = integration(spec(false), 1);
        let server = tokio::spawn(async move {
            let status = api.status_apply(&integration(spec(false), 1)).await;
            let _ = api.event_create().await;
            api.done().await;
            status
        });
        reconcile(Arc::new(pi), ctx).await.unwrap();
        let status = server.await.unwrap();
        let ready = cond(&status, condition::READY);
        assert!(
            ready
                .message
                .as_deref()
                .unwrap()
                .contains("no key \"apiKey\"")
        );
        // Nothing to keep: distributed without a credential.
        assert!(catalog.get(&key()).unwrap().credential.is_none());
    }

    #[tokio::test]
    async fn deletion_withdraws_the_integration_and_releases_the_finalizer() {
        let (ctx, mut api, catalog) = context(true);
        catalog.upsert(previous_entry(spec(false), 1, "sk_live_1"));
        let mut pi = integration(spec(false), 1);
        pi.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        let echo = pi.clone();
        let server = tokio::spawn(async move {
            let ops = api.finalizer_patch(&echo).await;
            api.done().await;
            ops
        });
        let action = reconcile(Arc::new(pi), ctx).await.unwrap();
        assert_eq!(action, Action::await_change());
        let ops = server.await.unwrap();
        assert_eq!(ops[1]["op"], "remove");
        assert_eq!(ops[1]["path"], "/metadata/finalizers/0");
        assert!(catalog.get(&key()).is_none());
    }

    #[tokio::test]
    async fn a_new_object_gets_the_finalizer_first() {
        let (ctx, mut api, catalog) = context(true);
        let mut pi = integration(spec(false), 1);
        pi.metadata.finalizers = None;
        let echo = pi.clone();
        let server = tokio::spawn(async move {
            let ops = api.finalizer_patch(&echo).await;
            api.done().await;
            ops
        });
        let action = reconcile(Arc::new(pi), ctx).await.unwrap();
        assert_eq!(action, Action::await_change());
        let ops = server.await.unwrap();
        assert_eq!(ops[1]["op"], "add");
        assert_eq!(ops[1]["value"], json!([FINALIZER]));
        assert!(
            catalog.get(&key()).is_none(),
            "applied only once the finalizer is on"
        );
    }

    #[tokio::test]
    async fn a_follower_distributes_but_never_writes() {
        let (ctx, api, catalog) = context(false);
        let mut pi = integration(spec(false), 1);
        pi.metadata.finalizers = None;
        let server = tokio::spawn(async move {
            api.done().await;
        });
        let action = reconcile(Arc::new(pi), ctx).await.unwrap();
        assert_eq!(action, Action::requeue(FOLLOWER_RESYNC));
        server.await.unwrap();
        assert!(catalog.get(&key()).is_some());
    }

    #[tokio::test]
    async fn api_errors_are_counted_and_backed_off() {
        let (ctx, mut api, _) = context(true);
        let pi = Arc::new(integration(spec(false), 1));
        let server = tokio::spawn(async move {
            let (_, send) = api.0.next_request().await.unwrap();
            send.send_error(std::io::Error::other("connection refused"));
        });
        let err = reconcile(pi.clone(), ctx.clone()).await.unwrap_err();
        server.await.unwrap();
        assert_eq!(err.metric_label(), "api_unreachable");
        let _ = error_policy(pi.clone(), &err, ctx.clone());
        let _ = error_policy(pi.clone(), &err, ctx.clone());
        assert_eq!(
            ctx.failures().get(&key()),
            Some(&2),
            "backoff grows per failure"
        );
        assert!(ctx.metrics.encode().contains("reason=\"api_unreachable\""));
        assert!(backoff(1) >= Duration::from_secs(2) && backoff(1) < Duration::from_secs(3));
        assert!(backoff(30) <= Duration::from_secs(360));
    }

    /// A labelled `kubernetes.io/tls` Secret `payments/stripe-mtls` holding a fresh
    /// certificate, and its key's PEM; `key: false` leaves out `tls.key`.
    fn tls_secret(key: bool) -> (Secret, String) {
        let pair = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client.example".to_string()])
            .unwrap()
            .self_signed(&pair)
            .unwrap();
        let mut s = secret("unused");
        s.metadata.name = Some("stripe-mtls".into());
        s.metadata.resource_version = Some("77".into());
        s.type_ = Some("kubernetes.io/tls".into());
        let mut data = std::collections::BTreeMap::new();
        data.insert(
            "tls.crt".to_string(),
            k8s_openapi::ByteString(cert.pem().into_bytes()),
        );
        if key {
            data.insert(
                "tls.key".to_string(),
                k8s_openapi::ByteString(pair.serialize_pem().into_bytes()),
            );
        }
        s.data = Some(data);
        (s, pair.serialize_pem())
    }

    fn mtls_spec() -> serde_json::Value {
        let mut s = spec(false);
        s["upstream"]["clientCertificate"] = json!({"secretName": "stripe-mtls"});
        s
    }

    #[tokio::test]
    async fn a_client_certificate_is_read_from_its_labelled_tls_secret_and_distributed() {
        let (tls, key_pem) = tls_secret(true);
        let (ctx, mut api, catalog) =
            context_with(true, vec![secret("sk_live_1"), tls], Vec::new());
        let pi = integration(mtls_spec(), 1);
        let server = tokio::spawn(async move {
            let status = api.status_apply(&integration(mtls_spec(), 1)).await;
            api.done().await;
            status
        });
        reconcile(Arc::new(pi), ctx).await.unwrap();
        let status = server.await.unwrap();
        assert_eq!(cond(&status, condition::READY).status, "True");
        let entry = catalog.get(&key()).unwrap();
        let cert = entry
            .client_certificate
            .as_ref()
            .expect("a client certificate");
        assert_eq!(cert.value.expose(), key_pem);
        assert!(
            cert.certificate
                .as_deref()
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
        assert!(!format!("{entry:?}").contains(key_pem.lines().nth(1).unwrap()));
        // The Secret's version enters the revision: a rotation reaches the sidecars.
        let without = Entry::new(
            1,
            entry.spec.clone(),
            (*entry.policy).clone(),
            entry.credential.clone(),
        );
        assert_ne!(without.config_revision, entry.config_revision);
    }

    #[tokio::test]
    async fn an_unlabelled_client_certificate_secret_is_named_with_the_fix() {
        let (ctx, mut api, catalog) = context_with(true, vec![secret("sk_live_1")], Vec::new());
        let pi = integration(mtls_spec(), 1);
        let server = tokio::spawn(async move {
            let status = api.status_apply(&integration(mtls_spec(), 1)).await;
            let event = api.event_create().await;
            api.done().await;
            (status, event)
        });
        reconcile(Arc::new(pi), ctx).await.unwrap();
        let (status, (_, why, _)) = server.await.unwrap();
        let invalid = cond(&status, condition::INVALID);
        assert_eq!(invalid.reason.as_deref(), Some(reason::SECRET_NOT_OPTED_IN));
        let message = invalid.message.as_deref().unwrap();
        assert!(
            message.starts_with("spec.upstream.clientCertificate.secretName"),
            "{message}"
        );
        assert!(
            message.contains(
                "kubectl label secret -n payments stripe-mtls tollgate.dev/credential=true"
            ),
            "{message}"
        );
        assert_eq!(why, reason::SECRET_NOT_OPTED_IN);
        let entry = catalog.get(&key()).unwrap();
        assert!(entry.client_certificate.is_none());
        assert!(
            entry.client_certificate_held,
            "sidecars keep what they hold"
        );
        assert!(!entry.credential_held, "the credential was read");
    }

    #[tokio::test]
    async fn a_tls_secret_without_its_key_is_named_and_never_echoed() {
        let (tls, _) = tls_secret(false);
        let (ctx, mut api, catalog) =
            context_with(true, vec![secret("sk_live_1"), tls], Vec::new());
        let pi = integration(mtls_spec(), 1);
        let server = tokio::spawn(async move {
            let status = api.status_apply(&integration(mtls_spec(), 1)).await;
            let event = api.event_create().await;
            api.done().await;
            (status, event)
        });
        reconcile(Arc::new(pi), ctx).await.unwrap();
        let (status, _) = server.await.unwrap();
        let ready = cond(&status, condition::READY);
        assert_eq!(ready.reason.as_deref(), Some(reason::SECRET_MISSING));
        let message = ready.message.as_deref().unwrap();
        assert!(
            message.contains("Secret payments/stripe-mtls has no key \"tls.key\""),
            "{message}"
        );
        assert!(!message.contains("BEGIN"), "{message}");
        assert!(catalog.get(&key()).unwrap().client_certificate.is_none());
    }

    #[tokio::test]
    async fn an_unlabelled_secret_is_refused_with_the_fix_and_never_read() {
        // The label-selected cache has no such Secret: the reconcile makes no Secret call.
        let (ctx, mut api, catalog) = context_with(true, Vec::new(), Vec::new());
        let pi = integration(spec(false), 1);
        let server = tokio::spawn(async move {
            let status = api.status_apply(&integration(spec(false), 1)).await;
            let event = api.event_create().await;
            api.done().await;
            (status, event)
        });
        reconcile(Arc::new(pi), ctx).await.unwrap();
        let (status, (kind, why, _)) = server.await.unwrap();
        let invalid = cond(&status, condition::INVALID);
        assert_eq!(
            (invalid.status.as_str(), invalid.reason.as_deref()),
            ("True", Some(reason::SECRET_NOT_OPTED_IN))
        );
        let message = invalid.message.as_deref().unwrap();
        assert!(
            message.starts_with("spec.credentials.secretRef"),
            "{message}"
        );
        assert!(
            message.contains(
                "kubectl label secret -n payments stripe-api tollgate.dev/credential=true"
            ),
            "{message}"
        );
        assert_eq!(
            (kind.as_str(), why.as_str()),
            ("Warning", reason::SECRET_NOT_OPTED_IN)
        );
        // Distributed without a value; sidecars keep what they hold for this reference.
        let entry = catalog.get(&key()).unwrap();
        assert!(entry.credential.is_none());
        assert!(entry.credential_held);
    }

    const ORDER_SCHEMA: &str = r#"{"type": "object", "required": ["id"]}"#;

    /// The ConfigMap `payments/orders`, opted in as contract schemas, holding `order.json`.
    fn schema_map(text: &str) -> ConfigMap {
        let mut m = ConfigMap::default();
        m.metadata.name = Some("orders".into());
        m.metadata.namespace = Some(NS.into());
        m.metadata.labels = Some(
            [(SCHEMA_LABEL.to_string(), "true".to_string())]
                .into_iter()
                .collect(),
        );
        m.data = Some(
            [("order.json".to_string(), text.to_string())]
                .into_iter()
                .collect(),
        );
        m
    }

    fn schema_spec() -> serde_json::Value {
        let mut s = spec(false);
        s["routes"] = json!([{
            "name": "orders",
            "match": {"pathPrefix": "/v1/orders"},
            "contract": {"schema": {"configMapName": "orders", "key": "order.json"}},
        }]);
        s
    }

    /// A route's contract schema is read from its labelled ConfigMap and distributed inline:
    /// sidecars get the text, and a change of the text is a new revision.
    #[tokio::test]
    async fn a_contract_schema_is_read_from_its_labelled_config_map_and_distributed() {
        let mut revisions = Vec::new();
        for text in [ORDER_SCHEMA, r#"{"type": "object"}"#] {
            let (ctx, mut api, catalog) = context(true);
            ctx.add_schema_cache(cache(vec![schema_map(text)]));
            let server = tokio::spawn(async move {
                let status = api.status_apply(&integration(schema_spec(), 1)).await;
                api.done().await;
                status
            });
            reconcile(Arc::new(integration(schema_spec(), 1)), ctx)
                .await
                .unwrap();
            let status = server.await.unwrap();
            assert_eq!(cond(&status, condition::READY).status, "True", "{status:?}");
            let entry = catalog.get(&key()).expect("in the catalog");
            let schema = entry.spec.routes[0]
                .contract
                .as_ref()
                .and_then(|c| c.schema.as_ref())
                .unwrap();
            assert_eq!(schema.inline.as_deref(), Some(text));
            let compiled = entry.policy.routes[0].contract.as_ref().unwrap();
            assert_eq!(
                compiled.schema.as_ref().unwrap().source,
                "configMap orders key order.json"
            );
            revisions.push(entry.config_revision.clone());
        }
        assert_ne!(
            revisions[0], revisions[1],
            "the schema text is part of the revision"
        );
    }

    /// A ConfigMap that did not opt in (the label-selected cache has none), or whose schema does
    /// not compile: the spec is refused naming the field (with the fix), nothing is distributed.
    #[tokio::test]
    async fn an_unusable_schema_config_map_is_refused_naming_the_field() {
        for (maps, why, says) in [
            (
                Vec::new(),
                reason::SCHEMA_UNAVAILABLE,
                "spec.routes[0].contract.schema.configMapName: ConfigMap payments/orders does not exist or is not labelled tollgate.dev/contract-schema=true; label it: kubectl label configmap -n payments orders tollgate.dev/contract-schema=true",
            ),
            (
                vec![schema_map(r#"{"type": 12}"#)],
                reason::INVALID_SPEC,
                "spec.routes[0].contract.schema.configMapName: the schema does not compile",
            ),
        ] {
            let (ctx, mut api, catalog) = context(true);
            ctx.add_schema_cache(cache(maps));
            let server = tokio::spawn(async move {
                let status = api.status_apply(&integration(schema_spec(), 1)).await;
                let event = api.event_create().await;
                api.done().await;
                (status, event)
            });
            reconcile(Arc::new(integration(schema_spec(), 1)), ctx)
                .await
                .unwrap();
            let (status, (kind, event_reason, _)) = server.await.unwrap();
            let invalid = cond(&status, condition::INVALID);
            assert_eq!(
                (invalid.status.as_str(), invalid.reason.as_deref()),
                ("True", Some(why))
            );
            let message = invalid.message.as_deref().unwrap();
            assert!(message.contains(says), "{message}");
            assert_eq!((kind.as_str(), event_reason.as_str()), ("Warning", why));
            assert!(catalog.get(&key()).is_none(), "nothing distributed");
        }
    }

    #[tokio::test]
    async fn another_unlabelled_secret_does_not_replace_the_one_in_force() {
        let (ctx, mut api, catalog) = context_with(true, Vec::new(), Vec::new());
        catalog.upsert(previous_entry(spec(false), 1, "sk_live_1"));
        let mut other = spec(false);
        other["credentials"]["secretRef"]["name"] = json!("db-password");
        other["upstream"]["url"] = json!("https://collector.example");
        let pi = integration(other.clone(), 2);
        let server = tokio::spawn(async move {
            let status = api.status_apply(&integration(other, 2)).await;
            let _ = api.event_create().await;
            api.done().await;
            status
        });
        reconcile(Arc::new(pi), ctx).await.unwrap();
        let status = server.await.unwrap();
        assert_eq!(cond(&status, condition::INVALID).status, "True");
        let entry = catalog.get(&key()).unwrap();
        assert_eq!(entry.generation, 1, "the last valid revision stays");
        assert_eq!(entry.policy.upstream.host, "api.stripe.com");
    }

    #[tokio::test]
    async fn a_secret_goes_only_to_the_hosts_it_lists() {
        let mut s = secret("sk_live_1");
        s.metadata.annotations = Some(
            [(
                CREDENTIAL_HOSTS.to_string(),
                "api.stripe.com, files.stripe.com".to_string(),
            )]
            .into_iter()
            .collect(),
        );
        let (ctx, mut api, catalog) = context_with(true, vec![s], Vec::new());
        let mut elsewhere = spec(false);
        elsewhere["upstream"]["url"] = json!("https://collector.example");
        let pi = integration(elsewhere.clone(), 1);
        let server = tokio::spawn(async move {
            let status = api.status_apply(&integration(elsewhere, 1)).await;
            let _ = api.event_create().await;
            api.done().await;
            status
        });
        reconcile(Arc::new(pi), ctx.clone()).await.unwrap();
        let status = server.await.unwrap();
        let invalid = cond(&status, condition::INVALID);
        assert_eq!(
            invalid.reason.as_deref(),
            Some(reason::CREDENTIAL_HOST_NOT_ALLOWED)
        );
        assert!(
            invalid
                .message
                .as_deref()
                .unwrap()
                .contains("collector.example"),
            "{invalid:?}"
        );
        assert!(catalog.get(&key()).is_none(), "nothing distributed");
    }

    fn created(mut pi: PartnerIntegration, name: &str, at: &str) -> PartnerIntegration {
        pi.metadata.name = Some(name.into());
        pi.metadata.creation_timestamp = Some(Time(at.parse().unwrap()));
        pi
    }

    #[tokio::test]
    async fn the_newer_of_two_integrations_claiming_a_host_is_refused() {
        // Same host up to case and port.
        let mut theirs = spec(false);
        theirs["upstream"] =
            json!({"url": "https://eu.stripe.com", "hosts": ["API.Stripe.COM:443"]});
        let older = created(integration(theirs, 1), "older", "2026-01-01T00:00:00Z");
        let ours = created(integration(spec(false), 1), NAME, "2026-01-02T00:00:00Z");
        let (ctx, mut api, catalog) = context_with(
            true,
            vec![secret("sk_live_1")],
            vec![older.clone(), ours.clone()],
        );
        let echo = ours.clone();
        let server = tokio::spawn(async move {
            let status = api.status_apply(&echo).await;
            let _ = api.event_create().await;
            api.done().await;
            status
        });
        reconcile(Arc::new(ours.clone()), ctx.clone())
            .await
            .unwrap();
        let status = server.await.unwrap();
        let invalid = cond(&status, condition::INVALID);
        assert_eq!(
            (invalid.status.as_str(), invalid.reason.as_deref()),
            ("True", Some(reason::HOST_CONFLICT))
        );
        let message = invalid.message.as_deref().unwrap();
        assert!(message.contains("payments/older"), "{message}");
        assert!(message.contains("spec.upstream.hosts[0]"), "{message}");
        assert!(
            catalog.get(&key()).is_none(),
            "the newer is not distributed"
        );
        // A change to the older re-examines the newer.
        assert_eq!(affected_by(&ctx, &older), vec![ObjectRef::from_obj(&ours)]);

        // The older is reconciled as usual (a follower: no writes).
        let (ctx, api, catalog) =
            context_with(false, vec![secret("sk_live_1")], vec![older.clone(), ours]);
        reconcile(Arc::new(older), ctx).await.unwrap();
        api.done().await;
        assert!(
            catalog
                .get(&(NS.to_string(), "older".to_string()))
                .is_some()
        );
    }

    #[test]
    fn hosts_compare_without_case_trailing_dot_or_a_missing_port() {
        let h = |host: &str, port| HostMatch {
            host: host.into(),
            port,
        };
        assert!(hosts_clash(
            &h("API.example.com.", None),
            &h("api.example.com", Some(443))
        ));
        assert!(hosts_clash(
            &h("api.example.com", Some(443)),
            &h("api.example.com", Some(443))
        ));
        assert!(!hosts_clash(
            &h("api.example.com", Some(443)),
            &h("api.example.com", Some(8443))
        ));
        assert!(!hosts_clash(
            &h("api.example.com", None),
            &h("example.com", None)
        ));
    }
}
