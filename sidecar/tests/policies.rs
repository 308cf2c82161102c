//! Every policy against a real partner server, through the real sidecar binary.

mod support;

use std::time::{Duration, Instant};

use http::Method;
use support::*;

fn spec(partner: &Partner, rest: &str) -> String {
    manifest(
        "partner",
        &format!("upstream: {{url: '{}'}}\n{rest}", partner.url()),
    )
}

// === kill switch ===

#[tokio::test]
async fn kill_switch_stops_every_call_and_says_why() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&spec(
        &partner,
        "killSwitch: {enabled: true, reason: 'INC-123 vendor double-charging'}",
    ))
    .await;
    for _ in 0..3 {
        let resp = sidecar.get(&format!("{}/v1/charges", partner.url())).await;
        assert_eq!(resp.status, 503);
        assert_eq!(resp.reason(), Some("kill-switch"));
        let e = &resp.json()["error"];
        assert_eq!(e["reason"], "kill-switch");
        assert_eq!(e["integration"], "test/partner");
        assert_eq!(e["route"], "default");
        assert!(e["message"].as_str().unwrap().contains("INC-123"));
    }
    assert_eq!(
        partner.count(),
        0,
        "zero partner calls through the kill switch"
    );
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_kill_switch_active",
            &[("integration", "test/partner"), ("route", "default")]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "tollgate_requests_total",
            &[("outcome", "kill-switch"), ("code", "503")]
        ),
        3.0,
        "{m}"
    );

    // Off again: traffic flows, without restart.
    sidecar
        .write_kill_switch(&spec(&partner, "killSwitch: {enabled: false}"), false)
        .await;
    assert_eq!(sidecar.status_of(&partner, "/v1/charges").await, 200);
    assert_eq!(partner.count(), 1);
}

#[tokio::test]
async fn a_route_kill_switch_stops_only_that_route() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&spec(
        &partner,
        "routes:\n- name: refunds\n  match: {pathPrefix: /v1/refunds}\n  killSwitch: {enabled: true}",
    ))
    .await;
    let resp = sidecar
        .get(&format!("{}/v1/refunds/9", partner.url()))
        .await;
    assert_eq!(resp.reason(), Some("kill-switch"));
    assert_eq!(resp.json()["error"]["route"], "refunds");
    assert_eq!(sidecar.status_of(&partner, "/v1/charges").await, 200);
    assert_eq!(partner.count(), 1);
}

// === version gate ===

#[tokio::test]
async fn denied_prefixes_get_410_and_pins_overwrite_the_app() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&spec(
        &partner,
        "versioning: {pinHeaders: {Stripe-Version: '2024-06-20'}, deniedPathPrefixes: [/v0]}",
    ))
    .await;
    let resp = sidecar.get(&format!("{}/v0/charges", partner.url())).await;
    assert_eq!(resp.status, 410);
    assert_eq!(resp.reason(), Some("deprecated-version"));
    assert!(
        resp.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v0")
    );
    assert_eq!(
        partner.count(),
        0,
        "a denied prefix never reaches the partner"
    );

    let resp = sidecar
        .send(
            Method::GET,
            &format!("{}/v1/charges", partner.url()),
            &[("stripe-version", "1999-01-01")],
            "",
        )
        .await;
    assert_eq!(resp.status, 200);
    let seen = partner.seen();
    let versions: Vec<_> = seen[0].headers.get_all("stripe-version").iter().collect();
    assert_eq!(versions, ["2024-06-20"]);
}

// === credentials ===

#[tokio::test]
async fn credentials_are_injected_over_the_app_and_rotate_without_restart() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start_with(
        &spec(&partner, "credentials: {secretRef: {name: api, key: token}, header: Authorization, format: 'Bearer {value}'}"),
        Options {
            secrets: vec![("api".into(), "token".into(), "sk_live_first\n".into())],
            ..Options::default()
        },
    )
    .await;
    let url = format!("{}/v1/x", partner.url());
    sidecar
        .send(
            Method::GET,
            &url,
            &[("authorization", "Bearer app-made-this-up")],
            "",
        )
        .await;
    assert_eq!(
        partner.seen()[0].headers["authorization"],
        "Bearer sk_live_first"
    );

    write_secret(&sidecar.secrets_dir(), "api", "token", "sk_live_second");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        sidecar.get(&url).await;
        let last = partner.seen().last().unwrap().headers["authorization"].clone();
        if last == "Bearer sk_live_second" {
            break;
        }
        assert!(Instant::now() < deadline, "rotated key never used");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let config = sidecar.admin_get("/config").await.body;
    let metrics = sidecar.metrics().await;
    for secret in ["sk_live_first", "sk_live_second"] {
        assert!(!config.contains(secret), "credential in /config");
        assert!(!metrics.contains(secret), "credential in /metrics");
        assert!(!sidecar.log_text().contains(secret), "credential in logs");
    }
    assert!(config.contains("\"loaded\": true"), "{config}");
}

