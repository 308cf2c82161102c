//! The hub: who is subscribed, what each pod should run, and each stream's revisions.
//!
//! A [`View`] (the catalog plus how many pods are subscribed to each integration) is published
//! through a `watch` channel whenever the catalog changes or a pod comes or goes. Every open
//! stream wakes on it, computes its pod's snapshot and pushes it if the content changed, so a
//! change reaches all sidecars at once, without polling. Opens and closes only mark the
//! subscribers changed; [`Hub::run`] recounts once for however many came together, and a new
//! stream starts once a view counts it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tollgate_crds::distribution::{
    ClientCertificateValue, DistributedIntegration, Hello, KeyedSecret, PROTOCOL_VERSION,
    QuotaShare, Report, StreamMessage,
};

use crate::catalog::{Catalog, CatalogHandle, Entry, Key, hex};
use crate::metrics::Metrics;
use crate::peers::Peers;
use crate::traffic::{Observed, Partial, PodKey, TrafficStore};

/// A pod proven by its ServiceAccount token, with the labels read from the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// When the token that proved it expires; the stream ends then.
    pub token_expiry: Option<std::time::SystemTime>,
}

impl PodIdentity {
    pub fn key(&self) -> PodKey {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Serialized integration lists of one view, by digest.
type Rendered = Arc<Mutex<HashMap<String, Arc<RawValue>>>>;

/// The catalog and the subscriber counts, as of `changed_at`.
#[derive(Clone, Debug)]
pub struct View {
    pub catalog: Arc<Catalog>,
    /// Distinct pods subscribed per integration on this replica.
    pub subscribers: BTreeMap<Key, Vec<PodKey>>,
    /// Sidecars subscribed per integration on the other replicas.
    pub remote: BTreeMap<Key, u32>,
    pub changed_at: Instant,
    /// Pods that run the same integrations get the same content: it is serialized once per
    /// view (bounded by the streams open), not once per stream.
    rendered: Rendered,
}

impl View {
    fn new(
        catalog: Arc<Catalog>,
        subscribers: BTreeMap<Key, Vec<PodKey>>,
        remote: BTreeMap<Key, u32>,
        changed_at: Instant,
    ) -> Self {
        View {
            catalog,
            subscribers,
            remote,
            changed_at,
            rendered: Rendered::default(),
        }
    }

    /// The entries `pod` runs, each with its quota share.
    fn selected<'a>(
        &'a self,
        pod: &'a PodIdentity,
    ) -> impl Iterator<Item = (&'a Entry, Option<QuotaShare>)> + 'a {
        let lower = (pod.namespace.clone(), String::new());
        self.catalog
            .entries
            .range(lower..)
            .take_while(move |(key, _)| key.0 == pod.namespace)
            .filter(move |(_, e)| e.policy.selects(&pod.labels))
            .map(move |(key, e)| {
                let share = e.has_global_quota().then(|| {
                    let local = self.subscribers.get(key).map_or(1, Vec::len);
                    let remote = self.remote.get(key).copied().unwrap_or(0);
                    QuotaShare::equal(
                        u32::try_from(local)
                            .unwrap_or(u32::MAX)
                            .saturating_add(remote),
                    )
                });
                (&**e, share)
            })
    }

    /// The digest of what `pod` should run: changes whenever the content does.
    pub fn digest_for(&self, pod: &PodIdentity) -> String {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        for (e, share) in self.selected(pod) {
            // The config revision covers spec, generation and the Secret's version.
            digest.update(e.namespace.as_bytes());
            digest.update(b"/");
            digest.update(e.name.as_bytes());
            digest.update(b"@");
            digest.update(e.config_revision.as_bytes());
            if let Some(s) = &share {
                digest.update(format!("#{}", s.subscribers).as_bytes());
            }
            digest.update(b"\n");
        }
        hex(&digest.finish().as_ref()[..16])
    }

    /// The integrations `pod` should run, and the digest of that content.
    pub fn snapshot_for(&self, pod: &PodIdentity) -> (Vec<DistributedIntegration>, String) {
        let out =
            self.selected(pod)
                .map(|(e, share)| DistributedIntegration {
                    namespace: e.namespace.clone(),
                    name: e.name.clone(),
                    generation: e.generation,
                    config_revision: e.config_revision.clone(),
                    spec: e.spec.clone(),
                    credential: e.credential.as_ref().map(|c| c.value.clone()),
                    credential_held: e.credential_held,
                    client_certificate: e.client_certificate.as_ref().map(|c| {
                        ClientCertificateValue {
                            certificate: c.certificate.clone().unwrap_or_default(),
                            key: c.value.clone(),
                        }
                    }),
                    client_certificate_held: e.client_certificate_held,
                    more_credentials: e
                        .more_credentials
                        .iter()
                        .map(|(r, c)| KeyedSecret {
                            name: r.name.clone(),
                            key: r.key.clone(),
                            value: c.value.clone(),
                        })
                        .collect(),
                    more_credentials_held: e.more_credentials_held,
                    quota_share: share,
                })
                .collect();
        (out, self.digest_for(pod))
    }

    /// [`View::snapshot_for`] serialized, shared by every stream whose pod runs the same
    /// integrations.
    fn rendered_for(&self, pod: &PodIdentity, digest: &str) -> serde_json::Result<Arc<RawValue>> {
        if let Some(r) = self.rendered().get(digest) {
            return Ok(r.clone());
        }
        let (integrations, d) = self.snapshot_for(pod);
        let raw: Arc<RawValue> = serde_json::value::to_raw_value(&integrations)?.into();
        self.rendered().insert(d, raw.clone());
        Ok(raw)
    }

    fn rendered(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<RawValue>>> {
        self.rendered.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What re-checking a stream's authority found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// End the stream; the reason is the `streams_ended_total` label.
    End(&'static str),
}

/// Verifies a stream's token and pod again.
pub type Recheck = Arc<dyn Fn() -> futures::future::BoxFuture<'static, Verdict> + Send + Sync>;

/// How long a stream may live and how it is re-checked.
#[derive(Clone)]
pub struct Authority {
    /// The stream ends at this instant (its token's expiry).
    pub expires: Option<Instant>,
    /// Run every `.1`, first at a random point of the first period.
    pub recheck: Option<(Recheck, Duration)>,
    /// Streams the same pod may hold at once.
    pub max_streams_per_pod: usize,
}

impl Default for Authority {
    fn default() -> Self {
        Self {
            expires: None,
            recheck: None,
            max_streams_per_pod: usize::MAX,
        }
    }
}

/// Why a stream was not opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("pod {pod} already holds {max} streams")]
    TooManyStreams { pod: String, max: usize },
}

/// Timing the hub hands to sidecars.
#[derive(Clone, Copy, Debug)]
pub struct HubSettings {
    pub heartbeat: Duration,
    pub report_interval: Duration,
}

impl Default for HubSettings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(15),
            report_interval: Duration::from_secs(5),
        }
    }
}

/// Snapshots awaiting a sidecar's ack, per stream; older ones count as push failures.
const MAX_PENDING_ACKS: usize = 16;

struct Session {
    pod: Arc<PodIdentity>,
    /// Revisions sent and when the change behind each happened; bounded.
    sent: VecDeque<(u64, Instant)>,
}

/// Every stream this replica serves.
pub struct Hub {
    catalog: CatalogHandle,
    sessions: Mutex<HashMap<String, Session>>,
    view: watch::Sender<Arc<View>>,
    peers: watch::Receiver<Arc<Peers>>,
    traffic: TrafficStore,
    metrics: Arc<Metrics>,
    settings: HubSettings,
    recomputes: std::sync::atomic::AtomicU64,
    /// Bumped under the sessions lock by every open and close; `run` recounts when it moved.
    changes: std::sync::atomic::AtomicU64,
    dirty: tokio::sync::Notify,
    /// The last `changes` value a published view covers.
    covered: watch::Sender<u64>,
}

impl Hub {
    /// A hub alone: shares and status count only this replica's sidecars.
    pub fn new(catalog: CatalogHandle, metrics: Arc<Metrics>, settings: HubSettings) -> Arc<Self> {
        let (_, peers) = watch::channel(Arc::default());
        Self::with_peers(catalog, metrics, settings, peers)
    }

