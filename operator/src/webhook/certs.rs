//! The webhook's own CA and serving certificate (rcgen), and when to renew them.
//!
//! Everything here is pure: [`plan`] looks at what the Secret holds and the time, and says
//! whether to keep it or what to write instead. The Secret's keys:
//!
//! - `ca.crt`: the trust bundle the API server gets as `caBundle`: the signing CA first, then
//!   older CAs that are still valid, so a certificate signed by the previous CA stays trusted
//!   while the new CA reaches the webhook configuration.
//! - `ca.key`: the signing CA's private key.
//! - `tls.crt`, `tls.key`: the serving certificate (signed by a CA in the bundle) and its key.
//!
//! Renewal: a certificate is renewed once less than a third of its lifetime is left. A new CA
//! does not replace the serving certificate at once: the old certificate keeps being served
//! (its CA is still in the bundle) until its own renewal, which the new CA signs. Since the
//! API server trusts the whole bundle, no step of a rotation leaves it without trust.

use std::collections::BTreeSet;
use std::io::BufReader;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// Secret key of the trust bundle.
pub const CA_BUNDLE_KEY: &str = "ca.crt";
/// Secret key of the signing CA's private key.
pub const CA_KEY_KEY: &str = "ca.key";
/// Secret key of the serving certificate.
pub const CERT_KEY: &str = "tls.crt";
/// Secret key of the serving certificate's private key.
pub const KEY_KEY: &str = "tls.key";

/// Backdating of `notBefore`, for clocks a little behind ours.
const BACKDATE_SECS: i64 = 300;

/// What the Secret holds, as PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The signing CA first, then older still-valid CAs.
    pub ca_bundle: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Private keys stay out of logs.
        f.debug_struct("Bundle")
            .field("ca_bundle", &self.ca_bundle)
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

/// What the serving certificate must be.
#[derive(Clone, Debug)]
pub struct CertPolicy {
    /// DNS names and IP addresses it is valid for; the first is its common name.
    pub hosts: Vec<String>,
    /// Lifetime of a serving certificate (never beyond its CA's).
    pub cert_validity: Duration,
    /// Lifetime of a CA.
    pub ca_validity: Duration,
}

/// What to do with the Secret.
#[derive(Debug)]
pub enum Plan {
    /// It is fine as it is.
    Keep,
    /// Write this instead, for these reasons (for the log).
    Write {
        bundle: Bundle,
        reasons: Vec<&'static str>,
    },
}

/// Why a certificate could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("no serving host names: give --webhook-service or --webhook-host")]
    NoHosts,
    #[error("{0}")]
    Unusable(String),
}

/// What a certificate says, as far as renewal cares.
#[derive(Clone, Debug)]
struct CertInfo {
    not_before: i64,
    not_after: i64,
    /// SubjectPublicKeyInfo, DER.
    spki: Vec<u8>,
    /// DNS names and IP addresses, as text.
    sans: BTreeSet<String>,
    is_ca: bool,
}

impl CertInfo {
    fn parse(der: CertificateDer<'static>) -> Option<CertInfo> {
        let (_, x) = x509_parser::parse_x509_certificate(&der).ok()?;
        let mut sans = BTreeSet::new();
        if let Ok(Some(ext)) = x.subject_alternative_name() {
            for name in &ext.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        sans.insert((*d).to_string());
                    }
                    x509_parser::extensions::GeneralName::IPAddress(b) => {
                        let ip = match b.len() {
                            4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            _ => None,
                        };
                        if let Some(ip) = ip {
                            sans.insert(ip.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        let not_before = x.validity().not_before.timestamp();
        let not_after = x.validity().not_after.timestamp();
        let spki = x.public_key().raw.to_vec();
        let is_ca = x.is_ca();
        Some(CertInfo {
            not_before,
            not_after,
            spki,
            sans,
            is_ca,
        })
    }

    /// Less than a third of its lifetime left (or already expired).
    fn due(&self, now: i64) -> bool {
        let lifetime = (self.not_after - self.not_before).max(0);
        self.not_after - now < lifetime / 3
    }

    fn expired(&self, now: i64) -> bool {
        now >= self.not_after
    }
}

fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut BufReader::new(pem.as_bytes()))
        .filter_map(Result::ok)
        .collect()
}

/// The certificates of a PEM bundle, each with its own PEM text; unreadable ones are left out.
fn blocks(pem: &str) -> Vec<(String, CertInfo)> {
    const END: &str = "-----END CERTIFICATE-----";
    pem.split_inclusive(END)
        .filter(|b| b.contains(END))
        .filter_map(|b| {
            let text = format!("{}\n", b.trim_start());
            let der = pem_certs(&text).into_iter().next()?;
            Some((text, CertInfo::parse(der)?))
        })
        .collect()
}

fn datetime(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 4)
}

