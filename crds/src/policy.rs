//! The runtime form of a `PartnerIntegration`, and the pure compile step from spec to policy.
//!
//! Operator and sidecar both call [`compile`], so "valid" means the same thing everywhere. The
//! result has every default filled in, every duration parsed, every header name checked and
//! every route resolved against the integration's defaults, so the data plane never re-reads
//! the spec.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use serde::Serialize;

use crate::duration;
use crate::v1alpha1::{
    Backoff, CircuitBreaker, Concurrency, Contract, ContractSchema, Fallback, KillSwitch,
    LimitBand, OnLimit, PartnerIntegrationSpec, RateLimit, RateLimitScope, Retries, SecretKeyRef,
    Timeouts,
};

// === defaults (documented in docs/policy.md and on the spec fields) ===

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_TOTAL_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(100);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(2);
pub const DEFAULT_RETRY_ON: [&str; 7] = [
    "connect-error",
    "reset",
    "timeout",
    "429",
    "502",
    "503",
    "504",
];
pub const DEFAULT_BUDGET_PERCENT: u32 = 20;
pub const DEFAULT_BUDGET_MIN_PER_SECOND: u32 = 5;
pub const DEFAULT_IDEMPOTENCY_HEADER: &str = "idempotency-key";
pub const DEFAULT_MAX_QUEUE_WAIT: Duration = Duration::from_secs(2);
/// `rateLimit.adaptive` defaults.
pub const DEFAULT_ADAPTIVE_MIN_PERCENT: i64 = 10;
pub const DEFAULT_ADAPTIVE_RECOVERY: Duration = Duration::from_secs(30);
/// The largest `maxInFlight` and `maxQueueDepth`.
pub const MAX_CONCURRENCY: i64 = 100_000;
pub const DEFAULT_BREAKER_WINDOW: Duration = Duration::from_secs(30);
pub const DEFAULT_BREAKER_MINIMUM_REQUESTS: u32 = 20;
pub const DEFAULT_BREAKER_FAILURE_RATE_PERCENT: u32 = 50;
pub const DEFAULT_BREAKER_CONSECUTIVE_FAILURES: u32 = 5;
pub const DEFAULT_BREAKER_OPEN_DURATION: Duration = Duration::from_secs(15);
pub const DEFAULT_BREAKER_HALF_OPEN_PROBES: u32 = 3;
pub const DEFAULT_FALLBACK_STATUS: u16 = 503;
pub const DEFAULT_CREDENTIAL_HEADER: &str = "authorization";
pub const DEFAULT_CREDENTIAL_FORMAT: &str = "{value}";
/// The route name used for requests no route matches.
pub const DEFAULT_ROUTE: &str = "default";

// === errors ===

/// One rejected value, named by its path in the resource (`spec.retries.backoff.base`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Everything wrong with a spec, in field order. Never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct CompileError {
    pub errors: Vec<FieldError>,
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

// === the runtime policy ===

/// `namespace/name`, the integration's identity in answers, metrics and spans.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct IntegrationId {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for IntegrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A compiled integration: immutable, every default resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IntegrationPolicy {
    pub id: IntegrationId,
    /// Labels a pod must carry to receive this integration; empty: every pod.
    pub workload_selector: BTreeMap<String, String>,
    pub upstream: UpstreamPolicy,
    /// Host names (and optional ports) recognised as this partner.
    pub hosts: Vec<HostMatch>,
    pub versioning: VersioningPolicy,
    pub credentials: Option<CredentialPolicy>,
    /// The partner's account-wide quota: every request counts against it.
    pub rate_limit: Option<RateLimitPolicy>,
    /// The cap on this pod's calls in flight to the partner, across routes.
    pub concurrency: Option<ConcurrencyPolicy>,
    /// The integration's breaker, shared by every route without a breaker of its own.
    pub circuit_breaker: Option<BreakerPolicy>,
    /// Declared routes in order; the first match wins.
    pub routes: Vec<RoutePolicy>,
    /// What unmatched requests get (named [`DEFAULT_ROUTE`]).
    pub default_route: RoutePolicy,
    pub sla: Option<SlaPolicy>,
    /// Lower-case header names never shown in logs, spans or `/config`; always includes the
    /// credential header.
    #[serde(serialize_with = "ser::header_names")]
    pub redact_headers: Vec<HeaderName>,
    /// `spec.telemetry.accessLog`: one JSON line per call on the sidecar's stdout.
    pub access_log: bool,
}

impl IntegrationPolicy {
    /// The field of a contract schema that names a ConfigMap whose text was never put in
    /// (only the operator reads ConfigMaps), if any.
    pub fn unresolved_schema(&self) -> Option<String> {
        std::iter::once(("spec".to_string(), &self.default_route))
            .chain(
                self.routes
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (format!("spec.routes[{i}]"), r)),
            )
            .find(|(_, r)| {
                r.contract
                    .as_ref()
                    .and_then(|c| c.schema.as_ref())
                    .is_some_and(SchemaPolicy::is_unresolved)
            })
            .map(|(base, _)| format!("{base}.contract.schema.configMapName"))
    }

    /// The route a request takes: the first declared route that matches, else the default.
    pub fn route_for(&self, method: &Method, path: &str) -> &RoutePolicy {
        self.routes
            .iter()
            .find(|r| r.matches(method, path))
            .unwrap_or(&self.default_route)
    }

    /// Whether a pod with these labels should run this integration.
    pub fn selects(&self, pod_labels: &BTreeMap<String, String>) -> bool {
        self.workload_selector
            .iter()
            .all(|(k, v)| pod_labels.get(k) == Some(v))
    }

    /// Whether `host` (a `Host` header, absolute-form authority or `CONNECT` target, with or
    /// without port) names this partner.
    pub fn matches_host(&self, host: &str, port: Option<u16>) -> bool {
        self.hosts.iter().any(|h| h.matches(host, port))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    Https,
}

/// Where traffic goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamPolicy {
    /// The url as written.
    pub url: String,
    pub scheme: Scheme,
    /// Lower-case host name or IP literal (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// Path prefix prepended to every request path, without a trailing `/` (often empty).
    pub base_path: String,
    #[serde(with = "duration::serde_go")]
    pub connect_timeout: Duration,
    /// Whether the app's TLS to this partner is terminated by the sidecar (`upstream.interception`,
    /// default: the url is https). Never true for an `http://` url.
    pub interception: bool,
    /// Extra trust anchors for this partner's TLS (`upstream.caBundle`): PEM, each
    /// certificate checked at compile time to be one the verifier accepts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    /// The `kubernetes.io/tls` Secret whose certificate the sidecar presents to this partner
    /// (`upstream.clientCertificate.secretName`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<String>,
}

/// One `hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostMatch {
    /// Lower case.
    pub host: String,
    /// `None`: any port.
    pub port: Option<u16>,
}

impl HostMatch {
    /// `host` in any case, with or without one trailing dot.
    pub fn matches(&self, host: &str, port: Option<u16>) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        self.host.eq_ignore_ascii_case(host) && (self.port.is_none() || self.port == port)
    }

    /// Whether some request would match both.
    pub fn overlaps(&self, other: &HostMatch) -> bool {
        self.host == other.host
            && (self.port.is_none() || other.port.is_none() || self.port == other.port)
    }
}

impl fmt::Display for HostMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

/// The form a host name is matched in: lower case, one trailing dot (the DNS root) removed.
/// `None` when nothing or another dot remains.
pub fn normalize_host(host: &str) -> Option<String> {
    let h = host.strip_suffix('.').unwrap_or(host);
    if h.is_empty() || h.ends_with('.') {
        return None;
    }
    Some(h.to_ascii_lowercase())
}

/// Why a request path cannot be normalised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path must start with '/'")]
    NotAbsolute,
    #[error("'%' at byte {0} is not followed by two hex digits")]
    BadPercent(usize),
}