    /// A hub that also counts the other replicas' sidecars (see [`crate::peers`]).
    pub fn with_peers(
        catalog: CatalogHandle,
        metrics: Arc<Metrics>,
        settings: HubSettings,
        peers: watch::Receiver<Arc<Peers>>,
    ) -> Arc<Self> {
        let published = catalog.subscribe().borrow().clone();
        let (view, _) = watch::channel(Arc::new(View::new(
            published.catalog,
            BTreeMap::new(),
            BTreeMap::new(),
            published.changed_at,
        )));
        let traffic = TrafficStore::new(
            Duration::from_secs(60),
            settings.report_interval * 3 + Duration::from_secs(1),
        );
        Arc::new(Self {
            catalog,
            sessions: Mutex::default(),
            view,
            peers,
            traffic,
            metrics,
            settings,
            recomputes: Default::default(),
            changes: Default::default(),
            dirty: tokio::sync::Notify::new(),
            covered: watch::channel(0).0,
        })
    }

    /// Subscriber recounts done so far.
    pub fn recomputes(&self) -> u64 {
        self.recomputes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Follows the catalog and the peers until the returned future is dropped. Run it once
    /// per hub.
    pub async fn run(self: Arc<Self>) {
        let mut catalog = self.catalog.subscribe();
        let mut peers = self.peers.clone();
        let mut peers_alive = true;
        let mut sessions_at = None;
        loop {
            let changed_at = catalog.borrow_and_update().changed_at;
            peers.borrow_and_update();
            self.recompute(sessions_at.take().unwrap_or(changed_at));
            tokio::select! {
                c = catalog.changed() => if c.is_err() { return },
                p = peers.changed(), if peers_alive => if p.is_err() { peers_alive = false },
                // Opens and closes: many at once cost one recount.
                _ = self.dirty.notified() => sessions_at = Some(Instant::now()),
            }
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn settings(&self) -> HubSettings {
        self.settings
    }

    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// What the status of `key` should show: this replica's sidecars and the other replicas'.
    pub fn observe(&self, key: &Key, current_revision: &str) -> Observed {
        let view = self.view();
        let pods = view.subscribers.get(key).cloned().unwrap_or_default();
        let mut partial = self.traffic.partial(key, &pods, Instant::now());
        partial.merge(&self.peers.borrow().partial(key));
        partial.finish(current_revision)
    }

    /// This replica's aggregates, for the other replicas.
    pub fn partials(&self) -> BTreeMap<Key, Partial> {
        let view = self.view();
        let now = Instant::now();
        let mut keys: Vec<Key> = view.subscribers.keys().cloned().collect();
        keys.extend(self.traffic.keys());
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .map(|k| {
                let pods = view.subscribers.get(&k).cloned().unwrap_or_default();
                let p = self.traffic.partial(&k, &pods, now);
                (k, p)
            })
            .collect()
    }

    /// Forgets the reports of a deleted integration.
    pub fn forget(&self, key: &Key) {
        self.traffic.forget(key);
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Recounts subscribers against the current catalog and publishes a new view if anything
    /// a stream could see changed.
    fn recompute(&self, changed_at: Instant) {
        // Held to the end, so two recomputes cannot publish out of order.
        let sessions = self.sessions();
        self.recomputes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let covers = self.changes.load(std::sync::atomic::Ordering::SeqCst);
        let catalog = self.catalog.snapshot();
        let mut pods: BTreeMap<PodKey, Arc<PodIdentity>> = BTreeMap::new();
        for s in sessions.values() {
            pods.insert(s.pod.key(), s.pod.clone());
        }
        let mut subscribers: BTreeMap<Key, Vec<PodKey>> = BTreeMap::new();
        for (key, e) in &catalog.entries {
            let selected: Vec<PodKey> = pods
                .values()
                .filter(|p| p.namespace == e.namespace && e.policy.selects(&p.labels))
                .map(|p| p.key())
                .collect();
            if !selected.is_empty() {
                subscribers.insert(key.clone(), selected);
            }
        }
        let peers = self.peers.borrow().clone();
        let remote: BTreeMap<Key, u32> = catalog
            .entries
            .keys()
            .map(|k| (k.clone(), peers.subscribers(k)))
            .filter(|(_, n)| *n > 0)
            .collect();
        self.view.send_if_modified(|v| {
            if Arc::ptr_eq(&v.catalog, &catalog)
                && v.subscribers == subscribers
                && v.remote == remote
            {
                return false;
            }
            *v = Arc::new(View::new(catalog, subscribers, remote, changed_at));
            true
        });
        self.covered.send_replace(covers);
        drop(sessions);
    }

    /// An open or close happened (call with the sessions lock held): returns the change's
    /// number and wakes `run` to recount.
    fn changed(&self) -> u64 {
        let n = self
            .changes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        self.dirty.notify_one();
        n
    }

    /// Opens a stream for an authenticated pod. `resume` is the revision and digest the
    /// sidecar already holds. The returned receiver yields NDJSON lines; dropping it (the
    /// client went away) ends the session.
    pub fn open(
        self: &Arc<Self>,
        pod: PodIdentity,
        resume: Option<(u64, String)>,
    ) -> (String, mpsc::Receiver<Bytes>) {
        match self.open_with(pod, resume, Authority::default()) {
            Ok(opened) => opened,
            Err(OpenError::TooManyStreams { .. }) => unreachable!("no stream limit"),
        }
    }

    /// As [`Hub::open`], within `authority`: refused when the pod already holds its share of
    /// streams, ended at the token's expiry or when a re-check says so.
    pub fn open_with(
        self: &Arc<Self>,
        pod: PodIdentity,
        resume: Option<(u64, String)>,
        authority: Authority,
    ) -> Result<(String, mpsc::Receiver<Bytes>), OpenError> {
        let session = new_session_id();
        let pod = Arc::new(pod);
        let change = {
            let mut sessions = self.sessions();
            let key = pod.key();
            let held = sessions.values().filter(|s| s.pod.key() == key).count();
            if held >= authority.max_streams_per_pod {
                return Err(OpenError::TooManyStreams {
                    pod: key,
                    max: authority.max_streams_per_pod,
                });
            }
            sessions.insert(
                session.clone(),
                Session {
                    pod: pod.clone(),
                    sent: VecDeque::new(),
                },
            );
            self.changed()
        };
        self.metrics.connected_sidecars.inc();
        let (tx, rx) = mpsc::channel(4);
        let guard = SessionGuard {
            hub: self.clone(),
            session: session.clone(),
        };
        let hub = self.clone();
        let id = session.clone();
        tokio::spawn(async move {
            let _guard = guard;
            // The first snapshot counts this stream: wait for a view that covers its open.
            let mut covered = hub.covered.subscribe();
            tokio::select! {
                c = covered.wait_for(|c| *c >= change) => if c.is_err() { return },
                _ = tx.closed() => return,
            }
            if let Some(reason) = hub.stream(&id, &pod, resume, tx, authority).await {
                tracing::info!(pod = %pod.key(), reason, "stream ended by the operator");
                hub.metrics.stream_ended(reason);
            }
        });
        Ok((session, rx))
    }

    /// Whether `session` is open here.
    pub fn has_session(&self, session: &str) -> bool {
        self.sessions().contains_key(session)
    }

    async fn stream(
        &self,
        session: &str,
        pod: &PodIdentity,
        resume: Option<(u64, String)>,
        tx: mpsc::Sender<Bytes>,
        authority: Authority,
    ) -> Option<&'static str> {
        let hello = StreamMessage::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            session: session.to_string(),
            heartbeat_seconds: secs(self.settings.heartbeat),
            report_interval_seconds: secs(self.settings.report_interval),
        });
        if !send(&tx, &hello).await {
            return None;
        }
        let expires = authority.expires;
        let mut recheck = authority.recheck.map(|(check, every)| {
            let every = every.max(Duration::from_millis(10));
            let first = every.mul_f64(rand::random_range(0.5..=1.0));
            (
                check,
                tokio::time::interval_at(Instant::now() + first, every),
            )
        });
        let (mut revision, mut digest) = resume.unwrap_or((0, String::new()));
        let mut first = true;
        let mut views = self.view.subscribe();
        let mut heartbeat = tokio::time::interval(self.settings.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        heartbeat.reset();
        loop {
            let view = views.borrow_and_update().clone();
            let d = view.digest_for(pod);
            let line = if d != digest {
                let integrations = match view.rendered_for(pod, &d) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot serialize a snapshot");
                        return None;
                    }
                };
                revision = tollgate_crds::distribution::next_revision(revision);
                digest = d;
                self.sent(session, revision, view.changed_at);
                snapshot_line(revision, &digest, &integrations)
            } else if first {
                line(&StreamMessage::Unchanged {
                    revision,
                    digest: digest.clone(),
                })
            } else {
                None
            };
            first = false;
            if let Some(l) = line {
                if tx.send(l).await.is_err() {
                    return None;
                }
                tracing::debug!(pod = %pod.key(), revision, "pushed");
            }
            loop {
                tokio::select! {
                    changed = views.changed() => {
                        if changed.is_err() { return None; }
                        break;
                    }
                    _ = heartbeat.tick() => {
                        if !send(&tx, &StreamMessage::Heartbeat).await { return None; }
                    }
                    _ = tx.closed() => return None,
                    _ = sleep_until_some(expires) => return Some("token_expired"),
                    check = next_check(&mut recheck) => {
                        if let Verdict::End(reason) = check { return Some(reason); }
                    }
                }
            }
        }
    }

