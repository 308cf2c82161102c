//! The HTTPS endpoint sidecars subscribe to (HTTP/2 or HTTP/1.1 over rustls).
//!
//! Limits: at most `max_connections` connections (more are closed at once), headers of at most
//! `max_header_bytes` within `header_timeout`, POST bodies of at most `max_body_bytes` within
//! `body_timeout` (read only once the session header names an open session), a TLS handshake
//! within `handshake_timeout`, at most `max_streams_per_connection` HTTP/2 streams per
//! connection and `max_streams_per_pod` streams per pod. A stream ends when its token expires
//! and when a re-check every `stream_recheck` finds the token or the pod no longer valid.

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
use super::hub::{Authority, Hub, OpenError, Recheck, Verdict};
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
    /// Streams one pod may hold open at once.
    pub max_streams_per_pod: usize,
    /// How often an open stream's token and pod are verified again.
    pub stream_recheck: Duration,
    /// Longest wait for a request's header block, and for an ack or report body.
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// How long a refused token is answered from memory, without a TokenReview.
    pub refused_token_ttl: Duration,
    /// TokenReviews in flight at once; more subscribers wait their turn (up to the header
    /// timeout, then 503).
    pub max_concurrent_reviews: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_header_bytes: 16 * 1024,
            max_body_bytes: 256 * 1024,
            handshake_timeout: Duration::from_secs(10),
            max_streams_per_connection: 16,
            max_streams_per_pod: 4,
            stream_recheck: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            refused_token_ttl: Duration::from_secs(30),
            max_concurrent_reviews: 32,
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

/// A rustls server configuration from PEM files, offering `h2` and `http/1.1`. The files are
/// re-read when they change (cert-manager and friends rotate them in place), checked at most
/// every ten seconds during handshakes; a bad new pair is logged and the old one kept.
pub fn tls_config_from_files(cert: &str, key: &str) -> Result<rustls::ServerConfig, TlsError> {
    files_config(cert, key, ReloadingCert::CHECK_EVERY)
}

fn files_config(
    cert: &str,
    key: &str,
    check_every: Duration,
) -> Result<rustls::ServerConfig, TlsError> {
    let resolver = ReloadingCert::load(cert.into(), key.into(), check_every)?;
    let mut cfg = builder()?.with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = alpn();
    Ok(cfg)
}

/// As [`tls_config_from_files`], from PEM bytes, without reloading (names are for messages).
pub fn tls_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_name: &str,
    key_name: &str,
) -> Result<rustls::ServerConfig, TlsError> {
    let (certs, key) = parse_pair(cert_pem, key_pem, cert_name, key_name)?;
    let mut cfg = builder()?.with_single_cert(certs, key)?;
    cfg.alpn_protocols = alpn();
    Ok(cfg)
}

fn builder()
-> Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::server::WantsServerCert>, TlsError> {
    Ok(rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth())
}

fn alpn() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec(), b"http/1.1".to_vec()]
}

type CertPair = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

fn parse_pair(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_name: &str,
    key_name: &str,
) -> Result<CertPair, TlsError> {
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
    Ok((certs, key))
}

/// Serves the certificate in `cert`/`key`, reloading it when the files change.
#[derive(Debug)]
struct ReloadingCert {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    check_every: Duration,
    state: std::sync::Mutex<CertState>,
}

#[derive(Debug)]
struct CertState {
    current: Arc<rustls::sign::CertifiedKey>,
    stamp: Option<(std::time::SystemTime, std::time::SystemTime)>,
    checked: std::time::Instant,
}

impl ReloadingCert {
    const CHECK_EVERY: Duration = Duration::from_secs(10);

    fn load(
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
        check_every: Duration,
    ) -> Result<Self, TlsError> {
        let current = Self::read(&cert, &key)?;
        let stamp = Self::stamp(&cert, &key);
        Ok(Self {
            cert,
            key,
            check_every,
            state: std::sync::Mutex::new(CertState {
                current,
                stamp,
                checked: std::time::Instant::now(),
            }),
        })
    }

    fn stamp(
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
        let m = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        Some((m(cert)?, m(key)?))
    }