/// The one form paths are matched (and forwarded) in, per RFC 3986 section 6.2.2:
/// percent-encoded unreserved characters decoded (`%76` is `v`), other percent-encodings
/// in upper case (`%2f` is `%2F`, never a separator), empty segments dropped (`//` is `/`),
/// and dot segments resolved (`/v1/../v0` is `/v0`; `..` never climbs above the root).
/// A trailing `/` stays. An empty path is `/`.
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    if raw.is_empty() {
        return Ok("/".to_string());
    }
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let bytes = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            // Copy the whole character (the input is a str).
            let len = raw[i..].chars().next().map_or(1, char::len_utf8);
            decoded.push_str(&raw[i..i + len]);
            i += len;
            continue;
        }
        let hex = |j: usize| bytes.get(j).and_then(|c| (*c as char).to_digit(16));
        let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
            return Err(PathError::BadPercent(i));
        };
        let c = (hi * 16 + lo) as u8;
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
            decoded.push(c as char);
        } else {
            decoded.push_str(&format!("%{c:02X}"));
        }
        i += 3;
    }
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in decoded[1..].split('/') {
        match seg {
            "" | "." => trailing = true,
            ".." => {
                out.pop();
                trailing = true;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if out.is_empty() || trailing {
        path.push('/');
    }
    Ok(path)
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersioningPolicy {
    #[serde(serialize_with = "ser::header_pairs")]
    pub pin_headers: Vec<(HeaderName, HeaderValue)>,
    pub denied_path_prefixes: Vec<String>,
}

impl VersioningPolicy {
    /// The denied prefix this path falls under, if any (segment-aware).
    pub fn denied(&self, path: &str) -> Option<&str> {
        self.denied_path_prefixes
            .iter()
            .find(|p| path_has_prefix(path, p))
            .map(String::as_str)
    }
}

/// The credential to inject: `header: prefix + secret + suffix`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialPolicy {
    pub secret_ref: SecretKeyRef,
    /// `spec.credentials.secondaryRef`: the key tried once after the partner answers 401.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secondary_ref: Option<SecretKeyRef>,
    #[serde(serialize_with = "ser::header_name")]
    pub header: HeaderName,
    /// What precedes `{value}` in `format`.
    pub prefix: String,
    /// What follows `{value}` in `format`.
    pub suffix: String,
    /// `spec.credentials.allowInsecure`: sent over `http://` to a host that is not loopback.
    pub allow_insecure: bool,
    /// `spec.credentials.oauth2`: the header carries an access token fetched with these
    /// client credentials instead of `secretRef`'s value (then unset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2Policy>,
    /// `spec.credentials.verify`: the start-up check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyPolicy>,
}

/// The start-up check of a credential: `method path` through the stack, expecting
/// `expect_status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyPolicy {
    #[serde(serialize_with = "ser::method")]
    pub method: Method,
    /// In normal form.
    pub path: String,
    pub expect_status: u16,
}

/// An OAuth 2.0 client-credentials grant, checked.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OAuth2Policy {
    pub token_url: String,
    pub client_id_ref: SecretKeyRef,
    pub client_secret_ref: SecretKeyRef,
    pub scopes: Vec<String>,
    pub audience: Option<String>,
    pub auth_method: crate::v1alpha1::OAuth2AuthMethod,
    /// `None`: 5 minutes or 10% of the token's lifetime, whichever is shorter.
    #[serde(with = "duration::serde_go::option")]
    pub refresh_before: Option<Duration>,
}

/// How long before a token's expiry it is refreshed: `refresh_before`, or 5 minutes or 10% of
/// its lifetime, whichever is shorter; never the whole lifetime.
pub fn refresh_margin(refresh_before: Option<Duration>, lifetime: Duration) -> Duration {
    let margin = refresh_before.unwrap_or_else(|| Duration::from_secs(300).min(lifetime / 10));
    margin.min(lifetime.mul_f64(0.9))
}

impl CredentialPolicy {
    /// The Secret keys besides `secretRef` the credential reads, with the field naming each.
    pub fn more_refs(&self) -> Vec<(&'static str, &SecretKeyRef)> {
        let mut out = Vec::new();
        if let Some(r) = &self.secondary_ref {
            out.push(("spec.credentials.secondaryRef", r));
        }
        if let Some(o) = &self.oauth2 {
            out.push(("spec.credentials.oauth2.clientIdRef", &o.client_id_ref));
            out.push((
                "spec.credentials.oauth2.clientSecretRef",
                &o.client_secret_ref,
            ));
        }
        out
    }

    /// The header value for a secret, or `None` if the result is not a valid header value.
    pub fn render(&self, secret: &str) -> Option<HeaderValue> {
        let mut v =
            HeaderValue::from_str(&format!("{}{}{}", self.prefix, secret, self.suffix)).ok()?;
        v.set_sensitive(true);
        Some(v)
    }
}

/// A quota: every band must admit a request.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicy {
    pub scope: RateLimitScope,
    pub on_limit: OnLimit,
    #[serde(with = "duration::serde_go")]
    pub max_queue_wait: Duration,
    #[serde(serialize_with = "ser::opt_header_name")]
    pub partition_by: Option<HeaderName>,
    /// More headers of the partition key, after `partition_by`.
    #[serde(serialize_with = "ser::header_names")]
    pub partition_also_by: Vec<HeaderName>,
    /// The client's address is the last part of the partition key.
    pub partition_by_client_address: bool,
    pub bands: Vec<BandPolicy>,
    /// Other bands for some values of the partition header.
    pub overrides: Vec<PartitionOverridePolicy>,
    /// Lowered on the partner's throttling, recovered while it is quiet.
    pub adaptive: Option<AdaptivePolicy>,
}

/// `rateLimit.overrides[]`: these values of the partition header get these bands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionOverridePolicy {
    pub values: Vec<String>,
    pub bands: Vec<BandPolicy>,
}

/// `rateLimit.adaptive`, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdaptivePolicy {
    /// 1..=100.
    pub min_percent: u32,
    #[serde(with = "duration::serde_go")]
    pub recovery: Duration,
}

/// At most `max_in_flight` calls at once; over it, 429 at once (`reject`) or a wait in line of
/// at most `max_queue_wait` with at most `max_queue_depth` waiting (`queue`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConcurrencyPolicy {
    pub max_in_flight: u32,
    pub on_limit: OnLimit,
    #[serde(with = "duration::serde_go")]
    pub max_queue_wait: Duration,
    pub max_queue_depth: u32,
    /// The header naming a call's [`Priority`] in the line.
    #[serde(serialize_with = "ser::opt_header_name")]
    pub priority_header: Option<HeaderName>,
}

/// A call's class in a concurrency cap's line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// `high`, `normal` or `low` in any case; anything else (or nothing) is `normal`.
    pub fn from_header(value: Option<&[u8]>) -> Priority {
        match value {
            Some(v) if v.eq_ignore_ascii_case(b"high") => Priority::High,
            Some(v) if v.eq_ignore_ascii_case(b"low") => Priority::Low,
            _ => Priority::Normal,
        }
    }
}

/// A token bucket: `requests` tokens, refilled continuously over `per`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BandPolicy {
    pub name: String,
    pub requests: u64,
    #[serde(with = "duration::serde_go")]
    pub per: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BreakerPolicy {
    #[serde(with = "duration::serde_go")]
    pub window: Duration,
    pub minimum_requests: u32,
    pub failure_rate_percent: u32,
    pub consecutive_failures: u32,
    #[serde(with = "duration::serde_go::option")]
    pub slow_call_duration: Option<Duration>,
    #[serde(with = "duration::serde_go")]
    pub open_duration: Duration,
    pub half_open_probes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct KillSwitchPolicy {
    pub enabled: bool,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimeoutPolicy {
    #[serde(with = "duration::serde_go")]
    pub request: Duration,
    #[serde(with = "duration::serde_go")]
    pub total: Duration,
}

/// Which failures a retry may follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryOn {
    pub connect_error: bool,
    pub reset: bool,
    pub timeout: bool,
    /// 429 and 5xx codes only.
    pub statuses: Vec<u16>,
}

impl RetryOn {
    pub fn status(&self, code: u16) -> bool {
        self.statuses.contains(&code)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetPolicy {
    pub percent: u32,
    pub min_per_second: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// 1: no retry.
    pub max_attempts: u32,
    #[serde(with = "duration::serde_go")]
    pub backoff_base: Duration,
    #[serde(with = "duration::serde_go")]
    pub backoff_max: Duration,
    pub retry_on: RetryOn,
    pub respect_retry_after: bool,
    pub budget: BudgetPolicy,
    #[serde(serialize_with = "ser::header_name")]
    pub idempotency_header: HeaderName,
    pub generate_idempotency_key: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StaticResponsePolicy {
    #[serde(serialize_with = "ser::status")]
    pub status: StatusCode,
    #[serde(serialize_with = "ser::header_pairs")]
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FallbackPolicy {
    #[serde(with = "duration::serde_go::option")]
    pub stale_if_error: Option<Duration>,
    pub response: Option<StaticResponsePolicy>,
}

/// Which breaker governs a route.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum BreakerScope {
    /// No breaker.
    None,
    /// The integration's breaker, shared with every other route in this scope.
    Integration,
    /// A breaker of the route's own.
    Route(BreakerPolicy),
}

/// Default of `contract.maxBodyBytes`.
pub const DEFAULT_CONTRACT_BODY_BYTES: usize = 64 * 1024;
/// Most `contract.maxBodyBytes` may ask for.
pub const MAX_CONTRACT_BODY_BYTES: usize = 1024 * 1024;
/// Most steps a `contract.success.jsonPath` may take.
pub const MAX_JSON_PATH_STEPS: usize = 16;

/// One step of a success rule's path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PathStep {
    Field(String),
    Index(usize),
}

/// What a successful answer of the partner looks like (`spec.contract`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContractPolicy {
    /// The success rule's path; `None`: no success rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json_path: Option<String>,
    #[serde(skip)]
    pub path: Vec<PathStep>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub equals: Option<String>,
    /// The JSON Schema checked bodies must match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<SchemaPolicy>,
    /// Fields whose values are known; others are counted.
    pub enums: Vec<EnumPolicy>,
    pub sample_rate: f64,
    pub max_body_bytes: usize,
}

/// Largest `contract.schema` text, bytes.
pub const MAX_CONTRACT_SCHEMA_BYTES: usize = 65536;

/// A contract's JSON Schema, compiled once per revision. `/config` shows where it came from and
/// its size, not its text.
#[derive(Clone)]
pub struct SchemaPolicy {
    /// `inline`, or `configMap <name> key <key>`.
    pub source: String,
    /// The schema text; `None` until the operator has put the ConfigMap's text in.
    pub text: Option<std::sync::Arc<str>>,
    validator: Option<std::sync::Arc<jsonschema::Validator>>,
}

impl SchemaPolicy {
    /// Whether `doc` matches the schema (an unresolved schema matches nothing).
    pub fn matches(&self, doc: &serde_json::Value) -> bool {
        self.validator.as_ref().is_some_and(|v| v.is_valid(doc))
    }

    /// The schema names a ConfigMap whose text was never put in.
    pub fn is_unresolved(&self) -> bool {
        self.validator.is_none()
    }
}

impl PartialEq for SchemaPolicy {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source && self.text == other.text
    }
}

impl fmt::Debug for SchemaPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SchemaPolicy")
            .field("source", &self.source)
            .field("bytes", &self.text.as_ref().map(|t| t.len()))
            .finish()
    }
}