// === rate limit ===

#[tokio::test]
async fn over_the_limit_is_answered_429_at_once_with_retry_after() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&spec(
        &partner,
        "rateLimit: {limits: [{name: sustained, requests: 3, per: 1m}]}",
    ))
    .await;
    let url = format!("{}/v1/x", partner.url());
    for _ in 0..3 {
        assert_eq!(sidecar.get(&url).await.status, 200);
    }
    let resp = sidecar.get(&url).await;
    assert_eq!(resp.status, 429);
    assert_eq!(resp.reason(), Some("rate-limited"));
    let retry_after: u64 = resp.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=20).contains(&retry_after),
        "one token per 20s: {retry_after}"
    );
    assert!(
        resp.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sustained")
    );
    assert_eq!(partner.count(), 3);
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_rate_limited_total",
            &[("integration", "test/partner"), ("band", "sustained")]
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn partitions_have_their_own_buckets() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&spec(
        &partner,
        "rateLimit: {partitionBy: x-user-region, limits: [{name: per-region, requests: 2, per: 1m}]}",
    ))
    .await;
    let url = format!("{}/v1/x", partner.url());
    let get = async |region: &str| {
        sidecar
            .send(Method::GET, &url, &[("x-user-region", region)], "")
            .await
            .status
    };
    assert_eq!(get("eu").await, 200);
    assert_eq!(get("eu").await, 200);
    assert_eq!(get("eu").await, 429);
    assert_eq!(get("us").await, 200, "another region is not starved");
    assert_eq!(get("us").await, 200);
    assert_eq!(get("us").await, 429);
}

#[tokio::test]
async fn a_route_quota_sits_under_the_account_quota() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&spec(
        &partner,
        "rateLimit: {limits: [{name: account, requests: 3, per: 1m}]}\nroutes:\n- name: tracking\n  match: {pathPrefix: /v1/tracking}\n  rateLimit: {limits: [{name: tracking, requests: 1, per: 1m}]}",
    ))
    .await;
    let tracking = format!("{}/v1/tracking/1", partner.url());
    let other = format!("{}/v1/labels", partner.url());
    assert_eq!(sidecar.get(&tracking).await.status, 200);
    let denied = sidecar.get(&tracking).await;
    assert_eq!(denied.status, 429);
    assert_eq!(denied.json()["error"]["route"], "tracking");
    // The denied tracking call did not consume the account quota: two more fit.
    assert_eq!(sidecar.get(&other).await.status, 200);
    assert_eq!(sidecar.get(&other).await.status, 200);
    assert_eq!(sidecar.get(&other).await.status, 429);
    assert_eq!(partner.count(), 3);
}

#[tokio::test]
async fn queue_mode_waits_for_a_token_instead_of_refusing() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&spec(
        &partner,
        "rateLimit: {onLimit: queue, maxQueueWait: 2s, limits: [{name: burst, requests: 2, per: 500ms}]}",
    ))
    .await;
    let url = format!("{}/v1/x", partner.url());
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..4 {
        let (listen, url) = (sidecar.listen, url.clone());
        handles.push(tokio::spawn(async move {
            request(listen, Method::GET, &url, &[], "").await.status
        }));
    }
    for h in handles {
        assert_eq!(
            h.await.unwrap(),
            200,
            "queued requests are admitted, not refused"
        );
    }
    assert_eq!(partner.count(), 4);
    // Four requests at 2 per 500ms cannot all have gone at once.
    assert!(
        started.elapsed() >= Duration::from_millis(240),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn queue_mode_refuses_what_cannot_be_served_within_max_queue_wait() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&spec(
        &partner,
        "rateLimit: {onLimit: queue, maxQueueWait: 100ms, limits: [{name: slow, requests: 1, per: 1m}]}",
    ))
    .await;
    let url = format!("{}/v1/x", partner.url());
    assert_eq!(sidecar.get(&url).await.status, 200);
    let resp = sidecar.get(&url).await;
    assert_eq!(resp.status, 429);
    assert!(resp.headers.contains_key("retry-after"));
    assert_eq!(partner.count(), 1);
}

// === circuit breaker ===

#[tokio::test]
async fn consecutive_failures_open_the_breaker_and_calls_fail_fast() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Status(500));
    let sidecar = Sidecar::start(&spec(
        &partner,
        "circuitBreaker: {consecutiveFailures: 2, openDuration: 30s}",
    ))
    .await;
    let url = format!("{}/v1/x", partner.url());
    assert_eq!(
        sidecar.get(&url).await.status,
        500,
        "the partner's own 500 passes through"
    );
    assert_eq!(sidecar.get(&url).await.status, 500);
    let resp = sidecar.get(&url).await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.reason(), Some("circuit-open"));
    let retry_after: u64 = resp.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (25..=30).contains(&retry_after),
        "time until half-open: {retry_after}"
    );
    assert_eq!(
        partner.count(),
        2,
        "zero partner calls through an open breaker"
    );
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_circuit_state",
            &[("integration", "test/partner"), ("route", "*")]
        ),
        2.0,
        "{m}"
    );
}

