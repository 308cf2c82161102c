//! The wire protocol between the operator and its sidecars (config distribution, version 1).
//!
//! # Transport
//!
//! HTTPS, HTTP/2 preferred (the stream and the reports then share one connection and so reach
//! the same operator replica). Every request carries the pod's projected ServiceAccount token
//! (audience [`TOKEN_AUDIENCE`]) as `Authorization: Bearer <token>`.
//!
//! - `GET` [`SUBSCRIBE_PATH`]`?namespace=NS&pod=NAME[&revision=N&digest=D]`: a long-lived
//!   response of newline-delimited JSON, one [`StreamMessage`] per line. The first line is
//!   [`StreamMessage::Hello`]; then either a [`StreamMessage::Snapshot`] or, when the `revision`
//!   and `digest` the sidecar already holds are still current, [`StreamMessage::Unchanged`];
//!   then a new snapshot whenever what the pod should run changes, and heartbeats in between.
//! - `POST` [`ACK_PATH`] with an [`Ack`]: the sidecar applied a revision (feeds the operator's
//!   push-latency histogram).
//! - `POST` [`REPORT_PATH`] with a [`Report`]: what the sidecar observed since its last report.
//!
//! Both POSTs name the stream's session in the [`SESSION_HEADER`] header and are answered
//! `204 No Content`; `409 Conflict` means the session is gone (reconnect).
//!
//! # Revisions
//!
//! [`Snapshot::revision`] counts up by one per snapshot on a pod's stream. A reconnecting
//! sidecar sends the revision and digest it holds; the operator continues from that number, so
//! revisions stay monotonic for the pod across reconnects, operator restarts and replicas.
//! [`Snapshot::digest`] is a content hash over everything the snapshot distributes (credential
//! values enter it only through the Secret's resourceVersion, never as a hash of the value).
//!
//! # Secrets
//!
//! Credential values travel as [`SecretValue`], whose `Debug` and `Display` print
//! `<redacted>`; only [`SecretValue::expose`] gives the value.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::v1alpha1::PartnerIntegrationSpec;

/// Bumped on an incompatible change; both ends refuse a version they do not speak.
pub const PROTOCOL_VERSION: u32 = 1;
/// The audience a sidecar's projected ServiceAccount token must be issued for.
pub const TOKEN_AUDIENCE: &str = "tollgate";
/// Long-lived NDJSON stream of [`StreamMessage`]s.
pub const SUBSCRIBE_PATH: &str = "/v1/subscribe";
/// Where an [`Ack`] is posted.
pub const ACK_PATH: &str = "/v1/ack";
/// Where a [`Report`] is posted.
pub const REPORT_PATH: &str = "/v1/report";
/// Names the stream session on POSTs.
pub const SESSION_HEADER: &str = "x-tollgate-session";
/// Content type of the stream.
pub const NDJSON: &str = "application/x-ndjson";

// === impl SecretValue ===

/// A credential value. `Debug` and `Display` redact it; serialization does not (it is what
/// the operator sends to a sidecar and what the sidecar persists with mode 0600).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself: for injecting into a request header, nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

// === stream ===

/// One line of the subscribe stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum StreamMessage {
    /// First line: the session and the cadence the operator expects.
    Hello(Hello),
    /// Everything the pod should run now. Replaces the previous snapshot whole.
    Snapshot(Snapshot),
    /// Answer to a resume: the revision the sidecar holds is still current.
    #[serde(rename_all = "camelCase")]
    Unchanged { revision: u64, digest: String },
    /// Keeps the connection visibly alive; a sidecar that hears nothing for three heartbeat
    /// intervals reconnects.
    Heartbeat,
}

/// Opens a stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    pub protocol: u32,
    /// Random, unguessable; names the stream on [`Ack`] and [`Report`] POSTs.
    pub session: String,
    pub heartbeat_seconds: u32,
    pub report_interval_seconds: u32,
}

/// What one pod should run: the integrations of its namespace whose `workloadSelector` matches
/// its labels, with the credential values they reference. Nothing else.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub protocol: u32,
    /// Monotonic per pod stream (see the module docs).
    pub revision: u64,
    /// Content hash of `integrations` (hex).
    pub digest: String,
    /// Sorted by namespace, then name.
    pub integrations: Vec<DistributedIntegration>,
}

/// The highest revision a stream counts to (2^53: every JSON reader holds it exactly). A
/// resume from a higher number is ignored, so counting on from it can never overflow.
pub const MAX_REVISION: u64 = 1 << 53;

/// The `revision=` a sidecar resumes from, if it is a number the stream can count on from.
pub fn resume_revision(query_value: &str) -> Option<u64> {
    query_value
        .parse::<u64>()
        .ok()
        .filter(|r| *r < MAX_REVISION)
}