    fn sent(&self, session: &str, revision: u64, changed_at: Instant) {
        if let Some(s) = self.sessions().get_mut(session) {
            s.sent.push_back((revision, changed_at));
            let over = s.sent.len().saturating_sub(MAX_PENDING_ACKS);
            s.sent.drain(..over);
            self.metrics.push_failed("unacknowledged", over);
        }
    }

    /// A sidecar applied `revision`. Returns false for an unknown session.
    pub fn ack(&self, session: &str, revision: u64) -> bool {
        let mut sessions = self.sessions();
        let Some(s) = sessions.get_mut(session) else {
            return false;
        };
        if let Some(pos) = s.sent.iter().position(|(r, _)| *r == revision) {
            let (_, at) = s.sent[pos];
            self.metrics.observe_push(at.elapsed());
            s.sent.drain(..=pos);
            // The sidecar applies snapshots in order: those before this one it refused.
            self.metrics.push_failed("refused", pos);
        }
        true
    }

    /// Records a report. Only integrations the pod is subscribed to count: a sidecar cannot
    /// speak for another namespace or workload. Returns false for an unknown session.
    pub fn report(&self, session: &str, report: &Report) -> bool {
        let Some(pod) = self.sessions().get(session).map(|s| s.pod.clone()) else {
            return false;
        };
        let view = self.view();
        let me = pod.key();
        let now = Instant::now();
        for r in &report.integrations {
            let key = (r.namespace.clone(), r.name.clone());
            if view
                .subscribers
                .get(&key)
                .is_some_and(|pods| pods.contains(&me))
                && let Err(e) = self.traffic.record(&me, r, now)
            {
                tracing::info!(pod = %me, integration = %format!("{}/{}", r.namespace, r.name), error = %e, "report refused");
                self.metrics.report_refused(e.metric_label());
            }
        }
        self.metrics.reports.inc();
        true
    }