// === contract ===

fn json_reply(body: &str) -> Reply {
    Reply::Full {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.into(),
    }
}

#[tokio::test]
async fn a_2xx_that_breaks_the_success_rule_opens_the_breaker_and_is_counted() {
    let partner = Partner::start().await;
    partner.script(|_, _| json_reply(r#"{"status":"error","detail":"card declined"}"#));
    let sidecar = Sidecar::start(&spec(
        &partner,
        "contract: {success: {jsonPath: $.status, equals: ok}}\ncircuitBreaker: {consecutiveFailures: 2, openDuration: 30s}",
    ))
    .await;
    let url = format!("{}/v1/charges", partner.url());
    for _ in 0..2 {
        let resp = sidecar.get(&url).await;
        assert_eq!(resp.status, 200, "the app gets the partner's answer");
        assert_eq!(resp.json()["detail"], "card declined");
    }
    let resp = sidecar.get(&url).await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.reason(), Some("circuit-open"));
    assert_eq!(partner.count(), 2);
    let m = sidecar.metrics().await;
    let labels = [
        ("integration", "test/partner"),
        ("route", "default"),
        ("kind", "success-rule"),
    ];
    assert_eq!(
        metric(&m, "tollgate_contract_violations_total", &labels),
        2.0,
        "{m}"
    );
}

/// A 2xx whose body does not match the route's JSON Schema is counted (`kind="schema"`) and
/// is a failure for the breaker; one that matches is neither. The app gets the partner's
/// answer unchanged either way.
#[tokio::test]
async fn a_2xx_that_does_not_match_the_schema_is_counted_and_opens_the_breaker() {
    let partner = Partner::start().await;
    partner.script(|_, seen| {
        if seen.path.starts_with("/v1/good") {
            json_reply(r#"{"id":"o_1","amount":12}"#)
        } else {
            json_reply(r#"{"id":"o_2","amount":"twelve"}"#)
        }
    });
    let sidecar = Sidecar::start(&spec(
        &partner,
        r#"contract: {schema: {inline: '{"type": "object", "required": ["id", "amount"], "properties": {"amount": {"type": "integer"}}}'}}
circuitBreaker: {consecutiveFailures: 2, openDuration: 30s}"#,
    ))
    .await;
    let get = async |path: &str| sidecar.get(&format!("{}{path}", partner.url())).await;
    for _ in 0..3 {
        let resp = get("/v1/good").await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.json()["amount"], 12);
    }
    let m = sidecar.metrics().await;
    let count = |m: &str, kind| {
        metric(
            m,
            "tollgate_contract_violations_total",
            &[
                ("integration", "test/partner"),
                ("route", "default"),
                ("kind", kind),
            ],
        )
    };
    assert_eq!(count(&m, "schema"), 0.0, "{m}");
    for _ in 0..2 {
        let resp = get("/v1/bad").await;
        assert_eq!(resp.status, 200, "the app gets the partner's answer");
        assert_eq!(resp.json()["amount"], "twelve");
    }
    let resp = get("/v1/good").await;
    assert_eq!(resp.reason(), Some("circuit-open"), "{}", resp.body);
    assert_eq!(partner.count(), 5);
    let m = sidecar.metrics().await;
    assert_eq!(count(&m, "schema"), 2.0, "{m}");
    assert_eq!(count(&m, "success-rule"), 0.0, "{m}");
    assert_eq!(
        metric(
            &m,
            "tollgate_requests_total",
            &[("outcome", "contract-violation"), ("result", "failure")]
        ),
        2.0,
        "{m}"
    );
    let config = sidecar.config().await;
    assert_eq!(
        config["integrations"][0]["defaultRoute"]["contract"]["schema"]["source"], "inline",
        "{config}"
    );
}

#[tokio::test]
async fn answers_that_keep_the_contract_or_are_too_long_to_check_are_not_failures() {
    let partner = Partner::start().await;
    partner.script(|_, seen| {
        if seen.path.starts_with("/big") {
            json_reply(&format!(
                r#"{{"status":"error","pad":"{}"}}"#,
                "x".repeat(200)
            ))
        } else {
            json_reply(r#"{"status":"ok"}"#)
        }
    });
    let sidecar = Sidecar::start(&spec(
        &partner,
        "contract: {success: {jsonPath: $.status, equals: ok}, maxBodyBytes: 100}\ncircuitBreaker: {consecutiveFailures: 1, openDuration: 30s}",
    ))
    .await;
    for path in ["/v1/a", "/big", "/v1/b", "/big", "/v1/c"] {
        let resp = sidecar.get(&format!("{}{path}", partner.url())).await;
        assert_eq!(resp.status, 200, "{path}: {}", resp.body);
    }
    assert_eq!(partner.count(), 5, "the breaker stayed closed");
    let m = sidecar.metrics().await;
    let count = |kind| {
        metric(
            &m,
            "tollgate_contract_violations_total",
            &[
                ("integration", "test/partner"),
                ("route", "default"),
                ("kind", kind),
            ],
        )
    };
    assert_eq!(count("unchecked"), 2.0, "{m}");
    assert_eq!(count("success-rule"), 0.0, "{m}");
}

#[tokio::test]
async fn enum_values_never_seen_before_are_counted_not_failed() {
    let partner = Partner::start().await;
    partner.script(|n, _| {
        json_reply(if n % 2 == 0 {
            r#"{"status":"ok","state":"paid"}"#
        } else {
            r#"{"status":"ok","state":"partially_refunded"}"#
        })
    });
    let sidecar = Sidecar::start(&spec(
        &partner,
        "contract: {success: {jsonPath: $.status, equals: ok}, enums: [{jsonPath: $.state, values: [pending, paid]}]}\ncircuitBreaker: {consecutiveFailures: 1, openDuration: 30s}",
    ))
    .await;
    for _ in 0..4 {
        let resp = sidecar.get(&format!("{}/v1/x", partner.url())).await;
        assert_eq!(resp.status, 200, "{}", resp.body);
    }
    assert_eq!(partner.count(), 4, "the breaker stayed closed");
    let m = sidecar.metrics().await;
    let count = |kind| {
        metric(
            &m,
            "tollgate_contract_violations_total",
            &[("integration", "test/partner"), ("kind", kind)],
        )
    };
    assert_eq!(count("unknown-enum"), 2.0, "{m}");
    assert_eq!(count("success-rule"), 0.0, "{m}");
}

#[tokio::test]
async fn the_success_rule_checks_the_sampled_share_of_answers() {
    let partner = Partner::start().await;
    partner.script(|_, _| json_reply(r#"{"status":"error"}"#));
    let sidecar = Sidecar::start(&spec(
        &partner,
        "contract: {success: {jsonPath: $.status, equals: ok}, sampleRate: '0.5'}",
    ))
    .await;
    let url = format!("{}/v1/x", partner.url());
    for _ in 0..200 {
        assert_eq!(sidecar.get(&url).await.status, 200);
    }
    let m = sidecar.metrics().await;
    let broken = metric(
        &m,
        "tollgate_contract_violations_total",
        &[("integration", "test/partner"), ("kind", "success-rule")],
    );
    // Half of 200, give or take seven standard deviations.
    assert!((50.0..=150.0).contains(&broken), "{broken}: {m}");
}

/// `result` on `tollgate_requests_total` and `tollgate_request_duration_seconds` tells the
/// partner's doing (`ok`, `failure`: a 5xx, a contract-breaking 2xx, a stale answer standing in
/// for a 5xx) from the sidecar's refusals (`refused`: kill switch, quota), so the partner's
/// error rate is read over partner calls only.
#[tokio::test]
async fn the_partners_failures_and_the_sidecars_refusals_are_told_apart() {
    let partner = Partner::start().await;
    let cached = std::sync::atomic::AtomicUsize::new(0);
    partner.script(move |_, seen| match seen.path.as_str() {
        "/broken" => json_reply(r#"{"status":"error"}"#),
        "/fail" => Reply::Status(500),
        "/cached" if cached.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 => {
            Reply::Status(500)
        }
        _ => json_reply(r#"{"status":"ok"}"#),
    });
    let sidecar = Sidecar::start(&spec(
        &partner,
        "contract: {success: {jsonPath: $.status, equals: ok}}
routes:
- name: killed
  match: {pathPrefix: /killed}
  killSwitch: {enabled: true}
- name: scarce
  match: {pathPrefix: /scarce}
  rateLimit: {limits: [{name: tiny, requests: 1, per: 1h}]}
- name: cached
  match: {pathPrefix: /cached}
  fallback: {staleIfError: 5m}",
    ))
    .await;
    let url = |p: &str| format!("{}{p}", partner.url());
    for (path, status) in [
        ("/ok", 200),
        ("/broken", 200),
        ("/fail", 500),
        ("/killed", 503),
        ("/scarce", 200),
        ("/scarce", 429),
        ("/cached", 200),
        ("/cached", 200),
    ] {
        assert_eq!(sidecar.get(&url(path)).await.status, status, "{path}");
    }
    let m = sidecar.metrics().await;
    let calls = |labels: &[(&str, &str)]| metric(&m, "tollgate_requests_total", labels);
    assert_eq!(calls(&[("result", "ok")]), 3.0, "{m}");
    assert_eq!(calls(&[("result", "failure")]), 3.0, "{m}");
    assert_eq!(calls(&[("result", "refused")]), 2.0, "{m}");
    for (outcome, code, result) in [
        ("contract-violation", "200", "failure"),
        ("partner-error", "500", "failure"),
        ("fallback-stale", "200", "failure"),
        ("kill-switch", "503", "refused"),
        ("rate-limited", "429", "refused"),
    ] {
        assert_eq!(
            calls(&[("outcome", outcome), ("code", code), ("result", result)]),
            1.0,
            "{outcome}: {m}"
        );
    }
    assert_eq!(calls(&[("outcome", "success")]), 3.0, "{m}");
    let timed = |result| {
        metric(
            &m,
            "tollgate_request_duration_seconds_count",
            &[("integration", "test/partner"), ("result", result)],
        )
    };
    assert_eq!(
        (timed("ok"), timed("failure"), timed("refused")),
        (3.0, 3.0, 2.0),
        "{m}"
    );
}

#[tokio::test]
async fn client_errors_do_not_open_the_breaker() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Status(404));
    let sidecar = Sidecar::start(&spec(&partner, "circuitBreaker: {consecutiveFailures: 2}")).await;
    let url = format!("{}/v1/x", partner.url());
    for _ in 0..5 {
        assert_eq!(sidecar.get(&url).await.status, 404);
    }
    assert_eq!(partner.count(), 5);
}

// === retries ===

fn retry_spec(partner: &Partner, extra: &str) -> String {
    spec(
        partner,
        &format!("retries: {{maxAttempts: 3, backoff: {{base: 1ms, max: 5ms}}{extra}}}"),
    )
}

#[tokio::test]
async fn retryable_statuses_are_retried_exactly_max_attempts_times() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Status(503));
    let sidecar = Sidecar::start(&retry_spec(&partner, "")).await;
    let resp = sidecar.get(&format!("{}/v1/x", partner.url())).await;
    assert_eq!(resp.status, 503, "the last partner answer passes through");
    assert_eq!(partner.count(), 3);
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_retries_total",
            &[("integration", "test/partner")]
        ),
        2.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_retry_that_succeeds_returns_the_success() {
    let partner = Partner::start().await;
    partner.queue([Reply::Status(502), Reply::Reset]);
    let sidecar = Sidecar::start(&retry_spec(&partner, "")).await;
    let resp = sidecar.get(&format!("{}/v1/x", partner.url())).await;
    assert_eq!(resp.status, 200);
    assert_eq!(partner.count(), 3);
}

#[tokio::test]
async fn other_client_errors_are_never_retried() {
    let partner = Partner::start().await;
    for code in [400, 401, 404, 409, 422] {
        partner.clear();
        partner.script(move |_, _| Reply::Status(code));
        let sidecar = Sidecar::start(&retry_spec(
            &partner,
            ", retryOn: [connect-error, reset, timeout, '429', '500', '502', '503', '504']",
        ))
        .await;
        assert_eq!(sidecar.status_of(&partner, "/v1/x").await, code);
        assert_eq!(partner.count(), 1, "{code} retried");
    }
}

#[tokio::test]
async fn post_is_retried_only_with_an_idempotency_key() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Status(503));
    let sidecar = Sidecar::start(&retry_spec(&partner, "")).await;
    let url = format!("{}/v1/charges", partner.url());
    sidecar.send(Method::POST, &url, &[], "{}").await;
    assert_eq!(partner.count(), 1, "POST without a key: one attempt");
    partner.clear();
    sidecar
        .send(Method::POST, &url, &[("idempotency-key", "k-1")], "{}")
        .await;
    assert_eq!(partner.count(), 3, "POST with a key: retried");
    assert!(
        partner
            .seen()
            .iter()
            .all(|s| s.headers["idempotency-key"] == "k-1" && &s.body[..] == b"{}")
    );
}

#[tokio::test]
async fn a_generated_idempotency_key_is_the_same_on_every_attempt() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Status(503));
    let sidecar = Sidecar::start(&retry_spec(
        &partner,
        ", idempotency: {header: Idempotency-Key, generate: true}",
    ))
    .await;
    let url = format!("{}/v1/charges", partner.url());
    sidecar
        .send(Method::POST, &url, &[], "{\"amount\":1}")
        .await;
    let seen = partner.seen();
    assert_eq!(seen.len(), 3);
    let key = seen[0].headers["idempotency-key"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(key.len(), 36, "{key}");
    assert!(
        seen.iter()
            .all(|s| s.headers["idempotency-key"] == key.as_str())
    );
    // A second call gets a fresh key.
    partner.clear();
    sidecar.send(Method::POST, &url, &[], "{}").await;
    assert_ne!(partner.seen()[0].headers["idempotency-key"], key.as_str());
}

