//! Go durations (`crds::duration`) and `Retry-After` (`sidecar::engine::retry_after`).
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use tollgate_crds::duration;
use tollgate_sidecar::engine::retry_after;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(d) = duration::parse(text) {
        let printed = duration::format(d);
        assert_eq!(
            duration::parse(&printed),
            Some(d),
            "{text:?} parsed as {d:?}, printed as {printed:?}"
        );
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
    let _ = retry_after::parse(text, now);
    let _ = retry_after::parse(text, SystemTime::UNIX_EPOCH);
    if let Ok(v) = http::HeaderValue::from_str(text) {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::RETRY_AFTER, v);
        let _ = retry_after::from_headers(&h, now);
    }
});