    fn close(&self, session: &str) {
        let removed = {
            let mut sessions = self.sessions();
            let removed = sessions.remove(session);
            if removed.is_some() {
                self.changed();
            }
            removed
        };
        if let Some(s) = removed {
            self.metrics.connected_sidecars.dec();
            // Pushed, and the stream ended before the sidecar acknowledged them.
            self.metrics.push_failed("unacknowledged", s.sent.len());
        }
    }

    /// Open sessions (for tests and `/readyz`-style introspection).
    pub fn session_count(&self) -> usize {
        self.sessions().len()
    }
}

/// Ends the session when the stream task ends, however it ends.
struct SessionGuard {
    hub: Arc<Hub>,
    session: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.hub.close(&self.session);
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn next_check(recheck: &mut Option<(Recheck, tokio::time::Interval)>) -> Verdict {
    match recheck {
        Some((check, tick)) => {
            tick.tick().await;
            check().await
        }
        None => std::future::pending().await,
    }
}

async fn send(tx: &mpsc::Sender<Bytes>, m: &StreamMessage) -> bool {
    match line(m) {
        Some(l) => tx.send(l).await.is_ok(),
        None => false,
    }
}

/// One NDJSON line.
fn line<T: serde::Serialize>(m: &T) -> Option<Bytes> {
    match serde_json::to_vec(m) {
        Ok(mut l) => {
            l.push(b'\n');
            Some(Bytes::from(l))
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot serialize stream message");
            None
        }
    }
}

/// A [`StreamMessage::Snapshot`] line around integrations already serialized.
fn snapshot_line(revision: u64, digest: &str, integrations: &RawValue) -> Option<Bytes> {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Line<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        protocol: u32,
        revision: u64,
        digest: &'a str,
        integrations: &'a RawValue,
    }
    line(&Line {
        kind: "snapshot",
        protocol: PROTOCOL_VERSION,
        revision,
        digest,
        integrations,
    })
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX).max(1)
}