#[tokio::test]
async fn timeouts_are_retried_and_end_in_504() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Delay(Duration::from_secs(2), Box::new(Reply::ok("too late"))));
    let sidecar = Sidecar::start(&spec(
        &partner,
        "timeouts: {request: 100ms, total: 10s}\nretries: {maxAttempts: 3, backoff: {base: 1ms, max: 2ms}}",
    ))
    .await;
    let resp = sidecar.get(&format!("{}/v1/x", partner.url())).await;
    assert_eq!(resp.status, 504);
    assert_eq!(resp.reason(), Some("timeout"));
    assert_eq!(partner.count(), 3);
}

#[tokio::test]
async fn the_total_deadline_bounds_attempts_and_backoff() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Delay(Duration::from_secs(5), Box::new(Reply::ok("too late"))));
    let sidecar = Sidecar::start(&spec(
        &partner,
        "timeouts: {request: 200ms, total: 300ms}\nretries: {maxAttempts: 10, backoff: {base: 1ms, max: 2ms}}",
    ))
    .await;
    let started = Instant::now();
    let resp = sidecar.get(&format!("{}/v1/x", partner.url())).await;
    assert_eq!(resp.status, 504);
    assert!(
        partner.count() <= 2,
        "300ms total allows at most two 200ms attempts: {}",
        partner.count()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the call did not wait for the partner"
    );
}

