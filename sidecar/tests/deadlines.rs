//! Every call ends within `timeouts.total`, its response body included, and what the
//! stale-if-error cache replays stays with whoever fetched it. Real partner servers on loopback,
//! the real sidecar binary, an app client that reads what it is sent.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::otlp::Receiver;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_testkit::tcp::{TcpServer, read_head};

/// Bound on anything the sidecar must finish by itself; far above every deadline here, so only
/// a call that does not end at all meets it.
const BOUND: Duration = Duration::from_secs(10);

// === a partner that stalls its response body ===

/// What the partner does after writing its bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Serve the next request on the connection.
    Next,
    /// Keep the connection open, sending nothing more.
    Stall,
    /// Close the connection.
    Close,
}

/// A partner on loopback that answers request `i` with `script(i)`: the bytes to write, and
/// what to do after them.
struct Staller {
    server: TcpServer,
    requests: Arc<AtomicUsize>,
}

impl Staller {
    async fn start(script: impl Fn(usize) -> (String, Then) + Send + Sync + 'static) -> Staller {
        let requests = Arc::new(AtomicUsize::new(0));
        let script = Arc::new(script);
        let r = requests.clone();
        let server = TcpServer::start(move |mut s| {
            let (r, script) = (r.clone(), script.clone());
            async move {
                let mut buf = Vec::new();
                loop {
                    // Requests here have no body: a head ends the request.
                    let Some(end) = read_head(&mut s, &mut buf).await else {
                        return;
                    };
                    buf.drain(..end);
                    let i = r.fetch_add(1, Ordering::SeqCst);
                    let (bytes, then) = script(i);
                    if s.write_all(bytes.as_bytes()).await.is_err() || then == Then::Close {
                        return;
                    }
                    if then == Then::Stall {
                        // Hold the connection open, sending nothing, until the peer leaves.
                        let mut chunk = [0u8; 4096];
                        while matches!(s.read(&mut chunk).await, Ok(n) if n > 0) {}
                        return;
                    }
                }
            }
        })
        .await;
        Staller { server, requests }
    }

    fn url(&self) -> String {
        self.server.url()
    }

    fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// A 200 head promising `len` bytes, and `body` (all of them, or fewer before a stall).
fn response(len: usize, extra_headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {len}\r\n{extra_headers}\r\n{body}"
    )
}

fn stalled(body_start: &str) -> (String, Then) {
    (response(1000, "", body_start), Then::Stall)
}

// === the app ===

/// What the app got: the head, and how reading the body ended.
struct Got {
    status: u16,
    headers: http::HeaderMap,
    body: Result<String, String>,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One GET through the forward proxy on a fresh connection; panics if the head or the body does
/// not end within [`BOUND`].
async fn get(sidecar: &Sidecar, url: &str, headers: &[(&str, &str)]) -> Got {
    let stream = TcpStream::connect(sidecar.listen).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let uri: http::Uri = url.parse().unwrap();
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(uri.clone())
        .header("host", uri.authority().unwrap().as_str());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        BOUND,
        sender.send_request(req.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .unwrap_or_else(|_| panic!("no status line for {url} within {BOUND:?}"))
    .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(BOUND, resp.into_body().collect())
        .await
        .unwrap_or_else(|_| panic!("the body of {url} ({status}) did not end within {BOUND:?}"))
        .map(|c| String::from_utf8_lossy(&c.to_bytes()).into_owned())
        .map_err(|e| e.to_string());
    Got {
        status,
        headers,
        body,
    }
}

fn spec(url: &str, rest: &str) -> String {
    manifest("partner", &format!("upstream: {{url: '{url}'}}\n{rest}"))
}

// === timeouts.total bounds the body ===

/// Headers on time, then a body that stalls: the app's connection is cut at the total deadline,
/// and the call is a timeout in the metrics and to the breaker.
#[tokio::test]
async fn a_body_still_streaming_at_the_total_deadline_is_cut_and_counted_a_timeout() {
    let receiver = Receiver::start().await;
    let partner = Staller::start(|_| stalled("the first bytes")).await;
    let sidecar = Sidecar::start_with(
        &spec(
            &partner.url(),
            "timeouts: {request: 300ms, total: 400ms}\ncircuitBreaker: {consecutiveFailures: 1, openDuration: 1m}",
        ),
        Options {
            env: vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.endpoint()),
                ("OTEL_BSP_SCHEDULE_DELAY".into(), "50".into()),
            ],
            ..Options::default()
        },
    )
    .await;
    let url = format!("{}/v1/report", partner.url());
    let got = get(&sidecar, &url, &[]).await;
    assert_eq!(got.status, 200, "the partner's head passes on time");
    assert!(
        got.body.is_err(),
        "the app sees an incomplete body, not a complete one: {:?}",
        got.body
    );

