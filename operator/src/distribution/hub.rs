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
use crate::distribution::shares::{self, DelayedRise};
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

/// A pod's share of each global band it runs.
type Shares = BTreeMap<Key, f64>;

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
    /// Integrations with a global band: each subscribed pod's share (see [`shares`]).
    pub shares: BTreeMap<Key, BTreeMap<PodKey, f64>>,
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
            shares: BTreeMap::new(),
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
                    let equal = QuotaShare::equal(
                        u32::try_from(local)
                            .unwrap_or(u32::MAX)
                            .saturating_add(remote),
                    );
                    match self.shares.get(key).and_then(|m| m.get(&pod.key())) {
                        Some(f) => QuotaShare {
                            fraction: *f,
                            ..equal
                        },
                        None => equal,
                    }
                });
                (&**e, share)
            })
    }

    /// `pod`'s share of each integration with a global band it runs.
    fn shares_of(&self, pod: &PodIdentity) -> BTreeMap<Key, f64> {
        self.selected(pod)
            .filter_map(|(e, share)| {
                share.map(|s| ((e.namespace.clone(), e.name.clone()), s.fraction))
            })
            .collect()
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
                digest.update(format!("#{}:{:.4}", s.subscribers, s.fraction).as_bytes());
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
    /// How often global bands are divided again from the latest demand.
    pub rebalance: Duration,
    /// How long a budget taken from the other replicas must hold before it rises: two peer
    /// intervals and a second, so they have seen the change (see [`shares`]).
    pub budget_delay: Duration,
}

impl HubSettings {
    /// The delay for replicas that publish their state every `peer_interval`.
    pub fn budget_delay_for(peer_interval: Duration) -> Duration {
        peer_interval.saturating_mul(2) + Duration::from_secs(1)
    }
}

impl Default for HubSettings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(5),
            report_interval: Duration::from_secs(5),
            rebalance: Duration::from_secs(1),
            budget_delay: Self::budget_delay_for(Duration::from_secs(5)),
        }
    }
}

/// Snapshots awaiting a sidecar's ack, per stream; older ones count as push failures.
const MAX_PENDING_ACKS: usize = 16;

struct Session {
    pod: Arc<PodIdentity>,
    /// Revisions sent, when the change behind each happened and the global-band shares in
    /// each; bounded.
    sent: VecDeque<(u64, Instant, Arc<Shares>)>,
    /// The shares of the last snapshot it acknowledged, and of snapshots left
    /// unacknowledged.
    in_force: BTreeMap<Key, f64>,
    /// What it may be running from before it connected (a snapshot held across a restart or a
    /// reconnect), until it acknowledges one of ours.
    assumed: BTreeMap<Key, f64>,
}

impl Session {
    /// The most of each share this sidecar may be running now.
    fn held(&self) -> impl Iterator<Item = (&Key, f64)> {
        self.in_force
            .iter()
            .chain(&self.assumed)
            .map(|(k, v)| (k, *v))
            .chain(
                self.sent
                    .iter()
                    .flat_map(|(_, _, s)| s.iter().map(|(k, v)| (k, *v))),
            )
    }

    fn held_map(&self) -> BTreeMap<Key, f64> {
        let mut out = BTreeMap::new();
        for (k, v) in self.held() {
            let e = out.entry(k.clone()).or_insert(0.0);
            *e = f64::max(*e, v);
        }
        out
    }
}

/// The shares of a sidecar whose stream ended, reserved until its lease runs out.
struct Departed {
    until: Instant,
    held: BTreeMap<Key, f64>,
}

/// What the division of global bands remembers between recounts.
#[derive(Default)]
struct Book {
    departed: HashMap<PodKey, Departed>,
    budgets: HashMap<Key, DelayedRise>,
    /// Per integration with a global band, as of the last recount: this replica's need and
    /// what its sidecars may hold, for the other replicas.
    ledger: BTreeMap<Key, (f64, f64)>,
}