impl Serialize for SchemaPolicy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("SchemaPolicy", 2)?;
        st.serialize_field("source", &self.source)?;
        st.serialize_field("bytes", &self.text.as_ref().map(|t| t.len()))?;
        st.end()
    }
}

/// A field of the partner's answers and the values it is known to take.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnumPolicy {
    pub json_path: String,
    #[serde(skip)]
    pub path: Vec<PathStep>,
    pub values: Vec<String>,
}

/// What a check of one body found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judgement {
    /// The success rule holds (or there is none).
    pub kept: bool,
    /// The body matches the schema (or there is none).
    pub schema_kept: bool,
    /// Enum fields present with a value not listed.
    pub unknown_enums: usize,
}

/// The value at `path`, if any.
fn walk<'a>(doc: &'a serde_json::Value, path: &[PathStep]) -> Option<&'a serde_json::Value> {
    let mut v = doc;
    for step in path {
        v = match step {
            PathStep::Field(f) => v.get(f.as_str())?,
            PathStep::Index(i) => v.get(*i)?,
        };
    }
    Some(v)
}

/// A scalar as the spec writes it: a string's text, or a number, `true`, `false`, `null`.
fn scalar_text(v: &serde_json::Value) -> Option<std::borrow::Cow<'_, str>> {
    match v {
        serde_json::Value::String(s) => Some(s.as_str().into()),
        serde_json::Value::Number(_) | serde_json::Value::Bool(_) | serde_json::Value::Null => {
            Some(v.to_string().into())
        }
        _ => None,
    }
}

impl ContractPolicy {
    /// Checks a body: the success rule and the schema (a body that is not JSON breaks both)
    /// and the enums.
    pub fn judge(&self, body: &[u8]) -> Judgement {
        let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
            return Judgement {
                kept: self.equals.is_none(),
                schema_kept: self.schema.is_none(),
                unknown_enums: 0,
            };
        };
        let kept = self.equals.as_ref().is_none_or(|equals| {
            walk(&doc, &self.path)
                .and_then(scalar_text)
                .is_some_and(|t| t == *equals)
        });
        let schema_kept = self.schema.as_ref().is_none_or(|s| s.matches(&doc));
        let unknown_enums = self
            .enums
            .iter()
            .filter(|e| {
                walk(&doc, &e.path).is_some_and(|v| {
                    scalar_text(v).is_none_or(|t| !e.values.iter().any(|k| *k == t))
                })
            })
            .count();
        Judgement {
            kept,
            schema_kept,
            unknown_enums,
        }
    }

    /// Whether a JSON body satisfies the success rule. Bodies that are not JSON do not.
    pub fn satisfied_by(&self, body: &[u8]) -> bool {
        self.judge(body).kept
    }
}

/// Parses `$.a.b[0].c`: `$`, then `.name` (letters, digits, `_`, `-`) and `[index]` steps.
pub fn parse_json_path(text: &str) -> Result<Vec<PathStep>, String> {
    let Some(mut rest) = text.strip_prefix('$') else {
        return Err("must start with `$`".into());
    };
    let mut steps = Vec::new();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .unwrap_or(r.len());
            if end == 0 {
                return Err(
                    "`.` must be followed by a field name (letters, digits, `_`, `-`)".into(),
                );
            }
            steps.push(PathStep::Field(r[..end].to_string()));
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else {
                return Err("`[` without `]`".into());
            };
            let index = r[..end]
                .parse::<usize>()
                .map_err(|_| format!("[{}] must be an array index", &r[..end]))?;
            steps.push(PathStep::Index(index));
            rest = &r[end + 1..];
        } else {
            return Err(format!(
                "unexpected {:?}: steps are `.field` or `[index]`",
                rest.chars().next().unwrap_or_default()
            ));
        }
        if steps.len() > MAX_JSON_PATH_STEPS {
            return Err(format!("at most {MAX_JSON_PATH_STEPS} steps"));
        }
    }
    if steps.is_empty() {
        return Err("must name a field, e.g. `$.status`".into());
    }
    Ok(steps)
}

/// Everything that governs one route, resolved against the integration's defaults.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RoutePolicy {
    pub name: String,
    pub path_prefix: Option<String>,
    /// Empty: any method.
    #[serde(serialize_with = "ser::methods")]
    pub methods: Vec<Method>,
    /// The integration's switch or the route's own, whichever is on.
    pub kill_switch: KillSwitchPolicy,
    pub timeouts: TimeoutPolicy,
    pub retries: RetryPolicy,
    /// The route's own bands, enforced in addition to the integration's quota.
    pub rate_limit: Option<RateLimitPolicy>,
    /// The route's own cap on calls in flight, in addition to the integration's.
    pub concurrency: Option<ConcurrencyPolicy>,
    pub breaker: BreakerScope,
    pub fallback: FallbackPolicy,
    /// The route's contract, or the integration's.
    pub contract: Option<ContractPolicy>,
}

impl RoutePolicy {
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| path_has_prefix(path, p))
    }

    /// Whether every request `other` matches is matched by `self` too.
    fn covers(&self, other: &RoutePolicy) -> bool {
        let methods = self.methods.is_empty()
            || (!other.methods.is_empty()
                && other.methods.iter().all(|m| self.methods.contains(m)));
        let path = match (&self.path_prefix, &other.path_prefix) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => path_has_prefix(theirs, mine),
        };
        methods && path
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlaPolicy {
    pub availability_percent: Option<f64>,
    #[serde(with = "duration::serde_go::option")]
    pub latency_p95: Option<Duration>,
}

/// `localhost` or a loopback IP literal: traffic that never leaves the machine.
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Segment-aware prefix test: `/v1/tracking` is a prefix of `/v1/tracking` and
/// `/v1/tracking/9`, not of `/v1/trackings`. A prefix ending in `/` matches as plain text.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => {
            rest.is_empty()
                || prefix.ends_with('/')
                || rest.starts_with('/')
                || rest.starts_with('?')
        }
        None => false,
    }
}

// === compile ===

/// [`compile`], refusing a contract schema that names a ConfigMap whose text is not in: what a
/// sidecar can enforce (only the operator reads ConfigMaps, and distributes their text).
pub fn compile_enforceable(
    namespace: &str,
    name: &str,
    spec: &PartnerIntegrationSpec,
) -> Result<IntegrationPolicy, CompileError> {
    let policy = compile(namespace, name, spec)?;
    match policy.unresolved_schema() {
        Some(path) => Err(CompileError {
            errors: vec![FieldError {
                path,
                message: "the schema's text is not in: a sidecar reads no ConfigMap (the \
                          operator distributes its text); standalone, give contract.schema.inline"
                    .into(),
            }],
        }),
        None => Ok(policy),
    }
}

/// Compiles one spec. `namespace`/`name` identify it in answers and telemetry.
pub fn compile(
    namespace: &str,
    name: &str,
    spec: &PartnerIntegrationSpec,
) -> Result<IntegrationPolicy, CompileError> {
    let mut c = Compiler::default();
    let policy = c.integration(namespace, name, spec);
    match policy {
        Some(p) if c.errors.is_empty() => Ok(p),
        _ => Err(CompileError { errors: c.errors }),
    }
}

/// Collects every error instead of stopping at the first, so a user fixes a spec in one pass.
#[derive(Default)]
struct Compiler {
    errors: Vec<FieldError>,
}

