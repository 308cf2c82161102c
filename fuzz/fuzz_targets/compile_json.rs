//! A spec as the API server hands it over (JSON), compiled; a valid spec compiles again to
//! the same result after a JSON round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_crds::PartnerIntegrationSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<PartnerIntegrationSpec>(data) else {
        return;
    };
    match tollgate_crds::compile("ns", "pi", &spec) {
        Ok(_) => {
            let json = serde_json::to_vec(&spec).expect("serializes");
            let back: PartnerIntegrationSpec =
                serde_json::from_slice(&json).expect("a spec reads back");
            assert!(
                tollgate_crds::compile("ns", "pi", &back).is_ok(),
                "a valid spec stays valid after a round trip"
            );
        }
        Err(e) => {
            assert!(!e.to_string().is_empty(), "an error names what is wrong");
        }
    }
});