/// Every stream this replica serves.
pub struct Hub {
    catalog: CatalogHandle,
    sessions: Mutex<HashMap<String, Session>>,
    /// Locked after `sessions`, never before.
    book: Mutex<Book>,
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
            book: Mutex::default(),
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
        let mut rebalance = tokio::time::interval(self.settings.rebalance);
        rebalance.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let changed_at = catalog.borrow_and_update().changed_at;
            peers.borrow_and_update();
            self.recompute(sessions_at.take().unwrap_or(changed_at));
            loop {
                tokio::select! {
                    c = catalog.changed() => if c.is_err() { return },
                    p = peers.changed(), if peers_alive => if p.is_err() { peers_alive = false },
                    // Opens, closes and acks: many at once cost one recount.
                    _ = self.dirty.notified() => sessions_at = Some(Instant::now()),
                    // Demand moves without any of those: global bands are divided again.
                    _ = rebalance.tick() => {
                        if !self.view().catalog.entries.values().any(|e| e.has_global_quota()) {
                            continue;
                        }
                        sessions_at = Some(Instant::now());
                    }
                }
                break;
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
                let mut p = self.traffic.partial(&k, &pods, now);
                if let Some((need, held)) = self.book().ledger.get(&k) {
                    p.quota_need = *need;
                    p.quota_held = *held;
                }
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
        let shares = self.divide(&sessions, &catalog, &subscribers, &remote, &peers);
        self.view.send_if_modified(|v| {
            if Arc::ptr_eq(&v.catalog, &catalog)
                && v.subscribers == subscribers
                && v.remote == remote
                && v.shares == shares
            {
                return false;
            }
            let mut view = View::new(catalog, subscribers, remote, changed_at);
            view.shares = shares;
            *v = Arc::new(view);
            true
        });
        self.covered.send_replace(covers);
        drop(sessions);
    }