/// The revision after `revision`, never past [`MAX_REVISION`].
pub fn next_revision(revision: u64) -> u64 {
    revision.saturating_add(1).min(MAX_REVISION)
}

impl Snapshot {
    /// `revision-digest`, the digest cut to 12 characters (whatever characters it holds): the
    /// id a sidecar shows for the snapshot in force.
    pub fn short_id(&self) -> String {
        let digest: String = self.digest.chars().take(12).collect();
        format!("{}-{digest}", self.revision)
    }

    /// An empty snapshot, for a sidecar that holds nothing yet.
    pub fn empty() -> Self {
        Self {
            protocol: PROTOCOL_VERSION,
            revision: 0,
            digest: String::new(),
            integrations: Vec::new(),
        }
    }
}

/// One integration as a sidecar receives it. The spec is the one the operator validated with
/// [`crate::compile`]; the sidecar compiles it again into its runtime form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DistributedIntegration {
    pub namespace: String,
    pub name: String,
    /// `metadata.generation` of the spec distributed.
    pub generation: i64,
    /// The integration's config revision, as in `status.configRevision`; reported back in
    /// [`IntegrationReport::config_revision`].
    pub config_revision: String,
    pub spec: PartnerIntegrationSpec,
    /// The value of `spec.credentials.secretRef`. `None` when the spec has no credentials, or
    /// when the Secret has never been readable (the sidecar then sends no credential); when a
    /// Secret disappears later the previous value stays here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<SecretValue>,
    /// The operator replica could not read the credential and never read it since it started
    /// (`credential` is then `None`): the sidecar keeps the value it holds for this integration,
    /// if the `secretRef` and the upstream URL are unchanged, rather than sending none.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub credential_held: bool,
    /// The Secret of `spec.upstream.clientCertificate`: `None` when the spec names none or the
    /// Secret has never been readable; a Secret that disappears later leaves the last value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<ClientCertificateValue>,
    /// As `credential_held`, for the client certificate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub client_certificate_held: bool,
    /// The values of the other Secret keys the spec's credentials name
    /// (`credentials.secondaryRef`, `credentials.oauth2.clientIdRef` and `clientSecretRef`),
    /// those the operator could read. Empty from operators that predate the field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_credentials: Vec<KeyedSecret>,
    /// As `credential_held`, for `more_credentials`: the operator replica never read some of
    /// them; the sidecar keeps the values it holds for keys the spec still names, if the
    /// upstream URL is unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more_credentials_held: bool,
    /// This pod's share of every `rateLimit.scope: global` band (integration and route bands).
    /// `None` when no band is global.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_share: Option<QuotaShare>,
}

/// The value of one Secret key, by reference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyedSecret {
    /// The Secret's name (the integration's namespace).
    pub name: String,
    pub key: String,
    pub value: SecretValue,
}

/// A `kubernetes.io/tls` Secret's content: the certificate chain (public) and its key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientCertificateValue {
    /// `tls.crt`: PEM, the certificate first, then its chain.
    pub certificate: String,
    /// `tls.key`: PEM.
    pub key: SecretValue,
}

/// How much of a global quota this sidecar may spend.
///
/// The operator divides each band in proportion to the demand sidecars report, decreases
/// before increases (see the operator's `distribution::shares`); a sidecar multiplies each
/// global band's `requests` by `fraction`. While it has no stream to the operator it runs at
/// most `1 / subscribers` (the operator reclaims a share three heartbeats and a second after
/// the stream that carried it ended).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaShare {
    /// In `(0, 1]`.
    pub fraction: f64,
    /// Sidecars currently subscribed to the integration, this one included.
    pub subscribers: u32,
}

impl QuotaShare {
    /// Equal division among `subscribers` (at least 1).
    pub fn equal(subscribers: u32) -> Self {
        let n = subscribers.max(1);
        Self {
            fraction: 1.0 / f64::from(n),
            subscribers: n,
        }
    }

    /// A band of `requests` per period scaled to this share: never below 1, so every sidecar
    /// can make progress.
    pub fn scale(&self, requests: u64) -> u64 {
        ((requests as f64) * self.fraction).floor().max(1.0) as u64
    }
}

// === sidecar -> operator ===

/// A sidecar applied a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    pub revision: u64,
}

/// Sent every few seconds (see [`Hello::report_interval_seconds`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The snapshot revision in force.
    pub revision: u64,
    pub integrations: Vec<IntegrationReport>,
}

/// Breaker state as the sidecar sees it (the integration-level breaker, or the worst route).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BreakerState {
    #[default]
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    /// As in `status.circuit`: `closed`, `half-open`, `open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half-open",
            BreakerState::Open => "open",
        }
    }
}

