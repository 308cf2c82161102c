//! The pod's own certificate authority: generated at start, its private key kept only in this
//! process's memory, used only to mint short-lived leaves for declared partner hosts.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// How long the pod CA is valid. Apps read it once at start; a pod that lives longer must be
/// restarted to get a fresh one.
pub(crate) const CA_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long a minted leaf is valid.
pub(crate) const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A cached leaf is re-minted once it has less than this left.
pub(crate) const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(3600);
/// Certificates start this far in the past, for app clocks slightly behind the sidecar's.
const BACKDATE: Duration = Duration::from_secs(300);
/// Cached leaves at most (one per partner host in use); the cache is emptied when full.
const MAX_LEAVES: usize = 1024;

/// Why no certificate could be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CaError {
    #[error("cannot generate the pod CA: {0}")]
    Generate(rcgen::Error),
    #[error("cannot mint a certificate for {host}: {reason}")]
    Mint { host: String, reason: String },
}

/// A pod CA. Its key never leaves this struct: not serialised, not logged (`Debug` shows only
/// the certificate's validity), not written anywhere.
pub struct PodCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    not_after: SystemTime,
    provider: Arc<rustls::crypto::CryptoProvider>,
    leaves: Mutex<HashMap<String, Leaf>>,
}

struct Leaf {
    config: Arc<ServerConfig>,
    expires: SystemTime,
}

impl std::fmt::Debug for PodCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodCa")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl PodCa {
    /// A fresh CA (ECDSA P-256), valid from now for [`CA_LIFETIME`], that may sign leaves only
    /// (path length 0).
    pub(crate) fn generate() -> Result<PodCa, CaError> {
        let now = SystemTime::now();
        let key = KeyPair::generate().map_err(CaError::Generate)?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Tollgate");
        params.distinguished_name.push(
            DnType::CommonName,
            format!("tollgate pod CA {}", hostname()),
        );
        params.not_before = (now - BACKDATE).into();
        let not_after = now + CA_LIFETIME;
        params.not_after = not_after.into();
        let cert = params.self_signed(&key).map_err(CaError::Generate)?;
        Ok(PodCa {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            not_after,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate (PEM) apps must trust.
    pub(crate) fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate (DER).
    pub(crate) fn cert_der(&self) -> &[u8] {
        self.cert_der.as_ref()
    }

    /// The TLS server side for `host`, with a leaf for it from the cache or freshly minted.
    /// The caller decides that `host` is a declared partner host: this never checks.
    pub(crate) fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, CaError> {
        let now = SystemTime::now();
        {
            let cache = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(leaf) = cache.get(host)
                && leaf.expires > now + LEAF_RENEW_BEFORE
            {
                return Ok(leaf.config.clone());
            }
        }
        let (config, expires) = self.mint(host, now)?;
        let mut cache = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_LEAVES {
            cache.retain(|_, l| l.expires > now + LEAF_RENEW_BEFORE);
            if cache.len() >= MAX_LEAVES {
                cache.clear();
            }
        }
        cache.insert(
            host.to_string(),
            Leaf {
                config: config.clone(),
                expires,
            },
        );
        Ok(config)
    }

    #[cfg(test)]
    /// Leaves in the cache (for tests and metrics).
    pub(crate) fn cached_leaves(&self) -> usize {
        self.leaves.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn mint(
        &self,
        host: &str,
        now: SystemTime,
    ) -> Result<(Arc<ServerConfig>, SystemTime), CaError> {
        let err = |reason: String| CaError::Mint {
            host: host.to_string(),
            reason,
        };
        let san = match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                host.to_string()
                    .try_into()
                    .map_err(|e: rcgen::Error| err(e.to_string()))?,
            ),
        };
        let key = KeyPair::generate().map_err(|e| err(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![san];
        params.distinguished_name.push(DnType::CommonName, host);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - BACKDATE).into();
        // Never outlives the CA.
        let expires = (now + LEAF_LIFETIME).min(self.not_after);
        params.not_after = expires.into();
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| err(e.to_string()))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| err(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone(), self.cert_der.clone()], key)
            .map_err(|e| err(e.to_string()))?;
        // HTTP/1.1 only: the policy stack serves HTTP/1.1 to apps. A client that offers only h2
        // is refused with the no_application_protocol alert.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok((Arc::new(config), expires))
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(64)
                .collect()
        })
        .unwrap_or_default()
}

/// PEM text for DER certificates, 64 columns.
pub(crate) fn pem_certificates<'a>(certs: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut out = String::new();
    for der in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = crate::encoding::base64(der);
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_are_cached_per_host_and_chain_to_the_ca() {
        let ca = PodCa::generate().unwrap();
        let a = ca.server_config("api.partner.test").unwrap();
        let b = ca.server_config("api.partner.test").unwrap();
        assert!(Arc::ptr_eq(&a, &b), "a second call reuses the leaf");
        ca.server_config("10.1.2.3").unwrap();
        assert_eq!(ca.cached_leaves(), 2);
        assert_eq!(a.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{ca:?}").contains("PRIVATE"));
    }

    #[test]
    fn a_name_that_is_not_ascii_is_refused() {
        let ca = PodCa::generate().unwrap();
        let e = ca.server_config("bäd.example").unwrap_err().to_string();
        assert!(e.contains("bäd.example"), "{e}");
    }
}