impl Compiler {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, path: &str, value: Option<&String>, default: Duration) -> Duration {
        self.opt_duration(path, value).unwrap_or(default)
    }

    fn opt_duration(&mut self, path: &str, value: Option<&String>) -> Option<Duration> {
        let s = value?;
        match duration::parse(s) {
            Some(d) if d > duration::MAX => {
                self.err(
                    path,
                    format!(
                        "{s:?} is longer than the maximum {}",
                        duration::format(duration::MAX)
                    ),
                );
                None
            }
            Some(d) => Some(d),
            None => {
                self.err(
                    path,
                    format!("{s:?} is not a duration (use a non-negative Go duration such as 250ms, 3s, 1m)"),
                );
                None
            }
        }
    }

    fn positive_duration(
        &mut self,
        path: &str,
        value: Option<&String>,
        default: Duration,
    ) -> Duration {
        let d = self.duration(path, value, default);
        if d.is_zero() {
            self.err(
                path,
                format!(
                    "{:?} must be greater than zero",
                    value.map(String::as_str).unwrap_or("0")
                ),
            );
            return default;
        }
        d
    }

    fn count(&mut self, path: &str, value: Option<i32>, min: i32, max: i32, default: u32) -> u32 {
        match value {
            None => default,
            Some(v) if (min..=max).contains(&v) => v as u32,
            Some(v) => {
                self.err(path, format!("{v} is out of range ({min} to {max})"));
                default
            }
        }
    }

    fn header_name(&mut self, path: &str, s: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(s.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.err(path, format!("{s:?} is not a valid HTTP header name"));
                None
            }
        }
    }

    fn header_value(&mut self, path: &str, s: &str) -> Option<HeaderValue> {
        match HeaderValue::from_str(s) {
            Ok(v) => Some(v),
            Err(_) => {
                self.err(
                    path,
                    format!(
                        "{s:?} is not a valid HTTP header value (control characters or non-ASCII)"
                    ),
                );
                None
            }
        }
    }

    fn path_prefix(&mut self, path: &str, s: &str) -> Option<String> {
        if !s.starts_with('/') {
            self.err(path, format!("{s:?} must start with '/'"));
            return None;
        }
        if s.contains(['?', '#', ' ']) {
            self.err(
                path,
                format!("{s:?} must be a plain path (no query, fragment or spaces)"),
            );
            return None;
        }
        // Requests are matched in normal form, so prefixes are too.
        match normalize_path(s) {
            Ok(n) => Some(n),
            Err(e) => {
                self.err(path, format!("{s:?}: {e}"));
                None
            }
        }
    }

    fn integration(
        &mut self,
        namespace: &str,
        name: &str,
        spec: &PartnerIntegrationSpec,
    ) -> Option<IntegrationPolicy> {
        if namespace.is_empty() {
            self.err("metadata.namespace", "must be set");
        }
        if name.is_empty() {
            self.err("metadata.name", "must be set");
        }
        let upstream = self.upstream(spec);
        let hosts = self.hosts(spec, upstream.as_ref());
        let versioning = self.versioning(spec);
        let credentials = spec.credentials.as_ref().and_then(|c| self.credentials(c));
        if let (Some(c), Some(up)) = (&credentials, &upstream)
            && up.scheme == Scheme::Http
            && !c.allow_insecure
            && !is_loopback(&up.host)
        {
            self.err(
                "spec.credentials",
                format!(
                    "the credential would cross the network in cleartext to {:?}: use an https:// upstream, or set spec.credentials.allowInsecure: true",
                    up.url
                ),
            );
        }
        let rate_limit = spec
            .rate_limit
            .as_ref()
            .and_then(|r| self.rate_limit("spec.rateLimit", r, None));
        let concurrency = spec
            .concurrency
            .as_ref()
            .map(|c| self.concurrency("spec.concurrency", c));
        let circuit_breaker = spec
            .circuit_breaker
            .as_ref()
            .map(|b| self.breaker("spec.circuitBreaker", b, None));

        let contract = spec
            .contract
            .as_ref()
            .and_then(|k| self.contract("spec.contract", k));
        let mut default_route = self.route_policy(
            "spec",
            DEFAULT_ROUTE.to_string(),
            None,
            Vec::new(),
            spec,
            &RouteOverrides::default(),
        );
        default_route.contract = contract.clone();
        let mut routes = Vec::with_capacity(spec.routes.len());
        let mut seen = BTreeSet::new();
        for (i, r) in spec.routes.iter().enumerate() {
            let base = format!("spec.routes[{i}]");
            if r.name == DEFAULT_ROUTE {
                self.err(
                    format!("{base}.name"),
                    format!("{DEFAULT_ROUTE:?} is reserved for requests no route matches"),
                );
            }
            if !seen.insert(r.name.clone()) {
                self.err(
                    format!("{base}.name"),
                    format!(
                        "{:?} is used by an earlier route; route names must be unique",
                        r.name
                    ),
                );
            }
            let prefix = r
                .r#match
                .path_prefix
                .as_deref()
                .and_then(|p| self.path_prefix(&format!("{base}.match.pathPrefix"), p));
            let mut methods = Vec::new();
            for (j, m) in r.r#match.methods.iter().enumerate() {
                let upper = m.to_ascii_uppercase();
                match Method::from_bytes(upper.as_bytes()) {
                    Ok(method) if !upper.is_empty() => methods.push(method),
                    _ => self.err(
                        format!("{base}.match.methods[{j}]"),
                        format!("{m:?} is not an HTTP method"),
                    ),
                }
            }
            let overrides = RouteOverrides {
                kill_switch: r.kill_switch.as_ref(),
                timeouts: r.timeouts.as_ref(),
                retries: r.retries.as_ref(),
                fallback: r.fallback.as_ref(),
            };
            let mut route =
                self.route_policy(&base, r.name.clone(), prefix, methods, spec, &overrides);
            route.rate_limit = r.rate_limit.as_ref().and_then(|rl| {
                self.rate_limit(&format!("{base}.rateLimit"), rl, spec.rate_limit.as_ref())
            });
            route.concurrency = r
                .concurrency
                .as_ref()
                .map(|c| self.concurrency(&format!("{base}.concurrency"), c));
            if let Some(b) = &r.circuit_breaker {
                route.breaker = BreakerScope::Route(self.breaker(
                    &format!("{base}.circuitBreaker"),
                    b,
                    spec.circuit_breaker.as_ref(),
                ));
            }
            route.contract = match &r.contract {
                Some(k) => self.contract(&format!("{base}.contract"), k),
                None => contract.clone(),
            };
            routes.push(route);
        }
        for (j, later) in routes.iter().enumerate() {
            if let Some((i, earlier)) = routes[..j]
                .iter()
                .enumerate()
                .find(|(_, e)| e.covers(later))
            {
                self.err(
                    format!("spec.routes[{j}]"),
                    format!("route {:?} never matches: route {:?} (spec.routes[{i}]) comes first and matches every request it would", later.name, earlier.name),
                );
            }
        }

        let sla = spec.sla.as_ref().map(|s| {
            let availability_percent =
                s.availability_percent
                    .as_ref()
                    .and_then(|a| match a.parse::<f64>() {
                        Ok(v) if v > 0.0 && v <= 100.0 => Some(v),
                        _ => {
                            self.err(
                                "spec.sla.availabilityPercent",
                                format!("{a:?} must be a percentage above 0 and at most 100"),
                            );
                            None
                        }
                    });
            let latency_p95 = self.opt_duration("spec.sla.latencyP95", s.latency_p95.as_ref());
            SlaPolicy {
                availability_percent,
                latency_p95,
            }
        });

        let mut redact_headers = Vec::new();
        if let Some(c) = &credentials {
            redact_headers.push(c.header.clone());
        }
        if let Some(t) = &spec.telemetry {
            for (i, h) in t.redact_headers.iter().enumerate() {
                if let Some(h) = self.header_name(&format!("spec.telemetry.redactHeaders[{i}]"), h)
                    && !redact_headers.contains(&h)
                {
                    redact_headers.push(h);
                }
            }
        }

        Some(IntegrationPolicy {
            id: IntegrationId {
                namespace: namespace.to_string(),
                name: name.to_string(),
            },
            workload_selector: spec
                .workload_selector
                .as_ref()
                .map(|w| w.match_labels.clone())
                .unwrap_or_default(),
            upstream: upstream?,
            hosts,
            versioning,
            credentials,
            rate_limit,
            concurrency,
            circuit_breaker,
            routes,
            default_route,
            sla,
            redact_headers,
            access_log: spec.telemetry.as_ref().is_some_and(|t| t.access_log),
        })
    }

    fn contract(&mut self, base: &str, k: &Contract) -> Option<ContractPolicy> {
        if k.success.is_none() && k.schema.is_none() && k.enums.is_empty() {
            self.err(
                base.to_string(),
                "names no check: give success, schema or enums",
            );
            return None;
        }
        let path = match &k.success {
            None => Some(Vec::new()),
            Some(success) => match parse_json_path(&success.json_path) {
                Ok(p) => Some(p),
                Err(e) => {
                    self.err(
                        format!("{base}.success.jsonPath"),
                        format!("{:?} {e}", success.json_path),
                    );
                    None
                }
            },
        };
        let schema = match &k.schema {
            None => Some(None),
            Some(schema) => self.schema(&format!("{base}.schema"), schema).map(Some),
        };
        let sample_rate = match &k.sample_rate {
            None => Some(1.0),
            Some(s) => match s.parse::<f64>() {
                Ok(v) if v > 0.0 && v <= 1.0 => Some(v),
                _ => {
                    self.err(
                        format!("{base}.sampleRate"),
                        format!("{s:?} must be a decimal above 0 and at most 1"),
                    );
                    None
                }
            },
        };
        let max_body_bytes = match k.max_body_bytes {
            None => Some(DEFAULT_CONTRACT_BODY_BYTES),
            Some(n) if n >= 1 && n as u64 <= MAX_CONTRACT_BODY_BYTES as u64 => Some(n as usize),
            Some(n) => {
                self.err(
                    format!("{base}.maxBodyBytes"),
                    format!("{n} must be between 1 and {MAX_CONTRACT_BODY_BYTES}"),
                );
                None
            }
        };
        let mut enums = Vec::with_capacity(k.enums.len());
        for (i, e) in k.enums.iter().enumerate() {
            match parse_json_path(&e.json_path) {
                Ok(path) => enums.push(EnumPolicy {
                    json_path: e.json_path.clone(),
                    path,
                    values: e.values.clone(),
                }),
                Err(err) => self.err(
                    format!("{base}.enums[{i}].jsonPath"),
                    format!("{:?} {err}", e.json_path),
                ),
            }
        }
        Some(ContractPolicy {
            json_path: k.success.as_ref().map(|r| r.json_path.clone()),
            path: path?,
            equals: k.success.as_ref().map(|r| r.equals.clone()),
            schema: schema?,
            enums,
            sample_rate: sample_rate?,
            max_body_bytes: max_body_bytes?,
        })
    }

    /// `contract.schema`: the inline text is parsed and compiled (no remote `$ref` is
    /// fetched: one that is not in the schema fails here); a ConfigMap without its text yet
    /// compiles to an unresolved schema, which a sidecar refuses.
    fn schema(&mut self, base: &str, k: &ContractSchema) -> Option<SchemaPolicy> {
        let from_map = match (&k.config_map_name, &k.key) {
            (Some(name), Some(key)) => Some(format!("configMap {name} key {key}")),
            (Some(_), None) => {
                self.err(format!("{base}.key"), "required with configMapName");
                return None;
            }
            (None, Some(_)) => {
                self.err(format!("{base}.configMapName"), "required with key");
                return None;
            }
            (None, None) => None,
        };
        let Some(text) = &k.inline else {
            return match from_map {
                Some(source) => Some(SchemaPolicy {
                    source,
                    text: None,
                    validator: None,
                }),
                None => {
                    self.err(base.to_string(), "give configMapName and key, or inline");
                    None
                }
            };
        };
        // With a ConfigMap named too, the text is the one the operator read from it.
        let (field, source) = match from_map {
            Some(source) => (format!("{base}.configMapName"), source),
            None => (format!("{base}.inline"), "inline".to_string()),
        };
        if text.len() > MAX_CONTRACT_SCHEMA_BYTES {
            self.err(
                field,
                format!(
                    "the schema is {} bytes, more than {MAX_CONTRACT_SCHEMA_BYTES}",
                    text.len()
                ),
            );
            return None;
        }
        let value: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                self.err(field, format!("the schema is not JSON: {e}"));
                return None;
            }
        };
        match jsonschema::validator_for(&value) {
            Ok(v) => Some(SchemaPolicy {
                source,
                text: Some(std::sync::Arc::from(text.as_str())),
                validator: Some(std::sync::Arc::new(v)),
            }),
            Err(e) => {
                self.err(field, format!("the schema does not compile: {e}"));
                None
            }
        }
    }

    fn upstream(&mut self, spec: &PartnerIntegrationSpec) -> Option<UpstreamPolicy> {
        let url = &spec.upstream.url;
        let path = "spec.upstream.url";
        let connect_timeout = self.positive_duration(
            "spec.upstream.connectTimeout",
            spec.upstream.connect_timeout.as_ref(),
            DEFAULT_CONNECT_TIMEOUT,
        );
        let uri: Uri = match url.parse() {
            Ok(u) => u,
            Err(_) if !url.contains("://") => {
                self.err(
                    path,
                    format!("{url:?} must be an absolute URL starting with https:// or http://"),
                );
                return None;
            }
            Err(_) => {
                self.err(path, format!("{url:?} is not a URL"));
                return None;
            }
        };
        let scheme = match uri.scheme_str() {
            Some("https") => Scheme::Https,
            Some("http") => Scheme::Http,
            Some(other) => {
                self.err(
                    path,
                    format!("{url:?}: scheme {other:?} is not supported (use https:// or http://)"),
                );
                return None;
            }
            None => {
                self.err(
                    path,
                    format!("{url:?} must be an absolute URL starting with https:// or http://"),
                );
                return None;
            }
        };
        let Some(authority) = uri.authority() else {
            self.err(path, format!("{url:?} has no host"));
            return None;
        };
        if authority.as_str().contains('@') {
            self.err(
                path,
                format!("{url:?} must not carry credentials; use spec.credentials"),
            );
            return None;
        }
        if uri.query().is_some() {
            self.err(path, format!("{url:?} must not have a query string"));
            return None;
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        if host.is_empty() {
            self.err(path, format!("{url:?} has no host"));
            return None;
        }
        let port = authority.port_u16().unwrap_or(match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        });
        let base_path = uri.path().trim_end_matches('/').to_string();
        let interception = match (spec.upstream.interception, scheme) {
            (Some(true), Scheme::Http) => {
                self.err(
                    "spec.upstream.interception",
                    format!(
                        "true needs an https:// url ({url:?} would send what the app encrypted in the clear)"
                    ),
                );
                return None;
            }
            (Some(on), _) => on,
            (None, scheme) => scheme == Scheme::Https,
        };
        let ca_bundle = match &spec.upstream.ca_bundle {
            None => None,
            Some(pem) => {
                if let Err(why) = ca_bundle_certificates(pem) {
                    self.err("spec.upstream.caBundle", why);
                    return None;
                }
                if scheme == Scheme::Http {
                    self.err(
                        "spec.upstream.caBundle",
                        format!("needs an https:// url ({url:?} has no TLS to verify)"),
                    );
                    return None;
                }
                Some(pem.clone())
            }
        };
        let client_certificate = match &spec.upstream.client_certificate {
            None => None,
            Some(c) => {
                let field = "spec.upstream.clientCertificate.secretName";
                if !is_object_name(&c.secret_name) {
                    self.err(
                        field,
                        format!("{:?} is not a Secret name (lower-case letters, digits, '-' and '.', at most 253)", c.secret_name),
                    );
                    return None;
                }
                if scheme == Scheme::Http {
                    self.err(
                        "spec.upstream.clientCertificate",
                        format!("needs an https:// url ({url:?} has no TLS to present it in)"),
                    );
                    return None;
                }
                Some(c.secret_name.clone())
            }
        };
        Some(UpstreamPolicy {
            url: url.clone(),
            scheme,
            host,
            port,
            base_path,
            connect_timeout,
            interception,
            ca_bundle,
            client_certificate,
        })
    }

    fn hosts(
        &mut self,
        spec: &PartnerIntegrationSpec,
        upstream: Option<&UpstreamPolicy>,
    ) -> Vec<HostMatch> {
        if spec.upstream.hosts.is_empty() {
            // Default: the url's host, with its port when the url names one explicitly.
            let Some(up) = upstream else {
                return Vec::new();
            };
            let explicit_port = spec
                .upstream
                .url
                .parse::<Uri>()
                .ok()
                .and_then(|u| u.port_u16());
            let Some(host) = normalize_host(&up.host) else {
                self.err(
                    "spec.upstream.url",
                    format!("{:?} is not a host name", up.host),
                );
                return Vec::new();
            };
            return vec![HostMatch {
                host,
                port: explicit_port,
            }];
        }
        let mut out: Vec<(usize, HostMatch)> = Vec::new();
        for (i, h) in spec.upstream.hosts.iter().enumerate() {
            let path = format!("spec.upstream.hosts[{i}]");
            let parsed = h.parse::<http::uri::Authority>();
            let host = match &parsed {
                Ok(a) if !h.contains(['/', '@', '*']) => {
                    normalize_host(a.host().trim_start_matches('[').trim_end_matches(']'))
                }
                _ => None,
            };
            let (Ok(a), Some(host)) = (parsed, host) else {
                self.err(
                    path,
                    format!(
                        "{h:?} is not a host name (write api.example.com or api.example.com:8443)"
                    ),
                );
                continue;
            };
            let m = HostMatch {
                host,
                port: a.port_u16(),
            };
            // A host listed twice (in any spelling, or once with and once without a port)
            // would be claimed twice by the same integration.
            if let Some((j, _)) = out.iter().find(|(_, o)| o.overlaps(&m)) {
                self.err(
                    path,
                    format!("{h:?} overlaps spec.upstream.hosts[{j}]; list each host once"),
                );
                continue;
            }
            out.push((i, m));
        }
        out.into_iter().map(|(_, m)| m).collect()
    }

    fn versioning(&mut self, spec: &PartnerIntegrationSpec) -> VersioningPolicy {
        let Some(v) = &spec.versioning else {
            return VersioningPolicy::default();
        };
        let mut pin_headers = Vec::new();
        for (k, val) in &v.pin_headers {
            let path = format!("spec.versioning.pinHeaders[{k}]");
            if let (Some(name), Some(value)) =
                (self.header_name(&path, k), self.header_value(&path, val))
            {
                pin_headers.push((name, value));
            }
        }
        let denied_path_prefixes = v
            .denied_path_prefixes
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                self.path_prefix(&format!("spec.versioning.deniedPathPrefixes[{i}]"), p)
            })
            .collect();
        VersioningPolicy {
            pin_headers,
            denied_path_prefixes,
        }
    }

    fn credentials(&mut self, c: &crate::v1alpha1::Credentials) -> Option<CredentialPolicy> {
        let header = self.header_name(
            "spec.credentials.header",
            c.header.as_deref().unwrap_or(DEFAULT_CREDENTIAL_HEADER),
        );
        let format = c.format.as_deref().unwrap_or(DEFAULT_CREDENTIAL_FORMAT);
        let parts: Vec<&str> = format.split("{value}").collect();
        if parts.len() != 2 {
            self.err(
                "spec.credentials.format",
                format!("{format:?} must contain {{value}} exactly once"),
            );
            return None;
        }
        if HeaderValue::from_str(&format.replace("{value}", "x")).is_err() {
            self.err(
                "spec.credentials.format",
                format!("{format:?} has characters a header value cannot hold"),
            );
            return None;
        }
        let oauth2 = match &c.oauth2 {
            Some(o) => {
                if !c.secret_ref.is_unset() {
                    self.err(
                        "spec.credentials.oauth2",
                        "give either secretRef or oauth2, not both",
                    );
                }
                if c.secondary_ref.is_some() {
                    self.err(
                        "spec.credentials.secondaryRef",
                        "not with oauth2: tokens rotate themselves",
                    );
                }
                self.oauth2(o, c.allow_insecure.unwrap_or(false))
            }
            None => {
                self.secret_key_ref("spec.credentials.secretRef", &c.secret_ref);
                if let Some(s) = &c.secondary_ref {
                    self.secret_key_ref("spec.credentials.secondaryRef", s);
                    if s == &c.secret_ref {
                        self.err(
                            "spec.credentials.secondaryRef",
                            "names the same Secret key as secretRef; a rotation window needs two keys",
                        );
                    }
                }
                None
            }
        };
        Some(CredentialPolicy {
            secret_ref: c.secret_ref.clone(),
            secondary_ref: c.secondary_ref.clone(),
            header: header?,
            prefix: parts[0].to_string(),
            suffix: parts[1].to_string(),
            allow_insecure: c.allow_insecure.unwrap_or(false),
            oauth2,
            verify: c.verify.as_ref().and_then(|v| self.verify(v)),
        })
    }

    fn verify(&mut self, v: &crate::v1alpha1::CredentialCheck) -> Option<VerifyPolicy> {
        let base = "spec.credentials.verify";
        let m = v.method.as_deref().unwrap_or("GET").to_ascii_uppercase();
        let method = match Method::from_bytes(m.as_bytes()) {
            Ok(method) if !m.is_empty() => Some(method),
            _ => {
                self.err(
                    format!("{base}.method"),
                    format!("{m:?} is not an HTTP method"),
                );
                None
            }
        };
        let path = self.path_prefix(&format!("{base}.path"), &v.path);
        let expect_status = v.expect_status.unwrap_or(200);
        if !(100..=599).contains(&expect_status) {
            self.err(
                format!("{base}.expectStatus"),
                format!("{expect_status} is not an HTTP status"),
            );
            return None;
        }
        Some(VerifyPolicy {
            method: method?,
            path: path?,
            expect_status,
        })
    }

    fn secret_key_ref(&mut self, base: &str, r: &SecretKeyRef) {
        if r.name.is_empty() {
            self.err(format!("{base}.name"), "must be set");
        }
        if r.key.is_empty() {
            self.err(format!("{base}.key"), "must be set");
        }
    }

    fn oauth2(
        &mut self,
        o: &crate::v1alpha1::OAuth2,
        allow_insecure: bool,
    ) -> Option<OAuth2Policy> {
        let base = "spec.credentials.oauth2";
        self.secret_key_ref(&format!("{base}.clientIdRef"), &o.client_id_ref);
        self.secret_key_ref(&format!("{base}.clientSecretRef"), &o.client_secret_ref);
        let path = format!("{base}.tokenUrl");
        let url = &o.token_url;
        let uri = match url.parse::<Uri>() {
            Ok(u) if u.authority().is_some() => u,
            _ => {
                self.err(
                    &path,
                    format!("{url:?} must be an absolute URL starting with https:// or http://"),
                );
                return None;
            }
        };
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            self.err(&path, format!("{url:?} must not carry credentials"));
            return None;
        }
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if is_loopback(&host) || allow_insecure => {}
            Some("http") => {
                self.err(
                    &path,
                    format!("{url:?}: the client secret would cross the network in cleartext; use https://, or set spec.credentials.allowInsecure: true"),
                );
                return None;
            }
            _ => {
                self.err(
                    &path,
                    format!("{url:?} must be an absolute URL starting with https:// or http://"),
                );
                return None;
            }
        }
        for (i, scope) in o.scopes.iter().enumerate() {
            // RFC 6749 section 3.3: printable ASCII without space, `"` or `\`.
            if scope.is_empty()
                || scope.len() > 256
                || !scope
                    .bytes()
                    .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
            {
                self.err(
                    format!("{base}.scopes[{i}]"),
                    format!("{scope:?} is not a scope token (printable ASCII, no spaces, quotes or backslashes, at most 256)"),
                );
            }
        }
        let refresh_before =
            self.opt_duration(&format!("{base}.refreshBefore"), o.refresh_before.as_ref());
        Some(OAuth2Policy {
            token_url: url.clone(),
            client_id_ref: o.client_id_ref.clone(),
            client_secret_ref: o.client_secret_ref.clone(),
            scopes: o.scopes.clone(),
            audience: o.audience.clone(),
            auth_method: o.auth_method.unwrap_or_default(),
            refresh_before,
        })
    }

    /// `inherit`: the integration's quota, whose scope/onLimit/queue settings a route's bands
    /// take unless the route sets its own.
    fn concurrency(&mut self, base: &str, c: &Concurrency) -> ConcurrencyPolicy {
        let bounded = |v: i64| u32::try_from(v.clamp(1, MAX_CONCURRENCY)).unwrap_or(1);
        if !(1..=MAX_CONCURRENCY).contains(&c.max_in_flight) {
            self.err(
                format!("{base}.maxInFlight"),
                format!(
                    "{} must be between 1 and {MAX_CONCURRENCY}",
                    c.max_in_flight
                ),
            );
        }
        if let Some(d) = c.max_queue_depth
            && !(1..=MAX_CONCURRENCY).contains(&d)
        {
            self.err(
                format!("{base}.maxQueueDepth"),
                format!("{d} must be between 1 and {MAX_CONCURRENCY}"),
            );
        }
        let max_queue_wait = self.duration(
            &format!("{base}.maxQueueWait"),
            c.max_queue_wait.as_ref(),
            DEFAULT_MAX_QUEUE_WAIT,
        );
        ConcurrencyPolicy {
            max_in_flight: bounded(c.max_in_flight),
            on_limit: c.on_limit.unwrap_or_default(),
            max_queue_wait,
            max_queue_depth: bounded(c.max_queue_depth.unwrap_or(c.max_in_flight)),
            priority_header: c
                .priority_header
                .as_ref()
                .and_then(|h| self.header_name(&format!("{base}.priorityHeader"), h)),
        }
    }

    /// `limits`-style bands at `{base}.{field}`: at least one, names unique, each valid.
    fn bands(&mut self, base: &str, field: &str, limits: &[LimitBand]) -> Vec<BandPolicy> {
        if limits.is_empty() {
            self.err(format!("{base}.{field}"), "at least one band is required");
        }
        let mut bands = Vec::new();
        let mut names = BTreeSet::new();
        for (i, b) in limits.iter().enumerate() {
            let path = format!("{base}.{field}[{i}]");
            if b.name.is_empty() {
                self.err(format!("{path}.name"), "must be set");
            } else if !names.insert(b.name.clone()) {
                self.err(
                    format!("{path}.name"),
                    format!(
                        "{:?} is used by an earlier band; band names must be unique",
                        b.name
                    ),
                );
            }
            if b.requests < 1 {
                self.err(
                    format!("{path}.requests"),
                    format!("{} must be at least 1", b.requests),
                );
            }
            let per = self.positive_duration(
                &format!("{path}.per"),
                Some(&b.per),
                Duration::from_secs(1),
            );
            bands.push(BandPolicy {
                name: b.name.clone(),
                requests: b.requests.max(1) as u64,
                per,
            });
        }
        bands
    }

    fn overrides(
        &mut self,
        base: &str,
        r: &RateLimit,
        partitioned: bool,
    ) -> Vec<PartitionOverridePolicy> {
        if !r.overrides.is_empty() && !partitioned {
            self.err(
                format!("{base}.overrides"),
                "needs partitionBy: overrides give some values of that header their own bands",
            );
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for (i, o) in r.overrides.iter().enumerate() {
            let path = format!("{base}.overrides[{i}]");
            if o.values.is_empty() {
                self.err(format!("{path}.values"), "at least one value is required");
            }
            for (j, v) in o.values.iter().enumerate() {
                if v.is_empty() || v.len() > 256 {
                    self.err(format!("{path}.values[{j}]"), "must be 1 to 256 bytes long");
                } else if !seen.insert(v.clone()) {
                    self.err(
                        format!("{path}.values[{j}]"),
                        format!("{v:?} is overridden by an earlier entry; list each value once"),
                    );
                }
            }
            let bands = self.bands(&path, "limits", &o.limits);
            out.push(PartitionOverridePolicy {
                values: o.values.clone(),
                bands,
            });
        }
        out
    }

    fn rate_limit(
        &mut self,
        base: &str,
        r: &RateLimit,
        inherit: Option<&RateLimit>,
    ) -> Option<RateLimitPolicy> {
        let bands = self.bands(base, "limits", &r.limits);
        let scope = r
            .scope
            .or(inherit.and_then(|i| i.scope))
            .unwrap_or_default();
        let on_limit = r
            .on_limit
            .or(inherit.and_then(|i| i.on_limit))
            .unwrap_or_default();
        let max_queue_wait = self.duration(
            &format!("{base}.maxQueueWait"),
            r.max_queue_wait
                .as_ref()
                .or(inherit.and_then(|i| i.max_queue_wait.as_ref())),
            DEFAULT_MAX_QUEUE_WAIT,
        );
        let partition_by = r
            .partition_by
            .as_ref()
            .or(inherit.and_then(|i| i.partition_by.as_ref()))
            .and_then(|h| self.header_name(&format!("{base}.partitionBy"), h));
        let also = if r.partition_by.is_some() || !r.partition_also_by.is_empty() {
            &r.partition_also_by
        } else {
            inherit.map_or(&r.partition_also_by, |i| &i.partition_also_by)
        };
        if !also.is_empty() && partition_by.is_none() {
            self.err(
                format!("{base}.partitionAlsoBy"),
                "needs partitionBy: these headers add to that header's value in the partition key",
            );
        }
        let mut partition_also_by: Vec<HeaderName> = Vec::new();
        for (i, h) in also.iter().enumerate() {
            let path = format!("{base}.partitionAlsoBy[{i}]");
            let Some(name) = self.header_name(&path, h) else {
                continue;
            };
            if partition_by.as_ref() == Some(&name) || partition_also_by.contains(&name) {
                self.err(path, format!("{name} is already part of the partition key"));
            } else {
                partition_also_by.push(name);
            }
        }
        if also.len() > 3 {
            self.err(format!("{base}.partitionAlsoBy"), "at most 3 headers");
        }
        let partition_by_client_address = r
            .partition_by_client_address
            .or(inherit.and_then(|i| i.partition_by_client_address))
            .unwrap_or(false);
        let adaptive = r
            .adaptive
            .as_ref()
            .or(inherit.and_then(|i| i.adaptive.as_ref()))
            .map(|a| {
                let min_percent = a.min_percent.unwrap_or(DEFAULT_ADAPTIVE_MIN_PERCENT);
                if !(1..=100).contains(&min_percent) {
                    self.err(
                        format!("{base}.adaptive.minPercent"),
                        format!("{min_percent} must be between 1 and 100"),
                    );
                }
                let recovery = self.positive_duration(
                    &format!("{base}.adaptive.recovery"),
                    a.recovery.as_ref(),
                    DEFAULT_ADAPTIVE_RECOVERY,
                );
                AdaptivePolicy {
                    min_percent: u32::try_from(min_percent.clamp(1, 100)).unwrap_or(100),
                    recovery,
                }
            });
        let overrides = self.overrides(base, r, partition_by.is_some());
        Some(RateLimitPolicy {
            scope,
            on_limit,
            max_queue_wait,
            partition_by,
            partition_also_by,
            partition_by_client_address,
            bands,
            overrides,
            adaptive,
        })
    }

    fn breaker(
        &mut self,
        base: &str,
        b: &CircuitBreaker,
        inherit: Option<&CircuitBreaker>,
    ) -> BreakerPolicy {
        let pick_s =
            |f: fn(&CircuitBreaker) -> Option<&String>| f(b).or(inherit.and_then(f)).cloned();
        let pick_i = |f: fn(&CircuitBreaker) -> Option<i32>| f(b).or(inherit.and_then(f));
        BreakerPolicy {
            window: self.positive_duration(
                &format!("{base}.window"),
                pick_s(|b| b.window.as_ref()).as_ref(),
                DEFAULT_BREAKER_WINDOW,
            ),
            minimum_requests: self.count(
                &format!("{base}.minimumRequests"),
                pick_i(|b| b.minimum_requests),
                1,
                i32::MAX,
                DEFAULT_BREAKER_MINIMUM_REQUESTS,
            ),
            failure_rate_percent: self.count(
                &format!("{base}.failureRatePercent"),
                pick_i(|b| b.failure_rate_percent),
                1,
                100,
                DEFAULT_BREAKER_FAILURE_RATE_PERCENT,
            ),
            consecutive_failures: self.count(
                &format!("{base}.consecutiveFailures"),
                pick_i(|b| b.consecutive_failures),
                1,
                i32::MAX,
                DEFAULT_BREAKER_CONSECUTIVE_FAILURES,
            ),
            slow_call_duration: self.opt_duration(
                &format!("{base}.slowCallDuration"),
                pick_s(|b| b.slow_call_duration.as_ref()).as_ref(),
            ),
            open_duration: self.positive_duration(
                &format!("{base}.openDuration"),
                pick_s(|b| b.open_duration.as_ref()).as_ref(),
                DEFAULT_BREAKER_OPEN_DURATION,
            ),
            half_open_probes: self.count(
                &format!("{base}.halfOpenProbes"),
                pick_i(|b| b.half_open_probes),
                1,
                1000,
                DEFAULT_BREAKER_HALF_OPEN_PROBES,
            ),
        }
    }

    fn route_policy(
        &mut self,
        base: &str,
        name: String,
        path_prefix: Option<String>,
        methods: Vec<Method>,
        spec: &PartnerIntegrationSpec,
        o: &RouteOverrides<'_>,
    ) -> RoutePolicy {
        let kill_switch = merge_kill_switch(spec.kill_switch.as_ref(), o.kill_switch);
        let timeouts = self.timeouts(base, spec.timeouts.as_ref(), o.timeouts);
        let retries = self.retries(base, spec.retries.as_ref(), o.retries);
        let fallback = self.fallback(base, spec.fallback.as_ref(), o.fallback);
        RoutePolicy {
            name,
            path_prefix,
            methods,
            kill_switch,
            timeouts,
            retries,
            rate_limit: None,
            concurrency: None,
            breaker: if spec.circuit_breaker.is_some() {
                BreakerScope::Integration
            } else {
                BreakerScope::None
            },
            fallback,
            contract: None,
        }
    }

    fn timeouts(
        &mut self,
        base: &str,
        spec: Option<&Timeouts>,
        route: Option<&Timeouts>,
    ) -> TimeoutPolicy {
        // The path names where the value came from: the route's field if it set one.
        let (req_path, req) = pick(
            base,
            "timeouts.request",
            route.and_then(|t| t.request.as_ref()),
            spec.and_then(|t| t.request.as_ref()),
        );
        let (tot_path, tot) = pick(
            base,
            "timeouts.total",
            route.and_then(|t| t.total.as_ref()),
            spec.and_then(|t| t.total.as_ref()),
        );
        let request = self.positive_duration(&req_path, req, DEFAULT_REQUEST_TIMEOUT);
        let total = self.positive_duration(&tot_path, tot, DEFAULT_TOTAL_TIMEOUT);
        if request > total {
            self.err(
                req_path,
                format!(
                    "{} exceeds the total deadline {} ({tot_path})",
                    duration::format(request),
                    duration::format(total)
                ),
            );
        }
        TimeoutPolicy { request, total }
    }

    fn retries(
        &mut self,
        base: &str,
        spec: Option<&Retries>,
        route: Option<&Retries>,
    ) -> RetryPolicy {
        let present = spec.is_some() || route.is_some();
        let (p_attempts, attempts) = pick(
            base,
            "retries.maxAttempts",
            route.and_then(|r| r.max_attempts.as_ref()),
            spec.and_then(|r| r.max_attempts.as_ref()),
        );
        let max_attempts = self.count(
            &p_attempts,
            attempts.copied(),
            1,
            10,
            if present { DEFAULT_MAX_ATTEMPTS } else { 1 },
        );

        fn backoff(r: Option<&Retries>) -> Option<&Backoff> {
            r.and_then(|r| r.backoff.as_ref())
        }
        let (p_base, b_base) = pick(
            base,
            "retries.backoff.base",
            backoff(route).and_then(|b| b.base.as_ref()),
            backoff(spec).and_then(|b| b.base.as_ref()),
        );
        let (p_max, b_max) = pick(
            base,
            "retries.backoff.max",
            backoff(route).and_then(|b| b.max.as_ref()),
            backoff(spec).and_then(|b| b.max.as_ref()),
        );
        let backoff_base = self.duration(&p_base, b_base, DEFAULT_BACKOFF_BASE);
        let backoff_max = self.duration(&p_max, b_max, DEFAULT_BACKOFF_MAX);
        if backoff_base > backoff_max {
            self.err(
                p_base,
                format!(
                    "{} exceeds retries.backoff.max {}",
                    duration::format(backoff_base),
                    duration::format(backoff_max)
                ),
            );
        }

        let (p_on, on) = pick(
            base,
            "retries.retryOn",
            route.and_then(|r| r.retry_on.as_ref()),
            spec.and_then(|r| r.retry_on.as_ref()),
        );
        let retry_on = match on {
            Some(list) => self.retry_on(&p_on, list.iter().map(String::as_str)),
            None => self.retry_on(&p_on, DEFAULT_RETRY_ON.into_iter()),
        };

        let respect_retry_after = route
            .and_then(|r| r.respect_retry_after)
            .or(spec.and_then(|r| r.respect_retry_after))
            .unwrap_or(true);

        fn budget(r: Option<&Retries>) -> Option<&crate::v1alpha1::RetryBudget> {
            r.and_then(|r| r.budget.as_ref())
        }
        let (p_pct, pct) = pick(
            base,
            "retries.budget.percent",
            budget(route).and_then(|b| b.percent.as_ref()),
            budget(spec).and_then(|b| b.percent.as_ref()),
        );
        let (p_min, min) = pick(
            base,
            "retries.budget.minPerSecond",
            budget(route).and_then(|b| b.min_per_second.as_ref()),
            budget(spec).and_then(|b| b.min_per_second.as_ref()),
        );
        let budget = BudgetPolicy {
            percent: self.count(&p_pct, pct.copied(), 0, 100, DEFAULT_BUDGET_PERCENT),
            min_per_second: self.count(
                &p_min,
                min.copied(),
                0,
                100_000,
                DEFAULT_BUDGET_MIN_PER_SECOND,
            ),
        };

        fn idem(r: Option<&Retries>) -> Option<&crate::v1alpha1::Idempotency> {
            r.and_then(|r| r.idempotency.as_ref())
        }
        let (p_hdr, hdr) = pick(
            base,
            "retries.idempotency.header",
            idem(route).and_then(|i| i.header.as_ref()),
            idem(spec).and_then(|i| i.header.as_ref()),
        );
        let idempotency_header = self
            .header_name(
                &p_hdr,
                hdr.map(String::as_str)
                    .unwrap_or(DEFAULT_IDEMPOTENCY_HEADER),
            )
            .unwrap_or(HeaderName::from_static(DEFAULT_IDEMPOTENCY_HEADER));
        let generate_idempotency_key = idem(route)
            .and_then(|i| i.generate)
            .or(idem(spec).and_then(|i| i.generate))
            .unwrap_or(false);

        RetryPolicy {
            max_attempts,
            backoff_base,
            backoff_max,
            retry_on,
            respect_retry_after,
            budget,
            idempotency_header,
            generate_idempotency_key,
        }
    }

    fn retry_on<'a>(&mut self, path: &str, items: impl Iterator<Item = &'a str>) -> RetryOn {
        let mut on = RetryOn {
            connect_error: false,
            reset: false,
            timeout: false,
            statuses: Vec::new(),
        };
        for (i, item) in items.enumerate() {
            match item {
                "connect-error" => on.connect_error = true,
                "reset" => on.reset = true,
                "timeout" => on.timeout = true,
                code => match code.parse::<u16>() {
                    Ok(429) => on.statuses.push(429),
                    Ok(c @ 500..=599) => on.statuses.push(c),
                    Ok(c @ 400..=499) => self.err(
                        format!("{path}[{i}]"),
                        format!("{c} is never retried: a 4xx other than 429 means the request itself is wrong"),
                    ),
                    _ => self.err(
                        format!("{path}[{i}]"),
                        format!("{code:?} is not a retry condition (connect-error, reset, timeout, 429 or a 5xx code)"),
                    ),
                },
            }
        }
        on
    }

    fn fallback(
        &mut self,
        base: &str,
        spec: Option<&Fallback>,
        route: Option<&Fallback>,
    ) -> FallbackPolicy {
        let (p_stale, stale) = pick(
            base,
            "fallback.staleIfError",
            route.and_then(|f| f.stale_if_error.as_ref()),
            spec.and_then(|f| f.stale_if_error.as_ref()),
        );
        let stale_if_error = self.opt_duration(&p_stale, stale);
        let (p_resp, resp) = pick(
            base,
            "fallback.response",
            route.and_then(|f| f.response.as_ref()),
            spec.and_then(|f| f.response.as_ref()),
        );
        let response = resp.and_then(|r| {
            let code = r.status.unwrap_or(i32::from(DEFAULT_FALLBACK_STATUS));
            let status = match u16::try_from(code)
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
            {
                Some(s) if (100..=599).contains(&code) => s,
                _ => {
                    self.err(
                        format!("{p_resp}.status"),
                        format!("{code} is not an HTTP status (100 to 599)"),
                    );
                    return None;
                }
            };
            let mut headers = Vec::new();
            for (k, v) in &r.headers {
                let path = format!("{p_resp}.headers[{k}]");
                if let (Some(n), Some(v)) =
                    (self.header_name(&path, k), self.header_value(&path, v))
                {
                    headers.push((n, v));
                }
            }
            Some(StaticResponsePolicy {
                status,
                headers,
                body: r.body.clone().unwrap_or_default(),
            })
        });
        FallbackPolicy {
            stale_if_error,
            response,
        }
    }
}