    let m = sidecar
        .wait_metrics("the call recorded as a timeout", |m| {
            metric(
                m,
                "tollgate_requests_total",
                &[
                    ("integration", "test/partner"),
                    ("outcome", "timeout"),
                    ("code", "200"),
                ],
            ) == 1.0
        })
        .await;
    assert_eq!(
        metric(&m, "tollgate_requests_total", &[("outcome", "success")]),
        0.0,
        "{m}"
    );
    let call = &receiver.wait_for("tollgate.call", 1).await[0];
    assert_eq!(call.attributes["http.response.status_code"], "200");
    assert_eq!(
        call.attributes.get("tollgate.reason").map(String::as_str),
        Some("timeout")
    );
    // The breaker counted a failure: one consecutive failure opens it.
    let next = get(&sidecar, &url, &[]).await;
    assert_eq!(next.status, 503);
    assert_eq!(next.header("x-tollgate-reason"), Some("circuit-open"));
    assert_eq!(partner.count(), 1, "nothing sent through the open breaker");
}

/// A body the partner breaks off is a reset: the app's connection is cut, and the call is
/// `upstream-unreachable` in the metrics and a failure to the breaker.
#[tokio::test]
async fn a_body_the_partner_breaks_off_is_counted_a_failure() {
    let partner = Staller::start(|_| (response(1000, "", "the first bytes"), Then::Close)).await;
    let sidecar = Sidecar::start(&spec(
        &partner.url(),
        "circuitBreaker: {consecutiveFailures: 1, openDuration: 1m}",
    ))
    .await;
    let url = format!("{}/v1/report", partner.url());
    let got = get(&sidecar, &url, &[]).await;
    assert_eq!(got.status, 200);
    assert!(got.body.is_err(), "{:?}", got.body);
    sidecar
        .wait_metrics("the call recorded as a failure", |m| {
            metric(
                m,
                "tollgate_requests_total",
                &[("outcome", "upstream-unreachable"), ("code", "200")],
            ) == 1.0
        })
        .await;
    let next = get(&sidecar, &url, &[]).await;
    assert_eq!(next.header("x-tollgate-reason"), Some("circuit-open"));
    assert_eq!(partner.count(), 1);
}

/// With `staleIfError`, a stalled body is replaced by the last good response, or else by the
/// 504 `timeout` answer, within the deadline: the app always gets a status line.
#[tokio::test]
async fn with_stale_if_error_a_stalled_body_gets_the_stale_copy_or_504() {
    let partner = Staller::start(|i| {
        if i == 0 {
            (response(10, "", "fresh data"), Then::Next)
        } else {
            stalled("partial")
        }
    })
    .await;
    let sidecar = Sidecar::start(&spec(
        &partner.url(),
        "timeouts: {request: 300ms, total: 400ms}\nfallback: {staleIfError: 5m}",
    ))
    .await;
    let url = format!("{}/v1/catalog", partner.url());
    let first = get(&sidecar, &url, &[]).await;
    assert_eq!(first.body.as_deref(), Ok("fresh data"));

    let second = get(&sidecar, &url, &[]).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-tollgate-fallback"), Some("stale"));
    assert_eq!(second.body.as_deref(), Ok("fresh data"));

    let other = get(&sidecar, &format!("{}/v1/other", partner.url()), &[]).await;
    assert_eq!(other.status, 504);
    assert_eq!(other.header("x-tollgate-reason"), Some("timeout"));
    let body: serde_json::Value = serde_json::from_str(other.body.as_ref().unwrap()).unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timeouts.total"),
        "{body}"
    );
    sidecar
        .wait_metrics("the stale answer and the timeout recorded", |m| {
            metric(
                m,
                "tollgate_requests_total",
                &[("outcome", "fallback-stale")],
            ) == 1.0
                && metric(m, "tollgate_requests_total", &[("outcome", "timeout")]) == 1.0
        })
        .await;
}

/// A static fallback stands in for a stalled body too.
#[tokio::test]
async fn a_static_fallback_stands_in_for_a_stalled_body() {
    let partner = Staller::start(|_| stalled("partial")).await;
    let sidecar = Sidecar::start(&spec(
        &partner.url(),
        "timeouts: {request: 300ms, total: 400ms}\nfallback:\n  response: {status: 503, body: degraded}",
    ))
    .await;
    let got = get(&sidecar, &format!("{}/v1/x", partner.url()), &[]).await;
    assert_eq!(got.status, 503);
    assert_eq!(got.header("x-tollgate-fallback"), Some("static"));
    assert_eq!(got.header("x-tollgate-reason"), Some("timeout"));
    assert_eq!(got.body.as_deref(), Ok("degraded"));
}