fn new_session_id() -> String {
    let bytes: [u8; 16] = rand::random();
    hex(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Entry;
    use crate::peers::PeerState;
    use crate::traffic::Partial;
    use tollgate_crds::distribution::Snapshot;

    fn global_entry() -> Entry {
        let spec: tollgate_crds::PartnerIntegrationSpec = serde_json::from_value(serde_json::json!({
            "upstream": {"url": "http://partner.internal"},
            "rateLimit": {"scope": "global", "limits": [{"name": "s", "requests": 12, "per": "1s"}]},
        }))
        .unwrap();
        let policy = tollgate_crds::compile("shop", "partner", &spec).unwrap();
        Entry::new(1, spec, policy, None)
    }

    fn peers_with(subscribers: u32) -> Arc<Peers> {
        let mut partials = BTreeMap::new();
        partials.insert(
            ("shop".to_string(), "partner".to_string()),
            Partial {
                subscribers,
                ..Partial::default()
            },
        );
        let mut p = Peers::default();
        p.by_identity
            .insert("op-b".into(), PeerState::from_partials(&partials));
        Arc::new(p)
    }

    async fn next_message(rx: &mut mpsc::Receiver<Bytes>) -> StreamMessage {
        let line = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("a line in time")
            .expect("stream open");
        serde_json::from_slice(&line).expect("a message")
    }

    /// Streams opening together cost one recount of subscribers (O(pods x integrations) under
    /// the sessions lock), not one each; each still starts with a share that counts it.
    #[tokio::test]
    async fn streams_opening_together_are_counted_in_one_recompute() {
        let catalog = CatalogHandle::new();
        catalog.upsert(global_entry());
        let hub = Hub::new(catalog, Arc::new(Metrics::new()), HubSettings::default());
        tokio::spawn(hub.clone().run());
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let before = hub.recomputes();
        let mut streams = Vec::new();
        for i in 0..100 {
            let pod = PodIdentity {
                namespace: "shop".into(),
                name: format!("web-{i}"),
                uid: None,
                labels: BTreeMap::new(),
                token_expiry: None,
            };
            streams.push(hub.open(pod, None).1);
        }
        for rx in &mut streams {
            assert!(matches!(next_message(rx).await, StreamMessage::Hello(_)));
            let StreamMessage::Snapshot(s) = next_message(rx).await else {
                panic!("snapshot expected")
            };
            let share = s.integrations[0].quota_share.clone().unwrap();
            assert_eq!(share.subscribers, 100);
        }
        let recounts = hub.recomputes() - before;
        assert!(recounts <= 3, "{recounts} recomputes for 100 opens");
    }

    fn selecting(name: &str, app: &str) -> Entry {
        let spec: tollgate_crds::PartnerIntegrationSpec =
            serde_json::from_value(serde_json::json!({
                "workloadSelector": {"matchLabels": {"app": app}},
                "upstream": {"url": format!("http://{name}.internal")},
            }))
            .unwrap();
        let policy = tollgate_crds::compile("shop", name, &spec).unwrap();
        Entry::new(1, spec, policy, None)
    }

    /// The serialized content is shared between pods that run the same integrations, and
    /// only between them: a pod never gets another workload's integrations.
    #[tokio::test]
    async fn pods_share_a_rendered_snapshot_only_when_they_run_the_same_integrations() {
        let catalog = CatalogHandle::new();
        catalog.upsert(selecting("pay", "checkout"));
        catalog.upsert(selecting("mail", "newsletter"));
        let hub = Hub::new(catalog, Arc::new(Metrics::new()), HubSettings::default());
        tokio::spawn(hub.clone().run());
        let pod = |name: &str, app: &str| PodIdentity {
            namespace: "shop".into(),
            name: name.into(),
            uid: None,
            labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            token_expiry: None,
        };
        let pods = [
            pod("checkout-1", "checkout"),
            pod("newsletter-1", "newsletter"),
            pod("checkout-2", "checkout"),
        ];
        let mut got = Vec::new();
        for p in &pods {
            let mut rx = hub.open(p.clone(), None).1;
            assert!(matches!(
                next_message(&mut rx).await,
                StreamMessage::Hello(_)
            ));
            let StreamMessage::Snapshot(s) = next_message(&mut rx).await else {
                panic!("snapshot expected")
            };
            got.push((s, rx));
        }
        let names = |s: &Snapshot| -> Vec<String> {
            s.integrations.iter().map(|i| i.name.clone()).collect()
        };
        assert_eq!(names(&got[0].0), ["pay"]);
        assert_eq!(names(&got[1].0), ["mail"]);
        assert_eq!(names(&got[2].0), ["pay"]);
        assert_ne!(got[0].0.digest, got[1].0.digest);
        assert_eq!(got[0].0.digest, got[2].0.digest);
        // The line carries exactly what the typed snapshot would.
        let view = hub.view();
        let (typed, digest) = view.snapshot_for(&pods[1]);
        assert_eq!(digest, got[1].0.digest);
        assert_eq!(typed, got[1].0.integrations);
        assert_eq!(got[1].0.protocol, PROTOCOL_VERSION);
        let d0 = view.digest_for(&pods[0]);
        assert_eq!(d0, view.digest_for(&pods[2]));
        let a = view.rendered_for(&pods[0], &d0).unwrap();
        let b = view.rendered_for(&pods[2], &d0).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "rendered once for both pods");
    }

    #[tokio::test]
    async fn global_share_counts_the_other_replicas_sidecars() {
        let catalog = CatalogHandle::new();
        catalog.upsert(global_entry());
        let (peers_tx, peers_rx) = watch::channel(peers_with(2));
        let hub = Hub::with_peers(
            catalog,
            Arc::new(Metrics::new()),
            HubSettings::default(),
            peers_rx,
        );
        tokio::spawn(hub.clone().run());
        let pod = PodIdentity {
            namespace: "shop".into(),
            name: "web-1".into(),
            uid: None,
            labels: BTreeMap::new(),
            token_expiry: None,
        };
        let (_session, mut rx) = hub.open(pod, None);
        assert!(matches!(
            next_message(&mut rx).await,
            StreamMessage::Hello(_)
        ));
        let StreamMessage::Snapshot(s) = next_message(&mut rx).await else {
            panic!("snapshot expected")
        };
        let share = s.integrations[0].quota_share.clone().unwrap();
        assert_eq!(share.subscribers, 3, "one here, two on the other replica");
        assert_eq!(share.scale(12), 4);

        // The other replica's sidecars leave: this one gets the whole band.
        peers_tx.send_replace(Arc::new(Peers::default()));
        let StreamMessage::Snapshot(s) = next_message(&mut rx).await else {
            panic!("snapshot expected")
        };
        assert_eq!(
            s.integrations[0].quota_share.clone().unwrap().subscribers,
            1
        );
        assert_eq!(s.revision, 2);

        // Status counts them too.
        peers_tx.send_replace(peers_with(4));
        let key = ("shop".to_string(), "partner".to_string());
        let rev = hub.view().catalog.entries[&key].config_revision.clone();
        assert_eq!(hub.observe(&key, &rev).sidecars.desired, 5);
    }

    fn pod(name: &str) -> PodIdentity {
        PodIdentity {
            namespace: "shop".into(),
            name: name.into(),
            uid: None,
            labels: BTreeMap::new(),
            token_expiry: None,
        }
    }

    fn push_failures(metrics: &Metrics, reason: &str) -> u64 {
        metrics
            .push_failures
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: reason.into(),
            })
            .get()
    }

    /// A snapshot the sidecar never acknowledges is a push failure: `refused` when it
    /// acknowledges a later one instead, `unacknowledged` when its stream ends first. An
    /// acknowledged one is not; both reasons are exported at 0 before any failure.
    #[tokio::test]
    async fn snapshots_never_acknowledged_count_as_push_failures() {
        let catalog = CatalogHandle::new();
        catalog.upsert(global_entry());
        let metrics = Arc::new(Metrics::new());
        let text = metrics.encode();
        for reason in crate::metrics::PUSH_FAILURE_REASONS {
            assert!(
                text.contains(&format!(
                    "tollgate_operator_push_failures_total{{reason=\"{reason}\"}} 0"
                )),
                "{text}"
            );
        }
        let (peers_tx, peers_rx) = watch::channel(peers_with(0));
        let hub = Hub::with_peers(catalog, metrics.clone(), HubSettings::default(), peers_rx);
        tokio::spawn(hub.clone().run());
        let (session, mut rx) = hub.open(pod("web-1"), None);
        assert!(matches!(
            next_message(&mut rx).await,
            StreamMessage::Hello(_)
        ));
        let StreamMessage::Snapshot(first) = next_message(&mut rx).await else {
            panic!("snapshot expected")
        };
        assert!(hub.ack(&session, first.revision));
        assert_eq!(push_failures(&metrics, "refused"), 0);

        // Two more (the other replica's sidecars come and go); only the last is acknowledged.
        peers_tx.send_replace(peers_with(2));
        let StreamMessage::Snapshot(second) = next_message(&mut rx).await else {
            panic!("snapshot expected")
        };
        peers_tx.send_replace(peers_with(0));
        let StreamMessage::Snapshot(third) = next_message(&mut rx).await else {
            panic!("snapshot expected")
        };
        assert_eq!(third.revision, second.revision + 1);
        assert!(hub.ack(&session, third.revision));
        assert_eq!(push_failures(&metrics, "refused"), 1);
        assert_eq!(push_failures(&metrics, "unacknowledged"), 0);

        // One more, and the stream ends before its ack.
        peers_tx.send_replace(peers_with(3));
        assert!(matches!(
            next_message(&mut rx).await,
            StreamMessage::Snapshot(_)
        ));
        drop(rx);
        let deadline = Instant::now() + Duration::from_secs(5);
        while hub.has_session(&session) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!hub.has_session(&session));
        assert_eq!(push_failures(&metrics, "unacknowledged"), 1);
        assert_eq!(push_failures(&metrics, "refused"), 1);
    }
}
