//! The HTTPS endpoint sidecars subscribe to (HTTP/2 or HTTP/1.1 over rustls).
//!
//! Limits: at most `max_connections` connections (more are closed at once), headers of at most
//! `max_header_bytes`, POST bodies of at most `max_body_bytes`, a TLS handshake within
//! `handshake_timeout`, at most `max_streams_per_connection` HTTP/2 streams per connection.

use std::convert::Infallible;
use std::io::BufReader;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tollgate_crds::distribution::{
    ACK_PATH, Ack, NDJSON, REPORT_PATH, Report, SESSION_HEADER, SUBSCRIBE_PATH,
};

use super::auth::{AuthError, Authenticator};
use super::hub::Hub;
use crate::metrics::Metrics;

type Body = BoxBody<Bytes, Infallible>;

/// Limits of the endpoint.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    pub handshake_timeout: Duration,
    pub max_streams_per_connection: u32,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_header_bytes: 16 * 1024,
            max_body_bytes: 256 * 1024,
            handshake_timeout: Duration::from_secs(10),
            max_streams_per_connection: 16,
        }
    }
}

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: no certificate in PEM")]
    NoCertificate(String),
    #[error("{0}: no private key in PEM")]
    NoKey(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A rustls server configuration from PEM files, offering `h2` and `http/1.1`.
pub fn tls_config_from_files(cert: &str, key: &str) -> Result<rustls::ServerConfig, TlsError> {
    let read = |p: &str| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.to_string(),
            source,
        })
    };
    tls_config(&read(cert)?, &read(key)?, cert, key)
}

/// As [`tls_config_from_files`], from PEM bytes (names are for messages).
pub fn tls_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_name: &str,
    key_name: &str,
) -> Result<rustls::ServerConfig, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut BufReader::new(cert_pem))
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: cert_name.to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert_name.to_string()));
    }
    let key = rustls_pemfile::private_key(&mut BufReader::new(key_pem))
        .map_err(|source| TlsError::Read {
            path: key_name.to_string(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey(key_name.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The endpoint's shared state.
pub struct Distribution {
    pub hub: Arc<Hub>,
    pub auth: Authenticator,
    pub metrics: Arc<Metrics>,
    pub limits: ServerLimits,
}

/// Accepts connections until the future is dropped.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, d: Arc<Distribution>) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(d.limits.max_connections));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = d.limits.max_connections, "connection limit reached; closing");
            continue;
        };
        let acceptor = acceptor.clone();
        let d = d.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(d.limits.handshake_timeout, acceptor.accept(tcp))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let svc = {
                let d = d.clone();
                service_fn(move |req| {
                    let d = d.clone();
                    async move { Ok::<_, Infallible>(d.handle(req).await) }
                })
            };
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(d.limits.max_header_bytes.max(8192));
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_header_list_size(u32::try_from(d.limits.max_header_bytes).unwrap_or(u32::MAX))
                .max_concurrent_streams(d.limits.max_streams_per_connection)
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(10));
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), svc).await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

impl Distribution {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path();
        match (req.method().clone(), path) {
            (Method::GET, SUBSCRIBE_PATH) => self.subscribe(req).await,
            (Method::POST, ACK_PATH) => match self.session_body::<Ack>(req).await {
                Ok((session, ack)) if self.hub.ack(&session, ack.revision) => no_content(),
                Ok(_) => error(StatusCode::CONFLICT, "unknown session; reconnect"),
                Err(r) => r,
            },
            (Method::POST, REPORT_PATH) => match self.session_body::<Report>(req).await {
                Ok((session, report)) if self.hub.report(&session, &report) => no_content(),
                Ok(_) => error(StatusCode::CONFLICT, "unknown session; reconnect"),
                Err(r) => r,
            },
            (_, SUBSCRIBE_PATH | ACK_PATH | REPORT_PATH) => {
                error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            }
            _ => error(StatusCode::NOT_FOUND, "not found"),
        }
    }

    async fn subscribe(&self, req: Request<Incoming>) -> Response<Body> {
        let query = Query::parse(req.uri().query().unwrap_or(""));
        let token = bearer(&req).unwrap_or_default();
        let pod = match self.auth.authenticate(token).await {
            Ok(pod) => pod,
            Err(e) => return self.refuse(&e),
        };
        // The client names itself too; a mismatch means a misconfigured sidecar.
        if let (Some(ns), Some(name)) = (query.get("namespace"), query.get("pod"))
            && (ns != pod.namespace || name != pod.name)
        {
            return self.refuse(&AuthError::IdentityMismatch {
                claimed: format!("{ns}/{name}"),
                actual: pod.key(),
            });
        }
        let resume = match (query.get("revision"), query.get("digest")) {
            (Some(r), Some(d)) => r.parse::<u64>().ok().map(|r| (r, d.to_string())),
            _ => None,
        };
        tracing::info!(pod = %pod.key(), resume = ?resume.as_ref().map(|r| r.0), "sidecar subscribed");
        let (_session, rx) = self.hub.open(pod, resume);
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|line| (Ok::<_, Infallible>(Frame::data(line)), rx))
        });
        let mut resp = Response::new(StreamBody::new(stream).boxed());
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }

    fn refuse(&self, e: &AuthError) -> Response<Body> {
        self.metrics.auth_rejected(e.metric_label());
        if e.is_unavailable() {
            tracing::warn!(error = %e, "cannot authenticate sidecar");
            return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
        }
        tracing::info!(error = %e, "sidecar refused");
        let status = match e {
            AuthError::MissingToken | AuthError::Rejected(_) | AuthError::WrongAudience => {
                StatusCode::UNAUTHORIZED
            }
            _ => StatusCode::FORBIDDEN,
        };
        error(status, &e.to_string())
    }

    /// The session header and a JSON body within the size limit.
    async fn session_body<T: serde::de::DeserializeOwned>(
        &self,
        req: Request<Incoming>,
    ) -> Result<(String, T), Response<Body>> {
        let session = req
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| error(StatusCode::BAD_REQUEST, "missing session header"))?;
        let body = Limited::new(req.into_body(), self.limits.max_body_bytes)
            .collect()
            .await
            .map_err(|_| error(StatusCode::PAYLOAD_TOO_LARGE, "body too large"))?
            .to_bytes();
        let value = serde_json::from_slice(&body)
            .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid body: {e}")))?;
        Ok((session, value))
    }
}

fn bearer<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn no_content() -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `a=b&c=d`; values are Kubernetes names, numbers and hex, so no percent-decoding is needed.
struct Query<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Query<'a> {
    fn parse(q: &'a str) -> Self {
        Self(q.split('&').filter_map(|kv| kv.split_once('=')).collect())
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}
