//! `PartnerIntegration` v1alpha1: the resource users write.
//!
//! Every field of the public contract lives here. The schema the API server enforces is
//! generated from these types (`cargo run -p tollgate-crds --bin crdgen`); rules a schema can
//! express (patterns, ranges, CEL) are declared on the fields, and everything else is checked by
//! [`crate::policy::compile`], which operator and sidecar share.

// Each printcolumn repeats `type_ = "string"`; clippy reads that as a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Go/Kubernetes duration, e.g. `250ms`, `3s`, `1m30s`, `1h`. Negative values are not allowed.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";
/// The longest duration string the schema accepts (keeps CEL cost estimates bounded).
pub const DURATION_MAX_LEN: u32 = 32;

/// Desired state of one partner API integration.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "tollgate.dev",
    version = "v1alpha1",
    kind = "PartnerIntegration",
    plural = "partnerintegrations",
    singular = "partnerintegration",
    shortname = "pi",
    shortname = "pis",
    namespaced,
    status = "PartnerIntegrationStatus",
    derive = "PartialEq",
    doc = "A partner API that Tollgate governs: quotas, timeouts, retries, circuit breaking, kill switch, fallbacks, version pins, credentials and the SLA to watch.",
    printcolumn(
        name = "READY",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Ready")].status"#
    ),
    printcolumn(
        name = "KILL",
        type_ = "boolean",
        json_path = ".spec.killSwitch.enabled"
    ),
    printcolumn(name = "CIRCUIT", type_ = "string", json_path = ".status.circuit"),
    printcolumn(
        name = "RPM",
        type_ = "integer",
        json_path = ".status.traffic.requestsPerMinute"
    ),
    printcolumn(
        name = "ERR%",
        type_ = "number",
        json_path = ".status.traffic.errorRatePercent"
    ),
    printcolumn(
        name = "REFUSED",
        type_ = "integer",
        json_path = ".status.traffic.refusedPerMinute"
    ),
    printcolumn(
        name = "P95",
        type_ = "string",
        json_path = ".status.traffic.latencyP95"
    ),
    printcolumn(
        name = "AGE",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PartnerIntegrationSpec {
    /// Which pods' sidecars receive this integration. Absent: every injected pod in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
    /// Where the sidecar sends traffic and which hosts it recognises as this partner.
    pub upstream: Upstream,
    /// Stops all traffic to the partner at once. Absent: off.
    // Defaulted by the API server to `{enabled: false}`, so the KILL column reads `false`
    // rather than blank for an integration whose switch was never touched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = {}))]
    pub kill_switch: Option<KillSwitch>,
    /// Per-attempt and whole-call deadlines. Always in force (defaults 10s and 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Safe retries. Absent: no retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// The partner's quota (every call to the partner counts). Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Most calls in flight to the partner at once, from this pod. Absent: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
    /// Stops calling a failing partner for a while. Absent: no breaker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// What the app gets when the partner fails or the kill switch is on. Absent: the error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
    /// API-version pins and denied (deprecated) path prefixes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versioning: Option<Versioning>,
    /// The credential the sidecar injects; the app never holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,
    /// Per-endpoint overrides; the first match wins; unmatched requests use the defaults above.
    /// Route names are unique (the API server enforces it: the list is keyed by name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub routes: Vec<Route>,
    /// The service level to watch; a miss sets condition `SLABreached`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla: Option<Sla>,
    /// What telemetry must never contain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<Telemetry>,
    /// What a successful answer of the partner looks like, beyond its status. Absent: any 2xx
    /// is a success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contract: Option<Contract>,
}

/// Checks on the partner's answers. A 2xx that breaks the contract counts as a failure for
/// the breaker, the status's error rate and SLA, and
/// `tollgate_contract_violations_total`; the app still gets the partner's answer unchanged.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.success) || has(self.schema) || (has(self.enums) && size(self.enums) > 0)").message("contract: give success, schema or enums"))]
pub struct Contract {
    /// A field of the JSON body that must hold a value on every 2xx answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success: Option<SuccessRule>,
    /// A JSON Schema every checked 2xx body must match: a body that does not (or is not JSON)
    /// is a failure, counted with `kind="schema"`. At least one of `success`, `schema` and
    /// `enums` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<ContractSchema>,
    /// Fields of checked 2xx bodies that take known values: a value not listed is counted
    /// (`kind="unknown-enum"`), not a failure. A field that is absent is not counted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub enums: Vec<EnumField>,
    /// Share of 2xx answers checked, a decimal above 0 and at most 1, e.g. `"0.1"`. Default
    /// `"1"`: every answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?$"), length(max = 16))]
    pub sample_rate: Option<String>,
    /// Largest body checked, bytes (default 65536, at most 1048576). A longer or compressed
    /// body is not checked, and counted with `kind="unchecked"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_body_bytes: Option<i64>,
}

/// Where a contract's JSON Schema comes from: a key of a ConfigMap of the integration's
/// namespace labelled `tollgate.dev/contract-schema: "true"` (the operator reads it and
/// distributes its text), or the schema inline. Exactly one of the two.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.inline) || (has(self.configMapName) && has(self.key))").message("contract.schema: give configMapName and key, or inline"))]
pub struct ContractSchema {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub config_map_name: Option<String>,
    /// The ConfigMap's key holding the schema (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub key: Option<String>,
    /// The schema itself, JSON text (at most 65536 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub inline: Option<String>,
}

/// A field (`jsonPath`, as in [`SuccessRule`]) and the values it is known to take, written as
/// `equals` is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnumField {
    #[schemars(length(min = 1, max = 256))]
    pub json_path: String,
    #[schemars(length(min = 1, max = 64), inner(length(max = 256)))]
    pub values: Vec<String>,
}