#[tokio::test]
async fn connect_errors_are_retried_then_reported_unreachable() {
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let sidecar = Sidecar::start(&manifest(
        "partner",
        &format!("upstream: {{url: 'http://127.0.0.1:{port}'}}\nretries: {{maxAttempts: 3, backoff: {{base: 1ms, max: 2ms}}}}"),
    ))
    .await;
    let resp = sidecar.get(&format!("http://127.0.0.1:{port}/v1/x")).await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.reason(), Some("upstream-unreachable"));
    assert!(
        resp.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("3 attempt"),
        "{}",
        resp.body
    );
    let m = sidecar.metrics().await;
    assert_eq!(metric(&m, "tollgate_retries_total", &[]), 2.0, "{m}");
}

#[tokio::test]
async fn retry_after_from_the_partner_is_honoured() {
    let partner = Partner::start().await;
    partner.queue([Reply::Full {
        status: 503,
        headers: vec![("retry-after".into(), "1".into())],
        body: "busy".into(),
    }]);
    let sidecar = Sidecar::start(&retry_spec(&partner, "")).await;
    let started = Instant::now();
    let resp = sidecar.get(&format!("{}/v1/x", partner.url())).await;
    assert_eq!(resp.status, 200);
    assert_eq!(partner.count(), 2);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "retried before Retry-After: {:?}",
        started.elapsed()
    );
}

