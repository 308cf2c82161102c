//! Test support: a fake API server for TokenReviews and Pods, certificates, an operator
//! "process" (its own runtime, so stopping it closes every socket it holds).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use tollgate_operator::catalog::CatalogHandle;
use tollgate_operator::distribution::{
    Authenticator, Distribution, Hub, HubSettings, ServerLimits, serve, tls_config,
};
use tollgate_operator::metrics::Metrics;
use tollgate_testkit::jwt::jwt;
use tollgate_testkit::{ServingCert, TestCa};

pub use tollgate_testkit::free_addr;

/// A pod the fake API server knows, and the token that proves it.
#[derive(Clone, Debug)]
pub struct FakePod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
}

/// What a token stands for at the fake TokenReview.
#[derive(Clone, Debug)]
pub enum TokenKind {
    /// A projected token bound to this pod.
    Pod {
        namespace: String,
        pod: String,
        uid: String,
    },
    /// A ServiceAccount token not bound to any pod.
    Unbound { namespace: String },
    /// Authentication fails.
    Rejected,
}

/// Stands in for kube-apiserver's TokenReview and Pod endpoints. Tokens are JWT-shaped (not
/// signed: this API server knows them by heart) and expire at their `exp`.
#[derive(Clone, Default)]
pub struct FakeApi {
    pub tokens: Arc<Mutex<BTreeMap<String, TokenKind>>>,
    pub pods: Arc<Mutex<BTreeMap<(String, String), FakePod>>>,
    expiry: Arc<Mutex<BTreeMap<String, SystemTime>>>,
    reviews: Arc<AtomicUsize>,
}

impl FakeApi {
    pub fn add_pod(&self, namespace: &str, name: &str, labels: &[(&str, &str)]) -> String {
        self.add_pod_token_expiring(namespace, name, labels, Duration::from_secs(3600))
    }

    /// A pod and a token for it that expires in `lifetime`.
    pub fn add_pod_token_expiring(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        lifetime: Duration,
    ) -> String {
        let exp = SystemTime::now() + lifetime;
        let token = jwt(&format!("{namespace}/{name}"), exp);
        self.expiry.lock().unwrap().insert(token.clone(), exp);
        let uid = format!("uid-{namespace}-{name}");
        self.pods.lock().unwrap().insert(
            (namespace.into(), name.into()),
            FakePod {
                namespace: namespace.into(),
                name: name.into(),
                uid: uid.clone(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
        );
        self.tokens.lock().unwrap().insert(
            token.clone(),
            TokenKind::Pod {
                namespace: namespace.into(),
                pod: name.into(),
                uid,
            },
        );
        token
    }

    /// A JWT-shaped token named `name` standing for `kind`.
    pub fn add_token(&self, name: &str, kind: TokenKind) -> String {
        let token = jwt(name, SystemTime::now() + Duration::from_secs(3600));
        self.tokens.lock().unwrap().insert(token.clone(), kind);
        token
    }

    /// Deletes a pod (its tokens stay, as the TokenReview side does not look).
    pub fn remove_pod(&self, namespace: &str, name: &str) {
        self.pods
            .lock()
            .unwrap()
            .remove(&(namespace.to_string(), name.to_string()));
    }

    /// TokenReviews answered so far.
    pub fn reviews(&self) -> usize {
        self.reviews.load(Ordering::SeqCst)
    }

    pub fn client(&self) -> kube::Client {
        let me = self.clone();
        let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
            let me = me.clone();
            async move { Ok::<_, Infallible>(me.answer(req).await) }
        });
        kube::Client::new(svc, "default")
    }

