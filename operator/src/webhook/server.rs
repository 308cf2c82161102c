//! The webhook's HTTPS endpoint: `POST /inject/namespace` and `POST /inject/pod`, each taking an
//! `admission.k8s.io/v1` AdmissionReview of a Pod and answering one with a JSON patch.
//!
//! Never fails open silently: an injection that cannot be built denies the pod, an unreadable
//! request gets 400 (the API server then applies the webhook's `failurePolicy`), and both are
//! logged and counted in `tollgate_operator_webhook_errors_total` /
//! `tollgate_operator_webhook_admissions_total`.

use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::inject::{self, Decision, InjectConfig, Scope};
use crate::metrics::Metrics;

/// Path of the webhook for namespaces labelled `tollgate.dev/inject=enabled`.
pub const NAMESPACE_PATH: &str = "/inject/namespace";
/// Path of the webhook for every other (not excluded) namespace: the annotation decides.
pub const POD_PATH: &str = "/inject/pod";
/// Largest AdmissionReview accepted (the API server's own object limit is 3 MiB).
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections held at once (the API server keeps a few alive); more are closed at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Longest wait for a request's header block, and for its body.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The certificate the webhook serves, swapped whole when the Secret changes. Until one is
/// set, handshakes fail (and the API server applies the failure policy).
#[derive(Debug, Default)]
pub struct CertSlot(RwLock<Option<Arc<rustls::sign::CertifiedKey>>>);

impl CertSlot {
    pub fn set(&self, key: Arc<rustls::sign::CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(key);
    }

    pub fn is_set(&self) -> bool {
        self.0.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

impl rustls::server::ResolvesServerCert for CertSlot {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A rustls configuration serving whatever `slot` holds (h2 and http/1.1).
pub fn slot_tls_config(slot: Arc<CertSlot>) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(slot);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The webhook's shared state.
pub struct Webhook {
    pub config: InjectConfig,
    /// The operator's own addresses as CIDRs, kept current by a resolver task.
    pub operator_cidrs: watch::Receiver<Arc<Vec<String>>>,
    pub metrics: Arc<Metrics>,
}

/// How one admission ended, for the metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub outcome: &'static str,
    pub reason: &'static str,
}

/// Answers one admission request. Pure apart from its inputs.
pub fn review(
    cfg: &InjectConfig,
    scope: Scope,
    operator_cidrs: &[String],
    req: &AdmissionRequest<Pod>,
) -> (AdmissionResponse, Outcome) {
    let allow = AdmissionResponse::from(req);
    let is_pod = req.kind.group.is_empty() && req.kind.kind == "Pod";
    if !is_pod || req.operation != Operation::Create || req.sub_resource.is_some() {
        return (
            allow,
            Outcome {
                outcome: "skipped",
                reason: "not-a-pod-creation",
            },
        );
    }
    let Some(pod) = &req.object else {
        return (
            allow.deny("no pod in the admission request"),
            Outcome {
                outcome: "error",
                reason: "no-object",
            },
        );
    };
    let namespace = req
        .namespace
        .as_deref()
        .or(pod.metadata.namespace.as_deref())
        .unwrap_or_default();
    match inject::decide(cfg, scope, namespace, pod) {
        Decision::Skip(skip) => {
            let mut resp = allow;
            if skip == inject::Skip::HostNetwork {
                resp.warnings = Some(vec![
                    "tollgate: hostNetwork pods are not injected (the sidecar's ports and rules \
                     would be the node's)"
                        .to_string(),
                ]);
            }
            (
                resp,
                Outcome {
                    outcome: "skipped",
                    reason: skip.label(),
                },
            )
        }
        Decision::Deny(message) => (
            allow.deny(format!("tollgate sidecar injection: {message}")),
            Outcome {
                outcome: "denied",
                reason: "invalid-annotation",
            },
        ),
        Decision::Inject(mode) => {
            let (ops, warnings) = inject::patch(cfg, pod, mode, operator_cidrs);
            let patched =
                serde_json::from_value::<json_patch::Patch>(serde_json::Value::Array(ops))
                    .map_err(|e| e.to_string())
                    .and_then(|p| allow.clone().with_patch(p).map_err(|e| e.to_string()));
            match patched {
                Ok(mut resp) => {
                    if !warnings.is_empty() {
                        resp.warnings = Some(warnings);
                    }
                    (
                        resp,
                        Outcome {
                            outcome: "injected",
                            reason: mode.as_str(),
                        },
                    )
                }
                // The pod asked for the sidecar: refusing it beats starting it unguarded.
                Err(e) => (
                    allow.deny(format!("tollgate sidecar injection failed: {e}")),
                    Outcome {
                        outcome: "error",
                        reason: "patch",
                    },
                ),
            }
        }
    }
}

/// Accepts connections until the task is dropped.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, webhook: Arc<Webhook>) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "webhook accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = MAX_CONNECTIONS, "webhook connection limit reached; closing");
            webhook.metrics.connection_refused("webhook");
            continue;
        };
        let acceptor = acceptor.clone();
        let webhook = webhook.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "webhook TLS handshake failed");
                    webhook.metrics.webhook_error("tls-handshake");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "webhook TLS handshake timed out");
                    return;
                }
            };
            let svc = service_fn(move |req| {
                let webhook = webhook.clone();
                async move { Ok::<_, Infallible>(webhook.handle(req).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            builder.http2().timer(TokioTimer::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), svc).await {
                tracing::debug!(%peer, error = %e, "webhook connection ended");
            }
        });
    }
}

