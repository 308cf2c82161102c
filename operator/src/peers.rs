//! What the replicas tell each other: which sidecars each serves and what they report.
//!
//! Every replica serves sidecars, but a global quota must be divided among all sidecars of an
//! integration, and the leader's status must count every sidecar. So each replica publishes
//! its [`Partial`]s every `interval` in a Lease of its own (`tollgate-peer-<identity>`,
//! label `tollgate.dev/peer=true`, the state as JSON in annotation
//! `tollgate.dev/distribution`), written by server-side apply; each replica watches the
//! others' Leases. A peer whose Lease has not been renewed for its `leaseDurationSeconds`
//! (judged on the local clock from when the renewal was seen) is gone: its sidecars will
//! reconnect elsewhere.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::catalog::Key;
use crate::controller::FIELD_MANAGER;
use crate::distribution::Hub;
use crate::traffic::Partial;

pub const PEER_LABEL: &str = "tollgate.dev/peer";
pub const STATE_ANNOTATION: &str = "tollgate.dev/distribution";

/// Most bytes of state one Lease carries: annotations may total 256 KiB, with room to spare
/// for the others.
pub const MAX_STATE_BYTES: usize = 200 * 1024;

/// One replica's state, as published.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerState {
    /// By `namespace/name`.
    pub integrations: BTreeMap<String, Partial>,
}

impl PeerState {
    /// The annotation's JSON, at most [`MAX_STATE_BYTES`]: when everything does not fit, the
    /// integrations with the most subscribers (then the most calls) are kept whole and the
    /// rest left out. Returns the JSON and how many were left out.
    pub fn to_annotation(&self) -> (String, usize) {
        let all = serde_json::to_string(self).unwrap_or_default();
        if all.len() <= MAX_STATE_BYTES {
            return (all, 0);
        }
        let mut order: Vec<(&String, &Partial)> = self.integrations.iter().collect();
        order.sort_by(|a, b| {
            (b.1.subscribers, b.1.requests)
                .cmp(&(a.1.subscribers, a.1.requests))
                .then_with(|| a.0.cmp(b.0))
        });
        // `{"integrations":{` + `}}`, then `"key":{...}` and a comma per entry.
        let mut used = r#"{"integrations":{}}"#.len();
        let mut kept = PeerState::default();
        for (k, p) in order {
            let entry = serde_json::to_string(k).unwrap_or_default().len()
                + 2
                + serde_json::to_string(p).unwrap_or_default().len();
            if used + entry > MAX_STATE_BYTES {
                continue;
            }
            used += entry;
            kept.integrations.insert(k.clone(), p.clone());
        }
        let dropped = self.integrations.len() - kept.integrations.len();
        (serde_json::to_string(&kept).unwrap_or_default(), dropped)
    }

    pub fn from_partials(partials: &BTreeMap<Key, Partial>) -> Self {
        Self {
            integrations: partials
                .iter()
                .map(|((ns, name), p)| (format!("{ns}/{name}"), p.clone()))
                .collect(),
        }
    }
}

/// The other live replicas' states.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Peers {
    pub by_identity: BTreeMap<String, PeerState>,
}

impl Peers {
    /// The other replicas' aggregate for `key`.
    pub fn partial(&self, key: &Key) -> Partial {
        let k = format!("{}/{}", key.0, key.1);
        let mut sum = Partial::default();
        for s in self.by_identity.values() {
            if let Some(p) = s.integrations.get(&k) {
                sum.merge(p);
            }
        }
        sum
    }

    /// Sidecars subscribed to `key` on other replicas.
    pub fn subscribers(&self, key: &Key) -> u32 {
        self.partial(key).subscribers
    }
}

/// Where the peer Leases live and who this replica is.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    pub namespace: String,
    pub identity: String,
    pub interval: Duration,
}

/// The Lease name for a replica: `tollgate-peer-<identity>`, made a valid object name.
pub fn lease_name(identity: &str) -> String {
    let mut name: String = identity
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(200);
    let name = name.trim_matches(|c| c == '-' || c == '.');
    format!("tollgate-peer-{name}")
}