/// Upper bounds (milliseconds) of the call-duration buckets a sidecar counts in
/// ([`IntegrationReport::latency_buckets`]), followed by one overflow bucket. Part of protocol v1.
pub const LATENCY_BUCKETS_MS: [u64; 16] = [
    1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 800, 1000, 2000, 5000, 10000, 30000,
];

/// What the overflow bucket reads as, milliseconds.
const OVERFLOW_MS: u64 = 60_000;

/// The `q` quantile (0 < q <= 1) of counts per [`LATENCY_BUCKETS_MS`] bucket, milliseconds: the
/// upper bound of the bucket holding it (the overflow bucket reads as 60 s). `None` without
/// counts.
pub fn bucket_quantile(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64 * q).ceil() as u64).max(1);
    let mut seen = 0u64;
    for (k, n) in buckets.iter().enumerate() {
        seen = seen.saturating_add(*n);
        if seen >= rank {
            return Some(LATENCY_BUCKETS_MS.get(k).copied().unwrap_or(OVERFLOW_MS) as f64);
        }
    }
    None
}

/// What one sidecar saw of one integration during `intervalMillis` (counts are deltas since
/// its previous report).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IntegrationReport {
    pub namespace: String,
    pub name: String,
    /// The config revision in force for this integration.
    pub config_revision: String,
    /// The span these counts cover.
    pub interval_millis: u64,
    /// Calls the app made (each call once, however many attempts).
    pub requests: u64,
    /// Calls that reached (or failed to reach) the partner and failed: its 5xx, timeouts,
    /// unreachable. Sidecars that predate `refused` count their refusals here too.
    pub errors: u64,
    /// Calls answered `rate-limited` by the sidecar.
    pub rate_limited: u64,
    /// Calls the sidecar answered itself without calling the partner, other than
    /// `rate-limited`: kill switch, circuit open, deprecated version, bad request. Not
    /// counted in `errors`. Zero from sidecars that predate the field.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refused: u64,
    /// 95th percentile of call duration in the interval, milliseconds; `None` without calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p95_millis: Option<f64>,
    /// Calls of the interval by duration: a count per [`LATENCY_BUCKETS_MS`] bucket, then the
    /// overflow bucket. The operator adds these up over sidecars and the status window, so the
    /// status shows one true p95 rather than an average of p95s. Empty from sidecars that
    /// predate the field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency_buckets: Vec<u64>,
    pub breaker: BreakerState,
    /// What the partner announced about the lifecycle of its routes (`Deprecation`, `Sunset`,
    /// `Link` response headers), as last seen since the sidecar started: one entry per route
    /// with an announcement, at most [`MAX_LIFECYCLE_ROUTES`]. Empty from sidecars that
    /// predate the field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lifecycle: Vec<RouteLifecycle>,
    /// Checked partner answers of the interval that broke a route's `contract`, per route and
    /// kind (deltas, as the counts above), only those not zero: at most
    /// [`MAX_CONTRACT_VIOLATION_ENTRIES`]. Empty from sidecars that predate the field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contract_violations: Vec<ContractViolationCount>,
    /// Which key of a rotation window (`credentials.secondaryRef`) served the calls of the
    /// interval. `None` without a secondary key, and from sidecars that predate the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_keys: Option<CredentialKeys>,
    /// OAuth2 token fetches of the interval that failed after their retries. Zero from
    /// sidecars that predate the field.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub credential_refresh_failures: u64,
    /// The latest result of the start-up check (`credentials.verify`) for the credential in
    /// force; `None` before it ran, and from sidecars that predate the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_check: Option<CredentialCheckResult>,
    /// With `rateLimit.adaptive`: the rate the partner's throttling leaves in force, percent of
    /// the configured rate (0..=100), the lowest of the integration's adaptive quotas. `None`
    /// without one, and from sidecars that predate the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_percent: Option<f64>,
}

/// Longest message a credential check result may carry.
pub const MAX_CHECK_MESSAGE_BYTES: usize = 512;

/// What the start-up check found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialCheckResult {
    /// The partner answered the expected status.
    pub ok: bool,
    /// What was sent and what came back (never a credential).
    pub message: String,
    /// When, Unix seconds.
    pub at: i64,
}

/// Calls the partner accepted, by the key they carried (deltas), and when the secondary key
/// last served one.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialKeys {
    #[serde(default)]
    pub primary: u64,
    #[serde(default)]
    pub secondary: u64,
    /// Unix seconds of the last call the secondary key served since the sidecar started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_last_used: Option<i64>,
}

/// Most (route, kind) entries a report may carry contract violations for.
pub const MAX_CONTRACT_VIOLATION_ENTRIES: usize = 64;