/// A new self-signed CA, valid from a little before `now`.
fn new_ca(policy: &CertPolicy, now: i64) -> Result<(String, KeyPair), CertError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // A distinct name per CA, so a leaf's issuer names one CA of the bundle.
    p.distinguished_name
        .push(DnType::CommonName, format!("tollgate-webhook-ca-{now}"));
    p.distinguished_name
        .push(DnType::OrganizationName, "tollgate.dev");
    p.not_before = datetime(now - BACKDATE_SECS);
    p.not_after = datetime(now.saturating_add(secs(policy.ca_validity)));
    let cert = p.self_signed(&key)?;
    Ok((cert.pem(), key))
}

/// A new serving certificate signed by the CA `ca_pem`/`ca_key`.
fn new_leaf(
    policy: &CertPolicy,
    ca_pem: &str,
    ca_key: &str,
    ca_not_after: i64,
    now: i64,
) -> Result<(String, String), CertError> {
    let first = policy.hosts.first().ok_or(CertError::NoHosts)?;
    let issuer = Issuer::from_ca_cert_pem(ca_pem, KeyPair::from_pem(ca_key)?)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(policy.hosts.clone())?;
    p.distinguished_name.push(DnType::CommonName, first.clone());
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    p.not_before = datetime(now - BACKDATE_SECS);
    p.not_after = datetime(
        now.saturating_add(secs(policy.cert_validity))
            .min(ca_not_after),
    );
    let cert = p.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The signing CA of `b`, if its certificate parses, is a CA, and matches `ca.key`.
fn signer(b: &Bundle) -> Option<(String, CertInfo)> {
    let (pem, info) = blocks(&b.ca_bundle).into_iter().next()?;
    let key = KeyPair::from_pem(&b.ca_key).ok()?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    (info.is_ca && info.spki == spki).then_some((pem, info))
}

/// Whether `b`'s serving certificate can be served for `policy` at `now`, and is not due.
fn serving_ok(b: &Bundle, policy: &CertPolicy, now: i64) -> Result<(), &'static str> {
    let Some(leaf) = pem_certs(&b.cert).into_iter().next() else {
        return Err("no serving certificate");
    };
    let Some(info) = CertInfo::parse(leaf.clone()) else {
        return Err("serving certificate unreadable");
    };
    if certified_key(&b.cert, &b.key).is_err() {
        return Err("serving key does not match its certificate");
    }
    let wanted: BTreeSet<String> = policy.hosts.iter().cloned().collect();
    if info.sans != wanted {
        return Err("serving host names changed");
    }
    if info.due(now) {
        return Err("serving certificate due for renewal");
    }
    if !verifies(&b.ca_bundle, &leaf, &policy.hosts[0], now) {
        return Err("serving certificate not trusted by the CA bundle");
    }
    Ok(())
}