    async fn answer(&self, req: Request<kube::client::Body>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if method == http::Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            let review: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let token = review["spec"]["token"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            self.reviews.fetch_add(1, Ordering::SeqCst);
            let expired = self
                .expiry
                .lock()
                .unwrap()
                .get(&token)
                .is_some_and(|exp| *exp <= SystemTime::now());
            let kind = self
                .tokens
                .lock()
                .unwrap()
                .get(&token)
                .cloned()
                .filter(|_| !expired);
            let status = match kind {
                Some(TokenKind::Pod {
                    namespace,
                    pod,
                    uid,
                }) => json!({
                    "authenticated": true,
                    "audiences": ["tollgate"],
                    "user": {
                        "username": format!("system:serviceaccount:{namespace}:default"),
                        "extra": {
                            "authentication.kubernetes.io/pod-name": [pod],
                            "authentication.kubernetes.io/pod-uid": [uid],
                        }
                    }
                }),
                Some(TokenKind::Unbound { namespace }) => json!({
                    "authenticated": true,
                    "audiences": ["tollgate"],
                    "user": {"username": format!("system:serviceaccount:{namespace}:default")}
                }),
                Some(TokenKind::Rejected) | None => json!({
                    "authenticated": false,
                    "error": "invalid bearer token"
                }),
            };
            return ok(json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": review["spec"],
                "status": status,
            }));
        }
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if method == http::Method::GET
            && let ["api", "v1", "namespaces", ns, "pods", name] = parts.as_slice()
        {
            let pod = self
                .pods
                .lock()
                .unwrap()
                .get(&(ns.to_string(), name.to_string()))
                .cloned();
            return match pod {
                Some(p) => ok(json!({
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": p.name, "namespace": p.namespace, "uid": p.uid, "labels": p.labels},
                    "status": {"phase": "Running"},
                })),
                None => not_found(&format!("pods \"{name}\" not found")),
            };
        }
        not_found(&format!("{method} {path}"))
    }
}

pub fn ok(v: serde_json::Value) -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::from(v.to_string())))
}

pub fn not_found(message: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": message})
            .to_string(),
    )));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}

/// A CA and a serving certificate it signed for `localhost`, written into `dir` (`ca.crt` is
/// the bundle a client trusts).
/// A test's directory, the operator's serving certificate in it, and an empty fake API server.
pub fn fixture() -> (tempfile::TempDir, ServingCert, FakeApi) {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    (dir, certs, FakeApi::default())
}

pub fn certs(dir: &std::path::Path) -> ServingCert {
    TestCa::new()
        .write_serving_cert(dir, &["localhost"])
        .unwrap()
}

/// The distribution side of an operator, in a runtime of its own: [`OperatorProcess::stop`]
/// drops the runtime, which closes every connection, as a stopped process would.
pub struct OperatorProcess {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OperatorProcess {
    pub fn start(
        addr: SocketAddr,
        certs: &ServingCert,
        api: &FakeApi,
        catalog: CatalogHandle,
        settings: HubSettings,
    ) -> Self {
        Self::start_with(addr, certs, api, catalog, settings, ServerLimits::default())
    }

    pub fn start_with(
        addr: SocketAddr,
        certs: &ServingCert,
        api: &FakeApi,
        catalog: CatalogHandle,
        settings: HubSettings,
        limits: ServerLimits,
    ) -> Self {
        let tls = Arc::new(
            tls_config(
                certs.cert_pem.as_bytes(),
                certs.key_pem.as_bytes(),
                "cert",
                "key",
            )
            .unwrap(),
        );
        let metrics = Arc::new(Metrics::new());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let api = api.clone();
        let m = metrics.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
                let hub = Hub::new(catalog, m.clone(), settings);
                tokio::spawn(hub.clone().run());
                let d = Arc::new(Distribution {
                    hub: hub.clone(),
                    auth: Authenticator::new(api.client()),
                    metrics: m,
                    limits,
                });
                tokio::spawn(serve(listener, tls, d));
                ready_tx.send(hub).unwrap();
                let _ = stop.await;
            });
            // Dropping the runtime drops every task, and with them every socket.
            drop(rt);
        });
        let hub = ready_rx.recv().unwrap();
        Self {
            hub,
            metrics,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.halt();
    }
}

/// A TLS connection to the endpoint, trusting `certs`, speaking HTTP/1.1.
pub async fn tls_connect(
    addr: SocketAddr,
    certs: &ServingCert,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(certs.client_config())
        .connect(name, tcp)
        .await
        .unwrap()
}

/// The `p` quantile (0 to 1) of `sorted`, nearest rank; zero when there is none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// A sidecar's settings for the operator at `addr`, whose certificate names `localhost`: the
/// pod `namespace/pod`, its token in `token_file`, its snapshot kept in `state_file`.
pub fn cluster_config(
    addr: SocketAddr,
    ca_file: impl Into<std::path::PathBuf>,
    token_file: impl Into<std::path::PathBuf>,
    namespace: &str,
    pod: &str,
    state_file: impl Into<std::path::PathBuf>,
) -> tollgate_sidecar::cluster::ClusterConfig {
    let mut config = tollgate_sidecar::cluster::ClusterConfig::new(
        format!("https://127.0.0.1:{}", addr.port())
            .parse()
            .expect("an https URL"),
        token_file,
        ca_file,
        pod,
        namespace,
        state_file,
    );
    config.server_name = Some("localhost".into());
    config
}