/// A route's own sections, merged field by field over the integration's.
#[derive(Default)]
struct RouteOverrides<'a> {
    kill_switch: Option<&'a KillSwitch>,
    timeouts: Option<&'a Timeouts>,
    retries: Option<&'a Retries>,
    fallback: Option<&'a Fallback>,
}

/// The route's value if it set one, else the integration's; with the path of the one chosen.
fn pick<'a, T>(
    base: &str,
    field: &str,
    route: Option<&'a T>,
    spec: Option<&'a T>,
) -> (String, Option<&'a T>) {
    match route {
        Some(v) => (format!("{base}.{field}"), Some(v)),
        None => (format!("spec.{field}"), spec),
    }
}

fn merge_kill_switch(spec: Option<&KillSwitch>, route: Option<&KillSwitch>) -> KillSwitchPolicy {
    for k in [spec, route].into_iter().flatten() {
        if k.enabled {
            return KillSwitchPolicy {
                enabled: true,
                reason: k.reason.clone(),
            };
        }
    }
    KillSwitchPolicy::default()
}

/// Serializers for `/config`: header names and values as text, methods as strings.
mod ser {
    use http::{HeaderName, HeaderValue, Method, StatusCode};
    use serde::Serializer;
    use serde::ser::{SerializeMap, SerializeSeq};