    fn read(
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let (certs, key_der) = parse_pair(
            &read(cert)?,
            &read(key)?,
            &cert.display().to_string(),
            &key.display().to_string(),
        )?;
        // Refuses a key that does not match the certificate (a rotation caught half-written).
        Ok(Arc::new(rustls::sign::CertifiedKey::from_der(
            certs,
            key_der,
            &rustls::crypto::ring::default_provider(),
        )?))
    }
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.checked.elapsed() >= self.check_every {
            st.checked = std::time::Instant::now();
            let stamp = Self::stamp(&self.cert, &self.key);
            if stamp != st.stamp {
                match Self::read(&self.cert, &self.key) {
                    Ok(k) => {
                        tracing::info!(cert = %self.cert.display(), "serving certificate reloaded");
                        st.current = k;
                        st.stamp = stamp;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "new certificate unusable; keeping the old one")
                    }
                }
            }
        }
        Some(st.current.clone())
    }
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
            d.metrics.connection_refused("distribution");
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
                .header_read_timeout(d.limits.header_timeout)
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
        let token = bearer(&req).unwrap_or_default().to_string();
        let pod = match self
            .auth
            .admit(&token, &self.metrics, self.limits.header_timeout)
            .await
        {
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
            (Some(r), Some(d)) => {
                tollgate_crds::distribution::resume_revision(r).map(|r| (r, d.to_string()))
            }
            _ => None,
        };
        tracing::info!(pod = %pod.key(), resume = ?resume.as_ref().map(|r| r.0), "sidecar subscribed");
        let expires = pod.token_expiry.map(|at| {
            tokio::time::Instant::now()
                + at.duration_since(std::time::SystemTime::now())
                    .unwrap_or_default()
        });
        let authority = Authority {
            expires,
            recheck: Some((
                recheck(self.auth.clone(), token, &pod),
                self.limits.stream_recheck,
            )),
            max_streams_per_pod: self.limits.max_streams_per_pod,
        };
        let rx = match self.hub.open_with(pod, resume, authority) {
            Ok((_session, rx)) => rx,
            Err(OpenError::TooManyStreams { pod, max }) => {
                let mut r = self.refuse(&AuthError::TooManyStreams { pod, max });
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                return r;
            }
        };
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
            AuthError::MissingToken
            | AuthError::Malformed
            | AuthError::Expired
            | AuthError::Rejected(_)
            | AuthError::WrongAudience => StatusCode::UNAUTHORIZED,
            AuthError::TooManyStreams { .. } => StatusCode::TOO_MANY_REQUESTS,
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
            .ok_or_else(|| {
                error(
                    StatusCode::BAD_REQUEST,
                    &format!("missing {SESSION_HEADER} header"),
                )
            })?;
        // Only an open session's body is worth reading.
        if !self.hub.has_session(&session) {
            return Err(error(StatusCode::CONFLICT, "unknown session; reconnect"));
        }
        let body = tokio::time::timeout(
            self.limits.body_timeout,
            Limited::new(req.into_body(), self.limits.max_body_bytes).collect(),
        )
        .await
        .map_err(|_| error(StatusCode::REQUEST_TIMEOUT, "body not received in time"))?
        .map_err(|_| error(StatusCode::PAYLOAD_TOO_LARGE, "body too large"))?
        .to_bytes();
        let value = serde_json::from_slice(&body)
            .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid body: {e}")))?;
        Ok((session, value))
    }
}

/// Verifies the stream's token and pod again: a pod gone, recreated or relabelled, or a
/// token the API server no longer accepts, ends the stream; an API server that cannot
/// answer does not (the sidecar keeps what it has, and the next check decides).
fn recheck(auth: Authenticator, token: String, pod: &super::hub::PodIdentity) -> Recheck {
    let original = Arc::new(pod.clone());
    let token = Arc::new(token);
    Arc::new(move || {
        let (auth, token, original) = (auth.clone(), token.clone(), original.clone());
        Box::pin(async move {
            match auth.authenticate(&token).await {
                Ok(now)
                    if now.namespace == original.namespace
                        && now.name == original.name
                        && now.uid == original.uid
                        && now.labels == original.labels =>
                {
                    Verdict::Keep
                }
                Ok(_) => Verdict::End("pod_changed"),
                Err(e) if e.is_unavailable() => Verdict::Keep,
                Err(AuthError::PodGone(_) | AuthError::PodUidMismatch(_)) => {
                    Verdict::End("pod_gone")
                }
                Err(_) => Verdict::End("token_rejected"),
            }
        })
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn pair() -> (String, String) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        (ck.cert.pem(), ck.signing_key.serialize_pem())
    }

    async fn handshake(addr: std::net::SocketAddr, trusted_pem: &str) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut BufReader::new(trusted_pem.as_bytes())) {
            roots.add(c.unwrap()).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        match tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
        {
            Ok(mut s) => {
                let _ = s.shutdown().await;
                true
            }
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn rotated_certificate_files_are_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (old_cert, old_key) = pair();
        let (new_cert, new_key) = pair();
        std::fs::write(&cert_path, &old_cert).unwrap();
        std::fs::write(&key_path, &old_key).unwrap();
        let cfg = files_config(
            cert_path.to_str().unwrap(),
            key_path.to_str().unwrap(),
            Duration::ZERO,
        )
        .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(tcp).await;
                });
            }
        });
        assert!(handshake(addr, &old_cert).await);
        assert!(!handshake(addr, &new_cert).await);

        // Rotate in place (mtime moves forward); half-way the pair does not match.
        tokio::time::sleep(Duration::from_millis(20)).await;
        std::fs::write(&cert_path, &new_cert).unwrap();
        assert!(
            handshake(addr, &old_cert).await,
            "half a rotation keeps the old pair"
        );
        std::fs::write(&key_path, &new_key).unwrap();
        assert!(handshake(addr, &new_cert).await);
        assert!(!handshake(addr, &old_cert).await);

        // A broken rotation keeps the last good pair.
        tokio::time::sleep(Duration::from_millis(20)).await;
        std::fs::write(&key_path, "not a key").unwrap();
        assert!(handshake(addr, &new_cert).await);
    }
}
