//! What a sidecar parses from the operator: one NDJSON line of the subscribe stream (or the
//! persisted snapshot, the same JSON), then the sidecar compiles every integration it carries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_crds::distribution::{Snapshot, StreamMessage};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = serde_json::from_slice::<StreamMessage>(data) {
        if let StreamMessage::Snapshot(s) = &msg {
            for i in &s.integrations {
                let _ = tollgate_crds::compile(&i.namespace, &i.name, &i.spec);
                if let Some(q) = &i.quota_share {
                    let _ = q.scale(u64::MAX);
                    let _ = q.scale(300);
                }
            }
        }
        // What the operator sends must read back the same.
        let again = serde_json::to_vec(&msg).expect("serializes");
        let back: StreamMessage = serde_json::from_slice(&again).expect("reads back");
        let _ = back;
    }
    let _ = serde_json::from_slice::<Snapshot>(data);
});