impl Webhook {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let scope = match req.uri().path() {
            NAMESPACE_PATH => Scope::Namespace,
            POD_PATH => Scope::Pod,
            _ => return plain(StatusCode::NOT_FOUND, "not found"),
        };
        if req.method() != Method::POST {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview");
        }
        let body = match tokio::time::timeout(
            BODY_TIMEOUT,
            Limited::new(req.into_body(), MAX_BODY_BYTES).collect(),
        )
        .await
        {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => return self.bad_request(&format!("reading the body: {e}")),
            Err(_) => return self.bad_request("the body did not arrive in time"),
        };
        let review_in: AdmissionReview<Pod> = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return self.bad_request(&format!("not an AdmissionReview of a Pod: {e}")),
        };
        let request: AdmissionRequest<Pod> = match review_in.try_into() {
            Ok(r) => r,
            Err(_) => return self.bad_request("AdmissionReview without a request"),
        };
        let cidrs = self.operator_cidrs.borrow().clone();
        let (response, outcome) = review(&self.config, scope, &cidrs, &request);
        self.metrics.admission(outcome.outcome, outcome.reason);
        let pod = pod_name(&request);
        let namespace = request.namespace.as_deref().unwrap_or_default();
        match outcome.outcome {
            "injected" => {
                tracing::info!(%namespace, %pod, mode = outcome.reason, dry_run = request.dry_run, "sidecar injected")
            }
            "denied" => {
                tracing::info!(%namespace, %pod, message = %response.result.message, "pod refused")
            }
            "error" => {
                tracing::error!(%namespace, %pod, message = %response.result.message, "injection failed; pod refused")
            }
            _ => tracing::debug!(%namespace, %pod, reason = outcome.reason, "not injected"),
        }
        match serde_json::to_vec(&review_json(response)) {
            Ok(json) => {
                let mut r = Response::new(Full::new(Bytes::from(json)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            Err(e) => {
                tracing::error!(error = %e, "serializing the AdmissionReview");
                self.metrics.webhook_error("serialize");
                plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot serialize the response",
                )
            }
        }
    }

    fn bad_request(&self, message: &str) -> Response<Full<Bytes>> {
        tracing::warn!(%message, "webhook request refused");
        self.metrics.webhook_error("bad-request");
        plain(StatusCode::BAD_REQUEST, message)
    }
}

/// The AdmissionReview to send back. The patch goes out base64-encoded, as the API documents
/// `[]byte` fields (kube serializes it as an array of numbers, which Go happens to accept).
pub fn review_json(response: AdmissionResponse) -> serde_json::Value {
    let patch = response.patch.clone();
    let mut review = serde_json::to_value(response.into_review()).unwrap_or_default();
    if let (Some(patch), Some(r)) = (patch, review.get_mut("response")) {
        r["patch"] = serde_json::to_value(k8s_openapi::ByteString(patch)).unwrap_or_default();
    }
    review
}

