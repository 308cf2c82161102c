//! The ClientHello / SNI reader of intercepted TLS connections.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_sidecar::transparent::tls::{Hello, client_hello, looks_like_tls};

fuzz_target!(|data: &[u8]| {
    // Half the inputs are forced into the shape of a handshake record so the fuzzer spends its
    // time inside the hello rather than on the first byte.
    let mut owned;
    let buf = if data.first().is_some_and(|b| b & 1 == 1) {
        owned = vec![0x16, 0x03, 0x01];
        owned.extend_from_slice(&data[1..]);
        &owned[..]
    } else {
        data
    };
    let _ = looks_like_tls(buf);
    if let Hello::Complete { sni: Some(name) } = client_hello(buf) {
        assert!(!name.is_empty(), "an empty server name is no name");
        assert!(
            name.bytes().all(|b| b.is_ascii_graphic()),
            "a server name used as a host must be printable ASCII: {name:?}"
        );
    }
});