/// `jsonPath` names one value of the JSON body; the answer succeeds when it `equals` the given
/// text (a JSON string equal to it, or a number, `true`, `false` or `null` written so).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SuccessRule {
    /// `$` followed by `.field` and `[index]` steps, e.g. `$.status` or `$.data[0].state`.
    #[schemars(length(min = 1, max = 256))]
    pub json_path: String,
    #[schemars(length(max = 256))]
    pub equals: String,
}

/// Selects pods by label, as a Deployment's selector does.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Every label listed must be present on the pod with this value.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// The partner's address.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Upstream {
    /// Base URL the sidecar sends traffic to, `https://` or `http://`.
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("spec.upstream.url: scheme must be http or https"))]
    #[schemars(length(min = 8, max = 2048))]
    pub url: String,
    /// Host names (optionally `name:port`) the sidecar recognises as this partner, from the
    /// request's `Host`, absolute URL or `CONNECT` target. Default: the url's host (and port).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 261)))]
    pub hosts: Vec<String>,
    /// TCP + TLS connect deadline. Default 3s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"),
        length(max = 32)
    )]
    pub connect_timeout: Option<String>,
    /// Terminate the app's TLS to these hosts (`CONNECT` tunnels and redirected port-443
    /// connections) with a leaf from the pod's own CA, so every policy applies to HTTPS calls
    /// too. Default: true when `url` is `https://`. `false`: such TLS is spliced and gets only
    /// the connection-level policies (kill switch, connect timeout, tunnel limit); use it for a
    /// partner that pins its certificate or asks the app for a client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interception: Option<bool>,
    /// PEM certificates of the CA(s) that sign this partner's certificate, trusted for this
    /// integration only, besides the system's roots and the sidecar's `--ca-bundle`. For a
    /// partner with a private CA. Certificates only: a private key here is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub ca_bundle: Option<String>,
    /// A client certificate the sidecar presents when it originates TLS to this partner
    /// (mutual TLS). The app no longer holds that key: the sidecar does, in memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<ClientCertificate>,
}

/// A `kubernetes.io/tls` Secret in the integration's namespace: `tls.crt` (the certificate,
/// then its chain) and `tls.key` (its private key). Like a credential, it must opt in with
/// the label `tollgate.dev/credential=true`, and may name the hosts it may be sent to with
/// `tollgate.dev/credential-hosts`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientCertificate {
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

/// The kill switch: while enabled, nothing reaches the partner.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KillSwitch {
    /// Stop all traffic to the partner (or to the route).
    #[serde(default)]
    pub enabled: bool,
    /// Why; shown in the sidecar's answers, events and status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
}

