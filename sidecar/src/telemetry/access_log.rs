//! The access log (`spec.telemetry.accessLog`): one JSON line per finished call on stdout.
//!
//! A line carries what identifies the call and how it ended, never a header or a body; the
//! path is logged without its query (which may carry tokens), cut at [`MAX_PATH_BYTES`].
//! Lines go through a bounded queue to one writer thread, so a slow reader of stdout never
//! stalls a call: when the queue is full the line is dropped and counted
//! (`tollgate_access_log_dropped_total`).

use std::io::Write;
use std::sync::OnceLock;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use serde::Serialize;

use crate::telemetry::metrics::Metrics;

/// Longest path logged; a longer one is cut at a character boundary.
pub(crate) const MAX_PATH_BYTES: usize = 1024;
/// Lines waiting for the writer.
const QUEUE: usize = 4096;

/// What is known of a call when it starts.
#[derive(Debug, Clone)]
pub(crate) struct Start {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) trace_id: Option<String>,
}

impl Start {
    pub(crate) fn new(method: &http::Method, uri: &http::Uri, trace_id: Option<String>) -> Self {
        Start {
            method: method.as_str().to_string(),
            path: cut(uri.path(), MAX_PATH_BYTES).to_string(),
            trace_id,
        }
    }
}

/// One line.
#[derive(Debug, Serialize)]
pub(crate) struct Line<'a> {
    pub(crate) integration: &'a str,
    pub(crate) route: &'a str,
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    pub(crate) status: u16,
    pub(crate) attempts: u32,
    pub(crate) duration_ms: f64,
    pub(crate) outcome: &'a str,
    pub(crate) trace_id: Option<&'a str>,
}

/// Queues a line for stdout.
pub(crate) fn write(line: &Line<'_>, metrics: &Metrics) {
    let Ok(mut bytes) = serde_json::to_vec(line) else {
        return;
    };
    bytes.push(b'\n');
    match writer().try_send(bytes) {
        Ok(()) => {}
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            metrics.access_log_dropped.inc();
        }
    }
}

fn writer() -> &'static SyncSender<Vec<u8>> {
    static TX: OnceLock<SyncSender<Vec<u8>>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let stdout = std::io::stdout();
                while let Ok(line) = rx.recv() {
                    let mut out = stdout.lock();
                    if out.write_all(&line).and_then(|()| out.flush()).is_err() {
                        // stdout is gone: nothing more can be written.
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "the access log writer could not start; lines are dropped");
        }
        tx
    })
}

/// The trace id of a W3C `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex>`), if well formed
/// and not all zeros.
pub(crate) fn traceparent_trace_id(v: &str) -> Option<String> {
    let mut parts = v.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0'))
    .then(|| trace.to_string())
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_ids() {
        assert_eq!(
            traceparent_trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f35-00f067aa0ba902b7-01",
            "garbage",
            "",
        ] {
            assert_eq!(traceparent_trace_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn paths_are_cut_without_their_query() {
        let uri: http::Uri = "/v1/charges?api_key=secret".parse().unwrap();
        let s = Start::new(&http::Method::GET, &uri, None);
        assert_eq!(s.path, "/v1/charges");
        let long = format!("/{}", "é".repeat(1000));
        assert!(cut(&long, MAX_PATH_BYTES).len() <= MAX_PATH_BYTES);
    }
}
