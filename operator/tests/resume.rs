//! A sidecar's `revision=` on resume comes from outside: whatever it says, the operator's
//! stream keeps counting without overflow.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tollgate_crds::distribution::{PROTOCOL_VERSION, Snapshot};
use tollgate_operator::catalog::{CatalogHandle, Entry};
use tollgate_operator::distribution::HubSettings;
use tollgate_sidecar::cluster::{ClusterClient, save_snapshot};

use support::{OperatorProcess, fixture, free_addr};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_the_largest_revision_gets_a_fresh_count_not_a_dead_stream() {
    let (dir, certs, api) = fixture();
    let token = api.add_pod("payments", "checkout-1", &[("app", "checkout")]);
    let catalog = CatalogHandle::new();
    let spec: tollgate_crds::PartnerIntegrationSpec =
        serde_json::from_value(json!({"upstream": {"url": "https://api.stripe.com"}})).unwrap();
    let policy = tollgate_crds::compile("payments", "stripe", &spec).unwrap();
    catalog.upsert(Entry::new(1, spec, policy, None));
    let addr = free_addr();
    let settings = HubSettings {
        heartbeat: Duration::from_secs(1),
        report_interval: Duration::from_secs(1),
        ..HubSettings::default()
    };
    let _op = OperatorProcess::start(addr, &certs, &api, catalog, settings);

    // The sidecar holds (and so resumes from) the largest revision a u64 can say.
    let state = dir.path().join("snapshot.json");
    save_snapshot(
        &state,
        &Snapshot {
            protocol: PROTOCOL_VERSION,
            revision: u64::MAX,
            digest: "stale".into(),
            integrations: Vec::new(),
        },
    )
    .unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token).unwrap();
    let config = support::cluster_config(
        addr,
        certs.ca_file.clone(),
        token_file,
        "payments",
        "checkout-1",
        &state,
    );
    let (tx, mut rx) = mpsc::unbounded_channel();
    let client = ClusterClient::new(
        config,
        Arc::new(move |s: &Snapshot| {
            let _ = tx.send(s.clone());
            Ok(())
        }),
        Arc::new(Vec::new),
    );
    let task = tokio::spawn(client.run());
    let mut revisions = Vec::new();
    while revisions.len() < 2 {
        let s = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no snapshot after {revisions:?}"))
            .unwrap();
        revisions.push((s.revision, s.integrations.len()));
    }
    task.abort();
    assert_eq!(
        revisions,
        [(u64::MAX, 0), (1, 1)],
        "the persisted snapshot, then the operator's from a fresh count"
    );
}