/// Deadlines.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.request) || !has(self.total) || duration(self.request) <= duration(self.total)").message("timeouts.request must not exceed timeouts.total"))]
pub struct Timeouts {
    /// One attempt, from sending the request to the end of the response headers. Default 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"),
        length(max = 32)
    )]
    pub request: Option<String>,
    /// The whole call: queueing, every attempt and backoff, in clock time. Default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"),
        length(max = 32)
    )]
    pub total: Option<String>,
}

/// Which failures are retried, how often and how fast.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Attempts in all; 1 means no retry. Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: Option<i32>,
    /// Exponential backoff with full jitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Failures that may be retried: `connect-error`, `reset`, `timeout`, or a status code
    /// (`429` or 5xx; other 4xx are never retried). Default: all of
    /// `connect-error, reset, timeout, 429, 502, 503, 504`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), inner(length(max = 16)))]
    #[x_kube(validation = Rule::new("self.all(x, x == 'connect-error' || x == 'reset' || x == 'timeout' || x == '429' || x.matches('^5[0-9][0-9]$'))").message("retries.retryOn: allowed are connect-error, reset, timeout, 429 and 5xx codes"))]
    pub retry_on: Option<Vec<String>>,
    /// Wait as long as the partner's `Retry-After` asks, within the total deadline. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub respect_retry_after: Option<bool>,
    /// Retries may add at most this share of traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
    /// When a non-idempotent method may be retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<Idempotency>,
}

/// Exponential backoff bounds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.base) || !has(self.max) || duration(self.base) <= duration(self.max)").message("retries.backoff.base must not exceed retries.backoff.max"))]
pub struct Backoff {
    /// First backoff ceiling. Default 100ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"),
        length(max = 32)
    )]
    pub base: Option<String>,
    /// Largest backoff. Default 2s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"),
        length(max = 32)
    )]
    pub max: Option<String>,
}

/// Retry budget: retries are allowed while they stay under `percent` of recent requests, with a
/// floor of `minPerSecond`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: Option<i32>,
    /// Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub min_per_second: Option<i32>,
}

/// Idempotency keys for non-idempotent methods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Idempotency {
    /// A POST/PATCH is retried only when it carries this header. Default `Idempotency-Key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub header: Option<String>,
    /// Add a fresh key to POST/PATCH requests without one, before the first attempt; every
    /// retry reuses it. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<bool>,
}

/// Who shares a quota.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RateLimitScope {
    /// Shared by all sidecars of this integration (the operator divides it among them).
    #[default]
    Global,
    /// Each pod has the whole quota to itself.
    PerPod,
}

/// What happens to a request over the limit.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OnLimit {
    /// Answer 429 at once, with `Retry-After`.
    #[default]
    Reject,
    /// Wait (first come, first served) up to `maxQueueWait`, then 429.
    Queue,
}

/// A quota made of one or more bands; every band must admit a request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// `global` (default) or `perPod`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<RateLimitScope>,
    /// `reject` (default) or `queue`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_limit: Option<OnLimit>,
    /// With `onLimit: queue`, the longest a request waits for a token. Default 2s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"),
        length(max = 32)
    )]
    pub max_queue_wait: Option<String>,
    /// Request header whose value selects a separate set of buckets (regional quotas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub partition_by: Option<String>,
    /// More request headers whose values, with the `partitionBy` header's, make the partition
    /// key: each combination (tenant and region, say) gets buckets of its own; a missing
    /// header is a value of its own. At most 3; needs `partitionBy`. Overrides still match
    /// the `partitionBy` value alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3), inner(length(min = 1, max = 256)), extend("x-kubernetes-list-type" = "set"))]
    pub partition_also_by: Vec<String>,
    /// The address of the app's connection joins the partition key (alone, or after the
    /// headers): each client host gets buckets of its own. For a sidecar shared by several
    /// hosts (standalone on a gateway); in a pod every call comes from the pod itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_by_client_address: Option<bool>,
    /// Other bands for chosen values of the `partitionBy` header (region `eu` gets 100/s, `us`
    /// 200/s): each listed value gets buckets of its own with these bands instead. At most 16.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub overrides: Vec<PartitionOverride>,
    /// Lower the rate when the partner throttles (429, or a rate-limit header saying nothing
    /// remains) and climb back while it is quiet. Absent: the configured rate always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<Adaptive>,
    /// The bands (burst AND sustained); at least one; names unique (the list is keyed by name).
    #[schemars(length(min = 1, max = 8), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub limits: Vec<LimitBand>,
}

