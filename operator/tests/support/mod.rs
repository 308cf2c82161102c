//! Test support: a fake API server for TokenReviews and Pods, certificates, an operator
//! "process" (its own runtime, so stopping it closes every socket it holds).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use tollgate_operator::catalog::CatalogHandle;
use tollgate_operator::distribution::{
    Authenticator, Distribution, Hub, HubSettings, ServerLimits, serve, tls_config,
};
use tollgate_operator::metrics::Metrics;

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

/// Stands in for kube-apiserver's TokenReview and Pod endpoints.
#[derive(Clone, Default)]
pub struct FakeApi {
    pub tokens: Arc<Mutex<BTreeMap<String, TokenKind>>>,
    pub pods: Arc<Mutex<BTreeMap<(String, String), FakePod>>>,
}

impl FakeApi {
    pub fn add_pod(&self, namespace: &str, name: &str, labels: &[(&str, &str)]) -> String {
        let token = format!("token-{namespace}-{name}");
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

    pub fn add_token(&self, token: &str, kind: TokenKind) {
        self.tokens.lock().unwrap().insert(token.into(), kind);
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
            let kind = self.tokens.lock().unwrap().get(&token).cloned();
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

/// A self-signed certificate for `localhost`, and where its PEM is on disk (the CA bundle).
pub struct Certs {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_file: PathBuf,
}

pub fn certs(dir: &std::path::Path) -> Certs {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = ck.cert.pem();
    let key_pem = ck.signing_key.serialize_pem();
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, &cert_pem).unwrap();
    Certs {
        cert_pem,
        key_pem,
        ca_file,
    }
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
        certs: &Certs,
        api: &FakeApi,
        catalog: CatalogHandle,
        settings: HubSettings,
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
                    limits: ServerLimits::default(),
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

/// A port free on loopback now.
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}
