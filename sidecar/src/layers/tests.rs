//! Each layer alone, on a paused clock, against a mock inner service (`tower-test`: it sees
//! what the layer forwards, answers as told, and panics when called without being polled
//! ready) or a scripted one that answers by itself.

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::*;
use crate::body::{self, ReqBody, RespBody};
use crate::config::{Candidate, Revision, SecretSource, Source, build_revision};
use crate::state::StateContext;

/// Every secret reads `s3cret`.
struct Secrets;
impl SecretSource for Secrets {
    fn get(&self, _: &str, _: &tollgate_crds::v1alpha1::SecretKeyRef) -> Option<String> {
        Some("s3cret".into())
    }
}

fn integration(spec_yaml: &str) -> Arc<crate::config::Integration> {
    let spec: tollgate_crds::PartnerIntegrationSpec = serde_yaml::from_str(spec_yaml).unwrap();
    let policy = tollgate_crds::compile("ns", "p", &spec).unwrap();
    let ctx = StateContext::new(crate::client::tls_config(None).unwrap());
    let rev = build_revision(
        "r".into(),
        Source::Empty,
        vec![Candidate::Compiled(Box::new(policy))],
        &Secrets,
        &Revision::empty(),
        &ctx,
        &Default::default(),
    );
    rev.integrations[0].clone()
}

fn request(i: &Arc<crate::config::Integration>, method: http::Method) -> Request<ReqBody> {
    let started = Instant::now();
    let route = i.route_index(&method, "/x");
    let call = Arc::new(Call {
        integration: i.clone(),
        route,
        deadline: started + i.route(route).timeouts.total,
        started,
        attempts: AtomicU32::new(0),
        client: None,
    });
    let mut req = Request::builder()
        .method(method)
        .uri("/x")
        .body(ReqBody::empty())
        .unwrap();
    req.extensions_mut().insert(call);
    req
}

/// An inner service answering from a script, recording when each attempt arrived.
#[derive(Clone)]
struct Scripted {
    replies: Arc<Mutex<Vec<Reply>>>,
    arrivals: Arc<Mutex<Vec<Instant>>>,
}

#[derive(Clone)]
enum Reply {
    Status(u16, Option<&'static str>),
    Hang,
    Reset,
}

impl Scripted {
    fn new(replies: Vec<Reply>) -> Self {
        Scripted {
            replies: Arc::new(Mutex::new(replies)),
            arrivals: Arc::default(),
        }
    }
    fn arrivals(&self) -> Vec<Instant> {
        self.arrivals.lock().unwrap().clone()
    }
}

impl Service<Request<ReqBody>> for Scripted {
    type Response = Response<RespBody>;
    type Error = CallError;
    type Future = BoxFuture<CallResult>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), CallError>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Request<ReqBody>) -> Self::Future {
        self.arrivals.lock().unwrap().push(Instant::now());
        let reply = {
            let mut r = self.replies.lock().unwrap();
            if r.len() > 1 {
                r.remove(0)
            } else {
                r[0].clone()
            }
        };
        Box::pin(async move {
            match reply {
                Reply::Status(code, retry_after) => {
                    let mut resp = Response::new(body::empty());
                    *resp.status_mut() = StatusCode::from_u16(code).unwrap();
                    if let Some(ra) = retry_after {
                        resp.headers_mut()
                            .insert(http::header::RETRY_AFTER, ra.parse().unwrap());
                    }
                    Ok(resp)
                }
                Reply::Hang => std::future::pending().await,
                Reply::Reset => Err(CallError::Transport {
                    kind: crate::client::TransportFailure::Reset,
                    message: "reset".into(),
                }),
            }
        })
    }
}

fn metrics() -> Arc<crate::telemetry::metrics::Metrics> {
    Arc::default()
}