/// A cap on calls in flight at once: a call holds its place from admission until its answer's
/// body ends (retries included), so a slow partner cannot pile up the app's requests.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Concurrency {
    /// Calls in flight at once. At least 1.
    #[schemars(range(min = 1, max = 100000))]
    pub max_in_flight: i64,
    /// `reject` (default): 429 at once when every place is taken; `queue`: wait in line first
    /// come first served, up to `maxQueueWait` and never past the call's total deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_limit: Option<OnLimit>,
    /// With `onLimit: queue`, the longest a request waits for a place. Default 2s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"),
        length(max = 32)
    )]
    pub max_queue_wait: Option<String>,
    /// With `onLimit: queue`, the most requests waiting at once; one more is refused at once.
    /// Default: `maxInFlight`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_queue_depth: Option<i64>,
    /// With `onLimit: queue`, the request header that names a call's priority class: `high`
    /// goes before `normal` (the default, also for a missing or unknown value), which goes
    /// before `low`; first come first served within a class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub priority_header: Option<String>,
}

/// Bands for some values of the partition header.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionOverride {
    /// Values of the `partitionBy` header (exact, case-sensitive), at least one, at most 16.
    #[schemars(length(min = 1, max = 16))]
    pub values: Vec<String>,
    /// The bands these values get, in place of `limits`.
    #[schemars(length(min = 1, max = 8))]
    pub limits: Vec<LimitBand>,
}

/// AIMD on the partner's signals: each throttle episode halves the rate in force, down to
/// `minPercent` of the configured rate; after a quiet second it climbs back linearly.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Adaptive {
    /// The lowest rate, in percent of the configured one. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub min_percent: Option<i64>,
    /// How long the climb from `minPercent` back to the full rate takes. Default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"),
        length(max = 32)
    )]
    pub recovery: Option<String>,
}

/// `requests` per `per`: a token bucket that refills continuously.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitBand {
    /// Names the band in metrics and answers.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Requests allowed per period (also the burst size). At least 1.
    #[schemars(range(min = 1))]
    pub requests: i64,
    /// The period.
    #[schemars(
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"),
        length(max = 32)
    )]
    pub per: String,
}

/// Circuit breaker thresholds. Either trigger opens it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// Rolling window for the failure rate. Default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"),
        length(max = 32)
    )]
    pub window: Option<String>,
    /// Calls in the window before the rate counts. Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub minimum_requests: Option<i32>,
    /// Failures (5xx, timeouts, connect errors, resets; not 4xx) per 100 calls. Default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_rate_percent: Option<i32>,
    /// Failures in a row. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub consecutive_failures: Option<i32>,
    /// A call slower than this counts as a failure. Default: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"),
        length(max = 32)
    )]
    pub slow_call_duration: Option<String>,
    /// How long it stays open before half-open. Default 15s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"),
        length(max = 32)
    )]
    pub open_duration: Option<String>,
    /// Probes let through while half-open; all succeed -> closed. Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub half_open_probes: Option<i32>,
}

/// Degraded answers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Fallback {
    /// GET: serve the last good response up to this age when the partner fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"),
        length(max = 32)
    )]
    pub stale_if_error: Option<String>,
    /// Else this static response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<StaticResponse>,
}

/// A fixed response.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StaticResponse {
    /// HTTP status. Default 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 599))]
    pub status: Option<i32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub body: Option<String>,
}

/// API version control.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Versioning {
    /// Set (overwriting what the app sent) on every outbound request.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pin_headers: BTreeMap<String, String>,
    /// Requests under these path prefixes get 410 Gone and never reach the partner.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 1024)))]
    pub denied_path_prefixes: Vec<String>,
}