// === fallback ===

#[tokio::test]
async fn static_fallback_stands_in_for_the_kill_switch() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&spec(
        &partner,
        "killSwitch: {enabled: true}\nfallback:\n  response: {status: 200, headers: {content-type: application/json}, body: '{\"status\":\"degraded\"}'}",
    ))
    .await;
    let resp = sidecar.get(&format!("{}/v1/x", partner.url())).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.headers["x-tollgate-fallback"], "static");
    assert_eq!(resp.headers["content-type"], "application/json");
    assert_eq!(resp.body, r#"{"status":"degraded"}"#);
    assert_eq!(partner.count(), 0);
}

#[tokio::test]
async fn stale_if_error_serves_the_last_good_get() {
    let partner = Partner::start().await;
    partner.queue([Reply::ok("fresh data")]);
    partner.script(|_, _| Reply::Status(500));
    let sidecar = Sidecar::start(&spec(&partner, "fallback: {staleIfError: 5m}")).await;
    let url = format!("{}/v1/catalog", partner.url());
    let first = sidecar.get(&url).await;
    assert_eq!(first.body, "fresh data");
    assert!(!first.headers.contains_key("x-tollgate-fallback"));
    let second = sidecar.get(&url).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.body, "fresh data");
    assert_eq!(second.headers["x-tollgate-fallback"], "stale");
    // Another path has nothing cached: the partner's error passes through.
    assert_eq!(sidecar.status_of(&partner, "/v1/other").await, 500);
}

#[tokio::test]
async fn bodies_too_large_to_buffer_stream_once_and_are_never_retried() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Status(503));
    let sidecar = Sidecar::start_with(
        &retry_spec(&partner, ""),
        Options {
            args: vec!["--replay-limit".into(), "1024".into()],
            ..Options::default()
        },
    )
    .await;
    let url = format!("{}/v1/upload", partner.url());
    let big = "b".repeat(5000);
    sidecar.send(Method::PUT, &url, &[], &big).await;
    let seen = partner.seen();
    assert_eq!(seen.len(), 1, "a streamed body is sent once");
    assert_eq!(seen[0].body.len(), 5000, "and arrives whole");
    partner.clear();
    sidecar.send(Method::PUT, &url, &[], &"s".repeat(500)).await;
    assert_eq!(partner.count(), 3, "a buffered body is replayed");
    assert!(partner.seen().iter().all(|s| s.body.len() == 500));
}

