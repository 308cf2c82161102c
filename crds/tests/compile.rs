//! The compile step: documented defaults, rejected values named by field path, and the examples.

use std::time::Duration;

use http::Method;
use tollgate_crds::policy::{self, BreakerScope, Scheme};
use tollgate_crds::v1alpha1::{OnLimit, RateLimitScope};
use tollgate_crds::{PartnerIntegrationSpec, compile, manifest};

fn spec(yaml: &str) -> PartnerIntegrationSpec {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("test spec does not parse: {e}\n{yaml}"))
}

fn ok(yaml: &str) -> policy::IntegrationPolicy {
    compile("ns", "partner", &spec(yaml)).unwrap_or_else(|e| panic!("expected valid, got: {e}"))
}

const MINIMAL: &str = "upstream: {url: https://api.partner.example}";

#[test]
fn minimal_spec_gets_documented_defaults() {
    let p = ok(MINIMAL);
    assert!(!p.access_log, "the access log is off by default");
    assert_eq!(p.id.to_string(), "ns/partner");
    assert_eq!(p.upstream.scheme, Scheme::Https);
    assert_eq!(p.upstream.host, "api.partner.example");
    assert_eq!(p.upstream.port, 443);
    assert_eq!(p.upstream.base_path, "");
    assert_eq!(p.upstream.connect_timeout, Duration::from_secs(3));
    assert_eq!(p.hosts.len(), 1);
    assert!(p.matches_host("API.partner.example", Some(443)));
    assert!(p.matches_host("api.partner.example", None));
    assert!(p.workload_selector.is_empty());
    assert!(p.rate_limit.is_none(), "no rateLimit section: no limit");
    assert!(
        p.circuit_breaker.is_none(),
        "no circuitBreaker section: no breaker"
    );
    assert!(p.credentials.is_none());
    assert!(p.routes.is_empty());

    let d = &p.default_route;
    assert_eq!(d.name, "default");
    assert!(!d.kill_switch.enabled);
    assert_eq!(d.timeouts.request, Duration::from_secs(10));
    assert_eq!(d.timeouts.total, Duration::from_secs(30));
    assert_eq!(d.retries.max_attempts, 1, "no retries section: no retry");
    assert_eq!(d.breaker, BreakerScope::None);
    assert_eq!(d.fallback, policy::FallbackPolicy::default());
}

