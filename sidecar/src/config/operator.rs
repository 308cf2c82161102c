//! Cluster mode: revisions come from the operator's snapshots (see [`crate::cluster`]).
//!
//! A snapshot is compiled with the same step as a file and swapped in whole; one that does not
//! compile is refused and the previous revision stays. Each global quota is scaled to this
//! pod's share. Reports are the traffic counted since the previous report.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tollgate_crds::distribution::{BreakerState, IntegrationReport, Snapshot, bucket_quantile};
use tollgate_crds::policy::IntegrationId;
use tollgate_crds::v1alpha1::SecretKeyRef;

use super::{SecretSource, Source, Store, build_revision};
use crate::state::StateContext;
use crate::telemetry::metrics::Metrics;

/// Credentials carried by a snapshot, by integration.
struct SnapshotSecrets<'a> {
    snapshot: &'a Snapshot,
}

impl SecretSource for SnapshotSecrets<'_> {
    fn get(&self, namespace: &str, secret: &SecretKeyRef) -> Option<String> {
        self.snapshot
            .integrations
            .iter()
            .find(|i| {
                i.namespace == namespace
                    && i.spec
                        .credentials
                        .as_ref()
                        .is_some_and(|c| &c.secret_ref == secret)
            })
            .and_then(|i| i.credential.as_ref())
            .map(|v| v.expose().to_string())
    }
}

/// Counters as last reported, to send deltas.
#[derive(Default, Clone)]
struct Reported {
    requests: u64,
    errors: u64,
    rate_limited: u64,
    latency: Vec<u64>,
    at: Option<Instant>,
}

pub struct OperatorSource {
    pub url: String,
    pub store: Arc<Store>,
    pub ctx: StateContext,
    pub metrics: Arc<Metrics>,
    /// Config revision per integration, from the snapshot in force.
    revisions: Mutex<HashMap<IntegrationId, String>>,
    reported: Mutex<HashMap<IntegrationId, Reported>>,
}

impl OperatorSource {
    pub fn new(url: String, store: Arc<Store>, ctx: StateContext, metrics: Arc<Metrics>) -> Self {
        OperatorSource {
            url,
            store,
            ctx,
            metrics,
            revisions: Mutex::default(),
            reported: Mutex::default(),
        }
    }

    /// Compiles and publishes a snapshot; `Err` names what is wrong and nothing changes.
    pub fn apply(&self, snapshot: &Snapshot) -> Result<(), String> {
        let mut policies = Vec::with_capacity(snapshot.integrations.len());
        let mut shares = HashMap::new();
        let mut revisions = HashMap::new();
        for i in &snapshot.integrations {
            let policy = tollgate_crds::compile(&i.namespace, &i.name, &i.spec)
                .map_err(|e| format!("{}/{}: {e}", i.namespace, i.name))?;
            if let Some(share) = &i.quota_share {
                shares.insert(policy.id.clone(), share.fraction);
            }
            revisions.insert(policy.id.clone(), i.config_revision.clone());
            policies.push(policy);
        }
        // Shares are read while building state, so they are set first.
        *self.ctx.shares.write().unwrap_or_else(|e| e.into_inner()) = shares;
        let id = format!(
            "{}-{}",
            snapshot.revision,
            &snapshot.digest[..snapshot.digest.len().min(12)]
        );
        let previous = self.store.load_full();
        let revision = build_revision(
            id.clone(),
            Source::Operator(self.url.clone()),
            policies,
            &SnapshotSecrets { snapshot },
            &previous,
            &self.ctx,
        )
        .map_err(|e| {
            self.metrics.config_error();
            e.to_string()
        })?;
        self.store.publish(revision);
        *self.revisions.lock().unwrap_or_else(|e| e.into_inner()) = revisions;
        self.metrics.set_revision(&id, "operator");
        tracing::info!(revision = %id, integrations = snapshot.integrations.len(), "operator revision applied");
        Ok(())
    }

    /// Traffic of every integration in force since the previous call.
    pub fn report(&self) -> Vec<IntegrationReport> {
        let rev = self.store.load_full();
        let revisions = self
            .revisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let mut out = Vec::with_capacity(rev.integrations.len());
        for i in &rev.integrations {
            let t = &i.state.traffic;
            let current = Reported {
                requests: t.requests.load(Ordering::Relaxed),
                errors: t.errors.load(Ordering::Relaxed),
                rate_limited: t.rate_limited.load(Ordering::Relaxed),
                latency: t
                    .latency
                    .iter()
                    .map(|b| b.load(Ordering::Relaxed))
                    .collect(),
                at: Some(now),
            };
            let last = reported.get(&i.policy.id).cloned().unwrap_or_default();
            let delta: Vec<u64> = current
                .latency
                .iter()
                .enumerate()
                .map(|(k, v)| v.saturating_sub(last.latency.get(k).copied().unwrap_or(0)))
                .collect();
            let breaker = i
                .state
                .breaker_states(&i.policy, now)
                .into_iter()
                .map(|(_, s)| s)
                .max()
                .map_or(BreakerState::Closed, |s| match s {
                    2 => BreakerState::Open,
                    1 => BreakerState::HalfOpen,
                    _ => BreakerState::Closed,
                });
            out.push(IntegrationReport {
                namespace: i.policy.id.namespace.clone(),
                name: i.policy.id.name.clone(),
                config_revision: revisions.get(&i.policy.id).cloned().unwrap_or_default(),
                interval_millis: last.at.map_or(0, |at| (now - at).as_millis() as u64),
                requests: current.requests.saturating_sub(last.requests),
                errors: current.errors.saturating_sub(last.errors),
                rate_limited: current.rate_limited.saturating_sub(last.rate_limited),
                latency_p95_millis: bucket_quantile(&delta, 0.95),
                latency_buckets: delta,
                breaker,
            });
            reported.insert(i.policy.id.clone(), current);
        }
        out
    }
}