// === every attempt spends the quota ===

#[tokio::test]
async fn every_retry_spends_a_token_of_the_quota() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Status(503));
    let sidecar = Sidecar::start(&spec(
        &partner,
        "rateLimit: {limits: [{name: sustained, requests: 4, per: 1m}]}\nretries: {maxAttempts: 3, backoff: {base: 1ms, max: 5ms}}",
    ))
    .await;
    let url = format!("{}/v1/x", partner.url());
    // Three attempts spend three tokens.
    let first = sidecar.get(&url).await;
    assert_eq!(
        first.status, 503,
        "the partner's own answer: {}",
        first.body
    );
    assert_eq!(partner.count(), 3);
    // One token left: the first attempt takes it, the retry finds none and the app gets the
    // partner's last answer.
    let second = sidecar.get(&url).await;
    assert_eq!(second.status, 503);
    assert_eq!(
        second.reason(),
        None,
        "the partner's answer, not the sidecar's"
    );
    assert_eq!(partner.count(), 4);
    // Nothing left for a first attempt: the contract's 429.
    let third = sidecar.get(&url).await;
    assert_eq!(third.status, 429);
    assert_eq!(third.reason(), Some("rate-limited"));
    assert_eq!(
        partner.count(),
        4,
        "the partner received exactly its quota, retries included"
    );
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_retries_skipped_total",
            &[("integration", "test/partner"), ("reason", "rate-limited")]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "tollgate_retries_total", &[]), 2.0, "{m}");
}

#[tokio::test]
async fn retries_spend_the_route_quota_and_the_account_quota() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Status(503));
    let sidecar = Sidecar::start(&spec(
        &partner,
        "rateLimit: {limits: [{name: account, requests: 5, per: 1m}]}\nretries: {maxAttempts: 3, backoff: {base: 1ms, max: 5ms}}\nroutes:\n- name: tracking\n  match: {pathPrefix: /v1/tracking}\n  rateLimit: {limits: [{name: tracking, requests: 2, per: 1m}]}",
    ))
    .await;
    let tracking = format!("{}/v1/tracking/1", partner.url());
    let other = format!("{}/v1/labels", partner.url());
    // The route allows two attempts in all.
    assert_eq!(sidecar.get(&tracking).await.status, 503);
    assert_eq!(partner.count(), 2);
    let denied = sidecar.get(&tracking).await;
    assert_eq!(denied.reason(), Some("rate-limited"));
    assert_eq!(denied.json()["error"]["route"], "tracking");
    // Both tracking attempts were charged to the account as well: three are left, one call's
    // three attempts.
    assert_eq!(sidecar.get(&other).await.status, 503);
    assert_eq!(partner.count(), 5);
    assert_eq!(sidecar.get(&other).await.reason(), Some("rate-limited"));
    assert_eq!(partner.count(), 5);
}

#[tokio::test]
async fn in_queue_mode_a_retry_waits_for_its_token() {
    let partner = Partner::start().await;
    partner.queue([Reply::Status(503)]);
    let sidecar = Sidecar::start(&spec(
        &partner,
        "rateLimit: {onLimit: queue, maxQueueWait: 5s, limits: [{name: slow, requests: 1, per: 400ms}]}\nretries: {maxAttempts: 3, backoff: {base: 1ms, max: 5ms}}",
    ))
    .await;
    let started = Instant::now();
    let resp = sidecar.get(&format!("{}/v1/x", partner.url())).await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(partner.count(), 2);
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "the retry went before a token came back: {:?}",
        started.elapsed()
    );
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_rate_limit_decisions_total",
            &[("decision", "queued")]
        ),
        1.0,
        "{m}"
    );
}

// === each quota has its own partition key ===

#[tokio::test]
async fn a_route_quota_is_partitioned_by_its_own_header() {
    let partner = Partner::start().await;
    let sidecar = Sidecar::start(&spec(
        &partner,
        "rateLimit: {partitionBy: x-account, limits: [{name: account, requests: 100, per: 1m}]}\nroutes:\n- name: tracking\n  match: {pathPrefix: /v1/tracking}\n  rateLimit: {partitionBy: x-user, limits: [{name: per-user, requests: 1, per: 1m}]}",
    ))
    .await;
    let url = format!("{}/v1/tracking/1", partner.url());
    let get = async |account: &str, user: &str| {
        sidecar
            .send(
                Method::GET,
                &url,
                &[("x-account", account), ("x-user", user)],
                "",
            )
            .await
    };
    assert_eq!(get("acme", "ann").await.status, 200);
    let bob = get("acme", "bob").await;
    assert_eq!(
        bob.status, 200,
        "another user of the same account has a bucket of their own: {}",
        bob.body
    );
    let again = get("acme", "ann").await;
    assert_eq!(again.status, 429);
    let message = again.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("per-user"), "{message}");
    assert!(
        message.contains("x-user"),
        "the message names the header: {message}"
    );
    assert_eq!(
        get("globex", "ann").await.status,
        429,
        "ann is ann in any account"
    );
    assert_eq!(partner.count(), 2);
}

