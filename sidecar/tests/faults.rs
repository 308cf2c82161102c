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

/// The app's call to `/v1/charges` of a partner with `fault`, through a sidecar with `policy`,
/// bounded by [`BOUND`]: the partner (its connections counted) and the answer.
async fn call_faulty(fault: Fault, policy: &str, method: Method, body: &str) -> (TcpServer, Resp) {
    let partner = Faulty::start(fault).await;
    let sidecar = Sidecar::start(&spec(&partner.url(), policy)).await;
    let url = format!("{}/v1/charges", partner.url());
    let got = tokio::time::timeout(BOUND, sidecar.send(method, &url, &[], body))
        .await
        .unwrap_or_else(|_| panic!("no answer to {url} within {BOUND:?}"));
    (partner, got)
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
    let (partner, got) = call_faulty(
        Fault::Silent,
        "timeouts: {request: 200ms, total: 5s}\nretries: {maxAttempts: 2, backoff: {base: 10ms, max: 20ms}}",
        Method::GET,
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
    let (partner, got) = call_faulty(
        Fault::Silent,
        "timeouts: {request: 250ms, total: 400ms}\nretries: {maxAttempts: 3, backoff: {base: 10ms, max: 20ms}}",
        Method::GET,
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
    let body = "x".repeat(256 * 1024);
    let (partner, got) = call_faulty(
        Fault::ResetMidBody,
        "timeouts: {request: 2s, total: 5s}\nretries: {maxAttempts: 3, backoff: {base: 10ms, max: 20ms}}",
        Method::POST,
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
    let (partner, got) = call_faulty(
        Fault::MalformedHead,
        "timeouts: {request: 2s, total: 5s}\nretries: {maxAttempts: 2, backoff: {base: 10ms, max: 20ms}}",
        Method::GET,
        "",
    )
    .await;
    assert_answer(&got, 502, "upstream-unreachable");
    assert!(!got.body.contains("garbage"), "{got:?}");
    assert!(partner.accepted() >= 1);
}

// === SIGTERM under load ===

/// Keep-alive connections the drain test holds, and the rate each carries: 10 x 100 = 1k req/s.
const LANES: usize = 10;
const LANE_PERIOD: Duration = Duration::from_millis(10);

/// What the app saw on one keep-alive connection.
#[derive(Debug, Default)]
struct Lane {
    /// Responses received, all statuses.
    answered: usize,
    /// Responses received after the sidecar was sent SIGTERM.
    after_term: usize,
    /// 5xx responses.
    server_errors: usize,
    /// A call that got no response (reset, closed before the answer, unreadable body).
    failures: Vec<String>,
    /// The last response announced `Connection: close`, and the lane stopped there.
    closed_on_announce: bool,
}

fn announces_close(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.eq_ignore_ascii_case("close")))
}

/// One app connection that calls `url` every [`LANE_PERIOD`] until the sidecar announces the
/// close, a call fails, or `stop` turns true.
async fn lane(
    proxy: std::net::SocketAddr,
    url: String,
    term: tokio::sync::watch::Receiver<bool>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Lane {
    use http_body_util::{BodyExt, Full};
    let mut seen = Lane::default();
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut tick = tokio::time::interval(LANE_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let uri: http::Uri = url.parse().unwrap();
    let host = uri.authority().unwrap().to_string();
    while !*stop.borrow() {
        tick.tick().await;
        let terminated = *term.borrow();
        let req = http::Request::get(uri.clone())
            .header("host", &host)
            .body(Full::new(bytes::Bytes::new()))
            .unwrap();
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                seen.failures.push(format!("no response: {e:?}"));
                return seen;
            }
        };
        let status = resp.status();
        let close = announces_close(resp.headers());
        if let Err(e) = resp.into_body().collect().await {
            seen.failures.push(format!("body cut: {e:?}"));
            return seen;
        }
        seen.answered += 1;
        if terminated || *term.borrow() {
            seen.after_term += 1;
        }
        if status.is_server_error() {
            seen.server_errors += 1;
        }
        if close {
            seen.closed_on_announce = true;
            return seen;
        }
    }
    seen
}

fn sigterm(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM {pid}");
}

/// SIGTERM while the app carries 1k req/s on ten keep-alive connections and one call is in
/// flight: the call in flight finishes; every connection gets its next answer with
/// `Connection: close` and only then closes; no 5xx, no reset; new connections are refused;
/// and the sidecar exits cleanly once the last connection closed, before the drain deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_keep_alive_connections_without_an_error() {
    let partner = support::Partner::start().await;
    partner.script(|_, seen| {
        if seen.path.starts_with("/slow") {
            Reply::Delay(Duration::from_millis(1500), Box::new(Reply::ok("slow")))
        } else {
            Reply::ok("ok")
        }
    });
    let mut sidecar = Sidecar::start_with(
        &spec(&partner.url(), "timeouts: {request: 5s, total: 10s}"),
        Options {
            args: vec!["--drain-timeout".into(), "8s".into()],
            ..Options::default()
        },
    )
    .await;
    let url = format!("{}/v1/charges", partner.url());
    let (term_tx, term_rx) = tokio::sync::watch::channel(false);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let lanes: Vec<_> = (0..LANES)
        .map(|_| {
            tokio::spawn(lane(
                sidecar.listen,
                url.clone(),
                term_rx.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();
    // Load for a while, then a call that is still at the partner when SIGTERM comes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let proxy = sidecar.listen;
    let slow_url = format!("{}/slow", partner.url());
    let slow = tokio::spawn(async move { request(proxy, Method::GET, &slow_url, &[], "").await });
    tollgate_testkit::wait::eventually_async(
        "the slow call reaches the partner",
        BOUND,
        async || {
            anyhow::ensure!(partner.seen().iter().any(|s| s.path == "/slow"));
            Ok(())
        },
    )
    .await;
    let _ = term_tx.send(true);
    sigterm(sidecar.pid());

    // New connections are refused once the sidecar stops accepting.
    let refused = tokio::time::timeout(BOUND, async {
        while TcpStream::connect(proxy).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        refused.is_ok(),
        "new connections still accepted after SIGTERM"
    );

    let slow = tokio::time::timeout(BOUND, slow)
        .await
        .expect("the call in flight ends")
        .unwrap();
    assert_eq!(slow.status, 200, "{slow:?}");
    assert_eq!(slow.body, "slow");
    assert!(announces_close(&slow.headers), "{slow:?}");

    let mut total = 0;
    for (i, l) in lanes.into_iter().enumerate() {
        let l = tokio::time::timeout(BOUND, l)
            .await
            .unwrap_or_else(|_| {
                let _ = stop_tx.send(true);
                panic!("lane {i} never ended: no Connection: close within {BOUND:?}")
            })
            .unwrap();
        assert!(l.failures.is_empty(), "lane {i}: {l:?}");
        assert_eq!(l.server_errors, 0, "lane {i}: {l:?}");
        assert!(
            l.closed_on_announce,
            "lane {i} ended without Connection: close: {l:?}"
        );
        assert!(l.after_term >= 1, "lane {i}: {l:?}");
        total += l.answered;
    }
    // At least a tenth of the offered rate, even on a loaded machine: the load really ran.
    assert!(total > LANES * 20, "the load ran: {total} calls");
    let status = sidecar
        .wait_exit(Duration::from_secs(7))
        .await
        .expect("the sidecar exits before its drain deadline once every connection closed");
    assert!(status.success(), "{status:?}\n{}", sidecar.log_text());
}

// === out of file descriptors ===

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// One GET through the proxy on a fresh connection; an error instead of a panic when the
/// connection is refused or closed.
async fn try_get(proxy: std::net::SocketAddr, url: &str) -> Result<u16, String> {
    use http_body_util::{BodyExt, Full};
    let stream = TcpStream::connect(proxy).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let uri: http::Uri = url.parse().unwrap();
    let req = http::Request::get(uri.clone())
        .header("host", uri.authority().unwrap().as_str())
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(status)
}

/// Whether the peer closed `s` (EOF or reset) without sending anything.
fn closed_by_peer(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    match s.try_read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// The sidecar runs out of file descriptors under a flood of connections: those it cannot take
/// are closed at once (not left hanging in the backlog), counted and logged, without a spin;
/// once the flood lets go, a call succeeds again.
#[tokio::test]
async fn out_of_file_descriptors_new_connections_are_refused_and_the_sidecar_recovers() {
    let partner = support::Partner::start().await;
    let sidecar = Sidecar::start_with(
        &spec(&partner.url(), "timeouts: {request: 2s, total: 5s}"),
        Options {
            // Silent connections stay open for the whole test: only a refusal closes one.
            args: vec!["--header-read-timeout".into(), "10m".into()],
            ..Options::default()
        },
    )
    .await;
    let url = format!("{}/v1/charges", partner.url());
    assert_eq!(try_get(sidecar.listen, &url).await, Ok(200));

    // Room for a few more descriptors only.
    let pid = sidecar.pid();
    let limit = open_fds(pid) + 8;
    let ok = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok, "prlimit");

    const FLOOD: usize = 40;
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        flood.push(TcpStream::connect(sidecar.listen).await.unwrap());
    }
    // Those past the limit are closed by the sidecar, promptly.
    let deadline = tokio::time::Instant::now() + BOUND;
    let refused = loop {
        let n = flood.iter().filter(|s| closed_by_peer(s)).count();
        if n > 0 {
            break n;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no connection refused within {BOUND:?} while out of descriptors ({} open, limit {limit})",
            open_fds(pid)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Still out of descriptors: a new call is refused too, not left hanging.
    let during = tokio::time::timeout(BOUND, try_get(sidecar.listen, &url))
        .await
        .expect("a call while out of descriptors ends at once");
    assert!(during.is_err(), "{during:?}");

    // The flood lets go: the sidecar serves again.
    drop(flood);
    let deadline = tokio::time::Instant::now() + BOUND;
    let mut attempts = 0;
    loop {
        attempts += 1;
        if try_get(sidecar.listen, &url).await == Ok(200) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no recovery within {BOUND:?}; log:\n{}",
            sidecar.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every refusal was a real connection: counted once each, no spin.
    let m = sidecar.metrics().await;
    let counted = metric(&m, "tollgate_rejected_connections_total", &[]);
    let offered = FLOOD + 1 + attempts;
    assert!(
        counted >= (refused + 1) as f64 && counted <= offered as f64,
        "refused {refused} of the flood of {FLOOD} and the call between, counted {counted} of {offered} connections"
    );
    assert!(
        sidecar
            .log_text()
            .contains("out of file descriptors: closing new connections"),
        "{}",
        sidecar.log_text()
    );
}