// === the stale cache never crosses users ===

/// The partner's first answer per path is good, every later one a 500.
fn good_once(partner: &Partner, replies: Vec<Reply>) {
    partner.queue(replies);
    partner.script(|_, _| Reply::Status(500));
}

fn good(body: &str, headers: &[(&str, &str)]) -> Reply {
    Reply::with(200, headers, body)
}

#[tokio::test]
async fn a_stale_copy_is_served_only_to_the_credentials_that_fetched_it_without_set_cookie() {
    let partner = Partner::start().await;
    good_once(
        &partner,
        vec![
            good("alice's statement", &[("set-cookie", "session=alice")]),
            good("carol's cart", &[]),
        ],
    );
    let sidecar = Sidecar::start(&spec(&partner.url(), "fallback: {staleIfError: 5m}")).await;
    let url = format!("{}/v1/me", partner.url());
    let alice = [("authorization", "Bearer alice")];
    let first = get(&sidecar, &url, &alice).await;
    assert_eq!(first.body.as_deref(), Ok("alice's statement"));
    let carol = [("cookie", "sid=carol")];
    assert_eq!(
        get(&sidecar, &url, &carol).await.body.as_deref(),
        Ok("carol's cart")
    );

    // The partner fails from now on.
    for (who, headers) in [
        ("bob", vec![("authorization", "Bearer bob")]),
        ("an anonymous caller", vec![]),
        ("dave", vec![("cookie", "sid=dave")]),
        (
            "alice with carol's cookie",
            vec![("authorization", "Bearer alice"), ("cookie", "sid=carol")],
        ),
    ] {
        let got = get(&sidecar, &url, &headers).await;
        assert_eq!(got.status, 500, "{who} gets the partner's error");
        assert_eq!(got.header("x-tollgate-fallback"), None, "{who}");
    }

    let again = get(&sidecar, &url, &alice).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.header("x-tollgate-fallback"), Some("stale"));
    assert_eq!(again.body.as_deref(), Ok("alice's statement"));
    assert_eq!(
        again.header("set-cookie"),
        None,
        "a stored Set-Cookie is never replayed"
    );
    let carol_again = get(&sidecar, &url, &carol).await;
    assert_eq!(carol_again.header("x-tollgate-fallback"), Some("stale"));
    assert_eq!(carol_again.body.as_deref(), Ok("carol's cart"));
}

#[tokio::test]
async fn private_and_no_store_responses_are_never_replayed() {
    let partner = Partner::start().await;
    good_once(
        &partner,
        vec![
            good("mine", &[("cache-control", "private, max-age=60")]),
            good("secret", &[("cache-control", "no-store")]),
            good("asked not to", &[]),
        ],
    );
    let sidecar = Sidecar::start(&spec(&partner.url(), "fallback: {staleIfError: 5m}")).await;
    let paths = ["/v1/private", "/v1/no-store", "/v1/request-no-store"];
    for (path, req) in paths
        .iter()
        .zip([&[][..], &[], &[("cache-control", "no-store")]])
    {
        let got = get(&sidecar, &format!("{}{path}", partner.url()), req).await;
        assert_eq!(got.status, 200, "{path}");
    }
    for path in paths {
        let got = get(&sidecar, &format!("{}{path}", partner.url()), &[]).await;
        assert_eq!(got.status, 500, "{path} was not stored");
    }
}

#[tokio::test]
async fn a_varying_response_is_served_only_to_matching_requests() {
    let partner = Partner::start().await;
    good_once(
        &partner,
        vec![good("bonjour", &[("vary", "Accept-Language")])],
    );
    let sidecar = Sidecar::start(&spec(&partner.url(), "fallback: {staleIfError: 5m}")).await;
    let url = format!("{}/v1/greeting", partner.url());
    let fr = [("accept-language", "fr")];
    assert_eq!(
        get(&sidecar, &url, &fr).await.body.as_deref(),
        Ok("bonjour")
    );
    let de = get(&sidecar, &url, &[("accept-language", "de")]).await;
    assert_eq!(de.status, 500, "another language is another variant");
    assert_eq!(get(&sidecar, &url, &[]).await.status, 500);
    let again = get(&sidecar, &url, &fr).await;
    assert_eq!(again.header("x-tollgate-fallback"), Some("stale"));
    assert_eq!(again.body.as_deref(), Ok("bonjour"));
}
