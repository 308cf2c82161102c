//! The sidecar's metrics, named as api.md section 4 binds them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, OnceLock, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use tollgate_crds::distribution::CONTRACT_VIOLATION_KINDS;

use crate::config::Revision;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub integration: String,
    pub route: String,
    /// `success`, `partner-error` (the partner's own 4xx/5xx), `contract-violation` (a 2xx
    /// whose body breaks the route's `contract`), `fallback-stale`, `fallback-static`, or the
    /// reason the sidecar answered (`kill-switch`, `rate-limited`, ...).
    pub outcome: String,
    pub code: String,
    /// What the call says about the partner ([`CallResult`]): `ok`, `failure` or `refused`.
    pub result: String,
}

/// The `result` label of `tollgate_requests_total` and `tollgate_request_duration_seconds`:
/// whose doing the call's end was, so the partner's error rate and latency read only calls that
/// reached (or failed to reach) it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallResult {
    /// The partner answered, and not with a failure (its 4xx included: they are the app's).
    Ok,
    /// The partner failed: its 5xx, a timeout, unreachable, a 2xx that breaks the route's
    /// contract; a fallback served in its stead counts as the failure it stood in for.
    Failure,
    /// The sidecar answered without calling the partner: kill switch, quota, breaker open,
    /// deprecated version, bad request, unknown host (or a fallback in their stead).
    Refused,
}

impl CallResult {
    pub const ALL: [CallResult; 3] = [CallResult::Ok, CallResult::Failure, CallResult::Refused];

