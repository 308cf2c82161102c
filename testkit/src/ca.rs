//! A test certificate authority (rcgen) and the serving certificates it signs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A CA made for one test: its certificate (for trust bundles) and the leaves it signs.
pub struct TestCa {
    /// The CA certificate, PEM: what a client trusts.
    pub ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A certificate signed by a [`TestCa`], with its private key.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

/// A CA and a leaf it signed, written as PEM files: `ca.crt`, `tls.crt`, `tls.key`.
#[derive(Debug, Clone)]
pub struct ServingCert {
    /// The CA bundle a client trusts.
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    /// A CA whose common name is `tollgate test CA`.
    pub fn new() -> TestCa {
        Self::named("tollgate test CA")
    }

    /// A CA whose subject is `CN=<common_name>` (what a client reports as the issuer).
    pub fn named(common_name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().expect("a CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let cert = params.self_signed(&key).expect("a self-signed CA");
        TestCa {
            ca_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A leaf for `names`: each an IP address SAN when it parses as one, else a DNS name.
    pub fn issue(&self, names: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("a leaf key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names)
            .expect("names valid in a certificate")
            .signed_by(&key, &self.issuer)
            .expect("the CA signs");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    /// A server config with a leaf for `localhost` and `127.0.0.1`.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.issue(&["localhost", "127.0.0.1"]).server_config()
    }

    /// A server config with a leaf for `localhost` and `127.0.0.1` that requires every client
    /// to present a certificate signed by `clients` (a partner that wants mutual TLS).
    pub fn mtls_server_config(&self, clients: &TestCa) -> Arc<rustls::ServerConfig> {
        let mut roots = rustls::RootCertStore::empty();
        let der =
            CertificateDer::from_pem_slice(clients.ca_pem.as_bytes()).expect("the CA's PEM parses");
        roots.add(der).expect("the CA is a valid root");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .expect("a client verifier");
        let leaf = self.issue(&["localhost", "127.0.0.1"]);
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("default protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![leaf.cert_der.clone()],
                PrivateKeyDer::Pkcs8(leaf.key_der.clone().into()),
            )
            .expect("the leaf and its key match");
        Arc::new(cfg)
    }

    /// Writes this CA and a leaf for `names` into `dir` (`ca.crt`, `tls.crt`, `tls.key`).
    pub fn write_serving_cert(&self, dir: &Path, names: &[&str]) -> std::io::Result<ServingCert> {
        let leaf = self.issue(names);
        let out = ServingCert {
            ca_file: dir.join("ca.crt"),
            cert_file: dir.join("tls.crt"),
            key_file: dir.join("tls.key"),
            ca_pem: self.ca_pem.clone(),
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
        };
        std::fs::write(&out.ca_file, &out.ca_pem)?;
        std::fs::write(&out.cert_file, &out.cert_pem)?;
        std::fs::write(&out.key_file, &out.key_pem)?;
        Ok(out)
    }

    /// A client config trusting only this CA, offering `http/1.1` by ALPN.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        client_config(&self.ca_pem)
    }
}

impl ServingCert {
    /// A client config trusting only its CA, offering `http/1.1` by ALPN.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        client_config(&self.ca_pem)
    }
}

fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("the CA's PEM parses");
    roots.add(der).expect("the CA is a valid root");
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

impl Leaf {
    /// A rustls server config presenting this leaf.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("default protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert_der.clone()],
                PrivateKeyDer::Pkcs8(self.key_der.clone().into()),
            )
            .expect("the leaf and its key match");
        Arc::new(cfg)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
