//! Connections to partners: one pool per integration, TLS origination with rustls, and a
//! connect deadline that covers TCP and the TLS handshake together.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use tower::Service;

use crate::body::{BoxError, ReqBody};

/// Pool settings shared by every integration's client.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub idle_timeout: Duration,
    pub max_idle_per_host: usize,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            idle_timeout: Duration::from_secs(90),
            max_idle_per_host: 64,
        }
    }
}

/// The trust anchors for partner TLS: the system's roots, the bundled Mozilla roots when the
/// system has none, and an optional extra CA bundle (`--ca-bundle`).
pub fn tls_config(extra_ca_pem: Option<&[u8]>) -> anyhow::Result<Arc<ClientConfig>> {
    config_from_roots(roots(extra_ca_pem)?)
}

/// The roots [`tls_config`] trusts.
pub fn roots(extra_ca_pem: Option<&[u8]>) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(pem) = extra_ca_pem {
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            roots
                .add(cert.map_err(|e| anyhow::anyhow!("--ca-bundle: unreadable certificate: {e}"))?)
                .map_err(|e| anyhow::anyhow!("--ca-bundle: rejected certificate: {e}"))?;
            added += 1;
        }
        if added == 0 {
            anyhow::bail!("--ca-bundle: no PEM certificate found");
        }
    }
    Ok(roots)
}

/// A client configuration trusting `roots`.
pub fn config_from_roots(roots: RootCertStore) -> anyhow::Result<Arc<ClientConfig>> {
    let config = builder()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The certificate and key an integration presents to its partner (`upstream.clientCertificate`),
/// held in memory only. `Debug` shows the chain's length, never the key.
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl ClientIdentity {
    /// From a `kubernetes.io/tls` Secret's `tls.crt` and `tls.key`; the error names the key at
    /// fault and never echoes the text.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, String> {
        let (chain, key) = tollgate_crds::policy::client_identity(cert_pem, key_pem)?;
        Ok(ClientIdentity { chain, key })
    }
}

impl PartialEq for ClientIdentity {
    fn eq(&self, other: &Self) -> bool {
        self.chain == other.chain && self.key.secret_der() == other.key.secret_der()
    }
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("certificates", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// One integration's TLS to its partner: `base` (the sidecar's roots), plus the integration's
/// own `caBundle`, trusted for it alone, and its client certificate when it has one. The
/// bundle was checked when the spec was compiled.
pub fn integration_tls(
    base: &Arc<ClientConfig>,
    base_roots: &RootCertStore,
    ca_bundle: Option<&str>,
    identity: Option<&ClientIdentity>,
) -> Arc<ClientConfig> {
    if ca_bundle.is_none() && identity.is_none() {
        return base.clone();
    }
    let mut roots = base_roots.clone();
    if let Some(pem) = ca_bundle {
        match tollgate_crds::policy::ca_bundle_certificates(pem) {
            Ok(certs) => {
                let (_, ignored) = roots.add_parsable_certificates(certs);
                if ignored > 0 {
                    tracing::warn!(
                        ignored,
                        "caBundle: certificates not usable as trust anchors"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "caBundle not trusted"),
        }
    }
    let built = match identity {
        None => config_from_roots(roots.clone()),
        Some(id) => builder()
            .map(|b| b.with_root_certificates(roots.clone()))
            .and_then(|b| {
                b.with_client_auth_cert(id.chain.clone(), id.key.clone_key())
                    .map_err(|e| anyhow::anyhow!("client certificate: {e}"))
            })
            .map(Arc::new),
    };
    built.unwrap_or_else(|e| {
        tracing::error!(error = %e, "partner TLS configuration failed; no client certificate is presented");
        config_from_roots(roots).unwrap_or_else(|_| base.clone())
    })
}

fn builder() -> anyhow::Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?)
}

pub type HttpClient = Client<TimeoutConnector<HttpsConnector<HttpConnector>>, ReqBody>;

/// Builds one integration's client.
pub fn build(tls: Arc<ClientConfig>, connect_timeout: Duration, pool: &PoolOptions) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    // ALPN http/1.1 to the partner (the builder would send none for an HTTP/1-only client).
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let https = HttpsConnector::from((http, tls));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(pool.idle_timeout)
        .pool_max_idle_per_host(pool.max_idle_per_host)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .set_host(false)
        .build(TimeoutConnector {
            inner: https,
            timeout: connect_timeout,
        })
}

/// Bounds a whole connect (TCP and TLS) by one deadline.
#[derive(Clone, Debug)]
pub struct TimeoutConnector<C> {
    inner: C,
    timeout: Duration,
}

/// The connect deadline passed.
#[derive(Debug, thiserror::Error)]
#[error("connect timed out after {0:?}")]
pub struct ConnectTimeout(pub Duration);

impl<C> Service<Uri> for TimeoutConnector<C>
where
    C: Service<Uri> + Send,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.timeout;
        let fut = self.inner.call(uri);
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(Box::new(ConnectTimeout(timeout)) as BoxError),
            }
        })
    }
}

/// How an attempt failed below HTTP, for retry and breaker decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportFailure {
    /// No connection could be made (refused, DNS, TLS, connect deadline).
    Connect,
    /// The connection broke before a response arrived.
    Reset,
}

/// Classifies a client error.
pub fn classify(err: &hyper_util::client::legacy::Error) -> TransportFailure {
    if err.is_connect() {
        TransportFailure::Connect
    } else {
        TransportFailure::Reset
    }
}
