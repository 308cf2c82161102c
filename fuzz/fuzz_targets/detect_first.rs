//! The transparent listener's first-bytes sniffer: HTTP head (and the host it names), TLS
//! ClientHello, or opaque. Any prefix of any stream gets an answer, and a longer prefix never
//! turns a complete verdict back into "need more".
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_sidecar::transparent::detect::{First, detect};

fuzz_target!(|data: &[u8]| {
    let full = detect(data, 4096, false);
    let at_eof = detect(data, 4096, true);
    assert_ne!(
        at_eof,
        First::NeedMore,
        "a closed connection must get a verdict"
    );
    if let First::Http { host: Some(h) } = &full {
        assert_eq!(h.host, h.host.to_ascii_lowercase(), "hosts are lower-case");
    }
    // Every prefix, as the bytes arrive.
    for end in [1, data.len() / 3, data.len() / 2] {
        if end > 0 && end < data.len() {
            let _ = detect(&data[..end], 4096, false);
        }
    }
    let _ = detect(data, 16, false);
});