/// The kinds of contract violation a report carries, as the sidecar's
/// `tollgate_contract_violations_total{kind}` names them: `success-rule` (a 2xx whose body
/// breaks `contract.success`: a partner failure), `schema` (a body that does not match
/// `contract.schema`: a partner failure), `unknown-enum` (a value `contract.enums` does not
/// list: counted, not a failure). Other kinds are not reported.
pub const CONTRACT_VIOLATION_KINDS: [&str; 3] = ["success-rule", "schema", "unknown-enum"];

/// How many checked answers on one route broke its contract in one way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContractViolationCount {
    pub route: String,
    /// One of [`CONTRACT_VIOLATION_KINDS`].
    pub kind: String,
    pub count: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Most routes a report may carry lifecycle announcements for.
pub const MAX_LIFECYCLE_ROUTES: usize = 64;
/// Longest route name or link a lifecycle announcement may carry.
pub const MAX_LIFECYCLE_TEXT_BYTES: usize = 512;

/// A partner's announcement about one route: RFC 9745 `Deprecation`, RFC 8594 `Sunset`, and
/// the `Link` relations `deprecation` and `sunset` that point to their documentation.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteLifecycle {
    pub route: String,
    /// The partner sent a `Deprecation` header.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deprecated: bool,
    /// When the route is (or was) deprecated, Unix seconds, when the header gave a date.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecation_timestamp: Option<i64>,
    /// When the route stops answering, Unix seconds (`Sunset`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sunset_timestamp: Option<i64>,
    /// The `rel="deprecation"` link, else the `rel="sunset"` one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

impl RouteLifecycle {
    /// Nothing announced.
    pub fn is_empty(&self) -> bool {
        !self.deprecated && self.sunset_timestamp.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_quantile_is_the_bound_of_the_bucket_holding_the_rank() {
        let mut b = vec![0u64; LATENCY_BUCKETS_MS.len() + 1];
        assert_eq!(bucket_quantile(&b, 0.95), None);
        b[2] = 95; // <= 5ms
        b[6] = 5; // <= 100ms
        assert_eq!(bucket_quantile(&b, 0.95), Some(5.0));
        b[6] = 6;
        assert_eq!(bucket_quantile(&b, 0.95), Some(100.0));
        b[LATENCY_BUCKETS_MS.len()] = 100; // over 30 s
        assert_eq!(bucket_quantile(&b, 0.95), Some(60_000.0));
        assert_eq!(bucket_quantile(&b, 0.01), Some(5.0));
    }

    #[test]
    fn secret_value_never_prints() {
        let v = SecretValue::new("sk_live_123");
        assert_eq!(format!("{v:?}"), "<redacted>");
        assert_eq!(format!("{v}"), "<redacted>");
        let i = DistributedIntegration {
            namespace: "payments".into(),
            name: "stripe".into(),
            generation: 1,
            config_revision: "1-abc".into(),
            spec: PartnerIntegrationSpec::default(),
            credential: Some(v.clone()),
            credential_held: false,
            client_certificate: None,
            client_certificate_held: false,
            more_credentials: Vec::new(),
            more_credentials_held: false,
            quota_share: None,
        };
        assert!(!format!("{i:?}").contains("sk_live_123"));
        // The wire carries it.
        assert!(serde_json::to_string(&i).unwrap().contains("sk_live_123"));
    }

    #[test]
    fn messages_are_tagged_lines() {
        let m = StreamMessage::Unchanged {
            revision: 4,
            digest: "ab".into(),
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(s, r#"{"type":"unchanged","revision":4,"digest":"ab"}"#);
        assert_eq!(serde_json::from_str::<StreamMessage>(&s).unwrap(), m);
        assert_eq!(
            serde_json::to_string(&StreamMessage::Heartbeat).unwrap(),
            r#"{"type":"heartbeat"}"#
        );
    }

    #[test]
    fn revisions_resume_and_count_without_overflow() {
        assert_eq!(resume_revision("7"), Some(7));
        assert_eq!(resume_revision("18446744073709551615"), None);
        assert_eq!(resume_revision("99999999999999999999999"), None);
        assert_eq!(resume_revision("-1"), None);
        assert_eq!(next_revision(u64::MAX), MAX_REVISION);
        let mut s = Snapshot::empty();
        s.revision = 3;
        s.digest = "aaaaaaaaaaa€€€".into();
        assert_eq!(s.short_id(), "3-aaaaaaaaaaa€");
    }

    #[test]
    fn equal_share_scales_bands() {
        let s = QuotaShare::equal(2);
        assert_eq!(s.fraction, 0.5);
        assert_eq!(s.scale(10), 5);
        assert_eq!(QuotaShare::equal(0).subscribers, 1);
        assert_eq!(QuotaShare::equal(3).scale(1), 1);
    }
}