// === partitions are bounded ===

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

/// Sends `count` GETs, each with a distinct `x-user` value of `len` bytes, over a few
/// keep-alive connections, and expects each to be answered 200.
async fn spray_partitions(sidecar: &Sidecar, url: &str, from: usize, count: usize, len: usize) {
    const CONNECTIONS: usize = 4;
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let (listen, url) = (sidecar.listen, url.to_string());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(listen).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let uri: http::Uri = url.parse().unwrap();
            for i in (from + c..from + count).step_by(CONNECTIONS) {
                let mut value = format!("user-{i:08}-");
                value.extend(std::iter::repeat_n('v', len - value.len()));
                let req = http::Request::get(uri.clone())
                    .header("host", uri.authority().unwrap().as_str())
                    .header("x-user", value)
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                sender.ready().await.unwrap();
                let resp = sender.send_request(req).await.unwrap();
                assert_eq!(resp.status(), 200, "request {i}");
                http_body_util::BodyExt::collect(resp.into_body())
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn thousands_of_large_partition_values_do_not_grow_the_sidecar() {
    let partner = Partner::start().await;
    // Record nothing of the requests: the test process is not what is measured.
    partner.script(|_, _| Reply::Status(200));
    let sidecar = Sidecar::start(&spec(
        &partner,
        "rateLimit: {partitionBy: x-user, limits: [{name: per-user, requests: 5, per: 1h}]}",
    ))
    .await;
    let url = format!("{}/v1/x", partner.url());
    const LEN: usize = 16 * 1024;
    // Warm up buffers and pools, then measure what 4,000 more distinct users cost.
    spray_partitions(&sidecar, &url, 0, 400, LEN).await;
    partner.clear();
    let before = rss_bytes(sidecar.pid());
    spray_partitions(&sidecar, &url, 400, 4000, LEN).await;
    partner.clear();
    let after = rss_bytes(sidecar.pid());
    let grown = after.saturating_sub(before);
    eprintln!(
        "sidecar RSS {} KiB -> {} KiB (+{} KiB) for 4000 distinct 16 KiB partition values",
        before / 1024,
        after / 1024,
        grown / 1024
    );
    assert!(
        grown < 16 * 1024 * 1024,
        "4000 partitions of 16 KiB values grew the sidecar by {} KiB",
        grown / 1024
    );
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_rate_limit_partitions",
            &[("integration", "test/partner")]
        ),
        4400.0,
        "{m}"
    );
}

// === counters ===

#[tokio::test]
async fn limiter_decisions_and_retry_budget_exhaustion_are_counted() {
    let partner = Partner::start().await;
    partner.script(|_, _| Reply::Status(503));
    let sidecar = Sidecar::start(&spec(
        &partner,
        "rateLimit: {limits: [{name: sustained, requests: 17, per: 1m}]}\nretries: {maxAttempts: 3, backoff: {base: 1ms, max: 2ms}, budget: {percent: 0, minPerSecond: 1}}",
    ))
    .await;
    let url = format!("{}/v1/x", partner.url());
    // The budget allows 10 retries in its 10 s window: five calls make three attempts each,
    // the next two one each; that spends the quota's 17 tokens, so the eighth call is refused.
    for _ in 0..7 {
        assert_eq!(sidecar.get(&url).await.status, 503);
    }
    assert_eq!(partner.count(), 17);
    assert_eq!(sidecar.get(&url).await.status, 429);
    let m = sidecar.metrics().await;
    let labels = |extra: (&'static str, &'static str)| {
        [("integration", "test/partner"), ("route", "default"), extra]
    };
    assert_eq!(
        metric(
            &m,
            "tollgate_retries_skipped_total",
            &labels(("reason", "budget"))
        ),
        2.0,
        "{m}"
    );
    let decisions = "tollgate_rate_limit_decisions_total";
    assert_eq!(
        metric(&m, decisions, &labels(("decision", "admitted"))),
        17.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, decisions, &labels(("decision", "queued"))),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, decisions, &labels(("decision", "denied"))),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, decisions, &[("quota", "integration")]),
        18.0,
        "every decision was the integration quota's: {m}"
    );
}