    pub fn header_name<S: Serializer>(h: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(h.as_str())
    }

    pub fn opt_header_name<S: Serializer>(h: &Option<HeaderName>, s: S) -> Result<S::Ok, S::Error> {
        match h {
            Some(h) => s.serialize_str(h.as_str()),
            None => s.serialize_none(),
        }
    }

    pub fn header_names<S: Serializer>(hs: &[HeaderName], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(hs.len()))?;
        for h in hs {
            seq.serialize_element(h.as_str())?;
        }
        seq.end()
    }

    pub fn header_pairs<S: Serializer>(
        hs: &[(HeaderName, HeaderValue)],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(hs.len()))?;
        for (k, v) in hs {
            map.serialize_entry(k.as_str(), v.to_str().unwrap_or("<binary>"))?;
        }
        map.end()
    }

    pub fn method<S: Serializer>(m: &Method, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(m.as_str())
    }

    pub fn methods<S: Serializer>(ms: &[Method], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(ms.len()))?;
        for m in ms {
            seq.serialize_element(m.as_str())?;
        }
        seq.end()
    }

    pub fn status<S: Serializer>(c: &StatusCode, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(c.as_u16())
    }
}

/// The certificates of a `caBundle` as DER, each one the TLS verifier accepts as a trust
/// anchor. Errors say what is wrong without echoing the text.
pub fn ca_bundle_certificates(
    pem: &str,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    let mut certs = Vec::new();
    for (i, item) in rustls_pemfile::read_all(&mut pem.as_bytes()).enumerate() {
        match item {
            Ok(rustls_pemfile::Item::X509Certificate(der)) => {
                if let Err(e) = webpki::anchor_from_trusted_cert(&der) {
                    return Err(format!(
                        "certificate {} is not a usable CA certificate: {e}",
                        certs.len() + 1
                    ));
                }
                certs.push(der);
            }
            Ok(
                rustls_pemfile::Item::Pkcs1Key(_)
                | rustls_pemfile::Item::Pkcs8Key(_)
                | rustls_pemfile::Item::Sec1Key(_),
            ) => {
                return Err("holds a private key; only CA certificates belong here".into());
            }
            Ok(_) => return Err(format!("PEM section {} is not a CERTIFICATE", i + 1)),
            Err(e) => return Err(format!("unreadable PEM: {e}")),
        }
    }
    if certs.is_empty() {
        return Err("no PEM CERTIFICATE found".into());
    }
    Ok(certs)
}