#[tokio::test(start_paused = true)]
async fn attempt_timeout_never_outlives_the_total_deadline() {
    let i =
        integration("upstream: {url: 'http://a.example'}\ntimeouts: {request: 10s, total: 10s}");
    let req = request(&i, http::Method::GET);
    tokio::time::advance(Duration::from_secs(7)).await; // queueing and earlier attempts used 7s
    let started = Instant::now();
    let err = timeout::layer()
        .layer(Scripted::new(vec![Reply::Hang]))
        .oneshot(req)
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::AttemptTimeout));
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(3),
        "only what is left of the total"
    );
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_within_the_cap() {
    let i = integration(
        "upstream: {url: 'http://a.example'}\nretries: {maxAttempts: 4, backoff: {base: 100ms, max: 150ms}, budget: {minPerSecond: 100}}",
    );
    let inner = Scripted::new(vec![Reply::Status(503, None)]);
    let resp = retry::layer(metrics())
        .layer(inner.clone())
        .oneshot(request(&i, http::Method::GET))
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let at = inner.arrivals();
    assert_eq!(at.len(), 4);
    for (n, w) in at.windows(2).enumerate() {
        let gap = w[1] - w[0];
        let cap = Duration::from_millis(100 * (1 << n)).min(Duration::from_millis(150));
        assert!(gap <= cap, "retry {} waited {gap:?} > {cap:?}", n + 1);
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_beyond_the_deadline_ends_the_call() {
    let i = integration(
        "upstream: {url: 'http://a.example'}\ntimeouts: {request: 1s, total: 5s}\nretries: {maxAttempts: 3}",
    );
    let inner = Scripted::new(vec![
        Reply::Status(503, Some("60")),
        Reply::Status(200, None),
    ]);
    let resp = retry::layer(metrics())
        .layer(inner.clone())
        .oneshot(request(&i, http::Method::GET))
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        503,
        "waiting 60s would pass the 5s deadline: the partner's answer stands"
    );
    assert_eq!(inner.arrivals().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_after_within_the_deadline_is_waited_for() {
    let i = integration(
        "upstream: {url: 'http://a.example'}\nretries: {maxAttempts: 3, backoff: {base: 1ms, max: 1ms}}",
    );
    let inner = Scripted::new(vec![
        Reply::Status(429, Some("3")),
        Reply::Status(200, None),
    ]);
    let resp = retry::layer(metrics())
        .layer(inner.clone())
        .oneshot(request(&i, http::Method::GET))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let at = inner.arrivals();
    assert!(at[1] - at[0] >= Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn the_budget_stops_retries_once_spent() {
    // No floor and 0%: a retry is never in budget.
    let i = integration(
        "upstream: {url: 'http://a.example'}\nretries: {maxAttempts: 3, budget: {percent: 0, minPerSecond: 0}}",
    );
    let inner = Scripted::new(vec![Reply::Reset]);
    let err = retry::layer(metrics())
        .layer(inner.clone())
        .oneshot(request(&i, http::Method::GET))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Transport { .. }));
    assert_eq!(inner.arrivals().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn queued_requests_wait_for_their_slot_but_never_past_the_deadline() {
    let i = integration(
        "upstream: {url: 'http://a.example'}\ntimeouts: {request: 1s, total: 1s}\nrateLimit: {onLimit: queue, maxQueueWait: 5s, limits: [{name: b, requests: 1, per: 600ms}]}",
    );
    let svc = rate_limit::layer(metrics()).layer(Scripted::new(vec![Reply::Status(200, None)]));
    let started = Instant::now();
    assert_eq!(
        svc.clone()
            .oneshot(request(&i, http::Method::GET))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        svc.clone()
            .oneshot(request(&i, http::Method::GET))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(600),
        "the second waited for the next token"
    );
    // Two more arrive together: the first takes the slot 600ms away; the next slot is 1.2s
    // away, past its 1s total deadline (though within maxQueueWait), so it is refused now.
    let (first, second) = tokio::join!(
        svc.clone().oneshot(request(&i, http::Method::GET)),
        svc.clone().oneshot(request(&i, http::Method::GET))
    );
    assert_eq!(first.unwrap().status(), 200);
    match second.unwrap_err() {
        CallError::Answer(a) => assert_eq!(a.reason, crate::answer::Reason::RateLimited),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_answers_with_the_time_until_half_open() {
    let i = integration(
        "upstream: {url: 'http://a.example'}\ncircuitBreaker: {consecutiveFailures: 1, openDuration: 10s}",
    );
    let svc = circuit_breaker::layer().layer(Scripted::new(vec![Reply::Status(500, None)]));
    assert_eq!(
        svc.clone()
            .oneshot(request(&i, http::Method::GET))
            .await
            .unwrap()
            .status(),
        500
    );
    tokio::time::advance(Duration::from_secs(4)).await;
    match svc
        .clone()
        .oneshot(request(&i, http::Method::GET))
        .await
        .unwrap_err()
    {
        CallError::Answer(a) => {
            assert_eq!(a.reason, crate::answer::Reason::CircuitOpen);
            assert_eq!(a.retry_after, Some(Duration::from_secs(6)));
        }
        other => panic!("{other:?}"),
    }
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(
        svc.clone()
            .oneshot(request(&i, http::Method::GET))
            .await
            .unwrap()
            .status(),
        500,
        "half-open: a probe goes through"
    );
}

#[tokio::test(start_paused = true)]
async fn a_response_body_is_cut_at_the_total_deadline_not_the_attempt_timeout() {
    use http_body_util::BodyExt;
    let i = integration("upstream: {url: 'http://a.example'}\ntimeouts: {request: 2s, total: 5s}");
    let stalls = tower::service_fn(|_req: Request<ReqBody>| async {
        let never = http_body_util::StreamBody::new(futures::stream::pending::<
            Result<http_body::Frame<bytes::Bytes>, body::BoxError>,
        >());
        Ok::<_, CallError>(Response::new(never.boxed_unsync()))
    });
    let started = Instant::now();
    let resp = timeout::layer()
        .layer(stalls)
        .oneshot(request(&i, http::Method::GET))
        .await
        .unwrap();
    assert_eq!(started.elapsed(), Duration::ZERO, "the head is on time");
    let err = resp.into_body().collect().await.unwrap_err();
    assert!(body::is_body_timeout(&err), "{err}");
    assert_eq!(started.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_queued_retry_waits_exactly_for_its_token() {
    let i = integration(
        "upstream: {url: 'http://a.example'}\nrateLimit: {onLimit: queue, maxQueueWait: 5s, limits: [{name: b, requests: 1, per: 1s}]}\nretries: {maxAttempts: 3, backoff: {base: 1ms, max: 1ms}}",
    );
    let m = metrics();
    let inner = Scripted::new(vec![Reply::Status(503, None), Reply::Status(200, None)]);
    let resp = rate_limit::layer(m.clone())
        .layer(retry::layer(m.clone()).layer(inner.clone()))
        .oneshot(request(&i, http::Method::GET))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let at = inner.arrivals();
    assert_eq!(at.len(), 2);
    assert_eq!(at[1] - at[0], Duration::from_secs(1), "one token a second");
    let text = m.encode();
    assert!(
        text.contains(r#"tollgate_rate_limit_decisions_total{integration="ns/p",route="default",quota="integration",decision="queued"} 1"#),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_that_would_end_past_the_deadline_is_counted_as_skipped() {
    let i = integration(
        "upstream: {url: 'http://a.example'}\ntimeouts: {request: 1s, total: 5s}\nretries: {maxAttempts: 3}",
    );
    let m = metrics();
    let inner = Scripted::new(vec![Reply::Status(503, Some("60"))]);
    let resp = retry::layer(m.clone())
        .layer(inner.clone())
        .oneshot(request(&i, http::Method::GET))
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(inner.arrivals().len(), 1);
    let text = m.encode();
    assert!(
        text.contains(r#"tollgate_retries_skipped_total{integration="ns/p",route="default",reason="deadline"} 1"#),
        "{text}"
    );
}

// === against a tower-test mock ===

type MockError = Box<dyn std::error::Error + Send + Sync>;
type MockHandle = tower_test::mock::Handle<Request<ReqBody>, Response<RespBody>>;

/// The mock's errors are boxed: a `CallError` sent through the handle comes out as itself.
fn unbox(e: MockError) -> CallError {
    match e.downcast::<CallError>() {
        Ok(e) => *e,
        Err(other) => CallError::Transport {
            kind: crate::client::TransportFailure::Reset,
            message: other.to_string(),
        },
    }
}

type Mock = tower::util::MapErr<
    tower_test::mock::Mock<Request<ReqBody>, Response<RespBody>>,
    fn(MockError) -> CallError,
>;

fn mock() -> (Mock, MockHandle) {
    let (m, h) = tower_test::mock::pair();
    (m.map_err(unbox as fn(_) -> _), h)
}

fn status(code: u16) -> Response<RespBody> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::from_u16(code).unwrap();
    resp
}

fn reason_of(err: CallError) -> crate::answer::Answer {
    match err {
        CallError::Answer(a) => a,
        other => panic!("expected the sidecar's answer, got {other:?}"),
    }
}

/// The next request the mock receives (a minute at most, so a layer that never sends fails).
async fn next_request(
    handle: &mut MockHandle,
) -> (
    Request<ReqBody>,
    tower_test::mock::SendResponse<Response<RespBody>>,
) {
    tokio::time::timeout(Duration::from_secs(60), handle.next_request())
        .await
        .expect("a request reaches the partner within a minute")
        .expect("a request reaches the partner")
}

/// Once the layer under test is gone: no request reached the mock beyond those already taken.
async fn nothing_more_reaches_the_partner(handle: &mut MockHandle) {
    assert!(
        handle.next_request().await.is_none(),
        "a request reached the partner"
    );
}

/// Answers the next request the mock receives with `code`; returns that request.
async fn answer_next(handle: &mut MockHandle, code: u16) -> Request<ReqBody> {
    let (req, send) = next_request(handle).await;
    send.send_response(status(code));
    req
}

#[tokio::test]
async fn kill_switch_on_answers_503_and_never_calls_the_partner() {
    let i = integration(
        "upstream: {url: 'http://a.example'}\nkillSwitch: {enabled: true, reason: INC-7}",
    );
    let (inner, mut handle) = mock();
    let err = kill_switch::layer()
        .layer(inner)
        .oneshot(request(&i, http::Method::GET))
        .await
        .unwrap_err();
    let a = reason_of(err);
    assert_eq!(a.reason, crate::answer::Reason::KillSwitch);
    assert_eq!(a.reason.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.message, "kill switch is on: INC-7");
    nothing_more_reaches_the_partner(&mut handle).await;
}

#[tokio::test]
async fn kill_switch_off_forwards_the_request() {
    let i = integration("upstream: {url: 'http://a.example'}");
    let (inner, mut handle) = mock();
    let call = tokio::spawn(
        kill_switch::layer()
            .layer(inner)
            .oneshot(request(&i, http::Method::GET)),
    );
    answer_next(&mut handle, 204).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 204);
}

#[tokio::test]
async fn a_gate_is_ready_only_when_its_inner_service_is() {
    let i = integration("upstream: {url: 'http://a.example'}");
    let (inner, mut handle) = mock();
    handle.allow(0);
    let mut svc = tower_test::mock::Spawn::new(kill_switch::layer().layer(inner));
    assert!(svc.poll_ready().is_pending());
    handle.allow(1);
    assert!(svc.is_woken());
    assert!(matches!(svc.poll_ready(), std::task::Poll::Ready(Ok(()))));
    let fut = svc.call(request(&i, http::Method::GET));
    answer_next(&mut handle, 200).await;
    assert_eq!(fut.await.unwrap().status(), 200);
}

#[tokio::test]
async fn version_gate_refuses_a_denied_prefix_and_pins_headers_on_the_rest() {
    let i = integration(
        "upstream: {url: 'http://a.example'}\nversioning: {pinHeaders: {X-Api-Version: '2024-06-20'}, deniedPathPrefixes: [/v0]}",
    );
    let (inner, mut handle) = mock();
    let svc = version_gate::layer().layer(inner);
    let mut denied = request(&i, http::Method::GET);
    *denied.uri_mut() = "/v0/charges".parse().unwrap();
    let a = reason_of(svc.clone().oneshot(denied).await.unwrap_err());
    assert_eq!(a.reason, crate::answer::Reason::DeprecatedVersion);
    assert_eq!(a.reason.status(), StatusCode::GONE);

    let mut req = request(&i, http::Method::GET);
    req.headers_mut()
        .insert("x-api-version", "1999-01-01".parse().unwrap());
    let call = tokio::spawn(svc.oneshot(req));
    let sent = answer_next(&mut handle, 200).await;
    assert_eq!(
        sent.uri().path(),
        "/x",
        "the denied one never reached the partner"
    );
    assert_eq!(sent.headers()["x-api-version"], "2024-06-20");
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
}

#[tokio::test]
async fn credentials_replace_whatever_the_app_sent() {
    let i = integration(
        "upstream: {url: 'http://a.example'}\ncredentials: {secretRef: {name: api, key: token}, header: Authorization, format: 'Bearer {value}', allowInsecure: true}",
    );
    let (inner, mut handle) = mock();
    let mut req = request(&i, http::Method::GET);
    req.headers_mut()
        .insert("authorization", "Bearer app-guess".parse().unwrap());
    let call = tokio::spawn(credentials::layer(metrics()).layer(inner).oneshot(req));
    let sent = answer_next(&mut handle, 200).await;
    let values: Vec<_> = sent.headers().get_all("authorization").iter().collect();
    assert_eq!(values, ["Bearer s3cret"]);
    call.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn rate_limit_over_the_quota_answers_429_without_calling_the_partner() {
    let i = integration(
        "upstream: {url: 'http://a.example'}\nrateLimit: {limits: [{name: b, requests: 1, per: 10s}]}",
    );
    let (inner, mut handle) = mock();
    let svc = rate_limit::layer(metrics()).layer(inner);
    let first = tokio::spawn(svc.clone().oneshot(request(&i, http::Method::GET)));
    answer_next(&mut handle, 200).await;
    first.await.unwrap().unwrap();
    let a = reason_of(
        svc.oneshot(request(&i, http::Method::GET))
            .await
            .unwrap_err(),
    );
    assert_eq!(a.reason, crate::answer::Reason::RateLimited);
    assert_eq!(a.retry_after, Some(Duration::from_secs(10)));
    nothing_more_reaches_the_partner(&mut handle).await;
}

#[tokio::test(start_paused = true)]
async fn rate_limit_propagates_readiness_and_a_queued_request_keeps_its_ready_service() {
    let i = integration(
        "upstream: {url: 'http://a.example'}\nrateLimit: {onLimit: queue, maxQueueWait: 5s, limits: [{name: b, requests: 1, per: 1s}]}",
    );
    let (inner, mut handle) = mock();
    handle.allow(0);
    let mut svc = tower_test::mock::Spawn::new(rate_limit::layer(metrics()).layer(inner));
    assert!(
        svc.poll_ready().is_pending(),
        "not ready while the partner is not"
    );
    handle.allow(1);
    assert!(matches!(svc.poll_ready(), std::task::Poll::Ready(Ok(()))));
    let first = svc.call(request(&i, http::Method::GET));
    handle.allow(1);
    assert!(matches!(svc.poll_ready(), std::task::Poll::Ready(Ok(()))));
    // Queued for the next token: the service polled ready goes with it (calling a clone that
    // was never polled would panic in the mock).
    let second = tokio::spawn(svc.call(request(&i, http::Method::GET)));
    let started = Instant::now();
    answer_next(&mut handle, 200).await;
    assert_eq!(first.await.unwrap().status(), 200);
    answer_next(&mut handle, 201).await;
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(1),
        "waited for its token"
    );
    assert_eq!(second.await.unwrap().unwrap().status(), 201);
}

#[tokio::test(start_paused = true)]
async fn circuit_breaker_open_answers_without_calling_the_partner() {
    let i = integration(
        "upstream: {url: 'http://a.example'}\ncircuitBreaker: {consecutiveFailures: 1, openDuration: 10s}",
    );
    let (inner, mut handle) = mock();
    let svc = circuit_breaker::layer().layer(inner);
    let first = tokio::spawn(svc.clone().oneshot(request(&i, http::Method::GET)));
    answer_next(&mut handle, 502).await;
    assert_eq!(first.await.unwrap().unwrap().status(), 502);
    let a = reason_of(
        svc.oneshot(request(&i, http::Method::GET))
            .await
            .unwrap_err(),
    );
    assert_eq!(a.reason, crate::answer::Reason::CircuitOpen);
    nothing_more_reaches_the_partner(&mut handle).await;
}

#[tokio::test(start_paused = true)]
async fn retry_sends_a_retriable_failure_again_once_the_partner_is_ready() {
    let i = integration(
        "upstream: {url: 'http://a.example'}\nretries: {maxAttempts: 3, backoff: {base: 1ms, max: 1ms}}",
    );
    let (inner, mut handle) = mock();
    handle.allow(1);
    let mut svc = tower_test::mock::Spawn::new(retry::layer(metrics()).layer(inner));
    assert!(matches!(svc.poll_ready(), std::task::Poll::Ready(Ok(()))));
    let call = tokio::spawn(svc.call(request(&i, http::Method::GET)));
    answer_next(&mut handle, 503).await;
    // The retry waits for the partner to be ready again (the mock panics on a call made
    // without it).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!call.is_finished());
    handle.allow(1);
    answer_next(&mut handle, 200).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn retry_never_repeats_a_post_without_an_idempotency_key() {
    let i = integration(
        "upstream: {url: 'http://a.example'}\nretries: {maxAttempts: 3, backoff: {base: 1ms, max: 1ms}}",
    );
    let (inner, mut handle) = mock();
    let call = tokio::spawn(
        retry::layer(metrics())
            .layer(inner)
            .oneshot(request(&i, http::Method::POST)),
    );
    answer_next(&mut handle, 503).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 503);
    nothing_more_reaches_the_partner(&mut handle).await;
}

#[tokio::test(start_paused = true)]
async fn timeout_ends_an_attempt_the_partner_does_not_answer() {
    let i = integration("upstream: {url: 'http://a.example'}\ntimeouts: {request: 2s, total: 30s}");
    let (inner, mut handle) = mock();
    let call = tokio::spawn(
        timeout::layer()
            .layer(inner)
            .oneshot(request(&i, http::Method::GET)),
    );
    let (_req, _unanswered) = next_request(&mut handle).await;
    let started = Instant::now();
    assert!(matches!(
        call.await.unwrap(),
        Err(CallError::AttemptTimeout)
    ));
    assert_eq!(started.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn fallback_answers_a_failed_call_with_the_static_response() {
    let i = integration(
        "upstream: {url: 'http://a.example'}\nfallback:\n  response: {status: 200, body: degraded}",
    );
    let (inner, mut handle) = mock();
    let call = tokio::spawn(
        fallback::layer()
            .layer(inner)
            .oneshot(request(&i, http::Method::GET)),
    );
    let (_req, send) = next_request(&mut handle).await;
    send.send_error(CallError::Transport {
        kind: crate::client::TransportFailure::Connect,
        message: "refused".into(),
    });
    let resp = call.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()[crate::answer::FALLBACK_HEADER], "static");
    assert_eq!(
        resp.headers()[crate::answer::REASON_HEADER],
        "upstream-unreachable"
    );
}

#[tokio::test(start_paused = true)]
async fn contract_marks_a_2xx_that_breaks_the_rule() {
    use http_body_util::BodyExt;
    let i = integration(
        "upstream: {url: 'http://a.example'}\ncontract: {success: {jsonPath: $.status, equals: ok}}",
    );
    let (inner, mut handle) = mock();
    let m = metrics();
    let call = tokio::spawn(
        contract::layer(m.clone())
            .layer(inner)
            .oneshot(request(&i, http::Method::GET)),
    );
    let (_req, send) = next_request(&mut handle).await;
    send.send_response(Response::new(body::full(r#"{"status": "failed"}"#)));
    let resp = call.await.unwrap().unwrap();
    let probe = contract::probe(resp.extensions()).expect("a 2xx is checked");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        &body[..],
        br#"{"status": "failed"}"#,
        "the app's answer is unchanged"
    );
    assert!(probe.broken());
    assert!(
        m.encode().contains(r#"tollgate_contract_violations_total{integration="ns/p",route="default",kind="success-rule"} 1"#),
        "{}",
        m.encode()
    );
}

#[tokio::test(start_paused = true)]
async fn observe_turns_an_error_into_the_sidecars_answer() {
    let i = integration("upstream: {url: 'http://a.example'}");
    let (inner, mut handle) = mock();
    let call = tokio::spawn(
        observe::layer(metrics())
            .layer(inner)
            .oneshot(request(&i, http::Method::GET)),
    );
    let (req, send) = next_request(&mut handle).await;
    let c = Call::from_request(&req);
    send.send_error(CallError::Answer(
        c.answer(crate::answer::Reason::KillSwitch, "off"),
    ));
    let resp = call.await.unwrap().unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()[crate::answer::REASON_HEADER], "kill-switch");
}
