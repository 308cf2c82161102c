//! Partners' `Deprecation`, `Sunset` and `Link` headers (`sidecar::lifecycle`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_crds::distribution::MAX_LIFECYCLE_TEXT_BYTES;
use tollgate_sidecar::lifecycle;

fuzz_target!(|data: &[u8]| {
    let _ = lifecycle::parse_deprecation(data);
    let _ = lifecycle::parse_sunset(data);
    let links = lifecycle::parse_link(data);
    for t in [links.deprecation, links.sunset].into_iter().flatten() {
        assert!(t.len() <= MAX_LIFECYCLE_TEXT_BYTES, "{t:?}");
        assert!(t.bytes().all(|b| b.is_ascii_graphic()), "{t:?}");
    }
    // The same bytes as each header of one response.
    if let Ok(v) = http::HeaderValue::from_bytes(data) {
        let mut h = http::HeaderMap::new();
        h.insert("deprecation", v.clone());
        h.insert("sunset", v.clone());
        h.insert(http::header::LINK, v);
        if let Some(a) = lifecycle::announcement(&h) {
            assert!(a.deprecated || a.sunset_timestamp.is_some());
        }
    }
});