/// The Lease this replica applies (its state bounded by [`PeerState::to_annotation`]).
pub fn lease_for(cfg: &PeerConfig, state: &PeerState, now: Timestamp) -> serde_json::Value {
    let seconds = u64::max(cfg.interval.as_secs() * 3, 3);
    let (annotation, dropped) = state.to_annotation();
    if dropped > 0 {
        tracing::warn!(
            dropped,
            max_bytes = MAX_STATE_BYTES,
            "replica state too large for its Lease; the integrations with the fewest sidecars are left out"
        );
    }
    serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": lease_name(&cfg.identity),
            "namespace": cfg.namespace,
            "labels": { PEER_LABEL: "true" },
            "annotations": {
                STATE_ANNOTATION: annotation,
            },
        },
        "spec": {
            "holderIdentity": cfg.identity,
            "leaseDurationSeconds": seconds,
            "renewTime": MicroTime(now),
        },
    })
}

/// Publishes this replica's state every interval until dropped.
pub async fn publish(client: kube::Client, cfg: PeerConfig, hub: Arc<Hub>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let name = lease_name(&cfg.identity);
    let mut tick = tokio::time::interval(cfg.interval);
    loop {
        tick.tick().await;
        let state = PeerState::from_partials(&hub.partials());
        hub.metrics()
            .peer_state_dropped
            .set(i64::try_from(state.to_annotation().1).unwrap_or(i64::MAX));
        let lease = lease_for(&cfg, &state, Timestamp::now());
        if let Err(e) = api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&lease),
            )
            .await
        {
            tracing::warn!(error = %e, lease = %name, "could not publish the replica's state");
        }
    }
}

/// Follows the other replicas' Leases and publishes the live ones' states into `tx`.
pub async fn follow(client: kube::Client, cfg: PeerConfig, tx: watch::Sender<Arc<Peers>>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let (reader, writer) = reflector::store::<Lease>();
    let wc = watcher::Config::default().labels(&format!("{PEER_LABEL}=true"));
    let mut watch = reflector(writer, watcher(api, wc))
        .default_backoff()
        .touched_objects()
        .boxed();
    let mut tick = tokio::time::interval(cfg.interval);
    let mut tracker = Tracker::default();
    let own = lease_name(&cfg.identity);
    loop {
        tokio::select! {
            item = watch.next() => match item {
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::warn!(error = %e, "watching peer leases"),
                None => return,
            },
            _ = tick.tick() => {
                let leases: Vec<Arc<Lease>> = reader
                    .state()
                    .into_iter()
                    .filter(|l| l.metadata.name.as_deref() != Some(own.as_str()))
                    .collect();
                let peers = tracker.live(&leases, Instant::now());
                tx.send_if_modified(|p| {
                    if **p == peers {
                        return false;
                    }
                    *p = Arc::new(peers);
                    true
                });
            }
        }
    }
}

/// When each peer Lease's renewal was first seen here.
#[derive(Default)]
pub struct Tracker {
    seen: HashMap<String, (Option<Timestamp>, Instant)>,
}