/// Whether `leaf` chains to a CA of `bundle` for `host` at `now` (signature, validity, name).
fn verifies(bundle: &str, leaf: &CertificateDer<'static>, host: &str, now: i64) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(bundle) {
        let _ = roots.add(c);
    }
    let Ok(verifier) = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build() else {
        return false;
    };
    let Ok(name) = ServerName::try_from(host.to_string()) else {
        return false;
    };
    let at = UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(now).unwrap_or(0)));
    use rustls::client::danger::ServerCertVerifier;
    verifier
        .verify_server_cert(leaf, &[], &name, &[], at)
        .is_ok()
}

/// Decides what the Secret must hold at `now` (unix seconds), given what it holds.
pub fn plan(existing: Option<&Bundle>, policy: &CertPolicy, now: i64) -> Result<Plan, CertError> {
    if policy.hosts.is_empty() {
        return Err(CertError::NoHosts);
    }
    let mut reasons = Vec::new();
    let mut next = match existing {
        Some(b) => b.clone(),
        None => {
            reasons.push("no certificate yet");
            Bundle {
                ca_bundle: String::new(),
                ca_key: String::new(),
                cert: String::new(),
                key: String::new(),
            }
        }
    };

    // The signing CA: kept, renewed (the old one stays trusted), or replaced when unusable.
    let (signer_pem, signer_info) = match signer(&next) {
        Some(ca) if !ca.1.due(now) => ca,
        Some(_) => {
            reasons.push("CA due for renewal");
            let (pem, key) = new_ca(policy, now)?;
            next.ca_bundle = format!("{pem}{}", next.ca_bundle);
            next.ca_key = key.serialize_pem();
            signer(&next).ok_or_else(|| CertError::Unusable("new CA unreadable".into()))?
        }
        None => {
            if existing.is_some() {
                reasons.push("CA missing or unusable");
            }
            let (pem, key) = new_ca(policy, now)?;
            next.ca_bundle = pem;
            next.ca_key = key.serialize_pem();
            // A serving certificate of a CA that is gone is not trusted any more.
            next.cert.clear();
            signer(&next).ok_or_else(|| CertError::Unusable("new CA unreadable".into()))?
        }
    };

    // Expired CAs leave the bundle.
    let cas = blocks(&next.ca_bundle);
    let live: Vec<_> = cas.iter().filter(|(_, i)| !i.expired(now)).collect();
    if live.len() != cas.len() {
        reasons.push("expired CA dropped from the bundle");
        next.ca_bundle = live.into_iter().map(|(pem, _)| pem.as_str()).collect();
    }

    if let Err(why) = serving_ok(&next, policy, now) {
        if existing.is_some() && !next.cert.is_empty() {
            reasons.push(why);
        }
        let (cert, key) = new_leaf(
            policy,
            &signer_pem,
            &next.ca_key,
            signer_info.not_after,
            now,
        )?;
        next.cert = cert;
        next.key = key;
    }

    if existing == Some(&next) {
        Ok(Plan::Keep)
    } else {
        Ok(Plan::Write {
            bundle: next,
            reasons,
        })
    }
}

/// The serving pair as rustls wants it; refuses a key that does not match the certificate.
pub fn certified_key(
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::sign::CertifiedKey>, CertError> {
    let certs = pem_certs(cert_pem);
    if certs.is_empty() {
        return Err(CertError::Unusable("no certificate in tls.crt".into()));
    }
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut BufReader::new(key_pem.as_bytes()))
            .ok()
            .flatten()
            .ok_or_else(|| CertError::Unusable("no private key in tls.key".into()))?;
    rustls::sign::CertifiedKey::from_der(certs, key, &rustls::crypto::ring::default_provider())
        .map(Arc::new)
        .map_err(|e| CertError::Unusable(e.to_string()))
}

/// `notAfter` of the first certificate in `pem`, unix seconds.
pub fn not_after(pem: &str) -> Option<i64> {
    let first = pem_certs(pem).into_iter().next()?;
    CertInfo::parse(first).map(|i| i.not_after)
}