    pub fn as_str(self) -> &'static str {
        match self {
            CallResult::Ok => "ok",
            CallResult::Failure => "failure",
            CallResult::Refused => "refused",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Labels of `tollgate_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub integration: String,
    pub route: String,
    /// As in [`CallLabels::result`].
    pub result: String,
}

/// A concurrency cap: the integration's (`scope="integration"`) or a route's own
/// (`scope="route"`), by the route of the call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapLabels {
    pub integration: String,
    pub route: String,
    pub scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapRefusedLabels {
    pub integration: String,
    pub route: String,
    pub scope: String,
    /// `full`, `queue-full` or `queue-timeout`.
    pub cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub integration: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BandLabels {
    pub integration: String,
    pub route: String,
    pub band: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub integration: String,
    /// The route of the call.
    pub route: String,
    /// `route` (the route's own quota) or `integration` (the account quota).
    pub quota: String,
    /// `admitted` (a token at once), `queued` (admitted after waiting for one) or `denied`.
    pub decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub integration: String,
    /// The route whose own quota this is, or `*` for the integration's quota.
    pub route: String,
    /// `route` or `integration`.
    pub quota: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkipLabels {
    pub integration: String,
    pub route: String,
    /// `budget` (retry budget exhausted), `rate-limited` (no quota token for the retry) or
    /// `deadline` (the backoff would end past `timeouts.total`).
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ContractLabels {
    pub integration: String,
    pub route: String,
    /// `success-rule` (a 2xx whose body breaks `contract.success`), `schema` (one that does not
    /// match `contract.schema`), `unknown-enum` (a field of
    /// `contract.enums` with a value not listed) or `unchecked` (a sampled 2xx whose body was
    /// longer than `contract.maxBodyBytes`, or compressed).
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RevisionLabels {
    pub revision: String,
    pub source: String,
}

/// `key`: `primary` or `secondary` (never a value).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialKeyLabels {
    pub integration: String,
    pub key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IntegrationLabels {
    pub integration: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelLabels {
    pub integration: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InterceptLabels {
    /// What the first bytes were: `http`, `tls`, `opaque`, or `none` (not classified: not
    /// redirected, silent past the head timeout, or failed first).
    pub protocol: String,
    /// What the transparent listener did: `proxy` (served as on `--listen`, at L7), `tunnel` (a
    /// partner's TLS at L4, detailed in `tollgate_tunnels_total`), `splice` (to the original
    /// destination, untouched), `denied` (`--unknown-hosts deny`) or `closed`.
    pub outcome: String,
}

/// Contract violations by (route, kind).
pub type ContractTotals = BTreeMap<(String, String), u64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuotaLabels {
    pub integration: String,
    pub route: String,
    /// `route` or `integration`.
    pub quota: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuotaBandLabels {
    pub integration: String,
    pub route: String,
    pub quota: String,
    pub band: String,
}

/// Adaptive quotas (`rateLimit.adaptive`).
pub struct AdaptiveMetrics {
    pub throttle_signals: Family<QuotaLabels, Counter>,
    pub effective_rate: Family<QuotaBandLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

impl AdaptiveMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = AdaptiveMetrics {
            throttle_signals: Family::default(),
            effective_rate: Family::default(),
        };
        registry.register(
            "tollgate_rate_limit_throttle_signals",
            "Partner answers that said to slow down (429, or a rate-limit header with nothing remaining) for an adaptive quota",
            m.throttle_signals.clone(),
        );
        registry.register(
            "tollgate_rate_limit_effective_rate",
            "Requests per second an adaptive quota's band allows this sidecar now (its share, lowered by the partner's throttling)",
            m.effective_rate.clone(),
        );
        m
    }
}

/// The concurrency caps' gauges and refusals (`spec.concurrency`).
pub struct CapMetrics {
    pub in_flight: Family<CapLabels, Gauge>,
    pub limit: Family<CapLabels, Gauge>,
    pub waiting: Family<CapLabels, Gauge>,
    pub queue_capacity: Family<CapLabels, Gauge>,
    pub refused: Family<CapRefusedLabels, Counter>,
    pub queue_wait: Family<CapLabels, Histogram>,
}

fn queue_wait_histogram() -> Histogram {
    Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0])
}

impl CapMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = CapMetrics {
            in_flight: Family::default(),
            limit: Family::default(),
            waiting: Family::default(),
            queue_capacity: Family::default(),
            refused: Family::default(),
            queue_wait: Family::new_with_constructor(queue_wait_histogram as fn() -> Histogram),
        };
        registry.register(
            "tollgate_concurrency_queue_wait_seconds",
            "How long calls that waited in a concurrency cap's line waited before their place",
            m.queue_wait.clone(),
        );
        registry.register(
            "tollgate_concurrency_in_flight",
            "Calls holding a place under a concurrency cap now (spec.concurrency, or the route's own)",
            m.in_flight.clone(),
        );
        registry.register(
            "tollgate_concurrency_limit",
            "maxInFlight of the concurrency cap",
            m.limit.clone(),
        );
        registry.register(
            "tollgate_concurrency_waiting",
            "Calls waiting in line for a place (onLimit: queue); alert on waiting / queue_capacity",
            m.waiting.clone(),
        );
        registry.register(
            "tollgate_concurrency_queue_capacity",
            "maxQueueDepth of the concurrency cap (0 with onLimit: reject)",
            m.queue_capacity.clone(),
        );
        registry.register(
            "tollgate_concurrency_refused",
            "Calls answered 429 concurrency-limited, by cause: full (reject), queue-full, queue-timeout",
            m.refused.clone(),
        );
        m
    }
}

pub struct Metrics {
    registry: Registry,
    pub caps: CapMetrics,
    pub adaptive: AdaptiveMetrics,
    pub requests: Family<CallLabels, Counter>,
    pub duration: Family<DurationLabels, Histogram>,
    pub rate_limited: Family<BandLabels, Counter>,
    pub retries: Family<RouteLabels, Counter>,
    pub retries_skipped: Family<SkipLabels, Counter>,
    pub rate_limit_decisions: Family<DecisionLabels, Counter>,
    pub partition_overflow: Family<RouteLabels, Counter>,
    pub partitions: Family<PartitionLabels, Gauge>,
    pub circuit_state: Family<RouteLabels, Gauge>,
    pub kill_switch: Family<RouteLabels, Gauge>,
    pub revision_info: Family<RevisionLabels, Gauge>,
    pub config_errors: Counter,
    pub config_refused: Family<IntegrationLabels, Gauge>,
    pub tunnels: Family<TunnelLabels, Counter>,
    pub open_connections: Gauge,
    /// Tasks alive in the runtime (connections, calls, background work), read at each scrape.
    pub runtime_tasks: Gauge,
    pub rejected_connections: Counter,
    pub intercepted: Family<InterceptLabels, Counter>,
    /// 1 while partner TLS is intercepted (the pod CA is in memory), 0 when it is spliced (the
    /// pod opted out, or the CA could not be made at start).
    pub tls_interception: Gauge,
    /// 1 when the pod asked for interception but this start splices partner TLS because the
    /// CA could not be made or the trust files written.
    pub tls_interception_fallback: Gauge,
    /// 1 for a route whose partner sent `Deprecation` (see [`crate::lifecycle`]).
    pub partner_deprecated: Family<RouteLabels, Gauge>,
    /// The date the partner's `Deprecation` gave, Unix seconds.
    pub partner_deprecation: Family<RouteLabels, Gauge>,
    /// The date the partner's `Sunset` gave, Unix seconds.
    pub partner_sunset: Family<RouteLabels, Gauge>,
    /// Access log lines dropped because stdout did not keep up.
    pub access_log_dropped: Counter,
    /// Spans dropped because the export queue was full.
    pub spans_dropped: Counter,
    pub contract_violations: Family<ContractLabels, Counter>,
    /// Partner answers other than 401, by the key of a rotation window they came for.
    pub credential_keys: Family<CredentialKeyLabels, Counter>,
    /// OAuth2 token fetches that failed after their retries.
    pub credential_refresh_failures: Family<IntegrationLabels, Counter>,
    /// The violation counts of `contract_violations` again, by integration, for the operator's
    /// reports (a family cannot be listed).
    contract_totals: Mutex<HashMap<String, ContractTotals>>,
    /// Serialises gauge refreshes against each other (scrapes may overlap).
    refresh: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<CallLabels, Counter>::default();
        let duration = Family::<DurationLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let rate_limited = Family::<BandLabels, Counter>::default();
        let retries = Family::<RouteLabels, Counter>::default();
        let retries_skipped = Family::<SkipLabels, Counter>::default();
        let rate_limit_decisions = Family::<DecisionLabels, Counter>::default();
        let partition_overflow = Family::<RouteLabels, Counter>::default();
        let partitions = Family::<PartitionLabels, Gauge>::default();
        let circuit_state = Family::<RouteLabels, Gauge>::default();
        let kill_switch = Family::<RouteLabels, Gauge>::default();
        let revision_info = Family::<RevisionLabels, Gauge>::default();
        let config_errors = Counter::default();
        let config_refused = Family::<IntegrationLabels, Gauge>::default();
        let tunnels = Family::<TunnelLabels, Counter>::default();
        let open_connections = Gauge::default();
        let rejected_connections = Counter::default();
        let intercepted = Family::<InterceptLabels, Counter>::default();
        // prometheus-client appends `_total` to counters.
        registry.register(
            "tollgate_requests",
            "Calls to partners, by outcome, status code and result (ok, failure: the partner's doing; refused: the sidecar's)",
            requests.clone(),
        );
        registry.register(
            "tollgate_request_duration_seconds",
            "Whole-call latency as the app sees it, retries and queueing included, by result (ok, failure, refused)",
            duration.clone(),
        );
        registry.register(
            "tollgate_rate_limited",
            "Requests the sidecar answered 429 (the partner's own 429s are not counted here)",
            rate_limited.clone(),
        );
        registry.register(
            "tollgate_retries",
            "Retry attempts sent to partners",
            retries.clone(),
        );
        registry.register(
            "tollgate_retries_skipped",
            "Retries the policy allowed but that were not sent, by reason: budget, rate-limited, deadline",
            retries_skipped.clone(),
        );
        registry.register(
            "tollgate_rate_limit_decisions",
            "Quota decisions per attempt (retries included), by quota and decision: admitted, queued, denied",
            rate_limit_decisions.clone(),
        );
        registry.register(
            "tollgate_rate_limit_partition_overflow",
            "Attempts charged to a quota's shared overflow partition because its partition cap was reached",
            partition_overflow.clone(),
        );
        registry.register(
            "tollgate_rate_limit_partitions",
            "partitionBy values a quota tracks now (idle ones are evicted)",
            partitions.clone(),
        );
        registry.register(
            "tollgate_circuit_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            circuit_state.clone(),
        );
        registry.register(
            "tollgate_kill_switch_active",
            "1 while the kill switch is on",
            kill_switch.clone(),
        );
        registry.register(
            "tollgate_config_revision_info",
            "The policy revision in force (value 1)",
            revision_info.clone(),
        );
        registry.register(
            "tollgate_config_errors",
            "Configuration updates rejected (the previous revision stayed in force)",
            config_errors.clone(),
        );
        registry.register(
            "tollgate_config_refused",
            "1 for each integration the revision in force refused (its previous version, if any, stays in force)",
            config_refused.clone(),
        );
        registry.register(
            "tollgate_tunnels",
            "CONNECT tunnels, by outcome",
            tunnels.clone(),
        );
        registry.register(
            "tollgate_open_connections",
            "App connections open now",
            open_connections.clone(),
        );
        registry.register(
            "tollgate_rejected_connections",
            "App connections refused at accept: the connection limit was reached or the process was out of file descriptors",
            rejected_connections.clone(),
        );
        registry.register(
            "tollgate_intercepted_connections",
            "Connections redirected to the transparent listener, by protocol and outcome",
            intercepted.clone(),
        );
        let runtime_tasks = Gauge::default();
        registry.register(
            "tollgate_runtime_tasks",
            "Tasks alive in the sidecar's async runtime",
            runtime_tasks.clone(),
        );
        let tls_interception = Gauge::default();
        registry.register(
            "tollgate_tls_interception_active",
            "1 when partner TLS is intercepted with the pod CA, 0 when it is spliced",
            tls_interception.clone(),
        );
        let tls_interception_fallback = Gauge::default();
        registry.register(
            "tollgate_tls_interception_fallback",
            "1 when interception was asked for but this start splices partner TLS (the pod CA could not be made or the trust files written)",
            tls_interception_fallback.clone(),
        );
        let partner_deprecated = Family::<RouteLabels, Gauge>::default();
        registry.register(
            "tollgate_partner_deprecated",
            "1 for a route whose partner announced its deprecation (Deprecation response header)",
            partner_deprecated.clone(),
        );
        let partner_deprecation = Family::<RouteLabels, Gauge>::default();
        registry.register(
            "tollgate_partner_deprecation_timestamp_seconds",
            "When the partner deprecates the route, Unix seconds (Deprecation response header, when it carries a date)",
            partner_deprecation.clone(),
        );
        let partner_sunset = Family::<RouteLabels, Gauge>::default();
        registry.register(
            "tollgate_partner_sunset_timestamp_seconds",
            "When the partner stops answering the route, Unix seconds (Sunset response header)",
            partner_sunset.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "tollgate_access_log_dropped",
            "Access log lines dropped because stdout did not keep up",
            access_log_dropped.clone(),
        );
        let spans_dropped = Counter::default();
        registry.register(
            "tollgate_spans_dropped",
            "Spans not exported because the export queue (OTEL_BSP_MAX_QUEUE_SIZE) was full",
            spans_dropped.clone(),
        );
        let contract_violations = Family::<ContractLabels, Counter>::default();
        registry.register(
            "tollgate_contract_violations",
            "Partner 2xx answers that break the route's success rule (kind=success-rule) or schema (kind=schema), carry an enum value not listed (kind=unknown-enum), or were too long or compressed to check (kind=unchecked)",
            contract_violations.clone(),
        );
        let credential_keys = Family::<CredentialKeyLabels, Counter>::default();
        registry.register(
            "tollgate_credential_key",
            "With a rotation window (credentials.secondaryRef): partner answers other than 401, by the key the call carried (key=primary, or key=secondary after the primary got a 401)",
            credential_keys.clone(),
        );
        let credential_refresh_failures = Family::<IntegrationLabels, Counter>::default();
        registry.register(
            "tollgate_credential_refresh_failures",
            "OAuth2 token fetches that failed after their retries (the old token stays in use until it expires; then calls are answered credential-unavailable)",
            credential_refresh_failures.clone(),
        );
        let caps = CapMetrics::register(&mut registry);
        let adaptive = AdaptiveMetrics::register(&mut registry);
        Metrics {
            registry,
            caps,
            adaptive,
            credential_keys,
            credential_refresh_failures,
            access_log_dropped,
            spans_dropped,
            contract_violations,
            contract_totals: Mutex::default(),
            partner_deprecated,
            partner_deprecation,
            partner_sunset,
            requests,
            duration,
            rate_limited,
            retries,
            retries_skipped,
            rate_limit_decisions,
            partition_overflow,
            partitions,
            circuit_state,
            kill_switch,
            revision_info,
            config_errors,
            config_refused,
            tunnels,
            open_connections,
            runtime_tasks,
            rejected_connections,
            intercepted,
            tls_interception,
            tls_interception_fallback,
            refresh: Mutex::new(()),
        }
    }
}

impl Metrics {
    pub fn contract_violation(&self, integration: &str, route: &str, kind: &str) {
        self.contract_violations
            .get_or_create(&ContractLabels {
                integration: integration.to_string(),
                route: route.to_string(),
                kind: kind.to_string(),
            })
            .inc();
        if CONTRACT_VIOLATION_KINDS.contains(&kind) {
            let mut totals = self
                .contract_totals
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let n = totals
                .entry(integration.to_string())
                .or_default()
                .entry((route.to_string(), kind.to_string()))
                .or_default();
            *n = n.saturating_add(1);
        }
    }

    /// Contract violations of `integration` since the sidecar started, by (route, kind).
    pub fn contract_totals(&self, integration: &str) -> ContractTotals {
        self.contract_totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(integration)
            .cloned()
            .unwrap_or_default()
    }

    pub fn config_error(&self) {
        self.config_errors.inc();
    }

    /// Marks exactly these integrations as refused.
    pub fn set_refused(&self, integrations: impl IntoIterator<Item = String>) {
        self.config_refused.clear();
        for integration in integrations {
            self.config_refused
                .get_or_create(&IntegrationLabels { integration })
                .set(1);
        }
    }

    pub fn set_revision(&self, id: &str, source: &str) {
        self.revision_info.clear();
        self.revision_info
            .get_or_create(&RevisionLabels {
                revision: id.to_string(),
                source: source.to_string(),
            })
            .set(1);
    }

    /// Sets the state gauges (breakers, kill switches, quota partitions) from the revision in
    /// force.
    pub fn refresh(&self, revision: &Revision) {
        let _guard = self.refresh.lock().unwrap_or_else(|e| e.into_inner());
        self.circuit_state.clear();
        self.kill_switch.clear();
        self.partitions.clear();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            self.runtime_tasks
                .set(i64::try_from(rt.metrics().num_alive_tasks()).unwrap_or(i64::MAX));
        }
        let now = tokio::time::Instant::now();
        for i in &revision.integrations {
            for (route, quota, count) in i.state.partition_counts(now) {
                self.partitions
                    .get_or_create(&PartitionLabels {
                        integration: i.label.to_string(),
                        route,
                        quota: quota.to_string(),
                    })
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
            for (route, state) in i.state.breaker_states(now) {
                self.circuit_state
                    .get_or_create(&RouteLabels {
                        integration: i.label.to_string(),
                        route,
                    })
                    .set(crate::engine::breaker::gauge(state));
            }
            for r in i.routes() {
                self.kill_switch
                    .get_or_create(&RouteLabels {
                        integration: i.label.to_string(),
                        route: r.name.clone(),
                    })
                    .set(i64::from(r.kill_switch.enabled));
            }
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

// === impl RouteMetrics ===

/// One route's call metrics, resolved once per revision: a call then records its outcome
/// without building label strings or hashing them into the families (which was the larger part
/// of the observe layer's cost). The handles share their series with the families, so counts
/// carry on across revisions.
#[derive(Debug)]
pub struct RouteMetrics {
    integration: String,
    route: String,
    /// Per [`CallResult`], made on first use.
    duration: [OnceLock<Histogram>; 3],
    /// `tollgate_requests_total` by `(outcome, result, status code)`: a handful per route.
    requests: Counters<(&'static str, CallResult, u16)>,
    /// `tollgate_rate_limit_decisions_total` by `(quota, decision)`: at most six.
    decisions: Counters<(&'static str, &'static str)>,
    /// `tollgate_retries_total`.
    retries: OnceLock<Counter>,
    /// `tollgate.integration` and `tollgate.route` for the route's spans, shared rather than
    /// copied into each.
    span_attributes: [opentelemetry::KeyValue; 2],
}

impl RouteMetrics {
    pub fn new(_metrics: &Metrics, integration: &str, route: &str) -> Self {
        RouteMetrics {
            integration: integration.to_string(),
            route: route.to_string(),
            duration: Default::default(),
            requests: Counters::default(),
            decisions: Counters::default(),
            retries: OnceLock::new(),
            span_attributes: [
                opentelemetry::KeyValue::new(
                    "tollgate.integration",
                    opentelemetry::StringValue::from(std::sync::Arc::<str>::from(integration)),
                ),
                opentelemetry::KeyValue::new(
                    "tollgate.route",
                    opentelemetry::StringValue::from(std::sync::Arc::<str>::from(route)),
                ),
            ],
        }
    }

    /// The attributes naming the route on its call spans.
    pub fn span_attributes(&self) -> &[opentelemetry::KeyValue] {
        &self.span_attributes
    }

    /// Records one finished call.
    pub fn record(
        &self,
        metrics: &Metrics,
        outcome: &'static str,
        result: CallResult,
        code: u16,
        seconds: f64,
    ) {
        self.duration[result.index()]
            .get_or_init(|| {
                metrics
                    .duration
                    .get_or_create(&DurationLabels {
                        integration: self.integration.clone(),
                        route: self.route.clone(),
                        result: result.as_str().to_string(),
                    })
                    .clone()
            })
            .observe(seconds);
        self.requests.inc((outcome, result, code), || {
            metrics
                .requests
                .get_or_create(&CallLabels {
                    integration: self.integration.clone(),
                    route: self.route.clone(),
                    outcome: outcome.to_string(),
                    code: code.to_string(),
                    result: result.as_str().to_string(),
                })
                .clone()
        });
    }

    /// Counts a quota decision (`quota`: `route` or `integration`; `decision`: `admitted`,
    /// `queued` or `denied`).
    pub fn decision(&self, metrics: &Metrics, quota: &'static str, decision: &'static str) {
        self.decisions.inc((quota, decision), || {
            metrics
                .rate_limit_decisions
                .get_or_create(&DecisionLabels {
                    integration: self.integration.clone(),
                    route: self.route.clone(),
                    quota: quota.to_string(),
                    decision: decision.to_string(),
                })
                .clone()
        });
    }

    /// Counts a retry sent.
    pub fn retry(&self, metrics: &Metrics) {
        self.retries
            .get_or_init(|| {
                metrics
                    .retries
                    .get_or_create(&RouteLabels {
                        integration: self.integration.clone(),
                        route: self.route.clone(),
                    })
                    .clone()
            })
            .inc();
    }
}

/// A route's counters by a small key, each resolved from its family on first use.
#[derive(Debug)]
struct Counters<K>(RwLock<Vec<(K, Counter)>>);

impl<K> Default for Counters<K> {
    fn default() -> Self {
        Counters(RwLock::new(Vec::new()))
    }
}

impl<K: PartialEq + Copy> Counters<K> {
    fn inc(&self, key: K, resolve: impl FnOnce() -> Counter) {
        let found = self
            .0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, counter)| counter.inc());
        if found.is_some() {
            return;
        }
        let mut all = self.0.write().unwrap_or_else(|e| e.into_inner());
        if let Some((_, counter)) = all.iter().find(|(k, _)| *k == key) {
            counter.inc();
            return;
        }
        let counter = resolve();
        counter.inc();
        all.push((key, counter));
    }
}