/// The credential to inject: a static key (`secretRef`) or OAuth2 client credentials
/// (`oauth2`), exactly one of them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.secretRef) != has(self.oauth2)").message("credentials: give exactly one of secretRef and oauth2"))]
#[x_kube(validation = Rule::new("!has(self.oauth2) || !has(self.secondaryRef)").message("credentials.secondaryRef: not with oauth2 (tokens rotate themselves)"))]
pub struct Credentials {
    /// The Secret (same namespace) and key holding the credential.
    #[serde(default, skip_serializing_if = "SecretKeyRef::is_unset")]
    pub secret_ref: SecretKeyRef,
    /// A second key, for a rotation window: the primary (`secretRef`) is sent first; a call
    /// the partner answers 401 is sent once more with this one when its body can be resent.
    /// Same rules as `secretRef` (same namespace, the Secret opted in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_ref: Option<SecretKeyRef>,
    /// Header to set, over whatever the app sent. Default `Authorization`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub header: Option<String>,
    /// Header value; `{value}` is replaced by the secret. Default `{value}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("self.contains('{value}')").message("credentials.format must contain {value}"))]
    pub format: Option<String>,
    /// Send the credential over an `http://` upstream that is not a loopback address. Without
    /// it such a spec is refused: the credential would cross the network in cleartext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_insecure: Option<bool>,
    /// OAuth 2.0 client credentials (RFC 6749 section 4.4): the sidecar fetches an access
    /// token, caches it, refreshes it before it expires and sends it as `format` in `header`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2>,
    /// A start-up check: when a revision with a new credential is applied, each sidecar sends
    /// this request through its policy stack and reports whether the partner answered
    /// `expectStatus`; the status shows condition `CredentialVerified`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<CredentialCheck>,
}

/// A request that shows whether the partner accepts the credential.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialCheck {
    /// Default `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub method: Option<String>,
    /// e.g. `/v1/account`.
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
    /// Default 200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 599))]
    pub expect_status: Option<u16>,
}

/// An OAuth 2.0 client-credentials grant.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OAuth2 {
    /// The token endpoint: `https://`, or `http://` to a loopback host (or any host with
    /// `credentials.allowInsecure`).
    #[schemars(length(min = 1, max = 2048))]
    pub token_url: String,
    /// The Secret key holding the client id (same rules as `secretRef`).
    pub client_id_ref: SecretKeyRef,
    /// The Secret key holding the client secret (same rules as `secretRef`).
    pub client_secret_ref: SecretKeyRef,
    /// Sent as `scope`, space-separated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub scopes: Vec<String>,
    /// Sent as `audience` when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub audience: Option<String>,
    /// How the client authenticates to the token endpoint: `basic` (HTTP Basic, the default)
    /// or `body` (`client_id` and `client_secret` in the form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_method: Option<OAuth2AuthMethod>,
    /// How long before expiry a token is refreshed. Default: 5m or 10% of the token's
    /// lifetime, whichever is shorter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"),
        length(max = 32)
    )]
    pub refresh_before: Option<String>,
}

/// Client authentication at the token endpoint (RFC 6749 section 2.3.1).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OAuth2AuthMethod {
    /// `Authorization: Basic` with the form-encoded id and secret.
    #[default]
    Basic,
    /// `client_id` and `client_secret` in the request body.
    Body,
}

impl Credentials {
    /// Every Secret key the credentials read.
    pub fn secret_refs(&self) -> Vec<&SecretKeyRef> {
        let mut out = Vec::new();
        if !self.secret_ref.is_unset() {
            out.push(&self.secret_ref);
        }
        out.extend(self.secondary_ref.as_ref());
        if let Some(o) = &self.oauth2 {
            out.push(&o.client_id_ref);
            out.push(&o.client_secret_ref);
        }
        out
    }
}

impl SecretKeyRef {
    /// Neither name nor key given.
    pub fn is_unset(&self) -> bool {
        self.name.is_empty() && self.key.is_empty()
    }
}

/// A key of a Secret in the integration's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A per-endpoint override.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Names the route in metrics, spans, answers and status.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Which requests the route takes.
    #[serde(default)]
    pub r#match: RouteMatch,
    /// The route's own bands, enforced in addition to the integration's quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// The route's own cap on calls in flight, in addition to the integration's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
    /// Field by field over the integration's timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Field by field over the integration's retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// The route gets a breaker of its own (fields default to the integration's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Field by field over the integration's fallback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
    /// Stops this route alone (the integration's kill switch stops every route).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_switch: Option<KillSwitch>,
    /// The route's own contract, in place of the integration's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contract: Option<Contract>,
}

/// Request matching; every given criterion must hold.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// Path prefix, segment-aware: `/v1/tracking` matches `/v1/tracking` and
    /// `/v1/tracking/123`, not `/v1/trackings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub path_prefix: Option<String>,
    /// HTTP methods (upper case). Empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 32)))]
    pub methods: Vec<String>,
}

