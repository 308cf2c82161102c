//! What the operator parses from sidecars: an `Ack` or a `Report` body, then the traffic store
//! that turns reports into status (sums, rates, p95 from buckets).
#![no_main]

use std::time::Duration;

use tokio::time::Instant;

use libfuzzer_sys::fuzz_target;
use tollgate_crds::distribution::{Ack, Report, bucket_quantile};
use tollgate_operator::traffic::TrafficStore;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<Ack>(data);
    let Ok(report) = serde_json::from_slice::<Report>(data) else {
        return;
    };
    let store = TrafficStore::new(Duration::from_secs(300), Duration::from_secs(60));
    let now = Instant::now();
    for (i, r) in report.integrations.iter().enumerate() {
        let _ = bucket_quantile(&r.latency_buckets, 0.95);
        // The same report from two pods, twice: the store adds them up.
        let _ = store.record("pod-a", r, now);
        let _ = store.record("pod-b", r, now);
        let _ = store.record("pod-a", r, now + Duration::from_secs(i as u64 + 1));
    }
    let pods = vec!["pod-a".to_string(), "pod-b".to_string()];
    for key in store.keys() {
        let mut p = store.partial(&key, &pods, now + Duration::from_secs(2));
        let q = p.clone();
        p.merge(&q);
        let _ = p.finish("rev");
    }
});