    /// Divides every global band among the pods subscribed here (see [`shares`]): each pod's
    /// share; the ledger for the other replicas is kept in the book.
    fn divide(
        &self,
        sessions: &HashMap<String, Session>,
        catalog: &Catalog,
        subscribers: &BTreeMap<Key, Vec<PodKey>>,
        remote: &BTreeMap<Key, u32>,
        peers: &Peers,
    ) -> BTreeMap<Key, BTreeMap<PodKey, f64>> {
        let now = Instant::now();
        let mut book = self.book();
        book.departed.retain(|_, d| d.until > now);
        book.budgets.retain(|k, _| catalog.entries.contains_key(k));
        let mut held: HashMap<PodKey, BTreeMap<Key, f64>> = HashMap::new();
        for s in sessions.values() {
            let h = held.entry(s.pod.key()).or_default();
            for (k, v) in s.held() {
                let e = h.entry(k.clone()).or_insert(0.0);
                *e = f64::max(*e, v);
            }
        }
        let current = self.view.borrow().clone();
        let within = self.settings.report_interval * 2 + Duration::from_millis(500);
        let mut shares = BTreeMap::new();
        let mut ledger = BTreeMap::new();
        for (key, e) in &catalog.entries {
            let Some(pods) = subscribers.get(key) else {
                continue;
            };
            if !e.has_global_quota() {
                continue;
            }
            let total = pods.len() + remote.get(key).copied().unwrap_or(0) as usize;
            let rate = e.global_band_rate().unwrap_or(1.0);
            let floor = shares::floor(total);
            let needs: Vec<f64> = pods
                .iter()
                .map(|p| shares::need(self.traffic.demand(key, p, now, within), rate, floor))
                .collect();
            let departed: f64 = book
                .departed
                .iter()
                .filter(|(p, _)| !held.contains_key(*p))
                .filter_map(|(_, d)| d.held.get(key))
                .sum();
            let own_need = needs.iter().sum::<f64>() + departed;
            let own_held = book.ledger.get(key).map_or(0.0, |l| l.1);
            let others = peers.partial(key);
            let delay = self.settings.budget_delay;
            // The part by need rises only after the delay (the others have seen the needs
            // behind it); what the others hold limits it as it is now.
            let part = book
                .budgets
                .entry(key.clone())
                .or_insert_with(|| DelayedRise::new(delay))
                .offer(
                    // A replica that publishes no need (it predates demand leases) needs the
                    // floor for each of its sidecars.
                    shares::part(
                        own_need,
                        others.quota_need.max(f64::from(others.subscribers) * floor),
                        others.quota_held,
                    ),
                    now,
                );
            let budget = shares::budget(part, own_held, others.quota_held);
            tracing::debug!(
                integration = %format!("{}/{}", key.0, key.1),
                budget,
                own_need,
                others_need = others.quota_need,
                others_held = others.quota_held,
                departed,
                "global band divided"
            );
            let targets = shares::targets((budget - departed).max(0.0), &needs);
            let in_view = current.shares.get(key);
            let input: Vec<shares::Pod> = pods
                .iter()
                .zip(&targets)
                .map(|(p, t)| {
                    let current = in_view.and_then(|m| m.get(p)).copied();
                    // The view being pushed may still reach it.
                    let h = held
                        .get(p)
                        .and_then(|h| h.get(key))
                        .copied()
                        .unwrap_or(0.0)
                        .max(current.unwrap_or(0.0));
                    // Whatever it may be running it may be given again: that adds nothing.
                    shares::Pod {
                        target: *t,
                        current,
                        held: h,
                        entitled: h,
                    }
                })
                .collect();
            let grants = shares::grants(budget, departed, &input);
            let holding = input
                .iter()
                .zip(&grants)
                .map(|(p, g)| p.held.max(*g))
                .sum::<f64>()
                + departed;
            ledger.insert(key.clone(), (own_need, holding));
            shares.insert(key.clone(), pods.iter().cloned().zip(grants).collect());
        }
        book.ledger = ledger;
        shares
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
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
            // A sidecar that resumes holds a snapshot, and may run its shares; a new one runs
            // nothing yet.
            let assumed = if resume.is_some() {
                self.assumed_in_force(&pod, &key)
            } else {
                BTreeMap::new()
            };
            sessions.insert(
                session.clone(),
                Session {
                    pod: pod.clone(),
                    sent: VecDeque::new(),
                    in_force: BTreeMap::new(),
                    assumed,
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

    /// What a sidecar that resumes may be running (call with the sessions lock held): its
    /// shares from before, if its earlier stream ended here within its lease; else what a
    /// sidecar cut off keeps, `1 / subscribers` of each global band.
    fn assumed_in_force(&self, pod: &PodIdentity, key: &PodKey) -> BTreeMap<Key, f64> {
        let mut book = self.book();
        if let Some(d) = book.departed.remove(key) {
            return d.held;
        }
        let view = self.view();
        view.selected(pod)
            .filter_map(|(e, share)| {
                share.map(|s| {
                    let n = s.subscribers.saturating_add(1).max(1);
                    ((e.namespace.clone(), e.name.clone()), 1.0 / f64::from(n))
                })
            })
            .collect()
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
                let next = tollgate_crds::distribution::next_revision(revision);
                // Only the view in force is sent: the shares it holds are the ones counted.
                if !self.sent(session, next, &view, pod) {
                    continue;
                }
                revision = next;
                digest = d;
                snapshot_line(revision, &digest, &integrations)
            } else if first {
                // The sidecar resumes with this content: it runs these shares.
                self.resumed(session, &view, pod);
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

    /// Records `revision` of `view` as sent, unless a newer view was published meanwhile
    /// (then returns false: send that one instead).
    fn sent(&self, session: &str, revision: u64, view: &Arc<View>, pod: &PodIdentity) -> bool {
        let mut sessions = self.sessions();
        // Views are published under the sessions lock: this one is current or it is not.
        if !Arc::ptr_eq(&self.view.borrow(), view) {
            return false;
        }
        if let Some(s) = sessions.get_mut(session) {
            s.sent
                .push_back((revision, view.changed_at, Arc::new(view.shares_of(pod))));
            let over = s.sent.len().saturating_sub(MAX_PENDING_ACKS);
            // Never acknowledged, perhaps applied: still held.
            for (_, _, shares) in s.sent.drain(..over).collect::<Vec<_>>() {
                raise(&mut s.in_force, &shares);
            }
            self.metrics.push_failed("unacknowledged", over);
        }
        true
    }

    fn resumed(&self, session: &str, view: &View, pod: &PodIdentity) {
        if let Some(s) = self.sessions().get_mut(session) {
            raise(&mut s.in_force, &view.shares_of(pod));
        }
    }

    /// A sidecar applied `revision`. Returns false for an unknown session.
    pub fn ack(&self, session: &str, revision: u64) -> bool {
        let mut sessions = self.sessions();
        let Some(s) = sessions.get_mut(session) else {
            return false;
        };
        if let Some(pos) = s.sent.iter().position(|(r, _, _)| *r == revision) {
            let (_, at, ref shares) = s.sent[pos];
            self.metrics.observe_push(at.elapsed());
            let changed = s.in_force != **shares || !s.assumed.is_empty();
            s.in_force = (**shares).clone();
            s.assumed.clear();
            s.sent.drain(..=pos);
            // The sidecar applies snapshots in order: those before this one it refused.
            self.metrics.push_failed("refused", pos);
            if changed {
                // An increase may have been waiting for this.
                self.dirty.notify_one();
            }
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
            if let Some(s) = &removed {
                // Its shares stay reserved for its lease: the sidecar may still run them.
                let key = s.pod.key();
                if !sessions.values().any(|o| o.pod.key() == key) {
                    let mut book = self.book();
                    let d = book.departed.entry(key).or_insert_with(|| Departed {
                        until: Instant::now(),
                        held: BTreeMap::new(),
                    });
                    d.until = Instant::now() + shares::lease(self.settings.heartbeat);
                    raise(&mut d.held, &s.held_map());
                }
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

/// Each share of `more` into `into`, keeping the larger.
fn raise(into: &mut BTreeMap<Key, f64>, more: &BTreeMap<Key, f64>) {
    for (k, v) in more {
        let e = into.entry(k.clone()).or_insert(0.0);
        *e = f64::max(*e, *v);
    }
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
            HubSettings {
                budget_delay: Duration::from_millis(300),
                ..HubSettings::default()
            },
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

        // The other replica's sidecars leave: this one counts alone at once, and gets the
        // whole band once the budget's delay has passed.
        peers_tx.send_replace(Arc::new(Peers::default()));
        let StreamMessage::Snapshot(s) = next_message(&mut rx).await else {
            panic!("snapshot expected")
        };
        let share = s.integrations[0].quota_share.clone().unwrap();
        assert_eq!(share.subscribers, 1);
        assert!(share.fraction < 0.34, "{share:?}");
        assert_eq!(s.revision, 2);
        let StreamMessage::Snapshot(s) = next_message(&mut rx).await else {
            panic!("snapshot expected")
        };
        assert_eq!(s.integrations[0].quota_share.clone().unwrap().fraction, 1.0);

        // Status counts them too.
        peers_tx.send_replace(peers_with(4));
        let key = ("shop".to_string(), "partner".to_string());
        let rev = hub.view().catalog.entries[&key].config_revision.clone();
        assert_eq!(hub.observe(&key, &rev).sidecars.desired, 5);
    }

    /// A sidecar of a paused-clock test: acknowledges every snapshot and publishes the share
    /// it holds.
    fn follow(
        hub: &Arc<Hub>,
        name: &str,
    ) -> (String, watch::Receiver<f64>, tokio::task::JoinHandle<()>) {
        let (session, mut rx) = hub.open(pod(name), None);
        let (tx, share) = watch::channel(0.0);
        let hub = hub.clone();
        let id = session.clone();
        let task = tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                if let Ok(StreamMessage::Snapshot(s)) = serde_json::from_slice(&line) {
                    let f = s.integrations[0]
                        .quota_share
                        .as_ref()
                        .map_or(0.0, |q| q.fraction);
                    tx.send_replace(f);
                    hub.ack(&id, s.revision);
                }
            }
        });
        (session, share, task)
    }

    fn demand_report(calls: u64) -> Report {
        let r = serde_json::json!({
            "namespace": "shop", "name": "partner", "configRevision": "1-x",
            "intervalMillis": 1000, "requests": calls, "errors": 0, "rateLimited": 0,
            "breaker": "closed",
        });
        Report {
            revision: 1,
            integrations: vec![serde_json::from_value(r).unwrap()],
        }
    }

    /// Demand leases on a paused clock: three sidecars asking 90/5/5 of a 100/s band get
    /// 0.9/0.05/0.05, never more than the band together at any push; one whose stream ends
    /// keeps its share reserved for its lease (three heartbeats and a second), then the others
    /// get it.
    #[tokio::test(start_paused = true)]
    async fn shares_follow_demand_and_a_departed_sidecars_lease_is_reclaimed() {
        let catalog = CatalogHandle::new();
        let spec: tollgate_crds::PartnerIntegrationSpec = serde_json::from_value(serde_json::json!({
            "upstream": {"url": "http://partner.internal"},
            "rateLimit": {"scope": "global", "limits": [{"name": "s", "requests": 100, "per": "1s"}]},
        }))
        .unwrap();
        let policy = tollgate_crds::compile("shop", "partner", &spec).unwrap();
        catalog.upsert(Entry::new(1, spec, policy, None));
        let settings = HubSettings {
            heartbeat: Duration::from_secs(5),
            report_interval: Duration::from_secs(1),
            ..HubSettings::default()
        };
        let hub = Hub::new(catalog, Arc::new(Metrics::new()), settings);
        tokio::spawn(hub.clone().run());
        let pods: Vec<(String, watch::Receiver<f64>, tokio::task::JoinHandle<()>)> =
            ["busy", "quiet-1", "quiet-2"]
                .iter()
                .map(|n| follow(&hub, n))
                .collect();
        let demand = [90, 5, 5];
        let mut worst_sum = 0.0f64;
        // `running`: the sidecars that may run their share (the departed one until its lease
        // ends).
        let mut tick = |hub: &Arc<Hub>, live: &[usize], running: &[usize]| {
            for &i in live {
                assert!(hub.report(&pods[i].0, &demand_report(demand[i])));
            }
            let sum: f64 = running.iter().map(|i| *pods[*i].1.borrow()).sum();
            worst_sum = worst_sum.max(sum);
        };
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            tick(&hub, &[0, 1, 2], &[0, 1, 2]);
        }
        let held: Vec<f64> = pods.iter().map(|p| *p.1.borrow()).collect();
        assert!((held[0] - 0.9).abs() < 0.01, "{held:?}");
        assert!(
            (held[1] - 0.05).abs() < 0.01 && (held[2] - 0.05).abs() < 0.01,
            "{held:?}"
        );

        // quiet-2's stream ends; its 0.05 stays reserved for 16 s.
        pods[2].2.abort();
        while hub.has_session(&pods[2].0) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let closed = Instant::now();
        let mut reclaimed = None;
        for _ in 0..25 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let lease_over = closed.elapsed() >= shares::lease(Duration::from_secs(5));
            tick(&hub, &[0, 1], if lease_over { &[0, 1] } else { &[0, 1, 2] });
            let busy = *pods[0].1.borrow();
            if reclaimed.is_none() && busy > 0.92 {
                reclaimed = Some(closed.elapsed());
            }
            // Until then the two live ones never take the reserved part.
            if reclaimed.is_none() {
                assert!(busy + *pods[1].1.borrow() <= 0.95 + 1e-6, "{busy}");
            }
        }
        let reclaimed = reclaimed.expect("the departed share was reclaimed");
        assert!(
            reclaimed >= Duration::from_secs(16) && reclaimed <= Duration::from_secs(18),
            "reclaimed after {reclaimed:?}"
        );
        // 90 and 5 of what is left: 0.947 and 0.053.
        assert!((*pods[0].1.borrow() - 90.0 / 95.0).abs() < 0.01);
        // Each sidecar runs at least the smallest share: three of them at most over.
        assert!(
            worst_sum <= 1.0 + 3.0 * shares::MIN_FRACTION,
            "shares in force added up to {worst_sum}"
        );
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
