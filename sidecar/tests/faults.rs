//! Partners that misbehave at the socket: one that accepts and never answers, one that resets
//! the connection in the middle of the request body, one that answers with a head that is not
//! HTTP. The app gets the contract's answer (api.md, section 3) from the sidecar in every case.
//! Real partner sockets on loopback, the real sidecar binary in `--config` mode.

mod support;

use std::time::Duration;

use http::Method;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_testkit::tcp::{TcpServer, read_head};

/// Bound on a call the sidecar must end by itself; far above every deadline configured here,
/// so only a call that never ends meets it.
const BOUND: Duration = Duration::from_secs(20);

/// What a faulty partner does with each connection it accepts.
#[derive(Clone, Copy)]
enum Fault {
    /// Reads whatever comes and never writes a byte; the connection stays open.
    Silent,
    /// Reads the request head and the first bytes of its body, then resets (RST).
    ResetMidBody,
    /// Answers the request head with bytes that are no HTTP status line.
    MalformedHead,
}

/// A partner on loopback that commits `fault` on every connection; each connection it
/// accepts is one attempt of the sidecar.
struct Faulty;

impl Faulty {
    async fn start(fault: Fault) -> TcpServer {
        TcpServer::start(move |s| serve(s, fault)).await
    }
}

async fn serve(mut s: TcpStream, fault: Fault) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // The request head.
    let Some(end) = read_head(&mut s, &mut buf).await else {
        return;
    };
    match fault {
        Fault::Silent => {
            // Keep reading (and so keep the connection open) until the sidecar gives up.
            while let Ok(n) = s.read(&mut chunk).await {
                if n == 0 {
                    return;
                }
            }
        }
        Fault::ResetMidBody => {
            if buf.len() == end {
                let _ = s.read(&mut chunk).await;
            }
            // Linger zero: closing sends RST, not FIN.
            let _ = s.set_zero_linger();
            drop(s);
        }
        Fault::MalformedHead => {
            let _ = s
                .write_all(b"HTPT/9.9 two hundred OK\r\n\x00\x01garbage\r\n\r\n")
                .await;
            let _ = s.shutdown().await;
        }
    }
}

fn spec(url: &str, rest: &str) -> String {
    manifest("partner", &format!("upstream: {{url: '{url}'}}\n{rest}"))
}

/// One call through the forward proxy, bounded by [`BOUND`].
async fn call(sidecar: &Sidecar, method: Method, url: &str, body: &str) -> Resp {
    tokio::time::timeout(BOUND, sidecar.send(method, url, &[], body))
        .await
        .unwrap_or_else(|_| panic!("no answer to {url} within {BOUND:?}"))
}

/// The answer is the sidecar's own: status, `x-tollgate-reason`, and the JSON error body
/// naming the reason and the integration.
fn assert_answer(got: &Resp, status: u16, reason: &str) {
    assert_eq!(got.status, status, "{got:?}");
    assert_eq!(got.reason(), Some(reason), "{got:?}");
    let body = got.json();
    assert_eq!(body["error"]["reason"], reason, "{body}");
    assert_eq!(body["error"]["integration"], "test/partner", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

// === the faults ===

/// A partner that accepts and never answers: every attempt meets `timeouts.request`, and the
/// app gets `504 timeout` once the attempts are spent.
#[tokio::test]
async fn a_partner_that_never_answers_gets_the_app_a_timeout() {
    let partner = Faulty::start(Fault::Silent).await;
    let sidecar = Sidecar::start(&spec(
        &partner.url(),
        "timeouts: {request: 200ms, total: 5s}\nretries: {maxAttempts: 2, backoff: {base: 10ms, max: 20ms}}",
    ))
    .await;
    let got = call(
        &sidecar,
        Method::GET,
        &format!("{}/v1/charges", partner.url()),
        "",
    )
    .await;
    assert_answer(&got, 504, "timeout");
    assert_eq!(
        partner.accepted(),
        2,
        "a timeout is retried once, then given up"
    );
}

/// The same partner, with `timeouts.total` shorter than the attempts would take: the total
/// deadline ends the second attempt, and the call, with `504 timeout`.
#[tokio::test]
async fn a_partner_that_never_answers_is_cut_at_the_total_deadline() {
    let partner = Faulty::start(Fault::Silent).await;
    let sidecar = Sidecar::start(&spec(
        &partner.url(),
        "timeouts: {request: 250ms, total: 400ms}\nretries: {maxAttempts: 3, backoff: {base: 10ms, max: 20ms}}",
    ))
    .await;
    let got = call(
        &sidecar,
        Method::GET,
        &format!("{}/v1/charges", partner.url()),
        "",
    )
    .await;
    assert_answer(&got, 504, "timeout");
    assert_eq!(
        partner.accepted(),
        2,
        "no third attempt after the total deadline"
    );
}

/// A partner that resets the connection while the request body is still coming: the app gets
/// `502 upstream-unreachable`.
#[tokio::test]
async fn a_partner_that_resets_mid_body_gets_the_app_upstream_unreachable() {
    let partner = Faulty::start(Fault::ResetMidBody).await;
    let sidecar = Sidecar::start(&spec(
        &partner.url(),
        "timeouts: {request: 2s, total: 5s}\nretries: {maxAttempts: 3, backoff: {base: 10ms, max: 20ms}}",
    ))
    .await;
    let body = "x".repeat(256 * 1024);
    let got = call(
        &sidecar,
        Method::POST,
        &format!("{}/v1/charges", partner.url()),
        &body,
    )
    .await;
    assert_answer(&got, 502, "upstream-unreachable");
    assert_eq!(
        partner.accepted(),
        1,
        "a POST without an idempotency key is never retried"
    );
}

/// A partner whose answer is no HTTP: the app gets `502 upstream-unreachable`, never the
/// partner's bytes.
#[tokio::test]
async fn a_partner_that_answers_a_malformed_head_gets_the_app_upstream_unreachable() {
    let partner = Faulty::start(Fault::MalformedHead).await;
    let sidecar = Sidecar::start(&spec(
        &partner.url(),
        "timeouts: {request: 2s, total: 5s}\nretries: {maxAttempts: 2, backoff: {base: 10ms, max: 20ms}}",
    ))
    .await;
    let got = call(
        &sidecar,
        Method::GET,
        &format!("{}/v1/charges", partner.url()),
        "",
    )
    .await;
    assert_answer(&got, 502, "upstream-unreachable");
    assert!(!got.body.contains("garbage"), "{got:?}");
    assert!(partner.accepted() >= 1);
}
