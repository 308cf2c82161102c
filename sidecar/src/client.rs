//! Connections to partners: one pool per integration ([`crate::pool`]), TLS origination with
//! rustls, and a connect deadline that covers TCP and the TLS handshake together.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

pub use crate::pool::{Pool, PoolOptions};

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

/// One integration's client: its own connection pool.
pub type HttpClient = Pool;

/// Builds one integration's client.
pub fn build(tls: Arc<ClientConfig>, connect_timeout: Duration, pool: &PoolOptions) -> HttpClient {
    Pool::new(tls, connect_timeout, pool)
}

/// The connect deadline passed.
#[derive(Debug, thiserror::Error)]
#[error("connect timed out after {0:?}")]
pub struct ConnectTimeout(pub Duration);

/// How an attempt failed below HTTP, for retry and breaker decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportFailure {
    /// No connection could be made (refused, DNS, TLS, connect deadline).
    Connect,
    /// The connection broke before a response arrived.
    Reset,
}

/// Classifies a client error.
pub fn classify(err: &crate::pool::Error) -> TransportFailure {
    if err.is_connect() {
        TransportFailure::Connect
    } else {
        TransportFailure::Reset
    }
}