#[test]
fn section_defaults_fill_in_when_a_section_is_present() {
    let p = ok("
upstream: {url: 'http://10.0.0.1:8080/base/'}
retries: {}
circuitBreaker: {}
rateLimit: {limits: [{name: a, requests: 5, per: 1s}]}
credentials: {secretRef: {name: s, key: k}, allowInsecure: true}
fallback: {response: {}}
");
    assert_eq!(p.upstream.scheme, Scheme::Http);
    assert_eq!(p.upstream.port, 8080);
    assert_eq!(p.upstream.base_path, "/base");
    assert!(p.matches_host("10.0.0.1", Some(8080)));
    assert!(
        !p.matches_host("10.0.0.1", Some(8081)),
        "explicit port in url: only that port"
    );

    let r = &p.default_route.retries;
    assert_eq!(r.max_attempts, 3);
    assert_eq!(r.backoff_base, Duration::from_millis(100));
    assert_eq!(r.backoff_max, Duration::from_secs(2));
    assert!(r.retry_on.connect_error && r.retry_on.reset && r.retry_on.timeout);
    assert_eq!(r.retry_on.statuses, vec![429, 502, 503, 504]);
    assert!(r.respect_retry_after);
    assert_eq!((r.budget.percent, r.budget.min_per_second), (20, 5));
    assert_eq!(r.idempotency_header.as_str(), "idempotency-key");
    assert!(!r.generate_idempotency_key);

    let b = p.circuit_breaker.as_ref().unwrap();
    assert_eq!(b.window, Duration::from_secs(30));
    assert_eq!(
        (
            b.minimum_requests,
            b.failure_rate_percent,
            b.consecutive_failures
        ),
        (20, 50, 5)
    );
    assert_eq!(b.slow_call_duration, None);
    assert_eq!(b.open_duration, Duration::from_secs(15));
    assert_eq!(b.half_open_probes, 3);
    assert_eq!(p.default_route.breaker, BreakerScope::Integration);

    let rl = p.rate_limit.as_ref().unwrap();
    assert_eq!(rl.scope, RateLimitScope::Global);
    assert_eq!(rl.on_limit, OnLimit::Reject);
    assert_eq!(rl.max_queue_wait, Duration::from_secs(2));
    assert_eq!(rl.partition_by, None);

    let c = p.credentials.as_ref().unwrap();
    assert_eq!(c.header.as_str(), "authorization");
    assert_eq!(c.render("sk_1").unwrap(), "sk_1");
    assert!(c.render("sk_1").unwrap().is_sensitive());
    assert_eq!(
        p.redact_headers[0].as_str(),
        "authorization",
        "the credential header is always redacted"
    );

    let f = p.default_route.fallback.response.as_ref().unwrap();
    assert_eq!(f.status.as_u16(), 503);
    assert!(f.body.is_empty());
}

#[test]
fn routes_merge_field_by_field_and_first_match_wins() {
    let p = ok("
upstream: {url: https://api.partner.example}
killSwitch: {enabled: false}
timeouts: {request: 5s, total: 20s}
retries: {maxAttempts: 4, backoff: {base: 50ms, max: 1s}}
circuitBreaker: {consecutiveFailures: 7}
rateLimit: {partitionBy: x-user-region, onLimit: queue, limits: [{name: sustained, requests: 300, per: 1m}]}
routes:
  - name: tracking
    match: {pathPrefix: /v1/tracking, methods: [get]}
    rateLimit: {limits: [{name: tracking, requests: 20, per: 1m}]}
    timeouts: {request: 2s}
    circuitBreaker: {openDuration: 1m}
    killSwitch: {enabled: true, reason: partner bug}
  - name: writes
    match: {methods: [POST, PATCH]}
    retries: {maxAttempts: 2}
");
    let t = &p.routes[0];
    assert_eq!(t.methods, vec![Method::GET], "methods are upper-cased");
    assert_eq!(t.timeouts.request, Duration::from_secs(2));
    assert_eq!(t.timeouts.total, Duration::from_secs(20), "total inherited");
    assert_eq!(t.retries.max_attempts, 4, "retries inherited");
    assert!(t.kill_switch.enabled);
    assert_eq!(t.kill_switch.reason.as_deref(), Some("partner bug"));
    let BreakerScope::Route(b) = &t.breaker else {
        panic!("tracking has its own breaker")
    };
    assert_eq!(b.open_duration, Duration::from_secs(60));
    assert_eq!(
        b.consecutive_failures, 7,
        "unset breaker fields come from the integration's"
    );
    let rl = t.rate_limit.as_ref().unwrap();
    assert_eq!(rl.bands[0].name, "tracking");
    assert_eq!(
        rl.partition_by.as_ref().unwrap().as_str(),
        "x-user-region",
        "route bands inherit the partition"
    );
    assert_eq!(rl.on_limit, OnLimit::Queue);

    let w = &p.routes[1];
    assert_eq!(w.retries.max_attempts, 2);
    assert_eq!(w.retries.backoff_base, Duration::from_millis(50));
    assert_eq!(w.breaker, BreakerScope::Integration);
    assert!(!w.kill_switch.enabled);

    assert_eq!(
        p.route_for(&Method::GET, "/v1/tracking/123").name,
        "tracking"
    );
    assert_eq!(
        p.route_for(&Method::GET, "/v1/tracking?id=1").name,
        "tracking"
    );
    assert_eq!(
        p.route_for(&Method::GET, "/v1/trackings").name,
        "default",
        "prefixes are segment-aware"
    );
    assert_eq!(p.route_for(&Method::POST, "/v1/tracking").name, "writes");
    assert_eq!(p.route_for(&Method::DELETE, "/v1/x").name, "default");
    assert!(
        !p.default_route.kill_switch.enabled,
        "a route's kill switch stops only that route"
    );
}

#[test]
fn integration_kill_switch_stops_every_route() {
    let p = ok("
upstream: {url: https://api.partner.example}
killSwitch: {enabled: true, reason: INC-123}
routes: [{name: a, match: {pathPrefix: /a}}]
");
    assert!(p.default_route.kill_switch.enabled);
    assert!(p.routes[0].kill_switch.enabled);
    assert_eq!(p.routes[0].kill_switch.reason.as_deref(), Some("INC-123"));
}

#[test]
fn selectors_hosts_versioning_and_sla() {
    let p = ok("
workloadSelector: {matchLabels: {app: checkout}}
upstream: {url: https://api.partner.example, hosts: [api.partner.example, 'alt.partner.example:8443']}
versioning: {pinHeaders: {Stripe-Version: '2024-06-20'}, deniedPathPrefixes: [/v0]}
sla: {availabilityPercent: '99.9', latencyP95: 800ms}
telemetry: {redactHeaders: [X-Account], accessLog: true}
");
    let labels = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert!(p.selects(&labels(&[("app", "checkout"), ("tier", "web")])));
    assert!(!p.selects(&labels(&[("app", "billing")])));
    assert!(p.matches_host("alt.partner.example", Some(8443)));
    assert!(!p.matches_host("alt.partner.example", Some(443)));
    assert_eq!(p.versioning.denied("/v0/charges"), Some("/v0"));
    assert_eq!(p.versioning.denied("/v0"), Some("/v0"));
    assert_eq!(p.versioning.denied("/v01/charges"), None);
    assert_eq!(p.versioning.pin_headers[0].0.as_str(), "stripe-version");
    let sla = p.sla.as_ref().unwrap();
    assert_eq!(sla.availability_percent, Some(99.9));
    assert_eq!(sla.latency_p95, Some(Duration::from_millis(800)));
    assert_eq!(p.redact_headers[0].as_str(), "x-account");
    assert!(p.access_log);
}

/// Each case: a spec, the field path the error must name, and a fragment of the message.
const BAD: &[(&str, &str, &str)] = &[
    (
        "upstream: {url: https://a.example}\nretries: {backoff: {base: -5s}}",
        "spec.retries.backoff.base",
        "\"-5s\" is not a duration",
    ),
    (
        "upstream: {url: https://a.example}\ntimeouts: {request: soon}",
        "spec.timeouts.request",
        "is not a duration",
    ),
    (
        "upstream: {url: https://a.example}\ntimeouts: {request: 0s}",
        "spec.timeouts.request",
        "greater than zero",
    ),
    (
        "upstream: {url: https://a.example}\ntimeouts: {request: 40s, total: 30s}",
        "spec.timeouts.request",
        "exceeds the total deadline 30s",
    ),
    (
        "upstream: {url: https://a.example}\nretries: {backoff: {base: 5s, max: 1s}}",
        "spec.retries.backoff.base",
        "exceeds retries.backoff.max",
    ),
    (
        "upstream: {url: https://a.example}\nretries: {maxAttempts: 0}",
        "spec.retries.maxAttempts",
        "0 is out of range",
    ),
    (
        "upstream: {url: https://a.example}\nretries: {retryOn: [timeout, '404']}",
        "spec.retries.retryOn[1]",
        "404 is never retried",
    ),
    (
        "upstream: {url: https://a.example}\nretries: {retryOn: [banana]}",
        "spec.retries.retryOn[0]",
        "not a retry condition",
    ),
    (
        "upstream: {url: https://a.example}\nretries: {budget: {percent: 150}}",
        "spec.retries.budget.percent",
        "150 is out of range",
    ),
    (
        "upstream: {url: https://a.example}\nretries: {idempotency: {header: 'bad header'}}",
        "spec.retries.idempotency.header",
        "not a valid HTTP header name",
    ),
    (
        "upstream: {url: ftp://a.example}",
        "spec.upstream.url",
        "scheme \"ftp\"",
    ),
    (
        "upstream: {url: a.example/path}",
        "spec.upstream.url",
        "absolute URL",
    ),
    (
        "upstream: {url: 'https://user:pw@a.example'}",
        "spec.upstream.url",
        "must not carry credentials",
    ),
    (
        "upstream: {url: https://a.example, hosts: ['https://a.example/x']}",
        "spec.upstream.hosts[0]",
        "is not a host name",
    ),
    (
        "upstream: {url: https://a.example, connectTimeout: 3}",
        "spec.upstream.connectTimeout",
        "is not a duration",
    ),
    (
        "upstream: {url: https://a.example}\nrateLimit: {limits: []}",
        "spec.rateLimit.limits",
        "at least one band",
    ),
    (
        "upstream: {url: https://a.example}\nrateLimit: {limits: [{name: a, requests: 0, per: 1s}]}",
        "spec.rateLimit.limits[0].requests",
        "must be at least 1",
    ),
    (
        "upstream: {url: https://a.example}\nrateLimit: {limits: [{name: a, requests: 1, per: 0s}]}",
        "spec.rateLimit.limits[0].per",
        "greater than zero",
    ),
    (
        "upstream: {url: https://a.example}\nrateLimit: {limits: [{name: a, requests: 1, per: 1s}, {name: a, requests: 2, per: 1m}]}",
        "spec.rateLimit.limits[1].name",
        "band names must be unique",
    ),
    (
        "upstream: {url: https://a.example}\nrateLimit: {partitionBy: 'x region', limits: [{name: a, requests: 1, per: 1s}]}",
        "spec.rateLimit.partitionBy",
        "not a valid HTTP header name",
    ),
    (
        "upstream: {url: https://a.example}\ncircuitBreaker: {failureRatePercent: 0}",
        "spec.circuitBreaker.failureRatePercent",
        "0 is out of range",
    ),
    (
        "upstream: {url: https://a.example}\ncircuitBreaker: {halfOpenProbes: 0}",
        "spec.circuitBreaker.halfOpenProbes",
        "out of range",
    ),
    (
        "upstream: {url: https://a.example}\ncircuitBreaker: {openDuration: forever}",
        "spec.circuitBreaker.openDuration",
        "is not a duration",
    ),
    (
        "upstream: {url: https://a.example}\nfallback: {response: {status: 99}}",
        "spec.fallback.response.status",
        "99 is not an HTTP status",
    ),
    (
        "upstream: {url: https://a.example}\nfallback: {response: {headers: {'bad name': x}}}",
        "spec.fallback.response.headers[bad name]",
        "not a valid HTTP header name",
    ),
    (
        "upstream: {url: https://a.example}\nfallback: {staleIfError: 5 minutes}",
        "spec.fallback.staleIfError",
        "is not a duration",
    ),
    (
        "upstream: {url: https://a.example}\nversioning: {pinHeaders: {Stripe-Version: \"a\\nb\"}}",
        "spec.versioning.pinHeaders[Stripe-Version]",
        "not a valid HTTP header value",
    ),
    (
        "upstream: {url: https://a.example}\nversioning: {deniedPathPrefixes: [v0]}",
        "spec.versioning.deniedPathPrefixes[0]",
        "must start with '/'",
    ),
    (
        "upstream: {url: https://a.example}\ncredentials: {secretRef: {name: s, key: k}, format: 'Bearer'}",
        "spec.credentials.format",
        "must contain {value} exactly once",
    ),
    (
        "upstream: {url: https://a.example}\ncredentials: {secretRef: {name: s, key: k}, header: 'Auth:'}",
        "spec.credentials.header",
        "not a valid HTTP header name",
    ),
    (
        "upstream: {url: https://a.example}\ncredentials: {secretRef: {name: '', key: k}}",
        "spec.credentials.secretRef.name",
        "must be set",
    ),
    (
        "upstream: {url: https://a.example}\ncredentials: {secretRef: {name: s, key: k}, secondaryRef: {name: s, key: k}}",
        "spec.credentials.secondaryRef",
        "a rotation window needs two keys",
    ),
    (
        "upstream: {url: https://a.example}\ncredentials: {secretRef: {name: s, key: k}, secondaryRef: {name: s, key: ''}}",
        "spec.credentials.secondaryRef.key",
        "must be set",
    ),
    (
        "upstream: {url: https://a.example}\ncredentials: {secretRef: {name: s, key: k}, oauth2: {tokenUrl: 'https://login.example/token', clientIdRef: {name: o, key: id}, clientSecretRef: {name: o, key: secret}}}",
        "spec.credentials.oauth2",
        "either secretRef or oauth2, not both",
    ),
    (
        "upstream: {url: https://a.example}\ncredentials: {secondaryRef: {name: s, key: k}, oauth2: {tokenUrl: 'https://login.example/token', clientIdRef: {name: o, key: id}, clientSecretRef: {name: o, key: secret}}}",
        "spec.credentials.secondaryRef",
        "not with oauth2",
    ),
    (
        "upstream: {url: https://a.example}\ncredentials: {oauth2: {tokenUrl: 'http://login.example/token', clientIdRef: {name: o, key: id}, clientSecretRef: {name: o, key: s}}}",
        "spec.credentials.oauth2.tokenUrl",
        "cross the network in cleartext",
    ),
    (
        "upstream: {url: https://a.example}\ncredentials: {oauth2: {tokenUrl: 'login.example/token', clientIdRef: {name: o, key: id}, clientSecretRef: {name: o, key: s}}}",
        "spec.credentials.oauth2.tokenUrl",
        "must be an absolute URL",
    ),
    (
        "upstream: {url: https://a.example}\ncredentials: {oauth2: {tokenUrl: 'https://l.example/t', clientIdRef: {name: '', key: id}, clientSecretRef: {name: o, key: s}}}",
        "spec.credentials.oauth2.clientIdRef.name",
        "must be set",
    ),
    (
        "upstream: {url: https://a.example}\ncredentials: {oauth2: {tokenUrl: 'https://login.example/token', clientIdRef: {name: o, key: id}, clientSecretRef: {name: o, key: secret}, scopes: ['a b']}}",
        "spec.credentials.oauth2.scopes[0]",
        "is not a scope token",
    ),
    (
        "upstream: {url: https://a.example}\ncredentials: {oauth2: {tokenUrl: 'https://login.example/token', clientIdRef: {name: o, key: id}, clientSecretRef: {name: o, key: secret}, refreshBefore: soon}}",
        "spec.credentials.oauth2.refreshBefore",
        "is not a duration",
    ),
    (
        "upstream: {url: https://a.example}\nroutes: [{name: a, match: {pathPrefix: x}}]",
        "spec.routes[0].match.pathPrefix",
        "must start with '/'",
    ),
    (
        "upstream: {url: https://a.example}\nroutes: [{name: a, match: {methods: ['GE T']}}]",
        "spec.routes[0].match.methods[0]",
        "is not an HTTP method",
    ),
    (
        "upstream: {url: https://a.example}\nroutes: [{name: a, match: {pathPrefix: /a}}, {name: a, match: {pathPrefix: /b}}]",
        "spec.routes[1].name",
        "route names must be unique",
    ),
    (
        "upstream: {url: https://a.example}\nroutes: [{name: default, match: {pathPrefix: /a}}]",
        "spec.routes[0].name",
        "reserved",
    ),
    (
        "upstream: {url: https://a.example}\nroutes: [{name: v1, match: {pathPrefix: /v1}}, {name: tracking, match: {pathPrefix: /v1/tracking, methods: [GET]}}]",
        "spec.routes[1]",
        "never matches: route \"v1\" (spec.routes[0])",
    ),
    (
        "upstream: {url: https://a.example}\nroutes: [{name: a, match: {pathPrefix: /a}, timeouts: {request: 1m}}]",
        "spec.routes[0].timeouts.request",
        "exceeds the total deadline",
    ),
    (
        "upstream: {url: https://a.example}\nroutes: [{name: a, match: {pathPrefix: /a}, rateLimit: {limits: [{name: x, requests: 1, per: 1 s}]}}]",
        "spec.routes[0].rateLimit.limits[0].per",
        "is not a duration",
    ),
    (
        "upstream: {url: https://a.example}\nsla: {availabilityPercent: '120'}",
        "spec.sla.availabilityPercent",
        "at most 100",
    ),
    (
        "upstream: {url: https://a.example}\nsla: {latencyP95: fast}",
        "spec.sla.latencyP95",
        "is not a duration",
    ),
    (
        "upstream: {url: https://a.example}\ncontract: {success: {jsonPath: status, equals: ok}}",
        "spec.contract.success.jsonPath",
        "must start with `$`",
    ),
    (
        "upstream: {url: https://a.example}\ncontract: {success: {jsonPath: '$.a[x]', equals: ok}}",
        "spec.contract.success.jsonPath",
        "must be an array index",
    ),
    (
        "upstream: {url: https://a.example}\ncontract: {success: {jsonPath: $.status, equals: ok}, sampleRate: '1.5'}",
        "spec.contract.sampleRate",
        "at most 1",
    ),
    (
        "upstream: {url: https://a.example}\nroutes: [{name: a, match: {pathPrefix: /a}, contract: {success: {jsonPath: $.ok, equals: 'true'}, maxBodyBytes: 0}}]",
        "spec.routes[0].contract.maxBodyBytes",
        "between 1 and 1048576",
    ),
    (
        "upstream: {url: https://a.example}\ncontract: {success: {jsonPath: $.status, equals: ok}, enums: [{jsonPath: $.a, values: [x]}, {jsonPath: '$.b.', values: [y]}]}",
        "spec.contract.enums[1].jsonPath",
        "must be followed by a field name",
    ),
    (
        "upstream: {url: https://a.example}\ncontract: {sampleRate: '0.5'}",
        "spec.contract",
        "names no check",
    ),
    (
        "upstream: {url: https://a.example}\ncontract: {schema: {inline: '{\"type\": \"nonsense\"}'}}",
        "spec.contract.schema.inline",
        "the schema does not compile",
    ),
    (
        "upstream: {url: https://a.example}\nroutes: [{name: a, match: {pathPrefix: /a}, contract: {schema: {inline: '{not json'}}}]",
        "spec.routes[0].contract.schema.inline",
        "the schema is not JSON",
    ),
    (
        "upstream: {url: https://a.example}\ncontract: {schema: {inline: '{\"$ref\": \"https://schemas.example/order.json\"}'}}",
        "spec.contract.schema.inline",
        "the schema does not compile",
    ),
    (
        "upstream: {url: https://a.example}\ncontract: {schema: {configMapName: orders}}",
        "spec.contract.schema.key",
        "required with configMapName",
    ),
    (
        "upstream: {url: https://a.example}\ncontract: {schema: {}}",
        "spec.contract.schema",
        "give configMapName and key, or inline",
    ),
    (
        "upstream: {url: https://a.example}\ntelemetry: {redactHeaders: ['a b']}",
        "spec.telemetry.redactHeaders[0]",
        "not a valid HTTP header name",
    ),
    (
        "upstream: {url: https://a.example}\nrateLimit: {limits: [{name: a, requests: 5, per: 1s}], adaptive: {minPercent: 0}}",
        "spec.rateLimit.adaptive.minPercent",
        "between 1 and 100",
    ),
    (
        "upstream: {url: https://a.example}\nrateLimit: {limits: [{name: a, requests: 5, per: 1s}], overrides: [{values: [eu], limits: [{name: b, requests: 1, per: 1s}]}]}",
        "spec.rateLimit.overrides",
        "needs partitionBy",
    ),
    (
        "upstream: {url: https://a.example}\nrateLimit: {partitionAlsoBy: [X-Tenant], limits: [{name: a, requests: 5, per: 1s}]}",
        "spec.rateLimit.partitionAlsoBy",
        "needs partitionBy",
    ),
    (
        "upstream: {url: https://a.example}\nrateLimit: {partitionBy: X-Region, partitionAlsoBy: [x-region], limits: [{name: a, requests: 5, per: 1s}]}",
        "spec.rateLimit.partitionAlsoBy[0]",
        "already part of the partition key",
    ),
    (
        "upstream: {url: https://a.example}\nrateLimit: {partitionBy: X-Region, partitionAlsoBy: ['a b'], limits: [{name: a, requests: 5, per: 1s}]}",
        "spec.rateLimit.partitionAlsoBy[0]",
        "not a valid HTTP header name",
    ),
    (
        "upstream: {url: https://a.example}\nrateLimit: {partitionBy: X-Region, limits: [{name: a, requests: 5, per: 1s}], overrides: [{values: [eu], limits: [{name: b, requests: 1, per: 1s}]}, {values: [eu], limits: [{name: c, requests: 1, per: 1s}]}]}",
        "spec.rateLimit.overrides[1].values[0]",
        "earlier entry",
    ),
    (
        "upstream: {url: https://a.example}\nrateLimit: {partitionBy: X-Region, limits: [{name: a, requests: 5, per: 1s}], overrides: [{values: [eu], limits: [{name: b, requests: 0, per: 1s}]}]}",
        "spec.rateLimit.overrides[0].limits[0].requests",
        "at least 1",
    ),
    (
        "upstream: {url: https://a.example}\nconcurrency: {maxInFlight: 0}",
        "spec.concurrency.maxInFlight",
        "between 1 and 100000",
    ),
    (
        "upstream: {url: https://a.example}\nroutes: [{name: r, concurrency: {maxInFlight: 2, maxQueueDepth: 0}}]",
        "spec.routes[0].concurrency.maxQueueDepth",
        "between 1 and 100000",
    ),
    (
        "upstream: {url: https://a.example}\nconcurrency: {maxInFlight: 2, maxQueueWait: soon}",
        "spec.concurrency.maxQueueWait",
        "",
    ),
];

#[test]
fn adaptive_quotas_get_their_defaults_and_routes_inherit_them() {
    let p = ok("
upstream: {url: https://a.example}
rateLimit: {limits: [{name: a, requests: 5, per: 1s}], adaptive: {}}
routes:
- name: r
  rateLimit: {limits: [{name: b, requests: 1, per: 1s}]}
");
    let a = p.rate_limit.unwrap().adaptive.expect("adaptive");
    assert_eq!(a.min_percent, 10);
    assert_eq!(a.recovery, Duration::from_secs(30));
    let r = p.routes[0].rate_limit.as_ref().unwrap();
    assert_eq!(
        r.adaptive.as_ref(),
        Some(&a),
        "the route's quota inherits adaptive"
    );
    assert!(ok(MINIMAL).rate_limit.is_none());
}

#[test]
fn concurrency_caps_compile_with_their_defaults() {
    let p = ok("
upstream: {url: https://a.example}
concurrency: {maxInFlight: 8}
routes:
- name: exports
  match: {pathPrefix: /v1/exports}
  concurrency: {maxInFlight: 2, onLimit: queue, maxQueueWait: 5s, maxQueueDepth: 20}
");
    let c = p.concurrency.expect("the integration's cap");
    assert_eq!(c.max_in_flight, 8);
    assert_eq!(c.on_limit, OnLimit::Reject);
    assert_eq!(c.max_queue_wait, Duration::from_secs(2));
    assert_eq!(c.max_queue_depth, 8, "the line defaults to maxInFlight");
    let r = p.routes[0]
        .concurrency
        .as_ref()
        .expect("the route's own cap");
    assert_eq!(
        (
            r.max_in_flight,
            r.on_limit,
            r.max_queue_wait,
            r.max_queue_depth
        ),
        (2, OnLimit::Queue, Duration::from_secs(5), 20)
    );
    assert!(p.default_route.concurrency.is_none());
}

#[test]
fn every_bad_value_is_refused_with_its_field_path() {
    assert!(BAD.len() >= 15);
    let mut paths = std::collections::BTreeSet::new();
    for (yaml, path, fragment) in BAD {
        let err = match compile("ns", "partner", &spec(yaml)) {
            Ok(_) => panic!("accepted a bad spec (expected {path}):\n{yaml}"),
            Err(e) => e,
        };
        let text = err.to_string();
        assert!(
            err.errors
                .iter()
                .any(|e| e.path == *path && e.message.contains(fragment)),
            "spec:\n{yaml}\nexpected an error at {path} containing {fragment:?}, got: {text}"
        );
        assert!(
            text.contains(&format!("{path}: ")),
            "the message names the field: {text}"
        );
        paths.insert(*path);
    }
    assert!(paths.len() >= 15, "distinct fields: {}", paths.len());
}

#[test]
fn the_documented_message_form() {
    let err = compile(
        "ns",
        "p",
        &spec("upstream: {url: https://a.example}\nretries: {backoff: {base: -5s}}"),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with(r#"spec.retries.backoff.base: "-5s" is not a duration"#),
        "{err}"
    );
}

#[test]
fn all_errors_are_reported_at_once() {
    let err = compile(
        "ns",
        "p",
        &spec(
            "
upstream: {url: https://a.example}
timeouts: {request: x}
retries: {maxAttempts: 99}
",
        ),
    )
    .unwrap_err();
    let paths: Vec<&str> = err.errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["spec.timeouts.request", "spec.retries.maxAttempts"]);
}

#[test]
fn every_example_compiles() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut seen = 0;
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let items = manifest::parse_stream(&text, "default")
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            !items.is_empty(),
            "{} holds no PartnerIntegration",
            path.display()
        );
        for pi in items {
            let ns = pi.metadata.namespace.clone().unwrap();
            let name = pi.metadata.name.clone().unwrap();
            compile(&ns, &name, &pi.spec)
                .unwrap_or_else(|e| panic!("{}: {ns}/{name}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 3, "examples: {seen}");
}

#[test]
fn logistics_example_layers_the_tracking_quota_under_the_account_quota() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/logistics.yaml"
    ))
    .unwrap();
    let pi = &manifest::parse_stream(&text, "default").unwrap()[0];
    let p = compile("fulfilment", "shipfast", &pi.spec).unwrap();
    let account: Vec<(u64, Duration)> = p
        .rate_limit
        .as_ref()
        .unwrap()
        .bands
        .iter()
        .map(|b| (b.requests, b.per))
        .collect();
    assert_eq!(
        account,
        [(300, Duration::from_secs(60)), (20, Duration::from_secs(1))]
    );
    let tracking = p.route_for(&Method::GET, "/v1/tracking/1Z999");
    assert_eq!(tracking.name, "tracking");
    let contract = tracking.contract.as_ref().unwrap();
    let judged = contract.judge(br#"{"status":"ok","shipment":{"state":"lost"}}"#);
    assert!(judged.kept);
    assert_eq!(judged.unknown_enums, 1);
    assert!(!contract.satisfied_by(br#"{"status":"error"}"#));
    assert!(p.default_route.contract.is_none());
    assert_eq!(tracking.rate_limit.as_ref().unwrap().bands[0].requests, 20);
    assert_eq!(
        tracking.rate_limit.as_ref().unwrap().bands[0].per,
        Duration::from_secs(60)
    );
}

#[test]
fn manifest_stream_errors_name_the_document() {
    let two = "apiVersion: tollgate.dev/v1alpha1\nkind: PartnerIntegration\nmetadata: {name: a}\nspec: {upstream: {url: https://a.example}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n";
    let err = manifest::parse_stream(two, "default")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("document 2: kind \"ConfigMap\""), "{err}");

    let bad_yaml = "apiVersion: tollgate.dev/v1alpha1\nkind: PartnerIntegration\nmetadata: {name: a}\nspec: {upstream: {url: [}\n";
    let err = manifest::parse_stream(bad_yaml, "default")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("document 1:"), "{err}");

    let dup = format!(
        "{}---\n{}",
        &two[..two.find("---").unwrap()],
        &two[..two.find("---").unwrap()]
    );
    let err = manifest::parse_stream(&dup, "default")
        .unwrap_err()
        .to_string();
    assert!(err.contains("default/a"), "{err}");

    let ok = manifest::parse_stream("---\n---\n", "default").unwrap();
    assert!(ok.is_empty());
}

// === config safety ===

/// Values that used to be accepted and crash or mislead later: each is refused by field.
const UNSAFE: &[(&str, &str, &str)] = &[
    (
        "upstream: {url: https://a.example, hosts: [api.x, 'api.x:8443']}",
        "spec.upstream.hosts[1]",
        "overlaps spec.upstream.hosts[0]",
    ),
    (
        "upstream: {url: https://a.example, hosts: [API.x., api.x]}",
        "spec.upstream.hosts[1]",
        "overlaps spec.upstream.hosts[0]",
    ),
    (
        "upstream: {url: https://a.example}\ntimeouts: {request: 1s, total: 99999999999h}",
        "spec.timeouts.total",
        "longer than the maximum",
    ),
    (
        "upstream: {url: https://a.example}\nfallback: {staleIfError: 9000h}",
        "spec.fallback.staleIfError",
        "longer than the maximum",
    ),
    (
        "upstream: {url: https://a.example}\nrateLimit: {limits: [{name: a, requests: 1, per: 5000000h}]}",
        "spec.rateLimit.limits[0].per",
        "longer than the maximum",
    ),
    (
        "upstream: {url: 'http://api.partner.example'}\ncredentials: {secretRef: {name: s, key: k}}",
        "spec.credentials",
        "allowInsecure",
    ),
    (
        "upstream: {url: 'http://10.0.0.1:8080'}\ncredentials: {secretRef: {name: s, key: k}}",
        "spec.credentials",
        "cleartext",
    ),
];

#[test]
fn unsafe_values_are_refused_with_their_field_path() {
    for (yaml, path, fragment) in UNSAFE {
        let err = match compile("ns", "partner", &spec(yaml)) {
            Ok(_) => panic!("accepted an unsafe spec (expected {path}):\n{yaml}"),
            Err(e) => e,
        };
        assert!(
            err.errors
                .iter()
                .any(|e| e.path == *path && e.message.contains(fragment)),
            "spec:\n{yaml}\nexpected an error at {path} containing {fragment:?}, got: {err}"
        );
    }
}

#[test]
fn oauth2_compiles_with_its_defaults_and_a_loopback_token_url() {
    let p = ok(
        "upstream: {url: https://a.example}\ncredentials: {format: 'Bearer {value}', oauth2: {tokenUrl: 'http://127.0.0.1:9/token', clientIdRef: {name: o, key: id}, clientSecretRef: {name: o, key: s}, scopes: [a, 'b:c']}}",
    );
    let c = p.credentials.unwrap();
    let o = c.oauth2.unwrap();
    assert_eq!(
        o.auth_method,
        tollgate_crds::v1alpha1::OAuth2AuthMethod::Basic
    );
    assert_eq!(o.refresh_before, None);
    assert_eq!(o.scopes, ["a", "b:c"]);
    assert_eq!(c.header.as_str(), "authorization");
    assert_eq!(c.prefix, "Bearer ");
}

#[test]
fn credentials_over_http_are_allowed_to_loopback_or_when_said_explicitly() {
    for url in [
        "http://127.0.0.1:8080",
        "http://127.9.9.9",
        "http://[::1]:9000",
        "http://localhost:8080",
        "https://api.partner.example",
    ] {
        let p = ok(&format!(
            "upstream: {{url: '{url}'}}\ncredentials: {{secretRef: {{name: s, key: k}}}}"
        ));
        assert!(p.credentials.is_some(), "{url}");
    }
    let p = ok(
        "upstream: {url: 'http://vendor.internal'}\ncredentials: {secretRef: {name: s, key: k}, allowInsecure: true}",
    );
    assert!(p.credentials.is_some());
}

#[test]
fn hosts_are_compiled_in_lower_case_without_a_trailing_dot() {
    let p = ok(
        "upstream: {url: 'https://API.Partner.Example./v1', hosts: ['Alt.Partner.Example.:8443', API.partner.example]}",
    );
    let hosts: Vec<_> = p.hosts.iter().map(|h| (h.host.as_str(), h.port)).collect();
    assert_eq!(
        hosts,
        [
            ("alt.partner.example", Some(8443)),
            ("api.partner.example", None)
        ]
    );
    let d = ok("upstream: {url: 'https://API.Partner.Example.'}");
    assert_eq!(d.hosts[0].host, "api.partner.example");
    assert!(d.matches_host("Api.Partner.Example.", Some(443)));
}

#[test]
fn paths_normalise_once_and_prefixes_match_the_normal_form() {
    use tollgate_crds::policy::normalize_path;
    let cases = [
        ("/", "/"),
        ("", "/"),
        ("//v0", "/v0"),
        ("/v1/../v0/x", "/v0/x"),
        ("/v1/./a//b/", "/v1/a/b/"),
        ("/../../etc", "/etc"),
        ("/%76%30/charges", "/v0/charges"),
        ("/a%2fb", "/a%2Fb"),
        ("/a%2e%2E/b", "/a../b"),
        ("/v1/%2E%2E/v0", "/v0"),
        ("/caf%C3%A9", "/caf%C3%A9"),
        ("/a/..", "/"),
        ("/a/.", "/a/"),
    ];
    for (raw, want) in cases {
        assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw:?}");
    }
    for bad in ["/a%zz", "/a%", "/a%2", "/a%é"] {
        assert!(normalize_path(bad).is_err(), "{bad:?}");
    }
    let p = ok(
        "upstream: {url: https://a.example}\nversioning: {deniedPathPrefixes: ['//v0/./']}\nroutes: [{name: t, match: {pathPrefix: '/v1//tracking'}}]",
    );
    assert_eq!(p.versioning.denied_path_prefixes, ["/v0/"]);
    assert_eq!(p.routes[0].path_prefix.as_deref(), Some("/v1/tracking"));
}

#[test]
fn interception_is_on_for_https_partners_unless_turned_off_and_never_for_http() {
    assert!(ok(MINIMAL).upstream.interception, "https: on by default");
    assert!(
        !ok("upstream: {url: 'https://a.example', interception: false}")
            .upstream
            .interception
    );
    assert!(
        !ok("upstream: {url: 'http://a.example'}")
            .upstream
            .interception,
        "http: nothing to originate TLS to"
    );
    let err = compile(
        "ns",
        "partner",
        &spec("upstream: {url: 'http://a.example', interception: true}"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("spec.upstream.interception"), "{err}");
}

/// A CA certificate (its key was thrown away when it was made).
const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBnTCCAUOgAwIBAgIUNZNl7gpKpFs6YJsXqEQWdaYjyc0wCgYIKoZIzj0EAwIw
IzEhMB8GA1UEAwwYdG9sbGdhdGUgY29tcGlsZSB0ZXN0IENBMCAXDTI2MTIwMjE5
MDEyNFoYDzIxMjYxMTA4MTkwMTI0WjAjMSEwHwYDVQQDDBh0b2xsZ2F0ZSBjb21w
aWxlIHRlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAASZYC8CQfpbDavc
9RZ/xu0dJfhh16GITFBL/ZBGTIVvWUhlOh3SEYlum8lFwwtBQ8RlBJNV5e2WhJG2
hbOfuuREo1MwUTAdBgNVHQ4EFgQUSiGN3MNcMBcfoRzzQ1dUlF5kaAcwHwYDVR0j
BBgwFoAUSiGN3MNcMBcfoRzzQ1dUlF5kaAcwDwYDVR0TAQH/BAUwAwEB/zAKBggq
hkjOPQQDAgNIADBFAiEA2HTzoTxm5TpJBt7brwxGT98thjIHEFwp2peI2ADWTnUC
IHROeWI9NdgYcAkQXcQLYuA+ybY5g6bB41KvHNw5/tdZ
-----END CERTIFICATE-----
";

fn with_ca_bundle(url: &str, pem: &str) -> PartnerIntegrationSpec {
    let mut s = spec(&format!("upstream: {{url: '{url}'}}"));
    s.upstream.ca_bundle = Some(pem.to_string());
    s
}

#[test]
fn a_ca_bundle_must_hold_usable_ca_certificates_and_nothing_else() {
    let p = compile(
        "ns",
        "partner",
        &with_ca_bundle("https://a.example", TEST_CA),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.upstream.ca_bundle.as_deref(), Some(TEST_CA));
    assert!(ok(MINIMAL).upstream.ca_bundle.is_none());

    let garbled = TEST_CA.replace("MIIBnTCC", "MIIBnTCD");
    let key = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
    for (url, pem, says) in [
        (
            "https://a.example",
            "not pem at all",
            "no PEM CERTIFICATE found",
        ),
        (
            "https://a.example",
            garbled.as_str(),
            "is not a usable CA certificate",
        ),
        (
            "https://a.example",
            &format!("{TEST_CA}{key}"),
            "holds a private key",
        ),
        ("http://a.example", TEST_CA, "needs an https:// url"),
    ] {
        let err = compile("ns", "partner", &with_ca_bundle(url, pem))
            .unwrap_err()
            .to_string();
        assert!(err.contains("spec.upstream.caBundle"), "{err}");
        assert!(err.contains(says), "{says}: {err}");
        assert!(!err.contains("MC4CAQAw"), "the key is never echoed: {err}");
    }
}

#[test]
fn a_client_certificate_names_a_secret_and_needs_https() {
    let with = |url: &str, name: &str| {
        let mut s = spec(&format!("upstream: {{url: '{url}'}}"));
        s.upstream.client_certificate = Some(tollgate_crds::v1alpha1::ClientCertificate {
            secret_name: name.to_string(),
        });
        s
    };
    let p = compile("ns", "partner", &with("https://a.example", "partner-mtls"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        p.upstream.client_certificate.as_deref(),
        Some("partner-mtls")
    );
    assert!(ok(MINIMAL).upstream.client_certificate.is_none());

    for (url, name, field, says) in [
        (
            "http://a.example",
            "partner-mtls",
            "spec.upstream.clientCertificate",
            "needs an https:// url",
        ),
        (
            "https://a.example",
            "Partner_MTLS",
            "spec.upstream.clientCertificate.secretName",
            "is not a Secret name",
        ),
        (
            "https://a.example",
            "../etc",
            "spec.upstream.clientCertificate.secretName",
            "is not a Secret name",
        ),
    ] {
        let err = compile("ns", "partner", &with(url, name))
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{err}");
        assert!(err.contains(says), "{says}: {err}");
    }
}

/// A success rule: compiled with its defaults, inherited by routes without their own, and
/// matched against JSON bodies by the named value.
#[test]
fn contract_success_rule_compiles_and_matches() {
    let p = ok(
        "upstream: {url: https://a.example}\ncontract: {success: {jsonPath: '$.data[1].state', equals: ok}}\nroutes: [{name: a, match: {pathPrefix: /a}}, {name: b, match: {pathPrefix: /b}, contract: {success: {jsonPath: $.ok, equals: 'true'}, sampleRate: '0.25', maxBodyBytes: 100}}]",
    );
    let k = p.default_route.contract.as_ref().unwrap();
    assert_eq!(k.sample_rate, 1.0);
    assert_eq!(k.max_body_bytes, 65536);
    assert!(k.satisfied_by(br#"{"data":[{},{"state":"ok"}]}"#));
    assert!(!k.satisfied_by(br#"{"data":[{},{"state":"error"}]}"#));
    assert!(!k.satisfied_by(br#"{"data":[]}"#));
    assert!(!k.satisfied_by(b"not json"));
    assert_eq!(p.routes[0].contract.as_ref(), Some(k));
    let b = p.routes[1].contract.as_ref().unwrap();
    assert_eq!((b.sample_rate, b.max_body_bytes), (0.25, 100));
    assert!(b.satisfied_by(br#"{"ok":true}"#));
    assert!(!b.satisfied_by(br#"{"ok":"yes"}"#));
    assert!(ok(MINIMAL).default_route.contract.is_none());
}

/// A JSON Schema, inline or from a ConfigMap: compiled once; a body matches it or not (a
/// body that is not JSON does not). A ConfigMap whose text is not in yet compiles unresolved,
/// naming its field; with the text in (as the operator distributes it), it is compiled like an
/// inline one and its errors name `configMapName`.
#[test]
fn contract_schema_compiles_and_matches() {
    let schema = r#"{"type": "object", "required": ["id", "amount"], "properties": {"amount": {"type": "integer", "minimum": 0}}}"#;
    let p = ok(&format!(
        "upstream: {{url: https://a.example}}\ncontract: {{schema: {{inline: '{schema}'}}}}"
    ));
    let k = p.default_route.contract.as_ref().unwrap();
    assert!(k.json_path.is_none() && k.equals.is_none());
    let judge = |body: &[u8]| k.judge(body);
    assert!(judge(br#"{"id":"o_1","amount":12}"#).schema_kept);
    assert!(
        judge(br#"{"id":"o_1","amount":12}"#).kept,
        "no success rule: kept"
    );
    assert!(!judge(br#"{"id":"o_1","amount":-1}"#).schema_kept);
    assert!(!judge(br#"{"amount":3}"#).schema_kept);
    assert!(!judge(b"not json").schema_kept);
    assert!(p.unresolved_schema().is_none());
    let shown = serde_json::to_value(k).unwrap();
    assert_eq!(
        shown["schema"],
        serde_json::json!({"source": "inline", "bytes": schema.len()})
    );

    let unresolved = ok(
        "upstream: {url: https://a.example}\nroutes: [{name: a, match: {pathPrefix: /a}, contract: {schema: {configMapName: orders, key: order.json}}}]",
    );
    assert_eq!(
        unresolved.unresolved_schema().as_deref(),
        Some("spec.routes[0].contract.schema.configMapName")
    );
    let resolved = ok(&format!(
        "upstream: {{url: https://a.example}}\ncontract: {{schema: {{configMapName: orders, key: order.json, inline: '{schema}'}}}}"
    ));
    assert!(resolved.unresolved_schema().is_none());
    assert_eq!(
        resolved
            .default_route
            .contract
            .as_ref()
            .unwrap()
            .schema
            .as_ref()
            .unwrap()
            .source,
        "configMap orders key order.json"
    );
    let err = compile(
        "ns",
        "partner",
        &spec("upstream: {url: https://a.example}\ncontract: {schema: {configMapName: orders, key: order.json, inline: '[1'}}"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("spec.contract.schema.configMapName") && err.contains("not JSON"),
        "{err}"
    );
}

/// Enum fields: a listed value or an absent field is fine; another value is counted.
#[test]
fn contract_enums_count_values_not_listed() {
    let p = ok(
        "upstream: {url: https://a.example}\ncontract: {success: {jsonPath: $.status, equals: ok}, enums: [{jsonPath: $.state, values: [pending, paid]}, {jsonPath: $.code, values: ['1', '2']}]}",
    );
    let k = p.default_route.contract.unwrap();
    let judge = |b: &str| {
        let j = k.judge(b.as_bytes());
        (j.kept, j.unknown_enums)
    };
    assert_eq!(
        judge(r#"{"status":"ok","state":"paid","code":2}"#),
        (true, 0)
    );
    assert_eq!(judge(r#"{"status":"ok"}"#), (true, 0));
    assert_eq!(
        judge(r#"{"status":"ok","state":"refunded","code":3}"#),
        (true, 2)
    );
    assert_eq!(judge(r#"{"status":"no","state":{"x":1}}"#), (false, 1));
}