/// The service level to watch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sla {
    /// Share of successful calls, e.g. `"99.9"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,3}(\.[0-9]+)?$"), length(max = 16))]
    pub availability_percent: Option<String>,
    /// 95th percentile latency of calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"),
        length(max = 32)
    )]
    pub latency_p95: Option<String>,
}

/// Telemetry hygiene.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Telemetry {
    /// Headers whose values never appear in logs, spans or `/config` (the credential header
    /// is always redacted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256)))]
    pub redact_headers: Vec<String>,
    /// Print one JSON line per partner call on the sidecar's stdout: integration, route,
    /// method, path (without the query), status, attempts, duration_ms, outcome, trace_id.
    /// Never headers or bodies.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub access_log: bool,
}

/// Observed state, written by the operator from what the sidecars report.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartnerIntegrationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The revision sidecars report they run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_revision: Option<String>,
    /// Ready, Invalid, KillSwitchActive, CircuitOpen, SLABreached, Deprecated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Summary of breaker states across sidecars: `closed`, `half-open` or `open`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecars: Option<SidecarSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<TrafficSummary>,
}

/// One condition, keyed by `type`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// One of the `condition::*` constants.
    pub r#type: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One of the `reason::*` constants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// RFC 3339 time of the last change of `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Sidecars that should run this integration, and what they report.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSummary {
    pub desired: i32,
    pub up_to_date: i32,
    pub breaker_open: i32,
}

/// Traffic over the status window, summed over sidecars.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficSummary {
    /// Every call the apps made, per minute.
    pub requests_per_minute: i64,
    /// Failed share of the calls that reached (or failed to reach) the partner, percent: its
    /// 5xx, timeouts, unreachable. The sidecar's own answers (kill switch, circuit open,
    /// deprecated version, rate limited) are not counted, neither as calls nor as errors.
    pub error_rate_percent: f64,
    /// e.g. `120ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p95: Option<String>,
    pub rate_limited_per_minute: i64,
    /// Calls per minute the sidecar answered itself without calling the partner, other than
    /// rate limited: kill switch, circuit open, deprecated version, bad request.
    #[serde(default)]
    pub refused_per_minute: i64,
}

/// Condition types.
pub mod condition {
    pub const READY: &str = "Ready";
    pub const INVALID: &str = "Invalid";
    pub const KILL_SWITCH_ACTIVE: &str = "KillSwitchActive";
    pub const CIRCUIT_OPEN: &str = "CircuitOpen";
    pub const SLA_BREACHED: &str = "SLABreached";
    /// The partner announces, in its responses' `Deprecation` or `Sunset` headers, that a
    /// route is deprecated or will stop answering; the message names the routes and dates.
    pub const DEPRECATED: &str = "Deprecated";
    /// Sidecars report checked partner answers that break a route's `contract` in the status
    /// window; the message names the routes with counts per kind. Present when some route has
    /// a `contract`.
    pub const CONTRACT_VIOLATED: &str = "ContractViolated";
    /// With `credentials.secondaryRef`: true while sidecars report calls in the status window
    /// that the partner accepted only with the secondary key; the message says when it was
    /// last used. False: the secondary key served no call in the window (it can be revoked
    /// once the rotation is over).
    pub const SECONDARY_KEY_IN_USE: &str = "SecondaryKeyInUse";
    /// With `credentials.oauth2`: true while sidecars report failed token fetches in the
    /// status window (calls use the old token until it expires, then are answered
    /// `credential-unavailable`).
    pub const CREDENTIAL_REFRESH_FAILING: &str = "CredentialRefreshFailing";
    /// With `credentials.verify`: the start-up check's result as sidecars report it (True:
    /// the partner answered the expected status; False: it did not, the message says what
    /// came back; Unknown: no sidecar has run it yet).
    pub const CREDENTIAL_VERIFIED: &str = "CredentialVerified";
    /// With `rateLimit.adaptive` (the integration's or a route's): true while some sidecar
    /// runs a quota below its configured rate because the partner throttled (429s or
    /// rate-limit headers saying nothing remains); the message gives the lowest rate in force,
    /// percent of the configured one.
    pub const PARTNER_THROTTLING: &str = "PartnerThrottling";
}