fn pod_name(req: &AdmissionRequest<Pod>) -> String {
    if !req.name.is_empty() {
        return req.name.clone();
    }
    req.object
        .as_ref()
        .and_then(|p| p.metadata.generate_name.clone())
        .map(|g| format!("{g}*"))
        .unwrap_or_default()
}

fn plain(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{message}\n"))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::inject::tests::config;
    use serde_json::{Value, json};

    fn request(namespace: &str, operation: &str, pod: Value) -> AdmissionRequest<Pod> {
        let review: AdmissionReview<Pod> = serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "name": "app",
                "namespace": namespace,
                "operation": operation,
                "userInfo": {"username": "admin"},
                "object": pod,
                "dryRun": false
            }
        }))
        .unwrap();
        review.try_into().unwrap()
    }

    fn pod() -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app"},
               "spec": {"containers": [{"name": "app", "image": "app:1"}]}})
    }

    fn patch_of(resp: &AdmissionResponse) -> Value {
        let bytes = resp.patch.as_ref().expect("a patch");
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn an_opted_in_pod_gets_a_json_patch_answer_under_its_uid() {
        let cfg = config();
        let req = request("payments", "CREATE", pod());
        let (resp, outcome) = review(&cfg, Scope::Namespace, &[], &req);
        assert_eq!(
            outcome,
            Outcome {
                outcome: "injected",
                reason: "iptables"
            }
        );
        assert!(resp.allowed);
        let review = review_json(resp.clone());
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(review["kind"], "AdmissionReview");
        assert_eq!(
            review["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        assert_eq!(review["response"]["patchType"], "JSONPatch");
        // The patch travels base64-encoded.
        let decoded: k8s_openapi::ByteString =
            serde_json::from_value(review["response"]["patch"].clone()).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&decoded.0).unwrap(),
            patch_of(&resp)
        );
        assert!(patch_of(&resp).as_array().unwrap().len() >= 3);
    }

    #[test]
    fn skips_and_refusals_carry_no_patch() {
        let cfg = config();
        let (resp, outcome) = review(&cfg, Scope::Pod, &[], &request("payments", "CREATE", pod()));
        assert!(resp.allowed && resp.patch.is_none());
        assert_eq!(outcome.reason, "not-opted-in");

        let (resp, outcome) = review(
            &cfg,
            Scope::Namespace,
            &[],
            &request("kube-system", "CREATE", pod()),
        );
        assert!(resp.allowed && resp.patch.is_none());
        assert_eq!(outcome.reason, "excluded-namespace");

        let (resp, outcome) = review(
            &cfg,
            Scope::Namespace,
            &[],
            &request("payments", "UPDATE", pod()),
        );
        assert!(resp.allowed && resp.patch.is_none());
        assert_eq!(outcome.reason, "not-a-pod-creation");

        let mut bad = pod();
        bad["metadata"]["annotations"] = json!({"tollgate.dev/interception": "magic"});
        let (resp, outcome) = review(
            &cfg,
            Scope::Namespace,
            &[],
            &request("payments", "CREATE", bad),
        );
        assert!(!resp.allowed && resp.patch.is_none());
        assert_eq!(
            outcome,
            Outcome {
                outcome: "denied",
                reason: "invalid-annotation"
            }
        );
        assert!(
            resp.result.message.contains("tollgate.dev/interception"),
            "{}",
            resp.result.message
        );

        let mut host = pod();
        host["spec"]["hostNetwork"] = json!(true);
        let (resp, outcome) = review(
            &cfg,
            Scope::Namespace,
            &[],
            &request("payments", "CREATE", host),
        );
        assert!(resp.allowed && resp.patch.is_none());
        assert_eq!(outcome.reason, "host-network");
        assert!(resp.warnings.unwrap()[0].contains("hostNetwork"));
    }
}