impl Tracker {
    /// The states of the Leases renewed within their duration, by holder.
    pub fn live(&mut self, leases: &[Arc<Lease>], now: Instant) -> Peers {
        let mut by_identity = BTreeMap::new();
        let mut names = Vec::new();
        for l in leases {
            let Some(name) = l.metadata.name.clone() else {
                continue;
            };
            names.push(name.clone());
            let spec = l.spec.clone().unwrap_or_default();
            let renew = spec.renew_time.map(|t| t.0);
            let entry = self.seen.entry(name).or_insert((renew, now));
            if entry.0 != renew {
                *entry = (renew, now);
            }
            let duration = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
            );
            if now.saturating_duration_since(entry.1) >= duration {
                continue;
            }
            let state = l
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(STATE_ANNOTATION))
                .and_then(|s| serde_json::from_str::<PeerState>(s).ok())
                .unwrap_or_default();
            let who = spec.holder_identity.unwrap_or_default();
            by_identity.insert(who, state);
        }
        self.seen.retain(|k, _| names.contains(k));
        Peers { by_identity }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(identity: &str, renew: &str, subscribers: u32) -> Arc<Lease> {
        let cfg = PeerConfig {
            namespace: "tollgate-system".into(),
            identity: identity.into(),
            interval: Duration::from_secs(5),
        };
        let mut partials = BTreeMap::new();
        partials.insert(
            ("shop".to_string(), "partner".to_string()),
            Partial {
                subscribers,
                requests: 10,
                ..Partial::default()
            },
        );
        let v = lease_for(
            &cfg,
            &PeerState::from_partials(&partials),
            renew.parse().unwrap(),
        );
        Arc::new(serde_json::from_value(v).unwrap())
    }

    #[test]
    fn lease_names_are_valid_object_names() {
        assert_eq!(lease_name("Operator_0"), "tollgate-peer-operator-0");
        assert_eq!(
            lease_name("tollgate-operator-6d4f9-abcde"),
            "tollgate-peer-tollgate-operator-6d4f9-abcde"
        );
    }

    /// However many integrations a replica serves, its Lease stays within what the API server
    /// accepts (256 KiB of annotations): the busiest integrations are kept whole, and the
    /// state of every one kept reads back as it was.
    #[test]
    fn the_published_state_stays_within_the_annotation_limit() {
        let cfg = PeerConfig {
            namespace: "tollgate-system".into(),
            identity: "op-a".into(),
            interval: Duration::from_secs(5),
        };
        let mut partials = BTreeMap::new();
        for i in 0..3000u32 {
            let mut revisions = BTreeMap::new();
            revisions.insert(format!("{i}-0123456789abcdef0123456789abcdef"), 2);
            partials.insert(
                (format!("namespace-{i:04}"), format!("integration-{i:04}")),
                Partial {
                    subscribers: i,
                    revisions,
                    requests: 1000,
                    errors: 10,
                    requests_per_second: 16.7,
                    latency_buckets: vec![7; 17],
                    reported: true,
                    ..Partial::default()
                },
            );
        }
        let state = PeerState::from_partials(&partials);
        let lease = lease_for(&cfg, &state, "2026-01-01T00:00:00Z".parse().unwrap());
        let text = lease["metadata"]["annotations"][STATE_ANNOTATION]
            .as_str()
            .unwrap();
        assert!(
            text.len() <= MAX_STATE_BYTES,
            "{} bytes for 3000 integrations",
            text.len()
        );
        let back: PeerState = serde_json::from_str(text).unwrap();
        assert!(back.integrations.len() > 500, "{}", back.integrations.len());
        let busiest = "namespace-2999/integration-2999";
        assert_eq!(back.integrations[busiest], state.integrations[busiest]);
        for (k, p) in &back.integrations {
            assert_eq!(p, &state.integrations[k], "{k}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn live_peers_add_up_and_silent_ones_drop_out() {
        let mut t = Tracker::default();
        let key = ("shop".to_string(), "partner".to_string());
        let t0 = Instant::now();
        let a = lease("op-a", "2026-01-01T00:00:00Z", 2);
        let b = lease("op-b", "2026-01-01T00:00:00Z", 3);
        let peers = t.live(&[a.clone(), b.clone()], t0);
        assert_eq!(peers.subscribers(&key), 5);
        assert_eq!(peers.partial(&key).requests, 20);

        // op-a renews, op-b stays silent past its 15 s lease.
        let a2 = lease("op-a", "2026-01-01T00:00:10Z", 2);
        let peers = t.live(&[a2, b], t0 + Duration::from_secs(16));
        assert_eq!(peers.subscribers(&key), 2);
        assert_eq!(peers.by_identity.keys().collect::<Vec<_>>(), vec!["op-a"]);
    }
}
