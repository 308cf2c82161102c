//! `--config FILE`: a YAML stream of PartnerIntegration manifests, parsed and compiled.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_crds::manifest::parse_stream;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(items) = parse_stream(text, "default") {
        for pi in &items {
            let ns = pi.metadata.namespace.as_deref().unwrap_or("default");
            let name = pi.metadata.name.as_deref().unwrap_or("");
            if let Err(e) = tollgate_crds::compile(ns, name, &pi.spec) {
                let _ = e.to_string();
            }
        }
    }
});
