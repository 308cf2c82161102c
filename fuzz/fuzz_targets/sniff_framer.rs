//! The forward listener's request-head framing guard: any byte stream, fed in any split,
//! follows framing without panicking and keeps its queue of verdicts bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_sidecar::proxy::sniff::{Framer, MAX_PENDING_VERDICTS, Verdicts};

fuzz_target!(|data: &[u8]| {
    // First byte: where the stream is split (reads arrive in arbitrary pieces) and the mode.
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    let verdicts = Verdicts::default();
    let mut framer = Framer::new(1024, verdicts.clone());
    if ctl & 0x80 != 0 {
        framer = framer.following_upgrades();
    }
    framer = framer.with_hook(|req| {
        let _ = tollgate_sidecar::transparent::detect::request_host(req);
    });
    let step = usize::from(ctl & 0x7f).max(1);
    for chunk in stream.chunks(step) {
        framer.feed(chunk);
    }
    let _ = framer.head_too_large();
    let mut taken = 0usize;
    while taken <= MAX_PENDING_VERDICTS {
        let _ = verdicts.next();
        taken += 1;
        if taken > stream.len() {
            break;
        }
    }
});