/// Condition reasons.
pub mod reason {
    /// Compiled and distributed.
    pub const COMPILED: &str = "Compiled";
    /// The spec failed validation; the message names the field.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// A referenced Secret or key is missing; the previous credential stays in force.
    pub const SECRET_MISSING: &str = "SecretMissing";
    /// The spec is valid.
    pub const VALID: &str = "Valid";
    /// Another integration of the namespace, created earlier, claims one of the hosts; the
    /// message names it. This one is not distributed.
    pub const HOST_CONFLICT: &str = "HostConflict";
    /// `spec.credentials.secretRef` names a Secret that is not labelled
    /// `tollgate.dev/credential: "true"` (or does not exist); the message says how to opt in.
    pub const SECRET_NOT_OPTED_IN: &str = "SecretNotOptedIn";
    /// A contract schema's ConfigMap does not exist, is not labelled
    /// `tollgate.dev/contract-schema: "true"`, or lacks the key; the message names the field.
    pub const SCHEMA_UNAVAILABLE: &str = "SchemaUnavailable";
    /// The Secret's `tollgate.dev/credential-hosts` annotation does not list the upstream host.
    pub const CREDENTIAL_HOST_NOT_ALLOWED: &str = "CredentialHostNotAllowed";
    pub const KILL_SWITCH_ENABLED: &str = "KillSwitchEnabled";
    pub const KILL_SWITCH_DISABLED: &str = "KillSwitchDisabled";
    pub const BREAKER_OPEN: &str = "BreakerOpen";
    pub const BREAKER_CLOSED: &str = "BreakerClosed";
    pub const AVAILABILITY_BELOW_TARGET: &str = "AvailabilityBelowTarget";
    pub const LATENCY_ABOVE_TARGET: &str = "LatencyAboveTarget";
    pub const WITHIN_TARGET: &str = "WithinTarget";
    pub const NO_TRAFFIC: &str = "NoTraffic";
    /// The partner sent `Deprecation` (and no `Sunset`) on some route.
    pub const DEPRECATION_ANNOUNCED: &str = "DeprecationAnnounced";
    /// The partner sent `Sunset` on some route: it stops answering at the date in the message.
    pub const SUNSET_ANNOUNCED: &str = "SunsetAnnounced";
    /// No sidecar reports a `Deprecation` or `Sunset` from the partner.
    pub const NOT_DEPRECATED: &str = "NotDeprecated";
    /// 2xx answers whose body breaks `contract.success` (partner failures).
    pub const SUCCESS_RULE_BROKEN: &str = "SuccessRuleBroken";
    /// Answers whose body does not match `contract.schema` (partner failures).
    pub const SCHEMA_MISMATCH: &str = "SchemaMismatch";
    /// Answers carrying values `contract.enums` does not list (counted, not failures).
    pub const UNKNOWN_ENUM_VALUES: &str = "UnknownEnumValues";
    /// No sidecar reports a contract violation in the status window.
    pub const CONTRACT_KEPT: &str = "ContractKept";
    /// Some calls of the status window were accepted only with the secondary key.
    pub const SECONDARY_KEY_SERVING: &str = "SecondaryKeyServing";
    /// The partner accepted the primary key for every call of the status window.
    pub const PRIMARY_KEY_SERVING: &str = "PrimaryKeyServing";
    /// Token fetches failed in the status window.
    pub const TOKEN_ENDPOINT_FAILING: &str = "TokenEndpointFailing";
    /// No token fetch failed in the status window.
    pub const TOKENS_REFRESHED: &str = "TokensRefreshed";
    /// The start-up check got the expected status.
    pub const CHECK_PASSED: &str = "CheckPassed";
    /// `PartnerThrottling` true: the rate in force is below the configured rate.
    pub const RATE_LOWERED: &str = "RateLowered";
    /// `PartnerThrottling` false: every reporting sidecar runs the configured rate.
    pub const RATE_AS_CONFIGURED: &str = "RateAsConfigured";
    /// The start-up check got another status, or the sidecar answered it itself.
    pub const CHECK_FAILED: &str = "CheckFailed";
    /// No sidecar has reported the start-up check yet.
    pub const NOT_YET_CHECKED: &str = "NotYetChecked";
}
