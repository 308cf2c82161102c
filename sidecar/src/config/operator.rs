//! Cluster mode: revisions come from the operator's snapshots (see [`crate::cluster`]).
//!
//! A snapshot is compiled with the same step as a file and swapped in whole. Each integration
//! stands alone: one that does not compile or claims a host another holds is refused (logged,
//! shown in `/config` and `tollgate_config_refused`), its previous version stays in force if it
//! had one, and the rest of the snapshot applies, kill switches included. Each global quota is
//! scaled to this pod's share. Reports are the traffic counted since the previous report.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tollgate_crds::distribution::{
    ContractViolationCount, CredentialKeys, IntegrationReport, MAX_CONTRACT_VIOLATION_ENTRIES,
    Snapshot, bucket_quantile,
};
use tollgate_crds::policy::IntegrationId;
use tollgate_crds::v1alpha1::SecretKeyRef;

use super::{Candidate, SecretSource, Source, Store, build_revision};
use crate::engine::breaker::gauge;
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
            .or_else(|| {
                self.snapshot
                    .integrations
                    .iter()
                    .filter(|i| i.namespace == namespace)
                    .flat_map(|i| &i.more_credentials)
                    .find(|k| k.name == secret.name && k.key == secret.key)
                    .map(|k| &k.value)
            })
            .map(|v| v.expose().to_string())
    }

    fn tls(&self, namespace: &str, secret_name: &str) -> Option<(String, String)> {
        self.snapshot
            .integrations
            .iter()
            .filter(|i| {
                i.namespace == namespace
                    && i.spec
                        .upstream
                        .client_certificate
                        .as_ref()
                        .is_some_and(|c| c.secret_name == secret_name)
            })
            .find_map(|i| i.client_certificate.as_ref())
            .map(|c| (c.certificate.clone(), c.key.expose().to_string()))
    }
}

/// Counters as last reported, to send deltas.
#[derive(Default, Clone)]
struct Reported {
    requests: u64,
    errors: u64,
    rate_limited: u64,
    refused: u64,
    latency: Vec<u64>,
    /// Contract violations since start, by (route, kind).
    contract: BTreeMap<(String, String), u64>,
    primary_served: u64,
    secondary_served: u64,
    refresh_failures: u64,
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

    /// Compiles and publishes a snapshot, integration by integration (see the module docs).
    /// Never refuses the snapshot as a whole: a kill switch in it always applies.
    pub fn apply(&self, snapshot: &Snapshot) -> Result<(), String> {
        let mut candidates = Vec::with_capacity(snapshot.integrations.len());
        let mut shares = HashMap::new();
        let mut revisions = HashMap::new();
        for i in &snapshot.integrations {
            let id = IntegrationId {
                namespace: i.namespace.clone(),
                name: i.name.clone(),
            };
            if let Some(share) = &i.quota_share
                && share.fraction.is_finite()
                && share.fraction > 0.0
            {
                shares.insert(id.clone(), share.fraction.min(1.0));
            }
            revisions.insert(id.clone(), i.config_revision.clone());
            candidates.push(
                match tollgate_crds::compile_enforceable(&i.namespace, &i.name, &i.spec) {
                    Ok(policy) => Candidate::Compiled(Box::new(policy)),
                    Err(e) => Candidate::Invalid {
                        id,
                        error: e.to_string(),
                    },
                },
            );
        }
        let id = snapshot.short_id();
        let previous = self.store.load_full();
        let revision = build_revision(
            id.clone(),
            Source::Operator(self.url.clone()),
            candidates,
            &SnapshotSecrets { snapshot },
            &previous,
            &self.ctx,
            &shares,
        );
        if !revision.refused.is_empty() {
            self.metrics.config_error();
        }
        self.metrics
            .set_refused(revision.refused.iter().map(|r| r.integration.to_string()));
        let mut held = self.revisions.lock().unwrap_or_else(|e| e.into_inner());
        // A refused integration reports the config revision it still runs, if any.
        for r in &revision.refused {
            match held.get(&r.integration) {
                Some(old) if r.kept_previous => {
                    revisions.insert(r.integration.clone(), old.clone());
                }
                _ => {
                    revisions.remove(&r.integration);
                }
            }
        }
        self.store.publish(revision);
        *held = revisions;
        drop(held);
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
                refused: t.refused.load(Ordering::Relaxed),
                latency: t
                    .latency
                    .iter()
                    .map(|b| b.load(Ordering::Relaxed))
                    .collect(),
                contract: self.metrics.contract_totals(&i.label),
                primary_served: t.primary_served.load(Ordering::Relaxed),
                secondary_served: t.secondary_served.load(Ordering::Relaxed),
                refresh_failures: i
                    .token
                    .as_ref()
                    .map_or(0, |m| m.failures.load(Ordering::Relaxed)),
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
                .breaker_states(now)
                .into_iter()
                .map(|(_, s)| s)
                .max_by_key(|s| gauge(*s))
                .unwrap_or_default();
            out.push(IntegrationReport {
                namespace: i.policy.id.namespace.clone(),
                name: i.policy.id.name.clone(),
                config_revision: revisions.get(&i.policy.id).cloned().unwrap_or_default(),
                interval_millis: last.at.map_or(0, |at| (now - at).as_millis() as u64),
                requests: current.requests.saturating_sub(last.requests),
                errors: current.errors.saturating_sub(last.errors),
                rate_limited: current.rate_limited.saturating_sub(last.rate_limited),
                refused: current.refused.saturating_sub(last.refused),
                latency_p95_millis: bucket_quantile(&delta, 0.95),
                latency_buckets: delta,
                breaker,
                lifecycle: i.state.lifecycle.routes(),
                contract_violations: current
                    .contract
                    .iter()
                    .filter_map(|((route, kind), n)| {
                        let since = last
                            .contract
                            .get(&(route.clone(), kind.clone()))
                            .copied()
                            .unwrap_or(0);
                        let count = n.saturating_sub(since);
                        (count > 0).then(|| ContractViolationCount {
                            route: route.clone(),
                            kind: kind.clone(),
                            count,
                        })
                    })
                    .take(MAX_CONTRACT_VIOLATION_ENTRIES)
                    .collect(),
                credential_keys: i
                    .policy
                    .credentials
                    .as_ref()
                    .and_then(|c| c.secondary_ref.as_ref())
                    .map(|_| CredentialKeys {
                        primary: current.primary_served.saturating_sub(last.primary_served),
                        secondary: current
                            .secondary_served
                            .saturating_sub(last.secondary_served),
                        secondary_last_used: Some(t.secondary_last_used.load(Ordering::Relaxed))
                            .filter(|s| *s > 0),
                    }),
                credential_refresh_failures: current
                    .refresh_failures
                    .saturating_sub(last.refresh_failures),
                credential_check: i.state.check.result(),
                adaptive_percent: i.state.adaptive_percent(now),
            });
            reported.insert(i.policy.id.clone(), current);
        }
        out
    }
}