/// The host names of the serving certificate: the Service's in-cluster names, then `extra`.
pub fn service_hosts(
    service: &str,
    namespace: &str,
    cluster_domain: &str,
    extra: &[String],
) -> Vec<String> {
    let mut hosts = Vec::new();
    if !service.is_empty() {
        hosts.push(format!("{service}.{namespace}.svc"));
        hosts.push(format!("{service}.{namespace}.svc.{cluster_domain}"));
        hosts.push(format!("{service}.{namespace}"));
        hosts.push(service.to_string());
    }
    for h in extra {
        if !hosts.contains(h) {
            hosts.push(h.clone());
        }
    }
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;
    const NOW: i64 = 1_800_000_000;

    fn policy(hosts: &[&str]) -> CertPolicy {
        CertPolicy {
            hosts: hosts.iter().map(|h| (*h).to_string()).collect(),
            cert_validity: Duration::from_secs(90 * 86_400),
            ca_validity: Duration::from_secs(3650 * 86_400),
        }
    }

    fn write(p: Plan) -> (Bundle, Vec<&'static str>) {
        match p {
            Plan::Write { bundle, reasons } => (bundle, reasons),
            Plan::Keep => panic!("expected a write"),
        }
    }

    #[test]
    fn a_fresh_bundle_is_a_ca_and_a_certificate_it_signs_for_every_host() {
        let pol = policy(&["tollgate-operator.tollgate-system.svc", "127.0.0.1"]);
        let (b, _) = write(plan(None, &pol, NOW).unwrap());
        let leaf = pem_certs(&b.cert).remove(0);
        assert!(verifies(&b.ca_bundle, &leaf, "127.0.0.1", NOW));
        assert!(verifies(
            &b.ca_bundle,
            &leaf,
            "tollgate-operator.tollgate-system.svc",
            NOW
        ));
        assert!(!verifies(&b.ca_bundle, &leaf, "other.example", NOW));
        assert_eq!(pem_certs(&b.ca_bundle).len(), 1);
        assert!(certified_key(&b.cert, &b.key).is_ok());
        assert_eq!(not_after(&b.cert), Some(NOW + 90 * DAY));
        // Another CA does not vouch for it.
        let (other, _) = write(plan(None, &pol, NOW).unwrap());
        assert!(!verifies(&other.ca_bundle, &leaf, "127.0.0.1", NOW));
    }

    #[test]
    fn a_good_bundle_is_kept() {
        let pol = policy(&["a.example"]);
        let (b, _) = write(plan(None, &pol, NOW).unwrap());
        assert!(matches!(
            plan(Some(&b), &pol, NOW + 50 * DAY).unwrap(),
            Plan::Keep
        ));
    }

    #[test]
    fn the_serving_certificate_is_renewed_with_a_third_of_its_life_left_by_the_same_ca() {
        let pol = policy(&["a.example"]);
        let (b, _) = write(plan(None, &pol, NOW).unwrap());
        let later = NOW + 61 * DAY;
        let (renewed, reasons) = write(plan(Some(&b), &pol, later).unwrap());
        assert_eq!(reasons, vec!["serving certificate due for renewal"]);
        assert_eq!(renewed.ca_bundle, b.ca_bundle, "the CA stays");
        assert_eq!(renewed.ca_key, b.ca_key);
        assert_ne!(renewed.cert, b.cert);
        assert_eq!(not_after(&renewed.cert), Some(later + 90 * DAY));
        let leaf = pem_certs(&renewed.cert).remove(0);
        assert!(verifies(&renewed.ca_bundle, &leaf, "a.example", later));
    }

    #[test]
    fn a_due_ca_is_renewed_and_the_old_one_stays_trusted_until_it_expires() {
        let pol = policy(&["a.example"]);
        let (b, _) = write(plan(None, &pol, NOW).unwrap());
        // 2/3 of ten years on; the serving certificate is fresh (renewed just before).
        let t1 = NOW + 2440 * DAY;
        let old_ca = blocks(&b.ca_bundle).remove(0).0;
        let (cert, key) = new_leaf(&pol, &old_ca, &b.ca_key, NOW + 3650 * DAY, t1).unwrap();
        let b = Bundle { cert, key, ..b };
        let (rotated, reasons) = write(plan(Some(&b), &pol, t1).unwrap());
        assert_eq!(reasons, vec!["CA due for renewal"]);
        let cas: Vec<String> = blocks(&rotated.ca_bundle)
            .into_iter()
            .map(|b| b.0)
            .collect();
        assert_eq!(cas.len(), 2);
        assert_eq!(cas[1], old_ca, "the old CA is still trusted");
        assert_ne!(rotated.ca_key, b.ca_key);
        assert_eq!(
            rotated.cert, b.cert,
            "the served certificate stays until it is due"
        );
        // Its renewal is signed by the new CA.
        let t2 = t1 + 61 * DAY;
        let (renewed, _) = write(plan(Some(&rotated), &pol, t2).unwrap());
        let leaf = pem_certs(&renewed.cert).remove(0);
        assert!(verifies(&cas[0], &leaf, "a.example", t2));
        assert!(!verifies(&old_ca, &leaf, "a.example", t2));
        // Once the old CA expired it leaves the bundle.
        let t3 = NOW + 3651 * DAY;
        let (pruned, reasons) = write(plan(Some(&renewed), &pol, t3).unwrap());
        assert!(
            reasons.contains(&"expired CA dropped from the bundle"),
            "{reasons:?}"
        );
        assert_eq!(pruned.ca_bundle, cas[0]);
    }

    #[test]
    fn changed_hosts_a_foreign_certificate_or_a_mismatched_key_get_a_new_certificate() {
        let pol = policy(&["a.example"]);
        let (b, _) = write(plan(None, &pol, NOW).unwrap());
        let (_, reasons) =
            write(plan(Some(&b), &policy(&["a.example", "b.example"]), NOW).unwrap());
        assert_eq!(reasons, vec!["serving host names changed"]);

        let (foreign, _) = write(plan(None, &pol, NOW).unwrap());
        let mixed = Bundle {
            cert: foreign.cert.clone(),
            key: foreign.key.clone(),
            ..b.clone()
        };
        let (fixed, reasons) = write(plan(Some(&mixed), &pol, NOW).unwrap());
        assert_eq!(
            reasons,
            vec!["serving certificate not trusted by the CA bundle"]
        );
        let leaf = pem_certs(&fixed.cert).remove(0);
        assert!(verifies(&b.ca_bundle, &leaf, "a.example", NOW));

        let wrong_key = Bundle {
            key: foreign.key,
            ..b.clone()
        };
        let (_, reasons) = write(plan(Some(&wrong_key), &pol, NOW).unwrap());
        assert_eq!(reasons, vec!["serving key does not match its certificate"]);
    }

    #[test]
    fn an_unusable_ca_is_replaced_whole() {
        let pol = policy(&["a.example"]);
        let (b, _) = write(plan(None, &pol, NOW).unwrap());
        let (other, _) = write(plan(None, &pol, NOW).unwrap());
        let broken = Bundle {
            ca_key: other.ca_key,
            ..b.clone()
        };
        let (fresh, reasons) = write(plan(Some(&broken), &pol, NOW).unwrap());
        assert_eq!(reasons, vec!["CA missing or unusable"]);
        assert_ne!(fresh.ca_bundle, b.ca_bundle);
        let leaf = pem_certs(&fresh.cert).remove(0);
        assert!(verifies(&fresh.ca_bundle, &leaf, "a.example", NOW));
    }

    #[test]
    fn service_hosts_cover_the_in_cluster_names() {
        assert_eq!(
            service_hosts("op", "ns", "cluster.local", &["127.0.0.1".into()]),
            vec![
                "op.ns.svc",
                "op.ns.svc.cluster.local",
                "op.ns",
                "op",
                "127.0.0.1"
            ]
        );
    }
}
