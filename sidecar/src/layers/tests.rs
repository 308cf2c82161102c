//! Each layer alone, on a paused clock, against a scripted inner service.

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

struct NoSecrets;
impl SecretSource for NoSecrets {
    fn get(&self, _: &str, _: &tollgate_crds::v1alpha1::SecretKeyRef) -> Option<String> {
        None
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
        &NoSecrets,
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
async fn attempt_timeout_is_the_request_timeout() {
    let i = integration("upstream: {url: 'http://a.example'}\ntimeouts: {request: 2s, total: 30s}");
    let inner = Scripted::new(vec![Reply::Hang]);
    let started = Instant::now();
    let err = timeout::layer()
        .layer(inner)
        .oneshot(request(&i, http::Method::GET))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::AttemptTimeout));
    assert_eq!(started.elapsed(), Duration::from_secs(2));
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
