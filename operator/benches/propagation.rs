//! Kill-switch propagation: from the revision's creation (catalog update) to the moment each
//! of N subscribed sidecars hands it to its config store (the cluster client's apply
//! callback). Real TLS sockets, HTTP/2, the sidecar's own client; TokenReview and Pods from an
//! in-process fake. Prints p50/p99/max.
//!
//! `cargo bench -p tollgate-operator --bench propagation [-- SIDECARS FLIPS]`

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::mpsc;
use tollgate_crds::distribution::Snapshot;
use tollgate_operator::catalog::{CatalogHandle, Entry};
use tollgate_operator::distribution::HubSettings;
use tollgate_sidecar::cluster::ClusterClient;

fn entry(generation: i64, kill: bool) -> Entry {
    let spec: tollgate_crds::PartnerIntegrationSpec = serde_json::from_value(json!({
        "upstream": {"url": "https://api.stripe.com"},
        "killSwitch": {"enabled": kill, "reason": "bench"},
    }))
    .expect("spec");
    let policy = tollgate_crds::compile("payments", "stripe", &spec).expect("compiles");
    Entry::new(generation, spec, policy, None)
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| !a.starts_with('-'));
    let sidecars: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let flips: i64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = support::certs(dir.path());
    let api = support::FakeApi::default();
    let catalog = CatalogHandle::new();
    catalog.upsert(entry(1, false));
    let addr = support::free_addr();
    let _op = support::OperatorProcess::start(
        addr,
        &certs,
        &api,
        catalog.clone(),
        HubSettings::default(),
    );

    rt.block_on(async {
        let (tx, mut rx) = mpsc::unbounded_channel::<(usize, i64, Instant)>();
        let mut tasks = Vec::new();
        for i in 0..sidecars {
            let pod = format!("checkout-{i}");
            let token = api.add_pod("payments", &pod, &[("app", "checkout")]);
            let token_file = dir.path().join(format!("{pod}.token"));
            std::fs::write(&token_file, token).expect("token file");
            let config = support::cluster_config(
                addr,
                certs.ca_file.clone(),
                token_file,
                "payments",
                &pod,
                dir.path().join(format!("{pod}.json")),
            );
            let tx = tx.clone();
            let client = ClusterClient::new(
                config,
                Arc::new(move |s: &Snapshot| {
                    let generation = s.integrations.first().map_or(0, |i| i.generation);
                    let _ = tx.send((i, generation, Instant::now()));
                    Ok(())
                }),
                Arc::new(Vec::new),
            );
            tasks.push(tokio::spawn(client.run()));
        }
        // Everyone holds generation 1.
        let mut ready = 0;
        while ready < sidecars {
            let (_, g, _) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("subscribed in time")
                .expect("open");
            if g == 1 {
                ready += 1;
            }
        }

        let mut samples = Vec::new();
        for flip in 0..flips {
            let generation = flip + 2;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let t0 = Instant::now();
            catalog.upsert(entry(generation, flip % 2 == 0));
            let mut got = 0;
            while got < sidecars {
                let (_, g, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                    .await
                    .expect("propagated in time")
                    .expect("open");
                if g == generation {
                    got += 1;
                    samples.push(at - t0);
                }
            }
        }
        samples.sort();
        println!(
            "kill-switch propagation, {sidecars} sidecars x {flips} flips ({} samples): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            samples.len(),
            support::percentile(&samples, 0.50).as_secs_f64() * 1e3,
            support::percentile(&samples, 0.99).as_secs_f64() * 1e3,
            samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        );
        for t in tasks {
            t.abort();
        }
    });
}