/// A Kubernetes object name (RFC 1123 subdomain): what a Secret may be called.
fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A client identity from a `kubernetes.io/tls` Secret's `tls.crt` and `tls.key`: the
/// certificate chain (leaf first) and its private key, as rustls takes them. Errors name the
/// key that is wrong without echoing its text.
pub fn client_identity(
    cert_pem: &str,
    key_pem: &str,
) -> Result<
    (
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    ),
    String,
> {
    let mut chain = Vec::new();
    for item in rustls_pemfile::read_all(&mut cert_pem.as_bytes()) {
        match item {
            Ok(rustls_pemfile::Item::X509Certificate(der)) => {
                if chain.is_empty()
                    && let Err(e) = webpki::EndEntityCert::try_from(&der)
                {
                    return Err(format!("tls.crt: the first certificate is unreadable: {e}"));
                }
                chain.push(der);
            }
            Ok(
                rustls_pemfile::Item::Pkcs1Key(_)
                | rustls_pemfile::Item::Pkcs8Key(_)
                | rustls_pemfile::Item::Sec1Key(_),
            ) => return Err("tls.crt holds a private key; it belongs in tls.key".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("tls.crt: unreadable PEM: {e}")),
        }
    }
    if chain.is_empty() {
        return Err("tls.crt: no PEM CERTIFICATE found".into());
    }
    let key = match rustls_pemfile::private_key(&mut key_pem.as_bytes()) {
        Ok(Some(key)) => key,
        Ok(None) => return Err("tls.key: no PEM private key found".into()),
        Err(e) => return Err(format!("tls.key: unreadable PEM: {e}")),
    };
    Ok((chain, key))
}
