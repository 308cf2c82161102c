//! The operator's Prometheus metrics and its admin listener (`/metrics`, `/healthz`, `/readyz`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Labels of `webhook_admissions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// `injected`, `skipped`, `denied` or `error`.
    pub outcome: String,
    /// The mode injected, or why not.
    pub reason: String,
}

/// Labels of `connections_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// `distribution`, `webhook` or `admin`.
    pub listener: String,
}

/// Labels of the per-integration gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IntegrationLabel {
    /// `<namespace>/<name>`, as the sidecars label their metrics.
    pub integration: String,
}

/// Labels of `sidecars`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SidecarsLabels {
    pub integration: String,
    /// `desired` (sidecars that receive the integration) or `up_to_date` (those running its
    /// current revision).
    pub state: String,
}

/// Why a pushed snapshot counts in `push_failures_total`: `refused` (the sidecar acknowledged a
/// later snapshot but not this one: it refused it, or its ack was lost), `unacknowledged` (the
/// stream ended, or more snapshots were pending than the operator tracks, before its ack).
pub const PUSH_FAILURE_REASONS: [&str; 2] = ["refused", "unacknowledged"];

/// Every metric the operator exports. Cheap to clone-by-Arc; the registry is only for encoding.
pub struct Metrics {
    registry: Registry,
    /// Reconciles run, by outcome is in `reconcile_errors`.
    pub reconciles: Counter,
    pub reconcile_errors: Family<ReasonLabel, Counter>,
    pub reconcile_duration: Histogram,
    /// Streams currently open.
    pub connected_sidecars: Gauge,
    /// Subscribe attempts refused, by reason.
    pub auth_rejections: Family<ReasonLabel, Counter>,
    /// From the change that produced a revision to the sidecar's ack of it.
    pub push_latency: Histogram,
    /// Snapshots pushed to a sidecar that it never acknowledged, by reason (see
    /// [`PUSH_FAILURE_REASONS`]).
    pub push_failures: Family<ReasonLabel, Counter>,
    pub reports: Counter,
    /// 1 while this replica holds the lease.
    pub leader: Gauge,
    /// Pod admissions the injection webhook answered, by outcome and reason.
    pub webhook_admissions: Family<AdmissionLabels, Counter>,
    /// Webhook failures that are not an answer to a pod: bad requests, certificate, Secret,
    /// caBundle and CA ConfigMap trouble, by reason.
    pub webhook_errors: Family<ReasonLabel, Counter>,
    /// `notAfter` of the webhook certificate being served, unix seconds (0: none yet).
    pub webhook_cert_expiry: Gauge,
    /// Sidecar reports (per integration) refused for impossible values, by reason.
    pub report_refusals: Family<ReasonLabel, Counter>,
    /// Streams the operator ended, by reason (`token_expired`, `pod_gone`, `pod_changed`).
    pub streams_ended: Family<ReasonLabel, Counter>,
    /// Connections closed at once because a listener was at its cap.
    pub connections_refused: Family<ListenerLabel, Counter>,
    /// TokenReviews sent to the API server.
    pub token_reviews: Counter,
    /// Subscriptions answered from the cache of refused tokens, without a TokenReview.
    pub token_review_cache_hits: Counter,
    /// Integrations left out of this replica's peer Lease for its size limit.
    pub peer_state_dropped: Gauge,
    /// `spec.sla.availabilityPercent` as a ratio, per integration that sets it (leader only):
    /// what the SLA burn-rate alerts measure the partner's error ratio against.
    pub sla_availability_objective: Family<IntegrationLabel, Gauge<f64, AtomicU64>>,
    /// The `status.sidecars` counts, per integration (leader only).
    pub sidecars: Family<SidecarsLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tollgate_operator");
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        let reconcile_errors = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by reason",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            reconcile_duration.clone(),
        );
        let connected_sidecars = Gauge::default();
        registry.register(
            "connected_sidecars",
            "Sidecar streams open on this replica",
            connected_sidecars.clone(),
        );
        let auth_rejections = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "auth_rejections",
            "Subscriptions refused, by reason",
            auth_rejections.clone(),
        );
        let push_latency = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "push_latency_seconds",
            "From a revision's creation to its acknowledgement by a sidecar",
            push_latency.clone(),
        );
        let push_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "push_failures",
            "Snapshots pushed to sidecars and never acknowledged, by reason: refused (the sidecar acknowledged a later one instead), unacknowledged (its stream ended first, or too many were pending)",
            push_failures.clone(),
        );
        // Exported at 0 from the start, so a rate over it exists before the first failure.
        for reason in PUSH_FAILURE_REASONS {
            let _ = push_failures.get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            });
        }
        let reports = Counter::default();
        registry.register("sidecar_reports", "Reports received", reports.clone());
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        let webhook_admissions = Family::<AdmissionLabels, Counter>::default();
        registry.register(
            "webhook_admissions",
            "Pod admissions answered by the injection webhook, by outcome and reason",
            webhook_admissions.clone(),
        );
        let webhook_errors = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "webhook_errors",
            "Injection webhook failures (requests, certificates, caBundle, CA ConfigMaps), by reason",
            webhook_errors.clone(),
        );
        let webhook_cert_expiry = Gauge::default();
        registry.register(
            "webhook_cert_expiry_timestamp_seconds",
            "notAfter of the webhook serving certificate in use",
            webhook_cert_expiry.clone(),
        );
        let report_refusals = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "report_refusals",
            "Sidecar reports refused for impossible values, by reason",
            report_refusals.clone(),
        );
        let streams_ended = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "streams_ended",
            "Sidecar streams ended by the operator, by reason",
            streams_ended.clone(),
        );
        let connections_refused = Family::<ListenerLabel, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed at once because the listener was at its cap",
            connections_refused.clone(),
        );
        let token_reviews = Counter::default();
        registry.register(
            "token_reviews",
            "TokenReviews sent to the API server",
            token_reviews.clone(),
        );
        let token_review_cache_hits = Counter::default();
        registry.register(
            "token_review_cache_hits",
            "Subscriptions refused from the cache of refused tokens",
            token_review_cache_hits.clone(),
        );
        let peer_state_dropped = Gauge::default();
        registry.register(
            "peer_state_dropped_integrations",
            "Integrations left out of this replica's peer Lease for its size limit",
            peer_state_dropped.clone(),
        );
        let sla_availability_objective =
            Family::<IntegrationLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "sla_availability_objective_ratio",
            "spec.sla.availabilityPercent / 100, per integration that sets it (written by the leader)",
            sla_availability_objective.clone(),
        );
        let sidecars = Family::<SidecarsLabels, Gauge>::default();
        registry.register(
            "sidecars",
            "Sidecars that receive an integration (state=desired) and that run its current revision (state=up_to_date), as its status shows (written by the leader)",
            sidecars.clone(),
        );
        Self {
            registry,
            sla_availability_objective,
            sidecars,
            report_refusals,
            streams_ended,
            connections_refused,
            token_reviews,
            token_review_cache_hits,
            peer_state_dropped,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            connected_sidecars,
            auth_rejections,
            push_latency,
            push_failures,
            reports,
            leader,
            webhook_admissions,
            webhook_errors,
            webhook_cert_expiry,
        }
    }

    pub fn admission(&self, outcome: &str, reason: &str) {
        self.webhook_admissions
            .get_or_create(&AdmissionLabels {
                outcome: outcome.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn webhook_error(&self, reason: &str) {
        self.webhook_errors
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn reconcile_failed(&self, label: &str) {
        self.reconcile_errors
            .get_or_create(&ReasonLabel {
                reason: label.to_string(),
            })
            .inc();
    }

    pub fn auth_rejected(&self, label: &str) {
        self.auth_rejections
            .get_or_create(&ReasonLabel {
                reason: label.to_string(),
            })
            .inc();
    }

    pub fn report_refused(&self, reason: &str) {
        self.report_refusals
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn stream_ended(&self, reason: &str) {
        self.streams_ended
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn connection_refused(&self, listener: &str) {
        self.connections_refused
            .get_or_create(&ListenerLabel {
                listener: listener.to_string(),
            })
            .inc();
    }

    /// Sets an integration's gauges from what its status shows: its SLA objective (`None`: it
    /// sets none) and its sidecar counts (`None`: nothing is distributed).
    pub fn integration_status(
        &self,
        integration: &str,
        availability_percent: Option<f64>,
        sidecars: Option<(i32, i32)>,
    ) {
        let label = IntegrationLabel {
            integration: integration.to_string(),
        };
        match availability_percent {
            Some(p) => {
                self.sla_availability_objective
                    .get_or_create(&label)
                    .set(p / 100.0);
            }
            None => {
                self.sla_availability_objective.remove(&label);
            }
        }
        for (state, n) in [
            ("desired", sidecars.map(|s| s.0)),
            ("up_to_date", sidecars.map(|s| s.1)),
        ] {
            let labels = SidecarsLabels {
                integration: integration.to_string(),
                state: state.to_string(),
            };
            match n {
                Some(n) => {
                    self.sidecars.get_or_create(&labels).set(i64::from(n));
                }
                None => {
                    self.sidecars.remove(&labels);
                }
            }
        }
    }

    /// Drops an integration's gauges: it is gone, or this replica no longer leads (the new
    /// leader exports them).
    pub fn forget_integration(&self, integration: &str) {
        self.integration_status(integration, None, None);
    }

    pub fn observe_push(&self, latency: Duration) {
        self.push_latency.observe(latency.as_secs_f64());
    }

    /// `n` pushes failed for `reason`, one of [`PUSH_FAILURE_REASONS`].
    pub fn push_failed(&self, reason: &'static str, n: usize) {
        if n > 0 {
            self.push_failures
                .get_or_create(&ReasonLabel {
                    reason: reason.to_string(),
                })
                .inc_by(n as u64);
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Whether the replica is ready: set once the CRD check passed and the servers listen.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Connections the admin listener holds at once; more are closed at once.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Serves `/metrics`, `/healthz` and `/readyz` over plain HTTP/1.1 until the task is dropped,
/// at most [`ADMIN_MAX_CONNECTIONS`] connections at once, each header block within 10 s.
pub async fn serve_admin(listener: TcpListener, metrics: Arc<Metrics>, ready: Readiness) {
    serve_admin_capped(listener, metrics, ready, ADMIN_MAX_CONNECTIONS).await
}

async fn serve_admin_capped(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: Readiness,
    max_connections: usize,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics.connection_refused("admin");
            continue;
        };
        let metrics = metrics.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                let ready = ready.clone();
                async move { Ok::<_, Infallible>(admin(&req, &metrics, &ready)) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            let _ = builder
                .http1_only()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn admin(req: &Request<Incoming>, metrics: &Metrics, ready: &Readiness) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, ct: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(ct),
        );
        r
    };
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if ready.get() => text(StatusCode::OK, "text/plain", "ready\n".into()),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn admin_serves_metrics_health_and_readiness() {
        let metrics = Arc::new(Metrics::new());
        metrics.reconciles.inc();
        metrics.reconcile_failed("api_conflict");
        metrics.connected_sidecars.set(3);
        metrics.observe_push(Duration::from_millis(12));
        let ready = Readiness::default();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_admin(listener, metrics, ready.clone()));

        let m = get(addr, "/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        for line in [
            "tollgate_operator_reconciles_total 1",
            "tollgate_operator_reconcile_errors_total{reason=\"api_conflict\"} 1",
            "tollgate_operator_connected_sidecars 3",
            "tollgate_operator_push_latency_seconds_count 1",
            "tollgate_operator_leader 0",
        ] {
            assert!(m.contains(line), "missing {line:?} in\n{m}");
        }
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        ready.set(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    }

    /// Idle connections cannot take the admin listener: past the cap, a connection is closed
    /// at once and counted; when one goes, the next is served.
    #[tokio::test]
    async fn admin_connections_are_capped() {
        let metrics = Arc::new(Metrics::new());
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_admin_capped(
            listener,
            metrics.clone(),
            Readiness::default(),
            2,
        ));
        let idle1 = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _idle2 = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
            .await
            .expect("closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0, "the third connection is closed unanswered");
        assert!(
            metrics
                .encode()
                .contains("tollgate_operator_connections_refused_total{listener=\"admin\"} 1")
        );
        drop(idle1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let attempt = async {
                let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
                s.write_all(
                    b"GET /healthz HTTP/1.1
host: x
connection: close

",
                )
                .await
                .ok()?;
                let mut out = String::new();
                s.read_to_string(&mut out).await.ok()?;
                Some(out)
            };
            let r = tokio::time::timeout(Duration::from_secs(1), attempt).await;
            if r.ok()
                .flatten()
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(
                tokio::time::Instant::now() < deadline,
                "a freed slot is served"
            );
        }
    }
}
